//! Component processes: each in its own process group, logging to a file, and killed by the
//! kernel if the test process dies without running destructors.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use anyhow::bail;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

use crate::logs::tail_file;

/// How long a component gets to exit after SIGTERM before its group is SIGKILLed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// A running component.
#[derive(Debug)]
pub struct Component {
    /// Short name, e.g. `kube-apiserver`.
    pub name: &'static str,
    /// Combined stdout and stderr.
    pub log: PathBuf,
    child: Child,
}

impl Component {
    /// Starts `program args` in a new process group with output to `log`.
    pub fn spawn<I, S>(
        name: &'static str,
        program: &Path,
        args: I,
        log: PathBuf,
    ) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with_env(name, program, args, std::iter::empty::<(&str, &str)>(), log)
    }

    /// [`Component::spawn`] with extra environment variables.
    pub fn spawn_with_env<I, S, E, K, V>(
        name: &'static str,
        program: &Path,
        args: I,
        envs: E,
        log: PathBuf,
    ) -> anyhow::Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
        E: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = if pdeathsig_supported() {
            // The kernel SIGKILLs the component when the spawning thread dies; the spawner
            // thread lives as long as the process, so a panic=abort, a SIGKILLed test or a
            // never-dropped shared cluster leaves nothing behind.
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args)
            .envs(envs)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = spawn_from_long_lived_thread(cmd)
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        Ok(Self { name, log, child })
    }

    /// Process id, which is also the process-group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` if the process has exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Sends SIGKILL to the process group and reaps the process.
    pub fn kill(&mut self) {
        signal_group(self.pid(), "KILL");
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the process.
    pub fn stop(&mut self, grace: Duration) {
        stop_all(std::slice::from_mut(self), grace);
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }
}

/// Components started together and stopped together, logging into one directory.
#[derive(Debug)]
pub struct Components {
    log_dir: PathBuf,
    list: Mutex<Vec<Component>>,
}

impl Components {
    /// An empty group whose logs go to `log_dir/<name>.log`.
    pub fn new(log_dir: PathBuf) -> Self {
        Self {
            log_dir,
            list: Mutex::new(Vec::new()),
        }
    }

    /// Starts a component of the group.
    pub fn spawn(&self, name: &'static str, program: &Path, args: &[String]) -> anyhow::Result<()> {
        let log = self.log_dir.join(format!("{name}.log"));
        let component = Component::spawn(name, program, args, log)?;
        self.list
            .lock()
            .map_err(|_| anyhow!("component list poisoned"))?
            .push(component);
        Ok(())
    }

    /// Fails, with the component's log tail, if any component has exited.
    pub fn check_running(&self, tail_lines: usize) -> anyhow::Result<()> {
        let mut list = self
            .list
            .lock()
            .map_err(|_| anyhow!("component list poisoned"))?;
        for c in list.iter_mut() {
            if let Some(status) = c.exited() {
                bail!(
                    "{} exited ({status}); log {}:\n{}",
                    c.name,
                    c.log.display(),
                    c.log_tail(tail_lines)
                );
            }
        }
        Ok(())
    }

    /// The last `lines` lines of every component's log, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let Ok(list) = self.list.lock() else {
            return "(component list poisoned)".into();
        };
        list.iter()
            .map(|c| {
                format!(
                    "----- {} ({}) -----\n{}\n",
                    c.name,
                    c.log.display(),
                    c.log_tail(lines)
                )
            })
            .collect()
    }

    /// Stops every component in reverse start order (clients before the servers they use).
    pub fn stop(&self, grace: Duration) -> anyhow::Result<()> {
        let mut list = self
            .list
            .lock()
            .map_err(|_| anyhow!("component list poisoned"))?;
        list.reverse();
        stop_all(&mut list, grace);
        list.clear();
        Ok(())
    }
}

/// Stops components: SIGTERM to every group at once, then SIGKILL to groups still alive after
/// `grace`. Waits for each so none is left a zombie.
pub fn stop_all(components: &mut [Component], grace: Duration) {
    for c in components.iter_mut() {
        if c.exited().is_none() {
            signal_group(c.pid(), "TERM");
        }
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && components.iter_mut().any(|c| c.exited().is_none()) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for c in components.iter_mut() {
        // The group may hold processes the leader started, so signal it even if the leader
        // has exited.
        signal_group(c.pid(), "KILL");
        let _ = c.child.wait();
    }
}

fn signal_group(pgid: u32, signal: &str) {
    // `kill(1)` rather than libc: the workspace forbids unsafe code.
    let _ = Command::new("kill")
        .args(["-s", signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Pids of processes whose command line contains `needle` (e.g. a cluster's directory).
pub fn processes_matching(needle: &str) -> anyhow::Result<Vec<u32>> {
    let out = Command::new("pgrep")
        .args(["-f", "--", needle])
        .output()
        .context("running pgrep")?;
    // pgrep exits 1 when nothing matched.
    if !out.status.success() && out.status.code() != Some(1) {
        return Err(anyhow!(
            "pgrep failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn pdeathsig_supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns on a thread that never exits: the parent-death signal follows the spawning thread,
/// and test threads end long before the process does.
fn spawn_from_long_lived_thread(cmd: Command) -> anyhow::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("serval-e2e-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| eprintln!("serval-e2e: cannot start spawner thread: {e}"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .map_err(|_| anyhow!("spawner lock poisoned"))?
        .send((cmd, reply_tx))
        .map_err(|_| anyhow!("spawner thread is gone"))?;
    Ok(reply_rx
        .recv()
        .map_err(|_| anyhow!("spawner thread is gone"))??)
}
