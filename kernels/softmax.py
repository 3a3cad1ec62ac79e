"""Triton kernels for the tempered softmax and log-softmax over the rows of an (N, V) matrix.

For a row x of width V and temperature T (math in fp32, in base 2 with log2(e) folded into the scale
k = log2(e) / T, and the row max m subtracted *before* scaling so that logits of +-1e4 keep their
precision):

    m = max_j x_j,    d = sum_j 2^((x_j - m) k) = sum_j e^((x_j - m) / T)
    softmax       y_j = 2^((x_j - m) k) / d
    log_softmax   y_j = ((x_j - m) k - log2 d) ln 2

Backward, with g = dL/dy, u = (x - m) / T and p = softmax(u):

    softmax       dL/du_j = p_j (g_j - c),  c = sum_k g_k p_k
    log_softmax   dL/du_j = g_j - p_j c,    c = sum_k g_k
    dL/dx_j = dL/du_j / T
    dL/dT   = -(1/T) sum_j u_j dL/du_j      one value per row, over the j whose logit is not -inf

(A -inf logit is a constant of T. Its log-probability is -inf, so L is infinite unless dL/dy is 0
there; the shift by m only fixes which constant, the same one in ``fastkd.reference``.)

The gradient wrt x alone is computed from the saved output y, as PyTorch's softmax does. When T needs
a gradient, the backward reads the logits instead, with the row stats (m, ln d) saved by the forward,
and recomputes p and log p = (x - m)/T - ln d in fp32: same traffic, and no error from a rounded y.
Writing u_j = log p_j + ln d, and using sum_j p_j = 1 (exact math, so no rounding of sum p enters):

    softmax       dL/dT = -(1/T) (A - c B),             A = sum_j p_j g_j log p_j,  B = sum_j p_j log p_j
    log_softmax   dL/dT = -(1/T) (A - c B - Z ln d),    A = sum_j g_j log p_j,      Z = sum of g_j at -inf x_j

with A and B over the entries whose logit is not -inf.

A row narrower than ``MAX_ONE_BLOCK`` is held in registers and read once per kernel (several rows per
program for small widths); a wider row is read twice. Rows are read and written in 16-byte vectors at
any row stride: an aligned body and a masked edge of at most 2 VEC - 2 entries (``reductions.row_body``,
``row_edge``; ALIGN and EDGE as there), the edge's terms merged after the body's. A row whose logits are all -inf has no
distribution: its outputs and gradients are NaN, as with ``torch.softmax``. So are the rows of a
temperature that is not finite and > 0 (such values reach a kernel only unchecked).
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from fastkd.kernels.reductions import row_body, row_edge, row_inv_temperature, safe_max

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MAX_ONE_BLOCK = 8192  # widest row held in registers by one program
LOOP_BLOCK = 4096  # columns per step when a row is wider


@triton.jit
def _softmax_out(x, m, log2_d, k, LOG: tl.constexpr):
    """softmax (or log_softmax) of the [ROWS, BLOCK] tile x given its rows' max m, log2 d and scale k."""
    z = (x - safe_max(m)[:, None]) * k[:, None] - log2_d[:, None]
    if LOG:
        return z * LN2
    return tl.exp2(z)


