"""Packaging: the Triton kernels in kernels/ are installed as the subpackage fastkd.kernels."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import fastkd.kernels.softmax

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_subpackage_comes_from_kernels_dir():
    assert Path(fastkd.kernels.softmax.__file__).resolve() == ROOT / "kernels" / "softmax.py"


def test_wheel_holds_fastkd_and_its_kernels(tmp_path):
    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside setup.py
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp_path, source],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fastkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fastkd/__init__.py", "fastkd/softmax.py", "fastkd/demo/__init__.py", "fastkd/kernels/__init__.py",
            "fastkd/kernels/softmax.py"} <= names
    assert not any(name.startswith(("kernels/", "tests/")) for name in names)
