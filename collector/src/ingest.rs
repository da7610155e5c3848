//! `vitals.v1.Ingest/Stream`: identity from the client certificate, strict
//! validation, acks only after the store committed.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use vitals_common::identity::{self, Role, peer_identity};
use vitals_common::model::{Labels, valid_label_name, valid_metric_name};
use vitals_proto::v1::{
    Ack, AgentMessage, Batch, CollectorMessage, SeriesDef, Welcome, agent_message,
    collector_message, ingest_server::Ingest,
};

use crate::metrics::Counters;
use crate::store::{CleanBatch, CleanEvent, Outcome, SeriesKey, Writer};

/// Most samples one batch may hold.
pub const MAX_BATCH_SAMPLES: usize = 2_000_000;

/// Nodes with a stream open now, and how many streams each has.
#[derive(Default, Clone)]
pub struct Connected(Arc<Mutex<HashMap<String, usize>>>);

impl Connected {
    pub fn is_connected(&self, node: &str) -> bool {
        self.0.lock().map(|m| m.contains_key(node)).unwrap_or(false)
    }
    /// How many nodes have a stream open now.
    pub fn count(&self) -> usize {
        self.0.lock().map(|m| m.len()).unwrap_or(0)
    }
    fn enter(&self, node: &str) -> ConnGuard {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(node.to_string()).or_default() += 1;
        }
        ConnGuard {
            map: self.clone(),
            node: node.to_string(),
        }
    }
}

struct ConnGuard {
    map: Connected,
    node: String,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut m) = self.map.0.lock()
            && let Some(n) = m.get_mut(&self.node)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.node);
            }
        }
    }
}

pub struct IngestService {
    pub writer: Writer,
    pub connected: Connected,
    pub shutdown: watch::Receiver<bool>,
    /// Ingest counters for `/metrics`.
    pub counters: Arc<Counters>,
}

/// The serial number of the peer's certificate, for logs (which certificate
/// an agent connected with, e.g. after a rotation).
pub fn peer_serial<T>(req: &Request<T>) -> String {
    req.peer_certs()
        .and_then(|certs| {
            certs
                .first()
                .and_then(|c| identity::cert_info(c.as_ref()).ok())
        })
        .map(|info| info.serial)
        .unwrap_or_default()
}

type AckStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<CollectorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let (node, role) = peer_identity(&request).inspect_err(|_| {
            Counters::add(&self.counters.streams_rejected, 1);
        })?;
        if role != Role::Agent {
            Counters::add(&self.counters.streams_rejected, 1);
            tracing::warn!(peer = %node, %role, "refused ingest from a non-agent certificate");
            return Err(Status::permission_denied(format!(
                "certificate of {node} has role {role}; only agent certificates may send samples"
            )));
        }
        let cert_serial = peer_serial(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let session = Session {
            node,
            cert_serial,
            writer: self.writer.clone(),
            connected: self.connected.clone(),
            shutdown: self.shutdown.clone(),
            counters: self.counters.clone(),
            tx,
        };
        tokio::spawn(session.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    node: String,
    cert_serial: String,
    writer: Writer,
    connected: Connected,
    shutdown: watch::Receiver<bool>,
    counters: Arc<Counters>,
    tx: mpsc::Sender<Result<CollectorMessage, Status>>,
}

fn ack(seq: u64) -> CollectorMessage {
    CollectorMessage {
        msg: Some(collector_message::Msg::Ack(Ack { seq })),
    }
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<AgentMessage>) {
        if let Err(status) = self.serve(&mut inbound).await {
            if status.code() != tonic::Code::Cancelled {
                tracing::warn!(node = %self.node, code = ?status.code(), error = %status.message(), "ingest stream rejected");
            }
            let _ = self.tx.send(Err(status)).await;
        }
    }

    async fn serve(&mut self, inbound: &mut Streaming<AgentMessage>) -> Result<(), Status> {
        let first = tokio::time::timeout(Duration::from_secs(30), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(agent_message::Msg::Hello(h)) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
            None => return Ok(()),
        };
        if hello.node != self.node {
            return Err(Status::permission_denied(format!(
                "hello names node {:?} but the certificate is for {:?}",
                hello.node, self.node
            )));
        }
        if hello.instance_id.is_empty() || hello.instance_id.len() > 128 {
            return Err(Status::invalid_argument(
                "instance_id must be 1 to 128 characters",
            ));
        }
        let instance = hello.instance_id;
        let acked = self
            .writer
            .hello(&self.node, &instance, &hello.agent_version)
            .await
            .map_err(Status::unavailable)?;
        let _guard = self.connected.enter(&self.node);
        tracing::info!(node = %self.node, instance = %instance, version = %hello.agent_version, acked_seq = acked, cert_serial = %self.cert_serial, "agent connected");
        self.tx
            .send(Ok(CollectorMessage {
                msg: Some(collector_message::Msg::Welcome(Welcome {
                    node: self.node.clone(),
                    acked_seq: acked,
                })),
            }))
            .await
            .map_err(|_| Status::cancelled("agent went away"))?;

        // Acks go out in order from a task of their own, so reading the next
        // batch never waits for the previous commit.
        let (pending_tx, mut pending_rx) =
            mpsc::channel::<(u64, oneshot::Receiver<Result<Outcome, String>>)>(1024);
        let ack_tx = self.tx.clone();
        let node = self.node.clone();
        let acker = tokio::spawn(async move {
            while let Some((seq, rx)) = pending_rx.recv().await {
                let res = match rx.await {
                    Ok(Ok(_)) => Ok(ack(seq)),
                    Ok(Err(e)) => Err(Status::unavailable(e)),
                    Err(_) => Err(Status::unavailable(
                        "store stopped before the batch was committed",
                    )),
                };
                let failed = res.is_err();
                if ack_tx.send(res).await.is_err() || failed {
                    tracing::debug!(node = %node, seq, "ack stream closed");
                    return;
                }
            }
        });

        let mut shutdown = self.shutdown.clone();
        let mut last_seq = 0u64;
        let mut stream = StreamState::default();
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            let msg = tokio::select! {
                m = inbound.message() => m,
                _ = shutdown.changed() => break Ok(()),
            };
            let batch = match msg {
                Ok(Some(AgentMessage {
                    msg: Some(agent_message::Msg::Batch(b)),
                })) => b,
                Ok(Some(_)) => {
                    break Err(Status::invalid_argument("expected a batch after the hello"));
                }
                Ok(None) => break Ok(()),
                Err(status) => {
                    tracing::debug!(node = %self.node, error = %status, "agent stream ended");
                    break Ok(());
                }
            };
            Counters::add(&self.counters.batches_received, 1);
            Counters::add(&self.counters.samples_received, batch.values.len() as u64);
            if batch.seq <= last_seq {
                Counters::add(&self.counters.batches_rejected, 1);
                break Err(Status::invalid_argument(format!(
                    "batch sequence numbers must increase: {} after {last_seq}",
                    batch.seq
                )));
            }
            last_seq = batch.seq;
            let seq = batch.seq;
            let clean = match validate(&self.node, batch, &mut stream) {
                Ok(c) => c,
                Err(status) => {
                    Counters::add(&self.counters.batches_rejected, 1);
                    break Err(status);
                }
            };
            let rx = match self.writer.write(&self.node, &instance, clean).await {
                Ok(rx) => rx,
                Err(e) => break Err(Status::unavailable(e)),
            };
            if pending_tx.send((seq, rx)).await.is_err() {
                break Ok(());
            }
        };
        // Let every batch already handed to the store be committed and acked.
        drop(pending_tx);
        let _ = acker.await;
        result
    }
}

fn pairs_to_labels(pairs: &[vitals_proto::v1::Label], what: &str) -> Result<Labels, Status> {
    let mut labels = Labels::new();
    for l in pairs {
        if !valid_label_name(&l.name) {
            return Err(Status::invalid_argument(format!(
                "{what}: invalid label name {:?}",
                l.name
            )));
        }
        if labels.insert(l.name.clone(), l.value.clone()).is_some() {
            return Err(Status::invalid_argument(format!(
                "{what}: label {:?} given twice",
                l.name
            )));
        }
    }
    Ok(labels)
}

