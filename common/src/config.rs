//! Configuration files of both binaries (TOML), with defaults and validation.
//!
//! Relative paths inside a config file are resolved against the file's folder, so a
//! startup kit can be moved as a whole. Each loader names the file and the field at fault.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::aggregate::AggregationConfig;
use crate::codec::Codec;
use crate::privacy::PrivacyConfig;
use crate::constants::{DEFAULT_MAX_CHUNK_BYTES, DEFAULT_PORT, MIN_CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::fusion::FusionSvmParams;
use crate::ids::SiteId;
use crate::tls::TlsFiles;

/// The local training recipe every site follows in every round (the paper's: Adam,
/// lr 1e-4, batch 32, 224 px; here sized by the operator).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingPlan {
    /// Optimiser steps per site per round.
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    /// Side of the square ROI crop fed to the network, pixels.
    pub image_size: u32,
    /// Seed for sampling and augmentation (mixed with site and round at the site).
    pub seed: u64,
}

impl Default for TrainingPlan {
    fn default() -> Self {
        Self { local_steps: 10, batch_size: 8, learning_rate: 1e-4, image_size: 64, seed: 42 }
    }
}

impl TrainingPlan {
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: &str| Err(config_err(path, m));
        if self.local_steps == 0 {
            return bad("training.local_steps must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("training.batch_size must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("training.learning_rate must be a positive number");
        }
        if !(16..=1024).contains(&self.image_size) {
            return bad("training.image_size must be within 16..=1024");
        }
        Ok(())
    }
}

/// `[federation]` of the coordinator's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    /// Address to listen on, e.g. `0.0.0.0:50051`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Admitted sites (certificate Common Names).
    pub sites: Vec<SiteId>,
    pub rounds: u32,
    /// Updates needed to close a round once `round_timeout_secs` has passed.
    pub min_sites: usize,
    /// A round closes early only when every site has reported; after this many seconds it
    /// closes as soon as `min_sites` have.
    #[serde(default = "default_round_timeout")]
    pub round_timeout_secs: u64,
    /// If quorum is still missing this many seconds after `round_timeout_secs`, the run
    /// fails loudly instead of waiting forever (default: as long as `round_timeout_secs`).
    #[serde(default)]
    pub quorum_grace_secs: Option<u64>,
    #[serde(default = "default_chunk")]
    pub max_chunk_bytes: usize,
    /// Largest `sample_count` an update may declare.
    #[serde(default = "default_max_samples")]
    pub max_sample_count: u64,
    /// Largest L2 norm of an update delta; larger updates are refused (none if unset).
    #[serde(default)]
    pub max_update_norm: Option<f64>,
    /// Address for the Prometheus `/metrics` endpoint (plain HTTP, bind it to a management
    /// network); none if unset.
    #[serde(default)]
    pub metrics_listen: Option<String>,
    /// Certificate Common Names allowed to use the Admin service (status, stop); never sites.
    #[serde(default = "default_admins")]
    pub admins: Vec<String>,
    /// Revoked certificates, as `sha256:<hex>` fingerprints of their DER encoding
    /// (`coordinator fingerprint --cert FILE` prints one). Takes effect on restart.
    #[serde(default)]
    pub denied_certificates: Vec<String>,
    /// How sites encode their updates: fp32 (lossless), fp16, int8 (one scale per tensor) or
    /// int8-channel (one per output channel); lossy codecs use error feedback at the site.
    #[serde(default)]
    pub update_codec: Codec,
}

fn default_listen() -> String {
    format!("127.0.0.1:{DEFAULT_PORT}")
}
fn default_admins() -> Vec<String> {
    vec!["admin".into()]
}
fn default_round_timeout() -> u64 {
    3600
}
fn default_chunk() -> usize {
    DEFAULT_MAX_CHUNK_BYTES
}
fn default_max_samples() -> u64 {
    1_000_000
}

/// `[paths]` of the coordinator's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorPaths {
    /// Where rounds, models and reports are kept; the run resumes from it.
    pub state_dir: PathBuf,
    /// The initial global model (safetensors), e.g. from `site-node init-model`.
    pub initial_model: PathBuf,
}

