//! The routing table: what the operator (or local mode) generates and the router serves.
//!
//! One table per namespace covers every Endpoint there. It is plain data with a schema version
//! and a content-derived revision, stored as JSON under [`ROUTING_TABLE_KEY`] in the ConfigMap
//! [`ROUTING_CONFIGMAP`]. The router validates a table before swapping it in and keeps the old
//! one when validation fails.

use std::collections::{BTreeMap, BTreeSet};

pub use crate::endpoint::{Hop, Reduce};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Schema version of the routing-table document.
pub const ROUTING_TABLE_API_VERSION: &str = "serval.dev/routing/v1";
/// Name of the per-namespace ConfigMap holding the table.
pub const ROUTING_CONFIGMAP: &str = "serval-routing";
/// Key of the table inside the ConfigMap's `data`.
pub const ROUTING_TABLE_KEY: &str = "routing.json";
/// Request header the router sets to the Endpoint a request was addressed to; the model server
/// names that Endpoint (not its own Backend) as the model in its answers, so a client sees
/// the name it called.
pub const ENDPOINT_HEADER: &str = "serval-endpoint";
/// Response header of a model server's 429: in how many milliseconds it expects to admit work
/// again. The router sheds that replica's new requests itself until then (finer than the
/// whole seconds of `Retry-After`, which stays for clients).
pub const RETRY_AFTER_MS_HEADER: &str = "serval-retry-after-ms";

/// A complete routing table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RoutingTable {
    /// Always [`ROUTING_TABLE_API_VERSION`].
    pub api_version: String,
    /// Hash of the content; changes exactly when the content changes. Set by [`Self::seal`].
    #[serde(default)]
    pub revision: String,
    /// One route per Endpoint, sorted by Endpoint name.
    pub routes: Vec<Route>,
    /// Upstreams by Backend name.
    pub backends: BTreeMap<String, Upstream>,
}

/// How one Endpoint's traffic is routed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Endpoint name; clients may also call `/v2/models/<endpoint>/…` and `/v1/models/<endpoint>…`.
    pub endpoint: String,
    /// Path prefix, stripped before forwarding.
    pub path_prefix: String,
    /// Host the route is limited to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Weighted split. Weight 0 receives nothing; all zero means no ready backend (503).
    pub traffic: Vec<WeightedBackend>,
    /// Shadow traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorPolicy>,
    /// Header rules evaluated in order before the split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HeaderMatch>,
    /// Header whose value pins a caller to one backend (consistent hashing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// Per-request timeout.
    pub timeout_ms: u64,
    /// Retry policy.
    pub retries: RetryPolicy,
    /// A cascade: every request enters at its first stage; rows a stage is unsure of go on
    /// to the next. `traffic` names the first stage when it is a Backend (for model metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<CascadePlan>,
    /// An ensemble: every request goes to all members; their answers are reduced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<EnsemblePlan>,
    /// A sequence: each step's outputs are the next step's inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<SequencePlan>,
}

impl Route {
    /// Whether the route composes several calls (cascade, ensemble or sequence) rather than
    /// choosing one Backend from `traffic`.
    pub fn composed(&self) -> bool {
        self.cascade.is_some() || self.ensemble.is_some() || self.sequence.is_some()
    }

    /// Every hop of the route's composition: cascade stages, sequence steps, and ensemble
    /// members (always Backends).
    pub fn hops(&self) -> impl Iterator<Item = Hop<&str>> {
        let stages = self
            .cascade
            .iter()
            .flat_map(|c| c.stages.iter().map(|s| hop_ref(&s.to)));
        let steps = self
            .sequence
            .iter()
            .flat_map(|q| q.steps.iter().map(|s| hop_ref(&s.to)));
        let members = self
            .ensemble
            .iter()
            .flat_map(|e| e.backends.iter().map(|b| Hop::Backend(b.as_str())));
        stages.chain(steps).chain(members)
    }
}

