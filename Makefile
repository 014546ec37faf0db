# Two commands on a fresh machine:  make figures   |   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PRESET  ?= auto

.PHONY: venv data figures notebook test bench clean-runs

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# CIFAR-10: $$CIFAR10_ROOT if set, else ./data (downloaded once, md5-checked)
data: venv
	$(BIN)/python -c "from common.data import load_cifar10, cifar10_root; load_cifar10(); print('CIFAR-10 ready in', cifar10_root())"

figures: data
	$(BIN)/python -m common.notebooks --preset $(PRESET)

# one notebook: make notebook NB=02 [PRESET=quick]
notebook: data
	$(BIN)/python -m common.notebooks --preset $(PRESET) --only $(NB)

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python benchmarks/throughput.py

clean-runs:
	rm -rf runs/
