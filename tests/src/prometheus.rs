//! Debian's `prometheus` on 127.0.0.1 as the reference for the collector's
//! Prometheus-compatible HTTP API, fed through its remote-write receiver
//! (protobuf + snappy, written here), and a small HTTP/1.1 client (TLS
//! with a client certificate, or plaintext) for both.
//!
//! Optional on a developer's machine, required where CI says so
//! (`VITALS_TEST_PROMETHEUS=1`, set by `.ci/run`): see
//! [`crate::receivers::required`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::{Proc, free_port, wait_until};

/// Debian's `prometheus`, if installed.
pub fn prometheus_binary() -> Result<PathBuf, String> {
    let p = PathBuf::from("/usr/bin/prometheus");
    if p.exists() {
        Ok(p)
    } else {
        Err("no Prometheus (apt-get install prometheus)".into())
    }
}

/// `promtool` (in Debian's `prometheus` package), if installed.
pub fn promtool_binary() -> Result<PathBuf, String> {
    let p = PathBuf::from("/usr/bin/promtool");
    if p.exists() {
        Ok(p)
    } else {
        Err("no promtool (apt-get install prometheus)".into())
    }
}

/// Starts Prometheus on 127.0.0.1 with the remote-write receiver on and
/// nothing to scrape; its TSDB under `dir`. Returns the process and its
/// `host:port`.
pub fn start_prometheus(dir: &Path) -> (Proc, String) {
    start_prometheus_on(dir, free_port())
}

/// [`start_prometheus`] on `port`: run it again on the same `dir` and
/// port after stopping it, and it comes back with what it had stored.
pub fn start_prometheus_on(dir: &Path, port: u16) -> (Proc, String) {
    spawn_prometheus(dir, port, None)
}

/// Prometheus' listener behind mutual TLS (its `--web.config.file`):
/// its certificate and key, and the CA a client's certificate must come
/// from (required).
pub struct PrometheusTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
    /// How the readiness check connects: a client with a certificate, and
    /// the name Prometheus' certificate has.
    pub client: &'a Arc<rustls::ClientConfig>,
    pub server_name: &'a str,
}

/// [`start_prometheus`] with mutual TLS on its listener.
pub fn start_prometheus_tls(dir: &Path, tls: &PrometheusTls<'_>) -> (Proc, String) {
    spawn_prometheus(dir, free_port(), Some(tls))
}

