//! The paper's Table 2 for the pooled federated cohort: clinical variables in the training
//! and test cohorts, with balance tests (Welch t and Mann-Whitney U for continuous
//! variables, chi-square for categorical ones; missing values excluded per variable).

use aln_common::cohort::{BiRads, FeatureRow, Histology, Location, NStage, Split};
use aln_common::stats::balance::{self, TestResult};
use serde::Serialize;

/// One row of Table 2.
#[derive(Debug, Clone, Serialize)]
pub struct BalanceRow {
    pub variable: String,
    /// "mean ± sd" or "count (%)" per level.
    pub train: String,
    pub test: String,
    pub test_name: &'static str,
    pub result: Option<TestResult>,
    /// For continuous variables, the Mann-Whitney U result alongside Welch's t.
    pub mann_whitney: Option<TestResult>,
    pub missing: usize,
}

fn continuous(name: &str, rows: &[&FeatureRow], get: fn(&FeatureRow) -> Option<f32>) -> BalanceRow {
    let vals = |s: Split| -> Vec<f64> { rows.iter().filter(|r| r.split == s).filter_map(|r| get(r).map(f64::from)).collect() };
    let (tr, te) = (vals(Split::Train), vals(Split::Test));
    let fmt = |v: &[f64]| {
        if v.len() < 2 {
            return "n/a".to_string();
        }
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let sd = (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        format!("{m:.2} ± {sd:.2}")
    };
    BalanceRow {
        variable: name.into(),
        train: fmt(&tr),
        test: fmt(&te),
        test_name: "Welch t",
        result: balance::welch_t_test(&tr, &te).ok(),
        mann_whitney: balance::mann_whitney_u(&tr, &te).ok(),
        missing: rows.iter().filter(|r| matches!(r.split, Split::Train | Split::Test) && get(r).is_none()).count(),
    }
}

fn categorical(name: &str, rows: &[&FeatureRow], levels: &[String], get: &dyn Fn(&FeatureRow) -> Option<usize>) -> BalanceRow {
    let counts = |s: Split| -> Vec<f64> {
        let mut c = vec![0.0; levels.len()];
        for r in rows.iter().filter(|r| r.split == s) {
            if let Some(i) = get(r) {
                c[i] += 1.0;
            }
        }
        c
    };
    let (tr, te) = (counts(Split::Train), counts(Split::Test));
    let fmt = |c: &[f64]| {
        let n: f64 = c.iter().sum();
        levels.iter().zip(c).map(|(l, v)| format!("{l} {v:.0} ({:.0}%)", 100.0 * v / n.max(1.0))).collect::<Vec<_>>().join(", ")
    };
    // Levels absent from both cohorts would make an empty column.
    let table: Vec<Vec<f64>> = vec![tr.clone(), te.clone()];
    let keep: Vec<usize> = (0..levels.len()).filter(|&j| table[0][j] + table[1][j] > 0.0).collect();
    let reduced: Vec<Vec<f64>> = table.iter().map(|row| keep.iter().map(|&j| row[j]).collect()).collect();
    BalanceRow {
        variable: name.into(),
        train: fmt(&tr),
        test: fmt(&te),
        test_name: "chi-square",
        result: balance::chi_square_independence(&reduced).ok(),
        mann_whitney: None,
        missing: rows.iter().filter(|r| matches!(r.split, Split::Train | Split::Test) && get(r).is_none()).count(),
    }
}

fn binary(name: &str, rows: &[&FeatureRow], get: fn(&FeatureRow) -> Option<bool>) -> BalanceRow {
    categorical(name, rows, &["negative".into(), "positive".into()], &|r| get(r).map(usize::from))
}

fn names<T: std::fmt::Display>(all: &[T]) -> Vec<String> {
    all.iter().map(|x| x.to_string()).collect()
}

/// Table 2 over all pooled rows (training vs test cohort).
pub fn table2(rows: &[FeatureRow]) -> Vec<BalanceRow> {
    let rows: Vec<&FeatureRow> = rows.iter().collect();
    let idx = |all: &[String], s: String| all.iter().position(|x| *x == s);
    let birads = names(BiRads::ALL);
    let hist = names(Histology::ALL);
    let loc = names(Location::ALL);
    let stages = names(NStage::ALL);
    vec![
        continuous("age (years)", &rows, |r| r.clinical.age_years),
        continuous("US size (mm)", &rows, |r| r.clinical.us_size_mm),
        binary("ER", &rows, |r| r.clinical.er_positive),
        binary("PR", &rows, |r| r.clinical.pr_positive),
        binary("HER2", &rows, |r| r.clinical.her2_positive),
        binary("Ki-67", &rows, |r| r.clinical.ki67_positive),
        categorical("BI-RADS", &rows, &birads, &|r| r.clinical.birads.and_then(|b| idx(&birads, b.to_string()))),
        categorical("histology", &rows, &hist, &|r| r.clinical.histology.and_then(|h| idx(&hist, h.to_string()))),
        categorical("location", &rows, &loc, &|r| r.clinical.location.and_then(|l| idx(&loc, l.to_string()))),
        binary("axillary US", &rows, |r| r.clinical.axillary_us_positive),
        categorical("ALN status", &rows, &stages, &|r| Some(r.n_stage.index())),
    ]
}
