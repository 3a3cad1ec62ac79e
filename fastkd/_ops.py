"""One entry point per backend op, for the autograd Functions: allocate the outputs (``fastkd._host``),
then call the implementation (``fastkd.backends``). Eager calls go straight to it; inside
``torch.compile`` each is reached through a ``torch.library`` op that names the backend, so that a
compiled graph sees one opaque call with known output shapes and does not break on it (QuACK's
pattern: the op's dispatch costs tens of microseconds, which eager mode skips).
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastkd import _memory
from fastkd._backend import implementation
from fastkd._host import KDOutputs, kd_outputs, unit_column_stride
from fastkd._options import KDOptions


def _split(temperature: float | Tensor) -> tuple[Tensor | None, float]:
    """An op's (tensor, float) pair for a temperature: the schema has no union of the two."""
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, temperature)


# ---- tempered softmax ------------------------------------------------------------------------------


def softmax_forward(impl: ModuleType, x: Tensor, temperature: float | Tensor, log: bool,
                    store_stats: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(softmax(x / T) or its log (N, V) in x's dtype, the row stats (N, 2) float32 when
    ``store_stats``, else (0, 2)) of x (N, V) with a unit column stride."""
    if torch.compiler.is_compiling():
        return _softmax_fwd_op(x, *_split(temperature), log, store_stats, impl.NAME)
    y = _memory.empty(x.shape, x.dtype, x.device)
    stats = torch.empty((x.shape[0] if store_stats else 0, 2), dtype=torch.float32, device=x.device)
    impl.tempered_softmax_forward(x, temperature, log, y, stats)
    return y, stats


def softmax_backward(impl: ModuleType, grad: Tensor, saved: Tensor, temperature: float | Tensor, stats: Tensor,
                     log: bool, need_dx: bool, need_dt: bool) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
    """(dL/dx (N, V) in saved's dtype, dL/dT per row (N,) float32), None where not needed: ``saved`` is
    the logits (with their stats) when ``need_dt``, else the output."""
    if torch.compiler.is_compiling():
        dx, dt = _softmax_bwd_op(grad, saved, *_split(temperature), stats, log, need_dx, need_dt, impl.NAME)
        return (dx if need_dx else None), (dt if need_dt else None)
    grad = unit_column_stride(grad)
    dx = _memory.empty(saved.shape, saved.dtype, saved.device) if need_dx else None
    dt = torch.empty(saved.shape[0], dtype=torch.float32, device=saved.device) if need_dt else None
    impl.tempered_softmax_backward(grad, saved, temperature, stats, log, dx, dt)
    return dx, dt


@torch.library.custom_op("fastkd::tempered_softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: Tensor, t_tensor: Tensor | None, t_value: float, log: bool, store_stats: bool,
                    backend: str) -> tuple[Tensor, Tensor]:  # fmt: skip
    temperature = t_value if t_tensor is None else t_tensor
    return softmax_forward(implementation(backend), x, temperature, log, store_stats)


@_softmax_fwd_op.register_fake
def _(x, t_tensor, t_value, log, store_stats, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0] if store_stats else 0, 2), dtype=torch.float32)


@torch.library.custom_op("fastkd::tempered_softmax_bwd", mutates_args=())
def _softmax_bwd_op(grad: Tensor, saved: Tensor, t_tensor: Tensor | None, t_value: float, stats: Tensor, log: bool,
                    need_dx: bool, need_dt: bool, backend: str) -> tuple[Tensor, Tensor]:  # fmt: skip
    temperature = t_value if t_tensor is None else t_tensor
    dx, dt = softmax_backward(implementation(backend), grad, saved, temperature, stats, log, need_dx, need_dt)
    return (saved.new_empty(0) if dx is None else dx), (saved.new_empty(0, dtype=torch.float32) if dt is None else dt)


@_softmax_bwd_op.register_fake
def _(grad, saved, t_tensor, t_value, stats, log, need_dx, need_dt, backend):
    dx = saved.new_empty(saved.shape if need_dx else 0)
    return dx, saved.new_empty(saved.shape[0] if need_dt else 0, dtype=torch.float32)


# ---- the distillation loss -------------------------------------------------------------------------


def kd_forward(impl: ModuleType, student: Tensor, teacher: Tensor | tuple[Tensor, Tensor], target: Tensor | None,
               options: KDOptions, inplace_grad: bool, need_grad: bool) -> KDOutputs:  # fmt: skip
    """The loss's forward over rows: student (N, V) (a unit column stride with ``inplace_grad``, which
    writes the gradient into it), teacher (K, N, V) or a sparse teacher (indices, values) (N, k) each,
    target (N,) contiguous or None. Returns the ``KDOutputs`` the backend wrote."""
    if torch.compiler.is_compiling():
        tensors, scalars = options.to_op()
        if isinstance(teacher, tuple):
            rows, grad, later, parts = _kd_topk_fwd_op(student, *teacher, target, tensors, scalars, impl.NAME, need_grad,
                                                       options.return_parts)  # fmt: skip
        else:
            rows, grad, later, parts = _kd_fwd_op(student, teacher, target, tensors, scalars, impl.NAME, need_grad,
                                                  options.return_parts)  # fmt: skip
        return KDOutputs(rows, grad, None, 1.0, True, later, parts)
    if not inplace_grad:
        student = unit_column_stride(student)
    out = kd_outputs(student, target, options, inplace_grad, need_grad)
    if isinstance(teacher, tuple):
        impl.kd_loss_topk_forward(student, *(unit_column_stride(t) for t in teacher), target, options, out)
    else:
        impl.kd_loss_forward(student, unit_column_stride(teacher), target, options, out)
    return out


def _later(out: KDOutputs) -> Tensor:
    """The scale left to the backward, as an op returns it (1 when none)."""
    return out.rows.new_ones((), dtype=torch.float32) if out.later is None else out.later


@torch.library.custom_op("fastkd::kd_loss_fwd", mutates_args=())
def _kd_fwd_op(student: Tensor, teacher: Tensor, target: Tensor | None, tensors: list[Tensor | None], options: str,
               backend: str, need_grad: bool, parts: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    out = kd_forward(implementation(backend), student, teacher, target, KDOptions.from_op(tensors, options), False,
                     need_grad)  # fmt: skip
    return out.rows, out.grad, _later(out), out.parts


@torch.library.custom_op("fastkd::kd_loss_topk_fwd", mutates_args=())
def _kd_topk_fwd_op(student: Tensor, indices: Tensor, values: Tensor, target: Tensor | None,
                    tensors: list[Tensor | None], options: str, backend: str, need_grad: bool,
                    parts: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    out = kd_forward(implementation(backend), student, (indices, values), target, KDOptions.from_op(tensors, options),
                     False, need_grad)  # fmt: skip
    return out.rows, out.grad, _later(out), out.parts


def _kd_fake(student, *args):
    need_grad, parts = args[-2:]
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    rows = student.new_empty(student.shape[0], dtype=compute)
    grad = student.new_empty(student.shape if need_grad else (0, student.shape[1]))
    return rows, grad, student.new_empty((), dtype=torch.float32), rows.new_empty(2 if parts else 0, student.shape[0])


_kd_fwd_op.register_fake(_kd_fake)
_kd_topk_fwd_op.register_fake(_kd_fake)


# ---- the loss split in two (an optional part of the contract: ``kd_loss_split``) --------------------


def kd_split(impl: ModuleType, student: Tensor, teacher: Tensor | tuple[Tensor, Tensor], target: Tensor | None,
             options: KDOptions, inplace_grad: bool, need_grad: bool) -> bool:  # fmt: skip
    """Whether the loss runs split: the forward writes the row losses and row statistics, the backward
    the gradient times dL/dloss (``kd_split_forward``, ``kd_split_backward``). Only where autograd
    wants the gradient, not into the student (``inplace_grad``: the split reads the student again in
    the backward), with a dense teacher, and where the backend has ``kd_loss_split`` and it says so."""
    rule = getattr(impl, "kd_loss_split", None)
    return (need_grad and not inplace_grad and rule is not None and not isinstance(teacher, tuple)
            and rule(student, teacher, target, options))  # fmt: skip


def kd_split_forward(impl: ModuleType, student: Tensor, teacher: Tensor, target: Tensor | None,
                     options: KDOptions) -> tuple[Tensor, Tensor, Tensor | float, Tensor, Tensor]:  # fmt: skip
    """The split's forward over rows (``kd_forward``'s arguments): (the row losses times the reduction's
    scale, the row statistics (N, impl.KD_STATS) float32, the reduction's scale (a 0-d tensor or a
    float), and the student and teacher as the kernels read them: what the backward takes)."""
    if torch.compiler.is_compiling():
        rows, stats, scale = _kd_stats_fwd_op(student, teacher, target, *options.to_op(), impl.NAME)
        return rows, stats, scale, student, teacher
    student, teacher = unit_column_stride(student), unit_column_stride(teacher)
    out = kd_outputs(student, target, options, False, False)
    stats = torch.empty((student.shape[0], impl.KD_STATS), dtype=torch.float32, device=student.device)
    impl.kd_loss_stats_forward(student, teacher, target, options, out, stats)
    return out.rows, stats, (out.scale if out.scale_tensor is None else out.scale_tensor), student, teacher


def kd_split_backward(impl: ModuleType, student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions,
                      stats: Tensor, scale: Tensor | float, grad_output: Tensor) -> Tensor:  # fmt: skip
    """The split's backward: dL/dx (N, V) in the student's dtype, times the reduction's ``scale`` and
    ``grad_output`` (0-d, or (N,) one per row), from ``kd_split_forward``'s outputs."""
    if torch.compiler.is_compiling():
        scale = scale if isinstance(scale, Tensor) else torch.full((), scale, device=student.device)
        return _kd_grad_bwd_op(student, teacher, target, stats, scale, grad_output, *options.to_op(), impl.NAME)
    n_rows, n_cols = student.shape
    grad = _memory.empty((n_rows, n_cols), student.dtype, student.device)
    rows = stats.new_empty(n_rows)  # not written by the backward's launch
    scale_tensor, scale_value = (scale, 1.0) if isinstance(scale, Tensor) else (None, scale)
    out = KDOutputs(rows, grad[:0], scale_tensor, scale_value, True, None, rows.new_empty(0, n_rows))
    impl.kd_loss_grad_backward(student, teacher, target, options, out, stats, grad_output, grad)
    return grad


