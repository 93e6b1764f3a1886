//! Desired state as pure functions of the resources: no I/O, unit-tested directly.
//!
//! The operator applies these objects with server-side apply; local mode derives the same
//! routing table from the same functions.

pub mod backend;
pub mod rollout;
pub mod router;
pub mod routing;

use k8s_openapi::api::core::v1::{
    Capabilities, ContainerPort, PodSecurityContext, SeccompProfile, SecurityContext,
};

/// `app.kubernetes.io/managed-by` value on everything the operator creates.
pub const MANAGED_BY: &str = "serval-operator";

/// A named TCP container port (probes, Services and PodMonitors refer to it by name).
pub fn tcp_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

/// A container security context that passes the `restricted` Pod Security Standard.
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..SecurityContext::default()
    }
}

/// The pod-level half of the `restricted` standard; uid 65532 is the conventional nonroot user.
pub fn restricted_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        fs_group: Some(65532),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}
