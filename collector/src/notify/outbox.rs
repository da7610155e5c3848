//! The notification outbox: SQLite rows, committed before `enqueue`
//! returns, delivered by [`run`] to every target of their receiver.
//!
//! - **Not lost while a receiver is down.** A row stays until each target
//!   of its receiver has a final state for it (delivered, dropped as refused,
//!   superseded, or expired after `max_age`); retries back off exponentially
//!   with jitter up to `max_backoff`, per row (persisted, so a restart does
//!   not hammer a receiver that is down) and per target (one failure pauses
//!   that target only).
//! - **Once per target.** A (row, target) is marked delivered in the
//!   transaction after the receiver's 2xx; a restarted dispatcher never
//!   sends it again. The one window left — a crash between the receiver's
//!   answer and our commit, or an answer lost on the wire — resends with
//!   the row's token, which Sentry (event ids) and webhooks
//!   (`Idempotency-Key`) can use to drop the repeat; Alertmanager is
//!   idempotent by nature.
//! - **In order per group.** A target gets a group's notifications in
//!   enqueue order: a row waits while an earlier row of the same
//!   `group_key` is not final for that target, so "resolved" never
//!   overtakes "firing". For Alertmanager, which only keeps the latest
//!   state, a row that a later row of the same group covers (all its
//!   alert fingerprints) is marked superseded instead of sent.
//! - **Resends only where needed.** [`Outbox::enqueue_resend`] rows (a
//!   firing alert re-sent every `resend_interval`) go only to targets that
//!   need them ([`Target::resend_interval`]: Alertmanager); the others
//!   never see them.
//! - **One writer.** One connection behind a mutex does every write
//!   (`enqueue` and the dispatcher's bookkeeping); WAL, `synchronous=FULL`.
//!   Its own database file with its own `user_version` migrations.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use vitals_common::config::duration;

use super::{DeliveryError, Notification, Target, deliver_keyed, now_ms};

/// How the dispatcher retries and when it gives up; serde-deserializable
/// for a config table (every key optional, defaults below).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxOptions {
    /// A notification not delivered to a target this long after it was
    /// enqueued is given up for that target (logged and counted). Default 24h.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// First retry delay; doubles per failed attempt (with jitter). Default 1s.
    #[serde(with = "duration")]
    pub min_backoff: Duration,
    /// Longest retry delay. Default 5m.
    #[serde(with = "duration")]
    pub max_backoff: Duration,
}

impl Default for OutboxOptions {
    fn default() -> Self {
        OutboxOptions {
            max_age: Duration::from_secs(24 * 3600),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl OutboxOptions {
    /// Checks the values; the error names the key and says why.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.max_age.is_zero() {
            return Err(("max_age".into(), "must be above 0".into()));
        }
        if self.min_backoff < Duration::from_millis(10) {
            return Err(("min_backoff".into(), "must be at least 10ms".into()));
        }
        if self.max_backoff < self.min_backoff {
            return Err(("max_backoff".into(), "must not be below min_backoff".into()));
        }
        Ok(())
    }

    /// Delay before attempt `attempts + 1` after `attempts` failures
    /// (≥ 1): `min_backoff × 2^(attempts-1)`, at most `max_backoff`, then a
    /// uniformly random point in its upper half.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(30);
        // Never a tight loop, whatever the options say.
        let floor = Duration::from_millis(10);
        let full = self
            .min_backoff
            .max(floor)
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff.max(floor));
        let half = full / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create directory {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open outbox database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "outbox database {path} has schema version {found}, newer than this binary knows ({known}); refusing to use it"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("outbox database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot encode the notification: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("outbox task failed: {0}")]
    Task(String),
}

/// Schema steps, applied in order; `user_version` says how many ran.
/// Append only: never edit a step that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: notifications, their per-target delivery state, counters.
    "CREATE TABLE notifications (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        receiver TEXT NOT NULL,
        group_key TEXT NOT NULL,
        dedup_key TEXT,
        resend INTEGER NOT NULL DEFAULT 0,
        token TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        done_ms INTEGER,
        body TEXT NOT NULL
     );
     CREATE INDEX notifications_open ON notifications (receiver, id) WHERE done_ms IS NULL;
     CREATE UNIQUE INDEX notifications_dedup ON notifications (receiver, dedup_key)
        WHERE dedup_key IS NOT NULL;
     CREATE TABLE deliveries (
        notification_id INTEGER NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL
            CHECK (state IN ('pending', 'delivered', 'dropped', 'expired', 'superseded')),
        attempts INTEGER NOT NULL,
        next_attempt_ms INTEGER NOT NULL,
        last_error TEXT,
        updated_ms INTEGER NOT NULL,
        PRIMARY KEY (notification_id, target)
     ) WITHOUT ROWID;
     CREATE TABLE target_counts (
        receiver TEXT NOT NULL,
        target TEXT NOT NULL,
        delivered INTEGER NOT NULL DEFAULT 0,
        failed_attempts INTEGER NOT NULL DEFAULT 0,
        dropped INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        superseded INTEGER NOT NULL DEFAULT 0,
        wants_resends INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (receiver, target)
     ) WITHOUT ROWID;",
];

