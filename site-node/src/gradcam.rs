//! Grad-CAM overlays, computed at the site for a few test patients per class (the images
//! never leave; the overlays do only when the site opts in with `share_gradcam`).

use std::path::Path;

use aln_common::cohort::{NStage, Split};
use aln_common::constants::GRADCAM_PER_CLASS;
use aln_common::experiment::Experiment;
use anyhow::Result;
use image::{ImageEncoder, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::data::SiteData;
use crate::model::BimodalNet;

/// One overlay, as PNG bytes.
pub struct Overlay {
    pub patient_id: String,
    pub n_stage: NStage,
    pub modality: &'static str,
    pub png: Vec<u8>,
}

fn overlay_png(rgb: &[u8], cam: &Tensor, side: i64) -> Result<Vec<u8>> {
    let up = cam.view([1, 1, cam.size()[0], cam.size()[1]]).upsample_bilinear2d([side, side], false, None, None).view([side * side]);
    let heat = Vec::<f32>::try_from(up.to_device(Device::Cpu).to_kind(Kind::Float))?;
    let mut img = RgbImage::new(side as u32, side as u32);
    for (i, px) in img.pixels_mut().enumerate() {
        let c = crate::colormap::jet(heat[i]);
        for k in 0..3 {
            px.0[k] = (0.55 * rgb[3 * i + k] as f32 + 0.45 * 255.0 * c[k]).clamp(0.0, 255.0) as u8;
        }
    }
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out).write_image(img.as_raw(), side as u32, side as u32, image::ExtendedColorType::Rgb8)?;
    Ok(out)
}

/// Overlays for the first test patients of each class (by manifest order), both modalities.
pub fn overlays(net: &BimodalNet, data: &SiteData, experiment: &Experiment) -> Result<Vec<Overlay>> {
    let device = net.vs.device();
    let mut out = Vec::new();
    for class in NStage::ALL {
        let picks: Vec<usize> = data
            .indices(Split::Test)
            .into_iter()
            .filter(|&i| data.rows[i].n_stage == *class)
            .take(GRADCAM_PER_CLASS)
            .collect();
        for i in picks {
            let (us, swe) = data.inputs(&[i], experiment.input, None, device);
            let clinical = data.clinical(&[i], experiment.clinical_in_head, device);
            let (_, cam_us, cam_swe) = net.grad_cam(&us, &swe, &clinical)?;
            for (modality, cam, is_swe) in [("us", cam_us, false), ("swe", cam_swe, true)] {
                let png = overlay_png(&data.centred_rgb(i, is_swe), &cam, data.image_size)?;
                out.push(Overlay { patient_id: data.rows[i].patient_id.clone(), n_stage: *class, modality, png });
            }
        }
    }
    Ok(out)
}

/// Keeps the overlays in the site's work dir.
pub fn save_locally(dir: &Path, overlays: &[Overlay]) -> Result<()> {
    for o in overlays {
        aln_common::atomic_file::write(&dir.join(format!("{}_{}.png", o.patient_id, o.modality)), &o.png)?;
    }
    Ok(())
}
