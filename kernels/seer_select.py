"""SeerAttention's block scoring and top-k selection: gate projections -> scores -> sorted block lists.

``block_scores(qg, kg, ...)`` is the gate's last step in one launch: it applies block RoPE to the
projected, pooled queries and keys (tables cached per length bucket) and writes their dot products
for the causally visible (query block, key block) tiles. In PyTorch the same is about twenty small
launches (RoPE tables, rotations, an einsum), which made the gate host-bound below ~16k tokens.
Reference: ``attn_patch.seer.SeerGate.raw_scores``.

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

import functools

import torch
import triton
import triton.language as tl

from .flash import _INTERPRETING, _mma, _next_pow2
from .launch import CachedLauncher


@triton.jit
def _halves(X, COS, SIN, rows, pos, ok, offs_c, stride_n, HALF: tl.constexpr, ROPE: tl.constexpr):
    """The two channel halves of rows of a [N, 2 * HALF] gate tile, rotate-half RoPE applied at
    table rows ``pos`` (without RoPE the halves as they are)."""
    m = ok[:, None] & (offs_c < HALF)[None, :]
    ptr = X + rows[:, None] * stride_n + offs_c[None, :]
    x1 = tl.load(ptr, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=m, other=0.0).to(tl.float32)
    if ROPE:
        t = pos[:, None] * HALF + offs_c[None, :]
        c = tl.load(COS + t, mask=m, other=1.0)
        s = tl.load(SIN + t, mask=m, other=0.0)
        return x1 * c - x2 * s, x2 * c + x1 * s
    return x1, x2


@triton.jit
def _scores(QG, KG, COS, SIN, S,
            stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
            HQ, KDIV, NQ, NK, q_block_offset,
            HALF: tl.constexpr, BLOCK_C: tl.constexpr, ROPE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    i0 = tl.program_id(1) * BLOCK_M
    j0 = tl.program_id(2) * BLOCK_N
    if j0 > tl.minimum(i0 + BLOCK_M, NQ) - 1 + q_block_offset:
        return  # no block of this tile is visible: the selection never reads it
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_c = tl.arange(0, BLOCK_C)
    i = i0 + tl.arange(0, BLOCK_M)
    j = j0 + tl.arange(0, BLOCK_N)
    q1, q2 = _halves(QG + b * stride_qb + h * stride_qh, COS, SIN, i, i + q_block_offset, i < NQ, offs_c,
                     stride_qn, HALF, ROPE)
    k1, k2 = _halves(KG + b * stride_kb + (h // KDIV) * stride_kh, COS, SIN, j, j, j < NK, offs_c, stride_kn,
                     HALF, ROPE)
    dt = QG.dtype.element_ty
    if dt == tl.float32:  # fp32 gates: three TF32 products, about fp32 accuracy on the tensor cores
        s = tl.dot(q1, tl.trans(k1), input_precision="tf32x3")
        s = tl.dot(q2, tl.trans(k2), s, input_precision="tf32x3")
    else:
        s = _mma(q1.to(dt), tl.trans(k1.to(dt)), None)
        s = _mma(q2.to(dt), tl.trans(k2.to(dt)), s)
    out = S + pid_bh.to(tl.int64) * NQ * NK
    tl.store(out + i[:, None] * NK + j[None, :], s, mask=(i < NQ)[:, None] & (j < NK)[None, :])


_SCORES = CachedLauncher(_scores)


@functools.lru_cache(maxsize=32)
def _rope_table(n_blocks: int, block_size: int, dim: int, theta: float, device: torch.device):
    """cos, sin [n_blocks, dim // 2] fp32 at positions block * block_size, as ``seer.gate.block_rope``
    computes them (rotate-half: channel c and c + dim // 2 share an angle)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = (torch.arange(n_blocks, device=device) * block_size).to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos().contiguous(), angles.sin().contiguous()


def block_scores(qg: torch.Tensor, kg: torch.Tensor, *, block_size: int, rope_theta: float | None,
                 q_block_offset: int = 0) -> torch.Tensor:
    """Raw gate scores fp32 [B, Hq, NQB, NKB]: block RoPE (query block i at position
    (i + q_block_offset) * block_size, key block j at j * block_size; none if ``rope_theta`` is
    None) on ``qg`` [B, Hq, NQB, G] and ``kg`` [B, Hk, NKB, G] (Hk divides Hq: query head h reads
    key head h // (Hq // Hk)), then their dot products. Only entries that some causally visible
    tile holds are written (the rest of the returned tensor is uninitialised): the selection and
    ``SeerGate.score`` mask everything above the block diagonal."""
    b, hq, nq, g = qg.shape
    hk, nk = kg.shape[1], kg.shape[2]
    if kg.shape[0] != b or kg.shape[3] != g or hq % hk:
        raise ValueError(f"gate projections do not match: queries {tuple(qg.shape)}, keys {tuple(kg.shape)}")
    if qg.dtype != kg.dtype:
        raise ValueError(f"queries ({qg.dtype}) and keys ({kg.dtype}) of the gate must share a dtype")
    if qg.stride(-1) != 1:
        qg = qg.contiguous()
    if kg.stride(-1) != 1:
        kg = kg.contiguous()
    rope = rope_theta is not None
    if g % 2:
        raise ValueError(f"the gate dimension must be even, got {g}")
    if rope:
        cos, sin = _rope_table(max(16, _next_pow2(max(nk, nq + q_block_offset))), int(block_size), g,
                               float(rope_theta), qg.device)
    out = torch.empty((b, hq, nq, nk), device=qg.device, dtype=torch.float32)
    if not rope:
        cos = sin = out
    if out.numel() == 0:
        return out
    bm = bn = 16 if _INTERPRETING else 64
    args = (qg, kg, cos, sin, out, qg.stride(0), qg.stride(1), qg.stride(2), kg.stride(0), kg.stride(1), kg.stride(2),
            hq, hq // hk, nq, nk, int(q_block_offset))
    meta = dict(HALF=g // 2, BLOCK_C=max(16, _next_pow2(g // 2)), ROPE=rope, BLOCK_M=bm, BLOCK_N=bn)
    grid = (b * hq, -(-nq // bm), -(-nk // bn))
    if _INTERPRETING:
        _scores[grid](*args, **meta)
    else:
        _SCORES(grid, args, meta, 8 if g > 64 else 4, 1)
    return out


@triton.jit
def _select(S, IDX, CNT, KS, NQ, NK, NH, WIDTH, q_block_offset, K, thresh, logit_scale,
            KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, BLOCK_N: tl.constexpr, ITERS: tl.constexpr,
            THRESHOLD: tl.constexpr, SOFTMAX: tl.constexpr, PER_HEAD: tl.constexpr):
    row = tl.program_id(0)
    i = row % NQ
    if PER_HEAD:  # a k per head (a calibrated density budget)
        K = tl.load(KS + (row // NQ) % NH)
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
    if THRESHOLD:  # plus every block whose probability reaches the threshold (K is then a floor)
        if SOFTMAX:  # raw scores: the gate's softmax over the visible blocks
            z = tl.where(visible, s * logit_scale, float("-inf"))
            e = tl.exp(z - tl.max(z, 0))
            p = e / tl.sum(e, 0)
        else:
            p = s
        keep = keep | (rest & (p >= thresh))
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    base = IDX + row.to(tl.int64) * WIDTH
    tl.store(base + pos, j, mask=keep)
    tl.store(CNT + row, tl.sum(keep.to(tl.int32), 0))


_SELECT = CachedLauncher(_select)


@functools.lru_cache(maxsize=512)
def _device_ints(values: tuple, device: torch.device) -> torch.Tensor:
    """The per-head k as a device tensor, made once per (values, device): the same few budgets
    come back every layer and call, and a fresh host-to-device copy each time costs a sync."""
    return torch.tensor(values, dtype=torch.int32, device=device)


def topk_block_lists(scores: torch.Tensor, k, *, keep_sink: bool = True, keep_diagonal: bool = True,
                     q_block_offset: int | None = None, threshold: float | None = None,
                     logit_scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(block_indices int32 [B, H, NQB, width], block_counts int32 [B, H, NQB]) for the k best
    causally visible key blocks per row (sink and diagonal first unless turned off, counted among
    the k; ``k`` an int, or one int per head). With ``threshold``, also every block whose
    probability is >= threshold (k is then a floor; 0 for none) and width is NKB: the
    probabilities are ``scores`` themselves, or with ``logit_scale`` the softmax over the visible
    blocks of ``scores * logit_scale`` (raw gate scores). Slots past a row's count hold 0."""
    b, h, nq, nk = scores.shape
    q_block_offset = nk - nq if q_block_offset is None else int(q_block_offset)
    scores = scores.contiguous()
    low = max(int(keep_sink) + int(keep_diagonal), 0 if threshold is not None else 1)
    per_head = not isinstance(k, int)
    if per_head:
        ks = [min(nk, max(int(x), low)) for x in k]
        if len(ks) != h:
            raise ValueError(f"{len(ks)} per-head k for scores with {h} heads")
        k = max(ks)
        ks = _device_ints(tuple(ks), scores.device)
    else:
        k = min(nk, max(int(k), low))
        ks = scores  # unread
    width = nk if threshold is not None else k
    idx = torch.zeros((b, h, nq, width), device=scores.device, dtype=torch.int32)
    cnt = torch.empty((b, h, nq), device=scores.device, dtype=torch.int32)
    args = (scores, idx, cnt, ks, nq, nk, h, width, q_block_offset, int(k), float(threshold or 0.0),
            float(logit_scale or 1.0))
    meta = dict(KEEP_SINK=bool(keep_sink), KEEP_DIAG=bool(keep_diagonal), BLOCK_N=max(16, _next_pow2(nk)), ITERS=40,
                THRESHOLD=threshold is not None, SOFTMAX=logit_scale is not None, PER_HEAD=per_head)
    grid = (b * h * nq,)
    if _INTERPRETING:
        _select[grid](*args, **meta)
    else:
        # one warp per row up to 1k blocks: the 40 bisection steps reduce within the warp (no
        # shared-memory round trips), which made the kernel latency-bound at 4 warps
        _SELECT(grid, args, meta, 1 if nk <= 1024 else (2 if nk <= 4096 else 4), 1)
    return idx, cnt


__all__ = ["block_scores", "topk_block_lists"]
