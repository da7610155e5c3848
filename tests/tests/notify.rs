//! Notifiers and the outbox against real receivers on 127.0.0.1: Debian's
//! Alertmanager, Bugsink (Sentry-compatible), and a recording webhook
//! receiver (`vitals_e2e::receivers`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use tokio::runtime::Runtime;
use vitals_collector::notify::{
    self, AlertPayload, AlertStatus, Notification, Outbox, OutboxOptions, ReceiverConfig, Target,
    TargetStats,
};
use vitals_e2e::receivers::*;
use vitals_e2e::*;

const T0: i64 = 1_760_000_000_000;

fn alert(fp: &str, status: AlertStatus, severity: &str, node: &str) -> AlertPayload {
    AlertPayload {
        fingerprint: fp.into(),
        status,
        labels: BTreeMap::from([
            ("alertname".into(), "NfsMountHung".into()),
            ("severity".into(), severity.into()),
            ("node".into(), node.into()),
            ("team".into(), "ops".into()),
        ]),
        annotations: BTreeMap::from([
            ("summary".into(), format!("NFS mount /data hung on {node}")),
            (
                "probable_cause".into(),
                "nas-01 READ latency 40x its baseline".into(),
            ),
            (
                "evidence".into(),
                "node_mountstats_nfs_transport_backlog_queue_total=12".into(),
            ),
        ]),
        starts_at_ms: T0,
        ends_at_ms: (status == AlertStatus::Resolved).then_some(T0 + 120_000),
        generator_url: "vitals://rules/NfsMountHung".into(),
    }
}

fn notification(receiver: &str, group: &str, alerts: Vec<AlertPayload>) -> Notification {
    Notification {
        receiver: receiver.into(),
        group_key: group.into(),
        group_labels: BTreeMap::from([("alertname".into(), "NfsMountHung".into())]),
        alerts,
        external_url: "https://vitals.example".into(),
    }
}

fn firing(fp: &str) -> Notification {
    notification(
        "ops",
        &format!("g-{fp}"),
        vec![alert(fp, AlertStatus::Firing, "critical", "train-01")],
    )
}

fn resolved(fp: &str) -> Notification {
    notification(
        "ops",
        &format!("g-{fp}"),
        vec![alert(fp, AlertStatus::Resolved, "critical", "train-01")],
    )
}

/// The targets of a `[alerting.receivers.NAME]` table written as TOML.
fn targets(toml_text: &str) -> Vec<Target> {
    let c: ReceiverConfig = toml::from_str(toml_text).unwrap();
    c.targets(Path::new(".")).unwrap()
}

fn one_target(toml_text: &str) -> Target {
    let mut t = targets(toml_text);
    assert_eq!(t.len(), 1);
    t.remove(0)
}

/// Quick retries so that a test sees several within a second.
fn quick() -> OutboxOptions {
    OutboxOptions {
        max_age: Duration::from_secs(3600),
        min_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(400),
    }
}

/// A dispatcher running on its own runtime until stopped.
struct Dispatcher {
    rt: Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Dispatcher {
    fn start(outbox: &Outbox, targets: HashMap<String, Vec<Target>>) -> Dispatcher {
        let rt = Runtime::new().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(notify::run(outbox.clone(), targets, async move {
            let _ = rx.await;
        }));
        Dispatcher {
            rt,
            stop: Some(tx),
            task: Some(task),
        }
    }

    fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(15), task).await })
            .expect("the dispatcher stops within 15 s")
            .unwrap();
    }
}

/// The target's counts (zeros until the dispatcher has registered it).
fn stats_of(outbox: &Outbox, target: &Target) -> TargetStats {
    outbox
        .stats()
        .unwrap()
        .into_iter()
        .find(|s| s.target == target.key())
        .unwrap_or_default()
}

fn deliver(target: &Target, n: &Notification) -> Result<(), notify::DeliveryError> {
    Runtime::new().unwrap().block_on(notify::deliver(target, n))
}

