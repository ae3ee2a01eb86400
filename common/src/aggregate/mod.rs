//! Aggregation of site updates into the next global model: the one interface every
//! strategy implements, and the checks an update passes before it reaches one.
//!
//! - [`Aggregator`]: `accumulate` each accepted update as it arrives, `finish` into the next model.
//! - [`mean::WeightedMean`]: FedAvg (sample-weighted), FedProx (FedAvg at the server; the
//!   proximal term lives in site training), DP-FedAvg with central noise, secure aggregation
//!   (sums in Z_2^32), each followed by a [`server_opt::ServerStep`]: plain, FedAdam or FedYogi.
//! - [`robust::CoordinateWise`]: coordinate-wise median and β-trimmed mean.
//! - [`spool`]: updates arrive on disk, not in memory, so the coordinator holds about one
//!   model plus one accumulator however many sites upload at once.
//!
//! [`build`] turns the config into the aggregator of one round.

pub mod mean;
pub mod robust;
pub mod server_opt;
pub mod spool;

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::ids::{ModelHash, Round, SiteId};
use crate::model_state::ModelState;
use crate::privacy::{DpMode, PrivacyConfig};
use crate::wire::{PayloadKind, PayloadMeta};

pub use server_opt::ServerOptState;

/// The strategies a consortium can choose (`[aggregation] strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Sample-weighted federated averaging (McMahan et al. 2017).
    #[default]
    Fedavg,
    /// FedAvg with a proximal term μ/2‖w − w_global‖² in every site's loss (Li et al. 2020).
    Fedprox,
    /// FedAvg's mean delta as a pseudo-gradient for server Adam (Reddi et al. 2021).
    Fedadam,
    /// Same with the Yogi second-moment update (Reddi et al. 2021).
    Fedyogi,
    /// Coordinate-wise median of the deltas (Yin et al. 2018), unweighted.
    Median,
    /// Coordinate-wise mean after dropping the ⌊βK⌋ largest and smallest values, unweighted.
    TrimmedMean,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Fedavg => "FedAvg",
            Strategy::Fedprox => "FedProx",
            Strategy::Fedadam => "FedAdam",
            Strategy::Fedyogi => "FedYogi",
            Strategy::Median => "coordinate-wise median",
            Strategy::TrimmedMean => "trimmed mean",
        })
    }
}

/// `[aggregation]` of the coordinator's config; validated at load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregationConfig {
    pub strategy: Strategy,
    /// FedProx μ (sent to the sites).
    pub proximal_mu: f64,
    /// FedAdam / FedYogi server learning rate η and moments (Reddi et al. 2021: β1 0.9,
    /// β2 0.99, τ 1e-3).
    pub server_learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
    /// Trimmed mean: fraction β dropped at each end.
    pub trim_fraction: f64,
}

impl Default for AggregationConfig {
    fn default() -> Self {
        Self { strategy: Strategy::Fedavg, proximal_mu: 0.01, server_learning_rate: 1e-2, beta1: 0.9, beta2: 0.99, tau: 1e-3, trim_fraction: 0.1 }
    }
}

impl AggregationConfig {
    /// Checks the parameters; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if self.strategy == Strategy::Fedprox && !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err("aggregation.proximal_mu must be ≥ 0".into());
        }
        if !pos(self.server_learning_rate) || !pos(self.tau) {
            return Err("aggregation.server_learning_rate and aggregation.tau must be positive".into());
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return Err("aggregation.beta1 and aggregation.beta2 must be within [0, 1)".into());
        }
        if !(0.0..0.5).contains(&self.trim_fraction) {
            return Err("aggregation.trim_fraction must be within [0, 0.5)".into());
        }
        Ok(())
    }

    /// μ the sites add to their loss (0 unless FedProx).
    pub fn site_proximal_mu(&self) -> f64 {
        if self.strategy == Strategy::Fedprox { self.proximal_mu } else { 0.0 }
    }

    /// Whether the strategy needs every update at once (spooled to disk until the round closes).
    pub fn needs_all_updates(&self) -> bool {
        matches!(self.strategy, Strategy::Median | Strategy::TrimmedMean)
    }
}

/// Sum of squares and the first non-finite value of an update, computed as it arrives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ValueSummary {
    pub sum_sq: f64,
    /// `tensor name, element, value` of the first NaN or ±∞.
    pub first_nonfinite: Option<(String, usize, f32)>,
}

