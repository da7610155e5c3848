//! `vitals.v1.Alerts`: alerts with their evidence, and silences. Operator
//! certificates only.

use std::pin::Pin;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use vitals_common::identity::Role;
use vitals_proto::v1::{
    ActionRun, AddSilenceRequest, Alert as PbAlert, AlertChange, DeleteSilenceRequest,
    DeleteSilenceResponse, EvidenceSeries, Label, ListActionsRequest, ListActionsResponse,
    ListAlertsRequest, ListAlertsResponse, ListSilencesRequest, ListSilencesResponse, Point,
    RelatedSignal, Silence as PbSilence, WatchAlertsRequest, alerts_server::Alerts,
};

use super::db::{DbError, Silence};
use super::engine::{Alert, Phase};
use super::{Recorded, Shared, silenced};
use vitals_common::identity::peer_identity;

pub struct AlertsService {
    pub shared: Shared,
    /// Turns true at shutdown: `WatchAlerts` streams end then.
    pub stop: watch::Receiver<bool>,
}

/// The open alerts now, as "snapshot" changes.
fn snapshot(st: &super::Alerting) -> Vec<Recorded> {
    let now = vitals_common::now_ms();
    let silences = st.db.silences(false, now).unwrap_or_default();
    let mut open: Vec<&Alert> = st.engine.open.values().collect();
    open.sort_by(|a, b| {
        a.active_since_ms
            .cmp(&b.active_since_ms)
            .then_with(|| a.fingerprint.cmp(&b.fingerprint))
    });
    open.into_iter()
        .map(|a| Recorded {
            kind: "snapshot",
            silenced: silenced(&silences, a),
            alert: a.clone(),
            at_ms: now,
        })
        .collect()
}

fn change_pb(r: Recorded) -> AlertChange {
    AlertChange {
        kind: r.kind.into(),
        alert: Some(to_pb(r.alert, r.silenced)),
        at_ms: r.at_ms,
    }
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
    type WatchAlertsStream = Pin<Box<dyn Stream<Item = Result<AlertChange, Status>> + Send>>;

    async fn watch_alerts(
        &self,
        request: Request<WatchAlertsRequest>,
    ) -> Result<Response<Self::WatchAlertsStream>, Status> {
        let who = operator(&request)?;
        // Subscribe under the lock that evaluation holds while it records,
        // so no change falls between the snapshot and the subscription.
        let (mut changes, first) = self
            .with(|st| Ok((st.changes.subscribe(), snapshot(st))))
            .await?;
        let (tx, rx) = mpsc::channel::<Result<AlertChange, Status>>(256);
        let shared = self.shared.clone();
        let mut stop = self.stop.clone();
        tokio::spawn(async move {
            let mut pending = first;
            loop {
                for r in pending.drain(..) {
                    if tx.send(Ok(change_pb(r))).await.is_err() {
                        return;
                    }
                }
                let next = tokio::select! {
                    r = changes.recv() => r,
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tx.closed() => return,
                };
                match next {
                    Ok(r) => pending.push(r),
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(by = %who, missed = n, "an alert watch fell behind; sending a new snapshot");
                        let s2 = shared.clone();
                        let snap = tokio::task::spawn_blocking(move || {
                            let g = match s2.lock() {
                                Ok(g) => g,
                                Err(p) => p.into_inner(),
                            };
                            snapshot(&g)
                        })
                        .await;
                        match snap {
                            Ok(s) => pending = s,
                            Err(_) => return,
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

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
        let phase = match req.state.as_str() {
            "" => None,
            p @ ("pending" | "firing" | "resolved") => Some(p.to_string()),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown alert state {other:?}; use pending, firing or resolved"
                )));
            }
        };
        let alerts = self
            .with(move |st| {
                let now = vitals_common::now_ms();
                let silences = st.db.silences(false, now)?;
                let list = match &phase {
                    Some(p) => st.db.list_phase(p, limit)?,
                    None => st.db.list(req.all, limit)?,
                };
                Ok(list
                    .into_iter()
                    .map(|a| {
                        let s = a.phase != Phase::Resolved && silenced(&silences, &a);
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

    async fn list_actions(
        &self,
        request: Request<ListActionsRequest>,
    ) -> Result<Response<ListActionsResponse>, Status> {
        operator(&request)?;
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let runs = self.with(move |st| st.db.actions(limit)).await?;
        Ok(Response::new(ListActionsResponse {
            runs: runs
                .into_iter()
                .map(|r| ActionRun {
                    id: r.id,
                    action: r.action,
                    rule: r.rule,
                    fingerprint: r.fingerprint,
                    alert_since_ms: r.alert_since_ms,
                    labels: r
                        .labels
                        .into_iter()
                        .map(|(name, value)| Label { name, value })
                        .collect(),
                    what: r.what,
                    who: r.who,
                    dry_run: r.dry_run,
                    outcome: r.outcome,
                    started_ms: r.started_ms,
                    ended_ms: r.ended_ms.unwrap_or(0),
                    exit_code: r.exit_code,
                    output: r.output,
                })
                .collect(),
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
