//! `vitals.v1.Query`: read-only, operator certificates only.

use tonic::{Request, Response, Status};
use vitals_common::identity::Role;
use vitals_common::selector::{Matcher, Op, Selector};
use vitals_proto::v1::{
    Label, ListNodesRequest, ListNodesResponse, MatchOp, NodeInfo, Point, QueryRangeRequest,
    QueryRangeResponse, Series, query_server::Query,
};

use crate::ingest::{Connected, peer_identity};
use crate::store::{QueryError, QueryLimits, Store};

pub struct QueryService {
    pub store: Store,
    pub connected: Connected,
    /// Current limits; a reload (SIGHUP) may change them.
    pub limits: tokio::sync::watch::Receiver<QueryLimits>,
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

pub fn selector_from_request(req: &QueryRangeRequest) -> Result<Selector, Status> {
    let mut matchers = Vec::with_capacity(req.matchers.len());
    for m in &req.matchers {
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
    if req.metric.is_empty() && matchers.is_empty() {
        return Err(Status::invalid_argument(
            "give a metric name or at least one matcher",
        ));
    }
    Ok(Selector {
        metric: req.metric.clone(),
        matchers,
    })
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        require_operator(&request)?;
        let store = self.store.clone();
        let rows = tokio::task::spawn_blocking(move || store.list_nodes())
            .await
            .map_err(internal)?
            .map_err(internal)?;
        let nodes = rows
            .into_iter()
            .map(|r| NodeInfo {
                connected: self.connected.is_connected(&r.name),
                name: r.name,
                last_seen_ms: r.last_seen_ms,
                agent_version: r.agent_version,
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
        if req.end_ms < req.start_ms {
            return Err(Status::invalid_argument("end is before start"));
        }
        let selector = selector_from_request(&req)?;
        let store = self.store.clone();
        let limits = *self.limits.borrow();
        let found = tokio::task::spawn_blocking(move || {
            store.query_range(&selector, req.start_ms, req.end_ms, limits)
        })
        .await
        .map_err(internal)?
        .map_err(|e| match e {
            QueryError::TooManySeries(_) | QueryError::TooManyPoints(_) => {
                Status::resource_exhausted(e.to_string())
            }
            QueryError::Store(e) => internal(e),
        })?;
        let series = found
            .into_iter()
            .map(|s| Series {
                name: s.name,
                labels: s
                    .labels
                    .into_iter()
                    .map(|(name, value)| Label { name, value })
                    .collect(),
                points: s
                    .points
                    .into_iter()
                    .map(|(timestamp_ms, value)| Point {
                        timestamp_ms,
                        value,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(QueryRangeResponse { series }))
    }
}
