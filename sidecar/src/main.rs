//! `serval-sidecar`: serve one ONNX model. Exits non-zero if the model cannot be loaded or
//! verified; on SIGTERM or Ctrl-C drains and exits.
#![forbid(unsafe_code)]

use clap::Parser;
use serval_sidecar::{Args, Config, Sidecar};
use tracing_subscriber::EnvFilter;

// Per request the server allocates and frees many small buffers (JSON values, tensors, tract's
// scratch); mimalloc measured 10-25 % less CPU per small-model request than glibc malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    // tract panics on some bad inputs; the engine catches them and fails that batch. Log the
    // panic once through tracing instead of the default multi-line stderr dump.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        tracing::error!(%thread, panic = %info, "panic");
    }));
    let config = Config::from_args(Args::parse())?;
    let sidecar = Sidecar::start(config).await?;
    // `None`: terminated while still loading.
    let loaded = tokio::select! {
        ready = sidecar.ready() => Some(ready),
        () = terminated() => None,
    };
    match loaded {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            sidecar.shutdown();
            sidecar.wait().await;
            anyhow::bail!("{e}");
        }
        None => {
            tracing::info!("terminated before the model was ready");
            sidecar.shutdown();
            sidecar.wait().await;
            return Ok(());
        }
    }
    terminated().await;
    sidecar.shutdown();
    sidecar.wait().await;
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
