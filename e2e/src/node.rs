//! A real Kubernetes node for the e2e suite: containerd and runc, a CNI bridge, the kubelet,
//! kube-proxy (nftables mode) and CoreDNS, beside the control plane, in a network namespace of
//! the test's own. Pods run for real: images are imported, probes are called, Services are
//! routed by kube-proxy and names resolved by CoreDNS.
//!
//! Two halves, because a namespace is entered by a process, not by a test:
//! - [`NodeHost`], in the test process on the host: creates the namespace and its addresses,
//!   saves the kernel settings the kubelet changes, starts a watchdog that tears everything
//!   down if the test process dies, runs the scenario process inside, then tears down and
//!   lists anything left behind (`e2e/node/teardown.sh` does the tearing, both ways);
//! - [`RealNode`], in the scenario process inside the namespace: writes the components'
//!   configuration, starts them and waits until the node is Ready and DNS answers.
//!
//! The facts behind the configuration (cgroup v1, no CAP_SYS_RESOURCE, no registry, ...) are
//! in `shared/real-node-notes.md` of the project's design notes and repeated where they apply.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::cluster::{Cluster, KUBERNETES_SERVICE_IP, LOG_TAIL_LINES, SERVICE_CIDR};
use crate::process::{Components, DEFAULT_STOP_GRACE, processes_matching};
use crate::wait::wait_for;

/// The node's address, on `lo` of the namespace: the kubelet refuses a loopback node IP, and
/// the API server advertises it as the `kubernetes` Service's endpoint. CoreDNS listens on it.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// The node's name.
pub const NODE_NAME: &str = "serval-node";
/// The CNI bridge's address: the pods' gateway, and the /24 their addresses come from.
const BRIDGE_ADDRESS: &str = "10.244.0.1/24";
const POD_SUBNET: &str = "10.244.0.0/24";
/// Tells the scenario process where its node directory is (set by [`NodeHost::command`]).
pub const NODE_DIR_ENV: &str = "SERVAL_NODE_DIR";
/// Bound on the node turning Ready after the kubelet starts.
pub const DEFAULT_NODE_READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Kernel settings the kubelet sets on start (`vm.overcommit_memory` 0 -> 1, `kernel.panic`
/// -> 10, `kernel.panic_on_oops` -> 1, ...): global, not per namespace, so saved and restored.
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
];
/// Programs the node needs from the machine, and the Debian package of each.
const HOST_PROGRAMS: [(&str, &str); 7] = [
    ("containerd", "containerd"),
    ("ctr", "containerd"),
    ("containerd-shim-runc-v2", "containerd"),
    ("runc", "runc"),
    ("nft", "nftables"),
    ("nsenter", "util-linux"),
    ("ip", "iproute2"),
];
/// Where Debian's containernetworking-plugins puts the CNI plugins.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const DIR_PREFIX: &str = "serval-node-";

/// The host side of a real node: its network namespace, directory and clean-up.
pub struct NodeHost {
    dir: PathBuf,
    netns: String,
    saved_sysctls: Vec<(String, String)>,
    watchdog: Option<Child>,
    torn_down: bool,
    // Held for the node's life: one real node on the machine at a time (the kubelet's cgroups
    // and kernel settings are machine-wide).
    _lock: File,
}

impl std::fmt::Debug for NodeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeHost")
            .field("dir", &self.dir)
            .field("netns", &self.netns)
            .finish_non_exhaustive()
    }
}

