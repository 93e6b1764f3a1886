//! Reconcile scenarios against a mock API server. Each scenario lists every call the operator
//! must make, in order; a missing call fails at `expect`, an extra one at `done`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::sync::Arc;
use std::time::Duration;

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
use serval_operator::backoff::FailureCounts;
use serval_operator::context::Context;
use serval_operator::desired::backend::BackendDefaults;
use serval_operator::desired::router::RouterDefaults;
use serval_operator::metrics::Metrics;
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
        },
        router_defaults: RouterDefaults {
            router_image: "serval-router:test".to_owned(),
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

/// In a cluster this version does not act on `spec.autoscaling`: the status says so (Degraded,
/// with the reason and the replicas kept) instead of ignoring the field.
#[test]
fn a_backend_asking_for_autoscaling_is_told_the_operator_keeps_its_replicas() {
    let mut b = backend("auto", 2);
    b.spec.autoscaling = Some(serde_json::from_value(json!({"maxReplicas": 4})).unwrap());
    let b = with_ready(b, true);
    let status = serde_json::to_value(b.status.as_ref().unwrap()).unwrap();
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True", "{status}");
    assert_eq!(degraded["reason"], "AutoscalingNotInCluster");
    assert!(
        degraded["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.replicas (2)")),
        "{degraded}"
    );
    assert_eq!(condition(&status, "Ready")["status"], "True");
    // Without it, the same Backend is not degraded.
    let plain = with_ready(backend("plain", 2), true);
    let status = serde_json::to_value(plain.status.as_ref().unwrap()).unwrap();
    assert_eq!(condition(&status, "Degraded")["status"], "False");
}
