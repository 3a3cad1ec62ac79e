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

The math, per row, in float32 (float64 for float64 inputs), as in ``fastkd.kernels.kd_loss``: with
c = x - mean x over the n live (not -inf) entries, r and kappa the normalization's factor and derivative
scale (r = 1 without ``logit_norm``; see ``_norm_factor``),

    u = (x - max x) k_s,  k_s = r_s / T,   log q = u - ln sum_j e^(u_j)       student at T
    log p likewise from the teacher at k_t = r_t / T_t;  log s = log_softmax(x)  (CE, at 1)
    loss = alpha c_T D(p, q) + (1 - alpha) [(1 - eps)(-log s_y) + eps mean_j(-log s_j)]

and, with g_j = dD/d(log q_j) taken entry by entry (p and the other log q_k fixed),

    forward_kl  g = -p;   reverse_kl  g = q h, h = log q - log p;   jsd  g = (1 - beta) q h, h = log q - log m
    e_j = dD/du_j = g_j - q_j G,  G = sum_k g_k          (log_softmax's chain rule; adding a multiple of q to
                                                           g changes no e, as sum q = 1: reverse KL's exact
                                                           g = q (h + 1) is taken as q h)
    dD/dx_j = k_s (e_j - c_j W - mean_k (e_k - c_k W)),  W = r_s sum_k e_k c_k / kappa   (logit_norm)
    dD/dx_j = k_s e_j                                                                   (without)
    dCE/dx_j = s_j - (1 - eps) [j = y] - eps / V

Three collectives per call (two when alpha = 0), each on a small (k, N) tensor of row statistics, k <= 8,
never on logits; then one host sync (the widths, as Python ints):

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

import math

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd._validate import check_logits
from fastkd.kd_loss import KD_KEYWORDS, check_options


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


def _all_gather(local: Tensor, group, world: int) -> Tensor:
    """(P,) + local.shape: every rank's ``local``, in rank order."""
    if world == 1:
        return local[None]
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local.contiguous(), group=group)
    return torch.stack(out)


def _all_reduce_sum(local: Tensor, group, world: int) -> Tensor:
    """``local`` summed over the ranks, in place."""
    if world > 1:
        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
    return local


def _row_max(z: Tensor) -> Tensor:
    """max over the last dim; -inf for a shard of no columns."""
    return z.amax(-1) if z.shape[-1] else z.new_full(z.shape[:-1], -math.inf)


