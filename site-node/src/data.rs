//! Local data: ROI crops of each patient's B-mode and SWE images, augmentation and
//! class-balanced sampling. Everything here stays on the site's machine.
//!
//! Each crop is prepared once at load time: the ROI box, widened by [`SHIFT_MARGIN`]
//! network pixels on every side, resized to `(S + 2·margin)²` and kept as `u8`. A training
//! sample is then a random `S×S` window shifted from one of the four directions in 2-pixel
//! steps (the paper's directional crops) with random horizontal/vertical flips; evaluation
//! uses the centred window.

use aln_common::cohort::{CLINICAL_FEATURES, ManifestRow, NStage, Roi, RoiSpec, Split, encode_clinical_reference};
use aln_common::experiment::InputMode;
use aln_common::constants::{IMAGENET_MEAN, IMAGENET_STD};
use anyhow::{Context, Result, bail};
use image::imageops::FilterType;
use rand::Rng;
use rand::rngs::StdRng;
use tch::{Device, Kind, Tensor};

/// Margin, in network pixels, available for shifting the crop window.
pub const SHIFT_MARGIN: i64 = 4;
/// Shift step of the directional crops, pixels.
pub const SHIFT_STEP: i64 = 2;

/// The site's patients with their prepared crops.
pub struct SiteData {
    pub rows: Vec<ManifestRow>,
    /// `N × [3, S+2m, S+2m]` u8 crops, CHW, back to back (plain bytes, so `Sync`).
    us: Vec<u8>,
    swe: Vec<u8>,
    side: i64,
    /// `N × CLINICAL_FEATURES` clinical inputs centred on the paper's Table 2.
    clinical: Vec<f32>,
    /// Per patient: what was read of the US and the SWE file.
    pub images: Vec<[ImageInfo; 2]>,
    pub image_size: i64,
}

/// What was read of one image file (for the data summary).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    pub dicom: bool,
    /// (row, column) spacing in mm, from DICOM's Pixel Spacing.
    pub pixel_spacing_mm: Option<(f64, f64)>,
}

/// Reads one image (PNG, JPEG or DICOM) and returns the margin-widened ROI crop resized to
/// `side × side` RGB, with what was learned of the file.
fn crop(path: &std::path::Path, roi: &RoiSpec, image_size: i64, row: usize, field: &str) -> Result<(Vec<u8>, ImageInfo)> {
    let (img, dicom, pixel_spacing_mm) = if crate::dicom::is_dicom(path) {
        let d = crate::dicom::load(path).with_context(|| format!("row {row}, `{field}`"))?;
        (d.image, true, d.pixel_spacing_mm)
    } else {
        let i = image::open(path).with_context(|| format!("row {row}, `{field}`: cannot read image {}", path.display()))?;
        (i, false, None)
    };
    let info = ImageInfo { width: img.width(), height: img.height(), dicom, pixel_spacing_mm };
    let roi = match roi {
        RoiSpec::Box(b) => *b,
        RoiSpec::Mask(mask) => mask_box(mask, img.width(), img.height()).with_context(|| format!("row {row}, `{field}_roi_mask`"))?,
    };
    let (w, h) = (img.width(), img.height());
    if roi.x + roi.w > w || roi.y + roi.h > h {
        bail!(
            "row {row}, `{field}_roi`: box x={} y={} w={} h={} lies outside the {w}×{h} image {}",
            roi.x, roi.y, roi.w, roi.h, path.display()
        );
    }
    let side = (image_size + 2 * SHIFT_MARGIN) as u32;
    let mx = (SHIFT_MARGIN as f32 * roi.w as f32 / image_size as f32).round() as u32;
    let my = (SHIFT_MARGIN as f32 * roi.h as f32 / image_size as f32).round() as u32;
    let x0 = roi.x.saturating_sub(mx);
    let y0 = roi.y.saturating_sub(my);
    let x1 = (roi.x + roi.w + mx).min(w);
    let y1 = (roi.y + roi.h + my).min(h);
    let rgb = img.crop_imm(x0, y0, x1 - x0, y1 - y0).to_rgb8();
    let resized = image::imageops::resize(&rgb, side, side, FilterType::Triangle);
    // HWC → CHW
    let n = (side * side) as usize;
    let raw = resized.into_raw();
    let mut chw = vec![0u8; 3 * n];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * n + i] = px[c];
        }
    }
    Ok((chw, info))
}

