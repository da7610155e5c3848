//! The collector's store: an in-memory head of open chunks per series, a
//! write-ahead log in SQLite written before the ack, and closed chunks
//! (see `chunk`) stored as one BLOB per series per time span.
//!
//! One thread owns the write connection (STYLE.md #10): ingest handlers send
//! it validated batches over a channel; it groups whatever is queued into one
//! transaction — series rows, a WAL row per batch, closed chunks, the agent's
//! acked sequence — commits, and only then answers each sender. Readers open
//! their own read-only connections and copy the head under a read lock.
//!
//! Restart = load the head snapshot of the last checkpoint, then replay the
//! WAL rows written after it. A checkpoint is a round: it notes the newest
//! WAL id, then writes the open chunks to `head_snapshot` a slice of series
//! at a time between the writer's batches (so ingest never waits for all of
//! them), and when every series is written records that WAL id as covered
//! and deletes the WAL rows up to it. Each series' snapshot row is written
//! after the round began, so it holds every sample of the covered rows;
//! replay drops what a snapshot or closed chunk already holds (time only
//! moves forward), so a crash in the middle of a round loses nothing.
//!
//! Invariants: a batch is acknowledged only after the transaction holding its
//! WAL row committed; a batch whose (node, instance, seq) is not above the
//! highest stored sequence of that instance is acknowledged without being
//! stored again; per series, timestamps only move forward (a sample at or
//! before the newest stored one is dropped and counted).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, Transaction, params};
use tokio::sync::{mpsc, oneshot};
use vitals_common::model::Labels;
use vitals_common::selector::Selector;

use crate::chunk::{self, ChunkEncoder, get_varint, put_varint, unzigzag, zigzag};
use vitals_detect::{DetectorSet, Params as DetectParams};

/// A chunk is closed at this many samples...
pub const CHUNK_MAX_SAMPLES: usize = 1024;
/// ...or when it spans this long.
pub const CHUNK_MAX_SPAN_MS: i64 = 2 * 3600 * 1000;

/// How the store runs; defaults in one place.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Series the anomaly detector scores as they arrive (None: detection off).
    pub detect: Option<Selector>,
    /// Chunks whose newest sample is older than this are deleted.
    pub retention: Duration,
    /// Time between checkpoints (head snapshot + WAL truncation + retention).
    pub checkpoint_interval: Duration,
    /// A checkpoint also happens when the WAL holds this many bytes.
    pub checkpoint_wal_bytes: u64,
    /// At most this many series' open chunks are written to the snapshot
    /// between two groups of batches (also bounded by `CHECKPOINT_STEP_TIME`).
    pub checkpoint_step_series: usize,
    /// Names of the remote-write endpoints: the WAL rows one of them has
    /// not sent yet outlive checkpoints (see `remote_write`).
    pub remote_write: Vec<String>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            detect: None,
            retention: Duration::from_secs(30 * 86400),
            checkpoint_interval: Duration::from_secs(300),
            checkpoint_wal_bytes: 1 << 30,
            checkpoint_step_series: 8192,
            remote_write: Vec::new(),
        }
    }
}

enum Migration {
    Sql(&'static str),
    Rust(fn(&Transaction<'_>) -> Result<(), rusqlite::Error>),
}

/// Schema steps, applied in order; `user_version` says how many ran.
/// Append only: never edit a step that has shipped.
const MIGRATIONS: &[Migration] = &[
    // 1: series, raw samples, nodes, agent instances, events.
    Migration::Sql(
        "CREATE TABLE series (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            labels TEXT NOT NULL,
            UNIQUE (name, labels)
         );
         CREATE TABLE samples (
            series_id INTEGER NOT NULL REFERENCES series(id),
            ts INTEGER NOT NULL,
            value REAL
         );
         CREATE INDEX samples_series_ts ON samples (series_id, ts);
         CREATE TABLE nodes (
            name TEXT PRIMARY KEY,
            agent_version TEXT NOT NULL,
            first_seen_ms INTEGER NOT NULL,
            last_seen_ms INTEGER NOT NULL
         );
         CREATE TABLE agent_instances (
            node TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            acked_seq INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL,
            PRIMARY KEY (node, instance_id)
         );
         CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts INTEGER NOT NULL,
            node TEXT NOT NULL,
            kind TEXT NOT NULL,
            severity INTEGER NOT NULL,
            message TEXT NOT NULL,
            labels TEXT NOT NULL
         );
         CREATE INDEX events_node_ts ON events (node, ts);",
    ),
    // 2: WAL, compressed chunks, head snapshot.
    Migration::Sql(
        "CREATE TABLE wal (
            id INTEGER PRIMARY KEY,
            node TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            received_ms INTEGER NOT NULL,
            crc INTEGER NOT NULL,
            data BLOB NOT NULL
         );
         CREATE TABLE chunks (
            series_id INTEGER NOT NULL,
            min_ts INTEGER NOT NULL,
            max_ts INTEGER NOT NULL,
            count INTEGER NOT NULL,
            data BLOB NOT NULL,
            PRIMARY KEY (series_id, min_ts)
         ) WITHOUT ROWID;
         CREATE TABLE head_snapshot (
            series_id INTEGER PRIMARY KEY,
            data BLOB NOT NULL
         );",
    ),
    // 3: raw samples of schema 1 become chunks; the table goes.
    Migration::Rust(migrate_samples_to_chunks),
    // 4: the series table without its UNIQUE (name, labels) index, which
    // held a second copy of every name and label set (half the table). The
    // writer, the only one that inserts, keeps the unique index in memory.
    Migration::Sql(
        "CREATE TABLE series_v4 (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            labels TEXT NOT NULL
         );
         INSERT INTO series_v4 (id, name, labels) SELECT id, name, labels FROM series;
         DROP TABLE series;
         ALTER TABLE series_v4 RENAME TO series;",
    ),
    // 5: chunks in a rowid table with an index. In the WITHOUT ROWID table a
    // row above ~1000 bytes (a closed chunk of a byte counter is ~1.5 KB)
    // spilled its tail into an overflow page of its own: 4 KiB for a few
    // hundred bytes, doubling the file.
    Migration::Sql(
        "CREATE TABLE chunks_v5 (
            id INTEGER PRIMARY KEY,
            series_id INTEGER NOT NULL,
            min_ts INTEGER NOT NULL,
            max_ts INTEGER NOT NULL,
            count INTEGER NOT NULL,
            data BLOB NOT NULL
         );
         INSERT INTO chunks_v5 (series_id, min_ts, max_ts, count, data)
            SELECT series_id, min_ts, max_ts, count, data FROM chunks ORDER BY series_id, min_ts;
         DROP TABLE chunks;
         ALTER TABLE chunks_v5 RENAME TO chunks;
         CREATE UNIQUE INDEX chunks_series_min_ts ON chunks (series_id, min_ts);",
    ),
    // 6: remote write reads the WAL as its queue. WAL ids never repeat
    // (AUTOINCREMENT: a row deleted by a checkpoint is not reused), each
    // row says how many samples it holds, and one cursor per endpoint
    // says the last row the receiver accepted. `store_meta` keeps the
    // last WAL id the head snapshot covers: rows kept for a receiver are
    // not replayed again.
    Migration::Sql(
        "CREATE TABLE wal_v6 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            node TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            received_ms INTEGER NOT NULL,
            crc INTEGER NOT NULL,
            data BLOB NOT NULL,
            samples INTEGER NOT NULL DEFAULT 0
         );
         INSERT INTO wal_v6 (id, node, instance_id, seq, received_ms, crc, data)
            SELECT id, node, instance_id, seq, received_ms, crc, data FROM wal ORDER BY id;
         DROP TABLE wal;
         ALTER TABLE wal_v6 RENAME TO wal;
         CREATE TABLE remote_write_cursors (
            endpoint TEXT PRIMARY KEY,
            wal_id INTEGER NOT NULL,
            updated_ms INTEGER NOT NULL
         );
         CREATE TABLE store_meta (
            key TEXT PRIMARY KEY,
            value INTEGER NOT NULL
         );",
    ),
    // 7: retention deletes chunks by their newest timestamp; without an
    // index each checkpoint's retention read the whole chunks table.
    Migration::Sql("CREATE INDEX chunks_max_ts ON chunks (max_ts);"),
];

fn migrate_samples_to_chunks(tx: &Transaction<'_>) -> Result<(), rusqlite::Error> {
    let mut rows =
        tx.prepare("SELECT series_id, ts, value FROM samples ORDER BY series_id, ts, rowid")?;
    let mut ins = tx.prepare(
        "INSERT INTO chunks (series_id, min_ts, max_ts, count, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut current: Option<(i64, ChunkEncoder, i64)> = None;
    let mut flush = |c: &(i64, ChunkEncoder, i64)| -> Result<(), rusqlite::Error> {
        if let Some((lo, hi)) = c.1.time_range() {
            ins.execute(params![c.0, lo, hi, c.1.len() as i64, c.1.bytes()])?;
        }
        Ok(())
    };
    let mut q = rows.query([])?;
    while let Some(r) = q.next()? {
        let (id, ts, v): (i64, i64, Option<f64>) = (r.get(0)?, r.get(1)?, r.get(2)?);
        let v = v.unwrap_or(f64::NAN);
        match &mut current {
            Some(c) if c.0 == id => {
                if ts <= c.2 {
                    continue;
                }
                if c.1.len() >= CHUNK_MAX_SAMPLES {
                    flush(c)?;
                    c.1 = ChunkEncoder::new();
                }
                c.1.push(ts, v);
                c.2 = ts;
            }
            _ => {
                if let Some(c) = &current {
                    flush(c)?;
                }
                let mut e = ChunkEncoder::new();
                e.push(ts, v);
                current = Some((id, e, ts));
            }
        }
    }
    if let Some(c) = &current {
        flush(c)?;
    }
    drop(q);
    tx.execute_batch("DROP TABLE samples;")?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this collector understands ({known}); \
         run a newer vitals-collector or point storage.path elsewhere"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the store writer: {0}")]
    Thread(#[source] std::io::Error),
    #[error("the store is shutting down")]
    Closed,
}

/// A validated series identity, shared by an ingest stream's cache and the
/// writer. Labels include `node`.
#[derive(Debug)]
pub struct SeriesKey {
    pub name: Arc<str>,
    pub labels: Arc<Labels>,
    /// `name` followed by the labels' JSON: the writer's lookup key. Shared
    /// (like name and labels) with the head once the series is stored, so
    /// that creating a series copies no strings on the writer's thread.
    pub key: Arc<str>,
    /// The store's id for this series once the writer committed it (0: not yet).
    pub id: AtomicI64,
}

impl SeriesKey {
    pub fn new(name: String, labels: Labels) -> SeriesKey {
        let key = Arc::from(format!("{name}{}", labels_json(&labels)));
        SeriesKey {
            name: Arc::from(name),
            labels: Arc::new(labels),
            key,
            id: AtomicI64::new(0),
        }
    }

    /// The labels as the `series` table stores them (JSON): the key's tail.
    pub fn labels_json(&self) -> &str {
        &self.key[self.name.len()..]
    }
}

/// A batch that passed validation, ready to store.
#[derive(Debug)]
pub struct CleanBatch {
    pub seq: u64,
    pub series: Vec<Arc<SeriesKey>>,
    pub series_idx: Vec<u32>,
    pub timestamps_ms: Vec<i64>,
    pub values: Vec<f64>,
    pub events: Vec<CleanEvent>,
}

#[derive(Debug)]
pub struct CleanEvent {
    pub timestamp_ms: i64,
    pub kind: String,
    pub severity: i32,
    pub message: String,
    pub labels: Labels,
}

/// What happened to a batch handed to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Committed now.
    Stored,
    /// Its sequence number was already stored; nothing written.
    Duplicate,
}

