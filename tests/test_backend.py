"""Backend dispatch: names, the FASTKD_BACKEND override, and what each backend refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, DEVICE

import fastkd
from fastkd import _backend
from fastkd._backend import resolve_backend

X = torch.randn(3, 8)


def test_auto_runs_the_cpp_kernels_on_cpu(monkeypatch):
    from fastkd import _ext

    assert resolve_backend("auto", X).NAME == ("cpu" if _ext.load() else "torch")
    monkeypatch.setattr(_ext, "load", lambda: False)  # no compiler, no installed build: PyTorch
    assert resolve_backend("auto", X).NAME == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_runs_triton_on_cuda(dtype):
    assert resolve_backend("auto", X.to("cuda", dtype)).NAME == "triton"


@pytest.mark.gpu
def test_auto_runs_the_reference_for_float64_on_cuda():
    assert resolve_backend("auto", X.to("cuda", torch.float64)).NAME == "torch"


def test_named_backends_are_kept():
    assert resolve_backend("torch", X).NAME == "torch"
    assert resolve_backend("triton", X.to(DEVICE)).NAME == "triton"  # CPU tensors: the interpreter is on


def test_environment_replaces_auto(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "triton")
    assert resolve_backend("auto", X.to(DEVICE)).NAME == "triton"
    assert resolve_backend("torch", X).NAME == "torch"  # an explicit backend wins
    with pytest.raises(TypeError, match="backend='triton' runs float16, bfloat16 and float32"):
        fastkd.tempered_softmax(X.double())  # the op reads the variable too


def test_unknown_names():
    with pytest.raises(ValueError, match="backend must be one of 'auto', .*'torch', 'triton'; got 'fast'"):
        resolve_backend("fast", X)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.tempered_softmax(X, backend=None)


def test_unknown_environment_value(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTKD_BACKEND must be one of .* got 'fast'"):
        fastkd.tempered_softmax(X)


def test_triton_refuses_float64():
    with pytest.raises(TypeError, match="use backend='torch'"):
        fastkd.tempered_softmax(X.double().to(DEVICE), backend="triton")


@pytest.mark.skipif(CUDA, reason="CPU tensors only")
def test_triton_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "_triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors, but logits are on cpu"):
        fastkd.tempered_softmax(X, backend="triton")


def test_triton_missing(monkeypatch):
    monkeypatch.setattr(_backend, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        fastkd.tempered_softmax(X, backend="triton")
    assert resolve_backend("auto", X.to(DEVICE)).NAME in ("cpu", "torch")  # never Triton
