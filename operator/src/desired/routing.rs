//! The routing table for a namespace and each Endpoint's status, from Endpoints and Backends.
//!
//! Pure: the operator feeds it reflector stores and Service addresses; local mode feeds it
//! manifests and the ports of the sidecars it started.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use serval_api::conditions::{DEGRADED, PROGRESSING, READY, reason};
use serval_api::routing::{
    CascadePlan, CascadeStep, EnsemblePlan, HeaderMatch, MirrorPolicy, RetryPolicy, Route,
    RoutingTable, SequenceHop, SequencePlan, Upstream, WeightedBackend,
};
use serval_api::{
    Cascade, CascadeStage, EffectiveTraffic, Endpoint, EndpointStatus, Hop, Mirror, SequenceStep,
    TrafficTarget,
};

use crate::conditions::{Observed, settle};

/// What the planner needs to know about one Backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendView {
    /// Whether the Backend is Ready (model loaded and warmed up on enough replicas).
    pub ready: bool,
    /// Where it is reached.
    pub addresses: Vec<String>,
    /// Autoscaled to zero and not serving yet: its routes keep their weight and the router
    /// holds its requests until a table gives it an address (implies no `addresses`).
    pub scaled_to_zero: bool,
}

/// How one Endpoint fared in the plan.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Outcome {
    /// The earlier Endpoint that owns the same route, if any; this one is then left out.
    pub conflict_with: Option<String>,
    /// The circle of Endpoints calling each other this one is part of (`a -> b -> a`); it is
    /// then left out.
    pub cycle: Option<String>,
    /// Endpoints named as its cascade stages or sequence steps that are not routed.
    pub missing_endpoints: Vec<String>,
    /// Effective traffic per Backend in `traffic`.
    pub traffic: Vec<EffectiveTraffic>,
    /// Named Backends that do not exist.
    pub missing: Vec<String>,
    /// Named Backends that exist but are not Ready.
    pub not_ready: Vec<String>,
    /// Whether a request can be answered now: a Backend with weight is usable, or the
    /// composition's required Backends and Endpoints can serve.
    pub serves: bool,
    /// Whether the Endpoint has a route in the table.
    pub routed: bool,
}

/// A namespace's routing table plus one outcome per Endpoint name.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The sealed routing table.
    pub table: RoutingTable,
    /// Outcome by Endpoint name.
    pub outcomes: BTreeMap<String, Outcome>,
}

fn route_key(ep: &Endpoint) -> (Option<String>, String) {
    let prefix = ep.spec.route.path_prefix.trim_end_matches('/');
    (
        ep.spec.route.host.clone(),
        if prefix.is_empty() {
            "/".to_owned()
        } else {
            prefix.to_owned()
        },
    )
}

/// Endpoints a composition cannot do without: every sequence step's, a cascade's first stage
/// (later stages that cannot serve are skipped).
fn required_endpoints(ep: &Endpoint) -> impl Iterator<Item = &str> {
    let first = ep
        .spec
        .cascade
        .iter()
        .filter_map(|c| c.stages.first()?.hop());
    let steps = ep
        .spec
        .sequence
        .iter()
        .flat_map(|q| q.steps.iter().filter_map(|s| s.hop()));
    first.chain(steps).filter_map(|h| match h {
        Hop::Endpoint(e) => Some(e),
        Hop::Backend(_) => None,
    })
}

/// Which Endpoints can answer now, memoized: the graph of routed Endpoints has no cycle, so
/// the recursion ends.
struct Serving<'a> {
    routed: &'a BTreeMap<String, &'a Endpoint>,
    backends: &'a BTreeMap<String, BackendView>,
    memo: BTreeMap<String, bool>,
}

