"""Plain PyTorch attention: the reference every Triton kernel in this package is tested against.

Shapes follow transformers' attention interface: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] with
Hq a multiple of Hkv (GQA heads are broadcast, never repeated in memory).

Masking is described the same way the kernels take it:
- ``causal``: query row i sits at key position ``i + q_offset`` and sees keys ``<=`` that position.
  ``q_offset`` defaults to ``Tk - Tq`` (queries are the last Tq positions, as with a KV cache).
- ``window``: sliding window size W; a query sees keys ``> pos - W`` (W keys including itself),
  the convention of transformers' ``sliding_window_overlay``.
- ``key_padding``: bool (or integer 1/0, transformers' convention) [B, Tk], True = real token.
- ``dense_mask``: bool [B|1, Hq|1, Tq, Tk], True = attend (any other pattern). Float masks are
  refused: SDPA reads a float mask as additive (0 = attend, -inf = blocked), the opposite of a
  bool one, so ``mask == 0`` converts it.
- ``block_indices`` / ``block_counts``: block-sparse selection, per (batch, head, query block)
  the first ``count`` entries of a sorted list of key-block indices (block size ``block_size``).

A query row with no visible key returns zeros and log-sum-exp ``-inf``. ``check_inputs`` is the
argument contract the reference and the kernels share.
"""
from __future__ import annotations

import numbers

import torch


