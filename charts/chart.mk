# Helm chart and OCI images. Included from the root Makefile.
#   make chart-lint   CRD copies identical to crds/, then `helm lint --strict` (default and all options)
#   make chart-crds   copy crds/ into the chart after `make crds`
#   make images       release binaries -> OCI archives in $(SERVAL_CACHE)/images

SERVAL_CACHE ?= $(HOME)/.cache/serval
CARGO_TARGET_DIR ?= $(SERVAL_CACHE)/target
CARGO ?= cargo
IMAGES_DIR ?= $(SERVAL_CACHE)/images
CHART := charts/serval
# helm is built with the test control plane (e2e/cluster/build.sh prints its bin directory;
# a no-op when cached). Override with HELM=/path/to/helm.
HELM ?= $$(SERVAL_CACHE=$(SERVAL_CACHE) bash e2e/cluster/build.sh | tail -n1)/helm

.PHONY: chart-lint chart-crds images

chart-crds:
	cp crds/backends.serval.dev.yaml crds/endpoints.serval.dev.yaml $(CHART)/crds/

chart-lint:
	@diff -r crds $(CHART)/crds >/dev/null || { echo "$(CHART)/crds differs from crds/: run 'make chart-crds'" >&2; diff -r crds $(CHART)/crds | head -20 >&2; exit 1; }
	helm="$(HELM)"; \
	"$$helm" lint --strict $(CHART) && \
	"$$helm" lint --strict $(CHART) --set dashboard.enabled=true,metrics.serviceMonitor.enabled=true,operator.watchNamespace=models,imageRegistry=registry.example.com/serval

images:
	$(CARGO) build --release --workspace --bins
	CARGO_TARGET_DIR=$(CARGO_TARGET_DIR) SERVAL_CACHE=$(SERVAL_CACHE) bash images/build.sh --out-dir $(IMAGES_DIR)
