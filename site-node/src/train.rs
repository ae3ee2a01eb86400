//! Local work of one round (training) and of the final phase (feature extraction).
//! Runs on a blocking thread, never on the async runtime.

use std::time::Instant;

use aln_common::cohort::{FeatureRow, Split};
use aln_common::config::TrainingPlan;
use aln_common::experiment::Experiment;
use aln_common::ids::SiteId;
use aln_common::model_state::ModelState;
use anyhow::{Result, ensure};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};
use tracing::info;

use crate::data::{BalancedSampler, SiteData, class_of};
use crate::model::BimodalNet;

/// What one round of local training produced.
pub struct RoundOutcome {
    /// `w_local - w_global`, what is sent.
    pub delta: ModelState,
    pub sample_count: u64,
    pub mean_loss: f64,
    pub train_s: f64,
}

/// The paper's schedule: lr halved at 40% and 80% of all iterations (2000/4000 of 5000).
pub fn learning_rate(plan: &TrainingPlan, global_step: u64, total_steps: u64) -> f64 {
    let frac = global_step as f64 / total_steps.max(1) as f64;
    let halvings = (frac >= 0.4) as i32 + (frac >= 0.8) as i32;
    plan.learning_rate * 0.5f64.powi(halvings)
}

/// What one round of local training is asked to do.
pub struct LocalRound<'a> {
    pub plan: &'a TrainingPlan,
    pub experiment: &'a Experiment,
    pub round: u32,
    pub total_rounds: u32,
    /// Mixed into the sampling seed so sites draw different batches.
    pub site_seed: u64,
    /// FedProx: weight μ of the proximal term μ/2 ‖w − w_global‖² (0 = plain local training).
    pub proximal_mu: f64,
    /// CUDA autocast for the forward pass and loss.
    pub mixed_precision: bool,
}

/// Trains `plan.local_steps` Adam steps from `global` and returns the delta.
pub fn train_round(net: &mut BimodalNet, data: &SiteData, global: &ModelState, job: &LocalRound<'_>) -> Result<RoundOutcome> {
    let LocalRound { plan, experiment, round, total_rounds, site_seed, proximal_mu, mixed_precision } = *job;
    let started = Instant::now();
    net.import(global)?;
    let train_idx = data.indices(Split::Train);
    ensure!(!train_idx.is_empty(), "no patient has split = train");
    let classes = net.dims.classes;
    let sampler = BalancedSampler::new(data, &train_idx, classes)?;
    let mut rng = StdRng::seed_from_u64(plan.seed ^ site_seed ^ (u64::from(round) << 32));
    tch::manual_seed((plan.seed ^ site_seed ^ u64::from(round)) as i64);
    let total_steps = u64::from(plan.local_steps) * u64::from(total_rounds);
    let mut opt = nn::Adam::default().build(&net.vs, plan.learning_rate)?;
    let device = net.vs.device();
    // FedProx anchors: the global weights, frozen, on the training device.
    let anchors: Vec<(Tensor, Tensor)> = if proximal_mu > 0.0 {
        net.vs.trainable_variables().into_iter().map(|v| { let a = v.detach().copy(); (v, a) }).collect()
    } else {
        vec![]
    };
    let mut loss_sum = 0.0;
    let bar = aln_common::progress::steps(u64::from(plan.local_steps), round);
    for step in 0..plan.local_steps {
        let global_step = u64::from(round - 1) * u64::from(plan.local_steps) + u64::from(step);
        opt.set_lr(learning_rate(plan, global_step, total_steps));
        let idx = sampler.sample(plan.batch_size as usize, &mut rng);
        let (us, swe) = data.inputs(&idx, experiment.input, Some(&mut rng), device);
        let clinical = data.clinical(&idx, experiment.clinical_in_head, device);
        let labels: Vec<i64> = idx.iter().map(|&i| class_of(data.rows[i].n_stage, classes)).collect();
        let y = Tensor::from_slice(&labels).to_device(device);
        let ce = tch::autocast(mixed_precision, || net.forward_t(&us, &swe, &clinical, true).0.cross_entropy_for_logits(&y));
        let loss = if anchors.is_empty() { ce } else { ce + proximal_term(&anchors, proximal_mu) };
        opt.backward_step(&loss);
        let l = loss.double_value(&[]);
        ensure!(l.is_finite(), "training diverged at round {round}, step {step} (loss {l})");
        loss_sum += l;
        bar.inc(1);
        bar.set_message(format!("loss {l:.4}"));
        if bar.is_hidden() && (step == 0 || (step + 1) % 5 == 0 || step + 1 == plan.local_steps) {
            info!(round, step = step + 1, of = plan.local_steps, loss = format!("{l:.4}"), "local step");
        }
    }
    bar.finish_and_clear();
    let local = net.export()?;
    let mut delta = local;
    for (d, g) in delta.data_mut().iter_mut().zip(global.data()) {
        *d -= g;
    }
    Ok(RoundOutcome {
        delta,
        sample_count: train_idx.len() as u64,
        mean_loss: loss_sum / f64::from(plan.local_steps),
        train_s: started.elapsed().as_secs_f64(),
    })
}

