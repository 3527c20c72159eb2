"""The fused ground-truth pass (exact output + block max probabilities) against the PyTorch reference."""
import pytest
import torch
from conftest import DEVICE, needs_triton, rel_err

from attn_patch.kernels import attention_reference
from attn_patch.seer import ground_truth_reference

pytestmark = needs_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,tq,tk,causal", [(4, 2, 37, 37, True), (3, 1, 70, 70, True), (2, 2, 20, 53, True),
                                                  (4, 2, 33, 33, False)])
def test_block_max_matches_reference(seed, dtype, hq, hkv, tq, tk, causal):
    from attn_patch.kernels.seer_gt import attention_with_block_max

    q = torch.randn(2, tq, hq, 32, device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, tk, hkv, 32, device=DEVICE, dtype=dtype).transpose(1, 2)
    v = torch.randn(2, tk, hkv, 32, device=DEVICE, dtype=dtype).transpose(1, 2)
    out, lse, gt = attention_with_block_max(q, k, v, block_size=16, causal=causal)
    ref_out, _ = attention_reference(q, k, v, causal=causal)
    want = ground_truth_reference(q, k, block_size=16, causal=causal)
    assert gt.shape == want.shape == (2, hq, -(-tq // 16), -(-tk // 16))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, ref_out) < tol * 4, f"seed {seed}"
    assert (gt - want).abs().max() < tol * 5, f"seed {seed}: {(gt - want).abs().max():.2e}"
    torch.testing.assert_close(gt.sum(-1), torch.ones_like(gt.sum(-1)))


def test_block_size_checked():
    from attn_patch.kernels.seer_gt import attention_with_block_max

    q = torch.randn(1, 2, 16, 16, device=DEVICE, dtype=torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        attention_with_block_max(q, q, q, block_size=24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot,lead,padded", [(None, 0, False), (32, 0, True), (16, 5, False), (32, 9, True)])
def test_fused_pooling_matches_reference(seed, dtype, rot, lead, padded):
    """The gate's pooling kernel (inverse RoPE, max/min/avg, padding, a partial first block) equals
    the PyTorch pooling."""
    from attn_patch.kernels.seer_pool import pool_blocks_fused
    from attn_patch.seer.gate import pool_blocks, unrope

    b, h, t, d = 2, 3, 45, 32
    x = torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)  # strided like the model's
    cos = sin = None
    xr = x.float()
    if rot is not None:
        ang = torch.randn(1, t, rot // 2, device=DEVICE)
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
        xr = unrope(x, cos, sin)
    valid = None
    if padded:
        valid = torch.ones(b, t, dtype=torch.bool, device=DEVICE)
        valid[1, :20] = False
    got_k = pool_blocks_fused(x, 16, minmax=True, lead=lead, cos=cos, sin=sin, key_padding=valid)
    want_k = torch.cat([pool_blocks(xr, 16, how, lead=lead, valid=valid) for how in ("max", "min", "avg")], -1)
    got_q = pool_blocks_fused(x, 16, minmax=False, lead=lead, cos=cos, sin=sin)
    want_q = pool_blocks(xr, 16, "avg", lead=lead)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_k, want_k, atol=tol, rtol=tol)
    torch.testing.assert_close(got_q, want_q, atol=tol, rtol=tol)


@pytest.mark.parametrize("nq,nk,k,sink,diag", [(8, 8, 3, True, True), (5, 13, 4, True, True), (7, 7, 1, False, True),
                                               (6, 40, 9, True, False), (4, 4, 4, True, True)])
def test_fused_topk_selection_matches_reference(seed, nq, nk, k, sink, diag):
    """The one-kernel selection keeps the same blocks as select_blocks' top-k path (random scores:
    no ties), sorted ascending, and fills slots past the count with 0."""
    from attn_patch.kernels.seer_select import topk_block_lists
    from attn_patch.seer.blocks import select_blocks

    scores = torch.randn(2, 3, nq, nk, device=DEVICE)
    idx, cnt = topk_block_lists(scores, k, keep_sink=sink, keep_diagonal=diag)
    # the reference: probabilities in the same order; k from the same number
    probs = torch.softmax(scores.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril(nk - nq),
                                             float("-inf")), -1)
    ridx, rcnt = _select_k(select_blocks, probs, k, sink, diag)
    _assert_same_lists(idx, cnt, ridx, rcnt)


def _assert_same_lists(idx, cnt, ridx, rcnt):
    """Same counts, same blocks in each row's valid slots, zeros past the count."""
    assert torch.equal(cnt, rcnt), (cnt, rcnt)
    for row in range(cnt.numel()):
        n = int(cnt.flatten()[row])
        got, want = idx.flatten(0, 2)[row], ridx.flatten(0, 2)[row]
        assert got[:n].tolist() == want[:n].tolist() and (got[n:] == 0).all(), row


def _select_k(select_blocks, probs, k, sink, diag, threshold=None):
    """select_blocks with exactly k blocks per row for density (or as the floor of a threshold)."""
    import attn_patch.seer.blocks as blocks

    saved = blocks.topk_for_layout
    blocks.topk_for_layout = lambda *a: k
    try:
        if threshold is not None:
            return select_blocks(probs, threshold=threshold, min_density=0.5, keep_sink=sink, keep_diagonal=diag)
        return select_blocks(probs, density=0.5, keep_sink=sink, keep_diagonal=diag)
    finally:
        blocks.topk_for_layout = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k_proj_per,q_proj,rope,nq,nk", [("head", False, 10000.0, 5, 5), ("group", True, 500000.0, 3, 21),
                                                          ("head", True, None, 18, 18), ("group", False, 10000.0, 1, 34)])
