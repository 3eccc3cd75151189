//! docs/configuration.md must list exactly the flags of `verve --help`, with the
//! same environment variables and defaults; every fleet guarantee names a test;
//! the Dockerfile stubs every target Cargo.toml declares.

use std::collections::BTreeMap;
use std::process::Command;

/// (environment variable, default) per flag, as `--help` prints them.
fn from_help() -> BTreeMap<String, (String, Option<String>)> {
    let out = Command::new(env!("CARGO_BIN_EXE_verve"))
        .arg("--help")
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in help.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("--") {
            let flag = rest.split_whitespace().next().unwrap();
            current = (flag != "help" && flag != "version").then(|| format!("--{flag}"));
        } else if let (Some(flag), Some(env)) = (&current, line.strip_prefix("[env: ")) {
            let env = env.trim_end_matches("=]").to_owned();
            flags.insert(flag.clone(), (env, None));
        } else if let (Some(flag), Some(default)) = (&current, line.strip_prefix("[default: ")) {
            let default = default.trim_end_matches(']').to_owned();
            flags.get_mut(flag).expect("[env] comes before [default]").1 = Some(default);
        }
    }
    flags
}

/// (environment variable, default cell) per flag, from the docs table.
fn from_docs() -> BTreeMap<String, (String, String)> {
    let docs = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    docs.lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|row| {
            let cells: Vec<_> = row.split('|').map(str::trim).collect();
            let unquote = |s: &str| s.trim_matches('`').to_owned();
            (unquote(cells[1]), (unquote(cells[2]), cells[3].to_owned()))
        })
        .collect()
}

#[test]
fn configuration_docs_match_help() {
    let help = from_help();
    let docs = from_docs();
    assert!(
        help.len() >= 10,
        "parsed too few flags from --help: {help:?}"
    );
    assert_eq!(
        help.keys().collect::<Vec<_>>(),
        docs.keys().collect::<Vec<_>>(),
        "flags in --help vs docs/configuration.md"
    );
    for (flag, (env, default)) in &help {
        let (doc_env, doc_default) = &docs[flag];
        assert_eq!(env, doc_env, "{flag}: environment variable");
        match default.as_deref() {
            Some("\"\"") => assert!(doc_default.starts_with("empty"), "{flag}: default"),
            Some(default) => assert_eq!(doc_default, &format!("`{default}`"), "{flag}: default"),
            None => {}
        }
    }
}

/// Every row of docs/operations.md's table of what the fleet guarantees names
/// at least one test, and every test it names exists: the table is only worth
/// what proves it.
#[test]
fn every_fleet_guarantee_names_a_test_that_exists() {
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/operations.md")).unwrap();
    let section = docs
        .split("### What the fleet guarantees")
        .nth(1)
        .expect("the guarantee table");
    let rows: Vec<&str> = section
        .lines()
        .skip_while(|l| !l.starts_with("| Situation"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(rows.len() >= 10, "parsed too few rows: {rows:?}");
    // Integration tests, and the unit tests in src/ (the model checker's).
    let mut tests = String::new();
    let mut dirs = vec![format!("{root}/tests"), format!("{root}/src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path.to_str().unwrap().to_owned());
            } else if path.extension().is_some_and(|e| e == "rs") {
                tests += &std::fs::read_to_string(path).unwrap();
            }
        }
    }
    for row in rows {
        let named: Vec<&str> = row
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|word| {
                word.matches('_').count() >= 3
                    && !word.starts_with("verve_")
                    && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
            .collect();
        assert!(!named.is_empty(), "a row without a test: {row}");
        for test in named {
            assert!(
                tests.contains(&format!("fn {test}(")),
                "{test} is named in the guarantee table but is not a test"
            );
        }
    }
}

/// The Dockerfile builds the dependencies against stub sources, one per target
/// that Cargo.toml declares: a bench added there and not to the stubs would
/// break `docker build` (cargo refuses a manifest whose targets are missing).
#[test]
fn the_dockerfile_stubs_every_declared_bench() {
    let manifest = std::fs::read_to_string("Cargo.toml").unwrap();
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    let stubs = dockerfile
        .lines()
        .find_map(|line| line.trim().strip_prefix("&& for bench in "))
        .and_then(|rest| rest.split_once("; do"))
        .map(|(names, _)| names.split_whitespace().collect::<Vec<_>>())
        .expect("the Dockerfile's loop over bench stubs");
    let mut declared: Vec<&str> = manifest
        .split("[[bench]]")
        .skip(1)
        .filter_map(|bench| bench.lines().find_map(|l| l.trim().strip_prefix("name = ")))
        .map(|name| name.trim_matches('"'))
        .collect();
    declared.sort_unstable();
    let mut stubbed = stubs.clone();
    stubbed.sort_unstable();
    assert_eq!(
        stubbed, declared,
        "Dockerfile stubs vs Cargo.toml's [[bench]]"
    );
}
