"""Every Triton kernel launch config compiles for Hopper (sm_90) without spilling registers.

The interpreter runs the kernels' arithmetic in CI; this test runs the GPU compiler on them, in a
subprocess where TRITON_INTERPRET is unset (see sm90_compile.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    launches = [json.loads(line) for line in out.stdout.splitlines()]
    assert Counter(launch["kernel"] for launch in launches) == {
        "tempered_softmax_fwd_kernel": 84,  # 15 configs in bf16 + 3 in fp16 and fp32, x (softmax, log) x 2 launches
        "tempered_softmax_bwd_kernel": 126,  # the same x 3 launches
        "kd_loss_fwd_kernel": 68,  # 14 configs + 3 widths x 3 divergences x 3 normalizations x (1, 3) teachers
        "scale_grad_kernel": 3,
        "kd_loss_topk_fwd_kernel": 38,  # 8 configs with k = 64 + 3 widths x (k = 1, 1024) x 5 modes
        "calibration_kernel": 33,  # 12 configs + 1024 bins at 3 widths + 3 widths x 6 variants
        "fidelity_kernel": 17,  # 12 configs + an ensemble of 3 at 3 widths + ensembles of 2 and 8
    }
    spilled = [launch for launch in launches if launch["spill_bytes"]]
    assert not spilled, spilled
