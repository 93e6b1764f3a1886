//! Loopback tests of the HTTP API against a real in-process server: protocol answers equal the
//! engine's own outputs, a digit PNG is classified, and bad inputs get 4xx JSON answers.

mod common;

use common::*;
use serde_json::{Value, json};
use serval_sidecar::Engine;
use tract_onnx::prelude::Tensor;

/// The 8x8 digit values of the PNG `name`, recovered exactly as the documented preprocess does.
fn digit_row(name: &str) -> Vec<f32> {
    let img = image::load_from_memory(&digit_png(name))
        .expect("png")
        .to_luma8();
    img.pixels().map(|p| f32::from(p.0[0]) / 15.0).collect()
}

async fn reference_engine(path: &str, max_batch: usize) -> Engine {
    let bytes = std::fs::read(path).expect("model");
    let mut e = Engine::load(&bytes).expect("load");
    e.prepare(
        max_batch,
        false,
        std::time::Duration::ZERO,
        std::time::Duration::ZERO,
    )
    .expect("prepare");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v2_json_binary_and_v1_equal_the_engine_outputs() {
    let cfg = digits_config();
    let engine = reference_engine(&cfg.model, cfg.max_batch_size).await;
    let s = start(cfg).await;
    let c = client();
    let url = format!("{}/v2/models/digits/infer", base(&s));
    let names = ["zero", "three", "seven", "nine"];
    let rows: Vec<f32> = names.iter().flat_map(|n| digit_row(n)).collect();
    let input = Tensor::from_shape(&[4, 64], &rows).expect("tensor");
    let direct = engine.infer(vec![input]).expect("direct");
    let labels: Vec<i64> = direct[0]
        .to_plain_array_view::<i64>()
        .expect("i64")
        .iter()
        .copied()
        .collect();
    let probs: Vec<f32> = direct[1]
        .to_plain_array_view::<f32>()
        .expect("f32")
        .iter()
        .copied()
        .collect();
    assert_eq!(
        labels,
        vec![0, 3, 7, 9],
        "the model itself classifies the committed digits"
    );

    // JSON tensors.
    let body = json!({"id": "r1", "inputs": [{"name": "X", "shape": [4, 64], "datatype": "FP32", "data": rows}]});
    let a = send(c.post(&url).json_body(&body)).await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(a.headers["serval-model"], "digits");
    assert_eq!(a.json["id"], "r1");
    assert_eq!(a.json["model_name"], "digits");
    assert_eq!(a.json["outputs"][0]["name"], "label");
    assert_eq!(a.json["outputs"][0]["datatype"], "INT64");
    assert_eq!(a.json["outputs"][0]["data"], json!(labels));
    assert_eq!(a.json["outputs"][1]["name"], "probabilities");
    assert_eq!(a.json["outputs"][1]["shape"], json!([4, 10]));
    assert_eq!(output_f32(&a.json, 1), probs);

    // Binary tensors, as tritonclient sends them, with one output as binary and one as JSON.
    let head = json!({
        "inputs": [{"name": "X", "shape": [4, 64], "datatype": "FP32", "parameters": {"binary_data_size": 4 * 64 * 4}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}, {"name": "label"}]
    })
    .to_string();
    let mut raw = head.as_bytes().to_vec();
    rows.iter()
        .for_each(|v| raw.extend_from_slice(&v.to_le_bytes()));
    let a = send(
        c.post(&url)
            .header("Inference-Header-Content-Length", head.len().to_string())
            .header("Content-Type", "application/octet-stream")
            .body(raw),
    )
    .await;
    assert_eq!(a.status, 200);
    let n: usize = a.headers["inference-header-content-length"]
        .to_str()
        .expect("str")
        .parse()
        .expect("n");
    let head: Value = serde_json::from_slice(&a.bytes[..n]).expect("json head");
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        4 * 10 * 4
    );
    assert_eq!(head["outputs"][1]["data"], json!(labels));
    let got: Vec<f32> = a.bytes[n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(got, probs);

    // KServe V1 with post-processing.
    let instances: Vec<Vec<f32>> = names.iter().map(|n| digit_row(n)).collect();
    let a = send(
        c.post(format!("{}/v1/models/digits:predict", base(&s)))
            .json_body(&json!({"instances": instances})),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.json);
    let predicted: Vec<&str> = a.json["predictions"]
        .as_array()
        .expect("predictions")
        .iter()
        .map(|p| p["label"].as_str().expect("label"))
        .collect();
    assert_eq!(predicted, names);
    assert_eq!(
        a.json["predictions"][2]["topK"].as_array().map(Vec::len),
        Some(3)
    );
    let score = a.json["predictions"][2]["score"].as_f64().expect("score") as f32;
    assert!((score - probs[2 * 10 + 7]).abs() < 1e-6);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_png_of_each_digit_gets_its_label() {
    let s = start(digits_config()).await;
    let c = client();
    let labels: Value = serde_json::from_slice(
        &std::fs::read(models_dir().join("digits/labels.json")).expect("labels"),
    )
    .expect("json");
    for name in [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ] {
        let a = send(
            c.post(format!("{}/v1/models/digits:predict", base(&s)))
                .header("Content-Type", "image/png")
                .body(digit_png(name)),
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.json);
        assert_eq!(
            a.json["label"],
            labels[format!("{name}.png")]["label"],
            "{}",
            a.json
        );
        assert!(a.json["score"].as_f64().expect("score") > 0.5);
        assert_eq!(a.json["topK"][0]["label"], a.json["label"]);
    }
    // The V2 route takes images too.
    let a = send(
        c.post(format!("{}/v2/models/digits/infer", base(&s)))
            .header("Content-Type", "image/png")
            .body(digit_png("seven")),
    )
    .await;
    assert_eq!(a.json["label"], "seven");
    s.shutdown();
    bounded("shutdown", s.wait()).await;

    // Without post-processing, the V2 route answers an image with the protocol's outputs (a
    // sequence's next step takes them as its inputs); the V1 route with predictions.
    let mut raw = digits_config();
    raw.postprocess = None;
    let s = start(raw).await;
    let a = send(
        c.post(format!("{}/v2/models/digits/infer", base(&s)))
            .header("Content-Type", "image/png")
            .body(digit_png("seven")),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(a.json["model_name"], "digits");
    let label = a.json["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["name"] == "label"))
        .unwrap_or_else(|| panic!("no label output: {}", a.json));
    assert_eq!(label["data"], json!([7]));
    let a = send(
        c.post(format!("{}/v1/models/digits:predict", base(&s)))
            .header("Content-Type", "image/png")
            .body(digit_png("seven")),
    )
    .await;
    assert!(a.json["predictions"].is_array(), "{}", a.json);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_metadata_and_metrics() {
    let s = start(identity_config()).await;
    let c = client();
    let b = base(&s);
    assert_eq!(send(c.get(format!("{b}/v2/health/live"))).await.status, 200);
    assert_eq!(
        send(c.get(format!("{b}/v2/health/ready"))).await.status,
        200
    );
    assert_eq!(
        send(c.get(format!("{b}/v2/models/identity/ready")))
            .await
            .status,
        200
    );
    let a = send(c.get(format!("{b}/v2"))).await;
    assert_eq!(a.json["extensions"], json!(["binary_tensor_data"]));
    let a = send(c.get(format!("{b}/v2/models/identity"))).await;
    assert_eq!(
        a.json,
        json!({"name": "identity", "versions": ["1"], "platform": "onnx_tract",
               "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
               "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]})
    );
    let a = send(
        c.post(format!("{b}/v2/models/identity/infer"))
            .json_body(&identity_request(&[[1.0, 2.0, 3.0, 4.0]])),
    )
    .await;
    assert_eq!(output_f32(&a.json, 0), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(a.json["model_name"], "identity");
    // Through the router, answers name the Endpoint the client called, not this Backend.
    let via = |r: reqwest::RequestBuilder| r.header("serval-endpoint", "my-endpoint");
    let a = send(via(c.get(format!("{b}/v2/models/identity")))).await;
    assert_eq!(a.json["name"], "my-endpoint");
    let a = send(via(c
        .post(format!("{b}/v2/models/identity/infer"))
        .json_body(&identity_request(&[[1.0, 2.0, 3.0, 4.0]]))))
    .await;
    assert_eq!(a.json["model_name"], "my-endpoint");
    let text =
        String::from_utf8(send(c.get(format!("{b}/metrics"))).await.bytes.to_vec()).expect("utf8");
    for name in [
        "serval_requests_total{model=\"identity\",code=\"200\"} 2",
        "serval_request_duration_seconds_count{model=\"identity\"} 2",
        "serval_queue_wait_seconds_count{model=\"identity\"} 2",
        "serval_inference_seconds_count{model=\"identity\"} 2",
        "serval_queue_depth{model=\"identity\"} 0",
        "serval_inflight{model=\"identity\"} 0",
        "serval_model_load_seconds{model=\"identity\"}",
        "serval_ready{model=\"identity\"} 1",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_get_4xx_json_and_the_server_stays_healthy() {
    let mut cfg = identity_config();
    cfg.max_body_bytes = 64 * 1024;
    cfg.max_queue = 16;
    let s = start(cfg).await;
    let c = client();
    let b = base(&s);
    let infer = format!("{b}/v2/models/identity/infer");
    let predict = format!("{b}/v1/models/identity:predict");
    let x = |shape: Value, dt: &str, data: Value| json!({"inputs": [{"name": "x", "shape": shape, "datatype": dt, "data": data}]});
    let ok_row = json!([1, 2, 3, 4]);
    let big_chunks = || {
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..10)
            .map(|_| Ok(bytes::Bytes::from(vec![b' '; 16 * 1024])))
            .collect();
        reqwest::Body::wrap_stream(futures::stream::iter(chunks))
    };
    let binary_head = |size: usize| {
        json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": size}}]})
            .to_string()
    };
    let cases: Vec<(&str, u16, reqwest::RequestBuilder)> = vec![
        ("invalid JSON", 400, c.post(&infer).body("{")),
        ("empty body", 400, c.post(&infer).body("")),
        ("JSON array", 400, c.post(&infer).body("[]")),
        ("no inputs field", 400, c.post(&infer).json_body(&json!({"outputs": []}))),
        ("unknown datatype", 400, c.post(&infer).json_body(&x(json!([1, 4]), "FP8", ok_row.clone()))),
        ("wrong datatype", 422, c.post(&infer).json_body(&x(json!([1, 4]), "INT64", ok_row.clone()))),
        ("wrong width", 422, c.post(&infer).json_body(&x(json!([1, 3]), "FP32", json!([1, 2, 3])))),
        ("wrong rank", 422, c.post(&infer).json_body(&x(json!([4]), "FP32", ok_row.clone()))),
        ("zero rows", 422, c.post(&infer).json_body(&x(json!([0, 4]), "FP32", json!([])))),
        ("data count mismatch", 400, c.post(&infer).json_body(&x(json!([1, 4]), "FP32", json!([1, 2, 3])))),
        ("data not numbers", 400, c.post(&infer).json_body(&x(json!([1, 4]), "FP32", json!(["a", "b", "c", "d"])))),
        ("negative dimension", 400, c.post(&infer).json_body(&x(json!([-1, 4]), "FP32", ok_row.clone()))),
        ("unknown input", 422, c.post(&infer).json_body(&json!({"inputs": [{"name": "z", "shape": [1, 4], "datatype": "FP32", "data": ok_row}]}))),
        ("missing input", 422, c.post(&infer).json_body(&json!({"inputs": []}))),
        ("duplicate input", 400, c.post(&infer).json_body(&json!({"inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ok_row},
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ok_row}]}))),
        ("no data", 400, c.post(&infer).json_body(&json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32"}]}))),
        ("unknown output", 422, c.post(&infer).json_body(&json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ok_row}], "outputs": [{"name": "nope"}]}))),
        ("header length not a number", 400, c.post(&infer).header("Inference-Header-Content-Length", "ten").body("{}")),
        ("header length past the body", 400, c.post(&infer).header("Inference-Header-Content-Length", "999").body("{}")),
        ("binary size past the body", 400, {
            let h = binary_head(16);
            c.post(&infer).header("Inference-Header-Content-Length", h.len().to_string()).body(format!("{h}1234"))
        }),
        ("binary size not a multiple", 400, {
            let h = binary_head(15);
            c.post(&infer).header("Inference-Header-Content-Length", h.len().to_string()).body(format!("{h}{}", "x".repeat(15)))
        }),
        ("stray binary bytes", 400, {
            let h = binary_head(16);
            c.post(&infer).header("Inference-Header-Content-Length", h.len().to_string()).body(format!("{h}{}", "x".repeat(20)))
        }),
        ("unknown model", 404, c.post(format!("{b}/v2/models/other/infer")).json_body(&x(json!([1, 4]), "FP32", ok_row.clone()))),
        ("unknown route", 404, c.get(format!("{b}/v3/anything"))),
        ("GET on infer", 405, c.get(&infer)),
        ("POST on health", 405, c.post(format!("{b}/v2/health/live"))),
        ("V1 without instances", 400, c.post(&predict).json_body(&json!({"inputs": []}))),
        ("V1 empty instances", 400, c.post(&predict).json_body(&json!({"instances": []}))),
        ("V1 ragged instances", 400, c.post(&predict).json_body(&json!({"instances": [[1, 2, 3, 4], [1, 2]]}))),
        ("V1 wrong width", 422, c.post(&predict).json_body(&json!({"instances": [[1, 2]]}))),
        ("V1 unknown model", 404, c.post(format!("{b}/v1/models/other:predict")).json_body(&json!({"instances": [[1, 2, 3, 4]]}))),
        ("more rows than the queue", 413, c.post(&infer).json_body(&identity_request(&[[0.0; 4]; 17]))),
        ("Content-Length too large", 413, c.post(&infer).body(vec![b' '; 100 * 1024])),
        ("chunked body too large", 413, c.post(&infer).body(big_chunks())),
        ("image without preprocess", 415, c.post(&predict).header("Content-Type", "image/png").body(digit_png("seven"))),
        ("bad deadline header", 400, c.post(&infer).header("serval-deadline-ms", "soon").json_body(&x(json!([1, 4]), "FP32", ok_row.clone()))),
    ];
    assert!(cases.len() >= 25);
    let mut failures = Vec::new();
    for (what, want, req) in cases {
        let a = send(req).await;
        let has_error = a
            .json
            .get("error")
            .and_then(Value::as_str)
            .is_some_and(|e| !e.is_empty());
        if a.status != want || !has_error {
            failures.push(format!(
                "{what}: got {} {}",
                a.status,
                String::from_utf8_lossy(&a.bytes)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "unexpected answers:\n{}",
        failures.join("\n")
    );
    assert_eq!(
        send(c.get(format!("{b}/v2/health/ready"))).await.status,
        200
    );
    let a = send(
        c.post(&infer)
            .json_body(&identity_request(&[[5.0, 6.0, 7.0, 8.0]])),
    )
    .await;
    assert_eq!(output_f32(&a.json, 0), vec![5.0, 6.0, 7.0, 8.0]);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_input_the_model_refuses_at_run_time_is_a_422_and_the_server_keeps_serving() {
    let mut cfg = identity_config();
    cfg.model = model("gather.onnx");
    cfg.name = "gather".into();
    let s = start(cfg).await;
    let c = client();
    let url = format!("{}/v2/models/gather/infer", base(&s));
    let req = |idx: Vec<i64>| json!({"inputs": [{"name": "indices", "shape": [idx.len()], "datatype": "INT64", "data": idx}]});
    let a = send(c.post(&url).json_body(&req(vec![1, 2]))).await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(
        output_f32(&a.json, 0),
        vec![4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
    );
    // Out of range, or negative: tract errors or panics; either way the caller's input is
    // at fault (422 with the engine's message, never a 5xx a router would count against the
    // replica) and that batch fails alone.
    for idx in [1_000_000, -1_000] {
        for _ in 0..2 * serval_sidecar::config::default_workers() {
            let a = send(c.post(&url).json_body(&req(vec![idx, 3]))).await;
            assert_eq!(a.status, 422, "{}", a.json);
            let e = a.json["error"].as_str().unwrap_or_default();
            assert!(
                e.starts_with("the model cannot run on this input: ") && e.len() > 40,
                "{e}"
            );
        }
    }
    let a = send(c.post(&url).json_body(&req(vec![9]))).await;
    assert_eq!(a.status, 200, "{}", a.json);
    assert_eq!(output_f32(&a.json, 0), vec![36.0, 37.0, 38.0, 39.0]);
    // In one batch with a bad request, the good neighbours still get their rows.
    let batcher = &s.model().expect("model").batcher;
    batcher.set_paused(true);
    let tasks: Vec<_> = [vec![0i64], vec![5_000_000], vec![2, 1]]
        .into_iter()
        .map(|idx| {
            let (c, url, body) = (c.clone(), url.clone(), req(idx));
            tokio::spawn(async move { send(c.post(&url).json_body(&body)).await })
        })
        .collect();
    wait_until("4 rows queued", || batcher.queued_rows() == 4).await;
    batcher.set_paused(false);
    let answers: Vec<Answer> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    assert_eq!(
        (answers[0].status, answers[1].status, answers[2].status),
        (200, 422, 200)
    );
    assert_eq!(output_f32(&answers[0].json, 0), vec![0.0, 1.0, 2.0, 3.0]);
    assert_eq!(
        output_f32(&answers[2].json, 0),
        vec![8.0, 9.0, 10.0, 11.0, 4.0, 5.0, 6.0, 7.0]
    );
    assert_eq!(
        send(c.get(format!("{}/v2/health/ready", base(&s))))
            .await
            .status,
        200
    );
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fixed_batch_one_model_serves_requests_of_many_rows() {
    let mut cfg = identity_config();
    cfg.model = model("fixed1.onnx");
    cfg.name = "fixed1".into();
    cfg.calibrate = true;
    let s = start(cfg).await;
    let engine = s.model().expect("model").engine.clone();
    assert_eq!(engine.fixed_batch(), Some(1));
    assert_eq!(engine.batch_sizes(), vec![1]);
    let url = format!("{}/v2/models/fixed1/infer", base(&s));
    let rows: Vec<[f32; 4]> = (0..5).map(|i| [i as f32; 4]).collect();
    let a = send(client().post(&url).json_body(&identity_request(&rows))).await;
    assert_eq!(a.status, 200, "{}", a.json);
    let want: Vec<f32> = rows.iter().flatten().map(|v| v + 1.0).collect();
    assert_eq!(output_f32(&a.json, 0), want);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}

/// A keep-alive connection is reused within `--idle-timeout-secs` and closed once idle past
/// it; a client that never finishes its request head is cut off at the same bound, so neither
/// holds a connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_stalled_connections_are_closed_at_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let idle = std::time::Duration::from_millis(800);
    let mut cfg = identity_config();
    cfg.idle_timeout = idle;
    let s = start(cfg).await;
    let get = b"GET /v2/health/live HTTP/1.1\r\nhost: sidecar\r\n\r\n";
    let mut conn = TcpStream::connect(s.local_addr()).await.expect("connect");
    for _ in 0..3 {
        conn.write_all(get).await.expect("send");
        let answer = read_response(&mut conn).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // Well within the bound: the next request reuses the connection.
        tokio::time::sleep(idle / 4).await;
    }
    let quiet = std::time::Instant::now();
    let mut rest = Vec::new();
    let n = bounded("idle connection closed", conn.read_to_end(&mut rest))
        .await
        .expect("read");
    assert_eq!(n, 0, "nothing is sent on an idle connection");
    assert!(
        quiet.elapsed() >= idle / 2,
        "closed after {:?} of {idle:?}: too early for an idle bound",
        quiet.elapsed()
    );

    let mut stalled = TcpStream::connect(s.local_addr()).await.expect("connect");
    stalled
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nhost:")
        .await
        .expect("send");
    let mut rest = Vec::new();
    bounded("stalled connection closed", stalled.read_to_end(&mut rest))
        .await
        .expect("read");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
        "a stalled head gets no answer but a timeout: {rest}"
    );
    // The server itself is unaffected.
    let answer = send(client().get(format!("{}/v2/health/ready", base(&s)))).await;
    assert_eq!(answer.status, 200);
}

/// Past `--max-connections` a new connection is not served until an open one closes; then it
/// is, and nothing is lost. `serval_connections` counts the open ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_bound_wait_for_a_free_slot() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let mut cfg = identity_config();
    cfg.max_connections = 2;
    let s = start(cfg).await;
    let get = b"GET /v2/health/live HTTP/1.1\r\nhost: sidecar\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(s.local_addr()).await.expect("connect");
        conn.write_all(get).await.expect("send");
        assert!(read_response(&mut conn).await.starts_with("HTTP/1.1 200"));
        open.push(conn);
    }
    // The kernel completes the handshake (listen backlog), but the sidecar does not serve it.
    let mut third = TcpStream::connect(s.local_addr()).await.expect("connect");
    third.write_all(get).await.expect("send");
    let waiting = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        read_response(&mut third),
    )
    .await;
    assert!(
        waiting.is_err(),
        "a third connection was served past the bound of 2"
    );
    drop(open.pop());
    let answer = read_response(&mut third).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The gauge counts the one left open and this one, next to the bound.
    third
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: sidecar\r\n\r\n")
        .await
        .expect("send");
    let metrics = read_response(&mut third).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "serval_connections{model=\"identity\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l == "serval_max_connections{model=\"identity\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_port_answers_probes_while_traffic_connections_are_at_the_bound() {
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpStream;
    let mut cfg = identity_config();
    cfg.max_connections = 1;
    cfg.admin_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let s = start(cfg).await;
    let admin = s.admin_addr().expect("admin port bound");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nhost: sidecar\r\n\r\n");
    // The one traffic slot is taken; a second traffic connection waits in the backlog.
    let mut held = TcpStream::connect(s.local_addr()).await.expect("connect");
    held.write_all(get("/v2/health/live").as_bytes())
        .await
        .expect("send");
    assert!(read_response(&mut held).await.starts_with("HTTP/1.1 200"));
    let mut waiting = TcpStream::connect(s.local_addr()).await.expect("connect");
    waiting
        .write_all(get("/v2/health/live").as_bytes())
        .await
        .expect("send");
    let blocked = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        read_response(&mut waiting),
    )
    .await;
    assert!(blocked.is_err(), "the traffic port served past its bound");
    // What the kubelet's probes and Prometheus ask still gets answered, on one connection.
    let mut probe = TcpStream::connect(admin).await.expect("connect admin");
    for path in ["/v2/health/live", "/v2/health/ready"] {
        probe.write_all(get(path).as_bytes()).await.expect("send");
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(5), read_response(&mut probe))
                .await
                .expect("the admin port did not answer while the traffic port was at its bound");
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    probe
        .write_all(get("/metrics").as_bytes())
        .await
        .expect("send");
    let metrics = read_response(&mut probe).await;
    assert!(
        metrics
            .lines()
            .any(|l| l == "serval_connections{model=\"identity\"} 1"),
        "{metrics}"
    );
    // Inference is never served there, so it cannot bypass the traffic port's bounds.
    probe
        .write_all(
            b"POST /v2/models/identity/infer HTTP/1.1\r\nhost: sidecar\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await
        .expect("send");
    let refused = read_response(&mut probe).await;
    assert!(
        refused.starts_with("HTTP/1.1 404") && refused.contains("not served on the admin port"),
        "{refused}"
    );
    // The waiting connection is served once the slot frees.
    drop(held);
    assert!(
        read_response(&mut waiting)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // With an admin port, metrics are not handed to whoever reaches the traffic port.
    waiting
        .write_all(get("/metrics").as_bytes())
        .await
        .expect("send");
    let hidden = read_response(&mut waiting).await;
    assert!(
        hidden.starts_with("HTTP/1.1 404") && hidden.contains("served on the admin port"),
        "{hidden}"
    );
}

#[test]
fn the_admin_port_must_differ_from_the_traffic_port() {
    use clap::Parser;
    let args = serval_sidecar::config::Args::try_parse_from([
        "serval-sidecar",
        "--model",
        "m.onnx",
        "--port",
        "9000",
        "--admin-port",
        "9000",
    ])
    .expect("parses");
    let err = serval_sidecar::Config::from_args(args).expect_err("same port refused");
    assert!(
        err.to_string()
            .contains("--admin-port must differ from --port"),
        "{err}"
    );
}

/// The autoscaler's snapshot on the admin port: answered requests, rows run, and in-flight
/// requests integrated over time, so a mean concurrency over any interval can be read from two
/// snapshots; the traffic port does not serve it when an admin port exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_signals_snapshot_counts_requests_rows_and_their_concurrency() {
    let mut cfg = identity_config();
    cfg.admin_listen = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    let s = start(cfg).await;
    let admin = s.admin_addr().expect("admin port bound");
    let c = client();
    let signals = |c: reqwest::Client| async move {
        let a = send(c.get(format!("http://{admin}/-/signals"))).await;
        assert_eq!(a.status, 200, "{}", a.json);
        serde_json::from_value::<serval_api::signals::SidecarSignals>(a.json).expect("snapshot")
    };
    let before = signals(c.clone()).await;
    assert!(before.ready);
    assert_eq!(
        (before.model.as_str(), before.requests, before.rows),
        ("identity", 0, 0)
    );
    let url = format!("{}/v2/models/identity/infer", base(&s));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                send(c.post(&url).json_body(&identity_request(&[[1.0; 4]; 3]))).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task").status, 200);
    }
    let after = signals(c.clone()).await;
    assert_eq!((after.requests, after.rows, after.inflight), (10, 30, 0));
    assert!(after.inflight_seconds > before.inflight_seconds);
    let a = send(c.get(format!("{}/-/signals", base(&s)))).await;
    assert_eq!(a.status, 404, "{}", a.json);
    s.shutdown();
    bounded("shutdown", s.wait()).await;
}
