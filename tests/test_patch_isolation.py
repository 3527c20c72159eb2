"""A patch touches only the model it was applied to, and its state follows the patched modules:
shared config objects, deep copies and pickles, save_pretrained, PEFT wrapping and merging, nested
apply() calls, and set_attn_implementation after apply()."""
import copy
import io
import json

import pytest
import torch
from tiny_models import VOCAB, build
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import attn_patch
from attn_patch import PatchStateError

SEER = dict(gates="untrained", block_size=16, min_length=0, density=1.0, backend="reference")
METHODS = {
    "flash": dict(backend="reference"),
    "longlora": dict(backend="reference", inference="s2", group=4),
    "seer": SEER,
    "moh": dict(backend="reference", active=0.5, router="learned", routers="untrained"),
}


def _config():
    return LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=96, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=16, num_hidden_layers=2, max_position_embeddings=512,
                       pad_token_id=0)


def _ids(seed, n=40):
    return torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_models_sharing_a_config_object_stay_apart(seed):
    """Teacher and student from one config object: patching the student changes nothing the teacher
    reads; after apply to both and remove from both, both run as before."""
    cfg = _config()
    teacher, student = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    ids = _ids(seed)
    want_t, want_s = _logits(teacher, ids), _logits(student, ids)
    attn_patch.apply(student, "longlora", **METHODS["longlora"])
    assert teacher.config is cfg and cfg._attn_implementation != "attn_patch"
    torch.testing.assert_close(_logits(teacher, ids), want_t, rtol=0, atol=0)
    assert (_logits(student, ids) - want_s).abs().max() > 1e-3  # S2 in eval really runs on the student
    attn_patch.apply(teacher, "flash", backend="reference")
    attn_patch.remove(teacher)
    attn_patch.remove(student)
    assert student.config is cfg and teacher.config is cfg
    assert all(m.config is cfg for m in student.modules() if "config" in m.__dict__)
    torch.testing.assert_close(_logits(teacher, ids), want_t, rtol=0, atol=0)
    torch.testing.assert_close(_logits(student, ids), want_s, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_a_patched_model_is_independent(method, how, seed):
    model = build("llama")
    ids = _ids(seed)
    attn_patch.apply(model, method, **METHODS[method])
    want = _logits(model, ids)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    assert attn_patch.patch_state(twin).method == method
    assert attn_patch.patch_state(twin) is not attn_patch.patch_state(model)
    torch.testing.assert_close(_logits(twin, ids), want)
    attn_patch.remove(twin)  # removing the copy leaves the original patched and running
    torch.testing.assert_close(_logits(model, ids), want)
    assert attn_patch.patch_state(model).method == method
    twin2 = copy.deepcopy(model)
    attn_patch.remove(model)  # and the other way round
    torch.testing.assert_close(_logits(twin2, ids), want)
    attn_patch.remove(twin2)
    torch.testing.assert_close(_logits(twin2, ids), _logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["seer", "moh", "flash"])
def test_save_pretrained_holds_the_base_model_only(method, tmp_path, seed):
    from safetensors import safe_open

    model = build("llama")
    ids = _ids(seed)
    base_keys = set(model.state_dict())
    want = _logits(model, ids)
    attn_patch.apply(model, method, **METHODS[method])
    if method != "flash":
        assert set(model.state_dict()) > base_keys  # gates / routers are ordinary submodules while patched
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved <= base_keys and not [k for k in saved if "seer" in k or "moh" in k]
    assert "attn_patch" not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, ids), want)
    attn_patch.remove(model)
    assert model._keys_to_ignore_on_save == set()  # what post_init set, given back
    assert set(model.state_dict()) == base_keys


def test_patch_follows_modules_through_peft_merge(seed):
    peft = pytest.importorskip("peft")
    model = build("llama")
    ids = _ids(seed)
    want = _logits(model, ids)
    attn_patch.apply(model, "seer", **SEER)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert attn_patch.patch_state(wrapped).method == "seer"
    merged = wrapped.merge_and_unload()
    assert attn_patch.patch_state(merged).method == "seer"
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)  # LoRA B starts at zero
    attn_patch.remove(merged)
    assert attn_patch.patch_state(merged) is None
    assert not any("seer_gate" in k for k in merged.state_dict())
    assert merged.config._attn_implementation != "attn_patch"


