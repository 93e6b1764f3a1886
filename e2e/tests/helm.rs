//! The Helm chart (`charts/serval`) and the OCI images (`images/build.sh`).
//!
//! Offline: the chart's CRDs are the generated ones, `helm lint` passes, `helm template`
//! renders a restricted, least-privilege operator with defaults and honours edited values,
//! and the values schema rejects typos. Monitoring: the PodMonitors select the pods the
//! operator creates, promtool checks and unit-tests the alert rules, and every metric the
//! dashboard and alerts query is one a component exports. The image archives are valid OCI layouts (and docker
//! archives) whose one layer holds the binary, its libraries and the loader.
//!
//! Against the real control plane: the monitoring objects fit the Prometheus Operator's CRDs;
//! `helm install --wait`, then the real operator binary runs
//! as a local process with a TokenRequest token for the chart's ServiceAccount and reconciles
//! `examples/` (the RBAC is sufficient), while the same identity is refused on Secrets (the
//! RBAC is minimal). `helm test` passes, `helm upgrade` applies, `helm uninstall` leaves the
//! CRDs.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Role, RoleBinding};
use kube::api::{Api, ListParams};
use serde_json::Value;
use serval_api::routing::ROUTING_CONFIGMAP;
use serval_e2e::{
    Binaries, Cluster, DEFAULT_OPERATOR_LOG_FILTER, LOG_TAIL_LINES, Operator, OperatorConfig,
    operator_binary, wait_for,
};

/// Release name; with it the chart names the operator's objects `serval-operator`.
const RELEASE: &str = "serval";
/// Name of the operator's Deployment, ServiceAccount, ClusterRole and bindings.
const OPERATOR: &str = "serval-operator";
/// The chart's default Lease name (the operator's own default too).
const LEASE: &str = "serval-operator";
/// `helm template` defaults to a Kubernetes version older than the chart's `kubeVersion`;
/// render for the version the control plane runs.
const KUBE_VERSION: &str = "1.36.3";
/// Bound on `helm install/upgrade/test/uninstall --wait` (kwok pods are Ready in seconds).
const HELM_TIMEOUT: &str = "180s";
/// Bound on Backends and the Endpoint turning Ready.
const READY_TIMEOUT: &str = "120s";
/// Operator log lines shown when the install scenario fails.
const OPERATOR_LOG_TAIL: usize = 60;
/// Bound on helm creating the `helm test` hook Pod and kwok marking it Running.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-request bound on the operator's HTTP endpoints.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// Verbs that would make the operator's RBAC more than it needs.
const FORBIDDEN_VERBS: [&str; 4] = ["*", "escalate", "bind", "impersonate"];

// ---------------------------------------------------------------------------------------
// Offline: CRDs, lint, template, schema
// ---------------------------------------------------------------------------------------

/// The chart carries byte-identical copies of the generated CRDs, and no others.
#[test]
fn chart_crds_are_the_generated_crds() {
    let generated = yaml_files(&repo_root().join("crds")).unwrap();
    let charted = yaml_files(&chart_dir().join("crds")).unwrap();
    let names = |files: &[PathBuf]| -> Vec<String> {
        files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    };
    assert_eq!(
        names(&generated),
        names(&charted),
        "charts/serval/crds must hold exactly the files of crds/ (run `make chart-crds`)"
    );
    assert!(!generated.is_empty(), "crds/ is empty");
    for (g, c) in generated.iter().zip(&charted) {
        let (g_text, c_text) = (std::fs::read(g).unwrap(), std::fs::read(c).unwrap());
        assert!(
            g_text == c_text,
            "{} differs from {}: run `make crds chart-crds`",
            c.display(),
            g.display()
        );
    }
}

/// `helm lint --strict` passes with the defaults and with every option turned on.
#[test]
fn helm_lint_passes() {
    helm_ok(["lint", "--strict", &chart()]).unwrap();
    helm_ok([
        "lint",
        "--strict",
        &chart(),
        "--set",
        "dashboard.enabled=true,metrics.serviceMonitor.enabled=true,operator.watchNamespace=models,\
         metrics.podMonitor.enabled=true,metrics.prometheusRule.enabled=true",
    ])
    .unwrap();
}

