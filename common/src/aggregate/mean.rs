//! The linear strategies: a weighted sum accumulated as updates arrive, divided by the
//! total weight at the round's end, then the server step.
//!
//! - FedAvg / FedProx / FedAdam / FedYogi: `Σ n_k Δ_k / Σ n_k`, in one f32 accumulator
//!   (block-wise from the spool: memory is one accumulator however many sites join; the
//!   accumulator becomes the next model's buffer, so finishing allocates nothing).
//! - Central DP (DP-FedAvg, McMahan et al. 2018): each Δ_k is scaled to norm ≤ S, weights are
//!   uniform (so one site moves the sum by at most S), and N(0, (σS)²) is added to every
//!   coordinate of the sum before dividing by K.
//! - Secure aggregation: masked ring words are summed modulo 2^32; the masks cancel only in the
//!   complete sum, which is then read as fixed point (`codec::ring_decode`). Sites weight by
//!   n_k before masking, so the result is the same sample-weighted mean.

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::aggregate::server_opt::ServerStep;
use crate::aggregate::{Aggregator, ModelUpdate, RoundAggregate};
use crate::codec::ring_decode;
use crate::error::{Error, Result};
use crate::ids::SiteId;
use crate::model_state::ModelState;

/// Values read from an update per block.
const BLOCK: usize = 1 << 16;

enum Sum {
    Float(Vec<f32>),
    Ring { words: Vec<u32>, frac_bits: u32 },
}

/// Weighted mean of the round's updates, then a [`ServerStep`].
pub struct WeightedMean {
    sum: Sum,
    total_weight: f64,
    step: ServerStep,
    /// Central DP: clip norm S and noise multiplier σ.
    central_dp: Option<(f64, f64)>,
    clipped: usize,
    sites: Vec<SiteId>,
    block: Vec<f32>,
}

impl WeightedMean {
    pub fn new(global: &ModelState, step: ServerStep) -> Self {
        Self { sum: Sum::Float(vec![0.0; global.numel()]), total_weight: 0.0, step, central_dp: None, clipped: 0, sites: vec![], block: vec![0.0; BLOCK] }
    }

    /// Sums masked ring words instead of floats (secure aggregation).
    pub fn ring(mut self, frac_bits: u32) -> Self {
        let n = match &self.sum {
            Sum::Float(v) => v.len(),
            Sum::Ring { words, .. } => words.len(),
        };
        self.sum = Sum::Ring { words: vec![0; n], frac_bits };
        self.block = vec![];
        self
    }

    /// Clips each update to norm `clip` and adds N(0, (σ·clip)²) to the sum (uniform weights).
    pub fn central_dp(mut self, clip: f64, noise_multiplier: f64) -> Self {
        self.central_dp = Some((clip, noise_multiplier));
        self
    }
}

impl Aggregator for WeightedMean {
    fn accumulate(&mut self, update: ModelUpdate) -> Result<()> {
        let mut reader = update.values.reader()?;
        match &mut self.sum {
            Sum::Float(sum) => {
                if update.values.is_ring() {
                    return Err(Error::InvalidUpdate("a masked update reached a plain aggregator".into()));
                }
                if update.values.len() != sum.len() {
                    return Err(Error::InvalidUpdate(format!("update has {} values, the model {}", update.values.len(), sum.len())));
                }
                let weight = match self.central_dp {
                    Some((clip, _)) => {
                        let norm = update.summary.norm();
                        if norm > clip {
                            self.clipped += 1;
                            clip / norm
                        } else {
                            1.0
                        }
                    }
                    None => update.sample_count() as f64,
                };
                let w = weight as f32;
                for part in sum.chunks_mut(BLOCK) {
                    let block = &mut self.block[..part.len()];
                    reader.read_f32(block)?;
                    for (s, d) in part.iter_mut().zip(block.iter()) {
                        *s += w * d;
                    }
                }
                self.total_weight += if self.central_dp.is_some() { 1.0 } else { update.sample_count() as f64 };
            }
            Sum::Ring { words, .. } => {
                if !update.values.is_ring() {
                    return Err(Error::InvalidUpdate("secure aggregation is on: the update must be masked ring words".into()));
                }
                if update.values.len() != words.len() {
                    return Err(Error::InvalidUpdate(format!("update has {} values, the model {}", update.values.len(), words.len())));
                }
                let mut block = vec![0u32; BLOCK];
                for part in words.chunks_mut(BLOCK) {
                    let b = &mut block[..part.len()];
                    reader.read_u32(b)?;
                    for (s, d) in part.iter_mut().zip(b.iter()) {
                        *s = s.wrapping_add(*d);
                    }
                }
                self.total_weight += update.sample_count() as f64;
            }
        }
        self.sites.push(update.site.clone());
        Ok(())
    }

