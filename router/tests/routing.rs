//! Matching, rewriting and traffic policies against real upstreams on loopback.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_90_10_over_10000_requests_and_weight_zero_gets_none() {
    let (a, b, z) = (
        upstream("a", answer("x")).await,
        upstream("b", answer("x")).await,
        upstream("z", answer("x")).await,
    );
    let doc = table(
        vec![route(
            "digits",
            "/digits",
            &[("a", 90), ("b", 10), ("z", 0)],
        )],
        &[
            ("a", vec![a.address()]),
            ("b", vec![b.address()]),
            ("z", vec![z.address()]),
        ],
    );
    let r = router(&doc).await;
    let n = 10_000;
    let counts = count_backends(&r, "/v2/models/digits/infer", n, 32).await;
    let share_a = counts.get("a").copied().unwrap_or(0) as f64 / n as f64;
    assert!(
        (share_a - 0.9).abs() <= 0.02,
        "a got {share_a}, counts {counts:?}"
    );
    assert_eq!(
        counts.get("a").unwrap_or(&0) + counts.get("b").unwrap_or(&0),
        n
    );
    assert_eq!(z.hits(), 0, "weight 0 receives nothing");
    assert_eq!(a.hits() + b.hits(), n);
    let m = r.metrics();
    assert_eq!(
        metric(
            &m,
            r#"serval_router_requests_total{endpoint="digits",backend="a",code="200"}"#
        ),
        counts["a"] as f64
    );
}