enum Command {
    Hello {
        node: String,
        instance_id: String,
        agent_version: String,
        reply: oneshot::Sender<Result<u64, String>>,
    },
    Write {
        node: String,
        instance_id: String,
        batch: CleanBatch,
        reply: oneshot::Sender<Result<Outcome, String>>,
        /// From an agent: scored by the detector, counted as the node's
        /// activity (last seen) and its acknowledged sequence. The
        /// collector's own series about a node (`ALERTS`) are neither.
        from_agent: bool,
        /// Scored by the detector (agents' and pushed samples).
        detect: bool,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// A remote-write endpoint's receiver accepted every WAL row up to
    /// `wal_id`.
    Cursor {
        endpoint: String,
        wal_id: i64,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Command>,
}

impl Writer {
    /// Registers a connecting agent; returns the highest stored sequence for
    /// its instance.
    pub async fn hello(
        &self,
        node: &str,
        instance_id: &str,
        agent_version: &str,
    ) -> Result<u64, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Hello {
                node: node.into(),
                instance_id: instance_id.into(),
                agent_version: agent_version.into(),
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed.to_string())?;
        rx.await.map_err(|_| StoreError::Closed.to_string())?
    }

    /// Queues a batch; the returned receiver answers after the commit.
    pub async fn write(
        &self,
        node: &str,
        instance_id: &str,
        batch: CleanBatch,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, String> {
        self.send_write(node, instance_id, batch, true, true).await
    }

    /// Stores samples pushed by a model server or job (the `Push` RPC):
    /// scored by the detector, but not a node's activity or sequences.
    /// `batch.seq` must grow from one call to the next for a `source`.
    pub async fn write_pushed(
        &self,
        node: &str,
        source: &str,
        batch: CleanBatch,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, String> {
        self.send_write(node, source, batch, false, true).await
    }

    /// Stores series the collector makes about `node` (its alerts as
    /// `ALERTS`), durably like an agent's batch, but without touching the
    /// node's last-seen time, its agents' sequences or the detector.
    /// `batch.seq` must grow from one call to the next for a `source`.
    pub async fn write_own(
        &self,
        node: &str,
        source: &str,
        batch: CleanBatch,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, String> {
        self.send_write(node, source, batch, false, false).await
    }

    async fn send_write(
        &self,
        node: &str,
        instance_id: &str,
        batch: CleanBatch,
        from_agent: bool,
        detect: bool,
    ) -> Result<oneshot::Receiver<Result<Outcome, String>>, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Write {
                node: node.into(),
                instance_id: instance_id.into(),
                batch,
                reply,
                from_agent,
                detect,
            })
            .await
            .map_err(|_| StoreError::Closed.to_string())?;
        Ok(rx)
    }

    /// Records that remote-write endpoint `endpoint` delivered every WAL
    /// row up to `wal_id`; returns after the commit. A cursor only moves
    /// forward.
    pub async fn remote_write_cursor(&self, endpoint: &str, wal_id: i64) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Cursor {
                endpoint: endpoint.into(),
                wal_id,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed.to_string())?;
        rx.await.map_err(|_| StoreError::Closed.to_string())?
    }

    /// Writes the head snapshot and truncates the WAL now.
    pub async fn checkpoint(&self) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Checkpoint { reply })
            .await
            .map_err(|_| StoreError::Closed.to_string())?;
        rx.await.map_err(|_| StoreError::Closed.to_string())?
    }
}

/// One series in memory: its identity, its open chunk, its newest timestamp.
/// Name and labels are shared, so that a query copies them under the head's
/// lock as two reference counts (the writer waits for that lock).
struct HeadSeries {
    name: Arc<str>,
    labels: Arc<Labels>,
    open: ChunkEncoder,
    /// Newest stored timestamp (head or closed chunks), if any.
    last_ts: Option<i64>,
    /// Whether the detector scores it (decided once), and its score series.
    detect: Option<bool>,
    score_id: Option<i64>,
}

/// The head's maps hash with foldhash: the key map is rehashed whole as it
/// grows, and SipHash over every series' name and labels was the largest
/// single cost of a fleet's first contact (hundreds of thousands of new
/// series in seconds). Seeded per process.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Every series, indexed by id and by name. Shared with readers.
#[derive(Default)]
pub struct Head {
    series: Vec<Option<HeadSeries>>,
    by_name: FastMap<Arc<str>, Vec<i64>>,
    /// Name followed by the labels' JSON → id.
    by_key: FastMap<Arc<str>, i64>,
    wal_bytes: u64,
    out_of_order_total: u64,
}

impl Head {
    fn get_mut(&mut self, id: i64) -> Option<&mut HeadSeries> {
        self.series.get_mut(id as usize).and_then(Option::as_mut)
    }

    /// Adds a series; `key` is `name` followed by the labels' JSON.
    fn insert(&mut self, id: i64, name: Arc<str>, labels: Arc<Labels>, key: Arc<str>) {
        let idx = id as usize;
        if self.series.len() <= idx {
            self.series.resize_with(idx + 1, || None);
        }
        self.by_name.entry(name.clone()).or_default().push(id);
        self.by_key.insert(key, id);
        self.series[idx] = Some(HeadSeries {
            name,
            labels,
            open: ChunkEncoder::new(),
            last_ts: None,
            detect: None,
            score_id: None,
        });
    }

    pub fn series_count(&self) -> usize {
        self.by_key.len()
    }
}

/// Read side of the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    head: Arc<RwLock<Head>>,
    detect: Arc<DetectStats>,
}

/// The anomaly detector's work since the start (for `/metrics`), updated
/// by the writer after each commit.
#[derive(Debug, Default)]
pub struct DetectStats {
    /// Samples scored.
    pub scored: AtomicU64,
    /// Scores at or above `ALARM`.
    pub alarms: AtomicU64,
    /// Series with a detector now.
    pub series: AtomicU64,
}

fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

/// Opens (creating if needed) the database and migrates it to the current schema.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(10))?;
    // Set before the first table exists; a no-op on older databases.
    conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk (not only in the OS cache) before we ack.
    conn.pragma_update(None, "synchronous", "FULL")?;
    migrate(&conn, path)?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        match step {
            Migration::Sql(sql) => tx.execute_batch(sql)?,
            Migration::Rust(f) => f(&tx)?,
        }
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(10))?;
    Ok(conn)
}

// ---------------------------------------------------------------- WAL rows --

/// A WAL row: the accepted samples of one batch as (series id, ts, value).
fn encode_wal(samples: &[(i64, i64, f64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 12 + 4);
    put_varint(&mut out, samples.len() as u64);
    let mut prev_ts = 0i64;
    for &(id, ts, v) in samples {
        put_varint(&mut out, id as u64);
        let d = ts.wrapping_sub(prev_ts);
        put_varint(&mut out, zigzag(d));
        out.extend_from_slice(&v.to_bits().to_le_bytes());
        prev_ts = ts;
    }
    out
}

fn decode_wal(b: &[u8]) -> Option<Vec<(i64, i64, f64)>> {
    let mut pos = 0;
    let n = get_varint(b, &mut pos).ok()?;
    if n > b.len() as u64 {
        return None;
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut prev_ts = 0i64;
    for _ in 0..n {
        let id = get_varint(b, &mut pos).ok()? as i64;
        let d = unzigzag(get_varint(b, &mut pos).ok()?);
        let ts = prev_ts.wrapping_add(d);
        let bytes: [u8; 8] = b.get(pos..pos + 8)?.try_into().ok()?;
        pos += 8;
        out.push((id, ts, f64::from_bits(u64::from_le_bytes(bytes))));
        prev_ts = ts;
    }
    (pos == b.len()).then_some(out)
}

// ------------------------------------------------------------------ writer --

struct WriterState {
    conn: Connection,
    head: Arc<RwLock<Head>>,
    acked: HashMap<(String, String), u64>,
    opts: StoreOptions,
    last_checkpoint: Instant,
    detectors: DetectorSet<i64>,
    /// Scores at or above `ALARM` per node since start (a counter).
    alarms: HashMap<String, u64>,
    detect_stats: Arc<DetectStats>,
    /// The cursor (last delivered WAL id) of each configured remote-write
    /// endpoint: a checkpoint keeps the WAL rows above the lowest.
    rw_cursors: HashMap<String, i64>,
    /// The checkpoint round in progress, if any.
    round: Option<Round>,
    /// Free pages still to give back to the file system, a few per step.
    vacuum_left: u64,
}

/// A checkpoint in progress: the head is written to the snapshot a slice of
/// series at a time; when all are written, WAL rows up to `wal_id` are
/// covered.
struct Round {
    /// The newest WAL id when the round began: every series' snapshot row,
    /// written after that, holds the samples of the rows up to it.
    wal_id: i64,
    /// The head's WAL byte count then (rows the round will cover).
    wal_bytes: u64,
    /// The next series id to write.
    next: usize,
    /// Every series is written and `wal_id` recorded as covered: the
    /// covered WAL rows are being deleted, a slice per step.
    trimming: bool,
    /// Open chunks in their compact form (the final checkpoint).
    compact: bool,
    started: Instant,
    steps: u32,
}

/// A checkpoint step between two groups of batches stops after this long
/// (ack latency), or after `checkpoint_step_series` series.
const CHECKPOINT_STEP_TIME: Duration = Duration::from_millis(40);

/// The series each scored series' anomaly scores are stored in.
pub const SCORE_METRIC: &str = "vitals_anomaly_score";
/// Per node: how many samples scored at or above `ALARM` (a counter).
pub const ALARMS_METRIC: &str = "vitals_anomaly_alarms_total";
/// A score at or above this is an anomaly.
pub const ALARM: f64 = 0.5;

/// Loads the head (series, snapshot, WAL replay) and starts the writer thread.
pub fn spawn_writer(
    conn: Connection,
    path: &Path,
    opts: StoreOptions,
) -> Result<(Writer, Store, std::thread::JoinHandle<()>), StoreError> {
    let (mut state, store) = writer_state(conn, path, opts)?;
    let (tx, mut rx) = mpsc::channel::<Command>(4096);
    let handle = std::thread::Builder::new()
        .name("vitals-store-writer".into())
        .spawn(move || {
            loop {
                // While a checkpoint round (or giving free pages back) is in
                // progress, an idle writer goes on with it instead of waiting.
                let first = if state.round.is_some() || state.vacuum_left > 0 {
                    match rx.try_recv() {
                        Ok(c) => Some(c),
                        Err(mpsc::error::TryRecvError::Empty) => None,
                        Err(mpsc::error::TryRecvError::Disconnected) => break,
                    }
                } else {
                    match rx.blocking_recv() {
                        Some(c) => Some(c),
                        None => break,
                    }
                };
                if let Some(first) = first {
                    let mut group = vec![first];
                    while group.len() < 1024 {
                        match rx.try_recv() {
                            Ok(c) => group.push(c),
                            Err(_) => break,
                        }
                    }
                    state.apply(group);
                }
                state.maybe_checkpoint();
            }
            // Last words: leave a short WAL for the next start.
            if let Err(e) = state.checkpoint(true) {
                tracing::warn!(error = %e, "final checkpoint failed; the WAL will be replayed on start");
            }
            tracing::debug!("store writer stopped: every queued batch handled");
        })
        .map_err(StoreError::Thread)?;
    Ok((Writer { tx }, store, handle))
}

/// The writer's state over a loaded head, and the readers' handle.
fn writer_state(
    conn: Connection,
    path: &Path,
    opts: StoreOptions,
) -> Result<(WriterState, Store), StoreError> {
    let head = Arc::new(RwLock::new(load_head(&conn)?));
    let mut acked = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT node, instance_id, acked_seq FROM agent_instances")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?)))?;
        for row in rows {
            let (node, inst, seq) = row?;
            acked.insert((node, inst), seq as u64);
        }
    }
    let rw_cursors = init_cursors(&conn, &opts.remote_write)?;
    let detect_stats = Arc::new(DetectStats::default());
    let store = Store {
        path: path.to_path_buf(),
        head: head.clone(),
        detect: detect_stats.clone(),
    };
    let state = WriterState {
        conn,
        head,
        acked,
        opts,
        last_checkpoint: Instant::now(),
        detectors: DetectorSet::new(&DetectParams::default()),
        alarms: HashMap::new(),
        detect_stats,
        rw_cursors,
        round: None,
        vacuum_left: 0,
    };
    Ok((state, store))
}

/// The newest WAL id ever written (0: none): AUTOINCREMENT's counter.
fn last_wal_id(conn: &Connection) -> Result<i64, rusqlite::Error> {
    conn.query_row(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'wal'), 0),
                    coalesce((SELECT max(id) FROM wal), 0))",
        [],
        |r| r.get(0),
    )
}

