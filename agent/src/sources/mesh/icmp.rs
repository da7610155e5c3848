//! ICMP echo through an unprivileged ping socket (`socket(AF_INET,
//! SOCK_DGRAM, IPPROTO_ICMP)`, and its IPv6 twin): no raw socket, no
//! capability; the kernel sets the identifier and the checksum and hands
//! back only the replies to this socket. It allows them only to the groups
//! in `net.ipv4.ping_group_range` (per network namespace); elsewhere the
//! socket cannot be made and the mesh says so once and probes by TCP only.

use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// Why no echo could be sent.
#[derive(Debug)]
pub enum EchoError {
    /// The kernel does not allow ping sockets to this process (the
    /// message says how to allow them).
    Refused(String),
}

const ECHO_V4: u8 = 8;
const REPLY_V4: u8 = 0;
const ECHO_V6: u8 = 128;
const REPLY_V6: u8 = 129;
const PAYLOAD: usize = 16;

/// Sends one echo request to `addr` and waits up to `timeout` for its
/// reply: Ok(Some(round trip)), Ok(None) = lost (no reply in time, or the
/// network said unreachable).
pub async fn echo(
    addr: IpAddr,
    seq: u16,
    timeout: Duration,
) -> Result<Option<Duration>, EchoError> {
    let (domain, proto, req, rep) = match addr {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, ECHO_V4, REPLY_V4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, ECHO_V6, REPLY_V6),
    };
    let sock = match Socket::new(domain, Type::DGRAM, Some(proto)) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::PermissionDenied | ErrorKind::Unsupported
            ) || e.raw_os_error() == Some(libc::EPROTONOSUPPORT)
                || e.raw_os_error() == Some(libc::EAFNOSUPPORT) =>
        {
            return Err(EchoError::Refused(format!(
                "the kernel refuses unprivileged ICMP echo sockets ({e}); allow them with sysctl net.ipv4.ping_group_range=\"0 2147483647\" (or the agent's group), or set icmp = false for the peer"
            )));
        }
        Err(e) => {
            tracing::debug!("ping socket: {e}");
            return Ok(None);
        }
    };
    let result = tokio::time::timeout(timeout, async move {
        sock.set_nonblocking(true).ok()?;
        sock.connect(&SocketAddr::new(addr, 0).into()).ok()?;
        let sock = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(sock)).ok()?;
        let token: [u8; PAYLOAD] = rand::random();
        let mut packet = vec![req, 0, 0, 0, 0, 0];
        packet.extend_from_slice(&seq.to_be_bytes());
        packet.extend_from_slice(&token);
        let sent = Instant::now();
        sock.send(&packet).await.ok()?;
        let mut buf = [0u8; 256];
        loop {
            let n = sock.recv(&mut buf).await.ok()?;
            if is_reply(&buf[..n], rep, seq, &token) {
                return Some(sent.elapsed());
            }
        }
    })
    .await;
    Ok(result.ok().flatten())
}

/// Whether `got` (an ICMP message without its IP header) is the reply of
/// type `rep` to sequence `seq` carrying `token`.
pub fn is_reply(got: &[u8], rep: u8, seq: u16, token: &[u8]) -> bool {
    got.len() >= 8 + token.len()
        && got[0] == rep
        && got[1] == 0
        && got[6..8] == seq.to_be_bytes()
        && &got[8..8 + token.len()] == token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_by_type_sequence_and_payload() {
        let token = [7u8; PAYLOAD];
        let mut reply = vec![REPLY_V4, 0, 0xab, 0xcd, 0x12, 0x34, 0, 5];
        reply.extend_from_slice(&token);
        assert!(is_reply(&reply, REPLY_V4, 5, &token));
        assert!(!is_reply(&reply, REPLY_V4, 6, &token), "another sequence");
        assert!(!is_reply(&reply, REPLY_V6, 5, &token), "another type");
        assert!(!is_reply(&reply[..12], REPLY_V4, 5, &token), "cut short");
        let mut other = reply.clone();
        other[10] ^= 1;
        assert!(!is_reply(&other, REPLY_V4, 5, &token), "another payload");
    }
}
