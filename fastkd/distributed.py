"""Vocab-parallel distillation: ``kd_loss`` of logits sharded over the vocabulary across the ranks of a
process group (Megatron-style tensor parallelism), without ever gathering the (N, V) logits.

Rank r of P holds the columns [o_r, o_r + V_r) of the student's and the teacher's logits, (..., V_r),
with o_r = V_0 + ... + V_{r-1} in rank order within the group and V = V_0 + ... + V_{P-1}. The widths
may differ (V = 101 over P = 2 is 51 + 50): each call all-gathers them, so no rank needs to be told the
split. Every rank passes the same leading dims, the same target (global class indices) and the same
keywords. A row's loss depends on its columns only through a few row statistics, each a max or a sum
over the columns; each rank reduces its own columns, the partial statistics are combined over the group,
and each rank writes the gradient of its own columns, locally. The loss is the same on every rank, and
the gradient wrt a rank's shard is those columns of ``kd_loss``'s gradient on the full logits.

The math is the PyTorch backend's closed form (``fastkd.backends.torch_kd``, whose module doc states
it), with the partial row statistics combined over the group:

Three collectives per call (two when alpha = 0; four for DKD, whose target and non-target masses are
row sums too), each on a small (k, N) tensor of row statistics, k <= 8, never on logits; then one host
sync (the widths, as Python ints):

  1. all_gather, in float64: this rank's width V_r and, per row, the max of its student and teacher
     logits and, with ``logit_norm``, the (count, mean, M2) of their live entries. Gives the offsets and
     V (the widths are all-gathered on every call: uneven shards, even a rank of no column, need no
     setup), the global maxes (the max over ranks) and the global moments (Chan et al.'s merge of the
     ranks' (n, mean, M2): no cancellation, as sum x^2 - n mean^2 would have).
  2. all_reduce SUM: sum_j e^(u_j) of the student at k_s and the teacher at k_t, sum_j e^(x_j - max x)
     (CE), the target logit x_y (the owning rank contributes it, the others 0) and, with label smoothing,
     sum_j x_j.
  3. all_reduce SUM (alpha > 0): the partial row sums of D, of G = sum g and, with ``logit_norm``, of
     g c, q c, q and c.

No collective runs in the backward, which only scales the saved gradient by dL/dloss (row by row for
reduction "none"). Without a process group (or with P = 1) no collective runs and the result is
``kd_loss``'s.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from fastkd import reference
from fastkd._autograd import first_order
from fastkd._options import KDOptions, takes_kd_keywords
from fastkd._validate import check_logits, should_check_values
from fastkd.backends.torch_kd import Collectives, RowLosses, dense_rows


def _world(group) -> tuple[int, int]:
    """(this process's rank in ``group``, P); (0, 1) when no process group is initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed has no process group initialized")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of group")
    return rank, dist.get_world_size(group)


class _GroupCollectives(Collectives):
    """The partial row statistics combined over the ranks of ``group``."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = _world(group)

    def gather(self, local: Tensor) -> Tensor:
        if self.world == 1:
            return local[None]
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local.contiguous(), group=self.group)
        return torch.stack(out)

    def reduce_sum(self, local: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.group)
        return local


def _shard_loss(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions, check, group,
                need_grad: bool) -> tuple[RowLosses, Tensor | None, Tensor | int]:  # fmt: skip
    """(row losses (N,) and their parts, ``RowLosses``, in the compute dtype, zero on ignored rows; dL/d
    student (N, V_r) of the reduced
    loss in the compute dtype, or None; the reduction's divisor, a 0-d tensor for "mean", which counts
    the rows not ignored without a host sync) of the rows ``student`` and ``teacher`` (N, V_r) and
    ``target`` (N,) or None. ``options`` come from the checks that read no data; ``check(V)`` runs those
    that do, against the global V, once collective 1 has told it."""
    dtype = reference.compute_dtype(student.dtype)
    rows, grad, valid = dense_rows(student.detach().to(dtype), teacher.detach().to(dtype)[None], target, options,
                                   need_grad, _GroupCollectives(group), check)  # fmt: skip
    n_rows = student.shape[0]
    divisor = 1
    if options.normalizer is not None:
        divisor = options.normalizer
    elif options.reduction == "mean":
        divisor = valid.sum().clamp_min(1)
    elif options.reduction == "batchmean":
        divisor = max(n_rows, 1)
    if grad is not None:
        grad = grad / divisor
    return rows, grad, divisor


class VocabParallelKDFunction(torch.autograd.Function):
    """The loss of vocabulary shards (any leading dims): forward runs the collectives and keeps this
    shard's gradient in the student's dtype; backward scales it by dL/dloss, row by row for reduction
    "none" (no collective). The teacher and the target get no gradient."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, target: Tensor | None, options: dict, check, group,
                need_grad: bool) -> Tensor:  # fmt: skip
        lead = student.shape[:-1]
        shape = (lead.numel(), student.shape[-1])  # rows; V_r may be 0
        y = None if target is None else target.reshape(-1)
        rows, grad, divisor = _shard_loss(student.reshape(shape), teacher.reshape(shape), y, options, check,
                                          group, need_grad)  # fmt: skip
        if grad is not None:
            ctx.save_for_backward(grad.to(student.dtype).reshape(student.shape))
        ctx.per_row = options.reduction == "none"
        parts = [part.reshape(lead) if ctx.per_row else part.sum() / divisor for part in rows]
        if not options.return_parts:
            return parts[0]  # in the compute dtype, as kd_loss's
        ctx.mark_non_differentiable(*parts[1:])
        return tuple(parts)

    @staticmethod
    @first_order("vocab_parallel_kd_loss")
    def backward(ctx, grad_output: Tensor, *_parts: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output[..., None] if ctx.per_row else grad_output), *[None] * 6


