//! examples/ansible run by real ansible-playbook (ansible-core, installed into target/ansible-venv
//! by scripts/setup-ansible) against two local hosts with homes of their own: check mode writes
//! nothing, the first run changes both, the second changes nothing, and a wrong sha256 pin fails
//! its host with cvx's message while the other host converges.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use tempfile::TempDir;

use crate::ctx::{platform, sha256};
use crate::support::server::{Fault, Server};

const GENESIS: &[u8] = b"#!/bin/sh\necho v1.0.0\n";
const V2: &[u8] = b"#!/bin/sh\necho v2.0.0\n";
const V3: &[u8] = b"#!/bin/sh\necho v3.0.0\n";

const HOSTS: [&str; 2] = ["node-a", "node-b"];

/// target/ansible-venv (or `CVX_ANSIBLE_VENV`, as scripts/setup-ansible reads it).
fn venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var_os("CVX_ANSIBLE_VENV")
        .map_or_else(|| root.join("target/ansible-venv"), PathBuf::from);
    let venv = if venv.is_absolute() {
        venv
    } else {
        root.join(venv)
    };
    let playbook = venv.join("bin/ansible-playbook");
    assert!(
        playbook.is_file() && venv.join("bin/python").is_file(),
        "{} is missing: run scripts/setup-ansible (scripts/test does) to install ansible-core into {}",
        playbook.display(),
        venv.display()
    );
    venv
}

/// One `ansible-playbook` run: its exit code and its default-callback output.
struct Run {
    code: i32,
    out: String,
}

impl Run {
    /// The PLAY RECAP counters of `host` (ok, changed, failed, ...).
    fn recap(&self, host: &str) -> BTreeMap<String, u64> {
        let recap = self
            .out
            .split("PLAY RECAP")
            .nth(1)
            .unwrap_or_else(|| panic!("no PLAY RECAP\n{}", self.out));
        let line = recap
            .lines()
            .find(|l| l.split_whitespace().next() == Some(host))
            .unwrap_or_else(|| panic!("{host} is not in the recap\n{}", self.out));
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
            .collect()
    }

    /// How the role's task `name` ended on `host`: ok, changed, skipping, fatal.
    fn status(&self, name: &str, host: &str) -> &str {
        let header = format!("TASK [cvx : {name}]");
        let section = self
            .out
            .split(&header)
            .nth(1)
            .unwrap_or_else(|| panic!("no task {header}\n{}", self.out));
        let end = ["\nTASK [", "\nRUNNING HANDLER", "\nPLAY RECAP"]
            .iter()
            .filter_map(|m| section.find(m))
            .min()
            .unwrap_or(section.len());
        let tag = format!(": [{host}]");
        section[..end]
            .lines()
            .find_map(|l| l.find(&tag).map(|i| &l[..i]))
            .unwrap_or_else(|| panic!("{host} is not in {header}\n{}", self.out))
    }

    /// The `fatal: [host]: FAILED! => ...` line for `host`, if any.
    fn fatal(&self, host: &str) -> Option<&str> {
        let tag = format!("fatal: [{host}]");
        self.out.lines().find(|l| l.starts_with(&tag))
    }

    fn expect(&self, code: i32) {
        assert_eq!(
            self.code, code,
            "ansible-playbook exited {}\n{}",
            self.code, self.out
        );
    }
}

/// The node's user on the test hosts: uid and gid 65534 (`nobody`, which every Debian and Ubuntu
/// image has), given by number as systemd accepts it without its warning about `nobody`. The role
/// creates the homes for it, and cvx apply, run as root, gives it what it stages.
const NODE_UID: u32 = 65534;

/// Local hosts, each with a home, an install path, a manifest path and a unit dir of its own
/// under one temp dir, and the artifacts served from a loopback server.
struct Fleet {
    dir: TempDir,
    venv: PathBuf,
    server: Server,
    hosts: Vec<&'static str>,
    /// More `[cvx_nodes:vars]` lines.
    vars: Vec<String>,
}

impl Fleet {
    fn new() -> Fleet {
        Fleet::with(&HOSTS, &[])
    }

