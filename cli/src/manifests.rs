//! Reading Backend and Endpoint manifests from files, validated as the apiserver would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use kube::CustomResourceExt;
use serde_json::Value;
use serval_api::{Backend, Endpoint};

/// The resources found, by name, with the file each came from.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Backends by name.
    pub backends: BTreeMap<String, (Backend, PathBuf)>,
    /// Endpoints by name.
    pub endpoints: BTreeMap<String, (Endpoint, PathBuf)>,
}

/// The YAML files under `path` (itself, if a file), sorted, with their modification times.
pub fn files(path: &Path) -> std::io::Result<Vec<(PathBuf, Option<SystemTime>)>> {
    let mut out = Vec::new();
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            let p = entry?.path();
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
        out.sort();
    } else {
        std::fs::metadata(path)?;
        out.push(path.to_path_buf());
    }
    Ok(out
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
            (p, m)
        })
        .collect())
}

/// Loads and validates every document. Errors name the file, the resource and the field.
pub fn load(path: &Path) -> Result<Manifests, Vec<String>> {
    let files = files(path).map_err(|e| vec![format!("{}: {e}", path.display())])?;
    let mut out = Manifests::default();
    let mut errors = Vec::new();
    for (file, _) in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{}: {e}", file.display()));
                continue;
            }
        };
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let where_ = format!("{} (document {})", file.display(), i + 1);
            let value: Value = match serde::Deserialize::deserialize(doc) {
                Ok(Value::Null) => continue,
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("{where_}: not valid YAML: {e}"));
                    continue;
                }
            };
            if let Err(e) = add(&mut out, value, &file) {
                errors.extend(e.into_iter().map(|m| format!("{where_}: {m}")));
            }
        }
    }
    if out.backends.is_empty() && out.endpoints.is_empty() && errors.is_empty() {
        errors.push(format!("{}: no Backend or Endpoint found", path.display()));
    }
    // Only on a clean read: a Backend that failed to parse would show up here as missing too.
    if errors.is_empty() {
        errors.extend(missing_backends(&out));
        errors.extend(endpoint_cycles(&out));
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn add(out: &mut Manifests, value: Value, file: &Path) -> Result<(), Vec<String>> {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if api_version != "serval.dev/v1alpha1" {
        return Err(vec![format!(
            "{kind} {name:?}: apiVersion {api_version:?} is not serval.dev/v1alpha1"
        )]);
    }
    if name.is_empty() {
        return Err(vec![format!("{kind}: metadata.name is required")]);
    }
    let prefix = |errs: Vec<String>| {
        errs.into_iter()
            .map(|e| format!("{kind} {name:?}: {e}"))
            .collect::<Vec<_>>()
    };
    match kind.as_str() {
        "Backend" => {
            serval_api::crd::validate(&Backend::crd(), &value).map_err(prefix)?;
            let b: Backend = typed(value).map_err(|e| prefix(vec![e]))?;
            if b.spec.container.is_some() {
                return Err(prefix(vec![LOCAL_USER_CONTAINER.to_owned()]));
            }
            if out
                .backends
                .insert(name.clone(), (b, file.to_path_buf()))
                .is_some()
            {
                return Err(prefix(vec!["defined twice".to_owned()]));
            }
        }
        "Endpoint" => {
            serval_api::crd::validate(&Endpoint::crd(), &value).map_err(prefix)?;
            let e: Endpoint = typed(value).map_err(|e| prefix(vec![e]))?;
            if out
                .endpoints
                .insert(name.clone(), (e, file.to_path_buf()))
                .is_some()
            {
                return Err(prefix(vec!["defined twice".to_owned()]));
            }
        }
        other => return Err(vec![format!("kind {other:?} is not Backend or Endpoint")]),
    }
    Ok(())
}

/// Why local mode refuses a Backend with a user container, rather than serve it without one
/// (which would answer differently from the cluster).
const LOCAL_USER_CONTAINER: &str = "spec.container: serval local starts processes, not \
    container images, so it cannot run the user container; run this Backend in a cluster, or \
    remove spec.container to serve the model without it";

/// One error per circle of Endpoints calling each other (cascade stages and sequence steps
/// naming an `endpoint`): in a cluster such Endpoints are left out with the condition
/// `Degraded`, reason `Cycle`; local mode refuses the files.
pub fn endpoint_cycles(m: &Manifests) -> Vec<String> {
    let edges: std::collections::BTreeMap<&str, Vec<&str>> = m
        .endpoints
        .iter()
        .map(|(name, (ep, _))| (name.as_str(), ep.spec.named_endpoints().collect()))
        .collect();
    serval_api::routing::cycles(&edges)
        .into_iter()
        .map(|cycle| {
            let file = m
                .endpoints
                .get(&cycle[0])
                .map(|(_, f)| f.display().to_string())
                .unwrap_or_default();
            format!(
                "{file}: Endpoint {:?} calls itself through {}: a cascade stage or sequence \
                 step may not lead back to its own Endpoint",
                cycle[0],
                cycle.join(" -> ")
            )
        })
        .collect()
}

/// One error per Endpoint field that names a Backend (or an Endpoint) absent from the
/// manifests.
///
/// In a cluster this is the `BackendNotFound` status condition, not a rejection, because
/// resources may be applied in any order and the Backend may come next. Local mode reads every
/// manifest at once, so a name with no Backend is a mistake in the files (a typo, a file left
/// out) and is refused before anything starts, or an edit is ignored.
pub fn missing_backends(m: &Manifests) -> Vec<String> {
    let mut errors = Vec::new();
    for (name, (ep, file)) in &m.endpoints {
        let spec = &ep.spec;
        let named = spec
            .traffic
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("spec.traffic[{i}].backend"), &t.backend))
            .chain(
                spec.mirror
                    .iter()
                    .map(|mirror| ("spec.mirror.backend".to_owned(), &mirror.backend)),
            )
            .chain(
                spec.matches
                    .iter()
                    .enumerate()
                    .map(|(i, rule)| (format!("spec.match[{i}].backend"), &rule.backend)),
            )
            .chain(
                spec.rollout
                    .iter()
                    .map(|r| ("spec.rollout.canary".to_owned(), &r.canary)),
            )
            .chain(spec.ensemble.iter().flat_map(|e| {
                e.backends
                    .iter()
                    .enumerate()
                    .map(|(i, b)| (format!("spec.ensemble.backends[{i}]"), b))
            }));
        let hops: Vec<(String, serval_api::Hop<&str>)> = spec.hops().collect();
        for (field, hop) in &hops {
            if let serval_api::Hop::Endpoint(e) = hop
                && !m.endpoints.contains_key(*e)
            {
                errors.push(format!(
                    "{}: Endpoint {name:?}: {field}.endpoint: Endpoint {e:?} is not in the \
                     manifests (Endpoints found: {})",
                    file.display(),
                    m.endpoints.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
        let hop_backends = hops.iter().filter_map(|(field, hop)| match hop {
            serval_api::Hop::Backend(b) => Some((format!("{field}.backend"), *b)),
            serval_api::Hop::Endpoint(_) => None,
        });
        let named = named.map(|(f, b)| (f, b.as_str())).chain(hop_backends);
        for (field, backend) in named {
            if m.backends.contains_key(backend) {
                continue;
            }
            let known = if m.backends.is_empty() {
                "none".to_owned()
            } else {
                m.backends.keys().cloned().collect::<Vec<_>>().join(", ")
            };
            errors.push(format!(
                "{}: Endpoint {name:?}: {field}: Backend {backend:?} is not in the manifests \
                 (Backends found: {known})",
                file.display()
            ));
        }
    }
    errors
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| format!("{}: {}", e.path(), e.inner()))
}

/// Where a local sidecar reads a Backend's model: `file://` paths relative to the manifest's
/// directory, `http(s)://` as is. `pvc://` exists only in a cluster.
pub fn resolve_model(uri: &str, manifest: &Path) -> Result<String, String> {
    if let Some(path) = uri.strip_prefix("file://") {
        let p = Path::new(path);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            manifest.parent().unwrap_or(Path::new(".")).join(p)
        };
        if !full.exists() {
            return Err(format!(
                "model file {} (from {uri}) does not exist",
                full.display()
            ));
        }
        return Ok(full.display().to_string());
    }
    if uri.starts_with("http://") || uri.starts_with("https://") {
        return Ok(uri.to_owned());
    }
    Err(format!(
        "model.uri {uri:?}: pvc:// models exist only in a cluster; use file:// or https:// in local mode"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn errors_name_file_resource_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "bad.yaml",
            "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {name: digits}\nspec:\n  route: {pathPrefix: /d}\n  traffic: [{backend: a, weight: 0}]\n---\napiVersion: serval.dev/v1alpha1\nkind: Backend\nmetadata: {name: b}\nspec:\n  model: {uri: file://m.onnx}\n  replicas: many\n",
        );
        let errors = load(dir.path()).unwrap_err();
        let all = errors.join("\n");
        assert!(
            all.contains("bad.yaml (document 1): Endpoint \"digits\"")
                && all.contains("traffic weights must sum to more than 0"),
            "{all}"
        );
        assert!(
            all.contains("bad.yaml (document 2): Backend \"b\": spec.replicas"),
            "{all}"
        );
    }

    const BACKEND: &str = "apiVersion: serval.dev/v1alpha1\nkind: Backend\nmetadata: {name: digits-v1}\nspec:\n  model: {uri: file://m.onnx}\n";

    #[test]
    fn an_endpoint_naming_a_backend_not_in_the_manifests_is_refused_with_the_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.yaml", BACKEND);
        write(
            dir.path(),
            "e.yaml",
            "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {name: digits}\nspec:\n  route: {pathPrefix: /d}\n  traffic: [{backend: digits-v1, weight: 90}, {backend: digits-v9, weight: 10}]\n  mirror: {backend: shadow, percent: 5}\n  match: [{header: {name: x-canary, value: '1'}, backend: canary}]\n",
        );
        let m = Manifests {
            backends: load(&dir.path().join("b.yaml")).unwrap().backends,
            ..Manifests::default()
        };
        assert!(
            missing_backends(&m).is_empty(),
            "no Endpoint, nothing missing"
        );

        let errors = load(dir.path()).unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(
            errors[0].ends_with(
                "e.yaml: Endpoint \"digits\": spec.traffic[1].backend: Backend \"digits-v9\" \
                 is not in the manifests (Backends found: digits-v1)"
            ),
            "{errors:?}"
        );
        assert!(
            errors[1].contains("spec.mirror.backend: Backend \"shadow\""),
            "{errors:?}"
        );
        assert!(
            errors[2].contains("spec.match[0].backend: Backend \"canary\""),
            "{errors:?}"
        );
    }

    #[test]
    fn a_backend_with_a_user_container_is_refused_not_served_without_it() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "b.yaml",
            &format!("{BACKEND}  container: {{image: digits-transformer:0.1.0, port: 8000}}\n"),
        );
        let errors = load(dir.path()).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("b.yaml (document 1): Backend \"digits-v1\": spec.container: serval local starts processes, not container images"),
            "{errors:?}"
        );
        // The shipped example is the same case.
        let example = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/user-container/digits-custom.yaml");
        let errors = load(&example).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains("spec.container")),
            "{errors:?}"
        );
    }

    #[test]
    fn compositions_are_checked_like_the_api_server_checks_them() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = |spec: &str| {
            format!(
                "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: c}}\nspec:\n  route: {{pathPrefix: /c}}\n{spec}"
            )
        };
        let cases = [
            (
                "  cascade: {output: p, stages: [{backend: digits-v1, minConfidence: 0.9}, {backend: big}]}\n  traffic: [{backend: digits-v1, weight: 1}]\n",
                "an Endpoint has exactly one of traffic, cascade, ensemble and sequence",
            ),
            (
                "  ensemble: {backends: [digits-v1, big], output: p, reduce: Mean}\n",
                "spec.ensemble.backends[1]: Backend \"big\" is not in the manifests",
            ),
            (
                "  ensemble: {backends: [digits-v1, digits-v1], output: p, reduce: Vote}\n",
                "each backend may appear only once in an ensemble",
            ),
            (
                "  sequence: {steps: [{backend: digits-v1}, {endpoint: nowhere, inputs: {X: y}}]}\n",
                "spec.sequence.steps[1].endpoint: Endpoint \"nowhere\" is not in the manifests",
            ),
            (
                "  sequence: {steps: [{backend: digits-v1}, {endpoint: c}]}\n",
                "Endpoint \"c\" calls itself through c -> c",
            ),
            (
                "  cascade: {output: p, stages: [{backend: digits-v1}, {backend: big}]}\n",
                "every cascade stage but the last needs minConfidence",
            ),
            (
                "  cascade: {output: p, stages: [{backend: digits-v1, minConfidence: 0.9}, {backend: big}]}\n  sticky: {header: x-user}\n",
                "mirror, rollout, match and sticky apply to traffic only",
            ),
            (
                "  cascade: {output: p, stages: [{backend: digits-v1, minConfidence: 0.9}, {backend: big}]}\n",
                "spec.cascade.stages[1].backend: Backend \"big\" is not in the manifests",
            ),
        ];
        write(dir.path(), "b.yaml", BACKEND);
        for (spec, want) in cases {
            write(dir.path(), "e.yaml", &endpoint(spec));
            let errors = load(dir.path()).unwrap_err().join("\n");
            assert!(errors.contains(want), "{spec}: {errors}");
        }
        // Two Endpoints calling each other, each valid on its own.
        write(
            dir.path(),
            "e.yaml",
            &endpoint("  sequence: {steps: [{backend: digits-v1}, {endpoint: d}]}\n"),
        );
        write(
            dir.path(),
            "f.yaml",
            "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {name: d}\nspec:\n  route: {pathPrefix: /d}\n  cascade: {output: p, stages: [{endpoint: c, minConfidence: 0.5}, {backend: digits-v1}]}\n",
        );
        let errors = load(dir.path()).unwrap_err().join("\n");
        assert!(
            errors.contains("e.yaml: Endpoint \"c\" calls itself through c -> d -> c"),
            "{errors}"
        );
    }

    #[test]
    fn an_endpoint_naming_only_present_backends_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.yaml", BACKEND);
        write(
            dir.path(),
            "e.yaml",
            "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {name: digits}\nspec:\n  route: {pathPrefix: /d}\n  traffic: [{backend: digits-v1, weight: 100}]\n",
        );
        let m = load(dir.path()).unwrap();
        assert!(missing_backends(&m).is_empty());
    }

    #[test]
    fn loads_the_examples() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let m = load(&examples).unwrap();
        assert_eq!(
            m.backends.keys().collect::<Vec<_>>(),
            ["digits-v1", "digits-v2"]
        );
        assert_eq!(m.endpoints.keys().collect::<Vec<_>>(), ["digits"]);
        let (b, file) = &m.backends["digits-v1"];
        let resolved = resolve_model(&b.spec.model.uri, file).unwrap();
        assert!(resolved.ends_with("models/digits.onnx"), "{resolved}");
        assert!(
            resolve_model("pvc://claim/m.onnx", file)
                .unwrap_err()
                .contains("only in a cluster")
        );
    }
}
