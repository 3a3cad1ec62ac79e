"""Triton building blocks every fastkd kernel shares: the row max to subtract, per-row temperatures,
the online log-sum-exp of rows read in column blocks, the layout of a row in aligned vectors, a
running argmax, and the launch configuration of the persistent (grid-stride) reductions (calibration,
fidelity).

**Online log-sum-exp, per thread.** A row read in column blocks keeps, per *slot*, a running max m and
d = sum_j 2^((x_j - m) k) (base 2: k holds log2(e) / T). A tile of [ROWS, COLS] entries is viewed as
[ROWS, SLOTS, COLS / SLOTS] (``slots``): with SLOTS = COLS / VEC, each slot is the VEC contiguous entries
one thread loads in one vector, so a step reduces inside the thread (no shuffle, no barrier) and costs
one exp2 per entry plus one per slot for the rescale; ``lse_finish`` merges the slots once per row
(max, then the rescaled sum). With SLOTS = 1 a step reduces the whole row at once: the one-block path
of the kernels runs the same step and finish on a row held in registers.

**Aligned rows.** A 16-byte load needs its address 16-byte aligned and its mask constant over the
vector, both proven to the compiler. A row starting at element r * stride is read as an aligned body
of ``n_body`` entries (a multiple of VEC = 16 / element size) starting ``head`` entries in (``row_body``),
and an edge of at most 2 VEC - 2 entries: the head [0, head) and the tail past the body (``row_edge``),
read entry by entry. With a stride that is a multiple of VEC the head is 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastkd.kernels import INTERPRET

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

REDUCTION_TILE = 1024  # rows x columns per program step for narrow rows
REDUCTION_BLOCK = 1024  # columns per step for wide rows (one row per program)
# Registers per thread: without a budget, ptxas spills a long-lived value at 80-96 registers in some
# variants (as in kd_loss's loop); with this one no launch config spills (tests/sm90_compile.py).
REDUCTION_MAX_REGISTERS = 128
VECTOR_BYTES = 16  # the widest global load or store of one thread (LDG.E.128)


@triton.jit
def safe_max(m):
    """The row max to subtract: 0 where the whole row is -inf, so that exp2 sees -inf, not NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


if INTERPRET:  # no libdevice in the interpreter: numpy's log2

    @triton.jit
    def log2_approx(x):
        """log2 x by MUFU.LG2 (lg2.approx.ftz: a few ulp, subnormal inputs read as 0) where compiled; tl.log2
        is libdevice's polynomial, about 20 instructions. For entries of a row; per-row logs use tl.log2."""
        return tl.log2(x)

else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def log2_approx(x):
        """log2 x by MUFU.LG2 (lg2.approx.ftz: a few ulp, subnormal inputs read as 0) where compiled; tl.log2
        is libdevice's polynomial, about 20 instructions. For entries of a row; per-row logs use tl.log2."""
        return libdevice.fast_log2f(x)


if INTERPRET:  # no libdevice in the interpreter

    @triton.jit
    def tanh(x):
        """tanh x, from e^(-2|x|) (in the interpreter; within 1e-7 of tanh x, absolutely); compiled, libdevice's."""
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)

else:

    @triton.jit
    def tanh(x):
        """tanh x by libdevice (a few ulp; MUFU.TANH's tanh.approx is off by 2^-11, too coarse for a logit)."""
        return libdevice.tanh(x)


@triton.jit
def row_inv_temperature(T, inv_temperature, rows, row_ok, stride_t, HAS_T: tl.constexpr):
    """1/T for each of the ``ROWS`` rows, from the tensor T or the float; NaN where T is not finite > 0."""
    if HAS_T:
        t = tl.load(T + rows.to(tl.int64) * stride_t, mask=row_ok, other=1.0).to(tl.float32)
        return tl.where((t > 0) & (t < float("inf")), 1.0 / t, float("nan"))
    return tl.full(rows.shape, inv_temperature, tl.float32)


