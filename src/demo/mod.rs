//! `cvx demo`: the whole flow rehearsed on this machine, offline, in a temp dir, in seconds.
//!
//! Four versioned builds of the simulated node (wrapper scripts around `cvx simnode`, packed as a
//! plain file, a tar.gz and a zip), served from a loopback HTTP server, pinned in a manifest; then
//! `cvx plan`, `cvx apply` (twice: the second changes nothing), and `cvx run` through two
//! governance upgrades and one scheduled upgrade (`trigger = "halt-height"`: no on-chain plan, cvx
//! halts the node itself), then the final tree and `cvx status`. Each step runs the real cvx
//! binary, as an operator would.
//!
//! Owns the rehearsal and the [`simnode`] test double (also `cvx simnode` and the `simnode` binary,
//! so `cargo run -- demo` needs nothing else). No stage may import it.

pub mod simnode;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::render::Colors;

const DAEMON: &str = "demod";
/// Heights of the two governance upgrades and the scheduled patch, and where the last build
/// stops the rehearsal.
const V2_HEIGHT: u64 = 10;
const V3_HEIGHT: u64 = 20;
const PATCH_HEIGHT: u64 = 25;
const END_HEIGHT: u64 = 30;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot {action}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("step `{step}` failed: {reason}")]
    Step { step: String, reason: String },
}

fn io(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
    let action = action.into();
    move |source| DemoError::Io { action, source }
}

/// Run the rehearsal. `keep` leaves the temp dir for inspection.
pub fn run(keep: bool) -> Result<(), DemoError> {
    let c = Colors(
        std::io::IsTerminal::is_terminal(&std::io::stdout())
            && std::env::var_os("NO_COLOR").is_none(),
    );
    let cvx = std::env::current_exe().map_err(io("find the cvx binary"))?;
    let dir = tempfile::Builder::new()
        .prefix("cvx-demo-")
        .tempdir()
        .map_err(io("create a temp dir"))?;
    let root = dir.path().to_path_buf();
    let home = root.join("home");
    let served = root.join("served");
    std::fs::create_dir_all(&served).map_err(io("create the served dir"))?;

    say(c, &format!("cvx demo: a rehearsal in {}", root.display()));
    let server = Server::start(&served)?;
    let manifest = write_artifacts_and_manifest(&cvx, &served, &root, &server.base)?;
    // The node's RPC, from which cvx learns that the node halted for the scheduled upgrade.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io("find a free port for the node's RPC"))?
        .port();
    std::fs::create_dir_all(home.join("config")).map_err(io("create the node's config dir"))?;
    std::fs::write(
        home.join("config/config.toml"),
        format!("[rpc]\nladdr = \"tcp://127.0.0.1:{port}\"\n"),
    )
    .map_err(io("write the node's config.toml"))?;
    println!(
        "{}",
        std::fs::read_to_string(&manifest).map_err(io("read the manifest back"))?
    );

    let m = manifest.display().to_string();
    let h = home.display().to_string();
    step(c, &cvx, &["plan", "-m", &m, "--home", &h], &[], None, 0)?;
    step(c, &cvx, &["apply", "-m", &m, "--home", &h], &[], None, 0)?;
    say(c, "Applying again changes nothing:");
    step(c, &cvx, &["apply", "-m", &m, "--home", &h], &[], None, 0)?;

    say(
        c,
        &format!(
            "Now the node runs under cvx run: governance halts it for v2 at height {V2_HEIGHT} and v3 at {V3_HEIGHT}; cvx itself halts it for the scheduled v3.0.1-patch at {PATCH_HEIGHT} (--halt-height); the last build stops at {END_HEIGHT}."
        ),
    );
    let env = [
        ("DAEMON_NAME", DAEMON.to_string()),
        ("DAEMON_HOME", h.clone()),
        ("DAEMON_SHUTDOWN_GRACE", "5s".to_string()),
        ("CVX_MANIFEST", m.clone()),
    ];
    // The simulated node writes upgrade-info.json in pieces, as x/upgrade does: cvx's notice
    // that it read a partial file is for debugging, not for the rehearsal's audience.
    let log = "cvx=info,cvx::run::watch=warn,warn";
    step(c, &cvx, &["run", "start", "--home", &h], &env, Some(log), 0)?;

    let current =
        std::fs::read_link(home.join("cosmovisor/current")).map_err(io("read the current link"))?;
    if current != Path::new("upgrades/v3.0.1-patch") {
        return Err(DemoError::Step {
            step: "cvx run".into(),
            reason: format!(
                "current points to {} instead of upgrades/v3.0.1-patch",
                current.display()
            ),
        });
    }
    say(c, "The tree after three upgrades:");
    print_tree(&home.join("cosmovisor"), 0);
    step(c, &cvx, &["status", "-m", &m, "--home", &h], &[], None, 0)?;
    say(
        c,
        "Rehearsal complete: three upgrades (two by governance, one scheduled) staged, verified and switched.",
    );
    if keep {
        let kept = dir.keep();
        say(c, &format!("Kept {} for inspection.", kept.display()));
    }
    Ok(())
}

