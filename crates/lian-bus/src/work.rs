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

/// One delivered message, or one the consumer gave up delivering.
pub struct Job {
    delivery: Delivery,
}

enum Delivery {
    Live(Box<jetstream::Message>),
    /// Its last delivery went unsettled (the worker holding it died): the server will not
    /// deliver it again, so there is nothing to ack; whoever takes it ends the build.
    Expired {
        record: Record,
        deliveries: i64,
        /// Where it stays (a work queue keeps what was never acked) until it is settled.
        stream: Box<jetstream::stream::Stream>,
    },
}

/// Requests whose deliveries ran out while unsettled, from the server's max-deliveries
/// advisories. Every worker hears each (a queue group could hand it to a worker busy with
/// another build, or to the one that just died); the first to append to the build's history
/// takes it, the others find it taken or ended.
pub struct ExpiredRequests {
    advisories: async_nats::Subscriber,
    js: jetstream::Context,
}

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` read here.
#[derive(serde::Deserialize)]
struct MaxDeliverAdvisory {
    stream_seq: u64,
    deliveries: i64,
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
        // One message per pull, pulled only while the worker has a free slot: what it has
        // not taken is free for the next worker.
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

impl Bus {
    /// Build requests the workers' consumer stopped delivering with their last delivery
    /// unsettled (a worker killed on it): without this, such a build would never end.
    pub async fn expired_requests(&self) -> Result<ExpiredRequests, BusError> {
        let subject = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            subjects::REQUESTS_STREAM,
            subjects::WORKERS_CONSUMER
        );
        let advisories = self
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::nats("subscribe to max-deliveries advisories", e))?;
        Ok(ExpiredRequests {
            advisories,
            js: self.js.clone(),
        })
    }
}

impl ExpiredRequests {
    /// The next expired request, read back from the stream; `None` when the connection is
    /// gone for good.
    pub async fn next(&mut self) -> Option<Result<Job, BusError>> {
        let advisory = self.advisories.next().await?;
        Some(self.read(&advisory.payload).await)
    }

    async fn read(&self, advisory: &[u8]) -> Result<Job, BusError> {
        let advisory: MaxDeliverAdvisory =
            serde_json::from_slice(advisory).map_err(|e| BusError::nats("read a max-deliveries advisory", e))?;
        let stream = self
            .js
            .get_stream(subjects::REQUESTS_STREAM)
            .await
            .map_err(|e| BusError::nats("open the request stream", e))?;
        let message = stream
            .get_raw_message(advisory.stream_seq)
            .await
            .map_err(|e| BusError::nats("read an expired request", e))?;
        Ok(Job {
            delivery: Delivery::Expired {
                record: Record {
                    subject: message.subject.to_string(),
                    payload: message.payload,
                    sequence: advisory.stream_seq,
                },
                deliveries: advisory.deliveries,
                stream: Box::new(stream),
            },
        })
    }
}

impl JobStream {
    /// The next job; `None` when the connection is gone for good.
    pub async fn next(&mut self) -> Option<Result<Job, BusError>> {
        loop {
            match self.messages.next().await? {
                Ok(message) => {
                    return Some(Ok(Job {
                        delivery: Delivery::Live(Box::new(message)),
                    }));
                }
                // A worker whose slots were full did not poll its pull for a while, so the
                // heartbeats of its last pull request went unread: nothing is wrong, and the
                // stream has pulled again already.
                Err(err) if err.kind() == jetstream::consumer::pull::MessagesErrorKind::MissingHeartbeat => {
                    tracing::debug!(%err, "pull resumed after a pause");
                }
                // Anything else is transient too: the stream resumes itself.
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
        match &self.delivery {
            Delivery::Live(message) => Record {
                subject: message.subject.to_string(),
                payload: message.payload.clone(),
                sequence: self.stream_sequence(),
            },
            Delivery::Expired { record, .. } => record.clone(),
        }
    }

    pub fn subject(&self) -> &str {
        match &self.delivery {
            Delivery::Live(message) => message.subject.as_str(),
            Delivery::Expired { record, .. } => &record.subject,
        }
    }

    pub fn payload(&self) -> &[u8] {
        match &self.delivery {
            Delivery::Live(message) => &message.payload,
            Delivery::Expired { record, .. } => &record.payload,
        }
    }

    /// How many times this message has been delivered (1 on the first delivery).
    pub fn delivered(&self) -> i64 {
        match &self.delivery {
            Delivery::Live(message) => message.info().map(|i| i.delivered).unwrap_or(1),
            Delivery::Expired { deliveries, .. } => *deliveries,
        }
    }

    /// Whether the server gave up delivering it (see [`Bus::expired_requests`]).
    pub fn is_expired(&self) -> bool {
        matches!(self.delivery, Delivery::Expired { .. })
    }

    /// The message's position in its stream: stable across redeliveries.
    pub fn stream_sequence(&self) -> u64 {
        match &self.delivery {
            Delivery::Live(message) => message.info().map(|i| i.stream_sequence).unwrap_or(0),
            Delivery::Expired { record, .. } => record.sequence,
        }
    }

    /// A header of the message, if set.
    pub fn header(&self, name: &str) -> Option<String> {
        let Delivery::Live(message) = &self.delivery else {
            return None;
        };
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_string())
    }

    fn live(&self) -> Option<&jetstream::Message> {
        match &self.delivery {
            Delivery::Live(message) => Some(message),
            Delivery::Expired { .. } => None,
        }
    }

    pub async fn ack(&self) -> Result<(), BusError> {
        match &self.delivery {
            Delivery::Live(message) => message.double_ack().await.map_err(|e| BusError::nats("ack", e)),
            Delivery::Expired { .. } => self.remove_expired().await,
        }
    }

    /// Never deliver this message again.
    pub async fn term(&self) -> Result<(), BusError> {
        match &self.delivery {
            Delivery::Live(_) => self.settle(AckKind::Term, "term").await,
            Delivery::Expired { .. } => self.remove_expired().await,
        }
    }

    /// Settling an expired request removes it from the work queue, which would otherwise
    /// keep it for ever. Every worker heard the advisory, so another may have removed it.
    async fn remove_expired(&self) -> Result<(), BusError> {
        let Delivery::Expired { record, stream, .. } = &self.delivery else {
            return Ok(());
        };
        if let Err(err) = stream.delete_message(record.sequence).await {
            tracing::debug!(%err, sequence = record.sequence, "expired request already removed");
        }
        Ok(())
    }

    /// Deliver again after `delay`, to this or another consumer replica.
    pub async fn nak(&self, delay: Duration) -> Result<(), BusError> {
        self.settle(AckKind::Nak(Some(delay)), "nak").await
    }

    /// Still working: restarts the ack-wait clock.
    pub async fn progress(&self) -> Result<(), BusError> {
        self.settle(AckKind::Progress, "progress").await
    }

    async fn settle(&self, kind: AckKind, what: &'static str) -> Result<(), BusError> {
        let Some(message) = self.live() else { return Ok(()) };
        message.ack_with(kind).await.map_err(|e| BusError::nats(what, e))
    }
}