    fn with(hosts: &[&'static str], vars: &[&str]) -> Fleet {
        let venv = venv();
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start();
        server.add("/simd/v1", GENESIS.to_vec(), Fault::None);
        server.add("/simd/v2", V2.to_vec(), Fault::None);
        server.add("/simd/v3", V3.to_vec(), Fault::None);
        let fleet = Fleet {
            dir,
            venv,
            server,
            hosts: hosts.to_vec(),
            vars: vars.iter().map(|v| v.to_string()).collect(),
        };
        for sub in ["scratch", "ansible", "controller"] {
            fs::create_dir_all(fleet.path(sub)).unwrap();
        }
        // A snapshot of the cvx under test: a concurrent cargo build replacing the binary between
        // two runs would make the second copy task report a change.
        // Stripped where binutils are there: Ansible hashes and copies it per host and run.
        let cvx = fleet.path("controller/cvx");
        fs::copy(env!("CARGO_BIN_EXE_cvx"), &cvx).unwrap();
        let _ = Command::new("strip").arg(&cvx).status();
        // An empty config: no ansible.cfg of the machine or the user's applies.
        fs::write(fleet.path("ansible/ansible.cfg"), "").unwrap();
        fleet
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A path on `host`.
    fn on(&self, host: &str, rel: &str) -> PathBuf {
        self.path(host).join(rel)
    }

    fn cosmovisor(&self, host: &str, rel: &str) -> PathBuf {
        self.on(host, "home/cosmovisor").join(rel)
    }

    /// Write `host`'s manifest on the controller: genesis, then (name, url path, sha256) upgrades.
    fn manifest(&self, host: &str, upgrades: &[(&str, &str, String)]) {
        let p = platform();
        let mut text = format!(
            "[chain]\nid = \"testchain-1\"\ndaemon = \"simd\"\n\n[genesis]\nbinary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n",
            self.server.url("/simd/v1"),
            sha256(GENESIS)
        );
        for (name, path, sha) in upgrades {
            let url = self.server.url(path);
            write!(text, "\n[[upgrade]]\nname = \"{name}\"\nbinary.\"{p}\" = {{ url = \"{url}\", sha256 = \"{sha}\" }}\n").unwrap();
        }
        fs::write(self.path(&format!("controller/{host}.toml")), text).unwrap();
    }

    /// The inventory, in INI as operators write it (values in `:vars` are strings there).
    fn inventory(&self) -> PathBuf {
        let mut ini = String::from("[cvx_nodes]\n");
        for host in &self.hosts {
            writeln!(
                ini,
                "{host} cvx_home={} cvx_install_path={} cvx_manifest_src={} cvx_manifest_path={} cvx_unit_dir={} cvx_data_backup_dir={}",
                self.on(host, "home").display(),
                self.on(host, "bin/cvx").display(),
                self.path(&format!("controller/{host}.toml")).display(),
                self.on(host, "etc/cvx/testchain.toml").display(),
                self.on(host, "systemd").display(),
                self.on(host, "backups").display(),
            )
            .unwrap();
        }
        // cvx plan and apply run as root (no become), on homes the role creates for the node.
        write!(
            ini,
            "\n[cvx_nodes:vars]\nansible_connection=local\nansible_python_interpreter={}\nansible_become=false\n\
             cvx_binary_src={}\ncvx_run_as=\ncvx_user={NODE_UID}\ncvx_group={NODE_UID}\ncvx_manage_service=false\n",
            self.venv.join("bin/python").display(),
            self.path("controller/cvx").display(),
        )
        .unwrap();
        for var in &self.vars {
            writeln!(ini, "{var}").unwrap();
        }
        let path = self.path("inventory.ini");
        fs::write(&path, ini).unwrap();
        path
    }

    /// `ansible-playbook -i inventory.ini examples/ansible/site.yml [--check]`.
    fn play(&self, check: bool) -> Run {
        self.play_with(if check { &["--check"] } else { &[] }, &[])
    }

    /// `ansible-playbook -i inventory.ini examples/ansible/site.yml <args>`, with `env` added.
    fn play_with(&self, args: &[&str], env: &[(&str, std::ffi::OsString)]) -> Run {
        let check = args.contains(&"--check");
        let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ansible/site.yml");
        let mut cmd = Command::new(self.venv.join("bin/ansible-playbook"));
        cmd.arg("-i").arg(self.inventory()).arg(site).args(args);
        cmd.current_dir(self.dir.path());
        for (key, _) in std::env::vars() {
            if ["ANSIBLE_", "DAEMON_", "CVX_", "COSMOVISOR_"]
                .iter()
                .any(|p| key.starts_with(p))
            {
                cmd.env_remove(key);
            }
        }
        let ansible = self.path("ansible");
        cmd.env("ANSIBLE_CONFIG", ansible.join("ansible.cfg"))
            .env("ANSIBLE_HOME", &ansible)
            .env("ANSIBLE_LOCAL_TEMP", ansible.join("tmp"))
            .env("ANSIBLE_REMOTE_TEMP", ansible.join("remote-tmp"))
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_PIPELINING", "True")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            // Where check mode's scratch directory goes (the hosts' temporary directory).
            .env("TMPDIR", self.path("scratch"))
            .env("NO_COLOR", "1");
        for (key, value) in env {
            cmd.env(key, value);
        }
        let started = Instant::now();
        let out = cmd.output().unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        eprintln!(
            "ansible-playbook{} took {:?}",
            if check { " --check" } else { "" },
            started.elapsed()
        );
        Run {
            code: out.status.code().unwrap_or(-1),
            out: text,
        }
    }

    /// Nothing was written on `host`, and check mode's scratch directories are gone.
    fn assert_untouched(&self, host: &str, run: &Run) {
        assert!(
            !self.path(host).exists(),
            "check mode wrote under {host}\n{}",
            run.out
        );
        self.assert_no_scratch(run);
    }

    fn assert_no_scratch(&self, run: &Run) {
        let left: Vec<_> = fs::read_dir(self.path("scratch"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "check mode left {left:?}\n{}", run.out);
    }

    fn staged(&self, host: &str, rel: &str) -> Vec<u8> {
        fs::read(self.cosmovisor(host, rel)).unwrap_or_else(|e| panic!("{host}: {rel}: {e}"))
    }
}

fn owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

/// Paths under `root` (itself included, links not followed) the node's user does not own.
fn not_the_nodes(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        if owner(&path) != (NODE_UID, NODE_UID) {
            found.push(path.clone());
        }
        if fs::symlink_metadata(&path).unwrap().is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found
}

/// One word of a unit's line as systemd reads it: unquoted, `\\` and `\"` unescaped, `%%` one `%`
/// (and, with `exec`, `$$` one `$`).
fn unit_word(word: &str, exec: bool) -> String {
    let inner = match word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        Some(quoted) => quoted.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => word.to_owned(),
    };
    let inner = inner.replace("%%", "%");
    if exec {
        inner.replace("$$", "$")
    } else {
        inner
    }
}

/// The `Environment=` assignments of a unit, as systemd reads them.
fn unit_env(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| {
            let (k, v) = unit_word(kv, false)
                .split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .unwrap();
            (k, v)
        })
        .collect()
}

/// The unit the role templated for `host`: systemd accepts it, and its environment is one
/// `cvx run` accepts.
fn check_unit(fleet: &Fleet, host: &str) {
    let path = fleet.on(host, "systemd/simd.service");
    let unit = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let home = fleet.on(host, "home");
    let exec = format!(
        "ExecStart={} run start --home {}",
        fleet.on(host, "bin/cvx").display(),
        home.display()
    );
    assert!(
        unit.lines().any(|l| l.starts_with(&exec)),
        "{exec} not in\n{unit}"
    );
    let env = unit_env(&unit);
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("DAEMON_NAME"), Some("simd"), "{unit}");
    assert_eq!(get("DAEMON_HOME"), Some(home.to_str().unwrap()), "{unit}");
    let manifest = fleet.on(host, "etc/cvx/testchain.toml");
    assert_eq!(
        get("CVX_MANIFEST"),
        Some(manifest.to_str().unwrap()),
        "{unit}"
    );
    cvx::run::config::load(env.clone(), None)
        .expect("the unit's environment is a valid cvx run configuration");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is missing: scripts/test installs it (apt-get install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify {}:\n{stderr}\n{unit}",
        path.display()
    );
}

