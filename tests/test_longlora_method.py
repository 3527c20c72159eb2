"""apply(model, "longlora"): S2-Attn in training mode through transformers, dense in eval mode."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DEVICE, has_triton
from tiny_models import FAMILIES, build

import attn_patch
from attn_patch.errors import ConfigError
from attn_patch.longlora import LongLoRAConfig

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
    for bad in (dict(group=0), dict(group=1.5), dict(group=1), dict(sink=-1), dict(inference="sparse"),
                dict(group=float("inf")), dict(group=float("-inf")), dict(group=float("nan"))):
        with pytest.raises(ConfigError):
            attn_patch.apply(model, "longlora", **bad)
    assert attn_patch.patch_state(model) is None


def test_group_sizes():
    """A fraction rounds to a token count of at least 2; numpy scalars count as numbers; a token
    count is taken as it is, up to the sequence length."""
    assert LongLoRAConfig(group=0.25).group_tokens(37) == 9
    assert LongLoRAConfig(group=0.25).group_tokens(5) == 2  # 1.25 tokens: the smallest group, 2
    assert LongLoRAConfig(group=16).group_tokens(16) == 16
    config = LongLoRAConfig()
    for value, tokens in ((np.float32(0.5), 20), (np.int64(8), 8), (np.float64(8.0), 8)):
        config.group = value
        config.validate()
        assert config.group_tokens(40) == tokens
    for bad in (np.float64("inf"), np.float32("nan"), np.int64(1)):
        config.group = bad
        with pytest.raises(ConfigError, match="group"):
            config.validate()


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_group_in_tokens_longer_than_the_sequence_is_an_error(backend):
    """Groups of 64 tokens asked for a 37-token sequence: an error naming both and the fix, not a
    silent group of 37 (whose shifted heads would still split the sequence)."""
    model = _model("llama", 0)
    ids = torch.randint(1, 90, (1, 37), device=DEVICE)
    with attn_patch.patched(model, "longlora", backend=backend, group=64):
        with pytest.raises(ConfigError, match=r"group=64 .* 37 tokens.*fraction.*<= 37"):
            model(ids, use_cache=False)
        model.eval()
        with torch.no_grad():
            model(ids)  # dense in eval mode: no groups, no error
    model.train()
    with attn_patch.patched(model, "longlora", backend=backend, group=37), torch.no_grad():
        model(ids, use_cache=False)  # a group as long as the sequence is fine


@pytest.mark.parametrize("backend", ["reference", TRITON])
def test_query_rows_sit_at_q_offset(backend, seed):
    """A call whose queries are not the last keys (a static cache: 3 queries at positions 9..11 of
    20 key slots): the rows of the S2 pattern are those of positions 9..11, on both backends."""
    from attn_patch.kernels import attention_reference
    from attn_patch.kernels.reference import _s2_mask_loop
    from attn_patch.longlora import attention
    from attn_patch.masks import AttentionMask

    q = torch.randn(1, 6, 3, 16, device=DEVICE)
    k, v = torch.randn(1, 2, 20, 16, device=DEVICE), torch.randn(1, 2, 20, 16, device=DEVICE)
    pad = torch.arange(20, device=DEVICE)[None] < 12  # slots after the queries are not filled yet
    config = LongLoRAConfig(group=4, sink=1, backend=backend)
    out, _ = attention(config, SimpleNamespace(training=True), q, k, v,
                       AttentionMask(causal=True, q_offset=9, key_padding=pad))
    mask = _s2_mask_loop(6, 20, 4, shift_from=3, sink=1, key_padding=pad.cpu())[:, :, 9:12].to(DEVICE)
    want, _ = attention_reference(q, k, v, causal=False, key_padding=pad, dense_mask=mask)
    torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("mode", ["train", "eval-s2"])
def test_reference_path_under_torch_compile(mode, seed):
    """torch.compile of a longlora-patched model on the reference path traces in reasonable time
    (the per-token mask loop made it hang) and gives the eager result: logits and gradients in
    training mode, logits in eval mode with inference="s2"."""
    torch.manual_seed(seed)
    model = build("llama", num_hidden_layers=1).to(DEVICE).train(mode == "train")
    ids = torch.randint(1, 90, (2, 29), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    inference = "s2" if mode == "eval-s2" else "dense"
    with attn_patch.patched(model, "longlora", backend="reference", group=8, sink=1, inference=inference):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        if mode == "train":
            want = _loss_and_grads(model, ids, attention_mask=mask)
            logits, grads = _loss_and_grads(compiled, ids, attention_mask=mask)
        else:
            with torch.no_grad():
                want = model(ids, attention_mask=mask).logits, {}
                logits, grads = compiled(ids, attention_mask=mask).logits, {}
    torch._dynamo.reset()
    if mode == "eval-s2":
        with torch.no_grad():
            dense = model(ids, attention_mask=mask).logits
        assert (logits - dense).abs().max() > 1e-3  # S2 ran, not the dense eval attention
    torch.testing.assert_close(logits, want[0], rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    _assert_grads_close({n.removeprefix("_orig_mod."): g for n, g in grads.items()}, want[1], seed)