#[test]
fn webhook_gets_firing_then_resolved_in_alertmanagers_v4_format() {
    let hook = WebhookReceiver::start();
    let target = one_target(&format!("webhook = {{ url = {:?} }}", hook.url()));
    deliver(&target, &firing("fp1")).unwrap();
    deliver(&target, &resolved("fp1")).unwrap();
    let got = hook.received();
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].method.as_str(), got[0].path.as_str()),
        ("POST", "/hook")
    );
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    let labels = json!({"alertname": "NfsMountHung", "node": "train-01", "severity": "critical", "team": "ops"});
    let annotations = json!({
        "evidence": "node_mountstats_nfs_transport_backlog_queue_total=12",
        "probable_cause": "nas-01 READ latency 40x its baseline",
        "summary": "NFS mount /data hung on train-01"
    });
    let want = |status: &str, ends: &str| {
        json!({
            "version": "4",
            "groupKey": "g-fp1",
            "truncatedAlerts": 0,
            "status": status,
            "receiver": "ops",
            "groupLabels": {"alertname": "NfsMountHung"},
            "commonLabels": labels,
            "commonAnnotations": annotations,
            "externalURL": "https://vitals.example",
            "alerts": [{
                "status": status,
                "labels": labels,
                "annotations": annotations,
                "startsAt": "2025-10-09T08:53:20.000Z",
                "endsAt": ends,
                "generatorURL": "vitals://rules/NfsMountHung",
                "fingerprint": "fp1"
            }]
        })
    };
    assert_eq!(got[0].json(), want("firing", "0001-01-01T00:00:00Z"));
    assert_eq!(got[1].json(), want("resolved", "2025-10-09T08:55:20.000Z"));
}

#[test]
fn webhook_over_tls_trusts_the_configured_ca_only() {
    let env = Env::new(); // a CA and a localhost/127.0.0.1 certificate from `vitals certs`
    let (cert, key) = env.cert("collector");
    let hook = WebhookReceiver::start_tls(0, &cert, &key);
    assert!(hook.url().starts_with("https://"));
    let with_ca = one_target(&format!(
        "webhook = {{ url = {:?}, ca = {:?} }}",
        hook.url(),
        env.ca()
    ));
    deliver(&with_ca, &firing("tls")).unwrap();
    assert_eq!(hook.received().len(), 1);
    assert_eq!(hook.received()[0].json()["alerts"][0]["fingerprint"], "tls");
    // The system's roots do not know our CA: the handshake fails, retryably.
    let system = one_target(&format!("webhook = {{ url = {:?} }}", hook.url()));
    let err = deliver(&system, &firing("tls")).unwrap_err();
    assert!(err.retryable && err.message.contains("TLS"), "{err:?}");
    assert_eq!(hook.received().len(), 1);
}

#[test]
fn alertmanager_lists_the_alert_active_then_resolved() {
    let test = "alertmanager_lists_the_alert_active_then_resolved";
    let Some(_) = required(test, "VITALS_TEST_ALERTMANAGER", alertmanager_binary()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_am, url) = start_alertmanager(dir.path());
    let target = one_target(&format!(
        "alertmanager = {{ url = {url:?}, resend_interval = \"30s\" }}"
    ));
    assert_eq!(target.resend_interval(), Some(Duration::from_secs(30)));
    let mut n = firing("am1");
    n.alerts[0].starts_at_ms = notify_now() - 60_000;
    deliver(&target, &n).unwrap();
    let alerts = alertmanager_alerts(&url);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(a["status"]["state"], "active");
    assert_eq!(a["labels"]["alertname"], "NfsMountHung");
    assert_eq!(a["labels"]["node"], "train-01");
    assert_eq!(
        a["annotations"]["probable_cause"],
        "nas-01 READ latency 40x its baseline"
    );
    assert_eq!(a["generatorURL"], "vitals://rules/NfsMountHung");
    // Firing: it ends 4 resend intervals (2 min) from now unless re-sent.
    let ends = a["endsAt"].as_str().unwrap();
    let ends_ms = humantime::parse_rfc3339_weak(ends.trim_end_matches('Z'))
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let ahead = ends_ms - notify_now();
    assert!(
        (100_000..=121_000).contains(&ahead),
        "endsAt {ends} is {ahead} ms ahead"
    );

    let mut r = resolved("am1");
    r.alerts[0].starts_at_ms = n.alerts[0].starts_at_ms;
    r.alerts[0].ends_at_ms = Some(notify_now() - 1_000);
    deliver(&target, &r).unwrap();
    // A resolved alert is no longer listed (Alertmanager 0.25 lists only
    // unresolved ones).
    let gone = wait_until(Duration::from_secs(10), || {
        alertmanager_alerts(&url).is_empty()
    });
    assert!(gone, "still listed: {:?}", alertmanager_alerts(&url));
}

