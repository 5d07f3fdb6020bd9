# Set-up and the two everyday commands. Each target creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

demo: $(STAMP)
	$(BIN)/pedetect demo --out demo_output

bench: $(STAMP)
	$(BIN)/python benchmarks/synth.py

clean:
	rm -rf $(VENV) demo_output
