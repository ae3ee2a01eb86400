//! The linear strategies: a weighted sum accumulated as updates arrive, divided by the
//! total weight at the round's end, then the server step.
//!
//! - FedAvg / FedProx / FedAdam / FedYogi: `Σ n_k Δ_k / Σ n_k`, in one f32 accumulator that
//!   uploads add their chunks to as they arrive ([`StreamTarget`]): memory is one accumulator
//!   however many sites join, and it becomes the next model's buffer, so finishing allocates
//!   nothing.
//! - Central DP (DP-FedAvg, McMahan et al. 2018): each Δ_k is scaled to norm ≤ S, weights are
//!   uniform (so one site moves the sum by at most S), and N(0, (σS)²) is added to every
//!   coordinate of the sum before dividing by K.
//! - Secure aggregation: masked ring words are summed modulo 2^32; the masks cancel only in the
//!   complete sum, which is then read as fixed point (`codec::ring_decode`). Sites weight by
//!   n_k before masking, so the result is the same sample-weighted mean.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::aggregate::server_opt::ServerStep;
use crate::aggregate::{Aggregator, ModelUpdate, RoundAggregate, UpdateValues};
use crate::codec::ring_decode;
use crate::error::{Error, Result};
use crate::ids::SiteId;
use crate::model_state::ModelState;
use crate::wire::Values;

/// Values read from a spooled update per block.
const BLOCK: usize = 1 << 16;

enum Sum {
    Float(Vec<f32>),
    Ring(Vec<u32>),
}

impl Sum {
    fn len(&self) -> usize {
        match self {
            Sum::Float(v) => v.len(),
            Sum::Ring(v) => v.len(),
        }
    }

    fn add(&mut self, at: usize, values: Values<'_>, weight: f32) -> Result<()> {
        let end = at + match values {
            Values::F32(v) => v.len(),
            Values::Ring(v) => v.len(),
        };
        if end > self.len() {
            return Err(Error::InvalidUpdate(format!("values {at}..{end} outside the model's {}", self.len())));
        }
        match (self, values) {
            (Sum::Float(sum), Values::F32(v)) => sum[at..end].iter_mut().zip(v).for_each(|(s, d)| *s += weight * d),
            (Sum::Ring(sum), Values::Ring(v)) => sum[at..end].iter_mut().zip(v).for_each(|(s, d)| *s = s.wrapping_add(*d)),
            (Sum::Float(_), Values::Ring(_)) => return Err(Error::InvalidUpdate("a masked update reached a plain aggregator".into())),
            (Sum::Ring(_), Values::F32(_)) => return Err(Error::InvalidUpdate("secure aggregation is on: the update must be masked ring words".into())),
        }
        Ok(())
    }

    fn zero(&mut self) {
        match self {
            Sum::Float(v) => v.iter_mut().for_each(|x| *x = 0.0),
            Sum::Ring(v) => v.iter_mut().for_each(|x| *x = 0),
        }
    }
}

struct SumState {
    sum: Sum,
    closed: bool,
    /// Streams that added values (accepted or not).
    streamed: BTreeSet<u64>,
}

/// The round's running sum, shared with the uploads in flight: each decoded chunk is added
/// as it arrives (`Values` at a flat offset, times the update's weight), so an update is
/// never held or re-read. An upload that is refused after some of its chunks were added
/// leaves the sum "dirty"; the round's end then rebuilds it from the accepted updates'
/// spool files, so the result never includes a refused update.
pub struct StreamTarget {
    state: Mutex<SumState>,
}

impl StreamTarget {
    fn lock(&self) -> MutexGuard<'_, SumState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds one chunk of stream `stream` at flat offset `at`.
    pub fn add(&self, stream: u64, at: usize, values: Values<'_>, weight: f32) -> Result<()> {
        let mut s = self.lock();
        if s.closed {
            return Err(Error::InvalidUpdate("the round closed while this update was arriving".into()));
        }
        s.streamed.insert(stream);
        s.sum.add(at, values, weight)
    }

    /// Whether the sum holds only values of the accepted streams.
    fn clean(s: &SumState, accepted: &BTreeSet<u64>) -> bool {
        s.streamed.is_subset(accepted)
    }
}

/// Where an arriving update's chunks go, and how they are weighted.
pub type StreamPlan = (Arc<StreamTarget>, StreamWeight);

