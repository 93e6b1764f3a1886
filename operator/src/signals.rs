//! Where the operator's autoscaler reads load: a [`SignalSource`] answers, per autoscaled
//! Backend, how much was in flight over the last interval and how many requests the routers
//! hold.
//!
//! [`HttpSignals`] reads the model servers' and routers' `/-/signals` snapshots on their admin
//! ports, at the pod addresses EndpointSlices list (no Prometheus, no metrics pipeline).
//! [`FileSignals`] reads a JSON file instead: the "test signal source" that lets the end-to-end
//! suite drive the real control plane with load it scripts (its nodes run no containers).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use serde::Deserialize;
use serval_api::backend::SIDECAR_ADMIN_PORT;
use serval_api::signals::{RouterSignals, SIGNALS_PATH, SidecarSignals};
use serval_autoscale::{Snapshot, sample};

use crate::desired::router::{ROUTER_ADMIN_PORT, ROUTER_NAME};
use crate::metrics::Metrics;

/// Bound on reading one snapshot: a pod that does not answer within it is left out of that
/// sample, which is still taken within its interval.
pub const DEFAULT_SIGNALS_TIMEOUT: Duration = Duration::from_millis(300);
/// Snapshots read at once: bounds the operator's sockets and CPU per round whatever the
/// number of replicas (a round of 1,000 pods at 5 ms each still fits in a second).
pub const DEFAULT_SIGNALS_CONCURRENCY: usize = 64;
/// Largest snapshot accepted: a router's lists one entry per route and Backend.
const MAX_SIGNALS_BYTES: usize = 4 << 20;
/// Label the EndpointSlice controller sets to the Service a slice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Backend, by namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl std::fmt::Display for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One Backend's load since the source was last asked for it.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Load {
    /// Mean requests in flight over the interval, summed over the replicas, plus the requests
    /// the routers hold now.
    pub inflight: f64,
    /// Requests answered over the interval plus those held now.
    pub requests: u64,
}

/// Reads the load of autoscaled Backends.
pub trait SignalSource: Send + Sync {
    /// The load of each of `backends` since the previous call. A Backend left out of the
    /// answer has no data this time (its replicas did not answer): the decision then keeps its
    /// replicas rather than act on an outage.
    fn load<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, Load>>;

    /// Requests the routers hold now for each of `backends` (Backends at zero), read more
    /// often than [`SignalSource::load`] so that a held request starts a replica at once.
    fn held<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, u64>>;

    /// The snapshot of each router of `namespace`, by router (pod) name; a router that does
    /// not answer is left out.
    fn routers<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, BTreeMap<String, RouterSignals>>;
}

/// The model servers' and routers' `/-/signals`, at the addresses their Services'
/// EndpointSlices list as serving (terminating pods still draining included: their load is
/// real).
pub struct HttpSignals {
    slices: Store<EndpointSlice>,
    client: Client<HttpConnector, Empty<Bytes>>,
    sidecar_port: u16,
    router_port: u16,
    metrics: Metrics,
    previous: Mutex<HashMap<BackendKey, BTreeMap<String, Snapshot>>>,
}

impl HttpSignals {
    /// Reads at the pods of `slices` (a reflector over the operator's EndpointSlices), on the
    /// model servers' and routers' admin ports.
    pub fn new(slices: Store<EndpointSlice>, metrics: Metrics) -> Self {
        Self::with_ports(slices, metrics, SIDECAR_ADMIN_PORT, ROUTER_ADMIN_PORT)
    }

