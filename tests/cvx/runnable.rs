//! Will it run here: the ELF checks on real ELF files (from the build, from the system, compiled
//! here with `cc`) and on crafted ones (another machine, a missing library, a glibc from the
//! future), the `version` check on scripts (only with `plan --run-version`, and in apply, with a
//! cleared environment), and `apply --strict`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::ctx::{Ctx, platform, run, sha256};

/// A stage of the manifest: its binary's bytes (staged 0755 unless `mode` says otherwise), its
/// declared version, its libraries.
struct Stage<'a> {
    name: &'a str,
    bytes: Vec<u8>,
    version: Option<&'a str>,
    libs: Vec<(&'a str, Vec<u8>)>,
    /// Stage the files in the tree before planning (else apply fetches them).
    staged: bool,
    mode: u32,
}

impl<'a> Stage<'a> {
    fn new(name: &'a str, bytes: impl Into<Vec<u8>>) -> Self {
        Stage {
            name,
            bytes: bytes.into(),
            version: None,
            libs: Vec::new(),
            staged: true,
            mode: 0o755,
        }
    }
    fn version(mut self, version: &'a str) -> Self {
        self.version = Some(version);
        self
    }
    fn lib(mut self, name: &'a str, bytes: Vec<u8>) -> Self {
        self.libs.push((name, bytes));
        self
    }
    fn unstaged(mut self) -> Self {
        self.staged = false;
        self
    }
    fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
    fn dir(&self) -> String {
        if self.name == "genesis" {
            "genesis".into()
        } else {
            format!("upgrades/{}", self.name)
        }
    }
}

/// Write each artifact under `dist/` (its absolute path is its URL, so apply can fetch it), pin
/// it in `cvx.toml` for this host (and `extra_platform`, same bytes), and stage what is staged.
fn setup(ctx: &Ctx, stages: &[Stage], extra_platform: Option<&str>) {
    let mut text = "[chain]\nid = \"runnable-1\"\ndaemon = \"simd\"\n".to_string();
    if let Some(other) = extra_platform {
        text.push_str(&format!("platforms = [\"{}\", \"{other}\"]\n", platform()));
    }
    for (i, stage) in stages.iter().enumerate() {
        let dist = ctx.path(&format!("dist/{}", stage.name));
        fs::create_dir_all(&dist).unwrap();
        let bin = dist.join("simd");
        fs::write(&bin, &stage.bytes).unwrap();
        if stage.name == "genesis" {
            text.push_str("\n[genesis]\n");
        } else {
            text.push_str(&format!(
                "\n[[upgrade]]\nname = \"{}\"\nheight = {}\n",
                stage.name,
                i * 100
            ));
        }
        if let Some(v) = stage.version {
            text.push_str(&format!("version = \"{v}\"\n"));
        }
        let pin = |path: &Path, bytes: &[u8]| {
            format!(
                "{{ url = \"{}\", sha256 = \"{}\" }}",
                path.display(),
                sha256(bytes)
            )
        };
        for p in std::iter::once(platform()).chain(extra_platform.map(String::from)) {
            text.push_str(&format!("binary.\"{p}\" = {}\n", pin(&bin, &stage.bytes)));
            if !stage.libs.is_empty() {
                let libs: Vec<String> = stage
                    .libs
                    .iter()
                    .map(|(name, bytes)| {
                        let path = dist.join(name);
                        fs::write(&path, bytes).unwrap();
                        pin(&path, bytes)
                    })
                    .collect();
                text.push_str(&format!("library.\"{p}\" = [ {} ]\n", libs.join(", ")));
            }
        }
        if stage.staged {
            let staged = ctx.stage(&format!("{}/bin/simd", stage.dir()), &stage.bytes);
            fs::set_permissions(&staged, fs::Permissions::from_mode(stage.mode)).unwrap();
            for (name, bytes) in &stage.libs {
                ctx.stage(&format!("{}/lib/{name}", stage.dir()), bytes);
            }
        }
    }
    ctx.manifest(&text);
}

/// `cvx plan --json --run-version`: every check, `version` included.
fn plan_json(ctx: &Ctx) -> Value {
    let (stdout, _) = run(ctx.plan().args(["--json", "--run-version"]), 0);
    serde_json::from_str(&stdout).unwrap()
}

