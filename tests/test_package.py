"""Packaging: what a user gets from a wheel, installed without the Makefile.

The kernels in kernels/ are installed as the subpackage fastkd.kernels; the metadata names the license,
the project's URL and only the dependencies the CPU path needs (Triton is an extra, and the oldest
versions admitted are the ones CI installs); the wheel, installed into a fresh virtual environment
with torch alone, gives a working ``fastkd`` command and ops; the README's examples run on a CPU.
"""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

import fastkd.kernels.softmax

ROOT = Path(__file__).resolve().parents[1]


def _makefile_pins() -> dict[str, str]:
    """The versions the Makefile (so CI) installs: {"torch": "2.13.0", "triton": "3.6.0", ...}."""
    (line,) = [line for line in (ROOT / "Makefile").read_text().splitlines() if line.startswith("PINS")]
    return dict(re.findall(r"([A-Za-z_-]+)==([0-9][0-9.]*)", line))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"  # a copy: building writes build/ and *.egg-info beside setup.py
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__",
                                                                "runs", "results"))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp, source],
        check=True,
        cwd=tmp,
    )
    (path,) = tmp.glob("fastkd-*.whl")
    return path


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_kernels_subpackage_comes_from_kernels_dir():
    assert Path(fastkd.kernels.softmax.__file__).resolve() == ROOT / "kernels" / "softmax.py"


def test_wheel_holds_fastkd_its_kernels_and_license(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"fastkd/__init__.py", "fastkd/softmax.py", "fastkd/demo/__init__.py", "fastkd/kernels/__init__.py",
            "fastkd/kernels/softmax.py", "fastkd-0.1.0.dist-info/licenses/LICENSE"} <= names  # fmt: skip
    assert not any(name.startswith(("kernels/", "tests/", "benchmarks/")) for name in names)
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_metadata_license_url_and_dependencies(wheel):
    meta = _metadata(wheel)
    assert meta["License"] == "MIT" and meta["License-File"] == "LICENSE"
    assert meta["Home-page"] == "https://github.com/fastkd/fastkd"
    assert "Source, https://github.com/fastkd/fastkd" in meta.get_all("Project-URL")
    requires = meta.get_all("Requires-Dist")
    # The CPU path needs torch alone: Triton comes with CUDA builds of torch, or with the `triton` extra.
    assert [r for r in requires if "extra ==" not in r] == ["torch>=2.13"]
    assert 'triton>=3.6; extra == "triton"' in requires
    # Every extra installs something the wheel uses: no `bench` extra for a suite the wheel lacks.
    assert sorted(meta.get_all("Provides-Extra")) == ["demo", "test", "triton"]


def test_oldest_versions_admitted_are_the_ones_ci_installs(wheel):
    """The metadata's lower bounds are the release series that CI (the Makefile's pins) tests."""
    pins = _makefile_pins()
    requires = _metadata(wheel).get_all("Requires-Dist")
    for package in ("torch", "triton"):
        (bound,) = {re.search(rf"^{package}>=([0-9.]+)", r).group(1) for r in requires if r.startswith(f"{package}>=")}
        assert pins[package].startswith(bound + "."), (package, bound, pins[package])


def test_wheel_in_fresh_venv_without_extras(wheel, tmp_path):
    """pip install of the wheel beside torch alone: the command, its --version, one op; no Triton anywhere."""
    torch_pin = f"torch=={_makefile_pins()['torch']}"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python, pip = venv / "bin" / "python", [venv / "bin" / "python", "-m", "pip", "--quiet", "--disable-pip-version-check"]
    # torch from the wheel on this disk only (--no-index): never a download of a multi-GB CUDA build.
    local = subprocess.run([*pip, "install", "--no-deps", "--no-index", torch_pin], capture_output=True, text=True)
    if local.returncode:
        pytest.skip(f"no wheel of {torch_pin} on this disk (pip's find-links): {local.stderr.strip()[-300:]}")
    subprocess.run([*pip, "install", wheel], check=True)  # torch's own small dependencies from the index

    absent = "tqdm sklearn matplotlib triton pytest hypothesis torchmetrics".split()
    probe = f"import importlib.util as u; print([m for m in {absent!r} if u.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"

    command = venv / "bin" / "fastkd"
    help_ = subprocess.run([command, "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "demo" in help_.stdout, help_.stderr
    version = subprocess.run([command, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == "fastkd 0.1.0", version.stderr
    demo = subprocess.run([command, "demo", "--quick"], capture_output=True, text=True)
    assert demo.returncode == 2 and "pip install scikit-learn matplotlib tqdm" in demo.stderr, demo.stderr

    op = textwrap.dedent("""
        import sys, torch, fastkd
        student = torch.randn(16, 100, requires_grad=True)
        teacher, target = torch.randn(16, 100), torch.randint(0, 100, (16,))
        loss = fastkd.KDLoss(temperature=4.0, alpha=0.9)(student, teacher, target)
        loss.backward()
        assert torch.isfinite(loss) and student.grad.abs().sum() > 0
        assert fastkd.calibration_stats(teacher, target).count == 16
        assert "triton" not in sys.modules  # the CPU path never imports it
        try:
            fastkd.kd_loss(student, teacher, target, backend="triton")
        except RuntimeError as error:
            assert "pip install triton" in str(error)
        else:
            raise AssertionError("backend='triton' ran without triton")
        print("op ok", fastkd.__file__)
    """)
    run = subprocess.run([python, "-c", op], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "op ok" in run.stdout and str(venv) in run.stdout  # the installed copy, not the checkout


def _readme_blocks() -> list[str]:
    """The README's ```python blocks, except those whose first line says they are a fragment."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    return [block for block in blocks if not block.lstrip().lower().startswith("# fragment")]


def test_readme_examples_run_on_a_cpu(tmp_path):
    """Every README example, as written, in order, in one namespace, with no GPU visible."""
    blocks = _readme_blocks()
    assert len(blocks) >= 3
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(blocks))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
