//! The `make run` demo: a real digit as a PNG through the built-in pre/post-processing, and an
//! Open Inference Protocol JSON request, both through the router.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::manifests::Manifests;

/// One shared HTTP client (connection pool) for probes and demo requests.
pub fn http_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(reqwest::Client::new)
}

/// Sends the demo requests and prints what came back and what to try next.
pub async fn run(router: SocketAddr, manifests: &Manifests, image: &Path) {
    let Some((endpoint, (ep, _))) = manifests.endpoints.iter().next() else {
        return;
    };
    let base = format!("http://{router}");
    let prefix = &ep.spec.route.path_prefix;

    match std::fs::read(image) {
        Ok(png) => {
            let url = format!("{base}{prefix}/v1/models/{endpoint}:predict");
            println!(
                "$ curl -s -X POST {url} -H 'content-type: image/png' --data-binary @{}",
                image.display()
            );
            let resp = http_client()
                .post(&url)
                .header("content-type", "image/png")
                .body(png)
                .send()
                .await;
            print_response(resp).await;
        }
        Err(e) => println!("demo: cannot read {}: {e}", image.display()),
    }

    // An OIP JSON request built from the model's own metadata, with the digit's 64 pixel values.
    let meta_url = format!("{base}/v2/models/{endpoint}");
    let meta: Option<Value> = match http_client().get(&meta_url).send().await {
        Ok(r) => r.json().await.ok(),
        Err(_) => None,
    };
    if let Some(input) = meta.as_ref().and_then(|m| m["inputs"].get(0)) {
        let name = input["name"].as_str().unwrap_or("input");
        let datatype = input["datatype"].as_str().unwrap_or("FP32");
        // The same real digit as features, scaled as the Backend's own preprocess would.
        let scale = ep
            .spec
            .traffic
            .first()
            .and_then(|t| manifests.backends.get(&t.backend))
            .and_then(|(b, _)| b.spec.preprocess.as_ref()?.image.as_ref().map(|i| i.scale))
            .unwrap_or(1.0 / 255.0) as f32;
        let Some(features) = std::fs::read(image)
            .ok()
            .and_then(|b| image::load_from_memory(&b).ok())
        else {
            return;
        };
        let seven: Vec<f32> = features
            .to_luma8()
            .pixels()
            .map(|p| f32::from(p.0[0]) * scale)
            .collect();
        let body = json!({"inputs": [{"name": name, "shape": [1, 64], "datatype": datatype, "data": seven}]});
        let url = format!("{base}/v2/models/{endpoint}/infer");
        println!(
            "\n$ curl -s -X POST {url} -H 'content-type: application/json' -d '{{\"inputs\": [{{\"name\": \"{name}\", \"shape\": [1, 64], \"datatype\": \"{datatype}\", \"data\": [0, 0, 7, 8, …]}}]}}'"
        );
        print_response(http_client().post(&url).json(&body).send().await).await;
    }

    println!("\nTry next:");
    println!(
        "  • Watch the split: for i in $(seq 20); do curl -s -o /dev/null -D - -X POST {base}{prefix}/v1/models/{endpoint}:predict -H 'content-type: image/png' --data-binary @{} | grep -i serval-backend; done",
        image.display()
    );
    println!(
        "  • Edit the weights in examples/digits-endpoint.yaml (e.g. 50/50) and save: the router applies them live; run the loop again."
    );
    println!("  • Send a canary request: add -H 'x-canary: 1' and see serval-backend: digits-v2.");
    println!("  • Metrics: curl -s {base}/-/metrics | grep serval_");
}

async fn print_response(resp: reqwest::Result<reqwest::Response>) {
    match resp {
        Ok(r) => {
            let backend = r
                .headers()
                .get("serval-backend")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_owned();
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            let pretty = serde_json::from_str::<Value>(&text)
                .map(|v| serde_json::to_string_pretty(&v).unwrap_or(text.clone()))
                .unwrap_or(text);
            println!("HTTP {status}, answered by serval-backend: {backend}\n{pretty}");
        }
        Err(e) => println!("request failed: {e}"),
    }
}
