//! End-to-end harness: a real Kubernetes control plane on loopback.
//!
//! `e2e/cluster/build.sh` builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler
//! (one `kube` dispatcher binary), kwok, helm and promtool from the Go module proxy into
//! `$SERVAL_CACHE/cluster/<versions>/bin`. [`Cluster::start`] runs them on random loopback
//! ports with fresh certificates, three fake kwok nodes and an admin kubeconfig. [`Operator`]
//! runs the `serval-operator` binary against it. [`NodeHost`] and [`RealNode`] add a real
//! kubelet node (containerd, CNI, kube-proxy, CoreDNS) in a network namespace of its own.

mod binaries;
mod cluster;
mod logs;
mod node;
mod operator;
mod pki;
mod process;
mod wait;

pub use binaries::{BIN_DIR_ENV, Binaries, build_script};
pub use cluster::{
    Cluster, ClusterOptions, DEFAULT_APISERVER_READY_TIMEOUT, DEFAULT_NAMESPACE_READY_TIMEOUT,
    DEFAULT_NODES_READY_TIMEOUT, KEEP_DIR_ENV, KUBERNETES_SERVICE_IP, LOG_TAIL_LINES, NODE_COUNT,
    SERVICE_CIDR,
};
pub use node::{DEFAULT_NODE_READY_TIMEOUT, NODE_DIR_ENV, NODE_IP, NODE_NAME, NodeHost, RealNode};
pub use operator::{
    DEFAULT_OPERATOR_LOG_FILTER, DEFAULT_OPERATOR_START_TIMEOUT, DEFAULT_OPERATOR_STOP_GRACE,
    OPERATOR_BIN_ENV, Operator, OperatorConfig, operator_binary,
};
pub use pki::Pki;
pub use process::{DEFAULT_STOP_GRACE, processes_matching};
pub use wait::{POLL_INTERVAL, wait_for, wait_for_async};
