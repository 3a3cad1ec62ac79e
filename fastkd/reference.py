"""Pure-PyTorch reference implementations: the oracle of every kernel test and the CPU path.

Written for clarity, not speed. Math runs in float32 whatever the input dtype (float64 for float64
inputs, which the tests use as the exact answer); results are returned in the input's dtype. The
functions take arguments already checked by ``fastkd._validate`` (a temperature is a float or a tensor
holding one value or one value per row, on the logits' device).
"""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 inputs, float32 for the others."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_logits(logits: torch.Tensor, temperature: float | torch.Tensor, dim: int) -> torch.Tensor:
    """logits / T in the compute dtype, with a tensor T of one value per row broadcast along ``dim``.

    A -inf logit (a masked class) is -inf at every temperature: it is treated as a constant of T, so
    that dL/dT stays finite (autograd would otherwise form -x/T^2 * 0 = inf * 0 = NaN there).
    """
    x = logits.to(compute_dtype(logits.dtype))
    if not isinstance(temperature, torch.Tensor):
        return x / temperature
    t = temperature.to(x.dtype)
    if t.dim() > 0:
        t = t.unsqueeze(dim)
    masked = torch.isneginf(x)
    return torch.where(masked, 0.0, x) / t + torch.where(masked, x, 0.0) / t.detach()


def tempered_softmax(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, dim: int = -1) -> torch.Tensor:
    """softmax(logits / T) along ``dim``."""
    return torch.softmax(scale_logits(logits, temperature, dim), dim=dim).to(logits.dtype)


def tempered_log_softmax(
    logits: torch.Tensor, temperature: float | torch.Tensor = 1.0, dim: int = -1
) -> torch.Tensor:
    """log softmax(logits / T) along ``dim``."""
    return torch.log_softmax(scale_logits(logits, temperature, dim), dim=dim).to(logits.dtype)
