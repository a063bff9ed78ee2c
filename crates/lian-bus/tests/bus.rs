//! lian-bus against a real nats-server.

use std::time::Duration;

use lian_bus::{After, Bus, BusError, ContextLimits, Topology};
use lian_test_support::NatsServer;

async fn bus(server: &NatsServer) -> Bus {
    let bus = Bus::connect(&server.url, "test", Duration::from_secs(5)).await.unwrap();
    bus.ensure_topology(&Topology::default()).await.unwrap();
    bus
}

#[tokio::test]
async fn topology_is_idempotent() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    bus.ensure_topology(&Topology::default()).await.unwrap();
}

#[tokio::test]
async fn appends_are_deduplicated_by_message_id_and_read_back_in_order() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let first = bus
        .append("lian.ws.build.b1.accepted", "b1.1", &serde_json::json!({"n": 1}))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = bus
        .append("lian.ws.build.b1.accepted", "b1.1", &serde_json::json!({"n": 99}))
        .await
        .unwrap();
    assert!(again.duplicate, "a second writer of event 1 writes nothing");
    bus.append("lian.ws.build.b1.started", "b1.2", &serde_json::json!({"n": 2}))
        .await
        .unwrap();
    bus.append("lian.ws.build.b2.started", "b2.1", &serde_json::json!({"n": 3}))
        .await
        .unwrap();
    let history = bus.read_all("lian.*.build.b1.*").await.unwrap();
    let ns: Vec<i64> = history
        .iter()
        .map(|r| r.decode::<serde_json::Value>().unwrap()["n"].as_i64().unwrap())
        .collect();
    assert_eq!(ns, [1, 2]);
    assert!(bus.read_all("lian.*.build.none.*").await.unwrap().is_empty());
}

