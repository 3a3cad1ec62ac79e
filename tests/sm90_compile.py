"""Compile fastkd's Triton kernels for Hopper (sm_90) on a machine without a GPU; report registers and spills.

The interpreter that runs the kernels in CI accepts code that the GPU compiler rejects; this script
closes that gap. Each case calls a launcher on meta tensors (no memory, nothing runs) with the kernel
replaced by a recorder; every recorded launch is then compiled, with the same arguments, constexprs and
num_warps, to a cubin for sm_90 by Triton's own toolchain, and ``cuobjdump`` reads its resource usage.
Prints one JSON object per launch. Run it with TRITON_INTERPRET unset (the kernels must be JIT
functions): ``python tests/sm90_compile.py``.
"""

from __future__ import annotations

import inspect
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
from triton.compiler import ASTSource

import fastkd.kernels.softmax as softmax_kernels

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def signature_type(value) -> str:
    if value is None:
        return "constexpr"
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {value!r}")


def compile_call(kernel, args, kwargs) -> dict:
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs).arguments
    constexpr_names = {kernel.arg_names[i] for i in kernel.constexprs}
    signature, constexprs = {}, {}
    for i, (name, value) in enumerate(bound.items()):
        if name in constexpr_names or value is None:
            signature[name], constexprs[(i,)] = "constexpr", value
        else:
            signature[name] = signature_type(value)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack, local = (int(x) for x in re.search(r"REG:(\d+) STACK:(\d+) .*LOCAL:(\d+)", usage).groups())
    config = {name: value for name, value in bound.items() if name in constexpr_names}
    return dict(kernel=kernel.fn.__name__, **config, **options, registers=regs, spill_bytes=stack + local)


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
            yield compile_call(recorder.kernel, args, dict(kwargs))


def softmax_launches():
    """Forward and backward at each launch config, each dtype, softmax and log-softmax, float and tensor T."""
    for n_rows, width in [(256, 100), (4096, 1000), (1024, 8192), (16384, 131072)]:
        for dtype in TRITON_TYPES:
            x = torch.empty(n_rows, width, dtype=dtype, device="meta")
            t = torch.empty(n_rows, dtype=torch.float32, device="meta")
            for log in (False, True):
                y, lse = softmax_kernels.tempered_softmax_forward(x, None, 4.0, log, False)
                softmax_kernels.tempered_softmax_forward(x, t, 1.0, log, True)
                softmax_kernels.tempered_softmax_backward(y, y, None, 4.0, lse, log, False)
                softmax_kernels.tempered_softmax_backward(y, y, t, 1.0, lse, log, True)


CASES = [
    (softmax_kernels, ["tempered_softmax_fwd_kernel", "tempered_softmax_bwd_kernel"], softmax_launches),
]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the kernels must be JIT functions to compile")
    for module, names, launch in CASES:
        for row in record(module, names, launch):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
