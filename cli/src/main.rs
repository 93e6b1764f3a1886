//! `serval`: run Serval manifests on this machine, print the CRDs, or show the version.
#![forbid(unsafe_code)]

mod autoscaler;
mod demo;
mod local;
mod manifests;
mod restarts;
mod rollouts;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Router port in local mode: the same as in a cluster's router container.
const DEFAULT_PORT: u16 = 8080;

#[derive(Parser, Debug)]
#[command(name = "serval", version, about = "Serve ONNX models with Serval")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run Backend and Endpoint manifests locally: one model server per replica, one router.
    Local {
        /// A manifest file or a directory of them.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Router port.
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u16,
        /// Router address.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// `serval-sidecar` executable (default: next to this one).
        #[arg(long, env = "SERVAL_SIDECAR_BIN")]
        sidecar_bin: Option<PathBuf>,
        /// `serval-router` executable (default: next to this one).
        #[arg(long, env = "SERVAL_ROUTER_BIN")]
        router_bin: Option<PathBuf>,
        /// Once ready, send this PNG and an Open Inference Protocol request, and print the answers.
        #[arg(long)]
        demo: Option<PathBuf>,
        /// Stable window of the autoscaling decision, in seconds (the operator's by default);
        /// a shorter one follows a load change sooner.
        #[arg(long, env = "SERVAL_AUTOSCALE_STABLE_WINDOW", default_value_t = autoscaler::DEFAULT_LOCAL_STABLE_WINDOW.as_secs())]
        autoscale_stable_window: u64,
    },
    /// Print the CustomResourceDefinitions as YAML.
    Crds,
    /// Print the version.
    Version,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Local {
            file,
            port,
            host,
            sidecar_bin,
            router_bin,
            demo,
            autoscale_stable_window,
        } => {
            let opts = local::Options {
                files: file,
                listen: SocketAddr::new(host, port),
                sidecar_bin: sidecar_bin.unwrap_or_else(|| local::sibling_binary("serval-sidecar")),
                router_bin: router_bin.unwrap_or_else(|| local::sibling_binary("serval-router")),
                demo,
                stable_window: std::time::Duration::from_secs(autoscale_stable_window),
            };
            local::run(opts).await
        }
        Cmd::Crds => {
            for crd in serval_api::crd::crds() {
                print!("---\n{}", serval_api::crd::crd_yaml(&crd)?);
            }
            Ok(())
        }
        Cmd::Version => {
            println!("serval {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