def test_apply_to_a_peft_model_then_merge():
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(build("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    attn_patch.apply(wrapped, "flash", backend="reference")
    merged = wrapped.merge_and_unload()
    assert attn_patch.patch_state(merged).method == "flash"
    attn_patch.remove(merged)
    assert attn_patch.patch_state(merged) is None and merged.config._attn_implementation != "attn_patch"


def test_nested_apply_is_refused_both_ways():
    model = build("llama")
    attn_patch.apply(model.model, "flash", backend="reference")
    with pytest.raises(PatchStateError, match="already patched with 'flash' \\(at its submodule 'model.layers.0.self_attn'\\)"):
        attn_patch.apply(model, "seer", **SEER)
    attn_patch.remove(model.model)
    attn_patch.apply(model, "flash", backend="reference")
    with pytest.raises(PatchStateError, match="already patched with 'flash'"):
        attn_patch.apply(model.model, "flash", backend="reference")
    attn_patch.remove(model)
    assert attn_patch.patch_state(model) is None and attn_patch.patch_state(model.model) is None


def test_switching_the_implementation_away_ends_the_patch(seed):
    model = build("llama")
    ids = _ids(seed)
    want = _logits(model, ids)
    attn_patch.apply(model, "seer", **SEER)
    model.set_attn_implementation("eager")
    assert attn_patch.patch_state(model) is None  # it runs eager now, and says so
    with pytest.raises(PatchStateError, match="switched to eager.*remove"):
        attn_patch.stats(model)
    with pytest.raises(PatchStateError, match="already patched"):
        attn_patch.apply(model, "flash")
    attn_patch.remove(model)  # still detaches what apply() attached
    assert not any("seer_gate" in k for k in model.state_dict())
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_implementation_name_without_apply_is_an_error(seed):
    model = build("llama")
    model.set_attn_implementation("attn_patch")
    with pytest.raises(PatchStateError, match="attn_patch.apply"):
        model(_ids(seed))


def test_remove_says_which_config_edits_stay_with_the_private_copy(caplog):
    cfg = _config()
    model = LlamaForCausalLM(cfg).eval()
    attn_patch.apply(model, "flash", backend="reference")
    model.config.use_cache = False
    assert cfg.use_cache is True  # the edit went to the model's own copy
    with caplog.at_level("WARNING", logger="attn_patch"):
        attn_patch.remove(model)
    assert model.config is cfg
    assert [r for r in caplog.records if "not carried over: use_cache" in r.getMessage()]
    caplog.clear()
    with caplog.at_level("WARNING", logger="attn_patch"):
        attn_patch.apply(model, "flash", backend="reference")
        attn_patch.remove(model)
    assert not [r for r in caplog.records if "not carried over" in r.getMessage()]


@pytest.mark.parametrize("method", ["moh", "seer"])
def test_copy_during_training_leaves_pending_losses_with_the_original(method, seed):
    """A training forward leaves losses on the autograd graph (MoH balance, seer distillation) until
    they are collected; a copy made then (an EMA or teacher copy) starts without them."""
    model = build("llama")
    opts = dict(METHODS[method], **({"distill": True} if method == "seer" else {}))
    attn_patch.apply(model, method, **opts)
    model.train()
    model(_ids(seed, 48)).logits.sum().backward()
    twin = copy.deepcopy(model)
    if method == "moh":
        assert attn_patch.aux_loss(model).requires_grad
        with pytest.raises(PatchStateError, match="forward in training mode"):
            attn_patch.aux_loss(twin)
    else:
        from attn_patch.seer import distill_losses

        assert distill_losses(model) and not distill_losses(twin)
    attn_patch.remove(twin)
    attn_patch.remove(model)
