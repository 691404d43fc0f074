//! The control plane's layers, read from its source: every `crate::…` path points at
//! the file's own layer or one below it, nothing outside `http/`, `web/`, `startup.rs`,
//! `main.rs` and `lib.rs` names `http` or `web`, and no SQL outside
//! `service::transition`'s one writer spells a job status.

use std::path::{Path, PathBuf};

/// Top-level modules from the top layer down; a module may use its own layer and the
/// ones after it.
const LAYERS: &[&[&str]] = &[
    &["startup", "main", "lib"],
    &["http", "web"],
    &["request"],
    &["service"],
    &["live", "storage", "enrichment", "auth"],
    &["db"],
    &["domain", "telemetry"],
    &["configuration"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// (file, its top-level module, its text) for every file under `src/`.
fn files() -> Vec<(String, String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    sources(&root, &mut paths);
    paths
        .into_iter()
        .map(|path| {
            let relative = path
                .strip_prefix(&root)
                .expect("under src")
                .to_string_lossy()
                .into_owned();
            let module = relative
                .split(['/', '.'])
                .next()
                .unwrap_or_default()
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("readable source");
            (relative, module, text)
        })
        .collect()
}

/// The top-level modules a file names as `crate::module`.
fn crate_paths(text: &str) -> Vec<String> {
    text.match_indices("crate::")
        .map(|(at, _)| {
            text[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn imports_point_down_the_layers() {
    let mut upward = Vec::new();
    for (file, module, text) in files() {
        let own =
            layer_of(&module).unwrap_or_else(|| panic!("{file}: module {module} has no layer"));
        for target in crate_paths(&text) {
            let Some(layer) = layer_of(&target) else {
                panic!("{file}: crate::{target} has no layer");
            };
            if layer < own {
                upward.push(format!("{file} uses crate::{target}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports running up the layers: {upward:#?}"
    );
}

#[test]
fn only_the_edges_name_http_or_web() {
    let edges = ["http", "web", "startup", "main", "lib"];
    let offenders: Vec<String> = files()
        .into_iter()
        .filter(|(_, module, _)| !edges.contains(&module.as_str()))
        .filter(|(_, _, text)| crate_paths(text).iter().any(|m| m == "http" || m == "web"))
        .map(|(file, _, _)| file)
        .collect();
    assert!(offenders.is_empty(), "{offenders:?}");
}

#[test]
fn no_sql_spells_a_job_status() {
    let statuses = control_plane::domain::JobStatus::ALL.map(|s| format!("'{}'", s.as_str()));
    let mut spelled = Vec::new();
    for (file, _, text) in files() {
        for status in &statuses {
            if text.contains(status.as_str()) {
                spelled.push(format!("{file} spells {status}"));
            }
        }
    }
    assert!(
        spelled.is_empty(),
        "job statuses are bound from JobStatus, never written in SQL: {spelled:?}"
    );
}
