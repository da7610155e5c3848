//! Real notification receivers on 127.0.0.1 for alerting tests: Debian's
//! Alertmanager, Bugsink (a Sentry-compatible server), and a webhook
//! receiver that records every request.
//!
//! Alertmanager and Bugsink are optional on a developer's machine and
//! required where CI says so (`VITALS_TEST_ALERTMANAGER=1`,
//! `VITALS_TEST_BUGSINK=1`, both set by `.ci/run`): see [`required`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use crate::{Proc, free_port, wait_until};

/// `Some(x)` if the component is here; if not, `None` after printing why
/// the test is skipped — unless `var=1` says it must be here, then the
/// test fails.
pub fn required<T>(test: &str, var: &str, found: Result<T, String>) -> Option<T> {
    match found {
        Ok(x) => Some(x),
        Err(why) if std::env::var(var).as_deref() == Ok("1") => {
            panic!("{test}: {var}=1 but {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set {var}=1 to make this a failure; .ci/run does)");
            None
        }
    }
}

/// One HTTP/1.0 request (the server closes after answering, no chunking);
/// returns (status, body).
pub fn http(method: &str, url: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other("http:// only"))?;
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = TcpStream::connect(hostport)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} /{path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------- Alertmanager

/// Debian's `prometheus-alertmanager`, if installed.
pub fn alertmanager_binary() -> Result<PathBuf, String> {
    ["/usr/bin/prometheus-alertmanager", "/usr/bin/alertmanager"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| "no Alertmanager (apt-get install prometheus-alertmanager)".to_string())
}

/// Starts an Alertmanager on 127.0.0.1 (no cluster port), routing every
/// alert to a receiver that sends nothing; state under `dir`. Returns the
/// process and its base URL.
pub fn start_alertmanager(dir: &Path) -> (Proc, String) {
    start_alertmanager_on(dir, free_port())
}

/// [`start_alertmanager`] on a given port (e.g. one a dispatcher was
/// already sending to while nothing listened).
pub fn start_alertmanager_on(dir: &Path, port: u16) -> (Proc, String) {
    let bin = alertmanager_binary().unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let cfg = dir.join("alertmanager.yml");
    std::fs::write(
        &cfg,
        "route:\n  receiver: \"null\"\n  group_wait: 1s\n  group_interval: 1s\nreceivers:\n  - name: \"null\"\n",
    )
    .unwrap();
    let p = Proc::spawn_cmd(
        Command::new(bin).args([
            format!("--config.file={}", cfg.display()),
            format!("--storage.path={}", dir.join("data").display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--cluster.listen-address=".to_string(),
            "--log.level=warn".to_string(),
        ]),
        &dir.join("alertmanager.log"),
    );
    let url = format!("http://127.0.0.1:{port}");
    let up = wait_until(Duration::from_secs(30), || {
        matches!(http("GET", &format!("{url}/-/ready"), None), Ok((200, _)))
    });
    assert!(up, "Alertmanager did not start; log:\n{}", p.log_text());
    (p, url)
}

/// `GET /api/v2/alerts` (active, silenced, inhibited and unprocessed ones).
pub fn alertmanager_alerts(url: &str) -> Vec<serde_json::Value> {
    let (status, body) = http("GET", &format!("{url}/api/v2/alerts"), None).unwrap();
    assert_eq!(status, 200, "GET /api/v2/alerts: {body}");
    serde_json::from_str(&body).unwrap()
}

// --------------------------------------------------------------------- Bugsink

/// Where the test venv with Bugsink is: `$VITALS_BUGSINK_VENV`, else
/// `/var/cache/vitals-test/bugsink-venv` (what `.ci/run` installs), else
/// `~/.cache/vitals-test/bugsink-venv`.
pub fn bugsink_venv() -> Result<PathBuf, String> {
    let mut places = Vec::new();
    if let Some(v) = std::env::var_os("VITALS_BUGSINK_VENV") {
        places.push(PathBuf::from(v));
    }
    places.push("/var/cache/vitals-test/bugsink-venv".into());
    if let Some(home) = std::env::var_os("HOME") {
        places.push(Path::new(&home).join(".cache/vitals-test/bugsink-venv"));
    }
    places
        .iter()
        .find(|p| p.join("bin/bugsink-manage").exists() && p.join("bin/gunicorn").exists())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no Bugsink venv in {places:?} (python3 -m venv DIR && DIR/bin/pip install bugsink)"
            )
        })
}

/// A running Bugsink.
pub struct Bugsink {
    pub proc: Proc,
    /// `http://KEY@127.0.0.1:PORT/PROJECT_ID`
    pub dsn: String,
    /// Its SQLite database (events, issues).
    pub db: PathBuf,
    pub url: String,
    dir: PathBuf,
    port: u16,
}

