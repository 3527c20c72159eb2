"""apply(model, "longlora"): S2-Attn in training mode through transformers, dense in eval mode."""
import pytest
import torch
from conftest import DEVICE, has_triton
from tiny_models import FAMILIES, build

import attn_patch
from attn_patch.errors import ConfigError

TRITON = pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))


def _model(family, seed):
    torch.manual_seed(seed)
    overrides = {"sliding_window": None} if family == "mistral" else {}
    return build(family, **overrides).to(DEVICE).train()


def _loss_and_grads(model, ids, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False, **inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _assert_grads_close(got, want, seed):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=2e-4, atol=2e-5, msg=f"{name}, seed {seed}")


@pytest.mark.parametrize("family", FAMILIES)
def test_training_mode_kernel_equals_masked_reference(family, seed):
    """The whole model in training mode (logits and every parameter gradient) on the S2 kernel
    equals the same model on the explicit-mask reference, for every family; a 37-token input with
    group 0.25 (9 tokens) has ragged groups; S2 differs from dense attention."""
    model = _model(family, seed)
    ids = torch.randint(1, 90, (2, 37), device=DEVICE)
    dense, _ = _loss_and_grads(model, ids)
    got, want = {}, {}
    for backend in ("reference", "triton" if has_triton() else "reference"):
        with attn_patch.patched(model, "longlora", backend=backend, sink=2):
            got[backend] = _loss_and_grads(model, ids)
    (ref_logits, ref_grads), (k_logits, k_grads) = got["reference"], got["triton" if has_triton() else "reference"]
    torch.testing.assert_close(k_logits, ref_logits, rtol=2e-4, atol=2e-5, msg=f"seed {seed}")
    _assert_grads_close(k_grads, ref_grads, seed)
    assert (ref_logits - dense).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_padding_and_packed_documents(backend, seed):
    """A left-padded batch: each row equals that row alone (its groups start at its first token).
    Packed documents (position ids restart): each document equals the document alone."""
    model = _model("llama", seed)
    ids = torch.randint(1, 90, (2, 40), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    with attn_patch.patched(model, "longlora", backend=backend, group=8), torch.no_grad():
        batch = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(ids[1:, 13:], use_cache=False).logits
        pos = torch.cat([torch.arange(17), torch.arange(23)]).view(1, -1).to(DEVICE)
        packed = model(ids[:1], position_ids=pos, use_cache=False).logits
        doc2 = model(ids[:1, 17:], use_cache=False).logits
    torch.testing.assert_close(batch[1, 13:], alone[0], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    torch.testing.assert_close(packed[:, 17:], doc2, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_eval_mode_is_dense_unless_asked(seed):
    model = _model("llama", seed)
    ids = torch.randint(1, 90, (1, 33), device=DEVICE)
    with torch.no_grad():
        model.eval()
        dense = model(ids).logits
        with attn_patch.patched(model, "longlora", group=8):
            ev = model(ids).logits
        with attn_patch.patched(model, "longlora", group=8, inference="s2"):
            s2_eval = model(ids, use_cache=False).logits
        model.train()
        with attn_patch.patched(model, "longlora", group=8):
            s2_train = model(ids, use_cache=False).logits
    torch.testing.assert_close(ev, dense, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(s2_eval, s2_train, rtol=1e-5, atol=2e-5)
    assert (s2_train - dense).abs().max() > 1e-3


def test_config_errors():
    model = build("llama")
    for bad in (dict(group=0), dict(group=1.5), dict(group=1), dict(sink=-1), dict(inference="sparse")):
        with pytest.raises(ConfigError):
            attn_patch.apply(model, "longlora", **bad)
    assert attn_patch.patch_state(model) is None
