//! Proves the harness against real behaviour: the scheduler and kwok make a Deployment's pods
//! Ready, namespace deletion completes, Serval's CRDs install and document their fields, and
//! stopping the cluster leaves no process behind.
//!
//! One cluster per test binary; scenarios run in sequence in one test so the cluster can be
//! stopped and checked at the end.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Api;
use kube::api::ListParams;
use serval_e2e::{Cluster, LOG_TAIL_LINES, NODE_COUNT, wait_for, wait_for_async};

/// Bound on pods being scheduled and turned Ready by kwok.
const DEPLOYMENT_READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on namespace finalization (pods deleted through kwok's pod-delete stage).
const NAMESPACE_GONE_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound on CRDs becoming Established.
const CRD_ESTABLISHED_TIMEOUT: &str = "60s";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane() {
    let cluster = match Cluster::start() {
        Ok(c) => c,
        Err(e) => panic!("{e:#}"),
    };
    let mut failures = Vec::new();
    if let Err(e) = deployment_becomes_ready(&cluster).await {
        failures.push(format!("deployment_becomes_ready: {e:#}"));
    }
    if let Err(e) = crds_apply_and_explain(&cluster) {
        failures.push(format!("crds_apply_and_explain: {e:#}"));
    }
    if !failures.is_empty() {
        eprintln!("{}", cluster.log_tails(LOG_TAIL_LINES));
    }

    let dir = cluster.dir().display().to_string();
    cluster.stop().expect("cluster stops cleanly");
    drop(cluster);
    let survivors = serval_e2e::processes_matching(&dir).expect("pgrep");
    assert!(survivors.is_empty(), "processes survived: {survivors:?}");

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

async fn deployment_becomes_ready(cluster: &Cluster) -> anyhow::Result<()> {
    let ns = cluster.create_namespace("deploy")?;
    cluster.kubectl_ok([
        "create",
        "deployment",
        "web",
        "--image=registry.k8s.io/pause:3.10",
        "--replicas=2",
        "-n",
        &ns,
    ])?;

    let client = cluster.client().await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    wait_for_async(
        "Deployment web readyReplicas=2",
        DEPLOYMENT_READY_TIMEOUT,
        || {
            let deployments = deployments.clone();
            async move {
                let d = deployments.get("web").await?;
                let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
                Ok((ready == 2).then_some(()))
            }
        },
    )
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let list = pods.list(&ListParams::default().labels("app=web")).await?;
    anyhow::ensure!(
        list.items.len() == 2,
        "expected 2 pods, got {}",
        list.items.len()
    );
    for pod in &list.items {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        anyhow::ensure!(
            node.as_deref().is_some_and(|n| n.starts_with("kwok-node-")),
            "pod not on a kwok node: {node:?}"
        );
        anyhow::ensure!(phase.as_deref() == Some("Running"), "pod phase {phase:?}");
    }
    let nodes = cluster.kubectl_ok(["get", "nodes", "-o", "name"])?;
    anyhow::ensure!(nodes.lines().count() == NODE_COUNT, "nodes: {nodes}");

    cluster.kubectl_ok(["delete", "namespace", &ns, "--wait=false"])?;
    let namespaces: Api<Namespace> = Api::all(client);
    wait_for_async(
        &format!("namespace {ns} to be deleted"),
        NAMESPACE_GONE_TIMEOUT,
        || {
            let namespaces = namespaces.clone();
            let ns = ns.clone();
            async move { Ok(namespaces.get_opt(&ns).await?.is_none().then_some(())) }
        },
    )
    .await
}

fn crds_apply_and_explain(cluster: &Cluster) -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let files = yaml_files(&dir)?;
    anyhow::ensure!(!files.is_empty(), "no CRD YAML in {}", dir.display());
    for file in &files {
        let file = file.display().to_string();
        cluster.kubectl_ok([
            "apply",
            "--server-side",
            "--field-manager=serval-e2e",
            "-f",
            &file,
        ])?;
    }
    cluster.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        &format!("--timeout={CRD_ESTABLISHED_TIMEOUT}"),
    ])?;
    let version = cluster.kubectl_ok([
        "get",
        "crd",
        "backends.serval.dev",
        "-o",
        "jsonpath={.spec.versions[?(@.storage==true)].name}",
    ])?;
    // Discovery of a new group can lag the Established condition briefly.
    let explain = wait_for(
        "kubectl explain backends.spec.model",
        Duration::from_secs(30),
        || {
            let out = cluster.kubectl([
                "explain",
                "backends.spec.model",
                &format!("--api-version=serval.dev/{}", version.trim()),
            ])?;
            Ok(out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned()))
        },
    )?;
    anyhow::ensure!(explain.contains("serval.dev"), "no group in:\n{explain}");
    anyhow::ensure!(
        explain.contains("DESCRIPTION:") && !explain.contains("<empty>"),
        "no field docs in:\n{explain}"
    );
    anyhow::ensure!(explain.contains("uri"), "no `uri` field in:\n{explain}");
    Ok(())
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}