/// One stored event, from Bugsink's database.
#[derive(Debug, Clone)]
pub struct BugsinkEvent {
    pub event_id: String,
    pub issue_id: String,
    pub level: String,
    /// The first line of the message.
    pub title: String,
    /// The event as sent (tags, fingerprint, extra, contexts...).
    pub data: serde_json::Value,
}

/// Starts Bugsink (gunicorn, one worker, events digested as they arrive)
/// on 127.0.0.1 with a fresh database and one project under `dir`.
/// Returns the process, the project's DSN and the database path.
pub fn start_bugsink(dir: &Path) -> (Proc, String, PathBuf) {
    let b = start_bugsink_on(dir, free_port());
    (b.proc, b.dsn, b.db)
}

fn manage(venv: &Path, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(venv.join("bin/bugsink-manage"))
        .args(args)
        .current_dir(dir)
        .env("PYTHONPATH", dir)
        .env("DJANGO_SETTINGS_MODULE", "bugsink_conf")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bugsink-manage {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bugsink's installed version, from the venv's `bugsink-X.Y.Z.dist-info`.
fn bugsink_version(venv: &Path) -> String {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|py| std::fs::read_dir(py.path().join("site-packages")).ok())
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("bugsink-")?
                .strip_suffix(".dist-info")
                .map(str::to_string)
        })
        .next()
        .unwrap_or_else(|| "unknown".into())
}

