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


@torch.library.custom_op("fastkd::tempered_softmax_fwd", mutates_args=())
def _fwd_op(
    x: Tensor, temperature: Tensor | None, t_value: float, log: bool, store_lse: bool
) -> tuple[Tensor, Tensor]:
    from fastkd.kernels.softmax import tempered_softmax_forward

    return tempered_softmax_forward(x, temperature, t_value, log, store_lse)


@_fwd_op.register_fake
def _(x, temperature, t_value, log, store_lse):
    return x.new_empty(x.shape), x.new_empty(x.shape[0] if store_lse else 0, dtype=torch.float32)


@torch.library.custom_op("fastkd::tempered_softmax_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, y: Tensor, temperature: Tensor | None, t_value: float, lse: Tensor, log: bool, need_dt: bool
) -> tuple[Tensor, Tensor]:
    from fastkd.kernels.softmax import tempered_softmax_backward

    return tempered_softmax_backward(grad, y, temperature, t_value, lse, log, need_dt)


@_bwd_op.register_fake
def _(grad, y, temperature, t_value, lse, log, need_dt):
    return y.new_empty(y.shape), y.new_empty(y.shape[0] if need_dt else 0, dtype=torch.float32)


def _launchers():
    """(forward, backward): the registered ops while compiling, the kernel launchers otherwise."""
    if torch.compiler.is_compiling():
        return _fwd_op, _bwd_op
    from fastkd.kernels.softmax import tempered_softmax_backward, tempered_softmax_forward

    return tempered_softmax_forward, tempered_softmax_backward


class TemperedSoftmaxFunction(torch.autograd.Function):
    """softmax(x / T), or its log, over the rows of x (N, V) with the Triton kernels.

    ``temperature`` is a float, a one-element tensor or an (N,) tensor; a tensor gets a gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, temperature: float | Tensor, log: bool) -> Tensor:
        t_tensor = temperature if isinstance(temperature, Tensor) else None
        t_value = 1.0 if t_tensor is not None else temperature
        forward, _ = _launchers()
        y, lse = forward(x, t_tensor, t_value, log, log and ctx.needs_input_grad[1])
        ctx.save_for_backward(y, t_tensor, lse)
        ctx.t_value, ctx.log = t_value, log
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor | None, None]:
        y, t_tensor, lse = ctx.saved_tensors
        need_dt = ctx.needs_input_grad[1]
        _, backward = _launchers()
        dx, dt_rows = backward(grad, y, t_tensor, ctx.t_value, lse, ctx.log, need_dt)
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
        temperature = temperature.reshape(-1)
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
        dim: the class dimension.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (see ``fastkd._backend``).
        validate_args: check the values of a tensor temperature (a host sync on CUDA; skipped inside
            ``torch.compile``). Types, shapes and devices are always checked. Without the check, a
            temperature <= 0 gives an unspecified result.

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

    A tensor ``temperature`` (an ``nn.Parameter`` to learn it) is used as given, on every call.
    """

    def __init__(
        self, temperature: float | Tensor = 1.0, dim: int = -1, *, log: bool = False, backend: str = "auto"
    ):
        super().__init__()
        self.temperature, self.dim, self.log, self.backend = temperature, dim, log, backend

    def forward(self, logits: Tensor) -> Tensor:
        fn = tempered_log_softmax if self.log else tempered_softmax
        return fn(logits, self.temperature, self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, dim={self.dim}, log={self.log}, backend={self.backend!r}"
