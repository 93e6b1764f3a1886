//! Which route a request belongs to, and the path to send upstream.
//!
//! Two ways in: the inference protocols' paths naming the Endpoint as the model
//! (`/v2/models/<endpoint>/…`, `/v1/models/<endpoint>:predict`), rewritten to name the chosen
//! backend's model; or the route's path prefix (longest first, a host-limited route before a
//! host-less one), stripped, after which a protocol path naming the Endpoint is rewritten too.

use std::collections::HashMap;

/// Path to send upstream; the model name is filled in once a backend is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamPath {
    /// Forwarded as is.
    Verbatim(String),
    /// `before` + model + `after`.
    Model {
        /// Up to the model name.
        before: String,
        /// After the model name.
        after: String,
    },
}

impl UpstreamPath {
    /// The path and query for a backend serving `model`.
    pub fn render(&self, model: &str, query: Option<&str>) -> String {
        let q = query.map_or(0, |q| q.len() + 1);
        let mut out = match self {
            UpstreamPath::Verbatim(p) => {
                let mut out = String::with_capacity(p.len() + q);
                out.push_str(p);
                out
            }
            UpstreamPath::Model { before, after } => {
                let mut out = String::with_capacity(before.len() + model.len() + after.len() + q);
                out.push_str(before);
                out.push_str(model);
                out.push_str(after);
                out
            }
        };
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// What a matched request asks of its Endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    /// Anything else: forwarded to the backend the traffic policy chooses.
    Forward,
    /// Model metadata (`/v2/models/<endpoint>[/versions/<v>]`, `/v1/models/<endpoint>`):
    /// the primary backend's, the same for every call, not split by weight.
    ModelMetadata,
    /// `/v2/models/<endpoint>[/versions/<v>]/ready`: answered by the router for the Endpoint.
    ModelReady,
    /// `<prefix>/v2`: server metadata, answered by the router.
    ServerMetadata,
    /// `<prefix>/v2/health/live`: answered by the router.
    Live,
    /// `<prefix>/v2/health/ready`: the Endpoint has a ready backend.
    Ready,
}

/// A matched request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Index of the route in the table.
    pub route: usize,
    /// Where to send it.
    pub path: UpstreamPath,
    /// What it asks for.
    pub kind: PathKind,
}

/// Route lookup compiled from a table.
#[derive(Debug, Default)]
pub struct Matcher {
    by_endpoint: HashMap<String, usize>,
    hosts: Vec<Option<String>>,
    /// `(prefix without trailing '/', host, route)`, most specific first.
    prefixes: Vec<(String, Option<String>, usize)>,
}

impl Matcher {
    /// Builds the lookup from `(endpoint, path prefix, host)` in route order.
    pub fn new<'a>(routes: impl IntoIterator<Item = (&'a str, &'a str, Option<&'a str>)>) -> Self {
        let mut m = Matcher::default();
        for (i, (endpoint, prefix, host)) in routes.into_iter().enumerate() {
            let host = host.map(|h| h.to_ascii_lowercase());
            m.by_endpoint.insert(endpoint.to_owned(), i);
            m.prefixes
                .push((prefix.trim_end_matches('/').to_owned(), host.clone(), i));
            m.hosts.push(host);
        }
        m.prefixes.sort_by(|a, b| {
            b.0.len()
                .cmp(&a.0.len())
                .then(b.1.is_some().cmp(&a.1.is_some()))
        });
        m
    }

    fn host_ok(&self, route: usize, host: Option<&str>) -> bool {
        match self.hosts.get(route) {
            Some(Some(want)) => host.is_some_and(|h| h.eq_ignore_ascii_case(want)),
            _ => true,
        }
    }

    /// The route serving an Endpoint by name, for a request to `host` (a gRPC call names its
    /// model in its message, not in its path).
    pub fn endpoint(&self, host: Option<&str>, name: &str) -> Option<usize> {
        self.by_endpoint
            .get(name)
            .copied()
            .filter(|r| self.host_ok(*r, host))
    }

    /// The route and upstream path for a request's host (without port) and path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<Target> {
        if let Some((name, rewrite, kind)) = model_in_path(path)
            && let Some(&route) = self.by_endpoint.get(name)
            && self.host_ok(route, host)
        {
            return Some(Target {
                route,
                path: rewrite,
                kind,
            });
        }
        for (prefix, want_host, route) in &self.prefixes {
            if want_host.is_some() && !self.host_ok(*route, host) {
                continue;
            }
            let Some(rest) = path.strip_prefix(prefix.as_str()) else {
                continue;
            };
            if !(rest.is_empty() || rest.starts_with('/')) {
                continue;
            }
            let rest = if rest.is_empty() { "/" } else { rest };
            let names_us = model_in_path(rest)
                .filter(|(name, _, _)| self.by_endpoint.get(*name) == Some(route));
            let (path, kind) = match names_us {
                Some((_, rewrite, kind)) => (rewrite, kind),
                None => (
                    UpstreamPath::Verbatim(rest.to_owned()),
                    server_path(rest).unwrap_or(PathKind::Forward),
                ),
            };
            return Some(Target {
                route: *route,
                path,
                kind,
            });
        }
        None
    }
}

