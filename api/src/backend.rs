//! The `Backend` resource: one versioned ONNX model deployment.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Port the model-server sidecar listens on inside a Backend pod.
pub const SIDECAR_PORT: u16 = 8080;
/// Port of the sidecar's admin listener (health and metrics, outside the traffic port's
/// connection bound): the operator's probes and the chart's PodMonitor use it.
pub const SIDECAR_ADMIN_PORT: u16 = 8081;
/// Default number of replicas: one is enough to try a model; raise it for availability.
pub const DEFAULT_REPLICAS: i32 = 1;
/// Default rows per batch: large enough for MLPs and short transformers to benefit, and the
/// sidecar's start-up calibration drops sizes that do not raise throughput.
pub const DEFAULT_MAX_BATCH_SIZE: u32 = 32;
/// Default batching latency budget: 2 ms is small against network latency.
pub const DEFAULT_MAX_DELAY_MICROS: u32 = 2_000;
/// Default queue bound: 32 full batches; beyond that a caller is better served by a 429 now.
pub const DEFAULT_MAX_QUEUE: u32 = 1_024;
/// Default longest expected queue wait a request is admitted with: a tenth of a second is below
/// what a person notices in an interactive call, and still holds a few batches of a CNN-sized
/// model per worker, so workers never idle between arrivals while the excess gets 429 at once.
pub const DEFAULT_MAX_QUEUE_DELAY_MILLIS: u32 = 100;

/// Specification of a Backend: which model to serve, how many replicas, how to batch.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serval.dev",
    version = "v1alpha1",
    kind = "Backend",
    namespaced,
    status = "BackendStatus",
    // `kubectl scale` and HorizontalPodAutoscalers act on spec.replicas through this.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    shortname = "sbe",
    category = "serval",
    cel,
    doc = "A versioned ONNX model deployment served by the Serval model server. Each Backend scales and rolls out on its own; Endpoints route traffic to Backends.",
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 63").message("a Backend's name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter, at most 63 characters) because it names a Service"),
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"string","jsonPath":".status.replicasSummary"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.uri","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BackendSpec {
    /// The ONNX model to serve.
    pub model: ModelSource,

    /// Number of model-server pods. 0 stops serving but keeps the Backend.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// How requests are queued and batched in the model server.
    #[serde(default)]
    pub batching: Batching,

    /// Built-in request pre-processing, e.g. decoding an image into the model's input tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<Preprocess>,

    /// Built-in response post-processing, e.g. softmax, top-k and labels over logits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postprocess: Option<Postprocess>,

    /// An optional user container that runs beside the model server in each pod, for custom
    /// pre/post logic. It receives the traffic and calls the model server on localhost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<UserContainer>,

    /// Compute resources of the model-server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Overrides for the model-server sidecar container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarOverride>,

    /// Scale on load: the replicas follow the requests in flight; when set it decides the
    /// replicas and `replicas` is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}

/// Where the model comes from and how it is verified.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!(self.uri.startsWith('http://') || self.uri.startsWith('https://')) || has(self.sha256)").message("model.sha256 is required when the model is downloaded over http(s)")
)]
pub struct ModelSource {
    /// Location of the ONNX file: `https://…`, `http://…`, `file:///path/in/the/pod` or
    /// `pvc://<claim>/<path>` (the claim is mounted read-only).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^(https?|file|pvc)://')").message("model.uri must start with http://, https://, file:// or pvc://"))]
    #[x_kube(validation = Rule::new("!self.startsWith('pvc://') || self.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.+')").message("a pvc:// model.uri must look like pvc://<claim-name>/<path>"))]
    pub uri: String,

    /// Expected SHA-256 of the ONNX file as 64 hex characters; a mismatch is never served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9a-fA-F]{64}$')").message("model.sha256 must be 64 hexadecimal characters"))]
    pub sha256: Option<String>,
}

/// Default least replicas under autoscaling: one, so the first request never waits for a model
/// to load; 0 (scale to zero) is opt-in.
pub const DEFAULT_MIN_REPLICAS: i32 = 1;
/// Default most replicas under autoscaling: a bound on what one load spike can cost.
pub const DEFAULT_MAX_REPLICAS: i32 = 10;
/// Default requests in flight per replica the autoscaler aims at: a model server with one
/// worker per core keeps its cores busy with small batches at this concurrency, and more per
/// replica only queues.
pub const DEFAULT_TARGET_INFLIGHT: u32 = 8;
/// Default time the load must stay lower before replicas are removed: a minute rides out the
/// lulls between bursts, since a removed replica costs a model load to bring back.
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: u32 = 60;
/// Default time without any request before the last replica is removed (with
/// `minReplicas: 0`): five minutes, as the next request then waits for a model load.
pub const DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS: u32 = 300;

