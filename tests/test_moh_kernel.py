"""Head-routed kernel (kernels/moh.py) against the masked dense reference: outputs and gradients."""
import pytest
import torch
from conftest import DEVICE, needs_triton, rel_err

from attn_patch.kernels import attention_reference, head_routed_reference

pytestmark = [needs_triton, pytest.mark.kernels]

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _inputs(b, hq, hkv, tq, tk, d, dtype):
    def make(t, h):  # transformers hands the kernel transposed views of [B, T, H, D]
        return torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(True)

    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def _compare(seed, q, k, v, head_mask, dtype=torch.float32, **mask):
    from attn_patch.kernels.moh import head_routed_attention

    out, _ = head_routed_attention(q, k, v, head_mask, **mask)
    ref = head_routed_reference(q, k, v, head_mask, **mask)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert out.transpose(1, 2).is_contiguous()
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output"
    off = ~head_mask.transpose(1, 2)
    assert torch.all(out[off] == 0), f"seed {seed}: unselected pairs must be exactly zero"
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}: out rel err {rel_err(out, ref):.2e}"
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), f"seed {seed}: non-finite d{name}"
        err = rel_err(g, rg)
        assert err < 2 * TOL[dtype], f"seed {seed}: d{name} rel err {err:.2e}"
    assert torch.all(grads[0][off] == 0), f"seed {seed}: unselected pairs must get no query gradient"
    return out, grads


@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("n,d,ratio", [(37, 16, 0.5), (70, 32, 0.75), (53, 64, 0.25)])
def test_matches_reference(seed, group, n, d, ratio):
    q, k, v = _inputs(2, 2 * group, 2, n, n, d, torch.float32)
    head_mask = torch.rand(2, n, 2 * group, device=DEVICE) < ratio
    _compare(seed, q, k, v, head_mask)


def test_all_heads_equal_dense(seed):
    from attn_patch.kernels.flash import flash_attention
    from attn_patch.kernels.moh import head_routed_attention

    q, k, v = _inputs(2, 4, 2, 45, 45, 32, torch.float32)
    out, _ = head_routed_attention(q, k, v, torch.ones(2, 45, 4, dtype=torch.bool, device=DEVICE))
    dense, _ = flash_attention(q, k, v)
    assert torch.allclose(out, dense, atol=1e-6, rtol=1e-6), f"seed {seed}"
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(dense, (q, k, v), g)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"seed {seed}"


def test_empty_heads_and_rows(seed):
    q, k, v = _inputs(2, 6, 2, 40, 40, 16, torch.float32)
    head_mask = torch.rand(2, 40, 6, device=DEVICE) < 0.5
    head_mask[:, :, 1] = False  # a head nobody picks
    head_mask[0] = False  # a sequence that picks nothing
    head_mask[1, :, 4] = True  # a head everybody picks
    _, (dq, dk, dv) = _compare(seed, q, k, v, head_mask)
    assert torch.all(dk[0] == 0) and torch.all(dv[0] == 0), f"seed {seed}: no selected pair, no K/V gradient"


@pytest.mark.parametrize("tq,tk,q_offset", [(21, 70, None), (1, 53, None), (20, 70, 30)])
def test_after_cache(seed, tq, tk, q_offset):
    q, k, v = _inputs(2, 6, 2, tq, tk, 32, torch.float32)
    head_mask = torch.rand(2, tq, 6, device=DEVICE) < 0.5
    _compare(seed, q, k, v, head_mask, causal=True, q_offset=q_offset)


def test_padding_window_and_non_causal(seed):
    q, k, v = _inputs(3, 6, 3, 50, 50, 16, torch.float32)
    pad = torch.ones(3, 50, dtype=torch.bool, device=DEVICE)
    pad[1, :17] = False  # left padding: rows before 17 see nothing
    pad[2, 40:] = False
    head_mask = torch.rand(3, 50, 6, device=DEVICE) < 0.6
    _compare(seed, q, k, v, head_mask, key_padding=pad)
    _compare(seed, q, k, v, head_mask, key_padding=pad, window=19)
    _compare(seed, q, k, v, head_mask, causal=False, key_padding=pad)


def test_dense_mask(seed):
    """Packed documents reach the kernel as a dense mask: rows are gathered into it too."""
    q, k, v = _inputs(2, 4, 2, 45, 45, 16, torch.float32)
    docs = torch.zeros(2, 45, dtype=torch.long, device=DEVICE)
    docs[:, 20:] = 1
    docs[1, 33:] = 2
    dense = (docs[:, None, :, None] == docs[:, None, None, :])
    head_mask = torch.rand(2, 45, 4, device=DEVICE) < 0.5
    _compare(seed, q, k, v, head_mask, dense_mask=dense)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(seed, dtype):
    q, k, v = _inputs(2, 6, 2, 70, 70, 64, dtype)
    head_mask = torch.rand(2, 70, 6, device=DEVICE) < 0.5
    _compare(seed, q, k, v, head_mask, dtype)


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreter timing; on a GPU scripts/bench_moh.py measures it")
def test_cost_falls_with_the_ratio():
    """The kernel does work only for selected pairs: a head nobody picks launches programs that exit
    at once, so the interpreted run time at 25% of the pairs is well below that of all pairs."""
    import time

    from attn_patch.kernels.moh import head_routed_attention

    q, k, v = _inputs(1, 4, 1, 256, 256, 16, torch.float32)
    full = torch.ones(1, 256, 4, dtype=torch.bool, device=DEVICE)
    quarter = full.clone()
    quarter[..., 1:] = False

    def timed(mask):
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            with torch.no_grad():
                head_routed_attention(q, k, v, mask)
            best = min(best, time.perf_counter() - t0)
        return best

    assert timed(quarter) < 0.6 * timed(full)


def test_compact_rows():
    from attn_patch.kernels.moh import compact_rows

    m = torch.tensor([[[1, 0], [0, 0], [1, 1], [0, 1]]], dtype=torch.bool, device=DEVICE)
    rows, counts = compact_rows(m)
    assert counts.tolist() == [[2, 2]]
    assert rows.tolist() == [[[0, 2, 4, 4], [2, 3, 4, 4]]]
    assert rows.dtype == torch.int32 and rows.is_contiguous()
    big = torch.rand(2, 150, 3, device=DEVICE) < 0.4  # crosses the scan's chunks
    rows, counts = compact_rows(big)
    for b in range(2):
        for h in range(3):
            want = big[b, :, h].nonzero().flatten().tolist()
            assert counts[b, h] == len(want) and rows[b, h, :len(want)].tolist() == want
            assert (rows[b, h, len(want):] == 150).all()


def test_bad_inputs():
    from attn_patch.kernels.moh import head_routed_attention

    q, k, v = _inputs(1, 4, 2, 16, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="head_mask must be"):
        head_routed_attention(q, k, v, torch.ones(1, 16, 2, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="bool"):
        head_routed_attention(q, k, v, torch.ones(1, 16, 4, device=DEVICE))
    with pytest.raises(ValueError, match="give head_mask"):
        head_routed_attention(q, k, v)


def test_reference_zeroes_unselected_heads():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    m = torch.zeros(1, 5, 2, dtype=torch.bool)
    m[0, 3, 1] = True
    out = head_routed_reference(q, k, v, m)
    dense, _ = attention_reference(q, k, v)
    assert torch.equal(out[0, 1, 3], dense[0, 1, 3]) and out.abs().sum() == out[0, 1, 3].abs().sum()
