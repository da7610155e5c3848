//! slurmrestd as the slurm source's way to SLURM, instead of `squeue` and
//! `sinfo` (`[sources.slurm] restd`).
//!
//! Two GETs per cycle, `/slurm/<restd_api_version>/jobs` and `.../nodes`,
//! over a unix socket (`unix:/run/slurmrestd/slurmrestd.socket`, where
//! slurmrestd's `rest_auth/local` knows the agent by its uid) or TCP
//! (`http://host:6820`, or `https://` with the system's roots or
//! `restd_ca_file`). With `restd_token_file` the file's token goes as
//! `X-SLURM-USER-TOKEN` (and `restd_user` as `X-SLURM-USER-NAME`): the
//! file is read for every request, so a rotated token is used as soon as
//! it is written, and its content is never logged or put in an error.
//! Their answers have `squeue --json` / `sinfo --json`'s shapes, so
//! [`super::parse`] reads them.
//!
//! Each request is a [`Task`] that a [`super::super::command::Runner`]
//! runs on a worker thread, as it runs commands: the whole exchange has
//! `command_timeout`, and a cycle waits for it no longer than for a
//! command. The client is hyper's HTTP/1.1 connection API (already in the
//! tree for tonic), one connection per request, no redirects or proxies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::sources::command::{Outcome, Task};

/// The API version Debian's 22.05 slurmrestd serves (and 23.02 still does).
pub const DEFAULT_API_VERSION: &str = "v0.0.38";

/// Most bytes of an answer: a larger one is an error, never cut short.
const BODY_LIMIT: usize = 64 << 20;

const TOKEN_HEADER: &str = "x-slurm-user-token";
const USER_HEADER: &str = "x-slurm-user-name";

/// Where slurmrestd listens.
#[derive(Clone)]
pub enum Addr {
    Unix(PathBuf),
    Tcp {
        /// Host as written (IPv6 in brackets), for `Host`.
        host: String,
        port: u16,
        /// Path before `/slurm/...` (a proxy's prefix), no trailing `/`.
        base: String,
        /// Some for `https://`.
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl std::fmt::Debug for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp {
                host,
                port,
                base,
                tls,
            } => {
                let scheme = if tls.is_some() { "https" } else { "http" };
                write!(f, "{scheme}://{host}:{port}{base}")
            }
        }
    }
}

impl Addr {
    /// Parses `restd`: `unix:/absolute/path`, `http://host[:port][/base]`
    /// or `https://...` (CA certificates from `ca`, else the system's).
    pub fn parse(url: &str, ca: Option<&Path>) -> Result<Addr, String> {
        if let Some(path) = url.strip_prefix("unix:") {
            let path = Path::new(path);
            if !path.is_absolute() {
                return Err(format!(
                    "{url:?}: the socket must be an absolute path, e.g. \"unix:/run/slurmrestd/slurmrestd.socket\""
                ));
            }
            if ca.is_some() {
                return Err("restd_ca_file is for https:// only".into());
            }
            return Ok(Addr::Unix(path.to_path_buf()));
        }
        let uri: hyper::Uri = url.parse().map_err(|e| {
            format!("{url:?} is not a URL ({e}): use unix:/path/to/socket, http://host:port or https://host:port")
        })?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "{url:?}: must start with unix:, http:// or https://"
                ));
            }
        };
        let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{url:?}: user info in the URL is not supported (use restd_token_file and restd_user)"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("{url:?}: a query is not supported"));
        }
        let host = authority.host().to_string();
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let base = uri.path().trim_end_matches('/').to_string();
        let tls = match (https, ca) {
            (true, Some(ca)) => Some(Arc::new(client_config(roots_from_file(ca)?)?)),
            (true, None) => Some(Arc::new(client_config(system_roots("restd_ca_file")?)?)),
            (false, Some(_)) => return Err("restd_ca_file is for https:// only".into()),
            (false, None) => None,
        };
        Ok(Addr::Tcp {
            host,
            port,
            base,
            tls,
        })
    }

    /// Plain TCP to another machine: a token sent this way can be read on
    /// the network.
    pub fn plaintext_off_host(&self) -> bool {
        match self {
            Addr::Tcp {
                host, tls: None, ..
            } => {
                let h = host.trim_start_matches('[').trim_end_matches(']');
                !(h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback()))
            }
            _ => false,
        }
    }
}

