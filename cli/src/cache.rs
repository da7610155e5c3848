//! `vitals cache check [DATASET]`: for each dataset a NAS agent reports
//! (`[sources.zfs] cache_datasets`), whether its data can be served from
//! the NVMe cache (L2ARC) and RAM (ARC), why not, and the fix.
//!
//! Instant queries over the zfs source's series; the verdict itself is the
//! agent's pure `sources::zfs::cache::verdict`, here with the read volume
//! and hit ratios of the last 15 minutes added.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use vitals_agent::sources::zfs::cache::{
    CacheSizes, Dataset, PROPERTIES, Reading, Reason, verdict,
};
use vitals_proto::label;
use vitals_proto::v1::{QueryInstantRequest, Series};

use crate::client::{self, CliConfig};
use crate::commands::status_error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ask {
    Info,
    Used,
    Referenced,
    Recordsize,
    ArcMax,
    L2Size,
    ReadRate,
    ArcHit,
    L2Hit,
}

pub fn queries() -> Vec<(Ask, &'static str)> {
    vec![
        (Ask::Info, "vitals_zfs_dataset_info"),
        (Ask::Used, "vitals_zfs_dataset_used_bytes"),
        (Ask::Referenced, "vitals_zfs_dataset_referenced_bytes"),
        (Ask::Recordsize, "vitals_zfs_dataset_recordsize_bytes"),
        (Ask::ArcMax, "node_zfs_arc_c_max"),
        (Ask::L2Size, "node_zfs_arc_l2_size"),
        (Ask::ReadRate, "rate(node_zfs_zpool_dataset_nread[15m])"),
        (Ask::ArcHit, "avg_over_time(node_zfs_arc_hit_ratio[15m])"),
        (Ask::L2Hit, "avg_over_time(node_zfs_arc_l2_hit_ratio[15m])"),
    ]
}

/// One dataset on one NAS, with its verdict.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub node: String,
    pub dataset: String,
    pub cacheable: bool,
    pub reasons: Vec<Reason>,
    pub properties: BTreeMap<String, String>,
    pub referenced_bytes: Option<f64>,
    pub cache_bytes: Option<f64>,
    pub read_bytes_per_second: Option<f64>,
    pub arc_hit_ratio: Option<f64>,
    pub l2_hit_ratio: Option<f64>,
}

fn last(s: &Series) -> Option<f64> {
    s.points.last().map(|p| p.value).filter(|v| v.is_finite())
}

/// Rows from the answers, for `only` (a dataset name) or every dataset.
pub fn build(answers: &BTreeMap<Ask, Vec<Series>>, only: Option<&str>) -> Vec<Row> {
    let none = Vec::new();
    let get = |a: Ask| answers.get(&a).unwrap_or(&none);
    let per_node = |a: Ask, node: &str| {
        get(a)
            .iter()
            .find(|s| label(&s.labels, "node") == node)
            .and_then(last)
    };
    let per_dataset = |a: Ask, node: &str, ds: &str| {
        get(a)
            .iter()
            .find(|s| label(&s.labels, "node") == node && label(&s.labels, "dataset") == ds)
            .and_then(last)
    };
    let mut rows = Vec::new();
    for info in get(Ask::Info) {
        let node = label(&info.labels, "node");
        let name = label(&info.labels, "dataset");
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let mut props: BTreeMap<String, String> = info
            .labels
            .iter()
            .filter(|l| !["node", "zpool", "dataset"].contains(&l.name.as_str()))
            .filter(|l| !l.value.is_empty())
            .map(|l| (l.name.clone(), l.value.clone()))
            .collect();
        for (a, p) in [
            (Ask::Used, "used"),
            (Ask::Referenced, "referenced"),
            (Ask::Recordsize, "recordsize"),
        ] {
            if let Some(v) = per_dataset(a, node, name) {
                props.insert(p.into(), format!("{v:.0}"));
            }
        }
        let ds = Dataset {
            name: name.to_string(),
            props: props.clone(),
        };
        let sizes = CacheSizes {
            arc_max_bytes: per_node(Ask::ArcMax, node),
            l2_bytes: per_node(Ask::L2Size, node),
        };
        let reading = Reading {
            read_bytes_per_second: per_dataset(Ask::ReadRate, node, name),
            arc_hit_ratio: per_node(Ask::ArcHit, node),
            l2_hit_ratio: per_node(Ask::L2Hit, node),
        };
        let v = verdict(&ds, sizes, reading);
        rows.push(Row {
            node: node.to_string(),
            dataset: name.to_string(),
            cacheable: v.cacheable,
            reasons: v.reasons,
            referenced_bytes: ds.bytes("referenced").map(|b| b as f64),
            cache_bytes: sizes
                .arc_max_bytes
                .map(|a| a + sizes.l2_bytes.unwrap_or(0.0)),
            properties: props,
            read_bytes_per_second: reading.read_bytes_per_second,
            arc_hit_ratio: reading.arc_hit_ratio,
            l2_hit_ratio: reading.l2_hit_ratio,
        });
    }
    rows.sort_by(|a, b| (&a.dataset, &a.node).cmp(&(&b.dataset, &b.node)));
    rows
}

fn gib(b: f64) -> String {
    format!("{:.1} GiB", b / (1u64 << 30) as f64)
}

