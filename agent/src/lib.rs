//! The Vitals agent: sources → batch → on-disk spool → mutual-TLS stream →
//! deleted on ack. `run` is the whole daemon; `vitals dev` calls it in-process.

pub mod config;
pub mod cycle;
pub mod net_test;
pub mod reload;
pub mod ship;
pub mod sources;
pub mod spool;

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};
use vitals_common::model::Sample;

pub use config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Source(#[from] cycle::UnknownSource),
    #[error("cannot handle SIGHUP: {0}")]
    Signal(#[source] std::io::Error),
    #[error(
        "[net_test] listen = {listen:?}: cannot listen there: {source} (another process on that port? pick a free one)"
    )]
    NetTestListen {
        listen: String,
        #[source]
        source: std::io::Error,
    },
}

/// What a run did, reported when it ends.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub cycles: u64,
    pub spooled_left: u64,
}

/// Runs the agent until `shutdown` resolves; then tries for
/// `shutdown_grace` to deliver what is spooled.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<Summary, AgentError> {
    run_reloadable(settings, shutdown, None).await
}

/// `run`, and on every hangup of `reload` re-reads the config file and its
/// TLS files (see the `reload` module for what changes live).
pub async fn run_reloadable(
    mut settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
    mut reload: Option<reload::Reload>,
) -> Result<Summary, AgentError> {
    let spool = Arc::new(spool::Spool::open(
        &settings.spool_dir,
        settings.spool_max_bytes,
    )?);
    let sources = cycle::Sources::new(&settings.raw, &[])?;
    tracing::info!(
        node = %settings.node,
        collector = %settings.collector_url,
        interval = ?settings.interval,
        sources = ?sources.names(),
        spooled = spool.stats().batches,
        instance = spool.instance_id(),
        version = vitals_common::VERSION,
        "agent started"
    );
    let sources = Arc::new(Mutex::new(sources));
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(listen) = settings.raw.net_test.listen.clone() {
        let listener = tokio::net::TcpListener::bind(&listen)
            .await
            .map_err(|source| AgentError::NetTestListen {
                listen: listen.clone(),
                source,
            })?;
        let shared = Arc::new(net_test::Shared {
            node: settings.node.clone(),
            tls: settings.tls.clone(),
            max_bytes: settings.raw.net_test.max_bytes,
            max_duration: settings.raw.net_test.max_duration,
            procfs: settings.raw.paths.procfs.clone(),
            sysfs: settings.raw.paths.sysfs.clone(),
        });
        let mut stop = stop_rx.clone();
        tracing::info!(%listen, "net-test listener started");
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = net_test::serve(listener, shared, stopped).await {
                tracing::error!("{e}");
            }
        });
    }
    let notify = Arc::new(Notify::new());
    let (link_tx, link_rx) = watch::channel(link(&settings));
    let shipper = tokio::spawn(
        ship::Shipper {
            link: link_rx,
            node: settings.node.clone(),
            spool: spool.clone(),
            notify: notify.clone(),
            stop: stop_rx,
        }
        .run(),
    );

    vitals_common::notify::ready(&format!("collecting every {:?}", settings.interval));

    let mut ticker = ticker(settings.interval, tokio::time::Instant::now());
    let mut cycles = 0u64;
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(()) = hangup(&mut reload) => {
                if let Some(r) = &reload {
                    apply_reload(&r.path, &mut settings, &mut ticker, &link_tx, &sources).await;
                }
                continue;
            }
            _ = &mut shutdown => break,
        }
        cycles += 1;
        let ts = vitals_common::now_ms();
        let (node, spool2, sources2) = (settings.node.clone(), spool.clone(), sources.clone());
        let n = cycles;
        let pushed = tokio::task::spawn_blocking(move || {
            let mut cycle = match sources2.lock() {
                Ok(mut s) => s.collect(),
                Err(_) => return Err("source list lock poisoned".to_string()),
            };
            add_self_metrics(&mut cycle.samples, n, &spool2.stats());
            let batch = cycle::to_batch(&node, ts, &cycle.samples, &cycle.events);
            spool2.push(batch, ts).map_err(|e| e.to_string())
        })
        .await;
        match pushed {
            Ok(Ok(_seq)) => notify.notify_one(),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot write this cycle to the spool; its samples are lost")
            }
            Err(e) => {
                tracing::error!(error = %e, "collection cycle panicked; its samples are lost")
            }
        }
    }

    vitals_common::notify::stopping();
    let _ = stop_tx.send(true);
    let left = spool.stats().batches;
    if left > 0 {
        tracing::info!(spooled = left, grace = ?settings.shutdown_grace, "stopping: delivering the spool");
    }
    if tokio::time::timeout(settings.shutdown_grace, shipper)
        .await
        .is_err()
    {
        tracing::warn!(
            spooled = spool.stats().batches,
            "shutdown grace ran out; unsent batches stay in the spool and go out on the next start"
        );
    }
    let summary = Summary {
        cycles,
        spooled_left: spool.stats().batches,
    };
    tracing::info!(
        cycles = summary.cycles,
        spooled_left = summary.spooled_left,
        "agent stopped"
    );
    Ok(summary)
}

