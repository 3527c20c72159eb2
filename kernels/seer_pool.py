"""The SeerAttention gate's input pooling in one pass over Q or K.

``pool_blocks_fused(x, block_size, ...)`` reads x [B, H, T, D] (as the model attends, after RoPE)
once and writes fp32 [B, H, NB, D] (average) or [B, H, NB, 3D] (max | min | average): RoPE is
undone on the fly from the model's cos/sin, padded rows are skipped, and a chunk that starts
inside a block (``lead`` rows missing at the front) gets a partial first block. In plain PyTorch
the same takes an fp32 copy of x plus one pass per statistic; at 32k tokens with 32 heads that
is most of the gate's cost. Reference: ``attn_patch.seer.gate.pool_gate_inputs``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import _INTERPRETING, _next_pow2
from .launch import CachedLauncher


@triton.jit
def _pool(X, COS, SIN, KPM, OUT,
          stride_xb, stride_xh, stride_xt, stride_cb, stride_ct, stride_kb, stride_kt,
          H, T, NB, lead,
          HEAD_DIM: tl.constexpr, ROT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
          UNROPE: tl.constexpr, HAS_KPM: tl.constexpr, MINMAX: tl.constexpr, HEADS: tl.constexpr):
    """One block of rows for HEADS heads: the rows' mask and the cos/sin tile are loaded once and
    the loop over heads lets the loads of the next head overlap this one's reductions."""
    pid = tl.program_id(0)
    b = pid // NB
    nb = pid % NB
    h0 = tl.program_id(1) * HEADS
    rows = nb * BLOCK + tl.arange(0, BLOCK) - lead
    offs_d = tl.arange(0, BLOCK_D)
    ok = (rows >= 0) & (rows < T)
    if HAS_KPM:
        ok = ok & (tl.load(KPM + b * stride_kb + rows * stride_kt, mask=ok, other=0) != 0)
    d_ok = offs_d < HEAD_DIM
    n = tl.sum(ok.to(tl.float32), 0)
    if UNROPE:
        half: tl.constexpr = ROT // 2
        rot = offs_d < ROT
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        m2 = ok[:, None] & rot[None, :]
        cbase = b * stride_cb + rows[:, None] * stride_ct + offs_d[None, :]
        c = tl.load(COS + cbase, mask=m2, other=1.0).to(tl.float32)
        s = tl.load(SIN + cbase, mask=m2, other=0.0).to(tl.float32) * sign[None, :]
        inv = 1.0 / (c * c + s * s)
    for hh in range(HEADS):
        h = h0 + hh
        dl = offs_d < tl.where(h < H, HEAD_DIM, 0)  # channels of a real head
        base = X + b * stride_xb + h * stride_xh + rows[:, None] * stride_xt
        x = tl.load(base + offs_d[None, :], mask=ok[:, None] & dl[None, :], other=0.0).to(tl.float32)
        if UNROPE:
            xp = tl.load(base + partner[None, :], mask=m2 & dl[None, :], other=0.0).to(tl.float32)
            # x = pre * c + rotate_half(pre) * s  =>  pre = (x * c - rotate_half(x) * s) / (c^2 + s^2)
            x = tl.where(rot[None, :], (x * c - xp * s) * inv, x)
        avg = tl.sum(x, 0) / tl.maximum(n, 1.0)
        out = OUT + ((b * H + h) * NB + nb) * (3 * HEAD_DIM if MINMAX else HEAD_DIM)
        if MINMAX:
            has = n > 0
            mx = tl.max(tl.where(ok[:, None], x, float("-inf")), 0)
            mn = tl.min(tl.where(ok[:, None], x, float("inf")), 0)
            tl.store(out + offs_d, tl.where(has, mx, 0.0), mask=dl)
            tl.store(out + HEAD_DIM + offs_d, tl.where(has, mn, 0.0), mask=dl)
            tl.store(out + 2 * HEAD_DIM + offs_d, avg, mask=dl)
        else:
            tl.store(out + offs_d, avg, mask=dl)


_POOL = CachedLauncher(_pool)


def pool_blocks_fused(x: torch.Tensor, block_size: int, *, minmax: bool, lead: int = 0,
                      cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                      key_padding: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 [B, H, NB, D] (average) or, with ``minmax``, [B, H, NB, 3D] (max | min | average) of
    x [B, H, T, D] over blocks of ``block_size`` rows; ``cos``/``sin`` [B|1, T, R] undo RoPE on
    the first R channels first; ``key_padding`` [B, T] (False = skip) and ``lead`` as in
    ``pool_blocks``. Blocks with no row give 0."""
    b, h, t, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb = -(-(t + lead) // block_size)
    out = torch.empty((b, h, nb, 3 * d if minmax else d), device=x.device, dtype=torch.float32)
    unrope = cos is not None
    if unrope:
        if cos.stride(-1) != 1 or sin.stride() != cos.stride():
            cos, sin = cos.contiguous(), sin.contiguous()
        if cos.shape[-2] != t:
            raise ValueError(f"cos/sin cover {cos.shape[-2]} positions, x has {t}")
        rot, stride_cb, stride_ct = cos.shape[-1], (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(-2)
    else:
        cos = sin = out
        rot, stride_cb, stride_ct = 2, 0, 0
    if key_padding is not None:
        kpm = key_padding.to(torch.uint8) if key_padding.dtype == torch.bool else key_padding
        stride_kb, stride_kt = kpm.stride(0), kpm.stride(1)
    else:
        kpm, stride_kb, stride_kt = out, 0, 0
    args = (x, cos, sin, kpm, out, x.stride(0), x.stride(1), x.stride(2), stride_cb, stride_ct, stride_kb, stride_kt,
            h, t, nb, int(lead))
    heads = 2 if _INTERPRETING else min(8, h)
    meta = dict(HEAD_DIM=d, ROT=rot, BLOCK_D=max(16, _next_pow2(d)), BLOCK=block_size, UNROPE=unrope,
                HAS_KPM=key_padding is not None, MINMAX=bool(minmax), HEADS=heads)
    grid = (b * nb, -(-h // heads))
    if _INTERPRETING:
        _pool[grid](*args, **meta)
    else:
        _POOL(grid, args, meta, 4, 2)
    return out


__all__ = ["pool_blocks_fused"]
