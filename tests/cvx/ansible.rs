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

/// Two local hosts, each with a home, an install path, a manifest path and a unit dir of its own
/// under one temp dir, and the artifacts served from a loopback server.
struct Fleet {
    dir: TempDir,
    venv: PathBuf,
    server: Server,
}

impl Fleet {
    fn new() -> Fleet {
        let venv = venv();
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start();
        server.add("/simd/v1", GENESIS.to_vec(), Fault::None);
        server.add("/simd/v2", V2.to_vec(), Fault::None);
        server.add("/simd/v3", V3.to_vec(), Fault::None);
        let fleet = Fleet { dir, venv, server };
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
        for host in HOSTS {
            writeln!(
                ini,
                "{host} cvx_home={} cvx_install_path={} cvx_manifest_src={} cvx_manifest_path={} cvx_unit_dir={}",
                self.on(host, "home").display(),
                self.on(host, "bin/cvx").display(),
                self.path(&format!("controller/{host}.toml")).display(),
                self.on(host, "etc/cvx/testchain.toml").display(),
                self.on(host, "systemd").display(),
            )
            .unwrap();
        }
        write!(
            ini,
            "\n[cvx_nodes:vars]\nansible_connection=local\nansible_python_interpreter={}\nansible_become=false\n\
             cvx_binary_src={}\ncvx_run_as=\ncvx_user=cosmos\ncvx_manage_service=false\n",
            self.venv.join("bin/python").display(),
            self.path("controller/cvx").display(),
        )
        .unwrap();
        let path = self.path("inventory.ini");
        fs::write(&path, ini).unwrap();
        path
    }

    /// `ansible-playbook -i inventory.ini examples/ansible/site.yml [--check]`.
    fn play(&self, check: bool) -> Run {
        let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/ansible/site.yml");
        let mut cmd = Command::new(self.venv.join("bin/ansible-playbook"));
        cmd.arg("-i").arg(self.inventory()).arg(site);
        if check {
            cmd.arg("--check");
        }
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
    assert!(unit.lines().any(|l| l == exec), "{exec} not in\n{unit}");
    let env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|kv| {
            let (k, v) = kv.trim_matches('"').split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
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
        "upgrades/v3/bin/simd",
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
