//! The site's session with the coordinator: connect over mTLS, join, then follow the
//! coordinator's tasks (train / extract / wait / done) until the run is over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aln_common::cohort::{ManifestRow, Split};
use tch::Device;
use aln_common::config::{SiteConfig, TrainingPlan};
use aln_common::experiment::Experiment;
use aln_common::constants::{BN_RECALIBRATION_BATCHES, DEFAULT_WAIT_MS, SITE_HTTP2_CONNECTION_WINDOW_BYTES, SITE_HTTP2_STREAM_WINDOW_BYTES, FEATURE_ROWS_PER_BATCH, MAX_GRPC_MESSAGE_BYTES, local_update_file};
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::model_state::ModelState;
use aln_common::codec::{Codec, Encoded, ErrorFeedback, SUPPORTED_CODECS, ring_encode};
use aln_common::privacy::secagg::{MaskContext, MaskingKey};
use aln_common::privacy::{DpMode, dp};
use aln_common::wire::{ChunkEncoder, PayloadMeta, ReceiveLimits, Reassembler};
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
    mask_epoch: u32,
}

/// An update ready to send: the (possibly noised) delta, its encoding if not fp32, and the
/// error-feedback residual to keep once it is accepted.
type Prepared = (Arc<ModelState>, Option<Encoded>, Option<(ErrorFeedback, std::path::PathBuf)>);

/// How this run's updates are made, as decided by the coordinator at `Join`.
#[derive(Debug, Clone)]
struct Protocol {
    codec: Codec,
    dp: DpMode,
    clip_norm: f64,
    noise_multiplier: f64,
    secure_aggregation: bool,
    ring_fraction_bits: u32,
    proximal_mu: f64,
}

impl Protocol {
    fn from_proto(p: Option<pb::UpdateProtocol>) -> Result<Self> {
        let p = p.unwrap_or_default();
        let codec = if p.codec == 0 { Codec::F32 } else { Codec::from_proto(p.codec)? };
        Ok(Self {
            codec,
            dp: DpMode::from_proto(p.dp_mode),
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            secure_aggregation: p.secure_aggregation,
            ring_fraction_bits: p.ring_fraction_bits,
            proximal_mu: p.proximal_mu,
        })
    }
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
    /// Benchmark mode: no training, zero deltas (see `site-node run --overhead-probe`).
    pub overhead_probe: bool,
    protocol: Option<Protocol>,
    run_id: String,
    site: Option<SiteId>,
    /// Model bytes of the last download.
    last_pull_bytes: u64,
}

