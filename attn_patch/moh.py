"""Method "moh": Mixture-of-Head attention. Each token uses a subset of the query heads, and only
the selected (token, head) pairs are computed (kernels/moh.py); all KV heads are kept.

Per token: ``shared`` query heads are always on and ``top_k`` of the remaining (routed) heads are
picked by a router attached to each attention module as ``moh_router``. The shared heads are the
first ones until ``calibrate(model, batches)`` ranks each layer's heads on text and shares the most
important (and gives the norm router per-head scales); the recipe calibrates before training.
``allocate(model, batches, active)`` then gives each layer its own number of heads with the same
mean, from per-layer loss probes (layers that need every head keep them all).

- ``router="norm"`` (MoH-LLaMA3's parameter-free router): a routed head's score is the L2 norm of
  the token's query for that head (over the head's calibrated mean norm, 1 before calibration)
  divided by the standard deviation of these norms across the token's heads; softmax over the
  routed heads, top-k. Gates are binary (1 for selected heads), and
  gradients reach the queries through a straight-through estimator (the gate's value is 1, its
  gradient that of the softmax probability). RoPE rotates queries, so their norms are the pre-RoPE
  norms: no hook is needed.
- ``router="learned"`` (the MoH paper): linear maps of the token's hidden state (the attention
  module's input, captured by a forward pre-hook on that module) give routed-head scores,
  shared-head scores and two mixing weights. A selected routed head's gate is its softmax
  probability (not renormalised over the top-k, as in the paper, so a top-1 router still gets a
  gradient), times the number of routed heads; each head's output is scaled by its gate before the
  unchanged o_proj, with the scales chosen so that an untrained router (zero shared and mixing
  weights, near-zero routing weights) multiplies every computed head by ~1, i.e. starts at the
  dense model restricted to the heads.
- ``router="predict"``: a linear map of the token's hidden state (as above) and its query log-norms
  predicts, for every head, the log of the norm of what that head adds to the residual stream (its
  output through its slice of o_proj). ``calibrate()`` fits it by ridge regression to those norms
  measured on text with every head computed (the model distilled into its own router, no training
  loop); per token the heads with the largest predicted contribution are kept, by default all of
  them routed (no shared heads). Gates are binary with straight-through gradients, as for "norm".

With every head active (``active=1``, or a layer that allocate() keeps whole), the norm and predict
routers are not run: the layer is the dense model, in training too (same logits and gradients; the
router gets no gradient and records no balance loss, since nothing it scores changes the output).
A learned router still weights the heads by its gates there (the weights are its model) and learns.

Training: the load-balance loss of each layer (MoH / Switch form, ``E * sum_i P_i f_i`` over the
E routed heads: P_i the mean routing probability, f_i the fraction of the token's top-k picks
that went to head i; 1 when balanced) is recorded in training mode; ``attn_patch.aux_loss(model)``
returns ``balance_weight`` times their sum over layers, to add to the training loss.
``attn_patch.stats(model)`` gives how often each head was picked per layer. Layers that a
gradient-checkpointed model recomputes during backward record neither again.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import backend as _backend
from .config import MethodConfig, option
from .errors import ConfigError, PatchStateError, UnsupportedModelError
from .files import as_path, read_json, read_tensors
from .families import attention_modules, family_of, head_dim, head_output_maps, output_projection
from .kernels import MAX_HEAD_DIM, head_routed_reference
from .masks import as_attention_mask
from .models import mean_window_loss as _window_nll  # allocate()'s probe loss
from .models import run_windows
from .registry import Method, register_method

ROUTER_ATTR = "moh_router"
UNTRAINED = "untrained"
FORMAT = "attn_patch.moh_routers"
VERSION = 3  # 2: head order and norm scales from calibrate(), saved for every router kind; 3: per-layer
# head counts (allocate()) and the learned router's scaled gates
WEIGHTS_NAME = "routers.safetensors"
CONFIG_NAME = "config.json"
DEFAULT_ACTIVE = 0.75
RIDGE = 0.01  # predict routers: ridge penalty of calibrate()'s fit, on standardised features
ROUTE_INIT_STD = 1e-3  # learned routing weights: token-dependent picks, gates within ~3% of 1 at start


@dataclass
class MoHConfig(MethodConfig):
    router: str | None = option(
        None, "'norm': parameter-free (query norm over the per-token std across heads, binary gates, "
        "straight-through gradients; MoH-LLaMA3); 'learned': the paper's linear router on the hidden state "
        "with weighted heads; 'predict': a linear map of the hidden state and query norms, fitted by "
        "attn_patch.moh.calibrate to predict each head's contribution, binary gates. None: 'norm', or what the "
        "routers at `routers` were trained as",
        choices=(None, "norm", "learned", "predict"))
    active: float | None = option(
        None, f"fraction of the query heads each token uses, rounded to whole heads (default {DEFAULT_ACTIVE}); "
        "or give shared and top_k")
    shared: int | None = option(None, "query heads every token uses (the first ones, or the most important after "
                                     "attn_patch.moh.calibrate); default half the active heads (none for "
                                     "router='predict')")
    top_k: int | None = option(None, "routed heads each token picks; default the active heads minus the shared ones")
    balance_weight: float = option(0.01, "weight of the load-balance loss returned by attn_patch.aux_loss(model)")
    routers: str | None = option(
        None, "a directory written by recipes/moh_train.py (router config, and weights for learned routers); "
        "'untrained': fresh learned routers, for training. Learned routers need one of the two")
    decode: str = option(
        "auto", "'auto': calls with few query rows per KV head (decoding) compute every head on the split-K "
        "decode kernel and zero the unselected ones (decoding is bound by reading the KV cache, which every "
        "head needs under GQA); 'routed': always the routed kernel", choices=("auto", "routed"))

    def validate(self) -> None:
        # math.isfinite first: NaN fails every comparison, so a range check alone would let it through
        if self.active is not None and not (math.isfinite(self.active) and 0.0 < self.active <= 1.0):
            raise ConfigError(f"active must be a fraction of the heads in (0, 1], got {self.active}")
        if self.active is not None and self.top_k is not None and self.shared is not None:
            raise ConfigError("give active, or shared and top_k, not all three")
        for name in ("shared", "top_k"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} must be >= 0, got {value}")
        if not (math.isfinite(self.balance_weight) and self.balance_weight >= 0):
            raise ConfigError(f"balance_weight must be a finite number >= 0 (0: no load-balance loss), got "
                              f"{self.balance_weight}")
        if isinstance(self.routers, str) and not self.routers.strip():
            raise ConfigError("routers='' names no directory: pass the directory written by recipes/moh_train.py, "
                              "'untrained', or leave it out")


def head_split(num_heads: int, active: float | None, shared: int | None, top_k: int | None,
               halve: bool = True) -> tuple[int, int]:
    """(shared, top_k) for a model with ``num_heads`` query heads; with only ``active`` given, half the
    active heads are shared (``halve``) or none."""
    for name, value in (("shared", shared), ("top_k", top_k)):
        if value is not None and not 0 <= value <= num_heads:
            raise ConfigError(f"{name}={value} is out of range for a model with {num_heads} query heads (0 to "
                              f"{num_heads})")
    if shared is None or top_k is None:
        active = DEFAULT_ACTIVE if active is None else active
        # half up (not Python's half-to-even): 50% of 9 heads is 5, never fewer heads than asked for at .5
        n_active = int(active * num_heads + 0.5)
        if n_active < 1:
            raise ConfigError(f"active={active} of {num_heads} query heads rounds to no head at all; use active >= "
                              f"{1 / num_heads:.4g} (one head)")
        given = {"shared": shared, "top_k": top_k}
        for name, value in given.items():
            if value is not None and value > n_active:
                raise ConfigError(f"{name}={value} is more than the {n_active} heads per token of active={active} "
                                  f"({num_heads} query heads); lower {name} or raise active")
        if shared is None and top_k is None:
            shared = n_active // 2 if halve else 0
            top_k = n_active - shared
        elif shared is None:
            shared = n_active - top_k
        else:
            top_k = n_active - shared
    if shared < 0 or top_k < 0 or shared + top_k > num_heads:
        raise ConfigError(f"cannot have {shared} shared and {top_k} routed heads per token with {num_heads} query "
                          "heads")
    if top_k == 0 and shared < num_heads:
        raise ConfigError(f"{shared} shared heads and top_k=0 routes nothing (every token uses the same heads); "
                          "raise top_k or active")
    return shared, top_k


# ------------------------------------------------------------------------------------------------
# routers
# ------------------------------------------------------------------------------------------------


class MoHRouter(nn.Module):
    """Picks the heads of each token for one attention layer; see the module docstring."""

    def __init__(self, kind: str, num_heads: int, shared: int, top_k: int, hidden_size: int | None = None,
                 gates: str = "scaled"):
        super().__init__()
        if kind not in ("norm", "learned", "predict"):
            raise ConfigError(f"router must be 'norm', 'learned' or 'predict', got {kind!r}")
        if kind != "norm" and not hidden_size:
            raise ConfigError(f"a {kind} router needs the model's hidden size")
        self.kind, self.num_heads, self.hidden_size = kind, num_heads, hidden_size
        # learned routers: "scaled" (the paper's un-renormalised softmax gates, times the number of routed
        # heads so an untrained router starts at ~1), or "renormalised" over the top-k (routers saved
        # before format version 3; at top_k=1 their routed gate is constant, so no gradient reaches them)
        self.gates = gates
        self.layer_index = 0
        self.runtime = None
        self._hidden = None
        self._calib_x = None  # calibrate(): a predict router's inputs, until the output projection's hook
        self._hook = None
        # which heads are shared (the first `shared` of head_order) and routed (the rest, in the order of
        # the routing logits), and the norm router's per-head query-norm scales: identity and ones until
        # calibrate() measures the model (saved with the routers, not part of the model's state_dict)
        self.register_buffer("head_order", torch.arange(num_heads), persistent=False)
        self.register_buffer("norm_scale", torch.ones(num_heads), persistent=False)
        # predict routers: every head's log contribution from [hidden state, log query norms]; fitted by
        # calibrate() (or loaded), whatever the split, so set_split never rebuilds it
        self.fitted = kind != "predict"
        if kind == "predict":
            self.route = nn.Linear(hidden_size + num_heads, num_heads, device=self.head_order.device)
            nn.init.zeros_(self.route.weight)
            nn.init.zeros_(self.route.bias)
        self.set_split(shared, top_k)

    def set_split(self, shared: int, top_k: int) -> None:
        """Use ``shared`` always-on heads and ``top_k`` routed picks per token. A learned router whose
        sizes change gets fresh (untrained) linear maps."""
        shared, top_k = head_split(self.num_heads, None, shared, top_k)
        resized = (shared, top_k) != (getattr(self, "shared", None), getattr(self, "top_k", None))
        self.shared, self.top_k, self.routed = shared, top_k, self.num_heads - shared
        if self.kind == "learned" and resized:
            device = self.head_order.device
            # a layer that keeps every head routes nothing: no weights (an unused one would stall DDP)
            self.route = nn.Linear(self.hidden_size, self.routed, bias=False, device=device) if top_k else None
            if self.route is not None:
                nn.init.normal_(self.route.weight, std=ROUTE_INIT_STD)
            both = shared and self.routed and top_k
            self.shared_score = nn.Linear(self.hidden_size, shared, bias=False, device=device) if both else None
            self.mix = nn.Linear(self.hidden_size, 2, bias=False, device=device) if both else None
            for lin in (self.shared_score, self.mix):
                if lin is not None:
                    nn.init.zeros_(lin.weight)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.num_heads}, shared={self.shared}, top_k={self.top_k}"

    @property
    def keeps_every_head(self) -> bool:
        """Every token uses every head: all shared, or every routed head picked."""
        return self.shared + self.top_k == self.num_heads

    @property
    def routed_index(self) -> torch.Tensor:
        """The routed heads, in the order of the routing logits and probabilities."""
        return self.head_order[self.shared:]

    def _captured_hidden(self, query: torch.Tensor) -> torch.Tensor:
        """The attention module's input [B, T, hidden] that the forward pre-hook captured for this call."""
        hidden = self._hidden
        if hidden is None or hidden.shape[:2] != (query.shape[0], query.shape[2]):
            raise PatchStateError(f"the {self.kind} MoH router did not see this layer's hidden states (the forward "
                                  "pre-hook on the attention module); was the module called directly?")
        return hidden

    def features(self, query: torch.Tensor) -> torch.Tensor:
        """A predict router's input [B, T, hidden + H] (float32): the hidden state and the log query norms."""
        hidden = self._captured_hidden(query)
        lognorm = query.float().norm(dim=-1).clamp_min(1e-6).log().transpose(1, 2)
        return torch.cat([hidden.float(), lognorm], dim=-1)

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        """Routing logits [B, T, routed] (float32)."""
        if self.kind == "predict":
            if not self.fitted:
                raise PatchStateError("router='predict' is fitted by attn_patch.moh.calibrate(model, batches) "
                                      "(or loaded with routers=PATH); it has not been")
            feats = self.features(query)
            with torch.autocast(feats.device.type, enabled=False):  # rank heads on float32 predictions
                pred = nn.functional.linear(feats, self.route.weight.float(), self.route.bias.float())
            return pred[..., self.routed_index]
        if self.kind == "norm":
            norms = query.float().norm(dim=-1).transpose(1, 2) / self.norm_scale  # [B, T, H]
            std = norms.std(dim=-1, keepdim=True, correction=0) if self.num_heads > 1 else torch.ones_like(norms[..., :1])
            return norms[..., self.routed_index] / (std + 1e-6)
        return self.route(self._captured_hidden(query).to(self.route.weight.dtype)).float()

    def forward(self, query: torch.Tensor):
        """(gates [B, T, H] float32 (0 for unselected heads), head mask bool [B, T, H], routing
        probabilities [B, T, routed] float32 over ``routed_index``, or None when nothing is routed).
        Gates and mask are built with the shared heads first and put back in head order at the end."""
        b, h, t, _ = query.shape
        back = torch.argsort(self.head_order)
        mask = torch.zeros(b, t, h, dtype=torch.bool, device=query.device)
        # nothing routed, or (binary gates) every head on: the router's scores change nothing, so it is not run
        # and its straight-through term, which would still reach the queries, is left out
        if self.routed == 0 or self.top_k == 0 or (self.keeps_every_head and self.kind != "learned"):
            mask[..., :self.shared + self.top_k] = True
            mask = mask[..., back]
            return mask.float(), mask, None
        mask[..., :self.shared] = True
        logits = self.scores(query)
        probs = torch.softmax(logits, dim=-1)
        picked = probs.topk(self.top_k, dim=-1).indices
        hard = torch.zeros_like(probs).scatter_(-1, picked, 1.0)
        mask[..., self.shared:] = hard.bool()
        shared = torch.ones(b, t, self.shared, device=query.device)
        if self.kind in ("norm", "predict"):
            routed = hard + (probs - probs.detach())  # exactly 1 / 0, gradient of the probabilities
        else:
            sel = probs * hard
            if self.gates == "renormalised":
                routed = sel * (self.top_k / sel.sum(-1, keepdim=True).clamp_min(1e-9))
            else:
                routed = sel * self.routed
            if self.shared_score is not None:
                hidden = self._hidden.to(self.route.weight.dtype)
                mix = 2.0 * torch.softmax(self.mix(hidden).float(), dim=-1)
                shared = self.shared * torch.softmax(self.shared_score(hidden).float(), dim=-1) * mix[..., :1]
                routed = routed * mix[..., 1:]
        return torch.cat([shared, routed], dim=-1)[..., back], mask[..., back], probs


