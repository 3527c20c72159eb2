"""Triton kernels against the PyTorch reference: forward, LSE and gradients on fresh random inputs."""
import pytest
import torch
from conftest import DEVICE, needs_triton, rel_err

from attn_patch.kernels import attention_reference

pytestmark = [needs_triton, pytest.mark.kernels]

# relative L2 error allowed against the float32 reference on the same (rounded) inputs
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def _inputs(b, hq, hkv, tq, tk, d, dtype, grad=True):
    # transformers hands the kernel transposed views of [B, T, H, D]
    def make(t, h):
        x = torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2)
        return x.requires_grad_(grad)

    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def _check(seed, q, k, v, dtype, **mask):
    from attn_patch.kernels.flash import flash_attention

    out, lse = flash_attention(q, k, v, decode=False, **mask)
    ref, ref_lse = attention_reference(q, k, v, **mask)
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all(), f"seed {seed}: non-finite output"
    assert rel_err(out, ref) < TOL[dtype], f"seed {seed}: out rel err {rel_err(out, ref):.2e}"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), f"seed {seed}: rows with no visible key differ"
    assert (lse[seen] - ref_lse[seen]).abs().max().item() < 1e-3 if seen.any() else True
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert torch.isfinite(g).all(), f"seed {seed}: non-finite d{name}"
        err = rel_err(g, rg)
        assert err < 2 * TOL[dtype], f"seed {seed}: d{name} rel err {err:.2e}"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("n", [1, 17, 130])
def test_forward_backward_shapes(seed, causal, group, n):
    q, k, v = _inputs(2, 2 * group, 2, n, n, 64, torch.bfloat16)
    _check(seed, q, k, v, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [128, 80])
def test_head_dims_and_dtypes(seed, dtype, d):
    q, k, v = _inputs(1, 4, 1, 45, 45, d, dtype)
    _check(seed, q, k, v, dtype, causal=True)


@pytest.mark.parametrize("tq,tk", [(5, 40), (1, 33), (40, 40)])
def test_queries_after_a_cache(seed, tq, tk):
    """Chunked prefill / decode alignment: queries are the last tq positions of tk keys."""
    q, k, v = _inputs(2, 6, 2, tq, tk, 64, torch.float16)
    _check(seed, q, k, v, torch.float16, causal=True)


@pytest.mark.parametrize("window", [1, 7, 16, 50])
def test_sliding_window(seed, window):
    q, k, v = _inputs(2, 4, 2, 67, 67, 64, torch.float16)
    _check(seed, q, k, v, torch.float16, causal=True, window=window)


def test_left_padding_and_empty_rows(seed):
    from attn_patch.kernels.flash import flash_attention

    q, k, v = _inputs(3, 3, 1, 37, 37, 64, torch.float16)
    pad = torch.ones(3, 37, dtype=torch.bool, device=DEVICE)
    pad[1, :9] = False   # left padding: query rows 0..8 see nothing
    pad[2, :36] = False  # a row with a single real token
    _check(seed, q, k, v, torch.float16, causal=True, key_padding=pad)
    out, lse = flash_attention(q, k, v, causal=True, key_padding=pad, decode=False)
    assert torch.all(out[1, :, :9] == 0) and torch.isneginf(lse[1, :, :9]).all()


def test_padding_with_window_and_offset(seed):
    q, k, v = _inputs(2, 4, 2, 9, 41, 64, torch.bfloat16)
    pad = torch.rand(2, 41, device=DEVICE) > 0.3
    _check(seed, q, k, v, torch.bfloat16, causal=True, key_padding=pad, window=12)


def test_dense_mask(seed):
    """Any pattern as a dense bool mask, e.g. packed documents."""
    q, k, v = _inputs(2, 4, 2, 50, 50, 64, torch.float16)
    doc = torch.cat([torch.zeros(2, 20), torch.ones(2, 30)], dim=1).to(DEVICE)
    dense = (doc[:, None, :, None] == doc[:, None, None, :])
    _check(seed, q, k, v, torch.float16, causal=True, dense_mask=dense)