/// Counts for one (receiver, target), kept across restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetStats {
    pub receiver: String,
    /// [`Target::key`].
    pub target: String,
    pub delivered: u64,
    /// Attempts that failed and will be (or were) retried.
    pub failed_attempts: u64,
    /// Refused by the receiver for good (4xx), recorded and not retried.
    pub dropped: u64,
    /// Given up after `max_age`.
    pub expired: u64,
    /// Not sent to an Alertmanager because a later notification covered it.
    pub superseded: u64,
    /// Waiting for this target now.
    pub pending: u64,
}

/// The durable queue of notifications. Cheap to clone (one shared connection).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    path: PathBuf,
    opts: OutboxOptions,
    wake: watch::Sender<u64>,
}

/// A row waiting for one target.
#[derive(Debug, Clone)]
struct Candidate {
    id: i64,
    group_key: String,
    token: u128,
    attempts: u32,
    next_attempt_ms: i64,
}

/// What the outbox needs to know of a target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TargetInfo {
    /// [`Target::key`].
    key: String,
    /// Gets [`Outbox::enqueue_resend`] rows.
    wants_resends: bool,
}

impl TargetInfo {
    fn of(t: &Target) -> TargetInfo {
        TargetInfo {
            key: t.key(),
            wants_resends: t.resend_interval().is_some(),
        }
    }
}

/// A (row, target) given up after `max_age`.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct GivenUp {
    receiver: String,
    /// Empty when the receiver has no targets in this dispatcher.
    target: String,
    id: i64,
    attempts: u32,
    error: Option<String>,
}

/// What happened to one (row, target).
#[derive(Debug)]
enum Outcome {
    Delivered,
    Failed { error: String, next_attempt_ms: i64 },
    Dropped { error: String },
    Superseded,
}

impl Outbox {
    /// Opens (creating if needed) the outbox database at `path`.
    pub fn open(path: &Path) -> Result<Outbox, OutboxError> {
        Outbox::open_with(path, OutboxOptions::default())
    }

