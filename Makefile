# Set-up and jobs. `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (on disk on the project's machines) and the GPU machine's Triton.
PINS := torch==2.13.0 triton==3.6.0 "numpy<2.3"

.PHONY: demo test bench cuda-check compat clean

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(PINS)
	$(PY) -m pip install --quiet -e ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m fastkd demo

# The benchmark suite on the present device (CUDA when there is one); results in benchmarks/results/.
bench: $(VENV)/.installed
	$(PY) -m benchmarks

test: $(VENV)/.installed
	$(PY) -m pytest -q

# Compile (not run) every csrc/cuda/*.cu for sm_90a with nvcc -Xptxas -v, fail on a register spill, print the
# registers per kernel, and syntax-check the bindings: tests/test_cuda_compile.py, which `make test` runs too
# (skipped, with the reason, where nvcc is absent).
cuda-check: $(VENV)/.installed
	$(PY) -m pytest -q -s tests/test_cuda_compile.py

# The newest versions the README claims, in a venv of their own (torch 2.14.1 is a CUDA build: ~5 GB,
# from the wheels on this machine's disk). By hand, not in CI.
COMPAT := .venv-compat
COMPAT_PINS ?= torch==2.14.1 triton==3.8.0 "numpy<2.3"
COMPAT_TESTS ?= tests/test_softmax.py tests/test_kd_loss.py tests/test_kd_loss_topk.py tests/test_calibration.py \
	tests/test_temperature.py tests/test_fidelity.py tests/test_backend.py tests/test_meter.py \
	tests/test_fused_linear.py tests/test_package.py tests/test_demo.py tests/test_reliability.py

compat:
	$(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install --quiet $(COMPAT_PINS)
	$(COMPAT)/bin/python -m pip install --quiet -e ".[test,demo]"
	$(COMPAT)/bin/python -m pytest -q $(COMPAT_TESTS)

clean:
	rm -rf $(VENV) $(COMPAT) build *.egg-info .pytest_cache .hypothesis
