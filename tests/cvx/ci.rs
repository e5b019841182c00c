//! examples/ci/ are checked, not just shipped: the GitHub Actions workflow passes actionlint (which
//! runs ShellCheck on every `run:` script) with no finding; the GitLab CI file is read as YAML, as
//! GitLab reads it, and its scripts pass ShellCheck; every `cvx` command of both is one `cvx
//! --help` and the command's own help list, and parses; and the plan scripts run for real against
//! manifests, with the real cvx, exiting as CI needs. The linters come from scripts/setup-ci-lint.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::ctx::{Ctx, run, sha256};

const WORKFLOW: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/ci/github-actions.yml"
);
const GITLAB: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/ci/gitlab-ci.yml");

/// target/ci-lint-venv (or `CVX_CI_LINT_VENV`, as scripts/setup-ci-lint reads it).
fn venv() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = std::env::var_os("CVX_CI_LINT_VENV")
        .map_or_else(|| root.join("target/ci-lint-venv"), PathBuf::from);
    let venv = if venv.is_absolute() {
        venv
    } else {
        root.join(venv)
    };
    for tool in ["actionlint", "shellcheck", "python"] {
        assert!(
            venv.join("bin").join(tool).is_file(),
            "{} has no bin/{tool}: run scripts/setup-ci-lint (scripts/test does)",
            venv.display()
        );
    }
    venv
}

