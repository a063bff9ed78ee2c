//! The control plane's reaper: destroys the runners of leases nobody will give back (their
//! build ended, or they have no build history after the grace period), and records each on
//! `lian.<ws>.reaped.<lease-key>`. Every replica runs it; destroying is idempotent.

use lian_bus::BusError;
use lian_core::control::{LeaseState, Reaped};
use lian_core::{Envelope, lifecycle, subjects};
use std::time::Duration;
use time::OffsetDateTime;

use crate::api::{App, destroy, now};

impl App {
    pub async fn reap_once(&self) -> Result<(), BusError> {
        for lease in self.bus.leases().await? {
            let build = &lease.build_id;
            let records = self.bus.read_all(&subjects::build_history(build)).await?;
            let envelopes: Vec<Envelope> = records.iter().filter_map(|r| r.decode().ok()).collect();
            let age = Duration::from_secs(now().saturating_sub(lease.created_at));
            // A lease being created is in the hands of the request that recorded it.
            if lease.state == LeaseState::Creating && age < lifecycle::ORPHAN_GRACE {
                continue;
            }
            let Some((_, why)) = lifecycle::reap_reason(build, &envelopes, Some(age)) else {
                continue;
            };
            if let Err(err) = destroy(self, &lease).await {
                tracing::warn!(lease = %lease.lease_id, %err, "reaper could not destroy a runner");
                continue;
            }
            self.counters.reaped.inc();
            let record = Reaped {
                lease_key: lease.lease_id.clone(),
                build_id: build.clone(),
                reason: why.clone(),
                by: self.options.name.clone(),
                at: OffsetDateTime::now_utc(),
            };
            self.bus
                .append(
                    &subjects::reaped(&lease.workspace, &lease.lease_id),
                    lease.lease_id.as_str(),
                    &record,
                )
                .await?;
            tracing::warn!(lease = %lease.lease_id, %why, "reaped a runner");
        }
        Ok(())
    }
}
