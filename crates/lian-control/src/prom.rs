//! Prometheus text exposition (format 0.0.4, `prometheus-client`) of the control plane:
//! counters kept by this replica, lease gauges read from the shared bucket at scrape time.

use std::collections::BTreeMap;

use lian_core::control::Lease;
use lian_core::sizing::RunnerType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Held {
    provider: String,
    runner_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tier {
    runner_type: String,
}

/// The exposition: every counter, then the leases held now by provider and tier, and the
/// age of the oldest (a lease that keeps growing older is a runner nobody gives back). The
/// registry is made per scrape: the gauges are what the bucket holds now, the counters are
/// this replica's (registered as handles to the same atomics).
pub fn render(counters: &Counters, leases: &[Lease], warm: &[(RunnerType, usize)], now: u64) -> String {
    let mut registry = Registry::default();
    for (name, help, counter) in [
        (
            "lian_control_leases_created",
            "Runners leased by this replica",
            &counters.leased,
        ),
        (
            "lian_control_lease_failures",
            "Leases a provider could not fulfil",
            &counters.lease_failures,
        ),
        (
            "lian_control_leases_released",
            "Runners destroyed on request",
            &counters.released,
        ),
        (
            "lian_control_leases_reaped",
            "Runners destroyed by the reaper",
            &counters.reaped,
        ),
        (
            "lian_control_metrics_recorded",
            "Build metrics recorded",
            &counters.metrics_recorded,
        ),
        (
            "lian_control_unauthorized",
            "Requests refused for a missing or wrong token",
            &counters.unauthorized,
        ),
        (
            "lian_control_registry_grants",
            "Registry grants given by this replica",
            &counters.registry_grants,
        ),
    ] {
        registry.register(name, help, counter.clone());
    }
    let mut held: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for lease in leases {
        *held
            .entry((lease.provider.as_str(), lease.runner_type.as_str()))
            .or_default() += 1;
    }
    let leased = Family::<Held, Gauge>::default();
    for ((provider, tier), n) in held {
        leased
            .get_or_create(&Held {
                provider: provider.into(),
                runner_type: tier.into(),
            })
            .set(n);
    }
    registry.register("lian_control_leases", "Runners leased now", leased);
    if !warm.is_empty() {
        let engines = Family::<Tier, Gauge>::default();
        for (tier, n) in warm {
            engines
                .get_or_create(&Tier {
                    runner_type: tier.as_str().into(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        registry.register(
            "lian_control_warm_engines",
            "docker_local engines started and waiting for a lease",
            engines,
        );
    }
    let oldest = leases
        .iter()
        .map(|l| now.saturating_sub(l.created_at))
        .max()
        .unwrap_or(0);
    let oldest_gauge = Gauge::<i64>::default();
    oldest_gauge.set(i64::try_from(oldest).unwrap_or(i64::MAX));
    registry.register(
        "lian_control_oldest_lease_seconds",
        "Age of the oldest lease held now",
        oldest_gauge,
    );
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("writing to a String cannot fail");
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
        assert!(
            text.contains("# TYPE lian_control_leases_created_total counter\n"),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