impl NodeHost {
    /// Checks the machine's programs, tears down what a killed earlier run left, and creates
    /// the namespace: `lo` up with [`NODE_IP`], the CNI bridge with the pods' gateway, and a
    /// route for ClusterIPs (a namespace without a default route cannot reach them otherwise).
    pub fn create() -> anyhow::Result<Self> {
        check_host_programs()?;
        let lock_path = std::env::temp_dir().join("serval-node.lock");
        let lock = File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        sweep_stale_nodes();
        if let Some(left) = pod_cgroups().first() {
            bail!(
                "{} exists: a kubelet runs on this machine or a node was left behind; \
                 stop it (or run e2e/node/teardown.sh on its directory) first",
                left.display()
            );
        }

        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{pid}"));
        let netns = format!("{DIR_PREFIX}{pid}");
        if dir.exists() {
            run(&mut teardown_command(&dir, &netns))?;
        }
        std::fs::create_dir_all(&dir)?;
        let saved_sysctls = KUBELET_SYSCTLS
            .iter()
            .map(|k| Ok(((*k).to_owned(), read_sysctl(k)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        std::fs::write(
            dir.join("sysctls.saved"),
            saved_sysctls
                .iter()
                .map(|(k, v)| format!("{k} {v}\n"))
                .collect::<String>(),
        )?;
        // Not in the test's process group and without a parent-death signal: it outlives a
        // killed test and tears the node down then.
        let watchdog = Command::new("bash")
            .arg(teardown_script())
            .arg("--after")
            .arg(pid.to_string())
            .arg(&dir)
            .arg(&netns)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the teardown watchdog")?;
        let mut host = Self {
            dir,
            netns,
            saved_sysctls,
            watchdog: Some(watchdog),
            torn_down: false,
            _lock: lock,
        };
        let ns = host.netns.clone();
        let ip = |args: &[&str]| run(Command::new("ip").arg("-n").arg(&ns).args(args));
        run(Command::new("ip").args(["netns", "add", &host.netns]))?;
        let setup = || -> anyhow::Result<()> {
            ip(&["link", "set", "lo", "up"])?;
            ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
            // The bridge plugin adopts an existing bridge; created here so the ClusterIP route
            // exists before the first pod.
            ip(&["link", "add", "cni0", "type", "bridge"])?;
            ip(&["addr", "add", BRIDGE_ADDRESS, "dev", "cni0"])?;
            ip(&["link", "set", "cni0", "up"])?;
            ip(&["route", "add", SERVICE_CIDR, "dev", "cni0"])?;
            Ok(())
        };
        if let Err(e) = setup() {
            let _ = host.teardown();
            return Err(e.context("setting up the node's network namespace"));
        }
        Ok(host)
    }

    /// The node's directory (configuration, state, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The network namespace's name.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// `program` run inside the namespace (only the network namespace: the kubelet and
    /// containerd need the host's mounts and cgroups), told the node directory.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program)
            .env(NODE_DIR_ENV, &self.dir);
        cmd
    }

    /// Kills every process of the node and its pods, unmounts, removes the pod cgroups and
    /// the namespace, restores the kernel settings and removes the directory. Idempotent.
    pub fn teardown(&mut self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        if !self.torn_down {
            run(&mut teardown_command(&self.dir, &self.netns))?;
            self.torn_down = true;
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        Ok(start.elapsed())
    }

    /// What the node left on the machine, one line each: processes naming its directory or in
    /// its namespace, mounts under the directory, pod cgroups, the namespace itself, kernel
    /// settings not restored, container log links. Empty after a clean teardown.
    pub fn leftovers(&self) -> anyhow::Result<Vec<String>> {
        let mut left = Vec::new();
        let dir = self.dir.display().to_string();
        let own = std::process::id();
        let procs: Vec<u32> = processes_matching(&dir)?
            .into_iter()
            .filter(|p| *p != own)
            .collect();
        if !procs.is_empty() {
            left.push(format!("processes naming {dir}: {procs:?}"));
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        for line in mountinfo.lines() {
            if let Some(point) = line.split(' ').nth(4)
                && point.starts_with(&dir)
            {
                left.push(format!("mount {point}"));
            }
        }
        left.extend(
            pod_cgroups()
                .into_iter()
                .map(|c| format!("cgroup {}", c.display())),
        );
        let namespaces = Command::new("ip").args(["netns", "list"]).output()?;
        if String::from_utf8_lossy(&namespaces.stdout)
            .split_whitespace()
            .any(|n| n == self.netns)
        {
            left.push(format!("network namespace {}", self.netns));
        }
        for (key, want) in &self.saved_sysctls {
            let now = read_sysctl(key)?;
            if &now != want {
                left.push(format!("sysctl {key} = {now}, was {want}"));
            }
        }
        if let Ok(entries) = std::fs::read_dir("/var/log/containers") {
            for e in entries.flatten() {
                if std::fs::read_link(e.path()).is_ok_and(|t| t.starts_with(&self.dir)) {
                    left.push(format!("log link {}", e.path().display()));
                }
            }
        }
        if self.dir.exists() {
            left.push(format!("directory {dir}"));
        }
        Ok(left)
    }
}

impl Drop for NodeHost {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("serval-e2e: tearing the node down: {e:#}");
        }
    }
}

fn teardown_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("node/teardown.sh")
}

fn teardown_command(dir: &Path, netns: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(teardown_script()).arg(dir).arg(netns);
    cmd
}

fn check_host_programs() -> anyhow::Result<()> {
    let missing: Vec<String> = HOST_PROGRAMS
        .iter()
        .filter(|(p, _)| !on_path(p))
        .map(|(p, pkg)| format!("{p} (Debian package {pkg})"))
        .collect();
    let cni = Path::new(CNI_BIN_DIR);
    let mut missing = missing;
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        if !cni.join(plugin).is_file() {
            missing.push(format!(
                "{CNI_BIN_DIR}/{plugin} (Debian package containernetworking-plugins)"
            ));
        }
    }
    if !missing.is_empty() {
        bail!(
            "the real-node tier needs {}: `make prereqs` installs them",
            missing.join(", ")
        );
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(program).is_file())
    })
}

