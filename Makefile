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

.PHONY: venv chromium demo test clean

venv: $(STAMP) chromium

# Headless Chromium renders the audit report in tests/test_report.py. Installed only when absent, as
# root, with apt-get (Debian's package); anywhere else the report test skips with its reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	      >/dev/null 2>&1 || echo "chromium could not be installed: the report test will be skipped"; \
	  else echo "chromium not found (needs root + apt-get to install): the report test will be skipped"; fi; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --out demo-output

test: $(STAMP) chromium
	$(PY) -m pytest tests

clean:
	rm -rf demo-output .pytest_cache
