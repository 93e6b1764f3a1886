//! The operator end to end: real `kubectl` against a real control plane, and the
//! `serval-operator` binary as a separate process.
//!
//! One cluster per test binary ([`Cluster::shared`]); each scenario works in its own namespace
//! with its own operator confined to it (`--watch-namespace`, Lease in that namespace), so
//! scenarios run in parallel. The scale scenario takes [`EXCLUSIVE`] for writing so it runs
//! alone and its figures are not skewed by the others.
//!
//! Data plane: issue 5's scenario "data plane from the cluster's truth" (routing table read
//! out of the `serval-routing` ConfigMap, real router and sidecars on loopback, split checked
//! against the weights) lives in `tests/dataplane.rs`, on the same [`Operator`] harness. New
//! control-plane scenarios belong here; traffic checks belong there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference};
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use serval_api::routing::{ROUTING_CONFIGMAP, ROUTING_TABLE_KEY};
use serval_api::{Backend, Endpoint, Hop, RoutingTable};
use serval_e2e::{
    Cluster, LOG_TAIL_LINES, OPERATOR_BIN_ENV, Operator, OperatorConfig, POLL_INTERVAL,
    operator_binary, wait_for, wait_for_async,
};
use tokio::sync::RwLock;

/// Prints a measurement or progress line straight to stderr: libtest captures `eprintln!`
/// of passing tests, and these figures are what a run is for.
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// Held for reading by every scenario and for writing by the scale scenario.
static EXCLUSIVE: RwLock<()> = RwLock::const_new(());

/// Bound on CRDs becoming Established and served.
const CRD_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on Backends and Endpoints turning Ready (kwok pods are Ready within seconds; the
/// machine is shared and loaded).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// The design's goal for a weight change reaching the routing table.
const WEIGHT_PROPAGATION_GOAL: Duration = Duration::from_secs(2);
/// Bound on the garbage collector removing a deleted Backend's children.
const GC_TIMEOUT: Duration = Duration::from_secs(60);
/// Lease takeover: 15 s Lease plus the candidate's retry period, with slack.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(40);
/// Backends applied at once before the operator is SIGKILLed.
const CRASH_BATCH: usize = 20;
/// Objects of each kind in the scale scenario.
const SCALE_COUNT: usize = 200;
/// Fails the scale scenario on non-convergence only; the time itself is reported, not judged.
const SCALE_TIMEOUT: Duration = Duration::from_secs(300);
/// Poll period of the weight-propagation measurement.
const FAST_POLL: Duration = Duration::from_millis(20);
/// Operator log lines shown when a scenario fails.
const OPERATOR_LOG_TAIL: usize = 60;

const READY: &str = "Ready";
const DEGRADED: &str = "Degraded";
const BACKEND_LABEL: &str = "serval.dev/backend";
const BACKEND_CHILDREN: &str = "app.kubernetes.io/name=serval-backend";
const ROUTER: &str = "serval-router";

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

/// CRDs apply server-side, `kubectl explain` documents fields, and the API server rejects
/// invalid manifests with the schema's and the CEL rules' messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_explain_and_reject_invalid_manifests() {
    let _shared = EXCLUSIVE.read().await;
    let s = Scenario::new("crds", false).await;
    let result = crds_explain_and_reject(&s);
    s.finish(result);
}

/// `kubectl explain` reads the apiserver's OpenAPI, which publishes a new CRD's schema a moment
/// after the CRD is Established: retry for a bounded time, then surface kubectl's own error.
fn kubectl_explain(s: &Scenario, args: &[&str]) -> anyhow::Result<String> {
    let found = wait_for(
        "kubectl explain to find the CRD's schema",
        Duration::from_secs(30),
        || Ok(s.cluster.kubectl_ok(args).ok()),
    );
    found.or_else(|_| s.cluster.kubectl_ok(args))
}

