//! The routing table as the proxy uses it: compiled once per revision and swapped atomically,
//! so every request reads one whole table (an `Arc` snapshot) from start to finish.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use serval_api::Hop;
use serval_api::routing::RoutingTable;
use tower::retry::budget::{Budget, TpsBudget};

use crate::errors::{Error, Result};
use crate::matching::Matcher;
use crate::metrics::{
    BackendLabels, CascadeLabels, CodeLabels, Metrics, RouteCounters, RouteLabels, StageLabels,
};
use crate::split::Split;

/// A route's retry budget (tower's, as in Finagle and linkerd): retries may add at most a
/// share of recent requests plus a small floor, so retrying cannot multiply the load on a
/// backend that is already failing.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u32,
    budget: TpsBudget,
}

impl RetryBudget {
    /// `percent`% of the requests of the last `window` (1-60 s), and `min_per_window` always.
    pub fn new(percent: u32, min_per_window: u32, window: Duration) -> Self {
        let window = window.clamp(Duration::from_secs(1), Duration::from_secs(60));
        let min_per_sec = min_per_window.div_ceil(window.as_secs() as u32);
        Self {
            percent,
            budget: TpsBudget::new(window, min_per_sec, percent.min(1000) as f32 / 100.0),
        }
    }

    /// The configured percentage.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Counts a first attempt.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Takes one retry from the budget if there is one left.
    pub fn withdraw(&self) -> bool {
        self.budget.withdraw()
    }
}
use crate::upstream::{AddrState, BackendPool};

/// Settings that shape compiled tables.
#[derive(Debug, Clone, Copy)]
pub struct TableSettings {
    /// Retries always allowed per budget window.
    pub retry_min_per_window: u32,
    /// Retry budget window.
    pub retry_budget_window: Duration,
}

/// The metric series a request to one (endpoint, backend) pair updates, resolved once per
/// table: a per-request family lookup hashes the labels and takes the family's lock.
#[derive(Debug, Clone)]
pub struct RouteStats {
    /// `request_duration_seconds{endpoint, backend}`.
    pub duration: Histogram,
    /// `requests_total{endpoint, backend, code="200"}`, the common case; other codes go
    /// through the family.
    pub ok: Counter,
    /// The load signals' counters of the pair.
    pub signals: RouteCounters,
}

/// One route, ready to serve.
#[derive(Debug)]
pub struct CompiledRoute {
    /// Endpoint name.
    pub endpoint: String,
    /// Backends of the split, in the table's order.
    pub backends: Vec<Arc<BackendPool>>,
    /// The weighted split over `backends`.
    pub split: Split,
    /// Header rules, first match wins.
    pub matches: Vec<(HeaderName, String, Arc<BackendPool>)>,
    /// Header that pins a caller to a backend.
    pub sticky: Option<HeaderName>,
    /// Shadow traffic.
    pub mirror: Option<CompiledMirror>,
    /// Deadline for the upstream's response head.
    pub timeout: Duration,
    /// Extra attempts allowed.
    pub retry_attempts: u32,
    /// Shared retry budget; survives reloads that keep the percentage.
    pub budget: Arc<RetryBudget>,
    /// Metric series per backend the route can answer from (split and header rules).
    pub stats: Vec<(Arc<BackendPool>, RouteStats)>,
    /// The backend that answers for the Endpoint as a whole (model metadata): the usable one
    /// with the largest weight, the first listed on a tie.
    pub primary: Option<Arc<BackendPool>>,
    /// The Endpoint's name as the value of [`serval_api::routing::ENDPOINT_HEADER`].
    pub endpoint_header: Option<HeaderValue>,
    /// A cascade, an ensemble or a sequence: requests go through it instead of the split.
    pub composition: Option<Composition>,
}

/// How a composed route answers.
#[derive(Debug)]
pub enum Composition {
    /// Rows a stage is unsure of go on to the next.
    Cascade(CompiledCascade),
    /// Every member answers; the answers are reduced.
    Ensemble(CompiledEnsemble),
    /// Each step's outputs are the next one's inputs.
    Sequence(CompiledSequence),
}

/// Where a composition sends one call.
#[derive(Debug, Clone)]
pub enum CompiledHop {
    /// A Backend's replicas.
    Pool(Arc<BackendPool>),
    /// Another route of the table (an index into [`CompiledTable::routes`]): its own policy
    /// chooses.
    Route(usize),
}

