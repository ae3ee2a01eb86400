//! The round state machine: what the federation is doing and what each site should do next.
//!
//! ```text
//! for each experiment of the study (main first, then the controls):
//!   Training(r) ──all participants, or quorum after timeout──► Aggregating(r) ──► Training(r+1) …
//!       └─ after the last round ──► CollectingFeatures (every site) ──► next experiment
//! after the last experiment ──► Evaluating ──► Done
//! ```
//!
//! The gRPC layer (`server`) only converts messages and calls into [`RoundController`]; all
//! decisions live here. Heavy work (aggregation, checkpointing, SVM fitting) runs on blocking
//! threads, never under the lock and never on the async runtime's workers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aln_common::aggregate::{self, Aggregator, Expectation, ModelUpdate, ServerOptState};
use aln_common::codec::Codec;
use aln_common::cohort::FeatureRow;
use aln_common::config::{CoordinatorConfig, TrainingPlan};
use aln_common::experiment::Experiment;
use aln_common::constants::DEFAULT_WAIT_MS;
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::model_state::{ModelState, TensorSpec};
use aln_common::wire::PayloadMeta;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::{error, info, info_span, warn};

use crate::audit::AuditLog;
use crate::report;
use crate::state::{Contribution, RoundRecord, RunState, STATE_FORMAT_VERSION, StateStore};
use crate::status::{CoordResult, CoordinatorError};

/// Where the run stands.
#[derive(Debug, Clone)]
pub enum Phase {
    Training { round: Round, opened: Instant },
    Aggregating { round: Round },
    CollectingFeatures { opened: Instant },
    Evaluating,
    Done,
    Failed(String),
}

/// The answer to a site's `NextTask`.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskDecision {
    Train { round: Round, total_rounds: u32, model_hash: ModelHash, plan: TrainingPlan, experiment: Experiment, mask_epoch: u32, participants: u32 },
    Extract { model_hash: ModelHash, experiment: Experiment },
    Wait { retry_after_ms: u32, reason: String },
    Done { summary: String },
}

/// What `/metrics` reports.
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    pub rounds_completed: usize,
    pub experiment: usize,
    pub round_open: u32,
    pub updates_accepted: usize,
    pub updates_rejected: usize,
    pub bytes_received: u64,
    pub sites: Vec<(String, bool)>,
    pub last_round_s: f64,
    pub last_aggregate_s: f64,
    pub last_checkpoint_s: f64,
    pub failed: bool,
}

/// What the site learns at `Join`.
#[derive(Debug, Clone)]
pub struct JoinInfo {
    pub run_id: String,
    pub plan: TrainingPlan,
    pub total_rounds: u32,
    /// The run's update codec (fp32, fp16, int8…, or ring32 under secure aggregation).
    pub codec: Codec,
}

/// Secure aggregation bookkeeping of the open round: who must mask, with which keys.
#[derive(Debug, Clone, Default)]
struct MaskRound {
    /// Masking attempt (0 first; +1 each time a dropout forces a redo).
    epoch: u32,
    /// Sites asked to take part in this attempt.
    expected: BTreeSet<SiteId>,
    keys: BTreeMap<SiteId, [u8; 32]>,
    /// The mask set, once fixed: every site in it must deliver for the masks to cancel.
    frozen: Option<Vec<(SiteId, [u8; 32])>>,
}

/// The answer to `PeerKeys`.
#[derive(Debug, Clone)]
pub enum PeerKeys {
    Ready(Vec<(SiteId, [u8; 32])>),
    NotYet(String),
    /// The asked-for attempt is over; ask NextTask again.
    Stale(String),
}

struct Inner {
    phase: Phase,
    run: RunState,
    global: Arc<ModelState>,
    aggregator: Option<Box<dyn Aggregator>>,
    contributions: Vec<Contribution>,
    rejected: Vec<String>,
    joined: BTreeSet<SiteId>,
    pending_features: BTreeMap<SiteId, Vec<FeatureRow>>,
    /// Features of the experiment in progress, per site.
    features: BTreeMap<SiteId, Vec<FeatureRow>>,
    /// Pooled features of every finished experiment.
    finished: BTreeMap<String, Vec<FeatureRow>>,
    told_done: BTreeSet<SiteId>,
    summary: String,
    quorum_warned: bool,
    /// FedAdam / FedYogi moments carried from round to round.
    server_state: Option<ServerOptState>,
    mask: MaskRound,
    /// Model bytes sent to sites in the open round.
    downlink_bytes: u64,
    /// The last round's checkpoint, being written in the background.
    pending_checkpoint: Option<std::thread::JoinHandle<()>>,
}

/// Owns the run: current model, open round, collected features.
pub struct RoundController {
    cfg: Arc<CoordinatorConfig>,
    store: StateStore,
    audit: AuditLog,
    experiments: Vec<Experiment>,
    /// Hash of the initial model (reloaded from disk for each new experiment, not kept in memory).
    initial_hash: ModelHash,
    schema: Arc<Vec<TensorSpec>>,
    inner: Mutex<Inner>,
    finished: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    /// Bumped whenever a site's next task may have changed (long-polling `NextTask`).
    changed: watch::Sender<u64>,
}

