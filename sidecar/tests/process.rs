//! Tests of the `serval-sidecar` binary and model loading: a sha256 mismatch is refused with a
//! non-zero exit, http(s) models download and verify, SIGTERM under load loses no accepted
//! request, and the real `tritonclient` Python package infers against the binary.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serval_sidecar::{Sidecar, StartupError};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[test]
fn the_binary_refuses_a_sha256_mismatch_with_a_clear_error() {
    let port = free_port().to_string();
    let model = model("identity.onnx");
    let mut child = spawn(&[
        "--model",
        &model,
        "--port",
        &port,
        "--sha256",
        &"0".repeat(64),
    ]);
    let status = wait_exit(&mut child.0);
    assert!(!status.success(), "exit status {status}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("read");
    assert!(
        stderr.contains("sha256") && stderr.contains("refusing to serve"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mismatched_model_is_never_served_in_process() {
    let mut cfg = identity_config();
    cfg.sha256 = Some("0".repeat(64));
    let s = Sidecar::start(cfg).await.expect("start");
    let err = bounded("load outcome", s.ready())
        .await
        .expect_err("must fail");
    assert!(matches!(*err, StartupError::Sha256Mismatch { .. }), "{err}");
    let c = client();
    assert_eq!(
        send(c.get(format!("{}/v2/health/ready", base(&s))))
            .await
            .status,
        503
    );
    assert_eq!(
        send(c.get(format!("{}/v2/health/live", base(&s))))
            .await
            .status,
        200
    );
    let a = send(
        c.post(format!("{}/v2/models/identity/infer", base(&s)))
            .json_body(&identity_request(&[[1.0; 4]])),
    )
    .await;
    assert_eq!(a.status, 503);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_preprocess_that_cannot_fit_the_model_is_refused_at_start_up() {
    let mut cfg = digits_config();
    cfg.preprocess = Some(
        serde_json::from_value(
            serde_json::json!({"image": {"width": 28, "height": 28, "layout": "Flat"}}),
        )
        .expect("preprocess"),
    );
    let s = Sidecar::start(cfg).await.expect("start");
    let err = bounded("load outcome", s.ready())
        .await
        .expect_err("must fail");
    assert!(matches!(*err, StartupError::Config(_)), "{err}");
    assert!(err.to_string().contains("[1, 784]"), "{err}");
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

/// Serves `bytes` to every connection as a plain HTTP/1.1 response.
async fn serve_file(bytes: Vec<u8>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(&bytes).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn models_download_over_http_and_are_verified() {
    let bytes = std::fs::read(model("identity.onnx")).expect("model");
    let sha = hex::encode(Sha256::digest(&bytes));
    let port = serve_file(bytes).await;
    let mut cfg = identity_config();
    cfg.model = format!("http://127.0.0.1:{port}/models/identity.onnx");
    cfg.sha256 = Some(sha);
    let s = start(cfg.clone()).await;
    let a = send(
        client()
            .post(format!("{}/v2/models/identity/infer", base(&s)))
            .json_body(&identity_request(&[[1.0, 2.0, 3.0, 4.0]])),
    )
    .await;
    assert_eq!(output_f32(&a.json, 0), vec![1.0, 2.0, 3.0, 4.0]);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
    cfg.sha256 = Some("f".repeat(64));
    let s = Sidecar::start(cfg).await.expect("start");
    let err = bounded("load outcome", s.ready())
        .await
        .expect_err("must fail");
    assert!(matches!(*err, StartupError::Sha256Mismatch { .. }), "{err}");
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_no_accepted_request() {
    let port = free_port();
    let model = model("digits.onnx");
    let mut child = spawn(&[
        "--model",
        &model,
        "--port",
        &port.to_string(),
        "--calibrate",
        "false",
        "--host",
        "127.0.0.1",
    ]);
    wait_ready(port).await;
    let url = format!("http://127.0.0.1:{port}/v2/models/digits/infer");
    let body = serde_json::json!({"inputs": [{"name": "X", "shape": [2, 64], "datatype": "FP32", "data": vec![1.0f32; 128]}]}).to_string();
    let term_sent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..32)
        .map(|_| {
            let (url, body, term_sent) = (url.clone(), body.clone(), term_sent.clone());
            tokio::spawn(async move {
                // A new connection per request: an idle keep-alive connection closed by the
                // server would blur "never accepted" with "lost".
                let c = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .build()
                    .expect("client");
                let mut answered = Vec::new();
                loop {
                    let before_term = !term_sent.load(std::sync::atomic::Ordering::SeqCst);
                    match c.post(&url).body(body.clone()).send().await {
                        Ok(r) => {
                            let code = r.status().as_u16();
                            answered.push(code);
                            if code == 503 {
                                break;
                            }
                        }
                        Err(e) if !before_term => {
                            // Sent after SIGTERM, after the drain: never accepted.
                            let _ = e;
                            break;
                        }
                        Err(e) => panic!("a request sent before SIGTERM got no answer: {e:?}"),
                    }
                }
                answered
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = child.0.id().to_string();
    term_sent.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let mut ok = 0;
    for t in load {
        for code in bounded("load task", t).await.expect("task") {
            assert!(code == 200 || code == 503, "unexpected status {code}");
            ok += usize::from(code == 200);
        }
    }
    assert!(ok > 0);
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child.0))
        .await
        .expect("join");
    assert!(status.success(), "exit status {status}");
}

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("SERVAL_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/serval/venv")
        });
    venv.join("bin/python")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tritonclient_infers_against_the_binary() {
    let python = venv_python();
    assert!(
        python.exists(),
        "tritonclient test needs the Python venv at {} (make -C models venv, or set SERVAL_VENV)",
        python.display()
    );
    let port = free_port();
    let model = model("digits.onnx");
    let mut child = spawn(&[
        "--model",
        &model,
        "--port",
        &port.to_string(),
        "--host",
        "127.0.0.1",
        "--max-batch-size",
        "16",
    ]);
    wait_ready(port).await;
    // The HTTP client and the gRPC client, on the same port.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let out = tokio::process::Command::new(&python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(dir.join("test_tritonclient.py"))
        .arg(dir.join("test_tritonclient_grpc.py"))
        .env("SERVAL_URL", format!("127.0.0.1:{port}"))
        .env("SERVAL_MODEL", model)
        .env(
            "SERVAL_MAX_BODY",
            serval_sidecar::config::DEFAULT_MAX_BODY_BYTES.to_string(),
        )
        .output();
    let out = bounded("pytest", out).await.expect("run pytest");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tritonclient tests failed:\n{text}");
    assert!(text.contains("passed"), "{text}");
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.0.id().to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let status = tokio::task::spawn_blocking(move || wait_exit(&mut child.0))
        .await
        .expect("join");
    assert!(status.success());
}
