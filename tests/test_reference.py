"""The reference itself, against torch SDPA with an explicit boolean mask (an independent implementation)."""
import pytest
import torch
import torch.nn.functional as F

from attn_patch.kernels import attention_reference, block_sparse_to_dense, visibility_mask


def _sdpa(q, k, v, keep):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("causal,window,tq,tk", [(True, None, 9, 9), (True, None, 3, 11), (False, None, 5, 7),
                                                 (True, 4, 12, 12), (True, 3, 2, 10)])
def test_reference_matches_sdpa(seed, causal, window, tq, tk):
    q = torch.randn(2, 6, tq, 16, dtype=torch.float32)
    k = torch.randn(2, 2, tk, 16, dtype=torch.float32)
    v = torch.randn(2, 2, tk, 16, dtype=torch.float32)
    pad = torch.ones(2, tk, dtype=torch.bool)
    pad[1, 0] = False
    out, lse = attention_reference(q, k, v, causal=causal, window=window, key_padding=pad)
    keep = visibility_mask(tq, tk, causal=causal, window=window)[None, None] & pad[:, None, None, :]
    torch.testing.assert_close(out, _sdpa(q, k, v, keep), rtol=1e-5, atol=1e-5)
    scores = (q @ k.repeat_interleave(3, 1).transpose(-1, -2)) * 16 ** -0.5
    expected_lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_visibility_conventions():
    # causal with a cache: the single query is at position 4 and sees keys 0..4
    assert visibility_mask(1, 5, causal=True).tolist() == [[True] * 5]
    # window 2: itself and one key before
    assert visibility_mask(3, 3, causal=True, window=2).tolist() == [
        [True, False, False], [True, True, False], [False, True, True]]


def test_block_sparse_expansion():
    idx = torch.tensor([[[[0, 2], [1, 0]]]])  # 2 query blocks; block 0 keeps kv blocks 0 and 2, block 1 only 1
    cnt = torch.tensor([[[2, 1]]])
    dense = block_sparse_to_dense(idx, cnt, tq=4, tk=6, block_size=2)
    assert dense.shape == (1, 1, 4, 6)
    assert dense[0, 0, 0].tolist() == [True, True, False, False, True, True]
    assert dense[0, 0, 3].tolist() == [False, False, True, True, False, False]
