"""Peak memory of a case's implementations on the CPU, each in a fresh process.

    python -m benchmarks.memory fused_linear 8192x32000                # every implementation, a table
    python -m benchmarks.memory fused_linear 8192x32000 --impl fastkd  # one, as JSON

PyTorch keeps no allocator statistics for the CPU, so the process's own high-water mark is read: the
implementation is called once (its one-time allocations, a compilation), its gradients are released,
the kernel's peak resident set size is reset (``/proc/self/clear_refs``), and the call is made again;
the peak is VmHWM minus the resident size just before that call. The subprocess runs with
``MALLOC_MMAP_THRESHOLD_=65536``, so that glibc maps every block above 64 KiB and returns it on free:
the warm-up's freed blocks are not reused silently, which would hide them from the peak. Linux only.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.cases import CASES, available

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def release_grads(inputs: dict) -> None:
    """Drop the gradients a call left on its inputs, so that a measurement starts without them."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.grad is not None:
            value.grad = None


def measure_here(case: str, impl: str, rows: int, width: int, dtype: torch.dtype) -> int:
    """Bytes one call of ``impl`` adds to this process's resident set at its peak (see the module doc)."""
    inputs = CASES[case].make_inputs(rows, width, dtype, torch.device("cpu"))
    call = CASES[case].impls[impl](inputs)
    call()
    release_grads(inputs)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    call()
    return _status_bytes("VmHWM") - before


def peak_cpu(case: str, impl: str, rows: int, width: int, dtype: torch.dtype, timeout: float = 600) -> int:
    """``measure_here`` in a fresh subprocess (one implementation's allocations never meet another's)."""
    name = str(dtype).removeprefix("torch.")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", case, f"{rows}x{width}", "--impl", impl, "--dtype", name],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"memory measurement of {case}/{impl} failed: {run.stderr[-500:]}")
    return json.loads(run.stdout.splitlines()[-1])["peak_bytes"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("case", choices=list(CASES))
    parser.add_argument("shape", help="ROWSxWIDTH")
    parser.add_argument("--impl", help="measure this implementation here and print JSON (default: all, each in a "
                        "subprocess, as a table)")  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    args = parser.parse_args(argv)
    rows, width = (int(v) for v in args.shape.lower().split("x"))
    dtype = DTYPES[args.dtype]
    if args.impl:
        print(json.dumps({"case": args.case, "impl": args.impl, "peak_bytes": measure_here(args.case, args.impl, rows,
                                                                                          width, dtype)}))  # fmt: skip
        return
    from benchmarks.runner import _git_commit

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {args.case} at {rows} x {width}, {args.dtype}, CPU: peak memory of one call beyond its inputs\n\n"
          f"{date}; {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}; commit {_git_commit()}; "
          "each implementation in a fresh process (benchmarks/memory.py)\n")  # fmt: skip
    print("| implementation | peak MiB |\n|---|---|")
    for impl in CASES[args.case].impls:
        reason = available(CASES[args.case], impl, torch.device("cpu"))
        cell = reason or f"{peak_cpu(args.case, impl, rows, width, dtype) / 2**20:.0f}"
        print(f"| {impl} | {cell} |", flush=True)


if __name__ == "__main__":
    main()
