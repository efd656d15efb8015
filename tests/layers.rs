//! The crate's layers, checked on its sources (docs/architecture.md draws them): each
//! top-level module imports only modules of lower layers, so there is no cycle, and the
//! sans-IO core names no socket, file, runtime I/O or monotonic clock.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first; a module may name (`crate::x`) only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["event", "datadir"],
    &["auth", "filter", "fleet"],
    &["proto"],
    &["frame", "metrics"],
    &["ring", "io"],
    &["config", "live"],
    &["reactor", "ingest", "admin"],
    &["cluster"],
    &["server"],
    &["cli"],
];

/// The sans-IO core: decisions on bytes and values, time passed in.
const SANS_IO: &[&str] = &[
    "event",
    "filter.rs",
    "fleet.rs",
    "proto",
    "frame.rs",
    "ring.rs",
    "metrics.rs",
    "reactor/shard.rs",
    "reactor/outbox.rs",
    "ingest/lines.rs",
];

/// What the core may not name.
const IO_NAMES: &[&str] = &[
    "tokio::net",
    "tokio::io",
    "tokio::time",
    "tokio_uring",
    "std::net::Tcp",
    "std::fs",
    "std::thread",
    "socket2",
    "libc::",
    "crate::io",
    // The core's decisions take the time as a value (wall-clock stamps on events are
    // data, not decisions, so `SystemTime` is not on this list).
    "Instant::now()",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        out.extend(rust_files(&entry.unwrap().path()));
    }
    out.retain(|p| p.extension().is_some_and(|e| e == "rs") && !test_only(p));
    out
}

/// A module its parent declares under `#[cfg(test)]` (in `mod.rs` beside it).
fn test_only(file: &Path) -> bool {
    let name = file.file_stem().unwrap().to_str().unwrap();
    let parent = std::fs::read_to_string(file.with_file_name("mod.rs")).unwrap_or_default();
    [
        format!("#[cfg(test)]\nmod {name};"),
        format!("#[cfg(test)]\npub mod {name};"),
    ]
    .iter()
    .any(|decl| parent.contains(decl.as_str()))
}

/// A file's code lines: without its unit tests and comments.
fn code(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .map(str::to_owned)
        .collect()
}

/// The top-level modules a line names through `crate::x` or `crate::{x, y::z}`.
fn named_modules(line: &str, out: &mut BTreeSet<String>) {
    let ident = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect::<String>()
    };
    for (i, _) in line.match_indices("crate::") {
        let rest = &line[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|p| ident(p.trim())));
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
}

fn layer_of(module: &str) -> usize {
    LAYERS
        .iter()
        .position(|l| l.contains(&module))
        .unwrap_or_else(|| panic!("module {module} is in no layer of tests/layers.rs"))
}

#[test]
fn every_module_imports_only_lower_layers() {
    let mut wrong = Vec::new();
    let mut modules = 0;
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        modules += 1;
        let mut deps = BTreeSet::new();
        for file in rust_files(&path) {
            for line in code(&file) {
                named_modules(&line, &mut deps);
            }
        }
        deps.remove(&name);
        let own = layer_of(&name);
        for dep in deps {
            if layer_of(&dep) >= own {
                wrong.push(format!(
                    "{name} (layer {own}) imports {dep} (layer {})",
                    layer_of(&dep)
                ));
            }
        }
    }
    assert!(modules >= 15, "found only {modules} modules under src/");
    assert!(
        wrong.is_empty(),
        "imports against the layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_sans_io_core_names_no_io_and_takes_time_as_a_value() {
    let mut found = Vec::new();
    for part in SANS_IO {
        let files = rust_files(&src().join(part));
        assert!(!files.is_empty(), "{part} is gone: update SANS_IO");
        for file in files {
            for (n, line) in code(&file).iter().enumerate() {
                for name in IO_NAMES.iter().filter(|name| line.contains(*name)) {
                    found.push(format!("{}:{}: {name}", file.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "I/O in the sans-IO core:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_see_an_import_when_there_is_one() {
    let mut deps = BTreeSet::new();
    named_modules("use crate::{io::accept, live::Live};", &mut deps);
    named_modules("    crate::server::start(cfg)", &mut deps);
    assert_eq!(
        deps.into_iter().collect::<Vec<_>>(),
        ["io", "live", "server"]
    );
    assert!(layer_of("reactor") > layer_of("live") && layer_of("server") > layer_of("cluster"));
}
