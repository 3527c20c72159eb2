"""Block-sparse kernel against the reference with the same block lists: forward, LSE, gradients."""
import pytest
import torch
from conftest import DEVICE, needs_triton, rel_err

from attn_patch.kernels import attention_reference, visibility_mask

pytestmark = [needs_triton, pytest.mark.kernels]

# relative L2 error allowed against the float32 reference on the same (rounded) inputs
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _cdiv(a, b):
    return -(-a // b)


def _inputs(b, hq, hkv, tq, tk, d, dtype, grad=True):
    # transformers hands the kernel transposed views of [B, T, H, D]
    def make(t, h):
        return torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(grad)

    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def _lists(sel, extra_slots=2, index_dtype=torch.int32):
    """Compact sorted lists from a bool block map [B, H, NQB, NKB]; slots past the count hold garbage
    (negative, out-of-range and in-range values) that the kernel must ignore."""
    nkb = sel.shape[-1]
    order = torch.where(sel, torch.arange(nkb, device=sel.device), nkb + 10**6)
    idx = torch.sort(order, dim=-1).values
    idx = torch.cat([idx, torch.zeros(*idx.shape[:-1], extra_slots, dtype=idx.dtype, device=idx.device)], -1)
    cnt = sel.sum(-1)
    slot = torch.arange(idx.shape[-1], device=sel.device)
    garbage = torch.randint(-3, nkb + 5, idx.shape, device=sel.device)
    idx = torch.where(slot < cnt[..., None], idx, garbage)
    return idx.to(index_dtype), cnt.to(index_dtype)


def _random_selection(bsel, hsel, tq, tk, bs, *, causal=True, q_offset=None, density=0.5, future=0.0):
    """Random subset of the blocks each query block can see (plus, with ``future`` > 0, some blocks it
    cannot see, which the causal mask must remove); every row keeps at least one visible block."""
    nqb, nkb = _cdiv(tq, bs), _cdiv(tk, bs)
    vis = visibility_mask(tq, tk, causal=causal, q_offset=q_offset, device=DEVICE)
    pad_q, pad_k = nqb * bs - tq, nkb * bs - tk
    vis = torch.nn.functional.pad(vis, (0, pad_k, 0, pad_q))
    block_vis = vis.view(nqb, bs, nkb, bs).any(3).any(1)  # [NQB, NKB]: some row sees some key
    # at least one visible block per row that has any: the last visible one (it crosses the diagonal)
    last_vis = (block_vis.long() * torch.arange(1, nkb + 1, device=DEVICE)).argmax(-1)
    has_vis = block_vis.any(-1)
    for _ in range(100):
        r = torch.rand(bsel, hsel, nqb, nkb, device=DEVICE)
        sel = (block_vis & (r < density)) | (~block_vis & (r < future))
        sel[..., torch.arange(nqb, device=DEVICE)[has_vis], last_vis[has_vis]] = True
        if (sel & block_vis).sum() < block_vis.sum() * bsel * hsel:  # some visible block left out
            return sel
    raise AssertionError("could not draw a non-trivial pattern")


def _per_query_head(t, hq):
    """Selection rows as the reference takes them: one per query head."""
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def _run_and_compare(seed, q, k, v, idx, cnt, bs, dtype, **mask):
    from attn_patch.kernels.block_sparse import block_sparse_attention

    hq = q.shape[1]
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=bs, **mask)
    ref, ref_lse = attention_reference(q, k, v, block_indices=_per_query_head(idx, hq),
                                       block_counts=_per_query_head(cnt, hq), block_size=bs, **mask)
    assert out.shape == ref.shape and out.dtype == q.dtype and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous(), "out must be a view of a contiguous [B, Tq, Hq, D] tensor"
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output"
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}: out rel err {rel_err(out, ref):.2e}"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), f"seed {seed}: rows with no visible key differ"
    assert torch.isneginf(lse[~seen]).all() and torch.all(out[~seen] == 0), f"seed {seed}: empty rows"
    if seen.any():
        err = (lse[seen] - ref_lse[seen]).abs().max().item()
        assert err < (1e-5 if dtype == torch.float32 else 1e-3), f"seed {seed}: lse err {err:.2e}"
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape and g.dtype == rg.dtype
        assert torch.isfinite(g).all(), f"seed {seed}: non-finite d{name}"
        err = rel_err(g, rg)
        assert err < 2 * TOL[dtype], f"seed {seed}: d{name} rel err {err:.2e}"
    return out, lse, grads


@pytest.mark.parametrize("group,per", [(1, "q"), (3, "q"), (3, "kv")])
@pytest.mark.parametrize("n,d", [(37, 16), (70, 32)])
def test_matches_reference(seed, group, per, n, d):
    q, k, v = _inputs(2, 2 * group, 2, n, n, d, torch.float32)
    hsel = 2 * group if per == "q" else 2
    sel = _random_selection(2, hsel, n, n, 16, future=0.2)
    idx, cnt = _lists(sel)
    _run_and_compare(seed, q, k, v, idx, cnt, 16, torch.float32, causal=True)