#[test]
fn role_converges_two_hosts_idempotently_and_fails_only_the_host_with_a_wrong_pin() {
    let fleet = Fleet::new();
    for host in HOSTS {
        fleet.manifest(host, &[("v2", "/simd/v2", sha256(V2))]);
    }

    // Check mode on fresh hosts: cvx apply --check says what would change; nothing is written.
    let run = fleet.play(true);
    run.expect(0);
    for host in HOSTS {
        assert_eq!(
            run.status("Run cvx apply", host),
            "changed",
            "{host}\n{}",
            run.out
        );
        assert_eq!(run.recap(host)["failed"], 0, "{}", run.out);
        fleet.assert_untouched(host, &run);
    }
    assert_eq!(
        fleet.server.hits("/simd/v1") + fleet.server.hits("/simd/v2"),
        0,
        "check mode downloads nothing"
    );

    // First run: cvx, the manifest, the tree and the unit are installed on both hosts.
    let run = fleet.play(false);
    run.expect(0);
    let cvx_bytes = fs::read(fleet.path("controller/cvx")).unwrap();
    for host in HOSTS {
        assert_eq!(
            run.status("Run cvx apply", host),
            "changed",
            "{host}\n{}",
            run.out
        );
        let recap = run.recap(host);
        assert!(
            recap["changed"] > 0 && recap["failed"] == 0,
            "{host}: {recap:?}\n{}",
            run.out
        );
        assert_eq!(fleet.staged(host, "genesis/bin/simd"), GENESIS);
        assert_eq!(fleet.staged(host, "upgrades/v2/bin/simd"), V2);
        // The role made the home and the backup directory for the node's user, and cvx apply,
        // run as root, left everything it staged to that user.
        for dir in ["home", "backups"] {
            assert_eq!(
                owner(&fleet.on(host, dir)),
                (NODE_UID, NODE_UID),
                "{host}: {dir}"
            );
        }
        assert_eq!(
            not_the_nodes(&fleet.on(host, "home")),
            Vec::<PathBuf>::new(),
            "{host}"
        );
        assert_eq!(
            fs::read_link(fleet.cosmovisor(host, "current")).unwrap(),
            Path::new("genesis")
        );
        let installed = fleet.on(host, "bin/cvx");
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            fs::read(&installed).unwrap() == cvx_bytes,
            "{host}: installed cvx differs"
        );
        assert_eq!(
            fs::read(fleet.on(host, "etc/cvx/testchain.toml")).unwrap(),
            fs::read(fleet.path(&format!("controller/{host}.toml"))).unwrap()
        );
        check_unit(&fleet, host);
    }

    // Second run: cvx says nothing changed, and so does every other task.
    let run = fleet.play(false);
    run.expect(0);
    for host in HOSTS {
        assert_eq!(
            run.status("Run cvx apply", host),
            "ok",
            "{host}\n{}",
            run.out
        );
        let recap = run.recap(host);
        assert_eq!(
            (recap["changed"], recap["failed"]),
            (0, 0),
            "{host}: {recap:?}\n{}",
            run.out
        );
    }

    // Check mode on converged hosts: nothing would change.
    let run = fleet.play(true);
    run.expect(0);
    for host in HOSTS {
        assert_eq!(
            run.status("Run cvx apply", host),
            "ok",
            "{host}\n{}",
            run.out
        );
        assert_eq!(run.recap(host)["changed"], 0, "{host}\n{}", run.out);
    }
    fleet.assert_no_scratch(&run);

    // A new upgrade: pinned right for node-a, wrong for node-b.
    let wrong = sha256(b"not what the server serves");
    fleet.manifest(
        "node-a",
        &[
            ("v2", "/simd/v2", sha256(V2)),
            ("v3", "/simd/v3", sha256(V3)),
        ],
    );
    fleet.manifest(
        "node-b",
        &[
            ("v2", "/simd/v2", sha256(V2)),
            ("v3", "/simd/v3", wrong.clone()),
        ],
    );
    let placed: Vec<Vec<u8>> = HOSTS
        .iter()
        .map(|h| fs::read(fleet.on(h, "etc/cvx/testchain.toml")).unwrap())
        .collect();

    // Check mode judges the new manifests (which are not installed) and writes nothing.
    let run = fleet.play(true);
    run.expect(0);
    for (host, before) in HOSTS.iter().zip(&placed) {
        assert_eq!(
            run.status("Run cvx apply", host),
            "changed",
            "{host}\n{}",
            run.out
        );
        assert!(
            run.out.contains("upgrades/v3/bin/simd: would_change"),
            "{}",
            run.out
        );
        assert!(
            !fleet.cosmovisor(host, "upgrades/v3").exists(),
            "{host}: check mode staged v3"
        );
        assert_eq!(
            &fs::read(fleet.on(host, "etc/cvx/testchain.toml")).unwrap(),
            before,
            "{host}: check mode replaced the manifest"
        );
    }
    fleet.assert_no_scratch(&run);
    assert_eq!(
        fleet.server.hits("/simd/v3"),
        0,
        "check mode downloads nothing"
    );

    // The real run: node-a converges, node-b fails with cvx's own words; ansible-playbook exits 2.
    let run = fleet.play(false);
    run.expect(2);
    let a = run.recap("node-a");
    assert!(
        a["failed"] == 0 && a["changed"] > 0,
        "node-a: {a:?}\n{}",
        run.out
    );
    assert!(run.fatal("node-a").is_none(), "{}", run.out);
    assert_eq!(fleet.staged("node-a", "upgrades/v3/bin/simd"), V3);

    assert_eq!(run.recap("node-b")["failed"], 1, "{}", run.out);
    let fatal = run
        .fatal("node-b")
        .unwrap_or_else(|| panic!("no failure for node-b\n{}", run.out));
    for needle in [
        "cvx apply failed on node-b",
        // The failed artifact, and the manifest line that pins it.
        "upgrades/v3/bin/simd (manifest line 14):",
        "checksum mismatch",
        &fleet.server.url("/simd/v3"),
        &format!("expected sha256 {wrong}"),
        &format!("got {}", sha256(V3)),
    ] {
        assert!(
            fatal.contains(needle),
            "{needle:?} not in node-b's failure:\n{fatal}"
        );
    }
    assert_eq!(
        run.status("Fail with what cvx apply could not stage", "node-a"),
        "skipping",
        "{}",
        run.out
    );
    assert!(
        !fleet.cosmovisor("node-b", "upgrades/v3").exists(),
        "node-b staged unverified bytes"
    );
    assert_eq!(
        fleet.staged("node-b", "upgrades/v2/bin/simd"),
        V2,
        "node-b keeps what it had"
    );
}

