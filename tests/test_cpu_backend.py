"""The C++ CPU backend ("cpu", csrc/): how it is built and found, where "auto" sends CPU tensors, what
happens without a compiler, and what the shared op tests cannot reach (the ops' registration, fake
kernels, the loader's cache). The ops' numbers are tested by every op test, which runs on each usable
backend (tests/conftest.py), this one included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastkd
from fastkd import _ext
from fastkd._backend import backend_names, resolve_backend

ROOT = Path(__file__).resolve().parents[1]
BUILT = _ext.load()
needs_ext = pytest.mark.skipif(not BUILT, reason=f"the C++ extension did not build here: {_ext.error()}")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    full.pop("FASTKD_BACKEND", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=full, timeout=600)  # fmt: skip


def test_registered_first_for_cpu_tensors():
    assert backend_names()[:2] == ("auto", "cpu")
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        expected = "cpu" if BUILT else "torch"
        assert resolve_backend("auto", torch.empty(2, 3, dtype=dtype)).NAME == expected


def test_check_names_the_problem():
    with pytest.raises(ValueError, match="backend='cpu' runs CPU tensors"):
        resolve_backend("cpu", torch.empty(2, 3, device="meta"))
    with pytest.raises(TypeError, match="backend='cpu' runs float16, bfloat16, float32 and float64"):
        resolve_backend("cpu", torch.empty(2, 3, dtype=torch.complex64))


@needs_ext
def test_loader_reports_build_and_instruction_set():
    info = _ext.info()
    assert "AVX2" in info or "AVX512" in info or "DEFAULT" in info, info
    assert "threads" in info
    root = _ext.sources_root()
    assert root == ROOT / "csrc" and _ext.build_key(root) == _ext.build_key(root)  # a pure function of its inputs
    assert {p.name for p in _ext.sources(root)} >= {"softmax.cpp", "kd_loss.cpp", "kd_loss_topk.cpp",
                                                   "calibration.cpp", "fidelity.cpp", "bindings.cpp"}  # fmt: skip


def test_disabled_extension_falls_back_to_pytorch_quietly():
    out = _run("""
        import warnings, torch, fastkd
        from fastkd._backend import resolve_backend
        warnings.simplefilter("error")  # no warning when the extension is switched off on purpose
        x = torch.randn(4, 10)
        assert resolve_backend("auto", x).NAME == "torch"
        try:
            fastkd.tempered_softmax(x, backend="cpu")
        except RuntimeError as error:
            assert "backend='cpu' needs the C++ extension, which did not build" in str(error), error
            assert "FASTKD_CPU_EXT=0" in str(error)
        else:
            raise AssertionError("backend='cpu' ran without its extension")
        print("ok")
    """, FASTKD_CPU_EXT="0")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_no_compiler_is_one_warning_and_the_pytorch_backend(tmp_path):
    """A build that cannot run (no compiler) warns once, however many ops run, and they run on PyTorch."""
    out = _run("""
        import warnings, torch, fastkd
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x, t = torch.randn(8, 20, requires_grad=True), torch.randn(8, 20)
            for _ in range(3):
                fastkd.kd_loss(x, t, torch.randint(0, 20, (8,))).backward()
                fastkd.calibration_stats(t, torch.randint(0, 20, (8,)))
        messages = [str(w.message) for w in caught if "C++ CPU kernels" in str(w.message)]
        assert len(messages) == 1, messages
        assert "the PyTorch backend" in messages[0]
        from fastkd._backend import resolve_backend
        assert resolve_backend("auto", x).NAME == "torch"
        print("ok")
    """, FASTKD_EXT_DIR=str(tmp_path), CXX="/nonexistent/c++", FASTKD_CPU_EXT="1")
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]
    assert "compiling the C++ CPU kernels" in out.stderr  # it said it tried, once
    assert out.stderr.count("compiling the C++ CPU kernels") == 1


@needs_ext
def test_ops_are_torch_library_ops_with_fake_kernels():
    """The extension's ops: schemas with their mutated outputs, CPU and Meta kernels (opcheck: schema,
    fake tensors, autograd registration, AOT dispatch)."""
    ops = torch.ops.fastkd_cpu
    for name in ("softmax_fwd", "softmax_bwd", "kd_loss_fwd", "kd_loss_topk_fwd", "scale_grad_", "calibration",
                 "fidelity"):  # fmt: skip
        schema = getattr(ops, name).default._schema
        assert any(arg.alias_info is not None and arg.alias_info.is_write for arg in schema.arguments), name
    x = torch.randn(5, 7)
    y, stats = torch.empty_like(x), torch.empty(5, 2)
    torch.library.opcheck(ops.softmax_fwd.default, (x, None, 2.0, False, y, stats))
    torch.library.opcheck(ops.scale_grad_.default, (torch.randn(5, 7), torch.rand(5)))
    agree, kl = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.float64)
    torch.library.opcheck(ops.fidelity.default, (x, torch.randn(1, 5, 7), None, 1.0, agree, kl))


@needs_ext
def test_named_checks_in_cpp():
    ops = torch.ops.fastkd_cpu
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match="fastkd_cpu: y must be x's shape and dtype"):
        ops.softmax_fwd(x, None, 1.0, False, torch.empty(4, 5), torch.empty(0, 2))
    with pytest.raises(RuntimeError, match="fastkd_cpu: x must have a unit column stride"):
        ops.softmax_fwd(x.t(), None, 1.0, False, torch.empty(6, 4), torch.empty(0, 2))
    with pytest.raises(RuntimeError, match="fastkd_cpu: temperature must be 0-d or hold one value per row"):
        ops.softmax_fwd(x, torch.ones(3), 1.0, False, torch.empty_like(x), torch.empty(0, 2))
    with pytest.raises(RuntimeError, match="fastkd_cpu: target must be int64 or int32"):
        ops.calibration(x, torch.zeros(4), 0, None, 1.0, False, False, -100, 15, torch.empty(3, dtype=torch.float64),
                        torch.empty(15, dtype=torch.int64), torch.empty(15, dtype=torch.int64),
                        torch.empty(15, dtype=torch.float64), torch.empty(0), torch.empty(0, dtype=torch.int8))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"fastkd_cpu: teacher must be \(K >= 1, N, V\)"):  # no teacher row to read
        ops.kd_loss_fwd(x, torch.empty(0, 4, 6), None, None, 1.0, None, 1.0, None, 1.0, True, 0.5, 0.5, 0.1, 1.0, 0.0,
                        1.0, 8.0, 0.0, 0.0, 1.0, -100, 0, 0, True, False, torch.empty(4), torch.empty_like(x),
                        torch.empty(0))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"fastkd_cpu: teacher must be \(K >= 1, N, C\)"):
        ops.fidelity(x, torch.empty(0, 4, 6), None, 1.0, torch.zeros((), dtype=torch.int64),
                     torch.zeros((), dtype=torch.float64))  # fmt: skip


@needs_ext
def test_rows_in_parallel_agree_with_one_thread():
    """at::parallel_for splits rows among threads; the results, calibration sums included (added in row
    order), do not depend on how many."""
    torch.manual_seed(0)
    x, t = torch.randn(300, 1001, requires_grad=True), torch.randn(300, 1001)
    y = torch.randint(0, 1001, (300,))

    def run():
        x.grad = None
        loss = fastkd.kd_loss(x, t, y, temperature=2.0, divergence="jsd", backend="cpu")
        loss.backward()
        stats = fastkd.calibration_stats(t, y, backend="cpu")
        return loss.detach(), x.grad.clone(), stats.nll_sum, stats.bin_confidence_sum

    threads = torch.get_num_threads()
    many = run()
    torch.set_num_threads(1)
    try:
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(many, one, strict=True):
        assert torch.equal(a, b)


@needs_ext
def test_large_logits_exp_range():
    """The vector exp: logits of +-1e4 (shifted by the row max first), underflow to 0, -inf masked, NaN kept."""
    x = torch.tensor([[1e4, 1e4 - 1, -1e4, float("-inf")], [0.0, -200.0, 50.0, 1.0], [float("nan"), 0.0, 1.0, 2.0]])
    got = fastkd.tempered_softmax(x, 1.0, backend="cpu")
    expected = torch.softmax(x.double(), -1).float()
    torch.testing.assert_close(got[:2], expected[:2], rtol=1e-6, atol=1e-30)
    assert got[2].isnan().all()
    log = fastkd.tempered_log_softmax(x[:2], 0.5, backend="cpu")
    torch.testing.assert_close(log, torch.log_softmax(x[:2].double() / 0.5, -1).float(), rtol=1e-6, atol=1e-5)


@needs_ext
def test_compiled_training_step_runs_the_cpp_kernels():
    student = torch.nn.Linear(16, 50)
    x, t, y = torch.randn(8, 16), torch.randn(8, 50), torch.randint(0, 50, (8,))

    def step(x):
        return fastkd.kd_loss(student(x), t, y, temperature=2.0, alpha=0.7)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x)
    loss.backward()
    grad = student.weight.grad.clone()
    student.weight.grad = None
    eager = step(x)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, student.weight.grad)


def test_sources_are_package_data():
    """setup.py ships csrc/ in the wheel (fastkd/csrc), where a pip-installed fastkd finds it to compile."""
    text = (ROOT / "setup.py").read_text()
    assert '"fastkd.csrc": "csrc"' in text and "cpu/*.cpp" in text and "include/fastkd/*.h" in text


@needs_ext
@pytest.mark.parametrize("options", [
    {"divergence": "skew_kl", "skew": 0.1}, {"divergence": "skew_reverse_kl", "skew": 0.3}, {"divergence": "tvd"},
    {"divergence": "ab", "ab_alpha": 0.8, "ab_beta": 0.4}, {"divergence": "dkd"},
    {"divergence": "jsd", "softcap": 5.0},
], ids=str)  # fmt: skip
def test_objectives_run_in_the_kernels(monkeypatch, options):
    """Issue 18's objectives on a dense teacher run in the C++ kernel, not the PyTorch closed form that
    covers what a kernel lacks (their numbers: tests/test_objectives.py on this backend)."""
    from fastkd.backends import torch as torch_backend

    def closed_form(*args):
        raise AssertionError("the cpu backend ran the PyTorch closed form")

    monkeypatch.setattr(torch_backend, "kd_loss_forward", closed_form)
    x = torch.randn(4, 33, requires_grad=True)
    loss = fastkd.kd_loss(x, torch.randn(4, 33), torch.tensor([0, 5, -100, 32]), backend="cpu", **options)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@needs_ext
@pytest.mark.parametrize("options", [
    {"divergence": "skew_kl", "skew": 0.1}, {"divergence": "skew_reverse_kl", "skew": 0.3}, {"divergence": "tvd"},
    {"divergence": "ab", "ab_alpha": 0.8, "ab_beta": 0.4}, {"divergence": "ab", "ab_alpha": 0.0, "ab_beta": 0.7},
    {"divergence": "jsd", "softcap": 5.0}, {"divergence": "tvd", "softcap": 5.0},
], ids=str)  # fmt: skip
def test_sparse_teacher_objectives_run_in_the_kernel(monkeypatch, options):
    """Issue 18's objectives (all but DKD, which needs a dense teacher) and soft-capping on a sparse top-k
    teacher run in the C++ kernel, not the PyTorch closed form (their numbers: tests/test_objectives.py)."""
    from fastkd.backends import torch as torch_backend

    def closed_form(*args):
        raise AssertionError("the cpu backend ran the PyTorch closed form")

    monkeypatch.setattr(torch_backend, "kd_loss_topk_forward", closed_form)
    x = torch.randn(4, 33, requires_grad=True)
    indices = torch.randperm(33)[:5].repeat(4, 1)
    values = torch.log_softmax(torch.randn(4, 6), -1)[:, :5]
    loss = fastkd.kd_loss(x, None, torch.tensor([0, 5, -100, 32]), teacher_topk=(indices, values), tail="bucket",
                          backend="cpu", **options)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
