//! The real-node tier: Serval's pods in a real container runtime.
//!
//! `real_node_tier` creates a network namespace with a real node ([`NodeHost`]) and runs
//! `real_node_scenarios` inside it, where the control plane, containerd, the kubelet,
//! kube-proxy and CoreDNS start ([`RealNode`]). The chart is installed with `helm install
//! --wait` (the operator runs as a pod from its image), the examples are applied with their
//! models from a `pvc://` hostPath volume and over `http://` with a sha256, and every request
//! goes from a client in the namespace through the router's Service, kube-proxy and cluster
//! DNS to sidecar pods. Afterwards the node is torn down and the machine checked for anything
//! left behind (processes, mounts, cgroups, the namespace, kernel settings).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use serval_e2e::{
    Cluster, ClusterOptions, LOG_TAIL_LINES, NODE_IP, NodeHost, RealNode, operator_binary, wait_for,
};

const SCENARIOS: &str = "real_node_scenarios";
/// The sandbox image: `pause` from the cluster build, imported under this name.
const PAUSE_IMAGE: &str = "docker.io/library/pause:serval-e2e";
/// Where the `http://` model is served from, in the namespace.
const MODEL_HTTP_PORT: u16 = 18090;
/// A handwritten seven: `sklearn.datasets.load_digits().images[7]` (target 7).
const SEVEN: [[u8; 8]; 8] = [
    [0, 0, 7, 8, 13, 16, 15, 1],
    [0, 0, 7, 7, 4, 11, 12, 0],
    [0, 0, 0, 0, 8, 13, 1, 0],
    [0, 4, 8, 8, 15, 15, 6, 0],
    [0, 2, 11, 15, 15, 4, 0, 0],
    [0, 0, 0, 16, 5, 0, 0, 0],
    [0, 0, 9, 15, 1, 0, 0, 0],
    [0, 0, 13, 5, 0, 0, 0, 0],
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn real_node_tier() {
    let start = Instant::now();
    let mut host = NodeHost::create().expect("creating the real node's network namespace");
    let exe = std::env::current_exe().unwrap();
    // The scenarios die with this test (parent-death signal); the node's own processes and
    // containers are the teardown's (and, if this test is killed, its watchdog's).
    let status = host
        .command(Path::new("setpriv"))
        .args(["--pdeathsig", "KILL", "--"])
        .arg(&exe)
        .args(["--ignored", "--exact", SCENARIOS, "--nocapture"])
        .args(["--test-threads", "1"])
        .status()
        .expect("running the scenarios in the node's namespace");
    let ran = start.elapsed();
    let teardown = host.teardown().expect("tearing the node down");
    let left = host.leftovers().expect("checking the machine");
    println!(
        "real-node tier: {:.1} s with the scenarios, teardown {:.1} s; checked after teardown: \
         processes naming the node's directory or in its namespace, mounts under it, kubepods \
         and k8s.io cgroups in every hierarchy, the namespace, {} kernel settings, container \
         log links: {}",
        ran.as_secs_f64(),
        teardown.as_secs_f64(),
        6,
        if left.is_empty() {
            "nothing left".to_owned()
        } else {
            format!("{left:?}")
        }
    );
    assert!(left.is_empty(), "the node left {left:#?}");
    assert!(
        status.success(),
        "the real-node scenarios failed (output above)"
    );
}

/// Prints the cluster's state and the node's logs if a scenario fails.
struct Diagnose<'a> {
    cluster: &'a Cluster,
    node: &'a RealNode,
}

impl Drop for Diagnose<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for args in [
            &["get", "pods", "-A", "-o", "wide"][..],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"][..],
            &["get", "backends,endpoints.serval.dev", "-A", "-o", "yaml"][..],
        ] {
            if let Ok(out) = self.cluster.kubectl(args) {
                eprintln!(
                    "----- kubectl {} -----\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        if let Ok(out) = self.cluster.kubectl([
            "logs",
            "-A",
            "--all-containers",
            "-l",
            "app.kubernetes.io/managed-by",
        ]) {
            eprintln!(
                "----- pod logs -----\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        eprintln!(
            "{}\n{}",
            self.node.log_tails(LOG_TAIL_LINES),
            self.cluster.log_tails(10)
        );
    }
}

