//! Table tests for every row of the transition table, impossible histories, and a crash
//! simulation: kill the driver after every k-th step, fold, resume, and compare.

use std::collections::{BTreeMap, BTreeSet};

use time::macros::datetime;

use super::*;
use crate::directives::fixtures::directives;
use crate::request::ContextRef;
use crate::sizing::{SizingInputs, SizingTier, resolve};

const T0: OffsetDateTime = datetime!(2026-11-21 12:00 UTC);

fn request() -> BuildRequest {
    BuildRequest {
        build_id: Some(BuildId::new("b1").unwrap()),
        directives: directives("ws"),
        context: ContextRef {
            manifest: "m".into(),
            files: 1,
            bytes: 1,
            sent_bytes: 1,
        },
        layer: None,
        cascade: None,
        parents: Default::default(),
    }
}

fn envelope(seq: u32, event: BuildEvent) -> Envelope {
    Envelope {
        build_id: BuildId::new("b1").unwrap(),
        workspace: Workspace::new("ws").unwrap(),
        seq,
        at: T0,
        worker: "w".into(),
        event,
    }
}

fn size(t: RunnerType) -> SizeDecision {
    SizeDecision {
        tier: SizingTier::Default,
        runner_type: t,
        time_budget_min: 60,
        reason: "test".into(),
    }
}

fn key(n: u8) -> LeaseKey {
    LeaseKey::for_attempt(&BuildId::new("b1").unwrap(), n)
}

/// The events of a build up to a named point, in order.
fn history(events: Vec<BuildEvent>) -> Vec<Envelope> {
    let mut all = vec![BuildEvent::Accepted {
        request: Box::new(request()),
    }];
    all.extend(events);
    all.into_iter()
        .enumerate()
        .map(|(i, e)| envelope(i as u32 + 1, e))
        .collect()
}

fn sized() -> BuildEvent {
    BuildEvent::Sized(size(RunnerType::Cax21))
}
fn started() -> BuildEvent {
    BuildEvent::Started {
        runner_type: RunnerType::Cax21,
    }
}
fn requested(n: u8, t: RunnerType) -> BuildEvent {
    BuildEvent::RunnerRequested {
        lease_key: key(n),
        provider: crate::directives::ComputeProvider::DockerLocal,
        runner_type: t,
    }
}
fn leased(n: u8) -> BuildEvent {
    BuildEvent::RunnerLeased {
        lease_key: key(n),
        lease_id: format!("lease-{n}"),
        host: "h".into(),
    }
}
fn synced(n: u8) -> BuildEvent {
    BuildEvent::ContextSynced {
        lease_key: key(n),
        files: 1,
        bytes: 1,
        transfer: Transfer::default(),
    }
}
fn built(n: u8) -> BuildEvent {
    BuildEvent::ImageBuilt {
        lease_key: key(n),
        image: request().directives.artifact.image,
        image_id: "sha256:abc".into(),
        duration_ms: 5,
        cpu_p95: None,
        mem_p95_gb: None,
        cache: None,
    }
}
fn metrics() -> BuildEvent {
    BuildEvent::MetricsRecorded {
        duration_ms: 5,
        cpu_p95: None,
        mem_p95_gb: None,
    }
}
fn destroyed(n: u8) -> BuildEvent {
    BuildEvent::RunnerDestroyed {
        lease_key: key(n),
        left_to_reaper: None,
    }
}
fn oom() -> BuildEvent {
    BuildEvent::StepFailed {
        step: Step::Build,
        reason: "exit 137".into(),
        oom: true,
    }
}

fn next(events: Vec<BuildEvent>) -> Decision {
    let state = fold(&history(events)).expect("a possible history");
    decide(&state, None, T0).expect("a decision")
}

fn kinds(d: &Decision) -> Vec<&'static str> {
    d.events.iter().map(BuildEvent::kind).collect()
}