/// The findings on one binary, as (check, message).
fn findings(plan: &Value, destination: &str) -> Vec<(String, String)> {
    let Some(checks) = plan.get("runnable") else {
        return Vec::new();
    };
    checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["destination"] == destination)
        .flat_map(|c| c["findings"].as_array().unwrap().clone())
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_string(),
                f["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn checks_of(plan: &Value, destination: &str) -> Vec<String> {
    findings(plan, destination)
        .into_iter()
        .map(|(check, _)| check)
        .collect()
}

/// Compile with the system's C compiler in `dir`; a missing `cc` fails the test, loudly.
fn cc(dir: &Path, args: &[&str]) {
    let out = StdCommand::new("cc")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "these tests compile C programs with `cc`, which cannot be run ({e}): install gcc"
            )
        });
    assert!(
        out.status.success(),
        "cc {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Real ELF files compiled here: `libcvxtest.so`, a program linked against it (`prog`, which
/// prints what the library says, a line of its own and `v1.2.3`, when given an argument), and a
/// static program (`static`, printing `v1.2.3` too).
struct Compiled {
    lib: Vec<u8>,
    prog: Vec<u8>,
    static_prog: Vec<u8>,
}

fn compile(ctx: &Ctx) -> Compiled {
    let dir = ctx.path("c");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("lib.c"),
        // It calls into libc, so it needs a GLIBC_x.y version of its own.
        "#include <stdio.h>\nconst char *cvxtest_version(void) { puts(\"(libcvxtest loaded)\"); return \"v1.2.3\"; }\n",
    )
    .unwrap();
    fs::write(
        dir.join("prog.c"),
        "#include <stdio.h>\nconst char *cvxtest_version(void);\nint main(int argc, char **argv) { (void)argv; if (argc > 1) puts(cvxtest_version()); return 0; }\n",
    )
    .unwrap();
    fs::write(
        dir.join("static.c"),
        "#include <stdio.h>\nint main(void) { puts(\"v1.2.3\"); return 0; }\n",
    )
    .unwrap();
    cc(&dir, &["-shared", "-fPIC", "-o", "libcvxtest.so", "lib.c"]);
    cc(&dir, &["-o", "prog", "prog.c", "-L.", "-lcvxtest"]);
    cc(&dir, &["-static", "-o", "static", "static.c"]);
    Compiled {
        lib: fs::read(dir.join("libcvxtest.so")).unwrap(),
        prog: fs::read(dir.join("prog")).unwrap(),
        static_prog: fs::read(dir.join("static")).unwrap(),
    }
}

/// `e_machine` of an ELF of another architecture than the host's.
fn foreign_machine() -> (u16, &'static str) {
    if std::env::consts::ARCH == "aarch64" {
        (62, "x86-64")
    } else {
        (183, "AArch64")
    }
}

/// A real little-endian ELF with its `e_machine` (bytes 18..20) replaced.
fn with_machine(mut elf: Vec<u8>, machine: u16) -> Vec<u8> {
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[5], 1, "a little-endian ELF");
    elf[18..20].copy_from_slice(&machine.to_le_bytes());
    elf
}

/// A real ELF whose every `GLIBC_2.x` version name (in `.dynstr`, where the version needs point)
/// says `GLIBC_9.x` instead: same length, so every offset stays valid; only the hash in each
/// `vna_hash` no longer matches, and the check reads the name, as a person would.
fn glibc_from_the_future(mut elf: Vec<u8>) -> Vec<u8> {
    let needle = b"GLIBC_2.";
    let mut patched = 0;
    let mut i = 0;
    while i + needle.len() < elf.len() {
        if &elf[i..i + needle.len()] == needle && elf[i + needle.len()].is_ascii_digit() {
            elf[i + 6] = b'9';
            patched += 1;
        }
        i += 1;
    }
    assert!(patched > 0, "no GLIBC_2.x version name in the program");
    elf
}

fn simnode() -> Vec<u8> {
    fs::read(env!("CARGO_BIN_EXE_simnode")).unwrap()
}

#[test]
fn a_real_elf_from_the_build_runs_here() {
    let ctx = Ctx::new();
    // simnode: a Rust binary of this build, dynamically linked against the host's glibc; its
    // `version` prints v0.0.0-simnode.
    setup(
        &ctx,
        &[Stage::new("genesis", simnode()).version("v0.0.0-simnode")],
        None,
    );
    let plan = plan_json(&ctx);
    assert_eq!(plan["upgrades"][0]["artifacts"][0]["state"], "ok");
    assert!(plan.get("runnable").is_none(), "{:#}", plan["runnable"]);
    let (human, _) = run(ctx.plan().arg("--run-version"), 0);
    assert!(!human.contains("warning:"), "{human}");

    // The same binary declaring another version: it ran, and said otherwise.
    setup(
        &ctx,
        &[Stage::new("genesis", simnode()).version("v9.9.9")],
        None,
    );
    let plan = plan_json(&ctx);
    let found = findings(&plan, "genesis/bin/simd");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "version");
    assert!(
        found[0].1.contains("\"v0.0.0-simnode\"") && found[0].1.contains("v9.9.9"),
        "{found:?}"
    );
}

