//! Streams, consumers and buckets, created idempotently: running this against a server that
//! already has them changes nothing (or updates a setting we changed).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use lian_core::subjects;

use crate::direct::{Batch, header, kv_removed};
use crate::{Bus, BusError, Record};

/// The settings of the topology that an operator may want to change.
#[derive(Debug, Clone)]
pub struct Topology {
    /// How long a worker may go silent on a request before another worker gets it. Workers
    /// heartbeat at a third of this.
    pub ack_wait: Duration,
    /// Deliveries of one request before it is dead-lettered.
    pub max_deliver: i64,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Largest request payload accepted.
    pub max_request_bytes: i32,
    /// Copies of every stream and bucket the topology creates; 0 means as many as the
    /// cluster has servers up, up to 3 (1 for a lone server), and never fewer than a stream
    /// has already (a node that is down must not shrink the streams). Streams that exist
    /// with fewer are raised (and the change logged).
    pub replicas: usize,
}

/// One stream (a key-value bucket is the stream `KV_<bucket>`) as the cluster holds it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamStatus {
    pub stream: String,
    /// Copies asked for.
    pub replicas: usize,
    /// The server leading it (empty on a lone server, or while the cluster elects one).
    pub leader: String,
    /// The other copies.
    pub followers: Vec<ReplicaState>,
    pub messages: u64,
}

/// A follower copy of a stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaState {
    pub server: String,
    /// Caught up with the leader.
    pub current: bool,
    /// Operations behind the leader.
    pub lag: u64,
    /// Not heard from (a server that is down).
    pub offline: bool,
}

/// The key-value buckets the topology creates.
const BUCKETS: [&str; 6] = [
    subjects::METRICS_BUCKET,
    subjects::DEAD_LETTER_BUCKET,
    subjects::SIZING_BUCKET,
    subjects::LEASE_BUCKET,
    subjects::REGISTRY_GRANT_BUCKET,
    subjects::LAYER_BUCKET,
];

impl Default for Topology {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            duplicate_window: Duration::from_secs(120),
            max_request_bytes: 1024 * 1024,
            // As the fleet's own default (`nats_replicas = 0`): whoever creates the topology
            // first creates it as the roles will want it. With 1 here, the fleet benchmark
            // created R1 streams on a three-node cluster and its first worker raised them to
            // R3, which left the request stream without a leader for 10 s while the bench
            // published.
            replicas: 0,
        }
    }
}

impl Bus {
    /// Servers in the cluster this connection reached (1 for a lone server), as the server
    /// advertises them to clients.
    pub fn cluster_size(&self) -> usize {
        let info = self.client.server_info();
        match info.cluster {
            Some(_) => info.connect_urls.len().max(1),
            None => 1,
        }
    }

    /// The replica count `t` asks for a stream that has `existing` copies: its own, or (0)
    /// min(3, cluster size) but never fewer than it has.
    pub fn replicas_for(&self, t: &Topology, existing: Option<usize>) -> usize {
        match t.replicas {
            0 => self.cluster_size().min(3).max(existing.unwrap_or(0)),
            n => n,
        }
    }

    /// Creates (or updates) the topology. A clustered server that is still electing its
    /// JetStream leader answers "temporarily unavailable": that is retried for up to 30 s,
    /// so a fleet can start together with its cluster.
    pub async fn ensure_topology(&self, t: &Topology) -> Result<(), BusError> {
        use backon::{ConstantBuilder, Retryable};
        let every = ConstantBuilder::new()
            .with_delay(Duration::from_millis(250))
            .with_max_times(120);
        (|| self.try_ensure_topology(t))
            .retry(every)
            .when(|e| matches!(e, BusError::Nats { message, .. } if retryable(message)))
            .notify(|e, _| tracing::debug!(%e, "JetStream not ready yet"))
            .await
    }

