"""Compile fastkd's Triton kernels for Hopper (sm_90) on a machine without a GPU; report registers and spills.

The interpreter that runs the kernels in CI accepts code that the GPU compiler rejects; this script
closes that gap. Each case calls a launcher on meta tensors (no memory, nothing runs) with the kernel
replaced by a recorder; every recorded launch is then specialized by Triton's own argument binder (as
``JITFunction.run`` does in Triton 3.6: int and alignment specialization included) and compiled to a
cubin for sm_90 with Triton's bundled toolchain, and ``cuobjdump`` reads its resource usage. Prints
one JSON object per launch. Run it with TRITON_INTERPRET unset (the kernels must be JIT functions):
``python tests/sm90_compile.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

import fastkd.backends.triton as triton_backend
import fastkd.kernels.calibration as calibration_kernels
import fastkd.kernels.fidelity as fidelity_kernels
import fastkd.kernels.kd_loss as kd_kernels
import fastkd.kernels.kd_loss_topk as topk_kernels
import fastkd.kernels.softmax as softmax_kernels
from fastkd import _ops
from fastkd._options import KDOptions

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def compile_call(kernel, args, kwargs) -> dict:
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack, local = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", usage).groups())
    config = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
    return dict(kernel=kernel.fn.__name__, **config, num_warps=options.num_warps, registers=regs, spill_bytes=stack + local)


def record(module, kernel_names: list[str], launch) -> Iterator[dict]:
    """Compile every launch that ``launch()`` makes of the named kernels of ``module``."""
    recorders = {name: Recorder(getattr(module, name)) for name in kernel_names}
    for name, recorder in recorders.items():
        setattr(module, name, recorder)
    try:
        launch()
    finally:
        for name, recorder in recorders.items():
            setattr(module, name, recorder.kernel)
    for recorder in recorders.values():
        for args, kwargs in recorder.calls:
            yield compile_call(recorder.kernel, args, kwargs)


SOFTMAX_WIDTHS = [2**i for i in range(14)] + [131072]  # every launch config: 1 to MAX_ONE_BLOCK, then the loop


def softmax_launches():
    """Every launch config in bfloat16, three of them in float16 and float32 too; for each: softmax and
    log-softmax, forward with a float and a tensor temperature, backward from y, and from x with dL/dT."""
    cases = [(w, torch.bfloat16) for w in SOFTMAX_WIDTHS]
    cases += [(w, dtype) for w in (128, 8192, 131072) for dtype in (torch.float16, torch.float32)]
    for width, dtype in cases:
        n_rows = 16384 if width > 8192 else 4096
        x = torch.empty(n_rows, width, dtype=dtype, device="meta")
        t = torch.empty(n_rows, dtype=torch.float32, device="meta")
        for log in (False, True):
            y, _ = _ops.softmax_forward(triton_backend, x, 4.0, log, False)
            _, stats = _ops.softmax_forward(triton_backend, x, t, log, True)
            _ops.softmax_backward(triton_backend, y, y, 4.0, stats, log, True, False)
            _ops.softmax_backward(triton_backend, y, x, t, stats, log, True, True)
            _ops.softmax_backward(triton_backend, y, x, t, stats, log, False, True)


KD_WIDTHS = [2**i for i in range(13)] + [131072]  # every launch config: 1 to MAX_ONE_BLOCK, then the loop


def kd_loss_launches():
    """Every launch config of the default loss (forward KL + CE, bf16); at three widths every divergence
    x normalization x (1 or 3 teachers) with label smoothing and per-row temperatures; the backward scale."""
    cases = [(w, "forward_kl", None, 1, False) for w in KD_WIDTHS]
    cases += [
        (w, div, norm, k, True)
        for w in (128, 4096, 131072)
        for div in ("forward_kl", "reverse_kl", "jsd")
        for norm in (None, "standardize", "spherical")
        for k in (1, 3)
    ]
    for width, divergence, norm, n_teachers, per_row in cases:
        n_rows = 16384 if width > 4096 else 4096
        x = torch.empty(n_rows, width, dtype=torch.bfloat16, device="meta")
        teacher = torch.empty(n_teachers, n_rows, width, dtype=torch.bfloat16, device="meta")
        target = torch.empty(n_rows, dtype=torch.int64, device="meta")
        t = torch.empty(n_rows, device="meta") if per_row else 4.0
        options = KDOptions(temperature=t, teacher_temperature=t, divergence=divergence, logit_norm=norm,
                            label_smoothing=0.1 if per_row else 0.0)  # fmt: skip
        _ops.kd_forward(triton_backend, x, teacher, target, options, False, True)
    for width in (128, 4096, 131072):
        grad = torch.empty(4096, width, dtype=torch.bfloat16, device="meta")
        triton_backend.scale_grad_(grad, torch.empty((), device="meta"))


def kd_loss_topk_launches():
    """Every launch config of the sparse teacher's loss (forward KL + CE, k = 64, bf16); at three widths
    every mode (divergence, values, tail) with k = 1 and 1024, label smoothing and per-row temperatures."""
    modes = [("forward_kl", "none"), ("forward_kl", "bucket"), ("reverse_kl", "bucket"), ("jsd", "none"),
             ("jsd", "bucket")]  # fmt: skip
    cases = [(w, 64, "forward_kl", "none", False) for w in KD_WIDTHS if w >= 64]
    cases += [(w, k, div, tail, True) for w in (1024, 4096, 131072) for k in (1, 1024) for div, tail in modes]
    for width, k, divergence, tail, per_row in cases:
        n_rows = 16384 if width > 4096 else 4096
        x = torch.empty(n_rows, width, dtype=torch.bfloat16, device="meta")
        indices = torch.empty(n_rows, k, dtype=torch.int64, device="meta")
        values = torch.empty(n_rows, k, dtype=torch.bfloat16, device="meta")
        target = torch.empty(n_rows, dtype=torch.int64, device="meta")
        t = torch.empty(n_rows, device="meta") if per_row else 4.0
        options = KDOptions(temperature=t, teacher_temperature=t, divergence=divergence, tail=tail,
                            label_smoothing=0.1 if per_row else 0.0)  # fmt: skip
        _ops.kd_forward(triton_backend, x, (indices, values), target, options, False, True)


CALIBRATION_WIDTHS = [2**i for i in range(11)] + [131072]  # every launch config: 1 to LOOP_BLOCK, then the loop


def calibration_launches():
    """Every launch config of the binned statistics (bf16, 15 bins, T = 2); at three widths: 1024 bins,
    the per-row and Newton modes, probabilities read as such (T = 1) and as logits log p (T = 2, and
    in Newton mode), per-row temperatures."""
    cases = [(w, "bins", 15, False, 2.0) for w in CALIBRATION_WIDTHS]
    cases += [(w, "bins", 1024, False, 2.0) for w in (10, 1000, 131072)]
    variants = [("rows", False, 2.0), ("newton", False, 2.0), ("bins", True, 1.0), ("bins", True, 2.0),
                ("newton", True, 2.0), ("bins", False, "per row")]  # fmt: skip
    cases += [(w, mode, 15, probs, t) for w in (10, 1000, 131072) for mode, probs, t in variants]
    for width, mode, n_bins, probs, t in cases:
        n_rows = 16384 if width > 1024 else 65536
        x = torch.empty(n_rows, width, dtype=torch.bfloat16, device="meta")
        target = torch.empty(n_rows, dtype=torch.int64, device="meta")
        t = torch.empty(n_rows, device="meta") if t == "per row" else t
        triton_backend.calibration_pass(x, target, mode, t, probs, -100, n_bins)


def fidelity_launches():
    """Every launch config with one teacher (bf16); at three widths an ensemble of 3 and per-row
    temperatures; the narrow tiles of ensembles of 2 and 8 (fewer rows a tile as members grow)."""
    cases = [(w, 1, False) for w in CALIBRATION_WIDTHS] + [(w, 3, True) for w in (10, 1000, 131072)]
    cases += [(10, 2, False), (10, 8, False)]
    for width, n_teachers, per_row in cases:
        n_rows = 16384 if width > 1024 else 65536
        student = torch.empty(n_rows, width, dtype=torch.bfloat16, device="meta")
        teacher = torch.empty(n_teachers, n_rows, width, dtype=torch.bfloat16, device="meta")
        triton_backend.fidelity_pass(student, teacher, torch.empty(n_rows, device="meta") if per_row else 2.0)


CASES = [
    (softmax_kernels, ["tempered_softmax_fwd_kernel", "tempered_softmax_bwd_kernel"], softmax_launches),
    (kd_kernels, ["kd_loss_fwd_kernel", "scale_grad_kernel"], kd_loss_launches),
    (topk_kernels, ["kd_loss_topk_fwd_kernel"], kd_loss_topk_launches),
    (calibration_kernels, ["calibration_kernel"], calibration_launches),
    (fidelity_kernels, ["fidelity_kernel"], fidelity_launches),
]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be JIT functions to compile")
    only = sys.argv[1:]
    for module, names, launch in CASES:
        if only and not set(names) & set(only):
            continue
        for row in record(module, names, launch):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
