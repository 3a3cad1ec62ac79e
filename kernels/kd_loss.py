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

import torch
import triton
import triton.language as tl

from fastkd.kernels.softmax import _on_device, _row_inv_temperature, _safe_max, _unit_column_stride

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}  # the kernel's DIVERGENCE
NORMS = {None: 0, "standardize": 1, "spherical": 2}  # the kernel's NORM
FORWARD_KL, REVERSE_KL, JSD = (tl.constexpr(v) for v in DIVERGENCES.values())
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
def _row_lse(ptr, k, row_ok, cols, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(max x, ln sum_j e^((x_j - max x) k)) of whole rows read in column blocks (online softmax)."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    d = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = row_ok[:, None] & (start + cols < n_cols)
        x = tl.load(ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_sub = _safe_max(m_new)
        d = d * tl.exp((m - m_sub) * k) + tl.sum(tl.exp((x - m_sub[:, None]) * k[:, None]), 1)
        m = m_new
    return m, tl.log(d)


@triton.jit
def _log_softmax_tile(x, k):
    """log_softmax(x k) of whole rows held in the tile, k one scale per row."""
    u = (x - _safe_max(tl.max(x, 1))[:, None]) * k[:, None]
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
    sub = _safe_max(mx_new)
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
            w = (t.to(tl.float32) - _safe_max(m)[:, None]) * k[:, None] - lnd[:, None]
            mx, acc = _mean_exp_update(mx, acc, w)
        return mx + tl.log(acc) - tl.log(n_teachers.to(tl.float32))
    t = tl.load(t_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    k, m, lnd = tl.sum(k_t, 1), tl.sum(m_t, 1), tl.sum(lnd_t, 1)
    return (t - _safe_max(m)[:, None]) * k[:, None] - lnd[:, None]


@triton.jit
def _divergence_tile(log_q, log_p, beta, DIVERGENCE: tl.constexpr):
    """(q, p, loss terms, h) per entry; h (zero for forward_kl) is as in the module doc. The terms of a
    probability 0 are 0; a NaN probability (a NaN logit, a bad temperature) gives NaN terms (``!= 0``,
    not ``> 0``, which would read NaN as 0)."""
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    if DIVERGENCE == FORWARD_KL:
        return q, p, tl.where(p != 0, p * (log_p - log_q), 0.0), tl.zeros_like(q)
    if DIVERGENCE == REVERSE_KL:
        h = tl.where(q != 0, log_q - log_p, 0.0)
        return q, p, q * h, h
    a = log_p + tl.log(beta)  # log m = logaddexp(a, b), formed in log space: beta p + (1 - beta) q
    b = log_q + tl.log(1.0 - beta)  # underflows to 0 where log q is finite but q is a denormal
    top = _safe_max(tl.maximum(a, b))
    log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
    h = tl.where(q != 0, log_q - log_m, 0.0)
    return q, p, beta * tl.where(p != 0, p * (log_p - log_m), 0.0) + (1.0 - beta) * q * h, h


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
def _divergence_grad(q, p, h, qh_sum, beta, DIVERGENCE: tl.constexpr):
    """D'_j = dD/du_j of a tile (module doc), given the row sum qh_sum = sum_k q_k h_k."""
    if DIVERGENCE == FORWARD_KL:
        return q - p
    if DIVERGENCE == REVERSE_KL:
        return q * (h - qh_sum[:, None])
    return (1.0 - beta) * q * (h - qh_sum[:, None])


@triton.jit
def _kd_grad(x, q, p, h, qh_sum, mu, k_s, w, g_mean, beta, DIVERGENCE: tl.constexpr, NORM: tl.constexpr):
    """dKD/dx of a tile given the row sums (module doc)."""
    g = _divergence_grad(q, p, h, qh_sum, beta, DIVERGENCE)
    if NORM != NO_NORM:
        live = x > float("-inf")
        c = tl.where(live, x - mu[:, None], 0.0)
        g = tl.where(live, g - c * w[:, None] - g_mean[:, None], 0.0)
    return g * k_s[:, None]


@triton.jit
def _ce_loss(m, ln_d, x_y, x_sum, ls_eps, n_cols):
    """(1 - eps)(lse - x_y) + eps (lse - sum_j x_j / V), lse = m + ln d, with m - x_y formed first (exact
    for close values); no smoothing term when eps = 0 (a -inf logit would make it 0 * inf)."""
    smooth = tl.where(ls_eps > 0, ls_eps * ((m - x_sum / n_cols) + ln_d), 0.0)
    return (1.0 - ls_eps) * ((m - x_y) + ln_d) + smooth


@triton.jit
def _ce_grad(x, cols, y, m, ln_d, ls_eps, n_cols):
    """dCE/dx of a tile: softmax(x) - (1 - eps) [j = y] - eps / V."""
    s = tl.exp((x - m[:, None]) - ln_d[:, None])
    return s - tl.where(cols == y[:, None], 1.0 - ls_eps, 0.0) - ls_eps / n_cols


@triton.jit
def _row_setup(X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x,
               HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, T_SQUARED: tl.constexpr,
               SCALE_GRAD: tl.constexpr):  # fmt: skip
    """The rows' targets and weights: (valid (not ignored), y, x_y read before the gradient may
    overwrite x, the KD term's weight alpha T^2 (or alpha), the CE term's 1 - alpha (NaN for a target
    outside [0, V) that is not ignored), the reduction's scale, the scale the gradient takes now)."""
    valid = row_ok
    y = tl.zeros(rows.shape, tl.int64)
    x_y = tl.zeros(rows.shape, tl.float32)
    in_range = row_ok
    if HAS_TARGET:
        y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (y != ignore_index)
        in_range = (y >= 0) & (y < n_cols)
        if HAS_CE:
            x_y = tl.load(X + rows.to(tl.int64) * stride_x + y, mask=valid & in_range, other=float("nan"))
    if SCALE is not None:
        scale = tl.load(SCALE)
    kd_weight = tl.full(rows.shape, alpha, tl.float32)
    if T_SQUARED:
        kd_weight = kd_weight / (inv_t * inv_t)
    ce_weight = tl.full(rows.shape, 1.0 - alpha, tl.float32)
    if HAS_CE:
        ce_weight = tl.where(in_range, ce_weight, float("nan"))
    return valid, y, x_y.to(tl.float32), kd_weight, ce_weight, scale, scale if SCALE_GRAD else 1.0


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
    inv_t = _row_inv_temperature(T, inv_temp, rows, row_ok, stride_temp, HAS_T)
    inv_tt = _row_inv_temperature(TT, inv_temp_t, rows, row_ok, stride_temp_t, HAS_TT)

    valid, y, x_y, kd_weight, ce_weight, scale, grad_scale = _row_setup(
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
            q, p, terms, h = _divergence_tile(log_q, log_p, beta, DIVERGENCE)
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
            m = _safe_max(tl.max(x, 1))
            lnd_1 = tl.log(tl.sum(tl.exp(x - m[:, None]), 1))
            ce = _ce_loss(m, lnd_1, x_y, tl.sum(tl.where(mask, x, 0.0), 1), ls_eps, n_cols)
            grad += (ce_weight * grad_scale)[:, None] * _ce_grad(x, cols, y, m, lnd_1, ls_eps, n_cols)
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
            m_sub = _safe_max(m_new)
            if HAS_KD:
                d_s = d_s * tl.exp((m - m_sub) * k_s) + tl.sum(tl.exp((x - m_sub[:, None]) * k_s[:, None]), 1)
            if HAS_CE:
                d_1 = d_1 * tl.exp(m - m_sub) + tl.sum(tl.exp(x - m_sub[:, None]), 1)
                x_sum += tl.where(mask, x, 0.0)
            m = m_new
        m_s = _safe_max(m)
        lnd_s = tl.log(d_s)
        lnd_1 = tl.log(d_1)
        m_t = tl.zeros([ROWS, K_BLOCK], tl.float32)
        lnd_t = tl.zeros([ROWS, K_BLOCK], tl.float32)
        if HAS_KD:
            member_ptr = t_ptr
            for member in range(n_teachers):
                m_k, lnd_k = _row_lse(member_ptr, _pick(k_t, member, kk), row_ok, cols, n_cols, ROWS, BLOCK)
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
                q, p, _, h = _divergence_tile(log_q, log_p, beta, DIVERGENCE)
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
                q, p, terms, h = _divergence_tile(log_q, log_p, beta, DIVERGENCE)
                kd_acc += terms
                grad = (kd_weight * grad_scale)[:, None] * _kd_grad(x, q, p, h, qh_sum, mu, k_s, w_norm, g_mean, beta,
                                                                    DIVERGENCE, NORM)  # fmt: skip
            if HAS_CE:
                grad += (ce_weight * grad_scale)[:, None] * _ce_grad(x, start + cols, y, m_s, lnd_1, ls_eps, n_cols)
            if NEED_GRAD:
                tl.store(g_ptr + start + cols, tl.where(valid[:, None], grad, 0.0).to(G.dtype.element_ty), mask=mask)
        kd = tl.sum(kd_acc, 1)
        if HAS_CE:
            ce = _ce_loss(m_s, lnd_1, x_y, tl.sum(x_sum, 1), ls_eps, n_cols)

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


def _temperature(temperature: float | torch.Tensor) -> tuple[torch.Tensor | None, float, int]:
    """(tensor or None, 1/T for a float, stride of the tensor's rows)."""
    if isinstance(temperature, torch.Tensor):
        return temperature, 1.0, (temperature.stride(0) if temperature.dim() else 0)
    return None, 1.0 / temperature, 0


def forward_outputs(
    student: torch.Tensor, target: torch.Tensor | None, reduction: str, ignore_index: int, inplace_grad: bool,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, float, bool, torch.Tensor | None]:
    """What a forward kernel reads and writes, and how it scales: (the student with a unit column stride
    (as it is with ``inplace_grad``), the row losses (N,) fp32, dL/dx (N, V): the student itself with
    ``inplace_grad``, empty without ``need_grad``; the reduction's scale as a 0-d fp32 tensor (1 / rows
    not ignored, for "mean" with a target: no host sync) or None, else as a float; whether the kernel
    applies it to the gradient; the scale left to the backward, or None). A float16 gradient is stored
    unscaled (``kd_loss_forward``'s doc)."""
    n_rows, n_cols = student.shape
    if not inplace_grad:
        student = _unit_column_stride(student)
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    if not need_grad:
        grad = student.new_empty((0, n_cols))
    elif inplace_grad:
        grad = student
    else:
        grad = torch.empty((n_rows, n_cols), dtype=student.dtype, device=student.device)
    scale_t, scale = None, 1.0
    if reduction == "mean" and target is not None:
        scale_t = 1.0 / (target != ignore_index).sum().clamp_min(1).float()
    elif reduction in ("mean", "batchmean"):
        scale = 1.0 / max(n_rows, 1)
    scale_grad = student.dtype != torch.float16 or (scale_t is None and scale == 1.0)
    later = None
    if not scale_grad:
        later = scale_t if scale_t is not None else torch.full((), scale, device=student.device)
    return student, loss, grad, scale_t, scale, scale_grad, later


def kd_loss_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    temperature: float | torch.Tensor,
    teacher_temperature: float | torch.Tensor,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    temperature_squared: bool,
    logit_norm: str | None,
    norm_scale: float,
    label_smoothing: float,
    inplace_grad: bool = False,
    need_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(row losses (N,) fp32 times the reduction's scale, dL/dx (N, V) in the student's dtype, the
    reduction's scale still to apply to dL/dx: a 0-d fp32 tensor, or None).

    ``student`` (N, V); ``teacher`` (K, N, V); ``target`` (N,) contiguous, or None; temperatures:
    floats, or tensors of one value or one per row (any stride). The loss is the row losses' sum for
    every reduction but "none". A float16 gradient is stored without the reduction's scale (1/rows
    for "mean"), which the backward applies with dL/dloss (a GradScaler's factor, say): scaled first,
    small float16 entries would round to 0. With ``inplace_grad`` the gradient is written into
    ``student``, which must then have a unit column stride; without ``need_grad`` it is not written
    (an empty tensor is returned).
    """
    n_rows, n_cols = student.shape
    student, loss, grad, scale_t, scale, scale_grad, later = forward_outputs(
        student, target, reduction, ignore_index, inplace_grad, need_grad
    )
    teacher = _unit_column_stride(teacher)
    if student.numel() == 0:
        return loss.zero_(), grad, later
    t, inv_t, stride_t = _temperature(temperature)
    tt, inv_tt, stride_tt = _temperature(teacher_temperature)
    n_teachers = teacher.shape[0]
    rows, block, one_block, num_warps = launch_config(n_cols)
    with _on_device(student):
        kd_loss_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            student, teacher, target, loss, grad if need_grad else student, t, tt, scale_t, inv_t, inv_tt, scale,
            alpha, beta, label_smoothing, norm_scale, ignore_index, n_rows, n_cols, n_teachers,
            student.stride(0), teacher.stride(0), teacher.stride(1), grad.stride(0) if need_grad else 0,
            stride_t, stride_tt, DIVERGENCE=DIVERGENCES[divergence], NORM=NORMS[logit_norm], HAS_KD=alpha > 0,
            HAS_CE=target is not None and alpha < 1, HAS_TARGET=target is not None, NEED_GRAD=need_grad,
            SCALE_GRAD=scale_grad, T_SQUARED=temperature_squared, HAS_T=t is not None, HAS_TT=tt is not None,
            ENSEMBLE=n_teachers > 1, K_BLOCK=triton.next_power_of_2(n_teachers),
            ROWS=rows, BLOCK=block, ONE_BLOCK=one_block, num_warps=num_warps,
            **({} if one_block else {"maxnreg": LOOP_MAX_REGISTERS}),
        )  # fmt: skip
    return loss, grad, later


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad (N, V) *= grad_output (one value, or (N,) one per row), in place; free where it is 1."""
    n_rows, n_cols = grad.shape
    if grad.numel() == 0:
        return grad
    block = min(triton.next_power_of_2(n_cols), 4096)
    stride_go = grad_output.stride(0) if grad_output.dim() else 0
    with _on_device(grad):
        scale_grad_kernel[(n_rows, triton.cdiv(n_cols, block))](
            grad, grad_output, n_cols, grad.stride(0), stride_go, BLOCK=block, num_warps=4 if block <= 1024 else 8
        )
    return grad
