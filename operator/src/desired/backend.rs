//! Desired Kubernetes objects for a Backend, and its status from what the Deployment reports.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, HTTPGetAction, PersistentVolumeClaimVolumeSource,
    PodSpec, PodTemplateSpec, Probe, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serval_api::backend::{SIDECAR_ADMIN_PORT, SIDECAR_PORT};
use serval_api::conditions::{DEGRADED, PROGRESSING, READY, reason};
use serval_api::sidecar::{flags, sidecar_args};
use serval_api::{Backend, BackendStatus};

use super::{MANAGED_BY, restricted_pod_security_context, restricted_security_context, tcp_port};
use crate::conditions::{Observed, settle};

/// Label that selects a Backend's pods.
pub const BACKEND_LABEL: &str = "serval.dev/backend";
/// Name of the model-server container.
pub const SIDECAR_CONTAINER: &str = "model-server";
/// Name of the optional user container.
pub const USER_CONTAINER: &str = "user";
/// Port the Backend's Service exposes.
pub const SERVICE_PORT: u16 = 8080;
/// Where `pvc://` claims are mounted.
const PVC_MOUNT_ROOT: &str = "/models";
/// Failures allowed while the model downloads and warms up: 10 min at 1 s, since a large
/// model over a slow link must not be killed mid-download.
const STARTUP_FAILURE_THRESHOLD: i32 = 600;
/// Seconds between probes while starting and while serving. A pod is Ready at the first
/// readiness probe after its model is warm, so the period is added to every start, which a
/// request held at zero replicas waits for: at 5 s a scale from zero took 6.5 s for a model
/// that loads in 1.2 s (real-node tier). A probe is one local GET on the admin port.
const PROBE_PERIOD_SECONDS: i32 = 1;

/// Operator-wide settings that shape Backend pods.
#[derive(Clone, Debug)]
pub struct BackendDefaults {
    /// Default model-server image.
    pub sidecar_image: String,
    /// `appProtocol` of the Service port (REST and gRPC on one port); none by default.
    pub service_app_protocol: Option<String>,
}

/// Labels on every object of a Backend.
pub fn labels(backend: &Backend) -> BTreeMap<String, String> {
    let name = backend.name_any();
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "serval-backend".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), name.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            MANAGED_BY.to_owned(),
        ),
        (BACKEND_LABEL.to_owned(), name),
    ])
}

fn selector(backend: &Backend) -> BTreeMap<String, String> {
    BTreeMap::from([(BACKEND_LABEL.to_owned(), backend.name_any())])
}

