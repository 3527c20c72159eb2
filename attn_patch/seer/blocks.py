"""Block-level pieces of SeerAttention: the distillation target (ground truth) and the block selection
that turns gate scores into the compact index lists the block-sparse kernel iterates over."""
from __future__ import annotations

import functools
import math

import torch

from .gate import block_causal_mask


def ground_truth_reference(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float | None = None,
                           q_offset: int | None = None, causal: bool = True) -> torch.Tensor:
    """The gate's training target, in plain PyTorch (the fused kernel is checked against this).

    From the exact attention probabilities P (q, k after RoPE, as the model attends): for each query
    row and key block the largest probability of that row inside the block; then the largest over
    the rows of each query block; then each query-block row normalised to sum to 1.
    Returns [B, Hq, NQB, NKB] fp32. Works one query block at a time (never all of N x N)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    q_offset = tk - tq if q_offset is None else q_offset
    nqb, nkb = -(-tq // block_size), -(-tk // block_size)
    kpad = nkb * block_size - tk
    kf = k.float()[:, :, None]  # [B, Hkv, 1, Tk, D]
    out = q.new_zeros((b, hq, nqb, nkb), dtype=torch.float32)
    kpos = torch.arange(tk, device=q.device)
    for i in range(nqb):
        r0, r1 = i * block_size, min(tq, (i + 1) * block_size)
        qi = q[:, :, r0:r1].float().reshape(b, hkv, group, r1 - r0, d)
        s = torch.matmul(qi, kf.transpose(-1, -2)) * scale  # [B, Hkv, G, rows, Tk]
        if causal:
            qpos = torch.arange(r0, r1, device=q.device)[:, None] + q_offset
            s = s.masked_fill(kpos[None, :] > qpos, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        p = torch.nn.functional.pad(p, (0, kpad)).view(*p.shape[:-1], nkb, block_size)
        out[:, :, i] = p.amax(dim=-1).amax(dim=-2).reshape(b, hq, nkb)
    total = out.sum(dim=-1, keepdim=True)
    return out / torch.where(total > 0, total, torch.ones_like(total))


def topk_for_density(density: float, n_blocks: int) -> int:
    """Blocks per query-block row that give ``density`` over the causal triangle when every row keeps
    the same number (capped by what it can see): k = (1 - sqrt(1 - density)) * n_blocks."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, math.ceil((1.0 - math.sqrt(1.0 - density)) * n_blocks))