    fn contributors(&self) -> &[SiteId] {
        &self.sites
    }

    fn finish(self: Box<Self>, global: &ModelState) -> Result<RoundAggregate> {
        if self.total_weight <= 0.0 {
            return Err(Error::InvalidUpdate("no update to aggregate".into()));
        }
        let inv = 1.0 / self.total_weight;
        let mut noise_std = 0.0;
        let mean = match self.sum {
            Sum::Float(mut sum) => {
                if let Some((clip, sigma)) = self.central_dp {
                    let std = clip * sigma;
                    noise_std = std * inv;
                    if std > 0.0 {
                        let normal = Normal::new(0.0f32, std as f32).map_err(|e| Error::InvalidUpdate(format!("noise: {e}")))?;
                        let mut rng = rand::rngs::StdRng::from_os_rng();
                        sum.iter_mut().for_each(|s| *s += normal.sample(&mut rng));
                    }
                }
                let inv = inv as f32;
                sum.iter_mut().for_each(|s| *s *= inv);
                sum
            }
            Sum::Ring { words, frac_bits } => {
                // Read each word as fixed point, in place: the ring buffer becomes the f32 mean.
                let mut words = words;
                for w in words.iter_mut() {
                    *w = ((ring_decode(*w, frac_bits) * inv) as f32).to_bits();
                }
                bytemuck::allocation::cast_vec::<u32, f32>(words)
            }
        };
        let (next, server_state) = self.step.apply(global, mean);
        let mut model = ModelState::new(global.specs().to_vec(), next)?;
        crate::aggregate::clamp_running_variances(&mut model);
        Ok(RoundAggregate { model, server_state, clipped: self.clipped, noise_std })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::tests::update;
    use crate::aggregate::{AggregationConfig, UpdateValues};
    use crate::codec::ring_encode;
    use crate::model_state::tests::small_state;
    use proptest::prelude::*;

    fn plain(global: &ModelState) -> Box<WeightedMean> {
        Box::new(WeightedMean::new(global, ServerStep::new(&AggregationConfig::default(), global, None)))
    }

    fn delta(global: &ModelState, v: f32) -> ModelState {
        ModelState::new(global.specs().to_vec(), vec![v; global.numel()]).unwrap()
    }

    #[test]
    fn fedavg_weights_by_sample_count() {
        let global = small_state(0.0).zeros_like();
        let mut a = plain(&global);
        a.accumulate(update("a", 100, delta(&global, 1.0))).unwrap();
        a.accumulate(update("b", 300, delta(&global, 4.0))).unwrap();
        let next = a.finish(&global).unwrap().model;
        // (100·1 + 300·4) / 400 = 3.25
        assert!(next.data().iter().all(|&v| (v - 3.25).abs() < 1e-6));
    }

    #[test]
    fn central_dp_clips_to_the_norm_and_weights_uniformly() {
        // Δ_a = 3·1 (norm 3·√7 ≈ 7.94) is clipped to norm 1; Δ_b = 0.01·1 (norm 0.026) is kept.
        // With σ = 0 the mean is (1/√7 + 0.01) / 2 per coordinate, whatever the sample counts.
        let global = small_state(0.0).zeros_like();
        let mut a = Box::new(WeightedMean::new(&global, ServerStep::Plain).central_dp(1.0, 0.0));
        a.accumulate(update("a", 100, delta(&global, 3.0))).unwrap();
        a.accumulate(update("b", 1, delta(&global, 0.01))).unwrap();
        let r = a.finish(&global).unwrap();
        let want = (1.0 / 7f32.sqrt() + 0.01) / 2.0;
        assert!(r.model.data().iter().all(|&v| (v - want).abs() < 1e-6), "{:?}", r.model.data());
        assert_eq!(r.clipped, 1);
    }

    #[test]
    fn central_dp_noise_has_the_configured_spread() {
        let global = ModelState::from_named(vec![("w".into(), vec![200_000], vec![0.0; 200_000])]).unwrap();
        let mut a = Box::new(WeightedMean::new(&global, ServerStep::Plain).central_dp(2.0, 1.5));
        a.accumulate(update("a", 1, global.zeros_like())).unwrap();
        a.accumulate(update("b", 1, global.zeros_like())).unwrap();
        let r = a.finish(&global).unwrap();
        // Sum noise σS = 3, divided by K = 2 → 1.5 per coordinate.
        let var = r.model.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 200_000.0;
        assert!((var.sqrt() - 1.5).abs() < 0.01, "std {}", var.sqrt());
        assert!((r.noise_std - 1.5).abs() < 1e-12);
    }

    #[test]
    fn ring_sums_decode_to_the_weighted_mean() {
        let global = small_state(0.0).zeros_like();
        let mut a = Box::new(WeightedMean::new(&global, ServerStep::Plain).ring(16));
        for (site, n, v) in [("a", 100u64, 1.0f32), ("b", 300, -4.0)] {
            let (words, _) = ring_encode(&vec![v; 7], n as f64, 16);
            let mut u = update(site, n, global.zeros_like());
            u.values = UpdateValues::Ring(words);
            a.accumulate(u).unwrap();
        }
        let next = a.finish(&global).unwrap().model;
        // (100·1 − 300·4) / 400 = −2.75
        assert!(next.data().iter().all(|&v| (v + 2.75).abs() < 1e-6), "{:?}", next.data());
    }

    proptest! {
        #[test]
        fn fedavg_of_identical_updates_is_that_update(vals in prop::collection::vec(-1e3f32..1e3, 7), ns in prop::collection::vec(1u64..10_000, 1..6)) {
            let global = small_state(0.5);
            let d = ModelState::new(global.specs().to_vec(), vals.clone()).unwrap();
            let mut a = plain(&global);
            for (i, n) in ns.iter().enumerate() {
                a.accumulate(update(&format!("s{i}"), *n, d.clone())).unwrap();
            }
            let next = a.finish(&global).unwrap().model;
            for ((n, g), d) in next.data().iter().zip(global.data()).zip(&vals) {
                prop_assert!((n - (g + d)).abs() <= 1e-3 * (1.0 + d.abs()));
            }
        }

        #[test]
        fn fedavg_matches_an_f64_reference(rows in prop::collection::vec((1u64..500, prop::collection::vec(-10f32..10.0, 7)), 1..6)) {
            let global = small_state(0.25);
            let mut a = plain(&global);
            for (i, (n, v)) in rows.iter().enumerate() {
                a.accumulate(update(&format!("s{i}"), *n, ModelState::new(global.specs().to_vec(), v.clone()).unwrap())).unwrap();
            }
            let next = a.finish(&global).unwrap().model;
            let total: f64 = rows.iter().map(|(n, _)| *n as f64).sum();
            for j in 0..7 {
                let want = f64::from(global.data()[j]) + rows.iter().map(|(n, v)| *n as f64 * f64::from(v[j])).sum::<f64>() / total;
                prop_assert!((f64::from(next.data()[j]) - want).abs() < 1e-3, "{j}: {} vs {want}", next.data()[j]);
            }
        }
    }
}