@pytest.mark.parametrize("tq,tk,q_offset", [(21, 70, None), (20, 70, 30), (5, 37, None)])
def test_query_chunk_after_cache(seed, tq, tk, q_offset):
    """Queries after a KV cache: row r sits at key position r + q_offset (default Tk - Tq)."""
    q, k, v = _inputs(2, 6, 2, tq, tk, 32, torch.float32)
    sel = _random_selection(2, 2, tq, tk, 16, q_offset=q_offset, future=0.3)
    idx, cnt = _lists(sel)
    _run_and_compare(seed, q, k, v, idx, cnt, 16, torch.float32, causal=True, q_offset=q_offset)


def test_non_causal(seed):
    q, k, v = _inputs(2, 6, 2, 37, 53, 32, torch.float32)
    sel = _random_selection(2, 6, 37, 53, 16, causal=False)
    idx, cnt = _lists(sel)
    _run_and_compare(seed, q, k, v, idx, cnt, 16, torch.float32, causal=False)


def test_key_padding_empty_rows_and_unselected_keys(seed):
    q, k, v = _inputs(3, 6, 2, 45, 45, 16, torch.float32)
    pad = torch.rand(3, 45, device=DEVICE) > 0.25
    pad[1, :20] = False  # left padding: query rows 0..19 see nothing
    sel = _random_selection(3, 6, 45, 45, 16, future=0.2)
    sel[0, :, 1] = False   # query block 1 selects nothing (zero count)
    sel[2, 1, :, 1] = False  # key block 1 unselected by head 1 (and maybe others)
    sel[2, :, 2, :2] = False  # query block 2 selects only its diagonal block
    sel[2, 3, 2, 2] = False  # ... and for head 3 nothing
    idx, cnt = _lists(sel)
    out, lse, (dq, dk, dv) = _run_and_compare(seed, q, k, v, idx, cnt, 16, torch.float32, causal=True, key_padding=pad)
    assert torch.all(out[0, :, 16:32] == 0) and torch.isneginf(lse[0, :, 16:32]).all()
    assert torch.all(dq[0, :, 16:32] == 0)
    assert torch.all(out[1, :, :20] == 0) and torch.isneginf(lse[1, :, :20]).all()
    assert torch.all(out[2, 3, 32:] == 0) and torch.all(dq[2, 3, 32:] == 0)
    # padded keys get no gradient
    assert torch.all(dk.transpose(1, 2)[~pad] == 0) and torch.all(dv.transpose(1, 2)[~pad] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(seed, dtype):
    q, k, v = _inputs(2, 6, 2, 70, 70, 64, dtype)
    sel = _random_selection(2, 2, 70, 70, 16)
    idx, cnt = _lists(sel)
    _run_and_compare(seed, q, k, v, idx, cnt, 16, dtype, causal=True)


@pytest.mark.parametrize("tq,tk", [(70, 70), (50, 77)])
def test_block_larger_than_tile(seed, tq, tk):
    """block_size 32 with 16-wide tiles (the interpreter's): each block is walked in sub-tiles, and
    with Tq=50, Tk=77 the causal diagonal crosses blocks off their tile boundaries."""
    q, k, v = _inputs(2, 6, 2, tq, tk, 16, torch.float32)
    sel = _random_selection(2, 6, tq, tk, 32, density=0.6, future=0.3)
    idx, cnt = _lists(sel)
    _run_and_compare(seed, q, k, v, idx, cnt, 32, torch.float32, causal=True)


def test_broadcast_batch_and_int64_lists(seed):
    q, k, v = _inputs(3, 6, 2, 37, 37, 16, torch.float32)
    sel = _random_selection(1, 2, 37, 37, 16, future=0.2)
    idx, cnt = _lists(sel, extra_slots=5, index_dtype=torch.int64)
    _run_and_compare(seed, q, k, v, idx, cnt, 16, torch.float32, causal=True)


@pytest.mark.parametrize("causal,tq,tk", [(True, 70, 70), (True, 21, 70), (False, 37, 37)])
def test_density_one_equals_dense_flash(seed, causal, tq, tk):
    """Every visible block selected: the same result as the dense kernel (and the reference)."""
    from attn_patch.kernels.block_sparse import block_sparse_attention
    from attn_patch.kernels.flash import flash_attention

    q, k, v = _inputs(2, 6, 2, tq, tk, 32, torch.float32)
    nqb, nkb = _cdiv(tq, 16), _cdiv(tk, 16)
    vis = visibility_mask(tq, tk, causal=causal, device=DEVICE)
    block_vis = torch.nn.functional.pad(vis, (0, nkb * 16 - tk, 0, nqb * 16 - tq)).view(nqb, 16, nkb, 16).any(3).any(1)
    idx, cnt = _lists(block_vis.expand(2, 2, nqb, nkb))
    out, lse = block_sparse_attention(q, k, v, idx, cnt, block_size=16, causal=causal)
    dense, dense_lse = flash_attention(q, k, v, causal=causal, decode=False)
    ref, _ = attention_reference(q, k, v, causal=causal)
    assert rel_err(out, dense) < 1e-6 and rel_err(out, ref) < TOL[torch.float32], f"seed {seed}"
    assert torch.allclose(lse, dense_lse, atol=1e-5, rtol=0), f"seed {seed}"
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    dense_grads = torch.autograd.grad(dense, (q, k, v), grad_out)
    for name, g, dg in zip("qkv", grads, dense_grads):
        assert rel_err(g, dg) < 1e-5, f"seed {seed}: d{name} rel err {rel_err(g, dg):.2e}"


@pytest.mark.parametrize("case", ["causal", "chunk", "padding"])
def test_rows_fastest_grid_order(seed, case):
    """The tiles-first launch order (programs in flight share a head) gives the same results,
    forward and backward."""
    from attn_patch.kernels import block_sparse

    tq, tk, q_offset, mask = 70, 70, None, {}
    if case == "chunk":
        tq, q_offset = 21, 40
    if case == "padding":
        mask["key_padding"] = torch.rand(2, tk, device=DEVICE) > 0.3
    q, k, v = _inputs(2, 6, 2, tq, tk, 32, torch.float32)
    sel = _random_selection(2, 6, tq, tk, 16, q_offset=q_offset, future=0.2)
    idx, cnt = _lists(sel)
    for kind in ("fwd", "dq", "dkdv"):
        block_sparse.TILES[(kind, 16)] = (16, 16, 4, 1, True)
    try:
        _run_and_compare(seed, q, k, v, idx, cnt, 16, torch.float32, causal=True, q_offset=q_offset, **mask)
    finally:
        for kind in ("fwd", "dq", "dkdv"):
            del block_sparse.TILES[(kind, 16)]


def test_transposed_lists(seed):
    """The CSR of query blocks per key block, against a plain loop over the lists."""
    from attn_patch.kernels.block_sparse import transposed_lists

    tq, tk, bs = 70, 90, 16
    sel = _random_selection(2, 3, tq, tk, bs, future=0.3)
    idx, cnt = _lists(sel)
    for causal in (True, False):
        ptr, cols = transposed_lists(idx, cnt, tq, tk, bs, causal=causal)
        nqb, nkb = _cdiv(tq, bs), _cdiv(tk, bs)
        assert ptr.shape == (2, 3, nkb + 1)
        for b in range(2):
            for h in range(3):
                for j in range(nkb):
                    want = [i for i in range(nqb) if j in idx[b, h, i, : cnt[b, h, i]].tolist()
                            and (not causal or j * bs <= min((i + 1) * bs, tq) - 1 + tk - tq)]
                    got = cols[ptr[b, h, j]: ptr[b, h, j + 1]].tolist()
                    assert got == want, f"seed {seed}: b={b} h={h} key block {j}"


def test_bad_inputs_name_the_fix():
    from attn_patch.kernels.block_sparse import block_sparse_attention

    q, k, v = _inputs(2, 6, 2, 37, 37, 16, torch.float16, grad=False)
    idx = torch.zeros(2, 6, 3, 4, dtype=torch.int32, device=DEVICE)
    cnt = torch.ones(2, 6, 3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="power of two >= 16"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=24)
    with pytest.raises(ValueError, match="power of two >= 16"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=8)
    with pytest.raises(TypeError, match="int32 or int64"):
        block_sparse_attention(q, k, v, idx.float(), cnt, block_size=16)
    with pytest.raises(TypeError, match="int32 or int64"):
        block_sparse_attention(q, k, v, idx, cnt.to(torch.int16), block_size=16)
    with pytest.raises(ValueError, match=r"ceil\(37 / 32\) = 2 query blocks"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=32)
    with pytest.raises(ValueError, match="block_counts must be"):
        block_sparse_attention(q, k, v, idx, cnt[..., :2], block_size=16)
    with pytest.raises(ValueError, match="must be 4-D"):
        block_sparse_attention(q, k, v, idx[0], cnt[0], block_size=16)
    with pytest.raises(ValueError, match="heads must be the query heads"):
        block_sparse_attention(q, k, v, idx[:, :4], cnt[:, :4], block_size=16)
    with pytest.raises(ValueError, match="batch dim must be 2 or 1"):
        block_sparse_attention(q, k, v, idx.repeat(2, 1, 1, 1)[:3], cnt.repeat(2, 1, 1)[:3], block_size=16)
    with pytest.raises(ValueError, match="on the device of q"):
        block_sparse_attention(q, k, v, idx.to("meta"), cnt.to("meta"), block_size=16)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        block_sparse_attention(q.double(), k.double(), v.double(), idx, cnt, block_size=16)
    with pytest.raises(ValueError, match="key_padding must be"):
        block_sparse_attention(q, k, v, idx, cnt, block_size=16,
                               key_padding=torch.ones(2, 36, dtype=torch.bool, device=DEVICE))
