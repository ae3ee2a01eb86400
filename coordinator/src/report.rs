//! The researcher's report: `report.json`, `features.csv` and a plain-text results table.
//!
//! Everything lands in the coordinator's state directory; the JSON carries the config and
//! model hash that produced every number.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aln_common::aggregate::{AggregationConfig, Strategy};
use aln_common::atomic_file;
use aln_common::codec::Codec;
use aln_common::privacy::PrivacyConfig;
use aln_common::cohort::{ClinicalTask, FeatureRow};
use aln_common::config::{CoordinatorConfig, TrainingPlan};
use aln_common::experiment::{self, Experiment, StudyConfig};
use aln_common::constants::state_files;
use aln_common::fusion::{CvGrid, FeatureSet, FusionSvmParams};
use aln_common::ids::ModelHash;
use anyhow::{Context, Result};
use serde::Serialize;

use crate::cohort_table::{self, BalanceRow};
use crate::html;
use crate::evaluation::{self, ExtraMethod, ExtraScore, LosoResult, MultiClassEvaluation, TaskEvaluation};
use crate::state::{RoundRecord, RunState, StateStore};

/// Version of the report.json layout.
pub const REPORT_FORMAT_VERSION: u32 = 2;

#[derive(Debug, Serialize)]
pub struct SiteCohort {
    pub by_split: BTreeMap<String, usize>,
    pub by_class: BTreeMap<String, usize>,
}

#[derive(Debug, Serialize)]
pub struct ReportConfig {
    pub sites: Vec<String>,
    pub rounds: u32,
    pub min_sites: usize,
    pub training: TrainingPlan,
    pub fusion: FusionSvmParams,
    pub study: StudyConfig,
    pub aggregation: AggregationConfig,
    pub privacy: PrivacyConfig,
    pub update_codec: Codec,
}

/// How the federation ran: aggregation, privacy and bytes on the wire.
#[derive(Debug, Serialize)]
pub struct FederationSummary {
    /// e.g. "FedAvg, updates as int8-channel with error feedback".
    pub aggregator: String,
    /// e.g. "DP (noise added at each site) clip S = 1, noise σ = 1, δ = 1e-5; no secure aggregation".
    pub privacy: String,
    /// ε of the whole study for the site whose data entered the most rounds (None without DP).
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// Rounds each site's data entered (the T of the accountant).
    pub rounds_per_site: BTreeMap<String, u32>,
    pub epsilon_scope: &'static str,
    pub rounds: usize,
    pub uplink_bytes: u64,
    pub downlink_bytes: u64,
    pub uplink_bytes_per_round: f64,
    pub downlink_bytes_per_round: f64,
    /// Secure aggregation restarts after a dropout; central-DP clipped updates.
    pub mask_restarts: u32,
    pub clipped_updates: usize,
}

