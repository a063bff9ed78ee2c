use lian_core::names::CascadeId;

use super::*;
use crate::cascade::{self, CascadeEvent, CascadeState};
use crate::{Base, GraphFormat, LayerClass};

fn name(s: &str) -> LayerName {
    LayerName::new(s).unwrap()
}

fn layer(n: &str, base: Option<&str>, donors: &[&str]) -> Layer {
    Layer {
        name: name(n),
        class: LayerClass::Toolchain,
        description: String::new(),
        build_base: match base {
            Some(b) => Base::Layer { layer: name(b) },
            None => Base::Image {
                image: "scratch".into(),
            },
        },
        runtime_base: Base::Image {
            image: "scratch".into(),
        },
        donors: donors.iter().map(|d| name(d)).collect(),
        tools_provided: vec![],
        artifact_paths: vec![],
        native_deps: vec![],
        suggest_when: Default::default(),
    }
}

/// base -> tools -> app, base -> deps -> app (donor), plus an unrelated root.
fn example() -> Catalog {
    Catalog::new(vec![
        layer("base", None, &[]),
        layer("tools", Some("base"), &[]),
        layer("deps", Some("base"), &[]),
        layer("app", Some("tools"), &["deps"]),
        layer("other", None, &[]),
    ])
    .unwrap()
}

#[test]
fn the_plan_lists_descendants_after_their_parents() {
    let c = example();
    let plan: Vec<String> = c.plan("base").unwrap().iter().map(|l| l.to_string()).collect();
    assert_eq!(plan, ["deps", "tools", "app"]);
    assert_eq!(c.plan("tools").unwrap(), vec![name("app")]);
    assert!(c.plan("app").unwrap().is_empty());
    assert!(matches!(c.plan("nope"), Err(CatalogError::UnknownLayer { .. })));
}

#[test]
fn depths_are_longest_paths_from_a_root() {
    let c = Catalog::new(vec![
        layer("base", None, &[]),
        layer("tools", Some("base"), &[]),
        layer("deps", Some("tools"), &[]),
        layer("app", Some("base"), &["deps"]),
        layer("other", None, &[]),
    ])
    .unwrap();
    let depths: Vec<(&str, usize)> = c.depths().into_iter().map(|(n, d)| (n.as_str(), d)).collect();
    assert_eq!(
        depths,
        [("app", 3), ("base", 0), ("deps", 2), ("other", 0), ("tools", 1)]
    );
}

#[test]
fn a_lineage_is_the_layer_its_ancestors_and_descendants() {
    let c = example();
    let names = |l: &str| -> Vec<String> { c.lineage(l).unwrap().into_iter().map(|n| n.to_string()).collect() };
    assert_eq!(names("tools"), ["app", "base", "tools"]);
    assert_eq!(names("base"), ["app", "base", "deps", "tools"]);
    assert_eq!(names("other"), ["other"]);
    assert!(c.lineage("nope").is_err());
}

#[test]
fn cycles_and_missing_bases_are_reported_together() {
    let errors = Catalog::new(vec![
        layer("a", Some("b"), &[]),
        layer("b", Some("a"), &[]),
        layer("c", Some("ghost"), &[]),
    ])
    .unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, CatalogError::Cycle { cycle } if cycle.contains('a') && cycle.contains('b'))),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| matches!(e, CatalogError::MissingBase { missing, .. } if missing.as_str() == "ghost")),
        "{errors:?}"
    );
}

#[test]
fn adr_002_native_dep_layers_declare_their_native_deps() {
    let mut native = layer("fast", None, &[]);
    native.class = LayerClass::NativeDep;
    let errors = Catalog::new(vec![native.clone()]).unwrap_err();
    assert_eq!(errors, vec![CatalogError::NativeDepsMissing { layer: name("fast") }]);
    native.native_deps = vec!["libonnxruntime-dev".into()];
    assert!(Catalog::new(vec![native]).is_ok());
    let mut wrong = layer("tool", None, &[]);
    wrong.native_deps = vec!["libssl-dev".into()];
    assert!(matches!(
        &Catalog::new(vec![wrong]).unwrap_err()[0],
        CatalogError::NativeDepsOutsideClass { .. }
    ));
}