fn crds_explain_and_reject(s: &Scenario) -> anyhow::Result<()> {
    let explain = kubectl_explain(s, &["explain", "backends.spec.batching"])?;
    ensure!(
        explain.contains("DESCRIPTION:") && explain.contains("maxBatchSize"),
        "no field docs in:\n{explain}"
    );
    ensure!(
        !explain.contains("<empty>"),
        "undocumented field in:\n{explain}"
    );
    // `endpoints` alone is core's; the group disambiguates.
    let explain = kubectl_explain(
        s,
        &[
            "explain",
            "endpoints.spec.traffic",
            "--api-version=serval.dev/v1alpha1",
        ],
    )?;
    ensure!(
        explain.contains("weight") && explain.contains("backend"),
        "no traffic docs in:\n{explain}"
    );

    // The examples are valid, the rollout and autoscaling ones too.
    s.kubectl_ok(["apply", "--dry-run=server", "-f", &examples_dir()])?;
    for dir in ["rollout", "autoscaling", "cascade", "ensemble", "sequence"] {
        s.kubectl_ok([
            "apply",
            "--dry-run=server",
            "-f",
            &format!("{}/{dir}", examples_dir()),
        ])?;
    }

    let with_rollout = |name: &str, rollout: &str| {
        format!(
            "{}  rollout: {rollout}\n",
            endpoint_yaml(name, &format!("/{name}"), &[("a", 100)])
        )
    };
    let cascade = |name: &str, spec: &str| {
        format!(
            "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: {name}}}\n\
             spec:\n  route: {{pathPrefix: /{name}}}\n{spec}"
        )
    };
    let cases: [(&str, String, &str); 19] = [
        (
            "cascade and traffic",
            cascade(
                "cas1",
                "  cascade: {output: p, stages: [{backend: a, minConfidence: 0.9}, {backend: b}]}\n  traffic: [{backend: a, weight: 100}]\n",
            ),
            "an Endpoint has exactly one of traffic, cascade, ensemble and sequence",
        ),
        (
            "neither cascade nor traffic",
            cascade("cas2", ""),
            "an Endpoint has exactly one of traffic, cascade, ensemble and sequence",
        ),
        (
            "ensemble and sequence",
            cascade(
                "ens1",
                "  ensemble: {backends: [a, b], output: p, reduce: Mean}\n  sequence: {steps: [{backend: a}, {backend: b}]}\n",
            ),
            "an Endpoint has exactly one of traffic, cascade, ensemble and sequence",
        ),
        (
            "ensemble needing more answers than members",
            cascade(
                "ens2",
                "  ensemble: {backends: [a, b], output: p, reduce: Vote, minResponses: 3}\n",
            ),
            "ensemble.minResponses cannot exceed the number of backends",
        ),
        (
            "sequence step naming a backend and an endpoint",
            cascade(
                "seq1",
                "  sequence: {steps: [{backend: a}, {backend: b, endpoint: c}]}\n",
            ),
            "a sequence step names either a backend or an endpoint",
        ),
        (
            "cascade stage naming nothing",
            cascade(
                "cas4",
                "  cascade: {output: p, stages: [{minConfidence: 0.9}, {backend: b}]}\n",
            ),
            "a cascade stage names either a backend or an endpoint",
        ),
        (
            "cascade stage without minConfidence",
            cascade(
                "cas3",
                "  cascade: {output: p, stages: [{backend: a}, {backend: b}]}\n",
            ),
            "every cascade stage but the last needs minConfidence",
        ),
        (
            "rollout canary in traffic",
            with_rollout("ro1", "{canary: a}"),
            "rollout.canary must not be in traffic",
        ),
        (
            "rollout step 0",
            with_rollout("ro2", "{canary: c, steps: [Shadow, 0]}"),
            "rollout.steps are Shadow or a canary weight from 1 to 100",
        ),
        (
            "rollout step misspelt",
            with_rollout("ro3", "{canary: c, steps: [shadow, 50]}"),
            "rollout.steps are Shadow or a canary weight from 1 to 100",
        ),
        (
            "tolerance without mode Close",
            endpoint_yaml("cmp", "/cmp", &[("a", 100)])
                + "  mirror: {backend: m, percent: 10, compare: {tolerance: 0.1}}\n",
            "mirror.compare.tolerance applies to mode Close only",
        ),
        (
            "all weights 0",
            endpoint_yaml("zero", "/zero", &[("a", 0), ("b", 0)]),
            "traffic weights must sum to more than 0",
        ),
        (
            "duplicate backend",
            endpoint_yaml("dup", "/dup", &[("a", 50), ("a", 50)]),
            "each backend may appear only once in traffic",
        ),
        (
            "weight 101",
            endpoint_yaml("big", "/big", &[("a", 101)]),
            "less than or equal to 100",
        ),
        (
            "path prefix without a leading slash",
            endpoint_yaml("path", "nope", &[("a", 1)]),
            "route.pathPrefix must start with '/'",
        ),
        (
            "http model without sha256",
            backend_yaml_with_model("nosha", "uri: \"https://models.example/m.onnx\"", 1),
            "model.sha256 is required",
        ),
        (
            "sha256 not hex",
            backend_yaml_with_model(
                "badsha",
                "{uri: \"https://m.example/m.onnx\", sha256: xyz}",
                1,
            ),
            "model.sha256 must be 64 hexadecimal characters",
        ),
        (
            "unsupported URI scheme",
            backend_yaml_with_model("ftp", "uri: \"ftp://models.example/m.onnx\"", 1),
            "model.uri must start with http://, https://, file:// or pvc://",
        ),
        (
            "queue shorter than a batch",
            backend_yaml("queue", 1).replace(
                "spec:\n",
                "spec:\n  batching: {maxBatchSize: 64, maxQueue: 8}\n",
            ),
            "batching.maxQueue must be at least batching.maxBatchSize",
        ),
    ];
    let mut failures = Vec::new();
    for (case, manifest, expected) in &cases {
        match s.apply(manifest) {
            Ok(out) => failures.push(format!("{case}: accepted ({})", out.trim())),
            Err(e) => {
                let message = format!("{e:#}");
                if !message.contains(expected) {
                    failures.push(format!("{case}: expected {expected:?} in: {message}"));
                }
            }
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    // Nothing invalid was stored.
    let left = s.kubectl_ok(["get", "serval", "-o", "name"])?;
    ensure!(left.trim().is_empty(), "rejected objects exist: {left}");
    Ok(())
}

/// `examples/` becomes Deployments, Services, a PDB, the routing table and the router, all
/// owned by their resources; everything turns Ready; the Endpoint reports its traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_reconcile_into_owned_children() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("examples", true).await;
    let result = examples_reconcile(&mut s).await;
    s.finish(result);
}

async fn examples_reconcile(s: &mut Scenario) -> anyhow::Result<()> {
    s.apply_examples_and_wait_ready()?;

    let backends: Api<Backend> = s.api();
    let deployments: Api<Deployment> = s.api();
    let services: Api<Service> = s.api();
    let pdbs: Api<PodDisruptionBudget> = s.api();
    for (name, replicas) in [("digits-v1", 1), ("digits-v2", 2)] {
        let backend = backends.get(name).await?;
        let status = backend.status.clone().context("Backend has no status")?;
        ensure!(
            status.ready_replicas == replicas
                && status.replicas_summary == format!("{replicas}/{replicas}"),
            "{name} status: {status:?}"
        );
        ensure!(
            status.observed_generation == backend.meta().generation,
            "{name} observedGeneration {:?} != generation {:?}",
            status.observed_generation,
            backend.meta().generation
        );
        let deployment = deployments.get(name).await?;
        expect_controller(&deployment, &backend)?;
        ensure!(
            deployment.labels().get(BACKEND_LABEL).map(String::as_str) == Some(name),
            "Deployment {name} labels: {:?}",
            deployment.labels()
        );
        let spec_replicas = deployment.spec.as_ref().and_then(|s| s.replicas);
        ensure!(
            spec_replicas == Some(replicas),
            "Deployment {name} replicas {spec_replicas:?}"
        );
        expect_controller(&services.get(name).await?, &backend)?;
        match pdbs.get_opt(name).await? {
            Some(pdb) if replicas > 1 => expect_controller(&pdb, &backend)?,
            None if replicas == 1 => {}
            other => bail!(
                "{name} ({replicas} replicas) has PDB {:?}",
                other.map(|p| p.name_any())
            ),
        }
    }

    let endpoint = s.api::<Endpoint>().get("digits").await?;
    expect_owner(
        &s.api::<ConfigMap>().get(ROUTING_CONFIGMAP).await?,
        &endpoint,
    )?;
    expect_owner(&deployments.get(ROUTER).await?, &endpoint)?;
    expect_owner(&services.get(ROUTER).await?, &endpoint)?;
    expect_owner(&s.api::<ServiceAccount>().get(ROUTER).await?, &endpoint)?;
    expect_owner(&s.api::<Role>().get(ROUTER).await?, &endpoint)?;
    expect_owner(&s.api::<RoleBinding>().get(ROUTER).await?, &endpoint)?;

    // The Endpoint can turn Ready on digits-v1 alone; the table gives digits-v2 its weight
    // once the operator has seen it Ready as well.
    let table = wait_for_async("the table to carry 90/10", READY_TIMEOUT, || async {
        let t = s.routing_table().await?;
        Ok((weights(&t, "digits")? == [("digits-v1", 90), ("digits-v2", 10)]).then_some(t))
    })
    .await?;
    let route = table
        .routes
        .iter()
        .find(|r| r.endpoint == "digits")
        .with_context(|| format!("no route for digits in {table:?}"))?;
    ensure!(route.path_prefix == "/digits", "route {route:?}");
    ensure!(
        weights(&table, "digits")? == [("digits-v1", 90), ("digits-v2", 10)],
        "routing table weights: {:?}",
        route.traffic
    );
    for b in ["digits-v1", "digits-v2"] {
        ensure!(
            table.backends.contains_key(b),
            "no upstream for {b} in {table:?}"
        );
    }

    let status = endpoint.status.clone().context("Endpoint has no status")?;
    ensure!(
        status.traffic_summary == "digits-v1=90%,digits-v2=10%",
        "trafficSummary {:?}",
        status.traffic_summary
    );
    let percents: Vec<(String, u32)> = status
        .traffic
        .iter()
        .map(|t| (t.backend.clone(), t.percent))
        .collect();
    ensure!(
        percents == [("digits-v1".to_owned(), 90), ("digits-v2".to_owned(), 10)],
        "status.traffic {:?}",
        status.traffic
    );
    ensure!(
        status.observed_generation == endpoint.meta().generation,
        "Endpoint observedGeneration {:?}",
        status.observed_generation
    );

    // The category and short names list both kinds.
    let listed = s.kubectl_ok(["get", "serval", "-o", "name"])?;
    for expected in [
        "backend.serval.dev/digits-v1",
        "backend.serval.dev/digits-v2",
        "endpoint.serval.dev/digits",
    ] {
        ensure!(
            listed.lines().any(|l| l == expected),
            "`kubectl get serval` lacks {expected}:\n{listed}"
        );
    }
    let table_view = s.kubectl_ok(["get", "sep"])?;
    ensure!(
        table_view.contains("digits-v1=90%,digits-v2=10%"),
        "`kubectl get sep` shows no traffic:\n{table_view}"
    );
    ensure!(
        s.kubectl_ok(["get", "sbe", "-o", "name"])?.lines().count() == 2,
        "`kubectl get sbe`"
    );
    Ok(())
}

/// A weight change reaches the routing table within the design's 2 s; scaling a Backend is
/// reflected in its Deployment, status and PodDisruptionBudget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_update_routing_table_and_replicas_scale() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("weights", true).await;
    let result = weights_and_scaling(&mut s).await;
    s.finish(result);
}