def balance_loss(probs: torch.Tensor, mask: torch.Tensor, top_k: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_i P_i f_i over the E routed heads (1 when balanced): P_i the mean routing probability of
    head i, f_i the share of the tokens' top-k picks that went to head i, over ``valid`` tokens."""
    e = probs.shape[-1]
    p = probs.reshape(-1, e)
    f = mask.reshape(-1, e).float()
    if valid is not None:
        keep = valid.reshape(-1)
        p, f = p[keep], f[keep]
    n = max(p.shape[0], 1)
    return e * (p.sum(0) / n * (f.sum(0) / (n * top_k))).sum()


class MoHRuntime:
    """Per-apply state shared by a model's routers (not a module)."""

    def __init__(self, config: MoHConfig):
        from .flash import FlashConfig

        self.config = config
        self.dense_config = FlashConfig(backend=config.backend)
        self.losses: dict[int, torch.Tensor] = {}
        self.ungraded: set[int] = set()  # layers whose last training-mode forward ran without gradients
        self.calibrating: dict[int, torch.Tensor] | None = None  # per layer: summed query norms, during calibrate()
        self.calibration: dict = {}  # what calibrate() measured on (saved with the routers)
        self.reset_stats()

    def __getstate__(self) -> dict:
        """A copy (deepcopy, pickle) of a patched model starts with no pending losses: they hang on the
        original's autograd graph, which cannot be copied."""
        return {**self.__dict__, "losses": {}, "ungraded": set()}

    def reset_stats(self) -> None:
        self.picks: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}

    def record(self, layer: int, mask: torch.Tensor, valid: torch.Tensor | None) -> None:
        with torch.no_grad():
            m = mask if valid is None else mask & valid[..., None]
            picks = m.sum(dim=(0, 1), dtype=torch.float64)
            tokens = (torch.tensor(float(mask.shape[0] * mask.shape[1]), dtype=torch.float64, device=mask.device)
                      if valid is None else valid.sum(dtype=torch.float64))
            self.picks[layer] = picks + self.picks[layer] if layer in self.picks else picks
            self.tokens[layer] = tokens + self.tokens[layer] if layer in self.tokens else tokens


