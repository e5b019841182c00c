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
        .with_ansi(config.color_logs && colour_on_stderr())
        .with_target(false);
    let _ = match config.time_format {
        Some(layout) => builder.with_timer(GoTime(layout)).try_init(),
        None => builder.without_time().try_init(),
    };
}

/// Whether stderr is a terminal that wants colour (NO_COLOR unset): every command's logs and
/// errors decide colour this one way.
pub fn colour_on_stderr() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none()
}

/// The timestamp layout of every command's logs: `COSMOVISOR_TIMEFORMAT_LOGS` as `cvx run`
/// reads it (kitchen by default, none when empty), so `cvx apply` on a host logs as the node's
/// supervisor does. A value `cvx run` would refuse gives the default here.
pub fn time_format_from_env() -> Option<&'static str> {
    let default = Some(super::config::TIME_FORMATS[super::config::TIME_FORMATS.len() - 1].1);
    match std::env::var("COSMOVISOR_TIMEFORMAT_LOGS") {
        Err(_) => default,
        Ok(v) if v.is_empty() => None,
        Ok(v) => super::config::TIME_FORMATS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&v))
            .map_or(default, |(_, layout)| Some(*layout)),
    }
}

/// Timestamps in one of Go's layouts, UTC.
pub struct GoTime(pub &'static str);

impl FormatTime for GoTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        w.write_str(&crate::time::format_go(self.0, SystemTime::now()))
    }
}