/// Defaults: a restricted operator Deployment with probes, resources and the downward-API
/// identity; cluster-wide RBAC without wildcards or Secrets; a Lease Role limited to the
/// Lease; a metrics Service; the `helm test` hook; no ServiceMonitor or dashboard.
#[test]
fn template_defaults() {
    let docs = render("serval-system", &[]).unwrap();
    let app_version = chart_app_version().unwrap();

    let deployment: Deployment = object(&docs, "Deployment", OPERATOR).unwrap();
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(OPERATOR));
    let psc = pod.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some(format!("serval-operator:{app_version}").as_str())
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(
        sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    assert_eq!(
        sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let resources = c.resources.as_ref().unwrap();
    assert!(
        resources
            .requests
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|r| r.contains_key("memory"))
    );
    assert_eq!(
        env(c, "SERVAL_LEASE_NAMESPACE").as_deref(),
        Some("serval-system")
    );
    assert_eq!(env(c, "SERVAL_LEASE_NAME").as_deref(), Some(LEASE));
    assert_eq!(env(c, "SERVAL_HTTP_ADDR").as_deref(), Some("0.0.0.0:8080"));
    assert_eq!(
        env(c, "SERVAL_SIDECAR_IMAGE"),
        Some(format!("serval-sidecar:{app_version}"))
    );
    assert_eq!(
        env(c, "SERVAL_ROUTER_IMAGE"),
        Some(format!("serval-router:{app_version}"))
    );
    assert_eq!(
        env(c, "SERVAL_WATCH_NAMESPACE"),
        None,
        "all namespaces by default"
    );
    assert_eq!(
        env(c, "SERVAL_SERVICE_APP_PROTOCOL"),
        None,
        "no appProtocol by default"
    );
    let pod_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(
        pod_name.as_deref(),
        Some("metadata.name"),
        "identity from the downward API"
    );

    let role: ClusterRole = object(&docs, "ClusterRole", OPERATOR).unwrap();
    assert_minimal(role.rules.as_deref().unwrap_or_default()).unwrap();
    assert!(
        has_kind(&docs, "ClusterRoleBinding", OPERATOR),
        "cluster-wide by default"
    );
    let lease_role: Role = object(&docs, "Role", &format!("{OPERATOR}-leader-election")).unwrap();
    let lease_rules = lease_role.rules.unwrap_or_default();
    assert_minimal(&lease_rules).unwrap();
    for rule in &lease_rules {
        assert_eq!(rule.resources.as_deref(), Some(&["leases".to_owned()][..]));
        if rule.verbs.iter().any(|v| v != "create") {
            assert_eq!(
                rule.resource_names.as_deref(),
                Some(&[LEASE.to_owned()][..]),
                "only the Lease itself can be read and written"
            );
        }
    }

    let service: Service = object(&docs, "Service", &format!("{OPERATOR}-metrics")).unwrap();
    let port = &service.spec.unwrap().ports.unwrap()[0];
    assert_eq!(port.port, 8080);

    let test_pod: Pod = object(&docs, "Pod", &format!("{OPERATOR}-test-healthz")).unwrap();
    assert_eq!(
        test_pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/hook"))
            .map(String::as_str),
        Some("test")
    );
    let script = test_pod.spec.unwrap().containers[0]
        .command
        .clone()
        .unwrap_or_default()
        .join(" ");
    assert!(script.contains("/healthz"), "{script}");

    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(!docs.iter().any(|d| d["kind"] == kind), "{kind} rendered");
    }
    assert!(!has_kind(&docs, "ConfigMap", "serval-dashboard"));

    // `--include-crds` renders both CRDs from crds/.
    let with_crds = helm_ok(template_args("serval-system", &["--include-crds"])).unwrap();
    for crd in ["backends.serval.dev", "endpoints.serval.dev"] {
        assert!(with_crds.contains(&format!("name: {crd}")), "{crd} missing");
    }
}

/// Edited values: registry and tags, one watched namespace (RBAC via a RoleBinding there
/// instead of cluster-wide), replicas, Lease name, ServiceMonitor and dashboard.
#[test]
fn template_with_edited_values() {
    let docs = render(
        "ops",
        &[
            "--set",
            "imageRegistry=registry.example.com/serval/,operator.image.tag=9.9.9,sidecar.image.tag=1.2.3",
            "--set",
            "operator.replicas=2,operator.watchNamespace=models,operator.leaseName=serval-leader",
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.serviceMonitor.labels.release=prom",
            "--set",
            "dashboard.enabled=true,dashboard.namespace=monitoring",
            "--set",
            "serviceAppProtocol=kubernetes.io/h2c",
        ],
    )
    .unwrap();
    let app_version = chart_app_version().unwrap();

    let deployment: Deployment = object(&docs, "Deployment", OPERATOR).unwrap();
    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, Some(2));
    let c = &spec.template.spec.unwrap().containers[0];
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/serval/serval-operator:9.9.9")
    );
    assert_eq!(
        env(c, "SERVAL_SIDECAR_IMAGE").as_deref(),
        Some("registry.example.com/serval/serval-sidecar:1.2.3")
    );
    assert_eq!(
        env(c, "SERVAL_ROUTER_IMAGE"),
        Some(format!(
            "registry.example.com/serval/serval-router:{app_version}"
        ))
    );
    assert_eq!(env(c, "SERVAL_WATCH_NAMESPACE").as_deref(), Some("models"));
    assert_eq!(
        env(c, "SERVAL_LEASE_NAME").as_deref(),
        Some("serval-leader")
    );
    assert_eq!(env(c, "SERVAL_LEASE_NAMESPACE").as_deref(), Some("ops"));
    assert_eq!(
        env(c, "SERVAL_SERVICE_APP_PROTOCOL").as_deref(),
        Some("kubernetes.io/h2c")
    );

    // Confined to one namespace: a RoleBinding there, no ClusterRoleBinding.
    assert!(!docs.iter().any(|d| d["kind"] == "ClusterRoleBinding"));
    let binding: RoleBinding = object(&docs, "RoleBinding", OPERATOR).unwrap();
    assert_eq!(binding.metadata.namespace.as_deref(), Some("models"));
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (OPERATOR, Some("ops"))
    );
    let lease_role: Role = object(&docs, "Role", &format!("{OPERATOR}-leader-election")).unwrap();
    assert!(
        lease_role
            .rules
            .unwrap_or_default()
            .iter()
            .any(|r| r.resource_names.as_deref() == Some(&["serval-leader".to_owned()][..]))
    );

    let monitor = docs
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");

    let dashboard: ConfigMap = object(&docs, "ConfigMap", "serval-dashboard").unwrap();
    assert_eq!(dashboard.metadata.namespace.as_deref(), Some("monitoring"));
    assert_eq!(
        dashboard
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("grafana_dashboard"))
            .map(String::as_str),
        Some("1")
    );
    let json = dashboard.data.unwrap()["serval.json"].clone();
    let parsed: Value = serde_json::from_str(&json).expect("the dashboard is JSON");
    let exprs = dashboard_exprs(&parsed).join("\n");
    // The metric schema of all three components.
    for metric in [
        "serval_operator_reconciles_total",
        "serval_operator_leader",
        "serval_router_requests_total",
        "serval_router_mirror_agreement_total",
        "serval_requests_total",
        "serval_batch_size_sum",
        "serval_rejections_total",
        "serval_ready",
    ] {
        assert!(exprs.contains(metric), "the dashboard lacks {metric}");
    }
}