/// The Open Inference Protocol's server-wide paths (under an Endpoint's prefix, or at the
/// router's root): metadata, liveness and readiness.
pub fn server_path(path: &str) -> Option<PathKind> {
    match path {
        "/v2" | "/v2/" => Some(PathKind::ServerMetadata),
        "/v2/health/live" => Some(PathKind::Live),
        "/v2/health/ready" => Some(PathKind::Ready),
        _ => None,
    }
}

/// What a protocol path asks of the model, from what follows its name.
fn model_path_kind(v2: bool, after: &str) -> PathKind {
    if !v2 {
        // V1: `GET /v1/models/<name>` is its status; the rest (`:predict`) is inference.
        return if after.is_empty() {
            PathKind::ModelMetadata
        } else {
            PathKind::Forward
        };
    }
    // `/versions/<v>` names a version of the same model: what follows it decides.
    let rest = match after.strip_prefix("/versions/") {
        Some(v) => v.find('/').map_or("", |i| &v[i..]),
        None => after,
    };
    match rest {
        "" => PathKind::ModelMetadata,
        "/ready" => PathKind::ModelReady,
        _ => PathKind::Forward,
    }
}

/// The model name in an OIP or V1 path, the path around it, and what it asks for.
fn model_in_path(path: &str) -> Option<(&str, UpstreamPath, PathKind)> {
    let (before, rest, stop): (&str, &str, &[char]) =
        if let Some(r) = path.strip_prefix("/v2/models/") {
            ("/v2/models/", r, &['/'])
        } else if let Some(r) = path.strip_prefix("/v1/models/") {
            ("/v1/models/", r, &['/', ':'])
        } else {
            return None;
        };
    let end = rest.find(stop).unwrap_or(rest.len());
    let (name, after) = rest.split_at(end);
    if name.is_empty() {
        return None;
    }
    Some((
        name,
        UpstreamPath::Model {
            before: before.to_owned(),
            after: after.to_owned(),
        },
        model_path_kind(before == "/v2/models/", after),
    ))
}

