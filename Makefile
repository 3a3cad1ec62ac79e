# Set-up and jobs. `make demo` and `make test` each create .venv and install what they need on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch 2.13.0 (on disk on the project's machines) and the GPU machine's Triton.
PINS := torch==2.13.0 triton==3.6.0 "numpy<2.3"

.PHONY: demo test bench cuda-check clean

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

test: $(VENV)/.installed cuda-check
	$(PY) -m pytest -q

# Compile (not run) every csrc/**/*.cu with nvcc against the torch headers, so CI catches C++ errors.
CU_FILES := $(shell find csrc -name '*.cu' | sort)
TORCH_INCLUDES = $(PY) -c 'import sysconfig; from torch.utils.cpp_extension import include_paths; \
	print(" ".join("-I" + p for p in include_paths() + [sysconfig.get_paths()["include"]]))'

cuda-check: $(VENV)/.installed
ifeq ($(CU_FILES),)
	@echo "cuda-check: no .cu files in csrc/"
else
	@flags="$$($(TORCH_INCLUDES))"; for f in $(CU_FILES); do \
		echo "nvcc $$f"; nvcc -std=c++20 -arch=sm_90a -c $$f -o /dev/null $$flags || exit 1; \
	done
endif

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
