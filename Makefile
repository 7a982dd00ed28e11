# The README's two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both create or reuse a local virtual environment in .venv by themselves.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test venv-run venv-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Runtime only: what a client app or the cloud service needs (no torch, no Ray).
$(VENV)/.installed-run: pyproject.toml | $(PY)
	$(PIP) install --quiet -e .
	touch $@

# Everything the tests exercise. torch is pinned to the CPU wheel and installed first, so that
# no other requirement can pull the CUDA build.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,train,eval,ray]"
	touch $@ $(VENV)/.installed-run

venv-run: $(VENV)/.installed-run
venv-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-run
	$(VENV)/bin/hybrid-router demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
