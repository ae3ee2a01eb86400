//! The thin tonic service: identify the caller by certificate, convert proto ↔ domain,
//! call the [`RoundController`], map errors through `status`. No federation logic here.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use aln_common::aggregate::ModelUpdate;
use aln_common::aggregate::spool::SpoolSink;
use aln_common::codec::Codec;
use aln_common::ids::Round;
use aln_common::cohort::{FeatureRow, NStage};
use aln_common::constants::{HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_STREAM_WINDOW_BYTES, MAX_CONCURRENT_UPLOADS, MAX_GRADCAM_BYTES, MAX_GRADCAMS_PER_SITE, MAX_GRPC_MESSAGE_BYTES};
use aln_common::ids::SiteId;
use aln_common::tls;
use aln_common::wire::{ChunkEncoder, ReceiveLimits, StreamDecoder};
use aln_proto::{
    self as pb, PROTO_VERSION,
    admin_server::{Admin, AdminServer},
    federation_server::{Federation, FederationServer},
};
use prost::Message;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::Stream;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::html::GradCamImage;
use crate::rounds::{PeerKeys, RoundController, TaskDecision};
use crate::status::{CoordResult, CoordinatorError};

/// Serves the federation on `listener` until `shutdown` resolves. Every connection must
/// complete a TLS 1.3 handshake with a client certificate from the consortium CA
/// (`tls`, see [`aln_common::tls::TlsFiles::tls13_acceptor`]) before gRPC sees it.
pub async fn run(
    listener: TcpListener,
    tls: TlsAcceptor,
    controller: Arc<RoundController>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let slots = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, MAX_CONCURRENT_UPLOADS);
    let service = FederationServer::new(FederationService { ctl: controller.clone(), upload_slots: Arc::new(tokio::sync::Semaphore::new(slots)) })
        .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let admin = AdminServer::new(AdminService { ctl: controller.clone() });
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<TlsStream<TcpStream>>>(64);
    // Handshakes run in their own tasks so a slow or hostile peer cannot stall the others.
    let acceptor = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => {
                    let _ = c.0.set_nodelay(true);
                    c
                }
                Err(e) => {
                    warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (tls, tx, ctl) = (tls.clone(), tx.clone(), controller.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        warn!(%peer, "TLS handshake refused: {e}");
                        ctl.audit().record("tls_refused", &peer.to_string(), serde_json::json!({"reason": e.to_string()}));
                    }
                    Err(_) => warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    let served = Server::builder()
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .add_service(service)
        .add_service(admin)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), shutdown)
        .await;
    acceptor.abort();
    served?;
    Ok(())
}

/// A long-polled answer: final, or the one to give if nothing changes in time.
enum Poll<T> {
    Ready(T),
    NotYet(T),
}

/// Longest a `NextTask` or `PeerKeys` call is held open when there is nothing new to say.
const LONG_POLL: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The Common Name of the verified client certificate, unless it is deny-listed.
fn peer_identity<T>(ctl: &RoundController, req: &Request<T>) -> CoordResult<String> {
    let certs = req.peer_certs().ok_or(CoordinatorError::NoCertificate)?;
    let leaf = certs.first().ok_or(CoordinatorError::NoCertificate)?;
    let cn = tls::common_name(leaf.as_ref())?;
    let fingerprint = tls::fingerprint(leaf.as_ref());
    if ctl.config().federation.denied_certificates.iter().any(|d| d.eq_ignore_ascii_case(&fingerprint)) {
        warn!(common_name = %cn, %fingerprint, "refused a revoked certificate");
        ctl.audit().record("identity_refused", &cn, serde_json::json!({"reason": "certificate is deny-listed", "fingerprint": fingerprint}));
        return Err(CoordinatorError::NotAdmitted(format!("{cn} (revoked certificate {fingerprint})")));
    }
    Ok(cn)
}

pub struct FederationService {
    ctl: Arc<RoundController>,
    /// Uploads decoded at once. More would not go faster (decoding is CPU-bound) but each
    /// costs buffers; an upload waiting here holds at most one HTTP/2 stream window.
    upload_slots: Arc<tokio::sync::Semaphore>,
}