fn hop_ref(h: &Hop<String>) -> Hop<&str> {
    match h {
        Hop::Backend(b) => Hop::Backend(b),
        Hop::Endpoint(e) => Hop::Endpoint(e),
    }
}

/// An ensemble in the table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnsemblePlan {
    /// Members, keys of [`RoutingTable::backends`], in the Endpoint's order (ties of a vote go
    /// to the first).
    pub backends: Vec<String>,
    /// The output reduced.
    pub output: String,
    /// How.
    pub reduce: Reduce,
    /// Answers needed, 1 to the number of members.
    pub min_responses: u32,
}

/// A sequence in the table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SequencePlan {
    /// The steps in order.
    pub steps: Vec<SequenceHop>,
}

/// One step of a sequence in the table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SequenceHop {
    /// A Backend (a key of [`RoutingTable::backends`]) or an Endpoint (a route of the table).
    #[serde(flatten)]
    pub to: Hop<String>,
    /// This step's inputs from the previous step's outputs, `{input: output}`; empty: every
    /// output under its own name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, String>,
}

/// The stages of a cascade, in order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CascadePlan {
    /// The output whose per-row maximum is a row's confidence.
    pub output: String,
    /// Every stage, the first included.
    pub stages: Vec<CascadeStep>,
}

/// One stage of a cascade in the table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CascadeStep {
    /// A Backend (a key of [`RoutingTable::backends`]) or an Endpoint (a route of the table).
    #[serde(flatten)]
    pub to: Hop<String>,
    /// Rows below this confidence go to the next stage; `None` on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_confidence: Option<f64>,
}

/// One backend and its share of a route's traffic.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WeightedBackend {
    /// Backend name, a key of [`RoutingTable::backends`].
    pub backend: String,
    /// Relative weight, 0–100.
    pub weight: u32,
}

/// Shadow a share of requests to another backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirrorPolicy {
    /// Backend receiving the copies.
    pub backend: String,
    /// Share of requests copied, 0–100.
    pub percent: u32,
    /// How answers are compared (the Endpoint's `mirror.compare`).
    #[serde(default, skip_serializing_if = "is_default_compare")]
    pub compare: crate::MirrorCompare,
}

fn is_default_compare(c: &crate::MirrorCompare) -> bool {
    *c == crate::MirrorCompare::default()
}

/// Send requests whose header equals a value to a given backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name, case-insensitive.
    pub header: String,
    /// Exact value.
    pub value: String,
    /// Backend chosen on a match.
    pub backend: String,
}

/// When and how often to retry.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Extra attempts after the first (connection failure or 503 only).
    pub attempts: u32,
    /// Retries allowed as a percentage of recent requests, so retries cannot amplify an outage.
    pub budget_percent: u32,
}

/// Where a backend is reached.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Model name the backend's model server serves (the Backend's name).
    pub model: String,
    /// `host:port` addresses; the router balances across them.
    pub addresses: Vec<String>,
    /// Whether the backend is ready. Routes give an unready backend weight 0 already; this is
    /// kept so the router can report it.
    pub ready: bool,
    /// The backend is at zero replicas on purpose (scaled to zero): its routes keep their
    /// weight, and the router holds the requests sent to it until it has an address again,
    /// each up to its route's deadline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub scaled_to_zero: bool,
}

/// Why a routing table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RoutingTableError {
    /// Not JSON of the right shape.
    #[error("routing table is not valid JSON: {0}")]
    Parse(String),
    /// Unknown schema version.
    #[error("routing table apiVersion {found:?} is not {ROUTING_TABLE_API_VERSION:?}")]
    ApiVersion {
        /// The version found.
        found: String,
    },
    /// Semantically invalid.
    #[error("routing table route {endpoint:?}: {reason}")]
    Route {
        /// The offending route.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A backend entry is invalid.
    #[error("routing table backend {backend:?}: {reason}")]
    Backend {
        /// The offending backend.
        backend: String,
        /// What is wrong.
        reason: String,
    },
}