/// The kubelet's and containerd's cgroups in every hierarchy of the machine.
fn pod_cgroups() -> Vec<PathBuf> {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for h in hierarchies.flatten() {
        for name in ["kubepods", "k8s.io"] {
            let p = h.path().join(name);
            if p.is_dir() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn read_sysctl(key: &str) -> anyhow::Result<String> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

/// Tears down nodes whose test process is gone and whose watchdog did not (it was killed
/// too, or the machine rebooted mid-test).
fn sweep_stale_nodes() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&mut teardown_command(&entry.path(), &name));
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The node side: containerd, kubelet, kube-proxy and CoreDNS, started inside the namespace
/// [`NodeHost`] made, against `cluster` (started there with
/// [`ClusterOptions::node_ip`](crate::ClusterOptions) = [`NODE_IP`]). Dropping it stops the
/// components; the containers they started are the host's teardown's to remove.
pub struct RealNode {
    dir: PathBuf,
    socket: PathBuf,
    components: Components,
    /// Seconds from start to each milestone, for the test's report.
    pub timings: Vec<(&'static str, Duration)>,
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl RealNode {
    /// The node directory [`NodeHost::command`] passed to this process.
    pub fn dir_from_env() -> anyhow::Result<PathBuf> {
        std::env::var_os(NODE_DIR_ENV)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("{NODE_DIR_ENV} is not set: run inside NodeHost::command"))
    }

    /// Starts the node's components in `dir`, imports the OCI archives `images` (one must be
    /// `pause_image`, the sandbox image) and waits until the node is Ready, kube-proxy
    /// serves and CoreDNS has synced with the API.
    pub fn start(
        cluster: &Cluster,
        dir: &Path,
        images: &[PathBuf],
        pause_image: &str,
    ) -> anyhow::Result<Self> {
        let start = Instant::now();
        let mut node = Self {
            dir: dir.to_path_buf(),
            socket: dir.join("containerd/containerd.sock"),
            components: Components::new(dir.join("logs")),
            timings: Vec::new(),
        };
        if let Err(e) = node.boot(cluster, images, pause_image, start) {
            let tails = node.log_tails(LOG_TAIL_LINES);
            node.stop();
            bail!("starting the real node: {e:#}\n{tails}");
        }
        Ok(node)
    }

    fn boot(
        &mut self,
        cluster: &Cluster,
        images: &[PathBuf],
        pause_image: &str,
        start: Instant,
    ) -> anyhow::Result<()> {
        let d = self.dir.clone();
        for sub in [
            "containerd",
            "cni/net.d",
            "kubelet",
            "pod-logs",
            "logs",
            "volume-plugins",
        ] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        let kubeconfig = cluster.kubeconfig_path().display().to_string();

        std::fs::write(
            d.join("containerd/config.toml"),
            containerd_config(&d, &self.socket, pause_image),
        )?;
        std::fs::write(d.join("cni/net.d/10-serval.conflist"), CNI_CONFLIST)?;
        self.spawn(
            "containerd",
            Path::new("containerd"),
            &[format!(
                "--config={}",
                d.join("containerd/config.toml").display()
            )],
        )?;
        wait_for("containerd", Duration::from_secs(60), || {
            self.check_running()?;
            Ok(self.ctr(&["version"]).is_ok().then_some(()))
        })?;
        self.timings.push(("containerd", start.elapsed()));
        for image in images {
            self.ctr(&["images", "import", &image.display().to_string()])
                .with_context(|| format!("importing {}", image.display()))?;
        }
        self.timings.push(("images imported", start.elapsed()));

        std::fs::write(d.join("resolv.conf"), format!("nameserver {NODE_IP}\n"))?;
        std::fs::write(
            d.join("kubelet/config.yaml"),
            kubelet_config(&d, &self.socket),
        )?;
        self.spawn(
            "kubelet",
            &cluster.binaries().kubenode(),
            &[
                "kubelet".into(),
                format!("--config={}", d.join("kubelet/config.yaml").display()),
                format!("--kubeconfig={kubeconfig}"),
                format!("--root-dir={}", d.join("kubelet").display()),
                format!("--node-ip={NODE_IP}"),
                format!("--hostname-override={NODE_NAME}"),
                "--v=1".into(),
            ],
        )?;
        std::fs::write(d.join("kube-proxy.yaml"), kube_proxy_config(&kubeconfig))?;
        self.spawn(
            "kube-proxy",
            &cluster.binaries().kubenode(),
            &[
                "kube-proxy".into(),
                format!("--config={}", d.join("kube-proxy.yaml").display()),
            ],
        )?;
        std::fs::write(d.join("Corefile"), corefile(&kubeconfig))?;
        self.spawn(
            "coredns",
            &cluster.binaries().coredns(),
            &["-conf".into(), d.join("Corefile").display().to_string()],
        )?;

        wait_for("the node Ready", DEFAULT_NODE_READY_TIMEOUT, || {
            self.check_running()?;
            let out = cluster.kubectl([
                "get",
                "node",
                NODE_NAME,
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])?;
            Ok((String::from_utf8_lossy(&out.stdout) == "True").then_some(()))
        })?;
        self.timings.push(("node Ready", start.elapsed()));
        wait_for("kube-proxy and CoreDNS", Duration::from_secs(60), || {
            self.check_running()?;
            Ok((http_ok(&format!("{NODE_IP}:10256"), "/healthz")
                && http_ok(&format!("{NODE_IP}:8181"), "/ready"))
            .then_some(()))
        })?;
        self.timings
            .push(("kube-proxy and CoreDNS", start.elapsed()));
        // The `kubernetes` Service's endpoint, which in-cluster clients need.
        wait_for(
            "the kubernetes Service through kube-proxy",
            Duration::from_secs(30),
            || Ok(tcp_ok(&format!("{KUBERNETES_SERVICE_IP}:443")).then_some(())),
        )?;
        Ok(())
    }

    /// `ctr` against this node's containerd, in the `k8s.io` namespace the CRI uses.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args))
    }

    fn spawn(&self, name: &'static str, program: &Path, args: &[String]) -> anyhow::Result<()> {
        self.components.spawn(name, program, args)
    }

    /// Fails, with the component's log tail, if a node component has exited.
    pub fn check_running(&self) -> anyhow::Result<()> {
        self.components.check_running(LOG_TAIL_LINES)
    }

    /// The last `lines` lines of every node component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.components.log_tails(lines)
    }

    /// A hostPath directory pods can mount (for `pvc://` models on a static PersistentVolume).
    pub fn host_path(&self, name: &str) -> anyhow::Result<PathBuf> {
        let p = self.dir.join("host").join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// Stops the node's components (the kubelet first, containerd last).
    pub fn stop(&self) {
        let _ = self.components.stop(DEFAULT_STOP_GRACE);
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `GET path` on `addr` answers 200 (a minimal HTTP/1.0 client: health checks only).
fn http_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(addr) = addr.parse() else { return false };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

fn tcp_ok(addr: &str) -> bool {
    addr.parse()
        .is_ok_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok())
}

/// containerd 1.6 (Debian 12) with a root, state and socket of its own.
fn containerd_config(dir: &Path, socket: &Path, pause_image: &str) -> String {
    let c = dir.join("containerd");
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
# Plugins this node does not use, which would otherwise probe the machine.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  # No registry: the sandbox image is built and imported like the project's.
  sandbox_image = "{pause_image}"
  # These machines drop CAP_SYS_RESOURCE from root's bounding set: a sandbox's oom_score_adj
  # of -998 cannot be set and every sandbox would fail.
  restrict_oom_score_adj = true
  # Pod network namespaces under the state directory, not /run/netns: the teardown finds them.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni}"
"#,
        root = c.join("root").display(),
        state = c.join("state").display(),
        socket = socket.display(),
        opt = c.join("opt").display(),
        cni = dir.join("cni/net.d").display(),
    )
}

/// A bridge on the host side of every pod, addresses from one /24, reachable from the
/// namespace and from other pods; hairpin so a pod reaches itself through its Service.
const CNI_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "serval",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "hairpinMode": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "10.244.0.1"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

fn kubelet_config(dir: &Path, socket: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: {NODE_IP}
healthzPort: 10248
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: unix://{socket}
# These machines mount cgroup v1, which the kubelet refuses by default since 1.35; PID 1 is
# not systemd.
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
clusterDNS: [{NODE_IP}]
clusterDomain: cluster.local
resolvConf: {resolv}
podLogsDirectory: {logs}
volumePluginDir: {plugins}
podCIDR: {POD_SUBNET}
# The machine's disk is shared and may be fuller than the defaults allow: never evict pods
# or collect images over it (imported images cannot be pulled again).
evictionHard: {{memory.available: 100Mi, nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
# Fast status so tests see Ready and deletions within a second or two.
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 5s
"#,
        socket = socket.display(),
        resolv = dir.join("resolv.conf").display(),
        logs = dir.join("pod-logs").display(),
        plugins = dir.join("volume-plugins").display(),
    )
}

fn kube_proxy_config(kubeconfig: &str) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
mode: nftables
hostnameOverride: {NODE_NAME}
clusterCIDR: 10.244.0.0/16
bindAddress: {NODE_IP}
healthzBindAddress: {NODE_IP}:10256
metricsBindAddress: {NODE_IP}:10249
# Zero leaves the machine's conntrack settings alone (they are not per namespace).
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
  udpTimeout: 0s
  udpStreamTimeout: 0s
"#
    )
}

fn corefile(kubeconfig: &str) -> String {
    format!(
        r#".:53 {{
    bind {NODE_IP}
    errors
    health {NODE_IP}:8180
    ready {NODE_IP}:8181
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 30
    loadbalance
}}
"#
    )
}