/// Series definitions this stream already validated: each distinct
/// definition is checked and keyed once per stream.
#[derive(Default)]
struct DefCache {
    map: HashMap<u64, (SeriesDef, Arc<SeriesKey>)>,
}

/// Most definitions one stream's cache holds before it starts over.
const DEF_CACHE_MAX: usize = 1 << 20;

fn def_hash(def: &SeriesDef) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    def.name.hash(&mut h);
    for l in &def.labels {
        l.name.hash(&mut h);
        l.value.hash(&mut h);
    }
    h.finish()
}

impl DefCache {
    fn get(&self, def: &SeriesDef) -> Option<Arc<SeriesKey>> {
        let (raw, key) = self.map.get(&def_hash(def))?;
        (raw.name == def.name && raw.labels == def.labels).then(|| key.clone())
    }

    fn insert(&mut self, def: &SeriesDef, key: SeriesKey) -> Arc<SeriesKey> {
        if self.map.len() >= DEF_CACHE_MAX {
            self.map.clear();
        }
        let key = Arc::new(key);
        let raw = SeriesDef {
            id: 0,
            name: def.name.clone(),
            labels: def.labels.clone(),
        };
        self.map.insert(def_hash(def), (raw, key.clone()));
        key
    }
}

/// What one stream has bound so far: series ids → validated series.
#[derive(Default)]
pub struct StreamState {
    cache: DefCache,
    ids: Vec<Option<Arc<SeriesKey>>>,
    /// Scratch: stream id → index in the batch's series list (u32::MAX: none).
    local: Vec<u32>,
}

/// Series ids a stream may use: 0 up to this.
pub const MAX_STREAM_SERIES: u32 = 1 << 22;

