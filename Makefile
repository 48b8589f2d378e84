# Two commands matter: `make demo` and `make test`. Both build .venv on first use.
# While working: `make test-fast` (the in-process tests, under a minute) and `make lint`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Offline defaults (no model hub, no update checks, no usage stats) are not exported here: the jobs
# (jobs/_bootstrap.py) and the tests (tests/conftest.py) apply pipeline/core/offline.py themselves.
export PYTHONUNBUFFERED := 1

.PHONY: venv chromium fashion-mnist demo test test-fast lint clean

venv: $(STAMP) chromium fashion-mnist

# Headless Chromium renders the audit report in tests/test_report.py. Installed only when absent, as
# root, with apt-get (Debian's package); anywhere else the report test skips with its reason.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) \
	      >/dev/null 2>&1 || echo "chromium could not be installed: the report test will be skipped"; \
	  else echo "chromium not found (needs root + apt-get to install): the report test will be skipped"; fi; }

# Fashion-MNIST (Debian's dataset-fashion-mnist: 70k 28x28 images under /usr/share/datasets/), the data
# set the AMG models generalize on. Installed the same way, only when absent; never committed.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist) \
	      >/dev/null 2>&1 || echo "dataset-fashion-mnist could not be installed: the tests that need it will be skipped"; \
	  else echo "dataset-fashion-mnist not found (needs root + apt-get to install): the tests that need it will be skipped"; fi; }

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# clip-retrieval's ClipClient, for the kNN service's tests: without its dependencies (it pins
	# numpy<2 and pyarrow<16); the tests load its clip_client.py alone, which needs only requests.
	$(PY) -m pip install --quiet --no-deps clip-retrieval==2.45.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --out demo-output

# The whole suite, after lint (CI runs `make test`).
test: lint chromium fashion-mnist
	$(PY) -m pytest tests

# Under a minute: leaves out the tests marked `slow` (pyproject.toml), i.e. those that start Ray (a local
# session, `ray start`, `ray job submit`), run jobs or Chromium as subprocesses, serve HTTP or run
# img2dataset, or train or sample diffusion models. It keeps the in-process logic: config and flags,
# decoding, shards, hashing, MinHash and caption dedup, FAISS indexes, AMG terms and gradients, prompts,
# the report's HTML, and the layering (tests/test_architecture.py).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

# ruff (pinned in pyproject.toml) over the whole checkout, and the package's layering.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest tests/test_architecture.py -q

clean:
	rm -rf demo-output .pytest_cache