#[tokio::test]
async fn of_two_writers_expecting_the_same_history_only_one_appends() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let filter = "lian.*.build.b7.*".to_string();
    let first = bus
        .append_after(
            "lian.ws.build.b7.accepted",
            "b7.1",
            &1,
            &After {
                filter: filter.clone(),
                sequence: 0,
            },
        )
        .await
        .unwrap();
    // Both writers read the history up to `first` and append the next event.
    let after = After {
        filter: filter.clone(),
        sequence: first.stream_sequence,
    };
    bus.append_after("lian.ws.build.b7.sized", "b7.2-a", &2, &after)
        .await
        .unwrap();
    let loser = bus
        .append_after("lian.ws.build.b7.started", "b7.2-b", &3, &after)
        .await
        .unwrap_err();
    assert!(matches!(loser, BusError::Conflict { .. }), "{loser}");
    // a fresh history must really be fresh
    let stale = bus
        .append_after(
            "lian.ws.build.b7.accepted",
            "b7.1-again",
            &4,
            &After { filter, sequence: 0 },
        )
        .await
        .unwrap_err();
    assert!(matches!(stale, BusError::Conflict { .. }));
    // other builds are not affected
    bus.append_after(
        "lian.ws.build.b8.accepted",
        "b8.1",
        &5,
        &After {
            filter: "lian.*.build.b8.*".into(),
            sequence: 0,
        },
    )
    .await
    .unwrap();
    assert_eq!(bus.read_all("lian.*.build.b7.*").await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_unchanged_context_is_not_uploaded_twice() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    std::fs::write(dir.path().join("bin/tool"), vec![7u8; 300_000]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path().join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();

    let (ctx, first) = upload(&bus, dir.path()).await;
    assert_eq!((ctx.files, first.uploaded_files), (2, 2));
    let (again, second) = upload(&bus, dir.path()).await;
    assert_eq!(again.manifest, ctx.manifest, "same content, same manifest");
    assert_eq!(second.uploaded_files, 0, "nothing travels twice");

    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY bin /bin\n").unwrap();
    let (changed, third) = upload(&bus, dir.path()).await;
    assert_ne!(changed.manifest, ctx.manifest);
    assert_eq!(third.uploaded_files, 1, "only the changed file");

    let out = tempfile::tempdir().unwrap();
    let got = bus
        .download_context(&changed, out.path(), &ContextLimits::default())
        .await
        .unwrap();
    assert_eq!((got.files, got.bytes), (2, changed.bytes));
    assert_eq!(std::fs::read(out.path().join("bin/tool")).unwrap().len(), 300_000);
    let mode = std::fs::metadata(out.path().join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_ne!(mode & 0o111, 0, "the executable bit survives");
    assert_eq!(
        bus.context_file(&changed, "Dockerfile", 1 << 20)
            .await
            .unwrap()
            .unwrap(),
        b"FROM scratch\nCOPY bin /bin\n"
    );
    assert!(
        bus.context_file(&changed, ".build-spec.ncl", 1 << 20)
            .await
            .unwrap()
            .is_none()
    );
}

async fn upload(bus: &Bus, dir: &std::path::Path) -> (lian_core::ContextRef, lian_bus::UploadStats) {
    bus.upload_context(dir, &["Dockerfile"], "ws", &ContextLimits::default(), &mut |_| {})
        .await
        .unwrap()
}

/// Reading contexts leaves nothing behind on the server: no consumer per read (the object
/// store left one per file for 30 s, and 1,000 of them stopped the fleet), and the stream
/// holds each content once however often it is uploaded and read.
#[tokio::test]
async fn context_reads_leave_no_server_state() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    for i in 0..2600 {
        let sub = dir.path().join(format!("d{}", i % 30));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}.rs")), format!("// file {i}\n").repeat(i % 7 + 1)).unwrap();
    }
    std::fs::write(
        dir.path().join("big.bin"),
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    let (ctx, first) = upload(&bus, dir.path()).await;
    assert_eq!(ctx.files, 2602, "a manifest of more than one chunk");
    assert_eq!(first.uploaded_bytes, ctx.bytes, "a cold upload sends everything once");
    let before = bus.context_store_state().await.unwrap();
    // Whole downloads are few (each writes 2,600 files: the disk is the cost, not NATS);
    // reads of one file and of the manifest are what a busy fleet does most.
    for round in 0..50 {
        if round % 10 == 0 {
            let out = tempfile::tempdir().unwrap();
            let got = bus
                .download_context(&ctx, out.path(), &ContextLimits::default())
                .await
                .unwrap();
            assert_eq!(got.files, 2602, "round {round}");
            assert_eq!(std::fs::read(out.path().join("d7/f7.rs")).unwrap(), b"// file 7\n");
            let (again, stats) = upload(&bus, dir.path()).await;
            assert_eq!(
                (&again.manifest, stats.uploaded_bytes),
                (&ctx.manifest, 0),
                "round {round}"
            );
        }
        let file = bus.context_file(&ctx, "Dockerfile", 1 << 20).await.unwrap();
        assert_eq!(file.as_deref(), Some(&b"FROM scratch\n"[..]), "round {round}");
    }
    let after = bus.context_store_state().await.unwrap();
    assert_eq!(
        after, before,
        "no consumers, no new messages after 55 reads and 5 uploads"
    );
    assert_eq!(before.consumers, 0, "no consumer on the context stream");
}

/// Where the time of a 20,000-file context goes (run by hand: `--ignored --nocapture`).
#[tokio::test]
#[ignore]
async fn twenty_thousand_files_upload_and_download_timing() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    for i in 0..20_000u32 {
        let sub = dir.path().join(format!("c{}/m{}", i % 50, i % 17));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}.rs")), format!("pub const N{i}: u32 = {i};\n")).unwrap();
    }
    let t = std::time::Instant::now();
    let (ctx, _) = upload(&bus, dir.path()).await;
    eprintln!("upload {:?}", t.elapsed());
    let out = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    bus.download_context(&ctx, out.path(), &ContextLimits::default())
        .await
        .unwrap();
    eprintln!("download {:?}", t.elapsed());
}