/// Scaling a Backend on the requests in flight (a KPA-like decision: a stable window, a short
/// panic window for surges, a delay before scaling down, and optional scale to zero).
///
/// The decision crate (`serval-autoscale`) reads it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must be at most autoscaling.maxReplicas")
)]
pub struct Autoscaling {
    /// Least replicas. 0 lets the Backend scale to zero after `scaleToZeroAfterSeconds`
    /// without requests; the router then holds the next requests while a replica starts.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub min_replicas: i32,

    /// Most replicas.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,

    /// Requests in flight per replica to aim at: replicas = ceil(observed ÷ target).
    #[serde(default = "default_target_inflight")]
    #[schemars(range(min = 1, max = 10_000))]
    pub target_inflight: u32,

    /// Seconds the load must stay lower before replicas are removed.
    #[serde(default = "default_scale_down_delay_seconds")]
    #[schemars(range(max = 3_600))]
    pub scale_down_delay_seconds: u32,

    /// Seconds without any request before the last replica is removed (only with
    /// `minReplicas: 0`).
    #[serde(default = "default_scale_to_zero_after_seconds")]
    #[schemars(range(min = 1, max = 86_400))]
    pub scale_to_zero_after_seconds: u32,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            min_replicas: DEFAULT_MIN_REPLICAS,
            max_replicas: DEFAULT_MAX_REPLICAS,
            target_inflight: DEFAULT_TARGET_INFLIGHT,
            scale_down_delay_seconds: DEFAULT_SCALE_DOWN_DELAY_SECONDS,
            scale_to_zero_after_seconds: DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS,
        }
    }
}

fn default_min_replicas() -> i32 {
    DEFAULT_MIN_REPLICAS
}
fn default_max_replicas() -> i32 {
    DEFAULT_MAX_REPLICAS
}
fn default_target_inflight() -> u32 {
    DEFAULT_TARGET_INFLIGHT
}
fn default_scale_down_delay_seconds() -> u32 {
    DEFAULT_SCALE_DOWN_DELAY_SECONDS
}
fn default_scale_to_zero_after_seconds() -> u32 {
    DEFAULT_SCALE_TO_ZERO_AFTER_SECONDS
}

/// Queueing and adaptive batching settings of the model server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.maxQueue >= self.maxBatchSize").message("batching.maxQueue must be at least batching.maxBatchSize")
)]
pub struct Batching {
    /// Most rows in one inference call. Larger requests are split. 1 disables batching.
    #[serde(default = "default_max_batch_size")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: u32,

    /// Latency budget of batching, in microseconds: at start-up the model server keeps a batch
    /// size only if it raises throughput and one run of it takes at most this much longer than
    /// a single row. Requests never wait on a timer: an idle worker takes what is queued at once,
    /// and batches grow only while every worker is busy.
    #[serde(default = "default_max_delay_micros")]
    #[schemars(range(max = 1_000_000))]
    pub max_delay_micros: u32,

    /// Most rows waiting in the queue; beyond it requests are rejected at once with 429.
    #[serde(default = "default_max_queue")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_queue: u32,

    /// Longest expected queue wait, in milliseconds, a request is admitted with. The model
    /// server predicts each request's wait from the queue ahead of it and the run times it
    /// measured; a request that would wait longer, or would miss its `serval-deadline-ms`, is
    /// answered 429 with Retry-After at once, so under overload the admitted requests keep a
    /// bounded latency instead of all waiting out a long queue.
    #[serde(default = "default_max_queue_delay_millis")]
    #[schemars(range(min = 1, max = 600_000))]
    pub max_queue_delay_millis: u32,

    /// Inference workers per pod. Defaults to one per CPU core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 256))]
    pub workers: Option<u32>,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_delay_micros: DEFAULT_MAX_DELAY_MICROS,
            max_queue: DEFAULT_MAX_QUEUE,
            max_queue_delay_millis: DEFAULT_MAX_QUEUE_DELAY_MILLIS,
            workers: None,
        }
    }
}

fn default_max_batch_size() -> u32 {
    DEFAULT_MAX_BATCH_SIZE
}
fn default_max_delay_micros() -> u32 {
    DEFAULT_MAX_DELAY_MICROS
}
fn default_max_queue() -> u32 {
    DEFAULT_MAX_QUEUE
}
fn default_max_queue_delay_millis() -> u32 {
    DEFAULT_MAX_QUEUE_DELAY_MILLIS
}

/// Built-in pre-processing of requests.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Preprocess {
    /// Accept PNG or JPEG bytes and turn them into the model's input tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImagePreprocess>,
}

/// Color mode an image is converted to before it becomes a tensor.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum ColorMode {
    /// One channel.
    #[default]
    Grayscale,
    /// Three channels, red-green-blue.
    Rgb,
}

/// Memory layout of the image tensor.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum TensorLayout {
    /// `[1, C, H, W]`, as most CNN exporters expect.
    #[default]
    Nchw,
    /// `[1, H, W, C]`.
    Nhwc,
    /// `[1, C*H*W]`, for models that take a flat feature vector (e.g. the 8x8 digits MLP).
    Flat,
}