/// One call of a composition: where it goes and its series.
#[derive(Debug)]
pub struct Stage {
    /// Where.
    pub hop: CompiledHop,
    /// The Backend's or Endpoint's name, as the metrics' `stage` label.
    pub name: String,
    /// `composition_stage_duration_seconds{endpoint, stage}`: calls and their latency.
    pub duration: Histogram,
    /// `composition_stage_failures_total{endpoint, stage}`: calls that failed (no answer in
    /// time, an error status, an unreadable answer).
    pub failures: Counter,
}

/// A route's cascade.
#[derive(Debug)]
pub struct CompiledCascade {
    /// The output whose per-row maximum is a row's confidence.
    pub output: String,
    /// Every stage in order with its threshold (`None` on the last, which answers all).
    pub stages: Vec<(Stage, Option<f64>)>,
    /// Rows answered and escalated, per stage: `cascade_rows_total{endpoint, backend, outcome}`.
    pub rows: Vec<(Counter, Counter)>,
}

/// A route's ensemble.
#[derive(Debug)]
pub struct CompiledEnsemble {
    /// Members in order (Backends).
    pub members: Vec<Stage>,
    /// The output reduced.
    pub output: String,
    /// How.
    pub reduce: serval_api::Reduce,
    /// Answers needed.
    pub min_responses: usize,
}

/// A route's sequence.
#[derive(Debug)]
pub struct CompiledSequence {
    /// Steps in order, each with its `{input: output}` mapping.
    pub steps: Vec<(Stage, std::collections::BTreeMap<String, String>)>,
}

/// A route's shadow traffic.
#[derive(Debug)]
pub struct CompiledMirror {
    /// The shadow backend.
    pub pool: Arc<BackendPool>,
    /// Share of requests copied, 1–100.
    pub percent: u32,
    /// How its answers are compared.
    pub compare: Arc<serval_api::MirrorCompare>,
}

impl CompiledRoute {
    /// The pre-resolved series for `pool`, if it is one of this route's backends.
    pub fn stats_for(&self, pool: &BackendPool) -> Option<&RouteStats> {
        self.stats
            .iter()
            .find(|(p, _)| std::ptr::eq(Arc::as_ptr(p), pool))
            .map(|(_, s)| s)
    }

    /// The backend for a request: a header rule, else the sticky hash, else the weighted split.
    pub fn choose(&self, headers: &HeaderMap) -> Option<&Arc<BackendPool>> {
        if let Some(ruled) = self.ruled(headers) {
            return ruled;
        }
        let sticky_key = self
            .sticky
            .as_ref()
            .and_then(|h| headers.get(h))
            .map(|v| v.as_bytes());
        let idx = match sticky_key {
            Some(key) => self.split.pick_sticky(key),
            None => self.split.pick_weighted(rand::random()),
        }?;
        self.backends.get(idx)
    }

    /// The backend answering for the Endpoint as a whole: a header rule's, else the primary.
    pub fn choose_primary(&self, headers: &HeaderMap) -> Option<&Arc<BackendPool>> {
        self.ruled(headers).unwrap_or(self.primary.as_ref())
    }

    /// Whether the Endpoint can answer at all.
    pub fn has_ready_backend(&self) -> bool {
        self.primary.is_some()
    }

    /// The first header rule the request matches, with its backend if usable.
    fn ruled(&self, headers: &HeaderMap) -> Option<Option<&Arc<BackendPool>>> {
        self.matches
            .iter()
            .find(|(name, value, _)| {
                headers
                    .get(name)
                    .is_some_and(|v| v.as_bytes() == value.as_bytes())
            })
            .map(|(_, _, pool)| pool.is_usable().then_some(pool))
    }
}

/// A validated, compiled table.
#[derive(Debug)]
pub struct CompiledTable {
    /// The document it came from.
    pub table: RoutingTable,
    /// Its revision (computed when the document carries none).
    pub revision: String,
    /// Route lookup.
    pub matcher: Matcher,
    /// Routes in table order.
    pub routes: Vec<CompiledRoute>,
    pools: HashMap<String, Arc<BackendPool>>,
}