/// A router with one route, `/digits`, all to upstream `digits-v1`; the upstream must live as
/// long as the router is used.
async fn digits_v1_router(
    tweak: impl FnOnce(&mut serval_router::Config),
) -> (Upstream, TestRouter) {
    let v1 = upstream("digits-v1", answer("x")).await;
    let doc = table(
        vec![route("digits", "/digits", &[("digits-v1", 100)])],
        &[("digits-v1", vec![v1.address()])],
    );
    let r = router_with(&doc, tweak).await;
    (v1, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_rewritten_to_the_chosen_backends_model() {
    let (_v1, r) = digits_v1_router(|_| {}).await;
    let c = client();
    let cases = [
        ("/v2/models/digits/infer", "/v2/models/digits-v1/infer"),
        ("/v2/models/digits", "/v2/models/digits-v1"),
        ("/v1/models/digits:predict", "/v1/models/digits-v1:predict"),
        (
            "/digits/v2/models/digits/infer?x=1",
            "/v2/models/digits-v1/infer?x=1",
        ),
        ("/digits/v2/health", "/v2/health"),
        ("/digits", "/"),
    ];
    for (from, to) in cases {
        let (status, backend, body) = call(&c, c.post(r.url(from)).body(INFER_BODY)).await;
        assert_eq!((status, backend.as_str()), (200, "digits-v1"), "{from}");
        assert_eq!(body["path"], to, "{from}");
    }
    // The protocol's server-wide and readiness paths are the router's own answers, for the
    // whole namespace at its root and for the Endpoint under its prefix or name.
    for (path, want) in [
        ("/v2/health/live", json!({"live": true})),
        ("/v2/health/ready", json!({"ready": true})),
        (
            "/v2/models/digits/ready",
            json!({"name": "digits", "ready": true}),
        ),
        (
            "/digits/v2/health/ready",
            json!({"name": "digits", "ready": true}),
        ),
        ("/digits/v2/health/live", json!({"live": true})),
    ] {
        let (status, backend, body) = call(&c, c.get(r.url(path))).await;
        assert_eq!(
            (status, backend.as_str(), &body),
            (200, "", &want),
            "{path}"
        );
    }
    let (status, _, body) = call(&c, c.get(r.url("/v2"))).await;
    assert_eq!(status, 200);
    assert_eq!(body["name"], "serval-router");
    assert_eq!(body["extensions"], json!(["binary_tensor_data"]));
    let (status, backend, body) = call(&c, c.get(r.url("/nope/v2/models/x"))).await;
    assert_eq!(status, 404);
    assert_eq!(backend, "");
    assert!(body["error"].as_str().unwrap().contains("not found"));
    assert_eq!(
        metric(&r.metrics(), "serval_router_unmatched_requests_total"),
        1.0
    );
}

/// Answered requests start the idle-polling thread (SCHED_IDLE, so on a busy machine it may
/// take a moment to get CPU); its spin time is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_requests_keep_a_cpu_awake_and_count_it() {
    let (_v1, r) = digits_v1_router(|c| c.idle_poll_micros = 200).await;
    let c = client();
    assert_eq!(
        metric(&r.metrics(), "serval_router_idle_poll_seconds_total"),
        0.0,
        "no requests, no spinning"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (status, _, _) = call(
            &c,
            c.post(r.url("/v2/models/digits/infer")).body(INFER_BODY),
        )
        .await;
        assert_eq!(status, 200);
        if metric(&r.metrics(), "serval_router_idle_poll_seconds_total") > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle poller never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_limited_routes_need_their_host() {
    let (a, b) = (
        upstream("a", answer("x")).await,
        upstream("b", answer("x")).await,
    );
    let mut internal = route("internal", "/digits", &[("b", 100)]);
    internal["host"] = json!("internal.example");
    let doc = table(
        vec![route("public", "/digits", &[("a", 100)]), internal],
        &[("a", vec![a.address()]), ("b", vec![b.address()])],
    );
    let r = router(&doc).await;
    let c = client();
    let (_, backend, _) = call(&c, c.get(r.url("/digits/x"))).await;
    assert_eq!(backend, "a");
    let (_, backend, _) = call(
        &c,
        c.get(r.url("/digits/x"))
            .header("host", "Internal.Example:8080"),
    )
    .await;
    assert_eq!(backend, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_overrides_the_split_and_no_ready_backend_is_503() {
    let (v1, v2) = (
        upstream("v1", answer("x")).await,
        upstream("v2", answer("x")).await,
    );
    let mut digits = route("digits", "/digits", &[("v1", 100), ("v2", 0)]);
    digits["matches"] = json!([{"header": "X-Canary", "value": "1", "backend": "v2"}]);
    let doc = table(
        vec![digits, route("off", "/off", &[("v1", 0)])],
        &[("v1", vec![v1.address()]), ("v2", vec![v2.address()])],
    );
    let r = router(&doc).await;
    let c = client();
    for _ in 0..20 {
        let (_, backend, _) = call(
            &c,
            c.post(r.url("/v2/models/digits/infer"))
                .header("x-canary", "1")
                .body(INFER_BODY),
        )
        .await;
        assert_eq!(backend, "v2");
        let (_, backend, _) = call(
            &c,
            c.post(r.url("/v2/models/digits/infer"))
                .header("x-canary", "2")
                .body(INFER_BODY),
        )
        .await;
        assert_eq!(backend, "v1");
    }
    let (status, _, body) = call(&c, c.get(r.url("/off/x"))).await;
    assert_eq!(status, 503);
    assert!(body["error"].as_str().unwrap().contains("no ready backend"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_sessions_stay_put_and_mostly_survive_a_weight_change() {
    let (a, b) = (
        upstream("a", answer("x")).await,
        upstream("b", answer("x")).await,
    );
    let backends = [("a", vec![a.address()]), ("b", vec![b.address()])];
    let sticky = |wa, wb| {
        let mut r = route("s", "/s", &[("a", wa), ("b", wb)]);
        r["stickyHeader"] = json!("x-user");
        table(vec![r], &backends)
    };
    let r = router(&sticky(50, 50)).await;
    let c = client();
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let mut before = HashMap::new();
    for u in &users {
        for _ in 0..4 {
            let (status, backend, _) = call(&c, c.get(r.url("/s/x")).header("x-user", u)).await;
            assert_eq!(status, 200);
            let first = before.entry(u.clone()).or_insert_with(|| backend.clone());
            assert_eq!(*first, backend, "{u} moved without a table change");
        }
    }
    let on_a = before.values().filter(|b| *b == "a").count();
    assert!(
        (100..=200).contains(&on_a),
        "50/50 by hash, got {on_a} of 300 on a"
    );
    r.replace_table(&sticky(70, 30)).await;
    let mut stayed = 0;
    for u in &users {
        let (_, backend, _) = call(&c, c.get(r.url("/s/x")).header("x-user", u)).await;
        if backend == before[u] {
            stayed += 1;
        } else {
            assert_eq!(
                backend, "a",
                "keys only move towards the backend that gained weight"
            );
        }
    }
    // About 20% of keys change hands when 20 points of weight move; a reshuffle would move 50%.
    assert!(stayed >= 210, "only {stayed} of 300 users stayed");
}
