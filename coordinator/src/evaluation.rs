//! Cross-center evaluation of the fused model on pooled feature rows: the paper's three
//! tasks and its controls, pooled and per site.
//!
//! Everything learned — SVM hyper-parameters (cross-validation), imputation, scaling, SVM
//! weights and the Youden-optimal threshold — comes from the pooled **training** rows only;
//! validation and test rows are only ever scored with it. Test AUCs carry DeLong 95% CIs,
//! the combined model is compared with every other method by the paired DeLong test, and
//! accuracy, sensitivity, specificity, PPV and NPV carry exact Clopper-Pearson CIs.

use std::collections::BTreeMap;

use aln_common::cohort::{ClinicalTask, FeatureRow, NStage, Split};
use aln_common::fusion::{CvGrid, CvPoint, FeatureSet, FusionSvm, FusionSvmParams, select_by_cv};
use aln_common::stats::diagnostic::{self, DiagnosticMetrics, Proportion, clopper_pearson};
use aln_common::stats::{self, AucEstimate, DeLongTest, HanleyMcNeilTest, RocCurve};
use serde::Serialize;

/// AUC and threshold metrics of one method on one group of patients.
#[derive(Debug, Clone, Serialize)]
pub struct CohortMetrics {
    pub n: usize,
    pub auc: Option<AucEstimate>,
    pub at_threshold: Option<DiagnosticMetrics>,
}

/// One method's results on one task.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub method: String,
    /// SVM hyper-parameters chosen by cross-validation (None for non-SVM controls).
    pub params: Option<FusionSvmParams>,
    pub cv_grid: Vec<CvPoint>,
    /// Youden-optimal threshold on the training rows, applied unchanged elsewhere.
    pub threshold: f64,
    pub train: CohortMetrics,
    pub validation: CohortMetrics,
    pub test: CohortMetrics,
    /// Each site's own test patients, scored by the pooled model.
    pub per_site_test: BTreeMap<String, CohortMetrics>,
    pub roc_test: Option<RocCurve>,
}

impl MethodResult {
    /// Pooled test AUC estimate, if defined.
    pub fn pooled_test(&self) -> Option<&AucEstimate> {
        self.test.auc.as_ref()
    }
}

/// A scored test patient (the report lists exactly the test rows it evaluated).
#[derive(Debug, Clone, Serialize)]
pub struct ScoredPatient {
    pub site: String,
    pub patient_id: String,
    pub label: bool,
    pub scores: BTreeMap<String, f64>,
}

/// Everything computed for one binary task.
#[derive(Debug, Clone, Serialize)]
pub struct TaskEvaluation {
    pub task: ClinicalTask,
    pub n_train: usize,
    pub n_validation: usize,
    pub n_test: usize,
    pub methods: Vec<MethodResult>,
    /// Paired DeLong test on pooled test patients: combined vs each other method.
    pub delong_combined_vs: BTreeMap<String, DeLongTest>,
    /// Hanley & McNeil (1983) test of combined vs the axillary US finding, as in the paper.
    pub hanley_mcneil_combined_vs_axillary_us: Option<HanleyMcNeilTest>,
    pub test_patients: Vec<ScoredPatient>,
}

impl TaskEvaluation {
    pub fn method(&self, name: &str) -> Option<&MethodResult> {
        self.methods.iter().find(|m| m.method == name)
    }
}

/// Task 3: N0 / N+(1-2) / N+(≥3) with one-vs-rest SVMs on the combined features.
#[derive(Debug, Clone, Serialize)]
pub struct MultiClassEvaluation {
    pub classes: Vec<String>,
    pub n_train: usize,
    pub n_test: usize,
    pub accuracy: Proportion,
    pub per_class_recall: BTreeMap<String, Option<Proportion>>,
    /// `confusion[true][predicted]` on pooled test patients.
    pub confusion: Vec<Vec<usize>>,
    pub per_site_accuracy: BTreeMap<String, Proportion>,
}

/// Name of the "axillary US finding alone" control.
pub const AXILLARY_US: &str = "axillary_us";

fn axillary_score(r: &FeatureRow) -> f64 {
    match r.clinical.axillary_us_positive {
        Some(true) => 1.0,
        Some(false) => 0.0,
        None => 0.5,
    }
}

fn cohort_metrics(scores: &[f64], labels: &[bool], threshold: f64) -> CohortMetrics {
    CohortMetrics {
        n: scores.len(),
        auc: stats::auc_delong(scores, labels).ok(),
        at_threshold: diagnostic::diagnostic_at(scores, labels, threshold).ok(),
    }
}