/// The cursors of the configured remote-write endpoints; one seen for the
/// first time starts at the end of the WAL (it gets what is stored from
/// now on).
fn init_cursors(conn: &Connection, names: &[String]) -> Result<HashMap<String, i64>, StoreError> {
    let mut out = HashMap::new();
    if names.is_empty() {
        return Ok(out);
    }
    let end = last_wal_id(conn)?;
    let now = vitals_common::now_ms();
    for name in names {
        let found: Option<i64> = conn
            .query_row(
                "SELECT wal_id FROM remote_write_cursors WHERE endpoint = ?1",
                [name],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        let at = match found {
            Some(at) => at,
            None => {
                conn.execute(
                    "INSERT INTO remote_write_cursors (endpoint, wal_id, updated_ms) VALUES (?1, ?2, ?3)",
                    params![name, end, now],
                )?;
                tracing::info!(endpoint = %name, wal_id = end, "remote write: new endpoint, starts with what is stored from now on");
                end
            }
        };
        out.insert(name.clone(), at);
    }
    Ok(out)
}

fn load_head(conn: &Connection) -> Result<Head, StoreError> {
    let started = Instant::now();
    let mut head = Head::default();
    {
        let mut stmt = conn.prepare("SELECT id, name, labels FROM series ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (id, name, labels_text): (i64, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let labels: Labels = serde_json::from_str(&labels_text).unwrap_or_default();
            let key = format!("{name}{labels_text}");
            if let Some(first) = head.by_key.get(key.as_str()) {
                // Only a hand-edited database gets here: keep the first.
                tracing::error!(series = id, same_as = *first, name = %name, "duplicate series row ignored");
                continue;
            }
            head.insert(id, name.into(), Arc::new(labels), key.into());
        }
    }
    {
        let mut stmt =
            conn.prepare("SELECT series_id, max(max_ts) FROM chunks GROUP BY series_id")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (id, ts): (i64, i64) = (r.get(0)?, r.get(1)?);
            if let Some(s) = head.get_mut(id) {
                s.last_ts = Some(ts);
            }
        }
    }
    let mut snap_series = 0usize;
    {
        let mut stmt = conn.prepare("SELECT series_id, data FROM head_snapshot")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (id, data): (i64, Vec<u8>) = (r.get(0)?, r.get(1)?);
            match (chunk::decode(&data), head.get_mut(id)) {
                (Ok(samples), Some(s)) => {
                    for (ts, v) in samples {
                        if s.last_ts.is_none_or(|l| ts > l) {
                            s.open.push(ts, v);
                            s.last_ts = Some(ts);
                        }
                    }
                    snap_series += 1;
                }
                (Err(e), _) => {
                    tracing::error!(series = id, error = %e, "head snapshot of a series is corrupt; its open chunk is lost")
                }
                (_, None) => {
                    tracing::error!(series = id, "head snapshot for an unknown series; skipped")
                }
            }
        }
    }
    let (mut rows_ok, mut rows_bad, mut samples) = (0u64, 0u64, 0u64);
    {
        // Rows at or below the checkpoint's WAL id are in the snapshot
        // already (they are kept only for remote write).
        let covered: i64 = conn.query_row(
            "SELECT coalesce((SELECT value FROM store_meta WHERE key = 'checkpoint_wal_id'), 0)",
            [],
            |r| r.get(0),
        )?;
        let mut stmt = conn.prepare("SELECT id, crc, data FROM wal WHERE id > ?1 ORDER BY id")?;
        let mut rows = stmt.query([covered])?;
        while let Some(r) = rows.next()? {
            let (wal_id, crc, data): (i64, i64, Vec<u8>) = (r.get(0)?, r.get(1)?, r.get(2)?);
            head.wal_bytes += data.len() as u64;
            let decoded = (crc32fast::hash(&data) as i64 == crc)
                .then(|| decode_wal(&data))
                .flatten();
            let Some(decoded) = decoded else {
                rows_bad += 1;
                tracing::error!(
                    wal_row = wal_id,
                    bytes = data.len(),
                    "WAL row is torn or corrupt: skipped, the rest is recovered"
                );
                continue;
            };
            rows_ok += 1;
            for (id, ts, v) in decoded {
                if let Some(s) = head.get_mut(id)
                    && s.last_ts.is_none_or(|l| ts > l)
                {
                    s.open.push(ts, v);
                    s.last_ts = Some(ts);
                    samples += 1;
                }
            }
        }
    }
    tracing::info!(
        series = head.series_count(),
        snapshot_series = snap_series,
        wal_rows = rows_ok,
        wal_rows_corrupt = rows_bad,
        wal_samples = samples,
        took = ?started.elapsed(),
        "head loaded"
    );
    Ok(head)
}

enum CommandResult {
    Hello(u64),
    Write(Outcome),
    Done,
}

impl WriterState {
    fn apply(&mut self, group: Vec<Command>) {
        let head = self.head.clone();
        let mut head = match head.write() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let mut staged_acked: HashMap<(String, String), u64> = HashMap::new();
        let mut results: Vec<Result<CommandResult, String>> = Vec::with_capacity(group.len());
        let mut out_of_order = 0u64;
        let mut wal_bytes = 0u64;
        let (mut scored, mut alarmed) = (0u64, 0u64);
        let mut checkpoint_asked = false;
        let mut staged_cursors: Vec<(String, i64)> = Vec::new();
        let mut new_series: Vec<(Arc<SeriesKey>, i64)> = Vec::new();
        let outcome = (|| -> Result<(), rusqlite::Error> {
            let tx = self.conn.unchecked_transaction()?;
            let now = vitals_common::now_ms();
            for cmd in &group {
                let r = match cmd {
                    Command::Hello {
                        node,
                        instance_id,
                        agent_version,
                        ..
                    } => {
                        tx.prepare_cached(
                            "INSERT INTO nodes (name, agent_version, first_seen_ms, last_seen_ms)
                             VALUES (?1, ?2, ?3, ?3)
                             ON CONFLICT (name) DO UPDATE SET agent_version = ?2, last_seen_ms = ?3",
                        )?
                        .execute(params![node, agent_version, now])?;
                        let key = (node.clone(), instance_id.clone());
                        let seq = staged_acked
                            .get(&key)
                            .or_else(|| self.acked.get(&key))
                            .copied()
                            .unwrap_or(0);
                        CommandResult::Hello(seq)
                    }
                    Command::Checkpoint { .. } => {
                        checkpoint_asked = true;
                        CommandResult::Done
                    }
                    Command::Cursor {
                        endpoint, wal_id, ..
                    } => {
                        tx.prepare_cached(
                            "UPDATE remote_write_cursors SET wal_id = ?2, updated_ms = ?3
                             WHERE endpoint = ?1 AND wal_id < ?2",
                        )?
                        .execute(params![endpoint, wal_id, now])?;
                        staged_cursors.push((endpoint.clone(), *wal_id));
                        CommandResult::Done
                    }
                    Command::Write {
                        node,
                        instance_id,
                        batch,
                        from_agent,
                        detect,
                        ..
                    } => {
                        let key = (node.clone(), instance_id.clone());
                        let last = staged_acked
                            .get(&key)
                            .or_else(|| self.acked.get(&key))
                            .copied()
                            .unwrap_or(0);
                        if batch.seq <= last {
                            CommandResult::Write(Outcome::Duplicate)
                        } else {
                            let detector = self.opts.detect.as_ref().filter(|_| *detect);
                            let mut detect = detector.map(|sel| Detection {
                                selector: sel,
                                detectors: &mut self.detectors,
                                alarms: &mut self.alarms,
                                scored: 0,
                                alarmed: 0,
                            });
                            let (dropped, bytes) = insert_batch(
                                &tx,
                                &mut head,
                                node,
                                instance_id,
                                batch,
                                now,
                                &mut new_series,
                                detect.as_mut(),
                            )?;
                            out_of_order += dropped;
                            wal_bytes += bytes;
                            if let Some(d) = &detect {
                                scored += d.scored;
                                alarmed += d.alarmed;
                            }
                            if *from_agent {
                                tx.prepare_cached(
                                    "INSERT INTO agent_instances (node, instance_id, acked_seq, updated_ms)
                                     VALUES (?1, ?2, ?3, ?4)
                                     ON CONFLICT (node, instance_id) DO UPDATE SET acked_seq = ?3, updated_ms = ?4",
                                )?
                                .execute(params![node, instance_id, batch.seq as i64, now])?;
                                tx.prepare_cached(
                                    "UPDATE nodes SET last_seen_ms = ?2 WHERE name = ?1",
                                )?
                                .execute(params![node, now])?;
                            }
                            staged_acked.insert(key, batch.seq);
                            CommandResult::Write(Outcome::Stored)
                        }
                    }
                };
                results.push(Ok(r));
            }
            tx.commit()
        })();
        let mut reload = false;
        if let Err(e) = outcome {
            tracing::error!(error = %e, commands = group.len(), "store commit failed; nothing of these batches was acknowledged");
            let msg = format!("store commit failed: {e}");
            results = group.iter().map(|_| Err(msg.clone())).collect();
            reload = true;
        } else {
            self.acked.extend(staged_acked);
            for (endpoint, at) in staged_cursors {
                if let Some(c) = self.rw_cursors.get_mut(&endpoint) {
                    *c = (*c).max(at);
                }
            }
            for (sk, id) in new_series {
                sk.id.store(id, Ordering::Relaxed);
            }
            head.wal_bytes += wal_bytes;
            let stats = &self.detect_stats;
            stats.scored.fetch_add(scored, Ordering::Relaxed);
            stats.alarms.fetch_add(alarmed, Ordering::Relaxed);
            stats
                .series
                .store(self.detectors.len() as u64, Ordering::Relaxed);
            if out_of_order > 0 {
                head.out_of_order_total += out_of_order;
                tracing::warn!(
                    dropped = out_of_order,
                    dropped_total = head.out_of_order_total,
                    "dropped samples not newer than the newest stored sample of their series (out of order or duplicate)"
                );
            }
        }
        if reload {
            // The head took samples that did not commit: rebuild it from disk.
            match load_head(&self.conn) {
                Ok(h) => *head = h,
                Err(e) => {
                    tracing::error!(error = %e, "cannot reload the head after a failed commit")
                }
            }
        }
        drop(head);
        if checkpoint_asked {
            let r = self.checkpoint(false).map_err(|e| e.to_string());
            for (cmd, res) in group.iter().zip(results.iter_mut()) {
                if matches!(cmd, Command::Checkpoint { .. }) && res.is_ok() {
                    *res = r.clone().map(|_| CommandResult::Done);
                }
            }
        }
        for (cmd, res) in group.into_iter().zip(results) {
            match cmd {
                Command::Hello { reply, .. } => {
                    let _ = reply.send(res.map(|r| match r {
                        CommandResult::Hello(s) => s,
                        _ => 0,
                    }));
                }
                Command::Write { reply, .. } => {
                    let _ = reply.send(res.map(|r| match r {
                        CommandResult::Write(o) => o,
                        _ => Outcome::Duplicate,
                    }));
                }
                Command::Checkpoint { reply } | Command::Cursor { reply, .. } => {
                    let _ = reply.send(res.map(|_| ()));
                }
            }
        }
    }

