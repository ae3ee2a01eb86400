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
        let mut loss = tch::autocast(mixed_precision, || net.forward_t(&us, &swe, &clinical, true).0.cross_entropy_for_logits(&y));
        if !anchors.is_empty() {
            let prox = anchors.iter().map(|(v, a)| (v - a).square().sum(Kind::Float)).fold(Tensor::zeros([], (Kind::Float, device)), |acc, t| acc + t);
            loss = loss + prox * (proximal_mu / 2.0);
        }
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

/// Deep features (eval mode, centred crops), the network's own N+ probability and the
/// clinical variables for every patient.
pub fn extract_features(
    net: &mut BimodalNet,
    data: &SiteData,
    global: &ModelState,
    experiment: &Experiment,
    site: &SiteId,
    batch: usize,
) -> Result<Vec<FeatureRow>> {
    net.import(global)?;
    let device: Device = net.vs.device();
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
