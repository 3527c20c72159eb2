"""The argument contract: the reference and the kernels accept the same arguments, refuse the same
misuse with the same error, and never read a float mask as a bool one."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, needs_triton

from attn_patch.kernels import attention_reference

pytestmark = [needs_triton, pytest.mark.kernels]


def _flash(*args, **kwargs):
    from attn_patch.kernels.flash import flash_attention

    return flash_attention(*args, decode=False, **kwargs)


def _both():
    return [pytest.param(attention_reference, id="reference"), pytest.param(_flash, id="kernel")]


def _inputs(b=2, hq=4, hkv=2, tq=6, tk=6, d=16):
    return (torch.randn(b, hq, tq, d, device=DEVICE), torch.randn(b, hkv, tk, d, device=DEVICE),
            torch.randn(b, hkv, tk, d, device=DEVICE))


def _sdpa(q, k, v, attn_mask):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=attn_mask)


@pytest.mark.parametrize("attend", _both())
def test_float_dense_mask_is_refused_with_the_conversion(attend, seed):
    """SDPA reads a float mask as additive (0 = attend, -inf = blocked): read as bool it would be
    inverted, so a float mask is an error naming `== 0`, and the converted mask gives SDPA's result."""
    q, k, v = _inputs()
    keep = torch.rand(2, 1, 6, 6, device=DEVICE) > 0.4
    keep[..., 0] = True  # every row sees a key (SDPA gives NaN for a row that sees none)
    additive = torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, float("-inf"))
    with pytest.raises(TypeError, match="dense_mask == 0"):
        attend(q, k, v, causal=False, dense_mask=additive)
    out, _ = attend(q, k, v, causal=False, dense_mask=additive == 0)
    torch.testing.assert_close(out, _sdpa(q, k, v, additive), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def _bad_calls():
    """name -> (arguments, exception, message) for misuse both must refuse alike."""
    q, k, v = _inputs()
    pad = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    dense = torch.ones(2, 1, 6, 6, dtype=torch.bool, device=DEVICE)
    return {
        "window 0": (dict(window=0), ValueError, "window .* >= 1"),
        "negative window": (dict(window=-3), ValueError, "window .* >= 1"),
        "fractional window": (dict(window=2.5), TypeError, "window .* int"),
        "tensor q_offset": (dict(q_offset=torch.tensor(0)), TypeError, "q_offset must be a Python int"),
        "key_padding broadcast over the batch": (dict(key_padding=pad[:1]), ValueError, "key_padding must be"),
        "float key_padding": (dict(key_padding=pad.float()), TypeError, "key_padding must be bool"),
        "3-D dense_mask": (dict(dense_mask=dense[:, 0]), ValueError, "dense_mask must be"),
        "dense_mask broadcast over queries": (dict(dense_mask=dense[:, :, :1]), ValueError, "dense_mask must be"),
        "dense_mask of the wrong batch": (dict(dense_mask=dense[:1].expand(3, 1, 6, 6)), ValueError,
                                          "dense_mask must be"),
        "k/v batch differs": (dict(k=k[:1], v=v[:1]), ValueError, "must agree in batch"),
        "q/k head dims differ": (dict(q=q[..., :8]), ValueError, "head_dim"),
        "v differs from k": (dict(v=v[..., :8]), ValueError, "k and v shapes differ"),
        "dtypes differ": (dict(k=k.half(), v=v.half()), ValueError, "dtypes differ"),
        "heads not a multiple": (dict(q=q[:, :3]), ValueError, "multiple of key/value heads"),
        "3-D q": (dict(q=q[0]), ValueError, "4-D"),
    }, dict(q=q, k=k, v=v)


@pytest.mark.parametrize("name", list(_bad_calls()[0]))
def test_reference_and_kernel_refuse_the_same_misuse(name):
    cases, good = _bad_calls()
    change, error, match = cases[name]
    for attend in (attention_reference, _flash):
        with pytest.raises(error, match=match):
            attend(**{**good, **change})


def test_numpy_integers_are_whole_numbers(seed):
    """q_offset and window given as numpy integers mean what the Python ints mean, in both."""
    q, k, v = _inputs(tq=3, tk=9)
    want, _ = attention_reference(q, k, v, q_offset=4, window=3)
    for attend in (attention_reference, _flash):
        got, _ = attend(q, k, v, q_offset=np.int64(4), window=np.int32(3))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("splits", [0, -1, 1.5])
def test_decode_splits_must_be_a_positive_int(splits):
    from attn_patch.kernels.flash import flash_attention

    q, k, v = _inputs(tq=1, tk=20)
    with pytest.raises((ValueError, TypeError), match="num_splits"):
        flash_attention(q, k, v, decode=True, num_splits=splits)


def test_s2_kernel_takes_the_same_contract():
    from attn_patch.kernels.s2 import s2_attention, s2_bounds

    q, k, v = _inputs()
    bounds = s2_bounds(2, 6, 4, device=DEVICE)
    with pytest.raises(ValueError, match="key_padding must be"):
        s2_attention(q, k, v, bounds, shift_from=2, key_padding=torch.ones(1, 6, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="q_offset must be a Python int"):
        s2_attention(q, k, v, bounds, shift_from=2, q_offset=torch.tensor(0))