#[test]
#[ignore = "run by real_node_tier inside the real node's network namespace"]
fn real_node_scenarios() {
    let dir = RealNode::dir_from_env().unwrap();
    let t0 = Instant::now();
    let cluster = Cluster::start_with(ClusterOptions {
        node_ip: Some(NODE_IP),
    })
    .unwrap();
    let control_plane = t0.elapsed();
    let images = build_images(&cluster, &dir).unwrap();
    let built = t0.elapsed();
    let node = RealNode::start(&cluster, &dir, &images, PAUSE_IMAGE).unwrap();
    println!(
        "real node: control plane ready {:.1} s, images built {:.1} s, then {}",
        control_plane.as_secs_f64(),
        built.as_secs_f64(),
        node.timings
            .iter()
            .map(|(what, t)| format!("{what} +{:.1} s", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _diagnose = Diagnose {
        cluster: &cluster,
        node: &node,
    };

    helm_install(&cluster);
    let ns = cluster.create_namespace("demo").unwrap();
    let _model_server = examples_applied(&cluster, &node, &ns);
    let router = router_address(&cluster, &ns);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let png = std::fs::read(repo().join("models/digits/seven.png")).unwrap();
    let digits = format!("http://{router}/digits/v1/models/digits:predict");
    // A Ready pod reaches kube-proxy's rules a moment later (its sync period): until then
    // the Service refuses connections.
    wait_for(
        "the router's Service answering",
        Duration::from_secs(30),
        || Ok(classify(&client, &digits, &png, &[]).ok()),
    )
    .unwrap();

    grpc_through_the_service(&router);
    split_weight_change_and_header_match(&cluster, &ns, &client, &digits, &png);
    rolling_update_under_load(&cluster, &ns, &digits, &png);
    pod_deleted_under_load(&cluster, &ns, &digits, &png);
    user_container(&cluster, &ns, &client, &router);
    scale_from_zero(&cluster, &ns, &client, &router, &png);
    rollout_promoted(&cluster, &ns, &router, &png);
    cascade(&cluster, &node, &ns, &client, &router);
}

/// gRPC through the router's Service (kube-proxy, one port for both protocols, the Services
/// the operator made) with the real tritonclient.grpc: health, metadata, inference equal to
/// onnxruntime's, the body limit's refusal, then the examples' 90/10 split over 10,000 calls,
/// header match on metadata and sticky keys, as the local tier checks them.
fn grpc_through_the_service(router: &str) {
    let python = std::env::var_os("SERVAL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cache/serval/venv"))
        .join("bin/python");
    assert!(
        python.exists(),
        "the gRPC scenario needs the Python venv at {} (make venv, or set SERVAL_VENV)",
        python.display()
    );
    let t = Instant::now();
    let scripts = repo().join("sidecar/tests/python");
    let out = Command::new(&python)
        .args(["-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"])
        .arg(scripts.join("test_tritonclient_grpc.py"))
        .arg(scripts.join("test_router_grpc.py"))
        .env("SERVAL_URL", router)
        // The Endpoint splits 90/10 over digits-v1 and digits-v2: an answer is either model's.
        .env(
            "SERVAL_MODEL",
            std::env::join_paths([
                repo().join("models/digits.onnx"),
                repo().join("models/digits-v2.onnx"),
            ])
            .unwrap(),
        )
        .env(
            "SERVAL_MAX_BODY",
            serval_router::config::DEFAULT_MAX_BODY.to_string(),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("passed"),
        "tritonclient.grpc through the router's Service:\n{text}"
    );
    println!(
        "gRPC through the Service in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        text.lines()
            .filter(|l| l.contains("digits-v1") || l.contains("passed"))
            .collect::<Vec<_>>()
            .join("; ")
    );
}

/// OCI archives of the operator, sidecar, router and the user-container example (from the
/// workspace's release binaries, as `make images` builds them) and the sandbox's `pause`.
fn build_images(cluster: &Cluster, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let release = operator_binary()?
        .parent()
        .context("operator binary has no directory")?
        .to_path_buf();
    let out = dir.join("images");
    let script = repo().join("images/build.sh");
    let run = |bin_dir: &Path, extra: &[&str]| -> anyhow::Result<Vec<PathBuf>> {
        let o = Command::new("bash")
            .arg(&script)
            .arg("--bin-dir")
            .arg(bin_dir)
            .arg("--out-dir")
            .arg(&out)
            .args(extra)
            .stdin(Stdio::null())
            .output()?;
        if !o.status.success() {
            bail!(
                "images/build.sh failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(PathBuf::from)
            .collect())
    };
    let mut images = run(&release, &[])?;
    images.extend(run(
        &cluster.binaries().dir,
        &["--tag", "serval-e2e", "pause"],
    )?);
    Ok(images)
}

fn kubectl_apply(cluster: &Cluster, ns: &str, yaml: &str) {
    cluster
        .kubectl_with_stdin(["apply", "-n", ns, "-f", "-"], yaml)
        .unwrap();
}

/// `helm install --wait`: the operator runs as a pod from its image under the chart's
/// ServiceAccount, and reaches the API through the `kubernetes` Service.
fn helm_install(cluster: &Cluster) {
    let t = Instant::now();
    let helm = cluster.binaries().helm();
    let out = Command::new(&helm)
        .args(["install", "serval"])
        .arg(repo().join("charts/serval"))
        .args(["--namespace", "serval-system", "--create-namespace"])
        // A short autoscaling window, so scaling to zero takes seconds, not minutes.
        .args([
            "--set-json",
            r#"operator.extraEnv=[{"name":"SERVAL_AUTOSCALE_STABLE_WINDOW","value":"3"}]"#,
        ])
        .args(["--wait", "--timeout", "180s"])
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig_path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm install failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pod = cluster
        .kubectl_ok([
            "get",
            "pods",
            "-n",
            "serval-system",
            "-o",
            "jsonpath={range .items[*]}{.spec.serviceAccountName} {.spec.containers[0].image} {.status.phase} {.status.containerStatuses[0].ready}{\"\\n\"}{end}",
        ])
        .unwrap();
    let lines: Vec<&str> = pod.lines().collect();
    assert_eq!(lines.len(), 1, "one operator pod: {pod}");
    assert_eq!(
        lines[0], "serval-operator serval-operator:0.1.0 Running true",
        "the operator pod: service account, image, phase, ready"
    );
    println!(
        "helm install --wait: operator pod Ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// A background process killed when dropped.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The examples, with digits-v1's model on a hostPath PersistentVolume (`pvc://`) and
/// digits-v2's downloaded over `http://` with its sha256 from a server in the namespace; both
/// Backends Ready, their pods Ready only with the model loaded and warmed up.
fn examples_applied(cluster: &Cluster, node: &RealNode, ns: &str) -> Background {
    let models = node.host_path("models").unwrap();
    std::fs::copy(
        repo().join("models/digits.onnx"),
        models.join("digits.onnx"),
    )
    .unwrap();
    let http_dir = node.host_path("http").unwrap();
    let v2 = http_dir.join("digits-v2.onnx");
    std::fs::copy(repo().join("models/digits-v2.onnx"), &v2).unwrap();
    let sha = Command::new("sha256sum").arg(&v2).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let server = Background(
        Command::new("python3")
            .args(["-m", "http.server", &MODEL_HTTP_PORT.to_string()])
            .args(["--bind", &NODE_IP.to_string(), "--directory"])
            .arg(&http_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    cluster
        .kubectl_with_stdin(
            ["apply", "-f", "-"],
            &format!(
                "apiVersion: v1
kind: PersistentVolume
metadata: {{name: models-{ns}}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadOnlyMany]
  storageClassName: \"\"
  hostPath: {{path: {}, type: Directory}}
  claimRef: {{namespace: {ns}, name: models}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: models, namespace: {ns}}}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: \"\"
  volumeName: models-{ns}
  resources: {{requests: {{storage: 1Gi}}}}
",
                models.display()
            ),
        )
        .unwrap();

    let example = |f: &str| std::fs::read_to_string(repo().join("examples").join(f)).unwrap();
    let v1 = example("digits-v1.yaml").replace(
        "uri: file://../models/digits.onnx",
        "uri: pvc://models/digits.onnx",
    );
    let v2_yaml = example("digits-v2.yaml").replace(
        "uri: file://../models/digits.onnx",
        &format!("uri: http://{NODE_IP}:{MODEL_HTTP_PORT}/digits-v2.onnx\n    sha256: {sha}"),
    );
    assert!(v1.contains("pvc://") && v2_yaml.contains("sha256"));
    let t = Instant::now();
    kubectl_apply(cluster, ns, &v1);
    kubectl_apply(cluster, ns, &v2_yaml);
    kubectl_apply(cluster, ns, &example("digits-endpoint.yaml"));
    for backend in ["digits-v1", "digits-v2"] {
        wait_backend_ready(cluster, ns, backend, Duration::from_secs(180));
    }
    println!(
        "examples applied: digits-v1 (pvc://) and digits-v2 (http:// + sha256) Ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for pod in pods(cluster, ns, "digits-v1")
        .into_iter()
        .chain(pods(cluster, ns, "digits-v2"))
    {
        let load = model_load_seconds(&pod.ip);
        println!(
            "  pod {}: created -> Ready {} s (API timestamps); the model server reports \
             fetch + compile + warm-up {load:.3} s",
            pod.name, pod.ready_after_s
        );
    }
    server
}

#[derive(Debug)]
struct Pod {
    name: String,
    ip: String,
    ready_after_s: i64,
}

/// The Ready pods of a Backend, with seconds from creation to Ready.
fn pods(cluster: &Cluster, ns: &str, backend: &str) -> Vec<Pod> {
    let out = cluster
        .kubectl_ok([
            "get",
            "pods",
            "-n",
            ns,
            "-l",
            &format!("serval.dev/backend={backend}"),
            "-o",
            "json",
        ])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| {
            let ready = p["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready" && c["status"] == "True")?;
            Some(Pod {
                name: p["metadata"]["name"].as_str()?.to_owned(),
                ip: p["status"]["podIP"].as_str()?.to_owned(),
                ready_after_s: seconds(ready["lastTransitionTime"].as_str()?)
                    - seconds(p["metadata"]["creationTimestamp"].as_str()?),
            })
        })
        .collect()
}

/// Every pod of a Backend, Ready or not, terminating included.
fn pod_names(cluster: &Cluster, ns: &str, backend: &str) -> anyhow::Result<Vec<String>> {
    let out = cluster.kubectl_ok([
        "get",
        "pods",
        "-n",
        ns,
        "-l",
        &format!("serval.dev/backend={backend}"),
        "-o",
        "name",
    ])?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// Seconds of an RFC 3339 UTC timestamp (`2026-12-05T07:10:33Z`) since midnight, for
/// differences within a test.
fn seconds(ts: &str) -> i64 {
    let time = ts
        .split('T')
        .nth(1)
        .unwrap_or_default()
        .trim_end_matches('Z');
    time.split(':')
        .map(|p| p.parse::<i64>().unwrap_or(0))
        .fold(0, |acc, x| acc * 60 + x)
}

/// The sidecar's own record of its model load (fetch, compile, calibrate, warm-up), read from
/// its admin port: a pod reports it only once the model is ready.
fn model_load_seconds(pod_ip: &str) -> f64 {
    let text = reqwest::blocking::get(format!("http://{pod_ip}:8081/metrics"))
        .and_then(|r| r.text())
        .unwrap();
    let sum = text
        .lines()
        .find(|l| l.starts_with("serval_model_load_seconds{"))
        .unwrap_or_else(|| panic!("no model load metric in {pod_ip}'s metrics:\n{text}"));
    sum.split_whitespace().last().unwrap().parse().unwrap()
}

fn wait_backend_ready(cluster: &Cluster, ns: &str, backend: &str, timeout: Duration) {
    wait_for(&format!("Backend {backend} Ready"), timeout, || {
        let out = cluster.kubectl([
            "get",
            "backend",
            backend,
            "-n",
            ns,
            "-o",
            r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
        ])?;
        Ok((String::from_utf8_lossy(&out.stdout) == "True").then_some(()))
    })
    .unwrap();
}

/// The router's Service address, once its pod is Ready.
fn router_address(cluster: &Cluster, ns: &str) -> String {
    wait_for(
        "the router Deployment available",
        Duration::from_secs(120),
        || {
            let out = cluster.kubectl([
                "get",
                "deployment",
                "serval-router",
                "-n",
                ns,
                "-o",
                "jsonpath={.status.readyReplicas}",
            ])?;
            Ok((String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .unwrap_or(0)
                > 0)
            .then_some(()))
        },
    )
    .unwrap();
    let ip = cluster
        .kubectl_ok([
            "get",
            "service",
            "serval-router",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.clusterIP}:{.spec.ports[0].port}",
        ])
        .unwrap();
    ip.trim().to_owned()
}

fn backend_of(resp: &reqwest::blocking::Response) -> String {
    resp.headers()
        .get("serval-backend")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_owned()
}

/// One digit PNG through the router; the answering Backend, or the failure.
fn classify(
    client: &reqwest::blocking::Client,
    url: &str,
    png: &[u8],
    headers: &[(&str, &str)],
) -> Result<String, String> {
    let mut req = client
        .post(url)
        .header("content-type", "image/png")
        .body(png.to_vec());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    match req.send() {
        Ok(resp) if resp.status().is_success() => {
            let backend = backend_of(&resp);
            let body: Value = resp.json().map_err(|e| e.to_string())?;
            if body["label"] != "seven" {
                return Err(format!("answered {body}"));
            }
            Ok(backend)
        }
        Ok(resp) => Err(format!(
            "{} {}",
            resp.status(),
            resp.text().unwrap_or_default()
        )),
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Failures counted by message.
fn summary(failed: &[String]) -> String {
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for f in failed {
        *by.entry(f.as_str()).or_insert(0) += 1;
    }
    format!("{by:?}")
}

/// Answers by Backend, and the failures.
type Outcome = (BTreeMap<String, usize>, Vec<String>);

/// Requests from `threads` clients in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Outcome>>,
}

impl Load {
    fn start(url: &str, png: &[u8], headers: &[(&str, &str)], threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let workers = (0..threads)
            .map(|_| {
                let (stop, sent) = (stop.clone(), sent.clone());
                let (url, png) = (url.to_owned(), png.to_vec());
                let headers: Vec<(String, String)> = headers
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect();
                std::thread::spawn(move || {
                    let client = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(15))
                        .build()
                        .unwrap();
                    let headers: Vec<(&str, &str)> = headers
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let mut by_backend = BTreeMap::new();
                    let mut failed = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match classify(&client, &url, &png, &headers) {
                            Ok(b) => *by_backend.entry(b).or_insert(0) += 1,
                            Err(e) => failed.push(e),
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    (by_backend, failed)
                })
            })
            .collect();
        Self {
            stop,
            sent,
            workers,
        }
    }

    fn wait_sent(&self, n: usize) {
        while self.sent.load(Ordering::Relaxed) < n {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn finish(self) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        let mut by_backend = BTreeMap::new();
        let mut failed = Vec::new();
        for w in self.workers {
            let (b, f) = w.join().unwrap();
            for (k, v) in b {
                *by_backend.entry(k).or_insert(0) += v;
            }
            failed.extend(f);
        }
        (by_backend, failed)
    }
}

fn patch_weights(cluster: &Cluster, ns: &str, v1: u32, v2: u32) {
    cluster
        .kubectl_ok([
            "patch",
            "endpoint.serval.dev",
            "digits",
            "-n",
            ns,
            "--type=merge",
            "-p",
            &format!(
                r#"{{"spec":{{"traffic":[{{"backend":"digits-v1","weight":{v1}}},{{"backend":"digits-v2","weight":{v2}}}]}}}}"#
            ),
        ])
        .unwrap();
}

/// 90/10 over 2,000 requests within 3 points; a weight change seen through the router pod
/// within 2 s; the example's header match sends testers to digits-v2.
fn split_weight_change_and_header_match(
    cluster: &Cluster,
    ns: &str,
    client: &reqwest::blocking::Client,
    url: &str,
    png: &[u8],
) {
    let load = Load::start(url, png, &[], 8);
    load.wait_sent(2000);
    let (counts, failed) = load.finish();
    assert!(failed.is_empty(), "failed requests: {}", summary(&failed));
    let total: usize = counts.values().sum();
    let v1 = 100.0 * counts.get("digits-v1").copied().unwrap_or(0) as f64 / total as f64;
    println!(
        "split over {total} requests through the router pod: digits-v1 {v1:.1} % (declared \
         90), {counts:?}"
    );
    assert!((v1 - 90.0).abs() <= 3.0, "digits-v1 got {v1:.1} %");

    // All of digits-v1's share moves to digits-v2: 20 digits-v2 answers in a row would happen
    // by chance under 90/10 about once in 10^20.
    patch_weights(cluster, ns, 0, 100);
    let changed = Instant::now();
    let mut run_start = None;
    let mut run = 0;
    while run < 20 {
        assert!(
            changed.elapsed() < Duration::from_secs(30),
            "the weight change never reached the router"
        );
        let sent = Instant::now();
        let b = classify(client, url, png, &[]).unwrap();
        if b == "digits-v2" {
            run_start.get_or_insert(sent);
            run += 1;
        } else {
            run_start = None;
            run = 0;
        }
    }
    let latency = run_start.unwrap() - changed;
    println!(
        "weight change 90/10 -> 0/100 served by the router pod {:.0} ms after kubectl patch \
         returned",
        latency.as_secs_f64() * 1000.0
    );
    assert!(
        latency <= Duration::from_secs(2),
        "the weight change took {latency:?}"
    );
    patch_weights(cluster, ns, 90, 10);

    let mut canary = BTreeMap::new();
    for _ in 0..200 {
        let b = classify(client, url, png, &[("x-canary", "1")]).unwrap();
        *canary.entry(b).or_insert(0) += 1;
    }
    println!("header match x-canary: 1 -> {canary:?}");
    assert_eq!(canary.get("digits-v2"), Some(&200), "{canary:?}");
}

/// A spec change of digits-v1 rolls its pods (surge first) while 4 clients keep sending:
/// none of their requests may fail.
fn rolling_update_under_load(cluster: &Cluster, ns: &str, url: &str, png: &[u8]) {
    let before: Vec<String> = pods(cluster, ns, "digits-v1")
        .into_iter()
        .map(|p| p.name)
        .collect();
    let load = Load::start(url, png, &[], 4);
    load.wait_sent(200);
    let t = Instant::now();
    cluster
        .kubectl_ok([
            "patch",
            "backend",
            "digits-v1",
            "-n",
            ns,
            "--type=merge",
            "-p",
            r#"{"spec":{"batching":{"maxDelayMicros":1500}}}"#,
        ])
        .unwrap();
    wait_for(
        "digits-v1's pods replaced",
        Duration::from_secs(180),
        || {
            let now = pods(cluster, ns, "digits-v1");
            Ok((!now.is_empty()
                && now.iter().all(|p| !before.contains(&p.name))
                && pod_names(cluster, ns, "digits-v1")?.len() == now.len())
            .then_some(()))
        },
    )
    .unwrap();
    let rolled = t.elapsed();
    let sent_before = load.sent.load(Ordering::Relaxed);
    load.wait_sent(sent_before + 200);
    let (counts, failed) = load.finish();
    let total: usize = counts.values().sum::<usize>() + failed.len();
    println!(
        "rolling update of digits-v1 under load: pods replaced in {:.1} s, {total} requests, \
         {} failed",
        rolled.as_secs_f64(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed during the rolling update: {}",
        summary(&failed)
    );
}

/// One of digits-v2's two pods deleted while 4 clients send to digits-v2 (header match):
/// only requests in flight on it may fail.
fn pod_deleted_under_load(cluster: &Cluster, ns: &str, url: &str, png: &[u8]) {
    let victims = pods(cluster, ns, "digits-v2");
    assert_eq!(victims.len(), 2, "{victims:?}");
    let threads = 4;
    let load = Load::start(url, png, &[("x-canary", "1")], threads);
    load.wait_sent(200);
    let t = Instant::now();
    cluster
        .kubectl_ok(["delete", "pod", &victims[0].name, "-n", ns, "--wait=false"])
        .unwrap();
    wait_for(
        "digits-v2 back to 2 Ready pods",
        Duration::from_secs(180),
        || {
            let now = pods(cluster, ns, "digits-v2");
            Ok((now.len() == 2 && now.iter().all(|p| p.name != victims[0].name)).then_some(()))
        },
    )
    .unwrap();
    let replaced = t.elapsed();
    let sent_before = load.sent.load(Ordering::Relaxed);
    load.wait_sent(sent_before + 200);
    let (counts, failed) = load.finish();
    let total: usize = counts.values().sum::<usize>() + failed.len();
    println!(
        "digits-v2 pod deleted under load: replaced in {:.1} s, {total} requests, {} failed \
         (at most {threads} were in flight on it): {}",
        replaced.as_secs_f64(),
        failed.len(),
        summary(&failed)
    );
    assert!(
        failed.len() <= threads,
        "more failures than requests in flight: {}",
        summary(&failed)
    );
}

/// The user-container example: its own image beside the sidecar, a readiness probe, the
/// Service targeting it, and its transformed answer through the router.
fn user_container(cluster: &Cluster, ns: &str, client: &reqwest::blocking::Client, router: &str) {
    let yaml =
        std::fs::read_to_string(repo().join("examples/user-container/digits-custom.yaml")).unwrap();
    let t = Instant::now();
    kubectl_apply(cluster, ns, &yaml);
    wait_backend_ready(cluster, ns, "digits-custom", Duration::from_secs(180));
    let ready = t.elapsed();
    let target = cluster
        .kubectl_ok([
            "get",
            "service",
            "digits-custom",
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.ports[0].targetPort}",
        ])
        .unwrap();
    assert_eq!(
        target, "user-http",
        "the Service targets the user container"
    );
    let probe = cluster
        .kubectl_ok([
            "get",
            "deployment",
            "digits-custom",
            "-n",
            ns,
            "-o",
            r#"jsonpath={.spec.template.spec.containers[?(@.name=="user")].readinessProbe.httpGet.path}"#,
        ])
        .unwrap();
    assert_eq!(
        probe, "/v2/health/ready",
        "the user container's readiness probe"
    );

    let url = format!("http://{router}/digits-custom/classify");
    let answer = wait_for(
        "the user container answering",
        Duration::from_secs(30),
        || {
            let resp = client
                .post(&url)
                .json(&serde_json::json!({ "image": SEVEN }))
                .send()?;
            if !resp.status().is_success() {
                return Ok(None);
            }
            Ok(Some(resp.json::<Value>()?))
        },
    )
    .unwrap();
    println!(
        "user container: Backend Ready in {:.1} s; POST /digits-custom/classify -> {answer}",
        ready.as_secs_f64()
    );
    assert_eq!(answer["digit"], 7, "{answer}");
    assert_eq!(answer["model"], "digits-custom", "{answer}");
    let confidence = answer["confidence"].as_f64().unwrap();
    assert!(confidence > 0.5 && confidence <= 1.0, "{answer}");

    // Its own validation, not the model server's: a client's mistake is a 400 with JSON.
    let bad = client
        .post(&url)
        .json(&serde_json::json!({ "image": [[1, 2, 3]] }))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: Value = bad.json().unwrap();
    assert!(body["error"].as_str().unwrap().contains("8 rows"), "{body}");
    let _ = std::io::stdout().flush();
}

fn deployment_replicas(cluster: &Cluster, ns: &str, name: &str) -> (u32, u32) {
    let out = cluster
        .kubectl_ok([
            "get",
            "deployment",
            name,
            "-n",
            ns,
            "-o",
            "jsonpath={.spec.replicas} {.status.readyReplicas}",
        ])
        .unwrap_or_default();
    let mut it = out
        .split_whitespace()
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// A Backend that may scale to zero does, once idle; the next request is held by the router
/// pod while the operator, reading the router's held count, starts a real pod, and answered.
fn scale_from_zero(
    cluster: &Cluster,
    ns: &str,
    client: &reqwest::blocking::Client,
    router: &str,
    png: &[u8],
) {
    let v1 = std::fs::read_to_string(repo().join("examples/digits-v1.yaml")).unwrap();
    let backend = v1
        .replace("name: digits-v1", "name: digits-zero")
        .replace(
            "uri: file://../models/digits.onnx",
            "uri: pvc://models/digits.onnx",
        )
        .replace(
            "  replicas: 1\n",
            "  autoscaling:\n    minReplicas: 0\n    maxReplicas: 2\n    targetInflight: 8\n    \
             scaleDownDelaySeconds: 1\n    scaleToZeroAfterSeconds: 2\n",
        );
    assert!(backend.contains("minReplicas: 0"), "{backend}");
    kubectl_apply(cluster, ns, &backend);
    kubectl_apply(
        cluster,
        ns,
        "apiVersion: serval.dev/v1alpha1
kind: Endpoint
metadata: {name: digits-zero}
spec:
  route: {pathPrefix: /digits-zero}
  traffic: [{backend: digits-zero, weight: 100}]
  timeoutMillis: 60000
",
    );
    let url = format!("http://{router}/digits-zero/v1/models/digits-zero:predict");
    // The route exists before a replica does (the router holds, not 404s): wait for the
    // table to carry it, then for the router pods to have read it.
    wait_for("the digits-zero route", Duration::from_secs(30), || {
        let table = cluster.kubectl_ok([
            "get",
            "configmap",
            "serval-routing",
            "-n",
            ns,
            "-o",
            "jsonpath={.data.routing\\.json}",
        ])?;
        Ok(table.contains("/digits-zero").then_some(()))
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for round in ["applied at zero", "scaled back to zero"] {
        let t = Instant::now();
        wait_for("digits-zero at zero", Duration::from_secs(180), || {
            let (want, _) = deployment_replicas(cluster, ns, "digits-zero");
            Ok((want == 0 && pod_names(cluster, ns, "digits-zero")?.is_empty()).then_some(()))
        })
        .unwrap();
        let at_zero = t.elapsed();
        let t = Instant::now();
        let backend = classify(client, &url, png, &[]).unwrap();
        let first = t.elapsed();
        assert_eq!(backend, "digits-zero");
        let pod = pods(cluster, ns, "digits-zero");
        assert_eq!(pod.len(), 1, "{pod:?}");
        println!(
            "scale from zero ({round}, no pod left after {:.1} s): the first request held by \
             the router pod and answered in {:.2} s; a real pod started (created -> Ready {} s \
             by API timestamps, model load {:.3} s)",
            at_zero.as_secs_f64(),
            first.as_secs_f64(),
            pod[0].ready_after_s,
            model_load_seconds(&pod[0].ip)
        );
    }
}

/// A rollout through the real router pods: the operator reads their counters at their pod
/// addresses and promotes a healthy canary step by step while clients send.
fn rollout_promoted(cluster: &Cluster, ns: &str, router: &str, png: &[u8]) {
    kubectl_apply(
        cluster,
        ns,
        "apiVersion: serval.dev/v1alpha1
kind: Endpoint
metadata: {name: digits-ro}
spec:
  route: {pathPrefix: /digits-ro}
  traffic: [{backend: digits-v1, weight: 100}]
  rollout:
    canary: digits-v2
    steps: [Shadow, 50, 100]
    intervalSeconds: 2
    minRequests: 20
    failureLimit: 2
    # The judgement itself is tested elsewhere; this machine's p99 is noisy.
    gates: {maxErrorRate: 0.01, maxLatencyRatio: 4, minAgreement: 0.95}
",
    );
    let url = format!("http://{router}/digits-ro/v1/models/digits-ro:predict");
    let probe = reqwest::blocking::Client::new();
    wait_for("the digits-ro route", Duration::from_secs(30), || {
        Ok(classify(&probe, &url, png, &[]).ok())
    })
    .unwrap();
    let load = Load::start(&url, png, &[], 4);
    let t = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let phase = wait_for("the rollout to finish", Duration::from_secs(180), || {
        let out = cluster.kubectl_ok([
            "get",
            "endpoint.serval.dev",
            "digits-ro",
            "-n",
            ns,
            "-o",
            "jsonpath={.status.rollout.phase} {.status.rollout.step}",
        ])?;
        let now = out.trim().to_owned();
        if !now.is_empty() && seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        let phase = now.split_whitespace().next().unwrap_or_default().to_owned();
        Ok(matches!(phase.as_str(), "Promoted" | "RolledBack").then_some(phase))
    })
    .unwrap();
    let took = t.elapsed();
    let (counts, failed) = load.finish();
    println!(
        "rollout through the router pods: {phase} in {:.1} s via {seen:?}; {counts:?}, {} failed",
        took.as_secs_f64(),
        failed.len()
    );
    assert_eq!(phase, "Promoted", "{seen:?}");
    assert!(failed.is_empty(), "{}", summary(&failed));
    assert!(
        counts.get("digits-v2").copied().unwrap_or(0) > 0,
        "the canary served: {counts:?}"
    );
}

/// The cascade example planned by the operator from the real API server and served by the
/// router pods: the held-out digits, 16 rows per request, answered as the offline cascade
/// (`models/digits/composition.json`) answers them.
fn cascade(
    cluster: &Cluster,
    node: &RealNode,
    ns: &str,
    client: &reqwest::blocking::Client,
    router: &str,
) {
    let models = node.host_path("models").unwrap();
    for m in ["digits-small.onnx", "digits-large.onnx"] {
        std::fs::copy(repo().join("models").join(m), models.join(m)).unwrap();
    }
    let yaml = std::fs::read_to_string(repo().join("examples/cascade/digits-cascade.yaml"))
        .unwrap()
        .replace("uri: file://../../models/", "uri: pvc://models/")
        .replace("pathPrefix: /digits\n", "pathPrefix: /digits-cascade\n");
    assert!(yaml.contains("pvc://models/digits-large.onnx"), "{yaml}");
    kubectl_apply(cluster, ns, &yaml);
    for b in ["digits-small", "digits-large"] {
        wait_backend_ready(cluster, ns, b, Duration::from_secs(180));
    }
    let truth: Value = serde_json::from_slice(
        &std::fs::read(repo().join("models/digits/composition.json")).unwrap(),
    )
    .unwrap();
    let rows: Vec<Vec<f32>> = serde_json::from_value(truth["rows"].clone()).unwrap();
    let labels: Vec<usize> = serde_json::from_value(truth["labels"].clone()).unwrap();
    let url = format!("http://{router}/digits-cascade/v2/models/digits-cascade/infer");
    let infer = |chunk: &[Vec<f32>]| -> anyhow::Result<Value> {
        let data: Vec<f32> = chunk.iter().flatten().copied().collect();
        let resp = client
            .post(&url)
            .json(
                &serde_json::json!({"inputs": [{"name": "X", "datatype": "FP32",
                "shape": [chunk.len(), 64], "data": data}]}),
            )
            .send()?;
        if !resp.status().is_success() {
            bail!("{} {}", resp.status(), resp.text().unwrap_or_default());
        }
        Ok(resp.json()?)
    };
    // Both stages in the router pods' table: the held-out set reaches digits-large.
    let mut last = String::new();
    let served = wait_for("the cascade's two stages", Duration::from_secs(60), || {
        Ok(match infer(&rows) {
            Ok(v)
                if v["parameters"]["serval_stages"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s == "digits-large")) =>
            {
                Some(v)
            }
            Ok(v) => {
                last = format!("{}", v["parameters"]);
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        })
    });
    if let Err(e) = served {
        panic!("{e:#}; the last answer: {last}");
    }
    let (mut correct, mut large) = (0, 0);
    for (i, chunk) in rows.chunks(16).enumerate() {
        let answer = infer(chunk).unwrap();
        let p: Vec<f64> = answer["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["name"] == "probabilities")
            .unwrap()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let stages = answer["parameters"]["serval_stages"].as_array().unwrap();
        for (k, row) in p.chunks(10).enumerate() {
            let best = (0..10).max_by(|a, b| row[*a].total_cmp(&row[*b])).unwrap();
            correct += usize::from(best == labels[i * 16 + k]);
            large += usize::from(stages[k] == "digits-large");
        }
    }
    let accuracy = correct as f64 / rows.len() as f64;
    let share = large as f64 / rows.len() as f64;
    let want = &truth["cascadeSmallLarge"]["0.9"];
    println!(
        "cascade through the router pods: {} held-out digits, accuracy {accuracy:.4} (offline \
         {:.4}), {share:.3} of rows escalated to digits-large (offline {:.3})",
        rows.len(),
        want["accuracy"].as_f64().unwrap(),
        want["escalated"].as_f64().unwrap()
    );
    assert!((accuracy - want["accuracy"].as_f64().unwrap()).abs() <= 0.002);
    assert!((share - want["escalated"].as_f64().unwrap()).abs() <= 0.01);
}