@takes_kd_keywords
def vocab_parallel_kd_loss(
    student_shard: Tensor,
    teacher_shard: Tensor,
    target: Tensor | None = None,
    *,
    group=None,
    validate_args: bool = True,
    **kd_options,
) -> Tensor:
    """``fastkd.kd_loss(student, teacher, target, ...)`` of logits sharded over the vocabulary
    across the ranks of ``group`` (module doc): the same loss on every rank, and the gradient of this
    rank's columns.

    Args:
        student_shard: (..., V_r): this rank's columns [o_r, o_r + V_r) of the student's logits, any
            leading dims (the same on every rank), float16/bfloat16/float32/float64. The widths V_r may
            differ between ranks (uneven shards); each call all-gathers them to find o_r and V.
        teacher_shard: the teacher's same columns, the student's shape (an ensemble of teachers is not
            supported). Detached.
        target: the GLOBAL class indices (in [0, V) or ``ignore_index``) of the leading shape, the same
            on every rank; or None for pure distillation (alpha=1).
        group: the process group the vocabulary is sharded over; None for the default group. Without an
            initialized process group the call is ``kd_loss`` on one process (P = 1).
        temperature, alpha, divergence, beta, ignore_index, reduction, temperature_squared,
            teacher_temperature, logit_norm, norm_scale, label_smoothing, validate_args: ``kd_loss``'s
            keywords, with its defaults and checks (a temperature is a float, or a tensor of one value
            or one per row).

    Returns the loss in float32 (float64 for float64 shards), as ``kd_loss``: 0-d, or the leading shape for
    reduction "none".

    Checks that read no data (types, shapes, choices, float temperatures) raise before any collective;
    those that read tensors (a target outside [0, V) for the global V, a bad tensor temperature) run
    after the first collective and raise on every rank alike. Three collectives per call, two when
    alpha = 0, plus one host sync for the widths; see the module doc.
    """
    check_logits(student_shard, "student_shard")
    check_logits(teacher_shard, "teacher_shard")
    if teacher_shard.shape != student_shard.shape:
        raise ValueError(f"teacher_shard must have student_shard's shape {tuple(student_shard.shape)} "
                         "(an ensemble of teachers is not supported); "
                         f"got {tuple(teacher_shard.shape)}")  # fmt: skip
    if teacher_shard.device != student_shard.device:
        raise ValueError(f"teacher_shard is on {teacher_shard.device} but student_shard is on "
                         f"{student_shard.device}")  # fmt: skip
    _world(group)
    lead = student_shard.shape[:-1]

    def stand_in(n_classes: int) -> Tensor:  # the full logits' shape, dtype and device; no memory
        return student_shard.new_zeros(()).expand(*lead, n_classes)

    # The checks that read no data, before any collective: the global V is not known yet (any width
    # does for them; this rank may even hold no column).
    options = KDOptions.checked(**kd_options)
    bound = options.bind(stand_in(max(student_shard.shape[-1], 1)), target, check_values=False)

    def check(n_classes: int) -> None:  # the checks that read data, against the global V
        options.bind(stand_in(n_classes), target, check_values=should_check_values(validate_args))
    need_grad = torch.is_grad_enabled() and student_shard.requires_grad
    return VocabParallelKDFunction.apply(student_shard, teacher_shard.detach(), target, bound, check, group,
                                         need_grad)  # fmt: skip
