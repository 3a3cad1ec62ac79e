"""Triton row math of the distillation loss, shared by the dense and the sparse-teacher kernels: the
divergences' per-entry terms and gradients (forward KL, reverse KL, JSD, skew KL, skew reverse KL, TVD,
the alpha-beta divergence; DKD's per-entry sums, its row's values and gradient), logit soft-capping,
the hard-label CE term, and a row's target and weights (``kernels/kd_loss.py``'s module doc states the
math; csrc/include/fastkd/row_math.h the same formulas for the C++ kernels).

Log-probabilities are carried in base 2 (l = log2 q = ln q / ln 2): q = 2^l is one MUFU.EX2 with no
multiply, and the log-space terms (a divergence's loss terms, h) are in bits, converted to nats (times
ln 2) once per row or inside the gradient's row constant.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.reductions import LN2, LOG2E, log2_approx, safe_max, tanh

# The codes of csrc/include/fastkd/row_math.h's Divergence (fastkd/backends/cpu.py), the same numbers.
DIVERGENCES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2, "skew_kl": 3, "skew_reverse_kl": 4, "tvd": 5, "ab": 6,
               "dkd": 7}  # fmt: skip
FORWARD_KL, REVERSE_KL, JSD, SKEW_KL, SKEW_REVERSE_KL, TVD, AB, DKD = (tl.constexpr(v) for v in DIVERGENCES.values())
# The alpha-beta divergence's limits, each its own DIVERGENCE (``divergence_code``): b = 0, and a = 0.
AB_B0, AB_A0 = tl.constexpr(8), tl.constexpr(9)
TOPK_DIVERGENCES = tuple(d for d in DIVERGENCES if d != "dkd")  # the sparse teacher's kernel: all but DKD (dense only)


def divergence_code(divergence: str, ab_alpha: float = 1.0, ab_beta: float = 0.0) -> int:
    """The kernels' DIVERGENCE of a divergence: ``DIVERGENCES``, and for "ab" with ab_beta = 0 or
    ab_alpha = 0 its limit's own code (the general case divides by a b)."""
    if divergence == "ab" and ab_beta == 0:
        return AB_B0.value
    if divergence == "ab" and ab_alpha == 0:
        return AB_A0.value
    return DIVERGENCES[divergence]


@triton.jit
def log2_mix(l2p, l2q, beta):
    """log2 m of the mixture m = beta p + (1 - beta) q from log2 p and log2 q, in log space (no entry
    underflows to 0 before its log): the larger side plus log2(1 + 2^(smaller - larger)), one exp2 and
    one log2 (its argument in [1, 2]). NaN in either side gives NaN. beta = 0 gives log2 q."""
    a = l2p + tl.log2(beta)
    b = l2q + tl.log2(1.0 - beta)
    hi = tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)
    return hi + log2_approx(1.0 + tl.exp2(tl.minimum(a, b) - safe_max(hi)))


@triton.jit
def _ratio(l2a, l2m):
    """a / m = 2^(log2 a - log2 m), 0 where m = 0 (then a = 0 too)."""
    return tl.where(l2m > float("-inf"), tl.exp2(l2a - l2m), 0.0)


@triton.jit
def divergence_tile(l2q, l2p, beta, ab_a, ab_b, DIVERGENCE: tl.constexpr):
    """``divergence_terms`` with q = 2^(log2 q) (one exp2 per entry)."""
    return divergence_terms(tl.exp2(l2q), l2q, l2p, beta, ab_a, ab_b, DIVERGENCE)