/// Fencing (ADR lian-045): of many writers racing to extend one history, one append is
/// stored, and a subscriber of `lian.>` sees exactly what is stored: no refused append, no
/// duplicate, ever reaches the wire.
#[tokio::test]
async fn only_stored_events_reach_subscribers() {
    use futures::StreamExt;
    let server = NatsServer::start();
    let bus = bus(&server).await;
    let mut wire = bus.subscribe("lian.>").await.unwrap();
    bus.flush().await.unwrap();
    let filter = "lian.*.build.race.*".to_string();
    let first = bus
        .append_after(
            "lian.ws.build.race.accepted",
            "race.1",
            &0,
            &After {
                filter: filter.clone(),
                sequence: 0,
            },
        )
        .await
        .unwrap();
    let after = After {
        filter: filter.clone(),
        sequence: first.stream_sequence,
    };
    let racers = (1..=8).map(|n| {
        let (bus, after) = (bus.clone(), after.clone());
        async move {
            bus.append_after("lian.ws.build.race.sized", &format!("race.2-{n}"), &n, &after)
                .await
        }
    });
    let results = futures::future::join_all(racers).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "exactly one racer appends: {results:?}");
    assert!(
        results
            .iter()
            .all(|r| r.is_ok() || matches!(r, Err(BusError::Conflict { .. }))),
        "{results:?}"
    );
    // A duplicate of the stored first event: not stored again, so not on the wire again.
    let dup = bus.append("lian.ws.build.race.accepted", "race.1", &99).await.unwrap();
    assert!(dup.duplicate);
    // The end marker: stored, so it is the last thing on the wire for this build.
    bus.append("lian.ws.build.race.marker", "race.marker", &"end")
        .await
        .unwrap();

    let stored = bus.read_all(&filter).await.unwrap();
    assert_eq!(stored.len(), 3, "accepted, the one winner, the marker");
    let mut seen = Vec::new();
    while seen.len() < 16 {
        let message = tokio::time::timeout(Duration::from_secs(10), wire.next())
            .await
            .expect("the stored events reach the wire")
            .unwrap();
        let done = message.subject.as_str() == "lian.ws.build.race.marker";
        seen.push((message.subject.to_string(), message.payload.clone()));
        if done {
            break;
        }
    }
    let stored: Vec<(String, bytes::Bytes)> = stored.into_iter().map(|r| (r.subject, r.payload)).collect();
    assert_eq!(seen, stored, "the wire carries exactly the stored history, in order");
    let last = bus.read_all(&filter).await.unwrap().last().unwrap().sequence;
    assert_eq!(
        bus.head(&filter).await.unwrap(),
        last,
        "the head is the last stored event"
    );
    assert_eq!(bus.head("lian.*.build.nobody.*").await.unwrap(), 0);
}

#[tokio::test]
async fn a_workspace_s_newest_metrics_are_read_in_the_order_they_were_recorded() {
    let server = NatsServer::start();
    let bus = bus(&server).await;
    // Build ids are random: key order is not age. Another workspace's records interleave.
    let ids = ["r9", "r1", "r5", "r3", "r7", "r2"];
    for (n, id) in ids.iter().enumerate() {
        bus.record_metrics(&format!("ws.{id}"), &serde_json::json!({"n": n}))
            .await
            .unwrap();
        for m in 0..25 {
            bus.record_metrics(&format!("other.{id}x{m}"), &serde_json::json!({"m": m}))
                .await
                .unwrap();
        }
    }
    let newest: Vec<u64> = bus
        .workspace_metrics("ws", 4)
        .await
        .unwrap()
        .iter()
        .map(|v| v["n"].as_u64().unwrap())
        .collect();
    assert_eq!(newest, [5, 4, 3, 2], "the four recorded last, newest first");
    let all = bus.workspace_metrics("ws", 20).await.unwrap();
    assert_eq!(all.len(), ids.len(), "fewer than asked: every one");
    assert!(bus.workspace_metrics("none", 20).await.unwrap().is_empty());
}
