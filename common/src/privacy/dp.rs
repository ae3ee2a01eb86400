//! The Gaussian mechanism on a site's delta: clip to L2 norm S, add N(0, (σS)²) per value.
//!
//! Used by the site-node in [`DpMode::Site`](super::DpMode::Site); the coordinator's central
//! variant lives in `aggregate::mean` (it clips with the norm computed on arrival).

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// What clipping did to one delta.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipped {
    /// L2 norm before clipping.
    pub norm: f64,
    /// Factor applied (1 when the norm was within the bound).
    pub scale: f64,
}

/// Scales `values` to L2 norm at most `clip`.
pub fn clip(values: &mut [f32], clip: f64) -> Clipped {
    let norm = values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    let scale = if norm > clip { clip / norm } else { 1.0 };
    if scale < 1.0 {
        let s = scale as f32;
        values.iter_mut().for_each(|v| *v *= s);
    }
    Clipped { norm, scale }
}

/// Adds N(0, std²) to every value.
pub fn add_gaussian_noise(values: &mut [f32], std: f64, rng: &mut impl Rng) {
    if std <= 0.0 {
        return;
    }
    let normal = Normal::new(0.0f32, std as f32).expect("std is positive and finite");
    values.iter_mut().for_each(|v| *v += normal.sample(rng));
}

/// The site's mechanism: clip to `clip_norm`, then add N(0, (σ·clip_norm)²).
pub fn privatise(values: &mut [f32], clip_norm: f64, noise_multiplier: f64, rng: &mut impl Rng) -> Clipped {
    let c = clip(values, clip_norm);
    add_gaussian_noise(values, clip_norm * noise_multiplier, rng);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn clipping_by_hand() {
        let mut v = [3.0f32, 4.0];
        let c = clip(&mut v, 1.0);
        assert_eq!(c.norm, 5.0);
        assert!((v[0] - 0.6).abs() < 1e-7 && (v[1] - 0.8).abs() < 1e-7);
        let mut small = [0.3f32, 0.4];
        assert_eq!(clip(&mut small, 1.0).scale, 1.0);
        assert_eq!(small, [0.3, 0.4]);
    }

    #[test]
    fn noise_has_the_requested_spread() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut v = vec![0f32; 100_000];
        privatise(&mut v, 0.5, 2.0, &mut rng);
        let sd = (v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((sd - 1.0).abs() < 0.01, "{sd}");
    }
}