    async fn try_ensure_topology(&self, t: &Topology) -> Result<(), BusError> {
        let requests = stream::Config {
            name: subjects::REQUESTS_STREAM.into(),
            description: Some("lian build requests: a work queue shared by all workers".into()),
            subjects: vec![subjects::ALL_REQUESTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: t.duplicate_window,
            max_message_size: t.max_request_bytes,
            ..Default::default()
        };
        let events = stream::Config {
            name: subjects::EVENTS_STREAM.into(),
            description: Some("lian build and cascade histories".into()),
            // Appends come in on `_lian.append.lian.…`, are stored as `lian.…` and reach
            // `lian.>` only once stored (ADR lian-045).
            subjects: subjects::EVENT_APPENDS.iter().map(|s| s.to_string()).collect(),
            subject_transform: Some(stream::SubjectTransform {
                source: format!("{}.{}.>", subjects::APPEND_PREFIX, subjects::PREFIX),
                destination: format!("{}.>", subjects::PREFIX),
            }),
            republish: Some(stream::Republish {
                source: format!("{}.>", subjects::PREFIX),
                destination: format!("{}.>", subjects::PREFIX),
                headers_only: false,
            }),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            duplicate_window: t.duplicate_window,
            allow_direct: true,
            ..Default::default()
        };
        let control = stream::Config {
            name: subjects::CONTROL_STREAM.into(),
            description: Some("lian cancel requests and reaper records".into()),
            subjects: vec![subjects::ALL_CANCELS.into(), subjects::ALL_REAPED.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_messages_per_subject: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            allow_direct: true,
            ..Default::default()
        };
        let contexts = stream::Config {
            name: crate::context::STREAM.into(),
            description: Some("build contexts: content-addressed chunks and their completion markers".into()),
            subjects: vec![crate::context::STREAM_SUBJECTS.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            // Content-addressed: a second write of a chunk replaces the first, never adds.
            max_messages_per_subject: 1,
            max_age: crate::context::RETENTION,
            allow_direct: true,
            ..Default::default()
        };
        for mut config in [requests, events, control, contexts] {
            let before = self.stream_replicas(&config.name).await?;
            let replicas = self.replicas_for(t, before);
            config.num_replicas = replicas;
            let name = config.name.clone();
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|e| BusError::nats("create stream", e))?;
            report_raised(&name, before, replicas);
        }
        self.js
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some(subjects::WORKERS_CONSUMER.into()),
                    description: Some("every lian worker pulls build requests from here".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: t.ack_wait,
                    max_deliver: t.max_deliver,
                    ..Default::default()
                },
                subjects::REQUESTS_STREAM,
            )
            .await
            .map_err(|e| BusError::nats("create workers consumer", e))?;
        self.js
            .create_consumer_on_stream(
                consumer::pull::Config {
                    durable_name: Some(subjects::CASCADE_CONSUMER.into()),
                    description: Some("the cascade service reads terminal build events and approvals".into()),
                    filter_subjects: subjects::CASCADE_INPUTS.iter().map(|s| s.to_string()).collect(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: t.ack_wait,
                    max_deliver: t.max_deliver,
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                },
                subjects::EVENTS_STREAM,
            )
            .await
            .map_err(|e| BusError::nats("create cascade consumer", e))?;
        for (bucket, description, max_age) in [
            (
                subjects::METRICS_BUCKET,
                "per-build metrics, keyed <workspace>.<build-id>",
            ),
            (subjects::DEAD_LETTER_BUCKET, "requests given up on, keyed <build-id>"),
            (subjects::SIZING_BUCKET, "tier-2 sizing approvals, keyed <workspace>"),
            (
                subjects::LEASE_BUCKET,
                "the control plane's runner leases, keyed <lease-key>",
            ),
            (
                subjects::LAYER_BUCKET,
                "each catalog layer's latest completed image, keyed <layer>",
            ),
        ]
        .into_iter()
        .map(|(bucket, description)| (bucket, description, Duration::ZERO))
        .chain([(
            subjects::REGISTRY_GRANT_BUCKET,
            "the registry gate's grants, keyed <username>; they expire with their grant",
            Duration::from_secs(lian_core::control::REGISTRY_GRANT_MAX_SECS),
        )]) {
            let before = self.stream_replicas(&format!("KV_{bucket}")).await?;
            let replicas = self.replicas_for(t, before);
            if before != Some(replicas) {
                self.js
                    .create_or_update_key_value(jetstream::kv::Config {
                        bucket: bucket.into(),
                        description: description.into(),
                        storage: stream::StorageType::File,
                        num_replicas: replicas,
                        history: 1,
                        // Zero keeps entries for ever.
                        max_age,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| BusError::nats("create key-value bucket", e))?;
                report_raised(bucket, before, replicas);
            }
        }
        Ok(())
    }

    /// The replica count of a stream that exists, `None` if it does not. Any other failure
    /// (a cluster electing a leader times out) is an error, never "absent": taking it for
    /// absent would create the stream anew with the replicas of the servers up right now.
    async fn stream_replicas(&self, name: &str) -> Result<Option<usize>, BusError> {
        use async_nats::jetstream::ErrorCode;
        use async_nats::jetstream::context::GetStreamErrorKind;
        match self.js.get_stream(name).await {
            Ok(mut stream) => {
                let info = stream.info().await.map_err(|e| BusError::nats("stream info", e))?;
                Ok(Some(info.config.num_replicas))
            }
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
                _ => Err(BusError::nats("stream info", e)),
            },
        }
    }

    /// Every stream and bucket of the topology: copies, leader, followers and how far each
    /// is behind; for `lian nats status` and for finding a leader to fail over.
    pub async fn topology_status(&self) -> Result<Vec<StreamStatus>, BusError> {
        let names = [
            subjects::REQUESTS_STREAM,
            subjects::EVENTS_STREAM,
            subjects::CONTROL_STREAM,
            crate::context::STREAM,
        ]
        .into_iter()
        .map(String::from)
        .chain(BUCKETS.iter().map(|b| format!("KV_{b}")));
        let mut out = Vec::new();
        for name in names {
            let mut stream = self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| BusError::nats("open stream", e))?;
            let info = stream.info().await.map_err(|e| BusError::nats("stream info", e))?;
            let cluster = info.cluster.clone();
            out.push(StreamStatus {
                stream: name,
                replicas: info.config.num_replicas,
                leader: cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default(),
                followers: cluster
                    .map(|c| {
                        c.replicas
                            .into_iter()
                            .map(|r| ReplicaState {
                                server: r.name,
                                current: r.current,
                                lag: r.lag.unwrap_or(0),
                                offline: r.offline,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                messages: info.state.messages,
            });
        }
        Ok(out)
    }

    /// Records one build's metrics (step 6), keyed `<workspace>.<build-id>`.
    pub async fn record_metrics(&self, key: &str, value: &serde_json::Value) -> Result<(), BusError> {
        self.kv_put(subjects::METRICS_BUCKET, key, value).await
    }

    /// Records a request given up on, for `lian dead-letters`.
    pub async fn record_dead_letter(&self, key: &str, value: &serde_json::Value) -> Result<(), BusError> {
        self.kv_put(subjects::DEAD_LETTER_BUCKET, key, value).await
    }

    /// Every dead-letter record, in key order.
    pub async fn dead_letters(&self) -> Result<Vec<serde_json::Value>, BusError> {
        Ok(self
            .kv_entries(subjects::DEAD_LETTER_BUCKET, "")
            .await?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Every metrics record of a catalog layer's build, whatever the workspace: what
    /// `lian catalog plan --estimate` reads.
    pub async fn layer_metrics(&self) -> Result<Vec<lian_core::control::MetricsRecord>, BusError> {
        Ok(self
            .kv_entries(subjects::METRICS_BUCKET, "")
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_value::<lian_core::control::MetricsRecord>(v).ok())
            .filter(|r| r.layer.is_some())
            .collect())
    }

    /// The metrics records of a workspace's newest `n` builds, newest first (in the order
    /// they were recorded: build ids are random, so their order says nothing of age).
    /// Read back from the workspace's newest record, over a span of the bucket that widens
    /// until it holds `n` of them, so the cost follows `n` and not the fleet's history; each
    /// read is one direct get, no consumer.
    pub async fn workspace_metrics(&self, workspace: &str, n: usize) -> Result<Vec<serde_json::Value>, BusError> {
        const WHAT: &str = "read metrics";
        let stream = format!("KV_{}", subjects::METRICS_BUCKET);
        let filter = format!("$KV.{}.{workspace}.>", subjects::METRICS_BUCKET);
        let newest = self
            .direct_batch(
                &stream,
                &Batch::Last {
                    multi_last: std::slice::from_ref(&filter),
                    batch: 1,
                },
                WHAT,
            )
            .await?;
        let Some(newest) = newest.first().and_then(|m| header(m.headers.as_ref(), "Nats-Sequence")) else {
            return Ok(Vec::new());
        };
        let newest: u64 = newest.parse().map_err(|e| BusError::nats(WHAT, e))?;
        let mut span = 2 * n as u64;
        loop {
            let seq = newest.saturating_sub(span).max(1);
            let request = Batch::From {
                seq,
                next_by_subj: &filter,
                // Everything up to the newest: this workspace has at most span + 1 there.
                batch: span as usize + 1,
            };
            let messages = self.direct_batch(&stream, &request, WHAT).await?;
            let records: Vec<serde_json::Value> = messages
                .iter()
                .rev()
                .filter(|m| !kv_removed(m.headers.as_ref()))
                .filter_map(|m| serde_json::from_slice(&m.payload).ok())
                .take(n)
                .collect();
            if records.len() >= n || seq == 1 {
                return Ok(records);
            }
            span *= 4;
        }
    }

    /// What tier 2 sizing sees for a workspace: the P95 of its recent builds' usage (when it
    /// has enough builds with usage) and whether an operator approved using it.
    pub async fn sizing_history(&self, workspace: &str) -> Result<lian_core::sizing::SizingHistory, BusError> {
        let (recent, approval) = tokio::try_join!(
            self.workspace_metrics(workspace, lian_core::sizing::HISTORY_WINDOW),
            self.sizing_approval(workspace),
        )?;
        let usage: Vec<(f64, f64)> = recent
            .iter()
            .filter_map(|m| Some((m["cpu_p95"].as_f64()?, m["mem_p95_gb"].as_f64()?)))
            .collect();
        let escalations: Vec<_> = recent
            .iter()
            .filter_map(|m| serde_json::from_value::<lian_core::control::MetricsRecord>(m.clone()).ok())
            .filter_map(|m| Some((m.oom_from?, m.runner_type?, m.build_id.to_string(), m.at)))
            .collect();
        Ok(lian_core::sizing::SizingHistory {
            p95: lian_core::sizing::workspace_p95(&usage),
            approved: approval.is_some(),
            learned: lian_core::sizing::learned_from_oom(&escalations),
        })
    }

    /// The tier-2 approval of a workspace, if an operator gave one.
    pub async fn sizing_approval(&self, workspace: &str) -> Result<Option<serde_json::Value>, BusError> {
        let key = [format!("$KV.{}.{workspace}", subjects::SIZING_BUCKET)];
        let request = Batch::Last {
            multi_last: &key,
            batch: 1,
        };
        let found = self
            .direct_batch(
                &format!("KV_{}", subjects::SIZING_BUCKET),
                &request,
                "read sizing approval",
            )
            .await?;
        Ok(found
            .first()
            .filter(|m| !kv_removed(m.headers.as_ref()))
            .map(|m| serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null)))
    }

    /// Records (or, with `None`, withdraws) a workspace's tier-2 approval.
    pub async fn set_sizing_approval(
        &self,
        workspace: &str,
        approval: Option<&serde_json::Value>,
    ) -> Result<(), BusError> {
        match approval {
            Some(v) => self.kv_put(subjects::SIZING_BUCKET, workspace, v).await,
            None => {
                let kv = self.kv(subjects::SIZING_BUCKET).await?;
                kv.purge(workspace)
                    .await
                    .map_err(|e| BusError::nats("withdraw approval", e))
            }
        }
    }

    /// Records a control-plane lease (created or updated).
    pub async fn record_lease(&self, lease: &lian_core::control::Lease) -> Result<(), BusError> {
        let value = serde_json::to_value(lease).expect("json");
        self.kv_put(subjects::LEASE_BUCKET, lease.lease_id.as_str(), &value)
            .await
    }

    /// Every lease the control plane holds, in key order.
    pub async fn leases(&self) -> Result<Vec<lian_core::control::Lease>, BusError> {
        Ok(self
            .kv_entries(subjects::LEASE_BUCKET, "")
            .await?
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_value(v).ok())
            .collect())
    }

    /// The lease recorded under `key`, if any.
    pub async fn lease(&self, key: &lian_core::LeaseKey) -> Result<Option<lian_core::control::Lease>, BusError> {
        let kv = self.kv(subjects::LEASE_BUCKET).await?;
        let bytes = kv
            .get(key.as_str())
            .await
            .map_err(|e| BusError::nats("read lease", e))?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Forgets a lease whose runner is destroyed.
    pub async fn forget_lease(&self, key: &lian_core::LeaseKey) -> Result<(), BusError> {
        let kv = self.kv(subjects::LEASE_BUCKET).await?;
        kv.purge(key.as_str())
            .await
            .map_err(|e| BusError::nats("forget lease", e))
    }

    /// Records a registry grant (the gate reads it back by username).
    pub async fn record_registry_grant(&self, grant: &lian_core::control::RegistryGrantRecord) -> Result<(), BusError> {
        let value = serde_json::to_value(grant).expect("json");
        self.kv_put(subjects::REGISTRY_GRANT_BUCKET, &grant.username, &value)
            .await
    }

    /// The grant recorded under `username`, if any (and not yet dropped by the bucket's age
    /// limit; the caller still checks `expires_at`).
    pub async fn registry_grant(
        &self,
        username: &str,
    ) -> Result<Option<lian_core::control::RegistryGrantRecord>, BusError> {
        let kv = self.kv(subjects::REGISTRY_GRANT_BUCKET).await?;
        let bytes = kv
            .get(username)
            .await
            .map_err(|e| BusError::nats("read registry grant", e))?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Revokes a registry grant; revoking one that is gone already succeeds.
    pub async fn forget_registry_grant(&self, username: &str) -> Result<(), BusError> {
        let kv = self.kv(subjects::REGISTRY_GRANT_BUCKET).await?;
        kv.purge(username)
            .await
            .map_err(|e| BusError::nats("revoke registry grant", e))
    }

    pub(crate) async fn kv(&self, bucket: &str) -> Result<jetstream::kv::Store, BusError> {
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| BusError::nats("open key-value bucket", e))
    }

    /// The entries of a bucket whose key starts with `prefix`, in key order: one read of the
    /// bucket's stream, filtered on the server when the prefix ends a token, rather than a
    /// listing of every key and a get per key.
    async fn kv_entries(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, serde_json::Value)>, BusError> {
        let keys = format!("$KV.{bucket}.");
        let filter = match prefix {
            p if p.is_empty() || p.ends_with('.') => format!("{keys}{p}>"),
            _ => format!("{keys}>"),
        };
        let messages = self
            .read_stream(
                &format!("KV_{bucket}"),
                &filter,
                jetstream::consumer::DeliverPolicy::LastPerSubject,
            )
            .await?;
        let mut entries: Vec<(String, serde_json::Value)> = messages
            .into_iter()
            .filter(|m| !kv_removed(m.headers.as_ref()))
            .filter_map(|m| {
                let key = m.subject.strip_prefix(keys.as_str())?.to_string();
                key.starts_with(prefix).then(|| {
                    let value = serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
                    (key, value)
                })
            })
            .collect();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(entries)
    }

    async fn kv_put(&self, bucket: &str, key: &str, value: &serde_json::Value) -> Result<(), BusError> {
        let kv = self.kv(bucket).await?;
        kv.put(key, serde_json::to_vec(value).expect("json").into())
            .await
            .map_err(|e| BusError::nats("write key-value", e))?;
        Ok(())
    }

    /// The last message on a control subject (a cancel request), if any.
    pub async fn last_control(&self, subject: &str) -> Result<Option<Record>, BusError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        let stream = self
            .js
            .get_stream_no_info(subjects::CONTROL_STREAM)
            .await
            .map_err(|e| BusError::nats("open control stream", e))?;
        match stream.direct_get_last_for_subject(subject).await {
            Ok(message) => Ok(Some(Record {
                subject: message.subject.to_string(),
                payload: message.payload.clone(),
                sequence: message.sequence,
            })),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::nats("read control", e)),
        }
    }
}

/// A JetStream answer that means "not yet" on a cluster electing its leaders.
fn retryable(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("temporarily unavailable")
        || m.contains("no suitable peers")
        || m.contains("timed out")
        || m.contains("timeout")
}

fn report_raised(name: &str, before: Option<usize>, replicas: usize) {
    match before {
        Some(b) if b < replicas => {
            tracing::warn!(
                stream = name,
                from = b,
                to = replicas,
                "stream had fewer replicas than configured: raised"
            )
        }
        Some(b) if b > replicas => {
            tracing::warn!(
                stream = name,
                from = b,
                to = replicas,
                "stream lowered to the configured replicas"
            )
        }
        _ => {}
    }
}
