//! The clinical-fusion SVM: the paper's final classifier on deep features + clinical variables.
//!
//! After federated training each site sends [`FeatureRow`]s; the coordinator builds a design
//! matrix for a [`FeatureSet`] (combined, images only, clinical only), imputes missing values
//! and standardises with statistics from **training rows only** ([`Preprocessor`]), and fits
//! a Gaussian-kernel SVM (linfa-svm) with Platt-scaled probabilities and class weights.
//! The decision value is the score used for ROC analysis (monotone in the probability,
//! without the ties that saturated probabilities would create).

use linfa::prelude::*;
use linfa_svm::Svm;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::cohort::{ClinicalTask, FeatureRow, encode_clinical};
use crate::error::{Error, Result};

/// Which columns feed the SVM (the paper's "combined", "images only", "clinical only").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureSet {
    Combined,
    ImagesOnly,
    ClinicalOnly,
}

impl FeatureSet {
    pub const ALL: [FeatureSet; 3] = [Self::ClinicalOnly, Self::ImagesOnly, Self::Combined];

    pub fn name(self) -> &'static str {
        match self {
            Self::Combined => "combined",
            Self::ImagesOnly => "images_only",
            Self::ClinicalOnly => "clinical_only",
        }
    }

    /// Raw (unscaled, possibly NaN) feature vector of one patient.
    pub fn raw_row(self, r: &FeatureRow) -> Vec<f64> {
        let deep = || r.deep.iter().map(|&v| f64::from(v));
        match self {
            Self::ImagesOnly => deep().collect(),
            Self::ClinicalOnly => encode_clinical(&r.clinical),
            Self::Combined => deep().chain(encode_clinical(&r.clinical)).collect(),
        }
    }
}

/// Mean imputation + standardisation, fitted on training rows only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Preprocessor {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl Preprocessor {
    /// Column means/std over non-missing training values; a constant column gets std 1.
    pub fn fit(train: &[Vec<f64>]) -> Result<Self> {
        let d = train.first().map(Vec::len).ok_or_else(|| Error::Fusion("no training rows".into()))?;
        let mut mean = vec![0.0; d];
        let mut std = vec![1.0; d];
        for j in 0..d {
            let vals: Vec<f64> = train.iter().map(|r| r[j]).filter(|v| !v.is_nan()).collect();
            if vals.is_empty() {
                continue; // all missing: imputes 0, contributes nothing
            }
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / vals.len() as f64;
            mean[j] = m;
            std[j] = if var > 1e-12 { var.sqrt() } else { 1.0 };
        }
        Ok(Self { mean, std })
    }

    pub fn transform(&self, rows: &[Vec<f64>]) -> Array2<f64> {
        let d = self.mean.len();
        Array2::from_shape_fn((rows.len(), d), |(i, j)| {
            let v = rows[i][j];
            if v.is_nan() { 0.0 } else { (v - self.mean[j]) / self.std[j] }
        })
    }
}

/// Hyper-parameters of the fusion SVM, validated at construction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FusionSvmParams {
    /// Soft-margin penalty C.
    pub c: f64,
    /// RBF width γ in `exp(-γ‖x-y‖²)`; `None` = 1 / number of features (sklearn's "scale"
    /// on standardised data).
    pub gamma: Option<f64>,
    /// Weight classes inversely to their frequency.
    pub balanced: bool,
}

impl Default for FusionSvmParams {
    fn default() -> Self {
        Self { c: 1.0, gamma: None, balanced: true }
    }
}

impl FusionSvmParams {
    pub fn validate(self) -> Result<Self> {
        if !(self.c.is_finite() && self.c > 0.0) {
            return Err(Error::Fusion(format!("C must be positive, got {}", self.c)));
        }
        if let Some(g) = self.gamma
            && !(g.is_finite() && g > 0.0) {
                return Err(Error::Fusion(format!("gamma must be positive, got {g}")));
            }
        Ok(self)
    }
}

/// A fitted fusion SVM for one binary task and feature set.
pub struct FusionSvm {
    pub task: ClinicalTask,
    pub features: FeatureSet,
    pub preprocessor: Preprocessor,
    svm: Svm<f64, Pr>,
}

impl FusionSvm {
    /// Fits on `train` rows (patients outside the task are skipped).
    pub fn fit(params: FusionSvmParams, task: ClinicalTask, features: FeatureSet, train: &[&FeatureRow]) -> Result<Self> {
        let (rows, labels): (Vec<&FeatureRow>, Vec<bool>) =
            train.iter().filter_map(|r| task.label(r.n_stage).map(|y| (*r, y))).unzip();
        Self::fit_labeled(params, task, features, &rows, &labels)
    }

