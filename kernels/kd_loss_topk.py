"""Triton kernel for the distillation loss from a sparse teacher, given at k entries per row (offline
top-k log-probabilities or logits): the row's loss and the gradient wrt the student logits in one kernel.

For a row with student logits x (V), the teacher's indices I and values v (k each), target y:

    soft-capped     x <- cap tanh(x / cap)   (``softcap``: the student's logits only, CE included; the
                    teacher's stored values are log-probabilities, not logits, and are not capped)
    student         u = x / T,  q_j = e^(u_j) / sum_l e^(u_l)       q_R = sum_{l not in I} q_l   (the bucket R)
    teacher         a_j = v_j / T_t over I, and with tail="bucket" a_R = ln(1 - sum_I e^(v_j)) / T_t
                    log p = a - logsumexp(a) over the k (+ 1) classes; p_R = 0 without the bucket
    loss            alpha c D(p, q) + (1 - alpha) CE, D over the k + 1 classes I and R (as ``fastkd.kd_loss``)

D is any divergence of ``kd_math.divergence_tile`` (forward and reverse KL, JSD, skew KL, skew reverse
KL, TVD, the alpha-beta divergence and its two limits; ``kernels/kd_loss.py``'s module doc states each),
taken over the k + 1 classes c with their per-class terms D_c and g_c = dD/d(log q_c). Since
log q_c = u_c - lse(u) for c in I and log q_R = lse_{l not in I}(u_l) - lse(u),

    d(log q_c)/du_l = [l = c] - q_l,   d(log q_R)/du_l = [l not in I] q_l / q_R - q_l,

one formula gives the gradient of every divergence, with G = sum_c g_c over the k + 1 classes:

    l in I       dD/du_l = g_l - q_l G                   (``kd_math.divergence_grad``)
    l not in I   dD/du_l = g_R q_l / q_R - q_l G = e_l (g_R / r - G / d)

with e_l = e^(u_l - max u), d = sum_l e_l and r = sum_{l not in I} e_l (so q_l / q_R = e_l / r <= 1,
formed per entry: no ratio overflows when the student's tail is tiny). Forward KL is g = -p, G = -1;
reverse KL and JSD carry g = q h in bits (times ``kd_math.grad_factor``). The columns outside I thus take
one formula with two row constants, written by a dense pass over every column; the k columns of I are
then rewritten from a gather, after a barrier (the two writes meet at I, the later wins). r is summed
over the columns outside I (not taken as d - sum_I e_l, which cancels to 0 in float32 when the
student's tail is below ~1e-7 of its mass): the launcher marks I in a bitmap (N, ceil((V + VEC) / 32))
of int32 words, where column j of a row is bit j + s, s = (the row's start) mod VEC, so that the VEC
entries one thread reads as a vector of the aligned body (``reductions.row_body``) lie in one word: one
32-bit load per 16-byte vector of the row. With softcap the gradient wrt the capped logits is times
1 - (x' / cap)^2. ``return_parts`` writes each row's parts c D and CE (each whatever alpha) beside it.

**Passes** over the student row (an aligned body read in 16-byte vectors, then an edge of at most
2 VEC - 2 entries; a row up to ``kd_loss.MAX_ONE_BLOCK`` wide is read once and held in registers,
wider ones in column blocks with per-slot running values, as in ``kernels/kd_loss.py``):

    1. max, sum-exps at T (d) and at 1 (CE), over the bucket (r: with the bitmap, when the bucket or a
       divergence other than forward KL needs q_R), sum x (label smoothing); 2 exps per entry, 1 with
       CE_POW (below)
    2. the gradient outside I (2 exps per entry: e at T and CE's at 1; 1 with CE_POW)

and over the k entries (one tile held in registers when k <= ``MAX_K_BLOCK``, else three loops): the
teacher's normalizer; the loss terms and G (gathering x at I); the gradient at I. In bytes per entry for
a bf16 row wider than one block: 2 + 2 + 2 (write) = 6, plus 1/8 for the bitmap when q_R is summed;
a row held in registers 4 (+ 1/8). With ``inplace_grad`` (the gradient written over x) and k above
``MAX_K_BLOCK`` the launcher gathers x at I first (``XT``), as the dense pass overwrites it.
Indices must be distinct within a row; one outside [0, V) makes its row NaN.

**Exps** (``kernels/kd_loss.py``'s module doc, "Exps", states the rule and its error). With m the
student's row max, e_l = 2^((x_l - m) ks2), ks2 = log2(e) / T, is its exp at T, and CE's exp at 1 is
e^(x_l - m) = e_l^T. Where T is one number and an integer P in [1, 8] with KD and CE in the loss
(``kd_loss.ce_power``, the same rule as the dense kernel's: the kernel's CE_POW), CE takes no exp of its
own: d_1 = sum_l e_l^P (``reductions.int_power``: at most 4 multiplies), rescaled as the running max grows
by rescale^P, rescale = 2^((m_old - m_new) ks2) being d's; CE's softmax in the gradient is e_l^P / d_1
(``kd_math.ce_grad_softmax``, 1 / d_1 once per row; log2 d_1 still gives CE's loss). At I one exp2 an
entry, e_l, gives q_l = e_l / d and CE's e_l^P alike. A -inf entry has e_l = 0 and 0^P = 0; NaN stays NaN.
CE_POW = 0 (a per-row temperature tensor, any other T, no KD or no CE term) keeps CE's own exp2 at 1.
MUFU.EX2 per entry of the student row: without CE_POW 2 + 2 per slot (pass 1: e, CE's, and their
rescales) and 2 (pass 2); with CE_POW 1 + 1 per slot and 1: forward KL + CE at T = 4 takes 2 + 1 / VEC
where CE's own exps took 4 + 2 / VEC (a slot is VEC = 16 / element size entries; one block: 1 slot a row),
plus the k entries' few (the teacher's normalizer, the terms and the gradient at I).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.kd_loss import _logits
from fastkd.kernels.kd_loss import launch_config as dense_launch_config
from fastkd.kernels.kd_math import (
    FORWARD_KL,
    ce_grad,
    ce_grad_softmax,
    ce_loss,
    divergence_grad,
    divergence_terms,
    divergence_tile,
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
    per_entry,
    row_body,
    row_edge,
    row_inv_temperature,
    safe_max,
    slot_max,
    slot_total,
    slots,
)

MAX_K_BLOCK = 1024  # teacher entries per step of the loops over the k entries (and the most held at once)
BITS_PER_WORD = 32  # of the membership bitmap
WORD = tl.constexpr(BITS_PER_WORD)


@triton.jit
def _in_top(BITS, bits_row, first, live, GROUP: tl.constexpr):
    """Whether each entry of a tile is one of the row's k entries: [ROWS, n GROUP] from the bit positions
    ``first`` ([ROWS, n]) of n groups of GROUP consecutive entries, each group within one word of the
    rows' bitmaps (at offsets ``bits_row``): one load a group, where ``live``."""
    word = tl.load(BITS + bits_row + first // WORD, mask=live, other=0)
    if GROUP == 1:
        top = ((word >> (first % WORD)) & 1) != 0
    else:
        shift = (first % WORD)[:, :, None] + tl.arange(0, GROUP)[None, None, :]
        top3 = ((word[:, :, None] >> shift) & 1) != 0
        top = tl.reshape(top3, [first.shape[0], first.shape[1] * GROUP])
    return top


@triton.jit
def _stats_empty(ROWS: tl.constexpr, SLOTS: tl.constexpr):
    """The running (max, d, d_1, r, sum x) of slots that have seen nothing."""
    zero = tl.zeros([ROWS, SLOTS], tl.float32)
    return tl.full([ROWS, SLOTS], float("-inf"), tl.float32), zero, zero, zero, zero


@triton.jit
def _stats_step(st, x, top, mask, ks2, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, NEED_REST: tl.constexpr,
                CE_POW: tl.constexpr, SLOTS: tl.constexpr):  # fmt: skip
    """The running values ``st`` ([ROWS, SLOTS]) with the tile x added: the max, d = sum 2^((x - max) k)
    at the rows' scale ks2 ([ROWS, 1], log2 e / T), r the same over the entries not in ``top``, d_1 at
    T = 1 and sum x; one exp2 per entry at T and (CE_POW = 0) one at 1, one per slot each to rescale.
    With CE_POW > 0, d_1 sums the CE_POW-th powers of the exps at T and rescales by their rescale's
    (module doc, "Exps")."""
    m, d, d_1, r, x_sum = st
    x3 = slots(x, SLOTS)
    m_new = tl.maximum(m, slot_max(x3, SLOTS))
    sub = safe_max(m_new)
    x_rel = x3 - per_entry(sub, SLOTS)
    if HAS_KD:
        rescale = tl.exp2((m - sub) * ks2)
        e = tl.exp2(x_rel * per_entry(ks2, SLOTS))
        d = d * rescale + slot_total(e, SLOTS)
        if NEED_REST:
            r = r * rescale + slot_total(tl.where(slots(top, SLOTS), 0.0, e), SLOTS)
        if HAS_CE and CE_POW > 0:
            d_1 = d_1 * int_power(rescale, CE_POW) + slot_total(int_power(e, CE_POW), SLOTS)
    if HAS_CE:
        if CE_POW == 0:
            d_1 = d_1 * tl.exp2((m - sub) * LOG2E) + slot_total(tl.exp2(x_rel * LOG2E), SLOTS)
        x_sum += slot_total(tl.where(slots(mask, SLOTS), x3, 0.0), SLOTS)
    return m_new, d, d_1, r, x_sum


@triton.jit
def _stats_finish(st, ks2, CE_POW: tl.constexpr):
    """The rows' values from their slots': [ROWS, SLOTS] -> [ROWS, 1]."""
    m, d, d_1, r, x_sum = st
    m_row = tl.max(m, 1, keep_dims=True)
    sub = safe_max(m_row)
    rescale = tl.exp2((m - sub) * ks2)
    if CE_POW > 0:
        rescale_1 = int_power(rescale, CE_POW)
    else:
        rescale_1 = tl.exp2((m - sub) * LOG2E)
    return (m_row, tl.sum(d * rescale, 1, keep_dims=True), tl.sum(d_1 * rescale_1, 1, keep_dims=True),
            tl.sum(r * rescale, 1, keep_dims=True), tl.sum(x_sum, 1, keep_dims=True))  # fmt: skip


@triton.jit
def _k_block(IDX, VAL, XT, x_row, rows64, stride_idx, stride_val, stride_xt, kstart, kk, k, valid, n_cols, cap,
             SOFTCAP: tl.constexpr):  # fmt: skip
    """One step of k entries ([ROWS, K_BLOCK]): (indices, stored values (-inf past k), lanes in use,
    index in [0, V), the student's (capped) logits there, gathered from its row or read from XT)."""
    kmask = valid & (kstart + kk < k)
    idx = tl.load(IDX + rows64[:, None] * stride_idx + kstart + kk, mask=kmask, other=0).to(tl.int64)
    v = tl.load(VAL + rows64[:, None] * stride_val + kstart + kk, mask=kmask, other=float("-inf")).to(tl.float32)
    ok = (idx >= 0) & (idx < n_cols)
    if XT is not None:
        x_top = _logits(XT + rows64[:, None] * stride_xt + kstart + kk, kmask & ok, cap, SOFTCAP)
    else:
        x_top = _logits(x_row + idx, kmask & ok, cap, SOFTCAP)
    return idx, v, kmask, ok, x_top


@triton.jit
def _teacher_step(st, v, kmask, ok, inv_tt, BUCKET: tl.constexpr):
    """The running (max, sum-exp) of a = v / T_t, sum e^v (the bucket's missing mass) and whether an
    index lies outside [0, V), with a step of k entries added."""
    a_max, a_sum, mass, bad = st
    bad = tl.maximum(bad, tl.max((kmask & ~ok).to(tl.int32), 1, keep_dims=True))
    a = v * inv_tt
    a_new = tl.maximum(a_max, tl.max(a, 1, keep_dims=True))
    a_sub = safe_max(a_new)
    a_sum = a_sum * tl.exp(a_max - a_sub) + tl.sum(tl.exp(a - a_sub), 1, keep_dims=True)
    if BUCKET:
        mass += tl.sum(tl.exp(v), 1, keep_dims=True)
    return a_new, a_sum, mass, bad


@triton.jit
def _terms_step(st, x_top, l2p, kmask, m_s, ks2, l2d_s, beta, ab_a, ab_b, DIVERGENCE: tl.constexpr):
    """The running (loss terms in bits, G = sum g) with a step of k entries added."""
    kd, g_sum = st
    _q, _p, terms, _h, g = divergence_tile((x_top - m_s) * ks2 - l2d_s, l2p, beta, ab_a, ab_b, DIVERGENCE)
    return kd + tl.sum(tl.where(kmask, terms, 0.0), 1, keep_dims=True), g_sum + tl.sum(tl.where(kmask, g, 0.0), 1,
                                                                                       keep_dims=True)  # fmt: skip


@triton.jit
def _grad_rest(x, hit, m_s, ks2, l2d_1, inv_d_1, w_q, w_r, r_s, kd_scale, ce_scale, ls_eps, n_cols, cap,
               HAS_KD: tl.constexpr, HAS_CE: tl.constexpr, NEED_REST: tl.constexpr, CE_POW: tl.constexpr,
               SOFTCAP: tl.constexpr):  # fmt: skip
    """dL/dx of a tile by the formula of the columns outside I (module doc): kd_scale (w_q e + w_r e / r)
    with w_q = -f G / d and w_r = f g_R, plus CE's; ``hit`` marks the target. CE's softmax is
    e^CE_POW / d_1 (inv_d_1 = 1 / d_1) where CE_POW > 0, else 2^((x - m) log2 e - log2 d_1)."""
    grad = tl.zeros_like(x)
    if HAS_KD:
        e = tl.exp2((x - m_s) * ks2)
        g = e * w_q
        if NEED_REST:
            g += w_r * (e / tl.where(r_s > 0, r_s, 1.0))
        grad = kd_scale * g
    if HAS_CE:
        if CE_POW > 0:
            grad += ce_scale * ce_grad_softmax(int_power(e, CE_POW) * inv_d_1, hit, ls_eps, n_cols)
        else:
            grad += ce_scale * ce_grad(x, hit, m_s, l2d_1, ls_eps, n_cols)
    return soft_cap_grad(grad, x, cap, SOFTCAP)


@triton.jit
def _grad_top(x_top, l2p, hit, m_s, ks2, l2d_s, inv_d_s, l2d_1, inv_d_1, g_sum, kd_scale, ce_scale, beta, ab_a, ab_b,
              ls_eps, n_cols, cap, DIVERGENCE: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr,
              CE_POW: tl.constexpr, SOFTCAP: tl.constexpr):  # fmt: skip
    """dL/dx at a step of the k entries: kd_scale (g_l - q_l G) (``kd_math.divergence_grad``) plus CE's.
    With CE_POW > 0 one exp2 an entry, e = 2^((x - m) ks2), serves both: q = e / d_s (inv_d_s = 1 / d_s)
    and CE's softmax e^CE_POW / d_1."""
    grad = tl.zeros_like(x_top)
    if HAS_KD:
        u = (x_top - m_s) * ks2
        if CE_POW > 0:
            e = tl.exp2(u)
            q, p, _, h, g = divergence_terms(e * inv_d_s, u - l2d_s, l2p, beta, ab_a, ab_b, DIVERGENCE)
        else:
            q, p, _, h, g = divergence_tile(u - l2d_s, l2p, beta, ab_a, ab_b, DIVERGENCE)
        grad = kd_scale * divergence_grad(q, p, h, g, g_sum, beta, DIVERGENCE)
    if HAS_CE:
        if CE_POW > 0:
            grad += ce_scale * ce_grad_softmax(int_power(e, CE_POW) * inv_d_1, hit, ls_eps, n_cols)
        else:
            grad += ce_scale * ce_grad(x_top, hit, m_s, l2d_1, ls_eps, n_cols)
    return soft_cap_grad(grad, x_top, cap, SOFTCAP)


@triton.jit
def kd_loss_topk_fwd_kernel(
    X,  # (N, V) student logits, unit column stride
    IDX,  # (N, k) int32/int64 teacher indices, unit column stride
    VAL,  # (N, k) teacher log-probabilities or logits, unit column stride
    XT,  # (N, k) the student's logits at IDX, unit column stride, or None (gathered from X)
    BITS,  # (N, ceil((V + VEC) / 32)) int32 bitmap of the indices (module doc), or None (NEED_REST off)
    Y,  # (N,) int32/int64 targets, or None
    LOSS,  # (N,) fp32 row losses, times the reduction's scale
    PARTS,  # (2, N) fp32: each row's KD part c D and CE part, times the scale (RETURN_PARTS), or None
    G,  # (N, V) dL/dx in X's dtype (may be X itself), written when NEED_GRAD
    T,  # (N,) student temperatures, or None for inv_temp
    TT,  # (N,) teacher temperatures, or None for inv_temp_t
    SCALE,  # one fp32: the reduction's scale, or None for the float scale
    inv_temp,
    inv_temp_t,
    scale,
    alpha,
    beta,  # the mixture weight: JSD's beta, the skew divergences' skew
    ab_a,  # the alpha-beta divergence's alpha and beta
    ab_b,
    ls_eps,  # label smoothing
    cap,  # the soft-capping's cap (SOFTCAP)
    ignore_index,
    n_rows,
    n_cols,
    k,
    stride_x,
    stride_idx,
    stride_val,
    stride_xt,
    stride_bits,
    stride_g,
    stride_temp,
    stride_temp_t,
    DIVERGENCE: tl.constexpr,  # kd_math.divergence_code
    BUCKET: tl.constexpr,  # the teacher's missing mass as a class of its own
    NEED_REST: tl.constexpr,  # q_R summed (the bucket, or a divergence other than forward KL)
    HAS_KD: tl.constexpr,  # alpha > 0 or RETURN_PARTS
    HAS_CE: tl.constexpr,  # a target and (alpha < 1 or RETURN_PARTS)
    HAS_TARGET: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    SCALE_GRAD: tl.constexpr,
    T_SQUARED: tl.constexpr,
    HAS_T: tl.constexpr,
    HAS_TT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,  # the row held in registers
    SLOTS: tl.constexpr,  # running values per row: BLOCK / VEC in the column loop, 1 for one block
    VEC: tl.constexpr,  # entries per 16-byte vector
    ALIGN: tl.constexpr,  # reductions.row_body
    EDGE: tl.constexpr,  # some rows have entries outside their aligned body
    K_BLOCK: tl.constexpr,
    ONE_K: tl.constexpr,  # k <= K_BLOCK: the k entries held in registers
    SOFTCAP: tl.constexpr,  # the student's logits capped to cap tanh(z / cap) first
    RETURN_PARTS: tl.constexpr,
    CE_POW: tl.constexpr,  # 0: CE takes its own exps; P: the P-th powers of the student's (T = P, ce_power)
):
    CE_POW_OK: tl.constexpr = CE_POW == 0 or (HAS_KD and HAS_CE and not HAS_T)
    tl.static_assert(CE_POW_OK, "CE_POW > 0 needs KD, CE and one temperature (kd_loss.ce_power)")
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    ok = row_ok[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    kk = tl.arange(0, K_BLOCK)[None, :]
    x_off, head, n_body = row_body(rows64, stride_x, n_cols, VEC, ALIGN)
    g_off, _g_head, _g_n = row_body(rows64, stride_g, n_cols, VEC, ALIGN)  # the same head and body as x's
    x_body, g_body = X + x_off, G + g_off
    x_row = X + rows64[:, None] * stride_x
    body_mask = ok & (cols < n_body)
    edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
    # The bitmap: column j at bit j + (VEC - head) % VEC; the body's first column at bit 0 or VEC.
    bits_row = rows64[:, None] * stride_bits
    base = tl.where(head > 0, VEC, 0)
    GROUP: tl.constexpr = VEC if VEC <= BLOCK else BLOCK  # entries a vector (rows narrower than VEC: ALIGN 0)
    groups = tl.arange(0, BLOCK // GROUP)[None, :] * GROUP  # the first column of each vector of a tile
    inv_t = row_inv_temperature(T, inv_temp, rows, row_ok, stride_temp, HAS_T)
    inv_tt = row_inv_temperature(TT, inv_temp_t, rows, row_ok, stride_temp_t, HAS_TT)[:, None]
    valid, y, x_y, kd_weight, ce_weight, scale, grad_scale = row_setup(
        X, Y, SCALE, scale, alpha, inv_t, ignore_index, rows, row_ok, n_cols, stride_x, HAS_TARGET, HAS_CE,
        T_SQUARED, SCALE_GRAD,
    )  # fmt: skip
    x_y = soft_cap(x_y, cap, SOFTCAP)[:, None]
    inv_t, valid, y, kd_weight, ce_weight = inv_t[:, None], valid[:, None], y[:, None], kd_weight[:, None], ce_weight[:, None]
    ks2 = inv_t * LOG2E

    # Pass 1: the student's max, d (at T), d_1 (at 1), r (outside I), sum x.
    x_b = tl.zeros([ROWS, BLOCK], tl.float32)
    x_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    no_top = cols < 0
    st = _stats_empty(ROWS, SLOTS)
    if ONE_BLOCK:
        x_b = _logits(x_body + cols, body_mask, cap, SOFTCAP)
        top = no_top
        if NEED_REST:
            top = _in_top(BITS, bits_row, base + groups, ok & (groups < n_body), GROUP)
        st = _stats_step(st, x_b, top, body_mask, ks2, HAS_KD, HAS_CE, NEED_REST, CE_POW, SLOTS)
    else:
        for start in range(0, n_cols, BLOCK):
            mask = ok & (start + cols < n_body)
            x = _logits(x_body + start + cols, mask, cap, SOFTCAP)
            top = no_top
            if NEED_REST:
                top = _in_top(BITS, bits_row, base + start + groups, ok & (start + groups < n_body), GROUP)
            st = _stats_step(st, x, top, mask, ks2, HAS_KD, HAS_CE, NEED_REST, CE_POW, SLOTS)
    st = _stats_finish(st, ks2, CE_POW)
    if EDGE:
        x_e = _logits(X + rows64[:, None] * stride_x + edge, edge_mask, cap, SOFTCAP)
        top_e = edge < 0
        if NEED_REST:
            top_e = _in_top(BITS, bits_row, edge + (base - head), edge_mask, 1)
        st = _stats_step(st, x_e, top_e, edge_mask, ks2, HAS_KD, HAS_CE, NEED_REST, CE_POW, 1)
    m_s, d_s, d_1, r_s, x_sum = st
    m_s = safe_max(m_s)
    l2d_s = tl.log2(d_s)
    l2d_1 = tl.log2(d_1)
    inv_d_s = 1.0 / d_s
    inv_d_1 = 1.0 / d_1

    # The k entries: the teacher's normalizer lse_t over I (and the bucket); then the loss terms and G
    # over I and the bucket R.
    kd = tl.zeros([ROWS, 1], tl.float32)
    g_sum = tl.zeros([ROWS, 1], tl.float32)
    lse_t = tl.zeros([ROWS, 1], tl.float32)
    w_q = tl.zeros([ROWS, 1], tl.float32)
    w_r = tl.zeros([ROWS, 1], tl.float32)
    idx = tl.zeros([ROWS, K_BLOCK], tl.int64)
    v = tl.zeros([ROWS, K_BLOCK], tl.float32)
    kmask = kk < 0
    k_ok = kk < 0
    x_top = tl.zeros([ROWS, K_BLOCK], tl.float32)
    if HAS_KD:
        zero = tl.zeros([ROWS, 1], tl.float32)
        tn = (zero + float("-inf"), zero, zero, zero.to(tl.int32))
        if ONE_K:
            idx, v, kmask, k_ok, x_top = _k_block(IDX, VAL, XT, x_row, rows64, stride_idx, stride_val, stride_xt, 0,
                                                  kk, k, valid, n_cols, cap, SOFTCAP)  # fmt: skip
            tn = _teacher_step(tn, v, kmask, k_ok, inv_tt, BUCKET)
        else:
            for kstart in range(0, k, K_BLOCK):
                _i, v_k, kmask_k, ok_k, _x = _k_block(IDX, VAL, XT, x_row, rows64, stride_idx, stride_val, stride_xt,
                                                      kstart, kk, k, valid, n_cols, cap, SOFTCAP)  # fmt: skip
                tn = _teacher_step(tn, v_k, kmask_k, ok_k, inv_tt, BUCKET)
        a_max, a_sum, mass, bad = tn
        lse_t = safe_max(a_max) + tl.log(a_sum)
        log_p_rest = tl.full([ROWS, 1], float("-inf"), tl.float32)
        if BUCKET:  # the missing mass ln(1 - sum e^v), tempered as one more class
            a_rest = tl.log(tl.maximum(1.0 - mass, 0.0)) * inv_tt
            a_top = safe_max(tl.maximum(lse_t, a_rest))
            lse_t = a_top + tl.log(tl.exp(lse_t - a_top) + tl.exp(a_rest - a_top))
            log_p_rest = a_rest - lse_t
        terms = (zero, zero)
        if ONE_K:
            terms = _terms_step(terms, x_top, (v * inv_tt - lse_t) * LOG2E, kmask, m_s, ks2, l2d_s, beta, ab_a, ab_b,
                                DIVERGENCE)  # fmt: skip
        else:
            for kstart in range(0, k, K_BLOCK):
                _i, v_k, kmask_k, _ok, x_k = _k_block(IDX, VAL, XT, x_row, rows64, stride_idx, stride_val, stride_xt,
                                                      kstart, kk, k, valid, n_cols, cap, SOFTCAP)  # fmt: skip
                terms = _terms_step(terms, x_k, (v_k * inv_tt - lse_t) * LOG2E, kmask_k, m_s, ks2, l2d_s, beta, ab_a,
                                    ab_b, DIVERGENCE)  # fmt: skip
        kd, g_sum = terms
        # The bucket R: log2 q_R = log2 r - log2 d (-inf when it holds no student mass or is not summed).
        _q_r, p_r, terms_r, _h_r, g_r = divergence_tile(tl.log2(r_s) - l2d_s, log_p_rest * LOG2E, beta, ab_a, ab_b,
                                                        DIVERGENCE)  # fmt: skip
        kd += terms_r
        g_sum += g_r
        if DIVERGENCE == FORWARD_KL:  # g = -p: G = -1 (exactly), g_R = -p_R
            g_sum = zero - 1.0
            g_r = -p_r
        f = grad_factor(beta, DIVERGENCE)
        w_q = -f * g_sum / d_s
        w_r = tl.where(r_s > 0, f * g_r, 0.0)
        bad_row = bad > 0  # an index outside [0, V): a NaN row
        kd = tl.where(bad_row, float("nan"), kd)
        kd_weight = tl.where(bad_row, float("nan"), kd_weight)

    if NEED_GRAD:
        kd_scale = kd_weight * grad_scale * inv_t
        ce_scale = ce_weight * grad_scale
        # Every column by the formula of those outside I, then (after a barrier) the k columns of I.
        y_body = tl.where((y >= head) & (y < head + n_body), y - head, -1)  # the target in the body
        if ONE_BLOCK:
            grad = _grad_rest(x_b, cols == y_body, m_s, ks2, l2d_1, inv_d_1, w_q, w_r, r_s, kd_scale, ce_scale, ls_eps,
                              n_cols, cap, HAS_KD, HAS_CE, NEED_REST, CE_POW, SOFTCAP)  # fmt: skip
            tl.store(g_body + cols, tl.where(valid, grad, 0.0).to(G.dtype.element_ty), mask=body_mask)
        else:
            for start in range(0, n_cols, BLOCK):
                mask = ok & (start + cols < n_body)
                x = _logits(x_body + start + cols, mask, cap, SOFTCAP)
                grad = _grad_rest(x, cols == y_body - start, m_s, ks2, l2d_1, inv_d_1, w_q, w_r, r_s, kd_scale,
                                  ce_scale, ls_eps, n_cols, cap, HAS_KD, HAS_CE, NEED_REST, CE_POW,
                                  SOFTCAP)  # fmt: skip
                tl.store(g_body + start + cols, tl.where(valid, grad, 0.0).to(G.dtype.element_ty), mask=mask)
        if EDGE:
            grad = _grad_rest(x_e, edge == y, m_s, ks2, l2d_1, inv_d_1, w_q, w_r, r_s, kd_scale, ce_scale, ls_eps,
                              n_cols, cap, HAS_KD, HAS_CE, NEED_REST, CE_POW, SOFTCAP)  # fmt: skip
            tl.store(G + rows64[:, None] * stride_g + edge, tl.where(valid, grad, 0.0).to(G.dtype.element_ty),
                     mask=edge_mask)  # fmt: skip
        if HAS_KD:
            tl.debug_barrier()  # the dense stores at I land before the gather's (and, in place, x_top was read)
            g_row = G + rows64[:, None] * stride_g
            if ONE_K:
                grad = _grad_top(x_top, (v * inv_tt - lse_t) * LOG2E, idx == y, m_s, ks2, l2d_s, inv_d_s, l2d_1,
                                 inv_d_1, g_sum, kd_scale, ce_scale, beta, ab_a, ab_b, ls_eps, n_cols, cap, DIVERGENCE,
                                 HAS_KD, HAS_CE, CE_POW, SOFTCAP)  # fmt: skip
                tl.store(g_row + idx, grad.to(G.dtype.element_ty), mask=kmask & k_ok)
            else:
                for kstart in range(0, k, K_BLOCK):
                    idx_k, v_k, kmask_k, ok_k, x_k = _k_block(IDX, VAL, XT, x_row, rows64, stride_idx, stride_val,
                                                              stride_xt, kstart, kk, k, valid, n_cols, cap,
                                                              SOFTCAP)  # fmt: skip
                    grad = _grad_top(x_k, (v_k * inv_tt - lse_t) * LOG2E, idx_k == y, m_s, ks2, l2d_s, inv_d_s, l2d_1,
                                     inv_d_1, g_sum, kd_scale, ce_scale, beta, ab_a, ab_b, ls_eps, n_cols, cap,
                                     DIVERGENCE, HAS_KD, HAS_CE, CE_POW, SOFTCAP)  # fmt: skip
                    tl.store(g_row + idx_k, grad.to(G.dtype.element_ty), mask=kmask_k & ok_k)

    ce = tl.zeros([ROWS, 1], tl.float32)
    if HAS_CE:
        ce = ce_loss(m_s, l2d_1 * LN2, x_y, x_sum, ls_eps, n_cols)
    store_row_loss(LOSS, PARTS, rows, n_rows, ok, valid, kd, ce, kd_weight, ce_weight, alpha, scale, inv_t, y, n_cols,
                   HAS_KD, HAS_CE, RETURN_PARTS, T_SQUARED)  # fmt: skip


def launch_config(n_cols: int, k: int, vec: int) -> tuple[int, int, bool, int, int, int]:
    """(rows per program, BLOCK, ONE_BLOCK, SLOTS, K_BLOCK, num_warps) for rows of ``n_cols`` columns read
    in vectors of ``vec`` entries and k entries: the dense kernel's column blocks
    (``kd_loss.launch_config``), with at most 1024 k entries a program (fewer rows when k is large)."""
    rows, block, one_block, n_slots, num_warps = dense_launch_config(n_cols, vec)
    k_block = min(triton.next_power_of_2(k), MAX_K_BLOCK)
    if one_block:
        rows = min(rows, max(1, MAX_K_BLOCK // k_block))
        tile = rows * max(block, k_block)
        num_warps = 4 if tile <= 1024 else 8 if tile <= 2048 else 16
    return rows, block, one_block, n_slots, k_block, num_warps
