"""The torch path's attention of one new position per row on the CPU (`one_query_attention`:
two products and a softmax) against PyTorch's fused attention of the same inputs."""

import torch
import torch.nn.functional as F

from pipellm_core.model.transformer import attention


def test_one_query_attention_matches_pytorch_fused_attention():
    g = torch.Generator().manual_seed(3)
    for B, H, KV, D, ctx in ((1, 9, 3, 64, 40), (4, 8, 8, 32, 17), (3, 12, 2, 128, 100)):
        q = torch.randn(B, 1, H, D, generator=g)
        keys, values = torch.randn(B, KV, ctx, D, generator=g), torch.randn(B, KV, ctx, D, generator=g)
        lengths = torch.randint(1, ctx + 1, (B,), generator=g)
        mask = (torch.arange(ctx)[None, :] < lengths[:, None]).reshape(B, 1, 1, ctx)
        for scale in (None, 0.3):
            got = attention(q, keys, values, mask, scale)
            want = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                                  enable_gqa=KV != H, scale=scale).transpose(1, 2)
            assert got.shape == want.shape == (B, 1, H, D)
            assert torch.allclose(got, want, rtol=1e-5, atol=2e-5), (B, H, KV, D, ctx, scale)
            # a position past a row's length changes nothing
            values[0, :, -1] += 100.0 if lengths[0] < ctx else 0.0
            assert torch.allclose(attention(q, keys, values, mask, scale), got, rtol=1e-5, atol=2e-5)
