//! `cvx plan --annotations github`: every finding as a GitHub Actions workflow command on the
//! manifest's line, from the real binary, against a loopback server playing the artifacts' host
//! and the node's REST API.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use serde_json::json;

use crate::ctx::{Ctx, platform, run, sha256};
use crate::support::server::{Fault, Server};

const GOOD: &[u8] = b"genesis build";
const PINNED: &[u8] = b"v2 build as reviewed";
const SERVED: &[u8] = b"v2 build replaced upstream";

/// The annotation lines of stderr.
fn annotations(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("::")).collect()
}

/// 1-based line and column of the first `needle` on the line starting with `line_start`.
fn position(text: &str, line_start: &str, needle: &str) -> (usize, usize) {
    let (i, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.starts_with(line_start))
        .unwrap();
    (i + 1, line.find(needle).unwrap() + 1)
}

#[test]
fn findings_are_annotated_on_the_manifests_lines() {
    let server = Server::start();
    server.add("/good", GOOD.to_vec(), Fault::None);
    server.add("/v2", SERVED.to_vec(), Fault::None);
    let body = |v: serde_json::Value| v.to_string().into_bytes();
    server.add(
        "/cosmos/base/tendermint/v1beta1/node_info",
        body(json!({"default_node_info": {"network": "t-1"}})),
        Fault::None,
    );
    server.add(
        "/cosmos/base/tendermint/v1beta1/blocks/latest",
        body(json!({"block": {"header": {"height": "150"}}})),
        Fault::None,
    );
    server.add(
        "/cosmos/upgrade/v1beta1/current_plan",
        body(json!({"plan": {"name": "v2", "height": "250"}})),
        Fault::None,
    );
    server.add(
        "/cosmos/upgrade/v1beta1/applied_plan/v2",
        body(json!({"height": "0"})),
        Fault::None,
    );
    let ctx = Ctx::new();
    let p = platform();
    // A genesis binary for another machine, staged and verified: a will-it-run finding.
    let foreign = {
        let mut elf = fs::read("/bin/true").unwrap();
        let machine: u16 = if std::env::consts::ARCH == "aarch64" {
            62
        } else {
            183
        };
        elf[18..20].copy_from_slice(&machine.to_le_bytes());
        elf
    };
    server.add("/genesis", foreign.clone(), Fault::None);
    let staged = ctx.stage("genesis/bin/simd", &foreign);
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755)).unwrap();
    let text = format!(
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n\n[genesis]\nbinary.\"{p}\" = {{ url = \"{genesis}\", sha256 = \"{genesis_sha}\" }}\n\n[[upgrade]]\nname = \"v2\"\nheight = 200\nbinary.\"{p}\" = {{ url = \"{v2}\", sha256 = \"{v2_sha}\" }}\n",
        genesis = server.url("/genesis"),
        genesis_sha = sha256(&foreign),
        v2 = server.url("/v2"),
        v2_sha = sha256(PINNED),
    );
    ctx.manifest(&text);
    let (stdout, stderr) = run(
        ctx.plan().args([
            "--annotations",
            "github",
            "--verify-remote",
            "--node",
            &server.url(""),
        ]),
        1,
    );
    // The human plan is unchanged on stdout; the annotations go to stderr.
    assert!(
        stdout.contains("remote: 2 artifacts downloaded"),
        "{stdout}"
    );
    assert!(!stdout.contains("::"), "{stdout}");
    let lines = annotations(&stderr);
    let (genesis_line, genesis_url) = position(&text, "binary.", "url");
    let (v2_line, v2_url) = {
        let (i, line) = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with("binary."))
            .nth(1)
            .unwrap();
        (i + 1, line.find("url").unwrap() + 1)
    };
    let (height_line, _) = position(&text, "height", "height");
    let expected = [
        // Manifest warnings: plain http, at each URL.
        format!(
            "::warning file=cvx.toml,line={genesis_line},col={},title=cvx%3A genesis.binary.\"{p}\".url::{} is plain http: only the sha256 pin protects it%0Ahint: prefer an https:// URL",
            genesis_url + 6,
            server.url("/genesis")
        ),
        format!(
            "::warning file=cvx.toml,line={v2_line},col={},title=cvx%3A upgrade \"v2\".binary.\"{p}\".url::{} is plain http: only the sha256 pin protects it%0Ahint: prefer an https:// URL",
            v2_url + 6,
            server.url("/v2")
        ),
        // --verify-remote: the pin the URL no longer serves, at its url key.
        format!(
            "::error file=cvx.toml,line={v2_line},col={v2_url},title=cvx plan --verify-remote::upgrade v2 {p} binary: {}: checksum mismatch: pinned {}, served {}",
            server.url("/v2"),
            sha256(PINNED),
            sha256(SERVED)
        ),
        // --node: the chain schedules v2 at another height, at the height key.
        format!(
            "::error file=cvx.toml,line={height_line},col=1,title=cvx plan --node%3A drift::upgrade v2: the chain schedules v2 at height 250, the manifest says 200"
        ),
    ];
    for e in &expected {
        assert!(
            lines.contains(&e.as_str()),
            "missing {e}\nin:\n{}",
            lines.join("\n")
        );
    }
    // Will it run here: at the binary's platform key.
    let arch = lines
        .iter()
        .find(|l| l.contains("will it run here (arch)"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        arch.starts_with(&format!(
            "::warning file=cvx.toml,line={genesis_line},col=8,title=cvx plan%3A will it run here (arch)::genesis/bin/simd: built for "
        )),
        "{arch}"
    );
    assert_eq!(lines.len(), expected.len() + 1, "{}", lines.join("\n"));
}

