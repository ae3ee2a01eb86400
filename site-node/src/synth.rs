//! The built-in synthetic multi-center cohort (real patient data cannot ship).
//!
//! Patients are drawn from the paper's Table 2 distributions with its class mix
//! (N0 337 / N+(1-2) 150 / N+(≥3) 97 for 584 patients) and spread over sites with
//! different class prevalence, scanner gain, speckle, SWE scale and missing fields, so
//! federation and leave-one-site-out mean something.
//!
//! Signal design (so that, as in the paper, clinical-only < images-only < combined):
//! a patient's nodal burden `b` (0, 1, 1.6 for N0, N+(1-2), N+(≥3)) shifts the clinical
//! variables moderately (size, BI-RADS, axillary US, markers) and, through an independent
//! image phenotype `u = 1.2·b + ε`, the images strongly: margin irregularity of the
//! hypo-echoic lesion on B-mode and lesion stiffness on the SWE map. The noise in the two
//! channels is independent, so fusing them helps.

use std::f32::consts::PI;
use std::path::{Path, PathBuf};

use aln_common::cohort::{
    BiRads, Clinical, Histology, Location, ManifestRow, NStage, Roi, RoiSpec, assign_splits, write_manifest,
};
use anyhow::{Context, Result};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// The paper's class totals (N0, N+(1-2), N+(≥3)) for 584 patients.
pub const PAPER_CLASS_MIX: [usize; 3] = [337, 150, 97];

/// Options of `site-node synth`.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub sites: usize,
    pub patients: usize,
    pub seed: u64,
    /// Side of the square images written, pixels.
    pub image_px: u32,
    pub out: PathBuf,
}

/// How one (simulated) hospital differs from the others.
#[derive(Debug, Clone, Copy)]
struct SiteProfile {
    share: f64,
    n0_bias: f64,
    gain: f32,
    speckle: f32,
    swe_scale: f32,
    missing: f64,
}

fn profile(k: usize) -> SiteProfile {
    const P: [SiteProfile; 4] = [
        SiteProfile { share: 0.42, n0_bias: 1.15, gain: 1.00, speckle: 1.00, swe_scale: 1.00, missing: 0.00 },
        SiteProfile { share: 0.33, n0_bias: 0.90, gain: 0.85, speckle: 1.25, swe_scale: 0.90, missing: 0.04 },
        SiteProfile { share: 0.25, n0_bias: 0.95, gain: 1.12, speckle: 0.85, swe_scale: 1.10, missing: 0.08 },
        SiteProfile { share: 0.20, n0_bias: 1.00, gain: 0.95, speckle: 1.10, swe_scale: 0.95, missing: 0.05 },
    ];
    P[k % P.len()]
}

/// Site ids used by the synthetic cohort: `site-a`, `site-b`, ...
pub fn site_name(k: usize) -> String {
    format!("site-{}", (b'a' + (k % 26) as u8) as char)
}

/// Exact class counts for `n` patients in the paper's proportions.
pub fn class_counts(n: usize) -> [usize; 3] {
    let total: usize = PAPER_CLASS_MIX.iter().sum();
    let n0 = (n * PAPER_CLASS_MIX[0] + total / 2) / total;
    let n1 = (n * PAPER_CLASS_MIX[1] + total / 2) / total;
    [n0, n1, n - n0 - n1]
}

