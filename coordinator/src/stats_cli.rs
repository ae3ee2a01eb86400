//! `coordinator stats …`: the statistics module on any CSV of scores, for researchers.
//! Prints JSON on stdout; a bad file (missing column, non-numeric value, one class only)
//! is an error naming the file, row and column, with a non-zero exit code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aln_common::stats::{self, agreement, diagnostic};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// A CSV loaded as columns of strings.
struct Table {
    path: PathBuf,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn read(path: &Path) -> Result<Self> {
        let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
        let headers = rdr.headers().with_context(|| format!("{}: no header row", path.display()))?.iter().map(str::to_string).collect();
        let mut rows = Vec::new();
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.with_context(|| format!("{}: row {}", path.display(), i + 1))?;
            rows.push(rec.iter().map(str::to_string).collect());
        }
        if rows.is_empty() {
            bail!("{}: no data rows", path.display());
        }
        Ok(Self { path: path.to_path_buf(), headers, rows })
    }

    fn column(&self, name: &str) -> Result<Vec<&str>> {
        let i = self
            .headers
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no column `{name}` (columns: {})", self.path.display(), self.headers.join(", ")))?;
        Ok(self.rows.iter().map(|r| r.get(i).map_or("", String::as_str)).collect())
    }

    fn numeric(&self, name: &str) -> Result<Vec<f64>> {
        self.column(name)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v.parse::<f64>() {
                Ok(x) if x.is_finite() => Ok(x),
                _ => bail!("{}: row {}, column `{name}`: {v:?} is not a number", self.path.display(), i + 1),
            })
            .collect()
    }

    fn labels(&self, name: &str, positive: &str) -> Result<Vec<bool>> {
        let y: Vec<bool> = self.column(name)?.iter().map(|v| *v == positive).collect();
        let n_pos = y.iter().filter(|&&p| p).count();
        if n_pos == 0 || n_pos == y.len() {
            bail!(
                "{}: column `{name}` has {} rows equal to {positive:?} and {} others; both classes are needed",
                self.path.display(),
                n_pos,
                y.len() - n_pos
            );
        }
        Ok(y)
    }
}

/// `stats roc`: AUC with DeLong CI per score, paired DeLong test per pair.
pub fn roc(csv: &Path, label: &str, positive: &str, scores: &[String]) -> Result<Value> {
    if scores.is_empty() {
        bail!("give at least one --score COLUMN");
    }
    let t = Table::read(csv)?;
    let y = t.labels(label, positive)?;
    let cols: Vec<(String, Vec<f64>)> = scores.iter().map(|s| Ok((s.clone(), t.numeric(s)?))).collect::<Result<_>>()?;
    let mut per_score = BTreeMap::new();
    for (name, s) in &cols {
        let e = stats::auc_delong(s, &y)?;
        per_score.insert(name.clone(), json!({"auc": e.auc, "auc_ci_low": e.ci_low, "auc_ci_high": e.ci_high, "se": e.se}));
    }
    let mut pairs = Vec::new();
    for i in 0..cols.len() {
        for j in i + 1..cols.len() {
            let d = stats::delong_paired(&cols[i].1, &cols[j].1, &y)?;
            pairs.push(json!({"a": cols[i].0, "b": cols[j].0, "auc_a": d.auc_a, "auc_b": d.auc_b, "delong_z": d.z, "delong_p": d.p}));
        }
    }
    let n_pos = y.iter().filter(|&&p| p).count();
    Ok(json!({"n_positive": n_pos, "n_negative": y.len() - n_pos, "scores": per_score, "pairs": pairs}))
}

/// `stats diag`: counts and exact-CI proportions of a prediction column.
pub fn diag(csv: &Path, label: &str, positive: &str, pred: &str) -> Result<Value> {
    let t = Table::read(csv)?;
    let y = t.labels(label, positive)?;
    let p: Vec<bool> = t.column(pred)?.iter().map(|v| *v == positive).collect();
    let m = diagnostic::diagnostic_from_predictions(&p, &y, f64::NAN)?;
    let prop = |p: Option<diagnostic::Proportion>| match p {
        Some(p) => json!({"estimate": p.estimate, "ci_low": p.ci_low, "ci_high": p.ci_high, "num": p.num, "den": p.den}),
        None => Value::Null,
    };
    Ok(json!({
        "counts": {"tp": m.counts.tp, "fp": m.counts.fp, "tn": m.counts.tn, "fn": m.counts.fn_},
        "accuracy": prop(Some(m.accuracy)),
        "sensitivity": prop(m.sensitivity),
        "specificity": prop(m.specificity),
        "ppv": prop(m.ppv),
        "npv": prop(m.npv),
    }))
}

/// `stats kappa`: Cohen's kappa of two rating columns.
pub fn kappa(csv: &Path, a: &str, b: &str) -> Result<Value> {
    let t = Table::read(csv)?;
    let k = agreement::cohen_kappa(&t.column(a)?, &t.column(b)?)?;
    Ok(json!({"kappa": k.kappa, "se": k.se, "ci_low": k.ci_low, "ci_high": k.ci_high, "z": k.z, "p": k.p, "n": k.n}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asah() -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/asah.csv");
        p.exists().then_some(p)
    }

    #[test]
    fn roc_on_asah_matches_proc() {
        let Some(p) = asah() else { return };
        let v = roc(&p, "outcome", "Poor", &["wfns".into(), "s100b".into()]).unwrap();
        assert!((v["scores"]["s100b"]["auc"].as_f64().unwrap() - 0.7314).abs() < 5e-5);
        assert!((v["scores"]["s100b"]["auc_ci_low"].as_f64().unwrap() - 0.6301).abs() < 5e-5);
        assert!((v["pairs"][0]["delong_z"].as_f64().unwrap() - 2.209).abs() < 5e-4);
        assert!((v["pairs"][0]["delong_p"].as_f64().unwrap() - 0.02718).abs() < 5e-5);
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s.csv");
        std::fs::write(&f, "y,s,t\n1,0.5,a\n0,0.2,b\n1,x,a\n").unwrap();
        let e = roc(&f, "y", "1", &["s".into()]).unwrap_err().to_string();
        assert!(e.contains("row 3") && e.contains("`s`"), "{e}");
        let e = roc(&f, "y", "1", &["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("no column `nope`"), "{e}");
        let e = roc(&f, "y", "7", &["s".into()]).unwrap_err().to_string();
        assert!(e.contains("both classes"), "{e}");
        let k = kappa(&f, "t", "t").unwrap();
        assert_eq!(k["kappa"], 1.0);
        let d = diag(&f, "y", "1", "y").unwrap();
        assert_eq!(d["sensitivity"]["estimate"], 1.0);
    }
}