#[test]
fn a_binary_for_another_architecture() {
    let ctx = Ctx::new();
    let (machine, name) = foreign_machine();
    let real = fs::read("/bin/true").unwrap();
    let other = if platform().ends_with("/arm64") {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    setup(
        &ctx,
        &[
            Stage::new("genesis", real.clone()),
            // Its version is declared, but a binary for another machine is not run.
            Stage::new("v2", with_machine(real, machine)).version("v2.0.0"),
        ],
        Some(other),
    );
    let plan = plan_json(&ctx);
    assert!(findings(&plan, "genesis/bin/simd").is_empty(), "{plan:#}");
    let found = findings(&plan, "upgrades/v2/bin/simd");
    assert_eq!(
        checks_of(&plan, "upgrades/v2/bin/simd"),
        ["arch"],
        "{found:?}"
    );
    assert!(
        found[0].1.starts_with(&format!("built for {name}")),
        "{found:?}"
    );

    let (human, _) = run(&mut ctx.plan(), 0);
    assert!(
        human.contains(&format!(
            "warning: upgrades/v2/bin/simd (arch): built for {name}"
        )),
        "{human}"
    );
    // A plan for another platform runs nothing: the checks are about this host.
    let (stdout, _) = run(ctx.plan().args(["--json", "--platform", other]), 0);
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    assert!(plan.get("runnable").is_none(), "{plan:#}");
}

#[test]
fn libraries_from_the_upgrade_or_the_system() {
    let ctx = Ctx::new();
    let c = compile(&ctx);
    // Without its library: the loader would refuse to start it.
    setup(
        &ctx,
        &[
            Stage::new("genesis", c.static_prog.clone()).version("v1.2.3"),
            Stage::new("v2", c.prog.clone()).version("v2.0.0"),
        ],
        None,
    );
    let plan = plan_json(&ctx);
    let found = findings(&plan, "upgrades/v2/bin/simd");
    assert_eq!(
        checks_of(&plan, "upgrades/v2/bin/simd"),
        ["libraries"],
        "{found:?}"
    );
    assert!(
        found[0]
            .1
            .starts_with("needs libcvxtest.so, found neither in "),
        "{found:?}"
    );
    assert!(found[0].1.contains("upgrades/v2/lib"), "{found:?}");
    // A static binary needs nothing; its version is checked.
    assert!(findings(&plan, "genesis/bin/simd").is_empty(), "{plan:#}");

    // With the library in the upgrade's lib/: found, and `version` runs with it on
    // LD_LIBRARY_PATH (the program prints what the library returns).
    let ctx = Ctx::new();
    setup(
        &ctx,
        &[
            Stage::new("genesis", c.static_prog.clone()),
            Stage::new("v2", c.prog.clone())
                .version("v1.2.3")
                .lib("libcvxtest.so", c.lib.clone()),
        ],
        None,
    );
    let plan = plan_json(&ctx);
    assert!(plan.get("runnable").is_none(), "{:#}", plan["runnable"]);

    // The library staged, but built for another machine: the loader skips it.
    let (machine, name) = foreign_machine();
    let ctx = Ctx::new();
    setup(
        &ctx,
        &[
            Stage::new("genesis", c.prog.clone())
                .lib("libcvxtest.so", with_machine(c.lib, machine)),
        ],
        None,
    );
    let plan = plan_json(&ctx);
    let found = findings(&plan, "genesis/bin/simd");
    assert_eq!(
        checks_of(&plan, "genesis/bin/simd"),
        ["libraries"],
        "{found:?}"
    );
    assert!(
        found[0].1.contains("libcvxtest.so") && found[0].1.contains(&format!("built for {name}")),
        "{found:?}"
    );
}

#[test]
fn a_glibc_newer_than_the_hosts() {
    let ctx = Ctx::new();
    let c = compile(&ctx);
    setup(
        &ctx,
        &[Stage::new("genesis", glibc_from_the_future(c.prog))
            .version("v1.2.3")
            .lib("libcvxtest.so", c.lib)],
        None,
    );
    let plan = plan_json(&ctx);
    let found = findings(&plan, "genesis/bin/simd");
    assert_eq!(checks_of(&plan, "genesis/bin/simd"), ["glibc"], "{found:?}");
    assert!(
        found[0].1.starts_with("needs GLIBC_9.") && found[0].1.contains("this host's glibc is 2."),
        "{found:?}"
    );

    // The same for a library the upgrade ships (libwasmvm's usual failure): its needs are the
    // upgrade's too.
    let ctx = Ctx::new();
    let c = compile(&ctx);
    setup(
        &ctx,
        &[Stage::new("genesis", c.prog)
            .version("v1.2.3")
            .lib("libcvxtest.so", glibc_from_the_future(c.lib))],
        None,
    );
    let plan = plan_json(&ctx);
    let found = findings(&plan, "genesis/bin/simd");
    assert_eq!(checks_of(&plan, "genesis/bin/simd"), ["glibc"], "{found:?}");
    assert!(
        found[0]
            .1
            .starts_with("libcvxtest.so (in lib/) needs GLIBC_9."),
        "{found:?}"
    );
}

/// Whether a process is gone (or a zombie nobody reaped yet).
fn gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[test]
fn version_check_on_scripts_and_other_files() {
    let ctx = Ctx::new();
    let pid_file = ctx.path("sleeper.pid");
    let script = |body: &str| format!("#!/bin/sh\n{body}\n").into_bytes();
    setup(
        &ctx,
        &[
            Stage::new("genesis", script("echo v1.0.0")).version("v1.0.0"),
            // No `v` printed: the same version.
            Stage::new("plain", script("echo 1.1.0")).version("v1.1.0"),
            Stage::new("wrong", script("echo v9.9.9")).version("v1.2.0"),
            Stage::new("failing", script("echo boom >&2; exit 3")).version("v1.3.0"),
            // Never ends, and starts a child of its own: both are killed at the timeout.
            Stage::new(
                "sleeper",
                script(&format!(
                    "sleep 1000 &\necho $! > '{}'\nwait",
                    pid_file.display()
                )),
            )
            .version("v1.4.0"),
            Stage::new("noexec", script("echo v1.5.0"))
                .version("v1.5.0")
                .mode(0o644),
            Stage::new("noversion", script("exit 1")),
            Stage::new("garbage", b"just some bytes".to_vec()).version("v1.7.0"),
            Stage::new("nointerp", b"#!/nonexistent/sh\necho v1.8.0\n".to_vec()).version("v1.8.0"),
            // Not verified (not staged): never run.
            Stage::new("unstaged", script("echo v9"))
                .version("v1.9.0")
                .unstaged(),
        ],
        None,
    );
    // Tampered after staging: not verified, never run.
    ctx.stage("upgrades/unstaged/bin/simd", &script("echo tampered"));

    let start = Instant::now();
    let plan = plan_json(&ctx);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(15), "plan took {took:?}");
    assert!(
        took >= Duration::from_secs(5),
        "the sleeper must have been waited for: {took:?}"
    );

    for clean in [
        "genesis",
        "upgrades/plain",
        "upgrades/noversion",
        "upgrades/unstaged",
    ] {
        let dest = format!("{clean}/bin/simd");
        assert!(
            findings(&plan, &dest).is_empty(),
            "{dest}: {:?}",
            findings(&plan, &dest)
        );
    }
    let one = |dir: &str, check: &str| {
        let dest = format!("upgrades/{dir}/bin/simd");
        let found = findings(&plan, &dest);
        assert_eq!(checks_of(&plan, &dest), [check], "{dest}: {found:?}");
        found[0].1.clone()
    };
    assert_eq!(
        one("wrong", "version"),
        "`simd version` printed \"v9.9.9\"; the manifest declares v1.2.0"
    );
    assert_eq!(
        one("failing", "version"),
        "`simd version` exited with status 3, printing \"boom\""
    );
    assert_eq!(
        one("sleeper", "version"),
        "`simd version` did not finish within 5s (killed); the manifest declares v1.4.0"
    );
    assert!(one("noexec", "executable").starts_with("mode 0644: not executable"));
    assert!(one("garbage", "elf").starts_with("neither an ELF executable nor a script"));
    assert_eq!(
        one("nointerp", "elf"),
        "a script whose interpreter /nonexistent/sh does not exist here"
    );

    let pid: u32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SIGKILL went to the whole group; the child dies as soon as it is scheduled.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        gone(pid),
        "the sleeper's child {pid} outlived the timeout: {:?}",
        fs::read_to_string(format!("/proc/{pid}/stat"))
    );
}