use vitals_common::http_tls::{client_config, roots_from_file, system_roots};

/// One of the two GETs, run by a `Runner` on its worker thread.
#[derive(Clone, Debug)]
pub struct Request {
    /// "slurmrestd jobs" or "slurmrestd nodes".
    pub label: &'static str,
    pub addr: Arc<Addr>,
    /// `/slurm/v0.0.38/jobs`, below the address's base.
    pub path: String,
    pub token_file: Option<PathBuf>,
    pub user: Option<String>,
}

impl Request {
    /// `what` ("jobs" or "nodes") of API `version`.
    pub fn new(
        label: &'static str,
        addr: Arc<Addr>,
        version: &str,
        what: &str,
        token_file: Option<PathBuf>,
        user: Option<String>,
    ) -> Request {
        Request {
            label,
            addr,
            path: format!("/slurm/{version}/{what}"),
            token_file,
            user,
        }
    }

    /// The headers that authenticate the request: the token read now from
    /// its file, marked sensitive. Errors name the file, never its content.
    fn auth_headers(&self) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
        let mut h = Vec::new();
        if let Some(file) = &self.token_file {
            h.push((HeaderName::from_static(TOKEN_HEADER), read_token(file)?));
        }
        if let Some(user) = &self.user {
            let v = HeaderValue::from_str(user)
                .map_err(|_| format!("restd_user {user:?} cannot be sent in a header"))?;
            h.push((HeaderName::from_static(USER_HEADER), v));
        }
        Ok(h)
    }

    /// (status, body) of the GET.
    async fn exchange(
        &self,
        headers: Vec<(HeaderName, HeaderValue)>,
    ) -> Result<(u16, Bytes), String> {
        let addr = &*self.addr;
        let (io, host, path): (Box<dyn Io>, String, String) = match addr {
            Addr::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(|e| {
                    format!(
                        "cannot connect to slurmrestd at {addr}: {e} (is slurmrestd running and listening there, and may the agent's user open the socket?)"
                    )
                })?;
                (Box::new(s), "localhost".into(), self.path.clone())
            }
            Addr::Tcp {
                host,
                port,
                base,
                tls,
            } => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                let tcp = tokio::net::TcpStream::connect((bare, *port))
                    .await
                    .map_err(|e| {
                        format!("cannot connect to slurmrestd at {addr}: {e} (is slurmrestd running and listening there?)")
                    })?;
                let _ = tcp.set_nodelay(true);
                let io: Box<dyn Io> = match tls {
                    Some(cfg) => {
                        let name = ServerName::try_from(bare.to_string())
                            .map_err(|e| format!("{addr}: bad server name: {e}"))?;
                        Box::new(
                            tokio_rustls::TlsConnector::from(cfg.clone())
                                .connect(name, tcp)
                                .await
                                .map_err(|e| format!("{addr}: TLS handshake: {e}"))?,
                        )
                    }
                    None => Box::new(tcp),
                };
                (io, format!("{host}:{port}"), format!("{base}{}", self.path))
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        // On this request's own runtime: dropped with it.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::get(path.as_str())
            .header(hyper::header::HOST, host)
            .header(hyper::header::ACCEPT, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("vitals-agent/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONNECTION, "close");
        for (k, mut v) in headers {
            v.set_sensitive(true);
            req = req.header(k, v);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("{addr}: cannot build the request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("{addr}{path}: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), BODY_LIMIT)
            .collect()
            .await
            .map_err(|e| {
                format!("{addr}{path}: reading the answer: {e} (the limit is {BODY_LIMIT} bytes)")
            })?
            .to_bytes();
        Ok((status, body))
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The token in `file`, as a header value. Errors say what is wrong with
/// the file, never what is in it.
pub fn read_token(file: &Path) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read restd_token_file {}: {e}", file.display()))?;
    let token = text.trim();
    // `scontrol token` prints `SLURM_JWT=<token>`; the file may hold that.
    let token = token.strip_prefix("SLURM_JWT=").unwrap_or(token);
    if token.is_empty() {
        return Err(format!(
            "restd_token_file {} is empty: write the token into it (e.g. from `scontrol token`)",
            file.display()
        ));
    }
    HeaderValue::from_str(token).map_err(|_| {
        format!(
            "restd_token_file {}: the token has characters a header cannot carry (one line of printable ASCII expected)",
            file.display()
        )
    })
}

/// The body of a 2xx answer; any other answer as an error that says what
/// slurmrestd said (SLURM's first error from a JSON body, or the first
/// line of a text one) and, for 401/403, what to check.
pub fn check_answer(status: u16, body: &[u8]) -> Result<String, String> {
    if (200..300).contains(&status) {
        return String::from_utf8(body.to_vec())
            .map_err(|e| format!("the answer is not UTF-8: {e}"));
    }
    let text = String::from_utf8_lossy(body);
    let said = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|doc| {
            let first = doc.get("errors")?.as_array()?.first()?.clone();
            let what = first
                .get("error")
                .or_else(|| first.get("description"))
                .and_then(|v| v.as_str())?
                .to_string();
            Some(format!("SLURM says: {what}"))
        })
        .unwrap_or_else(|| {
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            line.trim().chars().take(200).collect()
        });
    let hint = match status {
        401 | 403 => {
            " (refused: check restd_token_file and restd_user, or, on a unix socket, that slurmrestd accepts the agent's user)"
        }
        500 => " (an invalid or expired token is answered this way too)",
        _ => "",
    };
    Err(format!("slurmrestd answered HTTP {status}: {said}{hint}"))
}

impl Task for Request {
    fn label(&self) -> &'static str {
        self.label
    }

    fn run(&self, _first: usize, timeout: Duration) -> Outcome {
        let start = Instant::now();
        let failed = |error: String| Outcome::Failed {
            error,
            duration: start.elapsed(),
        };
        let headers = match self.auth_headers() {
            Ok(h) => h,
            Err(e) => return failed(e),
        };
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return failed(format!("cannot start the request's runtime: {e}")),
        };
        let left = timeout.saturating_sub(start.elapsed());
        let got = rt.block_on(async { tokio::time::timeout(left, self.exchange(headers)).await });
        // A name lookup still running on the blocking pool is left behind
        // rather than waited for: the timeout is the limit.
        rt.shutdown_background();
        match got {
            Err(_) => Outcome::TimedOut {
                duration: start.elapsed(),
            },
            Ok(Err(e)) => failed(e),
            Ok(Ok((status, body))) => match check_answer(status, &body) {
                Ok(text) => Outcome::Exited {
                    variant: 0,
                    code: Some(0),
                    stdout: text,
                    stderr: String::new(),
                    duration: start.elapsed(),
                },
                Err(e) => failed(format!("GET {} at {}: {e}", self.path, self.addr)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;

    #[test]
    fn addresses_parse_or_say_what_is_wrong() {
        let a = Addr::parse("unix:/run/slurmrestd/slurmrestd.socket", None).unwrap();
        assert!(matches!(&a, Addr::Unix(p) if p == Path::new("/run/slurmrestd/slurmrestd.socket")));
        assert_eq!(a.to_string(), "unix:/run/slurmrestd/slurmrestd.socket");
        let a = Addr::parse("http://head-01:6820/", None).unwrap();
        assert_eq!(a.to_string(), "http://head-01:6820");
        assert!(a.plaintext_off_host());
        let a = Addr::parse("http://127.0.0.1:6820/proxy/slurm/", None).unwrap();
        assert!(
            matches!(&a, Addr::Tcp { base, port: 6820, tls: None, .. } if base == "/proxy/slurm")
        );
        assert!(!a.plaintext_off_host());
        let e = Addr::parse("unix:run/x.socket", None).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
        let e = Addr::parse("ftp://host", None).unwrap_err();
        assert!(e.contains("unix:, http:// or https://"), "{e}");
        let e = Addr::parse("http://user:pw@host:6820", None).unwrap_err();
        assert!(e.contains("restd_token_file"), "{e}");
        let e = Addr::parse("http://host:6820", Some(Path::new("/etc/ca.pem"))).unwrap_err();
        assert!(e.contains("https:// only"), "{e}");
        let e =
            Addr::parse("https://host:6820", Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn the_token_is_read_trimmed_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("jwt");
        std::fs::write(&f, "SLURM_JWT=abc.def.ghi\n").unwrap();
        assert_eq!(read_token(&f).unwrap(), "abc.def.ghi");
        std::fs::write(&f, "  abc.def\n").unwrap();
        assert_eq!(read_token(&f).unwrap(), "abc.def");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_token(&f).unwrap_err().contains("is empty"));
        std::fs::write(&f, "secret-part\nsecond line").unwrap();
        let e = read_token(&f).unwrap_err();
        assert!(e.contains("cannot carry") && !e.contains("secret"), "{e}");
        let e = read_token(&dir.path().join("missing")).unwrap_err();
        assert!(e.contains("cannot read restd_token_file"), "{e}");
    }

    #[test]
    fn answers_other_than_2xx_say_what_slurmrestd_said() {
        assert_eq!(
            check_answer(200, b"{\"jobs\":[]}").unwrap(),
            "{\"jobs\":[]}"
        );
        let e = check_answer(401, b"Authentication failure").unwrap_err();
        assert!(e.contains("HTTP 401: Authentication failure"), "{e}");
        assert!(e.contains("restd_token_file"), "{e}");
        let body = br#"{"meta":{},"errors":[{"error":"Unspecified error","errno":-1}],"nodes":[]}"#;
        let e = check_answer(500, body).unwrap_err();
        assert!(e.contains("HTTP 500: SLURM says: Unspecified error"), "{e}");
        let e = check_answer(404, b"").unwrap_err();
        assert_eq!(e, "slurmrestd answered HTTP 404: ");
        assert!(
            check_answer(200, b"\xff\xfe")
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    /// A one-connection server on a unix socket: reads one request's head,
    /// sends it back over `seen`, answers `answer`.
    fn serve(answer: &'static [u8]) -> (tempfile::TempDir, PathBuf, mpsc::Receiver<String>) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("restd.socket");
        let listener = UnixListener::bind(&sock).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            tx.send(head).unwrap();
            let mut s = s;
            s.write_all(answer).unwrap();
        });
        (dir, sock, rx)
    }

    fn request(sock: &Path, token: Option<PathBuf>, user: Option<&str>) -> Request {
        Request::new(
            "slurmrestd jobs",
            Arc::new(Addr::Unix(sock.to_path_buf())),
            DEFAULT_API_VERSION,
            "jobs",
            token,
            user.map(str::to_string),
        )
    }

    #[test]
    fn a_chunked_answer_over_a_unix_socket_is_read_whole_with_the_token_sent() {
        let (dir, sock, seen) = serve(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
              9\r\n{\"jobs\":[\r\n3\r\n]}\n\r\n0\r\n\r\n",
        );
        let token = dir.path().join("jwt");
        std::fs::write(&token, "tok.en.value\n").unwrap();
        let out = request(&sock, Some(token), Some("root")).run(0, Duration::from_secs(5));
        assert_eq!(out.success(), Some((0, "{\"jobs\":[]}\n")), "{out:?}");
        let head = seen.recv().unwrap().to_ascii_lowercase();
        assert!(
            head.starts_with("get /slurm/v0.0.38/jobs http/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("x-slurm-user-token: tok.en.value\r\n"),
            "{head}"
        );
        assert!(head.contains("x-slurm-user-name: root\r\n"), "{head}");
        assert!(head.contains("host: localhost\r\n"), "{head}");
    }

    #[test]
    fn a_refusal_is_a_failure_that_does_not_show_the_token() {
        let (dir, sock, _seen) = serve(
            b"HTTP/1.1 401 UNAUTHORIZED\r\nConnection: Close\r\nContent-Length: 22\r\n\r\nAuthentication failure",
        );
        let token = dir.path().join("jwt");
        std::fs::write(&token, "very-secret-token").unwrap();
        let out = request(&sock, Some(token), None).run(0, Duration::from_secs(5));
        let why = out.failure().unwrap();
        assert!(matches!(out, Outcome::Failed { .. }), "{out:?}");
        assert!(why.contains("GET /slurm/v0.0.38/jobs at unix:"), "{why}");
        assert!(why.contains("slurmrestd answered HTTP 401"), "{why}");
        assert!(!why.contains("very-secret"), "{why}");
    }

    #[test]
    fn a_missing_socket_or_token_file_fails_and_a_silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("none.socket");
        let out = request(&sock, None, None).run(0, Duration::from_secs(5));
        let why = out.failure().unwrap();
        assert!(
            why.contains("cannot connect to slurmrestd at unix:") && why.contains("none.socket"),
            "{why}"
        );

        let missing = dir.path().join("no-token");
        let out = request(&sock, Some(missing), None).run(0, Duration::from_secs(5));
        assert!(
            out.failure()
                .unwrap()
                .contains("cannot read restd_token_file")
        );

        // Accepts, never answers.
        let listener = UnixListener::bind(&sock).unwrap();
        let t = Instant::now();
        let out = request(&sock, None, None).run(0, Duration::from_millis(300));
        assert!(matches!(out, Outcome::TimedOut { .. }), "{out:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
        drop(listener);
    }

    #[test]
    fn an_answer_past_the_limit_is_an_error_not_a_cut() {
        // Content-Length beyond the limit: refused before reading it.
        let (_dir, sock, _seen) = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{");
        let out = request(&sock, None, None).run(0, Duration::from_secs(5));
        let why = out.failure().unwrap();
        assert!(why.contains("reading the answer"), "{why}");
    }

    /// An https server on 127.0.0.1 with a certificate for `localhost`
    /// (self-signed, in `dir/ca.pem`) that answers one request.
    fn serve_tls(dir: &Path) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.cert.pem()).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                // The first connection may be a refused handshake.
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        continue;
                    };
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let n = tls.read(&mut buf).await.unwrap();
                        if n == 0 {
                            break;
                        }
                        head.extend_from_slice(&buf[..n]);
                    }
                    let body = if head.starts_with(b"GET /proxy/slurm/v0.0.38/nodes HTTP/1.1\r\n") {
                        "{\"nodes\":[]}"
                    } else {
                        "wrong path"
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    tls.write_all(answer.as_bytes()).await.unwrap();
                    tls.shutdown().await.ok();
                    return;
                }
            });
        });
        port
    }

    #[test]
    fn https_checks_the_server_against_the_configured_ca() {
        let dir = tempfile::tempdir().unwrap();
        let port = serve_tls(dir.path());
        // Behind a proxy's prefix.
        let url = format!("https://localhost:{port}/proxy");
        let get = |addr: Addr| {
            Request::new(
                "slurmrestd nodes",
                Arc::new(addr),
                DEFAULT_API_VERSION,
                "nodes",
                None,
                None,
            )
            .run(0, Duration::from_secs(5))
        };
        // The system's roots (where the machine has any) do not know this
        // server: refused.
        if let Ok(addr) = Addr::parse(&url, None) {
            let why = get(addr).failure().unwrap();
            assert!(why.contains("TLS handshake"), "{why}");
        }
        let out = get(Addr::parse(&url, Some(&dir.path().join("ca.pem"))).unwrap());
        assert_eq!(out.success(), Some((0, "{\"nodes\":[]}")), "{out:?}");
    }
}
