# make test : set up everything (system packages, .venv, the project) and run the tests
# make demo : set up everything, start a local cluster, align a real pair, stop it (see README.md)
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: test demo demo-genome bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml deploy/system-packages.sh
	./deploy/system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

test: $(STAMP)
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
