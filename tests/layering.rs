//! The layering of DESIGN §6, checked from the source: nothing but `main` imports `cli`, every
//! top-level module sits in a declared layer and imports only its own layer or lower ones, and
//! the imports between modules form no cycle. `cargo test --test layering` (README "Code map").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, lowest layer first. A module may use its own layer and the
/// layers before it.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "leaves",
        &["errors", "platform", "time", "duration", "hash", "owner"],
    ),
    ("manifest", &["manifest"]),
    ("tree", &["tree"]),
    ("plan", &["plan"]),
    ("apply", &["apply"]),
    ("checks and authoring", &["checks", "author"]),
    ("run", &["run"]),
    ("status", &["status"]),
    ("presentation", &["render", "demo"]),
    ("command line", &["cli"]),
];

/// Imports that break the order today, each to be removed; the test fails once one is gone so
/// that the list only shrinks.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::name` a line of code (not a comment) names.
fn crate_paths(line: &str) -> Vec<String> {
    let code = line.trim_start();
    if code.starts_with("//") {
        return Vec::new();
    }
    code.match_indices("crate::")
        .filter(|(at, _)| {
            // `crate::x`, not `somecrate::x`.
            !code[..*at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
        .map(|(at, _)| {
            code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect()
        })
        .filter(|name: &String| !name.is_empty())
        .collect()
}

/// For each top-level module, the other top-level modules it names, with a place for each.
fn imports() -> BTreeMap<String, BTreeMap<String, String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_string();
        if ["main", "lib", "bin"].contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let uses = graph.entry(module.clone()).or_default();
        for (n, line) in text.lines().enumerate() {
            for used in crate_paths(line) {
                if used != module {
                    uses.entry(used)
                        .or_insert_with(|| format!("src/{}:{}", rel.display(), n + 1));
                }
            }
        }
    }
    graph
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

#[test]
fn only_main_uses_cli() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut offenders = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().to_path_buf();
        if rel == Path::new("main.rs") || rel == Path::new("cli.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if !code.starts_with("//") && (code.contains("crate::cli") || code.contains("cvx::cli"))
            {
                offenders.push(format!("src/{}:{}: {}", rel.display(), n + 1, code));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "only main may use cli; move what these need to a leaf module:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn modules_import_only_their_layer_and_below() {
    let graph = imports();
    let mut problems = Vec::new();
    for (module, uses) in &graph {
        let Some(own) = layer_of(module) else {
            problems.push(format!(
                "src/{module}: not in tests/layering.rs's LAYERS; declare its layer"
            ));
            continue;
        };
        for (used, place) in uses {
            let Some(theirs) = layer_of(used) else {
                continue;
            };
            if theirs > own && !KNOWN_UPWARD.contains(&(module.as_str(), used.as_str())) {
                problems.push(format!(
                    "{place}: {module} ({}) uses {used} ({}), a higher layer",
                    LAYERS[own].0, LAYERS[theirs].0
                ));
            }
        }
    }
    for (module, used) in KNOWN_UPWARD {
        if !graph.get(*module).is_some_and(|u| u.contains_key(*used)) {
            problems.push(format!(
                "{module} no longer uses {used}: remove the pair from KNOWN_UPWARD"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn no_import_cycle_between_modules() {
    let graph = imports();
    // Depth-first search; a module met again while on the path closes a cycle.
    fn visit(
        module: &str,
        graph: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        cycles: &mut Vec<String>,
    ) {
        if let Some(at) = path.iter().position(|m| m == module) {
            let mut cycle = path[at..].to_vec();
            cycle.push(module.to_string());
            cycles.push(cycle.join(" -> "));
            return;
        }
        if !done.insert(module.to_string()) {
            return;
        }
        path.push(module.to_string());
        for used in graph.get(module).into_iter().flat_map(|u| u.keys()) {
            visit(used, graph, path, done, cycles);
        }
        path.pop();
    }
    let mut cycles = Vec::new();
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done, &mut cycles);
    }
    // The known upward imports close these; they go with them.
    cycles.retain(|c| {
        !KNOWN_UPWARD
            .iter()
            .any(|(from, to)| c.contains(&format!("{from} -> {to}")))
    });
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn crate_paths_are_found_in_code_only() {
    assert_eq!(crate_paths("use crate::apply::{self, X};"), ["apply"]);
    assert_eq!(
        crate_paths("    x = crate::cli::host(); crate::time::now()"),
        ["cli", "time"]
    );
    assert!(crate_paths("// see crate::cli").is_empty());
    assert!(crate_paths("use somecrate::cli;").is_empty());
}
