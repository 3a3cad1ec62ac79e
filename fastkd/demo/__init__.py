"""``fastkd demo``: distill a real model end to end and report what calibration and distillation did.

On scikit-learn's bundled digits (default) it trains an over-confident CNN teacher, calibrates it
with ``fastkd.fit_temperature``, distills small students five ways with ``fastkd.KDLoss`` and measures
them with ``fastkd.calibration_stats`` and ``fastkd.fidelity`` (``experiment``); then writes
``report.md``, ``results.json`` and reliability diagrams (``report``). Needs the ``demo`` extra.
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import replace
from pathlib import Path

import torch

import fastkd
from fastkd.demo.experiment import Config, Experiment

QUICK = dict(seeds=2, epochs=2, teacher_epochs=3)  # a smoke run of a few seconds


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
    """Run the experiment on ``config`` (``quick``: ``QUICK``'s sizes) and write the report into ``out``."""
    if quick:
        config = replace(config, **QUICK)
    device = torch.device(config.device)
    print(
        f"fastkd {fastkd.__version__} demo: {config.dataset}, {config.seeds} seeds, {config.teacher_epochs} teacher / "
        f"{config.epochs} student epochs, on {device}",
        flush=True,
    )
    experiment = Experiment(config)
    results = experiment.run()
    results["environment"] = _environment(device)

    from fastkd.demo.report import terminal_table, write

    paths = write(results, experiment.stats, Path(out))
    print("\n" + terminal_table(results))
    print(f"\nreport: {paths['report']}\nresults: {paths['json']}\ndiagrams: {paths['figures'][0]} (and one per model)")
    return results
