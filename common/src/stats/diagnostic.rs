//! Performance at a threshold: the Youden-optimal cut-off (chosen on training data only),
//! then accuracy, sensitivity, specificity, PPV and NPV, each with an exact
//! Clopper-Pearson (1934, Biometrika 26:404-413) 95% interval, as R's `binom.test`.

use serde::{Deserialize, Serialize};
use statrs::distribution::{Beta, ContinuousCDF};

use super::roc::split_by_label;
use crate::error::{Error, Result};

/// A proportion `num / den` with its exact 95% CI.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Proportion {
    pub estimate: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub num: usize,
    pub den: usize,
}

/// Clopper-Pearson interval for `x` successes in `n` trials at level `1 - alpha`.
pub fn clopper_pearson(x: usize, n: usize, alpha: f64) -> Result<Proportion> {
    if n == 0 || x > n {
        return Err(Error::Stats(format!("a proportion needs 0 <= x <= n and n > 0, got {x}/{n}")));
    }
    let (xf, nf) = (x as f64, n as f64);
    let beta = |a: f64, b: f64| Beta::new(a, b).map_err(|e| Error::Stats(e.to_string()));
    let ci_low = if x == 0 { 0.0 } else { beta(xf, nf - xf + 1.0)?.inverse_cdf(alpha / 2.0) };
    let ci_high = if x == n { 1.0 } else { beta(xf + 1.0, nf - xf)?.inverse_cdf(1.0 - alpha / 2.0) };
    Ok(Proportion { estimate: xf / nf, ci_low, ci_high, num: x, den: n })
}

/// Counts of a binary classification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

impl Confusion {
    pub fn from_predictions(pred: &[bool], labels: &[bool]) -> Self {
        let mut c = Self::default();
        for (&p, &y) in pred.iter().zip(labels) {
            match (p, y) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }
}

/// The paper's table columns for one method on one cohort.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiagnosticMetrics {
    pub threshold: f64,
    pub counts: Confusion,
    pub accuracy: Proportion,
    pub sensitivity: Option<Proportion>,
    pub specificity: Option<Proportion>,
    pub ppv: Option<Proportion>,
    pub npv: Option<Proportion>,
}

/// Metrics of calling positive every case whose `score >= threshold`.
pub fn diagnostic_at(scores: &[f64], labels: &[bool], threshold: f64) -> Result<DiagnosticMetrics> {
    if scores.len() != labels.len() || scores.is_empty() {
        return Err(Error::Stats(format!("{} scores for {} labels", scores.len(), labels.len())));
    }
    let pred: Vec<bool> = scores.iter().map(|&s| s >= threshold).collect();
    diagnostic_from_predictions(&pred, labels, threshold)
}

/// Metrics of given binary predictions (`threshold` is only recorded).
pub fn diagnostic_from_predictions(pred: &[bool], labels: &[bool], threshold: f64) -> Result<DiagnosticMetrics> {
    let c = Confusion::from_predictions(pred, labels);
    let p = |x: usize, n: usize| if n == 0 { Ok(None) } else { clopper_pearson(x, n, 0.05).map(Some) };
    Ok(DiagnosticMetrics {
        threshold,
        counts: c,
        accuracy: clopper_pearson(c.tp + c.tn, pred.len(), 0.05)?,
        sensitivity: p(c.tp, c.tp + c.fn_)?,
        specificity: p(c.tn, c.tn + c.fp)?,
        ppv: p(c.tp, c.tp + c.fp)?,
        npv: p(c.tn, c.tn + c.fn_)?,
    })
}

/// The threshold maximising Youden's J = sensitivity + specificity - 1, taken (as pROC does)
/// at the midpoint between consecutive distinct scores; ties resolve to the higher threshold.
pub fn youden_threshold(scores: &[f64], labels: &[bool]) -> Result<f64> {
    let (pos, neg) = split_by_label(scores, labels)?;
    let mut distinct: Vec<f64> = scores.to_vec();
    distinct.sort_by(f64::total_cmp);
    distinct.dedup();
    let mut candidates = Vec::with_capacity(distinct.len() + 1);
    candidates.push(f64::NEG_INFINITY);
    candidates.extend(distinct.windows(2).map(|w| (w[0] + w[1]) / 2.0));
    candidates.push(f64::INFINITY);
    let (np, nn) = (pos.len() as f64, neg.len() as f64);
    let mut best = (f64::NEG_INFINITY, f64::INFINITY);
    for t in candidates.into_iter().rev() {
        let sens = pos.iter().filter(|&&s| s >= t).count() as f64 / np;
        let spec = neg.iter().filter(|&&s| s < t).count() as f64 / nn;
        let j = sens + spec - 1.0;
        if j > best.0 + 1e-12 {
            best = (j, t);
        }
    }
    Ok(best.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clopper_pearson_matches_binom_test() {
        // R: binom.test(7, 20)$conf.int = 0.1539092 0.5921885
        let p = clopper_pearson(7, 20, 0.05).unwrap();
        assert!((p.ci_low - 0.1539092).abs() < 1e-6 && (p.ci_high - 0.5921885).abs() < 1e-6, "{p:?}");
        // Closed forms at the edges: x = 0 → upper 1 - (α/2)^(1/n); x = n → lower (α/2)^(1/n).
        let z = clopper_pearson(0, 10, 0.05).unwrap();
        assert_eq!(z.ci_low, 0.0);
        assert!((z.ci_high - (1.0 - 0.025f64.powf(0.1))).abs() < 1e-9);
        let f = clopper_pearson(10, 10, 0.05).unwrap();
        assert!((f.ci_low - 0.025f64.powf(0.1)).abs() < 1e-9 && f.ci_high == 1.0);
        assert!(clopper_pearson(3, 2, 0.05).is_err());
    }

    #[test]
    fn metrics_by_hand() {
        let s = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1];
        let y = [true, true, false, true, false, false, true, false];
        let m = diagnostic_at(&s, &y, 0.5).unwrap();
        assert_eq!(m.counts, Confusion { tp: 3, fp: 1, tn: 3, fn_: 1 });
        assert_eq!(m.accuracy.estimate, 0.75);
        assert_eq!(m.sensitivity.unwrap().estimate, 0.75);
        assert_eq!(m.ppv.unwrap().num, 3);
        assert_eq!(m.npv.unwrap().den, 4);
    }

    #[test]
    fn youden_picks_the_best_midpoint() {
        let s = [0.1, 0.2, 0.35, 0.4, 0.8, 0.9];
        let y = [false, false, false, true, true, true];
        assert!((youden_threshold(&s, &y).unwrap() - 0.375).abs() < 1e-12);
        let t = youden_threshold(&[0.3, 0.1, 0.7, 0.5], &[false, false, true, true]).unwrap();
        assert!((t - 0.4).abs() < 1e-12);
    }
}
