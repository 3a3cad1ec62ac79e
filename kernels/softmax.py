"""Triton kernels for the tempered softmax and log-softmax over the rows of an (N, V) matrix.

For a row x of width V and temperature T (math in fp32, in base 2 with the log2(e) folded into the
scale k = log2(e) / T, and the row max m subtracted *before* scaling so that logits of +-1e4 lose no
precision):

    m = max_j x_j,    d = sum_j 2^((x_j - m) k),    lse = m / T + ln d      (natural log of sum e^(x/T))
    softmax       y_j = 2^((x_j - m) k) / d
    log_softmax   y_j = ((x_j - m) k - log2 d) ln 2

Backward, with g = dL/dy, u = x / T and p = softmax(u):

    softmax       dL/du_j = p_j (g_j - c),  c = sum_k g_k p_k
    log_softmax   dL/du_j = g_j - p_j c,    c = sum_k g_k
    dL/dx_j = dL/du_j / T
    dL/dT   = -(1/T) sum_j u_j dL/du_j          (one value per row; -inf logits are constants)

dL/dT is computed from the saved output alone. Writing u_j = log p_j + lse:
    softmax       dL/dT = -(1/T) (A - c B),          A = sum p g log p,  B = sum p log p
    log_softmax   dL/dT = -(1/T) (A - c B - lse Z),  A = sum g log p,    Z = sum of g at -inf logits
with sums over the entries where p > 0 (log_softmax: log p > -inf).

A row narrower than ``MAX_ONE_BLOCK`` is held in registers and read once per kernel (several rows per
program for small widths); a wider row is read twice (an online max/sum pass, then the output pass).
A row whose logits are all -inf has no distribution: its outputs are NaN, as with ``torch.softmax``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

MAX_ONE_BLOCK = 8192  # widest row held in registers by one program
LOOP_BLOCK = 4096  # columns per step when a row is wider


@triton.jit
def _row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T: tl.constexpr):
    """1/T for each of the ``ROWS`` rows: from the tensor T (stride 0 for one shared value) or a float."""
    if HAS_T:
        return 1.0 / tl.load(T + rows * stride_t, mask=row_ok, other=1.0).to(tl.float32)
    return tl.full(rows.shape, inv_temperature, tl.float32)


@triton.jit
def _safe_max(m):
    """The row max to subtract: 0 where the whole row is -inf, so that exp2 sees -inf, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _softmax_out(x, m, log2_d, k, LOG: tl.constexpr):
    """softmax (or log_softmax) of the [ROWS, BLOCK] tile x given its rows' max m, log2 d and scale k."""
    z = (x - _safe_max(m)[:, None]) * k[:, None] - log2_d[:, None]
    if LOG:
        return z * LN2
    return tl.exp2(z)