fn notify_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn bugsink_groups_an_alerts_events_into_one_issue_and_catches_up_after_an_outage() {
    let test = "bugsink_groups_an_alerts_events_into_one_issue_and_catches_up_after_an_outage";
    let Some(_) = required(test, "VITALS_TEST_BUGSINK", bugsink_venv()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut bugsink = start_bugsink_on(dir.path(), free_port());
    let target = one_target(&format!(
        "sentry = {{ dsn = {:?}, environment = \"test\" }}",
        bugsink.dsn
    ));

    // Firing twice (a repeat) and resolved: three events, one issue.
    deliver(&target, &firing("bs1")).unwrap();
    deliver(&target, &firing("bs1")).unwrap();
    deliver(&target, &resolved("bs1")).unwrap();
    // Another alert: its own issue.
    let mut other = firing("bs2");
    other.alerts[0]
        .labels
        .insert("severity".into(), "warning".into());
    deliver(&target, &other).unwrap();

    let ev = bugsink_events(&bugsink.db);
    assert_eq!(ev.len(), 4, "{ev:#?}");
    let levels: Vec<&str> = ev.iter().map(|e| e.level.as_str()).collect();
    assert_eq!(levels, ["fatal", "fatal", "info", "warning"]);
    assert_eq!(ev[0].issue_id, ev[1].issue_id);
    assert_eq!(ev[0].issue_id, ev[2].issue_id);
    assert_ne!(ev[0].issue_id, ev[3].issue_id);
    assert_eq!(ev[0].title, "NFS mount /data hung on train-01");
    assert_eq!(ev[2].title, "resolved: NFS mount /data hung on train-01");
    let d = &ev[0].data;
    assert_eq!(d["fingerprint"], json!(["bs1"]));
    assert_eq!(d["tags"]["node"], "train-01");
    assert_eq!(d["tags"]["team"], "ops");
    assert_eq!(d["tags"]["alertname"], "NfsMountHung");
    assert_eq!(d["environment"], "test");
    assert_eq!(
        d["extra"]["evidence"],
        "node_mountstats_nfs_transport_backlog_queue_total=12"
    );
    assert_eq!(
        d["contexts"]["alert"]["generator_url"],
        "vitals://rules/NfsMountHung"
    );

    // Bugsink down: the outbox keeps the notification and delivers it,
    // once, when Bugsink is back.
    bugsink.stop();
    let odir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(&odir.path().join("outbox.db"), quick()).unwrap();
    let d = Dispatcher::start(
        &outbox,
        HashMap::from([("ops".to_string(), vec![target.clone()])]),
    );
    outbox.enqueue("ops", &firing("bs3")).unwrap();
    let retried = wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).failed_attempts >= 2
    });
    assert!(retried, "{:?}", outbox.stats());
    bugsink.restart();
    let delivered = wait_until(Duration::from_secs(20), || {
        stats_of(&outbox, &target).delivered == 1
    });
    assert!(delivered, "{:?}", outbox.stats());
    std::thread::sleep(Duration::from_secs(1));
    d.stop();
    let ev = bugsink_events(&bugsink.db);
    let bs3: Vec<_> = ev
        .iter()
        .filter(|e| e.data["fingerprint"] == json!(["bs3"]))
        .collect();
    assert_eq!(bs3.len(), 1, "{ev:#?}");
    assert_eq!(stats_of(&outbox, &target).pending, 0);
}

