//! The coordinator's state directory: the durable record of a run.
//!
//! ```text
//! state/round_state.json          RunState: experiment, completed rounds, model hash, history
//! state/models/<experiment>/global_r0000.safetensors   initial model; global_rNNNN after round N
//! state/features/<experiment>.json  pooled feature rows of a finished experiment
//! state/report.json, features.csv  written at the end
//! ```
//!
//! The model of round N is written before `round_state.json` says round N is complete, both
//! atomically, so a crash at any point leaves a consistent state to resume from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aln_common::atomic_file;
use aln_common::cohort::FeatureRow;
use aln_common::constants::{global_model_file, state_files};
use aln_common::ids::{ModelHash, Round, SiteId};
use aln_common::aggregate::ServerOptState;
use aln_common::model_state::ModelState;
use serde::{Deserialize, Serialize};

use crate::status::{CoordResult, CoordinatorError};

/// Version of the `round_state.json` layout. 3: model hashes are BLAKE3 (were SHA-256), rounds
/// record bytes, masking attempts and DP clipping, FedAdam/FedYogi moments sit beside models.
pub const STATE_FORMAT_VERSION: u32 = 3;

/// One site's accepted update in a round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Contribution {
    pub site: SiteId,
    pub sample_count: u64,
    pub bytes: u64,
    /// Seconds from the first to the last chunk received, including decoding and spooling.
    pub receive_s: f64,
    /// Seconds to validate the update and fold it into the aggregate.
    #[serde(default)]
    pub accumulate_s: f64,
}

/// What happened in one completed round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundRecord {
    pub experiment: String,
    pub round: Round,
    pub model_hash: ModelHash,
    pub contributors: Vec<Contribution>,
    pub rejected: Vec<String>,
    /// Seconds from the round's opening to its closing.
    pub duration_s: f64,
    pub aggregate_s: f64,
    pub checkpoint_s: f64,
    /// Update bytes received (encoded, with framing) and model bytes sent in this round.
    #[serde(default)]
    pub uplink_bytes: u64,
    #[serde(default)]
    pub downlink_bytes: u64,
    /// Secure aggregation: masking attempts this round needed (1 without dropouts).
    #[serde(default)]
    pub mask_epochs: u32,
    /// Central DP: updates scaled down by clipping, and the noise std per coordinate of the mean.
    #[serde(default)]
    pub clipped: usize,
    #[serde(default)]
    pub noise_std: f64,
}

/// Durable progress of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub format_version: u32,
    pub run_id: String,
    /// Ids of the study's experiments, in order (checked on resume).
    pub plan: Vec<String>,
    /// Index into `plan` of the experiment in progress.
    pub experiment: usize,
    /// Rounds completed in the experiment in progress.
    pub completed_rounds: u32,
    pub global_model_hash: ModelHash,
    pub schema_hash: String,
    pub history: Vec<RoundRecord>,
}

