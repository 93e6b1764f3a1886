#!/usr/bin/env bash
# Removes everything a real-node test tier (e2e/src/node.rs) leaves on the machine: its
# processes, containers, mounts, cgroups, network namespace and the kernel settings the kubelet
# changed. Idempotent; safe to run twice or on a half-started node.
#
#   teardown.sh DIR NETNS            tear down now
#   teardown.sh --after PID DIR NETNS  wait for PID (the test process) to exit, then tear down:
#                                    the watchdog a killed test cannot skip
#
# DIR is the node's directory (it holds sysctls.saved); NETNS the network namespace's name.
set -uo pipefail

if [[ "${1:-}" == "--after" ]]; then
  pid="$2"
  shift 2
  while kill -0 "${pid}" 2>/dev/null; do sleep 1; done
  # The test tore the node down itself when the directory is gone.
  [[ -d "$1" ]] || exit 0
fi
DIR="${1:?node directory}"
NETNS="${2:?network namespace}"
[[ "${DIR}" == /* && "${DIR}" == *serval-node-* ]] || { echo "teardown.sh: refusing ${DIR}" >&2; exit 2; }

# The kubelet's pod cgroups (cgroupfs driver) in every v1 hierarchy, and containerd's.
pod_cgroups() {
  local h
  for h in /sys/fs/cgroup/*/; do
    for c in kubepods k8s.io; do
      [[ -d "${h}${c}" ]] && echo "${h}${c}"
    done
  done
}

kill_all() {
  local pids=""
  # Components (control plane, containerd, shims, kubelet, kube-proxy, CoreDNS, clients) all
  # live in the namespace or name the directory; containers live in the pod cgroups.
  if ip netns list 2>/dev/null | grep -qw "${NETNS}"; then
    pids+=" $(ip netns pids "${NETNS}" 2>/dev/null | tr '\n' ' ')"
  fi
  pids+=" $(pgrep -f -- "${DIR}" | grep -vx "$$" | tr '\n' ' ')"
  local cg
  for cg in $(pod_cgroups); do
    pids+=" $(find "${cg}" -name cgroup.procs -exec cat {} + 2>/dev/null | tr '\n' ' ')"
  done
  pids="$(tr ' ' '\n' <<<"${pids}" | grep -E '^[0-9]+$' | grep -vx "$$" | sort -u | tr '\n' ' ')"
  [[ -n "${pids// /}" ]] && kill -9 ${pids} 2>/dev/null
  return 0
}

for _ in 1 2 3 4 5; do
  kill_all
  sleep 0.5
done

# Mounts under the directory (kubelet volumes and its bind-mounted root, containerd's overlay
# snapshots and shm, pod network namespaces), deepest first.
for _ in 1 2 3; do
  mapfile -t mounts < <(awk -v d="${DIR}" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
  [[ ${#mounts[@]} -eq 0 ]] && break
  for m in "${mounts[@]}"; do
    umount "${m}" 2>/dev/null || umount -l "${m}" 2>/dev/null
  done
done

# Empty cgroups, leaves first (a cgroup with live tasks cannot be removed: retry briefly).
for _ in 1 2 3 4 5 6 7 8 9 10; do
  left="$(pod_cgroups)"
  [[ -z "${left}" ]] && break
  for cg in ${left}; do
    find "${cg}" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  [[ -z "$(pod_cgroups)" ]] && break
  kill_all
  sleep 0.5
done

# Kernel settings the kubelet changes (saved by the harness before the node started).
if [[ -f "${DIR}/sysctls.saved" ]]; then
  while read -r key value; do
    [[ -n "${key}" ]] && sysctl -q -w "${key}=${value}" >/dev/null
  done <"${DIR}/sysctls.saved"
fi

ip netns delete "${NETNS}" 2>/dev/null

# The kubelet links container logs into /var/log/containers whatever its log directory.
if [[ -d /var/log/containers ]]; then
  find /var/log/containers -maxdepth 1 -type l -lname "${DIR}/*" -delete 2>/dev/null
fi

rm -rf "${DIR}" 2>/dev/null || { sleep 1; rm -rf "${DIR}"; }
[[ ! -e "${DIR}" ]]
