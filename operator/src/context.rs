//! State shared by all reconciles.

use std::fmt::Debug;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serval_api::{Backend, Endpoint};

use crate::backoff::FailureCounts;
use crate::desired::backend::BackendDefaults;
use crate::desired::router::RouterDefaults;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Field manager of every object the operator applies.
pub const FIELD_MANAGER: &str = "serval-operator";
/// Field manager of status writes, separate so users can tell spec and status owners apart.
pub const STATUS_FIELD_MANAGER: &str = "serval-operator-status";

/// Shared state of the controllers.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Metrics.
    pub metrics: Metrics,
    /// All Backends, kept current by a reflector.
    pub backends: Store<Backend>,
    /// All Endpoints, kept current by a reflector.
    pub endpoints: Store<Endpoint>,
    /// Shape of Backend pods.
    pub backend_defaults: BackendDefaults,
    /// Shape of router pods.
    pub router_defaults: RouterDefaults,
    /// Consecutive failures per object, for backoff.
    pub failures: FailureCounts,
    /// What each namespace's router objects were last applied as, one writer at a time.
    pub namespace_applied: NamespaceApplied,
}

/// The namespace-level router objects each namespace was last sent, behind one lock per
/// namespace. Every Endpoint of a namespace computes the same objects, each carrying all N
/// owner references: applied concurrently they conflict in the API server (200 Endpoints made
/// etcd time out), and re-sent unchanged they make the writes grow as N².
#[derive(Default)]
pub struct NamespaceApplied(
    std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Arc<tokio::sync::Mutex<AppliedObjects>>>,
    >,
);

/// Re-apply unchanged namespace objects at least this often, to repair drift (e.g. a deleted
/// ConfigMap) that no content change would trigger.
pub const DEFAULT_REAPPLY_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl NamespaceApplied {
    /// Waits for, and holds, `namespace`'s record: its Endpoints write the shared objects one
    /// reconcile at a time, and a waiter finds what the holder sent.
    pub async fn lock(&self, namespace: &str) -> tokio::sync::OwnedMutexGuard<AppliedObjects> {
        let record = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(namespace.to_owned())
            .or_default()
            .clone();
        record.lock_owned().await
    }
}

/// Fingerprint of each object last applied in one namespace, by kind, and when.
#[derive(Default)]
pub struct AppliedObjects(std::collections::HashMap<String, (u64, std::time::Instant)>);

impl AppliedObjects {
    /// Server-side applies `obj` unless the same content was applied within
    /// [`DEFAULT_REAPPLY_AFTER`]; returns the stored object when it was sent.
    pub async fn apply_changed<K>(&mut self, api: &Api<K>, obj: &K) -> Result<Option<K>>
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + Debug,
    {
        let kind = K::kind(&()).into_owned();
        let fingerprint = fingerprint(obj);
        let fresh = self
            .0
            .get(&kind)
            .is_some_and(|(f, at)| *f == fingerprint && at.elapsed() < DEFAULT_REAPPLY_AFTER);
        if fresh {
            return Ok(None);
        }
        let stored = apply(api, obj).await?;
        self.0
            .insert(kind, (fingerprint, std::time::Instant::now()));
        Ok(Some(stored))
    }
}

fn fingerprint(obj: &impl Serialize) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Now, at the one-second precision the API server stores, so a status read back compares equal.
pub fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Server-side applies `obj` with the operator's field manager and returns the stored object.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    let name = obj
        .meta()
        .name
        .as_deref()
        .ok_or(Error::MissingField("metadata.name"))?;
    Ok(api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

/// Server-side applies a status.
pub async fn apply_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<()>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    apply_status_as(api, name, status, STATUS_FIELD_MANAGER).await
}

/// Server-side applies the status fields in `status` as `manager`: fields that manager set
/// before and `status` leaves out are removed.
pub async fn apply_status_as<K, S>(
    api: &Api<K>,
    name: &str,
    status: &S,
    manager: &str,
) -> Result<()>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Clone + Debug,
    S: Serialize,
{
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Deletes an object; already gone is fine.
pub async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
