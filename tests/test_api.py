"""Public API: methods(), options, errors that name the fix, isolation between patched models."""
import pytest
import torch
from conftest import DEVICE
from tiny_models import build, left_padded_batch
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

import attn_patch
from attn_patch import ConfigError, PatchStateError, UnsupportedModelError


def test_methods_lists_flash_with_typed_options():
    info = attn_patch.methods()
    assert "flash" in info
    options = {o["name"]: o for o in info["flash"]["options"]}
    assert options["backend"]["choices"] == ("auto", "triton", "reference")
    assert options["backend"]["default"] == "auto"
    assert options["decode_splits"]["type"] == "int | None"
    assert all(o["help"] for o in options.values())


def test_unknown_method_lists_available():
    with pytest.raises(ConfigError, match="available methods: .*flash"):
        attn_patch.apply(build("llama"), "flashy")


@pytest.mark.parametrize("options,match", [
    ({"bakend": "triton"}, "unknown option.*'bakend'.*valid options: backend"),
    ({"backend": "cuda"}, "backend.*one of"),
    ({"decode_splits": "4"}, "decode_splits.*int \\| None"),
    ({"decode_splits": 0}, "decode_splits must be >= 1"),
    ({"decode": True}, "decode.*must be str"),
])
def test_bad_options_name_the_fix(options, match):
    model = build("llama")
    with pytest.raises(ConfigError, match=match):
        attn_patch.apply(model, "flash", **options)
    assert attn_patch.patch_state(model) is None  # nothing half-applied


def test_config_object_is_accepted():
    model = build("llama")
    attn_patch.apply(model, "flash", config=attn_patch.FlashConfig(backend="reference"))
    assert attn_patch.patch_state(model).config.backend == "reference"
    attn_patch.remove(model)


def test_unsupported_family_names_supported_ones():
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedModelError, match="'bloom' is not supported.*gpt2, gpt_neox, llama"):
        attn_patch.apply(model, "flash")


def test_not_a_transformers_model():
    with pytest.raises(UnsupportedModelError, match="PreTrainedModel"):
        attn_patch.apply(torch.nn.Linear(2, 2), "flash")


def test_unsupported_head_dim():
    cfg = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=256)
    with pytest.raises(UnsupportedModelError, match="head_dim 256 is not supported.*<= 128"):
        attn_patch.apply(LlamaForCausalLM(cfg), "flash")


def test_apply_twice_and_remove_unpatched():
    model = build("gpt2")
    attn_patch.apply(model, "flash")
    with pytest.raises(PatchStateError, match="already patched with 'flash'.*remove"):
        attn_patch.apply(model, "flash")
    attn_patch.remove(model)
    with pytest.raises(PatchStateError, match="not patched"):
        attn_patch.remove(model)


def test_context_manager_restores_on_error():
    model = build("qwen2")
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with attn_patch.patched(model, "flash"):
            assert model.config._attn_implementation != before
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
    assert attn_patch.patch_state(model) is None


def test_training_with_attention_dropout_is_refused():
    model = build("gpt2", attn_pdrop=0.1).train()
    ids = torch.randint(1, 50, (1, 6))
    with attn_patch.patched(model, "flash"):
        with pytest.raises(ConfigError, match="attention dropout.*eval mode"):
            model(ids)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("CPU-only check")
    model = build("llama")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
        attn_patch.apply(model, "flash", backend="triton")  # the machine already tells at apply()
    assert attn_patch.patch_state(model) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with attn_patch.patched(model, "flash", backend="triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # and the forward still checks the tensors it gets
        with pytest.raises(ConfigError, match="needs a CUDA device.*TRITON_INTERPRET=1"):
            model(torch.randint(1, 50, (1, 5)))


def test_triton_backend_refuses_float64_weights_at_apply():
    model = build("llama").double()
    with pytest.raises(ConfigError, match="float64.*model.to\\(torch.bfloat16\\)"):
        attn_patch.apply(model, "flash", backend="triton")
    assert attn_patch.patch_state(model) is None


def test_two_patched_models_do_not_interfere(seed):
    """Different configs on two models in one process; removing one leaves the other patched."""
    torch.manual_seed(seed)
    a, b = build("llama"), build("mistral")
    ids, mask = left_padded_batch([7, 4], 7)
    with torch.no_grad():
        ref_a = a(ids, attention_mask=mask).logits
        ref_b = b(ids, attention_mask=mask).logits
        attn_patch.apply(a, "flash", backend="reference")
        attn_patch.apply(b, "flash", backend="triton" if _interp() else "reference")
        assert attn_patch.patch_state(a) is not attn_patch.patch_state(b)  # each model carries its own state
        attn_patch.remove(a)
        got_b = b(ids, attention_mask=mask).logits
        got_a = a(ids, attention_mask=mask).logits
    assert attn_patch.patch_state(b).config.backend in ("triton", "reference")
    real = mask.bool()
    torch.testing.assert_close(got_a[real], ref_a[real], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got_b[real], ref_b[real], rtol=1e-5, atol=2e-5)
    attn_patch.remove(b)


def _interp():
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("method", ["flash", "longlora"])
def test_autocast_runs_attention_in_the_autocast_dtype(method, monkeypatch):
    """Under torch.autocast the fp32 RoPE output and the bf16 values reach the kernels as bf16, as
    autocast does for SDPA: the patched model equals the SDPA model under the same autocast."""
    from attn_patch.patching import autocast_inputs

    q, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4).bfloat16()
    assert [t.dtype for t in autocast_inputs(q, v)] == [torch.float32, torch.bfloat16]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [t.dtype for t in autocast_inputs(q, v)] == [torch.bfloat16, torch.bfloat16]
    import dataclasses

    from attn_patch import registry

    spec = registry.get_method(method)
    seen = []

    def spy(config, module, query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return spec.attention(config, module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(registry._METHODS, method, dataclasses.replace(spec, attention=spy))
    torch.manual_seed(0)
    model = build("llama")
    ids = torch.randint(1, 96, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want = model(ids).logits
        with attn_patch.patched(model, method, backend="reference"):
            got = model(ids).logits
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen
    assert got.dtype == want.dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02)


def test_numpy_scalars_ints_and_paths_are_accepted_where_they_fit(tmp_path):
    np = pytest.importorskip("numpy")
    cfg = attn_patch.LongLoRAConfig(group=np.float32(0.25), sink=np.int64(2))
    assert type(cfg.group) is float and cfg.group == 0.25 and type(cfg.sink) is int and cfg.sink == 2
    assert attn_patch.LongLoRAConfig(group=8).group == 8  # an int where a float is meant
    assert attn_patch.FlashConfig(decode_splits=np.int32(4)).decode_splits == 4
    assert attn_patch.SeerConfig(gates=tmp_path).gates == str(tmp_path)  # a pathlib.Path where a path is meant
    with pytest.raises(ConfigError, match="decode_splits.*int \\| None"):
        attn_patch.FlashConfig(decode_splits=np.float64(4.0))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_float_options_are_refused(value):
    with pytest.raises(ConfigError, match="'group' must be a finite number"):
        attn_patch.apply(build("llama"), "longlora", group=value)