#[test]
fn apply_strict_fails_on_a_binary_that_will_not_run_here() {
    let ctx = Ctx::new();
    let (machine, name) = foreign_machine();
    let real = fs::read("/bin/true").unwrap();
    let foreign = with_machine(real.clone(), machine);
    setup(
        &ctx,
        &[
            Stage::new("genesis", real).unstaged(),
            Stage::new("v2", foreign.clone()).unstaged(),
        ],
        None,
    );
    let apply = |extra: &[&str], code: i32| {
        let mut cmd = ctx.cvx();
        cmd.arg("apply")
            .arg("--home")
            .arg(&ctx.home)
            .arg("--json")
            .args(extra);
        let (stdout, stderr) = run(&mut cmd, code);
        let report: Value = serde_json::from_str(&stdout).unwrap();
        (report, stderr)
    };
    let expected = format!("upgrades/v2/bin/simd (arch): built for {name}");

    // Plain apply: staged, with a warning.
    let (report, stderr) = apply(&[], 0);
    assert_eq!(report["failed"], false, "{report:#}");
    assert_eq!(report["changed"], true);
    assert!(stderr.contains(&expected), "{stderr}");
    assert!(!stderr.contains("genesis/bin/simd ("), "{stderr}");
    assert!(report.get("error").is_none(), "{report:#}");

    // --strict: the same tree fails, saying why; the verified files stay staged.
    let (report, stderr) = apply(&["--strict"], 1);
    assert_eq!(report["failed"], true, "{report:#}");
    assert_eq!(report["changed"], false);
    let error = report["error"].as_str().unwrap();
    assert!(
        error.starts_with("--strict: 1 staged binary will not run"),
        "{error}"
    );
    assert!(error.contains(&expected), "{error}");
    assert!(stderr.contains(&expected), "{stderr}");
    assert_eq!(
        fs::read(ctx.cosmovisor("upgrades/v2/bin/simd")).unwrap(),
        foreign
    );

    // For a person too: exit 1, the finding on stderr.
    let mut cmd = ctx.cvx();
    cmd.args(["apply", "--strict", "--home"]).arg(&ctx.home);
    let (_, stderr) = run(&mut cmd, 1);
    assert!(stderr.contains(&expected), "{stderr}");

    // A tree whose binaries all run here passes --strict.
    let ok = Ctx::new();
    setup(
        &ok,
        &[Stage::new("genesis", fs::read("/bin/true").unwrap()).unstaged()],
        None,
    );
    let mut cmd = ok.cvx();
    cmd.args(["apply", "--strict", "--home"]).arg(&ok.home);
    run(&mut cmd, 0);
}

