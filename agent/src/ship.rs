//! Shipping: stream spooled batches to the collector in order, forget them
//! when acked, reconnect with exponential backoff and jitter.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use vitals_proto::v1::{
    AgentMessage, Batch, CollectorMessage, Hello, Label, SeriesDef, agent_message,
    collector_message, ingest_client::IngestClient,
};

use crate::spool::Spool;

/// Batches sent but not yet acknowledged, at most.
const WINDOW: usize = 64;

/// Where and as whom to connect. A reload that changes it makes the shipper
/// drop its stream and connect again with the new one; whatever was in
/// flight is still in the spool and is sent again.
#[derive(Clone)]
pub struct Link {
    pub url: String,
    pub server_name: String,
    pub tls: vitals_common::tls::TlsMaterial,
}

pub struct Shipper {
    pub link: watch::Receiver<Link>,
    pub node: String,
    pub spool: Arc<Spool>,
    pub notify: Arc<Notify>,
    pub stop: watch::Receiver<bool>,
}

enum End {
    /// Stopping, and everything spooled was acknowledged.
    Drained,
    /// The collector closed the stream (e.g. it is shutting down).
    Closed,
    /// The link changed (reload): connect again with the new one.
    Relink,
}

#[derive(Debug, thiserror::Error)]
enum ShipError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("collector refused the stream: {:?}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Other(String),
}

/// Resolves when the link changed; never once its sender is gone.
async fn link_changed(link: &mut watch::Receiver<Link>) {
    if link.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

impl Shipper {
    /// Runs until stopped. When told to stop it keeps going while connected
    /// until the spool is empty; if it was waiting to reconnect, it makes one
    /// more attempt at once.
    pub async fn run(mut self) {
        let mut delay = Duration::from_millis(250);
        let max_delay = Duration::from_secs(30);
        let mut last_warn: Option<(Instant, String)> = None;
        loop {
            let stopping = *self.stop.borrow();
            if stopping && self.spool.stats().batches == 0 {
                return;
            }
            match self.session(&mut delay).await {
                Ok(End::Drained) => return,
                Ok(End::Closed) => tracing::info!("collector closed the stream; reconnecting"),
                Ok(End::Relink) => {
                    tracing::info!(
                        "reconnecting with the reloaded collector address and certificates"
                    );
                    delay = Duration::from_millis(250);
                    last_warn = None;
                    continue;
                }
                Err(e) => {
                    let msg = chain(&e);
                    let due = match &last_warn {
                        None => true,
                        Some((at, m)) => *m != msg || at.elapsed() >= Duration::from_secs(60),
                    };
                    let spooled = self.spool.stats().batches;
                    if due {
                        let permission = matches!(&e, ShipError::Status(s) if s.code() == tonic::Code::PermissionDenied || s.code() == tonic::Code::Unauthenticated);
                        if permission {
                            tracing::error!(error = %msg, spooled, "collector rejected this agent; fix the certificate or the node name, batches stay spooled");
                        } else {
                            tracing::warn!(error = %msg, spooled, retry_in = ?delay, "collector unreachable; collecting into the spool and retrying");
                        }
                        last_warn = Some((Instant::now(), msg));
                    } else {
                        tracing::debug!(error = %msg, spooled, "still cannot ship");
                    }
                }
            }
            // Stopping: one more try was made after the stop; the rest of the
            // spool goes out on the next start.
            if stopping {
                return;
            }
            let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            tokio::select! {
                _ = tokio::time::sleep(jittered) => {}
                // Told to stop while waiting: try to deliver right away.
                _ = self.stop.changed() => {}
                // New certificates or address: try them right away.
                _ = link_changed(&mut self.link) => {
                    delay = Duration::from_millis(250);
                    last_warn = None;
                    continue;
                }
            }
            delay = (delay * 2).min(max_delay);
        }
    }

    async fn connect(link: &Link) -> Result<Channel, ShipError> {
        let connect_err = |source| ShipError::Connect {
            url: link.url.clone(),
            source,
        };
        Endpoint::from_shared(link.url.clone())
            .map_err(connect_err)?
            .tls_config(link.tls.client_config(&link.server_name))
            .map_err(connect_err)?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_err)
    }

    async fn session(&mut self, delay: &mut Duration) -> Result<End, ShipError> {
        let link = self.link.borrow_and_update().clone();
        let channel = tokio::select! {
            c = Self::connect(&link) => c?,
            _ = link_changed(&mut self.link) => return Ok(End::Relink),
        };
        let mut client = IngestClient::new(channel).max_encoding_message_size(64 << 20);
        let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(WINDOW + 1);
        let hello = AgentMessage {
            msg: Some(agent_message::Msg::Hello(Hello {
                node: self.node.clone(),
                agent_version: vitals_common::VERSION.into(),
                instance_id: self.spool.instance_id().to_string(),
            })),
        };
        out_tx
            .send(hello)
            .await
            .map_err(|_| ShipError::Other("stream closed before hello".into()))?;
        let mut inbound = client
            .stream(ReceiverStream::new(out_rx))
            .await?
            .into_inner();
        let welcome = tokio::select! {
            w = tokio::time::timeout(Duration::from_secs(15), inbound.message()) => w
                .map_err(|_| ShipError::Other("no welcome from the collector within 15 s".into()))??,
            _ = link_changed(&mut self.link) => return Ok(End::Relink),
        };
        let acked = match welcome.and_then(|m| m.msg) {
            Some(collector_message::Msg::Welcome(w)) => w.acked_seq,
            Some(_) => return Err(ShipError::Other("collector sent no welcome".into())),
            None => return Ok(End::Closed),
        };
        self.ack(acked);
        *delay = Duration::from_millis(250);
        tracing::info!(url = %link.url, acked_seq = acked, spooled = self.spool.stats().batches, certificate = %link.tls.describe(), "connected to collector");

        let mut last_sent = acked;
        let mut inflight: VecDeque<u64> = VecDeque::new();
        let mut defs = StreamDefs::default();
        let mut stopping = *self.stop.borrow();
        loop {
            if inflight.len() < WINDOW {
                let next = self
                    .spool
                    .next_after(last_sent, WINDOW - inflight.len())
                    .map_err(|e| ShipError::Other(e.to_string()))?;
                for (seq, data) in next {
                    let batch = match Batch::decode(data.as_slice()) {
                        Ok(b) => b,
                        Err(e) => {
                            // A torn spool row: say so and move past it.
                            tracing::error!(seq, error = %e, "spooled batch is unreadable; dropping it");
                            let _ = self.spool.ack(seq);
                            last_sent = seq;
                            continue;
                        }
                    };
                    let msg = AgentMessage {
                        msg: Some(agent_message::Msg::Batch(defs.rewrite(batch))),
                    };
                    if out_tx.send(msg).await.is_err() {
                        return Ok(End::Closed);
                    }
                    last_sent = seq;
                    inflight.push_back(seq);
                }
            }
            if stopping && inflight.is_empty() && self.spool.stats().batches == 0 {
                return Ok(End::Drained);
            }
            tokio::select! {
                m = inbound.message() => match m? {
                    Some(CollectorMessage { msg: Some(collector_message::Msg::Ack(a)) }) => {
                        self.ack(a.seq);
                        while inflight.front().is_some_and(|s| *s <= a.seq) {
                            inflight.pop_front();
                        }
                    }
                    Some(_) => return Err(ShipError::Other("unexpected message from the collector".into())),
                    None => return Ok(End::Closed),
                },
                _ = self.notify.notified(), if inflight.len() < WINDOW => {}
                _ = self.stop.changed(), if !stopping => { stopping = true; }
                // Unacked batches stay spooled and go out on the new stream.
                _ = link_changed(&mut self.link) => return Ok(End::Relink),
            }
        }
    }

    fn ack(&self, seq: u64) {
        if seq == 0 {
            return;
        }
        if let Err(e) = self.spool.ack(seq) {
            tracing::error!(seq, error = %e, "cannot remove acknowledged batches from the spool (they will be resent; the collector drops duplicates)");
        }
    }
}