pub fn render(rows: &[Row], json: bool) -> String {
    if json {
        return serde_json::json!({ "datasets": rows }).to_string();
    }
    let mut out = Vec::new();
    for r in rows {
        out.push(format!(
            "{} on {}: {}",
            r.dataset,
            r.node,
            if r.cacheable {
                "cacheable on the NVMe (L2ARC)"
            } else {
                "NOT cacheable on the NVMe (L2ARC)"
            }
        ));
        for reason in &r.reasons {
            out.push(format!("  - {}", reason.problem));
            if let Some(fix) = &reason.fix {
                out.push(format!("    fix: {fix}"));
            }
        }
        // The cache properties the source asks for; sizes are shown apart.
        let props: Vec<String> = PROPERTIES
            .iter()
            .filter(|p| !matches!(**p, "used" | "referenced"))
            .filter_map(|p| r.properties.get(*p).map(|v| format!("{p}={v}")))
            .collect();
        let mut facts = vec![props.join(" ")];
        if let Some(b) = r.referenced_bytes {
            facts.push(format!("{} referenced", gib(b)));
        }
        if let Some(c) = r.cache_bytes {
            facts.push(format!("ARC + L2ARC {}", gib(c)));
        }
        if let Some(rate) = r.read_bytes_per_second {
            facts.push(format!("read {:.1} MiB/s", rate / (1024.0 * 1024.0)));
        }
        if let (Some(a), Some(l)) = (r.arc_hit_ratio, r.l2_hit_ratio) {
            facts.push(format!(
                "hits ARC {:.0}% L2ARC {:.0}%",
                a * 100.0,
                l * 100.0
            ));
        }
        out.push(format!("  {}", facts.join("; ")));
    }
    out.join("\n")
}

pub async fn check(cfg: &CliConfig, dataset: Option<String>, json: bool) -> Result<String> {
    let channel = client::channel(cfg).await?;
    let mut q = client::query_client(channel);
    let now = vitals_common::now_ms();
    let mut answers = BTreeMap::new();
    for (ask, query) in queries() {
        let resp = q
            .query_instant(QueryInstantRequest {
                query: query.into(),
                time_ms: now,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        answers.insert(ask, resp.series);
    }
    let rows = build(&answers, dataset.as_deref());
    if rows.is_empty() {
        match dataset {
            Some(d) => bail!(
                "no agent reports dataset {d:?}: add it to [sources.zfs] cache_datasets in the NAS's agent.toml"
            ),
            None => bail!(
                "no agent reports any dataset: set [sources.zfs] cache_datasets (e.g. [\"tank/train\"]) in the NAS's agent.toml"
            ),
        }
    }
    Ok(render(&rows, json))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    use crate::commands::test_series as s;

    #[test]
    fn metadata_only_l2arc_is_reported_with_the_fix() {
        let info = |ds: &str, sc: &str| {
            s(
                "vitals_zfs_dataset_info",
                &[
                    ("node", "nas-01"),
                    ("zpool", "tank"),
                    ("dataset", ds),
                    ("primarycache", "all"),
                    ("secondarycache", sc),
                    ("compression", "lz4"),
                    ("sync", "standard"),
                    ("logbias", "throughput"),
                ],
                1.0,
            )
        };
        let node = [("node", "nas-01")];
        let ds = |d: &'static str| [("node", "nas-01"), ("zpool", "tank"), ("dataset", d)];
        let mut a = BTreeMap::new();
        a.insert(
            Ask::Info,
            vec![info("tank/train", "metadata"), info("tank/models", "all")],
        );
        a.insert(
            Ask::Referenced,
            vec![
                s("x", &ds("tank/train"), 2e12),
                s("x", &ds("tank/models"), 1e11),
            ],
        );
        a.insert(
            Ask::ArcMax,
            vec![s("x", &node, 256.0 * (1u64 << 30) as f64)],
        );
        a.insert(
            Ask::L2Size,
            vec![s("x", &node, 3584.0 * (1u64 << 30) as f64)],
        );
        a.insert(Ask::ReadRate, vec![s("x", &ds("tank/models"), 5e8)]);
        a.insert(Ask::ArcHit, vec![s("x", &node, 0.1)]);
        a.insert(Ask::L2Hit, vec![s("x", &node, 0.2)]);
        let rows = build(&a, None);
        assert_eq!(rows.len(), 2);
        let train = rows.iter().find(|r| r.dataset == "tank/train").unwrap();
        assert!(!train.cacheable);
        assert_eq!(
            train.reasons[0].fix.as_deref(),
            Some("zfs set secondarycache=all tank/train")
        );
        let models = rows.iter().find(|r| r.dataset == "tank/models").unwrap();
        assert!(models.cacheable);
        assert!(
            models.reasons[0]
                .problem
                .starts_with("read mostly from disk")
        );
        let text = render(&rows, false);
        assert!(
            text.contains("tank/train on nas-01: NOT cacheable on the NVMe (L2ARC)\n  - secondarycache=metadata: not cacheable on the L2ARC (NVMe)\n    fix: zfs set secondarycache=all tank/train"),
            "{text}"
        );
        let only = build(&a, Some("tank/models"));
        assert_eq!(only.len(), 1);
        let j: serde_json::Value = serde_json::from_str(&render(&only, true)).unwrap();
        assert_eq!(j["datasets"][0]["cacheable"], true);
        assert_eq!(j["datasets"][0]["properties"]["secondarycache"], "all");
    }
}