/// The PodMonitors select exactly the router and model-server pods the operator creates
/// (their labels, their `admin` port, the one their probes use outside the traffic port's
/// connection bound, and each one's metrics path), in every namespace or the one watched; the
/// PrometheusRule is the rule file promtool tests.
#[test]
fn monitoring_targets_what_the_operator_creates() {
    use serval_operator::desired::{backend, router};

    let ns = "serval-system";
    let docs = render(
        ns,
        &[
            "--set",
            "metrics.podMonitor.enabled=true,metrics.podMonitor.labels.release=prom",
            "--set",
            "metrics.prometheusRule.enabled=true,metrics.prometheusRule.labels.release=prom",
        ],
    )
    .unwrap();

    let mut digits: serval_api::Backend = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("examples/digits-v1.yaml")).unwrap(),
    )
    .unwrap();
    digits.metadata.namespace = Some("models".to_owned());
    let backend_pods = backend::deployment_for(
        &digits,
        &backend::BackendDefaults {
            sidecar_image: "serval-sidecar".to_owned(),
            service_app_protocol: None,
        },
    );
    let router_pods = router::deployment_for(
        "models",
        &router::RouterDefaults {
            router_image: "serval-router".to_owned(),
            service_app_protocol: None,
        },
        &[],
    );
    for (name, pods, path) in [
        (
            "serval-router",
            router_pods,
            serval_router::server::METRICS_PATH,
        ),
        ("serval-model-servers", backend_pods, "/metrics"),
    ] {
        let monitor = docs
            .iter()
            .find(|d| d["kind"] == "PodMonitor" && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no PodMonitor {name}"));
        assert_eq!(monitor["metadata"]["namespace"], ns);
        assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
        assert_eq!(monitor["spec"]["namespaceSelector"]["any"], true);
        let template = pods.spec.unwrap().template;
        let labels = template.metadata.unwrap().labels.unwrap();
        let selector = monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .unwrap();
        assert!(!selector.is_empty());
        for (k, v) in selector {
            assert_eq!(
                labels.get(k).map(String::as_str),
                v.as_str(),
                "{name} selects {k}={v}, which the operator's pods do not carry"
            );
        }
        let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
        assert_eq!(endpoint["path"], path, "{name}");
        let port = endpoint["port"].as_str().unwrap();
        let containers = template.spec.unwrap().containers;
        let served = containers
            .iter()
            .find(|c| {
                c.ports
                    .iter()
                    .flatten()
                    .any(|p| p.name.as_deref() == Some(port))
            })
            .unwrap_or_else(|| panic!("{name}: no container port named {port}"));
        // Scrapes go where the probes go: the admin port, which a flood of traffic
        // connections cannot block.
        let probed = served
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .map(|g| g.port.clone());
        assert_eq!(
            probed,
            Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(port.to_owned())
            ),
            "{name}: scraped on {port}, probed elsewhere"
        );
        assert_eq!(port, "admin", "{name}");
        // The router's own `endpoint` label must survive the target label of that name.
        assert_eq!(endpoint["relabelings"][0]["action"], "labeldrop");
        assert_eq!(endpoint["relabelings"][0]["regex"], "endpoint");
    }

    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .expect("a PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "prom");
    let file: Value = serde_yaml::from_str(
        &std::fs::read_to_string(chart_dir().join("alerts/serval.rules.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(rule["spec"]["groups"], file["groups"]);

    // One watched namespace: scrape only there.
    let docs = render(
        ns,
        &[
            "--set",
            "metrics.podMonitor.enabled=true,operator.watchNamespace=models",
        ],
    )
    .unwrap();
    for d in docs.iter().filter(|d| d["kind"] == "PodMonitor") {
        assert_eq!(
            d["spec"]["namespaceSelector"],
            serde_json::json!({"matchNames": ["models"]})
        );
    }
}

/// promtool (Prometheus's own checker) accepts the rule file, and its unit tests pass: each
/// alert fires on the failure it names and stays quiet beside normal traffic.
#[test]
fn alert_rules_pass_promtool() {
    let dir = chart_dir().join("alerts");
    let promtool = binaries().unwrap().promtool();
    for args in [
        ["check", "rules", "serval.rules.yaml"],
        ["test", "rules", "serval.rules.test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("running promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every metric the dashboard and the alerts query is one the operator, router or model
/// server exports: a renamed metric would otherwise leave a panel empty or an alert silent.
/// (The encodings list only families with a series, so one of each is recorded first.)
#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    use serval_router::metrics::{
        AddressLabels, CodeLabels, EndpointLabels, ErrorLabels, MirrorLabels, RevisionLabels,
        RouteLabels,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let acceptor = serval_shards::Acceptor::new(listener, 8);

    let mut registry = prometheus_client::registry::Registry::default();
    let m = serval_operator::metrics::Metrics::register(&mut registry);
    m.observe(
        "backend",
        Duration::ZERO,
        Some(&serval_operator::Error::MissingField("uid")),
    );
    // Per-Backend autoscaler families exist once a Backend autoscales.
    let backend_labels = serval_operator::metrics::BackendLabels {
        backend_namespace: "team".to_owned(),
        backend: "v1".to_owned(),
    };
    m.autoscaler_desired.get_or_create(&backend_labels).set(2);
    m.autoscaler_observed
        .get_or_create(&backend_labels)
        .set(3.5);
    m.autoscaler_scales
        .get_or_create(&serval_operator::metrics::ScaleLabels { direction: "up" })
        .inc();
    let mut operator = String::new();
    prometheus_client::encoding::text::encode(&mut operator, &registry).unwrap();

    let m = serval_router::metrics::Metrics::new();
    let (endpoint, backend) = ("digits".to_owned(), "v1".to_owned());
    let route = RouteLabels {
        endpoint: endpoint.clone(),
        backend: backend.clone(),
    };
    m.requests
        .get_or_create(&CodeLabels {
            endpoint: endpoint.clone(),
            backend: backend.clone(),
            code: 200,
        })
        .inc();
    m.request_duration.get_or_create(&route).observe(0.001);
    m.retries.get_or_create(&route).inc();
    m.upstream_errors
        .get_or_create(&ErrorLabels {
            endpoint: endpoint.clone(),
            backend: backend.clone(),
            kind: "connect",
        })
        .inc();
    m.retry_budget_exhausted
        .get_or_create(&EndpointLabels {
            endpoint: endpoint.clone(),
        })
        .inc();
    m.ejections
        .get_or_create(&AddressLabels {
            backend: backend.clone(),
            address: "10.0.0.1:8080".to_owned(),
        })
        .inc();
    m.mirror
        .get_or_create(&MirrorLabels {
            endpoint: endpoint.clone(),
            backend: backend.clone(),
            result: "agree",
        })
        .inc();
    m.mirror_errors
        .get_or_create(&serval_router::metrics::MirrorErrorLabels {
            endpoint,
            backend,
            reason: "shadow_status",
        })
        .inc();
    m.table_info
        .get_or_create(&RevisionLabels {
            revision: "r1".to_owned(),
        })
        .set(1);
    m.count_connections(acceptor.open_connections());
    let router = m.encode();

    let m = serval_sidecar::metrics::Metrics::new("digits");
    m.request(429, Duration::ZERO);
    m.reject("queue_full");
    m.batch(1, Duration::ZERO);
    m.queue_wait(Duration::ZERO);
    m.set_queue_depth(0);
    m.add_inflight(0);
    m.set_model_load(Duration::ZERO);
    m.calibration_point(1, 1.0, true);
    m.idle_poll_counter().inc_by(0.0);
    m.set_ready(true);
    m.count_connections(acceptor.open_connections());
    let sidecar = m.encode();

    let exported: BTreeSet<String> = [operator, router, sidecar]
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.contains("serval_router_requests"), "{exported:?}");

    // The queries: the dashboard's panel targets and the alert rules' expressions.
    let read = |f: &str| std::fs::read_to_string(chart_dir().join(f)).unwrap();
    let dashboard: Value = serde_json::from_str(&read("dashboards/serval.json")).unwrap();
    let rules: Value = serde_yaml::from_str(&read("alerts/serval.rules.yaml")).unwrap();
    let rule_exprs = rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| r["expr"].as_str().map(str::to_owned));
    let exprs = dashboard_exprs(&dashboard).into_iter().chain(rule_exprs);
    let mut queried = BTreeSet::new();
    for expr in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("serval_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            queried.insert(name);
        }
    }
    assert!(queried.len() > 20, "{queried:?}");
    for name in queried {
        let family = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(*f)))
            .unwrap_or(&name);
        assert!(
            exported.contains(family),
            "{name} is queried but no component exports it"
        );
    }
}

