"""seer refuses bad inputs at load / apply with errors naming the file and the fix: damaged gate and
calibration files, out-of-range options, models the shipped gates were not trained for; paths and
numpy scalars are accepted where they mean the same."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEVICE
from tiny_models import build

import attn_patch
from attn_patch.errors import ConfigError
from attn_patch.seer import SeerConfig, gates_of, save_gates
from attn_patch.seer import weights as W

UNTRAINED = dict(gates="untrained", block_size=16, min_length=0)


@pytest.fixture
def gate_dir(tmp_path, seed):
    torch.manual_seed(seed)
    model = build("llama").to(DEVICE)
    attn_patch.apply(model, "seer", **UNTRAINED)
    path = save_gates(model, tmp_path / "gates")
    attn_patch.remove(model)
    return model, path


def _edit_config(path: Path, edit) -> None:
    meta = json.loads((path / "config.json").read_text())
    edit(meta)
    (path / "config.json").write_text(json.dumps(meta))


def _poison(key: str, value: float):
    def damage(path: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = {k: v.clone() for k, v in load_file(str(path / "gates.safetensors")).items()}
        tensors[key].view(-1)[3] = value
        save_file(tensors, str(path / "gates.safetensors"))
    return damage


def _truncate(path: Path) -> None:
    data = (path / "gates.safetensors").read_bytes()
    (path / "gates.safetensors").write_bytes(data[:len(data) // 2])


def _pickle(path: Path) -> None:
    from safetensors.torch import load_file

    tensors = {k: v.clone() for k, v in load_file(str(path / "gates.safetensors")).items()}
    torch.save(tensors, str(path / "gates.pt"))
    (path / "gates.pt").replace(path / "gates.safetensors")


def _set_gate(key, value):
    return lambda path: _edit_config(path, lambda meta: meta["gate"].__setitem__(key, value))


GATE_DAMAGE = {
    "nan weight": (_poison("layers.0.k_weight", float("nan")), "gates.safetensors", "NaN or inf"),
    "inf weight": (_poison("layers.1.k_weight", float("-inf")), "gates.safetensors", "NaN or inf"),
    "truncated": (_truncate, "gates.safetensors", "not a readable safetensors"),
    "garbage": (lambda p: (p / "gates.safetensors").write_bytes(b"not a tensor file " * 20), "gates.safetensors",
                "not a readable safetensors"),
    "pickle": (_pickle, "gates.safetensors", "not a readable safetensors"),
    "invalid json": (lambda p: (p / "config.json").write_text('{"format": '), "config.json", "not a readable"),
    "json list": (lambda p: (p / "config.json").write_text("[1, 2]"), "config.json", "JSON is a list"),
    "no gate settings": (lambda p: _edit_config(p, lambda m: m.pop("gate")), "config.json", "lacks its gate"),
    "gate settings a list": (lambda p: _edit_config(p, lambda m: m.__setitem__("gate", [16])), "config.json",
                             "lacks its gate"),
    "missing gate key": (lambda p: _edit_config(p, lambda m: m["gate"].pop("gate_dim")), "config.json",
                         "lacks gate settings \\['gate_dim'\\]"),
    "block_size a string": (_set_gate("block_size", "16"), "config.json", "block_size='16' must be one of"),
    "block_size 256": (_set_gate("block_size", 256), "config.json", "block_size=256 must be one of"),
    "gate_dim 0": (_set_gate("gate_dim", 0), "config.json", "gate_dim=0 must be a positive integer"),
    "q_proj a string": (_set_gate("q_proj", "no"), "config.json", "q_proj='no' must be true or false"),
    "selection unknown": (_set_gate("selection", "row"), "config.json", "selection='row' must be"),
    "rope_theta a string": (_set_gate("rope_theta", "1e4"), "config.json", "rope_theta='1e4' must be"),
    "no model": (lambda p: _edit_config(p, lambda m: m.pop("model")), "config.json", "lacks the model"),
    "model a string": (lambda p: _edit_config(p, lambda m: m.__setitem__("model", "llama")), "config.json",
                       "lacks the model"),
}


@pytest.mark.parametrize("damage", list(GATE_DAMAGE))
def test_a_damaged_gate_set_is_refused_naming_the_file_and_the_fix(gate_dir, damage):
    model, path = gate_dir
    edit, name, what = GATE_DAMAGE[damage]
    edit(path)
    with pytest.raises(ConfigError, match=what) as err:
        attn_patch.apply(model, "seer", gates=path, min_length=0)
    assert str(path / name) in str(err.value) and "save_gates" in str(err.value)
    assert attn_patch.patch_state(model) is None and not hasattr(model.model.layers[0].self_attn, "seer_gate")


def _calibration(layers=2, units=6, densities=(0.25, 0.5, 1.0), layer_densities=None) -> dict:
    steps = len(densities)
    kept = [[[round((j + 1) / steps, 6) for j in range(steps)] for _ in range(units)] for _ in range(layers)]
    cal = {"selection": "head", "block_size": 16, "keep_sink": True, "keep_diagonal": True,
           "densities": list(densities), "cost": list(densities), "kept": kept}
    if layer_densities is not None:
        cal["layer_loss"] = {"densities": list(layer_densities), "base_loss": 4.0,
                             "delta": [[0.1 * (i + 1) / (j + 1) for j in range(len(layer_densities))]
                                       for i in range(layers)]}
    return cal


def _set(key, value):
    def edit(cal):
        cal[key] = value
    return edit


CALIBRATION_DAMAGE = {
    "invalid json": ("text", '{"format": "attn_patch.seer_calibration", ', "not a readable seer calibration"),
    "json list": ("text", "[]", "JSON is a list"),
    "no kept": ("edit", lambda cal: cal.pop("kept"), "'kept' must hold"),
    "ragged kept": ("edit", lambda cal: cal["kept"][1].pop(), "'kept' must hold"),
    "NaN kept": ("edit", lambda cal: cal["kept"][0][2].__setitem__(1, float("nan")), "'kept' must hold"),
    "kept above one": ("edit", lambda cal: cal["kept"][0][2].__setitem__(1, 1.5), "'kept' must hold"),
    "densities falling": ("edit", _set("densities", [0.5, 0.25, 1.0]), "'densities'"),
    "densities strings": ("edit", _set("densities", ["0.25", "0.5", "1"]), "'densities'"),
    "cost too short": ("edit", _set("cost", [0.25, 0.5]), "'cost' must be 3"),
    "keep_sink a string": ("edit", _set("keep_sink", "yes"), "'keep_sink' is 'yes'"),
    "selection unknown": ("edit", _set("selection", "row"), "'selection' is 'row'"),
    "layer_loss short": ("edit", lambda cal: cal["layer_loss"]["delta"].pop(), "'delta' row"),
    "layer_loss densities": ("edit", lambda cal: cal["layer_loss"].__setitem__("densities", [0.5, 1.0]),
                             "'layer_loss' must hold 'densities'"),
}


@pytest.mark.parametrize("damage", list(CALIBRATION_DAMAGE))
def test_a_damaged_calibration_is_refused_naming_the_file_and_the_fix(gate_dir, damage):
    model, path = gate_dir
    written = W.save_calibration(_calibration(layer_densities=(0.3, 0.6)), path)
    attn_patch.apply(model, "seer", gates=path, density=0.5, min_length=0)  # the undamaged file loads
    attn_patch.remove(model)
    kind, change, what = CALIBRATION_DAMAGE[damage]
    if kind == "text":
        written.write_text(change)
    else:
        cal = json.loads(written.read_text())
        change(cal)
        written.write_text(json.dumps(cal))
    with pytest.raises(ConfigError, match=what) as err:
        attn_patch.apply(model, "seer", gates=path, density=0.5, min_length=0)
    assert str(written) in str(err.value) and "allocation='uniform'" in str(err.value)
    assert attn_patch.patch_state(model) is None


def test_paths_and_numpy_scalars_are_accepted(gate_dir, tmp_path):
    """pathlib.Path for gates, calibration and the save functions; numpy scalars and ints for numbers."""
    model, path = gate_dir
    W.save_calibration(_calibration(), Path(path))
    shutil.copy(path / "calibration.json", tmp_path / "elsewhere.json")
    with attn_patch.patched(model, "seer", gates=Path(path), density=np.float32(0.5), min_length=np.int64(0),
                            allocation="calibrated", calibration=tmp_path / "elsewhere.json"):
        state = attn_patch.patch_state(model)
        assert state.config.gates == str(path) and state.config.calibration == str(tmp_path / "elsewhere.json")
        assert type(state.config.density) is float and state.config.density == 0.5
        assert len(gates_of(model)[0].budget) == 6
        again = save_gates(model, tmp_path / "again")
    assert (again / "gates.safetensors").is_file()
    with attn_patch.patched(model, "seer", gates=again, density=1, allocation="uniform", min_length=0):
        with torch.no_grad():
            model(torch.randint(1, 96, (1, 32), device=DEVICE))
        assert attn_patch.stats(model)["density"] == 1.0
    with pytest.raises(ConfigError, match="must be a path"):
        W.save_calibration(_calibration(), 3)


@pytest.mark.parametrize("options,what", [
    (dict(gate_dim=0, **UNTRAINED), "gate_dim is the gate's projection width.*got 0"),
    (dict(gate_dim=-8, q_proj=True, **UNTRAINED), "gate_dim is the gate's projection width.*got -8"),
    (dict(threshold=0.1, allocation="heads", **UNTRAINED), "allocation='heads' .* does not combine with threshold"),
    (dict(top_p=0.5, allocation="uniform", **UNTRAINED), "allocation='uniform' .* does not combine with threshold"),
    (dict(density=0.0, **UNTRAINED), "density must be in \\(0, 1\\]"),
    (dict(density=1.5, **UNTRAINED), "density must be in \\(0, 1\\]"),
    (dict(density=float("nan"), **UNTRAINED), "finite"),
    (dict(threshold=float("inf"), **UNTRAINED), "finite"),
    (dict(threshold=1.5, **UNTRAINED), "threshold is a gate probability"),
    (dict(top_p=0.0, **UNTRAINED), "top_p is a probability mass"),
    (dict(threshold=0.1, min_density=1.5, **UNTRAINED), "min_density"),
    (dict(gates="untrained", block_size=24), "block_size must be 16, 32, 64 or 128"),
    (dict(gates="untrained", block_size=256), "block_size must be 16, 32, 64 or 128"),
    (dict(gates="untrained", min_length=-1), "min_length must be >= 0"),
    (dict(dense_last=-1, **UNTRAINED), "dense_last must be >= 0"),
])
def test_out_of_range_options_are_refused(options, what):
    with pytest.raises(ConfigError, match=what):
        SeerConfig(**options)


def test_calibrate_refuses_bad_layer_densities_before_running(gate_dir):
    model, path = gate_dir
    ids = torch.randint(1, 96, (1, 64), device=DEVICE)
    with attn_patch.patched(model, "seer", gates=path, min_length=0, allocation="uniform"):
        for levels in ((0.1, float("nan"), 0.5), (0.5, 0.3), (0.2, 1.0)):
            with pytest.raises(ConfigError, match="layer densities must increase"):
                attn_patch.seer.calibrate(model, [ids], layer_densities=levels)
        assert attn_patch.stats(model)["layers"][0]["dense_calls"] == 0  # nothing ran


def _smollm2_shaped(**overrides):
    """A random-weight model of SmolLM2-135M-Instruct's architecture (30 layers, 135M parameters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                rope_theta=100000.0, tie_word_embeddings=True)
    arch.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**arch)).eval()
    model.config._name_or_path = "/models/SmolLM2-135M-Instruct"  # the name alone no longer counts
    return model


def test_a_model_of_smollm2s_shape_with_other_weights_gets_no_shipped_gates():
    """Recognised by architecture and weights, not by name: a random model of the same architecture,
    even named like SmolLM2, gets the "no gates" error (it used to get the trained gates)."""
    model = _smollm2_shaped()
    with pytest.raises(ConfigError, match="no SeerAttention gates for this model.*recipes/seer_distill.py"):
        attn_patch.apply(model, "seer")
    assert attn_patch.patch_state(model) is None

    from attn_patch.seer.method import model_architecture, model_fingerprint

    assert model_architecture(model) == W.SHIPPED_MODELS["smollm2-135m-instruct"]["architecture"]
    fp32 = model_fingerprint(model)  # the model's own fingerprint, whatever its dtype
    bf16 = model_fingerprint(model.to(torch.bfloat16))
    assert all(abs(a - b) <= 1e-3 * abs(a) for a, b in zip(fp32, bf16))