@pytest.mark.parametrize("group,tq", [(1, 1), (3, 1), (4, 1), (3, 4)])
@pytest.mark.parametrize("tk", [1, 17, 130])
def test_decode_kernel(seed, group, tq, tk, monkeypatch):
    from attn_patch.kernels import flash
    from attn_patch.kernels.flash import flash_attention

    if tq > tk:
        pytest.skip("more queries than keys")
    q, k, v = _inputs(2, 2 * group, 2, tq, tk, 64, torch.float16, grad=False)
    pad = torch.ones(2, tk, dtype=torch.bool, device=DEVICE)
    pad[1, : tk // 3] = False
    for mask in (dict(causal=True), dict(causal=True, key_padding=pad), dict(causal=True, window=5)):
        ref, ref_lse = attention_reference(q, k, v, **mask)
        # (splits, merge, splits merged per load): chunk 2 < 3 splits checks the chunked merge loop
        for splits, merge, chunk in ((None, "auto", 32), (1, "fused", 32), (3, "fused", 2), (3, "kernel", 32)):
            monkeypatch.setattr(flash, "DECODE_MERGE", merge)
            monkeypatch.setattr(flash, "DECODE_MERGE_CHUNK", chunk)
            out, lse = flash_attention(q, k, v, decode=True, num_splits=splits, **mask)
            assert rel_err(out, ref) < TOL[torch.float16], f"seed {seed} {mask.keys()} splits={splits} {merge}"
            seen = torch.isfinite(ref_lse)
            assert torch.equal(torch.isfinite(lse), seen)
            assert (lse[seen] - ref_lse[seen]).abs().max() < 1e-3
    # the one-launch merge leaves its arrival counters at zero for the next call
    assert all(int(c.abs().sum()) == 0 for c in flash._COUNTERS.values())


def test_decode_is_picked_only_without_grad():
    from attn_patch.kernels.flash import flash_attention

    q, k, v = _inputs(1, 4, 1, 1, 20, 64, torch.float16, grad=True)
    out, _ = flash_attention(q, k, v)
    assert out.requires_grad  # went through the autograd kernel
    with pytest.raises(ValueError, match="forward-only"):
        flash_attention(q, k, v, decode=True)


def test_bad_inputs_name_the_fix():
    from attn_patch.kernels.flash import flash_attention

    q, k, v = _inputs(1, 4, 2, 8, 8, 64, torch.float16, grad=False)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), k.double(), v.double())
    big = torch.randn(1, 2, 8, 256, device=DEVICE, dtype=torch.float16)
    with pytest.raises(ValueError, match="head_dim 256"):
        flash_attention(big, big, big)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k[:, :1].expand(1, 3, 8, 64), v[:, :1].expand(1, 3, 8, 64))
    with pytest.raises(ValueError, match="key_padding must be"):
        flash_attention(q, k, v, key_padding=torch.ones(1, 9, dtype=torch.bool, device=DEVICE))


def test_decode_repeated_calls(seed):
    """Decoding calls one kernel with the same specialization again and again: on GPU the second
    call onwards takes the cached launch. Fresh inputs every call, and a misaligned view (another
    specialization) in between."""
    from attn_patch.kernels.flash import flash_attention

    for step in range(4):
        q, k, v = _inputs(2, 6, 2, 1, 70, 64, torch.float16, grad=False)
        if step == 2:  # storage offset of one element: pointers lose their 16-byte alignment
            k = torch.randn(2 * 70 * 2 * 64 + 1, device=DEVICE, dtype=torch.float16)[1:].view(2, 70, 2, 64)
            k = k.transpose(1, 2)
        out, _ = flash_attention(q, k, v)
        ref, _ = attention_reference(q, k, v)
        assert rel_err(out, ref) < TOL[torch.float16], f"seed {seed}, step {step}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_in_cuda_graph(seed):
    """Decoding captured in a CUDA graph (static KV cache + graph replay, as torch.compile's
    reduce-overhead mode does) takes the two-launch merge and stays exact on every replay."""
    from attn_patch.kernels.flash import flash_attention

    q, k, v = _inputs(2, 12, 4, 1, 3000, 64, torch.bfloat16, grad=False)
    flash_attention(q, k, v)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        flash_attention(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = flash_attention(q, k, v)
    for _ in range(3):
        q.copy_(torch.randn_like(q))
        k.copy_(torch.randn_like(k))
        graph.replay()
        torch.cuda.synchronize()
        ref, _ = attention_reference(q, k, v)
        assert rel_err(out, ref) < TOL[torch.bfloat16], f"seed {seed}"
