//! The CRDs as a user meets them: committed YAML in sync, CEL rules rejecting bad manifests with
//! the message `kubectl apply` would print, every string and list bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::{Value, json};
use serval_api::crd::{crd_file_name, crd_yaml, crds, schema_of, validate_cel};
use serval_api::{Backend, Endpoint};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_crdgen() {
    for crd in crds() {
        let path = repo_root().join("crds").join(crd_file_name(&crd));
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == crd_yaml(&crd).unwrap(),
            "{} is out of date: run `make crds` and commit the result",
            path.display()
        );
    }
}

fn backend(spec: Value) -> Value {
    json!({"apiVersion": "serval.dev/v1alpha1", "kind": "Backend", "metadata": {"name": "digits-v1"}, "spec": spec})
}

fn endpoint(spec: Value) -> Value {
    json!({"apiVersion": "serval.dev/v1alpha1", "kind": "Endpoint", "metadata": {"name": "digits"}, "spec": spec})
}

fn good_backend_spec() -> Value {
    json!({
        "model": {"uri": "https://models.example/digits.onnx", "sha256": "a".repeat(64)},
        "replicas": 2,
        "batching": {"maxBatchSize": 32, "maxDelayMicros": 2000, "maxQueue": 1024},
        "preprocess": {"image": {"width": 8, "height": 8, "color": "Grayscale", "layout": "Flat", "scale": 0.0627}},
        "postprocess": {"softmax": false, "topK": 2, "labels": ["zero", "one", "two"]},
    })
}

fn good_endpoint_spec() -> Value {
    json!({
        "route": {"pathPrefix": "/digits"},
        "traffic": [{"backend": "digits-v1", "weight": 90}, {"backend": "digits-v2", "weight": 10}],
        "mirror": {"backend": "digits-v3", "percent": 20},
        "match": [{"header": {"name": "x-canary", "value": "1"}, "backend": "digits-v2"}],
        "sticky": {"header": "x-user-id"},
    })
}

/// Sets `value` at a dotted path inside `doc`.
fn with(mut doc: Value, path: &str, value: Value) -> Value {
    let mut cur = &mut doc;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    let last = parts[parts.len() - 1];
    match last.parse::<usize>() {
        Ok(i) => cur[i] = value,
        Err(_) => {
            if value.is_null() {
                cur.as_object_mut().unwrap().remove(last);
            } else {
                cur[last] = value;
            }
        }
    }
    doc
}

fn assert_rejected(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    doc: &Value,
    expected: &str,
) {
    match validate_cel(crd, doc) {
        Ok(()) => panic!("expected rejection with {expected:?}, but it was accepted:\n{doc:#}"),
        Err(messages) => assert!(
            messages.iter().any(|m| m.contains(expected)),
            "expected a message containing {expected:?}, got {messages:?}"
        ),
    }
}

#[test]
fn valid_manifests_pass() {
    validate_cel(&Backend::crd(), &backend(good_backend_spec())).unwrap();
    validate_cel(&Endpoint::crd(), &endpoint(good_endpoint_spec())).unwrap();
    // The examples a user copies first must be valid too.
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let v: Value = serde::Deserialize::deserialize(doc).unwrap();
                let crd = if v["kind"] == "Backend" {
                    Backend::crd()
                } else {
                    Endpoint::crd()
                };
                validate_cel(&crd, &v).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            }
        }
    }
}

#[test]
fn backend_rules_reject_with_clear_messages() {
    let crd = Backend::crd();
    let good = backend(good_backend_spec());
    let cases: Vec<(Value, &str)> = vec![
        (
            with(good.clone(), "spec.model.uri", json!("ftp://x/m.onnx")),
            "model.uri must start with http://, https://, file:// or pvc://",
        ),
        (
            with(good.clone(), "spec.model.uri", json!("s3://bucket/m.onnx")),
            "model.uri must start with",
        ),
        (
            with(good.clone(), "spec.model.sha256", Value::Null),
            "model.sha256 is required when the model is downloaded over http(s)",
        ),
        (
            with(good.clone(), "spec.model.sha256", json!("abc123")),
            "model.sha256 must be 64 hexadecimal characters",
        ),
        (
            with(good.clone(), "spec.model.sha256", json!("g".repeat(64))),
            "model.sha256 must be 64 hexadecimal characters",
        ),
        (
            with(good.clone(), "spec.model", json!({"uri": "pvc://Models"})),
            "a pvc:// model.uri must look like pvc://<claim-name>/<path>",
        ),
        (
            with(good.clone(), "spec.batching.maxQueue", json!(8)),
            "batching.maxQueue must be at least batching.maxBatchSize",
        ),
        (
            with(
                good.clone(),
                "spec.autoscaling",
                json!({"minReplicas": 5, "maxReplicas": 2}),
            ),
            "autoscaling.minReplicas must be at most autoscaling.maxReplicas",
        ),
        (
            with(good.clone(), "spec.postprocess.topK", json!(5)),
            "postprocess.topK cannot exceed the number of labels",
        ),
        (
            with(
                good.clone(),
                "spec.container",
                json!({"image": "me/pre:1", "port": 8080}),
            ),
            "container.port 8080 is reserved for the model-server sidecar",
        ),
        (
            with(
                good.clone(),
                "spec.sidecar",
                json!({"imagePullPolicy": "Sometimes"}),
            ),
            "sidecar.imagePullPolicy must be Always, IfNotPresent or Never",
        ),
        (
            with(
                good.clone(),
                "spec.preprocess.image.mean",
                json!([0.5, 0.5, 0.5]),
            ),
            "preprocess.image.mean needs one value per channel",
        ),
        (
            with(good.clone(), "spec.preprocess.image.std", json!([0.0])),
            "preprocess.image.std values must be positive",
        ),
        (
            with(good.clone(), "metadata.name", json!("Digits.V1")),
            "a Backend's name must be a DNS-1035 label",
        ),
    ];
    for (doc, message) in &cases {
        assert_rejected(&crd, doc, message);
    }
    // A file:// model needs no checksum: it is already in the image or volume.
    let local = with(
        good.clone(),
        "spec.model",
        json!({"uri": "file:///models/digits.onnx"}),
    );
    validate_cel(&crd, &local).unwrap();
}

