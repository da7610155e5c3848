//! Throughput tests between agents over the real link.
//!
//! An agent with `[net_test] listen` serves `vitals.v1.NetTest` there with
//! its own certificate, clients' certificates required and checked against
//! the CA. `Run` (role operator: `vitals net test FROM TO`) makes this
//! agent the sender: it calls `Receive` on the agent at `to` with its own
//! (agent) certificate; the receiver opens a data port on the address the
//! call came in on and hands back a one-time token; the sender opens
//! `streams` plain TCP connections to it (TLS would cap a 100GbE link),
//! sends the token and its share of the bytes on each, and the receiver
//! counts what arrives from the first byte to the last end of stream. Both
//! sides are bounded: at most `max_bytes` per test and `max_duration` of
//! time; a connection without the token is closed unread; bytes past the
//! requested count end the stream.
//!
//! The sender adds what the receiver cannot know: the TCP segments its
//! network namespace retransmitted meanwhile (`/proc/net/snmp`
//! RetransSegs under `paths.procfs`; every socket of the namespace, so
//! other traffic counts too), the interface the route to the receiver
//! leaves by (`/proc/net/route`, IPv4) and its negotiated speed
//! (`/sys/class/net/DEV/speed` under `paths.sysfs`; unknown where the
//! kernel has none).
//!
//! `[[net_test.schedule]]` runs tests from this agent on its own thread
//! (the `net_test` source) and records `vitals_net_test_bits_per_second`,
//! `vitals_net_test_link_ratio`, `vitals_net_test_retransmits`,
//! `vitals_net_test_seconds`, `vitals_net_test_bytes` and
//! `vitals_net_test_success`, labelled `peer` (the receiver's node name
//! once known, else the configured address); a failed run sets success 0.

pub mod parse;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status};
use vitals_common::config;
use vitals_common::identity::Role;
use vitals_common::tls::TlsMaterial;
use vitals_proto::v1::net_test_client::NetTestClient;
use vitals_proto::v1::net_test_server::{NetTest, NetTestServer};
use vitals_proto::v1::{
    NetTestRequest, NetTestResult, ReceiveDone, ReceiveReady, ReceiveRequest, ReceiveUpdate,
    receive_update,
};

/// Most TCP streams one test may use.
pub const MAX_STREAMS: u32 = 64;
/// The one-time token's length.
const TOKEN: usize = 32;
/// Longest wait for a connection or a control call to be set up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// `[net_test]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetTestConfig {
    /// Where to listen for tests, e.g. "0.0.0.0:7444"; unset: no listener.
    #[serde(default)]
    pub listen: Option<String>,
    /// Most bytes one test may move (as sender or receiver).
    #[serde(default = "default_max_bytes", with = "parse::serde_bytes")]
    pub max_bytes: u64,
    /// Longest one test may take; the receiver stops counting then.
    #[serde(default = "default_max_duration", with = "config::duration")]
    pub max_duration: Duration,
    /// `[[net_test.schedule]]`: tests this agent runs by itself.
    #[serde(default)]
    pub schedule: Vec<ScheduleConfig>,
}

impl Default for NetTestConfig {
    fn default() -> Self {
        NetTestConfig {
            listen: None,
            max_bytes: default_max_bytes(),
            max_duration: default_max_duration(),
            schedule: Vec::new(),
        }
    }
}

fn default_max_bytes() -> u64 {
    10 << 30
}
fn default_max_duration() -> Duration {
    Duration::from_secs(30)
}
fn default_schedule_bytes() -> u64 {
    256 << 20
}
fn default_streams() -> u32 {
    4
}

/// One scheduled test.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// HOST:PORT of the receiving agent's net-test listener.
    pub to: String,
    /// Time between tests.
    #[serde(with = "config::duration")]
    pub every: Duration,
    /// Bytes per test.
    #[serde(default = "default_schedule_bytes", with = "parse::serde_bytes")]
    pub bytes: u64,
    /// TCP streams per test.
    #[serde(default = "default_streams")]
    pub streams: u32,
}

