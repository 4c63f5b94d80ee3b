# Everything a fresh machine needs; see README.md.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
NPROC   ?= 2
DEMO    ?= demo_ckpt

.PHONY: demo test venv clean

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

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
