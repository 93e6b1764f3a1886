//! No component outlives its cluster: not when a test panics, and not when a test process
//! that used the never-dropped shared cluster exits.

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serval_e2e::{Cluster, processes_matching, wait_for};

const SHARED_DIR_MARKER: &str = "SHARED_CLUSTER_DIR=";

/// One cluster at a time: two starting together on two cores only slows both.
static SERIAL: Mutex<()> = Mutex::new(());

/// Panic payload carrying the cluster directory, distinct from a start failure's message.
struct ClusterDir(String);

#[test]
fn panicking_test_leaves_no_processes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let result = std::panic::catch_unwind(|| {
        let cluster = Cluster::start().unwrap_or_else(|e| panic!("{e:#}"));
        let dir = cluster.dir().display().to_string();
        assert!(!processes_matching(&dir).unwrap_or_default().is_empty());
        std::panic::panic_any(ClusterDir(dir));
    });
    let dir = match result {
        Err(payload) => match payload.downcast::<ClusterDir>() {
            Ok(dir) => dir.0,
            Err(_) => panic!("the cluster failed to start (see the panic above)"),
        },
        Ok(()) => unreachable!("the closure always panics"),
    };
    let survivors = processes_matching(&dir).expect("pgrep");
    assert!(
        survivors.is_empty(),
        "processes survived the panic: {survivors:?}"
    );
}

#[test]
fn shared_cluster_dies_with_the_test_process() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Runs `shared_cluster_child` in a separate test process and checks after it exits.
    let out = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "shared_cluster_child",
            "--ignored",
            "--nocapture",
        ])
        .output()
        .expect("running the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix(SHARED_DIR_MARKER))
        .expect("child printed its cluster directory")
        .to_owned();
    // SIGKILL from the kernel is sent as the child exits; allow for delivery.
    wait_for(
        "shared cluster processes to die",
        Duration::from_secs(5),
        || Ok(processes_matching(&dir)?.is_empty().then_some(())),
    )
    .expect("no process survives the test process");
}

#[test]
#[ignore = "run by shared_cluster_dies_with_the_test_process"]
fn shared_cluster_child() {
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!cluster.surviving_processes().expect("pgrep").is_empty());
    println!("{SHARED_DIR_MARKER}{}", cluster.dir().display());
}
