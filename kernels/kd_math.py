"""Triton row math of the distillation loss, shared by the dense and the sparse-teacher kernels: the
divergences' per-entry terms and gradients, the hard-label CE term, and a row's target and weights
(``kernels/kd_loss.py``'s module doc states the math).

Log-probabilities are carried in base 2 (l = log2 q = ln q / ln 2): q = 2^l is one MUFU.EX2 with no
multiply, and the log-space terms (a divergence's loss terms, h) are in bits, converted to nats (times
ln 2) once per row or inside the gradient's row constant.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.reductions import LN2, LOG2E, log2_approx, safe_max

DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}  # the kernel's DIVERGENCE
FORWARD_KL, REVERSE_KL, JSD = (tl.constexpr(v) for v in DIVERGENCES.values())


@triton.jit
def log2_mix(l2p, l2q, beta):
    """log2 m of the mixture m = beta p + (1 - beta) q from log2 p and log2 q, in log space (no entry
    underflows to 0 before its log): the larger side plus log2(1 + 2^(smaller - larger)), one exp2 and
    one log2 (its argument in [1, 2]). NaN in either side gives NaN."""
    a = l2p + tl.log2(beta)
    b = l2q + tl.log2(1.0 - beta)
    hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    return hi + log2_approx(1.0 + tl.exp2(tl.minimum(a, b) - safe_max(hi)))


@triton.jit
def divergence_tile(l2q, l2p, beta, DIVERGENCE: tl.constexpr):
    """(q, p, loss terms, h) per entry from log2 q and log2 p: the terms and h (zero for forward_kl; as
    in the module doc) are in bits. The terms of a probability 0 are 0; a NaN probability (a NaN logit,
    a bad temperature) gives NaN terms (``!= 0``, not ``> 0``, which would read NaN as 0)."""
    q = tl.exp2(l2q)
    p = tl.exp2(l2p)
    if DIVERGENCE == FORWARD_KL:
        return q, p, tl.where(p != 0, p * (l2p - l2q), 0.0), tl.zeros_like(q)
    if DIVERGENCE == REVERSE_KL:
        h = tl.where(q != 0, l2q - l2p, 0.0)
        return q, p, q * h, h
    l2m = log2_mix(l2p, l2q, beta)
    h = tl.where(q != 0, l2q - l2m, 0.0)
    return q, p, beta * tl.where(p != 0, p * (l2p - l2m), 0.0) + (1.0 - beta) * q * h, h


@triton.jit
def divergence_grad(q, p, h, qh_sum, beta, DIVERGENCE: tl.constexpr):
    """D'_j = dD/du_j of a tile (module doc), in nats, given h and the row sum qh_sum = sum_k q_k h_k
    in bits ([ROWS, 1])."""
    if DIVERGENCE == FORWARD_KL:
        return q - p
    if DIVERGENCE == REVERSE_KL:
        return LN2 * q * (h - qh_sum)
    return (LN2 * (1.0 - beta)) * q * (h - qh_sum)


@triton.jit
def ce_loss(m, ln_d, x_y, x_sum, ls_eps, n_cols):
    """(1 - eps)(lse - x_y) + eps (lse - sum_j x_j / V), lse = m + ln d, with m - x_y formed first (exact
    for close values); no smoothing term when eps = 0 (a -inf logit would make it 0 * inf)."""
    smooth = tl.where(ls_eps > 0, ls_eps * ((m - x_sum / n_cols) + ln_d), 0.0)
    return (1.0 - ls_eps) * ((m - x_y) + ln_d) + smooth


@triton.jit
def ce_grad(x, hit, m, l2d, ls_eps, n_cols):
    """dCE/dx of a tile: softmax(x) - (1 - eps) [j = y] - eps / V, from the rows' max m and log2 of
    their sum-exp l2d ([ROWS, 1]); ``hit`` is [j = y]."""
    s = tl.exp2((x - m) * LOG2E - l2d)
    return s - tl.where(hit, 1.0 - ls_eps, 0.0) - ls_eps / n_cols


@triton.jit
def row_setup(X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x,
              HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, T_SQUARED: tl.constexpr,
              SCALE_GRAD: tl.constexpr, READ_X_Y: tl.constexpr = True):  # fmt: skip
    """The rows' targets and weights: (valid (not ignored), y, x_y read before the gradient may
    overwrite x (with ``READ_X_Y``), the KD term's weight alpha T^2 (or alpha), the CE term's 1 - alpha
    (NaN for a target outside [0, V) that is not ignored), the reduction's scale, the scale the gradient
    takes now)."""
    valid = row_ok
    y = tl.zeros(rows.shape, tl.int64)
    x_y = tl.zeros(rows.shape, tl.float32)
    in_range = row_ok
    if HAS_TARGET:
        y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (y != ignore_index)
        in_range = (y >= 0) & (y < n_cols)
        if HAS_CE and READ_X_Y:
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
