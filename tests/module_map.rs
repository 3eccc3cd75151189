//! docs/architecture.md's module maps must be the crate's imports, with no
//! circle: which top-level module uses which (`use crate::…` lines in src/, tests
//! included), and which file of `server/` uses which (every `super::…` or
//! `crate::server::…` path outside comments; `mod.rs`, the root that starts the
//! workers and holds the settings they share, aside).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The top-level module a source file belongs to (`src/store/redis/fleet.rs` -> `store`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_str()?.trim_end_matches(".rs");
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn from_imports() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let uses = graph.entry(module.clone()).or_default();
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let Some(path) = line.trim().strip_prefix("use crate::") else {
                continue;
            };
            let used: String = path
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if used != module {
                uses.insert(used);
            }
        }
    }
    graph
}

/// The map in docs/architecture.md that starts with a line for `first`, in the
/// order written: `module -> a, b, c` lines in a text block.
fn documented(first: &str) -> Vec<(String, BTreeSet<String>)> {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/architecture.md"))
            .unwrap();
    let map = docs
        .split("```text\n")
        .find(|block| block.starts_with(&format!("{first} ")))
        .unwrap_or_else(|| panic!("a text block starting with `{first} ->`"));
    let map = &map[..map.find("```").unwrap()];
    map.lines()
        .filter_map(|line| line.split_once("->"))
        .map(|(module, uses)| {
            let uses = uses.split(',').map(|m| m.trim().to_owned()).collect();
            (module.trim().to_owned(), uses)
        })
        .collect()
}

/// Each module of `documented` uses only leaves of `imports` and modules listed
/// before it: no circle.
fn assert_no_circle(imports: &Graph, documented: Vec<(String, BTreeSet<String>)>) {
    let mut below: BTreeSet<String> = imports
        .iter()
        .filter(|(_, uses)| uses.is_empty())
        .map(|(module, _)| module.clone())
        .collect();
    for (module, uses) in documented {
        let above: Vec<_> = uses.difference(&below).collect();
        assert!(above.is_empty(), "{module} uses {above:?}, listed after it");
        below.insert(module);
    }
}

/// Which file of `src/server/` uses which.
fn server_imports() -> Graph {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    let name = |path: &Path| path.file_stem().unwrap().to_str().unwrap().to_owned();
    let modules: BTreeSet<String> = files.iter().map(|f| name(f)).collect();
    let mut graph = Graph::new();
    for file in &files {
        let module = name(file);
        if module == "mod" {
            continue;
        }
        let uses = graph.entry(module.clone()).or_default();
        let text = std::fs::read_to_string(file).unwrap();
        for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for prefix in ["super::", "crate::server::"] {
                for (at, _) in line.match_indices(prefix) {
                    let rest = &line[at + prefix.len()..];
                    let names = match rest.strip_prefix('{') {
                        Some(list) => &list[..list.find('}').unwrap_or(list.len())],
                        None => rest,
                    };
                    for used in names.split([',', ' ']) {
                        let used: String = used
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if used != module && used != "mod" && modules.contains(&used) {
                            uses.insert(used);
                        }
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn the_module_map_is_the_imports_and_has_no_circle() {
    let imports = from_imports();
    let mut documented = documented("record");
    // The docs name service's uses as "everything above it": it must come last.
    let (last, uses) = documented.pop().unwrap();
    assert_eq!(last, "service");
    assert_eq!(uses, BTreeSet::from(["everything above it".to_owned()]));
    let importing: Graph = imports
        .iter()
        .filter(|(module, uses)| *module != "service" && !uses.is_empty())
        .map(|(module, uses)| (module.clone(), uses.clone()))
        .collect();
    assert_eq!(documented.iter().cloned().collect::<Graph>(), importing);
    assert_no_circle(&imports, documented);
}

#[test]
fn the_server_map_is_its_files_imports_and_has_no_circle() {
    let imports = server_imports();
    let documented = documented("registry");
    let importing: Graph = imports
        .iter()
        .filter(|(_, uses)| !uses.is_empty())
        .map(|(module, uses)| (module.clone(), uses.clone()))
        .collect();
    assert_eq!(documented.iter().cloned().collect::<Graph>(), importing);
    assert_no_circle(&imports, documented);
}