#[test]
fn every_row_of_the_transition_table() {
    use Effect::*;
    let spawn = |n, t| SpawnRunner {
        lease_key: key(n),
        runner_type: t,
    };
    let cax21 = RunnerType::Cax21;
    // (history after accepted, events appended, effect)
    let rows: Vec<(Vec<BuildEvent>, Vec<&str>, Option<Effect>)> = vec![
        (vec![], vec![], Some(ResolveSize)),
        (
            vec![sized()],
            vec!["started", "runner_requested"],
            Some(spawn(1, cax21)),
        ),
        (
            vec![sized(), started()],
            vec!["runner_requested"],
            Some(spawn(1, cax21)),
        ),
        (
            vec![sized(), started(), requested(1, cax21)],
            vec![],
            Some(spawn(1, cax21)),
        ),
        (vec![sized(), started(), requested(1, cax21), leased(1)], vec![], None),
        (
            vec![sized(), started(), requested(1, cax21), leased(1), synced(1)],
            vec![],
            None,
        ),
        (
            vec![sized(), started(), requested(1, cax21), leased(1), synced(1), built(1)],
            vec![],
            None,
        ),
        (
            vec![
                sized(),
                started(),
                requested(1, cax21),
                leased(1),
                synced(1),
                built(1),
                metrics(),
            ],
            vec![],
            Some(DestroyRunner { lease_key: key(1) }),
        ),
        (
            vec![
                sized(),
                started(),
                requested(1, cax21),
                leased(1),
                synced(1),
                built(1),
                metrics(),
                destroyed(1),
            ],
            vec!["completed"],
            None,
        ),
        (
            vec![sized(), started(), requested(1, cax21), leased(1), synced(1), oom()],
            vec![],
            Some(DestroyRunner { lease_key: key(1) }),
        ),
        (
            vec![
                sized(),
                started(),
                requested(1, cax21),
                leased(1),
                synced(1),
                oom(),
                destroyed(1),
            ],
            vec!["oom_escalated", "runner_requested"],
            Some(spawn(2, RunnerType::Cax31)),
        ),
    ];
    for (i, (events, want_events, want_effect)) in rows.into_iter().enumerate() {
        let d = next(events);
        assert_eq!(kinds(&d), want_events, "row {i}");
        match (&want_effect, &d.effect) {
            (None, None) => {}
            (Some(want), Some(got)) => assert_eq!(got, want, "row {i}"),
            // rows whose effect carries a lease are checked by kind below
            (None, Some(got)) => assert!(
                matches!(got, SyncContext { .. } | RunBuild { .. } | RecordMetrics { .. }),
                "row {i}: {got:?}"
            ),
            (Some(want), None) => panic!("row {i}: wanted {want:?}, got no effect"),
        }
    }
    let lease_rows = [(4, "SyncContext"), (5, "RunBuild"), (6, "RecordMetrics")];
    let base = [sized(), started(), requested(1, cax21), leased(1), synced(1), built(1)];
    for (len, name) in lease_rows {
        let d = next(base[..len].to_vec());
        assert!(
            format!("{:?}", d.effect).starts_with(&format!("Some({name}")),
            "{name}: {:?}",
            d.effect
        );
    }
}

#[test]
fn terminal_and_failure_rows() {
    // terminal: nothing more to do
    let done = next(vec![
        sized(),
        started(),
        requested(1, RunnerType::Cax21),
        leased(1),
        synced(1),
        built(1),
        metrics(),
        destroyed(1),
        BuildEvent::Completed {
            image: request().directives.artifact.image,
            image_id: "sha256:abc".into(),
            layer: None,
            cascade: None,
            labels: Default::default(),
            cache: None,
        },
    ]);
    assert_eq!(done, Decision::default());

    // a non-OOM failure with the runner gone ends the build with the step's reason
    let failed = next(vec![
        sized(),
        started(),
        requested(1, RunnerType::Cax21),
        leased(1),
        BuildEvent::StepFailed {
            step: Step::SyncContext,
            reason: "disk full".into(),
            oom: false,
        },
        destroyed(1),
    ]);
    assert_eq!(kinds(&failed), vec!["failed"]);
    assert!(
        matches!(&failed.events[0], BuildEvent::Failed { reason, step: Some(Step::SyncContext), .. } if reason == "disk full")
    );

    // a second OOM fails with the hint (ADR-039)
    let second = next(vec![
        sized(),
        started(),
        requested(1, RunnerType::Cax21),
        leased(1),
        synced(1),
        oom(),
        destroyed(1),
        BuildEvent::OomEscalated {
            from: RunnerType::Cax21,
            to: RunnerType::Cax31,
        },
        requested(2, RunnerType::Cax31),
        leased(2),
        synced(2),
        oom(),
        destroyed(2),
    ]);
    assert_eq!(kinds(&second), vec!["failed"]);
    let BuildEvent::Failed { reason, .. } = &second.events[0] else {
        unreachable!()
    };
    assert!(reason.contains("set runner_type in .build-spec.ncl"), "{reason}");
    assert!(reason.contains("cax31"), "{reason}");
}

