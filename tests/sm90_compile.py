"""Compile fastkd's Triton kernels for Hopper (sm_90) on a machine without a GPU; report registers,
spills, occupancy and what the machine code does per column block.

The interpreter that runs the kernels in CI accepts code that the GPU compiler rejects; this script
closes that gap. Each case calls a launcher on meta tensors (no memory, nothing runs) with the kernel
replaced by a recorder; every recorded launch is then specialized by Triton's own argument binder (as
``JITFunction.run`` does in Triton 3.6: int and alignment specialization included) and compiled to a
cubin for sm_90 with Triton's bundled toolchain (in a process pool), and ``cuobjdump`` reads its
resource usage and its SASS. Prints one JSON object per launch:

    kernel, case (the case's width, dtype and variant), the launch's constexprs, num_warps,
    registers, spill_bytes, shared (bytes), occupancy (resident warps / 64 on an SM of 64K registers
    and 228 KB of shared memory),
    sass: {"total": counts, "loops": [counts of each innermost loop, in address order]}, where counts
    are the instructions, the global loads and stores by width in bits ({"128": 2, "16": 1}), MUFU.EX2,
    MUFU.LG2, MUFU.RCP, all MUFU, BAR (barriers) and SHFL (shuffles).

A loop is a backward branch; its body is every instruction between the branch's target and the
branch. Run it with TRITON_INTERPRET unset (the kernels must be JIT functions):
``python tests/sm90_compile.py [kernel names...]``.
"""

from __future__ import annotations

import json
import multiprocessing
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
from fastkd._host import kd_outputs
from fastkd._options import KDOptions

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
REGISTERS_PER_SM, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM, SHARED_PER_SM = 65536, 64, 32, 228 * 1024

# The widths every kernel is compiled at in bfloat16 and float32, besides its launch configs: rows whose
# stride is a multiple of 8 entries (1000), of none (4097, 32001, 50257: the aligned body and the edge),
# and the widest (131072, 262144).
ISSUE_WIDTHS = [1000, 4097, 32001, 50257, 131072, 262144]
ISSUE_DTYPES = [torch.bfloat16, torch.float32]


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call with the case."""

    def __init__(self, kernel):
        self.kernel, self.calls, self.case = kernel, [], ""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.case, args, kwargs))


def _bind(kernel, args, kwargs):
    """What ``triton.compile`` takes for the launch (picklable), and its constexprs."""
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(BACKEND, kwargs, bound, specialization, options)
    config = {p.name: bound[p.name] for p in kernel.params if p.is_constexpr}
    return (signature, constexprs, attrs, options.__dict__), config


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _bits(opcode: str) -> str:
    parts = opcode.split(".")
    for width in ("128", "64", "U16", "S16", "U8", "S8"):
        if width in parts:
            return width.lstrip("US")
    return "32"


def _counts(instructions) -> dict:
    counts = {"instructions": len(instructions), "ldg": {}, "stg": {}, "ex2": 0, "lg2": 0, "rcp": 0, "mufu": 0,
              "bar": 0, "shfl": 0}  # fmt: skip
    for _, opcode, _ in instructions:
        unit = opcode.split(".")[0]
        if unit in ("LDG", "STG"):
            key = unit.lower()
            counts[key][_bits(opcode)] = counts[key].get(_bits(opcode), 0) + 1
        elif unit == "MUFU":
            counts["mufu"] += 1
            kind = opcode.split(".")[1].lower()
            if kind in ("ex2", "lg2", "rcp"):
                counts[kind] += 1
        elif unit == "BAR":
            counts["bar"] += 1
        elif unit == "SHFL":
            counts["shfl"] += 1
    return counts


def sass_profile(sass: str) -> dict:
    """Counts over the whole kernel and over each innermost loop (module doc)."""
    instructions = [(int(m[1], 16), m[2], m[3]) for m in map(_INSTRUCTION.search, sass.splitlines()) if m]
    loops = []
    for address, opcode, operands in instructions:
        target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
        if target and int(target[1], 16) < address:
            loops.append((int(target[1], 16), address))
    inner = sorted(a for a in loops if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in loops))
    return {
        "total": _counts(instructions),
        "loops": [_counts([i for i in instructions if start <= i[0] <= end]) for start, end in inner],
    }


def occupancy(registers: int, warps: int, shared: int) -> float:
    """Resident warps over the SM's 64, limited by registers (allocated per warp in units of 256),
    shared memory (1 KB reserved a block) and 32 blocks."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps, REGISTERS_PER_SM // (per_warp * warps),
                 SHARED_PER_SM // (shared + 1024))  # fmt: skip
    return blocks * warps / MAX_WARPS_PER_SM