/// Writes `OUT/<site>/manifest.csv` + `us/*.png` + `swe/*.png` for every site; returns the
/// site folders. Each site folder is built under a temporary name and renamed when complete.
pub fn generate(opts: &SynthOptions) -> Result<Vec<PathBuf>> {
    anyhow::ensure!(opts.sites >= 1 && opts.sites <= 26, "--sites must be within 1..=26");
    anyhow::ensure!(opts.patients >= 10 * opts.sites, "--patients must be at least 10 per site");
    anyhow::ensure!((64..=1024).contains(&opts.image_px), "--image-px must be within 64..=1024");
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let counts = class_counts(opts.patients);
    let mut classes: Vec<NStage> = Vec::with_capacity(opts.patients);
    for (c, &n) in counts.iter().enumerate() {
        classes.extend(std::iter::repeat_n(NStage::from_index(c).expect("3 classes"), n));
    }
    // Assign patients to sites with class-dependent shares (prevalence differs by site).
    let mut per_site: Vec<Vec<NStage>> = vec![vec![]; opts.sites];
    for stage in classes {
        let w: Vec<f64> = (0..opts.sites)
            .map(|k| {
                let p = profile(k);
                p.share * if stage == NStage::N0 { p.n0_bias } else { 1.0 / p.n0_bias }
            })
            .collect();
        let total: f64 = w.iter().sum();
        let mut x = rng.random::<f64>() * total;
        let mut k = 0;
        while k + 1 < opts.sites && x >= w[k] {
            x -= w[k];
            k += 1;
        }
        per_site[k].push(stage);
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let mut dirs = Vec::new();
    for (k, stages) in per_site.into_iter().enumerate() {
        let name = site_name(k);
        let dir = opts.out.join(&name);
        let tmp = opts.out.join(format!(".{name}.partial"));
        let _ = std::fs::remove_dir_all(&tmp);
        let mut site_rng = StdRng::seed_from_u64(opts.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k as u64 + 1)));
        write_site(&tmp, &name, &stages, profile(k), opts, &mut site_rng)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("replacing {}", dir.display()))?;
        }
        std::fs::rename(&tmp, &dir).with_context(|| format!("finishing {}", dir.display()))?;
        tracing::info!(site = %name, patients = stages.len(), "synthetic site written to {}", dir.display());
        dirs.push(dir);
    }
    Ok(dirs)
}

fn burden(stage: NStage) -> f32 {
    match stage {
        NStage::N0 => 0.0,
        NStage::N1to2 => 1.0,
        NStage::N3Plus => 1.6,
    }
}

fn write_site(dir: &Path, name: &str, stages: &[NStage], prof: SiteProfile, opts: &SynthOptions, rng: &mut StdRng) -> Result<()> {
    std::fs::create_dir_all(dir.join("us"))?;
    std::fs::create_dir_all(dir.join("swe"))?;
    let splits = assign_splits(stages, opts.seed.wrapping_add(name.len() as u64 * 7919));
    let std_normal = Normal::new(0.0f32, 1.0).expect("valid normal");
    let mut rows = Vec::with_capacity(stages.len());
    for (i, (&stage, &split)) in stages.iter().zip(&splits).enumerate() {
        let b = burden(stage);
        let mut z = || std_normal.sample(rng);
        let clinical = draw_clinical(b, z(), z(), z(), rng, prof.missing);
        let u = 1.2 * b + std_normal.sample(rng);
        let id = format!("{name}-{i:04}");
        let lesion = Lesion::draw(clinical.us_size_mm.unwrap_or(18.9), u, opts.image_px, rng);
        let us = render_bmode(&lesion, prof, opts.image_px, rng);
        let swe = render_swe(&lesion, &us, u, prof, rng);
        let us_rel = PathBuf::from("us").join(format!("{id}.png"));
        let swe_rel = PathBuf::from("swe").join(format!("{id}.png"));
        us.save(dir.join(&us_rel)).with_context(|| format!("writing {}", us_rel.display()))?;
        swe.save(dir.join(&swe_rel)).with_context(|| format!("writing {}", swe_rel.display()))?;
        rows.push(ManifestRow {
            patient_id: id,
            us_image: dir.join(us_rel),
            swe_image: dir.join(swe_rel),
            us_roi: RoiSpec::Box(lesion.roi),
            swe_roi: RoiSpec::Box(lesion.roi),
            clinical,
            n_stage: stage,
            split: Some(split),
        });
    }
    write_manifest(&dir.join("manifest.csv"), &rows)?;
    Ok(())
}

fn logistic(x: f32) -> f64 {
    1.0 / (1.0 + (-x as f64).exp())
}

