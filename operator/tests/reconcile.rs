//! Reconcile scenarios against a mock API server. Each scenario lists every call the operator
//! must make, in order; a missing call fails at `expect`, an extra one at `done`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus};
use kube::client::Body;
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use serval_api::routing::RoutingTable;
use serval_api::{Backend, BackendSpec, Endpoint, EndpointSpec};
use serval_operator::autoscaler::{Autoscaler, AutoscalerSettings};
use serval_operator::backoff::FailureCounts;
use serval_operator::context::Context;
use serval_operator::desired::backend::BackendDefaults;
use serval_operator::desired::router::RouterDefaults;
use serval_operator::metrics::Metrics;
use serval_operator::signals::{BackendKey, Load, SignalSource};
use serval_operator::{backend_controller, endpoint_controller};
use tokio::task::JoinHandle;
use tower_test::mock::{Handle, SendResponse};

const NS: &str = "team";

struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// Answers one call of the mock API server.
struct Reply(SendResponse<Response<Body>>);

impl Reply {
    fn json(self, answer: &Value) {
        self.0.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(answer).unwrap()))
                .unwrap(),
        );
    }
}

impl ApiServer {
    /// Waits for the next call (failing with `missing` after 5 s): its method, path, query and
    /// JSON body (`Null` if empty), and the handle that answers it.
    async fn next_call(&mut self, missing: &str) -> (Method, String, String, Value, Reply) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("missing call: {missing}"))
            .expect("client dropped");
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let query = req.uri().query().unwrap_or_default().to_owned();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (method, path, query, body, Reply(send))
    }

    /// Waits for the next call, checks method and path, answers `respond(body)`, returns the body.
    async fn expect(
        &mut self,
        method: Method,
        path: &str,
        respond: impl FnOnce(&Value) -> Value,
    ) -> Value {
        let (got, got_path, query, body, reply) = self.next_call(&format!("{method} {path}")).await;
        assert_eq!(
            (&got, got_path.as_str()),
            (&method, path),
            "unexpected call"
        );
        if method == Method::PATCH {
            assert!(
                query.contains("fieldManager=serval-operator") && query.contains("force=true"),
                "not an SSA: {query}"
            );
        }
        reply.json(&respond(&body));
        body
    }

    /// Echoes an applied object back, as the API server does.
    async fn apply(&mut self, path: &str) -> Value {
        self.expect(Method::PATCH, path, |b| b.clone()).await
    }
}

struct Harness {
    ctx: Arc<Context>,
    server: ApiServer,
    backends: Writer<Backend>,
    endpoints: Writer<Endpoint>,
}

impl Harness {
    /// Puts a Backend in the store the Endpoint reconcile reads, as its reflector would.
    fn add_backend(&mut self, b: Backend) {
        self.backends.apply_watcher_event(&watcher::Event::Apply(b));
    }

    /// Puts an Endpoint in the store, as its reflector would.
    fn add_endpoint(&mut self, e: &Endpoint) {
        self.endpoints
            .apply_watcher_event(&watcher::Event::Apply(e.clone()));
    }

    fn reconcile_endpoint(
        &self,
        e: &Endpoint,
    ) -> JoinHandle<serval_operator::Result<kube::runtime::controller::Action>> {
        tokio::spawn(endpoint_controller::reconcile(
            Arc::new(e.clone()),
            self.ctx.clone(),
        ))
    }
}

fn harness() -> Harness {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let (backend_store, backends) = reflector::store();
    let (endpoint_store, endpoints) = reflector::store();
    let ctx = Arc::new(Context {
        client: Client::new(svc, "default"),
        metrics: Metrics::register(&mut Registry::default()),
        backends: backend_store,
        endpoints: endpoint_store,
        backend_defaults: BackendDefaults {
            sidecar_image: "serval-sidecar:test".to_owned(),
            service_app_protocol: None,
        },
        router_defaults: RouterDefaults {
            router_image: "serval-router:test".to_owned(),
            service_app_protocol: None,
        },
        failures: FailureCounts::default(),
        namespace_applied: Default::default(),
    });
    Harness {
        ctx,
        server: ApiServer(handle),
        backends,
        endpoints,
    }
}

/// The reconcile must finish, with no further call, soon after the last expected one.
async fn done<T: std::fmt::Debug>(task: JoinHandle<serval_operator::Result<T>>) {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("reconcile is blocked on an extra API call")
        .expect("reconcile panicked")
        .expect("reconcile failed");
}

fn backend(name: &str, replicas: i32) -> Backend {
    let spec: BackendSpec = serde_json::from_value(json!({
        "model": {"uri": "https://models.example/digits.onnx", "sha256": "A".repeat(64)},
        "replicas": replicas,
        "postprocess": {"labels": ["zero", "one"], "topK": 1},
    }))
    .unwrap();
    let mut b = Backend::new(name, spec);
    b.meta_mut().namespace = Some(NS.to_owned());
    b.meta_mut().uid = Some(format!("uid-{name}"));
    b.meta_mut().generation = Some(1);
    b
}