#[test]
fn sentry_repeat_of_an_unanswered_attempt_is_one_event() {
    // Every attempt for one outbox row sends the same event ids, and the
    // server's "already exists" for a repeat counts as delivered: an
    // attempt whose answer was lost is replayed here from a copy of the
    // outbox taken before it.
    let test = "sentry_repeat_of_an_unanswered_attempt_is_one_event";
    let Some(_) = required(test, "VITALS_TEST_BUGSINK", bugsink_venv()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bugsink = start_bugsink_on(dir.path(), free_port());
    let target = one_target(&format!("sentry = {{ dsn = {:?} }}", bugsink.dsn));
    let odir = tempfile::tempdir().unwrap();
    let path = odir.path().join("outbox.db");
    let outbox = Outbox::open_with(&path, quick()).unwrap();
    outbox.enqueue("ops", &firing("dup")).unwrap();
    drop(outbox); // the last close folds the WAL into the file
    let copy = odir.path().join("copy.db");
    std::fs::copy(&path, &copy).unwrap();
    let outbox = Outbox::open_with(&path, quick()).unwrap();
    let d = Dispatcher::start(
        &outbox,
        HashMap::from([("ops".to_string(), vec![target.clone()])]),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).delivered == 1
    }));
    d.stop();
    let replay = Outbox::open_with(&copy, quick()).unwrap();
    let d = Dispatcher::start(
        &replay,
        HashMap::from([("ops".to_string(), vec![target.clone()])]),
    );
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&replay, &target).delivered == 1
    }));
    d.stop();
    let ev = bugsink_events(&bugsink.db);
    assert_eq!(ev.len(), 1, "{ev:#?}");
}

#[test]
fn outbox_receiver_down_for_a_while_gets_it_once_after_it_returns() {
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let target = one_target(&format!("webhook = {{ url = {url:?} }}"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open_with(&path, quick()).unwrap();
    let routes = HashMap::from([("ops".to_string(), vec![target.clone()])]);
    let d = Dispatcher::start(&outbox, routes.clone());
    outbox.enqueue("ops", &firing("down1")).unwrap();
    // Nothing listens: several attempts fail and are counted.
    let retried = wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).failed_attempts >= 3
    });
    assert!(retried, "{:?}", outbox.stats());
    assert_eq!(stats_of(&outbox, &target).pending, 1);

    let hook = WebhookReceiver::start_on(port);
    assert!(
        wait_until(Duration::from_secs(10), || hook.received().len() == 1),
        "not delivered after the receiver came back: {:?}",
        outbox.stats()
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(hook.received().len(), 1, "delivered more than once");
    assert_eq!(
        hook.received()[0].json()["alerts"][0]["fingerprint"],
        "down1"
    );
    let s = stats_of(&outbox, &target);
    assert_eq!((s.delivered, s.pending, s.dropped), (1, 0, 0));
    d.stop();

    // A restarted dispatcher (and a reopened outbox) sends nothing again.
    drop(outbox);
    let outbox = Outbox::open_with(&path, quick()).unwrap();
    let d = Dispatcher::start(&outbox, routes);
    std::thread::sleep(Duration::from_millis(1500));
    d.stop();
    assert_eq!(hook.received().len(), 1, "re-delivered after a restart");
    assert_eq!(stats_of(&outbox, &target).delivered, 1);
}

