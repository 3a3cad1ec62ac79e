"""Pure-PyTorch reference implementations: the oracle of every kernel test and the CPU path.

Written for clarity, not speed. Math runs in float32 whatever the input dtype (float64 for float64
inputs, which the tests use as the exact answer); results are returned in the input's dtype. The
functions take arguments already checked by ``fastkd._validate`` (a temperature is a float or a tensor
holding one value or one value per row, on the logits' device).
"""

from __future__ import annotations

import math

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_logits(logits: torch.Tensor, temperature: float | torch.Tensor, dim: int) -> torch.Tensor:
    """(logits - row max) / T in the compute dtype, whose softmax along ``dim`` is softmax(logits / T).

    Subtracting the row max first (a constant of the row: softmax does not change) keeps logits of
    +-1e4 precise and dL/dT well conditioned. A tensor T holds one value or one per row (broadcast
    along ``dim``); an entry that is not finite and > 0 gives NaN. A -inf logit (a masked class) is
    -inf at every temperature: it is divided by a T cut from the graph, so that it is a constant of T
    (autograd would otherwise form -x/T^2 * 0 = inf * 0 = NaN in dL/dT).
    """
    x = logits.to(compute_dtype(logits.dtype))
    if x.shape[dim] > 0:
        x = x - x.amax(dim, keepdim=True).detach()
    if not isinstance(temperature, torch.Tensor):
        return x / temperature
    t = temperature.to(x.dtype)
    t = torch.where((t > 0) & torch.isfinite(t), t, torch.nan)
    if 0 < t.dim() < x.dim():  # one per row: broadcast along dim (a keepdim tensor already is)
        t = t.unsqueeze(dim)
    return x / torch.where(torch.isneginf(x), t.detach(), t)


def tempered_softmax(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, dim: int = -1) -> torch.Tensor:
    """softmax(logits / T) along ``dim``."""
    return torch.softmax(scale_logits(logits, temperature, dim), dim=dim).to(logits.dtype)


def tempered_log_softmax(
    logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, dim: int = -1
) -> torch.Tensor:
    """log softmax(logits / T) along ``dim``."""
    return torch.log_softmax(scale_logits(logits, temperature, dim), dim=dim).to(logits.dtype)


NORM_EPS = 1e-7  # added to the std (standardize) or the norm (spherical) of a row of logits


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x), with gradient 0 (not inf * 0) at x = 0."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def normalize_logits(logits: torch.Tensor, logit_norm: str | None, norm_scale: float = 2.0) -> torch.Tensor:
    """Per-row normalized logits (last dim), over the entries that are not -inf (which stay -inf).

    With c = x - mean(x) over the n live entries:
      ``"standardize"``  c / (std + eps), std = sqrt(sum c^2 / (n - 1)) (unbiased; n - 1 taken as 1 when n = 1)
      ``"spherical"``    norm_scale * c / (||c|| + eps)
    with eps = ``NORM_EPS``. A constant row gives zeros (and gradient 0 through the std or norm).
    """
    if logit_norm is None:
        return logits
    live = ~torch.isneginf(logits)
    n = live.sum(-1, keepdim=True).to(logits.dtype)
    mean = torch.where(live, logits, 0.0).sum(-1, keepdim=True) / n.clamp_min(1)
    c = torch.where(live, logits - mean, 0.0)
    m2 = (c * c).sum(-1, keepdim=True)
    if logit_norm == "standardize":
        r = 1 / (_safe_sqrt(m2 / (n - 1).clamp_min(1)) + NORM_EPS)
    else:
        r = norm_scale / (_safe_sqrt(m2) + NORM_EPS)
    return torch.where(live, c * r, float("-inf"))


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) per entry, 0 where a = 0 (with a gradient of 0 there, not NaN); NaN where a is."""
    a = log_a.exp()
    live = a != 0  # not a > 0: a NaN (a NaN logit, a bad temperature) must stay NaN
    return torch.where(live, a * (torch.where(live, log_a, 0.0) - torch.where(live, log_b, 0.0)), 0.0)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a and log b, for w in [0, 1]: -inf where both are 0 (with a
    gradient of 0 there, not NaN), log b at w = 0 and log a at w = 1."""
    if w == 0:
        return log_b
    if w == 1:
        return log_a
    dead = torch.isneginf(log_a) & torch.isneginf(log_b)  # keep logaddexp's backward off -inf - -inf
    log_m = torch.logaddexp(torch.where(dead, 0.0, log_a) + math.log(w), torch.where(dead, 0.0, log_b) + math.log1p(-w))
    return torch.where(dead, float("-inf"), log_m)