/// Rows of one split that belong to `task`, with their labels.
fn task_rows(rows: &[FeatureRow], task: ClinicalTask, split: Split) -> (Vec<&FeatureRow>, Vec<bool>) {
    rows.iter().filter(|r| r.split == split).filter_map(|r| task.label(r.n_stage).map(|y| (r, y))).unzip()
}

/// How a control experiment turns its own feature rows into a score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraScore {
    /// SVM on that experiment's deep features + clinical variables (the modality controls).
    CombinedSvm,
    /// The network's own output probability (the ResNet50+C control).
    NetworkScore,
}

/// A method scored from another experiment's features of the same patients.
#[derive(Debug, Clone, Copy)]
pub struct ExtraMethod<'a> {
    pub name: &'a str,
    pub rows: &'a [FeatureRow],
    pub score: ExtraScore,
}

/// The counterparts of `main` rows in another experiment's rows (same site and patient).
fn align<'a>(main: &[&FeatureRow], other: &'a [FeatureRow]) -> Option<Vec<&'a FeatureRow>> {
    let by_id: BTreeMap<(&str, &str), &FeatureRow> = other.iter().map(|r| ((r.site.as_str(), r.patient_id.as_str()), r)).collect();
    main.iter().map(|r| by_id.get(&(r.site.as_str(), r.patient_id.as_str())).copied()).collect()
}

