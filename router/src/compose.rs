//! Composed routes: a cascade, an ensemble or a sequence of calls, each to a Backend or to
//! another Endpoint's route (which applies its own policy: a split, a rollout, a composition),
//! all under the request's one deadline. Every call is buffered whole (a stage may need the
//! body again, an answer is judged, reduced or handed on), within the body limit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::response::Parts as ResponseParts;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};
use serde_json::Value;

use crate::agreement::{self, HEADER_LENGTH};
use crate::errors::{Error, Result};
use crate::matching::UpstreamPath;
use crate::proxy::Proxy;
use crate::table::{
    CompiledCascade, CompiledEnsemble, CompiledHop, CompiledRoute, CompiledSequence, CompiledTable,
    Composition, Stage,
};
use crate::upstream::BackendPool;
use crate::{cascade, ensemble, sequence};

const HEADER_LENGTH_NAME: HeaderName = HeaderName::from_static(HEADER_LENGTH);

/// What every call of one composed request shares.
#[derive(Clone, Copy)]
pub(crate) struct Call<'a> {
    /// The table the request was routed with.
    pub table: &'a CompiledTable,
    /// The route whose policy applies now (the composed one, or an Endpoint called by it).
    pub route: &'a CompiledRoute,
    /// The client's method.
    pub method: &'a Method,
    /// The client's checked headers, the Endpoint header set.
    pub headers: &'a HeaderMap,
    /// The client's query.
    pub query: Option<&'a str>,
    /// When the whole request must be answered.
    pub deadline: tokio::time::Instant,
}

/// A body sent by a composition: the client's as it came (its own headers describe it), or
/// one the router made (JSON, or JSON followed by binary tensors).
#[derive(Clone, Debug)]
pub(crate) struct Body {
    /// The bytes.
    pub bytes: Bytes,
    /// Where it goes: the client's path, or the inference path of the model called.
    pub path: UpstreamPath,
    /// `None`: the client's body and headers. `Some(None)`: JSON. `Some(Some(n))`: a JSON
    /// part of `n` bytes, then binary tensors.
    pub made: Option<Option<usize>>,
}

/// An answer read whole, and the Backend that gave it (none for an ensemble's or a multi-row
/// cascade's, which several gave).
pub(crate) struct Reply {
    /// Status and headers.
    pub head: ResponseParts,
    /// The body.
    pub bytes: Bytes,
    /// Who answered.
    pub by: Option<Arc<BackendPool>>,
}

impl Reply {
    /// The answer's JSON part, parsed, and the binary tensors after it.
    fn parts(&self) -> (Option<Value>, &[u8]) {
        let n = self
            .head
            .headers
            .get(HEADER_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(self.bytes.len())
            .min(self.bytes.len());
        let (json, binary) = self.bytes.split_at(n);
        (serde_json::from_slice(json).ok(), binary)
    }

    fn binary(&self) -> bool {
        self.head.headers.contains_key(HEADER_LENGTH)
    }
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The Open Inference Protocol inference path, for bodies the router makes.
fn infer_path() -> UpstreamPath {
    UpstreamPath::Model {
        before: "/v2/models/".to_owned(),
        after: "/infer".to_owned(),
    }
}

/// A V1 answer of one row unwrapped, `{"predictions": [x]}` to `x`: what one Backend answers
/// an image with.
fn single_prediction(mut reply: Reply) -> Reply {
    let one = serde_json::from_slice::<Value>(&reply.bytes)
        .ok()
        .and_then(
            |mut v| match v.get_mut("predictions")?.as_array_mut()?.as_mut_slice() {
                [x] => Some(x.take()),
                _ => None,
            },
        );
    if let Some(x) = one {
        reply.bytes = Bytes::from(x.to_string());
        reply.head.headers.remove(header::CONTENT_LENGTH);
    }
    reply
}

/// The V1 predict path, for the last step of a sequence called with an image.
fn predict_path() -> UpstreamPath {
    UpstreamPath::Model {
        before: "/v1/models/".to_owned(),
        after: ":predict".to_owned(),
    }
}

impl Proxy {
    /// Runs a composed route for a buffered request.
    pub(crate) fn compose<'a>(
        &'a self,
        call: Call<'a>,
        composition: &'a Composition,
        body: Body,
    ) -> Boxed<'a, Result<Reply>> {
        Box::pin(async move {
            match composition {
                Composition::Cascade(c) => self.cascade(call, c, body).await,
                Composition::Ensemble(e) => self.ensemble(call, e, body).await,
                Composition::Sequence(s) => self.sequence(call, s, body).await,
            }
        })
    }

