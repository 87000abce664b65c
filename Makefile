# Every target sets itself up first: a local .venv with the CPU build of torch where
# no NVIDIA GPU is present (the CUDA build is several GB), then the SDK with all extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "==> setting up $(VENV) (once; later runs skip this)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install -q --disable-pip-version-check torch ; \
	else \
	    $(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 ; \
	fi
	@$(PY) -m pip install -q --disable-pip-version-check -e ".[all,dev]"
	@touch $(STAMP)
	@echo "==> set-up done"

test: setup
	@bash tests/browser_setup.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q

demo: setup
	$(PY) demo/app.py

bench: setup
	$(VENV)/bin/vesper bench

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
