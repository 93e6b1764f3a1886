//! Scale from zero: requests for a Backend scaled to zero are held, bounded in count and by
//! their deadline, and released to its first replica as soon as a table gives it an address.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// A table whose backend `b` is scaled to zero (no address) behind route `/e`.
fn cold(timeout_ms: u64) -> Value {
    let mut r = route("e", "/e", &[("b", 100)]);
    r["timeoutMs"] = json!(timeout_ms);
    let mut doc = table(vec![r], &[("b", vec![])]);
    doc["backends"]["b"]["scaledToZero"] = json!(true);
    doc["backends"]["b"]["ready"] = json!(false);
    doc
}

fn held(r: &TestRouter) -> f64 {
    metric(&r.metrics(), "serval_router_held_requests{backend=\"b\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_backend_at_zero_is_held_until_its_first_replica_is_ready() {
    let r = router(&cold(20_000)).await;
    let c = client();
    let waiting = {
        let (c, url) = (c.clone(), r.url("/e/x"));
        tokio::spawn(async move { call(&c, c.post(url).body(INFER_BODY)).await })
    };
    wait_for("the request is held", || held(&r) == 1.0).await;
    let (status, _, body) = call(&c, c.get(r.url("/-/signals"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["backends"][0]["held"], 1, "{body}");
    assert_eq!(body["backends"][0]["scaledToZero"], true, "{body}");
    // The first replica is ready: the table gives `b` its address.
    let replica = upstream("b", answer("first")).await;
    let mut warm = cold(20_000);
    warm["backends"]["b"] = json!({"model": "b", "addresses": [replica.address()], "ready": true});
    r.replace_table(&warm).await;
    let (status, backend, body) = bounded_call(waiting).await;
    assert_eq!((status, backend.as_str()), (200, "b"), "{body}");
    assert_eq!(body["label"], "first");
    assert_eq!(held(&r), 0.0);
}

async fn bounded_call(t: tokio::task::JoinHandle<(u16, String, Value)>) -> (u16, String, Value) {
    tokio::time::timeout(Duration::from_secs(30), t)
        .await
        .expect("answered in time")
        .expect("task")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_past_its_deadline_gets_503_with_retry_after() {
    let r = router(&cold(300)).await;
    let c = client();
    let started = Instant::now();
    let resp = c
        .post(r.url("/e/x"))
        .body(INFER_BODY)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "held until its deadline"
    );
    let body: Value = serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    let e = body["error"].as_str().unwrap_or_default();
    assert!(e.contains("scaled to zero") && e.contains("300 ms"), "{e}");
    assert_eq!(held(&r), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_hold_bound_get_503_at_once() {
    let r = router_with(&cold(20_000), |c| c.max_held_requests = 1).await;
    let c = client();
    let first = {
        let (c, url) = (c.clone(), r.url("/e/x"));
        tokio::spawn(async move { call(&c, c.post(url).body(INFER_BODY)).await })
    };
    wait_for("one request held", || held(&r) == 1.0).await;
    let (status, _, body) = call(&c, c.post(r.url("/e/x")).body(INFER_BODY)).await;
    assert_eq!(status, 503, "{body}");
    let e = body["error"].as_str().unwrap_or_default();
    assert!(e.contains("holds the most requests"), "{e}");
    // The held one is still served once a replica comes.
    let replica = upstream("b", answer("late")).await;
    let mut warm = cold(20_000);
    warm["backends"]["b"] = json!({"model": "b", "addresses": [replica.address()], "ready": true});
    r.replace_table(&warm).await;
    let (status, _, _) = bounded_call(first).await;
    assert_eq!(status, 200);
}
