#!/usr/bin/env bash
# Builds the e2e control plane (etcd, kube-apiserver/controller-manager/scheduler as one `kube`
# dispatcher, kwok, helm), the real-node tier's node (kubelet and kube-proxy as one `kubenode`
# dispatcher of the same version, CoreDNS with a minimal plugin set, a static `pause` for the
# pod sandbox image), promtool (which tests the chart's alerts) and the Prometheus
# Operator's CRDs (which the chart's monitoring objects must fit) from the Go module proxy into
# a cache outside the repo, keyed by the pinned versions. A warm cache exits at once.
#
# Environment: SERVAL_CACHE (default $HOME/.cache/serval), GO (default `go`), and the *_VERSION
# pins below. GOCACHE/GOMODCACHE are Go's defaults unless set, so rebuilds reuse them.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
# Prometheus's Go module: v0.3XX.Y is Prometheus 3.XX.Y.
PROMTOOL_VERSION="${PROMTOOL_VERSION:-v0.316.0}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.15.0}"
# Bumped when templates/pause changes.
PAUSE_VERSION=1

CACHE_ROOT="${SERVAL_CACHE:-$HOME/.cache/serval}"
KEY="k8s-${K8S_VERSION}-etcd-${ETCD_VERSION}-kwok-${KWOK_VERSION}-helm-${HELM_VERSION}"
DIR="${CACHE_ROOT}/cluster/${KEY}"
BIN="${DIR}/bin"
OUTPUTS=(etcd kube kwok helm kwok-stages.yaml promtool monitoring-crds.yaml kubenode coredns pause)

# Outputs added later than the rest carry their version in a stamp beside them rather than in
# KEY, so adding or moving one rebuilds only that one. current FILE VERSION.
current() {
  [[ -s "${BIN}/$1" && "$(cat "${BIN}/$1.version" 2>/dev/null)" == "$2" ]]
}
stamped_current() {
  current promtool "${PROMTOOL_VERSION}" &&
    current monitoring-crds.yaml "${PROMETHEUS_OPERATOR_VERSION}" &&
    current kubenode "${K8S_VERSION}" &&
    current coredns "${COREDNS_VERSION}" &&
    current pause "${PAUSE_VERSION}"
}

all_present() {
  local f
  for f in "${OUTPUTS[@]}"; do
    [[ -s "${BIN}/${f}" ]] || return 1
  done
  stamped_current
}

# Warm path: no Go, no lock, no network.
if all_present; then
  echo "${BIN}"
  exit 0
fi

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GO="${GO:-go}"
command -v "${GO}" >/dev/null || { echo "build.sh: Go toolchain '${GO}' not found (set GO=/path/to/go)" >&2; exit 1; }
WORK="${DIR}/work"
mkdir -p "${BIN}" "${WORK}"

# Parallel test binaries may all find the cache cold; only one builds.
exec 9>"${DIR}/.lock"
flock 9
if all_present; then
  echo "${BIN}"
  exit 0
fi

export CGO_ENABLED=0
# Never fetch a different toolchain behind the caller's back; a too-old Go fails loudly.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
export GOFLAGS="-mod=mod"
export GOPROXY="${GOPROXY:-https://proxy.golang.org}"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# Prints the module's directory (or another field of `go mod download -json`).
mod_field() {
  "${GO}" mod download -json "$1" | sed -n "s/^[[:space:]]*\"$2\": \"\(.*\)\",\{0,1\}$/\1/p"
}

# new_module DIR NAME: a fresh wrapper module (regenerated on every cold build).
new_module() {
  rm -rf "$1"
  mkdir -p "$1"
  (cd "$1" && "${GO}" mod init "$2" >/dev/null)
}

# build_dispatcher NAME: templates/NAME/main.go against k8s.io/kubernetes at K8S_VERSION.
build_dispatcher() {
  local name="$1" m="${WORK}/$1" minor staging gomod
  minor="${K8S_VERSION#v1.}"
  minor="${minor%%.*}"
  staging="v0.${K8S_VERSION#v1.}"
  log "${name} ${K8S_VERSION}: generating wrapper module"
  new_module "${m}" "serval.dev/e2e/${name}"
  cp "${SRC}/templates/${name}/main.go" "${m}/main.go"
  gomod="$(mod_field "k8s.io/kubernetes@${K8S_VERSION}" GoMod)"
  [[ -f "${gomod}" ]] || { echo "no go.mod for k8s.io/kubernetes@${K8S_VERSION}" >&2; exit 1; }
  # kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/...;
  # point each at its published release instead. The list comes from upstream's go.mod so a
  # release that adds a staging module needs no edit here.
  local mods
  mods="$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' "${gomod}" | sort -u)"
  [[ -n "${mods}" ]] || { echo "no staging replaces found in ${gomod}" >&2; exit 1; }
  local args=() mod
  for mod in ${mods}; do
    args+=("-replace=${mod}=${mod}@${staging}")
  done
  log "${name}: $(wc -w <<<"${mods}") staging replaces -> ${staging}"
  (
    cd "${m}"
    "${GO}" mod edit "${args[@]}"
    "${GO}" get "k8s.io/kubernetes@${K8S_VERSION}"
    "${GO}" mod tidy
    local vpkg ld=""
    for vpkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld+=" -X ${vpkg}.gitVersion=${K8S_VERSION} -X ${vpkg}.gitMajor=1 -X ${vpkg}.gitMinor=${minor}"
      ld+=" -X ${vpkg}.gitTreeState=clean -X ${vpkg}.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    done
    log "${name}: compiling"
    "${GO}" build -trimpath -ldflags="-s -w${ld}" -o "${m}/${name}" .
  )
  mv "${m}/${name}" "${BIN}/${name}"
}