/// The coordinator's whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub federation: FederationSection,
    #[serde(default)]
    pub training: TrainingPlan,
    #[serde(default)]
    pub fusion: FusionSvmParams,
    #[serde(default)]
    pub study: crate::experiment::StudyConfig,
    #[serde(default)]
    pub aggregation: AggregationConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    pub paths: CoordinatorPaths,
    pub tls: TlsFiles,
}

impl FederationSection {
    /// Seconds after which a round (or feature collection) without quorum fails the run.
    pub fn give_up_after_secs(&self) -> u64 {
        self.round_timeout_secs.saturating_add(self.quorum_grace_secs.unwrap_or(self.round_timeout_secs))
    }
}

impl CoordinatorConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut c: Self = load_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.paths.state_dir = base.join(&c.paths.state_dir);
        c.paths.initial_model = base.join(&c.paths.initial_model);
        c.tls = c.tls.resolved(base);
        c.validate(path)?;
        Ok(c)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let f = &self.federation;
        if f.sites.is_empty() {
            return Err(config_err(path, "federation.sites is empty"));
        }
        let mut sorted = f.sites.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() != f.sites.len() {
            return Err(config_err(path, "federation.sites lists a site twice"));
        }
        if let Some(a) = f.admins.iter().find(|a| f.sites.iter().any(|s| s.as_str() == a.as_str())) {
            return Err(config_err(path, &format!("federation.admins: {a:?} is also a site; an identity is either a site or an admin")));
        }
        if f.rounds == 0 {
            return Err(config_err(path, "federation.rounds must be at least 1"));
        }
        if f.min_sites == 0 || f.min_sites > f.sites.len() {
            return Err(config_err(path, &format!("federation.min_sites must be within 1..={}", f.sites.len())));
        }
        if f.max_update_norm.is_some_and(|n| !(n.is_finite() && n > 0.0)) {
            return Err(config_err(path, "federation.max_update_norm must be a positive number"));
        }
        if let Some(bad) = f.denied_certificates.iter().find(|d| !crate::tls::is_fingerprint(d)) {
            return Err(config_err(path, &format!("federation.denied_certificates: {bad:?} is not a sha256:<64 hex digits> fingerprint")));
        }
        if !(MIN_CHUNK_BYTES..=DEFAULT_MAX_CHUNK_BYTES * 16).contains(&f.max_chunk_bytes) {
            return Err(config_err(path, "federation.max_chunk_bytes is out of range"));
        }
        if f.update_codec == Codec::Ring32 {
            return Err(config_err(path, "federation.update_codec: ring32 is chosen by privacy.secure_aggregation, not here"));
        }
        self.aggregation.validate().map_err(|e| config_err(path, &e))?;
        self.privacy.validate().map_err(|e| config_err(path, &e))?;
        if self.privacy.secure_aggregation {
            if self.aggregation.needs_all_updates() {
                return Err(config_err(path, &format!("aggregation.strategy = {:?} must read each update, which secure aggregation hides; use fedavg, fedprox, fedadam or fedyogi", self.aggregation.strategy)));
            }
            if f.update_codec != Codec::F32 {
                return Err(config_err(path, "federation.update_codec must be fp32 with secure aggregation (masked updates travel as 32-bit ring words)"));
            }
        }
        self.training.validate(path)?;
        self.fusion.validate().map_err(|e| config_err(path, &format!("fusion: {e}")))?;
        Ok(())
    }
}

/// Compute device for a site's training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when available, else CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// A site-node's config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: SiteSection,
    pub tls: TlsFiles,
}