    /// Reads at other ports than the admin ports (tests).
    pub fn with_ports(
        slices: Store<EndpointSlice>,
        metrics: Metrics,
        sidecar_port: u16,
        router_port: u16,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(DEFAULT_SIGNALS_TIMEOUT));
        connector.set_nodelay(true);
        Self {
            slices,
            client: Client::builder(TokioExecutor::new()).build(connector),
            sidecar_port,
            router_port,
            metrics,
            previous: Mutex::default(),
        }
    }

    /// `(pod, address)` of each serving endpoint of `service` in `namespace`.
    fn serving(&self, namespace: &str, service: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for slice in self.slices.state() {
            if slice.namespace().as_deref() != Some(namespace)
                || slice.labels().get(SERVICE_NAME_LABEL).map(String::as_str) != Some(service)
            {
                continue;
            }
            for ep in slice.endpoints.iter().flatten() {
                let serving = ep
                    .conditions
                    .as_ref()
                    .and_then(|c| c.serving.or(c.ready))
                    .unwrap_or(true);
                let Some(address) = ep.addresses.first() else {
                    continue;
                };
                if serving {
                    let pod = ep
                        .target_ref
                        .as_ref()
                        .and_then(|r| r.name.clone())
                        .unwrap_or_else(|| address.clone());
                    out.push((pod, address.clone()));
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, address: &str, port: u16) -> Option<T> {
        let host = if address.contains(':') {
            format!("[{address}]") // IPv6
        } else {
            address.to_owned()
        };
        let uri: http::Uri = format!("http://{host}:{port}{SIGNALS_PATH}").parse().ok()?;
        let read = async {
            let resp = self.client.get(uri).await.ok()?;
            if !resp.status().is_success() {
                return None;
            }
            let body = Limited::new(resp.into_body(), MAX_SIGNALS_BYTES)
                .collect()
                .await
                .ok()?
                .to_bytes();
            serde_json::from_slice(&body).ok()
        };
        let got = tokio::time::timeout(DEFAULT_SIGNALS_TIMEOUT, read)
            .await
            .ok()
            .flatten();
        if got.is_none() {
            self.metrics.autoscaler_signal_failures.inc();
        }
        got
    }

    /// Requests held now per Backend, summed over the routers of each namespace of
    /// `backends`.
    /// `(namespace, router pod, snapshot)` of every answering router of `namespaces`.
    async fn read_routers(&self, namespaces: &[&str]) -> Vec<(String, String, RouterSignals)> {
        let routers: Vec<(String, String, String)> = namespaces
            .iter()
            .flat_map(|ns| {
                self.serving(ns, ROUTER_NAME)
                    .into_iter()
                    .map(|(pod, addr)| ((*ns).to_owned(), pod, addr))
            })
            .collect();
        futures::stream::iter(routers)
            .map(|(ns, pod, addr)| async move {
                let got = self.get(&addr, self.router_port).await;
                got.map(|s| (ns, pod, s))
            })
            .buffer_unordered(DEFAULT_SIGNALS_CONCURRENCY)
            .filter_map(|x| async move { x })
            .collect()
            .await
    }

    async fn read_held(&self, backends: &[BackendKey]) -> HashMap<BackendKey, u64> {
        let mut namespaces: Vec<&str> = backends.iter().map(|b| b.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        let answers = self.read_routers(&namespaces).await;
        let mut held = HashMap::new();
        for (namespace, _, signals) in answers {
            for b in signals.backends {
                let key = BackendKey {
                    namespace: namespace.clone(),
                    name: b.backend,
                };
                *held.entry(key).or_insert(0) += b.held;
            }
        }
        held
    }
}

impl SignalSource for HttpSignals {
    fn load<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, Load>> {
        async move {
            let started = Instant::now();
            let reads: Vec<(BackendKey, String, String)> = backends
                .iter()
                .flat_map(|key| {
                    self.serving(&key.namespace, &key.name)
                        .into_iter()
                        .map(move |(pod, addr)| (key.clone(), pod, addr))
                })
                .collect();
            let mut expected: HashMap<BackendKey, usize> = HashMap::new();
            for (key, _, _) in &reads {
                *expected.entry(key.clone()).or_default() += 1;
            }
            let replicas = futures::stream::iter(reads)
                .map(|(key, pod, addr)| async move {
                    let signals = self.get::<SidecarSignals>(&addr, self.sidecar_port).await;
                    (key, pod, signals.map(|s| (Instant::now(), s)))
                })
                .buffer_unordered(DEFAULT_SIGNALS_CONCURRENCY)
                .collect::<Vec<_>>();
            let (replicas, held) = futures::join!(replicas, self.read_held(backends));

            let mut now: HashMap<BackendKey, BTreeMap<String, Snapshot>> = HashMap::new();
            for (key, pod, answer) in replicas {
                if let Some((at, signals)) = answer {
                    now.entry(key)
                        .or_default()
                        .insert(pod, Snapshot { at, signals });
                }
            }
            let mut previous = self
                .previous
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut out = BTreeMap::new();
            for key in backends {
                let snapshots = now.remove(key).unwrap_or_default();
                // Replicas exist but none answered: no data, rather than a false idle.
                if expected.get(key).copied().unwrap_or(0) > 0 && snapshots.is_empty() {
                    continue;
                }
                let held = held.get(key).copied().unwrap_or(0);
                let before = previous.get(key).cloned().unwrap_or_default();
                let s = sample(&before, &snapshots, held, Duration::ZERO);
                previous.insert(key.clone(), snapshots);
                out.insert(
                    key.clone(),
                    Load {
                        inflight: s.inflight,
                        requests: s.requests,
                    },
                );
            }
            previous.retain(|k, _| backends.contains(k));
            self.metrics
                .autoscaler_sample_duration
                .observe(started.elapsed().as_secs_f64());
            out
        }
        .boxed()
    }

    fn held<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, u64>> {
        async move {
            let held = self.read_held(backends).await;
            backends
                .iter()
                .map(|k| (k.clone(), held.get(k).copied().unwrap_or(0)))
                .collect()
        }
        .boxed()
    }

    fn routers<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, BTreeMap<String, RouterSignals>> {
        async move {
            self.read_routers(&[namespace])
                .await
                .into_iter()
                .map(|(_, pod, s)| (pod, s))
                .collect()
        }
        .boxed()
    }
}

/// One Backend's entry in a [`FileSignals`] file.
#[derive(Deserialize, Clone, Copy, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileLoad {
    /// Mean requests in flight over the interval, summed over replicas.
    #[serde(default)]
    pub inflight: f64,
    /// Requests answered over the interval.
    #[serde(default)]
    pub requests: u64,
    /// Requests the routers hold now.
    #[serde(default)]
    pub held: u64,
}

/// Signals scripted in a JSON file, read on every call, for tests (the operator's
/// `--signals-file`) where pods run no model server or router:
/// `{"backends": {"<namespace>/<backend>": {"inflight": 12.5, "requests": 40, "held": 0}},
///   "routers": {"<namespace>": <a router's /-/signals snapshot>}}`.
/// A Backend not in the file has no data; a namespace not in it has no router.
pub struct FileSignals {
    path: PathBuf,
}

/// The [`FileSignals`] file.
#[derive(Deserialize, Debug, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignalsFile {
    /// Load per `<namespace>/<backend>`.
    #[serde(default)]
    pub backends: HashMap<String, FileLoad>,
    /// One router's snapshot per namespace.
    #[serde(default)]
    pub routers: HashMap<String, RouterSignals>,
}

impl FileSignals {
    /// Reads `path` on every call.
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    async fn file(&self) -> SignalsFile {
        let parsed = match tokio::fs::read(&self.path).await {
            Ok(bytes) => serde_json::from_slice::<SignalsFile>(&bytes).map_err(|e| e.to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SignalsFile::default()),
            Err(e) => Err(e.to_string()),
        };
        parsed.unwrap_or_else(|error| {
            tracing::warn!(path = %self.path.display(), %error, "unreadable signals file");
            SignalsFile::default()
        })
    }

    async fn read(&self, backends: &[BackendKey]) -> BTreeMap<BackendKey, FileLoad> {
        let all = self.file().await.backends;
        backends
            .iter()
            .filter_map(|k| Some((k.clone(), *all.get(&k.to_string())?)))
            .collect()
    }
}

impl SignalSource for FileSignals {
    fn load<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, Load>> {
        async move {
            self.read(backends)
                .await
                .into_iter()
                .map(|(k, f)| {
                    let load = Load {
                        inflight: f.inflight + f.held as f64,
                        requests: f.requests + f.held,
                    };
                    (k, load)
                })
                .collect()
        }
        .boxed()
    }

    fn held<'a>(&'a self, backends: &'a [BackendKey]) -> BoxFuture<'a, BTreeMap<BackendKey, u64>> {
        async move {
            self.read(backends)
                .await
                .into_iter()
                .map(|(k, f)| (k, f.held))
                .collect()
        }
        .boxed()
    }

    fn routers<'a>(&'a self, namespace: &'a str) -> BoxFuture<'a, BTreeMap<String, RouterSignals>> {
        async move {
            let mut file = self.file().await;
            file.routers
                .remove(namespace)
                .map(|s| ("file".to_owned(), s))
                .into_iter()
                .collect()
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use kube::runtime::reflector;
    use kube::runtime::watcher;
    use prometheus_client::registry::Registry;
    use std::net::{IpAddr, SocketAddr};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Serves `body()` as JSON at every request on `ip`, port `port` (0: any); returns the port.
    async fn serve(ip: &str, port: u16, body: Arc<dyn Fn() -> String + Send + Sync>) -> u16 {
        let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("{e}"));
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port))
            .await
            .unwrap_or_else(|e| panic!("binding {ip}:{port}: {e}"));
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let b = body();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(Bytes::from(b)),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        port
    }

    fn slice(service: &str, endpoints: &[(&str, &str, bool)]) -> EndpointSlice {
        let mut s = EndpointSlice {
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(pod, ip, serving)| Endpoint {
                        addresses: vec![(*ip).to_owned()],
                        conditions: Some(EndpointConditions {
                            ready: Some(*serving),
                            serving: Some(*serving),
                            terminating: Some(false),
                        }),
                        target_ref: Some(ObjectReference {
                            name: Some((*pod).to_owned()),
                            ..ObjectReference::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ..EndpointSlice::default()
        };
        s.metadata.name = Some(format!("{service}-abcde"));
        s.metadata.namespace = Some("team".to_owned());
        s.metadata.labels = Some(
            [(SERVICE_NAME_LABEL.to_owned(), service.to_owned())]
                .into_iter()
                .collect(),
        );
        s
    }

    /// The production source against real HTTP servers: the serving pods of a Backend's
    /// slices are read and summed with the routers' held requests; a pod that does not answer
    /// is left out and counted; a Backend none of whose pods answer has no data.
    #[tokio::test]
    async fn http_signals_sum_the_serving_replicas_and_the_routers_held_requests() {
        let requests = Arc::new(AtomicU64::new(100));
        let r = requests.clone();
        let sidecar = move |inflight: u64| {
            let r = r.clone();
            Arc::new(move || {
                format!(
                    r#"{{"model":"m","ready":true,"inflight":{inflight},"inflightSeconds":10.0,"queuedRows":0,"requests":{},"rows":0}}"#,
                    r.load(Ordering::Relaxed)
                )
            }) as Arc<dyn Fn() -> String + Send + Sync>
        };
        // Two replicas on one port at two loopback addresses, as pods are.
        let port = serve("127.0.0.2", 0, sidecar(3)).await;
        serve("127.0.0.3", port, sidecar(1)).await;
        let router = Arc::new(|| {
            r#"{"revision":"r","routes":[],"backends":[{"backend":"auto","replicas":0,"inflight":0,"ejected":0,"held":2,"scaledToZero":false}]}"#.to_owned()
        });
        let router_port = serve("127.0.0.4", 0, router).await;

        let (store, mut writer) = reflector::store();
        for s in [
            slice(
                "auto",
                &[
                    ("a", "127.0.0.2", true),
                    ("b", "127.0.0.3", true),
                    ("loading", "127.0.0.9", false),
                    ("gone", "127.0.0.5", true),
                ],
            ),
            slice("dead", &[("d", "127.0.0.5", true)]),
            slice(ROUTER_NAME, &[("router", "127.0.0.4", true)]),
        ] {
            writer.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let metrics = Metrics::register(&mut Registry::default());
        let source = HttpSignals::with_ports(store, metrics.clone(), port, router_port);
        let keys = [key("auto"), key("dead")];

        let first = source.load(&keys).await;
        // First read of each replica: their gauges (3 + 1), plus 2 held.
        assert_eq!(
            first.get(&key("auto")),
            Some(&Load {
                inflight: 6.0,
                requests: 2
            })
        );
        assert_eq!(
            first.get(&key("dead")),
            None,
            "no replica answered: no data"
        );
        assert_eq!(
            metrics.autoscaler_signal_failures.get(),
            2,
            "the silent pod, once per Backend slice that lists it"
        );

        // 40 more requests on each replica, no request-seconds: their means are 0.
        requests.fetch_add(40, Ordering::Relaxed);
        let second = source.load(&keys).await;
        assert_eq!(
            second.get(&key("auto")),
            Some(&Load {
                inflight: 2.0,
                requests: 80 + 2
            })
        );
        assert_eq!(source.held(&keys).await.get(&key("auto")), Some(&2));
    }

    fn key(name: &str) -> BackendKey {
        BackendKey {
            namespace: "team".to_owned(),
            name: name.to_owned(),
        }
    }

    #[tokio::test]
    async fn a_signals_file_gives_load_with_the_held_requests_and_no_data_for_the_rest() {
        let dir = std::env::temp_dir().join(format!("serval-signals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("signals.json");
        let source = FileSignals::new(path.clone());
        let keys = [key("a"), key("b"), key("c")];
        assert!(source.load(&keys).await.is_empty(), "no file: no data");

        std::fs::write(
            &path,
            r#"{"backends": {"team/a": {"inflight": 2.5, "requests": 10, "held": 3}, "team/b": {}}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let loads = source.load(&keys).await;
        assert_eq!(
            loads.get(&key("a")),
            Some(&Load {
                inflight: 5.5,
                requests: 13
            })
        );
        assert_eq!(loads.get(&key("b")), Some(&Load::default()));
        assert_eq!(loads.get(&key("c")), None, "not in the file: no data");
        assert_eq!(source.held(&keys).await.get(&key("a")), Some(&3));

        std::fs::write(&path, r#"{"backends": {"team/a": {"inflght": 1}}}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            source.load(&keys).await.is_empty(),
            "a misspelt field is refused, not read as idle"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
