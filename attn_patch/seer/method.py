"""Method "seer": SeerAttention's learned block-sparse prefill.

Per attention layer a ``SeerGate`` (attached to the attention module as ``seer_gate``) scores key
blocks for each query block from the layer's pre-RoPE queries and keys; the best blocks go to the
block-sparse kernel as compact index lists. Per call:

- prefill (at least one block of queries, at least ``min_length`` keys): gate -> selection ->
  block-sparse attention. The gate pools q/k straight from the tensors the model attends with
  (undoing RoPE on the fly with the model's own rotary embedding), so no model code is hooked.
  A chunk on top of a KV cache is scored against every cached key block; a chunk that starts
  inside a block gets a partial first query block.
- decoding and short inputs: dense (the fused kernel, split-K for decoding), counted as dense
  calls in ``stats``.
- ``distill=True``: the exact dense output (the teacher) plus the ground truth of the block
  distribution; the KL between it and the gate is kept for ``distill_losses(model)`` (used by
  recipes/seer_distill.py). Only the gates receive gradients.

Gates come from ``gates=PATH`` (written by the recipe), from the set shipped for the embedded
SmolLM2 when ``gates`` is left out (the model recognised by its architecture and weights, however it
was loaded), or fresh (``gates="untrained"``) for distillation.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from .. import backend as _backend
from ..config import MethodConfig, option
from ..errors import ConfigError, PatchStateError, UnsupportedModelError
from ..families import attention_modules, family_of, head_dim
from ..kernels import MAX_HEAD_DIM, attention_reference
from ..masks import as_attention_mask
from ..models import mean_window_loss, run_windows
from ..registry import Method, register_method
from . import weights as W
from .blocks import (allocate_budget, block_mass_reference, ground_truth_reference, kept_mass_curve, layout_ks,
                     select_blocks, selected_blocks, topk_for_layout)
from .gate import SeerGate, pool_gate_inputs

DEFAULT_DENSITY = 0.2
DEFAULT_BLOCK = 64
UNTRAINED = "untrained"
GATE_ATTR = "seer_gate"
# the layer densities whose effect on the loss a calibration measures (one layer sparse at a time)
LAYER_DENSITIES = (0.04, 0.06, 0.08, 0.1, 0.13, 0.17, 0.22, 0.3, 0.4, 0.5, 0.7, 0.9)
# the densities a calibration measures the kept attention mass at (allocation="calibrated" picks
# each head's density among them): fine steps where budgets are tight
CALIBRATION_DENSITIES = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2,
                         0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class SeerConfig(MethodConfig):
    gates: str | None = option(
        None,
        "gate weights: a directory (or .safetensors file) written by recipes/seer_distill.py; None: the "
        "gates shipped for the model (the embedded SmolLM2), an error for other models; 'untrained': fresh "
        "gates, for distillation",
    )
    density: float | None = option(
        None,
        f"fraction of the causally visible key blocks each query block keeps (top-k per head); None: "
        f"{DEFAULT_DENSITY} unless a threshold is given",
    )
    threshold: float | None = option(
        None, "keep every key block whose gate probability is >= threshold instead of a fixed density"
    )
    top_p: float | None = option(
        None, "keep per query block the fewest key blocks (sink and diagonal first, then the most probable) "
        "whose gate probabilities sum to top_p: focused rows keep few blocks, diffuse rows many")
    min_density: float | None = option(
        None, "with threshold or top_p: every query block also keeps its top-k key blocks for this density "
        "(a floor: a flat gate distribution still gets blocks beyond the sink and diagonal)")
    oracle: bool = option(
        False, "select from the exact block ground truth (the distillation target) instead of the gate: an "
        "upper bound for what a gate can reach at the same selection rule; runs dense attention first, so "
        "for evaluation only (whole unpadded sequences)")
    allocation: str | None = option(
        None, "with density: 'uniform' keeps the same number of blocks per row for every head (the "
        "reference); 'heads' lets a row's heads share their blocks by gate probability (diffuse heads get "
        "more), same density per layer; 'calibrated' gives every layer and head its own density, from the "
        "gates' calibration (attn_patch.seer.calibrate: the loss each layer adds when sparse, the attention "
        "mass each head keeps), at the same mean density; None: 'calibrated' when the gates have a "
        "calibration.json beside them (the shipped ones do), else 'uniform'",
        choices=(None, "uniform", "heads", "calibrated"))
    calibration: str | None = option(
        None, "with allocation='calibrated': the calibration.json to use (default: the one beside the gates)")
    keep_sink: bool = option(True, "always keep the first key block (attention sink)")
    keep_diagonal: bool = option(True, "always keep the query block's own (diagonal) key block")
    dense_last: int = option(
        64, "the last this many query rows of each prefill call attend to every key (dense; on the split-K "
        "decode kernel when no gradient is needed): the prompt's end (the question) feeds every generated "
        "token, and retrieval at 8k needed a whole 64-row block of it exact; 0 turns it off")
    min_length: int = option(2048, "calls with fewer keys than this run dense attention (at 1k tokens a low density leaves little beyond the sink and diagonal blocks)")
    selection: str | None = option(
        None, "'head': a selection per query head; 'group': one per KV head (its query heads' gate "
        "probabilities averaged); None: as the gates were trained", choices=(None, "head", "group"))
    block_size: int | None = option(
        None, f"tokens per block (16-128, power of two); fixed by trained gates, {DEFAULT_BLOCK} for untrained ones")
    gate_dim: int | None = option(None, "gate projection width (untrained gates; default: the head dim)")
    q_proj: bool | None = option(None, "untrained gates: project pooled queries too (default False, as released)")
    k_proj_per: str | None = option(None, "untrained gates: one key projection per query 'head' (default) or per "
                                    "KV 'group'", choices=(None, "head", "group"))
    distill: bool = option(False, "teacher mode for gate training: dense exact attention, gate KL losses recorded")

    def validate(self) -> None:
        given = [k for k in ("density", "threshold", "top_p") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"give one of density, threshold and top_p, not {' and '.join(given)}")
        if self.min_density is not None and (self.threshold is None and self.top_p is None
                                             or not 0.0 < self.min_density <= 1.0):
            raise ConfigError(f"min_density (got {self.min_density}) is a floor in (0, 1] for threshold or top_p "
                              "selection; with density, raise the density instead")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p is a probability mass in (0, 1], got {self.top_p}")
        if self.allocation is not None and (self.threshold is not None or self.top_p is not None):
            raise ConfigError(f"allocation={self.allocation!r} shares out a density; it does not combine with "
                              "threshold or top_p (they select per row by gate probability): drop allocation, or "
                              "select by density")
        if self.calibration is not None and self.allocation != "calibrated":
            raise ConfigError("calibration= is read by allocation='calibrated' only; add it or drop calibration")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {self.density}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold is a gate probability in [0, 1], got {self.threshold}")
        if self.block_size is not None and (self.block_size not in W.BLOCK_SIZES):
            raise ConfigError(f"block_size must be 16, 32, 64 or 128, got {self.block_size}")
        if self.gate_dim is not None and self.gate_dim < 1:
            raise ConfigError(f"gate_dim is the gate's projection width, a positive number of channels (even, for "
                              f"the gate's block RoPE), got {self.gate_dim}; drop it for the head dim")
        if self.min_length < 0:
            raise ConfigError(f"min_length must be >= 0, got {self.min_length}")
        if self.dense_last < 0:
            raise ConfigError(f"dense_last must be >= 0 query rows, got {self.dense_last}")
        arch = {k: getattr(self, k) for k in ("gate_dim", "q_proj", "k_proj_per") if getattr(self, k) is not None}
        if arch and self.gates != UNTRAINED:
            raise ConfigError(f"{', '.join(arch)} shape untrained gates only (trained gates bring their own); "
                              "drop them or pass gates='untrained'")

    def selection_args(self) -> dict:
        floor = {} if self.min_density is None else {"min_density": self.min_density}
        if self.threshold is not None:
            return {"threshold": self.threshold, **floor}
        if self.top_p is not None:
            return {"top_p": self.top_p, **floor}
        return {"density": DEFAULT_DENSITY if self.density is None else self.density,
                "allocation": self.allocation or "uniform"}


# ------------------------------------------------------------------------------------------------
# the model side
# ------------------------------------------------------------------------------------------------


def model_info(model) -> dict:
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return {"model_type": config.model_type,
            "num_layers": len(attention_modules(model)),
            "num_heads": heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": head_dim(config),
            "name": os.path.basename(str(getattr(config, "_name_or_path", "") or "").rstrip("/"))}


def _rotary(model):
    for m in model.modules():
        if type(m).__name__.endswith("RotaryEmbedding"):
            return m
    return None


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def model_architecture(model) -> dict:
    """What a shipped gate set's model must be, besides its weights (see ``model_fingerprint``)."""
    config = model.config
    info = model_info(model)
    return {**{k: info[k] for k in ("model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim")},
            "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None),
            "vocab_size": getattr(config, "vocab_size", None), "rope_theta": _rope_theta(config)}