@functools.lru_cache(maxsize=256)
def topk_for_layout(density: float, n_q: int, n_k: int, q_block_offset: int) -> int:
    """The same k for every query-block row such that the kept blocks are ``density`` of the
    causally visible ones for this layout (a full square, or a chunk of rows late in a long cache,
    whose rows all see many blocks). Rows that see fewer than k blocks keep all of theirs."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    visible = [min(n_k, i + q_block_offset + 1) for i in range(n_q)]
    target = density * sum(visible)
    lo, hi = 1, n_k
    while lo < hi:  # smallest k whose kept blocks reach the target
        mid = (lo + hi) // 2
        if sum(min(mid, v) for v in visible) >= target - 1e-9:
            hi = mid
        else:
            lo = mid + 1
    return lo


def select_blocks(probs: torch.Tensor, *, density: float | None = None, threshold: float | None = None,
                  top_p: float | None = None, keep_sink: bool = True, keep_diagonal: bool = True,
                  q_block_offset: int | None = None, allocation: str = "uniform",
                  min_density: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate probabilities [B, H, NQB, NKB] -> (block_indices int32 [B, H, NQB, MAXB] sorted ascending,
    block_counts int32 [B, H, NQB]).

    Exactly one of ``density`` (the k best blocks per row, k from ``topk_for_layout``, the forced
    blocks counted among them), ``threshold`` (every block with probability >= threshold) and
    ``top_p`` (per row the fewest blocks, forced ones first and then the most probable, whose
    probabilities sum to >= top_p); with threshold or top_p, ``min_density`` also keeps every row's
    top-k blocks for that density (a floor, so rows with a flat gate distribution are not left with
    the forced blocks alone). Only
    causally visible blocks are ever selected; the first (sink) block and the diagonal block are
    always kept unless turned off, so no row is empty.

    ``allocation`` (density only): "uniform" gives every head the same k per row (the reference);
    "heads" lets the heads of a query-block row share their k * H blocks by gate probability, so a
    diffuse head takes more blocks and a focused one fewer, at the same density per layer.
    ``density`` may also be one value per head (a calibrated budget, see ``allocate_budget``)."""
    if allocation not in ("uniform", "heads"):
        raise ValueError(f"allocation must be 'uniform' or 'heads', got {allocation!r}")
    if sum(x is not None for x in (density, threshold, top_p)) != 1:
        raise ValueError("give exactly one of density, threshold and top_p")
    b, h, nq, nk = probs.shape
    per_head = density is not None and not isinstance(density, (int, float))
    if per_head and (len(density) != h or allocation != "uniform"):
        raise ValueError(f"per-head densities need one value per head ({h}, got {len(density)}) and the uniform "
                         "allocation")
    if q_block_offset is None:
        q_block_offset = nk - nq
    visible, scores, forced, ranked = _ranked(probs, keep_sink, keep_diagonal, q_block_offset)
    if density is not None:
        # top-k straight to index lists: only the k winners are sorted, never the whole [NQB, NKB]
        # map, and the width is known without reading anything back from the device
        ks = layout_ks(density if per_head else [density], nq, nk, q_block_offset, keep_sink, keep_diagonal)
        k = max(ks)
        if allocation == "heads" and h > 1:
            return _shared_topk(ranked, k)
        top = ranked.topk(k, dim=-1)
        valid = top.values > float("-inf")
        if per_head:  # each head keeps the first k_h of its ranked blocks
            rank = torch.arange(k, device=probs.device)
            valid &= rank < torch.tensor(ks, device=probs.device)[:, None, None]
        indices = torch.where(valid, top.indices, nk).sort(dim=-1).values
        counts = valid.sum(dim=-1).to(torch.int32)
    else:
        if threshold is not None:
            chosen = ((scores >= threshold) | forced) & visible
        else:
            order = ranked.sort(dim=-1, descending=True)
            mass = probs.float().masked_fill(~visible, 0.0).gather(-1, order.indices)
            # top_p = 1 keeps every visible block (a rounded cumulative sum could pass 1 early)
            take = (((mass.cumsum(-1) - mass) < top_p) | (top_p >= 1.0)) & (order.values > float("-inf"))
            chosen = torch.zeros_like(take).scatter_(-1, order.indices, take) | forced
        if min_density is not None:
            k = min(nk, topk_for_layout(float(min_density), nq, nk, q_block_offset))
            top = ranked.topk(k, dim=-1)
            chosen |= torch.zeros_like(chosen).scatter_(-1, top.indices, top.values > float("-inf"))
        counts = chosen.sum(dim=-1).to(torch.int32)
        width = max(1, int(counts.max()))
        # ascending indices of the chosen blocks first: unchosen blocks sort after every chosen one
        arange = torch.arange(nk, device=probs.device)
        indices = torch.where(chosen, arange, nk + arange).sort(dim=-1).values[..., :width]
    indices = torch.where(indices >= nk, torch.zeros_like(indices), indices).to(torch.int32)
    return indices.contiguous(), counts.contiguous()


def _ranked(scores: torch.Tensor, keep_sink: bool, keep_diagonal: bool, q_block_offset: int):
    """(visible [NQB, NKB], scores with -inf where not visible, forced blocks, ranking scores): the
    order top-k selection takes, the forced sink and diagonal blocks first (+inf), then by score."""
    nq, nk = scores.shape[-2:]
    visible = block_causal_mask(nq, nk, q_block_offset, device=scores.device)
    masked = scores.float().masked_fill(~visible, float("-inf"))
    forced = torch.zeros(nq, nk, dtype=torch.bool, device=scores.device)
    if keep_sink:
        forced[:, 0] = True
    if keep_diagonal:
        rows = torch.arange(nq, device=scores.device)
        forced[rows, (rows + q_block_offset).clamp(max=nk - 1)] = True
    forced &= visible
    return visible, masked, forced, torch.where(forced, torch.full_like(masked, float("inf")), masked)