@triton.jit
def tempered_softmax_fwd_kernel(
    X,  # (N, V) logits, unit column stride
    Y,  # (N, V) output, in the logits' dtype
    T,  # (N,) temperatures (stride_t apart; 0 for one shared value), or None for the float below
    STATS,  # (N, 2) fp32 row stats (m, ln d), written when STORE_STATS
    inv_temperature,  # 1 / T when T is None
    n_rows,
    n_cols,
    stride_x,  # row strides, in elements
    stride_y,
    stride_t,
    HAS_T: tl.constexpr,
    LOG: tl.constexpr,
    STORE_STATS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    BLOCK: tl.constexpr,  # columns per step (the whole row when ONE_BLOCK)
    ONE_BLOCK: tl.constexpr,
    VEC: tl.constexpr,  # entries per 16-byte vector
    ALIGN: tl.constexpr,  # reductions.row_body
    EDGE: tl.constexpr,  # some rows have entries outside their aligned body
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    k = row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T) * LOG2E
    x_off, head, n_body = row_body(rows64, stride_x, n_cols, VEC, ALIGN)
    y_off, _y_head, _y_n = row_body(rows64, stride_y, n_cols, VEC, ALIGN)  # the same head and body as x's
    x_ptr = X + x_off
    y_ptr = Y + y_off
    ok = row_ok[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
    x_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    if EDGE:
        x_e = tl.load(X + rows64[:, None] * stride_x + edge, mask=edge_mask, other=float("-inf")).to(tl.float32)

    if ONE_BLOCK:
        mask = ok & (cols < n_body)
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 1)
        if EDGE:
            m = tl.maximum(m, tl.max(x_e, 1))
        d = tl.sum(tl.exp2((x - safe_max(m)[:, None]) * k[:, None]), 1)
        if EDGE:
            d += tl.sum(tl.exp2((x_e - safe_max(m)[:, None]) * k[:, None]), 1)
        log2_d = tl.log2(d)
        tl.store(y_ptr + cols, _softmax_out(x, m, log2_d, k, LOG).to(Y.dtype.element_ty), mask=mask)
    else:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        d = tl.zeros([ROWS], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = ok & (start + cols < n_body)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 1))
            m_sub = safe_max(m_new)
            d = d * tl.exp2((m - m_sub) * k) + tl.sum(tl.exp2((x - m_sub[:, None]) * k[:, None]), 1)
            m = m_new
        if EDGE:
            m_new = tl.maximum(m, tl.max(x_e, 1))
            m_sub = safe_max(m_new)
            d = d * tl.exp2((m - m_sub) * k) + tl.sum(tl.exp2((x_e - m_sub[:, None]) * k[:, None]), 1)
            m = m_new
        log2_d = tl.log2(d)
        for start in range(0, n_cols, BLOCK):
            mask = ok & (start + cols < n_body)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            tl.store(y_ptr + start + cols, _softmax_out(x, m, log2_d, k, LOG).to(Y.dtype.element_ty), mask=mask)
    if EDGE:
        y_e = _softmax_out(x_e, m, log2_d, k, LOG).to(Y.dtype.element_ty)
        tl.store(Y + rows64[:, None] * stride_y + edge, y_e, mask=edge_mask)

    if STORE_STATS:
        tl.store(STATS + rows.to(tl.int64) * 2, m, mask=row_ok)
        tl.store(STATS + rows.to(tl.int64) * 2 + 1, log2_d * LN2, mask=row_ok)


@triton.jit
def _bwd_tile(g, s, m_sub, ln_d, inv_t, LOG: tl.constexpr, NEED_DT: tl.constexpr):
    """p and the per-entry terms of the row sums c, A, B, Z for a [ROWS, BLOCK] tile.

    ``s`` is the saved tile: the logits x when NEED_DT (p recomputed from the row stats), else the
    output y. Returns (p, c, a, b, z) terms; a, b, z are zero unless NEED_DT.
    """
    if NEED_DT:
        live = s > float("-inf")
        log_p = (s - m_sub[:, None]) * inv_t[:, None] - ln_d[:, None]
        p = tl.exp(log_p)
    elif LOG:
        p = tl.exp(s)
    else:
        p = s
    if LOG:
        c = g
    else:
        c = g * p
    a = tl.zeros_like(c)
    b = tl.zeros_like(c)
    z = tl.zeros_like(c)
    if NEED_DT:
        a = tl.where(live, c * log_p, 0.0)
        b = tl.where(live, p * log_p, 0.0)
        if LOG:
            z = tl.where(live, 0.0, g)
    return p, c, a, b, z


@triton.jit
def _bwd_dx(g, p, c, inv_t, LOG: tl.constexpr):
    """dL/dx of a [ROWS, BLOCK] tile, given p and the rows' c."""
    if LOG:
        return (g - p * c[:, None]) * inv_t[:, None]
    return p * (g - c[:, None]) * inv_t[:, None]


