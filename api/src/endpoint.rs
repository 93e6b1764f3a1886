//! The `Endpoint` resource: a route and a traffic policy over Backends.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Default per-request timeout: generous for CNNs on CPU, short enough to fail a hung upstream.
pub const DEFAULT_TIMEOUT_MILLIS: u32 = 30_000;
/// Default retries: one retry hides a single pod restart without doubling load in an outage.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// Default retry budget: retries may add at most 20% to the request rate.
pub const DEFAULT_RETRY_BUDGET_PERCENT: u32 = 20;
/// Most backends one Endpoint may name in its traffic split.
pub const MAX_TRAFFIC_TARGETS: usize = 16;

/// Specification of an Endpoint: where it is called and how its traffic is split.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serval.dev",
    version = "v1alpha1",
    kind = "Endpoint",
    namespaced,
    status = "EndpointStatus",
    shortname = "sep",
    category = "serval",
    cel,
    doc = "A route that clients call and a traffic policy over Backends: weighted split, mirror, header match and sticky sessions.",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Route","type":"string","jsonPath":".spec.route.pathPrefix"}"#,
    printcolumn = r#"{"name":"Traffic","type":"string","jsonPath":".status.trafficSummary"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.mirror) || !has(self.traffic) || !self.traffic.exists(t, t.backend == self.mirror.backend && t.weight > 0)").message("mirror.backend already receives primary traffic (weight > 0); mirroring it would send it duplicate requests"),
    validation = Rule::new("!has(self.rollout) || !has(self.traffic) || !self.traffic.exists(t, t.backend == self.rollout.canary)").message("rollout.canary must not be in traffic: traffic lists the stable Backends, and the rollout gives the canary its share"),
    validation = Rule::new("!has(self.rollout) || !has(self.mirror)").message("rollout and mirror are exclusive: a rollout's Shadow step mirrors the traffic to its canary"),
    validation = Rule::new("[has(self.traffic) && size(self.traffic) > 0, has(self.cascade), has(self.ensemble), has(self.sequence)].filter(x, x).size() == 1").message("an Endpoint has exactly one of traffic, cascade, ensemble and sequence"),
    validation = Rule::new("!(has(self.cascade) || has(self.ensemble) || has(self.sequence)) || !(has(self.mirror) || has(self.rollout) || has(self.match) || has(self.sticky))").message("a cascade, an ensemble or a sequence routes every request through its Backends: mirror, rollout, match and sticky apply to traffic only")
)]
pub struct EndpointSpec {
    /// Where clients call this Endpoint.
    pub route: Route,

    /// Weighted split of requests over Backends. Weights are relative (0-100); a Backend with
    /// weight 0 receives no primary traffic. Required unless `cascade`, `ensemble` or
    /// `sequence` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = Rule::new("size(self) == 0 || self.exists(t, t.weight > 0)").message("traffic weights must sum to more than 0"))]
    #[x_kube(validation = Rule::new("self.all(a, self.filter(b, b.backend == a.backend).size() == 1)").message("each backend may appear only once in traffic"))]
    pub traffic: Vec<TrafficTarget>,

    /// Copy a share of requests to a shadow Backend and compare its answers with the primary's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,

    /// Header rules, evaluated in order before the weighted split.
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub matches: Vec<MatchRule>,

    /// Pin each caller to one Backend by hashing a request header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,

    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_millis")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub timeout_millis: u32,

    /// Retries on connection failure and 503.
    #[serde(default)]
    pub retries: Retries,

    /// Roll a canary Backend out step by step, judged on live metrics: promoted when every
    /// step passes its gates, rolled back to `traffic` after `failureLimit` failed intervals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,

    /// Answer from a fast Backend first and send only the rows it is unsure of to the next
    /// stage: instead of `traffic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<Cascade>,

    /// Send every request to several Backends at once and reduce their answers row by row:
    /// instead of `traffic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<Ensemble>,

    /// Send each request through Backends in turn, each step's outputs the next one's inputs:
    /// instead of `traffic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<Sequence>,
}