# ------------------------------------------------------------------------------------------------
# the model side
# ------------------------------------------------------------------------------------------------


def model_info(model) -> dict:
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    return {"model_type": config.model_type, "num_layers": len(attention_modules(model)), "num_heads": heads,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads, "head_dim": head_dim(config),
            "hidden_size": getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)}


ROUTERS_FIX = ("pass routers= a directory written by recipes/moh_train.py or attn_patch.moh.save_routers (write it "
               "again if it is damaged), or routers='untrained'")


def _read(path) -> tuple[dict, dict | None]:
    path = as_path(path, "routers")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise ConfigError(f"no MoH router config at {config}: {ROUTERS_FIX}")
    meta = read_json(config, "MoH router config", ROUTERS_FIX)
    version = meta.get("version")
    if meta.get("format") != FORMAT or type(version) is not int or version not in range(1, VERSION + 1):
        raise ConfigError(f"{config} is not an attn_patch MoH router config (format {meta.get('format')!r}, "
                          f"version {version!r}; this attn_patch reads {FORMAT!r} versions 1-{VERSION}); {ROUTERS_FIX}")
    _check_meta(meta, config)
    tensors = None
    if meta["router"]["kind"] == "learned" or version >= 2:
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise ConfigError(f"{config} describes routers whose tensors are not there: {weights} is missing")
        tensors = read_tensors(weights, "MoH router weights file", ROUTERS_FIX)
    return meta, tensors