impl Serving<'_> {
    fn backend(&self, b: &str) -> bool {
        // A Backend at zero keeps its traffic: the router holds its requests meanwhile.
        self.backends
            .get(b)
            .is_some_and(|v| v.ready || v.scaled_to_zero)
    }

    fn hop(&mut self, hop: Hop<&str>) -> bool {
        match hop {
            Hop::Backend(b) => self.backend(b),
            Hop::Endpoint(e) => self.endpoint(e),
        }
    }

    fn endpoint(&mut self, name: &str) -> bool {
        if let Some(s) = self.memo.get(name) {
            return *s;
        }
        let Some(ep) = self.routed.get(name).copied() else {
            return false;
        };
        // Provisionally not serving: a cycle would end here (there is none among routed ones).
        self.memo.insert(name.to_owned(), false);
        let spec = &ep.spec;
        let serves = if let Some(c) = &spec.cascade {
            c.stages
                .first()
                .and_then(CascadeStage::hop)
                .is_some_and(|h| self.hop(h))
        } else if let Some(e) = &spec.ensemble {
            let up = e.backends.iter().filter(|b| self.backend(b)).count();
            up >= e.min_responses.map_or(e.backends.len(), |m| m as usize)
        } else if let Some(q) = &spec.sequence {
            q.steps.iter().all(|s| s.hop().is_some_and(|h| self.hop(h)))
        } else {
            declared(ep)
                .0
                .iter()
                .any(|t| t.weight > 0 && self.backend(&t.backend))
        };
        self.memo.insert(name.to_owned(), serves);
        serves
    }
}

