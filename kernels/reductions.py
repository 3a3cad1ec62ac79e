"""Triton building blocks every fastkd kernel shares: the row max to subtract, per-row temperatures,
one row's online log-sum-exp, a running argmax, and the launch configuration of the persistent
(grid-stride) reductions (calibration, fidelity).
"""

from __future__ import annotations

import triton
import triton.language as tl

REDUCTION_TILE = 1024  # rows x columns per program step for narrow rows
REDUCTION_BLOCK = 1024  # columns per step for wide rows (one row per program)
# Registers per thread: without a budget, ptxas spills a long-lived value at 80-96 registers in some
# variants (as in kd_loss's loop); with this one no launch config spills (tests/sm90_compile.py).
REDUCTION_MAX_REGISTERS = 128


@triton.jit
def safe_max(m):
    """The row max to subtract: 0 where the whole row is -inf, so that exp2 sees -inf, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T: tl.constexpr):
    """1/T for each of the ``ROWS`` rows, from the tensor T or the float; NaN where T is not finite > 0."""
    if HAS_T:
        t = tl.load(T + rows.to(tl.int64) * stride_t, mask=row_ok, other=1.0).to(tl.float32)
        return tl.where((t > 0) & (t < float("inf")), 1.0 / t, float("nan"))
    return tl.full(rows.shape, inv_temperature, tl.float32)


@triton.jit
def row_lse(ptr, k, row_ok, cols, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(max x, ln sum_j e^((x_j - max x) k)) of whole rows read in column blocks (online softmax)."""
    m = tl.full([ROWS], float("-inf"), tl.float32)
    d = tl.zeros([ROWS], tl.float32)
    for start in range(0, n_cols, BLOCK):
        mask = row_ok[:, None] & (start + cols < n_cols)
        x = tl.load(ptr + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        m_sub = safe_max(m_new)
        d = d * tl.exp((m - m_sub) * k) + tl.sum(tl.exp((x - m_sub[:, None]) * k[:, None]), 1)
        m = m_new
    return m, tl.log(d)


@triton.jit
def online_argmax(x, m, arg, start):
    """The row max of the running (m, arg) and a block x starting at column ``start``; the first index wins."""
    block_max = tl.max(x, 1)
    arg = tl.where(block_max > m, tl.argmax(x, 1, tie_break_left=True).to(tl.int32) + start, arg)
    return tl.maximum(m, block_max), arg


def reduction_launch_config(n_cols: int) -> tuple[int, int, int]:
    """(rows per program step, BLOCK, num_warps) for rows of ``n_cols`` columns: at most
    ``REDUCTION_TILE`` entries a step, in 4 warps (no spills for any mode on sm_90; 128 rows spilled)."""
    block = min(triton.next_power_of_2(n_cols), REDUCTION_BLOCK)
    return max(1, min(REDUCTION_TILE // block, 64)), block, 4
