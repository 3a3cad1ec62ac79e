#!/usr/bin/env bash
# One run on a GPU machine (H100/H200: torch with CUDA, triton, python 3.12, offline) that checks every
# backend there and measures the headline shapes, in under 8 minutes of wall time:
#
#   1. environment   the GPU, nvcc, torch, CUDA, triton; what is missing is said (offline: nothing is downloaded)
#   2. install       pip install --no-deps -e . where fastkd does not import yet
#   3. cuda build    the CUDA extension's JIT build (csrc/cuda/, fastkd._cuda_ext), its ptxas report
#   4. cuda tests    tests/test_cuda_backend.py: every kernel path against float64 (the gpu-marked tests)
#   5. op tests      the op tests of the loss and the calibration pass on the GPU, on the triton and cuda
#                    backends (FASTKD_TEST_BACKENDS); the first failure stops it (-x)
#   6. benchmarks    python -m benchmarks: the KD loss and ECE cases in bfloat16 at (16384, 131072) and
#                    (8192, 262144), writing benchmarks/results/<device>-<date>.{md,json,png}
#
# Each step runs under its own timeout (the budgets add up to BUDGET_S = 480 s); a failing step is reported
# and the next one still runs; the exit status is the number of failed steps. Logs: $LOGS (default
# benchmarks/results/gpu_check-logs/). `--dry-run` prints and validates the steps without a GPU (the
# files exist, the benchmark arguments parse, the test selections collect), as tests/test_gpu_check.py does.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PY="${PYTHON:-python}"
BUDGET_S=480
LOGS="${LOGS:-benchmarks/results/gpu_check-logs}"
BENCH_ARGS=(--cases kd_loss ece --dtypes bfloat16 --shapes 16384x131072 8192x262144 --rounds 3)
CUDA_TESTS=(tests/test_cuda_backend.py)
OP_TESTS=(tests/test_kd_loss.py tests/test_calibration.py tests/test_objectives.py)

# name | budget (s) | command
STEPS=(
  "environment|15|nvidia-smi -L; (command -v nvcc >/dev/null && nvcc --version | tail -1) || echo 'nvcc: MISSING (the CUDA backend cannot build; CUDA_HOME?)'; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0))'; $PY -c 'import triton; print(\"triton\", triton.__version__)'; for m in pytest hypothesis tqdm matplotlib numpy liger_kernel; do $PY -c \"import \$m\" 2>/dev/null && echo \"\$m: ok\" || echo \"\$m: MISSING\"; done"
  "install|25|$PY -c 'import fastkd' 2>/dev/null || $PY -m pip install --no-deps -e ."
  "cuda build|100|FASTKD_EXT_DIR=\${FASTKD_EXT_DIR:-\$HOME/.cache/fastkd/ext} $PY -c 'from fastkd import _cuda_ext as e; ok = e.load(); print(e.info()); raise SystemExit(0 if ok else 1)'"
  "cuda tests|80|$PY -m pytest -q -p no:cacheprovider ${CUDA_TESTS[*]}"
  "op tests|100|FASTKD_TEST_BACKENDS=triton,cuda $PY -m pytest -q -x -p no:cacheprovider ${OP_TESTS[*]}"
  "benchmarks|160|$PY -m benchmarks ${BENCH_ARGS[*]}"
)

total=0
for step in "${STEPS[@]}"; do total=$((total + $(cut -d'|' -f2 <<<"$step"))); done
if ((total > BUDGET_S)); then
  echo "gpu_check: the steps' budgets add up to ${total} s, over ${BUDGET_S} s" >&2
  exit 100
fi

if ((DRY_RUN)); then
  echo "gpu_check --dry-run: ${#STEPS[@]} steps, ${total} s of ${BUDGET_S} s budgeted"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name budget cmd <<<"$step"
    printf '[dry-run] %-12s %4s s  %s\n' "$name" "$budget" "$cmd"
  done
  fail=0
  for f in setup.py csrc/cuda/bindings.cpp csrc/cuda/kd_loss.cu csrc/cuda/calibration.cu "${CUDA_TESTS[@]}" "${OP_TESTS[@]}"; do
    [[ -f "$f" ]] || { echo "[dry-run] missing: $f"; fail=1; }
  done
  # the benchmark arguments parse against the suite's own parser (no run)
  $PY - "${BENCH_ARGS[@]}" <<'PYEOF' || fail=1
import argparse, sys
from unittest import mock
import benchmarks.__main__ as bench
with mock.patch.object(bench, "run", side_effect=SystemExit(0)) as run:
    try:
        bench.main(sys.argv[1:])
    except SystemExit as e:
        assert e.code == 0, e.code
print("[dry-run] benchmark arguments parse:", " ".join(sys.argv[1:]))
PYEOF
  # the test selections collect
  $PY -m pytest -q --collect-only -p no:cacheprovider "${CUDA_TESTS[@]}" "${OP_TESTS[@]}" >/dev/null 2>&1 \
    && echo "[dry-run] test selections collect" || { echo "[dry-run] the test selections do not collect"; fail=1; }
  exit "$fail"
fi

mkdir -p "$LOGS"
failed=0
start=$(date +%s)
for step in "${STEPS[@]}"; do
  IFS='|' read -r name budget cmd <<<"$step"
  log="$LOGS/${name// /_}.log"
  t0=$(date +%s)
  echo "== $name (budget ${budget} s)"
  timeout --signal=INT --kill-after=10 "$budget" bash -c "$cmd" >"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  status="ok"
  ((rc == 124)) && status="TIMED OUT"
  ((rc != 0 && rc != 124)) && status="FAILED (rc $rc)"
  [[ "$status" == ok ]] || failed=$((failed + 1))
  echo "== $name: $status in $(($(date +%s) - t0)) s (log: $log)"
done
echo "gpu_check: $failed failed step(s) in $(($(date +%s) - start)) s; results: $(ls -t benchmarks/results/*.md 2>/dev/null | head -1)"
exit "$failed"
