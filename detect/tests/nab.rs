//! Reproduces the detector's scores on the part of the Numenta Anomaly
//! Benchmark in `shared/nab/` (beside the repository), scored by
//! `shared/tools/nab_score.py`, and holds them to the bar of docs/DETECTION.md.
//!
//! `VITALS_NAB_DIR` (the folder with `data/` and `labels/`) and
//! `VITALS_NAB_SCORER` override where they are looked for.

use std::path::PathBuf;
use std::process::Command;

/// Standard profile: at least this.
const MIN_STANDARD: f64 = 65.0;
/// Reward-low-FP profile: at least this.
const MIN_LOW_FP: f64 = 55.0;

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

#[test]
fn nab_scores_reach_the_bar() {
    let nab =
        std::env::var_os("VITALS_NAB_DIR").map_or_else(|| shared().join("nab"), PathBuf::from);
    let scorer = std::env::var_os("VITALS_NAB_SCORER")
        .map_or_else(|| shared().join("tools/nab_score.py"), PathBuf::from);
    assert!(
        nab.join("data").is_dir() && scorer.is_file(),
        "NAB data ({}) or scorer ({}) not found: set VITALS_NAB_DIR / VITALS_NAB_SCORER",
        nab.display(),
        scorer.display()
    );

    let out = tempfile::tempdir().unwrap();
    let written = vitals_detect::csv::detect_dir(
        &nab.join("data"),
        out.path(),
        &vitals_detect::Params::default(),
    )
    .unwrap();
    assert!(written.len() >= 30, "scored {} files", written.len());

    let run = Command::new("python3")
        .arg(&scorer)
        .arg("--data")
        .arg(nab.join("data"))
        .arg("--labels")
        .arg(nab.join("labels/combined_windows.json"))
        .arg("--results")
        .arg(out.path())
        .arg("--json")
        .output()
        .expect("python3 runs");
    assert!(
        run.status.success(),
        "scorer failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let score = |profile: &str| {
        report["profiles"][profile]["score"]
            .as_f64()
            .unwrap_or_else(|| panic!("no {profile} score in {report}"))
    };
    let (standard, low_fp) = (score("standard"), score("reward_low_FP_rate"));
    eprintln!(
        "NAB: standard {standard:.2}, reward_low_FP_rate {low_fp:.2}, reward_low_FN_rate {:.2}",
        score("reward_low_FN_rate")
    );
    assert!(
        standard >= MIN_STANDARD,
        "standard profile {standard:.2} < {MIN_STANDARD}"
    );
    assert!(
        low_fp >= MIN_LOW_FP,
        "reward_low_FP_rate {low_fp:.2} < {MIN_LOW_FP}"
    );
}