fn with_ready(mut b: Backend, ready: bool) -> Backend {
    let t = k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap();
    let replicas = b.spec.replicas;
    b.status = Some(serval_operator::desired::backend::status_for(
        &b,
        Some(&deployment_reporting(&b, if ready { replicas } else { 0 })),
        t,
    ));
    b
}

fn endpoint(name: &str, traffic: &[(&str, u32)], created: i64) -> Endpoint {
    let spec: EndpointSpec = serde_json::from_value(json!({
        "route": {"pathPrefix": "/digits"},
        "traffic": traffic.iter().map(|(b, w)| json!({"backend": b, "weight": w})).collect::<Vec<_>>(),
    }))
    .unwrap();
    let mut e = Endpoint::new(name, spec);
    e.meta_mut().namespace = Some(NS.to_owned());
    e.meta_mut().uid = Some(format!("uid-{name}"));
    e.meta_mut().generation = Some(1);
    e.meta_mut().creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(created).unwrap(),
    ));
    e
}

/// A Deployment as the API server returns it, reporting `ready` replicas of the current spec.
fn deployment_reporting(b: &Backend, ready: i32) -> Deployment {
    let mut d = serval_operator::desired::backend::deployment_for(
        b,
        &BackendDefaults {
            sidecar_image: "serval-sidecar:test".to_owned(),
            service_app_protocol: None,
        },
    );
    d.metadata.generation = Some(1);
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        replicas: Some(b.spec.replicas),
        updated_replicas: Some(b.spec.replicas),
        ready_replicas: Some(ready),
        ..DeploymentStatus::default()
    });
    d
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

// ---------------------------------------------------------------- Backend

#[tokio::test]
async fn backend_create_applies_deployment_and_service_then_status() {
    let mut h = harness();
    let b = Arc::new(backend("digits-v1", 1));
    let task = tokio::spawn(backend_controller::reconcile(b.clone(), h.ctx.clone()));

    let dep = h
        .server
        .expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/team/deployments/digits-v1",
            |body| {
                // Freshly created: no pod ready yet.
                let mut d: Deployment = serde_json::from_value(body.clone()).unwrap();
                d.metadata.generation = Some(1);
                d.status = Some(DeploymentStatus {
                    observed_generation: Some(1),
                    ..DeploymentStatus::default()
                });
                serde_json::to_value(d).unwrap()
            },
        )
        .await;
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(
        dep["metadata"]["ownerReferences"][0]["uid"],
        "uid-digits-v1"
    );
    assert_eq!(dep["metadata"]["ownerReferences"][0]["controller"], true);
    let svc = h
        .server
        .apply("/api/v1/namespaces/team/services/digits-v1")
        .await;
    assert_eq!(svc["spec"]["selector"]["serval.dev/backend"], "digits-v1");
    // One replica: no PodDisruptionBudget. With no status yet, one may linger from a crash.
    h.server
        .expect(
            Method::DELETE,
            "/apis/policy/v1/namespaces/team/poddisruptionbudgets/digits-v1",
            |_| json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .await;
    let status = h
        .server
        .expect(
            Method::PATCH,
            "/apis/serval.dev/v1alpha1/namespaces/team/backends/digits-v1/status",
            |_| serde_json::to_value(b.as_ref()).unwrap(),
        )
        .await;
    let ready = condition(&status["status"], "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("ReplicasNotReady"))
    );
    assert_eq!(status["status"]["replicasSummary"], "0/1");
    // What the scale subresource reports as the pods' selector (for HorizontalPodAutoscalers).
    assert_eq!(status["status"]["selector"], "serval.dev/backend=digits-v1");
    assert_eq!(status["status"]["observedGeneration"], 1);
    done(task).await;
}

