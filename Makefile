# The two commands an operator needs: `make demo` and `make test`.
# Both install what is missing first (Debian packages, the virtualenv,
# tvorch's libvirt hook and libvirtd running, the test guest), so they work
# on a fresh Debian 12 node.

VENV        ?= .venv
PYTHON      ?= /usr/bin/python3
GUEST_DIR   ?= /var/cache/tvorch/test-guest
PYTEST_ARGS ?=
STAMP       := $(VENV)/.installed

.PHONY: demo test lint unit integration setup packages libvirt venv guest clean deb two-nodes two-nodes-down

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

$(STAMP): pyproject.toml setup.py requirements.lock tvorch/core/attestation/_ima_fold.c | packages
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[test]'
	touch $@

guest:
	scripts/build-test-guest.sh $(GUEST_DIR)

# A second libvirt node on this host for migration work (scripts/two-nodes.sh; README, "Tests").
NODE_B ?= /var/tmp/tvorch-node-b
two-nodes: libvirt
	scripts/two-nodes.sh up $(NODE_B)
	@scripts/two-nodes.sh uri $(NODE_B) | sed '1s/^/node B: /; 2s/^/node A, as B reaches it: /'

two-nodes-down:
	scripts/two-nodes.sh down $(NODE_B)

# tvorch_<version>_amd64.deb from the checkout as it is (tracked and new
# files, not ignored ones), built by dpkg-buildpackage in a copy under build/.
# DEB_BUILD (scratch) and DEB_OUT (where the .deb goes) may be absolute.
DEB_VERSION = $(shell dpkg-parsechangelog -S Version)
DEB_BUILD  ?= build/deb
DEB_OUT    ?= .
DEB_SRC     = $(DEB_BUILD)/tvorch-$(DEB_VERSION)

deb: packages
	rm -rf $(DEB_BUILD) && mkdir -p $(DEB_SRC) $(DEB_OUT)
	git ls-files -z --cached --others --exclude-standard \
	    | tar -c --null -T - --ignore-failed-read 2>/dev/null | tar -x -C $(DEB_SRC)
	cd $(DEB_SRC) && dpkg-buildpackage -b -us -uc --no-pre-clean
	mv $(DEB_BUILD)/tvorch_$(DEB_VERSION)_amd64.deb $(DEB_OUT)/
	@echo "built $(DEB_OUT)/tvorch_$(DEB_VERSION)_amd64.deb"

clean:
	rm -rf $(VENV) build *.egg-info tvorch_*.deb