impl CompiledTable {
    /// Whether a route can answer now: a usable Backend for its split, or what its
    /// composition needs (a cascade's first stage, an ensemble's `minResponses` members,
    /// every step of a sequence), through the Endpoints it calls.
    pub fn ready(&self, route: &CompiledRoute) -> bool {
        // Validated tables have no cycle; the depth bound guards a table built otherwise.
        self.ready_within(route, self.routes.len())
    }

    fn ready_within(&self, route: &CompiledRoute, depth: usize) -> bool {
        let hop = |h: &CompiledHop| match h {
            CompiledHop::Pool(p) => p.is_usable(),
            CompiledHop::Route(i) => {
                depth > 0
                    && self
                        .routes
                        .get(*i)
                        .is_some_and(|r| self.ready_within(r, depth - 1))
            }
        };
        match &route.composition {
            None => route.has_ready_backend(),
            Some(Composition::Cascade(c)) => c.stages.first().is_some_and(|(s, _)| hop(&s.hop)),
            Some(Composition::Ensemble(e)) => {
                e.members.iter().filter(|m| hop(&m.hop)).count() >= e.min_responses
            }
            Some(Composition::Sequence(q)) => q.steps.iter().all(|(s, _)| hop(&s.hop)),
        }
    }

    /// The backend named `name`, if the table has it.
    pub fn pool(&self, name: &str) -> Option<&Arc<BackendPool>> {
        self.pools.get(name)
    }

    /// The load signals of this table's routes and backends (see [`serval_api::signals`]).
    pub fn signals(&self, metrics: &Metrics) -> serval_api::signals::RouterSignals {
        let routes = self
            .routes
            .iter()
            .flat_map(|r| {
                r.stats
                    .iter()
                    .map(|(pool, stats)| stats.signals.snapshot(&r.endpoint, &pool.name))
            })
            .collect();
        let mut backends: Vec<_> = self
            .pools
            .values()
            .map(|p| serval_api::signals::BackendSignals {
                backend: p.name.clone(),
                replicas: p.addrs.len() as u64,
                inflight: p.addrs.iter().map(|a| a.inflight() as u64).sum(),
                ejected: p.ejected() as u64,
                held: held_now(metrics, &p.name),
                scaled_to_zero: p.scaled_to_zero,
            })
            .collect();
        backends.sort_by(|a, b| a.backend.cmp(&b.backend));
        let mirrors = self
            .routes
            .iter()
            .filter_map(|r| {
                let m = r.mirror.as_ref()?;
                Some(crate::mirror::signals(metrics, &r.endpoint, &m.pool.name))
            })
            .collect();
        serval_api::signals::RouterSignals {
            revision: self.revision.clone(),
            mirrors,
            routes,
            backends,
        }
    }

