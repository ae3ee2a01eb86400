//! `coordinator`: provision a consortium, then run a federated training and evaluation.

// Binaries print results for people; libraries only log (see the workspace lints).
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use aln_common::config::CoordinatorConfig;
use aln_common::constants::state_files;
use aln_common::ids::SiteId;
use anyhow::{Context, Result};
use aln_common::logging::LogFormat;
use clap::{Parser, Subcommand};
use coordinator::provision::{ProvisionRequest, provision};
use coordinator::rounds::RoundController;
use tracing::info;

#[derive(Parser)]
#[command(name = "coordinator", version, about = "Runs a federation of hospitals training the bimodal ALN model together.")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the consortium CA, the coordinator's certificate and one startup kit per site.
    Provision {
        /// Comma-separated site ids (they become the certificates' Common Names).
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<SiteId>,
        /// Output folder (must not already hold a CA).
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS name or IP for the coordinator's certificate (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
        /// URL written into the site configs.
        #[arg(long)]
        url: Option<String>,
    },
    /// Write a commented coordinator.toml with the defaults, to edit.
    InitConfig {
        #[arg(long)]
        out: PathBuf,
        /// Comma-separated site ids to admit.
        #[arg(long, value_delimiter = ',', default_value = "site-a,site-b,site-c")]
        sites: Vec<SiteId>,
    },
    /// Issue a startup kit for one more site from an existing CA (keep the CA key offline otherwise).
    IssueSite {
        /// The folder `provision` wrote (holds ca/ca.pem and ca/ca.key).
        #[arg(long)]
        pki: PathBuf,
        #[arg(long)]
        site: SiteId,
        #[arg(long, default_value_t = 730, allow_negative_numbers = true)]
        valid_days: i64,
        /// URL written into the site config.
        #[arg(long, default_value = "https://127.0.0.1:50051")]
        url: String,
    },
    /// Print a certificate's sha256 fingerprint, for `federation.denied_certificates`.
    Fingerprint {
        #[arg(long)]
        cert: PathBuf,
    },
    /// Print the run's state as JSON (needs the admin kit written by `provision`).
    Status {
        /// Folder with ca.pem, admin.pem, admin.key.
        #[arg(long)]
        kit: PathBuf,
        /// Coordinator address, e.g. 127.0.0.1:50051.
        #[arg(long)]
        addr: String,
    },
    /// Stop the coordinator gracefully (needs the admin kit); a restart resumes the run.
    Stop {
        #[arg(long)]
        kit: PathBuf,
        #[arg(long)]
        addr: String,
        #[arg(long, default_value = "operator request")]
        reason: String,
    },
    /// Statistics on any CSV of scores (prints JSON): ROC/DeLong, diagnostic metrics, kappa.
    Stats {
        #[command(subcommand)]
        what: StatsCommand,
    },
    /// Site-level DP budget (RDP accountant): ε for a noise multiplier, or the noise
    /// multiplier for an ε, over `rounds` rounds a site's data enters (prints JSON).
    PrivacyBudget {
        /// Rounds of every experiment the site trains in.
        #[arg(long)]
        rounds: u32,
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// σ to evaluate …
        #[arg(long, conflicts_with = "epsilon", required_unless_present = "epsilon")]
        noise_multiplier: Option<f64>,
        /// … or the ε to reach.
        #[arg(long)]
        epsilon: Option<f64>,
    },
    /// Run (or resume) the federation described by a config file.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Override `federation.listen` (e.g. 127.0.0.1:0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Write the bound address to this file once listening (for scripts and tests).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
}

/// A CSV file with a reference-label column (shared by `stats roc` and `stats diag`).
#[derive(clap::Args)]
struct LabelledCsv {
    #[arg(long)]
    csv: PathBuf,
    /// Column holding the reference label.
    #[arg(long)]
    label: String,
    /// Label value of the positive class (higher scores = more likely positive).
    #[arg(long)]
    positive: String,
}

