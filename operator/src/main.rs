//! `serval-operator`: runs the Backend and Endpoint controllers under a leader Lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context as _;
use clap::Parser;
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::registry::Registry;
use serval_operator::autoscaler::AutoscalerSettings;
use serval_operator::http::{Health, serve};
use serval_operator::metrics::Metrics;
use serval_operator::run::{Settings, run};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Lease validity: a crashed leader is replaced within 15 s.
const DEFAULT_LEASE_SECONDS: u64 = 15;
/// Renew this long before expiry, tolerating that much clock skew between nodes.
const DEFAULT_LEASE_GRACE_SECONDS: u64 = 5;

#[derive(Parser, Debug)]
#[command(
    name = "serval-operator",
    version,
    about = "Reconciles Serval Backends and Endpoints"
)]
struct Args {
    /// Model-server image for Backend pods.
    #[arg(long, env = "SERVAL_SIDECAR_IMAGE", default_value = concat!("serval-sidecar:", env!("CARGO_PKG_VERSION")))]
    sidecar_image: String,
    /// Router image.
    #[arg(long, env = "SERVAL_ROUTER_IMAGE", default_value = concat!("serval-router:", env!("CARGO_PKG_VERSION")))]
    router_image: String,
    /// `appProtocol` of the one port of the Services the operator creates (Backends' and
    /// routers'), e.g. `kubernetes.io/h2c` for a mesh or Gateway that must be told the port
    /// speaks HTTP/2 (gRPC); the port serves HTTP/1.1 and HTTP/2 either way. Unset: none.
    #[arg(long, env = "SERVAL_SERVICE_APP_PROTOCOL", value_parser = app_protocol)]
    service_app_protocol: Option<String>,
    /// Watch only this namespace (all namespaces when unset).
    #[arg(long, env = "SERVAL_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "SERVAL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: String,
    /// Name of the leader-election Lease.
    #[arg(long, env = "SERVAL_LEASE_NAME", default_value = "serval-operator")]
    lease_name: String,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "SERVAL_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Stable window of autoscaling decisions, in seconds (Knative's 60 by default); the panic
    /// window is 6 s or the stable window if shorter. Shorter follows load changes sooner.
    #[arg(long, env = "SERVAL_AUTOSCALE_STABLE_WINDOW", default_value_t = serval_autoscale::DEFAULT_STABLE_WINDOW.as_secs(), value_parser = clap::value_parser!(u64).range(1..=3600))]
    autoscale_stable_window: u64,
    /// Read autoscaling load from this JSON file instead of the pods'
    /// `/-/signals` (for tests: `{"<namespace>/<backend>": {"inflight": 12.5, "requests": 40,
    /// "held": 0}}`).
    #[arg(long, env = "SERVAL_SIGNALS_FILE", hide = true)]
    signals_file: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let health = Arc::new(Health::default());
    let stop = CancellationToken::new();
    let listener = TcpListener::bind(&args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz, /metrics");
    let http = tokio::spawn(serve(
        listener,
        Arc::new(registry),
        health.clone(),
        stop.clone(),
    ));

    let shutdown = CancellationToken::new();
    tokio::spawn(signal_handler(shutdown.clone()));

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let lease = LeaseManagerBuilder::new(client.clone(), &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(DEFAULT_LEASE_SECONDS)
        .with_grace(DEFAULT_LEASE_GRACE_SECONDS)
        .with_field_manager("serval-operator-lease")
        .build()
        .await
        .context("setting up the leader Lease")?;
    let (mut leader, lease_task) = lease.watch().await;
    health.ready.store(true, Ordering::Relaxed);

    tracing::info!(%identity, lease = %args.lease_name, "waiting for leadership");
    loop {
        if *leader.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = leader.changed() => changed.context("lease manager stopped")?,
            _ = shutdown.cancelled() => {
                stop.cancel();
                return Ok(());
            }
        }
    }
    tracing::info!(%identity, "acquired leadership");
    metrics.leader.set(1);

    // Stop the controllers on SIGTERM or on losing the Lease; in the latter case exit non-zero
    // so the pod restarts and campaigns again instead of writing without the Lease.
    let lost = CancellationToken::new();
    let controllers_stop = CancellationToken::new();
    {
        let (lost, controllers_stop, shutdown) =
            (lost.clone(), controllers_stop.clone(), shutdown.clone());
        let mut leader = leader.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = async { while leader.changed().await.is_ok() && *leader.borrow() {} } => {
                    tracing::error!("lost leadership; stopping controllers");
                    lost.cancel();
                }
            }
            controllers_stop.cancel();
        });
    }
    let settings = Settings {
        sidecar_image: args.sidecar_image,
        router_image: args.router_image,
        service_app_protocol: args.service_app_protocol.filter(|p| !p.is_empty()),
        namespace: args.watch_namespace,
        identity: identity.clone(),
        autoscaler: AutoscalerSettings {
            stable_window: std::time::Duration::from_secs(args.autoscale_stable_window),
            ..AutoscalerSettings::default()
        },
        signals_file: args.signals_file,
    };
    let stopped = controllers_stop.clone();
    run(client, settings, metrics.clone(), async move {
        stopped.cancelled().await
    })
    .await;
    metrics.leader.set(0);
    health.ready.store(false, Ordering::Relaxed);

    if lost.is_cancelled() {
        stop.cancel();
        anyhow::bail!("lost the leader Lease");
    }
    // Hand the Lease over at once rather than making the next leader wait for it to expire.
    drop(leader);
    match lease_task.await {
        Ok(Ok(manager)) => {
            if let Err(e) = manager.release().await {
                tracing::warn!(error = %e, "releasing the Lease failed; it will expire");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "lease manager failed"),
        Err(e) => tracing::warn!(error = %e, "lease task panicked"),
    }
    stop.cancel();
    let _ = http.await;
    tracing::info!("stopped");
    Ok(())
}

async fn signal_handler(shutdown: CancellationToken) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested; finishing in-flight reconciles");
    shutdown.cancel();
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "serval-operator".to_owned());
    format!("{host}-{}", std::process::id())
}

/// A Service port's `appProtocol`: a qualified name (`name` or `prefix/name`, as Kubernetes
/// validates it), or empty for none; refused at start, not at the first Service apply.
fn app_protocol(v: &str) -> Result<String, String> {
    if v.is_empty() {
        return Ok(String::new());
    }
    let (prefix, name) = v.rsplit_once('/').map_or((None, v), |(p, n)| (Some(p), n));
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|l| {
                !l.is_empty()
                    && l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && l.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            })
    });
    if name_ok && prefix_ok {
        Ok(v.to_owned())
    } else {
        Err(format!(
            "{v:?} is not an appProtocol (a name like `http2`, or `prefix/name` like `kubernetes.io/h2c`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::app_protocol;

    #[test]
    fn app_protocols_are_qualified_names() {
        for ok in [
            "",
            "kubernetes.io/h2c",
            "http2",
            "grpc",
            "example.com/my-proto",
        ] {
            assert_eq!(app_protocol(ok).as_deref(), Ok(ok));
        }
        for bad in ["h2c/", "/h2c", "Kubernetes.IO/h2c", "a b", "-grpc", "x/y/z"] {
            assert!(app_protocol(bad).is_err(), "{bad}");
        }
    }
}