@triton.jit
def divergence_terms(q, l2q, l2p, beta, ab_a, ab_b, DIVERGENCE: tl.constexpr):
    """(q, p, loss terms, h, g) per entry from q, log2 q and log2 p (the module doc of ``kernels/kd_loss.py``
    states each divergence). The terms are in bits (a divergence without logs: its value times log2 e).
    The gradient D'_j = dD/du_j (``divergence_grad``) takes g_j = dD/d(log q_j) and its row sum G:
    reverse_kl and jsd g = q h in bits with h as in the module doc (zero for forward_kl, which needs
    neither); the others g in nats. ``beta`` is the mixture weight (JSD's beta; the skew divergences'
    skew), ab_a and ab_b the alpha-beta divergence's (AB: both > 0; AB_B0: b = 0; AB_A0: a = 0). The
    terms of a probability 0 are 0; a NaN probability (a NaN logit, a bad temperature) gives NaN terms
    (``!= 0``, not ``> 0``, which would read NaN as 0). DKD's row is not a sum of per-entry terms: its
    tile gives forward KL's terms and g = p, which the row-sums pass sums off the target (``dkd_row``).
    q comes from the caller (``divergence_tile``: 2^(log2 q); the dense kernel's gradient pass: the
    student's exps it shares with CE, times 1 / d_s)."""
    p = tl.exp2(l2p)
    zero = tl.zeros_like(q)
    if DIVERGENCE == FORWARD_KL:
        return q, p, tl.where(p != 0, p * (l2p - l2q), 0.0), zero, zero
    if DIVERGENCE == DKD:
        return q, p, tl.where(p != 0, p * (l2p - l2q), 0.0), zero, p
    if DIVERGENCE == REVERSE_KL:
        h = tl.where(q != 0, l2q - l2p, 0.0)
        return q, p, q * h, h, q * h
    if DIVERGENCE == JSD:
        l2m = log2_mix(l2p, l2q, beta)
        h = tl.where(q != 0, l2q - l2m, 0.0)
        return q, p, beta * tl.where(p != 0, p * (l2p - l2m), 0.0) + (1.0 - beta) * q * h, h, q * h
    if DIVERGENCE == SKEW_KL:  # KL(p || m), m = w p + (1 - w) q: g = -(1 - w) p q / m
        l2m = log2_mix(l2p, l2q, beta)
        return q, p, tl.where(p != 0, p * (l2p - l2m), 0.0), zero, -(1.0 - beta) * _ratio(l2p + l2q, l2m)
    if DIVERGENCE == SKEW_REVERSE_KL:  # KL(q || m), m = (1 - w) p + w q: g = q (ln(q / m) - w q / m)
        l2m = log2_mix(l2q, l2p, beta)
        terms = tl.where(q != 0, q * (l2q - l2m), 0.0)
        return q, p, terms, zero, LN2 * terms - beta * q * _ratio(l2q, l2m)
    if DIVERGENCE == TVD:  # |p - q| / 2: g = q sign(q - p) / 2 (NaN carried by 0 (q - p))
        sign = tl.where(p < q, 0.5, tl.where(q < p, -0.5, 0.0))
        return q, p, (0.5 * LOG2E) * tl.abs(p - q), zero, q * sign + 0.0 * (q - p)
    if DIVERGENCE == AB:  # (a/(a+b) p^(a+b) + b/(a+b) q^(a+b) - p^a q^b) / (a b): g = (q^(a+b) - p^a q^b) / a
        s = ab_a + ab_b
        pq = tl.exp2(ab_a * l2p + ab_b * l2q)
        q_s = tl.exp2(s * l2q)
        terms = ((ab_a / s) * tl.exp2(s * l2p) + (ab_b / s) * q_s - pq) * (LOG2E / (ab_a * ab_b))
        return q, p, terms, zero, (q_s - pq) / ab_a
    if DIVERGENCE == AB_B0:  # (a p^a ln(p / q) - p^a + q^a) / a^2: g = (q^a - p^a) / a
        p_a = tl.exp2(ab_a * l2p)
        q_a = tl.exp2(ab_a * l2q)
        log_term = tl.where(p_a != 0, ab_a * p_a * (l2p - l2q), 0.0)
        return q, p, (log_term + LOG2E * (q_a - p_a)) / (ab_a * ab_a), zero, (q_a - p_a) / ab_a
    # AB_A0: (b q^b ln(q / p) - q^b + p^b) / b^2: g = q^b ln(q / p)
    q_b = tl.exp2(ab_b * l2q)
    p_b = tl.exp2(ab_b * l2p)
    log_term = tl.where(q_b != 0, q_b * (l2q - l2p), 0.0)
    return q, p, (ab_b * log_term + LOG2E * (p_b - q_b)) / (ab_b * ab_b), zero, LN2 * log_term


