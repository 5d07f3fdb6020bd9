# Set-up and the two everyday commands. Each target creates .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo bench fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

# The inner loop: the suite without the end-to-end runs (tests marked slow).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow"

# The code's one formatting and its lint rules (ruff; settings in pyproject.toml) and the types of src/
# (mypy); .ci/run runs this before the tests and fails on any finding.
lint: $(STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks

# The whole pipeline on synthetic data (pedetect demo: synth, prepare, train, predict, evaluate).
DEMO := demo_output
demo: $(STAMP)
	$(BIN)/pedetect demo --out $(DEMO)

bench: $(STAMP)
	$(BIN)/python benchmarks/synth.py
	$(BIN)/python benchmarks/prepare.py

# Coverage-guided fuzzing of the DICOM read path with atheris (tests/fuzz/read_fuzz.py): corpus and
# crash inputs in fuzz_output/. The test suite runs a short seeded pass of the same target.
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore $(BIN)/python tests/fuzz/read_fuzz.py --atheris $(FUZZ_SECONDS) --corpus fuzz_output/corpus

clean:
	rm -rf $(VENV) $(DEMO)