/// Bounding box of a mask's non-zero pixels; the mask must match the image's size.
fn mask_box(path: &std::path::Path, width: u32, height: u32) -> Result<Roi> {
    let mask = image::open(path).with_context(|| format!("cannot read mask {}", path.display()))?.to_luma8();
    if mask.dimensions() != (width, height) {
        bail!("mask {} is {}×{} but the image is {width}×{height}", path.display(), mask.width(), mask.height());
    }
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p[0] > 0 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x);
            y1 = y1.max(y);
        }
    }
    if x0 == u32::MAX {
        bail!("mask {} has no foreground pixel", path.display());
    }
    Ok(Roi { x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1 })
}

impl SiteData {
    /// Loads and crops every patient's images; errors name the manifest row and field.
    pub fn load(rows: Vec<ManifestRow>, image_size: u32) -> Result<Self> {
        let s = image_size as i64;
        let side = s + 2 * SHIFT_MARGIN;
        let mut us = Vec::with_capacity(rows.len() * (3 * side * side) as usize);
        let mut swe = Vec::with_capacity(us.capacity());
        let mut images = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let (u, ui) = crop(&r.us_image, &r.us_roi, s, i + 1, "us_image")?;
            let (w, wi) = crop(&r.swe_image, &r.swe_roi, s, i + 1, "swe_image")?;
            us.extend(u);
            swe.extend(w);
            images.push([ui, wi]);
        }
        let clinical = rows.iter().flat_map(|r| encode_clinical_reference(&r.clinical)).collect();
        Ok(Self { us, swe, side, clinical, images, rows, image_size: s })
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Indices of the patients in `split`.
    pub fn indices(&self, split: Split) -> Vec<usize> {
        (0..self.rows.len()).filter(|&i| self.rows[i].split == Some(split)).collect()
    }

    /// `[B, CLINICAL_FEATURES]` clinical inputs, or zeros when the experiment does not use them.
    pub fn clinical(&self, idx: &[usize], used: bool, device: Device) -> Tensor {
        let k = CLINICAL_FEATURES;
        let mut v = vec![0f32; idx.len() * k];
        if used {
            for (j, &i) in idx.iter().enumerate() {
                v[j * k..(j + 1) * k].copy_from_slice(&self.clinical[i * k..(i + 1) * k]);
            }
        }
        Tensor::from_slice(&v).view([idx.len() as i64, k as i64]).to_device(device)
    }

    /// The two trunk inputs for an experiment's input mode: a single-modality control
    /// feeds its one crop to both passes, keeping the architecture unchanged.
    pub fn inputs(&self, idx: &[usize], mode: InputMode, rng: Option<&mut StdRng>, device: Device) -> (Tensor, Tensor) {
        let (us, swe) = self.batch(idx, rng, device);
        match mode {
            InputMode::Both => (us, swe),
            InputMode::UsOnly => (us.shallow_clone(), us),
            InputMode::SweOnly => (swe.shallow_clone(), swe),
        }
    }

    /// The centred `S×S` crop of patient `i` as RGB bytes (HWC), for overlays.
    pub fn centred_rgb(&self, i: usize, swe: bool) -> Vec<u8> {
        let (side, s, m) = (self.side as usize, self.image_size as usize, SHIFT_MARGIN as usize);
        let len = 3 * side * side;
        let src = if swe { &self.swe } else { &self.us };
        let chw = &src[i * len..(i + 1) * len];
        let mut out = Vec::with_capacity(3 * s * s);
        for y in 0..s {
            for x in 0..s {
                for c in 0..3 {
                    out.push(chw[c * side * side + (y + m) * side + (x + m)]);
                }
            }
        }
        out
    }

