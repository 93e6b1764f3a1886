# Real Kubernetes control plane (and a real node) for end-to-end tests. Included from the root
# Makefile. The binaries are cached outside the repo under $(SERVAL_CACHE)/cluster.

SERVAL_CACHE ?= $(HOME)/.cache/serval
CARGO_TARGET_DIR ?= $(HOME)/.cache/serval/target
CARGO ?= cargo

# The real-node tier's container runtime and networking, from Debian (e2e/src/node.rs).
NODE_PACKAGES := containerd runc containernetworking-plugins nftables

.PHONY: cluster e2e node-prereqs

# Builds etcd, kube (apiserver/controller-manager/scheduler), kubenode (kubelet/kube-proxy),
# CoreDNS, pause, kwok, helm and promtool; a no-op when cached.
cluster:
	SERVAL_CACHE=$(SERVAL_CACHE) bash e2e/cluster/build.sh

# Installs what the real-node tier runs on, or fails loudly.
node-prereqs:
	@missing=""; for p in $(NODE_PACKAGES); do \
		dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (the real-node e2e tier needs them)"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } || \
			{ echo "installing$$missing failed: the real-node e2e tier cannot run without them" >&2; exit 1; }; \
	fi

# Only the end-to-end suite: the control plane with fake nodes, and the real-node tier. The
# workspace's binaries are built first: the suite runs the operator, sidecar and router, and
# puts them into images.
e2e: cluster node-prereqs
	$(CARGO) build --release --workspace --bins
	SERVAL_CACHE=$(SERVAL_CACHE) CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) \
		SERVAL_OPERATOR_BIN=$(CARGO_TARGET_DIR)/release/serval-operator \
		$(CARGO) test --release -p serval-e2e
