"""Shared test settings: device, backends, tolerances by dtype, and the ``gpu`` marker.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is
set here, before any test imports ``fastkd.kernels``. With CUDA the same tests run the compiled
kernels on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if CUDA else "cpu")

# torch.compile's on-disk caches key a graph by its code, not by a custom op's fake implementation: a cache
# written by another checkout of fastkd replays its output shapes (e.g. the split's statistics per row).
# The tests compile afresh, as on a clean machine.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

# Hypothesis: HYPOTHESIS_PROFILE=thorough for a long search; CI runs the default.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=3000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _usable(name: str) -> bool:
    """Whether the registered backend ``name`` runs float32 tensors on DEVICE here."""
    from fastkd._backend import resolve_backend

    try:
        resolve_backend(name, torch.empty(1, 2, device=DEVICE))
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def _test_backends() -> list[str]:
    """The backends every op test runs on: FASTKD_TEST_BACKENDS (comma-separated names), or every
    registered backend that runs here (the Triton kernels in the interpreter without a GPU)."""
    from fastkd._backend import backend_names

    named = os.environ.get("FASTKD_TEST_BACKENDS")
    return named.split(",") if named else [name for name in backend_names()[1:] if _usable(name)]


BACKENDS = _test_backends()

# Tolerance by input dtype, for every output and gradient compared with a float64 computation on the
# same (already rounded) inputs: |actual - expected| <= TOL * (|expected| + max |expected|). That is a
# relative error of TOL, measured against the tensor's scale for entries near zero. The float16 and
# bfloat16 values are a few units of the output's rounding (2^-11 and 2^-8).
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = list(TOL)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    scale: float | None = None,
    baseline: torch.Tensor | None = None,
) -> None:
    """``actual`` is within ``TOL[dtype]`` of the float64 ``expected`` (NaN where it is NaN, +-inf where
    it is beyond the range of ``actual``'s dtype). ``dtype`` is the inputs' dtype.

    ``scale`` replaces max |expected| in the absolute tolerance: for a result computed from terms that
    cancel, pass the size of those terms (a relative error of TOL in each term). ``baseline``, PyTorch's
    own computation in the working precision, widens the absolute tolerance by twice its largest error
    (FlashAttention's criterion), for results whose conditioning no fixed tolerance fits.
    """
    tol = TOL[dtype]
    rounded = expected.to(actual.dtype).double()
    expected = torch.where(rounded.isinf(), rounded, expected)  # past actual's dtype's range: its +-inf
    if scale is None:
        finite = expected.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        scale = finite.abs().max().item() if expected.numel() else 0.0
    atol = tol * scale
    if baseline is not None and expected.numel():
        atol += 2 * (baseline.double() - expected).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol, equal_nan=True)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """Tests name their backends: a FASTKD_BACKEND in the caller's environment must not change them."""
    monkeypatch.delenv("FASTKD_BACKEND", raising=False)


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
