"""examples/ run end to end and their loss falls: the DDP example on 2 gloo processes through torchrun and
as one plain process, the Hugging Face Trainer example where transformers is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSS = re.compile(r"^loss first=(\S+) last=(\S+)$", re.MULTILINE)


def _run(args: list[str], timeout: float = 120) -> tuple[str, float, float]:
    """Run ``args`` from the repository root, 1 thread per process (the test machine has 2 cores); return
    its stdout and the first and last loss it printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)  # fmt: skip
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stdout}\n{run.stderr}"
    match = LOSS.search(run.stdout)
    assert match, run.stdout
    return run.stdout, float(match[1]), float(match[2])


def test_ddp_example_on_two_gloo_processes():
    # --standalone: torchrun picks a free port itself (no race for one between the test and the launch).
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    stdout, first, last = _run([*torchrun, "examples/ddp_fused_linear_kd.py", "--steps", "20",
                                "--teacher-steps", "30", "--device", "cpu"])  # fmt: skip
    # The head's weight reaches the loss as a tensor, not through the module: DDP still all-reduced its
    # gradient (the ranks see different data, so unsynced gradients would differ).
    assert stdout.count("gradients in sync across 2 rank(s), max |diff| = 0.0") == 2
    assert last < 0.9 * first, (first, last)


def test_ddp_example_as_one_plain_process():
    stdout, first, last = _run([sys.executable, "examples/ddp_fused_linear_kd.py", "--steps", "10",
                                "--teacher-steps", "20", "--device", "cpu"])  # fmt: skip
    assert "gradients in sync across 1 rank(s)" in stdout
    assert last < first, (first, last)


def test_hf_trainer_example():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    _, first, last = _run([sys.executable, "examples/hf_trainer_kd.py", "--steps", "20",
                           "--teacher-steps", "30"])  # fmt: skip
    assert last < 0.9 * first, (first, last)


def test_hf_trainer_example_without_transformers_says_what_to_install():
    # sys.modules["transformers"] = None makes `import transformers` fail, installed or not.
    code = ("import runpy, sys; sys.modules['transformers'] = None; "
            "runpy.run_path('examples/hf_trainer_kd.py', run_name='__main__')")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert run.returncode != 0
    assert "pip install transformers accelerate" in run.stderr


# fastkd.fsdp: FSDP2 examples (examples/fsdp_fused_linear_kd.py, hf_fsdp_trainer_kd.py, trl_distill_fused.py).

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_fsdp_example_on_two_gloo_processes():
    stdout, first, last = _run([*TORCHRUN, "examples/fsdp_fused_linear_kd.py", "--steps", "12",
                                "--teacher-steps", "20", "--device", "cpu", "--layout", "tail"])  # fmt: skip
    # Outside the forward the head is a shard (V = 257: 129 rows on rank 0), refused by name.
    assert "lm_head.weight outside the forward: DTensor (Shard(dim=0),), 129 of its 257 rows" in stdout
    assert "outside the forward: ValueError: student_weight is a DTensor (Shard(dim=0))" in stdout
    assert "2 rank(s), cpu, layout tail, teacher model" in stdout
    assert last < 0.9 * first, (first, last)


def test_hf_fsdp_trainer_example_on_two_gloo_processes():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    stdout, first, last = _run([*TORCHRUN, "examples/hf_fsdp_trainer_kd.py", "--fsdp", "--steps", "12",
                                "--teacher-steps", "20"], timeout=240)  # fmt: skip
    # Accelerate sharded the student (its head a DTensor before the first forward); on each rank the first
    # fused loss equals kd_loss on the logits of the models' own forwards.
    assert stdout.count("= kd_loss on the logits") == 2
    assert stdout.count("FSDPLlamaForCausalLM, its lm_head.weight a DTensor before the first forward") == 2
    assert "2 process(es), FSDP2" in stdout
    assert last < 0.9 * first, (first, last)


def test_trl_gkd_example():
    pytest.importorskip("trl")
    stdout, first, last = _run([sys.executable, "examples/trl_distill_fused.py", "--trainer", "gkd",
                                "--steps", "12", "--teacher-steps", "20"], timeout=240)  # fmt: skip
    assert "rank 0: step 0: fused loss" in stdout and "= GKDTrainer's" in stdout  # checked to 1e-4 there
    assert last < first, (first, last)


def test_trl_distillation_example_on_two_gloo_processes():
    pytest.importorskip("trl")
    stdout, first, last = _run([*TORCHRUN, "examples/trl_distill_fused.py", "--trainer", "distillation",
                                "--fsdp", "--steps", "8", "--teacher-steps", "20"], timeout=240)  # fmt: skip
    assert stdout.count("= DistillationTrainer's") == 2
    assert "FusedDistillationTrainer, FSDP2" in stdout
    assert last < first, (first, last)


@pytest.mark.parametrize(
    "script, module, install",
    [("hf_fsdp_trainer_kd.py", "transformers", "pip install transformers accelerate"),
     ("trl_distill_fused.py", "trl", "pip install trl")],
)  # fmt: skip
def test_fsdp_examples_without_their_packages_say_what_to_install(script, module, install):
    code = (f"import runpy, sys; sys.modules[{module!r}] = None; "
            f"runpy.run_path('examples/{script}', run_name='__main__')")  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert run.returncode != 0
    assert install in run.stderr
