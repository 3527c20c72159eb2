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


def _s2_cases():
    """(name, T, group, heads, shift_from, sink, keyword arguments of the position/padding inputs)."""
    left = torch.ones(2, 37, dtype=torch.bool)
    left[0, :9] = False  # left padding
    left[1, 30:] = False  # right padding
    packed = torch.cat([torch.arange(11), torch.arange(19), torch.arange(7)]).view(1, -1)
    docs = torch.tensor([[0] * 5 + [1] * 20 + [2] * 12, [0] * 37])
    return {
        "odd length, odd group": (37, 7, 6, 3, 0, {}),
        "group wider than the input": (21, 32, 4, 2, 0, {}),
        "no shift": (30, 8, 4, 4, 0, {}),
        "sinks": (33, 8, 6, 3, 3, {}),
        "left and right padding": (37, 8, 4, 2, 2, dict(key_padding=left, batch=2)),
        "packed by position ids": (37, 6, 4, 2, 1, dict(position_ids=packed)),
        "packed by document ids": (37, 10, 6, 3, 2, dict(documents=docs, batch=2)),
    }


@pytest.mark.parametrize("name", list(_s2_cases()))
def test_s2_mask_matches_the_definition(name):
    """The tensor-op S2 mask (what the longlora reference path uses) equals the token-by-token
    definition: odd lengths, padding on either side, packed documents, sinks, shift on and off."""
    from attn_patch.kernels.reference import _s2_mask_loop, s2_mask_reference

    t, group, heads, shift_from, sink, inputs = _s2_cases()[name]
    want = _s2_mask_loop(heads, t, group, shift_from=shift_from, sink=sink, **inputs)
    got = s2_mask_reference(heads, t, group, shift_from=shift_from, sink=sink, **inputs)
    assert got.dtype == torch.bool and torch.equal(got, want)
    # the query rows of a cache step: the last 3 positions, then 4 rows in the middle (a static cache)
    for q_offset, queries in ((t - 3, 3), (t // 2, 4)):
        rows = s2_mask_reference(heads, t, group, shift_from=shift_from, sink=sink, q_offset=q_offset,
                                 queries=queries, **inputs)
        assert torch.equal(rows, want[:, :, q_offset:q_offset + queries])
    with pytest.raises(ValueError, match="key positions"):
        s2_mask_reference(heads, t, group, shift_from=shift_from, q_offset=t - 2, queries=3, **inputs)


def test_s2_mask_attention_with_gqa_matches_sdpa(seed):
    """GQA 6/2 query rows of a cache step under the S2 mask, against SDPA with the defined mask."""
    from attn_patch.kernels.reference import _s2_mask_loop, s2_mask_reference

    t, tq = 29, 5
    q, k, v = torch.randn(1, 6, tq, 16), torch.randn(1, 2, t, 16), torch.randn(1, 2, t, 16)
    mask = s2_mask_reference(6, t, 8, shift_from=3, sink=2, q_offset=t - tq, queries=tq)
    out, _ = attention_reference(q, k, v, causal=True, dense_mask=mask)
    want = _sdpa(q, k, v, _s2_mask_loop(6, t, 8, shift_from=3, sink=2)[:, :, t - tq:])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_s2_reference_reads_no_tensor_values():
    """Mask and attention run on the meta device, where no value can be read: the reference S2 path
    is tensor ops only (no host sync, nothing for torch.compile to break on or unroll per token)."""
    from attn_patch.kernels.reference import s2_mask_reference

    pad = torch.ones(2, 40, dtype=torch.bool, device="meta")
    mask = s2_mask_reference(6, 40, 8, shift_from=3, sink=2, key_padding=pad, batch=2)
    assert mask.shape == (2, 6, 40, 40) and mask.device.type == "meta"
    q, k = torch.empty(2, 6, 40, 16, device="meta"), torch.empty(2, 2, 40, 16, device="meta")
    out, lse = attention_reference(q, k, k, causal=True, key_padding=pad, dense_mask=mask)
    assert out.shape == q.shape and lse.shape == (2, 6, 40)
