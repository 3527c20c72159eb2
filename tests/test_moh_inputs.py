"""MoH misuse that must not go silent: damaged router files, out-of-range options, aux_loss(model)
with balance_weight=0 and under gradient checkpointing."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICE
from tiny_models import build

import attn_patch
from attn_patch.errors import ConfigError, PatchStateError
from attn_patch.moh import MoHConfig, routers_of, save_routers


def _llama(seed, train=False):
    torch.manual_seed(seed)
    model = build("llama").to(DEVICE)  # 6 query heads, 2 layers
    return model.train() if train else model


@pytest.fixture
def saved(tmp_path, seed):
    """A tiny llama and learned routers (random weights) saved for it with a pathlib.Path."""
    model = _llama(seed)
    with attn_patch.patched(model, "moh", router="learned", routers="untrained", active=0.5), torch.no_grad():
        for r in routers_of(model):
            for p in r.parameters():
                p.normal_(std=0.3)
        save_routers(model, tmp_path / "r")
    return model, tmp_path / "r"


def _weights(path):
    """The saved router tensors, copied out of the file (it is rewritten next)."""
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(path / "routers.safetensors")).items()}


def _refused(model, path, *match):
    with pytest.raises(ConfigError) as err:
        attn_patch.apply(model, "moh", routers=path)
    for text in match:
        assert text in str(err.value), str(err.value)
    assert attn_patch.patch_state(model) is None


def test_routers_load_from_a_path_object(saved):
    model, path = saved
    ids = torch.randint(1, 90, (1, 20), device=DEVICE)
    with torch.no_grad():
        with attn_patch.patched(model, "moh", routers=str(path)):
            want = model(ids).logits
        with attn_patch.patched(model, "moh", routers=path):
            got = model(ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("key", ["layers.0.route.weight", "layers.1.norm_scale"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_router_weights_are_refused(saved, key, bad):
    from safetensors.torch import save_file

    model, path = saved
    tensors = _weights(path)
    tensors[key][0] = bad
    save_file(tensors, str(path / "routers.safetensors"))
    _refused(model, path, "routers.safetensors", key, "NaN or inf")


def test_non_positive_norm_scale_is_refused(saved):
    from safetensors.torch import save_file

    model, path = saved
    tensors = _weights(path)
    tensors["layers.0.norm_scale"][2] = 0.0
    save_file(tensors, str(path / "routers.safetensors"))
    _refused(model, path, "norm_scale", "must be > 0")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle"])
def test_damaged_weights_file_names_the_file(saved, damage):
    model, path = saved
    weights = path / "routers.safetensors"
    if damage == "truncated":
        raw = weights.read_bytes()
        weights.write_bytes(raw[:len(raw) // 2])
    elif damage == "garbage":
        weights.write_bytes(b"not a safetensors file" * 8)
    else:
        torch.save(_weights(path), str(weights))
    _refused(model, path, str(weights), "routers=")


BROKEN_CONFIGS = {  # name: the saved config.json's object -> what is written instead
    "invalid JSON": lambda m: "{not json",
    "a JSON list": lambda m: [m],
    "no router": lambda m: {k: v for k, v in m.items() if k != "router"},
    "router not an object": lambda m: {**m, "router": "learned"},
    "no kind": lambda m: {**m, "router": {k: v for k, v in m["router"].items() if k != "kind"}},
    "kind not a string": lambda m: {**m, "router": {**m["router"], "kind": 3}},
    "no model": lambda m: {k: v for k, v in m.items() if k != "model"},
    "layers not a list": lambda m: {**m, "router": {**m["router"], "layers": 2}},
    "layer counts not ints": lambda m: {**m, "router": {**m["router"], "layers": [["1", 2], [1, 2]]}},
    "no layers nor shared": lambda m: {**m, "router": {**m["router"], "layers": None, "shared": None}},
    "calibration not an object": lambda m: {**m, "calibration": [1]},
    "version not a number": lambda m: {**m, "version": "3"},
}


@pytest.mark.parametrize("broken", list(BROKEN_CONFIGS))
def test_broken_config_json_names_the_file(saved, broken):
    model, path = saved
    config = path / "config.json"
    edited = BROKEN_CONFIGS[broken](json.loads(config.read_text()))
    config.write_text(edited if isinstance(edited, str) else json.dumps(edited))
    _refused(model, path, str(config), "routers=")


def test_save_routers_takes_paths_only(tmp_path, seed):
    model = _llama(seed)
    with attn_patch.patched(model, "moh", active=0.5):
        with pytest.raises(ConfigError, match="path"):
            save_routers(model, 3)
        assert (save_routers(model, Path(tmp_path) / "n") / "config.json").is_file()


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1])
def test_balance_weight_must_be_finite_and_not_negative(value):
    with pytest.raises(ConfigError, match="balance_weight"):
        MoHConfig(balance_weight=value)


@pytest.mark.parametrize("value", [math.nan, math.inf, 0.0, -0.5, 1.5])
def test_active_must_be_a_fraction(value):
    with pytest.raises(ConfigError, match="active"):
        MoHConfig(active=value)


def test_validate_takes_numpy_scalars():
    """config.py turns numpy scalars into Python numbers; validate() itself works on them as well."""
    cfg = MoHConfig()
    cfg.active, cfg.balance_weight, cfg.shared = np.float32(0.5), np.float64(0.0), np.int64(1)
    cfg.validate()
    for name, value in (("balance_weight", np.float32("nan")), ("balance_weight", np.float64("inf")),
                        ("active", np.float32("nan")), ("shared", np.int64(-1))):
        bad = MoHConfig()
        setattr(bad, name, value)
        with pytest.raises(ConfigError, match=name):
            bad.validate()


@pytest.mark.parametrize("options, match", [
    ({"shared": 7}, "shared=7 is out of range for a model with 6 query heads"),
    ({"top_k": 9, "shared": 0}, "top_k=9 is out of range"),
    ({"active": 0.5, "top_k": 4}, "top_k=4 is more than the 3 heads per token"),
    ({"active": 0.5, "shared": 5}, "shared=5 is more than the 3 heads per token"),
    ({"active": 0.05}, "rounds to no head"),
    ({"active": "0.5"}, "'active'"),
    ({"shared": 2.5}, "'shared'"),
    ({"routers": 3}, "'routers'"),
    ({"routers": ""}, "names no directory"),
])
def test_option_ranges_are_checked_at_apply(seed, options, match):
    model = _llama(seed)
    with pytest.raises(ConfigError, match=match):
        attn_patch.apply(model, "moh", **options)
    assert attn_patch.patch_state(model) is None


def test_aux_loss_with_zero_balance_weight_is_a_zero_backward_takes(seed):
    model = _llama(seed, train=True)
    ids = torch.randint(1, 90, (2, 20), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5, balance_weight=0):
        out = model(ids, labels=ids)
        aux = attn_patch.aux_loss(model)
        assert aux.dtype == torch.float32 and aux.device == out.loss.device and aux.item() == 0.0
        aux.backward()
        (out.loss + attn_patch.aux_loss(model)).backward()
        assert model.model.layers[0].self_attn.q_proj.weight.grad is not None


def _checkpointing(model, reentrant: bool):
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False)
    aux = attn_patch.aux_loss(model)
    (out.loss + aux).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return aux.detach(), grads, attn_patch.stats(model, reset=True)


def test_aux_loss_under_reentrant_checkpointing_says_why(seed):
    """Reentrant checkpointing runs each layer's forward under no_grad and re-runs it inside backward:
    no balance loss can exist before backward, so aux_loss says so and names use_reentrant=False;
    the re-run in backward records neither picks nor losses (no stale loss for the next call)."""
    model = _llama(seed, train=True)
    _checkpointing(model, reentrant=True)
    ids = torch.randint(1, 90, (2, 20), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5):
        out = model(ids, labels=ids, use_cache=False)
        with pytest.raises(PatchStateError, match=r"use_reentrant=True runs each layer's forward under "
                                                  r"torch.no_grad\(\).*'use_reentrant': False"):
            attn_patch.aux_loss(model)
        out.loss.backward()
        assert [layer["tokens"] for layer in attn_patch.stats(model)["layers"]] == [40, 40]
        with pytest.raises(PatchStateError, match="use_reentrant"):
            attn_patch.aux_loss(model)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5, balance_weight=0):
        assert _step(model, ids)[0].item() == 0.0


def test_non_reentrant_checkpointing_gives_the_same_step(seed):
    """Non-reentrant checkpointing: the same aux loss, gradients and stats as without; the recompute
    during backward records nothing (picks counted once, no loss left for the next aux_loss call)."""
    model = _llama(seed, train=True)
    ids = torch.randint(1, 90, (2, 20), device=DEVICE)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5):
        want_aux, want_grads, want_stats = _step(model, ids)
    _checkpointing(model, reentrant=False)
    with attn_patch.patched(model, "moh", backend="reference", active=0.5):
        aux, grads, st = _step(model, ids)
        with pytest.raises(PatchStateError, match="training mode"):
            attn_patch.aux_loss(model)
    torch.testing.assert_close(aux, want_aux)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert st["layers"] == want_stats["layers"] and st["layers"][0]["tokens"] == 40