/// A misspelt key anywhere fails rendering (and so `helm install`) with the schema's message.
#[test]
fn schema_rejects_typos() {
    for (set, key) in [
        ("operator.replica=2", "replica"),
        ("metric.serviceMonitor.enabled=true", "metric"),
        ("dashboard.enable=true", "enable"),
        ("sidecar.image.repo=x", "repo"),
    ] {
        let out = helm(template_args("default", &["--set", set])).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} rendered");
        assert!(
            stderr.contains("additional properties") && stderr.contains(key),
            "--set {set}: {stderr}"
        );
    }
    // Wrong types are refused too.
    let out = helm(template_args(
        "default",
        &["--set", "operator.replicas=many"],
    ))
    .unwrap();
    assert!(!out.status.success(), "replicas=many rendered");
    // An appProtocol Kubernetes would refuse on every Service is refused at install.
    let out = helm(template_args(
        "default",
        &["--set", "serviceAppProtocol=h2c over tcp"],
    ))
    .unwrap();
    assert!(!out.status.success(), "a bad appProtocol rendered");
}

// ---------------------------------------------------------------------------------------
// Against the real control plane
// ---------------------------------------------------------------------------------------

/// `helm install --wait`; the operator, authenticated as the chart's ServiceAccount,
/// reconciles `examples/`; the same identity cannot read Secrets; `helm test`, `helm
/// upgrade`; `helm uninstall` keeps the CRDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_reconcile_as_the_chart_service_account_and_uninstall() {
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e:#}"));
    let mut operator = None;
    let result = install_scenario(cluster, &mut operator).await;
    let logs = operator.as_ref().map(|op: &Operator| {
        format!(
            "----- operator ({}) -----\n{}",
            op.log_path().display(),
            op.log_tail(OPERATOR_LOG_TAIL)
        )
    });
    // Killed here, also on failure: no stray process.
    let pid = operator.as_ref().map(Operator::pid);
    drop(operator);
    if let Some(pid) = pid {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "operator {pid} survived"
        );
    }
    if let Err(e) = result {
        panic!(
            "{e:#}\n{}\n{}",
            logs.unwrap_or_default(),
            cluster.log_tails(LOG_TAIL_LINES / 3)
        );
    }
}

