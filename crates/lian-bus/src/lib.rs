//! The only owner of NATS: the JetStream topology (streams, consumers, key-value, object
//! store), appends with dedup, history reads, the work queue with heartbeats, and build
//! contexts as content-addressed chunks. Callers speak in subjects and serde values; nobody else
//! imports async-nats.

mod context;
mod direct;
mod error;
mod history;
mod layers;
mod leaders;
mod topology;
mod views;
mod work;

pub use context::{
    ContextLimits, Downloaded, EntryKind, Manifest, ManifestEntry, StoreState, Upload, UploadProgress, UploadStats,
};
pub use error::BusError;
pub use history::{After, Appended, Lineage, Record};
pub use layers::{CatalogLock, LayerImage, QueuedLayer};
pub use leaders::{LeaderMove, MoveOutcome, leaders_per_node, plan_spread};
pub use topology::{ReplicaState, StreamStatus, Topology};
pub use views::QueueDepth;
pub use work::{ExpiredRequests, Job, JobStream};

use std::time::Duration;

use async_nats::jetstream;

/// A connection to NATS and its JetStream context.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
}

/// The servers a NATS URL names: one URL, or a comma-separated list of seeds of one cluster
/// (`nats://a:4222,nats://b:4222`), as the NATS tools take them. Blanks around commas are
/// ignored.
pub fn seed_urls(urls: &str) -> Vec<String> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(String::from)
        .collect()
}

impl Bus {
    /// Connects to the first seed that answers (`url`: one URL or a comma-separated list, see
    /// [`seed_urls`]), retrying for `patience` so a fleet can start before its server is
    /// ready. Once connected, the client follows the cluster: it learns the other members
    /// from the server and reconnects to any of them, for ever.
    pub async fn connect(url: &str, name: &str, patience: Duration) -> Result<Self, BusError> {
        let seeds = seed_urls(url);
        if seeds.is_empty() {
            return Err(BusError::Connect {
                url: url.to_string(),
                message: "no server URL given".into(),
            });
        }
        if let Some((seed, err)) = seeds
            .iter()
            .find_map(|s| s.parse::<async_nats::ServerAddr>().err().map(|e| (s, e)))
        {
            return Err(BusError::Connect {
                url: url.to_string(),
                message: format!("{seed:?} is not a NATS URL: {err}"),
            });
        }
        let options = || {
            async_nats::ConnectOptions::new()
                .name(name)
                .connection_timeout(Duration::from_secs(5))
                // After the first connection, keep retrying forever: a NATS restart must not
                // take the fleet down.
                .max_reconnects(None)
        };
        // Until then, every 200 ms for about `patience`: a fleet may start before its server.
        use backon::Retryable;
        let every = backon::ConstantBuilder::new()
            .with_delay(Duration::from_millis(200))
            .with_max_times((patience.as_millis() / 200) as usize);
        let client = (|| options().connect(seeds.as_slice()))
            .retry(every)
            .notify(|err, _| tracing::debug!(%url, %err, "nats not reachable yet"))
            .await
            .map_err(|err| BusError::Connect {
                url: url.to_string(),
                message: err.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        Ok(Self { client, js })
    }

    /// Publishes on core NATS only (not persisted): for live notices nobody needs to replay.
    pub async fn publish_core<T: serde::Serialize>(&self, subject: &str, value: &T) -> Result<(), BusError> {
        let payload = serde_json::to_vec(value).expect("lian values serialize");
        self.client
            .publish(subject.to_string(), payload.into())
            .await
            .map_err(|e| BusError::nats("publish", e))
    }

    /// Publishes every value sent into the returned channel on core NATS, on the subject
    /// `subject` names for it, until the sender is dropped; await the task to know every
    /// value went out. For live notices sent from code that cannot await.
    pub fn publisher<T: serde::Serialize + Send + Sync + 'static>(
        &self,
        subject: impl Fn(&T) -> String + Send + 'static,
    ) -> (tokio::sync::mpsc::UnboundedSender<T>, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<T>();
        let bus = self.clone();
        let task = tokio::spawn(async move {
            while let Some(value) = rx.recv().await {
                if let Err(err) = bus.publish_core(&subject(&value), &value).await {
                    tracing::debug!(%err, "live notice not published");
                }
            }
        });
        (tx, task)
    }

    /// Waits until everything published so far reached the server.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.client.flush().await.map_err(|e| BusError::nats("flush", e))
    }

    /// Subscribes to core NATS: sees every message on matching subjects, persisted or not.
    pub async fn subscribe(&self, subject: &str) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(subject.to_string())
            .await
            .map_err(|e| BusError::nats("subscribe", e))
    }
}
