//! The per-namespace router: its routing-table ConfigMap, Deployment, Service and RBAC.
//!
//! One router per namespace, not per Endpoint: Endpoints in a namespace share one hop and one
//! table, route conflicts are decided in one place, and a namespace with many Endpoints runs
//! one router Deployment instead of many. Every object is owned (non-controller) by every
//! Endpoint of the namespace, so the garbage collector removes them with the last Endpoint.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, HTTPGetAction, PodSpec, PodTemplateSpec, Probe, Service, ServiceAccount,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::ObjectMeta;
use serval_api::Endpoint;
use serval_api::routing::{ROUTING_CONFIGMAP, ROUTING_TABLE_KEY, RoutingTable};

use super::{MANAGED_BY, restricted_pod_security_context, restricted_security_context, tcp_port};

/// Name of the router's Deployment, Service, ServiceAccount, Role and RoleBinding.
pub const ROUTER_NAME: &str = "serval-router";
/// Port the router container listens on.
pub const ROUTER_PORT: u16 = 8080;
/// The router's admin port: `/-/healthz`, `/-/readyz` and `/-/metrics` outside the traffic
/// port's connection bound, for the probes and the chart's PodMonitor.
pub const ROUTER_ADMIN_PORT: u16 = 8081;
/// Port the router's Service exposes.
pub const ROUTER_SERVICE_PORT: u16 = 80;
/// Router replicas: two, so a node loss or a rollout never takes an Endpoint offline.
pub const ROUTER_REPLICAS: i32 = 2;

/// Operator-wide settings that shape router pods.
#[derive(Clone, Debug)]
pub struct RouterDefaults {
    /// Router image.
    pub router_image: String,
    /// `appProtocol` of the Service port (REST and gRPC on one port); none by default.
    pub service_app_protocol: Option<String>,
}

/// Labels on every router object.
pub fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), ROUTER_NAME.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "router".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
    ])
}

fn selector() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/name".to_owned(), ROUTER_NAME.to_owned())])
}

/// Owner references to every Endpoint of the namespace, sorted by uid for a stable apply.
pub fn owners<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Vec<OwnerReference> {
    let mut refs: Vec<OwnerReference> = endpoints
        .into_iter()
        .filter_map(|ep| ep.object_ref(&()).uid.map(|uid| (ep, uid)))
        .map(|(ep, uid)| OwnerReference {
            api_version: Endpoint::api_version(&()).into_owned(),
            kind: Endpoint::kind(&()).into_owned(),
            name: ep.meta().name.clone().unwrap_or_default(),
            uid,
            controller: None,
            block_owner_deletion: None,
        })
        .collect();
    refs.sort_by(|a, b| a.uid.cmp(&b.uid));
    refs
}

fn meta(name: &str, namespace: &str, owners: &[OwnerReference]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels()),
        owner_references: Some(owners.to_vec()),
        ..ObjectMeta::default()
    }
}

/// The ConfigMap carrying the routing table.
pub fn configmap_for(
    namespace: &str,
    table: &RoutingTable,
    owners: &[OwnerReference],
) -> ConfigMap {
    let mut m = meta(ROUTING_CONFIGMAP, namespace, owners);
    m.annotations = Some(BTreeMap::from([(
        "serval.dev/routing-revision".to_owned(),
        table.revision.clone(),
    )]));
    ConfigMap {
        metadata: m,
        data: Some(BTreeMap::from([(
            ROUTING_TABLE_KEY.to_owned(),
            table.to_json(),
        )])),
        ..ConfigMap::default()
    }
}

/// The router's ServiceAccount; its token only reads the routing ConfigMap.
pub fn service_account_for(namespace: &str, owners: &[OwnerReference]) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(ROUTER_NAME, namespace, owners),
        ..ServiceAccount::default()
    }
}

/// Read access to the routing ConfigMap alone, so a router can watch its table (a mounted
/// volume lags by up to a minute; the API watch applies a change within a second).
pub fn role_for(namespace: &str, owners: &[OwnerReference]) -> Role {
    Role {
        metadata: meta(ROUTER_NAME, namespace, owners),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".to_owned()]),
            resource_names: Some(vec![ROUTING_CONFIGMAP.to_owned()]),
            verbs: vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()],
            ..PolicyRule::default()
        }]),
    }
}

/// Binds [`role_for`] to [`service_account_for`].
pub fn role_binding_for(namespace: &str, owners: &[OwnerReference]) -> RoleBinding {
    RoleBinding {
        metadata: meta(ROUTER_NAME, namespace, owners),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_owned()),
            kind: "Role".to_owned(),
            name: ROUTER_NAME.to_owned(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_owned(),
            name: ROUTER_NAME.to_owned(),
            namespace: Some(namespace.to_owned()),
            ..Subject::default()
        }]),
    }
}

fn probe(path: &str) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            // The admin port: probes pass while traffic connections are at the bound.
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Probe::default()
    }
}

/// The router Deployment.
pub fn deployment_for(
    namespace: &str,
    defaults: &RouterDefaults,
    owners: &[OwnerReference],
) -> Deployment {
    Deployment {
        metadata: meta(ROUTER_NAME, namespace, owners),
        spec: Some(DeploymentSpec {
            replicas: Some(ROUTER_REPLICAS),
            selector: LabelSelector {
                match_labels: Some(selector()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(ROUTER_NAME.to_owned()),
                    containers: vec![Container {
                        name: "router".to_owned(),
                        image: Some(defaults.router_image.clone()),
                        args: Some(vec![
                            "--configmap-namespace".to_owned(),
                            namespace.to_owned(),
                            "--host".to_owned(),
                            "0.0.0.0".to_owned(),
                            "--port".to_owned(),
                            ROUTER_PORT.to_string(),
                            "--admin-port".to_owned(),
                            ROUTER_ADMIN_PORT.to_string(),
                        ]),
                        ports: Some(vec![
                            tcp_port("http", i32::from(ROUTER_PORT)),
                            tcp_port("admin", i32::from(ROUTER_ADMIN_PORT)),
                        ]),
                        readiness_probe: Some(probe("/-/readyz")),
                        liveness_probe: Some(probe("/-/healthz")),
                        security_context: Some(restricted_security_context()),
                        ..Container::default()
                    }],
                    security_context: Some(restricted_pod_security_context()),
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The router Service that clients call.
pub fn service_for(
    namespace: &str,
    owners: &[OwnerReference],
    defaults: &RouterDefaults,
) -> Service {
    Service {
        metadata: meta(ROUTER_NAME, namespace, owners),
        spec: Some(ServiceSpec {
            selector: Some(selector()),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: i32::from(ROUTER_SERVICE_PORT),
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                app_protocol: defaults.service_app_protocol.clone(),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Base URL of the namespace's router, inside the cluster.
pub fn router_url(namespace: &str) -> String {
    format!("http://{ROUTER_NAME}.{namespace}.svc")
}

/// Whether the router Deployment has a ready replica for its current spec.
pub fn router_ready(deployment: &Deployment) -> bool {
    deployment
        .status
        .as_ref()
        .is_some_and(|s| s.ready_replicas.unwrap_or(0) > 0)
}