/// Fits and scores every method for a binary `task`; `extras` adds control methods whose
/// scores come from other experiments of the study, on the same patients.
pub fn evaluate_task(
    rows: &[FeatureRow],
    task: ClinicalTask,
    params: FusionSvmParams,
    grid: &CvGrid,
    extras: &[ExtraMethod<'_>],
) -> aln_common::Result<TaskEvaluation> {
    let (train, y_train) = task_rows(rows, task, Split::Train);
    let (val, y_val) = task_rows(rows, task, Split::Validation);
    let (test, y_test) = task_rows(rows, task, Split::Test);
    let mut sites: Vec<String> = test.iter().map(|r| r.site.to_string()).collect();
    sites.sort();
    sites.dedup();

    let mut test_scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut methods = Vec::new();
    let mut add = |name: &str, chosen: Option<FusionSvmParams>, cv_grid: Vec<CvPoint>, s_train: Vec<f64>, s_val: Vec<f64>, s_test: Vec<f64>| -> aln_common::Result<()> {
        let threshold = diagnostic::youden_threshold(&s_train, &y_train)?;
        let per_site_test = sites
            .iter()
            .map(|site| {
                let (s, y): (Vec<f64>, Vec<bool>) = test
                    .iter()
                    .zip(&s_test)
                    .zip(&y_test)
                    .filter(|((r, _), _)| r.site.as_str() == site)
                    .map(|((_, s), y)| (*s, *y))
                    .unzip();
                (site.clone(), cohort_metrics(&s, &y, threshold))
            })
            .collect();
        methods.push(MethodResult {
            method: name.to_string(),
            params: chosen,
            cv_grid,
            threshold,
            train: cohort_metrics(&s_train, &y_train, threshold),
            validation: cohort_metrics(&s_val, &y_val, threshold),
            test: cohort_metrics(&s_test, &y_test, threshold),
            per_site_test,
            roc_test: stats::roc_curve(&s_test, &y_test).ok(),
        });
        test_scores.insert(name.to_string(), s_test);
        Ok(())
    };

    let ax = |rs: &[&FeatureRow]| rs.iter().map(|r| axillary_score(r)).collect::<Vec<_>>();
    add(AXILLARY_US, None, vec![], ax(&train), ax(&val), ax(&test))?;
    for set in FeatureSet::ALL {
        let (chosen, cv_grid) = select_by_cv(params, grid, task, set, &train, &y_train)?;
        let svm = FusionSvm::fit_labeled(chosen, task, set, &train, &y_train)?;
        add(set.name(), Some(chosen), cv_grid, svm.decision(&train), svm.decision(&val), svm.decision(&test))?;
    }
    for extra in extras {
        let (Some(tr), Some(va), Some(te)) = (align(&train, extra.rows), align(&val, extra.rows), align(&test, extra.rows)) else {
            tracing::warn!(method = extra.name, "skipped: its experiment lacks some of the main model's patients");
            continue;
        };
        match extra.score {
            ExtraScore::CombinedSvm => {
                let (chosen, cv_grid) = select_by_cv(params, grid, task, FeatureSet::Combined, &tr, &y_train)?;
                let svm = FusionSvm::fit_labeled(chosen, task, FeatureSet::Combined, &tr, &y_train)?;
                add(extra.name, Some(chosen), cv_grid, svm.decision(&tr), svm.decision(&va), svm.decision(&te))?;
            }
            ExtraScore::NetworkScore => {
                let s = |rs: &[&FeatureRow]| rs.iter().map(|r| r.network_score.map_or(f64::NAN, f64::from)).collect::<Vec<_>>();
                let (s_tr, s_va, s_te) = (s(&tr), s(&va), s(&te));
                if s_tr.iter().chain(&s_va).chain(&s_te).any(|v| v.is_nan()) {
                    tracing::warn!(method = extra.name, "skipped: some rows carry no network score");
                    continue;
                }
                add(extra.name, None, vec![], s_tr, s_va, s_te)?;
            }
        }
    }

    let combined = &test_scores[FeatureSet::Combined.name()];
    let delong_combined_vs = test_scores
        .iter()
        .filter(|(k, _)| k.as_str() != FeatureSet::Combined.name())
        .filter_map(|(k, s)| stats::delong_paired(combined, s, &y_test).ok().map(|t| (k.clone(), t)))
        .collect();
    let hanley_mcneil_combined_vs_axillary_us = stats::hanley_mcneil_paired(combined, &test_scores[AXILLARY_US], &y_test).ok();
    let test_patients = test
        .iter()
        .enumerate()
        .map(|(i, r)| ScoredPatient {
            site: r.site.to_string(),
            patient_id: r.patient_id.clone(),
            label: y_test[i],
            scores: test_scores.iter().map(|(k, v)| (k.clone(), v[i])).collect(),
        })
        .collect();
    Ok(TaskEvaluation {
        task,
        n_train: train.len(),
        n_validation: val.len(),
        n_test: test.len(),
        methods,
        delong_combined_vs,
        hanley_mcneil_combined_vs_axillary_us,
        test_patients,
    })
}

/// External validation of one leave-one-site-out experiment: SVMs fitted on the training
/// rows of the other sites (features from the model federated without the held-out site),
/// tested on every patient of the held-out site.
#[derive(Debug, Clone, Serialize)]
pub struct LosoResult {
    pub held_out: String,
    pub n_train: usize,
    pub n_test: usize,
    pub methods: BTreeMap<String, Option<AucEstimate>>,
}

pub fn evaluate_loso(held_out: &str, rows: &[FeatureRow], params: FusionSvmParams, grid: &CvGrid) -> aln_common::Result<LosoResult> {
    let task = ClinicalTask::N0VsNPlus;
    let (train, y_train): (Vec<&FeatureRow>, Vec<bool>) = rows
        .iter()
        .filter(|r| r.site.as_str() != held_out && r.split == Split::Train)
        .filter_map(|r| task.label(r.n_stage).map(|y| (r, y)))
        .unzip();
    let (test, y_test): (Vec<&FeatureRow>, Vec<bool>) =
        rows.iter().filter(|r| r.site.as_str() == held_out).filter_map(|r| task.label(r.n_stage).map(|y| (r, y))).unzip();
    let mut methods = BTreeMap::new();
    let ax: Vec<f64> = test.iter().map(|r| axillary_score(r)).collect();
    methods.insert(AXILLARY_US.to_string(), stats::auc_delong(&ax, &y_test).ok());
    for set in FeatureSet::ALL {
        let (chosen, _) = select_by_cv(params, grid, task, set, &train, &y_train)?;
        let svm = FusionSvm::fit_labeled(chosen, task, set, &train, &y_train)?;
        methods.insert(set.name().to_string(), stats::auc_delong(&svm.decision(&test), &y_test).ok());
    }
    Ok(LosoResult { held_out: held_out.to_string(), n_train: train.len(), n_test: test.len(), methods })
}

/// Task 3 with one-vs-rest SVMs (combined features, parameters from task 1's search),
/// predicting the class of highest Platt probability.
pub fn evaluate_three_class(rows: &[FeatureRow], params: FusionSvmParams) -> aln_common::Result<MultiClassEvaluation> {
    let train: Vec<&FeatureRow> = rows.iter().filter(|r| r.split == Split::Train).collect();
    let test: Vec<&FeatureRow> = rows.iter().filter(|r| r.split == Split::Test).collect();
    let mut probs = vec![vec![0.0; NStage::ALL.len()]; test.len()];
    for (c, class) in NStage::ALL.iter().enumerate() {
        let y: Vec<bool> = train.iter().map(|r| r.n_stage == *class).collect();
        let svm = FusionSvm::fit_labeled(params, ClinicalTask::N0VsNPlus, FeatureSet::Combined, &train, &y)?;
        for (i, p) in svm.probability(&test).into_iter().enumerate() {
            probs[i][c] = p;
        }
    }
    let predicted: Vec<usize> = probs
        .iter()
        .map(|p| p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i))
        .collect();
    let k = NStage::ALL.len();
    let mut confusion = vec![vec![0usize; k]; k];
    for (r, &p) in test.iter().zip(&predicted) {
        confusion[r.n_stage.index()][p] += 1;
    }
    let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
    let per_class_recall = NStage::ALL
        .iter()
        .map(|c| {
            let row = &confusion[c.index()];
            let n: usize = row.iter().sum();
            (c.to_string(), if n == 0 { None } else { clopper_pearson(row[c.index()], n, 0.05).ok() })
        })
        .collect();
    let mut per_site: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (r, &p) in test.iter().zip(&predicted) {
        let e = per_site.entry(r.site.to_string()).or_default();
        e.0 += usize::from(r.n_stage.index() == p);
        e.1 += 1;
    }
    Ok(MultiClassEvaluation {
        classes: NStage::ALL.iter().map(|c| c.to_string()).collect(),
        n_train: train.len(),
        n_test: test.len(),
        accuracy: clopper_pearson(correct, test.len().max(1), 0.05)?,
        per_class_recall,
        confusion,
        per_site_accuracy: per_site.into_iter().filter_map(|(s, (c, n))| clopper_pearson(c, n, 0.05).ok().map(|p| (s, p))).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aln_common::cohort::{Clinical, NStage};
    use aln_common::ids::SiteId;

    fn cohort() -> Vec<FeatureRow> {
        // Deterministic rows: signal in deep[0] and in tumour size.
        (0..240)
            .map(|i| {
                let stage = NStage::ALL[i % 3];
                let b = stage.index() as f32;
                let noise = ((i * 7919) % 97) as f32 / 97.0 - 0.5;
                FeatureRow {
                    site: SiteId::new(["site-a", "site-b"][i % 2]).unwrap(),
                    patient_id: format!("p{i}"),
                    split: match i % 5 {
                        0 => Split::Test,
                        1 => Split::Validation,
                        _ => Split::Train,
                    },
                    n_stage: stage,
                    clinical: Clinical { us_size_mm: Some(15.0 + 3.0 * b + 8.0 * noise), axillary_us_positive: Some(i % 4 == 0), ..Default::default() },
                    deep: vec![b + 2.0 * noise, noise, ((i * 31) % 11) as f32],
                    network_score: None,
                }
            })
            .collect()
    }

    #[test]
    fn test_rows_never_influence_fitting() {
        let rows = cohort();
        let grid = CvGrid { c: vec![0.5, 2.0], gamma_scale: vec![1.0], folds: 3, seed: 1 };
        let base = evaluate_task(&rows, ClinicalTask::N0VsNPlus, FusionSvmParams::default(), &grid, &[]).unwrap();
        // Scramble everything about the test patients: labels, features, clinical values.
        let mut scrambled = rows.clone();
        for r in scrambled.iter_mut().filter(|r| r.split == Split::Test) {
            r.n_stage = if r.n_stage == NStage::N0 { NStage::N3Plus } else { NStage::N0 };
            r.deep.iter_mut().for_each(|v| *v = -100.0 * *v + 3.0);
            r.clinical.us_size_mm = Some(99.0);
        }
        let other = evaluate_task(&scrambled, ClinicalTask::N0VsNPlus, FusionSvmParams::default(), &grid, &[]).unwrap();
        for (a, b) in base.methods.iter().zip(&other.methods) {
            let auc = |m: &CohortMetrics| m.auc.map(|e| e.auc);
            assert_eq!(auc(&a.train), auc(&b.train), "{}: training fit changed with test rows", a.method);
            assert_eq!(auc(&a.validation), auc(&b.validation), "{}", a.method);
            assert_eq!(a.threshold, b.threshold, "{}: threshold changed with test rows", a.method);
            assert_eq!(a.params, b.params, "{}: hyper-parameters changed with test rows", a.method);
        }
        assert_eq!(base.n_test, 48);
        assert!(base.method("combined").unwrap().pooled_test().unwrap().auc > 0.8);
        let t3 = evaluate_three_class(&rows, FusionSvmParams::default()).unwrap();
        assert_eq!(t3.confusion.iter().flatten().sum::<usize>(), 48);
        assert_eq!(t3.accuracy.den, 48);
        assert_eq!(base.test_patients.len(), base.n_test);
        assert!(base.test_patients.iter().all(|p| rows.iter().any(|r| r.patient_id == p.patient_id && r.split == Split::Test)));
    }
}