impl EndpointSpec {
    /// Every Backend the Endpoint names, in any role (traffic, mirror, rollout canary, match
    /// rules, cascade stages, ensemble members, sequence steps), possibly repeated: what its
    /// routing depends on.
    pub fn named_backends(&self) -> impl Iterator<Item = &str> {
        self.traffic
            .iter()
            .map(|t| t.backend.as_str())
            .chain(self.mirror.iter().map(|m| m.backend.as_str()))
            .chain(self.rollout.iter().map(|r| r.canary.as_str()))
            .chain(self.matches.iter().map(|m| m.backend.as_str()))
            .chain(
                self.ensemble
                    .iter()
                    .flat_map(|e| e.backends.iter().map(String::as_str)),
            )
            .chain(self.hops().filter_map(|(_, h)| match h {
                Hop::Backend(b) => Some(b),
                Hop::Endpoint(_) => None,
            }))
    }

    /// Every other Endpoint this one sends requests to (cascade stages and sequence steps
    /// naming an `endpoint`), possibly repeated.
    pub fn named_endpoints(&self) -> impl Iterator<Item = &str> {
        self.hops().filter_map(|(_, h)| match h {
            Hop::Endpoint(e) => Some(e),
            Hop::Backend(_) => None,
        })
    }

    /// The cascade's stages and the sequence's steps, each with its field path.
    pub fn hops(&self) -> impl Iterator<Item = (String, Hop<&str>)> {
        let stages = self.cascade.iter().flat_map(|c| {
            c.stages
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((format!("spec.cascade.stages[{i}]"), s.hop()?)))
        });
        let steps = self.sequence.iter().flat_map(|q| {
            q.steps
                .iter()
                .enumerate()
                .filter_map(|(i, s)| Some((format!("spec.sequence.steps[{i}]"), s.hop()?)))
        });
        stages.chain(steps)
    }
}

/// What a cascade stage or a sequence step names: a Backend, or another Endpoint of the
/// namespace (which applies its own policy: a split, a rollout, a composition).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub enum Hop<S> {
    /// A Backend.
    Backend(S),
    /// Another Endpoint.
    Endpoint(S),
}

impl<S: AsRef<str>> Hop<S> {
    /// The name, Backend's or Endpoint's.
    pub fn name(&self) -> &str {
        match self {
            Self::Backend(s) | Self::Endpoint(s) => s.as_ref(),
        }
    }

    /// An owned copy.
    pub fn to_owned(&self) -> Hop<String> {
        match self {
            Self::Backend(s) => Hop::Backend(s.as_ref().to_owned()),
            Self::Endpoint(s) => Hop::Endpoint(s.as_ref().to_owned()),
        }
    }
}

impl<S: AsRef<str>> std::fmt::Display for Hop<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Backend(s) => write!(f, "Backend {:?}", s.as_ref()),
            Self::Endpoint(s) => write!(f, "Endpoint {:?}", s.as_ref()),
        }
    }
}

fn hop<'a>(backend: &'a Option<String>, endpoint: &'a Option<String>) -> Option<Hop<&'a str>> {
    match (backend, endpoint) {
        (Some(b), None) => Some(Hop::Backend(b)),
        (None, Some(e)) => Some(Hop::Endpoint(e)),
        // Both or neither: refused by the schema's rule.
        _ => None,
    }
}

/// A cascade: every request goes to the first stage; each row whose confidence (the largest
/// value of `output` in that row; the `score` of a post-processed image or V1 answer) is
/// below the stage's `minConfidence` goes on to the next stage; the last stage answers
/// whatever reaches it. Rows of a multi-row request are escalated one by one and the answer
/// keeps the request's row order.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Cascade {
    /// The output whose per-row maximum is the confidence, e.g. `probabilities`.
    #[schemars(length(min = 1, max = 256))]
    pub output: String,
    /// The stages, cheapest first: 2 to 4.
    #[schemars(length(min = 2, max = 4))]
    #[x_kube(validation = Rule::new("self.all(a, !has(a.backend) || self.filter(b, has(b.backend) && b.backend == a.backend).size() == 1)").message("each backend may appear only once in a cascade"))]
    #[x_kube(validation = Rule::new("self.all(a, !has(a.endpoint) || self.filter(b, has(b.endpoint) && b.endpoint == a.endpoint).size() == 1)").message("each endpoint may appear only once in a cascade"))]
    #[x_kube(validation = Rule::new("self.all(s, s == self[size(self) - 1] || has(s.minConfidence))").message("every cascade stage but the last needs minConfidence"))]
    pub stages: Vec<CascadeStage>,
}

/// One stage of a cascade: a Backend or another Endpoint.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backend) != has(self.endpoint)").message("a cascade stage names either a backend or an endpoint"))]
pub struct CascadeStage {
    /// The Backend of this stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub backend: Option<String>,
    /// Another Endpoint of the namespace as this stage, with its own traffic policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub endpoint: Option<String>,
    /// Rows answered with a lower confidence go to the next stage, 0-1. Required on every
    /// stage but the last, which answers whatever reaches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_confidence: Option<f64>,
}