def _shared_topk(ranked: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (batch, query-block row), the k * H best (head, key block) pairs over all heads."""
    b, h, nq, nk = ranked.shape
    flat = ranked.permute(0, 2, 1, 3).reshape(b, nq, h * nk)
    top = flat.topk(min(h * nk, k * h), dim=-1)
    slot = torch.where(top.values > float("-inf"), top.indices, h * nk)
    chosen = torch.zeros(b, nq, h * nk + 1, dtype=torch.bool, device=ranked.device)
    chosen.scatter_(-1, slot, True)
    chosen = chosen[..., :-1].view(b, nq, h, nk).permute(0, 2, 1, 3)
    counts = chosen.sum(dim=-1).to(torch.int32)
    width = min(nk, k * h)
    arange = torch.arange(nk, device=ranked.device)
    indices = torch.where(chosen, arange, nk + arange).sort(dim=-1).values[..., :width]
    indices = torch.where(indices >= nk, torch.zeros_like(indices), indices).to(torch.int32)
    return indices.contiguous(), counts.contiguous()


def block_mass_reference(q: torch.Tensor, k: torch.Tensor, *, block_size: int, scale: float | None = None,
                         rows_per_step: int = 1024) -> torch.Tensor:
    """Causal attention mass per (query block, key block): the exact softmax probabilities summed
    over each key block and over the query block's rows, [B, Hq, NQB, NKB] fp32 (a row of the
    result sums to the block's number of query rows). For the budget calibration: how much of the
    attention a selection of blocks keeps. Whole sequences (queries and keys at the same
    positions), ``rows_per_step`` query rows at a time (never all of N x N)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    if k.shape[2] != t:
        raise ValueError("block_mass_reference takes whole sequences (as many queries as keys)")
    group = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    nb = -(-t // block_size)
    pad = nb * block_size - t
    step = max(block_size, rows_per_step // block_size * block_size)
    kf = k.float()[:, :, None]
    kpos = torch.arange(t, device=q.device)
    out = q.new_zeros((b, hq, nb, nb), dtype=torch.float32)
    for r0 in range(0, t, step):
        r1 = min(t, r0 + step)
        qi = q[:, :, r0:r1].float().reshape(b, hkv, group, r1 - r0, d)
        s = torch.matmul(qi, kf.transpose(-1, -2)) * scale
        s = s.masked_fill(kpos[None, :] > torch.arange(r0, r1, device=q.device)[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        p = torch.nn.functional.pad(p, (0, pad)).view(*p.shape[:-1], nb, block_size).sum(dim=-1)
        rows = -(-(r1 - r0) // block_size) * block_size - (r1 - r0)  # only the last step can be ragged
        p = torch.nn.functional.pad(p, (0, 0, 0, rows)).view(b, hkv, group, -1, block_size, nb).sum(dim=-2)
        out[:, :, r0 // block_size:r0 // block_size + p.shape[3]] = p.reshape(b, hq, -1, nb)
    return out


def kept_mass_curve(scores: torch.Tensor, mass: torch.Tensor, densities, *, keep_sink: bool = True,
                    keep_diagonal: bool = True, q_block_offset: int | None = None) -> torch.Tensor:
    """The attention mass that top-k selection by ``scores`` keeps at each of ``densities``:
    [H, len(densities)] sums over batch and query-block rows of ``mass`` (from
    ``block_mass_reference``, summed over a KV group's query heads when ``scores`` are per group)
    inside the selected blocks, the forced sink and diagonal blocks included, exactly as
    ``select_blocks`` picks them (k from ``topk_for_layout``)."""
    b, h, nq, nk = scores.shape
    if mass.shape != scores.shape:
        raise ValueError(f"mass {tuple(mass.shape)} and scores {tuple(scores.shape)} differ")
    off = nk - nq if q_block_offset is None else q_block_offset
    visible, _, _, ranked = _ranked(scores, keep_sink, keep_diagonal, off)
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    kept = mass.float().masked_fill(~visible, 0.0).gather(-1, order).cumsum(dim=-1).sum(dim=(0, 2))  # [H, NK]
    ks = layout_ks(densities, nq, nk, off, keep_sink, keep_diagonal)
    return kept[:, [k - 1 for k in ks]]


def layout_ks(densities, n_q: int, n_k: int, q_block_offset: int, keep_sink: bool = True,
              keep_diagonal: bool = True) -> list[int]:
    """The k per row that top-k selection uses at each density on this layout (forced blocks included)."""
    low = max(int(keep_sink) + int(keep_diagonal), 1)
    return [min(n_k, max(topk_for_layout(float(d), n_q, n_k, q_block_offset), low)) for d in densities]


def selected_blocks(ks, n_q: int, n_k: int, q_block_offset: int) -> tuple[list[int], int]:
    """(blocks kept at each k, causally visible blocks) over the rows of a layout: the density a k
    really costs, which at low densities is more than asked (a row keeps at least its forced blocks)."""
    visible = [min(n_k, i + q_block_offset + 1) for i in range(n_q)]
    return [sum(min(k, v) for v in visible) for k in ks], sum(visible)


def allocate_budget(kept: torch.Tensor, densities, target: float, cost=None) -> torch.Tensor:
    """Per-unit densities (a unit is a layer's head, or KV head) from the kept-mass curves ``kept``
    [..., G] (fraction of the attention mass kept at each of the G increasing ``densities``): every
    unit starts at the lowest density, then the unit whose next step gains the most kept mass per
    unit of density moves up (looking ahead over non-concave stretches), while the mean density
    stays <= ``target``. Maximises the total kept mass for the budget. ``cost``: the density each
    level really selects (default: ``densities``), which ``target`` then bounds. Returns [...]
    densities (levels of ``densities``)."""
    dens = torch.as_tensor(densities, dtype=torch.float64)
    price = dens if cost is None else torch.as_tensor(cost, dtype=torch.float64)
    curves = kept.double().reshape(-1, dens.numel())
    n = curves.shape[0]
    if not 0.0 < target <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {target}")
    if (dens.diff() <= 0).any() or (price.diff() < 0).any() or price.shape != dens.shape:
        raise ValueError("calibration densities must increase, with one non-decreasing cost per density")
    if target < float(price[0]) - 1e-9:
        raise ValueError(f"density {target} is below the lowest the calibration offers ({float(price[0]):.4f}: at the "
                         "calibrated length the forced sink and diagonal blocks alone may keep that much); ask for "
                         "more, calibrate on longer windows, or pass allocation='uniform'")
    level = torch.zeros(n, dtype=torch.long)
    budget = (target - float(price[0])) * n  # density left to hand out (summed over units)
    later = torch.arange(dens.numel())[None, :]
    while True:
        cost = price[None, :] - price[level][:, None]  # [n, G]: moving each unit to each level
        ok = (later > level[:, None]) & (cost <= budget + 1e-9)
        if not ok.any():
            break
        gain = (curves - curves.gather(1, level[:, None])) / cost.clamp_min(1e-12)
        best = int(torch.where(ok, gain, float("-inf")).flatten().argmax())
        unit, j = divmod(best, dens.numel())
        budget -= float(cost[unit, j])
        level[unit] = j
    return dens[level].reshape(kept.shape[:-1])


def achieved_density(counts: torch.Tensor, n_k: int, q_block_offset: int | None = None) -> torch.Tensor:
    """Selected blocks / causally visible blocks, per leading index ([B, H] for counts [B, H, NQB])."""
    n_q = counts.shape[-1]
    visible = block_causal_mask(n_q, n_k, q_block_offset, device=counts.device).sum()
    return counts.sum(dim=-1).float() / visible.float()
