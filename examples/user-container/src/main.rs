//! `digits-transformer`: an example user container for a Serval Backend.
//!
//! It runs beside the model server in every pod of the Backend and receives the Backend's
//! traffic (its Service targets the user container). It adds logic of its own around the model:
//!
//! - `POST /classify` takes `{"image": [[..8 numbers..], ..8 rows..]}` (ink 0-16, the layout of
//!   scikit-learn's digits), flattens it into the model's `[1, 64]` input, calls the model server
//!   on localhost with the Open Inference Protocol, and answers
//!   `{"digit": 7, "confidence": 0.98, "model": "digits-custom"}`;
//! - `GET /v2/health/ready` (its readiness probe) is ready while the model server is;
//! - anything else is passed through to the model server unchanged.
//!
//! Environment: `PORT` (default 8000); `SERVAL_MODEL_SERVER` and `SERVAL_MODEL_NAME`, which the
//! operator sets.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

/// Largest request body read (an 8x8 image is well under 1 KiB; pass-through may be larger).
const MAX_BODY: usize = 8 << 20;

#[derive(Clone)]
struct App {
    client: Client<HttpConnector, Full<Bytes>>,
    model_server: String,
    model: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::var("PORT")
        .unwrap_or_else(|_| "8000".into())
        .parse()
        .context("PORT")?;
    let app = App {
        client: Client::builder(TokioExecutor::new()).build_http(),
        model_server: std::env::var("SERVAL_MODEL_SERVER")
            .unwrap_or_else(|_| "http://127.0.0.1:8080".into()),
        model: std::env::var("SERVAL_MODEL_NAME").context("SERVAL_MODEL_NAME is not set")?,
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    eprintln!(
        "digits-transformer: :{port} -> {} ({})",
        app.model_server, app.model
    );
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let app = app.clone();
                let service = hyper::service::service_fn(move |req| handle(app.clone(), req));
                let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = term.recv() => break,
        }
    }
    // Requests in flight finish; idle connections close.
    graceful.shutdown().await;
    Ok(())
}

async fn handle(app: App, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let answer = match (req.method(), req.uri().path()) {
        (&Method::POST, "/classify") => classify(&app, req).await,
        (&Method::GET, "/v2/health/ready") => {
            forward(&app, Method::GET, "/v2/health/ready", None, Bytes::new())
                .await
                .map(|r| reply(r.status(), &json!({"modelServer": r.status().as_u16()})))
        }
        _ => pass_through(&app, req).await,
    };
    Ok(answer.unwrap_or_else(|(status, message)| reply(status, &json!({"error": message}))))
}

type Failure = (StatusCode, String);

async fn classify(app: &App, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Failure> {
    let body = read_body(req).await?;
    let pixels = flatten(&body).map_err(|m| (StatusCode::BAD_REQUEST, m))?;
    let infer = json!({
        "inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 64], "data": pixels}],
        "outputs": [{"name": "probabilities"}]
    });
    let path = format!("/v2/models/{}/infer", app.model);
    let resp = forward(
        app,
        Method::POST,
        &path,
        Some("application/json"),
        Bytes::from(infer.to_string()),
    )
    .await?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        // The model server's own error, with its status (a 429 stays a 429).
        return Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap_or_default());
    }
    let answer: Value = serde_json::from_slice(&body)
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("model server answer: {e}")))?;
    let probabilities: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let (digit, confidence) = probabilities
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .ok_or((StatusCode::BAD_GATEWAY, "no probabilities".to_owned()))?;
    Ok(reply(
        StatusCode::OK,
        &json!({"digit": digit, "confidence": confidence, "model": app.model}),
    ))
}

/// `{"image": 8 rows of 8 numbers in 0..=16}` as the model's 64 inputs.
fn flatten(body: &[u8]) -> Result<Vec<f32>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let rows = v["image"]
        .as_array()
        .filter(|r| r.len() == 8)
        .ok_or("\"image\" must be 8 rows of 8 numbers")?;
    let mut out = Vec::with_capacity(64);
    for (i, row) in rows.iter().enumerate() {
        let row = row
            .as_array()
            .filter(|r| r.len() == 8)
            .ok_or(format!("image row {i} must have 8 numbers"))?;
        for x in row {
            let x = x
                .as_f64()
                .filter(|x| (0.0..=16.0).contains(x))
                .ok_or(format!("image row {i}: values are ink levels 0-16"))?;
            out.push(x as f32);
        }
    }
    Ok(out)
}

async fn pass_through(app: &App, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Failure> {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = read_body(req).await?;
    let resp = forward(app, method, &path, content_type.as_deref(), body).await?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?
        .to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Failure> {
    Ok(Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| (StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?
        .to_bytes())
}

async fn forward(
    app: &App,
    method: Method,
    path: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Response<Incoming>, Failure> {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", app.model_server));
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    app.client
        .request(req)
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, format!("model server: {e}")))
}

fn reply(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}
