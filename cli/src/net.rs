//! `vitals net test FROM TO`: asks the agent listening at FROM (its
//! `[net_test] listen`) to send to the one at TO, with the operator
//! certificate of the CLI's config, and prints what the receiver measured.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tonic::transport::Endpoint;
use vitals_agent::net_test::{MAX_STREAMS, parse, split_addr};
use vitals_common::tls::TlsFiles;
use vitals_proto::v1::net_test_client::NetTestClient;
use vitals_proto::v1::{NetTestRequest, NetTestResult};

use crate::client::CliConfig;

pub async fn test(
    cfg: &CliConfig,
    from: &str,
    to: &str,
    bytes: &str,
    streams: u32,
    json: bool,
) -> Result<String> {
    let bytes = parse::bytes(bytes).map_err(|e| anyhow::anyhow!("--bytes: {e}"))?;
    if streams == 0 || streams > MAX_STREAMS {
        bail!("--streams: {streams}: between 1 and {MAX_STREAMS}");
    }
    let (host, _) = split_addr(from).map_err(|e| anyhow::anyhow!("FROM: {e}"))?;
    split_addr(to).map_err(|e| anyhow::anyhow!("TO: {e}"))?;
    let tls = TlsFiles {
        ca: cfg.ca.clone(),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    }
    .load()?;
    let channel = Endpoint::from_shared(format!("https://{from}"))
        .with_context(|| format!("bad address {from:?}"))?
        .tls_config(tls.client_config(&host))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the net-test listener of the agent at {from} ([net_test] listen in its agent.toml)"))?;
    let r = NetTestClient::new(channel)
        .run(NetTestRequest {
            to: to.to_string(),
            bytes,
            streams,
        })
        .await
        .map_err(|s| anyhow::anyhow!("the test from {from} to {to} failed: {}", s.message()))?
        .into_inner();
    let text = if json {
        render_json(&r)
    } else {
        render(&r, streams)
    };
    if !r.complete {
        bail!(
            "{text}\nincomplete: {} of {bytes} bytes arrived before the receiver's limit ([net_test] max_duration or max_bytes)",
            r.bytes
        );
    }
    Ok(text)
}

fn ratio(r: &NetTestResult) -> Option<f64> {
    r.link_speed_mbps
        .map(|m| r.bits_per_second / (m as f64 * 1e6))
}

/// The human form.
pub fn render(r: &NetTestResult, streams: u32) -> String {
    let link = match (r.interface.as_str(), r.link_speed_mbps) {
        ("", _) => "link speed: unknown (no IPv4 route found for the receiver)".to_string(),
        (dev, None) => format!("link speed: unknown ({dev} reports none)"),
        (dev, Some(m)) => format!(
            "link: {dev} at {} Gbit/s negotiated; achieved {:.1}% of it",
            m as f64 / 1000.0,
            ratio(r).unwrap_or(0.0) * 100.0
        ),
    };
    let retrans = match r.retransmits {
        Some(n) => format!("retransmits: {n} TCP segments (the sender's, during the test)"),
        None => "retransmits: unknown".to_string(),
    };
    format!(
        "{} → {}: {:.3} Gbit/s ({} bytes in {:.3} s over {streams} streams)\n{retrans}\n{link}",
        r.from_node,
        r.to_node,
        r.bits_per_second / 1e9,
        r.bytes,
        r.seconds
    )
}

/// `--json`.
pub fn render_json(r: &NetTestResult) -> String {
    serde_json::json!({
        "from": r.from_node,
        "to": r.to_node,
        "bytes": r.bytes,
        "seconds": r.seconds,
        "bits_per_second": r.bits_per_second,
        "gbit_per_second": r.bits_per_second / 1e9,
        "retransmits": r.retransmits,
        "interface": (!r.interface.is_empty()).then_some(r.interface.as_str()),
        "link_speed_mbps": r.link_speed_mbps,
        "link_ratio": ratio(r),
        "complete": r.complete,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_known_and_unknown_link_speeds() {
        let mut r = NetTestResult {
            from_node: "gpu-01".into(),
            to_node: "nas-01".into(),
            bytes: 1 << 30,
            seconds: 0.286,
            bits_per_second: 30.0e9,
            retransmits: Some(7),
            interface: "ens1f0".into(),
            link_speed_mbps: Some(100_000),
            complete: true,
        };
        let t = render(&r, 4);
        assert!(t.contains("gpu-01 → nas-01: 30.000 Gbit/s"), "{t}");
        assert!(t.contains("retransmits: 7"), "{t}");
        assert!(
            t.contains("ens1f0 at 100 Gbit/s negotiated; achieved 30.0%"),
            "{t}"
        );
        let j: serde_json::Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert_eq!(j["link_ratio"], 0.3);
        r.link_speed_mbps = None;
        r.retransmits = None;
        let t = render(&r, 4);
        assert!(
            t.contains("link speed: unknown (ens1f0 reports none)"),
            "{t}"
        );
        assert!(t.contains("retransmits: unknown"), "{t}");
        let j: serde_json::Value = serde_json::from_str(&render_json(&r)).unwrap();
        assert!(j["link_ratio"].is_null() && j["link_speed_mbps"].is_null());
    }
}