    /// Starts a checkpoint round when one is due (time or WAL size), and
    /// goes on with the one in progress by one step; between rounds, gives
    /// a few free pages back.
    fn maybe_checkpoint(&mut self) {
        if self.round.is_none() {
            let wal_bytes = self.head.read().map(|h| h.wal_bytes).unwrap_or(0);
            let due = self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval
                || wal_bytes >= self.opts.checkpoint_wal_bytes;
            if !due {
                if self.vacuum_left > 0 {
                    self.vacuum_step(Some(VACUUM_STEP_PAGES));
                }
                return;
            }
            if let Err(e) = self.start_round(false) {
                tracing::error!(error = %e, "checkpoint failed; the WAL keeps growing until one succeeds");
                return;
            }
        }
        let budget = (
            self.opts.checkpoint_step_series.max(1),
            CHECKPOINT_STEP_TIME,
        );
        if let Err(e) = self.checkpoint_step(Some(budget)) {
            self.round = None;
            tracing::error!(error = %e, "checkpoint failed; the WAL keeps growing until one succeeds");
        }
    }

    fn start_round(&mut self, compact: bool) -> Result<(), StoreError> {
        self.last_checkpoint = Instant::now();
        let wal_bytes = match self.head.read() {
            Ok(h) => h.wal_bytes,
            Err(p) => p.into_inner().wal_bytes,
        };
        self.round = Some(Round {
            wal_id: last_wal_id(&self.conn)?,
            wal_bytes,
            next: 0,
            trimming: false,
            compact,
            started: Instant::now(),
            steps: 0,
        });
        Ok(())
    }

    /// A whole checkpoint now: a new round run to its end in one step,
    /// and every free page given back.
    /// `compact`: open chunks in their compact form, which costs a decode
    /// and an encode of each (the last checkpoint before exit, when nothing
    /// waits for the writer any more); else their streaming form.
    fn checkpoint(&mut self, compact: bool) -> Result<(), StoreError> {
        self.start_round(compact)?;
        while !self
            .checkpoint_step(None)
            .inspect_err(|_| self.round = None)?
        {}
        self.vacuum_step(None);
        Ok(())
    }

    /// One step of the round, within `budget` (series or WAL rows, time);
    /// without one, the rest of the phase. Snapshot phase: writes the next
    /// slice of series' open chunks to `head_snapshot`; the transaction of
    /// the last slice records the round's WAL id as covered (replay starts
    /// after it) and applies the retention to chunks. Trim phase: deletes
    /// covered WAL rows (those a remote-write endpoint has not delivered
    /// stay, unless older than the retention), a slice per step; every
    /// series' snapshot row holds their samples already. Returns whether
    /// the round ended.
    fn checkpoint_step(&mut self, budget: Option<(usize, Duration)>) -> Result<bool, StoreError> {
        let Some(round) = self.round.as_mut() else {
            return Ok(true);
        };
        let t0 = Instant::now();
        round.steps += 1;
        if round.trimming {
            let keep_above = self.rw_cursors.values().copied().min().unwrap_or(i64::MAX);
            let upto = keep_above.min(round.wal_id);
            let limit = budget.map_or(i64::MAX, |(n, _)| n.min(TRIM_STEP_ROWS) as i64);
            let tx = self.conn.unchecked_transaction()?;
            let deleted = tx.execute(
                "DELETE FROM wal WHERE id IN (SELECT id FROM wal WHERE id <= ?1 ORDER BY id LIMIT ?2)",
                params![upto, limit],
            )?;
            tx.commit()?;
            if deleted as i64 >= limit {
                return Ok(false);
            }
            let (took, steps, covered_bytes) =
                (round.started.elapsed(), round.steps, round.wal_bytes);
            self.round = None;
            match self.head.write() {
                Ok(mut h) => h.wal_bytes = h.wal_bytes.saturating_sub(covered_bytes),
                Err(p) => {
                    let mut h = p.into_inner();
                    h.wal_bytes = h.wal_bytes.saturating_sub(covered_bytes);
                }
            }
            // SQLite's own WAL file back to nothing (a few pages to copy:
            // it checkpoints itself every 1000 pages).
            let _ = self
                .conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            // Free pages are reused by the next rows; only a file that is
            // mostly free (a backlog gone, old data expired) is shrunk.
            let pages = |pragma: &str| -> u64 {
                self.conn
                    .query_row(pragma, [], |r| r.get::<_, i64>(0))
                    .map_or(0, |n| n.max(0) as u64)
            };
            let (free, total) = (pages("PRAGMA freelist_count"), pages("PRAGMA page_count"));
            self.vacuum_left = if free * 2 > total {
                free - total / 4
            } else {
                0
            };
            tracing::debug!(
                ?took,
                steps,
                free_pages = free,
                pages = total,
                "checkpoint done"
            );
            return Ok(true);
        }
        // Only this thread changes the head: readers may go on meanwhile.
        let head = match self.head.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let tx = self.conn.unchecked_transaction()?;
        {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO head_snapshot (series_id, data) VALUES (?1, ?2)",
            )?;
            let mut del = tx.prepare_cached("DELETE FROM head_snapshot WHERE series_id = ?1")?;
            let mut written = 0usize;
            while round.next < head.series.len() {
                let id = round.next;
                round.next += 1;
                let Some(s) = &head.series[id] else {
                    continue;
                };
                if s.open.is_empty() {
                    // Its samples are in closed chunks now (or it has none).
                    del.execute([id as i64])?;
                } else {
                    let data = if round.compact {
                        s.open.compact_bytes()
                    } else {
                        s.open.bytes()
                    };
                    ins.execute(params![id as i64, data])?;
                }
                written += 1;
                if let Some((max_series, max_time)) = budget
                    && (written >= max_series
                        || (written.is_multiple_of(256) && t0.elapsed() >= max_time))
                {
                    break;
                }
            }
        }
        let snapshot_done = round.next >= head.series.len();
        drop(head);
        if snapshot_done {
            let covered = round.wal_id;
            tx.execute(
                "INSERT INTO store_meta (key, value) VALUES ('checkpoint_wal_id', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = ?1",
                [covered],
            )?;
            let cutoff = vitals_common::now_ms() - self.opts.retention.as_millis() as i64;
            let (expired_rows, expired_samples): (i64, i64) = tx.query_row(
                "SELECT count(*), coalesce(sum(samples), 0) FROM wal WHERE received_ms < ?1 AND id <= ?2",
                params![cutoff, covered],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if expired_rows > 0 && !self.rw_cursors.is_empty() {
                tx.execute(
                    "DELETE FROM wal WHERE received_ms < ?1 AND id <= ?2",
                    params![cutoff, covered],
                )?;
                tracing::error!(
                    rows = expired_rows,
                    samples = expired_samples,
                    retention = ?self.opts.retention,
                    "remote write: samples not delivered within storage.retention dropped from the queue"
                );
            }
            let expired = tx.execute("DELETE FROM chunks WHERE max_ts < ?1", [cutoff])?;
            if expired > 0 {
                tracing::debug!(expired_chunks = expired, "retention: chunks deleted");
            }
            round.trimming = true;
        }
        tx.commit()?;
        Ok(false)
    }

    /// Gives up to `pages` free pages back to the file system (`None`:
    /// every free page).
    fn vacuum_step(&mut self, pages: Option<u64>) {
        // incremental_vacuum(0) frees every page.
        let n = match pages {
            Some(p) => p.min(self.vacuum_left).max(1),
            None => 0,
        };
        // It answers with rows: step through them all.
        if let Ok(mut st) = self
            .conn
            .prepare(&format!("PRAGMA incremental_vacuum({n})"))
            && let Ok(mut rows) = st.query([])
        {
            while let Ok(Some(_)) = rows.next() {}
        }
        self.vacuum_left = match pages {
            Some(_) => self.vacuum_left.saturating_sub(n),
            None => 0,
        };
    }
}

/// Series whose open chunks a query copies per hold of the head's lock.
const QUERY_SLICE_SERIES: usize = 1024;

/// Free pages given back per step between batches (4 MiB of 4 KiB pages).
const VACUUM_STEP_PAGES: u64 = 1024;
/// Covered WAL rows deleted per step (a batch each, a few KiB).
const TRIM_STEP_ROWS: usize = 1024;

/// What `insert_batch` needs to score samples.
struct Detection<'a> {
    selector: &'a Selector,
    detectors: &'a mut DetectorSet<i64>,
    alarms: &'a mut HashMap<String, u64>,
    /// Samples scored and alarms in this batch.
    scored: u64,
    alarmed: u64,
}

/// Appends one sample to a series' open chunk, closing the chunk into
/// `chunks` when full. False when the sample is not newer than the series'
/// newest (the forward-only rule).
fn append(
    head: &mut Head,
    close: &mut rusqlite::CachedStatement<'_>,
    id: i64,
    ts: i64,
    v: f64,
) -> Result<bool, rusqlite::Error> {
    let Some(s) = head.get_mut(id) else {
        return Ok(false);
    };
    if s.last_ts.is_some_and(|l| ts <= l) {
        return Ok(false);
    }
    if let Some((lo, hi)) = s.open.time_range()
        && (s.open.len() >= CHUNK_MAX_SAMPLES || ts.saturating_sub(lo) >= CHUNK_MAX_SPAN_MS)
    {
        close.execute(params![
            id,
            lo,
            hi,
            s.open.len() as i64,
            s.open.compact_bytes()
        ])?;
        s.open = ChunkEncoder::new();
    }
    s.open.push(ts, v);
    s.last_ts = Some(ts);
    Ok(true)
}

/// The id of the series (name, labels), created if new.
fn series_id(
    tx: &Transaction<'_>,
    head: &mut Head,
    name: &str,
    labels: Labels,
) -> Result<i64, rusqlite::Error> {
    let json = labels_json(&labels);
    let key = format!("{name}{json}");
    if let Some(id) = head.by_key.get(key.as_str()) {
        return Ok(*id);
    }
    tx.prepare_cached("INSERT INTO series (name, labels) VALUES (?1, ?2)")?
        .execute(params![name, json])?;
    let id = tx.last_insert_rowid();
    head.insert(id, name.into(), Arc::new(labels), key.into());
    Ok(id)
}

/// The score series of series `id`, if the detector scores it: named
/// `vitals_anomaly_score`, with the series' labels plus `metric` (its name).
fn score_series(
    tx: &Transaction<'_>,
    head: &mut Head,
    selector: &Selector,
    id: i64,
) -> Result<Option<i64>, rusqlite::Error> {
    let Some(s) = head.get_mut(id) else {
        return Ok(None);
    };
    if let Some(sid) = s.score_id {
        return Ok(Some(sid));
    }
    let selected = *s.detect.get_or_insert_with(|| {
        &*s.name != SCORE_METRIC
            && &*s.name != ALARMS_METRIC
            && selector.matches(&s.name, &s.labels)
    });
    if !selected {
        return Ok(None);
    }
    let mut labels = (*s.labels).clone();
    let key = if labels.contains_key("metric") {
        "anomaly_metric"
    } else {
        "metric"
    };
    labels.insert(key.into(), s.name.to_string());
    let sid = series_id(tx, head, SCORE_METRIC, labels)?;
    if let Some(s) = head.get_mut(id) {
        s.score_id = Some(sid);
    }
    Ok(Some(sid))
}