/// HOST and PORT of `HOST:PORT` (`[v6]:PORT` too).
pub fn split_addr(addr: &str) -> Result<(String, u16), String> {
    let bad = || format!("{addr:?} is not HOST:PORT (e.g. \"nas-01:7444\" or \"10.0.0.2:7444\")");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(['/', ' ']) {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// Checks `[net_test]`: (key, message) of the first problem.
pub fn check(cfg: &NetTestConfig) -> Result<(), (String, String)> {
    let bad = |k: &str, m: String| Err((format!("net_test.{k}"), m));
    if let Some(l) = &cfg.listen
        && l.parse::<SocketAddr>().is_err()
    {
        return bad(
            "listen",
            format!("{l:?} is not ADDRESS:PORT (e.g. \"0.0.0.0:7444\")"),
        );
    }
    if cfg.max_duration < Duration::from_millis(100) {
        return bad("max_duration", "must be at least 100ms".into());
    }
    for (i, s) in cfg.schedule.iter().enumerate() {
        let key = |k: &str| format!("schedule[{i}].{k}");
        if let Err(m) = split_addr(&s.to) {
            return bad(&key("to"), m);
        }
        if s.every < Duration::from_secs(1) {
            return bad(&key("every"), "must be at least 1s".into());
        }
        if s.bytes > cfg.max_bytes {
            return bad(
                &key("bytes"),
                format!(
                    "{} is above net_test.max_bytes ({})",
                    s.bytes, cfg.max_bytes
                ),
            );
        }
        if s.streams == 0 || s.streams > MAX_STREAMS {
            return bad(
                &key("streams"),
                format!("must be between 1 and {MAX_STREAMS}"),
            );
        }
    }
    Ok(())
}

/// What both sides need.
pub struct Shared {
    pub node: String,
    pub tls: TlsMaterial,
    pub max_bytes: u64,
    pub max_duration: Duration,
    pub procfs: PathBuf,
    pub sysfs: PathBuf,
}

fn limits(shared: &Shared, bytes: u64, streams: u32) -> Result<(), Status> {
    if bytes == 0 || bytes > shared.max_bytes {
        return Err(Status::invalid_argument(format!(
            "{bytes} bytes: {} allows 1 to {} bytes per test ([net_test] max_bytes)",
            shared.node, shared.max_bytes
        )));
    }
    if streams == 0 || streams > MAX_STREAMS {
        return Err(Status::invalid_argument(format!(
            "{streams} streams: 1 to {MAX_STREAMS} allowed"
        )));
    }
    Ok(())
}

pub struct Service(pub Arc<Shared>);

type UpdateStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ReceiveUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl NetTest for Service {
    async fn run(&self, req: Request<NetTestRequest>) -> Result<Response<NetTestResult>, Status> {
        let (name, role) = vitals_common::identity::peer_identity(&req)?;
        if role != Role::Operator {
            return Err(Status::permission_denied(format!(
                "certificate of {name} has role {role}; starting a test needs an operator certificate"
            )));
        }
        let r = req.into_inner();
        limits(&self.0, r.bytes, r.streams)?;
        tracing::info!(by = %name, to = %r.to, bytes = r.bytes, streams = r.streams, "net test: sending");
        send(&self.0, &r.to, r.bytes, r.streams)
            .await
            .map(Response::new)
            .map_err(|e| {
                tracing::warn!(to = %r.to, "net test failed: {e}");
                Status::unavailable(e)
            })
    }

    type ReceiveStream = UpdateStream;

    async fn receive(
        &self,
        req: Request<ReceiveRequest>,
    ) -> Result<Response<Self::ReceiveStream>, Status> {
        let (name, role) = vitals_common::identity::peer_identity(&req)?;
        if role != Role::Agent {
            return Err(Status::permission_denied(format!(
                "certificate of {name} has role {role}; only an agent sends test traffic"
            )));
        }
        let local = req
            .local_addr()
            .ok_or_else(|| Status::internal("the call's local address is unknown"))?;
        let r = req.into_inner();
        limits(&self.0, r.bytes, r.streams)?;
        let listener = TcpListener::bind((local.ip(), 0))
            .await
            .map_err(|e| Status::unavailable(format!("cannot open a data port: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Status::internal(e.to_string()))?
            .port();
        let token: [u8; TOKEN] = rand::random();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let ready = ReceiveUpdate {
            update: Some(receive_update::Update::Ready(ReceiveReady {
                port: u32::from(port),
                token: token.to_vec(),
                node: self.0.node.clone(),
            })),
        };
        let _ = tx.send(Ok(ready)).await;
        let (max_duration, node) = (self.0.max_duration, self.0.node.clone());
        tracing::info!(from = %name, bytes = r.bytes, streams = r.streams, "net test: receiving");
        tokio::spawn(async move {
            let done = receive(listener, token, r.bytes, r.streams, max_duration).await;
            tracing::info!(from = %name, on = %node, bytes = done.bytes, seconds = done.seconds, complete = done.complete, "net test: received");
            let _ = tx
                .send(Ok(ReceiveUpdate {
                    update: Some(receive_update::Update::Done(done)),
                }))
                .await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// The receiving side of one test: accepts `streams` connections that
/// start with the token, counts their bytes (at most `bytes` in all) until
/// each ends, or until `max_duration` has passed.
async fn receive(
    listener: TcpListener,
    token: [u8; TOKEN],
    bytes: u64,
    streams: u32,
    max_duration: Duration,
) -> ReceiveDone {
    let deadline = tokio::time::Instant::now() + max_duration;
    let total = Arc::new(AtomicU64::new(0));
    let span: Arc<Mutex<(Option<Instant>, Option<Instant>)>> = Arc::new(Mutex::new((None, None)));
    let mut conns = tokio::task::JoinSet::new();
    let mut ended = 0u32;
    let mut complete = true;
    let mut accepted = 0u32;
    loop {
        tokio::select! {
            a = listener.accept(), if accepted < streams => {
                let Ok((conn, _)) = a else { continue };
                accepted += 1;
                let (total, span) = (total.clone(), span.clone());
                conns.spawn(read_stream(conn, token, bytes, total, span));
            }
            Some(r) = conns.join_next() => {
                match r {
                    Ok(true) => ended += 1,
                    // Not ours (no token): its slot is free again.
                    Ok(false) => accepted -= 1,
                    Err(_) => complete = false,
                }
                if ended == streams {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                complete = false;
                break;
            }
        }
    }
    conns.abort_all();
    let got = total.load(Ordering::Relaxed);
    let (first, last) = match span.lock() {
        Ok(g) => *g,
        Err(p) => *p.into_inner(),
    };
    let seconds = match (first, last) {
        (Some(f), Some(l)) if l > f => (l - f).as_secs_f64(),
        (Some(f), _) => f.elapsed().as_secs_f64(),
        _ => 0.0,
    };
    ReceiveDone {
        bytes: got,
        seconds,
        complete: complete && got == bytes,
    }
}

/// Reads one data connection: false if it did not start with the token
/// (closed unread), true once it ended (or went past the limit).
async fn read_stream(
    mut conn: TcpStream,
    token: [u8; TOKEN],
    limit: u64,
    total: Arc<AtomicU64>,
    span: Arc<Mutex<(Option<Instant>, Option<Instant>)>>,
) -> bool {
    let mut got = [0u8; TOKEN];
    match tokio::time::timeout(CONNECT_TIMEOUT, conn.read_exact(&mut got)).await {
        // Compared without an early exit, so timing says nothing about it.
        Ok(Ok(_))
            if got
                .iter()
                .zip(token.iter())
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0 => {}
        _ => return false,
    }
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n as u64,
        };
        let now = Instant::now();
        {
            let mut s = match span.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if s.0.is_none() {
                s.0 = Some(now);
            }
            s.1 = Some(now);
        }
        if total.fetch_add(n, Ordering::Relaxed) + n > limit {
            break;
        }
    }
    true
}

/// The sending side: asks the agent at `to` to receive, sends, and puts
/// the receiver's count together with what this host knows.
pub async fn send(
    shared: &Shared,
    to: &str,
    bytes: u64,
    streams: u32,
) -> Result<NetTestResult, String> {
    let (host, _) = split_addr(to)?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{to}"))
        .map_err(|e| format!("bad address {to:?}: {e}"))?
        .tls_config(shared.tls.client_config(&host))
        .map_err(|e| format!("TLS setup for {to}: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot reach the net-test listener at {to}: {}", chain(&e)))?;
    let mut client = NetTestClient::new(channel);
    let mut updates = tokio::time::timeout(
        CONNECT_TIMEOUT,
        client.receive(ReceiveRequest { bytes, streams }),
    )
    .await
    .map_err(|_| format!("{to} did not answer within {CONNECT_TIMEOUT:?}"))?
    .map_err(|s| format!("{to} refused the test: {}", s.message()))?
    .into_inner();
    let ready = match tokio::time::timeout(CONNECT_TIMEOUT, updates.message()).await {
        Ok(Ok(Some(ReceiveUpdate {
            update: Some(receive_update::Update::Ready(r)),
        }))) => r,
        Ok(Err(s)) => return Err(format!("{to} refused the test: {}", s.message())),
        _ => return Err(format!("{to} did not open a data port")),
    };
    let port = u16::try_from(ready.port).map_err(|_| format!("{to} sent port {}", ready.port))?;
    let ip: IpAddr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} has no address"))?
        .ip();
    let data = SocketAddr::new(ip, port);
    let retrans = || {
        std::fs::read_to_string(shared.procfs.join("net/snmp"))
            .ok()
            .and_then(|t| parse::retrans_segs(&t))
    };
    let before = retrans();
    let token = Arc::new(ready.token);
    let mut senders = tokio::task::JoinSet::new();
    for i in 0..streams {
        let share =
            bytes / u64::from(streams) + u64::from(u64::from(i) < bytes % u64::from(streams));
        let token = token.clone();
        senders.spawn(async move {
            let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(data))
                .await
                .map_err(|_| format!("connecting to {data} timed out"))?
                .map_err(|e| format!("cannot connect to {data}: {e}"))?;
            conn.write_all(&token)
                .await
                .map_err(|e| format!("sending to {data}: {e}"))?;
            let chunk = vec![0u8; 1 << 20];
            let mut left = share;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                conn.write_all(&chunk[..n])
                    .await
                    .map_err(|e| format!("sending to {data}: {e}"))?;
                left -= n as u64;
            }
            conn.shutdown()
                .await
                .map_err(|e| format!("ending the stream to {data}: {e}"))?;
            Ok::<(), String>(())
        });
    }
    let sending = async {
        while let Some(r) = senders.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(format!("a sending task failed: {e}")),
            }
        }
        Ok(())
    };
    match tokio::time::timeout(shared.max_duration, sending).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            senders.abort_all();
            return Err(format!(
                "sending {bytes} bytes took longer than {:?} ([net_test] max_duration)",
                shared.max_duration
            ));
        }
    }
    let done = match tokio::time::timeout(shared.max_duration + CONNECT_TIMEOUT, updates.message())
        .await
    {
        Ok(Ok(Some(ReceiveUpdate {
            update: Some(receive_update::Update::Done(d)),
        }))) => d,
        Ok(Err(s)) => return Err(format!("{to}: {}", s.message())),
        _ => return Err(format!("{to} did not say what it received")),
    };
    let after = retrans();
    let interface = match ip {
        IpAddr::V4(v4) => std::fs::read_to_string(shared.procfs.join("net/route"))
            .ok()
            .and_then(|t| parse::route_interface(&t, v4)),
        IpAddr::V6(_) => None,
    };
    let link_speed_mbps = interface.as_ref().and_then(|dev| {
        std::fs::read_to_string(shared.sysfs.join("class/net").join(dev).join("speed"))
            .ok()
            .and_then(|t| parse::speed_mbps(&t))
    });
    let bits_per_second = if done.seconds > 0.0 {
        done.bytes as f64 * 8.0 / done.seconds
    } else {
        0.0
    };
    Ok(NetTestResult {
        from_node: shared.node.clone(),
        to_node: ready.node,
        bytes: done.bytes,
        seconds: done.seconds,
        bits_per_second,
        retransmits: before.zip(after).map(|(b, a)| a.saturating_sub(b)),
        interface: interface.unwrap_or_default(),
        link_speed_mbps,
        complete: done.complete,
    })
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves `[net_test]` on `listener` until `stop` resolves.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            &shared.tls.cert_pem,
            &shared.tls.key_pem,
        ))
        .client_ca_root(tonic::transport::Certificate::from_pem(&shared.tls.ca_pem));
    tonic::transport::Server::builder()
        .tls_config(tls)
        .map_err(|e| format!("net-test listener TLS: {e}"))?
        .add_service(NetTestServer::new(Service(shared)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            stop,
        )
        .await
        .map_err(|e| format!("net-test listener: {}", chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<(), (String, String)> {
        let c: NetTestConfig = toml::from_str(text).map_err(|e| ("parse".into(), e.to_string()))?;
        check(&c)
    }

    #[test]
    fn config_checks_name_the_key() {
        assert!(cfg("").is_ok());
        assert!(cfg("listen = \"0.0.0.0:7444\"\nmax_bytes = \"1GiB\"\n[[schedule]]\nto = \"nas-01:7444\"\nevery = \"1h\"\nbytes = \"256MiB\"\n").is_ok());
        let key = |t: &str| cfg(t).unwrap_err().0;
        assert_eq!(key("listen = \"nas:7444\""), "net_test.listen");
        assert_eq!(key("max_duration = \"1ms\""), "net_test.max_duration");
        assert_eq!(
            key("[[schedule]]\nto = \"nas-01\"\nevery = \"1h\""),
            "net_test.schedule[0].to"
        );
        assert_eq!(
            key("[[schedule]]\nto = \"nas-01:7444\"\nevery = \"10ms\""),
            "net_test.schedule[0].every"
        );
        assert_eq!(
            key(
                "max_bytes = \"1MiB\"\n[[schedule]]\nto = \"nas-01:7444\"\nevery = \"1h\"\nbytes = \"2MiB\""
            ),
            "net_test.schedule[0].bytes"
        );
        assert_eq!(
            key("[[schedule]]\nto = \"nas-01:7444\"\nevery = \"1h\"\nstreams = 65"),
            "net_test.schedule[0].streams"
        );
        assert!(
            cfg("max_bytes = \"12 parsecs\"")
                .unwrap_err()
                .1
                .contains("unknown unit")
        );
    }

    #[test]
    fn addresses() {
        assert_eq!(split_addr("nas-01:7444"), Ok(("nas-01".into(), 7444)));
        assert_eq!(split_addr("[fd00::2]:7444"), Ok(("fd00::2".into(), 7444)));
        assert!(split_addr("nas-01").is_err());
        assert!(split_addr(":7444").is_err());
        assert!(split_addr("nas-01:0").is_err());
    }

    /// The receiving side on loopback: the bytes of every stream counted,
    /// a connection without the token closed unread and not counted.
    #[tokio::test]
    async fn the_receiver_counts_token_streams_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let token: [u8; TOKEN] = rand::random();
        let recv = tokio::spawn(receive(
            listener,
            token,
            3 << 20,
            2,
            Duration::from_secs(10),
        ));
        let mut intruder = TcpStream::connect(addr).await.unwrap();
        intruder.write_all(&[0u8; TOKEN]).await.unwrap();
        intruder.write_all(&[1u8; 4096]).await.unwrap();
        for share in [2 << 20, 1 << 20] {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&token).await.unwrap();
            c.write_all(&vec![0u8; share]).await.unwrap();
            c.shutdown().await.unwrap();
        }
        let done = recv.await.unwrap();
        assert_eq!(done.bytes, 3 << 20);
        assert!(done.complete);
        assert!(done.seconds >= 0.0);
        // Nothing but a deadline: incomplete, and said so.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let done = receive(listener, token, 1, 1, Duration::from_millis(200)).await;
        assert!(!done.complete);
        assert_eq!(done.bytes, 0);
    }
}