/// The chart's ServiceMonitor, PodMonitors and PrometheusRule fit the Prometheus Operator's
/// own CRDs: the API server accepts them with strict field validation (an unknown or misspelt
/// field is an error, not silently pruned) and stores every field as rendered.
#[test]
fn monitoring_objects_fit_the_prometheus_operator_crds() {
    let cluster = Cluster::shared().unwrap_or_else(|e| panic!("{e:#}"));
    let crds = binaries().unwrap().monitoring_crds().display().to_string();
    cluster
        .kubectl_ok(["apply", "--server-side", "-f", &crds])
        .unwrap();
    cluster
        .kubectl_ok([
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/podmonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "--timeout=60s",
        ])
        .unwrap();
    let ns = cluster.create_namespace("serval-monitoring").unwrap();
    let rendered: Vec<Value> = render(
        &ns,
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true,\
             metrics.prometheusRule.enabled=true",
        ],
    )
    .unwrap()
    .into_iter()
    .filter(|d| {
        d["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
    })
    .collect();
    assert_eq!(
        rendered.len(),
        4,
        "ServiceMonitor, 2 PodMonitors, PrometheusRule"
    );
    let file = cluster.dir().join(format!("{ns}-monitoring.json"));
    std::fs::write(
        &file,
        serde_json::json!({"apiVersion": "v1", "kind": "List", "items": rendered}).to_string(),
    )
    .unwrap();
    cluster
        .kubectl_ok([
            "apply",
            "--server-side",
            "--validate=strict",
            "-n",
            &ns,
            "-f",
            &file.display().to_string(),
        ])
        .unwrap_or_else(|e| panic!("the API server refused the chart's monitoring objects: {e:#}"));
    for doc in &rendered {
        let (kind, name) = (
            doc["kind"].as_str().unwrap(),
            doc["metadata"]["name"].as_str().unwrap(),
        );
        let stored: Value = serde_json::from_str(
            &cluster
                .kubectl_ok(["-n", &ns, "get", kind, name, "-o", "json"])
                .unwrap(),
        )
        .unwrap();
        if let Some(path) = missing(&doc["spec"], &stored["spec"], "spec") {
            panic!("{kind} {name}: the API server did not keep {path}");
        }
    }
}

/// The first path at which `rendered` has something `stored` lacks or holds differently
/// (fields the server added, such as defaults, are fine).
fn missing(rendered: &Value, stored: &Value, path: &str) -> Option<String> {
    match (rendered, stored) {
        (Value::Object(r), Value::Object(s)) => r.iter().find_map(|(k, v)| match s.get(k) {
            Some(sv) => missing(v, sv, &format!("{path}.{k}")),
            None => Some(format!("{path}.{k}")),
        }),
        (Value::Array(r), Value::Array(s)) if r.len() == s.len() => r
            .iter()
            .zip(s)
            .enumerate()
            .find_map(|(i, (rv, sv))| missing(rv, sv, &format!("{path}[{i}]"))),
        _ if rendered == stored => None,
        _ => Some(path.to_owned()),
    }
}