    /// Normalised `(us, swe)` batches `[B, 3, S, S]` on `device`; augmented when `rng` is given.
    pub fn batch(&self, idx: &[usize], mut rng: Option<&mut StdRng>, device: Device) -> (Tensor, Tensor) {
        let s = self.image_size;
        let mut us = Vec::with_capacity(idx.len());
        let mut swe = Vec::with_capacity(idx.len());
        for &i in idx {
            let (mut ox, mut oy, mut hflip, mut vflip) = (SHIFT_MARGIN, SHIFT_MARGIN, false, false);
            if let Some(rng) = rng.as_deref_mut() {
                let steps = rng.random_range(0..=SHIFT_MARGIN / SHIFT_STEP) * SHIFT_STEP;
                match rng.random_range(0..4) {
                    0 => ox -= steps,
                    1 => ox += steps,
                    2 => oy -= steps,
                    _ => oy += steps,
                }
                hflip = rng.random_bool(0.5);
                vflip = rng.random_bool(0.5);
            }
            let len = (3 * self.side * self.side) as usize;
            let window = |bytes: &[u8]| {
                let crop = Tensor::from_slice(&bytes[i * len..(i + 1) * len]).view([3, self.side, self.side]);
                let mut w = crop.narrow(1, oy, s).narrow(2, ox, s);
                if hflip {
                    w = w.flip([2]);
                }
                if vflip {
                    w = w.flip([1]);
                }
                w
            };
            us.push(window(&self.us));
            swe.push(window(&self.swe));
        }
        (normalise(&Tensor::stack(&us, 0), device), normalise(&Tensor::stack(&swe, 0), device))
    }
}

fn normalise(x: &Tensor, device: Device) -> Tensor {
    let mean = Tensor::from_slice(&IMAGENET_MEAN).view([1, 3, 1, 1]).to_device(device);
    let std = Tensor::from_slice(&IMAGENET_STD).view([1, 3, 1, 1]).to_device(device);
    (x.to_device(device).to_kind(Kind::Float) / 255.0 - mean) / std
}

/// Class label the network is trained on: 2 classes = task 1 (N0 vs N+), 3 = N stage.
pub fn class_of(stage: NStage, classes: i64) -> i64 {
    match classes {
        2 => i64::from(stage != NStage::N0),
        _ => stage.index() as i64,
    }
}

/// Feeds each present class with equal probability (the paper's class-balanced sampling).
pub struct BalancedSampler {
    by_class: Vec<Vec<usize>>,
}

impl BalancedSampler {
    pub fn new(data: &SiteData, indices: &[usize], classes: i64) -> Result<Self> {
        let mut by_class = vec![Vec::new(); classes as usize];
        for &i in indices {
            by_class[class_of(data.rows[i].n_stage, classes) as usize].push(i);
        }
        by_class.retain(|c| !c.is_empty());
        if by_class.is_empty() {
            bail!("no training patients (split = train) in the manifest");
        }
        Ok(Self { by_class })
    }

    pub fn sample(&self, n: usize, rng: &mut StdRng) -> Vec<usize> {
        (0..n)
            .map(|_| {
                let c = &self.by_class[rng.random_range(0..self.by_class.len())];
                c[rng.random_range(0..c.len())]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aln_common::cohort::Clinical;

    #[test]
    fn a_mask_gives_the_same_crop_as_its_bounding_box() {
        let dir = tempfile::tempdir().unwrap();
        let img = image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, 90]));
        img.save(dir.path().join("us.png")).unwrap();
        let mask = image::GrayImage::from_fn(50, 40, |x, y| image::Luma([u8::from((10..30).contains(&x) && (5..25).contains(&y)) * 255]));
        mask.save(dir.path().join("mask.png")).unwrap();
        image::GrayImage::new(50, 40).save(dir.path().join("empty.png")).unwrap();
        let row = |spec: RoiSpec| ManifestRow {
            patient_id: "p".into(),
            us_image: dir.path().join("us.png"),
            swe_image: dir.path().join("us.png"),
            us_roi: spec.clone(),
            swe_roi: spec,
            clinical: Clinical::default(),
            n_stage: NStage::N0,
            split: Some(Split::Train),
        };
        let by_mask = SiteData::load(vec![row(RoiSpec::Mask(dir.path().join("mask.png")))], 16).unwrap();
        let by_box = SiteData::load(vec![row(RoiSpec::Box(Roi { x: 10, y: 5, w: 20, h: 20 }))], 16).unwrap();
        assert_eq!(by_mask.centred_rgb(0, false), by_box.centred_rgb(0, false));
        let e = SiteData::load(vec![row(RoiSpec::Mask(dir.path().join("empty.png")))], 16).err().unwrap();
        assert!(format!("{e:#}").contains("us_image_roi_mask") && format!("{e:#}").contains("no foreground"), "{e:#}");
    }
}
