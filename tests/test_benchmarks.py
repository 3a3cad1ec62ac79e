"""The benchmark suite: every baseline computes what fastkd computes (so the speedups compare like with
like), each case runs under pytest-benchmark at a small shape, and ``python -m benchmarks --quick`` writes
its table, JSON and plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.cases import CASES, available

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SHAPE = (64, 50)
RUNNABLE = [(case, impl) for case in CASES for impl in CASES[case].impls if available(CASES[case], impl, CPU) is None]


def _outputs(case: str, impl: str):
    inputs = CASES[case].make_inputs(*SHAPE, torch.float32, CPU)
    return inputs, CASES[case].impls[impl](inputs)


def _values(call) -> tuple[torch.Tensor, ...]:
    """What one call computed: (output, gradient) for the cases with a backward, (output,) otherwise."""
    result = call()
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize(("case", "impl"), RUNNABLE, ids=[f"{c}-{i}" for c, i in RUNNABLE])
def test_case_runs_under_pytest_benchmark(benchmark, case, impl):
    _, call = _outputs(case, impl)
    benchmark.pedantic(call, rounds=3, iterations=1, warmup_rounds=1)
    assert all(torch.isfinite(v).all() for v in _values(call))


@pytest.mark.parametrize(("case", "impl"), [(c, i) for c, i in RUNNABLE if i != "fastkd" and c != "fit_temperature"])
def test_baseline_computes_what_fastkd_computes(case, impl):
    _, expected = _outputs(case, "fastkd")
    _, actual = _outputs(case, impl)
    for a, e in zip(_values(actual), _values(expected), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_fit_temperature_baseline_reaches_no_lower_nll():
    inputs, fastkd_fit = _outputs("fit_temperature", "fastkd")
    _, lbfgs_fit = _outputs("fit_temperature", "lbfgs")
    nll = {name: F.cross_entropy(inputs["logits"] / fit(), inputs["target"]).item()
           for name, fit in (("fastkd", fastkd_fit), ("lbfgs", lbfgs_fit))}  # fmt: skip
    assert nll["fastkd"] <= nll["lbfgs"] + 1e-7


def test_quick_run_prints_table_and_writes_results(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    (md,), (js,), (png,) = (list(tmp_path.glob(f"*.{ext}")) for ext in ("md", "json", "png"))
    assert md.name.startswith("cpu-") and md.read_text() in run.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(js.read_text())
    env = results["environment"]
    assert env["copy_bandwidth_gbps"] > 0 and env["commit"] and env["torch"] == torch.__version__ and env["quick"]
    seen = {(r["case"], r["impl"]) for r in results["records"]}
    assert seen == {(case, impl) for case in CASES for impl in CASES[case].impls}
    for record in results["records"]:
        expected = available(CASES[record["case"]], record["impl"], CPU)
        if expected is None and record["impl"] in CASES[record["case"]].compiled:
            expected = "skipped (--quick)"
        assert record["status"] == (expected or "ok"), record
        if record["status"] == "ok":
            assert record["median_ms"] > 0 and record["gbps"] > 0 and record["p20_ms"] <= record["p80_ms"]
            assert record["pct_of_copy"] == pytest.approx(100 * record["gbps"] / env["copy_bandwidth_gbps"])