#[tokio::test]
async fn backend_scale_up_adds_a_pdb_and_scale_down_removes_it() {
    let mut h = harness();
    // Was 1 replica and Ready; now 3.
    let mut b = with_ready(backend("digits-v1", 1), true);
    b.spec.replicas = 3;
    b.meta_mut().generation = Some(2);
    let b = Arc::new(b);
    let task = tokio::spawn(backend_controller::reconcile(b.clone(), h.ctx.clone()));
    let dep = h
        .server
        .apply("/apis/apps/v1/namespaces/team/deployments/digits-v1")
        .await;
    assert_eq!(dep["spec"]["replicas"], 3);
    h.server
        .apply("/api/v1/namespaces/team/services/digits-v1")
        .await;
    let pdb = h
        .server
        .apply("/apis/policy/v1/namespaces/team/poddisruptionbudgets/digits-v1")
        .await;
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let status = h
        .server
        .expect(
            Method::PATCH,
            "/apis/serval.dev/v1alpha1/namespaces/team/backends/digits-v1/status",
            |_| serde_json::to_value(b.as_ref()).unwrap(),
        )
        .await;
    assert_eq!(status["status"]["replicas"], 3);
    assert_eq!(
        condition(&status["status"], "Progressing")["status"],
        "True"
    );
    done(task).await;

    // Back down to 1: the PDB the last status implies is deleted.
    let mut h = harness();
    let mut b3 = with_ready(backend("digits-v1", 3), true);
    b3.spec.replicas = 1;
    let b3 = Arc::new(b3);
    let task = tokio::spawn(backend_controller::reconcile(b3.clone(), h.ctx.clone()));
    h.server
        .apply("/apis/apps/v1/namespaces/team/deployments/digits-v1")
        .await;
    h.server
        .apply("/api/v1/namespaces/team/services/digits-v1")
        .await;
    h.server
        .expect(
            Method::DELETE,
            "/apis/policy/v1/namespaces/team/poddisruptionbudgets/digits-v1",
            |_| json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
        )
        .await;
    h.server
        .expect(
            Method::PATCH,
            "/apis/serval.dev/v1alpha1/namespaces/team/backends/digits-v1/status",
            |_| serde_json::to_value(b3.as_ref()).unwrap(),
        )
        .await;
    done(task).await;
}

#[tokio::test]
async fn backend_becoming_ready_flips_status_once_then_writes_nothing() {
    let mut h = harness();
    let b = Arc::new(with_ready(backend("digits-v1", 1), false));
    let task = tokio::spawn(backend_controller::reconcile(b.clone(), h.ctx.clone()));
    let ready_dep = deployment_reporting(&b, 1);
    h.server
        .expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/team/deployments/digits-v1",
            |_| serde_json::to_value(&ready_dep).unwrap(),
        )
        .await;
    h.server
        .apply("/api/v1/namespaces/team/services/digits-v1")
        .await;
    let status = h
        .server
        .expect(
            Method::PATCH,
            "/apis/serval.dev/v1alpha1/namespaces/team/backends/digits-v1/status",
            |_| serde_json::to_value(b.as_ref()).unwrap(),
        )
        .await;
    let ready = condition(&status["status"], "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("ReplicasReady"))
    );
    done(task).await;

    // Next reconcile with that status stored: nothing changed, so no status write.
    let mut stored = (*b).clone();
    stored.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    let task = tokio::spawn(backend_controller::reconcile(
        Arc::new(stored),
        h.ctx.clone(),
    ));
    h.server
        .expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/team/deployments/digits-v1",
            |_| serde_json::to_value(&ready_dep).unwrap(),
        )
        .await;
    h.server
        .apply("/api/v1/namespaces/team/services/digits-v1")
        .await;
    done(task).await;
}

// ---------------------------------------------------------------- Endpoint

/// Serves the six namespace-level applies and returns the routing table and router Deployment.
async fn expect_router_objects(
    server: &mut ApiServer,
    router_ready: bool,
) -> (RoutingTable, Value) {
    server
        .apply("/api/v1/namespaces/team/serviceaccounts/serval-router")
        .await;
    let role = server
        .apply("/apis/rbac.authorization.k8s.io/v1/namespaces/team/roles/serval-router")
        .await;
    assert_eq!(
        role["rules"][0]["resourceNames"],
        json!(["serval-routing"]),
        "router reads its table only"
    );
    server
        .apply("/apis/rbac.authorization.k8s.io/v1/namespaces/team/rolebindings/serval-router")
        .await;
    let cm = server
        .apply("/api/v1/namespaces/team/configmaps/serval-routing")
        .await;
    server
        .apply("/api/v1/namespaces/team/services/serval-router")
        .await;
    let dep = server
        .expect(
            Method::PATCH,
            "/apis/apps/v1/namespaces/team/deployments/serval-router",
            |body| {
                let mut d = body.clone();
                d["status"] =
                    json!({"readyReplicas": if router_ready { 2 } else { 0 }, "replicas": 2});
                d
            },
        )
        .await;
    let table =
        RoutingTable::from_json(cm["data"]["routing.json"].as_str().unwrap().as_bytes()).unwrap();
    (table, dep)
}

/// Serves a reconcile in which only the table changed: the ConfigMap alone is re-applied, and
/// the router (`dep`, as the first reconcile stored it) is read for its readiness.
async fn expect_table_only(server: &mut ApiServer, dep: &Value) -> RoutingTable {
    let cm = server
        .apply("/api/v1/namespaces/team/configmaps/serval-routing")
        .await;
    let stored = dep.clone();
    server
        .expect(
            Method::GET,
            "/apis/apps/v1/namespaces/team/deployments/serval-router",
            |_| stored,
        )
        .await;
    RoutingTable::from_json(cm["data"]["routing.json"].as_str().unwrap().as_bytes()).unwrap()
}