fn draw_clinical(b: f32, z_age: f32, z_size: f32, z_birads: f32, rng: &mut StdRng, missing: f64) -> Clinical {
    let age = (51.0 - 1.5 * b + 10.3 * z_age).clamp(25.0, 90.0);
    let size = (17.6 + 2.6 * b + 6.2 * z_size).clamp(5.0, 50.0);
    // BI-RADS from a latent score; thresholds give ≈ 31/164/267/122 of 584 overall.
    let l = 0.5 * b + z_birads;
    let birads = if l < -1.55 { BiRads::B4A } else if l < -0.35 { BiRads::B4B } else if l < 0.95 { BiRads::B4C } else { BiRads::B5 };
    let er = rng.random_bool(logistic(1.45 - 0.1 * b));
    let pr = rng.random_bool(logistic(0.95 - 0.1 * b));
    let her2 = rng.random_bool(logistic(-1.35 + 0.35 * b));
    let ki67 = rng.random_bool(logistic(1.5 + 0.45 * b));
    let h = rng.random::<f64>();
    let histology = if h < 516.0 / 584.0 { Histology::Idc } else if h < 534.0 / 584.0 { Histology::Ilc } else { Histology::Other };
    let location = Location::ALL[rng.random_range(0..Location::ALL.len())];
    // Axillary US: sensitivity ≈ 0.72, specificity ≈ 0.57 as in the paper.
    let axillary = rng.random_bool(if b > 0.0 { 0.72 } else { 0.43 });
    let mut c = Clinical {
        age_years: Some(age.round()),
        us_size_mm: Some((size * 10.0).round() / 10.0),
        er_positive: Some(er),
        pr_positive: Some(pr),
        her2_positive: Some(her2),
        ki67_positive: Some(ki67),
        birads: Some(birads),
        histology: Some(histology),
        location: Some(location),
        axillary_us_positive: Some(axillary),
    };
    if rng.random_bool(missing) {
        c.ki67_positive = None;
    }
    if rng.random_bool(missing / 2.0) {
        c.her2_positive = None;
    }
    if rng.random_bool(missing / 2.0) {
        c.birads = None;
    }
    c
}

/// Geometry of one lesion in image pixels.
struct Lesion {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    /// Fourier coefficients of the margin (irregularity).
    harmonics: Vec<(f32, f32, f32)>,
    roi: Roi,
}

impl Lesion {
    fn draw(size_mm: f32, u: f32, px: u32, rng: &mut StdRng) -> Self {
        let s = px as f32;
        // 0.22 image widths for a 40 mm lesion.
        let r = (size_mm / 40.0 * 0.22 * s).clamp(0.05 * s, 0.3 * s);
        let aspect = rng.random_range(0.65..0.95);
        let (rx, ry) = (r, r * aspect);
        let cx = s * rng.random_range(0.4..0.6);
        let cy = s * rng.random_range(0.42..0.58);
        let irregular = 0.03 + 0.07 * (logistic(1.3 * (u - 1.0)) as f32);
        let harmonics = (3..9)
            .map(|k| (k as f32, irregular * rng.random_range(0.5..1.0) / (k as f32).sqrt(), rng.random_range(0.0..2.0 * PI)))
            .collect();
        let pad = 0.25 * r + 3.0;
        let x0 = (cx - rx * 1.2 - pad).max(0.0);
        let y0 = (cy - ry * 1.2 - pad).max(0.0);
        let x1 = (cx + rx * 1.2 + pad).min(s - 1.0);
        let y1 = (cy + ry * 1.2 + pad).min(s - 1.0);
        let roi = Roi { x: x0 as u32, y: y0 as u32, w: (x1 - x0) as u32, h: (y1 - y0) as u32 };
        Self { cx, cy, rx, ry, harmonics, roi }
    }

    /// > 1 outside, < 1 inside, with an irregular margin.
    fn radius_ratio(&self, x: f32, y: f32) -> f32 {
        let dx = (x - self.cx) / self.rx;
        let dy = (y - self.cy) / self.ry;
        let theta = dy.atan2(dx);
        let wobble: f32 = self.harmonics.iter().map(|(k, a, ph)| a * (k * theta + ph).sin()).sum();
        (dx * dx + dy * dy).sqrt() / (1.0 + wobble)
    }
}

fn render_bmode(l: &Lesion, p: SiteProfile, px: u32, rng: &mut StdRng) -> GrayImage {
    let s = px as f32;
    let mut img = GrayImage::new(px, px);
    for y in 0..px {
        for x in 0..px {
            let (xf, yf) = (x as f32, y as f32);
            // Layered tissue + depth attenuation + Rayleigh-like speckle.
            let layer = 0.5 + 0.5 * (yf / s * 9.0 + (xf / s * 3.0).sin()).sin();
            let depth = 1.0 - 0.35 * yf / s;
            let speckle = {
                let a: f32 = rng.random_range(0.0001f32..1.0);
                (-2.0 * a.ln()).sqrt() * 0.55
            };
            let mut v = (70.0 + 60.0 * layer) * depth * (1.0 + p.speckle * 0.6 * (speckle - 0.7));
            let r = l.radius_ratio(xf, yf);
            if r < 1.0 {
                v = v * 0.28 + 8.0; // hypo-echoic interior
            } else if r < 1.12 {
                v *= 1.25; // echogenic halo
            } else if yf > l.cy + l.ry && (xf - l.cx).abs() < l.rx * 0.8 {
                v *= 0.8; // posterior shadowing
            }
            img.put_pixel(x, y, Luma([(v * p.gain).clamp(0.0, 255.0) as u8]));
        }
    }
    img
}

