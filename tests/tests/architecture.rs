//! The architecture invariants of ARCHITECTURE.md, checked from the manifests and sources.

use std::collections::BTreeMap;

use lian_test_support::workspace_root;

fn dependencies() -> BTreeMap<String, Vec<String>> {
    let mut deps = BTreeMap::new();
    for entry in std::fs::read_dir(workspace_root().join("crates")).unwrap().flatten() {
        let manifest = std::fs::read_to_string(entry.path().join("Cargo.toml")).unwrap();
        let normal = manifest
            .split("[dependencies]")
            .nth(1)
            .unwrap_or("")
            .split("\n[")
            .next()
            .unwrap();
        let names = normal
            .lines()
            .filter_map(|l| l.split(['.', ' ', '=']).next())
            .filter(|n| !n.is_empty() && !n.starts_with('#'))
            .map(String::from)
            .collect();
        deps.insert(entry.file_name().to_string_lossy().into_owned(), names);
    }
    deps
}

const PURE: [&str; 2] = ["lian-core", "lian-catalog"];
const ADAPTERS: [&str; 3] = ["lian-nickel", "lian-bus", "lian-runner"];
const SERVICES: [&str; 3] = ["lian-worker", "lian-cascade", "lian-control"];

#[test]
fn pure_crates_do_no_io_and_pull_no_runtime() {
    let deps = dependencies();
    for krate in PURE {
        for banned in ["tokio", "async-nats", "nickel-lang-core", "russh", "reqwest", "futures"] {
            assert!(!deps[krate].iter().any(|d| d == banned), "{krate} depends on {banned}");
        }
        for d in &deps[krate] {
            assert!(
                !ADAPTERS.contains(&d.as_str()) && !SERVICES.contains(&d.as_str()),
                "{krate} depends on {d}"
            );
        }
    }
}

#[test]
fn each_external_system_has_one_owner() {
    let deps = dependencies();
    for (system, owner) in [
        ("async-nats", "lian-bus"),
        ("nickel-lang-core", "lian-nickel"),
        ("petgraph", "lian-catalog"),
        ("russh", "lian-runner"),
        ("reqwest", "lian-runner"),
        ("axum", "lian-control"),
        ("hyper-util", "lian-control"),
    ] {
        let users: Vec<&String> = deps
            .iter()
            .filter(|(_, d)| d.iter().any(|x| x == system))
            .map(|(k, _)| k)
            .collect();
        assert_eq!(users, vec![owner], "{system} is owned by {owner} alone");
    }
}

#[test]
fn adapters_and_services_do_not_depend_on_their_peers() {
    let deps = dependencies();
    for group in [&ADAPTERS[..], &SERVICES[..]] {
        for krate in group {
            for peer in group {
                assert!(
                    !deps[*krate].iter().any(|d| d == peer),
                    "{krate} depends on its peer {peer}"
                );
            }
        }
    }
}

#[test]
fn time_is_an_input_to_the_state_machines() {
    for dir in ["crates/lian-core/src", "crates/lian-catalog/src"] {
        let mut stack = vec![workspace_root().join(dir)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let source = std::fs::read_to_string(&p).unwrap();
                for clock in ["now_utc()", "SystemTime::now", "Instant::now"] {
                    assert!(!source.contains(clock), "{} reads the clock ({clock})", p.display());
                }
            }
        }
    }
}
