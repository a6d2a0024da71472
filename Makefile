# make test : set up everything (system packages, .venv, the project) and run the tests
# make demo : set up everything, start a local cluster, align a real pair, stop it (see README.md)
# make lock : re-resolve requirements.lock after an edit of pyproject.toml's dependency tables
# Debian's own python3 when there is one: what a fresh Debian machine runs, and readable by every
# user (tasks run as another user run the venv's interpreter; a pyenv under /root is not theirs).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV   := .venv
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock
# the resolver for make lock only; setup and test never need it
UV_VERSION := 0.13.10

.PHONY: test demo demo-genome bench setup clean lock lock-check

setup: lock-check $(STAMP)

lock-check:
	@$(PYTHON) deploy/lock.py check

# Exactly the locked versions, every file checked against its hash; the project itself is
# installed without build isolation so its build backend also comes from the lock.
$(STAMP): $(LOCK) pyproject.toml deploy/system-packages.sh
	./deploy/system-packages.sh
	$(PYTHON) deploy/lock.py check
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --no-deps --require-hashes -r $(LOCK)
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/pip check
	touch $@

lock:
	$(PYTHON) -m venv build/lock-venv
	build/lock-venv/bin/pip install --quiet uv==$(UV_VERSION)
	$(PYTHON) deploy/lock.py lock build/lock-venv/bin/uv

test: lock-check $(STAMP)
	$(VENV)/bin/python -m proto.cheader --check
	$(VENV)/bin/python -m proto.doctable --check
	$(VENV)/bin/pytest -q

demo: $(STAMP)
	./deploy/fetch-data.sh
	$(VENV)/bin/python -m cluster.demo

demo-genome: $(STAMP)
	./deploy/fetch-data.sh
	$(VENV)/bin/python -m cluster.demo --genome

bench: $(STAMP)
	$(VENV)/bin/python bench/messaging.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