/// `[site]` of a site-node's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// Coordinator URL, e.g. `https://fl.example.org:50051`.
    pub coordinator: String,
    /// Name in the coordinator's certificate (default `coordinator`).
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The local manifest; images it names never leave this machine.
    pub manifest: PathBuf,
    /// Where the site keeps its own copies of updates and logs.
    pub work_dir: PathBuf,
    #[serde(default)]
    pub device: DeviceChoice,
    /// Torch intra-op threads (0 = torch's default).
    #[serde(default)]
    pub threads: usize,
    /// Send Grad-CAM overlays of a few test patients for the report. They are derived from
    /// images, so this is off unless the site's governance allows it; overlays are always
    /// kept locally in `work_dir/gradcam/`.
    #[serde(default)]
    pub share_gradcam: bool,
    /// CUDA mixed precision for local training (libtorch autocast; fp16, the only autocast
    /// type tch 0.26 can select, and without loss scaling). No effect on CPU.
    #[serde(default)]
    pub mixed_precision: bool,
}

fn default_server_name() -> String {
    "coordinator".into()
}

impl SiteConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut c: Self = load_toml(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        c.site.manifest = base.join(&c.site.manifest);
        c.site.work_dir = base.join(&c.site.work_dir);
        c.tls = c.tls.resolved(base);
        if !(c.site.coordinator.starts_with("https://")) {
            return Err(config_err(path, "site.coordinator must be an https:// URL (mTLS is mandatory)"));
        }
        Ok(c)
    }
}

fn load_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    toml::from_str(&text).map_err(|e| config_err(path, &e.to_string()))
}

fn config_err(path: &Path, message: &str) -> Error {
    Error::Config { path: path.to_path_buf(), message: message.to_string() }
}

/// A commented coordinator config for these sites (what `provision` and `init-config` write).
pub fn coordinator_template(site_ids: &[SiteId]) -> String {
    let sites: Vec<String> = site_ids.iter().map(|s| format!("\"{s}\"")).collect();
    let plan = TrainingPlan::default();
    format!(
        r#"# Coordinator configuration (written by `coordinator provision`).
# Relative paths are resolved against this file's folder.

[federation]
listen = "127.0.0.1:{DEFAULT_PORT}"     # address:port to serve on
sites = [{sites}]                       # admitted sites = certificate Common Names
rounds = 3                              # federated rounds
min_sites = {min}                       # quorum once round_timeout_secs has passed
round_timeout_secs = 3600
max_chunk_bytes = 1048576               # largest chunk of a model transfer
# max_update_norm = 1e4                 # refuse deltas with a larger L2 norm
denied_certificates = []                # revoked: ["sha256:…"] from `coordinator fingerprint`
admins = ["admin"]                      # Common Names allowed to read status and stop the run
# metrics_listen = "127.0.0.1:9464"     # Prometheus /metrics (plain HTTP: keep it on a management network)
update_codec = "fp32"                   # fp32 | fp16 | int8 | int8-channel (lossy ones use error feedback)

[aggregation]
strategy = "fedavg"                     # fedavg | fedprox | fedadam | fedyogi | median | trimmed_mean
proximal_mu = 0.01                      # fedprox: weight of mu/2 |w - w_global|^2 in site training
server_learning_rate = 0.01             # fedadam / fedyogi (Reddi et al. 2021)
beta1 = 0.9
beta2 = 0.99
tau = 0.001
trim_fraction = 0.1                     # trimmed_mean: fraction dropped at each end

[privacy]
dp = "off"                              # off | site (noise added by each site) | central (by the coordinator)
clip_norm = 1.0                         # S: each site's delta is clipped to this L2 norm
noise_multiplier = 1.0                  # sigma: noise std = sigma * S; the report states epsilon
delta = 1e-5
secure_aggregation = false              # pairwise X25519 masks: the coordinator sees only the sum
ring_fraction_bits = 16                 # fixed point of masked updates

[training]                              # the recipe every site follows each round
local_steps = {steps}
batch_size = {batch}
learning_rate = {lr:e}
image_size = {size}                     # paper: 224
seed = {seed}

[fusion]                                # clinical-fusion SVM (Gaussian kernel); C and gamma
c = 1.0                                 # are re-chosen by 5-fold CV on pooled training rows
balanced = true

[study]                                 # controls, each one extra federated training
leave_one_site_out = false              # external validation: one federation per held-out site
modality_controls = false               # US-only and SWE-only federations
clinical_in_head_control = false        # ResNet50+C: clinical variables inside the network

[paths]
state_dir = "state"                     # models, round state, report; runs resume from here
initial_model = "initial_model.safetensors"   # from `site-node init-model`

[tls]
ca = "ca.pem"
cert = "coordinator.pem"
key = "coordinator.key"
"#,
        sites = sites.join(", "),
        min = site_ids.len().max(1),
        steps = plan.local_steps,
        batch = plan.batch_size,
        lr = plan.learning_rate,
        size = plan.image_size,
        seed = plan.seed,
    )
}