/// A staged, pinned script that records that it ran, with its environment and working directory,
/// and writes "config" under its `$HOME` as a daemon's first run may.
fn recorder(marker: &Path) -> Vec<u8> {
    format!(
        "#!/bin/sh\nenv > '{m}.env'\npwd > '{m}.pwd'\nmkdir -p \"$HOME/.simd/config\" && touch \"$HOME/.simd/config/app.toml\"\necho v1.0.0\n",
        m = marker.display()
    )
    .into_bytes()
}

/// The variables the recorder saw, without those the shell sets itself.
fn recorded_env(marker: &Path) -> BTreeMap<String, String> {
    fs::read_to_string(format!("{}.env", marker.display()))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn plan_executes_nothing_from_the_tree_unless_asked() {
    // A pull request's manifest naming its own tree as chain.home, with a script pinned and
    // staged there as the daemon: plain `plan`, as CI runs it, must not execute it.
    let ctx = Ctx::new();
    let marker = ctx.path("ran");
    let script = recorder(&marker);
    let tree = ctx.path("tree");
    let staged = tree.join("cosmovisor/genesis/bin/simd");
    fs::create_dir_all(staged.parent().unwrap()).unwrap();
    fs::write(&staged, &script).unwrap();
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755)).unwrap();
    ctx.manifest(&format!(
        "[chain]\nid = \"evil-1\"\ndaemon = \"simd\"\nhome = \"{}\"\n\n[genesis]\nversion = \"v9.9.9\"\nbinary.\"{}\" = {{ url = \"https://example.org/simd\", sha256 = \"{}\" }}\n",
        tree.display(),
        platform(),
        sha256(&script)
    ));
    let real_home = ctx.path("real-home");
    fs::create_dir_all(&real_home).unwrap();
    let plan = |extra: &[&str], code: i32| {
        let mut cmd = ctx.cvx();
        cmd.arg("plan")
            .args(extra)
            .env("HOME", &real_home)
            .env("CVX_TEST_SECRET", "hunter2")
            .env("https_proxy", "http://127.0.0.1:9");
        run(&mut cmd, code)
    };
    let ran = PathBuf::from(format!("{}.env", marker.display()));
    for extra in [
        &[][..],
        &["--json"],
        &["--verify", "--detailed-exitcode"],
        &["--annotations", "github"],
    ] {
        let (stdout, _) = plan(
            extra,
            if extra.contains(&"--detailed-exitcode") {
                2
            } else {
                0
            },
        );
        assert!(!ran.exists(), "plan {extra:?} executed the staged script");
        if extra == ["--json"] {
            let plan: Value = serde_json::from_str(&stdout).unwrap();
            // Staged and verified, so a host would check it; its version was not asked for.
            assert_eq!(plan["upgrades"][0]["artifacts"][0]["state"], "ok");
            assert!(plan.get("runnable").is_none(), "{plan:#}");
        }
    }

    // --run-version runs it, as apply would on a host: in a temp dir that is its HOME, with an
    // environment of PATH and LD_LIBRARY_PATH only; the version it prints is compared.
    let (stdout, _) = plan(&["--json", "--run-version"], 0);
    let plan: Value = serde_json::from_str(&stdout).unwrap();
    let found = findings(&plan, "genesis/bin/simd");
    assert_eq!(
        found,
        [(
            "version".to_string(),
            "`simd version` printed \"v1.0.0\"; the manifest declares v9.9.9".to_string()
        )]
    );
    let env = recorded_env(&marker);
    let keys: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["HOME", "LD_LIBRARY_PATH", "PATH", "TMPDIR"],
        "{env:?}"
    );
    let home = Path::new(&env["HOME"]);
    assert_eq!(env["TMPDIR"], env["HOME"]);
    assert_eq!(
        fs::read_to_string(format!("{}.pwd", marker.display()))
            .unwrap()
            .trim(),
        env["HOME"]
    );
    assert!(
        home.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("cvx-version-home-")
    );
    assert!(
        !home.exists(),
        "the temp HOME {} was left behind",
        home.display()
    );
    assert_eq!(
        PathBuf::from(&env["LD_LIBRARY_PATH"]),
        std::path::absolute(tree.join("cosmovisor/genesis/lib")).unwrap()
    );
    assert_eq!(fs::read_dir(&real_home).unwrap().count(), 0);
}

