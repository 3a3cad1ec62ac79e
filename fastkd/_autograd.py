"""What every fastkd autograd Function shares: a backward that is first order only, with an error that
names the op when a second derivative is asked for."""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch._C import _functions


def first_order(op: str):
    """Decorate a Function's ``backward`` as ``once_differentiable`` does (it runs without building a
    graph), but whatever the inputs: when a graph is asked for (``create_graph=True``), the gradients
    returned carry a node whose own backward raises an error naming ``op``. The gradients are those of
    kernels (or of a closed form), not of autograd, on every backend alike."""
    message = (f"{op} has no second derivative: its gradient is computed by fastkd (a kernel, or its closed "
               "form), not recorded by autograd; differentiate a loss that does not go through it").encode()  # fmt: skip

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *args):
            with torch.no_grad():
                grads = backward(ctx, *args)
            if not torch.is_grad_enabled():
                return grads
            return tuple(
                _functions.DelayedError(message, 1)(g.detach().requires_grad_()) if isinstance(g, Tensor) else g
                for g in grads
            )

        return wrapper

    return decorate
