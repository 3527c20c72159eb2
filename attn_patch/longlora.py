"""Method "longlora": LongLoRA's shifted-sparse attention (S2-Attn) for context-extension training.

While the attention module is in training mode, each query attends causally within its group of
``group`` tokens (a fraction of the sequence or a token count); the last half of the query heads
use groups shifted by half a group, so information crosses group boundaries. The semantics are
the leak-free one (kernels/s2.py): no wrap-around, half-size groups at both ends of shifted heads,
ragged last groups, groups and sinks counted per document for padded rows and packed sequences.
In eval mode attention is dense by default (the paper: S2 at test time is worse); ``inference=
"s2"`` keeps the pattern. RoPE is the model's own (with its scaling), applied before attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import backend as _backend
from .config import MethodConfig, option
from .errors import ConfigError, UnsupportedModelError
from .flash import FlashConfig
from .flash import attention as _dense
from .flash import check_model as _check_head_dim
from .kernels import attention_reference, s2_mask_reference
from .masks import as_attention_mask
from .registry import Method, register_method


@dataclass
class LongLoRAConfig(MethodConfig):
    group: float = option(
        0.25, "group size: a fraction of the sequence length if < 1 (LongLoRA: 1/4; at least 2 tokens), else a "
        "number of tokens (at most the sequence length)")
    shift: bool = option(True, "shift the groups of the last half of the query heads by half a group")
    sink: int = option(0, "every query also attends to the first this many tokens of its document "
                          "(SinkLoRA-style, causal: sinks see only what precedes them)")
    inference: str = option(
        "dense", "attention while the model is in eval mode: 'dense' (as LongLoRA evaluates) or 's2' (keep "
        "the shifted-sparse pattern)", choices=("dense", "s2"))

    def validate(self) -> None:
        group = _number(self.group)
        if not (math.isfinite(group) and group > 0):
            raise ConfigError(f"group must be a fraction in (0, 1) or a token count >= 2, got {self.group}")
        if group >= 1 and (group != int(group) or group < 2):
            raise ConfigError(f"a group given in tokens must be a whole number >= 2, got {self.group}")
        if self.sink < 0:
            raise ConfigError(f"sink must be >= 0 tokens, got {self.sink}")

    def group_tokens(self, length: int) -> int:
        """Tokens per group for a sequence of ``length`` tokens (a Python int from shapes: no sync).

        A fraction is rounded to the nearest token count, and is never less than 2 tokens: a fraction
        of a very short sequence (under 2 / group tokens) gives groups of 2, the smallest group whose
        shifted half is not empty. A token count longer than the sequence is a ConfigError: it would
        not give groups of that size (the shifted heads would still split the sequence in two)."""
        group = _number(self.group)
        if group < 1:
            return max(2, round(group * length))
        if group > length:
            raise ConfigError(
                f"longlora group={int(group)} tokens is longer than this sequence of {length} tokens; give the "
                f"group as a fraction of the sequence (e.g. group=0.25) or as a token count <= {length}")
        return int(group)


def _number(value) -> float:
    """A group option as a float (Python and numpy scalars alike)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"group must be a number (a fraction or a token count), got {value!r}") from None


def check_model(model, config: LongLoRAConfig) -> None:
    _check_head_dim(model, config)


def attention(config: LongLoRAConfig, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
              **kwargs):
    if not (module.training or config.inference == "s2"):
        return _dense(FlashConfig(backend=config.backend), module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if dropout:
        raise ConfigError(f"attention dropout (p={dropout}) is not supported by attn_patch's kernels; set the "
                          "config's attention dropout to 0")
    mask = as_attention_mask(attention_mask, module, query, key, kwargs.get("is_causal"))
    if mask.dense is not None or not mask.causal or mask.window is not None:
        raise UnsupportedModelError(
            "longlora runs causal attention with padding or packed documents; this call has a custom, "
            "bidirectional or sliding-window mask. Use a 2-D padding mask / position ids for packing, and "
            "config.sliding_window = None")
    b, hq, tq, _ = query.shape
    tk = key.shape[2]
    group = config.group_tokens(tk)
    shift_from = hq - hq // 2 if config.shift else hq
    if _backend.choose(config.backend, query) == "reference":
        dm = s2_mask_reference(hq, tk, group, shift_from=shift_from, sink=config.sink, documents=mask.documents,
                               key_padding=mask.key_padding, batch=b, q_offset=mask.q_offset, queries=tq,
                               device=query.device)
        out, _ = attention_reference(query, key, value, scale=scaling, causal=True, q_offset=mask.q_offset,
                                     key_padding=mask.key_padding, dense_mask=dm)
        return out.transpose(1, 2), None
    from .kernels.s2 import s2_attention, s2_bounds

    bounds = s2_bounds(b, tk, group, documents=mask.documents, key_padding=mask.key_padding, device=query.device)
    out, _ = s2_attention(query, key, value, bounds, shift_from=shift_from, sink=config.sink, scale=scaling,
                          q_offset=mask.q_offset, key_padding=mask.key_padding)
    return out.transpose(1, 2), None


LONGLORA = register_method(Method(
    name="longlora",
    summary="LongLoRA shifted-sparse attention (S2-Attn) in training, dense in eval (leak-free, packed, padded)",
    config_class=LongLoRAConfig,
    attention=attention,
    check_model=check_model,
))
