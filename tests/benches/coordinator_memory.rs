//! `make bench`: the coordinator's peak resident memory while 1, 2, 4, 8 and 16 simulated
//! sites push a full-size update (24.6 M fp32 values, as the bimodal ResNet50) at the same
//! time over real gRPC + mTLS on loopback. Prints a table, writes `out/bench/coordinator_memory.json`.
//! Reported, never asserted.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use aln_common::ids::Round;
use aln_common::model_state::ModelState;
use aln_common::wire::{ChunkEncoder, PayloadMeta};
use aln_e2e::*;

const VALUES: usize = 24_631_222;

fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let model = ModelState::from_named(vec![("w".into(), vec![VALUES], vec![0.0; VALUES])])?;
    let model_mb = model.byte_len() as f64 / (1 << 20) as f64;
    let delta = Arc::new({
        let mut d = model.zeros_like();
        d.data_mut().iter_mut().enumerate().for_each(|(i, v)| *v = (i % 7) as f32 * 1e-3);
        d
    });
    let mut rows = Vec::new();
    println!("\ncoordinator peak RSS with N sites uploading a {model_mb:.0} MiB update at once:");
    println!("{:>6} {:>14} {:>16} {:>12}", "sites", "peak RSS MiB", "× model size", "round s");
    for n in [1usize, 2, 4, 8, 16] {
        let dir = tempfile::tempdir()?;
        let names: Vec<String> = (0..n).map(|i| format!("site-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = provision(dir.path(), &refs)?;
        model.save(&pki.join("coordinator/initial_model.safetensors"), &Default::default())?;
        let cfg = write_coordinator_config(&pki, &refs, &format!("rounds = 1\nmin_sites = {n}\n"))?;
        let coord = CoordinatorProc::start(&cfg)?;
        let base = model.weights_hash();
        let started = Instant::now();
        let mut tasks = Vec::new();
        for name in &names {
            let mut client = connect(&coord.addr, &ClientIdentity::site(&pki, name)).await?;
            let (delta, base) = (delta.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                let meta = PayloadMeta::delta(Round(1), base, 10);
                client.push_update(tokio_stream::iter(ChunkEncoder::new(delta, meta, 0))).await.map(|_| ())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let done = coord.state_dir.join("models/main/global_r0001.safetensors");
        while !done.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let peak = peak_rss_mb(coord.child.id());
        println!("{n:>6} {peak:>14.0} {:>16.2} {secs:>12.2}", peak / model_mb);
        rows.push(serde_json::json!({"sites": n, "peak_rss_mib": peak, "model_mib": model_mb, "round_seconds": secs}));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../out/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("coordinator_memory.json"), serde_json::to_vec_pretty(&rows)?)?;
    Ok(())
}
