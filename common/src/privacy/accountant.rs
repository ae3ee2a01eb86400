//! The (ε, δ) accountant: Rényi differential privacy of the Gaussian mechanism (Mironov 2017).
//!
//! Each round releases a site's clipped delta (sensitivity S) plus N(0, (σS)²) noise. Every
//! site takes part in every round (no subsampling), so one round has RDP
//! `ε_α = α / (2σ²)`, T rounds compose to `T·α / (2σ²)`, and
//! `ε(δ) = min_α [T·α/(2σ²) + log(1/δ)/(α − 1)]`. The minimiser has the closed form
//! `ε = T/(2σ²) + √(2T·log(1/δ))/σ` (at `α* = 1 + σ√(2 log(1/δ)/T)`), which the tests use as
//! the independent check of the numerical minimum over orders.

/// Orders α searched, as in common accountants (TF Privacy, Opacus), plus a fine grid.
fn orders() -> impl Iterator<Item = f64> {
    let fine = (0..2000).map(|i| 1.0 + 0.01 * f64::from(i + 1));
    let coarse = (21..=256).map(f64::from);
    let large = [512.0, 1024.0, 4096.0, 1e5, 1e6];
    fine.chain(coarse).chain(large)
}

/// RDP of T compositions of the Gaussian mechanism at order α.
pub fn gaussian_rdp(sigma: f64, rounds: u32, alpha: f64) -> f64 {
    f64::from(rounds) * alpha / (2.0 * sigma * sigma)
}

/// ε for `rounds` releases with noise multiplier `sigma` at `delta`; ∞ when σ = 0.
pub fn gaussian_epsilon(sigma: f64, rounds: u32, delta: f64) -> f64 {
    if sigma <= 0.0 {
        return f64::INFINITY;
    }
    if rounds == 0 {
        return 0.0;
    }
    let log_inv_delta = (1.0 / delta).ln();
    orders().map(|a| gaussian_rdp(sigma, rounds, a) + log_inv_delta / (a - 1.0)).fold(f64::INFINITY, f64::min)
}

/// The smallest σ (to 3 significant digits) that keeps `rounds` releases within `epsilon`.
pub fn noise_for_epsilon(epsilon: f64, rounds: u32, delta: f64) -> f64 {
    let (mut lo, mut hi) = (1e-3f64, 1e4f64);
    for _ in 0..100 {
        let mid = (lo * hi).sqrt();
        if gaussian_epsilon(mid, rounds, delta) > epsilon { lo = mid } else { hi = mid }
    }
    hi
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed_form(sigma: f64, t: u32, delta: f64) -> f64 {
        let l = (1.0 / delta).ln();
        f64::from(t) / (2.0 * sigma * sigma) + (2.0 * f64::from(t) * l).sqrt() / sigma
    }

    #[test]
    fn the_grid_minimum_matches_the_closed_form() {
        for (sigma, t, delta) in [(1.0, 3, 1e-5), (2.0, 21, 1e-5), (5.0, 100, 1e-6), (0.8, 1, 1e-3)] {
            let num = gaussian_epsilon(sigma, t, delta);
            let exact = closed_form(sigma, t, delta);
            assert!(num >= exact - 1e-9 && num - exact < 1e-3 * exact, "σ {sigma}, T {t}: {num} vs {exact}");
        }
        // By hand: σ = 1, T = 3, δ = 1e-5: 1.5 + √(6·11.5129…) = 1.5 + 8.3113… = 9.8113…
        assert!((closed_form(1.0, 3, 1e-5) - 9.811_34).abs() < 1e-4);
    }

    #[test]
    fn more_noise_or_fewer_rounds_spend_less() {
        assert!(gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5));
        assert!(gaussian_epsilon(1.0, 5, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5));
        assert_eq!(gaussian_epsilon(0.0, 3, 1e-5), f64::INFINITY);
        let s = noise_for_epsilon(8.0, 3, 1e-5);
        assert!((gaussian_epsilon(s, 3, 1e-5) - 8.0).abs() < 0.01, "{s}");
    }
}