fn say(c: Colors, text: &str) {
    println!("\n{}", c.bold(&format!("==> {text}")));
}

/// Run one cvx command as an operator would, showing it first; fail unless it exits `expect`.
/// `log` is a log filter (CVX_LOG) of the rehearsal's own, not shown.
fn step(
    c: Colors,
    cvx: &Path,
    args: &[&str],
    env: &[(&str, String)],
    log: Option<&str>,
    expect: i32,
) -> Result<(), DemoError> {
    let shown: Vec<String> = env
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(std::iter::once("cvx".to_string()))
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    println!("\n{} {}", c.green("$"), shown.join(" "));
    let _ = std::io::stdout().flush();
    let mut command = Command::new(cvx);
    // The rehearsal's settings only: none of the host's own node configuration leaks in.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if ["DAEMON_", "COSMOVISOR_", "UNSAFE_", "CVX_"]
            .iter()
            .any(|p| key.starts_with(p))
        {
            command.env_remove(key.as_ref());
        }
    }
    if let Some(filter) = log {
        command.env("CVX_LOG", filter);
    }
    let status = command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()
        .map_err(io(format!("run cvx {}", args.join(" "))))?;
    if status.code() == Some(expect) {
        Ok(())
    } else {
        Err(DemoError::Step {
            step: format!("cvx {}", args.join(" ")),
            reason: format!("{status} (expected exit {expect})"),
        })
    }
}

