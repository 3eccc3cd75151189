//! docs/architecture.md's module map must be the crate's imports: which top-level
//! module uses which (`use crate::…` lines in src/, tests included), with no
//! circle.

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

/// The map in docs/architecture.md, in the order written: `module -> a, b, c`
/// lines in the text block that starts with `config`.
fn documented() -> Vec<(String, BTreeSet<String>)> {
    let docs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/architecture.md"))
            .unwrap();
    let map = docs
        .split("```text\n")
        .find(|block| block.starts_with("config "))
        .expect("a text block starting with `config ->`");
    let map = &map[..map.find("```").unwrap()];
    map.lines()
        .filter_map(|line| line.split_once("->"))
        .map(|(module, uses)| {
            let uses = uses.split(',').map(|m| m.trim().to_owned()).collect();
            (module.trim().to_owned(), uses)
        })
        .collect()
}

#[test]
fn the_module_map_is_the_imports_and_has_no_circle() {
    let imports = from_imports();
    let mut documented = documented();
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
    // Each module uses only leaves and modules listed before it: no circle.
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
