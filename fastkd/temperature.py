"""Temperature scaling (Guo et al., 2017): the T > 0 that minimizes the NLL of softmax(logits / T).

With u = 1/T, the mean NLL over N rows with logits x and targets y,

    NLL(u) = mean_i [ln sum_j e^(u x_ij) - u x_iy],
    NLL'(u) = mean_i (E_p[x_i] - x_iy),        NLL''(u) = mean_i Var_p[x_i] >= 0,   p = softmax(u x_i),

is convex in u, and one read of the logits gives all three (``fastkd.kernels.calibration``, "newton"
mode). ``fit_temperature`` runs Newton's method on u from u = 1, safeguarded by the bracket that the
signs of NLL' give, as Numerical Recipes' ``rtsafe`` does: a Newton step that leaves the bracket, or
that is not under half the Newton step before it (Newton crawling, not converging quadratically), is
replaced by a geometric bisection of the bracket (u is a scale) or, until the optimum is bracketed, by a
move that at least doubles (or halves) u. Each iteration is one pass over the logits; it stops when the
Newton step is below ``rtol`` * u (the optimum is then within about that of u, by Newton's quadratic
convergence). T stays in ``bounds``: when the optimum lies beyond one (e.g. data every prediction of
which is right, whose NLL falls toward 0 as T -> 0), T is that bound (also when the slope underflows to
0 in float32 on the way: the NLL has then reached its infimum to working precision, and ``nll`` is that
infimum). Otherwise the T returned is the one the last pass evaluated, ``nll`` and ``grad`` its values.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from fastkd.calibration import _prepare
from fastkd._validate import check_int, check_number


class FittedTemperature(float):
    """The fitted T (a float), with how the fit went: ``passes`` over the logits, ``nll`` at T and
    ``nll_initial`` at T = 1 (mean over the rows counted), ``grad`` = dNLL/du at u = 1/T, ``converged``
    (False when ``max_passes`` ran out), ``at_bound`` (T is an end of ``bounds``)."""

    passes: int
    nll: float
    nll_initial: float
    grad: float
    converged: bool
    at_bound: bool

    def __new__(cls, temperature: float, **info):
        self = super().__new__(cls, temperature)
        self.__dict__.update(info)
        return self

    def __repr__(self) -> str:
        return (f"FittedTemperature({float(self)!r}, passes={self.passes}, nll={self.nll:.6g}, "
                f"nll_initial={self.nll_initial:.6g}, converged={self.converged}, at_bound={self.at_bound})")  # fmt: skip


def _nll_derivatives(rows, target, u, probs, ignore_index, impl) -> list[float]:
    """[sum NLL, sum NLL', sum NLL''] over the rows not ignored, at u (one pass over the logits; rows of
    probabilities p are read as logits log p)."""
    out = impl.calibration_pass(rows, target, "newton", 1.0 / u, probs, ignore_index, 1)
    return torch.stack([out["nll"], out["grad"], out["hess"]]).tolist()


def fit_temperature(
    logits: Tensor,
    target: Tensor,
    *,
    input: str = "logits",
    ignore_index: int = -100,
    bounds: tuple[float, float] = (1e-2, 1e2),
    rtol: float = 1e-6,
    max_passes: int = 50,
    backend: str = "auto",
    validate_args: bool = True,
) -> FittedTemperature:
    """The temperature T > 0 minimizing the mean NLL of softmax(logits / T) against ``target``.

    Args:
        logits: (N, C) or (B, S, C), float16/bfloat16/float32/float64 (with ``input="probs"``,
            probabilities: T then scales log p); e.g. a teacher's logits on a held-out split.
        target: int64 (or int32) class indices of the logits' shape without C; rows whose target is
            ``ignore_index`` are skipped.
        bounds: (T_min, T_max), 0 < T_min < 1 < T_max: the range searched.
        rtol: stop once a Newton step changes u = 1/T by less than rtol * u.
        max_passes: the most passes over the logits.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastkd._backend``).

    Returns a ``FittedTemperature``: a float, with the number of passes and the NLL before and after.
    Warns (``UserWarning``) when T is an end of ``bounds`` (the optimum lies beyond it) or ``max_passes``
    ran out before convergence: the T returned is then not the optimum. Raises ``ValueError`` when every
    row is ignored, or when the NLL is not finite (a target class of probability 0, a row of all -inf
    or NaN): no temperature fixes those.
    """
    if not (isinstance(bounds, tuple) and len(bounds) == 2):
        raise TypeError(f"bounds must be a tuple (T_min, T_max), got {bounds!r}")
    t_min = check_number(bounds[0], "bounds[0]", 0.0, 1.0, low_open=True, high_open=True)
    t_max = check_number(bounds[1], "bounds[1]", 1.0, math.inf, low_open=True, high_open=True)
    check_number(rtol, "rtol", 0.0, 1.0, low_open=True, high_open=True)
    check_int(max_passes, "max_passes", 1)
    rows, target, _, probs, impl = _prepare(logits, target, 1.0, input, ignore_index, backend, validate_args)
    count = int((target != ignore_index).sum())
    if count == 0:
        raise ValueError(f"target: every row is ignore_index={ignore_index}; nothing to fit a temperature to")

    u_min, u_max = 1.0 / t_max, 1.0 / t_min
    lo, hi = 0.0, math.inf  # NLL' < 0 at lo, > 0 at hi: the optimum lies between
    u, passes, converged, at_bound, nll_initial, last_step = 1.0, 0, False, False, None, math.inf
    while True:
        nll, grad, hess = (total / count for total in _nll_derivatives(rows, target, u, probs, ignore_index, impl))
        passes += 1
        if not (math.isfinite(nll) and math.isfinite(grad)):
            raise ValueError(
                f"logits: the NLL at T = {1 / u:g} is {nll} (slope {grad}): a row's target class has "
                "probability 0 (a -inf logit, or a 0 among input='probs') or a row is all -inf or NaN"
            )
        nll_initial = nll if nll_initial is None else nll_initial
        if grad == 0 and hess == 0 and lo > 0:  # the slope underflowed while falling: NLL -> 0 as T -> 0
            u, at_bound, converged = u_max, True, True
            break
        if (u == u_min and grad > 0) or (u == u_max and grad < 0):
            at_bound = True  # the optimum lies beyond the bound
            break
        step = grad / hess if hess > 0 else math.copysign(math.inf, grad)
        if grad == 0 or abs(step) <= rtol * u:
            converged = True
            break
        if passes == max_passes:
            break
        if grad > 0:
            hi = u
        else:
            lo = u
        u_next = u - step
        # Crawling: on an exponential tail (an optimum at T -> 0) Newton moves u by ~1/margin a step for
        # ever, and after an overshoot it can creep back across the bracket.
        crawling, last_step = abs(step) > abs(last_step) / 2, step
        if hi == math.inf or lo == 0:  # not bracketed: crawling at least doubles (halves) u; out goes 4x
            if crawling:
                u_next = max(u_next, 2 * u) if hi == math.inf else min(u_next, u / 2)
            if not lo < u_next < hi:
                u_next = lo * 4 if hi == math.inf else hi / 4
        elif crawling or not lo < u_next < hi:
            u_next = math.sqrt(lo * hi)
        u = min(max(u_next, u_min), u_max)
    fitted = FittedTemperature(
        1.0 / u, passes=passes, nll=nll, nll_initial=nll_initial, grad=grad, converged=converged, at_bound=at_bound
    )
    if at_bound:
        warnings.warn(f"fit_temperature: the NLL's optimum lies beyond bounds={bounds}; T = {float(fitted):g} is the "
                      "bound, not the optimum (every prediction right by a wide margin, say)", stacklevel=2)  # fmt: skip
    elif not converged:
        warnings.warn(f"fit_temperature: max_passes={max_passes} ran out before convergence; T = {float(fitted):g} is "
                      "the last one evaluated (raise max_passes)", stacklevel=2)  # fmt: skip
    return fitted


class TemperatureScaler(nn.Module):
    """Divides logits by a fitted temperature: ``TemperatureScaler().fit(logits, target)(z) == z / T``.

    ``temperature`` is a 0-d float32 buffer (saved in the state dict); ``fit`` sets it with
    ``fit_temperature`` (keyword arguments passed on) and keeps the fit's report in ``fit_result``.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        check_number(temperature, "temperature", 0.0, math.inf, low_open=True, high_open=True)
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.fit_result: FittedTemperature | None = None

    @torch.no_grad()
    def fit(self, logits: Tensor, target: Tensor, **kwargs) -> TemperatureScaler:
        self.fit_result = fit_temperature(logits, target, **kwargs)
        self.temperature.fill_(float(self.fit_result))
        return self

    def forward(self, logits: Tensor) -> Tensor:
        return logits / self.temperature

    def extra_repr(self) -> str:
        return f"temperature={self.temperature.item():.6g}"
