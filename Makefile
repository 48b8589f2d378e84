# Two commands matter: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline by default: no model hub, no update checks, no usage stats.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export WANDB_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --out demo-output

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf demo-output .pytest_cache
