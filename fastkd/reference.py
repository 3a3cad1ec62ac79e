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
    if t.dim() > 0:
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
