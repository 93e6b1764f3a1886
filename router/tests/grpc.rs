//! gRPC calls through the router get REST's resilience: a replica answering UNAVAILABLE is
//! retried on another, one answering INTERNAL is ejected, an overloaded one (RESOURCE_EXHAUSTED
//! with `retry-after`) is shed while a message too large (no `retry-after`) sheds nothing, and
//! a mirror compares the protobuf answers and counts gRPC errors as what they are.

#![allow(clippy::unwrap_used)] // test fixtures: a failed step should panic the test

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde_json::json;
use serval_proto::model_infer_response::InferOutputTensor;
use tokio::net::TcpListener;

/// How a fake gRPC model server answers `ModelInfer`.
#[derive(Clone, Copy, Debug)]
enum Grpc {
    /// A digits-like answer: `probabilities` [1, 10] peaking at this class.
    Class(usize),
    /// A trailers-only error with this code.
    Code(i32),
    /// RESOURCE_EXHAUSTED saying when to come back, as the sidecar says overload.
    Overloaded,
}

struct GrpcUpstream {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = BoxBody<Bytes, std::convert::Infallible>;

fn framed(m: &impl Message) -> Bytes {
    let mut out = vec![0];
    out.extend((m.encoded_len() as u32).to_be_bytes());
    out.extend(m.encode_to_vec());
    Bytes::from(out)
}

fn answer(behavior: Grpc) -> Response<Body> {
    let mut head = Response::builder().header("content-type", "application/grpc");
    let body: Body = match behavior {
        Grpc::Class(class) => {
            let probs: Vec<f32> = (0..10)
                .map(|i| if i == class { 0.9 } else { 0.01 })
                .collect();
            let msg = serval_proto::ModelInferResponse {
                model_name: "m".into(),
                outputs: vec![InferOutputTensor {
                    name: "probabilities".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 10],
                    ..Default::default()
                }],
                raw_output_contents: vec![probs.iter().flat_map(|p| p.to_le_bytes()).collect()],
                ..Default::default()
            };
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", 0.into());
            let frames = futures::stream::iter([
                Ok(Frame::data(framed(&msg))),
                Ok(Frame::trailers(trailers)),
            ]);
            http_body_util::StreamBody::new(frames).boxed()
        }
        Grpc::Code(code) => {
            head = head
                .header("grpc-status", code)
                .header("grpc-message", "fake");
            http_body_util::Empty::new().boxed()
        }
        Grpc::Overloaded => {
            head = head
                .header("grpc-status", 8)
                .header("retry-after", 1)
                .header(serval_api::routing::RETRY_AFTER_MS_HEADER, 5000);
            http_body_util::Empty::new().boxed()
        }
    };
    head.body(body).unwrap()
}

/// A fake model server speaking gRPC over HTTP/2 prior knowledge, as the sidecar does.
async fn grpc_upstream(behavior: Grpc) -> GrpcUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let h = h.clone();
            // As the sidecar's: a message and its trailers must not wait for Nagle.
            stream.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let h = h.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        h.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::convert::Infallible>(answer(behavior))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    GrpcUpstream { addr, hits, task }
}

/// A gRPC client of the router: unary ModelInfer calls over one HTTP/2 connection.
struct Client(hyper::client::conn::http2::SendRequest<Full<Bytes>>);

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        Self(send)
    }

    /// Calls ModelInfer on `model`; returns the grpc-status and the backend that answered.
    async fn infer(&mut self, model: &str) -> (String, String) {
        let msg = serval_proto::ModelInferRequest {
            model_name: model.into(),
            ..Default::default()
        };
        let req = Request::post("http://router/inference.GRPCInferenceService/ModelInfer")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(framed(&msg)))
            .unwrap();
        self.0.ready().await.unwrap();
        let resp = self.0.send_request(req).await.unwrap();
        let backend = resp
            .headers()
            .get("serval-backend")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let head = resp.headers().clone();
        let collected = resp.into_body().collect().await.unwrap();
        let status = collected
            .trailers()
            .unwrap_or(&head)
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, backend)
    }
}