#[test]
fn apply_runs_version_after_staging_with_a_cleared_environment() {
    let ctx = Ctx::new();
    let marker = ctx.path("ran");
    setup(
        &ctx,
        &[Stage::new("genesis", recorder(&marker))
            .version("v1.0.0")
            .unstaged()],
        None,
    );
    let real_home = ctx.path("real-home");
    fs::create_dir_all(&real_home).unwrap();
    let mut cmd = ctx.cvx();
    cmd.args(["apply", "--strict", "--home"])
        .arg(&ctx.home)
        .env("HOME", &real_home)
        .env("CVX_TEST_SECRET", "hunter2");
    let (_, stderr) = run(&mut cmd, 0);
    assert!(!stderr.contains("(version)"), "{stderr}");
    let env = recorded_env(&marker);
    assert!(!env.contains_key("CVX_TEST_SECRET"), "{env:?}");
    assert!(env["HOME"].contains("cvx-version-home-"), "{env:?}");
    assert!(!Path::new(&env["HOME"]).exists());
    assert_eq!(fs::read_dir(&real_home).unwrap().count(), 0);
}

#[test]
fn warnings_carry_no_colour_codes_off_a_terminal() {
    let ctx = Ctx::new();
    let (machine, _) = foreign_machine();
    setup(
        &ctx,
        &[Stage::new(
            "genesis",
            with_machine(fs::read("/bin/true").unwrap(), machine),
        )
        .unstaged()],
        None,
    );
    let mut cmd = ctx.cvx();
    // NO_COLOR unset: only the pipe says "no colour".
    cmd.env_remove("NO_COLOR")
        .args(["apply", "--home"])
        .arg(&ctx.home);
    let (_, stderr) = run(&mut cmd, 0);
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(stderr.contains("genesis/bin/simd (arch)"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes on a pipe: {stderr:?}"
    );
}
