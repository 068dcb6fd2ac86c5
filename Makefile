# Quickstart:  make demo   (set up + run the whole pipeline on the shipped defaults)
#              make test   (set up + run the test suite)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-all lint format clean

$(BIN)/metaprune: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(BIN)/metaprune

setup: $(BIN)/metaprune data

data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	      echo "warning: could not install dataset-fashion-mnist; tests on real data will be skipped"; \
	  else echo "note: apt-get not found; install Fashion-MNIST and pass --data-dir"; fi; \
	fi

demo: setup
	$(BIN)/metaprune demo

test: setup
	$(BIN)/ruff check metaprune spa tests tools
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m "not cuda"

lint:
	$(BIN)/ruff check metaprune spa tests tools

format:
	$(BIN)/ruff format metaprune spa tests tools

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
