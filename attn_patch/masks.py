"""The mask side of the integration.

transformers builds one mask per forward through the mask function registered under the same name
as the attention function. Ours returns a compact ``AttentionMask`` (causal alignment, sliding
window, [B, Tk] key padding) instead of a [B, 1, Tq, Tk] tensor, so the kernels never read an
O(N^2) mask for the patterns models actually use. Packed sequences (transformers' causal mask
and-ed with its packed-sequence overlay) are kept as [B, T] document ids, which the S2 kernel reads
directly and other kernels get as a dense mask built from them. Patterns it does not recognise
(model-specific overlays) are materialised with transformers' own ``sdpa_mask`` and handed to the
kernel as a dense mask: slower, never wrong.
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
    documents: torch.Tensor | None = None  # [B, T] document ids of packed sequences (self-attention)

    # generate() with a compileable cache (StaticCache) builds the mask ahead of the forward, calls
    # .contiguous() on it and hands it back to the model, whose mask creation asks for .ndim; the
    # mask function then returns it unchanged.
    ndim = 4

    def contiguous(self) -> "AttentionMask":
        return self

    def kernel_args(self) -> dict:
        dense = self.dense
        if self.documents is not None and dense is None:  # same document, on top of causal
            docs = self.documents
            dense = (docs[:, None, :, None] == docs[:, None, None, :])[..., -docs.shape[1]:, :]
        return dict(causal=self.causal, q_offset=self.q_offset, window=self.window,
                    key_padding=self.key_padding, dense_mask=dense)


def _closure_values(fn) -> list:
    return [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]


def packed_documents(mask_function) -> torch.Tensor | None:
    """The [B, T] document ids when ``mask_function`` is transformers' causal mask restricted to
    packed sequences (what ``create_causal_mask`` builds when position ids restart): and_masks of
    the packed-sequence overlay and either the causal function or, in newer releases, the causal
    function with positions remapped per sequence (the same pattern: positions step by one inside
    a sequence). Else None."""
    if not getattr(mask_function, "__qualname__", "").startswith("and_masks."):
        return None
    parts = next((v for v in _closure_values(mask_function) if isinstance(v, tuple)), ())
    if len(parts) != 2:
        return None
    overlay = next((p for p in parts if getattr(p, "__qualname__", "").startswith("packed_sequence_mask_function.")),
                   None)
    if overlay is None:
        return None
    other = parts[1] if parts[0] is overlay else parts[0]
    if other is not mu.causal_mask_function:
        if not getattr(other, "__qualname__", "").startswith("remap_positions_for_packed_sequence."):
            return None
        if mu.causal_mask_function not in _closure_values(other):
            return None
    return next((v for v in _closure_values(overlay) if isinstance(v, torch.Tensor)), None)


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
    documents = packed_documents(mask_function) if pattern is None else None
    if documents is not None and q_length == kv_length and kv_offset == 0 and int(q_offset) == 0:
        key_padding = _key_padding(attention_mask, kv_length, kv_offset)
        return AttentionMask(causal=True, q_offset=0, key_padding=key_padding, documents=documents)
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
    key_padding = _key_padding(attention_mask, kv_length, kv_offset)
    return AttentionMask(causal=causal, q_offset=q_offset - kv_offset, window=window, key_padding=key_padding)


def _key_padding(attention_mask, kv_length: int, kv_offset: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    padding = mu.prepare_padding_mask(attention_mask.bool(), kv_length, kv_offset)
    padding = padding[:, kv_offset:kv_offset + kv_length]
    return None if bool(padding.all()) else padding


def as_attention_mask(attention_mask, module, query: torch.Tensor, key: torch.Tensor, is_causal=None) -> AttentionMask:
    """Normalise whatever reached the attention function into an AttentionMask."""
    if isinstance(attention_mask, AttentionMask):
        return attention_mask
    tq, tk = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        return AttentionMask(causal=causal, q_offset=tk - tq)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return AttentionMask(causal=False, q_offset=tk - tq, dense=_prepared_mask(attention_mask[:, :, :, :tk]))
    raise UnsupportedModelError(
        f"unexpected attention_mask of type {type(attention_mask).__name__} "
        f"(shape {tuple(getattr(attention_mask, 'shape', ()))}); was the model's attention implementation "
        "changed after attn_patch.apply()? Call attn_patch.remove(model) and apply again"
    )


def _prepared_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D mask the caller prepared, as the kernels' bool mask (True = attend): bool masks as they
    are, float masks read as SDPA reads them (additive: 0 = attend, -inf or a large negative value =
    blocked). A float mask costs one check of its values per layer (a host sync): pass a bool one
    to avoid it."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.dtype.is_floating_point:
        raise UnsupportedModelError(
            f"a 4-D {mask.dtype} attention mask was passed; pass a bool mask (True = attend; mask.bool() for a "
            "1/0 mask) or SDPA's additive float mask (0 = attend, -inf = blocked)")
    allowed = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2
    if not bool((allowed | blocked).all()):
        raise UnsupportedModelError(
            "a 4-D float attention mask with bias values (not just 0 / -inf) was passed; attn_patch's kernels "
            "take boolean masks. Pass a 2-D padding mask or a boolean 4-D mask instead (a float mask is read as "
            "additive, as SDPA reads it: for a 1/0 keep-mask pass mask.bool())")
    return allowed