#[test]
fn an_oom_on_the_largest_tier_fails_without_retry() {
    let d = next(vec![
        BuildEvent::Sized(size(RunnerType::Cax41)),
        BuildEvent::Started {
            runner_type: RunnerType::Cax41,
        },
        requested(1, RunnerType::Cax41),
        leased(1),
        synced(1),
        oom(),
        destroyed(1),
    ]);
    assert_eq!(kinds(&d), vec!["failed"]);
}

#[test]
fn the_time_budget_is_checked_against_the_given_clock() {
    let state = fold(&history(vec![
        sized(),
        started(),
        requested(1, RunnerType::Cax21),
        leased(1),
    ]))
    .unwrap();
    let inside = decide(&state, None, T0 + time::Duration::minutes(59)).unwrap();
    assert!(inside.events.is_empty());
    let over = decide(&state, None, T0 + time::Duration::minutes(61)).unwrap();
    assert_eq!(kinds(&over), vec!["step_failed"]);
    assert!(matches!(
        &over.events[0],
        BuildEvent::StepFailed {
            step: Step::TimeBudget,
            ..
        }
    ));
}

#[test]
fn outcomes_become_their_events() {
    let state = fold(&history(vec![sized(), started(), requested(1, RunnerType::Cax21)])).unwrap();
    let d = decide(
        &state,
        Some(Outcome::RunnerLeased {
            lease_id: "l".into(),
            host: "h".into(),
        }),
        T0,
    )
    .unwrap();
    assert_eq!(kinds(&d), vec!["runner_leased"]);
    assert!(d.effect.is_none());
    let err = decide(&fold(&history(vec![])).unwrap(), Some(Outcome::RunnerDestroyed), T0).unwrap_err();
    assert!(matches!(err, LifecycleError::UnexpectedOutcome { .. }));
}

