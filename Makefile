# `make test` and `make demo` set up .venv when it is missing, then run.
PYTHON ?= python3
VENV ?= .venv
MAKEFLAGS += -j2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo lint bench venv browser clean

venv: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on disk; an open range would pull a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,video,train,live]"
	touch $(STAMP)

# Two pytest-xdist workers, one per core (tests/conftest.py gives each one thread); a test file
# runs whole on one worker, so its module fixtures are built once. The venv and the browser are
# set up side by side (-j2).
test: lint browser
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The live page's browser test drives Debian's chromium: installed here when it is missing and
# apt-get can (as root); without it tests/test_live_web.py's browser test skips and says why.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
			 (apt-get update -qq >/dev/null 2>&1 && \
			  apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1)) || \
			echo "make browser: could not install chromium; the browser test will skip"; \
		else \
			echo "make browser: no chromium and no apt-get as root; the browser test will skip"; \
		fi; \
	fi

# The quick loop: every test not marked slow (under 2 minutes on 2 CPU cores).
test-fast: lint
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/memflow demo

lint: $(STAMP)
	$(PY) -m ruff check memflow_adapter memflow_apps integrations recipes tests bench

# --heads 2 keeps the reference token geometry but fits a 2-core machine.
bench: $(STAMP) browser
	$(PY) bench/attention_overhead.py --heads 2
	$(PY) bench/streaming_scaling.py
	$(PY) bench/stream_latency.py
	$(PY) bench/live_latency.py

clean:
	rm -rf $(VENV) .pytest_cache outputs
