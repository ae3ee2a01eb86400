//! Byzantine-robust strategies: coordinate-wise median and β-trimmed mean (Yin et al. 2018).
//!
//! They need every update of the round at once, so updates stay spooled on disk until the
//! round closes; `finish` then reads all K files block by block in lock-step. Memory cost:
//! K × one block (256 KiB each) plus the next model, never K models. Both are unweighted:
//! a site's sample count could itself be a lie, and weighting would undo the robustness.
//! The result is applied as a plain step, `w ← w + agg(Δ_1..Δ_K)`.

use crate::aggregate::{Aggregator, ModelUpdate, RoundAggregate};
use crate::error::{Error, Result};
use crate::ids::SiteId;
use crate::model_state::ModelState;

const BLOCK: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Median,
    /// Drop ⌊βK⌋ values at each end.
    Trimmed(f64),
}

/// Coordinate-wise robust aggregation over all of a round's updates.
pub struct CoordinateWise {
    rule: Rule,
    updates: Vec<ModelUpdate>,
    sites: Vec<SiteId>,
}

impl CoordinateWise {
    pub fn median() -> Self {
        Self { rule: Rule::Median, updates: vec![], sites: vec![] }
    }

    pub fn trimmed(beta: f64) -> Self {
        Self { rule: Rule::Trimmed(beta), updates: vec![], sites: vec![] }
    }
}

/// The rule applied to one coordinate's K values (reordered in place).
fn combine(rule: Rule, v: &mut [f32]) -> f32 {
    let k = v.len();
    match rule {
        Rule::Median => {
            let mid = k / 2;
            let (_, m, _) = v.select_nth_unstable_by(mid, f32::total_cmp);
            let hi = *m;
            if k % 2 == 1 {
                hi
            } else {
                let lo = v[..mid].iter().copied().fold(f32::NEG_INFINITY, f32::max);
                (lo + hi) / 2.0
            }
        }
        Rule::Trimmed(beta) => {
            let cut = ((beta * k as f64).floor() as usize).min((k - 1) / 2);
            v.sort_unstable_by(f32::total_cmp);
            let kept = &v[cut..k - cut];
            kept.iter().map(|&x| f64::from(x)).sum::<f64>() as f32 / kept.len() as f32
        }
    }
}

impl Aggregator for CoordinateWise {
    fn accumulate(&mut self, update: ModelUpdate) -> Result<()> {
        if update.values.is_ring() {
            return Err(Error::InvalidUpdate("robust aggregation cannot read masked updates".into()));
        }
        self.sites.push(update.site.clone());
        self.updates.push(update);
        Ok(())
    }

    fn contributors(&self) -> &[SiteId] {
        &self.sites
    }

    fn finish(self: Box<Self>, global: &ModelState) -> Result<RoundAggregate> {
        let k = self.updates.len();
        if k == 0 {
            return Err(Error::InvalidUpdate("no update to aggregate".into()));
        }
        let n = global.numel();
        if let Some(u) = self.updates.iter().find(|u| u.values.len() != n) {
            return Err(Error::InvalidUpdate(format!("update of {} has {} values, the model {n}", u.site, u.values.len())));
        }
        let mut readers = self.updates.iter().map(|u| u.values.reader()).collect::<Result<Vec<_>>>()?;
        let mut blocks = vec![vec![0f32; BLOCK]; k];
        let mut column = vec![0f32; k];
        let mut next = global.data().to_vec();
        for out in next.chunks_mut(BLOCK) {
            for (r, block) in readers.iter_mut().zip(blocks.iter_mut()) {
                r.read_f32(&mut block[..out.len()])?;
            }
            for (i, o) in out.iter_mut().enumerate() {
                for (c, block) in column.iter_mut().zip(&blocks) {
                    *c = block[i];
                }
                *o += combine(self.rule, &mut column);
            }
        }
        let mut model = ModelState::new(global.specs().to_vec(), next)?;
        crate::aggregate::clamp_running_variances(&mut model);
        Ok(RoundAggregate { model, server_state: None, clipped: 0, noise_std: 0.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::update;
    use crate::model_state::tests::small_state;
    use proptest::prelude::*;

    fn run(rule: CoordinateWise, deltas: &[Vec<f32>]) -> Vec<f32> {
        let global = small_state(0.0).zeros_like();
        let mut a = Box::new(rule);
        for (i, d) in deltas.iter().enumerate() {
            a.accumulate(update(&format!("s{i}"), 1 + i as u64, ModelState::new(global.specs().to_vec(), d.clone()).unwrap())).unwrap();
        }
        a.finish(&global).unwrap().model.data().to_vec()
    }

    #[test]
    fn median_and_trimmed_mean_by_hand() {
        let d = |v: f32| vec![v; 7];
        // Median of {1, 2, 100} = 2; of {1, 2, 3, 100} = 2.5.
        assert!(run(CoordinateWise::median(), &[d(1.0), d(2.0), d(100.0)]).iter().all(|&v| v == 2.0));
        assert!(run(CoordinateWise::median(), &[d(1.0), d(2.0), d(3.0), d(100.0)]).iter().all(|&v| v == 2.5));
        // β = 0.2, K = 5 → drop 1 at each end: mean of {2, 3, 4} = 3.
        let five = [d(-50.0), d(2.0), d(3.0), d(4.0), d(90.0)];
        assert!(run(CoordinateWise::trimmed(0.2), &five).iter().all(|&v| (v - 3.0).abs() < 1e-6));
        // β = 0 is the plain (unweighted) mean: 49 / 5.
        assert!(run(CoordinateWise::trimmed(0.0), &five).iter().all(|&v| (v - 9.8).abs() < 1e-5));
    }

    proptest! {
        #[test]
        fn median_ignores_one_arbitrary_outlier(honest in prop::collection::vec(prop::collection::vec(-1f32..1.0, 7), 2..6), outlier in prop::collection::vec(prop_oneof![-1e30f32..1e30, Just(f32::MAX), Just(f32::MIN)], 7)) {
            // With ≥ 2 honest updates plus one outlier (≥ 3 in all), every coordinate of the
            // median lies within the honest values' range.
            let mut all = honest.clone();
            all.push(outlier);
            let m = run(CoordinateWise::median(), &all);
            for j in 0..7 {
                let lo = honest.iter().map(|h| h[j]).fold(f32::INFINITY, f32::min);
                let hi = honest.iter().map(|h| h[j]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(m[j] >= lo - 1e-6 && m[j] <= hi + 1e-6, "{j}: {} not in [{lo}, {hi}]", m[j]);
            }
        }

        #[test]
        fn trimmed_mean_ignores_up_to_its_cut(honest in prop::collection::vec(prop::collection::vec(-1f32..1.0, 7), 4..8), bad in prop::collection::vec(-1e20f32..1e20, 7)) {
            // β = 0.2 with K = 5..9 drops at least one value at each end: one outlier cannot
            // pull the result outside the honest range.
            let mut all = honest.clone();
            all.push(bad);
            let m = run(CoordinateWise::trimmed(0.2), &all);
            for j in 0..7 {
                let lo = honest.iter().map(|h| h[j]).fold(f32::INFINITY, f32::min);
                let hi = honest.iter().map(|h| h[j]).fold(f32::NEG_INFINITY, f32::max);
                prop_assert!(m[j] >= lo - 1e-5 && m[j] <= hi + 1e-5);
            }
        }
    }
}
