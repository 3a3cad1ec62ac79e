"""The distillation loss, ``alpha T^2 D(p_t, p_s) + (1 - alpha) CE``, as a function and a module.

The path of one call: the arguments are checked (``fastkd._validate``) into one ``KDOptions``
(``fastkd._options``); the backend's implementation is resolved (``fastkd._backend``); the logits are
viewed as rows (N, V) and ``KDLossFunction`` has the implementation write the row losses and the
gradient wrt the student logits in the forward pass (``fastkd._ops.kd_forward``: outputs allocated
once, for every backend); the backward only scales that gradient by dL/dloss. A sparse teacher
(``teacher_topk``) takes the same path through the implementation's ``kd_loss_topk_forward``. Where
the backend's ``kd_loss_split`` says so (Triton: rows wider than one block, one teacher), the forward
writes the row losses and a few statistics per row, and the backward the gradient times dL/dloss
(``fastkd._ops.kd_split_forward``, ``kd_split_backward``): the same autograd contract.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from fastkd._autograd import first_order
from fastkd._backend import check_backend_name, resolve_backend
from fastkd._ops import kd_forward, kd_split, kd_split_backward, kd_split_forward
from fastkd._options import KDKeywords, KDOptions, check_sparse_options, dense_teacher_only, takes_kd_keywords
from fastkd._validate import check_logits, check_not_probs, check_teacher, check_topk, should_check_values

ONCE = ("kd_loss's backward can run once per forward, on every backend (it scales its saved gradient in place: a "
        "second backward(retain_graph=True) would scale it twice)")  # fmt: skip
PROBS_FIX = "kd_loss takes logits (log-probabilities are logits too: pass p.log())"


class KDLossFunction(torch.autograd.Function):
    """The loss over rows: student (N, V), teacher (K, N, V) or a sparse teacher (indices, values) (N, k)
    each, target (N,) or None, bound ``options``, the backend's implementation ``impl``; with
    ``inplace`` the gradient is written into the student (which must have a unit column stride), and
    without ``need_grad`` it is not written at all.

    Forward returns the loss (a scalar, or (N,) for reduction "none") in float32 (float64 for float64
    logits), followed by its KD and CE parts (reduced alike, not differentiable: for logging) with
    ``options.return_parts``, and keeps the gradient the implementation wrote; backward scales it in
    place by dL/dloss (free when that is 1), so it runs once per forward. The teacher, target and
    temperatures get no gradient.

    Split (``fastkd._ops.kd_split``: the backend's rule, a gradient wanted, not ``inplace``): forward
    writes the row losses and (N, impl.KD_STATS) float32 statistics, and saves the student and the
    teacher (as the kernels read them: a copy only where a row's classes were not contiguous) for the
    backward, which writes the gradient once, times dL/dloss, where the fused path re-reads and
    re-writes it. Memory held from forward to backward: the fused path holds the gradient (N x V in the
    student's dtype), the split holds the student and the teacher (2 x N x V, of which the student is
    often held by autograd anyway, and the teacher often not) and the statistics (44 bytes a row). The
    contract is the same: one backward per forward, no second derivative.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor | tuple[Tensor, Tensor], target: Tensor | None,
                options: KDOptions, impl: ModuleType, inplace: bool,
                need_grad: bool) -> Tensor | tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        inplace = inplace and need_grad and not torch.compiler.is_compiling()
        ctx.per_row = options.reduction == "none"
        ctx.used = False
        ctx.split = kd_split(impl, student, teacher, target, options, inplace, need_grad)
        if ctx.split:  # the gradient written in the backward, times dL/dloss (``kd_split_forward``)
            rows, stats, scale, student, teacher = kd_split_forward(impl, student, teacher, target, options)
            ctx.save_for_backward(student, teacher, target, stats, scale if isinstance(scale, Tensor) else None)
            ctx.impl, ctx.options, ctx.scale = impl, options, scale if not isinstance(scale, Tensor) else None
            return rows if ctx.per_row else rows.sum()
        out = kd_forward(impl, student, teacher, target, options, inplace, need_grad)
        if inplace:  # the logits now hold the gradient: fail any backward that saved them
            ctx.grad = out.grad
            torch.autograd.graph.increment_version(student)
        else:
            ctx.save_for_backward(out.grad)
        ctx.impl, ctx.later = impl, out.later  # the reduction's scale, when left to the backward (float16)
        loss = out.rows if ctx.per_row else out.rows.sum()
        if not options.return_parts:
            return loss
        kd, ce = out.parts if ctx.per_row else out.parts.sum(-1)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @first_order("kd_loss")
    def backward(ctx, grad_output: Tensor, *_parts: Tensor):
        if ctx.split:  # the saved tensors are read, not written: only the contract limits it to one backward
            if ctx.used:
                raise RuntimeError(ONCE)
            ctx.used = not torch.compiler.is_compiling()
            student, teacher, target, stats, scale = ctx.saved_tensors
            scale = ctx.scale if scale is None else scale
            return kd_split_backward(ctx.impl, student, teacher, target, ctx.options, stats, scale,
                                     grad_output), *[None] * 6  # fmt: skip
        grad = ctx.grad if hasattr(ctx, "grad") else ctx.saved_tensors[0]
        if ctx.later is not None:
            grad_output = grad_output * ctx.later
        if torch.compiler.is_compiling():
            return (grad * (grad_output[:, None] if ctx.per_row else grad_output)).to(grad.dtype), *[None] * 6
        if ctx.used:
            raise RuntimeError(ONCE)
        ctx.used = True
        ctx.impl.scale_grad_(grad, grad_output)
        return grad, *[None] * 6


def check_sparse_teacher(teacher_topk: object, logits: Tensor, target: Tensor | None, options: KDOptions,
                         values_are: str | None, tail: str | None,
                         validate_args: bool) -> tuple[tuple[Tensor, Tensor], KDOptions]:  # fmt: skip
    """A sparse teacher checked against the loss's ``logits`` (only their shape, dtype and device are
    read), ``target`` and ``options``: its ``values_are`` and ``tail`` (``check_sparse_options``), then
    its tensors (``check_topk``, values read on the rows not ignored). Returns ((indices, values), the
    options with the tail)."""
    options, values_are = check_sparse_options(options, values_are, tail)
    rows = None if target is None else target != options.ignore_index
    topk = check_topk(teacher_topk, logits, values_are, check_values=should_check_values(validate_args), rows=rows)
    return topk, options


@takes_kd_keywords
def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    target: Tensor | None = None,
    *,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    values_are: str | None = None,
    tail: str | None = None,
    inplace_grad: bool = False,
    backend: str = "auto",
    validate_args: bool = True,
    **kd_options,
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
        divergence: D(p, q) of the teacher's p = p_t and the student's q = p_s:
            ``"forward_kl"`` KL(p || q); ``"reverse_kl"`` KL(q || p);
            ``"jsd"`` beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, 0 < beta < 1
            (TRL's and Liger's beta = 0 and 1 are ``"forward_kl"`` and ``"reverse_kl"``);
            ``"skew_kl"`` KL(p || skew p + (1 - skew) q) and ``"skew_reverse_kl"`` KL(q || (1 - skew) p +
            skew q), 0 <= skew < 1 (DistiLLM, Ko et al. 2024; skew 0 is the plain KL);
            ``"tvd"`` 1/2 sum_j |p_j - q_j|;
            ``"ab"`` the alpha-beta divergence D_AB^(ab_alpha, ab_beta)(p || q) (ABKD, Wang et al.,
            ICML 2025; ``reference.ab_divergence``), ab_alpha, ab_beta >= 0, not both 0: (1, 0) is
            forward KL, (0, 1) reverse KL, and its limits are continuous;
            ``"dkd"`` Decoupled KD (Zhao et al., CVPR 2022): dkd_alpha TCKD + dkd_beta NCKD, the
            target-vs-rest binary KL and the KL among the non-target classes (needs a target and a
            dense teacher; with T^2 as Hinton's, so ``alpha * c * D`` is DKD's loss).
        reduction: ``"mean"``: the sum over the rows divided by the number of rows not ignored (0,
            with zero gradient, when all are); ``"sum"``; ``"batchmean"``: the sum divided by the
            number of rows N, ignored ones included (``F.kl_div``'s divisor, ``input.size(0)``, for
            (N, V) logits; for (B, S, V) every row of B x S counts); ``"none"``: per-row losses, the
            row shape (0 on ignored rows).
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
        skew, ab_alpha, ab_beta, dkd_alpha, dkd_beta: the parameters of ``divergence`` above (defaults
            0.1; 1 and 0; 1 and 8, mdistiller's).
        softcap: c > 0 caps student and teacher logits at c tanh(z / c) (Gemma 2's
            ``final_logit_softcapping``) before anything else, the CE term included; the gradient
            goes through the tanh; -inf stays masked. None (default): no cap.
        normalizer: a count (a number or a one-element tensor, > 0) that divides the summed loss in
            place of the reduction's divisor (not with ``"none"``): pass a gradient-accumulation
            step's total of counted rows (HF Trainer's ``num_items_in_batch``) and the micro-batches
            add up to the loss of one batch of them all.
        return_parts: return (loss, KD part, CE part): the parts c D and CE reduced as the loss
            (loss = alpha KD + (1 - alpha) CE), both computed whatever alpha (CE needs a target; 0
            without one), from the same call, not differentiable (for logging: backpropagate the
            loss). A part whose weight is 0 is reported as it is, +inf included (a divergence that is
            infinite on these rows), and adds nothing to the loss or its gradient (no 0 x inf).
        inplace_grad: write the gradient into ``student_logits`` (saving N*V memory): the logits are
            overwritten, so use it only when nothing else needs them; they must be viewable as rows
            of unit column stride. Kernels only (the reference ignores it), and eager only: under
            ``torch.compile`` the gradient gets its own buffer.
        backend: ``"auto"`` or a registered backend's name: ``"triton"``, ``"torch"`` (see
            ``fastkd._backend``).
        validate_args: check target values (in [0, V) or ``ignore_index``), tensor temperatures, and
            that the logits are not probabilities (first rows all in [0, 1], each summing to 1: a
            softmax of them would be a plausible wrong answer) before any kernel runs (a host sync on
            CUDA). Unchecked (and inside ``torch.compile``), an out-of-range target gives a NaN row; a
            bad tensor temperature, NaN rows.

    Masked classes (-inf logits) get probability 0. A counted row of all -inf logits, or one holding
    NaN, gives NaN (loss and gradient; NaN in, NaN out). Where the teacher puts mass on a class the
    student masks, forward KL is infinite (as its math says).

    **Autograd.** Every backend computes the gradient in the forward and keeps it; the backward scales
    it in place by dL/dloss, so it runs once per forward (a second ``backward(retain_graph=True)``
    raises), and there is no second derivative (``create_graph=True`` gives a gradient whose own
    backward raises, naming the op). The teacher, the target and the temperatures get no gradient.

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
    check_values = should_check_values(validate_args)
    options = KDOptions.checked(**kd_options).bind(student_logits, target, check_values=check_values)
    check_not_probs(student_logits, "student_logits", check_values=check_values, fix=PROBS_FIX)
    n_classes = student_logits.shape[-1]
    if teacher_topk is None:
        n_teachers = check_teacher(teacher_logits, student_logits)
        dense_teacher_only(values_are, tail, "teacher_logits")
        check_not_probs(teacher_logits, "teacher_logits", check_values=check_values, fix=PROBS_FIX)
        teacher = teacher_logits.detach().reshape(n_teachers, -1, n_classes)
    else:
        (indices, values), options = check_sparse_teacher(teacher_topk, student_logits, target, options, values_are,
                                                          tail, validate_args)  # fmt: skip
        k = indices.shape[-1]
        teacher = (indices.reshape(-1, k), values.detach().reshape(-1, k))
    impl = resolve_backend(backend, student_logits)
    if inplace_grad:
        student = _inplace_rows(student_logits)
    else:
        student = student_logits.reshape(-1, n_classes)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss = KDLossFunction.apply(student, teacher, None if target is None else target.reshape(-1).contiguous(),
                                options, impl, inplace_grad, need_grad)  # fmt: skip
    if options.reduction != "none":
        return loss
    if options.return_parts:
        return tuple(part.reshape(student_logits.shape[:-1]) for part in loss)
    return loss.reshape(student_logits.shape[:-1])


