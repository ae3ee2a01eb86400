//! The walking skeleton, end to end with real processes: synthetic cohort → provisioning →
//! coordinator + 3 site-node binaries on loopback mTLS → 2 rounds at 32 px → features →
//! fusion SVM → report.json, for the main model and every control of the study
//! (US-only, SWE-only, ResNet50+C, leave-one-site-out).
//!
//! Checks that (1) each stored global model equals the sample-weighted mean of the deltas
//! the sites kept of what they sent, recomputed here independently, and (2) the report's
//! test patients are exactly the manifests' test rows.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use aln_common::cohort::{Split, read_manifest};
use aln_common::constants::{global_model_file, local_update_file};
use aln_common::model_state::ModelState;
use aln_e2e::*;

const SITES: [&str; 3] = ["site-a", "site-b", "site-c"];
const ROUNDS: u32 = 2;

#[test]
fn three_sites_federate_and_the_report_is_consistent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    run_ok(Command::new(bin("site-node")).args(["synth", "--sites", "3", "--patients", "150", "--image-px", "64", "--seed", "11", "--out"]).arg(root.join("cohort")))?;
    let pki = provision(root, &SITES)?;
    run_ok(Command::new(bin("site-node")).args(["init-model", "--hidden-dim", "64", "--feature-dim", "16", "--out"]).arg(pki.join("coordinator/initial_model.safetensors")))?;
    let cfg = write_coordinator_config(
        &pki,
        &SITES,
        &format!(
            "rounds = {ROUNDS}\nmin_sites = 3\n\n[training]\nlocal_steps = 2\nbatch_size = 4\nlearning_rate = 1e-4\nimage_size = 32\nseed = 7\n\n\
             [study]\nleave_one_site_out = true\nmodality_controls = true\nclinical_in_head_control = true\n"
        ),
    )?;
    // Only site-a's governance allows sharing Grad-CAM overlays.
    let kit = pki.join("sites/site-a/site.toml");
    std::fs::write(&kit, std::fs::read_to_string(&kit)?.replace("share_gradcam = false", "share_gradcam = true"))?;
    let mut coord = CoordinatorProc::start(&cfg)?;

    let mut sites = Vec::new();
    for s in SITES {
        sites.push((s, start_site(root, &pki, &coord.url(), s, &format!("{s}.log"))?));
    }
    let status = coord.wait(Duration::from_secs(900))?;
    assert!(status.success(), "coordinator failed:\n{}", coord.log_text());
    for (s, child) in &mut sites {
        let st = wait_child(child, Duration::from_secs(60), s)?;
        assert!(st.success(), "{s} failed:\n{}", std::fs::read_to_string(root.join(format!("{s}.log")))?);
    }

    // (1) FedAvg: global_r = global_{r-1} + Σ n_k Δ_k / Σ n_k, from the sites' own copies.
    let models = coord.state_dir.join("models/main");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
    let history = state["history"].as_array().unwrap();
    assert_eq!(history.len() as u32, 7 * ROUNDS, "7 experiments × {ROUNDS} rounds");
    assert!(history[..ROUNDS as usize].iter().all(|h| h["experiment"] == "main"));
    for r in 1..=ROUNDS {
        let (prev, _) = ModelState::load(&models.join(global_model_file(r - 1)))?;
        let (stored, _) = ModelState::load(&models.join(global_model_file(r)))?;
        let mut sum = vec![0f64; prev.numel()];
        let mut total = 0f64;
        for s in SITES {
            let (delta, meta) = ModelState::load(&root.join(format!("work/{s}/updates/main/{}", local_update_file(r))))?;
            assert_eq!(meta["base_model_hash"], prev.weights_hash().0, "{s} round {r} trained from another model");
            assert!(delta.same_schema(&prev));
            let n: f64 = meta["sample_count"].parse()?;
            total += n;
            for (acc, d) in sum.iter_mut().zip(delta.data()) {
                *acc += n * f64::from(*d);
            }
        }
        let recorded: f64 = state["history"][(r - 1) as usize]["contributors"].as_array().unwrap().iter().map(|c| c["sample_count"].as_f64().unwrap()).sum();
        assert_eq!(recorded, total);
        let mut worst = 0f64;
        for ((s, p), acc) in stored.data().iter().zip(prev.data()).zip(&sum) {
            let expected = f64::from(*p) + acc / total;
            worst = worst.max((f64::from(*s) - expected).abs() / (1.0 + expected.abs()));
        }
        assert!(worst < 1e-5, "round {r}: stored global model differs from the weighted mean by {worst}");
        let moved = stored.data().iter().zip(prev.data()).filter(|(a, b)| a != b).count();
        assert!(moved > stored.numel() / 2, "round {r}: the model barely changed ({moved} values)");
    }

    // (2) The report's test patients are exactly the manifests' test rows.
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("report.json"))?)?;
    let reported: BTreeSet<(String, String)> = report["task1"]["test_patients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["site"].as_str().unwrap().to_string(), p["patient_id"].as_str().unwrap().to_string()))
        .collect();
    let mut expected = BTreeSet::new();
    for s in SITES {
        for row in read_manifest(&root.join(format!("cohort/{s}/manifest.csv")))? {
            if row.split == Some(Split::Test) {
                expected.insert((s.to_string(), row.patient_id));
            }
        }
    }
    assert_eq!(reported, expected);
    assert_eq!(report["task1"]["n_test"].as_u64().unwrap() as usize, expected.len());
    for m in ["axillary_us", "clinical_only", "images_only", "combined"] {
        let method = report["task1"]["methods"].as_array().unwrap().iter().find(|x| x["method"] == m).expect(m);
        let auc = method["test"]["auc"]["auc"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&auc), "{m}: {auc}");
    }
    assert!(report["task2"]["n_test"].as_u64().unwrap() > 0);
    // The controls: each held-out site never trained in its own leave-one-site-out federation.
    for s in SITES {
        let updates = root.join(format!("work/{s}/updates"));
        assert!(!updates.join(format!("loso-{s}")).exists(), "{s} trained in the federation it is held out of");
        for other in SITES.iter().filter(|o| **o != s) {
            assert!(updates.join(format!("loso-{other}")).exists(), "{s} did not train in loso-{other}");
        }
    }
    let loso = report["leave_one_site_out"].as_array().unwrap();
    assert_eq!(loso.len(), 3);
    for l in loso {
        let site = l["held_out"].as_str().unwrap();
        let n_site = read_manifest(&root.join(format!("cohort/{site}/manifest.csv")))?.len();
        assert_eq!(l["n_test"].as_u64().unwrap() as usize, n_site, "LOSO tests on all of {site}'s patients");
    }
    let methods: Vec<&str> = report["task1"]["methods"].as_array().unwrap().iter().map(|m| m["method"].as_str().unwrap()).collect();
    for m in ["us_only_clinical", "swe_only_clinical", "resnet50_c"] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
        assert!(report["task1"]["delong_combined_vs"][m]["p"].as_f64().is_some(), "{m}: no DeLong test");
    }
    let confusion: u64 = report["task3"]["confusion"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(confusion as usize, expected.len());
    assert!(std::fs::read_to_string(coord.state_dir.join("features.csv"))?.lines().count() == 151);
    // Grad-CAM: computed and kept at every site; only site-a's reach the report.
    for s in SITES {
        let local = std::fs::read_dir(root.join(format!("work/{s}/gradcam")))?.count();
        assert!(local >= 6, "{s}: {local} local Grad-CAM overlays");
    }
    let shared: Vec<String> = std::fs::read_dir(coord.state_dir.join("gradcam"))?.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(shared, vec!["site-a".to_string()]);
    let html = std::fs::read_to_string(coord.state_dir.join("report.html"))?;
    assert!(html.contains("Grad-CAM") && html.contains("data:image/png;base64,") && html.contains("<svg"), "report.html lacks overlays or ROC plots");
    assert!(html.contains("Leave-one-site-out"));
    let out = std::fs::read_to_string(pki.join("coordinator/coordinator.out"))?;
    assert!(out.contains("pooled test") && out.contains("combined") && out.contains("Task 3"), "{out}");
    Ok(())
}
