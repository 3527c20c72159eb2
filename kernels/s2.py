"""Shifted-sparse attention (LongLoRA's S2-Attn) in Triton: forward and backward.

Every query attends causally inside its group of consecutive tokens; the query heads from
``shift_from`` on use groups shifted by half a group. Groups never cross a document boundary
(packed sequences) and do not wrap around: a shifted head's first and last groups are half-size
(or the ragged rest). With ``sink`` > 0 every query also sees the first ``sink`` tokens of its
document (causally: a sink token sees only what precedes it).

The pattern is not a mask: it comes from ``bounds`` [B, 6, Tk] int32, six numbers per key
position t (built by ``s2_bounds`` from the lengths, position ids and padding):
  0 / 1: first position of t's group (unshifted / shifted heads),
  2 / 3: one past the last position of t's group,
  4 / 5: first position of t's document / one past its last.
They are nondecreasing along t, so a query tile's keys are one contiguous range [group start of
its first row, its last row] plus the sink tokens of its first row's document, and a key tile's
queries are [its first key, the furthest group (or document, for sink keys) end]. Kernels walk
those ranges as flash.py does: masked edges and an unmasked middle; blocks outside are never
touched, so the work is ~group/N of dense causal attention. A query row i sits at key position
i + q_offset; ``key_padding`` [B, Tk] drops padded keys; GQA indexes the KV head (no copies).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .flash import (
    _DELTA,
    _INTERPRETING,
    _LN2,
    _LOG2E,
    LOG2E,
    _cdiv,
    _check,
    _last_dim_contiguous,
    _launch_small,
    _Masks,
    _mma,
    _next_pow2,
)
from .launch import CachedLauncher
from .reference import s2_bounds  # torch-only, shared with the reference path; re-exported here

__all__ = ["s2_attention", "s2_bounds", "N_BOUNDS"]

N_BOUNDS = 6


@triton.jit
def _keep(i, lo, dlo, j, SINK):
    """Visibility of key position j from query position i (group start lo, document start dlo),
    broadcast: causal, inside the query's group or one of its document's sinks."""
    return (j <= i) & ((j >= lo) | ((j >= dlo) & (j < dlo + SINK)))


@triton.jit
def _load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, n_ok, d_ok,
             MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A K and a V tile; unmasked loads where every key is in range and the head dim is a power of two."""
    if MASKED or BLOCK_D != HEAD_DIM:
        ld = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=ld, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ld, other=0.0)
    else:
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
    return k, v


@triton.jit
def _fwd_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
               offs_d, qpos, lo_r, dlo_r, lo, hi, TK, qk_scale, SINK,
               MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        k, v = _load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, n_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        qk = _mma(q, tl.trans(k), None) * qk_scale
        if MASKED or HAS_KPM:
            keep = n_ok[None, :] & (qpos[:, None] >= 0)
            if MASKED:
                keep = keep & _keep(qpos[:, None], lo_r[:, None], dlo_r[:, None], offs_n[None, :], SINK)
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n * stride_kpn, mask=n_ok, other=0)
                keep = keep & (kp != 0)[None, :]
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _row_state(BND, b, h, offs_m, m0, q_offset, TQ, TK, SHIFT_FROM, BLOCK_M: tl.constexpr):
    """Per-row key positions, group starts and document starts of a query tile, and its key ranges."""
    cls = (h >= SHIFT_FROM).to(tl.int32)
    base = BND + b * (6 * TK)
    m_ok = offs_m < TQ
    qpos = offs_m + q_offset
    lo_r = tl.load(base + cls * TK + qpos, mask=m_ok, other=0)
    dlo_r = tl.load(base + 4 * TK + qpos, mask=m_ok, other=0)
    last = tl.minimum(m0 + BLOCK_M, TQ) - 1 + q_offset
    lo_first = tl.load(base + cls * TK + m0 + q_offset)
    lo_last = tl.load(base + cls * TK + last)
    dlo_first = tl.load(base + 4 * TK + m0 + q_offset)
    return qpos, lo_r, dlo_r, last, lo_first, lo_last, dlo_first


