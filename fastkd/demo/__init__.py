"""``fastkd demo``: distill a real model end to end and report what calibration and distillation did.

On scikit-learn's bundled digits (default) it trains an over-confident CNN teacher, calibrates it
with ``fastkd.fit_temperature``, distills small students five ways with ``fastkd.KDLoss`` and measures
them with ``fastkd.calibration_stats`` and ``fastkd.fidelity`` (``experiment``); then writes
``report.md``, ``results.json`` and reliability diagrams (``report``). Needs the ``demo`` extra
(``missing_requirements`` names what is not installed); importing this package needs only torch.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch

import fastkd
from fastkd.demo.experiment import Config, Experiment

# A smoke test of a few seconds: the whole pipeline on models trained for a handful of steps. Its
# numbers are not results, and its report says so instead of reading them.
QUICK = dict(seeds=2, epochs=1, teacher_epochs=1, quick=True)
# What the demo imports, by module: the pip name (the ``demo`` extra) and the data sets that need it.
REQUIREMENTS = {"sklearn": ("scikit-learn", {"digits"}), "matplotlib": ("matplotlib", None), "tqdm": ("tqdm", None)}


def missing_requirements(dataset: str = "digits") -> list[str]:
    """The pip names of the ``demo`` extra's packages that the demo on ``dataset`` needs and cannot find."""
    return [
        name
        for module, (name, datasets) in REQUIREMENTS.items()
        if (datasets is None or dataset in datasets) and importlib.util.find_spec(module) is None
    ]


@contextlib.contextmanager
def _threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: unchanged) inside the block."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _environment(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    kernels = "Triton kernels" if device.type == "cuda" else "the PyTorch reference (CPU)"
    return {
        "device": f"{name}, {kernels}",
        "fastkd": fastkd.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def run(config: Config, out: str | Path = "runs/demo", quick: bool = False) -> dict:
    """Run the experiment on ``config`` and write the report into ``out``.

    ``quick``: ``QUICK``'s sizes, a smoke test. On a CPU it runs on one thread: its models are so small
    that a second thread only adds synchronization, which made its training 20x slower on a 2-core
    machine busy with other work (51 s against 3 s for the same steps).
    """
    if quick:
        config = replace(config, **QUICK)
    device = torch.device(config.device)
    print(
        f"fastkd {fastkd.__version__} demo: {config.dataset}, {config.seeds} seeds, {config.teacher_epochs} teacher / "
        f"{config.epochs} student epochs, on {device}" + (" (--quick: a smoke test, its numbers are not results)"
                                                          if config.quick else ""),
        flush=True,
    )  # fmt: skip
    with _threads(1 if config.quick and device.type == "cpu" else None):
        experiment = Experiment(config)
        results = experiment.run()
    results["environment"] = _environment(device)

    from fastkd.demo.report import SMOKE_TEST, terminal_table, write

    paths = write(results, experiment.stats, Path(out))
    print("\n" + terminal_table(results))
    if config.quick:
        print(f"\n{SMOKE_TEST}")
    more = " (and one per model)" if len(paths["figures"]) > 1 else ""
    print(f"\nreport: {paths['report']}\nresults: {paths['json']}\ndiagrams: {paths['figures'][0]}{more}")
    return results