/// FedProx's proximal term μ/2 Σ ‖w − w_global‖² over (variable, frozen global copy) pairs.
pub fn proximal_term(anchors: &[(Tensor, Tensor)], mu: f64) -> Tensor {
    let sum = anchors.iter().map(|(v, a)| (v - a).square().sum(Kind::Float)).reduce(|acc, t| acc + t);
    sum.map_or_else(|| Tensor::zeros([], (Kind::Float, Device::Cpu)), |t| t * (mu / 2.0))
}

/// Deep features (eval mode, centred crops), the network's own N+ probability and the
/// clinical variables for every patient.
///
/// `recalibrate`: batches of local training data to re-estimate the BatchNorm running
/// statistics with before extracting (used under differential privacy, where the global
/// statistics carry noise that eval-mode BatchNorm would amplify layer after layer).
pub fn extract_features(
    net: &mut BimodalNet,
    data: &SiteData,
    global: &ModelState,
    experiment: &Experiment,
    site: &SiteId,
    batch: usize,
    recalibrate: usize,
) -> Result<Vec<FeatureRow>> {
    net.import(global)?;
    let device: Device = net.vs.device();
    if recalibrate > 0 {
        let train: Vec<usize> = data.indices(Split::Train);
        tch::no_grad(|| {
            for idx in train.chunks(batch.max(2)).cycle().take(recalibrate) {
                let (us, swe) = data.inputs(idx, experiment.input, None, device);
                let clinical = data.clinical(idx, experiment.clinical_in_head, device);
                let _ = net.forward_t(&us, &swe, &clinical, true);
            }
        });
        info!(batches = recalibrate, "BatchNorm statistics re-estimated on local training data");
    }
    let mut out = Vec::with_capacity(data.len());
    let all: Vec<usize> = (0..data.len()).collect();
    tch::no_grad(|| -> Result<()> {
        for idx in all.chunks(batch.max(1)) {
            let (us, swe) = data.inputs(idx, experiment.input, None, device);
            let clinical = data.clinical(idx, experiment.clinical_in_head, device);
            let (logits, deep) = net.forward_t(&us, &swe, &clinical, false);
            let deep = deep.to_device(Device::Cpu).to_kind(Kind::Float);
            // P(N+) = 1 - P(N0) whether the head has 2 or 3 classes.
            let p_nplus = logits.softmax(-1, Kind::Float).select(1, 0).neg().g_add_scalar(1.0).to_device(Device::Cpu);
            let p_nplus = Vec::<f32>::try_from(p_nplus)?;
            let deep_values = Vec::<f32>::try_from(deep.reshape([-1]))?;
            if let Some(pos) = deep_values.iter().position(|v| !v.is_finite()) {
                anyhow::bail!(
                    "the global model gives non-finite deep features (patient {}): it is numerically broken, e.g. by differential-privacy noise too large for the weights' scale; nothing was sent",
                    data.rows[idx[pos / deep.size()[1] as usize]].patient_id
                );
            }
            for (k, &i) in idx.iter().enumerate() {
                let row = &data.rows[i];
                let split = row.split.ok_or_else(|| anyhow::anyhow!("patient {} has no split", row.patient_id))?;
                out.push(FeatureRow {
                    site: site.clone(),
                    patient_id: row.patient_id.clone(),
                    split,
                    n_stage: row.n_stage,
                    clinical: row.clinical.clone(),
                    deep: Vec::<f32>::try_from(deep.get(k as i64))?,
                    network_score: Some(p_nplus[k].clamp(0.0, 1.0)),
                });
            }
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proximal_term_and_its_gradient_by_hand() {
        // w = (1, 2), w_global = (0, 1), μ = 2: μ/2 · (1 + 1) = 2; ∂/∂w = μ (w − w_global) = (2, 2).
        let vs = nn::VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1f32, 2.0]));
        let anchors = vec![(w.shallow_clone(), Tensor::from_slice(&[0f32, 1.0]))];
        let term = proximal_term(&anchors, 2.0);
        assert!((term.double_value(&[]) - 2.0).abs() < 1e-6);
        term.backward();
        assert_eq!(Vec::<f32>::try_from(w.grad()).unwrap(), vec![2.0, 2.0]);
        assert_eq!(proximal_term(&[], 2.0).double_value(&[]), 0.0);
    }
}
