//! Cohen's kappa (Cohen 1960, Educ Psychol Meas 20:37-46) for two raters on the same cases,
//! with the large-sample standard error of Fleiss, Cohen & Everitt (1969, Psychol Bull
//! 72:323-327) for the CI, and the null-hypothesis SE for the test of kappa = 0.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Z_95, two_sided_p};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Kappa {
    pub kappa: f64,
    /// SE of the estimate (Fleiss, Cohen & Everitt 1969).
    pub se: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// z = kappa / SE under H0 (kappa = 0).
    pub z: f64,
    pub p: f64,
    pub n: usize,
    pub observed_agreement: f64,
    pub expected_agreement: f64,
}

/// Kappa of two raters' labels (any comparable category type).
pub fn cohen_kappa<T: Ord + Clone>(a: &[T], b: &[T]) -> Result<Kappa> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::Stats(format!("kappa needs two equally long, non-empty ratings ({} vs {})", a.len(), b.len())));
    }
    let cats: Vec<T> = {
        let mut c: Vec<T> = a.iter().chain(b).cloned().collect();
        c.sort();
        c.dedup();
        c
    };
    let idx: BTreeMap<&T, usize> = cats.iter().enumerate().map(|(i, c)| (c, i)).collect();
    let k = cats.len();
    let n = a.len() as f64;
    let mut p = vec![vec![0.0; k]; k];
    for (x, y) in a.iter().zip(b) {
        p[idx[x]][idx[y]] += 1.0 / n;
    }
    let row: Vec<f64> = (0..k).map(|i| p[i].iter().sum()).collect();
    let col: Vec<f64> = (0..k).map(|j| (0..k).map(|i| p[i][j]).sum()).collect();
    let po: f64 = (0..k).map(|i| p[i][i]).sum();
    let pe: f64 = (0..k).map(|i| row[i] * col[i]).sum();
    if (1.0 - pe).abs() < 1e-15 {
        return Err(Error::Stats("kappa is undefined when both raters use a single category".into()));
    }
    let kappa = (po - pe) / (1.0 - pe);
    // Fleiss, Cohen & Everitt (1969), equation (13).
    let mut s = 0.0;
    for i in 0..k {
        s += p[i][i] * (1.0 - (row[i] + col[i]) * (1.0 - kappa)).powi(2);
    }
    for i in 0..k {
        for j in 0..k {
            if i != j {
                s += (1.0 - kappa).powi(2) * p[i][j] * (col[i] + row[j]).powi(2);
            }
        }
    }
    s -= (kappa - pe * (1.0 - kappa)).powi(2);
    let se = (s.max(0.0) / (n * (1.0 - pe).powi(2))).sqrt();
    // Under H0 (equation 14).
    let s0 = pe + pe * pe - (0..k).map(|i| row[i] * col[i] * (row[i] + col[i])).sum::<f64>();
    let se0 = (s0.max(0.0) / (n * (1.0 - pe).powi(2))).sqrt();
    let z = if se0 > 0.0 { kappa / se0 } else { 0.0 };
    Ok(Kappa {
        kappa,
        se,
        ci_low: kappa - Z_95 * se,
        ci_high: kappa + Z_95 * se,
        z,
        p: two_sided_p(z),
        n: a.len(),
        observed_agreement: po,
        expected_agreement: pe,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(t: [[usize; 2]; 2]) -> (Vec<u8>, Vec<u8>) {
        let (mut a, mut b) = (vec![], vec![]);
        for (i, row) in t.iter().enumerate() {
            for (j, &n) in row.iter().enumerate() {
                a.extend(std::iter::repeat_n(i as u8, n));
                b.extend(std::iter::repeat_n(j as u8, n));
            }
        }
        (a, b)
    }

    #[test]
    fn two_by_two_by_hand() {
        // [[20, 5], [10, 15]]: po = 0.7, pe = 0.5·0.6 + 0.5·0.4 = 0.5, kappa = 0.4.
        let (a, b) = table([[20, 5], [10, 15]]);
        let k = cohen_kappa(&a, &b).unwrap();
        assert!((k.kappa - 0.4).abs() < 1e-12);
        // SE0 = sqrt(pe + pe² - Σ r_i c_i (r_i + c_i)) / ((1 - pe)√n)
        //     = sqrt(0.5 + 0.25 - (0.3·1.1 + 0.2·0.9)) / (0.5·√50) = sqrt(0.24)/3.5355.
        let se0 = 0.24f64.sqrt() / (0.5 * 50f64.sqrt());
        assert!((k.z - 0.4 / se0).abs() < 1e-9, "{k:?}");
        // Fleiss-Cohen-Everitt SE by hand: diagonal terms 0.4·(1-1.1·0.6)² + 0.3·(1-0.9·0.6)²,
        // off-diagonal (1-κ)²·(p12·(c1+r2)² + p21·(c2+r1)²) = 0.36·(0.1·1.1² + 0.2·0.9²),
        // minus (κ - pe(1-κ))² = 0.01: total 0.2016, SE = sqrt(0.2016 / (50·0.25)) = 0.1270.
        let s = 0.4 * (1.0f64 - 0.66).powi(2) + 0.3 * (1.0f64 - 0.54).powi(2) + 0.36 * (0.1 * 1.21 + 0.2 * 0.81) - 0.01;
        assert!((s - 0.2016).abs() < 1e-12);
        assert!((k.se - (s / (50.0 * 0.25)).sqrt()).abs() < 1e-12, "{k:?}");
    }

    #[test]
    fn perfect_and_chance_agreement() {
        let a = [1, 2, 3, 1, 2, 3];
        assert!((cohen_kappa(&a, &a).unwrap().kappa - 1.0).abs() < 1e-12);
        let (a, b) = table([[10, 10], [10, 10]]);
        assert!(cohen_kappa(&a, &b).unwrap().kappa.abs() < 1e-12);
        assert!(cohen_kappa(&[1, 1], &[1, 1]).is_err());
    }
}
