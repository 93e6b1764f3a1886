//! Composed routes against programmable model servers: an ensemble's reduction and its
//! failing members, a sequence's hand-over (binary tensors passed on byte for byte), the
//! deadline carried across stages, and a stage that is another Endpoint with its own split.
#![allow(clippy::unwrap_used)] // test fixtures: a failed step should panic the test

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// What a fake model server answers: status, extra headers, body, after a delay.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    delay: Duration,
}

fn ok_json(v: Value) -> Reply {
    Reply {
        status: 200,
        headers: vec![("content-type", "application/json".to_owned())],
        body: v.to_string().into_bytes(),
        delay: Duration::ZERO,
    }
}

/// OIP JSON probabilities `p` of shape [rows, 2].
fn probs(rows: &[[f64; 2]]) -> Reply {
    ok_json(
        json!({"model_name": "m", "outputs": [{"name": "p", "datatype": "FP32",
        "shape": [rows.len(), 2], "data": rows.iter().flatten().collect::<Vec<_>>()}]}),
    )
}

type Handler = Arc<dyn Fn(&HeaderMap, &[u8]) -> Reply + Send + Sync>;

/// A model server answering with `handler`, recording every request's headers and body.
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Fake {
    fn address(&self) -> String {
        self.addr.to_string()
    }
    fn seen(&self) -> Vec<(HeaderMap, Bytes)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake(handler: impl Fn(&HeaderMap, &[u8]) -> Reply + Send + Sync + 'static) -> Fake {
    let handler: Handler = Arc::new(handler);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (h, s) = (handler.clone(), s.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (h, s) = (h.clone(), s.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        s.lock()
                            .unwrap()
                            .push((parts.headers.clone(), body.clone()));
                        let reply = h(&parts.headers, &body);
                        tokio::time::sleep(reply.delay).await;
                        let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
                        *resp.status_mut() = hyper::StatusCode::from_u16(reply.status).unwrap();
                        for (k, v) in reply.headers {
                            resp.headers_mut().insert(k, v.parse().unwrap());
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
    Fake { addr, seen, task }
}

fn composed(endpoint: &str, prefix: &str, timeout_ms: u64, key: &str, plan: Value) -> Value {
    let mut r = route(endpoint, prefix, &[]);
    r["timeoutMs"] = json!(timeout_ms);
    r[key] = plan;
    r
}

const TWO_ROWS: &str =
    r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}"#;

async fn post(c: &reqwest::Client, url: String, body: &'static str) -> (u16, Value, Duration) {
    let start = Instant::now();
    let (status, _, v) = call(c, c.post(url).body(body)).await;
    (status, v, start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_reduces_its_members_rows_and_leaves_out_those_that_fail() {
    let a = fake(|_, _| probs(&[[0.9, 0.1], [0.4, 0.6]])).await;
    let b = fake(|_, _| probs(&[[0.7, 0.3], [0.2, 0.8]])).await;
    let broken = fake(|_, _| Reply {
        status: 500,
        headers: vec![],
        body: br#"{"error":"model crashed"}"#.to_vec(),
        delay: Duration::ZERO,
    })
    .await;
    let late = fake(|_, _| Reply {
        delay: Duration::from_secs(3),
        ..probs(&[[0.0, 1.0], [0.0, 1.0]])
    })
    .await;
    let table_with = |reduce: &str, members: &[&str], min: u32| {
        table(
            vec![composed(
                "ens",
                "/ens",
                400,
                "ensemble",
                json!({"backends": members, "output": "p", "reduce": reduce, "minResponses": min}),
            )],
            &[
                ("a", vec![a.address()]),
                ("b", vec![b.address()]),
                ("broken", vec![broken.address()]),
                ("late", vec![late.address()]),
            ],
        )
    };
    let r = router(&table_with("Mean", &["a", "b", "broken"], 2)).await;
    let c = client();
    let url = r.url("/ens/v2/models/ens/infer");

    // The broken member is left out: the mean of a and b, and a label per row.
    let (status, v, _) = post(&c, url.clone(), TWO_ROWS).await;
    assert_eq!(status, 200, "{v}");
    let p: Vec<f64> = serde_json::from_value(v["outputs"][0]["data"].clone()).unwrap();
    let want = [0.8, 0.2, 0.3, 0.7];
    assert!(
        p.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-6),
        "{p:?}"
    );
    assert_eq!(v["outputs"][1]["name"], "label");
    assert_eq!(v["outputs"][1]["data"], json!([0, 1]));
    assert_eq!(v["parameters"]["serval_members"], json!(["a", "b"]));
    let m = r.metrics();
    assert_eq!(
        metric(
            &m,
            "serval_router_composition_stage_failures_total{endpoint=\"ens\",stage=\"broken\"}"
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "serval_router_composition_stage_duration_seconds_count{endpoint=\"ens\",stage=\"a\"}"
        ),
        1.0
    );

    // Needing all three, the ensemble cannot answer: 502 naming the member and why.
    r.replace_table(&table_with("Mean", &["a", "b", "broken"], 3))
        .await;
    let (status, v, _) = post(&c, url.clone(), TWO_ROWS).await;
    assert_eq!(status, 502);
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.contains("2 of 3") && msg.contains("broken: status 500"),
        "{msg}"
    );

    // A member past the deadline is left out when the others suffice: answered at the
    // deadline (400 ms), not after the late member's 3 s.
    r.replace_table(&table_with("Vote", &["late", "a", "b"], 2))
        .await;
    let (status, v, took) = post(&c, url.clone(), TWO_ROWS).await;
    assert_eq!(status, 200, "{v}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(v["parameters"]["serval_members"], json!(["a", "b"]));
    // A vote: both members choose class 0 in row 0 and class 1 in row 1.
    assert_eq!(v["outputs"][0]["data"], json!([1.0, 0.0, 0.0, 1.0]));
    assert_eq!(v["outputs"][1]["data"], json!([0, 1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_mistake_is_the_ensembles_answer_and_counts_against_no_member() {
    let bad = || {
        fake(|_, _| Reply {
            status: 400,
            headers: vec![("content-type", "application/json".to_owned())],
            body: br#"{"error":"input x has 3 values for shape [2, 2]"}"#.to_vec(),
            delay: Duration::ZERO,
        })
    };
    let (a, b) = (bad().await, bad().await);
    let doc = table(
        vec![composed(
            "ens",
            "/ens",
            1000,
            "ensemble",
            json!({"backends": ["a", "b"], "output": "p", "reduce": "Mean", "minResponses": 2}),
        )],
        &[("a", vec![a.address()]), ("b", vec![b.address()])],
    );
    let r = router(&doc).await;
    let c = client();
    let (status, v, _) = post(&c, r.url("/ens/v2/models/ens/infer"), TWO_ROWS).await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("3 values"), "{v}");
    let m = r.metrics();
    assert_eq!(
        metric(&m, "serval_router_upstream_errors_total"),
        0.0,
        "{m}"
    );
    assert_eq!(metric(&m, "serval_router_ejections_total"), 0.0);
}

fn deadline_of(h: &HeaderMap) -> u64 {
    h.get("serval-deadline-ms")
        .expect("every call carries the time left")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_gets_only_the_time_left_and_the_deadline_bounds_them_all() {
    // Step 1 takes 300 ms; step 2 is told what is left of the 1,000 ms.
    let first = fake(|_, _| Reply {
        delay: Duration::from_millis(300),
        ..probs(&[[0.5, 0.5]])
    })
    .await;
    let second = fake(|_, _| probs(&[[0.1, 0.9]])).await;
    let doc = table(
        vec![composed(
            "seq",
            "/seq",
            1000,
            "sequence",
            json!({"steps": [{"backend": "one"}, {"backend": "two"}]}),
        )],
        &[
            ("one", vec![first.address()]),
            ("two", vec![second.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    let (status, v, _) = post(&c, r.url("/seq/v2/models/seq/infer"), TWO_ROWS).await;
    assert_eq!(status, 200, "{v}");
    let one = deadline_of(&first.seen()[0].0);
    let two = deadline_of(&second.seen()[0].0);
    assert!((900..=1000).contains(&one), "step 1 was given {one} ms");
    assert!(
        two <= 700 && two > 0,
        "step 2 was given {two} ms after 300 ms spent"
    );

    // A client's own shorter deadline is kept.
    let (status, _, _) = call(
        &c,
        c.post(r.url("/seq/v2/models/seq/infer"))
            .header("serval-deadline-ms", "500")
            .body(TWO_ROWS),
    )
    .await;
    assert_eq!(status, 200);
    assert!(deadline_of(&first.seen()[1].0) <= 500);

    // A cascade whose first stage outlasts the deadline: 504 at the deadline, and the next
    // stage is never called.
    let slow = fake(|_, _| Reply {
        delay: Duration::from_secs(2),
        ..probs(&[[0.5, 0.5]])
    })
    .await;
    let after = fake(|_, _| probs(&[[0.1, 0.9]])).await;
    let doc = table(
        vec![composed(
            "cas",
            "/cas",
            300,
            "cascade",
            json!({"output": "p", "stages": [{"backend": "slow", "minConfidence": 0.9}, {"backend": "after"}]}),
        )],
        &[
            ("slow", vec![slow.address()]),
            ("after", vec![after.address()]),
        ],
    );
    r.replace_table(&doc).await;
    let (status, v, took) = post(&c, r.url("/cas/v2/models/cas/infer"), TWO_ROWS).await;
    assert_eq!(status, 504, "{v}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(after.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sequence_hands_outputs_on_as_inputs_and_binary_tensors_byte_for_byte() {
    // Step 1 answers JSON; step 2, asked for binary, answers two binary outputs; step 3 takes
    // one of them under another name, and answers the client in JSON as it asked.
    let one = fake(|_, _| {
        ok_json(json!({"outputs": [{"name": "features", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}]}))
    })
    .await;
    let tensor: Vec<u8> = [0.25f32, -1.5, 3.0, 8.0]
        .iter()
        .flat_map(|f| f.to_le_bytes())
        .collect();
    let ids: Vec<u8> = [7i64, 9].iter().flat_map(|i| i.to_le_bytes()).collect();
    let (t, i) = (tensor.clone(), ids.clone());
    let two = fake(move |_, _| {
        let header = json!({"outputs": [
            {"name": "ids", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}},
            {"name": "embedding", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}
        ]})
        .to_string();
        Reply {
            status: 200,
            headers: vec![
                ("content-type", "application/octet-stream".to_owned()),
                ("inference-header-content-length", header.len().to_string()),
            ],
            body: [header.into_bytes(), i.clone(), t.clone()].concat(),
            delay: Duration::ZERO,
        }
    })
    .await;
    let three = fake(|_, _| probs(&[[0.2, 0.8], [0.6, 0.4]])).await;
    let doc = table(
        vec![composed(
            "seq",
            "/seq",
            2000,
            "sequence",
            json!({"steps": [
                {"backend": "one"},
                {"backend": "two", "inputs": {"x": "features"}},
                {"backend": "three", "inputs": {"emb": "embedding"}}
            ]}),
        )],
        &[
            ("one", vec![one.address()]),
            ("two", vec![two.address()]),
            ("three", vec![three.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    let (status, v, _) = post(&c, r.url("/seq/v2/models/seq/infer"), TWO_ROWS).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["outputs"][0]["data"], json!([0.2, 0.8, 0.6, 0.4]));

    // Step 1 got the client's body as it was.
    assert_eq!(one.seen()[0].1, TWO_ROWS.as_bytes());
    // Step 2: step 1's output as its input `x`, in JSON, asked to answer in binary, at the
    // inference path of its model.
    let (_, body) = &two.seen()[0];
    let sent: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        sent,
        json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1.0, 2.0, 3.0, 4.0]}],
            "parameters": {"binary_data_output": true}})
    );
    // Step 3: the embedding's bytes exactly as step 2 sent them, never decoded.
    let (headers, body) = &three.seen()[0];
    let n: usize = headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&body[..n]).unwrap();
    assert_eq!(
        head,
        json!({"inputs": [{"name": "emb", "datatype": "FP32", "shape": [2, 2],
            "parameters": {"binary_data_size": 16}}]})
    );
    assert_eq!(&body[n..], &tensor[..]);
    assert_eq!(headers["content-type"], "application/octet-stream");

    // A step that answers no tensors cannot feed the next: 502 naming it.
    let labels = fake(|_, _| ok_json(json!({"label": "seven", "score": 0.9}))).await;
    let mut doc = doc;
    doc["backends"]["one"]["addresses"] = json!([labels.address()]);
    r.replace_table(&doc).await;
    let (status, v, _) = post(&c, r.url("/seq/v2/models/seq/infer"), TWO_ROWS).await;
    assert_eq!(status, 502);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("cannot feed the next step"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascade_stage_that_is_an_endpoint_applies_that_endpoints_split() {
    // The first stage is never sure, so every request reaches the `large` Endpoint, which
    // splits 50/50 over two Backends and counts the calls as its own requests.
    let small = fake(|_, _| probs(&[[0.5, 0.5]])).await;
    let large_a = fake(|_, _| probs(&[[0.99, 0.01]])).await;
    let large_b = fake(|_, _| probs(&[[0.01, 0.99]])).await;
    let doc = table(
        vec![
            composed(
                "digits",
                "/digits",
                2000,
                "cascade",
                json!({"output": "p", "stages": [
                    {"backend": "small", "minConfidence": 0.9}, {"endpoint": "large"}]}),
            ),
            route("large", "/large", &[("large-a", 50), ("large-b", 50)]),
        ],
        &[
            ("small", vec![small.address()]),
            ("large-a", vec![large_a.address()]),
            ("large-b", vec![large_b.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    let mut by = std::collections::HashMap::new();
    for _ in 0..200 {
        let (status, backend, v) = call(
            &c,
            c.post(r.url("/digits/v2/models/digits/infer"))
                .body(INFER_BODY),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        *by.entry(backend).or_insert(0) += 1;
    }
    let (a, b) = (by["large-a"], by["large-b"]);
    assert_eq!(a + b, 200, "{by:?}");
    assert!((70..=130).contains(&a), "{by:?}");
    let m = r.metrics();
    let large = metric(
        &m,
        "serval_router_requests_total{endpoint=\"large\",backend=\"large-a\",code=\"200\"}",
    ) + metric(
        &m,
        "serval_router_requests_total{endpoint=\"large\",backend=\"large-b\",code=\"200\"}",
    );
    assert_eq!(large, 200.0, "{m}");
    assert_eq!(
        metric(
            &m,
            "serval_router_cascade_rows_total{endpoint=\"digits\",backend=\"small\",outcome=\"escalated\"}"
        ),
        200.0
    );
    // Ready as a whole: its first stage is.
    let (status, _, v) = call(&c, c.get(r.url("/digits/v2/health/ready"))).await;
    assert_eq!(status, 200, "{v}");
}