/// Image decoding, resizing and normalisation: `value = (pixel * scale - mean) / std`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.mean) || size(self.mean) == (self.color == 'Rgb' ? 3 : 1)").message("preprocess.image.mean needs one value per channel (1 for Grayscale, 3 for Rgb)"),
    validation = Rule::new("!has(self.std) || size(self.std) == (self.color == 'Rgb' ? 3 : 1)").message("preprocess.image.std needs one value per channel (1 for Grayscale, 3 for Rgb)")
)]
pub struct ImagePreprocess {
    /// Width the image is resized to, in pixels.
    #[schemars(range(min = 1, max = 4096))]
    pub width: u32,
    /// Height the image is resized to, in pixels.
    #[schemars(range(min = 1, max = 4096))]
    pub height: u32,
    /// Color mode: `Grayscale` (1 channel) or `Rgb` (3 channels).
    #[serde(default)]
    pub color: ColorMode,
    /// Tensor layout: `Nchw`, `Nhwc` or `Flat`.
    #[serde(default)]
    pub layout: TensorLayout,
    /// Invert pixel values (255 - v) before scaling, for models trained on light-on-dark data.
    #[serde(default)]
    pub invert: bool,
    /// Factor applied to each 0-255 pixel value. Default maps to 0-1.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Per-channel mean subtracted after scaling. Empty means 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    pub mean: Vec<f64>,
    /// Per-channel standard deviation divided by after the mean. Empty means 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 3))]
    #[x_kube(validation = Rule::new("self.all(s, s > 0.0)").message("preprocess.image.std values must be positive"))]
    pub std: Vec<f64>,
}

fn default_scale() -> f64 {
    1.0 / 255.0
}

/// Built-in post-processing of a classifier's output.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.topK) || !has(self.labels) || self.topK <= size(self.labels)").message("postprocess.topK cannot exceed the number of labels")
)]
pub struct Postprocess {
    /// Name of the output tensor to post-process. Defaults to the model's first output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub output: Option<String>,
    /// Apply softmax to the scores first (for models that output logits).
    #[serde(default)]
    pub softmax: bool,
    /// Return the k best classes. Defaults to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub top_k: Option<u32>,
    /// Class names, index i naming class i.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096), inner(length(max = 128)))]
    pub labels: Vec<String>,
}

/// A user container for custom logic, running next to the model server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UserContainer {
    /// Container image.
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Port the container serves HTTP on; the Backend's Service targets it.
    #[schemars(range(min = 1, max = 65535))]
    #[x_kube(validation = Rule::new("self != 8080").message("container.port 8080 is reserved for the model-server sidecar"))]
    pub port: i32,
    /// Entrypoint override.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 4096)))]
    pub command: Vec<String>,
    /// Arguments to the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub env: Vec<EnvVar>,
    /// Compute resources of the user container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Path of the container's readiness probe (HTTP GET on `port`): the pod, and so the
    /// Backend, is Ready only when both the model server and this answer 2xx. Default
    /// `/v2/health/ready`, the Open Inference Protocol's, which the router also forwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub readiness_path: Option<String>,
}

/// Readiness path of a user container without `readinessPath`.
pub const DEFAULT_USER_READINESS_PATH: &str = "/v2/health/ready";

/// A plain environment variable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EnvVar {
    /// Variable name.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Variable value.
    #[serde(default)]
    #[schemars(length(max = 8192))]
    pub value: String,
}

/// Overrides for the model-server sidecar container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SidecarOverride {
    /// Model-server image. Defaults to the operator's configured sidecar image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// Image pull policy: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("self in ['Always', 'IfNotPresent', 'Never']").message("sidecar.imagePullPolicy must be Always, IfNotPresent or Never"))]
    pub image_pull_policy: Option<String>,
}

/// Observed state of a Backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Desired replicas.
    #[serde(default)]
    pub replicas: i32,
    /// Replicas whose model is loaded, warmed up and ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// `ready/desired`, for `kubectl get`.
    #[serde(default)]
    pub replicas_summary: String,
    /// In-cluster URL of the Backend's Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Label selector of the Backend's pods, as the scale subresource reports it (a
    /// HorizontalPodAutoscaler reads the pods' metrics through it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The autoscaler's last decision, when `spec.autoscaling` is set. Written by the
    /// operator's autoscaler (its own field manager) when the decision changes, not per sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// What the autoscaler decided for a Backend and why.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// Replicas the autoscaler set (the Deployment's replicas; `spec.replicas` is ignored).
    pub desired_replicas: i32,
    /// Average requests in flight over the stable window at the last decision, summed over
    /// the replicas and the requests the router holds; absent without load data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_inflight: Option<f64>,
    /// Why: a CamelCase reason (`StableAverage`, `PanicSurge`, `ScaleDownDelayed`,
    /// `ScaleToZero`, `ColdStart`, `NoData`, ...).
    pub last_decision: String,
    /// The reason in a sentence, and that `spec.replicas` is ignored.
    #[serde(default)]
    pub message: String,
    /// When the replica count last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}
