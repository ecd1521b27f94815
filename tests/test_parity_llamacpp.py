"""The torch engine against llama.cpp on the same GGUF: logits, and greedy continuations."""

import pytest
import torch

from pipellm_core.engine import Engine
from pipellm_core.llamacpp_backend import LlamaCppBackend
from pipellm_core.request import Request
from pipellm_core.sampling import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]

# llama.cpp multiplies Q4_1 weights by activations quantized to 8 bits; we multiply by the
# dequantized weights in float32. The logits differ by that rounding, well under this bound.
LOGIT_REL_ERR_SMOLLM2 = 0.2
LOGIT_REL_ERR_F32 = 1e-3


def greedy(backend, prompts, n):
    reqs = [Request(backend.tokenizer.encode(p), n, SamplingParams(temperature=0)) for p in prompts]
    for _ in backend.generate(reqs):
        pass
    return [r.generated for r in reqs]


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def check_logits(engine, ref, prompt, bound):
    tokens = engine.tokenizer.encode(prompt)
    ours = engine.prefill([tokens], [0], all_logits=True)[0].float()
    theirs = ref.prompt_logits(tokens)
    assert ours.shape == theirs.shape
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1)), prompt
    worst = max(rel_err(ours[i], theirs[i]) for i in range(len(tokens)))
    assert worst < bound, f"{prompt!r}: relative error {worst:.4f}"
    return worst


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_logits_match_llamacpp(smollm2_engine, smollm2_llamacpp, prompt):
    check_logits(smollm2_engine, smollm2_llamacpp, prompt, LOGIT_REL_ERR_SMOLLM2)


def test_smollm2_greedy_32_tokens_match_llamacpp(smollm2_engine, smollm2_llamacpp):
    ours = greedy(smollm2_engine, PROMPTS, 32)
    theirs = greedy(smollm2_llamacpp, PROMPTS, 32)
    for p, a, b in zip(PROMPTS, ours, theirs):
        assert a == b, p
    assert sum(len(a) for a in ours) >= 5 * 16  # real continuations, not early stops


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_random_model_matches_llamacpp(tiny_models, arch):
    path = tiny_models[arch]
    engine = Engine(path, max_batch=4, ctx_size=256, progress=False)
    ref = LlamaCppBackend(path, max_batch=4, ctx_size=256)
    assert engine.config.arch == arch
    for prompt in PROMPTS[:3]:
        check_logits(engine, ref, prompt, LOGIT_REL_ERR_F32)
    ours, theirs = greedy(engine, PROMPTS, 32), greedy(ref, PROMPTS, 32)
    assert ours == theirs