/// Plans the routing table of one namespace.
///
/// Route conflicts go to the Endpoint created first (then by name), so the winner never flips
/// when a later Endpoint appears. Backends that are missing or not Ready get weight 0, and
/// match rules or mirrors pointing at them are dropped, so no traffic is sent their way.
/// Endpoints that call each other in a circle are left out, and so is a composition that
/// needs an Endpoint left out (or absent).
pub fn plan<'a>(
    endpoints: impl IntoIterator<Item = &'a Endpoint>,
    backends: &BTreeMap<String, BackendView>,
) -> Plan {
    let mut eps: Vec<&Endpoint> = endpoints.into_iter().collect();
    eps.sort_by(|a, b| {
        (a.meta().creation_timestamp.as_ref(), a.name_any())
            .cmp(&(b.meta().creation_timestamp.as_ref(), b.name_any()))
    });

    let mut claimed: BTreeMap<(Option<String>, String), String> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut routed: BTreeMap<String, &Endpoint> = BTreeMap::new();
    let mut order = Vec::new();
    for ep in eps {
        let name = ep.name_any();
        let mut outcome = Outcome::default();
        if let Some(owner) = claimed.get(&route_key(ep)) {
            outcome.conflict_with = Some(owner.clone());
        } else {
            claimed.insert(route_key(ep), name.clone());
            routed.insert(name.clone(), ep);
            order.push(ep);
        }
        outcomes.insert(name, outcome);
    }
    // Circles of Endpoints calling Endpoints: every member is left out.
    let edges: BTreeMap<&str, Vec<&str>> = routed
        .iter()
        .map(|(n, ep)| (n.as_str(), ep.spec.named_endpoints().collect()))
        .collect();
    for cycle in serval_api::routing::cycles(&edges) {
        let path = cycle.join(" -> ");
        for member in &cycle {
            if let Some(o) = outcomes.get_mut(member) {
                o.cycle.get_or_insert_with(|| path.clone());
            }
        }
    }
    routed.retain(|n, _| outcomes.get(n).is_none_or(|o| o.cycle.is_none()));
    // Then whatever needs an Endpoint that is not routed, until nothing changes.
    loop {
        let unmet: Vec<(String, Vec<String>)> = routed
            .iter()
            .map(|(n, ep)| {
                let mut missing: Vec<String> = required_endpoints(ep)
                    .filter(|e| !routed.contains_key(*e))
                    .map(str::to_owned)
                    .collect();
                missing.dedup();
                (n.clone(), missing)
            })
            .filter(|(_, m)| !m.is_empty())
            .collect();
        if unmet.is_empty() {
            break;
        }
        for (n, missing) in unmet {
            routed.remove(&n);
            if let Some(o) = outcomes.get_mut(&n) {
                o.missing_endpoints = missing;
            }
        }
    }
    order.retain(|ep| routed.contains_key(&ep.name_any()));

    let mut serving = Serving {
        routed: &routed,
        backends,
        memo: BTreeMap::new(),
    };
    let mut routes = Vec::new();
    let mut used = BTreeSet::new();
    for ep in order {
        let name = ep.name_any();
        let outcome = outcomes.entry(name.clone()).or_default();
        let spec = &ep.spec;
        let (declared, mirror) = declared(ep);
        for b in spec.named_backends() {
            let list = match backends.get(b) {
                None => &mut outcome.missing,
                Some(v) if !v.ready && !v.scaled_to_zero => &mut outcome.not_ready,
                Some(_) => continue,
            };
            if !list.iter().any(|x| x == b) {
                list.push(b.to_owned());
            }
        }
        // A later cascade stage naming an Endpoint that is not routed is skipped; say so.
        for e in spec.named_endpoints() {
            if !routed.contains_key(e) && !outcome.missing_endpoints.iter().any(|m| m == e) {
                outcome.missing_endpoints.push(e.to_owned());
            }
        }

        let traffic: Vec<WeightedBackend> = declared
            .iter()
            .map(|t| WeightedBackend {
                backend: t.backend.clone(),
                weight: if serving.backend(&t.backend) {
                    t.weight
                } else {
                    0
                },
            })
            .collect();
        let total: u32 = traffic.iter().map(|t| t.weight).sum();
        outcome.traffic = percentages(&traffic, total)
            .into_iter()
            .zip(&declared)
            .map(|(percent, t)| EffectiveTraffic {
                backend: t.backend.clone(),
                weight: t.weight,
                percent,
                ready: serving.backend(&t.backend),
            })
            .collect();
        outcome.serves = serving.endpoint(&name);
        outcome.routed = true;

        let route = Route {
            endpoint: name.clone(),
            path_prefix: spec.route.path_prefix.clone(),
            host: spec.route.host.clone(),
            mirror: mirror
                .as_ref()
                .filter(|m| serving.backend(&m.backend) && m.percent > 0)
                .map(|m| MirrorPolicy {
                    backend: m.backend.clone(),
                    percent: m.percent,
                    compare: m.compare.clone().unwrap_or_default(),
                }),
            matches: spec
                .matches
                .iter()
                .filter(|m| serving.backend(&m.backend))
                .map(|m| HeaderMatch {
                    header: m.header.name.to_ascii_lowercase(),
                    value: m.header.value.clone(),
                    backend: m.backend.clone(),
                })
                .collect(),
            sticky_header: spec.sticky.as_ref().map(|s| s.header.to_ascii_lowercase()),
            timeout_ms: u64::from(spec.timeout_millis),
            retries: RetryPolicy {
                attempts: spec.retries.attempts,
                budget_percent: spec.retries.budget_percent,
            },
            cascade: spec
                .cascade
                .as_ref()
                .map(|c| cascade_plan(c, &mut |h| serving.hop(h))),
            ensemble: spec.ensemble.as_ref().map(|e| EnsemblePlan {
                backends: e.backends.clone(),
                output: e.output.clone(),
                reduce: e.reduce,
                min_responses: e
                    .min_responses
                    .unwrap_or(e.backends.len() as u32)
                    .clamp(1, e.backends.len().max(1) as u32),
            }),
            sequence: spec.sequence.as_ref().map(|q| SequencePlan {
                steps: q
                    .steps
                    .iter()
                    .filter_map(|s| {
                        Some(SequenceHop {
                            to: s.hop()?.to_owned(),
                            inputs: s.inputs.clone(),
                        })
                    })
                    .collect(),
            }),
            traffic,
        };
        // Every backend the route names needs an upstream entry, usable or not.
        used.extend(route.traffic.iter().map(|t| t.backend.clone()));
        used.extend(route.mirror.iter().map(|m| m.backend.clone()));
        used.extend(route.matches.iter().map(|m| m.backend.clone()));
        used.extend(route.hops().filter_map(|h| match h {
            Hop::Backend(b) => Some(b.to_owned()),
            Hop::Endpoint(_) => None,
        }));
        routes.push(route);
    }

    // Missing backends get an entry with no address: routes give them weight 0 anyway.
    let table_backends = used
        .into_iter()
        .map(|b| {
            let view = backends.get(&b);
            let scaled_to_zero = view.is_some_and(|v| v.scaled_to_zero);
            let up = Upstream {
                model: b.clone(),
                addresses: view
                    .filter(|_| !scaled_to_zero)
                    .map(|v| v.addresses.clone())
                    .unwrap_or_default(),
                ready: view.is_some_and(|v| v.ready),
                scaled_to_zero,
            };
            (b, up)
        })
        .collect();
    let table = RoutingTable {
        api_version: serval_api::routing::ROUTING_TABLE_API_VERSION.to_owned(),
        revision: String::new(),
        routes,
        backends: table_backends,
    }
    .seal();
    Plan { table, outcomes }
}

