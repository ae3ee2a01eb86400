//! `cargo bench -p aln-common --bench plumbing` (part of `make bench`): the coordinator's
//! per-update plumbing on a model the size of the bimodal ResNet50 (24.6 M f32 values),
//! against a plain memcpy of the same bytes measured in the same run. Prints a table and
//! writes `out/bench/plumbing.json`. Timings are reported, never asserted.

// A benchmark prints its table for people.
#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use aln_common::aggregate::spool::SpoolSink;
use aln_common::aggregate::{self, AggregationConfig, Expectation, ModelUpdate, Strategy};
use aln_common::codec::{self, Codec};
use aln_common::privacy::PrivacyConfig;
use aln_common::privacy::secagg::{MaskContext, MaskingKey};
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::model_state::ModelState;
use aln_common::wire::{ChunkEncoder, PayloadMeta, ReceiveLimits, Reassembler, StreamDecoder};

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

    let fresh = || ModelUpdate::in_memory(SiteId::new("s").unwrap(), Round(1), ModelHash("x".into()), 10, model.clone());
    let plain = || aggregate::build(&AggregationConfig::default(), &PrivacyConfig::default(), &model, None, None);
    let mut agg = plain();
    let accumulate = (0..5)
        .map(|_| {
            let u = fresh();
            let t = Instant::now();
            agg.accumulate(std::hint::black_box(u)).unwrap();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    rows.push(("FedAvg accumulate (one update, in memory)", accumulate));
    // The coordinator's real path: the update was spooled to disk as it arrived.
    let spool_dir = std::env::temp_dir().join(format!("aln-bench-spool-{}", std::process::id()));
    let spooled = || {
        let exp = Expectation { global_hash: ModelHash("x".into()), round: Round(1), max_sample_count: 100, max_norm: None, codec: Codec::F32, mask_epoch: 0, numel: VALUES };
        let mut d = StreamDecoder::with_sink(ReceiveLimits::default(), SpoolSink::new(&spool_dir, "s", exp));
        let mut out = None;
        for c in ChunkEncoder::new(Arc::new(model.clone()), PayloadMeta::delta(Round(1), ModelHash("x".into()), 10), 0) {
            if let Some(r) = d.push(c).unwrap() {
                out = Some(r);
            }
        }
        let r = out.unwrap();
        ModelUpdate { site: SiteId::new("s").unwrap(), meta: r.meta, values: r.body.0, summary: r.body.1, streamed: None }
    };
    let accumulate_spool = (0..3)
        .map(|_| {
            let u = spooled();
            let t = Instant::now();
            agg.accumulate(u).unwrap();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    rows.push(("FedAvg accumulate (re-read from spool)", accumulate_spool));
    let finish = (0..3)
        .map(|_| {
            let mut a = plain();
            a.accumulate(fresh()).unwrap();
            let t = Instant::now();
            std::hint::black_box(a.finish(&model).unwrap());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    rows.push(("FedAvg finish (apply to global)", finish));
    let median = {
        let cfg = AggregationConfig { strategy: Strategy::Median, ..Default::default() };
        let mut a = aggregate::build(&cfg, &PrivacyConfig::default(), &model, None, None);
        for _ in 0..3 {
            a.accumulate(spooled()).unwrap();
        }
        let t = Instant::now();
        std::hint::black_box(a.finish(&model).unwrap());
        t.elapsed().as_secs_f64()
    };
    rows.push(("median of 3 spooled updates (finish)", median));
    let _ = std::fs::remove_dir_all(&spool_dir);
    let int8 = best_of(3, || {
        std::hint::black_box(codec::encode(&model, Codec::Int8Channel).unwrap());
    });
    rows.push(("int8-channel encode", int8));
    let key = MaskingKey::generate();
    let peer = MaskingKey::generate();
    let (a, b) = (SiteId::new("a").unwrap(), SiteId::new("b").unwrap());
    let set = vec![(a.clone(), key.public), (b, peer.public)];
    let ctx = MaskContext { run_id: "r".into(), experiment: "main".into(), round: 1, attempt: 0 };
    let mut words = vec![0u32; VALUES];
    let mask = best_of(3, || key.mask(&mut words, &a, &set, &ctx).unwrap());
    rows.push(("secure-aggregation mask (one peer, ChaCha20)", mask));

    let hash = best_of(3, || {
        std::hint::black_box(model.weights_hash());
    });
    rows.push(("BLAKE3 hash of the model", hash));

    let shared = Arc::new(model.clone());
    let meta = PayloadMeta::delta(Round(1), ModelHash("x".into()), 10);
    let mut chunks = Vec::new();
    let encode = best_of(3, || {
        chunks = ChunkEncoder::new(shared.clone(), meta.clone(), 0).collect();
    });
    rows.push(("encode to 1 MiB chunks (views + digest)", encode));
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