@triton.jit
def slots(v, SLOTS: tl.constexpr):
    """The [ROWS, COLS] tile v as [ROWS, SLOTS, COLS / SLOTS] (module doc); with SLOTS = 1, v itself (a
    reshape to [ROWS, 1, COLS] would make the compiler hold whole rows in single threads)."""
    if SLOTS == 1:
        out = v
    else:
        out = tl.reshape(v, [v.shape[0], SLOTS, v.shape[1] // SLOTS])
    return out


@triton.jit
def per_entry(s, SLOTS: tl.constexpr):
    """A slot value ([ROWS, SLOTS]) broadcastable against ``slots`` of a tile."""
    if SLOTS == 1:
        out = s
    else:
        out = s[:, :, None]
    return out


@triton.jit
def slot_max(v3, SLOTS: tl.constexpr):
    """The max within each slot of ``slots(v)``: [ROWS, SLOTS]."""
    if SLOTS == 1:
        out = tl.max(v3, 1, keep_dims=True)
    else:
        out = tl.max(v3, 2)
    return out


@triton.jit
def slot_total(v3, SLOTS: tl.constexpr):
    """The sum within each slot of ``slots(v)``: [ROWS, SLOTS]."""
    if SLOTS == 1:
        out = tl.sum(v3, 1, keep_dims=True)
    else:
        out = tl.sum(v3, 2)
    return out


@triton.jit
def int_power(e, P: tl.constexpr):
    """e^P for P in [1, 8] by squaring: 0 to 4 multiplies (P = 4: 2; P = 8: 3; P = 7: 4), no MUFU. Each
    multiply adds half an ulp of relative error and a relative error r in e becomes about P r in e^P.
    0 stays 0, NaN stays NaN."""
    P_OK: tl.constexpr = P >= 1 and P <= 8
    tl.static_assert(P_OK, "int_power: P in [1, 8]")
    if P == 1:
        return e
    e2 = e * e
    if P == 2:
        return e2
    if P == 3:
        return e2 * e
    e4 = e2 * e2
    if P == 4:
        return e4
    if P == 5:
        return e4 * e
    if P == 6:
        return e4 * e2
    if P == 7:
        return e4 * e2 * e
    return e4 * e4


@triton.jit
def slot_sum(v, SLOTS: tl.constexpr):
    """The [ROWS, COLS] tile v summed within each slot: [ROWS, SLOTS]."""
    return slot_total(slots(v, SLOTS), SLOTS)


@triton.jit
def lse_step(m, d, x, k, SLOTS: tl.constexpr):
    """One step of the online log-sum-exp: the slots' running (m, d) ([ROWS, SLOTS]) with the tile x
    ([ROWS, COLS]) added, at the rows' scale k ([ROWS, 1], log2(e) folded in)."""
    x3 = slots(x, SLOTS)
    m_new = tl.maximum(m, slot_max(x3, SLOTS))
    sub = safe_max(m_new)
    d = d * tl.exp2((m - sub) * k) + slot_total(
        tl.exp2((x3 - per_entry(sub, SLOTS)) * per_entry(k, SLOTS)), SLOTS
    )
    return m_new, d


@triton.jit
def lse_finish(m, d, k):
    """The rows' (max, sum) from their slots' (m, d): [ROWS, SLOTS] -> [ROWS, 1]."""
    m_row = tl.max(m, 1, keep_dims=True)
    return m_row, tl.sum(d * tl.exp2((m - safe_max(m_row)) * k), 1, keep_dims=True)


@triton.jit
def lse_empty(ROWS: tl.constexpr, SLOTS: tl.constexpr):
    """The (m, d) of slots that have seen nothing."""
    return tl.full([ROWS, SLOTS], float("-inf"), tl.float32), tl.zeros([ROWS, SLOTS], tl.float32)


@triton.jit
def row_body(rows64, stride, n_cols, VEC: tl.constexpr, ALIGN: tl.constexpr):
    """(element offset of each row's aligned body, head, n_body), [ROWS, 1] each. ALIGN: 0, rows read
    entry by entry (no alignment proven; the body is the whole row); 1, a stride that is a multiple of
    VEC (head 0); 2, any stride (the launcher checked that every tensor's rows share the head)."""
    start = rows64 * stride
    if ALIGN == 0:
        return start[:, None], tl.zeros_like(start)[:, None], (tl.zeros_like(start) + n_cols)[:, None]
    if ALIGN == 1:
        start = tl.multiple_of(rows64 * tl.multiple_of(stride, VEC), VEC)
        return (
            start[:, None],
            tl.zeros_like(start)[:, None],
            ((n_cols // VEC) * VEC + tl.zeros_like(start))[:, None],
        )
    head = (VEC - start % VEC) % VEC
    n_body = tl.maximum(n_cols - head, 0) // VEC * VEC
    return tl.multiple_of(start + head, VEC)[:, None], head[:, None], n_body[:, None]


@triton.jit
def row_edge(head, n_body, n_cols, row_ok, VEC: tl.constexpr):
    """The columns of each row outside its aligned body, [ROWS, 2 VEC]: the head [0, head) in the first
    VEC lanes, the tail [head + n_body, n_cols) in the last; (columns, mask)."""
    lane = tl.arange(0, 2 * VEC)[None, :]
    idx = tl.where(lane < VEC, lane, head + n_body + (lane - VEC))
    ok = tl.where(lane < VEC, lane < head, idx < n_cols)
    return idx, ok & row_ok[:, None]


@triton.jit
def online_argmax(x, m, arg, start):
    """The row max of the running (m, arg) and a block x starting at column ``start``; the first index wins."""
    block_max = tl.max(x, 1)
    arg = tl.where(block_max > m, tl.argmax(x, 1, tie_break_left=True).to(tl.int32) + start, arg)
    return tl.maximum(m, block_max), arg


@triton.jit
def online_argmax_at(x, m, arg, idx):
    """``online_argmax`` for a tile x whose entries are the columns ``idx`` (int32, x's shape), merged in
    any order: the first index of the max wins, also when a later tile holds it (a row's edge, whose
    head comes before its body)."""
    block_max = tl.max(x, 1)
    block_arg = tl.min(tl.where(x == block_max[:, None], idx, 2147483647), 1)
    take = (block_max > m) | ((block_max == m) & (block_arg < arg))
    return tl.maximum(m, block_max), tl.where(take, block_arg, arg)


def vector_width(*tensors) -> int:
    """Entries per 16-byte vector of the narrowest dtype among ``tensors``."""
    return VECTOR_BYTES // min(t.element_size() for t in tensors)


def row_alignment(n_cols: int, vec: int, row_strides, other_strides=(), pointers=()) -> tuple[int, bool]:
    """(ALIGN, EDGE) for rows of ``n_cols`` entries read in vectors of ``vec`` entries (``row_body``):
    ALIGN 1 when every row stride is a multiple of vec, 2 when they are all congruent mod vec (so that
    the rows of every tensor share one head), 0 (entry by entry) otherwise or for rows narrower than two
    vectors; ``other_strides`` (an ensemble's member stride) must be multiples of vec and ``pointers``
    (data pointers) 16-byte aligned. EDGE: whether any row has entries outside its aligned body."""
    if n_cols < 2 * vec or any(p % VECTOR_BYTES for p in pointers) or any(s % vec for s in other_strides):
        return 0, False
    if all(s % vec == 0 for s in row_strides):
        return 1, n_cols % vec != 0
    if len({s % vec for s in row_strides}) == 1:
        return 2, True
    return 0, False


def reduction_launch_config(n_cols: int) -> tuple[int, int, int]:
    """(rows per program step, BLOCK, num_warps) for rows of ``n_cols`` columns: at most
    ``REDUCTION_TILE`` entries a step, in 4 warps (no spills for any mode on sm_90; 128 rows spilled)."""
    block = min(triton.next_power_of_2(n_cols), REDUCTION_BLOCK)
    return max(1, min(REDUCTION_TILE // block, 64)), block, 4
