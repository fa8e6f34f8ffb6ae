# Two commands on a fresh machine with Python >= 3.10, each setting up what it needs in .venv:
#   make demo    the laptop reproduction's demo setting, one seed (reproduce.py --setting demo; ARGS="--source PATH"
#                offline, ARGS="--setting fast" for the fast setting)
#   make test    the whole test suite
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned: an unpinned torch pulls the multi-GB CUDA build onto a CPU-only machine
TORCH ?= torch==2.13.0
ARGS ?=
BIN = $(VENV)/bin

.PHONY: demo test

demo: $(VENV)/.installed-plot
	$(BIN)/python reproduce.py --setting demo $(ARGS)

# on every core (pytest-xdist), a test file per worker: its module fixtures are built once
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n auto --dist loadfile $(ARGS)

$(VENV)/.installed-torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.installed-%: $(VENV)/.installed-torch pyproject.toml
	$(BIN)/pip install -q -e ".[$*]"
	touch $@