@triton.jit
def tempered_softmax_fwd_kernel(
    X,  # (N, V) logits, unit column stride
    Y,  # (N, V) output, in the logits' dtype
    T,  # (N,) or (1,) temperatures, or None when the temperature is the float below
    LSE,  # (N,) fp32 log-sum-exp of x / T, written when STORE_LSE
    inv_temperature,  # 1 / T when T is None
    n_rows,
    n_cols,
    stride_x,  # row strides, in elements
    stride_y,
    stride_t,  # 0 for one temperature shared by all rows, 1 for one per row
    HAS_T: tl.constexpr,
    LOG: tl.constexpr,
    STORE_LSE: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    BLOCK: tl.constexpr,  # columns per step (the whole row when ONE_BLOCK)
    ONE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    k = _row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T) * LOG2E
    x_ptr = X + rows.to(tl.int64)[:, None] * stride_x
    y_ptr = Y + rows.to(tl.int64)[:, None] * stride_y
    cols = tl.arange(0, BLOCK)[None, :]

    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols < n_cols)
        x = tl.load(x_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 1)
        log2_d = tl.log2(tl.sum(tl.exp2((x - _safe_max(m)[:, None]) * k[:, None]), 1))
        tl.store(y_ptr + cols, _softmax_out(x, m, log2_d, k, LOG).to(Y.dtype.element_ty), mask=mask)
    else:
        m = tl.full([ROWS], float("-inf"), tl.float32)
        d = tl.zeros([ROWS], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 1))
            m_sub = _safe_max(m_new)
            d = d * tl.exp2((m - m_sub) * k) + tl.sum(tl.exp2((x - m_sub[:, None]) * k[:, None]), 1)
            m = m_new
        log2_d = tl.log2(d)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            x = tl.load(x_ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            tl.store(y_ptr + start + cols, _softmax_out(x, m, log2_d, k, LOG).to(Y.dtype.element_ty), mask=mask)

    if STORE_LSE:
        tl.store(LSE + rows, (m * k + log2_d) * LN2, mask=row_ok)


@triton.jit
def _bwd_terms(g, y, LOG: tl.constexpr, NEED_DT: tl.constexpr):
    """The terms, per entry of a [ROWS, BLOCK] tile, of the row sums c and A, B, Z (see the module doc)."""
    if LOG:
        c = g
    else:
        c = g * y
    a = tl.zeros_like(c)
    b = tl.zeros_like(c)
    z = tl.zeros_like(c)
    if NEED_DT:
        if LOG:
            live = y > float("-inf")
            log_p = tl.where(live, y, 0.0)
            a = tl.where(live, g * log_p, 0.0)
            b = tl.where(live, tl.exp(log_p) * log_p, 0.0)
            z = tl.where(live, 0.0, g)
        else:
            log_p = tl.log(tl.where(y > 0, y, 1.0))
            a = c * log_p
            b = y * log_p
    return c, a, b, z


@triton.jit
def _bwd_dx(g, y, c, inv_t, LOG: tl.constexpr):
    """dL/dx of a [ROWS, BLOCK] tile."""
    if LOG:
        return (g - tl.exp(y) * c[:, None]) * inv_t[:, None]
    return y * (g - c[:, None]) * inv_t[:, None]


@triton.jit
def tempered_softmax_bwd_kernel(
    G,  # (N, V) dL/dy, unit column stride
    Y,  # (N, V) forward output
    DX,  # (N, V) dL/dx, in the logits' dtype
    T,  # (N,) or (1,) temperatures, or None
    LSE,  # (N,) fp32 log-sum-exp from the forward; read when LOG and NEED_DT
    DT,  # (N,) fp32 dL/dT per row, written when NEED_DT
    inv_temperature,
    n_rows,
    n_cols,
    stride_g,
    stride_y,
    stride_dx,
    stride_t,
    HAS_T: tl.constexpr,
    LOG: tl.constexpr,
    NEED_DT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    inv_t = _row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T)
    g_ptr = G + rows.to(tl.int64)[:, None] * stride_g
    y_ptr = Y + rows.to(tl.int64)[:, None] * stride_y
    dx_ptr = DX + rows.to(tl.int64)[:, None] * stride_dx
    cols = tl.arange(0, BLOCK)[None, :]
    y_other = float("-inf") if LOG else 0.0

    if ONE_BLOCK:
        mask = row_ok[:, None] & (cols < n_cols)
        g = tl.load(g_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + cols, mask=mask, other=y_other).to(tl.float32)
        c, a, b, z = _bwd_terms(g, y, LOG, NEED_DT)
        c, a, b, z = tl.sum(c, 1), tl.sum(a, 1), tl.sum(b, 1), tl.sum(z, 1)
        tl.store(dx_ptr + cols, _bwd_dx(g, y, c, inv_t, LOG).to(DX.dtype.element_ty), mask=mask)
    else:
        # Accumulate the terms lane by lane and reduce once, after the loop.
        c = tl.zeros([ROWS, BLOCK], tl.float32)
        a = tl.zeros([ROWS, BLOCK], tl.float32)
        b = tl.zeros([ROWS, BLOCK], tl.float32)
        z = tl.zeros([ROWS, BLOCK], tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            g = tl.load(g_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + start + cols, mask=mask, other=y_other).to(tl.float32)
            c_i, a_i, b_i, z_i = _bwd_terms(g, y, LOG, NEED_DT)
            c += c_i
            a += a_i
            b += b_i
            z += z_i
        c, a, b, z = tl.sum(c, 1), tl.sum(a, 1), tl.sum(b, 1), tl.sum(z, 1)
        for start in range(0, n_cols, BLOCK):
            mask = row_ok[:, None] & (start + cols < n_cols)
            g = tl.load(g_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + start + cols, mask=mask, other=y_other).to(tl.float32)
            tl.store(dx_ptr + start + cols, _bwd_dx(g, y, c, inv_t, LOG).to(DX.dtype.element_ty), mask=mask)

    if NEED_DT:
        dt = a - c * b
        if LOG:
            # Z is 0 unless dL/dy is nonzero at a -inf logit: only then is the lse needed.
            lse = tl.load(LSE + rows, mask=row_ok & (z != 0), other=0.0)
            dt -= tl.where(z != 0, lse * z, 0.0)
        tl.store(DT + rows, -inv_t * dt, mask=row_ok)


@functools.lru_cache(maxsize=None)
def launch_config(n_cols: int) -> tuple[int, int, bool, int]:
    """(rows per program, BLOCK, ONE_BLOCK, num_warps) for rows of ``n_cols`` columns."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ONE_BLOCK:
        return 1, LOOP_BLOCK, False, 8
    rows = min(max(1, 2048 // block), 64)
    tile = rows * block
    return rows, block, True, 4 if tile <= 2048 else 8 if tile <= 4096 else 16


def _temperature_args(temperature: torch.Tensor | None, t_value: float) -> dict:
    if temperature is None:
        return dict(T=None, inv_temperature=1.0 / t_value, stride_t=0, HAS_T=False)
    return dict(T=temperature, inv_temperature=1.0, stride_t=0 if temperature.numel() == 1 else 1, HAS_T=True)


def _unit_column_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def tempered_softmax_forward(
    x: torch.Tensor, temperature: torch.Tensor | None, t_value: float, log: bool, store_lse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(x / T) (or its log) over the rows of x (N, V).

    The temperature is the tensor ``temperature`` ((N,) or one element) or, when that is None, the
    float ``t_value``. Returns the output (N, V) in x's dtype and, when ``store_lse``, the fp32
    log-sum-exp of x / T per row (an empty tensor otherwise).
    """
    x = _unit_column_stride(x)
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    lse = torch.empty(n_rows if store_lse else 0, dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, lse.fill_(float("-inf"))
    rows, block, one_block, num_warps = launch_config(n_cols)
    tempered_softmax_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x, y, LSE=lse if store_lse else None, n_rows=n_rows, n_cols=n_cols,
        stride_x=x.stride(0), stride_y=y.stride(0), LOG=log, STORE_LSE=store_lse,
        ROWS=rows, BLOCK=block, ONE_BLOCK=one_block, num_warps=num_warps,
        **_temperature_args(temperature, t_value),
    )  # fmt: skip
    return y, lse


def tempered_softmax_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    temperature: torch.Tensor | None,
    t_value: float,
    lse: torch.Tensor,
    log: bool,
    need_dt: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dL/dx (N, V) in y's dtype and, when ``need_dt``, dL/dT per row (N,) fp32 (else empty).

    ``grad`` is dL/dy, ``y`` the forward output and ``lse`` its per-row log-sum-exp (needed only for
    dL/dT of the log-softmax).
    """
    grad = _unit_column_stride(grad)
    n_rows, n_cols = y.shape
    dx = torch.empty((n_rows, n_cols), dtype=y.dtype, device=y.device)
    dt = torch.zeros(n_rows if need_dt else 0, dtype=torch.float32, device=y.device)
    if y.numel() == 0:
        return dx, dt
    rows, block, one_block, num_warps = launch_config(n_cols)
    tempered_softmax_bwd_kernel[(triton.cdiv(n_rows, rows),)](
        grad, y, dx, LSE=lse if log and need_dt else None, DT=dt if need_dt else None,
        n_rows=n_rows, n_cols=n_cols, stride_g=grad.stride(0), stride_y=y.stride(0),
        stride_dx=dx.stride(0), LOG=log, NEED_DT=need_dt, ROWS=rows, BLOCK=block,
        ONE_BLOCK=one_block, num_warps=num_warps, **_temperature_args(temperature, t_value),
    )  # fmt: skip
    return dx, dt
