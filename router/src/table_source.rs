//! Where tables come from: a watched file (local mode) or the namespace's `serval-routing`
//! ConfigMap through a Kubernetes API watch (a mounted ConfigMap volume lags by a minute; a
//! watch sees `kubectl apply` within a second).

use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serval_api::routing::{ROUTING_CONFIGMAP, ROUTING_TABLE_KEY};
use tokio::task::JoinHandle;

use crate::errors::{Error, Result};
use crate::table::TableStore;

/// Reads and applies the file once; used at startup so a valid file makes the router ready
/// before it accepts its first connection. Returns the bytes seen.
pub async fn load_file(store: &TableStore, path: &PathBuf) -> Option<Vec<u8>> {
    match tokio::fs::read(path).await {
        Ok(bytes) => {
            // A refusal is logged and counted by the store.
            let _ = store.apply_json(&bytes);
            Some(bytes)
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "routing table file unreadable");
            None
        }
    }
}

/// Polls the file and applies each new content once it reads the same twice in a row, so a
/// writer caught mid-write is not refused (writers should still rename atomically).
pub fn watch_file(
    store: Arc<TableStore>,
    path: PathBuf,
    poll: Duration,
    mut last: Option<Vec<u8>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut pending: Option<Vec<u8>> = None;
        let mut ticker = tokio::time::interval(poll);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Ok(bytes) = tokio::fs::read(&path).await else {
                continue;
            };
            if last.as_ref() == Some(&bytes) {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&bytes) {
                pending = Some(bytes);
                continue;
            }
            let _ = store.apply_json(&bytes);
            last = Some(bytes);
            pending = None;
        }
    })
}

/// Watches the `serval-routing` ConfigMap in `namespace` and applies every version of it.
pub async fn watch_configmap(store: Arc<TableStore>, namespace: &str) -> Result<JoinHandle<()>> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::Source(e.to_string()))?;
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={ROUTING_CONFIGMAP}"));
    let namespace = namespace.to_owned();
    Ok(tokio::spawn(async move {
        // The watcher re-lists and re-watches on its own with backoff; errors are transient.
        let mut events = pin!(watcher(api, config).default_backoff().applied_objects());
        while let Some(event) = events.next().await {
            match event {
                Ok(cm) => match cm.data.as_ref().and_then(|d| d.get(ROUTING_TABLE_KEY)) {
                    Some(json) => {
                        let _ = store.apply_json(json.as_bytes());
                    }
                    None => store.refuse(&format!(
                        "ConfigMap {namespace}/{ROUTING_CONFIGMAP} has no key {ROUTING_TABLE_KEY}"
                    )),
                },
                Err(e) => tracing::warn!(error = %e, "routing ConfigMap watch error; retrying"),
            }
        }
    }))
}