/// `systemctl` for a machine without systemd running (a container): units live as state files
/// under `$FAKE_SYSTEMD` (`<unit>.active`, `<unit>.enabled`), a unit exists when it has state or a
/// unit file in `$FAKE_UNIT_DIR`, and every call is logged to `$FAKE_SYSTEMD/log`. It answers
/// the calls Ansible's systemd_service module and the role make, as systemd would.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
state="$FAKE_SYSTEMD"
echo "$*" >> "$state/log"
exists() { [ -e "$state/$1.active" ] || [ -e "$FAKE_UNIT_DIR/$1" ]; }
active() { cat "$state/$1.active" 2>/dev/null || echo inactive; }
enabled() { cat "$state/$1.enabled" 2>/dev/null || echo disabled; }
case "$1" in
  daemon-reload) ;;
  show)
    shift
    property=""
    while [ $# -gt 1 ]; do
      case "$1" in --property=*) property="${1#--property=}" ;; esac
      shift
    done
    if exists "$1"; then load=loaded; else load=not-found; fi
    if [ "$property" = LoadState ]; then echo "$load"; exit 0; fi
    printf 'Id=%s\nLoadState=%s\nActiveState=%s\nUnitFileState=%s\n' "$1" "$load" "$(active "$1")" "$(enabled "$1")"
    ;;
  is-enabled) e=$(enabled "$2"); echo "$e"; [ "$e" = enabled ] ;;
  is-active) a=$(active "$2"); echo "$a"; [ "$a" = active ] ;;
  list-unit-files) exists "$2" ;;
  start) echo active > "$state/$2.active" ;;
  stop) echo inactive > "$state/$2.active" ;;
  enable) echo enabled > "$state/$2.enabled" ;;
  disable) echo disabled > "$state/$2.enabled" ;;
  *) echo "systemctl (test stand-in): $* is not known here" >&2; exit 1 ;;
