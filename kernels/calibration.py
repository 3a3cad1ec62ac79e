"""Triton kernel for calibration statistics and temperature fitting: one read of the logits.

For a row with logits x (C), target y and u = 1/T (math in fp32), one online pass over the row keeps
the running max m, d = sum_j e^((x_j - m) u), and whichever of these the mode needs:

    top label     conf = max_j p_j = 1/d,   prediction = argmax_j x_j (first index)
    NLL           -log p_y = (m - x_y) u + ln d
    Brier         sum_j (p_j - [j = y])^2 = d2 / d^2 - 2 p_y + 1,   d2 = sum_j e^(2 (x_j - m) u)
    Newton        NLL'(u) = E_p[x] - x_y,  NLL''(u) = Var_p[x]   (weighted mean and M2 of x under p,
                  merged across column blocks by Chan et al.'s update)

With probabilities instead of logits at T = 1 (``PROBS``): conf = max_j p_j, -log p_y and
sum_j p_j^2 - 2 p_y + 1 straight from the row. Probabilities at T != 1, and in Newton mode, are
tempered as softmax(log p / T): ``LOG`` takes x = log p as each block is loaded (no log-probability
tensor is formed).

Rows whose target is ``ignore_index`` are skipped. Each program walks a strided set of row tiles and
keeps its sums in registers (counts in int32, sums in fp64: a program may add up millions of rows);
it writes one set of partial sums (``MODE``):
    BINS    per-bin count, correct count and confidence sum, for the bins
            ((m - 1)/M, m/M] (bin = ceil(conf * M) - 1 in fp64, exact for an fp32 conf), plus the NLL
            and Brier sums;
    ROWS    each row's confidence and correctness (for equal-mass bins, which need every sample),
            plus the NLL and Brier sums;
    NEWTON  the sums of NLL, NLL' and NLL'' at u.
The launcher adds the programs' partial sums: a fixed grid gives the same answer bit for bit on every
run (no float atomics). Rows are read in 16-byte vectors at any row stride: an aligned body, then an
edge of at most 2 VEC - 2 entries (``reductions.row_body``, ``row_edge``; the argmax merged by column
index, ``online_argmax_at``). A row of all -inf logits has no distribution: its NLL and confidence are NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels.reductions import online_argmax_at, row_body, row_edge, row_inv_temperature, safe_max

MODES = {"bins": 0, "rows": 1, "newton": 2}  # the kernel's MODE
BINS_MODE, ROWS_MODE, NEWTON_MODE = (tl.constexpr(v) for v in MODES.values())

MAX_KERNEL_BINS = 1024  # more bins: the launcher bins the per-row confidences of "rows" mode with PyTorch
PROGRAMS_PER_SM = 8
# Registers per thread: without a budget, ptxas spills a long-lived value at 80-96 registers in some
# variants (as in kd_loss's loop); with this one no launch config spills (tests/sm90_compile.py).


@triton.jit
def _top_label_step(st, x, mask, idx, u, MODE: tl.constexpr, LOG: tl.constexpr):
    """The running (m, d, d2, mean, M2, argmax) of ``_top_label_pass`` with the tile x (columns ``idx``)
    added."""
    m, d, d2, mean, m2, arg = st
    if LOG:
        x = tl.where(mask, tl.log(x), float("-inf"))
    m_new, arg = online_argmax_at(x, m, arg, idx)  # the first index of the max wins
    m_sub = safe_max(m_new)
    r = tl.exp((m - m_sub) * u)  # 0 while the row has been all -inf
    w = tl.exp((x - m_sub[:, None]) * u[:, None])
    w_sum = tl.sum(w, 1)
    if MODE == NEWTON_MODE:
        # Chan et al.'s merge of (weight, mean, M2) of the values x - m_sub under weights w.
        c = tl.where(w > 0, x - m_sub[:, None], 0.0)
        block_mean = tl.sum(w * c, 1) / tl.maximum(w_sum, 1e-30)
        dev = tl.where(w > 0, c - block_mean[:, None], 0.0)
        block_m2 = tl.sum(w * dev * dev, 1)
        old = d * r
        total = tl.maximum(old + w_sum, 1e-30)
        delta = block_mean - (mean - (m_sub - safe_max(tl.where(m == float("-inf"), m_new, m))))
        mean = block_mean - delta * old / total
        m2 = m2 * r + block_m2 + delta * delta * old * w_sum / total
    else:
        d2 = d2 * r * r + tl.sum(w * w, 1)
    d = d * r + w_sum
    return m_new, d, d2, mean, m2, arg


@triton.jit
def _top_label_pass(body, row, valid, n_body, head, u, cols, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                    MODE: tl.constexpr, LOG: tl.constexpr, VEC: tl.constexpr, EDGE: tl.constexpr):  # fmt: skip
    """One online pass over rows of logits (with ``LOG``, probabilities read as their logs): their
    aligned bodies (at ``body``) in column blocks, then their edges (``row`` + the edge's columns):
    (m, d, d2, argmax, mean, M2), with mean and M2 the p-weighted mean of x - m and sum of squared
    deviations (``NEWTON_MODE`` only)."""
    zero = tl.zeros([ROWS], tl.float32)
    st = (tl.full([ROWS], float("-inf"), tl.float32), zero, zero, zero, zero, tl.zeros([ROWS], tl.int32))
    for start in range(0, n_cols, BLOCK):
        mask = valid[:, None] & (start + cols < n_body)
        x = tl.load(body + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        st = _top_label_step(st, x, mask, (head + start + cols).to(tl.int32), u, MODE, LOG)
    if EDGE:  # the edge's columns formed after the loop: they hold no registers through it
        edge, edge_mask = row_edge(head, n_body, n_cols, valid, VEC)
        x_e = tl.load(row + edge, mask=edge_mask, other=float("-inf")).to(tl.float32)
        st = _top_label_step(st, x_e, edge_mask, edge.to(tl.int32), u, MODE, LOG)
    m, d, d2, mean, m2, arg = st
    return safe_max(m), d, d2, arg, mean, m2


@triton.jit
def _probs_step(st, p, mask, idx):
    """The running (max p, sum p^2, argmax p) with the tile p (columns ``idx``) added."""
    m, sq, arg = st
    m, arg = online_argmax_at(p, m, arg, idx)
    return m, sq + tl.sum(tl.where(mask, p * p, 0.0), 1), arg


@triton.jit
def _probs_pass(body, row, valid, n_body, head, cols, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                VEC: tl.constexpr, EDGE: tl.constexpr):  # fmt: skip
    """(max p, sum p^2, argmax p) of rows of probabilities read in column blocks (bodies, then edges)."""
    st = (tl.full([ROWS], -1.0, tl.float32), tl.zeros([ROWS], tl.float32), tl.zeros([ROWS], tl.int32))
    for start in range(0, n_cols, BLOCK):
        mask = valid[:, None] & (start + cols < n_body)
        p = tl.load(body + start + cols, mask=mask, other=-1.0).to(tl.float32)
        st = _probs_step(st, p, mask, (head + start + cols).to(tl.int32))
    if EDGE:
        edge, edge_mask = row_edge(head, n_body, n_cols, valid, VEC)
        p_e = tl.load(row + edge, mask=edge_mask, other=-1.0).to(tl.float32)
        st = _probs_step(st, p_e, edge_mask, edge.to(tl.int32))
    return st


@triton.jit
def calibration_kernel(
    X,  # logits or probabilities (n_rows, n_cols), unit column stride
    Y,  # targets (n_rows,) int64/int32
    T,  # temperatures (one, or one per row at stride_t) when HAS_T
    PARTIAL,  # fp64 (programs, 3): NLL sum, then Brier sum (BINS, ROWS) or NLL', NLL'' sums (NEWTON)
    BIN_N,  # int32 (programs, 2, BINS): count and correct count per bin (BINS mode)
    BIN_CONF,  # fp64 (programs, BINS): confidence sum per bin (BINS mode)
    CONF,  # fp32 (n_rows,): each row's confidence (ROWS mode)
    CORRECT,  # int8 (n_rows,): each row's correctness, -1 for an ignored row (ROWS mode)
    inv_temp,  # 1/T when the temperature is a float, else unused
    ignore_index,
    n_rows,
    n_cols,
    n_bins,
    stride_x,
    stride_t,
    HAS_T: tl.constexpr,
    PROBS: tl.constexpr,  # probabilities read as such (T = 1)
    LOG: tl.constexpr,  # probabilities read as logits log p (T != 1, Newton mode)
    MODE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    BINS: tl.constexpr,  # n_bins rounded up to a power of 2 (BINS mode; else 1)
    VEC: tl.constexpr,  # entries per 16-byte vector
    ALIGN: tl.constexpr,  # reductions.row_body
    EDGE: tl.constexpr,  # some rows have entries outside their aligned body
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    bins = tl.arange(0, BINS)[None, :]
    bin_n = tl.zeros([BINS], tl.int32)
    bin_right = tl.zeros([BINS], tl.int32)
    bin_conf = tl.zeros([BINS], tl.float64)
    sum_a = tl.zeros([], tl.float64)  # one fp64 total a program (a tile's rows are summed in fp64 first)
    sum_b = tl.zeros([], tl.float64)
    sum_c = tl.zeros([], tl.float64)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        y = tl.load(Y + rows, mask=row_ok, other=ignore_index).to(tl.int64)
        valid = row_ok & (y != ignore_index)
        in_range = (y >= 0) & (y < n_cols)
        body_off, head, n_body = row_body(rows64, stride_x, n_cols, VEC, ALIGN)
        body = X + body_off
        row = X + rows64[:, None] * stride_x
        x_y = tl.load(X + rows64 * stride_x + y, mask=valid & in_range, other=float("nan")).to(tl.float32)
        if LOG:
            x_y = tl.log(x_y)
        if PROBS:
            conf, sq, arg = _probs_pass(body, row, valid, n_body, head, cols, n_cols, ROWS, BLOCK, VEC, EDGE)
            nll = -tl.log(x_y)
            score = sq - 2.0 * x_y + 1.0
        else:
            u = row_inv_temperature(T, inv_temp, rows, valid, stride_t, HAS_T)
            m, d, d2, arg, mean, m2 = _top_label_pass(body, row, valid, n_body, head, u, cols, n_cols, ROWS, BLOCK,
                                                      MODE, LOG, VEC, EDGE)  # fmt: skip
            nll = (m - x_y) * u + tl.log(d)
            conf = tl.math.div_rn(1.0, d)  # correctly rounded, as the reference's 1 / d
            conf = tl.where(d > 0, conf, float("nan"))  # an all -inf row has no distribution (d = 0)
            p_y = tl.exp((x_y - m) * u) * conf
            score = d2 * conf * conf - 2.0 * p_y + 1.0
            if MODE == NEWTON_MODE:
                score = mean + (m - x_y)
                sum_c += tl.sum(tl.where(valid, m2 / d, 0.0).to(tl.float64), 0)
        sum_a += tl.sum(tl.where(valid, nll, 0.0).to(tl.float64), 0)
        sum_b += tl.sum(tl.where(valid, score, 0.0).to(tl.float64), 0)
        correct = (arg.to(tl.int64) == y) & valid
        if MODE == BINS_MODE:
            conf64 = conf.to(tl.float64)
            b = tl.minimum(tl.maximum(tl.ceil(conf64 * n_bins).to(tl.int32) - 1, 0), n_bins - 1)
            b = tl.where(conf64 == conf64, b, n_bins - 1)  # noqa: PLR0124 (a NaN confidence: the last bin)
            hit = (b[:, None] == bins) & valid[:, None]
            bin_n += tl.sum(hit.to(tl.int32), 0)
            bin_right += tl.sum((hit & correct[:, None]).to(tl.int32), 0)
            bin_conf += tl.sum(tl.where(hit, conf64[:, None], 0.0), 0)
        if MODE == ROWS_MODE:
            tl.store(CONF + rows, conf, mask=row_ok)
            tl.store(CORRECT + rows, tl.where(valid, correct.to(tl.int8), -1), mask=row_ok)
    tl.store(PARTIAL + pid * 3, sum_a)
    tl.store(PARTIAL + pid * 3 + 1, sum_b)
    tl.store(PARTIAL + pid * 3 + 2, sum_c)
    if MODE == BINS_MODE:
        offsets = tl.arange(0, BINS)
        tl.store(BIN_N + pid * 2 * BINS + offsets, bin_n)
        tl.store(BIN_N + (pid * 2 + 1) * BINS + offsets, bin_right)
        tl.store(BIN_CONF + pid * BINS + offsets, bin_conf)


