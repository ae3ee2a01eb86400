//! Cross-center evaluation of the fused model on pooled feature rows.
//!
//! The SVMs are fitted on the pooled **training** rows only (scaling and imputation too);
//! validation and test rows are only ever scored. Test AUCs are reported pooled and for
//! each site's own test patients, with DeLong 95% CIs and paired DeLong tests of the
//! combined model against the other methods.

use std::collections::BTreeMap;

use aln_common::cohort::{ClinicalTask, FeatureRow, Split};
use aln_common::fusion::{FeatureSet, FusionSvm, FusionSvmParams};
use aln_common::stats::{self, AucEstimate, DeLongTest};
use serde::Serialize;

/// One method's results on one task.
#[derive(Debug, Clone, Serialize)]
pub struct MethodResult {
    pub method: String,
    pub train_auc: Option<f64>,
    pub validation: Option<AucEstimate>,
    pub pooled_test: Option<AucEstimate>,
    /// Each site's own test patients, scored by the pooled model (`None`: one class only).
    pub per_site_test: BTreeMap<String, Option<AucEstimate>>,
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
    pub test_patients: Vec<ScoredPatient>,
}

impl TaskEvaluation {
    pub fn method(&self, name: &str) -> Option<&MethodResult> {
        self.methods.iter().find(|m| m.method == name)
    }
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

fn auc_opt(scores: &[f64], labels: &[bool]) -> Option<AucEstimate> {
    stats::auc_delong(scores, labels).ok()
}

/// Fits and scores every method for `task`.
pub fn evaluate_task(rows: &[FeatureRow], task: ClinicalTask, params: FusionSvmParams) -> aln_common::Result<TaskEvaluation> {
    let in_task: Vec<&FeatureRow> = rows.iter().filter(|r| task.label(r.n_stage).is_some()).collect();
    let by_split = |s: Split| -> Vec<&FeatureRow> { in_task.iter().copied().filter(|r| r.split == s).collect() };
    let (train, val, test) = (by_split(Split::Train), by_split(Split::Validation), by_split(Split::Test));
    let labels = |rs: &[&FeatureRow]| -> Vec<bool> { rs.iter().map(|r| task.label(r.n_stage).unwrap_or(false)).collect() };
    let (y_train, y_val, y_test) = (labels(&train), labels(&val), labels(&test));
    let mut sites: Vec<String> = test.iter().map(|r| r.site.to_string()).collect();
    sites.sort();
    sites.dedup();

    let mut test_scores: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut methods = Vec::new();
    let mut push = |name: &str, s_train: Vec<f64>, s_val: Vec<f64>, s_test: Vec<f64>| {
        let per_site = sites
            .iter()
            .map(|site| {
                let (s, y): (Vec<f64>, Vec<bool>) = test
                    .iter()
                    .zip(&s_test)
                    .zip(&y_test)
                    .filter(|((r, _), _)| r.site.as_str() == site)
                    .map(|((_, s), y)| (*s, *y))
                    .unzip();
                (site.clone(), auc_opt(&s, &y))
            })
            .collect();
        methods.push(MethodResult {
            method: name.to_string(),
            train_auc: stats::auc(&s_train, &y_train).ok(),
            validation: auc_opt(&s_val, &y_val),
            pooled_test: auc_opt(&s_test, &y_test),
            per_site_test: per_site,
        });
        test_scores.insert(name.to_string(), s_test);
    };

    let ax = |rs: &[&FeatureRow]| rs.iter().map(|r| axillary_score(r)).collect::<Vec<_>>();
    push(AXILLARY_US, ax(&train), ax(&val), ax(&test));
    for set in FeatureSet::ALL {
        let svm = FusionSvm::fit(params, task, set, &train)?;
        push(set.name(), svm.decision(&train), svm.decision(&val), svm.decision(&test));
    }

    let combined = &test_scores[FeatureSet::Combined.name()];
    let delong_combined_vs = test_scores
        .iter()
        .filter(|(k, _)| k.as_str() != FeatureSet::Combined.name())
        .filter_map(|(k, s)| stats::delong_paired(combined, s, &y_test).ok().map(|t| (k.clone(), t)))
        .collect();
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
        test_patients,
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
                }
            })
            .collect()
    }

    #[test]
    fn test_rows_never_influence_fitting() {
        let rows = cohort();
        let base = evaluate_task(&rows, ClinicalTask::N0VsNPlus, FusionSvmParams::default()).unwrap();
        // Scramble everything about the test patients: labels, features, clinical values.
        let mut scrambled = rows.clone();
        for r in scrambled.iter_mut().filter(|r| r.split == Split::Test) {
            r.n_stage = if r.n_stage == NStage::N0 { NStage::N3Plus } else { NStage::N0 };
            r.deep.iter_mut().for_each(|v| *v = -100.0 * *v + 3.0);
            r.clinical.us_size_mm = Some(99.0);
        }
        let other = evaluate_task(&scrambled, ClinicalTask::N0VsNPlus, FusionSvmParams::default()).unwrap();
        for (a, b) in base.methods.iter().zip(&other.methods) {
            assert_eq!(a.train_auc, b.train_auc, "{}: training fit changed with test rows", a.method);
            assert_eq!(a.validation.map(|v| v.auc), b.validation.map(|v| v.auc), "{}", a.method);
        }
        assert_eq!(base.n_test, 48);
        assert!(base.method("combined").unwrap().pooled_test.unwrap().auc > 0.8);
        assert_eq!(base.test_patients.len(), base.n_test);
        assert!(base.test_patients.iter().all(|p| rows.iter().any(|r| r.patient_id == p.patient_id && r.split == Split::Test)));
    }
}