async fn expect_endpoint_status(server: &mut ApiServer, ep: &Endpoint) -> Value {
    let path = format!(
        "/apis/serval.dev/v1alpha1/namespaces/team/endpoints/{}/status",
        ep.meta().name.as_ref().unwrap()
    );
    let echo = serde_json::to_value(ep).unwrap();
    server.expect(Method::PATCH, &path, |_| echo).await["status"].clone()
}

fn weights(table: &RoutingTable, endpoint: &str) -> Vec<(String, u32)> {
    table
        .route(endpoint)
        .unwrap()
        .traffic
        .iter()
        .map(|t| (t.backend.clone(), t.weight))
        .collect()
}

#[tokio::test]
async fn endpoint_with_ready_backends_gets_the_declared_split() {
    let mut h = harness();
    for b in [
        with_ready(backend("v1", 1), true),
        with_ready(backend("v2", 1), true),
    ] {
        h.add_backend(b);
    }
    let ep = endpoint("digits", &[("v1", 90), ("v2", 10)], 100);
    h.add_endpoint(&ep);
    let task = h.reconcile_endpoint(&ep);
    let (table, dep) = expect_router_objects(&mut h.server, true).await;
    assert_eq!(
        weights(&table, "digits"),
        [("v1".to_owned(), 90), ("v2".to_owned(), 10)]
    );
    assert_eq!(table.backends["v1"].addresses, ["v1.team.svc:8080"]);
    assert_eq!(dep["metadata"]["ownerReferences"][0]["uid"], "uid-digits");
    let status = expect_endpoint_status(&mut h.server, &ep).await;
    assert_eq!(status["trafficSummary"], "v1=90%,v2=10%");
    assert_eq!(condition(&status, "Ready")["status"], "True");
    assert_eq!(status["url"], "http://serval-router.team.svc/digits");
    done(task).await;

    // A weight change reaches the table.
    let mut changed = ep.clone();
    changed.spec.traffic[0].weight = 50;
    changed.spec.traffic[1].weight = 50;
    changed.meta_mut().generation = Some(2);
    changed.status = Some(serde_json::from_value(status).unwrap());
    h.add_endpoint(&changed);
    let task = h.reconcile_endpoint(&changed);
    let table = expect_table_only(&mut h.server, &dep).await;
    assert_eq!(
        weights(&table, "digits"),
        [("v1".to_owned(), 50), ("v2".to_owned(), 50)]
    );
    let status = expect_endpoint_status(&mut h.server, &changed).await;
    assert_eq!(status["trafficSummary"], "v1=50%,v2=50%");
    assert_eq!(status["observedGeneration"], 2);
    done(task).await;
}

#[tokio::test]
async fn missing_backend_gets_no_traffic_and_a_condition() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    let ep = endpoint("digits", &[("v1", 90), ("v2", 10)], 100);
    h.add_endpoint(&ep);
    let task = h.reconcile_endpoint(&ep);
    let (table, _) = expect_router_objects(&mut h.server, true).await;
    assert_eq!(
        weights(&table, "digits"),
        [("v1".to_owned(), 90), ("v2".to_owned(), 0)]
    );
    assert!(table.backends["v2"].addresses.is_empty() && !table.backends["v2"].ready);
    let status = expect_endpoint_status(&mut h.server, &ep).await;
    let degraded = condition(&status, "Degraded");
    assert_eq!(
        (degraded["status"].as_str(), degraded["reason"].as_str()),
        (Some("True"), Some("BackendNotFound"))
    );
    assert!(degraded["message"].as_str().unwrap().contains("v2"));
    assert_eq!(status["trafficSummary"], "v1=100%,v2=0%");
    assert_eq!(
        condition(&status, "Ready")["status"],
        "True",
        "v1 still serves"
    );
    done(task).await;
}

#[tokio::test]
async fn backend_becoming_ready_receives_its_weight() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    h.add_backend(with_ready(backend("v2", 1), false));
    let ep = endpoint("digits", &[("v1", 90), ("v2", 10)], 100);
    h.add_endpoint(&ep);
    let task = h.reconcile_endpoint(&ep);
    let (table, dep) = expect_router_objects(&mut h.server, true).await;
    assert_eq!(weights(&table, "digits")[1], ("v2".to_owned(), 0));
    let status = expect_endpoint_status(&mut h.server, &ep).await;
    assert_eq!(condition(&status, "Degraded")["reason"], "BackendNotReady");
    done(task).await;

    h.add_backend(with_ready(backend("v2", 1), true));
    let mut ep2 = ep.clone();
    ep2.status = Some(serde_json::from_value(status).unwrap());
    let task = h.reconcile_endpoint(&ep2);
    let table = expect_table_only(&mut h.server, &dep).await;
    assert_eq!(weights(&table, "digits")[1], ("v2".to_owned(), 10));
    let status = expect_endpoint_status(&mut h.server, &ep2).await;
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    done(task).await;
}

