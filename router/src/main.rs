//! `serval-router`: the routing proxy binary.

use clap::Parser;
use serval_router::{Config, Router, server};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let config = Config::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        rt.worker_threads(config.worker_threads);
    }
    rt.enable_all().build()?.block_on(async move {
        let router = Router::bind(config).await?;
        router.serve(server::shutdown_signal()).await;
        Ok(())
    })
}
