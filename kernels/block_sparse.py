"""Block-sparse attention in Triton over compact per-row block lists: forward and backward.

Same contract and family as ``flash.py`` (layouts, GQA without repeating K/V, causal alignment
through ``q_offset``, a [B, Tk] ``key_padding`` mask, fp16/bf16 with fp32 accumulation, fp32 with
IEEE dots for tests, natural-log LSE, empty rows giving out 0 and lse -inf); the selection is that
of ``reference.attention_reference(..., block_indices=, block_counts=, block_size=)``:

- ``block_indices`` [B|1, Hsel, NQB, MAXB] (int32 or int64), NQB = ceil(Tq / block_size): for query
  block i (query rows [i*bs, (i+1)*bs)) the key blocks it attends to (keys [j*bs, (j+1)*bs)), the
  first ``block_counts[b, h, i]`` entries valid and strictly ascending, the rest ignored;
- ``block_counts`` [B|1, Hsel, NQB]; Hsel is Hq (a selection per query head) or Hkv (one per GQA
  group; any divisor of Hq works: query head h reads row h // (Hq // Hsel)).

Causal / ``q_offset`` / ``key_padding`` apply on top of the selection, element by element.

Kernel design
- Forward and dQ: one program per (batch * query head, BLOCK_M rows); it walks only its own list.
  Because the list is sorted, the blocks that need per-element masking (crossing the causal
  boundary, the ragged last key block) are at its end: a short vectorised count splits the list
  into a prefix of fully visible blocks (no mask, unmasked loads) and a masked remainder, and
  entries that no row of the tile can see (beyond the causal reach, or >= NKB) are dropped. Each
  part is one flat loop over (list entry, BLOCK_N sub-tile of the block), so the compiler can
  software-pipeline the K/V loads behind the index load (num_stages).
- dK/dV: one program per (batch * KV head, BLOCK_N keys); it loops over the query heads of its
  GQA group and, for each, over the transposed list of that head's selection (the query blocks
  that selected this key block), accumulating dK/dV in registers: no atomics and no per-query-head
  partial dK/dV buffers. The transposed lists are a CSR built on the device with torch ops (one
  stable sort of the valid entries by (selection row, key block); ``searchsorted`` for the row
  starts); they cost int32 per selected (query block, key block) pair plus the sort's temporaries
  (an int32 key and an int64 permutation per slot of ``block_indices``). Sorted ascending, a
  transposed list starts with the query blocks crossing the causal diagonal and ends with the
  ragged last query block; only those two ends take the masked path.

The per-tile bodies mirror flash.py's block-range helpers, which cannot be reused as they are:
they loop over a contiguous key range internally, and a one-iteration inner loop would keep the
outer list loop from being pipelined.
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

INDEX_DTYPES = (torch.int32, torch.int64)


# --------------------------------------------------------------------------------------------
# list helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _count_below(row, stride, n, lim_a, lim_b, CHUNK: tl.constexpr):
    """How many of the first n entries of a list are < lim_a and < lim_b (one vector load per
    CHUNK entries: proportional to the list, not to the number of blocks)."""
    na = tl.zeros([], dtype=tl.int32)
    nb = tl.zeros([], dtype=tl.int32)
    for c in range(0, n, CHUNK):
        offs = c + tl.arange(0, CHUNK)
        ok = offs < n
        idx = tl.load(row + offs * stride, mask=ok, other=0)
        na += tl.sum((ok & (idx < lim_a)).to(tl.int32), 0)
        nb += tl.sum((ok & (idx < lim_b)).to(tl.int32), 0)
    return na, nb


@triton.jit
def _row_split(row, stride, cnt, m0, q_offset, TQ, TK,
               IS_CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
               CHUNK: tl.constexpr):
    """Entries [0, n_full) of a sorted row list are key blocks every row of the tile
    [m0, m0 + BLOCK_M) sees entirely; [n_full, n_vis) need masks; the rest no row sees."""
    nkb_full = TK // BLOCK_SIZE
    reach = TK  # keys [0, reach) are visible to some row of the tile
    if IS_CAUSAL:
        nkb_full = tl.minimum(nkb_full, tl.maximum(m0 + q_offset + 1, 0) // BLOCK_SIZE)
        reach = tl.minimum(TK, tl.maximum(tl.minimum(m0 + BLOCK_M, TQ) + q_offset, 0))
    nkb_vis = (reach + BLOCK_SIZE - 1) // BLOCK_SIZE
    n_full, n_vis = _count_below(row, stride, cnt, nkb_full, nkb_vis, CHUNK)
    return n_full, tl.maximum(n_vis, n_full)


@triton.jit
def _program(ROWS_FASTEST: tl.constexpr, LAST_FIRST: tl.constexpr):
    """(batch * head, tile) of this program; LAST_FIRST walks the tiles from the end (query tiles:
    with causal selections the last ones usually hold the longest lists; key tiles are heaviest
    first as they are). ROWS_FASTEST: the grid is (tiles, batch * heads), so the programs in flight
    at once share a head and its K/V (or Q/dO) stays in L2; else (batch * heads, tiles)."""
    if ROWS_FASTEST:
        bh, t, n = tl.program_id(1), tl.program_id(0), tl.num_programs(0)
    else:
        bh, t, n = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    if LAST_FIRST:
        t = n - 1 - t
    return bh, t


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_list(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
              row, stride_row, lo, hi, offs_m, offs_d, q_offset, TK, qk_scale,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online softmax over list entries [lo, hi), each key block in BLOCK_SIZE // BLOCK_N tiles."""
    SUBS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    d_ok = offs_d < HEAD_DIM
    for it in range(lo * SUBS, hi * SUBS):
        blk = tl.load(row + (it // SUBS) * stride_row)
        offs_n = blk * BLOCK_SIZE + (it % SUBS) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < TK
        if MASKED:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :])
        else:
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = _mma(q, tl.trans(k), None) * qk_scale
        if MASKED or HAS_KPM:
            keep = n_ok[None, :] & (offs_m[:, None] >= 0)
            if MASKED and IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + q_offset)
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
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif BLOCK_D == HEAD_DIM:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = _mma(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bs_fwd(Q, K, V, O, LSE, KPM, IDX, CNT,
            stride_qb, stride_qh, stride_qm,
            stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn,
            stride_ob, stride_oh, stride_om,
            stride_kpb, stride_kpn,
            stride_ib, stride_ih, stride_im, stride_ij,
            stride_cb, stride_ch, stride_cm,
            HQ, GROUP, SEL_DIV, MAXB, TQ, TK, q_offset, qk_scale,
            IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ROWS_FASTEST: tl.constexpr):
    pid_bh, pid_m = _program(ROWS_FASTEST, True)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    hs = h // SEL_DIV
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

    qblk = m0 // BLOCK_SIZE
    row = IDX + b * stride_ib + hs * stride_ih + qblk * stride_im
    cnt = tl.minimum(tl.load(CNT + b * stride_cb + hs * stride_ch + qblk * stride_cm).to(tl.int32), MAXB)
    n_full, n_vis = _row_split(row, stride_ij, cnt, m0, q_offset, TQ, TK, IS_CAUSAL, BLOCK_SIZE, BLOCK_M, CHUNK)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_list(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
                              row, stride_ij, 0, n_full, offs_m, offs_d, q_offset, TK, qk_scale,
                              False, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D)
    acc, l_i, m_i = _fwd_list(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
                              row, stride_ij, n_full, n_vis, offs_m, offs_d, q_offset, TK, qk_scale,
                              True, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D)

    l_div = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_div[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2  # natural log; -inf for rows that saw no key
    tl.store(LSE + pid_bh * TQ + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward: dQ over the row lists
# --------------------------------------------------------------------------------------------


@triton.jit
def _dq_list(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
             row, stride_row, lo, hi, offs_m, offs_d, q_offset, TQ, TK, qk_scale,
             MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    SUBS: tl.constexpr = BLOCK_SIZE // BLOCK_N
    d_ok = offs_d < HEAD_DIM
    for it in range(lo * SUBS, hi * SUBS):
        blk = tl.load(row + (it // SUBS) * stride_row)
        offs_n = blk * BLOCK_SIZE + (it % SUBS) * BLOCK_N + tl.arange(0, BLOCK_N)
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
        if MASKED or HAS_KPM:
            keep = n_ok[None, :] & (offs_m[:, None] < TQ)
            if MASKED and IS_CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + q_offset)
            if HAS_KPM:
                kp = tl.load(kpm_base + offs_n * stride_kpn, mask=n_ok, other=0)
                keep = keep & (kp != 0)[None, :]
            p = tl.where(keep, p, 0.0)
        dp = _mma(do, tl.trans(v), None)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _bs_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, IDX, CNT,
               stride_qb, stride_qh, stride_qm,
               stride_kb, stride_kh, stride_kn,
               stride_vb, stride_vh, stride_vn,
               stride_dob, stride_doh, stride_dom,
               stride_dqb, stride_dqh, stride_dqm,
               stride_kpb, stride_kpn,
               stride_ib, stride_ih, stride_im, stride_ij,
               stride_cb, stride_ch, stride_cm,
               HQ, GROUP, SEL_DIV, MAXB, TQ, TK, q_offset, qk_scale, sm_scale,
               IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ROWS_FASTEST: tl.constexpr):
    pid_bh, pid_m = _program(ROWS_FASTEST, True)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    hs = h // SEL_DIV
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < TQ
    ld_mask = m_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=ld_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
                 mask=ld_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * TQ + offs_m, mask=m_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)  # empty rows: p = 0
    delta = tl.load(DELTA + pid_bh * TQ + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpm_base = KPM + b * stride_kpb

    qblk = m0 // BLOCK_SIZE
    row = IDX + b * stride_ib + hs * stride_ih + qblk * stride_im
    cnt = tl.minimum(tl.load(CNT + b * stride_cb + hs * stride_ch + qblk * stride_cm).to(tl.int32), MAXB)
    n_full, n_vis = _row_split(row, stride_ij, cnt, m0, q_offset, TQ, TK, IS_CAUSAL, BLOCK_SIZE, BLOCK_M, CHUNK)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_list(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
                  row, stride_ij, 0, n_full, offs_m, offs_d, q_offset, TQ, TK, qk_scale,
                  False, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = _dq_list(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, kpm_base, stride_kpn,
                  row, stride_ij, n_full, n_vis, offs_m, offs_d, q_offset, TQ, TK, qk_scale,
                  True, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_N, HEAD_DIM, BLOCK_D)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=ld_mask)


# --------------------------------------------------------------------------------------------
# backward: dK / dV over the transposed lists
# --------------------------------------------------------------------------------------------


@triton.jit
def _dkdv_list(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
               col, lo, hi, offs_n, offs_d, q_offset, TQ, TK, qk_scale,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """dK/dV of one key tile from the query blocks col[lo:hi], each in BLOCK_SIZE // BLOCK_M tiles."""
    SUBS: tl.constexpr = BLOCK_SIZE // BLOCK_M
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < TK
    for it in range(lo * SUBS, hi * SUBS):
        qblk = tl.load(col + it // SUBS)
        offs_m = qblk * BLOCK_SIZE + (it % SUBS) * BLOCK_M + tl.arange(0, BLOCK_M)
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
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        qkT = _mma(k, tl.trans(q), None) * qk_scale
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED or HAS_KPM:
            keep = n_ok[:, None] & m_ok[None, :]
            if MASKED and IS_CAUSAL:
                keep = keep & (offs_n[:, None] <= offs_m[None, :] + q_offset)
            if HAS_KPM:
                keep = keep & (kp != 0)[:, None]
            pT = tl.where(keep, pT, 0.0)
        dv = _mma(pT.to(do.dtype), do, dv)
        dpT = _mma(v, tl.trans(do), None)
        dsT = pT * (dpT - delta[None, :])
        dk = _mma(dsT.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _bs_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, PTR, COL,
                 stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom,
                 stride_dkb, stride_dkh, stride_dkn,
                 stride_dvb, stride_dvh, stride_dvn,
                 stride_kpb, stride_kpn,
                 stride_pb, stride_ph,
                 HQ, HKV, GROUP, SEL_DIV, TQ, TK, q_offset, qk_scale, sm_scale,
                 IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, ROWS_FASTEST: tl.constexpr):
    pid_bk, pid_n = _program(ROWS_FASTEST, False)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    n0 = pid_n * BLOCK_N
    kblk = n0 // BLOCK_SIZE
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
    # query blocks < qb_lo cross the causal diagonal of this key tile; blocks >= qb_hi are the
    # ragged end (all of them when the key tile itself is ragged): both take the masked path
    qb_lo = 0
    if IS_CAUSAL:
        qb_lo = (tl.maximum(n0 + BLOCK_N - 1 - q_offset, 0) + BLOCK_SIZE - 1) // BLOCK_SIZE
    qb_hi = tl.where(n0 + BLOCK_N > TK, 0, TQ // BLOCK_SIZE)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        hs = h // SEL_DIV
        ptr = PTR + b * stride_pb + hs * stride_ph + kblk
        start = tl.load(ptr)
        n = tl.load(ptr + 1) - start
        col = COL + start
        n_lo, n_hi = _count_below(col, 1, n, qb_lo, qb_hi, CHUNK)
        n_hi = tl.maximum(n_hi, n_lo)
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * HQ + h) * TQ
        delta_base = DELTA + (b * HQ + h) * TQ
        dk, dv = _dkdv_list(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                            col, 0, n_lo, offs_n, offs_d, q_offset, TQ, TK, qk_scale,
                            True, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _dkdv_list(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                            col, n_lo, n_hi, offs_n, offs_d, q_offset, TQ, TK, qk_scale,
                            False, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_M, HEAD_DIM, BLOCK_D)
        dk, dv = _dkdv_list(dk, dv, k, v, kp, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                            col, n_hi, n, offs_n, offs_d, q_offset, TQ, TK, qk_scale,
                            True, IS_CAUSAL, HAS_KPM, BLOCK_SIZE, BLOCK_M, HEAD_DIM, BLOCK_D)
    dk = dk * sm_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


# --------------------------------------------------------------------------------------------
# launch configurations (fixed; no autotuning yet)
# --------------------------------------------------------------------------------------------

_FWD = CachedLauncher(_bs_fwd)
_DQ = CachedLauncher(_bs_bwd_dq)
_DKDV = CachedLauncher(_bs_bwd_dkdv)

# list entries counted per vector load; small under the interpreter so tests cross chunk edges
_CHUNK = 4 if _INTERPRETING else 64


# (kind, block_size) -> (BLOCK_M, BLOCK_N, num_warps, num_stages, rows_fastest) replacing the
# table below: for sweeps (`attn-patch bench sparse --tiles`) and tests
TILES: dict = {}


def _tiles(kind: str, block_size: int, dtype: torch.dtype) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, rows_fastest); tiles divide the block size (a power
    of two >= 16); rows_fastest orders the grid tiles-first (see ``_program``)."""
    bs = block_size
    if (kind, bs) in TILES:
        return TILES[(kind, bs)]
    if _INTERPRETING:  # one small tile: block sizes above 16 cross sub-tiles in tests
        return 16, 16, 1, 1, False
    if dtype == torch.float32:  # exact IEEE dots, tests and reference-grade runs only
        return min(bs, 64), min(bs, 32), 4, 1, False
    # picked from short sweeps on an H200 (bf16, d=128, 32/8 heads, 16k tokens, 25% of the causal
    # blocks): 64x64 tiles with 4 warps; wider tiles spill (128-wide dK/dV or dQ accumulators at
    # 4 warps ran 2-4x slower), and 2 stages beat 3 in both backward kernels. Tiles-first order
    # (32k tokens, 10% of the blocks): forward 2.72 -> 2.37 ms, dQ 3% faster, dK/dV 28% slower
    # (its programs already share a KV head). Walking two listed blocks per 128-wide key tile was
    # 35% slower than one per 64-wide tile.
    if kind == "fwd":
        return (128, 128, 8, 3, True) if bs >= 128 else (bs, bs, 4, 3, True)
    return min(bs, 64), min(bs, 64), 4, 2, kind == "dq"


def _grid(heads: int, tiles: int, rows_fastest: bool) -> tuple[int, int]:
    return (tiles, heads) if rows_fastest else (heads, tiles)


# --------------------------------------------------------------------------------------------
# python side
# --------------------------------------------------------------------------------------------


def _check_blocks(q, k, block_indices, block_counts, block_size):
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    if not isinstance(block_indices, torch.Tensor) or not isinstance(block_counts, torch.Tensor):
        raise TypeError("block_indices and block_counts must be tensors")
    if block_indices.dtype not in INDEX_DTYPES or block_counts.dtype not in INDEX_DTYPES:
        raise TypeError(f"block_indices and block_counts must be int32 or int64, got {block_indices.dtype} "
                        f"and {block_counts.dtype}")
    if block_indices.device != q.device or block_counts.device != q.device:
        raise ValueError(f"block_indices ({block_indices.device}) and block_counts ({block_counts.device}) must be "
                         f"on the device of q ({q.device})")
    b, hq, tq = q.shape[0], q.shape[1], q.shape[2]
    hkv = k.shape[1]
    nqb = _cdiv(tq, block_size)
    if block_indices.dim() != 4:
        raise ValueError(f"block_indices must be 4-D [batch, heads, q_blocks, max_blocks], got shape "
                         f"{tuple(block_indices.shape)}")
    if block_counts.dim() != 3 or tuple(block_counts.shape) != tuple(block_indices.shape[:3]):
        raise ValueError(f"block_counts must be [batch, heads, q_blocks] = {tuple(block_indices.shape[:3])} "
                         f"(block_indices' first three dims), got {tuple(block_counts.shape)}")
    bsel, hsel, nqb_given = block_indices.shape[:3]
    if bsel not in (1, b):
        raise ValueError(f"block_indices batch dim must be {b} or 1, got {bsel}")
    if hsel < 1 or hq % hsel:
        raise ValueError(f"block_indices heads must be the query heads ({hq}) or the key/value heads ({hkv}) "
                         f"(any divisor of {hq}), got {hsel}")
    if nqb_given != nqb:
        raise ValueError(f"block_indices must have ceil(q_len / block_size) = ceil({tq} / {block_size}) = {nqb} "
                         f"query blocks, got {nqb_given}")


def _sel_strides(t, b):
    """Strides of a selection tensor with a broadcast batch dim mapped to stride 0."""
    strides = list(t.stride())
    if t.shape[0] == 1 and b != 1:
        strides[0] = 0
    return strides


def _forward(q, k, v, idx, cnt, block_size, scale, causal, q_offset, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    out_storage = torch.empty((b, tq, hq, d), device=q.device, dtype=q.dtype)
    o = out_storage.transpose(1, 2)  # [B, Hq, Tq, D] view of the layout transformers wants back
    lse = torch.empty((b, hq, tq), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse.fill_(float("-inf"))
    bm, bn, warps, stages, rows_fastest = _tiles("fwd", block_size, q.dtype)
    args = (q, k, v, o, lse, masks.kpm, idx, cnt,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            *masks.kpm_strides, *_sel_strides(idx, b), *_sel_strides(cnt, b),
            hq, hq // hkv, hq // idx.shape[1], idx.shape[3], tq, tk, q_offset, scale * LOG2E)
    meta = dict(IS_CAUSAL=causal, HAS_KPM=masks.has_kpm, HEAD_DIM=d, BLOCK_D=max(16, _next_pow2(d)),
                BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, CHUNK=_CHUNK, ROWS_FASTEST=rows_fastest)
    _launch_small(_FWD, _grid(b * hq, _cdiv(tq, bm), rows_fastest), args, meta, warps, stages)
    return o, lse


def transposed_lists(block_indices, block_counts, tq, tk, block_size, causal=True, q_offset=None):
    """For every (selection row, key block) the ascending query blocks that selected it, as CSR.

    Returns (ptr int32 [Bsel, Hsel, NKB + 1] (row starts; ``ptr[..., j]`` to ``ptr[..., j+1]`` are
    the entries of key block j, i.e. ``ptr.flatten()`` is the CSR row pointer), cols int32 [nnz_max]).
    Entries past the counts, out of range, or (causal) that no query row of the block can see are
    dropped. Built with torch ops on the device, no host sync: one stable sort by (row, key block)
    of entries already ordered by query block."""
    bsel, hsel, nqb, maxb = block_indices.shape
    nkb = _cdiv(tk, block_size)
    dev = block_indices.device
    rows = bsel * hsel
    if q_offset is None:
        q_offset = tk - tq
    j = block_indices.long()
    valid = torch.arange(maxb, device=dev) < block_counts.long()[..., None]
    valid &= (j >= 0) & (j < nkb)
    if causal:
        last_row = torch.clamp((torch.arange(nqb, device=dev) + 1) * block_size, max=tq) - 1
        valid &= j * block_size <= (last_row + q_offset)[:, None]
    key_dtype = torch.int32 if rows * nkb < 2**31 - 1 else torch.int64
    row_id = torch.arange(rows, device=dev, dtype=torch.int64).view(bsel, hsel, 1, 1) * nkb
    key = torch.where(valid, row_id + j, rows * nkb).to(key_dtype).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    cols = ((order // max(maxb, 1)) % max(nqb, 1)).to(torch.int32)
    bounds = torch.arange(rows * nkb + 1, device=dev, dtype=key_dtype)
    starts = torch.searchsorted(sorted_key, bounds, out_int32=True)
    # [Bsel, Hsel, NKB + 1] view over the flat CSR pointer: row r's block j at r * NKB + j
    ptr = torch.as_strided(starts, (bsel, hsel, nkb + 1), (hsel * nkb, nkb, 1))
    return ptr, cols


def _backward(do, q, k, v, o, lse, idx, cnt, block_size, scale, causal, q_offset, masks):
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    do = _last_dim_contiguous(do)
    block_d = max(16, _next_pow2(d))
    delta = torch.empty_like(lse)
    delta_args = (o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
                  hq, tq)
    _launch_small(_DELTA, (b * hq, _cdiv(tq, 64)), delta_args, dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64),
                  num_warps=4, num_stages=1)
    group, sel_div = hq // hkv, hq // idx.shape[1]

    bm, bn, warps, stages, rows_fastest = _tiles("dq", block_size, q.dtype)
    q_args = (q, k, v, do, lse, delta, dq, masks.kpm, idx, cnt,
              q.stride(0), q.stride(1), q.stride(2),
              k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2),
              do.stride(0), do.stride(1), do.stride(2),
              dq.stride(0), dq.stride(1), dq.stride(2),
              *masks.kpm_strides, *_sel_strides(idx, b), *_sel_strides(cnt, b),
              hq, group, sel_div, idx.shape[3], tq, tk, q_offset, scale * LOG2E, scale)
    meta = dict(IS_CAUSAL=causal, HAS_KPM=masks.has_kpm, HEAD_DIM=d, BLOCK_D=block_d,
                BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, CHUNK=_CHUNK, ROWS_FASTEST=rows_fastest)
    _launch_small(_DQ, _grid(b * hq, _cdiv(tq, bm), rows_fastest), q_args, meta, warps, stages)

    ptr, cols = transposed_lists(idx, cnt, tq, tk, block_size, causal, q_offset)
    bm, bn, warps, stages, rows_fastest = _tiles("dkdv", block_size, q.dtype)
    kv_args = (q, k, v, do, lse, delta, dk, dv, masks.kpm, ptr, cols,
               q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               do.stride(0), do.stride(1), do.stride(2),
               dk.stride(0), dk.stride(1), dk.stride(2),
               dv.stride(0), dv.stride(1), dv.stride(2),
               *masks.kpm_strides, *_sel_strides(ptr, b)[:2],
               hq, hkv, group, sel_div, tq, tk, q_offset, scale * LOG2E, scale)
    meta = dict(IS_CAUSAL=causal, HAS_KPM=masks.has_kpm, HEAD_DIM=d, BLOCK_D=block_d,
                BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, CHUNK=_CHUNK, ROWS_FASTEST=rows_fastest)
    _launch_small(_DKDV, _grid(b * hkv, _cdiv(tk, bn), rows_fastest), kv_args, meta, warps, stages)
    return dq, dk, dv


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_counts, block_size, scale, causal, q_offset, key_padding):
        masks = _Masks(q, key_padding, None)
        o, lse = _forward(q, k, v, block_indices, block_counts, block_size, scale, causal, q_offset, masks)
        ctx.save_for_backward(q, k, v, o, lse, block_indices, block_counts)
        ctx.masks = masks
        ctx.args = (block_size, scale, causal, q_offset)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, idx, cnt = ctx.saved_tensors
        block_size, scale, causal, q_offset = ctx.args
        dq, dk, dv = _backward(do, q, k, v, o, lse, idx, cnt, block_size, scale, causal, q_offset, ctx.masks)
        return dq, dk, dv, None, None, None, None, None, None, None


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    block_counts: torch.Tensor,
    *,
    block_size: int = 64,
    causal: bool = True,
    scale: float | None = None,
    q_offset: int | None = None,
    key_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention. Returns (out [B, Hq, Tq, D], lse [B, Hq, Tq] natural log, fp32).

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (strided views are fine; K/V are never repeated for
    GQA). Query block i (rows [i*bs, (i+1)*bs)) attends to the key blocks
    ``block_indices[b, hs, i, :block_counts[b, hs, i]]`` (strictly ascending; entries >= the
    number of key blocks are ignored), with hs = h // (Hq // Hsel); a batch dim of 1 broadcasts.
    ``causal``, ``q_offset`` (default Tk - Tq) and ``key_padding`` [B, Tk] (True = real token)
    apply on top, as in ``attention_reference``. Rows that see no key give 0 and lse -inf.
    ``out`` is a transposed view of a contiguous [B, Tq, Hq, D] tensor. Differentiable in q, k, v.
    """
    _check(q, k, v, key_padding, None)
    _check_blocks(q, k, block_indices, block_counts, block_size)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    tq, tk = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q_offset = tk - tq if q_offset is None else int(q_offset)
    return _BlockSparseAttention.apply(q, k, v, block_indices, block_counts, block_size, scale, bool(causal),
                                       q_offset, key_padding)


__all__ = ["block_sparse_attention", "transposed_lists"]
