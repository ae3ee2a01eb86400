//! `kill -9` of the coordinator mid-round: a restart on the same state directory resumes
//! from the last completed round, the interrupted round is redone, and the final model is
//! the one a run without the crash produces from the same updates.

use std::time::{Duration, Instant};

use aln_common::ids::ModelHash;
use aln_common::model_state::ModelState;
use aln_e2e::*;
use aln_proto as pb;
use aln_proto::federation_client::FederationClient;
use tonic::transport::Channel;

type Client = FederationClient<Channel>;

/// Waits for a train task of `round` and returns the model hash it names.
async fn train_task(c: &mut Client, round: u32) -> anyhow::Result<ModelHash> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = c.next_task(pb::TaskRequest {}).await?.into_inner();
        if let Some(pb::task::Kind::Train(t)) = &t.kind
            && t.round == round {
                return Ok(ModelHash(t.model_hash.clone()));
            }
        anyhow::ensure!(Instant::now() < deadline, "no train task for round {round}: {t:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The delta a site sends in a round (deterministic, different per site and round).
fn delta(global: &ModelState, site: usize, round: u32) -> ModelState {
    let mut d = global.zeros_like();
    for (i, v) in d.data_mut().iter_mut().enumerate() {
        *v = 0.01 * (site as f32 + 1.0) * (round as f32) - 0.003 * i as f32;
    }
    d
}

async fn push(c: &mut Client, d: ModelState, base: &ModelHash, round: u32, samples: u64) -> anyhow::Result<()> {
    c.push_update(tokio_stream::iter(update_chunks(d, base, round, samples))).await?;
    Ok(())
}

const SAMPLES: [u64; 2] = [30, 90];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_crash_loses_no_completed_round() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &["site-a", "site-b"])?;
    let initial = tiny_model(0.5);
    initial.save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let cfg = write_coordinator_config(&pki, &["site-a", "site-b"], "rounds = 3\nmin_sites = 2\n")?;

    // The expected final model, computed independently: three rounds of weighted means.
    let mut expected = initial.clone();
    for round in 1..=3 {
        let (d0, d1) = (delta(&expected, 0, round), delta(&expected, 1, round));
        let total = (SAMPLES[0] + SAMPLES[1]) as f32;
        for ((w, a), b) in expected.data_mut().iter_mut().zip(d0.data()).zip(d1.data()) {
            *w += (SAMPLES[0] as f32 * a + SAMPLES[1] as f32 * b) / total;
        }
    }

    let mut coord = CoordinatorProc::start(&cfg)?;
    let ids = [ClientIdentity::site(&pki, "site-a"), ClientIdentity::site(&pki, "site-b")];
    let mut clients = [connect(&coord.addr, &ids[0]).await?, connect(&coord.addr, &ids[1]).await?];
    let mut global = initial.clone();
    // Round 1 completes.
    for (k, c) in clients.iter_mut().enumerate() {
        let base = train_task(c, 1).await?;
        push(c, delta(&global, k, 1), &base, 1, SAMPLES[k]).await?;
    }
    let base2 = train_task(&mut clients[0], 2).await?;
    // Round 2 opens as soon as round 1 is aggregated; round 1's checkpoint is written
    // meanwhile and counts as completed once round_state.json says so.
    let t = std::time::Instant::now();
    loop {
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
        if s["completed_rounds"] == 1 {
            break;
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "round 1 never checkpointed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (after1, _) = ModelState::load(&coord.state_dir.join("models/main/global_r0001.safetensors"))?;
    assert_eq!(base2, after1.weights_hash());
    global = after1;
    // Round 2 is half done when the coordinator is killed with SIGKILL.
    push(&mut clients[0], delta(&global, 0, 2), &base2, 2, SAMPLES[0]).await?;
    let run_id = std::fs::read_to_string(coord.state_dir.join("round_state.json"))?;
    coord.child.kill()?;
    coord.child.wait()?;

    // Restart on the same state directory.
    let coord = CoordinatorProc::start(&cfg)?;
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
    assert_eq!(state["completed_rounds"], 1, "round 1 must survive the crash");
    let before: serde_json::Value = serde_json::from_str(&run_id)?;
    assert_eq!(state["run_id"], before["run_id"], "a restart continues the same run");
    assert!(coord.log_text().contains("resuming run"));
    let mut clients = [connect(&coord.addr, &ids[0]).await?, connect(&coord.addr, &ids[1]).await?];
    // The interrupted round is redone from the last completed model, then round 3.
    for round in 2..=3 {
        for (k, c) in clients.iter_mut().enumerate() {
            let base = train_task(c, round).await?;
            assert_eq!(base, global.weights_hash(), "round {round} must start from the last completed model");
            push(c, delta(&global, k, round), &base, round, SAMPLES[k]).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let path = coord.state_dir.join(format!("models/main/global_r{round:04}.safetensors"));
        while !path.exists() {
            anyhow::ensure!(Instant::now() < deadline, "round {round} never completed");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        global = ModelState::load(&path)?.0; // complete once it exists: written temp + rename

    }
    let worst = global.data().iter().zip(expected.data()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-5, "final model differs from the crash-free result by {worst}");
    // round_state.json is written just after the model it names.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rounds = loop {
        let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
        let rounds: Vec<u64> = state["history"].as_array().unwrap().iter().map(|h| h["round"].as_u64().unwrap()).collect();
        if rounds.len() >= 3 || Instant::now() > deadline {
            break rounds;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(rounds, vec![1, 2, 3], "each round recorded exactly once");
    Ok(())
}