/// Resolves series, appends accepted samples to the head (closing full
/// chunks into `chunks`), writes the WAL row and events. Returns (dropped
/// samples, WAL bytes).
// The writer's transaction state, spelled out rather than bundled.
#[allow(clippy::too_many_arguments)]
fn insert_batch(
    tx: &Transaction<'_>,
    head: &mut Head,
    node: &str,
    instance_id: &str,
    batch: &CleanBatch,
    now: i64,
    new_series: &mut Vec<(Arc<SeriesKey>, i64)>,
    mut detect: Option<&mut Detection<'_>>,
) -> Result<(u64, u64), rusqlite::Error> {
    let mut ids = Vec::with_capacity(batch.series.len());
    for sk in &batch.series {
        let cached = sk.id.load(Ordering::Relaxed);
        let id = if cached > 0 {
            cached
        } else {
            match head.by_key.get(&*sk.key) {
                Some(id) => {
                    sk.id.store(*id, Ordering::Relaxed);
                    *id
                }
                None => {
                    tx.prepare_cached("INSERT INTO series (name, labels) VALUES (?1, ?2)")?
                        .execute(params![&*sk.name, sk.labels_json()])?;
                    let id = tx.last_insert_rowid();
                    head.insert(id, sk.name.clone(), sk.labels.clone(), sk.key.clone());
                    // Remembered on the key only once the row is committed.
                    new_series.push((sk.clone(), id));
                    id
                }
            }
        };
        ids.push(id);
    }
    let mut accepted = Vec::with_capacity(batch.values.len());
    let mut dropped = 0u64;
    let mut close = tx.prepare_cached(
        "INSERT INTO chunks (series_id, min_ts, max_ts, count, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut alarms = 0u64;
    let mut newest = i64::MIN;
    for i in 0..batch.values.len() {
        let id = ids[batch.series_idx[i] as usize];
        let ts = batch.timestamps_ms[i];
        let v = batch.values[i];
        if !append(head, &mut close, id, ts, v)? {
            dropped += 1;
            continue;
        }
        accepted.push((id, ts, v));
        newest = newest.max(ts);
        if let Some(d) = detect.as_deref_mut()
            && let Some(sid) = score_series(tx, head, d.selector, id)?
        {
            let score = d.detectors.score(id, ts, v);
            d.scored += 1;
            if score >= ALARM {
                alarms += 1;
            }
            if append(head, &mut close, sid, ts, score)? {
                accepted.push((sid, ts, score));
            }
        }
    }
    // The node's alarm counter, one sample per batch that was scored.
    if let Some(d) = detect
        && newest > i64::MIN
    {
        d.alarmed += alarms;
        let total = d.alarms.entry(node.to_string()).or_default();
        *total += alarms;
        let total = *total as f64;
        let mut labels = Labels::new();
        labels.insert("node".into(), node.into());
        let cid = series_id(tx, head, ALARMS_METRIC, labels)?;
        if append(head, &mut close, cid, newest, total)? {
            accepted.push((cid, newest, total));
        }
    }
    let data = encode_wal(&accepted);
    tx.prepare_cached(
        "INSERT INTO wal (node, instance_id, seq, received_ms, crc, data, samples) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        node,
        instance_id,
        batch.seq as i64,
        now,
        crc32fast::hash(&data) as i64,
        data,
        accepted.len() as i64
    ])?;
    let mut ev = tx.prepare_cached(
        "INSERT INTO events (ts, node, kind, severity, message, labels) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for e in &batch.events {
        ev.execute(params![
            e.timestamp_ms,
            node,
            e.kind,
            e.severity,
            e.message,
            labels_json(&e.labels)
        ])?;
    }
    Ok((dropped, data.len() as u64))
}

// ------------------------------------------------------------------ reads --

/// One stored batch as remote write reads it back from the WAL.
#[derive(Debug, Clone)]
pub struct WalRow {
    pub id: i64,
    pub received_ms: i64,
    /// (series id, timestamp ms, value); None: the row is corrupt.
    pub samples: Option<Vec<(i64, i64, f64)>>,
}

/// One node as the store knows it.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub agent_version: String,
    pub last_seen_ms: i64,
}

/// One series and its points in a range.
#[derive(Debug, Clone)]
pub struct SeriesPoints {
    pub name: String,
    pub labels: Labels,
    pub points: Vec<(i64, f64)>,
}

/// Limits a range query must respect.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    pub max_series: usize,
    pub max_points: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("query matches more than {0} series; narrow the selector")]
    TooManySeries(usize),
    #[error("query returns more than {0} points; narrow the time range or the selector")]
    TooManyPoints(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for QueryError {
    fn from(e: rusqlite::Error) -> Self {
        QueryError::Store(StoreError::Sql(e))
    }
}

impl Store {
    pub fn list_nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let conn = open_reader(&self.path)?;
        let mut stmt =
            conn.prepare("SELECT name, agent_version, last_seen_ms FROM nodes ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(NodeRow {
                name: r.get(0)?,
                agent_version: r.get(1)?,
                last_seen_ms: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Points of every matching series in [start, end]: closed chunks that
    /// overlap the range (others are never read), then the open head chunk.
    pub fn query_range(
        &self,
        selector: &Selector,
        start_ms: i64,
        end_ms: i64,
        limits: QueryLimits,
    ) -> Result<Vec<SeriesPoints>, QueryError> {
        let mut result = Vec::new();
        self.each_series_points(
            selector,
            start_ms,
            end_ms,
            limits,
            |name, labels, points| {
                result.push(SeriesPoints {
                    name: name.to_string(),
                    labels: labels.clone(),
                    points: points.to_vec(),
                });
            },
        )?;
        Ok(result)
    }

    /// As [`Store::query_range`], one series at a time: `each(name, labels,
    /// points)` for every matched series with a sample in the range, in
    /// name and label order, its points in a buffer reused for the next
    /// series — a query over many series never holds all their samples.
    /// `limits.max_points` still counts every sample read.
    pub fn each_series_points(
        &self,
        selector: &Selector,
        start_ms: i64,
        end_ms: i64,
        limits: QueryLimits,
        mut each: impl FnMut(&str, &Labels, &[(i64, f64)]),
    ) -> Result<(), QueryError> {
        let conn = open_reader(&self.path)?;
        // The matching series first: ids and shared names and labels, cheap
        // to copy under the head's lock (which the writer waits for).
        let mut matched: Vec<(i64, Arc<str>, Arc<Labels>)> = {
            let head = match self.head.read() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            let candidates: Box<dyn Iterator<Item = i64>> = if selector.metric.is_empty() {
                Box::new(
                    (0..head.series.len() as i64).filter(|i| head.series[*i as usize].is_some()),
                )
            } else {
                Box::new(
                    head.by_name
                        .get(selector.metric.as_str())
                        .into_iter()
                        .flatten()
                        .copied(),
                )
            };
            let mut out = Vec::new();
            for id in candidates {
                let Some(s) = head.series.get(id as usize).and_then(Option::as_ref) else {
                    continue;
                };
                if !selector.matches(&s.name, &s.labels) {
                    continue;
                }
                if out.len() >= limits.max_series {
                    return Err(QueryError::TooManySeries(limits.max_series));
                }
                out.push((id, s.name.clone(), s.labels.clone()));
            }
            out
        };
        matched.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.2.cmp(&b.2)));
        let mut total = 0usize;
        let mut points = Vec::new();
        // Then a slice of series at a time: with the head locked, pin a
        // database snapshot and copy the slice's open chunks, so that a
        // chunk closed concurrently is seen exactly once (head or table);
        // the lock is held for one slice only.
        for slice in matched.chunks(QUERY_SLICE_SERIES) {
            conn.execute_batch("BEGIN")?;
            let opens: Vec<Option<Vec<u8>>> = {
                let head = match self.head.read() {
                    Ok(h) => h,
                    Err(p) => p.into_inner(),
                };
                conn.query_row("SELECT count(*) FROM nodes", [], |_| Ok(()))?;
                slice
                    .iter()
                    .map(|(id, _, _)| {
                        let s = head.series.get(*id as usize).and_then(Option::as_ref)?;
                        s.open
                            .time_range()
                            .filter(|(lo, hi)| *hi >= start_ms && *lo <= end_ms)
                            .map(|_| s.open.bytes())
                    })
                    .collect()
            };
            let mut stmt = conn.prepare_cached(
                "SELECT data FROM chunks WHERE series_id = ?1 AND max_ts >= ?2 AND min_ts <= ?3 ORDER BY min_ts",
            )?;
            for ((id, name, labels), open) in slice.iter().zip(opens) {
                let id = *id;
                points.clear();
                let mut take = |bytes: &[u8],
                                points: &mut Vec<(i64, f64)>|
                 -> Result<(), QueryError> {
                    let mut over = false;
                    chunk::decode_into(bytes, |ts, v| {
                            if ts > end_ms {
                                return false;
                            }
                            if ts >= start_ms {
                                points.push((ts, v));
                                total += 1;
                                if total > limits.max_points {
                                    over = true;
                                    return false;
                                }
                            }
                            true
                        })
                        .map_err(|e| {
                            tracing::error!(series = id, error = %e, "corrupt chunk skipped in a query");
                        })
                        .ok();
                    if over {
                        return Err(QueryError::TooManyPoints(limits.max_points));
                    }
                    Ok(())
                };
                let mut rows = stmt.query(params![id, start_ms, end_ms])?;
                while let Some(r) = rows.next()? {
                    let data: Vec<u8> = r.get(0)?;
                    take(&data, &mut points)?;
                }
                if let Some(open) = open {
                    take(&open, &mut points)?;
                }
                if !points.is_empty() {
                    each(name, labels, &points);
                }
            }
            drop(stmt);
            conn.execute_batch("COMMIT")?;
        }
        Ok(())
    }

    /// Number of series known.
    pub fn series_count(&self) -> usize {
        self.head.read().map(|h| h.series_count()).unwrap_or(0)
    }

    /// The anomaly detector's counts since the start.
    pub fn detect_stats(&self) -> &DetectStats {
        &self.detect
    }

    /// Samples dropped since the start for not being newer than the newest
    /// stored sample of their series (out of order or duplicate).
    pub fn out_of_order_total(&self) -> u64 {
        self.head.read().map(|h| h.out_of_order_total).unwrap_or(0)
    }

    /// The last WAL id remote-write endpoint `endpoint` delivered (the
    /// writer created the row at start for every configured endpoint).
    pub fn remote_write_cursor(&self, endpoint: &str) -> Result<i64, StoreError> {
        let conn = open_reader(&self.path)?;
        Ok(conn.query_row(
            "SELECT wal_id FROM remote_write_cursors WHERE endpoint = ?1",
            [endpoint],
            |r| r.get(0),
        )?)
    }

    /// WAL rows after `after`, in id order, until they hold at least
    /// `max_samples` samples or `max_rows` rows. A row that fails its CRC
    /// or does not decode comes back with `samples: None`.
    pub fn wal_after(
        &self,
        after: i64,
        max_samples: usize,
        max_rows: usize,
    ) -> Result<Vec<WalRow>, StoreError> {
        let conn = open_reader(&self.path)?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, received_ms, crc, data FROM wal WHERE id > ?1 ORDER BY id LIMIT ?2",
        )?;
        let mut rows = stmt.query(params![after, max_rows as i64])?;
        let mut out = Vec::new();
        let mut total = 0usize;
        while let Some(r) = rows.next()? {
            let (id, received_ms, crc, data): (i64, i64, i64, Vec<u8>) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let samples = (crc32fast::hash(&data) as i64 == crc)
                .then(|| decode_wal(&data))
                .flatten();
            total += samples.as_ref().map_or(0, Vec::len);
            out.push(WalRow {
                id,
                received_ms,
                samples,
            });
            if total >= max_samples {
                break;
            }
        }
        Ok(out)
    }

    /// What is stored after WAL id `after`: (samples, the oldest row's
    /// receive time).
    pub fn wal_backlog(&self, after: i64) -> Result<(u64, Option<i64>), StoreError> {
        let conn = open_reader(&self.path)?;
        Ok(conn.query_row(
            "SELECT coalesce(sum(samples), 0), min(received_ms) FROM wal WHERE id > ?1",
            [after],
            |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
        )?)
    }

    /// Name and labels of each series id (None: unknown id).
    pub fn series_identities(&self, ids: &[i64]) -> Vec<Option<(String, Labels)>> {
        let head = match self.head.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        ids.iter()
            .map(|id| {
                head.series
                    .get(*id as usize)
                    .and_then(Option::as_ref)
                    .map(|s| (s.name.to_string(), (*s.labels).clone()))
            })
            .collect()
    }

    /// Bytes on disk: the database file and its SQLite WAL.
    pub fn disk_bytes(&self) -> u64 {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        size(&self.path) + size(Path::new(&wal))
    }

    /// Every series (name, labels), unsorted; read from the head's index.
    pub fn for_each_series(&self, mut f: impl FnMut(&str, &Labels)) {
        let head = match self.head.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        for s in head.series.iter().flatten() {
            f(&s.name, &s.labels);
        }
    }

    /// Series (name, labels) the selector matches, sorted, at most `limit`;
    /// the flag says whether more matched. Read from the head's index only.
    pub fn list_series(&self, selector: &Selector, limit: usize) -> (Vec<(String, Labels)>, bool) {
        let head = match self.head.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let mut shared: Vec<(Arc<str>, Arc<Labels>)> = Vec::new();
        let mut consider = |s: &HeadSeries| {
            if selector.matches(&s.name, &s.labels) {
                shared.push((s.name.clone(), s.labels.clone()));
            }
        };
        if selector.metric.is_empty() {
            head.series.iter().flatten().for_each(&mut consider);
        } else {
            for id in head
                .by_name
                .get(selector.metric.as_str())
                .into_iter()
                .flatten()
            {
                if let Some(s) = head.series.get(*id as usize).and_then(Option::as_ref) {
                    consider(s);
                }
            }
        }
        drop(head);
        shared.sort();
        let mut more = false;
        let mut out: Vec<(String, Labels)> = shared
            .into_iter()
            .take(limit.saturating_add(1))
            .map(|(n, l)| (n.to_string(), (*l).clone()))
            .collect();
        if out.len() > limit {
            out.truncate(limit);
            more = true;
        }
        (out, more)
    }

    /// Like [`Store::list_series`], only series with a sample in
    /// [start, end]: the open head chunk's time range, else the last
    /// closed chunk that starts by `end` (chunks of a series do not
    /// overlap, so it is the only candidate).
    pub fn list_series_in(
        &self,
        selector: &Selector,
        start_ms: i64,
        end_ms: i64,
        limit: usize,
    ) -> Result<(Vec<(String, Labels)>, bool), StoreError> {
        let conn = open_reader(&self.path)?;
        // One snapshot pinned while the head is locked (see query_range).
        conn.execute_batch("BEGIN")?;
        let candidates: Vec<(i64, Arc<str>, Arc<Labels>, bool)> = {
            let head = match self.head.read() {
                Ok(h) => h,
                Err(p) => p.into_inner(),
            };
            conn.query_row("SELECT count(*) FROM nodes", [], |_| Ok(()))?;
            let mut out = Vec::new();
            let mut consider = |id: i64, s: &HeadSeries| {
                if selector.matches(&s.name, &s.labels) {
                    let open = s
                        .open
                        .time_range()
                        .is_some_and(|(lo, hi)| hi >= start_ms && lo <= end_ms);
                    out.push((id, s.name.clone(), s.labels.clone(), open));
                }
            };
            if selector.metric.is_empty() {
                for (id, s) in head.series.iter().enumerate() {
                    if let Some(s) = s {
                        consider(id as i64, s);
                    }
                }
            } else {
                for id in head
                    .by_name
                    .get(selector.metric.as_str())
                    .into_iter()
                    .flatten()
                {
                    if let Some(s) = head.series.get(*id as usize).and_then(Option::as_ref) {
                        consider(*id, s);
                    }
                }
            }
            out
        };
        let mut stmt = conn.prepare_cached(
            "SELECT max_ts FROM chunks WHERE series_id = ?1 AND min_ts <= ?2 ORDER BY min_ts DESC LIMIT 1",
        )?;
        let mut out = Vec::new();
        for (id, name, labels, open) in candidates {
            let found = open || {
                let max: Option<i64> = stmt
                    .query_row(params![id, end_ms], |r| r.get(0))
                    .map(Some)
                    .or_else(|e| match e {
                        rusqlite::Error::QueryReturnedNoRows => Ok(None),
                        e => Err(e),
                    })?;
                max.is_some_and(|m| m >= start_ms)
            };
            if found {
                out.push((name, labels));
            }
        }
        drop(stmt);
        conn.execute_batch("COMMIT")?;
        out.sort();
        let more = out.len() > limit;
        out.truncate(limit);
        let out = out
            .into_iter()
            .map(|(n, l)| (n.to_string(), (*l).clone()))
            .collect();
        Ok((out, more))
    }

    /// Per node (its `node` label), what its series tell about its
    /// sources: the `source` label of its `vitals_source_success` series,
    /// and gpu / slurm / zfs / nfsd from metric names (`gpu_*`,
    /// `vitals_slurm_*`, `node_zfs_*`, `node_nfsd_*`).
    pub fn node_sources(&self) -> HashMap<String, std::collections::BTreeSet<String>> {
        let head = match self.head.read() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        };
        let mut out: HashMap<String, std::collections::BTreeSet<String>> = HashMap::new();
        for s in head.series.iter().flatten() {
            let Some(node) = s.labels.get("node") else {
                continue;
            };
            let source = if &*s.name == "vitals_source_success" {
                s.labels.get("source").map(String::as_str)
            } else if s.name.starts_with("gpu_") {
                Some("gpu")
            } else if s.name.starts_with("vitals_slurm_") {
                Some("slurm")
            } else if s.name.starts_with("node_zfs_") {
                Some("zfs")
            } else if s.name.starts_with("node_nfsd_") {
                Some("nfsd")
            } else {
                None
            };
            if let Some(src) = source {
                out.entry(node.clone()).or_default().insert(src.to_string());
            }
        }
        out
    }

    /// Events in [start, end], newest first, optionally of one node / kind.
    pub fn list_events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let conn = open_reader(&self.path)?;
        let mut stmt = conn.prepare_cached(
            "SELECT ts, node, kind, severity, message, labels FROM events
             WHERE ts >= ?1 AND ts <= ?2 AND (?3 = '' OR node = ?3) AND (?4 = '' OR kind = ?4)
             ORDER BY ts DESC, id DESC LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![
                f.start_ms,
                f.end_ms,
                f.node,
                f.kind,
                i64::try_from(f.limit).unwrap_or(i64::MAX)
            ],
            |r| {
                let labels: String = r.get(5)?;
                Ok(EventRow {
                    timestamp_ms: r.get(0)?,
                    node: r.get(1)?,
                    kind: r.get(2)?,
                    severity: r.get(3)?,
                    message: r.get(4)?,
                    labels: serde_json::from_str(&labels).unwrap_or_default(),
                })
            },
        )?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Empty: every node / kind.
    pub node: String,
    pub kind: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub limit: usize,
}

