//! Alerts and silences in SQLite (`alerts.db` beside the sample store).
//!
//! One row per alert occurrence: created when it turns pending, updated as
//! it moves, kept when it resolves (history for `vitals alerts --all`). At
//! most one open (pending or firing) row per fingerprint. A restart loads
//! the open rows, so a firing alert that was notified is not notified again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use vitals_common::model::Labels;
use vitals_common::selector::{self, Selector};

use super::engine::{Alert, Change, Phase};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "{path}: alert database schema version {found} is newer than this collector knows ({known}); upgrade the collector"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("alert database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("bad silence matchers {0:?}: {1}")]
    Matchers(String, String),
    #[error("no silence with id {0}")]
    NoSilence(i64),
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE alerts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    fingerprint TEXT NOT NULL,
    rule TEXT NOT NULL,
    severity TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    phase TEXT NOT NULL,
    active_since_ms INTEGER NOT NULL,
    fired_ms INTEGER,
    resolved_ms INTEGER,
    last_true_ms INTEGER NOT NULL,
    value REAL,
    evidence TEXT NOT NULL,
    related TEXT NOT NULL,
    notified INTEGER NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX alerts_open ON alerts(fingerprint) WHERE phase != 'resolved';
CREATE INDEX alerts_time ON alerts(active_since_ms);
CREATE TABLE silences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    matchers TEXT NOT NULL,
    starts_ms INTEGER NOT NULL,
    ends_ms INTEGER NOT NULL,
    created_by TEXT NOT NULL,
    comment TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE actions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    alert_since_ms INTEGER NOT NULL,
    labels TEXT NOT NULL,
    what TEXT NOT NULL,
    who TEXT NOT NULL,
    dry_run INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    exit_code INTEGER,
    output TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX actions_once ON actions(action, fingerprint, alert_since_ms);
"#,
];

#[derive(Debug, Clone, PartialEq)]
pub struct Silence {
    pub id: i64,
    pub matchers: String,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub created_by: String,
    pub comment: String,
}

impl Silence {
    pub fn selector(&self) -> Option<Selector> {
        selector::parse(&self.matchers).ok()
    }
}