    /// Compiles `table`, carrying address health and retry budgets over from `previous`.
    pub fn compile(
        table: RoutingTable,
        previous: Option<&CompiledTable>,
        settings: TableSettings,
        metrics: &Metrics,
    ) -> Result<Self> {
        table.validate()?;
        let mut pools = HashMap::new();
        for (name, up) in &table.backends {
            let old = previous.and_then(|p| p.pools.get(name));
            let addrs = up
                .addresses
                .iter()
                .map(|a| {
                    old.and_then(|o| o.addrs.iter().find(|s| &s.address == a).cloned())
                        .unwrap_or_else(|| Arc::new(AddrState::new(a)))
                })
                .collect();
            let mut pool = BackendPool::new(name, &up.model, addrs);
            pool.scaled_to_zero = up.scaled_to_zero;
            pools.insert(name.clone(), Arc::new(pool));
        }
        // Validation guarantees every referenced backend has an entry.
        let pool = |name: &str, endpoint: &str| {
            pools.get(name).cloned().ok_or_else(|| {
                Error::TableCompile(format!("route {endpoint:?}: backend {name:?} missing"))
            })
        };
        let header = |h: &str, endpoint: &str| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                Error::TableCompile(format!("route {endpoint:?}: {h:?} is not a header name"))
            })
        };
        // Routes are compiled in the table's order: a hop to an Endpoint is its index.
        let index: HashMap<&str, usize> = table
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| (r.endpoint.as_str(), i))
            .collect();
        let stage = |to: &Hop<String>, endpoint: &str| -> Result<Stage> {
            let hop = match to {
                Hop::Backend(b) => CompiledHop::Pool(pool(b, endpoint)?),
                Hop::Endpoint(e) => {
                    CompiledHop::Route(*index.get(e.as_str()).ok_or_else(|| {
                        Error::TableCompile(format!("route {endpoint:?}: endpoint {e:?} missing"))
                    })?)
                }
            };
            let labels = StageLabels {
                endpoint: endpoint.to_owned(),
                stage: to.name().to_owned(),
            };
            Ok(Stage {
                hop,
                name: to.name().to_owned(),
                duration: metrics.stage_duration.get_or_create(&labels).clone(),
                failures: metrics.stage_failures.get_or_create(&labels).clone(),
            })
        };
        let mut routes = Vec::with_capacity(table.routes.len());
        for r in &table.routes {
            let e = r.endpoint.as_str();
            let backends = r
                .traffic
                .iter()
                .map(|t| pool(&t.backend, e))
                .collect::<Result<Vec<_>>>()?;
            let split = Split::new(
                r.traffic
                    .iter()
                    .zip(&backends)
                    .map(|(t, p)| (t.backend.as_str(), t.weight, p.is_usable())),
            );
            let matches = r
                .matches
                .iter()
                .map(|m| Ok((header(&m.header, e)?, m.value.clone(), pool(&m.backend, e)?)))
                .collect::<Result<Vec<_>>>()?;
            let sticky = r
                .sticky_header
                .as_deref()
                .map(|h| header(h, e))
                .transpose()?;
            let mirror = match &r.mirror {
                Some(m) if m.percent > 0 => Some(CompiledMirror {
                    pool: pool(&m.backend, e)?,
                    percent: m.percent,
                    compare: Arc::new(m.compare.clone()),
                }),
                _ => None,
            };
            let percent = r.retries.budget_percent;
            let budget = previous
                .and_then(|p| p.routes.iter().find(|o| o.endpoint == r.endpoint))
                .map(|o| o.budget.clone())
                .filter(|b| b.percent() == percent)
                .unwrap_or_else(|| {
                    Arc::new(RetryBudget::new(
                        percent,
                        settings.retry_min_per_window,
                        settings.retry_budget_window,
                    ))
                });
            let mut stats: Vec<(Arc<BackendPool>, RouteStats)> = Vec::new();
            for p in backends.iter().chain(matches.iter().map(|m| &m.2)) {
                if stats.iter().any(|(q, _)| Arc::ptr_eq(p, q)) {
                    continue;
                }
                let (endpoint, backend) = (r.endpoint.clone(), p.name.clone());
                let ok = CodeLabels {
                    endpoint: endpoint.clone(),
                    backend: backend.clone(),
                    code: 200,
                };
                let route = RouteLabels { endpoint, backend };
                let s = RouteStats {
                    duration: metrics.request_duration.get_or_create(&route).clone(),
                    ok: metrics.requests.get_or_create(&ok).clone(),
                    signals: metrics.signals.get_or_create(&route).clone(),
                };
                stats.push((p.clone(), s));
            }
            let primary = r
                .traffic
                .iter()
                .zip(&backends)
                .filter(|(t, p)| t.weight > 0 && p.is_usable())
                .fold(
                    None,
                    |best: Option<(u32, &Arc<BackendPool>)>, (t, p)| match best {
                        Some((w, _)) if w >= t.weight => best,
                        _ => Some((t.weight, p)),
                    },
                )
                .map(|(_, p)| p.clone());
            let composition = if let Some(c) = &r.cascade {
                Some(Composition::Cascade(CompiledCascade {
                    output: c.output.clone(),
                    stages: c
                        .stages
                        .iter()
                        .map(|s| Ok((stage(&s.to, e)?, s.min_confidence)))
                        .collect::<Result<Vec<_>>>()?,
                    rows: c
                        .stages
                        .iter()
                        .map(|s| {
                            let series = |outcome: &'static str| {
                                metrics
                                    .cascade_rows
                                    .get_or_create(&CascadeLabels {
                                        endpoint: r.endpoint.clone(),
                                        backend: s.to.name().to_owned(),
                                        outcome,
                                    })
                                    .clone()
                            };
                            (series("answered"), series("escalated"))
                        })
                        .collect(),
                }))
            } else if let Some(en) = &r.ensemble {
                Some(Composition::Ensemble(CompiledEnsemble {
                    members: en
                        .backends
                        .iter()
                        .map(|b| stage(&Hop::Backend(b.clone()), e))
                        .collect::<Result<Vec<_>>>()?,
                    output: en.output.clone(),
                    reduce: en.reduce,
                    min_responses: en.min_responses as usize,
                }))
            } else if let Some(q) = &r.sequence {
                Some(Composition::Sequence(CompiledSequence {
                    steps: q
                        .steps
                        .iter()
                        .map(|s| Ok((stage(&s.to, e)?, s.inputs.clone())))
                        .collect::<Result<Vec<_>>>()?,
                }))
            } else {
                None
            };
            routes.push(CompiledRoute {
                composition,
                primary,
                endpoint_header: HeaderValue::from_str(&r.endpoint).ok(),
                endpoint: r.endpoint.clone(),
                backends,
                split,
                matches,
                sticky,
                mirror,
                timeout: Duration::from_millis(r.timeout_ms),
                retry_attempts: r.retries.attempts,
                budget,
                stats,
            });
        }
        let matcher = Matcher::new(table.routes.iter().map(|r| {
            (
                r.endpoint.as_str(),
                r.path_prefix.as_str(),
                r.host.as_deref(),
            )
        }));
        let revision = if table.revision.is_empty() {
            table.clone().seal().revision
        } else {
            table.revision.clone()
        };
        Ok(Self {
            table,
            revision,
            matcher,
            routes,
            pools,
        })
    }
}