/// Series ids bound on the current stream. A spooled batch is self-contained
/// (its own ids and every definition); on the wire a definition is sent once
/// per stream and later batches refer to its id alone.
#[derive(Default)]
struct StreamDefs {
    ids: HashMap<(String, Vec<(String, String)>), u32>,
}

impl StreamDefs {
    fn rewrite(&mut self, mut batch: Batch) -> Batch {
        let mut local: HashMap<u32, u32> = HashMap::with_capacity(batch.series.len());
        let mut new_defs = Vec::new();
        for def in std::mem::take(&mut batch.series) {
            let key = (
                def.name,
                def.labels
                    .into_iter()
                    .map(|l| (l.name, l.value))
                    .collect::<Vec<_>>(),
            );
            let next = self.ids.len() as u32;
            let id = match self.ids.get(&key) {
                Some(id) => *id,
                None => {
                    self.ids.insert(key.clone(), next);
                    new_defs.push(SeriesDef {
                        id: next,
                        name: key.0,
                        labels: key
                            .1
                            .into_iter()
                            .map(|(name, value)| Label { name, value })
                            .collect(),
                    });
                    next
                }
            };
            local.insert(def.id, id);
        }
        for id in &mut batch.series_ids {
            // An id the batch never defined stays unknown: the collector says so.
            *id = local.get(id).copied().unwrap_or(u32::MAX);
        }
        batch.series = new_defs;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitals_common::model::{BatchBuilder, Labels};

    #[test]
    fn definitions_go_once_per_stream() {
        let mut l = Labels::new();
        l.insert("node".into(), "a".into());
        let batch = |first: &str| {
            let mut b = BatchBuilder::new();
            b.push(first, &l, 1, 1.0);
            b.push("common", &l, 1, 2.0);
            b.finish()
        };
        let mut defs = StreamDefs::default();
        let one = defs.rewrite(batch("x"));
        assert_eq!(one.series.len(), 2);
        assert_eq!(one.series_ids, vec![0, 1]);
        // "common" is local id 1 again but already bound to stream id 1.
        let two = defs.rewrite(batch("y"));
        assert_eq!(two.series.len(), 1);
        assert_eq!((two.series[0].name.as_str(), two.series[0].id), ("y", 2));
        assert_eq!(two.series_ids, vec![2, 1]);
        // A new stream starts over.
        let fresh = StreamDefs::default().rewrite(batch("y"));
        assert_eq!(fresh.series.len(), 2);
    }
}
