"""Tempered softmax and log-softmax, ``softmax(logits / T)`` along a dimension, as functions and a module.

The path of one call: check the arguments (``fastkd._validate``), resolve the backend's implementation
(``fastkd._backend``), view the logits as rows (N, V) and run ``TemperedSoftmaxFunction``, whose
forward and backward call the implementation (``fastkd._ops``). Inside ``torch.compile`` they are
reached through the ``torch.library`` ops ``fastkd::tempered_softmax_fwd`` / ``_bwd``, which the
compiler treats as opaque calls with known output shapes, so a compiled graph does not break on them;
eager calls skip the op dispatch.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from fastkd._autograd import first_order
from fastkd._backend import check_backend_name, resolve_backend
from fastkd._host import unit_column_stride
from fastkd._ops import softmax_backward, softmax_forward
from fastkd._validate import check_dim, check_logits, check_scalar_temperature, check_temperature, should_check_values


class TemperedSoftmaxFunction(torch.autograd.Function):
    """softmax(x / T), or its log, over the rows of x (N, V) with the backend's implementation ``impl``.

    ``temperature`` is a float, a one-element tensor or an (N,) tensor; a tensor gets a gradient.
    The backward keeps the output y (as ``torch.softmax`` does) or, when T needs a gradient, the
    logits x (as the forward read them: a unit column stride) and two floats per row (see
    ``kernels/softmax.py``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, temperature: float | Tensor, log: bool, impl: ModuleType) -> Tensor:
        need_dt = ctx.needs_input_grad[1]
        x = unit_column_stride(x)  # the layout every implementation reads, and what a backward for dT keeps
        y, stats = softmax_forward(impl, x, temperature, log, store_stats=need_dt)
        t_tensor = temperature if isinstance(temperature, Tensor) else None
        ctx.save_for_backward(x if need_dt else y, t_tensor, stats)
        ctx.t_value, ctx.log, ctx.impl = temperature if t_tensor is None else None, log, impl
        return y

    @staticmethod
    @first_order("tempered_softmax")
    def backward(ctx, grad: Tensor):
        saved, t_tensor, stats = ctx.saved_tensors
        need_dx, need_dt = ctx.needs_input_grad[:2]
        temperature = ctx.t_value if t_tensor is None else t_tensor
        dx, dt_rows = softmax_backward(ctx.impl, grad, saved, temperature, stats, ctx.log, need_dx, need_dt)
        if not need_dt:
            return dx, None, None, None
        dt = dt_rows.sum() if t_tensor.dim() == 0 else dt_rows
        return dx, dt.to(t_tensor.dtype), None, None


def _tempered_softmax(logits, temperature, dim, log, backend, validate_args) -> Tensor:
    check_logits(logits)
    dim = check_dim(dim, logits.dim())
    temperature = check_temperature(temperature, logits, dim, check_values=should_check_values(validate_args))
    impl = resolve_backend(backend, logits)
    x = logits.movedim(dim, -1)
    if isinstance(temperature, Tensor) and temperature.dim() > 0:
        temperature = temperature.reshape(-1)  # one per row; may keep a stride, which the backends take
    y = TemperedSoftmaxFunction.apply(x.reshape(x.shape[:-1].numel(), x.shape[-1]), temperature, log, impl)
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
        backend: ``"auto"`` or a registered backend's name: ``"triton"``, ``"torch"`` (see
            ``fastkd._backend``).
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
        check_scalar_temperature(temperature)
        check_backend_name(backend)
        if not isinstance(log, bool):
            raise TypeError(f"log must be a bool, got {type(log).__name__}")
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
