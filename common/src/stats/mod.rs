//! Statistics of the cross-center evaluation, one module per family, each function with its
//! reference. Conventions follow R (pROC for ROC analysis, `binom.test`, `t.test`,
//! `wilcox.test`, `chisq.test`) so results can be checked there; all tests are two-sided.
//!
//! | module | what |
//! |---|---|
//! | [`roc`] | ROC curve, AUC (Mann-Whitney), DeLong CI and paired test, Hanley & McNeil SE and correlated-AUC test |
//! | [`diagnostic`] | Youden threshold; accuracy, sensitivity, specificity, PPV, NPV with Clopper-Pearson CIs |
//! | [`agreement`] | Cohen's kappa with SE and p |
//! | [`balance`] | Welch t-test, Mann-Whitney U, chi-square test of independence (cohort balance) |

pub mod agreement;
pub mod balance;
pub mod diagnostic;
pub mod roc;

pub use roc::{
    AucEstimate, DeLongTest, HanleyMcNeilTest, RocCurve, auc, auc_delong, auc_hanley_mcneil, delong_paired, hanley_mcneil_paired,
    hanley_mcneil_se, roc_curve,
};

/// z for a two-sided 95% interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// Standard normal cumulative distribution function.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
}

/// Two-sided p-value of a standard normal statistic.
pub fn two_sided_p(z: f64) -> f64 {
    libm::erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0)
}
