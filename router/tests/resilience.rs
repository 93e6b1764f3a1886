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

/// A replica that answered 429 is spared new requests for the window it asked for: they go
/// to another replica, and when every replica refuses work the router answers 429 itself,
/// before the body travels to a replica that would refuse it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_refuse_work_are_spared_and_the_router_sheds_when_all_do() {
    let full = upstream(
        "b",
        Behavior::Overloaded {
            retry_after_ms: 60_000,
        },
    )
    .await;
    let ok = upstream("b", answer("x")).await;
    let full_too = upstream(
        "c",
        Behavior::Overloaded {
            retry_after_ms: 60_000,
        },
    )
    .await;
    let full_also = upstream(
        "c",
        Behavior::Overloaded {
            retry_after_ms: 60_000,
        },
    )
    .await;
    let doc = table(
        vec![
            route("e", "/e", &[("b", 100)]),
            route("f", "/f", &[("c", 100)]),
        ],
        &[
            ("b", vec![full.address(), ok.address()]),
            ("c", vec![full_too.address(), full_also.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    // Until the full replica has answered once, it gets its share; then none for the window
    // (a second at most, the longest honoured).
    while full.hits() == 0 {
        let (status, _, _) = call(&c, c.post(r.url("/e/x")).body(INFER_BODY)).await;
        assert!(status == 200 || status == 429, "{status}");
    }
    let served = ok.hits();
    for _ in 0..20 {
        let (status, backend, _) = call(&c, c.post(r.url("/e/x")).body(INFER_BODY)).await;
        assert_eq!((status, backend.as_str()), (200, "b"));
    }
    assert_eq!(full.hits(), 1, "spared after its 429");
    assert_eq!(ok.hits(), served + 20);
    // Both replicas of c refuse once each; after that the router refuses by itself.
    for _ in 0..10 {
        let (status, _, body) = call(&c, c.post(r.url("/f/x")).body(INFER_BODY)).await;
        assert_eq!(status, 429, "{body}");
    }
    assert_eq!(full_too.hits() + full_also.hits(), 2, "each asked once");
    let resp = c
        .post(r.url("/f/x"))
        .body(INFER_BODY)
        .send()
        .await
        .expect("answer");
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value =
        serde_json::from_slice(&resp.bytes().await.expect("body")).expect("json");
    let e = body["error"].as_str().unwrap_or_default();
    assert!(e.contains("\"c\" is overloaded"), "{e}");
    assert!(
        !r.metrics().contains("serval_router_ejections_total{"),
        "429 is never a replica's failure"
    );
}

/// The autoscaler's snapshot: per Endpoint × Backend the requests answered, the 5xx and 429
/// among them and their summed latency; per Backend its replicas and what is outstanding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signals_snapshot_counts_each_routes_answers_per_backend() {
    let ok = upstream("b", answer("x")).await;
    let broken = upstream("c", Behavior::Status(500)).await;
    let full = upstream("d", Behavior::Overloaded { retry_after_ms: 1 }).await;
    let doc = table(
        vec![
            route("e", "/e", &[("b", 100)]),
            route("f", "/f", &[("c", 100)]),
            route("g", "/g", &[("d", 100)]),
        ],
        &[
            ("b", vec![ok.address()]),
            ("c", vec![broken.address()]),
            ("d", vec![full.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    for (path, n) in [("/e/x", 5), ("/f/x", 2), ("/g/x", 1)] {
        for _ in 0..n {
            call(&c, c.post(r.url(path)).body(INFER_BODY)).await;
        }
    }
    let (status, _, body) = call(&c, c.get(r.url("/-/signals"))).await;
    assert_eq!(status, 200, "{body}");
    let s: serval_api::signals::RouterSignals = serde_json::from_value(body).expect("snapshot");
    let route = |endpoint: &str| {
        s.routes
            .iter()
            .find(|x| x.endpoint == endpoint)
            .cloned()
            .unwrap_or_else(|| panic!("no {endpoint} in {:?}", s.routes))
    };
    let (e, f, g) = (route("e"), route("f"), route("g"));
    assert_eq!((e.backend.as_str(), e.requests, e.errors), ("b", 5, 0));
    assert!(e.latency_seconds > 0.0);
    assert_eq!((f.requests, f.errors), (2, 2));
    assert_eq!((g.requests, g.errors, g.overloaded), (1, 0, 1));
    let backends: Vec<_> = s
        .backends
        .iter()
        .map(|b| (b.backend.as_str(), b.replicas, b.inflight))
        .collect();
    assert_eq!(backends, vec![("b", 1, 0), ("c", 1, 0), ("d", 1, 0)]);
    assert!(!s.revision.is_empty());
}