def _whole_number(value, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int (numpy integers too); a tensor would need a host sync to read."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int, got {value!r} ({type(value).__name__})"
                        + ("; read it once with int(...) before the attention call"
                           if isinstance(value, torch.Tensor) else ""))
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_inputs(q, k, v, *, q_offset=None, window=None, key_padding=None, dense_mask=None) -> tuple[int, int | None]:
    """Check the arguments ``attention_reference`` and the kernels share; return (q_offset, window)
    as ints. Looks at shapes and dtypes only, never at values (that would sync with the host)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D [batch, heads, seq, head_dim], got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (b, hq, tq, d), (bk, hkv, tk, dk) = q.shape, k.shape
    if bk != b or dk != d:
        raise ValueError(f"q {tuple(q.shape)} and k/v {tuple(k.shape)} must agree in batch and head_dim")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    q_offset = tk - tq if q_offset is None else _whole_number(q_offset, "q_offset")
    window = None if window is None else _whole_number(window, "window (keys a query sees, itself included)", 1)
    if key_padding is not None:
        if tuple(key_padding.shape) != (b, tk):
            raise ValueError(f"key_padding must be [batch, kv_len] = {(b, tk)}, got {tuple(key_padding.shape)}")
        if key_padding.dtype.is_floating_point or key_padding.dtype.is_complex:
            raise TypeError(f"key_padding must be bool (True = real token) or integer 1/0, got {key_padding.dtype}; "
                            "convert a 1/0 float mask with `mask > 0` and an additive 0/-inf one with `mask == 0`")
    if dense_mask is not None:
        shape = tuple(dense_mask.shape)
        if len(shape) != 4 or shape[0] not in (1, b) or shape[1] not in (1, hq) or shape[2:] != (tq, tk):
            raise ValueError(f"dense_mask must be [B|1, H|1, q_len, kv_len] with B={b}, H={hq}, q_len={tq}, "
                             f"kv_len={tk}; got shape {shape}")
        if dense_mask.dtype != torch.bool:
            raise TypeError(f"dense_mask must be a bool mask (True = attend), got {dense_mask.dtype}; an additive "
                            "float mask (0 = attend, -inf or a large negative value = blocked, SDPA's convention) "
                            "converts with `dense_mask == 0`, a 1/0 keep-mask with `dense_mask.bool()`")
    return q_offset, window


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
    q_offset, window = check_inputs(q, k, v, q_offset=q_offset, window=window, key_padding=key_padding,
                                    dense_mask=dense_mask)
    bsz, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale

    extra = None  # masks beyond the position rules, broadcastable to [B, Hq, Tq, Tk]
    if key_padding is not None:
        extra = key_padding.bool()[:, None, None, :]
    if dense_mask is not None:
        extra = dense_mask if extra is None else extra & dense_mask
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


__all__ = ["attention_reference", "check_inputs", "visibility_mask", "block_sparse_to_dense", "attention_flops",
           "head_routed_reference", "s2_bounds", "s2_mask_reference"]


def s2_bounds(batch: int, length: int, group: int, *, position_ids: torch.Tensor | None = None,
              documents: torch.Tensor | None = None, key_padding: torch.Tensor | None = None,
              device=None) -> torch.Tensor:
    """``bounds`` [B, 6, length] int32 for groups of ``group`` tokens (shifted by group // 2), the
    input of ``kernels.s2.s2_attention``; rows: group start (unshifted / shifted heads), one past
    the group end (unshifted / shifted), document start, one past the document end.

    Documents: a new one starts where ``position_ids`` [B|1, length] does not go up by one
    (packed sequences, as transformers detects them), where the ``documents`` ids [B, length]
    change (transformers' packed-sequence mask) and where ``key_padding`` switches between
    padding and tokens, so left or right padding is a document of its own and groups and sinks
    count from the first real token. Groups are counted from each document's start."""
    if group < 1:
        raise ValueError(f"group must be >= 1 token, got {group}")
    if device is None:
        given = [x for x in (position_ids, documents, key_padding) if x is not None]
        device = given[0].device if given else "cpu"
    t = torch.arange(length, device=device)
    new = torch.zeros((batch, length), dtype=torch.bool, device=device)
    new[:, 0] = True
    if position_ids is not None:
        pos = position_ids.to(device).expand(batch, length)
        new[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    if documents is not None:
        docs = documents.to(device).expand(batch, length)
        new[:, 1:] |= docs[:, 1:] != docs[:, :-1]
    if key_padding is not None:
        kp = key_padding.to(device).bool().expand(batch, length)
        new[:, 1:] |= kp[:, 1:] != kp[:, :-1]
    start = torch.where(new, t, 0).cummax(dim=1).values
    last = torch.ones_like(new)
    last[:, :-1] = new[:, 1:]
    end = torch.where(last, t + 1, length).flip(1).cummin(dim=1).values.flip(1)
    p = t - start
    half = group // 2
    g0 = start + (p // group) * group
    g1 = torch.where(p < half, start, start + half + ((p - half).clamp(min=0) // group) * group)
    hi0 = torch.minimum(g0 + group, end)
    hi1 = torch.minimum(torch.where(p < half, start + half, g1 + group), end)
    return torch.stack([g0, g1, hi0, hi1, start, end], dim=1).to(torch.int32).contiguous()


def s2_mask_reference(num_heads: int, length: int, group: int, *, shift_from: int, sink: int = 0,
                      position_ids=None, documents=None, key_padding=None, batch: int = 1, q_offset: int = 0,
                      queries: int | None = None, device=None) -> torch.Tensor:
    """The S2-Attn pattern of ``kernels.s2`` (which never builds it) as a bool mask [B, Hq, Tq, T]
    (True = attend) over ``length`` key positions, for the ``queries`` query rows at key positions
    ``q_offset`` .. ``q_offset + queries - 1`` (default: every position).

    Documents restart where position ids do not step by one, where the document ids change and
    where the padding mask switches; inside a document, unshifted heads use groups [0, g), [g, 2g),
    ... and heads >= ``shift_from`` use [0, g/2), [g/2, 3g/2), ...; a query sees the earlier-or-same
    tokens of its own group and the first ``sink`` tokens of its document that are not after it.
    Built from ``s2_bounds`` with tensor ops (no host sync)."""
    queries = length - q_offset if queries is None else queries
    if q_offset < 0 or queries < 0 or q_offset + queries > length:
        raise ValueError(f"S2 queries must sit at key positions: q_offset {q_offset}, {queries} queries, "
                         f"{length} keys")
    if sink < 0:
        raise ValueError(f"sink must be >= 0 tokens, got {sink}")
    bounds = s2_bounds(batch, length, group, position_ids=position_ids, documents=documents,
                       key_padding=key_padding, device=device).long()
    rows = bounds[:, :, q_offset:q_offset + queries, None]  # [B, 6, Tq, 1]
    qpos = torch.arange(q_offset, q_offset + queries, device=bounds.device)[:, None]
    kpos = torch.arange(length, device=bounds.device)
    group_start, doc_start = rows[:, 0:2], rows[:, 4:5]  # [B, 2 (unshifted, shifted), Tq, 1], [B, 1, Tq, 1]
    in_group = kpos >= group_start
    is_sink = (kpos >= doc_start) & (kpos < doc_start + sink)
    keep = (kpos <= qpos) & (in_group | is_sink)  # [B, 2, Tq, T]
    shifted = (torch.arange(num_heads, device=bounds.device) >= shift_from).long()
    return keep[:, shifted]


def _s2_mask_loop(num_heads: int, length: int, group: int, *, shift_from: int, sink: int = 0,
                  position_ids=None, documents=None, key_padding=None, batch: int = 1) -> torch.Tensor:
    """The S2-Attn pattern as an explicit bool mask [B, Hq, T, T] (True = attend), written token by
    token from the definition: the oracle ``s2_mask_reference`` is tested against (slow, O(H T^2)
    Python steps; for tests only).

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