/// How a streamed update's chunks are weighted (known from its header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamWeight {
    /// By the header's sample count (FedAvg).
    SampleCount,
    /// Unweighted (masked ring words: the sites weighted before masking).
    One,
}

impl StreamWeight {
    pub fn weight(self, sample_count: u64) -> f32 {
        match self {
            StreamWeight::SampleCount => sample_count as f32,
            StreamWeight::One => 1.0,
        }
    }
}

/// Weighted mean of the round's updates, then a [`ServerStep`].
pub struct WeightedMean {
    target: Arc<StreamTarget>,
    ring_bits: Option<u32>,
    total_weight: f64,
    step: ServerStep,
    /// Central DP: clip norm S and noise multiplier σ.
    central_dp: Option<(f64, f64)>,
    clipped: usize,
    sites: Vec<SiteId>,
    /// Accepted updates (their spool files, kept to rebuild the sum) and their weights.
    accepted: Vec<(UpdateValues, f32)>,
    accepted_streams: BTreeSet<u64>,
}

impl WeightedMean {
    pub fn new(global: &ModelState, step: ServerStep) -> Self {
        Self::with_buffer(global, step, None)
    }

    /// Like [`WeightedMean::new`], reusing `buffer` (any contents) as the accumulator when it
    /// has the model's size.
    pub fn with_buffer(global: &ModelState, step: ServerStep, buffer: Option<Vec<f32>>) -> Self {
        let sum = match buffer {
            Some(mut b) if b.len() == global.numel() => {
                b.iter_mut().for_each(|x| *x = 0.0);
                b
            }
            _ => vec![0.0; global.numel()],
        };
        Self {
            target: Arc::new(StreamTarget { state: Mutex::new(SumState { sum: Sum::Float(sum), closed: false, streamed: BTreeSet::new() }) }),
            ring_bits: None,
            total_weight: 0.0,
            step,
            central_dp: None,
            clipped: 0,
            sites: vec![],
            accepted: vec![],
            accepted_streams: BTreeSet::new(),
        }
    }

    /// Sums masked ring words instead of floats (secure aggregation).
    pub fn ring(mut self, frac_bits: u32) -> Self {
        {
            let mut s = self.target.lock();
            let words = match std::mem::replace(&mut s.sum, Sum::Ring(vec![])) {
                Sum::Float(f) => bytemuck::allocation::cast_vec::<f32, u32>(f),
                Sum::Ring(w) => w,
            };
            s.sum = Sum::Ring(words);
            s.sum.zero();
        }
        self.ring_bits = Some(frac_bits);
        self
    }

    /// Clips each update to norm `clip` and adds N(0, (σ·clip)²) to the sum (uniform weights).
    pub fn central_dp(mut self, clip: f64, noise_multiplier: f64) -> Self {
        self.central_dp = Some((clip, noise_multiplier));
        self
    }

    /// How updates are weighted without central DP: masked ring words were weighted by the
    /// sites before masking, fp32 deltas are weighted here by their sample count.
    fn stream_weight(&self) -> StreamWeight {
        if self.ring_bits.is_some() { StreamWeight::One } else { StreamWeight::SampleCount }
    }

    /// Adds a whole (spooled or in-memory) update to the sum, block by block.
    fn add_all(sum: &mut Sum, values: &UpdateValues, weight: f32) -> Result<()> {
        let mut reader = values.reader()?;
        let n = values.len();
        if n != sum.len() {
            return Err(Error::InvalidUpdate(format!("update has {n} values, the model {}", sum.len())));
        }
        let mut at = 0;
        if values.is_ring() {
            let mut block = vec![0u32; BLOCK.min(n)];
            while at < n {
                let b = &mut block[..BLOCK.min(n - at)];
                reader.read_u32(b)?;
                sum.add(at, Values::Ring(b), weight)?;
                at += b.len();
            }
        } else {
            let mut block = vec![0f32; BLOCK.min(n)];
            while at < n {
                let b = &mut block[..BLOCK.min(n - at)];
                reader.read_f32(b)?;
                sum.add(at, Values::F32(b), weight)?;
                at += b.len();
            }
        }
        Ok(())
    }
}

