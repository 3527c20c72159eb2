"""Head-routed attention in Triton: attention computed only for selected (query row, query head)
pairs, forward and backward. The kernel behind the "moh" (mixture-of-head) method.

Same contract and family as ``flash.py``: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] as strided views,
GQA by indexing the KV head ``h // group`` (K/V never repeated; every KV head is kept), causal
alignment through ``q_offset``, sliding ``window``, a [B, Tk] ``key_padding`` mask and an optional
dense bool mask, fp16/bf16 with fp32 accumulation (fp32 with IEEE dots for tests). The selection is
``head_mask`` bool [B, Tq, Hq] (True = computed); unselected pairs get output 0 and gradient 0,
which is ``reference.head_routed_reference``.

Kernel design
- The selection is compacted per (batch, query head) into the ascending list of its selected rows
  (``compact_rows``: one small scan kernel, no host sync). Work is then proportional
  to the selected pairs: with half the heads active per token, each head's list is half as long.
- Forward and dQ: one program per (batch * query head, BLOCK_M list slots). It gathers its rows of
  q (and dO), then walks a contiguous key range exactly as the dense kernel does, so the dense
  kernel's block-range helpers are reused: keys before the first row's diagonal need no mask, the
  keys up to the last row's position (a wider band than dense, as the rows of a tile are spread
  over ~BLOCK_M / ratio positions) take the masked path. Out and dQ rows are scattered back.
- dK/dV: one program per (batch * KV head, BLOCK_N keys) looping over the query heads of its GQA
  group (no atomics). For each head the list slots whose rows see the key block form one suffix
  of the list (rows are ascending), found from a small table of ``searchsorted`` results per
  16 keys; slots are walked in BLOCK_M tiles of gathered q / dO rows, masked only at the causal
  edge and the ragged end.
- Log-sum-exp and the dO.O row sums are stored per list slot ([B*Hq, Tq], compact).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import flash as _flash
from .flash import (
    _INTERPRETING,
    _LN2,
    _LOG2E,
    LOG2E,
    _bucket,
    _bwd_q_block_range,
    _cdiv,
    _check,
    _fwd_block_range,
    _last_dim_contiguous,
    _launch_small,
    _Launch,
    _Masks,
    _mma,
    _next_pow2,
)
from .launch import CachedLauncher

GRANULE = 16  # keys per entry of the dK/dV slot table (the smallest BLOCK_N)


@triton.jit
def _span_key_ranges(r_lo, r_end, q_offset, window, TK,
                     IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for query rows spread over positions [r_lo, r_end): [lo, full_lo) masked,
    [full_lo, full_hi) seen by every row (no mask), [full_hi, hi) masked."""
    lo = 0
    hi = TK
    if IS_CAUSAL:
        hi = tl.minimum(TK, tl.maximum(r_end + q_offset, 0))
    full_hi = (TK // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, (tl.maximum(r_lo + q_offset + 1, 0) // BLOCK_N) * BLOCK_N)
    full_lo = lo
    if HAS_WINDOW:
        lo = (tl.maximum(r_lo + q_offset - window + 1, 0) // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(r_end + q_offset - window, 0)
        full_lo = tl.minimum(tl.cdiv(first_full, BLOCK_N) * BLOCK_N, hi)
        full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _tile_rows(ROWS, cnt, pid_bh, s0, TQ, BLOCK_M: tl.constexpr):
    """The rows of list slots [s0, s0 + BLOCK_M) of a list of ``cnt`` rows: slots past the count repeat
    the last row (a valid address whose result is never stored). Returns (slots, slot_ok, rows, first
    row, last row)."""
    slots = s0 + tl.arange(0, BLOCK_M)
    s_ok = slots < cnt
    last = tl.minimum(s0 + BLOCK_M, cnt) - 1
    r_last = tl.load(ROWS + pid_bh * TQ + last)
    r_first = tl.load(ROWS + pid_bh * TQ + s0)
    rows = tl.load(ROWS + pid_bh * TQ + slots, mask=s_ok, other=0)
    rows = tl.where(s_ok, rows, r_last)
    return slots, s_ok, rows, r_first, r_last


@triton.jit
def _moh_fwd(Q, K, V, O, LSE, KPM, DM, ROWS, CNT,
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
    # last slots first: their rows are the latest positions and see the most keys
    s0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    cnt = tl.load(CNT + pid_bh)
    if s0 >= cnt:
        return
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    slots, s_ok, rows, r_first, r_last = _tile_rows(ROWS, cnt, pid_bh, s0, TQ, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_base = KPM + b * stride_kpb
    dm_base = DM + b * stride_dmb + h * stride_dmh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _span_key_ranges(r_first, r_last + 1, q_offset, window, TK,
                                                IS_CAUSAL, HAS_WINDOW, BLOCK_N)
    acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                                     rows, offs_d, lo, full_lo, q_offset, window, TQ, TK, qk_scale,
                                     True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK,
                                     BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                                     rows, offs_d, full_lo, full_hi, q_offset, window, TQ, TK, qk_scale,
                                     False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK,
                                     BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_block_range(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                     kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                                     rows, offs_d, full_hi, hi, q_offset, window, TQ, TK, qk_scale,
                                     True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK,
                                     BLOCK_N, HEAD_DIM, BLOCK_D)
    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=s_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE + pid_bh * TQ + slots, lse, mask=s_ok)


@triton.jit
def _moh_delta(O, DO, DELTA, ROWS, CNT, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
               HQ, TQ, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(0)
    s0 = tl.program_id(1) * BLOCK_M
    cnt = tl.load(CNT + pid_bh)
    if s0 >= cnt:
        return
    b = pid_bh // HQ
    h = pid_bh % HQ
    slots, s_ok, rows, r_first, r_last = _tile_rows(ROWS, cnt, pid_bh, s0, TQ, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = s_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * TQ + slots, delta, mask=s_ok)


@triton.jit
def _moh_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, DM, ROWS, CNT,
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
    s0 = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    cnt = tl.load(CNT + pid_bh)
    if s0 >= cnt:
        return
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    slots, s_ok, rows, r_first, r_last = _tile_rows(ROWS, cnt, pid_bh, s0, TQ, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                mask=d_ok[None, :], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=d_ok[None, :], other=0.0)
    lse = tl.load(LSE + pid_bh * TQ + slots, mask=s_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + pid_bh * TQ + slots, mask=s_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_base = KPM + b * stride_kpb
    dm_base = DM + b * stride_dmb + h * stride_dmh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _span_key_ranges(r_first, r_last + 1, q_offset, window, TK,
                                                IS_CAUSAL, HAS_WINDOW, BLOCK_N)
    dq = _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                            kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                            rows, offs_d, lo, full_lo, q_offset, window, TQ, TK, qk_scale,
                            True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                            kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                            rows, offs_d, full_lo, full_hi, q_offset, window, TQ, TK, qk_scale,
                            False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = _bwd_q_block_range(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                            kpm_base, stride_kpn, dm_base, stride_dmm, stride_dmn,
                            rows, offs_d, full_hi, hi, q_offset, window, TQ, TK, qk_scale,
                            True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=s_ok[:, None] & d_ok[None, :])


@triton.jit
def _kv_slot_range(dk, dv, k, v, kp, rows_base, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                   dm_base, stride_dmm, stride_dmn, offs_n, offs_d, s_lo, s_hi, q_offset, window, TK, qk_scale,
                   MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   HAS_KPM: tl.constexpr, HAS_DMASK: tl.constexpr,
                   BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK/dV of one key block from list slots [s_lo, s_hi) of one query head. Unmasked calls get
    whole tiles whose rows all see every key of the block."""
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < TK
    for start in range(s_lo, s_hi, BLOCK_M):
        slots = start + tl.arange(0, BLOCK_M)
        if MASKED:
            s_ok = slots < s_hi
            rows = tl.load(rows_base + slots, mask=s_ok, other=0)
            ld_mask = s_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=ld_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=ld_mask, other=0.0)
            lse = tl.load(lse_base + slots, mask=s_ok, other=float("inf"))
            delta = tl.load(delta_base + slots, mask=s_ok, other=0.0)
        else:
            rows = tl.load(rows_base + slots)
            q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + slots)
            delta = tl.load(delta_base + slots)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        qkT = _mma(k, tl.trans(q), None) * qk_scale
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED or HAS_KPM or HAS_DMASK:
            keep = n_ok[:, None] & (rows >= 0)[None, :]
            if MASKED:
                qpos = rows[None, :] + q_offset
                if IS_CAUSAL:
                    keep = keep & (offs_n[:, None] <= qpos)
                if HAS_WINDOW:
                    keep = keep & (offs_n[:, None] > qpos - window)
            if HAS_KPM:
                keep = keep & (kp != 0)[:, None]
            if HAS_DMASK:
                dm = tl.load(dm_base + rows[None, :] * stride_dmm + offs_n[:, None] * stride_dmn,
                             mask=n_ok[:, None], other=0)
                keep = keep & (dm != 0)
            pT = tl.where(keep, pT, 0.0)
        dv = _mma(pT.to(do.dtype), do, dv)
        dpT = _mma(v, tl.trans(do), None)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _moh_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, DM, ROWS, CNT, STARTS, ENDS,
                  stride_qb, stride_qh, stride_qm,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_dob, stride_doh, stride_dom,
                  stride_dkb, stride_dkh, stride_dkn,
                  stride_dvb, stride_dvh, stride_dvn,
                  stride_kpb, stride_kpn,
                  stride_dmb, stride_dmh, stride_dmm, stride_dmn,
                  HQ, HKV, GROUP, TQ, TK, NG, q_offset, window, qk_scale, sm_scale,
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
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask,
                other=0.0)
    kp = tl.zeros([BLOCK_N], dtype=tl.int8)
    if HAS_KPM:
        kp = tl.load(KPM + b * stride_kpb + offs_n * stride_kpn, mask=offs_n < TK, other=0).to(tl.int8)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    g_lo = n0 // 16
    g_hi = (n0 + BLOCK_N) // 16
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        cnt = tl.load(CNT + bh)
        # slots whose rows see some key of the block: rows >= n0 - q_offset (causal) and, with a
        # window, rows <= n0 + BLOCK_N + window - 2 - q_offset; all of them masked with a window
        s_lo = 0
        s_full = 0
        s_hi = cnt
        if IS_CAUSAL:
            s_lo = tl.minimum(tl.load(STARTS + bh * NG + g_lo), cnt)
            s_full = tl.minimum(tl.load(STARTS + bh * NG + g_hi), cnt)
        if HAS_WINDOW:
            s_hi = tl.minimum(tl.load(ENDS + bh * NG + g_hi), cnt)
            s_full = s_hi
        s_hi = tl.maximum(s_hi, s_lo)
        # the masked head [s_lo, s_mid) ends on a tile edge; whole unmasked tiles [s_mid, s_tail);
        # a masked ragged tail
        s_mid = tl.minimum(s_lo + tl.cdiv(s_full - s_lo, BLOCK_M) * BLOCK_M, s_hi)
        s_tail = s_mid + ((s_hi - s_mid) // BLOCK_M) * BLOCK_M
        rows_base = ROWS + bh * TQ
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + bh * TQ
        delta_base = DELTA + bh * TQ
        dm_base = DM + b * stride_dmb + h * stride_dmh
        dk, dv = _kv_slot_range(dk, dv, k, v, kp, rows_base, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_dom, dm_base, stride_dmm, stride_dmn, offs_n, offs_d,
                                s_lo, s_mid, q_offset, window, TK, qk_scale,
                                True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _kv_slot_range(dk, dv, k, v, kp, rows_base, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_dom, dm_base, stride_dmm, stride_dmn, offs_n, offs_d,
                                s_mid, s_tail, q_offset, window, TK, qk_scale,
                                False, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _kv_slot_range(dk, dv, k, v, kp, rows_base, q_base, do_base, lse_base, delta_base,
                                stride_qm, stride_dom, dm_base, stride_dmm, stride_dmn, offs_n, offs_d,
                                s_tail, s_hi, q_offset, window, TK, qk_scale,
                                True, IS_CAUSAL, HAS_WINDOW, HAS_KPM, HAS_DMASK, BLOCK_M, HEAD_DIM, BLOCK_D)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# launch configurations: the dense kernel's candidates (the per-tile work is the same)
# --------------------------------------------------------------------------------------------

_TUNE_KEY = _flash._TUNE_KEY
_fwd_tuned = triton.autotune(_flash._FWD_CONFIGS, key=_TUNE_KEY)(_moh_fwd)
_dq_tuned = triton.autotune(_flash._DQ_CONFIGS, key=_TUNE_KEY)(_moh_bwd_dq)
_dkdv_tuned = triton.autotune(_flash._DKDV_CONFIGS, key=_TUNE_KEY)(_moh_bwd_dkdv)
_flash._FIXED.update({id(_moh_fwd): _flash._FWD_CONFIGS[0], id(_moh_bwd_dq): _flash._DQ_CONFIGS[0],
                      id(_moh_bwd_dkdv): _flash._DKDV_CONFIGS[0]})
_FWD = _Launch(_fwd_tuned, _moh_fwd)
_DQ = _Launch(_dq_tuned, _moh_bwd_dq)
_DKDV = _Launch(_dkdv_tuned, _moh_bwd_dkdv)
_DELTA = CachedLauncher(_moh_delta)


# --------------------------------------------------------------------------------------------
# python side
# --------------------------------------------------------------------------------------------


@triton.jit
def _compact(MASK, ROWS, CNT, stride_mb, stride_mt, stride_mh, HQ, TQ, BLOCK: tl.constexpr):
    """One program per (batch, head): the ascending selected rows, then TQ as filler, and the count."""
    pid = tl.program_id(0)
    b = pid // HQ
    h = pid % HQ
    count = 0
    for t0 in range(0, TQ, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        sel = tl.load(MASK + b * stride_mb + offs * stride_mt + h * stride_mh, mask=offs < TQ, other=0).to(tl.int32)
        slot = count + tl.cumsum(sel, 0) - 1
        tl.store(ROWS + pid * TQ + slot, offs, mask=sel != 0)
        count += tl.sum(sel, 0)
    for s0 in range(0, TQ, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        tl.store(ROWS + pid * TQ + offs, tl.zeros([BLOCK], dtype=tl.int32) + TQ, mask=(offs >= count) & (offs < TQ))
    tl.store(CNT + pid, count)


_COMPACT = CachedLauncher(_compact)


def compact_rows(head_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [B, Tq, Hq] -> (rows int32 [B, Hq, Tq], counts int32 [B, Hq]): per (batch, head) the
    ascending selected rows first, then ``Tq`` as filler. One small kernel, no host sync."""
    if head_mask.dtype != torch.bool or head_mask.dim() != 3:
        raise ValueError(f"head_mask must be bool [batch, q_len, q_heads], got {head_mask.dtype} "
                         f"{tuple(head_mask.shape)}")
    b, t, h = head_mask.shape
    rows = torch.empty((b, h, t), dtype=torch.int32, device=head_mask.device)
    counts = torch.empty((b, h), dtype=torch.int32, device=head_mask.device)
    if rows.numel() == 0:
        return rows, counts.zero_()
    mask = _flash.as_bytes(head_mask)
    args = (mask, rows, counts, mask.stride(0), mask.stride(1), mask.stride(2), h, t)
    _launch_small(_COMPACT, (b * h,), args, dict(BLOCK=64 if _INTERPRETING else 1024), num_warps=4, num_stages=1)
    return rows, counts


def _slot_tables(rows, tq, tk, q_offset, window, causal):
    """(starts, ends, NG) int32 [B*Hq, NG]: for key granule j (keys from 16*j), starts[j] is the
    first slot whose row is >= 16*j - q_offset (causal visibility) and ends[j] the number of rows
    <= 16*j + window - 2 - q_offset (rows that can still see a key before 16*j, with a window)."""
    bh = rows.shape[0] * rows.shape[1]
    ng = _cdiv(tk, GRANULE) + 128 // GRANULE + 1  # room for n0 + BLOCK_N of the last key block
    flat = rows.view(bh, tq)
    edges = torch.arange(ng, device=rows.device, dtype=torch.int32) * GRANULE
    starts = ends = None
    if causal:
        starts = torch.searchsorted(flat, (edges - q_offset).expand(bh, ng).contiguous(), out_int32=True)
    if window is not None:
        ends = torch.searchsorted(flat, (edges + window - 2 - q_offset).expand(bh, ng).contiguous(),
                                  right=True, out_int32=True)
    return starts, ends, ng


def _forward(q, k, v, rows, counts, scale, causal, q_offset, window, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out_storage = torch.zeros((b, tq, hq, d), device=q.device, dtype=q.dtype)
    o = out_storage.transpose(1, 2)
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)  # per list slot; past the count unused
    if o.numel() == 0:
        return o, lse
    args = (q, k, v, o, lse, masks.kpm, masks.dm, rows, counts,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            *masks.kpm_strides, *masks.dm_strides,
            hq, hq // hkv, tq, tk, q_offset, window or 0, scale * LOG2E,
            _bucket(tq), _bucket(tk))
    meta = dict(IS_CAUSAL=causal, HAS_WINDOW=window is not None, HAS_KPM=masks.has_kpm,
                HAS_DMASK=masks.has_dm, HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)))
    _FWD(lambda m: (b * hq, _cdiv(tq, m["BLOCK_M"])), args, meta)
    return o, lse


def _backward(do, q, k, v, o, lse, rows, counts, scale, causal, q_offset, window, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    do = _last_dim_contiguous(do)
    block_d = max(16, _next_pow2(d))
    dq = torch.zeros_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    delta_args = (o, do, delta, rows, counts, o.stride(0), o.stride(1), o.stride(2),
                  do.stride(0), do.stride(1), do.stride(2), hq, tq)
    _launch_small(_DELTA, (b * hq, _cdiv(tq, 64)), delta_args, dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64),
                  num_warps=4, num_stages=1)
    starts, ends, ng = _slot_tables(rows, tq, tk, q_offset, window, causal)
    dummy = counts
    common = dict(IS_CAUSAL=causal, HAS_WINDOW=window is not None, HAS_KPM=masks.has_kpm,
                  HAS_DMASK=masks.has_dm, HEAD_DIM=d, BLOCK_D=block_d)
    win = window or 0
    kv_args = (q, k, v, do, lse, delta, dk, dv, masks.kpm, masks.dm, rows, counts,
               dummy if starts is None else starts, dummy if ends is None else ends,
               q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               do.stride(0), do.stride(1), do.stride(2),
               dk.stride(0), dk.stride(1), dk.stride(2),
               dv.stride(0), dv.stride(1), dv.stride(2),
               *masks.kpm_strides, *masks.dm_strides,
               hq, hkv, hq // hkv, tq, tk, ng, q_offset, win, scale * LOG2E, scale, _bucket(tq), _bucket(tk))
    _DKDV(lambda m: (b * hkv, _cdiv(tk, m["BLOCK_N"])), kv_args, common)
    q_args = (q, k, v, do, lse, delta, dq, masks.kpm, masks.dm, rows, counts,
              q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              do.stride(0), do.stride(1), do.stride(2),
              dq.stride(0), dq.stride(1), dq.stride(2),
              *masks.kpm_strides, *masks.dm_strides,
              hq, hq // hkv, tq, tk, q_offset, win, scale * LOG2E, scale, _bucket(tq), _bucket(tk))
    _DQ(lambda m: (b * hq, _cdiv(tq, m["BLOCK_M"])), q_args, common)
    return dq, dk, dv


class _HeadRoutedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rows, counts, scale, causal, q_offset, window, key_padding, dense_mask):
        masks = _Masks(q, key_padding, dense_mask)
        o, lse = _forward(q, k, v, rows, counts, scale, causal, q_offset, window, masks)
        ctx.save_for_backward(q, k, v, o, lse, rows, counts)
        ctx.masks = masks
        ctx.args = (scale, causal, q_offset, window)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, rows, counts = ctx.saved_tensors
        scale, causal, q_offset, window = ctx.args
        dq, dk, dv = _backward(do, q, k, v, o, lse, rows, counts, scale, causal, q_offset, window, ctx.masks)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def head_routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    head_mask: torch.Tensor | None = None,
    *,
    rows: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | None = None,
    window: int | None = None,
    key_padding: torch.Tensor | None = None,
    dense_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention for the selected (query row, query head) pairs only.

    ``head_mask`` bool [B, Tq, Hq] (True = computed), or its compact form ``rows``/``counts`` from
    ``compact_rows``. Returns (out [B, Hq, Tq, D], lse [B, Hq, Tq] per list slot (slots past a head's count
    are undefined), fp32); ``out`` is
    a transposed view of a contiguous [B, Tq, Hq, D] tensor, zero for unselected pairs. The other
    arguments mean what they mean in ``attention_reference``. Differentiable in q, k, v.
    """
    _check(q, k, v, key_padding, dense_mask)
    b, hq, tq = q.shape[:3]
    if rows is None:
        if head_mask is None:
            raise ValueError("give head_mask (bool [batch, q_len, q_heads]) or rows and counts")
        if tuple(head_mask.shape) != (b, tq, hq):
            raise ValueError(f"head_mask must be [batch, q_len, q_heads] = {(b, tq, hq)}, got {tuple(head_mask.shape)}")
        if head_mask.device != q.device:
            raise ValueError(f"head_mask is on {head_mask.device}, q on {q.device}")
        rows, counts = compact_rows(head_mask)
    elif counts is None or tuple(rows.shape) != (b, hq, tq) or tuple(counts.shape) != (b, hq) \
            or rows.dtype != torch.int32 or counts.dtype != torch.int32:
        raise ValueError("rows must be int32 [batch, q_heads, q_len] and counts int32 [batch, q_heads] "
                         "(see compact_rows)")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    tk = k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_offset = tk - tq if q_offset is None else int(q_offset)
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return _HeadRoutedAttention.apply(q, k, v, rows, counts, scale, bool(causal), q_offset, window, key_padding,
                                      dense_mask)


__all__ = ["head_routed_attention", "compact_rows", "GRANULE"]
