"""Every Triton kernel launch config compiles for Hopper (sm_90) without spilling registers.

The interpreter runs the kernels' arithmetic in CI; this test runs the GPU compiler on them, in a
subprocess where TRITON_INTERPRET is unset (see sm90_compile.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    launches = [json.loads(line) for line in out.stdout.splitlines()]
    kernels = {launch["kernel"] for launch in launches}
    assert kernels == {"tempered_softmax_fwd_kernel", "tempered_softmax_bwd_kernel"}
    assert len(launches) == 210  # 15 launch configs in bf16 + 3 in fp16 and fp32, x 2 (softmax, log) x 5 launches
    spilled = [launch for launch in launches if launch["spill_bytes"]]
    assert not spilled, spilled
