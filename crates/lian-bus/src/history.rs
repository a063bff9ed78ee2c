//! Event histories: appends with a `Nats-Msg-Id`, reads of everything on a filter, and
//! following a filter live.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use async_nats::jetstream::message::PublishMessage;
use futures::{Stream, StreamExt};
use lian_core::subjects;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Bus, BusError};

/// Tries of one request publish (each waits the JetStream context's ack timeout, 5 s):
/// about 20 s, above the elections seen on a three-node cluster and well inside the
/// request stream's 120 s dedup window, so the tries stay one request.
pub const SUBMIT_ATTEMPTS: u32 = 4;

/// The server's answer to an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub stream_sequence: u64,
    /// The same `Nats-Msg-Id` was appended before (within the dedup window): this append
    /// wrote nothing. For a history append it means another writer got there first.
    pub duplicate: bool,
}

/// One stored message: its subject and payload.
#[derive(Debug, Clone)]
pub struct Record {
    pub subject: String,
    pub payload: bytes::Bytes,
    /// Position in its stream (0 when not read from a stream).
    pub sequence: u64,
}

/// Where a submitted build sits in the catalog: the layer it is, the cascade that asked for
/// it, and its parents pinned by digest (all empty for a build of anything else).
#[derive(Debug, Clone, Default)]
pub struct Lineage {
    pub layer: Option<lian_core::LayerName>,
    pub cascade: Option<lian_core::CascadeRef>,
    pub parents: std::collections::BTreeMap<String, String>,
}

/// An optimistic-concurrency condition: the append is refused unless the last message on
/// `filter` (a wildcard subject) is at `sequence` (0: no message yet).
#[derive(Debug, Clone)]
pub struct After {
    pub filter: String,
    pub sequence: u64,
}

impl Record {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, BusError> {
        serde_json::from_slice(&self.payload).map_err(|source| BusError::Decode {
            what: format!("the message on {}", self.subject),
            source,
        })
    }
}

impl Bus {
    /// Appends a value to a stream subject; `msg_id` makes the append idempotent. An event
    /// (`lian.<ws>.build|cascade.<id>.<kind>`) goes through its append subject and reaches
    /// `lian.>` only once the stream stored it (ADR lian-045).
    pub async fn append<T: Serialize>(&self, subject: &str, msg_id: &str, value: &T) -> Result<Appended, BusError> {
        self.publish(subject, PublishMessage::build().message_id(msg_id), value)
            .await
    }

    /// Appends only if nobody appended on `after.filter` since `after.sequence`: of two
    /// writers racing on one history, exactly one succeeds; the other gets
    /// `BusError::Conflict` and has written nothing. Needs nats-server >= 2.11.
    pub async fn append_after<T: Serialize>(
        &self,
        subject: &str,
        msg_id: &str,
        value: &T,
        after: &After,
    ) -> Result<Appended, BusError> {
        let message = PublishMessage::build()
            .message_id(msg_id)
            .expected_last_subject_sequence(after.sequence)
            .header("Nats-Expected-Last-Subject-Sequence-Subject", after.filter.as_str());
        self.publish(subject, message, value).await
    }

    async fn publish<T: Serialize>(
        &self,
        subject: &str,
        message: PublishMessage,
        value: &T,
    ) -> Result<Appended, BusError> {
        self.publish_retrying(subject, message, value, 1).await
    }

