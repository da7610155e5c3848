//! A small HTTP/1.1 client for notifiers: one POST per connection, plain
//! TCP or rustls, the whole exchange under one timeout. Built on hyper's
//! connection API (already in the tree for tonic) rather than a full
//! client library: no redirects, no proxies, no pooling — alert volumes
//! do not need them, and a redirect is more often a wrong URL than intent.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use super::DeliveryError;

/// Where requests go: a parsed `http://` or `https://` URL.
#[derive(Clone)]
pub(crate) struct Endpoint {
    https: bool,
    /// Host as written (IPv6 in brackets), for the URL and `Host`.
    host: String,
    port: u16,
    path_and_query: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The name the server's certificate must have (default: the host).
    server_name: Option<String>,
}

/// TLS settings of an https endpoint beyond the system's roots.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientTls<'a> {
    /// PEM file of CA certificates (default: the system's store).
    pub ca: Option<&'a Path>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub identity: Option<(&'a Path, &'a Path)>,
    /// The name the server's certificate must have (default: the URL's host).
    pub server_name: Option<&'a str>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.origin())
    }
}

/// A URL or CA file that cannot be used; says which.
#[derive(Debug)]
pub(crate) enum EndpointError {
    Url(String),
    Ca(String),
    /// The client certificate or key.
    Identity(String),
    ServerName(String),
}

impl EndpointError {
    /// (key below the receiver, message): `webhook.url`, `sentry.ca`, ...
    pub(crate) fn keyed(self, table: &str, url_key: &str) -> (String, String) {
        match self {
            EndpointError::Url(m) => (format!("{table}.{url_key}"), m),
            EndpointError::Ca(m) => (format!("{table}.ca"), m),
            EndpointError::Identity(m) => (format!("{table}.cert"), m),
            EndpointError::ServerName(m) => (format!("{table}.server_name"), m),
        }
    }
}

/// (https, host, port, path and query) of an http(s) URL.
fn split_url(url: &str) -> Result<(bool, String, u16, String), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "{url:?}: the URL must start with http:// or https://"
            ));
        }
    };
    let authority = uri.authority().ok_or_else(|| format!("{url:?}: no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!("{url:?}: user info in the URL is not supported"));
    }
    let host = authority.host().to_string();
    if host.is_empty() {
        return Err(format!("{url:?}: no host"));
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path_and_query = uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/".into());
    Ok((https, host, port, path_and_query))
}

impl Endpoint {
    /// Parses `url` (no user info: callers strip it first). `ca`: PEM file
    /// of CA certificates for https; default the system's store.
    pub(crate) fn parse(url: &str, ca: Option<&Path>) -> Result<Endpoint, EndpointError> {
        Endpoint::parse_tls(
            url,
            &ClientTls {
                ca,
                ..Default::default()
            },
        )
    }

    /// [`Endpoint::parse`] with a client certificate and a server name
    /// (https only: the caller refuses them for http).
    pub(crate) fn parse_tls(url: &str, t: &ClientTls<'_>) -> Result<Endpoint, EndpointError> {
        let (https, host, port, path_and_query) = split_url(url).map_err(EndpointError::Url)?;
        let tls = if !https {
            None
        } else if t.ca.is_none() && t.identity.is_none() {
            Some(system_config().map_err(EndpointError::Ca)?)
        } else {
            let roots = match t.ca {
                Some(path) => roots_from_file(path).map_err(EndpointError::Ca)?,
                None => system_roots("ca_file").map_err(EndpointError::Ca)?,
            };
            let cfg = match t.identity {
                Some((cert, key)) => client_config_with_identity(roots, cert, key)
                    .map_err(EndpointError::Identity)?,
                None => client_config(roots).map_err(EndpointError::Ca)?,
            };
            Some(Arc::new(cfg))
        };
        if let Some(name) = t.server_name {
            ServerName::try_from(name.to_string())
                .map_err(|e| EndpointError::ServerName(format!("{name:?}: {e}")))?;
        }
        Ok(Endpoint {
            https,
            host,
            port,
            path_and_query,
            tls,
            server_name: t.server_name.map(str::to_string),
        })
    }

    /// The same server, another path (`/api/v2/alerts` below a base URL).
    pub(crate) fn with_path(&self, path: &str) -> Endpoint {
        Endpoint {
            path_and_query: path.to_string(),
            ..self.clone()
        }
    }

    pub(crate) fn path(&self) -> &str {
        self.path_and_query
            .split('?')
            .next()
            .unwrap_or(&self.path_and_query)
    }

    pub(crate) fn has_query(&self) -> bool {
        self.path_and_query.contains('?')
    }

    pub(crate) fn is_https(&self) -> bool {
        self.https
    }

    pub(crate) fn is_loopback(&self) -> bool {
        let h = self.host.trim_start_matches('[').trim_end_matches(']');
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    fn authority(&self) -> String {
        let default = if self.https { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// `scheme://host[:port]`.
    pub(crate) fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.https { "https" } else { "http" },
            self.authority()
        )
    }

    pub(crate) fn url(&self) -> String {
        format!("{}{}", self.origin(), self.path_and_query)
    }
}

use vitals_common::http_tls::{client_config, roots_from_file, system_roots};

fn client_builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>, String> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots))
}

/// A client config presenting the certificate chain in `cert` with the
/// key in `key` (PEM files). Errors name the files, never their contents.
fn client_config_with_identity(
    roots: rustls::RootCertStore,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in it", cert.display()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let mut c = client_builder(roots)?
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| {
            format!(
                "{} and {} do not make a client identity: {e}",
                cert.display(),
                key.display()
            )
        })?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// The system's CA store, loaded once.
