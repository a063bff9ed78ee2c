//! JetStream's batched direct get (nats-server >= 2.11): stored messages read with one
//! request and no consumer, either the last message on each of several subjects or the
//! messages on a filter from a sequence on. Replicas may answer, so a read can lag a write
//! by a moment: for reads that a stale answer cannot make wrong (contexts, which are
//! immutable, and sizing history), never for a fence.

use std::time::Duration;

use futures::StreamExt;
use serde::Serialize;

use crate::{Bus, BusError};

/// How long a batch may take to arrive.
const PATIENCE: Duration = Duration::from_secs(30);

/// What a batched direct get asks for.
#[derive(Serialize)]
#[serde(untagged)]
pub(crate) enum Batch<'a> {
    /// The last message on each subject `multi_last` matches.
    Last { multi_last: &'a [String], batch: usize },
    /// Messages on `next_by_subj` from stream sequence `seq` on, oldest first.
    From {
        seq: u64,
        next_by_subj: &'a str,
        batch: usize,
    },
}

impl Bus {
    /// One batched direct get on `stream`, read until the server's end-of-batch; `what`
    /// names the read in errors.
    pub(crate) async fn direct_batch(
        &self,
        stream: &str,
        request: &Batch<'_>,
        what: &'static str,
    ) -> Result<Vec<async_nats::Message>, BusError> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| BusError::nats(what, e))?;
        let body = serde_json::to_vec(request).expect("json");
        self.client
            .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
            .await
            .map_err(|e| BusError::nats(what, e))?;
        let mut messages = Vec::new();
        loop {
            let next = tokio::time::timeout(PATIENCE, replies.next()).await;
            let Ok(Some(message)) = next else {
                return Err(BusError::nats(
                    what,
                    "no answer from the JetStream direct get API within 30 s",
                ));
            };
            match message.status.map(|s| s.as_u16()) {
                // End of batch; 404: nothing matches.
                Some(204) | Some(404) => break,
                Some(code) if code >= 300 => {
                    let why = message.description.clone().unwrap_or_default();
                    return Err(BusError::nats(what, format!("status {code}: {why}")));
                }
                _ => messages.push(message),
            }
        }
        let _ = replies.unsubscribe().await;
        Ok(messages)
    }
}

/// A header of a directly read message (`Nats-Subject`, `Nats-Sequence`, `KV-Operation`).
pub(crate) fn header<'h>(headers: Option<&'h async_nats::HeaderMap>, name: &str) -> Option<&'h str> {
    headers?.get(name).map(|v| v.as_str())
}

/// A key-value message that deletes or purges its key rather than setting it.
pub(crate) fn kv_removed(headers: Option<&async_nats::HeaderMap>) -> bool {
    matches!(header(headers, "KV-Operation"), Some("DEL" | "PURGE"))
}