fn one_route(backend: &str, addrs: Vec<String>) -> serde_json::Value {
    table(
        vec![route("e", "/e", &[(backend, 100)])],
        &[(backend, addrs)],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_replica_is_retried_on_another_and_a_failing_one_ejected() {
    let good = grpc_upstream(Grpc::Class(3)).await;
    let draining = grpc_upstream(Grpc::Code(14)).await;
    let r = router(&one_route(
        "b",
        vec![good.addr.to_string(), draining.addr.to_string()],
    ))
    .await;
    let mut c = Client::connect(r.addr).await;
    for _ in 0..40 {
        let (status, backend) = c.infer("e").await;
        assert_eq!((status.as_str(), backend.as_str()), ("0", "b"));
    }
    let m = r.metrics();
    assert!(draining.hits.load(Ordering::SeqCst) > 0, "{m}");
    assert!(
        metric(
            &m,
            r#"serval_router_retries_total{endpoint="e",backend="b"}"#
        ) > 0.0,
        "{m}"
    );

    // INTERNAL is not retried (the model ran, or may have): the client sees it, and the
    // replica is ejected after the configured failures, so later calls all succeed.
    let good = grpc_upstream(Grpc::Class(3)).await;
    let broken = grpc_upstream(Grpc::Code(13)).await;
    let r = router_with(
        &one_route("b", vec![good.addr.to_string(), broken.addr.to_string()]),
        |c| c.eject_after_failures = 3,
    )
    .await;
    let mut c = Client::connect(r.addr).await;
    let mut failed = 0;
    for _ in 0..60 {
        if c.infer("e").await.0 != "0" {
            failed += 1;
        }
    }
    assert_eq!(failed, 3, "three failures, then ejected");
    let m = r.metrics();
    assert!(
        m.lines()
            .any(|l| l.starts_with("serval_router_ejections_total")
                && l.contains(&broken.addr.to_string())),
        "{m}"
    );
    // Counted as the server's failures, as a REST 500 is.
    assert_eq!(
        metric(
            &m,
            r#"serval_router_requests_total{endpoint="e",backend="b",code="500"}"#
        ),
        3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_sheds_a_replica_but_a_message_too_large_does_not() {
    let good = grpc_upstream(Grpc::Class(3)).await;
    let busy = grpc_upstream(Grpc::Overloaded).await;
    let r = router(&one_route(
        "b",
        vec![good.addr.to_string(), busy.addr.to_string()],
    ))
    .await;
    let mut c = Client::connect(r.addr).await;
    let mut refused = 0;
    for _ in 0..40 {
        if c.infer("e").await.0 == "8" {
            refused += 1;
        }
    }
    // The busy replica refuses for 5 s (honoured up to 1 s) after its first answer: at most that
    // one reaches the client (a 429 is not retried), the rest go to the other replica.
    assert!(refused <= 1, "{refused}");
    assert_eq!(busy.hits.load(Ordering::SeqCst), refused);

    let too_large = grpc_upstream(Grpc::Code(8)).await;
    let r = router(&one_route("b", vec![too_large.addr.to_string()])).await;
    let mut c = Client::connect(r.addr).await;
    for _ in 0..10 {
        assert_eq!(c.infer("e").await.0, "8");
    }
    assert_eq!(too_large.hits.load(Ordering::SeqCst), 10, "never shed");
    let m = r.metrics();
    assert_eq!(
        metric(
            &m,
            r#"serval_router_requests_total{endpoint="e",backend="b",code="413"}"#
        ),
        10.0,
        "the caller's mistake, as REST's 413: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_mirror_compares_answers_and_counts_errors_by_whose_they_are() {
    let three = grpc_upstream(Grpc::Class(3)).await;
    let same = grpc_upstream(Grpc::Class(3)).await;
    let other = grpc_upstream(Grpc::Class(5)).await;
    let broken = grpc_upstream(Grpc::Code(13)).await;
    let failing_primary = grpc_upstream(Grpc::Code(13)).await;
    let mirrored = |endpoint: &str, primary: &str, shadow: &str| {
        let mut r = route(endpoint, &format!("/{endpoint}"), &[(primary, 100)]);
        r["mirror"] = json!({"backend": shadow, "percent": 100});
        r
    };
    let doc = table(
        vec![
            mirrored("agree", "p", "same"),
            mirrored("disagree", "p", "other"),
            mirrored("shadow-fails", "p", "broken"),
            mirrored("primary-fails", "bad", "same"),
        ],
        &[
            ("p", vec![three.addr.to_string()]),
            ("same", vec![same.addr.to_string()]),
            ("other", vec![other.addr.to_string()]),
            ("broken", vec![broken.addr.to_string()]),
            ("bad", vec![failing_primary.addr.to_string()]),
        ],
    );
    let r = router_with(&doc, |c| c.eject_after_failures = 1000).await;
    let mut c = Client::connect(r.addr).await;
    for endpoint in ["agree", "disagree", "shadow-fails"] {
        for _ in 0..10 {
            assert_eq!(c.infer(endpoint).await, ("0".into(), "p".into()));
        }
    }
    for _ in 0..10 {
        assert_eq!(c.infer("primary-fails").await.0, "13");
    }
    let count = |m: &str, endpoint: &str, shadow: &str, kind: &str, result: &str| {
        let label = if kind == "result" { "result" } else { "reason" };
        let family = if kind == "result" {
            "serval_router_mirror_agreement_total"
        } else {
            "serval_router_mirror_errors_total"
        };
        metric(
            m,
            &format!(r#"{family}{{endpoint="{endpoint}",backend="{shadow}",{label}="{result}"}}"#),
        )
    };
    let expect = [
        ("agree", "same", "result", "agree"),
        ("disagree", "other", "result", "disagree"),
        ("shadow-fails", "broken", "reason", "shadow_status"),
        ("primary-fails", "same", "reason", "primary_status"),
    ];
    wait_for("every comparison", || {
        let m = r.metrics();
        expect
            .iter()
            .all(|(e, s, k, res)| count(&m, e, s, k, res) >= 10.0)
    })
    .await;
    let m = r.metrics();
    for (e, s, k, res) in expect {
        assert_eq!(count(&m, e, s, k, res), 10.0, "{e}: {m}");
    }
    // Nothing else was counted: no disagreement from an error, no unreadable answer.
    let total: f64 = m
        .lines()
        .filter(|l| {
            l.starts_with("serval_router_mirror_agreement_total{")
                || l.starts_with("serval_router_mirror_errors_total{")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 40.0, "{m}");
}
