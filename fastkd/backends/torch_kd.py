"""The distillation loss's rows and gradient in closed form, in plain PyTorch: the PyTorch backend's
``kd_loss_forward`` (the vocabulary on one process) and ``vocab_parallel_kd_loss`` (the vocabulary split
over the ranks of a process group) run this one algorithm; no autograd runs inside it.

The math, per row, in float32 (float64 for float64 inputs), as in ``kernels/kd_loss.py``: with
c = x - mean x over the n live (not -inf) entries, r and kappa the normalization's factor and derivative
scale (r = 1 without ``logit_norm``; see ``_norm_factor``),

    u = (x - max x) k_s,  k_s = r_s / T,   log q = u - ln sum_j e^(u_j)            student at T
    log p_k likewise from teacher k at k_t = r_tk / T_t;  log p = log mean_k p_k  (K teachers)
    log s = log_softmax(x)                                                       CE, at 1
    loss = alpha c_T D(p, q) + (1 - alpha) [(1 - eps)(-log s_y) + eps mean_j(-log s_j)]

and, with g_j = dD/d(log q_j) taken entry by entry (p and the other log q_k fixed),

    forward_kl  g = -p;   reverse_kl  g = q h, h = log q - log p;   jsd  g = (1 - beta) q h, h = log q - log m
    e_j = dD/du_j = g_j - q_j G,  G = sum_k g_k          (log_softmax's chain rule; adding a multiple of q to
                                                           g changes no e, as sum q = 1: reverse KL's exact
                                                           g = q (h + 1) is taken as q h)
    dD/dx_j = k_s (e_j - c_j W - mean_k (e_k - c_k W)),  W = r_s sum_k e_k c_k / kappa   (logit_norm)
    dD/dx_j = k_s e_j                                                                   (without)
    dCE/dx_j = s_j - (1 - eps) [j = y] - eps / V

A row's loss depends on its columns only through a few row statistics, each a max or a sum over the
columns. With the vocabulary split, each rank reduces its own columns and ``Collectives`` combines the
partial statistics: three collectives per call (two when alpha = 0), each on a small (k, N) tensor,
never on logits (``fastkd.distributed``'s module doc); on one process they are identities.

A sparse teacher (``teacher_topk``) is ``topk_rows``, over the k + 1 classes of ``kd_loss``'s docstring:
with a_c = dD/d(log q_c) for each class c of the k entries I and the bucket R (-p_c, q_c (h_c + 1),
(1 - beta) q_c h_c), and S = sum_c q_c h_c over I and R, dD/du_l is

    l in I       forward_kl  q_l - p_l      reverse_kl  q_l (h_l - S)      jsd  (1 - beta) q_l (h_l - S)
    l not in I   forward_kl  q_l - p_R q_l / q_R        reverse_kl  q_l (h_R - S)      jsd  (1 - beta) q_l (h_R - S)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fastkd import reference
from fastkd._options import KDOptions


class Collectives:
    """How the partial row statistics of a vocabulary split are combined; on one process (this base
    class), the identity: ``gather`` stacks this rank's alone, ``reduce_sum`` leaves it."""

    rank, world = 0, 1

    def gather(self, local: Tensor) -> Tensor:
        """(P,) + local.shape: every rank's ``local``, in rank order."""
        return local[None]

    def reduce_sum(self, local: Tensor) -> Tensor:
        """``local`` summed over the ranks."""
        return local


ONE_PROCESS = Collectives()


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
    y = z - shift[..., None]
    n = live.sum(-1).to(z.dtype)
    mean = torch.where(live, y, 0.0).sum(-1) / n.clamp_min(1)
    c = torch.where(live, y - mean[..., None], 0.0)
    return n, mean.double() + shift.double(), (c * c).sum(-1)