/// One stored event.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub timestamp_ms: i64,
    pub node: String,
    pub kind: String,
    pub severity: i32,
    pub message: String,
    pub labels: Labels,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, node: &str, ts: i64, v: f64) -> CleanBatch {
        let mut labels = Labels::new();
        labels.insert("node".into(), node.into());
        CleanBatch {
            seq,
            series: vec![Arc::new(SeriesKey::new("m".into(), labels))],
            series_idx: vec![0],
            timestamps_ms: vec![ts],
            values: vec![v],
            events: vec![],
        }
    }

    fn start(path: &Path) -> (Writer, Store, std::thread::JoinHandle<()>) {
        spawn_writer(open(path).unwrap(), path, StoreOptions::default()).unwrap()
    }

    fn points(store: &Store, sel: &str, lo: i64, hi: i64) -> Vec<(i64, f64)> {
        let sel = vitals_common::selector::parse(sel).unwrap();
        let lim = QueryLimits {
            max_series: 100,
            max_points: 1_000_000,
        };
        store
            .query_range(&sel, lo, hi, lim)
            .unwrap()
            .into_iter()
            .flat_map(|s| s.points)
            .collect()
    }

    async fn put(w: &Writer, inst: &str, b: CleanBatch) -> Outcome {
        w.write("a", inst, b).await.unwrap().await.unwrap().unwrap()
    }

    fn start_rw(path: &Path, endpoints: &[&str]) -> (Writer, Store, std::thread::JoinHandle<()>) {
        let opts = StoreOptions {
            remote_write: endpoints.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        spawn_writer(open(path).unwrap(), path, opts).unwrap()
    }

    fn wal_ids(store: &Store, after: i64) -> Vec<i64> {
        store
            .wal_after(after, usize::MAX, 1000)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect()
    }

    /// Checkpoint rounds go a few series at a time between batches; the
    /// writer stopped without its last checkpoint (a crash) at every point
    /// of a round — chunks closing meanwhile, the WAL partly covered —
    /// comes back with every sample exactly once, and a finished round
    /// leaves only the rows after it in the WAL.
    #[test]
    fn a_crash_at_any_point_of_a_checkpoint_round_loses_nothing() {
        const SERIES: usize = 10;
        const WRITES: u64 = 40;
        // Every 7th write jumps over the chunk span: chunks close mid-round.
        // Recent enough that the retention keeps the closed chunks.
        let base = vitals_common::now_ms() - 30 * CHUNK_MAX_SPAN_MS;
        let ts_of = |k: u64| base + k as i64 * 1000 + (k as i64 / 7) * CHUNK_MAX_SPAN_MS;
        let write = |st: &mut WriterState, k: u64| {
            let series = (0..SERIES)
                .map(|i| {
                    let mut l = Labels::new();
                    l.insert("node".into(), "a".into());
                    l.insert("s".into(), i.to_string());
                    Arc::new(SeriesKey::new("m".into(), l))
                })
                .collect::<Vec<_>>();
            let (reply, mut rx) = oneshot::channel();
            st.apply(vec![Command::Write {
                node: "a".into(),
                instance_id: "i".into(),
                batch: CleanBatch {
                    seq: k,
                    series,
                    series_idx: (0..SERIES as u32).collect(),
                    timestamps_ms: vec![ts_of(k); SERIES],
                    values: (0..SERIES).map(|i| (k * 100 + i as u64) as f64).collect(),
                    events: vec![],
                },
                reply,
                from_agent: true,
                detect: false,
            }]);
            assert_eq!(rx.try_recv().unwrap().unwrap(), Outcome::Stored);
            st.maybe_checkpoint();
        };
        let (mut rounds_done, mut finished_rounds_checked) = (0, 0);
        for crash_after in [1, 3, 4, 5, 9, 13, 22, 31, WRITES] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("v.db");
            let opts = StoreOptions {
                checkpoint_interval: Duration::ZERO,
                checkpoint_step_series: 3,
                ..Default::default()
            };
            let (mut st, _store) = writer_state(open(&path).unwrap(), &path, opts).unwrap();
            for k in 1..=crash_after {
                write(&mut st, k);
            }
            if crash_after == WRITES {
                // An idle writer finishes the round by itself.
                while st.round.is_some() {
                    st.maybe_checkpoint();
                }
            }
            let mid_round = st.round.as_ref().map(|r| r.next);
            let covered: i64 = st
                .conn
                .query_row(
                    "SELECT coalesce((SELECT value FROM store_meta WHERE key = 'checkpoint_wal_id'), 0)",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let (covered_left, total_left): (i64, i64) = st
                .conn
                .query_row(
                    "SELECT count(*) FILTER (WHERE id <= ?1), count(*) FROM wal",
                    [covered],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            if covered > 0 {
                rounds_done += 1;
                if st.round.is_none() {
                    finished_rounds_checked += 1;
                    assert_eq!(covered_left, 0, "rows up to the covered id are gone");
                    assert_eq!(total_left, crash_after as i64 - covered, "the rest stay");
                }
            }
            drop(st); // no final checkpoint

            let (w, store, h) = start(&path);
            for i in 0..SERIES {
                let got = points(&store, &format!("m{{s=\"{i}\"}}"), 0, i64::MAX);
                let want: Vec<_> = (1..=crash_after)
                    .map(|k| (ts_of(k), (k * 100 + i as u64) as f64))
                    .collect();
                assert_eq!(
                    got, want,
                    "series {i} after a crash after write {crash_after} (round at {mid_round:?})"
                );
            }
            drop((w, store));
            h.join().unwrap();
        }
        assert!(
            finished_rounds_checked >= 1,
            "the last crash point comes after a finished round"
        );
        assert!(
            rounds_done >= 5,
            "rounds finished before some crashes: {rounds_done}"
        );
    }

    /// A schema-5 database (WAL rows from before AUTOINCREMENT, no sample
    /// counts, not yet checkpointed) upgrades to 6: its WAL rows keep
    /// their ids and are replayed, and new rows get ids above them.
    #[tokio::test]
    async fn schema_5_database_is_upgraded_with_its_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        {
            let c = Connection::open(&path).unwrap();
            for step in &MIGRATIONS[..5] {
                let tx = c.unchecked_transaction().unwrap();
                match step {
                    Migration::Sql(sql) => tx.execute_batch(sql).unwrap(),
                    Migration::Rust(f) => f(&tx).unwrap(),
                }
                tx.commit().unwrap();
            }
            c.pragma_update(None, "user_version", 5).unwrap();
            c.execute(
                "INSERT INTO series (id, name, labels) VALUES (1, 'm', '{\"node\":\"a\"}')",
                [],
            )
            .unwrap();
            for (id, ts) in [(7i64, 1000i64), (9, 2000)] {
                let data = encode_wal(&[(1, ts, ts as f64)]);
                c.execute(
                    "INSERT INTO wal (id, node, instance_id, seq, received_ms, crc, data) VALUES (?1, 'a', 'i', ?1, 0, ?2, ?3)",
                    params![id, crc32fast::hash(&data) as i64, data],
                )
                .unwrap();
            }
        }
        let (w, store, h) = start_rw(&path, &["r"]);
        assert_eq!(
            points(&store, "m", 0, i64::MAX),
            vec![(1000, 1000.0), (2000, 2000.0)]
        );
        assert_eq!(wal_ids(&store, 0), vec![7, 9]);
        assert_eq!(
            store.remote_write_cursor("r").unwrap(),
            9,
            "a new endpoint starts at the end"
        );
        w.hello("a", "i2", "0").await.unwrap();
        assert_eq!(
            put(&w, "i2", batch(1, "a", 3000, 3.0)).await,
            Outcome::Stored
        );
        assert_eq!(wal_ids(&store, 0), vec![7, 9, 10]);
        drop((w, store));
        h.join().unwrap();
    }

    /// The WAL is remote write's queue: rows an endpoint has not
    /// delivered outlive checkpoints and restarts, its cursor only moves
    /// forward and survives a restart, ids never repeat, and the rows the
    /// snapshot covers are not replayed into the head again.
    #[tokio::test]
    async fn wal_rows_wait_for_the_slowest_remote_write_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, store, h) = start_rw(&path, &["a", "b"]);
        assert_eq!(store.remote_write_cursor("a").unwrap(), 0);
        w.hello("a", "i1", "0").await.unwrap();
        for k in 1..=4 {
            assert_eq!(
                put(&w, "i1", batch(k, "a", 1000 * k as i64, k as f64)).await,
                Outcome::Stored
            );
        }
        assert_eq!(wal_ids(&store, 0), vec![1, 2, 3, 4]);
        let rows = store.wal_after(1, 2, 100).unwrap();
        assert_eq!(rows.len(), 2, "stops once it holds 2 samples");
        assert_eq!(rows[0].samples.as_deref(), Some(&[(1, 2000, 2.0)][..]));
        assert_eq!(
            store.wal_backlog(1).unwrap(),
            (3, Some(rows[0].received_ms))
        );
        w.remote_write_cursor("a", 3).await.unwrap();
        w.remote_write_cursor("b", 1).await.unwrap();
        w.remote_write_cursor("a", 2).await.unwrap(); // never backwards
        assert_eq!(store.remote_write_cursor("a").unwrap(), 3);
        w.checkpoint().await.unwrap();
        assert_eq!(wal_ids(&store, 0), vec![2, 3, 4], "b still needs 2..4");
        w.remote_write_cursor("b", 4).await.unwrap();
        w.remote_write_cursor("a", 4).await.unwrap();
        w.checkpoint().await.unwrap();
        assert!(wal_ids(&store, 0).is_empty());
        assert_eq!(
            put(&w, "i1", batch(5, "a", 5000, 5.0)).await,
            Outcome::Stored
        );
        assert_eq!(wal_ids(&store, 0), vec![5], "ids never repeat");
        drop((w, store));
        h.join().unwrap();

        // Restart with a third endpoint: it starts at the end of the WAL;
        // the others keep their cursors; the final checkpoint kept row 5
        // for them, and the head has every sample exactly once.
        let (w, store, h) = start_rw(&path, &["a", "b", "c"]);
        assert_eq!(store.remote_write_cursor("a").unwrap(), 4);
        assert_eq!(store.remote_write_cursor("c").unwrap(), 5);
        assert_eq!(wal_ids(&store, 0), vec![5]);
        assert_eq!(
            points(&store, "m", 0, i64::MAX),
            (1..=5).map(|k| (1000 * k, k as f64)).collect::<Vec<_>>()
        );
        assert_eq!(
            put(&w, "i1", batch(6, "a", 6000, 6.0)).await,
            Outcome::Stored
        );
        assert_eq!(wal_ids(&store, 4), vec![5, 6]);
        drop((w, store));
        h.join().unwrap();

        // Without endpoints a checkpoint empties the WAL as before.
        let (w, store, h) = start(&path);
        w.checkpoint().await.unwrap();
        assert!(wal_ids(&store, 0).is_empty());
        drop((w, store));
        h.join().unwrap();
    }

    #[tokio::test]
    async fn duplicates_out_of_order_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, store, h) = start(&path);
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 0);
        assert_eq!(put(&w, "i1", batch(1, "a", 10, 1.0)).await, Outcome::Stored);
        assert_eq!(
            put(&w, "i1", batch(1, "a", 10, 1.0)).await,
            Outcome::Duplicate
        );
        // Another instance of the same node has its own sequence space.
        assert_eq!(
            put(&w, "i2", batch(1, "a", 11, f64::NAN)).await,
            Outcome::Stored
        );
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 1);
        // Out of order (ts 5 < 11) is dropped, not stored.
        assert_eq!(put(&w, "i1", batch(2, "a", 5, 9.0)).await, Outcome::Stored);
        let got = points(&store, "m{node=\"a\"}", 0, 100);
        assert_eq!(got.len(), 2);
        assert!(got[1].1.is_nan());
        drop(w);
        h.join().unwrap();

        // Restart: acked sequences and the head survive.
        let (w, store, h) = start(&path);
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 2);
        assert_eq!(put(&w, "i1", batch(3, "a", 11, 3.0)).await, Outcome::Stored);
        assert_eq!(put(&w, "i1", batch(4, "a", 12, 4.0)).await, Outcome::Stored);
        let got = points(&store, "m", 0, 100);
        let ts: Vec<i64> = got.iter().map(|p| p.0).collect();
        assert_eq!(ts, vec![10, 11, 12]);
        assert_eq!(got[2].1, 4.0);
        let sel = vitals_common::selector::parse("m").unwrap();
        let lim = QueryLimits {
            max_series: 10,
            max_points: 2,
        };
        assert!(matches!(
            store.query_range(&sel, 0, 100, lim),
            Err(QueryError::TooManyPoints(2))
        ));
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn chunks_close_and_queries_read_only_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, store, h) = start(&path);
        let n = CHUNK_MAX_SAMPLES as i64 * 3 + 10;
        // Recent timestamps, so retention keeps them; 100 samples a batch.
        let t0 = vitals_common::now_ms() - n * 1000;
        for (k, first) in (0..n).step_by(100).enumerate() {
            let mut b = batch(k as u64 + 1, "a", 0, 0.0);
            b.timestamps_ms.clear();
            b.values.clear();
            b.series_idx.clear();
            for i in first..(first + 100).min(n) {
                b.timestamps_ms.push(t0 + i * 1000);
                b.values.push(i as f64);
                b.series_idx.push(0);
            }
            assert_eq!(put(&w, "i", b).await, Outcome::Stored);
        }
        let all = points(&store, "m", 0, i64::MAX);
        assert_eq!(all.len() as i64, n);
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, p)| p.0 == t0 + i as i64 * 1000 && p.1 == i as f64)
        );
        let mid = points(&store, "m", t0 + 1_500_000, t0 + 1_600_000);
        assert_eq!(mid.first().map(|p| p.0), Some(t0 + 1_500_000));
        assert_eq!(mid.len(), 101);
        let closed: i64 = open_reader(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .unwrap();
        assert_eq!(closed, 3);
        // Series with a sample in a range: closed chunks and the open one.
        let m = vitals_common::selector::parse("m").unwrap();
        let has = |store: &Store, lo: i64, hi: i64| {
            let (found, more) = store.list_series_in(&m, lo, hi, 10).unwrap();
            assert!(!more);
            !found.is_empty()
        };
        let last = t0 + (n - 1) * 1000;
        assert!(has(&store, t0 + 10_000, t0 + 20_000), "first closed chunk");
        assert!(
            has(&store, t0 + 2_000_000, t0 + 2_000_000),
            "second closed chunk"
        );
        assert!(has(&store, last, last + 5_000), "open chunk");
        assert!(has(&store, i64::MIN, i64::MAX));
        assert!(
            !has(&store, t0 - 100_000, t0 - 1),
            "before the first sample"
        );
        assert!(!has(&store, last + 1, i64::MAX), "after the last sample");
        let other = vitals_common::selector::parse("m{node=\"b\"}").unwrap();
        assert!(
            store
                .list_series_in(&other, i64::MIN, i64::MAX, 10)
                .unwrap()
                .0
                .is_empty()
        );
        w.checkpoint().await.unwrap();
        drop(w);
        h.join().unwrap();
        let (_w, store, _h) = start(&path);
        assert_eq!(
            points(&store, "m", 0, i64::MAX),
            all,
            "snapshot + chunks after restart"
        );
        assert!(has(&store, t0 + 10_000, t0 + 20_000));
        assert!(!has(&store, last + 1, i64::MAX));
    }

    /// A checkpoint deletes the closed chunks older than the retention, and
    /// finds them through the `max_ts` index rather than reading every chunk.
    #[tokio::test]
    async fn retention_deletes_old_chunks_through_the_max_ts_index() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let opts = StoreOptions {
            retention: Duration::from_secs(3600),
            ..Default::default()
        };
        let (w, store, h) = spawn_writer(open(&path).unwrap(), &path, opts).unwrap();
        // 3000 samples 10 s apart ending now: chunks close every 2 h (720
        // samples), so four are closed and the last 120 samples are open.
        let n = 3000i64;
        let t0 = vitals_common::now_ms() - n * 10_000;
        for (k, first) in (0..n).step_by(100).enumerate() {
            let mut b = batch(k as u64 + 1, "a", 0, 0.0);
            b.timestamps_ms = (first..first + 100).map(|i| t0 + i * 10_000).collect();
            b.values = (first..first + 100).map(|i| i as f64).collect();
            b.series_idx = vec![0; 100];
            assert_eq!(put(&w, "i", b).await, Outcome::Stored);
        }
        let chunks = || -> i64 {
            open_reader(&path)
                .unwrap()
                .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(chunks(), 4);
        assert_eq!(points(&store, "m", 0, i64::MAX).len() as i64, n);
        w.checkpoint().await.unwrap();
        // The first three chunks end over an hour ago; the fourth ends
        // 20 minutes ago and stays whole, with the open samples after it.
        assert_eq!(chunks(), 1);
        let kept = points(&store, "m", 0, i64::MAX);
        assert_eq!(kept.len(), 840);
        assert_eq!(kept[0], (t0 + 2160 * 10_000, 2160.0));
        let plan: Vec<String> = {
            let c = open_reader(&path).unwrap();
            let mut q = c
                .prepare("EXPLAIN QUERY PLAN DELETE FROM chunks WHERE max_ts < ?1")
                .unwrap();
            q.query_map([0i64], |r| r.get::<_, String>(3))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert!(
            plan.iter().any(|l| l.contains("INDEX chunks_max_ts")),
            "{plan:?}"
        );
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn corrupt_wal_row_is_skipped_and_the_rest_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, _store, h) = start(&path);
        w.checkpoint().await.unwrap();
        for i in 1..=3 {
            put(&w, "i", batch(i, "a", i as i64 * 1000, i as f64)).await;
        }
        // Kill-like stop: no final checkpoint would run if the process died,
        // so write garbage into the middle WAL row of the database directly.
        drop(w);
        h.join().unwrap();
        let c = Connection::open(&path).unwrap();
        // The final checkpoint emptied the WAL: write three rows by hand.
        c.execute("DELETE FROM head_snapshot", []).unwrap();
        for (i, data) in [
            encode_wal(&[(1, 1000, 1.0)]),
            b"\x01\x01garbage".to_vec(),
            encode_wal(&[(1, 3000, 3.0)]),
        ]
        .into_iter()
        .enumerate()
        {
            let crc = if i == 1 {
                42
            } else {
                crc32fast::hash(&data) as i64
            };
            c.execute(
                "INSERT INTO wal (node, instance_id, seq, received_ms, crc, data) VALUES ('a','i',?1,0,?2,?3)",
                params![i as i64 + 1, crc, data],
            )
            .unwrap();
        }
        drop(c);
        let (_w, store, _h) = start(&path);
        assert_eq!(
            points(&store, "m", 0, i64::MAX),
            vec![(1000, 1.0), (3000, 3.0)]
        );
    }

    #[test]
    fn schema_1_database_is_upgraded_with_its_samples() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        {
            let c = Connection::open(&path).unwrap();
            let Migration::Sql(v1) = &MIGRATIONS[0] else {
                panic!("step 1 is SQL")
            };
            c.execute_batch(v1).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO series (id, name, labels) VALUES (1, 'm', '{\"node\":\"a\"}')",
                [],
            )
            .unwrap();
            c.execute_batch("BEGIN").unwrap();
            for i in 0..2000i64 {
                c.execute(
                    "INSERT INTO samples VALUES (1, ?1, ?2)",
                    params![i * 10, i as f64 * 0.5],
                )
                .unwrap();
            }
            c.execute_batch("COMMIT").unwrap();
            c.execute("INSERT INTO samples VALUES (1, 50, NULL)", [])
                .unwrap(); // duplicate ts: dropped
        }
        let (_w, store, _h) = start(&path);
        let got = points(&store, "m{node=\"a\"}", 0, i64::MAX);
        assert_eq!(got.len(), 2000);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, p)| p.0 == i as i64 * 10 && p.1 == i as f64 * 0.5)
        );
    }

    #[tokio::test]
    async fn schema_3_database_is_upgraded_and_its_streaming_chunks_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        // Recent: the checkpoint at shutdown applies the 30-day retention.
        let t0 = vitals_common::now_ms() / 1000 * 1000 - 3_600_000;
        let old: Vec<(i64, f64)> = (0..1500)
            .map(|i| (t0 + i * 1000, i as f64 * 0.25))
            .collect();
        {
            let c = Connection::open(&path).unwrap();
            for step in &MIGRATIONS[..3] {
                let tx = c.unchecked_transaction().unwrap();
                match step {
                    Migration::Sql(sql) => tx.execute_batch(sql).unwrap(),
                    Migration::Rust(f) => f(&tx).unwrap(),
                }
                tx.commit().unwrap();
            }
            c.pragma_update(None, "user_version", 3).unwrap();
            c.execute(
                "INSERT INTO series (id, name, labels) VALUES (1, 'm', '{\"node\":\"a\"}')",
                [],
            )
            .unwrap();
            // What the previous binary stored: streaming-form chunks only.
            let closed = chunk::encode(&old[..1024]);
            assert_eq!(closed[0], 1);
            c.execute(
                "INSERT INTO chunks VALUES (1, ?1, ?2, 1024, ?3)",
                params![t0, old[1023].0, closed],
            )
            .unwrap();
            c.execute(
                "INSERT INTO head_snapshot VALUES (1, ?1)",
                params![chunk::encode(&old[1024..])],
            )
            .unwrap();
        }
        let (w, store, h) = start(&path);
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        assert_eq!(points(&store, "m{node=\"a\"}", 0, i64::MAX), old);
        // The same series takes new samples under its old id.
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 0);
        assert_eq!(
            put(&w, "i1", batch(1, "a", t0 + 1_500_000, 9.5)).await,
            Outcome::Stored
        );
        drop(w);
        h.join().unwrap();
        let (_w, store, _h) = start(&path);
        let got = points(&store, "m{node=\"a\"}", 0, i64::MAX);
        assert_eq!(got.len(), 1501);
        assert_eq!(got[1500], (t0 + 1_500_000, 9.5));
        assert_eq!(store.series_count(), 1);
    }

    #[tokio::test]
    async fn closed_chunks_take_about_their_own_size_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, store, h) = start(&path);
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 0);
        // A byte counter with random increments: closed chunks of ~1.5 KB,
        // the size that spilled into overflow pages before schema 5.
        let t0 = vitals_common::now_ms() / 1000 * 1000 - 86_400_000;
        let n = CHUNK_MAX_SAMPLES * 40;
        let (mut v, mut r) = (1e12, 0x9e37_79b9_7f4a_7c15u64);
        let mut b = batch(1, "a", t0, v);
        for k in 1..n {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            v += (1_000_000 + r % 4096) as f64;
            b.series_idx.push(0);
            b.timestamps_ms.push(t0 + k as i64 * 1000);
            b.values.push(v);
        }
        assert_eq!(put(&w, "i1", b).await, Outcome::Stored);
        drop(w);
        h.join().unwrap();
        let c = Connection::open(&path).unwrap();
        let data: i64 = c
            .query_row("SELECT sum(length(data)) FROM chunks", [], |r| r.get(0))
            .unwrap();
        let chunks: i64 = c
            .query_row("SELECT count(*) FROM chunks", [], |r| r.get(0))
            .unwrap();
        assert!(chunks >= 39, "{chunks} chunks");
        assert!(data / chunks > 1200, "chunks of {} bytes", data / chunks);
        let pages: i64 = c
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        let page: i64 = c
            .pragma_query_value(None, "page_size", |r| r.get(0))
            .unwrap();
        // Series, nodes, the head snapshot and the schema (one or two
        // pages per table and index) are a few pages.
        assert!(
            pages * page < data * 13 / 10 + 24 * page,
            "{} bytes in the file for {data} bytes of chunks",
            pages * page
        );
        drop(store);
    }

    #[tokio::test]
    async fn head_flushed_at_shutdown_in_the_compact_form_reads_back_bit_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, _store, h) = start(&path);
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 0);
        // Decimals (a latency in µs reported in seconds), then a -0.0 and a
        // NaN in the same open chunk.
        let mut sent = Vec::new();
        let t0 = vitals_common::now_ms() / 1000 * 1000 - 3_600_000;
        for k in 0..300u64 {
            let v = match k {
                100 => -0.0,
                200 => f64::from_bits(0x7ff8_0000_dead_beef),
                _ => (2000 + (k * 7919) % 1000) as f64 / 1e6,
            };
            let ts = t0 + k as i64 * 1000;
            assert_eq!(
                put(&w, "i1", batch(k + 1, "a", ts, v)).await,
                Outcome::Stored
            );
            sent.push((ts, v));
        }
        drop(w);
        h.join().unwrap();
        let snap: Vec<u8> = Connection::open(&path)
            .unwrap()
            .query_row("SELECT data FROM head_snapshot", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            snap[0],
            chunk::compact::VERSION_COMPACT,
            "compact form at shutdown"
        );
        let (_w, store, _h) = start(&path);
        let got = points(&store, "m{node=\"a\"}", 0, i64::MAX);
        assert_eq!(got.len(), sent.len());
        for (g, s) in got.iter().zip(&sent) {
            assert_eq!((g.0, g.1.to_bits()), (s.0, s.1.to_bits()));
        }
    }

    #[tokio::test]
    async fn detector_scores_on_ingest_into_its_own_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let opts = StoreOptions {
            detect: Some(vitals_common::selector::parse(r#"{__name__!~"vitals_.*"}"#).unwrap()),
            ..Default::default()
        };
        let (w, store, h) = spawn_writer(open(&path).unwrap(), &path, opts).unwrap();
        let t0 = vitals_common::now_ms() - 1_000_000;
        for k in 0..400i64 {
            // Steady with a little wobble, then one large spike at k = 350.
            let v = if k == 350 {
                500.0
            } else {
                50.0 + (k % 3) as f64
            };
            assert_eq!(
                put(&w, "i", batch(k as u64 + 1, "a", t0 + k * 1000, v)).await,
                Outcome::Stored
            );
        }
        let scores = points(
            &store,
            r#"vitals_anomaly_score{metric="m",node="a"}"#,
            0,
            i64::MAX,
        );
        assert_eq!(scores.len(), 400, "one score per sample");
        let at = |k: i64| scores.iter().find(|p| p.0 == t0 + k * 1000).unwrap().1;
        assert!(at(350) >= 0.9, "spike scored {}", at(350));
        let calm = (200..350).map(at).fold(0.0f64, f64::max);
        assert!(calm < ALARM, "steady series scored {calm}");
        let alarms = points(
            &store,
            r#"vitals_anomaly_alarms_total{node="a"}"#,
            0,
            i64::MAX,
        );
        assert!(alarms.last().unwrap().1 >= 1.0, "{alarms:?}");
        // The counts /metrics reads agree with what was stored.
        let d = store.detect_stats();
        assert_eq!(d.scored.load(Ordering::Relaxed), 400);
        assert_eq!(
            d.alarms.load(Ordering::Relaxed) as f64,
            alarms.last().unwrap().1
        );
        assert_eq!(d.series.load(Ordering::Relaxed), 1);
        // Derived series are not scored again.
        assert!(
            points(
                &store,
                r#"vitals_anomaly_score{metric="vitals_anomaly_score"}"#,
                0,
                i64::MAX
            )
            .is_empty()
        );
        drop(w);
        h.join().unwrap();
    }

    #[tokio::test]
    async fn detector_off_stores_no_scores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, store, h) = start(&path);
        put(&w, "i", batch(1, "a", vitals_common::now_ms(), 1.0)).await;
        assert!(points(&store, "vitals_anomaly_score", 0, i64::MAX).is_empty());
        drop(w);
        h.join().unwrap();
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        drop(open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = open(&path).err().unwrap().to_string();
        assert!(err.contains("schema version 99"), "{err}");
    }

    #[test]
    fn wal_rows_roundtrip_and_reject_garbage() {
        let s = vec![(1, 5, 1.0), (2, 5, f64::NAN), (70000, -3, -0.0)];
        let back = decode_wal(&encode_wal(&s)).unwrap();
        assert_eq!(back.len(), 3);
        assert!(
            back.iter()
                .zip(&s)
                .all(|(a, b)| a.0 == b.0 && a.1 == b.1 && a.2.to_bits() == b.2.to_bits())
        );
        assert!(decode_wal(b"\x05").is_none());
        assert!(decode_wal(&encode_wal(&s)[..10]).is_none());
    }
}