def _power(log_x: torch.Tensor, a: float) -> torch.Tensor:
    """x^a = e^(a log x) for a >= 0 (0^0 = 1)."""
    return torch.exp(a * log_x) if a else torch.ones_like(log_x)


def ab_divergence(log_p: torch.Tensor, log_q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """The alpha-beta divergence D_AB^(a, b)(p || q) per row (Cichocki et al. 2011; ABKD, Wang et al.,
    ICML 2025), a, b >= 0:

        a, b, a + b != 0   -1/(a b) sum_j (p^a q^b - a/(a + b) p^(a+b) - b/(a + b) q^(a+b))
        b = 0              1/a^2 sum_j (p^a log(p^a / q^a) - p^a + q^a)        (a = 1: KL(p || q))
        a = 0              1/b^2 sum_j (q^b log(q^b / p^b) - q^b + p^b)        (b = 1: KL(q || p))
        a = b = 0          1/2 sum_j (log p - log q)^2

    each case the limit of the general one, so the divergence is continuous in (a, b). A class of
    probability 0 in both adds 0."""
    p_a, q_b = _power(log_p, a), _power(log_q, b)
    if a and b:
        terms = p_a * q_b - a / (a + b) * _power(log_p, a + b) - b / (a + b) * _power(log_q, a + b)
        return -terms.sum(-1) / (a * b)
    if a:  # b = 0
        q_a = _power(log_q, a)
        live = p_a != 0
        log_ratio = torch.where(live, log_p, 0.0) - torch.where(live, log_q, 0.0)
        return (torch.where(live, a * p_a * log_ratio, 0.0) - p_a + q_a).sum(-1) / a**2
    if b:  # a = 0
        p_b = _power(log_p, b)
        live = q_b != 0
        log_ratio = torch.where(live, log_q, 0.0) - torch.where(live, log_p, 0.0)
        return (torch.where(live, b * q_b * log_ratio, 0.0) - q_b + p_b).sum(-1) / b**2
    dead = torch.isneginf(log_p) & torch.isneginf(log_q)
    diff = torch.where(dead, 0.0, log_p) - torch.where(dead, 0.0, log_q)
    return 0.5 * (diff * diff).sum(-1)


def kd_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float = 0.5, skew: float = 0.1,
                  ab: tuple[float, float] = (1.0, 0.0)) -> torch.Tensor:  # fmt: skip
    """D(p_t, p_s) per row (last dim) from the teacher's and the student's log-probabilities p and q:

        "forward_kl"       KL(p || q)
        "reverse_kl"       KL(q || p)
        "jsd"              beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
        "skew_kl"          KL(p || skew p + (1 - skew) q)            (DistiLLM, Ko et al. 2024)
        "skew_reverse_kl"  KL(q || (1 - skew) p + skew q)
        "tvd"              1/2 sum_j |p_j - q_j|                     (total variation distance)
        "ab"               ``ab_divergence(p, q, *ab)``              (ABKD; (1, 0): forward KL, (0, 1): reverse)
    """
    if kind == "forward_kl":
        return _kl_terms(log_p, log_q).sum(-1)
    if kind == "reverse_kl":
        return _kl_terms(log_q, log_p).sum(-1)
    if kind == "jsd":
        log_m = log_mixture(log_p, log_q, beta)
        return (beta * _kl_terms(log_p, log_m) + (1 - beta) * _kl_terms(log_q, log_m)).sum(-1)
    if kind == "skew_kl":
        return _kl_terms(log_p, log_mixture(log_p, log_q, skew)).sum(-1)
    if kind == "skew_reverse_kl":
        return _kl_terms(log_q, log_mixture(log_q, log_p, skew)).sum(-1)
    if kind == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    return ab_divergence(log_p, log_q, *ab)


