# The two commands a new user runs: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slurm bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py

test: $(VENV)/.installed
	$(BIN)/python -m pytest

# the tests marked `slurm`, against a one-node SLURM cluster that scripts/slurm_cluster.sh
# brings up when none answers (and stops afterwards, if it started it)
test-slurm: $(VENV)/.installed
	scripts/slurm_cluster.sh up
	$(BIN)/python -m pytest -m slurm --numprocesses=0; status=$$?; \
	  scripts/slurm_cluster.sh down; exit $$status

bench: $(VENV)/.installed
	$(BIN)/normexp bench

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
