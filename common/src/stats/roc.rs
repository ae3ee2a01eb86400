//! ROC curves, AUC, DeLong inference, and the Hanley & McNeil (1982) standard error.
//!
//! Conventions follow pROC (Robin et al. 2011), so results can be checked against R:
//! a case is called positive when `score >= threshold`; ties between a positive and a
//! negative count 1/2 (the Mann-Whitney statistic); DeLong variances use sample variances
//! (denominator n-1) of the structural components; a CI is `AUC ± z·SE` clipped to [0, 1].
//!
//! References: DeLong, DeLong & Clarke-Pearson (1988) Biometrics 44:837-845; fast midrank
//! computation from Sun & Xu (2014) IEEE Signal Processing Letters 21:1389-1393.

use serde::{Deserialize, Serialize};

use super::{Z_95, two_sided_p};
use crate::error::{Error, Result};

/// Points of an empirical ROC curve, from (0,0) to (1,1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RocCurve {
    /// Thresholds in decreasing order; point `i` calls positive every score `>= thresholds[i]`.
    pub thresholds: Vec<f64>,
    pub fpr: Vec<f64>,
    pub tpr: Vec<f64>,
}

/// AUC with its DeLong standard error and 95% CI.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AucEstimate {
    pub auc: f64,
    pub se: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n_positive: usize,
    pub n_negative: usize,
}

impl std::fmt::Display for AucEstimate {
    /// `0.888 [0.828, 0.949]`, as the paper's tables print an AUC with its 95% CI.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3} [{:.3}, {:.3}]", self.auc, self.ci_low, self.ci_high)
    }
}

impl AucEstimate {
    /// An estimate with its 95% CI `auc ± z·se`, clipped to [0, 1] (pROC's convention).
    pub fn new(auc: f64, se: f64, n_positive: usize, n_negative: usize) -> Self {
        Self { auc, se, ci_low: (auc - Z_95 * se).max(0.0), ci_high: (auc + Z_95 * se).min(1.0), n_positive, n_negative }
    }
}

/// Result of a paired two-sided DeLong test of two AUCs on the same patients.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeLongTest {
    pub auc_a: f64,
    pub auc_b: f64,
    pub z: f64,
    pub p: f64,
}

pub(crate) fn split_by_label(scores: &[f64], labels: &[bool]) -> Result<(Vec<f64>, Vec<f64>)> {
    if scores.len() != labels.len() {
        return Err(Error::Stats(format!("{} scores but {} labels", scores.len(), labels.len())));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(Error::Stats(format!("score {i} is not finite")));
    }
    let pos: Vec<f64> = scores.iter().zip(labels).filter(|(_, l)| **l).map(|(s, _)| *s).collect();
    let neg: Vec<f64> = scores.iter().zip(labels).filter(|(_, l)| !**l).map(|(s, _)| *s).collect();
    if pos.is_empty() || neg.is_empty() {
        return Err(Error::Stats(format!(
            "need both classes, got {} positive and {} negative",
            pos.len(),
            neg.len()
        )));
    }
    Ok((pos, neg))
}

/// Midranks (1-based, ties get their average rank).
fn midranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[order[k]] = r;
        }
        i = j + 1;
    }
    ranks
}