#[test]
fn impossible_histories_are_typed_errors() {
    let cases: Vec<Vec<BuildEvent>> = vec![
        vec![started()],
        vec![sized(), leased(1)],
        vec![
            sized(),
            started(),
            requested(1, RunnerType::Cax21),
            requested(2, RunnerType::Cax21),
        ],
        vec![sized(), started(), requested(1, RunnerType::Cax21), leased(1), built(1)],
        vec![
            sized(),
            started(),
            requested(1, RunnerType::Cax21),
            leased(1),
            synced(1),
            built(1),
            destroyed(1),
        ],
    ];
    for events in cases {
        let kinds: Vec<_> = events.iter().map(BuildEvent::kind).collect();
        let Err(err) = fold(&history(events)) else {
            panic!("{kinds:?} should be impossible");
        };
        assert!(matches!(err, LifecycleError::Impossible { .. }), "{kinds:?}: {err}");
    }
    // a failed build may not hold a runner
    let err = fold(&history(vec![
        sized(),
        started(),
        requested(1, RunnerType::Cax21),
        BuildEvent::Failed {
            reason: "x".into(),
            step: None,
            layer: None,
            cascade: None,
            labels: Default::default(),
        },
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("destroy it first"), "{err}");
    // out-of-order sequence numbers
    let mut h = history(vec![sized()]);
    h[1].seq = 5;
    assert!(matches!(
        fold(&h),
        Err(LifecycleError::OutOfOrder { expected: 2, found: 5 })
    ));
}

#[test]
fn a_malformed_request_history_is_one_failed_event() {
    let h = vec![envelope(
        1,
        BuildEvent::Failed {
            reason: "malformed".into(),
            step: Some(Step::Validate),
            layer: None,
            cascade: None,
            labels: Default::default(),
        },
    )];
    let state = fold(&h).unwrap();
    assert!(state.is_terminal());
}

/// A world for the simulated driver: runners by lease key, spawn idempotent by key.
#[derive(Default)]
struct World {
    spawns: BTreeMap<LeaseKey, u32>,
    live: BTreeSet<LeaseKey>,
    destroyed: BTreeSet<LeaseKey>,
    /// Tiers on which the build runs out of memory.
    oom_on: Vec<RunnerType>,
}

impl World {
    fn run(&mut self, effect: Effect, state: &State) -> Outcome {
        match effect {
            Effect::ResolveSize => Outcome::Sized(resolve(&SizingInputs::default()).unwrap()),
            Effect::SpawnRunner { lease_key, .. } => {
                if self.live.insert(lease_key.clone()) {
                    *self.spawns.entry(lease_key.clone()).or_default() += 1;
                }
                Outcome::RunnerLeased {
                    lease_id: format!("lease-{lease_key}"),
                    host: "local".into(),
                }
            }
            Effect::SyncContext { .. } => Outcome::ContextSynced {
                files: 3,
                bytes: 10,
                transfer: Transfer::default(),
            },
            Effect::RunBuild { lease } => {
                if self.oom_on.contains(&lease.runner_type) {
                    Outcome::StepFailed {
                        step: Step::Build,
                        reason: "exit 137".into(),
                        oom: true,
                    }
                } else {
                    Outcome::ImageBuilt {
                        image_id: "sha256:abc".into(),
                        duration_ms: 7,
                        cpu_p95: Some(1.5),
                        mem_p95_gb: Some(0.5),
                        cache: None,
                    }
                }
            }
            Effect::RecordMetrics { .. } => Outcome::MetricsRecorded {
                cpu_p95: None,
                mem_p95_gb: None,
            },
            Effect::DestroyRunner { lease_key } => {
                assert!(state.lease.as_ref().is_some_and(|l| l.key == lease_key));
                self.live.remove(&lease_key);
                self.destroyed.insert(lease_key);
                Outcome::RunnerDestroyed
            }
        }
    }
}

/// Runs the driver loop from the history; stops ("crashes") once `budget` steps (appends
/// and effects) have happened. Returns true when the build reached a terminal event.
fn drive(history: &mut Vec<Envelope>, world: &mut World, budget: &mut usize) -> bool {
    let mut state = fold(history.iter()).unwrap();
    let mut outcome = None;
    loop {
        let decision = decide(&state, outcome.take(), T0).unwrap();
        for event in decision.events {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            let e = envelope(state.len + 1, event);
            state.apply(&e).unwrap();
            history.push(e);
        }
        match decision.effect {
            Some(effect) => {
                if *budget == 0 {
                    return false;
                }
                *budget -= 1;
                outcome = Some(world.run(effect, &state));
            }
            None if state.is_terminal() => return true,
            None => {}
        }
    }
}

fn crash_free(oom_on: Vec<RunnerType>) -> (Vec<Envelope>, World) {
    let mut history = history(vec![]);
    let mut world = World {
        oom_on,
        ..Default::default()
    };
    assert!(drive(&mut history, &mut world, &mut usize::MAX.clone()));
    (history, world)
}

#[test]
fn a_crash_after_any_step_resumes_to_the_same_end_without_leaks() {
    for oom_on in [
        vec![],
        vec![RunnerType::Cax21],
        vec![RunnerType::Cax21, RunnerType::Cax31],
    ] {
        let (reference, ref_world) = crash_free(oom_on.clone());
        let steps = reference.len() + ref_world.spawns.len() * 4 + 8;
        for k in 0..steps {
            let mut history = history(vec![]);
            let mut world = World {
                oom_on: oom_on.clone(),
                ..Default::default()
            };
            let mut budget = k;
            let mut finished = drive(&mut history, &mut world, &mut budget);
            let mut restarts = 0;
            while !finished {
                restarts += 1;
                assert!(restarts < 100, "no progress after a crash at step {k}");
                let mut unlimited = usize::MAX;
                finished = drive(&mut history, &mut world, &mut unlimited);
            }
            let last = &history.last().unwrap().event;
            assert_eq!(
                last,
                &reference.last().unwrap().event,
                "crash at {k}, oom on {oom_on:?}"
            );
            assert_eq!(
                history.iter().map(|e| e.event.kind()).collect::<Vec<_>>(),
                reference.iter().map(|e| e.event.kind()).collect::<Vec<_>>(),
                "the story reads the same after a crash at {k}"
            );
            assert!(
                world.spawns.values().all(|n| *n == 1),
                "one spawn per lease key: {:?}",
                world.spawns
            );
            assert!(world.live.is_empty(), "no runner left: {:?}", world.live);
            assert_eq!(
                world.destroyed,
                world.spawns.keys().cloned().collect(),
                "a destroy for every lease"
            );
        }
    }
}

#[test]
fn the_oom_story_is_bounded_by_adr_039() {
    let (once, _) = crash_free(vec![RunnerType::Cax21]);
    assert!(matches!(once.last().unwrap().event, BuildEvent::Completed { .. }));
    assert_eq!(once.iter().filter(|e| e.event.kind() == "oom_escalated").count(), 1);
    let (twice, world) = crash_free(vec![RunnerType::Cax21, RunnerType::Cax31]);
    assert!(matches!(twice.last().unwrap().event, BuildEvent::Failed { .. }));
    assert_eq!(world.spawns.len(), 1 + usize::from(MAX_OOM_RETRIES));
}

/// Runs the driver loop, injecting a cancel at the `at`-th safe point (before an effect,
/// with no failure pending), as the worker does when `lian cancel` was asked.
fn drive_with_cancel(world: &mut World, at: usize) -> Vec<Envelope> {
    let mut history = history(vec![]);
    let mut state = fold(history.iter()).unwrap();
    let mut outcome = None;
    let mut safe_points = 0;
    loop {
        let decision = decide(&state, outcome.take(), T0).unwrap();
        for event in decision.events {
            let e = envelope(state.len + 1, event);
            state.apply(&e).unwrap();
            history.push(e);
        }
        match decision.effect {
            Some(effect) => {
                if state.failure.is_none() {
                    safe_points += 1;
                    if safe_points == at {
                        outcome = Some(Outcome::StepFailed {
                            step: Step::Cancelled,
                            reason: "cancelled".into(),
                            oom: false,
                        });
                        continue;
                    }
                }
                outcome = Some(world.run(effect, &state));
            }
            None if state.is_terminal() => return history,
            None => {}
        }
    }
}

#[test]
fn a_cancel_at_any_safe_point_ends_failed_with_every_runner_destroyed() {
    for oom_on in [vec![], vec![RunnerType::Cax21]] {
        for at in 1..12 {
            let mut world = World {
                oom_on: oom_on.clone(),
                ..Default::default()
            };
            let history = drive_with_cancel(&mut world, at);
            let last = &history.last().unwrap().event;
            assert!(
                matches!(
                    last,
                    BuildEvent::Failed {
                        step: Some(Step::Cancelled),
                        ..
                    }
                ) || matches!(last, BuildEvent::Completed { .. }),
                "cancel at safe point {at}: {last:?}"
            );
            assert!(world.live.is_empty(), "cancel at {at} left {:?}", world.live);
            // A lease requested but never spawned is destroyed too: the spawn may have
            // happened without being recorded, and destroying nothing is harmless.
            assert!(
                world.spawns.keys().all(|k| world.destroyed.contains(k)),
                "cancel at {at}"
            );
        }
    }
}

#[test]
fn a_superseded_build_ends_before_it_starts_and_only_then() {
    let by = BuildId::new("c-2-app").unwrap();
    let superseded = BuildEvent::Superseded {
        by: by.clone(),
        layer: None,
        cascade: None,
    };
    let state = fold(&[envelope(1, superseded.clone())]).unwrap();
    assert_eq!(state.terminal, Some(Terminal::Superseded { by }));
    let decision = decide(&state, None, T0).unwrap();
    assert!(
        decision.events.is_empty() && decision.effect.is_none(),
        "nothing follows"
    );
    let accepted = BuildEvent::Accepted {
        request: Box::new(request()),
    };
    assert!(
        fold(&[envelope(1, accepted), envelope(2, superseded)]).is_err(),
        "a build a worker took is not superseded"
    );
}
