"""Triton kernel for the fused distillation loss: the loss of each row and its gradient wrt the student
logits, in one kernel, in the forward pass.

For a row with student logits x (V), teacher logits t_k (K members, V each) and target y (math in fp32):

    normalized logits   a = x or a = (x - mean) r       (``logit_norm``; r per row, see ``_norm_factor``)
    student at T        log q = log_softmax(a_s / T)                      k_s = r_s / T
    teacher at T_t      log p = log mean_k softmax(a_tk / T_t)            k_t = r_t / T_t per member
    CE at 1             log s = log_softmax(x)
    loss   = alpha c D(p, q) + (1 - alpha) [(1 - eps)(-log s_y) + eps mean_j(-log s_j)],   c = T^2 or 1

Since softmax ignores a shift of its row, log q = (x - max x) k_s - ln sum_j e^((x_j - max x) k_s): the
normalization is a per-row scale k_s of the raw logits, and its mean matters only to the gradient.

With dL/du_j = D'_j for u = a_s / T:
    forward_kl  D = sum_j p_j (log p_j - log q_j)        D'_j = q_j - p_j
    reverse_kl  D = sum_j q_j h_j, h = log q - log p     D'_j = q_j (h_j - D)
    jsd         D = beta KL(p||m) + (1 - beta) sum_j q_j h_j,  h = log q - log m,
                m = beta p + (1 - beta) q                 D'_j = (1 - beta) q_j (h_j - sum_k q_k h_k)
and, through the normalization (c_j = x_j - mean x over the n live entries; see ``_norm_factor``),
    dKD/dx_j = k_s (D'_j - c_j W - mean_k (D'_k - c_k W)),   W = r_s sum_k D'_k c_k / kappa
(dKD/dx_j = k_s D'_j without it). The mean is 0 in exact math (sum D' = 0 = sum c); it is subtracted
all the same because r_s, and so k_s, is large for a nearly constant row, where it would amplify the
rounding left in sum D'.
    dCE/dx_j = s_j - (1 - eps) [j = y] - eps / V
The row's gradient alpha c dKD/dx + (1 - alpha) dCE/dx, times the reduction's scale (1/rows for
"mean"), is written in the student's dtype after the -1 at the target is folded in, in fp32.

Memory traffic: a row up to ``MAX_ONE_BLOCK`` wide is read once (several rows per program when narrow)
and its gradient written once. A wider row is read in column blocks: a pass for the row's log-sum-exps
and a pass that writes the gradient, plus one pass for the row statistics with ``logit_norm`` and one
for the row sum sum_k q_k h_k (reverse_kl, jsd) or sum_k D'_k c_k (``logit_norm``).

Entries: a -inf logit is a masked class (probability 0, excluded from the normalization's statistics;
its KD gradient is 0). A row whose target is ``ignore_index`` gets loss 0 and gradient 0; a target
outside [0, V) (reaching the kernel unchecked) gives NaN. A student row of all -inf has no
distribution: NaN.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from fastkd.kernels.kd_math import FORWARD_KL, REVERSE_KL, ce_grad, ce_loss, divergence_grad, divergence_tile, row_setup
from fastkd.kernels.reductions import row_inv_temperature, row_lse, safe_max

NORMS = {None: 0, "standardize": 1, "spherical": 2}  # the kernel's NORM

NO_NORM, STANDARDIZE, SPHERICAL = (tl.constexpr(v) for v in NORMS.values())
EPS = tl.constexpr(1e-7)  # fastkd.reference.NORM_EPS

MAX_ONE_BLOCK = 4096  # widest row held in registers by one program
LOOP_BLOCK = 1024  # columns per step when a row is wider (4 warps: 8 per thread per tile)
LOOP_MAX_REGISTERS = 128  # per thread, for the loop: without a budget ptxas spills 8 bytes at 80 in some variants


@triton.jit
def _moments(x):
    """(n, mean, M2) over the entries of each row of the tile that are not -inf; M2 = sum (x - mean)^2."""
    live = x > float("-inf")
    n = tl.sum(live.to(tl.float32), 1)
    mean = tl.sum(tl.where(live, x, 0.0), 1) / tl.maximum(n, 1.0)
    dev = tl.where(live, x - mean[:, None], 0.0)
    return n, mean, tl.sum(dev * dev, 1)


@triton.jit
def _row_moments(ptr, row_ok, cols, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``_moments`` of whole rows read in column blocks, merged by Chan et al.'s update."""
    n = tl.zeros([ROWS], tl.float32)
    mean = tl.zeros([ROWS], tl.float32)
    m2 = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = row_ok[:, None] & (start + cols < n_cols)
        x = tl.load(ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        n_b, mean_b, m2_b = _moments(x)
        n_new = n + n_b
        delta = mean_b - mean
        frac = n_b / tl.maximum(n_new, 1.0)
        mean += delta * frac
        m2 += m2_b + delta * delta * n * frac
        n = n_new
    return n, mean, m2


@triton.jit
def _norm_factor(n, m2, norm_scale, NORM: tl.constexpr):
    """(r, kappa) of rows with n live entries and M2 = ||c||^2, c = x - mean: the normalized logits are
    c r, and dr/dx_j = -r^2 c_j / kappa, with kappa = (n - 1) std for standardize, norm_scale ||c|| for
    spherical (0 for a constant row, whose gradient through r is taken as 0)."""
    if NORM == STANDARDIZE:
        dof = tl.maximum(n - 1.0, 1.0)
        std = tl.sqrt(m2 / dof)
        return 1.0 / (std + EPS), dof * std
    if NORM == SPHERICAL:
        norm = tl.sqrt(m2)
        return norm_scale / (norm + EPS), norm_scale * norm
    return tl.full(n.shape, 1.0, tl.float32), tl.zeros(n.shape, tl.float32)


@triton.jit
def _log_softmax_tile(x, k):
    """log_softmax(x k) of whole rows held in the tile, k one scale per row."""
    u = (x - safe_max(tl.max(x, 1))[:, None]) * k[:, None]
    return u - tl.log(tl.sum(tl.exp(u), 1))[:, None]


@triton.jit
def _member_log_prob_tile(t, inv_tt, norm_scale, NORM: tl.constexpr):
    """log p of one teacher's rows held in the tile: its logits normalized (``logit_norm``) and tempered."""
    r_t = tl.full(inv_tt.shape, 1.0, tl.float32)
    if NORM != NO_NORM:
        n_t, _, m2_t = _moments(t)
        r_t, _ = _norm_factor(n_t, m2_t, norm_scale, NORM)
    return _log_softmax_tile(t, r_t * inv_tt)


@triton.jit
def _mean_exp_update(mx, acc, w):
    """Running log-mean-exp over ensemble members, elementwise: max mx and sum acc of e^(w - mx)."""
    mx_new = tl.maximum(mx, w)
    sub = safe_max(mx_new)
    return mx_new, acc * tl.exp(mx - sub) + tl.exp(w - sub)


@triton.jit
def _pick(values, member, kk):
    """values[:, member] of a [ROWS, K_BLOCK] tensor."""
    return tl.sum(tl.where(kk[None, :] == member, values, 0.0), 1)


@triton.jit
def _teacher_log_prob(t_ptr, offs, mask, k_t, m_t, lnd_t, kk, n_teachers, stride_tk, ENSEMBLE: tl.constexpr):
    """log p of a [ROWS, BLOCK] tile, from each member's per-row scale, max and ln d ([ROWS, K_BLOCK])."""
    if ENSEMBLE:
        mx = tl.full(mask.shape, float("-inf"), tl.float32)
        acc = tl.zeros(mask.shape, tl.float32)
        member_ptr = t_ptr  # advanced by stride_tk per member: 64-bit pointers, no int32 product
        for member in range(n_teachers):
            t = tl.load(member_ptr + offs, mask=mask, other=float("-inf"))
            member_ptr += stride_tk
            k, m, lnd = _pick(k_t, member, kk), _pick(m_t, member, kk), _pick(lnd_t, member, kk)
            w = (t.to(tl.float32) - safe_max(m)[:, None]) * k[:, None] - lnd[:, None]
            mx, acc = _mean_exp_update(mx, acc, w)
        return mx + tl.log(acc) - tl.log(n_teachers.to(tl.float32))
    t = tl.load(t_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    k, m, lnd = tl.sum(k_t, 1), tl.sum(m_t, 1), tl.sum(lnd_t, 1)
    return (t - safe_max(m)[:, None]) * k[:, None] - lnd[:, None]


@triton.jit
def _row_sum_terms(x, q, p, h, mu, DIVERGENCE: tl.constexpr):
    """Per-entry terms of the row sums the gradient needs, before D''s row constant is known:
    (q h, D' c, q c, D' or q, c), with D' c and D' as q h c and q for reverse_kl and jsd."""
    c = tl.where(x > float("-inf"), x - mu[:, None], 0.0)
    if DIVERGENCE == FORWARD_KL:
        return q * h, (q - p) * c, q * c, q - p, c
    return q * h, q * h * c, q * c, q, c


@triton.jit
def _norm_terms(r, kappa, n, qh_sum, dc_sum, qc_sum, d_sum, c_sum, beta, DIVERGENCE: tl.constexpr):
    """(W, mean_k (D'_k - c_k W)) of the module doc from the row sums of ``_row_sum_terms``; W = 0 for a
    constant row (kappa = 0)."""
    if DIVERGENCE != FORWARD_KL:  # D' = f q (h - sum q h), f = 1 or 1 - beta
        f = 1.0 if DIVERGENCE == REVERSE_KL else 1.0 - beta
        dc_sum = f * (dc_sum - qh_sum * qc_sum)
        d_sum = f * qh_sum * (1.0 - d_sum)
    w = tl.where(kappa > 0, r * dc_sum / kappa, 0.0)
    return w, (d_sum - c_sum * w) / tl.maximum(n, 1.0)


@triton.jit
def _kd_grad(x, q, p, h, qh_sum, mu, k_s, w, g_mean, beta, DIVERGENCE: tl.constexpr, NORM: tl.constexpr):
    """dKD/dx of a tile given the row sums (module doc)."""
    g = divergence_grad(q, p, h, qh_sum, beta, DIVERGENCE)
    if NORM != NO_NORM:
        live = x > float("-inf")
        c = tl.where(live, x - mu[:, None], 0.0)
        g = tl.where(live, g - c * w[:, None] - g_mean[:, None], 0.0)
    return g * k_s[:, None]


@triton.jit
def kd_loss_fwd_kernel(
    X,  # (N, V) student logits, unit column stride
    TL,  # (K, N, V) teacher logits, unit column stride
    Y,  # (N,) int32/int64 targets, or None
    LOSS,  # (N,) fp32 row losses, times the reduction's scale
    G,  # (N, V) dL/dx in X's dtype (may be X itself), written when NEED_GRAD
    T,  # (N,) student temperatures (stride_temp apart; 0 for one value), or None for inv_temp
    TT,  # (N,) teacher temperatures, or None for inv_temp_t
    SCALE,  # one fp32: the reduction's scale, or None for the float scale
    inv_temp,
    inv_temp_t,
    scale,
    alpha,
    beta,
    ls_eps,  # label smoothing
    norm_scale,
    ignore_index,
    n_rows,
    n_cols,
    n_teachers,
    stride_x,
    stride_tk,
    stride_tn,
    stride_g,
    stride_temp,
    stride_temp_t,
    DIVERGENCE: tl.constexpr,
    NORM: tl.constexpr,
    HAS_KD: tl.constexpr,  # alpha > 0
    HAS_CE: tl.constexpr,  # a target and alpha < 1
    HAS_TARGET: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,  # the gradient times the reduction's scale (else left to the backward)
    T_SQUARED: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_TT: tl.constexpr,
    ENSEMBLE: tl.constexpr,  # K > 1
    K_BLOCK: tl.constexpr,  # next power of 2 >= K
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]
    kk = tl.arange(0, K_BLOCK)
    x_ptr = X + rows64[:, None] * stride_x
    t_ptr = TL + rows64[:, None] * stride_tn
    g_ptr = G + rows64[:, None] * stride_g
    inv_t = row_inv_temperature(T, inv_temp, rows, row_ok, stride_temp, HAS_T)
    inv_tt = row_inv_temperature(TT, inv_temp_t, rows, row_ok, stride_temp_t, HAS_TT)

    valid, y, x_y, kd_weight, ce_weight, scale, grad_scale = row_setup(
        X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x, HAS_TARGET, HAS_CE,
        T_SQUARED, SCALE_GRAD,
    )  # fmt: skip

    kd = tl.zeros([ROWS], tl.float32)
    ce = tl.zeros([ROWS], tl.float32)
    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols < n_cols)
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        grad = tl.zeros([ROWS, BLOCK], tl.float32)
        if HAS_KD:
            n = tl.zeros([ROWS], tl.float32)
            mu = tl.zeros([ROWS], tl.float32)
            r_s = tl.full([ROWS], 1.0, tl.float32)
            kappa = tl.zeros([ROWS], tl.float32)
            if NORM != NO_NORM:
                n, mu, m2 = _moments(x)
                r_s, kappa = _norm_factor(n, m2, norm_scale, NORM)
            k_s = r_s * inv_t
            log_q = _log_softmax_tile(x, k_s)
            if ENSEMBLE:
                mx = tl.full([ROWS, BLOCK], float("-inf"), tl.float32)
                acc = tl.zeros([ROWS, BLOCK], tl.float32)
                member_ptr = t_ptr
                for member in range(n_teachers):
                    t = tl.load(member_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    member_ptr += stride_tk
                    mx, acc = _mean_exp_update(mx, acc, _member_log_prob_tile(t, inv_tt, norm_scale, NORM))
                log_p = mx + tl.log(acc) - tl.log(n_teachers.to(tl.float32))
            else:
                t = tl.load(t_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                log_p = _member_log_prob_tile(t, inv_tt, norm_scale, NORM)
            q, p, terms, h = divergence_tile(log_q, log_p, beta, DIVERGENCE)
            qh, dc, qc, d, c = _row_sum_terms(x, q, p, h, mu, DIVERGENCE)
            qh_sum = tl.sum(qh, 1)
            w_norm = tl.zeros([ROWS], tl.float32)
            g_mean = tl.zeros([ROWS], tl.float32)
            if NORM != NO_NORM:
                w_norm, g_mean = _norm_terms(r_s, kappa, n, qh_sum, tl.sum(dc, 1), tl.sum(qc, 1), tl.sum(d, 1),
                                             tl.sum(c, 1), beta, DIVERGENCE)  # fmt: skip
            kd = tl.sum(terms, 1)
            grad = (kd_weight * grad_scale)[:, None] * _kd_grad(x, q, p, h, qh_sum, mu, k_s, w_norm, g_mean, beta,
                                                                DIVERGENCE, NORM)  # fmt: skip
        if HAS_CE:
            m = safe_max(tl.max(x, 1))
            lnd_1 = tl.log(tl.sum(tl.exp(x - m[:, None]), 1))
            ce = ce_loss(m, lnd_1, x_y, tl.sum(tl.where(mask, x, 0.0), 1), ls_eps, n_cols)
            grad += (ce_weight * grad_scale)[:, None] * ce_grad(x, cols, y, m, lnd_1, ls_eps, n_cols)
        if NEED_GRAD:
            tl.store(g_ptr + cols, tl.where(valid[:, None], grad, 0.0).to(G.dtype.element_ty), mask=mask)
    else:
        # Pass 1 (logit_norm): the rows' statistics.
        n = tl.zeros([ROWS], tl.float32)
        mu = tl.zeros([ROWS], tl.float32)
        r_s = tl.full([ROWS], 1.0, tl.float32)
        kappa = tl.zeros([ROWS], tl.float32)
        r_t = tl.full([ROWS, K_BLOCK], 1.0, tl.float32)
        if HAS_KD and NORM != NO_NORM:
            n, mu, m2 = _row_moments(x_ptr, row_ok, cols, n_cols, ROWS, BLOCK)
            r_s, kappa = _norm_factor(n, m2, norm_scale, NORM)
            member_ptr = t_ptr
            for member in range(n_teachers):
                n_t, _, m2_t = _row_moments(member_ptr, row_ok, cols, n_cols, ROWS, BLOCK)
                member_ptr += stride_tk
                r, _ = _norm_factor(n_t, m2_t, norm_scale, NORM)
                r_t = tl.where(kk[None, :] == member, r[:, None], r_t)
        k_s = r_s * inv_t
        k_t = r_t * inv_tt[:, None]

        # Pass 2: the log-sum-exps (student at T and at 1 share the max), and sum x for label smoothing.
        m = tl.full([ROWS], float("-inf"), tl.float32)
        d_s = tl.zeros([ROWS], tl.float32)
        d_1 = tl.zeros([ROWS], tl.float32)
        x_sum = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 1))
            m_sub = safe_max(m_new)
            if HAS_KD:
                d_s = d_s * tl.exp((m - m_sub) * k_s) + tl.sum(tl.exp((x - m_sub[:, None]) * k_s[:, None]), 1)
            if HAS_CE:
                d_1 = d_1 * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub[:, None]), 1)
                x_sum += tl.where(mask, x, 0.0)
            m = m_new
        m_s = safe_max(m)
        lnd_s = tl.log(d_s)
        lnd_1 = tl.log(d_1)
        m_t = tl.zeros([ROWS, K_BLOCK], tl.float32)
        lnd_t = tl.zeros([ROWS, K_BLOCK], tl.float32)
        if HAS_KD:
            member_ptr = t_ptr
            for member in range(n_teachers):
                m_k, lnd_k = row_lse(member_ptr, _pick(k_t, member, kk), row_ok, cols, n_cols, ROWS, BLOCK)
                member_ptr += stride_tk
                m_t = tl.where(kk[None, :] == member, m_k[:, None], m_t)
                lnd_t = tl.where(kk[None, :] == member, lnd_k[:, None], lnd_t)

        # Pass 3 (reverse_kl, jsd, logit_norm): the row sums of ``_row_sum_terms``.
        qh_sum = tl.zeros([ROWS], tl.float32)
        w_norm = tl.zeros([ROWS], tl.float32)
        g_mean = tl.zeros([ROWS], tl.float32)
        if HAS_KD and (DIVERGENCE != FORWARD_KL or NORM != NO_NORM):
            qh_acc = tl.zeros([ROWS, BLOCK], tl.float32)
            dc_acc = tl.zeros([ROWS, BLOCK], tl.float32)
            qc_acc = tl.zeros([ROWS, BLOCK], tl.float32)
            d_acc = tl.zeros([ROWS, BLOCK], tl.float32)
            c_acc = tl.zeros([ROWS, BLOCK], tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = row_ok[:, None] & (start + cols < n_cols)
                x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                log_q = (x - m_s[:, None]) * k_s[:, None] - lnd_s[:, None]
                log_p = _teacher_log_prob(t_ptr, start + cols, mask, k_t, m_t, lnd_t, kk, n_teachers, stride_tk,
                                          ENSEMBLE)  # fmt: skip
                q, p, _, h = divergence_tile(log_q, log_p, beta, DIVERGENCE)
                qh, dc, qc, d, c = _row_sum_terms(x, q, p, h, mu, DIVERGENCE)
                qh_acc += qh
                dc_acc += dc
                qc_acc += qc
                d_acc += d
                c_acc += c
            qh_sum = tl.sum(qh_acc, 1)
            if NORM != NO_NORM:
                w_norm, g_mean = _norm_terms(r_s, kappa, n, qh_sum, tl.sum(dc_acc, 1), tl.sum(qc_acc, 1),
                                             tl.sum(d_acc, 1), tl.sum(c_acc, 1), beta, DIVERGENCE)  # fmt: skip

        # Last pass: the loss terms and the gradient.
        kd_acc = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            grad = tl.zeros([ROWS, BLOCK], tl.float32)
            if HAS_KD:
                log_q = (x - m_s[:, None]) * k_s[:, None] - lnd_s[:, None]
                log_p = _teacher_log_prob(t_ptr, start + cols, mask, k_t, m_t, lnd_t, kk, n_teachers, stride_tk,
                                          ENSEMBLE)  # fmt: skip
                q, p, terms, h = divergence_tile(log_q, log_p, beta, DIVERGENCE)
                kd_acc += terms
                grad = (kd_weight * grad_scale)[:, None] * _kd_grad(x, q, p, h, qh_sum, mu, k_s, w_norm, g_mean, beta,
                                                                    DIVERGENCE, NORM)  # fmt: skip
            if HAS_CE:
                grad += (ce_weight * grad_scale)[:, None] * ce_grad(x, start + cols, y, m_s, lnd_1, ls_eps, n_cols)
            if NEED_GRAD:
                tl.store(g_ptr + start + cols, tl.where(valid[:, None], grad, 0.0).to(G.dtype.element_ty), mask=mask)
        kd = tl.sum(kd_acc, 1)
        if HAS_CE:
            ce = ce_loss(m_s, lnd_1, x_y, tl.sum(x_sum, 1), ls_eps, n_cols)

    loss = tl.zeros([ROWS], tl.float32)
    if HAS_KD:
        loss += kd_weight * kd
    if HAS_CE:
        loss += ce_weight * ce
    tl.store(LOSS + rows, tl.where(valid, loss * scale, 0.0), mask=row_ok)


@triton.jit
def scale_grad_kernel(
    G,  # (N, V) gradient, scaled in place
    GO,  # dL/dloss: one value (stride_go 0) or one per row
    n_cols,
    stride_g,
    stride_go,
    BLOCK: tl.constexpr,
):
    """G[row] *= GO[row], skipped (no memory traffic) where GO[row] is 1. Grid (rows, column blocks)."""
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(GO + row * stride_go).to(tl.float32)
    if go != 1.0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(G + row * stride_g + cols, (g * go).to(G.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def launch_config(n_cols: int) -> tuple[int, int, bool, int]:
    """(rows per program, BLOCK, ONE_BLOCK, num_warps) for rows of ``n_cols`` columns."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ONE_BLOCK:
        return 1, LOOP_BLOCK, False, 4
    rows = min(max(1, 1024 // block), 32)
    tile = rows * block
    return rows, block, True, 4 if tile <= 1024 else 8 if tile <= 2048 else 16


