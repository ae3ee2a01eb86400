//! The site's session with the coordinator: connect over mTLS, join, then follow the
//! coordinator's tasks (train / extract / wait / done) until the run is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aln_common::cohort::{ManifestRow, Split};
use tch::Device;
use aln_common::config::{SiteConfig, TrainingPlan};
use aln_common::experiment::Experiment;
use aln_common::constants::{FEATURE_ROWS_PER_BATCH, MAX_GRPC_MESSAGE_BYTES, local_update_file};
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::model_state::ModelState;
use aln_common::wire::{ChunkEncoder, PayloadKind, PayloadMeta, ReceiveLimits, Reassembler};
use aln_proto::{self as pb, PROTO_VERSION, federation_client::FederationClient};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};
use tracing::{error, info, info_span, warn, Instrument};

use crate::data::SiteData;
use crate::model::BimodalNet;
use crate::{gradcam, train};

/// Tries per model transfer before a task fails.
const TRANSFER_ATTEMPTS: u32 = 3;

/// Transfer failures worth re-sending: the network or the stream broke, not a refusal.
fn transient(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(s.code(), Code::Unavailable | Code::Aborted | Code::DataLoss | Code::Cancelled | Code::Unknown | Code::DeadlineExceeded)
}

/// Whether an error came from a broken connection rather than a refusal.
fn is_transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<tonic::Status>().is_some_and(transient) || c.downcast_ref::<tonic::transport::Error>().is_some())
}

/// One round's instructions from a train task.
struct TrainJob {
    round: u32,
    total_rounds: u32,
    hash: ModelHash,
    plan: TrainingPlan,
    experiment: Experiment,
}

/// The network (built from the first global model received), lent to blocking threads.
struct Slot {
    device: Device,
    net: Option<BimodalNet>,
}

impl Slot {
    /// The network, created with the global model's shapes on first use.
    fn get(&mut self, global: &ModelState) -> Result<&mut BimodalNet> {
        if self.net.is_none() {
            self.net = Some(BimodalNet::from_state(self.device, global)?);
        }
        Ok(self.net.as_mut().expect("just set"))
    }
}

type SharedNet = Arc<Mutex<Slot>>;

/// How the session reaches the coordinator.
pub struct Session {
    client: FederationClient<Channel>,
    cfg: SiteConfig,
    /// How long to ride out a coordinator outage (restart, network) before giving up.
    patience: Duration,
}

/// Per-round timings the site keeps in `work_dir/timings.jsonl`.
#[derive(Debug, Serialize)]
struct RoundTiming {
    experiment: String,
    round: u32,
    pull_s: f64,
    train_s: f64,
    push_s: f64,
    bytes_sent: u64,
    mean_loss: f64,
}