def _log_mass(log_x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log sum_j x_j over the entries ``keep`` marks (last dim, kept): -inf where they are all 0, with a
    gradient of 0 there (logsumexp of a row of -inf alone would back-propagate NaN)."""
    live = keep & (log_x != float("-inf"))  # NaN included
    empty = ~live.any(-1, keepdim=True)
    safe = torch.where(empty, 0.0, torch.where(live, log_x, float("-inf")))
    return torch.where(empty, float("-inf"), torch.logsumexp(safe, -1, keepdim=True))


def dkd_divergence(log_p: torch.Tensor, log_q: torch.Tensor, target: torch.Tensor,
                   weights: tuple[float, float]) -> torch.Tensor:  # fmt: skip
    """Decoupled KD (Zhao et al., CVPR 2022) per row: w_t TCKD + w_n NCKD, with the target class y,

        TCKD = KL([p_y, 1 - p_y] || [q_y, 1 - q_y])               (target vs the rest, binary)
        NCKD = KL(p_{j != y} / (1 - p_y) || q_{j != y} / (1 - q_y))    (among the non-target classes)

    1 - p_y summed over the other classes (no cancellation when p_y is near 1); mdistiller's code
    approximates the exclusion of y by subtracting 1000 from its logit. ``target`` holds valid class
    indices (the caller masks the others)."""
    y = target.unsqueeze(-1)
    other = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, y, False)
    log_rest_p, log_rest_q = (_log_mass(log_x, other) for log_x in (log_p, log_q))
    binary_p = torch.cat([log_p.gather(-1, y), log_rest_p], -1)
    binary_q = torch.cat([log_q.gather(-1, y), log_rest_q], -1)
    tckd = _kl_terms(binary_p, binary_q).sum(-1)
    has_rest = log_rest_p > float("-inf")  # else (V = 1, or all mass on y) no non-target distribution: 0
    cond_p = torch.where(other & has_rest, log_p - torch.where(has_rest, log_rest_p, 0.0), float("-inf"))
    cond_q = torch.where(other & has_rest, log_q - torch.where(has_rest, log_rest_q, 0.0), float("-inf"))
    nckd = _kl_terms(cond_p, cond_q).sum(-1)
    return weights[0] * tckd + weights[1] * nckd


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logit soft-capping z -> cap tanh(z / cap) (Gemma 2's ``final_logit_softcapping``); -inf (a
    masked class) stays -inf; None leaves the logits as they are."""
    if cap is None:
        return logits
    return torch.where(torch.isneginf(logits), float("-inf"), cap * torch.tanh(logits / cap))


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Per-row ``F.cross_entropy(logits, target, label_smoothing=...)`` (no reduction, no ignore_index):
    (1 - eps) (-log p_y) + eps mean_j(-log p_j). NaN where the target is outside [0, V)."""
    log_p = torch.log_softmax(logits, -1)
    in_range = (target >= 0) & (target < logits.shape[-1])
    nll = -log_p.gather(-1, torch.where(in_range, target, 0).unsqueeze(-1)).squeeze(-1)
    nll = torch.where(in_range, nll, float("nan"))
    if label_smoothing == 0:
        return nll
    return (1 - label_smoothing) * nll - label_smoothing * log_p.mean(-1)


def topk_teacher_log_probs(
    values: torch.Tensor, teacher_temperature: float | torch.Tensor, tail: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse teacher's tempered log-probabilities: (over its k entries (..., k), over the bucket of all
    other classes (...,), -inf without one), from its k stored ``values`` (..., k) in the compute dtype.

    ``tail="none"``: log p_I = log_softmax(v / T_t) over the k entries (log-probabilities and logits
    alike: either way the k entries are renormalized). ``tail="bucket"`` (log-probabilities only): the
    k entries and the bucket, of log mass log(1 - sum_I e^v), tempered together as k + 1 classes:
    log_softmax([v, log(1 - sum e^v)] / T_t). Exact at T_t = 1, where it leaves the stored log-probs as
    they are; at T_t != 1 it tempers the bucket as one class (how the missing mass spreads over the
    other classes, which would change its tempered mass, is unknown)."""
    t = teacher_temperature
    if isinstance(t, torch.Tensor) and t.dim():
        t = t.unsqueeze(-1)
    if tail == "none":
        return torch.log_softmax(values / t, -1), values.new_full(values.shape[:-1], float("-inf"))
    rest = torch.log1p(-values.exp().sum(-1).clamp(max=1.0))
    log_p = torch.log_softmax(torch.cat([values, rest.unsqueeze(-1)], -1) / t, -1)
    return log_p[..., :-1], log_p[..., -1]


def topk_divergence(
    s: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    temperature: float | torch.Tensor,
    teacher_temperature: float | torch.Tensor,
    divergence: str,
    tail: str,
    **params,
) -> torch.Tensor:
    """D(p_t, p_s) per row of a sparse teacher given at k entries per row (``indices``, ``values``
    (..., k)), over k + 1 classes: the k entries I and the bucket R of every other class. The teacher's
    are ``topk_teacher_log_probs`` (mass 0 on R with ``tail="none"``); the student's are its full
    softmax(s / T) at I and its summed mass outside I on R. ``valid`` rows are computed (the others'
    indices and values may be anything); a row with an index outside [0, V) gives NaN. With k = V no
    class is left for the bucket, which is then dropped (the rounding of the stored values would
    otherwise put a little teacher mass on it)."""
    n_classes = s.shape[-1]
    k = indices.shape[-1]
    if k == n_classes:
        tail = "none"
    in_range = ((indices >= 0) & (indices < n_classes)).all(-1) | ~valid
    spare = torch.arange(k, device=s.device).expand_as(indices)  # distinct in-range stand-ins for unused rows
    indices = torch.where((valid & in_range).unsqueeze(-1), indices, spare).long()
    values = torch.where(valid.unsqueeze(-1), values.to(s.dtype), 0.0)
    log_p, log_p_rest = topk_teacher_log_probs(values, teacher_temperature, tail)
    u = scale_logits(s, temperature, -1)
    lse = torch.logsumexp(u, -1, keepdim=True)
    log_q = u.gather(-1, indices) - lse
    in_top = torch.zeros_like(u, dtype=torch.bool).scatter(-1, indices, True)
    rest = torch.where(in_top, float("-inf"), u)
    has_rest = (rest > float("-inf")).any(-1, keepdim=True)  # else logsumexp's backward would give NaN
    log_q_rest = torch.where(has_rest, torch.logsumexp(torch.where(has_rest, rest, 0.0), -1, keepdim=True) - lse,
                             float("-inf"))  # fmt: skip
    log_p = torch.cat([log_p, log_p_rest.unsqueeze(-1)], -1)
    log_q = torch.cat([log_q, log_q_rest], -1)
    return torch.where(in_range, kd_divergence(log_p, log_q, divergence, **params), float("nan"))


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 1.0,
    alpha: float = 0.5,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
    temperature_squared: bool = True,
    teacher_temperature: float | torch.Tensor | None = None,
    logit_norm: str | None = None,
    norm_scale: float | None = None,
    label_smoothing: float = 0.0,
    skew: float = 0.1,
    ab_alpha: float = 1.0,
    ab_beta: float = 0.0,
    dkd_alpha: float = 1.0,
    dkd_beta: float = 8.0,
    softcap: float | None = None,
    normalizer: float | torch.Tensor | None = None,
    return_parts: bool = False,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    tail: str = "none",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distillation loss of ``fastkd.kd_loss`` (see its docstring for the contract), in the compute
    dtype (float32, float64 for float64 logits); autograd gives the gradient. Arguments are already
    checked: ``teacher_logits`` is the student's shape or (K,) + it (None with ``teacher_topk``),
    temperatures are floats or tensors of one value or one per row. With ``return_parts``, (total, KD
    part c D, CE part), each reduced as the total (total = alpha KD + (1 - alpha) CE)."""
    dtype = compute_dtype(student_logits.dtype)
    s = soft_cap(student_logits.to(dtype), softcap)
    t_t = temperature if teacher_temperature is None else teacher_temperature
    row_shape = s.shape[:-1]
    valid = torch.ones(row_shape, dtype=torch.bool, device=s.device)
    if target is not None:  # ignored rows are zeroed first: padding rows of -inf must not NaN the gradient
        valid = target != ignore_index
        s = torch.where(valid.unsqueeze(-1), s, 0.0)
    kd = s.new_zeros(row_shape)
    c = temperature**2 if temperature_squared else 1.0
    params = dict(beta=beta, skew=skew, ab=(ab_alpha, ab_beta))
    has_kd = alpha > 0 or return_parts
    if has_kd and teacher_topk is not None:
        t_t = t_t.detach() if isinstance(t_t, torch.Tensor) else t_t
        kd = c * topk_divergence(s, *teacher_topk, valid, temperature, t_t, divergence, tail, **params)
    elif has_kd:
        scale = 2.0 if norm_scale is None else norm_scale
        log_q = torch.log_softmax(scale_logits(normalize_logits(s, logit_norm, scale), temperature, -1), -1)
        teachers = soft_cap(teacher_logits.detach().to(dtype), softcap)
        if teachers.dim() == s.dim():
            teachers = teachers.unsqueeze(0)
        teachers = normalize_logits(torch.where(valid.unsqueeze(-1), teachers, 0.0), logit_norm, scale)
        if isinstance(t_t, torch.Tensor):
            t_t = t_t.detach()
        log_p = torch.log_softmax(scale_logits(teachers, t_t, -1), -1)
        if log_p.shape[0] == 1:
            log_p = log_p[0]
        else:  # the ensemble's mean distribution
            log_p = torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])
        if divergence == "dkd":
            in_range = (target >= 0) & (target < s.shape[-1])
            d = dkd_divergence(log_p, log_q, torch.where(valid & in_range, target, 0), (dkd_alpha, dkd_beta))
            kd = c * torch.where(in_range | ~valid, d, float("nan"))
        else:
            kd = c * kd_divergence(log_p, log_q, divergence, **params)
    ce = s.new_zeros(row_shape)
    if target is not None and (alpha < 1 or return_parts):
        ce = cross_entropy(s, target, label_smoothing)
    total = kd if alpha == 1 else ce if alpha == 0 else alpha * kd + (1 - alpha) * ce
    parts = [torch.where(valid, part, 0.0) for part in (total, kd, ce)]
    if reduction != "none":
        if normalizer is not None:
            divisor = normalizer
        elif reduction == "mean":
            divisor = valid.sum().clamp_min(1)
        elif reduction == "batchmean":
            divisor = max(valid.numel(), 1)
        else:
            divisor = 1
        parts = [part.sum() / divisor for part in parts]
    return tuple(parts) if return_parts else parts[0]


# ---- calibration and fidelity -------------------------------------------------------------------------


def is_tempered(temperature: float | torch.Tensor) -> bool:
    """Whether ``temperature`` may differ from 1: probabilities are then tempered as softmax(log p / T)."""
    return isinstance(temperature, torch.Tensor) or temperature != 1


def probs_as_logits(probs: torch.Tensor) -> torch.Tensor:
    """log p in the compute dtype (-inf where p = 0): the logits whose softmax(. / T) tempers ``probs``."""
    return probs.to(compute_dtype(probs.dtype)).log()


def exact_ceil_product(c: torch.Tensor, n: int) -> torch.Tensor:
    """ceil(c * n) of the exact product, for float64 c in [0, 1] and an int 1 <= n < 2^26 (NaN stays NaN).

    The rounded product can land on an integer that the exact one misses by less than an ulp (the float64
    0.9 times 10 rounds to 9, while the double 0.9 exceeds 9/10). Dekker's split c = hi + lo, each of
    at most 26 significant bits, makes hi n and lo n exact; with k = floor(hi n) and f = hi n - k (exact),
    c n = k + f + lo n and ceil(c n) = k + ceil(f + lo n), where f + lo n lies within (-1, 2) and its
    ceiling follows from exact comparisons of f with -lo n and of f - 1 with -lo n."""
    t = c * 134217729.0  # 2^27 + 1
    hi = t - (t - c)
    lo_n = (c - hi) * n
    hi_n = hi * n
    k = torch.floor(hi_n)
    f = hi_n - k
    return k + torch.where(f <= -lo_n, 0.0, torch.where(f - 1 > -lo_n, 2.0, 1.0))


def confidence_bins(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The 0-based bin of each confidence among ``n_bins`` equal bins of [0, 1]: bin m (1-based) holds
    ((m - 1)/M, m/M], a confidence of 0 joins the first bin and a NaN one (a row with no distribution)
    the last. Compared with m/M exactly: for float32 (and lower) confidences c * M is exact in float64,
    so ceil(c * M) - 1 is; float64 ones take ``exact_ceil_product``."""
    if confidence.dtype == torch.float64:
        m = exact_ceil_product(confidence, n_bins)
    else:
        m = torch.ceil(confidence.double() * n_bins)
    return (m.nan_to_num(n_bins).long() - 1).clamp_(0, n_bins - 1)


def top_label_rows(
    logits: torch.Tensor, target: torch.Tensor, temperature: float | torch.Tensor = 1.0, probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` (N, C) with target (N,) in [0, C): (confidence max_j p_j, correct
    [argmax_j p_j = y] (the first index of the max), NLL -log p_y, Brier sum_j (p_j - [j = y])^2),
    with p = softmax(logits / T) in the compute dtype (with ``probs``, the rows p themselves at T = 1,
    else softmax(log p / T)).
    The confidence is 1 / sum_j e^(z_j - max z), z = logits / T, as the kernel forms it; the prediction
    is the argmax of the logits themselves: rounding can tie classes in p that it does not tie in them."""
    x = logits.to(compute_dtype(logits.dtype))
    if probs and is_tempered(temperature):
        x, probs = probs_as_logits(x), False
    if probs:
        p, log_p = x, x.log()
        confidence = p.amax(-1)
    else:
        z = scale_logits(x, temperature, -1)
        d = z.exp().sum(-1, keepdim=True)
        p, log_p = z.exp() / d, z - d.log()
        confidence = 1 / d.squeeze(-1)
    p_y = p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    nll = -log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    brier = (p * p).sum(-1) - 2 * p_y + 1
    return confidence, logits.argmax(-1) == target, nll, brier


def calibration_sums(
    logits: torch.Tensor,
    target: torch.Tensor,
    n_bins: int,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = -100,
    probs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bin count, bin confidence sum, bin correct count, NLL sum, Brier sum) over the rows of
    ``logits`` (N, C) whose target (N,) is not ``ignore_index``; counts int64, sums float64. A tensor
    temperature holds one value or one per row."""
    valid = target != ignore_index
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0:
        temperature = temperature[valid]
    confidence, correct, nll, brier = top_label_rows(logits[valid], target[valid], temperature, probs)
    count, n_correct, confidence_sum = binned_sums(confidence_bins(confidence, n_bins), correct, confidence, n_bins)
    return count, confidence_sum, n_correct, nll.double().sum(), brier.double().sum()


def binned_sums(bins: torch.Tensor, correct: torch.Tensor, confidence: torch.Tensor,
                n_bins: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(count int64, correct count int64, confidence sum float64) per bin, from each sample's 0-based
    bin (any shape, as ``correct`` and ``confidence``)."""
    bins = bins.flatten()
    count = torch.zeros(n_bins, dtype=torch.int64, device=bins.device).index_add_(0, bins, torch.ones_like(bins))
    n_correct = torch.zeros_like(count).index_add_(0, bins, correct.flatten().long())
    total = torch.zeros(n_bins, dtype=torch.float64, device=bins.device)
    return count, n_correct, total.index_add_(0, bins, confidence.flatten().double())


def adaptive_bins(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-mass bins: the sample of rank r among N (ascending confidence) goes to bin floor(r M / N),
    where equal confidences all take the rank of the first of them, so that ties share a bin. With
    N < M some bins stay empty. A NaN confidence (a row with no distribution) joins the last bin."""
    n = confidence.numel()
    first_rank = torch.searchsorted(confidence.sort().values, confidence, right=False)
    return (first_rank * n_bins // max(n, 1)).clamp_(max=n_bins - 1)


def temperature_nll_derivatives(
    logits: torch.Tensor, target: torch.Tensor, inv_temperature: float, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sums over the rows not ignored, in float64, of NLL(u) = ln sum_j e^(u x_j) - u x_y and its
    derivatives in u = 1/T: NLL' = E_p[x] - x_y and NLL'' = Var_p[x], p = softmax(u x)."""
    valid = target != ignore_index
    x = logits[valid].to(compute_dtype(logits.dtype))
    y = target[valid].unsqueeze(-1)
    x = x - x.amax(-1, keepdim=True)
    log_p = torch.log_softmax(x * inv_temperature, -1)
    p = log_p.exp()
    live = p > 0
    xs = torch.where(live, x, 0.0)
    mean = (p * xs).sum(-1)
    var = (p * (xs - mean.unsqueeze(-1)) ** 2).sum(-1)
    nll = -log_p.gather(-1, y).squeeze(-1)
    grad = mean - x.gather(-1, y).squeeze(-1)
    return nll.double().sum(), grad.double().sum(), var.double().sum()


def fidelity_rows(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``student_logits`` (N, C) and ``teacher_logits`` (K, N, C): ([argmax q = argmax p],
    KL(p || q)), with q = softmax(student / T) and p = mean_k softmax(teacher_k / T). The argmax (its
    first index) is taken of the logits for the student and a single teacher, of p for an ensemble."""
    log_q = torch.log_softmax(scale_logits(student_logits, temperature, -1), -1)
    log_p = torch.log_softmax(scale_logits(teacher_logits, temperature, -1), -1)
    log_p = torch.logsumexp(log_p, 0) - math.log(log_p.shape[0])
    teacher_top = teacher_logits[0].argmax(-1) if teacher_logits.shape[0] == 1 else log_p.argmax(-1)
    return student_logits.argmax(-1) == teacher_top, kd_divergence(log_p, log_q, "forward_kl")
