//! The daemon as a child process, and the signals cvx forwards to it.
//!
//! Signal policy:
//! - TERM, INT, QUIT and HUP sent to cvx are forwarded, as the same signal, to the daemon. cvx then
//!   waits for the daemon and exits with its code (128+N if signal N killed it). Further signals
//!   are forwarded too; no upgrade starts once a signal has arrived.
//! - Off a terminal (systemd), the daemon runs in a process group of its own and signals go to the
//!   whole group, so nothing it started is left orphaned.
//! - On a terminal, the daemon stays in cvx's foreground process group: it can read the terminal
//!   (a passphrase prompt) instead of being stopped by SIGTTIN, and Ctrl-C reaches it directly.
//!   Signals cvx forwards then go to the daemon's own PID.
//! - A signal during the upgrade steps (the daemon already stopped) is handled in `super`: the
//!   step in progress ends promptly, cleans up, and cvx exits 128+N with `current` unchanged.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// The running daemon.
pub struct Daemon {
    child: tokio::process::Child,
    pid: Pid,
    /// Whether the daemon leads a process group of its own (not on a terminal).
    grouped: bool,
}

impl Daemon {
    pub fn launch(
        path: &Path,
        args: &[OsString],
        library_path: OsString,
        terminal: bool,
    ) -> std::io::Result<Self> {
        let mut command = tokio::process::Command::new(path);
        command
            .args(args)
            .env("LD_LIBRARY_PATH", library_path)
            .kill_on_drop(true);
        if !terminal {
            command.process_group(0);
        }
        let child = command.spawn()?;
        let pid = child
            .id()
            .and_then(|id| Pid::from_raw(id as i32))
            .ok_or_else(|| std::io::Error::other("the daemon exited before it could be watched"))?;
        info!(
            pid = pid.as_raw_nonzero().get(),
            "started {}",
            path.display()
        );
        super::metrics::handle().daemon_started();
        Ok(Daemon {
            child,
            pid,
            grouped: !terminal,
        })
    }

    pub fn signal(&self, sig: Signal) {
        let sent = if self.grouped {
            rustix::process::kill_process_group(self.pid, sig)
        } else {
            rustix::process::kill_process(self.pid, sig)
        };
        if let Err(e) = sent
            && e != rustix::io::Errno::SRCH
        {
            warn!("cannot send {sig:?} to the daemon: {e}");
        }
    }

    pub async fn wait(&mut self) -> ExitStatus {
        let status = match self.child.wait().await {
            Ok(status) => status,
            Err(e) => {
                warn!("lost track of the daemon: {e}");
                ExitStatus::from_raw(1 << 8)
            }
        };
        super::metrics::handle().daemon_exited();
        status
    }

    /// SIGTERM, up to `grace`, then SIGKILL; without a grace, SIGKILL at once.
    pub async fn stop(&mut self, grace: Option<Duration>) -> ExitStatus {
        let status = match grace {
            Some(grace) => {
                self.signal(Signal::TERM);
                match tokio::time::timeout(grace, self.wait()).await {
                    Ok(status) => status,
                    Err(_) => {
                        warn!(
                            "the daemon did not exit within DAEMON_SHUTDOWN_GRACE {}; killing it",
                            crate::duration::show(grace)
                        );
                        self.signal(Signal::KILL);
                        self.wait().await
                    }
                }
            }
            None => {
                self.signal(Signal::KILL);
                self.wait().await
            }
        };
        // Whatever the daemon left in its group goes with it.
        if self.grouped {
            self.signal(Signal::KILL);
        }
        status
    }
}

/// A process's exit status as an exit code.
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => 1,
    }
}

/// The exit code of a process ended by `sig`, as shells report it.
pub fn signalled(sig: Signal) -> u8 {
    128u8.wrapping_add(sig.as_raw() as u8)
}

/// The signals cvx forwards.
pub struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        let kinds = [
            (Signal::TERM, SignalKind::terminate()),
            (Signal::INT, SignalKind::interrupt()),
            (Signal::QUIT, SignalKind::quit()),
            (Signal::HUP, SignalKind::hangup()),
        ];
        let streams = kinds
            .into_iter()
            .map(|(sig, kind)| signal(kind).map(|s| (sig, s)))
            .collect::<Result<_, _>>()?;
        Ok(Signals { streams })
    }

    /// The next signal to arrive.
    pub async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (sig, stream) in self.streams.iter_mut() {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}
