# Two commands do everything: `make demo` (the main job on the local stack) and `make test`.
# Each creates .venv and installs what is missing. EXTRAS=gpu installs tensorflow[and-cuda].
PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRAS)

.PHONY: demo test lint down up status bench bench-accuracy clean install deploy

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),dev]'
	touch $(STAMP)

install: $(STAMP)

deploy: $(STAMP)
	$(BIN)/malaria stack up
	$(BIN)/malaria deploy

demo: $(STAMP)
	$(BIN)/malaria demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

up: $(STAMP)
	$(BIN)/malaria stack up

down: $(STAMP)
	$(BIN)/malaria stack down

status: $(STAMP)
	$(BIN)/malaria stack status

bench: $(STAMP)
	$(BIN)/python -m benchmarks.ingest --n 3000 --json benchmarks/results/ingest.json
	$(BIN)/python -m benchmarks.ingest --n 1000 --latency-ms 20 --json benchmarks/results/ingest-20ms.json
	$(BIN)/python -m benchmarks.scoring --cells 20000 --json benchmarks/results/scoring.json

BENCH_DATA ?= ../shared/data/nih-cells-128
bench-accuracy: $(STAMP)
	$(BIN)/python -m benchmarks.accuracy --data $(BENCH_DATA) --minutes 15 --json benchmarks/results/accuracy.json

clean: down
	rm -rf .malaria