/// What [`TableStore::apply_json`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Same content as the table being served.
    Unchanged,
    /// Swapped in this revision.
    Swapped(String),
}

/// Requests held now for `backend` (see [`TableStore::subscribe`]).
fn held_now(metrics: &Metrics, backend: &str) -> u64 {
    let labels = BackendLabels {
        backend: backend.to_owned(),
    };
    u64::try_from(metrics.held.get_or_create(&labels).get()).unwrap_or(0)
}

/// Holds the table being served.
#[derive(Debug)]
pub struct TableStore {
    current: ArcSwapOption<CompiledTable>,
    /// Bumped at each swap: requests held for a Backend scaled to zero wait on it.
    swaps: tokio::sync::watch::Sender<u64>,
    metrics: Arc<Metrics>,
    settings: TableSettings,
    // Serialises writers (file poller, kube watch) so compile-from-previous sees the latest.
    apply_lock: Mutex<()>,
}

impl TableStore {
    /// An empty store: not ready until a table is applied.
    pub fn new(metrics: Arc<Metrics>, settings: TableSettings) -> Self {
        Self {
            current: ArcSwapOption::empty(),
            swaps: tokio::sync::watch::Sender::new(0),
            metrics,
            settings,
            apply_lock: Mutex::new(()),
        }
    }