#[test]
fn manifest_problems_are_annotated_from_the_repositorys_root() {
    let ctx = Ctx::new();
    fs::create_dir_all(ctx.path("chains/sim")).unwrap();
    fs::write(
        ctx.path("chains/sim/cvx.toml"),
        "[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n\n[genesis]\nbinary.\"linux/amd64\" = { url = \"https://e.org/simd\", sha256 = \"\" }\n\n[[upgrade]]\nname = \"v2\"\nheigth = 5\nbinary.\"linux/amd64\" = { url = \"https://e.org/simd2\", sha256 = \"00\" }\n",
    )
    .unwrap();
    // As in a workflow: run from the checkout, GITHUB_WORKSPACE naming it; -m may be absolute.
    let mut cmd = ctx.cvx();
    cmd.env("GITHUB_WORKSPACE", ctx.dir.path())
        .args(["plan", "--annotations", "github", "-m"])
        .arg(ctx.path("chains/sim/cvx.toml"));
    let (_, stderr) = run(&mut cmd, 1);
    let lines = annotations(&stderr);
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(
        lines[0].starts_with("::error file=chains/sim/cvx.toml,line=6,col="),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains("::sha256 is empty: the artifact is not pinned"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("%0Ahint: run `cvx pin"), "{}", lines[0]);
    assert!(
        lines[1].starts_with(
            "::error file=chains/sim/cvx.toml,line=10,col=1,title=cvx%3A upgrade \"v2\".heigth::"
        ),
        "{}",
        lines[1]
    );
    assert!(lines[2].contains("line=11,"), "{}", lines[2]);
    // The compiler-style report follows, for the log.
    assert!(
        stderr.contains("chains/sim/cvx.toml:6:63: genesis"),
        "{stderr}"
    );

    // An error that leaves no plan is one annotation on the manifest.
    let ctx = Ctx::new();
    ctx.manifest("[chain]\nid = \"t-1\"\ndaemon = \"simd\"\n[genesis]\nbinary.\"linux/amd64\" = { url = \"https://e.org/simd\", sha256 = \"0000000000000000000000000000000000000000000000000000000000000000\" }\n");
    let (_, stderr) = run(
        ctx.plan()
            .args(["--annotations", "github", "--platform", "linux/riscv64"]),
        1,
    );
    assert_eq!(
        annotations(&stderr),
        [
            "::error file=cvx.toml,title=cvx plan::platform linux/riscv64 is not among the manifest's platforms (linux/amd64)"
        ]
    );
}
