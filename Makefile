# Two commands on a fresh machine:  make figures   |   make test
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PRESET  ?= auto
ENGINE  ?= auto

.PHONY: venv data figures notebook test test-fast lint format bench constraints clean-runs

$(STAMP): requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# CIFAR-10: $$CIFAR10_ROOT if set, else ./data (downloaded once, md5-checked; a damaged folder is fetched again)
data: venv
	$(BIN)/python -c "from common.data import load_cifar10, cifar10_root; load_cifar10(); print('CIFAR-10 ready in', cifar10_root())"

# regenerate the committed figures/ (and, for PRESET=paper, results/) from the notebooks
figures: data
	$(BIN)/python -m common.notebooks --preset $(PRESET) --engine $(ENGINE) --fig-dir figures

# one notebook: make notebook NB=02 [PRESET=quick] [FIG_DIR=runs/figures]; smoke needs no CIFAR-10
FIG_DIR ?= figures
notebook: venv
	@if [ "$(PRESET)" != "smoke" ]; then $(MAKE) --no-print-directory data; fi
	$(BIN)/python -m common.notebooks --preset $(PRESET) --engine $(ENGINE) --fig-dir $(FIG_DIR) --only $(NB)

# everything: unit tests and the notebooks' smoke runs
test: venv
	$(BIN)/python -m pytest -q

# unit tests only (no notebook executions), about a minute
test-fast: venv
	$(BIN)/python -m pytest -q -m "not notebook"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: venv
	$(BIN)/python benchmarks/throughput.py

# record the exact versions of this environment (commit it with results made in it)
constraints: venv
	{ echo "# Exact versions of the environment results were produced with (make constraints)."; $(BIN)/python -m pip freeze --exclude-editable | grep -v "^-e "; } > constraints.txt

clean-runs:
	rm -rf runs/