impl RoutingTable {
    /// An empty table.
    pub fn empty() -> Self {
        Self {
            api_version: ROUTING_TABLE_API_VERSION.to_owned(),
            revision: String::new(),
            routes: Vec::new(),
            backends: BTreeMap::new(),
        }
        .seal()
    }

    /// Sorts for a canonical form and sets [`Self::revision`] from the content.
    pub fn seal(mut self) -> Self {
        self.routes.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        self.revision = String::new();
        // Serializing owned strings and integers cannot fail.
        let bytes = serde_json::to_vec(&self).unwrap_or_default();
        self.revision = hex::encode(&Sha256::digest(&bytes)[..8]);
        self
    }

    /// Parses and validates a table.
    pub fn from_json(bytes: &[u8]) -> Result<Self, RoutingTableError> {
        let table: Self =
            serde_json::from_slice(bytes).map_err(|e| RoutingTableError::Parse(e.to_string()))?;
        table.validate()?;
        Ok(table)
    }

    /// Pretty JSON, as stored in the ConfigMap.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks everything the router relies on.
    pub fn validate(&self) -> Result<(), RoutingTableError> {
        if self.api_version != ROUTING_TABLE_API_VERSION {
            return Err(RoutingTableError::ApiVersion {
                found: self.api_version.clone(),
            });
        }
        for (name, up) in &self.backends {
            for addr in &up.addresses {
                if !valid_address(addr) {
                    return Err(RoutingTableError::Backend {
                        backend: name.clone(),
                        reason: format!("address {addr:?} is not host:port"),
                    });
                }
            }
            if up.model.is_empty() {
                return Err(RoutingTableError::Backend {
                    backend: name.clone(),
                    reason: "model name is empty".to_owned(),
                });
            }
        }
        let mut names = BTreeSet::new();
        let mut claims = BTreeSet::new();
        for r in &self.routes {
            let err = |reason: String| RoutingTableError::Route {
                endpoint: r.endpoint.clone(),
                reason,
            };
            if !names.insert(&r.endpoint) {
                return Err(err("endpoint appears twice".to_owned()));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(err(format!(
                    "pathPrefix {:?} must start with '/'",
                    r.path_prefix
                )));
            }
            if !claims.insert((r.host.as_deref(), r.path_prefix.trim_end_matches('/'))) {
                return Err(err(format!("route {:?} is claimed twice", r.path_prefix)));
            }
            if r.traffic.is_empty() && !r.composed() {
                return Err(err("traffic is empty".to_owned()));
            }
            let compositions = [
                r.cascade.is_some(),
                r.ensemble.is_some(),
                r.sequence.is_some(),
            ];
            if compositions.iter().filter(|c| **c).count() > 1 {
                return Err(err(
                    "a route has at most one of cascade, ensemble and sequence".to_owned(),
                ));
            }
            let referenced = r
                .traffic
                .iter()
                .map(|t| t.backend.as_str())
                .chain(r.mirror.iter().map(|m| m.backend.as_str()))
                .chain(r.matches.iter().map(|m| m.backend.as_str()))
                .map(Hop::Backend)
                .chain(r.hops());
            for hop in referenced {
                match hop {
                    Hop::Backend(b) if !self.backends.contains_key(b) => {
                        return Err(err(format!("backend {b:?} has no upstream entry")));
                    }
                    Hop::Endpoint(e) if self.route(e).is_none() => {
                        return Err(err(format!("endpoint {e:?} has no route")));
                    }
                    _ => {}
                }
            }
            if let Some(e) = &r.ensemble
                && (e.backends.is_empty()
                    || e.min_responses == 0
                    || e.min_responses as usize > e.backends.len())
            {
                return Err(err(format!(
                    "an ensemble of {} needs minResponses from 1 to that",
                    e.backends.len()
                )));
            }
            if let Some(q) = &r.sequence
                && q.steps.len() < 2
            {
                return Err(err("a sequence needs 2 or more steps".to_owned()));
            }
            if let Some(t) = r.traffic.iter().find(|t| t.weight > 100) {
                return Err(err(format!(
                    "weight {} of {:?} is over 100",
                    t.weight, t.backend
                )));
            }
            if let Some(m) = &r.mirror
                && m.percent > 100
            {
                return Err(err(format!("mirror percent {} is over 100", m.percent)));
            }
            if r.timeout_ms == 0 {
                return Err(err("timeoutMs must be positive".to_owned()));
            }
            if let Some(c) = &r.cascade {
                let (last, rest) = c
                    .stages
                    .split_last()
                    .ok_or_else(|| err("a cascade has no stages".to_owned()))?;
                if rest.is_empty() || last.min_confidence.is_some() {
                    return Err(err(
                        "a cascade needs 2 or more stages, minConfidence on all but the last"
                            .to_owned(),
                    ));
                }
                if let Some(s) = rest
                    .iter()
                    .find(|s| !s.min_confidence.is_some_and(|m| (0.0..=1.0).contains(&m)))
                {
                    return Err(err(format!(
                        "cascade stage {} needs a minConfidence from 0 to 1",
                        s.to
                    )));
                }
            }
        }
        if let Some(cycle) = self.cycles().into_iter().next() {
            return Err(RoutingTableError::Route {
                endpoint: cycle[0].clone(),
                reason: format!("calls itself: {}", cycle.join(" -> ")),
            });
        }
        Ok(())
    }