impl FederationSummary {
    pub fn of(cfg: &CoordinatorConfig, history: &[RoundRecord]) -> Self {
        let mut rounds_per_site: BTreeMap<String, u32> = BTreeMap::new();
        for r in history {
            for c in &r.contributors {
                *rounds_per_site.entry(c.site.to_string()).or_default() += 1;
            }
        }
        let most = rounds_per_site.values().copied().max().unwrap_or(0);
        let agg = &cfg.aggregation;
        let strategy = match agg.strategy {
            Strategy::Fedprox => format!("FedProx (μ = {})", agg.proximal_mu),
            Strategy::Fedadam | Strategy::Fedyogi => format!("{} (η = {}, β1 = {}, β2 = {}, τ = {})", agg.strategy, agg.server_learning_rate, agg.beta1, agg.beta2, agg.tau),
            Strategy::TrimmedMean => format!("trimmed mean (β = {})", agg.trim_fraction),
            s => s.to_string(),
        };
        let codec = if cfg.privacy.secure_aggregation { Codec::Ring32 } else { cfg.federation.update_codec };
        let wire = if codec.is_lossy() { format!("updates as {codec} with error feedback") } else { format!("updates as {codec}") };
        let uplink: u64 = history.iter().map(|r| r.uplink_bytes).sum();
        let downlink: u64 = history.iter().map(|r| r.downlink_bytes).sum();
        let n = history.len().max(1) as f64;
        Self {
            aggregator: format!("{strategy}, {wire}"),
            privacy: cfg.privacy.describe(),
            epsilon: cfg.privacy.epsilon(most),
            delta: (cfg.privacy.dp != aln_common::privacy::DpMode::Off).then_some(cfg.privacy.delta),
            rounds_per_site,
            epsilon_scope: "site-level (ε, δ)-DP of the weight updates over every round of every experiment a site trained in (RDP accountant, Gaussian mechanism). The deep-feature rows sent for the fusion SVM are not covered.",
            rounds: history.len(),
            uplink_bytes: uplink,
            downlink_bytes: downlink,
            uplink_bytes_per_round: uplink as f64 / n,
            downlink_bytes_per_round: downlink as f64 / n,
            mask_restarts: history.iter().map(|r| r.mask_epochs.saturating_sub(1)).sum(),
            clipped_updates: history.iter().map(|r| r.clipped).sum(),
        }
    }

