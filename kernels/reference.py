"""Plain PyTorch attention: the reference every Triton kernel in this package is tested against.

Shapes follow transformers' attention interface: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] with
Hq a multiple of Hkv (GQA heads are broadcast, never repeated in memory).

Masking is described the same way the kernels take it:
- ``causal``: query row i sits at key position ``i + q_offset`` and sees keys ``<=`` that position.
  ``q_offset`` defaults to ``Tk - Tq`` (queries are the last Tq positions, as with a KV cache).
- ``window``: sliding window size W; a query sees keys ``> pos - W`` (W keys including itself),
  the convention of transformers' ``sliding_window_overlay``.
- ``key_padding``: bool [B, Tk], True = real token.
- ``dense_mask``: bool broadcastable to [B, Hq, Tq, Tk], True = attend (any other pattern).
- ``block_indices`` / ``block_counts``: block-sparse selection, per (batch, head, query block)
  the first ``count`` entries of a sorted list of key-block indices (block size ``block_size``).

A query row with no visible key returns zeros and log-sum-exp ``-inf``.
"""
from __future__ import annotations

import torch


def visibility_mask(
    tq: int,
    tk: int,
    *,
    causal: bool,
    q_offset: int | None = None,
    window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Bool [Tq, Tk]: which keys each query row may see from position rules alone."""
    if q_offset is None:
        q_offset = tk - tq
    qpos = torch.arange(tq, device=device)[:, None] + q_offset
    kpos = torch.arange(tk, device=device)[None, :]
    keep = torch.ones(tq, tk, dtype=torch.bool, device=device)
    if causal:
        keep &= kpos <= qpos
    if window is not None:
        keep &= kpos > qpos - window
    return keep


def block_sparse_to_dense(
    block_indices: torch.Tensor,
    block_counts: torch.Tensor,
    tq: int,
    tk: int,
    block_size: int,
) -> torch.Tensor:
    """Expand a compact block list to a bool [B, H, Tq, Tk] token mask."""
    b, h, nqb, _ = block_indices.shape
    nkb = (tk + block_size - 1) // block_size
    slot = torch.arange(block_indices.shape[-1], device=block_indices.device)
    valid = slot[None, None, None, :] < block_counts[..., None]
    blocks = torch.zeros(b, h, nqb, nkb + 1, dtype=torch.bool, device=block_indices.device)
    # invalid slots are routed to a spare column and dropped
    idx = torch.where(valid, block_indices.long(), torch.full_like(block_indices.long(), nkb))
    blocks.scatter_(-1, idx, True)
    blocks = blocks[..., :nkb]
    dense = blocks.repeat_interleave(block_size, dim=2).repeat_interleave(block_size, dim=3)
    return dense[:, :, :tq, :tk]


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | None = None,
    window: int | None = None,
    key_padding: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
    block_indices: torch.Tensor | None = None,
    block_counts: torch.Tensor | None = None,
    block_size: int = 64,
    query_chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in float32. Returns (out [B, Hq, Tq, D] in q's dtype, lse [B, Hq, Tq] fp32).

    Differentiable through autograd. Query rows are processed in chunks of ``query_chunk`` so the
    score matrix never exceeds Hq * query_chunk * Tk floats per batch element (small chunks stay
    in cache on a CPU), and each chunk only looks at the keys its rows can see by position.
    """
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    if q_offset is None:
        q_offset = tk - tq

    extra = None  # masks beyond the position rules, broadcastable to [B, Hq, Tq, Tk]
    if key_padding is not None:
        extra = key_padding.bool()[:, None, None, :]
    if dense_mask is not None:
        extra = dense_mask.bool() if extra is None else extra & dense_mask.bool()
    if block_indices is not None:
        blocks = block_sparse_to_dense(block_indices, block_counts, tq, tk, block_size)
        if blocks.shape[1] not in (1, hq):  # one selection per GQA group (or any divisor of Hq)
            blocks = blocks.repeat_interleave(hq // blocks.shape[1], dim=1)
        extra = blocks if extra is None else extra & blocks

    qf = q.float().reshape(bsz, hkv, group, tq, d)
    kf = k.float()[:, :, None]
    vf = v.float()[:, :, None]
    outs, lses = [], []
    for s in range(0, tq, query_chunk):
        e = min(tq, s + query_chunk)
        # keys any row of this chunk can see by position: a causal chunk stops at its last row's
        # position and a windowed one starts at its first row's window (less work, same result)
        k0 = max(0, s + q_offset - window + 1) if window is not None else 0
        k1 = min(tk, e + q_offset) if causal else tk
        k1 = max(k1, k0)
        qpos = torch.arange(s, e, device=q.device)[:, None] + q_offset
        kpos = torch.arange(k0, k1, device=q.device)[None, :]
        keep = torch.ones(e - s, k1 - k0, dtype=torch.bool, device=q.device)
        if causal:
            keep &= kpos <= qpos
        if window is not None:
            keep &= kpos > qpos - window
        keep = keep[None, None]
        if extra is not None:
            keep = keep & extra[..., s:e, k0:k1] if extra.shape[-2] > 1 else keep & extra[..., k0:k1]
        keep = keep.expand(bsz, hq, e - s, k1 - k0).reshape(bsz, hkv, group, e - s, k1 - k0)
        scores = torch.matmul(qf[..., s:e, :], kf[..., k0:k1, :].transpose(-1, -2)) * scale
        scores = scores.masked_fill(~keep, float("-inf"))
        row_max = scores.amax(dim=-1, keepdim=True).detach() if k1 > k0 else scores.new_full(
            (*scores.shape[:-1], 1), float("-inf"))
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        expd = torch.exp(scores - row_max)
        denom = expd.sum(dim=-1, keepdim=True)
        probs = expd / torch.where(denom > 0, denom, torch.ones_like(denom))
        outs.append(torch.matmul(probs, vf[..., k0:k1, :]))
        lses.append((row_max + torch.log(denom)).squeeze(-1))
    out = torch.cat(outs, dim=-2).reshape(bsz, hq, tq, d).to(q.dtype)
    lse = torch.cat(lses, dim=-1).reshape(bsz, hq, tq)
    return out, lse


def attention_flops(batch: int, heads: int, tq: int, tk: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs of attention (two matmuls), halved for a causal square problem."""
    flops = 4.0 * batch * heads * tq * tk * head_dim
    if causal and tq == tk:
        flops /= 2
    return flops


def head_routed_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_mask: torch.Tensor,
                          **kwargs) -> torch.Tensor:
    """Attention computed for every head, then zeroed where ``head_mask`` (bool [B, Tq, Hq]) is False:
    the contract of ``kernels.moh.head_routed_attention`` (and what the reference MoH code computes).
    Returns out [B, Hq, Tq, D]; keyword arguments are those of ``attention_reference``."""
    out, _ = attention_reference(q, k, v, **kwargs)
    return out * head_mask.transpose(1, 2)[..., None].to(out.dtype)


__all__ = ["attention_reference", "visibility_mask", "block_sparse_to_dense", "attention_flops",
           "head_routed_reference"]


def s2_mask_reference(num_heads: int, length: int, group: int, *, shift_from: int, sink: int = 0,
                      position_ids=None, documents=None, key_padding=None, batch: int = 1) -> torch.Tensor:
    """The S2-Attn pattern as an explicit bool mask [B, Hq, T, T] (True = attend), written token by
    token from the definition, for tests of ``kernels.s2`` (which never builds it).

    Documents restart where position ids do not step by one, where the document ids change and
    where the padding mask switches;
    inside a document, unshifted heads use groups [0, g), [g, 2g), ... and heads >= shift_from use
    [0, g/2), [g/2, 3g/2), ...; a query sees the earlier-or-same tokens of its own group and the
    first ``sink`` tokens of its document that are not after it."""
    pos = None if position_ids is None else position_ids.expand(batch, length).tolist()
    pad = None if key_padding is None else key_padding.bool().expand(batch, length).tolist()
    ids = None if documents is None else documents.expand(batch, length).tolist()
    mask = torch.zeros(batch, num_heads, length, length, dtype=torch.bool)
    half = group // 2
    for b in range(batch):
        doc, start = [], 0
        for t in range(length):
            boundary = t > 0 and ((pos is not None and pos[b][t] != pos[b][t - 1] + 1)
                                  or (ids is not None and ids[b][t] != ids[b][t - 1])
                                  or (pad is not None and pad[b][t] != pad[b][t - 1]))
            if boundary:
                start = t
            doc.append(start)
        for h in range(num_heads):
            for i in range(length):
                for j in range(i + 1):
                    if doc[j] != doc[i]:
                        continue
                    pi, pj = i - doc[i], j - doc[j]
                    if h >= shift_from:
                        gi, gj = (-1 if pi < half else (pi - half) // group), (-1 if pj < half else (pj - half) // group)
                    else:
                        gi, gj = pi // group, pj // group
                    mask[b, h, i, j] = gi == gj or pj < sink
    return mask
