"""The distillation loss, ``alpha T^2 D(p_t, p_s) + (1 - alpha) CE``, as a function and a module.

The path of one call: check the arguments (``fastkd._validate``), pick a backend
(``fastkd._backend``), then either the reference (``fastkd.reference.kd_loss``; autograd differentiates
it) or the kernel: the logits are viewed as rows (N, V) and ``KDLossFunction`` runs one Triton kernel
that writes the row losses and the gradient wrt the student logits in the forward pass; the backward
only scales that gradient by dL/dloss. Inside ``torch.compile`` the kernel is reached through the
``torch.library`` op ``fastkd::kd_loss_fwd`` (eager calls skip the op dispatch). A sparse teacher
(``teacher_topk``) takes the same path with its own kernel (``kernels/kd_loss_topk.py``) and op,
``fastkd::kd_loss_topk_fwd``.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd._backend import resolve_backend
from fastkd._validate import (
    check_choice,
    check_logits,
    check_not_probs,
    check_number,
    check_target,
    check_teacher,
    check_topk,
    check_temperature,
    should_check_values,
)

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("mean", "sum", "batchmean", "none")
LOGIT_NORMS = (None, "standardize", "spherical")


@torch.library.custom_op("fastkd::kd_loss_fwd", mutates_args=())
def _fwd_op(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    t_tensor: Tensor | None,
    t_value: float,
    tt_tensor: Tensor | None,
    tt_value: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    temperature_squared: bool,
    logit_norm: str | None,
    norm_scale: float,
    label_smoothing: float,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastkd.kernels.kd_loss import kd_loss_forward

    rows, grad, later = kd_loss_forward(
        student, teacher, target, t_value if t_tensor is None else t_tensor, tt_value if tt_tensor is None else tt_tensor,
        alpha, divergence, beta, ignore_index, reduction, temperature_squared, logit_norm, norm_scale,
        label_smoothing, need_grad=need_grad,
    )  # fmt: skip
    return rows, grad, (rows.new_ones(()) if later is None else later)


@_fwd_op.register_fake
def _(student, *args):
    return _fwd_op_fake(student, *args)


@torch.library.custom_op("fastkd::kd_loss_topk_fwd", mutates_args=())
def _topk_fwd_op(
    student: Tensor,
    indices: Tensor,
    values: Tensor,
    target: Tensor | None,
    t_tensor: Tensor | None,
    t_value: float,
    tt_tensor: Tensor | None,
    tt_value: float,
    alpha: float,
    divergence: str,
    beta: float,
    ignore_index: int,
    reduction: str,
    temperature_squared: bool,
    label_smoothing: float,
    tail: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from fastkd.kernels.kd_loss_topk import kd_loss_topk_forward

    rows, grad, later = kd_loss_topk_forward(
        student, indices, values, target, t_value if t_tensor is None else t_tensor,
        tt_value if tt_tensor is None else tt_tensor, alpha, divergence, beta, ignore_index, reduction,
        temperature_squared, label_smoothing, tail, need_grad=need_grad,
    )  # fmt: skip
    return rows, grad, (rows.new_ones(()) if later is None else later)


@_topk_fwd_op.register_fake
def _(student, *args):
    return _fwd_op_fake(student, *args)


def _fwd_op_fake(student, *args):
    need_grad = args[-1]
    rows = student.new_empty(student.shape[0], dtype=torch.float32)
    return rows, student.new_empty(student.shape if need_grad else (0, student.shape[1])), rows.new_empty(())


def _split(temperature: float | Tensor) -> tuple[Tensor | None, float]:
    """The op's (tensor, float) pair for a temperature: the schema has no union of the two."""
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, temperature)


