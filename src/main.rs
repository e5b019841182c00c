use std::process::ExitCode;

use clap::Parser;
use cvx::cli::{self, Cli};
use cvx::render::Colors;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `cvx run` configures its logs from Cosmovisor's variables; the simulated node prints its own.
    if !matches!(
        cli.command,
        cli::Command::Run(_) | cli::Command::Simnode { .. }
    ) {
        init_logging(cli.command.verbosity());
    }
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            use std::io::IsTerminal;
            let colors =
                Colors(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none());
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
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: CI logs and files get plain text.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(false)
        .init();
}