impl CascadeStage {
    /// What the stage names.
    pub fn hop(&self) -> Option<Hop<&str>> {
        hop(&self.backend, &self.endpoint)
    }
}

/// Most members of an ensemble: each request costs every member a model run.
pub const MAX_ENSEMBLE_BACKENDS: usize = 8;

/// An ensemble: every request goes to all `backends` at once; their `output` tensors are
/// reduced row by row into one answer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.minResponses) || self.minResponses <= size(self.backends)").message("ensemble.minResponses cannot exceed the number of backends"))]
pub struct Ensemble {
    /// The Backends, 2 to 8; ties of a vote go to the one listed first.
    #[schemars(length(min = 2, max = 8), inner(length(min = 1, max = 63)))]
    #[x_kube(validation = Rule::new("self.all(a, self.filter(b, b == a).size() == 1)").message("each backend may appear only once in an ensemble"))]
    pub backends: Vec<String>,
    /// The output reduced, e.g. `probabilities`: the same shape from every member.
    #[schemars(length(min = 1, max = 256))]
    pub output: String,
    /// `Mean` (average of the members' rows), `Max` (largest value per class) or `Vote`
    /// (majority of the members' argmax; the answer's row is the share of votes per class).
    pub reduce: Reduce,
    /// Answers needed to reduce; a member that fails or misses the deadline is left out and
    /// counted. Default: all members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 8))]
    pub min_responses: Option<u32>,
}

/// How an ensemble reduces its members' rows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum Reduce {
    /// The average of the members' rows, value by value.
    Mean,
    /// The majority of the members' argmax, ties to the member listed first.
    Vote,
    /// The largest of the members' values, value by value.
    Max,
}

/// A sequence: each step's outputs are the next step's inputs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sequence {
    /// The steps in order, 2 to 8. The first takes the client's request as it is (an image
    /// goes through its Backend's preprocess); the last answers the client (its postprocess
    /// included).
    #[schemars(length(min = 2, max = 8))]
    #[x_kube(validation = Rule::new("!has(self[0].inputs) || size(self[0].inputs) == 0").message("the first sequence step takes the client's request: it has no inputs mapping"))]
    pub steps: Vec<SequenceStep>,
}

/// One step of a sequence: a Backend or another Endpoint, and where its inputs come from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.backend) != has(self.endpoint)").message("a sequence step names either a backend or an endpoint"))]
pub struct SequenceStep {
    /// The Backend of this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub backend: Option<String>,
    /// Another Endpoint of the namespace as this step, with its own traffic policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub endpoint: Option<String>,
    /// This step's inputs by name, each from an output of the previous step
    /// (`{input: output}`). Unset: every output of the previous step, under its own name.
    /// Not allowed on the first step.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(length(max = 16))]
    pub inputs: std::collections::BTreeMap<String, String>,
}

impl SequenceStep {
    /// What the step names.
    pub fn hop(&self) -> Option<Hop<&str>> {
        hop(&self.backend, &self.endpoint)
    }
}

/// Default length of a judged interval: a minute of traffic.
pub const DEFAULT_ROLLOUT_INTERVAL_SECONDS: u32 = 60;
/// Default canary requests an interval needs for a verdict: enough that one error in a hundred
/// is a measured 1 %, not noise.
pub const DEFAULT_ROLLOUT_MIN_REQUESTS: u32 = 100;
/// Default failed intervals before rolling back: one bad minute may be a blip, two are not.
pub const DEFAULT_ROLLOUT_FAILURE_LIMIT: u32 = 2;
/// Default largest canary error rate (5xx): 1 %.
pub const DEFAULT_MAX_ERROR_RATE: f64 = 0.01;
/// Default largest canary p99 over the stable Backends' p99 in the same interval.
pub const DEFAULT_MAX_LATENCY_RATIO: f64 = 1.5;
/// Default least agreement of a shadowed canary with the stable answers: 95 % of rows.
pub const DEFAULT_MIN_AGREEMENT: f64 = 0.95;