def _is_count(x) -> bool:
    return type(x) is int and x >= 0


def _check_meta(meta: dict, config: Path) -> None:
    """The keys and types _resolve and attach read from a router config; anything else names the file."""
    router, model, calibration = meta.get("router"), meta.get("model"), meta.get("calibration")
    problem = None
    if not isinstance(router, dict):
        problem = f"its 'router' entry is {router!r}, not an object"
    elif router.get("kind") not in ("norm", "learned", "predict"):
        problem = f"its router kind {router.get('kind')!r} is not 'norm', 'learned' or 'predict'"
    elif not isinstance(model, dict):
        problem = f"its 'model' entry is {model!r}, not an object"
    elif calibration is not None and not isinstance(calibration, dict):
        problem = f"its 'calibration' entry is {calibration!r}, not an object"
    else:
        layers = router.get("layers")
        splits = [[router.get("shared"), router.get("top_k")]] if layers is None else layers
        if not (isinstance(splits, list) and all(isinstance(sp, list) and len(sp) == 2 and all(map(_is_count, sp))
                                                 for sp in splits)):
            problem = ("its head counts (router 'layers': [[shared, top_k], ...] per layer, or 'shared' and 'top_k') "
                       f"are not whole numbers >= 0: layers={layers!r}, shared={router.get('shared')!r}, "
                       f"top_k={router.get('top_k')!r}")
    if problem:
        raise ConfigError(f"{config} is not a valid MoH router config: {problem}; {ROUTERS_FIX}")


def _saved_splits(meta: dict, num_layers: int) -> list[tuple[int, int]]:
    saved = meta["router"]
    layers = saved.get("layers")
    if layers is None:  # versions 1-2: one split for every layer
        return [(saved["shared"], saved["top_k"])] * num_layers
    if len(layers) != num_layers:
        raise ConfigError(f"the router config lists head counts for {len(layers)} layers, the model has {num_layers}")
    return [(int(sh), int(k)) for sh, k in layers]


def _resolve(model, config: MoHConfig) -> tuple[str, list[tuple[int, int]], dict | None, str, dict | None]:
    """(router kind, per-layer (shared, top_k), tensors or None, source, saved config or None)."""
    info = model_info(model)
    n_layers, h = info["num_layers"], info["num_heads"]
    if config.routers not in (None, UNTRAINED):
        meta, tensors = _read(config.routers)
        saved = meta["router"]
        diffs = [f"{k}: routers {meta['model'].get(k)!r}, model {v!r}" for k, v in info.items()
                 if meta["model"].get(k) != v]
        if diffs:
            raise ConfigError(f"the routers at {config.routers} were trained for another model shape "
                              f"({'; '.join(diffs)})")
        splits = _saved_splits(meta, n_layers)
        for sh, k in splits:
            try:
                head_split(h, None, sh, k)
            except ConfigError as err:
                raise ConfigError(f"the routers at {config.routers}: {err}; {ROUTERS_FIX}") from None
        uniform = len(set(splits)) == 1
        if config.router is not None and config.router != saved["kind"]:
            raise ConfigError(f"options router={config.router!r} (routers: {saved['kind']!r}) differ from the "
                              f"routers at {config.routers}; drop them")
        given = {k: v for k, v in (("shared", config.shared), ("top_k", config.top_k), ("active", config.active))
                 if v is not None}
        if given and not uniform:
            raise ConfigError(f"the routers at {config.routers} have per-layer head counts (from "
                              f"attn_patch.moh.allocate); drop {', '.join(f'{k}={v!r}' for k, v in given.items())}")
        saved_split = dict(zip(("shared", "top_k"), splits[0]))
        clash = [f"{k}={v!r} (routers: {saved_split[k]!r})" for k, v in given.items()
                 if k in saved_split and v != saved_split[k]]
        if config.active is not None and sum(head_split(h, config.active, None, None)) != sum(splits[0]):
            clash.append(f"active={config.active} (routers: {sum(splits[0])} of {h} heads)")
        if clash:
            raise ConfigError(f"options {', '.join(clash)} differ from the routers at {config.routers}; drop them")
        return saved["kind"], splits, tensors, str(config.routers), meta
    kind = config.router or "norm"
    split = head_split(h, config.active, config.shared, config.top_k, halve=kind != "predict")
    if kind == "learned" and config.routers is None:
        raise ConfigError("router='learned' needs trained routers: pass routers=PATH (written by "
                          "recipes/moh_train.py), or routers='untrained' to start training fresh ones")
    if kind != "learned" and config.routers == UNTRAINED:
        raise ConfigError(f"routers='untrained' is for learned routers; the {kind!r} router "
                          + ("has no weights" if kind == "norm" else "is fitted by attn_patch.moh.calibrate"))
    source = {"learned": UNTRAINED, "norm": "parameter-free", "predict": "calibrate"}[kind]
    return kind, [split] * n_layers, None, source, None