    /// Lines for the plain-text summary.
    pub fn lines(&self) -> String {
        let eps = match (self.epsilon, self.delta) {
            (Some(e), Some(d)) => format!("ε = {e:.2} at δ = {d:e} (weight updates only; feature rows for the SVM are not covered)"),
            _ => "no differential privacy (ε = ∞)".into(),
        };
        format!(
            "Federation: {}
Privacy: {}
  {}
Bytes: {:.1} MB up, {:.1} MB down in {} rounds ({:.1} MB up, {:.1} MB down per round)
",
            self.aggregator,
            self.privacy,
            eps,
            self.uplink_bytes as f64 / 1e6,
            self.downlink_bytes as f64 / 1e6,
            self.rounds,
            self.uplink_bytes_per_round / 1e6,
            self.downlink_bytes_per_round / 1e6
        )
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub format_version: u32,
    pub software_version: &'static str,
    pub run_id: String,
    pub model_hash: ModelHash,
    pub config: ReportConfig,
    pub federation: FederationSummary,
    pub rounds: Vec<RoundRecord>,
    pub cohort: BTreeMap<String, SiteCohort>,
    /// Table 2: training vs test cohort, pooled over sites.
    pub table2: Vec<BalanceRow>,
    /// N0 vs N+(≥1).
    pub task1: TaskEvaluation,
    /// N+(1-2) vs N+(≥3), node-positive patients only.
    pub task2: TaskEvaluation,
    /// N0 / N+(1-2) / N+(≥3).
    pub task3: MultiClassEvaluation,
    /// Task 1 on each held-out site, trained without it.
    pub leave_one_site_out: Vec<LosoResult>,
    /// The study's experiments, in the order they ran.
    pub experiments: Vec<String>,
}

/// Evaluates, writes `report.json` + `features.csv`, returns the printable summary.
pub fn build_and_write(
    cfg: &CoordinatorConfig,
    store: &StateStore,
    run: &RunState,
    experiments: &[Experiment],
    features: &BTreeMap<String, Vec<FeatureRow>>,
) -> Result<String> {
    let rows: &[FeatureRow] = features.get(experiment::MAIN).context("no features of the main experiment")?;
    let grid = CvGrid::default();
    let mut extras = Vec::new();
    for (id, name, score) in [
        (experiment::US_ONLY, "us_only_clinical", ExtraScore::CombinedSvm),
        (experiment::SWE_ONLY, "swe_only_clinical", ExtraScore::CombinedSvm),
        (experiment::RESNET50_C, "resnet50_c", ExtraScore::NetworkScore),
    ] {
        if let Some(r) = features.get(id) {
            extras.push(ExtraMethod { name, rows: r, score });
        }
    }
    let task1 = evaluation::evaluate_task(rows, ClinicalTask::N0VsNPlus, cfg.fusion, &grid, &extras).context("task 1 (N0 vs N+)")?;
    let task2 = evaluation::evaluate_task(rows, ClinicalTask::LowVsHighBurden, cfg.fusion, &grid, &[]).context("task 2 (N+(1-2) vs N+(>=3))")?;
    let mut leave_one_site_out = Vec::new();
    for e in experiments {
        if let (Some(site), Some(r)) = (&e.held_out, features.get(&e.id)) {
            leave_one_site_out.push(evaluation::evaluate_loso(site.as_str(), r, cfg.fusion, &grid).with_context(|| format!("leave-one-site-out {}", e.id))?);
        }
    }
    let combined_params = task1.method(FeatureSet::Combined.name()).and_then(|m| m.params).unwrap_or(cfg.fusion);
    let task3 = evaluation::evaluate_three_class(rows, combined_params).context("task 3 (three classes)")?;
    let mut cohort: BTreeMap<String, SiteCohort> = BTreeMap::new();
    for r in rows {
        let c = cohort.entry(r.site.to_string()).or_insert_with(|| SiteCohort { by_split: BTreeMap::new(), by_class: BTreeMap::new() });
        *c.by_split.entry(r.split.to_string()).or_default() += 1;
        *c.by_class.entry(r.n_stage.to_string()).or_default() += 1;
    }
    let report = Report {
        format_version: REPORT_FORMAT_VERSION,
        software_version: env!("CARGO_PKG_VERSION"),
        run_id: run.run_id.clone(),
        model_hash: run.global_model_hash.clone(),
        config: ReportConfig {
            sites: cfg.federation.sites.iter().map(|s| s.to_string()).collect(),
            rounds: cfg.federation.rounds,
            min_sites: cfg.federation.min_sites,
            training: cfg.training,
            fusion: cfg.fusion,
            study: cfg.study,
            aggregation: cfg.aggregation,
            privacy: cfg.privacy,
            update_codec: cfg.federation.update_codec,
        },
        federation: FederationSummary::of(cfg, &run.history),
        rounds: run.history.clone(),
        cohort,
        table2: cohort_table::table2(rows),
        task1,
        task2,
        task3,
        leave_one_site_out,
        experiments: experiments.iter().map(|e| e.id.clone()).collect(),
    };
    atomic_file::write_json(&store.dir().join(state_files::REPORT_JSON), &report)?;
    let gradcam = html::collect_gradcam(store.dir());
    atomic_file::write(&store.dir().join(state_files::REPORT_HTML), html::render(&report, &gradcam).as_bytes())?;
    write_features_csv(&store.dir().join(state_files::FEATURES_CSV), rows)?;
    Ok(summary(&report))
}

fn write_features_csv(path: &std::path::Path, rows: &[FeatureRow]) -> Result<()> {
    let dim = rows.first().map_or(0, |r| r.deep.len());
    let mut out = String::from("site,patient_id,split,n_stage,age,us_size_mm,er,pr,her2,ki67,birads,histology,location,axillary_us");
    for i in 0..dim {
        write!(out, ",deep_{i}")?;
    }
    out.push('\n');
    let b = |v: Option<bool>| v.map_or(String::new(), |x| if x { "positive".into() } else { "negative".into() });
    let f = |v: Option<f32>| v.map_or(String::new(), |x| x.to_string());
    for r in rows {
        let c = &r.clinical;
        write!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            r.site,
            r.patient_id,
            r.split,
            r.n_stage,
            f(c.age_years),
            f(c.us_size_mm),
            b(c.er_positive),
            b(c.pr_positive),
            b(c.her2_positive),
            b(c.ki67_positive),
            c.birads.map_or(String::new(), |v| v.to_string()),
            c.histology.map_or(String::new(), |v| v.to_string()),
            c.location.map_or(String::new(), |v| v.to_string()),
            b(c.axillary_us_positive),
        )?;
        for v in &r.deep {
            write!(out, ",{v}")?;
        }
        out.push('\n');
    }
    atomic_file::write(path, out.as_bytes())?;
    Ok(())
}

