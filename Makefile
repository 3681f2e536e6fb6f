# make test: create .venv, install torch (CPU build) first, then fedmerge with its test extras, run the tests
#   (pytest-xdist, one worker per core: PYTEST_WORKERS=0 runs them in one process).
# make demo: the same environment, then the paper's LLM experiment in miniature (`fedmerge demo`);
#   options pass through ARGS, e.g. make demo ARGS="--size small --out /tmp/demo".
# make mergekit-tests: the installed mergekit's own test suite with fedmerge installed (make test runs it last).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
PYTEST_WORKERS ?= auto
MERGEKIT_TESTS_CACHE ?= .cache/mergekit-tests
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedmerge-installed

.PHONY: test demo venv clean sandbox-tools mergekit-tests

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# The code sandbox (fedmerge_plugins/evaluation/sandbox.py) needs bubblewrap; as root with apt
# (CI), install it; otherwise say what is missing (the sandbox tests then fail, naming it).
sandbox-tools:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null; } || \
	  echo "bubblewrap (bwrap) is missing: install it to run model-written code sandboxed" >&2

test: venv sandbox-tools
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
	$(BIN)/python .ci/mergekit_suite.py --cache $(MERGEKIT_TESTS_CACHE)

# mergekit's sdist for the installed version, fetched once into $(MERGEKIT_TESTS_CACHE); offline: skipped in one line
mergekit-tests: venv
	$(BIN)/python .ci/mergekit_suite.py --cache $(MERGEKIT_TESTS_CACHE)

demo: venv
	$(BIN)/fedmerge demo $(ARGS)

clean:
	rm -rf $(VENV) demo-out
