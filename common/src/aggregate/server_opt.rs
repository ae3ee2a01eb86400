//! What the server does with the round's mean delta Δ̄ (Reddi et al. 2021, Algorithm 2).
//!
//! - Plain (FedAvg, FedProx): `w ← w + Δ̄`.
//! - FedAdam: `m ← β1·m + (1−β1)·Δ̄`, `v ← β2·v + (1−β2)·Δ̄²`, `w ← w + η·m / (√v + τ)`.
//! - FedYogi: as FedAdam with `v ← v − (1−β2)·Δ̄²·sign(v − Δ̄²)`.
//!
//! `m` starts at 0 and `v` at τ² (the paper's initialisation); the moments are kept across
//! rounds by the coordinator ([`ServerOptState`], checkpointed with each model). BatchNorm
//! running statistics are not gradients: they always take the plain mean.

use crate::aggregate::{AggregationConfig, Strategy};
use crate::constants::is_running_statistic;
use crate::model_state::ModelState;

/// Server optimiser moments, one value per model value.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerOptState {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

/// Second-moment rule of an adaptive server optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    Adam,
    Yogi,
}

/// The server's step for one round.
#[derive(Debug)]
pub enum ServerStep {
    Plain,
    Adaptive { rule: Rule, eta: f32, beta1: f32, beta2: f32, tau: f32, state: ServerOptState },
}

impl ServerStep {
    pub fn new(cfg: &AggregationConfig, global: &ModelState, state: Option<ServerOptState>) -> Self {
        let rule = match cfg.strategy {
            Strategy::Fedadam => Rule::Adam,
            Strategy::Fedyogi => Rule::Yogi,
            _ => return ServerStep::Plain,
        };
        let tau = cfg.tau as f32;
        let state = state.filter(|s| s.m.len() == global.numel()).unwrap_or_else(|| ServerOptState { m: vec![0.0; global.numel()], v: vec![tau * tau; global.numel()] });
        ServerStep::Adaptive {
            rule,
            eta: cfg.server_learning_rate as f32,
            beta1: cfg.beta1 as f32,
            beta2: cfg.beta2 as f32,
            tau,
            state,
        }
    }

    /// Turns `mean` (Δ̄, overwritten) into the next model `global + step(Δ̄)`.
    pub fn apply(self, global: &ModelState, mut mean: Vec<f32>) -> (Vec<f32>, Option<ServerOptState>) {
        match self {
            ServerStep::Plain => {
                for (x, g) in mean.iter_mut().zip(global.data()) {
                    *x += g;
                }
                (mean, None)
            }
            ServerStep::Adaptive { rule, eta, beta1, beta2, tau, mut state } => {
                for (t, spec) in global.specs().iter().enumerate() {
                    let r = global.range(t);
                    let (g, d) = (&global.data()[r.clone()], &mut mean[r.clone()]);
                    if is_running_statistic(&spec.name) {
                        d.iter_mut().zip(g).for_each(|(x, g)| *x += g);
                        continue;
                    }
                    let (m, v) = (&mut state.m[r.clone()], &mut state.v[r]);
                    for i in 0..d.len() {
                        let delta = d[i];
                        let sq = delta * delta;
                        m[i] = beta1 * m[i] + (1.0 - beta1) * delta;
                        v[i] = match rule {
                            Rule::Adam => beta2 * v[i] + (1.0 - beta2) * sq,
                            Rule::Yogi => v[i] - (1.0 - beta2) * sq * (v[i] - sq).signum(),
                        };
                        d[i] = g[i] + eta * m[i] / (v[i].max(0.0).sqrt() + tau);
                    }
                }
                (mean, Some(state))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(values: Vec<f32>) -> ModelState {
        ModelState::from_named(vec![("a.weight".into(), vec![values.len()], values)]).unwrap()
    }

    #[test]
    fn fedadam_first_step_by_hand() {
        // Δ̄ = 0.1, m = 0.01, v = 0.99·τ² + 0.01·0.01 = 0.00010099 (τ = 1e-3),
        // step = 0.01 · 0.01 / (√0.00010099 + 0.001) = 0.0090497…
        let cfg = AggregationConfig { strategy: Strategy::Fedadam, ..Default::default() };
        let g = model(vec![1.0]);
        let (next, state) = ServerStep::new(&cfg, &g, None).apply(&g, vec![0.1]);
        let expect = 1.0 + 0.01 * 0.01 / (0.000_100_99f64.sqrt() + 0.001);
        assert!((f64::from(next[0]) - expect).abs() < 1e-6, "{} vs {expect}", next[0]);
        let s = state.unwrap();
        assert!((s.m[0] - 0.01).abs() < 1e-7 && (s.v[0] - 0.000_100_99).abs() < 1e-9);
    }

    #[test]
    fn fedyogi_second_moment_by_hand() {
        // v0 = τ² = 1e-6 < Δ̄² = 0.01 → sign(v − Δ̄²) = −1 → v = 1e-6 + 0.01·0.01 = 0.000101.
        let cfg = AggregationConfig { strategy: Strategy::Fedyogi, ..Default::default() };
        let g = model(vec![0.0]);
        let (_, state) = ServerStep::new(&cfg, &g, None).apply(&g, vec![0.1]);
        assert!((state.unwrap().v[0] - 0.000_101).abs() < 1e-9);
    }

    #[test]
    fn running_statistics_take_the_plain_mean() {
        let cfg = AggregationConfig { strategy: Strategy::Fedadam, ..Default::default() };
        let g = ModelState::from_named(vec![("bn.running_var".into(), vec![1], vec![1.0]), ("bn.weight".into(), vec![1], vec![1.0])]).unwrap();
        let (next, _) = ServerStep::new(&cfg, &g, None).apply(&g, vec![0.5, 0.5]);
        // Canonical order sorts names: bn.running_var first.
        assert_eq!(next[0], 1.5);
        assert!(next[1] < 1.5 && next[1] > 1.0);
    }

    proptest::proptest! {
        #[test]
        fn adaptive_first_steps_follow_the_mean_and_stay_below_eta(deltas in proptest::collection::vec(-10f32..10.0, 1..32), yogi in proptest::bool::ANY) {
            // From fresh moments, step = η·(1−β1)Δ̄ / (√(β2τ² + (1−β2)Δ̄²) + τ): same sign as Δ̄ and
            // |step| < η·(1−β1)/√(1−β2) = η with the defaults (Yogi's v ≥ Adam's here, so also < η).
            let cfg = AggregationConfig { strategy: if yogi { Strategy::Fedyogi } else { Strategy::Fedadam }, ..Default::default() };
            let g = model(vec![0.5; deltas.len()]);
            let (next, _) = ServerStep::new(&cfg, &g, None).apply(&g, deltas.clone());
            for (n, d) in next.iter().zip(&deltas) {
                let step = n - 0.5;
                proptest::prop_assert!(step.abs() <= 0.01 * 1.0001, "{step}");
                proptest::prop_assert!(*d == 0.0 || step.signum() == d.signum() || step == 0.0, "{step} vs {d}");
            }
        }
    }

    #[test]
    fn plain_step_adds_the_mean() {
        let g = model(vec![1.0, 2.0]);
        let (next, state) = ServerStep::new(&AggregationConfig::default(), &g, None).apply(&g, vec![0.5, -1.0]);
        assert_eq!(next, vec![1.5, 1.0]);
        assert!(state.is_none());
    }
}