    pub fn open_with(path: &Path, opts: OutboxOptions) -> Result<Outbox, OutboxError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OutboxError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| OutboxError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: enqueue returns only once the row is on disk.
        conn.pragma_update(None, "synchronous", "FULL")?;
        migrate(&conn, path)?;
        Ok(Outbox {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                path: path.to_path_buf(),
                opts,
                wake: watch::channel(0).0,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn options(&self) -> &OutboxOptions {
        &self.inner.opts
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock left no transaction open (a
        // dropped Transaction rolls back), so the connection is fine.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits `n` for `receiver`'s targets and returns its row id; the
    /// row is on disk when this returns. Blocking (one SQLite commit):
    /// call it from a blocking context or `spawn_blocking`.
    pub fn enqueue(&self, receiver: &str, n: &Notification) -> Result<i64, OutboxError> {
        self.insert(receiver, None, false, n)
            .map(|id| id.unwrap_or_default())
    }

    /// Like [`enqueue`](Self::enqueue), for the periodic re-send of a firing
    /// alert: delivered only to the receiver's targets that forget alerts
    /// not re-sent ([`Target::resend_interval`] is `Some`: Alertmanager).
    pub fn enqueue_resend(&self, receiver: &str, n: &Notification) -> Result<i64, OutboxError> {
        self.insert(receiver, None, true, n)
            .map(|id| id.unwrap_or_default())
    }

    /// [`enqueue`](Self::enqueue) unless a row with the same `key` exists for
    /// `receiver` (kept for `max_age`): then nothing is added and `None`
    /// returned. For callers that re-enqueue after a crash and must not
    /// notify twice (e.g. key = fingerprint + status + start).
    pub fn enqueue_once(
        &self,
        receiver: &str,
        key: &str,
        n: &Notification,
    ) -> Result<Option<i64>, OutboxError> {
        self.insert(receiver, Some(key), false, n)
    }

    fn insert(
        &self,
        receiver: &str,
        key: Option<&str>,
        resend: bool,
        n: &Notification,
    ) -> Result<Option<i64>, OutboxError> {
        let body = serde_json::to_string(n).map_err(OutboxError::Encode)?;
        let token: u128 = rand::random();
        let id = {
            let conn = self.conn();
            let added = conn.execute(
                "INSERT OR IGNORE INTO notifications
                    (receiver, group_key, dedup_key, resend, token, created_ms, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    receiver,
                    n.group_key,
                    key,
                    resend,
                    format!("{token:032x}"),
                    now_ms(),
                    body
                ],
            )?;
            (added == 1).then(|| conn.last_insert_rowid())
        };
        if id.is_some() {
            self.inner.wake.send_modify(|v| *v = v.wrapping_add(1));
        }
        Ok(id)
    }

    /// Rows not yet final for every target of their receiver.
    pub fn open_rows(&self) -> Result<u64, OutboxError> {
        Ok(self.conn().query_row(
            "SELECT count(*) FROM notifications WHERE done_ms IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Per (receiver, target) that a dispatcher has served: counts so far
    /// and what is pending now.
    pub fn stats(&self) -> Result<Vec<TargetStats>, OutboxError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT c.receiver, c.target, c.delivered, c.failed_attempts, c.dropped,
                    c.expired, c.superseded,
                    (SELECT count(*) FROM notifications n
                      WHERE n.receiver = c.receiver AND n.done_ms IS NULL
                        AND (n.resend = 0 OR c.wants_resends)
                        AND NOT EXISTS (SELECT 1 FROM deliveries d
                                         WHERE d.notification_id = n.id AND d.target = c.target
                                           AND d.state != 'pending'))
             FROM target_counts c ORDER BY c.receiver, c.target",
        )?;
        let rows = st.query_map([], |r| {
            Ok(TargetStats {
                receiver: r.get(0)?,
                target: r.get(1)?,
                delivered: r.get::<_, i64>(2)? as u64,
                failed_attempts: r.get::<_, i64>(3)? as u64,
                dropped: r.get::<_, i64>(4)? as u64,
                expired: r.get::<_, i64>(5)? as u64,
                superseded: r.get::<_, i64>(6)? as u64,
                pending: r.get::<_, i64>(7)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn register(&self, receiver: &str, t: &TargetInfo) -> Result<(), OutboxError> {
        self.conn().execute(
            "INSERT INTO target_counts (receiver, target, wants_resends) VALUES (?1, ?2, ?3)
             ON CONFLICT (receiver, target) DO UPDATE SET wants_resends = excluded.wants_resends",
            params![receiver, t.key, t.wants_resends],
        )?;
        Ok(())
    }

    /// Rows of `receiver` not final for `target`, oldest first.
    fn candidates(
        &self,
        receiver: &str,
        target: &TargetInfo,
        limit: usize,
    ) -> Result<Vec<Candidate>, OutboxError> {
        let conn = self.conn();
        let mut st = conn.prepare_cached(
            "SELECT n.id, n.group_key, n.token, coalesce(d.attempts, 0),
                    coalesce(d.next_attempt_ms, 0)
             FROM notifications n
             LEFT JOIN deliveries d ON d.notification_id = n.id AND d.target = ?2
             WHERE n.receiver = ?1 AND n.done_ms IS NULL
               AND (d.state IS NULL OR d.state = 'pending')
               AND (n.resend = 0 OR ?4)
             ORDER BY n.id LIMIT ?3",
        )?;
        let params = params![receiver, target.key, limit as i64, target.wants_resends];
        let rows = st.query_map(params, |r| {
            let token: String = r.get(2)?;
            Ok(Candidate {
                id: r.get(0)?,
                group_key: r.get(1)?,
                token: u128::from_str_radix(&token, 16).unwrap_or_default(),
                attempts: r.get::<_, i64>(3)?.max(0) as u32,
                next_attempt_ms: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The stored notification of a row: `None` if the row is gone (given
    /// up meanwhile), `Some(Err)` if it does not decode.
    fn body(&self, id: i64) -> Result<Option<Result<Notification, String>>, OutboxError> {
        let body: Option<String> = self
            .conn()
            .query_row("SELECT body FROM notifications WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(body.map(|b| {
            serde_json::from_str(&b)
                .map_err(|e| format!("the stored notification does not decode: {e}"))
        }))
    }

    /// Records `outcome` for (row, target) and finishes the row once every
    /// target in `all_targets` has a final state for it.
    fn record(
        &self,
        receiver: &str,
        target: &str,
        all_targets: &[TargetInfo],
        c: &Candidate,
        outcome: &Outcome,
    ) -> Result<(), OutboxError> {
        let now = now_ms();
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (state, error, next, counter) = match outcome {
            Outcome::Delivered => ("delivered", None, 0, "delivered"),
            Outcome::Failed {
                error,
                next_attempt_ms,
            } => (
                "pending",
                Some(error.as_str()),
                *next_attempt_ms,
                "failed_attempts",
            ),
            Outcome::Dropped { error } => ("dropped", Some(error.as_str()), 0, "dropped"),
            Outcome::Superseded => ("superseded", None, 0, "superseded"),
        };
        let attempts = match outcome {
            Outcome::Superseded => c.attempts,
            _ => c.attempts + 1,
        };
        tx.execute(
            "INSERT INTO deliveries
                (notification_id, target, state, attempts, next_attempt_ms, last_error, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (notification_id, target) DO UPDATE SET
                state = excluded.state, attempts = excluded.attempts,
                next_attempt_ms = excluded.next_attempt_ms,
                last_error = coalesce(excluded.last_error, last_error),
                updated_ms = excluded.updated_ms",
            params![c.id, target, state, attempts, next, error, now],
        )?;
        count(&tx, receiver, target, counter)?;
        if state != "pending" {
            finish_if_done(&tx, c.id, all_targets, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Gives up rows older than `max_age` for every target of theirs not yet
    /// final, and forgets finished rows kept for `enqueue_once`. Returns
    /// what was given up.
    fn sweep(
        &self,
        targets: &HashMap<String, Vec<TargetInfo>>,
    ) -> Result<Vec<GivenUp>, OutboxError> {
        let cutoff = now_ms() - self.inner.opts.max_age.as_millis() as i64;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old: Vec<(i64, String, bool)> = {
            let mut st = tx.prepare_cached(
                "SELECT id, receiver, resend FROM notifications
                 WHERE created_ms < ?1 AND done_ms IS NULL ORDER BY id",
            )?;
            st.query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?
        };
        let mut given_up = Vec::new();
        for (id, receiver, resend) in old {
            let keys: Vec<&String> = targets
                .get(&receiver)
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .filter(|t| !resend || t.wants_resends)
                .map(|t| &t.key)
                .collect();
            if keys.is_empty() {
                given_up.push(GivenUp {
                    receiver: receiver.clone(),
                    target: String::new(),
                    id,
                    attempts: 0,
                    error: None,
                });
            }
            for key in keys {
                let state: Option<(String, i64, Option<String>)> = tx
                    .query_row(
                        "SELECT state, attempts, last_error FROM deliveries
                         WHERE notification_id = ?1 AND target = ?2",
                        params![id, *key],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()?;
                let (attempts, error) = match state {
                    Some((s, _, _)) if s != "pending" => continue,
                    Some((_, a, e)) => (a.max(0) as u32, e),
                    None => (0, None),
                };
                count(&tx, &receiver, key, "expired")?;
                given_up.push(GivenUp {
                    receiver: receiver.clone(),
                    target: (*key).clone(),
                    id,
                    attempts,
                    error,
                });
            }
        }
        tx.execute(
            "DELETE FROM deliveries WHERE notification_id IN
                (SELECT id FROM notifications WHERE created_ms < ?1)",
            [cutoff],
        )?;
        tx.execute("DELETE FROM notifications WHERE created_ms < ?1", [cutoff])?;
        // Outcomes recorded for rows given up meanwhile.
        tx.execute(
            "DELETE FROM deliveries WHERE notification_id NOT IN (SELECT id FROM notifications)",
            [],
        )?;
        tx.commit()?;
        Ok(given_up)
    }
}

fn count(tx: &Transaction<'_>, receiver: &str, target: &str, column: &str) -> rusqlite::Result<()> {
    // `column` is one of our own literals, never input.
    tx.execute(
        &format!(
            "INSERT INTO target_counts (receiver, target, {column}) VALUES (?1, ?2, 1)
             ON CONFLICT (receiver, target) DO UPDATE SET {column} = {column} + 1"
        ),
        params![receiver, target],
    )?;
    Ok(())
}

/// Once every target has a final state: a row without a dedup key goes;
/// one with a key stays (body dropped) until `max_age`, so `enqueue_once`
/// still sees it.
fn finish_if_done(
    tx: &Transaction<'_>,
    id: i64,
    all_targets: &[TargetInfo],
    now: i64,
) -> rusqlite::Result<()> {
    let mut finals: HashSet<String> = HashSet::new();
    {
        let mut st = tx.prepare_cached(
            "SELECT target FROM deliveries WHERE notification_id = ?1 AND state != 'pending'",
        )?;
        for t in st.query_map([id], |r| r.get::<_, String>(0))? {
            finals.insert(t?);
        }
    }
    let Some((keyed, resend)) = tx
        .query_row(
            "SELECT dedup_key IS NOT NULL, resend FROM notifications WHERE id = ?1",
            [id],
            |r| Ok((r.get::<_, bool>(0)?, r.get::<_, bool>(1)?)),
        )
        .optional()?
    else {
        return Ok(());
    };
    let mut needed = all_targets.iter().filter(|t| !resend || t.wants_resends);
    if !needed.all(|t| finals.contains(&t.key)) {
        return Ok(());
    }
    if keyed {
        tx.execute(
            "UPDATE notifications SET done_ms = ?2, body = '' WHERE id = ?1",
            params![id, now],
        )?;
    } else {
        tx.execute("DELETE FROM deliveries WHERE notification_id = ?1", [id])?;
        tx.execute("DELETE FROM notifications WHERE id = ?1", [id])?;
    }
    Ok(())
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), OutboxError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(OutboxError::TooNew {
            path: path.to_path_buf(),
            found: version,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::info!(version = i + 1, path = %path.display(), "outbox schema migrated");
    }
    Ok(())
}

/// Runs `f` on the blocking pool (SQLite commits wait for the disk).
async fn blocking<T: Send + 'static>(
    outbox: &Outbox,
    f: impl FnOnce(&Outbox) -> Result<T, OutboxError> + Send + 'static,
) -> Result<T, OutboxError> {
    let o = outbox.clone();
    tokio::task::spawn_blocking(move || f(&o))
        .await
        .map_err(|e| OutboxError::Task(e.to_string()))?
}

/// Rows one pass of a worker looks at.
const PASS_ROWS: usize = 1000;

/// Delivers the outbox until `shutdown` resolves: one task per (receiver,
/// target), plus a sweep for rows past `max_age`. Returns after each task
/// finished the attempt it was making (bounded by the targets' timeouts).
pub async fn run(
    outbox: Outbox,
    targets: HashMap<String, Vec<Target>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut keys: HashMap<String, Vec<TargetInfo>> = HashMap::new();
    let mut workers = JoinSet::new();
    for (receiver, list) in targets {
        let mut seen = BTreeSet::new();
        let list: Vec<Target> = list
            .into_iter()
            .filter(|t| {
                let fresh = seen.insert(t.key());
                if !fresh {
                    tracing::warn!(receiver, target = %t.display(), "the same target twice in one receiver: delivering once");
                }
                fresh
            })
            .collect();
        let all: Arc<Vec<TargetInfo>> = Arc::new(list.iter().map(TargetInfo::of).collect());
        keys.insert(receiver.clone(), all.to_vec());
        for target in list {
            if target.is_plaintext_remote() {
                tracing::warn!(receiver, target = %target.display(), "alerts go to this target unencrypted (http:// to another host)");
            }
            let info = TargetInfo::of(&target);
            if let Err(e) = blocking(&outbox, {
                let (r, t) = (receiver.clone(), info.clone());
                move |o| o.register(&r, &t)
            })
            .await
            {
                tracing::error!(receiver, target = %target.display(), error = %e, "outbox");
            }
            workers.spawn(
                Worker {
                    outbox: outbox.clone(),
                    receiver: receiver.clone(),
                    info,
                    target,
                    all: all.clone(),
                    stop: stop_rx.clone(),
                    wake: outbox.inner.wake.subscribe(),
                }
                .run(),
            );
        }
    }
    let opts = outbox.options().clone();
    let sweep_every = (opts.max_age / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    tokio::pin!(shutdown);
    loop {
        match blocking(&outbox, {
            let keys = keys.clone();
            move |o| o.sweep(&keys)
        })
        .await
        {
            Ok(given_up) => {
                for g in given_up {
                    if g.target.is_empty() {
                        tracing::warn!(receiver = g.receiver, row = g.id, max_age = ?opts.max_age, "notification given up: its receiver has no targets");
                    } else {
                        tracing::warn!(receiver = g.receiver, target = g.target, row = g.id, attempts = g.attempts, last_error = g.error.as_deref().unwrap_or("none"), max_age = ?opts.max_age, "notification given up: not delivered within max_age");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "outbox sweep failed"),
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(sweep_every) => {}
        }
    }
    let _ = stop_tx.send(true);
    while workers.join_next().await.is_some() {}
}

struct Worker {
    outbox: Outbox,
    receiver: String,
    info: TargetInfo,
    target: Target,
    /// Every target of the receiver.
    all: Arc<Vec<TargetInfo>>,
    stop: watch::Receiver<bool>,
    wake: watch::Receiver<u64>,
}

/// What a worker does next.
enum Step {
    /// Deliver this candidate (index into the pass's rows).
    Send(usize),
    /// Nothing due: wait for an enqueue or this time (ms), if any.
    Idle(Option<i64>),
}

/// The first row of each group is the only one that may go; among those,
/// the oldest that is due.
fn pick(rows: &[Candidate], now: i64) -> Step {
    let mut blocked = HashSet::new();
    let mut next_due: Option<i64> = None;
    for (i, c) in rows.iter().enumerate() {
        if !blocked.insert(c.group_key.as_str()) {
            continue;
        }
        if c.next_attempt_ms > now {
            next_due = Some(next_due.map_or(c.next_attempt_ms, |d| d.min(c.next_attempt_ms)));
            continue;
        }
        return Step::Send(i);
    }
    Step::Idle(next_due)
}

impl Worker {
    async fn run(mut self) {
        let opts = self.outbox.options().clone();
        let mut failures: u32 = 0;
        loop {
            if *self.stop.borrow() {
                return;
            }
            // Mark what we are about to read as seen before reading it.
            self.wake.borrow_and_update();
            let rows = match blocking(&self.outbox, {
                let (r, t) = (self.receiver.clone(), self.info.clone());
                move |o| o.candidates(&r, &t, PASS_ROWS)
            })
            .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(receiver = self.receiver, target = %self.target.display(), error = %e, "outbox read failed");
                    self.pause(opts.max_backoff.min(Duration::from_secs(5)))
                        .await;
                    continue;
                }
            };
            let i = match pick(&rows, now_ms()) {
                Step::Send(i) => i,
                Step::Idle(next) => {
                    self.idle(next).await;
                    continue;
                }
            };
            let c = rows[i].clone();
            let n = match blocking(&self.outbox, move |o| o.body(c.id)).await {
                Ok(Some(Ok(n))) => n,
                Ok(Some(Err(why))) => {
                    tracing::error!(receiver = self.receiver, target = %self.target.display(), row = rows[i].id, error = why, "notification dropped");
                    self.record(&rows[i], Outcome::Dropped { error: why }).await;
                    continue;
                }
                Ok(None) => continue, // given up meanwhile
                Err(e) => {
                    tracing::error!(receiver = self.receiver, error = %e, "outbox read failed");
                    self.pause(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if self.target.latest_state_only() && self.covered_later(&rows, i, &n).await {
                self.record(&rows[i], Outcome::Superseded).await;
                continue;
            }
            let c = &rows[i];
            match deliver_keyed(&self.target, &n, c.token).await {
                Ok(()) => {
                    failures = 0;
                    tracing::info!(receiver = self.receiver, target = %self.target.display(), row = c.id, group = c.group_key, attempts = c.attempts + 1, "notification delivered");
                    self.record(c, Outcome::Delivered).await;
                }
                Err(DeliveryError {
                    retryable: true,
                    message,
                    retry_after,
                }) => {
                    failures += 1;
                    // Honour Retry-After, up to max_backoff.
                    let asked = retry_after.unwrap_or_default().min(opts.max_backoff);
                    let row_delay = opts.backoff(c.attempts + 1).max(asked);
                    tracing::warn!(receiver = self.receiver, target = %self.target.display(), row = c.id, attempt = c.attempts + 1, retry_in = ?row_delay, error = %message, "notification not delivered, will retry");
                    self.record(
                        c,
                        Outcome::Failed {
                            error: message,
                            next_attempt_ms: now_ms() + row_delay.as_millis() as i64,
                        },
                    )
                    .await;
                    let pause = opts.backoff(failures).max(asked);
                    self.pause(pause).await;
                }
                Err(DeliveryError { message, .. }) => {
                    tracing::error!(receiver = self.receiver, target = %self.target.display(), row = c.id, error = %message, "notification refused by the receiver: dropped for this target");
                    self.record(c, Outcome::Dropped { error: message }).await;
                }
            }
        }
    }

    /// Does a later row of the same group carry every alert of `n`?
    async fn covered_later(&self, rows: &[Candidate], i: usize, n: &Notification) -> bool {
        let mine: BTreeSet<String> = n.alerts.iter().map(|a| a.fingerprint.clone()).collect();
        for later in rows[i + 1..]
            .iter()
            .filter(|c| c.group_key == rows[i].group_key)
        {
            let id = later.id;
            if let Ok(Some(Ok(m))) = blocking(&self.outbox, move |o| o.body(id)).await {
                let theirs: BTreeSet<String> =
                    m.alerts.iter().map(|a| a.fingerprint.clone()).collect();
                if mine.is_subset(&theirs) {
                    return true;
                }
            }
        }
        false
    }

    async fn record(&self, c: &Candidate, outcome: Outcome) {
        let (r, k, all, c2) = (
            self.receiver.clone(),
            self.info.key.clone(),
            self.all.clone(),
            c.clone(),
        );
        if let Err(e) = blocking(&self.outbox, move |o| o.record(&r, &k, &all, &c2, &outcome)).await
        {
            // The attempt's result is lost; the row stays pending and is
            // tried again (a repeat, with the same token).
            tracing::error!(receiver = self.receiver, target = %self.target.display(), row = c.id, error = %e, "cannot record a delivery in the outbox");
            self.pause(Duration::from_secs(1)).await;
        }
    }

    /// Sleeps `d` (enqueues do not wake it: the target is failing).
    async fn pause(&self, d: Duration) {
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// Waits for an enqueue, the next due row, or the stop.
    async fn idle(&mut self, next_due_ms: Option<i64>) {
        let wait = next_due_ms
            .map(|t| Duration::from_millis((t - now_ms()).max(0) as u64))
            .unwrap_or(Duration::from_secs(3600));
        let mut stop = self.stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = self.wake.changed() => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::webhook::tests::sample;

    fn info(key: &str, wants_resends: bool) -> TargetInfo {
        TargetInfo {
            key: key.into(),
            wants_resends,
        }
    }

    fn cand(id: i64, group: &str, next: i64) -> Candidate {
        Candidate {
            id,
            group_key: group.into(),
            token: 0,
            attempts: 0,
            next_attempt_ms: next,
        }
    }

    #[test]
    fn pick_keeps_group_order_and_skips_waiting_groups() {
        let rows = [cand(1, "a", 500), cand(2, "a", 0), cand(3, "b", 0)];
        // "a" waits for row 1 (due at 500): row 2 must not overtake it.
        assert!(matches!(pick(&rows, 100), Step::Send(2)));
        assert!(matches!(pick(&rows, 600), Step::Send(0)));
        let rows = [cand(1, "a", 500), cand(2, "a", 0)];
        assert!(matches!(pick(&rows, 100), Step::Idle(Some(500))));
        assert!(matches!(pick(&[], 100), Step::Idle(None)));
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let o = OutboxOptions {
            max_age: Duration::from_secs(60),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
        };
        for _ in 0..100 {
            let b1 = o.backoff(1);
            assert!(b1 >= Duration::from_millis(500) && b1 <= Duration::from_secs(1));
            let b4 = o.backoff(4);
            assert!(b4 >= Duration::from_secs(4) && b4 <= Duration::from_secs(8));
            let b30 = o.backoff(30);
            assert!(b30 >= Duration::from_secs(150) && b30 <= Duration::from_secs(300));
            assert!(o.backoff(u32::MAX) <= Duration::from_secs(300));
        }
    }

    #[test]
    fn options_parse_with_defaults_and_validate() {
        let o: OutboxOptions = toml::from_str("max_age = \"2h\"").unwrap();
        assert_eq!(o.max_age, Duration::from_secs(7200));
        assert_eq!(o.max_backoff, OutboxOptions::default().max_backoff);
        assert!(o.validate().is_ok());
        assert!(toml::from_str::<OutboxOptions>("max_ages = \"2h\"").is_err());
        let bad = OutboxOptions {
            min_backoff: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "min_backoff");
        assert!(bad.backoff(1) >= Duration::from_millis(5));
        let bad = OutboxOptions {
            max_backoff: Duration::from_millis(100),
            ..Default::default()
        };
        assert_eq!(bad.validate().unwrap_err().0, "max_backoff");
    }

    #[test]
    fn enqueue_is_durable_and_once_keys_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/outbox.db");
        let o = Outbox::open(&path).unwrap();
        let n = sample();
        let a = o.enqueue("ops", &n).unwrap();
        let b = o.enqueue_once("ops", "f1:firing:1", &n).unwrap();
        assert!(b.is_some());
        assert_eq!(o.enqueue_once("ops", "f1:firing:1", &n).unwrap(), None);
        // Another receiver has its own keys.
        assert!(o.enqueue_once("ml", "f1:firing:1", &n).unwrap().is_some());
        drop(o);
        let o = Outbox::open(&path).unwrap();
        assert_eq!(o.open_rows().unwrap(), 3);
        let rows = o.candidates("ops", &info("webhook x", false), 10).unwrap();
        assert_eq!(
            rows.iter().map(|c| c.id).collect::<Vec<_>>(),
            [a, b.unwrap()]
        );
        assert_eq!(o.body(a).unwrap().unwrap().unwrap(), n);
        assert!(o.body(12345).unwrap().is_none());
    }

    #[test]
    fn a_row_finishes_when_every_target_is_final() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        let id = o.enqueue("ops", &sample()).unwrap();
        let keyed = o.enqueue_once("ops", "k", &sample()).unwrap().unwrap();
        let (a, b) = (info("A", false), info("B", false));
        let all = vec![a.clone(), b.clone()];
        o.register("ops", &a).unwrap();
        o.register("ops", &b).unwrap();
        let c = |id| {
            o.candidates("ops", &a, 10)
                .unwrap()
                .into_iter()
                .find(|c| c.id == id)
                .unwrap()
        };
        o.record(
            "ops",
            "A",
            &all,
            &c(id),
            &Outcome::Failed {
                error: "down".into(),
                next_attempt_ms: 0,
            },
        )
        .unwrap();
        o.record("ops", "A", &all, &c(id), &Outcome::Delivered)
            .unwrap();
        o.record("ops", "A", &all, &c(keyed), &Outcome::Delivered)
            .unwrap();
        // A is done with both rows; B still waits for both.
        assert!(o.candidates("ops", &a, 10).unwrap().is_empty());
        assert_eq!(o.candidates("ops", &b, 10).unwrap().len(), 2);
        let s = o.stats().unwrap();
        assert_eq!(
            (
                s[0].target.as_str(),
                s[0].delivered,
                s[0].failed_attempts,
                s[0].pending
            ),
            ("A", 2, 1, 0)
        );
        assert_eq!((s[1].target.as_str(), s[1].pending), ("B", 2));
        let cb = o.candidates("ops", &b, 10).unwrap();
        o.record(
            "ops",
            "B",
            &all,
            &cb[0],
            &Outcome::Dropped {
                error: "400".into(),
            },
        )
        .unwrap();
        o.record("ops", "B", &all, &cb[1], &Outcome::Delivered)
            .unwrap();
        assert_eq!(o.open_rows().unwrap(), 0);
        // The keyed row is remembered (without its body) for enqueue_once.
        assert_eq!(o.enqueue_once("ops", "k", &sample()).unwrap(), None);
        let left: i64 = o
            .conn()
            .query_row("SELECT count(*) FROM notifications", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 1);
    }

    #[test]
    fn resend_rows_go_only_to_targets_that_want_them() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open(&dir.path().join("o.db")).unwrap();
        let (am, hook) = (info("am", true), info("hook", false));
        let all = vec![am.clone(), hook.clone()];
        o.register("ops", &am).unwrap();
        o.register("ops", &hook).unwrap();
        let first = o.enqueue("ops", &sample()).unwrap();
        let again = o.enqueue_resend("ops", &sample()).unwrap();
        let ids = |t: &TargetInfo| -> Vec<i64> {
            o.candidates("ops", t, 10)
                .unwrap()
                .iter()
                .map(|c| c.id)
                .collect()
        };
        assert_eq!(ids(&am), [first, again]);
        assert_eq!(ids(&hook), [first]);
        let pending: Vec<u64> = o.stats().unwrap().iter().map(|s| s.pending).collect();
        assert_eq!(pending, [2, 1]);
        // The resend row is finished once the Alertmanager has it.
        let c = o.candidates("ops", &am, 10).unwrap();
        o.record("ops", "am", &all, &c[1], &Outcome::Delivered)
            .unwrap();
        assert_eq!(o.open_rows().unwrap(), 1);
        // And given up for it alone when old.
        o.enqueue_resend("ops", &sample()).unwrap();
        let old = Outbox::open_with(
            o.path(),
            OutboxOptions {
                max_age: Duration::ZERO,
                ..Default::default()
            },
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let gone = old
            .sweep(&HashMap::from([("ops".to_string(), all.clone())]))
            .unwrap();
        let who: Vec<(&str, i64)> = gone.iter().map(|g| (g.target.as_str(), g.id)).collect();
        assert_eq!(who, [("am", first), ("hook", first), ("am", first + 2)]);
    }

    #[test]
    fn sweep_gives_up_old_rows() {
        let dir = tempfile::tempdir().unwrap();
        let o = Outbox::open_with(
            &dir.path().join("o.db"),
            OutboxOptions {
                max_age: Duration::from_millis(1),
                ..Default::default()
            },
        )
        .unwrap();
        let id = o.enqueue("ops", &sample()).unwrap();
        o.enqueue("nobody", &sample()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let targets = HashMap::from([("ops".to_string(), vec![info("A", false)])]);
        let mut gone = o.sweep(&targets).unwrap();
        gone.sort();
        assert_eq!(gone.len(), 2);
        assert_eq!(
            (gone[0].receiver.as_str(), gone[0].target.as_str()),
            ("nobody", "")
        );
        assert_eq!((gone[1].target.as_str(), gone[1].id), ("A", id));
        assert_eq!(o.open_rows().unwrap(), 0);
        let s = o.stats().unwrap();
        assert_eq!(s[0].expired, 1);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        drop(Outbox::open(&path).unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let err = Outbox::open(&path).err().unwrap().to_string();
        assert!(err.contains("newer than this binary"), "{err}");
    }
}
