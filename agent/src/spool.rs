//! The on-disk spool: every batch is written here before it is sent and
//! deleted only when the collector acknowledged it (STYLE.md #9).
//!
//! Bounded by bytes: when full, the oldest batches are dropped first, counted
//! and logged at most once a minute. Sequence numbers never repeat within one
//! spool (SQLite AUTOINCREMENT), and the spool has a random instance id, so
//! (node, instance, seq) names a batch for good.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use vitals_proto::v1::Batch;

pub const FILE_NAME: &str = "spool.db";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot create spool directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spool: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("spool lock poisoned")]
    Poisoned,
}

struct Inner {
    conn: Connection,
    bytes: u64,
    batches: u64,
    next_seq: u64,
    dropped_total: u64,
    dropped_since_log: u64,
    last_drop_log: Option<Instant>,
}

pub struct Spool {
    inner: Mutex<Inner>,
    max_bytes: u64,
    instance_id: String,
}

/// Counts the spool reports about itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolStats {
    pub batches: u64,
    pub bytes: u64,
    pub dropped_total: u64,
}

impl Spool {
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir).map_err(|source| SpoolError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let open_err = |source| SpoolError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        // NORMAL in WAL mode survives a crash of the agent process.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS batches (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                created_ms INTEGER NOT NULL,
                data BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
        )
        .map_err(open_err)?;
        let instance_id: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'instance_id'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        let instance_id = match instance_id {
            Some(id) => id,
            None => {
                let id = format!(
                    "{:016x}{:016x}",
                    rand::random::<u64>(),
                    rand::random::<u64>()
                );
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('instance_id', ?1)",
                    [&id],
                )?;
                id
            }
        };
        let (batches, bytes): (i64, i64) = conn.query_row(
            "SELECT count(*), COALESCE(sum(length(data)), 0) FROM batches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let last_seq: i64 = conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'batches'",
                [],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        Ok(Spool {
            inner: Mutex::new(Inner {
                conn,
                bytes: bytes as u64,
                batches: batches as u64,
                next_seq: last_seq as u64 + 1,
                dropped_total: 0,
                dropped_since_log: 0,
                last_drop_log: None,
            }),
            max_bytes,
            instance_id,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    pub fn stats(&self) -> SpoolStats {
        match self.inner.lock() {
            Ok(g) => SpoolStats {
                batches: g.batches,
                bytes: g.bytes,
                dropped_total: g.dropped_total,
            },
            Err(_) => SpoolStats::default(),
        }
    }

    /// Numbers the batch, writes it durably, and drops the oldest batches if
    /// the spool is over its limit (never the one just written).
    pub fn push(&self, mut batch: Batch, now_ms: i64) -> Result<u64, SpoolError> {
        let mut g = self.inner.lock().map_err(|_| SpoolError::Poisoned)?;
        let seq = g.next_seq;
        batch.seq = seq;
        let data = batch.encode_to_vec();
        g.conn
            .prepare_cached("INSERT INTO batches (seq, created_ms, data) VALUES (?1, ?2, ?3)")?
            .execute(params![seq as i64, now_ms, data])?;
        g.next_seq += 1;
        g.bytes += data.len() as u64;
        g.batches += 1;
        let mut dropped = 0u64;
        while g.bytes > self.max_bytes && g.batches > 1 {
            let oldest: Option<(i64, i64)> = g
                .conn
                .prepare_cached("SELECT seq, length(data) FROM batches ORDER BY seq LIMIT 1")?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let Some((old_seq, len)) = oldest else { break };
            if old_seq as u64 == seq {
                break;
            }
            g.conn
                .prepare_cached("DELETE FROM batches WHERE seq = ?1")?
                .execute([old_seq])?;
            g.bytes = g.bytes.saturating_sub(len as u64);
            g.batches -= 1;
            dropped += 1;
        }
        if dropped > 0 {
            g.dropped_total += dropped;
            g.dropped_since_log += dropped;
            let due = g
                .last_drop_log
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
            if due {
                tracing::warn!(
                    dropped = g.dropped_since_log,
                    dropped_total = g.dropped_total,
                    max_bytes = self.max_bytes,
                    "spool full: dropped the oldest unsent batches (raise spool.max_bytes to keep more while the collector is unreachable)"
                );
                g.dropped_since_log = 0;
                g.last_drop_log = Some(Instant::now());
            }
        }
        Ok(seq)
    }

    /// Up to `limit` batches with a sequence above `after`, oldest first.
    pub fn next_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let g = self.inner.lock().map_err(|_| SpoolError::Poisoned)?;
        let mut stmt = g
            .conn
            .prepare_cached("SELECT seq, data FROM batches WHERE seq > ?1 ORDER BY seq LIMIT ?2")?;
        let rows = stmt.query_map(params![after as i64, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The collector stored every batch up to `seq`: forget them.
    pub fn ack(&self, seq: u64) -> Result<u64, SpoolError> {
        let mut g = self.inner.lock().map_err(|_| SpoolError::Poisoned)?;
        let (n, len): (i64, i64) = g
            .conn
            .prepare_cached(
                "SELECT count(*), COALESCE(sum(length(data)), 0) FROM batches WHERE seq <= ?1",
            )?
            .query_row([seq as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
        if n > 0 {
            g.conn
                .prepare_cached("DELETE FROM batches WHERE seq <= ?1")?
                .execute([seq as i64])?;
            g.batches = g.batches.saturating_sub(n as u64);
            g.bytes = g.bytes.saturating_sub(len as u64);
        }
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(n: usize) -> Batch {
        Batch {
            values: vec![1.0; n],
            series_ids: vec![0; n],
            timestamps_ms: vec![0; n],
            ..Default::default()
        }
    }

    #[test]
    fn push_ack_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let id = s.instance_id().to_string();
        assert_eq!(s.push(batch(3), 1).unwrap(), 1);
        assert_eq!(s.push(batch(3), 2).unwrap(), 2);
        assert_eq!(s.push(batch(3), 3).unwrap(), 3);
        let next = s.next_after(1, 10).unwrap();
        assert_eq!(next.iter().map(|(q, _)| *q).collect::<Vec<_>>(), vec![2, 3]);
        let decoded = Batch::decode(next[0].1.as_slice()).unwrap();
        assert_eq!(decoded.seq, 2);
        assert_eq!(s.ack(2).unwrap(), 2);
        assert_eq!(s.stats().batches, 1);
        drop(s);
        // Reopen: same instance, remaining batch, and sequence numbers go on.
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.instance_id(), id);
        assert_eq!(s.stats().batches, 1);
        s.ack(3).unwrap();
        assert_eq!(
            s.push(batch(1), 4).unwrap(),
            4,
            "a sequence number is never reused"
        );
    }

    #[test]
    fn full_spool_drops_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let one = batch(100).encode_to_vec().len() as u64 + 2;
        let s = Spool::open(dir.path(), one * 3).unwrap();
        for i in 0..10 {
            s.push(batch(100), i).unwrap();
        }
        let st = s.stats();
        assert_eq!(st.batches, 3);
        assert_eq!(st.dropped_total, 7);
        let left: Vec<u64> = s
            .next_after(0, 100)
            .unwrap()
            .iter()
            .map(|(q, _)| *q)
            .collect();
        assert_eq!(left, vec![8, 9, 10]);
    }
}
