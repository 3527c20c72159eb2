"""Fused dense attention in Triton: forward, backward and a split-K decode path.

Layout and masking follow ``reference.attention_reference`` (the contract): q [B, Hq, Tq, D],
k/v [B, Hkv, Tk, D] as strided views (transformers hands us transposed views of [B, T, H, D]),
GQA by indexing the KV head ``h // group`` (K/V are never repeated), causal alignment through
``q_offset``, sliding ``window``, a [B, Tk] ``key_padding`` mask and an optional dense bool mask.

Every kernel walks key blocks (or query blocks, for dK/dV) in three ranges: a masked lower edge
(sliding window), an unmasked middle that needs no per-element mask, and a masked upper edge
(causal diagonal, ragged end). The block-sparse variants of later methods replace the middle
range by an index list; the per-block inner functions are shared.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from . import MAX_HEAD_DIM
from .launch import CachedLauncher, current_raw_stream
from .reference import _whole_number, check_inputs

LOG2E = 1.4426950408889634
# kernels may only read globals declared as constexpr
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton's CPU interpreter computes bf16 x bf16 dots wrongly (numpy has no bf16); operands are
# widened there. bf16 products are exact in fp32, so this matches what the tensor cores do.
_INTERPRET = tl.constexpr(interpreting())
# fixed at import like the constexpr above: the mode cannot change under compiled kernels
_INTERPRETING = interpreting()


@triton.jit
def _mma(a, b, acc):
    if _INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        # float32 inputs stay exact (no TF32): they exist for tests and reference-grade runs
        r = tl.dot(a, b, acc, input_precision="ieee")
    else:
        r = tl.dot(a, b, acc)
    return r


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                     offs_m, offs_d, lo, hi, q_offset, window, TQ, TK, qk_scale,
                     MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        if MASKED:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=d_ok[None, :], other=0.0)
        qk = _mma(q, tl.trans(k), None) * qk_scale
        if MASKED or HAS_KPM or HAS_DMASK:
            keep = n_ok[None, :] & (offs_m[:, None] >= 0)
            if MASKED:
                qpos = offs_m[:, None] + q_offset
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= qpos)
                if HAS_WINDOW:
                    keep = keep & (offs_n[None, :] > qpos - window)
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n * stride_kpn, mask=n_ok, other=0)
                keep = keep & (kp != 0)[None, :]
            if HAS_DMASK:
                dm = tl.load(dm_base + offs_m[:, None] * stride_dmm + offs_n[None, :] * stride_dmn,
                             mask=(offs_m[:, None] < TQ) & n_ok[None, :], other=0)
                keep = keep & (dm != 0)
            qk = tl.where(keep, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_use = m_new
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=d_ok[None, :], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _key_ranges(m0, q_offset, window, TK,
                IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges [lo, full_lo) masked, [full_lo, full_hi) unmasked, [full_hi, hi) masked."""
    lo = 0
    hi = TK
    if IS_CAUSAL:
        hi = tl.minimum(TK, tl.maximum(m0 + BLOCK_M + q_offset, 0))
    full_hi = (TK // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, (tl.maximum(m0 + q_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    full_lo = lo
    if HAS_WINDOW:
        lo = (tl.maximum(m0 + q_offset - window + 1, 0) // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(m0 + BLOCK_M + q_offset - window, 0)
        full_lo = tl.minimum(tl.cdiv(first_full, BLOCK_N) * BLOCK_N, hi)
        full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _flash_fwd(Q, K, V, O, LSE, KPM, DM,
               stride_qb, stride_qh, stride_qm,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_om,
               stride_kpb, stride_kpn,
               stride_dmb, stride_dmh, stride_dmm, stride_dmn,
               HQ, GROUP, TQ, TK, q_offset, window, qk_scale,
               TQ_BUCKET, TK_BUCKET,
               IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
               HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    # heaviest (last) query blocks first: causal rows near the end see the most keys
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < TQ
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_base = KPM + b * stride_kpb
    dm_base = DM + b * stride_dmb + h * stride_dmh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_ranges(m0, q_offset, window, TK, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                                     offs_m, offs_d, lo, full_lo, q_offset, window, TQ, TK, qk_scale,
                                     True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK,
                                     BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                                     offs_m, offs_d, full_lo, full_hi, q_offset, window, TQ, TK, qk_scale,
                                     False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK,
                                     BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                                     offs_m, offs_d, full_hi, hi, q_offset, window, TQ, TK, qk_scale,
                                     True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK,
                                     BLOCK_N, HEAD_DIM, BLOCK_D)

    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # natural-log LSE; -inf for rows that saw no key
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE + pid_bh * TQ + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
               HQ, TQ, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < TQ)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * TQ + offs_m, delta, mask=offs_m < TQ)


@triton.jit
def _bwd_kv_block_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                        kp, dm_base, stride_dmm, stride_dmn,
                        offs_n, offs_d, lo, hi, q_offset, window, TQ, TK, qk_scale,
                        MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                        HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
                        BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < TK
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < TQ
        if MASKED or BLOCK_D != HEAD_DIM:
            ld_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld_mask, other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ld_mask, other=0.0)
        else:
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :])
        if MASKED:
            lse = tl.load(lse_base + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # rows that saw no key have lse = -inf; they get p = 0
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        qkT = _mma(k, tl.trans(q), None) * qk_scale
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED or HAS_KPM or HAS_DMASK:
            keep = n_ok[:, None] & m_ok[None, :]
            if MASKED:
                qpos = offs_m[None, :] + q_offset
                if IS_CAUSAL:
                    keep = keep & (offs_n[:, None] <= qpos)
                if HAS_WINDOW:
                    keep = keep & (offs_n[:, None] > qpos - window)
            if HAS_KPM:
                keep = keep & (kp != 0)[:, None]
            if HAS_DMASK:
                dm = tl.load(dm_base + offs_m[None, :] * stride_dmm + offs_n[:, None] * stride_dmn,
                             mask=m_ok[None, :] & n_ok[:, None], other=0)
                keep = keep & (dm != 0)
            pT = tl.where(keep, pT, 0.0)
        dv = _mma(pT.to(do.dtype), do, dv)
        dpT = _mma(v, tl.trans(do), None)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _query_ranges(n0, q_offset, window, TQ,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query ranges that see key block [n0, n0+BLOCK_N): masked / unmasked / masked."""
    lo = 0
    hi = TQ
    if IS_CAUSAL:
        lo = (tl.maximum(n0 - q_offset, 0) // BLOCK_M) * BLOCK_M
    full_lo = lo
    if IS_CAUSAL:
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - q_offset, 0), BLOCK_M) * BLOCK_M
    full_hi = (TQ // BLOCK_M) * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(TQ, tl.maximum(n0 + BLOCK_N - 1 - q_offset + window, 0))
        full_hi = tl.minimum(full_hi, (tl.maximum(n0 - q_offset + window, 0) // BLOCK_M) * BLOCK_M)
    full_lo = tl.maximum(tl.minimum(full_lo, hi), lo)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _flash_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, DM,
                    stride_qb, stride_qh, stride_qm,
                    stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn,
                    stride_dob, stride_doh, stride_dom,
                    stride_dkb, stride_dkh, stride_dkn,
                    stride_dvb, stride_dvh, stride_dvn,
                    stride_kpb, stride_kpn,
                    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                    HQ, HKV, GROUP, TQ, TK, q_offset, window, qk_scale, sm_scale,
                    TQ_BUCKET, TK_BUCKET,
                    IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bk = tl.program_id(0)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    n0 = tl.program_id(1) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < TK)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    kp = tl.zeros([BLOCK_N], dtype=tl.int8)
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_kpb + offs_n * stride_kpn, mask=offs_n < TK, other=0).to(tl.int8)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_ranges(n0, q_offset, window, TQ, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * HQ + h) * TQ
        delta_base = DELTA + (b * HQ + h) * TQ
        dm_base = DM + b * stride_dmb + h * stride_dmh
        dk, dv = _bwd_kv_block_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                     kp, dm_base, stride_dmm, stride_dmn, offs_n, offs_d, lo, full_lo,
                                     q_offset, window, TQ, TK, qk_scale,
                                     True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _bwd_kv_block_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                     kp, dm_base, stride_dmm, stride_dmn, offs_n, offs_d, full_lo, full_hi,
                                     q_offset, window, TQ, TK, qk_scale,
                                     False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _bwd_kv_block_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                                     kp, dm_base, stride_dmm, stride_dmn, offs_n, offs_d, full_hi, hi,
                                     q_offset, window, TQ, TK, qk_scale,
                                     True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_M, HEAD_DIM, BLOCK_D)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                       kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                       offs_m, offs_d, lo, hi, q_offset, window, TQ, TK, qk_scale,
                       MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                       HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        if MASKED or BLOCK_D != HEAD_DIM:
            ld_mask = n_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=ld_mask, other=0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=ld_mask, other=0.0)
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        qk = _mma(q, tl.trans(k), None) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED or HAS_KPM or HAS_DMASK:
            keep = n_ok[None, :] & (offs_m[:, None] < TQ)
            if MASKED:
                qpos = offs_m[:, None] + q_offset
                if IS_CAUSAL:
                    keep = keep & (offs_n[None, :] <= qpos)
                if HAS_WINDOW:
                    keep = keep & (offs_n[None, :] > qpos - window)
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n * stride_kpn, mask=n_ok, other=0)
                keep = keep & (kp != 0)[None, :]
            if HAS_DMASK:
                dm = tl.load(dm_base + offs_m[:, None] * stride_dmm + offs_n[None, :] * stride_dmn,
                             mask=(offs_m[:, None] < TQ) & n_ok[None, :], other=0)
                keep = keep & (dm != 0)
            p = tl.where(keep, p, 0.0)
        dp = _mma(do, tl.trans(v), None)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _flash_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, DM,
                  stride_qb, stride_qh, stride_qm,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_dom,
                  stride_dqb, stride_dqh, stride_dqm,
                  stride_kpb, stride_kpn,
                  stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                  HQ, GROUP, TQ, TK, q_offset, window, qk_scale, sm_scale,
                  TQ_BUCKET, TK_BUCKET,
                  IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < TQ
    ld_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=ld_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * TQ + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + pid_bh * TQ + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_base = KPM + b * stride_kpb
    dm_base = DM + b * stride_dmb + h * stride_dmh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_ranges(m0, q_offset, window, TK, IS_CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    dq = _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                            kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                            offs_m, offs_d, lo, full_lo, q_offset, window, TQ, TK, qk_scale,
                            True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                            kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                            offs_m, offs_d, full_lo, full_hi, q_offset, window, TQ, TK, qk_scale,
                            False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                            kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                            offs_m, offs_d, full_hi, hi, q_offset, window, TQ, TK, qk_scale,
                            True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=ld_mask)


# --------------------------------------------------------------------------------------------
# decode: few query rows against a long KV cache. All query heads of one KV head are packed
# into the rows of one tile (GQA packing), and the keys are split across programs (split-K).
# The partial results are merged by their log-sum-exp, either by the last program of each
# (batch, KV head) to finish (one launch: it counts arrivals on a self-resetting counter) or by
# a second kernel (MERGE == 2; kept as the simple reference path and for tests).
# --------------------------------------------------------------------------------------------


@triton.jit
def _flash_decode_split(Q, K, V, OPART, LPART, KPM, O, LSE, COUNTERS,
                        stride_qb, stride_qh, stride_qm,
                        stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn,
                        stride_kpb, stride_kpn, stride_ob, stride_oh, stride_om,
                        HQ, HKV, GROUP, TQ, TK, q_offset, window, qk_scale, split_len, NUM_SPLITS,
                        MERGE: tl.constexpr,
                        IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, MERGE_CHUNK: tl.constexpr):
    pid_bk = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    rows = tl.arange(0, BLOCK_R)
    r_ok = rows < GROUP * TQ
    g = rows // TQ
    t = rows % TQ
    h = hk * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + t[:, None] * stride_qm + offs_d[None, :],
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, TK)
    qpos = t + q_offset
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        qk = _mma(q, tl.trans(k), None) * qk_scale
        keep = n_ok[None, :] & r_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (offs_n[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            keep = keep & (offs_n[None, :] > qpos[:, None] - window)
        if HAS_KPM:
            kp = tl.load(KPM + b * stride_kpb + offs_n * stride_kpn, mask=n_ok, other=0)
            keep = keep & (kp != 0)[None, :]
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    lse2 = m_i + tl.math.log2(l_i)  # log2 domain, -inf if this split saw nothing
    o_ptrs = O + b * stride_ob + h[:, None] * stride_oh + t[:, None] * stride_om + offs_d[None, :]
    od_mask = r_ok[:, None] & d_ok[None, :]
    if MERGE == 0:  # a single split: write the final result
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=od_mask)
        tl.store(LSE + (b * HQ + h) * TQ + t, lse2 * _LN2, mask=r_ok)
    else:
        row0 = ((b * HQ + h) * TQ + t) * NUM_SPLITS
        tl.store(OPART + (row0 + split)[:, None] * HEAD_DIM + offs_d[None, :], out, mask=od_mask)
        tl.store(LPART + row0 + split, lse2, mask=r_ok)
        if MERGE == 1:
            # every thread's partial stores are issued before the (release) arrival, and the
            # program that arrives last reads them all after its (acquire) arrival
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNTERS + pid_bk, 1, sem="acq_rel")
            if arrived == NUM_SPLITS - 1:
                # one row at a time, a chunk of splits per load: the loads of a chunk are independent,
                # so the merge costs a few memory round trips instead of one per split
                offs_c = tl.arange(0, MERGE_CHUNK)
                for r in range(0, GROUP * TQ):
                    hr = hk * GROUP + r // TQ
                    tr = r % TQ
                    base = ((b * HQ + hr) * TQ + tr) * NUM_SPLITS
                    m = tl.full([], float("-inf"), dtype=tl.float32)
                    total = tl.zeros([], dtype=tl.float32)
                    acc_r = tl.zeros([BLOCK_D], dtype=tl.float32)
                    for s0 in range(0, NUM_SPLITS, MERGE_CHUNK):
                        s_ok = (s0 + offs_c) < NUM_SPLITS
                        ls = tl.load(LPART + base + s0 + offs_c, mask=s_ok, other=float("-inf"),
                                     cache_modifier=".cg")
                        os_ = tl.load(OPART + (base + s0 + offs_c)[:, None] * HEAD_DIM + offs_d[None, :],
                                      mask=s_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
                        m_new = tl.maximum(m, tl.max(ls, 0))
                        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                        w = tl.math.exp2(ls - m_use)
                        keep_old = tl.math.exp2(m - m_use)
                        total = total * keep_old + tl.sum(w, 0)
                        acc_r = acc_r * keep_old + tl.sum(os_ * w[:, None], 0)
                        m = m_new
                    m_use = tl.where(m == float("-inf"), 0.0, m)
                    tl.store(O + b * stride_ob + hr * stride_oh + tr * stride_om + offs_d,
                             (acc_r / tl.where(total == 0.0, 1.0, total)).to(O.dtype.element_ty), mask=d_ok)
                    tl.store(LSE + (b * HQ + hr) * TQ + tr, (m_use + tl.math.log2(total)) * _LN2)
                tl.atomic_xchg(COUNTERS + pid_bk, 0)  # ready for the next call (and CUDA graph replays)


@triton.jit
def _flash_decode_merge(OPART, LPART, O, LSE, stride_ob, stride_oh, stride_om, HQ, TQ, NUM_SPLITS,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)  # (b * HQ + h) * TQ + t
    t = row % TQ
    bh = row // TQ
    b = bh // HQ
    h = bh % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    lse2 = tl.load(LPART + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse2 - m_use)
    total = tl.sum(w, 0)
    o = tl.load(OPART + (row * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b * stride_ob + h * stride_oh + t * stride_om + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + row, (m_use + tl.math.log2(total)) * _LN2)


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------


def _cfgs(items):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in items]


_FWD_CONFIGS = _cfgs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                      (64, 64, 4, 3), (128, 32, 4, 4)])
_DKDV_CONFIGS = _cfgs([(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 2), (64, 128, 8, 2)])
_DQ_CONFIGS = _cfgs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 64, 8, 2)])
_TUNE_KEY = ["TQ_BUCKET", "TK_BUCKET", "HEAD_DIM", "IS_CAUSAL", "HAS_WINDOW", "HAS_KPM", "HAS_DMASK"]

_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_flash_fwd)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_TUNE_KEY)(_flash_bwd_dkdv)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_flash_bwd_dq)

# the interpreter runs one small tile so odd shapes cross several blocks in tests
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})
# float32 (exact IEEE dots) is for tests and reference-grade runs: one small tile, no tuning
_FP32_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
# ATTN_PATCH_AUTOTUNE=0 (read at import) skips autotuning: each kernel's first config is used
_AUTOTUNE = os.environ.get("ATTN_PATCH_AUTOTUNE", "1") != "0"
_FIXED = {id(_flash_fwd): _FWD_CONFIGS[0], id(_flash_bwd_dkdv): _DKDV_CONFIGS[0], id(_flash_bwd_dq): _DQ_CONFIGS[0]}


def _cdiv(a: int, b: int) -> int:
    # plain integer math: triton.cdiv / next_power_of_2 are constexpr functions whose calls cost
    # microseconds each in Triton >= 3.4, which adds up on the decode path
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _bucket(n: int) -> int:
    return _next_pow2(max(int(n), 16))


class _Launch:
    """Launch one of the prefill / backward kernels with the right tile configuration.

    Autotuning runs once per (device, dtype, length buckets, flags); after that the chosen
    configuration is launched through a CachedLauncher, which skips the autotuner's and Triton's
    per-call argument processing (about 130 us of host time per call on an H200 host: it made
    small models' prefill host-bound)."""

    def __init__(self, tuned, plain):
        self.tuned, self.plain = tuned, plain
        self.fast = CachedLauncher(plain)
        self.best: dict = {}

    def __call__(self, grid, args, meta):
        if _INTERPRETING:
            cfg = _INTERPRET_CONFIG
            self.plain[grid(cfg.kwargs)](*args, **meta, **cfg.kwargs)
            return
        if args[0].dtype == torch.float32:
            cfg = _FP32_CONFIG
        elif _AUTOTUNE:
            # the autotuner's key (the two length buckets are the last arguments) plus the flags
            key = (args[0].device.index, args[0].dtype, args[-2], args[-1], *meta.values())
            cfg = self.best.get(key)
            if cfg is None:
                self.tuned[grid](*args, **meta)  # tunes on the first call of a key, then launches
                self.best[key] = getattr(self.tuned, "best_config", None)
                return
        else:
            cfg = _FIXED[id(self.plain)]
        # constexprs in declared order: the flags, then BLOCK_M / BLOCK_N of the config
        self.fast(grid(cfg.kwargs), args, {**meta, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)


_FWD = _Launch(_fwd_tuned, _flash_fwd)
_DKDV = _Launch(_dkdv_tuned, _flash_bwd_dkdv)
_DQ = _Launch(_dq_tuned, _flash_bwd_dq)
_DELTA = CachedLauncher(_bwd_delta)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# --------------------------------------------------------------------------------------------
# python side
# --------------------------------------------------------------------------------------------


def as_bytes(mask: torch.Tensor) -> torch.Tensor:
    """A bool mask as the uint8 the kernels read: a free view eagerly; under torch.compile a copy,
    since Inductor cannot lower a bool -> uint8 view (LoweringException in torch.iinfo)."""
    if mask.dtype != torch.bool:
        return mask
    return mask.to(torch.uint8) if torch.compiler.is_compiling() else mask.view(torch.uint8)


@functools.lru_cache(maxsize=None)
def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros((1,), dtype=torch.uint8, device=device)


class _Masks:
    """Launch arguments for the optional masks (a dummy pointer and zero strides when absent)."""

    def __init__(self, q, key_padding, dense_mask):
        b, hq, tq, _ = q.shape
        dummy = _dummy(q.device)
        self.has_kpm = key_padding is not None
        self.has_dm = dense_mask is not None
        if key_padding is not None:
            self.kpm = as_bytes(key_padding)
            self.kpm_strides = (self.kpm.stride(0), self.kpm.stride(1))
        else:
            self.kpm, self.kpm_strides = dummy, (0, 0)
        if dense_mask is not None:
            dm = dense_mask
            if dm.dim() != 4:
                raise ValueError(f"dense_mask must be 4-D [B|1, H|1, Tq, Tk], got shape {tuple(dm.shape)}")
            self.dm = as_bytes(dm).expand(b, hq, tq, dm.shape[-1])
            self.dm_strides = tuple(self.dm.stride())
        else:
            self.dm, self.dm_strides = dummy, (0, 0, 0, 0)


def _check(q, k, v, key_padding, dense_mask, *, q_offset=None, window=None) -> tuple[int, int | None]:
    """The reference's argument contract (``reference.check_inputs``), then what only the kernels
    need: their dtypes, head dims and a CUDA device. Returns (q_offset, window) as ints."""
    q_offset, window = check_inputs(q, k, v, q_offset=q_offset, window=window, key_padding=key_padding,
                                    dense_mask=dense_mask)
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused kernel takes float16, bfloat16 or float32, got {q.dtype}; "
                        "use attention_reference (or backend='reference') for other dtypes")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM or d < 8:
        raise ValueError(f"head_dim {d} is not supported by the fused kernel (8 <= head_dim <= {MAX_HEAD_DIM}); "
                         "use attention_reference (or backend='reference') for other head dims")
    if not _INTERPRETING and q.device.type != "cuda":
        raise RuntimeError(f"the fused kernel runs on CUDA devices (got {q.device}); on CPU use the reference "
                           "backend, or set TRITON_INTERPRET=1 to run the Triton interpreter")
    return q_offset, window


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _forward(q, k, v, scale, causal, q_offset, window, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out_storage = torch.empty((b, tq, hq, d), device=q.device, dtype=q.dtype)
    o = out_storage.transpose(1, 2)  # [B, Hq, Tq, D] view; callers get [B, Tq, Hq, D] for free
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)
    block_d = max(16, _next_pow2(d))
    args = (q, k, v, o, lse, masks.kpm, masks.dm,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            *masks.kpm_strides, *masks.dm_strides,
            hq, hq // hkv, tq, tk, q_offset, window or 0, scale * LOG2E,
            _bucket(tq), _bucket(tk))
    meta = dict(IS_CAUSAL=causal, HAS_WINDOW=window is not None, HAS_KPM=masks.has_kpm,
                HAS_DMASK=masks.has_dm, HEAD_DIM=d, BLOCK_D=block_d)
    _FWD(lambda m: (b * hq, _cdiv(tq, m["BLOCK_M"])), args, meta)
    return o, lse


def _backward(do, q, k, v, o, lse, scale, causal, q_offset, window, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    block_d = max(16, _next_pow2(d))
    delta = torch.empty_like(lse)
    delta_args = (o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
                  hq, tq)
    _launch_small(_DELTA, (b * hq, _cdiv(tq, 64)), delta_args, dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64),
                  num_warps=4, num_stages=1)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    common = dict(IS_CAUSAL=causal, HAS_WINDOW=window is not None, HAS_KPM=masks.has_kpm,
                  HAS_DMASK=masks.has_dm, HEAD_DIM=d, BLOCK_D=block_d)
    win = window or 0
    kv_args = (q, k, v, do, lse, delta, dk, dv, masks.kpm, masks.dm,
               q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               do.stride(0), do.stride(1), do.stride(2),
               dk.stride(0), dk.stride(1), dk.stride(2),
               dv.stride(0), dv.stride(1), dv.stride(2),
               *masks.kpm_strides, *masks.dm_strides,
               hq, hkv, hq // hkv, tq, tk, q_offset, win, scale * LOG2E, scale, _bucket(tq), _bucket(tk))
    _DKDV(lambda m: (b * hkv, _cdiv(tk, m["BLOCK_N"])), kv_args, common)
    q_args = (q, k, v, do, lse, delta, dq, masks.kpm, masks.dm,
              q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              do.stride(0), do.stride(1), do.stride(2),
              dq.stride(0), dq.stride(1), dq.stride(2),
              *masks.kpm_strides, *masks.dm_strides,
              hq, hq // hkv, tq, tk, q_offset, win, scale * LOG2E, scale, _bucket(tq), _bucket(tk))
    _DQ(lambda m: (b * hq, _cdiv(tq, m["BLOCK_M"])), q_args, common)
    return dq, dk, dv


_DECODE_SPLIT = CachedLauncher(_flash_decode_split)
_DECODE_MERGE = CachedLauncher(_flash_decode_merge)


def _launch_small(launcher, grid, args, meta, num_warps, num_stages):
    if _INTERPRETING:
        launcher.fn[grid](*args, **meta)
    else:
        launcher(grid, args, meta, num_warps, num_stages)


# decode launch parameters (scripts/tune_decode.py sweeps them)
DECODE_BLOCK_N = 64
DECODE_STAGES = 3
DECODE_PROGRAMS_PER_SM = 2  # programs per SM; the H200 sweep put every setting within a few per cent
DECODE_MIN_SPLIT = 256  # keys per split: below this the merge costs more than the parallelism buys
DECODE_MAX_ROWS = 64
DECODE_MERGE_CHUNK = 32  # splits merged per load by the last program
# "fused": the last split to finish merges (one launch: least host time, for eager decoding);
# "kernel": a second, wider merge launch (least GPU time, for CUDA graphs); "auto": fused unless
# the stream is being captured into a CUDA graph
DECODE_MERGE = "auto"
DECODE_FUSED_MERGE_ROWS = 8  # "auto" merges in a second launch above this many rows per KV head


_COUNTERS: dict = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for the one-launch decode merge, one per (batch, KV head).

    The kernel leaves them at zero again, so one buffer per (device, stream) is reused across calls;
    a buffer first needed inside a CUDA graph capture is allocated (zeroed) in the graph instead."""
    key = (device, current_raw_stream(device.index or 0) if device.type == "cuda" else 0)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        buf = torch.zeros((max(n, 256),), device=device, dtype=torch.int32)
        if not capturing:
            _COUNTERS[key] = buf
    return buf


def _decode(q, k, v, scale, causal, q_offset, window, masks, num_splits=None, merge=None):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    block_n = 16 if _INTERPRETING else DECODE_BLOCK_N
    if num_splits is None:
        sms = 4 if _INTERPRETING else _num_sms(q.device.index or 0)
        num_splits = max(1, min(_cdiv(tk, DECODE_MIN_SPLIT),
                                 _cdiv(DECODE_PROGRAMS_PER_SM * sms, b * hkv)))
    split_len = _cdiv(_cdiv(tk, num_splits), block_n) * block_n
    num_splits = _cdiv(tk, split_len)
    block_d = max(16, _next_pow2(d))
    out_storage = torch.empty((b, tq, hq, d), device=q.device, dtype=q.dtype)
    o = out_storage.transpose(1, 2)
    merge = merge or DECODE_MERGE
    if merge == "auto":
        capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        # the fused merge is one program reading every split of every row of its KV head: right for a
        # token or two per head, serial for a chunk of rows (48 rows x 88 splits took ~100 us on the H200)
        merge = "kernel" if capturing or group * tq > DECODE_FUSED_MERGE_ROWS else "fused"
    elif merge not in ("fused", "kernel"):
        raise ValueError(f"decode merge must be 'auto', 'fused' or 'kernel', got {merge!r}")
    mode = 0 if num_splits == 1 else (1 if merge == "fused" else 2)
    n_lse = b * hq * tq
    if mode == 0:
        lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)
        opart = lpart = counters = lse
    else:  # one fp32 allocation: the log-sum-exps, then the partial outputs and their log-sum-exps
        rows = n_lse * num_splits
        work = torch.empty((n_lse + rows * (d + 1),), device=q.device, dtype=torch.float32)
        lse = work[:n_lse].view(b, hq, tq)
        opart, lpart = work[n_lse: n_lse + rows * d], work[n_lse + rows * d:]
        counters = _counters(q.device, b * hkv) if mode == 1 else lse
    qs, ks, vs, os_ = q.stride(), k.stride(), v.stride(), o.stride()
    split_args = (q, k, v, opart, lpart, masks.kpm, o, lse, counters, qs[0], qs[1], qs[2], ks[0], ks[1], ks[2],
                  vs[0], vs[1], vs[2], *masks.kpm_strides, os_[0], os_[1], os_[2],
                  hq, hkv, group, tq, tk, q_offset, window or 0, scale * LOG2E, split_len, num_splits)
    split_meta = dict(MERGE=mode, IS_CAUSAL=causal, HAS_WINDOW=window is not None, HAS_KPM=masks.has_kpm,
                      HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=max(16, _next_pow2(group * tq)),
                      BLOCK_N=block_n, MERGE_CHUNK=DECODE_MERGE_CHUNK)
    _launch_small(_DECODE_SPLIT, (b * hkv, num_splits), split_args, split_meta, num_warps=4,
                  num_stages=DECODE_STAGES)
    if mode == 2:
        merge_args = (opart, lpart, o, lse, os_[0], os_[1], os_[2], hq, tq, num_splits)
        merge_meta = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, _next_pow2(num_splits)))
        _launch_small(_DECODE_MERGE, (b * hq * tq,), merge_args, merge_meta, num_warps=4, num_stages=1)
    return o, lse


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, q_offset, window, key_padding, dense_mask):
        masks = _Masks(q, key_padding, dense_mask)
        o, lse = _forward(q, k, v, scale, causal, q_offset, window, masks)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.masks = masks
        ctx.args = (scale, causal, q_offset, window)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        scale, causal, q_offset, window = ctx.args
        dq, dk, dv = _backward(do, q, k, v, o, lse, scale, causal, q_offset, window, ctx.masks)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(
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
    decode: bool | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention. Returns (out [B, Hq, Tq, D], lse [B, Hq, Tq] natural log, fp32).

    ``out`` is a transposed view of a contiguous [B, Tq, Hq, D] tensor, which is the layout
    transformers wants back. Arguments mean what they mean in ``attention_reference``.
    ``decode=None`` picks the split-K decode kernel when there are few query rows per KV head
    (``group * Tq <= 64``), nothing needs gradients and no dense mask is given.
    """
    q_offset, window = _check(q, k, v, key_padding, dense_mask, q_offset=q_offset, window=window)
    if num_splits is not None:
        num_splits = _whole_number(num_splits, "num_splits (KV splits of the decode kernel, or None to size them "
                                   "from the GPU)", 1)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    tq, tk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    rows_per_kv_head = (q.shape[1] // k.shape[1]) * tq
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if decode is None:
        decode = rows_per_kv_head <= DECODE_MAX_ROWS and not needs_grad and dense_mask is None and tq < tk
    if decode:
        if needs_grad or dense_mask is not None or rows_per_kv_head > 128:
            raise ValueError("the decode kernel is forward-only, takes no dense_mask and at most 128 rows "
                             "per KV head; call with decode=False")
        return _decode(q, k, v, scale, causal, q_offset, window, _Masks(q, key_padding, None), num_splits)
    return _FlashAttention.apply(q, k, v, scale, causal, q_offset, window, key_padding, dense_mask)