/// Checks a batch whole; on any fault nothing of it is stored.
///
/// A definition binds its id for the rest of the stream (replacing an earlier
/// binding of that id); a sample may use any id bound in this batch or before
/// on the same stream.
pub fn validate(node: &str, b: Batch, st: &mut StreamState) -> Result<CleanBatch, Status> {
    let n = b.values.len();
    if b.series_ids.len() != n || b.timestamps_ms.len() != n {
        return Err(Status::invalid_argument(format!(
            "batch {}: columns differ in length (series_ids {}, timestamps_ms {}, values {})",
            b.seq,
            b.series_ids.len(),
            b.timestamps_ms.len(),
            n
        )));
    }
    if n > MAX_BATCH_SAMPLES {
        return Err(Status::invalid_argument(format!(
            "batch {}: {n} samples, more than the limit of {MAX_BATCH_SAMPLES}",
            b.seq
        )));
    }
    let mut defined_here = HashSet::with_capacity(b.series.len());
    for def in &b.series {
        if def.id >= MAX_STREAM_SERIES {
            return Err(Status::invalid_argument(format!(
                "batch {}: series id {} above the limit of {MAX_STREAM_SERIES}",
                b.seq, def.id
            )));
        }
        if !defined_here.insert(def.id) {
            return Err(Status::invalid_argument(format!(
                "batch {}: series id {} defined twice",
                b.seq, def.id
            )));
        }
        let key = match st.cache.get(def) {
            Some(key) => key,
            None => {
                if !valid_metric_name(&def.name) {
                    return Err(Status::invalid_argument(format!(
                        "batch {}: invalid metric name {:?}",
                        b.seq, def.name
                    )));
                }
                let mut labels = pairs_to_labels(&def.labels, &def.name)?;
                match labels.get("node") {
                    Some(n) if n != node => {
                        return Err(Status::permission_denied(format!(
                            "batch {}: series {} is labelled node={n:?} but the certificate is for {node:?}; the whole batch is rejected",
                            b.seq, def.name
                        )));
                    }
                    Some(_) => {}
                    None => {
                        labels.insert("node".into(), node.into());
                    }
                }
                st.cache
                    .insert(def, SeriesKey::new(def.name.clone(), labels))
            }
        };
        let i = def.id as usize;
        if st.ids.len() <= i {
            st.ids.resize(i + 1, None);
        }
        st.ids[i] = Some(key);
    }
    if st.local.len() < st.ids.len() {
        st.local.resize(st.ids.len(), u32::MAX);
    }
    let mut series: Vec<Arc<SeriesKey>> = Vec::new();
    let mut used: Vec<usize> = Vec::new();
    let mut series_idx = Vec::with_capacity(n);
    let mut undefined = None;
    for &id in &b.series_ids {
        let i = id as usize;
        match st.ids.get(i).and_then(Option::as_ref) {
            Some(key) => {
                if st.local[i] == u32::MAX {
                    st.local[i] = series.len() as u32;
                    series.push(key.clone());
                    used.push(i);
                }
                series_idx.push(st.local[i]);
            }
            None => {
                undefined = Some(id);
                break;
            }
        }
    }
    for i in used {
        st.local[i] = u32::MAX;
    }
    if let Some(id) = undefined {
        return Err(Status::invalid_argument(format!(
            "batch {}: sample refers to series id {id}, which this stream never defined",
            b.seq
        )));
    }
    let mut events = Vec::with_capacity(b.events.len());
    for e in b.events {
        if !e.node.is_empty() && e.node != node {
            return Err(Status::permission_denied(format!(
                "batch {}: event for node {:?} but the certificate is for {node:?}; the whole batch is rejected",
                b.seq, e.node
            )));
        }
        if e.kind.is_empty() {
            return Err(Status::invalid_argument(format!(
                "batch {}: event without a kind",
                b.seq
            )));
        }
        events.push(CleanEvent {
            timestamp_ms: e.timestamp_ms,
            kind: e.kind,
            severity: e.severity,
            message: e.message,
            labels: pairs_to_labels(&e.labels, "event")?,
        });
    }
    Ok(CleanBatch {
        seq: b.seq,
        series,
        series_idx,
        timestamps_ms: b.timestamps_ms,
        values: b.values,
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vitals_common::model::BatchBuilder;

    fn labels(node: &str) -> Labels {
        let mut l = Labels::new();
        l.insert("node".into(), node.into());
        l
    }

    #[test]
    fn foreign_node_label_rejects_whole_batch() {
        let mut b = BatchBuilder::new();
        b.push("m", &labels("a"), 1, 1.0);
        b.push("m", &labels("b"), 1, 1.0);
        let mut batch = b.finish();
        batch.seq = 1;
        let err = validate("a", batch, &mut StreamState::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn ids_stay_bound_for_the_stream() {
        let mut st = StreamState::default();
        let mut b = BatchBuilder::new();
        b.push("m", &labels("a"), 1, 1.0);
        b.push("n", &labels("a"), 1, 2.0);
        let mut first = b.finish();
        first.seq = 1;
        let c1 = validate("a", first.clone(), &mut st).unwrap();
        // Later batches may leave the definitions out.
        let mut second = first.clone();
        second.seq = 2;
        second.series.clear();
        second.series_ids = vec![1, 0];
        let c2 = validate("a", second.clone(), &mut st).unwrap();
        assert_eq!(c2.series[c2.series_idx[0] as usize].name.as_ref(), "n");
        assert_eq!(c2.series[c2.series_idx[1] as usize].name.as_ref(), "m");
        assert!(Arc::ptr_eq(&c1.series[0], &c2.series[1]));
        // A new stream knows nothing of them.
        let err = validate("a", second, &mut StreamState::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn malformed_batches_are_invalid() {
        let mut b = BatchBuilder::new();
        b.push("m", &Labels::new(), 1, 1.0);
        let good = b.finish();
        let ok = validate("a", good.clone(), &mut StreamState::default()).unwrap();
        assert_eq!(
            ok.series[0].labels.get("node").map(String::as_str),
            Some("a")
        );

        let mut short = good.clone();
        short.values.clear();
        assert_eq!(
            validate("a", short, &mut StreamState::default())
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );

        let mut dangling = good.clone();
        dangling.series_ids[0] = 7;
        assert_eq!(
            validate("a", dangling, &mut StreamState::default())
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );

        let mut badname = good;
        badname.series[0].name = "bad-name".into();
        assert_eq!(
            validate("a", badname, &mut StreamState::default())
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
    }
}
