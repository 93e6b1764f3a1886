//! Endpoint → the namespace's routing table, router Deployment, Service and RBAC; status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use serval_api::{Backend, Endpoint};

use crate::backoff;
use crate::context::{Context, apply_status, now};
use crate::desired::backend::{backend_address, holds_at_zero, is_ready};
use crate::desired::router::{
    ROUTER_NAME, configmap_for, deployment_for, owners, role_binding_for, role_for, router_ready,
    router_url, service_account_for, service_for,
};
use crate::desired::routing::{BackendView, plan};
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const NAME: &str = "endpoint";
/// Periodic re-reconcile, to repair drift no watch event reports.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one Endpoint: rewrites its namespace's routing table and router, then its status.
pub async fn reconcile(endpoint: Arc<Endpoint>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&endpoint, &ctx).await;
    ctx.metrics
        .observe(NAME, started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.failures.reset(&key(&endpoint));
    }
    result
}

async fn reconcile_inner(endpoint: &Endpoint, ctx: &Context) -> Result<Action> {
    let ns = endpoint
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = endpoint.name_any();
    let client = ctx.client.clone();
    tracing::debug!(endpoint = %name, namespace = %ns, "reconciling");

    // Computed under the namespace's lock, so each holder sends the latest state and a
    // waiter that computes the same objects sends nothing.
    let mut applied = ctx.namespace_applied.lock(&ns).await;
    let mut siblings: Vec<Arc<Endpoint>> = ctx
        .endpoints
        .state()
        .into_iter()
        .filter(|e| e.namespace().as_deref() == Some(ns.as_str()))
        .collect();
    if !siblings.iter().any(|e| e.name_any() == name) {
        siblings.push(Arc::new(endpoint.clone()));
    }
    let views = backend_views(&ctx.backends.state(), &ns);
    let plan = plan(siblings.iter().map(AsRef::as_ref), &views);
    let owners = owners(siblings.iter().map(AsRef::as_ref));

    // In dependency order: the router's identity and rights, its table, then the router. A
    // Backend turning Ready changes only the table, so only the ConfigMap is sent.
    applied
        .apply_changed(
            &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
            &service_account_for(&ns, &owners),
        )
        .await?;
    applied
        .apply_changed(
            &Api::<Role>::namespaced(client.clone(), &ns),
            &role_for(&ns, &owners),
        )
        .await?;
    applied
        .apply_changed(
            &Api::<RoleBinding>::namespaced(client.clone(), &ns),
            &role_binding_for(&ns, &owners),
        )
        .await?;
    applied
        .apply_changed(
            &Api::<ConfigMap>::namespaced(client.clone(), &ns),
            &configmap_for(&ns, &plan.table, &owners),
        )
        .await?;
    applied
        .apply_changed(
            &Api::<Service>::namespaced(client.clone(), &ns),
            &service_for(&ns, &owners, &ctx.router_defaults),
        )
        .await?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let router = match applied
        .apply_changed(
            &deployments,
            &deployment_for(&ns, &ctx.router_defaults, &owners),
        )
        .await?
    {
        Some(router) => router,
        // Only the router's readiness is needed, and a read is far cheaper than an apply.
        None => deployments.get(ROUTER_NAME).await?,
    };
    drop(applied);

    let outcome = plan.outcomes.get(&name).cloned().unwrap_or_default();
    let status = crate::desired::routing::status_for(
        endpoint,
        &outcome,
        &router_url(&ns),
        router_ready(&router),
        now(),
    );
    if endpoint.status.as_ref() != Some(&status) {
        // `status.rollout` belongs to the rollout's field manager (see `backend_controller` for
        // `status.autoscaling`).
        let mut status = status;
        status.rollout = None;
        apply_status(&Api::<Endpoint>::namespaced(client, &ns), &name, &status).await?;
    }
    Ok(Action::requeue(DEFAULT_RESYNC))
}

/// Readiness and Service address of every Backend in `namespace`.
pub fn backend_views(backends: &[Arc<Backend>], namespace: &str) -> BTreeMap<String, BackendView> {
    backends
        .iter()
        .filter(|b| b.namespace().as_deref() == Some(namespace))
        .map(|b| {
            let name = b.name_any();
            let view = BackendView {
                ready: is_ready(b),
                addresses: vec![backend_address(&name, namespace)],
                scaled_to_zero: holds_at_zero(b),
            };
            (name, view)
        })
        .collect()
}

/// Endpoints to re-reconcile when a Backend appears, disappears or flips readiness: those
/// naming it, and those reaching it through another Endpoint (a cascade stage or sequence
/// step naming one), whose ability to serve changes with it.
pub fn endpoints_using(backend: &Backend, endpoints: &[Arc<Endpoint>]) -> Vec<ObjectRef<Endpoint>> {
    let name = backend.name_any();
    let ns = backend.namespace();
    let local: Vec<&Endpoint> = endpoints
        .iter()
        .filter(|e| e.namespace() == ns)
        .map(AsRef::as_ref)
        .collect();
    // Every role, cascade stages included: found on a real node, a cascade whose stages
    // turned Ready after it was planned stayed without a ready Backend.
    let mut users: BTreeSet<String> = local
        .iter()
        .filter(|e| e.spec.named_backends().any(|b| b == name))
        .map(|e| e.name_any())
        .collect();
    // Then their callers, until none is added (a cycle ends it too).
    loop {
        let callers: Vec<String> = local
            .iter()
            .filter(|e| !users.contains(&e.name_any()))
            .filter(|e| e.spec.named_endpoints().any(|n| users.contains(n)))
            .map(|e| e.name_any())
            .collect();
        if callers.is_empty() {
            break;
        }
        users.extend(callers);
    }
    local
        .into_iter()
        .filter(|e| users.contains(&e.name_any()))
        .map(ObjectRef::from_obj)
        .collect()
}

/// Endpoints to re-reconcile when a sibling changes: the whole namespace shares one table, and
/// route conflicts between siblings decide each one's status.
pub fn siblings_of(endpoint: &Endpoint, endpoints: &[Arc<Endpoint>]) -> Vec<ObjectRef<Endpoint>> {
    let ns = endpoint.namespace();
    endpoints
        .iter()
        .filter(|e| e.namespace() == ns)
        .map(|e| ObjectRef::from_obj(e.as_ref()))
        .collect()
}

/// Retries a failed reconcile with capped exponential backoff.
pub fn error_policy(endpoint: Arc<Endpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failures.fail(&key(&endpoint));
    let delay = backoff::delay(
        failures,
        backoff::DEFAULT_BACKOFF_BASE,
        backoff::DEFAULT_BACKOFF_CAP,
    );
    tracing::warn!(endpoint = %endpoint.name_any(), %error, failures, ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn key(endpoint: &Endpoint) -> String {
    format!(
        "{NAME}/{}/{}",
        endpoint.namespace().unwrap_or_default(),
        endpoint.name_any()
    )
}
