//! The routing table for a namespace and each Endpoint's status, from Endpoints and Backends.
//!
//! Pure: the operator feeds it reflector stores and Service addresses; local mode feeds it
//! manifests and the ports of the sidecars it started.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt};
use serval_api::conditions::{DEGRADED, PROGRESSING, READY, reason};
use serval_api::routing::{
    CascadePlan, CascadeStep, HeaderMatch, MirrorPolicy, RetryPolicy, Route, RoutingTable,
    Upstream, WeightedBackend,
};
use serval_api::{Cascade, EffectiveTraffic, Endpoint, EndpointStatus, Mirror, TrafficTarget};

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
    /// Effective traffic per Backend in `traffic`.
    pub traffic: Vec<EffectiveTraffic>,
    /// Named Backends that do not exist.
    pub missing: Vec<String>,
    /// Named Backends that exist but are not Ready.
    pub not_ready: Vec<String>,
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

/// Plans the routing table of one namespace.
///
/// Route conflicts go to the Endpoint created first (then by name), so the winner never flips
/// when a later Endpoint appears. Backends that are missing or not Ready get weight 0, and
/// match rules or mirrors pointing at them are dropped, so no traffic is sent their way.
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
    let mut routes = Vec::new();
    let mut used = BTreeSet::new();
    let mut outcomes = BTreeMap::new();
    for ep in eps {
        let name = ep.name_any();
        let mut outcome = Outcome::default();
        if let Some(owner) = claimed.get(&route_key(ep)) {
            outcome.conflict_with = Some(owner.clone());
            outcomes.insert(name, outcome);
            continue;
        }
        claimed.insert(route_key(ep), name.clone());

        // A Backend at zero keeps its traffic: the router holds its requests meanwhile.
        let usable = |b: &str| backends.get(b).is_some_and(|v| v.ready || v.scaled_to_zero);
        let spec = &ep.spec;
        let (declared, mirror) = declared(ep);
        let mut named: Vec<&str> = declared.iter().map(|t| t.backend.as_str()).collect();
        named.extend(
            spec.cascade
                .iter()
                .flat_map(|c| c.stages.iter().skip(1).map(|s| s.backend.as_str())),
        );
        named.extend(mirror.iter().map(|m| m.backend.as_str()));
        named.extend(spec.matches.iter().map(|m| m.backend.as_str()));
        for b in named {
            let list = match backends.get(b) {
                None => &mut outcome.missing,
                Some(v) if !v.ready && !v.scaled_to_zero => &mut outcome.not_ready,
                Some(_) => continue,
            };
            if !list.iter().any(|x| x == b) {
                list.push(b.to_owned());
            }
        }

        let traffic: Vec<WeightedBackend> = declared
            .iter()
            .map(|t| WeightedBackend {
                backend: t.backend.clone(),
                weight: if usable(&t.backend) { t.weight } else { 0 },
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
                ready: usable(&t.backend),
            })
            .collect();

        let route = Route {
            endpoint: name.clone(),
            path_prefix: spec.route.path_prefix.clone(),
            host: spec.route.host.clone(),
            mirror: mirror
                .as_ref()
                .filter(|m| usable(&m.backend) && m.percent > 0)
                .map(|m| MirrorPolicy {
                    backend: m.backend.clone(),
                    percent: m.percent,
                    compare: m.compare.clone().unwrap_or_default(),
                }),
            matches: spec
                .matches
                .iter()
                .filter(|m| usable(&m.backend))
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
            cascade: spec.cascade.as_ref().and_then(|c| cascade_plan(c, &usable)),
            traffic,
        };
        // Every backend the route names needs an upstream entry, usable or not.
        used.extend(route.traffic.iter().map(|t| t.backend.clone()));
        used.extend(route.mirror.iter().map(|m| m.backend.clone()));
        used.extend(route.matches.iter().map(|m| m.backend.clone()));
        used.extend(
            route
                .cascade
                .iter()
                .flat_map(|c| c.stages.iter().map(|s| s.backend.clone())),
        );
        routes.push(route);
        outcomes.insert(name, outcome);
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
    if let Some(cascade) = &spec.cascade {
        // Every request enters at the first stage; the table's cascade holds the rest.
        let first = cascade.stages.first().map(|s| TrafficTarget {
            backend: s.backend.clone(),
            weight: 100,
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

/// The table's cascade: the stages after the first that can serve (a stage that is missing or
/// not Ready is skipped, so its rows go to the next one), the last answering whatever reaches
/// it. `None` when no later stage can serve: the first stage then answers everything.
fn cascade_plan(cascade: &Cascade, usable: &dyn Fn(&str) -> bool) -> Option<CascadePlan> {
    let (first, rest) = cascade.stages.split_first()?;
    let mut stages = vec![CascadeStep {
        backend: first.backend.clone(),
        min_confidence: first.min_confidence,
    }];
    stages.extend(
        rest.iter()
            .filter(|s| usable(&s.backend))
            .map(|s| CascadeStep {
                backend: s.backend.clone(),
                min_confidence: s.min_confidence,
            }),
    );
    if stages.len() < 2 {
        return None;
    }
    if let Some(last) = stages.last_mut() {
        last.min_confidence = None;
    }
    Some(CascadePlan {
        output: cascade.output.clone(),
        stages,
    })
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
    let serving = outcome.traffic.iter().any(|t| t.percent > 0);
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
    } else {
        let (degraded_reason, degraded_msg) = if !outcome.missing.is_empty() {
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
    let in_table = outcome.conflict_with.is_none();
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
            .map(|s| (s.backend.as_str(), s.min_confidence))
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
            .map(|s| (s.backend.clone(), s.min_confidence))
            .collect();
        assert_eq!(
            stages,
            vec![("small".to_owned(), Some(0.9)), ("medium".to_owned(), None)]
        );
        assert_eq!(
            plan.outcomes["digits-cascade"].not_ready,
            vec!["large".to_owned()]
        );

        // Only the first stage serves: a plain route to it.
        let mut first = all;
        first.remove("medium");
        first.remove("large");
        let plan = plan_of(&ep, &first);
        assert!(plan.table.routes[0].cascade.is_none());
        assert_eq!(
            plan.outcomes["digits-cascade"].missing,
            vec!["medium".to_owned(), "large".to_owned()]
        );
    }

    fn plan_of(ep: &Endpoint, backends: &BTreeMap<String, BackendView>) -> Plan {
        plan([ep], backends)
    }
}