/// The traffic and mirror an Endpoint asks for now: its spec; or, with a rollout, the stable
/// Backends of `traffic` sharing what the canary's current step (from `status.rollout`, else
/// the first step) leaves them, by their weights, and a mirror of every request to the canary
/// while it is shadowed.
pub fn declared(ep: &Endpoint) -> (Vec<TrafficTarget>, Option<Mirror>) {
    let spec = &ep.spec;
    // A composition's first Backend answers model metadata for it.
    let first = if let Some(c) = &spec.cascade {
        c.stages.first().and_then(CascadeStage::hop)
    } else if let Some(e) = &spec.ensemble {
        e.backends.first().map(|b| Hop::Backend(b.as_str()))
    } else if let Some(q) = &spec.sequence {
        q.steps.first().and_then(SequenceStep::hop)
    } else {
        None
    };
    if spec.cascade.is_some() || spec.ensemble.is_some() || spec.sequence.is_some() {
        let first = first.and_then(|h| match h {
            Hop::Backend(b) => Some(TrafficTarget {
                backend: b.to_owned(),
                weight: 100,
            }),
            Hop::Endpoint(_) => None,
        });
        return (first.into_iter().collect(), None);
    }
    let Some(rollout) = &spec.rollout else {
        return (spec.traffic.clone(), spec.mirror.clone());
    };
    let (percent, shadow) = match ep.status.as_ref().and_then(|s| s.rollout.as_ref()) {
        Some(r) => (r.canary_percent.min(100), r.shadow),
        None => match crate::desired::rollout::steps(rollout).first() {
            Some(serval_autoscale::rollout::Step::Weight(w)) => ((*w).min(100), false),
            _ => (0, true),
        },
    };
    // Weights stay within the table's 0-100: the stable Backends share 100 - percent by their
    // weights (largest remainder), the canary has percent.
    let stable: u32 = spec.traffic.iter().map(|t| t.weight).sum();
    let shares = if stable == 0 {
        vec![0; spec.traffic.len()]
    } else {
        let left = 100 - percent;
        let weighted: Vec<WeightedBackend> = spec
            .traffic
            .iter()
            .map(|t| WeightedBackend {
                backend: t.backend.clone(),
                weight: t.weight,
            })
            .collect();
        percentages(&weighted, stable)
            .into_iter()
            .map(|p| p * left / 100)
            .collect::<Vec<_>>()
    };
    let mut traffic: Vec<TrafficTarget> = spec
        .traffic
        .iter()
        .zip(shares)
        .map(|(t, weight)| TrafficTarget {
            backend: t.backend.clone(),
            weight,
        })
        .collect();
    let given: u32 = traffic.iter().map(|t| t.weight).sum();
    // What integer division left goes to the first stable Backend with a weight.
    if let Some(first) = traffic.iter_mut().find(|t| t.weight > 0) {
        first.weight += (100 - percent).saturating_sub(given);
    }
    traffic.push(TrafficTarget {
        backend: rollout.canary.clone(),
        weight: percent,
    });
    let mirror = shadow.then(|| Mirror {
        backend: rollout.canary.clone(),
        percent: 100,
        compare: None,
    });
    (traffic, mirror)
}