#[tokio::test]
async fn later_endpoint_on_a_claimed_route_is_left_out() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    let first = endpoint("digits", &[("v1", 100)], 100);
    let later = endpoint("digits-copy", &[("v1", 100)], 200);
    for e in [&first, &later] {
        h.add_endpoint(e);
    }
    let task = h.reconcile_endpoint(&later);
    let (table, dep) = expect_router_objects(&mut h.server, true).await;
    assert!(table.route("digits").is_some() && table.route("digits-copy").is_none());
    assert_eq!(
        dep["metadata"]["ownerReferences"].as_array().unwrap().len(),
        2,
        "owned by both"
    );
    let status = expect_endpoint_status(&mut h.server, &later).await;
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("RouteConflict"))
    );
    assert!(ready["message"].as_str().unwrap().contains("\"digits\""));
    done(task).await;
}

#[tokio::test]
async fn deleting_an_endpoint_or_backend_rewrites_the_table_for_the_rest() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    h.add_backend(with_ready(backend("v2", 1), true));
    let a = endpoint("a", &[("v1", 100)], 100);
    let mut b = endpoint("b", &[("v2", 100)], 200);
    b.spec.route.path_prefix = "/other".to_owned();
    for e in [&a, &b] {
        h.add_endpoint(e);
    }
    // b is deleted: the reconcile of its sibling a drops b's route and ownership.
    h.endpoints
        .apply_watcher_event(&watcher::Event::Delete(b.clone()));
    let refs = endpoint_controller::siblings_of(&b, &h.ctx.endpoints.state());
    assert_eq!(refs.len(), 1, "b's deletion triggers a");
    let task = h.reconcile_endpoint(&a);
    let (table, dep) = expect_router_objects(&mut h.server, true).await;
    assert!(table.route("b").is_none() && table.route("a").is_some());
    assert!(!table.backends.contains_key("v2"));
    assert_eq!(
        dep["metadata"]["ownerReferences"].as_array().unwrap().len(),
        1
    );
    expect_endpoint_status(&mut h.server, &a).await;
    done(task).await;

    // Backend v1 deleted: a is triggered and reports it missing with no traffic (503s).
    let v1 = with_ready(backend("v1", 1), true);
    h.backends
        .apply_watcher_event(&watcher::Event::Delete(v1.clone()));
    let triggered = endpoint_controller::endpoints_using(&v1, &h.ctx.endpoints.state());
    assert_eq!(triggered.len(), 1);
    let task = h.reconcile_endpoint(&a);
    let table = expect_table_only(&mut h.server, &dep).await;
    assert_eq!(weights(&table, "a"), [("v1".to_owned(), 0)]);
    let status = expect_endpoint_status(&mut h.server, &a).await;
    let ready = condition(&status, "Ready");
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("NoReadyBackend"))
    );
    assert_eq!(condition(&status, "Degraded")["reason"], "BackendNotFound");
    done(task).await;
}

#[tokio::test]
async fn router_not_ready_keeps_endpoint_unready() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    let ep = endpoint("digits", &[("v1", 100)], 100);
    h.add_endpoint(&ep);
    let task = h.reconcile_endpoint(&ep);
    expect_router_objects(&mut h.server, false).await;
    let status = expect_endpoint_status(&mut h.server, &ep).await;
    assert_eq!(condition(&status, "Ready")["reason"], "RouterNotReady");
    assert_eq!(condition(&status, "Progressing")["status"], "True");
    done(task).await;
}

#[tokio::test]
async fn unchanged_namespace_objects_are_read_not_rewritten() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    let ep = endpoint("digits", &[("v1", 100)], 100);
    h.add_endpoint(&ep);
    let task = h.reconcile_endpoint(&ep);
    let (_, dep) = expect_router_objects(&mut h.server, true).await;
    let status = expect_endpoint_status(&mut h.server, &ep).await;
    done(task).await;

    // Same table, same owners, status already stored: one read for the router's readiness,
    // no write at all (with N Endpoints sharing the table, writes would otherwise grow as N²).
    let mut stored = ep.clone();
    stored.status = Some(serde_json::from_value(status).unwrap());
    let task = tokio::spawn(endpoint_controller::reconcile(
        Arc::new(stored),
        h.ctx.clone(),
    ));
    h.server
        .expect(
            Method::GET,
            "/apis/apps/v1/namespaces/team/deployments/serval-router",
            |_| {
                let mut d = dep.clone();
                d["status"] = json!({"readyReplicas": 2, "replicas": 2});
                d
            },
        )
        .await;
    done(task).await;
}