fn fmt_auc(a: Option<&aln_common::stats::AucEstimate>) -> String {
    a.map_or("n/a".into(), ToString::to_string)
}

fn pct(p: Option<aln_common::stats::diagnostic::Proportion>) -> String {
    p.map_or("  n/a".into(), |p| format!("{:5.1}", 100.0 * p.estimate))
}

fn fmt_p(p: f64) -> String {
    if p < 1e-4 { "< 0.0001".into() } else { format!("= {p:.4}") }
}

fn task_table(s: &mut String, title: &str, t: &TaskEvaluation, sites: &[&String]) {
    let _ = writeln!(s, "{title}: test AUC [95% DeLong CI]; SVMs fitted on {} pooled training patients, {} test", t.n_train, t.n_test);
    let _ = write!(s, "{:<18} {:<22} {:>5} {:>5} {:>5}", "method", "pooled test", "ACC", "SENS", "SPEC");
    for site in sites {
        let _ = write!(s, "  {:<22}", format!("{site} test"));
    }
    let _ = writeln!(s);
    for m in &t.methods {
        let d = m.test.at_threshold;
        let _ = write!(
            s,
            "{:<18} {:<22} {} {} {}",
            m.method,
            fmt_auc(m.pooled_test()),
            pct(d.map(|d| d.accuracy)),
            pct(d.and_then(|d| d.sensitivity)),
            pct(d.and_then(|d| d.specificity))
        );
        for site in sites {
            let _ = write!(s, "  {:<22}", fmt_auc(m.per_site_test.get(*site).and_then(|c| c.auc.as_ref())));
        }
        let _ = writeln!(s);
    }
    for (k, d) in &t.delong_combined_vs {
        let _ = writeln!(s, "  DeLong combined vs {k}: z = {:.2}, p {}", d.z, fmt_p(d.p));
    }
    if let Some(hm) = t.hanley_mcneil_combined_vs_axillary_us {
        let _ = writeln!(s, "  Hanley-McNeil combined vs axillary_us: r = {:.2}, z = {:.2}, p {}", hm.r, hm.z, fmt_p(hm.p));
    }
}

/// The plain-text table printed at the end of a run.
pub fn summary(r: &Report) -> String {
    let mut s = r.federation.lines();
    let _ = writeln!(s);
    let sites: Vec<&String> = r.cohort.keys().collect();
    task_table(&mut s, "Task 1, N0 vs N+(>=1)", &r.task1, &sites);
    let _ = writeln!(s);
    task_table(&mut s, "Task 2, N+(1-2) vs N+(>=3)", &r.task2, &sites);
    let t3 = &r.task3;
    let _ = writeln!(
        s,
        "\nTask 3, N0 / N+(1-2) / N+(>=3): test accuracy {:.3} [{:.3}, {:.3}] on {} patients; confusion (rows true, columns predicted {}):",
        t3.accuracy.estimate,
        t3.accuracy.ci_low,
        t3.accuracy.ci_high,
        t3.n_test,
        t3.classes.join(" / ")
    );
    for (c, row) in t3.classes.iter().zip(&t3.confusion) {
        let _ = writeln!(s, "  {c:<5} {}", row.iter().map(|v| format!("{v:>4}")).collect::<String>());
    }
    if !r.leave_one_site_out.is_empty() {
        let _ = writeln!(s, "\nLeave-one-site-out (task 1; federated and SVM-fitted without the site, tested on all its patients):");
        for l in &r.leave_one_site_out {
            let _ = write!(s, "  held out {:<8} n={:<4}", l.held_out, l.n_test);
            for (m, a) in &l.methods {
                let _ = write!(s, "  {m} {}", a.map_or("n/a".into(), |a| format!("{:.3}", a.auc)));
            }
            let _ = writeln!(s);
        }
    }
    s
}
