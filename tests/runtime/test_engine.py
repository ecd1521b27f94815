"""Batching in the torch engine: sequences in one batch do not disturb each other.

Batched and single runs use different matrix kernels; the 8-bit activation rounding that
matches llama.cpp amplifies their last-bit differences (as it does in llama.cpp itself), so the
bound is loose. A mixed-up sequence would be off by more than 100%.
"""

import torch

from pipellm_core.runtime.engine import Engine
from pipellm_core.runtime.step import StepBatch

BOUND = 0.3
PROMPTS = ["The capital of France is", "def add(a, b):\n    return", "Red, green and"]


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_batched_prefill_and_decode_match_single(smollm2_path):
    engine = Engine(smollm2_path, max_batch=3, ctx_size=128, progress=False)
    toks = [engine.tokenizer.encode(p) for p in PROMPTS]
    batched = engine.prefill(toks, [0, 1, 2])
    singles = [engine.prefill([t], [s])[0] for s, t in zip([0, 1, 2], toks)]
    for b, s in zip(batched, singles):
        assert rel(b, s) < BOUND and int(b.argmax()) == int(s.argmax())
    nxt = batched.argmax(-1)
    pos = torch.tensor([len(t) for t in toks])
    step = engine.decode_step(StepBatch(nxt, pos, torch.tensor([0, 1, 2]), int(pos.max()) + 1))
    for i in range(3):
        one = engine.decode_step(StepBatch(nxt[i:i + 1], pos[i:i + 1], torch.tensor([i]), int(pos[i]) + 1))
        assert rel(step[i], one[0]) < BOUND and int(step[i].argmax()) == int(one[0].argmax())


def test_slots_are_independent(smollm2_path):
    """A sequence's logits do not change with what another slot holds."""
    engine = Engine(smollm2_path, max_batch=2, ctx_size=64, progress=False)
    t = engine.tokenizer.encode(PROMPTS[0])
    a = engine.prefill([t], [0])[0]
    engine.prefill([engine.tokenizer.encode("completely different text " * 3)], [1])
    b = engine.prefill([t], [0])[0]
    assert torch.equal(a, b)


def test_decode_steps_run_in_padded_shapes(smollm2_path):
    """Three sequences run as a batch of 4 over 512 cache positions (as on CUDA); the padding
    row writes only to the scratch slot, and the real rows' logits are the unpadded step's
    (up to the kernels' last bits, which another batch size changes)."""
    from pipellm_core.runtime.request import Request
    from pipellm_core.runtime.sampling import SamplingParams

    engine = Engine(smollm2_path, max_batch=4, ctx_size=1024, progress=False, pad_steps=True)
    reqs = [Request(engine.tokenizer.encode(p), 1, SamplingParams(temperature=0)) for p in PROMPTS]
    for r, s in zip(reqs, range(3)):
        r.slot = s
    first = engine.prefill_logits(reqs).argmax(-1).tolist()
    for r, t in zip(reqs, first):
        r.generated.append(t)
    step = engine._step_batch(reqs)
    assert len(step) == 4 and step.ctx_len == 512
    assert step.slots.tolist() == [0, 1, 2, engine.pad_slot]
    before = [engine.cache.k[0][s].clone() for s in range(3)]
    padded = engine.decode_logits(reqs)
    assert padded.shape[0] == 3
    exact = engine.decode_step(step.select(slice(0, 3)))
    assert rel(padded, exact) < BOUND and padded.argmax(-1).tolist() == exact.argmax(-1).tolist()
    for s in range(3):  # only each sequence's own new position was written
        changed = (engine.cache.k[0][s] != before[s]).any(-1).any(0).nonzero().flatten().tolist()
        assert changed == [reqs[s].position]


def test_cpu_steps_keep_their_exact_shape(smollm2_path):
    from pipellm_core.runtime.request import Request
    from pipellm_core.runtime.sampling import SamplingParams

    engine = Engine(smollm2_path, max_batch=4, ctx_size=1024, progress=False)
    reqs = [Request([1, 2, 3], 1, SamplingParams(temperature=0)) for _ in range(3)]
    for r, s in zip(reqs, range(3)):
        r.slot, r.generated = s, [4]
    step = engine._step_batch(reqs)
    assert len(step) == 3 and step.ctx_len == 4


def test_grouped_query_layout_equals_grouped_query_attention():
    """The layout the CUDA path uses (query heads of a key/value head as extra positions) gives
    PyTorch's grouped-query attention."""
    import torch.nn.functional as F

    from pipellm_core.model.transformer import grouped_query_attention
    g = torch.Generator().manual_seed(0)
    B, T, H, KV, D, C = 2, 3, 8, 2, 16, 10
    q, k, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, KV, C, D, generator=g), torch.randn(B, KV, C, D, generator=g)
    ends = torch.tensor([[4, 5, 6], [7, 8, 9]])
    mask = (torch.arange(C)[None, None, :] <= ends[:, :, None]).unsqueeze(1)
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    got = grouped_query_attention(q, k, v, mask)
    assert got.shape == (B, T, H, D)
    assert torch.allclose(got, want, atol=1e-5)
