"""SeerAttention's distillation target from the fused kernels, never materialising N x N.

``attention_with_block_max`` returns the exact attention output and log-sum-exp (the dense fused
forward) and, per (query block, key block), the largest softmax probability of any row of the
query block inside the key block, each query-block row normalised to sum to 1: a [B, Hq, NQB, NKB]
map, O(N^2 / B^2) memory.

The probabilities need each row's final log-sum-exp, so the block maxima come from a second pass
over the causally visible key blocks that recomputes Q.K^T (no P.V product): about a third of the
forward's work on top of it. Reference: ``attn_patch.seer.ground_truth_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import _INTERPRETING, LOG2E, _cdiv, _check, _last_dim_contiguous, _mma, _next_pow2, flash_attention
from .launch import CachedLauncher


@triton.jit
def _block_max(Q, K, LSE, GT,
               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
               HQ, GROUP, TQ, TK, NKB, q_offset, qk_scale,
               IS_CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK: tl.constexpr):
    pid_bh = tl.program_id(0)
    qb = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < TQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(LSE + (b * HQ + h) * TQ + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that see nothing: probability 0
    k_base = K + b * stride_kb + hk * stride_kh
    qpos = offs_m + q_offset
    n_blocks = NKB
    if IS_CAUSAL:  # key blocks past the query block's last position hold no probability
        last = tl.minimum((qb + 1) * BLOCK, TQ) - 1 + q_offset
        n_blocks = tl.minimum(NKB, last // BLOCK + 1)
    gt_row = GT + (pid_bh * tl.num_programs(1) + qb) * NKB
    for j in range(0, n_blocks):
        offs_n = j * BLOCK + tl.arange(0, BLOCK)
        n_ok = offs_n < TK
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        s = _mma(q, tl.trans(k), None) * qk_scale
        keep = n_ok[None, :] & m_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= qpos[:, None])
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        tl.store(gt_row + j, tl.max(tl.max(p, 1), 0))


_BLOCK_MAX = CachedLauncher(_block_max)


def attention_with_block_max(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_size: int = 64,
                             scale: float | None = None, causal: bool = True, q_offset: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Tq, D], lse [B, Hq, Tq], gt [B, Hq, NQB, NKB] fp32, rows summing to 1)."""
    _check(q, k, v, None, None)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    q_offset = tk - tq if q_offset is None else int(q_offset)
    with torch.no_grad():
        out, lse = flash_attention(q, k, v, causal=causal, scale=scale, q_offset=q_offset, decode=False)
        nqb, nkb = _cdiv(tq, block_size), _cdiv(tk, block_size)
        gt = torch.zeros((b, hq, nqb, nkb), device=q.device, dtype=torch.float32)
        args = (q, k, lse.contiguous(), gt, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
                k.stride(2), hq, hq // hkv, tq, tk, nkb, q_offset, scale * LOG2E)
        meta = dict(IS_CAUSAL=causal, HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)), BLOCK=block_size)
        grid = (b * hq, nqb)
        if _INTERPRETING:
            _block_max[grid](*args, **meta)
        else:
            _BLOCK_MAX(grid, args, meta, 4 if block_size <= 64 else 8, 2)
        total = gt.sum(dim=-1, keepdim=True)
        gt = gt / torch.where(total > 0, total, torch.ones_like(total))
    return out, lse, gt


__all__ = ["attention_with_block_max"]