/// Reads and writes the state directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model_path(&self, experiment: &str, round: Round) -> PathBuf {
        self.dir.join(state_files::MODELS_DIR).join(experiment).join(global_model_file(round.0))
    }

    /// Keeps a Grad-CAM overlay a site shared, as `gradcam/<site>/<patient>__<stage>__<modality>.png`.
    pub fn save_gradcam(&self, g: &crate::html::GradCamImage) -> CoordResult<()> {
        let name = format!("{}__{}__{}.png", g.patient_id, g.n_stage, g.modality);
        Ok(atomic_file::write(&self.dir.join("gradcam").join(&g.site).join(name), &g.png)?)
    }

    fn features_path(&self, experiment: &str) -> PathBuf {
        self.dir.join("features").join(format!("{experiment}.json"))
    }

    /// Keeps a finished experiment's pooled features, so a restart need not collect them again.
    pub fn save_features(&self, experiment: &str, rows: &[FeatureRow]) -> CoordResult<()> {
        Ok(atomic_file::write_json(&self.features_path(experiment), &rows)?)
    }

    pub fn load_features(&self, experiment: &str) -> CoordResult<Vec<FeatureRow>> {
        let path = self.features_path(experiment);
        let text = std::fs::read_to_string(&path).map_err(|e| CoordinatorError::Internal(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| CoordinatorError::Internal(format!("{}: {e}", path.display())))
    }

    /// The saved run, if the directory holds one.
    pub fn load(&self) -> CoordResult<Option<RunState>> {
        let path = self.dir.join(state_files::ROUND_STATE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| CoordinatorError::Internal(format!("{}: {e}", path.display())))?;
        let state: RunState = serde_json::from_str(&text)
            .map_err(|e| CoordinatorError::Internal(format!("{}: not a valid round state: {e}", path.display())))?;
        if state.format_version != STATE_FORMAT_VERSION {
            return Err(CoordinatorError::Internal(format!(
                "{}: state format {} is not supported (expected {STATE_FORMAT_VERSION})",
                path.display(),
                state.format_version
            )));
        }
        Ok(Some(state))
    }

    pub fn save(&self, state: &RunState) -> CoordResult<()> {
        Ok(atomic_file::write_json(&self.dir.join(state_files::ROUND_STATE), state)?)
    }

    pub fn save_model(&self, experiment: &str, round: Round, model: &ModelState, run_id: &str) -> CoordResult<()> {
        let meta = HashMap::from([
            ("experiment".to_string(), experiment.to_string()),
            ("round".to_string(), round.0.to_string()),
            ("run_id".to_string(), run_id.to_string()),
            ("kind".to_string(), "global".to_string()),
        ]);
        Ok(model.save(&self.model_path(experiment, round), &meta)?)
    }

    fn server_state_path(&self, experiment: &str, round: Round, moment: &str) -> PathBuf {
        self.dir.join(state_files::MODELS_DIR).join(experiment).join(format!("server_{moment}_r{:04}.safetensors", round.0))
    }

    /// FedAdam / FedYogi moments after `round`, next to that round's model.
    pub fn save_server_state(&self, experiment: &str, round: Round, like: &ModelState, state: &ServerOptState) -> CoordResult<()> {
        for (moment, values) in [("m", &state.m), ("v", &state.v)] {
            let m = ModelState::new(like.specs().to_vec(), values.clone())?;
            m.save(&self.server_state_path(experiment, round, moment), &HashMap::new())?;
        }
        Ok(())
    }

    /// The moments saved after `round`, if that round had any.
    pub fn load_server_state(&self, experiment: &str, round: Round) -> CoordResult<Option<ServerOptState>> {
        let (m, v) = (self.server_state_path(experiment, round, "m"), self.server_state_path(experiment, round, "v"));
        if !m.exists() || !v.exists() {
            return Ok(None);
        }
        Ok(Some(ServerOptState { m: ModelState::load(&m)?.0.into_data(), v: ModelState::load(&v)?.0.into_data() }))
    }

    /// The directory uploads are spooled to while they arrive.
    pub fn spool_dir(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// Loads the model of `round` and checks it is the version the state recorded.
    pub fn load_model(&self, experiment: &str, round: Round, expected: &ModelHash) -> CoordResult<ModelState> {
        let path = self.model_path(experiment, round);
        let (model, _) = ModelState::load(&path)?;
        let got = model.weights_hash();
        if &got != expected {
            return Err(CoordinatorError::Internal(format!(
                "{}: hashes to {} but round_state.json expects {}",
                path.display(),
                got.short(),
                expected.short()
            )));
        }
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_optimiser_moments_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let like = ModelState::from_named(vec![("w".into(), vec![3], vec![0.0; 3])]).unwrap();
        assert!(store.load_server_state("main", Round(2)).unwrap().is_none());
        let s = ServerOptState { m: vec![0.1, -0.2, 0.3], v: vec![1e-6, 2e-6, 3e-6] };
        store.save_server_state("main", Round(2), &like, &s).unwrap();
        assert_eq!(store.load_server_state("main", Round(2)).unwrap(), Some(s));
    }
}