/// A progressive rollout of a canary Backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rollout {
    /// The Backend rolled out. `traffic` lists the stable Backends; they share what the canary
    /// does not get, by their weights.
    #[schemars(length(min = 1, max = 63))]
    pub canary: String,
    /// Steps in order: `Shadow` (the canary gets a mirror of the traffic and is judged on
    /// agreement) and canary weights in percent (judged on error rate and p99 latency against
    /// the stable Backends), e.g. `[Shadow, 5, 25, 50, 100]`.
    #[serde(default = "default_steps")]
    #[schemars(schema_with = "steps_schema")]
    #[x_kube(validation = Rule::new("self.all(s, string(s) == 'Shadow' || (string(s).matches('^[0-9]{1,3}$') && int(string(s)) >= 1 && int(string(s)) <= 100))").message("rollout.steps are Shadow or a canary weight from 1 to 100"))]
    pub steps: Vec<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    /// Length of one judged interval, seconds.
    #[serde(default = "default_interval_seconds")]
    #[schemars(range(min = 1, max = 3_600))]
    pub interval_seconds: u32,
    /// Canary requests (mirrored ones in `Shadow`) an interval needs for a verdict; fewer is
    /// `Waiting`, never a pass or a failure.
    #[serde(default = "default_min_requests")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_requests: u32,
    /// Failed intervals over the rollout that roll it back.
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_limit: u32,
    /// What an interval must stay within.
    #[serde(default)]
    pub gates: RolloutGates,
}

/// 1-16 items, each an int or a string of at most 6 characters: the bound keeps the CEL rule's
/// estimated cost within the API server's budget (an unbounded string was refused), and the
/// rule is one `kube-cel` evaluates too (it has no `type()`), so `serval local` checks it.
fn steps_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "maxItems": 16,
        "items": {
            "x-kubernetes-int-or-string": true,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "maxLength": 6
        }
    })
}

fn default_steps() -> Vec<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    vec![
        IntOrString::String("Shadow".to_owned()),
        IntOrString::Int(5),
        IntOrString::Int(25),
        IntOrString::Int(50),
        IntOrString::Int(100),
    ]
}
fn default_interval_seconds() -> u32 {
    DEFAULT_ROLLOUT_INTERVAL_SECONDS
}
fn default_min_requests() -> u32 {
    DEFAULT_ROLLOUT_MIN_REQUESTS
}
fn default_failure_limit() -> u32 {
    DEFAULT_ROLLOUT_FAILURE_LIMIT
}

/// Limits each judged interval must stay within.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutGates {
    /// Largest share of canary requests answered with a 5xx (or mirrored requests it failed),
    /// 0-1.
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// Largest canary p99 latency over the stable Backends' p99 in the same interval.
    #[serde(default = "default_max_latency_ratio")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub max_latency_ratio: f64,
    /// Least share of mirrored rows whose answer agrees with the stable answer, 0-1.
    #[serde(default = "default_min_agreement")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_agreement: f64,
}

impl Default for RolloutGates {
    fn default() -> Self {
        Self {
            max_error_rate: DEFAULT_MAX_ERROR_RATE,
            max_latency_ratio: DEFAULT_MAX_LATENCY_RATIO,
            min_agreement: DEFAULT_MIN_AGREEMENT,
        }
    }
}

fn default_max_error_rate() -> f64 {
    DEFAULT_MAX_ERROR_RATE
}
fn default_max_latency_ratio() -> f64 {
    DEFAULT_MAX_LATENCY_RATIO
}
fn default_min_agreement() -> f64 {
    DEFAULT_MIN_AGREEMENT
}

/// Where a rollout stands, as the operator (or `serval local`) reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// `Shadowing`, `Progressing`, `Waiting`, `Promoted` or `RolledBack`.
    pub phase: String,
    /// Index of the current step in `spec.rollout.steps`.
    pub step: u32,
    /// The canary's share of the traffic now, percent.
    pub canary_percent: u32,
    /// Whether the canary gets a mirror of the traffic now.
    pub shadow: bool,
    /// Failed intervals so far.
    pub failures: u32,
    /// Why the rollout is where it is, in a sentence.
    #[serde(default)]
    pub message: String,
    /// The last judged interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_interval: Option<RolloutInterval>,
    /// What the rollout was started for (the rollout spec and the canary's generation):
    /// a change restarts it.
    #[serde(default)]
    pub started_for: String,
    /// When the phase or step last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// One judged interval's measured values, against the gates.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutInterval {
    /// `Pass`, `Fail` or `Waiting`.
    pub verdict: String,
    /// Canary requests (mirrored ones in `Shadow`).
    pub canary_requests: u64,
    /// Canary error rate, 0-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// Canary p99 over the stable Backends' p99.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ratio: Option<f64>,
    /// Agreeing rows over compared rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
}