esac
"#;

#[test]
fn the_role_takes_over_from_cosmovisor_quotes_the_unit_and_shows_its_diffs() {
    let fleet = Fleet::with(
        &["node-c"],
        &[
            "cvx_manage_service=true",
            "cvx_on_failure=notify-failure@%n.service",
        ],
    );
    let host = "node-c";
    fleet.manifest(host, &[("v2", "/simd/v2", sha256(V2))]);
    // Arguments and environment values systemd would split or expand unless quoted.
    let vars = fleet.path("vars.json");
    fs::write(
        &vars,
        serde_json::json!({
            "cvx_daemon_args": ["--moniker=my node", "--log_format=%v", "$HOME"],
            "cvx_service_env": {"NOTE": "a \"quoted\" 100% value"},
        })
        .to_string(),
    )
    .unwrap();
    let extra = format!("@{}", vars.display());

    // The host: Cosmovisor runs the node, enabled at boot; no systemd, so systemctl is the
    // stand-in above, first on PATH.
    let state = fleet.path("systemd-state");
    let bin = fleet.path("fake-bin");
    for dir in [&state, &bin, &fleet.on(host, "systemd")] {
        fs::create_dir_all(dir).unwrap();
    }
    fs::write(state.join("cosmovisor.service.active"), "active\n").unwrap();
    fs::write(state.join("cosmovisor.service.enabled"), "enabled\n").unwrap();
    let systemctl = bin.join("systemctl");
    fs::write(&systemctl, FAKE_SYSTEMCTL).unwrap();
    fs::set_permissions(&systemctl, fs::Permissions::from_mode(0o755)).unwrap();
    // The OnFailure= unit, for systemd-analyze to find beside the node's.
    fs::write(
        fleet.on(host, "systemd/notify-failure@.service"),
        "[Unit]\nDescription=tell someone %i failed\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
    )
    .unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut search = std::ffi::OsString::from(bin.as_os_str());
    search.push(":");
    search.push(path);
    let env = [
        ("PATH", search),
        ("FAKE_SYSTEMD", state.clone().into_os_string()),
        ("FAKE_UNIT_DIR", fleet.on(host, "systemd").into_os_string()),
    ];
    let log = || fs::read_to_string(state.join("log")).unwrap_or_default();
    let unit_state = |unit: &str| {
        ["active", "enabled"].map(|what| {
            fs::read_to_string(state.join(format!("{unit}.{what}")))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
    };

    // Check mode: the diffs of what would be written; Cosmovisor keeps running.
    let run = fleet.play_with(&["--check", "--diff", "-e", &extra], &env);
    run.expect(0);
    assert_eq!(
        run.status("Stop and disable the Cosmovisor unit", host),
        "changed",
        "{}",
        run.out
    );
    assert_eq!(
        unit_state("cosmovisor.service"),
        ["active", "enabled"],
        "{}",
        log()
    );
    assert!(
        !fleet.on(host, "home").exists(),
        "check mode made the home\n{}",
        run.out
    );
    for needle in [
        "+++ after: ",
        "+daemon = \"simd\"",
        "+ExecStart=",
        "+StartLimitBurst=5",
    ] {
        assert!(
            run.out.contains(needle),
            "{needle:?} not in the diffs\n{}",
            run.out
        );
    }

    // The real run: Cosmovisor stopped and disabled, then cvx's unit enabled and started.
    let run = fleet.play_with(&["-e", &extra], &env);
    run.expect(0);
    assert_eq!(unit_state("cosmovisor.service"), ["inactive", "disabled"]);
    assert_eq!(unit_state("simd.service"), ["active", "enabled"]);
    let calls = log();
    let at = |call: &str| {
        calls
            .lines()
            .position(|l| l == call)
            .unwrap_or_else(|| panic!("no `systemctl {call}` in:\n{calls}"))
    };
    assert!(
        at("stop cosmovisor.service").max(at("disable cosmovisor.service"))
            < at("enable simd.service").min(at("start simd.service")),
        "Cosmovisor must be stopped before cvx's unit starts:\n{calls}"
    );
    assert_eq!(owner(&fleet.on(host, "home")), (NODE_UID, NODE_UID));
    assert_eq!(owner(&fleet.on(host, "backups")), (NODE_UID, NODE_UID));

    // The unit: quoted as systemd reads it, accepted by systemd-analyze, a restart limit and the
    // OnFailure= unit.
    check_unit(&fleet, host);
    let unit = fs::read_to_string(fleet.on(host, "systemd/simd.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert!(
        exec.ends_with(r#" "--moniker=my node" --log_format=%%v $$HOME"#),
        "{exec}"
    );
    assert!(
        unit.lines()
            .any(|l| l == r#"Environment="NOTE=a \"quoted\" 100%% value""#),
        "{unit}"
    );
    assert_eq!(
        unit_env(&unit).iter().find(|(k, _)| k == "NOTE").unwrap().1,
        "a \"quoted\" 100% value"
    );
    for line in [
        "StartLimitIntervalSec=600",
        "StartLimitBurst=5",
        "OnFailure=notify-failure@%n.service",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line} not in\n{unit}");
    }

    // Again: Cosmovisor stays stopped, nothing changes.
    let run = fleet.play_with(&["-e", &extra], &env);
    run.expect(0);
    assert_eq!(run.recap(host)["changed"], 0, "{}", run.out);
}
