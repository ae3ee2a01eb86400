//! Shared library of the ALN federation (no libtorch).
//!
//! The coordinator and every site-node link this crate. Each module owns one concept:
//!
//! | module | what lives there |
//! |---|---|
//! | [`ids`] | domain identifiers: [`ids::SiteId`], [`ids::Round`], [`ids::ModelHash`] |
//! | [`constants`] | the single source of every shared default and limit |
//! | [`model_state`] | a model as named tensors over one flat f32 buffer, safetensors I/O |
//! | [`wire`] | chunking/reassembly of model states, digests, proto ↔ domain at the edge |
//! | [`aggregate`] | the `Aggregator` trait and sample-weighted FedAvg |
//! | [`experiment`] | the study: main model, leave-one-site-out and control experiments |
//! | [`cohort`] | manifest schema, clinical variables, N stage, splits, feature rows |
//! | [`stats`] | ROC/AUC and DeLong statistics |
//! | [`fusion`] | the clinical-fusion SVM (`FusionSvm`) on deep + clinical features |
//! | [`tls`] | loading PEMs, building tonic TLS configs, site id from certificates |
//! | [`config`] | coordinator and site-node TOML configuration |
//! | [`logging`] | `--log-format text|json` set-up shared by both binaries |
//! | [`progress`] | terminal progress bars shared by both binaries |
//! | [`shutdown`] | Ctrl-C / SIGTERM, for both binaries |
//! | [`atomic_file`] | temp file + fsync + rename writes |
//! | [`error`] | typed errors of this crate |

pub mod aggregate;
pub mod atomic_file;
pub mod codec;
pub mod cohort;
pub mod config;
pub mod constants;
pub mod error;
pub mod experiment;
pub mod fusion;
pub mod ids;
pub mod logging;
pub mod model_state;
pub mod privacy;
pub mod progress;
pub mod shutdown;
pub mod stats;
pub mod tls;
pub mod wire;

pub use error::{Error, Result};
