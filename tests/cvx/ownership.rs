//! cvx run as root (Ansible's `become`, `sudo`) on a home that belongs to the node's user: what
//! apply, pin and rollback create is the user's, and the user's `cvx run` then upgrades the node
//! and starts it again after a rollback (DESIGN §5.4).
//!
//! The node's user is `nobody` (uid and gid 65534): it exists in every Debian and Ubuntu image,
//! so the test adds no user to the machine it runs on. The commands run as that user through
//! `setpriv` (util-linux). The test needs root, as scripts/test and CI run it.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ctx::{Ctx, platform, run, sha256};
use crate::run::{
    CVX, DAEMON, Reaper, applied, command, current, height, lsm_data, spawn, wrapper, zip,
};

const NOBODY: u32 = 65534;

fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test runs cvx as root on a home owned by uid {NOBODY} (nobody), as Ansible's become \
         does, and needs root to do so (scripts/test and CI run as root)"
    );
}

/// `cmd`, run as the node's user instead: same program, arguments, environment and directory.
fn as_nobody(cmd: &Command) -> Command {
    let mut wrapped = Command::new("setpriv");
    wrapped
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

/// Every path under `root` (itself included; links not followed) not owned by uid and gid
/// `NOBODY`, with its owner.
fn not_nobodys(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        if (meta.uid(), meta.gid()) != (NOBODY, NOBODY) {
            found.push((path.clone(), meta.uid(), meta.gid()));
        }
        if meta.is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found.sort();
    found
}

/// `chown -R nobody:nobody path`, links not followed.
fn give_to_nobody(path: &Path) {
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).unwrap();
    if fs::symlink_metadata(path).unwrap().is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            give_to_nobody(&entry.unwrap().path());
        }
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// `cvx <args> --home <home>` as root, expecting exit `code`: (stdout, stderr).
fn cvx_as_root(ctx: &Ctx, args: &[&str], code: i32) -> (String, String) {
    run(ctx.cvx().args(args).arg("--home").arg(&ctx.home), code)
}

#[test]
fn what_root_creates_in_a_users_home_is_theirs_and_they_upgrade_and_roll_back() {
    require_root();
    let ctx = Ctx::new();
    let _reaper = Reaper(ctx.home.clone());
    // The node's user must reach the test's directory (a temp dir is 0700) and owns the home.
    fs::set_permissions(ctx.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(&ctx.home).unwrap();
    std::os::unix::fs::chown(&ctx.home, Some(NOBODY), Some(NOBODY)).unwrap();
    // The node's database, written by the node (as its user).
    lsm_data(&ctx);
    give_to_nobody(&ctx.home.join("data"));

    // genesis: a plain file; v2: one archive with the binary and its library, pinned once.
    let genesis = wrapper("--sim-version v1.0.0 --sim-upgrade v2@3 --sim-exit-at 6 0");
    let v2 = wrapper("--sim-version v2.0.0 --sim-handlers v2 --sim-exit-at 5 0");
    let lib = b"\x7fELF the library v2 needs".as_slice();
    let archive = zip(&[("bin/simd", &v2), ("lib/libwasmvm.x86_64.so", lib)]);
    fs::write(ctx.path("simd-v1"), &genesis).unwrap();
    fs::write(ctx.path("simd-v2.zip"), &archive).unwrap();
    let p = platform();
    let (g_url, a_url) = (ctx.path("simd-v1"), ctx.path("simd-v2.zip"));
    // The manifest is the node user's too, and its v2 pin is left for `cvx pin` to fill.
    let manifest = ctx.manifest(&format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"{DAEMON}\"\n\n[genesis]\nbinary.\"{p}\" = {{ url = \"{}\", sha256 = \"{}\" }}\n\n[[upgrade]]\nname = \"v2\"\nbinary.\"{p}\" = {{ url = \"{}\", sha256 = \"\", path = \"bin/simd\" }}\nlibrary.\"{p}\" = [ {{ url = \"{}\", sha256 = \"{}\", path = \"lib/libwasmvm.x86_64.so\" }} ]\n",
        g_url.display(),
        sha256(&genesis),
        a_url.display(),
        a_url.display(),
        sha256(&archive),
    ));
    std::os::unix::fs::chown(&manifest, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(&manifest, fs::Permissions::from_mode(0o640)).unwrap();

    // As root: pin keeps the manifest the user's, apply stages everything as the user's.
    run(ctx.cvx().args(["pin", "-q"]), 0);
    let meta = fs::metadata(&manifest).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (NOBODY, NOBODY, 0o640),
        "the pinned manifest keeps its owner and mode"
    );
    cvx_as_root(&ctx, &["apply"], 0);
    assert_eq!(
        not_nobodys(&ctx.home),
        Vec::new(),
        "everything apply created"
    );
    for (rel, want) in [
        ("genesis/bin/simd", 0o755),
        ("upgrades/v2/bin/simd", 0o755),
        ("upgrades/v2/lib/libwasmvm.x86_64.so", 0o644),
        (".cvx/receipts/upgrades/v2/bin/simd.json", 0o600),
    ] {
        assert_eq!(
            mode(&ctx.cosmovisor(rel)),
            want,
            "{rel}: the modes of today"
        );
    }

    // As the user: plan sees a tree ready for v2; cvx run switches at the height, backing up
    // data/ into the home.
    let mut plan = Command::new(CVX);
    plan.current_dir(ctx.dir.path())
        .env("NO_COLOR", "1")
        .args(["plan", "--detailed-exitcode", "--home"])
        .arg(&ctx.home);
    let out = as_nobody(&plan).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("nothing to do"), "{stdout}");
    let env = [
        ("CVX_MANIFEST", manifest.to_str().unwrap()),
        ("UNSAFE_SKIP_BACKUP", "false"),
    ];
    let (_, stderr) = spawn(&ctx, as_nobody(&command(&ctx, &env, &[]))).finish(0);
    assert_eq!(current(&ctx), "upgrades/v2", "{stderr}");
    assert_eq!(applied(&ctx), ["v2"]);
    assert!(
        !stderr.contains("no cvx receipt"),
        "the receipts were readable:\n{stderr}"
    );

    // As root: roll back. The restored data/, the locks and the link are the user's.
    let (stdout, _) = cvx_as_root(&ctx, &["rollback", "v2"], 0);
    assert!(stdout.contains("--unsafe-skip-upgrades 3"), "{stdout}");
    assert_eq!(current(&ctx), "genesis");
    assert_eq!(
        not_nobodys(&ctx.home),
        Vec::new(),
        "everything rollback created"
    );

    // As the user again: the old binary goes on from the restored state.
    let (_, stderr) = spawn(
        &ctx,
        as_nobody(&command(&ctx, &env, &["--unsafe-skip-upgrades", "3"])),
    )
    .finish(0);
    assert!(stderr.contains("skipping the upgrade"), "{stderr}");
    assert_eq!(applied(&ctx), Vec::<String>::new());
    assert_eq!(height(&ctx), Some(6));
}