impl FederationService {
    /// Asks `decide` again whenever the controller signals a change, until it is
    /// [`Poll::Ready`] or [`LONG_POLL`] has passed (then its last [`Poll::NotYet`] answer).
    async fn long_poll<T>(&self, mut decide: impl FnMut() -> Poll<T>) -> T {
        let mut changes = self.ctl.changes();
        changes.borrow_and_update();
        let deadline = tokio::time::Instant::now() + LONG_POLL;
        loop {
            match decide() {
                Poll::Ready(answer) => return answer,
                Poll::NotYet(answer) if tokio::time::Instant::now() >= deadline => return answer,
                Poll::NotYet(_) => {
                    let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
                }
            }
        }
    }

    /// The caller's site id, from the verified client certificate; refuses outsiders.
    fn identify<T>(&self, req: &Request<T>) -> CoordResult<SiteId> {
        let cn = peer_identity(&self.ctl, req)?;
        match SiteId::new(cn.clone()) {
            Ok(site) if self.ctl.is_admitted(&site) => Ok(site),
            _ => {
                warn!(common_name = %cn, "refused a certificate that is not in the consortium");
                self.ctl.audit().record("identity_refused", &cn, serde_json::json!({"reason": "not a member of federation.sites"}));
                Err(CoordinatorError::NotAdmitted(cn))
            }
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ModelChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(&self, req: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let site = self.identify(&req)?;
        let r = req.into_inner();
        if r.proto_version != PROTO_VERSION {
            return Err(CoordinatorError::Version { got: r.proto_version, want: PROTO_VERSION }.into());
        }
        let j = self.ctl.join(&site);
        // Codec negotiation: the run's codec must be one the site can produce.
        let offered: Vec<Codec> = r.codecs.iter().filter_map(|&c| Codec::from_proto(c).ok()).collect();
        if !(offered.contains(&j.codec) || (offered.is_empty() && j.codec == Codec::F32)) {
            return Err(CoordinatorError::WrongPhase(format!(
                "this run sends updates as {}, which {site} does not support (it offers {}); upgrade the site-node",
                j.codec,
                offered.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
            ))
            .into());
        }
        info!(%site, software = %r.software_version, train_patients = r.train_patients, total_patients = r.total_patients, codec = %j.codec, "join");
        let cfg = self.ctl.config();
        let privacy = &cfg.privacy;
        Ok(Response::new(pb::JoinReply {
            site_id: site.to_string(),
            run_id: j.run_id,
            plan: Some(plan_to_proto(&j.plan)),
            total_rounds: j.total_rounds,
            protocol: Some(pb::UpdateProtocol {
                codec: j.codec.to_proto() as i32,
                dp_mode: privacy.dp.to_proto() as i32,
                clip_norm: privacy.clip_norm,
                noise_multiplier: privacy.noise_multiplier,
                secure_aggregation: privacy.secure_aggregation,
                ring_fraction_bits: privacy.ring_fraction_bits,
                proximal_mu: cfg.aggregation.site_proximal_mu(),
            }),
        }))
    }

    async fn next_task(&self, req: Request<pb::TaskRequest>) -> Result<Response<pb::Task>, Status> {
        let site = self.identify(&req)?;
        use pb::task::Kind;
        // Long poll: a site with nothing to do is answered as soon as that changes (or after
        // the wait), so a new round reaches every site within milliseconds.
        let decision = self
            .long_poll(|| match self.ctl.next_task(&site) {
                wait @ TaskDecision::Wait { .. } => Poll::NotYet(wait),
                decision => Poll::Ready(decision),
            })
            .await;
        let kind = match decision {
            TaskDecision::Train { round, total_rounds, model_hash, plan, experiment, mask_epoch, participants } => Kind::Train(pb::TrainTask {
                round: round.0,
                model_hash: model_hash.0,
                plan: Some(plan_to_proto(&plan)),
                experiment: Some(pb::Experiment::from(&experiment)),
                total_rounds,
                mask_epoch,
                participants,
            }),
            TaskDecision::Extract { model_hash, experiment } => {
                Kind::Extract(pb::ExtractTask { model_hash: model_hash.0, experiment: Some(pb::Experiment::from(&experiment)) })
            }
            TaskDecision::Wait { retry_after_ms, reason } => Kind::Wait(pb::WaitTask { retry_after_ms, reason }),
            TaskDecision::Done { summary } => Kind::Done(pb::DoneTask { summary }),
        };
        Ok(Response::new(pb::Task { kind: Some(kind) }))
    }

    type PullModelStream = ChunkStream;

    async fn pull_model(&self, req: Request<pb::PullRequest>) -> Result<Response<ChunkStream>, Status> {
        let site = self.identify(&req)?;
        let r = req.into_inner();
        let (model, meta) = self.ctl.model_for_pull(&site, &r.model_hash)?;
        let chunk = if r.max_chunk_bytes == 0 { self.ctl.config().federation.max_chunk_bytes } else { r.max_chunk_bytes as usize };
        info!(%site, model = %meta.base_model_hash.short(), bytes = model.byte_len(), "model pull");
        let hash = meta.base_model_hash.clone();
        let encoder = ChunkEncoder::with_known_hash(model, meta, chunk, &hash);
        Ok(Response::new(Box::pin(tokio_stream::iter(encoder.map(Ok)))))
    }

    async fn push_update(&self, req: Request<Streaming<pb::ModelChunk>>) -> Result<Response<pb::UpdateAck>, Status> {
        let site = self.identify(&req)?;
        let mut stream = req.into_inner();
        // Refused before a byte of the body is read when no update from this site fits now.
        self.ctl.upload_plan(&site)?;
        let _slot = self.upload_slots.acquire().await.map_err(|e| Status::internal(e.to_string()))?;
        // Checked again: the round may have moved on while this upload waited for a slot.
        let (expectation, stream_target) = self.ctl.upload_plan(&site)?;
        let schema = self.ctl.schema();
        let codec = expectation.codec;
        let total: u64 = schema.iter().map(|s| (s.numel() * codec.bytes_per_value()) as u64).sum();
        let mut sink = SpoolSink::new(&self.ctl.store().spool_dir(), site.as_str(), expectation);
        // Linear strategies add each chunk to the round's sum as it arrives.
        if let Some((target, weight)) = stream_target {
            sink = sink.streaming(target, weight);
        }
        let mut decoder = StreamDecoder::with_sink(
            ReceiveLimits { max_total_bytes: total, max_chunk_bytes: self.ctl.config().federation.max_chunk_bytes, expected_schema: Some(schema) },
            sink,
        );
        let started = Instant::now();
        let mut bytes = 0u64;
        let mut received = None;
        let reject = |e: CoordinatorError| {
            warn!(%site, "transfer rejected: {e}");
            self.ctl.record_rejection(&site, &e.to_string());
            Status::from(e)
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) => return Err(reject(CoordinatorError::Transport(s.message().to_string()))),
            };
            bytes += msg.encoded_len() as u64;
            // Decoding and the spool write are short (one chunk); keep them off the reactor anyway.
            match tokio::task::block_in_place(|| decoder.push(msg)) {
                Ok(Some(p)) => received = Some(p),
                Ok(None) => {}
                Err(e) => return Err(reject(e.into())),
            }
        }
        decoder.finish().map_err(|e| reject(e.into()))?;
        let p = received.ok_or_else(|| reject(CoordinatorError::Transport("no payload".into())))?;
        let (values, summary, streamed) = p.body;
        let update = ModelUpdate { site: site.clone(), meta: p.meta, values, summary, streamed };
        let receive_s = started.elapsed().as_secs_f64();
        let ctl = self.ctl.clone();
        let round = tokio::task::spawn_blocking(move || ctl.submit_update(update, bytes, receive_s))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::UpdateAck { round: round.0, message: format!("update of {site} accepted for round {round}") }))
    }

    async fn share_key(&self, req: Request<pb::KeyShare>) -> Result<Response<pb::KeyAck>, Status> {
        let site = self.identify(&req)?;
        let k = req.into_inner();
        let key: [u8; 32] = k
            .public_key
            .as_slice()
            .try_into()
            .map_err(|_| CoordinatorError::from(aln_common::Error::MalformedPayload(format!("an X25519 public key has 32 bytes, not {}", k.public_key.len()))))?;
        match self.ctl.share_key(&site, &k.experiment, Round(k.round), k.mask_epoch, key) {
            Ok(()) => Ok(Response::new(pb::KeyAck { accepted: true, message: String::new() })),
            Err(CoordinatorError::WrongPhase(m)) => Ok(Response::new(pb::KeyAck { accepted: false, message: m })),
            Err(e) => Err(e.into()),
        }
    }

    async fn peer_keys(&self, req: Request<pb::PeerKeysRequest>) -> Result<Response<pb::PeerKeysReply>, Status> {
        let site = self.identify(&req)?;
        let r = req.into_inner();
        let reply = self
            .long_poll(|| match self.ctl.peer_keys(&site, Round(r.round), r.mask_epoch) {
                PeerKeys::NotYet(reason) => Poll::NotYet(Ok(pb::PeerKeysReply { ready: false, keys: vec![], reason })),
                PeerKeys::Stale(reason) => Poll::Ready(Err(Status::from(CoordinatorError::WrongPhase(reason)))),
                PeerKeys::Ready(set) => Poll::Ready(Ok(pb::PeerKeysReply {
                    ready: true,
                    keys: set.into_iter().map(|(s, k)| pb::PeerKey { site_id: s.to_string(), public_key: k.to_vec() }).collect(),
                    reason: String::new(),
                })),
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn submit_features(&self, req: Request<pb::FeatureBatch>) -> Result<Response<pb::FeatureAck>, Status> {
        let site = self.identify(&req)?;
        let batch = req.into_inner();
        let rows = batch
            .rows
            .into_iter()
            .map(|r| FeatureRow::from_proto(&site, r, None))
            .collect::<Result<Vec<_>, _>>()
            .map_err(CoordinatorError::from)?;
        let cams = batch.gradcams.into_iter().map(|g| gradcam_from_proto(&site, g)).collect::<CoordResult<Vec<_>>>()?;
        if cams.len() > MAX_GRADCAMS_PER_SITE {
            return Err(CoordinatorError::from(aln_common::Error::MalformedPayload(format!("{} Grad-CAM overlays; at most {MAX_GRADCAMS_PER_SITE}", cams.len()))).into());
        }
        let n = self.ctl.submit_features(&site, &batch.experiment, rows, batch.batch_index, batch.last)?;
        for cam in &cams {
            self.ctl.store().save_gradcam(cam)?;
        }
        Ok(Response::new(pb::FeatureAck { rows_received: n as u32 }))
    }
}

/// The operator's service: status and graceful stop, for `federation.admins` only.
pub struct AdminService {
    ctl: Arc<RoundController>,
}

impl AdminService {
    fn identify<T>(&self, req: &Request<T>) -> CoordResult<String> {
        let cn = peer_identity(&self.ctl, req)?;
        if self.ctl.config().federation.admins.contains(&cn) {
            Ok(cn)
        } else {
            warn!(common_name = %cn, "refused an admin request from a non-admin certificate");
            self.ctl.audit().record("identity_refused", &cn, serde_json::json!({"reason": "not in federation.admins"}));
            Err(CoordinatorError::NotAdmitted(format!("{cn} (admin operations need an admin certificate)")))
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusReply>, Status> {
        let who = self.identify(&req)?;
        self.ctl.audit().record("admin_status", &who, serde_json::json!({}));
        Ok(Response::new(pb::StatusReply { json: self.ctl.status_json().to_string() }))
    }

    async fn stop(&self, req: Request<pb::StopRequest>) -> Result<Response<pb::StopReply>, Status> {
        let who = self.identify(&req)?;
        let reason = req.into_inner().reason;
        self.ctl.request_stop(&who, &reason);
        Ok(Response::new(pb::StopReply { message: "stopping; completed rounds are on disk and a restart resumes".into() }))
    }
}

/// Checks a shared Grad-CAM overlay: a small PNG, a file-name-safe patient id, a known modality.
fn gradcam_from_proto(site: &SiteId, g: pb::GradCam) -> CoordResult<GradCamImage> {
    let bad = |m: String| CoordinatorError::from(aln_common::Error::MalformedPayload(format!("Grad-CAM from {site}: {m}")));
    if g.png.len() > MAX_GRADCAM_BYTES || !g.png.starts_with(b"\x89PNG\r\n\x1a\n") {
        return Err(bad(format!("not a PNG of at most {MAX_GRADCAM_BYTES} bytes")));
    }
    if g.patient_id.is_empty() || !g.patient_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(bad(format!("patient id {:?} is not file-name safe", g.patient_id)));
    }
    if !matches!(g.modality.as_str(), "us" | "swe") {
        return Err(bad(format!("unknown modality {:?}", g.modality)));
    }
    let n_stage = NStage::from_proto(g.n_stage).ok_or_else(|| bad(format!("unknown N stage {}", g.n_stage)))?;
    Ok(GradCamImage { site: site.to_string(), patient_id: g.patient_id, n_stage: n_stage.to_string(), modality: g.modality, png: g.png })
}

fn plan_to_proto(p: &aln_common::config::TrainingPlan) -> pb::TrainingPlan {
    pb::TrainingPlan {
        local_steps: p.local_steps,
        batch_size: p.batch_size,
        learning_rate: p.learning_rate,
        image_size: p.image_size,
        seed: p.seed,
    }
}