#[test]
fn endpoint_rules_reject_with_clear_messages() {
    let crd = Endpoint::crd();
    let good = endpoint(good_endpoint_spec());
    let cases: Vec<(Value, &str)> = vec![
        (
            with(
                good.clone(),
                "spec.traffic",
                json!([{"backend": "a", "weight": 0}, {"backend": "b", "weight": 0}]),
            ),
            "traffic weights must sum to more than 0",
        ),
        (
            with(
                good.clone(),
                "spec.traffic",
                json!([{"backend": "a", "weight": 50}, {"backend": "a", "weight": 50}]),
            ),
            "each backend may appear only once in traffic",
        ),
        (
            with(good.clone(), "spec.mirror.backend", json!("digits-v1")),
            "mirror.backend already receives primary traffic",
        ),
        (
            with(good.clone(), "spec.route.pathPrefix", json!("digits")),
            "route.pathPrefix must start with '/'",
        ),
        (
            with(good.clone(), "spec.route.pathPrefix", json!("/digits?x=1")),
            "route.pathPrefix must start with '/'",
        ),
        (
            with(good.clone(), "spec.route.host", json!("Models.Example.com")),
            "route.host must be a lowercase DNS name",
        ),
        (
            with(good.clone(), "spec.sticky.header", json!("x user")),
            "sticky.header must be a valid HTTP header name",
        ),
        (
            with(good.clone(), "spec.match.0.header.name", json!("x:canary")),
            "match header name must be a valid HTTP header name",
        ),
    ];
    for (doc, message) in &cases {
        assert_rejected(&crd, doc, message);
    }
    // Mirroring into a weight-0 canary is the documented way to warm it up: allowed.
    let warmup = with(
        with(
            good.clone(),
            "spec.traffic",
            json!([{"backend": "digits-v1", "weight": 100}, {"backend": "digits-v3", "weight": 0}]),
        ),
        "spec.match",
        json!([]),
    );
    validate_cel(&crd, &warmup).unwrap();
}

/// Walks a schema; returns the paths of strings without maxLength/enum and arrays without maxItems.
fn unbounded(schema: &Value, path: &str, out: &mut Vec<String>) {
    match schema.get("type").and_then(Value::as_str) {
        Some("string") if schema.get("maxLength").is_none() && schema.get("enum").is_none() => {
            out.push(path.to_owned())
        }
        Some("array") if schema.get("maxItems").is_none() => out.push(path.to_owned()),
        _ => {}
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            // `resources` is Kubernetes' own ResourceRequirements; the apiserver bounds it.
            if k != "resources" {
                unbounded(v, &format!("{path}.{k}"), out);
            }
        }
    }
    if let Some(items) = schema.get("items") {
        unbounded(items, &format!("{path}[]"), out);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        for v in schema
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            unbounded(v, path, out);
        }
    }
}

#[test]
fn every_spec_string_and_list_is_bounded() {
    for crd in crds() {
        let schema = schema_of(&crd);
        let mut out = Vec::new();
        unbounded(&schema["properties"]["spec"], "spec", &mut out);
        assert!(
            out.is_empty(),
            "{}: unbounded fields {out:?}",
            crd.metadata.name.unwrap_or_default()
        );
    }
}