impl ValueSummary {
    pub fn of(state: &ModelState) -> Self {
        let mut s = Self::default();
        for (spec, values) in state.tensors() {
            s.add(&spec.name, 0, values);
        }
        s
    }

    /// Adds `values` that start at element `offset` of tensor `name`.
    pub fn add(&mut self, name: &str, offset: usize, values: &[f32]) {
        let mut acc = 0f64;
        for &v in values {
            acc += f64::from(v) * f64::from(v);
        }
        if !acc.is_finite()
            && self.first_nonfinite.is_none()
            && let Some(pos) = values.iter().position(|v| !v.is_finite())
        {
            self.first_nonfinite = Some((name.to_string(), offset + pos, values[pos]));
        }
        self.sum_sq += acc;
    }

    pub fn norm(&self) -> f64 {
        self.sum_sq.sqrt()
    }
}

/// An update's values: in memory (tests, small tools) or spooled to disk (the coordinator).
#[derive(Debug)]
pub enum UpdateValues {
    F32(Vec<f32>),
    /// Words of Z_2^32 (secure aggregation).
    Ring(Vec<u32>),
    Spooled(spool::SpoolFile),
}

impl UpdateValues {
    pub fn is_ring(&self) -> bool {
        match self {
            UpdateValues::Ring(_) => true,
            UpdateValues::F32(_) => false,
            UpdateValues::Spooled(f) => f.ring,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            UpdateValues::F32(v) => v.len(),
            UpdateValues::Ring(v) => v.len(),
            UpdateValues::Spooled(f) => f.values,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the values front to back, in blocks of the caller's choosing.
    pub fn reader(&self) -> Result<ValueReader<'_>> {
        Ok(ValueReader(match self {
            UpdateValues::F32(v) => Source::Memory(bytemuck::cast_slice(v)),
            UpdateValues::Ring(v) => Source::Memory(bytemuck::cast_slice(v)),
            UpdateValues::Spooled(f) => Source::File(f.open()?, f.path.clone()),
        }))
    }
}

enum Source<'a> {
    Memory(&'a [u8]),
    File(std::fs::File, std::path::PathBuf),
}

/// Sequential reader over an update's 4-byte words.
pub struct ValueReader<'a>(Source<'a>);

impl ValueReader<'_> {
    fn fill(&mut self, out: &mut [u8]) -> Result<()> {
        match &mut self.0 {
            Source::Memory(rest) => {
                if rest.len() < out.len() {
                    return Err(Error::InvalidUpdate("update shorter than the model".into()));
                }
                let (head, tail) = rest.split_at(out.len());
                out.copy_from_slice(head);
                *rest = tail;
                Ok(())
            }
            Source::File(r, path) => r.read_exact(out).map_err(|e| Error::io(path.clone(), e)),
        }
    }

    pub fn read_f32(&mut self, out: &mut [f32]) -> Result<()> {
        self.fill(bytemuck::cast_slice_mut(out))
    }

    pub fn read_u32(&mut self, out: &mut [u32]) -> Result<()> {
        self.fill(bytemuck::cast_slice_mut(out))
    }
}

/// One site's contribution to one round: `w_local - w_global`, as received.
#[derive(Debug)]
pub struct ModelUpdate {
    pub site: SiteId,
    pub meta: PayloadMeta,
    pub values: UpdateValues,
    pub summary: ValueSummary,
    /// Set when the values were already added to the round's sum as they arrived (the id
    /// of that stream, see [`mean::StreamTarget`]).
    pub streamed: Option<u64>,
}

impl ModelUpdate {
    /// An fp32 update held in memory (tests, tools).
    pub fn in_memory(site: SiteId, round: Round, base: ModelHash, sample_count: u64, delta: ModelState) -> Self {
        let summary = ValueSummary::of(&delta);
        Self { site, meta: PayloadMeta::delta(round, base, sample_count), values: UpdateValues::F32(delta.into_data()), summary, streamed: None }
    }

    pub fn sample_count(&self) -> u64 {
        self.meta.sample_count
    }
}