#[test]
fn graphs_render_every_edge() {
    let c = example();
    let dot = c.render(GraphFormat::Dot);
    assert!(dot.contains("\"base\" -> \"tools\";"), "{dot}");
    assert!(dot.contains("\"deps\" -> \"app\" [style=dotted"), "{dot}");
    assert!(dot.contains("\"scratch\" -> \"base\";"), "{dot}");
    let mermaid = c.render(GraphFormat::Mermaid);
    assert!(mermaid.starts_with("graph LR\n"));
    assert!(mermaid.contains("  tools --> app"), "{mermaid}");
    assert!(mermaid.contains("  deps -.-> app"), "{mermaid}");
}

fn start(c: &Catalog, root: &str) -> (CascadeId, CascadeState, Vec<CascadeEvent>) {
    start_with(c, root, false)
}

fn start_with(c: &Catalog, root: &str, root_unchanged: bool) -> (CascadeId, CascadeState, Vec<CascadeEvent>) {
    let id = CascadeId::new("c-b1").unwrap();
    let started = CascadeEvent::Started {
        root: name(root),
        root_build: lian_core::BuildId::new("b1").unwrap(),
        plan: c.plan(root).unwrap(),
        root_unchanged,
    };
    let state = cascade::fold([&started]).unwrap();
    (id, state, vec![started])
}

fn requested(events: &[CascadeEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            CascadeEvent::LayerRequested { layer, .. } => Some(layer.as_str()),
            _ => None,
        })
        .collect()
}

fn settle(state: &mut CascadeState, layer: &str, ok: bool) {
    settle_as(state, layer, ok, false);
}

fn settle_as(state: &mut CascadeState, layer: &str, ok: bool, unchanged: bool) {
    let l = name(layer);
    let build_id = state.build_of(&l).unwrap().clone();
    let e = if ok {
        CascadeEvent::LayerCompleted {
            layer: l,
            build_id,
            unchanged,
        }
    } else {
        CascadeEvent::LayerFailed {
            layer: l,
            build_id,
            reason: "boom".into(),
        }
    };
    state.apply(&e).unwrap();
}

fn apply_all(state: &mut CascadeState, events: &[CascadeEvent]) {
    for e in events {
        state.apply(e).unwrap();
    }
}

#[test]
fn a_two_parent_layer_waits_for_both_parents() {
    let c = example();
    let (id, mut state, _) = start(&c, "base");
    let first = cascade::decide(&state, &c, &id);
    assert_eq!(requested(&first), ["deps", "tools"]);
    apply_all(&mut state, &first);
    settle(&mut state, "tools", true);
    assert!(cascade::decide(&state, &c, &id).is_empty(), "app waits for deps");
    settle(&mut state, "deps", true);
    let next = cascade::decide(&state, &c, &id);
    assert_eq!(requested(&next), ["app"]);
    assert!(matches!(&next[0], CascadeEvent::LayerRequested { build_id, .. } if build_id.as_str() == "c-b1-app"));
    apply_all(&mut state, &next);
    settle(&mut state, "app", true);
    let end = cascade::decide(&state, &c, &id);
    assert!(matches!(&end[..], [CascadeEvent::Completed { built, cut_off }] if built.len() == 3 && cut_off.is_empty()));
}

#[test]
fn a_failure_blocks_its_branch_and_says_so() {
    let c = example();
    let (id, mut state, _) = start(&c, "base");
    let first = cascade::decide(&state, &c, &id);
    apply_all(&mut state, &first);
    settle(&mut state, "deps", false);
    let after = cascade::decide(&state, &c, &id);
    assert!(
        matches!(&after[..], [CascadeEvent::LayerBlocked { layer, because }] if layer.as_str() == "app" && because.as_str() == "deps"),
        "{after:?}"
    );
    apply_all(&mut state, &after);
    settle(&mut state, "tools", true);
    let end = cascade::decide(&state, &c, &id);
    assert!(
        matches!(&end[..], [CascadeEvent::Failed { failed, blocked }] if failed == &vec![name("deps")] && blocked == &vec![name("app")]),
        "{end:?}"
    );
}

#[test]
fn a_leaf_starts_a_cascade_that_ends_at_once() {
    let c = example();
    let (id, state, _) = start(&c, "app");
    assert!(
        matches!(&cascade::decide(&state, &c, &id)[..], [CascadeEvent::Completed { built, .. }] if built.is_empty())
    );
}

