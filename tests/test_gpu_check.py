"""benchmarks/gpu_check.sh --dry-run on the CPU: its steps are listed within the 8-minute budget, the files
they need exist, the benchmark arguments parse and the test selections collect."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run():
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT))
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], check=False, env=env,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    budgets = {
        m.group(1).strip(): int(m.group(2)) for m in re.finditer(r"\[dry-run\] (.{12}) +(\d+) s ", out.stdout)
    }
    assert list(budgets) == ["environment", "install", "cuda build", "cuda tests", "op tests", "benchmarks"]
    assert sum(budgets.values()) <= 480
    assert "benchmark arguments parse" in out.stdout and "test selections collect" in out.stdout
    assert "16384x131072 8192x262144" in out.stdout