    /// Fits on `train` rows with explicit binary labels (one-vs-rest, cross-validation folds).
    pub fn fit_labeled(params: FusionSvmParams, task: ClinicalTask, features: FeatureSet, train: &[&FeatureRow], labels: &[bool]) -> Result<Self> {
        let params = params.validate()?;
        let raw: Vec<Vec<f64>> = train.iter().map(|r| features.raw_row(r)).collect();
        let labels = labels.to_vec();
        let n_pos = labels.iter().filter(|&&y| y).count();
        let n_neg = labels.len() - n_pos;
        if n_pos < 2 || n_neg < 2 {
            return Err(Error::Fusion(format!(
                "{task:?}/{}: need at least 2 training patients per class, got {n_pos} positive and {n_neg} negative",
                features.name()
            )));
        }
        let preprocessor = Preprocessor::fit(&raw)?;
        let x = preprocessor.transform(&raw);
        let d = x.ncols() as f64;
        let gamma = params.gamma.unwrap_or(1.0 / d);
        let (c_pos, c_neg) = if params.balanced {
            let n = labels.len() as f64;
            (params.c * n / (2.0 * n_pos as f64), params.c * n / (2.0 * n_neg as f64))
        } else {
            (params.c, params.c)
        };
        let dataset = Dataset::new(x, Array1::from(labels));
        let svm = Svm::<f64, Pr>::params()
            .gaussian_kernel(1.0 / gamma)
            .pos_neg_weights(c_pos, c_neg)
            .fit(&dataset)
            .map_err(|e| Error::Fusion(format!("{task:?}/{}: {e}", features.name())))?;
        Ok(Self { task, features, preprocessor, svm })
    }

    /// Decision values (higher = more likely positive) for any rows.
    pub fn decision(&self, rows: &[&FeatureRow]) -> Vec<f64> {
        let raw: Vec<Vec<f64>> = rows.iter().map(|r| self.features.raw_row(r)).collect();
        let x = self.preprocessor.transform(&raw);
        x.rows().into_iter().map(|row| self.svm.weighted_sum(&row) - self.svm.rho).collect()
    }

    /// Platt-scaled probabilities of the positive class.
    pub fn probability(&self, rows: &[&FeatureRow]) -> Vec<f64> {
        let raw: Vec<Vec<f64>> = rows.iter().map(|r| self.features.raw_row(r)).collect();
        let x = self.preprocessor.transform(&raw);
        self.svm.predict(&x).iter().map(|p| f64::from(**p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cohort::{Clinical, NStage, Split};
    use crate::ids::SiteId;
    use crate::stats::auc;
    use rand::{Rng, SeedableRng};

    fn rows(n: usize, seed: u64) -> Vec<FeatureRow> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let pos = rng.random_bool(0.4);
                let shift = if pos { 1.0 } else { -1.0 };
                FeatureRow {
                    site: SiteId::new("s").unwrap(),
                    patient_id: format!("p{i}"),
                    split: Split::Train,
                    n_stage: if pos { NStage::N1to2 } else { NStage::N0 },
                    clinical: Clinical { age_years: Some(50.0 + 5.0 * shift + rng.random_range(-10.0..10.0)), ..Default::default() },
                    deep: (0..4).map(|_| shift * 0.8 + rng.random_range(-1.5f32..1.5)).collect(),
                    network_score: None,
                }
            })
            .collect()
    }

    #[test]
    fn separable_signal_is_learned_and_generalises() {
        let train = rows(120, 1);
        let test = rows(80, 2);
        let tr: Vec<&FeatureRow> = train.iter().collect();
        let te: Vec<&FeatureRow> = test.iter().collect();
        let labels: Vec<bool> = test.iter().map(|r| r.n_stage != NStage::N0).collect();
        let svm = FusionSvm::fit(FusionSvmParams::default(), ClinicalTask::N0VsNPlus, FeatureSet::Combined, &tr).unwrap();
        let a = auc(&svm.decision(&te), &labels).unwrap();
        assert!(a > 0.85, "AUC {a}");
        let p = svm.probability(&te);
        assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
        // Probabilities rank patients like decision values.
        assert!((auc(&p, &labels).unwrap() - a).abs() < 0.05);
    }

    #[test]
    fn preprocessing_uses_training_statistics_only() {
        let train = vec![vec![1.0, f64::NAN], vec![3.0, 5.0]];
        let p = Preprocessor::fit(&train).unwrap();
        assert_eq!(p.mean, vec![2.0, 5.0]);
        let x = p.transform(&[vec![100.0, f64::NAN]]);
        assert_eq!(x[[0, 0]], 98.0);
        assert_eq!(x[[0, 1]], 0.0);
    }

