//! lian-bus against a real nats-server.

use std::time::Duration;

use lian_bus::{After, Bus, BusError, Topology};
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

    let (ctx, first) = bus.upload_context(dir.path()).await.unwrap();
    assert_eq!((ctx.files, first.uploaded_files), (2, 2));
    let (again, second) = bus.upload_context(dir.path()).await.unwrap();
    assert_eq!(again, ctx, "same content, same manifest");
    assert_eq!(second.uploaded_files, 0, "nothing travels twice");

    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\nCOPY bin /bin\n").unwrap();
    let (changed, third) = bus.upload_context(dir.path()).await.unwrap();
    assert_ne!(changed.manifest, ctx.manifest);
    assert_eq!(third.uploaded_files, 1, "only the changed file");

    let out = tempfile::tempdir().unwrap();
    let (files, bytes) = bus.download_context(&changed, out.path()).await.unwrap();
    assert_eq!((files, bytes), (2, changed.bytes));
    assert_eq!(std::fs::read(out.path().join("bin/tool")).unwrap().len(), 300_000);
    let mode = std::fs::metadata(out.path().join("bin/tool"))
        .unwrap()
        .permissions()
        .mode();
    assert_ne!(mode & 0o111, 0, "the executable bit survives");
    assert_eq!(
        bus.context_file(&changed, "Dockerfile").await.unwrap().unwrap(),
        b"FROM scratch\nCOPY bin /bin\n"
    );
    assert!(bus.context_file(&changed, ".build-spec.ncl").await.unwrap().is_none());
}
