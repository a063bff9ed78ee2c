//! Each catalog layer's latest completed image (bucket `lian-layers`), kept by the cascade:
//! what tells a rebuilt layer that came out unchanged (early cutoff) from one that changed.

use lian_core::subjects;
use serde::{Deserialize, Serialize};

use crate::{Bus, BusError};

/// A layer's latest completed image, and the one it replaced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerImage {
    pub layer: String,
    pub build_id: String,
    pub image: String,
    /// The image's config digest: it covers the rootfs diff ids and the config, not the
    /// manifest's timestamps.
    pub image_id: String,
    /// The image id the layer had before this build, if it had one.
    #[serde(default)]
    pub previous_image_id: Option<String>,
    /// Where the registry holds it, by digest (`<ns>/<repo>@sha256:…`), when it was pushed:
    /// what a descendant's build pins as its parent and the catalog lock records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The cascade it was built in, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade_id: Option<String>,
    /// UNIX seconds.
    pub at: i64,
}

impl LayerImage {
    /// The build gave the layer the image it had before.
    pub fn unchanged(&self) -> bool {
        self.previous_image_id.as_deref() == Some(self.image_id.as_str())
    }
}

/// The catalog lock (key `_lock`): every layer's image as the last cascade that completed
/// left it. Written in one compare-and-set per completed cascade: all of its layers or none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogLock {
    pub layers: std::collections::BTreeMap<String, LayerImage>,
    /// The cascade that wrote it last.
    #[serde(default)]
    pub cascade_id: String,
    /// UNIX seconds.
    #[serde(default)]
    pub at: i64,
}

// Layer names start with a letter or digit, so no layer is called this.
const LOCK_KEY: &str = "_lock";

impl Bus {
    /// A layer's latest completed image, if it has one.
    pub async fn layer_image(&self, layer: &str) -> Result<Option<LayerImage>, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let entry = kv
            .get(layer)
            .await
            .map_err(|e| BusError::nats("read a layer's image", e))?;
        Ok(entry.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// The catalog lock; empty before any cascade completed.
    pub async fn catalog_lock(&self) -> Result<CatalogLock, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let entry = kv
            .get(LOCK_KEY)
            .await
            .map_err(|e| BusError::nats("read the catalog lock", e))?;
        Ok(entry.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default())
    }

    /// Puts `layers` into the catalog lock as `cascade` completed them, in one
    /// compare-and-set (a concurrent writer makes this read and merge again). Writing the
    /// same again changes nothing but the time.
    pub async fn lock_layers(&self, cascade: &str, at: i64, layers: Vec<LayerImage>) -> Result<CatalogLock, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let mut last_error = String::new();
        for _ in 0..5 {
            let entry = kv
                .entry(LOCK_KEY)
                .await
                .map_err(|e| BusError::nats("read the catalog lock", e))?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let mut lock: CatalogLock = entry
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .and_then(|e| serde_json::from_slice(&e.value).ok())
                .unwrap_or_default();
            for layer in &layers {
                lock.layers.insert(layer.layer.clone(), layer.clone());
            }
            lock.cascade_id = cascade.to_string();
            lock.at = at;
            let bytes = serde_json::to_vec(&lock).expect("json").into();
            let written = if revision == 0 {
                kv.create(LOCK_KEY, bytes).await.map(drop).map_err(|e| e.to_string())
            } else {
                kv.update(LOCK_KEY, bytes, revision)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(()) => return Ok(lock),
                Err(err) => last_error = err,
            }
        }
        Err(BusError::Nats {
            op: "write the catalog lock",
            message: last_error,
        })
    }

    /// Records a completed build of a catalog layer as the layer's latest image and returns
    /// the record, which says whether the image is the one the layer had. Recording the same
    /// build again (a redelivered event) changes nothing and gives the same answer.
    pub async fn record_layer_image(&self, next: LayerImage) -> Result<LayerImage, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let mut last_error = String::new();
        // Compare-and-set: another cascade replica may record the same layer at once.
        for _ in 0..5 {
            let entry = kv
                .entry(&next.layer)
                .await
                .map_err(|e| BusError::nats("read a layer's image", e))?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let known = entry
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .and_then(|e| serde_json::from_slice::<LayerImage>(&e.value).ok());
            if let Some(known) = known.as_ref().filter(|k| k.build_id == next.build_id) {
                return Ok(known.clone());
            }
            let record = LayerImage {
                previous_image_id: known.map(|k| k.image_id),
                ..next.clone()
            };
            let bytes = serde_json::to_vec(&record).expect("json");
            let written = if revision == 0 {
                kv.create(&record.layer, bytes.into())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            } else {
                kv.update(&record.layer, bytes.into(), revision)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(()) => return Ok(record),
                Err(err) => last_error = err,
            }
        }
        Err(BusError::Nats {
            op: "record a layer's image",
            message: last_error,
        })
    }
}

/// The build of a layer a cascade asked for last in a workspace (key
/// `queued.<workspace>.<layer>`): the one a newer request for the layer may supersede if no
/// worker took it yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedLayer {
    pub build_id: String,
    pub cascade_id: String,
}

fn queued_key(workspace: &str, layer: &str) -> String {
    format!("queued.{workspace}.{layer}")
}

/// Cascades waiting on a build of another cascade for one of their layers, because it
/// superseded theirs (key `followers.<build>`).
fn followers_key(build: &str) -> String {
    format!("followers.{build}")
}

impl Bus {
    pub async fn queued_layer(&self, workspace: &str, layer: &str) -> Result<Option<QueuedLayer>, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let entry = kv
            .get(queued_key(workspace, layer))
            .await
            .map_err(|e| BusError::nats("read a layer's queued build", e))?;
        Ok(entry.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    pub async fn set_queued_layer(&self, workspace: &str, layer: &str, queued: &QueuedLayer) -> Result<(), BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        kv.put(
            queued_key(workspace, layer),
            serde_json::to_vec(queued).expect("json").into(),
        )
        .await
        .map_err(|e| BusError::nats("record a layer's queued build", e))?;
        Ok(())
    }

    /// The cascades following `build` (see `add_followers`), in the order they joined.
    pub async fn followers(&self, build: &str) -> Result<Vec<String>, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let entry = kv
            .get(followers_key(build))
            .await
            .map_err(|e| BusError::nats("read a build's followers", e))?;
        Ok(entry.and_then(|v| serde_json::from_slice(&v).ok()).unwrap_or_default())
    }

    /// Adds cascades to those that take `build`'s end as the end of their own build of the
    /// layer; one already there is not added twice (a handler run again after a crash).
    pub async fn add_followers(&self, build: &str, cascades: &[String]) -> Result<Vec<String>, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let key = followers_key(build);
        let mut last_error = String::new();
        for _ in 0..5 {
            let entry = kv
                .entry(&key)
                .await
                .map_err(|e| BusError::nats("read a build's followers", e))?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let mut list: Vec<String> = entry
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .and_then(|e| serde_json::from_slice(&e.value).ok())
                .unwrap_or_default();
            for c in cascades {
                if !list.contains(c) {
                    list.push(c.clone());
                }
            }
            let bytes = serde_json::to_vec(&list).expect("json").into();
            let written = if revision == 0 {
                kv.create(&key, bytes).await.map(drop).map_err(|e| e.to_string())
            } else {
                kv.update(&key, bytes, revision)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(()) => return Ok(list),
                Err(err) => last_error = err,
            }
        }
        Err(BusError::Nats {
            op: "add a build's followers",
            message: last_error,
        })
    }
}
