# Two commands on a fresh machine: `make demo` and `make test`. Each installs what is
# missing first (torch 2.13.0 into a cached venv, then the Rust build). Caches live outside
# the work tree under ~/.cache/alnfl so CI can keep them between runs.

CACHE ?= $(HOME)/.cache/alnfl
VENV := $(CACHE)/venv
export CARGO_TARGET_DIR ?= $(CACHE)/target
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
TORCH_LIB = $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/torch/lib))
RUN_ENV = LD_LIBRARY_PATH="$(TORCH_LIB):$$LD_LIBRARY_PATH"
BIN := $(CARGO_TARGET_DIR)/debug

.PHONY: setup build test demo bench fuzz clean-demo

setup:
	@ALNFL_CACHE=$(CACHE) bash deploy/setup.sh

build: setup
	cargo build --workspace

test: build
	$(RUN_ENV) cargo test --workspace

demo: build
	$(RUN_ENV) BIN=$(BIN) bash deploy/demo.sh

# Benchmarks print tables and write out/bench/*.json plus out/bench/README.md (markdown);
# no test asserts a time. BENCH_STRATEGIES=false skips the 5 federated runs (≈5 min).
BENCH_STRATEGIES ?= true
bench: build
	cargo bench -p aln-common --bench plumbing
	$(RUN_ENV) cargo build --workspace --release --bins
	cargo bench -p aln-e2e --bench coordinator_memory
	$(RUN_ENV) BIN=$(CARGO_TARGET_DIR)/release PY=$(VENV)/bin/python bash deploy/bench_step.sh
	$(RUN_ENV) BIN=$(CARGO_TARGET_DIR)/release PY=$(VENV)/bin/python BENCH_ROUNDS=12 bash deploy/bench_round_overhead.sh
	if [ "$(BENCH_STRATEGIES)" = true ]; then $(RUN_ENV) BIN=$(CARGO_TARGET_DIR)/release PY=$(VENV)/bin/python bash deploy/bench_strategies.sh; fi
	$(VENV)/bin/python deploy/bench_report.py

fuzz:
	bash deploy/fuzz.sh

clean-demo:
	rm -rf out/demo
