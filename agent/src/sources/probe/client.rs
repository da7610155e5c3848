//! One probe request: resolve, connect, TLS, send, read the answer, all
//! under one timeout, each failure named by the step it happened in.
//!
//! Built on hyper's connection API (one request per connection, so every
//! probe pays the connect and handshake a new client pays) over rustls.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where requests go: an `http://` or `https://` URL, parsed once.
#[derive(Clone)]
pub struct Target {
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.authority)
    }
}

impl Target {
    /// Parses `url`; `ca`: a PEM file of CA certificates for https
    /// (default: the system's store).
    pub fn parse(url: &str, ca: Option<&Path>) -> Result<Target, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{:?} is not a URL: {e}", redact(url)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "{:?}: the URL must start with http:// or https://",
                    redact(url)
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{:?}: no host", redact(url)))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "{:?}: user info in the URL is not supported (use `headers` or `secret_file`)",
                redact(url)
            ));
        }
        let host = authority.host().to_string();
        if host.is_empty() {
            return Err(format!("{:?}: no host", redact(url)));
        }
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(match ca {
                Some(path) => Arc::new(client_config(roots_from_file(path)?)?),
                None => system_config()?,
            })
        } else {
            None
        };
        Ok(Target {
            host,
            port,
            authority: authority.as_str().to_string(),
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "/".into()),
            tls,
        })
    }
}

/// The URL without its query string (which may carry a key: `?code=`).
pub fn redact(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

use vitals_common::http_tls::{client_config, roots_from_file, system_roots};

/// The system's CA store, loaded once.
fn system_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| client_config(system_roots("ca_file")?).map(Arc::new))
        .clone()
}

/// The step a request failed in: the `kind` label of
/// `vitals_probe_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Failure {
    /// The host name did not resolve.
    Dns,
    /// TCP connect failed (refused, unreachable, reset).
    Connect,
    /// The TLS handshake failed (certificate, protocol).
    Tls,
    /// No whole answer within the timeout.
    Timeout,
    /// The server broke HTTP (closed mid-answer, bad framing).
    Protocol,
    /// The answer was larger than `max_response_bytes`.
    TooLarge,
    /// The secret could not be read (file missing, variable unset).
    Secret,
}

impl Failure {
    pub const ALL: [Failure; 7] = [
        Failure::Dns,
        Failure::Connect,
        Failure::Tls,
        Failure::Timeout,
        Failure::Protocol,
        Failure::TooLarge,
        Failure::Secret,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Dns => "dns",
            Failure::Connect => "connect",
            Failure::Tls => "tls",
            Failure::Timeout => "timeout",
            Failure::Protocol => "protocol",
            Failure::TooLarge => "too_large",
            Failure::Secret => "secret",
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The body (whole: an answer over the limit is a failure).
    pub body: Bytes,
}

/// How one request went and how long it took (until the whole answer
/// was read, or until it failed).
#[derive(Debug)]
pub struct Outcome {
    pub elapsed: Duration,
    pub result: Result<Answer, (Failure, String)>,
}

/// What to send.
pub struct Request<'a> {
    pub method: &'a hyper::Method,
    pub headers: &'a [(hyper::header::HeaderName, hyper::header::HeaderValue)],
    pub body: Bytes,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Aborts the connection task when the exchange ends (or times out).
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `req` to `target`; the whole exchange within `timeout`.
pub async fn send(
    target: &Target,
    req: Request<'_>,
    timeout: Duration,
    max_bytes: usize,
) -> Outcome {
    let began = Instant::now();
    let result = match tokio::time::timeout(timeout, exchange(target, req, max_bytes)).await {
        Ok(r) => r,
        Err(_) => Err((
            Failure::Timeout,
            format!("no whole answer within {timeout:?}"),
        )),
    };
    Outcome {
        elapsed: began.elapsed(),
        result,
    }
}

async fn exchange(
    target: &Target,
    req: Request<'_>,
    max_bytes: usize,
) -> Result<Answer, (Failure, String)> {
    let host = target.host.trim_start_matches('[').trim_end_matches(']');
    let addr = tokio::net::lookup_host((host, target.port))
        .await
        .map_err(|e| (Failure::Dns, format!("cannot resolve {host}: {e}")))?
        .next()
        .ok_or_else(|| (Failure::Dns, format!("{host} has no address")))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| (Failure::Connect, format!("cannot connect to {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match &target.tls {
        Some(cfg) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| (Failure::Tls, format!("bad server name {host:?}: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| (Failure::Tls, format!("TLS handshake with {host}: {e}")))?;
            Box::new(tls)
        }
        None => Box::new(tcp),
    };
    let protocol = |e: hyper::Error| (Failure::Protocol, format!("{}: {e}", target.authority));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(protocol)?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut builder = hyper::Request::builder()
        .method(req.method.clone())
        .uri(target.path_and_query.as_str())
        .header(hyper::header::HOST, target.authority.as_str())
        .header(
            hyper::header::USER_AGENT,
            concat!("vitals-probe/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close");
    for (k, v) in req.headers {
        builder = builder.header(k, v);
    }
    let request = builder
        .body(Full::new(req.body))
        .map_err(|e| (Failure::Protocol, format!("cannot build the request: {e}")))?;
    let resp = sender.send_request(request).await.map_err(protocol)?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(protocol)?;
        if let Ok(data) = frame.into_data() {
            if got.len() + data.len() > max_bytes {
                return Err((
                    Failure::TooLarge,
                    format!("the answer is larger than {max_bytes} bytes"),
                ));
            }
            got.extend_from_slice(&data);
        }
    }
    Ok(Answer {
        status,
        body: Bytes::from(got),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:8080/score?x=1", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.1", 8080));
        assert_eq!(t.path_and_query, "/score?x=1");
        assert!(t.tls.is_none());
        let t = Target::parse("http://[::1]/", None).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("[::1]", 80));
        for bad in ["ftp://x/", "/p", "http://u:p@h/", "no url"] {
            assert!(Target::parse(bad, None).is_err(), "{bad}");
        }
        let e = Target::parse(
            "https://h/?code=SECRET",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let e = Target::parse("gopher://h/?code=SECRET", None).unwrap_err();
        assert!(!e.contains("SECRET"), "{e}");
        assert_eq!(redact("https://h/p?code=k#f"), "https://h/p");
    }
}
