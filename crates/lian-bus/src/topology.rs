//! Streams, consumers and buckets, created idempotently: running this against a server that
//! already has them changes nothing (or updates a setting we changed).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use lian_core::subjects;

use crate::{Bus, BusError};

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
            subjects: vec![
                subjects::ALL_BUILD_EVENTS.into(),
                subjects::ALL_CASCADE_EVENTS.into(),
            ],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            duplicate_window: t.duplicate_window,
            allow_direct: true,
            num_replicas: t.replicas,
            ..Default::default()
        };
        for config in [requests, events] {
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
        if self
            .js
            .get_object_store(subjects::CONTEXT_BUCKET)
            .await
            .is_err()
        {
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
        if self
            .js
            .get_key_value(subjects::METRICS_BUCKET)
            .await
            .is_err()
        {
            self.js
                .create_key_value(jetstream::kv::Config {
                    bucket: subjects::METRICS_BUCKET.into(),
                    description: "per-build metrics, keyed <workspace>.<build-id>".into(),
                    storage: stream::StorageType::File,
                    num_replicas: t.replicas,
                    history: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| BusError::nats("create metrics bucket", e))?;
        }
        Ok(())
    }

    /// Records one build's metrics (step 6), keyed `<workspace>.<build-id>`.
    pub async fn record_metrics(
        &self,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), BusError> {
        let kv = self
            .js
            .get_key_value(subjects::METRICS_BUCKET)
            .await
            .map_err(|e| BusError::nats("open metrics bucket", e))?;
        kv.put(key, serde_json::to_vec(value).expect("json").into())
            .await
            .map_err(|e| BusError::nats("record metrics", e))?;
        Ok(())
    }
}