/// DeLong's structural components: V10 (one per positive) and V01 (one per negative).
fn structural_components(pos: &[f64], neg: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let (m, n) = (pos.len(), neg.len());
    let all: Vec<f64> = pos.iter().chain(neg).copied().collect();
    let r_all = midranks(&all);
    let r_pos = midranks(pos);
    let r_neg = midranks(neg);
    let v10 = (0..m).map(|i| (r_all[i] - r_pos[i]) / n as f64).collect();
    let v01 = (0..n).map(|j| 1.0 - (r_all[m + j] - r_neg[j]) / m as f64).collect();
    (v10, v01)
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample covariance (denominator n-1); 0 for a single value.
fn cov(a: &[f64], b: &[f64]) -> f64 {
    if a.len() < 2 {
        return 0.0;
    }
    let (ma, mb) = (mean(a), mean(b));
    a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum::<f64>() / (a.len() - 1) as f64
}

/// Area under the ROC curve (Mann-Whitney, ties count 1/2).
pub fn auc(scores: &[f64], labels: &[bool]) -> Result<f64> {
    let (pos, neg) = split_by_label(scores, labels)?;
    Ok(mean(&structural_components(&pos, &neg).0))
}

/// AUC with DeLong standard error and 95% CI.
pub fn auc_delong(scores: &[f64], labels: &[bool]) -> Result<AucEstimate> {
    let (pos, neg) = split_by_label(scores, labels)?;
    let (v10, v01) = structural_components(&pos, &neg);
    let a = mean(&v10);
    let var = cov(&v10, &v10) / pos.len() as f64 + cov(&v01, &v01) / neg.len() as f64;
    Ok(AucEstimate::new(a, var.max(0.0).sqrt(), pos.len(), neg.len()))
}

/// Paired DeLong test of `AUC(a) - AUC(b)` for two scores of the same patients.
pub fn delong_paired(a: &[f64], b: &[f64], labels: &[bool]) -> Result<DeLongTest> {
    if a.len() != b.len() {
        return Err(Error::Stats("paired scores differ in length".into()));
    }
    let (pa, na) = split_by_label(a, labels)?;
    let (pb, nb) = split_by_label(b, labels)?;
    let (v10a, v01a) = structural_components(&pa, &na);
    let (v10b, v01b) = structural_components(&pb, &nb);
    let (m, n) = (pa.len() as f64, na.len() as f64);
    let (auc_a, auc_b) = (mean(&v10a), mean(&v10b));
    let var = (cov(&v10a, &v10a) + cov(&v10b, &v10b) - 2.0 * cov(&v10a, &v10b)) / m
        + (cov(&v01a, &v01a) + cov(&v01b, &v01b) - 2.0 * cov(&v01a, &v01b)) / n;
    let diff = auc_a - auc_b;
    let z = if var > 0.0 { diff / var.sqrt() } else if diff == 0.0 { 0.0 } else { f64::INFINITY.copysign(diff) };
    Ok(DeLongTest { auc_a, auc_b, z, p: two_sided_p(z) })
}

/// Hanley & McNeil (1982, Radiology 143:29-36) standard error of an AUC from the class
/// sizes alone: `Q1 = A/(2-A)`, `Q2 = 2A²/(1+A)`,
/// `SE² = [A(1-A) + (n₊-1)(Q1-A²) + (n₋-1)(Q2-A²)] / (n₊ n₋)`.
pub fn hanley_mcneil_se(auc: f64, n_positive: usize, n_negative: usize) -> f64 {
    let (a, np, nn) = (auc, n_positive as f64, n_negative as f64);
    let q1 = a / (2.0 - a);
    let q2 = 2.0 * a * a / (1.0 + a);
    ((a * (1.0 - a) + (np - 1.0) * (q1 - a * a) + (nn - 1.0) * (q2 - a * a)) / (np * nn)).max(0.0).sqrt()
}

/// Bivariate standard normal CDF `P(X <= h, Y <= k)` with correlation `rho`, by
/// `∫_{-∞}^{h} φ(x) Φ((k - ρx)/√(1-ρ²)) dx` (composite Simpson, 4000 panels on [-10, h]).
pub fn bivariate_normal_cdf(h: f64, k: f64, rho: f64) -> f64 {
    use super::normal_cdf;
    if rho >= 1.0 - 1e-12 {
        return normal_cdf(h.min(k));
    }
    if rho <= -1.0 + 1e-12 {
        return (normal_cdf(h) + normal_cdf(k) - 1.0).max(0.0);
    }
    let lo = -10.0f64;
    if h <= lo {
        return 0.0;
    }
    let s = (1.0 - rho * rho).sqrt();
    let f = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt() * normal_cdf((k - rho * x) / s);
    let n = 4000;
    let step = (h - lo) / n as f64;
    let mut acc = f(lo) + f(h);
    for i in 1..n {
        acc += f(lo + i as f64 * step) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    acc * step / 3.0
}

/// Correlation between two AUC estimates from the same cases, given the average AUC and the
/// average correlation of the two tests' ratings within positives and within negatives
/// (Hanley & McNeil 1983, Radiology 148:839-843). Their Table 1 tabulates this under an
/// equal-variance binormal model; here it is computed from that model instead of looked up:
/// with `a = Φ⁻¹(A)`, positives' latent scores are `N(√2·a, 1)` against `N(0, 1)` negatives,
/// each positive's placement value is `Φ(X)`, and
/// `r = [Φ₂(a, a; ρ/2) − Φ(a)²] / [Φ₂(a, a; 1/2) − Φ(a)²]` (the same in negatives by symmetry).
pub fn hanley_mcneil_area_correlation(avg_auc: f64, avg_rating_corr: f64) -> Result<f64> {
    if !(0.0..1.0).contains(&avg_auc) || !(-1.0..=1.0).contains(&avg_rating_corr) {
        return Err(Error::Stats(format!("need 0 <= AUC < 1 and -1 <= r <= 1, got {avg_auc}, {avg_rating_corr}")));
    }
    use statrs::distribution::{ContinuousCDF, Normal};
    let a = Normal::standard().inverse_cdf(avg_auc.max(1e-9));
    let p = super::normal_cdf(a);
    let var = bivariate_normal_cdf(a, a, 0.5) - p * p;
    let cov = bivariate_normal_cdf(a, a, avg_rating_corr / 2.0) - p * p;
    Ok(if var > 0.0 { (cov / var).clamp(-1.0, 1.0) } else { 0.0 })
}

/// Result of the Hanley & McNeil (1983) comparison of two correlated AUCs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HanleyMcNeilTest {
    pub auc_a: f64,
    pub auc_b: f64,
    pub se_a: f64,
    pub se_b: f64,
    /// Correlation between the two areas.
    pub r: f64,
    pub z: f64,
    pub p: f64,
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let (mx, my) = (mean(x), mean(y));
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    if sxx == 0.0 || syy == 0.0 { 0.0 } else { sxy / (sxx * syy).sqrt() }
}

/// Hanley & McNeil (1983): `z = (A1 - A2) / √(SE1² + SE2² - 2·r·SE1·SE2)` with the 1982 SEs
/// and `r` from [`hanley_mcneil_area_correlation`] of the average AUC and the average Pearson
/// correlation of the two scores within positives and within negatives.
pub fn hanley_mcneil_paired(a: &[f64], b: &[f64], labels: &[bool]) -> Result<HanleyMcNeilTest> {
    if a.len() != b.len() {
        return Err(Error::Stats("paired scores differ in length".into()));
    }
    let ea = auc_hanley_mcneil(a, labels)?;
    let eb = auc_hanley_mcneil(b, labels)?;
    let group = |want: bool, s: &[f64]| -> Vec<f64> { s.iter().zip(labels).filter(|(_, l)| **l == want).map(|(v, _)| *v).collect() };
    let r_pos = pearson(&group(true, a), &group(true, b));
    let r_neg = pearson(&group(false, a), &group(false, b));
    let r = hanley_mcneil_area_correlation(((ea.auc + eb.auc) / 2.0).min(0.999_999), (r_pos + r_neg) / 2.0)?;
    let var = ea.se.powi(2) + eb.se.powi(2) - 2.0 * r * ea.se * eb.se;
    let diff = ea.auc - eb.auc;
    let z = if var > 0.0 { diff / var.sqrt() } else { 0.0 };
    Ok(HanleyMcNeilTest { auc_a: ea.auc, auc_b: eb.auc, se_a: ea.se, se_b: eb.se, r, z, p: two_sided_p(z) })
}

/// AUC with the Hanley & McNeil standard error and 95% CI.
pub fn auc_hanley_mcneil(scores: &[f64], labels: &[bool]) -> Result<AucEstimate> {
    let (pos, neg) = split_by_label(scores, labels)?;
    let a = mean(&structural_components(&pos, &neg).0);
    Ok(AucEstimate::new(a, hanley_mcneil_se(a, pos.len(), neg.len()), pos.len(), neg.len()))
}

/// Empirical ROC curve at every distinct score.
pub fn roc_curve(scores: &[f64], labels: &[bool]) -> Result<RocCurve> {
    let (pos, neg) = split_by_label(scores, labels)?;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let (m, n) = (pos.len() as f64, neg.len() as f64);
    let mut curve = RocCurve { thresholds: vec![f64::INFINITY], fpr: vec![0.0], tpr: vec![0.0] };
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut i = 0;
    while i < order.len() {
        let t = scores[order[i]];
        while i < order.len() && scores[order[i]] == t {
            if labels[order[i]] { tp += 1 } else { fp += 1 }
            i += 1;
        }
        curve.thresholds.push(t);
        curve.fpr.push(fp as f64 / n);
        curve.tpr.push(tp as f64 / m);
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// pROC's aSAH data (shared/data/asah.csv), or None when the file is not beside the repo.
    /// (poor outcome, s100b, wfns, ndka) per patient.
    type Asah = (Vec<bool>, Vec<f64>, Vec<f64>, Vec<f64>);

    fn asah() -> Option<Asah> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/asah.csv");
        let mut rdr = csv::Reader::from_path(path).ok()?;
        let (mut y, mut s100b, mut wfns, mut ndka) = (vec![], vec![], vec![], vec![]);
        for r in rdr.records() {
            let r = r.unwrap();
            y.push(&r[1] == "Poor");
            wfns.push(r[4].parse().unwrap());
            s100b.push(r[5].parse().unwrap());
            ndka.push(r[6].parse().unwrap());
        }
        Some((y, s100b, wfns, ndka))
    }

    #[test]
    fn matches_published_proc_values_on_asah() {
        let Some((y, s100b, wfns, ndka)) = asah() else {
            eprintln!("shared/data/asah.csv not found; skipping the pROC reference check");
            return;
        };
        assert_eq!(y.iter().filter(|&&p| p).count(), 41);
        let e = auc_delong(&s100b, &y).unwrap();
        assert!((e.auc - 0.7314).abs() < 5e-5, "{e:?}");
        assert!((e.ci_low - 0.6301).abs() < 5e-5 && (e.ci_high - 0.8326).abs() < 5e-5, "{e:?}");
        assert!((auc(&wfns, &y).unwrap() - 0.8237).abs() < 5e-5);
        assert!((auc(&ndka, &y).unwrap() - 0.6120).abs() < 5e-5);
        let t = delong_paired(&wfns, &s100b, &y).unwrap();
        assert!((t.z - 2.209).abs() < 5e-4 && (t.p - 0.02718).abs() < 5e-5, "{t:?}");
        let back = delong_paired(&s100b, &wfns, &y).unwrap();
        assert!((back.z + t.z).abs() < 1e-12 && (back.p - t.p).abs() < 1e-12);
    }

    #[test]
    fn hand_computed_small_case() {
        // pos {0.9, 0.4}, neg {0.4, 0.1}: pairs 1 + 1 + 0.5 + 1 = 3.5 of 4.
        let s = [0.9, 0.4, 0.4, 0.1];
        let y = [true, true, false, false];
        let e = auc_delong(&s, &y).unwrap();
        assert!((e.auc - 0.875).abs() < 1e-12);
        // V10 = {1, 0.75}, V01 = {0.75, 1}: var = 0.03125/2 + 0.03125/2.
        assert!((e.se - 0.03125f64.sqrt()).abs() < 1e-12);
        let roc = roc_curve(&s, &y).unwrap();
        assert_eq!(roc.fpr, vec![0.0, 0.0, 0.5, 1.0]);
        assert_eq!(roc.tpr, vec![0.0, 0.5, 1.0, 1.0]);
    }

    #[test]
    fn identities() {
        let s = [0.3, 0.8, 0.1, 0.5, 0.5, 0.9, 0.2];
        let y = [false, true, false, true, false, true, true];
        let a = auc(&s, &y).unwrap();
        let rev: Vec<f64> = s.iter().map(|v| -v).collect();
        assert!((auc(&rev, &y).unwrap() - (1.0 - a)).abs() < 1e-12);
        let same = delong_paired(&s, &s, &y).unwrap();
        assert_eq!((same.z, same.p), (0.0, 1.0));
        // Trapezoidal area under the ROC points equals the Mann-Whitney AUC.
        let roc = roc_curve(&s, &y).unwrap();
        let trap: f64 = (1..roc.fpr.len()).map(|i| (roc.fpr[i] - roc.fpr[i - 1]) * (roc.tpr[i] + roc.tpr[i - 1]) / 2.0).sum();
        assert!((trap - a).abs() < 1e-12);
        assert!(auc(&s, &[true; 7]).is_err());
        assert!((super::super::normal_cdf(1.959_963_984_540_054) - 0.975).abs() < 1e-12);
    }

    #[test]
    fn bivariate_normal_and_area_correlation_identities() {
        // Φ₂(0, 0; ρ) = 1/4 + asin(ρ)/(2π) (Sheppard 1899).
        for rho in [-0.7, 0.0, 0.3, 0.9] {
            let exact = 0.25 + f64::asin(rho) / (2.0 * std::f64::consts::PI);
            assert!((bivariate_normal_cdf(0.0, 0.0, rho) - exact).abs() < 1e-9, "rho {rho}");
        }
        // Independence factorises.
        let (h, k) = (0.4, -1.1);
        let ind = super::super::normal_cdf(h) * super::super::normal_cdf(k);
        assert!((bivariate_normal_cdf(h, k, 0.0) - ind).abs() < 1e-9);
        // At A = 0.5 the area correlation is the rank correlation of the latent normals, 6/π·asin(ρ/2).
        for rho in [0.2, 0.5, 0.8] {
            let r = hanley_mcneil_area_correlation(0.5, rho).unwrap();
            assert!((r - 6.0 / std::f64::consts::PI * f64::asin(rho / 2.0)).abs() < 1e-6, "rho {rho}: {r}");
        }
        assert!(hanley_mcneil_area_correlation(0.8, 0.0).unwrap().abs() < 1e-9);
        assert!((hanley_mcneil_area_correlation(0.8, 1.0).unwrap() - 1.0).abs() < 1e-6);
        // Higher rating correlation → higher area correlation, and r slightly below the rating correlation.
        let (r1, r2) = (hanley_mcneil_area_correlation(0.85, 0.3).unwrap(), hanley_mcneil_area_correlation(0.85, 0.6).unwrap());
        assert!(r1 < r2 && r2 < 0.6 && r2 > 0.5);
    }

    #[test]
    fn hanley_mcneil_comparison_behaves_like_delong_on_asah() {
        let Some((y, s100b, wfns, _)) = asah() else { return };
        let hm = hanley_mcneil_paired(&wfns, &s100b, &y).unwrap();
        let dl = delong_paired(&wfns, &s100b, &y).unwrap();
        assert!((hm.auc_a - dl.auc_a).abs() < 1e-12);
        // Same direction; the binormal approximation lands near DeLong's z = 2.209.
        assert!(hm.z > 1.0 && hm.z < 3.5, "{hm:?}");
        // r = 0 reduces to the unpaired comparison of two independent AUCs.
        let unpaired = (hm.auc_a - hm.auc_b) / (hm.se_a.powi(2) + hm.se_b.powi(2)).sqrt();
        assert!(hm.r > 0.0 && hm.z > unpaired);
    }

    #[test]
    fn hanley_mcneil_se_by_hand() {
        // A = 0.8, 50 + 50: Q1 = 2/3, Q2 = 0.64·2/1.8; SE² = (0.16 + 49(Q1-0.64) + 49(Q2-0.64)) / 2500.
        let q1: f64 = 0.8 / 1.2;
        let q2: f64 = 1.28 / 1.8;
        let expected = ((0.16 + 49.0 * (q1 - 0.64) + 49.0 * (q2 - 0.64)) / 2500.0).sqrt();
        assert!((hanley_mcneil_se(0.8, 50, 50) - expected).abs() < 1e-12);
        assert!((expected - 0.0445).abs() < 1e-4);
        // Larger samples, smaller SE; a perfect AUC has SE 0.
        assert!(hanley_mcneil_se(0.8, 200, 200) < hanley_mcneil_se(0.8, 50, 50));
        assert_eq!(hanley_mcneil_se(1.0, 30, 30), 0.0);
    }
}