@triton.jit
def grad_factor(beta, DIVERGENCE: tl.constexpr):
    """f of D' = f (g - q G) (``divergence_grad``): ln 2 for reverse_kl, ln 2 (1 - beta) for jsd (g in
    bits, without jsd's 1 - beta), 1 for the divergences whose g is in nats."""
    if DIVERGENCE == REVERSE_KL:
        return LN2 + 0.0 * beta
    if DIVERGENCE == JSD:
        return LN2 * (1.0 - beta)
    return 1.0 + 0.0 * beta


@triton.jit
def divergence_grad(q, p, h, g, g_sum, beta, DIVERGENCE: tl.constexpr):
    """D'_j = dD/du_j of a tile (module doc), in nats: q - p for forward_kl, else f (g_j - q_j G) with
    G = sum_k g_k the row sum ([ROWS, 1]; ``grad_factor``), formed as f q (h - G) for reverse_kl and
    jsd (g = q h)."""
    if DIVERGENCE == FORWARD_KL:
        return q - p
    if DIVERGENCE == REVERSE_KL:
        return LN2 * q * (h - g_sum)
    if DIVERGENCE == JSD:
        return (LN2 * (1.0 - beta)) * q * (h - g_sum)
    return g - q * g_sum


@triton.jit
def dkd_row(l2a, l2b, big_a, big_b, cross, w_t, w_n):
    """Decoupled KD's row ([ROWS, 1] each) from the row-sums pass: log2 a and log2 b of the target's
    probabilities a = p_y and b = q_y, the other classes' masses A and B (summed over j != y, not 1 - a),
    and cross = sum_{j != y} p_j log2(p_j / q_j); w_t and w_n weigh TCKD and NCKD. Returns (D in bits,
    G = w_t kappa, w_n / A, w_n / B) with kappa = A b / B - a, the row values of ``dkd_grad``;
    NCKD = 0 and no NCKD gradient where A = 0 (no non-target distribution: V = 1, or the teacher's mass
    all on y), as in the float64 reference; B = 0 < A (the student's none) gives an infinite TCKD."""
    a = tl.exp2(l2a)
    b = tl.exp2(l2b)
    l2_big_a = tl.log2(big_a)
    l2_big_b = tl.log2(big_b)
    tckd = tl.where(a != 0, a * (l2a - l2b), 0.0) + tl.where(big_a != 0, big_a * (l2_big_a - l2_big_b), 0.0)
    rest = big_a > 0
    nckd = tl.where(rest & (big_b > 0), cross / big_a - l2_big_a + l2_big_b, 0.0)
    kappa = tl.where(big_b > 0, big_a * b / big_b, 0.0) - a
    w_a = tl.where(rest, w_n / big_a, 0.0)
    w_b = tl.where(rest, w_n / big_b, 0.0)
    return w_t * tckd + w_n * nckd, w_t * kappa, w_a, w_b


@triton.jit
def dkd_grad(q, p, hit, g_sum, w_a, w_b):
    """DKD's D'_j = dD/du_j of a tile (``kernels/kd_loss.py``'s module doc): g_j - q_j G with
    g_j = w_n (q_j / B - p_j / A) off the target and G at it (``hit``), from the row values of
    ``dkd_row`` (G = w_t kappa, w_a = w_n / A, w_b = w_n / B; [ROWS, 1])."""
    return tl.where(hit, g_sum, w_b * q - w_a * p) - q * g_sum


@triton.jit
def soft_cap(z, cap, SOFTCAP: tl.constexpr):
    """Logit soft-capping z -> cap tanh(z / cap) (Gemma 2) with SOFTCAP, else z; -inf (a masked class)
    stays -inf, NaN stays NaN."""
    if SOFTCAP:
        z = tl.where(z == float("-inf"), z, cap * tanh(z / cap))
    return z