@torch.library.custom_op("fastkd::kd_loss_stats_fwd", mutates_args=())
def _kd_stats_fwd_op(student: Tensor, teacher: Tensor, target: Tensor | None, tensors: list[Tensor | None],
                     options: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    rows, stats, scale, _, _ = kd_split_forward(implementation(backend), student, teacher, target,
                                                KDOptions.from_op(tensors, options))  # fmt: skip
    scale = scale if isinstance(scale, Tensor) else torch.full((), scale, dtype=rows.dtype, device=rows.device)
    return rows, stats, scale.to(rows.dtype).clone()  # an op's outputs alias none of its inputs


@_kd_stats_fwd_op.register_fake
def _(student, teacher, target, tensors, options, backend):
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    stats = rows.new_empty((student.shape[0], implementation(backend).KD_STATS))
    return rows, stats, rows.new_empty(())


@torch.library.custom_op("fastkd::kd_loss_grad_bwd", mutates_args=())
def _kd_grad_bwd_op(student: Tensor, teacher: Tensor, target: Tensor | None, stats: Tensor, scale: Tensor,
                    grad_output: Tensor, tensors: list[Tensor | None], options: str, backend: str) -> Tensor:  # fmt: skip
    return kd_split_backward(implementation(backend), student, teacher, target, KDOptions.from_op(tensors, options),
                             stats, scale, grad_output)  # fmt: skip


@_kd_grad_bwd_op.register_fake
def _(student, teacher, target, stats, scale, grad_output, tensors, options, backend):
    return student.new_empty(student.shape)
