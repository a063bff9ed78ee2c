//! Streams, consumers and buckets, created idempotently: running this against a server that
//! already has them changes nothing (or updates a setting we changed).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use lian_core::subjects;

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
    pub replicas: usize,
}

impl Default for Topology {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: 5,
            duplicate_window: Duration::from_secs(120),
            max_request_bytes: 1024 * 1024,
            replicas: 1,
        }
    }
}

impl Bus {
    pub async fn ensure_topology(&self, t: &Topology) -> Result<(), BusError> {
        let requests = stream::Config {
            name: subjects::REQUESTS_STREAM.into(),
            description: Some("lian build requests: a work queue shared by all workers".into()),
            subjects: vec![subjects::ALL_REQUESTS.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: t.duplicate_window,
            max_message_size: t.max_request_bytes,
            num_replicas: t.replicas,
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
            num_replicas: t.replicas,
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
            num_replicas: t.replicas,
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
            num_replicas: t.replicas,
            ..Default::default()
        };
        for config in [requests, events, control, contexts] {
            self.js
                .create_or_update_stream(config)
                .await
                .map_err(|e| BusError::nats("create stream", e))?;
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
                    description: Some("the cascade service reads terminal build events".into()),
                    filter_subjects: subjects::ALL_TERMINAL_BUILD_EVENTS
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
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
        ]
        .into_iter()
        .map(|(bucket, description)| (bucket, description, Duration::ZERO))
        .chain([(
            subjects::REGISTRY_GRANT_BUCKET,
            "the registry gate's grants, keyed <username>; they expire with their grant",
            Duration::from_secs(lian_core::control::REGISTRY_GRANT_MAX_SECS),
        )]) {
            if self.js.get_key_value(bucket).await.is_err() {
                self.js
                    .create_key_value(jetstream::kv::Config {
                        bucket: bucket.into(),
                        description: description.into(),
                        storage: stream::StorageType::File,
                        num_replicas: t.replicas,
                        history: 1,
                        // Zero keeps entries for ever.
                        max_age,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| BusError::nats("create key-value bucket", e))?;
            }
        }
        Ok(())
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

    /// The metrics records of a workspace's builds, newest build id first.
    pub async fn workspace_metrics(&self, workspace: &str) -> Result<Vec<serde_json::Value>, BusError> {
        let mut entries = self
            .kv_entries(subjects::METRICS_BUCKET, &format!("{workspace}."))
            .await?;
        entries.reverse();
        Ok(entries.into_iter().map(|(_, v)| v).collect())
    }

    /// What tier 2 sizing sees for a workspace: the P95 of its recent builds' usage (when it
    /// has enough builds with usage) and whether an operator approved using it.
    pub async fn sizing_history(&self, workspace: &str) -> Result<(Option<lian_core::sizing::P95>, bool), BusError> {
        let usage: Vec<(f64, f64)> = self
            .workspace_metrics(workspace)
            .await?
            .iter()
            .filter_map(|m| Some((m["cpu_p95"].as_f64()?, m["mem_p95_gb"].as_f64()?)))
            .collect();
        let approved = self.sizing_approval(workspace).await?.is_some();
        Ok((lian_core::sizing::workspace_p95(&usage), approved))
    }

    /// The tier-2 approval of a workspace, if an operator gave one.
    pub async fn sizing_approval(&self, workspace: &str) -> Result<Option<serde_json::Value>, BusError> {
        Ok(self
            .kv_entries(subjects::SIZING_BUCKET, workspace)
            .await?
            .into_iter()
            .find(|(k, _)| k == workspace)
            .map(|(_, v)| v))
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

    async fn kv(&self, bucket: &str) -> Result<jetstream::kv::Store, BusError> {
        self.js
            .get_key_value(bucket)
            .await
            .map_err(|e| BusError::nats("open key-value bucket", e))
    }

    /// The entries of a bucket whose key starts with `prefix`, in key order.
    async fn kv_entries(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, serde_json::Value)>, BusError> {
        use futures::StreamExt;
        let kv = self.kv(bucket).await?;
        let mut keys: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| BusError::nats("list keys", e))?
            .filter_map(|k| async move { k.ok() })
            .filter(|k| futures::future::ready(k.starts_with(prefix)))
            .collect()
            .await;
        keys.sort();
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(bytes) = kv.get(&key).await.map_err(|e| BusError::nats("read key", e))? {
                entries.push((key, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)));
            }
        }
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