/// The four builds, their archives and the manifest that pins them.
fn write_artifacts_and_manifest(
    cvx: &Path,
    served: &Path,
    root: &Path,
    base: &str,
) -> Result<PathBuf, DemoError> {
    let schedule = format!("--sim-upgrade v2@{V2_HEIGHT} --sim-upgrade v3@{V3_HEIGHT}");
    let build = |version: &str, extra: &str| {
        format!(
            "#!/bin/sh\n# {DAEMON} {version}: the simulated node\nexec '{}' simnode --sim-version {version} --sim-block-time 100ms --sim-flush 200ms --sim-rpc --sim-chain-id demo-1 {schedule} {extra} \"$@\"\n",
            cvx.display()
        )
        .into_bytes()
    };
    let v1 = build("v1.0.0", "");
    let v2 = build("v2.0.0", "--sim-handlers v2");
    // v3 does not implement pre-upgrade (exit 1: cvx continues); the patch ends the rehearsal.
    let v3 = build("v3.0.0", "--sim-handlers v3 --sim-pre-upgrade-exit 1");
    let patch = build("v3.0.1", &format!("--sim-exit-at {END_HEIGHT} 0"));
    let library = b"a shared library the v2 build needs, staged into upgrades/v2/lib/\n".to_vec();

    let write = |name: &str, bytes: &[u8]| {
        std::fs::write(served.join(name), bytes).map_err(io(format!("write {name}")))
    };
    write("demod-v1.0.0-linux", &v1)?;
    write("demod-v2.0.0.tar.gz", &tar_gz(&v2).map_err(io("pack v2"))?)?;
    write("demod-v3.0.0.zip", &zip(&v3).map_err(io("pack v3"))?)?;
    write("demod-v3.0.1-linux", &patch)?;
    write("libdemo.so", &library)?;
    let sha = |name: &str| {
        crate::hash::sha256_file(&served.join(name))
            .map(|(sha, _)| sha)
            .map_err(io(format!("hash {name}")))
    };

    let platform = crate::platform::host_platform();
    let manifest = format!(
        r#"# Written by `cvx demo`: four builds of a simulated node, served from {base}.
[chain]
id = "demo-1"
daemon = "{DAEMON}"

[genesis]
version = "v1.0.0"
binary."{platform}" = {{ url = "{base}/demod-v1.0.0-linux", sha256 = "{v1}" }}

[[upgrade]]
name = "v2"
height = {V2_HEIGHT}
version = "v2.0.0"
binary."{platform}" = {{ url = "{base}/demod-v2.0.0.tar.gz", sha256 = "{v2}", path = "bin/{DAEMON}" }}
library."{platform}" = [ {{ url = "{base}/libdemo.so", sha256 = "{lib}" }} ]

[[upgrade]]
name = "v3"
height = {V3_HEIGHT}
version = "v3.0.0"
binary."{platform}" = {{ url = "{base}/demod-v3.0.0.zip", sha256 = "{v3}" }}

# A coordinated patch: no on-chain plan; cvx run halts the node at this height itself.
[[upgrade]]
name = "v3.0.1-patch"
height = {PATCH_HEIGHT}
version = "v3.0.1"
trigger = "halt-height"
binary."{platform}" = {{ url = "{base}/demod-v3.0.1-linux", sha256 = "{patch}" }}
"#,
        v1 = sha("demod-v1.0.0-linux")?,
        v2 = sha("demod-v2.0.0.tar.gz")?,
        lib = sha("libdemo.so")?,
        v3 = sha("demod-v3.0.0.zip")?,
        patch = sha("demod-v3.0.1-linux")?,
    );
    let path = root.join("cvx.toml");
    std::fs::write(&path, manifest).map_err(io("write the manifest"))?;
    Ok(path)
}

fn tar_gz(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_size(binary.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    tar.append_data(&mut header, format!("bin/{DAEMON}"), binary)?;
    let readme = b"demod v2.0.0\n";
    let mut header = tar::Header::new_gnu();
    header.set_size(readme.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "README", &readme[..])?;
    tar.into_inner()?.finish()
}

fn zip(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file(format!("bin/{DAEMON}"), options)
        .map_err(std::io::Error::other)?;
    zip.write_all(binary)?;
    Ok(zip.finish().map_err(std::io::Error::other)?.into_inner())
}

/// `tree`-like listing: links with their targets, files with their sizes; cvx's own dir summed up.
fn print_tree(dir: &Path, depth: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let indent = "    ".repeat(depth);
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&path).unwrap_or_default();
            println!("{indent}{name} -> {}", target.display());
        } else if meta.is_dir() && name == ".cvx" {
            println!("{indent}{name}/  (cvx's own: lock, receipts, partial downloads)");
        } else if meta.is_dir() {
            println!("{indent}{name}/");
            print_tree(&path, depth + 1);
        } else {
            println!("{indent}{name}  ({} bytes)", meta.len());
        }
    }
}

/// A static file server on loopback, for the rehearsal's downloads. Stops with the process.
struct Server {
    base: String,
}

impl Server {
    fn start(dir: &Path) -> Result<Server, DemoError> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(io("listen on 127.0.0.1"))?;
        let addr = listener
            .local_addr()
            .map_err(io("read the server's address"))?;
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &dir);
                });
            }
        });
        Ok(Server {
            base: format!("http://{addr}"),
        })
    }
}

fn serve(mut stream: TcpStream, dir: &Path) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if stream.read(&mut byte)? == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/");
    let name = path.trim_start_matches('/');
    // Only the flat files this demo wrote; nothing else on the machine.
    let body = (!name.is_empty() && !name.contains('/') && !name.contains(".."))
        .then(|| std::fs::read(dir.join(name)).ok())
        .flatten();
    match body {
        Some(body) => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            stream.write_all(&body)
        }
        None => stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    }
}
