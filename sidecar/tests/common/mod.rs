//! Helpers shared by the loopback integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use serval_sidecar::{Config, Sidecar};

/// Upper bound of any single wait in these tests; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(60);

/// The repository's `models/` folder.
pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

/// A model path as a string.
pub fn model(name: &str) -> String {
    models_dir().join(name).to_string_lossy().into_owned()
}

/// Identity model `[N,4] -> [N,4]`, no calibration (every power of two up to 8 planned).
pub fn identity_config() -> Config {
    let mut c = Config::for_model(model("identity.onnx"));
    c.calibrate = false;
    c.max_batch_size = 8;
    c.workers = 2;
    c.drain_delay = Duration::ZERO;
    c
}

/// The digits MLP with the documented PNG pre-processing and labelled post-processing.
pub fn digits_config() -> Config {
    let mut c = Config::for_model(model("digits.onnx"));
    c.calibrate = false;
    c.max_batch_size = 16;
    c.drain_delay = Duration::ZERO;
    c.preprocess = Some(
        serde_json::from_value(serde_json::json!({
            "image": {"width": 8, "height": 8, "color": "Grayscale", "layout": "Flat", "scale": 1.0 / 15.0}
        }))
        .expect("preprocess"),
    );
    c.postprocess = Some(
        serde_json::from_value(serde_json::json!({
            "output": "probabilities", "topK": 3,
            "labels": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        }))
        .expect("postprocess"),
    );
    c
}

/// Starts a sidecar and waits until it is ready.
pub async fn start(config: Config) -> Sidecar {
    let s = Sidecar::start(config).await.expect("start");
    tokio::time::timeout(WAIT, s.ready())
        .await
        .expect("ready in time")
        .expect("model loads");
    s
}

/// `http://addr`.
pub fn base(s: &Sidecar) -> String {
    format!("http://{}", s.local_addr())
}

/// A plain HTTP client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

/// Awaits `f` for at most [`WAIT`].
pub async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `cond` every 5 ms for at most [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    bounded(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
}

/// A response: status, headers, body parsed as JSON (Null if not JSON).
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: Value,
    pub bytes: bytes::Bytes,
}

/// Sends `req` and reads the whole answer.
pub async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = bounded("response", req.send()).await.expect("request sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = bounded("body", resp.bytes()).await.expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        json,
        bytes,
    }
}

/// A V2 JSON request for the identity model.
pub fn identity_request(rows: &[[f32; 4]]) -> Value {
    let data: Vec<f32> = rows.iter().flatten().copied().collect();
    serde_json::json!({
        "inputs": [{"name": "x", "shape": [rows.len(), 4], "datatype": "FP32", "data": data}]
    })
}

/// The FP32 data of output `i` of a V2 JSON answer.
pub fn output_f32(json: &Value, i: usize) -> Vec<f32> {
    json["outputs"][i]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {json}"))
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

/// A metric's value from the text exposition (sum over matching lines).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The sklearn digits rows used to render the committed PNGs, read back from the PNGs.
pub fn digit_png(name: &str) -> Vec<u8> {
    std::fs::read(models_dir().join("digits").join(format!("{name}.png"))).expect("png")
}

/// `.json()` needs reqwest's `json` feature; this keeps the dependency list unchanged.
pub trait JsonBody {
    fn json_body(self, v: &Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, v: &Value) -> Self {
        self.header("Content-Type", "application/json")
            .body(v.to_string())
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_serval-sidecar");

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Kills the child if a test fails before it exits on its own.
pub struct Reaper(pub Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn spawn(args: &[&str]) -> Reaper {
    Reaper(
        Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serval-sidecar"),
    )
}

pub fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let until = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < until,
            "serval-sidecar did not exit in time"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub async fn wait_ready(port: u16) {
    let c = client();
    bounded("binary ready", async {
        loop {
            if let Ok(r) = c
                .get(format!("http://127.0.0.1:{port}/v2/health/ready"))
                .send()
                .await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Reads one HTTP/1.1 response with a `content-length` body from `conn`; its text.
pub async fn read_response(conn: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                return String::from_utf8_lossy(&buf).into_owned();
            }
        }
        let mut chunk = [0u8; 1024];
        let n = bounded("response", conn.read(&mut chunk))
            .await
            .expect("read");
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
}