impl Aggregator for WeightedMean {
    fn stream_target(&self) -> Option<StreamPlan> {
        // Central DP weighs by a clip factor known only once the whole update is in.
        if self.central_dp.is_some() {
            return None;
        }
        Some((self.target.clone(), self.stream_weight()))
    }

    fn accumulate(&mut self, update: ModelUpdate) -> Result<()> {
        if update.values.is_ring() != self.ring_bits.is_some() {
            return Err(Error::InvalidUpdate(if self.ring_bits.is_some() {
                "secure aggregation is on: the update must be masked ring words".into()
            } else {
                "a masked update reached a plain aggregator".into()
            }));
        }
        let weight = match self.central_dp {
            Some((clip, _)) => {
                let norm = update.summary.norm();
                if norm > clip {
                    self.clipped += 1;
                    (clip / norm) as f32
                } else {
                    1.0
                }
            }
            None => self.stream_weight().weight(update.sample_count()),
        };
        match update.streamed {
            // Its values are in the sum already.
            Some(id) => {
                self.accepted_streams.insert(id);
            }
            None => Self::add_all(&mut self.target.lock().sum, &update.values, weight)?,
        }
        self.total_weight += if self.central_dp.is_some() { 1.0 } else { update.sample_count() as f64 };
        self.sites.push(update.site.clone());
        self.accepted.push((update.values, weight));
        Ok(())
    }

    fn contributors(&self) -> &[SiteId] {
        &self.sites
    }

    fn finish(self: Box<Self>, global: &ModelState) -> Result<RoundAggregate> {
        if self.total_weight <= 0.0 {
            return Err(Error::InvalidUpdate("no update to aggregate".into()));
        }
        let sum = {
            let mut s = self.target.lock();
            s.closed = true;
            if !StreamTarget::clean(&s, &self.accepted_streams) {
                // A refused or unfinished upload added values: recompute from the accepted ones.
                tracing::warn!("rebuilding the round's sum without a refused or unfinished upload");
                s.sum.zero();
                for (values, weight) in &self.accepted {
                    Self::add_all(&mut s.sum, values, *weight)?;
                }
            }
            std::mem::replace(&mut s.sum, Sum::Float(vec![]))
        };
        let inv = 1.0 / self.total_weight;
        let mut noise_std = 0.0;
        let mean = match sum {
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
            Sum::Ring(mut words) => {
                // Read each word as fixed point, in place: the ring buffer becomes the f32 mean.
                let bits = self.ring_bits.unwrap_or(16);
                for w in words.iter_mut() {
                    *w = ((ring_decode(*w, bits) * inv) as f32).to_bits();
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
    use crate::wire::Values;
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
            let (words, _) = ring_encode(&[v; 7], n as f64, 16);
            let mut u = update(site, n, global.zeros_like());
            u.values = UpdateValues::Ring(words);
            a.accumulate(u).unwrap();
        }
        let next = a.finish(&global).unwrap().model;
        // (100·1 − 300·4) / 400 = −2.75
        assert!(next.data().iter().all(|&v| (v + 2.75).abs() < 1e-6), "{:?}", next.data());
    }

    #[test]
    fn streamed_chunks_count_once_and_a_refused_stream_is_rebuilt_away() {
        let global = small_state(0.0).zeros_like();
        let mut a = plain(&global);
        let (target, w) = a.stream_target().unwrap();
        assert_eq!(w.weight(100), 100.0);
        // Stream 1 (site a, Δ = 1) arrives in two chunks and is accepted without a re-read.
        target.add(1, 0, Values::F32(&[1.0; 3]), 100.0).unwrap();
        target.add(1, 3, Values::F32(&[1.0; 4]), 100.0).unwrap();
        let mut ua = update("a", 100, delta(&global, 1.0));
        ua.streamed = Some(1);
        a.accumulate(ua).unwrap();
        // Stream 2 adds garbage and is then refused (never accumulated).
        target.add(2, 0, Values::F32(&[1e6; 7]), 50.0).unwrap();
        // Site b arrives the classic way.
        a.accumulate(update("b", 300, delta(&global, 4.0))).unwrap();
        let next = a.finish(&global).unwrap().model;
        assert!(next.data().iter().all(|&v| (v - 3.25).abs() < 1e-6), "{:?}", next.data());
        // Once finished, late chunks are refused.
        assert!(target.add(3, 0, Values::F32(&[1.0]), 1.0).is_err());
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
