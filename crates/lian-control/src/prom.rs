//! Prometheus text exposition (format 0.0.4) of the control plane: counters kept by this
//! replica, lease gauges read from the shared bucket at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use lian_core::control::Lease;
use lian_core::sizing::RunnerType;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub leased: Counter,
    pub lease_failures: Counter,
    pub released: Counter,
    pub reaped: Counter,
    pub metrics_recorded: Counter,
    pub unauthorized: Counter,
    pub registry_grants: Counter,
}

/// The exposition: every counter, then the leases held now by provider and tier, and the
/// age of the oldest (a lease that keeps growing older is a runner nobody gives back).
pub fn render(counters: &Counters, leases: &[Lease], warm: &[(RunnerType, usize)], now: u64) -> String {
    let mut out = String::new();
    for (name, help, counter) in [
        (
            "lian_control_leases_created_total",
            "Runners leased by this replica.",
            &counters.leased,
        ),
        (
            "lian_control_lease_failures_total",
            "Leases a provider could not fulfil.",
            &counters.lease_failures,
        ),
        (
            "lian_control_leases_released_total",
            "Runners destroyed on request.",
            &counters.released,
        ),
        (
            "lian_control_leases_reaped_total",
            "Runners destroyed by the reaper.",
            &counters.reaped,
        ),
        (
            "lian_control_metrics_recorded_total",
            "Build metrics recorded.",
            &counters.metrics_recorded,
        ),
        (
            "lian_control_unauthorized_total",
            "Requests refused for a missing or wrong token.",
            &counters.unauthorized,
        ),
        (
            "lian_control_registry_grants_total",
            "Registry grants given by this replica.",
            &counters.registry_grants,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
            counter.get()
        );
    }
    let mut held: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for lease in leases {
        *held
            .entry((lease.provider.as_str(), lease.runner_type.as_str()))
            .or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP lian_control_leases Runners leased now.\n# TYPE lian_control_leases gauge"
    );
    for ((provider, tier), n) in held {
        let _ = writeln!(
            out,
            "lian_control_leases{{provider=\"{provider}\",runner_type=\"{tier}\"}} {n}"
        );
    }
    if !warm.is_empty() {
        let _ = writeln!(
            out,
            "# HELP lian_control_warm_engines docker_local engines started and waiting for a lease.\n# TYPE lian_control_warm_engines gauge"
        );
        for (tier, n) in warm {
            let _ = writeln!(
                out,
                "lian_control_warm_engines{{runner_type=\"{}\"}} {n}",
                tier.as_str()
            );
        }
    }
    let oldest = leases
        .iter()
        .map(|l| now.saturating_sub(l.created_at))
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP lian_control_oldest_lease_seconds Age of the oldest lease held now.\n# TYPE lian_control_oldest_lease_seconds gauge\nlian_control_oldest_lease_seconds {oldest}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lian_core::control::LeaseState;
    use lian_core::directives::ComputeProvider;

    fn lease(key: &str, tier: RunnerType, created_at: u64) -> Lease {
        Lease {
            lease_id: key.parse().unwrap(),
            provider: ComputeProvider::DockerLocal,
            runner_type: tier,
            workspace: "ws".parse().unwrap(),
            build_id: "b".parse().unwrap(),
            owner: "w".into(),
            state: LeaseState::Ready,
            host: "local".into(),
            provider_id: String::new(),
            created_at,
            host_key: None,
            ssh_port: None,
        }
    }

    #[test]
    fn leases_are_counted_by_provider_and_tier() {
        let c = Counters::default();
        c.leased.inc();
        c.leased.inc();
        let text = render(
            &c,
            &[
                lease("b-r1", RunnerType::Cax11, 100),
                lease("c-r1", RunnerType::Cax11, 40),
                lease("d-r2", RunnerType::Cax21, 90),
            ],
            &[(RunnerType::Cax11, 1)],
            160,
        );
        assert!(
            text.contains("lian_control_warm_engines{runner_type=\"cax11\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("lian_control_leases_created_total 2\n"), "{text}");
        assert!(text.contains("lian_control_leases{provider=\"docker_local\",runner_type=\"cax11\"} 2\n"));
        assert!(text.contains("lian_control_leases{provider=\"docker_local\",runner_type=\"cax21\"} 1\n"));
        assert!(text.contains("lian_control_oldest_lease_seconds 120\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