impl Session {
    /// Connects with exponential backoff (up to `patience`), mTLS only.
    pub async fn connect(cfg: SiteConfig, patience: Duration) -> Result<Self> {
        let tls = cfg.tls.client_config(&cfg.site.server_name)?;
        let endpoint = Endpoint::from_shared(cfg.site.coordinator.clone())
            .with_context(|| format!("site.coordinator {:?} is not a valid URL", cfg.site.coordinator))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Some(Duration::from_secs(30)));
        let started = Instant::now();
        let mut delay = Duration::from_millis(200);
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(e) if started.elapsed() < patience => {
                    warn!("coordinator not reachable yet ({e}); retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(anyhow!(e).context(format!("cannot reach the coordinator at {}", cfg.site.coordinator))),
            }
        };
        let client = FederationClient::new(channel)
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        Ok(Self { client, cfg, patience })
    }

    /// Follows the coordinator's tasks until it says the run is done.
    /// Joins, loads the local crops at the plan's image size, then follows the coordinator's
    /// tasks until it says the run is done. Returns the coordinator's closing summary.
    pub async fn run(mut self, device: Device, rows: Vec<ManifestRow>) -> Result<String> {
        let net: SharedNet = Arc::new(Mutex::new(Slot { device, net: None }));
        let train_n = rows.iter().filter(|r| r.split == Some(Split::Train)).count() as u64;
        let total_n = rows.len() as u64;
        let joined = self
            .client
            .join(pb::JoinRequest {
                proto_version: PROTO_VERSION.into(),
                software_version: env!("CARGO_PKG_VERSION").into(),
                train_patients: train_n,
                total_patients: total_n,
            })
            .await
            .context("join refused")?
            .into_inner();
        let site = SiteId::new(joined.site_id.clone())?;
        info!(%site, run = %joined.run_id, rounds = joined.total_rounds, "joined the federation");
        let image_size = joined.plan.as_ref().map_or(64, |p| p.image_size);
        let t = Instant::now();
        let data = Arc::new(tokio::task::spawn_blocking(move || SiteData::load(rows, image_size)).await??);
        info!(patients = data.len(), image_size, load_s = format!("{:.2}", t.elapsed().as_secs_f64()), "ROI crops prepared");
        let site_seed = site.as_str().bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let updates_dir = self.cfg.site.work_dir.join("updates");
        let mut failures = 0;
        let mut outage: Option<Instant> = None;
        loop {
            let task = match self.client.next_task(pb::TaskRequest {}).await {
                Ok(t) => {
                    if let Some(since) = outage.take() {
                        info!(down_s = format!("{:.1}", since.elapsed().as_secs_f64()), "coordinator reachable again; continuing");
                    }
                    t.into_inner()
                }
                Err(s) if transient(&s) => {
                    let since = *outage.get_or_insert_with(Instant::now);
                    if since.elapsed() > self.patience {
                        bail!("coordinator unreachable for {:?}: {} ({:?})", self.patience, s.message(), s.code());
                    }
                    let wait = Duration::from_millis(250).saturating_mul(1 << since.elapsed().as_secs().min(4)).min(Duration::from_secs(5));
                    warn!("coordinator unreachable ({:?}: {}); retrying in {wait:?}", s.code(), s.message());
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Err(s) => return Err(anyhow!(s).context("asking for the next task")),
            };
            use pb::task::Kind;
            let result = match task.kind {
                Some(Kind::Train(t)) => {
                    let plan = plan_from_proto(t.plan.as_ref().ok_or_else(|| anyhow!("train task without a plan"))?);
                    let experiment = Experiment::try_from(t.experiment.clone().unwrap_or_default())?;
                    let span = info_span!("round", experiment = %experiment.id, round = t.round, %site);
                    let job = TrainJob { round: t.round, total_rounds: t.total_rounds, hash: ModelHash(t.model_hash), plan, experiment };
                    self.train_round(&data, &net, job, site_seed, &updates_dir).instrument(span).await
                }
                Some(Kind::Extract(e)) => {
                    let experiment = Experiment::try_from(e.experiment.unwrap_or_default())?;
                    self.extract(&data, &net, &site, ModelHash(e.model_hash), &experiment).await
                }
                Some(Kind::Wait(w)) => {
                    tokio::time::sleep(Duration::from_millis(u64::from(w.retry_after_ms.max(50)))).await;
                    Ok(())
                }
                Some(Kind::Done(d)) => {
                    info!("coordinator reports the run is done");
                    return Ok(d.summary);
                }
                None => bail!("coordinator sent an empty task"),
            };
            match result {
                Ok(()) => failures = 0,
                // The coordinator went away mid-task: ask again once it is back (above).
                Err(e) if is_transient(&e) => warn!("task interrupted by a coordinator outage: {e:#}"),
                Err(e) => {
                    failures += 1;
                    error!("task failed ({failures}/3): {e:#}");
                    if failures >= 3 {
                        return Err(e.context("three tasks in a row failed"));
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Downloads a model, re-trying a broken transfer.
    async fn pull(&mut self, hash: &ModelHash) -> Result<ModelState> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.pull_once(hash).await {
                Ok(m) => return Ok(m),
                Err(e) if attempt < TRANSFER_ATTEMPTS => {
                    warn!(attempt, "model download failed ({e:#}); retrying");
                    tokio::time::sleep(Duration::from_millis(500 * attempt as u64)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn pull_once(&mut self, hash: &ModelHash) -> Result<ModelState> {
        let mut stream = self
            .client
            .pull_model(pb::PullRequest { model_hash: hash.0.clone(), max_chunk_bytes: 0 })
            .await
            .context("pulling the global model")?
            .into_inner();
        let mut r = Reassembler::new(ReceiveLimits::default());
        let mut payload = None;
        while let Some(chunk) = stream.message().await.context("model download broke off")? {
            if let Some(p) = r.push(chunk)? {
                payload = Some(p);
            }
        }
        r.finish()?;
        let p = payload.ok_or_else(|| anyhow!("empty model stream"))?;
        if &p.digest != hash {
            bail!("received model {} but asked for {}", p.digest.short(), hash.short());
        }
        Ok(p.state)
    }

    async fn train_round(&mut self, data: &Arc<SiteData>, net: &SharedNet, job: TrainJob, site_seed: u64, updates_dir: &std::path::Path) -> Result<()> {
        let TrainJob { round, total_rounds, hash, plan, experiment } = job;
        let t = Instant::now();
        let global = self.pull(&hash).await?;
        let pull_s = t.elapsed().as_secs_f64();
        info!(model = %hash.short(), pull_s = format!("{pull_s:.2}"), "training round {round} from the global model");
        let outcome = {
            let data = data.clone();
            let global = global.clone();
            let net = net.clone();
            let experiment = experiment.clone();
            tokio::task::spawn_blocking(move || {
                let mut slot = net.lock().unwrap_or_else(|p| p.into_inner());
                let job = train::LocalRound { plan: &plan, experiment: &experiment, round, total_rounds, site_seed };
                train::train_round(slot.get(&global)?, &data, &global, &job)
            })
            .await??
        };
        // Keep what we send, for audit (and for the end-to-end test to recompute FedAvg).
        let meta = HashMap::from([
            ("round".to_string(), round.to_string()),
            ("base_model_hash".to_string(), hash.0.clone()),
            ("sample_count".to_string(), outcome.sample_count.to_string()),
            ("kind".to_string(), "delta".to_string()),
            ("experiment".to_string(), experiment.id.clone()),
        ]);
        let delta = Arc::new(outcome.delta);
        {
            let delta = delta.clone();
            let path = updates_dir.join(&experiment.id).join(local_update_file(round));
            tokio::task::spawn_blocking(move || delta.save(&path, &meta)).await??;
        }
        let t = Instant::now();
        let meta = PayloadMeta { kind: PayloadKind::Delta, round: Round(round), base_model_hash: hash, sample_count: outcome.sample_count };
        let bytes_sent = delta.byte_len() as u64;
        // A broken transfer is re-sent (the same delta, no retraining); a refusal is final.
        let mut attempt = 0;
        let ack = loop {
            attempt += 1;
            let bar = aln_common::progress::transfer(bytes_sent, "upload");
            let shown = bar.clone();
            let encoder = ChunkEncoder::new(delta.clone(), meta.clone(), 0).inspect(move |c| {
                if let Some(pb::model_chunk::Part::Tensor(t)) = &c.part {
                    shown.inc(t.data.len() as u64);
                }
            });
            let sent = self.client.push_update(tokio_stream::iter(encoder)).await;
            bar.finish_and_clear();
            match sent {
                Ok(ack) => break ack.into_inner(),
                Err(s) if attempt < TRANSFER_ATTEMPTS && transient(&s) => {
                    warn!(attempt, "upload of round {round} broke off ({:?}: {}); re-sending", s.code(), s.message());
                    tokio::time::sleep(Duration::from_millis(500 * attempt as u64)).await;
                }
                Err(s) if transient(&s) => return Err(anyhow!(s).context(format!("uploading the update for round {round}"))),
                Err(s) => bail!("update for round {round} refused: {} ({:?})", s.message(), s.code()),
            }
        };
        let push_s = t.elapsed().as_secs_f64();
        info!(
            train_s = format!("{:.2}", outcome.train_s),
            push_s = format!("{push_s:.2}"),
            bytes = bytes_sent,
            loss = format!("{:.4}", outcome.mean_loss),
            "{}",
            ack.message
        );
        let timing = RoundTiming { experiment: experiment.id.clone(), round, pull_s, train_s: outcome.train_s, push_s, bytes_sent, mean_loss: outcome.mean_loss };
        append_jsonl(&self.cfg.site.work_dir.join("timings.jsonl"), &timing)?;
        Ok(())
    }

    async fn extract(&mut self, data: &Arc<SiteData>, net: &SharedNet, site: &SiteId, hash: ModelHash, experiment: &Experiment) -> Result<()> {
        let global = self.pull(&hash).await?;
        let t = Instant::now();
        let rows = {
            let data = data.clone();
            let site = site.clone();
            let net = net.clone();
            let experiment = experiment.clone();
            let cam_dir = self.cfg.site.work_dir.join("gradcam");
            tokio::task::spawn_blocking(move || -> Result<_> {
                let mut slot = net.lock().unwrap_or_else(|p| p.into_inner());
                let net = slot.get(&global)?;
                let rows = train::extract_features(net, &data, &global, &experiment, &site, 32)?;
                // Grad-CAM of the paper's model only; kept locally, shared on opt-in.
                let overlays = if experiment.id == aln_common::experiment::MAIN {
                    let o = gradcam::overlays(net, &data, &experiment)?;
                    gradcam::save_locally(&cam_dir, &o)?;
                    o
                } else {
                    vec![]
                };
                Ok((rows, overlays))
            })
            .await??
        };
        let (rows, overlays) = rows;
        if !overlays.is_empty() {
            info!(overlays = overlays.len(), shared = self.cfg.site.share_gradcam, "Grad-CAM overlays written to {}", self.cfg.site.work_dir.join("gradcam").display());
        }
        let gradcams: Vec<pb::GradCam> = if self.cfg.site.share_gradcam {
            overlays
                .into_iter()
                .map(|o| pb::GradCam {
                    patient_id: o.patient_id,
                    n_stage: pb::NStage::from(o.n_stage) as i32,
                    modality: o.modality.to_string(),
                    png: o.png,
                })
                .collect()
        } else {
            vec![]
        };
        info!(experiment = %experiment.id, patients = rows.len(), extract_s = format!("{:.2}", t.elapsed().as_secs_f64()), "deep features extracted");
        let batches: Vec<_> = rows.chunks(FEATURE_ROWS_PER_BATCH).collect();
        for (i, chunk) in batches.iter().enumerate() {
            self.client
                .submit_features(pb::FeatureBatch {
                    model_hash: hash.0.clone(),
                    rows: chunk.iter().map(pb::FeatureRow::from).collect(),
                    last: i + 1 == batches.len(),
                    batch_index: i as u32,
                    experiment: experiment.id.clone(),
                    gradcams: if i + 1 == batches.len() { gradcams.clone() } else { vec![] },
                })
                .await
                .map_err(|s| if transient(&s) { anyhow!(s).context("sending features") } else { anyhow!("features refused: {} ({:?})", s.message(), s.code()) })?;
        }
        info!(rows = rows.len(), "features sent");
        Ok(())
    }
}

fn plan_from_proto(p: &pb::TrainingPlan) -> TrainingPlan {
    TrainingPlan { local_steps: p.local_steps, batch_size: p.batch_size, learning_rate: p.learning_rate, image_size: p.image_size, seed: p.seed }
}

fn append_jsonl<T: Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(f, "{}", serde_json::to_string(value)?)?;
    Ok(())
}
