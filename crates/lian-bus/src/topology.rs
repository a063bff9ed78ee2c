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
            subjects: vec![subjects::ALL_BUILD_EVENTS.into(), subjects::ALL_CASCADE_EVENTS.into()],
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
        for config in [requests, events, control] {
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
        if self.js.get_object_store(subjects::CONTEXT_BUCKET).await.is_err() {
            self.js
                .create_object_store(jetstream::object_store::Config {
                    bucket: subjects::CONTEXT_BUCKET.into(),
                    description: Some("build contexts, one object per file content".into()),
                    storage: stream::StorageType::File,
                    num_replicas: t.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::nats("create context store", e))?;
        }
        for (bucket, description) in [
            (
                subjects::METRICS_BUCKET,
                "per-build metrics, keyed <workspace>.<build-id>",
            ),
            (subjects::DEAD_LETTER_BUCKET, "requests given up on, keyed <build-id>"),
        ] {
            if self.js.get_key_value(bucket).await.is_err() {
                self.js
                    .create_key_value(jetstream::kv::Config {
                        bucket: bucket.into(),
                        description: description.into(),
                        storage: stream::StorageType::File,
                        num_replicas: t.replicas,
                        history: 1,
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
        use futures::StreamExt;
        let kv = self
            .js
            .get_key_value(subjects::DEAD_LETTER_BUCKET)
            .await
            .map_err(|e| BusError::nats("open dead letters", e))?;
        let mut keys: Vec<String> = kv
            .keys()
            .await
            .map_err(|e| BusError::nats("list dead letters", e))?
            .filter_map(|k| async move { k.ok() })
            .collect()
            .await;
        keys.sort();
        let mut records = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some(bytes) = kv.get(&key).await.map_err(|e| BusError::nats("read dead letter", e))? {
                records.push(serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null));
            }
        }
        Ok(records)
    }

    async fn kv_put(&self, bucket: &str, key: &str, value: &serde_json::Value) -> Result<(), BusError> {
        let kv = self
            .js
            .get_key_value(bucket)
            .await
            .map_err(|e| BusError::nats("open key-value bucket", e))?;
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