    /// One call of a composition to a stage, timed and counted in the stage's series: to a
    /// Backend's replicas (held while it is scaled to zero), or through another Endpoint's
    /// route, whose own policy chooses and whose metrics count the call.
    fn hop<'a>(&'a self, call: Call<'a>, stage: &'a Stage, body: Body) -> Boxed<'a, Result<Reply>> {
        Box::pin(async move {
            let start = Instant::now();
            let result = match &stage.hop {
                CompiledHop::Pool(pool) => self.call_pool(call, call.route, pool, body).await,
                CompiledHop::Route(i) => match call.table.routes.get(*i) {
                    Some(route) => self.call_route(call, route, body).await,
                    None => Err(Error::NoReadyBackend(stage.name.clone())),
                },
            };
            stage.duration.observe(start.elapsed().as_secs_f64());
            match &result {
                Ok(r) if r.head.status.is_success() => {}
                _ => {
                    stage.failures.inc();
                }
            }
            result
        })
    }

    /// A call through another Endpoint's route, within its timeout too.
    async fn call_route(&self, call: Call<'_>, route: &CompiledRoute, body: Body) -> Result<Reply> {
        let start = Instant::now();
        let deadline = call
            .deadline
            .min(tokio::time::Instant::now() + route.timeout);
        let inner = Call {
            route,
            deadline,
            ..call
        };
        if let Some(c) = &route.composition {
            return self.compose(inner, c, body).await;
        }
        let Some(pool) = route.choose(call.headers).cloned() else {
            self.count(route, None, StatusCode::SERVICE_UNAVAILABLE, start);
            return Err(Error::NoReadyBackend(route.endpoint.clone()));
        };
        let result = self.call_pool(inner, route, &pool, body).await;
        let status = match &result {
            Ok(r) => r.head.status,
            Err(e) => e.status(),
        };
        self.count(route, Some(&pool), status, start);
        result
    }

    /// A call to one Backend under `route`'s retry policy.
    async fn call_pool(
        &self,
        call: Call<'_>,
        route: &CompiledRoute,
        pool: &Arc<BackendPool>,
        body: Body,
    ) -> Result<Reply> {
        let timeout_ms = route.timeout.as_millis() as u64;
        let pool = if pool.is_cold() {
            &self.hold(&pool.name, route.timeout, call.deadline).await?
        } else {
            pool
        };
        let path = PathAndQuery::try_from(body.path.render(&pool.model, call.query))
            .map_err(|e| Error::BadRequest(format!("rewritten path: {e}")))?;
        let made;
        let headers = match body.made {
            None => call.headers,
            Some(binary) => {
                let mut h = call.headers.clone();
                match binary {
                    Some(n) => {
                        h.insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/octet-stream"),
                        );
                        h.insert(HEADER_LENGTH_NAME, HeaderValue::from(n));
                    }
                    None => {
                        h.insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        h.remove(HEADER_LENGTH);
                    }
                }
                made = h;
                &made
            }
        };
        let method = if body.made.is_some() {
            &Method::POST
        } else {
            call.method
        };
        let (resp, _inflight) = self
            .send(
                self.http_client(),
                route,
                pool,
                method,
                headers,
                &path,
                crate::proxy::Outgoing::Buffered(&body.bytes),
                call.deadline,
            )
            .await?;
        let (head, answer) = resp.into_parts();
        let read = http_body_util::BodyExt::collect(http_body_util::Limited::new(
            answer,
            usize::try_from(self.max_body()).unwrap_or(usize::MAX),
        ));
        let bytes = tokio::time::timeout_at(call.deadline, read)
            .await
            .map_err(|_| Error::Timeout {
                endpoint: route.endpoint.clone(),
                timeout_ms,
            })?
            .map_err(|e| Error::UpstreamProtocol {
                backend: pool.name.clone(),
                reason: e.to_string(),
            })?
            .to_bytes();
        Ok(Reply {
            head,
            bytes,
            by: Some(pool.clone()),
        })
    }

    /// A cascade: the whole body goes to the first stage; the rows each stage answers below
    /// its threshold go on to the next (only those rows when the request and the answers are
    /// JSON with rows; otherwise the whole request), and the answer keeps the request's row
    /// order. A single-row answer names its stage's Backend; a multi-row one names each row's
    /// stage in `parameters.serval_stages`. A stage's error answer is the answer.
    async fn cascade(&self, call: Call<'_>, c: &CompiledCascade, body: Body) -> Result<Reply> {
        let request: Option<Value> = match body.made {
            Some(Some(_)) => None,
            _ => serde_json::from_slice(&body.bytes).ok(),
        };
        let rows = request.as_ref().and_then(cascade::splittable_rows);
        // Rows still travelling (indices into the request's rows) and who answered each.
        let mut pending: Vec<usize> = (0..rows.unwrap_or(1)).collect();
        let mut answered_by: Vec<usize> = vec![0; pending.len()];
        let mut merged: Option<(Value, ResponseParts, Option<Arc<BackendPool>>)> = None;
        let mut send = body.clone();
        for (i, (stage, min)) in c.stages.iter().enumerate() {
            let reply = self.hop(call, stage, send.clone()).await?;
            if !reply.head.status.is_success() {
                return Ok(reply);
            }
            let (value, binary) = reply.parts();
            let low: Vec<usize> = match min {
                None => Vec::new(),
                Some(min) => {
                    let judged = value
                        .as_ref()
                        .ok_or_else(|| "not JSON".to_owned())
                        .and_then(|v| agreement::confidences(v, binary, &c.output));
                    match judged {
                        Ok(conf) if conf.len() == pending.len() => cascade::escalated(&conf, *min),
                        // Unjudgeable (no such output, rows miscounted): the next stage
                        // answers it all rather than an answer nobody checked.
                        other => {
                            tracing::debug!(stage = %stage.name, result = ?other.map(|c| c.len()), "cascade: confidences unreadable");
                            (0..pending.len()).collect()
                        }
                    }
                }
            };
            let (answered, escalated) = &c.rows[i];
            answered.inc_by((pending.len() - low.len()) as u64);
            escalated.inc_by(low.len() as u64);
            for r in &pending {
                answered_by[*r] = i;
            }
            // Split by row only while everything is plain JSON with rows.
            let json_answer = value.filter(|_| !reply.binary() && rows.is_some());
            merged = match (merged.take(), json_answer) {
                (None, Some(v)) => Some((v, reply.head, reply.by)),
                (Some((mut acc, head, by)), Some(v)) => {
                    cascade::merge(&mut acc, &pending, &v).map_err(|reason| {
                        Error::UpstreamProtocol {
                            backend: stage.name.clone(),
                            reason,
                        }
                    })?;
                    // A single row's answer names the Backend that gave it.
                    Some((acc, head, reply.by.or(by)))
                }
                (_, None) => {
                    // Not splittable: the whole request went to this stage; its answer is
                    // the answer unless it escalates again.
                    if low.is_empty() || i + 1 == c.stages.len() {
                        return Ok(reply);
                    }
                    send = body.clone();
                    continue;
                }
            };
            if low.is_empty() {
                break;
            }
            let next: Vec<usize> = low.iter().map(|j| pending[*j]).collect();
            send = match &request {
                Some(req) if next.len() < rows.unwrap_or(0) => Body {
                    bytes: Bytes::from(
                        cascade::select_rows(req, &next)
                            .map_err(Error::BadRequest)?
                            .to_string(),
                    ),
                    path: body.path.clone(),
                    made: Some(None),
                },
                _ => body.clone(),
            };
            pending = next;
        }
        let Some((mut acc, mut head, by)) = merged else {
            return Err(Error::NoReadyBackend(call.route.endpoint.clone()));
        };
        let single = answered_by.len() == 1;
        if !single {
            let names: Vec<&str> = answered_by
                .iter()
                .map(|s| c.stages[*s].0.name.as_str())
                .collect();
            cascade::name_stages(&mut acc, &names);
        }
        head.headers.remove(header::CONTENT_LENGTH);
        Ok(Reply {
            head,
            bytes: Bytes::from(acc.to_string()),
            by: by.filter(|_| single),
        })
    }

    /// An ensemble: every member gets the request at once; the answers of those that answer
    /// in time are reduced row by row. A member that fails or misses the deadline is left out
    /// and counted; fewer than `minResponses` answers is a 502 naming why. A client's mistake
    /// (a 4xx other than 429) is the answer, as every member would say the same.
    async fn ensemble(&self, call: Call<'_>, e: &CompiledEnsemble, body: Body) -> Result<Reply> {
        let replies =
            futures::future::join_all(e.members.iter().map(|m| self.hop(call, m, body.clone())))
                .await;
        let mut answers = Vec::with_capacity(replies.len());
        let mut reasons = Vec::new();
        let mut first: Option<(Value, ResponseParts)> = None;
        let mut names = Vec::new();
        for (m, reply) in e.members.iter().zip(replies) {
            let reply = match reply {
                Ok(r) => r,
                Err(err) => {
                    reasons.push(format!("{}: {err}", m.name));
                    continue;
                }
            };
            let status = reply.head.status;
            if status.is_client_error() && status != StatusCode::TOO_MANY_REQUESTS {
                return Ok(reply);
            }
            if !status.is_success() {
                reasons.push(format!("{}: status {}", m.name, status.as_u16()));
                continue;
            }
            let (value, binary) = reply.parts();
            let rows = value
                .as_ref()
                .ok_or_else(|| "not JSON".to_owned())
                .and_then(|v| agreement::row_values(v, binary, &e.output));
            match rows {
                Ok(r) => {
                    answers.push(r);
                    names.push(m.name.as_str());
                    if first.is_none() {
                        first = value.map(|v| (v, reply.head));
                    }
                }
                Err(why) => {
                    m.failures.inc();
                    reasons.push(format!("{}: {why}", m.name));
                }
            }
        }
        let short = || Error::EnsembleShort {
            endpoint: call.route.endpoint.clone(),
            answered: answers.len(),
            needed: e.min_responses,
            reasons: reasons.join("; "),
        };
        if answers.len() < e.min_responses {
            return Err(short());
        }
        let Some((first, mut head)) = first else {
            return Err(short());
        };
        let answer =
            ensemble::answer(&first, &answers, &e.output, e.reduce, &names).map_err(|reason| {
                Error::UpstreamProtocol {
                    backend: call.route.endpoint.clone(),
                    reason,
                }
            })?;
        head.headers.remove(header::CONTENT_LENGTH);
        head.headers.remove(HEADER_LENGTH);
        head.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(Reply {
            head,
            bytes: Bytes::from(answer.to_string()),
            by: None,
        })
    }

    /// A sequence: the client's request goes to the first step; each step's outputs are the
    /// next one's inputs. Between steps tensors travel in binary (each step after the first,
    /// and the first when the client sent binary, is asked to answer in binary, and binary
    /// outputs are passed on byte for byte); the last answers as the client asked, with the
    /// `outputs` the client named. A step's error answer is the answer.
    async fn sequence(&self, call: Call<'_>, q: &CompiledSequence, body: Body) -> Result<Reply> {
        let header_length: Option<usize> = match body.made {
            Some(n) => n,
            None => call
                .headers
                .get(HEADER_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        };
        let v1 = body.path.render("", None).contains(":predict");
        // An image expects the last step's post-processed answer (its label), as from one
        // Backend: the last step gets a V1 request, from a JSON answer of the step before.
        let labels = body.made.is_none()
            && call
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("image/"));
        if v1 && !labels {
            return Err(Error::BadRequest(
                "a sequence takes Open Inference Protocol (JSON or binary) and image requests; \
                 a V1 predict answer names no outputs or datatypes to hand to the next step"
                    .to_owned(),
            ));
        }
        let first = sequence::first_step(&body.bytes, header_length);
        let mut send = match first.request {
            Some(r) => Body {
                bytes: r.body,
                path: body.path.clone(),
                made: Some(r.header_length),
            },
            // An image goes to the first step's V2 path, which answers with its outputs.
            None if labels => Body {
                path: infer_path(),
                ..body
            },
            None => body,
        };
        let last = q.steps.len().saturating_sub(1);
        for (i, (stage, _)) in q.steps.iter().enumerate() {
            let reply = self.hop(call, stage, send).await?;
            if i == last && labels && reply.head.status.is_success() {
                return Ok(single_prediction(reply));
            }
            if i == last || !reply.head.status.is_success() {
                return Ok(reply);
            }
            let (value, binary) = reply.parts();
            let inputs = &q.steps[i + 1].1;
            let to_last = i + 1 == last;
            let next = value
                .ok_or_else(|| "not JSON".to_owned())
                .and_then(|v| {
                    if labels && to_last {
                        return sequence::v1_request(&v, inputs);
                    }
                    // Binary between steps, but JSON before a V1 last step.
                    let binary_output = if to_last {
                        first.binary_output
                    } else {
                        !(labels && i + 2 == last)
                    };
                    sequence::next_request(
                        &v,
                        binary,
                        inputs,
                        binary_output,
                        first.outputs.as_ref().filter(|_| to_last),
                    )
                })
                .map_err(|reason| Error::UpstreamProtocol {
                    backend: stage.name.clone(),
                    reason: format!("its answer cannot feed the next step: {reason}"),
                })?;
            send = Body {
                bytes: next.body,
                path: if labels && to_last {
                    predict_path()
                } else {
                    infer_path()
                },
                made: Some(next.header_length),
            };
        }
        Err(Error::NoReadyBackend(call.route.endpoint.clone()))
    }
}
