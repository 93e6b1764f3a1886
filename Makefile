# Serval. `make run` demos local mode; `make test` runs every test tier.
# Caches live outside the clone so repeat runs (and CI on the same machine) are fast.

SERVAL_CACHE ?= $(HOME)/.cache/serval
CARGO_TARGET_DIR ?= $(SERVAL_CACHE)/target
VENV ?= $(SERVAL_CACHE)/venv
export SERVAL_CACHE CARGO_TARGET_DIR

CARGO ?= cargo
RELEASE := $(CARGO_TARGET_DIR)/release

.PHONY: all build run test lint fmt crds prereqs venv help bench bench-router bench-sidecar prune-cache fuzz

# The release profile's incremental cache only grows (each changed build of a workspace crate
# adds a session); past this many GiB `make test` starts it afresh, so a long-lived CI cache
# cannot fill the disk (it reached 24 GiB here). Workspace crates then recompile once.
INCREMENTAL_MAX_GIB ?= 8
# Compiled artifacts nothing has read for this many days are deleted: every clone path and
# every old commit leaves its own copies of the workspace's crates and test binaries (38 GB
# after two days here). Anything still needed is rebuilt. Reads refresh a file's atime at
# least daily under the default `relatime` mount option; under `noatime` this rebuilds
# everything older than the limit, which costs time but never correctness.
DEPS_MAX_IDLE_DAYS ?= 3
# And past this many GiB the least recently read artifacts go first, down to the cap: many runs
# in one day (each clean clone at a new path, each commit) grew deps/ to 51 GiB and filled this
# machine's disk before any file was 3 days old.
DEPS_MAX_GIB ?= 30

all: build

help:
	@echo "make run      build and run the local-mode demo (a real model, a real request)"
	@echo "make test     install prerequisites, then lint, unit, integration and e2e tests"
	@echo "make e2e      only the end-to-end suite against a real control plane"
	@echo "make crds     regenerate crds/ from the Rust types"
	@echo "make lint     cargo fmt --check and clippy -D warnings"
	@echo "make images   OCI image archives of operator, sidecar and router (no Docker needed)"
	@echo "make fuzz     the router's differential fuzz target for FUZZ_SECONDS (600; nightly, cargo-fuzz)"
	@echo "make bench    every benchmark: sidecar vs raw engine, router vs nginx, Serval vs Ray Serve,"
	@echo "              KServe, Flask + onnxruntime, BentoML and MLServer on digits, JPEG -> label"
	@echo "              and the binary CNN (results in bench/results/)"
	@echo "make bench-overload  10x capacity on the CNN, direct and through the router: admitted p99,"
	@echo "              goodput, 429 latency, peak RSS (bench/results/overload.txt)"
	@echo "make bench-autoscale  1 -> 16 -> 1 clients, fixed vs autoscaled, from zero (bench/results/autoscale.txt)"
	@echo "make bench-composition  cascade, ensemble, sequence: accuracy, throughput, hop cost (bench/results/composition.txt)"
	@echo "make bench-grpc     gRPC vs REST binary vs REST JSON on digits and the CNN (bench/results/grpc.txt)"

include e2e/cluster.mk
include charts/chart.mk
include bench/bench.mk

## Build

build:
	$(CARGO) build --release --workspace --bins

# Regenerates crds/ from the Rust types and keeps the chart's copy identical.
crds:
	$(CARGO) build --release --workspace --bins
	$(RELEASE)/crdgen --out-dir crds
	$(MAKE) chart-crds

## The demo

# Local mode on examples/: once the models are ready, a real digit PNG and an Open Inference
# Protocol request go through the router; then it prints what to try next. Ctrl-C stops it.
run:
	$(CARGO) build --release --workspace --bins
	$(RELEASE)/serval local -f examples/ --demo models/digits/seven.png

## Prerequisites: everything a fresh machine lacks, installed or failing loudly.

