# Every target sets itself up first: a local .venv with the CPU build of torch where
# no NVIDIA GPU is present (the CUDA build is several GB), then the SDK with all extras.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test demo bench lint clean optimum-check

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

# Optimum needs transformers<4.58 and the dev extra has 5.x: its own environment.
optimum-check: .venv-optimum/.installed
	.venv-optimum/bin/python -m vesper_sdk.export.optimum_check

# Its own venv (optimum pins transformers apart from ours), installed once like setup's.
.venv-optimum/.installed: pyproject.toml
	@test -x .venv-optimum/bin/python || $(PYTHON) -m venv .venv-optimum
	@.venv-optimum/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	@.venv-optimum/bin/python -m pip install -q --disable-pip-version-check -e ".[export]" \
	    "optimum-onnx[onnxruntime]"
	@touch $@

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) .venv-optimum .pytest_cache build *.egg-info
