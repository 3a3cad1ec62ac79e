"""Bad input raises a named TypeError/ValueError before any kernel runs, on every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastkd

X = torch.randn(4, 10, device=DEVICE)
OPS = [fastkd.tempered_softmax, fastkd.tempered_log_softmax]


@pytest.fixture(params=OPS, ids=["softmax", "log_softmax"])
def op(request):
    return request.param


@pytest.mark.parametrize(
    "logits, error, match",
    [
        ([[1.0, 2.0]], TypeError, "logits must be a torch.Tensor, got list"),
        (torch.ones(2, 3, dtype=torch.int64), TypeError, "logits must be a floating-point tensor.*int64"),
        (torch.ones(2, 3, dtype=torch.bool), TypeError, "logits must be a floating-point tensor.*bool"),
        (torch.ones(2, 3, dtype=torch.complex64), TypeError, "logits must be a floating-point tensor"),
        (torch.ones(2, 3).to(torch.float8_e4m3fn), TypeError, "logits dtype torch.float8_e4m3fn is not supported"),
        (torch.tensor(1.0), ValueError, "logits must have at least one dimension"),
    ],
    ids=["list", "int64", "bool", "complex", "float8", "0-d"],
)
def test_bad_logits(op, backend, logits, error, match):
    with pytest.raises(error, match=match):
        op(logits, backend=backend)


@pytest.mark.parametrize(
    "dim, error, match",
    [(2, ValueError, r"dim=2 is out of range .* 2 dimension"), (-3, ValueError, "dim=-3"), (1.0, TypeError, "dim must be an int")],
)
def test_bad_dim(op, backend, dim, error, match):
    with pytest.raises(error, match=match):
        op(X, 1.0, dim, backend=backend)


@pytest.mark.parametrize(
    "temperature, error, match",
    [
        (0.0, ValueError, "temperature must be finite and > 0, got 0.0"),
        (-2, ValueError, "temperature must be finite and > 0, got -2"),
        (float("nan"), ValueError, "temperature must be finite and > 0, got nan"),
        (float("inf"), ValueError, "temperature must be finite and > 0, got inf"),
        (True, TypeError, "temperature must be a float or a tensor, got bool"),
        ("4", TypeError, "temperature must be a float or a tensor, got str"),
        (torch.tensor(2), TypeError, "temperature must be a floating-point tensor, got torch.int64"),
        (torch.tensor([1.0, 0.0, 1.0, 1.0]), ValueError, "temperature must be finite and > 0, got 0.0"),
        (torch.tensor(-1.0), ValueError, "temperature must be finite and > 0, got -1.0"),
        (torch.tensor([1.0, float("nan"), 1.0, 1.0]), ValueError, "temperature must be finite and > 0, got nan"),
        (torch.ones(5), ValueError, r"temperature must be a scalar or hold one value per row, shape \(4,\).*got shape \(5,\)"),
        (torch.ones(4, 10), ValueError, r"temperature must be a scalar or hold one value per row"),
    ],
    ids=["zero", "negative", "nan", "inf", "bool", "str", "int-tensor", "zero-row", "negative-0d", "nan-row",
         "wrong-rows", "full-shape"],
)  # fmt: skip
def test_bad_temperature(op, backend, temperature, error, match):
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.to(DEVICE)
    with pytest.raises(error, match=match):
        op(X, temperature, backend=backend)


def test_temperature_on_another_device(op, backend):
    with pytest.raises(ValueError, match="temperature is on meta but logits are on"):
        op(X, torch.ones(4, device="meta"), backend=backend)


def test_cpu_scalar_temperature_is_accepted(op, backend):
    """A 0-d CPU tensor is a scalar, as in PyTorch's own ops, whatever the logits' device."""
    y = op(X, torch.tensor(2.0), backend=backend)
    torch.testing.assert_close(y, op(X, 2.0, backend="torch"))


def test_validate_args_false_skips_value_checks(backend):
    t = torch.tensor(-2.0, device=DEVICE)
    with pytest.raises(ValueError, match="temperature must be finite and > 0, got -2.0"):
        fastkd.tempered_softmax(X, t, backend=backend)
    fastkd.tempered_softmax(X, t, backend=backend, validate_args=False)  # the tensor's values are not read
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):  # a float costs no read
        fastkd.tempered_softmax(X, 0.0, backend=backend, validate_args=False)


@pytest.mark.gpu
def test_validate_args_false_does_not_synchronize():
    x, t = torch.randn(4, 10, device="cuda"), torch.tensor(2.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastkd.tempered_softmax(x, t, validate_args=False)
        with pytest.raises(RuntimeError, match="synchroniz"):
            fastkd.tempered_softmax(x, t)
    finally:
        torch.cuda.set_sync_debug_mode(0)