def _merge_moments(n: Tensor, mean: Tensor, m2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The moments of the whole rows from the ranks' (P, ...) ones (Chan et al.)."""
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


def _divergence(log_p: Tensor, log_q: Tensor, options: KDOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(the columns' part of the row sum D, g = dD/d log q entry by entry (module doc), q) of the
    divergences whose row sum is a sum over the columns (all but DKD)."""
    q = log_q.exp()
    kind = options.divergence
    d = reference.kd_divergence(log_p, log_q, kind, options.beta, options.skew, (options.ab_alpha, options.ab_beta))
    if kind == "forward_kl":
        return d, -log_p.exp(), q
    if kind == "reverse_kl":
        return d, reference._kl_terms(log_q, log_p), q  # q h, 0 where q = 0
    if kind == "jsd":
        return d, (1 - options.beta) * reference._kl_terms(log_q, reference.log_mixture(log_p, log_q, options.beta)), q
    if kind == "skew_kl":  # -(1 - s) p q / m, m = s p + (1 - s) q
        log_m = reference.log_mixture(log_p, log_q, options.skew)
        return d, -(1 - options.skew) * torch.where(log_m > -math.inf, (log_p + log_q - log_m).exp(), 0.0), q
    if kind == "skew_reverse_kl":  # q (h - s q / m), h = log q - log m, m = (1 - s) p + s q
        log_m = reference.log_mixture(log_q, log_p, options.skew)
        ratio = torch.where(log_m > -math.inf, (log_q - log_m).exp(), 0.0)
        return d, reference._kl_terms(log_q, log_m) - options.skew * q * ratio, q
    if kind == "tvd":  # 1/2 q sign(q - p)
        return d, 0.5 * q * torch.sign(q - log_p.exp()), q
    a, b = options.ab_alpha, options.ab_beta
    if a:  # (q^(a+b) - p^a q^b) / a
        return d, (reference._power(log_q, a + b) - reference._power(log_p, a) * reference._power(log_q, b)) / a, q
    live = q != 0  # a = 0: q^b (log q - log p), 0 where q = 0
    return d, torch.where(live, reference._power(log_q, b) * (torch.where(live, log_q, 0.0) - log_p), 0.0), q


def _kd_coefficient(options: KDOptions, like: Tensor) -> Tensor:
    """c_T (T^2, or 1) as a (1,) or (N,) tensor."""
    temperature = torch.as_tensor(options.temperature, dtype=like.dtype, device=like.device).reshape(-1)
    return temperature**2 if options.temperature_squared else torch.ones_like(temperature)


class RowLosses(NamedTuple):
    """Each row's loss, and its two parts: the KD term c D and the CE term (0 where not computed);
    total = alpha KD + (1 - alpha) CE. All (N,), zero on ignored rows."""

    total: Tensor
    kd: Tensor
    ce: Tensor


def _cap(z: Tensor, cap: float | None) -> tuple[Tensor, Tensor | None]:
    """(cap tanh(z / cap), -inf kept; its derivative 1 - tanh^2), or (z, None) without a cap."""
    if cap is None:
        return z, None
    capped = reference.soft_cap(z, cap)
    return capped, torch.where(torch.isneginf(z), 0.0, 1 - (capped / cap) ** 2)


def _total(kd: Tensor, ce: Tensor, alpha: float) -> Tensor:
    """alpha KD + (1 - alpha) CE, without the 0 x inf of a term whose weight is 0."""
    return kd if alpha == 1 else ce if alpha == 0 else alpha * kd + (1 - alpha) * ce


def dense_rows(x: Tensor, teachers: Tensor, target: Tensor | None, options: KDOptions, need_grad: bool,
               comm: Collectives = ONE_PROCESS, check=None) -> tuple[RowLosses, Tensor | None, Tensor]:  # fmt: skip
    """(``RowLosses``; d(sum of the total rows)/dx (N, V_r), or None; the rows not ignored (N,) bool) of
    the student ``x`` (N, V_r) and ``teachers`` (K, N, V_r), both in the compute dtype, this rank's
    columns of the vocabulary, and ``target`` (N,) (global class indices) or None. ``check(V)``, when
    given, runs the checks that need the whole vocabulary's width, once the first collective has told
    it. The KD part is computed when alpha > 0 or ``return_parts``, the CE part when there is a target
    and alpha < 1 or ``return_parts``."""
    n_rows, width = x.shape
    n_teachers = teachers.shape[0]
    alpha, logit_norm, eps = options.alpha, options.logit_norm, options.label_smoothing
    has_kd = alpha > 0 or options.return_parts
    has_ce = target is not None and (alpha < 1 or options.return_parts)
    dkd = options.divergence == "dkd"
    valid = torch.ones(n_rows, dtype=torch.bool, device=x.device)
    t = teachers
    if target is not None:  # ignored rows are zeroed first, as in the reference (padding rows of -inf)
        valid = target != options.ignore_index
        x = torch.where(valid[:, None], x, 0.0)
        t = torch.where(valid[:, None], t, 0.0)
    x, cap_grad = _cap(x, options.softcap)
    t, _ = _cap(t, options.softcap)

    # 1. all_gather: the widths, the row maxes and the moments of the live entries.
    stats = [_row_max(x)[None]]
    if has_kd:
        stats.append(_row_max(t))
        if logit_norm is not None:
            stats.extend([m[None] for m in _moments(x, stats[0][0])])
            stats.extend(_moments(t, stats[1]))
    stats = torch.cat([s.double() for s in stats])  # (statistic, row)
    n_stats = stats.shape[0]
    local = torch.cat([x.new_tensor([width], dtype=torch.float64), stats.reshape(-1)])
    gathered = comm.gather(local)
    widths = gathered[:, 0].long().tolist()
    offset, n_classes = sum(widths[: comm.rank]), sum(widths)
    if check is not None:
        check(n_classes)
    stats = gathered[:, 1:].reshape(comm.world, n_stats, n_rows)  # (P, statistic, row)
    x_max = stats[:, 0].amax(0).to(x.dtype)
    if has_kd:
        members = slice(1, 1 + n_teachers)
        t_max = stats[:, members].amax(0).to(x.dtype)  # (K, N)
        r_s, r_t = torch.ones_like(x_max), torch.ones_like(t_max)
        if logit_norm is not None:
            base = 1 + n_teachers
            n, mean, m2 = _merge_moments(*stats[:, base : base + 3].unbind(1))
            # c = (x - max x) - (mean - max x): two small terms where the row is nearly constant.
            mean_shift = (mean - stats[:, 0].amax(0)).to(x.dtype)
            n, m2 = n.to(x.dtype), m2.to(x.dtype)
            r_s, kappa = _norm_factor(n, m2, logit_norm, options.norm_scale)
            member_moments = stats[:, base + 3 :].reshape(comm.world, 3, n_teachers, n_rows)
            n_t, _, m2_t = (m.to(x.dtype) for m in _merge_moments(*member_moments.unbind(1)))
            r_t, _ = _norm_factor(n_t, m2_t, logit_norm, options.norm_scale)
        k_s = r_s * _inverse(options.temperature, x)
        k_t = r_t * _inverse(options.teacher_temperature, x)

    # The target's column in this shard, where this rank owns it.
    if target is not None:
        y = target - offset
        owned = valid & (y >= 0) & (y < width)
        y = torch.where(owned, y, 0)[:, None]
        in_range = (target >= 0) & (target < n_classes)  # else (unchecked) a NaN row, as in kd_loss

    # 2. all_reduce SUM: the sum-exps, x_y and sum x.
    sums = []
    if has_kd:
        u_s = (x - x_max[:, None]) * k_s[:, None]
        u_t = (t - t_max[..., None]) * k_t[..., None]
        sums += [u_s.exp().sum(-1)[None], u_t.exp().sum(-1)]
    if has_ce:
        z_1 = x - x_max[:, None]
        x_y = torch.where(owned, x.gather(-1, y).squeeze(-1), 0.0) if width else x.new_zeros(n_rows)
        sums += [z_1.exp().sum(-1)[None], x_y[None]]
        if eps > 0:
            sums.append(x.sum(-1)[None])
    sums = list(comm.reduce_sum(torch.cat(sums)).unbind(0)) if sums else []

    kd = x.new_zeros(n_rows)
    ce = x.new_zeros(n_rows)
    grad = x.new_zeros(n_rows, width) if need_grad else None
    if has_kd:
        d_s, d_t, sums = sums[0], torch.stack(sums[1 : 1 + n_teachers]), sums[1 + n_teachers :]
        log_q = u_s - d_s.log()[:, None]
        log_p = u_t - d_t.log()[..., None]  # (K, N, V_r)
        log_p = log_p[0] if n_teachers == 1 else torch.logsumexp(log_p, 0) - math.log(n_teachers)
        if dkd:
            d, e, q = _dkd(log_p, log_q, owned, y, in_range, options, comm)
            partial = [e.sum(-1)]
        else:
            d, g, q = _divergence(log_p, log_q, options)
            partial = [d, g.sum(-1)]
        # 3. all_reduce SUM: the row sums of D and of the gradient.
        if logit_norm is not None:
            c = torch.where(torch.isneginf(x), 0.0, (x - x_max[:, None]) - mean_shift[:, None])
            partial += [((e if dkd else g) * c).sum(-1), (q * c).sum(-1), q.sum(-1), c.sum(-1)]
        reduced = comm.reduce_sum(torch.stack(partial))
        if dkd:
            e_sum, *norm_sums = reduced
        else:
            d, g_sum, *norm_sums = reduced
        kd = _kd_coefficient(options, x) * d
        if need_grad:
            if not dkd:
                e = g - q * g_sum[:, None]  # dD/du
            if logit_norm is not None:
                ec_sum, qc_sum, q_sum, c_sum = norm_sums
                if not dkd:
                    e_sum, ec_sum = g_sum - g_sum * q_sum, ec_sum - g_sum * qc_sum
                w = torch.where(kappa > 0, r_s * ec_sum / kappa, 0.0)
                e_mean = (e_sum - c_sum * w) / n.clamp_min(1)
                e = torch.where(torch.isneginf(x), 0.0, e - c * w[:, None] - e_mean[:, None])
            if alpha > 0:
                grad += (alpha * _kd_coefficient(options, x) * k_s)[:, None] * e
    if has_ce:
        d_1, x_y_sum = sums[0], sums[1]
        ln_d1 = d_1.log()
        ce = (1 - eps) * ((x_max - x_y_sum) + ln_d1)
        if eps > 0:
            ce = ce + eps * ((x_max - sums[2] / n_classes) + ln_d1)
        ce = ce.masked_fill(~in_range, math.nan)
        if need_grad and alpha < 1:
            ce_grad = (z_1 - ln_d1[:, None]).exp() - eps / n_classes
            if width:  # the -(1 - eps) at the target, on the rank that owns it
                ce_grad.scatter_add_(-1, y, torch.zeros_like(ce).masked_fill(owned, eps - 1)[:, None])
            grad += ((1 - alpha) * torch.ones_like(ce).masked_fill(~in_range, math.nan))[:, None] * ce_grad
    rows = RowLosses(*(torch.where(valid, part, 0.0) for part in (_total(kd, ce, alpha), kd, ce)))
    if grad is not None:
        if cap_grad is not None:
            grad = grad * cap_grad
        grad = torch.where(valid[:, None], grad, 0.0)
    return rows, grad, valid


def _dkd(log_p: Tensor, log_q: Tensor, owned: Tensor, y: Tensor, in_range: Tensor, options: KDOptions,
         comm: Collectives) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(the row sum D = w_t TCKD + w_n NCKD, e = dD/du on this rank's columns, q) of Decoupled KD
    (``reference.dkd_divergence``), the target class's column on the rank that owns it. With
    a = p_y, A = 1 - a, b = q_y, B = 1 - b (A and B summed over the other classes) and the conditional
    distributions p^_j = p_j / A, q^_j = q_j / B (j != y):

        TCKD = a log(a / b) + A log(A / B),    NCKD = sum_{j != y} p^_j log(p^_j / q^_j)
        dTCKD/du_j = kappa ([j = y] - q_j),    kappa = A b / B - a
        dNCKD/du_j = q^_j - p^_j for j != y, 0 at y

    One all_reduce (sums over the columns): a, b, A, B and sum_{j != y} p_j (log p_j - log q_j)."""
    p, q = log_p.exp(), log_q.exp()
    target_col = torch.zeros_like(q, dtype=torch.bool)
    if q.shape[-1]:
        target_col.scatter_(-1, y, owned[:, None])
    other = ~target_col
    cross = torch.where(other, reference._kl_terms(log_p, log_q), 0.0).sum(-1)
    a, b, big_a, big_b, cross = comm.reduce_sum(torch.stack([
        torch.where(target_col, p, 0.0).sum(-1), torch.where(target_col, q, 0.0).sum(-1),
        torch.where(other, p, 0.0).sum(-1), torch.where(other, q, 0.0).sum(-1), cross,
    ]))  # fmt: skip
    binary_p = torch.stack([a, big_a], -1).log()
    binary_q = torch.stack([b, big_b], -1).log()
    tckd = reference._kl_terms(binary_p, binary_q).sum(-1)
    has_rest = big_a > 0
    nckd = torch.where(has_rest, cross / torch.where(has_rest, big_a, 1.0) - big_a.log() + big_b.log(), 0.0)
    nckd = torch.where(has_rest, nckd, 0.0)
    d = torch.where(in_range, options.dkd_alpha * tckd + options.dkd_beta * nckd, math.nan)
    kappa = torch.where(big_b > 0, big_a * b / big_b, 0.0) - a
    cond = torch.where(other & has_rest[:, None], q / big_b[:, None] - p / torch.where(has_rest, big_a, 1.0)[:, None], 0.0)
    e = options.dkd_alpha * kappa[:, None] * (target_col.to(q.dtype) - q) + options.dkd_beta * cond
    return d, torch.where(in_range[:, None], e, math.nan), q


def topk_rows(x: Tensor, indices: Tensor, values: Tensor, target: Tensor | None, options: KDOptions,
              need_grad: bool) -> tuple[RowLosses, Tensor | None]:  # fmt: skip
    """(``RowLosses``; d(sum of the total rows)/dx (N, V), or None) of the student ``x`` (N, V) in the
    compute dtype against a sparse teacher, ``indices`` and ``values`` (N, k) (module doc; the
    teacher's distribution as ``reference.topk_teacher_log_probs`` forms it). With g_c = dD/d(log q_c)
    for each of the k + 1 classes c (the k entries and the bucket R), dD/du_l = g_c(l) (q_l / q_R for l
    in R) - q_l sum_c g_c, whatever the divergence."""
    n_rows, n_classes = x.shape
    k = indices.shape[-1]
    alpha, eps = options.alpha, options.label_smoothing
    has_kd = alpha > 0 or options.return_parts
    has_ce = target is not None and (alpha < 1 or options.return_parts)
    valid = torch.ones(n_rows, dtype=torch.bool, device=x.device) if target is None else target != options.ignore_index
    x = torch.where(valid[:, None], x, 0.0)
    x, cap_grad = _cap(x, options.softcap)
    tail = "none" if k == n_classes else options.tail
    in_range = ((indices >= 0) & (indices < n_classes)).all(-1) | ~valid
    spare = torch.arange(k, device=x.device).expand_as(indices)  # distinct in-range stand-ins for unused rows
    idx = torch.where((valid & in_range)[:, None], indices, spare).long()
    v = torch.where(valid[:, None], values.to(x.dtype), 0.0)
    kd = x.new_zeros(n_rows)
    ce = x.new_zeros(n_rows)
    grad = x.new_zeros(n_rows, n_classes) if need_grad else None
    x_max = _row_max(x)
    if has_kd:
        k_s = _inverse(options.temperature, x)
        u = (x - x_max[:, None]) * k_s[:, None]
        log_q_all = u - torch.logsumexp(u, -1, keepdim=True)
        in_top = torch.zeros_like(x, dtype=torch.bool).scatter(-1, idx, True)
        log_q_rest = torch.logsumexp(torch.where(in_top, -math.inf, log_q_all), -1, keepdim=True)  # -inf: no class left
        log_q = torch.cat([log_q_all.gather(-1, idx), log_q_rest], -1)  # (N, k + 1)
        teacher_t = options.teacher_temperature
        if isinstance(teacher_t, Tensor) and teacher_t.dim():
            teacher_t = teacher_t.to(x.dtype)
        log_p_top, log_p_rest = reference.topk_teacher_log_probs(v, teacher_t, tail)
        log_p = torch.cat([log_p_top, log_p_rest[:, None]], -1)
        d, g, _ = _divergence(log_p, log_q, options)
        coefficient = _kd_coefficient(options, x)
        kd = coefficient * torch.where(in_range, d, math.nan)
        if need_grad and alpha > 0:
            q_all = log_q_all.exp()
            ratio = torch.where(log_q_rest > -math.inf, g[:, -1:] * (-log_q_rest).exp(), 0.0)  # g_R / q_R
            e = torch.where(in_top, 0.0, ratio * q_all).scatter_add(-1, idx, g[:, :-1]) - q_all * g.sum(-1, keepdim=True)
            grad += (alpha * coefficient * k_s)[:, None] * torch.where(in_range[:, None], e, math.nan)
    if has_ce:
        z = x - x_max[:, None]
        ln_d1 = torch.logsumexp(z, -1)
        safe_y = torch.where(valid, target, 0).clamp(0, max(n_classes - 1, 0))
        ce = (1 - eps) * (ln_d1 - z.gather(-1, safe_y[:, None]).squeeze(-1))
        if eps > 0:
            ce = ce + eps * (ln_d1 - z.mean(-1))
        y_ok = (target >= 0) & (target < n_classes)
        ce = ce.masked_fill(~y_ok, math.nan)
        if need_grad and alpha < 1:
            ce_grad = (z - ln_d1[:, None]).exp() - eps / n_classes
            ce_grad.scatter_add_(-1, safe_y[:, None], torch.full_like(ce, eps - 1)[:, None])
            grad += ((1 - alpha) * torch.ones_like(ce).masked_fill(~y_ok, math.nan))[:, None] * ce_grad
    rows = RowLosses(*(torch.where(valid, part, 0.0) for part in (_total(kd, ce, alpha), kd, ce)))
    if grad is not None:
        if cap_grad is not None:
            grad = grad * cap_grad
        grad = torch.where(valid[:, None], grad, 0.0)
    return rows, grad