    /// Every cycle of routes calling routes (through cascade stages and sequence steps naming
    /// an Endpoint), each as the path from its first route back to it; empty when none.
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let edges: BTreeMap<&str, Vec<&str>> = self
            .routes
            .iter()
            .map(|r| {
                let to = r
                    .hops()
                    .filter_map(|h| match h {
                        Hop::Endpoint(e) => Some(e),
                        Hop::Backend(_) => None,
                    })
                    .collect();
                (r.endpoint.as_str(), to)
            })
            .collect();
        cycles(&edges)
    }

    /// The route for an Endpoint name.
    pub fn route(&self, endpoint: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.endpoint == endpoint)
    }
}

/// The cycles of a directed graph, each once, as the path from its smallest-named node
/// back to it (`[a, b, a]`). Nodes absent from `edges` have no way out.
pub fn cycles<'a>(edges: &BTreeMap<&'a str, Vec<&'a str>>) -> Vec<Vec<String>> {
    // Depth-first from every node, following only nodes greater than the start, so each
    // cycle is found once, from its smallest node. Graphs here are a namespace's Endpoints.
    fn walk<'a>(
        edges: &BTreeMap<&'a str, Vec<&'a str>>,
        start: &'a str,
        path: &mut Vec<&'a str>,
        found: &mut Vec<Vec<String>>,
    ) {
        let Some(last) = path.last().copied() else {
            return;
        };
        for next in edges.get(last).into_iter().flatten().copied() {
            if next == start {
                let mut cycle: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
                cycle.push(start.to_owned());
                found.push(cycle);
            } else if next > start && !path.contains(&next) {
                path.push(next);
                walk(edges, start, path, found);
                path.pop();
            }
        }
    }
    let mut found = Vec::new();
    for start in edges.keys().copied() {
        walk(edges, start, &mut vec![start], &mut found);
    }
    found
}

