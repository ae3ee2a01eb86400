//! `site-node`: runs at a hospital next to its data. Trains the bimodal ResNet50 locally,
//! sends only weight deltas and, when asked, per-patient feature rows.

// Binaries print results for people; libraries only log (see the workspace lints).
#![allow(clippy::print_stdout)]

/// mimalloc keeps freed model-sized buffers for reuse instead of returning them to the OS
/// (glibc maps every ~100 MB buffer afresh: a page fault and zeroing per 4 KiB, per round).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod client;
mod colormap;
mod data;
mod dicom;
mod gradcam;
mod model;
mod resnet;
mod synth;
mod train;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aln_common::cohort::{assign_splits, read_manifest};
use aln_common::config::{DeviceChoice, SiteConfig};
use aln_common::constants::{DEFAULT_DEEP_FEATURE_DIM, DEFAULT_HIDDEN_DIM};
use anyhow::{Context, Result, bail};
use aln_common::logging::LogFormat;
use clap::{Parser, Subcommand, ValueEnum};
use tch::Device;
use tracing::{info, warn};

use crate::model::{BimodalNet, HeadDims};

#[derive(Parser)]
#[command(name = "site-node", version, about = "A hospital's node of the ALN federation: local training, only weight updates leave.")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Write the built-in synthetic multi-center cohort (images + manifest per site).
    Synth {
        #[arg(long, default_value_t = 3)]
        sites: usize,
        #[arg(long, default_value_t = 584)]
        patients: usize,
        #[arg(long, default_value_t = 2020)]
        seed: u64,
        /// Side of the generated square images, pixels.
        #[arg(long, default_value_t = 128)]
        image_px: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Create the initial global model (safetensors) the coordinator starts from.
    InitModel {
        #[arg(long)]
        out: PathBuf,
        /// torchvision ResNet50 weights (safetensors) for the shared trunk; random init without.
        #[arg(long)]
        pretrained: Option<PathBuf>,
        #[arg(long, default_value_t = DEFAULT_HIDDEN_DIM as i64)]
        hidden_dim: i64,
        /// Length of the deep-feature vector (penultimate FC layer).
        #[arg(long, default_value_t = DEFAULT_DEEP_FEATURE_DIM as i64)]
        feature_dim: i64,
        /// 2 = N0 vs N+ (task 1), 3 = N0 / N+(1-2) / N+(≥3).
        #[arg(long, default_value_t = 2)]
        classes: i64,
        #[arg(long, default_value_t = 0)]
        seed: i64,
    },
    /// Time the bimodal training step and feature extraction on random inputs (prints JSON).
    BenchStep {
        #[arg(long, default_value_t = 64)]
        image_size: i64,
        #[arg(long, default_value_t = 8)]
        batch: i64,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Torch threads (0 = torch's default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
        /// CUDA mixed precision (autocast, fp16); ignored on CPU.
        #[arg(long)]
        autocast: bool,
    },
    /// Write a commented site.toml with the defaults, to edit.
    InitConfig {
        #[arg(long)]
        out: PathBuf,
        /// The coordinator's URL.
        #[arg(long, default_value = "https://127.0.0.1:50051")]
        coordinator: String,
    },
    /// Validate a manifest and its images, and print a summary; nothing is sent anywhere.
    CheckData {
        #[arg(long)]
        manifest: PathBuf,
        #[arg(long, default_value_t = 64)]
        image_size: u32,
    },
    /// Join the federation and follow the coordinator until the run is done.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Override `site.coordinator` (e.g. https://127.0.0.1:50051).
        #[arg(long)]
        coordinator: Option<String>,
        /// Override `site.manifest`.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Override `site.work_dir`.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Override `site.device`.
        #[arg(long, value_enum)]
        device: Option<DeviceArg>,
        /// Override `site.threads`.
        #[arg(long)]
        threads: Option<usize>,
        /// How long to keep retrying the first connection, seconds.
        #[arg(long, default_value_t = 120)]
        connect_patience: u64,
        /// Benchmark only: skip local training and return the weights unchanged (a zero
        /// delta), so a round measures the federation's own overhead (`make bench`).
        #[arg(long, hide = true)]
        overhead_probe: bool,
    },
}

