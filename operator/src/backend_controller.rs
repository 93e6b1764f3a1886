//! Backend → Deployment, Service, PodDisruptionBudget; status from the Deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::controller::Action;
use serval_api::Backend;

use crate::backoff;
use crate::context::{Context, apply, apply_status, delete_if_present, now};
use crate::desired::backend::{deployment_for, pdb_for, service_for, status_for};
use crate::error::{Error, Result};

/// Controller name in metrics and logs.
pub const NAME: &str = "backend";
/// Periodic re-reconcile, to repair drift no watch event reports.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one Backend.
pub async fn reconcile(backend: Arc<Backend>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&backend, &ctx).await;
    ctx.metrics
        .observe(NAME, started.elapsed(), result.as_ref().err());
    if result.is_ok() {
        ctx.failures.reset(&key(&backend));
    }
    result
}

async fn reconcile_inner(backend: &Backend, ctx: &Context) -> Result<Action> {
    let ns = backend
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = backend.name_any();
    let client = ctx.client.clone();
    tracing::debug!(backend = %name, namespace = %ns, "reconciling");

    let deployment = apply(
        &Api::<Deployment>::namespaced(client.clone(), &ns),
        &deployment_for(backend, &ctx.backend_defaults),
    )
    .await?;
    apply(
        &Api::<Service>::namespaced(client.clone(), &ns),
        &service_for(backend, &ctx.backend_defaults),
    )
    .await?;

    let pdbs = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    match pdb_for(backend) {
        Some(pdb) => {
            apply(&pdbs, &pdb).await?;
        }
        // A PDB may exist unless the last status, written for this very generation, had at most
        // one replica. That saves a call per steady-state reconcile, and still removes a PDB
        // applied just before a crash (the status is then missing or of an older generation).
        None if pdb_may_exist(backend) => {
            delete_if_present(&pdbs, &name).await?;
        }
        None => {}
    }

    let mut status = status_for(backend, Some(&deployment), now());
    if backend.status.as_ref() != Some(&status) {
        // `status.autoscaling` belongs to the autoscaler's field manager: a reconcile holding
        // an older copy of the Backend must not write an older decision back.
        status.autoscaling = None;
        apply_status(&Api::<Backend>::namespaced(client, &ns), &name, &status).await?;
    }
    Ok(Action::requeue(DEFAULT_RESYNC))
}

fn pdb_may_exist(backend: &Backend) -> bool {
    backend
        .status
        .as_ref()
        .is_none_or(|s| s.replicas > 1 || s.observed_generation != backend.metadata.generation)
}

/// Retries a failed reconcile with capped exponential backoff.
pub fn error_policy(backend: Arc<Backend>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failures.fail(&key(&backend));
    let delay = backoff::delay(
        failures,
        backoff::DEFAULT_BACKOFF_BASE,
        backoff::DEFAULT_BACKOFF_CAP,
    );
    tracing::warn!(backend = %backend.name_any(), %error, failures, ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn key(backend: &Backend) -> String {
    format!(
        "{NAME}/{}/{}",
        backend.namespace().unwrap_or_default(),
        backend.name_any()
    )
}