prereqs: venv cluster node-prereqs prune-cache
	@command -v kubectl >/dev/null || { echo "kubectl is required for the e2e tests: install it (e.g. apt-get install kubernetes-client)" >&2; exit 1; }
	@command -v go >/dev/null || { echo "Go is required to build the test control plane" >&2; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
	@command -v skopeo >/dev/null || { apt-get update -qq && apt-get install -y -qq skopeo; } || { echo "installing skopeo failed: the image tests need it" >&2; exit 1; }
	@command -v setpriv >/dev/null && command -v pgrep >/dev/null || { echo "setpriv (util-linux) and pgrep (procps) are required by the e2e harness" >&2; exit 1; }

venv:
	$(MAKE) -C models venv VENV=$(VENV)

prune-cache:
	@d="$(RELEASE)/incremental"; \
	if [ -d "$$d" ] && [ "$$(du -s --block-size=1G "$$d" | cut -f1)" -gt $(INCREMENTAL_MAX_GIB) ]; then \
		echo "pruning $$d (over $(INCREMENTAL_MAX_GIB) GiB)"; rm -rf "$$d"; fi
	@d="$(RELEASE)/deps"; \
	if [ -d "$$d" ]; then \
		n=$$(find "$$d" -maxdepth 1 -type f -atime +$(DEPS_MAX_IDLE_DAYS) -print -delete | wc -l); \
		[ "$$n" -eq 0 ] || echo "pruned $$n artifacts unread for $(DEPS_MAX_IDLE_DAYS)+ days from $$d"; \
		n=$$(find "$$d" -maxdepth 1 -type f -printf '%A@ %s %p\n' | sort -n | \
			awk -v cap=$$(( $(DEPS_MAX_GIB) * 1073741824 )) \
				'{ f[NR] = $$3; s[NR] = $$2; t += $$2 } END { for (i = 1; i <= NR && t > cap; i++) { print f[i]; t -= s[i] } }' | \
			xargs -r rm -f -v | wc -l); \
		[ "$$n" -eq 0 ] || echo "pruned $$n least recently read artifacts to keep $$d under $(DEPS_MAX_GIB) GiB"; fi

## Tests

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Every tier: unit, mock-API reconcile, loopback integration, and e2e against the real
# control plane. Nothing is skipped; a missing prerequisite is installed or fails loudly.
# The binaries are built once with the workspace's feature set and handed to the e2e tests.
test: prereqs lint
	$(CARGO) build --release --workspace --bins
	SERVAL_OPERATOR_BIN=$(RELEASE)/serval-operator PATH="$(VENV)/bin:$$PATH" \
		$(CARGO) test --release --workspace

## Fuzzing

# The router's differential fuzz target (router/fuzz): hyper and the router's header and route
# rules against a strict reference from the RFCs. Needs the nightly toolchain (sanitizers);
# cargo-fuzz is installed if missing. Its own target dir: sanitizer builds share nothing with
# the release one. The corpus grows in $(SERVAL_CACHE)/fuzz-corpus, seeded from router/fuzz/seeds.
FUZZ_SECONDS ?= 600
fuzz:
	@rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	mkdir -p $(SERVAL_CACHE)/fuzz-corpus
	cd router/fuzz && CARGO_TARGET_DIR=$(SERVAL_CACHE)/fuzz-target cargo +nightly fuzz run request \
		$(SERVAL_CACHE)/fuzz-corpus seeds -- -max_total_time=$(FUZZ_SECONDS)

## Benchmarks (not tests: numbers are printed as ratios against baselines from the same run)

bench: bench-sidecar bench-router bench-compare bench-overload bench-autoscale bench-composition bench-grpc

# Sidecar vs the raw in-process engine, and batched vs maxBatchSize 1, on the digits MLP and a
# MobileNetV2-architecture CNN (generated into $(SERVAL_CACHE)/models, 14 MB, not committed).
# A second pass pins the whole process to one CPU at c = 1: a lone request's cost without the
# VM's cross-CPU wake-ups (see the header of sidecar/examples/bench.rs); a third, unpinned,
# turns on the sidecar's opt-in idle polling, which keeps a CPU awake instead. All output
# goes to bench/results/sidecar.txt (progress on stderr meanwhile).
bench-sidecar: venv
	@command -v taskset >/dev/null || { echo "bench-sidecar needs taskset (util-linux)" >&2; exit 1; }
	$(MAKE) -C models mobilenet VENV=$(VENV)
	$(CARGO) build --release -p serval-sidecar --example bench
	$(CARGO) build --release -p serval-loadgen
	{ $(RELEASE)/examples/bench && \
		taskset -c 0 $(RELEASE)/examples/bench --model models/digits.onnx:32 --concurrency 1 --reps 7 && \
		$(RELEASE)/examples/bench --model models/digits.onnx:32 --concurrency 1 --reps 5 --idle-poll-micros 200; } \
		> $(SERVAL_CACHE)/bench-sidecar.txt
	cp $(SERVAL_CACHE)/bench-sidecar.txt bench/results/sidecar.txt
	cat bench/results/sidecar.txt

# Router vs calling the upstream directly vs nginx with the same 90/10 split.
bench-router:
	@test -x /usr/sbin/nginx || command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx; }
	$(CARGO) build --release --workspace --bins
	$(RELEASE)/bench-router
