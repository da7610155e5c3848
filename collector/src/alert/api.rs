//! `vitals.v1.Alerts`: alerts with their evidence, and silences. Operator
//! certificates only.

use tonic::{Request, Response, Status};
use vitals_common::identity::Role;
use vitals_proto::v1::{
    AddSilenceRequest, Alert as PbAlert, DeleteSilenceRequest, DeleteSilenceResponse,
    EvidenceSeries, Label, ListAlertsRequest, ListAlertsResponse, ListSilencesRequest,
    ListSilencesResponse, Point, RelatedSignal, Silence as PbSilence, alerts_server::Alerts,
};

use super::db::{DbError, Silence};
use super::engine::Alert;
use super::{Shared, silenced};
use crate::ingest::peer_identity;

pub struct AlertsService {
    pub shared: Shared,
}

fn operator<T>(req: &Request<T>) -> Result<String, Status> {
    let (name, role) = peer_identity(req)?;
    if role != Role::Operator {
        return Err(Status::permission_denied(format!(
            "certificate of {name} has role {role}; alerts need an operator certificate"
        )));
    }
    Ok(name)
}

fn labels(m: impl IntoIterator<Item = (String, String)>) -> Vec<Label> {
    m.into_iter()
        .map(|(name, value)| Label { name, value })
        .collect()
}

fn to_pb(a: Alert, silenced: bool) -> PbAlert {
    PbAlert {
        fingerprint: a.fingerprint,
        rule: a.rule,
        state: a.phase.as_str().into(),
        severity: a.severity,
        labels: labels(a.labels),
        annotations: labels(a.annotations),
        active_since_ms: a.active_since_ms,
        fired_ms: a.fired_ms.unwrap_or(0),
        resolved_ms: a.resolved_ms.unwrap_or(0),
        value: a.value,
        evidence: a
            .evidence
            .into_iter()
            .map(|e| EvidenceSeries {
                series: e.series,
                points: e
                    .points
                    .into_iter()
                    .map(|(timestamp_ms, value)| Point {
                        timestamp_ms,
                        value,
                    })
                    .collect(),
            })
            .collect(),
        related: a
            .related
            .into_iter()
            .map(|r| RelatedSignal {
                kind: r.kind,
                what: r.what,
                score: r.score,
                since_ms: r.since_ms,
            })
            .collect(),
        silenced,
    }
}

fn silence_pb(s: Silence) -> PbSilence {
    PbSilence {
        id: s.id,
        matchers: s.matchers,
        starts_ms: s.starts_ms,
        ends_ms: s.ends_ms,
        created_by: s.created_by,
        comment: s.comment,
    }
}

fn db_status(e: DbError) -> Status {
    match e {
        DbError::Matchers(..) => Status::invalid_argument(e.to_string()),
        DbError::NoSilence(_) => Status::not_found(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

impl AlertsService {
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut super::Alerting) -> Result<T, DbError> + Send + 'static,
    ) -> Result<T, Status> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut g = match shared.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            f(&mut g)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(db_status)
    }
}

#[tonic::async_trait]
impl Alerts for AlertsService {
    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        operator(&request)?;
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            1000
        } else {
            (req.limit as usize).min(100_000)
        };
        let alerts = self
            .with(move |st| {
                let now = vitals_common::now_ms();
                let silences = st.db.silences(false, now)?;
                Ok(st
                    .db
                    .list(req.all, limit)?
                    .into_iter()
                    .map(|a| {
                        let s =
                            a.phase != super::engine::Phase::Resolved && silenced(&silences, &a);
                        to_pb(a, s)
                    })
                    .collect())
            })
            .await?;
        Ok(Response::new(ListAlertsResponse { alerts }))
    }

    async fn add_silence(
        &self,
        request: Request<AddSilenceRequest>,
    ) -> Result<Response<PbSilence>, Status> {
        let who = operator(&request)?;
        let req = request.into_inner();
        if req.duration_ms <= 0 {
            return Err(Status::invalid_argument(
                "a silence needs a duration above zero",
            ));
        }
        let s = self
            .with(move |st| {
                let now = vitals_common::now_ms();
                st.db.add_silence(
                    &req.matchers,
                    now,
                    now.saturating_add(req.duration_ms),
                    &who,
                    &req.comment,
                )
            })
            .await?;
        tracing::info!(id = s.id, matchers = %s.matchers, by = %s.created_by, until = s.ends_ms, "silence added");
        Ok(Response::new(silence_pb(s)))
    }

    async fn list_silences(
        &self,
        request: Request<ListSilencesRequest>,
    ) -> Result<Response<ListSilencesResponse>, Status> {
        operator(&request)?;
        let all = request.into_inner().all;
        let silences = self
            .with(move |st| st.db.silences(all, vitals_common::now_ms()))
            .await?;
        Ok(Response::new(ListSilencesResponse {
            silences: silences.into_iter().map(silence_pb).collect(),
        }))
    }

    async fn delete_silence(
        &self,
        request: Request<DeleteSilenceRequest>,
    ) -> Result<Response<DeleteSilenceResponse>, Status> {
        let who = operator(&request)?;
        let id = request.into_inner().id;
        self.with(move |st| st.db.expire_silence(id, vitals_common::now_ms()))
            .await?;
        tracing::info!(id, by = %who, "silence ended");
        Ok(Response::new(DeleteSilenceResponse {}))
    }
}
