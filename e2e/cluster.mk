# Real Kubernetes control plane for end-to-end tests. Included from the root Makefile.
# The control-plane binaries are cached outside the repo under $(SERVAL_CACHE)/cluster.

SERVAL_CACHE ?= $(HOME)/.cache/serval
CARGO_TARGET_DIR ?= $(HOME)/.cache/serval/target

.PHONY: cluster e2e

# Builds etcd, kube (apiserver/controller-manager/scheduler), kwok, helm and promtool; a no-op when cached.
cluster:
	SERVAL_CACHE=$(SERVAL_CACHE) bash e2e/cluster/build.sh

# End-to-end tests against a real control plane (starts and stops it per test binary).
e2e: cluster
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) cargo test --release -p serval-e2e
