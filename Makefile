# The README's two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Both create or reuse a local virtual environment in .venv by themselves.
#
# Three distributions are built from this repository (see README "Install"):
#   .                -> hybrid-edge-router         the client: router, edge model, wire types
#   ./cloud_service  -> hybrid-edge-router-server  the cloud service and the cloud model
#   ./router_tools   -> hybrid-edge-router-tools   the `hybrid-router` command, demo, eval, data
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PROJECTS := pyproject.toml cloud_service/pyproject.toml router_tools/pyproject.toml

.PHONY: demo test venv-run venv-dev wheels clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# What the demo needs: client, server and tools (no torch, no Ray); its model-update stage needs
# the client's updater (tuf) and the operator's release tools.
$(VENV)/.installed-run: $(PROJECTS) | $(PY)
	$(PIP) install --quiet -e ".[updates]" -e ./cloud_service -e "./router_tools[server,release]"
	touch $@

# Everything the tests exercise. torch is pinned to the CPU wheel and installed first, so that
# no other requirement can pull the CUDA build.
$(VENV)/.installed-dev: $(PROJECTS) | $(PY)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[dev,updates]" -e "./cloud_service[ray,triton,export]" -e "./router_tools[server,plot,train,release]"
	touch $@ $(VENV)/.installed-run

venv-run: $(VENV)/.installed-run
venv-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-run
	$(VENV)/bin/hybrid-router demo $(DEMO_ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The three wheels, into dist/.
wheels: | $(PY)
	$(PIP) wheel --quiet --no-deps -w dist . ./cloud_service ./router_tools

clean:
	rm -rf $(VENV) .pytest_cache dist build */build
