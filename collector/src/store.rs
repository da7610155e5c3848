//! The collector's SQLite store.
//!
//! One thread owns the write connection (STYLE.md #10): ingest handlers send
//! it validated batches over a channel; it groups whatever is queued into one
//! transaction, commits, and only then answers each sender. Readers open their
//! own read-only connections.
//!
//! Invariant: a batch is acknowledged only after the transaction holding it
//! has committed, and a batch whose (node, instance, seq) is not above the
//! highest stored sequence of that instance is acknowledged without being
//! stored again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};
use vitals_common::model::Labels;
use vitals_common::selector::Selector;

/// Schema steps, applied in order; `user_version` says how many ran.
/// Append only: never edit a step that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: series, raw samples, nodes, agent instances, events.
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
];

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
    #[error("the store is shutting down")]
    Closed,
}

/// A batch that passed validation, ready to store. Labels include `node`.
#[derive(Debug)]
pub struct CleanBatch {
    pub seq: u64,
    pub series: Vec<(String, Labels)>,
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
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Write {
                node: node.into(),
                instance_id: instance_id.into(),
                batch,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed.to_string())?;
        Ok(rx)
    }
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
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk (not only in the OS cache) before we ack.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
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
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, "database schema migrated");
    }
    Ok(())
}

/// Opens a read-only connection for queries.
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
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

/// Starts the writer thread over an opened database.
pub fn spawn_writer(conn: Connection) -> Result<(Writer, std::thread::JoinHandle<()>), StoreError> {
    let mut state = WriterState::load(conn)?;
    let (tx, mut rx) = mpsc::channel::<Command>(4096);
    let handle = std::thread::Builder::new()
        .name("vitals-store-writer".into())
        .spawn(move || {
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < 512 {
                    match rx.try_recv() {
                        Ok(c) => group.push(c),
                        Err(_) => break,
                    }
                }
                state.apply(group);
            }
            tracing::debug!("store writer stopped: every queued batch handled");
        })
        .map_err(|e| StoreError::Dir {
            path: PathBuf::from("<writer thread>"),
            source: e,
        })?;
    Ok((Writer { tx }, handle))
}

struct WriterState {
    conn: Connection,
    series_ids: HashMap<(String, String), i64>,
    acked: HashMap<(String, String), u64>,
    /// Newest stored timestamp of each series: the out-of-order rule.
    last_ts: HashMap<i64, i64>,
    out_of_order_total: u64,
}

fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