/// A commented site-node config (what `provision` and `site-node init-config` write).
pub fn site_template(coordinator_url: &str) -> String {
    format!(
        r#"# Site-node configuration (written by `coordinator provision`).
# Relative paths are resolved against this file's folder.

[site]
coordinator = "{url}"
server_name = "coordinator"             # name in the coordinator's certificate
manifest = "data/manifest.csv"          # your local manifest; images never leave this machine
work_dir = "work"                       # local copies of updates, timings
device = "auto"                         # auto | cpu | cuda
threads = 0                             # torch threads (0 = default)
share_gradcam = false                   # send Grad-CAM overlays of a few test patients for the report
mixed_precision = false                 # CUDA autocast (fp16) for local training; no effect on CPU

[tls]
ca = "ca.pem"
cert = "site.pem"
key = "site.key"
"#,
        url = coordinator_url
    )
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_load_as_valid_configs() {
        let dir = std::env::temp_dir().join(format!("aln-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sites = vec![SiteId::new("h1").unwrap(), SiteId::new("h2").unwrap()];
        let c = dir.join("coordinator.toml");
        std::fs::write(&c, coordinator_template(&sites)).unwrap();
        let cfg = CoordinatorConfig::load(&c).unwrap();
        assert_eq!(cfg.federation.sites, sites);
        assert_eq!(cfg.federation.admins, vec!["admin".to_string()]);
        let s = dir.join("site.toml");
        std::fs::write(&s, site_template("https://fl.example.org:50051")).unwrap();
        let site = SiteConfig::load(&s).unwrap();
        assert!(!site.site.share_gradcam);
        assert_eq!(site.site.coordinator, "https://fl.example.org:50051");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn incompatible_privacy_settings_are_refused_with_the_field_named() {
        let dir = tempfile::tempdir().unwrap();
        let sites = vec![SiteId::new("h1").unwrap(), SiteId::new("h2").unwrap()];
        let c = dir.path().join("coordinator.toml");
        let load = |edit: &dyn Fn(String) -> String| {
            std::fs::write(&c, edit(coordinator_template(&sites))).unwrap();
            CoordinatorConfig::load(&c).map_err(|e| e.to_string())
        };
        let e = load(&|t| t.replace("strategy = \"fedavg\"", "strategy = \"median\"").replace("secure_aggregation = false", "secure_aggregation = true")).unwrap_err();
        assert!(e.contains("aggregation.strategy") && e.contains("coordinator.toml"), "{e}");
        let e = load(&|t| t.replace("update_codec = \"fp32\"", "update_codec = \"int8\"").replace("secure_aggregation = false", "secure_aggregation = true")).unwrap_err();
        assert!(e.contains("update_codec"), "{e}");
        let e = load(&|t| t.replace("dp = \"off\"", "dp = \"central\"").replace("secure_aggregation = false", "secure_aggregation = true")).unwrap_err();
        assert!(e.contains("privacy.dp"), "{e}");
        let ok = load(&|t| t.replace("strategy = \"fedavg\"", "strategy = \"fedyogi\"").replace("update_codec = \"fp32\"", "update_codec = \"int8-channel\"").replace("dp = \"off\"", "dp = \"site\"")).unwrap();
        assert_eq!(ok.federation.update_codec, Codec::Int8Channel);
    }
}
