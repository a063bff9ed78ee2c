//! Each catalog layer's latest completed image (bucket `lian-layers`), kept by the cascade:
//! what tells a rebuilt layer that came out unchanged (early cutoff) from one that changed.

use lian_core::subjects;
use serde::de::DeserializeOwned;
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

/// What a read-modify-write decides, given the value it read.
enum Change<T, R> {
    /// Write this value; answer that.
    Write(T, R),
    /// Write nothing; answer that.
    Keep(R),
}

impl Bus {
    /// The JSON value under `key` in the layers bucket, if there is one.
    async fn layers_get<T: DeserializeOwned>(&self, op: &'static str, key: &str) -> Result<Option<T>, BusError> {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let entry = kv.get(key).await.map_err(|e| BusError::nats(op, e))?;
        Ok(entry.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Read-modify-write of the JSON value under `key` in the layers bucket, as a
    /// compare-and-set: another writer in between makes it read and decide again (5 tries).
    async fn layers_update<T, R>(
        &self,
        op: &'static str,
        key: &str,
        mut decide: impl FnMut(Option<T>) -> Change<T, R>,
    ) -> Result<R, BusError>
    where
        T: Serialize + DeserializeOwned,
    {
        let kv = self.kv(subjects::LAYER_BUCKET).await?;
        let mut last_error = String::new();
        for _ in 0..5 {
            let entry = kv.entry(key).await.map_err(|e| BusError::nats(op, e))?;
            let revision = entry.as_ref().map_or(0, |e| e.revision);
            let known = entry
                .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
                .and_then(|e| serde_json::from_slice::<T>(&e.value).ok());
            let (value, answer) = match decide(known) {
                Change::Keep(answer) => return Ok(answer),
                Change::Write(value, answer) => (value, answer),
            };
            let bytes = serde_json::to_vec(&value).expect("json").into();
            let written = if revision == 0 {
                kv.create(key, bytes).await.map(drop).map_err(|e| e.to_string())
            } else {
                kv.update(key, bytes, revision)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(()) => return Ok(answer),
                Err(err) => last_error = err,
            }
        }
        Err(BusError::Nats {
            op,
            message: last_error,
        })
    }

    /// A layer's latest completed image, if it has one.
    pub async fn layer_image(&self, layer: &str) -> Result<Option<LayerImage>, BusError> {
        self.layers_get("read a layer's image", layer).await
    }

    /// The catalog lock; empty before any cascade completed.
    pub async fn catalog_lock(&self) -> Result<CatalogLock, BusError> {
        Ok(self
            .layers_get("read the catalog lock", LOCK_KEY)
            .await?
            .unwrap_or_default())
    }

    /// Puts `layers` into the catalog lock as `cascade` completed them, in one
    /// compare-and-set (a concurrent writer makes this read and merge again). Writing the
    /// same again changes nothing but the time.
    pub async fn lock_layers(&self, cascade: &str, at: i64, layers: Vec<LayerImage>) -> Result<CatalogLock, BusError> {
        self.layers_update("write the catalog lock", LOCK_KEY, |known: Option<CatalogLock>| {
            let mut lock = known.unwrap_or_default();
            for layer in &layers {
                lock.layers.insert(layer.layer.clone(), layer.clone());
            }
            lock.cascade_id = cascade.to_string();
            lock.at = at;
            Change::Write(lock.clone(), lock)
        })
        .await
    }

    /// Records a completed build of a catalog layer as the layer's latest image and returns
    /// the record, which says whether the image is the one the layer had. Recording the same
    /// build again (a redelivered event) changes nothing and gives the same answer.
    pub async fn record_layer_image(&self, next: LayerImage) -> Result<LayerImage, BusError> {
        let key = next.layer.clone();
        self.layers_update(
            "record a layer's image",
            &key,
            |known: Option<LayerImage>| match known {
                Some(known) if known.build_id == next.build_id => Change::Keep(known),
                known => {
                    let record = LayerImage {
                        previous_image_id: known.map(|k| k.image_id),
                        ..next.clone()
                    };
                    Change::Write(record.clone(), record)
                }
            },
        )
        .await
    }

    pub async fn queued_layer(&self, workspace: &str, layer: &str) -> Result<Option<QueuedLayer>, BusError> {
        self.layers_get("read a layer's queued build", &queued_key(workspace, layer))
            .await
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
        Ok(self
            .layers_get("read a build's followers", &followers_key(build))
            .await?
            .unwrap_or_default())
    }

    /// Adds cascades to those that take `build`'s end as the end of their own build of the
    /// layer; one already there is not added twice (a handler run again after a crash).
    pub async fn add_followers(&self, build: &str, cascades: &[String]) -> Result<Vec<String>, BusError> {
        self.layers_update(
            "add a build's followers",
            &followers_key(build),
            |known: Option<Vec<String>>| {
                let mut list = known.unwrap_or_default();
                for c in cascades {
                    if !list.contains(c) {
                        list.push(c.clone());
                    }
                }
                Change::Write(list.clone(), list)
            },
        )
        .await
    }
}