async fn weights_and_scaling(s: &mut Scenario) -> anyhow::Result<()> {
    s.apply_examples_and_wait_ready()?;
    let configmaps: Api<ConfigMap> = s.api();

    let started = Instant::now();
    s.kubectl_ok([
        "patch",
        "endpoint",
        "digits",
        "--type=merge",
        "-p",
        r#"{"spec":{"traffic":[{"backend":"digits-v1","weight":50},{"backend":"digits-v2","weight":50}]}}"#,
    ])?;
    let accepted = started.elapsed();
    let deadline = started + READY_TIMEOUT;
    let propagated = loop {
        let cm = configmaps.get(ROUTING_CONFIGMAP).await?;
        if weights(&parse_table(&cm)?, "digits")? == [("digits-v1", 50), ("digits-v2", 50)] {
            break started.elapsed();
        }
        ensure!(
            Instant::now() < deadline,
            "the routing table never showed 50/50"
        );
        tokio::time::sleep(FAST_POLL).await;
    };
    report!(
        "MEASURE weight change 90/10 -> 50/50: routing table updated {} ms after `kubectl patch` \
         started ({} ms after it returned; kubectl itself took {} ms)",
        propagated.as_millis(),
        propagated.saturating_sub(accepted).as_millis(),
        accepted.as_millis()
    );
    ensure!(
        propagated <= WEIGHT_PROPAGATION_GOAL,
        "the weight change took {propagated:?} to reach the routing table (goal {WEIGHT_PROPAGATION_GOAL:?})"
    );
    s.wait_endpoint(
        "digits",
        "trafficSummary digits-v1=50%,digits-v2=50%",
        |e| {
            e.status
                .as_ref()
                .is_some_and(|st| st.traffic_summary == "digits-v1=50%,digits-v2=50%")
        },
    )
    .await?;

    // Scale up with `kubectl scale` (the scale subresource, as an autoscaler would): 3
    // replicas, all Ready, and a PDB appears.
    s.kubectl_ok(["scale", "backend/digits-v1", "--replicas=3"])?;
    s.wait_backend("digits-v1", "3/3 replicas ready", |b| {
        b.status
            .as_ref()
            .is_some_and(|st| st.ready_replicas == 3 && st.replicas == 3)
            && condition_is(
                b.status.as_ref().map(|st| st.conditions.as_slice()),
                READY,
                "True",
            )
    })
    .await?;
    let deployments: Api<Deployment> = s.api();
    let replicas = deployments
        .get("digits-v1")
        .await?
        .spec
        .and_then(|s| s.replicas);
    ensure!(
        replicas == Some(3),
        "Deployment digits-v1 replicas {replicas:?}"
    );
    let scale = s.kubectl_ok([
        "get",
        "backend/digits-v1",
        "--subresource=scale",
        "-o",
        "jsonpath={.spec.replicas} {.status.replicas} {.status.selector}",
    ])?;
    ensure!(
        scale == "3 3 serval.dev/backend=digits-v1",
        "scale subresource: {scale:?}"
    );
    let pdbs: Api<PodDisruptionBudget> = s.api();
    wait_for_async("PDB digits-v1", READY_TIMEOUT, || {
        let pdbs = pdbs.clone();
        async move { Ok(pdbs.get_opt("digits-v1").await?.map(|_| ())) }
    })
    .await?;

    // Scale down: back to 1 and the PDB goes away.
    s.kubectl_ok([
        "patch",
        "backend",
        "digits-v1",
        "--type=merge",
        "-p",
        r#"{"spec":{"replicas":1}}"#,
    ])?;
    wait_for_async("PDB digits-v1 deleted", READY_TIMEOUT, || {
        let pdbs = pdbs.clone();
        async move { Ok(pdbs.get_opt("digits-v1").await?.is_none().then_some(())) }
    })
    .await?;
    s.wait_backend("digits-v1", "1/1 replicas", |b| {
        b.status
            .as_ref()
            .is_some_and(|st| st.replicas_summary == "1/1")
    })
    .await?;
    let replicas = deployments
        .get("digits-v1")
        .await?
        .spec
        .and_then(|s| s.replicas);
    ensure!(
        replicas == Some(1),
        "Deployment digits-v1 replicas {replicas:?}"
    );
    // digits-v2 keeps its PDB throughout.
    ensure!(
        pdbs.get_opt("digits-v2").await?.is_some(),
        "PDB digits-v2 vanished"
    );
    Ok(())
}

/// Issue 19: a Backend with `spec.autoscaling`, its load scripted through the operator's test
/// signal source (a JSON file; kwok pods run no model server), reaches the right Deployment
/// replicas and status: up on a surge with an Event, down to zero with its route kept and
/// marked scaled to zero, back from zero on held requests, and back to `spec.replicas` when
/// autoscaling is removed. The user's spec is never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaling_follows_the_load_to_zero_and_back() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("autoscale", false).await;
    let result = autoscaling(&mut s).await;
    s.finish(result);
}

async fn autoscaling(s: &mut Scenario) -> anyhow::Result<()> {
    let signals = s.cluster.dir().join(format!("signals-{}.json", s.ns));
    let key = format!("{}/auto", s.ns);
    let script = |load: &str| -> anyhow::Result<Instant> {
        // Atomic, as the operator may read it at any moment.
        let tmp = signals.with_extension("tmp");
        std::fs::write(&tmp, format!(r#"{{"backends": {{"{key}": {load}}}}}"#))?;
        std::fs::rename(&tmp, &signals)?;
        Ok(Instant::now())
    };
    std::fs::write(&signals, "{}")?;
    s.start_operator(OperatorConfig::namespaced(&s.ns).with_args([
        format!("--signals-file={}", signals.display()),
        // A short stable window, so that the scenario takes seconds, not minutes.
        "--autoscale-stable-window=3".to_owned(),
    ]))?;
    s.apply(&format!(
        "{}  autoscaling:
    minReplicas: 0
    maxReplicas: 5
    targetInflight: 4
    scaleDownDelaySeconds: 2
    scaleToZeroAfterSeconds: 3
{}",
        backend_yaml("auto", 1),
        endpoint_yaml("auto", "/auto", &[("auto", 100)])
    ))?;
    let deployments: Api<Deployment> = s.api();
    let wait_replicas = |want: i32| {
        let deployments = deployments.clone();
        async move {
            wait_for_async(
                &format!("Deployment auto at {want} replicas"),
                READY_TIMEOUT,
                || {
                    let deployments = deployments.clone();
                    async move {
                        let d = deployments.get_opt("auto").await?;
                        Ok(d.and_then(|d| d.spec?.replicas)
                            .filter(|r| *r == want)
                            .map(|_| ()))
                    }
                },
            )
            .await
        }
    };
    let decided = |b: &Backend, want: i32| {
        b.status
            .as_ref()
            .and_then(|st| st.autoscaling.as_ref())
            .is_some_and(|a| a.desired_replicas == want)
    };

    // No load data yet: the starting replica stays, and the status says why.
    let b = s
        .wait_backend("auto", "1/1 ready, decided on no data", |b| {
            decided(b, 1)
                && b.status.as_ref().is_some_and(|st| st.ready_replicas == 1)
                && backend_ready(b)
        })
        .await?;
    let a = b
        .status
        .and_then(|st| st.autoscaling)
        .context("status.autoscaling")?;
    ensure!(a.last_decision == "NoData", "{a:?}");
    ensure!(
        a.message.contains("spec.replicas (1) is ignored"),
        "the status must say autoscaling wins: {a:?}"
    );

    // A surge: 10 in flight at a target of 4 is three replicas.
    let surged = script(r#"{"inflight": 10, "requests": 50}"#)?;
    wait_replicas(3).await?;
    report!(
        "MEASURE autoscaling: load 10 in flight -> Deployment at 3 replicas in {} ms (1 s samples)",
        surged.elapsed().as_millis()
    );
    let b = s
        .wait_backend("auto", "3/3 ready, decided 3", |b| {
            decided(b, 3) && b.status.as_ref().is_some_and(|st| st.ready_replicas == 3)
        })
        .await?;
    ensure!(backend_ready(&b), "Ready while scaled up");
    ensure!(b.spec.replicas == 1, "the spec was written: {:?}", b.spec);
    let a = b
        .status
        .and_then(|st| st.autoscaling)
        .context("status.autoscaling")?;
    ensure!(
        a.observed_inflight.is_some_and(|v| v > 0.0) && a.last_scale_time.is_some(),
        "{a:?}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = s.api();
    wait_for_async("a ScaledUp Event on Backend auto", READY_TIMEOUT, || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            Ok(list
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("ScaledUp")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("auto")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("-> 3 replicas"))
                })
                .map(|_| ()))
        }
    })
    .await?;
    let metrics = s.operators[0].metrics()?;
    ensure!(
        metrics.contains(&format!(
            "serval_operator_autoscaler_desired_replicas{{backend_namespace=\"{}\",backend=\"auto\"}} 3",
            s.ns
        )),
        "desired replicas metric missing:\n{metrics}"
    );

    // Idle: after the panic and the scale-down delay, one replica, then none after the
    // scale-to-zero period. The route stays, marked scaled to zero for the router to hold.
    let idle = script(r#"{"inflight": 0, "requests": 0}"#)?;
    wait_replicas(0).await?;
    report!(
        "MEASURE autoscaling: idle -> Deployment at 0 replicas in {} ms (stable window 3 s, \
         scale-down delay 2 s, scale to zero after 3 s)",
        idle.elapsed().as_millis()
    );
    let b = s
        .wait_backend("auto", "at zero", |b| {
            decided(b, 0) && b.status.as_ref().is_some_and(|st| st.ready_replicas == 0)
        })
        .await?;
    let a = b.status.as_ref().and_then(|st| st.autoscaling.as_ref());
    ensure!(a.is_some_and(|a| a.last_decision == "ScaleToZero"), "{a:?}");
    ensure!(
        condition_is(
            b.status.as_ref().map(|st| st.conditions.as_slice()),
            READY,
            "False"
        ),
        "at zero the Backend is not Ready: {:?}",
        b.status
    );
    wait_for_async(
        "the table marks auto scaled to zero",
        READY_TIMEOUT,
        || async {
            let table = s.routing_table().await?;
            let held = table
                .backends
                .get("auto")
                .is_some_and(|u| u.scaled_to_zero && u.addresses.is_empty());
            Ok((held && weights(&table, "auto")? == [("auto", 100)]).then_some(()))
        },
    )
    .await?;
    s.wait_endpoint("auto", "still Ready at zero", |e| {
        condition_is(
            e.status.as_ref().map(|st| st.conditions.as_slice()),
            READY,
            "True",
        )
    })
    .await?;

    // Two requests held by the router: a replica per two at once, and the route is served
    // again once one is Ready.
    let held = script(r#"{"held": 2}"#)?;
    wait_for_async("Deployment auto back from zero", READY_TIMEOUT, || {
        let deployments = deployments.clone();
        async move {
            let d = deployments.get_opt("auto").await?;
            Ok(d.and_then(|d| d.spec?.replicas)
                .filter(|r| *r > 0)
                .map(|_| ()))
        }
    })
    .await?;
    report!(
        "MEASURE autoscaling: 2 requests held at zero -> Deployment scaled up in {} ms \
         (held requests polled every 200 ms)",
        held.elapsed().as_millis()
    );
    let b = s
        .wait_backend("auto", "back from zero, Ready", |b| {
            b.status
                .as_ref()
                .and_then(|st| st.autoscaling.as_ref())
                .is_some_and(|a| a.desired_replicas >= 1)
                && backend_ready(b)
        })
        .await?;
    let a = b.status.as_ref().and_then(|st| st.autoscaling.as_ref());
    ensure!(
        a.is_some_and(|a| a.desired_replicas == 1),
        "2 held at a target of 4: {a:?}"
    );
    wait_for_async("the table serves auto again", READY_TIMEOUT, || async {
        let table = s.routing_table().await?;
        Ok(table
            .backends
            .get("auto")
            .filter(|u| !u.scaled_to_zero && !u.addresses.is_empty())
            .map(|_| ()))
    })
    .await?;

    // Autoscaling removed: spec.replicas rules again, and the autoscaler's status goes.
    s.kubectl_ok([
        "patch",
        "backend",
        "auto",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/autoscaling"},{"op":"replace","path":"/spec/replicas","value":2}]"#,
    ])?;
    wait_replicas(2).await?;
    s.wait_backend("auto", "autoscaling status cleared", |b| {
        b.status
            .as_ref()
            .is_some_and(|st| st.autoscaling.is_none() && st.replicas == 2)
    })
    .await?;
    Ok(())
}

/// Issue 20: progressive rollouts against the real control plane, the routers' counters
/// scripted through the operator's test signal source. A canary whose mirrored answers agree
/// goes Shadowing -> Progressing (50 %) -> Promoted; one whose answers disagree is rolled back
/// from its shadow step. Status phases, Events and routing-table weights follow; the spec is
/// never written, and the rolled-back Endpoint is not Degraded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_promote_a_good_canary_and_roll_back_a_bad_one() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("rollout", false).await;
    let result = rollouts(&mut s).await;
    s.finish(result);
}

