//! The crate layering of docs/architecture.md, checked on the resolved dependency graph.
//!
//! `cargo metadata --all-features` resolves every optional dependency (cudarc included), so a
//! `cuda` feature cannot sneak CUDA into the launcher either.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// (crate, names that must not appear anywhere in its normal dependency closure).
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "planner",
        &[
            "proto", "kernels", "runtime", "worker", "launcher", "cudarc", "tokio", "tonic",
        ],
    ),
    (
        "proto",
        &["runtime", "kernels", "cudarc", "worker", "launcher"],
    ),
    (
        "kernels",
        &["runtime", "proto", "planner", "worker", "launcher"],
    ),
    (
        "runtime",
        &["proto", "tonic", "tokio", "worker", "launcher"],
    ),
    ("worker", &["launcher"]),
    ("launcher", &["runtime", "kernels", "cudarc", "worker"]),
    (
        "media",
        &[
            "runtime", "kernels", "cudarc", "proto", "worker", "launcher", "tokio", "tonic",
        ],
    ),
];

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--all-features",
            "--manifest-path",
            manifest,
        ])
        .output()
        .unwrap_or_else(|e| panic!("running cargo metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("cargo metadata output: {e}"))
}

/// Package id → (name, ids of its normal, non-build, non-dev dependencies).
fn graph(meta: &serde_json::Value) -> BTreeMap<String, (String, Vec<String>)> {
    let names: BTreeMap<String, String> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or("").to_string(),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut g = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
        let id = node["id"].as_str().unwrap_or("").to_string();
        let deps = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].is_null())
            })
            .filter_map(|d| d["pkg"].as_str().map(str::to_string))
            .collect();
        let name = names.get(&id).cloned().unwrap_or_default();
        g.insert(id, (name, deps));
    }
    g
}

fn closure(g: &BTreeMap<String, (String, Vec<String>)>, root: &str) -> BTreeSet<String> {
    let start = g
        .iter()
        .find(|(_, (n, _))| n == root)
        .map(|(id, _)| id.clone());
    let Some(start) = start else {
        panic!("crate {root} is not in the workspace graph")
    };
    let mut seen = BTreeSet::new();
    let mut stack = vec![start];
    while let Some(id) = stack.pop() {
        if let Some((_, deps)) = g.get(&id) {
            for d in deps {
                if seen.insert(d.clone()) {
                    stack.push(d.clone());
                }
            }
        }
    }
    seen.into_iter()
        .filter_map(|id| g.get(&id).map(|(n, _)| n.clone()))
        .collect()
}

#[test]
fn crates_respect_the_layering() {
    let g = graph(&metadata());
    let mut violations = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        let deps = closure(&g, krate);
        for f in *forbidden {
            if deps.contains(*f) {
                violations.push(format!("{krate} depends (transitively) on {f}"));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn planner_depends_on_no_workspace_crate() {
    let g = graph(&metadata());
    let deps = closure(&g, "planner");
    let workspace = [
        "proto",
        "kernels",
        "runtime",
        "worker",
        "launcher",
        "media",
        "benches",
        "lava-tests",
    ];
    let bad: Vec<_> = workspace.iter().filter(|w| deps.contains(**w)).collect();
    assert!(bad.is_empty(), "planner depends on {bad:?}");
}
