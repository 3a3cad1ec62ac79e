"""Timing, peak memory and copy bandwidth, on CUDA or the CPU.

CUDA: ``triton.testing.do_bench`` (it flushes the L2 cache between calls and times with CUDA events).
CPU: a warmed-up ``time.perf_counter`` loop. Either way a measurement is a set of per-call times in
milliseconds, summarized by its median and its 20th / 80th percentiles.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8)


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def _quantile(samples: list[float], q: float) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[round(q * 100) - 1] if len(samples) > 1 else samples[0]


def time_cpu(fn: Callable[[], object], budget_s: float = 0.2, min_calls: int = 3, max_calls: int = 200) -> list[float]:
    """Per-call times (ms) of ``fn`` after one warm-up call: at least ``min_calls``, until ``budget_s``."""
    fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_calls or (time.perf_counter() - start < budget_s and len(samples) < max_calls):
        t0 = time.perf_counter()
        fn()
        samples.append(1e3 * (time.perf_counter() - t0))
    return samples


def time_cuda(fn: Callable[[], object], budget_ms: float = 100) -> list[float]:
    """do_bench's median and 20th / 80th percentiles (ms) of ``fn`` over ~``budget_ms`` of calls."""
    from triton.testing import do_bench

    return list(do_bench(fn, warmup=25, rep=budget_ms, quantiles=list(QUANTILES)))


def time_call(fn: Callable[[], object], device: torch.device, quick: bool = False) -> list[float]:
    if device.type == "cuda":
        return time_cuda(fn, budget_ms=40 if quick else 100)
    return time_cpu(fn, budget_s=0.05 if quick else 0.2, min_calls=2 if quick else 3)


def summarize(samples: list[float], device: torch.device) -> Timing:
    """Median and 20th / 80th percentiles of the samples of every round. On CUDA each round's samples
    are already do_bench's (median, p20, p80): their medians are combined, and the widest band kept."""
    if device.type == "cuda":
        rounds = [samples[i : i + 3] for i in range(0, len(samples), 3)]
        return Timing(statistics.median(r[0] for r in rounds), min(r[1] for r in rounds), max(r[2] for r in rounds))
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by one call of ``fn`` at its peak, beyond what was allocated before (CUDA; the CPU's
    is ``benchmarks.memory.peak_cpu``)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Device-to-device copy bandwidth (bytes/s: read + write) of a buffer far larger than the caches."""
    n_bytes = (64 if quick else 256) << 20
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    samples = time_call(lambda: dst.copy_(src), device, quick)
    return 2 * n_bytes / (summarize(samples, device).median_ms * 1e-3)