def _inplace_rows(student_logits: Tensor) -> Tensor:
    """The logits as rows (N, V) that the gradient may overwrite: not a parameter or a view of one, and
    viewable as rows of unit column stride that do not overlap."""
    base = student_logits if student_logits._base is None else student_logits._base
    if base.is_leaf and base.requires_grad:
        raise ValueError("student_logits: inplace_grad=True would overwrite a leaf that requires grad (a "
                         "parameter, or a view of one)")  # fmt: skip
    n_classes = student_logits.shape[-1]
    try:
        student = student_logits.view(-1, n_classes)
    except RuntimeError:
        student = None
    if student is None or student.stride(1) != 1 or (student.shape[0] > 1 and student.stride(0) < n_classes):
        raise ValueError(
            "student_logits: inplace_grad=True needs logits viewable as rows (N, V) that do not overlap, "
            f"with a unit stride along the classes; got strides {student_logits.stride()}"
        )
    return student


class KDLoss(KDKeywords):
    """``kd_loss`` as a module: the keywords are set (and checked) once, the call takes (student,
    teacher, target), the teacher as logits or as a sparse teacher (indices, values) (``kd_loss``'s
    ``teacher_topk``, with the module's ``values_are`` and ``tail``).

    A tensor temperature is registered as a buffer, so it follows the module's ``.to()`` and
    ``state_dict``.
    """

    @takes_kd_keywords
    def __init__(
        self,
        temperature: float | Tensor = 1.0,
        alpha: float = 0.5,
        *,
        values_are: str | None = None,
        tail: str | None = None,
        inplace_grad: bool = False,
        backend: str = "auto",
        validate_args: bool = True,
        **kd_options,
    ):
        super().__init__()
        keywords = dict(kd_options, temperature=temperature, alpha=alpha)
        options = KDOptions.checked(**keywords)
        if values_are is not None or tail is not None:
            check_sparse_options(options, values_are, tail)
        if not isinstance(inplace_grad, bool):
            raise TypeError(f"inplace_grad must be a bool, got {type(inplace_grad).__name__}")
        check_backend_name(backend)
        self._keep(keywords)
        self.values_are, self.tail = values_are, tail
        self.inplace_grad, self.backend, self.validate_args = inplace_grad, backend, validate_args

    def forward(self, student_logits: Tensor, teacher: Tensor | tuple[Tensor, Tensor],
                target: Tensor | None = None) -> Tensor:  # fmt: skip
        sparse = isinstance(teacher, (tuple, list))
        return kd_loss(
            student_logits, None if sparse else teacher, target, teacher_topk=teacher if sparse else None,
            values_are=self.values_are if sparse else None, tail=self.tail if sparse else None,
            inplace_grad=self.inplace_grad, backend=self.backend, validate_args=self.validate_args, **self.keywords(),
        )  # fmt: skip
