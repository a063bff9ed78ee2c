//! Reads for the people watching the fleet (`lian status`, the control plane's web view):
//! a build's history as events, and how deep the request queue is.

use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, pull};
use futures::{Stream, StreamExt};
use lian_core::{BuildId, Envelope, subjects};
use serde::Serialize;

use crate::{Bus, BusError, Record};

/// The request queue as the workers' shared consumer sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Requests no worker has taken yet.
    pub waiting: u64,
    /// Requests a worker holds (delivered, not yet acknowledged).
    pub in_flight: u64,
    /// Pull requests from idle workers waiting for work.
    pub idle_pulls: u64,
    /// Requests the server redelivered at least once.
    pub redelivered: u64,
}

impl Bus {
    /// A build's history, oldest event first (empty when nobody has taken the build yet).
    pub async fn build_history(&self, build_id: &BuildId) -> Result<Vec<Envelope>, BusError> {
        self.read_all(&subjects::build_history(build_id))
            .await?
            .iter()
            .map(|r| r.decode::<Envelope>())
            .collect()
    }

    /// How many requests wait, how many are being built, and how many workers wait for work.
    pub async fn queue_depth(&self) -> Result<QueueDepth, BusError> {
        let mut consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(subjects::WORKERS_CONSUMER, subjects::REQUESTS_STREAM)
            .await
            .map_err(|e| BusError::nats("open consumer", e))?;
        let info = consumer.info().await.map_err(|e| BusError::nats("consumer info", e))?;
        Ok(QueueDepth {
            waiting: info.num_pending,
            in_flight: info.num_ack_pending as u64,
            idle_pulls: info.num_waiting as u64,
            redelivered: info.num_redelivered as u64,
        })
    }

    /// Every event stored on any of `filters`, in stream order (one ordered consumer, so a
    /// cascade's request and the build it names come in the order they were stored):
    /// history first, then live.
    pub async fn follow_many(
        &self,
        filters: &[&str],
    ) -> Result<impl Stream<Item = Result<Record, BusError>> + use<>, BusError> {
        let stream = self
            .js
            .get_stream(subjects::EVENTS_STREAM)
            .await
            .map_err(|e| BusError::nats("open events stream", e))?;
        let messages = stream
            .create_consumer(pull::OrderedConfig {
                filter_subjects: filters.iter().map(|f| f.to_string()).collect(),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::nats("follow", e))?
            .messages()
            .await
            .map_err(|e| BusError::nats("follow", e))?;
        Ok(messages.map(|m| {
            let m = m.map_err(|e| BusError::nats("follow", e))?;
            Ok(Record {
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
                sequence: m.info().map(|i| i.stream_sequence).unwrap_or(0),
            })
        }))
    }
}
