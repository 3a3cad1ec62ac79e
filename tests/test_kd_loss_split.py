"""The distillation loss's kernel split in two launches (issue 20): the forward's STATS phase writes the
row losses and N_STATS row statistics, the backward's GRAD phase writes the gradient times dL/dloss from
them. Both must give what the fused launch gives: the same row losses, and its gradient times dL/dloss.
Triton only (the interpreter without a GPU); one teacher (the statistics hold one teacher's)."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, DEVICE, assert_close

from fastkd._host import kd_outputs
from fastkd._options import KDOptions

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="the split is a Triton kernel's")


def _logits(*shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (3.0 * torch.randn(shape, generator=gen)).to(DEVICE)


@pytest.mark.parametrize("width", [37, 1000, 4097])
@pytest.mark.parametrize(
    ("divergence", "norm"),
    [("forward_kl", None), ("reverse_kl", None), ("jsd", None), ("reverse_kl", "standardize"), ("tvd", "standardize")],
)
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar", "per_row"])
def test_stats_then_grad_is_the_fused_gradient_times_dl_dloss(width, divergence, norm, per_row):
    import fastkd.backends.triton as triton_backend
    from fastkd.kernels.kd_loss import N_STATS

    n_rows = 3
    student, teacher = _logits(n_rows, width), _logits(1, n_rows, width, seed=1)
    target = torch.randint(0, width, (n_rows,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    target[1] = -100
    options = KDOptions(temperature=2.0, divergence=divergence, logit_norm=norm, label_smoothing=0.1, alpha=0.5,
                        reduction="none" if per_row else "mean")  # fmt: skip
    fused = kd_outputs(student, target, options, False, True)
    triton_backend._kd_launch(student, teacher, target, options, fused, "fused")
    split = kd_outputs(student, target, options, False, True)
    stats = torch.full((n_rows, N_STATS), float("nan"), device=DEVICE)
    triton_backend._kd_launch(student, teacher, target, options, split, "stats", stats)
    grad_output = (
        torch.tensor([2.5, -1.0, 0.5], device=DEVICE) if per_row else torch.tensor(2.5, device=DEVICE)
    )
    grad = torch.full_like(student, float("nan"))
    triton_backend._kd_launch(student, teacher, target, options, split, "grad", stats, grad, grad_output)
    assert_close(split.rows, fused.rows, torch.float32)
    want = fused.grad * (grad_output[:, None] if per_row else grad_output)
    assert_close(grad, want, torch.float32)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # the ignored row
