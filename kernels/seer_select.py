"""SeerAttention's top-k block selection in one kernel: gate scores -> sorted block index lists.

``topk_block_lists(scores, k, ...)`` takes scores [B, H, NQB, NKB] (gate logits or probabilities:
only their order matters) and, per query-block row, keeps the sink and diagonal blocks plus the
best remaining causally visible blocks up to k in all, writing them in ascending block order with
their count. One program per row holds the row in registers, finds the k-th best score by
bisection on its value, breaks ties by block order, and compacts with a prefix sum. In PyTorch the
same is a causal mask, a forced-block overlay, topk, sort and a few casts: over a dozen launches,
which at 8k tokens cost more than the attention itself. Reference: ``attn_patch.seer.select_blocks``
(equal up to ties).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import _INTERPRETING, _next_pow2
from .launch import CachedLauncher


@triton.jit
def _select(S, IDX, CNT, NQ, NK, WIDTH, q_block_offset, K,
            KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, BLOCK_N: tl.constexpr, ITERS: tl.constexpr):
    row = tl.program_id(0)
    i = row % NQ
    j = tl.arange(0, BLOCK_N)
    diag = tl.minimum(i + q_block_offset, NK - 1)
    visible = (j < NK) & (j <= i + q_block_offset)
    s = tl.load(S + row.to(tl.int64) * NK + j, mask=j < NK, other=0.0).to(tl.float32)
    forced = (j < 0)
    if KEEP_SINK:
        forced = forced | (j == 0)
    if KEEP_DIAG:
        forced = forced | (j == diag)
    forced = forced & visible
    rest = visible & (forced == 0)
    n_forced = tl.sum(forced.to(tl.int32), 0)
    n_rest = tl.sum(rest.to(tl.int32), 0)
    need = tl.minimum(tl.maximum(K - n_forced, 0), n_rest)
    # bisection on the value: lo keeps >= need blocks, hi keeps < need
    lo = tl.where(n_rest > 0, tl.min(tl.where(rest, s, float("inf")), 0), 0.0)
    hi = tl.where(n_rest > 0, tl.max(tl.where(rest, s, float("-inf")), 0), 1.0)
    hi = hi + tl.abs(hi) * 1e-6 + 1e-30
    for _ in range(ITERS):
        mid = lo + (hi - lo) * 0.5
        c = tl.sum((rest & (s >= mid)).to(tl.int32), 0)
        ok = c >= need
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    strict = rest & (s >= hi)
    ties = rest & (s >= lo) & (strict == 0)
    extra = need - tl.sum(strict.to(tl.int32), 0)
    tie_rank = tl.cumsum(ties.to(tl.int32), 0)
    keep = forced | strict | (ties & (tie_rank <= extra))
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    base = IDX + row.to(tl.int64) * WIDTH
    tl.store(base + pos, j, mask=keep)
    tl.store(CNT + row, tl.sum(keep.to(tl.int32), 0))


_SELECT = CachedLauncher(_select)


def topk_block_lists(scores: torch.Tensor, k: int, *, keep_sink: bool = True, keep_diagonal: bool = True,
                     q_block_offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_indices int32 [B, H, NQB, k], block_counts int32 [B, H, NQB]) for the k best causally
    visible key blocks per row (sink and diagonal first unless turned off, counted among the k).
    Slots past a row's count hold 0."""
    b, h, nq, nk = scores.shape
    q_block_offset = nk - nq if q_block_offset is None else int(q_block_offset)
    scores = scores.contiguous()
    k = min(nk, max(int(k), int(keep_sink) + int(keep_diagonal), 1))
    width = k
    idx = torch.zeros((b, h, nq, width), device=scores.device, dtype=torch.int32)
    cnt = torch.empty((b, h, nq), device=scores.device, dtype=torch.int32)
    args = (scores, idx, cnt, nq, nk, width, q_block_offset, int(k))
    meta = dict(KEEP_SINK=bool(keep_sink), KEEP_DIAG=bool(keep_diagonal), BLOCK_N=max(16, _next_pow2(nk)), ITERS=40)
    grid = (b * h * nq,)
    if _INTERPRETING:
        _select[grid](*args, **meta)
    else:
        _SELECT(grid, args, meta, 4 if nk <= 1024 else 8, 1)
    return idx, cnt


__all__ = ["topk_block_lists"]
