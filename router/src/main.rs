//! `serval-router`: the routing proxy binary.

use clap::Parser;
use serval_router::{Config, Router};
use tracing_subscriber::EnvFilter;

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
