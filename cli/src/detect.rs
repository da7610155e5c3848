//! `vitals detect` and `vitals bench detect`: the collector's detector, offline.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use vitals_detect::{Params, bench as dbench, csv};

pub fn run(file: Option<PathBuf>, dir: Option<PathBuf>, out: Option<PathBuf>) -> Result<()> {
    let params = Params::default();
    match (file, dir) {
        (_, Some(dir)) => {
            let Some(out) = out else {
                bail!("--dir needs --out RESULTS_DIR");
            };
            let written = csv::detect_dir(&dir, &out, &params)?;
            eprintln!(
                "vitals: scored {} files from {} into {}",
                written.len(),
                dir.display(),
                out.display()
            );
        }
        (Some(file), None) => {
            let text = csv::detect_file(&file, out.as_deref(), &params)?;
            if out.is_none() {
                let mut stdout = std::io::stdout().lock();
                stdout
                    .write_all(text.as_bytes())
                    .and_then(|()| stdout.flush())
                    .context("writing to stdout")?;
            }
        }
        (None, None) => bail!("give a CSV FILE or --dir DATA_DIR --out RESULTS_DIR"),
    }
    Ok(())
}

pub fn bench(series: usize, rounds: u64, json: bool) -> String {
    let r = dbench::run(series.max(1), rounds.max(1));
    if json {
        return serde_json::json!({
            "series": r.series,
            "samples": r.samples,
            "seconds": r.elapsed.as_secs_f64(),
            "samples_per_sec_per_core": r.samples_per_sec,
            "detector_bytes": r.detector_bytes,
            "bytes_per_series": r.set_bytes_per_series,
            "spikes": r.spikes,
            "alarms": r.alarms,
        })
        .to_string();
    }
    let mut text = format!(
        "detector: {} series x {} samples = {} samples in {:.2} s on one core\n\
         throughput: {:.0} samples/s per core ({:.0} ns per sample)\n\
         state: {} bytes per detector, {} bytes per series in a DetectorSet<u64> \
         ({:.1} MiB for 100,000 series)",
        r.series,
        r.samples / r.series as u64,
        r.samples,
        r.elapsed.as_secs_f64(),
        r.samples_per_sec,
        1e9 / r.samples_per_sec,
        r.detector_bytes,
        r.set_bytes_per_series,
        r.set_bytes_per_series as f64 * 100_000.0 / (1024.0 * 1024.0),
    );
    if r.samples / r.series as u64 > 5_000 {
        text.push_str(&format!(
            "\ncheck: {} spikes injected after warm-up, {} samples scored >= 0.5",
            r.spikes, r.alarms
        ));
    }
    text
}
