"""Triton kernel for the fused distillation loss: the loss of each row and its gradient wrt the student
logits, in the forward pass (``PHASE`` FUSED), or split in two launches: the loss and a few row
statistics in the forward (STATS), the gradient times dL/dloss in the backward (GRAD).

For a row with student logits x (V), teacher logits t_k (K members, V each) and target y (math in fp32):

    soft-capped logits  x <- cap tanh(x / cap), t <- cap tanh(t / cap)   (``softcap``; -inf kept)
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
and for the others D'_j = g_j - q_j G, G = sum_k g_k, with g_j = dD/d(log q_j) taken entry by entry
(``kd_math.divergence_tile``; csrc/include/fastkd/row_math.h's divergence_term, the same formulas):
    skew_kl          D = KL(p || m), m = s p + (1 - s) q                  g = -(1 - s) p q / m
    skew_reverse_kl  D = KL(q || m), m = (1 - s) p + s q                  g = q (log(q / m) - s q / m)
    tvd              D = sum_j |p_j - q_j| / 2                            g = q sign(q - p) / 2
    ab (a, b > 0)    D = sum_j (a/(a+b) p^(a+b) + b/(a+b) q^(a+b) - p^a q^b) / (a b)
                                                                          g = (q^(a+b) - p^a q^b) / a
    ab, b = 0        D = sum_j (a p^a log(p / q) - p^a + q^a) / a^2      g = (q^a - p^a) / a
    ab, a = 0        D = sum_j (b q^b log(q / p) - q^b + p^b) / b^2      g = q^b log(q / p)
(the three forms of the alpha-beta divergence each a DIVERGENCE of its own, chosen on the host; (1, 0)
is forward KL, (0, 1) reverse KL). Forward KL is g = -p, G = -1; reverse KL and JSD g = q h (times
1 - beta), G = sum q h.

DKD (Decoupled KD, Zhao et al. 2022; weights w_t, w_n) splits the row at its target y: with a = p_y,
b = q_y, the other classes' masses A = sum_{j != y} p_j and B = sum_{j != y} q_j (summed over j != y,
not 1 - a: no cancellation where a is near 1) and the conditionals p^_j = p_j / A, q^_j = q_j / B:
    dkd   D = w_t TCKD + w_n NCKD,   TCKD = a log(a / b) + A log(A / B),
          NCKD = sum_{j != y} p^_j log(p^_j / q^_j) = cross / A - log A + log B,
          cross = sum_{j != y} p_j log(p_j / q_j)
Its gradient: log b = u_y - lse(u) and log B = lse_{j != y}(u) - lse(u), so d log b/du_j = [j = y] - q_j
and d log B/du_j = [j != y] q_j / B - q_j; with a + A = 1 = b + B,
    dTCKD/du_j = -a ([j = y] - q_j) - A ([j != y] q_j / B - q_j) = kappa ([j = y] - q_j),
                 kappa = A b / B - a   (at y: b - a = A b - a B = kappa B; off it: q_j (1 - A / B))
and log q^_j = u_j - lse_{k != y}(u) gives dNCKD/du_j = [j != y] (q^_j - p^_j). So D'_j = g_j - q_j G
as above, with g_j = w_n (q_j / B - p_j / A) off the target and g_y = G = w_t kappa (``kd_math.dkd_row``,
``kd_math.dkd_grad``; row_math.h's dkd_row, the same). A = 0 (V = 1, or the teacher's mass all on y)
has no non-target distribution: NCKD and its gradient are 0, as in the float64 reference. A, B and
cross are the row-sums pass's sums over j != y (``divergence_tile`` gives DKD forward KL's terms and
g = p), a and b its log2 p and log2 q at y: the pass and the bytes of JSD. A mass below float32's
range (the target's logit ahead of every other class by more than about 87 T) is 0 there, as in the
C++ and PyTorch backends, which sum the same float32 probabilities: A = 0 drops NCKD, B = 0 < A makes
TCKD infinite, where the reference, in float64 and log space, stays finite.
With logit_norm (c as below; sum' over j != y), from the same pass:
    sum_j D'_j c_j = G c_y (1 - b) + (w_n / B - G) sum' q c - (w_n / A) sum' p c,
    sum_j D'_j     = G (1 - b - B) + (w_n / B) B - (w_n / A) A   (0 in exact math, as every sum D').

and, through the normalization (c_j = x_j - mean x over the n live entries; see ``_norm_factor``),
    dKD/dx_j = k_s (D'_j - c_j W - mean_k (D'_k - c_k W)),   W = r_s sum_k D'_k c_k / kappa
(dKD/dx_j = k_s D'_j without it). The mean is 0 in exact math (sum D' = 0 = sum c); it is subtracted
all the same because r_s, and so k_s, is large for a nearly constant row, where it would amplify the
rounding left in sum D'.
    dCE/dx_j = s_j - (1 - eps) [j = y] - eps / V
The row's gradient alpha c dKD/dx + (1 - alpha) dCE/dx, times the reduction's scale (1/rows for
"mean"; and dL/dloss in GRAD), is written in the student's dtype after the -1 at the target is folded
in, in fp32; with ``softcap`` it is taken wrt the capped logits x' and times 1 - (x' / cap)^2 (0 at a
-inf entry). With ``RETURN_PARTS`` the same launch writes each row's parts c D and CE (each whatever
alpha, times the scale) beside its loss.

**Row sums in one pass (one teacher).** With u_j = (x_j - M_s) k_s and v_j = (t_j - M_t) k_t relative
to running maxima M_s, M_t (base 2 in the kernel: k holds log2 e), d_s = sum e^u, d_t = sum e^v:

    KL(p || q) = E_f / d_t - ln d_t + ln d_s,     E_f = sum_j e^(v_j) (v_j - u_j)
    KL(q || p) = E_r / d_s - ln d_s + ln d_t,     E_r = sum_j e^(u_j) (u_j - v_j)   (= sum q h, reverse KL)

When a maximum grows, every earlier u (or v) shifts by the same amount and its weights rescale like
the sum-exp: E_f <- r_t (E_f + (delta_t - delta_s) d_t) with delta = (M_old - M_new) k, r_t = e^delta_t
(E_r alike), so the log-sum-exp pass also gives the loss of forward and reverse KL, and reverse KL's
row sum sum_k q_k h_k = KL(q || p). An entry where the student is -inf and the teacher is not adds +inf
to E_f (forward KL is infinite there), as does the converse to E_r; a term whose weight underflows to 0
drops out, as in float64. With ``logit_norm`` the gradient's row sums need, with c = x - mean (the
statistics pass first): sum q c = C_q / d_s, C_q = sum e^u c; sum p c = C_p / d_t; and for reverse
KL sum q h c = (F - (ln d_s - ln d_t) C_q) / d_s, F = sum e^u (u - v) c, each rescaled like its weight.
JSD's log m = log(beta p + (1 - beta) q) needs both rows' final normalizers: sum q h is not a function
of finitely many running sums (it is sum_j e^(u_j) phi(rho e^(v_j - u_j)) with phi nonlinear in the
ratio rho = d_s / d_t known only at the row's end), so JSD keeps a pass for it, as do skew KL, skew
reverse KL, TVD and the alpha-beta divergence for their loss and G (log m, sign(q - p), p^a q^b: each a
nonlinear function of both normalized rows), as does DKD (its sums over j != y, and each q, p); so
do ensembles, whose log p = log mean_k p_k needs every
member's normalizer first.

**Passes** over a row wider than ``MAX_ONE_BLOCK`` (read in column blocks; a narrower row is read once,
several rows a program, and each pass runs on the registers): [``logit_norm``: the statistics of
student and teacher] -> the log-sum-exps of student (at T and at 1), teacher or each member, with
the online sums above -> [every divergence but forward and reverse KL; ensembles with reverse KL or
``logit_norm``: the row sums and the loss] -> the gradient (and the loss of an ensemble's forward KL).
In bytes per entry, bf16 student and one bf16 teacher: forward/reverse KL 4 + 6 = 10, JSD, skew KL,
skew reverse KL, TVD, alpha-beta and DKD 14, with ``logit_norm`` 4 more; the minimum (read both, write
the gradient) is 6. Soft-capping re-caps each entry at each read (a tanh per entry and pass, no
bytes); ``return_parts`` adds 8 bytes a row. The split moves the last pass to the backward, where
dL/dloss is known: the same bytes, with no read-modify-write of the gradient when dL/dloss != 1.

**Exps.** With M the student's row max, u_j = (x_j - M) k_s log2 e and e_j = 2^(u_j) (its exp at T),
CE's exps at 1 are e^(x_j - M). Without ``logit_norm``, k_s = 1 / T; where T is one number and an
integer P in [1, 8] (``ce_power``: the kernel's CE_POW; csrc/cpu/common.h's ce_power, the same rule),

    e^(x_j - M) = (e^((x_j - M) / T))^T = e_j^P,

at most 4 multiplies by squaring (``int_power``: 2 at T = 4) and no exp: d_1 = sum_j e_j^P, and
CE's gradient s_j = e_j^P / d_1. The same M serves both (T > 0 keeps the argmax), as does its running
rescale: d_1 <- d_1 r_s^P with r_s = 2^((M_old - M_new) k_s log2 e), the student's. A -inf entry has
e_j = 0 and 0^P = 0; NaN stays NaN. Relative error of e_j^P: about P times e_j's (exp2's few ulp and
the rounding of k_s log2 e, times |u_j|), plus half an ulp a multiply: at T = 4 about 10 ulp of fp32
(~1e-6) where CE's own exp2 has a few; every output is still rounded to the tolerance of the dtype.
A per-row temperature tensor, any other T and ``logit_norm`` (k_s = r_s / T) keep CE's own exp2.
In the gradient pass q_j = e_j / d_s (1 / d_s once per row), so e_j serves q and s alike.
MUFU.EX2 per entry (one teacher; a slot is VEC = 16 / element size entries, 8 in bf16, 4 in fp32):
    log-sum-exps   2 (e, the teacher's) + 2 per slot to rescale (r_s, r_t); + 1 + 1 per slot for CE
                   without CE_POW
    gradient       2 (e, p); + 1 for CE without CE_POW
so forward KL + CE at T = 4 takes 4 + 2 / VEC (4.25 in bf16, 4.5 in fp32) where CE's own exps took
6 + 3 / VEC. Row sums passes (every divergence but forward and reverse KL) add per entry 2 (q, p),
plus 2 for JSD and the skew divergences (log m's exp2 and log2, and for the skew divergences one more
for p q / m or q / m), 2 or 3 for the alpha-beta divergence, none for DKD (row_math.h counts the C++
kernels'). No exp is taken twice in a pass; the student's e and the teacher's p are taken again in
the gradient pass, as kept they would move 8 more bytes an entry (fp32 each) through memory.

**Column blocks.** Each step of a pass reads a [ROWS, BLOCK] tile in 16-byte vectors and keeps its
running values per slot, the VEC entries one thread holds (``reductions.slots``): the steps have no
barrier, and the slots are merged once per row. A row whose start is not 16-byte aligned is read as an
aligned body and an edge of at most 2 VEC - 2 entries (``reductions.row_body``).

Entries: a -inf logit is a masked class (probability 0, excluded from the normalization's statistics;
its KD gradient is 0). A row whose target is ``ignore_index`` gets loss 0 and gradient 0; a target
outside [0, V) (reaching the kernel unchecked) gives NaN. A student row of all -inf has no
distribution: NaN.
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from fastkd.kernels.kd_math import (
    DKD,
    FORWARD_KL,
    REVERSE_KL,
    ce_grad_softmax,
    ce_loss,
    divergence_grad,
    divergence_terms,
    divergence_tile,
    dkd_grad,
    dkd_row,
    grad_factor,
    row_setup,
    soft_cap,
    soft_cap_grad,
    store_row_loss,
)
from fastkd.kernels.reductions import (
    LN2,
    LOG2E,
    int_power,
    lse_empty,
    lse_finish,
    lse_step,
    per_entry,
    row_body,
    row_edge,
    row_inv_temperature,
    safe_max,
    slot_max,
    slot_sum,
    slot_total,
    slots,
)

NORMS = {None: 0, "standardize": 1, "spherical": 2}  # the kernel's NORM
NO_NORM, STANDARDIZE, SPHERICAL = (tl.constexpr(v) for v in NORMS.values())
EPS = tl.constexpr(1e-7)  # fastkd.reference.NORM_EPS
PHASES = {"fused": 0, "stats": 1, "grad": 2}  # the kernel's PHASE
PHASE_FUSED, PHASE_STATS, PHASE_GRAD = (tl.constexpr(v) for v in PHASES.values())
# The row statistics STATS writes and GRAD reads, fp32 each: student max, k_s, log2 d_s, log2 d_1;
# teacher max, k_t, log2 d_t; G (sum q h in bits for reverse KL); mean x, W, mean_k (D'_k - c_k W)
# (logit_norm); DKD's w_n / A, w_n / B.
N_STATS = 13
STATS_WIDTH = tl.constexpr(N_STATS)  # the same, for the kernel

MAX_ONE_BLOCK = 4096  # widest row held in registers by one program
LOOP_WARPS = 4
LOOP_VECTORS = 2  # 16-byte vectors per thread per tensor in a step of the column loop
# Registers per thread, for the loop: without a budget ptxas spills 8 bytes at 80 in some variants.
LOOP_MAX_REGISTERS = 128
# An ensemble with logit_norm at a width with an edge (rows not 16-byte aligned) spilled 24-40 bytes at 128
# (V = 50257, K = 3) and 8 at 168 (JSD + spherical); with no budget (255) ptxas takes 200-207 registers and
# spills nothing, at 2 blocks of 4 warps a SM (any budget over 170 gives 2). Rows read entry by entry
# instead (ALIGN 0) spilled 232-304 bytes at 128 (tests/sm90_compile.py). DKD with an ensemble (its three
# target accumulators more) spilled 8 bytes at 128 (50257, K = 3) and 16 with logit_norm (131072): the same.
LOOP_MAX_REGISTERS_ENSEMBLE_NORM_EDGE = 255


@triton.jit
def _logits(ptr, mask, cap, SOFTCAP: tl.constexpr):
    """A tile of logits in fp32, -inf where masked, soft-capped with SOFTCAP (``kd_math.soft_cap``)."""
    return soft_cap(tl.load(ptr, mask=mask, other=float("-inf")).to(tl.float32), cap, SOFTCAP)


# ---- logit_norm: the rows' statistics -----------------------------------------------------------------


@triton.jit
def _chan(n, mean, m2, n_b, mean_b, m2_b):
    """Chan et al.'s merge of (count, mean, M2) with a block's."""
    n_new = n + n_b
    delta = mean_b - mean
    frac = n_b / tl.maximum(n_new, 1.0)
    return n_new, mean + delta * frac, m2 + m2_b + delta * delta * n * frac


@triton.jit
def _moments_step(n, mean, m2, x, SLOTS: tl.constexpr):
    """(n, mean, M2) per slot of the entries that are not -inf, with the tile x added."""
    x3 = slots(x, SLOTS)
    live = x3 > float("-inf")
    n_b = slot_total(live.to(tl.float32), SLOTS)
    mean_b = slot_total(tl.where(live, x3, 0.0), SLOTS) / tl.maximum(n_b, 1.0)
    dev = tl.where(live, x3 - per_entry(mean_b, SLOTS), 0.0)
    return _chan(n, mean, m2, n_b, mean_b, slot_total(dev * dev, SLOTS))


@triton.jit
def _moments_finish(n, mean, m2, SLOTS: tl.constexpr):
    """The rows' (n, mean, M2) from their slots': [ROWS, SLOTS] -> [ROWS, 1]."""
    if SLOTS == 1:
        return n, mean, m2
    n_row = tl.sum(n, 1, keep_dims=True)
    mean_row = tl.sum(n * mean, 1, keep_dims=True) / tl.maximum(n_row, 1.0)
    dev = mean - mean_row
    return n_row, mean_row, tl.sum(m2 + n * dev * dev, 1, keep_dims=True)


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
def _row_moments(body, cols, n_body, ok, tile, edge, n_cols, cap, NORM: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK: tl.constexpr, SLOTS: tl.constexpr, ONE_BLOCK: tl.constexpr, EDGE: tl.constexpr,
                 SOFTCAP: tl.constexpr):  # fmt: skip
    """(n, mean, M2) of whole rows ([ROWS, 1]): the body (the tile held, or read in column blocks from
    the pointers ``body``), then the edge."""
    n = tl.zeros([ROWS, SLOTS], tl.float32)
    mean = tl.zeros([ROWS, SLOTS], tl.float32)
    m2 = tl.zeros([ROWS, SLOTS], tl.float32)
    if NORM != NO_NORM:
        if ONE_BLOCK:
            n, mean, m2 = _moments_step(n, mean, m2, tile, SLOTS)
        else:
            for start in range(0, n_cols, BLOCK):
                x = _logits(body + start + cols, ok & (start + cols < n_body), cap, SOFTCAP)
                n, mean, m2 = _moments_step(n, mean, m2, x, SLOTS)
        n, mean, m2 = _moments_finish(n, mean, m2, SLOTS)
        if EDGE:
            n, mean, m2 = _moments_step(n, mean, m2, edge, 1)
    return n, mean, m2


# ---- the log-sum-exp pass, with the one-teacher row sums online ---------------------------------------


@triton.jit
def _pass_empty(ROWS: tl.constexpr, SLOTS: tl.constexpr):
    """The running values of slots that have seen nothing: (M_s, d_s, d_1, sum x, M_t, d_t, E, sum c,
    C_q, C_p, F) (module doc), maxima -inf, sums 0."""
    m, d = lse_empty(ROWS, SLOTS)
    return m, d, d, d, m, d, d, d, d, d, d


@triton.jit
def _pass_rescale(st, ms_to, mt_to, ks2, kt2, DIVERGENCE: tl.constexpr, NORM: tl.constexpr, HAS_KD: tl.constexpr,
                  HAS_CE: tl.constexpr, PAIR: tl.constexpr, CE_POW: tl.constexpr):  # fmt: skip
    """The running values of ``st`` rescaled to the larger maxima ms_to, mt_to (module doc); CE's by
    r_s^CE_POW (no exp) where CE_POW > 0."""
    ms, ds, d1, xs, mt, dt, e, cs, cq, cp, f = st
    sub_s = safe_max(ms_to)
    if HAS_CE and CE_POW == 0:
        d1 = d1 * tl.exp2((ms - sub_s) * LOG2E)
    if HAS_KD:
        r_s = tl.exp2((ms - sub_s) * ks2)
        if HAS_CE and CE_POW > 0:
            d1 = d1 * int_power(r_s, CE_POW)
        if PAIR:
            sub_t = safe_max(mt_to)
            r_t = tl.exp2((mt - sub_t) * kt2)
            shift = (safe_max(mt) - sub_t) * kt2 - (safe_max(ms) - sub_s) * ks2  # delta_t - delta_s
            if DIVERGENCE == FORWARD_KL:
                e = tl.where(r_t != 0, r_t * (e + shift * dt), 0.0)
                cp = cp * r_t
            if DIVERGENCE == REVERSE_KL:
                e = tl.where(r_s != 0, r_s * (e - shift * ds), 0.0)
                f = tl.where(r_s != 0, r_s * (f - shift * cq), 0.0)
            dt = dt * r_t
        ds = ds * r_s
        cq = cq * r_s
    return ms_to, ds, d1, xs, mt_to, dt, e, cs, cq, cp, f


@triton.jit
def _pass_step(st, x, t, mask, mu, ks2, kt2, DIVERGENCE: tl.constexpr, NORM: tl.constexpr, HAS_KD: tl.constexpr,
               HAS_CE: tl.constexpr, PAIR: tl.constexpr, CE_POW: tl.constexpr, SLOTS: tl.constexpr):  # fmt: skip
    """The running values ``st`` ([ROWS, SLOTS]) with the tile x (and the teacher's t, with PAIR) added:
    one exp2 per entry for each of the student at T, the teacher and (CE_POW = 0) the student at 1, and
    one per slot for each to rescale; with CE_POW > 0 the student at 1 takes the CE_POW-th powers of the
    student's exps at T (module doc, "Exps")."""
    x3 = slots(x, SLOTS)
    ms_new = tl.maximum(st[0], slot_max(x3, SLOTS))
    mt_new = st[4]
    if PAIR:
        t3 = slots(t, SLOTS)
        mt_new = tl.maximum(st[4], slot_max(t3, SLOTS))
    ms, ds, d1, xs, mt, dt, e, cs, cq, cp, f = _pass_rescale(st, ms_new, mt_new, ks2, kt2, DIVERGENCE, NORM, HAS_KD,
                                                              HAS_CE, PAIR, CE_POW)  # fmt: skip
    x_rel = x3 - per_entry(safe_max(ms), SLOTS)
    if HAS_CE:
        if CE_POW == 0:
            d1 += slot_total(tl.exp2(x_rel * LOG2E), SLOTS)
        xs += slot_total(tl.where(slots(mask, SLOTS), x3, 0.0), SLOTS)
    if HAS_KD:
        u = x_rel * per_entry(ks2, SLOTS)
        eu = tl.exp2(u)
        ds += slot_total(eu, SLOTS)
        if HAS_CE and CE_POW > 0:
            d1 += slot_total(int_power(eu, CE_POW), SLOTS)
        c = tl.zeros_like(u)
        if NORM != NO_NORM:
            c = tl.where(x3 > float("-inf"), x3 - per_entry(mu, SLOTS), 0.0)
            cs += slot_total(c, SLOTS)
            cq += slot_total(eu * c, SLOTS)
        if PAIR:
            v = (t3 - per_entry(safe_max(mt), SLOTS)) * per_entry(kt2, SLOTS)
            ev = tl.exp2(v)
            dt += slot_total(ev, SLOTS)
            if DIVERGENCE == FORWARD_KL:
                e += slot_total(tl.where(ev != 0, ev * (v - u), 0.0), SLOTS)
                if NORM != NO_NORM:
                    cp += slot_total(ev * c, SLOTS)
            if DIVERGENCE == REVERSE_KL:
                w = tl.where(eu != 0, eu * (u - v), 0.0)
                e += slot_total(w, SLOTS)
                if NORM != NO_NORM:
                    f += slot_total(w * c, SLOTS)
    return ms, ds, d1, xs, mt, dt, e, cs, cq, cp, f


@triton.jit
def _pass_finish(st, ks2, kt2, DIVERGENCE: tl.constexpr, NORM: tl.constexpr, HAS_KD: tl.constexpr,
                 HAS_CE: tl.constexpr, PAIR: tl.constexpr, CE_POW: tl.constexpr):  # fmt: skip
    """The rows' values from their slots': [ROWS, SLOTS] -> [ROWS, 1]."""
    ms = tl.max(st[0], 1, keep_dims=True)
    mt = tl.max(st[4], 1, keep_dims=True)
    _, ds, d1, xs, _, dt, e, cs, cq, cp, f = _pass_rescale(st, ms, mt, ks2, kt2, DIVERGENCE, NORM, HAS_KD, HAS_CE,
                                                           PAIR, CE_POW)  # fmt: skip
    return (ms, tl.sum(ds, 1, keep_dims=True), tl.sum(d1, 1, keep_dims=True), tl.sum(xs, 1, keep_dims=True), mt,
            tl.sum(dt, 1, keep_dims=True), tl.sum(e, 1, keep_dims=True), tl.sum(cs, 1, keep_dims=True),
            tl.sum(cq, 1, keep_dims=True), tl.sum(cp, 1, keep_dims=True), tl.sum(f, 1, keep_dims=True))  # fmt: skip


# ---- the teacher, and the terms after the log-sum-exps ---------------------------------------------


@triton.jit
def _pick(values, member, kk):
    """values[:, member] of a [ROWS, K_BLOCK] tensor, as [ROWS, 1]."""
    return tl.sum(tl.where(kk[None, :] == member, values, 0.0), 1, keep_dims=True)


@triton.jit
def _teacher_log2_prob(t, t_ptr, mask, kt2, m_t, l2d_t, kk, n_teachers, stride_tk, cap, ENSEMBLE: tl.constexpr,
                       SOFTCAP: tl.constexpr):  # fmt: skip
    """log2 p of a tile: from the loaded tile t of one teacher, or (ENSEMBLE) from each member read at
    t_ptr, with each member's scale, max and log2 d ([ROWS, K_BLOCK]): log2 of the mean of 2^(w_k)."""
    if not ENSEMBLE:
        l2p = (t - safe_max(m_t)) * kt2 - l2d_t
    else:
        mx = tl.full(mask.shape, float("-inf"), tl.float32)
        acc = tl.zeros(mask.shape, tl.float32)
        member_ptr = t_ptr  # advanced by stride_tk per member: 64-bit pointers, no int32 product
        for member in range(n_teachers):
            t_k = _logits(member_ptr, mask, cap, SOFTCAP)
            member_ptr += stride_tk
            w = (t_k - safe_max(_pick(m_t, member, kk))) * _pick(kt2, member, kk) - _pick(l2d_t, member, kk)
            mx_new = tl.maximum(mx, w)
            sub = safe_max(mx_new)
            acc = acc * tl.exp2(mx - sub) + tl.exp2(w - sub)
            mx = mx_new
        l2p = mx + tl.log2(acc) - tl.log2(n_teachers.to(tl.float32))
    return l2p


@triton.jit
def _terms(acc, x, l2p, mask, hit, m_s, ks2, l2d_s, mu, beta, ab_a, ab_b, DIVERGENCE: tl.constexpr,
           NORM: tl.constexpr, SLOTS: tl.constexpr):  # fmt: skip
    """``acc`` ([ROWS, SLOTS] each) plus the row sums a tile adds once the log-sum-exps are known: the loss
    terms (in bits) and G = sum g (``divergence_tile``; sum q h in bits for reverse_kl and jsd), and with
    ``logit_norm`` the row sums of ``_norm_terms`` (sum D' c, sum q c, sum D', sum c, with D' c and D' as
    g c and q for the divergences other than forward_kl); the last three 0 but for DKD.

    DKD (``hit``: the target's entry) sums its terms, g = p, p c, q c and q over j != y only, into the
    same places (cross, A, sum p c, sum q c, B: ``dkd_row``, ``_dkd_norm_sums``), and takes log2 p_y,
    log2 q_y and c_y at the target into the last three."""
    l2q = (x - safe_max(m_s)) * ks2 - l2d_s
    q, p, terms, _h, g = divergence_tile(l2q, l2p, beta, ab_a, ab_b, DIVERGENCE)
    s_kd, s_qh, s_dc, s_qc, s_d, s_c, s_py, s_qy, s_cy = acc
    keep = mask
    if DIVERGENCE == DKD:
        hit = hit & mask  # a masked lane of the edge may carry the target's index
        keep = mask & ~hit
        s_d += slot_sum(tl.where(keep, q, 0.0), SLOTS)
        s_py += slot_sum(tl.where(hit, l2p, 0.0), SLOTS)
        s_qy += slot_sum(tl.where(hit, l2q, 0.0), SLOTS)
    qh = tl.where(keep, g, 0.0)
    s_kd += slot_sum(tl.where(keep, terms, 0.0), SLOTS)
    s_qh += slot_sum(qh, SLOTS)
    if NORM != NO_NORM:
        c = tl.where(x > float("-inf"), x - mu, 0.0)
        s_c += slot_sum(c, SLOTS)
        if DIVERGENCE == FORWARD_KL:
            s_qc += slot_sum(q * c, SLOTS)
            d = tl.where(mask, q - p, 0.0)
            s_d += slot_sum(d, SLOTS)
            s_dc += slot_sum(d * c, SLOTS)
        elif DIVERGENCE == DKD:
            s_qc += slot_sum(tl.where(keep, q * c, 0.0), SLOTS)
            s_dc += slot_sum(qh * c, SLOTS)
            s_cy += slot_sum(tl.where(hit, c, 0.0), SLOTS)
        else:
            s_qc += slot_sum(q * c, SLOTS)
            s_d += slot_sum(tl.where(mask, q, 0.0), SLOTS)
            s_dc += slot_sum(qh * c, SLOTS)
    return s_kd, s_qh, s_dc, s_qc, s_d, s_c, s_py, s_qy, s_cy


@triton.jit
def _row_sums(acc):
    """The rows' sums of slot sums: [ROWS, SLOTS] -> [ROWS, 1] each."""
    s_kd, s_qh, s_dc, s_qc, s_d, s_c, s_py, s_qy, s_cy = acc
    return (tl.sum(s_kd, 1, keep_dims=True), tl.sum(s_qh, 1, keep_dims=True), tl.sum(s_dc, 1, keep_dims=True),
            tl.sum(s_qc, 1, keep_dims=True), tl.sum(s_d, 1, keep_dims=True), tl.sum(s_c, 1, keep_dims=True),
            tl.sum(s_py, 1, keep_dims=True), tl.sum(s_qy, 1, keep_dims=True),
            tl.sum(s_cy, 1, keep_dims=True))  # fmt: skip


@triton.jit
def _norm_terms(r, kappa, n, qh_sum, dc_sum, qc_sum, d_sum, c_sum, beta, DIVERGENCE: tl.constexpr):
    """(W, mean_k (D'_k - c_k W)) of the module doc from the row sums (G = sum g, ``divergence_tile``;
    sum D' c and sum D' as sum g c and sum q but for forward_kl and dkd, which give them:
    ``_dkd_norm_sums``); W = 0 for a constant row (kappa = 0)."""
    if DIVERGENCE != FORWARD_KL and DIVERGENCE != DKD:  # D' = f (g - q G)
        f = grad_factor(beta, DIVERGENCE)
        dc_sum = f * (dc_sum - qh_sum * qc_sum)
        d_sum = f * qh_sum * (1.0 - d_sum)
    w = tl.where(kappa > 0, r * dc_sum / kappa, 0.0)
    return w, (d_sum - c_sum * w) / tl.maximum(n, 1.0)


@triton.jit
def _dkd_norm_sums(g_sum, w_a, w_b, l2q_y, c_y, big_a, big_b, pc_rest, qc_rest):
    """DKD's sum_j D'_j c_j and sum_j D'_j (``_norm_terms``) from ``dkd_row``'s G, w_a, w_b, the target's
    log2 q_y and c_y, and the sums over j != y of p (A), q (B), p c and q c: with b = q_y,
        sum D' c = G c_y (1 - b) + (w_b - G) sum' q c - w_a sum' p c
        sum D'   = G (1 - b - B) + w_b B - w_a A."""
    b = tl.exp2(l2q_y)
    return (g_sum * c_y * (1.0 - b) + (w_b - g_sum) * qc_rest - w_a * pc_rest,
            g_sum * (1.0 - b - big_b) + w_b * big_b - w_a * big_a)  # fmt: skip


@triton.jit
def _grad(x, l2p, hit, m_s, k_s, l2d_s, inv_d_s, inv_d_1, qh_sum, w_a, w_b, mu, w_norm, g_mean, kd_scale, ce_scale,
          beta, ab_a, ab_b, ls_eps, n_cols, cap, DIVERGENCE: tl.constexpr, NORM: tl.constexpr, HAS_KD: tl.constexpr,
          HAS_CE: tl.constexpr, CE_POW: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """dL/dx of a tile given the row statistics ([ROWS, 1]; inv_d_s = 1 / d_s and inv_d_1 = 1 / d_1, the
    student's sum-exps at T and at 1; w_a and w_b DKD's, ``dkd_row``), kd_scale = alpha c times the
    gradient's scale, ce_scale = (1 - alpha) times it, and ``hit``, the entry of the target; and the
    tile's loss terms (bits). q = e_s / d_s and s = e_1 / d_1 from the exps e_s = 2^u, u = (x - M) k_s
    log2 e, and e_1 = e^(x - M), which is e_s^CE_POW where CE_POW > 0 (module doc, "Exps"). With
    SOFTCAP, x is the capped tile and dL/dx is taken wrt the raw logits."""
    grad = tl.zeros_like(x)
    terms = tl.zeros_like(x)
    x_rel = x - safe_max(m_s)
    if HAS_KD:
        u = x_rel * (k_s * LOG2E)
        e_s = tl.exp2(u)
        q, p, terms, h, g = divergence_terms(e_s * inv_d_s, u - l2d_s, l2p, beta, ab_a, ab_b, DIVERGENCE)
        if DIVERGENCE == DKD:
            g = dkd_grad(q, p, hit, qh_sum, w_a, w_b)
        else:
            g = divergence_grad(q, p, h, g, qh_sum, beta, DIVERGENCE)
        if NORM != NO_NORM:
            live = x > float("-inf")
            g = tl.where(live, g - (x - mu) * w_norm - g_mean, 0.0)
        # kd_scale 0 (alpha = 0, with RETURN_PARTS): no KD term in the loss, none in the gradient, not 0 x inf
        grad = tl.where(kd_scale != 0, (kd_scale * k_s) * g, 0.0)
    if HAS_CE:
        if CE_POW > 0:
            e_1 = int_power(e_s, CE_POW)
        else:
            e_1 = tl.exp2(x_rel * LOG2E)
        grad += ce_scale * ce_grad_softmax(e_1 * inv_d_1, hit, ls_eps, n_cols)
    return soft_cap_grad(grad, x, cap, SOFTCAP), terms


@triton.jit
def kd_loss_kernel(
    X,  # (N, V) student logits, unit column stride
    TL,  # (K, N, V) teacher logits, unit column stride
    Y,  # (N,) int32/int64 targets, or None
    LOSS,  # (N,) fp32 row losses, times the reduction's scale (FUSED, STATS)
    PARTS,  # (2, N) fp32: each row's KD part c D and CE part, times the scale (RETURN_PARTS), or None
    G,  # (N, V) dL/dx in X's dtype (may be X itself), written when NEED_GRAD (FUSED, GRAD)
    STATS,  # (N, N_STATS) fp32 row statistics: written by STATS, read by GRAD
    GO,  # dL/dloss, one value (stride_go 0) or one per row (GRAD)
    T,  # (N,) student temperatures (stride_temp apart; 0 for one value), or None for inv_temp
    TT,  # (N,) teacher temperatures, or None for inv_temp_t
    SCALE,  # one fp32: the reduction's scale, or None for the float scale
    inv_temp,
    inv_temp_t,
    scale,
    alpha,
    beta,  # the mixture weight: JSD's beta, the skew divergences' skew
    ab_a,  # the alpha-beta divergence's alpha and beta; DKD's weights of TCKD and NCKD
    ab_b,
    ls_eps,  # label smoothing
    cap,  # the soft-capping's cap (SOFTCAP)
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
    stride_go,
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
    SLOTS: tl.constexpr,  # running values per row: BLOCK / VEC in the column loop, 1 for one block
    VEC: tl.constexpr,  # entries per 16-byte vector
    ALIGN: tl.constexpr,  # reductions.row_body
    EDGE: tl.constexpr,  # some rows have entries outside their aligned body
    PHASE: tl.constexpr,
    SOFTCAP: tl.constexpr,  # student and teacher logits capped to cap tanh(z / cap) first
    RETURN_PARTS: tl.constexpr,  # write PARTS (HAS_KD and, with a target, HAS_CE whatever alpha)
    CE_POW: tl.constexpr,  # 0: CE takes its own exps; P: the P-th powers of the student's (T = P, ce_power)
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    ok = row_ok[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    kk = tl.arange(0, K_BLOCK)
    PAIR: tl.constexpr = HAS_KD and not ENSEMBLE  # one teacher: its row sums online, with the student's
    # The divergences whose row sums need both rows' normalizers first (a pass of their own).
    ROW_SUMS: tl.constexpr = DIVERGENCE != FORWARD_KL and DIVERGENCE != REVERSE_KL
    CE_POW_OK: tl.constexpr = CE_POW == 0 or (HAS_KD and HAS_CE and NORM == NO_NORM and not HAS_T)
    tl.static_assert(CE_POW_OK, "CE_POW > 0 needs KD, CE, no logit_norm and one temperature (ce_power)")
    if ALIGN != 0 and ENSEMBLE:
        stride_tk = tl.multiple_of(stride_tk, VEC)
    x_off, head, n_body = row_body(rows64, stride_x, n_cols, VEC, ALIGN)
    t_off, _t_head, _t_n = row_body(rows64, stride_tn, n_cols, VEC, ALIGN)  # the same head and body as x's
    g_off, _g_head, _g_n = row_body(rows64, stride_g, n_cols, VEC, ALIGN)
    x_body, t_body, g_body = X + x_off, TL + t_off, G + g_off
    body_mask = ok & (cols < n_body)
    edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
    x_edge = X + rows64[:, None] * stride_x + edge
    t_edge = TL + rows64[:, None] * stride_tn + edge
    inv_t = row_inv_temperature(T, inv_temp, rows, row_ok, stride_temp, HAS_T)
    inv_tt = row_inv_temperature(TT, inv_temp_t, rows, row_ok, stride_temp_t, HAS_TT)[:, None]
    valid, y, x_y, kd_weight, ce_weight, scale, grad_scale = row_setup(
        X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x, HAS_TARGET, HAS_CE,
        T_SQUARED, SCALE_GRAD, PHASE != PHASE_GRAD,
    )  # fmt: skip
    x_y = soft_cap(x_y, cap, SOFTCAP)
    inv_t, valid, y, kd_weight, ce_weight = (
        inv_t[:, None],
        valid[:, None],
        y[:, None],
        kd_weight[:, None],
        ce_weight[:, None],
    )

    # The tiles of a row held in registers (one block), and the edge; a row read in blocks loads its own.
    x_b = tl.zeros([ROWS, BLOCK], tl.float32)
    t_b = tl.zeros([ROWS, BLOCK], tl.float32)
    if ONE_BLOCK:
        x_b = _logits(x_body + cols, body_mask, cap, SOFTCAP)
        if PAIR:
            t_b = _logits(t_body + cols, body_mask, cap, SOFTCAP)
    x_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    t_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    if EDGE:
        x_e = _logits(x_edge, edge_mask, cap, SOFTCAP)
        if PAIR:
            t_e = _logits(t_edge, edge_mask, cap, SOFTCAP)

    # The row statistics: computed (FUSED, STATS) or read back (GRAD).
    m_s = tl.zeros([ROWS, 1], tl.float32)
    k_s = tl.zeros([ROWS, 1], tl.float32)
    l2d_s = tl.zeros([ROWS, 1], tl.float32)
    l2d_1 = tl.zeros([ROWS, 1], tl.float32)
    m_t = tl.zeros([ROWS, K_BLOCK], tl.float32)
    kt2 = tl.zeros([ROWS, K_BLOCK], tl.float32)
    l2d_t = tl.zeros([ROWS, K_BLOCK], tl.float32)
    qh_sum = tl.zeros([ROWS, 1], tl.float32)
    w_a = tl.zeros([ROWS, 1], tl.float32)  # DKD's w_n / A and w_n / B (dkd_row)
    w_b = tl.zeros([ROWS, 1], tl.float32)
    mu = tl.zeros([ROWS, 1], tl.float32)
    w_norm = tl.zeros([ROWS, 1], tl.float32)
    g_mean = tl.zeros([ROWS, 1], tl.float32)
    kd = tl.zeros([ROWS, 1], tl.float32)  # the KD term (bits until the end)
    ce = tl.zeros([ROWS, 1], tl.float32)
    y_body = tl.where((y >= head) & (y < head + n_body), y - head, -1).to(tl.int32)  # the target in the body
    if PHASE != PHASE_GRAD:
        # Pass 1 (logit_norm): the statistics of the student and each teacher.
        n = tl.zeros([ROWS, 1], tl.float32)
        r_s = tl.full([ROWS, 1], 1.0, tl.float32)
        kappa = tl.zeros([ROWS, 1], tl.float32)
        r_t = tl.full([ROWS, K_BLOCK], 1.0, tl.float32)
        if HAS_KD and NORM != NO_NORM:
            n, mu, m2 = _row_moments(x_body, cols, n_body, ok, x_b, x_e, n_cols, cap, NORM, ROWS, BLOCK, SLOTS,
                                     ONE_BLOCK, EDGE, SOFTCAP)  # fmt: skip
            r_s, kappa = _norm_factor(n, m2, norm_scale, NORM)
            member_body, member_edge = (
                t_body,
                t_edge,
            )  # advanced by stride_tk: 64-bit pointers, no int32 product
            for member in range(n_teachers):
                t_m = t_b
                t_me = t_e
                if ENSEMBLE and ONE_BLOCK:
                    t_m = _logits(member_body + cols, body_mask, cap, SOFTCAP)
                if ENSEMBLE and EDGE:
                    t_me = _logits(member_edge, edge_mask, cap, SOFTCAP)
                n_t, _mean_t, m2_t = _row_moments(member_body, cols, n_body, ok, t_m, t_me, n_cols, cap, NORM, ROWS,
                                                  BLOCK, SLOTS, ONE_BLOCK, EDGE, SOFTCAP)  # fmt: skip
                member_body += stride_tk
                member_edge += stride_tk
                r, _kappa_t = _norm_factor(n_t, m2_t, norm_scale, NORM)
                r_t = tl.where(kk[None, :] == member, r, r_t)
        k_s = r_s * inv_t
        ks2 = k_s * LOG2E
        kt2 = r_t * (inv_tt * LOG2E)

        # Pass 2: the log-sum-exps of the student (at T and at 1 share the max) and of one teacher, with
        # the row sums of the module doc online; sum x for label smoothing.
        st = _pass_empty(ROWS, SLOTS)
        if ONE_BLOCK:
            st = _pass_step(
                st, x_b, t_b, body_mask, mu, ks2, kt2, DIVERGENCE, NORM, HAS_KD, HAS_CE, PAIR, CE_POW, SLOTS
            )
        else:
            for start in range(0, n_cols, BLOCK):
                mask = ok & (start + cols < n_body)
                x = _logits(x_body + start + cols, mask, cap, SOFTCAP)
                t = t_b
                if PAIR:
                    t = _logits(t_body + start + cols, mask, cap, SOFTCAP)
                st = _pass_step(
                    st, x, t, mask, mu, ks2, kt2, DIVERGENCE, NORM, HAS_KD, HAS_CE, PAIR, CE_POW, SLOTS
                )
        st = _pass_finish(st, ks2, kt2, DIVERGENCE, NORM, HAS_KD, HAS_CE, PAIR, CE_POW)
        if EDGE:
            st = _pass_step(
                st, x_e, t_e, edge_mask, mu, ks2, kt2, DIVERGENCE, NORM, HAS_KD, HAS_CE, PAIR, CE_POW, 1
            )
        m_s, d_s, d_1, x_sum, m_1, d_t, e, c_sum, c_q, c_p, f = st
        l2d_s = tl.log2(d_s)
        l2d_1 = tl.log2(d_1)
        if PAIR:
            m_t = m_1
            l2d_t = tl.log2(d_t)
            if DIVERGENCE == FORWARD_KL:
                kd = e / d_t - l2d_t + l2d_s
            if DIVERGENCE == REVERSE_KL:
                kd = e / d_s - l2d_s + l2d_t
                qh_sum = kd
            if NORM != NO_NORM:
                if DIVERGENCE == FORWARD_KL:
                    w_norm, g_mean = _norm_terms(r_s, kappa, n, qh_sum, c_q / d_s - c_p / d_t, c_q / d_s,
                                                 tl.zeros_like(c_q), c_sum, beta, DIVERGENCE)  # fmt: skip
                if DIVERGENCE == REVERSE_KL:
                    qhc = (f - (l2d_s - l2d_t) * c_q) / d_s
                    w_norm, g_mean = _norm_terms(r_s, kappa, n, qh_sum, qhc, c_q / d_s, d_s / d_s, c_sum, beta,
                                                 DIVERGENCE)  # fmt: skip
        if HAS_KD and ENSEMBLE:  # each member's log-sum-exp
            member_body, member_edge = t_body, t_edge
            for member in range(n_teachers):
                k_m = _pick(kt2, member, kk)
                mm, dm = lse_empty(ROWS, SLOTS)
                if ONE_BLOCK:
                    t_m = _logits(member_body + cols, body_mask, cap, SOFTCAP)
                    mm, dm = lse_step(mm, dm, t_m, k_m, SLOTS)
                else:
                    for start in range(0, n_cols, BLOCK):
                        mask = ok & (start + cols < n_body)
                        t_m = _logits(member_body + start + cols, mask, cap, SOFTCAP)
                        mm, dm = lse_step(mm, dm, t_m, k_m, SLOTS)
                mm, dm = lse_finish(mm, dm, k_m)
                if EDGE:
                    t_me = _logits(member_edge, edge_mask, cap, SOFTCAP)
                    mm, dm = lse_step(mm, dm, t_me, k_m, 1)
                member_body += stride_tk
                member_edge += stride_tk
                m_t = tl.where(kk[None, :] == member, mm, m_t)
                l2d_t = tl.where(kk[None, :] == member, tl.log2(dm), l2d_t)

        # Pass 3 (every divergence but forward and reverse KL; an ensemble with reverse_kl or logit_norm):
        # the row sums that need the log-sum-exps.
        if HAS_KD and (ROW_SUMS or (ENSEMBLE and (DIVERGENCE != FORWARD_KL or NORM != NO_NORM))):
            zero = tl.zeros([ROWS, SLOTS], tl.float32)
            sums = (zero, zero, zero, zero, zero, zero, zero, zero, zero)
            if ONE_BLOCK:
                l2p = _teacher_log2_prob(t_b, t_body + cols, body_mask, kt2, m_t, l2d_t, kk, n_teachers, stride_tk,
                                         cap, ENSEMBLE, SOFTCAP)  # fmt: skip
                sums = _terms(sums, x_b, l2p, body_mask, cols == y_body, m_s, ks2, l2d_s, mu, beta, ab_a, ab_b,
                              DIVERGENCE, NORM, SLOTS)  # fmt: skip
            else:
                for start in range(0, n_cols, BLOCK):
                    mask = ok & (start + cols < n_body)
                    x = _logits(x_body + start + cols, mask, cap, SOFTCAP)
                    t = t_b
                    if PAIR:
                        t = _logits(t_body + start + cols, mask, cap, SOFTCAP)
                    l2p = _teacher_log2_prob(t, t_body + start + cols, mask, kt2, m_t, l2d_t, kk, n_teachers,
                                             stride_tk, cap, ENSEMBLE, SOFTCAP)  # fmt: skip
                    sums = _terms(sums, x, l2p, mask, cols == y_body - start, m_s, ks2, l2d_s, mu, beta, ab_a,
                                  ab_b, DIVERGENCE, NORM, SLOTS)  # fmt: skip
            sums = _row_sums(sums)
            if EDGE:
                l2p_e = _teacher_log2_prob(
                    t_e, t_edge, edge_mask, kt2, m_t, l2d_t, kk, n_teachers, stride_tk, cap, ENSEMBLE, SOFTCAP
                )
                sums = _terms(sums, x_e, l2p_e, edge_mask, edge == y, m_s, ks2, l2d_s, mu, beta, ab_a, ab_b,
                              DIVERGENCE, NORM, 1)  # fmt: skip
            kd, qh_sum, dc_sum, qc_sum, d_sum, c_sum, l2p_y, l2q_y, c_y = sums
            if DIVERGENCE == DKD:  # a target outside [0, V) (unchecked): a NaN row, as in the reference
                big_a, big_b = qh_sum, d_sum
                kd, qh_sum, w_a, w_b = dkd_row(l2p_y, l2q_y, big_a, big_b, kd, ab_a, ab_b)
                in_range = (y >= 0) & (y < n_cols)
                kd = tl.where(in_range, kd, float("nan"))
                qh_sum = tl.where(in_range, qh_sum, float("nan"))
                if NORM != NO_NORM:
                    dc_sum, d_sum = _dkd_norm_sums(qh_sum, w_a, w_b, l2q_y, c_y, big_a, big_b, dc_sum, qc_sum)
            if NORM != NO_NORM:
                w_norm, g_mean = _norm_terms(
                    r_s, kappa, n, qh_sum, dc_sum, qc_sum, d_sum, c_sum, beta, DIVERGENCE
                )
        if HAS_CE:
            ce = ce_loss(safe_max(m_s), l2d_1 * LN2, x_y[:, None], x_sum, ls_eps, n_cols)
        if PHASE == PHASE_STATS:
            stats = STATS + rows64[:, None] * STATS_WIDTH
            tl.store(stats + 0, m_s, mask=ok)
            tl.store(stats + 1, k_s, mask=ok)
            tl.store(stats + 2, l2d_s, mask=ok)
            tl.store(stats + 3, l2d_1, mask=ok)
            tl.store(stats + 4, _pick(m_t, 0, kk), mask=ok)
            tl.store(stats + 5, _pick(kt2, 0, kk), mask=ok)
            tl.store(stats + 6, _pick(l2d_t, 0, kk), mask=ok)
            tl.store(stats + 7, qh_sum, mask=ok)
            tl.store(stats + 8, mu, mask=ok)
            tl.store(stats + 9, w_norm, mask=ok)
            tl.store(stats + 10, g_mean, mask=ok)
            tl.store(stats + 11, w_a, mask=ok)
            tl.store(stats + 12, w_b, mask=ok)
    else:
        stats = STATS + rows64[:, None] * STATS_WIDTH
        m_s = tl.load(stats + 0, mask=ok, other=0.0)
        k_s = tl.load(stats + 1, mask=ok, other=0.0)
        l2d_s = tl.load(stats + 2, mask=ok, other=0.0)
        l2d_1 = tl.load(stats + 3, mask=ok, other=0.0)
        m_t = tl.load(stats + 4 + kk[None, :] * 0, mask=ok, other=0.0)
        kt2 = tl.load(stats + 5 + kk[None, :] * 0, mask=ok, other=0.0)
        l2d_t = tl.load(stats + 6 + kk[None, :] * 0, mask=ok, other=0.0)
        qh_sum = tl.load(stats + 7, mask=ok, other=0.0)
        mu = tl.load(stats + 8, mask=ok, other=0.0)
        w_norm = tl.load(stats + 9, mask=ok, other=0.0)
        g_mean = tl.load(stats + 10, mask=ok, other=0.0)
        w_a = tl.load(stats + 11, mask=ok, other=0.0)
        w_b = tl.load(stats + 12, mask=ok, other=0.0)
        go = tl.load(GO + rows64 * stride_go, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        grad_scale = scale * go

    # Last pass: the gradient (and the loss terms not known yet: an ensemble's forward KL).
    if PHASE != PHASE_STATS and (
        NEED_GRAD or (HAS_KD and ENSEMBLE and DIVERGENCE == FORWARD_KL and NORM == NO_NORM)
    ):
        kd_scale = tl.where(valid, kd_weight * grad_scale, 0.0)
        ce_scale = tl.where(valid, ce_weight * grad_scale, 0.0)
        inv_d_s = tl.exp2(-l2d_s)  # once per row: the pass multiplies
        inv_d_1 = tl.exp2(-l2d_1)
        kd_acc = tl.zeros([ROWS, SLOTS], tl.float32)
        if ONE_BLOCK:
            l2p = _teacher_log2_prob(t_b, t_body + cols, body_mask, kt2, m_t, l2d_t, kk, n_teachers, stride_tk,
                                     cap, ENSEMBLE, SOFTCAP)  # fmt: skip
            grad, terms = _grad(x_b, l2p, cols == y_body, m_s, k_s, l2d_s, inv_d_s, inv_d_1, qh_sum, w_a, w_b, mu,
                                w_norm, g_mean, kd_scale, ce_scale, beta, ab_a, ab_b, ls_eps, n_cols, cap, DIVERGENCE,
                                NORM, HAS_KD, HAS_CE, CE_POW, SOFTCAP)  # fmt: skip
            kd_acc += slot_sum(tl.where(body_mask, terms, 0.0), SLOTS)
            if NEED_GRAD:
                tl.store(g_body + cols, tl.where(valid, grad, 0.0).to(G.dtype.element_ty), mask=body_mask)
        else:
            for start in range(0, n_cols, BLOCK):
                mask = ok & (start + cols < n_body)
                x = _logits(x_body + start + cols, mask, cap, SOFTCAP)
                t = t_b
                if PAIR:
                    t = _logits(t_body + start + cols, mask, cap, SOFTCAP)
                l2p = _teacher_log2_prob(t, t_body + start + cols, mask, kt2, m_t, l2d_t, kk, n_teachers, stride_tk,
                                         cap, ENSEMBLE, SOFTCAP)  # fmt: skip
                grad, terms = _grad(x, l2p, cols == y_body - start, m_s, k_s, l2d_s, inv_d_s, inv_d_1, qh_sum, w_a,
                                    w_b, mu, w_norm, g_mean, kd_scale, ce_scale, beta, ab_a, ab_b, ls_eps, n_cols,
                                    cap, DIVERGENCE, NORM, HAS_KD, HAS_CE, CE_POW, SOFTCAP)  # fmt: skip
                kd_acc += slot_sum(tl.where(mask, terms, 0.0), SLOTS)
                if NEED_GRAD:
                    tl.store(
                        g_body + start + cols, tl.where(valid, grad, 0.0).to(G.dtype.element_ty), mask=mask
                    )
        kd_row = tl.sum(kd_acc, 1, keep_dims=True)
        if EDGE:
            l2p_e = _teacher_log2_prob(
                t_e, t_edge, edge_mask, kt2, m_t, l2d_t, kk, n_teachers, stride_tk, cap, ENSEMBLE, SOFTCAP
            )
            grad, terms = _grad(x_e, l2p_e, edge == y, m_s, k_s, l2d_s, inv_d_s, inv_d_1, qh_sum, w_a, w_b, mu,
                                w_norm, g_mean, kd_scale, ce_scale, beta, ab_a, ab_b, ls_eps, n_cols, cap, DIVERGENCE,
                                NORM, HAS_KD, HAS_CE, CE_POW, SOFTCAP)  # fmt: skip
            kd_row += tl.sum(tl.where(edge_mask, terms, 0.0), 1, keep_dims=True)
            if NEED_GRAD:
                tl.store(
                    G + rows64[:, None] * stride_g + edge,
                    tl.where(valid, grad, 0.0).to(G.dtype.element_ty),
                    mask=edge_mask,
                )
        if HAS_KD and ENSEMBLE and DIVERGENCE == FORWARD_KL and NORM == NO_NORM:
            kd = kd_row

    if PHASE != PHASE_GRAD:
        store_row_loss(LOSS, PARTS, rows, n_rows, ok, valid, kd, ce, kd_weight, ce_weight, alpha, scale, inv_t, y,
                       n_cols, HAS_KD, HAS_CE, RETURN_PARTS, T_SQUARED)  # fmt: skip


@triton.jit
def scale_grad_kernel(
    G,  # (N, V) gradient, scaled in place
    GO,  # dL/dloss: one value (stride_go 0) or one per row
    n_cols,
    stride_g,
    stride_go,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ALIGN: tl.constexpr,
    EDGE: tl.constexpr,
):
    """G[row] *= GO[row], skipped (no memory traffic) where GO[row] is 1. Grid (rows, column blocks of
    the aligned body); the first block also scales the row's edge."""
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(GO + row * stride_go).to(tl.float32)
    if go != 1.0:
        rows = tl.full([1], 0, tl.int64) + row
        start, head, n_body = row_body(rows, stride_g, n_cols, VEC, ALIGN)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = cols < n_body
        g = tl.load(G + start + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(G + start + cols, (g * go).to(G.dtype.element_ty), mask=mask)
        if EDGE:  # noqa: SIM102 (a constexpr: the edge's code only where rows have an edge)
            if tl.program_id(1) == 0:
                edge, edge_mask = row_edge(head, n_body, n_cols, rows >= 0, VEC)
                ptr = G + row * stride_g + edge
                g_e = tl.load(ptr, mask=edge_mask, other=0.0).to(tl.float32)
                tl.store(ptr, (g_e * go).to(G.dtype.element_ty), mask=edge_mask)


@functools.cache
def launch_config(n_cols: int, vec: int) -> tuple[int, int, bool, int, int]:
    """(rows per program, BLOCK, ONE_BLOCK, SLOTS, num_warps) for rows of ``n_cols`` columns read in
    vectors of ``vec`` entries."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ONE_BLOCK:
        block = LOOP_WARPS * 32 * vec * LOOP_VECTORS
        return 1, block, False, block // vec, LOOP_WARPS
    rows = min(max(1, 1024 // block), 32)
    tile = rows * block
    return rows, block, True, 1, 4 if tile <= 1024 else 8 if tile <= 2048 else 16


def ce_power(temperature, logit_norm: str | None, has_kd: bool, has_ce: bool) -> int:
    """The kernel's CE_POW: T where the temperature is one number T, an integer in [1, 8], with KD and CE
    both in the loss and no ``logit_norm`` (the student's exps at T are e^((x - max x) / T), and CE's
    e^(x - max x) their T-th powers); else 0 (CE takes its own exps: a per-row temperature tensor, any
    other T, or normalized logits, whose scale is not 1 / T). csrc/cpu/common.h's ce_power, the same rule."""
    if not (has_kd and has_ce) or logit_norm is not None or not isinstance(temperature, int | float):
        return 0
    power = round(temperature)
    return power if power == temperature and 1 <= power <= 8 else 0


def loop_max_registers(n_teachers: int, logit_norm: str | None, edge: bool, divergence: str) -> int:
    """The register budget (``maxnreg``) of the column loop's launch (``edge``: the kernel's EDGE)."""
    unbudgeted = n_teachers > 1 and ((logit_norm is not None and edge) or divergence == "dkd")
    return LOOP_MAX_REGISTERS_ENSEMBLE_NORM_EDGE if unbudgeted else LOOP_MAX_REGISTERS
