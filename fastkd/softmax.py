"""Tempered softmax and log-softmax, ``softmax(logits / T)`` along a dimension, as functions and a module.

The path of one call: check the arguments (``fastkd._validate``), pick a backend
(``fastkd._backend``), then either the reference (``fastkd.reference``; autograd differentiates it) or
the kernels: the logits are viewed as rows (N, V) and ``TemperedSoftmaxFunction`` runs the forward and
backward kernels. Inside ``torch.compile`` the kernels are reached through the ``torch.library`` ops
``fastkd::tempered_softmax_fwd`` / ``_bwd``, which the compiler treats as opaque calls with known output
shapes, so a compiled graph does not break on them; eager calls go to the launchers directly and skip
the op dispatch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd._backend import resolve_backend
from fastkd._validate import check_dim, check_logits, check_temperature, should_check_values


# Each op takes the temperature as a tensor or, when that is None, the float that follows it: the
# schema of a torch.library op has no union of the two.
@torch.library.custom_op("fastkd::tempered_softmax_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, t_tensor: Tensor | None, t_value: float, log: bool, store_stats: bool
) -> tuple[Tensor, Tensor]:
    from fastkd.kernels.softmax import tempered_softmax_forward

    return tempered_softmax_forward(x, t_value if t_tensor is None else t_tensor, log, store_stats)


@_fwd_op.register_fake
def _(x, t_tensor, t_value, log, store_stats):
    return x.new_empty(x.shape), x.new_empty((x.shape[0] if store_stats else 0, 2), dtype=torch.float32)


@torch.library.custom_op("fastkd::tempered_softmax_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor,
    saved: Tensor,
    t_tensor: Tensor | None,
    t_value: float,
    stats: Tensor,
    log: bool,
    need_dx: bool,
    need_dt: bool,
) -> tuple[Tensor, Tensor]:
    from fastkd.kernels.softmax import tempered_softmax_backward

    temperature = t_value if t_tensor is None else t_tensor
    dx, dt = tempered_softmax_backward(grad, saved, temperature, stats, log, need_dx, need_dt)
    return (saved.new_empty(0) if dx is None else dx), (saved.new_empty(0, dtype=torch.float32) if dt is None else dt)


@_bwd_op.register_fake
def _(grad, saved, t_tensor, t_value, stats, log, need_dx, need_dt):
    dx = saved.new_empty(saved.shape if need_dx else 0)
    return dx, saved.new_empty(saved.shape[0] if need_dt else 0, dtype=torch.float32)


def _split(temperature: float | Tensor) -> tuple[Tensor | None, float]:
    """The ops' (t_tensor, t_value) pair for a temperature."""
    return (temperature, 1.0) if isinstance(temperature, Tensor) else (None, temperature)


def _forward(x, temperature, log, store_stats):
    """The forward launcher, reached through its op while compiling (see the module doc)."""
    if torch.compiler.is_compiling():
        return _fwd_op(x, *_split(temperature), log, store_stats)
    from fastkd.kernels.softmax import tempered_softmax_forward

    return tempered_softmax_forward(x, temperature, log, store_stats)


def _backward(grad, saved, temperature, stats, log, need_dx, need_dt):
    """The backward launcher, reached through its op while compiling."""
    if torch.compiler.is_compiling():
        dx, dt = _bwd_op(grad, saved, *_split(temperature), stats, log, need_dx, need_dt)
        return (dx if need_dx else None), (dt if need_dt else None)
    from fastkd.kernels.softmax import tempered_softmax_backward

    return tempered_softmax_backward(grad, saved, temperature, stats, log, need_dx, need_dt)


