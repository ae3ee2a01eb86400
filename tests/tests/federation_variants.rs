//! The same real pipeline (coordinator + site-node binaries on loopback mTLS, 32 px) under
//! the other aggregation, compression and privacy settings:
//!
//! 1. FedProx + int8-channel updates with error feedback + site-level DP: the run completes,
//!    updates are a quarter of fp32 on the wire, each site keeps its residual, and the report
//!    states the aggregator, the privacy settings, ε and the bytes.
//! 2. Secure aggregation with three real site-nodes: each stored global model equals the
//!    sample-weighted mean of the deltas the sites kept (to the fixed-point resolution), though
//!    the coordinator only ever received masked updates.

use std::process::Command;
use std::time::Duration;

use aln_common::constants::{global_model_file, local_update_file};
use aln_common::model_state::ModelState;
use aln_e2e::*;

const TRAINING: &str = "\n[training]\nlocal_steps = 2\nbatch_size = 4\nlearning_rate = 1e-4\nimage_size = 32\nseed = 7\n";

/// Runs a whole federation with `body` as config; returns (root dir guard, state dir).
fn federate(sites: &[&str], body: &str) -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    run_ok(Command::new(bin("site-node")).args(["synth", "--sites", &sites.len().to_string(), "--patients", "120", "--image-px", "64", "--seed", "5", "--out"]).arg(root.join("cohort")))?;
    let pki = provision(root, sites)?;
    run_ok(Command::new(bin("site-node")).args(["init-model", "--hidden-dim", "32", "--feature-dim", "8", "--out"]).arg(pki.join("coordinator/initial_model.safetensors")))?;
    let cfg = write_coordinator_config(&pki, sites, body)?;
    let mut coord = CoordinatorProc::start(&cfg)?;
    let mut children = Vec::new();
    for s in sites {
        children.push((*s, start_site(root, &pki, &coord.url(), s, &format!("{s}.log"))?));
    }
    let status = coord.wait(Duration::from_secs(600))?;
    assert!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for (s, child) in &mut children {
        let st = wait_child(child, Duration::from_secs(60), s)?;
        assert!(st.success(), "{s} failed:\n{}", std::fs::read_to_string(root.join(format!("{s}.log")))?);
    }
    let state = coord.state_dir.clone();
    Ok((dir, state))
}

#[test]
fn fedprox_with_int8_updates_and_site_level_dp() -> anyhow::Result<()> {
    let sites = ["site-a", "site-b"];
    let body = format!(
        "rounds = 2\nmin_sites = 2\nupdate_codec = \"int8-channel\"\n{TRAINING}\n[aggregation]\nstrategy = \"fedprox\"\nproximal_mu = 0.1\n\n[privacy]\ndp = \"site\"\nclip_norm = 0.5\nnoise_multiplier = 0.001\ndelta = 1e-5\n"
    );
    let (dir, state) = federate(&sites, &body)?;
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state.join("report.json"))?)?;
    let f = &report["federation"];
    assert!(f["aggregator"].as_str().unwrap().contains("FedProx (μ = 0.1)"), "{f}");
    assert!(f["aggregator"].as_str().unwrap().contains("int8-channel with error feedback"), "{f}");
    assert!(f["privacy"].as_str().unwrap().contains("noise added at each site"), "{f}");
    // Two rounds per site at σ = 0.001: a finite but huge ε, computed by the accountant.
    let eps = f["epsilon"].as_f64().unwrap();
    let want = aln_common::privacy::accountant::gaussian_epsilon(0.001, 2, 1e-5);
    assert!((eps - want).abs() < 1e-6 * want, "{eps} vs {want}");
    // int8 on the wire: about a quarter of the fp32 bytes of the model.
    let (initial, _) = ModelState::load(&state.join("models/main").join(global_model_file(0)))?;
    let fp32 = initial.byte_len() as f64;
    for r in report["rounds"].as_array().unwrap() {
        for c in r["contributors"].as_array().unwrap() {
            let ratio = c["bytes"].as_f64().unwrap() / fp32;
            assert!(ratio > 0.24 && ratio < 0.30, "update of {} is {ratio:.3} × fp32", c["site"]);
        }
        assert!(r["downlink_bytes"].as_u64().unwrap() as f64 >= 2.0 * fp32);
    }
    for s in sites {
        let (residual, _) = ModelState::load(&dir.path().join(format!("work/{s}/error_feedback/main.safetensors")))?;
        assert!(residual.same_schema(&initial));
        assert!(residual.data().iter().any(|v| *v != 0.0), "{s}: error feedback residual is empty");
    }
    Ok(())
}

