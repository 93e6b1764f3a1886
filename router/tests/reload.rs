//! Live reload: no request lost while the table changes under load; bad tables are refused.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_under_load_loses_no_request() {
    let (a, b) = (
        upstream("a", answer("x")).await,
        upstream("b", answer("x")).await,
    );
    let backends = [("a", vec![a.address()]), ("b", vec![b.address()])];
    let doc = |wa, wb| table(vec![route("e", "/e", &[("a", wa), ("b", wb)])], &backends);
    let r = Arc::new(router(&doc(100, 0)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (r, stop, ok, failed, c) = (
            r.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            client(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let resp = c
                    .post(r.url("/v2/models/e/infer"))
                    .body(INFER_BODY)
                    .send()
                    .await;
                match resp {
                    Ok(resp) if resp.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for i in 0..10 {
        let (wa, wb) = if i % 2 == 0 { (0, 100) } else { (100, 0) };
        r.replace_table(&doc(wa, wb)).await;
        let hits = a.hits() + b.hits();
        wait_for("traffic on the new table", || {
            a.hits() + b.hits() > hits + 20
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    assert!(ok.load(Ordering::Relaxed) > 200);
    assert!(a.hits() > 0 && b.hits() > 0);
    let m = r.metrics();
    assert_eq!(metric(&m, "serval_router_table_reloads_total"), 11.0);
    let rev = r.revision().unwrap();
    assert!(m.contains(&format!("serval_router_table_info{{revision=\"{rev}\"}} 1")));
    assert_eq!(
        m.matches("serval_router_table_info{").count(),
        1,
        "only the served revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_table_is_refused_and_the_old_one_stays() {
    let a = upstream("a", answer("x")).await;
    let doc = table(
        vec![route("e", "/e", &[("a", 100)])],
        &[("a", vec![a.address()])],
    );
    let r = router(&doc).await;
    let c = client();
    let rev = r.revision().unwrap();
    r.write_raw(b"{\"apiVersion\": \"serval.dev/routing/v1\", \"routes\": [");
    wait_for("the rejection", || {
        metric(&r.metrics(), "serval_router_table_rejections_total") == 1.0
    })
    .await;
    let mut ghost = doc.clone();
    ghost["routes"][0]["traffic"][0]["backend"] = "ghost".into();
    r.write_raw(ghost.to_string().as_bytes());
    wait_for("the second rejection", || {
        metric(&r.metrics(), "serval_router_table_rejections_total") == 2.0
    })
    .await;
    assert_eq!(r.revision().unwrap(), rev);
    let (status, backend, _) = call(&c, c.get(r.url("/e/x"))).await;
    assert_eq!((status, backend.as_str()), (200, "a"));
    let ready = c.get(r.url("/-/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // A good table afterwards applies.
    let mut renamed = doc.clone();
    renamed["routes"][0]["pathPrefix"] = "/f".into();
    r.replace_table(&renamed).await;
    assert_eq!(call(&c, c.get(r.url("/f/x"))).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_a_valid_table_exists() {
    let a = upstream("a", answer("x")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routing.json");
    std::fs::write(&path, "not json").unwrap();
    let router = serval_router::Router::bind(test_config(path.clone()))
        .await
        .unwrap();
    let (addr, state) = (router.addr, router.state.clone());
    tokio::spawn(router.serve(std::future::pending()));
    let c = client();
    let url = |p: &str| format!("http://{addr}{p}");
    assert_eq!(c.get(url("/-/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(url("/-/readyz")).send().await.unwrap().status(), 503);
    assert_eq!(c.get(url("/e/x")).send().await.unwrap().status(), 503);
    let doc = table(
        vec![route("e", "/e", &[("a", 100)])],
        &[("a", vec![a.address()])],
    );
    std::fs::write(&path, doc.to_string()).unwrap();
    wait_for("the table", || state.is_ready()).await;
    assert_eq!(c.get(url("/-/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(url("/e/x")).send().await.unwrap().status(), 200);
    let metrics = c
        .get(url("/-/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .contains("serval_router_requests_total{endpoint=\"e\",backend=\"a\",code=\"200\"} 1")
    );
}
