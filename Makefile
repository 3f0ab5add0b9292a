# make run   - set up .venv and Fashion-MNIST, then pretrain recipes/quickstart.yaml
# make test  - set up .venv and Fashion-MNIST, build the docs, then run the whole test suite
# make docs  - build the documentation site (docs/, mkdocs.yml) into site/ with --strict
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install; override for another platform, e.g. make TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: run test data venv docs bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Fashion-MNIST: Debian's package, installed when we are root and it is missing.
data:
	@if [ -n "$$SSLKIT_DATA" ] || [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
		     "or put the four idx .gz files in a folder and set SSLKIT_DATA to it." >&2; \
		exit 1; \
	fi

run: venv data
	$(VENV)/bin/sslkit train recipes/quickstart.yaml overwrite=true

# The docs build is part of the tests: a broken link, page or docstring fails CI.
# TEST_WORKERS pytest-xdist processes share the files (a file's tests stay in one process, so a
# module's expensive fixture is built once); much of the suite waits on single-threaded Python
# (process start-up, imports): on the quiet 2-core machine 2 workers took 7 min 54 s, one 10 min 5 s.
TEST_WORKERS ?= 2
test: venv data docs
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The documentation site: the docs extra (mkdocs-material, mkdocstrings-python), then a strict
# build (any warning fails). NO_MKDOCS_2_WARNING silences mkdocs-material's notice about its
# successor, which is not about these docs.
docs: venv $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

bench: venv data
	$(PY) benchmarks/compare_lightly.py --small

clean:
	rm -rf runs .pytest_cache
