//! `vitals.v1.Query`: read-only, operator certificates only. Expressions
//! are evaluated by `promql`; this module only maps requests and errors.

use tonic::{Request, Response, Status};
use vitals_common::identity::Role;
use vitals_common::model::Labels;
use vitals_common::selector::{Matcher, Op, Selector};
use vitals_proto::v1::{
    Event, Label, ListEventsRequest, ListEventsResponse, ListNodesRequest, ListNodesResponse,
    ListSeriesRequest, ListSeriesResponse, MatchOp, Matcher as PbMatcher, NodeInfo, Point,
    QueryInstantRequest, QueryInstantResponse, QueryRangeRequest, QueryRangeResponse, Series,
    SeriesInfo, query_server::Query,
};

use crate::ingest::Connected;
use crate::promql::{self, EvalError, Limits, Steps};
use crate::store::{EventFilter, QueryError, QueryLimits, SeriesPoints, Store};
use vitals_common::identity::peer_identity;

pub struct QueryService {
    pub store: Store,
    pub connected: Connected,
    /// Current limits; a reload (SIGHUP) may change them.
    pub limits: tokio::sync::watch::Receiver<Limits>,
}

fn require_operator<T>(req: &Request<T>) -> Result<(), Status> {
    let (name, role) = peer_identity(req)?;
    if role != Role::Operator {
        return Err(Status::permission_denied(format!(
            "certificate of {name} has role {role}; queries need an operator certificate"
        )));
    }
    Ok(())
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn eval_status(e: EvalError) -> Status {
    match e {
        EvalError::Invalid(m) => Status::invalid_argument(m),
        EvalError::Limit(m) => Status::resource_exhausted(m),
        EvalError::Store(e) => internal(e),
        EvalError::Internal(m) => internal(m),
    }
}

/// A selector from a metric name and wire matchers.
pub fn selector_from(metric: &str, pb: &[PbMatcher]) -> Result<Selector, Status> {
    let mut matchers = Vec::with_capacity(pb.len());
    for m in pb {
        let op = match MatchOp::try_from(m.op) {
            Ok(MatchOp::Equal) => Op::Equal,
            Ok(MatchOp::NotEqual) => Op::NotEqual,
            Ok(MatchOp::Regex) => Op::Regex,
            Ok(MatchOp::NotRegex) => Op::NotRegex,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown matcher op {}",
                    m.op
                )));
            }
        };
        matchers.push(Matcher::new(&m.name, op, &m.value).map_err(Status::invalid_argument)?);
    }
    if metric.is_empty() && matchers.is_empty() {
        return Err(Status::invalid_argument(
            "give a metric name or at least one matcher",
        ));
    }
    if !metric.is_empty() && !vitals_common::model::valid_metric_name(metric) {
        return Err(Status::invalid_argument(format!(
            "invalid metric name {metric:?}"
        )));
    }
    Ok(Selector {
        metric: metric.to_string(),
        matchers,
    })
}

pub fn selector_from_request(req: &QueryRangeRequest) -> Result<Selector, Status> {
    selector_from(&req.metric, &req.matchers)
}

fn parse_query(text: &str) -> Result<promql::Query, Status> {
    promql::parse(text).map_err(|e| Status::invalid_argument(format!("bad query: {e}")))
}

fn labels_pb(labels: Labels) -> Vec<Label> {
    labels
        .into_iter()
        .map(|(name, value)| Label { name, value })
        .collect()
}

fn series_pb(found: Vec<SeriesPoints>) -> Vec<Series> {
    found
        .into_iter()
        .map(|s| Series {
            name: s.name,
            labels: labels_pb(s.labels),
            points: s
                .points
                .into_iter()
                .map(|(timestamp_ms, value)| Point {
                    timestamp_ms,
                    value,
                })
                .collect(),
            ..Default::default()
        })
        .collect()
}

/// A `packed` answer: the samples as two arrays per series.
fn series_packed_pb(found: Vec<SeriesPoints>) -> Vec<Series> {
    found
        .into_iter()
        .map(|s| {
            let (timestamps_ms, values) = s.points.into_iter().unzip();
            Series {
                name: s.name,
                labels: labels_pb(s.labels),
                timestamps_ms,
                values,
                ..Default::default()
            }
        })
        .collect()
}

/// "training" (gpu or slurm), "storage" (zfs or nfsd) or "other".
pub fn node_role(sources: &std::collections::BTreeSet<String>) -> &'static str {
    if sources.contains("gpu") || sources.contains("slurm") {
        "training"
    } else if sources.contains("zfs") || sources.contains("nfsd") {
        "storage"
    } else {
        "other"
    }
}