async fn install_scenario(
    cluster: &Cluster,
    operator: &mut Option<Operator>,
) -> anyhow::Result<()> {
    let ns = cluster.create_namespace("serval-system")?;
    let apps = cluster.create_namespace("serval-apps")?;
    let kubeconfig = cluster.kubeconfig_path().display().to_string();

    // Install: CRDs first, then the templates; --wait until the operator Deployment is
    // available (kwok marks its pod Ready).
    helm_ok([
        "install",
        RELEASE,
        &chart(),
        "--kubeconfig",
        &kubeconfig,
        "-n",
        &ns,
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;
    cluster.kubectl_ok([
        "wait",
        "--for=condition=Established",
        "crd/backends.serval.dev",
        "crd/endpoints.serval.dev",
        "--timeout=60s",
    ])?;
    let available = cluster.kubectl_ok([
        "-n",
        &ns,
        "get",
        "deployment",
        OPERATOR,
        "-o",
        "jsonpath={.status.availableReplicas}",
    ])?;
    ensure!(
        available.trim() == "1",
        "operator Deployment available: {available:?}"
    );

    // The installed RBAC, as the API server holds it: no wildcards, no Secrets.
    let admin = cluster.client().await?;
    let role = Api::<ClusterRole>::all(admin.clone()).get(OPERATOR).await?;
    assert_minimal(role.rules.as_deref().unwrap_or_default())?;

    // A TokenRequest token for the chart's ServiceAccount, in a kubeconfig of its own.
    let token = cluster.kubectl_ok(["-n", &ns, "create", "token", OPERATOR, "--duration=1h"])?;
    let ca = cluster.kubectl_ok([
        "config",
        "view",
        "--raw",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority}",
    ])?;
    let sa_kubeconfig = cluster.dir().join(format!("kubeconfig-{ns}-{OPERATOR}"));
    std::fs::write(
        &sa_kubeconfig,
        token_kubeconfig(cluster.server(), ca.trim(), token.trim()),
    )?;
    let identity = format!("system:serviceaccount:{ns}:{OPERATOR}");

    // The real operator, as that ServiceAccount, watching every namespace (the chart's
    // default) and holding its Lease in the release namespace.
    *operator = Some(Operator::start_with(
        &sa_kubeconfig,
        &cluster.dir().join("logs"),
        OperatorConfig {
            identity: format!("{OPERATOR}-e2e"),
            watch_namespace: None,
            lease_name: LEASE.to_owned(),
            lease_namespace: ns.clone(),
            log_filter: DEFAULT_OPERATOR_LOG_FILTER.to_owned(),
            extra_args: Vec::new(),
        },
    )?);
    let examples = repo_root().join("examples").display().to_string();
    cluster.kubectl_ok(["-n", &apps, "apply", "-f", &examples])?;
    cluster.kubectl_ok([
        "-n",
        &apps,
        "wait",
        "--for=condition=Ready",
        "backend/digits-v1",
        "backend/digits-v2",
        "endpoint/digits",
        &format!("--timeout={READY_TIMEOUT}"),
    ])?;
    let op = operator.as_mut().context("operator")?;
    op.check_running()?;
    // Every write it needed was allowed: children, the router's RBAC, the routing table.
    let routing = Api::<ConfigMap>::namespaced(admin.clone(), &apps)
        .get(ROUTING_CONFIGMAP)
        .await?;
    ensure!(
        routing.data.as_ref().is_some_and(|d| !d.is_empty()),
        "the routing table is empty"
    );
    Api::<Role>::namespaced(admin.clone(), &apps)
        .get("serval-router")
        .await
        .context("the router's Role")?;
    let deployments = Api::<Deployment>::namespaced(admin.clone(), &apps)
        .list(&ListParams::default())
        .await?;
    let names: BTreeSet<String> = deployments
        .items
        .iter()
        .filter_map(|d| d.metadata.name.clone())
        .collect();
    for want in ["digits-v1", "digits-v2", "serval-router"] {
        ensure!(
            names.iter().any(|n| n.contains(want)),
            "no Deployment for {want}: {names:?}"
        );
    }
    let holder = cluster.kubectl_ok([
        "-n",
        &ns,
        "get",
        "lease",
        LEASE,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ])?;
    ensure!(holder == op.identity(), "Lease holder {holder:?}");
    ensure!(
        op.metrics()?.contains("serval_operator_leader 1"),
        "the operator does not report leadership"
    );
    let log = op.log().to_ascii_lowercase();
    ensure!(
        !log.contains("forbidden"),
        "the operator was refused something:\n{}",
        op.log_tail(OPERATOR_LOG_TAIL)
    );

    // Minimal: the same identity is refused on Secrets, by the authorizer and for real.
    Api::<Secret>::namespaced(admin.clone(), &apps)
        .create(
            &Default::default(),
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "model-credentials"},
                "stringData": {"token": "not for the operator"},
            }))?,
        )
        .await?;
    for (verb, scope) in [
        ("get", apps.as_str()),
        ("list", apps.as_str()),
        ("list", ns.as_str()),
    ] {
        let out = cluster.kubectl([
            "auth",
            "can-i",
            verb,
            "secrets",
            "-n",
            scope,
            &format!("--as={identity}"),
        ])?;
        let answer = String::from_utf8_lossy(&out.stdout);
        ensure!(
            answer.trim() == "no" && !out.status.success(),
            "can-i {verb} secrets -n {scope}: {answer}"
        );
    }
    for (verb, resource) in [
        ("create", "pods"),
        ("delete", "backends.serval.dev"),
        ("*", "*"),
    ] {
        let out = cluster.kubectl([
            "auth",
            "can-i",
            verb,
            resource,
            "-n",
            &apps,
            &format!("--as={identity}"),
        ])?;
        ensure!(!out.status.success(), "can-i {verb} {resource}: yes");
    }
    let sa_client = client_from(&sa_kubeconfig).await?;
    let secrets = Api::<Secret>::namespaced(sa_client.clone(), &apps);
    match secrets.get("model-credentials").await {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => bail!("GET a Secret with the operator's token: {other:?}, want 403"),
    }
    match Api::<Secret>::all(sa_client)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 403 => {}
        other => bail!(
            "LIST Secrets with the operator's token: {:?}, want 403",
            other.map(|l| l.items.len())
        ),
    }

    // `helm test`: helm creates the hook Pod and waits for it to succeed. Under kwok no
    // container runs (and kwok completes only Job pods), so this test plays the kubelet: it
    // makes the Pod's two requests to the operator itself, then records the exit.
    let helm_test = {
        let args: Vec<String> = ["test", RELEASE, "--kubeconfig", &kubeconfig, "-n", &ns]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(["--timeout".to_owned(), HELM_TIMEOUT.to_owned()])
            .collect();
        std::thread::spawn(move || helm_ok(args))
    };
    let test_pod = format!("{OPERATOR}-test-healthz");
    wait_for("the helm test Pod running", HOOK_TIMEOUT, || {
        let phase = cluster.kubectl([
            "-n",
            &ns,
            "get",
            "pod",
            &test_pod,
            "-o",
            "jsonpath={.status.phase}",
        ])?;
        Ok((String::from_utf8_lossy(&phase.stdout) == "Running").then_some(()))
    })?;
    let pod = Api::<Pod>::namespaced(admin.clone(), &ns)
        .get(&test_pod)
        .await?;
    let script = pod.spec.context("pod spec")?.containers[0]
        .command
        .clone()
        .unwrap_or_default()
        .join(" ");
    for path in ["/healthz", "/readyz"] {
        ensure!(
            script.contains(path),
            "the hook does not check {path}: {script}"
        );
        let status = http_status(op_addr(operator)?, path)?;
        ensure!(status == 200, "{path} answered {status}");
    }
    cluster.kubectl_ok([
        "-n",
        &ns,
        "patch",
        "pod",
        &test_pod,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Succeeded","containerStatuses":[{"name":"healthz","image":"busybox","imageID":"","ready":false,"restartCount":0,"state":{"terminated":{"exitCode":0,"reason":"Completed"}}}]}}"#,
    ])?;
    let report = helm_test
        .join()
        .map_err(|_| anyhow!("helm test panicked"))??;
    ensure!(
        report.contains("Phase:          Succeeded"),
        "helm test: {report}"
    );

    // `helm upgrade` with a changed value rolls the Deployment.
    helm_ok([
        "upgrade",
        RELEASE,
        &chart(),
        "--kubeconfig",
        &kubeconfig,
        "-n",
        &ns,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &ns)
        .get(OPERATOR)
        .await?;
    let container = &deployment
        .spec
        .context("spec")?
        .template
        .spec
        .context("pod spec")?
        .containers[0];
    ensure!(
        env(container, "RUST_LOG").as_deref() == Some("debug"),
        "upgrade not applied"
    );

    // Uninstall: the operator's objects go, the CRDs and the users' resources stay.
    if let Some(mut op) = operator.take() {
        op.stop();
    }
    helm_ok([
        "uninstall",
        RELEASE,
        "--kubeconfig",
        &kubeconfig,
        "-n",
        &ns,
        "--wait",
        "--timeout",
        HELM_TIMEOUT,
    ])?;
    cluster.kubectl_ok(["get", "crd", "backends.serval.dev", "endpoints.serval.dev"])?;
    cluster.kubectl_ok(["-n", &apps, "get", "backend/digits-v1", "endpoint/digits"])?;
    let gone = cluster.kubectl(["get", "clusterrole", OPERATOR])?;
    ensure!(!gone.status.success(), "the ClusterRole survived uninstall");
    let gone = cluster.kubectl(["-n", &ns, "get", "serviceaccount", OPERATOR])?;
    ensure!(
        !gone.status.success(),
        "the ServiceAccount survived uninstall"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------

/// `images/build.sh` writes an OCI image layout tarball that is also a docker archive: every
/// blob's name is its sha256, sizes match, the config runs the binary as 65532, and the one
/// layer holds the binary, every library `ldd` lists and the loader. With skopeo on the
/// machine, skopeo reads it both ways; as root, the layer runs the binary in a chroot.
#[test]
fn images_are_valid_oci_archives() {
    let binary = operator_binary().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let script = repo_root().join("images/build.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--bin-dir")
        .arg(binary.parent().unwrap())
        .arg("--out-dir")
        .arg(out_dir.path())
        .args(["--tag", "e2e", "serval-operator"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let archive = out_dir.path().join("serval-operator-e2e.tar");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        archive.display().to_string()
    );

    let layout = out_dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    )
    .unwrap();
    let read_json = |rel: &str| -> Value {
        serde_json::from_slice(&std::fs::read(layout.join(rel)).unwrap())
            .unwrap_or_else(|e| panic!("{rel}: {e}"))
    };
    assert_eq!(read_json("oci-layout")["imageLayoutVersion"], "1.0.0");

    // Every blob is named by its digest.
    let blobs = layout.join("blobs/sha256");
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(sha256(&path).unwrap(), name, "blob {name}");
    }
    let blob = |descriptor: &Value| -> PathBuf {
        let digest = descriptor["digest"].as_str().expect("a digest");
        let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
        let path = blobs.join(hex);
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("blob {digest}: {e}"))
            .len();
        assert_eq!(descriptor["size"].as_u64(), Some(size), "size of {digest}");
        path
    };

    let index = read_json("index.json");
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    assert_eq!(
        manifests[0]["annotations"]["org.opencontainers.image.ref.name"],
        "e2e"
    );
    assert_eq!(
        manifests[0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(blob(&manifests[0])).unwrap()).unwrap();
    let config_path = blob(&manifest["config"]);
    let config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    assert_eq!(config["os"], "linux");
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/serval-operator"])
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "a single layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer = blob(&layers[0]);

    // The diff_id is the digest of the uncompressed layer.
    let unpacked = out_dir.path().join("layer.tar");
    let gunzip = Command::new("gzip")
        .arg("-dc")
        .arg(&layer)
        .stdout(std::fs::File::create(&unpacked).unwrap())
        .status()
        .unwrap();
    assert!(gunzip.success());
    assert_eq!(
        config["rootfs"]["diff_ids"],
        serde_json::json!([format!("sha256:{}", sha256(&unpacked).unwrap())])
    );

    // The docker-archive view names the same blobs.
    let docker = read_json("manifest.json");
    let config_hex = config_path.file_name().unwrap().to_string_lossy();
    let layer_hex = layer.file_name().unwrap().to_string_lossy();
    assert_eq!(docker[0]["Config"], format!("blobs/sha256/{config_hex}"));
    assert_eq!(
        docker[0]["Layers"],
        serde_json::json!([format!("blobs/sha256/{layer_hex}")])
    );
    assert_eq!(
        docker[0]["RepoTags"],
        serde_json::json!(["serval-operator:e2e"])
    );

    // The layer holds the binary, its libraries and the loader.
    let listing = run_ok(Command::new("tar").arg("-tf").arg(&unpacked)).unwrap();
    let entries: BTreeSet<&str> = listing.lines().map(|l| l.trim_end_matches('/')).collect();
    let mut needed = vec!["usr/local/bin/serval-operator".to_owned()];
    needed.extend(ldd_paths(&binary).unwrap());
    for path in &needed {
        let path = path.trim_start_matches('/');
        assert!(
            entries.contains(path),
            "the layer lacks {path}: {entries:?}"
        );
    }

    if which("skopeo") {
        for transport in ["oci-archive", "docker-archive"] {
            let out = run_ok(
                Command::new("skopeo")
                    .args(["inspect", "--config"])
                    .arg(format!("{transport}:{}", archive.display())),
            )
            .unwrap_or_else(|e| panic!("skopeo inspect {transport}: {e:#}"));
            let seen: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(seen["config"]["User"], "65532:65532", "{transport}");
        }
    } else {
        panic!(
            "skopeo is required to check the images with a standard tool: `make prereqs` installs it (apt-get install skopeo)"
        );
    }

    // As root, prove the layer is complete: the binary runs from it alone, as user 65532.
    if is_root() && which("chroot") {
        let rootfs = out_dir.path().join("rootfs");
        std::fs::create_dir(&rootfs).unwrap();
        run_ok(
            Command::new("tar")
                .arg("-xf")
                .arg(&unpacked)
                .arg("-C")
                .arg(&rootfs),
        )
        .unwrap();
        let version = run_ok(
            Command::new("chroot")
                .arg("--userspec=65532:65532")
                .arg(&rootfs)
                .args(["/usr/local/bin/serval-operator", "--version"]),
        )
        .unwrap();
        assert!(version.starts_with("serval-operator "), "{version}");
    } else {
        // The chroot proves the layer is self-contained; it needs root (as CI and make test
        // have here). Without it the structural checks above still ran, so say it loudly.
        panic!("the chroot run of the image needs root and chroot(8); run the tests as root");
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/serval")
}

fn chart() -> String {
    chart_dir().display().to_string()
}

fn chart_app_version() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml"))?;
    let chart: Value = serde_yaml::from_str(&text)?;
    chart["appVersion"]
        .as_str()
        .map(str::to_owned)
        .context("Chart.yaml has no appVersion")
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml"));
    files.sort();
    Ok(files)
}

/// Private helm state (repositories, cache), so tests touch nothing of the user's.
fn helm_home() -> &'static Path {
    static HOME: OnceLock<tempfile::TempDir> = OnceLock::new();
    HOME.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("serval-helm-")
            .tempdir()
            .expect("a helm home directory")
    })
    .path()
}