#[test]
fn schema_bounds_weights_and_percent() {
    let schema = schema_of(&Endpoint::crd());
    let spec = &schema["properties"]["spec"]["properties"];
    assert_eq!(
        spec["traffic"]["items"]["properties"]["weight"]["maximum"],
        json!(100.0)
    );
    assert_eq!(spec["traffic"]["maxItems"], json!(16));
    // Empty with a composition; the spec's rule requires exactly one of them.
    assert!(spec["traffic"].get("minItems").is_none());
    assert_eq!(
        spec["mirror"]["properties"]["percent"]["maximum"],
        json!(100.0)
    );
    let crd = Endpoint::crd();
    assert_eq!(crd.spec.names.short_names, Some(vec!["sep".to_owned()]));
    assert_eq!(crd.spec.names.categories, Some(vec!["serval".to_owned()]));
    // Descriptions make `kubectl explain` useful.
    assert!(
        spec["route"]["properties"]["pathPrefix"]["description"]
            .as_str()
            .is_some_and(|d| d.contains("stripped"))
    );
}

#[test]
fn schema_bounds_are_enforced_locally_too() {
    use serval_api::crd::validate;
    let crd = Endpoint::crd();
    let good = endpoint(good_endpoint_spec());
    validate(&crd, &good).unwrap();
    let cases: Vec<(Value, &str)> = vec![
        (
            with(good.clone(), "spec.traffic.0.weight", json!(101)),
            "spec.traffic[0].weight: Invalid value: 101: should be less than or equal to 100",
        ),
        (
            with(good.clone(), "spec.traffic", json!([])),
            "spec: an Endpoint has exactly one of traffic, cascade, ensemble and sequence",
        ),
        (
            with(
                good.clone(),
                "spec.ensemble",
                json!({"backends": ["a", "b"], "output": "p", "reduce": "Mean"}),
            ),
            "spec: an Endpoint has exactly one of traffic, cascade, ensemble and sequence",
        ),
        (
            with(
                with(good.clone(), "spec.traffic", json!([])),
                "spec.ensemble",
                json!({"backends": ["a", "b"], "output": "p", "reduce": "Mean", "minResponses": 3}),
            ),
            "spec.ensemble: ensemble.minResponses cannot exceed the number of backends",
        ),
        (
            with(
                with(good.clone(), "spec.traffic", json!([])),
                "spec.ensemble",
                json!({"backends": ["a", "a"], "output": "p", "reduce": "Median"}),
            ),
            "spec.ensemble.reduce: Unsupported value: \"Median\"",
        ),
        (
            with(
                with(good.clone(), "spec.traffic", json!([])),
                "spec.sequence",
                json!({"steps": [{"backend": "a", "endpoint": "b"}, {"backend": "c"}]}),
            ),
            "spec.sequence.steps[0]: a sequence step names either a backend or an endpoint",
        ),
        (
            with(
                with(good.clone(), "spec.traffic", json!([])),
                "spec.sequence",
                json!({"steps": [{"backend": "a", "inputs": {"x": "y"}}, {"backend": "c"}]}),
            ),
            "spec.sequence.steps: the first sequence step takes the client's request",
        ),
        (
            with(
                with(good.clone(), "spec.traffic", json!([])),
                "spec.cascade",
                json!({"output": "p", "stages": [{"minConfidence": 0.9}, {"endpoint": "c"}]}),
            ),
            "spec.cascade.stages[0]: a cascade stage names either a backend or an endpoint",
        ),
        (
            with(good.clone(), "spec.route", json!({})),
            "spec.route.pathPrefix: Required value",
        ),
        (
            with(
                good.clone(),
                "spec.traffic.0.backend",
                json!("x".repeat(64)),
            ),
            "spec.traffic[0].backend: Too long",
        ),
        (
            with(good.clone(), "spec.timeoutMillis", json!("soon")),
            "spec.timeoutMillis: Invalid value: must be of type integer",
        ),
        (
            with(good.clone(), "spec.weights", json!([1])),
            "spec.weights: unknown field",
        ),
    ];
    for (doc, message) in &cases {
        let errors = validate(&crd, doc).expect_err(message);
        assert!(
            errors.iter().any(|e| e.contains(message)),
            "expected {message:?} in {errors:?}"
        );
    }
    let errors = validate(
        &Backend::crd(),
        &with(
            backend(good_backend_spec()),
            "spec.preprocess.image.color",
            json!("Sepia"),
        ),
    )
    .unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("Unsupported value: \"Sepia\"")),
        "{errors:?}"
    );
}

fn undocumented(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            let p = format!("{path}.{k}");
            if v.get("description")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                out.push(p.clone());
            }
            if k != "resources" {
                undocumented(v, &p, out);
            }
        }
    }
    if let Some(items) = schema.get("items") {
        undocumented(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_has_a_description_for_kubectl_explain() {
    for crd in crds() {
        let schema = schema_of(&crd);
        let mut out = Vec::new();
        undocumented(&schema["properties"]["spec"], "spec", &mut out);
        undocumented(&schema["properties"]["status"], "status", &mut out);
        assert!(
            out.is_empty(),
            "{}: fields without a description {out:?}",
            crd.metadata.name.unwrap_or_default()
        );
        assert!(
            schema["description"].as_str().is_some_and(|d| d.len() > 20),
            "the kind itself is described"
        );
    }
}