fn meta(backend: &Backend) -> ObjectMeta {
    ObjectMeta {
        name: Some(backend.name_any()),
        namespace: backend.namespace(),
        labels: Some(labels(backend)),
        owner_references: backend.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// Where the model server finds the model, plus a volume for `pvc://` models.
fn model_location(uri: &str) -> (String, Option<(Volume, VolumeMount)>) {
    let Some(rest) = uri.strip_prefix("pvc://") else {
        return (uri.to_owned(), None);
    };
    let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mount = format!("{PVC_MOUNT_ROOT}/{claim}");
    let volume = Volume {
        name: "model".to_owned(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.to_owned(),
            read_only: Some(true),
        }),
        ..Volume::default()
    };
    let volume_mount = VolumeMount {
        name: "model".to_owned(),
        mount_path: mount.clone(),
        read_only: Some(true),
        ..VolumeMount::default()
    };
    (format!("{mount}/{path}"), Some((volume, volume_mount)))
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    // The admin port: probes pass while traffic connections are at the bound.
    http_probe_on("admin", path, period, failures)
}

fn http_probe_on(port: &str, path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String(port.to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}

/// Replicas the Backend's Deployment should have: `spec.replicas`, or with `spec.autoscaling`
/// the autoscaler's last decision (kept in `status.autoscaling`, so it survives an operator
/// restart), or before any decision the count autoscaling starts from.
pub fn desired_replicas(backend: &Backend) -> i32 {
    if backend.spec.autoscaling.is_none() {
        return backend.spec.replicas;
    }
    match backend.status.as_ref().and_then(|s| s.autoscaling.as_ref()) {
        Some(a) => a.desired_replicas,
        None => i32::try_from(initial_replicas(backend)).unwrap_or(i32::MAX),
    }
}

/// Where autoscaling starts for a Backend the autoscaler has not decided for yet: the replicas
/// it was last reconciled to (autoscaling added to a running Backend), else `spec.replicas`,
/// within the bounds, and at least one so the model is loaded and checked once.
pub fn initial_replicas(backend: &Backend) -> u32 {
    let spec = backend.spec.autoscaling.clone().unwrap_or_default();
    let running = backend
        .status
        .as_ref()
        .map_or(backend.spec.replicas, |s| s.replicas);
    serval_autoscale::Scaler::new(
        serval_autoscale::Policy::from(&spec),
        u32::try_from(running).unwrap_or(0),
    )
    .replicas()
}

/// Whether the router should hold this Backend's requests rather than refuse them: it may
/// scale to zero (`autoscaling.minReplicas: 0`) and no replica serves now, so the autoscaler
/// starts one when requests are held.
pub fn holds_at_zero(backend: &Backend) -> bool {
    backend
        .spec
        .autoscaling
        .as_ref()
        .is_some_and(|a| a.min_replicas == 0)
        && backend
            .status
            .as_ref()
            .is_none_or(|s| s.ready_replicas == 0)
}

/// The Backend's Deployment: the model-server sidecar, and the user container when given.
pub fn deployment_for(backend: &Backend, defaults: &BackendDefaults) -> Deployment {
    let spec = &backend.spec;
    let name = backend.name_any();
    let (model_path, pvc) = model_location(&spec.model.uri);
    let overrides = spec.sidecar.clone().unwrap_or_default();

    let mut volumes = vec![Volume {
        // The root filesystem is read-only; downloads and scratch go here.
        name: "tmp".to_owned(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "tmp".to_owned(),
        mount_path: "/tmp".to_owned(),
        ..VolumeMount::default()
    }];
    if let Some((v, m)) = pvc {
        volumes.push(v);
        mounts.push(m);
    }

    let sidecar = Container {
        name: SIDECAR_CONTAINER.to_owned(),
        image: Some(
            overrides
                .image
                .unwrap_or_else(|| defaults.sidecar_image.clone()),
        ),
        image_pull_policy: overrides.image_pull_policy,
        args: Some(
            sidecar_args(&name, spec, &model_path, "0.0.0.0", SIDECAR_PORT)
                .into_iter()
                .chain(serval_api::sidecar::fault_args(
                    backend.metadata.annotations.as_ref(),
                ))
                .chain([flags::ADMIN_PORT.to_owned(), SIDECAR_ADMIN_PORT.to_string()])
                .collect(),
        ),
        env: Some(vec![EnvVar {
            name: "TMPDIR".to_owned(),
            value: Some("/tmp".to_owned()),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            tcp_port("http", i32::from(SIDECAR_PORT)),
            tcp_port("admin", i32::from(SIDECAR_ADMIN_PORT)),
        ]),
        // Ready means loaded, warmed up and batching; the startup probe covers the download.
        startup_probe: Some(http_probe(
            "/v2/health/live",
            PROBE_PERIOD_SECONDS,
            STARTUP_FAILURE_THRESHOLD,
        )),
        readiness_probe: Some(http_probe("/v2/health/ready", PROBE_PERIOD_SECONDS, 3)),
        liveness_probe: Some(http_probe("/v2/health/live", 10, 3)),
        resources: spec.resources.clone(),
        security_context: Some(restricted_security_context()),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let mut containers = vec![sidecar];
    if let Some(user) = &spec.container {
        containers.push(Container {
            name: USER_CONTAINER.to_owned(),
            image: Some(user.image.clone()),
            command: (!user.command.is_empty()).then(|| user.command.clone()),
            args: (!user.args.is_empty()).then(|| user.args.clone()),
            env: Some(
                user.env
                    .iter()
                    .map(|e| EnvVar {
                        name: e.name.clone(),
                        value: Some(e.value.clone()),
                        ..EnvVar::default()
                    })
                    .chain([
                        EnvVar {
                            name: "SERVAL_MODEL_SERVER".to_owned(),
                            value: Some(format!("http://127.0.0.1:{SIDECAR_PORT}")),
                            ..EnvVar::default()
                        },
                        // The name the model server serves the model under.
                        EnvVar {
                            name: "SERVAL_MODEL_NAME".to_owned(),
                            value: Some(name.clone()),
                            ..EnvVar::default()
                        },
                    ])
                    .collect(),
            ),
            ports: Some(vec![tcp_port("user-http", user.port)]),
            // The Service targets this container: the pod takes traffic only once it answers.
            readiness_probe: Some(http_probe_on(
                "user-http",
                user.readiness_path
                    .as_deref()
                    .unwrap_or(serval_api::backend::DEFAULT_USER_READINESS_PATH),
                PROBE_PERIOD_SECONDS,
                3,
            )),
            resources: user.resources.clone(),
            security_context: Some(restricted_security_context()),
            volume_mounts: Some(vec![VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..VolumeMount::default()
            }]),
            ..Container::default()
        });
    }

    Deployment {
        metadata: meta(backend),
        spec: Some(DeploymentSpec {
            replicas: Some(desired_replicas(backend)),
            selector: LabelSelector {
                match_labels: Some(selector(backend)),
                ..LabelSelector::default()
            },
            // Surge first so a rollout never drops below the ready replica count.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(backend)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers,
                    volumes: Some(volumes),
                    security_context: Some(restricted_pod_security_context()),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(30),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The Backend's Service; it targets the user container when there is one.
pub fn service_for(backend: &Backend, defaults: &BackendDefaults) -> Service {
    let target = if backend.spec.container.is_some() {
        "user-http"
    } else {
        "http"
    };
    Service {
        metadata: meta(backend),
        spec: Some(ServiceSpec {
            selector: Some(selector(backend)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: i32::from(SERVICE_PORT),
                target_port: Some(IntOrString::String(target.to_owned())),
                protocol: Some("TCP".to_owned()),
                app_protocol: defaults.service_app_protocol.clone(),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// A PodDisruptionBudget keeping all but one replica during voluntary disruptions, or `None`
/// when there is at most one replica (a PDB would then block node drains forever).
pub fn pdb_for(backend: &Backend) -> Option<PodDisruptionBudget> {
    (desired_replicas(backend) > 1).then(|| PodDisruptionBudget {
        metadata: meta(backend),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(backend)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

/// In-cluster URL of a Backend's Service.
pub fn backend_url(backend: &Backend) -> String {
    format!(
        "http://{}",
        backend_address(
            &backend.name_any(),
            &backend.namespace().unwrap_or_default()
        )
    )
}

/// `host:port` of a Backend's Service.
pub fn backend_address(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc:{SERVICE_PORT}")
}

/// Status from what the Deployment reports. `deployment` is `None` before it exists.
pub fn status_for(
    backend: &Backend,
    deployment: Option<&Deployment>,
    now: Timestamp,
) -> BackendStatus {
    let desired = desired_replicas(backend);
    let autoscaled = backend.spec.autoscaling.is_some();
    let generation = backend.meta().generation;
    let dstatus = deployment
        .and_then(|d| d.status.clone())
        .unwrap_or_default();
    // A Deployment that has not seen its latest spec reports stale counts.
    let dep_current =
        deployment.is_some_and(|d| dstatus.observed_generation >= d.metadata.generation);
    let ready = if dep_current {
        dstatus.ready_replicas.unwrap_or(0)
    } else {
        0
    };
    let updated = if dep_current {
        dstatus.updated_replicas.unwrap_or(0)
    } else {
        0
    };
    let total = dstatus.replicas.unwrap_or(0);
    let deadline_exceeded = dstatus.conditions.iter().flatten().any(|c| {
        c.type_ == "Progressing"
            && c.status == "False"
            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });

    let rolled_out = dep_current && updated >= desired && total <= desired && ready >= desired;
    let observed = if desired == 0 {
        vec![
            Observed::new(READY, false, reason::SCALED_TO_ZERO, "replicas is 0"),
            Observed::new(
                PROGRESSING,
                !rolled_out,
                if rolled_out {
                    reason::UP_TO_DATE
                } else {
                    reason::ROLLING_OUT
                },
                format!("{total} pods remain"),
            ),
            Observed::new(
                DEGRADED,
                false,
                reason::SCALED_TO_ZERO,
                "scaled to zero on purpose",
            ),
        ]
    } else {
        let ready_msg = format!("{ready}/{desired} replicas ready");
        // An autoscaled Backend serves as soon as one replica does: a scale-up (or a start from
        // zero) must not take it out of its Endpoints' routes while replicas load.
        let serves = ready >= desired || (autoscaled && ready > 0);
        vec![
            if serves {
                Observed::new(READY, true, reason::REPLICAS_READY, ready_msg.clone())
            } else {
                Observed::new(READY, false, reason::REPLICAS_NOT_READY, ready_msg.clone())
            },
            if rolled_out {
                Observed::new(PROGRESSING, false, reason::UP_TO_DATE, ready_msg.clone())
            } else {
                Observed::new(
                    PROGRESSING,
                    true,
                    reason::ROLLING_OUT,
                    format!("{updated}/{desired} replicas updated, {ready} ready"),
                )
            },
            if deadline_exceeded {
                Observed::new(
                    DEGRADED,
                    true,
                    reason::PROGRESS_DEADLINE_EXCEEDED,
                    "the rollout exceeded its progress deadline; check the pods' events and logs",
                )
            } else if ready > 0 && ready < desired && rolled_out {
                Observed::new(DEGRADED, true, reason::REPLICAS_NOT_READY, ready_msg)
            } else {
                Observed::new(DEGRADED, false, reason::REPLICAS_READY, "")
            },
        ]
    };
    let previous = backend
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    BackendStatus {
        observed_generation: generation,
        replicas: desired,
        ready_replicas: ready,
        replicas_summary: format!("{ready}/{desired}"),
        url: Some(backend_url(backend)),
        selector: Some(format!("{BACKEND_LABEL}={}", backend.name_any())),
        conditions: settle(previous, observed, generation, now),
        // The autoscaler's own field: carried over so a comparison with the stored status
        // holds, and never sent by the status apply (see `backend_controller`).
        autoscaling: backend.status.as_ref().and_then(|s| s.autoscaling.clone()),
    }
}

/// Whether a Backend's status says it serves. The generation is not compared: during a spec
/// change the old pods keep serving until the rollout replaces them.
pub fn is_ready(backend: &Backend) -> bool {
    backend.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == READY && c.status == "True")
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn backend(spec: serde_json::Value) -> Backend {
        let mut b = Backend::new(
            "digits-custom",
            serde_json::from_value(spec).expect("a valid spec"),
        );
        b.meta_mut().namespace = Some("models".to_owned());
        b
    }

    fn pod_of(b: &Backend) -> PodSpec {
        let defaults = BackendDefaults {
            sidecar_image: "serval-sidecar:0.1.0".to_owned(),
            service_app_protocol: None,
        };
        deployment_for(b, &defaults)
            .spec
            .and_then(|s| s.template.spec)
            .expect("a pod template")
    }

    fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
        pod.containers
            .iter()
            .find(|c| c.name == name)
            .expect("the container")
    }

    /// Found on a real node: the user container had no readiness probe (the pod took traffic
    /// before it listened) and no way to know the model's name.
    #[test]
    fn a_user_container_takes_the_traffic_once_it_answers_its_readiness_probe() {
        let b = backend(json!({
            "model": {"uri": "pvc://models/digits.onnx"},
            "replicas": 1,
            "container": {"image": "digits-transformer:0.1.0", "port": 8000},
        }));
        let pod = pod_of(&b);
        let user = container(&pod, USER_CONTAINER);
        let probe = user.readiness_probe.as_ref().expect("a readiness probe");
        let get = probe.http_get.as_ref().expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some("/v2/health/ready"));
        assert_eq!(get.port, IntOrString::String("user-http".to_owned()));
        let env: BTreeMap<_, _> = user
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(env["SERVAL_MODEL_NAME"], "digits-custom");
        assert_eq!(env["SERVAL_MODEL_SERVER"], "http://127.0.0.1:8080");
        let plain = BackendDefaults {
            sidecar_image: "s".to_owned(),
            service_app_protocol: None,
        };
        let service = service_for(&b, &plain).spec.expect("a spec");
        let port = &service.ports.expect("ports")[0];
        assert_eq!(
            port.target_port,
            Some(IntOrString::String("user-http".to_owned()))
        );
        assert_eq!(port.app_protocol, None);
        // Set by the operator's flag for a mesh or Gateway that must be told it is HTTP/2.
        let h2c = BackendDefaults {
            service_app_protocol: Some("kubernetes.io/h2c".to_owned()),
            ..plain
        };
        let port = &service_for(&b, &h2c)
            .spec
            .expect("a spec")
            .ports
            .expect("ports")[0];
        assert_eq!(port.app_protocol.as_deref(), Some("kubernetes.io/h2c"));

        let b = backend(json!({
            "model": {"uri": "pvc://models/digits.onnx"},
            "replicas": 1,
            "container": {"image": "t:1", "port": 8000, "readinessPath": "/healthz"},
        }));
        let pod = pod_of(&b);
        let probe = container(&pod, USER_CONTAINER).readiness_probe.clone();
        assert_eq!(
            probe
                .and_then(|p| p.http_get)
                .and_then(|g| g.path)
                .as_deref(),
            Some("/healthz")
        );
    }

    /// A pod is Ready at the first readiness probe after its model is warm: the period adds
    /// to every start, which requests held at zero replicas wait for.
    #[test]
    fn probes_run_every_second_with_ten_minutes_to_load() {
        let pod = pod_of(&backend(
            json!({"model": {"uri": "pvc://models/digits.onnx"}}),
        ));
        let sidecar = container(&pod, SIDECAR_CONTAINER);
        let startup = sidecar.startup_probe.as_ref().expect("a startup probe");
        let ready = sidecar.readiness_probe.as_ref().expect("a readiness probe");
        assert_eq!(startup.period_seconds, Some(1));
        assert_eq!(ready.period_seconds, Some(1));
        assert_eq!(
            startup.failure_threshold.unwrap_or(0) * startup.period_seconds.unwrap_or(0),
            600
        );
    }
}