/// What the coordinator expects of an update for the round in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Expectation {
    pub global_hash: ModelHash,
    pub round: Round,
    pub max_sample_count: u64,
    /// Largest accepted L2 norm of the delta.
    pub max_norm: Option<f64>,
    /// The run's negotiated codec.
    pub codec: Codec,
    /// The masking attempt a ring update must belong to.
    pub mask_epoch: u32,
    /// Values in the model.
    pub numel: usize,
}

/// Checks an update's header: kind, round, base hash, sample count, codec, mask attempt.
/// Called when the header arrives (before the body is read) and again at submission.
pub fn check_header(meta: &PayloadMeta, exp: &Expectation) -> Result<()> {
    if meta.kind != PayloadKind::Delta {
        return Err(Error::InvalidUpdate("an update must carry a delta, not full weights".into()));
    }
    if meta.round != exp.round {
        return Err(Error::InvalidUpdate(format!("update is for round {} but round {} is open", meta.round, exp.round)));
    }
    if meta.base_model_hash != exp.global_hash {
        return Err(Error::InvalidUpdate(format!(
            "update was trained from model {} but the round's model is {}",
            meta.base_model_hash.short(),
            exp.global_hash.short()
        )));
    }
    if meta.sample_count == 0 || meta.sample_count > exp.max_sample_count {
        return Err(Error::InvalidUpdate(format!("sample count {} outside 1..={}", meta.sample_count, exp.max_sample_count)));
    }
    if meta.codec != exp.codec {
        return Err(Error::InvalidUpdate(format!("update sent as {} but this run uses {}", meta.codec, exp.codec)));
    }
    if meta.codec == Codec::Ring32 && meta.mask_epoch != exp.mask_epoch {
        return Err(Error::InvalidUpdate(format!("update masked for attempt {} of the round, but attempt {} is open", meta.mask_epoch, exp.mask_epoch)));
    }
    Ok(())
}

/// Checks an update's values: count, finiteness, norm bound (masked updates: count only,
/// their values are unreadable by design).
pub fn check_values(update: &ModelUpdate, exp: &Expectation) -> Result<()> {
    if update.values.len() != exp.numel {
        return Err(Error::InvalidUpdate(format!("update has {} values, the model {}", update.values.len(), exp.numel)));
    }
    if update.values.is_ring() {
        return Ok(());
    }
    if let Some((tensor, pos, v)) = &update.summary.first_nonfinite {
        return Err(Error::InvalidUpdate(format!("tensor `{tensor}` holds a non-finite value ({v}) at element {pos}")));
    }
    if let Some(bound) = exp.max_norm {
        let norm = update.summary.norm();
        if norm > bound {
            return Err(Error::InvalidUpdate(format!("update norm {norm:.4e} exceeds the bound {bound:.4e}")));
        }
    }
    Ok(())
}

/// Both checks.
pub fn validate(update: &ModelUpdate, exp: &Expectation) -> Result<()> {
    check_header(&update.meta, exp)?;
    check_values(update, exp)
}

