//! Locates the control-plane binaries that `e2e/cluster/build.sh` caches, building them if needed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::logs::tail_file;

/// Overrides the binary directory (skips `build.sh`), e.g. for a prebuilt set elsewhere.
pub const BIN_DIR_ENV: &str = "SERVAL_CLUSTER_BIN";

/// Files the harness needs from the binary directory.
const REQUIRED: [&str; 10] = [
    "etcd",
    "kube",
    "kwok",
    "helm",
    "kwok-stages.yaml",
    "promtool",
    "monitoring-crds.yaml",
    "kubenode",
    "coredns",
    "pause",
];

/// The control-plane binaries of one cached build.
#[derive(Clone, Debug)]
pub struct Binaries {
    /// Directory holding the files in `REQUIRED`.
    pub dir: PathBuf,
}

impl Binaries {
    /// Finds the cached binaries, running `build.sh` (a no-op when warm) to build any missing.
    pub fn locate() -> anyhow::Result<Self> {
        let dir = match std::env::var_os(BIN_DIR_ENV) {
            Some(dir) => PathBuf::from(dir),
            None => run_build_script()?,
        };
        let missing: Vec<_> = REQUIRED.iter().filter(|f| !dir.join(f).is_file()).collect();
        if !missing.is_empty() {
            bail!("{} lacks {missing:?}", dir.display());
        }
        Ok(Self { dir })
    }

    /// `etcd`.
    pub fn etcd(&self) -> PathBuf {
        self.dir.join("etcd")
    }

    /// The `kube` dispatcher: `kube apiserver|controller-manager|scheduler`.
    pub fn kube(&self) -> PathBuf {
        self.dir.join("kube")
    }

    /// The `kubenode` dispatcher: `kubenode kubelet|kube-proxy`, the control plane's version.
    pub fn kubenode(&self) -> PathBuf {
        self.dir.join("kubenode")
    }

    /// CoreDNS with the `kubernetes` plugin.
    pub fn coredns(&self) -> PathBuf {
        self.dir.join("coredns")
    }

    /// A static `pause`, the real node's pod sandbox process.
    pub fn pause(&self) -> PathBuf {
        self.dir.join("pause")
    }

    /// `kwok`.
    pub fn kwok(&self) -> PathBuf {
        self.dir.join("kwok")
    }

    /// `helm`.
    pub fn helm(&self) -> PathBuf {
        self.dir.join("helm")
    }

    /// Prometheus's `promtool`, which checks and unit-tests the chart's alert rules.
    pub fn promtool(&self) -> PathBuf {
        self.dir.join("promtool")
    }

    /// The Prometheus Operator's CRDs for ServiceMonitor, PodMonitor and PrometheusRule.
    pub fn monitoring_crds(&self) -> PathBuf {
        self.dir.join("monitoring-crds.yaml")
    }

    /// kwok's stage configuration (node initialize and heartbeat, pod ready/complete/delete).
    pub fn kwok_stages(&self) -> PathBuf {
        self.dir.join("kwok-stages.yaml")
    }
}

/// The build script, found relative to this crate so tests work from any directory.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/build.sh")
}

/// Runs `build.sh`, whose last stdout line is the binary directory. A cold build takes many
/// minutes; its log goes to a file whose tail is in the error if it fails.
fn run_build_script() -> anyhow::Result<PathBuf> {
    let script = build_script();
    let log_dir = std::env::temp_dir();
    let log = tempfile::Builder::new()
        .prefix("serval-cluster-build-")
        .suffix(".log")
        .tempfile_in(&log_dir)
        .context("creating the build log")?;
    let stderr = log.reopen().context("opening the build log")?;
    let out = Command::new("bash")
        .arg(&script)
        .stderr(stderr)
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        // Keep the log: it is the only record of a failed cold build.
        let (_, path) = log.keep().context("keeping the build log")?;
        bail!(
            "{} failed ({}); log {}:\n{}",
            script.display(),
            out.status,
            path.display(),
            tail_file(&path, 40)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .with_context(|| format!("{} printed no binary directory", script.display()))?;
    Ok(PathBuf::from(dir))
}
