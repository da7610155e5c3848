//! Code shared by the Vitals agent, collector and CLI.
//!
//! Kept small on purpose: config loading with operator-friendly errors, TLS
//! setup and certificate identities, the sample model, and label selectors.

pub mod config;
pub mod http_tls;
pub mod identity;
pub mod logging;
pub mod model;
pub mod notify;
pub mod selector;
pub mod signal;
pub mod tls;

/// Version of every Vitals binary, from the workspace manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// HTTP/2 receive windows of the operator CLI's gRPC connections. h2's
/// default 64 KiB window makes a multi-megabyte answer (a day of points for
/// a few series) wait a round trip for a window update every 64 KiB; a few
/// MiB lets it stream. Not on the collector's side: there the window
/// bounds what every agent stream may have in flight (memory per agent).
pub const H2_STREAM_WINDOW: u32 = 4 << 20;
pub const H2_CONNECTION_WINDOW: u32 = 8 << 20;

/// Exit code for bad configuration or bad command-line usage.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure at run time.
pub const EXIT_FAILURE: u8 = 1;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Prints `prog: error` followed by every cause in the chain, once.
pub fn report_error(prog: &str, err: &(dyn std::error::Error + 'static)) {
    let mut msg = format!("{prog}: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(&format!("\n  caused by: {text}"));
        }
        source = cause.source();
    }
    eprintln!("{msg}");
}
