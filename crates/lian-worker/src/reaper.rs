//! The reaper: destroys runners nobody will destroy. The lifecycle destroys every runner it
//! leased, so this is the safety net for the gaps: a runner whose build already ended (a
//! worker died between destroying and recording it, then the build ended on another path),
//! and a runner with no build history at all (a spawn that outlived its request).
//! Every runner it destroys is recorded on `lian.<ws>.reaped.<lease-key>`.

use lian_bus::BusError;
use lian_core::control::Reaped;
use lian_core::lifecycle;
use lian_core::{Envelope, LeaseKey, Workspace, subjects};
use time::OffsetDateTime;

use crate::driver::Worker;

impl Worker {
    /// One pass over this host's runners; returns the lease keys destroyed.
    pub(crate) async fn reap_once(&self) -> Result<Vec<LeaseKey>, BusError> {
        let Some(provider) = &self.providers.docker_local else {
            return Ok(vec![]);
        };
        let mut reaped = Vec::new();
        for name in provider.leases() {
            let Ok(lease) = LeaseKey::new(name) else { continue };
            let Some(build) = lease.build() else { continue };
            let records = self.bus.read_all(&subjects::build_history(&build)).await?;
            let envelopes: Vec<Envelope> = records.iter().filter_map(|r| r.decode().ok()).collect();
            let Some((workspace, why)) = lifecycle::reap_reason(&build, &envelopes, provider.age(&lease)) else {
                continue;
            };
            let workspace = workspace.unwrap_or_else(|| Workspace::new("reaper").expect("a token"));
            if let Err(err) = provider.destroy(&lease).await {
                tracing::warn!(%lease, %err, "reaper could not destroy a runner");
                continue;
            }
            let record = Reaped {
                lease_key: lease.clone(),
                build_id: build,
                reason: why.clone(),
                by: self.options.name.clone(),
                at: OffsetDateTime::now_utc(),
            };
            self.bus
                .append(&subjects::reaped(&workspace, &lease), lease.as_str(), &record)
                .await?;
            tracing::warn!(%lease, %why, "reaped a runner");
            reaped.push(lease);
        }
        Ok(reaped)
    }
}