fn valid_address(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        let up = |m: &str, a: &str| Upstream {
            model: m.to_owned(),
            addresses: vec![a.to_owned()],
            ready: true,
            scaled_to_zero: false,
        };
        RoutingTable {
            api_version: ROUTING_TABLE_API_VERSION.to_owned(),
            revision: String::new(),
            routes: vec![Route {
                endpoint: "digits".to_owned(),
                path_prefix: "/digits".to_owned(),
                host: None,
                traffic: vec![
                    WeightedBackend {
                        backend: "v1".to_owned(),
                        weight: 90,
                    },
                    WeightedBackend {
                        backend: "v2".to_owned(),
                        weight: 10,
                    },
                ],
                mirror: None,
                matches: vec![],
                sticky_header: None,
                timeout_ms: 1000,
                retries: RetryPolicy {
                    attempts: 1,
                    budget_percent: 20,
                },
                cascade: None,
                ensemble: None,
                sequence: None,
            }],
            backends: [
                ("v1".to_owned(), up("v1", "127.0.0.1:9001")),
                ("v2".to_owned(), up("v2", "127.0.0.1:9002")),
            ]
            .into(),
        }
        .seal()
    }

    #[test]
    fn round_trips_and_revision_tracks_content() {
        let t = table();
        let parsed = RoutingTable::from_json(t.to_json().as_bytes()).unwrap();
        assert_eq!(parsed, t);
        assert_eq!(
            t.clone().seal().revision,
            t.revision,
            "sealing is idempotent"
        );
        let mut changed = t.clone();
        changed.routes[0].traffic[0].weight = 50;
        assert_ne!(changed.seal().revision, t.revision);
    }

    #[test]
    fn refuses_broken_tables() {
        let mut t = table();
        t.routes[0].traffic.push(WeightedBackend {
            backend: "ghost".to_owned(),
            weight: 1,
        });
        assert!(
            matches!(t.validate(), Err(RoutingTableError::Route { reason, .. }) if reason.contains("ghost"))
        );

        let mut t = table();
        t.backends.get_mut("v1").unwrap().addresses = vec!["nohost".to_owned()];
        assert!(matches!(
            t.validate(),
            Err(RoutingTableError::Backend { .. })
        ));

        let mut t = table();
        t.api_version = "v0".to_owned();
        assert!(matches!(
            t.validate(),
            Err(RoutingTableError::ApiVersion { .. })
        ));

        let mut t = table();
        let mut dup = t.routes[0].clone();
        dup.endpoint = "other".to_owned();
        t.routes.push(dup);
        assert!(t.validate().is_err(), "two routes on one prefix");

        assert!(matches!(
            RoutingTable::from_json(b"{"),
            Err(RoutingTableError::Parse(_))
        ));
    }

    #[test]
    fn routes_calling_each_other_in_a_circle_are_refused() {
        fn call(t: &mut RoutingTable, from: usize, to: &str, prefix: &str) {
            if t.routes.len() <= from {
                let mut r = t.routes[0].clone();
                r.endpoint = format!("e{from}");
                r.path_prefix = prefix.to_owned();
                t.routes.push(r);
            }
            t.routes[from].sequence = Some(SequencePlan {
                steps: vec![
                    SequenceHop {
                        to: Hop::Backend("v1".to_owned()),
                        inputs: BTreeMap::new(),
                    },
                    SequenceHop {
                        to: Hop::Endpoint(to.to_owned()),
                        inputs: BTreeMap::new(),
                    },
                ],
            });
        }
        let mut t = table();
        call(&mut t, 1, "e2", "/a");
        call(&mut t, 2, "digits", "/b");
        assert!(t.validate().is_ok(), "a chain is fine");
        call(&mut t, 0, "e1", "/digits");
        let found = t.cycles();
        assert_eq!(found, vec![vec!["digits", "e1", "e2", "digits"]]);
        assert!(
            matches!(t.validate(), Err(RoutingTableError::Route { reason, .. }) if reason.contains("digits -> e1 -> e2 -> digits"))
        );
        // Serialized, a step names its kind: the table stays readable.
        let json = t.to_json();
        assert!(json.contains(r#""endpoint": "e1""#), "{json}");
        assert_eq!(RoutingTable::from_json(json.as_bytes()).ok(), None);
        let two = BTreeMap::from([("a", vec!["a"]), ("b", vec!["c"]), ("c", vec!["b", "a"])]);
        assert_eq!(
            cycles(&two),
            vec![
                vec!["a".to_owned(), "a".to_owned()],
                vec!["b".to_owned(), "c".to_owned(), "b".to_owned()]
            ]
        );
    }
}
