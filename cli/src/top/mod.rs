//! `vitals top`: a live full-screen view of the fleet.
//!
//! Three parts: `model` (the queries and the per-node view built from their
//! answers, pure), `view` (selection, sort, keys and the drawing of a
//! frame), and here the I/O: a task that asks the collector every interval
//! over the same Query and Alerts clients the other commands use, a thread
//! that reads keys, and the terminal, which is given back (raw mode off,
//! alternate screen left) on every way out, a panic included.

pub mod model;
pub mod view;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ratatui::crossterm::event::{self, Event, KeyEvent, KeyEventKind};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use vitals_proto::v1::alerts_client::AlertsClient;
use vitals_proto::v1::query_client::QueryClient;
use vitals_proto::v1::{ListAlertsRequest, ListNodesRequest, QueryInstantRequest};

use self::model::{Answers, build, queries};
use self::view::{Action, App, Refresh};
use crate::client::{self, CliConfig};
use crate::commands::status_error;

/// The shortest refresh interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Parses `--interval` (a clap value parser: a bad one is a usage error).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 2s, 500ms): {e}"))?;
    if d < MIN_INTERVAL {
        return Err(format!(
            "at least {}",
            humantime::format_duration(MIN_INTERVAL)
        ));
    }
    Ok(d)
}

/// One refresh: the node list, every query of [`queries`] at one time, the
/// firing alerts. A query that fails is reported and leaves its part empty;
/// without the node list there is no fleet this time.
async fn fetch(q: &mut QueryClient<Channel>, a: &mut AlertsClient<Channel>) -> Refresh {
    let at_ms = vitals_common::now_ms();
    let mut errors = Vec::new();
    let nodes = match q.list_nodes(ListNodesRequest {}).await {
        Ok(r) => r.into_inner().nodes,
        Err(e) => {
            return Refresh {
                fleet: None,
                errors: vec![status_error(e).to_string()],
                at_ms,
            };
        }
    };
    let mut answers = Answers {
        nodes,
        ..Default::default()
    };
    for (ask, query) in queries() {
        match q
            .query_instant(QueryInstantRequest {
                query: query.clone(),
                time_ms: at_ms,
            })
            .await
        {
            Ok(r) => {
                answers.series.insert(ask, r.into_inner().series);
            }
            Err(e) => errors.push(format!("{query}: {}", status_error(e))),
        }
    }
    match a
        .list_alerts(ListAlertsRequest {
            state: "firing".into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => answers.alerts = r.into_inner().alerts,
        Err(e) => errors.push(format!("alerts: {}", status_error(e))),
    }
    Refresh {
        fleet: Some(build(&answers)),
        errors,
        at_ms,
    }
}

/// What the key thread hands over.
enum Input {
    Key(KeyEvent),
    Redraw,
    Failed(std::io::Error),
}

/// Reads terminal events until the receiver goes away.
fn read_keys(tx: mpsc::Sender<Input>) {
    loop {
        let input = match event::poll(Duration::from_millis(250)) {
            Ok(false) => {
                if tx.is_closed() {
                    return;
                }
                continue;
            }
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind != KeyEventKind::Release => Input::Key(k),
                Ok(Event::Resize(..)) => Input::Redraw,
                Ok(_) => continue,
                Err(e) => Input::Failed(e),
            },
            Err(e) => Input::Failed(e),
        };
        let failed = matches!(input, Input::Failed(_));
        if tx.blocking_send(input).is_err() || failed {
            return;
        }
    }
}

/// Gives the terminal back when dropped, however `run` ends.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// `vitals top [--interval D]`.
pub async fn run(cfg: &CliConfig, interval: Duration) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!(
            "vitals top needs a terminal; for scripts use `vitals nodes --json`, `vitals query ... --json` or `vitals alerts --json`"
        );
    }
    // Connect before taking the terminal, so that an error prints plainly.
    let channel = client::channel(cfg).await?;
    let mut q = client::query_client(channel.clone());
    let mut a = client::alerts_client(channel);
    let first = fetch(&mut q, &mut a).await;
    if first.fleet.is_none() {
        bail!("{}", first.errors.join("; "));
    }

    let (tx, mut refreshes) = watch::channel(first);
    let fetcher = tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let r = fetch(&mut q, &mut a).await;
            if tx.send(r).is_err() {
                return;
            }
        }
    });
    let (key_tx, mut keys) = mpsc::channel(64);
    std::thread::spawn(move || read_keys(key_tx));

    let _restore = Restore;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let mut app = App::new(interval);
    app.refreshed(refreshes.borrow_and_update().clone());
    let result = loop {
        if let Err(e) = terminal.draw(|f| view::render(&app, f)) {
            break Err(anyhow::Error::from(e).context("cannot draw"));
        }
        tokio::select! {
            changed = refreshes.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                app.refreshed(refreshes.borrow_and_update().clone());
            }
            input = keys.recv() => match input {
                Some(Input::Key(k)) => {
                    if app.key(k) == Action::Quit {
                        break Ok(());
                    }
                }
                Some(Input::Redraw) => {}
                Some(Input::Failed(e)) => break Err(anyhow::Error::from(e).context("cannot read the terminal")),
                None => break Ok(()),
            },
        }
    };
    fetcher.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_is_a_duration_of_at_least_200ms() {
        assert_eq!(parse_interval("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("100ms").is_err_and(|e| e.contains("at least 200ms")));
        assert!(parse_interval("soon").is_err());
    }
}
