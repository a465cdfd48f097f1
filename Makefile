# recbole-darec: `make run` and `make test` set up .venv on first use (scripts/install.sh), then run.
# The venv is (re)installed only when it is missing or the dependency declarations changed since the last
# install: scripts/install.sh touches $(STAMP) when it finishes.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
RUN_ARGS ?= --model=DARec --dataset=ml-100k --config_files=properties/cpu_quick.yaml --baseline=Pop

.PHONY: install run test lint

$(STAMP): setup.cfg pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)

# Always runs the install step (pip skips what is already there).
install:
	bash scripts/install.sh $(VENV)

# The main job: DARec with the embedded default backbone on ml-100k, CPU quick profile.
run: $(STAMP)
	$(PYTHON) run_darec.py $(RUN_ARGS)

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
