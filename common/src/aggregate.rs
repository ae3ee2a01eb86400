//! Aggregation of site updates into the next global model.
//!
//! One [`Aggregator`] trait; strategies implement it. Updates are checked by [`validate`]
//! before they reach an aggregator, so an aggregator only sees finite deltas of the right
//! shape for the right round. [`FedAvg`] accumulates as updates arrive (ndarray's
//! `scaled_add` over the flat f32 buffer), so memory is one accumulator however many sites join.

use ndarray::{Array1, ArrayView1};

use crate::error::{Error, Result};
use crate::ids::{ModelHash, Round, SiteId};
use crate::model_state::ModelState;
use crate::wire::check_schema;

/// One site's contribution to one round: `w_local - w_global`.
#[derive(Debug, Clone)]
pub struct ModelUpdate {
    pub site: SiteId,
    pub round: Round,
    pub base: ModelHash,
    pub sample_count: u64,
    pub delta: ModelState,
}

/// Combines validated updates of one round into the next global model.
pub trait Aggregator: Send {
    /// Adds one update (already passed [`validate`]).
    fn accumulate(&mut self, update: &ModelUpdate) -> Result<()>;
    /// Sites whose updates were accumulated, in arrival order.
    fn contributors(&self) -> &[SiteId];
    /// Applies the aggregate to `global` and returns the next version.
    fn finish(self: Box<Self>, global: &ModelState) -> Result<ModelState>;
}

/// What the coordinator expects of an update for the round in progress.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    pub global: &'a ModelState,
    pub global_hash: &'a ModelHash,
    pub round: Round,
    pub max_sample_count: u64,
    /// Largest accepted L2 norm of the delta.
    pub max_norm: Option<f64>,
}

/// Checks an update against the global model: schema, round, base hash, finite values,
/// sample count. The error names the first problem found.
pub fn validate(update: &ModelUpdate, exp: Expectation<'_>) -> Result<()> {
    if update.round != exp.round {
        return Err(Error::InvalidUpdate(format!(
            "update is for round {} but round {} is open",
            update.round, exp.round
        )));
    }
    if &update.base != exp.global_hash {
        return Err(Error::InvalidUpdate(format!(
            "update was trained from model {} but the round's model is {}",
            update.base.short(),
            exp.global_hash.short()
        )));
    }
    if update.sample_count == 0 || update.sample_count > exp.max_sample_count {
        return Err(Error::InvalidUpdate(format!(
            "sample count {} outside 1..={}",
            update.sample_count, exp.max_sample_count
        )));
    }
    check_schema(exp.global.specs(), update.delta.specs())?;
    for (spec, values) in update.delta.tensors() {
        if let Some(pos) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidUpdate(format!(
                "tensor `{}` holds a non-finite value ({}) at element {pos}",
                spec.name, values[pos]
            )));
        }
    }
    if let Some(bound) = exp.max_norm {
        let norm = update.delta.data().iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        if norm > bound {
            return Err(Error::InvalidUpdate(format!("update norm {norm:.4e} exceeds the bound {bound:.4e}")));
        }
    }
    Ok(())
}

/// Sample-weighted federated averaging (McMahan et al. 2017):
/// `w_{r+1} = w_r + Σ_k n_k Δ_k / Σ_k n_k`.
pub struct FedAvg {
    /// `Σ n_k Δ_k`, one flat f32 buffer over the whole model.
    weighted_sum: Array1<f32>,
    total_weight: f64,
    sites: Vec<SiteId>,
}

impl FedAvg {
    pub fn new(global: &ModelState) -> Self {
        Self {
            weighted_sum: Array1::zeros(global.numel()),
            total_weight: 0.0,
            sites: Vec::new(),
        }
    }
}

impl Aggregator for FedAvg {
    fn accumulate(&mut self, update: &ModelUpdate) -> Result<()> {
        let delta = update.delta.data();
        if delta.len() != self.weighted_sum.len() {
            return Err(Error::InvalidUpdate(format!(
                "update has {} values, the model {}",
                delta.len(),
                self.weighted_sum.len()
            )));
        }
        self.weighted_sum.scaled_add(update.sample_count as f32, &ArrayView1::from(delta));
        self.total_weight += update.sample_count as f64;
        self.sites.push(update.site.clone());
        Ok(())
    }

    fn contributors(&self) -> &[SiteId] {
        &self.sites
    }

