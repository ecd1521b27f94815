"""Decode attention read from the cache by slot, against a float64 reference that gathers each
row's keys and values and takes the softmax, in Triton's interpreter on the CPU (a subprocess:
the interpreter is chosen when the kernels are defined). On a GPU, the marked test runs real
sizes.

Cache positions past each row's length hold garbage (keys of 3e4, values of NaN), so a kernel
that read or weighted them would be caught; `torch.empty` is patched to hand out NaN-filled
memory, so output or workspace elements left unwritten would show."""

import pytest
import torch

from tests.model.test_kernels import run_in_interpreter

pytest.importorskip("triton")

BOUND = 2e-3  # relative error (Frobenius norm over the step's output) against float64

CHECK = r"""
import math, torch
from pipellm_core.model.kernels import decode_attention as kernel

dev = "{device}"
bound = BOUND
_empty = torch.empty
def poisoned_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t
torch.empty = poisoned_empty

def reference(q, kc, vc, slots, lengths, scale, window=0, softcap=0.0):
    B, H, D = q.shape
    G = H // kc.shape[1]
    out = torch.empty(B, H, D, dtype=torch.float64, device=q.device)
    for b in range(B):
        L = int(lengths[b])
        F = max(0, L - window) if window else 0
        k = kc[slots[b], :, F:L].double().repeat_interleave(G, 0)  # [H, L - F, D]
        v = vc[slots[b], :, F:L].double().repeat_interleave(G, 0)
        scores = torch.einsum("hd,hld->hl", q[b].double(), k) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        w = torch.softmax(scores, -1)
        out[b] = torch.einsum("hl,hld->hd", w, v)
    return out

def check(B, H, KV, D, ctx_len, S, seed, given_workspace, window=0, softcap=0.0):
    g = torch.Generator().manual_seed(seed)
    C = ctx_len + 7
    q = torch.randn(B, H, D, generator=g).half().to(dev)
    kc = (torch.randn(S, KV, C, D, generator=g) * 2).half()
    vc = torch.randn(S, KV, C, D, generator=g).half()
    slots = torch.randperm(S, generator=g)[:B]
    lengths = torch.randint(1, ctx_len + 1, (B,), generator=g)
    if B > 1:
        lengths[0], lengths[-1] = ctx_len, 1
    garbage = torch.ones(S, dtype=torch.bool)
    garbage[slots] = False
    kc[garbage], vc[garbage] = 3e4, float("nan")
    for b in range(B):
        kc[slots[b], :, lengths[b]:], vc[slots[b], :, lengths[b]:] = 3e4, float("nan")
        if window:  # positions before the window must not be read either
            first = max(0, int(lengths[b]) - window)
            kc[slots[b], :, :first], vc[slots[b], :, :first] = 3e4, float("nan")
    kc, vc, slots, lengths = kc.to(dev), vc.to(dev), slots.to(dev), lengths.to(dev)
    scale = 1 / math.sqrt(D)
    workspace = None
    if given_workspace:
        workspace = torch.full((kernel.workspace_size(B, H, D, ctx_len),), float("nan"), device=dev)
    got = kernel.decode_attention(q, kc, vc, slots, lengths, ctx_len, scale, workspace, window, softcap)
    again = kernel.decode_attention(q, kc, vc, slots, lengths, ctx_len, scale, workspace, window, softcap)
    want = reference(q, kc, vc, slots, lengths, scale, window, softcap)
    err = ((got.double() - want).norm() / want.norm()).item()
    if softcap:  # the cap changes the answer: not the uncapped attention
        uncapped = reference(q, kc, vc, slots, lengths, scale, window)
        assert ((uncapped - want).norm() / want.norm()).item() > 10 * bound
    case = (B, H, KV, D, ctx_len, window, softcap, kernel.split_shape(B, H, ctx_len), lengths.tolist())
    assert got.shape == (B, H, D) and got.dtype == torch.float16, case
    assert torch.isfinite(got).all() and err < bound, (case, err)
    assert torch.equal(got, again), case
    print(case, f"{{err:.1e}}")

for i, (B, H, KV, D, ctx_len) in enumerate(CASES):
    check(B, H, KV, D, ctx_len, S=max(5, B + 1), seed=i, given_workspace=i % 2 == 0)
# sliding windows: shorter than some rows, longer than others, and one position
for i, (B, H, KV, D, ctx_len, window) in enumerate([(1, 4, 2, 64, 300, 100), (3, 8, 2, 64, 300, 64),
                                                    (3, 9, 3, 64, 100, 1), (2, 4, 4, 128, 200, 500),
                                                    (2, 8, 4, 256, 150, 64)]):
    check(B, H, KV, D, ctx_len, S=max(5, B + 1), seed=100 + i, given_workspace=i % 2 == 1, window=window)
# soft-capped scores (Gemma 2), with and without a window; a cap small enough to bite
for i, (B, H, KV, D, ctx_len, window, cap) in enumerate([(2, 8, 4, 64, 200, 0, 1.0), (3, 4, 2, 128, 150, 32, 0.5)]):
    check(B, H, KV, D, ctx_len, S=max(5, B + 1), seed=300 + i, given_workspace=i == 0, window=window, softcap=cap)
EXTRA
print("ok")
"""