def check_model(model, config: MoHConfig) -> None:
    family_of(model)
    d = head_dim(model.config)
    if not 8 <= d <= MAX_HEAD_DIM:
        raise UnsupportedModelError(f"head_dim {d} is not supported by the routed kernel (8 <= head_dim <= "
                                    f"{MAX_HEAD_DIM}); keep attn_implementation='sdpa' for this model")
    _resolve(model, config)


def _capture_hidden(module, args, kwargs):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    object.__setattr__(getattr(module, ROUTER_ATTR), "_hidden", hidden)


def attach(model, config: MoHConfig) -> None:
    kind, splits, tensors, source, meta = _resolve(model, config)
    info = model_info(model)
    modules = attention_modules(model)
    # learned routers saved before version 3 renormalised their gates over the top-k
    gates = "scaled" if meta is None else meta["router"].get("gates",
                                                             "renormalised" if meta["version"] < 3 else "scaled")
    if gates not in ("scaled", "renormalised"):
        raise ConfigError(f"the routers at {config.routers} have an unknown gate form {gates!r}")
    routers = [MoHRouter(kind, info["num_heads"], sh, k, info["hidden_size"], gates=gates) for sh, k in splits]
    if tensors is not None:
        _load_state(routers, tensors, config.routers, meta["version"])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    runtime = MoHRuntime(config)
    runtime.calibration = (meta or {}).get("calibration") or {}
    for i, (module, router) in enumerate(zip(modules, routers)):
        if hasattr(module, ROUTER_ATTR):
            raise PatchStateError(f"attention module {i} already has a {ROUTER_ATTR!r} attribute")
        router.to(device)
        router.layer_index, router.runtime, router.source = i, runtime, source
        module.add_module(ROUTER_ATTR, router)
        if kind in ("learned", "predict"):
            router._hook = module.register_forward_pre_hook(_capture_hidden, with_kwargs=True)


def detach(model) -> None:
    for module in attention_modules(model):
        router = module._modules.get(ROUTER_ATTR)
        if router is not None:
            if router._hook is not None:
                router._hook.remove()
            del module._modules[ROUTER_ATTR]


def routers_of(model) -> list[MoHRouter]:
    routers = [getattr(m, ROUTER_ATTR, None) for m in attention_modules(model)]
    if not routers or any(r is None for r in routers):
        raise PatchStateError("model is not patched with 'moh' (no routers); call attn_patch.apply(model, 'moh')")
    return routers


# ------------------------------------------------------------------------------------------------
# the attention function
# ------------------------------------------------------------------------------------------------


def _valid_rows(mask, tq: int, tk: int) -> torch.Tensor | None:
    """bool [B, Tq]: query rows that are real tokens (None: all)."""
    if mask.key_padding is None or mask.q_offset < 0 or mask.q_offset + tq > tk:
        return None
    return mask.key_padding[:, mask.q_offset:mask.q_offset + tq]


