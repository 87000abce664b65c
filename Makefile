# Every target sets itself up first: a local .venv with the CPU build of torch where no NVIDIA
# GPU is present (the CUDA build is several GB), then the SDK with all extras at the exact
# versions of requirements.lock (what the suite last passed with). pip's own output goes to
# .venv/setup.log and is shown only when set-up fails.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
LATEST := .venv-latest
PIP    := -m pip install --disable-pip-version-check
# torch is not in the lock: the CPU build 2.13.0 here, the CUDA build pip picks on a GPU machine
# (whose torch pins its own triton, so the lock's triton is left out there).
GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH  := $(if $(GPU),torch,torch==2.13.0)

.PHONY: setup test test-latest lock demo bench lint clean optimum-check lmeval-check \
        peers-check

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@echo "==> setting up $(VENV) from $(LOCK) (once; later runs skip this)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(if $(GPU),grep -v '^triton==' $(LOCK),cat $(LOCK)) > $(VENV)/constraints.txt
	@( $(PY) $(PIP) --upgrade pip && $(PY) $(PIP) $(TORCH) \
	   && $(PY) $(PIP) -c $(VENV)/constraints.txt -e ".[all,dev]" ) > $(VENV)/setup.log 2>&1 \
	   || { tail -40 $(VENV)/setup.log; echo "set-up failed: full log in $(VENV)/setup.log"; exit 1; }
	@touch $(STAMP)
	@echo "==> set-up done"

test: setup
	@bash tests/browser_setup.sh
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# The newest releases pyproject allows, in their own venv, made anew each time: drift in a
# dependency is found here on purpose, not by CI. `make lock` runs it and, when it passes, writes
# what it resolved to into requirements.lock.
test-latest:
	@echo "==> setting up $(LATEST) with the newest releases"
	@rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	@( $(LATEST)/bin/python $(PIP) --upgrade pip && $(LATEST)/bin/python $(PIP) $(TORCH) \
	   && $(LATEST)/bin/python $(PIP) --upgrade -e ".[all,dev]" ) > $(LATEST)/setup.log 2>&1 \
	   || { tail -40 $(LATEST)/setup.log; echo "set-up failed: $(LATEST)/setup.log"; exit 1; }
	@bash tests/browser_setup.sh
	$(LATEST)/bin/python -m ruff check .
	$(LATEST)/bin/python -m pytest -q

lock: test-latest
	@{ echo "# Exact versions \`make test\` passed with; \`make setup\` installs them (pip -c)."; \
	   echo "# Written by \`make lock\` on $$(date -u +%Y-%m-%d) after \`make test-latest\` passed;"; \
	   echo "# torch is installed first, apart: $$($(LATEST)/bin/python -c 'import torch; print(torch.__version__)')."; \
	   $(LATEST)/bin/python -m pip freeze --exclude-editable | grep -v -E '^(torch|nvidia-[a-z0-9-]+)==' ; \
	 } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	@echo "==> wrote $(LOCK); commit it"

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

# EleutherAI's lm-evaluation-harness against `vesper serve` (loglikelihood through
# local-completions, generation through local-chat-completions) and through transformers
# (`--model hf`, the folder's auto_map), offline, on the bundled model.
lmeval-check: setup .venv-lmeval/.installed-hf
	.venv-lmeval/bin/python tests/lmeval/run_check.py

# Its own venv: the harness and what it pulls stay out of ours; torch's CPU build first, or a
# dependency would pull the multi-GB CUDA one. The hf extra at the lock's transformers; the SDK
# itself comes from the repo root (PYTHONPATH, set by run_check.py), not installed.
.venv-lmeval/.installed-hf: $(LOCK)
	@test -x .venv-lmeval/bin/python || $(PYTHON) -m venv .venv-lmeval
	@.venv-lmeval/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	@.venv-lmeval/bin/python -m pip install -q --disable-pip-version-check \
	    "lm_eval[api,hf]==0.4.13" $$(grep -E '^(transformers|tokenizers|safetensors)==' $(LOCK))
	@touch $@

# Greedy decode of the 'small' shape: vesper's PyTorch (eager, compiled) and ONNX (fp32, int8,
# int4) paths beside onnxruntime-genai, llama.cpp (llama-cpp-python) and CTranslate2, each
# converted by its own tool (benchmarks/decode_peers.py; about 7 minutes on an idle 2-core CPU),
# through the suite: benchmarks/results/decode_peers.{json,md} and its SUMMARY.md row.
peers-check: setup .venv-peers/.installed
	$(VENV)/bin/vesper bench --only decode_peers

# Its own venv, torch's CPU build first, then the SDK with its export extra at the lock's
# versions, then each peer apart: one that fails to install (llama-cpp-python compiles from
# source, several minutes) leaves its pip output in .venv-peers/install-NAME.log, which the
# benchmark reports as that peer's error. llama.cpp's own converter (convert_hf_to_gguf.py,
# conversion/, gguf-py/) comes from llama-cpp-python's sdist.
PEERS := onnxruntime-genai==0.18.0 llama-cpp-python==0.3.36 ctranslate2==4.8.5
.venv-peers/.installed: pyproject.toml $(LOCK)
	@test -x .venv-peers/bin/python || $(PYTHON) -m venv .venv-peers
	@.venv-peers/bin/python $(PIP) -q torch==2.13.0
	@.venv-peers/bin/python $(PIP) -q -c $(LOCK) -e ".[export]" transformers sentencepiece
	@for p in $(PEERS); do name=$${p%%==*}; \
	  echo "==> installing $$p (.venv-peers/install-$$name.log)"; \
	  .venv-peers/bin/python $(PIP) -c $(LOCK) $$p > .venv-peers/install-$$name.log 2>&1 \
	    || echo "    $$p failed to install: the benchmark reports it"; done
	@rm -rf .venv-peers/llama.cpp && mkdir -p .venv-peers/llama.cpp/sdist \
	  && .venv-peers/bin/python -m pip download -q --disable-pip-version-check --no-deps \
	     --no-binary :all: -d .venv-peers/llama.cpp/sdist llama-cpp-python==0.3.36 \
	  && tar -xzf .venv-peers/llama.cpp/sdist/llama_cpp_python-0.3.36.tar.gz \
	     -C .venv-peers/llama.cpp --strip-components=3 --wildcards \
	     '*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/conversion' \
	     '*/vendor/llama.cpp/gguf-py' \
	  > .venv-peers/install-llama.cpp-converter.log 2>&1 \
	  || echo "    llama.cpp's converter could not be fetched: the benchmark reports it"
	@touch $@

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) $(LATEST) .venv-optimum .venv-lmeval .venv-peers .pytest_cache build *.egg-info