/// The table's cascade: the first stage, then the later ones that can serve (a stage that
/// cannot is skipped, so its rows go to the next one), the last answering whatever reaches it.
/// When no later stage can serve, the first answers everything.
fn cascade_plan(cascade: &Cascade, serves: &mut dyn FnMut(Hop<&str>) -> bool) -> CascadePlan {
    let mut stages: Vec<CascadeStep> = Vec::new();
    for (i, s) in cascade.stages.iter().enumerate() {
        let Some(hop) = s.hop() else { continue };
        if i == 0 || serves(hop) {
            stages.push(CascadeStep {
                to: hop.to_owned(),
                min_confidence: s.min_confidence,
            });
        }
    }
    if let Some(last) = stages.last_mut() {
        last.min_confidence = None;
    }
    CascadePlan {
        output: cascade.output.clone(),
        stages,
    }
}

/// Integer percentages summing to exactly 100 (largest remainder), or all 0 when `total` is 0.
fn percentages(traffic: &[WeightedBackend], total: u32) -> Vec<u32> {
    if total == 0 {
        return vec![0; traffic.len()];
    }
    let mut out: Vec<u32> = traffic.iter().map(|t| t.weight * 100 / total).collect();
    let mut remainders: Vec<(u32, usize)> = traffic
        .iter()
        .enumerate()
        .map(|(i, t)| ((t.weight * 100) % total, i))
        .collect();
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let short = 100 - out.iter().sum::<u32>();
    for &(_, i) in remainders.iter().take(short as usize) {
        out[i] += 1;
    }
    out
}

/// `backend=percent` pairs for the printer column.
pub fn traffic_summary(traffic: &[EffectiveTraffic]) -> String {
    traffic
        .iter()
        .map(|t| format!("{}={}%", t.backend, t.percent))
        .collect::<Vec<_>>()
        .join(",")
}