#[test]
fn deciding_twice_without_news_proposes_nothing_new() {
    let c = example();
    let (id, mut state, _) = start(&c, "base");
    let first = cascade::decide(&state, &c, &id);
    apply_all(&mut state, &first);
    assert!(cascade::decide(&state, &c, &id).is_empty());
}

fn cut_off(events: &[CascadeEvent]) -> Vec<(&str, Vec<&str>)> {
    events
        .iter()
        .filter_map(|e| match e {
            CascadeEvent::LayerCutOff { layer, because } => {
                Some((layer.as_str(), because.iter().map(|b| b.as_str()).collect()))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn a_root_that_came_out_unchanged_cuts_off_its_whole_plan() {
    let c = example();
    let (id, state, _) = start_with(&c, "base", true);
    let events = cascade::decide(&state, &c, &id);
    assert!(requested(&events).is_empty(), "{events:?}");
    assert_eq!(
        cut_off(&events),
        [
            ("deps", vec!["base"]),
            ("tools", vec!["base"]),
            ("app", vec!["tools", "deps"])
        ]
    );
    assert!(
        matches!(events.last(), Some(CascadeEvent::Completed { built, cut_off }) if built.is_empty() && cut_off.len() == 3),
        "{events:?}"
    );
}

#[test]
fn a_layer_is_cut_off_only_when_every_parent_came_out_unchanged() {
    let c = example();
    // Both parents of app unchanged: app is cut off.
    let (id, mut state, _) = start(&c, "base");
    let first = cascade::decide(&state, &c, &id);
    apply_all(&mut state, &first);
    settle_as(&mut state, "deps", true, true);
    assert!(cascade::decide(&state, &c, &id).is_empty(), "app waits for tools");
    settle_as(&mut state, "tools", true, true);
    let next = cascade::decide(&state, &c, &id);
    assert_eq!(cut_off(&next), [("app", vec!["tools", "deps"])]);
    assert!(
        matches!(next.last(), Some(CascadeEvent::Completed { built, cut_off }) if built.len() == 2 && cut_off == &vec![name("app")]),
        "{next:?}"
    );

    // One parent changed: app is rebuilt.
    let (id, mut state, _) = start(&c, "base");
    let first = cascade::decide(&state, &c, &id);
    apply_all(&mut state, &first);
    settle_as(&mut state, "deps", true, true);
    settle_as(&mut state, "tools", true, false);
    assert_eq!(requested(&cascade::decide(&state, &c, &id)), ["app"]);
}

#[test]
fn cascade_events_of_before_early_cutoff_still_read() {
    let old = r#"{"type":"started","root":"base","root_build":"b1","plan":["deps"]}"#;
    let e: CascadeEvent = serde_json::from_str(old).unwrap();
    assert!(matches!(
        e,
        CascadeEvent::Started {
            root_unchanged: false,
            ..
        }
    ));
    let done = r#"{"type":"completed","built":["deps"]}"#;
    let e: CascadeEvent = serde_json::from_str(done).unwrap();
    assert!(matches!(e, CascadeEvent::Completed { cut_off, .. } if cut_off.is_empty()));
}

#[test]
fn a_superseded_layer_waits_for_the_build_that_superseded_it() {
    let c = example();
    let (id, mut state, _) = start(&c, "base");
    let first = cascade::decide(&state, &c, &id);
    apply_all(&mut state, &first);
    settle(&mut state, "tools", true);
    let newer = lian_core::BuildId::new("c-b2-deps").unwrap();
    let superseded = CascadeEvent::LayerSuperseded {
        layer: name("deps"),
        by: newer.clone(),
    };
    state.apply(&superseded).unwrap();
    assert!(
        cascade::decide(&state, &c, &id).is_empty(),
        "app waits for deps' newer build"
    );
    // Superseded again, then the newest build ends: that is deps' end here.
    let newest = lian_core::BuildId::new("c-b3-deps").unwrap();
    state
        .apply(&CascadeEvent::LayerSuperseded {
            layer: name("deps"),
            by: newest.clone(),
        })
        .unwrap();
    state
        .apply(&CascadeEvent::LayerCompleted {
            layer: name("deps"),
            build_id: newest,
            unchanged: false,
        })
        .unwrap();
    assert!(state.apply(&superseded).is_err(), "a settled layer is not superseded");
    let next = cascade::decide(&state, &c, &id);
    assert_eq!(requested(&next), ["app"]);
}
