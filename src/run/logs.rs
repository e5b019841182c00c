//! The supervisor's logs, as Cosmovisor's variables ask: off, coloured or not, with timestamps in
//! one of Go's named layouts (UTC, formatted by `crate::time`).

use std::time::SystemTime;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

use super::config::Config;

/// Install the global subscriber for `cvx run`. `verbose` adds debug logs.
pub fn init(config: &Config, verbose: bool) {
    let level = if !config.logs {
        "off"
    } else if verbose {
        "debug"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CVX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("cvx={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only where someone sees it: a terminal, not the journal or a CI log.
        .with_ansi(config.color_logs && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match config.time_format {
        Some(layout) => builder.with_timer(GoTime(layout)).try_init(),
        None => builder.without_time().try_init(),
    };
}

struct GoTime(&'static str);

impl FormatTime for GoTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        w.write_str(&crate::time::format_go(self.0, SystemTime::now()))
    }
}
