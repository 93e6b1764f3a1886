//! Wires reflectors, controllers and shutdown together.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use serval_api::{Backend, Endpoint};

use crate::autoscaler::{Autoscaler, AutoscalerSettings};
use crate::backoff::FailureCounts;
use crate::context::Context;
use crate::desired::MANAGED_BY;
use crate::desired::backend::{BackendDefaults, holds_at_zero, is_ready};
use crate::desired::router::RouterDefaults;
use crate::metrics::Metrics;
use crate::rollouts::Rollouts;
use crate::signals::{FileSignals, HttpSignals, SignalSource};
use crate::{backend_controller, endpoint_controller, streams};

/// Debounce of reconcile triggers: collapses a burst of events (a `kubectl apply` of many
/// objects) into one reconcile per object, well inside the 2 s routing-update goal.
pub const DEFAULT_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(200);

/// What the controllers need beyond a client.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Model-server image for Backend pods.
    pub sidecar_image: String,
    /// Router image.
    pub router_image: String,
    /// `appProtocol` of the Services' one port, for a mesh or Gateway that must be told the
    /// port speaks HTTP/2 (e.g. `kubernetes.io/h2c`); none by default.
    pub service_app_protocol: Option<String>,
    /// Watch only this namespace; all when `None`.
    pub namespace: Option<String>,
    /// This replica's identity (the Lease holder), named in the Events it reports.
    pub identity: String,
    /// How Backends with `spec.autoscaling` are sampled.
    pub autoscaler: AutoscalerSettings,
    /// Read load from this JSON file instead of the pods (the end-to-end suite's test signal
    /// source; see [`FileSignals`]).
    pub signals_file: Option<std::path::PathBuf>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers until `shutdown` resolves, then lets in-flight reconciles finish.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let ns = settings.namespace.as_deref();
    let shutdown = futures::future::FutureExt::shared(Box::pin(shutdown));

    let (backend_store, backend_writer) = reflector::store::<Backend>();
    let backend_events = reflector(
        backend_writer,
        watcher(api::<Backend>(&client, ns), watcher::Config::default()),
    )
    .default_backoff();
    // Endpoints care about a Backend appearing, disappearing, flipping readiness, or going to
    // or coming back from zero (its requests are then held rather than refused).
    let (backend_all, backend_changed) = streams::split(backend_events, |b: &Backend| {
        (is_ready(b), holds_at_zero(b))
    });

    let (endpoint_store, endpoint_writer) = reflector::store::<Endpoint>();
    let endpoint_events = reflector(
        endpoint_writer,
        watcher(api::<Endpoint>(&client, ns), watcher::Config::default()),
    )
    .default_backoff();
    // Siblings care about spec changes, creation and deletion, not status writes.
    let (endpoint_all, endpoint_changed) =
        streams::split(endpoint_events, |e: &Endpoint| e.meta().generation);

    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics,
        backends: backend_store.clone(),
        endpoints: endpoint_store.clone(),
        backend_defaults: BackendDefaults {
            sidecar_image: settings.sidecar_image.clone(),
            service_app_protocol: settings.service_app_protocol.clone(),
        },
        router_defaults: RouterDefaults {
            router_image: settings.router_image.clone(),
            service_app_protocol: settings.service_app_protocol.clone(),
        },
        failures: FailureCounts::default(),
        namespace_applied: Default::default(),
    });
    let config = ControllerConfig::default().debounce(DEFAULT_DEBOUNCE);
    let backend_children =
        watcher::Config::default().labels("app.kubernetes.io/name=serval-backend");
    let router_children = watcher::Config::default().labels("app.kubernetes.io/name=serval-router");

    let backends = Controller::for_stream(backend_all, backend_store)
        .with_config(config.clone())
        .owns(api::<Deployment>(&client, ns), backend_children.clone())
        .owns(api::<Service>(&client, ns), backend_children.clone())
        .owns(api::<PodDisruptionBudget>(&client, ns), backend_children)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            backend_controller::reconcile,
            backend_controller::error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "backend controller event");
            }
        });

    let siblings_store = endpoint_store.clone();
    let users_store = endpoint_store.clone();
    let endpoints = Controller::for_stream(endpoint_all, endpoint_store)
        .with_config(config)
        .watches_stream(endpoint_changed, move |ep: Endpoint| {
            endpoint_controller::siblings_of(&ep, &siblings_store.state())
        })
        .watches_stream(backend_changed, move |b: Backend| {
            endpoint_controller::endpoints_using(&b, &users_store.state())
        })
        .owns(api::<ConfigMap>(&client, ns), router_children.clone())
        .owns(api::<Deployment>(&client, ns), router_children.clone())
        .owns(api::<Service>(&client, ns), router_children)
        .graceful_shutdown_on(shutdown.clone())
        .run(
            endpoint_controller::reconcile,
            endpoint_controller::error_policy,
            ctx.clone(),
        )
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "endpoint controller event");
            }
        });

    // The autoscaler reads pod addresses from the EndpointSlices of the operator's Services.
    let source: Arc<dyn SignalSource> = match &settings.signals_file {
        Some(path) => Arc::new(FileSignals::new(path.clone())),
        None => {
            let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
            let slices = reflector(
                slice_writer,
                watcher(
                    api::<EndpointSlice>(&client, ns),
                    watcher::Config::default()
                        .labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}")),
                ),
            )
            .default_backoff()
            .for_each(|_| async {});
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = slices => {}
                    () = stop => {}
                }
            });
            Arc::new(HttpSignals::new(slice_store, ctx.metrics.clone()))
        }
    };
    let autoscaler = Autoscaler::new(settings.autoscaler, source.clone(), &settings.identity)
        .run(ctx.clone(), shutdown.clone());
    let rollouts = Rollouts::new(source, &settings.identity).run(ctx.clone(), shutdown.clone());

    tracing::info!(namespace = ns.unwrap_or("<all>"), "controllers running");
    futures::join!(backends, endpoints, autoscaler, rollouts);
    tracing::info!("controllers stopped");
}

/// Name of an object for logs.
pub fn display_name<K: ResourceExt>(obj: &K) -> String {
    format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
}
