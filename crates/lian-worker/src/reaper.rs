//! The reaper: destroys runners nobody will destroy. The lifecycle destroys every runner it
//! leased, so this is the safety net for the gaps: a runner whose build already ended (a
//! worker died between destroying and recording it, then the build ended on another path),
//! and a runner with no build history at all (a spawn that outlived its request).
//! Every runner it destroys is recorded on `lian.<ws>.reaped.<lease-key>`.

use std::time::Duration;

use lian_bus::BusError;
use lian_core::lifecycle;
use lian_core::{BuildId, Envelope, LeaseKey, Workspace, subjects};
use time::OffsetDateTime;

use crate::driver::Worker;

/// A runner without any build history is left alone this long: its build may be between
/// spawning it and recording the lease.
const ORPHAN_GRACE: Duration = Duration::from_secs(600);

/// The build a lease key belongs to: `<build>-r<attempt>`.
fn build_of(lease: &LeaseKey) -> Option<BuildId> {
    let (build, attempt) = lease.as_str().rsplit_once("-r")?;
    attempt.parse::<u8>().ok()?;
    BuildId::new(build).ok()
}

impl Worker {
    /// One pass over this host's runners; returns the lease keys destroyed.
    pub(crate) async fn reap_once(&self) -> Result<Vec<LeaseKey>, BusError> {
        let Some(provider) = &self.providers.docker_local else {
            return Ok(vec![]);
        };
        let mut reaped = Vec::new();
        for name in provider.leases() {
            let Ok(lease) = LeaseKey::new(name) else { continue };
            let Some(build) = build_of(&lease) else { continue };
            let records = self.bus.read_all(&subjects::build_history(&build)).await?;
            let envelopes: Vec<Envelope> = records.iter().filter_map(|r| r.decode().ok()).collect();
            let (workspace, why) = if envelopes.is_empty() {
                if provider.age(&lease).is_none_or(|age| age < ORPHAN_GRACE) {
                    continue;
                }
                (
                    Workspace::new("reaper").expect("a token"),
                    "no build history".to_string(),
                )
            } else {
                let Ok(state) = lifecycle::fold(&envelopes) else {
                    continue;
                };
                if !state.is_terminal() {
                    continue;
                }
                let ws = state.workspace.clone().expect("a folded history has a workspace");
                (ws, format!("build {build} already ended"))
            };
            if let Err(err) = provider.destroy(&lease).await {
                tracing::warn!(%lease, %err, "reaper could not destroy a runner");
                continue;
            }
            let record = serde_json::json!({
                "lease_key": lease,
                "build_id": build,
                "reason": why,
                "worker": self.options.name,
                "at": OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            });
            self.bus
                .append(&subjects::reaped(&workspace, &lease), lease.as_str(), &record)
                .await?;
            tracing::warn!(%lease, %why, "reaped a runner");
            reaped.push(lease);
        }
        Ok(reaped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_keys_name_their_build() {
        let b = BuildId::new("01abc-x").unwrap();
        assert_eq!(build_of(&LeaseKey::for_attempt(&b, 2)), Some(b));
        assert_eq!(build_of(&LeaseKey::new("no-attempt").unwrap()), None);
    }
}