/// Two Endpoints of one namespace reconciled at once: the shared objects are sent once, not
/// once per Endpoint (concurrent applies of the same large objects made etcd time out at 200).
#[tokio::test]
async fn concurrent_siblings_send_the_shared_objects_once() {
    let mut h = harness();
    h.add_backend(with_ready(backend("v1", 1), true));
    let a = endpoint("a", &[("v1", 100)], 100);
    let mut b = endpoint("b", &[("v1", 100)], 200);
    b.spec.route.path_prefix = "/other".to_owned();
    for e in [&a, &b] {
        h.add_endpoint(e);
    }
    let tasks = [h.reconcile_endpoint(&a), h.reconcile_endpoint(&b)];

    let mut calls = std::collections::BTreeMap::<(Method, String), usize>::new();
    let mut router = Value::Null;
    // 6 applies, one read of the router by the reconcile that waited, 2 statuses.
    for _ in 0..9 {
        let (method, path, _, body, reply) = h.server.next_call("one of the 9").await;
        let answer = if method == Method::GET {
            router.clone()
        } else if path.ends_with("/status") {
            let e = if path.contains("/endpoints/a/") {
                &a
            } else {
                &b
            };
            serde_json::to_value(e).unwrap()
        } else {
            let mut body = body;
            if path.ends_with("/deployments/serval-router") {
                body["status"] = json!({"readyReplicas": 2, "replicas": 2});
                router = body.clone();
            }
            body
        };
        reply.json(&answer);
        *calls.entry((method, path)).or_default() += 1;
    }
    for task in tasks {
        done(task).await;
    }
    let repeated: Vec<_> = calls.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "sent more than once: {repeated:?}");
    assert_eq!(
        calls.get(&(
            Method::GET,
            "/apis/apps/v1/namespaces/team/deployments/serval-router".to_owned()
        )),
        Some(&1),
        "the second reconcile reads the router: {calls:?}"
    );
}

// ---------------------------------------------------------------- Autoscaling

/// Load a test scripts: the same answer to every read until changed.
#[derive(Default)]
struct ScriptedLoad(std::sync::Mutex<(Option<Load>, u64)>);

impl ScriptedLoad {
    fn set(&self, load: Option<Load>, held: u64) {
        *self.0.lock().unwrap() = (load, held);
    }
}

impl SignalSource for ScriptedLoad {
    fn load<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, Load>> {
        let (load, _) = *self.0.lock().unwrap();
        let out = backends
            .iter()
            .filter_map(|k| Some((k.clone(), load?)))
            .collect();
        Box::pin(async move { out })
    }

    fn held<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, u64>> {
        let (_, held) = *self.0.lock().unwrap();
        let out = backends.iter().map(|k| (k.clone(), held)).collect();
        Box::pin(async move { out })
    }

    fn routers<'a>(
        &'a self,
        _namespace: &'a str,
    ) -> BoxFuture<'a, BTreeMap<String, serval_api::signals::RouterSignals>> {
        Box::pin(async move { BTreeMap::new() })
    }
}

fn autoscaled(name: &str, autoscaling: Value) -> Backend {
    let mut b = backend(name, 2);
    b.spec.autoscaling = Some(serde_json::from_value(autoscaling).unwrap());
    b
}

/// Runs one autoscaler step in a task and hands the autoscaler back.
fn step(a: Autoscaler, ctx: &Arc<Context>) -> JoinHandle<Autoscaler> {
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut a = a;
        a.step(&ctx, std::time::Instant::now()).await;
        a
    })
}

/// The step must finish, with no further call, soon after the last expected one.
async fn finished(task: JoinHandle<Autoscaler>) -> Autoscaler {
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the step is blocked on an extra API call")
        .expect("the step panicked")
}

