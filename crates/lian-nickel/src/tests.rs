use lian_core::BuildDirectives;
use lian_core::sizing::{BuildSpec, RunnerType};

use super::bounded::{Input, evaluate_here};
use super::*;

fn schemas() -> Schemas {
    Schemas::embedded().expect("schemas")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn json_directives(json: &str) -> Result<BuildDirectives, NickelError> {
    let input = Input::Json {
        name: "request.json".into(),
        source: json.into(),
    };
    evaluate_here(&schemas(), input, Contract::BuildDirectives)
}

/// A spec held in memory, as a worker reads it from a context.
fn spec_in_memory(source: &str) -> Result<BuildSpec, NickelError> {
    let input = Input::Nickel {
        name: ".build-spec.ncl".into(),
        source: source.into(),
    };
    evaluate_here(&schemas(), input, Contract::BuildSpec)
}

fn file_directives(path: &Path) -> Result<BuildDirectives, NickelError> {
    evaluate_here(&schemas(), Input::File(path.to_path_buf()), Contract::BuildDirectives)
}

/// A file outside every allowed directory whose content must never show up anywhere.
fn host_secret() -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("host-secret-{}", std::process::id());
    let path = write(dir.path(), "secret.txt", &secret);
    (dir, path, secret)
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
    let err = json_directives(json).unwrap_err();
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
    let text = json_directives(json).unwrap_err().to_string();
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

#[test]
fn an_absolute_import_is_refused_by_name_without_reading_it() {
    let (_dir, secret_path, secret) = host_secret();
    let err = spec_in_memory(&format!(
        "{{ runner_type = 'cax31, x = import \"{}\" as 'Text }}",
        secret_path.display()
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, NickelError::Import { line: 1, .. }), "{err:?}");
    assert!(
        text.contains(&secret_path.display().to_string()) && text.contains("refused"),
        "{text}"
    );
    assert!(!text.contains(&secret) && !err.summary().contains(&secret), "{text}");
}

#[test]
fn a_relative_import_climbing_out_of_the_schemas_is_refused() {
    let err =
        spec_in_memory("{\n  cpu = 2,\n  x = import \"../../../../../../../etc/passwd\" as 'Text,\n}").unwrap_err();
    assert!(
        matches!(&err, NickelError::Import { file, line: 3, path, .. } if file == ".build-spec.ncl" && path.ends_with("etc/passwd")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("root:"), "{err}");
}

#[test]
fn an_in_memory_spec_may_import_the_schemas() {
    let spec = spec_in_memory("let C = import \"common.ncl\" in { runner_type | C.RunnerType = 'cax31 }").unwrap();
    assert_eq!(spec.runner_type, Some(RunnerType::Cax31));
}

#[test]
fn a_file_on_disk_may_import_its_own_directory_and_nothing_above_it() {
    let (_outside, secret_path, secret) = host_secret();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    write(dir.path(), "sub/image.ncl", "\"registry/app:1\"");
    let good = write(
        dir.path(),
        "d.ncl",
        r#"let D = import "defaults/build_directives.ncl" in
           D.make_ci_build { workspace = "ws", artifact = { image = import "sub/image.ncl" } }"#,
    );
    assert_eq!(
        file_directives(&good).unwrap().artifact.image.as_str(),
        "registry/app:1"
    );

    // Through an imported file of its own, and through a symlink that looks like its own.
    let relative = pathdiff(&secret_path, &dir.path().join("sub"));
    write(dir.path(), "sub/leak.ncl", &format!("import \"{relative}\" as 'Text"));
    let nested = write(dir.path(), "nested.ncl", "{ workspace = import \"sub/leak.ncl\" }");
    let err = file_directives(&nested).unwrap_err();
    assert!(
        matches!(&err, NickelError::Import { file, line: 1, .. } if file.ends_with("sub/leak.ncl")),
        "{err:?}"
    );
    assert!(!format!("{err}{err:?}").contains(&secret), "{err}");

    std::os::unix::fs::symlink(&secret_path, dir.path().join("link.txt")).unwrap();
    let linked = write(dir.path(), "linked.ncl", "{ workspace = import \"link.txt\" as 'Text }");
    let err = file_directives(&linked).unwrap_err();
    assert!(err.to_string().contains("symlink leads outside"), "{err}");
    assert!(!format!("{err}{err:?}").contains(&secret), "{err}");
}

/// `target` relative to `from`, climbing with `..` (both absolute).
fn pathdiff(target: &Path, from: &Path) -> String {
    let ups = from.components().count() - 1;
    format!("{}{}", "../".repeat(ups), target.strip_prefix("/").unwrap().display())
}

#[test]
fn json_nested_a_thousand_deep_is_refused_before_nickel_sees_it() {
    let deep = format!(
        "{{\"workspace\": \"ws\", \"x\": {}1{}}}",
        "[".repeat(1000),
        "]".repeat(1000)
    );
    let err = json_directives(&deep).unwrap_err();
    assert!(
        matches!(
            err,
            NickelError::TooDeep {
                limit: MAX_JSON_DEPTH,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("nested more than 64 levels deep"), "{err}");
    // Brackets inside strings are text, not nesting.
    assert!(check_json_depth(format!("{{\"a\": \"{}\\\"\"}}", "[".repeat(500)).as_bytes(), "x", 3).is_ok());
}

#[test]
fn an_oversized_document_is_refused_before_a_process_starts() {
    let evaluator = Evaluator::new(schemas(), PathBuf::from("/nonexistent/lian"), EvalLimits::default());
    let big = format!("{{ cpu = 1, pad = \"{}\" }}", "x".repeat(2 << 20));
    let err = evaluator
        .eval_str::<BuildSpec>(&big, ".build-spec.ncl", Contract::BuildSpec)
        .unwrap_err();
    assert!(err.to_string().contains("over the 1048576-byte limit"), "{err}");
}

#[test]
fn the_summary_keeps_the_location_and_drops_the_snippet() {
    let err = spec_in_memory("{ cpu = -1 }").unwrap_err();
    let summary = err.summary();
    assert!(summary.contains(".build-spec.ncl:1:"), "{summary}");
    assert!(!summary.contains('\n') && !summary.contains('│'), "{summary}");
}

/// An evaluator program that counts its runs in `runs` and answers `reply` to anything.
fn counting_program(dir: &Path, reply: &str) -> PathBuf {
    let program = dir.join("evaluator.sh");
    let runs = dir.join("runs");
    std::fs::write(
        &program,
        format!(
            "#!/bin/sh\ncat >/dev/null\necho run >> '{}'\necho '{reply}'\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    program
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs")).map_or(0, |r| r.lines().count())
}

#[test]
fn an_accepted_document_is_evaluated_once_and_a_refused_one_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let ok = Evaluator::new(
        schemas(),
        counting_program(dir.path(), r#"{"Ok": {"cpu": 2}}"#),
        EvalLimits::default(),
    );
    let spec = |doc: &str| ok.eval_str::<serde_json::Value>(doc, ".build-spec.ncl", Contract::BuildSpec);
    assert_eq!(spec("{ cpu = 2 }").unwrap()["cpu"], 2);
    assert_eq!(spec("{ cpu = 2 }").unwrap()["cpu"], 2);
    assert_eq!(runs(dir.path()), 1, "the same document again is not evaluated again");
    spec("{ cpu = 2, }").unwrap();
    assert_eq!(runs(dir.path()), 2, "another document is");
    let json = ok.eval_json::<serde_json::Value>(r#"{"cpu": 2}"#, "request", Contract::BuildSpec);
    assert!(json.is_ok());
    assert_eq!(
        runs(dir.path()),
        3,
        "the same text under another contract or kind is another request"
    );

    let dir = tempfile::tempdir().unwrap();
    let refusing = Evaluator::new(
        schemas(),
        counting_program(
            dir.path(),
            r#"{"Err": {"Crashed": {"what": "x", "status": "refused"}}}"#,
        ),
        EvalLimits::default(),
    );
    for _ in 0..2 {
        let err = refusing
            .eval_str::<serde_json::Value>("{ cpu = 2 }", ".build-spec.ncl", Contract::BuildSpec)
            .unwrap_err();
        assert!(err.to_string().contains("x"), "{err}");
    }
    assert_eq!(runs(dir.path()), 2, "a refusal is asked again");

    let dir = tempfile::tempdir().unwrap();
    let from_a_directory = Evaluator::new(
        Schemas::at(schemas().dir()),
        counting_program(dir.path(), r#"{"Ok": {"cpu": 2}}"#),
        EvalLimits::default(),
    );
    for _ in 0..2 {
        from_a_directory
            .eval_str::<serde_json::Value>("{ cpu = 2 }", ".build-spec.ncl", Contract::BuildSpec)
            .unwrap();
    }
    assert_eq!(
        runs(dir.path()),
        2,
        "schemas read from a directory may change: nothing is remembered"
    );
}
