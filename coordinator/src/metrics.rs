//! The Prometheus `/metrics` endpoint: rounds, sites, bytes, durations and rejections,
//! derived from the run's state (plain text exposition format, served with axum).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::{Router, routing::get};
use tokio::net::TcpListener;

use crate::rounds::RoundController;

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve(listener: TcpListener, ctl: Arc<RoundController>) -> std::io::Result<()> {
    let app = Router::new().route("/metrics", get(move || std::future::ready(render(&ctl))));
    axum::serve(listener, app).await
}

fn metric(out: &mut String, name: &str, help: &str, kind: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP aln_{name} {help}\n# TYPE aln_{name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "aln_{name}{labels} {v}");
    }
}

/// The exposition text.
pub fn render(ctl: &RoundController) -> String {
    let s = ctl.metrics_snapshot();
    let mut out = String::new();
    metric(&mut out, "rounds_completed_total", "Federated rounds completed, all experiments.", "counter", &[(String::new(), s.rounds_completed as f64)]);
    metric(&mut out, "experiment_index", "Index of the experiment in progress in the study plan.", "gauge", &[(String::new(), s.experiment as f64)]);
    metric(&mut out, "round_in_progress", "Round being trained in the current experiment (0 when not training).", "gauge", &[(String::new(), s.round_open as f64)]);
    metric(&mut out, "updates_accepted_total", "Updates accepted into aggregation.", "counter", &[(String::new(), s.updates_accepted as f64)]);
    metric(&mut out, "updates_rejected_total", "Updates or transfers refused (validation, digest, broken stream).", "counter", &[(String::new(), s.updates_rejected as f64)]);
    metric(&mut out, "update_bytes_received_total", "Bytes of accepted updates received.", "counter", &[(String::new(), s.bytes_received as f64)]);
    let sites: Vec<(String, f64)> = s.sites.iter().map(|(site, joined)| (format!("{{site=\"{site}\"}}"), f64::from(u8::from(*joined)))).collect();
    metric(&mut out, "site_joined", "1 once the site has contacted this coordinator process.", "gauge", &sites);
    metric(&mut out, "last_round_duration_seconds", "Wall time of the last completed round.", "gauge", &[(String::new(), s.last_round_s)]);
    metric(&mut out, "last_aggregate_seconds", "Aggregation time of the last completed round.", "gauge", &[(String::new(), s.last_aggregate_s)]);
    metric(&mut out, "last_checkpoint_seconds", "Checkpoint time of the last completed round.", "gauge", &[(String::new(), s.last_checkpoint_s)]);
    metric(&mut out, "run_failed", "1 if the run failed.", "gauge", &[(String::new(), f64::from(u8::from(s.failed)))]);
    out
}