#[test]
fn secure_aggregation_with_real_site_nodes_is_exact() -> anyhow::Result<()> {
    let sites = ["site-a", "site-b", "site-c"];
    let body = format!("rounds = 2\nmin_sites = 3\n{TRAINING}\n[privacy]\nsecure_aggregation = true\nring_fraction_bits = 16\n");
    let (dir, state) = federate(&sites, &body)?;
    let models = state.join("models/main");
    for r in 1..=2u32 {
        let (prev, _) = ModelState::load(&models.join(global_model_file(r - 1)))?;
        let (stored, _) = ModelState::load(&models.join(global_model_file(r)))?;
        let mut sum = vec![0f64; prev.numel()];
        let mut total = 0f64;
        for s in sites {
            let (delta, meta) = ModelState::load(&dir.path().join(format!("work/{s}/updates/main/{}", local_update_file(r))))?;
            let n: f64 = meta["sample_count"].parse()?;
            total += n;
            for (acc, d) in sum.iter_mut().zip(delta.data()) {
                *acc += n * f64::from(*d);
            }
        }
        // Each site rounds n_k Δ_k to a multiple of 2^-16 (error ≤ 2^-17); three such errors,
        // divided by Σn, plus f32 rounding of the stored value.
        let resolution = 3.0 / 131_072.0 / total;
        let mut worst = 0f64;
        for ((s, p), acc) in stored.data().iter().zip(prev.data()).zip(&sum) {
            let expected = f64::from(*p) + acc / total;
            worst = worst.max((f64::from(*s) - expected).abs() - 1e-6 * (1.0 + expected.abs()));
        }
        assert!(worst <= resolution, "round {r}: error {worst:e} above the fixed-point resolution {resolution:e}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state.join("report.json"))?)?;
    assert!(report["federation"]["privacy"].as_str().unwrap().contains("secure aggregation (X25519"));
    assert!(report["federation"]["aggregator"].as_str().unwrap().contains("ring32"));
    Ok(())
}

#[test]
fn coordinate_wise_median_with_real_site_nodes_is_exact() -> anyhow::Result<()> {
    // The robust path end to end: updates stay spooled until the round closes, then all three
    // spools are read in lock-step; the model must be the exact coordinate-wise median of the
    // deltas the sites kept.
    let sites = ["site-a", "site-b", "site-c"];
    let body = format!("rounds = 1\nmin_sites = 3\n{TRAINING}\n[aggregation]\nstrategy = \"median\"\n");
    let (dir, state) = federate(&sites, &body)?;
    let models = state.join("models/main");
    let (prev, _) = ModelState::load(&models.join(global_model_file(0)))?;
    let (stored, _) = ModelState::load(&models.join(global_model_file(1)))?;
    let deltas: Vec<ModelState> = sites
        .iter()
        .map(|s| ModelState::load(&dir.path().join(format!("work/{s}/updates/main/{}", local_update_file(1)))).map(|(d, _)| d))
        .collect::<Result<_, _>>()?;
    for (i, (s, p)) in stored.data().iter().zip(prev.data()).enumerate() {
        let mut v = [deltas[0].data()[i], deltas[1].data()[i], deltas[2].data()[i]];
        v.sort_by(f32::total_cmp);
        let mut want = p + v[1];
        if stored.specs().iter().enumerate().any(|(t, spec)| spec.name.ends_with("running_var") && stored.range(t).contains(&i)) {
            want = want.max(0.0);
        }
        assert_eq!(*s, want, "value {i}");
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state.join("report.json"))?)?;
    assert!(report["federation"]["aggregator"].as_str().unwrap().starts_with("coordinate-wise median"));
    assert_eq!(std::fs::read_dir(state.join("spool")).map(|d| d.count()).unwrap_or(0), 0, "spool files left behind");
    Ok(())
}

#[test]
fn fedyogi_keeps_its_moments_with_each_model() -> anyhow::Result<()> {
    let sites = ["site-a", "site-b"];
    let body = format!("rounds = 2\nmin_sites = 2\n{TRAINING}\n[aggregation]\nstrategy = \"fedyogi\"\nserver_learning_rate = 0.001\n");
    let (_dir, state) = federate(&sites, &body)?;
    let models = state.join("models/main");
    for r in 1..=2 {
        for moment in ["m", "v"] {
            let (s, _) = ModelState::load(&models.join(format!("server_{moment}_r{r:04}.safetensors")))?;
            assert!(s.data().iter().all(|x| x.is_finite()));
            if moment == "v" {
                assert!(s.data().iter().all(|x| *x >= 0.0), "Yogi's second moment went negative");
            }
        }
    }
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(state.join("report.json"))?)?;
    assert!(report["federation"]["aggregator"].as_str().unwrap().starts_with("FedYogi (η = 0.001"), "{}", report["federation"]);
    Ok(())
}
