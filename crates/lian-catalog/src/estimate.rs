//! What a cascade will cost before it starts (OpenShift's `oc adm build-chain`, with time):
//! each planned layer's expected build time from its recorded builds (P50 and P90, on the
//! tier its latest build ran on), and the cascade's wall time on a fleet of `parallelism`
//! workers, found by replaying the plan: a layer starts once its parents in the plan ended
//! and a worker is free, first come in plan order, as the cascade and the work queue do.

use std::collections::BTreeMap;

use lian_core::LayerName;
use serde::Serialize;

use crate::Catalog;

/// One recorded build of a layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub runner_type: String,
    pub seconds: f64,
    /// When it ended (UNIX seconds): the latest sample's tier is the one expected next.
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerEstimate {
    pub layer: LayerName,
    /// The tier its latest recorded build ran on; `None` without history.
    pub tier: Option<String>,
    /// Builds on that tier the figures come from (0: no history, the catalog's median
    /// layer is assumed).
    pub samples: usize,
    pub p50_secs: f64,
    pub p90_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub layers: Vec<LayerEstimate>,
    pub parallelism: usize,
    /// Wall time of the whole cascade with every layer at its P50, and at its P90.
    pub wall_p50_secs: f64,
    pub wall_p90_secs: f64,
    /// The sum of the layers' P50s: the build time the fleet spends.
    pub build_p50_secs: f64,
    /// Layers with no recorded build (their time is a guess).
    pub without_history: usize,
}

/// The `q`-quantile (0..=1) of sorted values, nearest rank.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn per_layer(layer: &LayerName, samples: &[Sample]) -> LayerEstimate {
    let Some(latest) = samples.iter().max_by_key(|s| s.at) else {
        return LayerEstimate {
            layer: layer.clone(),
            tier: None,
            samples: 0,
            p50_secs: 0.0,
            p90_secs: 0.0,
        };
    };
    let mut on_tier: Vec<f64> = samples
        .iter()
        .filter(|s| s.runner_type == latest.runner_type)
        .map(|s| s.seconds)
        .collect();
    on_tier.sort_by(f64::total_cmp);
    LayerEstimate {
        layer: layer.clone(),
        tier: Some(latest.runner_type.clone()),
        samples: on_tier.len(),
        p50_secs: quantile(&on_tier, 0.5),
        p90_secs: quantile(&on_tier, 0.9),
    }
}

/// Estimates `plan` (from `Catalog::plan`, whose changed layer is the root and is not in it).
pub fn estimate(
    catalog: &Catalog,
    plan: &[LayerName],
    history: &BTreeMap<LayerName, Vec<Sample>>,
    parallelism: usize,
) -> Estimate {
    let parallelism = parallelism.max(1);
    let mut layers: Vec<LayerEstimate> = plan
        .iter()
        .map(|l| per_layer(l, history.get(l).map(Vec::as_slice).unwrap_or_default()))
        .collect();
    // A layer never built is assumed to take what the median known layer takes.
    let mut known: Vec<(f64, f64)> = layers
        .iter()
        .filter(|l| l.samples > 0)
        .map(|l| (l.p50_secs, l.p90_secs))
        .collect();
    known.sort_by(|a, b| a.0.total_cmp(&b.0));
    let guess = known.get(known.len() / 2).copied().unwrap_or((0.0, 0.0));
    let mut without_history = 0;
    for l in layers.iter_mut().filter(|l| l.samples == 0) {
        (l.p50_secs, l.p90_secs) = guess;
        without_history += 1;
    }
    let p50: Vec<f64> = layers.iter().map(|l| l.p50_secs).collect();
    let p90: Vec<f64> = layers.iter().map(|l| l.p90_secs).collect();
    Estimate {
        wall_p50_secs: replay(catalog, plan, &p50, parallelism),
        wall_p90_secs: replay(catalog, plan, &p90, parallelism),
        build_p50_secs: p50.iter().sum(),
        layers,
        parallelism,
        without_history,
    }
}

/// The time the last layer ends when `plan` runs on `workers` workers, each layer taking
/// `secs[i]`: list scheduling in plan order, a layer ready once its parents in the plan end.
fn replay(catalog: &Catalog, plan: &[LayerName], secs: &[f64], workers: usize) -> f64 {
    let position: BTreeMap<&LayerName, usize> = plan.iter().enumerate().map(|(i, l)| (l, i)).collect();
    let parents: Vec<Vec<usize>> = plan
        .iter()
        .map(|l| {
            catalog
                .get(l.as_str())
                .map(|spec| spec.parents().filter_map(|p| position.get(p).copied()).collect())
                .unwrap_or_default()
        })
        .collect();
    let mut end = vec![f64::NAN; plan.len()];
    let mut free_at = vec![0.0_f64; workers];
    // Plan order puts parents first, so each layer's parents have ended times already.
    for (i, deps) in parents.iter().enumerate() {
        let ready = deps.iter().map(|&p| end[p]).fold(0.0, f64::max);
        let (worker, free) = free_at
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .expect("at least one worker");
        let start = ready.max(free);
        end[i] = start + secs[i];
        free_at[worker] = end[i];
    }
    end.into_iter().fold(0.0, f64::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{name, synthetic};

    fn sample(tier: &str, seconds: f64, at: i64) -> Sample {
        Sample {
            runner_type: tier.into(),
            seconds,
            at,
        }
    }

    #[test]
    fn figures_come_from_the_latest_tier_and_a_chain_adds_up() {
        // One tree of 3: n1 and n2 both built on n0.
        let catalog = synthetic(1, 3, false);
        let plan = catalog.plan(name(0, 0).as_str()).unwrap();
        assert_eq!(plan, [name(0, 1), name(0, 2)]);
        let history = BTreeMap::from([(
            name(0, 1),
            vec![
                sample("cax11", 500.0, 1),
                sample("cax21", 60.0, 2),
                sample("cax21", 120.0, 3),
                sample("cax21", 90.0, 4),
            ],
        )]);
        let one = estimate(&catalog, &plan, &history, 1);
        let n1 = &one.layers[0];
        assert_eq!((n1.tier.as_deref(), n1.samples), (Some("cax21"), 3));
        assert_eq!((n1.p50_secs, n1.p90_secs), (90.0, 120.0));
        // n2 has no history: it is assumed to take what the median known layer takes.
        assert_eq!((one.layers[1].samples, one.layers[1].p50_secs), (0, 90.0));
        assert_eq!(one.without_history, 1);
        assert_eq!(one.wall_p50_secs, 180.0, "one worker builds them one after the other");
        let two = estimate(&catalog, &plan, &history, 2);
        assert_eq!(two.wall_p50_secs, 90.0, "two workers build the siblings side by side");
        assert_eq!(two.wall_p90_secs, 120.0);
        assert_eq!(two.build_p50_secs, 180.0);
    }

    #[test]
    fn a_layer_waits_for_its_parents_however_many_workers_there_are() {
        // n1 on n0, n3 and n4 on n1: n1 must end before either starts.
        let catalog = synthetic(1, 5, false);
        let plan = catalog.plan(name(0, 1).as_str()).unwrap();
        assert_eq!(plan, [name(0, 3), name(0, 4)]);
        let plan = catalog.plan(name(0, 0).as_str()).unwrap();
        let history: BTreeMap<_, _> = plan
            .iter()
            .map(|l| (l.clone(), vec![sample("cax11", 10.0, 1)]))
            .collect();
        let wide = estimate(&catalog, &plan, &history, 64);
        assert_eq!(wide.wall_p50_secs, 20.0, "two levels of 10 s, whatever the width");
    }
}