/// Post-processing every strategy applies to its result: BatchNorm running variances must
/// stay ≥ 0 (DP noise or a robust statistic could push one below; clamping is
/// post-processing, so it costs no privacy).
pub fn clamp_running_variances(model: &mut ModelState) {
    let ranges: Vec<_> = model.specs().iter().enumerate().filter(|(_, s)| s.name.ends_with("running_var")).map(|(i, _)| model.range(i)).collect();
    for r in ranges {
        model.data_mut()[r].iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

/// What a round's aggregation produced.
#[derive(Debug)]
pub struct RoundAggregate {
    pub model: ModelState,
    /// Server optimiser moments to carry into the next round (FedAdam / FedYogi).
    pub server_state: Option<ServerOptState>,
    /// Updates scaled down by central DP clipping.
    pub clipped: usize,
    /// Standard deviation of the Gaussian noise added to each coordinate of the mean (0: none).
    pub noise_std: f64,
}

/// Combines validated updates of one round into the next global model.
pub trait Aggregator: Send {
    /// Linear strategies: where an arriving update's chunks may be added as they come, and
    /// how they are weighted. None: spool, then `accumulate` reads the update back.
    fn stream_target(&self) -> Option<mean::StreamPlan> {
        None
    }
    /// Adds one update (already passed [`validate`]).
    fn accumulate(&mut self, update: ModelUpdate) -> Result<()>;
    /// Sites whose updates were accumulated, in arrival order.
    fn contributors(&self) -> &[SiteId];
    /// Applies the aggregate to `global` and returns the next version.
    fn finish(self: Box<Self>, global: &ModelState) -> Result<RoundAggregate>;
}

/// The aggregator of one round, from the config. `server_state` is the previous round's
/// FedAdam / FedYogi moments (None at the start of an experiment).
///
/// `recycled` may hand over a model-sized buffer no longer needed (the previous global
/// model's): linear strategies reuse it as their accumulator instead of mapping fresh pages.
pub fn build(cfg: &AggregationConfig, privacy: &PrivacyConfig, global: &ModelState, server_state: Option<ServerOptState>, recycled: Option<Vec<f32>>) -> Box<dyn Aggregator> {
    match cfg.strategy {
        Strategy::Median => Box::new(robust::CoordinateWise::median()),
        Strategy::TrimmedMean => Box::new(robust::CoordinateWise::trimmed(cfg.trim_fraction)),
        Strategy::Fedavg | Strategy::Fedprox | Strategy::Fedadam | Strategy::Fedyogi => {
            let step = server_opt::ServerStep::new(cfg, global, server_state);
            let mut m = mean::WeightedMean::with_buffer(global, step, recycled);
            if privacy.secure_aggregation {
                m = m.ring(privacy.ring_fraction_bits);
            }
            if privacy.dp == DpMode::Central {
                m = m.central_dp(privacy.clip_norm, privacy.noise_multiplier);
            }
            Box::new(m)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model_state::tests::small_state;

    pub(crate) fn update(site: &str, n: u64, delta: ModelState) -> ModelUpdate {
        ModelUpdate::in_memory(SiteId::new(site).unwrap(), Round(1), ModelHash("g".into()), n, delta)
    }

    fn expectation(global: &ModelState) -> Expectation {
        Expectation {
            global_hash: global.weights_hash(),
            round: Round(1),
            max_sample_count: 1000,
            max_norm: Some(10.0),
            codec: Codec::F32,
            mask_epoch: 0,
            numel: global.numel(),
        }
    }

    #[test]
    fn validation_names_the_problem() {
        let global = small_state(0.0);
        let exp = expectation(&global);
        let ok = |f: &dyn Fn(&mut ModelUpdate)| {
            let mut u = ModelUpdate::in_memory(SiteId::new("a").unwrap(), Round(1), global.weights_hash(), 10, global.zeros_like());
            f(&mut u);
            validate(&u, &exp).map_err(|e| e.to_string())
        };
        assert!(ok(&|_| {}).is_ok());
        let e = ok(&|u| {
            let mut d = small_state(0.0).zeros_like();
            d.data_mut()[5] = f32::NAN;
            u.summary = ValueSummary::of(&d);
        })
        .unwrap_err();
        assert!(e.contains("non-finite") && e.contains("b.bias"), "{e}");
        assert!(ok(&|u| u.meta.round = Round(0)).unwrap_err().contains("round 0"));
        assert!(ok(&|u| u.meta.base_model_hash = ModelHash("ffff".into())).unwrap_err().contains("trained from"));
        assert!(ok(&|u| u.meta.sample_count = 0).is_err());
        assert!(ok(&|u| u.meta.codec = Codec::Int8Tensor).unwrap_err().contains("this run uses fp32"));
        assert!(ok(&|u| u.values = UpdateValues::F32(vec![0.0; 3])).unwrap_err().contains("3 values"));
        // ‖(0,0,0,0,6,8,0)‖ = 10 passes the bound of 10; a little more does not.
        let with = |v5: f32| {
            move |u: &mut ModelUpdate| {
                let mut d = small_state(0.0).zeros_like();
                d.data_mut()[4] = 6.0;
                d.data_mut()[5] = v5;
                u.summary = ValueSummary::of(&d);
            }
        };
        assert!(ok(&with(8.0)).is_ok());
        assert!(ok(&with(8.01)).unwrap_err().contains("exceeds the bound"));
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = AggregationConfig { trim_fraction: 0.5, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("trim_fraction"));
        let bad = AggregationConfig { beta2: 1.0, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("beta2"));
        assert!(AggregationConfig::default().validate().is_ok());
    }
}