/// Serves the autoscaler's status write (its own field manager) and returns the
/// `status.autoscaling` it sent.
async fn expect_autoscaling_status(server: &mut ApiServer, b: &Backend) -> Value {
    let (method, path, query, body, reply) = server.next_call("autoscaler status").await;
    assert_eq!(
        (method, path.as_str()),
        (
            Method::PATCH,
            "/apis/serval.dev/v1alpha1/namespaces/team/backends/auto/status"
        )
    );
    assert!(
        query.contains("fieldManager=serval-operator-autoscaler") && query.contains("force=true"),
        "{query}"
    );
    assert_eq!(
        body["status"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["autoscaling"],
        "the autoscaler writes its own field only"
    );
    reply.json(&serde_json::to_value(b).unwrap());
    body["status"]["autoscaling"].clone()
}

/// Serves the Event of a scale and returns it.
async fn expect_event(server: &mut ApiServer) -> Value {
    server
        .expect(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/team/events",
            |b| b.clone(),
        )
        .await
}

/// A surge reaches a decision, the decision reaches the status (not the spec) with an Event,
/// and the Backend reconcile then sets the Deployment's replicas from the status. A second
/// sample with the same load writes nothing.
#[tokio::test]
async fn an_autoscaling_decision_is_recorded_in_status_with_an_event_and_sets_the_deployment() {
    let mut h = harness();
    let b = with_ready(
        autoscaled(
            "auto",
            json!({"minReplicas": 1, "maxReplicas": 5, "targetInflight": 8}),
        ),
        true,
    );
    assert_eq!(
        b.status.as_ref().unwrap().replicas,
        2,
        "before any decision: spec.replicas within the bounds"
    );
    h.add_backend(b.clone());
    let load = Arc::new(ScriptedLoad::default());
    // 24 in flight on 2 replicas at a target of 8: three replicas.
    load.set(
        Some(Load {
            inflight: 24.0,
            requests: 300,
        }),
        0,
    );
    let a = Autoscaler::new(AutoscalerSettings::default(), load.clone(), "test");
    let task = step(a, &h.ctx);
    let autoscaling = expect_autoscaling_status(&mut h.server, &b).await;
    assert_eq!(autoscaling["desiredReplicas"], 3, "{autoscaling}");
    assert_eq!(autoscaling["observedInflight"], 24.0);
    assert_eq!(autoscaling["lastDecision"], "StableAverage");
    assert!(
        autoscaling["message"]
            .as_str()
            .unwrap()
            .contains("spec.replicas (2) is ignored"),
        "{autoscaling}"
    );
    assert!(autoscaling["lastScaleTime"].is_string());
    let event = expect_event(&mut h.server).await;
    assert_eq!(event["reason"], "ScaledUp");
    assert_eq!(event["action"], "Scale");
    assert_eq!(event["regarding"]["name"], "auto");
    assert_eq!(event["regarding"]["kind"], "Backend");
    let note = event["note"].as_str().unwrap();
    assert!(note.starts_with("2 -> 3 replicas"), "{note}");
    assert!(note.contains("24.0 in flight"), "{note}");
    let a = finished(task).await;

    // The same load a second later: the status already says it, so no write.
    let task = step(a, &h.ctx);
    let _a = finished(task).await;

    // The Backend as the API server now has it: the controller sizes the Deployment from the
    // decision, and never sends the autoscaler's field back.
    let mut decided = b.clone();
    decided.status.as_mut().unwrap().autoscaling =
        Some(serde_json::from_value(autoscaling).unwrap());
    let decided = Arc::new(decided);
    let task = tokio::spawn(backend_controller::reconcile(
        decided.clone(),
        h.ctx.clone(),
    ));
    let dep = h
        .server
        .apply("/apis/apps/v1/namespaces/team/deployments/auto")
        .await;
    assert_eq!(dep["spec"]["replicas"], 3);
    h.server
        .apply("/api/v1/namespaces/team/services/auto")
        .await;
    h.server
        .apply("/apis/policy/v1/namespaces/team/poddisruptionbudgets/auto")
        .await;
    let status = h
        .server
        .expect(
            Method::PATCH,
            "/apis/serval.dev/v1alpha1/namespaces/team/backends/auto/status",
            |_| serde_json::to_value(decided.as_ref()).unwrap(),
        )
        .await;
    assert_eq!(status["status"]["replicas"], 3);
    assert!(
        status["status"].get("autoscaling").is_none(),
        "the Backend controller must not write the autoscaler's field: {status}"
    );
    done(task).await;
}

/// A Backend at zero keeps its route with its requests held, and a held request starts a
/// replica on the next poll, without waiting for the next load sample.
#[tokio::test]
async fn a_backend_at_zero_keeps_its_route_and_a_held_request_starts_a_replica() {
    let mut h = harness();
    let mut b = with_ready(
        autoscaled(
            "auto",
            json!({"minReplicas": 0, "maxReplicas": 4, "targetInflight": 1}),
        ),
        false,
    );
    b.status.as_mut().unwrap().autoscaling = Some(serval_api::AutoscalingStatus {
        desired_replicas: 0,
        observed_inflight: Some(0.0),
        last_decision: "ScaleToZero".to_owned(),
        message: String::new(),
        last_scale_time: None,
    });
    let b = with_status_from_deployment(b);
    assert!(serval_operator::desired::backend::holds_at_zero(&b));
    h.add_backend(b.clone());

    // The routing table keeps the route's weight and marks the Backend scaled to zero.
    let ep = endpoint("digits", &[("auto", 100)], 100);
    h.add_endpoint(&ep);
    let task = h.reconcile_endpoint(&ep);
    let (table, _) = expect_router_objects(&mut h.server, true).await;
    assert_eq!(weights(&table, "digits"), [("auto".to_owned(), 100)]);
    assert!(table.backends["auto"].scaled_to_zero);
    assert!(table.backends["auto"].addresses.is_empty());
    let status = expect_endpoint_status(&mut h.server, &ep).await;
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");
    done(task).await;

    // Idle: the first sample finds nothing to do but record why.
    let load = Arc::new(ScriptedLoad::default());
    load.set(Some(Load::default()), 0);
    let a = Autoscaler::new(AutoscalerSettings::default(), load.clone(), "test");
    let task = step(a, &h.ctx);
    let autoscaling = expect_autoscaling_status(&mut h.server, &b).await;
    assert_eq!(
        (
            &autoscaling["desiredReplicas"],
            &autoscaling["lastDecision"]
        ),
        (&json!(0), &json!("IdleAtZero"))
    );
    let a = finished(task).await;

    // Two requests held: the next poll (well before the next sample) starts two replicas.
    load.set(Some(Load::default()), 2);
    let task = step(a, &h.ctx);
    let autoscaling = expect_autoscaling_status(&mut h.server, &b).await;
    assert_eq!(
        (
            &autoscaling["desiredReplicas"],
            &autoscaling["lastDecision"]
        ),
        (&json!(2), &json!("ColdStart"))
    );
    let event = expect_event(&mut h.server).await;
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .starts_with("0 -> 2 replicas"),
        "{event}"
    );
    finished(task).await;
}

