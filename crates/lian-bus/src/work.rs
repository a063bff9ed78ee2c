//! The work queues: durable pull consumers shared by every replica of a service. A `Job` is
//! one delivered message, acked, terminated, nak'd or kept alive by its holder.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use lian_core::subjects;

use crate::{Bus, BusError, Record};

pub struct JobStream {
    messages: jetstream::consumer::pull::Stream,
}

/// One delivered message.
pub struct Job {
    message: jetstream::Message,
}

impl Bus {
    /// Build requests, from the consumer every worker shares.
    pub async fn requests(&self) -> Result<JobStream, BusError> {
        self.jobs(subjects::REQUESTS_STREAM, subjects::WORKERS_CONSUMER).await
    }

    /// Terminal build events, from the consumer the cascade replicas share.
    pub async fn terminal_build_events(&self) -> Result<JobStream, BusError> {
        self.jobs(subjects::EVENTS_STREAM, subjects::CASCADE_CONSUMER).await
    }

    async fn jobs(&self, stream: &str, consumer: &str) -> Result<JobStream, BusError> {
        let consumer: jetstream::consumer::PullConsumer = self
            .js
            .get_consumer_from_stream(consumer, stream)
            .await
            .map_err(|e| BusError::nats("open consumer", e))?;
        // One message at a time: a worker holds one build, and what it has not taken is
        // free for the next worker.
        let messages = consumer
            .stream()
            .max_messages_per_batch(1)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| BusError::nats("pull", e))?;
        Ok(JobStream { messages })
    }
}

impl JobStream {
    /// The next job; `None` when the connection is gone for good.
    pub async fn next(&mut self) -> Option<Result<Job, BusError>> {
        loop {
            match self.messages.next().await? {
                Ok(message) => return Some(Ok(Job { message })),
                // Missed heartbeats and the like are transient: the stream resumes itself.
                Err(err) => {
                    tracing::warn!(%err, "pull interrupted, resuming");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}

impl Job {
    pub fn record(&self) -> Record {
        Record {
            subject: self.message.subject.to_string(),
            payload: self.message.payload.clone(),
            sequence: self.stream_sequence(),
        }
    }

    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// How many times this message has been delivered (1 on the first delivery).
    pub fn delivered(&self) -> i64 {
        self.message.info().map(|i| i.delivered).unwrap_or(1)
    }

    /// The message's position in its stream: stable across redeliveries.
    pub fn stream_sequence(&self) -> u64 {
        self.message.info().map(|i| i.stream_sequence).unwrap_or(0)
    }

    /// A header of the message, if set.
    pub fn header(&self, name: &str) -> Option<String> {
        self.message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    }

    pub async fn ack(&self) -> Result<(), BusError> {
        self.message.double_ack().await.map_err(|e| BusError::nats("ack", e))
    }

    /// Never deliver this message again.
    pub async fn term(&self) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| BusError::nats("term", e))
    }

    /// Deliver again after `delay`, to this or another consumer replica.
    pub async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| BusError::nats("nak", e))
    }

    /// Still working: restarts the ack-wait clock.
    pub async fn progress(&self) -> Result<(), BusError> {
        self.message
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| BusError::nats("progress", e))
    }
}