impl RoundController {
    /// Opens the state directory: resumes a saved run, or starts one from the initial model.
    pub fn open(cfg: Arc<CoordinatorConfig>) -> CoordResult<Arc<Self>> {
        let store = StateStore::new(&cfg.paths.state_dir);
        // Uploads that were arriving when the coordinator stopped are void: sites re-send.
        let _ = std::fs::remove_dir_all(store.spool_dir());
        let experiments = cfg.study.plan(&cfg.federation.sites);
        let plan: Vec<String> = experiments.iter().map(|e| e.id.clone()).collect();
        // The initial model is read here and again for each new experiment; only the current
        // global model stays in memory.
        let initial = Arc::new(ModelState::load(&cfg.paths.initial_model)?.0);
        let initial_hash = initial.weights_hash();
        let mut finished = BTreeMap::new();
        let (run, global) = match store.load()? {
            Some(run) => {
                if run.plan != plan {
                    return Err(CoordinatorError::Internal(format!(
                        "{} holds a run of the study {:?}, but the config now plans {:?}; use another state_dir",
                        store.dir().display(),
                        run.plan,
                        plan
                    )));
                }
                let exp = &plan[run.experiment.min(plan.len() - 1)];
                let model = Arc::new(store.load_model(exp, Round(run.completed_rounds), &run.global_model_hash)?);
                for done in &plan[..run.experiment] {
                    finished.insert(done.clone(), store.load_features(done)?);
                }
                info!(run_id = %run.run_id, experiment = %exp, completed_rounds = run.completed_rounds, "resuming run from {}", store.dir().display());
                (run, model)
            }
            None => {
                let hash = initial_hash.clone();
                let run = RunState {
                    format_version: STATE_FORMAT_VERSION,
                    run_id: new_run_id(&hash),
                    plan: plan.clone(),
                    experiment: 0,
                    completed_rounds: 0,
                    global_model_hash: hash,
                    schema_hash: initial.schema_hash(),
                    history: vec![],
                };
                store.save_model(&plan[0], Round(0), &initial, &run.run_id)?;
                store.save(&run)?;
                info!(run_id = %run.run_id, experiments = ?plan, tensors = initial.specs().len(), params = initial.numel(), "new run from {}", cfg.paths.initial_model.display());
                (run, initial.clone())
            }
        };
        let schema = Arc::new(global.specs().to_vec());
        if initial.specs() != global.specs() {
            return Err(CoordinatorError::Internal(format!("{} does not match the run's model schema", cfg.paths.initial_model.display())));
        }
        drop(initial);
        let (finished_tx, _) = watch::channel(false);
        let audit = AuditLog::open(store.dir()).map_err(|e| CoordinatorError::Internal(format!("{}: audit log: {e}", store.dir().display())))?;
        audit.record("coordinator_start", "coordinator", serde_json::json!({"run_id": run.run_id, "experiment": run.experiment, "completed_rounds": run.completed_rounds, "model_hash": run.global_model_hash.0}));
        let this = Arc::new(Self {
            schema,
            store,
            audit,
            experiments,
            initial_hash,
            inner: Mutex::new(Inner {
                phase: Phase::Evaluating,
                run,
                global,
                aggregator: None,
                contributions: vec![],
                rejected: vec![],
                joined: BTreeSet::new(),
                pending_features: BTreeMap::new(),
                features: BTreeMap::new(),
                finished,
                told_done: BTreeSet::new(),
                summary: String::new(),
                quorum_warned: false,
                server_state: None,
                mask: MaskRound::default(),
                downlink_bytes: 0,
                pending_checkpoint: None,
            }),
            finished: finished_tx,
            stop: watch::channel(false).0,
            changed: watch::channel(0).0,
            cfg,
        });
        {
            let mut g = this.lock();
            if g.run.experiment >= this.experiments.len() {
                // Every experiment's features are on disk: only the evaluation is missing.
                g.phase = Phase::CollectingFeatures { opened: Instant::now() };
            } else {
                if g.run.completed_rounds > 0 {
                    let exp = this.experiment(&g).id.clone();
                    g.server_state = this.store.load_server_state(&exp, Round(g.run.completed_rounds))?;
                }
                let next = Round(g.run.completed_rounds + 1);
                this.enter_round_or_features(&mut g, next);
            }
        }
        Ok(this)
    }

    /// The experiment in progress.
    fn experiment(&self, g: &Inner) -> &Experiment {
        &self.experiments[g.run.experiment.min(self.experiments.len() - 1)]
    }

