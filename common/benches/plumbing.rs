//! `cargo bench -p aln-common --bench plumbing` (part of `make bench`): the coordinator's
//! per-update plumbing on a model the size of the bimodal ResNet50 (24.6 M f32 values),
//! against a plain memcpy of the same bytes measured in the same run. Prints a table and
//! writes `out/bench/plumbing.json`. Timings are reported, never asserted.

// A benchmark prints its table for people.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use aln_common::aggregate::{Aggregator, FedAvg, ModelUpdate};
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::model_state::ModelState;
use aln_common::wire::{ChunkEncoder, PayloadKind, PayloadMeta, ReceiveLimits, Reassembler};

const VALUES: usize = 24_631_222;

fn best_of<F: FnMut()>(reps: usize, mut f: F) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let data: Vec<f32> = (0..VALUES).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let model = ModelState::from_named(vec![("w".into(), vec![VALUES], data)]).unwrap();
    let bytes = model.byte_len() as f64;
    let gb = |s: f64| bytes / s / 1e9;
    let mut rows: Vec<(&str, f64)> = Vec::new();

    let mut dst = vec![0f32; VALUES];
    let memcpy = best_of(5, || {
        dst.copy_from_slice(std::hint::black_box(model.data()));
        std::hint::black_box(&mut dst);
    });
    rows.push(("memcpy", memcpy));

    let update = ModelUpdate { site: SiteId::new("s").unwrap(), round: Round(1), base: ModelHash("x".into()), sample_count: 10, delta: model.clone() };
    let mut agg = Box::new(FedAvg::new(&model));
    let accumulate = best_of(5, || agg.accumulate(std::hint::black_box(&update)).unwrap());
    rows.push(("FedAvg accumulate (one update)", accumulate));
    let finish = (0..3)
        .map(|_| {
            let mut a = Box::new(FedAvg::new(&model));
            a.accumulate(&update).unwrap();
            let t = Instant::now();
            std::hint::black_box(a.finish(&model).unwrap());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    rows.push(("FedAvg finish (apply to global)", finish));

    let hash = best_of(3, || {
        std::hint::black_box(model.weights_hash());
    });
    rows.push(("SHA-256 of the model", hash));

    let shared = Arc::new(model.clone());
    let meta = PayloadMeta { kind: PayloadKind::Delta, round: Round(1), base_model_hash: ModelHash("x".into()), sample_count: 10 };
    let mut chunks = Vec::new();
    let encode = best_of(3, || {
        chunks = ChunkEncoder::new(shared.clone(), meta.clone(), 0).collect();
    });
    rows.push(("encode to 1 MiB chunks (+ digest)", encode));
    let known = model.weights_hash();
    let encode_known = best_of(3, || {
        std::hint::black_box(ChunkEncoder::with_known_hash(shared.clone(), meta.clone(), 0, &known).count());
    });
    rows.push(("encode a global model (digest known)", encode_known));
    let reassemble = best_of(3, || {
        let mut r = Reassembler::new(ReceiveLimits::default());
        for c in chunks.iter().cloned() {
            std::hint::black_box(r.push(c).unwrap());
        }
    });
    rows.push(("reassemble + verify digest", reassemble));

    let dir = std::env::temp_dir().join(format!("aln-bench-{}", std::process::id()));
    let path = dir.join("m.safetensors");
    let save = best_of(3, || model.save(&path, &Default::default()).unwrap());
    rows.push(("checkpoint (safetensors, fsync, rename)", save));
    let _ = std::fs::remove_dir_all(&dir);

    println!("\nplumbing per 24.6 M-value fp32 update ({:.1} MB), best of several runs:", bytes / 1e6);
    println!("{:<42} {:>9} {:>9} {:>12}", "operation", "ms", "GB/s", "vs memcpy");
    let mut json = Vec::new();
    for (name, s) in &rows {
        println!("{name:<42} {:>9.1} {:>9.2} {:>11.0}%", s * 1e3, gb(*s), 100.0 * memcpy / s);
        json.push(serde_json::json!({"operation": name, "seconds": s, "gb_per_s": gb(*s), "fraction_of_memcpy": memcpy / s}));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../out/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("plumbing.json"), serde_json::to_vec_pretty(&json).unwrap()).unwrap();
}