/// A migrated empty database, made once per venv and Bugsink version
/// (migrations take ~12 s on two cores) and copied for every start.
fn bugsink_template(venv: &Path, conf: &str) -> PathBuf {
    let template = venv.join(format!("vitals-test-db-{}", bugsink_version(venv)));
    if template.join("db.sqlite3").exists() {
        return template;
    }
    let work = venv.join(format!("vitals-test-db.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("bugsink_conf.py"), conf).unwrap();
    manage(venv, &work, &["migrate", "--no-input"]);
    manage(
        venv,
        &work,
        &["migrate", "snappea", "--database=snappea", "--no-input"],
    );
    std::fs::remove_file(work.join("bugsink_conf.py")).unwrap();
    let _ = std::fs::remove_dir_all(work.join("__pycache__"));
    // Another test may have won the race; either copy is good.
    if std::fs::rename(&work, &template).is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    template
}

/// [`start_bugsink`] with everything about it, on a given port.
pub fn start_bugsink_on(dir: &Path, port: u16) -> Bugsink {
    let venv = bugsink_venv().unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let conf = format!(
        "from bugsink.settings.default import *  # noqa\n\
         SECRET_KEY = \"vitals-test-{port}-not-a-secret-0123456789abcdefghij\"\n\
         TIME_ZONE = 'UTC'\n\
         SNAPPEA = {{\"TASK_ALWAYS_EAGER\": True}}\n\
         EMAIL_BACKEND = \"bugsink.email_backends.QuietConsoleEmailBackend\"\n\
         BUGSINK = {{\n    \"PHONEHOME\": False,\n    \"BASE_URL\": \"http://127.0.0.1:{port}\",\n    \"SINGLE_USER\": True,\n    \"SINGLE_TEAM\": True,\n}}\n"
    );
    let template = bugsink_template(&venv, &conf);
    for f in ["db.sqlite3", "snappea.sqlite3"] {
        std::fs::copy(template.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("bugsink_conf.py"), conf).unwrap();
    let out = manage(
        &venv,
        dir,
        &[
            "shell",
            "-c",
            "from django.contrib.auth import get_user_model; from projects.models import Project; \
             from teams.models import Team; \
             get_user_model().objects.create_superuser('admin', 'admin@localhost', 'admin'); \
             print('DSN', Project.objects.create(name='vitals', team=Team.objects.create(name='t')).dsn)",
        ],
    );
    let dsn = out
        .lines()
        .find_map(|l| l.strip_prefix("DSN "))
        .unwrap_or_else(|| panic!("no DSN in {out}"))
        .trim()
        .to_string();
    let mut b = Bugsink {
        proc: gunicorn(&venv, dir, port),
        dsn,
        db: dir.join("db.sqlite3"),
        url: format!("http://127.0.0.1:{port}"),
        dir: dir.to_path_buf(),
        port,
    };
    b.wait_up();
    b
}

/// gunicorn forks its worker: the whole group goes when the Proc is killed.
fn gunicorn(venv: &Path, dir: &Path, port: u16) -> Proc {
    Proc::spawn_group(
        Command::new(venv.join("bin/gunicorn"))
            .args([
                &format!("--bind=127.0.0.1:{port}"),
                "--workers=1",
                "--access-logfile=-",
                "bugsink.wsgi",
            ])
            .current_dir(dir)
            .env("PYTHONPATH", dir)
            .env("DJANGO_SETTINGS_MODULE", "bugsink_conf"),
        &dir.join("bugsink.log"),
    )
}

impl Bugsink {
    fn wait_up(&mut self) {
        let url = self.url.clone();
        let up = wait_until(
            Duration::from_secs(60),
            || matches!(http("GET", &format!("{url}/"), None), Ok((s, _)) if s > 0),
        );
        assert!(up, "Bugsink did not start; log:\n{}", self.proc.log_text());
    }

    /// Kills the server (the database stays).
    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts the server again on the same port and database.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.proc = gunicorn(&bugsink_venv().unwrap(), &self.dir, self.port);
        self.wait_up();
    }
}

/// Every event Bugsink stored, in digest order.
pub fn bugsink_events(db: &Path) -> Vec<BugsinkEvent> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut st = conn
        .prepare(
            "SELECT event_id, issue_id, level, calculated_value, data FROM events_event
             ORDER BY project_digest_order",
        )
        .unwrap();
    st.query_map([], |r| {
        let data: String = r.get(4)?;
        Ok(BugsinkEvent {
            event_id: r.get::<_, String>(0)?.replace('-', ""),
            issue_id: r.get(1)?,
            level: r.get(2)?,
            title: r.get(3)?,
            data: serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
        })
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

// --------------------------------------------------------------------- Webhook

/// One request as the webhook receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    /// Names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

#[derive(Default)]
struct Shared {
    received: Vec<Received>,
    /// Status to answer with; 0 closes the connection without answering
    /// (after recording the request: an answer lost on the wire).
    status: u16,
}

/// A webhook receiver on 127.0.0.1 (plain HTTP or TLS) that records every
/// request and answers with a settable status (200 by default). Stops
/// listening when dropped.
pub struct WebhookReceiver {
    pub port: u16,
    https: bool,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WebhookReceiver {
    pub fn start() -> WebhookReceiver {
        WebhookReceiver::start_on(0)
    }

    /// On `port` (0: any free one).
    pub fn start_on(port: u16) -> WebhookReceiver {
        WebhookReceiver::spawn(port, None)
    }

    /// With TLS, presenting `cert`/`key` (PEM files).
    pub fn start_tls(port: u16, cert: &Path, key: &Path) -> WebhookReceiver {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        WebhookReceiver::spawn(port, Some(Arc::new(cfg)))
    }

    fn spawn(port: u16, tls: Option<Arc<rustls::ServerConfig>>) -> WebhookReceiver {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("webhook receiver cannot listen on {port}: {e}"));
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared {
            received: Vec::new(),
            status: 200,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let https = tls.is_some();
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (shared, tls) = (shared.clone(), tls.clone());
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        match tls {
                            Some(cfg) => {
                                let Ok(server) = rustls::ServerConnection::new(cfg) else {
                                    return;
                                };
                                let mut tls = rustls::StreamOwned::new(server, conn);
                                if serve(&mut tls, &shared) {
                                    tls.conn.send_close_notify();
                                    let _ = tls.flush();
                                }
                            }
                            None => {
                                let mut conn = conn;
                                serve(&mut conn, &shared);
                            }
                        }
                    });
                }
            })
        };
        WebhookReceiver {
            port,
            https,
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// `http(s)://127.0.0.1:PORT/hook`
    pub fn url(&self) -> String {
        format!(
            "{}://127.0.0.1:{}/hook",
            if self.https { "https" } else { "http" },
            self.port
        )
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.lock().unwrap().received.clone()
    }

    /// Answer from now on with `status` (0: close without answering).
    pub fn set_status(&self, status: u16) {
        self.shared.lock().unwrap().status = status;
    }

    /// Stops listening (the port is free again when this returns).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Reads one request, records it, answers; false if it did not answer.
fn serve<S: Read + Write>(stream: &mut S, shared: &Mutex<Shared>) -> bool {
    let Some(req) = read_request(stream) else {
        return false;
    };
    let status = {
        let mut s = shared.lock().unwrap();
        s.received.push(req);
        s.status
    };
    if status == 0 {
        return false;
    }
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = stream.flush();
    true
}

/// Reads one HTTP/1.1 request (with a `Content-Length` body, if any).
pub fn read_request<S: Read>(stream: &mut S) -> Option<Received> {
    let mut r = BufReader::new(&mut *stream);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if r.read_exact(&mut body).is_err() {
        return None;
    }
    Some(Received {
        method,
        path,
        headers,
        body,
    })
}