def _compile(job) -> dict:
    """Compile one bound launch (in a worker process) and read its cubin."""
    module_name, kernel_name, case, (signature, constexprs, attrs, options), config = job
    kernel = getattr(sys.modules[module_name], kernel_name)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run(
            [CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
        sass = subprocess.run(
            [CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=False
        ).stdout
    regs, shared, stack, local = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
                                  .group(1, 3, 2, 4))  # fmt: skip
    warps = options["num_warps"]
    return dict(kernel=kernel_name, case=case, **config, num_warps=warps, registers=regs, spill_bytes=stack + local,
                shared=shared, occupancy=occupancy(regs, warps, shared), sass=sass_profile(sass))  # fmt: skip


def record(module, kernel_names: list[str], launch) -> list:
    """The compile jobs of every launch that ``launch(case)`` makes of the named kernels of ``module``;
    ``launch`` takes a function that labels the launches that follow."""
    recorders = {name: Recorder(getattr(module, name)) for name in kernel_names}
    for name, recorder in recorders.items():
        setattr(module, name, recorder)

    def case(label: str) -> None:
        for recorder in recorders.values():
            recorder.case = label

    try:
        launch(case)
    finally:
        for name, recorder in recorders.items():
            setattr(module, name, recorder.kernel)
    jobs = []
    for name, recorder in recorders.items():
        for label, args, kwargs in recorder.calls:
            bound, config = _bind(recorder.kernel, args, kwargs)
            jobs.append((module.__name__, name, label, bound, config))
    return jobs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SOFTMAX_WIDTHS = [2**i for i in range(14)] + [
    131072
]  # every launch config: 1 to MAX_ONE_BLOCK, then the loop


def softmax_launches(case):
    """Every launch config in bfloat16, three of them in float16 and float32 too; for each: softmax and
    log-softmax, forward with a float and a tensor temperature, backward from y, and from x with dL/dT.
    At the issue's widths in bf16 and fp32: softmax forward, backward from y, log-softmax backward with dL/dT."""
    cases = [(w, torch.bfloat16, True) for w in SOFTMAX_WIDTHS]
    cases += [(w, dtype, True) for w in (128, 8192, 131072) for dtype in (torch.float16, torch.float32)]
    cases += [(w, dtype, False) for w in ISSUE_WIDTHS for dtype in ISSUE_DTYPES]
    for width, dtype, every in cases:
        case(f"{width} {_dtype_name(dtype)}")
        n_rows = 16384 if width > 8192 else 4096
        x = torch.empty(n_rows, width, dtype=dtype, device="meta")
        t = torch.empty(n_rows, dtype=torch.float32, device="meta")
        if not every:
            y, stats = _ops.softmax_forward(triton_backend, x, 4.0, False, False)
            _ops.softmax_backward(triton_backend, y, y, 4.0, stats, False, True, False)
            _, stats = _ops.softmax_forward(triton_backend, x, t, True, True)
            _ops.softmax_backward(triton_backend, y, x, t, stats, True, True, True)
            continue
        for log in (False, True):
            y, _ = _ops.softmax_forward(triton_backend, x, 4.0, log, False)
            _, stats = _ops.softmax_forward(triton_backend, x, t, log, True)
            _ops.softmax_backward(triton_backend, y, y, 4.0, stats, log, True, False)
            _ops.softmax_backward(triton_backend, y, x, t, stats, log, True, True)
            _ops.softmax_backward(triton_backend, y, x, t, stats, log, False, True)


KD_WIDTHS = [2**i for i in range(13)] + [131072]  # every launch config: 1 to MAX_ONE_BLOCK, then the loop


def _kd_launch(width, dtype, n_teachers=1, per_row=False, phase="fused", **options):
    n_rows = 16384 if width > 4096 else 4096
    x = torch.empty(n_rows, width, dtype=dtype, device="meta")
    teacher = torch.empty(n_teachers, n_rows, width, dtype=dtype, device="meta")
    target = torch.empty(n_rows, dtype=torch.int64, device="meta")
    t = torch.empty(n_rows, device="meta") if per_row else 4.0
    options = KDOptions(
        temperature=t, teacher_temperature=t, label_smoothing=0.1 if per_row else 0.0, **options
    )
    if phase == "fused":
        _ops.kd_forward(triton_backend, x, teacher, target, options, False, True)
        return
    out = kd_outputs(x, target, options, False, True)
    stats = torch.empty(n_rows, kd_kernels.N_STATS, device="meta")
    triton_backend._kd_launch(x, teacher, target, options, out, "stats", stats)
    triton_backend._kd_launch(
        x, teacher, target, options, out, "grad", stats, out.grad, torch.empty((), device="meta")
    )


# Issue 18's objectives in the kernel, each at one wide width with an edge (50257, bf16): the divergences
# beyond KL and JSD (the alpha-beta divergence in its three forms), soft-capping, the loss's parts (DKD's
# other configurations: with the divergences of ``kd_loss_launches``).
KD_OBJECTIVES = {
    "skew_kl": dict(divergence="skew_kl"),
    "skew_reverse_kl": dict(divergence="skew_reverse_kl"),
    "tvd": dict(divergence="tvd"),
    "ab": dict(divergence="ab", ab_alpha=0.8, ab_beta=0.4),
    "ab b=0": dict(divergence="ab", ab_alpha=0.6, ab_beta=0.0),
    "ab a=0": dict(divergence="ab", ab_alpha=0.0, ab_beta=0.7),
    "forward_kl softcap": dict(softcap=30.0),
    "jsd softcap return_parts": dict(divergence="jsd", softcap=30.0, return_parts=True),
    "dkd softcap return_parts": dict(divergence="dkd", softcap=30.0, return_parts=True),
}


def kd_loss_launches(case):
    """Every launch config of the default loss (forward KL + CE, bf16); at four widths forward KL, reverse
    KL, JSD and DKD x normalization x (1 or 3 teachers) with label smoothing and per-row temperatures;
    issue 18's objectives at 50257 (``KD_OBJECTIVES``); at the issue's widths in bf16 and fp32 the default
    loss fused and split (stats, then grad), and DKD split at 50257; the backward scale."""
    for width in KD_WIDTHS:
        case(f"{width} bfloat16")
        _kd_launch(width, torch.bfloat16)
    for width in (128, 4096, 50257, 131072):
        for divergence in ("forward_kl", "reverse_kl", "jsd", "dkd"):
            for norm in (None, "standardize", "spherical"):
                for n_teachers in (1, 3):
                    case(f"{width} bfloat16 {divergence} {norm} K={n_teachers}")
                    _kd_launch(
                        width, torch.bfloat16, n_teachers, True, divergence=divergence, logit_norm=norm
                    )
    for label, options in KD_OBJECTIVES.items():
        case(f"50257 bfloat16 {label}")
        _kd_launch(50257, torch.bfloat16, 1, True, **options)
    for width in ISSUE_WIDTHS:
        for dtype in ISSUE_DTYPES:
            case(f"{width} {_dtype_name(dtype)}")
            _kd_launch(width, dtype)
            _kd_launch(width, dtype, phase="split")
    case("50257 bfloat16 dkd split")
    _kd_launch(50257, torch.bfloat16, phase="split", divergence="dkd")
    for width in (128, 4096, 131072, 1000, 50257):
        case(f"{width} bfloat16")
        grad = torch.empty(4096, width, dtype=torch.bfloat16, device="meta")
        triton_backend.scale_grad_(grad, torch.empty((), device="meta"))


# The sparse teacher's issue 18 objectives, each at 50257 (bf16, k = 64, the bucket): the divergences beyond
# KL and JSD, soft-capping, the loss's parts.
TOPK_OBJECTIVES = {label: dict(options, tail="bucket") for label, options in KD_OBJECTIVES.items()}


def kd_loss_topk_launches(case):
    """Every launch config of the sparse teacher's loss (forward KL + CE, k = 64, bf16); at three widths
    every mode (divergence, values, tail) with k = 1 and 1024, label smoothing and per-row temperatures;
    issue 18's objectives at 50257 (``TOPK_OBJECTIVES``); at the issue's widths in bf16 and fp32 (k = 64)
    forward KL without the bucket (no bitmap) and TVD with it (the bitmap read with the row)."""
    modes = [("forward_kl", "none"), ("forward_kl", "bucket"), ("reverse_kl", "bucket"), ("jsd", "none"),
             ("jsd", "bucket")]  # fmt: skip
    cases = [(w, 64, dict(divergence="forward_kl", tail="none"), "", False, torch.bfloat16) for w in KD_WIDTHS
             if w >= 64]  # fmt: skip
    cases += [(w, k, dict(divergence=div, tail=tail), "", True, torch.bfloat16) for w in (1024, 4096, 131072)
              for k in (1, 1024) for div, tail in modes]  # fmt: skip
    cases += [(50257, 64, options, label, True, torch.bfloat16) for label, options in TOPK_OBJECTIVES.items()]
    cases += [(w, 64, dict(divergence=div, tail=tail), "", False, dtype) for w in ISSUE_WIDTHS for dtype in ISSUE_DTYPES
              for div, tail in (("forward_kl", "none"), ("tvd", "bucket"))]  # fmt: skip
    for width, k, options, label, per_row, dtype in cases:
        case(f"{width} {_dtype_name(dtype)} {label or options['divergence'] + ' ' + options['tail']} k={k}")
        n_rows = 16384 if width > 4096 else 4096
        x = torch.empty(n_rows, width, dtype=dtype, device="meta")
        indices = torch.empty(n_rows, k, dtype=torch.int64, device="meta")
        values = torch.empty(n_rows, k, dtype=dtype, device="meta")
        target = torch.empty(n_rows, dtype=torch.int64, device="meta")
        t = torch.empty(n_rows, device="meta") if per_row else 4.0
        options = KDOptions(temperature=t, teacher_temperature=t, label_smoothing=0.1 if per_row else 0.0, **options)
        _ops.kd_forward(triton_backend, x, (indices, values), target, options, False, True)


CALIBRATION_WIDTHS = [2**i for i in range(11)] + [
    131072
]  # every launch config: 1 to LOOP_BLOCK, then the loop


def calibration_launches(case):
    """Every launch config of the binned statistics (bf16, 15 bins, T = 2); at three widths: 1024 bins,
    the per-row and Newton modes, probabilities read as such (T = 1) and as logits log p (T = 2, and
    in Newton mode), per-row temperatures; at the issue's widths in bf16 and fp32 (15 bins)."""
    cases = [(w, "bins", 15, False, 2.0, torch.bfloat16) for w in CALIBRATION_WIDTHS]
    cases += [(w, "bins", 1024, False, 2.0, torch.bfloat16) for w in (10, 1000, 131072)]
    variants = [("rows", False, 2.0), ("newton", False, 2.0), ("bins", True, 1.0), ("bins", True, 2.0),
                ("newton", True, 2.0), ("bins", False, "per row")]  # fmt: skip
    cases += [
        (w, mode, 15, probs, t, torch.bfloat16) for w in (10, 1000, 131072) for mode, probs, t in variants
    ]
    cases += [(w, "bins", 15, False, 2.0, dtype) for w in ISSUE_WIDTHS for dtype in ISSUE_DTYPES]
    for width, mode, n_bins, probs, t, dtype in cases:
        case(f"{width} {_dtype_name(dtype)} {mode} probs={probs}")
        n_rows = 16384 if width > 1024 else 65536
        x = torch.empty(n_rows, width, dtype=dtype, device="meta")
        target = torch.empty(n_rows, dtype=torch.int64, device="meta")
        t = torch.empty(n_rows, device="meta") if t == "per row" else t
        triton_backend.calibration_pass(x, target, mode, t, probs, -100, n_bins)


def fidelity_launches(case):
    """Every launch config with one teacher (bf16); at three widths an ensemble of 3 and per-row
    temperatures; the narrow tiles of ensembles of 2 and 8 (fewer rows a tile as members grow); at the
    issue's widths in bf16 and fp32 (one teacher)."""
    cases = [(w, 1, False, torch.bfloat16) for w in CALIBRATION_WIDTHS]
    cases += [(w, 3, True, torch.bfloat16) for w in (10, 1000, 131072)]
    cases += [(10, 2, False, torch.bfloat16), (10, 8, False, torch.bfloat16)]
    cases += [(w, 1, False, dtype) for w in ISSUE_WIDTHS for dtype in ISSUE_DTYPES]
    for width, n_teachers, per_row, dtype in cases:
        case(f"{width} {_dtype_name(dtype)} K={n_teachers}")
        n_rows = 16384 if width > 1024 else 65536
        student = torch.empty(n_rows, width, dtype=dtype, device="meta")
        teacher = torch.empty(n_teachers, n_rows, width, dtype=dtype, device="meta")
        triton_backend.fidelity_pass(student, teacher, torch.empty(n_rows, device="meta") if per_row else 2.0)


CASES = [
    (softmax_kernels, ["tempered_softmax_fwd_kernel", "tempered_softmax_bwd_kernel"], softmax_launches),
    (kd_kernels, ["kd_loss_kernel", "scale_grad_kernel"], kd_loss_launches),
    (topk_kernels, ["kd_loss_topk_fwd_kernel"], kd_loss_topk_launches),
    (calibration_kernels, ["calibration_kernel"], calibration_launches),
    (fidelity_kernels, ["fidelity_kernel"], fidelity_launches),
]


def jobs(only: list[str]) -> list:
    """The compile jobs of every case (of the kernels named in ``only``, when given)."""
    out = []
    for module, names, launch in CASES:
        if only and not set(names) & set(only):
            continue
        out += [job for job in record(module, names, launch) if not only or job[1] in only]
    return out


def main() -> Iterator[dict] | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be JIT functions to compile")
    todo = jobs(sys.argv[1:])
    cases = os.environ.get("FASTKD_COMPILE_CASES")  # e.g. "131072 bfloat16|4096 bfloat16": only these cases
    if cases:
        todo = [
            job for job in todo if any(job[2] == c or job[2].startswith(c + " ") for c in cases.split("|"))
        ]
    with multiprocessing.get_context("fork").Pool(
        int(os.environ.get("FASTKD_COMPILE_PROCESSES", os.cpu_count()))
    ) as pool:
        for row in pool.imap(_compile, todo):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