pub struct AlertDb {
    conn: Connection,
    path: PathBuf,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl AlertDb {
    pub fn open(path: &Path) -> Result<AlertDb, DbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let open_err = |source| DbError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() as i64 {
            return Err(DbError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known: MIGRATIONS.len() as i64,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(AlertDb {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Records that `action` is taken for an alert (`outcome`: running,
    /// dry_run or cooldown): the row's id, or `None` if this alert has
    /// one already (at most one run per alert).
    #[allow(clippy::too_many_arguments)]
    pub fn begin_action(
        &mut self,
        action: &str,
        alert: &Alert,
        what: &str,
        who: &str,
        dry_run: bool,
        outcome: &str,
        now: i64,
    ) -> Result<Option<i64>, DbError> {
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO actions (action, rule, fingerprint, alert_since_ms, labels,
                what, who, dry_run, outcome, started_ms, ended_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, CASE WHEN ?9 = 'running' THEN NULL ELSE ?10 END)",
            params![
                action,
                alert.rule,
                alert.fingerprint,
                alert.active_since_ms,
                json(&alert.labels),
                what,
                who,
                dry_run as i64,
                outcome,
                now
            ],
        )?;
        Ok((n == 1).then(|| self.conn.last_insert_rowid()))
    }

    /// Whether this alert already has a row for `action`.
    pub fn action_taken(&self, action: &str, alert: &Alert) -> Result<bool, DbError> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM actions WHERE action = ?1 AND fingerprint = ?2 AND alert_since_ms = ?3",
                params![action, alert.fingerprint, alert.active_since_ms],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// When `action` last ran (or would have, in dry-run): cooldown.
    pub fn action_last_run(&self, action: &str) -> Result<Option<i64>, DbError> {
        Ok(self.conn.query_row(
            "SELECT MAX(started_ms) FROM actions WHERE action = ?1 AND outcome != 'cooldown'",
            [action],
            |r| r.get(0),
        )?)
    }

    /// How a run ended.
    pub fn finish_action(
        &mut self,
        id: i64,
        (outcome, code, output): &super::action::Ended,
        now: i64,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE actions SET outcome = ?2, exit_code = ?3, output = ?4, ended_ms = ?5 WHERE id = ?1",
            params![id, outcome, code, output, now],
        )?;
        Ok(())
    }

    /// Runs a previous process started and did not see end: `interrupted`
    /// (never run again). Returns how many.
    pub fn interrupt_running(&mut self, now: i64) -> Result<usize, DbError> {
        Ok(self.conn.execute(
            "UPDATE actions SET outcome = 'interrupted', ended_ms = ?1,
                output = output || '[the collector stopped before the run ended]'
             WHERE outcome = 'running'",
            [now],
        )?)
    }

    /// The newest audit records first.
    pub fn actions(&self, limit: usize) -> Result<Vec<super::action::Run>, DbError> {
        let mut st = self.conn.prepare(
            "SELECT id, action, rule, fingerprint, alert_since_ms, labels, what, who, dry_run,
                    outcome, started_ms, ended_ms, exit_code, output
             FROM actions ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = st.query_map([limit as i64], |r| {
            Ok(super::action::Run {
                id: r.get(0)?,
                action: r.get(1)?,
                rule: r.get(2)?,
                fingerprint: r.get(3)?,
                alert_since_ms: r.get(4)?,
                labels: serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default(),
                what: r.get(6)?,
                who: r.get(7)?,
                dry_run: r.get::<_, i64>(8)? != 0,
                outcome: r.get(9)?,
                started_ms: r.get(10)?,
                ended_ms: r.get(11)?,
                exit_code: r.get(12)?,
                output: r.get(13)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Alert> {
        let labels: String = r.get("labels")?;
        let annotations: String = r.get("annotations")?;
        let evidence: String = r.get("evidence")?;
        let related: String = r.get("related")?;
        let phase: String = r.get("phase")?;
        Ok(Alert {
            id: Some(r.get("id")?),
            fingerprint: r.get("fingerprint")?,
            rule: r.get("rule")?,
            severity: r.get("severity")?,
            labels: serde_json::from_str::<Labels>(&labels).unwrap_or_default(),
            annotations: serde_json::from_str(&annotations).unwrap_or_default(),
            phase: Phase::parse(&phase).unwrap_or(Phase::Resolved),
            active_since_ms: r.get("active_since_ms")?,
            fired_ms: r.get("fired_ms")?,
            resolved_ms: r.get("resolved_ms")?,
            last_true_ms: r.get("last_true_ms")?,
            value: r.get::<_, Option<f64>>("value")?.unwrap_or(f64::NAN),
            evidence: serde_json::from_str(&evidence).unwrap_or_default(),
            related: serde_json::from_str(&related).unwrap_or_default(),
            notified: r.get::<_, i64>("notified")? != 0,
        })
    }

    /// Pending and firing alerts, to resume after a restart.
    pub fn load_open(&self) -> Result<Vec<Alert>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT * FROM alerts WHERE phase != 'resolved' ORDER BY id")?;
        let rows = stmt.query_map([], Self::row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Open alerts first (newest first), then, with `all`, resolved ones.
    pub fn list(&self, all: bool, limit: usize) -> Result<Vec<Alert>, DbError> {
        let sql = if all {
            "SELECT * FROM alerts ORDER BY (phase = 'resolved'), active_since_ms DESC LIMIT ?1"
        } else {
            "SELECT * FROM alerts WHERE phase != 'resolved' ORDER BY active_since_ms DESC LIMIT ?1"
        };
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map([limit as i64], Self::row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Alerts in one phase ("pending", "firing", "resolved"), newest first.
    pub fn list_phase(&self, phase: &str, limit: usize) -> Result<Vec<Alert>, DbError> {
        let mut stmt = self.conn.prepare(
            "SELECT * FROM alerts WHERE phase = ?1 ORDER BY active_since_ms DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![phase, limit as i64], Self::row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Writes one step's changes in one transaction.
    pub fn apply(&mut self, changes: &[Change]) -> Result<(), DbError> {
        if changes.is_empty() {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for c in changes {
            let a = c.alert();
            match c {
                Change::Dropped(_) => {
                    tx.execute(
                        "DELETE FROM alerts WHERE fingerprint = ?1 AND phase != 'resolved'",
                        [&a.fingerprint],
                    )?;
                }
                _ => {
                    let updated = tx.execute(
                        "UPDATE alerts SET annotations = ?2, phase = ?3, fired_ms = ?4, resolved_ms = ?5,
                            last_true_ms = ?6, value = ?7, evidence = ?8, related = ?9, notified = ?10
                         WHERE fingerprint = ?1 AND phase != 'resolved'",
                        params![
                            a.fingerprint,
                            json(&a.annotations),
                            a.phase.as_str(),
                            a.fired_ms,
                            a.resolved_ms,
                            a.last_true_ms,
                            a.value,
                            json(&a.evidence),
                            json(&a.related),
                            a.notified as i64,
                        ],
                    )?;
                    if updated == 0 {
                        tx.execute(
                            "INSERT INTO alerts (fingerprint, rule, severity, labels, annotations, phase,
                                active_since_ms, fired_ms, resolved_ms, last_true_ms, value, evidence, related, notified)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                            params![
                                a.fingerprint,
                                a.rule,
                                a.severity,
                                json(&a.labels),
                                json(&a.annotations),
                                a.phase.as_str(),
                                a.active_since_ms,
                                a.fired_ms,
                                a.resolved_ms,
                                a.last_true_ms,
                                a.value,
                                json(&a.evidence),
                                json(&a.related),
                                a.notified as i64,
                            ],
                        )?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    pub fn add_silence(
        &mut self,
        matchers: &str,
        starts_ms: i64,
        ends_ms: i64,
        created_by: &str,
        comment: &str,
    ) -> Result<Silence, DbError> {
        selector::parse(matchers).map_err(|e| DbError::Matchers(matchers.into(), e))?;
        self.conn.execute(
            "INSERT INTO silences (matchers, starts_ms, ends_ms, created_by, comment) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![matchers, starts_ms, ends_ms, created_by, comment],
        )?;
        Ok(Silence {
            id: self.conn.last_insert_rowid(),
            matchers: matchers.into(),
            starts_ms,
            ends_ms,
            created_by: created_by.into(),
            comment: comment.into(),
        })
    }

    /// Silences in force at `now` (or every one, with `all`).
    pub fn silences(&self, all: bool, now: i64) -> Result<Vec<Silence>, DbError> {
        let mut stmt = self.conn.prepare(
            "SELECT id, matchers, starts_ms, ends_ms, created_by, comment FROM silences
             WHERE ?1 OR ends_ms > ?2 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![all, now], |r| {
            Ok(Silence {
                id: r.get(0)?,
                matchers: r.get(1)?,
                starts_ms: r.get(2)?,
                ends_ms: r.get(3)?,
                created_by: r.get(4)?,
                comment: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Ends a silence at `now`.
    pub fn expire_silence(&mut self, id: i64, now: i64) -> Result<(), DbError> {
        let found: Option<i64> = self
            .conn
            .query_row("SELECT id FROM silences WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        if found.is_none() {
            return Err(DbError::NoSilence(id));
        }
        self.conn.execute(
            "UPDATE silences SET ends_ms = min(ends_ms, ?2) WHERE id = ?1",
            params![id, now],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn alert(fp: &str, phase: Phase) -> Alert {
        let mut labels = Labels::new();
        labels.insert("alertname".into(), "X".into());
        Alert {
            id: None,
            fingerprint: fp.into(),
            rule: "X".into(),
            severity: "warning".into(),
            labels,
            annotations: BTreeMap::new(),
            phase,
            active_since_ms: 1,
            fired_ms: None,
            resolved_ms: None,
            last_true_ms: 1,
            value: f64::NAN,
            evidence: Vec::new(),
            related: Vec::new(),
            notified: false,
        }
    }

    #[test]
    fn lifecycle_rows_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.db");
        let mut db = AlertDb::open(&path).unwrap();
        let mut a = alert("f1", Phase::Pending);
        db.apply(&[Change::Pending(a.clone())]).unwrap();
        a.phase = Phase::Firing;
        a.fired_ms = Some(5);
        a.notified = true;
        db.apply(&[Change::Fired(a.clone())]).unwrap();
        db.apply(&[Change::Pending(alert("f2", Phase::Pending))])
            .unwrap();
        db.apply(&[Change::Dropped(alert("f2", Phase::Pending))])
            .unwrap();
        drop(db);
        let db = AlertDb::open(&path).unwrap();
        let open = db.load_open().unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].phase, Phase::Firing);
        assert!(open[0].notified);
        assert!(open[0].value.is_nan());
        let mut db = db;
        a.phase = Phase::Resolved;
        a.resolved_ms = Some(9);
        db.apply(&[Change::Resolved(a.clone())]).unwrap();
        assert!(db.load_open().unwrap().is_empty());
        assert_eq!(db.list(true, 10).unwrap().len(), 1);
        // The same fingerprint may open again after it resolved.
        db.apply(&[Change::Pending(alert("f1", Phase::Pending))])
            .unwrap();
        assert_eq!(db.list(true, 10).unwrap().len(), 2);
    }

    #[test]
    fn silences_expire_and_bad_matchers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = AlertDb::open(&dir.path().join("a.db")).unwrap();
        let s = db
            .add_silence(r#"{alertname="NodeDown"}"#, 0, 100, "alice", "maintenance")
            .unwrap();
        assert_eq!(db.silences(false, 50).unwrap().len(), 1);
        assert_eq!(db.silences(false, 100).unwrap().len(), 0);
        db.expire_silence(s.id, 10).unwrap();
        assert_eq!(db.silences(false, 20).unwrap().len(), 0);
        assert!(matches!(
            db.expire_silence(99, 10),
            Err(DbError::NoSilence(99))
        ));
        assert!(matches!(
            db.add_silence("{alertname=}", 0, 1, "a", ""),
            Err(DbError::Matchers(_, _))
        ));
    }
}