@triton.jit
def _key_ranges(first, last, lo_first, lo_last, dlo_first, SINK, TK, BLOCK_N: tl.constexpr):
    """Sink range, then masked / unmasked / masked key ranges of a query tile (rows at key
    positions first..last)."""
    hi = tl.minimum(TK, last + 1)
    a = (lo_first // BLOCK_N) * BLOCK_N
    full_lo = tl.maximum(tl.minimum(tl.cdiv(lo_last, BLOCK_N) * BLOCK_N, hi), a)
    full_hi = tl.minimum(tl.minimum(((first + 1) // BLOCK_N) * BLOCK_N, (TK // BLOCK_N) * BLOCK_N), hi)
    full_hi = tl.maximum(full_hi, full_lo)
    s_lo = (dlo_first // BLOCK_N) * BLOCK_N
    s_hi = tl.minimum(tl.cdiv(dlo_first + SINK, BLOCK_N) * BLOCK_N, a)
    s_hi = tl.where(SINK > 0, tl.maximum(s_hi, s_lo), s_lo)
    return s_lo, s_hi, a, full_lo, full_hi, hi


@triton.jit
def _s2_fwd(Q, K, V, O, LSE, KPM, BND,
            stride_qb, stride_qh, stride_qm,
            stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_om,
            stride_kpb, stride_kpn,
            HQ, GROUP, TQ, TK, q_offset, qk_scale, SINK, SHIFT_FROM,
            HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ld = (offs_m < TQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_base = KPM + b * stride_kpb
    qpos, lo_r, dlo_r, last, lo_first, lo_last, dlo_first = _row_state(BND, b, h, offs_m, m0, q_offset, TQ, TK,
                                                                       SHIFT_FROM, BLOCK_M)
    s_lo, s_hi, a, full_lo, full_hi, hi = _key_ranges(m0 + q_offset, last, lo_first, lo_last, dlo_first, SINK, TK,
                                                      BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    args = (k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn, offs_d, qpos, lo_r, dlo_r)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, *args, s_lo, s_hi, TK, qk_scale, SINK,
                               True, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, *args, a, full_lo, TK, qk_scale, SINK,
                               True, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, *args, full_lo, full_hi, TK, qk_scale, SINK,
                               False, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, *args, full_hi, hi, TK, qk_scale, SINK,
                               True, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D)
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             (acc / l_div[:, None]).to(O.dtype.element_ty), mask=ld)
    tl.store(LSE + pid_bh * TQ + offs_m, (m_i + tl.math.log2(l_i)) * _LN2, mask=offs_m < TQ)


@triton.jit
def _dq_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
              offs_d, qpos, lo_r, dlo_r, lo, hi, TK, qk_scale, SINK,
              MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
              BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        k, v = _load_kv(k_base, v_base, stride_kn, stride_vn, offs_n, offs_d, n_ok, d_ok, MASKED, HEAD_DIM, BLOCK_D)
        p = tl.math.exp2(_mma(q, tl.trans(k), None) * qk_scale - lse2[:, None])
        if MASKED or HAS_KPM:
            keep = n_ok[None, :]
            if MASKED:
                keep = keep & _keep(qpos[:, None], lo_r[:, None], dlo_r[:, None], offs_n[None, :], SINK)
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n * stride_kpn, mask=n_ok, other=0)
                keep = keep & (kp != 0)[None, :]
            p = tl.where(keep, p, 0.0)
        ds = p * (_mma(do, tl.trans(v), None) - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _s2_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, BND,
               stride_qb, stride_qh, stride_qm,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_dob, stride_doh, stride_dom,
               stride_dqb, stride_dqh, stride_dqm,
               stride_kpb, stride_kpn,
               HQ, GROUP, TQ, TK, q_offset, qk_scale, sm_scale, SINK, SHIFT_FROM,
               HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = tl.program_id(1) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < TQ
    ld = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ld,
                 other=0.0)
    lse = tl.load(LSE + pid_bh * TQ + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + pid_bh * TQ + offs_m, mask=m_ok, other=0.0)
    qpos, lo_r, dlo_r, last, lo_first, lo_last, dlo_first = _row_state(BND, b, h, offs_m, m0, q_offset, TQ, TK,
                                                                       SHIFT_FROM, BLOCK_M)
    s_lo, s_hi, a, full_lo, full_hi, hi = _key_ranges(m0 + q_offset, last, lo_first, lo_last, dlo_first, SINK, TK,
                                                      BLOCK_N)
    args = (K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh, stride_kn, stride_vn,
            KPM + b * stride_kpb, stride_kpn, offs_d, qpos, lo_r, dlo_r)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_range(dq, q, do, lse2, delta, *args, s_lo, s_hi, TK, qk_scale, SINK, True, HAS_KPM, BLOCK_N, HEAD_DIM,
                   BLOCK_D)
    dq = _dq_range(dq, q, do, lse2, delta, *args, a, full_lo, TK, qk_scale, SINK, True, HAS_KPM, BLOCK_N, HEAD_DIM,
                   BLOCK_D)
    dq = _dq_range(dq, q, do, lse2, delta, *args, full_lo, full_hi, TK, qk_scale, SINK, False, HAS_KPM, BLOCK_N,
                   HEAD_DIM, BLOCK_D)
    dq = _dq_range(dq, q, do, lse2, delta, *args, full_hi, hi, TK, qk_scale, SINK, True, HAS_KPM, BLOCK_N, HEAD_DIM,
                   BLOCK_D)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=ld)


@triton.jit
def _dkdv_range(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                bnd_lo, bnd_dlo, offs_n, offs_d, lo, hi, TQ, TK, q_offset, qk_scale, SINK,
                MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < TK
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < TQ
        if MASKED or BLOCK_D != HEAD_DIM:
            ld = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ld, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :])
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        pT = tl.math.exp2(_mma(k, tl.trans(q), None) * qk_scale - lse2[None, :])
        if MASKED or HAS_KPM:
            keep = n_ok[:, None] & m_ok[None, :]
            if MASKED:
                qpos = offs_m + q_offset
                lo_r = tl.load(bnd_lo + qpos, mask=m_ok, other=0)
                dlo_r = tl.load(bnd_dlo + qpos, mask=m_ok, other=0)
                keep = keep & _keep(qpos[None, :], lo_r[None, :], dlo_r[None, :], offs_n[:, None], SINK)
            if HAS_KPM:
                keep = keep & (kp != 0)[:, None]
            pT = tl.where(keep, pT, 0.0)
        dv = _mma(pT.to(do.dtype), do, dv)
        dsT = pT * (_mma(v, tl.trans(do), None) - delta[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _s2_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, BND,
                 stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom,
                 stride_dkb, stride_dkh, stride_dkn,
                 stride_dvb, stride_dvh, stride_dvn,
                 stride_kpb, stride_kpn,
                 HQ, HKV, GROUP, TQ, TK, q_offset, qk_scale, sm_scale, SINK, SHIFT_FROM,
                 HAS_KPM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bk = tl.program_id(0)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < TK
    kv_mask = n_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    kp = tl.zeros([BLOCK_N], dtype=tl.int8)
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_kpb + offs_n * stride_kpn, mask=n_ok, other=0).to(tl.int8)
    base = BND + b * (6 * TK)
    # a key is a sink for the rest of its document, else for the rest of its group
    dlo_k = tl.load(base + 4 * TK + offs_n, mask=n_ok, other=0)
    dhi_k = tl.load(base + 5 * TK + offs_n, mask=n_ok, other=0)
    is_sink = offs_n < dlo_k + SINK
    n_last = tl.minimum(n0 + BLOCK_N, TK) - 1
    r_lo = (tl.maximum(n0 - q_offset, 0) // BLOCK_M) * BLOCK_M
    r_full_lo = tl.cdiv(tl.maximum(n_last - q_offset, 0), BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        cls = (h >= SHIFT_FROM).to(tl.int32)
        hi_k = tl.load(base + (2 + cls) * TK + offs_n, mask=n_ok, other=0)
        reach = tl.where(is_sink, dhi_k, hi_k)  # one past the last position that sees the key
        r_hi = tl.minimum(TQ, tl.maximum(tl.max(tl.where(n_ok, reach, 0), 0) - q_offset, 0))
        far = tl.min(tl.where(n_ok, reach, 2147483647), 0)
        r_full_hi = tl.minimum((tl.maximum(far - q_offset, 0) // BLOCK_M) * BLOCK_M, (TQ // BLOCK_M) * BLOCK_M)
        lo = tl.minimum(r_lo, r_hi)
        full_lo = tl.maximum(tl.minimum(r_full_lo, r_hi), lo)
        full_hi = tl.maximum(tl.minimum(r_full_hi, r_hi), full_lo)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * HQ + h) * TQ
        delta_base = DELTA + (b * HQ + h) * TQ
        bnd_lo = base + cls * TK
        bnd_dlo = base + 4 * TK
        dk, dv = _dkdv_range(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                             bnd_lo, bnd_dlo, offs_n, offs_d, lo, full_lo, TQ, TK, q_offset, qk_scale, SINK,
                             True, HAS_KPM, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _dkdv_range(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                             bnd_lo, bnd_dlo, offs_n, offs_d, full_lo, full_hi, TQ, TK, q_offset, qk_scale, SINK,
                             False, HAS_KPM, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _dkdv_range(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                             bnd_lo, bnd_dlo, offs_n, offs_d, full_hi, r_hi, TQ, TK, q_offset, qk_scale, SINK,
                             True, HAS_KPM, BLOCK_M, HEAD_DIM, BLOCK_D)
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# python side
# --------------------------------------------------------------------------------------------


def _tiles(kind: str, d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if _INTERPRETING:
        return 16, 16, 1, 1
    if dtype == torch.float32:
        return 64, 32, 4, 1
    if kind == "fwd":
        return (128, 64, 8, 3) if d > 64 else (128, 64, 4, 3)
    return 64, 64, 4, 2


_FWD = CachedLauncher(_s2_fwd)
_DQ = CachedLauncher(_s2_bwd_dq)
_DKDV = CachedLauncher(_s2_bwd_dkdv)


def _forward(q, k, v, bounds, scale, q_offset, sink, shift_from, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    o = torch.empty((b, tq, hq, d), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = _tiles("fwd", d, q.dtype)
    args = (q, k, v, o, lse, masks.kpm, bounds, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            *masks.kpm_strides, hq, hq // hkv, tq, tk, q_offset, scale * LOG2E, sink, shift_from)
    meta = dict(HAS_KPM=masks.has_kpm, HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)), BLOCK_M=bm, BLOCK_N=bn)
    _launch_small(_FWD, (b * hq, _cdiv(tq, bm)), args, meta, warps, stages)
    return o, lse


def _backward(do, q, k, v, o, lse, bounds, scale, q_offset, sink, shift_from, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    block_d = max(16, _next_pow2(d))
    delta = torch.empty_like(lse)
    _launch_small(_DELTA, (b * hq, _cdiv(tq, 64)),
                  (o, do, delta, *o.stride()[:3], *do.stride()[:3], hq, tq),
                  dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64), num_warps=4, num_stages=1)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn, warps, stages = _tiles("bwd", d, q.dtype)
    meta = dict(HAS_KPM=masks.has_kpm, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3])
    kv_args = (q, k, v, do, lse, delta, dk, dv, masks.kpm, bounds, *common, *dk.stride()[:3], *dv.stride()[:3],
               *masks.kpm_strides, hq, hkv, hq // hkv, tq, tk, q_offset, scale * LOG2E, scale, sink, shift_from)
    _launch_small(_DKDV, (b * hkv, _cdiv(tk, bn)), kv_args, meta, warps, stages)
    q_args = (q, k, v, do, lse, delta, dq, masks.kpm, bounds, *common, *dq.stride()[:3],
              *masks.kpm_strides, hq, hq // hkv, tq, tk, q_offset, scale * LOG2E, scale, sink, shift_from)
    _launch_small(_DQ, (b * hq, _cdiv(tq, bm)), q_args, meta, warps, stages)
    return dq, dk, dv


class _S2Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bounds, scale, q_offset, sink, shift_from, key_padding):
        masks = _Masks(q, key_padding, None)
        o, lse = _forward(q, k, v, bounds, scale, q_offset, sink, shift_from, masks)
        ctx.save_for_backward(q, k, v, o, lse, bounds)
        ctx.masks = masks
        ctx.args = (scale, q_offset, sink, shift_from)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, bounds = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, bounds, *ctx.args, ctx.masks)
        return dq, dk, dv, None, None, None, None, None, None


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, *,
                 shift_from: int, sink: int = 0, scale: float | None = None, q_offset: int | None = None,
                 key_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted-sparse attention. q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D], ``bounds`` from
    ``s2_bounds`` over the Tk key positions; query heads >= ``shift_from`` use the shifted groups.
    Returns (out [B, Hq, Tq, D] as a view of [B, Tq, Hq, D], lse [B, Hq, Tq] natural log)."""
    q_offset, _ = _check(q, k, v, key_padding, None, q_offset=q_offset)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    b, tk = q.shape[0], k.shape[2]
    if bounds.dtype != torch.int32 or tuple(bounds.shape) != (b, N_BOUNDS, tk) or not bounds.is_contiguous():
        raise ValueError(f"bounds must be contiguous int32 [B={b}, {N_BOUNDS}, Tk={tk}] from s2_bounds, got "
                         f"{bounds.dtype} {tuple(bounds.shape)}")
    if bounds.device != q.device:
        raise ValueError(f"bounds are on {bounds.device}, q on {q.device}")
    if sink < 0:
        raise ValueError(f"sink must be >= 0 tokens, got {sink}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if q_offset < 0 or q_offset + q.shape[2] > tk:
        raise ValueError(f"S2 attention needs every query at a key position: q_offset {q_offset}, "
                         f"{q.shape[2]} queries, {tk} keys")
    return _S2Attention.apply(q, k, v, bounds, scale, q_offset, int(sink), int(shift_from), key_padding)
