//! Secure aggregation against the real coordinator over mTLS: three sites mask their updates
//! with the real site code (X25519 keys relayed by the coordinator, ChaCha20 masks in Z_2^32).
//! One site drops out after the mask set is fixed; the coordinator cannot close the round on
//! a partial sum, redoes the masking without it, and the resulting model is the exact
//! sample-weighted mean of the two remaining updates (to the fixed-point resolution).
//! Meanwhile what the coordinator received from any one site is, read on its own, noise.

use std::time::{Duration, Instant};

use aln_common::codec::{Codec, Encoded, ring_decode, ring_encode};
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::model_state::ModelState;
use aln_common::privacy::secagg::{MaskContext, MaskingKey};
use aln_common::wire::{ChunkEncoder, PayloadMeta};
use aln_e2e::*;
use aln_proto as pb;
use aln_proto::federation_client::FederationClient;
use tonic::Code;
use tonic::transport::Channel;

const BITS: u32 = 16;

struct Site {
    name: &'static str,
    client: FederationClient<Channel>,
    samples: u64,
    delta: ModelState,
}

async fn train_task(c: &mut FederationClient<Channel>) -> anyhow::Result<pb::TrainTask> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match c.next_task(pb::TaskRequest {}).await?.into_inner().kind {
            Some(pb::task::Kind::Train(t)) => return Ok(t),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    anyhow::bail!("no train task")
}

/// Shares a fresh key for (round 1, `epoch`); returns the key.
async fn share(site: &mut Site, epoch: u32) -> anyhow::Result<MaskingKey> {
    let key = MaskingKey::generate();
    let ack = site.client.share_key(pb::KeyShare { round: 1, mask_epoch: epoch, public_key: key.public.to_vec(), experiment: "main".into() }).await?.into_inner();
    assert!(ack.accepted, "{}: {}", site.name, ack.message);
    Ok(key)
}

async fn mask_set(site: &mut Site, epoch: u32) -> anyhow::Result<Vec<(SiteId, [u8; 32])>> {
    loop {
        let r = site.client.peer_keys(pb::PeerKeysRequest { round: 1, mask_epoch: epoch }).await?.into_inner();
        if r.ready {
            return Ok(r.keys.into_iter().map(|k| (SiteId::new(k.site_id).unwrap(), k.public_key.try_into().unwrap())).collect());
        }
    }
}

fn masked(site: &Site, key: &MaskingKey, set: &[(SiteId, [u8; 32])], run_id: &str, epoch: u32) -> Vec<u32> {
    let (mut words, saturated) = ring_encode(site.delta.data(), site.samples as f64, BITS);
    assert_eq!(saturated, 0);
    let ctx = MaskContext { run_id: run_id.into(), experiment: "main".into(), round: 1, attempt: epoch };
    key.mask(&mut words, &SiteId::new(site.name).unwrap(), set, &ctx).unwrap();
    words
}

