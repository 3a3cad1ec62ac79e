"""Fused-linear distillation: ``kd_loss`` of two final linear layers, by chunks of rows, without ever
forming the (N, V) logits.

    student_logits = student_hidden @ student_weight^T + student_bias    (N, V); student_hidden (N, H)
    teacher_logits = teacher_hidden @ teacher_weight^T + teacher_bias    (N, V); teacher_hidden (N, H_t)
    loss = kd_loss(student_logits, teacher_logits, target, **kd_kwargs)

The rows are walked in chunks of C. For a chunk, the two (C, V) logits come from the ordinary matmul;
the fused KD kernel (the reference on the torch backend) gives the chunk's row losses and
g = dL/dlogits (C, V), written over the student logits; then at once

    dL/dh = g W  (C, H),     dL/dW += g^T h  (V, H),     dL/db += sum over the chunk's rows of g  (V,)

and the chunk's buffers go. For the reductions to a scalar all of this happens in the forward and the
backward only scales the three gradients by dL/dloss. Under reduction="none" each row's g is weighed by
its own dL/dloss, known only in the backward: the forward computes the losses alone, and the backward
walks the chunks again (the logits' matmuls run twice). The teacher's parameters get no gradient. A
sparse teacher (``teacher_topk``, as in ``kd_loss``) may replace the teacher's layer: each chunk takes
its rows of the (N, k) indices and values.

Memory beyond the inputs and the gradients returned: the chunk's student and teacher logits (2 C V
entries in their dtypes; the gradient overwrites the student's) and, for float16/bfloat16 weights, a
float32 (V, H) accumulator of dL/dW, added to a slice of at most C V entries at a time. Never O(N V).
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastkd import reference
from fastkd._autograd import first_order
from fastkd._backend import check_backend_name, resolve_backend
from fastkd._ops import kd_forward
from fastkd._options import KDKeywords, KDOptions, check_sparse_options, dense_teacher_only, takes_kd_keywords
from fastkd._validate import check_int, check_logits, should_check_values
from fastkd.sharding import check_not_sharded
from fastkd.kd_loss import check_sparse_teacher

CHUNK_BUDGET = 512 << 20  # bytes of per-chunk buffers at most, whatever the free memory
# Bytes per logit entry of a chunk: the student's and teacher's logits and the slice of the weight
# gradient's update (3 x the itemsize), plus the backend's own workspace (WORKSPACE_BYTES_PER_ENTRY).
ENTRY_FACTOR = 3


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_chunk_size(n_rows: int, n_classes: int, dtype: torch.dtype, device: torch.device,
                       workspace: int = 0) -> int:  # fmt: skip
    """Rows per chunk: as many as fit min(free memory / 8, ``CHUNK_BUDGET``) at the chunk's bytes per
    logit entry (3 x the itemsize, plus the backend's ``workspace`` bytes per entry), at least 1 and at
    most ``n_rows``. At V = 128256 in bfloat16 on the kernels that is about 700 rows."""
    per_entry = ENTRY_FACTOR * dtype.itemsize + workspace
    budget = min(_free_memory(device) // 8, CHUNK_BUDGET)
    return max(1, min(n_rows, budget // (per_entry * max(n_classes, 1))))


class _LinearTeacher(NamedTuple):
    """A teacher given by its final layer: hidden (N, H_t), weight (V, H_t), bias (V,) or None."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


def _teacher_rows(teacher: _LinearTeacher | Tensor | tuple[Tensor, Tensor], start: int, stop: int):
    """The teacher of rows [start, stop): logits (C, V) from its layer or as given, or its entries
    (indices, values)."""
    if isinstance(teacher, _LinearTeacher):
        return F.linear(teacher.hidden[start:stop], teacher.weight, teacher.bias)
    if isinstance(teacher, Tensor):
        return teacher[start:stop]
    return teacher[0][start:stop], teacher[1][start:stop]


def _chunk_loss(student: Tensor, teacher: Tensor | tuple[Tensor, Tensor], target: Tensor | None,
                options: KDOptions, impl, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(row losses (C,), their KD and CE parts (2, C) (with ``return_parts``; else (0, C)), dL/d student
    (C, V) in the student's dtype, or None) of ``sum_rows kd_loss`` against teacher logits (C, V) or a
    sparse teacher (indices, values), the gradient written over ``student``."""
    sparse = isinstance(teacher, tuple)
    out = kd_forward(impl, student, teacher if sparse else teacher[None], target,
                     dataclasses.replace(options, reduction="sum", normalizer=None), True, need_grad)  # fmt: skip
    return out.rows, out.parts, out.grad if need_grad else None


def _accumulate(acc: Tensor, g: Tensor, rhs: Tensor, alpha: float) -> None:
    """acc (V, M) += alpha g^T rhs, g (C, V), rhs (C, M). A float32 ``acc`` of lower-precision ``g`` takes
    the product in slices of V of at most C V entries, so the product never outgrows a chunk's logits."""
    if acc.dtype == g.dtype:
        acc.addmm_(g.t(), rhs, alpha=alpha)
        return
    step = max(1, g.numel() // max(rhs.shape[1], 1))
    for start in range(0, acc.shape[0], step):
        acc[start : start + step].add_(g[:, start : start + step].t() @ rhs, alpha=alpha)


def _walk(student: tuple, teacher: _LinearTeacher | tuple[Tensor, Tensor], target: Tensor | None,
          options: KDOptions, impl, chunk_size: int, row_weight: float | Tensor,
          needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, list]:  # fmt: skip
    """Row losses (N,) in the compute dtype, their KD and CE parts (2, N) (with ``return_parts``;
    else (0, N)) and, for the parts of ``student`` (hidden, weight, bias) flagged in ``needs``, the
    gradients of sum_i w_i loss_i with w = ``row_weight``: a float, or one weight per row."""
    hidden, weight, bias = student
    n_rows, n_classes = hidden.shape[0], weight.shape[0]
    need_grad = any(needs)
    acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    grad_h = torch.empty_like(hidden) if needs[0] else None
    grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if needs[1] else None
    grad_b = torch.zeros(n_classes, 1, dtype=acc_dtype, device=weight.device) if needs[2] else None
    per_row = isinstance(row_weight, Tensor)
    losses, parts = [], []
    for start in range(0, n_rows, chunk_size):
        stop = min(start + chunk_size, n_rows)
        h = hidden[start:stop]
        logits = F.linear(h, weight, bias)
        teacher_rows = _teacher_rows(teacher, start, stop)
        y = None if target is None else target[start:stop]
        rows, chunk_parts, g = _chunk_loss(logits, teacher_rows, y, options.rows(start, stop), impl, need_grad)
        losses.append(rows)
        parts.append(chunk_parts)
        del teacher_rows
        if not need_grad:
            continue
        w = row_weight[start:stop, None].to(g.dtype) if per_row else None
        alpha = 1.0 if per_row else row_weight
        if grad_h is not None:
            out = grad_h[start:stop]
            out.addmm_(g, weight, beta=0, alpha=alpha)
            if per_row:
                out.mul_(w)
        if grad_w is not None:
            _accumulate(grad_w, g, h * w if per_row else h, alpha)
        if grad_b is not None:
            _accumulate(grad_b, g, w if per_row else g.new_ones(stop - start, 1), alpha)
        del logits, g
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None:
        grad_b = grad_b.view(-1).to(weight.dtype)
    compute = reference.compute_dtype(hidden.dtype)
    rows = torch.cat(losses) if losses else hidden.new_zeros(0, dtype=compute)
    parts = torch.cat(parts, -1) if parts else hidden.new_zeros(2 if options.return_parts else 0, 0, dtype=compute)
    return rows, parts, [grad_h, grad_w, grad_b]


def _reduction_scale(options: KDOptions, target: Tensor | None, n_rows: int) -> float:
    """The factor of the summed row losses: 1 / normalizer when one is given; else 1 / (rows not
    ignored) for "mean" (1 when there are none), 1 / N for "batchmean" (and for "mean" without a
    target), else 1. A host sync for "mean" or a tensor normalizer."""
    if options.normalizer is not None:
        return 1.0 / float(options.normalizer)
    if options.reduction == "mean" and target is not None:
        return 1.0 / max(int((target != options.ignore_index).sum()), 1)
    return 1.0 / max(n_rows, 1) if options.reduction in ("mean", "batchmean") else 1.0


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives a matmul on ``device`` now, or None outside autocast."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _cast(tensor: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``tensor`` in the matmul dtype ``dtype`` (None: as it is), as autocast casts a linear layer's
    operands: float64 is left alone."""
    if tensor is None or dtype is None or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(dtype)


def _cast_all(student: tuple, teacher, dtype: torch.dtype | None) -> tuple[tuple, object]:
    """The student's (hidden, weight, bias) and a linear teacher in the matmul dtype (one cast a call)."""
    if dtype is None:
        return student, teacher
    if isinstance(teacher, _LinearTeacher):
        teacher = _LinearTeacher(*(_cast(t, dtype) for t in teacher))
    return tuple(_cast(t, dtype) for t in student), teacher


class FusedLinearKDFunction(torch.autograd.Function):
    """The loss over rows: hidden (N, H), weight (V, H), bias (V,) or None; the teacher as a
    ``_LinearTeacher`` or a sparse (indices, values) (N, k) each (never differentiated); target (N,) or
    None; ``options`` from ``kd_loss.check_options``; ``matmul_dtype`` the autocast dtype the layers
    run in (None: their own). Returns a 0-d loss, or (N,) for reduction "none", in the compute dtype
    (float32, float64 for float64 hidden states); the gradients in the dtypes of the inputs given."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, target, options, impl, chunk_size, matmul_dtype):
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.options, ctx.impl, ctx.chunk_size, ctx.used = options, impl, chunk_size, False
        ctx.matmul_dtype, ctx.dtypes = matmul_dtype, [None if t is None else t.dtype for t in (hidden, weight, bias)]
        if options.reduction == "none":  # each row's dL/dloss is known only in the backward
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.teacher = teacher
            rows, parts, _ = _walk_as(ctx, (hidden, weight, bias), teacher, target, 1.0, (False, False, False))
            loss = rows
        else:
            scale = _reduction_scale(options, target, hidden.shape[0])
            rows, parts, grads = _walk_as(ctx, (hidden, weight, bias), teacher, target, scale, needs)
            ctx.grads = grads
            loss, parts = rows.sum() * scale, parts.sum(-1) * scale
        if not options.return_parts:
            return loss
        kd, ce = parts
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @first_order("fused_linear_kd_loss")
    def backward(ctx, grad_output: Tensor, *_parts: Tensor):
        if ctx.options.reduction == "none":
            *student, target = ctx.saved_tensors
            needs = tuple(ctx.needs_input_grad[:3])
            _, _, grads = _walk_as(ctx, tuple(student), ctx.teacher, target, grad_output, needs)
        else:
            if ctx.used:
                raise RuntimeError("fused_linear_kd_loss's backward scales its saved gradients in place and can run "
                                   "once per forward")  # fmt: skip
            ctx.used = True
            grads = [None if g is None else g.mul_(grad_output) for g in ctx.grads]
            del ctx.grads
        return (*grads, None, None, None, None, None, None)


def _walk_as(ctx, student: tuple, teacher, target: Tensor | None, row_weight,
             needs) -> tuple[Tensor, Tensor, list]:  # fmt: skip
    """``_walk`` in the Function's matmul dtype, with autocast off (the casts are explicit), and the
    gradients returned in the dtypes of the tensors given."""
    student, teacher = _cast_all(student, teacher, ctx.matmul_dtype)
    with torch.autocast(student[0].device.type, enabled=False):
        rows, parts, grads = _walk(student, teacher, target, ctx.options, ctx.impl, ctx.chunk_size, row_weight, needs)
    return rows, parts, [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]


def _check_linear(hidden: object, weight: object, bias: object, prefix: str,
                  matmul_dtype: torch.dtype | None) -> None:  # fmt: skip
    """hidden (..., H), weight (V, H) and bias (V,) or None: one float dtype once cast to ``matmul_dtype``
    (autocast's; None: as they are), one device."""
    check_logits(hidden, f"{prefix}_hidden")
    check_logits(weight, f"{prefix}_weight")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must be (V, H) with H = {prefix}_hidden's last dimension "
                         f"{hidden.shape[-1]}; got shape {tuple(weight.shape)}")  # fmt: skip
    tensors = {f"{prefix}_weight": weight}
    if bias is not None:
        check_logits(bias, f"{prefix}_bias")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}_bias must be (V,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
        tensors[f"{prefix}_bias"] = bias
    for name, tensor in tensors.items():
        if _cast(tensor, matmul_dtype).dtype != _cast(hidden, matmul_dtype).dtype:
            raise TypeError(f"{name} dtype {tensor.dtype} differs from {prefix}_hidden's {hidden.dtype}: the "
                            "matmul needs one dtype (cast the layer or the hidden states, or run under "
                            "torch.autocast)")  # fmt: skip
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but {prefix}_hidden is on {hidden.device}")


@takes_kd_keywords
def fused_linear_kd_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    values_are: str | None = None,
    tail: str | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    validate_args: bool = True,
    **kd_options,
) -> Tensor:
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T +
    teacher_bias, target, ...)``, computed by chunks of rows so that the (N, V) logits are never formed
    (module doc); the same loss and gradients.

    Args:
        student_hidden: (N, H) or (B, S, H): the input of the student's final linear layer, float16/
            bfloat16/float32/float64. Gets a gradient, as do ``student_weight`` and ``student_bias``.
        student_weight: (V, H), the layer's weight, in ``student_hidden``'s dtype (or under
            ``torch.autocast``) and on its device.
        teacher_hidden: the teacher's (..., H_t), with the student's leading dimensions; ``teacher_weight``
            (V, H_t) and ``teacher_bias`` (V,) in its dtype. No gradient reaches them.
        target: class indices of the leading shape, or None (pure distillation, alpha=1), as in ``kd_loss``.
        student_bias, teacher_bias: (V,) or None.
        teacher_logits: the teacher's logits (..., V), the student's leading shape, instead of its layer
            (cached logits; or log-probabilities: the log of a distribution is a teacher's logits).
        teacher_topk, values_are, tail: a sparse teacher (indices, values) (..., k) instead of the
            teacher's layer, as in ``kd_loss`` (offline top-k log-probabilities, say).
        temperature, alpha, divergence, beta, ignore_index, reduction, temperature_squared,
            teacher_temperature, logit_norm, norm_scale, label_smoothing, validate_args: as in
            ``kd_loss``, with its defaults and checks (a per-row temperature has the leading shape).
        chunk_size: rows per chunk; None for ``default_chunk_size`` (from V, the dtype, the backend and
            the free memory). Peak extra memory grows with chunk_size x V.
        backend: ``"auto"`` or a registered backend's name: which computes each chunk's loss and
            gradient (``fastkd._backend``); the matmuls are PyTorch's either way.

    A weight that is the shard of a sharded one (FSDP2's DTensor, a DeepSpeed ZeRO-3 placeholder: a
    head read outside its model's forward) raises a ``ValueError`` naming it and pointing to
    ``fastkd.fsdp``, which computes the loss inside the forward.

    The gradients are computed in the forward for the reductions to a scalar (the backward scales them
    by dL/dloss and runs once per forward); reduction "none" recomputes the chunks in the backward. The
    weight's gradient is accumulated in float32 for float16/bfloat16 weights. Under ``torch.autocast``
    (float32 weights, bfloat16 hidden states: mixed precision) the layers run in the autocast dtype, as
    ``F.linear`` would, each weight cast once a call; the gradients come back in the dtypes of the
    tensors given. The loss is float32 (float64 for float64 inputs). Eager only: no torch.compile
    registration.
    """
    check_not_sharded(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias,
                      teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    matmul_dtype = autocast_dtype(student_hidden.device) if isinstance(student_hidden, Tensor) else None
    _check_linear(student_hidden, student_weight, student_bias, "student", matmul_dtype)
    lead = student_hidden.shape[:-1]
    n_classes = student_weight.shape[0]
    # The logits' stand-in: their shape, dtype and device, no memory (what the checks read).
    logits = student_hidden.new_zeros((), dtype=_cast(student_hidden, matmul_dtype).dtype).expand(*lead, n_classes)
    options = KDOptions.checked(**kd_options).bind(logits, target, check_values=should_check_values(validate_args))
    given = [name for name, value in (("teacher_hidden/teacher_weight", teacher_hidden if teacher_weight is None
                                                                        else teacher_weight),
                                      ("teacher_logits", teacher_logits), ("teacher_topk", teacher_topk))
             if value is not None]  # fmt: skip
    if len(given) != 1:
        raise ValueError("pass one teacher, not both: its layer (teacher_hidden and teacher_weight), its "
                         f"teacher_logits, or a sparse teacher_topk; got {', '.join(given) or 'none'}")  # fmt: skip
    if teacher_logits is not None:
        dense_teacher_only(values_are, tail, "teacher_logits")
        check_logits(teacher_logits, "teacher_logits")
        if teacher_logits.shape != logits.shape or teacher_logits.device != student_hidden.device:
            raise ValueError(f"teacher_logits must be the student's logits' shape {tuple(logits.shape)} on "
                             f"{student_hidden.device}; got {tuple(teacher_logits.shape)} on {teacher_logits.device}")  # fmt: skip
        teacher = teacher_logits.detach().reshape(-1, n_classes)
    elif teacher_topk is None:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass the teacher's layer (teacher_hidden and teacher_weight) or a sparse teacher_topk")
        dense_teacher_only(values_are, tail, "the teacher's layer")
        _check_linear(teacher_hidden, teacher_weight, teacher_bias, "teacher", matmul_dtype)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden must have student_hidden's leading shape {tuple(lead)} (one teacher "
                             f"row per student row); got {tuple(teacher_hidden.shape)}")  # fmt: skip
        if teacher_weight.shape[0] != n_classes:
            raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} classes but student_weight has "
                             f"{n_classes}: teacher and student must share the vocabulary")  # fmt: skip
        if teacher_hidden.device != student_hidden.device:
            raise ValueError(f"teacher_hidden is on {teacher_hidden.device} but student_hidden is on "
                             f"{student_hidden.device}")  # fmt: skip
        teacher = _LinearTeacher(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
                                 None if teacher_bias is None else teacher_bias.detach())  # fmt: skip
    else:
        (indices, values), options = check_sparse_teacher(teacher_topk, logits, target, options, values_are, tail,
                                                          validate_args)  # fmt: skip
        k = indices.shape[-1]
        teacher = (indices.reshape(-1, k), values.detach().reshape(-1, k))
    if chunk_size is not None:
        check_int(chunk_size, "chunk_size", 1)
    impl = resolve_backend(backend, logits)
    n_rows = lead.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, n_classes, logits.dtype, student_hidden.device,
                                        impl.WORKSPACE_BYTES_PER_ENTRY)  # fmt: skip
    loss = FusedLinearKDFunction.apply(
        student_hidden.reshape(n_rows, student_hidden.shape[-1]), student_weight, student_bias, teacher,
        None if target is None else target.reshape(-1), options, impl, chunk_size, matmul_dtype,
    )  # fmt: skip
    if options.reduction != "none":
        return loss
    return tuple(part.reshape(lead) for part in loss) if options.return_parts else loss.reshape(lead)


class FusedLinearKDLoss(KDKeywords):
    """``fused_linear_kd_loss`` as a module: its keywords set (and checked) once; the call takes
    (student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias, teacher_bias,
    teacher_topk). A tensor temperature is registered as a buffer."""

    @takes_kd_keywords
    def __init__(
        self,
        temperature: float | Tensor = 1.0,
        alpha: float = 0.5,
        *,
        values_are: str | None = None,
        tail: str | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
        validate_args: bool = True,
        **kd_options,
    ):
        super().__init__()
        keywords = dict(kd_options, temperature=temperature, alpha=alpha)
        options = KDOptions.checked(**keywords)
        if values_are is not None or tail is not None:
            check_sparse_options(options, values_are, tail)
        if chunk_size is not None:
            check_int(chunk_size, "chunk_size", 1)
        check_backend_name(backend)
        self._keep(keywords)
        self.chunk_size, self.backend, self.values_are, self.tail = chunk_size, backend, values_are, tail
        self.validate_args = validate_args

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        target: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        teacher_topk: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        sparse = teacher_topk is not None
        return fused_linear_kd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target, student_bias=student_bias,
            teacher_bias=teacher_bias, teacher_topk=teacher_topk, values_are=self.values_are if sparse else None,
            tail=self.tail if sparse else None, chunk_size=self.chunk_size, backend=self.backend,
            validate_args=self.validate_args, **self.keywords(),
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}, {super().extra_repr()}"
