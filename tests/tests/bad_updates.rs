//! A corrupted transfer, a NaN and a wrong shape are each refused with a clear Status, and
//! the round goes on with the others: the next global model is exactly the valid update.

use std::time::{Duration, Instant};

use aln_common::ids::ModelHash;
use aln_common::model_state::ModelState;
use aln_e2e::*;
use aln_proto as pb;
use tonic::Code;

fn chunks(delta: ModelState, base: &ModelHash, samples: u64) -> Vec<pb::ModelChunk> {
    update_chunks(delta, base, 1, samples)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_and_the_round_goes_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &["site-a", "site-b"])?;
    let global = tiny_model(1.0);
    global.save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let cfg = write_coordinator_config(&pki, &["site-a", "site-b"], "rounds = 1\nmin_sites = 1\nround_timeout_secs = 2\n")?;
    let coord = CoordinatorProc::start(&cfg)?;
    let mut a = connect(&coord.addr, &ClientIdentity::site(&pki, "site-a")).await?;
    let mut b = connect(&coord.addr, &ClientIdentity::site(&pki, "site-b")).await?;

    let task = a.next_task(pb::TaskRequest {}).await?.into_inner();
    let Some(pb::task::Kind::Train(t)) = task.kind else { panic!("expected a train task, got {task:?}") };
    assert_eq!(t.round, 1);
    let base = ModelHash(t.model_hash);
    assert_eq!(base, global.weights_hash());

    // 1. A flipped byte in one chunk: the digest check refuses the transfer.
    let mut corrupted = chunks(global.zeros_like(), &base, 10);
    if let Some(pb::model_chunk::Part::Tensor(tc)) = &mut corrupted[1].part {
        let mut d = tc.data.to_vec();
        d[0] ^= 0x40;
        tc.data = d.into();
    }
    let e = a.push_update(tokio_stream::iter(corrupted)).await.expect_err("corrupted chunk accepted");
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(e.message().contains("digest mismatch"), "{e:?}");

    // 2. A NaN in the delta.
    let mut nan = global.zeros_like();
    nan.data_mut()[4] = f32::NAN;
    let e = a.push_update(tokio_stream::iter(chunks(nan, &base, 10))).await.expect_err("NaN accepted");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("non-finite"), "{e:?}");

    // 2b. A transfer that breaks off before its trailer (a site dropping mid-upload).
    let mut truncated = chunks(global.zeros_like(), &base, 10);
    truncated.pop();
    let e = a.push_update(tokio_stream::iter(truncated)).await.expect_err("truncated transfer accepted");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("before its trailer"), "{e:?}");

    // 3. A tensor of the wrong shape.
    let wrong = ModelState::from_named(vec![
        ("head.fc1.bias".into(), vec![3], vec![0.0; 3]),
        ("head.fc1.weight".into(), vec![4, 3], vec![0.0; 12]),
    ])?;
    let e = a.push_update(tokio_stream::iter(chunks(wrong, &base, 10))).await.expect_err("wrong shape accepted");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("head.fc1.weight") && e.message().contains("[3, 4]"), "{e:?}");

    // site-b's valid update is accepted; the round closes on quorum after its timeout.
    let mut delta_b = global.zeros_like();
    delta_b.data_mut().iter_mut().enumerate().for_each(|(i, v)| *v = 0.1 * i as f32);
    b.push_update(tokio_stream::iter(chunks(delta_b.clone(), &base, 25))).await?;
    let e = b.push_update(tokio_stream::iter(chunks(delta_b.clone(), &base, 25))).await.expect_err("second update accepted");
    assert_eq!(e.code(), Code::AlreadyExists);

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = a.next_task(pb::TaskRequest {}).await?.into_inner();
        if matches!(t.kind, Some(pb::task::Kind::Extract(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "round never closed: {t:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (next, _) = ModelState::load(&coord.state_dir.join("models/main/global_r0001.safetensors"))?;
    for ((n, g), d) in next.data().iter().zip(global.data()).zip(delta_b.data()) {
        assert!((n - (g + d)).abs() < 1e-6, "global {n} != {g} + {d}");
    }
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(coord.state_dir.join("round_state.json"))?)?;
    let rejected = state["history"][0]["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 4, "{rejected:?}");
    assert!(rejected.iter().all(|r| r.as_str().unwrap().starts_with("site-a")));
    assert_eq!(state["history"][0]["contributors"][0]["site"], "site-b");

    // A late update for the closed round is refused clearly.
    let e = a.push_update(tokio_stream::iter(chunks(global.zeros_like(), &base, 10))).await.expect_err("late update accepted");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_without_quorum_fails_loudly_instead_of_hanging() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &["site-a", "site-b"])?;
    let global = tiny_model(2.0);
    global.save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let cfg = write_coordinator_config(&pki, &["site-a", "site-b"], "rounds = 2\nmin_sites = 2\nround_timeout_secs = 1\nquorum_grace_secs = 1\n")?;
    let mut coord = CoordinatorProc::start(&cfg)?;
    let mut a = connect(&coord.addr, &ClientIdentity::site(&pki, "site-a")).await?;
    a.push_update(tokio_stream::iter(chunks(global.zeros_like(), &global.weights_hash(), 10))).await?;
    // site-b never reports: after timeout + grace the coordinator gives up with a clear error.
    let status = coord.wait(Duration::from_secs(60))?;
    assert!(!status.success(), "the coordinator should fail without quorum");
    let log = coord.log_text();
    assert!(log.contains("only 1 of the 2 required updates"), "{log}");
    let audit = std::fs::read_to_string(coord.state_dir.join("audit.jsonl"))?;
    assert!(audit.contains("run_failed"));
    // Round 0's model is intact for a later resume.
    assert!(coord.state_dir.join("models/main/global_r0000.safetensors").exists());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_transfer_is_sent_again_and_accepted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &["site-a", "site-b"])?;
    let global = tiny_model(3.0);
    global.save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let cfg = write_coordinator_config(&pki, &["site-a", "site-b"], "rounds = 1\nmin_sites = 2\n")?;
    let coord = CoordinatorProc::start(&cfg)?;
    let mut a = connect(&coord.addr, &ClientIdentity::site(&pki, "site-a")).await?;
    let mut b = connect(&coord.addr, &ClientIdentity::site(&pki, "site-b")).await?;
    let base = global.weights_hash();
    let mut da = global.zeros_like();
    da.data_mut().iter_mut().for_each(|v| *v = 1.0);
    // The first transfer is damaged in flight; only that transfer is redone, nothing else.
    let mut damaged = chunks(da.clone(), &base, 10);
    if let Some(pb::model_chunk::Part::Tensor(t)) = &mut damaged[2].part {
        let mut d = t.data.to_vec();
        d[3] ^= 1;
        t.data = d.into();
    }
    assert_eq!(a.push_update(tokio_stream::iter(damaged)).await.unwrap_err().code(), Code::DataLoss);
    a.push_update(tokio_stream::iter(chunks(da.clone(), &base, 10))).await?;
    b.push_update(tokio_stream::iter(chunks(global.zeros_like(), &base, 30))).await?;
    let path = coord.state_dir.join("models/main/global_r0001.safetensors");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(std::time::Instant::now() < deadline, "round never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (next, _) = ModelState::load(&path)?;
    // (10·1 + 30·0) / 40 = 0.25 added to every weight.
    for (n, g) in next.data().iter().zip(global.data()) {
        assert!((n - g - 0.25).abs() < 1e-6);
    }
    Ok(())
}