FINGERPRINT_ROWS = 4


def model_fingerprint(model) -> list[float] | None:
    """A few statistics of the model's weights that survive casts (bf16/fp16/fp32) and device moves:
    for the token embedding and the first attention layer's first weight matrix, the standard
    deviation of (every n-th of) its rows and the norms of the first of those rows. None where the
    weights cannot be read (meta device, quantised storage)."""
    first = next((p for p in attention_modules(model)[0].parameters() if p.dim() == 2), None)
    stats = []
    for weight in (getattr(model.get_input_embeddings(), "weight", None), first):
        if weight is None or weight.dim() != 2 or not weight.is_floating_point() or weight.is_meta:
            return None
        with torch.no_grad():
            rows = weight.detach()[::max(1, weight.shape[0] // 1024)].double()
            stats += [rows.std(), *rows[:FINGERPRINT_ROWS].norm(dim=1)]
    return torch.stack(stats).cpu().tolist()


def _shipped_for(model) -> str | None:
    """The shipped gate set trained for this very model (by architecture and weights, wherever it was
    loaded from), or None."""
    arch = model_architecture(model)
    for key, known in W.SHIPPED_MODELS.items():
        path = W.SHIPPED[key]
        if arch != known["architecture"] or not (path / W.WEIGHTS_NAME).is_file():
            continue
        got = model_fingerprint(model)
        if got is not None and len(got) == len(known["fingerprint"]) and all(
                math.isclose(a, b, rel_tol=W.FINGERPRINT_RTOL) for a, b in zip(got, known["fingerprint"])):
            return str(path)
    return None


def _resolve_gates(model, config: SeerConfig) -> tuple[str | None, dict | None, dict | None]:
    """(path, saved config, tensors); path None for untrained gates."""
    if config.gates == UNTRAINED:
        return None, None, None
    path = config.gates if config.gates is not None else _shipped_for(model)
    if path is None:
        raise ConfigError(
            f"no SeerAttention gates for this model ({model_info(model)['name'] or model.config.model_type}): "
            "gates ship only for the embedded SmolLM2-135M-Instruct (recognised by its architecture and weights, "
            "however it was loaded). Train them with "
            "`accelerate launch recipes/seer_distill.py --model ...` and pass gates=PATH, or pass "
            "gates='untrained' to start a distillation"
        )
    meta, tensors = W.read_gates(path)
    W.check_model_info(meta, model_info(model), path)
    if config.block_size is not None and config.block_size != meta["gate"]["block_size"]:
        raise ConfigError(f"block_size={config.block_size} but the gates at {path} were trained with block size "
                          f"{meta['gate']['block_size']}; drop block_size or train gates for it")
    return path, meta, tensors


def check_model(model, config: SeerConfig) -> None:
    family_of(model)
    d = head_dim(model.config)
    if not 16 <= d <= MAX_HEAD_DIM:
        raise UnsupportedModelError(f"head_dim {d} is not supported by the block-sparse kernel "
                                    f"(16 <= head_dim <= {MAX_HEAD_DIM})")


def sliding_window(model) -> int | None:
    """The sliding window some of the model's layers attend over, or None (full attention)."""
    config = model.config
    window = getattr(config, "sliding_window", None) if family_of(model).sliding_window else None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return window


def _check_window(model, config: SeerConfig, block_size: int) -> None:
    """seer attends over every causally visible key. A sliding window shorter than the shortest call
    that runs seer's own path (a block of queries and min_length keys; a block when distilling) would
    fail every such call at the forward: refuse it here. Inputs longer than a longer window are only
    known at the forward (``_check_mask``)."""
    window = sliding_window(model)
    shortest = block_size if config.distill else max(block_size, config.min_length)
    if window is not None and window < shortest:
        raise UnsupportedModelError(
            f"this model attends over a sliding window of {window} tokens (config.sliding_window); seer has no "
            f"sliding window, and every call it selects blocks for sees at least {shortest} keys (block size "
            f"{block_size}{'' if config.distill else f', min_length {config.min_length}'}), so each would fail: set "
            "config.sliding_window = None (full attention) before apply, or use method 'flash'")


class SeerRuntime:
    """Per-apply state shared by a model's gates (a plain object: never registered as a module)."""

    def __init__(self, model, config: SeerConfig, block_size: int):
        from ..flash import FlashConfig

        self.config = config
        self.block_size = block_size
        self.rotary = _rotary(model)
        self.dense_config = FlashConfig(backend=config.backend)
        self.losses: list[torch.Tensor] = []
        self.calibrating: dict | None = None  # layer -> [kept mass per unit and density, total mass per unit]
        self.probe: tuple | None = None  # (layer, per-unit densities): that layer sparse, every other dense
        self.allocation: str | None = config.allocation  # resolved by attach
        self._rope_key = None
        self._rope = None
        self.reset_stats()

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) of a patched model starts with no pending distillation losses: they
        hang on the original's autograd graph, which cannot be copied."""
        return {**self.__dict__, "losses": []}

    def reset_stats(self) -> None:
        self.selected: dict[int, torch.Tensor] = {}
        self.visible: dict[int, int] = {}
        self.sparse_calls: dict[int, int] = {}
        self.dense_calls: dict[int, int] = {}

    def rope(self, like: torch.Tensor, position_ids, tq: int, tk: int):
        """The model's cos/sin for every key position [B|1, Tk, R], or (None, None) without RoPE.
        Cached for the forward: every layer gets the same ``position_ids`` object."""
        if self.rotary is None:
            return None, None
        key = (tq, tk, like.device)
        if self._rope_key is not None and self._rope_key[0] is position_ids and self._rope_key[1:] == key:
            return self._rope
        if position_ids is None:
            pos = torch.arange(tk, device=like.device)[None]
        elif tq == tk:
            pos = position_ids
        else:  # cached keys sit right before the chunk's first position
            pos = position_ids[:, :1] - (tk - tq) + torch.arange(tk, device=position_ids.device)
        with torch.no_grad():
            cos, sin = self.rotary(like, pos.to(like.device))
        self._rope_key, self._rope = (position_ids, *key), (cos, sin)
        return cos, sin

    def record(self, layer: int, counts: torch.Tensor | None, visible: int) -> None:
        if counts is None:
            self.dense_calls[layer] = self.dense_calls.get(layer, 0) + 1
            return
        per_head = counts.sum(dim=(0, 2), dtype=torch.float64)
        prev = self.selected.get(layer)
        self.selected[layer] = per_head if prev is None else prev + per_head
        self.visible[layer] = self.visible.get(layer, 0) + visible
        self.sparse_calls[layer] = self.sparse_calls.get(layer, 0) + 1


def _new_gates(model, config: SeerConfig, meta: dict | None) -> list[SeerGate]:
    info = model_info(model)
    if meta is not None:
        g = meta["gate"]
        arch = dict(block_size=g["block_size"], gate_dim=g["gate_dim"], q_proj=g["q_proj"],
                    k_proj_per=g["k_proj_per"], selection=config.selection or g["selection"],
                    rope_theta=g["rope_theta"])
    else:
        arch = dict(block_size=config.block_size or DEFAULT_BLOCK, gate_dim=config.gate_dim,
                    q_proj=bool(config.q_proj), k_proj_per=config.k_proj_per or "head",
                    selection=config.selection or "head",
                    rope_theta=_rope_theta(model.config) if _rotary(model) is not None else None)
    try:
        return [SeerGate(info["num_heads"], info["num_kv_heads"], info["head_dim"], **arch)
                for _ in range(info["num_layers"])]
    except ValueError as exc:
        raise ConfigError(f"cannot build gates for this model: {exc}") from None


def attach(model, config: SeerConfig) -> None:
    path, meta, tensors = _resolve_gates(model, config)
    gates = _new_gates(model, config, meta)
    _check_window(model, config, gates[0].block_size)
    if tensors is not None:
        W.load_state(gates, tensors, path)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    runtime = SeerRuntime(model, config, gates[0].block_size)
    runtime.allocation = _allocation(config, path)
    budget = _budget(config, path, gates) if runtime.allocation == "calibrated" else [None] * len(gates)
    for i, (module, gate) in enumerate(zip(attention_modules(model), gates)):
        if hasattr(module, GATE_ATTR):
            raise PatchStateError(f"attention module {i} already has a {GATE_ATTR!r} attribute")
        gate.to(device)
        gate.layer_index = i
        gate.runtime = runtime
        gate.source = path or UNTRAINED
        gate.budget = budget[i]
        module.add_module(GATE_ATTR, gate)


def _allocation(config: SeerConfig, path: str | None) -> str | None:
    """The allocation this apply runs: as given, or (None) calibrated when selecting by density with
    gates that have a calibration beside them. None for threshold and top_p selection."""
    if config.threshold is not None or config.top_p is not None:
        return None
    if config.allocation is not None:
        return config.allocation
    if path is not None and not config.distill and W.calibration_file(path).is_file():
        return "calibrated"
    return "uniform"


def _budget(config: SeerConfig, path: str | None, gates: list[SeerGate]) -> list[tuple[float, ...]]:
    """Per layer, the density of each selection unit from the gates' calibration."""
    if path is None:
        raise ConfigError("allocation='calibrated' needs trained, calibrated gates; untrained gates have no "
                          "calibration (use allocation='uniform' while distilling)")
    where = config.calibration or path
    cal = W.read_calibration(where, path)
    units = gates[0].num_heads if gates[0].selection == "head" else gates[0].num_kv_heads
    kept = torch.tensor(cal["kept"], dtype=torch.float64)
    want = (len(gates), units, len(cal["densities"]))
    if cal.get("selection") != gates[0].selection or tuple(kept.shape) != want:
        raise ConfigError(f"the calibration at {where} was measured for selection="
                          f"{cal.get('selection')!r} with {tuple(kept.shape)[:2]} (layers, units); these gates select "
                          f"per {gates[0].selection!r} with {want[:2]}: calibrate with the selection you run")
    forced = {k: (cal.get(k), getattr(config, k)) for k in ("keep_sink", "keep_diagonal")
              if cal.get(k) != getattr(config, k)}
    if forced:
        raise ConfigError(f"the calibration at {where} was measured with "
                          f"{', '.join(f'{k}={v[0]}' for k, v in forced.items())}, this apply asks for "
                          f"{', '.join(f'{k}={v[1]}' for k, v in forced.items())}: calibrate with the same forced "
                          "blocks, or use allocation='uniform'")
    target = DEFAULT_DENSITY if config.density is None else config.density
    try:
        return plan_budget(cal, target)
    except ValueError as exc:
        raise ConfigError(f"allocation='calibrated' with the calibration at {where}: {exc}") from None


def calibrated_range(calibration: dict) -> tuple[float, float]:
    """The mean densities a calibration can share out: from every unit at its lowest level (with
    measured layer losses, every layer at the lowest layer density) to every unit at its highest,
    in the densities these levels really select."""
    cost = calibration["cost"]
    probe = calibration.get("layer_loss")
    low = cost[0] if probe is None else max(cost[0], probe["densities"][0])
    return low, cost[-1]


def plan_budget(calibration: dict, density: float) -> list[tuple[float, ...]]:
    """Per layer, the density of each selection unit for a mean ``density``. With the calibration's
    measured loss per layer ("layer_loss"), layers first get the densities that add the least loss in
    total (each layer's loss increase measured alone, summed), then each layer's heads share its
    density by kept attention mass; without it, the heads of all layers share the whole budget by
    kept mass."""
    low, high = calibrated_range(calibration)
    if not low - 1e-9 <= density <= high + 1e-9:
        below = density < low
        if not below:
            why = "every unit at its highest calibrated density"
        elif "layer_loss" in calibration:
            why = "the lowest density its layer losses were measured at"
        else:
            why = "what the forced sink and diagonal blocks alone select at the calibrated length"
        raise ValueError(
            f"density {density} is {'below the lowest' if below else 'above the highest'} mean density the "
            f"calibration offers ({low:.4g} to {high:.4g}; {low if below else high:.4g} is {why}): ask for a density "
            "within that range, pass allocation='uniform' (the same blocks per row for every head, any density), or "
            f"calibrate at {'lower' if below else 'higher'} densities (attn_patch.seer.calibrate(..., densities=..., "
            "layer_densities=...))")
    kept = torch.tensor(calibration["kept"], dtype=torch.float64)
    dens, cost = calibration["densities"], calibration["cost"]
    probe = calibration.get("layer_loss")
    if probe is None:
        return [tuple(float(x) for x in row) for row in allocate_budget(kept, dens, density, cost)]
    levels = list(probe["densities"]) + [1.0]
    gain = -torch.tensor([row + [0.0] for row in probe["delta"]], dtype=torch.float64)  # dense adds no loss
    layers = allocate_budget(gain, levels, density)
    return [tuple(float(x) for x in allocate_budget(kept[i], dens, float(d), cost)) for i, d in enumerate(layers)]


def detach(model) -> None:
    for module in attention_modules(model):
        if GATE_ATTR in module._modules:
            del module._modules[GATE_ATTR]


def gates_of(model) -> list[SeerGate]:
    gates = [getattr(m, GATE_ATTR, None) for m in attention_modules(model)]
    if not gates or any(g is None for g in gates):
        raise PatchStateError("model is not patched with 'seer' (no gates); call attn_patch.apply(model, 'seer')")
    return gates


# ------------------------------------------------------------------------------------------------
# the attention function
# ------------------------------------------------------------------------------------------------


def attention(config: SeerConfig, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if dropout:
        raise ConfigError(f"attention dropout (p={dropout}) is not supported by attn_patch's kernels; set the "
                          "config's attention dropout to 0 or put the model in eval mode")
    gate = getattr(module, GATE_ATTR, None)
    if gate is None:
        raise PatchStateError("this attention module has no SeerAttention gate; was the model patched with "
                              "attn_patch.apply(model, 'seer')?")
    rt: SeerRuntime = gate.runtime
    mask = as_attention_mask(attention_mask, module, query, key, kwargs.get("is_causal"))
    tq, tk = query.shape[2], key.shape[2]
    bs = gate.block_size
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    kernel = _backend.choose(config.backend, query) == "triton"

    if config.distill:
        return _distill(gate, rt, mask, query, key, value, scale, kernel, kwargs.get("position_ids"))
    if rt.calibrating is not None:
        return _calibrate_call(gate, rt, mask, query, key, value, scale, kernel, kwargs.get("position_ids"))
    probe = rt.probe
    if tq < bs or tk < config.min_length or (probe is not None and probe[0] != gate.layer_index):
        from ..flash import attention as dense

        rt.record(gate.layer_index, None, 0)
        return dense(rt.dense_config, module, query, key, value, mask, scaling=scaling, **kwargs)
    _check_mask(mask, tk)

    q_offset = mask.q_offset
    lead = q_offset % bs
    qb, kb = _pooled(rt, gate, query, key, value, mask, kernel, kwargs.get("position_ids"))
    off = q_offset // bs
    oracle = _oracle_probs(mask, query, key, bs, scale, kernel) if config.oracle else None
    chosen = config.selection_args()
    if gate.budget is not None:
        chosen = {"density": gate.budget}
    if probe is not None:
        chosen = {"density": probe[1]}
    idx, cnt = choose_blocks(gate, qb, kb, off, kernel=kernel, keep_sink=config.keep_sink,
                             keep_diagonal=config.keep_diagonal, probs=oracle, **chosen)
    nq, nk = qb.shape[2], kb.shape[2]
    tail = min(config.dense_last, tq)  # query rows that run dense
    split = tq + lead - tail  # rows of the front-padded queries that run sparse
    nqs = -(-split // bs)  # query-block rows with sparse rows
    rt.record(gate.layer_index, _with_dense_rows(cnt, lead, split, tq + lead, bs, off, nk), query.shape[0] * _visible_blocks(nq, nk, off))
    args = dict(causal=True, scale=scale, key_padding=mask.key_padding)
    q_in = torch.nn.functional.pad(query, (0, 0, lead, 0)) if lead else query
    sp = dict(args, block_size=bs, q_offset=q_offset - lead)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if kernel and tail and not grad:
        # inference: the sparse kernel runs every row and the dense rows are overwritten from the
        # split-K decode kernel in chunks of <= 64 rows per KV head (wide over the keys, unlike
        # a prefill launch of a few query rows); no concatenation or extra copy of the output
        from ..kernels.block_sparse import block_sparse_attention
        from ..kernels.flash import DECODE_MAX_ROWS, flash_attention

        o = block_sparse_attention(q_in, key, value, idx, cnt, **sp)[0]
        step = max(1, DECODE_MAX_ROWS // (query.shape[1] // key.shape[1]))
        for r0 in range(tq - tail, tq, step):
            r1 = min(tq, r0 + step)
            o[:, :, lead + r0:lead + r1] = flash_attention(query[:, :, r0:r1], key, value, decode=True,
                                                           **dict(args, q_offset=q_offset + r0))[0]
        return (o[:, :, lead:] if lead else o).transpose(1, 2), None
    parts = []
    if split > lead:
        qs, idx, cnt = q_in[:, :, :split], idx[:, :, :nqs], cnt[:, :, :nqs]
        if kernel:
            from ..kernels.block_sparse import block_sparse_attention

            o = block_sparse_attention(qs, key, value, idx, cnt, **sp)[0]
        else:
            o = attention_reference(qs, key, value, block_indices=idx, block_counts=cnt, **sp)[0]
        parts.append(o[:, :, lead:] if lead else o)
    if tail:
        dp = dict(args, q_offset=q_offset + tq - tail)
        qd = query[:, :, tq - tail:]
        if kernel:
            from ..kernels.flash import flash_attention

            parts.append(flash_attention(qd, key, value, decode=False, **dp)[0])
        else:
            parts.append(attention_reference(qd, key, value, **dp)[0])
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2), None


def _with_dense_rows(cnt: torch.Tensor, lead: int, split: int, end: int, bs: int, off: int, nk: int) -> torch.Tensor:
    """Selected-block counts per query-block row with the dense rows (padded rows [split, end); the
    real rows are [lead, end)) counted as seeing every visible block, pro rata in a mixed block."""
    if split >= end:
        return cnt
    first = split // bs
    nq = cnt.shape[-1]
    starts = torch.arange(first, nq, device=cnt.device, dtype=torch.float64) * bs
    stops = (starts + bs).clamp(max=end)
    real = stops - starts.clamp(min=lead)
    dense = stops - starts.clamp(min=split)
    vis = torch.arange(first, nq, device=cnt.device, dtype=torch.float64).add_(off + 1).clamp_(max=nk)
    frac = dense / real
    rec = cnt.double()
    rec[..., first:] = frac * vis + (1 - frac) * rec[..., first:]
    return rec


@torch.no_grad()
def choose_blocks(gate: SeerGate, qb: torch.Tensor, kb: torch.Tensor, q_block_offset: int, *, kernel: bool,
                  density: float | None = None, threshold: float | None = None, top_p: float | None = None,
                  allocation: str = "uniform", keep_sink: bool = True, keep_diagonal: bool = True,
                  min_density: float | None = None, probs: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate scores -> block index lists. On the kernels, uniform top-k and thresholds (with their
    floor) run as one selection kernel on the raw scores (per-head top-k skips the softmax, which
    keeps the order; thresholds take it inside the kernel); top_p, the 'heads' allocation and the
    CPU path go through ``select_blocks``. ``probs`` [B, Hq, NQB, NKB]
    replaces the gate's (the oracle)."""
    if probs is not None and gate.selection == "group":
        b, hq, nq, nk = probs.shape
        probs = probs.view(b, gate.num_kv_heads, hq // gate.num_kv_heads, nq, nk).mean(dim=2)
    if kernel and allocation == "uniform" and top_p is None:
        from ..kernels.seer_select import topk_block_lists

        nq, nk = qb.shape[2], kb.shape[2]
        scale = None
        if probs is not None:
            scores = probs
        elif gate.selection == "head":
            scores = gate.raw_scores(qb, kb, q_block_offset, fused=True)
            scale = gate.gate_dim ** -0.5
        else:
            scores = gate.probs(gate.score(qb, kb, q_block_offset, fused=True))
        if density is not None:
            if isinstance(density, (int, float)):
                k = topk_for_layout(float(density), nq, nk, q_block_offset)
            else:  # one density per selection unit
                k = [topk_for_layout(float(d), nq, nk, q_block_offset) for d in density]
            return topk_block_lists(scores, k, keep_sink=keep_sink, keep_diagonal=keep_diagonal,
                                    q_block_offset=q_block_offset)
        k = 0 if min_density is None else topk_for_layout(float(min_density), nq, nk, q_block_offset)
        return topk_block_lists(scores, k, keep_sink=keep_sink, keep_diagonal=keep_diagonal,
                                q_block_offset=q_block_offset, threshold=threshold, logit_scale=scale)
    if probs is None:
        probs = gate.probs(gate.score(qb, kb, q_block_offset, fused=kernel))
    return select_blocks(probs, density=density, threshold=threshold, top_p=top_p, allocation=allocation,
                         keep_sink=keep_sink, keep_diagonal=keep_diagonal, q_block_offset=q_block_offset,
                         min_density=min_density)


@functools.lru_cache(maxsize=256)
def _visible_blocks(n_q: int, n_k: int, q_block_offset: int) -> int:
    return sum(min(n_k, i + q_block_offset + 1) for i in range(n_q))


def _check_mask(mask, tk: int) -> None:
    if mask.dense is not None or mask.documents is not None or not mask.causal:
        raise UnsupportedModelError(
            "seer runs causal attention with optional key padding; this call has a custom (packed or "
            "bidirectional) mask. Pass a 2-D padding mask, or use method 'flash' for this model")
    if mask.window is not None and tk > mask.window:
        raise UnsupportedModelError(
            f"sliding-window attention (window {mask.window}) over {tk} keys is not supported by seer; set "
            "config.sliding_window = None (full attention) or use method 'flash'")


def _pooled(rt, gate, query, key, value, mask, kernel: bool, position_ids):
    tq, tk = query.shape[2], key.shape[2]
    bs = gate.block_size
    cos, sin = rt.rope(value, position_ids, tq, tk)
    with torch.no_grad():
        if not kernel:
            return pool_gate_inputs(query, key, bs, mask.q_offset, cos, sin, mask.key_padding)
        from ..kernels.seer_pool import pool_blocks_fused

        cq, sq = (None, None) if cos is None else (cos[:, tk - tq:], sin[:, tk - tq:])
        qb = pool_blocks_fused(query, bs, minmax=False, lead=mask.q_offset % bs, cos=cq, sin=sq)
        kb = pool_blocks_fused(key, bs, minmax=True, cos=cos, sin=sin, key_padding=mask.key_padding)
    return qb, kb


@torch.no_grad()
def _oracle_probs(mask, query, key, bs: int, scale: float, kernel: bool) -> torch.Tensor:
    if query.shape[2] != key.shape[2] or mask.key_padding is not None:
        raise ConfigError("oracle selection needs the exact block map of whole unpadded sequences: call the model "
                          "without a KV cache or padding, or drop oracle=True")
    if kernel:
        from ..kernels.seer_gt import attention_with_block_max

        return attention_with_block_max(query, key, key, block_size=bs, scale=scale, causal=True)[2]  # v unused
    return ground_truth_reference(query, key, block_size=bs, scale=scale)


def _distill(gate, rt, mask, query, key, value, scale, kernel: bool, position_ids):
    tq, tk = query.shape[2], key.shape[2]
    if tq != tk or mask.key_padding is not None or mask.dense is not None or mask.documents is not None or not mask.causal:
        raise ConfigError("gate distillation runs on whole unpadded sequences: call the model with "
                          "use_cache=False and no padding (pack the text to the training length)")
    _check_mask(mask, tk)
    bs = gate.block_size
    with torch.no_grad():
        if kernel:
            from ..kernels.seer_gt import attention_with_block_max

            out, _, gt = attention_with_block_max(query, key, value, block_size=bs, scale=scale, causal=True)
        else:
            out, _ = attention_reference(query, key, value, causal=True, scale=scale)
            gt = ground_truth_reference(query, key, block_size=bs, scale=scale)
    qb, kb = _pooled(rt, gate, query, key, value, mask, kernel, position_ids)
    with torch.enable_grad():
        logits = gate.score(qb, kb, 0)
        rt.losses.append(block_kl(gt, logits))
    return out.transpose(1, 2), None


def _calibrate_call(gate, rt, mask, query, key, value, scale, kernel: bool, position_ids):
    """Calibration: the exact dense output, plus how much attention mass top-k selection by the gate
    keeps at each calibration density, accumulated per layer and selection unit."""
    tq, tk = query.shape[2], key.shape[2]
    if tq != tk or mask.key_padding is not None:
        raise ConfigError("calibration measures whole unpadded sequences: call the model without a KV cache or "
                          "padding (attn_patch.seer.calibrate does)")
    _check_mask(mask, tk)
    with torch.no_grad():
        if kernel:
            from ..kernels.flash import flash_attention

            out = flash_attention(query, key, value, scale=scale, **mask.kernel_args())[0]
        else:
            out = attention_reference(query, key, value, scale=scale, **mask.kernel_args())[0]
        qb, kb = _pooled(rt, gate, query, key, value, mask, kernel, position_ids)
        scores = gate.probs(gate.score(qb, kb, 0, fused=kernel))
        mass = block_mass_reference(query, key, block_size=gate.block_size, scale=scale)
        if gate.selection == "group":
            b, hq, n, _ = mass.shape
            mass = mass.view(b, gate.num_kv_heads, hq // gate.num_kv_heads, n, n).sum(dim=2)
        cfg = rt.config
        dens = rt.calibrating["densities"]
        kept = kept_mass_curve(scores, mass, dens, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal,
                               q_block_offset=0).double()
        total = mass.sum(dim=(0, 2, 3)).double()
    n = qb.shape[2]
    blocks, visible = selected_blocks(layout_ks(dens, n, n, 0, cfg.keep_sink, cfg.keep_diagonal), n, n, 0)
    acc = rt.calibrating.setdefault(gate.layer_index, [0.0, 0.0, 0.0, 0])
    acc[0] = acc[0] + kept
    acc[1] = acc[1] + total
    acc[2] = acc[2] + torch.tensor(blocks, dtype=torch.float64) * query.shape[0]
    acc[3] += visible * query.shape[0]
    return out.transpose(1, 2), None


def block_kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(logits)) per query-block row, averaged over rows, heads and batch."""
    logq = torch.log_softmax(logits, dim=-1)
    pos = target > 0
    terms = torch.where(pos, target * (torch.log(target.clamp_min(1e-30)) - logq), 0.0)
    return terms.sum(dim=-1).mean()


# ------------------------------------------------------------------------------------------------
# public helpers
# ------------------------------------------------------------------------------------------------


def distill_losses(model, clear: bool = True) -> list[torch.Tensor]:
    """The per-layer gate KL losses recorded by the last forward(s) in ``distill`` mode."""
    rt = gates_of(model)[0].runtime
    losses = list(rt.losses)
    if clear:
        rt.losses.clear()
    return losses


def calibrate(model, batches, densities=CALIBRATION_DENSITIES, save=None, source: str | None = None,
              layer_densities=LAYER_DENSITIES) -> dict:
    """Measure, per layer and selection unit (query head; KV head for group selection), the fraction of
    the exact attention mass that top-k selection by the model's gates keeps at each of ``densities``.
    ``allocation="calibrated"`` then shares a mean density out among the heads to keep the most mass:
    a head whose attention sits in few blocks gets few, a diffuse one (or one the gate predicts badly)
    more. The forward runs dense exact attention.

    ``batches``: token id tensors [B, T] (or [T]) of text not used for evaluation, no padding, T at
    least ``min_length`` (the layouts the sparse path sees). ``save``: a gate directory (or gates
    file) to write ``calibration.json`` beside, tied to that gates file. Returns the calibration.

    With ``layer_densities`` (default; empty to skip), it then runs the text once per layer and
    density with only that layer sparse (its heads sharing the density by kept mass) and records
    the mean loss increase over dense ("layer_loss"): layers differ in how much their errors cost
    downstream, which kept mass alone does not see. That is 1 + layers x densities forward passes."""
    gates = gates_of(model)
    rt: SeerRuntime = gates[0].runtime
    if rt.config.distill:
        raise ConfigError("calibrate() runs on a model patched for inference, not distill=True")
    dens = [float(d) for d in densities]
    if not dens or any(not 0.0 < d <= 1.0 for d in dens) or any(b <= a for a, b in zip(dens, dens[1:])):
        raise ConfigError(f"calibration densities must increase within (0, 1], got {dens}")
    levels = [float(d) for d in layer_densities]
    if levels and not (0.0 < levels[0] and levels[-1] < 1.0 and all(b > a for a, b in zip(levels, levels[1:]))):
        raise ConfigError(f"layer densities must increase within (0, 1), got {levels}")
    batches = list(batches)
    rt.calibrating = {"densities": dens}
    try:
        tokens, windows, _ = run_windows(model, batches, min_length=max(rt.config.min_length, gates[0].block_size),
                                         logits_to_keep=1)
        acc = {k: v for k, v in rt.calibrating.items() if k != "densities"}
    finally:
        rt.calibrating = None
    if len(acc) != len(gates):
        raise ConfigError("calibrate(): the forward skipped attention layers; pass token id tensors [B, T] of text")
    kept = [(acc[i][0] / acc[i][1][:, None]).clamp(max=1.0) for i in range(len(gates))]
    cost = acc[0][2] / acc[0][3]  # the same layouts in every layer
    calibration = {"selection": gates[0].selection, "block_size": gates[0].block_size,
                   "keep_sink": rt.config.keep_sink, "keep_diagonal": rt.config.keep_diagonal,
                   "densities": dens, "cost": [round(float(c), 6) for c in cost],
                   "tokens": tokens, "windows": windows, "source": source,
                   "kept": [[[round(float(x), 6) for x in unit] for unit in layer] for layer in kept]}
    if levels:
        calibration["layer_loss"] = _layer_loss(model, batches, calibration, levels)
    if save is not None:
        W.save_calibration(calibration, save)
    return calibration


def _layer_loss(model, batches, calibration: dict, levels: list[float]) -> dict:
    """Mean next-token loss increase over dense attention with one layer sparse at each density."""
    gates = gates_of(model)
    rt: SeerRuntime = gates[0].runtime
    low = calibration["cost"][0]
    # densities below what the forced sink and diagonal blocks already keep at this length select
    # the same blocks as that floor: measured once, at the floor
    levels = sorted({max(d, round(low + 5e-7, 6)) for d in levels})
    kept = torch.tensor(calibration["kept"], dtype=torch.float64)

    delta = []
    try:
        rt.probe = (-1, None)  # every layer dense
        base = mean_window_loss(model, batches)
        for i in range(len(gates)):
            row = []
            for d in levels:
                split = allocate_budget(kept[i], calibration["densities"], d, calibration["cost"])
                rt.probe = (i, tuple(float(x) for x in split))
                row.append(round(mean_window_loss(model, batches) - base, 6))
            delta.append(row)
    finally:
        rt.probe = None
        rt.reset_stats()
    return {"densities": levels, "base_loss": round(base, 6), "delta": delta}


def stats(model, reset: bool = False) -> dict:
    """Achieved block density per layer and head (selected / causally visible key blocks, over all
    sparse calls since apply or the last reset), and how many calls ran sparse and dense."""
    gates = gates_of(model)
    rt = gates[0].runtime
    layers = []
    total_sel = total_vis = 0
    for i in range(len(gates)):
        sel = rt.selected.get(i)
        vis = rt.visible.get(i, 0)
        heads = [] if sel is None else [round(float(x) / vis, 4) for x in sel.double().cpu()]
        if sel is not None:
            total_sel += float(sel.sum())
            total_vis += vis * sel.numel()
        layers.append({"layer": i, "density": round(sum(heads) / len(heads), 4) if heads else None,
                       "heads": heads, "sparse_calls": rt.sparse_calls.get(i, 0),
                       "dense_calls": rt.dense_calls.get(i, 0)})
    out = {"method": "seer", "block_size": rt.block_size, "selection": gates[0].selection,
           "density": round(total_sel / total_vis, 4) if total_vis else None, "layers": layers,
           "config": rt.config.selection_args()}
    if rt.allocation is not None:
        out["config"]["allocation"] = rt.allocation
    if gates[0].budget is not None:
        out["budget"] = [list(g.budget) for g in gates]
    if reset:
        rt.reset_stats()
    return out


def save_gates(model, path, training: dict | None = None, dtype: torch.dtype = torch.float32):
    """Write the model's gates (safetensors + config.json) for ``apply(model, 'seer', gates=path)``."""
    return W.save_gates(gates_of(model), path, model_info(model), training, dtype)


SEER = register_method(Method(
    name="seer",
    summary="SeerAttention: learned per-layer gates pick key blocks; block-sparse prefill, dense decode",
    config_class=SeerConfig,
    attention=attention,
    check_model=check_model,
    attach=attach,
    detach=detach,
))

__all__ = ["SeerConfig", "stats", "distill_losses", "save_gates", "gates_of", "model_info", "block_kl", "calibrate"]