fn link(settings: &Settings) -> ship::Link {
    ship::Link {
        url: settings.collector_url.clone(),
        server_name: settings.server_name.clone(),
        tls: settings.tls.clone(),
    }
}

fn ticker(every: std::time::Duration, start: tokio::time::Instant) -> tokio::time::Interval {
    let mut t = tokio::time::interval_at(start, every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// The next reload request; never, without a reload source.
async fn hangup(reload: &mut Option<reload::Reload>) -> Option<()> {
    match reload.as_mut() {
        Some(r) => r.hangups.recv().await,
        None => std::future::pending().await,
    }
}

/// Re-reads the config and applies it: a new link makes the shipper
/// reconnect, a new interval restarts the ticker, new sources or paths
/// rebuild the sources (off the async threads: building opens files).
async fn apply_reload(
    path: &std::path::Path,
    settings: &mut Settings,
    ticker_now: &mut tokio::time::Interval,
    link_tx: &watch::Sender<ship::Link>,
    sources: &Arc<Mutex<cycle::Sources>>,
) {
    let Some(new) = reload::load(path) else {
        return;
    };
    let out = reload::apply(settings, new);
    reload::log(path, &out, settings);
    if out.relink {
        link_tx.send_replace(link(settings));
    }
    if out.applied.contains(&"interval") {
        *ticker_now = ticker(
            settings.interval,
            tokio::time::Instant::now() + settings.interval,
        );
    }
    if out.rebuild_sources {
        let raw = settings.raw.clone();
        let sources = sources.clone();
        let built = tokio::task::spawn_blocking(move || {
            let new = cycle::Sources::new(&raw, &[])?;
            let names = new.names();
            match sources.lock() {
                Ok(mut s) => *s = new,
                Err(poisoned) => *poisoned.into_inner() = new,
            }
            Ok::<_, cycle::UnknownSource>(names)
        })
        .await;
        match built {
            Ok(Ok(names)) => tracing::info!(sources = ?names, "sources rebuilt"),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot rebuild the sources; keeping the running ones")
            }
            Err(e) => {
                tracing::error!(error = %e, "rebuilding the sources panicked; keeping the running ones")
            }
        }
    }
}

/// The agent's own health, sent with every batch.
fn add_self_metrics(samples: &mut Vec<Sample>, cycles: u64, spool: &spool::SpoolStats) {
    samples.push(Sample::new("vitals_agent_cycles_total", cycles as f64));
    samples.push(Sample::new(
        "vitals_agent_spool_batches",
        spool.batches as f64,
    ));
    samples.push(Sample::new("vitals_agent_spool_bytes", spool.bytes as f64));
    samples.push(Sample::new(
        "vitals_agent_spool_dropped_batches_total",
        spool.dropped_total as f64,
    ));
    samples.push(Sample::new("vitals_agent_info", 1.0).label("version", vitals_common::VERSION));
    // Counts itself, so a reader can check a stored cycle is complete.
    let n = samples.len() + 1;
    samples.push(Sample::new("vitals_agent_cycle_samples", n as f64));
}