/// Cumulative router counters after `ticks` ticks of 30 requests on each route of both
/// Endpoints, the good canary's mirrored rows agreeing and the bad one's disagreeing.
fn rollout_signals(ticks: u64) -> serval_api::signals::RouterSignals {
    use serval_api::signals::{
        MirrorSignals, RouteSignals, RouterSignals, latency_bucket, latency_bucket_bounds,
    };
    let n = 30 * ticks;
    let mut buckets = vec![0; latency_bucket_bounds().len() + 1];
    buckets[latency_bucket(0.005)] = n;
    let route = |endpoint: &str, backend: &str| RouteSignals {
        endpoint: endpoint.to_owned(),
        backend: backend.to_owned(),
        requests: n,
        latency_seconds: 0.005 * n as f64,
        latency_buckets: buckets.clone(),
        ..RouteSignals::default()
    };
    let mirror = |endpoint: &str, backend: &str, agree: bool| MirrorSignals {
        endpoint: endpoint.to_owned(),
        backend: backend.to_owned(),
        agree: if agree { n } else { 0 },
        disagree: if agree { 0 } else { n },
        ..MirrorSignals::default()
    };
    RouterSignals {
        revision: "scripted".to_owned(),
        routes: vec![
            route("good", "stable-a"),
            route("good", "good-canary"),
            route("bad", "stable-b"),
            route("bad", "bad-canary"),
        ],
        backends: Vec::new(),
        mirrors: vec![
            mirror("good", "good-canary", true),
            mirror("bad", "bad-canary", false),
        ],
    }
}

