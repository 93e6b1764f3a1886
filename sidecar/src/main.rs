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

// This runtime only accepts connections, loads the model and waits for signals; requests are
// served on the sidecar's own I/O threads.
#[tokio::main(flavor = "current_thread")]
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
    let args = Args::parse();
    let mut stop = tokio::spawn(serval_stop::requested(args.exit_with_stdin));
    let config = Config::from_args(args)?;
    let sidecar = Sidecar::start(config).await?;
    // `None`: terminated while still loading.
    let loaded = tokio::select! {
        ready = sidecar.ready() => Some(ready),
        _ = &mut stop => None,
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
    let _ = stop.await;
    sidecar.shutdown();
    sidecar.wait().await;
    Ok(())
}