/// The Backend's status as its controller computes it from the Deployment its current
/// desired count makes (not `spec.replicas`), with no replica ready.
fn with_status_from_deployment(mut b: Backend) -> Backend {
    let t = k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap();
    let mut d = serval_operator::desired::backend::deployment_for(
        &b,
        &BackendDefaults {
            sidecar_image: "serval-sidecar:test".to_owned(),
            service_app_protocol: None,
        },
    );
    d.metadata.generation = Some(1);
    d.status = Some(DeploymentStatus {
        observed_generation: Some(1),
        ..DeploymentStatus::default()
    });
    b.status = Some(serval_operator::desired::backend::status_for(
        &b,
        Some(&d),
        t,
    ));
    b
}

/// An autoscaled Backend stays Ready while a scale-up loads its new replicas, so its Endpoints
/// keep routing to it; a Backend at a fixed count keeps the stricter rule.
#[test]
fn an_autoscaled_backend_serves_while_new_replicas_load() {
    let mut b = autoscaled("auto", json!({"maxReplicas": 6}));
    b.status = Some(serval_api::BackendStatus {
        autoscaling: Some(serval_api::AutoscalingStatus {
            desired_replicas: 5,
            last_decision: "PanicSurge".to_owned(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let t = k8s_openapi::jiff::Timestamp::from_second(1_000).unwrap();
    let mut d = deployment_reporting(&b, 1);
    d.spec.as_mut().unwrap().replicas = Some(5);
    let status = serval_operator::desired::backend::status_for(&b, Some(&d), t);
    assert_eq!(status.replicas_summary, "1/5");
    let status = serde_json::to_value(&status).unwrap();
    assert_eq!(condition(&status, "Ready")["status"], "True", "{status}");
    assert_eq!(condition(&status, "Degraded")["status"], "False");

    let fixed = with_ready(backend("fixed", 5), false);
    let status = serde_json::to_value(fixed.status.as_ref().unwrap()).unwrap();
    assert_eq!(condition(&status, "Ready")["status"], "False");
}

/// Found on a real node: a cascade was re-planned only when its first stage changed, so a
/// later stage turning Ready left it answering 503. Every stage triggers it now.
#[test]
fn a_cascade_is_reconciled_when_any_of_its_stages_changes() {
    let mut cascade = endpoint("c", &[], 1_000);
    cascade.spec.cascade = Some(
        serde_json::from_value(json!({"output": "p", "stages": [
            {"backend": "small", "minConfidence": 0.9}, {"backend": "large"}
        ]}))
        .unwrap(),
    );
    let endpoints = vec![
        Arc::new(cascade),
        Arc::new(endpoint("t", &[("v1", 100)], 1_000)),
    ];
    for stage in ["small", "large"] {
        let triggered = endpoint_controller::endpoints_using(&backend(stage, 1), &endpoints);
        assert_eq!(triggered.len(), 1, "{stage}");
        assert_eq!(triggered[0].name, "c");
    }
    assert!(endpoint_controller::endpoints_using(&backend("other", 1), &endpoints).is_empty());
}

/// A composition reaching a Backend through another Endpoint is reconciled when that Backend
/// changes, as its own Backends would, and so are its callers in turn.
#[test]
fn an_endpoint_calling_an_endpoint_is_reconciled_when_the_callees_backend_changes() {
    let with = |name: &str, spec: serde_json::Value| {
        let mut e = endpoint(name, &[], 1_000);
        e.spec = serde_json::from_value(spec).unwrap();
        Arc::new(e)
    };
    let endpoints = vec![
        Arc::new(endpoint("head", &[("head-v1", 100)], 1_000)),
        with(
            "pipe",
            json!({"route": {"pathPrefix": "/p"}, "sequence": {"steps": [
                {"backend": "pca"}, {"endpoint": "head", "inputs": {"X": "variable"}}]}}),
        ),
        with(
            "outer",
            json!({"route": {"pathPrefix": "/o"}, "cascade": {"output": "p", "stages": [
                {"backend": "small", "minConfidence": 0.9}, {"endpoint": "pipe"}]}}),
        ),
        Arc::new(endpoint("other", &[("v1", 100)], 1_000)),
    ];
    let mut names: Vec<String> =
        endpoint_controller::endpoints_using(&backend("head-v1", 1), &endpoints)
            .into_iter()
            .map(|r| r.name)
            .collect();
    names.sort();
    assert_eq!(names, ["head", "outer", "pipe"]);
}