impl WriterState {
    fn load(conn: Connection) -> Result<Self, StoreError> {
        let mut series_ids = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT id, name, labels FROM series")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get(1)?, r.get(2)?)))?;
            for row in rows {
                let (id, name, labels) = row?;
                series_ids.insert((name, labels), id);
            }
        }
        let mut acked = HashMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT node, instance_id, acked_seq FROM agent_instances")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?)))?;
            for row in rows {
                let (node, inst, seq) = row?;
                acked.insert((node, inst), seq as u64);
            }
        }
        let mut last_ts = HashMap::new();
        {
            let mut stmt =
                conn.prepare("SELECT series_id, max(ts) FROM samples GROUP BY series_id")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (id, ts) = row?;
                last_ts.insert(id, ts);
            }
        }
        Ok(WriterState {
            conn,
            series_ids,
            acked,
            last_ts,
            out_of_order_total: 0,
        })
    }

    fn apply(&mut self, group: Vec<Command>) {
        let mut staged_acked: HashMap<(String, String), u64> = HashMap::new();
        let mut staged_series: HashMap<(String, String), i64> = HashMap::new();
        let mut staged_last: HashMap<i64, i64> = HashMap::new();
        let mut out_of_order = 0u64;
        let mut results: Vec<Result<CommandResult, String>> = Vec::with_capacity(group.len());
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
                    Command::Write {
                        node,
                        instance_id,
                        batch,
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
                            out_of_order += self.insert_batch(
                                &tx,
                                node,
                                batch,
                                &mut staged_series,
                                &mut staged_last,
                            )?;
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
                            staged_acked.insert(key, batch.seq);
                            CommandResult::Write(Outcome::Stored)
                        }
                    }
                };
                results.push(Ok(r));
            }
            tx.commit()
        })();
        if let Err(e) = outcome {
            tracing::error!(error = %e, batches = group.len(), "store commit failed; nothing of these batches was acknowledged");
            let msg = format!("store commit failed: {e}");
            results = group.iter().map(|_| Err(msg.clone())).collect();
        } else {
            self.acked.extend(staged_acked);
            self.series_ids.extend(staged_series);
            self.last_ts.extend(staged_last);
            if out_of_order > 0 {
                self.out_of_order_total += out_of_order;
                tracing::warn!(
                    dropped = out_of_order,
                    dropped_total = self.out_of_order_total,
                    "dropped samples not newer than the newest stored sample of their series (out of order or duplicate)"
                );
            }
        }
        for (cmd, res) in group.into_iter().zip(results) {
            match cmd {
                Command::Hello { reply, .. } => {
                    let _ = reply.send(res.map(|r| match r {
                        CommandResult::Hello(s) => s,
                        CommandResult::Write(_) => 0,
                    }));
                }
                Command::Write { reply, .. } => {
                    let _ = reply.send(res.map(|r| match r {
                        CommandResult::Write(o) => o,
                        CommandResult::Hello(_) => Outcome::Duplicate,
                    }));
                }
            }
        }
    }

    fn insert_batch(
        &self,
        tx: &rusqlite::Transaction<'_>,
        node: &str,
        batch: &CleanBatch,
        staged_series: &mut HashMap<(String, String), i64>,
        staged_last: &mut HashMap<i64, i64>,
    ) -> Result<u64, rusqlite::Error> {
        let mut ids = Vec::with_capacity(batch.series.len());
        for (name, labels) in &batch.series {
            let key = (name.clone(), labels_json(labels));
            let id = match self
                .series_ids
                .get(&key)
                .or_else(|| staged_series.get(&key))
            {
                Some(id) => *id,
                None => {
                    let existing: Option<i64> = tx
                        .prepare_cached("SELECT id FROM series WHERE name = ?1 AND labels = ?2")?
                        .query_row(params![key.0, key.1], |r| r.get(0))
                        .optional()?;
                    let id = match existing {
                        Some(id) => id,
                        None => {
                            tx.prepare_cached("INSERT INTO series (name, labels) VALUES (?1, ?2)")?
                                .execute(params![key.0, key.1])?;
                            tx.last_insert_rowid()
                        }
                    };
                    staged_series.insert(key, id);
                    id
                }
            };
            ids.push(id);
        }
        let mut ins =
            tx.prepare_cached("INSERT INTO samples (series_id, ts, value) VALUES (?1, ?2, ?3)")?;
        let mut dropped = 0u64;
        for i in 0..batch.values.len() {
            let id = ids[batch.series_idx[i] as usize];
            let ts = batch.timestamps_ms[i];
            // The rule: per series, timestamps only move forward. A sample at
            // or before the newest stored one is dropped and counted.
            let last = staged_last
                .get(&id)
                .or_else(|| self.last_ts.get(&id))
                .copied();
            if last.is_some_and(|l| ts <= l) {
                dropped += 1;
                continue;
            }
            staged_last.insert(id, ts);
            let v = batch.values[i];
            // SQLite has no NaN: it is stored as NULL and read back as NaN.
            let v = if v.is_nan() { None } else { Some(v) };
            ins.execute(params![id, ts, v])?;
        }
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
        Ok(dropped)
    }
}

enum CommandResult {
    Hello(u64),
    Write(Outcome),
}

/// One node as the store knows it.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub agent_version: String,
    pub last_seen_ms: i64,
}