fn system_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| client_config(system_roots("ca")?).map(Arc::new))
        .clone()
}

/// What came back.
#[derive(Debug)]
pub(crate) struct Response {
    pub status: u16,
    /// At most the first 64 KiB, lossy UTF-8.
    pub body: String,
    pub retry_after: Option<Duration>,
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

const BODY_LIMIT: usize = 64 << 10;

/// POSTs `body`; the whole exchange within `timeout`. Connection
/// failures and timeouts are retryable errors; any HTTP answer is a
/// `Response` (see [`check`]).
pub(crate) async fn post(
    ep: &Endpoint,
    content_type: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Response, DeliveryError> {
    match tokio::time::timeout(timeout, exchange(ep, content_type, headers, body)).await {
        Ok(r) => r,
        Err(_) => Err(DeliveryError::retry(format!(
            "{}: no answer within {timeout:?}",
            ep.origin()
        ))),
    }
}

async fn exchange(
    ep: &Endpoint,
    content_type: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<Response, DeliveryError> {
    let origin = ep.origin();
    let host = ep.host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((host, ep.port))
        .await
        .map_err(|e| DeliveryError::retry(format!("{origin}: cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match &ep.tls {
        Some(cfg) => {
            let name =
                ServerName::try_from(ep.server_name.clone().unwrap_or_else(|| host.to_string()))
                    .map_err(|e| DeliveryError::fatal(format!("{origin}: bad server name: {e}")))?;
            let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| DeliveryError::retry(format!("{origin}: TLS handshake: {e}")))?;
            Box::new(tls)
        }
        None => Box::new(tcp),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| DeliveryError::retry(format!("{origin}: {e}")))?;
    let _conn = AbortOnDrop(tokio::spawn(async move {
        let _ = conn.await;
    }));
    let mut req = hyper::Request::post(ep.path_and_query.as_str())
        .header(hyper::header::HOST, ep.authority())
        .header(hyper::header::CONTENT_TYPE, content_type)
        .header(
            hyper::header::USER_AGENT,
            concat!("vitals/", env!("CARGO_PKG_VERSION")),
        )
        .header(hyper::header::CONNECTION, "close");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| DeliveryError::fatal(format!("{origin}: cannot build the request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| DeliveryError::retry(format!("{origin}: {e}")))?;
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(hyper::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_retry_after);
    // The status decides; a body that fails to arrive or is too long only
    // shortens the error text.
    let body = match Limited::new(resp.into_body(), BODY_LIMIT).collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => String::new(),
    };
    Ok(Response {
        status,
        body,
        retry_after,
    })
}

/// `Retry-After` as seconds (the HTTP-date form is rare for these
/// receivers and is ignored: backoff applies).
fn parse_retry_after(v: &str) -> Option<Duration> {
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// 2xx is success. 408, 429, 5xx and 3xx (no redirects are followed: a
/// wrong URL, which a config fix and restart can still deliver to) are
/// retryable; any other status is the receiver refusing this request for good.
pub(crate) fn check(ep: &Endpoint, r: Response) -> Result<Response, DeliveryError> {
    if (200..300).contains(&r.status) {
        return Ok(r);
    }
    let text: String = r.body.trim().chars().take(300).collect();
    let message = format!(
        "{} {} answered {}{}{}",
        ep.origin(),
        ep.path(),
        r.status,
        if text.is_empty() { "" } else { ": " },
        text
    );
    let retryable = matches!(r.status, 300..=399 | 408 | 429 | 500..=599);
    Err(DeliveryError {
        retryable,
        message,
        retry_after: r.retry_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_urls() {
        let e = Endpoint::parse("http://127.0.0.1:9093", None).unwrap();
        assert_eq!(e.url(), "http://127.0.0.1:9093/");
        assert!(e.is_loopback() && !e.is_https());
        let e = Endpoint::parse("http://[::1]:80/a?b=c", None).unwrap();
        assert_eq!(e.origin(), "http://[::1]");
        assert_eq!(e.path(), "/a");
        assert!(e.is_loopback());
        let e = Endpoint::parse("http://hooks.example/x/y", None).unwrap();
        assert_eq!(e.port, 80);
        assert!(!e.is_loopback());
        for bad in ["ftp://x/", "/just/a/path", "http://u:p@h/", "not a url"] {
            assert!(Endpoint::parse(bad, None).is_err(), "{bad}");
        }
        let missing = Endpoint::parse("https://h/", Some(Path::new("/nonexistent/ca.pem")));
        let (key, msg) = missing.unwrap_err().keyed("webhook", "url");
        assert_eq!(key, "webhook.ca");
        assert!(msg.contains("/nonexistent/ca.pem"), "{msg}");
    }

    #[test]
    fn statuses() {
        let ep = Endpoint::parse("http://127.0.0.1/", None).unwrap();
        let r = |status| Response {
            status,
            body: "nope".into(),
            retry_after: None,
        };
        assert!(check(&ep, r(200)).is_ok());
        assert!(check(&ep, r(204)).is_ok());
        for s in [301, 408, 429, 500, 502, 503] {
            assert!(check(&ep, r(s)).unwrap_err().retryable, "{s}");
        }
        for s in [400, 401, 403, 404, 413, 422] {
            let e = check(&ep, r(s)).unwrap_err();
            assert!(!e.retryable, "{s}");
            assert!(e.message.contains(&s.to_string()) && e.message.contains("nope"));
        }
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }
}