async fn rollouts(s: &mut Scenario) -> anyhow::Result<()> {
    let signals = s.cluster.dir().join(format!("signals-{}.json", s.ns));
    std::fs::write(&signals, "{}")?;
    s.start_operator(
        OperatorConfig::namespaced(&s.ns)
            .with_args([format!("--signals-file={}", signals.display())]),
    )?;
    let rollout = |name: &str, stable: &str, canary: &str| {
        format!(
            "---
apiVersion: serval.dev/v1alpha1
kind: Endpoint
metadata:
  name: {name}
spec:
  route: {{pathPrefix: \"/{name}\"}}
  traffic: [{{backend: {stable}, weight: 100}}]
  rollout:
    canary: {canary}
    steps: [Shadow, 50, 100]
    intervalSeconds: 1
    minRequests: 20
    failureLimit: 2
"
        )
    };
    let mut manifest = String::new();
    for b in ["stable-a", "good-canary", "stable-b", "bad-canary"] {
        manifest.push_str(&backend_yaml(b, 1));
    }
    manifest.push_str(&rollout("good", "stable-a", "good-canary"));
    manifest.push_str(&rollout("bad", "stable-b", "bad-canary"));
    s.apply(&manifest)?;
    s.kubectl_ok([
        "wait",
        "--for=condition=Ready",
        "backend/stable-a",
        "backend/good-canary",
        "backend/stable-b",
        "backend/bad-canary",
        &format!("--timeout={}s", READY_TIMEOUT.as_secs()),
    ])?;

    // The routers' counters grow by 30 requests a route every 200 ms from here.
    let ns = s.ns.clone();
    let writer_path = signals.clone();
    let writer = tokio::spawn(async move {
        for tick in 1.. {
            let file = serde_json::json!({ "routers": { ns.as_str(): rollout_signals(tick) } });
            let tmp = writer_path.with_extension("tmp");
            if std::fs::write(&tmp, file.to_string()).is_err()
                || std::fs::rename(&tmp, &writer_path).is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // The good canary: watched through the routing table as the router sees it.
    let started = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    let deadline = started + READY_TIMEOUT;
    loop {
        let table = s.routing_table().await?;
        let route = table.routes.iter().find(|r| r.endpoint == "good");
        let state = match route {
            Some(r)
                if r.mirror
                    .as_ref()
                    .is_some_and(|m| m.backend == "good-canary") =>
            {
                "shadow".to_owned()
            }
            Some(_) => {
                let w = weights(&table, "good")?;
                let canary = w
                    .iter()
                    .find(|(b, _)| *b == "good-canary")
                    .map_or(0, |x| x.1);
                format!("canary {canary}")
            }
            None => "absent".to_owned(),
        };
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        if state == "canary 100" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "never promoted; table states {seen:?}"
        );
        tokio::time::sleep(FAST_POLL).await;
    }
    report!(
        "MEASURE rollout: good canary through [Shadow, 50, 100] at 1 s intervals in {} ms; table states {seen:?}",
        started.elapsed().as_millis()
    );
    ensure!(
        seen.contains(&"shadow".to_owned()) && seen.contains(&"canary 50".to_owned()),
        "the table went through the shadow and the 50 % steps: {seen:?}"
    );
    let good = s
        .wait_endpoint("good", "rollout Promoted", |e| {
            e.status
                .as_ref()
                .and_then(|st| st.rollout.as_ref())
                .is_some_and(|r| r.phase == "Promoted" && r.canary_percent == 100)
        })
        .await?;
    ensure!(
        good.metadata.generation == Some(1) && good.spec.traffic.len() == 1,
        "the spec was written: {:?}",
        good.spec
    );
    let r = good
        .status
        .as_ref()
        .and_then(|st| st.rollout.clone())
        .context("rollout")?;
    ensure!(
        r.last_interval
            .as_ref()
            .is_some_and(|i| i.verdict == "Pass"),
        "{r:?}"
    );

    // The bad canary: rolled back from its shadow step; the stable Backend serves it all.
    let bad = s
        .wait_endpoint("bad", "rollout RolledBack", |e| {
            e.status
                .as_ref()
                .and_then(|st| st.rollout.as_ref())
                .is_some_and(|r| r.phase == "RolledBack")
        })
        .await?;
    let r = bad
        .status
        .as_ref()
        .and_then(|st| st.rollout.clone())
        .context("rollout")?;
    ensure!(
        r.step == 0 && r.canary_percent == 0 && !r.shadow && r.message.contains("minAgreement"),
        "{r:?}"
    );
    ensure!(
        r.last_interval
            .as_ref()
            .is_some_and(|i| i.agreement == Some(0.0)),
        "{r:?}"
    );
    let table = s.routing_table().await?;
    ensure!(
        weights(&table, "bad")? == [("stable-b", 100), ("bad-canary", 0)],
        "{:?}",
        weights(&table, "bad")
    );
    ensure!(
        table
            .routes
            .iter()
            .find(|r| r.endpoint == "bad")
            .is_some_and(|r| r.mirror.is_none()),
        "no mirror after the rollback"
    );
    // A rolled-back Endpoint serves, is not Degraded, and is done progressing.
    s.wait_endpoint("bad", "Ready, not Degraded, not Progressing", |e| {
        let c = e.status.as_ref().map(|st| st.conditions.as_slice());
        condition_is(c, READY, "True")
            && condition_is(c, DEGRADED, "False")
            && condition_is(c, "Progressing", "False")
    })
    .await?;
    s.wait_endpoint("good", "not Progressing once promoted", |e| {
        let c = e.status.as_ref().map(|st| st.conditions.as_slice());
        condition_is(c, READY, "True") && condition_is(c, "Progressing", "False")
    })
    .await?;

    // An Event per transition.
    let events: Api<k8s_openapi::api::events::v1::Event> = s.api();
    let reasons = |endpoint: &'static str| {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await?;
            anyhow::Ok(
                list.items
                    .into_iter()
                    .filter(|e| {
                        e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(endpoint)
                    })
                    .filter_map(|e| e.reason)
                    .collect::<BTreeSet<String>>(),
            )
        }
    };
    let good_reasons = reasons("good").await?;
    for want in ["RolloutStarted", "RolloutProgressing", "RolloutPromoted"] {
        ensure!(
            good_reasons.contains(want),
            "{want} missing: {good_reasons:?}"
        );
    }
    let bad_reasons = reasons("bad").await?;
    ensure!(
        bad_reasons.contains("RolloutRolledBack"),
        "RolloutRolledBack missing: {bad_reasons:?}"
    );
    writer.abort();
    Ok(())
}

/// Compositions planned from the real API server: a sequence whose step is another Endpoint,
/// an ensemble, and two Endpoints calling each other, left out and reported as a cycle until
/// one of them is deleted, after which the other reports the Endpoint it lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compositions_are_planned_and_cycles_reported() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("compose", true).await;
    let result = compositions(&mut s).await;
    s.finish(result);
}

async fn compositions(s: &mut Scenario) -> anyhow::Result<()> {
    s.apply_examples_and_wait_ready()?;
    let endpoint = |name: &str, spec: &str| {
        format!(
            "apiVersion: serval.dev/v1alpha1\nkind: Endpoint\nmetadata: {{name: {name}}}\n\
             spec:\n  route: {{pathPrefix: /{name}}}\n{spec}---\n"
        )
    };
    s.apply(&[
        endpoint(
            "pipe",
            "  sequence: {steps: [{backend: digits-v1}, {endpoint: digits, inputs: {X: probabilities}}]}\n",
        ),
        endpoint(
            "ens",
            "  ensemble: {backends: [digits-v1, digits-v2], output: probabilities, reduce: Vote}\n",
        ),
        endpoint(
            "loop-a",
            "  sequence: {steps: [{backend: digits-v1}, {endpoint: loop-b}]}\n",
        ),
        endpoint(
            "loop-b",
            "  cascade: {output: p, stages: [{endpoint: loop-a, minConfidence: 0.5}, {backend: digits-v2}]}\n",
        ),
    ]
    .concat())?;
    for name in ["pipe", "ens"] {
        s.wait_endpoint(name, "Ready", |e| {
            condition_is(
                e.status.as_ref().map(|s| s.conditions.as_slice()),
                READY,
                "True",
            )
        })
        .await?;
    }
    let cycle = |e: &Endpoint| {
        e.status.as_ref().is_some_and(|st| {
            st.conditions.iter().any(|c| {
                c.type_ == DEGRADED
                    && c.status == "True"
                    && c.reason == "Cycle"
                    && c.message.contains("loop-a -> loop-b -> loop-a")
            })
        })
    };
    for name in ["loop-a", "loop-b"] {
        s.wait_endpoint(name, "Degraded=True Cycle", cycle).await?;
    }
    let table = s.routing_table().await?;
    let pipe = table.route("pipe").context("pipe not routed")?;
    let steps = &pipe.sequence.as_ref().context("no sequence")?.steps;
    ensure!(
        steps[1].to == Hop::Endpoint("digits".to_owned())
            && steps[1].inputs["X"] == "probabilities",
        "pipe's steps: {steps:?}"
    );
    let ens = table.route("ens").context("ens not routed")?;
    let plan = ens.ensemble.as_ref().context("no ensemble")?;
    ensure!(
        plan.backends == ["digits-v1", "digits-v2"] && plan.min_responses == 2,
        "ens: {plan:?}"
    );
    ensure!(
        table.route("loop-a").is_none() && table.route("loop-b").is_none(),
        "a cycle was routed: {table:?}"
    );

    // Without loop-b, loop-a lacks the Endpoint its second step names.
    s.kubectl_ok(["delete", "endpoint", "loop-b"])?;
    let e = s
        .wait_endpoint("loop-a", "Degraded=True EndpointNotFound", |e| {
            e.status.as_ref().is_some_and(|st| {
                st.conditions.iter().any(|c| {
                    c.type_ == DEGRADED && c.status == "True" && c.reason == "EndpointNotFound"
                })
            })
        })
        .await?;
    let degraded = e
        .status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == DEGRADED))
        .context("no Degraded")?;
    ensure!(
        degraded.message.contains("loop-b"),
        "Degraded does not name loop-b: {degraded:?}"
    );
    Ok(())
}

/// Deleting a Backend garbage-collects its children, and the Endpoint reports it missing and
/// routes nothing to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_backend_is_collected_and_reported() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("delete", true).await;
    let result = deleted_backend(&mut s).await;
    s.finish(result);
}

async fn deleted_backend(s: &mut Scenario) -> anyhow::Result<()> {
    s.apply_examples_and_wait_ready()?;
    s.kubectl_ok(["delete", "backend", "digits-v2"])?;

    let deployments: Api<Deployment> = s.api();
    let services: Api<Service> = s.api();
    let pdbs: Api<PodDisruptionBudget> = s.api();
    wait_for_async("digits-v2 children garbage-collected", GC_TIMEOUT, || {
        let (deployments, services, pdbs) = (deployments.clone(), services.clone(), pdbs.clone());
        async move {
            let gone = deployments.get_opt("digits-v2").await?.is_none()
                && services.get_opt("digits-v2").await?.is_none()
                && pdbs.get_opt("digits-v2").await?.is_none();
            Ok(gone.then_some(()))
        }
    })
    .await?;

    let endpoint = s
        .wait_endpoint("digits", "Degraded=True BackendNotFound", |e| {
            e.status.as_ref().is_some_and(|st| {
                st.conditions.iter().any(|c| {
                    c.type_ == DEGRADED && c.status == "True" && c.reason == "BackendNotFound"
                })
            })
        })
        .await?;
    let status = endpoint.status.context("no status")?;
    let v2 = status.traffic.iter().find(|t| t.backend == "digits-v2");
    ensure!(
        v2.is_some_and(|t| t.percent == 0 && !t.ready),
        "digits-v2 in status.traffic: {v2:?}"
    );
    ensure!(
        status.traffic_summary == "digits-v1=100%,digits-v2=0%",
        "trafficSummary {:?}",
        status.traffic_summary
    );
    let degraded = status.conditions.iter().find(|c| c.type_ == DEGRADED);
    ensure!(
        degraded.is_some_and(|c| c.message.contains("digits-v2")),
        "Degraded does not name the missing backend: {degraded:?}"
    );
    // digits-v1 still serves.
    ensure!(
        condition_is(Some(&status.conditions), READY, "True"),
        "Endpoint not Ready: {:?}",
        status.conditions
    );
    let table = s.routing_table().await?;
    ensure!(
        weights(&table, "digits")? == [("digits-v1", 90), ("digits-v2", 0)],
        "routing table after the delete: {table:?}"
    );
    // The survivor keeps its children.
    ensure!(
        deployments.get_opt("digits-v1").await?.is_some(),
        "digits-v1 Deployment gone"
    );
    Ok(())
}

