//! Cohort-balance tests (the paper's Table 2 comparison of training and test cohorts):
//! Welch's t-test (continuous), Mann-Whitney U with normal approximation, tie and
//! continuity correction (as R's `wilcox.test(exact = FALSE)`), and Pearson's chi-square
//! test of independence for categorical variables (as `chisq.test(correct = FALSE)`).

use serde::{Deserialize, Serialize};
use statrs::distribution::{ChiSquared, ContinuousCDF, StudentsT};

use super::two_sided_p;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub statistic: f64,
    /// Degrees of freedom where the test has them.
    pub df: Option<f64>,
    pub p: f64,
}

fn mean_var(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let m = x.iter().sum::<f64>() / n;
    (m, x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0))
}

/// Welch's two-sample t-test (unequal variances, Welch-Satterthwaite df).
pub fn welch_t_test(a: &[f64], b: &[f64]) -> Result<TestResult> {
    if a.len() < 2 || b.len() < 2 {
        return Err(Error::Stats("Welch's t-test needs at least 2 values per group".into()));
    }
    let (ma, va) = mean_var(a);
    let (mb, vb) = mean_var(b);
    let (sa, sb) = (va / a.len() as f64, vb / b.len() as f64);
    let se = (sa + sb).sqrt();
    if se == 0.0 {
        return Err(Error::Stats("both groups are constant".into()));
    }
    let t = (ma - mb) / se;
    let df = (sa + sb).powi(2) / (sa * sa / (a.len() as f64 - 1.0) + sb * sb / (b.len() as f64 - 1.0));
    let dist = StudentsT::new(0.0, 1.0, df).map_err(|e| Error::Stats(e.to_string()))?;
    Ok(TestResult { statistic: t, df: Some(df), p: (2.0 * dist.cdf(-t.abs())).min(1.0) })
}

/// Mann-Whitney U (reported as R's W = rank sum of `a` - n_a(n_a+1)/2), normal approximation
/// with tie correction of the variance and a 0.5 continuity correction.
pub fn mann_whitney_u(a: &[f64], b: &[f64]) -> Result<TestResult> {
    if a.is_empty() || b.is_empty() {
        return Err(Error::Stats("Mann-Whitney U needs values in both groups".into()));
    }
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let mut all: Vec<(f64, bool)> = a.iter().map(|&v| (v, true)).chain(b.iter().map(|&v| (v, false))).collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let (mut rank_a, mut tie_term) = (0.0, 0.0);
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        tie_term += t * t * t - t;
        rank_a += all[i..=j].iter().filter(|x| x.1).count() as f64 * r;
        i = j + 1;
    }
    let w = rank_a - na * (na + 1.0) / 2.0;
    let n = na + nb;
    let var = na * nb / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0)));
    if var <= 0.0 {
        return Err(Error::Stats("all values are tied".into()));
    }
    let d = w - na * nb / 2.0;
    let z = (d - 0.5 * d.signum()) / var.sqrt();
    Ok(TestResult { statistic: w, df: None, p: two_sided_p(z) })
}

/// Pearson's chi-square test of independence on an r × c table of counts.
pub fn chi_square_independence(table: &[Vec<f64>]) -> Result<TestResult> {
    let r = table.len();
    let c = table.first().map_or(0, Vec::len);
    if r < 2 || c < 2 || table.iter().any(|row| row.len() != c) {
        return Err(Error::Stats("chi-square needs a rectangular table of at least 2 × 2".into()));
    }
    let rows: Vec<f64> = table.iter().map(|row| row.iter().sum()).collect();
    let cols: Vec<f64> = (0..c).map(|j| table.iter().map(|row| row[j]).sum()).collect();
    let n: f64 = rows.iter().sum();
    let mut stat = 0.0;
    for i in 0..r {
        for j in 0..c {
            let e = rows[i] * cols[j] / n;
            if e == 0.0 {
                return Err(Error::Stats("an empty row or column in the chi-square table".into()));
            }
            stat += (table[i][j] - e).powi(2) / e;
        }
    }
    let df = ((r - 1) * (c - 1)) as f64;
    let dist = ChiSquared::new(df).map_err(|e| Error::Stats(e.to_string()))?;
    Ok(TestResult { statistic: stat, df: Some(df), p: 1.0 - dist.cdf(stat) })
}

#[cfg(test)]
mod tests {
    use super::*;

    // R's `sleep` data set (Student 1908): extra hours of sleep under two drugs.
    const G1: [f64; 10] = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0];
    const G2: [f64; 10] = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4];

    #[test]
    fn welch_matches_r_sleep_example() {
        // R: t.test(extra ~ group, data = sleep): t = -1.8608, df = 17.776, p-value = 0.07939
        let t = welch_t_test(&G1, &G2).unwrap();
        assert!((t.statistic + 1.8608).abs() < 1e-4, "{t:?}");
        assert!((t.df.unwrap() - 17.776).abs() < 1e-3);
        assert!((t.p - 0.07939).abs() < 1e-5);
    }

    #[test]
    fn mann_whitney_matches_r_sleep_example() {
        // R: wilcox.test(extra ~ group, data = sleep): W = 25.5, p-value = 0.06933 (ties → normal approx.)
        let u = mann_whitney_u(&G1, &G2).unwrap();
        assert_eq!(u.statistic, 25.5);
        assert!((u.p - 0.06933).abs() < 1e-5, "{u:?}");
    }

    #[test]
    fn chi_square_by_hand() {
        // [[10, 20], [20, 10]]: all expected 15, X² = 4·25/15 = 6.667, p = 0.009823.
        let t = chi_square_independence(&[vec![10.0, 20.0], vec![20.0, 10.0]]).unwrap();
        assert!((t.statistic - 20.0 / 3.0).abs() < 1e-12);
        assert!((t.p - 0.009823).abs() < 1e-6, "{t:?}");
        let ind = chi_square_independence(&[vec![10.0, 20.0], vec![5.0, 10.0]]).unwrap();
        assert!(ind.statistic.abs() < 1e-12 && (ind.p - 1.0).abs() < 1e-12);
    }
}
