"""The torch engine against llama.cpp on the same GGUF: logits, and greedy continuations."""

import pytest

from pipellm_core.runtime.engine import Engine
from pipellm_core.llamacpp.backend import LlamaCppBackend
from pipellm_core.runtime.request import Request
from pipellm_core.runtime.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "import numpy as np\n",
    "The largest planet in the solar system is",
    "Water boils at",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "In 1492, Columbus",
    "The chemical symbol for gold is",
]

# llama.cpp multiplies quantized weights by activations it first rounds to 8 bits per block of
# 32 and keeps the KV cache in fp16; we do both (activation_rounding.py, the engine's cache) but
# not its kernels' summation order. On SmolLM2 (a model with very large activation outliers) the
# tiny differences that remain get amplified through 30 layers: measured logits differ by up to
# ~22% (relative L2), and top-1 differs only where llama.cpp's own top-2 logits are nearly tied.
LOGIT_REL_ERR_SMOLLM2 = 0.3
NEAR_TIE = 0.5  # logits: a top-1 mismatch is allowed only when llama.cpp's top-2 gap is smaller
# Measured on this file: 5 of the 12 prompts give identical 32-token greedy continuations one
# sequence at a time; the others share a prefix of 6 to 31 tokens first.
MIN_IDENTICAL_CONTINUATIONS = 5
LOGIT_REL_ERR_F32 = 1e-2  # F32 weights: only fp16 KV cache rounding in llama.cpp remains


def greedy(backend, prompts, n, together=False):
    """Greedy tokens; one prompt at a time unless `together` (llama.cpp's own results depend on
    how many sequences share a batch, so parity is checked one sequence at a time)."""
    def run(batch):
        reqs = [Request(backend.tokenizer.encode(p), n, SamplingParams(temperature=0)) for p in batch]
        for _ in backend.generate(reqs):
            pass
        return [r.generated for r in reqs]
    return run(prompts) if together else [run([p])[0] for p in prompts]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def check_logits(engine, ref, prompt, bound, near_tie=0.0):
    """Max relative error of the logits over the prompt's positions; top-1 must agree except
    where llama.cpp's top-2 logits are within `near_tie`."""
    tokens = engine.tokenizer.encode(prompt)
    ours = engine.prefill([tokens], [0], all_logits=True)[0].float().cpu()
    theirs = ref.prompt_logits(tokens)
    assert ours.shape == theirs.shape
    for i in range(len(tokens)):
        if int(ours[i].argmax()) != int(theirs[i].argmax()):
            top2 = theirs[i].topk(2).values
            assert float(top2[0] - top2[1]) < near_tie, f"{prompt!r}: top-1 differs at position {i}"
    worst = max(rel_err(ours[i], theirs[i]) for i in range(len(tokens)))
    assert worst < bound, f"{prompt!r}: relative error {worst:.4f}"
    return worst


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_match_llamacpp(smollm2_engine, smollm2_llamacpp, prompt):
    check_logits(smollm2_engine, smollm2_llamacpp, prompt, LOGIT_REL_ERR_SMOLLM2, NEAR_TIE)


def test_smollm2_greedy_32_tokens_match_llamacpp(smollm2_engine, smollm2_llamacpp):
    ours = greedy(smollm2_engine, PROMPTS, 32)
    theirs = greedy(smollm2_llamacpp, PROMPTS, 32)
    identical = [p for p, a, b in zip(PROMPTS, ours, theirs) if a == b and len(a) == 32]
    print(f"identical 32-token greedy continuations: {len(identical)} of {len(PROMPTS)}")
    assert len(identical) >= MIN_IDENTICAL_CONTINUATIONS, identical
    # where they differ, they agree at the start (no systematic error)
    prefix = [next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), len(a)) for a, b in zip(ours, theirs)]
    print("shared greedy prefix per prompt:", prefix)
    assert sorted(prefix)[len(prefix) // 2] >= 8, prefix


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_random_model_matches_llamacpp(tiny_models, arch):
    path = tiny_models[arch]
    engine = Engine(path, max_batch=4, ctx_size=256, progress=False)
    ref = LlamaCppBackend(path, max_batch=4, ctx_size=256)
    assert engine.config.arch == arch
    for prompt in PROMPTS[:3]:
        check_logits(engine, ref, prompt, LOGIT_REL_ERR_F32)
    ours, theirs = greedy(engine, PROMPTS[:6], 32), greedy(ref, PROMPTS[:6], 32)
    assert ours == theirs
