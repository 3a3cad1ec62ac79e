"""A new backend is one registry entry: a throwaway one (``tests/echo_backend.py``) registered from a
test plugin runs the op tests, and every op reaches it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

import fastkd
from fastkd._backend import Backend, backend_names, register_backend, resolve_backend, unregister_backend

TESTS = Path(__file__).resolve().parent
# A slice of each op's tests: float64 comparisons of outputs and gradients, edge cases, errors.
SELECTION = {
    "test_softmax.py": "matches_float64 and float32 or masked or non_contiguous or tensor_temperature or double",
    "test_kd_loss.py": "divergences_and_normalizations and float32 or options or ignored or masked or nan or inplace "
                       "or backward_runs_once or compiled_training_step",
    "test_kd_loss_topk.py": "k_entries or all_classes_given or masked or reductions or strided",
    "test_calibration.py": "stats_match_float64 or bins_and_temperatures or probs or adaptive or classwise",
    "test_temperature.py": "recovers or ignored_rows",
    "test_fidelity.py": "matches_float64 and float32 or probs",
    "test_fused_linear.py": "chunks_and_divergences or reductions",
}  # fmt: skip


def test_op_tests_run_on_a_backend_registered_from_outside(tmp_path):
    calls = tmp_path / "calls.json"
    env = dict(os.environ, FASTKD_TEST_BACKENDS="echo", ECHO_CALLS=str(calls), PYTHONPATH=str(TESTS))
    for name, selection in SELECTION.items():
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "echo_backend", "-p", "no:cacheprovider",
                              str(TESTS / name), "-k", selection], env=env, capture_output=True, text=True, cwd=TESTS.parent)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
        assert " passed" in out.stdout.splitlines()[-1], out.stdout[-500:]
        counted = json.loads(calls.read_text())
        assert counted, f"{name}: no op reached the echo backend"
        calls.unlink()


def test_registry_resolves_and_refuses():
    """A registered backend is resolved by name (and by "auto" when first and willing), listed in the
    names every op accepts, refused with its own error, and gone once unregistered."""

    def refuse(x):
        if x.dtype == torch.float64:
            raise TypeError("backend='picky' runs float32 only")

    register_backend(Backend("picky", "fastkd.backends.torch", refuse, auto=lambda x: x.dim() == 3), first=True)
    try:
        x = torch.randn(2, 3, device=DEVICE)
        assert "picky" in backend_names() and resolve_backend("picky", x).NAME == "torch"
        assert resolve_backend("auto", x[None]) is resolve_backend("picky", x)  # first in auto's order, 3-d
        with pytest.raises(TypeError, match="runs float32 only"):
            fastkd.tempered_softmax(x.double(), backend="picky")
        assert torch.equal(fastkd.tempered_softmax(x, backend="picky"), fastkd.tempered_softmax(x, backend="torch"))
    finally:
        unregister_backend("picky")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastkd.tempered_softmax(torch.randn(2, 3), backend="picky")
    with pytest.raises(ValueError, match="'auto' names the choice"):
        register_backend(Backend("auto", "fastkd.backends.torch", lambda x: None, lambda x: True))
