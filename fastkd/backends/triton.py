"""The Triton backend: the contract of ``fastkd.backends`` over the kernels of ``fastkd.kernels``.

Each function picks the launch configuration (the kernel module's ``launch_config``), turns options
into kernel arguments and launches on the tensors' GPU (or in Triton's interpreter on CPU tensors).
The kernels are looked up on their modules at each call, so that ``tests/sm90_compile.py`` can record
the launches.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastkd import reference
from fastkd._host import KDOutputs, on_device, temperature_arg
from fastkd._options import KDOptions
from fastkd.backends import kernels_cover
from fastkd.backends import torch as torch_backend
from fastkd.kernels import calibration as calibration_kernels
from fastkd.kernels import fidelity as fidelity_kernels
from fastkd.kernels import kd_loss as kd_kernels
from fastkd.kernels import kd_loss_topk as topk_kernels
from fastkd.kernels import kd_math, reductions
from fastkd.kernels import softmax as softmax_kernels

NAME = "triton"
PROGRAMS_PER_SM = 8  # of the persistent (grid-stride) reductions: calibration and fidelity
BIN_SUMS = ("bin_count", "bin_correct", "bin_confidence_sum")
WORKSPACE_BYTES_PER_ENTRY = 0  # the loss's kernels write the gradient over the logits: no workspace
SKEWED = ("skew_kl", "skew_reverse_kl")  # the divergences whose mixture weight (the kernel's beta) is the skew


def tempered_softmax_forward(x: Tensor, temperature: float | Tensor, log: bool, y: Tensor, stats: Tensor) -> None:
    n_rows, n_cols = x.shape
    if x.numel() == 0:
        return
    t = temperature_arg(temperature)
    rows, block, one_block, num_warps = softmax_kernels.launch_config(n_cols)
    store_stats = stats.shape[0] == n_rows and n_rows > 0
    vec = reductions.vector_width(x, y)
    align, edge = reductions.row_alignment(n_cols, vec, [x.stride(0), y.stride(0)],
                                           pointers=[x.data_ptr(), y.data_ptr()])  # fmt: skip
    with on_device(x):
        softmax_kernels.tempered_softmax_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            x, y, t.tensor, stats if store_stats else None, t.inverse, n_rows, n_cols, x.stride(0), y.stride(0),
            t.stride, HAS_T=t.tensor is not None, LOG=log, STORE_STATS=store_stats, ROWS=rows, BLOCK=block,
            ONE_BLOCK=one_block, VEC=vec, ALIGN=align, EDGE=edge, num_warps=num_warps,
        )  # fmt: skip


def tempered_softmax_backward(grad: Tensor, saved: Tensor, temperature: float | Tensor, stats: Tensor, log: bool,
                              dx: Tensor | None, dt: Tensor | None) -> None:  # fmt: skip
    n_rows, n_cols = saved.shape
    if dt is not None and n_cols == 0:  # rows of no classes, on which L does not depend
        dt.zero_()
    if saved.numel() == 0:
        return
    t = temperature_arg(temperature)
    rows, block, one_block, num_warps = softmax_kernels.launch_config(n_cols)
    rows_read = [grad, saved] + ([dx] if dx is not None else [])
    vec = reductions.vector_width(*rows_read)
    align, edge = reductions.row_alignment(n_cols, vec, [r.stride(0) for r in rows_read],
                                           pointers=[r.data_ptr() for r in rows_read])  # fmt: skip
    with on_device(saved):
        softmax_kernels.tempered_softmax_bwd_kernel[(triton.cdiv(n_rows, rows),)](
            grad, saved, dx, t.tensor, stats if dt is not None else None, dt, t.inverse, n_rows, n_cols,
            grad.stride(0), saved.stride(0), dx.stride(0) if dx is not None else 0, t.stride,
            HAS_T=t.tensor is not None, LOG=log, NEED_DX=dx is not None, NEED_DT=dt is not None, ROWS=rows,
            BLOCK=block, ONE_BLOCK=one_block, VEC=vec, ALIGN=align, EDGE=edge, num_warps=num_warps,
            # the loop with 128-bit loads took 167 registers (NEED_DT, 50257 bf16): 128, as before, spills nothing
            **({} if one_block else {"maxnreg": reductions.REDUCTION_MAX_REGISTERS}),
        )  # fmt: skip


def _pair_weights(options: KDOptions) -> tuple[float, float]:
    """The kernel's ab_a and ab_b: the alpha-beta divergence's alpha and beta, or DKD's weights of TCKD
    and NCKD."""
    if options.divergence == "dkd":
        return options.dkd_alpha, options.dkd_beta
    return options.ab_alpha, options.ab_beta


def _kd_launch(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions, out: KDOutputs,
               phase: str, stats: Tensor | None = None, grad: Tensor | None = None,
               grad_output: Tensor | None = None) -> None:  # fmt: skip
    """Launch ``kd_loss_kernel`` in ``phase``: "fused" writes out.rows and out.grad, "stats" out.rows and
    ``stats``, "grad" ``grad`` from ``stats`` times ``grad_output`` (kernels/kd_loss.py)."""
    n_rows, n_cols = student.shape
    grad = out.grad if grad is None else grad
    need_grad = grad.shape[0] > 0 and phase != "stats"
    t, tt = temperature_arg(options.temperature), temperature_arg(options.teacher_temperature)
    n_teachers = teacher.shape[0]
    parts = options.return_parts and phase != "grad"
    vec = reductions.vector_width(student, teacher)
    rows, block, one_block, slots, num_warps = kd_kernels.launch_config(n_cols, vec)
    tensors = [student, teacher] + ([grad] if need_grad else [])
    align, edge = reductions.row_alignment(
        n_cols, vec, [x.stride(0) for x in (student, grad) if x.shape[0]] + [teacher.stride(1)],
        [teacher.stride(0)] if n_teachers > 1 else [], [x.data_ptr() for x in tensors],
    )  # fmt: skip
    budget = {} if one_block else {"maxnreg": kd_kernels.loop_max_registers(n_teachers, options.logit_norm, edge,
                                                                           options.divergence)}  # fmt: skip
    has_kd, has_ce = options.alpha > 0 or parts, target is not None and (options.alpha < 1 or parts)
    with on_device(student):
        kd_kernels.kd_loss_kernel[(triton.cdiv(n_rows, rows),)](
            student, teacher, target, out.rows, out.parts if parts else None, grad if need_grad else student, stats,
            grad_output, t.tensor, tt.tensor, out.scale_tensor, t.inverse, tt.inverse, out.scale, options.alpha,
            options.skew if options.divergence in SKEWED else options.beta, *_pair_weights(options),
            options.label_smoothing, options.softcap or 1.0, options.norm_scale, options.ignore_index, n_rows,
            n_cols, n_teachers, student.stride(0), teacher.stride(0), teacher.stride(1),
            grad.stride(0) if need_grad else 0, t.stride, tt.stride,
            grad_output.stride(0) if grad_output is not None and grad_output.dim() else 0,
            DIVERGENCE=kd_math.divergence_code(options.divergence, options.ab_alpha, options.ab_beta),
            NORM=kd_kernels.NORMS[options.logit_norm], HAS_KD=has_kd, HAS_CE=has_ce, HAS_TARGET=target is not None,
            NEED_GRAD=need_grad, SCALE_GRAD=out.scale_grad or phase == "grad", T_SQUARED=options.temperature_squared,
            HAS_T=t.tensor is not None, HAS_TT=tt.tensor is not None, ENSEMBLE=n_teachers > 1,
            K_BLOCK=triton.next_power_of_2(n_teachers), ROWS=rows, BLOCK=block, ONE_BLOCK=one_block, SLOTS=slots,
            VEC=vec, ALIGN=align, EDGE=edge, PHASE=kd_kernels.PHASES[phase], SOFTCAP=options.softcap is not None,
            RETURN_PARTS=parts, CE_POW=kd_kernels.ce_power(options.temperature, options.logit_norm, has_kd, has_ce),
            num_warps=num_warps, **budget,
        )  # fmt: skip


def kd_loss_forward(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                    out: KDOutputs) -> None:  # fmt: skip
    if student.numel() == 0:
        out.rows.zero_()
        out.parts.zero_()
        return
    _kd_launch(student, teacher, target, options, out, "fused")


# ---- the loss split in two launches: STATS in the forward, GRAD in the backward (optional contract) ----

KD_STATS = kd_kernels.N_STATS  # fp32 statistics per row that STATS writes for GRAD


def kd_loss_split(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions) -> bool:
    """Whether the loss over these rows runs split (the rule of issue 20, a prediction from the sm_90
    cubins' byte counts until a GPU run measures it; benchmarks/README.md): rows wider than
    ``MAX_ONE_BLOCK``, which the fused kernel reads in at least two passes. There STATS moves the
    passes before the gradient's (bf16: 4 B/elem for the default loss) and GRAD the last one (6), the
    fused kernel's 10 whatever dL/dloss is, where the fused kernel needs 4 more (``scale_grad_``'s
    read-modify-write of the gradient) when dL/dloss != 1. A narrower row is read once fused
    (6 B/elem; 10 with the scale): split, it would be read twice (4 + 6) even when dL/dloss is 1, so it
    stays fused. One teacher only (the statistics hold one teacher's), every divergence (DKD's row
    values are two of the statistics), no soft-capping, no ``return_parts``. Shapes and options only: no
    tensor is read (torch.compile traces it)."""
    return (
        teacher.shape[0] == 1
        and student.shape[1] > kd_kernels.MAX_ONE_BLOCK
        and student.shape[0] > 0
        and not options.return_parts
        and kernels_cover(options, kd_math.DIVERGENCES)
    )


def kd_loss_stats_forward(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                          out: KDOutputs, stats: Tensor) -> None:  # fmt: skip
    """The forward of the split: out.rows, and ``stats`` (N, KD_STATS) float32 for the backward."""
    _kd_launch(student, teacher, target, options, out, "stats", stats)


def kd_loss_grad_backward(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                          out: KDOutputs, stats: Tensor, grad_output: Tensor, grad: Tensor) -> None:  # fmt: skip
    """The backward of the split: ``grad`` (N, V) = dL/dx times the reduction's scale (out.scale_tensor
    or out.scale, whatever out.scale_grad says) times ``grad_output`` (0-d, or (N,) one per row)."""
    _kd_launch(student, teacher, target, options, out, "grad", stats, grad, grad_output)


def membership_bitmap(indices: Tensor, n_cols: int, vec: int, shift: Tensor | int = 0) -> Tensor:
    """(N, ceil((V + vec) / 32)) int32 words whose bit b % 32 of word b // 32, b = j + shift (the row's,
    in [0, vec)), marks column j as one of the row's indices (N, k) (kernels/kd_loss_topk.py). Indices
    must be distinct within a row (their bits are added); one outside [0, V) sets no bit (its row is NaN
    in the kernel)."""
    word = topk_kernels.BITS_PER_WORD
    bits = torch.zeros(indices.shape[0], triton.cdiv(n_cols + vec, word), dtype=torch.int32, device=indices.device)
    idx = indices.long()
    ok = (idx >= 0) & (idx < n_cols)
    pos = torch.where(ok, idx, 0) + (shift[:, None] if isinstance(shift, Tensor) else shift)
    # 1 << 31 is int32's sign bit: formed in int64, it wraps to -2^31 in the cast, the bit pattern wanted.
    values = torch.where(ok, torch.ones_like(pos) << (pos % word), 0).to(torch.int32)
    return bits.scatter_add_(1, pos // word, values)


def kd_loss_topk_forward(student: Tensor, indices: Tensor, values: Tensor, target: Tensor | None,
                         options: KDOptions, out: KDOutputs) -> None:  # fmt: skip
    if not kernels_cover(options, kd_math.TOPK_DIVERGENCES, softcap=True):
        return torch_backend.kd_loss_topk_forward(student, indices, values, target, options, out)
    n_rows, n_cols = student.shape
    if student.numel() == 0:
        out.rows.zero_()
        out.parts.zero_()
        return
    need_grad = out.grad.shape[0] > 0
    parts = options.return_parts
    has_kd = options.alpha > 0 or parts
    has_ce = target is not None and (options.alpha < 1 or parts)
    k = indices.shape[1]
    bucket = options.tail == "bucket" and k < n_cols  # with k = V no class is left for the bucket
    need_rest = has_kd and (bucket or options.divergence != "forward_kl")
    vec = reductions.vector_width(student)
    rows_written = [student] + ([out.grad] if need_grad else [])
    align, edge = reductions.row_alignment(n_cols, vec, [x.stride(0) for x in rows_written],
                                           pointers=[x.data_ptr() for x in rows_written])  # fmt: skip
    rows, block, one_block, slots, k_block, num_warps = topk_kernels.launch_config(n_cols, k, vec)
    bits = None
    if need_rest:  # column j at bit j + (the row's start mod vec): a vector of the aligned body in one word
        shift = torch.arange(n_rows, device=student.device) * student.stride(0) % vec if align == 2 else 0
        bits = membership_bitmap(indices, n_cols, vec, shift)
    # In place, the dense pass overwrites x at I before the gradient there reads it: gathered first, unless
    # the k entries stay in registers.
    x_top = None
    if has_kd and need_grad and k > k_block and out.grad.data_ptr() == student.data_ptr():
        x_top = student.gather(1, indices.long().clamp(0, n_cols - 1))
    t, tt = temperature_arg(options.temperature), temperature_arg(options.teacher_temperature)
    with on_device(student):
        topk_kernels.kd_loss_topk_fwd_kernel[(triton.cdiv(n_rows, rows),)](
            student, indices, values, x_top, bits, target, out.rows, out.parts if parts else None,
            out.grad if need_grad else student, t.tensor, tt.tensor, out.scale_tensor, t.inverse, tt.inverse,
            out.scale, options.alpha, options.skew if options.divergence in SKEWED else options.beta,
            options.ab_alpha, options.ab_beta, options.label_smoothing, options.softcap or 1.0,
            options.ignore_index, n_rows, n_cols, k, student.stride(0), indices.stride(0), values.stride(0),
            0 if x_top is None else x_top.stride(0), 0 if bits is None else bits.stride(0),
            out.grad.stride(0) if need_grad else 0, t.stride, tt.stride,
            DIVERGENCE=kd_math.divergence_code(options.divergence, options.ab_alpha, options.ab_beta),
            BUCKET=bucket, NEED_REST=need_rest, HAS_KD=has_kd,
            HAS_CE=has_ce, HAS_TARGET=target is not None,
            NEED_GRAD=need_grad, SCALE_GRAD=out.scale_grad, T_SQUARED=options.temperature_squared,
            HAS_T=t.tensor is not None, HAS_TT=tt.tensor is not None, ROWS=rows, BLOCK=block, ONE_BLOCK=one_block,
            SLOTS=slots, VEC=vec, ALIGN=align, EDGE=edge, K_BLOCK=k_block, ONE_K=k <= k_block,
            SOFTCAP=options.softcap is not None, RETURN_PARTS=parts, num_warps=num_warps,
            CE_POW=kd_kernels.ce_power(options.temperature, None, has_kd, has_ce),  # its scale is 1 / T: no logit_norm
            maxnreg=kd_kernels.LOOP_MAX_REGISTERS,  # without it ptxas spills 8-24 bytes at 64-80
        )  # fmt: skip


def scale_grad_(grad: Tensor, grad_output: Tensor) -> None:
    n_rows, n_cols = grad.shape
    if grad.numel() == 0:
        return
    vec = reductions.vector_width(grad)
    align, edge = reductions.row_alignment(n_cols, vec, [grad.stride(0)], pointers=[grad.data_ptr()])
    block = min(triton.next_power_of_2(n_cols), 4096)
    stride_go = grad_output.stride(0) if grad_output.dim() else 0
    with on_device(grad):
        kd_kernels.scale_grad_kernel[(n_rows, triton.cdiv(n_cols, block))](
            grad, grad_output, n_cols, grad.stride(0), stride_go, BLOCK=block, VEC=vec, ALIGN=align, EDGE=edge,
            num_warps=4 if block <= 1024 else 8,
        )  # fmt: skip


def _programs(x: Tensor, tiles: int) -> int:
    """The grid of a persistent reduction: ``PROGRAMS_PER_SM`` per SM at most (16 in the interpreter)."""
    if x.is_cuda:
        return max(1, min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count * PROGRAMS_PER_SM))
    return max(1, min(tiles, 16))


def calibration_pass(logits: Tensor, target: Tensor, mode: str, temperature: float | Tensor, probs: bool,
                     ignore_index: int, n_bins: int) -> dict[str, Tensor]:  # fmt: skip
    if mode == "bins" and n_bins > calibration_kernels.MAX_KERNEL_BINS:  # the rows' confidences, binned here
        out = calibration_pass(logits, target, "rows", temperature, probs, ignore_index, 1)
        keep = out["correct"] >= 0
        confidence = out["confidence"][keep]
        sums = reference.binned_sums(reference.confidence_bins(confidence, n_bins), out["correct"][keep], confidence,
                                     n_bins)  # fmt: skip
        return {"nll": out["nll"], "brier": out["brier"], **dict(zip(BIN_SUMS, sums))}
    n_rows, n_cols = logits.shape
    rows, block, num_warps = reductions.reduction_launch_config(n_cols)
    bins = triton.next_power_of_2(n_bins) if mode == "bins" else 1
    if mode == "bins":
        rows = max(1, min(rows, 4096 // bins))
    programs = _programs(logits, triton.cdiv(max(n_rows, 1), rows))
    device = logits.device
    partial = torch.zeros(programs, 3, dtype=torch.float64, device=device)
    bin_n = torch.zeros(programs, 2, bins, dtype=torch.int32, device=device)
    bin_conf = torch.zeros(programs, bins, dtype=torch.float64, device=device)
    n = n_rows if mode == "rows" else 0
    conf = torch.empty(n, dtype=torch.float32, device=device)
    correct = torch.empty(n, dtype=torch.int8, device=device)
    t = temperature_arg(temperature)
    log = probs and (mode == "newton" or t.tensor is not None or temperature != 1)
    vec = reductions.vector_width(logits)
    align, edge = reductions.row_alignment(n_cols, vec, [logits.stride(0)], pointers=[logits.data_ptr()])
    if n_rows:
        with on_device(logits):
            calibration_kernels.calibration_kernel[(programs,)](
                logits, target, t.tensor, partial, bin_n, bin_conf, conf, correct, t.inverse, ignore_index, n_rows,
                n_cols, n_bins, logits.stride(0), t.stride, HAS_T=t.tensor is not None, PROBS=probs and not log,
                LOG=log, MODE=calibration_kernels.MODES[mode], ROWS=rows, BLOCK=block, BINS=bins, VEC=vec, ALIGN=align,
                EDGE=edge,
                num_warps=num_warps, maxnreg=reductions.REDUCTION_MAX_REGISTERS,
            )  # fmt: skip
    sums = partial.sum(0)
    if mode == "newton":
        return {"nll": sums[0], "grad": sums[1], "hess": sums[2]}
    result = {"nll": sums[0], "brier": sums[1]}
    if mode == "rows":
        return result | {"confidence": conf, "correct": correct}
    bin_n = bin_n.sum(0, dtype=torch.int64)[:, :n_bins]
    return result | {"bin_count": bin_n[0], "bin_correct": bin_n[1], "bin_confidence_sum": bin_conf.sum(0)[:n_bins]}


def fidelity_pass(student: Tensor, teacher: Tensor, temperature: float | Tensor) -> tuple[Tensor, Tensor]:
    n_rows, n_cols = student.shape
    n_teachers = teacher.shape[0]
    k_block = triton.next_power_of_2(n_teachers)
    rows, block, num_warps = reductions.reduction_launch_config(n_cols)
    if n_teachers > 1:  # an ensemble tile holds ROWS x K_BLOCK member states: <= 64 fits MAX_REGISTERS
        rows = max(1, min(rows, 64 // k_block))
    programs = _programs(student, triton.cdiv(max(n_rows, 1), rows))
    agree = torch.zeros(programs, dtype=torch.int32, device=student.device)
    kl = torch.zeros(programs, dtype=torch.float64, device=student.device)
    t = temperature_arg(temperature)
    vec = reductions.vector_width(student, teacher)
    align, edge = reductions.row_alignment(
        n_cols, vec, [student.stride(0), teacher.stride(1)], [teacher.stride(0)] if n_teachers > 1 else [],
        [student.data_ptr(), teacher.data_ptr()],
    )  # fmt: skip
    if n_rows:
        with on_device(student):
            fidelity_kernels.fidelity_kernel[(programs,)](
                student, teacher, t.tensor, agree, kl, t.inverse, n_rows, n_cols, n_teachers, student.stride(0),
                teacher.stride(0), teacher.stride(1), t.stride, HAS_T=t.tensor is not None, ENSEMBLE=n_teachers > 1,
                K_BLOCK=k_block, ROWS=rows, BLOCK=block, VEC=vec, ALIGN=align, EDGE=edge, num_warps=num_warps,
                maxnreg=reductions.REDUCTION_MAX_REGISTERS,
            )  # fmt: skip
    return agree.sum(dtype=torch.int64), kl.sum()
