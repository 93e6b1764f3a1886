//! Loopback tests of the batcher through the real server: every caller gets its own rows,
//! large requests are split, a full queue answers 429 at once, deadlines answer 504, callers
//! that left are dropped before inference, and a shutdown loses no accepted request.
//!
//! Tests that need a full queue hold dispatch with `Batcher::set_paused` rather than racing
//! the workers, so nothing here depends on timing.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

/// Waits until a server shutting down reports itself not ready.
async fn wait_not_ready(c: &reqwest::Client, s: &serval_sidecar::Sidecar) {
    bounded("not ready", async {
        while send(c.get(format!("{}/v2/health/ready", base(s))))
            .await
            .status
            != 503
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

fn row(k: usize) -> [f32; 4] {
    let k = k as f32;
    [k, k + 0.25, k + 0.5, k + 0.75]
}

/// Sends `rows` on a fresh task; returns the answer.
fn spawn_infer(url: String, rows: Vec<[f32; 4]>, binary: bool) -> tokio::task::JoinHandle<Answer> {
    tokio::spawn(async move {
        let c = client();
        if binary {
            let head = json!({
                "inputs": [{"name": "x", "shape": [rows.len(), 4], "datatype": "FP32",
                            "parameters": {"binary_data_size": rows.len() * 16}}],
                "parameters": {"binary_data_output": false}
            })
            .to_string();
            let mut body = head.as_bytes().to_vec();
            rows.iter()
                .flatten()
                .for_each(|v| body.extend_from_slice(&v.to_le_bytes()));
            send(
                c.post(&url)
                    .header("Inference-Header-Content-Length", head.len().to_string())
                    .body(body),
            )
            .await
        } else {
            send(c.post(&url).json_body(&identity_request(&rows))).await
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_callers_each_get_their_own_rows() {
    let s = start(identity_config()).await;
    let url = format!("{}/v2/models/identity/infer", base(&s));
    let callers: Vec<_> = (0..200)
        .map(|i| {
            // Mixed sizes (1..=3 rows, and some over the max batch of 8) and both encodings.
            let n = if i % 50 == 0 { 11 } else { 1 + i % 3 };
            let rows: Vec<[f32; 4]> = (0..n).map(|r| row(i * 100 + r)).collect();
            (rows.clone(), spawn_infer(url.clone(), rows, i % 2 == 0))
        })
        .collect();
    for (rows, task) in callers {
        let a = bounded("caller", task).await.expect("task");
        assert_eq!(a.status, 200, "{}", a.json);
        let want: Vec<f32> = rows.iter().flatten().copied().collect();
        assert_eq!(output_f32(&a.json, 0), want);
        assert_eq!(a.json["outputs"][0]["shape"], json!([rows.len(), 4]));
    }
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_requests_form_batches_and_large_ones_are_split() {
    let s = start(identity_config()).await;
    let model = s.model().expect("model");
    let url = format!("{}/v2/models/identity/infer", base(&s));
    model.batcher.set_paused(true);
    let small: Vec<_> = (0..12)
        .map(|i| spawn_infer(url.clone(), vec![row(i)], false))
        .collect();
    let big_rows: Vec<[f32; 4]> = (0..21).map(|r| row(1000 + r)).collect();
    let big = spawn_infer(url.clone(), big_rows.clone(), true);
    wait_until("33 rows queued", || model.batcher.queued_rows() == 33).await;
    model.batcher.set_paused(false);
    for (i, t) in small.into_iter().enumerate() {
        let a = bounded("small", t).await.expect("task");
        assert_eq!(output_f32(&a.json, 0), row(i).to_vec());
    }
    let a = bounded("big", big).await.expect("task");
    assert_eq!(
        output_f32(&a.json, 0),
        big_rows.iter().flatten().copied().collect::<Vec<_>>()
    );
    // 33 queued rows with a max batch of 8: at least one batch of more than 4 rows ran.
    let text = String::from_utf8(
        send(client().get(format!("{}/metrics", base(&s))))
            .await
            .bytes
            .to_vec(),
    )
    .expect("utf8");
    let total = metric(&text, "serval_batch_size_count{");
    let up_to_four = metric(
        &text,
        "serval_batch_size_bucket{le=\"4.0\",model=\"identity\"}",
    );
    assert!(total > up_to_four, "no batch above 4 rows:\n{text}");
    assert_eq!(metric(&text, "serval_batch_size_sum{"), 33.0);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

/// A small model with a free run slot per I/O thread never queues for a worker; under
/// concurrency its requests still share batches, gathered on the thread that read them. On one
/// runtime thread this is deterministic: every submitter queues and yields before the first
/// resumes and leads.
#[tokio::test(flavor = "current_thread")]
async fn concurrent_small_requests_share_gathered_batches() {
    use serval_sidecar::batcher::{Batcher, BatcherLimits};
    use serval_sidecar::engine::Engine;
    use serval_sidecar::metrics::Metrics;
    use tract_onnx::prelude::Tensor;

    let bytes = std::fs::read(model("identity.onnx")).expect("identity model");
    let mut engine = Engine::load(&bytes).expect("load");
    engine
        .prepare(8, false, Duration::from_millis(2), Duration::ZERO)
        .expect("plans 1, 2, 4, 8");
    let metrics = Arc::new(Metrics::new("identity"));
    let limits = BatcherLimits {
        max_batch: 8,
        max_queue: 64,
        max_queue_delay: Duration::from_secs(1),
        workers: 2,
        inline_max_run: Duration::from_secs(1),
    };
    let batcher =
        Arc::new(Batcher::start(Arc::new(engine), metrics.clone(), limits).expect("start"));
    // Worker threads that have not reached their wait yet would take whatever is queued
    // when they get there; give them time (the rounds after the first never race them).
    std::thread::sleep(Duration::from_millis(200));
    for round in 0..2 {
        let callers: Vec<_> = (round * 16..round * 16 + 16)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    let r = row(i);
                    let input = Tensor::from_shape(&[1, 4], &r).expect("tensor");
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    let out = batcher
                        .submit(vec![input], deadline, true)
                        .expect("admitted")
                        .wait()
                        .await
                        .expect("answered");
                    let got = out[0].to_plain_array_view::<f32>().expect("f32");
                    assert_eq!(got.iter().copied().collect::<Vec<_>>(), r, "caller {i}");
                })
            })
            .collect();
        for task in callers {
            bounded("caller", task)
                .await
                .expect("every caller got its own row");
        }
    }
    let text = metrics.encode();
    assert_eq!(metric(&text, "serval_batch_size_sum{"), 32.0);
    let batches = metric(&text, "serval_batch_size_count{");
    let up_to_four = metric(
        &text,
        "serval_batch_size_bucket{le=\"4.0\",model=\"identity\"}",
    );
    assert!(
        batches > up_to_four,
        "2 x 16 concurrent single-row requests never formed a batch of 8:\n{text}"
    );
    batcher.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_queue_answers_429_at_once_and_stays_bounded() {
    let mut cfg = identity_config();
    cfg.max_queue = 8;
    let s = start(cfg).await;
    let model = s.model().expect("model");
    let url = format!("{}/v2/models/identity/infer", base(&s));
    model.batcher.set_paused(true);
    let accepted: Vec<_> = (0..4)
        .map(|i| spawn_infer(url.clone(), vec![row(i), row(i + 50)], false))
        .collect();
    wait_until("8 rows queued", || model.batcher.queued_rows() == 8).await;
    // While dispatch is held, every further request must be answered now, not queued.
    let rejected: Vec<_> = (0..50)
        .map(|i| spawn_infer(url.clone(), vec![row(100 + i)], i % 2 == 0))
        .collect();
    for t in rejected {
        let a = bounded("rejection", t).await.expect("task");
        assert_eq!(a.status, 429, "{}", a.json);
        assert_eq!(a.headers["retry-after"], "1");
        assert!(
            a.json["error"]
                .as_str()
                .is_some_and(|e| e.contains("queue full"))
        );
        assert!(model.batcher.queued_rows() <= 8);
    }
    model.batcher.set_paused(false);
    for (i, t) in accepted.into_iter().enumerate() {
        let a = bounded("accepted", t).await.expect("task");
        assert_eq!(a.status, 200);
        assert_eq!(output_f32(&a.json, 0), [row(i), row(i + 50)].concat());
    }
    let text = String::from_utf8(
        send(client().get(format!("{}/metrics", base(&s))))
            .await
            .bytes
            .to_vec(),
    )
    .expect("utf8");
    assert_eq!(
        metric(
            &text,
            "serval_rejections_total{model=\"identity\",reason=\"queue_full\"}"
        ),
        50.0
    );
    assert_eq!(
        metric(
            &text,
            "serval_requests_total{model=\"identity\",code=\"429\"}"
        ),
        50.0
    );
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deadlines_answer_504_and_departed_callers_are_dropped_before_inference() {
    let s = start(identity_config()).await;
    let model = s.model().expect("model");
    let url = format!("{}/v2/models/identity/infer", base(&s));
    model.batcher.set_paused(true);
    let a = send(
        client()
            .post(&url)
            .header("serval-deadline-ms", "50")
            .json_body(&identity_request(&[row(1)])),
    )
    .await;
    assert_eq!(a.status, 504, "{}", a.json);
    assert!(
        a.json["error"]
            .as_str()
            .is_some_and(|e| e.contains("deadline"))
    );
    // A caller that gives up once its rows are queued: they are dropped without a model run.
    let gone = spawn_infer(url.clone(), vec![row(2), row(3)], false);
    wait_until("2 rows queued", || model.batcher.queued_rows() == 2).await;
    gone.abort();
    assert!(gone.await.is_err_and(|e| e.is_cancelled()));
    wait_until("the server saw the caller leave", || {
        s.state().inflight() == 0
    })
    .await;
    model.batcher.set_paused(false);
    wait_until("queue empty", || model.batcher.queued_rows() == 0).await;
    let ok = send(client().post(&url).json_body(&identity_request(&[row(4)]))).await;
    assert_eq!(ok.status, 200);
    let text = String::from_utf8(
        send(client().get(format!("{}/metrics", base(&s))))
            .await
            .bytes
            .to_vec(),
    )
    .expect("utf8");
    // Only the last request reached the model.
    assert_eq!(metric(&text, "serval_batch_size_sum{"), 1.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "serval_requests_total{model=\"identity\",code=\"504\"}"
        ),
        1.0
    );
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_finishes_every_accepted_request_and_refuses_new_ones() {
    let s = Arc::new(start(identity_config()).await);
    let model = s.model().expect("model");
    let url = format!("{}/v2/models/identity/infer", base(&s));
    model.batcher.set_paused(true);
    let accepted: Vec<_> = (0..20)
        .map(|i| spawn_infer(url.clone(), vec![row(i)], i % 2 == 1))
        .collect();
    wait_until("20 rows queued", || model.batcher.queued_rows() == 20).await;
    s.shutdown();
    let c = client();
    wait_not_ready(&c, &s).await;
    let late = send(c.post(&url).json_body(&identity_request(&[row(99)]))).await;
    assert_eq!(late.status, 503, "{}", late.json);
    assert_eq!(late.headers["retry-after"], "1");
    assert_eq!(late.headers["connection"], "close");
    model.batcher.set_paused(false);
    for (i, t) in accepted.into_iter().enumerate() {
        let a = bounded("accepted", t).await.expect("task");
        assert_eq!(a.status, 200, "{}", a.json);
        assert_eq!(output_f32(&a.json, 0), row(i).to_vec());
    }
    let s = Arc::into_inner(s).expect("sole owner");
    bounded("server stops", s.wait()).await;
}

/// Through the drain delay a replica shutting down is not ready but still serves: a load
/// balancer (kube-proxy, a router's pooled connection) keeps sending until it sees the replica
/// gone, and those requests must not fail. Each answer closes its connection, so the client's
/// next request goes elsewhere. (Past the delay new requests are refused: the test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutting_down_replica_serves_through_the_drain_delay_closing_connections() {
    let mut cfg = identity_config();
    cfg.drain_delay = Duration::from_millis(1500);
    let s = start(cfg).await;
    let url = format!("{}/v2/models/identity/infer", base(&s));
    let c = client();
    let before = send(c.post(&url).json_body(&identity_request(&[row(1)]))).await;
    assert_eq!(before.status, 200);
    assert!(before.headers.get("connection").is_none());
    let shut = std::time::Instant::now();
    s.shutdown();
    wait_not_ready(&c, &s).await;
    let during = send(c.post(&url).json_body(&identity_request(&[row(2)]))).await;
    assert!(
        shut.elapsed() < Duration::from_millis(1500),
        "the check came too late"
    );
    assert_eq!(during.status, 200, "{}", during.json);
    assert_eq!(output_f32(&during.json, 0), row(2).to_vec());
    assert_eq!(during.headers["connection"], "close");
    // Nothing in flight: the server stops at the end of the delay, not before.
    bounded("server stops", s.wait()).await;
    assert!(
        shut.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        shut.elapsed()
    );
}
