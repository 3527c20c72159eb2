"""S2-Attn (shifted-sparse attention) kernel against an explicit-mask dense reference (the mask
written token by token from the definition, independent of the kernel's ``s2_bounds``)."""
import pytest
import torch
from conftest import DEVICE, needs_triton, rel_err

from attn_patch.kernels import attention_reference
from attn_patch.kernels.reference import _s2_mask_loop

pytestmark = [needs_triton, pytest.mark.kernels]

TOL = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}


def _inputs(b, hq, hkv, t, d, dtype):
    def make(h):  # transposed views of [B, T, H, D], as transformers hands them over
        return torch.randn(b, t, h, d, device=DEVICE, dtype=dtype).transpose(1, 2).requires_grad_(True)

    return make(hq), make(hkv), make(hkv)


def _check(b, hq, hkv, t, d, group, *, sink=0, dtype=torch.float32, position_ids=None, key_padding=None,
           shift_from=None):
    from attn_patch.kernels.s2 import s2_attention, s2_bounds

    shift_from = hq - hq // 2 if shift_from is None else shift_from
    q, k, v = _inputs(b, hq, hkv, t, d, dtype)
    bounds = s2_bounds(b, t, group, position_ids=position_ids, key_padding=key_padding, device=DEVICE)
    mask = _s2_mask_loop(hq, t, group, shift_from=shift_from, sink=sink, position_ids=position_ids,
                         key_padding=key_padding, batch=b).to(DEVICE)
    out, lse = s2_attention(q, k, v, bounds, shift_from=shift_from, sink=sink, key_padding=key_padding)
    ref, ref_lse = attention_reference(q, k, v, causal=False, dense_mask=mask, key_padding=key_padding)
    rows = torch.ones(b, t, dtype=torch.bool, device=DEVICE) if key_padding is None else key_padding.bool()
    assert rel_err(out.transpose(1, 2)[rows], ref.transpose(1, 2)[rows]) < TOL[dtype]
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=1e-4, atol=1e-4)
    dout = torch.randn_like(out) * rows[:, None, :, None]
    grads = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, w in zip("qkv", grads, want):
        assert rel_err(g, w) < TOL[dtype] * (4 if dtype != torch.float32 else 1), name
    return mask


@pytest.mark.parametrize("t,group", [(64, 16), (77, 16), (50, 12), (33, 64)])
def test_s2_matches_masked_reference_odd_lengths_gqa(t, group, seed):
    """Ragged last groups (77 and 50 are not multiples of the group), a group wider than the input,
    GQA 6/2 with three shifted heads, forward, LSE and gradients."""
    _check(1, 6, 2, t, 16, group)


def test_s2_batch_with_padding_and_sinks(seed):
    """Left padding in one row and right padding in the other: groups and sinks count from each
    row's first real token; padded keys are never seen."""
    t = 45
    kp = torch.ones(2, t, dtype=torch.bool, device=DEVICE)
    kp[0, :7] = False
    kp[1, 38:] = False
    _check(2, 4, 2, t, 16, 10, sink=3, key_padding=kp)


def test_s2_packed_documents_sinks_bf16(seed):
    """Three documents packed in one row (position ids restart): no attention across documents,
    each document has its own groups and sinks; MHA and bf16."""
    pos = torch.cat([torch.arange(20), torch.arange(31), torch.arange(19)]).view(1, -1).to(DEVICE)
    mask = _check(1, 4, 4, 70, 32, 8, sink=2, position_ids=pos, dtype=torch.bfloat16)
    assert not mask[0, :, 20:, :20].any() and not mask[0, :, 51:, 20:51].any()
    # the second document's queries see its first 2 tokens (sinks) but not its third
    assert mask[0, 0, 45, 20:22].all() and not mask[0, 0, 45, 22]


def test_s2_no_query_sees_the_future(seed):
    """Perturbing the tokens after position p changes no output at or before p (any head, shifted
    or not), with sinks; the wrap-around of the roll-based reference would fail this."""
    from attn_patch.kernels.s2 import s2_attention, s2_bounds

    t, p = 64, 29
    q, k, v = (x.detach() for x in _inputs(1, 4, 2, t, 16, torch.float32))
    bounds = s2_bounds(1, t, 16, device=DEVICE)
    out = s2_attention(q, k, v, bounds, shift_from=2, sink=4)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, p + 1:] += torch.randn_like(k2[:, :, p + 1:])
    v2[:, :, p + 1:] += torch.randn_like(v2[:, :, p + 1:])
    out2 = s2_attention(q, k2, v2, bounds, shift_from=2, sink=4)[0]
    torch.testing.assert_close(out2[:, :, :p + 1], out[:, :, :p + 1], rtol=0, atol=0)
    assert (out2[:, :, p + 1:] - out[:, :, p + 1:]).abs().max() > 1e-3


def test_s2_group_covering_everything_is_causal_attention(seed):
    """One group as long as the input (shifted heads: half of it, then the rest) without shift is
    plain causal attention."""
    from attn_patch.kernels.s2 import s2_attention, s2_bounds

    q, k, v = (x.detach() for x in _inputs(1, 4, 2, 40, 16, torch.float32))
    out = s2_attention(q, k, v, s2_bounds(1, 40, 40, device=DEVICE), shift_from=4)[0]
    ref = attention_reference(q, k, v, causal=True)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_s2_bounds_and_errors():
    from attn_patch.kernels.s2 import s2_attention, s2_bounds

    bnd = s2_bounds(1, 10, 4)
    assert bnd[0, 0].tolist() == [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]
    assert bnd[0, 1].tolist() == [0, 0, 2, 2, 2, 2, 6, 6, 6, 6]  # shifted: half-size first group
    assert bnd[0, 3].tolist() == [2, 2, 6, 6, 6, 6, 10, 10, 10, 10]
    q = torch.randn(1, 2, 10, 16)
    with pytest.raises(ValueError, match="s2_bounds"):
        s2_attention(q, q, q, bnd[:, :3], shift_from=1)
    with pytest.raises(ValueError, match="group"):
        s2_bounds(1, 10, 0)
