//! Loopback fixtures: fake model servers, a router in-process, table documents.
#![allow(dead_code)] // each test binary uses a different subset
#![allow(clippy::unwrap_used)] // fixtures: a failed setup should panic the test

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use serval_router::{Config, Router};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// How a fake model server answers.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// 200 with `{"label": ..}` after an optional delay.
    Answer {
        label: &'static str,
        delay: Duration,
    },
    /// A fixed status.
    Status(u16),
    /// 429 saying, as the model server does, for how many milliseconds it refuses work.
    Overloaded { retry_after_ms: u64 },
}

pub fn answer(label: &'static str) -> Behavior {
    Behavior::Answer {
        label,
        delay: Duration::ZERO,
    }
}

pub fn slow(label: &'static str, delay: Duration) -> Behavior {
    Behavior::Answer { label, delay }
}

/// A fake model-server sidecar on 127.0.0.1.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub paths: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn address(&self) -> String {
        self.addr.to_string()
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn upstream(name: &'static str, behavior: Behavior) -> Upstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h, p) = (hits.clone(), paths.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (h, p, b) = (h.clone(), p.clone(), behavior.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (h, p, b) = (h.clone(), p.clone(), b.clone());
                    async move {
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let _ = req.into_body().collect().await;
                        h.fetch_add(1, Ordering::SeqCst);
                        p.lock().unwrap().push(path.clone());
                        let (status, body) = match b {
                            Behavior::Answer { label, delay } => {
                                tokio::time::sleep(delay).await;
                                (200, json!({"backend": name, "path": path, "label": label}))
                            }
                            Behavior::Status(s) => (s, json!({"error": "status", "backend": name})),
                            Behavior::Overloaded { .. } => {
                                (429, json!({"error": "overloaded", "backend": name}))
                            }
                        };
                        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        if let Behavior::Overloaded { retry_after_ms } = b {
                            resp.headers_mut().insert(
                                serval_api::routing::RETRY_AFTER_MS_HEADER,
                                retry_after_ms.into(),
                            );
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Upstream {
        addr,
        hits,
        paths,
        task,
    }
}

/// An address nothing listens on: connections are refused at once.
pub async fn dead_address() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    drop(l);
    a
}

/// A route document.
pub fn route(endpoint: &str, prefix: &str, traffic: &[(&str, u32)]) -> Value {
    json!({
        "endpoint": endpoint,
        "pathPrefix": prefix,
        "traffic": traffic.iter().map(|(b, w)| json!({"backend": b, "weight": w})).collect::<Vec<_>>(),
        "timeoutMs": 5000,
        "retries": {"attempts": 1, "budgetPercent": 20},
    })
}

/// A table document over `routes` and `(backend, addresses)`.
pub fn table(routes: Vec<Value>, backends: &[(&str, Vec<String>)]) -> Value {
    let backends: serde_json::Map<String, Value> = backends
        .iter()
        .map(|(b, a)| {
            (
                b.to_string(),
                json!({"model": b, "addresses": a, "ready": true}),
            )
        })
        .collect();
    json!({"apiVersion": "serval.dev/routing/v1", "revision": "", "routes": routes, "backends": backends})
}

/// A router serving a watched table file.
pub struct TestRouter {
    pub addr: SocketAddr,
    /// With `--admin-port`.
    pub admin_addr: Option<SocketAddr>,
    pub path: PathBuf,
    pub state: Arc<serval_router::server::State>,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<()>,
}

pub fn test_config(path: PathBuf) -> Config {
    let mut c = Config::for_table_file(path);
    c.table_poll = Duration::from_millis(50);
    c.shutdown_delay = Duration::ZERO;
    c.drain_timeout = Duration::from_secs(10);
    c
}

pub async fn router(doc: &Value) -> TestRouter {
    router_with(doc, |_| {}).await
}

pub async fn router_with(doc: &Value, tweak: impl FnOnce(&mut Config)) -> TestRouter {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routing.json");
    std::fs::write(&path, doc.to_string()).unwrap();
    let mut config = test_config(path.clone());
    tweak(&mut config);
    let r = Router::bind(config).await.unwrap();
    let (addr, admin_addr, state) = (r.addr, r.admin_addr, r.state.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(r.serve(async move {
        let _ = rx.await;
    }));
    TestRouter {
        addr,
        admin_addr,
        path,
        state,
        _dir: dir,
        stop: Some(tx),
        done,
    }
}

impl TestRouter {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn metrics(&self) -> String {
        self.state.metrics.encode()
    }

    pub fn revision(&self) -> Option<String> {
        self.state.store.load().map(|t| t.revision.clone())
    }

    /// Rewrites the table by atomic rename and waits until it is served.
    pub async fn replace_table(&self, doc: &Value) {
        let before = self.revision();
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, doc.to_string()).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
        wait_for("table reload", || self.revision() != before).await;
    }

    /// Writes bytes without waiting for anything.
    pub fn write_raw(&self, bytes: &[u8]) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    pub fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Polls `cond` for up to 10 s.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one metric line starting with `prefix` (labels included), or 0.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// Sends a request and returns (status, serval-backend header, body JSON or Null).
pub async fn call(c: &reqwest::Client, req: reqwest::RequestBuilder) -> (u16, String, Value) {
    let _ = c;
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let backend = resp
        .headers()
        .get("serval-backend")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = resp.bytes().await.unwrap();
    (
        status,
        backend,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

pub const INFER_BODY: &str =
    r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"FP32","data":[1,2]}]}"#;

/// Sends `n` inference requests to `path`, `concurrency` at a time, and counts the answering
/// backends (`serval-backend`); every answer must be 200.
pub async fn count_backends(
    r: &TestRouter,
    path: &str,
    n: usize,
    concurrency: usize,
) -> std::collections::HashMap<String, usize> {
    use futures::StreamExt;
    let c = client();
    futures::stream::iter(0..n)
        .map(|_| {
            let c = c.clone();
            let url = r.url(path);
            async move { call(&c, c.post(url).body(INFER_BODY)).await }
        })
        .buffer_unordered(concurrency)
        .fold(
            std::collections::HashMap::new(),
            |mut m, (status, backend, _)| async move {
                assert_eq!(status, 200, "{backend}");
                *m.entry(backend).or_insert(0) += 1;
                m
            },
        )
        .await
}
