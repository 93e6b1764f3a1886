//! The data plane from the cluster's truth. Pods under kwok run no containers, so this closes
//! the loop: the routing table is read out of the ConfigMap the operator wrote, real sidecars
//! are started on loopback for its Backends (with the arguments the operator derives from the
//! Backend specs), the real router serves the table, and real traffic shows the split.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serval_api::Backend;
use serval_api::routing::RoutingTable;
use serval_api::sidecar::sidecar_args;
use serval_e2e::{Cluster, Operator, OperatorConfig, operator_binary, wait_for};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Children killed when the test ends, whatever the outcome.
#[derive(Default)]
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A sibling of the operator binary (the same `cargo build --workspace`), or a loud failure.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let bin = operator_binary()?
        .parent()
        .context("operator binary has no directory")?
        .join(name);
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --release --workspace --bins` (make test does)",
            bin.display()
        );
    }
    Ok(bin)
}

fn routing_table(cluster: &Cluster, ns: &str) -> anyhow::Result<RoutingTable> {
    let json = cluster.kubectl_ok([
        "get",
        "configmap",
        "serval-routing",
        "-n",
        ns,
        "-o",
        "jsonpath={.data.routing\\.json}",
    ])?;
    Ok(RoutingTable::from_json(json.as_bytes())?)
}

fn weights(table: &RoutingTable) -> Vec<(String, u32)> {
    table
        .route("digits")
        .map(|r| {
            r.traffic
                .iter()
                .map(|t| (t.backend.clone(), t.weight))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for the ConfigMap's digits route to give digits-v1 `v1` and digits-v2 the rest.
fn table_with_split(
    cluster: &Cluster,
    ns: &str,
    v1: u32,
    timeout: Duration,
) -> anyhow::Result<RoutingTable> {
    let want = [
        ("digits-v1".to_owned(), v1),
        ("digits-v2".to_owned(), 100 - v1),
    ];
    wait_for(
        &format!("the ConfigMap to carry {v1}/{}", 100 - v1),
        timeout,
        || {
            let t = routing_table(cluster, ns)?;
            Ok((weights(&t) == want).then_some(t))
        },
    )
}

/// The cluster's table with each Backend's Service address replaced by the loopback sidecars.
fn localised(table: &RoutingTable, local: &BTreeMap<String, Vec<String>>) -> RoutingTable {
    let mut t = table.clone();
    for (name, up) in &mut t.backends {
        up.addresses = local.get(name).cloned().unwrap_or_default();
    }
    t
}

fn write_table(path: &Path, table: &RoutingTable) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, table.to_json()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn split(
    client: &reqwest::blocking::Client,
    port: u16,
    png: &[u8],
    n: usize,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let resp = client
            .post(format!(
                "http://127.0.0.1:{port}/digits/v1/models/digits:predict"
            ))
            .header("content-type", "image/png")
            .body(png.to_vec())
            .send()
            .expect("request through the router");
        assert!(resp.status().is_success(), "status {}", resp.status());
        let backend = resp.headers()["serval-backend"]
            .to_str()
            .unwrap()
            .to_owned();
        *counts.entry(backend).or_default() += 1;
    }
    counts
}

/// The split is random per request, so the observed share of `n` requests is binomial: allow
/// 4.5 standard deviations (a false failure about once in 150,000 runs), which still tells
/// 90/10 from 50/50 or from ignored weights by a wide margin.
fn assert_share(observed: f64, want: f64, n: usize) {
    let p = want / 100.0;
    let tolerance = 4.5 * 100.0 * (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (observed - want).abs() <= tolerance,
        "digits-v1 got {observed:.1}%, want {want} ± {tolerance:.1} over {n} requests"
    );
}

fn share(counts: &BTreeMap<String, usize>, backend: &str) -> f64 {
    let total: usize = counts.values().sum();
    100.0 * *counts.get(backend).unwrap_or(&0) as f64 / total as f64
}

#[test]
fn the_clusters_routing_table_splits_real_traffic_over_real_model_servers() -> anyhow::Result<()> {
    let cluster = Cluster::shared()?;
    cluster.kubectl_ok([
        "apply",
        "--server-side",
        "-f",
        &repo().join("crds").display().to_string(),
    ])?;
    cluster.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "crd/backends.serval.dev",
        "crd/endpoints.serval.dev",
        "--timeout=60s",
    ])?;
    let ns = cluster.create_namespace("dataplane")?;
    let _operator = Operator::start(cluster, OperatorConfig::namespaced(&ns))?;
    let examples = repo().join("examples");
    cluster.kubectl_ok(["apply", "-n", &ns, "-f", &examples.display().to_string()])?;
    cluster.kubectl_ok([
        "wait",
        "-n",
        &ns,
        "--for=condition=Ready",
        "endpoint/digits",
        "--timeout=120s",
    ])?;

    // The Endpoint is Ready once one weighted Backend is; an unready Backend has weight 0 in
    // the table until it is Ready too, so wait for the declared 90/10.
    cluster.kubectl_ok([
        "wait",
        "-n",
        &ns,
        "--for=condition=Ready",
        "backend/digits-v1",
        "backend/digits-v2",
        "--timeout=120s",
    ])?;
    let table = table_with_split(cluster, &ns, 90, Duration::from_secs(30))?;

    // Real model servers for each Backend, configured from the Backend as stored in the cluster.
    let mut children = Children::default();
    let mut local: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let sidecar = binary("serval-sidecar")?;
    for name in table.backends.keys() {
        let json = cluster.kubectl_ok(["get", "backend", name, "-n", &ns, "-o", "json"])?;
        let backend: Backend = serde_json::from_str(&json)?;
        let rel = backend
            .spec
            .model
            .uri
            .strip_prefix("file://")
            .context("examples use file:// models")?;
        let model = examples.join(rel);
        for _ in 0..backend.spec.replicas {
            let port = free_port();
            let child = Command::new(&sidecar)
                .args(sidecar_args(
                    name,
                    &backend.spec,
                    &model.display().to_string(),
                    "127.0.0.1",
                    port,
                ))
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()?;
            children.0.push(child);
            local
                .entry(name.clone())
                .or_default()
                .push(format!("127.0.0.1:{port}"));
        }
    }
    let dir = tempfile::tempdir()?;
    let table_path = dir.path().join("routing.json");
    write_table(&table_path, &localised(&table, &local));
    let router_port = free_port();
    let router = Command::new(binary("serval-router")?)
        .arg("--table")
        .arg(&table_path)
        .args(["--host", "127.0.0.1", "--port", &router_port.to_string()])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    children.0.push(router);

    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    // In a cluster, pod readiness keeps traffic off a sidecar until its model is warm.
    for addr in local.values().flatten() {
        let url = format!("http://{addr}/v2/health/ready");
        wait_for(
            &format!("sidecar {addr} to be ready"),
            Duration::from_secs(60),
            || {
                Ok(client
                    .get(&url)
                    .send()
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            },
        )?;
    }
    let ready_url = format!("http://127.0.0.1:{router_port}/v2/models/digits/ready");
    wait_for(
        "the router to serve digits",
        Duration::from_secs(60),
        || {
            Ok(client
                .get(&ready_url)
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .map(|_| ()))
        },
    )?;
    let png = std::fs::read(repo().join("models/digits/seven.png"))?;

    let counts = split(&client, router_port, &png, 2000);
    let v1 = share(&counts, "digits-v1");
    eprintln!("90/10 from the cluster: {counts:?} ({v1:.1}% digits-v1)");
    assert_share(v1, 90.0, 2000);

    // Change the weights in the cluster; the operator rewrites the table; the router follows.
    let started = Instant::now();
    cluster.kubectl_ok([
        "patch", "endpoint", "digits", "-n", &ns, "--type", "merge", "-p",
        r#"{"spec":{"traffic":[{"backend":"digits-v1","weight":50},{"backend":"digits-v2","weight":50}]}}"#,
    ])?;
    let updated = table_with_split(cluster, &ns, 50, Duration::from_secs(10))?;
    eprintln!(
        "weight change reached the ConfigMap in {:?}",
        started.elapsed()
    );
    write_table(&table_path, &localised(&updated, &local));
    wait_for("the router to apply 50/50", Duration::from_secs(10), || {
        Ok((share(&split(&client, router_port, &png, 100), "digits-v2") > 25.0).then_some(()))
    })?;
    let counts = split(&client, router_port, &png, 2000);
    let v1 = share(&counts, "digits-v1");
    eprintln!("50/50 from the cluster: {counts:?} ({v1:.1}% digits-v1)");
    assert_share(v1, 50.0, 2000);
    Ok(())
}
