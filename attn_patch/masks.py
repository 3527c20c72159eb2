"""The mask side of the integration.

transformers builds one mask per forward through the mask function registered under the same name
as the attention function. Ours returns a compact ``AttentionMask`` (causal alignment, sliding
window, [B, Tk] key padding) instead of a [B, 1, Tq, Tk] tensor, so the kernels never read an
O(N^2) mask for the patterns models actually use. Patterns it does not recognise (packed
sequences, model-specific overlays) are materialised with transformers' own ``sdpa_mask`` and
handed to the kernel as a dense mask: slower, never wrong.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import masking_utils as mu

from .errors import UnsupportedModelError

logger = logging.getLogger("attn_patch")


@dataclass
class AttentionMask:
    """What the registered attention function receives as ``attention_mask``.

    A query row i sits at key position ``i + q_offset``. ``key_padding`` is bool [B, Tk]
    (True = real token); ``dense`` is bool [B, 1, Tq, Tk] (True = attend) for other patterns.
    """

    causal: bool
    q_offset: int
    window: int | None = None
    key_padding: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    # generate() with a compileable cache (StaticCache) builds the mask ahead of the forward, calls
    # .contiguous() on it and hands it back to the model, whose mask creation asks for .ndim; the
    # mask function then returns it unchanged.
    ndim = 4

    def contiguous(self) -> "AttentionMask":
        return self

    def kernel_args(self) -> dict:
        return dict(causal=self.causal, q_offset=self.q_offset, window=self.window,
                    key_padding=self.key_padding, dense_mask=self.dense)


def _closure_values(fn) -> list:
    return [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]


def recognise(mask_function) -> tuple[bool, int | None] | None:
    """(causal, window) for the patterns we run without a dense mask, else None."""
    if mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    # sliding_window_causal_mask_function(w) == and_masks(sliding_window_overlay(w), causal_mask_function)
    if getattr(mask_function, "__qualname__", "").startswith("and_masks."):
        parts = next((v for v in _closure_values(mask_function) if isinstance(v, tuple)), ())
        if len(parts) == 2 and mu.causal_mask_function in parts:
            overlay = parts[0] if parts[1] is mu.causal_mask_function else parts[1]
            if getattr(overlay, "__qualname__", "").startswith("sliding_window_overlay."):
                window = next((v for v in _closure_values(overlay) if isinstance(v, int)), None)
                if window is not None:
                    return True, window
    return None


_warned_dense = set()


def mask_function(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=mu.causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> AttentionMask:
    """Registered with transformers' AttentionMaskInterface under each patched model's name."""
    if isinstance(attention_mask, AttentionMask):  # prepared by generate() for this very step
        return attention_mask
    q_offset = int(q_offset)  # a StaticCache hands a 0-d tensor
    kv_offset = int(kv_offset)
    pattern = recognise(mask_function)
    if pattern is None:
        key = getattr(mask_function, "__qualname__", repr(mask_function))
        if key not in _warned_dense:
            _warned_dense.add(key)
            logger.warning("attn_patch: mask pattern %s is not one of causal / sliding / bidirectional; "
                           "using a dense [B, 1, Tq, Tk] mask (correct, slower)", key)
        dense = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                             allow_is_causal_skip=False, allow_is_bidirectional_skip=False, allow_torch_fix=False,
                             use_vmap=kwargs.get("use_vmap", False), device=kwargs.get("device", "cpu"))
        return AttentionMask(causal=False, q_offset=q_offset - kv_offset, dense=dense)
    causal, window = pattern
    local_size = kwargs.get("local_size")
    if local_size is not None and window is not None and local_size != window:
        raise UnsupportedModelError(f"sliding window mismatch: mask says {window}, config says {local_size}")
    key_padding = None
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
        padding = padding[:, kv_offset:kv_offset + kv_length]
        if not bool(padding.all()):
            key_padding = padding
    return AttentionMask(causal=causal, q_offset=q_offset - kv_offset, window=window, key_padding=key_padding)


def as_attention_mask(attention_mask, module, query: torch.Tensor, key: torch.Tensor, is_causal=None) -> AttentionMask:
    """Normalise whatever reached the attention function into an AttentionMask."""
    if isinstance(attention_mask, AttentionMask):
        return attention_mask
    tq, tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        return AttentionMask(causal=causal, q_offset=tk - tq)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # a prepared 4-D mask passed by the caller: boolean, or additive 0 / -inf
        mask = attention_mask[:, :, :, :tk]
        if mask.dtype != torch.bool:
            allowed = mask == 0
            blocked = mask <= torch.finfo(mask.dtype).min / 2
            if not bool((allowed | blocked).all()):
                raise UnsupportedModelError(
                    "a 4-D float attention mask with bias values (not just 0 / -inf) was passed; attn_patch's "
                    "kernels take boolean masks. Pass a 2-D padding mask or a boolean 4-D mask instead"
                )
            mask = allowed
        return AttentionMask(causal=False, q_offset=tk - tq, dense=mask)
    raise UnsupportedModelError(
        f"unexpected attention_mask of type {type(attention_mask).__name__} "
        f"(shape {tuple(getattr(attention_mask, 'shape', ()))}); was the model's attention implementation "
        "changed after attn_patch.apply()? Call attn_patch.remove(model) and apply again"
    )
