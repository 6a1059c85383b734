# One venv, one install step shared by every target.
# `make demo` runs the default recipe; `make test` runs the test suite. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pfgdf-installed

.PHONY: install data demo lint test bench zoo clean

# Python's headers build the C kernels of MPD's converted layers (optional): Debian's python3-dev when missing
$(STAMP): pyproject.toml setup.py pfgdf_plugin/csrc/blockdiag.c pfgdf_plugin/csrc/blockdiag_py.c
	@$(PYTHON) -c "import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
	  || (command -v apt-get >/dev/null 2>&1 && SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ) \
	      && $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-dev >/dev/null) \
	  || echo "warning: no Python headers; MPD's converted layers will run without the C kernels"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,export,timm,tensorboard]'
	touch $(STAMP)

install: $(STAMP) data

# Fashion-MNIST from Debian's package (real data, no download from the data set's site).
data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"; \
	else echo "warning: no apt-get; put Fashion-MNIST under \$$PFGDF_DATA/FashionMNIST/raw/ (see docs/recipes.md)"; fi

demo: install
	$(VENV)/bin/pfgdf-plugin run recipes/pfgdf_vgg16.yaml

# lint (ruff, with the bugbear rules) and the layer contracts (import-linter, see pyproject.toml), then the suite
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# the suite in two workers (pytest-xdist), one torch thread each: most tests are small and single-threaded
test: install lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist worksteal

bench: install
	$(VENV)/bin/pfgdf-plugin bench

# every torchvision classifier through every method (see pfgdf_plugin/zoo_sweep.py); writes docs/zoo.md
zoo: install
	$(PY) -m pfgdf_plugin.zoo_sweep --out docs/zoo.md

clean:
	rm -rf $(VENV) runs .pytest_cache
