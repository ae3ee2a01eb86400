//! DICOM input (dicom-rs): ultrasound frames exported from a PACS as `.dcm`, grayscale
//! (MONOCHROME2) or colour (RGB / YBR), with their pixel spacing kept for the data summary.

use std::path::Path;

use anyhow::{Context, Result};
use dicom_dictionary_std::tags;
use dicom_pixeldata::{ConvertOptions, PixelDecoder, VoiLutOption};
use image::DynamicImage;

/// A decoded DICOM frame and its pixel spacing (row, column) in mm, when the file has one.
pub struct DicomImage {
    pub image: DynamicImage,
    pub pixel_spacing_mm: Option<(f64, f64)>,
}

/// True for files named `.dcm`/`.dicom` or carrying the DICM magic after the preamble.
pub fn is_dicom(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    if matches!(ext.as_deref(), Some("dcm" | "dicom")) {
        return true;
    }
    let mut head = [0u8; 132];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok() && &head[128..132] == b"DICM"
}

/// Reads the first frame of a DICOM file.
pub fn load(path: &Path) -> Result<DicomImage> {
    let obj = dicom_object::open_file(path).with_context(|| format!("not a readable DICOM file: {}", path.display()))?;
    let pixel_spacing_mm = obj
        .element(tags::PIXEL_SPACING)
        .ok()
        .and_then(|e| e.to_multi_float64().ok())
        .and_then(|v| (v.len() == 2).then(|| (v[0], v[1])));
    // 8-bit ultrasound stores display values: keep them as they are. Deeper data goes through
    // the file's VOI LUT / window, or a min-max normalisation when it has none.
    let bits = obj.element(tags::BITS_STORED).ok().and_then(|e| e.to_int::<u16>().ok()).unwrap_or(8);
    let voi = if bits <= 8 { VoiLutOption::Identity } else { VoiLutOption::Default };
    let image = obj
        .decode_pixel_data()
        .and_then(|p| p.to_dynamic_image_with_options(0, &ConvertOptions::new().with_voi_lut(voi)))
        .with_context(|| format!("cannot decode the pixel data of {}", path.display()))?;
    Ok(DicomImage { image, pixel_spacing_mm })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::uids;
    use dicom_object::{FileDicomObject, FileMetaTableBuilder, InMemDicomObject};

    /// Writes an uncompressed ultrasound DICOM (8-bit, grayscale or RGB interleaved).
    pub(crate) fn write_dicom(path: &Path, width: u16, height: u16, rgb: bool, pixels: &[u8], spacing: Option<&str>) {
        let mut obj = InMemDicomObject::new_empty();
        let mut put = |tag, vr, value: PrimitiveValue| obj.put(DataElement::new(tag, vr, value));
        put(tags::SOP_CLASS_UID, VR::UI, PrimitiveValue::from(uids::ULTRASOUND_IMAGE_STORAGE));
        put(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from("2.25.1234567890"));
        put(tags::MODALITY, VR::CS, PrimitiveValue::from("US"));
        put(tags::ROWS, VR::US, PrimitiveValue::from(height));
        put(tags::COLUMNS, VR::US, PrimitiveValue::from(width));
        put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16));
        put(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16));
        put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16));
        put(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16));
        put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(if rgb { 3u16 } else { 1u16 }));
        put(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from(if rgb { "RGB" } else { "MONOCHROME2" }));
        if rgb {
            put(tags::PLANAR_CONFIGURATION, VR::US, PrimitiveValue::from(0u16));
        }
        if let Some(s) = spacing {
            put(tags::PIXEL_SPACING, VR::DS, PrimitiveValue::from(s));
        }
        put(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels.to_vec()));
        let meta = FileMetaTableBuilder::new()
            .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
            .media_storage_sop_class_uid(uids::ULTRASOUND_IMAGE_STORAGE)
            .media_storage_sop_instance_uid("2.25.1234567890")
            .build()
            .unwrap();
        let file: FileDicomObject<InMemDicomObject> = obj.with_exact_meta(meta);
        file.write_to_file(path).unwrap();
    }

    #[test]
    fn grayscale_and_rgb_ultrasound_decode_exactly_with_spacing() {
        let dir = tempfile::tempdir().unwrap();
        let (w, h) = (40u16, 30u16);
        let gray: Vec<u8> = (0..w as usize * h as usize).map(|i| (i * 7 % 251) as u8).collect();
        let p = dir.path().join("us.dcm");
        write_dicom(&p, w, h, false, &gray, Some("0.08\\0.08"));
        assert!(is_dicom(&p));
        let d = load(&p).unwrap();
        assert_eq!((d.image.width(), d.image.height()), (40, 30));
        assert_eq!(d.image.to_luma8().into_raw(), gray);
        assert_eq!(d.pixel_spacing_mm, Some((0.08, 0.08)));

        let rgb: Vec<u8> = (0..3 * w as usize * h as usize).map(|i| (i * 13 % 256) as u8).collect();
        let p = dir.path().join("swe.dicom");
        write_dicom(&p, w, h, true, &rgb, None);
        let d = load(&p).unwrap();
        assert_eq!(d.image.to_rgb8().into_raw(), rgb);
        assert_eq!(d.pixel_spacing_mm, None);

        // The training pipeline reads a DICOM exactly like the same pixels as PNG.
        use aln_common::cohort::{Clinical, ManifestRow, NStage, Roi, RoiSpec, Split};
        let png_path = dir.path().join("same.png");
        image::RgbImage::from_raw(w as u32, h as u32, rgb.clone()).unwrap().save(&png_path).unwrap();
        let row = |img: &Path| ManifestRow {
            patient_id: "p".into(),
            us_image: img.to_path_buf(),
            swe_image: img.to_path_buf(),
            us_roi: RoiSpec::Box(Roi { x: 5, y: 4, w: 20, h: 18 }),
            swe_roi: RoiSpec::Box(Roi { x: 5, y: 4, w: 20, h: 18 }),
            clinical: Clinical::default(),
            n_stage: NStage::N0,
            split: Some(Split::Train),
        };
        let from_dicom = crate::data::SiteData::load(vec![row(&p)], 16).unwrap();
        let from_png = crate::data::SiteData::load(vec![row(&png_path)], 16).unwrap();
        assert_eq!(from_dicom.centred_rgb(0, false), from_png.centred_rgb(0, false));
        assert!(from_dicom.images[0][0].dicom && !from_png.images[0][0].dicom);

        let png = dir.path().join("x.png");
        image::GrayImage::new(4, 4).save(&png).unwrap();
        assert!(!is_dicom(&png));
        std::fs::write(dir.path().join("bad.dcm"), b"nope").unwrap();
        assert!(load(&dir.path().join("bad.dcm")).is_err());
    }
}
