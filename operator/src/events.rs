//! Events the operator publishes (autoscaling scales, rollout transitions), one per occurrence.
//!
//! Created directly rather than through kube's `Recorder`: it folds Events of the same reason
//! into one series that keeps the first note, which would show every later scale or
//! transition with the first one's words.

use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};

/// Name the operator's Events are reported under.
pub const EVENT_REPORTER: &str = "serval-operator";
/// Longest note kept (the API's bound is 1 kB).
const MAX_NOTE_CHARS: usize = 1000;

/// One Event to publish.
pub struct Occurrence<'a> {
    /// CamelCase reason, e.g. `ScaledUp`.
    pub reason: &'a str,
    /// CamelCase action, e.g. `Scale`.
    pub action: &'a str,
    /// What happened, in a sentence.
    pub note: String,
    /// `Warning` rather than `Normal`.
    pub warning: bool,
}

/// Publishes `occurrence` on `regarding` as this operator replica (`instance`); a failure is
/// logged, never fatal.
pub async fn publish<K>(client: &Client, regarding: &K, instance: &str, occurrence: Occurrence<'_>)
where
    K: Resource<DynamicType = ()>,
{
    let ns = regarding.namespace().unwrap_or_default();
    let name = regarding.name_any();
    let event = K8sEvent {
        metadata: ObjectMeta {
            generate_name: Some(format!(
                "{name}-{}-",
                occurrence.action.to_ascii_lowercase()
            )),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some(
            if occurrence.warning {
                "Warning"
            } else {
                "Normal"
            }
            .to_owned(),
        ),
        reason: Some(occurrence.reason.to_owned()),
        action: Some(occurrence.action.to_owned()),
        note: Some(occurrence.note.chars().take(MAX_NOTE_CHARS).collect()),
        regarding: Some(regarding.object_ref(&())),
        reporting_controller: Some(EVENT_REPORTER.to_owned()),
        reporting_instance: Some(instance.to_owned()),
        ..K8sEvent::default()
    };
    let events = Api::<K8sEvent>::namespaced(client.clone(), &ns);
    if let Err(error) = events.create(&PostParams::default(), &event).await {
        tracing::warn!(namespace = %ns, %name, reason = occurrence.reason, %error, "publishing an Event");
    }
}