#[derive(Subcommand)]
enum StatsCommand {
    /// AUC with DeLong 95% CI and SE per score; paired DeLong z and p per pair of scores.
    Roc {
        #[command(flatten)]
        labelled: LabelledCsv,
        /// Score column (repeatable).
        #[arg(long = "score", required = true)]
        scores: Vec<String>,
    },
    /// Accuracy, sensitivity, specificity, PPV, NPV with Clopper-Pearson 95% CIs.
    Diag {
        #[command(flatten)]
        labelled: LabelledCsv,
        /// Column of predicted labels, coded like `--label`.
        #[arg(long)]
        pred: String,
    },
    /// Cohen's kappa of two rating columns, with SE and p (H0: kappa = 0).
    Kappa {
        #[arg(long)]
        csv: PathBuf,
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    aln_common::logging::init(cli.log_format);
    match cli.command {
        Command::Provision { sites, out, names, url } => {
            let mut req = ProvisionRequest::new(sites, out.clone());
            req.coordinator_names.extend(names);
            if let Some(url) = url {
                req.coordinator_url = url;
            }
            provision(&req)?;
            info!("consortium provisioned under {}", out.display());
            Ok(())
        }
        Command::Run { config, listen, addr_file } => run(config, listen, addr_file).await,
        Command::InitConfig { out, sites } => {
            if out.exists() {
                anyhow::bail!("{} exists; not overwriting it", out.display());
            }
            aln_common::atomic_file::write(&out, aln_common::config::coordinator_template(&sites).as_bytes())?;
            info!("wrote {}", out.display());
            Ok(())
        }
        Command::IssueSite { pki, site, valid_days, url } => {
            let dir = coordinator::provision::issue_site(&pki, &site, valid_days, &url)?;
            info!("kit for {site} written to {}", dir.display());
            Ok(())
        }
        Command::Fingerprint { cert } => {
            let pem = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
            println!("{}", aln_common::tls::fingerprint(&aln_common::tls::first_pem_certificate(&pem)?));
            Ok(())
        }
        Command::Status { kit, addr } => {
            let mut admin = admin_client(&kit, &addr).await?;
            let reply = admin.status(aln_proto::StatusRequest {}).await.map_err(|s| anyhow::anyhow!("status refused: {} ({:?})", s.message(), s.code()))?;
            let value: serde_json::Value = serde_json::from_str(&reply.into_inner().json)?;
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
        Command::Stop { kit, addr, reason } => {
            let mut admin = admin_client(&kit, &addr).await?;
            let reply = admin.stop(aln_proto::StopRequest { reason }).await.map_err(|s| anyhow::anyhow!("stop refused: {} ({:?})", s.message(), s.code()))?;
            println!("{}", reply.into_inner().message);
            Ok(())
        }
        Command::PrivacyBudget { rounds, delta, noise_multiplier, epsilon } => {
            use aln_common::privacy::accountant;
            let sigma = noise_multiplier.unwrap_or_else(|| accountant::noise_for_epsilon(epsilon.unwrap_or(1.0), rounds, delta));
            let eps = accountant::gaussian_epsilon(sigma, rounds, delta);
            println!("{}", serde_json::json!({"rounds": rounds, "delta": delta, "noise_multiplier": sigma, "epsilon": eps}));
            Ok(())
        }
        Command::Stats { what } => {
            let value = match what {
                StatsCommand::Roc { labelled: l, scores } => coordinator::stats_cli::roc(&l.csv, &l.label, &l.positive, &scores)?,
                StatsCommand::Diag { labelled: l, pred } => coordinator::stats_cli::diag(&l.csv, &l.label, &l.positive, &pred)?,
                StatsCommand::Kappa { csv, a, b } => coordinator::stats_cli::kappa(&csv, &a, &b)?,
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
    }
}

async fn run(config: PathBuf, listen: Option<String>, addr_file: Option<PathBuf>) -> Result<()> {
    let mut cfg = CoordinatorConfig::load(&config)?;
    if let Some(l) = listen {
        cfg.federation.listen = l;
    }
    let tls = cfg.tls.tls13_acceptor()?;
    let listener = tokio::net::TcpListener::bind(&cfg.federation.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.federation.listen))?;
    let addr = listener.local_addr()?;
    let cfg = Arc::new(cfg);
    let ctl = RoundController::open(cfg.clone()).context("opening the state directory")?;
    if let Some(path) = addr_file {
        aln_common::atomic_file::write(&path, addr.to_string().as_bytes())?;
    }
    info!(%addr, sites = cfg.federation.sites.len(), rounds = cfg.federation.rounds, "coordinator listening (mTLS)");

    let metrics = match &cfg.federation.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("federation.metrics_listen {addr}"))?;
            info!(addr = %l.local_addr()?, "Prometheus metrics at /metrics");
            Some(tokio::spawn(coordinator::metrics::serve(l, ctl.clone())))
        }
        None => None,
    };

    // Timeouts are checked by a ticker; progress is logged every 10 s.
    // On a terminal a bar counts rounds over the whole study; logs carry the same progress.
    let total_rounds = u64::from(cfg.federation.rounds) * cfg.study.plan(&cfg.federation.sites).len() as u64;
    let bar = aln_common::progress::rounds(total_rounds);
    let ticker = {
        let ctl = ctl.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut last = String::new();
            let mut n = 0u32;
            loop {
                tick.tick().await;
                ctl.advance();
                n += 1;
                let now = ctl.describe();
                if !bar.is_hidden() {
                    bar.set_position(ctl.metrics_snapshot().rounds_completed as u64);
                    bar.set_message(now.clone());
                }
                if now != last || n.is_multiple_of(40) {
                    bar.suspend(|| info!(progress = %now));
                    last = now;
                }
            }
        })
    };

    let shutdown = {
        let ctl = ctl.clone();
        async move {
            let mut finished = ctl.finished();
            let mut stop = ctl.stop_requested();
            tokio::select! {
                _ = async { finished.wait_for(|f| *f).await.is_ok() } => {
                    // Let sites collect their "done" before closing the door.
                    for _ in 0..100 {
                        if ctl.all_sites_released() { break; }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                _ = aln_common::shutdown::signal() => info!("shutdown signal: stopping; completed rounds are on disk"),
                _ = async { stop.wait_for(|s| *s).await.is_ok() } => info!("admin stop: stopping; completed rounds are on disk"),
            }
        }
    };
    coordinator::server::run(listener, tls, ctl.clone(), shutdown).await?;
    // A round's checkpoint may still be being written; let it land before exiting.
    let flushing = ctl.clone();
    tokio::task::spawn_blocking(move || flushing.flush_checkpoints()).await?;
    ticker.abort();
    bar.finish_and_clear();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(msg) = ctl.failure() {
        anyhow::bail!("{msg}");
    }
    let report = cfg.paths.state_dir.join(state_files::REPORT_JSON);
    if report.exists() {
        println!("{}", ctl.summary());
        println!("report: {}", report.display());
    }
    Ok(())
}

/// An Admin client over mTLS with the operator's kit.
async fn admin_client(kit: &std::path::Path, addr: &str) -> Result<aln_proto::admin_client::AdminClient<tonic::transport::Channel>> {
    let files = aln_common::tls::TlsFiles { ca: kit.join("ca.pem"), cert: kit.join("admin.pem"), key: kit.join("admin.key") };
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(files.client_config("coordinator")?)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {addr}"))?;
    Ok(aln_proto::admin_client::AdminClient::new(channel))
}