/// SIGKILL while a batch is half reconciled; the restarted operator converges without
/// duplicates, spurious rollouts or errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_operator_restarts_and_converges() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("crash", true).await;
    let result = sigkill_and_restart(&mut s).await;
    s.finish(result);
}

async fn sigkill_and_restart(s: &mut Scenario) -> anyhow::Result<()> {
    let names: Vec<String> = (0..CRASH_BATCH).map(|i| format!("crash-{i:02}")).collect();
    let manifest: String = names.iter().map(|n| backend_yaml(n, 1)).collect();
    s.apply(&manifest)?;

    // Kill as soon as the first child appears: the rest of the batch is in flight.
    let deployments: Api<Deployment> = s.api();
    let children = ListParams::default().labels(BACKEND_CHILDREN);
    let deadline = Instant::now() + READY_TIMEOUT;
    let created_before_kill = loop {
        let n = deployments.list_metadata(&children).await?.items.len();
        if n > 0 {
            s.operators[0].kill();
            break n;
        }
        ensure!(
            Instant::now() < deadline,
            "the operator created no Deployment"
        );
        tokio::time::sleep(FAST_POLL).await;
    };
    let killed = s.operators.remove(0);
    let after_kill = deployments.list_metadata(&children).await?.items.len();
    report!(
        "MEASURE crash: SIGKILL after {created_before_kill}/{CRASH_BATCH} Deployments existed \
         ({after_kill} when it died)"
    );
    ensure!(
        !Path::new(&format!("/proc/{}", killed.pid())).exists(),
        "the killed operator is still running"
    );
    let config = killed.config().clone();
    drop(killed);

    // The same identity, as a restarted container in the same pod would have.
    s.start_operator(config)?;
    let backends: Api<Backend> = s.api();
    wait_for_async(
        &format!("{CRASH_BATCH} Backends Ready"),
        READY_TIMEOUT,
        || {
            let backends = backends.clone();
            async move {
                let list = backends.list(&ListParams::default()).await?;
                let ready = list.items.iter().filter(|b| backend_ready(b)).count();
                Ok((ready == CRASH_BATCH).then_some(()))
            }
        },
    )
    .await?;

    let backends = backends.list(&ListParams::default()).await?.items;
    let listed: Vec<Deployment> = deployments.list(&children).await?.items;
    let deployment_names: BTreeSet<String> = listed.iter().map(ResourceExt::name_any).collect();
    let expected: BTreeSet<String> = names.iter().cloned().collect();
    ensure!(
        listed.len() == CRASH_BATCH && deployment_names == expected,
        "Deployments: {deployment_names:?}"
    );
    let services: Api<Service> = s.api();
    ensure!(
        services.list_metadata(&children).await?.items.len() == CRASH_BATCH,
        "Service count"
    );
    for backend in &backends {
        let name = backend.name_any();
        let mine = ListParams::default().labels(&format!("{BACKEND_LABEL}={name}"));
        let owned = deployments.list(&mine).await?.items;
        ensure!(owned.len() == 1, "{name}: {} Deployments", owned.len());
        expect_controller(&owned[0], backend)?;
    }
    // A restart that changed the pod template would have rolled out a second ReplicaSet.
    let replicasets: Api<ReplicaSet> = s.api();
    let rs = replicasets.list_metadata(&children).await?.items.len();
    ensure!(
        rs == CRASH_BATCH,
        "{rs} ReplicaSets for {CRASH_BATCH} Backends"
    );

    let log = s.operators[0].log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" ERROR ") || l.contains("reconcile failed"))
        .collect();
    ensure!(
        errors.is_empty(),
        "the restarted operator logged errors:\n{}",
        errors.join("\n")
    );
    let metrics = s.operators[0].metrics()?;
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("reconcile_failures") && !l.starts_with('#') && !l.ends_with(" 0"))
        .collect();
    ensure!(failures.is_empty(), "reconcile failures: {failures:?}");
    Ok(())
}

/// Two operators on one Lease: only the holder reconciles; when it is SIGKILLed the other
/// takes over and reconciles new work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_lease_holder_reconciles_and_the_standby_takes_over() {
    let _shared = EXCLUSIVE.read().await;
    let mut s = Scenario::new("leader", false).await;
    let result = leader_election(&mut s).await;
    s.finish(result);
}

async fn leader_election(s: &mut Scenario) -> anyhow::Result<()> {
    let base = OperatorConfig::namespaced(&s.ns);
    s.start_operator(base.clone().with_identity("op-a"))?;
    let leases: Api<Lease> = s.api();
    let lease_name = base.lease_name.clone();
    let holder = &|| {
        let (leases, lease_name) = (leases.clone(), lease_name.clone());
        async move {
            Ok::<_, anyhow::Error>(
                leases
                    .get_opt(&lease_name)
                    .await?
                    .and_then(|l| l.spec)
                    .and_then(|s| s.holder_identity),
            )
        }
    };
    wait_for_async("op-a to hold the Lease", TAKEOVER_TIMEOUT, || async move {
        Ok((holder().await?.as_deref() == Some("op-a")).then_some(()))
    })
    .await?;
    s.start_operator(base.clone().with_identity("op-b"))?;
    s.wait_log(1, "op-b waiting for leadership", "waiting for leadership")?;

    s.apply(&backend_yaml("first", 1))?;
    s.wait_backend("first", "Ready", backend_ready).await?;
    ensure!(
        holder().await?.as_deref() == Some("op-a"),
        "the Lease moved"
    );
    let (a, b) = (s.operators[0].log(), s.operators[1].log());
    ensure!(
        a.contains("acquired leadership"),
        "op-a never led:\n{}",
        s.operators[0].log_tail(20)
    );
    ensure!(reconciled(&a, "first"), "op-a did not reconcile first");
    ensure!(
        !b.contains("acquired leadership") && !b.contains("reconciling"),
        "the standby op-b reconciled:\n{b}"
    );
    ensure!(leader_gauge(&s.operators[0])? == 1, "op-a leader gauge");
    ensure!(leader_gauge(&s.operators[1])? == 0, "op-b leader gauge");
    // Spec writes come from the operator's field manager only.
    let deployment = s.api::<Deployment>().get("first").await?;
    let appliers: BTreeSet<String> = deployment
        .meta()
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    ensure!(
        appliers == BTreeSet::from(["serval-operator".to_owned()]),
        "Deployment first applied by {appliers:?}"
    );

    let killed_at = Instant::now();
    s.operators[0].kill();
    wait_for_async("op-b to take the Lease", TAKEOVER_TIMEOUT, || async move {
        Ok((holder().await?.as_deref() == Some("op-b")).then_some(()))
    })
    .await?;
    let takeover = killed_at.elapsed();
    report!(
        "MEASURE leader takeover after SIGKILL of the holder: {} ms",
        takeover.as_millis()
    );

    s.apply(&backend_yaml("second", 1))?;
    s.wait_backend("second", "Ready", backend_ready).await?;
    let b = s.operators[1].log();
    ensure!(
        b.contains("acquired leadership"),
        "op-b log:\n{}",
        s.operators[1].log_tail(20)
    );
    ensure!(reconciled(&b, "second"), "op-b did not reconcile second");
    ensure!(leader_gauge(&s.operators[1])? == 1, "op-b leader gauge");
    s.operators.remove(0);
    Ok(())
}

/// 200 Backends and 200 Endpoints in one namespace converge; reports the time and the
/// operator's peak memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_backends_and_endpoints_converge() {
    let _alone = EXCLUSIVE.write().await;
    let mut s = Scenario::new("scale", true).await;
    let result = scale(&mut s).await;
    s.finish(result);
}