# build_template NAME MODULE VERSION: templates/NAME/main.go in a wrapper module requiring
# MODULE@VERSION (nothing when MODULE is empty: the standard library only).
build_template() {
  local name="$1" module="$2" version="$3" m="${WORK}/$1"
  log "${name} ${version}: wrapper module"
  new_module "${m}" "serval.dev/e2e/${name}"
  cp "${SRC}/templates/${name}/main.go" "${m}/main.go"
  (
    cd "${m}"
    if [[ -n "${module}" ]]; then
      "${GO}" get "${module}@${version}"
      "${GO}" mod tidy
    fi
    log "${name}: compiling"
    "${GO}" build -trimpath -ldflags="-s -w" -o "${m}/${name}" .
  )
  mv "${m}/${name}" "${BIN}/${name}"
  echo "${version}" >"${BIN}/${name}.version"
}

# build_tool NAME MODULE PACKAGE VERSION LDFLAGS: a wrapper module requiring just that tool, so
# its dependency set is exactly the tool's own.
build_tool() {
  local name="$1" module="$2" pkg="$3" version="$4" ld="$5" m="${WORK}/$1"
  log "${name} ${version}: wrapper module"
  new_module "${m}" "serval.dev/e2e/${name}"
  (
    cd "${m}"
    "${GO}" get "${module}@${version}"
    log "${name}: compiling"
    "${GO}" build -trimpath -ldflags="-s -w ${ld}" -o "${m}/${name}" "${pkg}"
  )
  mv "${m}/${name}" "${BIN}/${name}"
}

# kwok ships no built-in stages; these are the ones kwokctl loads by default.
write_stages() {
  local dir out="${BIN}/kwok-stages.yaml.tmp" f
  dir="$(mod_field "sigs.k8s.io/kwok@${KWOK_VERSION}" Dir)/kustomize/stage"
  : >"${out}"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ -f "${dir}/${f}" ]] || { echo "kwok stage ${f} missing in ${dir}" >&2; exit 1; }
    { echo "---"; cat "${dir}/${f}"; } >>"${out}"
  done
  mv "${out}" "${BIN}/kwok-stages.yaml"
}

# The Prometheus Operator's CRDs for the kinds the chart can render, from its Go module.
write_monitoring_crds() {
  local dir out="${BIN}/monitoring-crds.yaml.tmp" kind
  dir="$(mod_field "github.com/prometheus-operator/prometheus-operator@${PROMETHEUS_OPERATOR_VERSION}" Dir)/example/prometheus-operator-crd"
  : >"${out}"
  for kind in servicemonitors podmonitors prometheusrules; do
    [[ -f "${dir}/monitoring.coreos.com_${kind}.yaml" ]] || { echo "CRD ${kind} missing in ${dir}" >&2; exit 1; }
    { echo "---"; cat "${dir}/monitoring.coreos.com_${kind}.yaml"; } >>"${out}"
  done
  mv "${out}" "${BIN}/monitoring-crds.yaml"
  echo "${PROMETHEUS_OPERATOR_VERSION}" >"${BIN}/monitoring-crds.yaml.version"
}

start=$(date +%s)
log "cold build into ${DIR} with $("${GO}" version)"
[[ -s "${BIN}/kube" ]] || build_dispatcher kube
[[ -s "${BIN}/etcd" ]] || build_tool etcd go.etcd.io/etcd/server/v3 go.etcd.io/etcd/server/v3 "${ETCD_VERSION}" \
  "-X go.etcd.io/etcd/api/v3/version.GitSHA=${ETCD_VERSION}"
[[ -s "${BIN}/kwok" ]] || build_tool kwok sigs.k8s.io/kwok sigs.k8s.io/kwok/cmd/kwok "${KWOK_VERSION}" \
  "-X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v} -X sigs.k8s.io/kwok/pkg/consts.KubeVersion=${K8S_VERSION}"
[[ -s "${BIN}/helm" ]] || build_tool helm helm.sh/helm/v3 helm.sh/helm/v3/cmd/helm "${HELM_VERSION}" \
  "-X helm.sh/helm/v3/internal/version.version=${HELM_VERSION} -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
current promtool "${PROMTOOL_VERSION}" || {
  build_tool promtool github.com/prometheus/prometheus github.com/prometheus/prometheus/cmd/promtool \
    "${PROMTOOL_VERSION}" ""
  echo "${PROMTOOL_VERSION}" >"${BIN}/promtool.version"
}
current monitoring-crds.yaml "${PROMETHEUS_OPERATOR_VERSION}" || write_monitoring_crds
current kubenode "${K8S_VERSION}" || {
  build_dispatcher kubenode
  echo "${K8S_VERSION}" >"${BIN}/kubenode.version"
}
current coredns "${COREDNS_VERSION}" || build_template coredns github.com/coredns/coredns "${COREDNS_VERSION}"
current pause "${PAUSE_VERSION}" || build_template pause "" "${PAUSE_VERSION}"
write_stages
log "done in $(($(date +%s) - start)) s"
echo "${BIN}"