def test_fused_block_scores_match_the_gate(seed, dtype, k_proj_per, q_proj, rope, nq, nk):
    """The one-launch block RoPE + scores equal SeerGate.raw_scores on every causally visible
    (query block, key block) pair, also for a chunk of query blocks late in the keys."""
    from attn_patch.seer import SeerGate

    gate = SeerGate(6, 2, 32, block_size=16, gate_dim=32, q_proj=q_proj, k_proj_per=k_proj_per,
                    rope_theta=rope).to(DEVICE, dtype)
    with torch.no_grad():
        gate.k_weight.normal_(0, 0.1)
        if gate.q_weight is not None:
            gate.q_weight.normal_(0, 0.2)
    qb = torch.randn(2, 6, nq, 32, device=DEVICE)
    kb = torch.randn(2, 2, nk, 96, device=DEVICE)
    off = nk - nq
    with torch.no_grad():
        want = gate.raw_scores(qb, kb, off).float()
        got = gate.raw_scores(qb, kb, off, fused=True)
    visible = torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril(off)
    tol = 1e-4 if dtype == torch.float32 else 0.05 * float(want.abs().max())
    err = (got - want).abs()[..., visible]
    assert err.max() <= tol, f"seed {seed}: {float(err.max()):.3e}"
    if nq > 1:  # the probabilities the selection sees
        p_want = gate.probs(gate.score(qb, kb, off))
        p_got = gate.probs(gate.score(qb, kb, off, fused=True))
        assert (p_got - p_want).abs().max() < (1e-5 if dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("nq,nk,floor,softmax", [(8, 8, 0, True), (5, 13, 3, True), (6, 40, 0, False),
                                                 (4, 4, 2, False)])
def test_fused_threshold_selection_matches_reference(seed, nq, nk, floor, softmax):
    """Threshold selection in the kernel (probabilities given, or the softmax of raw scores taken
    inside it), with and without a top-k floor, keeps the blocks select_blocks keeps; the lists
    are NKB wide."""
    from attn_patch.kernels.seer_select import topk_block_lists
    from attn_patch.seer.blocks import select_blocks

    raw = 3 * torch.randn(2, 3, nq, nk, device=DEVICE)
    visible = torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).tril(nk - nq)
    probs = torch.softmax((raw * 0.5).masked_fill(~visible, float("-inf")), -1)
    thr = 0.1
    if softmax:
        idx, cnt = topk_block_lists(raw, floor, threshold=thr, logit_scale=0.5)
    else:
        idx, cnt = topk_block_lists(probs, floor, threshold=thr)
    assert idx.shape[-1] == nk
    ridx, rcnt = _select_k(select_blocks, probs, floor, True, True, threshold=thr) if floor else \
        select_blocks(probs, threshold=thr)
    _assert_same_lists(idx, cnt, ridx, rcnt)
