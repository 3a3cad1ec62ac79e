"""Run the cases: for each shape and dtype, every implementation in the same process, interleaved.

Each implementation is first called once (compiling it where it compiles), then timed in ``rounds``
rounds that visit the implementations in turn, so that a drift of the machine (clocks, other load)
falls on all of them alike. A failure is recorded in its cell (``OOM``, ``error: ...``), not dropped.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch
from tqdm.auto import tqdm

import fastkd
from benchmarks.cases import CASES, available
from benchmarks.memory import peak_cpu, release_grads
from benchmarks.timing import copy_bandwidth, peak_memory, summarize, time_call

GPU_SHAPES = [(256, 100), (4096, 1000), (4096, 32000), (8192, 32000), (16384, 131072), (8192, 262144)]
CPU_SHAPES = [(256, 100), (4096, 1000), (1024, 32000), (256, 131072)]
QUICK_SHAPES = [(256, 100), (1024, 1000)]
ROOT = Path(__file__).resolve().parents[1]


def _failure(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError):
        return "OOM"
    return f"error: {type(error).__name__}"


def _scalar(value) -> float | None:
    tensor = value[0] if isinstance(value, tuple) else value
    return float(tensor) if isinstance(tensor, torch.Tensor) and tensor.numel() == 1 else None


def run_shape(case, rows, width, dtype, device, rounds, quick, bandwidth) -> list[dict]:
    """Records of every implementation of ``case`` at one shape and dtype."""
    base = {"case": case.name, "rows": rows, "width": width, "dtype": str(dtype).removeprefix("torch.")}
    records, calls = {}, {}
    try:
        inputs = case.make_inputs(rows, width, dtype, device)
    except torch.OutOfMemoryError:
        return [{**base, "impl": impl, "status": "OOM (inputs)"} for impl in case.impls]
    for impl, factory in case.impls.items():
        record = records[impl] = {**base, "impl": impl, "status": "ok"}
        reason = available(case, impl, device)
        if reason is None and quick and impl in case.compiled and device.type == "cpu":
            reason = "skipped (--quick)"
        if reason:
            record["status"] = reason
            continue
        try:
            call = factory(inputs)
            record["value"] = _scalar(call())  # the first call compiles; its value is kept for the record
            release_grads(inputs)
            if device.type == "cuda":
                record["peak_bytes"] = peak_memory(call, device)
            elif (case.about_memory or impl == "fastkd") and not quick:  # fastkd's own peak in every case
                record["peak_bytes"] = peak_cpu(case.name, impl, rows, width, dtype)
            calls[impl] = call
        except Exception as error:  # noqa: BLE001  (a baseline's failure is a result, reported in its cell)
            record["status"], record["detail"] = _failure(error), str(error)[:300]
    samples = {impl: [] for impl in calls}
    for _ in range(rounds):
        for impl, call in list(calls.items()):
            try:
                samples[impl] += time_call(call, device, quick)
            except Exception as error:  # noqa: BLE001
                records[impl]["status"], records[impl]["detail"] = _failure(error), str(error)[:300]
                del calls[impl]
    n_bytes = case.bytes_moved(rows, width, dtype, device)
    for impl in calls:
        timing = summarize(samples[impl], device)
        seconds = timing.median_ms * 1e-3
        records[impl].update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                             bytes=n_bytes, gbps=n_bytes / seconds / 1e9, pct_of_copy=100 * n_bytes / bandwidth / seconds)  # fmt: skip
    fastkd_ms = records["fastkd"].get("median_ms")
    for record in records.values():
        if fastkd_ms and "median_ms" in record:
            record["speedup"] = record["median_ms"] / fastkd_ms  # > 1: fastkd is faster
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return list(records.values())


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _backend_label(device: torch.device) -> str:
    """The backend "auto" runs for float32 tensors on ``device``, as the tables name it."""
    from fastkd._backend import resolve_backend

    name = resolve_backend("auto", torch.empty(1, 2, device=device)).NAME
    if name == "cpu":
        from fastkd import _ext

        return f"its C++ CPU kernels (backend 'cpu': {_ext.info()})"
    return {"triton": "Triton kernels", "torch": "the PyTorch backend (closed form)"}.get(name, f"backend {name!r}")


def environment(device: torch.device, bandwidth: float, quick: bool) -> dict:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads ({platform.machine()})"
    return {
        "device": name,
        "backend": _backend_label(device),
        "copy_bandwidth_gbps": bandwidth / 1e9,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fastkd": fastkd.__version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
    }


def run(case_names, shapes, dtypes, device: torch.device, rounds: int, quick: bool, progress: bool = True) -> dict:
    """Every case at every shape and dtype (a case's own shapes for the device, where it has them, but in
    quick runs); returns ``{"environment": ..., "records": [...]}``."""
    bandwidth = copy_bandwidth(device, quick)
    jobs = []
    for name in case_names:
        case = CASES[name]
        for dtype in dtypes:
            for rows, width in case.shapes.get(device.type, shapes) if not quick else shapes:
                if device.type == "cpu" and rows * width > case.max_elements_cpu:
                    continue
                jobs.append((case, rows, width, dtype))
    records = []
    for case, rows, width, dtype in tqdm(jobs, desc="benchmarks", disable=not progress or None, unit="shape"):
        records += run_shape(case, rows, width, dtype, device, rounds, quick, bandwidth)
    return {"environment": environment(device, bandwidth, quick), "records": records}
