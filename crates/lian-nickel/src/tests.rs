use lian_core::BuildDirectives;
use lian_core::sizing::{BuildSpec, RunnerType};

use super::*;

fn schemas() -> Schemas {
    Schemas::embedded().expect("schemas")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn make_ci_build_evaluates_to_directives() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "d.ncl",
        r#"let D = import "defaults/build_directives.ncl" in
           D.make_ci_build { workspace = "lian-build", artifact = { image = "registry/lian-build:abc" } }"#,
    );
    let d: BuildDirectives = schemas().eval_file(&path, Contract::BuildDirectives).unwrap();
    assert_eq!(d.workspace.as_str(), "lian-build");
    assert_eq!(d.cache_policy.cache_to, vec!["ci/lian-build".to_string()]);
    assert_eq!(d.artifact.dockerfile, "Dockerfile");
    assert_eq!(lian_core::cache::check(&d), Ok(()));
}

#[test]
fn make_session_build_follows_the_namespace_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "s.ncl",
        r#"let D = import "defaults/build_directives.ncl" in
           D.make_session_build { workspace = "lian-build", actor_id = "jpl", disposition = 'export }"#,
    );
    let d: BuildDirectives = schemas().eval_file(&path, Contract::BuildDirectives).unwrap();
    assert_eq!(d.cache_policy.cache_to, vec!["dev/jpl-lian-build".to_string()]);
    assert_eq!(lian_core::cache::check(&d), Ok(()));
}

#[test]
fn a_contract_violation_names_the_field() {
    let json = r#"{"workspace": "a.b", "artifact": {"image": "x"}, "compute_provider": "docker_local",
                   "registry_provider": "zot", "cache_policy": {"actor": "ci"}}"#;
    let err = schemas()
        .eval_json::<BuildDirectives>(json, "request.json", Contract::BuildDirectives)
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("workspace"), "{text}");
    assert!(text.contains("a.b"), "{text}");
    let summary = err.summary();
    assert!(
        !summary.contains('\n') && !summary.contains("registry_provider"),
        "one line, no snippet: {summary}"
    );
    assert!(
        summary.contains("contract broken by the value of `workspace`"),
        "{summary}"
    );
}

#[test]
fn an_unknown_provider_is_refused_by_the_contract() {
    let json = r#"{"workspace": "ws", "artifact": {"image": "x"}, "compute_provider": "aws",
                   "registry_provider": "zot", "cache_policy": {"actor": "ci"}}"#;
    let text = schemas()
        .eval_json::<BuildDirectives>(json, "request.json", Contract::BuildDirectives)
        .unwrap_err()
        .to_string();
    assert!(text.contains("compute_provider"), "{text}");
}

#[test]
fn a_build_spec_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        ".build-spec.ncl",
        "{ runner_type = 'cax31, time_budget_min = 90 }",
    );
    let spec: BuildSpec = schemas().eval_file(&path, Contract::BuildSpec).unwrap();
    assert_eq!(spec.runner_type, Some(RunnerType::Cax31));
    assert_eq!(spec.time_budget_min, Some(90));
    let bad = write(dir.path(), "bad.ncl", "{ cpu = -1 }");
    let err = schemas().eval_file::<BuildSpec>(&bad, Contract::BuildSpec).unwrap_err();
    assert!(err.to_string().contains("cpu"), "{err}");
}
