"""The experimental CUDA backend (csrc/cuda/, fastkd.backends.cuda).

Here (no GPU): it is registered, ``"auto"`` never picks it, and it refuses CPU tensors and a machine
without CUDA with a named error. With a GPU (the ``gpu`` marker): every kernel path (one block, cluster,
multi-pass, forced on small rows through FASTKD_CUDA_PATH) against the float64 PyTorch backend, on
rows that are not 16-byte aligned, with every divergence, temperatures, label smoothing and ignored
rows; the calibration pass against the PyTorch backend. The op tests of tests/test_kd_loss.py and the
others run the backend too on a GPU (conftest's BACKENDS takes every usable registered backend).
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import _cuda_ext
from fastkd._backend import _REGISTRY, backend_names, resolve_backend
from tests.conftest import CUDA, TOL


def test_registered_and_never_auto():
    assert "cuda" in backend_names()
    entry = _REGISTRY["cuda"]
    assert entry.module == "fastkd.backends.cuda"
    for x in (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16), torch.empty(2, 3, device="meta")):
        assert entry.auto(x) is False
    assert resolve_backend("auto", torch.randn(2, 3)).NAME != "cuda"


def test_cpu_tensor_is_refused_with_a_named_error():
    with pytest.raises(
        ValueError, match=r"backend='cuda' \(experimental\) runs CUDA tensors, but logits are on cpu"
    ):
        resolve_backend("cuda", torch.randn(2, 3))
    x = torch.randn(4, 10, requires_grad=True)
    with pytest.raises(ValueError, match="runs CUDA tensors"):
        fastkd.kd_loss(x, torch.randn(4, 10), torch.randint(0, 10, (4,)), backend="cuda")


def test_fastkd_backend_environment_names_it(monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="runs CUDA tensors"):
        fastkd.kd_loss(torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,)))


@pytest.mark.skipif(CUDA, reason="checks the message of a machine without CUDA")
def test_no_cuda_reason_and_no_load():
    assert "CUDA" in _cuda_ext.unavailable_reason()
    assert _cuda_ext.load() is False
    assert "CUDA" in _cuda_ext.error()
    with pytest.raises(ImportError, match="CUDA extension did not load"):
        import fastkd.backends.cuda  # noqa: F401


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("FASTKD_CUDA_EXT", "0")
    assert _cuda_ext.unavailable_reason() == "FASTKD_CUDA_EXT=0 in the environment"


def test_sources_and_build_key():
    names = [p.name for p in _cuda_ext.sources()]
    assert names[0] == "bindings.cpp" and "kd_loss.cu" in names and "calibration.cu" in names
    assert any(p.name == "row_math.h" for p in _cuda_ext.headers())
    assert len(_cuda_ext.build_key(_cuda_ext._ext.sources_root())) == 16


# ---- on a GPU ----------------------------------------------------------------------------------------

PATHS = ["one_block", "cluster", "multi_pass"]
OPTIONS = [
    {"divergence": "forward_kl", "temperature": 2.0, "alpha": 0.5},
    {"divergence": "reverse_kl", "temperature": 1.0, "alpha": 0.7, "label_smoothing": 0.1},
    {"divergence": "jsd", "temperature": 4.0, "teacher_temperature": 2.0, "alpha": 0.9, "beta": 0.3},
    {"divergence": "forward_kl", "temperature": 1.0, "alpha": 0.0},
    {"divergence": "forward_kl", "temperature": 3.0, "alpha": 1.0, "reduction": "sum"},
    {"divergence": "skew_kl", "temperature": 2.0, "alpha": 0.5, "skew": 0.2},
    {"divergence": "skew_reverse_kl", "temperature": 2.0, "alpha": 0.5},
    {"divergence": "tvd", "temperature": 1.0, "alpha": 0.5},
    {"divergence": "ab", "temperature": 2.0, "alpha": 0.5, "ab_alpha": 0.8, "ab_beta": 0.3},
]


def _loss_and_grad(student, teacher, target, backend, **options):
    x = student.detach().clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, teacher, target, backend=backend, **options)
    (2 * loss).backward()  # grad_output != 1
    return loss.detach(), x.grad


@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", [1, 37, 1000, 20000])
@pytest.mark.parametrize("options", OPTIONS)
def test_kd_loss_matches_float64(monkeypatch, path, dtype, width, options):
    if path == "one_block" and width > 16384:
        pytest.skip("the one-block path holds rows of at most 16384")
    if path == "cluster" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("clusters need sm_90+")
    monkeypatch.setenv("FASTKD_CUDA_PATH", path)
    torch.manual_seed(width)
    rows = 33
    # rows 1 column into a wider buffer: a row stride of width + 1, so rows are not 16-byte aligned
    student = (torch.randn(rows, width + 1, device="cuda") * 3).to(dtype)[:, 1:]
    teacher = (torch.randn(rows, width, device="cuda") * 3).to(dtype)
    target = torch.randint(0, width, (rows,), device="cuda")
    target[::5] = -100
    loss, grad = _loss_and_grad(student, teacher, target, "cuda", **options)
    ref_loss, ref_grad = _loss_and_grad(
        student.double().cpu(), teacher.double().cpu(), target.cpu(), "torch", **options
    )
    tol = TOL[dtype]
    assert torch.allclose(loss.double().cpu(), ref_loss, rtol=tol, atol=tol), (loss, ref_loss)
    scale = ref_grad.abs().max().item()
    assert torch.allclose(grad.double().cpu(), ref_grad, rtol=tol, atol=tol * scale + 1e-6)
    assert (grad[::5] == 0).all()  # ignored rows


@pytest.mark.gpu
@pytest.mark.parametrize("width", [1000, 131072])
def test_auto_path_and_per_row_temperature(width):
    torch.manual_seed(0)
    student = torch.randn(8, width, device="cuda", dtype=torch.bfloat16)
    teacher = torch.randn(8, width, device="cuda", dtype=torch.bfloat16)
    target = torch.randint(0, width, (8,), device="cuda")
    t = torch.rand(8, device="cuda") + 0.5
    loss, grad = _loss_and_grad(student, teacher, target, "cuda", temperature=t, return_parts=False)
    ref_loss, ref_grad = _loss_and_grad(student.double().cpu(), teacher.double().cpu(), target.cpu(), "torch",
                                        temperature=t.double().cpu())  # fmt: skip
    assert torch.allclose(loss.double().cpu(), ref_loss, rtol=1e-2, atol=1e-2)
    assert torch.allclose(grad.double().cpu(), ref_grad, rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [10, 1000, 50000])
def test_calibration_matches_torch_backend(dtype, width):
    from fastkd.backends import cuda as cuda_backend
    from fastkd.backends import torch as torch_backend

    torch.manual_seed(width)
    logits = (torch.randn(257, width + 1, device="cuda") * 2).to(dtype)[:, 1:]
    target = torch.randint(0, width, (257,), device="cuda")
    target[::7] = -100
    for mode in ("bins", "rows"):
        got = cuda_backend.calibration_pass(logits, target, mode, 1.5, False, -100, 15)
        want = torch_backend.calibration_pass(logits.double().cpu(), target.cpu(), mode, 1.5, False, -100, 15)
        assert got.keys() == want.keys()
        for key in got:
            a, b = got[key].cpu(), want[key]
            if a.is_floating_point():
                assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-4, equal_nan=True), key
            else:
                assert (a == b.to(a.dtype)).float().mean() > 0.99, (
                    key
                )  # a confidence on a bin edge may round apart
