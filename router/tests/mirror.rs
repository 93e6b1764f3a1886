//! Shadow traffic: never changes the primary's answer, and its agreement is counted.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn mirrored(endpoint: &str, primary: &str, shadow: &str, timeout_ms: u64) -> serde_json::Value {
    let mut r = route(endpoint, &format!("/{endpoint}"), &[(primary, 100)]);
    r["mirror"] = json!({"backend": shadow, "percent": 100});
    r["timeoutMs"] = json!(timeout_ms);
    r
}

/// Rows counted as `agree`/`disagree`, or requests not compared for a reason (`shadow_timeout`,
/// `dropped`, ...).
fn outcome(m: &str, endpoint: &str, shadow: &str, result: &str) -> f64 {
    let series = if matches!(result, "agree" | "disagree") {
        format!(
            r#"serval_router_mirror_agreement_total{{endpoint="{endpoint}",backend="{shadow}",result="{result}"}}"#
        )
    } else {
        format!(
            r#"serval_router_mirror_errors_total{{endpoint="{endpoint}",backend="{shadow}",reason="{result}"}}"#
        )
    };
    metric(m, &series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_are_compared_and_never_affect_the_primary() {
    let primary = upstream("p", answer("seven")).await;
    let same = upstream("same", answer("seven")).await;
    let other = upstream("other", answer("one")).await;
    let sleepy = upstream("sleepy", slow("seven", Duration::from_secs(30))).await;
    let dead = dead_address().await;
    // A shadow that refuses the request (a different preprocess: 415).
    let picky = upstream("picky", Behavior::Status(415)).await;
    let doc = table(
        vec![
            mirrored("agree", "p", "same", 5000),
            mirrored("disagree", "p", "other", 5000),
            mirrored("slow", "p", "sleepy", 1500),
            mirrored("dead", "p", "gone", 5000),
            mirrored("refused", "p", "picky", 5000),
        ],
        &[
            ("p", vec![primary.address()]),
            ("same", vec![same.address()]),
            ("other", vec![other.address()]),
            ("sleepy", vec![sleepy.address()]),
            ("gone", vec![dead]),
            ("picky", vec![picky.address()]),
        ],
    );
    let r = router(&doc).await;
    let c = client();
    let n = 10;
    for endpoint in ["agree", "disagree", "slow", "dead", "refused"] {
        let start = Instant::now();
        for _ in 0..n {
            let (status, backend, body) = call(
                &c,
                c.post(r.url(&format!("/v2/models/{endpoint}/infer")))
                    .body(INFER_BODY),
            )
            .await;
            assert_eq!((status, backend.as_str()), (200, "p"), "{endpoint}");
            assert_eq!(body["label"], "seven");
        }
        // Generous: a primary waiting on the 30 s shadow even once would take 1.5 s (and 504).
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{endpoint}: primaries were delayed"
        );
    }
    let expect = [
        ("agree", "same", "agree"),
        ("disagree", "other", "disagree"),
        ("slow", "sleepy", "shadow_timeout"),
        ("dead", "gone", "shadow_unreachable"),
        // Counted apart from disagreement, with its reason.
        ("refused", "picky", "shadow_status"),
    ];
    for (endpoint, shadow, result) in expect {
        wait_for(&format!("{endpoint} mirror outcomes"), || {
            outcome(&r.metrics(), endpoint, shadow, result) == n as f64
        })
        .await;
    }
    let m = r.metrics();
    for (endpoint, shadow) in [("slow", "sleepy"), ("dead", "gone"), ("refused", "picky")] {
        for result in ["agree", "disagree"] {
            assert_eq!(
                outcome(&m, endpoint, shadow, result),
                0.0,
                "{endpoint}: {m}"
            );
        }
    }
    assert_eq!(same.hits(), n);
    assert_eq!(other.hits(), n);
    // The shadow copy names the shadow's own model.
    assert!(
        same.paths
            .lock()
            .unwrap()
            .iter()
            .all(|p| p == "/v2/models/same/infer")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_bound_copies_are_dropped_not_queued() {
    let primary = upstream("p", answer("seven")).await;
    let sleepy = upstream("sleepy", slow("seven", Duration::from_secs(30))).await;
    let doc = table(
        vec![mirrored("e", "p", "sleepy", 3000)],
        &[
            ("p", vec![primary.address()]),
            ("sleepy", vec![sleepy.address()]),
        ],
    );
    let r = router_with(&doc, |c| c.mirror_concurrency = 2).await;
    let c = client();
    for _ in 0..10 {
        let (status, _, _) = call(&c, c.post(r.url("/e/infer")).body(INFER_BODY)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(primary.hits(), 10);
    let m = r.metrics();
    assert_eq!(outcome(&m, "e", "sleepy", "dropped"), 8.0, "{m}");
    wait_for("in-flight shadows to time out", || {
        outcome(&r.metrics(), "e", "sleepy", "shadow_timeout") == 2.0
    })
    .await;
}