INTERPRETER_CASES = [(B, H, KV, D, ctx) for B in (1, 3) for H, KV in ((4, 4), (8, 2), (9, 3))
                     for D in (64, 128) for ctx in (16, 100, 300)]
# head sizes 32 and 96; the merge taking several chunks; splits of one block each
INTERPRETER_EXTRA = r"""
for i, (B, H, KV, D, ctx_len) in enumerate([(2, 6, 2, 32, 70), (3, 4, 1, 96, 130)]):
    check(B, H, KV, D, ctx_len, S=5, seed=100 + i, given_workspace=True)
kernel.MERGE_CHUNK, kernel.MIN_SPLIT = 2, 64
for i, (B, H, KV, D, ctx_len) in enumerate([(1, 4, 2, 64, 300), (3, 8, 2, 64, 200)]):
    assert kernel.split_shape(B, H, ctx_len)[1] > 2
    check(B, H, KV, D, ctx_len, S=5, seed=200 + i, given_workspace=i == 0)
"""

GPU_CASES = [(B, 32, 8, 128, ctx) for B in (1, 8, 32) for ctx in (256, 4096)]


def check_script(cases, extra: str) -> str:
    """CHECK for these cases, still to be formatted with the device."""
    return CHECK.replace("BOUND", repr(BOUND)).replace("CASES", repr(cases)).replace("EXTRA", extra)


def test_decode_attention_matches_float64_in_the_interpreter():
    run_in_interpreter(check_script(INTERPRETER_CASES, INTERPRETER_EXTRA))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_attention_matches_float64_on_cuda():
    empty = torch.empty  # the check poisons torch.empty for this process: put it back after
    try:
        exec(check_script(GPU_CASES, "").format(device="cuda"), {})
    finally:
        torch.empty = empty


def test_workspace_and_grid_depend_only_on_the_step_shape():
    from pipellm_core.model.kernels import decode_attention as kernel
    for B, H, ctx in ((1, 32, 256), (1, 32, 4096), (32, 32, 4096), (3, 9, 300), (1, 4, 16)):
        split_len, n_splits = kernel.split_shape(B, H, ctx)
        assert split_len % kernel.BLOCK_N == 0 and (n_splits - 1) * split_len < ctx <= n_splits * split_len
        assert n_splits == 1 or split_len >= kernel.MIN_SPLIT
        assert kernel.workspace_size(B, H, 128, ctx) == B * H * n_splits * 130


TORCH_PATH = r"""
import math, types, torch
from pipellm_core.model import fused_decode
from pipellm_core.model.transformer import Transformer, attention

# the torch path's decode attention read in place (`fused_decode.attention_in_place`) against
# the same path's gather-and-mask attention, with and without a sliding window and soft-capping
g = torch.Generator().manual_seed(5)
B, H, KV, D, S, C = 3, 8, 2, 64, 6, 160
configs = [types.SimpleNamespace(attn_softcap=cap, head_dim=D, query_scale=0.7 / math.sqrt(D)) for cap in (0.0, 1.5)]
kc = torch.randn(S, KV, C, D, generator=g).half()
vc = torch.randn(S, KV, C, D, generator=g).half()
q = torch.randn(B, 1, H, D, generator=g).half()
slots = torch.tensor([4, 0, 2])
positions = torch.tensor([[130], [7], [64]])
ctx_len = 131
keys = torch.arange(ctx_len)
for config in configs:
    assert fused_decode.attention_applies(config, q, kc)
    for window in (0, 32, 1):
        got = fused_decode.attention_in_place(config, q, kc, vc, slots, positions, ctx_len, window)
        seen = keys[None, None, :] <= positions[:, :, None]
        if window:
            seen &= keys[None, None, :] > positions[:, :, None] - window
        want = attention(q.float(), kc[slots, :, :ctx_len].float(), vc[slots, :, :ctx_len].float(),
                         seen.unsqueeze(1), config.query_scale, config.attn_softcap)
        err = ((got.float() - want).norm() / want.norm()).item()
        assert got.shape == (B, 1, H, D) and err < 2e-3, (config.attn_softcap, window, err)
        print("softcap", config.attn_softcap, "window", window, f"{err:.1e}")
print("ok")
"""


def test_torch_path_attention_in_place_matches_gather_and_mask_in_the_interpreter():
    run_in_interpreter(TORCH_PATH.replace("{", "{{").replace("}", "}}"))