fn pick_device(choice: DeviceChoice) -> Result<Device> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda => {
            if !tch::Cuda::is_available() {
                bail!("device = cuda but no CUDA device is available");
            }
            Device::Cuda(0)
        }
        DeviceChoice::Auto => Device::cuda_if_available(),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    aln_common::logging::init(cli.log_format);
    match cli.command {
        Command::Synth { sites, patients, seed, image_px, out } => {
            let dirs = synth::generate(&synth::SynthOptions { sites, patients, seed, image_px, out })?;
            info!(sites = dirs.len(), "synthetic cohort ready");
            Ok(())
        }
        Command::InitModel { out, pretrained, hidden_dim, feature_dim, classes, seed } => {
            if !(2..=3).contains(&classes) {
                bail!("--classes must be 2 or 3");
            }
            tch::manual_seed(seed);
            let mut net = BimodalNet::new(Device::Cpu, HeadDims { hidden: hidden_dim, feature: feature_dim, classes });
            let source = match &pretrained {
                Some(p) => {
                    let n = net.load_torchvision_trunk(p)?;
                    info!(tensors = n, "trunk initialised from {}", p.display());
                    p.display().to_string()
                }
                None => {
                    warn!("no --pretrained weights: the trunk is randomly initialised (fine for demos and tests, not for real use)");
                    "random".to_string()
                }
            };
            let state = net.export()?;
            let meta = std::collections::HashMap::from([
                ("kind".to_string(), "initial".to_string()),
                ("trunk".to_string(), source),
                ("classes".to_string(), classes.to_string()),
            ]);
            state.save(&out, &meta)?;
            info!(params = state.numel(), bytes = state.byte_len(), hash = %state.weights_hash().short(), "initial model written to {}", out.display());
            Ok(())
        }
        Command::CheckData { manifest, image_size } => check_data(manifest, image_size),
        Command::BenchStep { image_size, batch, steps, threads, device, autocast } => {
            if threads > 0 {
                tch::set_num_threads(threads as i32);
            }
            let device = pick_device(match device {
                DeviceArg::Auto => DeviceChoice::Auto,
                DeviceArg::Cpu => DeviceChoice::Cpu,
                DeviceArg::Cuda => DeviceChoice::Cuda,
            })?;
            let v = bench::run(&bench::StepBench { image_size, batch, steps, device, autocast })?;
            println!("{v}");
            Ok(())
        }
        Command::InitConfig { out, coordinator } => {
            if out.exists() {
                bail!("{} exists; not overwriting it", out.display());
            }
            aln_common::atomic_file::write(&out, aln_common::config::site_template(&coordinator).as_bytes())?;
            info!("wrote {}", out.display());
            Ok(())
        }
        Command::Run { config, coordinator, manifest, work_dir, device, threads, connect_patience, overhead_probe } => {
            let mut cfg = SiteConfig::load(&config)?;
            if let Some(c) = coordinator {
                cfg.site.coordinator = c;
            }
            if let Some(m) = manifest {
                cfg.site.manifest = m;
            }
            if let Some(w) = work_dir {
                cfg.site.work_dir = w;
            }
            if let Some(d) = device {
                cfg.site.device = match d {
                    DeviceArg::Auto => DeviceChoice::Auto,
                    DeviceArg::Cpu => DeviceChoice::Cpu,
                    DeviceArg::Cuda => DeviceChoice::Cuda,
                };
            }
            if let Some(t) = threads {
                cfg.site.threads = t;
            }
            run(cfg, Duration::from_secs(connect_patience), overhead_probe).await
        }
    }
}

