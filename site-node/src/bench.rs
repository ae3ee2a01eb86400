//! `site-node bench-step`: times the bimodal training step (two trunk passes, forward,
//! backward, Adam) and feature extraction, on random inputs, for comparison with the same
//! model in PyTorch eager (`deploy/bench_torch_step.py`). Prints JSON.

use std::time::Instant;

use anyhow::Result;
use tch::nn::OptimizerConfig;
use tch::{Device, Kind, Tensor, nn};

use crate::model::{BimodalNet, HeadDims};

pub struct StepBench {
    pub image_size: i64,
    pub batch: i64,
    pub steps: usize,
    pub device: Device,
    /// CUDA autocast (fp16) for the forward passes.
    pub autocast: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(b: &StepBench) -> Result<serde_json::Value> {
    tch::manual_seed(0);
    let net = BimodalNet::new(b.device, HeadDims { hidden: aln_common::constants::DEFAULT_HIDDEN_DIM as i64, feature: aln_common::constants::DEFAULT_DEEP_FEATURE_DIM as i64, classes: 2 });
    let mut opt = nn::Adam::default().build(&net.vs, 1e-4)?;
    let shape = [b.batch, 3, b.image_size, b.image_size];
    let us = Tensor::randn(shape, (Kind::Float, b.device));
    let swe = Tensor::randn(shape, (Kind::Float, b.device));
    let clinical = Tensor::zeros([b.batch, aln_common::cohort::CLINICAL_FEATURES as i64], (Kind::Float, b.device));
    let y = Tensor::from_slice(&(0..b.batch).map(|i| i % 2).collect::<Vec<i64>>()).to_device(b.device);
    let sync = || {
        if let Device::Cuda(i) = b.device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let mut train = Vec::new();
    for i in 0..b.steps + 1 {
        let t = Instant::now();
        let loss = tch::autocast(b.autocast, || net.forward_t(&us, &swe, &clinical, true).0.cross_entropy_for_logits(&y));
        opt.backward_step(&loss);
        sync();
        if i > 0 {
            train.push(t.elapsed().as_secs_f64()); // the first step warms up
        }
    }
    let mut infer = Vec::new();
    tch::no_grad(|| {
        for i in 0..b.steps + 1 {
            let t = Instant::now();
            let _ = tch::autocast(b.autocast, || net.forward_t(&us, &swe, &clinical, false));
            sync();
            if i > 0 {
                infer.push(t.elapsed().as_secs_f64());
            }
        }
    });
    Ok(serde_json::json!({
        "framework": "tch",
        "image_size": b.image_size,
        "batch": b.batch,
        "threads": tch::get_num_threads(),
        "device": format!("{:?}", b.device),
        "autocast": b.autocast && tch::Cuda::is_available(),
        "train_step_s": median(train),
        "inference_s": median(infer),
    }))
}
