#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use cvx::cli::{self, Cli};
use cvx::render::Colors;
use cvx::run::logs;

fn main() -> ExitCode {
    // `cvx run` hands its arguments to the daemon as they are, so it needs no parser; the
    // supervisor stays resident for months, and the parser's code and text would stay mapped.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|first| first == "run") {
        let mut daemon_args: Vec<_> = args.collect();
        // As with the parser: a first `--` only separates cvx's arguments from the daemon's.
        if daemon_args.first().is_some_and(|arg| arg == "--") {
            daemon_args.remove(0);
        }
        return finish(cli::run_supervisor(daemon_args));
    }
    let cli = Cli::parse();
    // `cvx run` configures its logs from Cosmovisor's variables; the simulated node prints its own.
    if !matches!(
        cli.command,
        cli::Command::Run(_) | cli::Command::Simnode { .. }
    ) {
        init_logging(cli.command.verbosity());
    }
    finish(cli::run(cli))
}

fn finish(result: Result<ExitCode, cli::Error>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(err) => {
            let colors = Colors(logs::colour_on_stderr());
            eprint!("{}", cli::report(&err, colors));
            err.exit_code()
        }
    }
}

/// Logs go to stderr; stdout is for the plan or the JSON document.
fn init_logging(verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-1 => "error",
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CVX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("cvx={level},{level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: CI logs and files get plain text.
        .with_ansi(logs::colour_on_stderr())
        .with_target(false);
    // The timestamps `cvx run` writes, so one host's logs read alike.
    match logs::time_format_from_env() {
        Some(layout) => builder.with_timer(logs::GoTime(layout)).init(),
        None => builder.without_time().init(),
    }
}