    /// Wakes at every table swap.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.swaps.subscribe()
    }

    /// The table being served, if any. One load per request keeps the request on one table.
    pub fn load(&self) -> Option<Arc<CompiledTable>> {
        self.current.load_full()
    }

    /// Parses, validates and swaps in a table; on error the current one stays, and the refusal
    /// is logged and counted.
    pub fn apply_json(&self, bytes: &[u8]) -> Result<Applied> {
        let res = self.try_apply(bytes);
        if let Err(e) = &res {
            self.metrics.table_rejections.inc();
            let serving = self.load().map(|t| t.revision.clone()).unwrap_or_default();
            tracing::error!(error = %e, serving = %serving, "routing table refused; keeping the current one");
        }
        res
    }

    /// Counts and logs a table refused before parsing (e.g. a ConfigMap without the key).
    pub fn refuse(&self, reason: &str) {
        self.metrics.table_rejections.inc();
        tracing::error!(reason, "routing table refused; keeping the current one");
    }

    fn try_apply(&self, bytes: &[u8]) -> Result<Applied> {
        let table = RoutingTable::from_json(bytes)?;
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.load();
        if previous.as_ref().is_some_and(|p| p.table == table) {
            return Ok(Applied::Unchanged);
        }
        let compiled =
            CompiledTable::compile(table, previous.as_deref(), self.settings, &self.metrics)?;
        let revision = compiled.revision.clone();
        self.current.store(Some(Arc::new(compiled)));
        self.swaps.send_modify(|n| *n += 1);
        self.metrics.table_reloads.inc();
        self.metrics
            .set_revision(previous.as_ref().map(|p| p.revision.as_str()), &revision);
        tracing::info!(%revision, "routing table applied");
        Ok(Applied::Swapped(revision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: TableSettings = TableSettings {
        retry_min_per_window: 1,
        retry_budget_window: Duration::from_secs(1),
    };

    fn json(w1: u32, w2: u32) -> String {
        format!(
            r#"{{"apiVersion":"serval.dev/routing/v1","routes":[{{"endpoint":"e","pathPrefix":"/e",
            "traffic":[{{"backend":"a","weight":{w1}}},{{"backend":"b","weight":{w2}}}],
            "matches":[{{"header":"x-canary","value":"1","backend":"b"}}],"stickyHeader":"x-user",
            "timeoutMs":1000,"retries":{{"attempts":1,"budgetPercent":20}}}}],
            "backends":{{"a":{{"model":"a","addresses":["127.0.0.1:1"],"ready":true}},
                         "b":{{"model":"b","addresses":["127.0.0.1:2"],"ready":true}}}}}}"#
        )
    }

    #[test]
    fn applies_keeps_state_and_refuses_bad_tables() {
        let m = Arc::new(Metrics::new());
        let store = TableStore::new(m.clone(), SETTINGS);
        assert!(store.load().is_none());
        assert!(matches!(
            store.apply_json(json(100, 0).as_bytes()),
            Ok(Applied::Swapped(_))
        ));
        assert_eq!(
            store.apply_json(json(100, 0).as_bytes()).unwrap(),
            Applied::Unchanged
        );
        let first = store.load().unwrap();
        assert!(store.apply_json(b"{not json").is_err());
        assert!(
            store.apply_json(json(101, 0).as_bytes()).is_err(),
            "weight over 100"
        );
        assert!(
            store
                .apply_json(json(1, 0).replace("x-user", "bad header").as_bytes())
                .is_err()
        );
        assert_eq!(
            store.load().unwrap().revision,
            first.revision,
            "old table stays"
        );
        assert!(
            m.encode()
                .contains("serval_router_table_rejections_total 3")
        );
        store.apply_json(json(50, 50).as_bytes()).unwrap();
        let second = store.load().unwrap();
        assert!(Arc::ptr_eq(
            &first.routes[0].budget,
            &second.routes[0].budget
        ));
        assert!(Arc::ptr_eq(
            &first.routes[0].backends[0].addrs[0],
            &second.routes[0].backends[0].addrs[0]
        ));
    }

    #[test]
    fn choose_by_match_sticky_and_split() {
        let store = TableStore::new(Arc::new(Metrics::new()), SETTINGS);
        store.apply_json(json(100, 0).as_bytes()).unwrap();
        let t = store.load().unwrap();
        let r = &t.routes[0];
        let mut h = HeaderMap::new();
        assert_eq!(r.choose(&h).unwrap().name, "a");
        h.insert("x-user", "u1".parse().unwrap());
        assert_eq!(
            r.choose(&h).unwrap().name,
            "a",
            "sticky never picks weight 0"
        );
        h.insert("x-canary", "1".parse().unwrap());
        assert_eq!(r.choose(&h).unwrap().name, "b", "header rule overrides");
    }

    #[test]
    fn the_primary_is_the_heaviest_usable_backend_whatever_the_split_draws() {
        let store = TableStore::new(Arc::new(Metrics::new()), SETTINGS);
        store.apply_json(json(70, 30).as_bytes()).unwrap();
        let t = store.load().unwrap();
        let r = &t.routes[0];
        let none = HeaderMap::new();
        for _ in 0..50 {
            assert_eq!(r.choose_primary(&none).unwrap().name, "a");
        }
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        assert_eq!(r.choose_primary(&canary).unwrap().name, "b");
        // A tie goes to the first listed.
        store.apply_json(json(50, 50).as_bytes()).unwrap();
        let t = store.load().unwrap();
        assert_eq!(t.routes[0].choose_primary(&none).unwrap().name, "a");
        store.apply_json(json(0, 0).as_bytes()).unwrap();
        let t = store.load().unwrap();
        assert!(!t.routes[0].has_ready_backend());
    }

    #[test]
    fn the_retry_budget_is_a_share_of_requests_plus_a_floor() {
        let b = RetryBudget::new(20, 2, Duration::from_secs(1));
        assert!(b.withdraw() && b.withdraw(), "the floor allows two");
        assert!(!b.withdraw());
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20, "20% of 100 requests");
    }
}
