"""Saving and loading SeerAttention gates: one safetensors file plus a JSON config per gate set.

A gate set is ``<dir>/gates.safetensors`` (tensors ``layers.<i>.k_weight`` and, with a query
projection, ``layers.<i>.q_weight``) and ``<dir>/config.json``::

    {"format": "attn_patch.seer_gates", "version": 1,
     "gate": {"block_size": 64, "gate_dim": 64, "q_proj": false, "k_proj_per": "head",
              "selection": "head", "rope_theta": 100000.0},
     "model": {"model_type": "llama", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3,
               "head_dim": 64, "name": "..."},
     "training": {...}}

Loading is strict: the model's shape must match "model", the gate settings must have their types
and ranges, and the tensors must be exactly the expected keys with the expected shapes, all finite;
a damaged file is an error naming it.

An optional ``<dir>/calibration.json`` (written by ``attn_patch.seer.calibrate``) holds, per layer
and selection unit (query head, or KV head for group selection), the fraction of the attention mass
that top-k selection by these gates keeps at each of a grid of densities; ``allocation="calibrated"``
turns it into per-head densities. It records the SHA-256 of the gates file it was measured with,
and loading it beside other gates is an error.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from ..errors import ConfigError
from ..files import as_path, read_json, read_tensors
from .gate import SeerGate

FORMAT = "attn_patch.seer_gates"
VERSION = 1
WEIGHTS_NAME = "gates.safetensors"
CONFIG_NAME = "config.json"
CALIBRATION_NAME = "calibration.json"
CALIBRATION_FORMAT = "attn_patch.seer_calibration"
GATE_KEYS = ("block_size", "gate_dim", "q_proj", "k_proj_per", "selection", "rope_theta")
# gate sets shipped inside the package, by the model they were trained for
SHIPPED_DIR = Path(__file__).resolve().parent / "gates"
SHIPPED = {"smollm2-135m-instruct": SHIPPED_DIR / "smollm2-135m-instruct"}
# how apply() recognises the model a shipped set belongs to, however it was loaded (load_default_model,
# from_pretrained(folder, gguf_file=...), a bf16/fp16 copy, on any device): its architecture
# (method.model_architecture) and a fingerprint of its weights (method.model_fingerprint, measured on
# the embedded SmolLM2-135M-Instruct Q4_1 GGUF), equal within FINGERPRINT_RTOL. A model of the same
# shape with other weights (a random init: std 0.02, row norms ~0.5) is far outside it.
SHIPPED_MODELS = {
    "smollm2-135m-instruct": {
        "architecture": {"model_type": "llama", "num_layers": 30, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                         "hidden_size": 576, "vocab_size": 49152, "rope_theta": 100000.0},
        "fingerprint": [0.13589, 2.9318, 2.9360, 2.5393, 3.0024, 0.28395, 9.7382, 9.2183, 6.8776, 5.8259],
    },
}
FINGERPRINT_RTOL = 0.02  # a bf16 or fp16 cast moves these by < 1e-3 (relative)
BLOCK_SIZES = (16, 32, 64, 128)  # what the block-sparse kernels take
GATES_FIX = ("pass gates= a gate set written by recipes/seer_distill.py or attn_patch.seer.save_gates (a directory "
             f"holding {WEIGHTS_NAME} and {CONFIG_NAME}), or save the gates again")
CALIBRATION_FIX = ("measure it again (attn_patch.seer.calibrate(model, batches, save=GATES_DIR), or "
                   "scripts/calibrate_seer.py), or pass allocation='uniform'")


def gate_config(gate: SeerGate) -> dict:
    return {"block_size": gate.block_size, "gate_dim": gate.gate_dim, "q_proj": gate.q_weight is not None,
            "k_proj_per": gate.k_proj_per, "selection": gate.selection, "rope_theta": gate.rope_theta}


def _paths(path) -> tuple[Path, Path]:
    path = as_path(path, "the gates path")
    if path.suffix == ".safetensors":
        return path, path.with_name(CONFIG_NAME)
    return path / WEIGHTS_NAME, path / CONFIG_NAME


def save_gates(gates: list[SeerGate], path, model_info: dict, training: dict | None = None,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write ``gates`` (one per layer, in layer order) to the directory ``path``; returns it."""
    from safetensors.torch import save_file

    weights, config = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, gate in enumerate(gates):
        tensors[f"layers.{i}.k_weight"] = gate.k_weight.detach().to("cpu", dtype).contiguous()
        if gate.q_weight is not None:
            tensors[f"layers.{i}.q_weight"] = gate.q_weight.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(weights), metadata={"format": FORMAT})
    meta = {"format": FORMAT, "version": VERSION, "gate": gate_config(gates[0]), "model": model_info,
            "training": training or {}}
    config.write_text(json.dumps(meta, indent=2) + "\n")
    return weights.parent