fn default_timeout_millis() -> u32 {
    DEFAULT_TIMEOUT_MILLIS
}

/// Where an Endpoint is reachable on the router.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Path prefix, e.g. `/digits`. It is stripped before the request reaches a Backend.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^/[A-Za-z0-9._~/-]*$')").message("route.pathPrefix must start with '/' and contain only letters, digits and . _ ~ / -"))]
    pub path_prefix: String,

    /// Host name the route is limited to; any host when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')").message("route.host must be a lowercase DNS name"))]
    pub host: Option<String>,
}

/// A Backend and its weight in the split.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTarget {
    /// Name of a Backend in the same namespace.
    #[schemars(length(min = 1, max = 63))]
    pub backend: String,
    /// Relative weight, 0-100.
    #[schemars(range(min = 0, max = 100))]
    pub weight: u32,
}

/// Shadow traffic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Name of the Backend that receives the copies. Its answers never reach the client.
    #[schemars(length(min = 1, max = 63))]
    pub backend: String,
    /// Share of requests copied, 0-100.
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
    /// How the shadow's answers are compared with the primary's, row by row. Default: the
    /// argmax of the first floating-point output with two or more values per row, else exact
    /// equality of the first output; image and V1 answers with labels by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<MirrorCompare>,
}

/// How a shadow's answers are compared with the primary's.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.tolerance) || (has(self.mode) && self.mode == 'Close')").message("mirror.compare.tolerance applies to mode Close only")
)]
pub struct MirrorCompare {
    /// The output compared (Open Inference Protocol and V1 answers); by default the first
    /// floating-point output with two or more values per row, else the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub output: Option<String>,
    /// `Argmax` (the same class), `Close` (every value within `tolerance`) or `Exact`.
    /// Default: `Argmax` for a floating-point output with two or more values per row, else
    /// `Exact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MirrorCompareMode>,
    /// Largest absolute difference of two values that still agree, with `mode: Close`
    /// (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub tolerance: Option<f64>,
}

/// How two rows of an output are compared.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum MirrorCompareMode {
    /// The same index of the largest value (the same class).
    Argmax,
    /// Every value within `tolerance` of the other's.
    Close,
    /// Equal values.
    Exact,
}

/// Route requests carrying a header value to a Backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MatchRule {
    /// The header to compare.
    pub header: HeaderValueMatch,
    /// Name of the Backend that receives matching requests.
    #[schemars(length(min = 1, max = 63))]
    pub backend: String,
}

/// An exact header match.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderValueMatch {
    /// Header name (case-insensitive).
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9!#$%&*+.^_`|~-]+$')").message("match header name must be a valid HTTP header name"))]
    pub name: String,
    /// Exact value.
    #[schemars(length(max = 1024))]
    pub value: String,
}

/// Sticky sessions.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Sticky {
    /// Request header whose value identifies a caller, e.g. `x-user-id`.
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z0-9!#$%&*+.^_`|~-]+$')").message("sticky.header must be a valid HTTP header name"))]
    pub header: String,
}

/// Retry settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Extra attempts after the first, on connection failure or 503 only.
    #[serde(default = "default_retry_attempts")]
    #[schemars(range(min = 0, max = 5))]
    pub attempts: u32,
    /// Retries allowed as a percentage of requests, so retries cannot amplify an outage.
    #[serde(default = "default_retry_budget")]
    #[schemars(range(min = 0, max = 100))]
    pub budget_percent: u32,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            budget_percent: DEFAULT_RETRY_BUDGET_PERCENT,
        }
    }
}

fn default_retry_attempts() -> u32 {
    DEFAULT_RETRY_ATTEMPTS
}
fn default_retry_budget() -> u32 {
    DEFAULT_RETRY_BUDGET_PERCENT
}

/// Observed state of an Endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Traffic actually sent to each Backend, after unready Backends are taken out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<EffectiveTraffic>,
    /// `backend=percent` pairs, for `kubectl get`.
    #[serde(default)]
    pub traffic_summary: String,
    /// URL of the route on the namespace's router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The rollout's progress, when `spec.rollout` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// One Backend's effective share of traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveTraffic {
    /// Backend name.
    pub backend: String,
    /// Declared weight.
    pub weight: u32,
    /// Percentage of primary requests it receives now, 0-100.
    pub percent: u32,
    /// Whether the Backend exists and is Ready.
    pub ready: bool,
}
