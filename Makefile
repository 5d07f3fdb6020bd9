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

# The pipeline so far on synthetic data (pedetect demo will replace this once predict exists).
DEMO := demo_output
demo: $(STAMP)
	$(BIN)/pedetect synth $(DEMO)/data --studies 24 --size 128 --seed 1 --split train
	$(BIN)/pedetect synth $(DEMO)/data --studies 8 --size 128 --seed 2 --split test --transfer-syntax rle
	$(BIN)/pedetect synth --preview $(DEMO)/synth_preview.png --seed 1 --size 256
	$(BIN)/pedetect prepare $(DEMO)/data/train --out $(DEMO)/store
	# All-0.5 sample submission: every exam breaks a rule (exit 1, ignored here); --fix repairs it.
	-$(BIN)/pedetect check $(DEMO)/data/sample_submission.csv --studies $(DEMO)/data/test.csv --fix $(DEMO)/fixed_sample.csv > /dev/null
	$(BIN)/pedetect check $(DEMO)/fixed_sample.csv --studies $(DEMO)/data/test.csv
	$(BIN)/pedetect evaluate --labels $(DEMO)/data/test_labels.csv --submission $(DEMO)/data/sample_submission.csv
	$(BIN)/pedetect evaluate --labels $(DEMO)/data/test_labels.csv --submission $(DEMO)/fixed_sample.csv

bench: $(STAMP)
	$(BIN)/python benchmarks/synth.py
	$(BIN)/python benchmarks/prepare.py

clean:
	rm -rf $(VENV) $(DEMO)