def attention(config: MoHConfig, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if dropout:
        raise ConfigError(f"attention dropout (p={dropout}) is not supported by attn_patch's kernels; set the "
                          "config's attention dropout to 0 or put the model in eval mode")
    router: MoHRouter = getattr(module, ROUTER_ATTR, None)
    if router is None:
        raise PatchStateError("this attention module has no MoH router; was the model patched with "
                              "attn_patch.apply(model, 'moh')?")
    rt: MoHRuntime = router.runtime
    mask = as_attention_mask(attention_mask, module, query, key, kwargs.get("is_causal"))
    b, hq, tq, _ = query.shape
    tk = key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    valid = _valid_rows(mask, tq, tk)
    # a gradient-checkpointed layer run again during backward: its picks and loss were recorded the first time
    recomputing = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
    if rt.calibrating is not None:  # calibrate(): every head computed, query norms recorded
        if router.kind == "predict":  # the fit's inputs; its targets come from the output projection's hook
            router._calib_x = router.features(query.detach())
        router._hidden = None
        head_mask = torch.ones(b, tq, hq, dtype=torch.bool, device=query.device)
        gates, probs = head_mask.float(), None
        norms = query.detach().float().norm(dim=-1).transpose(1, 2)  # [B, Tq, H]
        if valid is not None:
            norms = norms * valid[..., None]
        rt.calibrating[router.layer_index] = rt.calibrating.get(router.layer_index, 0) + norms.sum((0, 1))
    else:
        gates, head_mask, probs = router(query)
        router._hidden = None
        if not recomputing:
            rt.record(router.layer_index, head_mask, valid)
    if module.training and probs is not None and config.balance_weight > 0 and not router.keeps_every_head:
        _record_loss(rt, router, probs, head_mask, valid, recomputing)

    if _backend.choose(config.backend, query) == "reference":
        out = head_routed_reference(query, key, value, head_mask, scale=scale, **mask.kernel_args())
    else:
        from .kernels.flash import DECODE_MAX_ROWS, flash_attention
        from .kernels.moh import head_routed_attention

        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        decode = (config.decode == "auto" and not needs_grad and (hq // key.shape[1]) * tq <= DECODE_MAX_ROWS
                  and tq < tk and mask.dense is None and mask.documents is None)
        every_head = rt.calibrating is not None or router.keeps_every_head  # e.g. active=1, or allocate()
        if decode:
            out, _ = flash_attention(query, key, value, scale=scale, decode=True, **mask.kernel_args())
            if not every_head:
                out = out * head_mask.transpose(1, 2)[..., None].to(out.dtype)
        elif every_head:
            out, _ = flash_attention(query, key, value, scale=scale, **mask.kernel_args())
        else:
            out, _ = head_routed_attention(query, key, value, head_mask, scale=scale, **mask.kernel_args())
    out = out.transpose(1, 2)  # [B, Tq, Hq, D]
    if router.kind == "learned" or (torch.is_grad_enabled() and gates.requires_grad):
        out = out * gates[..., None].to(out.dtype)
    return out, None


def _record_loss(rt: MoHRuntime, router: MoHRouter, probs, head_mask, valid, recomputing: bool) -> None:
    """Keep the layer's load-balance loss for aux_loss(); a forward without gradients (reentrant
    checkpointing runs it so) has none to keep. A recomputation during backward builds the loss again
    (non-reentrant checkpointing checks that it saves the same tensors) but keeps nothing."""
    i = router.layer_index
    if torch.is_grad_enabled():
        loss = balance_loss(probs, head_mask[..., router.routed_index], router.top_k, valid)
        if not recomputing:
            rt.losses[i] = loss
            rt.ungraded.discard(i)
    elif not recomputing:
        rt.losses.pop(i, None)
        rt.ungraded.add(i)


def calibrate(model, batches, source: str | None = None) -> dict:
    """Measure the model's heads on text and set every router's ``head_order`` and ``norm_scale``.

    ``batches``: token id tensors [B, T] (or [T]) of real text, no padding. Every head is computed; a
    head's importance is the mean norm of what it adds to the residual stream (its output through its
    slice of the output projection). The most important heads become the shared (always on) ones and
    the rest are routed; the norm router divides each head's query norm by that head's mean, so it
    picks heads whose query is large *for that head* rather than the heads with the largest queries.
    On SmolLM2-135M at 75% of the heads it takes the untouched model's held-out perplexity (8k windows)
    from 8.7x the dense model's (the first heads shared) to 1.22x.
    Predict routers are fitted in the same pass: ridge regression of every head's per-token log
    contribution on the router's features (see MoHRouter.features), 1.07x at 7 of 9 heads there.
    Returns (and saves with the routers) the number of tokens and the importances (and, for predict
    routers, each layer's R^2 of the fit as ``fit_r2``)."""
    routers = routers_of(model)
    rt: MoHRuntime = routers[0].runtime
    modules = attention_modules(model)
    h = routers[0].num_heads
    importance = [None] * len(modules)
    hooks = []

    fits = [_RidgeFit() if r.kind == "predict" else None for r in routers]

    def hook(i, gram):
        def f(_, args):
            x = args[0].detach().float()
            x = x.view(*x.shape[:-1], h, -1)  # [B, T, H, D]
            norms = torch.einsum("bthd,hde,bthe->bth", x, gram, x).clamp_min(0).sqrt()
            importance[i] = norms.sum((0, 1)) + (importance[i] if importance[i] is not None else 0)
            if fits[i] is not None:
                feats, routers[i]._calib_x = routers[i]._calib_x, None
                fits[i].add(feats.flatten(0, 1), norms.clamp_min(CONTRIB_FLOOR).log().flatten(0, 1))
        return f

    for i, module in enumerate(modules):
        maps = head_output_maps(module, h).detach().float()
        gram = maps @ maps.transpose(1, 2)  # [H, D, D]: |o_h @ maps[h]|^2 = o_h gram_h o_h
        hooks.append(output_projection(module).register_forward_pre_hook(hook(i, gram)))
    rt.calibrating = {}
    try:
        tokens, n_batches, _ = run_windows(model, batches)
        qsum = rt.calibrating
    finally:
        rt.calibrating = None
        for hk in hooks:
            hk.remove()
    fit_r2 = []
    for i, r in enumerate(routers):
        order = torch.argsort(importance[i].cpu(), descending=True, stable=True)
        r.head_order.copy_(order)
        r.norm_scale.copy_((qsum[i] / tokens).clamp_min(1e-6))
        if fits[i] is not None:
            weight, bias, r2 = fits[i].solve(RIDGE)
            with torch.no_grad():
                r.route.weight.copy_(weight.to(r.route.weight))
                r.route.bias.copy_(bias.to(r.route.bias))
            r.fitted = True
            fit_r2.append(round(r2, 4))
    rt.reset_stats()
    rt.calibration = {"tokens": tokens, "batches": n_batches, "source": source,
                      "importance": [[round(float(v) / tokens, 5) for v in imp] for imp in importance]}
    if fit_r2:  # how much of the per-token log-contribution variance the predict routers explain
        rt.calibration["fit_r2"] = fit_r2
    return rt.calibration


CONTRIB_FLOOR = 1e-4  # predict routers: contributions are fitted as log(max(norm, floor))


class _RidgeFit:
    """Running sums for a least-squares fit of Y [N, H] on X [N, F] (float64), solved as ridge regression
    on standardised features so that one penalty suits features of any scale."""

    def __init__(self):
        self.n, self.sx, self.sy, self.xx, self.xy, self.yy = 0, 0, 0, 0, 0, 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.n += x.shape[0]
        self.sx = self.sx + x.sum(0)
        self.sy = self.sy + y.sum(0)
        self.xx = self.xx + x.T @ x
        self.xy = self.xy + x.T @ y
        self.yy = self.yy + (y * y).sum(0)

    def solve(self, ridge: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(weight [H, F], bias [H], R^2 on the fitted data averaged over the outputs)."""
        if self.n < 2:
            raise ConfigError("calibrate() needs at least two tokens to fit a predict router")
        mx, my = self.sx / self.n, self.sy / self.n
        cov = self.xx / self.n - torch.outer(mx, mx)
        cxy = self.xy / self.n - torch.outer(mx, my)
        std = cov.diagonal().clamp_min(0).sqrt().clamp_min(1e-8)
        corr = cov / torch.outer(std, std)
        ws = torch.linalg.solve(corr + ridge * torch.eye(len(std), dtype=corr.dtype, device=corr.device),
                                cxy / std[:, None])
        w = ws / std[:, None]  # [F, H]
        b = my - mx @ w
        # residual variance of the fit: E[(y - xw - b)^2] from the sums
        var_y = (self.yy / self.n - my * my).clamp_min(1e-12)
        resid = var_y - 2 * (w * cxy).sum(0) + (w * (cov @ w)).sum(0)
        r2 = float((1 - resid / var_y).mean())
        return w.T.float(), b.float(), r2


def _layer_split(num_heads: int, top_k: int | None, heads: int) -> tuple[int, int]:
    """(shared, top_k) of a layer that keeps ``heads`` heads per token: all of them, or top_k routed
    (``top_k`` None: all ``heads`` routed, nothing shared)."""
    if heads >= num_heads:
        return num_heads, 0
    return (0, heads) if top_k is None else (heads - top_k, top_k)


def _default_top_k(routers: list[MoHRouter], top_k: int | None) -> int | None:
    """allocate()'s routed picks per layer: 1 unless given; a predict router routes every kept head
    (None) unless a top_k is given."""
    return top_k if top_k is not None or routers[0].kind == "predict" else 1


def set_layer_heads(model, heads: list[int], top_k: int | None = None) -> None:
    """Per-layer head counts (as allocate() chooses them): layer i keeps ``heads[i]`` heads per token,
    ``top_k`` of them routed, the rest shared (every head when ``heads[i]`` is the number of heads).
    ``top_k`` defaults to 1, or for predict routers to all of the kept heads (none shared)."""
    routers = routers_of(model)
    top_k = _default_top_k(routers, top_k)
    if len(heads) != len(routers):
        raise ConfigError(f"{len(heads)} head counts for {len(routers)} layers")
    for r, a in zip(routers, heads):
        if not max(top_k or 1, 1) <= a <= r.num_heads:
            raise ConfigError(f"layer {r.layer_index}: {a} heads with top_k={top_k} (need top_k <= heads <= "
                              f"{r.num_heads})")
        r.set_split(*_layer_split(r.num_heads, top_k, int(a)))
    routers[0].runtime.reset_stats()


def allocate(model, batches, active: float | None = None, top_k: int | None = None,
             min_heads: int | None = None) -> dict:
    """Give each layer its own number of active heads, with ``active`` (default 0.75) of all the
    model's query heads on average, where dropping heads costs the least.

    Call after calibrate() (the shared heads must be the important ones). ``batches`` as for calibrate.
    Every layer is probed alone: with all other layers computing every head, the layer keeps ``a`` heads
    per token (``a - top_k`` shared, ``top_k`` routed picks; all heads at ``a`` = num_heads; ``top_k``
    defaults to 1, and for predict routers to ``a``: every kept head routed) for each ``a`` from
    ``min_heads`` (default ``max(top_k, 1)``) up, and the rise in the mean NLL on
    ``batches`` is measured. A greedy allocation over these curves (the one seer uses for its per-head
    densities) then hands out the heads, ``round(active * layers * heads)`` in all at most.
    Costs ``layers x (num_heads - min_heads)`` passes over ``batches``.

    Learned routers are rebuilt untrained (the probes change every layer's sizes): allocate before
    training.
    Returns (and saves with the routers) the counts and the probed NLL rises."""
    from .seer.blocks import allocate_budget

    routers = routers_of(model)
    rt: MoHRuntime = routers[0].runtime
    if not rt.calibration:
        raise ConfigError("allocate() probes which heads a layer can drop, so the shared heads must be the "
                          "important ones: call attn_patch.moh.calibrate(model, batches) first")
    h, n_layers = routers[0].num_heads, len(routers)
    active = DEFAULT_ACTIVE if active is None else active
    top_k = _default_top_k(routers, top_k)
    if not 0.0 < active <= 1.0:
        raise ConfigError(f"active must be a fraction of the heads in (0, 1], got {active}")
    if top_k is not None and not 1 <= top_k < h:
        raise ConfigError(f"top_k must be between 1 and {h - 1} (the routed picks per token), got {top_k}")
    low = (top_k or 1) if min_heads is None else min_heads
    if not (top_k or 1) <= low <= h:
        raise ConfigError(f"min_heads must be between top_k={top_k} and {h}, got {min_heads}")
    levels = list(range(low, h + 1))
    total = int(active * n_layers * h + 0.5)
    if total < low * n_layers:
        raise ConfigError(f"active={active} is {total} heads over {n_layers} layers, fewer than min_heads={low} "
                          "per layer: lower min_heads or raise active")

    split = functools.partial(_layer_split, h, top_k)
    for r in routers:
        r.set_split(h, 0)
    base = _window_nll(model, batches)
    rise = torch.zeros(n_layers, len(levels), dtype=torch.float64)
    for i, r in enumerate(routers):
        for j, a in enumerate(levels[:-1]):
            r.set_split(*split(a))
            rise[i, j] = _window_nll(model, batches) - base
        r.set_split(h, 0)
    dens = torch.tensor(levels, dtype=torch.float64) / h
    chosen = allocate_budget(-rise, dens, total / (n_layers * h))
    heads = [int(round(float(d) * h)) for d in chosen]
    set_layer_heads(model, heads, top_k)
    rt.calibration["allocation"] = {
        "active": active, "top_k": top_k, "levels": levels, "heads": heads,
        "mean_active": round(sum(heads) / (n_layers * h), 4), "base_nll": round(base, 5),
        "nll_rise": [[round(float(v), 5) for v in row] for row in rise]}
    return rt.calibration["allocation"]


def aux_loss(model, clear: bool = True) -> torch.Tensor:
    """``balance_weight`` times the sum over layers of the load-balance losses recorded by the last
    training-mode forward (add it to the training loss before backward). A float32 zero (that
    backward() takes) when there is no balance to keep: ``balance_weight=0``, or every head active."""
    routers = routers_of(model)
    rt: MoHRuntime = routers[0].runtime
    if rt.config.balance_weight == 0 or all(r.keeps_every_head for r in routers):
        return torch.zeros((), dtype=torch.float32, device=next(model.parameters()).device, requires_grad=True)
    if rt.ungraded:  # some layers (all, or those a partial checkpointing wraps) have no loss to give
        raise PatchStateError(
            f"no load-balance loss recorded for layer(s) {sorted(rt.ungraded)}: the last training-mode forward ran "
            "them with gradients disabled, so the loss has no graph to backpropagate. Reentrant gradient "
            "checkpointing does this (use_reentrant=True runs each layer's forward under torch.no_grad() and only "
            "re-runs it with gradients inside backward, after aux_loss(model) is needed): enable it with "
            "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}) (or "
            "activation_checkpointing_enable(activation_checkpointing_kwargs=...)), or set balance_weight=0; "
            "outside checkpointing, run the forward without torch.no_grad()")
    if not rt.losses:
        raise PatchStateError("no load-balance losses recorded: aux_loss(model) needs a forward in training mode "
                              "(model.train()) with gradients enabled since the last call")
    total = rt.config.balance_weight * torch.stack([rt.losses[i] for i in sorted(rt.losses)]).sum()
    if clear:
        rt.losses.clear()
    return total


def stats(model, reset: bool = False) -> dict:
    """How often each query head was picked per layer (share of the tokens seen since apply or the last
    reset), each layer's split, and the mean active-head ratio (``shared`` / ``top_k`` at the top
    level are None when the layers differ, after allocate())."""
    routers = routers_of(model)
    rt: MoHRuntime = routers[0].runtime
    layers, total, count = [], 0.0, 0
    for i, r in enumerate(routers):
        picks, tokens = rt.picks.get(i), rt.tokens.get(i)
        n = float(tokens) if tokens is not None else 0.0
        heads = [round(float(x) / n, 4) for x in picks.cpu()] if picks is not None and n else []
        if heads:
            total += sum(heads) / len(heads)
            count += 1
        layers.append({"layer": i, "tokens": int(n), "utilisation": heads,
                       "active": round(sum(heads) / len(heads), 4) if heads else None,
                       "shared": r.shared, "top_k": r.top_k, "shared_heads": r.head_order[:r.shared].tolist()})
    uniform = len({(r.shared, r.top_k) for r in routers}) == 1
    out = {"method": "moh", "router": routers[0].kind, "shared": routers[0].shared if uniform else None,
           "top_k": routers[0].top_k if uniform else None, "num_heads": routers[0].num_heads,
           "heads_per_layer": [r.shared + r.top_k for r in routers],
           "active": round(total / count, 4) if count else None, "layers": layers}
    if reset:
        rt.reset_stats()
    return out


# ------------------------------------------------------------------------------------------------
# saving and loading
# ------------------------------------------------------------------------------------------------


def _expected(routers: list[MoHRouter], buffers: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for i, r in enumerate(routers):
        for name, p in r.named_parameters():
            out[f"layers.{i}.{name}"] = p
        if buffers:
            out[f"layers.{i}.head_order"] = r.head_order
            out[f"layers.{i}.norm_scale"] = r.norm_scale
    return out


def _load_state(routers: list[MoHRouter], tensors: dict[str, torch.Tensor], where, version: int = VERSION) -> None:
    """Copy saved router tensors in; any missing, extra or misshapen tensor is an error. Version 1
    files predate calibration (identity head order, unit norm scales) and hold only learned weights."""
    expected = _expected(routers, buffers=version >= 2)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"router weights at {where} do not match the routers: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}")
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ConfigError(f"router weight {key} at {where} has shape {tuple(tensors[key].shape)}, the router "
                              f"expects {tuple(param.shape)}")
    for i, r in enumerate(routers):
        order = tensors.get(f"layers.{i}.head_order")
        if order is not None and not torch.equal(torch.sort(order).values, torch.arange(r.num_heads)):
            raise ConfigError(f"router {i} at {where}: head_order {order.tolist()} is not a permutation of the "
                              f"{r.num_heads} heads")
        scale = tensors.get(f"layers.{i}.norm_scale")
        if scale is not None and not bool((scale > 0).all()):  # the norm router divides the query norms by it
            raise ConfigError(f"router {i} at {where}: norm_scale {scale.tolist()} must be > 0 (calibrate() measures "
                              f"mean query norms); {ROUTERS_FIX}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(param.device, param.dtype))
    for r in routers:
        r.fitted = True


def save_routers(model, path, training: dict | None = None) -> Path:
    """Write the model's router config (and learned weights) for ``apply(model, 'moh', routers=path)``."""
    routers = routers_of(model)
    path = as_path(path, "save_routers' path")
    path.mkdir(parents=True, exist_ok=True)
    r = routers[0]
    splits = [[x.shared, x.top_k] for x in routers]
    uniform = all(sp == splits[0] for sp in splits)
    meta = {"format": FORMAT, "version": VERSION,
            "router": {"kind": r.kind, "shared": r.shared if uniform else None, "top_k": r.top_k if uniform else None,
                       "num_heads": r.num_heads, "layers": splits, "gates": r.gates},
            "model": model_info(model), "training": training or {}, "calibration": r.runtime.calibration}
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.int64 if k.endswith("head_order") else torch.float32).contiguous()
               for k, v in _expected(routers).items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
    (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return path


MOH = register_method(Method(
    name="moh",
    summary="Mixture-of-Head attention: each token uses a subset of the query heads, only those are computed",
    config_class=MoHConfig,
    attention=attention,
    check_model=check_model,
    attach=attach,
    detach=detach,
))

__all__ = ["MoHConfig", "MoHRouter", "aux_loss", "allocate", "calibrate", "set_layer_heads", "stats", "save_routers",
           "routers_of", "balance_loss", "head_split"]
