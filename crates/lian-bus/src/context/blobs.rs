//! The content-addressed blob store behind build contexts: one JetStream stream, no
//! consumers. A blob of `n` bytes is `ceil(n / CHUNK)` messages on
//! `lian-ctx.blob.<sha256>.<index>` followed, once every chunk is acknowledged, by a marker
//! on `lian-ctx.have.<sha256>` whose presence says the blob is complete. Writes are
//! pipelined JetStream publishes; reads and the "which of these do you have" question are
//! batched direct gets (`multi_last`, nats-server >= 2.11), up to `BATCH_SUBJECTS`
//! subjects a request. Nothing on the server grows with the number of reads.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use time::OffsetDateTime;

use crate::direct::{Batch, header};
use crate::{Bus, BusError};

pub const STREAM: &str = "LIAN_CONTEXTS";
pub const STREAM_SUBJECTS: &str = "lian-ctx.>";
/// Chunk size: well under NATS's default 1 MiB `max_payload`, so any server takes it.
pub const CHUNK: u64 = 256 * 1024;
/// How long a blob is kept after it was last written.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// A blob whose marker is older than this is written again, so that a context submitted
/// now keeps every blob for at least `RETENTION - REFRESH_AFTER`.
const REFRESH_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);
/// The server's limit of subjects in one `multi_last` request.
const BATCH_SUBJECTS: usize = 1024;
/// Bytes asked for in one read request, so a reader holds a bounded amount in memory.
const BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Publishes awaiting their acknowledgement at once.
const PUBLISH_WINDOW: usize = 64;

fn chunk_subject(sha256: &str, index: u64) -> String {
    format!("lian-ctx.blob.{sha256}.{index}")
}

fn marker_subject(sha256: &str) -> String {
    format!("lian-ctx.have.{sha256}")
}

pub fn chunks(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

/// `(sha256, index, length)` of every chunk of a blob of `size` bytes.
pub fn chunk_list(sha256: &str, size: u64) -> impl Iterator<Item = (String, u64, u64)> + '_ {
    (0..chunks(size)).map(move |i| (sha256.to_string(), i, CHUNK.min(size - i * CHUNK)))
}

/// A chunk as read back.
pub struct Chunk {
    pub sha256: String,
    pub index: u64,
    pub data: Bytes,
}

/// A publish awaiting its acknowledgement, tagged with the blob whose chunk it carries
/// (`None` for a marker).
type Pending = futures::future::BoxFuture<'static, (Option<String>, Result<(), BusError>)>;

/// Publishes that are in flight, each tagged with the blob it belongs to; a blob's marker
/// goes out once its last chunk is acknowledged.
pub struct Writer<'a> {
    bus: &'a Bus,
    in_flight: FuturesUnordered<Pending>,
    outstanding: BTreeMap<String, u64>,
}

impl<'a> Writer<'a> {
    pub fn new(bus: &'a Bus) -> Self {
        Self {
            bus,
            in_flight: FuturesUnordered::new(),
            outstanding: BTreeMap::new(),
        }
    }