/// The cached control-plane tools (helm, promtool), built on first use.
fn binaries() -> anyhow::Result<&'static Binaries> {
    static BINARIES: OnceLock<Result<Binaries, String>> = OnceLock::new();
    BINARIES
        .get_or_init(|| Binaries::locate().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

fn helm<I, S>(args: I) -> anyhow::Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let binaries = binaries()?;
    let home = helm_home();
    Command::new(binaries.helm())
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .stdin(Stdio::null())
        .output()
        .context("running helm")
}

fn helm_ok<I, S>(args: I) -> anyhow::Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = helm(&args)?;
    if !out.status.success() {
        bail!(
            "helm {} failed ({}):\n{}{}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn template_args(namespace: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "template",
        RELEASE,
        &chart(),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// `helm template` (hooks included), as JSON documents.
fn render(namespace: &str, extra: &[&str]) -> anyhow::Result<Vec<Value>> {
    let yaml = helm_ok(template_args(namespace, extra))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&yaml) {
        let value: Value = k8s_openapi::serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Every panel query of a Grafana dashboard.
fn dashboard_exprs(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect()
}

fn has_kind(docs: &[Value], kind: &str, name: &str) -> bool {
    docs.iter()
        .any(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn object<K: k8s_openapi::serde::de::DeserializeOwned>(
    docs: &[Value],
    kind: &str,
    name: &str,
) -> anyhow::Result<K> {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))?;
    serde_json::from_value(doc.clone()).with_context(|| format!("{kind} {name}"))
}

fn env(container: &Container, name: &str) -> Option<String> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// No wildcard anywhere, nothing on Secrets, no verb that grants more than the rules.
fn assert_minimal(rules: &[PolicyRule]) -> anyhow::Result<()> {
    ensure!(!rules.is_empty(), "no rules");
    for rule in rules {
        let fields = [
            rule.api_groups.as_deref().unwrap_or_default(),
            rule.resources.as_deref().unwrap_or_default(),
            &rule.verbs,
            rule.resource_names.as_deref().unwrap_or_default(),
        ];
        ensure!(
            fields.iter().all(|f| f.iter().all(|v| !v.contains('*'))),
            "wildcard in {rule:?}"
        );
        ensure!(
            rule.non_resource_urls.is_none(),
            "non-resource URLs in {rule:?}"
        );
        let resources = rule.resources.as_deref().unwrap_or_default();
        ensure!(
            !resources
                .iter()
                .any(|r| r == "secrets" || r.starts_with("pods") || r == "nodes"),
            "{rule:?} reaches secrets, pods or nodes"
        );
        ensure!(
            !rule
                .verbs
                .iter()
                .any(|v| FORBIDDEN_VERBS.contains(&v.as_str())),
            "{rule:?} can escalate"
        );
    }
    Ok(())
}

fn token_kubeconfig(server: &str, ca: &str, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: serval-e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: serval-operator
  user:
    token: {token}
contexts:
- name: serval-operator
  context:
    cluster: serval-e2e
    user: serval-operator
current-context: serval-operator
"
    )
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    Ok(kube::Client::try_from(config)?)
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256(path: &Path) -> anyhow::Result<String> {
    let out = run_ok(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

/// Absolute paths of the libraries and loader `ldd` resolves for `binary`.
fn ldd_paths(binary: &Path) -> anyhow::Result<Vec<String>> {
    let out = run_ok(Command::new("ldd").arg(binary))?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(_), Some("=>"), Some(path)) if path.starts_with('/') => Some(path.to_owned()),
                (Some(path), _, _) if path.starts_with('/') => Some(path.to_owned()),
                _ => None,
            }
        })
        .collect())
}

fn op_addr(operator: &Option<Operator>) -> anyhow::Result<std::net::SocketAddr> {
    Ok(operator
        .as_ref()
        .context("the operator is not running")?
        .http_addr())
}

/// Status code of `GET path`, as the hook Pod's `wget` would see it.
fn http_status(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    run_ok(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0")
}