#[test]
fn outbox_a_target_that_was_down_catches_up_in_order_and_the_other_gets_nothing_twice() {
    let up = WebhookReceiver::start();
    let down_port = free_port();
    let first = one_target(&format!("webhook = {{ url = {:?} }}", up.url()));
    let later = one_target(&format!(
        "webhook = {{ url = \"http://127.0.0.1:{down_port}/hook\" }}"
    ));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let outbox = Outbox::open_with(&path, quick()).unwrap();
    let routes = HashMap::from([("ops".to_string(), vec![first, later.clone()])]);
    let d = Dispatcher::start(&outbox, routes.clone());
    outbox.enqueue("ops", &firing("a")).unwrap();
    outbox.enqueue("ops", &resolved("a")).unwrap();
    outbox.enqueue("ops", &firing("b")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || up.received().len() == 3));
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &later).failed_attempts >= 2
    }));
    d.stop();
    // Restarts while the second target is still down.
    for _ in 0..2 {
        let d = Dispatcher::start(&outbox, routes.clone());
        std::thread::sleep(Duration::from_millis(500));
        d.stop();
    }
    assert_eq!(up.received().len(), 3, "the first target got a repeat");
    let hook = WebhookReceiver::start_on(down_port);
    let d = Dispatcher::start(&outbox, routes);
    assert!(wait_until(Duration::from_secs(10), || hook
        .received()
        .len()
        == 3));
    std::thread::sleep(Duration::from_millis(1000));
    d.stop();
    assert_eq!(up.received().len(), 3);
    let seen: Vec<(String, String)> = hook
        .received()
        .iter()
        .map(|r| {
            let v = r.json();
            (
                v["alerts"][0]["fingerprint"].as_str().unwrap().to_string(),
                v["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Per group in order: "a" firing before "a" resolved.
    let pos = |fp: &str, st: &str| seen.iter().position(|s| s.0 == fp && s.1 == st).unwrap();
    assert!(pos("a", "firing") < pos("a", "resolved"), "{seen:?}");
    assert!(seen.contains(&("b".into(), "firing".into())));
    assert_eq!(outbox.open_rows().unwrap(), 0);
}

#[test]
fn outbox_drops_what_the_receiver_refuses_and_retries_what_it_does_not_answer() {
    let hook = WebhookReceiver::start();
    let target = one_target(&format!("webhook = {{ url = {:?} }}", hook.url()));
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(&dir.path().join("outbox.db"), quick()).unwrap();
    let d = Dispatcher::start(
        &outbox,
        HashMap::from([("ops".to_string(), vec![target.clone()])]),
    );
    // 400: refused for good, one request, recorded as dropped.
    hook.set_status(400);
    outbox.enqueue("ops", &firing("bad")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).dropped == 1
    }));
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(hook.received().len(), 1);

    // No answer at all (the request arrived, the answer was lost): retried
    // with the same Idempotency-Key until answered.
    hook.set_status(0);
    outbox.enqueue("ops", &firing("lost")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || hook
        .received()
        .len()
        >= 3));
    hook.set_status(503);
    assert!(wait_until(Duration::from_secs(10), || hook
        .received()
        .len()
        >= 4));
    hook.set_status(200);
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).delivered == 1
    }));
    d.stop();
    let got = hook.received();
    let keys: Vec<&str> = got[1..]
        .iter()
        .map(|r| r.header("idempotency-key").unwrap())
        .collect();
    assert!(
        keys.iter().all(|k| *k == keys[0] && k.len() == 32),
        "{keys:?}"
    );
    assert_ne!(got[0].header("idempotency-key"), Some(keys[0]));
    let s = stats_of(&outbox, &target);
    assert_eq!((s.delivered, s.dropped, s.pending), (1, 1, 0));
    assert!(s.failed_attempts >= 3, "{s:?}");
}

#[test]
fn outbox_gives_up_after_max_age() {
    let port = free_port();
    let target = one_target(&format!(
        "webhook = {{ url = \"http://127.0.0.1:{port}/hook\" }}"
    ));
    let dir = tempfile::tempdir().unwrap();
    let opts = OutboxOptions {
        max_age: Duration::from_millis(800),
        ..quick()
    };
    let outbox = Outbox::open_with(&dir.path().join("outbox.db"), opts).unwrap();
    let d = Dispatcher::start(
        &outbox,
        HashMap::from([("ops".to_string(), vec![target.clone()])]),
    );
    outbox.enqueue("ops", &firing("old")).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).expired == 1
    }));
    let hook = WebhookReceiver::start_on(port);
    std::thread::sleep(Duration::from_millis(1000));
    d.stop();
    assert!(
        hook.received().is_empty(),
        "a given-up notification was sent"
    );
    let s = stats_of(&outbox, &target);
    assert_eq!((s.delivered, s.expired, s.pending), (0, 1, 0));
    assert!(s.failed_attempts >= 1);
}