async fn scale(s: &mut Scenario) -> anyhow::Result<()> {
    let backend = |i: usize| format!("m{:03}", i % SCALE_COUNT);
    let mut manifest = String::new();
    for i in 0..SCALE_COUNT {
        manifest.push_str(&backend_yaml(&backend(i), 1));
    }
    for i in 0..SCALE_COUNT {
        // Every other Endpoint splits 90/10 with its neighbour's Backend.
        let traffic: Vec<(String, u32)> = if i % 2 == 0 {
            vec![(backend(i), 90), (backend(i + 1), 10)]
        } else {
            vec![(backend(i), 100)]
        };
        let traffic: Vec<(&str, u32)> = traffic.iter().map(|(b, w)| (b.as_str(), *w)).collect();
        manifest.push_str(&endpoint_yaml(
            &format!("e{i:03}"),
            &format!("/e{i:03}"),
            &traffic,
        ));
    }

    let started = Instant::now();
    s.apply(&manifest)?;
    let applied = started.elapsed();
    let backends: Api<Backend> = s.api();
    let endpoints: Api<Endpoint> = s.api();
    let mut last_report = Instant::now();
    let deadline = started + SCALE_TIMEOUT;
    loop {
        s.operators[0].check_running()?;
        let b = backends.list(&ListParams::default()).await?.items;
        let e = endpoints.list(&ListParams::default()).await?.items;
        let ready_b = b.iter().filter(|x| backend_ready(x)).count();
        let ready_e = e
            .iter()
            .filter(|x| {
                condition_is(
                    x.status.as_ref().map(|s| s.conditions.as_slice()),
                    READY,
                    "True",
                )
            })
            .count();
        if ready_b == SCALE_COUNT && ready_e == SCALE_COUNT {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            report!(
                "scale: {:>3}s Backends Ready {ready_b}/{SCALE_COUNT}, Endpoints Ready {ready_e}/{SCALE_COUNT}",
                started.elapsed().as_secs()
            );
            last_report = Instant::now();
        }
        ensure!(
            Instant::now() < deadline,
            "not converged after {SCALE_TIMEOUT:?}: Backends Ready {ready_b}, Endpoints Ready {ready_e}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let converged = started.elapsed();
    let rss = s.operators[0].peak_rss_kib()?;
    let table = s.routing_table().await?;
    ensure!(
        table.routes.len() == SCALE_COUNT,
        "{} routes in the table",
        table.routes.len()
    );
    let starved: Vec<&str> = table
        .routes
        .iter()
        .filter(|r| r.traffic.iter().any(|t| t.weight == 0))
        .map(|r| r.endpoint.as_str())
        .collect();
    ensure!(
        starved.is_empty(),
        "routes with a zero weight after convergence: {starved:?}"
    );
    let reconciles: Vec<String> = s.operators[0]
        .metrics()?
        .lines()
        .filter(|l| l.contains("reconciles_total") && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    report!(
        "MEASURE scale {SCALE_COUNT} Backends + {SCALE_COUNT} Endpoints: all Ready {:.1} s after \
         `kubectl apply` started (apply took {:.1} s); operator peak RSS {:.1} MiB; {}",
        converged.as_secs_f64(),
        applied.as_secs_f64(),
        rss as f64 / 1024.0,
        reconciles.join(", ")
    );
    Ok(())
}

/// No operator process outlives its test: not after a panic (drop), and not when the test
/// process exits without dropping it (the kernel's parent-death signal).
#[test]
fn operator_processes_never_outlive_the_test() {
    let cluster = shared_cluster();
    install_crds(cluster).unwrap_or_else(|e| panic!("{e:#}"));
    let ns = cluster
        .create_namespace("orphans")
        .unwrap_or_else(|e| panic!("{e:#}"));

    let started = std::sync::Mutex::new(None);
    let panicked = std::panic::catch_unwind(|| {
        let operator = Operator::start(cluster, OperatorConfig::namespaced(&ns))
            .unwrap_or_else(|e| panic!("{e:#}"));
        *started.lock().expect("lock") = Some(operator.pid());
        panic!("deliberate panic with operator {} running", operator.pid());
    });
    assert!(panicked.is_err(), "the closure panics");
    let pid = started
        .lock()
        .expect("lock")
        .expect("the operator started (see the panic above)");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "operator {pid} survived a panic"
    );

    let out = std::process::Command::new(std::env::current_exe().expect("current exe"))
        .args(["--exact", "operator_child", "--ignored", "--nocapture"])
        // The child uses this process's build instead of running cargo again.
        .env(
            OPERATOR_BIN_ENV,
            operator_binary().unwrap_or_else(|e| panic!("{e:#}")),
        )
        .env(CHILD_KUBECONFIG_ENV, cluster.kubeconfig_path())
        .env(CHILD_LOG_DIR_ENV, cluster.dir().join("logs"))
        .env(CHILD_NAMESPACE_ENV, &ns)
        .output()
        .expect("running the child test process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix(CHILD_PID_MARKER))
        .and_then(|p| p.trim().parse().ok())
        .expect("the child printed its operator's pid");
    wait_for(
        "the orphaned operator to die",
        Duration::from_secs(5),
        || Ok((!Path::new(&format!("/proc/{pid}")).exists()).then_some(())),
    )
    .expect("the operator dies with the test process");
}

const CHILD_KUBECONFIG_ENV: &str = "SERVAL_E2E_CHILD_KUBECONFIG";
const CHILD_LOG_DIR_ENV: &str = "SERVAL_E2E_CHILD_LOG_DIR";
const CHILD_NAMESPACE_ENV: &str = "SERVAL_E2E_CHILD_NAMESPACE";
const CHILD_PID_MARKER: &str = "OPERATOR_PID=";

#[test]
#[ignore = "run by operator_processes_never_outlive_the_test"]
fn operator_child() {
    let var = |name: &str| std::env::var_os(name).unwrap_or_else(|| panic!("{name} unset"));
    let ns = var(CHILD_NAMESPACE_ENV).to_string_lossy().into_owned();
    let operator = Operator::start_with(
        Path::new(&var(CHILD_KUBECONFIG_ENV)),
        Path::new(&var(CHILD_LOG_DIR_ENV)),
        OperatorConfig::namespaced(&ns).with_identity("orphan"),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!("{CHILD_PID_MARKER}{}", operator.pid());
    // Never dropped: only the parent-death signal can stop it.
    std::mem::forget(operator);
}

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// One scenario: a namespace, a client, and the operators started for it.
struct Scenario {
    cluster: &'static Cluster,
    ns: String,
    client: kube::Client,
    operators: Vec<Operator>,
}

impl Scenario {
    /// A fresh namespace on the shared cluster with the CRDs installed, and an operator
    /// confined to it when `with_operator`. Panics if any of it fails: nothing to test then.
    async fn new(prefix: &str, with_operator: bool) -> Self {
        let setup = async {
            let cluster = Cluster::shared()?;
            install_crds(cluster)?;
            let ns = cluster.create_namespace(prefix)?;
            let client = cluster.client().await?;
            let mut s = Self {
                cluster,
                ns,
                client,
                operators: Vec::new(),
            };
            if with_operator {
                s.start_operator(OperatorConfig::namespaced(&s.ns))?;
            }
            anyhow::Ok(s)
        };
        setup
            .await
            .unwrap_or_else(|e| panic!("setting up scenario {prefix}: {e:#}"))
    }

    fn start_operator(&mut self, config: OperatorConfig) -> anyhow::Result<()> {
        self.operators.push(Operator::start(self.cluster, config)?);
        Ok(())
    }

    /// Stops the operators, checks none survives, and panics with context if `result` failed
    /// or an operator crashed.
    fn finish(mut self, result: anyhow::Result<()>) {
        let mut problems = Vec::new();
        if let Err(e) = result {
            problems.push(format!("{e:#}"));
        }
        for op in &mut self.operators {
            if let Err(e) = op.check_running() {
                problems.push(format!("{e:#}"));
            }
        }
        let logs: Vec<String> = self
            .operators
            .iter()
            .map(|op| {
                format!(
                    "----- operator {} ({}) -----\n{}",
                    op.identity(),
                    op.log_path().display(),
                    op.log_tail(OPERATOR_LOG_TAIL)
                )
            })
            .collect();
        let pids: Vec<u32> = self.operators.iter().map(Operator::pid).collect();
        self.operators.clear();
        let survivors: Vec<u32> = pids
            .into_iter()
            .filter(|p| Path::new(&format!("/proc/{p}")).exists())
            .collect();
        if !survivors.is_empty() {
            problems.push(format!("operator processes survived: {survivors:?}"));
        }
        if !problems.is_empty() {
            panic!(
                "scenario in namespace {} failed:\n{}\n\n{}\n{}",
                self.ns,
                problems.join("\n"),
                logs.join("\n"),
                self.cluster.log_tails(LOG_TAIL_LINES / 3)
            );
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// `kubectl -n <ns> args…`.
    fn kubectl_ok<const N: usize>(&self, args: [&str; N]) -> anyhow::Result<String> {
        self.cluster
            .kubectl_ok(["-n", self.ns.as_str()].into_iter().chain(args))
    }

    /// `kubectl apply -f -` of `manifest` into the namespace.
    fn apply(&self, manifest: &str) -> anyhow::Result<String> {
        self.cluster
            .kubectl_with_stdin(["-n", self.ns.as_str(), "apply", "-f", "-"], manifest)
    }

    /// Applies `examples/` and waits, as a user would, for everything to be Ready.
    fn apply_examples_and_wait_ready(&self) -> anyhow::Result<()> {
        self.kubectl_ok(["apply", "-f", &examples_dir()])?;
        self.kubectl_ok([
            "wait",
            "--for=condition=Ready",
            "backend/digits-v1",
            "backend/digits-v2",
            "endpoint/digits",
            &format!("--timeout={}s", READY_TIMEOUT.as_secs()),
        ])
        .map(|_| ())
    }

    async fn routing_table(&self) -> anyhow::Result<RoutingTable> {
        parse_table(&self.api::<ConfigMap>().get(ROUTING_CONFIGMAP).await?)
    }

    async fn wait_backend(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Backend) -> bool,
    ) -> anyhow::Result<Backend> {
        wait_object(
            &self.api(),
            name,
            what,
            |b: &Backend| b.status.as_ref(),
            check,
        )
        .await
    }

    async fn wait_endpoint(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&Endpoint) -> bool,
    ) -> anyhow::Result<Endpoint> {
        wait_object(
            &self.api(),
            name,
            what,
            |e: &Endpoint| e.status.as_ref(),
            check,
        )
        .await
    }

    /// Waits for `needle` in the log of operator `index`.
    fn wait_log(&self, index: usize, what: &str, needle: &str) -> anyhow::Result<()> {
        let op = &self.operators[index];
        wait_for(what, READY_TIMEOUT, || {
            Ok(op.log().contains(needle).then_some(()))
        })
    }
}

/// Polls `name` until `check` holds; the error shows the last status seen.
async fn wait_object<K, S>(
    api: &Api<K>,
    name: &str,
    what: &str,
    status: impl Fn(&K) -> Option<&S>,
    check: impl Fn(&K) -> bool,
) -> anyhow::Result<K>
where
    K: Resource + Clone + k8s_openapi::serde::de::DeserializeOwned + std::fmt::Debug,
    S: std::fmt::Debug,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let obj = api.get(name).await?;
        if check(&obj) {
            return Ok(obj);
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {READY_TIMEOUT:?} waiting for {name}: {what}; last status: {:#?}",
                status(&obj)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn shared_cluster() -> &'static Cluster {
    Cluster::shared().unwrap_or_else(|e| panic!("{e:#}"))
}

/// Applies `crds/` server-side once per cluster and waits until the API server serves them.
fn install_crds(cluster: &'static Cluster) -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let dir = repo_root().join("crds");
            let apply = || -> anyhow::Result<()> {
                cluster.kubectl_ok([
                    "apply",
                    "--server-side",
                    "--field-manager=serval-e2e",
                    "-f",
                    &dir.display().to_string(),
                ])?;
                cluster.kubectl_ok([
                    "wait",
                    "--for=condition=Established",
                    "crd/backends.serval.dev",
                    "crd/endpoints.serval.dev",
                    &format!("--timeout={}s", CRD_READY_TIMEOUT.as_secs()),
                ])?;
                // Discovery lags Established briefly; kubectl must resolve the category.
                wait_for(
                    "the serval category in discovery",
                    CRD_READY_TIMEOUT,
                    || {
                        Ok(cluster
                            .kubectl(["get", "serval", "-A"])?
                            .status
                            .success()
                            .then_some(()))
                    },
                )
            };
            apply().map_err(|e| format!("installing the CRDs: {e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn examples_dir() -> String {
    repo_root().join("examples").display().to_string()
}

/// A minimal valid Backend.
fn backend_yaml(name: &str, replicas: u32) -> String {
    backend_yaml_with_model(name, "uri: \"file:///models/digits.onnx\"", replicas)
}

fn backend_yaml_with_model(name: &str, model: &str, replicas: u32) -> String {
    let model = if model.starts_with('{') {
        model.to_owned()
    } else {
        format!("{{{model}}}")
    };
    format!(
        "---
apiVersion: serval.dev/v1alpha1
kind: Backend
metadata:
  name: {name}
spec:
  model: {model}
  replicas: {replicas}
"
    )
}

fn endpoint_yaml(name: &str, path: &str, traffic: &[(&str, u32)]) -> String {
    let traffic: String = traffic
        .iter()
        .map(|(b, w)| format!("    - {{backend: {b}, weight: {w}}}\n"))
        .collect();
    format!(
        "---
apiVersion: serval.dev/v1alpha1
kind: Endpoint
metadata:
  name: {name}
spec:
  route: {{pathPrefix: \"{path}\"}}
  traffic:
{traffic}"
    )
}

fn parse_table(cm: &ConfigMap) -> anyhow::Result<RoutingTable> {
    let json = cm
        .data
        .as_ref()
        .and_then(|d| d.get(ROUTING_TABLE_KEY))
        .with_context(|| format!("ConfigMap {ROUTING_CONFIGMAP} has no {ROUTING_TABLE_KEY}"))?;
    serde_json::from_str(json).with_context(|| format!("parsing {ROUTING_TABLE_KEY}: {json}"))
}

/// `(backend, weight)` of an Endpoint's route, in table order.
fn weights<'a>(table: &'a RoutingTable, endpoint: &str) -> anyhow::Result<Vec<(&'a str, u32)>> {
    let route = table
        .routes
        .iter()
        .find(|r| r.endpoint == endpoint)
        .with_context(|| format!("no route for {endpoint}"))?;
    Ok(route
        .traffic
        .iter()
        .map(|t| (t.backend.as_str(), t.weight))
        .collect())
}

fn condition_is(conditions: Option<&[Condition]>, type_: &str, status: &str) -> bool {
    conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == status))
}

fn backend_ready(b: &Backend) -> bool {
    condition_is(
        b.status.as_ref().map(|s| s.conditions.as_slice()),
        READY,
        "True",
    )
}

/// `child` has exactly one owner reference: `owner`, as controller.
fn expect_controller<C: Resource, O: Resource<DynamicType = ()>>(
    child: &C,
    owner: &O,
) -> anyhow::Result<()> {
    let refs = child.meta().owner_references.clone().unwrap_or_default();
    let expected = owner_ref(owner)?;
    ensure!(
        refs.len() == 1
            && refs[0].uid == expected.uid
            && refs[0].kind == expected.kind
            && refs[0].controller == Some(true),
        "{} owner references {refs:?}, expected the controller {}/{}",
        child.meta().name.as_deref().unwrap_or_default(),
        expected.kind,
        expected.name
    );
    Ok(())
}

/// `child` lists `owner` among its owner references, not as controller.
fn expect_owner<C: Resource, O: Resource<DynamicType = ()>>(
    child: &C,
    owner: &O,
) -> anyhow::Result<()> {
    let refs = child.meta().owner_references.clone().unwrap_or_default();
    let expected = owner_ref(owner)?;
    let found = refs.iter().find(|r| r.uid == expected.uid);
    ensure!(
        found.is_some_and(|r| r.kind == expected.kind && r.controller != Some(true)),
        "{} owner references {refs:?}, expected a non-controller {}/{}",
        child.meta().name.as_deref().unwrap_or_default(),
        expected.kind,
        expected.name
    );
    Ok(())
}

fn owner_ref<O: Resource<DynamicType = ()>>(owner: &O) -> anyhow::Result<OwnerReference> {
    owner.controller_owner_ref(&()).context("owner has no uid")
}

/// Whether an operator log shows a reconcile of `name`.
fn reconciled(log: &str, name: &str) -> bool {
    log.lines().any(|l| {
        l.contains("reconciling") && l.split_whitespace().any(|w| w == format!("backend={name}"))
    })
}

fn leader_gauge(op: &Operator) -> anyhow::Result<i64> {
    let metrics = op.metrics()?;
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.split_once(' ')?;
            name.ends_with("leader")
                .then(|| value.trim().parse().ok())
                .flatten()
        })
        .with_context(|| format!("no leader gauge in:\n{metrics}"))
}