    /// Sends one chunk of `sha256` (which has `total` chunks in all).
    pub async fn chunk(&mut self, sha256: &str, index: u64, total: u64, data: Bytes) -> Result<(), BusError> {
        self.outstanding.entry(sha256.to_string()).or_insert(total);
        let ack = self.bus.publish_stored(chunk_subject(sha256, index), data).await?;
        let tag = sha256.to_string();
        self.in_flight
            .push(Box::pin(async move { (Some(tag), settle(ack).await) }));
        while self.in_flight.len() >= PUBLISH_WINDOW {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), BusError> {
        let Some((tag, result)) = self.in_flight.next().await else {
            return Ok(());
        };
        result?;
        let Some(sha256) = tag else { return Ok(()) };
        let left = self.outstanding.get_mut(&sha256).expect("a chunk was counted");
        *left -= 1;
        if *left == 0 {
            self.outstanding.remove(&sha256);
            let ack = self.bus.publish_stored(marker_subject(&sha256), Bytes::new()).await?;
            self.in_flight.push(Box::pin(async move { (None, settle(ack).await) }));
        }
        Ok(())
    }

    /// Waits until every chunk and marker is stored.
    pub async fn finish(mut self) -> Result<(), BusError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

async fn settle(ack: PublishAckFuture) -> Result<(), BusError> {
    ack.await
        .map(|_| ())
        .map_err(|e| BusError::nats("store context chunk", e))
}

impl Bus {
    async fn publish_stored(&self, subject: String, data: Bytes) -> Result<PublishAckFuture, BusError> {
        self.js
            .publish(subject, data)
            .await
            .map_err(|e| BusError::nats("store context chunk", e))
    }

    /// Of `shas`, the ones the store does not hold complete and fresh.
    pub(crate) async fn missing_blobs(&self, shas: &[String]) -> Result<Vec<String>, BusError> {
        let mut present = std::collections::BTreeSet::new();
        let fresh_since = OffsetDateTime::now_utc() - REFRESH_AFTER;
        for group in shas.chunks(BATCH_SUBJECTS) {
            let subjects: Vec<String> = group.iter().map(|s| marker_subject(s)).collect();
            for message in self.last_on(&subjects, subjects.len()).await? {
                let headers = message.headers.as_ref();
                let stamp = header(headers, "Nats-Time-Stamp")
                    .and_then(|t| OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok());
                if stamp.is_some_and(|t| t < fresh_since) {
                    continue;
                }
                if let Some(sha) = header(headers, "Nats-Subject").and_then(|s| s.strip_prefix("lian-ctx.have.")) {
                    present.insert(sha.to_string());
                }
            }
        }
        Ok(shas.iter().filter(|s| !present.contains(*s)).cloned().collect())
    }

    /// Reads chunks (`(sha256, index, length)`), in requests of at most `BATCH_SUBJECTS`
    /// subjects and about `BATCH_BYTES`, handing each request's chunks to `sink` before asking for more.
    pub(crate) async fn read_chunks(
        &self,
        wanted: &[(String, u64, u64)],
        mut sink: impl FnMut(Vec<Chunk>) -> Result<(), BusError>,
    ) -> Result<(), BusError> {
        let mut group: Vec<String> = Vec::new();
        let mut group_bytes = 0u64;
        let mut requests = Vec::new();
        for (sha, index, len) in wanted {
            if group.len() == BATCH_SUBJECTS || (group_bytes + len > BATCH_BYTES && !group.is_empty()) {
                requests.push(std::mem::take(&mut group));
                group_bytes = 0;
            }
            group.push(chunk_subject(sha, *index));
            group_bytes += len;
        }
        if !group.is_empty() {
            requests.push(group);
        }
        // One request ahead of the one being written: the next answer is on its way while
        // the sink works, and at most two requests' bytes are held.
        let mut pending = futures::stream::iter(requests.iter().map(|r| self.last_on(r, r.len()))).buffered(2);
        while let Some(messages) = pending.next().await {
            sink(messages?.into_iter().map(chunk_of).collect::<Result<_, _>>()?)?;
        }
        Ok(())
    }

    /// The value last remembered under `subject` (one message per subject), if any.
    pub(crate) async fn read_last(&self, subject: &str) -> Result<Option<String>, BusError> {
        let found = self.last_on(&[subject.to_string()], 1).await?;
        Ok(found
            .into_iter()
            .next()
            .and_then(|m| String::from_utf8(m.payload.to_vec()).ok()))
    }

    /// Remembers `value` under `subject`, replacing what was there.
    pub(crate) async fn remember(&self, subject: &str, value: &str) -> Result<(), BusError> {
        let ack = self
            .publish_stored(subject.to_string(), Bytes::copy_from_slice(value.as_bytes()))
            .await?;
        settle(ack).await
    }

    /// Every chunk of one blob of unknown size (a manifest), in order, up to `limit` bytes.
    pub(crate) async fn read_small_blob(&self, sha256: &str, limit: u64) -> Result<Vec<u8>, BusError> {
        let wildcard = [format!("lian-ctx.blob.{sha256}.*")];
        let mut chunks: Vec<Chunk> = self
            .last_on(&wildcard, chunks(limit) as usize)
            .await?
            .into_iter()
            .map(chunk_of)
            .collect::<Result<_, _>>()?;
        chunks.sort_by_key(|c| c.index);
        let size: u64 = chunks.iter().map(|c| c.data.len() as u64).sum();
        if size > limit {
            return Err(BusError::nats(
                "read context manifest",
                format!("it is {size} bytes, over the limit of {limit}"),
            ));
        }
        let whole: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
        if chunks.iter().enumerate().any(|(i, c)| c.index != i as u64) || super::hex_sha256(&whole) != sha256 {
            return Err(BusError::MissingObject {
                name: format!("manifest-{sha256}"),
            });
        }
        Ok(whole)
    }

    /// The last message on each subject `subjects` match, at most `batch` of them.
    async fn last_on(&self, subjects: &[String], batch: usize) -> Result<Vec<async_nats::Message>, BusError> {
        let request = Batch::Last {
            multi_last: subjects,
            batch,
        };
        self.direct_batch(STREAM, &request, "read context store").await
    }
}

fn chunk_of(message: async_nats::Message) -> Result<Chunk, BusError> {
    let subject = header(message.headers.as_ref(), "Nats-Subject").unwrap_or_default();
    let (sha256, index) = subject
        .strip_prefix("lian-ctx.blob.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(sha, i)| Some((sha.to_string(), i.parse().ok()?)))
        .ok_or_else(|| BusError::nats("read context chunk", format!("unexpected subject {subject:?}")))?;
    Ok(Chunk {
        sha256,
        index,
        data: message.payload,
    })
}