pub fn list_nodes(conn: &Connection) -> Result<Vec<NodeRow>, StoreError> {
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

pub fn query_range(
    conn: &Connection,
    selector: &Selector,
    start_ms: i64,
    end_ms: i64,
    limits: QueryLimits,
) -> Result<Vec<SeriesPoints>, QueryError> {
    let mut matched: Vec<(i64, String, Labels)> = Vec::new();
    {
        let mut consider = |id: i64, name: String, labels: String| -> Result<(), QueryError> {
            let labels: Labels = serde_json::from_str(&labels).unwrap_or_default();
            if selector.matches(&name, &labels) {
                if matched.len() >= limits.max_series {
                    return Err(QueryError::TooManySeries(limits.max_series));
                }
                matched.push((id, name, labels));
            }
            Ok(())
        };
        if selector.metric.is_empty() {
            let mut stmt = conn.prepare_cached("SELECT id, name, labels FROM series")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                consider(r.get(0)?, r.get(1)?, r.get(2)?)?;
            }
        } else {
            let mut stmt =
                conn.prepare_cached("SELECT id, name, labels FROM series WHERE name = ?1")?;
            let mut rows = stmt.query([&selector.metric])?;
            while let Some(r) = rows.next()? {
                consider(r.get(0)?, r.get(1)?, r.get(2)?)?;
            }
        }
    }
    matched.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.2.cmp(&b.2)));
    let mut out = Vec::with_capacity(matched.len());
    let mut total = 0usize;
    let mut stmt = conn.prepare_cached(
        "SELECT ts, value FROM samples WHERE series_id = ?1 AND ts >= ?2 AND ts <= ?3 ORDER BY ts, rowid",
    )?;
    for (id, name, labels) in matched {
        let mut points = Vec::new();
        let mut rows = stmt.query(params![id, start_ms, end_ms])?;
        while let Some(r) = rows.next()? {
            let v: Option<f64> = r.get(1)?;
            points.push((r.get(0)?, v.unwrap_or(f64::NAN)));
            total += 1;
            if total > limits.max_points {
                return Err(QueryError::TooManyPoints(limits.max_points));
            }
        }
        if !points.is_empty() {
            out.push(SeriesPoints {
                name,
                labels,
                points,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64, node: &str, ts: i64, v: f64) -> CleanBatch {
        let mut labels = Labels::new();
        labels.insert("node".into(), node.into());
        CleanBatch {
            seq,
            series: vec![("m".into(), labels)],
            series_idx: vec![0],
            timestamps_ms: vec![ts],
            values: vec![v],
            events: vec![],
        }
    }

    fn count(path: &Path) -> i64 {
        open_reader(path)
            .unwrap()
            .query_row("SELECT count(*) FROM samples", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn duplicate_sequence_is_acked_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        let (w, h) = spawn_writer(open(&path).unwrap()).unwrap();
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 0);
        let r1 = w.write("a", "i1", batch(1, "a", 10, 1.0)).await.unwrap();
        assert_eq!(r1.await.unwrap().unwrap(), Outcome::Stored);
        let r2 = w.write("a", "i1", batch(1, "a", 10, 1.0)).await.unwrap();
        assert_eq!(r2.await.unwrap().unwrap(), Outcome::Duplicate);
        // Another instance of the same node has its own sequence space.
        let r3 = w
            .write("a", "i2", batch(1, "a", 11, f64::NAN))
            .await
            .unwrap();
        assert_eq!(r3.await.unwrap().unwrap(), Outcome::Stored);
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 1);
        // Out of order (ts 5 < 10) and duplicate timestamps are dropped.
        let r4 = w.write("a", "i1", batch(2, "a", 5, 9.0)).await.unwrap();
        assert_eq!(r4.await.unwrap().unwrap(), Outcome::Stored);
        drop(w);
        h.join().unwrap();
        assert_eq!(count(&path), 2);

        // Restart: the acked sequence survives, the NaN reads back as NaN.
        let (w, h) = spawn_writer(open(&path).unwrap()).unwrap();
        assert_eq!(w.hello("a", "i1", "0").await.unwrap(), 2);
        let r5 = w.write("a", "i1", batch(3, "a", 11, 3.0)).await.unwrap();
        assert_eq!(r5.await.unwrap().unwrap(), Outcome::Stored);
        let r6 = w.write("a", "i1", batch(4, "a", 12, 4.0)).await.unwrap();
        assert_eq!(r6.await.unwrap().unwrap(), Outcome::Stored);
        drop(w);
        h.join().unwrap();
        let conn = open_reader(&path).unwrap();
        let sel = vitals_common::selector::parse("m{node=\"a\"}").unwrap();
        let lim = QueryLimits {
            max_series: 10,
            max_points: 10,
        };
        let got = query_range(&conn, &sel, 0, 100, lim).unwrap();
        assert_eq!(got.len(), 1);
        // ts 10, then i2's NaN at 11 (newest across the restart), so i1's
        // ts 11 is dropped and ts 12 kept.
        let ts: Vec<i64> = got[0].points.iter().map(|p| p.0).collect();
        assert_eq!(ts, vec![10, 11, 12]);
        assert!(got[0].points[1].1.is_nan());
        assert_eq!(got[0].points[2].1, 4.0);
        let lim1 = QueryLimits {
            max_series: 10,
            max_points: 2,
        };
        assert!(matches!(
            query_range(&conn, &sel, 0, 100, lim1),
            Err(QueryError::TooManyPoints(2))
        ));
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
}
