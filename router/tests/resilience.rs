//! Failures: dead upstreams, timeouts, retries, ejection.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_is_retried_elsewhere_then_ejected() {
    let live = upstream("b", answer("x")).await;
    let dead = dead_address().await;
    let mut rt = route("e", "/e", &[("b", 100)]);
    rt["retries"] = json!({"attempts": 2, "budgetPercent": 50});
    let r = router(&table(
        vec![rt],
        &[("b", vec![dead.clone(), live.address()])],
    ))
    .await;
    let c = client();
    for _ in 0..60 {
        let (status, backend, _) =
            call(&c, c.post(r.url("/v2/models/e/infer")).body(INFER_BODY)).await;
        assert_eq!((status, backend.as_str()), (200, "b"));
    }
    assert_eq!(live.hits(), 60);
    let m = r.metrics();
    assert!(
        metric(
            &m,
            r#"serval_router_upstream_errors_total{endpoint="e",backend="b",kind="connect"}"#
        ) >= 1.0
    );
    assert!(
        metric(
            &m,
            r#"serval_router_retries_total{endpoint="e",backend="b"}"#
        ) >= 1.0
    );
    let ejected = format!(r#"serval_router_ejections_total{{backend="b",address="{dead}"}}"#);
    assert_eq!(metric(&m, &ejected), 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_dead_upstream_is_answered_502_fast_and_never_ejected() {
    let dead = dead_address().await;
    let r = router(&table(
        vec![route("e", "/e", &[("b", 100)])],
        &[("b", vec![dead])],
    ))
    .await;
    let c = client();
    for _ in 0..10 {
        let start = Instant::now();
        let (status, backend, body) = call(&c, c.post(r.url("/e/infer")).body(INFER_BODY)).await;
        assert_eq!((status, backend.as_str()), (502, "b"));
        assert!(body["error"].as_str().unwrap().contains("unreachable"));
        // Generous bound: refused connections on loopback fail in microseconds.
        assert!(start.elapsed() < Duration::from_secs(2));
    }
    assert!(
        !r.metrics().contains("serval_router_ejections_total{"),
        "the last address stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_503_is_retried_but_other_errors_pass_through() {
    let busy = upstream("b", Behavior::Status(503)).await;
    let ok = upstream("b", answer("x")).await;
    let broken = upstream("c", Behavior::Status(500)).await;
    let mut rb = route("e", "/e", &[("b", 100)]);
    rb["retries"] = json!({"attempts": 3, "budgetPercent": 100});
    let doc = table(
        vec![rb, route("f", "/f", &[("c", 100)])],
        &[
            ("b", vec![busy.address(), ok.address()]),
            ("c", vec![broken.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    for _ in 0..20 {
        let (status, _, _) = call(&c, c.post(r.url("/e/x")).body(INFER_BODY)).await;
        assert_eq!(status, 200);
    }
    let (status, backend, body) = call(&c, c.post(r.url("/f/x")).body(INFER_BODY)).await;
    assert_eq!((status, backend.as_str()), (500, "c"));
    assert_eq!(body["backend"], "c", "the upstream's own error body");
    assert_eq!(broken.hits(), 1, "500 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_answers_504() {
    let slow_up = upstream("s", slow("x", Duration::from_secs(5))).await;
    let mut rt = route("e", "/e", &[("s", 100)]);
    rt["timeoutMs"] = json!(300);
    let r = router(&table(vec![rt], &[("s", vec![slow_up.address()])])).await;
    let c = client();
    let (status, backend, body) =
        call(&c, c.post(r.url("/v2/models/e/infer")).body(INFER_BODY)).await;
    assert_eq!((status, backend.as_str()), (504, "s"));
    assert!(body["error"].as_str().unwrap().contains("300 ms"));
    assert_eq!(
        metric(
            &r.metrics(),
            r#"serval_router_upstream_errors_total{endpoint="e",backend="s",kind="timeout"}"#
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_lets_in_flight_requests_finish() {
    let slow_up = upstream("s", slow("x", Duration::from_millis(800))).await;
    let mut r = router(&table(
        vec![route("e", "/e", &[("s", 100)])],
        &[("s", vec![slow_up.address()])],
    ))
    .await;
    let c = client();
    let inflight = tokio::spawn({
        let (c, url) = (c.clone(), r.url("/e/x"));
        async move { call(&c, c.get(url)).await }
    });
    wait_for("request in flight", || slow_up.hits() == 1).await;
    r.shutdown();
    wait_for("readiness to drop", || !r.state.is_ready()).await;
    let (status, _, _) = inflight.await.unwrap();
    assert_eq!(status, 200);
    tokio::time::timeout(Duration::from_secs(10), &mut r.done)
        .await
        .unwrap()
        .unwrap();
}