fn spawn_prometheus(dir: &Path, port: u16, tls: Option<&PrometheusTls<'_>>) -> (Proc, String) {
    let bin = prometheus_binary().unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(&cfg, "global:\n  scrape_interval: 1m\n").unwrap();
    let mut args = vec![
        format!("--config.file={}", cfg.display()),
        format!("--storage.tsdb.path={}", dir.join("data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
        "--web.enable-remote-write-receiver".to_string(),
        "--log.level=warn".to_string(),
    ];
    if let Some(t) = tls {
        let web = dir.join("web.yml");
        std::fs::write(
            &web,
            format!(
                "tls_server_config:\n  cert_file: {:?}\n  key_file: {:?}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {:?}\n",
                t.cert, t.key, t.client_ca
            ),
        )
        .unwrap();
        args.push(format!("--web.config.file={}", web.display()));
    }
    let p = Proc::spawn_cmd(Command::new(bin).args(args), &dir.join("prometheus.log"));
    let addr = format!("127.0.0.1:{port}");
    let up = wait_until(Duration::from_secs(60), || {
        let r = match tls {
            None => request(&addr, None, "GET", "/-/ready", None),
            Some(t) => request_as(
                &addr,
                Some(t.client),
                t.server_name,
                "GET",
                "/-/ready",
                None,
            ),
        };
        matches!(r, Ok((200, _)))
    });
    assert!(up, "Prometheus did not start; log:\n{}", p.log_text());
    (p, addr)
}

// ------------------------------------------------------ remote write 1.0 --

#[derive(Clone, PartialEq, prost::Message)]
struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    labels: Vec<PbLabel>,
    #[prost(message, repeated, tag = "2")]
    samples: Vec<PbSample>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbLabel {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PbSample {
    #[prost(double, tag = "1")]
    value: f64,
    #[prost(int64, tag = "2")]
    timestamp: i64,
}

/// Snappy's block format with literals only: valid input for any snappy
/// decoder, no compression (none is needed on loopback).
pub fn snappy_literal(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 60_000 * 5 + 10);
    let mut n = data.len() as u64;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    for chunk in data.chunks(65_536) {
        let len = chunk.len() - 1;
        if len < 60 {
            out.push((len as u8) << 2);
        } else if len < 256 {
            out.push(60 << 2);
            out.push(len as u8);
        } else {
            out.push(61 << 2);
            out.extend_from_slice(&(len as u16).to_le_bytes());
        }
        out.extend_from_slice(chunk);
    }
    out
}

/// One series: metric name, labels (without `__name__`), samples in
/// time order.
pub type RwSeries<'a> = (&'a str, &'a [(String, String)], &'a [(i64, f64)]);

/// Sends `series` to Prometheus' remote-write receiver in one request
/// (one append: a fresh TSDB takes old samples in it, down to an hour
/// before the first sample it sees, so the oldest series go first).
pub fn remote_write(addr: &str, series: &[RwSeries<'_>]) {
    use prost::Message;
    let mut series = series.to_vec();
    series.sort_by_key(|(_, _, samples)| samples.first().map(|s| s.0));
    let req = WriteRequest {
        timeseries: series
            .iter()
            .map(|(name, labels, samples)| {
                let mut l: Vec<PbLabel> = labels
                    .iter()
                    .map(|(k, v)| PbLabel {
                        name: k.clone(),
                        value: v.clone(),
                    })
                    .collect();
                l.push(PbLabel {
                    name: "__name__".into(),
                    value: name.to_string(),
                });
                l.sort_by(|a, b| a.name.cmp(&b.name));
                TimeSeries {
                    labels: l,
                    samples: samples
                        .iter()
                        .map(|&(timestamp, value)| PbSample { value, timestamp })
                        .collect(),
                }
            })
            .collect(),
    };
    let body = snappy_literal(&req.encode_to_vec());
    let (status, text) = raw_request(
        addr,
        None,
        "POST",
        "/api/v1/write",
        &[
            ("Content-Type", "application/x-protobuf"),
            ("Content-Encoding", "snappy"),
            ("X-Prometheus-Remote-Write-Version", "0.1.0"),
        ],
        &body,
    )
    .unwrap();
    assert!(
        (200..300).contains(&status),
        "remote write refused: {status} {text}"
    );
}

// ------------------------------------------------------------ HTTP client --

/// A TLS client config trusting `ca`, presenting `cert`/`key` if given.
pub fn tls_client(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut cfg = match cert {
        Some((c, k)) => b
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(c)
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_file(k).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// A request as Grafana's Prometheus data source sends it: a form body
/// (`Some(form)`, POST) or none (GET). Returns (status, body).
pub fn request(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    form: Option<&str>,
) -> std::io::Result<(u16, String)> {
    request_as(addr, tls, "localhost", method, path, form)
}

/// [`request`], expecting the server's certificate to name `server_name`.
pub fn request_as(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server_name: &str,
    method: &str,
    path: &str,
    form: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let headers: &[(&str, &str)] = if form.is_some() {
        &[("Content-Type", "application/x-www-form-urlencoded")]
    } else {
        &[]
    };
    raw_request_as(
        addr,
        tls,
        server_name,
        method,
        path,
        headers,
        form.unwrap_or("").as_bytes(),
    )
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
pub fn raw_request(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    raw_request_as(addr, tls, "localhost", method, path, headers, body)
}

fn raw_request_as(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    server_name: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut raw = Vec::new();
    match tls {
        None => {
            let mut s = tcp;
            s.write_all(head.as_bytes())?;
            s.write_all(body)?;
            s.read_to_end(&mut raw)?;
        }
        Some(cfg) => {
            let conn = rustls::ClientConnection::new(
                cfg.clone(),
                rustls::pki_types::ServerName::try_from(server_name.to_string())
                    .map_err(std::io::Error::other)?,
            )
            .map_err(std::io::Error::other)?;
            let mut s = rustls::StreamOwned::new(conn, tcp);
            s.write_all(head.as_bytes())?;
            s.write_all(body)?;
            s.flush()?;
            match s.read_to_end(&mut raw) {
                Ok(_) => {}
                // A server that closes without close_notify after a full answer.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
                Err(e) => return Err(e),
            }
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head:?}")))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| std::io::Error::other("bad chunk"))?;
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(std::io::Error::other)?;
        if n == 0 {
            break;
        }
        out.push_str(
            after
                .get(..n)
                .ok_or_else(|| std::io::Error::other("short chunk"))?,
        );
        rest = after.get(n + 2..).unwrap_or("");
    }
    Ok((status, out))
}

/// `application/x-www-form-urlencoded` for `pairs`.
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", escape(k), escape(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