    /// Sites that train in the experiment in progress.
    fn participants(&self, g: &Inner) -> usize {
        self.experiment(g).participants(&self.cfg.federation.sites).count()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The audit trail (the server records identity refusals and transfers through it).
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn store(&self) -> &StateStore {
        &self.store
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// Tensor table every update must match.
    pub fn schema(&self) -> Arc<Vec<TensorSpec>> {
        self.schema.clone()
    }

    /// Resolves when the run has finished (report written, or failed).
    pub fn finished(&self) -> watch::Receiver<bool> {
        self.finished.subscribe()
    }

    /// `Some(message)` when the run failed.
    pub fn failure(&self) -> Option<String> {
        match &self.lock().phase {
            Phase::Failed(m) => Some(m.clone()),
            _ => None,
        }
    }

    /// True once every site that joined has been told the run is over.
    pub fn all_sites_released(&self) -> bool {
        let g = self.lock();
        g.joined.iter().all(|s| g.told_done.contains(s))
    }

    /// Authorisation: is this certificate identity a member of the consortium?
    pub fn is_admitted(&self, site: &SiteId) -> bool {
        self.cfg.federation.sites.contains(site)
    }

    /// Wakes long-polling `NextTask` calls: something a site waits for may have changed.
    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that changes whenever a waiting site should ask again.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The codec every update of this run must use.
    pub fn update_codec(&self) -> Codec {
        if self.cfg.privacy.secure_aggregation { Codec::Ring32 } else { self.cfg.federation.update_codec }
    }

    fn new_aggregator(&self, g: &Inner, recycled: Option<Vec<f32>>) -> Box<dyn Aggregator> {
        aggregate::build(&self.cfg.aggregation, &self.cfg.privacy, &g.global, g.server_state.clone(), recycled)
    }

    fn enter_round_or_features(&self, g: &mut Inner, round: Round) {
        self.enter_round_reusing(g, round, None);
    }

    /// Opens `round` (or the feature collection), with `recycled` as the accumulator's buffer.
    fn enter_round_reusing(&self, g: &mut Inner, round: Round, recycled: Option<Vec<f32>>) {
        g.contributions.clear();
        g.rejected.clear();
        g.quorum_warned = false;
        g.downlink_bytes = 0;
        self.notify();
        if round.0 <= self.cfg.federation.rounds {
            g.aggregator = Some(self.new_aggregator(g, recycled));
            g.mask = MaskRound { epoch: 0, expected: self.experiment(g).participants(&self.cfg.federation.sites).cloned().collect(), ..Default::default() };
            g.phase = Phase::Training { round, opened: Instant::now() };
            info!(experiment = %self.experiment(g).id, %round, model = %g.run.global_model_hash.short(), "round open");
        } else {
            g.aggregator = None;
            g.features.clear();
            g.pending_features.clear();
            g.phase = Phase::CollectingFeatures { opened: Instant::now() };
            info!(experiment = %self.experiment(g).id, model = %g.run.global_model_hash.short(), "training complete; collecting features");
        }
    }

    pub fn join(&self, site: &SiteId) -> JoinInfo {
        let mut g = self.lock();
        if g.joined.insert(site.clone()) {
            info!(%site, "site joined");
        }
        self.audit.record("join", site.as_str(), serde_json::json!({"run_id": g.run.run_id}));
        JoinInfo { run_id: g.run.run_id.clone(), plan: self.cfg.training, total_rounds: self.cfg.federation.rounds, codec: self.update_codec() }
    }

    pub fn next_task(&self, site: &SiteId) -> TaskDecision {
        let mut g = self.lock();
        g.joined.insert(site.clone());
        let wait = |reason: &str| TaskDecision::Wait { retry_after_ms: DEFAULT_WAIT_MS, reason: reason.into() };
        match &g.phase {
            Phase::Training { round, .. } => {
                let experiment = self.experiment(&g);
                let secure = self.cfg.privacy.secure_aggregation;
                if !experiment.trains(site) {
                    wait("held out of this experiment's training")
                } else if g.contributions.iter().any(|c| &c.site == site) {
                    wait("waiting for the other sites' updates")
                } else if secure && !g.mask.expected.contains(site) {
                    wait("left out of this round's mask set (secure aggregation); waiting for the next round")
                } else if secure && g.mask.frozen.as_ref().is_some_and(|f| !f.iter().any(|(s, _)| s == site)) {
                    wait("this round's mask set was fixed without this site; waiting for the next round")
                } else {
                    TaskDecision::Train {
                        round: *round,
                        total_rounds: self.cfg.federation.rounds,
                        model_hash: g.run.global_model_hash.clone(),
                        plan: self.cfg.training,
                        experiment: experiment.clone(),
                        mask_epoch: g.mask.epoch,
                        participants: g.mask.expected.len() as u32,
                    }
                }
            }
            Phase::Aggregating { .. } => wait("aggregating"),
            Phase::CollectingFeatures { .. } => {
                if g.pending_checkpoint.as_ref().is_some_and(|h| !h.is_finished()) {
                    // Features come from the final model: let its checkpoint land first.
                    wait("writing the last round's checkpoint")
                } else if g.features.contains_key(site) || g.run.experiment >= self.experiments.len() {
                    wait("waiting for the other sites' features")
                } else {
                    TaskDecision::Extract { model_hash: g.run.global_model_hash.clone(), experiment: self.experiment(&g).clone() }
                }
            }
            Phase::Evaluating => wait("fitting the fusion SVM"),
            Phase::Done | Phase::Failed(_) => {
                let summary = match &g.phase {
                    Phase::Failed(m) => format!("run failed: {m}"),
                    _ => g.summary.clone(),
                };
                g.told_done.insert(site.clone());
                TaskDecision::Done { summary }
            }
        }
    }

    /// The current global model, if `hash` names it (empty = current).
    pub fn model_for_pull(&self, site: &SiteId, hash: &str) -> CoordResult<(Arc<ModelState>, PayloadMeta)> {
        let mut g = self.lock();
        self.audit.record("model_pull", site.as_str(), serde_json::json!({"requested": hash, "current_hash": g.run.global_model_hash.0}));
        if !hash.is_empty() && hash != g.run.global_model_hash.0 {
            return Err(CoordinatorError::ModelNotFound(hash.to_string()));
        }
        let meta = PayloadMeta::weights(Round(g.run.completed_rounds), g.run.global_model_hash.clone());
        g.downlink_bytes += g.global.byte_len() as u64;
        Ok((g.global.clone(), meta))
    }

    /// Refuses at once when no update from `site` can be accepted (no round open, held out,
    /// already sent, not in the mask set).
    fn expectation_locked(&self, g: &Inner, site: &SiteId) -> CoordResult<Expectation> {
        let round = match g.phase {
            Phase::Training { round, .. } => round,
            _ => return Err(CoordinatorError::WrongPhase("no round is open for updates (the update arrived too late or too early)".into())),
        };
        if !self.experiment(g).trains(site) {
            return Err(CoordinatorError::WrongPhase(format!("{site} is held out of experiment {}", self.experiment(g).id)));
        }
        if g.contributions.iter().any(|c| &c.site == site) {
            return Err(CoordinatorError::AlreadySubmitted { site: site.clone(), round });
        }
        if self.cfg.privacy.secure_aggregation && !g.mask.frozen.as_ref().is_some_and(|f| f.iter().any(|(s, _)| s == site)) {
            return Err(CoordinatorError::WrongPhase(format!("{site} is not in the mask set of round {round} attempt {}", g.mask.epoch)));
        }
        Ok(Expectation {
            global_hash: g.run.global_model_hash.clone(),
            round,
            max_sample_count: self.cfg.federation.max_sample_count,
            max_norm: self.cfg.federation.max_update_norm,
            codec: self.update_codec(),
            mask_epoch: g.mask.epoch,
            numel: g.global.numel(),
        })
    }

    /// What an upload from `site` must look like now, and where its chunks may be summed as
    /// they arrive (linear strategies of the open round) with their weighting; one lock, so
    /// both belong to the same round.
    pub fn upload_plan(&self, site: &SiteId) -> CoordResult<(Expectation, Option<aggregate::mean::StreamPlan>)> {
        let g = self.lock();
        let exp = self.expectation_locked(&g, site)?;
        Ok((exp, g.aggregator.as_ref().and_then(|a| a.stream_target())))
    }

    /// Checks a received update and folds it into the open round.
    pub fn submit_update(self: &Arc<Self>, update: ModelUpdate, bytes: u64, receive_s: f64) -> CoordResult<Round> {
        let span = info_span!("update", site = %update.site, round = %update.meta.round);
        let _e = span.enter();
        let outcome = {
            let mut g = self.lock();
            // The round may have moved on while the update streamed in: check again, now.
            let exp = self.expectation_locked(&g, &update.site)?;
            let round = exp.round;
            let (site, samples, base) = (update.site.clone(), update.sample_count(), update.meta.base_model_hash.clone());
            let t = Instant::now();
            let checked = aggregate::validate(&update, &exp).and_then(|_| g.aggregator.as_mut().expect("aggregator of an open round").accumulate(update));
            let accumulate_s = t.elapsed().as_secs_f64();
            match checked {
                Ok(()) => {
                    self.audit.record(
                        "update_accepted",
                        site.as_str(),
                        serde_json::json!({"experiment": self.experiment(&g).id, "round": round.0, "samples": samples, "bytes": bytes, "base_model_hash": base.0, "mask_epoch": exp.mask_epoch}),
                    );
                    g.contributions.push(Contribution { site: site.clone(), sample_count: samples, bytes, receive_s, accumulate_s });
                    info!(samples, bytes, receive_s, accumulate_s, "update accepted ({}/{})", g.contributions.len(), self.participants(&g));
                    Ok(round)
                }
                Err(e) => {
                    warn!("update rejected: {e}");
                    self.audit.record("update_rejected", site.as_str(), serde_json::json!({"round": round.0, "reason": e.to_string()}));
                    g.rejected.push(format!("{site}: {e}"));
                    Err(CoordinatorError::from(e))
                }
            }
        };
        if outcome.is_ok() {
            self.advance();
        }
        outcome
    }

    /// Secure aggregation: a site's public key for the open round's masking attempt.
    pub fn share_key(self: &Arc<Self>, site: &SiteId, experiment: &str, round: Round, epoch: u32, key: [u8; 32]) -> CoordResult<()> {
        let mut g = self.lock();
        if !self.cfg.privacy.secure_aggregation {
            return Err(CoordinatorError::WrongPhase("secure aggregation is off in this run".into()));
        }
        match g.phase {
            Phase::Training { round: open, .. } if open == round && epoch == g.mask.epoch && experiment == self.experiment(&g).id => {}
            _ => return Err(CoordinatorError::WrongPhase(format!("round {round} attempt {epoch} of {experiment} is not open for keys"))),
        }
        if !g.mask.expected.contains(site) {
            return Err(CoordinatorError::WrongPhase(format!("{site} is not expected in the mask set of round {round}")));
        }
        if let Some(frozen) = &g.mask.frozen {
            if frozen.iter().any(|(s, k)| s == site && *k == key) {
                return Ok(());
            }
            if frozen.iter().any(|(s, _)| s == site) {
                // A member lost its key (a restarted site-node): the masks made with the old
                // key can never be removed, so this attempt is void; start the next one now
                // with every member rather than waiting for the round timeout.
                let everyone: BTreeSet<SiteId> = frozen.iter().map(|(s, _)| s.clone()).collect();
                warn!(%site, %round, "a member of the mask set re-keyed; restarting the round's masking");
                self.next_mask_attempt(&mut g, round, everyone, site.as_str(), serde_json::json!("member re-keyed"));
                return Err(CoordinatorError::WrongPhase(format!("masking of round {round} restarted (attempt {}); ask for the next task", epoch + 1)));
            }
            return Err(CoordinatorError::WrongPhase(format!("the mask set of round {round} attempt {epoch} is already fixed")));
        }
        g.mask.keys.insert(site.clone(), key);
        self.audit.record("mask_key", site.as_str(), serde_json::json!({"round": round.0, "mask_epoch": epoch, "public_key": hex::encode(key)}));
        if g.mask.keys.len() == g.mask.expected.len() {
            self.freeze_mask_set(&mut g);
        }
        Ok(())
    }

    fn freeze_mask_set(&self, g: &mut Inner) {
        let set: Vec<(SiteId, [u8; 32])> = g.mask.keys.iter().map(|(s, k)| (s.clone(), *k)).collect();
        info!(epoch = g.mask.epoch, sites = ?set.iter().map(|(s, _)| s.to_string()).collect::<Vec<_>>(), "mask set fixed");
        g.mask.frozen = Some(set);
        self.notify();
    }

    /// Secure aggregation: the mask set's keys once fixed.
    pub fn peer_keys(&self, site: &SiteId, round: Round, epoch: u32) -> PeerKeys {
        let g = self.lock();
        match g.phase {
            Phase::Training { round: open, .. } if open == round && epoch == g.mask.epoch => {}
            _ => return PeerKeys::Stale(format!("round {round} attempt {epoch} is over")),
        }
        match &g.mask.frozen {
            Some(set) if set.iter().any(|(s, _)| s == site) => PeerKeys::Ready(set.clone()),
            Some(_) => PeerKeys::Stale("the mask set was fixed without this site".into()),
            None => PeerKeys::NotYet(format!("{} of {} keys", g.mask.keys.len(), g.mask.expected.len())),
        }
    }

    /// Records a site's rejected transfer (bad digest, malformed stream) in the round history.
    pub fn record_rejection(&self, site: &SiteId, reason: &str) {
        self.audit.record("transfer_rejected", site.as_str(), serde_json::json!({"reason": reason}));
        let mut g = self.lock();
        g.rejected.push(format!("{site}: {reason}"));
    }

    /// Adds a batch of feature rows (already converted and checked by the server).
    pub fn submit_features(self: &Arc<Self>, site: &SiteId, experiment: &str, rows: Vec<FeatureRow>, batch_index: u32, last: bool) -> CoordResult<usize> {
        let n = {
            let mut g = self.lock();
            if !matches!(g.phase, Phase::CollectingFeatures { .. }) || g.run.experiment >= self.experiments.len() {
                return Err(CoordinatorError::WrongPhase("features are not being collected now".into()));
            }
            if experiment != self.experiment(&g).id {
                return Err(CoordinatorError::WrongPhase(format!("features for experiment {experiment:?} arrived while {:?} is collecting", self.experiment(&g).id)));
            }
            if g.features.contains_key(site) {
                return Err(CoordinatorError::WrongPhase(format!("features of {site} were already received")));
            }
            let pending = g.pending_features.entry(site.clone()).or_default();
            if batch_index == 0 {
                pending.clear();
            }
            pending.extend(rows);
            let n = pending.len();
            if last {
                let rows = g.pending_features.remove(site).unwrap_or_default();
                info!(%site, rows = rows.len(), "features received");
                self.audit.record("features_received", site.as_str(), serde_json::json!({"experiment": experiment, "rows": rows.len()}));
                g.features.insert(site.clone(), rows);
            }
            n
        };
        if last {
            self.advance();
        }
        Ok(n)
    }

    /// Closes a round or the feature collection when its condition holds; call after every
    /// accepted submission and periodically (timeouts).
    pub fn advance(self: &Arc<Self>) {
        // Features are collected after the last round: its checkpoint must be on disk before
        // round_state.json moves on to the next experiment (joined without holding the lock).
        if matches!(self.lock().phase, Phase::CollectingFeatures { .. }) {
            self.flush_checkpoints();
        }
        let fed = &self.cfg.federation;
        let timeout = Duration::from_secs(fed.round_timeout_secs);
        let mut g = self.lock();
        match g.phase {
            Phase::Training { round, opened } => {
                let n = g.contributions.len();
                let participants = self.participants(&g);
                let timed_out = opened.elapsed() >= timeout;
                let secure = self.cfg.privacy.secure_aggregation;
                // Masks cancel only over the whole mask set: a secure round closes when every
                // member delivered, never on a partial quorum.
                let complete = if secure { g.mask.frozen.as_ref().is_some_and(|f| n == f.len()) } else { n == participants };
                let quorum = !secure && timed_out && n >= fed.min_sites.min(participants);
                if secure && !complete && timed_out && self.restart_masking(&mut g, round) {
                    return;
                }
                if complete || quorum {
                    let aggregator = g.aggregator.take().expect("aggregator of an open round");
                    let global = g.global.clone();
                    g.phase = Phase::Aggregating { round };
                    drop(g);
                    let this = self.clone();
                    tokio::task::spawn_blocking(move || this.close_round(round, aggregator, global, opened));
                } else if opened.elapsed() >= Duration::from_secs(fed.give_up_after_secs()) {
                    let msg = format!(
                        "experiment {} round {round}: only {n} of the {} required updates after {} s; no quorum",
                        self.experiment(&g).id,
                        fed.min_sites.min(participants),
                        fed.give_up_after_secs()
                    );
                    drop(g);
                    self.fail(msg);
                } else if timed_out && !g.quorum_warned {
                    g.quorum_warned = true;
                    warn!(%round, have = n, need = fed.min_sites, give_up_after_s = fed.give_up_after_secs(), "round timeout passed without quorum; still waiting");
                }
            }
            Phase::CollectingFeatures { opened } => {
                if g.pending_checkpoint.is_some() {
                    // A checkpoint is still being written (joined at the top of the next call).
                    return;
                }
                let all_done = g.run.experiment >= self.experiments.len();
                let n = g.features.len();
                let collected = n == fed.sites.len() || (opened.elapsed() >= timeout && n >= fed.min_sites);
                if !(all_done || collected) {
                    if opened.elapsed() >= Duration::from_secs(fed.give_up_after_secs()) {
                        let msg = format!("experiment {}: features from only {n} of {} sites after {} s", self.experiment(&g).id, fed.min_sites, fed.give_up_after_secs());
                        drop(g);
                        self.fail(msg);
                    }
                    return;
                }
                if !all_done {
                    let id = self.experiment(&g).id.clone();
                    let rows: Vec<FeatureRow> = std::mem::take(&mut g.features).into_values().flatten().collect();
                    if let Err(e) = self.store.save_features(&id, &rows) {
                        drop(g);
                        return self.fail(format!("saving features of {id} failed: {e}"));
                    }
                    info!(experiment = %id, rows = rows.len(), "experiment complete");
                    g.finished.insert(id, rows);
                    if let Err(e) = self.start_next_experiment(&mut g) {
                        drop(g);
                        return self.fail(format!("starting the next experiment failed: {e}"));
                    }
                    if g.run.experiment < self.experiments.len() {
                        return;
                    }
                }
                g.phase = Phase::Evaluating;
                let features = g.finished.clone();
                let run = g.run.clone();
                drop(g);
                let this = self.clone();
                tokio::task::spawn_blocking(move || this.evaluate(features, run));
            }
            _ => {}
        }
    }

    /// Secure aggregation after the round timeout: fix the mask set with the keys present, or,
    /// when a member of a fixed set has not delivered, redo the masking without the missing
    /// sites (their masks can never be removed). False when too few sites are left.
    fn restart_masking(&self, g: &mut Inner, round: Round) -> bool {
        let need = self.cfg.federation.min_sites.min(self.participants(g));
        let delivered: BTreeSet<SiteId> = g.contributions.iter().map(|c| c.site.clone()).collect();
        let next_expected = match &g.mask.frozen {
            None if g.mask.keys.len() >= need => {
                g.mask.expected = g.mask.keys.keys().cloned().collect();
                self.freeze_mask_set(g);
                g.phase = Phase::Training { round, opened: Instant::now() };
                return true;
            }
            None => return false,
            Some(_) if delivered.len() >= need => delivered,
            Some(_) => return false,
        };
        let missing: Vec<String> = g.mask.frozen.iter().flatten().filter(|(s, _)| !next_expected.contains(s)).map(|(s, _)| s.to_string()).collect();
        warn!(%round, epoch = g.mask.epoch + 1, ?missing, "masked updates missing after the timeout: their masks cannot be removed; redoing this round's masking without them");
        g.rejected.push(format!("masking attempt {} dropped: no update from {}", g.mask.epoch, missing.join(", ")));
        self.next_mask_attempt(g, round, next_expected, "coordinator", serde_json::json!({"missing": missing}));
        true
    }

    /// Voids the round's masking attempt: every update of it is dropped and `expected` sites
    /// start the next attempt with fresh keys (and retrain from the same model).
    fn next_mask_attempt(&self, g: &mut Inner, round: Round, expected: BTreeSet<SiteId>, who: &str, why: serde_json::Value) {
        let epoch = g.mask.epoch + 1;
        self.audit.record("mask_restart", who, serde_json::json!({"round": round.0, "epoch": epoch, "why": why}));
        g.mask = MaskRound { epoch, expected, ..Default::default() };
        g.contributions.clear();
        g.aggregator = Some(self.new_aggregator(g, None));
        g.phase = Phase::Training { round, opened: Instant::now() };
        self.notify();
    }

    /// Moves to the next experiment (from the initial model) or marks the study complete.
    fn start_next_experiment(&self, g: &mut Inner) -> CoordResult<()> {
        let mut run = g.run.clone();
        run.experiment += 1;
        run.completed_rounds = 0;
        if let Some(next) = self.experiments.get(run.experiment) {
            let initial = ModelState::load(&self.cfg.paths.initial_model)?.0;
            if initial.weights_hash() != self.initial_hash {
                return Err(CoordinatorError::Internal(format!("{} changed during the run", self.cfg.paths.initial_model.display())));
            }
            run.global_model_hash = self.initial_hash.clone();
            self.store.save_model(&next.id, Round(0), &initial, &run.run_id)?;
            self.store.save(&run)?;
            g.run = run;
            g.global = Arc::new(initial);
            g.server_state = None;
            self.enter_round_or_features(g, Round(1));
        } else {
            self.store.save(&run)?;
            g.run = run;
        }
        Ok(())
    }

    fn close_round(self: Arc<Self>, round: Round, aggregator: Box<dyn Aggregator>, global: Arc<ModelState>, opened: Instant) {
        let span = info_span!("round", %round);
        let _e = span.enter();
        let duration_s = opened.elapsed().as_secs_f64();
        let t = Instant::now();
        let result = aggregator.finish(&global);
        drop(global);
        let aggregate_s = t.elapsed().as_secs_f64();
        let agg = match result {
            Ok(m) => m,
            Err(e) => return self.fail(format!("aggregation of round {round} failed: {e}")),
        };
        let next = agg.model;
        let t = Instant::now();
        let hash = next.weights_hash();
        let hash_s = t.elapsed().as_secs_f64();
        let mut g = self.lock();
        let experiment = self.experiment(&g).id.clone();
        let record = RoundRecord {
            experiment: experiment.clone(),
            round,
            model_hash: hash.clone(),
            contributors: g.contributions.clone(),
            rejected: g.rejected.clone(),
            duration_s,
            aggregate_s: aggregate_s + hash_s,
            checkpoint_s: 0.0,
            uplink_bytes: g.contributions.iter().map(|c| c.bytes).sum(),
            downlink_bytes: g.downlink_bytes,
            mask_epochs: g.mask.epoch + 1,
            clipped: agg.clipped,
            noise_std: agg.noise_std,
        };
        let mut run = g.run.clone();
        run.completed_rounds = round.0;
        run.global_model_hash = hash.clone();
        run.history.push(record);
        g.run = run.clone();
        let old_global = std::mem::replace(&mut g.global, Arc::new(next));
        // The previous model's buffer becomes the next round's accumulator (unless a download
        // still holds it): no fresh 100 MB mapping per round.
        g.server_state = agg.server_state.clone();
        // The checkpoint is written off the round's critical path: the next round opens now
        // with the new model in memory, and round_state.json only says the round is complete
        // once its model is on disk (a crash before that resumes from the previous round).
        // Checkpoints run one at a time, in round order.
        let previous = g.pending_checkpoint.take();
        let (this, model, server_state) = (self.clone(), g.global.clone(), agg.server_state);
        g.pending_checkpoint = Some(std::thread::spawn(move || {
            if let Some(p) = previous {
                let _ = p.join();
            }
            let t = Instant::now();
            let written = this
                .store
                .save_model(&experiment, round, &model, &run.run_id)
                .and_then(|_| server_state.as_ref().map_or(Ok(()), |s| this.store.save_server_state(&experiment, round, &model, s)));
            drop(model);
            let checkpoint_s = t.elapsed().as_secs_f64();
            if let Some(last) = run.history.last_mut() {
                last.checkpoint_s = checkpoint_s;
            }
            if let Err(e) = written.and_then(|_| this.store.save(&run)) {
                return this.fail(format!("checkpoint of {experiment} round {round} failed: {e}"));
            }
            let mut g = this.lock();
            if let Some(r) = g.run.history.iter_mut().rev().find(|h| h.experiment == experiment && h.round == round) {
                r.checkpoint_s = checkpoint_s;
            }
            drop(g);
            info!(%round, checkpoint_s, "checkpoint written");
            this.notify();
        }));
        self.audit.record(
            "model_version",
            "coordinator",
            serde_json::json!({"experiment": self.experiment(&g).id, "round": round.0, "model_hash": hash.0, "contributors": g.contributions.iter().map(|c| c.site.to_string()).collect::<Vec<_>>()}),
        );
        info!(model = %hash.short(), sites = g.contributions.len(), duration_s, aggregate_s, hash_s, "round complete");
        let recycled = Arc::try_unwrap(old_global).ok().map(ModelState::into_data);
        self.enter_round_reusing(&mut g, Round(round.0 + 1), recycled);
    }

    /// Waits for the checkpoint in flight, if any (before other writes of round_state.json,
    /// and at shutdown).
    pub fn flush_checkpoints(&self) {
        let pending = self.lock().pending_checkpoint.take();
        if let Some(p) = pending {
            let _ = p.join();
        }
    }

    fn evaluate(self: Arc<Self>, features: BTreeMap<String, Vec<FeatureRow>>, run: RunState) {
        let span = info_span!("evaluation", experiments = features.len());
        let _e = span.enter();
        match report::build_and_write(&self.cfg, &self.store, &run, &self.experiments, &features) {
            Ok(summary) => {
                let mut g = self.lock();
                g.summary = summary;
                g.phase = Phase::Done;
                info!("report written to {}", self.store.dir().display());
                drop(g);
                self.notify();
                let _ = self.finished.send(true);
            }
            Err(e) => self.fail(format!("evaluation failed: {e:#}")),
        }
    }

    fn fail(&self, message: String) {
        error!("{message}");
        self.audit.record("run_failed", "coordinator", serde_json::json!({"reason": message}));
        self.lock().phase = Phase::Failed(message);
        self.notify();
        let _ = self.finished.send(true);
    }

    /// The results table of a finished run (empty before).
    pub fn summary(&self) -> String {
        self.lock().summary.clone()
    }

    /// An operator asked the coordinator to stop (Admin.Stop).
    pub fn request_stop(&self, who: &str, reason: &str) {
        warn!(%who, %reason, "stop requested by an admin");
        self.audit.record("admin_stop", who, serde_json::json!({"reason": reason}));
        let _ = self.stop.send(true);
    }

    /// Resolves to `true` once a stop was requested.
    pub fn stop_requested(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Numbers for the `/metrics` endpoint.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let g = self.lock();
        let last = g.run.history.last();
        MetricsSnapshot {
            rounds_completed: g.run.history.len(),
            experiment: g.run.experiment,
            round_open: match g.phase {
                Phase::Training { round, .. } | Phase::Aggregating { round } => round.0,
                _ => 0,
            },
            updates_accepted: g.run.history.iter().map(|h| h.contributors.len()).sum::<usize>() + g.contributions.len(),
            updates_rejected: g.run.history.iter().map(|h| h.rejected.len()).sum::<usize>() + g.rejected.len(),
            bytes_received: g.run.history.iter().flat_map(|h| &h.contributors).chain(&g.contributions).map(|c| c.bytes).sum(),
            sites: self.cfg.federation.sites.iter().map(|s| (s.to_string(), g.joined.contains(s))).collect(),
            last_round_s: last.map_or(0.0, |h| h.duration_s),
            last_aggregate_s: last.map_or(0.0, |h| h.aggregate_s),
            last_checkpoint_s: last.map_or(0.0, |h| h.checkpoint_s),
            failed: matches!(g.phase, Phase::Failed(_)),
        }
    }

    /// The run's state for `coordinator status`.
    pub fn status_json(&self) -> serde_json::Value {
        let progress = self.describe();
        let g = self.lock();
        serde_json::json!({
            "run_id": g.run.run_id,
            "progress": progress,
            "experiments": g.run.plan,
            "experiment_index": g.run.experiment,
            "completed_rounds_in_experiment": g.run.completed_rounds,
            "rounds_per_experiment": self.cfg.federation.rounds,
            "global_model_hash": g.run.global_model_hash.0,
            "sites_configured": self.cfg.federation.sites,
            "sites_joined": g.joined,
            "updates_this_round": g.contributions.iter().map(|c| c.site.to_string()).collect::<Vec<_>>(),
            "rejected_this_round": g.rejected,
            "rounds_completed_total": g.run.history.len(),
            "failed": matches!(g.phase, Phase::Failed(_)),
        })
    }

    /// A snapshot for logs and the demo's progress lines.
    pub fn describe(&self) -> String {
        let g = self.lock();
        match &g.phase {
            Phase::Training { round, .. } => format!(
                "{}: round {round}/{}: {}/{} updates",
                self.experiment(&g).id,
                self.cfg.federation.rounds,
                g.contributions.len(),
                self.participants(&g)
            ),
            Phase::Aggregating { round } => format!("{}: round {round}: aggregating", self.experiment(&g).id),
            Phase::CollectingFeatures { .. } => format!("{}: features {}/{} sites", self.experiment(&g).id, g.features.len(), self.cfg.federation.sites.len()),
            Phase::Evaluating => "evaluating".into(),
            Phase::Done => "done".into(),
            Phase::Failed(m) => format!("failed: {m}"),
        }
    }
}

fn new_run_id(initial: &ModelHash) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut h = Sha256::new();
    h.update(initial.0.as_bytes());
    h.update(now.as_nanos().to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    hex::encode(&h.finalize()[..8])
}
