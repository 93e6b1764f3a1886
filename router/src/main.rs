//! `serval-router`: the routing proxy binary.

use clap::Parser;
use serval_router::{Config, Router};
use tracing_subscriber::EnvFilter;

// hyper's request and response objects, header maps and the client's pool bookkeeping allocate
// and free small blocks on every request; glibc malloc and free were ~5 % of the router's CPU
// samples (perf, c = 32). With mimalloc and flattened writes (see `server.rs`), 5 of 5
// alternating runs used less CPU per request: 34.5 µs against 36.2 µs (median).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    let stop = serval_stop::requested(config.exit_with_stdin);
    // The main thread runs the acceptor, the table source and shard 0; the router starts one
    // more single-threaded runtime per further shard (see `Router::serve`).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let router = Router::bind(config).await?;
        router.serve(stop).await;
        Ok(())
    })
}