def _moments(z: Tensor, z_max: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(n, mean, M2) of each row's live (not -inf) entries, M2 = sum (z - mean)^2; the mean in float64.

    Taken of z - max z (exact for the entries near the max) and shifted back in float64: a mean rounded
    to float32 directly is off by eps |mean|, which the merge's n (mean_r - mean)^2 would carry into M2
    where the row is nearly constant (its spread much smaller than its mean)."""
    live = ~torch.isneginf(z)
    shift = torch.where(torch.isfinite(z_max), z_max, 0.0)
    y = z - shift[:, None]
    n = live.sum(-1).to(z.dtype)
    mean = torch.where(live, y, 0.0).sum(-1) / n.clamp_min(1)
    c = torch.where(live, y - mean[:, None], 0.0)
    return n, mean.double() + shift.double(), (c * c).sum(-1)


def _merge_moments(n: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The moments of the whole rows from the ranks' (P, N) ones (Chan et al.)."""
    total = n.sum(0)
    merged = (n * mean).sum(0) / total.clamp_min(1)
    return total, merged, (m2 + n * (mean - merged) ** 2).sum(0)


def _norm_factor(n: Tensor, m2: Tensor, logit_norm: str | None, norm_scale: float) -> tuple[Tensor, Tensor]:
    """(r, kappa) of ``reference.normalize_logits``: the normalized logits are c r, and dr/dx_j =
    -r^2 c_j / kappa, kappa = (n - 1) std (standardize) or norm_scale ||c|| (spherical); 0 for a
    constant row, whose gradient through r is 0. (1, 0) without normalization."""
    if logit_norm == "standardize":
        dof = (n - 1).clamp_min(1)
        std = (m2 / dof).sqrt()
        return 1 / (std + reference.NORM_EPS), dof * std
    if logit_norm == "spherical":
        norm = m2.sqrt()
        return norm_scale / (norm + reference.NORM_EPS), norm_scale * norm
    return torch.ones_like(n), torch.zeros_like(n)


def _inverse(temperature: float | Tensor, like: Tensor) -> Tensor:
    """1 / T as a (1,) or (N,) tensor of ``like``'s dtype; NaN for an entry that is not finite and > 0
    (an unchecked bad tensor temperature), as in ``reference.scale_logits``."""
    t = torch.as_tensor(temperature, dtype=like.dtype, device=like.device).reshape(-1)
    return 1 / torch.where((t > 0) & torch.isfinite(t), t, math.nan)


def _log_mixture(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """log m, m = beta p + (1 - beta) q, formed in log space as ``reference.kd_divergence`` does."""
    dead = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_m = torch.logaddexp(torch.where(dead, 0.0, log_p) + math.log(beta),
                            torch.where(dead, 0.0, log_q) + math.log1p(-beta))  # fmt: skip
    return torch.where(dead, -math.inf, log_m)


def _divergence(log_p: Tensor, log_q: Tensor, divergence: str, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """(this shard's part of the row sum D, g = dD/d log q entry by entry (module doc), q)."""
    q = log_q.exp()
    if divergence == "forward_kl":
        return reference.kd_divergence(log_p, log_q, divergence), -log_p.exp(), q
    if divergence == "reverse_kl":
        qh = reference._kl_terms(log_q, log_p)  # q h, 0 where q = 0
        return qh.sum(-1), qh, q
    log_m = _log_mixture(log_p, log_q, beta)
    qh = reference._kl_terms(log_q, log_m)
    d = beta * reference._kl_terms(log_p, log_m).sum(-1) + (1 - beta) * qh.sum(-1)
    return d, (1 - beta) * qh, q


def _shard_loss(student: Tensor, teacher: Tensor, target: Tensor | None, options: dict, check, group,
                need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor | int]:  # fmt: skip
    """(row losses (N,) in the compute dtype, zero on ignored rows; dL/d student (N, V_r) of the reduced
    loss in the compute dtype, or None; the reduction's divisor, a 0-d tensor for "mean", which counts
    the rows not ignored without a host sync) of the rows ``student`` and ``teacher``
    (N, V_r) and ``target`` (N,) or None. ``options`` come from the checks that read no data; ``check(V)``
    runs those that do, against the global V, once collective 1 has told it."""
    n_rows, width = student.shape
    rank, world = _world(group)
    dtype = reference.compute_dtype(student.dtype)
    alpha, logit_norm, eps = options["alpha"], options["logit_norm"], options["label_smoothing"]
    has_kd, has_ce = alpha > 0, target is not None and alpha < 1
    valid = torch.ones(n_rows, dtype=torch.bool, device=student.device)
    x = student.detach().to(dtype)
    t = teacher.detach().to(dtype)
    if target is not None:  # ignored rows are zeroed first, as in the reference (padding rows of -inf)
        valid = target != options["ignore_index"]
        x = torch.where(valid[:, None], x, 0.0)
        t = torch.where(valid[:, None], t, 0.0)

    # 1. all_gather: the widths, the row maxes and the moments of the live entries.
    stats = [_row_max(x)]
    if has_kd:
        stats.append(_row_max(t))
        if logit_norm is not None:
            stats.extend([*_moments(x, stats[0]), *_moments(t, stats[1])])
    local = torch.cat([x.new_tensor([width], dtype=torch.float64), *(v.double() for v in stats)])
    gathered = _all_gather(local, group, world)
    widths = gathered[:, 0].long().tolist()
    offset, n_classes = sum(widths[:rank]), sum(widths)
    check(n_classes)
    stats = gathered[:, 1:].reshape(world, len(stats), n_rows)  # (P, statistic, row)
    x_max = stats[:, 0].amax(0).to(dtype)
    if has_kd:
        t_max = stats[:, 1].amax(0).to(dtype)
        r_s = r_t = torch.ones_like(x_max)
        if logit_norm is not None:
            n, mean, m2 = _merge_moments(*stats[:, 2:5].unbind(1))
            # c = (x - max x) - (mean - max x): two small terms where the row is nearly constant.
            mean_shift = (mean - stats[:, 0].amax(0)).to(dtype)
            n, m2 = n.to(dtype), m2.to(dtype)
            r_s, kappa = _norm_factor(n, m2, logit_norm, options["norm_scale"])
            n_t, _, m2_t = (m.to(dtype) for m in _merge_moments(*stats[:, 5:8].unbind(1)))
            r_t, _ = _norm_factor(n_t, m2_t, logit_norm, options["norm_scale"])
        k_s = r_s * _inverse(options["temperature"], x)
        k_t = r_t * _inverse(options["teacher_temperature"], x)

    # 2. all_reduce SUM: the sum-exps, x_y and sum x.
    names, sums = [], []
    if has_kd:
        u_s = (x - x_max[:, None]) * k_s[:, None]
        u_t = (t - t_max[:, None]) * k_t[:, None]
        names += ["d_s", "d_t"]
        sums += [u_s.exp().sum(-1), u_t.exp().sum(-1)]
    if has_ce:
        y = target - offset  # the target's column in this shard, where this rank owns it
        owned = valid & (y >= 0) & (y < width)
        y = torch.where(owned, y, 0)[:, None]
        z_1 = x - x_max[:, None]
        names += ["d_1", "x_y"]
        x_y = torch.where(owned, x.gather(-1, y).squeeze(-1), 0.0) if width else x.new_zeros(n_rows)
        sums += [z_1.exp().sum(-1), x_y]
        if eps > 0:
            names.append("x_sum")
            sums.append(x.sum(-1))
    sums = dict(zip(names, _all_reduce_sum(torch.stack(sums), group, world)))

    rows = x.new_zeros(n_rows)
    grad = x.new_zeros(n_rows, width) if need_grad else None
    if has_kd:
        log_q = u_s - sums["d_s"].log()[:, None]
        log_p = u_t - sums["d_t"].log()[:, None]
        d, g, q = _divergence(log_p, log_q, options["divergence"], options["beta"])
        # 3. all_reduce SUM: the row sums of D and of the gradient.
        partial = [d, g.sum(-1)]
        if logit_norm is not None:
            c = torch.where(torch.isneginf(x), 0.0, (x - x_max[:, None]) - mean_shift[:, None])
            partial += [(g * c).sum(-1), (q * c).sum(-1), q.sum(-1), c.sum(-1)]
        d, g_sum, *norm_sums = _all_reduce_sum(torch.stack(partial), group, world)
        temperature = torch.as_tensor(options["temperature"], dtype=dtype, device=x.device).reshape(-1)
        t_squared = temperature**2 if options["temperature_squared"] else torch.ones_like(temperature)
        kd_weight = alpha * t_squared
        rows = rows + kd_weight * d
        if need_grad:
            e = g - q * g_sum[:, None]  # dD/du
            if logit_norm is not None:
                gc_sum, qc_sum, q_sum, c_sum = norm_sums
                e_sum, ec_sum = g_sum - g_sum * q_sum, gc_sum - g_sum * qc_sum
                w = torch.where(kappa > 0, r_s * ec_sum / kappa, 0.0)
                e_mean = (e_sum - c_sum * w) / n.clamp_min(1)
                e = torch.where(torch.isneginf(x), 0.0, e - c * w[:, None] - e_mean[:, None])
            grad += (kd_weight * k_s)[:, None] * e
    if has_ce:
        ln_d1 = sums["d_1"].log()
        ce = (1 - eps) * ((x_max - sums["x_y"]) + ln_d1)
        if eps > 0:
            ce = ce + eps * ((x_max - sums["x_sum"] / n_classes) + ln_d1)
        in_range = (target >= 0) & (target < n_classes)  # else (unchecked) a NaN row, as in kd_loss
        ce_weight = torch.full_like(ce, 1 - alpha).masked_fill(~in_range, math.nan)
        rows = rows + ce_weight * ce
        if need_grad:
            ce_grad = (z_1 - ln_d1[:, None]).exp() - eps / n_classes
            if width:  # the -(1 - eps) at the target, on the rank that owns it
                ce_grad.scatter_add_(-1, y, torch.zeros_like(ce).masked_fill(owned, eps - 1)[:, None])
            grad += ce_weight[:, None] * ce_grad
    rows = torch.where(valid, rows, 0.0)

    divisor = 1
    if options["reduction"] == "mean":
        divisor = valid.sum().clamp_min(1)
    elif options["reduction"] == "batchmean":
        divisor = max(n_rows, 1)
    if grad is not None:
        grad = torch.where(valid[:, None], grad / divisor, 0.0)
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
        ctx.per_row = options["reduction"] == "none"
        loss = rows.reshape(lead) if ctx.per_row else rows.sum() / divisor
        return loss  # in the compute dtype, as kd_loss's

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output[..., None] if ctx.per_row else grad_output), *[None] * 6


def vocab_parallel_kd_loss(
    student_shard: Tensor, teacher_shard: Tensor, target: Tensor | None = None, *, group=None, **kd_kwargs
) -> Tensor:
    """``fastkd.kd_loss(student, teacher, target, **kd_kwargs)`` of logits sharded over the vocabulary
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
        **kd_kwargs: ``kd_loss``'s keywords, with its defaults and checks: ``temperature`` (a float, or a
            tensor of one value or one per row), ``alpha``, ``divergence``, ``beta``, ``ignore_index``,
            ``reduction``, ``temperature_squared``, ``teacher_temperature``, ``logit_norm``,
            ``norm_scale``, ``label_smoothing``, ``validate_args``.

    Returns the loss in float32 (float64 for float64 shards), as ``kd_loss``: 0-d, or the leading shape for
    reduction "none".

    Checks that read no data (types, shapes, choices, float temperatures) raise before any collective;
    those that read tensors (a target outside [0, V) for the global V, a bad tensor temperature) run
    after the first collective and raise on every rank alike. Three collectives per call, two when
    alpha = 0, plus one host sync for the widths; see the module doc.
    """
    unknown = sorted(set(kd_kwargs) - set(KD_KEYWORDS))
    if unknown:
        raise TypeError(f"vocab_parallel_kd_loss got unexpected keyword argument(s) {', '.join(unknown)}; it "
                        f"takes kd_loss's keywords {', '.join(KD_KEYWORDS)}")  # fmt: skip
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

    def check(n_classes: int) -> None:  # the checks that read data, against the global V
        check_options(stand_in(n_classes), target, **kd_kwargs)

    # The checks that read no data, before any collective: the global V is not known yet (any width
    # does for them; this rank may even hold no column).
    options = check_options(stand_in(max(student_shard.shape[-1], 1)), target,
                            **dict(kd_kwargs, validate_args=False))  # fmt: skip
    need_grad = torch.is_grad_enabled() and student_shard.requires_grad
    return VocabParallelKDFunction.apply(student_shard, teacher_shard.detach(), target, options, check, group,
                                         need_grad)  # fmt: skip