fn render_swe(l: &Lesion, bmode: &GrayImage, u: f32, p: SiteProfile, rng: &mut StdRng) -> RgbImage {
    let (w, h) = bmode.dimensions();
    let mut img = RgbImage::new(w, h);
    // Lesion stiffness (kPa, display range 0-180) rises with the image phenotype.
    let lesion_kpa = (55.0 + 32.0 * u + rng.random_range(-12.0..12.0)).clamp(10.0, 175.0);
    let background_kpa = rng.random_range(15.0..35.0);
    let box_ = l.roi;
    for y in 0..h {
        for x in 0..w {
            let g = bmode.get_pixel(x, y)[0];
            let inside_box = x >= box_.x && x < box_.x + box_.w && y >= box_.y && y < box_.y + box_.h;
            if !inside_box {
                img.put_pixel(x, y, Rgb([g, g, g]));
                continue;
            }
            let r = l.radius_ratio(x as f32, y as f32);
            // Stiffness peaks at the lesion rim ("stiff rim" sign) and fades outside.
            let rim = (-((r - 1.0) * 3.0).powi(2)).exp();
            let kpa = if r < 1.0 {
                lesion_kpa * (0.75 + 0.25 * rim)
            } else {
                background_kpa + (lesion_kpa - background_kpa) * rim * 0.8
            };
            let noise: f32 = rng.random_range(-6.0..6.0);
            let c = crate::colormap::jet((kpa * p.swe_scale + noise) / 180.0).map(|v| (v * 255.0) as u8);
            // Colour over B-mode, 80% opacity.
            let mix = |c: u8| (0.8 * c as f32 + 0.2 * g as f32) as u8;
            img.put_pixel(x, y, Rgb([mix(c[0]), mix(c[1]), mix(c[2])]));
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use aln_common::cohort::read_manifest;

    #[test]
    fn class_counts_follow_the_paper() {
        assert_eq!(class_counts(584), [337, 150, 97]);
        let c = class_counts(100);
        assert_eq!(c.iter().sum::<usize>(), 100);
    }

    #[test]
    fn generates_readable_deterministic_sites() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SynthOptions { sites: 2, patients: 40, seed: 3, image_px: 64, out: dir.path().join("a") };
        let dirs = generate(&opts).unwrap();
        assert_eq!(dirs.len(), 2);
        let rows: Vec<_> = dirs.iter().flat_map(|d| read_manifest(&d.join("manifest.csv")).unwrap()).collect();
        assert_eq!(rows.len(), 40);
        let n0 = rows.iter().filter(|r| r.n_stage == NStage::N0).count();
        assert_eq!(n0, class_counts(40)[0]);
        for r in &rows {
            let img = image::open(&r.us_image).unwrap();
            assert_eq!(img.width(), 64);
            let RoiSpec::Box(b) = r.us_roi.clone() else { panic!("synthetic rows use boxes") };
            assert!(b.x + b.w <= 64 && b.y + b.h <= 64);
            assert!(r.split.is_some());
        }
        let again = SynthOptions { out: dir.path().join("b"), ..opts };
        let dirs_b = generate(&again).unwrap();
        let a = std::fs::read(dirs[0].join("manifest.csv")).unwrap();
        let b = std::fs::read(dirs_b[0].join("manifest.csv")).unwrap();
        let strip = |v: &[u8]| String::from_utf8_lossy(v).replace("/a/", "/").replace("/b/", "/");
        assert_eq!(strip(&a), strip(&b));
        assert_eq!(std::fs::read(dirs[0].join("us/site-a-0000.png")).unwrap(), std::fs::read(dirs_b[0].join("us/site-a-0000.png")).unwrap());
    }
}