fn load_rows(manifest: &std::path::Path) -> Result<Vec<aln_common::cohort::ManifestRow>> {
    let mut rows = read_manifest(manifest)?;
    if rows.iter().any(|r| r.split.is_none()) {
        // Stratified, seeded, patient-level split for rows without a fixed one.
        let stages: Vec<_> = rows.iter().map(|r| r.n_stage).collect();
        let splits = assign_splits(&stages, 2020);
        for (r, s) in rows.iter_mut().zip(splits) {
            r.split.get_or_insert(s);
        }
        info!("assigned train/validation/test splits (seed 2020) to rows without one");
    }
    Ok(rows)
}

fn check_data(manifest: PathBuf, image_size: u32) -> Result<()> {
    let rows = load_rows(&manifest)?;
    let n = rows.len();
    let data = data::SiteData::load(rows, image_size).with_context(|| format!("checking images of {}", manifest.display()))?;
    let mut by_class: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_split: BTreeMap<String, usize> = BTreeMap::new();
    let mut missing: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &data.rows {
        *by_class.entry(r.n_stage.to_string()).or_default() += 1;
        *by_split.entry(r.split.map_or("-".into(), |s| s.to_string())).or_default() += 1;
        let c = &r.clinical;
        for (name, absent) in [
            ("age", c.age_years.is_none()),
            ("us_size_mm", c.us_size_mm.is_none()),
            ("er", c.er_positive.is_none()),
            ("pr", c.pr_positive.is_none()),
            ("her2", c.her2_positive.is_none()),
            ("ki67", c.ki67_positive.is_none()),
            ("birads", c.birads.is_none()),
            ("histology", c.histology.is_none()),
            ("location", c.location.is_none()),
            ("axillary_us", c.axillary_us_positive.is_none()),
        ] {
            if absent {
                *missing.entry(name).or_default() += 1;
            }
        }
    }
    let sizes = |m: usize| {
        let (w, h): (Vec<u32>, Vec<u32>) = data.images.iter().map(|i| (i[m].width, i[m].height)).unzip();
        let spacing: Vec<f64> = data.images.iter().filter_map(|i| i[m].pixel_spacing_mm.map(|s| s.0)).collect();
        serde_json::json!({
            "width": [w.iter().min(), w.iter().max()],
            "height": [h.iter().min(), h.iter().max()],
            "dicom_files": data.images.iter().filter(|i| i[m].dicom).count(),
            "with_pixel_spacing": spacing.len(),
            "pixel_spacing_mm": [spacing.iter().copied().reduce(f64::min), spacing.iter().copied().reduce(f64::max)],
        })
    };
    let summary = serde_json::json!({
        "manifest": manifest.display().to_string(),
        "patients": n,
        "by_class": by_class,
        "by_split": by_split,
        "missing_values": missing,
        "images_checked": 2 * n,
        "us_images": sizes(0),
        "swe_images": sizes(1),
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

async fn run(cfg: SiteConfig, patience: Duration, overhead_probe: bool) -> Result<()> {
    if cfg.site.threads > 0 {
        tch::set_num_threads(cfg.site.threads as i32);
    }
    let device = pick_device(cfg.site.device)?;
    let rows = load_rows(&cfg.site.manifest)?;
    info!(patients = rows.len(), ?device, manifest = %cfg.site.manifest.display(), "local data found; images stay on this machine");
    let mut session = client::Session::connect(cfg, patience).await?;
    session.overhead_probe = overhead_probe;
    // The crop size comes from the coordinator's plan, so the data is loaded after joining.
    tokio::select! {
        done = session.run(device, rows) => done.map(|summary| {
            if !summary.is_empty() {
                info!("run summary:\n{summary}");
            }
        }),
        _ = aln_common::shutdown::signal() => {
            // Everything kept locally was written atomically; the coordinator keeps the
            // round open, so a restarted site-node simply picks up its task again.
            info!("stopping on signal; restart with the same command to rejoin the run");
            Ok(())
        }
    }
}