class TemperedSoftmaxFunction(torch.autograd.Function):
    """softmax(x / T), or its log, over the rows of x (N, V) with the Triton kernels.

    ``temperature`` is a float, a one-element tensor or an (N,) tensor; a tensor gets a gradient.
    The backward keeps the output y (as ``torch.softmax`` does) or, when T needs a gradient, the
    logits x and two floats per row (see ``fastkd.kernels.softmax``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, temperature: float | Tensor, log: bool) -> Tensor:
        need_dt = ctx.needs_input_grad[1]
        if need_dt:  # the backward reads the logits as the kernel does: rows of unit column stride
            x = x if x.stride(-1) == 1 else x.contiguous()
        y, stats = _forward(x, temperature, log, store_stats=need_dt)
        t_tensor = temperature if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(x if need_dt else y, t_tensor, stats)
        ctx.t_value, ctx.log = temperature if t_tensor is None else None, log
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        saved, t_tensor, stats = ctx.saved_tensors
        need_dx, need_dt = ctx.needs_input_grad[:2]
        temperature = ctx.t_value if t_tensor is None else t_tensor
        dx, dt_rows = _backward(grad, saved, temperature, stats, ctx.log, need_dx, need_dt)
        if not need_dt:
            return dx, None, None
        dt = dt_rows.sum() if t_tensor.dim() == 0 else dt_rows
        return dx, dt.to(t_tensor.dtype), None


def _tempered_softmax(logits, temperature, dim, log, backend, validate_args) -> Tensor:
    check_logits(logits)
    dim = check_dim(dim, logits.dim())
    temperature = check_temperature(temperature, logits, dim, check_values=should_check_values(validate_args))
    if resolve_backend(backend, logits) == "torch":
        return (reference.tempered_log_softmax if log else reference.tempered_softmax)(logits, temperature, dim)
    x = logits.movedim(dim, -1)
    if isinstance(temperature, Tensor) and temperature.dim() > 0:
        temperature = temperature.reshape(-1)  # one per row; may keep a stride, which the kernels take
    y = TemperedSoftmaxFunction.apply(x.reshape(x.shape[:-1].numel(), x.shape[-1]), temperature, log)
    return y.reshape(x.shape).movedim(-1, dim)


def tempered_softmax(
    logits: Tensor,
    temperature: float | Tensor = 1.0,
    dim: int = -1,
    *,
    backend: str = "auto",
    validate_args: bool = True,
) -> Tensor:
    """``softmax(logits / temperature)`` along ``dim``, the soft targets of knowledge distillation.

    Args:
        logits: any shape, float16/bfloat16/float32/float64; any strides. Math runs in float32
            (float64 for float64 logits); the result has the logits' dtype and shape.
        temperature: T > 0, finite. A float, a one-element tensor, or a tensor with one temperature per
            row: the shape of ``logits`` without ``dim`` (or with size 1 at ``dim``). A tensor
            temperature gets a gradient, ``dL/dT = -(1/T) sum_j (x_j / T) dL/du_j`` with ``u = x / T``.
        dim: the class dimension. For ``dim`` other than the last, the kernels work on the logits with
            ``dim`` moved last and return that layout viewed back: a non-contiguous result.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastkd._backend``).
        validate_args: check the values of a tensor temperature (a host sync on CUDA). Types,
            shapes, devices and float temperatures are always checked. Tensor values are not checked
            inside ``torch.compile``, where an exception cannot depend on them: there, and with
            ``validate_args=False``, the rows of a temperature that is not finite and > 0 come out NaN.

    A -inf logit (a masked class) gets probability 0 and is a constant of T. A row whose logits are
    all -inf has no distribution: its result is NaN, as with ``torch.softmax``.
    """
    return _tempered_softmax(logits, temperature, dim, False, backend, validate_args)


def tempered_log_softmax(
    logits: Tensor,
    temperature: float | Tensor = 1.0,
    dim: int = -1,
    *,
    backend: str = "auto",
    validate_args: bool = True,
) -> Tensor:
    """``log_softmax(logits / temperature)`` along ``dim``; arguments as in ``tempered_softmax``.

    A -inf logit gets log-probability -inf; a row of all -inf logits gives NaN.
    """
    return _tempered_softmax(logits, temperature, dim, True, backend, validate_args)


class TemperedSoftmax(nn.Module):
    """``tempered_softmax`` (``tempered_log_softmax`` with ``log=True``) as a module.

    A tensor ``temperature`` is registered as a buffer (an ``nn.Parameter`` as a parameter, to learn
    it), so it follows the module's ``.to()`` and ``state_dict``.
    """

    def __init__(
        self, temperature: float | Tensor = 1.0, dim: int = -1, *, log: bool = False, backend: str = "auto"
    ):
        super().__init__()
        if isinstance(temperature, Tensor) and not isinstance(temperature, nn.Parameter):
            self.register_buffer("temperature", temperature)
        else:
            self.temperature = temperature
        self.dim, self.log, self.backend = dim, log, backend

    def forward(self, logits: Tensor) -> Tensor:
        fn = tempered_log_softmax if self.log else tempered_softmax
        return fn(logits, self.temperature, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        t = "tensor" if isinstance(self.temperature, Tensor) else self.temperature
        return f"temperature={t}, dim={self.dim}, log={self.log}, backend={self.backend!r}"