/// The request's host without port, lower-cased.
pub fn host_of(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content only.
        rest.split(']').next().unwrap_or(rest)
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    host.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matcher() -> Matcher {
        Matcher::new([
            ("digits", "/digits", None),
            ("digits-internal", "/digits", Some("Internal.Example")),
            ("root", "/", None),
            ("deep", "/digits/deep/", None),
        ])
    }

    fn render(t: Option<Target>, model: &str) -> Option<(usize, String)> {
        t.map(|t| (t.route, t.path.render(model, None)))
    }

    #[test]
    fn protocol_paths_name_the_endpoint() {
        let m = matcher();
        let r = |p: &str| render(m.find(None, p), "digits-v2");
        assert_eq!(
            r("/v2/models/digits/infer"),
            Some((0, "/v2/models/digits-v2/infer".into()))
        );
        assert_eq!(
            r("/v2/models/digits"),
            Some((0, "/v2/models/digits-v2".into()))
        );
        assert_eq!(
            r("/v2/models/digits/ready"),
            Some((0, "/v2/models/digits-v2/ready".into()))
        );
        assert_eq!(
            r("/v1/models/digits:predict"),
            Some((0, "/v1/models/digits-v2:predict".into()))
        );
        assert_eq!(
            r("/v1/models/digits"),
            Some((0, "/v1/models/digits-v2".into()))
        );
        // An unknown model falls through to the catch-all prefix, untouched.
        assert_eq!(
            r("/v2/models/nope/infer"),
            Some((2, "/v2/models/nope/infer".into()))
        );
    }

    #[test]
    fn prefixes_strip_and_rewrite() {
        let m = matcher();
        let r = |h: Option<&str>, p: &str| render(m.find(h, p), "digits-v1");
        assert_eq!(
            r(None, "/digits/v2/models/digits/infer"),
            Some((0, "/v2/models/digits-v1/infer".into()))
        );
        assert_eq!(r(None, "/digits"), Some((0, "/".into())));
        assert_eq!(
            r(None, "/digits/v2/health/ready"),
            Some((0, "/v2/health/ready".into()))
        );
        assert_eq!(
            r(None, "/digitsx"),
            Some((2, "/digitsx".into())),
            "segment boundary"
        );
        assert_eq!(
            r(None, "/digits/deep/x"),
            Some((3, "/x".into())),
            "longest prefix wins"
        );
        assert_eq!(
            r(Some("internal.example"), "/digits/x"),
            Some((1, "/x".into())),
            "host first"
        );
        // The host-limited endpoint's protocol path needs its host.
        assert_eq!(r(None, "/v2/models/digits-internal/infer").unwrap().0, 2);
        let q = m
            .find(None, "/digits/a")
            .unwrap()
            .path
            .render("m", Some("x=1"));
        assert_eq!(q, "/a?x=1");
        assert_eq!(Matcher::new([("a", "/a", None)]).find(None, "/b"), None);
    }

    #[test]
    fn protocol_paths_say_what_they_ask() {
        let m = matcher();
        let kind = |p: &str| m.find(None, p).map(|t| t.kind);
        assert_eq!(kind("/v2/models/digits"), Some(PathKind::ModelMetadata));
        assert_eq!(
            kind("/v2/models/digits/versions/1"),
            Some(PathKind::ModelMetadata)
        );
        assert_eq!(kind("/v2/models/digits/ready"), Some(PathKind::ModelReady));
        assert_eq!(
            kind("/v2/models/digits/versions/1/ready"),
            Some(PathKind::ModelReady)
        );
        assert_eq!(kind("/v2/models/digits/infer"), Some(PathKind::Forward));
        assert_eq!(
            kind("/v2/models/digits/versions/1/infer"),
            Some(PathKind::Forward)
        );
        assert_eq!(kind("/v1/models/digits"), Some(PathKind::ModelMetadata));
        assert_eq!(kind("/v1/models/digits:predict"), Some(PathKind::Forward));
        // Under a prefix, the server-wide paths are the Endpoint's.
        assert_eq!(kind("/digits/v2"), Some(PathKind::ServerMetadata));
        assert_eq!(kind("/digits/v2/health/live"), Some(PathKind::Live));
        assert_eq!(kind("/digits/v2/health/ready"), Some(PathKind::Ready));
        assert_eq!(
            kind("/digits/v2/models/digits"),
            Some(PathKind::ModelMetadata)
        );
        assert_eq!(kind("/digits/other"), Some(PathKind::Forward));
    }

    #[test]
    fn hosts() {
        assert_eq!(host_of("Example.COM:8080"), "example.com");
        assert_eq!(host_of("[::1]:80"), "::1");
        assert_eq!(host_of("a"), "a");
    }
}