impl QueryService {
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(Store, Limits) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let store = self.store.clone();
        let limits = *self.limits.borrow();
        tokio::task::spawn_blocking(move || f(store, limits))
            .await
            .map_err(internal)?
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        require_operator(&request)?;
        let (rows, mut sources) = self
            .blocking(|store, _| {
                let rows = store.list_nodes().map_err(internal)?;
                Ok((rows, store.node_sources()))
            })
            .await?;
        let nodes = rows
            .into_iter()
            .map(|r| {
                let srcs = sources.remove(&r.name).unwrap_or_default();
                NodeInfo {
                    connected: self.connected.is_connected(&r.name),
                    role: node_role(&srcs).to_string(),
                    sources: srcs.into_iter().collect(),
                    name: r.name,
                    last_seen_ms: r.last_seen_ms,
                    agent_version: r.agent_version,
                }
            })
            .collect();
        Ok(Response::new(ListNodesResponse { nodes }))
    }

    async fn query_range(
        &self,
        request: Request<QueryRangeRequest>,
    ) -> Result<Response<QueryRangeResponse>, Status> {
        require_operator(&request)?;
        let req = request.into_inner();
        let packed = req.packed;
        if req.end_ms < req.start_ms {
            return Err(Status::invalid_argument(format!(
                "end_ms ({}) is before start_ms ({})",
                req.end_ms, req.start_ms
            )));
        }
        if req.step_ms < 0 {
            return Err(Status::invalid_argument(format!(
                "step_ms must be above 0 (got {})",
                req.step_ms
            )));
        }
        let query = if req.query.is_empty() {
            None
        } else {
            if !req.metric.is_empty() || !req.matchers.is_empty() {
                return Err(Status::invalid_argument(
                    "give either query or metric/matchers, not both",
                ));
            }
            if req.step_ms == 0 {
                return Err(Status::invalid_argument(
                    "a query needs step_ms above 0 (the time between evaluations)",
                ));
            }
            Some(parse_query(&req.query)?)
        };
        let selector = match &query {
            Some(_) => None,
            None => Some(selector_from_request(&req)?),
        };
        let found = self
            .blocking(move |store, limits| {
                let query = match (query, selector) {
                    (Some(q), _) => q,
                    (None, Some(sel)) if req.step_ms > 0 => promql::Query {
                        agg: None,
                        inner: promql::Inner::Selector(sel),
                    },
                    (None, Some(sel)) => {
                        // Raw: every stored sample in [start, end].
                        return store
                            .query_range(
                                &sel,
                                req.start_ms,
                                req.end_ms,
                                QueryLimits {
                                    max_series: limits.max_series,
                                    max_points: limits.max_points,
                                },
                            )
                            .map_err(|e| match e {
                                QueryError::TooManySeries(m) => Status::resource_exhausted(format!(
                                    "the selector matches more than max_series = {m} series (collector.toml [query]); narrow it with label matchers, e.g. {{node=\"...\"}}"
                                )),
                                QueryError::TooManyPoints(m) => Status::resource_exhausted(format!(
                                    "the answer holds more than max_points = {m} samples (collector.toml [query]); shorten the range, narrow the selector, or give a step"
                                )),
                                QueryError::Store(e) => internal(e),
                            });
                    }
                    (None, None) => return Err(Status::invalid_argument("nothing to query")),
                };
                let steps =
                    Steps::new(req.start_ms, req.end_ms, req.step_ms).map_err(eval_status)?;
                promql::eval_range(&store, &query, steps, limits).map_err(eval_status)
            })
            .await?;
        Ok(Response::new(QueryRangeResponse {
            series: if packed {
                series_packed_pb(found)
            } else {
                series_pb(found)
            },
        }))
    }

    async fn query_instant(
        &self,
        request: Request<QueryInstantRequest>,
    ) -> Result<Response<QueryInstantResponse>, Status> {
        require_operator(&request)?;
        let req = request.into_inner();
        let query = parse_query(&req.query)?;
        let t = if req.time_ms == 0 {
            vitals_common::now_ms()
        } else {
            req.time_ms
        };
        let found = self
            .blocking(move |store, limits| {
                let steps = Steps::new(t, t, 1).map_err(eval_status)?;
                promql::eval_range(&store, &query, steps, limits).map_err(eval_status)
            })
            .await?;
        Ok(Response::new(QueryInstantResponse {
            series: series_pb(found),
            time_ms: t,
        }))
    }

    async fn list_series(
        &self,
        request: Request<ListSeriesRequest>,
    ) -> Result<Response<ListSeriesResponse>, Status> {
        require_operator(&request)?;
        let req = request.into_inner();
        let sel = selector_from(&req.metric, &req.matchers)?;
        let (found, truncated) = self
            .blocking(move |store, limits| {
                let limit = match req.limit {
                    0 => limits.max_series,
                    n => (n as usize).min(limits.max_series),
                };
                Ok(store.list_series(&sel, limit))
            })
            .await?;
        Ok(Response::new(ListSeriesResponse {
            series: found
                .into_iter()
                .map(|(name, labels)| SeriesInfo {
                    name,
                    labels: labels_pb(labels),
                })
                .collect(),
            truncated,
        }))
    }

    async fn list_events(
        &self,
        request: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        require_operator(&request)?;
        let req = request.into_inner();
        let end_ms = if req.end_ms == 0 {
            vitals_common::now_ms()
        } else {
            req.end_ms
        };
        if end_ms < req.start_ms {
            return Err(Status::invalid_argument(format!(
                "end_ms ({end_ms}) is before start_ms ({})",
                req.start_ms
            )));
        }
        let filter = EventFilter {
            node: req.node,
            kind: req.kind,
            start_ms: req.start_ms,
            end_ms,
            limit: match req.limit {
                0 => 1000,
                n => (n as usize).min(100_000),
            },
        };
        let rows = self
            .blocking(move |store, _| store.list_events(&filter).map_err(internal))
            .await?;
        Ok(Response::new(ListEventsResponse {
            events: rows
                .into_iter()
                .map(|e| Event {
                    timestamp_ms: e.timestamp_ms,
                    node: e.node,
                    kind: e.kind,
                    severity: e.severity,
                    message: e.message,
                    labels: labels_pb(e.labels),
                })
                .collect(),
        }))
    }
}