/// Per-round timings the site keeps in `work_dir/timings.jsonl`.
#[derive(Debug, Serialize)]
struct RoundTiming {
    experiment: String,
    round: u32,
    pull_s: f64,
    train_s: f64,
    /// Subtracting, privatising, compressing or masking the delta, and keeping a local copy.
    prepare_s: f64,
    push_s: f64,
    bytes_sent: u64,
    bytes_received: u64,
    codec: String,
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
            .initial_stream_window_size(SITE_HTTP2_STREAM_WINDOW_BYTES)
            .initial_connection_window_size(SITE_HTTP2_CONNECTION_WINDOW_BYTES)
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
        Ok(Self { client, cfg, patience, overhead_probe: false, protocol: None, run_id: String::new(), site: None, last_pull_bytes: 0 })
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
                codecs: SUPPORTED_CODECS.iter().map(|c| c.to_proto() as i32).collect(),
            })
            .await
            .context("join refused")?
            .into_inner();
        let site = SiteId::new(joined.site_id.clone())?;
        let protocol = Protocol::from_proto(joined.protocol)?;
        info!(%site, run = %joined.run_id, rounds = joined.total_rounds, codec = %protocol.codec, dp = ?protocol.dp, secure_aggregation = protocol.secure_aggregation, proximal_mu = protocol.proximal_mu, "joined the federation");
        self.protocol = Some(protocol);
        self.run_id = joined.run_id.clone();
        self.site = Some(site.clone());
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
                    let job = TrainJob { round: t.round, total_rounds: t.total_rounds, hash: ModelHash(t.model_hash), plan, experiment, mask_epoch: t.mask_epoch };
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
        self.last_pull_bytes = p.body.byte_len() as u64;
        Ok(p.body)
    }

    async fn train_round(&mut self, data: &Arc<SiteData>, net: &SharedNet, job: TrainJob, site_seed: u64, updates_dir: &std::path::Path) -> Result<()> {
        let TrainJob { round, total_rounds, hash, plan, experiment, mask_epoch } = job;
        let protocol = self.protocol.clone().ok_or_else(|| anyhow!("train task before join"))?;
        let site = self.site.clone().ok_or_else(|| anyhow!("train task before join"))?;
        // Secure aggregation: a fresh key pair per round and attempt, published before
        // training so the mask set is ready when training ends.
        let masking = if protocol.secure_aggregation {
            let key = MaskingKey::generate();
            let ack = self
                .client
                .share_key(pb::KeyShare { round, mask_epoch, public_key: key.public.to_vec(), experiment: experiment.id.clone() })
                .await
                .context("sharing the masking key")?
                .into_inner();
            if !ack.accepted {
                info!("not masking in round {round} attempt {mask_epoch}: {}", ack.message);
                tokio::time::sleep(Duration::from_millis(u64::from(DEFAULT_WAIT_MS))).await;
                return Ok(());
            }
            Some(key)
        } else {
            None
        };
        let t = Instant::now();
        let global = self.pull(&hash).await?;
        let pull_s = t.elapsed().as_secs_f64();
        info!(model = %hash.short(), pull_s = format!("{pull_s:.2}"), "training round {round} from the global model");
        let outcome = if self.overhead_probe {
            train::RoundOutcome { delta: global.zeros_like(), sample_count: data.indices(Split::Train).len().max(1) as u64, mean_loss: 0.0, train_s: 0.0 }
        } else {
            let data = data.clone();
            let global = global.clone();
            let net = net.clone();
            let experiment = experiment.clone();
            let mu = protocol.proximal_mu;
            let mixed_precision = self.cfg.site.mixed_precision;
            tokio::task::spawn_blocking(move || {
                let mut slot = net.lock().unwrap_or_else(|p| p.into_inner());
                let job = train::LocalRound { plan: &plan, experiment: &experiment, round, total_rounds, site_seed, proximal_mu: mu, mixed_precision };
                train::train_round(slot.get(&global)?, &data, &global, &job)
            })
            .await??
        };
        drop(global);
        let t = Instant::now();
        // Keep what we computed, for audit (and for the end-to-end tests to recompute the aggregate).
        let meta = HashMap::from([
            ("round".to_string(), round.to_string()),
            ("base_model_hash".to_string(), hash.0.clone()),
            ("sample_count".to_string(), outcome.sample_count.to_string()),
            ("kind".to_string(), "delta".to_string()),
            ("experiment".to_string(), experiment.id.clone()),
        ]);
        let sample_count = outcome.sample_count;
        let raw = Arc::new(outcome.delta);
        // The local copy is written while the update is prepared and sent (off the critical path).
        let kept = {
            let (raw, path) = (raw.clone(), updates_dir.join(&experiment.id).join(local_update_file(round)));
            tokio::task::spawn_blocking(move || raw.save(&path, &meta))
        };
        let mut delta = raw;
        let ef_path = self.cfg.site.work_dir.join("error_feedback").join(format!("{}.safetensors", experiment.id));
        let ctx = MaskContext { run_id: self.run_id.clone(), experiment: experiment.id.clone(), round, attempt: mask_epoch };
        let (dp_mode, clip_norm, noise_multiplier, codec) = (protocol.dp, protocol.clip_norm, protocol.noise_multiplier, protocol.codec);
        let prepared = tokio::task::spawn_blocking(move || -> Result<Prepared> {
            if dp_mode == DpMode::Site {
                let mut noised = (*delta).clone();
                let c = dp::privatise(noised.data_mut(), clip_norm, noise_multiplier, &mut rand::rng());
                info!(norm = format!("{:.4}", c.norm), clip_scale = format!("{:.4}", c.scale), noise_std = clip_norm * noise_multiplier, "update clipped and noised (site-level DP)");
                delta = Arc::new(noised);
            }
            if codec.is_lossy() {
                let mut ef = match ModelState::load(&ef_path) {
                    Ok((r, _)) if r.same_schema(&delta) => ErrorFeedback { residual: r },
                    _ => ErrorFeedback::new(&delta),
                };
                let enc = ef.compress(&delta, codec)?;
                return Ok((delta, Some(enc), Some((ef, ef_path))));
            }
            Ok((delta, None, None))
        })
        .await??;
        delta = prepared.0;
        let mut encoded = prepared.1;
        let feedback = prepared.2;
        if let Some(key) = masking {
            let peers = self.peer_keys(round, mask_epoch).await?;
            let Some(peers) = peers else { return Ok(()) };
            let (me, ctx, bits) = (site.clone(), ctx, protocol.ring_fraction_bits);
            encoded = Some(
                tokio::task::spawn_blocking(move || -> Result<Encoded> {
                    let (mut words, saturated) = ring_encode(delta.data(), sample_count as f64, bits);
                    if saturated > 0 {
                        warn!(saturated, "values × sample count exceed the fixed-point range and were saturated; lower privacy.ring_fraction_bits");
                    }
                    key.mask(&mut words, &me, &peers, &ctx)?;
                    Ok(Encoded::ring(delta.specs().to_vec(), words))
                })
                .await??,
            );
            delta = Arc::new(ModelState::new(vec![], vec![])?);
        }
        let prepare_s = t.elapsed().as_secs_f64();
        let meta = PayloadMeta { ring_fraction_bits: protocol.ring_fraction_bits, mask_epoch, ..PayloadMeta::delta(Round(round), hash, sample_count) };
        let sent = self.push(round, delta, encoded, meta).await?;
        kept.await??;
        if let Some((ef, path)) = feedback {
            // The residual is kept only once the update it belongs to was accepted.
            tokio::task::spawn_blocking(move || ef.residual.save(&path, &HashMap::new())).await??;
        }
        let timing = RoundTiming { experiment: experiment.id.clone(), round, pull_s, train_s: outcome.train_s, prepare_s, push_s: sent.1, bytes_sent: sent.0, bytes_received: self.last_pull_bytes, codec: protocol.codec.to_string(), mean_loss: outcome.mean_loss };
        append_jsonl(&self.cfg.site.work_dir.join("timings.jsonl"), &timing)?;
        Ok(())
    }

    /// Waits for the round's mask set; None if the attempt ended without this site.
    async fn peer_keys(&mut self, round: u32, mask_epoch: u32) -> Result<Option<Vec<(SiteId, [u8; 32])>>> {
        loop {
            match self.client.peer_keys(pb::PeerKeysRequest { round, mask_epoch }).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.ready {
                        let set = r
                            .keys
                            .into_iter()
                            .map(|k| -> Result<(SiteId, [u8; 32])> {
                                let key: [u8; 32] = k.public_key.as_slice().try_into().map_err(|_| anyhow!("peer key of {} is not 32 bytes", k.site_id))?;
                                Ok((SiteId::new(k.site_id)?, key))
                            })
                            .collect::<Result<Vec<_>>>()?;
                        info!(sites = set.len(), "mask set received");
                        return Ok(Some(set));
                    }
                    info!("waiting for the mask set ({})", r.reason);
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    info!("masking attempt {mask_epoch} of round {round} is over ({}); asking for the next task", s.message());
                    return Ok(None);
                }
                Err(s) => return Err(anyhow!(s).context("asking for the mask set")),
            }
        }
    }

    /// Sends an update (re-sending a broken transfer); returns bytes sent and seconds taken.
    async fn push(&mut self, round: u32, delta: Arc<ModelState>, encoded: Option<Encoded>, meta: PayloadMeta) -> Result<(u64, f64)> {
        let t = Instant::now();
        let mut attempt = 0;
        let mut bytes_sent;
        let ack = loop {
            attempt += 1;
            let encoder = match &encoded {
                Some(e) => ChunkEncoder::encoded(e.clone(), meta.clone(), 0),
                None => ChunkEncoder::new(delta.clone(), meta.clone(), 0),
            };
            bytes_sent = encoder.payload_bytes();
            let bar = aln_common::progress::transfer(bytes_sent, "upload");
            let shown = bar.clone();
            let encoder = encoder.inspect(move |c| {
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
        info!(push_s = format!("{push_s:.2}"), bytes = bytes_sent, codec = %meta.codec, "{}", ack.message);
        Ok((bytes_sent, push_s))
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
            // Under DP the global BatchNorm statistics are noisy: re-estimate them locally.
            let recalibrate = if self.protocol.as_ref().is_some_and(|p| p.dp != DpMode::Off) { BN_RECALIBRATION_BATCHES } else { 0 };
            tokio::task::spawn_blocking(move || -> Result<_> {
                let mut slot = net.lock().unwrap_or_else(|p| p.into_inner());
                let net = slot.get(&global)?;
                let rows = train::extract_features(net, &data, &global, &experiment, &site, 32, recalibrate)?;
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