#[test]
fn outbox_alertmanager_down_then_back_gets_the_latest_state_only() {
    let test = "outbox_alertmanager_down_then_back_gets_the_latest_state_only";
    let Some(_) = required(test, "VITALS_TEST_ALERTMANAGER", alertmanager_binary()) else {
        return;
    };
    let port = free_port();
    let target = one_target(&format!(
        "alertmanager = {{ url = \"http://127.0.0.1:{port}\" }}"
    ));
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(&dir.path().join("outbox.db"), quick()).unwrap();
    let d = Dispatcher::start(
        &outbox,
        HashMap::from([("ops".to_string(), vec![target.clone()])]),
    );
    let start = notify_now() - 60_000;
    let mut f1 = firing("x");
    f1.alerts[0].starts_at_ms = start;
    let mut r1 = resolved("x");
    r1.alerts[0].starts_at_ms = start;
    r1.alerts[0].ends_at_ms = Some(notify_now());
    let mut f2 = firing("y");
    f2.alerts[0].starts_at_ms = start;
    f2.alerts[0].labels.insert("node".into(), "train-02".into());
    outbox.enqueue("ops", &f1).unwrap();
    outbox.enqueue("ops", &r1).unwrap();
    outbox.enqueue("ops", &f2).unwrap();
    assert!(wait_until(Duration::from_secs(10), || {
        stats_of(&outbox, &target).failed_attempts >= 2
    }));
    let am_dir = tempfile::tempdir().unwrap();
    let (_am, url) = start_alertmanager_on(am_dir.path(), port);
    assert!(
        wait_until(Duration::from_secs(20), || {
            stats_of(&outbox, &target).pending == 0
        }),
        "{:?}",
        outbox.stats()
    );
    d.stop();
    // "x" firing was covered by "x" resolved and never sent: x is not
    // active; y is.
    let s = stats_of(&outbox, &target);
    assert_eq!((s.delivered, s.superseded), (2, 1), "{s:?}");
    let active: Vec<String> = alertmanager_alerts(&url)
        .iter()
        .filter(|a| a["status"]["state"] == "active")
        .map(|a| a["labels"]["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(active, ["train-02"]);
}

#[test]
fn outbox_resends_of_a_firing_alert_go_to_alertmanager_only() {
    let test = "outbox_resends_of_a_firing_alert_go_to_alertmanager_only";
    let Some(_) = required(test, "VITALS_TEST_ALERTMANAGER", alertmanager_binary()) else {
        return;
    };
    let am_dir = tempfile::tempdir().unwrap();
    let (_am, url) = start_alertmanager(am_dir.path());
    let hook = WebhookReceiver::start();
    let list = targets(&format!(
        "webhook = {{ url = {:?} }}\nalertmanager = {{ url = {url:?} }}",
        hook.url()
    ));
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open_with(&dir.path().join("outbox.db"), quick()).unwrap();
    let d = Dispatcher::start(&outbox, HashMap::from([("ops".to_string(), list.clone())]));
    let mut n = firing("r");
    n.alerts[0].starts_at_ms = notify_now() - 60_000;
    outbox.enqueue("ops", &n).unwrap();
    let ends = || -> Option<String> {
        alertmanager_alerts(&url)
            .first()
            .map(|a| a["endsAt"].as_str().unwrap().to_string())
    };
    assert!(wait_until(Duration::from_secs(10), || {
        ends().is_some() && hook.received().len() == 1
    }));
    let first_end = ends().unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    outbox.enqueue_resend("ops", &n).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || ends().unwrap() > first_end),
        "endsAt not pushed back by the resend: {first_end}"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        outbox.open_rows().unwrap() == 0
    }));
    d.stop();
    assert_eq!(hook.received().len(), 1, "the webhook got the resend");
    let webhook_stats = stats_of(&outbox, &list[0]);
    assert_eq!((webhook_stats.delivered, webhook_stats.pending), (1, 0));
    assert_eq!(stats_of(&outbox, &list[1]).delivered, 2);
}