@triton.jit
def soft_cap_grad(grad, z, cap, SOFTCAP: tl.constexpr):
    """dL/dz from dL/dz' of the capped logits z' (``z``): times 1 - (z' / cap)^2, 0 at a masked class."""
    if SOFTCAP:
        r = z / cap
        grad = tl.where(z == float("-inf"), 0.0, grad * (1.0 - r * r))
    return grad


@triton.jit
def ce_loss(m, ln_d, x_y, x_sum, ls_eps, n_cols):
    """(1 - eps)(lse - x_y) + eps (lse - sum_j x_j / V), lse = m + ln d, with m - x_y formed first (exact
    for close values); no smoothing term when eps = 0 (a -inf logit would make it 0 * inf)."""
    smooth = tl.where(ls_eps > 0, ls_eps * ((m - x_sum / n_cols) + ln_d), 0.0)
    return (1.0 - ls_eps) * ((m - x_y) + ln_d) + smooth


@triton.jit
def ce_grad(x, hit, m, l2d, ls_eps, n_cols):
    """``ce_grad_softmax`` of s = softmax(x) = 2^((x - m) log2 e - l2d), from the rows' max m and log2 of
    their sum-exp l2d ([ROWS, 1])."""
    return ce_grad_softmax(tl.exp2((x - m) * LOG2E - l2d), hit, ls_eps, n_cols)


@triton.jit
def ce_grad_softmax(s, hit, ls_eps, n_cols):
    """dCE/dx of a tile from its softmax s: s - (1 - eps) [j = y] - eps / V; ``hit`` is [j = y]."""
    return s - tl.where(hit, 1.0 - ls_eps, 0.0) - ls_eps / n_cols


@triton.jit
def store_row_loss(LOSS, PARTS, rows, n_rows, ok, valid, kd, ce, kd_weight, ce_weight, alpha, scale, inv_t, y, n_cols,
                   HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, RETURN_PARTS: tl.constexpr,
                   T_SQUARED: tl.constexpr):  # fmt: skip
    """A tile of rows' loss kd_weight D + ce_weight CE (D given in bits as ``kd``), times the reduction's
    ``scale``, 0 where not ``valid``, into LOSS (N,); with RETURN_PARTS, c D and CE into PARTS (2, N), each
    whatever its weight (CE NaN for a target outside [0, V)). A term of weight 0 adds nothing to the total
    (where alpha is 0 or 1 with RETURN_PARTS: no 0 x inf)."""
    kd = kd * LN2
    loss = tl.zeros_like(kd)
    if HAS_KD:
        loss += tl.where(alpha > 0, kd_weight * kd, 0.0)
    if HAS_CE:
        loss += tl.where(alpha < 1, ce_weight * ce, 0.0)
    tl.store(LOSS + rows[:, None], tl.where(valid, loss * scale, 0.0), mask=ok)
    if RETURN_PARTS:
        parts = PARTS + rows[:, None]
        c = 1.0 / (inv_t * inv_t) if T_SQUARED else 1.0
        tl.store(parts, tl.where(valid, c * kd * scale, 0.0), mask=ok)
        ce = tl.where((y >= 0) & (y < n_cols), ce, float("nan"))
        tl.store(parts + n_rows, tl.where(valid, ce * scale, 0.0), mask=ok)


@triton.jit
def row_setup(X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x,
              HAS_TARGET: tl.constexpr, HAS_CE: tl.constexpr, T_SQUARED: tl.constexpr,
              SCALE_GRAD: tl.constexpr, READ_X_Y: tl.constexpr = True):  # fmt: skip
    """The rows' targets and weights: (valid (not ignored), y, x_y read before the gradient may
    overwrite x (with ``READ_X_Y``), the KD term's weight alpha T^2 (or alpha), the CE term's 1 - alpha
    (NaN for a target outside [0, V) that is not ignored, unless alpha = 1), the reduction's scale, the
    scale the gradient takes now)."""
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
        ce_weight = tl.where(in_range | (alpha == 1.0), ce_weight, float("nan"))
    return valid, y, x_y.to(tl.float32), kd_weight, ce_weight, scale, scale if SCALE_GRAD else 1.0