/// An Endpoint's status from its plan outcome and whether the namespace's router is ready.
///
/// The table revision is deliberately not part of it: it changes with every Endpoint of the
/// namespace, and would make each change rewrite every Endpoint's status.
pub fn status_for(
    endpoint: &Endpoint,
    outcome: &Outcome,
    router_url: &str,
    router_ready: bool,
    now: Timestamp,
) -> EndpointStatus {
    let generation = endpoint.meta().generation;
    let serving = outcome.serves;
    let left_out = outcome
        .cycle
        .as_ref()
        .map(|c| {
            (
                reason::CYCLE,
                format!("Endpoints call each other in a circle ({c}); this Endpoint is left out of the routing table"),
            )
        })
        .or_else(|| {
            outcome.missing_endpoints.first().map(|_| {
                (
                    reason::ENDPOINT_NOT_FOUND,
                    format!(
                        "Endpoint(s) {} not routed (absent, conflicting or in a cycle)",
                        outcome.missing_endpoints.join(", ")
                    ),
                )
            })
        });
    let observed = if let Some(owner) = &outcome.conflict_with {
        let msg = format!(
            "route {:?} is already claimed by Endpoint {owner:?}, created earlier; this Endpoint receives no traffic",
            endpoint.spec.route.path_prefix
        );
        vec![
            Observed::new(READY, false, reason::ROUTE_CONFLICT, msg.clone()),
            Observed::new(
                PROGRESSING,
                false,
                reason::ROUTE_CONFLICT,
                "waiting for the route to be free",
            ),
            Observed::new(DEGRADED, true, reason::ROUTE_CONFLICT, msg),
        ]
    } else if let Some((why, msg)) = left_out.as_ref().filter(|_| !outcome.routed) {
        vec![
            Observed::new(READY, false, why, msg.clone()),
            Observed::new(
                PROGRESSING,
                false,
                why,
                "waiting for a change of the Endpoints",
            ),
            Observed::new(DEGRADED, true, why, msg.clone()),
        ]
    } else {
        let (degraded_reason, degraded_msg) = if let Some((why, msg)) = left_out {
            (why, msg)
        } else if !outcome.missing.is_empty() {
            (
                reason::BACKEND_NOT_FOUND,
                format!(
                    "Backend(s) {} not found; they receive no traffic",
                    outcome.missing.join(", ")
                ),
            )
        } else if !outcome.not_ready.is_empty() {
            (
                reason::BACKEND_NOT_READY,
                format!(
                    "Backend(s) {} not Ready; they receive no traffic",
                    outcome.not_ready.join(", ")
                ),
            )
        } else {
            (reason::BACKENDS_READY, String::new())
        };
        let ready = if !serving {
            Observed::new(
                READY,
                false,
                reason::NO_READY_BACKEND,
                "no Backend with positive weight is Ready; requests are answered 503",
            )
        } else if !router_ready {
            Observed::new(
                READY,
                false,
                reason::ROUTER_NOT_READY,
                "the namespace's serval-router is not ready yet",
            )
        } else {
            Observed::new(
                READY,
                true,
                reason::BACKENDS_READY,
                format!("serving {}", traffic_summary(&outcome.traffic)),
            )
        };
        let progressing = !router_ready || !outcome.not_ready.is_empty();
        // A rollout under way is progress too; a finished one (promoted or rolled back, which
        // is the rollout doing its job) is not, and neither is Degraded.
        let rollout = endpoint
            .status
            .as_ref()
            .and_then(|s| s.rollout.as_ref())
            .filter(|_| endpoint.spec.rollout.is_some());
        let progress = match rollout {
            Some(r) if !matches!(r.phase.as_str(), "Promoted" | "RolledBack") => Observed::new(
                PROGRESSING,
                true,
                reason::ROLLOUT,
                format!("rollout {}: {}", r.phase, r.message),
            ),
            _ if progressing => Observed::new(
                PROGRESSING,
                true,
                reason::ROLLING_OUT,
                "waiting for the router and Backends to become ready",
            ),
            Some(r) => Observed::new(
                PROGRESSING,
                false,
                reason::UP_TO_DATE,
                format!("rollout {}: {}", r.phase, r.message),
            ),
            None => Observed::new(PROGRESSING, false, reason::UP_TO_DATE, ""),
        };
        vec![
            ready,
            progress,
            Observed::new(
                DEGRADED,
                degraded_reason != reason::BACKENDS_READY,
                degraded_reason,
                degraded_msg,
            ),
        ]
    };
    let previous = endpoint
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let in_table = outcome.routed;
    EndpointStatus {
        observed_generation: generation,
        traffic_summary: traffic_summary(&outcome.traffic),
        traffic: outcome.traffic.clone(),
        url: in_table.then(|| format!("{router_url}{}", endpoint.spec.route.path_prefix)),
        conditions: settle(previous, observed, generation, now),
        // The rollout's own field, written by its actuator: carried over so a comparison with
        // the stored status holds, and never sent by the Endpoint controller.
        rollout: endpoint.status.as_ref().and_then(|s| s.rollout.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cascade_endpoint() -> Endpoint {
        let mut ep = Endpoint::new(
            "digits-cascade",
            serde_json::from_value(json!({
                "route": {"pathPrefix": "/digits"},
                "cascade": {"output": "probabilities", "stages": [
                    {"backend": "small", "minConfidence": 0.9},
                    {"backend": "medium", "minConfidence": 0.95},
                    {"backend": "large"}
                ]}
            }))
            .expect("a valid spec"),
        );
        ep.meta_mut().namespace = Some("models".to_owned());
        ep
    }

    fn view(ready: bool) -> BackendView {
        BackendView {
            ready,
            addresses: vec!["10.0.0.1:8080".to_owned()],
            scaled_to_zero: false,
        }
    }

    #[test]
    fn a_cascade_enters_at_its_first_stage_and_skips_stages_that_cannot_serve() {
        let ep = cascade_endpoint();
        let all = BTreeMap::from([
            ("small".to_owned(), view(true)),
            ("medium".to_owned(), view(true)),
            ("large".to_owned(), view(true)),
        ]);
        let plan = plan([&ep], &all);
        let route = &plan.table.routes[0];
        assert_eq!(
            route.traffic,
            vec![WeightedBackend {
                backend: "small".to_owned(),
                weight: 100
            }]
        );
        let cascade = route.cascade.as_ref().expect("a cascade");
        let stages: Vec<(&str, Option<f64>)> = cascade
            .stages
            .iter()
            .map(|s| (s.to.name(), s.min_confidence))
            .collect();
        assert_eq!(
            stages,
            vec![
                ("small", Some(0.9)),
                ("medium", Some(0.95)),
                ("large", None)
            ]
        );
        assert!(plan.table.validate().is_ok());
        assert!(plan.table.backends.contains_key("large"));

        // The large stage is not Ready: medium becomes the last stage, answering everything
        // that reaches it; the status names the Backend.
        let mut some = all.clone();
        some.insert("large".to_owned(), view(false));
        let plan = plan_of(&ep, &some);
        let stages: Vec<(String, Option<f64>)> = plan.table.routes[0]
            .cascade
            .as_ref()
            .expect("a cascade")
            .stages
            .iter()
            .map(|s| (s.to.name().to_owned(), s.min_confidence))
            .collect();
        assert_eq!(
            stages,
            vec![("small".to_owned(), Some(0.9)), ("medium".to_owned(), None)]
        );
        assert_eq!(
            plan.outcomes["digits-cascade"].not_ready,
            vec!["large".to_owned()]
        );

        // Only the first stage serves: it answers everything.
        let mut first = all;
        first.remove("medium");
        first.remove("large");
        let plan = plan_of(&ep, &first);
        let stages = &plan.table.routes[0]
            .cascade
            .as_ref()
            .expect("a cascade")
            .stages;
        assert_eq!(stages.len(), 1);
        assert_eq!(stages[0].min_confidence, None);
        assert_eq!(
            plan.outcomes["digits-cascade"].missing,
            vec!["medium".to_owned(), "large".to_owned()]
        );
    }

    fn endpoint(name: &str, spec: serde_json::Value) -> Endpoint {
        let mut ep = Endpoint::new(name, serde_json::from_value(spec).expect("a valid spec"));
        ep.meta_mut().namespace = Some("models".to_owned());
        ep
    }

    /// The condition `type_` of the status planned for `ep`.
    fn condition(
        ep: &Endpoint,
        outcome: &Outcome,
        type_: &str,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        let status = status_for(ep, outcome, "http://r", true, Timestamp::UNIX_EPOCH);
        status
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .expect("the condition")
    }

    fn ready(names: &[&str]) -> BTreeMap<String, BackendView> {
        names
            .iter()
            .map(|n| ((*n).to_owned(), view(true)))
            .collect()
    }

    #[test]
    fn an_ensemble_and_a_sequence_are_planned_with_every_member_and_step() {
        let ens = endpoint(
            "vote",
            json!({"route": {"pathPrefix": "/vote"}, "ensemble": {
                "backends": ["a", "b", "c"], "output": "probabilities", "reduce": "Vote", "minResponses": 2}}),
        );
        let seq = endpoint(
            "pipe",
            json!({"route": {"pathPrefix": "/pipe"}, "sequence": {"steps": [
                {"backend": "pca"}, {"backend": "head", "inputs": {"X": "variable"}}]}}),
        );
        let plan = super::plan([&ens, &seq], &ready(&["a", "b", "c", "pca", "head"]));
        assert!(plan.table.validate().is_ok(), "{:?}", plan.table.validate());
        let vote = plan.table.route("vote").expect("routed");
        let e = vote.ensemble.as_ref().expect("an ensemble");
        assert_eq!(e.backends, ["a", "b", "c"]);
        assert_eq!((e.reduce, e.min_responses), (serval_api::Reduce::Vote, 2));
        let pipe = plan.table.route("pipe").expect("routed");
        let steps = &pipe.sequence.as_ref().expect("a sequence").steps;
        assert_eq!(steps[1].to, Hop::Backend("head".to_owned()));
        assert_eq!(steps[1].inputs["X"], "variable");
        assert!(plan.outcomes["vote"].serves && plan.outcomes["pipe"].serves);

        // Two members of three are enough for minResponses 2; one is not.
        let mut two = ready(&["a", "b", "pca"]);
        two.insert("c".to_owned(), view(false));
        let plan = super::plan([&ens, &seq], &two);
        assert!(plan.outcomes["vote"].serves);
        assert_eq!(plan.outcomes["vote"].not_ready, ["c"]);
        assert!(!plan.outcomes["pipe"].serves, "a sequence needs every step");
        assert_eq!(plan.outcomes["pipe"].missing, ["head"]);
        let plan = super::plan([&ens], &ready(&["a"]));
        assert!(!plan.outcomes["vote"].serves);
        let ready = condition(&ens, &plan.outcomes["vote"], READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason::NO_READY_BACKEND)
        );
    }

    #[test]
    fn a_stage_may_be_another_endpoint_and_a_circle_of_them_is_left_out() {
        // The cascade's second stage is an Endpoint with a split (so it can be rolled out).
        let split = endpoint(
            "large",
            json!({"route": {"pathPrefix": "/large"}, "traffic": [
                {"backend": "large-v1", "weight": 90}, {"backend": "large-v2", "weight": 10}]}),
        );
        let cascade = endpoint(
            "digits",
            json!({"route": {"pathPrefix": "/digits"}, "cascade": {"output": "p", "stages": [
                {"backend": "small", "minConfidence": 0.9}, {"endpoint": "large"}]}}),
        );
        let backends = ready(&["small", "large-v1", "large-v2"]);
        let plan = super::plan([&split, &cascade], &backends);
        assert!(plan.table.validate().is_ok());
        let stages = &plan
            .table
            .route("digits")
            .expect("routed")
            .cascade
            .as_ref()
            .expect("a cascade")
            .stages;
        assert_eq!(stages[1].to, Hop::Endpoint("large".to_owned()));
        assert!(plan.outcomes["digits"].serves);

        // The split has no ready Backend: the cascade skips that stage, and says why.
        let plan = super::plan([&split, &cascade], &ready(&["small"]));
        let stages = &plan
            .table
            .route("digits")
            .expect("routed")
            .cascade
            .as_ref()
            .expect("a cascade")
            .stages;
        assert_eq!(stages.len(), 1);

        // A sequence whose step is absent is left out, named in its status.
        let seq = endpoint(
            "pipe",
            json!({"route": {"pathPrefix": "/pipe"}, "sequence": {"steps": [
                {"backend": "small"}, {"endpoint": "ghost"}]}}),
        );
        let plan = super::plan([&seq], &backends);
        assert!(plan.table.route("pipe").is_none());
        assert_eq!(plan.outcomes["pipe"].missing_endpoints, ["ghost"]);
        let status = status_for(
            &seq,
            &plan.outcomes["pipe"],
            "http://r",
            true,
            Timestamp::UNIX_EPOCH,
        );
        let degraded = condition(&seq, &plan.outcomes["pipe"], DEGRADED);
        assert_eq!(degraded.reason, reason::ENDPOINT_NOT_FOUND);
        assert!(degraded.message.contains("ghost"), "{}", degraded.message);
        assert_eq!(status.url, None);

        // a -> b -> a: both left out with the circle in their status; c, which calls a, too.
        let a = endpoint(
            "a",
            json!({"route": {"pathPrefix": "/a"}, "sequence": {"steps": [{"backend": "small"}, {"endpoint": "b"}]}}),
        );
        let b = endpoint(
            "b",
            json!({"route": {"pathPrefix": "/b"}, "cascade": {"output": "p", "stages": [
                {"endpoint": "a", "minConfidence": 0.5}, {"backend": "small"}]}}),
        );
        let c = endpoint(
            "c",
            json!({"route": {"pathPrefix": "/c"}, "sequence": {"steps": [{"endpoint": "a"}, {"backend": "small"}]}}),
        );
        let plan = super::plan([&a, &b, &c, &split], &backends);
        assert!(plan.table.validate().is_ok(), "{:?}", plan.table.validate());
        let names: Vec<&str> = plan
            .table
            .routes
            .iter()
            .map(|r| r.endpoint.as_str())
            .collect();
        assert_eq!(names, ["large"]);
        assert_eq!(plan.outcomes["a"].cycle.as_deref(), Some("a -> b -> a"));
        assert_eq!(plan.outcomes["b"].cycle.as_deref(), Some("a -> b -> a"));
        assert_eq!(plan.outcomes["c"].missing_endpoints, ["a"]);
        let degraded = condition(&b, &plan.outcomes["b"], DEGRADED);
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", reason::CYCLE)
        );
        assert!(
            degraded.message.contains("a -> b -> a"),
            "{}",
            degraded.message
        );
    }

    fn plan_of(ep: &Endpoint, backends: &BTreeMap<String, BackendView>) -> Plan {
        plan([ep], backends)
    }
}