/// A YAML file as PyYAML's safe loader reads it, as JSON.
fn yaml(path: &str) -> Value {
    let out = Command::new(venv().join("bin/python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            path,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{path} is not YAML:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Shell words and operators, quotes removed (enough for CI scripts: no here-docs, no `$(...)`
/// holding a cvx command).
fn shell_words(script: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let end = |word: &mut String, in_word: &mut bool, words: &mut Vec<String>| {
        if *in_word {
            words.push(std::mem::take(word));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => word.extend(chars.next()),
                        c => word.push(c),
                    }
                }
            }
            '\\' if chars.peek() == Some(&'\n') => {
                chars.next();
            }
            '#' if !in_word => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
                words.push(";".into());
            }
            ' ' | '\t' => end(&mut word, &mut in_word, &mut words),
            '\n' | ';' | '|' | '&' | '>' | '<' | '(' | ')' => {
                end(&mut word, &mut in_word, &mut words);
                words.push(";".into());
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    end(&mut word, &mut in_word, &mut words);
    words
}

/// Every `cvx` invocation in a shell script, as its words (variables left as written).
fn cvx_commands(script: &str) -> Vec<Vec<String>> {
    let keywords = [
        "if", "then", "else", "elif", "do", "while", "until", "!", "time",
    ];
    shell_words(script)
        .split(|w| w == ";")
        .filter_map(|command| {
            let start = command
                .iter()
                .position(|w| !keywords.contains(&w.as_str()))?;
            (command[start] == "cvx").then(|| command[start..].to_vec())
        })
        .collect()
}

/// The real cvx's help for `args` (`--help` after them).
fn help(args: &[&str]) -> String {
    let ctx = Ctx::new();
    let (stdout, _) = run(ctx.cvx().args(args).arg("--help"), 0);
    stdout
}

/// A cvx command of an example: its command and every option are in cvx's help, and cvx parses
/// the whole line (variables standing for a value) up to the `--help` appended to it.
fn check_command(example: &str, words: &[String]) {
    let command = &words[1];
    let top = help(&[]);
    assert!(
        top.lines()
            .any(|l| l.trim_start().starts_with(&format!("{command} "))),
        "{example}: `cvx {command}` is not a command of cvx --help:\n{top}"
    );
    let own = help(&[command]);
    for flag in words.iter().skip(2).filter(|w| w.starts_with('-')) {
        let flag = flag.split('=').next().unwrap();
        let listed = own
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .any(|w| w == flag);
        assert!(
            listed,
            "{example}: `{flag}` is not an option of `cvx {command} --help`:\n{own}"
        );
    }
    let args: Vec<&str> = words[1..]
        .iter()
        .map(|w| if w.contains('$') { "x" } else { w.as_str() })
        .collect();
    let ctx = Ctx::new();
    let out = ctx.cvx().args(&args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{example}: cvx does not parse `cvx {}`:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `run:` of every step of every job, by job.
fn workflow_scripts(workflow: &Value) -> Vec<(String, String)> {
    workflow["jobs"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(job, j)| {
            j["steps"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| s["run"].as_str())
                .map(|run| (job.clone(), run.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// `before_script` and `script` of every GitLab job (hidden `.jobs` included), by job.
fn gitlab_scripts(pipeline: &Value) -> Vec<(String, String)> {
    let lines = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    pipeline
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, j)| j.get("script").is_some() || j.get("before_script").is_some())
        .map(|(job, j)| {
            let mut script = lines(&j["before_script"]);
            script.extend(lines(&j["script"]));
            (job.clone(), script.join("\n"))
        })
        .collect()
}

#[test]
fn the_github_workflow_passes_actionlint() {
    let venv = venv();
    let out = Command::new(venv.join("bin/actionlint"))
        .arg("-oneline")
        .arg("-shellcheck")
        .arg(venv.join("bin/shellcheck"))
        .arg("-pyflakes=")
        .arg(WORKFLOW)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.trim().is_empty(),
        "actionlint found problems in examples/ci/github-actions.yml:\n{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And it is not blind: a broken copy fails (an unknown matrix key, an unquoted variable).
    let ctx = Ctx::new();
    let broken = ctx.path("broken.yml");
    fs::write(
        &broken,
        fs::read_to_string(WORKFLOW)
            .unwrap()
            .replace("secrets[matrix.node]", "secrets[matrix.nodes]")
            .replace(
                "-m \"$manifest\" --verify-remote",
                "-m $manifest --verify-remote",
            ),
    )
    .unwrap();
    let out = Command::new(venv.join("bin/actionlint"))
        .arg("-oneline")
        .arg("-shellcheck")
        .arg(venv.join("bin/shellcheck"))
        .arg(&broken)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("\"nodes\" is not defined"), "{report}");
    assert!(report.contains("SC2086"), "{report}");
}

#[test]
fn the_github_workflow_keeps_its_promises() {
    let workflow = yaml(WORKFLOW);
    // YAML 1.1 reads the key `on` as true.
    let on = workflow.get("on").unwrap_or(&workflow["true"]);
    assert!(
        on["pull_request"]["paths"]
            .as_array()
            .unwrap()
            .contains(&Value::from("chains/**/cvx.toml")),
        "{on:#}"
    );
    assert!(
        on["schedule"].is_array() && on.get("merge_group").is_some(),
        "{on:#}"
    );
    assert_eq!(workflow["permissions"]["contents"], "read");
    let scripts = workflow_scripts(&workflow);
    let commands: Vec<(String, Vec<String>)> = scripts
        .iter()
        .flat_map(|(job, s)| cvx_commands(s).into_iter().map(|c| (job.clone(), c)))
        .collect();
    let job_runs = |job: &str, flags: &[&str]| {
        commands
            .iter()
            .any(|(j, c)| j == job && flags.iter().all(|f| c.iter().any(|w| w == f)))
    };
    assert!(job_runs(
        "plan",
        &["--detailed-exitcode", "--annotations", "github"]
    ));
    assert!(job_runs(
        "verify-remote",
        &["--verify-remote", "--annotations"]
    ));
    assert!(job_runs("drift", &["--node", "$CVX_NODE"]));
    // Pull requests run plan and --verify-remote (before merge); drift only on the schedule.
    assert!(
        workflow["jobs"]["plan"]["if"]
            .as_str()
            .unwrap()
            .contains("pull_request")
    );
    assert!(workflow["jobs"]["verify-remote"].get("if").is_none());
    assert!(
        workflow["jobs"]["drift"]["if"]
            .as_str()
            .unwrap()
            .contains("schedule")
    );
    let node = workflow["jobs"]["drift"]["env"]["CVX_NODE"]
        .as_str()
        .unwrap();
    assert!(
        node.contains("secrets[") && node.contains("vars["),
        "{node}"
    );
    // CI never asks plan to execute what a pull request brings.
    assert!(
        !commands
            .iter()
            .any(|(_, c)| c.iter().any(|w| w == "--run-version")),
        "{commands:?}"
    );
    assert_eq!(commands.len(), 3, "{commands:?}");
    for (job, command) in &commands {
        check_command(&format!("github-actions.yml job {job}"), command);
    }
}

#[test]
fn the_gitlab_pipeline_is_yaml_whose_commands_cvx_knows() {
    let venv = venv();
    let pipeline = yaml(GITLAB);
    let scripts = gitlab_scripts(&pipeline);
    let jobs: Vec<&str> = scripts.iter().map(|(j, _)| j.as_str()).collect();
    assert_eq!(jobs, [".cvx", "drift", "plan", "verify-remote"]);
    for job in ["plan", "verify-remote", "drift"] {
        assert_eq!(pipeline[job]["extends"], ".cvx", "{job}");
        assert_eq!(
            pipeline[job]["stage"]
                .as_str()
                .or(pipeline[".cvx"]["stage"].as_str()),
            Some("validate")
        );
    }
    assert_eq!(
        pipeline["drift"]["rules"][0]["if"],
        "$CI_PIPELINE_SOURCE == \"schedule\""
    );
    let mut commands = Vec::new();
    for (job, script) in &scripts {
        // As the job runs it: its before_script, then its script, in one shell.
        let out = Command::new(venv.join("bin/shellcheck"))
            .args(["--shell=bash", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(script.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "ShellCheck on gitlab-ci.yml job {job}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for command in cvx_commands(script) {
            check_command(&format!("gitlab-ci.yml job {job}"), &command);
            commands.push(command);
        }
    }
    assert_eq!(commands.len(), 4, "{commands:?}");
    // CI never asks plan to execute what a merge request brings.
    assert!(
        !commands
            .iter()
            .any(|c| c.iter().any(|w| w == "--run-version")),
        "{commands:?}"
    );
}

/// A directory with `cvx` on PATH (the binary under test) and two chains' manifests.
fn checkout(ctx: &Ctx) -> PathBuf {
    let bin = ctx.path("bin");
    fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cvx"), bin.join("cvx")).unwrap();
    for chain in ["osmosis", "juno"] {
        let dir = ctx.path(&format!("repo/chains/{chain}"));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("cvx.toml"),
            format!(
                "[chain]\nid = \"{chain}-1\"\ndaemon = \"{chain}d\"\nplatforms = [\"linux/amd64\", \"linux/arm64\"]\n\n[genesis]\nbinary.\"linux/amd64\" = {{ url = \"https://e.org/{chain}d-amd64\", sha256 = \"{a}\" }}\nbinary.\"linux/arm64\" = {{ url = \"https://e.org/{chain}d-arm64\", sha256 = \"{a}\" }}\n",
                a = sha256(chain.as_bytes())
            ),
        )
        .unwrap();
    }
    let _ = fs::set_permissions(&bin, fs::Permissions::from_mode(0o755));
    ctx.path("repo")
}

/// Run a CI script as the runner does (bash -eo pipefail) in `repo`, cvx on PATH.
fn run_script(ctx: &Ctx, repo: &Path, script: &str) -> (i32, String) {
    let path = format!(
        "{}:{}",
        ctx.path("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["--noprofile", "--norc", "-eo", "pipefail", "-c", script])
        .current_dir(repo)
        .env("PATH", path)
        .env("GITHUB_WORKSPACE", repo)
        .env("NO_COLOR", "1")
        .env_remove("DAEMON_HOME")
        .env_remove("CVX_MANIFEST")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_plan_scripts_pass_valid_manifests_and_fail_on_a_broken_one() {
    let workflow = yaml(WORKFLOW);
    let github = workflow_scripts(&workflow)
        .into_iter()
        .find(|(job, s)| job == "plan" && s.contains("cvx plan"))
        .unwrap()
        .1;
    let pipeline = yaml(GITLAB);
    let gitlab = pipeline["plan"]["script"][0].as_str().unwrap().to_string();
    for (name, script) in [("github", &github), ("gitlab", &gitlab)] {
        let ctx = Ctx::new();
        let repo = checkout(&ctx);
        // Valid manifests, nothing staged (no node here): changes pending, exit 2, which passes.
        let (code, log) = run_script(&ctx, &repo, script);
        assert_eq!(code, 0, "{name}: {log}");
        assert!(log.contains("changes pending"), "{name}: {log}");
        // One manifest broken: the job fails, and on GitHub says where.
        let juno = repo.join("chains/juno/cvx.toml");
        let text = fs::read_to_string(&juno).unwrap();
        fs::write(&juno, text.replace("daemon = ", "deamon = ")).unwrap();
        let (code, log) = run_script(&ctx, &repo, script);
        assert_eq!(code, 1, "{name}: {log}");
        assert!(log.contains("unknown key `deamon`"), "{name}: {log}");
        if name == "github" {
            assert!(
                log.contains("::error file=chains/juno/cvx.toml,line=3,col=1,title=cvx%3A chain.deamon::unknown key `deamon`"),
                "{log}"
            );
        } else {
            let plan: Value =
                serde_json::from_slice(&fs::read(repo.join("chains/juno/cvx.plan.json")).unwrap())
                    .unwrap();
            let problem = plan["problems"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["key"] == "chain.deamon")
                .unwrap_or_else(|| panic!("{plan:#}"));
            assert_eq!(
                (&problem["line"], &problem["column"]),
                (&Value::from(3), &Value::from(1))
            );
        }
    }
}