    fn finish(self: Box<Self>, global: &ModelState) -> Result<ModelState> {
        if self.total_weight <= 0.0 {
            return Err(Error::InvalidUpdate("no update to aggregate".into()));
        }
        // Reuse the accumulator as the next model's buffer: no second model-sized allocation.
        let inv = (1.0 / self.total_weight) as f32;
        let mut next = self.weighted_sum;
        next *= inv;
        next += &ArrayView1::from(global.data());
        ModelState::new(global.specs().to_vec(), next.into_raw_vec_and_offset().0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model_state::tests::small_state;
    use proptest::prelude::*;

    fn update(site: &str, n: u64, delta: ModelState) -> ModelUpdate {
        ModelUpdate {
            site: SiteId::new(site).unwrap(),
            round: Round(1),
            base: ModelHash("g".into()),
            sample_count: n,
            delta,
        }
    }

    #[test]
    fn fedavg_weights_by_sample_count() {
        let global = small_state(0.0).zeros_like();
        let mut a = Box::new(FedAvg::new(&global));
        let d1 = ModelState::new(global.specs().to_vec(), vec![1.0; 7]).unwrap();
        let d2 = ModelState::new(global.specs().to_vec(), vec![4.0; 7]).unwrap();
        a.accumulate(&update("a", 100, d1)).unwrap();
        a.accumulate(&update("b", 300, d2)).unwrap();
        let next = a.finish(&global).unwrap();
        // (100·1 + 300·4) / 400 = 3.25
        assert!(next.data().iter().all(|&v| (v - 3.25).abs() < 1e-6));
    }

    #[test]
    fn validation_names_the_problem() {
        let global = small_state(0.0);
        let hash = global.weights_hash();
        let exp = Expectation { global: &global, global_hash: &hash, round: Round(1), max_sample_count: 1000, max_norm: Some(10.0) };
        let mut u = update("a", 10, global.zeros_like());
        u.base = hash.clone();
        assert!(validate(&u, exp).is_ok());

        let mut nan = u.clone();
        nan.delta.data_mut()[5] = f32::NAN;
        let e = validate(&nan, exp).unwrap_err().to_string();
        assert!(e.contains("non-finite") && e.contains("b.bias"), "{e}");

        let mut stale = u.clone();
        stale.round = Round(0);
        assert!(validate(&stale, exp).unwrap_err().to_string().contains("round 0"));

        let mut other_base = u.clone();
        other_base.base = ModelHash("ffff".into());
        assert!(validate(&other_base, exp).unwrap_err().to_string().contains("trained from"));

        let mut zero = u.clone();
        zero.sample_count = 0;
        assert!(validate(&zero, exp).is_err());

        // ‖(0,0,0,0,6,8,0)‖ = 10 passes the bound of 10; a little more does not.
        let mut on_bound = u.clone();
        on_bound.delta.data_mut()[4] = 6.0;
        on_bound.delta.data_mut()[5] = 8.0;
        assert!(validate(&on_bound, exp).is_ok());
        on_bound.delta.data_mut()[5] = 8.01;
        assert!(validate(&on_bound, exp).unwrap_err().to_string().contains("exceeds the bound"));

        let wrong_shape = ModelState::from_named(vec![("a.weight".into(), vec![4], vec![0.0; 4]), ("b.bias".into(), vec![3], vec![0.0; 3])]).unwrap();
        let mut ws = u.clone();
        ws.delta = wrong_shape;
        let e = validate(&ws, exp).unwrap_err().to_string();
        assert!(e.contains("a.weight") && e.contains("[2, 2]"), "{e}");
    }

    proptest! {
        #[test]
        fn fedavg_of_identical_updates_is_that_update(vals in prop::collection::vec(-1e3f32..1e3, 7), ns in prop::collection::vec(1u64..10_000, 1..6)) {
            let global = small_state(0.5);
            let delta = ModelState::new(global.specs().to_vec(), vals.clone()).unwrap();
            let mut a = Box::new(FedAvg::new(&global));
            for (i, n) in ns.iter().enumerate() {
                a.accumulate(&update(&format!("s{i}"), *n, delta.clone())).unwrap();
            }
            let next = a.finish(&global).unwrap();
            for ((n, g), d) in next.data().iter().zip(global.data()).zip(&vals) {
                prop_assert!((n - (g + d)).abs() <= 1e-3 * (1.0 + d.abs()));
            }
        }
    }
}