def read_gates(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of a saved gate set; clear errors for a wrong or incomplete path, a
    damaged file and NaN or inf weights."""
    weights, config = _paths(path)
    if not weights.is_file():
        raise ConfigError(f"no gate weights at {weights}: pass gates= a directory holding {WEIGHTS_NAME} and "
                          f"{CONFIG_NAME} (as written by recipes/seer_distill.py), or the .safetensors file itself")
    if not config.is_file():
        raise ConfigError(f"{weights} has no {CONFIG_NAME} beside it; the gate configuration (block size, "
                          "projections, model shape) is needed to load it")
    meta = read_json(config, "gate config", GATES_FIX)
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{config} is not an attn_patch gate config (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ConfigError(f"{config} has gate format version {meta.get('version')}; this attn_patch reads "
                          f"version {VERSION}")
    _check_gate_config(meta, config)
    return meta, read_tensors(weights, "gate file", GATES_FIX)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_GATE_RULES = {
    "block_size": (lambda v: _count(v) and v in BLOCK_SIZES, f"one of {', '.join(map(str, BLOCK_SIZES))}"),
    "gate_dim": (_count, "a positive integer"),
    "q_proj": (lambda v: isinstance(v, bool), "true or false"),
    "k_proj_per": (lambda v: v in ("head", "group"), "'head' or 'group'"),
    "selection": (lambda v: v in ("head", "group"), "'head' or 'group'"),
    "rope_theta": (lambda v: v is None or _number(v) and v > 0, "a positive number or null"),
}


def _check_gate_config(meta: dict, where: Path) -> None:
    gate = meta.get("gate")
    if not isinstance(gate, dict):
        raise ConfigError(f"{where} lacks its gate settings (\"gate\": {{...}} with {', '.join(GATE_KEYS)}); "
                          f"{GATES_FIX}")
    missing = [k for k in GATE_KEYS if k not in gate]
    if missing:
        raise ConfigError(f"{where} lacks gate settings {missing}; {GATES_FIX}")
    for key, (ok, what) in _GATE_RULES.items():
        if not ok(gate[key]):
            raise ConfigError(f"{where}: gate setting {key}={gate[key]!r} must be {what}; {GATES_FIX}")
    if not isinstance(meta.get("model"), dict):
        raise ConfigError(f"{where} lacks the model the gates were trained for (\"model\": {{model_type, "
                          f"num_layers, num_heads, num_kv_heads, head_dim}}); {GATES_FIX}")


def check_model_info(meta: dict, model_info: dict, where) -> None:
    saved = meta.get("model", {})
    diffs = [f"{k}: gates {saved.get(k)!r}, model {v!r}" for k, v in model_info.items()
             if k != "name" and saved.get(k) != v]
    if diffs:
        raise ConfigError(f"the gates at {where} were trained for another model shape ({'; '.join(diffs)}); "
                          "train gates for this model with recipes/seer_distill.py")


def load_state(gates: list[SeerGate], tensors: dict[str, torch.Tensor], where) -> None:
    """Copy ``tensors`` into ``gates``; any missing, unexpected or mis-shaped key is an error."""
    expected = {}
    for i, gate in enumerate(gates):
        expected[f"layers.{i}.k_weight"] = gate.k_weight
        if gate.q_weight is not None:
            expected[f"layers.{i}.q_weight"] = gate.q_weight
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"gate weights at {where} do not match the gates: missing {missing[:4]}"
                          f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                          f"{'...' if len(unexpected) > 4 else ''}")
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ConfigError(f"gate weight {key} at {where} has shape {tuple(tensors[key].shape)}, the gate "
                              f"expects {tuple(param.shape)}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.device, param.dtype))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_calibration(calibration: dict, gates_path) -> Path:
    """Write ``calibration`` (from ``attn_patch.seer.calibrate``) beside the gates at ``gates_path``,
    tied to that gates file by its SHA-256; returns the file written."""
    weights, _ = _paths(gates_path)
    if not weights.is_file():
        raise ConfigError(f"no gate weights at {weights}: save the gates first (attn_patch.seer.save_gates), the "
                          "calibration is tied to that file")
    out = calibration_file(weights)
    data = {"format": CALIBRATION_FORMAT, "version": 1, "gates_sha256": file_sha256(weights), **calibration}
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def calibration_file(gates_path) -> Path:
    """Where the calibration of the gates at ``gates_path`` lives."""
    return _paths(gates_path)[0].with_name(CALIBRATION_NAME)


def read_calibration(path, gates_path) -> dict:
    """The calibration at ``path`` (a calibration.json, or a gate directory holding one), checked to
    belong to the gates file at ``gates_path`` and to hold well-formed curves."""
    path = as_path(path, "the calibration path")
    if path.is_dir() or path.suffix == ".safetensors":
        path = calibration_file(path)
    if not path.is_file():
        raise ConfigError(f"allocation='calibrated' needs a calibration of the gates, and there is none at {path}: "
                          "measure one with attn_patch.seer.calibrate(model, batches, save=GATES_DIR) (or "
                          "recipes/seer_distill.py --calibrate-windows N), or use allocation='uniform'")
    data = read_json(path, "seer calibration", CALIBRATION_FIX)
    if data.get("format") != CALIBRATION_FORMAT or data.get("version") != 1:
        raise ConfigError(f"{path} is not an attn_patch seer calibration (version 1)")
    weights, _ = _paths(gates_path)
    if data.get("gates_sha256") != file_sha256(weights):
        raise ConfigError(f"the calibration at {path} was measured with other gates than {weights}; calibrate "
                          "these gates again (attn_patch.seer.calibrate)")
    problem = _calibration_problem(data)
    if problem:
        raise ConfigError(f"{path} is not a usable calibration: {problem}; {CALIBRATION_FIX}")
    return data


def _numbers(value, length: int | None = None) -> bool:
    """A list of finite numbers (of ``length`` items when given)."""
    return isinstance(value, list) and all(map(_number, value)) and (length is None or len(value) == length)


def _densities(values, strict: bool = True) -> bool:
    """Finite numbers within (0, 1], increasing (non-decreasing unless ``strict``)."""
    return _numbers(values) and bool(values) and 0 < values[0] and values[-1] <= 1 and all(
        b > a if strict else b >= a for a, b in zip(values, values[1:]))


def _calibration_problem(data: dict) -> str | None:
    """What makes ``data`` unusable for allocation='calibrated', or None."""
    if data.get("selection") not in ("head", "group"):
        return f"'selection' is {data.get('selection')!r}, not 'head' or 'group'"
    for key in ("keep_sink", "keep_diagonal"):
        if not isinstance(data.get(key), bool):
            return f"{key!r} is {data.get(key)!r}, not true or false"
    dens, cost = data.get("densities"), data.get("cost")
    if not _densities(dens):
        return f"'densities' ({dens!r}) must be numbers increasing within (0, 1]"
    if not (_densities(cost, strict=False) and len(cost) == len(dens)):
        return f"'cost' must be {len(dens)} non-decreasing numbers within (0, 1], one per density"
    kept = data.get("kept")
    units = len(kept[0]) if isinstance(kept, list) and kept and isinstance(kept[0], list) else 0
    if not units or any(not isinstance(layer, list) or len(layer) != units or not all(
            _numbers(unit, len(dens)) and all(0 <= x <= 1 for x in unit) for unit in layer) for layer in kept):
        return (f"'kept' must hold, for every layer, the same number of selection units, each {len(dens)} fractions "
                "within [0, 1] (one per density)")
    probe = data.get("layer_loss")
    if probe is None:
        return None
    levels = probe.get("densities") if isinstance(probe, dict) else None
    if not (_densities(levels) and levels[-1] < 1):
        return "'layer_loss' must hold 'densities' increasing within (0, 1)"
    delta = probe.get("delta")
    if not (isinstance(delta, list) and len(delta) == len(kept) and all(_numbers(row, len(levels)) for row in delta)):
        return f"'layer_loss' must hold a 'delta' row of {len(levels)} numbers for each of the {len(kept)} layers"
    return None