async fn push(site: &mut Site, words: Vec<u32>, base: &ModelHash, epoch: u32) -> Result<pb::UpdateAck, tonic::Status> {
    let meta = PayloadMeta { ring_fraction_bits: BITS, mask_epoch: epoch, ..PayloadMeta::delta(Round(1), base.clone(), site.samples) };
    let enc = Encoded::ring(site.delta.specs().to_vec(), words);
    site.client.push_update(tokio_stream::iter(ChunkEncoder::encoded(enc, meta, 0))).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_updates_sum_exactly_and_a_dropout_redoes_the_masking() -> anyhow::Result<()> {
    let names = ["site-a", "site-b", "site-c"];
    let dir = tempfile::tempdir()?;
    let pki = provision(dir.path(), &names)?;
    let global = tiny_model(1.0);
    global.save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
    let cfg = write_coordinator_config(&pki, &names, "rounds = 1\nmin_sites = 2\nround_timeout_secs = 3\nquorum_grace_secs = 60\n\n[privacy]\nsecure_aggregation = true\nring_fraction_bits = 16\n")?;
    let coord = CoordinatorProc::start(&cfg)?;
    let mut sites = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut client = connect(&coord.addr, &ClientIdentity::site(&pki, name)).await?;
        let codecs = vec![Codec::F32.to_proto() as i32, Codec::Ring32.to_proto() as i32];
        let j = client.join(pb::JoinRequest { proto_version: aln_proto::PROTO_VERSION.into(), software_version: "test".into(), train_patients: 1, total_patients: 1, codecs }).await?.into_inner();
        let protocol = j.protocol.unwrap();
        assert!(protocol.secure_aggregation);
        assert_eq!(protocol.codec, pb::Codec::RingU32 as i32);
        let delta = ModelState::new(global.specs().to_vec(), (0..global.numel()).map(|k| (k as f32 - 7.0) * 0.01 * (i as f32 + 1.0)).collect())?;
        sites.push((j.run_id, Site { name, client, samples: 10 * (i as u64 + 1), delta }));
    }
    let run_id = sites[0].0.clone();
    let mut sites: Vec<Site> = sites.into_iter().map(|(_, s)| s).collect();

    // A site without ring support is refused at Join with the reason.
    let mut old = connect(&coord.addr, &ClientIdentity::site(&pki, "site-c")).await?;
    let e = old
        .join(pb::JoinRequest { proto_version: aln_proto::PROTO_VERSION.into(), software_version: "old".into(), train_patients: 1, total_patients: 1, codecs: vec![pb::Codec::F32Le as i32] })
        .await
        .expect_err("a site that cannot mask was admitted to a secure run");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("ring32"), "{e:?}");

    // Attempt 0: all three publish keys and receive the same mask set.
    let mut base = ModelHash(String::new());
    let mut keys = Vec::new();
    for s in sites.iter_mut() {
        let t = train_task(&mut s.client).await?;
        assert_eq!(t.mask_epoch, 0);
        base = ModelHash(t.model_hash);
        keys.push(share(s, 0).await?);
    }
    let set = mask_set(&mut sites[0], 0).await?;
    assert_eq!(set.len(), 3);
    assert_eq!(mask_set(&mut sites[2], 0).await?, set);

    // What the coordinator receives from one site, read on its own, is noise: far from the delta.
    let a_words = masked(&sites[0], &keys[0], &set, &run_id, 0);
    let seen: Vec<f64> = a_words.iter().map(|&w| ring_decode(w, BITS) / sites[0].samples as f64).collect();
    let err = seen.iter().zip(sites[0].delta.data()).map(|(s, d)| (s - f64::from(*d)).abs()).sum::<f64>() / seen.len() as f64;
    assert!(err > 10.0, "a single masked update is readable (mean error {err})");

    // Sites a and b deliver; c drops out after the set was fixed.
    push(&mut sites[0], a_words, &base, 0).await?;
    let b_words = masked(&sites[1], &keys[1], &set, &run_id, 0);
    push(&mut sites[1], b_words, &base, 0).await?;
    // The round cannot close on a partial sum: after the timeout the masking is redone without c.
    let t = Instant::now();
    let retrain = loop {
        let t_a = train_task(&mut sites[0].client).await?;
        if t_a.mask_epoch == 1 {
            break t_a;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no masking restart");
    };
    assert_eq!(retrain.participants, 2);
    assert!(!coord.state_dir.join("models/main/global_r0001.safetensors").exists(), "a round closed on a partial masked sum");
    // c is left out of attempt 1.
    match sites[2].client.next_task(pb::TaskRequest {}).await?.into_inner().kind {
        Some(pb::task::Kind::Wait(w)) => assert!(w.reason.contains("mask set"), "{w:?}"),
        other => panic!("dropped site got {other:?}"),
    }
    // An update masked for the old attempt is refused.
    let stale = masked(&sites[1], &keys[1], &set, &run_id, 0);
    let _ = train_task(&mut sites[1].client).await?;
    let e = push(&mut sites[1], stale, &base, 0).await.expect_err("stale mask accepted");
    assert!(matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition), "{e:?}");

    // Attempt 1 with a and b only.
    let ka = share(&mut sites[0], 1).await?;
    let kb = share(&mut sites[1], 1).await?;
    let set1 = mask_set(&mut sites[0], 1).await?;
    assert_eq!(set1.len(), 2);
    let wa = masked(&sites[0], &ka, &set1, &run_id, 1);
    let wb = masked(&sites[1], &kb, &set1, &run_id, 1);
    push(&mut sites[0], wa, &base, 1).await?;
    push(&mut sites[1], wb, &base, 1).await?;

    let path = coord.state_dir.join("models/main/global_r0001.safetensors");
    let t = Instant::now();
    while !path.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "round 1 never closed:\n{}", coord.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (next, _) = ModelState::load(&path)?;
    let (na, nb) = (sites[0].samples as f64, sites[1].samples as f64);
    for k in 0..global.numel() {
        let want = f64::from(global.data()[k]) + (na * f64::from(sites[0].delta.data()[k]) + nb * f64::from(sites[1].delta.data()[k])) / (na + nb);
        assert!((f64::from(next.data()[k]) - want).abs() < 2.0 / 65536.0, "value {k}: {} vs {want}", next.data()[k]);
    }
    let audit = std::fs::read_to_string(coord.state_dir.join("audit.jsonl"))?;
    assert!(audit.contains("mask_restart") && audit.contains("site-c"), "{audit}");
    Ok(())
}