def _launch(student: Tensor, teacher: Tensor | tuple[Tensor, Tensor], target: Tensor | None, options: dict,
            inplace: bool, need_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """(row losses, dL/dx, the scale left to the backward) from the dense kernel (``teacher`` (K, N, V))
    or the sparse one (``teacher`` = (indices, values), each (N, k)): called directly in eager mode, and
    through its ``torch.library`` op under ``torch.compile``."""
    o = options
    compiling = torch.compiler.is_compiling()
    temperatures = (o["temperature"], o["teacher_temperature"])
    if compiling:
        temperatures = (*_split(temperatures[0]), *_split(temperatures[1]))
    common = (o["alpha"], o["divergence"], o["beta"], o["ignore_index"], o["reduction"], o["temperature_squared"])
    if isinstance(teacher, tuple):
        args = (student, *teacher, target, *temperatures, *common, o["label_smoothing"], o["tail"])
        if compiling:
            return _topk_fwd_op(*args, need_grad)
        from fastkd.kernels.kd_loss_topk import kd_loss_topk_forward

        return kd_loss_topk_forward(*args, inplace_grad=inplace, need_grad=need_grad)
    args = (student, teacher, target, *temperatures, *common, o["logit_norm"], o["norm_scale"], o["label_smoothing"])
    if compiling:
        return _fwd_op(*args, need_grad)
    from fastkd.kernels.kd_loss import kd_loss_forward

    return kd_loss_forward(*args, inplace_grad=inplace, need_grad=need_grad)


class KDLossFunction(torch.autograd.Function):
    """The loss over rows: student (N, V), teacher (K, N, V) or a sparse teacher (indices, values) (N, k)
    each, target (N,) or None; ``options`` are ``kd_loss``'s keywords after checking (temperatures as
    floats or per-row tensors).

    Forward returns the loss (a scalar, or (N,) for reduction "none") in float32 and keeps
    the gradient the kernel wrote (none when ``options["need_grad"]`` is false); backward scales it in
    place by dL/dloss (free when that is 1), so it runs once per forward. The teacher, target and
    temperatures get no gradient.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor | tuple[Tensor, Tensor], target: Tensor | None,
                options: dict) -> Tensor:  # fmt: skip
        need_grad = options["need_grad"]
        inplace = options["inplace_grad"] and need_grad and not torch.compiler.is_compiling()
        rows, grad, later = _launch(student, teacher, target, options, inplace, need_grad)
        if inplace:  # the logits now hold the gradient: fail any backward that saved them
            ctx.grad = grad
            torch.autograd.graph.increment_version(student)
        else:
            ctx.save_for_backward(grad)
        ctx.later = later  # the reduction's scale, when the kernel left it to the backward (float16)
        ctx.per_row = options["reduction"] == "none"
        ctx.used = False
        return rows if ctx.per_row else rows.sum()  # float32, as the kernel's row losses

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        grad = ctx.grad if hasattr(ctx, "grad") else ctx.saved_tensors[0]
        if ctx.later is not None:
            grad_output = grad_output * ctx.later
        if torch.compiler.is_compiling():
            return grad * (grad_output[:, None] if ctx.per_row else grad_output), None, None, None
        if ctx.used:
            raise RuntimeError("kd_loss's backward scales its saved gradient in place and can run once per forward")
        ctx.used = True
        from fastkd.kernels.kd_loss import scale_grad_

        return scale_grad_(grad, grad_output), None, None, None


def check_options(
    student_logits: Tensor,
    target: Tensor | None,
    *,
    temperature: float | Tensor = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature_squared: bool = True,
    teacher_temperature: float | Tensor | None = None,
    logit_norm: str | None = None,
    norm_scale: float | None = None,
    label_smoothing: float = 0.0,
    validate_args: bool = True,
) -> dict:
    """``kd_loss``'s keywords checked against ``student_logits`` (any leading dims, V classes last; only
    its shape, dtype and device are read) and ``target``, as the options the backends take: floats,
    temperatures as floats or detached tensors of one value or one per row, ``teacher_temperature``
    filled in, ``norm_scale`` defaulted. The defaults are ``kd_loss``'s. Raises the ``TypeError`` /
    ``ValueError`` that ``kd_loss`` documents."""
    if student_logits.shape[-1] == 0:
        raise ValueError("student_logits must have at least one class (the last dimension is 0)")
    check_values = should_check_values(validate_args)
    check_number(alpha, "alpha", 0.0, 1.0)
    check_choice(divergence, DIVERGENCES, "divergence")
    if divergence == "jsd":
        check_number(beta, "beta", 0.0, 1.0, low_open=True, high_open=True)
    check_choice(reduction, REDUCTIONS, "reduction")
    check_choice(logit_norm, LOGIT_NORMS, "logit_norm")
    if norm_scale is not None:
        if logit_norm != "spherical":
            raise ValueError(f"norm_scale applies to logit_norm='spherical', not logit_norm={logit_norm!r}")
        check_number(norm_scale, "norm_scale", 0.0, float("inf"), low_open=True, high_open=True)
    check_number(label_smoothing, "label_smoothing", 0.0, 1.0)
    if not isinstance(temperature_squared, bool):
        raise TypeError(f"temperature_squared must be a bool, got {type(temperature_squared).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if target is None:
        if alpha != 1:
            raise ValueError(f"target=None (pure distillation) needs alpha=1, got alpha={alpha}: no CE term to weigh")
    else:
        check_target(target, student_logits, ignore_index, check_values=check_values)
    dim = student_logits.dim() - 1
    temperature = check_temperature(temperature, student_logits, dim, check_values=check_values)
    if isinstance(temperature, Tensor) and temperature.requires_grad:
        raise ValueError("temperature: kd_loss does not differentiate wrt the temperature; pass temperature.detach()")
    if teacher_temperature is None:
        teacher_temperature = temperature
    else:
        teacher_temperature = check_temperature(
            teacher_temperature, student_logits, dim, check_values=check_values, name="teacher_temperature"
        )
        if isinstance(teacher_temperature, Tensor):
            teacher_temperature = teacher_temperature.detach()
    return dict(
        temperature=temperature, teacher_temperature=teacher_temperature, alpha=float(alpha), divergence=divergence,
        beta=float(beta), ignore_index=ignore_index, reduction=reduction, temperature_squared=temperature_squared,
        logit_norm=logit_norm, norm_scale=2.0 if norm_scale is None else float(norm_scale),
        label_smoothing=float(label_smoothing),
    )  # fmt: skip


# The loss's keywords, for the ops that wrap it (fused-linear, vocab-parallel).
KD_KEYWORDS = tuple(inspect.signature(check_options).parameters)[2:]


VALUES_ARE = ("logprobs", "logits")
TAILS = ("none", "bucket")


def check_sparse_teacher(
    teacher_topk: object, logits: Tensor, target: Tensor | None, options: dict, values_are: str | None,
    tail: str | None, validate_args: bool,
) -> tuple[Tensor, Tensor]:
    """A sparse teacher checked against the loss's ``logits`` (only their shape, dtype and device are
    read), ``target`` and the ``options`` of ``check_options``: its ``values_are`` and ``tail`` (None:
    "logprobs", "none") against each other and the options, then its tensors (``check_topk``, values
    read on the rows not ignored). Sets ``options["tail"]``; returns (indices, values). ``values_are``
    matters to the checks only: the math renormalizes the k entries either way (the tail bucket, for
    log-probabilities only, aside)."""
    values_are = "logprobs" if values_are is None else values_are
    tail = "none" if tail is None else tail
    check_choice(values_are, VALUES_ARE, "values_are")
    check_choice(tail, TAILS, "tail")
    if tail == "bucket" and values_are == "logits":
        raise ValueError("tail='bucket' needs values_are='logprobs': top-k logits do not say how much mass lies "
                         "outside the k entries")  # fmt: skip
    if options["divergence"] == "reverse_kl" and tail == "none":
        raise ValueError("divergence='reverse_kl' with tail='none' is infinite wherever the student puts mass "
                         "outside the teacher's k entries: use tail='bucket' (or forward_kl / jsd)")  # fmt: skip
    if options["logit_norm"] is not None:
        raise ValueError(f"logit_norm={options['logit_norm']!r} needs dense teacher_logits: the statistics of a row "
                         "are not known from k entries")  # fmt: skip
    options["tail"] = tail
    rows = None if target is None else target != options["ignore_index"]
    return check_topk(teacher_topk, logits, values_are, check_values=should_check_values(validate_args), rows=rows)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    target: Tensor | None = None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    values_are: str | None = None,
    tail: str | None = None,
    temperature: float | Tensor = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature_squared: bool = True,
    teacher_temperature: float | Tensor | None = None,
    logit_norm: str | None = None,
    norm_scale: float | None = None,
    label_smoothing: float = 0.0,
    inplace_grad: bool = False,
    backend: str = "auto",
    validate_args: bool = True,
) -> Tensor:
    """Knowledge distillation loss with hard-label cross-entropy; the gradient is computed in the forward.

    Per row (the last dimension holds the V classes; every other dimension indexes rows)::

        loss = alpha * c * D(p_t, p_s) + (1 - alpha) * CE(student_logits, target)
        p_s = softmax(a_s / T),  p_t = mean_k softmax(a_tk / T_t)

    with ``T = temperature``, ``T_t = teacher_temperature`` (default ``T``; e.g. a teacher's fitted
    calibration temperature), and ``c = T**2`` when ``temperature_squared`` (Hinton et al. 2015: the
    soft targets' gradients scale as 1/T^2, so this keeps the KD term's weight independent of T), else 1.

    Args:
        student_logits: (N, V) or (B, S, V) (any leading dims), float16/bfloat16/float32/float64,
            any strides. Math in float32 (float64 for float64), and the loss is returned in that dtype
            (as ``F.cross_entropy`` under autocast: a float16/bfloat16 loss would round it); the
            gradient has the student's dtype.
        teacher_logits: the student's shape, or (K,) + it for an ensemble of K teachers whose
            distribution is the mean of the members' tempered softmaxes. Any float dtype. Detached: the
            teacher gets no gradient.
        target: int64 (or int32) class indices of the student's shape without V, or None for pure
            distillation (then ``alpha`` must be 1). A row whose target is ``ignore_index`` contributes
            to neither term.
        temperature: T > 0: a float, a one-element tensor or a tensor of one value per row. Not
            differentiated (a tensor that requires grad is an error).
        alpha: weight of the KD term in [0, 1]; the CE term gets 1 - alpha.
        divergence: ``"forward_kl"`` KL(p_t || p_s); ``"reverse_kl"`` KL(p_s || p_t); ``"jsd"``
            beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s, 0 < beta < 1.
        reduction: ``"mean"`` over the rows not ignored (0, with zero gradient, when all are);
            ``"sum"``; ``"batchmean"`` the sum over all rows; ``"none"`` per-row losses, the row shape.
        teacher_temperature: T_t > 0 as ``temperature``, or None for T. A tensor is detached.
        logit_norm: the per-row normalization a of student and teacher logits before the tempered
            softmax of the KD term, over the classes whose logit is not -inf: None (a = z);
            ``"standardize"`` a = (z - mean) / (std + 1e-7), unbiased std (Logit Standardization KD,
            Sun et al., CVPR 2024); ``"spherical"`` a = norm_scale (z - mean) / (||z - mean|| + 1e-7)
            (Spherical KD, Guo et al., arXiv 2010.07485). The CE term always uses the raw student
            logits (no temperature, no normalization).
        norm_scale: the norm of spherical logits (default 2); only with ``logit_norm="spherical"``.
        label_smoothing: eps in [0, 1] of the CE term, as in ``F.cross_entropy``: (1 - eps) CE(y) +
            eps mean_j CE(j) (infinite when a class is masked with -inf, as there).
        inplace_grad: write the gradient into ``student_logits`` (saving N*V memory): the logits are
            overwritten, so use it only when nothing else needs them; they must be viewable as rows
            of unit column stride. Kernels only (the reference ignores it), and eager only: under
            ``torch.compile`` the gradient gets its own buffer.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastkd._backend``).
        validate_args: check target values (in [0, V) or ``ignore_index``), tensor temperatures, and
            that the logits are not probabilities (first rows all in [0, 1], each summing to 1: a
            softmax of them would be a plausible wrong answer) before any kernel runs (a host sync on
            CUDA). Unchecked (and inside ``torch.compile``), an out-of-range target gives a NaN row; a
            bad tensor temperature, NaN rows.

    Masked classes (-inf logits) get probability 0. A student row of all -inf logits gives NaN. Where
    the teacher puts mass on a class the student masks, forward KL is infinite (as its math says).

    **Sparse teachers.** ``teacher_topk=(indices, values)`` replaces ``teacher_logits`` with a teacher
    given at k entries per row (1 <= k <= V), as offline top-k log-probabilities (vLLM-style servers)
    are: ``indices`` int64/int32 and ``values`` float, each (..., k) with the student's leading shape.
    The distributions compared are over k + 1 classes: the k entries I and the bucket R of all others.

        teacher   log p_I = log_softmax(v / T_t) over I; p_R = 0            (tail="none")
                  log p = log_softmax([v, ln(1 - sum_I e^v)] / T_t)         (tail="bucket", log-probs)
        student   q_j = softmax(a_s / T)_j for j in I (the full row's softmax),  q_R = sum_{j not in I} q_j

    ``values_are="logprobs"`` (default): v = log p_t at temperature 1, as stored. With ``tail="none"``
    (default) the k entries are renormalized, and the student is pushed to put its mass on them
    (forward KL = sum_I p_j (log p_j - log q_j)). ``tail="bucket"`` keeps the teacher's missing mass
    1 - sum_I e^v as one class, matched against the student's mass outside I; tempered with the k
    entries as one class (exact at T_t = 1, where the stored log-probs stay as they are; at T_t != 1
    how the missing mass spreads is unknown, so the bucket is tempered as a single class). With k = V
    no class is left for the bucket, and it is dropped. ``values_are="logits"``: v are the teacher's
    logits at I, tempered and renormalized over I (``tail="none"`` only: logits carry no normalizer).
    Reverse KL needs the bucket (KL(q || p) is infinite where the student has mass and p_R = 0), and
    ``logit_norm`` a dense teacher. Indices are checked to be distinct and in [0, V), log-probabilities
    <= 0 summing to at most 1 (``validate_args``); unchecked, an index outside [0, V) gives a NaN row
    and a repeated one a wrong loss. One kernel reads the student's row (twice when wider than 4096
    columns) and the k entries, and writes the loss and the gradient, like the dense kernel.
    """
    check_logits(student_logits, "student_logits")
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one teacher: teacher_logits (dense) or teacher_topk=(indices, values)")
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")
    options = check_options(
        student_logits, target, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
        ignore_index=ignore_index, reduction=reduction, temperature_squared=temperature_squared,
        teacher_temperature=teacher_temperature, logit_norm=logit_norm, norm_scale=norm_scale,
        label_smoothing=label_smoothing, validate_args=validate_args,
    )  # fmt: skip
    fix = "kd_loss takes logits (log-probabilities are logits too: pass p.log())"
    check_not_probs(student_logits, "student_logits", check_values=should_check_values(validate_args), fix=fix)
    if teacher_topk is None:
        n_teachers = check_teacher(teacher_logits, student_logits)
        for name, value in (("values_are", values_are), ("tail", tail)):
            if value is not None:
                raise ValueError(f"{name} applies to a sparse teacher (teacher_topk), not to teacher_logits")
        check_not_probs(teacher_logits, "teacher_logits", check_values=should_check_values(validate_args), fix=fix)
    else:
        teacher_topk = check_sparse_teacher(teacher_topk, student_logits, target, options, values_are, tail,
                                            validate_args)  # fmt: skip

    if resolve_backend(backend, student_logits) == "torch":
        return reference.kd_loss(student_logits, teacher_logits, target, teacher_topk=teacher_topk, **options)
    n_classes = student_logits.shape[-1]
    options["need_grad"] = torch.is_grad_enabled() and student_logits.requires_grad
    options["inplace_grad"] = inplace_grad
    if inplace_grad:
        base = student_logits if student_logits._base is None else student_logits._base
        if base.is_leaf and base.requires_grad:
            raise ValueError("student_logits: inplace_grad=True would overwrite a leaf that requires grad (a "
                             "parameter, or a view of one)")  # fmt: skip
        try:
            student = student_logits.view(-1, n_classes)
        except RuntimeError:
            student = None
        if student is None or student.stride(1) != 1 or (student.shape[0] > 1 and student.stride(0) < n_classes):
            raise ValueError(
                "student_logits: inplace_grad=True needs logits viewable as rows (N, V) that do not overlap, "
                f"with a unit stride along the classes; got strides {student_logits.stride()}"
            )
    else:
        student = student_logits.reshape(-1, n_classes)
    if teacher_topk is None:
        teacher = teacher_logits.detach().reshape(n_teachers, -1, n_classes)
    else:
        k = teacher_topk[0].shape[-1]
        teacher = (teacher_topk[0].reshape(-1, k), teacher_topk[1].detach().reshape(-1, k))
    for key in ("temperature", "teacher_temperature"):
        if isinstance(options[key], Tensor) and options[key].dim() > 0:
            options[key] = options[key].reshape(-1)  # one per row; may keep a stride, which the kernel takes
    loss = KDLossFunction.apply(student, teacher, None if target is None else target.reshape(-1).contiguous(), options)
    return loss.reshape(student_logits.shape[:-1]) if reduction == "none" else loss


class KDLoss(nn.Module):
    """``kd_loss`` as a module: the keywords are set once, the call takes (student, teacher, target),
    the teacher as logits or as a sparse teacher (indices, values) (``kd_loss``'s ``teacher_topk``,
    with the module's ``values_are`` and ``tail``).

    A tensor temperature is registered as a buffer, so it follows the module's ``.to()`` and
    ``state_dict``.
    """

    def __init__(
        self,
        temperature: float | Tensor = 1.0,
        alpha: float = 0.5,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        temperature_squared: bool = True,
        teacher_temperature: float | Tensor | None = None,
        logit_norm: str | None = None,
        norm_scale: float | None = None,
        label_smoothing: float = 0.0,
        values_are: str | None = None,
        tail: str | None = None,
        inplace_grad: bool = False,
        backend: str = "auto",
        validate_args: bool = True,
    ):
        super().__init__()
        for name, value in (("temperature", temperature), ("teacher_temperature", teacher_temperature)):
            if isinstance(value, Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)
        self.alpha, self.divergence, self.beta, self.ignore_index = alpha, divergence, beta, ignore_index
        self.reduction, self.temperature_squared = reduction, temperature_squared
        self.logit_norm, self.norm_scale, self.label_smoothing = logit_norm, norm_scale, label_smoothing
        self.values_are, self.tail = values_are, tail
        self.inplace_grad, self.backend, self.validate_args = inplace_grad, backend, validate_args

    def forward(self, student_logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor],
                target: Tensor | None = None) -> Tensor:  # fmt: skip
        sparse = isinstance(teacher, (tuple, list))
        return kd_loss(
            student_logits, None if sparse else teacher, target, teacher_topk=teacher if sparse else None,
            values_are=self.values_are if sparse else None, tail=self.tail if sparse else None,
            temperature=self.temperature, alpha=self.alpha,
            divergence=self.divergence, beta=self.beta, ignore_index=self.ignore_index, reduction=self.reduction,
            temperature_squared=self.temperature_squared, teacher_temperature=self.teacher_temperature,
            logit_norm=self.logit_norm, norm_scale=self.norm_scale, label_smoothing=self.label_smoothing,
            inplace_grad=self.inplace_grad, backend=self.backend, validate_args=self.validate_args,
        )  # fmt: skip

    def extra_repr(self) -> str:
        t = "tensor" if isinstance(self.temperature, Tensor) else self.temperature
        return f"temperature={t}, alpha={self.alpha}, divergence={self.divergence!r}, reduction={self.reduction!r}"
