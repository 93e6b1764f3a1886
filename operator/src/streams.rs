//! One reflector per kind, its events fanned out to several controllers.
//!
//! Endpoint reconciles read Backends and sibling Endpoints from reflector stores. If the
//! triggers came from separate watches, a trigger could arrive before the store had the change
//! and the reconcile would compute a stale routing table. Here every event is forwarded only
//! after the reflector has written it to the store, so a reconcile always sees at least what
//! triggered it. Deletes are forwarded too, unlike kube-runtime's shared streams.

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use kube::ResourceExt;
use kube::runtime::watcher;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// A trigger stream as `Controller::for_stream` / `watches_stream` take it.
pub type Trigger<K> = UnboundedReceiverStream<Result<K, watcher::Error>>;

/// Drives `events` (a reflector's output) and returns two triggers: every touched object, and
/// only objects that are new, deleted, or whose `key` changed (e.g. generation or readiness),
/// so status-only updates do not fan out to every dependent.
///
/// Objects listed during the initial sync are held back until the store is complete.
pub fn split<K, S, F, V>(events: S, key: F) -> (Trigger<K>, Trigger<K>)
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    F: Fn(&K) -> V + Send + 'static,
    V: PartialEq + Send + 'static,
{
    let (all_tx, all_rx) = mpsc::unbounded_channel();
    let (sig_tx, sig_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut seen: HashMap<String, V> = HashMap::new();
        let mut init: Vec<K> = Vec::new();
        let mut events = std::pin::pin!(events);
        let send = |obj: K, significant: bool| {
            if significant {
                let _ = sig_tx.send(Ok(obj.clone()));
            }
            let _ = all_tx.send(Ok(obj));
        };
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => init.clear(),
                Ok(watcher::Event::InitApply(obj)) => init.push(obj),
                Ok(watcher::Event::InitDone) => {
                    seen.clear();
                    for obj in init.drain(..) {
                        seen.insert(uid(&obj), key(&obj));
                        send(obj, true);
                    }
                }
                Ok(watcher::Event::Apply(obj)) => {
                    let k = key(&obj);
                    let significant = seen.get(&uid(&obj)) != Some(&k);
                    seen.insert(uid(&obj), k);
                    send(obj, significant);
                }
                Ok(watcher::Event::Delete(obj)) => {
                    seen.remove(&uid(&obj));
                    send(obj, true);
                }
                Err(e) => tracing::warn!(error = %e, "watch error; retrying with backoff"),
            }
            if all_tx.is_closed() && sig_tx.is_closed() {
                break;
            }
        }
    });
    (
        UnboundedReceiverStream::new(all_rx),
        UnboundedReceiverStream::new(sig_rx),
    )
}

fn uid<K: kube::Resource>(obj: &K) -> String {
    obj.uid().unwrap_or_else(|| obj.name_any())
}
