# The two commands an operator needs: `make demo` and `make test`.
# Both install what is missing first (Debian packages, the virtualenv,
# tvorch's libvirt hook and libvirtd running, the test guest), so they work
# on a fresh Debian 12 node.

VENV        ?= .venv
PYTHON      ?= /usr/bin/python3
GUEST_DIR   ?= /var/cache/tvorch/test-guest
PYTEST_ARGS ?=
STAMP       := $(VENV)/.installed

.PHONY: demo test lint unit integration setup packages libvirt venv guest clean

demo: setup
	GUEST_DIR=$(GUEST_DIR) VENV=$(VENV) scripts/demo.sh

test: setup lint
	TVORCH_TEST_GUEST_DIR=$(GUEST_DIR) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Errors a reader would trip over: undefined names, unused imports, syntax, types.
lint: venv
	$(VENV)/bin/ruff check --quiet --select F,E9 tvorch tests benchmarks
	$(VENV)/bin/mypy tvorch

unit: venv
	$(VENV)/bin/python -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	TVORCH_TEST_GUEST_DIR=$(GUEST_DIR) $(VENV)/bin/python -m pytest tests/integration $(PYTEST_ARGS)

setup: packages venv libvirt guest

packages:
	scripts/setup-host.sh

libvirt: venv
	scripts/start-libvirt.sh $(VENV)

venv: $(STAMP)

$(STAMP): pyproject.toml | packages
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

guest:
	scripts/build-test-guest.sh $(GUEST_DIR)

clean:
	rm -rf $(VENV) build *.egg-info