    #[test]
    fn cross_validation_uses_only_given_rows_and_picks_from_the_grid() {
        let train = rows(150, 4);
        let tr: Vec<&FeatureRow> = train.iter().collect();
        let y: Vec<bool> = train.iter().map(|r| r.n_stage != NStage::N0).collect();
        let folds = stratified_folds(&y, 5, 1);
        for f in 0..5 {
            let pos = (0..y.len()).filter(|&i| folds[i] == f && y[i]).count();
            let all_pos = y.iter().filter(|&&v| v).count();
            assert!(pos.abs_diff(all_pos / 5) <= 1, "fold {f} is not stratified");
        }
        let grid = CvGrid::default();
        let (best, points) = select_by_cv(FusionSvmParams::default(), &grid, ClinicalTask::N0VsNPlus, FeatureSet::Combined, &tr, &y).unwrap();
        assert_eq!(points.len(), 9);
        let top = points.iter().map(|p| p.mean_auc).fold(f64::MIN, f64::max);
        assert!(points.iter().any(|p| p.c == best.c && Some(p.gamma) == best.gamma && p.mean_auc == top));
        assert!(top > 0.8, "{points:?}");
    }

    #[test]
    fn bad_params_and_one_class_are_refused() {
        assert!(FusionSvmParams { c: -1.0, ..Default::default() }.validate().is_err());
        let train: Vec<FeatureRow> = rows(30, 3).into_iter().filter(|r| r.n_stage == NStage::N0).collect();
        let tr: Vec<&FeatureRow> = train.iter().collect();
        let e = FusionSvm::fit(FusionSvmParams::default(), ClinicalTask::N0VsNPlus, FeatureSet::ImagesOnly, &tr).err().unwrap();
        assert!(e.to_string().contains("at least 2"), "{e}");
    }
}

/// One point of the hyper-parameter search.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CvPoint {
    pub c: f64,
    pub gamma: f64,
    /// Mean AUC over the validation folds.
    pub mean_auc: f64,
}

/// Grid for [`select_by_cv`]: C values and γ as multiples of 1/d (d = number of features).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvGrid {
    pub c: Vec<f64>,
    pub gamma_scale: Vec<f64>,
    pub folds: usize,
    pub seed: u64,
}

impl Default for CvGrid {
    fn default() -> Self {
        Self { c: vec![0.1, 1.0, 10.0], gamma_scale: vec![0.25, 1.0, 4.0], folds: 5, seed: 2020 }
    }
}

/// Stratified k-fold assignment (deterministic for a seed).
pub fn stratified_folds(labels: &[bool], k: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut fold = vec![0; labels.len()];
    for class in [false, true] {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        idx.shuffle(&mut rng);
        for (j, i) in idx.into_iter().enumerate() {
            fold[i] = j % k;
        }
    }
    fold
}

/// Chooses (C, γ) by stratified k-fold cross-validation on the given **training** rows only,
/// maximising mean fold AUC; returns the chosen parameters and the whole grid.
pub fn select_by_cv(
    base: FusionSvmParams,
    grid: &CvGrid,
    task: ClinicalTask,
    features: FeatureSet,
    train: &[&FeatureRow],
    labels: &[bool],
) -> Result<(FusionSvmParams, Vec<CvPoint>)> {
    let d = train.first().map(|r| features.raw_row(r).len()).ok_or_else(|| Error::Fusion("no training rows".into()))? as f64;
    let k = grid.folds.max(2);
    let fold = stratified_folds(labels, k, grid.seed);
    let mut points = Vec::new();
    let mut best: Option<(f64, FusionSvmParams)> = None;
    for &c in &grid.c {
        for &gs in &grid.gamma_scale {
            let params = FusionSvmParams { c, gamma: Some(gs / d), ..base };
            let mut aucs = Vec::with_capacity(k);
            for f in 0..k {
                let split = |keep: bool| -> (Vec<&FeatureRow>, Vec<bool>) {
                    (0..train.len()).filter(|&i| (fold[i] == f) != keep).map(|i| (train[i], labels[i])).unzip()
                };
                let (tr, ytr) = split(true);
                let (va, yva) = split(false);
                let svm = FusionSvm::fit_labeled(params, task, features, &tr, &ytr)?;
                if let Ok(a) = crate::stats::auc(&svm.decision(&va), &yva) {
                    aucs.push(a);
                }
            }
            if aucs.is_empty() {
                continue;
            }
            let mean_auc = aucs.iter().sum::<f64>() / aucs.len() as f64;
            points.push(CvPoint { c, gamma: gs / d, mean_auc });
            if best.is_none_or(|(b, _)| mean_auc > b + 1e-12) {
                best = Some((mean_auc, params));
            }
        }
    }
    let (_, params) = best.ok_or_else(|| Error::Fusion("cross-validation produced no usable fold".into()))?;
    Ok((params, points))
}
