"""Every Triton kernel launch config compiles for Hopper (sm_90) without spilling registers, and the
distillation losses (dense and sparse teacher) read and write their rows in 128-bit vectors at every width
of issue 20.

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

ISSUE_CASES = {
    f"{w} {d}" for w in (1000, 4097, 32001, 50257, 131072, 262144) for d in ("bfloat16", "float32")
}
# the kernels that read rows in aligned vectors (reductions.row_body, row_edge)
VECTOR_KERNELS = ("kd_loss_kernel", "scale_grad_kernel", "kd_loss_topk_fwd_kernel", "tempered_softmax_fwd_kernel",
                  "tempered_softmax_bwd_kernel", "fidelity_kernel", "calibration_kernel")
TOPK = "kd_loss_topk_fwd_kernel"


def _writes_rows(launch: dict) -> bool:
    """Whether the launch writes rows (the gradient, the softmax, dL/dx)."""
    kernel = launch["kernel"]
    if kernel == "kd_loss_kernel":
        return bool(launch.get("NEED_GRAD")) and launch.get("PHASE") != 1
    if kernel == TOPK:
        return bool(launch.get("NEED_GRAD"))
    if kernel == "tempered_softmax_bwd_kernel":
        return bool(launch.get("NEED_DX"))
    return kernel not in ("fidelity_kernel", "calibration_kernel")  # reductions: per-program sums only


def _at_issue_width(launch: dict) -> bool:
    case = launch["case"]
    if launch["kernel"] in ("fidelity_kernel", "calibration_kernel", TOPK):  # every variant at the issue's widths
        case = " ".join(case.split()[:2])
    return launch["kernel"] in VECTOR_KERNELS and case in ISSUE_CASES


def vector_violations(launch: dict) -> list[str]:
    """What breaks "the row's global loads and stores are 128-bit" in a launch at an issue width: a
    launch that did not take the aligned path; a column loop with a narrower load or store, or none of
    128 bits; a row held in registers (no loop) read or written without 128-bit accesses. The sparse
    teacher's kernel may also load its membership bitmap in the loop that sums the bucket (NEED_REST):
    a 32-bit word per 128-bit vector of the row at most (kernels/kd_loss_topk.py)."""
    out = []
    bitmap = launch["kernel"] == TOPK and launch.get("NEED_REST")
    if launch["ALIGN"] == 0:
        out.append("ALIGN 0: rows read entry by entry")
    loops, total = launch["sass"]["loops"], launch["sass"]["total"]
    for i, loop in enumerate(loops):
        for kind in ("ldg", "stg"):
            narrow = {bits: n for bits, n in loop[kind].items() if bits != "128"}
            if bitmap and kind == "ldg" and narrow.get("32", 0) <= loop["ldg"].get("128", 0):
                narrow.pop("32", None)
            if narrow:
                out.append(f"loop {i}: {kind} {narrow}")
        if not loop["ldg"].get("128"):
            out.append(f"loop {i}: no 128-bit load")
    if not loops:  # one block (V = 1000) or scale_grad_kernel: the row's tiles are the 128-bit accesses
        if not total["ldg"].get("128"):
            out.append("no 128-bit load")
        if _writes_rows(launch) and not total["stg"].get("128"):
            out.append("no 128-bit store")
    return out


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("sm90_compile.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    launches = [json.loads(line) for line in out.stdout.splitlines()]
    assert Counter(launch["kernel"] for launch in launches) == {
        # 15 configs in bf16 + 3 in fp16 and fp32, x (softmax, log) x 2 launches; 12 issue cases x 2
        "tempered_softmax_fwd_kernel": 108,
        "tempered_softmax_bwd_kernel": 150,  # the same x 3 launches; 12 issue cases x 3
        # 14 configs + 4 widths x 4 divergences (DKD's included) x 3 normalizations x (1, 3) teachers;
        # issue 18's 9 objectives at 50257; 12 issue cases x (fused, stats, grad); DKD split at 50257
        "kd_loss_kernel": 157,
        "scale_grad_kernel": 5,
        # 8 configs with k = 64 + 3 widths x (k = 1, 1024) x 5 modes + 8 objectives at 50257 + 12 issue
        # cases x (forward KL, TVD with the bucket)
        "kd_loss_topk_fwd_kernel": 70,
        "calibration_kernel": 45,  # 12 configs + 1024 bins at 3 widths + 3 widths x 6 variants + 12
        "fidelity_kernel": 29,  # 12 configs + an ensemble of 3 at 3 widths + ensembles of 2 and 8 + 12
    }
    spilled = [launch for launch in launches if launch["spill_bytes"]]
    assert not spilled, spilled
    checked = [launch for launch in launches if _at_issue_width(launch)]
    # kd_loss_kernel: 12 issue cases x (fused, stats, grad) and the 131072 bf16 config; scale_grad_kernel:
    # 1000, 50257 and 131072 bf16; softmax: 12 issue cases x (2 forward + 2 backward launches) and the
    # 131072 bf16 and fp32 configs x (softmax, log) x (2 forward + 3 backward); fidelity: 12 issue
    # cases, the 131072 bf16 config, an ensemble of 3 at 1000 and 131072; calibration: 12 issue cases,
    # the 131072 bf16 config, 1024 bins and 6 variants at 1000 and 131072; topk: 12 issue cases x 2, the
    # 131072 bf16 config and its 10 modes, the 8 objectives at 50257
    assert len(checked) == 12 * 3 + 1 + 3 + 12 * 4 + 2 * 2 * 5 + (12 + 1 + 2) + (12 + 1 + 2 * 7) + (24 + 11 + 8)
    narrow = {f"{launch['kernel']} {launch['case']} PHASE={launch.get('PHASE')}": vector_violations(launch)
              for launch in checked}  # fmt: skip
    assert not any(narrow.values()), {k: v for k, v in narrow.items() if v}


def test_vector_check_sees_scalar_loads():
    """The 128-bit check fails a loop that loads 16 bits at a time and a launch without aligned rows."""
    loop = {"ldg": {"16": 16}, "stg": {"128": 1}}
    launch = {"kernel": "kd_loss_kernel", "case": "4097 bfloat16", "ALIGN": 2, "NEED_GRAD": True, "PHASE": 0}
    launch["sass"] = {"loops": [loop], "total": loop}
    assert vector_violations(launch) == ["loop 0: ldg {'16': 16}", "loop 0: no 128-bit load"]
    launch.update(ALIGN=0, sass={"loops": [], "total": {"ldg": {"128": 2}, "stg": {"16": 8}}})
    assert vector_violations(launch) == ["ALIGN 0: rows read entry by entry", "no 128-bit store"]


def test_vector_check_allows_the_bitmap_words_only():
    """The sparse kernel's loop may load a 32-bit bitmap word per 128-bit vector where it sums the bucket,
    and no more; without the bucket (NEED_REST off) none."""
    loop = {"ldg": {"128": 2, "32": 2}, "stg": {}}
    launch = {"kernel": TOPK, "case": "50257 bfloat16 tvd bucket k=64", "ALIGN": 2, "NEED_GRAD": True,
              "NEED_REST": True, "sass": {"loops": [loop], "total": loop}}  # fmt: skip
    assert vector_violations(launch) == []
    loop["ldg"]["32"] = 3
    assert vector_violations(launch) == ["loop 0: ldg {'32': 3}"]
    loop["ldg"]["32"] = 2
    launch["NEED_REST"] = False
    assert vector_violations(launch) == ["loop 0: ldg {'32': 2}"]
