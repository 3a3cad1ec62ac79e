"""Triton kernel for student-teacher fidelity: top-1 agreement and predictive KL in one pass.

For a row with student logits s, teacher logits t (C each) and u = 1/T (math in fp32):

    q = softmax(s u),  p = softmax(t u)        agree = [argmax s = argmax t]   (first index of each max)
    KL(p || q) = sum_j p_j (log p_j - log q_j) = E / d_t - ln d_t + ln d_s,
    E = sum_j w_j ((t_j - m_t) u - (s_j - m_s) u),  w_j = e^((t_j - m_t) u),  d_t = sum_j w_j,
    d_s = sum_j e^((s_j - m_s) u)

with m_s, m_t the running row maxima: when they grow, E is shifted and rescaled with d_t, so one online
pass over both rows gives the KL. An ensemble teacher, p = mean_k softmax(t_k u), first needs each
member's log-sum-exp (one extra pass over the teacher), then one pass computes log p_j per entry and
accumulates sum_j p_j log p_j and sum_j p_j (s_j - m_s) u online in m_s (agreement: argmax of p).

Each program walks a strided set of row tiles and writes its partial sums (agreements as int32, KL in
float64), which the launcher adds. Rows are read in 16-byte vectors at any row stride: an aligned body,
then an edge of at most 2 VEC - 2 entries (``reductions.row_body``, ``row_edge``), the argmax merged by
column index (``online_argmax_at``: the head's columns come before the body's).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.reductions import (
    LN2,
    LOG2E,
    lse_empty,
    lse_finish,
    lse_step,
    online_argmax_at,
    row_body,
    row_edge,
    row_inv_temperature,
    safe_max,
)


@triton.jit
def _single_step(st, s, t, idx, u):
    """The running (m_s, m_t, d_s, d_t, E, argmax s, argmax t) of a single teacher's rows with the tiles
    s, t (columns ``idx``) added (see the module doc)."""
    m_s, m_t, d_s, d_t, e, arg_s, arg_t = st
    m_s_old, old_s, old_t = m_s, safe_max(m_s), safe_max(m_t)
    m_s, arg_s = online_argmax_at(s, m_s, arg_s, idx)
    m_t_new, arg_t = online_argmax_at(t, m_t, arg_t, idx)
    sub_s, sub_t = safe_max(m_s), safe_max(m_t_new)
    r_t = tl.exp((m_t - sub_t) * u)
    # Shift E's old terms to the new maxima (d_t = 0 while the teacher row has been all -inf); terms
    # whose weight underflows drop out, as in float64 (even an infinite one: where p = 0, KL adds 0).
    e = tl.where(r_t > 0, r_t * (e + ((old_t - sub_t) - (old_s - sub_s)) * u * d_t), 0.0)
    w = tl.exp((t - sub_t[:, None]) * u[:, None])
    term = ((t - sub_t[:, None]) - (s - sub_s[:, None])) * u[:, None]
    e += tl.sum(tl.where(w > 0, w * term, 0.0), 1)
    d_t = d_t * r_t + tl.sum(w, 1)
    d_s = d_s * tl.exp((m_s_old - sub_s) * u) + tl.sum(tl.exp((s - sub_s[:, None]) * u[:, None]), 1)
    return m_s, m_t_new, d_s, d_t, e, arg_s, arg_t


@triton.jit
def _kl_single(s_body, t_body, s_row, t_row, row_ok, n_body, head, u, cols, n_cols, ROWS: tl.constexpr,
               BLOCK: tl.constexpr, VEC: tl.constexpr, EDGE: tl.constexpr):  # fmt: skip
    """(argmax s, argmax t, KL(p || q)) of rows read once, for a single teacher (see the module doc):
    their aligned bodies in column blocks, then their edges."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    zero = tl.zeros([ROWS], tl.float32)
    arg = tl.zeros([ROWS], tl.int32)
    st = (m, m, zero, zero, zero, arg, arg)
    for start in range(0, n_cols, BLOCK):
        mask = row_ok[:, None] & (start + cols < n_body)
        s = tl.load(s_body + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_body + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        st = _single_step(st, s, t, (head + start + cols).to(tl.int32), u)
    if EDGE:  # the edge's columns formed after the loop: they hold no registers through it
        edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
        s_e = tl.load(s_row + edge, mask=edge_mask, other=float("-inf")).to(tl.float32)
        t_e = tl.load(t_row + edge, mask=edge_mask, other=float("-inf")).to(tl.float32)
        st = _single_step(st, s_e, t_e, edge.to(tl.int32), u)
    _m_s, _m_t, d_s, d_t, e, arg_s, arg_t = st
    return arg_s, arg_t, e / d_t - tl.log(d_t) + tl.log(d_s)


@triton.jit
def _member_p(member_ptr, mask, m_k, lse_k, u, n_teachers, stride_tk, members):
    """p = mean_k softmax(t_k u) of a tile of an ensemble (member k at member_ptr + k stride_tk), given
    the members' maxima and log-sum-exps ([ROWS, K_BLOCK])."""
    p = tl.zeros(mask.shape, tl.float32)
    for k in range(n_teachers):
        t = tl.load(member_ptr, mask=mask, other=float("-inf")).to(tl.float32)
        member_ptr += stride_tk  # 64-bit pointers, no int32 product k * stride_tk
        pick = members[None, :] == k
        m = tl.sum(tl.where(pick, m_k, 0.0), 1)
        ln_d = tl.sum(tl.where(pick, lse_k, 0.0), 1)
        p += tl.exp((t - m[:, None]) * u[:, None] - ln_d[:, None])
    return p / n_teachers


@triton.jit
def _ensemble_step(st, s, p, mask, idx, u):
    """The running (m_s, d_s, a, b, mass, argmax s, max p, argmax p) of the module doc with the tiles s
    and p (columns ``idx``) added."""
    m_s, d_s, a, b, mass, arg_s, m_p, arg_p = st
    m_p, arg_p = online_argmax_at(tl.where(mask, p, -1.0), m_p, arg_p, idx)
    m_s_old, old_s = m_s, safe_max(m_s)
    m_s, arg_s = online_argmax_at(s, m_s, arg_s, idx)
    sub_s = safe_max(m_s)
    b -= (sub_s - old_s) * u * mass
    live = p > 0
    a += tl.sum(tl.where(live, p * tl.log(tl.where(live, p, 1.0)), 0.0), 1)
    b += tl.sum(tl.where(live, p * (s - sub_s[:, None]) * u[:, None], 0.0), 1)
    mass += tl.sum(p, 1)
    d_s = d_s * tl.exp((m_s_old - sub_s) * u) + tl.sum(tl.exp((s - sub_s[:, None]) * u[:, None]), 1)
    return m_s, d_s, a, b, mass, arg_s, m_p, arg_p


@triton.jit
def _kl_ensemble(
    s_body, t_body, s_row, t_row, row_ok, n_body, head, u, cols, n_cols, n_teachers, stride_tk,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, VEC: tl.constexpr, EDGE: tl.constexpr,
):  # fmt: skip
    """(argmax s, argmax p, KL(p || q)) for p = mean_k softmax(t_k u): a pass for the members'
    log-sum-exps, then one pass over student and teacher (bodies, then edges)."""
    members = tl.arange(0, K_BLOCK)
    m_k = tl.zeros([ROWS, K_BLOCK], tl.float32)
    lse_k = tl.zeros([ROWS, K_BLOCK], tl.float32)
    member_body, member_row = t_body, t_row  # advanced by stride_tk per member: 64-bit pointers
    u2 = u[:, None] * LOG2E
    for k in range(n_teachers):
        m, d = lse_empty(ROWS, 1)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_body)
            t = tl.load(member_body + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m, d = lse_step(m, d, t, u2, 1)
        if EDGE:
            edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
            t_e = tl.load(member_row + edge, mask=edge_mask, other=float("-inf")).to(tl.float32)
            m, d = lse_step(m, d, t_e, u2, 1)
        m, d = lse_finish(m, d, u2)
        m, ln_d = tl.max(m, 1), tl.log2(tl.sum(d, 1)) * LN2
        m_k = tl.where(members[None, :] == k, safe_max(m)[:, None], m_k)
        lse_k = tl.where(members[None, :] == k, ln_d[:, None], lse_k)
        member_body += stride_tk
        member_row += stride_tk
    m_s = tl.full([ROWS], float("-inf"), tl.float32)
    zero = tl.zeros([ROWS], tl.float32)
    arg = tl.zeros([ROWS], tl.int32)
    st = (m_s, zero, zero, zero, zero, arg, tl.full([ROWS], -1.0, tl.float32), arg)
    for start in range(0, n_cols, BLOCK):
        mask = row_ok[:, None] & (start + cols < n_body)
        p = _member_p(t_body + start + cols, mask, m_k, lse_k, u, n_teachers, stride_tk, members)
        s = tl.load(s_body + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        st = _ensemble_step(st, s, p, mask, (head + start + cols).to(tl.int32), u)
    if EDGE:
        edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
        p_e = _member_p(t_row + edge, edge_mask, m_k, lse_k, u, n_teachers, stride_tk, members)
        s_e = tl.load(s_row + edge, mask=edge_mask, other=float("-inf")).to(tl.float32)
        st = _ensemble_step(st, s_e, p_e, edge_mask, edge.to(tl.int32), u)
    _m_s, d_s, a, b, mass, arg_s, _m_p, arg_p = st
    return arg_s, arg_p, a - b + mass * tl.log(d_s)


@triton.jit
def fidelity_kernel(
    S,  # student logits (n_rows, n_cols), unit column stride
    TCH,  # teacher logits (n_teachers, n_rows, n_cols), unit column stride
    T,  # temperatures (one, or one per row at stride_t) when HAS_T
    AGREE,  # int32 (programs,): rows whose top-1 classes agree
    KL,  # fp64 (programs,): sum of the rows' KL(p || q)
    inv_temp,  # 1/T when the temperature is a float
    n_rows,
    n_cols,
    n_teachers,
    stride_s,
    stride_tk,
    stride_tn,
    stride_t,
    HAS_T: tl.constexpr,
    ENSEMBLE: tl.constexpr,
    K_BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    VEC: tl.constexpr,  # entries per 16-byte vector
    ALIGN: tl.constexpr,  # reductions.row_body
    EDGE: tl.constexpr,  # some rows have entries outside their aligned body
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    if ALIGN != 0 and ENSEMBLE:
        stride_tk = tl.multiple_of(stride_tk, VEC)
    agree = tl.zeros([], tl.int32)
    kl = tl.zeros([], tl.float64)  # one fp64 total a program (a tile's rows are summed in fp64 first)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        u = row_inv_temperature(T, inv_temp, rows, row_ok, stride_t, HAS_T)
        s_off, head, n_body = row_body(rows64, stride_s, n_cols, VEC, ALIGN)
        t_off, _t_head, _t_n = row_body(rows64, stride_tn, n_cols, VEC, ALIGN)  # the same head and body
        s_row = S + rows64[:, None] * stride_s
        t_row = TCH + rows64[:, None] * stride_tn
        if ENSEMBLE:
            arg_s, arg_t, row_kl = _kl_ensemble(S + s_off, TCH + t_off, s_row, t_row, row_ok, n_body, head, u, cols,
                                                n_cols, n_teachers, stride_tk, ROWS, BLOCK, K_BLOCK, VEC,
                                                EDGE)  # fmt: skip
        else:
            arg_s, arg_t, row_kl = _kl_single(S + s_off, TCH + t_off, s_row, t_row, row_ok, n_body, head, u, cols,
                                              n_cols, ROWS, BLOCK, VEC, EDGE)  # fmt: skip
        agree += tl.sum(((arg_s == arg_t) & row_ok).to(tl.int32), 0)
        kl += tl.sum(tl.where(row_ok, row_kl, 0.0).to(tl.float64), 0)
    tl.store(AGREE + pid, agree)
    tl.store(KL + pid, kl)
