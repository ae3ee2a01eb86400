//! Privacy protections for updates: differential privacy at the level of a whole site and
//! secure aggregation.
//!
//! - [`dp`]: clip a site's delta to norm S and add N(0, (σS)²) noise, at the site
//!   ([`DpMode::Site`]) or to the sum at the coordinator ([`DpMode::Central`],
//!   `aggregate::mean`); [`accountant`] turns (σ, rounds, δ) into ε with Rényi DP.
//! - [`secagg`]: pairwise X25519 masks so the coordinator learns only the sum of updates.
//!
//! What ε covers: the weight updates. Deep-feature rows sent for the fusion SVM, which the
//! mission requires, are not protected by it; the report says so.

pub mod accountant;
pub mod dp;
pub mod secagg;

use serde::{Deserialize, Serialize};

/// Where differential-privacy noise is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    #[default]
    Off,
    /// Each site clips its delta and adds the noise itself (the coordinator is not trusted).
    Site,
    /// The coordinator clips each delta and adds the noise to the sum (it is trusted).
    Central,
}

impl DpMode {
    pub fn to_proto(self) -> aln_proto::DpMode {
        match self {
            DpMode::Off => aln_proto::DpMode::Off,
            DpMode::Site => aln_proto::DpMode::Site,
            DpMode::Central => aln_proto::DpMode::Central,
        }
    }

    pub fn from_proto(v: i32) -> Self {
        match aln_proto::DpMode::try_from(v) {
            Ok(aln_proto::DpMode::Site) => DpMode::Site,
            Ok(aln_proto::DpMode::Central) => DpMode::Central,
            _ => DpMode::Off,
        }
    }
}

/// `[privacy]` of the coordinator's config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    pub dp: DpMode,
    /// Clip norm S of a site's delta.
    pub clip_norm: f64,
    /// σ: the noise standard deviation is σ·S.
    pub noise_multiplier: f64,
    /// δ of the (ε, δ) guarantee.
    pub delta: f64,
    /// Pairwise-masked updates; the coordinator sees only their sum.
    pub secure_aggregation: bool,
    /// Fixed-point fraction bits of masked updates (values × n_k must stay below 2^(31−bits)).
    pub ring_fraction_bits: u32,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self { dp: DpMode::Off, clip_norm: 1.0, noise_multiplier: 1.0, delta: 1e-5, secure_aggregation: false, ring_fraction_bits: 16 }
    }
}

impl PrivacyConfig {
    /// Checks the parameters; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.dp != DpMode::Off {
            if !(self.clip_norm.is_finite() && self.clip_norm > 0.0) {
                return Err("privacy.clip_norm must be positive".into());
            }
            if !(self.noise_multiplier.is_finite() && self.noise_multiplier >= 0.0) {
                return Err("privacy.noise_multiplier must be ≥ 0".into());
            }
            if !(self.delta > 0.0 && self.delta < 1.0) {
                return Err("privacy.delta must be within (0, 1)".into());
            }
        }
        if self.secure_aggregation && !(4..=28).contains(&self.ring_fraction_bits) {
            return Err("privacy.ring_fraction_bits must be within 4..=28".into());
        }
        if self.secure_aggregation && self.dp == DpMode::Central {
            return Err("privacy.dp = \"central\" needs to see each update to clip it; with secure_aggregation use dp = \"site\"".into());
        }
        Ok(())
    }

    /// ε of the run for a site whose data was used in `rounds` releases (None: no DP).
    pub fn epsilon(&self, rounds: u32) -> Option<f64> {
        (self.dp != DpMode::Off).then(|| accountant::gaussian_epsilon(self.noise_multiplier, rounds, self.delta))
    }

    /// One line for logs and the report.
    pub fn describe(&self) -> String {
        let dp = match self.dp {
            DpMode::Off => "no differential privacy".to_string(),
            m => format!("DP ({}) clip S = {}, noise σ = {}, δ = {:e}", if m == DpMode::Site { "noise added at each site" } else { "noise added centrally" }, self.clip_norm, self.noise_multiplier, self.delta),
        };
        let sa = if self.secure_aggregation { format!("secure aggregation (X25519 pairwise masks, Z_2^32, {} fraction bits)", self.ring_fraction_bits) } else { "no secure aggregation".into() };
        format!("{dp}; {sa}")
    }
}
