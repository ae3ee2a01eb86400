//! The append-only audit log: one JSON object per line in `state_dir/audit.jsonl` for every
//! join, refused identity, model transfer, accepted or rejected update (with the reason),
//! new model version (with its SHA-256) and feature submission. Lines are flushed and
//! synced as they are written; the file is only ever appended to.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use serde_json::{Value, json};

pub struct AuditLog {
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let file = OpenOptions::new().create(true).append(true).open(state_dir.join("audit.jsonl"))?;
        Ok(Self { file: Mutex::new(file) })
    }

    /// Appends `{"ts": …, "event": event, "who": who, ...details}`. A failure to write the
    /// audit trail is logged loudly but does not stop the federation.
    pub fn record(&self, event: &str, who: &str, details: Value) {
        let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        let mut line = json!({ "ts": ts, "event": event, "who": who });
        if let (Some(obj), Value::Object(extra)) = (line.as_object_mut(), details) {
            obj.extend(extra);
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let written = writeln!(f, "{line}").and_then(|_| f.sync_data());
        if let Err(e) = written {
            tracing::error!("audit log write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_one_json_object_per_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        log.record("join", "site-a", json!({"software": "0.1"}));
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        log.record("update_rejected", "site-b", json!({"reason": "NaN"}));
        let text = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "join");
        assert_eq!(lines[1]["reason"], "NaN");
    }
}
