//! The architecture invariants of ARCHITECTURE.md, checked from the manifests and sources.

use std::collections::BTreeMap;

use lian_test_support::workspace_root;

fn dependencies() -> BTreeMap<String, Vec<String>> {
    let mut deps = BTreeMap::new();
    // The crates, and the `lian` binary's package at the root.
    let crates = std::fs::read_dir(workspace_root().join("crates")).unwrap().flatten();
    let packages = crates
        .map(|entry| (entry.file_name().to_string_lossy().into_owned(), entry.path()))
        .chain([("lian".to_string(), workspace_root())]);
    for (package, dir) in packages {
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
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
        deps.insert(package, names);
    }
    deps
}

const PURE: [&str; 2] = ["lian-core", "lian-catalog"];
const ADAPTERS: [&str; 3] = ["lian-nickel", "lian-bus", "lian-runner"];
const SERVICES: [&str; 3] = ["lian-worker", "lian-cascade", "lian-control"];
/// Test-only code: it may use any library (its HTTP client and fakes use reqwest and axum).
const DEV: [&str; 1] = ["lian-test-support"];

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
            .filter(|(k, d)| !DEV.contains(&k.as_str()) && d.iter().any(|x| x == system))
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

/// The second type argument of each `Result<..>` in `ty`, at the top level of its brackets.
fn result_error_types(ty: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = ty;
    while let Some(at) = rest.find("Result<") {
        let args = &rest[at + "Result<".len()..];
        let (mut depth, mut comma, mut end) = (0i32, None, args.len());
        for (i, c) in args.char_indices() {
            match c {
                '<' | '(' | '[' => depth += 1,
                '>' | ')' | ']' if depth == 0 => {
                    end = i;
                    break;
                }
                '>' | ')' | ']' => depth -= 1,
                ',' if depth == 0 && comma.is_none() => comma = Some(i),
                _ => {}
            }
        }
        if let Some(comma) = comma {
            found.push(args[comma + 1..end].trim().to_string());
        }
        rest = args;
    }
    found
}

/// Errors that cross a crate are typed (tidy-style, as rust-analyzer checks its own
/// rules): no `pub fn` in any crate returns `Result<_, String>`, so a caller can tell a
/// transient failure from a refusal without reading text. Crate-internal helpers use
/// `pub(crate)` or a typed error.
#[test]
fn no_public_function_returns_a_string_error() {
    let mut offenders = Vec::new();
    for entry in walk(&workspace_root().join("crates")) {
        if entry.extension().is_none_or(|e| e != "rs") || !entry.components().any(|c| c.as_os_str() == "src") {
            continue;
        }
        let source = std::fs::read_to_string(&entry).unwrap();
        let mut from = 0;
        while let Some(at) = source[from..].find("pub ").map(|i| i + from) {
            from = at + 4;
            let item = source[at + 4..].trim_start();
            let item = item.strip_prefix("async ").unwrap_or(item);
            let item = item.strip_prefix("unsafe ").unwrap_or(item);
            if !item.starts_with("fn ") {
                continue;
            }
            let signature = &item[..item.find(['{', ';']).unwrap_or(item.len())];
            let Some(returns) = signature.split_once("->").map(|(_, r)| r) else {
                continue;
            };
            if result_error_types(returns).iter().any(|e| e == "String") {
                let line = source[..at].lines().count() + 1;
                let name: String = item[3..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                offenders.push(format!("{}:{line} {name}", entry.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "public functions returning Result<_, String> (use a thiserror enum or pub(crate)):\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_string_error_check_reads_nested_generics() {
    assert_eq!(result_error_types(" Result<Vec<String>, BusError>"), vec!["BusError"]);
    assert_eq!(result_error_types(" Result<(), String>"), vec!["String"]);
    assert_eq!(
        result_error_types(" Result<Option<(String, u8)>, String>"),
        vec!["String"]
    );
    assert!(result_error_types(" anyhow::Result<String>").is_empty());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The worker's effects call one runner interface (`Provider`, `RunnerHandle`) and never
/// ask which provider is behind it: adding a provider touches its module and the registry.
#[test]
fn effects_name_no_provider() {
    let effects = std::fs::read_to_string(workspace_root().join("crates/lian-worker/src/effects.rs")).unwrap();
    for name in [
        "ComputeProvider",
        "DockerLocal",
        "SshPool",
        "Hcloud",
        "Proxmox",
        "CloudRunner",
        "docker_local",
        "ssh_pool",
        "is_cloud",
    ] {
        assert!(!effects.contains(name), "effects.rs names the provider {name}");
    }
}