    /// Publishes and awaits the ack, publishing the same message again (up to `attempts`
    /// times in all) when no ack comes in time. Only for messages carrying a `Nats-Msg-Id`:
    /// the stream drops a repeat within its dedup window, so a retried publish whose first
    /// try was stored after all is answered `duplicate`, never stored twice.
    async fn publish_retrying<T: Serialize>(
        &self,
        subject: &str,
        message: PublishMessage,
        value: &T,
        attempts: u32,
    ) -> Result<Appended, BusError> {
        use async_nats::jetstream::context::PublishErrorKind;
        let payload: bytes::Bytes = serde_json::to_vec(value).expect("lian values serialize").into();
        let target = subjects::append_subject(subject).into_owned();
        let mut attempt = 1;
        loop {
            let ack = self
                .js
                .send_publish(target.clone(), message.clone().payload(payload.clone()))
                .await
                .map_err(|e| BusError::nats("publish", e))?
                .await;
            match ack {
                Ok(ack) => {
                    return Ok(Appended {
                        stream_sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return Err(BusError::Conflict {
                        subject: subject.to_string(),
                    });
                }
                Err(e) if e.kind() == PublishErrorKind::TimedOut && attempt < attempts => {
                    tracing::warn!(
                        subject,
                        attempt,
                        attempts,
                        "no ack in time (the stream may be electing a leader): publishing again"
                    );
                    attempt += 1;
                }
                Err(e) => return Err(BusError::nats("publish ack", e)),
            }
        }
    }

    /// Uploads `context_dir` as the build's context and publishes the request built from
    /// it: what `lian submit` and the cascade both do. Returns the append and the upload.
    pub async fn submit_dir(
        &self,
        context_dir: &std::path::Path,
        directives: lian_core::BuildDirectives,
        lineage: Lineage,
        build_id: &lian_core::BuildId,
        upload: crate::Upload<'_>,
    ) -> Result<(Appended, lian_core::ContextRef, crate::UploadStats), BusError> {
        let keep = [
            directives.artifact.dockerfile.as_str(),
            ".dockerignore",
            ".build-spec.ncl",
        ];
        let workspace = directives.workspace.to_string();
        let (context, uploaded) = self
            .upload_context(context_dir, &keep, &workspace, upload.limits, upload.progress)
            .await?;
        let request = lian_core::BuildRequest {
            build_id: Some(build_id.clone()),
            directives,
            context: context.clone(),
            layer: lineage.layer,
            cascade: lineage.cascade,
            parents: lineage.parents,
        };
        Ok((self.submit(&request, build_id).await?, context, uploaded))
    }

    /// Publishes a build request on `lian.<ws>.build.request`, deduplicated by build id so
    /// a retried submit within the dedup window is one request. A publish that gets no ack
    /// in time is sent again, up to [`SUBMIT_ATTEMPTS`] times: on a cluster the request
    /// stream has no leader for a few seconds after its leader's node died, after a
    /// stepdown, or while its replicas are raised (seen: 10 s for R1 -> R3), and a request
    /// published then is lost with no ack; the build id keeps the retries one request.
    pub async fn submit(
        &self,
        request: &lian_core::BuildRequest,
        build_id: &lian_core::BuildId,
    ) -> Result<Appended, BusError> {
        let subject = subjects::request(&request.directives.workspace);
        let message = PublishMessage::build().message_id(build_id.as_str());
        self.publish_retrying(&subject, message, request, SUBMIT_ATTEMPTS).await
    }

    /// The stream sequence of the last event stored on `filter` (a wildcard subject), 0 when
    /// there is none, as the stream's leader holds it: to check a history was not extended
    /// by someone else. Not a direct get: any replica answers those, a follower too, and on
    /// a cluster a follower a few appends behind said 0 or an older sequence for a history
    /// whose last event this worker had just appended (acknowledged), so the worker took the
    /// build for lost and left it until the ack wait redelivered it (the fleet benchmark on
    /// three nodes). `STREAM.MSG.GET` is answered by the leader only.
    pub async fn head(&self, filter: &str) -> Result<u64, BusError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .js
            .get_stream_no_info(subjects::EVENTS_STREAM)
            .await
            .map_err(|e| BusError::nats("open events stream", e))?;
        match stream.get_last_raw_message_by_subject(filter).await {
            Ok(message) => Ok(message.sequence),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(e) => Err(BusError::nats("read the history's head", e)),
        }
    }

    /// Everything stored on `filter` in the events stream, oldest first.
    pub async fn read_all(&self, filter: &str) -> Result<Vec<Record>, BusError> {
        // Most histories read are a new build's, which has none: one direct get says so,
        // where a consumer costs a round trip to create and one to delete.
        if self.head(filter).await? == 0 {
            return Ok(Vec::new());
        }
        let messages = self
            .read_stream(subjects::EVENTS_STREAM, filter, consumer::DeliverPolicy::All)
            .await?;
        messages
            .iter()
            .map(|message| {
                let info = message.info().map_err(|e| BusError::nats("read history", e))?;
                Ok(Record {
                    subject: message.subject.to_string(),
                    payload: message.payload.clone(),
                    sequence: info.stream_sequence,
                })
            })
            .collect()
    }

    /// What is stored on `filter` in `stream` now, as `policy` picks it, in stream order:
    /// one ordered consumer read until nothing is pending.
    pub(crate) async fn read_stream(
        &self,
        stream: &str,
        filter: &str,
        policy: consumer::DeliverPolicy,
    ) -> Result<Vec<async_nats::jetstream::Message>, BusError> {
        let stream = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| BusError::nats("open stream", e))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: policy,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::nats("read stream", e))?;
        let mut remaining = consumer.cached_info().num_pending;
        let mut read = Vec::with_capacity(remaining as usize);
        if remaining == 0 {
            return Ok(read);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| BusError::nats("read stream", e))?;
        while remaining > 0 {
            let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .map_err(|_| BusError::nats("read stream", "timed out"))?;
            let Some(message) = next else { break };
            let message = message.map_err(|e| BusError::nats("read stream", e))?;
            remaining = message.info().map_err(|e| BusError::nats("read stream", e))?.pending;
            read.push(message);
        }
        Ok(read)
    }

    /// Every message on `filter` in the events stream, history first, then live.
    pub async fn follow(&self, filter: &str) -> Result<impl Stream<Item = Result<Record, BusError>> + use<>, BusError> {
        self.follow_many(&[filter]).await
    }
}
