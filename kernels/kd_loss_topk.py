"""Triton kernel for the distillation loss from a sparse teacher, given at k entries per row (offline
top-k log-probabilities or logits): the row's loss and the gradient wrt the student logits in one kernel.

For a row with student logits x (V), the teacher's indices I and values v (k each), target y:

    student   u = x / T,  q_j = e^(u_j) / sum_l e^(u_l)       q_R = sum_{l not in I} q_l   (the bucket R)
    teacher   a_j = v_j / T_t over I, and with tail="bucket" a_R = ln(1 - sum_I e^(v_j)) / T_t
              log p = a - logsumexp(a) over the k (+ 1) classes; p_R = 0 without the bucket
    loss      alpha c D(p, q) + (1 - alpha) CE, D over the classes I and R (as ``fastkd.kd_loss``)

With dD/d(log q_c) = a_c for each class c of I and R (-p_c, q_c (h_c + 1), (1 - beta) q_c h_c for
forward KL, reverse KL, JSD; h as in ``kernels/kd_loss.py``), d(log q_R)/du_l = [l not in I] q_l / q_R
- q_l gives, with S = sum_k q_k h_k (= D for reverse KL):

    l in I       forward_kl  q_l - p_l      reverse_kl  q_l (h_l - S)      jsd  (1 - beta) q_l (h_l - S)
    l not in I   forward_kl  q_l - p_R q_l / q_R        reverse_kl  q_l (h_R - S)      jsd  (1 - beta) q_l (h_R - S)

so the columns outside I take one formula with a per-row constant, written in a dense pass, and the k
columns of I their own, written from a gather. q_R is summed over the columns outside I (not taken as
1 - sum_I q_l, which cancels to 0 in float32 when the student's tail is below ~1e-7): the launcher
marks I in a bitmap (N, ceil(V / 32)) of int32 words. The dense pass skips the columns of I, so the two
writes never meet and need no barrier. Indices must be distinct within a row.

Passes over the student row: one for its max and sum-exps (at T, at 1 for CE, and over the bucket), one
that writes the gradient outside I (for rows up to ``MAX_ONE_BLOCK`` wide, each pass is one column
block, and the second read mostly hits the cache); three over the k entries (the teacher's normalizer;
the loss and the row sum S; the gradient at I), gathering x_I. The bitmap adds V / 8 bytes a row to
each student pass that reads it (the bucket sum, the gradient).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.kd_loss import MAX_ONE_BLOCK
from fastkd.kernels.kd_math import (
    FORWARD_KL,
    JSD,
    REVERSE_KL,
    ce_grad,
    ce_loss,
    divergence_grad,
    divergence_tile,
    row_setup,
)
from fastkd.kernels.reductions import LN2, LOG2E, row_inv_temperature, safe_max

LOOP_BLOCK = 1024  # columns per step when a row is wider than MAX_ONE_BLOCK
MAX_K_BLOCK = 1024  # teacher entries per step of the loops over the k entries
BITS_PER_WORD = 32  # of the membership bitmap
WORD = tl.constexpr(BITS_PER_WORD)


@triton.jit
def _in_top(BITS, rows64, stride_bits, offs, mask):
    """Whether each column of a [ROWS, BLOCK] tile is one of the row's k entries (the bitmap's bit)."""
    word = tl.load(BITS + rows64[:, None] * stride_bits + offs // WORD, mask=mask, other=0)
    return ((word >> (offs % WORD)) & 1) != 0


@triton.jit
def _topk_block(IDX, VAL, rows64, stride_idx, stride_val, kstart, kk, k, valid, n_cols):
    """One step of k entries: (indices, stored values (-inf past k), lanes in use, index in [0, V))."""
    kmask = valid[:, None] & (kstart + kk < k)
    idx = tl.load(IDX + rows64[:, None] * stride_idx + kstart + kk, mask=kmask, other=0).to(tl.int64)
    v = tl.load(VAL + rows64[:, None] * stride_val + kstart + kk, mask=kmask, other=float("-inf")).to(
        tl.float32
    )
    return idx, v, kmask, (idx >= 0) & (idx < n_cols)


@triton.jit
def kd_loss_topk_fwd_kernel(
    X,  # (N, V) student logits, unit column stride
    IDX,  # (N, k) int32/int64 teacher indices, unit column stride
    VAL,  # (N, k) teacher log-probabilities or logits, unit column stride
    BITS,  # (N, ceil(V / 32)) int32 bitmap of the indices, or None (not needed)
    Y,  # (N,) int32/int64 targets, or None
    LOSS,  # (N,) fp32 row losses, times the reduction's scale
    G,  # (N, V) dL/dx in X's dtype (may be X itself), written when NEED_GRAD
    T,  # (N,) student temperatures, or None for inv_temp
    TT,  # (N,) teacher temperatures, or None for inv_temp_t
    SCALE,  # one fp32: the reduction's scale, or None for the float scale
    inv_temp,
    inv_temp_t,
    scale,
    alpha,
    beta,
    ls_eps,
    ignore_index,
    n_rows,
    n_cols,
    k,
    stride_x,
    stride_idx,
    stride_val,
    stride_bits,
    stride_g,
    stride_temp,
    stride_temp_t,
    DIVERGENCE: tl.constexpr,
    BUCKET: tl.constexpr,  # the teacher's missing mass as a class of its own
    NEED_REST: tl.constexpr,  # q_R enters the loss (the bucket, or a divergence other than forward KL)
    HAS_KD: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    T_SQUARED: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_TT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]
    kk = tl.arange(0, K_BLOCK)[None, :]
    x_ptr = X + rows64[:, None] * stride_x
    g_ptr = G + rows64[:, None] * stride_g
    inv_t = row_inv_temperature(T, inv_temp, rows, row_ok, stride_temp, HAS_T)
    inv_tt = row_inv_temperature(TT, inv_temp_t, rows, row_ok, stride_temp_t, HAS_TT)
    valid, y, x_y, kd_weight, ce_weight, scale, grad_scale = row_setup(
        X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x, HAS_TARGET, HAS_CE,
        T_SQUARED, SCALE_GRAD,
    )  # fmt: skip

    # The student's row: max m, sum-exps at T (d_s), at 1 (d_1) and over the bucket (r_s), sum x.
    m = tl.full([ROWS], float("-inf"), tl.float32)
    d_s = tl.zeros([ROWS], tl.float32)
    d_1 = tl.zeros([ROWS], tl.float32)
    r_s = tl.zeros([ROWS], tl.float32)
    x_sum = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = row_ok[:, None] & (start + cols < n_cols)
        x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_sub = safe_max(m_new)
        e = tl.exp((x - m_sub[:, None]) * inv_t[:, None])
        rescale = tl.exp((m - m_sub) * inv_t)
        d_s = d_s * rescale + tl.sum(e, 1)
        if NEED_REST:
            top = _in_top(BITS, rows64, stride_bits, start + cols, mask)
            r_s = r_s * rescale + tl.sum(tl.where(top, 0.0, e), 1)
        if HAS_CE:
            d_1 = d_1 * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub[:, None]), 1)
            x_sum += tl.sum(tl.where(mask, x, 0.0), 1)
        m = m_new
    m_s = safe_max(m)
    l2d_s = tl.log2(d_s)
    l2d_1 = tl.log2(d_1)

    # The teacher's normalizer over its k entries (and the bucket), lse_t = logsumexp(v / T_t); then the
    # loss over I and the bucket R, and the row sum S = sum_c q_c h_c.
    kd = tl.zeros([ROWS], tl.float32)
    qh_sum = tl.zeros([ROWS], tl.float32)
    lse_t = tl.zeros([ROWS], tl.float32)
    p_rest = tl.zeros([ROWS], tl.float32)
    h_rest = tl.zeros([ROWS], tl.float32)
    if HAS_KD:
        a_max = tl.full([ROWS], float("-inf"), tl.float32)
        a_sum = tl.zeros([ROWS], tl.float32)
        mass = tl.zeros([ROWS], tl.float32)
        bad_index = tl.zeros([ROWS], tl.int32)
        for kstart in range(0, k, K_BLOCK):
            _, v, kmask, ok = _topk_block(
                IDX, VAL, rows64, stride_idx, stride_val, kstart, kk, k, valid, n_cols
            )
            bad_index = tl.maximum(bad_index, tl.max((kmask & ~ok).to(tl.int32), 1))
            a = v * inv_tt[:, None]
            a_new = tl.maximum(a_max, tl.max(a, 1))
            a_sub = safe_max(a_new)
            a_sum = a_sum * tl.exp(a_max - a_sub) + tl.sum(tl.exp(a - a_sub[:, None]), 1)
            a_max = a_new
            if BUCKET:
                mass += tl.sum(tl.exp(v), 1)
        lse_t = safe_max(a_max) + tl.log(a_sum)
        log_p_rest = tl.full([ROWS], float("-inf"), tl.float32)
        if BUCKET:  # the missing mass ln(1 - sum e^v), tempered as one more class
            a_rest = tl.log(tl.maximum(1.0 - mass, 0.0)) * inv_tt
            a_top = safe_max(tl.maximum(lse_t, a_rest))
            lse_t = a_top + tl.log(tl.exp(lse_t - a_top) + tl.exp(a_rest - a_top))
            log_p_rest = a_rest - lse_t
        kd_weight = tl.where(bad_index > 0, float("nan"), kd_weight)  # an index outside [0, V): NaN row
        for kstart in range(0, k, K_BLOCK):
            idx, v, kmask, ok = _topk_block(
                IDX, VAL, rows64, stride_idx, stride_val, kstart, kk, k, valid, n_cols
            )
            x_top = tl.load(x_ptr + idx, mask=kmask & ok, other=float("-inf")).to(tl.float32)
            l2q = (x_top - m_s[:, None]) * (inv_t * LOG2E)[:, None] - l2d_s[:, None]
            q, p, terms, h, _g = divergence_tile(
                l2q, (v * inv_tt[:, None] - lse_t[:, None]) * LOG2E, beta, 1.0, 0.0, DIVERGENCE
            )
            kd += tl.sum(terms, 1)
            qh_sum += tl.sum(q * h, 1)
        l2q_rest = tl.log2(r_s) - l2d_s  # -inf when the bucket holds no student mass (or is not summed)
        q_r, p_r, terms_r, h_r, _g_r = divergence_tile(
            l2q_rest[:, None], (log_p_rest * LOG2E)[:, None], beta, 1.0, 0.0, DIVERGENCE
        )
        kd += tl.sum(terms_r, 1)
        qh_sum += tl.sum(q_r * h_r, 1)
        p_rest = tl.sum(p_r, 1)
        h_rest = tl.sum(h_r, 1)

    if NEED_GRAD:
        kd_scale = kd_weight * grad_scale * inv_t
        ce_scale = ce_weight * grad_scale
        # The k columns of I, from the gather.
        for kstart in range(0, k, K_BLOCK):
            idx, v, kmask, ok = _topk_block(
                IDX, VAL, rows64, stride_idx, stride_val, kstart, kk, k, valid, n_cols
            )
            x_top = tl.load(x_ptr + idx, mask=kmask & ok, other=float("-inf")).to(tl.float32)
            grad = tl.zeros([ROWS, K_BLOCK], tl.float32)
            if HAS_KD:
                l2q = (x_top - m_s[:, None]) * (inv_t * LOG2E)[:, None] - l2d_s[:, None]
                q, p, _, h, g = divergence_tile(
                    l2q, (v * inv_tt[:, None] - lse_t[:, None]) * LOG2E, beta, 1.0, 0.0, DIVERGENCE
                )
                grad = kd_scale[:, None] * divergence_grad(q, p, h, g, qh_sum[:, None], beta, DIVERGENCE)
            if HAS_CE:
                grad += ce_scale[:, None] * ce_grad(
                    x_top, idx == y[:, None], m_s[:, None], l2d_1[:, None], ls_eps, n_cols
                )
            tl.store(g_ptr + idx, grad.to(G.dtype.element_ty), mask=kmask & ok)
        # The other columns: q_l times a row constant rho; forward KL with the bucket also subtracts
        # p_R q_l / q_R, with q_l / q_R formed per entry as e_l / r_s <= 1 (no ratio overflows).
        rho = tl.full([ROWS], 1.0, tl.float32)
        if DIVERGENCE == REVERSE_KL:
            rho = LN2 * (h_rest - qh_sum)
        if DIVERGENCE == JSD:
            rho = (LN2 * (1.0 - beta)) * (h_rest - qh_sum)
        rho_d = rho / d_s
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            top = _in_top(BITS, rows64, stride_bits, start + cols, mask)
            grad = tl.zeros([ROWS, BLOCK], tl.float32)
            if HAS_KD:
                e = tl.exp((x - m_s[:, None]) * inv_t[:, None])
                g = e * rho_d[:, None]
                if DIVERGENCE == FORWARD_KL and BUCKET:
                    g -= tl.where(r_s > 0, p_rest, 0.0)[:, None] * (e / tl.where(r_s > 0, r_s, 1.0)[:, None])
                grad = kd_scale[:, None] * g
            if HAS_CE:
                grad += ce_scale[:, None] * ce_grad(x, start + cols == y[:, None], m_s[:, None], l2d_1[:, None], ls_eps,
                                                    n_cols)  # fmt: skip
            tl.store(g_ptr + start + cols, tl.where(valid[:, None], grad, 0.0).to(G.dtype.element_ty),
                     mask=mask & ~(top & valid[:, None]))  # fmt: skip

    ce = tl.zeros([ROWS], tl.float32)
    if HAS_CE:
        ce = ce_loss(m_s, l2d_1 * LN2, x_y, x_sum, ls_eps, n_cols)
    loss = tl.zeros([ROWS], tl.float32)
    if HAS_KD:
        loss += kd_weight * (kd * LN2)
    if HAS_CE:
        loss += ce_weight * ce
    tl.store(LOSS + rows, tl.where(valid, loss * scale, 0.0), mask=row_ok)


def launch_config(n_cols: int, k: int) -> tuple[int, int, int, int]:
    """(rows per program, BLOCK, K_BLOCK, num_warps) for rows of ``n_cols`` columns and k entries: a row up
    to ``MAX_ONE_BLOCK`` wide in one column block (several rows a program when narrow), wider rows in
    blocks of ``LOOP_BLOCK``."""
    k_block = min(triton.next_power_of_2(k), MAX_K_BLOCK)
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ONE_BLOCK:
        return 1, LOOP_BLOCK, k_block, 4
    rows = min(max(1, 1024 // max(block, k_block)), 32)
    tile = rows * max(block, k_block)
    return rows, block, k_block, 4 if tile <= 1024 else 8
