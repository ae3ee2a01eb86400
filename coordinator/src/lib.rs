//! The consortium's coordinator (no libtorch).
//!
//! | module | role |
//! |---|---|
//! | [`server`] | thin tonic service: certificate → `SiteId`, proto ↔ domain |
//! | [`rounds`] | the round state machine ([`rounds::RoundController`]) |
//! | [`state`] | the durable state directory (atomic checkpoints, resume) |
//! | [`audit`] | append-only JSON-lines audit log |
//! | [`cohort_table`] | Table 2: training vs test balance tests |
//! | [`evaluation`] | fusion SVMs on pooled features, pooled and per-site AUCs |
//! | [`html`] | self-contained `report.html` with plotters ROC curves |
//! | [`metrics`] | Prometheus `/metrics` endpoint |
//! | [`report`] | `report.json`, `features.csv`, the results table |
//! | [`provision`] | CA, certificates and startup kits |
//! | [`status`] | errors and their single mapping to gRPC codes |
//! | [`stats_cli`] | `coordinator stats roc/diag/kappa` on any CSV |

pub mod audit;
pub mod cohort_table;
pub mod evaluation;
pub mod html;
pub mod metrics;
pub mod provision;
pub mod report;
pub mod rounds;
pub mod server;
pub mod state;
pub mod stats_cli;
pub mod status;
