"""apply(model, "seer"): gates attached per layer, block-sparse prefill, dense decode, stats, gate files."""
import json

import pytest
import torch
from conftest import DEVICE, has_triton
from tiny_models import FAMILIES, build, left_padded_batch

import attn_patch
from attn_patch.errors import ConfigError, UnsupportedModelError
from attn_patch.seer import gates_of, save_gates

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))]
SMALL = dict(gates="untrained", block_size=16, min_length=0)


def _model(family, seed, **overrides):
    torch.manual_seed(seed)
    if family == "mistral":
        overrides.setdefault("sliding_window", None)
    return build(family, **overrides).to(DEVICE)


def _randomise_gates(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates_of(model):
            gate.k_weight.add_(torch.randn(gate.k_weight.shape, generator=g).to(gate.k_weight) * 0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_density_one_is_dense_attention(family, seed):
    """Every visible block selected: the patched model is the unpatched model (padding included)."""
    model = _model(family, seed)
    ids, mask = left_padded_batch([53, 41], 53)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        with attn_patch.patched(model, "seer", density=1.0, **SMALL):
            got = model(ids, attention_mask=mask).logits
            st = attn_patch.stats(model)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=2e-5, msg=f"seed {seed}")
    assert st["density"] == 1.0 and all(layer["sparse_calls"] == 1 for layer in st["layers"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_prefill_kernel_matches_reference_and_reports_density(backend, seed):
    """At density 0.3 the output differs from dense, the Triton path equals the PyTorch reference
    with the same gates, and stats report the achieved density per layer and head."""
    model = _model("llama", seed)
    ids = torch.randint(1, 96, (2, 70), device=DEVICE)
    with torch.no_grad():
        dense = model(ids).logits
        attn_patch.apply(model, "seer", density=0.3, backend="reference", dense_last=0, **SMALL)
        _randomise_gates(model, seed)
        ref = model(ids).logits
        ref_stats = attn_patch.stats(model)
        path = save_gates(model, f"/tmp/attn_patch_test_gates_{seed}")
        attn_patch.remove(model)
        attn_patch.apply(model, "seer", density=0.3, backend=backend, gates=str(path), min_length=0, dense_last=0)
        got = model(ids).logits
        st = attn_patch.stats(model, reset=True)
        attn_patch.remove(model)
    assert (ref - dense).abs().max() > 1e-3  # sparse really drops blocks
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    assert st == ref_stats
    assert len(st["layers"]) == 2 and len(st["layers"][0]["heads"]) == 6
    # 5 query blocks; k = 2 of the 15 visible: sink + diagonal, so 9 / 15 = 0.6 with forced blocks
    assert 0.3 <= st["density"] <= 0.61


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [112, 125])
def test_dense_last_blocks_attend_to_everything(backend, length, seed):
    """One layer, so attention rows map to logits: the last dense_last query rows give the dense
    model's logits, the sparse rows before them (a block split between the two kinds) do not, and
    stats count the dense rows."""
    model = _model("llama", seed, num_hidden_layers=1)
    ids = torch.randint(1, 96, (1, length), device=DEVICE)
    tail = 20
    with torch.no_grad():
        dense = model(ids).logits
        with attn_patch.patched(model, "seer", density=0.1, dense_last=tail, backend=backend, **SMALL):
            _randomise_gates(model, seed)
            got = model(ids).logits
            st = attn_patch.stats(model)
            attn_patch.patch_state(model).config.dense_last = 0
            sparse = model(ids).logits
            st0 = attn_patch.stats(model, reset=True)
            attn_patch.patch_state(model).config.dense_last = length
            everything = model(ids).logits
            st_all = attn_patch.stats(model, reset=True)
    torch.testing.assert_close(got[:, -tail:], dense[:, -tail:], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    torch.testing.assert_close(got[:, :-tail], sparse[:, :-tail], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    assert (got[:, :-tail] - dense[:, :-tail]).abs().max() > 1e-3
    assert st0["density"] < st["density"] < st_all["density"] == 1.0
    torch.testing.assert_close(everything, dense, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


def test_group_selection_and_threshold(seed):
    model = _model("llama", seed)
    ids = torch.randint(1, 96, (1, 64), device=DEVICE)
    with attn_patch.patched(model, "seer", selection="group", threshold=0.3, **SMALL), torch.no_grad():
        model(ids)
        st = attn_patch.stats(model)
    assert st["selection"] == "group" and len(st["layers"][0]["heads"]) == 2
    assert st["config"] == {"threshold": 0.3}


@pytest.mark.parametrize("backend", BACKENDS)
def test_oracle_selects_from_the_exact_block_map(backend, seed):
    """oracle=True selects from the ground truth of the layer's own attention, not from the gate
    (another selection than the same gate's), the kernel path equals the reference path, and it
    refuses a KV cache. top_p runs and is reported."""
    from transformers import DynamicCache

    model = _model("llama", seed)
    ids = torch.randint(1, 96, (1, 128), device=DEVICE)
    opts = dict(density=0.5, keep_sink=False, dense_last=0, **SMALL)  # 2 free blocks of up to 8 per row
    with torch.no_grad():
        dense = model(ids).logits
        with attn_patch.patched(model, "seer", top_p=0.5, **dict(SMALL, dense_last=0)):
            top_p = model(ids).logits
            assert attn_patch.stats(model)["config"] == {"top_p": 0.5}
        with attn_patch.patched(model, "seer", backend="reference", **opts):
            gate = model(ids).logits
        with attn_patch.patched(model, "seer", backend="reference", oracle=True, **opts):
            ref = model(ids).logits
        with attn_patch.patched(model, "seer", backend=backend, oracle=True, **opts):
            got = model(ids).logits
            with pytest.raises(ConfigError, match="oracle"):
                cache = DynamicCache(config=model.config)
                model(ids[:, :100], past_key_values=cache, use_cache=True)
                model(ids[:, 100:], past_key_values=cache, use_cache=True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
    assert (ref - gate).abs().max() > 1e-4 and (ref - dense).abs().max() > 1e-4, f"seed {seed}"
    assert (top_p - dense).abs().max() > 1e-4


def test_chunked_prefill_on_a_cache_equals_the_full_pass(seed):
    """Threshold selection is per row, so a prompt prefilled in chunks (one starting inside a block,
    one at a boundary) gives the full single pass's logits (without the dense last block, which each
    prefill call has)."""
    from transformers import DynamicCache

    model = _model("llama", seed)
    ids = torch.randint(1, 96, (1, 80), device=DEVICE)
    with attn_patch.patched(model, "seer", threshold=0.2, dense_last=0, **SMALL), torch.no_grad():
        _randomise_gates(model, seed)
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, a:b], past_key_values=cache, use_cache=True).logits for a, b in ((0, 20), (20, 48),
                                                                                             (48, 80))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4, msg=f"seed {seed}")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_generate_decodes_dense(family, seed):
    model = _model(family, seed)
    ids, mask = left_padded_batch([40, 33], 40)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    with attn_patch.patched(model, "seer", density=1.0, **SMALL):
        got = model.generate(ids, **kwargs)
        st = attn_patch.stats(model)
    assert torch.equal(got, want)
    steps = got.shape[1] - ids.shape[1]  # generation may stop early at an EOS token
    assert st["layers"][0]["sparse_calls"] == 1 and st["layers"][0]["dense_calls"] == steps - 1


def test_short_inputs_run_dense(seed):
    model = _model("llama", seed)
    with attn_patch.patched(model, "seer", gates="untrained", min_length=100), torch.no_grad():
        model(torch.randint(1, 96, (1, 70), device=DEVICE))
        st = attn_patch.stats(model)
    assert st["density"] is None and st["layers"][1]["dense_calls"] == 1


def test_remove_restores_the_model_exactly(seed):
    model = _model("qwen2", seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    attn_patch.apply(model, "seer", **SMALL)
    assert any(k.endswith("seer_gate.k_weight") for k in model.state_dict())
    attn_patch.remove(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.config._attn_implementation == impl


def test_distill_mode_records_losses_and_trains_only_gates(seed):
    model = _model("llama", seed)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(1, 96, (2, 64), device=DEVICE)
    with torch.no_grad():
        want = model(ids).logits
    with attn_patch.patched(model, "seer", distill=True, gates="untrained", block_size=16):
        with torch.no_grad():
            out = model(ids, use_cache=False).logits
        losses = attn_patch.seer.distill_losses(model)
        assert len(losses) == 2 and all(torch.isfinite(x) and x > 0 for x in losses)
        sum(losses).backward()
        assert all(g.k_weight.grad is not None and g.k_weight.grad.abs().sum() > 0 for g in gates_of(model))
        with pytest.raises(ConfigError, match="use_cache=False"):
            model(ids, attention_mask=torch.ones_like(ids).index_fill_(1, torch.tensor([0], device=DEVICE), 0))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=2e-5)


def test_gate_files_round_trip_and_strict_loading(tmp_path, seed):
    model = _model("llama", seed)
    attn_patch.apply(model, "seer", **SMALL)
    _randomise_gates(model, seed)
    path = save_gates(model, tmp_path / "gates", training={"steps": 3})
    saved = [g.k_weight.detach().clone() for g in gates_of(model)]
    attn_patch.remove(model)
    attn_patch.apply(model, "seer", gates=str(path))
    assert all(torch.equal(g.k_weight, w) for g, w in zip(gates_of(model), saved))
    assert gates_of(model)[0].block_size == 16
    attn_patch.remove(model)
    meta = json.loads((path / "config.json").read_text())
    assert meta["training"] == {"steps": 3} and meta["model"]["num_layers"] == 2

    with pytest.raises(ConfigError, match="block size 16"):
        attn_patch.apply(model, "seer", gates=str(path), block_size=64)
    with pytest.raises(ConfigError, match="untrained gates only"):
        attn_patch.apply(model, "seer", gates=str(path), q_proj=True)
    other = _model("llama", seed, num_hidden_layers=3)
    with pytest.raises(ConfigError, match="another model shape"):
        attn_patch.apply(other, "seer", gates=str(path))
    # a missing tensor is an error, not a silently untrained layer
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "gates.safetensors"))
    tensors.pop("layers.1.k_weight")
    save_file(tensors, str(path / "gates.safetensors"))
    with pytest.raises(ConfigError, match="missing \\['layers.1.k_weight'\\]"):
        attn_patch.apply(model, "seer", gates=str(path))
    assert attn_patch.patch_state(model) is None and not hasattr(model.model.layers[0].self_attn, "seer_gate")
    with pytest.raises(ConfigError, match="no gate weights"):
        attn_patch.apply(model, "seer", gates=str(tmp_path / "nowhere"))


def test_errors_name_the_fix(seed):
    model = _model("llama", seed)
    with pytest.raises(ConfigError, match="recipes/seer_distill.py"):
        attn_patch.apply(model, "seer")
    with pytest.raises(ConfigError, match="one of density, threshold and top_p, not density and threshold"):
        attn_patch.apply(model, "seer", gates="untrained", density=0.2, threshold=0.01)
    with pytest.raises(ConfigError, match="top_p is a probability mass"):
        attn_patch.apply(model, "seer", gates="untrained", top_p=1.5)
    with pytest.raises(ConfigError, match="block_size must be"):
        attn_patch.apply(model, "seer", gates="untrained", block_size=48)
    windowed = build("mistral").to(DEVICE)  # sliding window 6: shorter than any call seer runs sparse
    with pytest.raises(UnsupportedModelError, match="sliding_window = None"):
        attn_patch.apply(windowed, "seer", **SMALL)
    assert attn_patch.patch_state(windowed) is None


@pytest.mark.parametrize("family,overrides", [
    ("mistral", dict(sliding_window=32)),
    ("qwen2", dict(layer_types=["full_attention", "sliding_attention"], sliding_window=32)),
])
def test_a_sliding_window_is_refused_at_apply_when_every_sparse_call_would_exceed_it(family, overrides, seed):
    """A window shorter than min_length (or a block) fails every sparse call: apply() says so. A longer
    window refuses only the inputs longer than it, at the forward (the config cannot tell those)."""
    model = _model(family, seed, **overrides)
    with pytest.raises(UnsupportedModelError, match="sliding window of 32 tokens.*at least 64 keys"):
        attn_patch.apply(model, "seer", gates="untrained", block_size=16, min_length=64)
    with pytest.raises(UnsupportedModelError, match="sliding window of 32 tokens.*at least 64 keys"):
        attn_patch.apply(model, "seer", gates="untrained", block_size=64, min_length=0)
    with attn_patch.patched(model, "seer", **SMALL), torch.no_grad():
        model(torch.randint(1, 96, (1, 32), device=DEVICE))
        assert attn_patch.stats(model)["layers"][1]["sparse_calls"] == 1
        with pytest.raises(UnsupportedModelError, match="window 32.*over 40 keys"):
            model(torch.randint(1, 96, (1, 40), device=DEVICE))