@triton.jit
def tempered_softmax_bwd_kernel(
    G,  # (N, V) dL/dy, unit column stride
    S,  # (N, V) saved for backward: the logits x when NEED_DT, else the output y
    DX,  # (N, V) dL/dx, in S's dtype, written when NEED_DX
    T,  # (N,) temperatures, or None
    STATS,  # (N, 2) fp32 row stats (m, ln d) from the forward; read when NEED_DT
    DT,  # (N,) fp32 dL/dT per row, written when NEED_DT
    inv_temperature,
    n_rows,
    n_cols,
    stride_g,
    stride_s,
    stride_dx,
    stride_t,
    HAS_T: tl.constexpr,
    LOG: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
    VEC: tl.constexpr,
    ALIGN: tl.constexpr,
    EDGE: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    inv_t = row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T)
    rows64 = rows.to(tl.int64)
    g_off, head, n_body = row_body(rows64, stride_g, n_cols, VEC, ALIGN)
    s_off, _s_head, _s_n = row_body(rows64, stride_s, n_cols, VEC, ALIGN)  # the same head and body as g's
    g_ptr = G + g_off
    s_ptr = S + s_off
    if NEED_DX:
        dx_off, _dx_head, _dx_n = row_body(rows64, stride_dx, n_cols, VEC, ALIGN)
        dx_ptr = DX + dx_off
    ok = row_ok[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    s_other = 0.0 if (not LOG and not NEED_DT) else float("-inf")  # p = 0 past the row's end
    m_sub = tl.zeros([ROWS], tl.float32)
    ln_d = tl.zeros([ROWS], tl.float32)
    if NEED_DT:
        m_sub = safe_max(tl.load(STATS + rows64 * 2, mask=row_ok, other=0.0))
        ln_d = tl.load(STATS + rows64 * 2 + 1, mask=row_ok, other=0.0)
    edge, edge_mask = row_edge(head, n_body, n_cols, row_ok, VEC)
    g_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    s_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    if EDGE:
        g_e = tl.load(G + rows64[:, None] * stride_g + edge, mask=edge_mask, other=0.0).to(tl.float32)
        s_e = tl.load(S + rows64[:, None] * stride_s + edge, mask=edge_mask, other=s_other).to(tl.float32)

    if ONE_BLOCK:
        mask = ok & (cols < n_body)
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + cols, mask=mask, other=s_other).to(tl.float32)
        p, c, a, b, z = _bwd_tile(g, s, m_sub, ln_d, inv_t, LOG, NEED_DT)
        c, a, b, z = tl.sum(c, 1), tl.sum(a, 1), tl.sum(b, 1), tl.sum(z, 1)
    else:
        # Accumulate the terms lane by lane and reduce once, after the loop.
        c = tl.zeros([ROWS, BLOCK], tl.float32)
        a = tl.zeros([ROWS, BLOCK], tl.float32)
        b = tl.zeros([ROWS, BLOCK], tl.float32)
        z = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = ok & (start + cols < n_body)
            g_i = tl.load(g_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            s_i = tl.load(s_ptr + start + cols, mask=mask, other=s_other).to(tl.float32)
            _, c_i, a_i, b_i, z_i = _bwd_tile(g_i, s_i, m_sub, ln_d, inv_t, LOG, NEED_DT)
            c += c_i
            a += a_i
            b += b_i
            z += z_i
        c, a, b, z = tl.sum(c, 1), tl.sum(a, 1), tl.sum(b, 1), tl.sum(z, 1)
    p_e = tl.zeros([ROWS, 2 * VEC], tl.float32)
    if EDGE:
        p_e, c_e, a_e, b_e, z_e = _bwd_tile(g_e, s_e, m_sub, ln_d, inv_t, LOG, NEED_DT)
        c, a, b, z = c + tl.sum(c_e, 1), a + tl.sum(a_e, 1), b + tl.sum(b_e, 1), z + tl.sum(z_e, 1)
    if NEED_DX:
        if ONE_BLOCK:
            tl.store(dx_ptr + cols, _bwd_dx(g, p, c, inv_t, LOG).to(DX.dtype.element_ty), mask=mask)
        else:
            for start in range(0, n_cols, BLOCK):
                mask = ok & (start + cols < n_body)
                g_i = tl.load(g_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                s_i = tl.load(s_ptr + start + cols, mask=mask, other=s_other).to(tl.float32)
                p_i, _c, _a, _b, _z = _bwd_tile(g_i, s_i, m_sub, ln_d, inv_t, LOG, NEED_DT)
                tl.store(dx_ptr + start + cols, _bwd_dx(g_i, p_i, c, inv_t, LOG).to(DX.dtype.element_ty), mask=mask)
        if EDGE:
            dx_e = _bwd_dx(g_e, p_e, c, inv_t, LOG).to(DX.dtype.element_ty)
            tl.store(DX + rows64[:, None] * stride_dx + edge, dx_e, mask=edge_mask)

    if NEED_DT:
        dt = a - c * b
        if LOG:
            dt -= ln_d * z  # Z is 0 unless dL/dy is nonzero at a -inf logit
        dt = tl.where(ln_d > float("-inf"), -inv_t * dt, float("nan"))  # NaN for an all -inf row
        tl.store(DT + rows, dt, mask=row_ok)


@functools.lru_cache(maxsize=None)
def launch_config(n_cols: int) -> tuple[int, int, bool, int]:
    """(rows per program, BLOCK, ONE_BLOCK, num_warps) for rows of ``n_cols`` columns."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ONE_BLOCK:
        return 1, LOOP_BLOCK, False, 8
    rows = min(max(1, 2048 // block), 64)
    tile = rows * block
    return rows, block, True, 4 if tile <= 2048 else 8 if tile <= 4096 else 16


