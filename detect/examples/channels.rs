//! Tuning aid: for every `*.csv` under DATA_DIR, writes each channel's
//! exceedance, the surprise and the score per row under OUT_DIR (same
//! relative paths). `VD_<param>=value` overrides a parameter, e.g.
//! `VD_relax=0.0001`.
//!
//!     cargo run --release -p vitals-detect --example channels -- DATA_DIR OUT_DIR

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;

use vitals_detect::{Detector, Params, csv};

fn params() -> Result<Params, Box<dyn Error>> {
    let mut p = Params::default();
    for (k, v) in std::env::vars() {
        let Some(name) = k.strip_prefix("VD_") else {
            continue;
        };
        let v: f64 = v.parse()?;
        match name {
            "warmup" => p.warmup = v as u32,
            "season_warmup_periods" => p.season_warmup_periods = v as i64,
            "level_alpha" => p.level_alpha = v,
            "season_smooth_alpha" => p.season_smooth_alpha = v,
            "center_alpha" => p.center_alpha = v,
            "relax" => p.relax = v,
            "season_alpha" => p.season_alpha = v,
            "refractory_decay" => p.refractory_decay = v,
            "half_score" => p.half_score = v,
            "w0" => p.weights[0] = v,
            "w1" => p.weights[1] = v,
            "w2" => p.weights[2] = v,
            "w3" => p.weights[3] = v,
            _ => return Err(format!("unknown parameter {name}").into()),
        }
    }
    Ok(p)
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let (Some(data), Some(out)) = (args.next(), args.next()) else {
        return Err("usage: channels DATA_DIR OUT_DIR".into());
    };
    let p = params()?;
    for rel in csv::csv_files(&data)? {
        let rows = csv::parse(&std::fs::read_to_string(data.join(&rel))?, &rel)?;
        let mut d = Detector::new(&p);
        let mut s = String::from("value,level,season,week,surprise,score\n");
        for r in &rows {
            let c = d.observe(r.ts_ms, r.value);
            for e in c.exceed {
                write!(s, "{e},")?;
            }
            writeln!(s, "{},{}", c.surprise, c.score)?;
        }
        let target = out.join(&rel);
        if let Some(dir) = target.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(target, s)?;
    }
    Ok(())
}
