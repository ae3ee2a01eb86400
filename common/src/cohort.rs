//! The cohort: manifest schema, clinical variables, nodal status, splits, feature rows.
//!
//! A site's `manifest.csv` has one row per patient (one lesion each). Columns:
//!
//! | column | meaning | values |
//! |---|---|---|
//! | `patient_id` | site-local identifier | non-empty, unique |
//! | `us_image`, `swe_image` | B-mode and SWE image paths, relative to the manifest | PNG, JPEG or DICOM (`.dcm`, grayscale or RGB) |
//! | `us_roi_x`,`us_roi_y`,`us_roi_w`,`us_roi_h` | ROI box in the US image, pixels | inside the image |
//! | `swe_roi_x`,`swe_roi_y`,`swe_roi_w`,`swe_roi_h` | ROI box in the SWE image | inside the image |
//! | `us_roi_mask`, `swe_roi_mask` | optional: a segmentation mask image instead of the box (its non-zero pixels' bounding box is the ROI) | same size as the image |
//! | `age` | years | 18-100, or empty (missing) |
//! | `us_size_mm` | largest lesion diameter on US, mm | 1-100, or empty |
//! | `er`,`pr`,`her2`,`ki67` | receptor / marker status | `positive`, `negative`, or empty |
//! | `birads` | BI-RADS category | `4A`, `4B`, `4C`, `5`, or empty |
//! | `histology` | histological type | `IDC`, `ILC`, `other`, or empty |
//! | `location` | quadrant | `UOQ`, `UIQ`, `LOQ`, `LIQ`, `central`, or empty |
//! | `axillary_us` | axillary ultrasound finding | `positive`, `negative`, or empty |
//! | `n_stage` | pathology reference: nodal burden | `N0`, `N1-2` (1-2 nodes), `N3+` (≥3 nodes) |
//! | `split` | optional fixed split | `train`, `validation`, `test`, or empty (assigned by seed) |
//!
//! Clinical values travel to the coordinator only inside [`FeatureRow`]s, as the paper's
//! fusion model needs them; images never do.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use aln_proto as pb;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::SiteId;

macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name { $($var),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$var),+];
            /// The manifest spelling.
            pub fn as_str(self) -> &'static str { match self { $($name::$var => $s),+ } }
            /// Parses the manifest spelling (case-insensitive).
            pub fn parse(s: &str) -> Option<Self> {
                $(if s.eq_ignore_ascii_case($s) { return Some($name::$var); })+
                None
            }
            fn allowed() -> String { [$($s),+].join(", ") }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
    };
}

string_enum!(
    /// Axillary lymph node burden at pathology.
    NStage { N0 => "N0", N1to2 => "N1-2", N3Plus => "N3+" }
);
string_enum!(
    /// Patient-level data split.
    Split { Train => "train", Validation => "validation", Test => "test" }
);
string_enum!(BiRads { B4A => "4A", B4B => "4B", B4C => "4C", B5 => "5" });
string_enum!(Histology { Idc => "IDC", Ilc => "ILC", Other => "other" });
string_enum!(Location { UpperOuter => "UOQ", UpperInner => "UIQ", LowerOuter => "LOQ", LowerInner => "LIQ", Central => "central" });

impl From<NStage> for pb::NStage {
    fn from(n: NStage) -> Self {
        match n {
            NStage::N0 => pb::NStage::N0,
            NStage::N1to2 => pb::NStage::N12,
            NStage::N3Plus => pb::NStage::N3Plus,
        }
    }
}

impl NStage {
    /// Parses the wire code; `None` for unspecified or unknown values.
    pub fn from_proto(code: i32) -> Option<Self> {
        match pb::NStage::try_from(code) {
            Ok(pb::NStage::N0) => Some(NStage::N0),
            Ok(pb::NStage::N12) => Some(NStage::N1to2),
            Ok(pb::NStage::N3Plus) => Some(NStage::N3Plus),
            _ => None,
        }
    }

    /// Class index for the three-class task (0 = N0, 1 = N+(1-2), 2 = N+(≥3)).
    pub fn index(self) -> usize {
        self as usize
    }
    pub fn from_index(i: usize) -> Option<Self> {
        Self::ALL.get(i).copied()
    }
}

/// The paper's prediction tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClinicalTask {
    /// Task 1: N0 (negative) vs N+(≥1) (positive), all patients.
    N0VsNPlus,
    /// Task 2: N+(1-2) (negative) vs N+(≥3) (positive), node-positive patients only.
    LowVsHighBurden,
}

impl ClinicalTask {
    /// Binary label of a patient for this task, or `None` when the patient is not in it.
    pub fn label(self, n: NStage) -> Option<bool> {
        match (self, n) {
            (Self::N0VsNPlus, NStage::N0) => Some(false),
            (Self::N0VsNPlus, _) => Some(true),
            (Self::LowVsHighBurden, NStage::N0) => None,
            (Self::LowVsHighBurden, NStage::N1to2) => Some(false),
            (Self::LowVsHighBurden, NStage::N3Plus) => Some(true),
        }
    }
}

/// Clinical variables of one patient (Table 2 of the paper); `None` = missing at the site.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Clinical {
    pub age_years: Option<f32>,
    pub us_size_mm: Option<f32>,
    pub er_positive: Option<bool>,
    pub pr_positive: Option<bool>,
    pub her2_positive: Option<bool>,
    pub ki67_positive: Option<bool>,
    pub birads: Option<BiRads>,
    pub histology: Option<Histology>,
    pub location: Option<Location>,
    pub axillary_us_positive: Option<bool>,
}

/// A rectangular region of interest in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Roi {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// Where a modality's region of interest comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoiSpec {
    /// A box drawn by hand or exported with the images.
    Box(Roi),
    /// A segmentation mask (same size as the image); the ROI is its foreground's bounding box.
    Mask(PathBuf),
}

/// One manifest row, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ManifestRow {
    pub patient_id: String,
    /// Absolute (resolved against the manifest's folder).
    pub us_image: PathBuf,
    pub swe_image: PathBuf,
    pub us_roi: RoiSpec,
    pub swe_roi: RoiSpec,
    pub clinical: Clinical,
    pub n_stage: NStage,
    pub split: Option<Split>,
}

/// Manifest column names, in the order [`write_manifest`] writes them.
pub const MANIFEST_COLUMNS: [&str; 25] = [
    "patient_id", "us_image", "swe_image", "us_roi_x", "us_roi_y", "us_roi_w", "us_roi_h", "swe_roi_x",
    "swe_roi_y", "swe_roi_w", "swe_roi_h", "age", "us_size_mm", "er", "pr", "her2", "ki67", "birads",
    "histology", "location", "axillary_us", "n_stage", "split", "us_roi_mask", "swe_roi_mask",
];

/// Columns a manifest may leave out of its header.
const OPTIONAL_COLUMNS: [&str; 3] = ["split", "us_roi_mask", "swe_roi_mask"];

/// Reads and checks a manifest; errors name the file, the row (1-based, header excluded) and the field.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestRow>> {
    let base = path.parent().unwrap_or(Path::new("."));
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    parse_manifest(file, path, base)
}

/// Parses manifest CSV from any reader; `path` names it in errors, image paths resolve
/// against `base`. Never panics on malformed input (fuzzed: `fuzz/fuzz_targets/manifest.rs`).
pub fn parse_manifest(input: impl std::io::Read, path: &Path, base: &Path) -> Result<Vec<ManifestRow>> {
    let base = base.to_path_buf();
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(input);
    let headers = rdr
        .headers()
        .map_err(|e| Error::io(path, std::io::Error::other(e)))?
        .clone();
    let col: HashMap<&str, usize> = headers.iter().enumerate().map(|(i, h)| (h, i)).collect();
    for required in MANIFEST_COLUMNS.iter().filter(|c| !OPTIONAL_COLUMNS.contains(c)) {
        // A modality with a mask column may leave out its box columns.
        let masked = ["us", "swe"].iter().any(|m| required.starts_with(&format!("{m}_roi_")) && col.contains_key(format!("{m}_roi_mask").as_str()));
        if !col.contains_key(required) && !masked {
            return Err(Error::Manifest {
                path: path.into(),
                row: 0,
                field: (*required).into(),
                message: "required column is missing from the header".into(),
            });
        }
    }
    let mut rows = Vec::new();
    let mut seen = HashMap::new();
    for (i, rec) in rdr.records().enumerate() {
        let row = i + 1;
        let rec = rec.map_err(|e| Error::Manifest {
            path: path.into(),
            row,
            field: "-".into(),
            message: e.to_string(),
        })?;
        let f = FieldReader { path, row, rec: &rec, col: &col };
        let parsed = f.row(&base)?;
        if let Some(prev) = seen.insert(parsed.patient_id.clone(), row) {
            return Err(f.err("patient_id", format!("duplicate of row {prev}")));
        }
        rows.push(parsed);
    }
    if rows.is_empty() {
        return Err(Error::Manifest { path: path.into(), row: 0, field: "-".into(), message: "no patients".into() });
    }
    Ok(rows)
}

struct FieldReader<'a> {
    path: &'a Path,
    row: usize,
    rec: &'a csv::StringRecord,
    col: &'a HashMap<&'a str, usize>,
}

impl FieldReader<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::Manifest { path: self.path.into(), row: self.row, field: field.into(), message: message.into() }
    }
    fn raw(&self, field: &str) -> &str {
        self.col.get(field).and_then(|&i| self.rec.get(i)).unwrap_or("")
    }
    fn required(&self, field: &str) -> Result<&str> {
        match self.raw(field) {
            "" => Err(self.err(field, "required value is empty")),
            v => Ok(v),
        }
    }
    fn pixel(&self, field: &str) -> Result<u32> {
        let v = self.required(field)?;
        v.parse().map_err(|_| self.err(field, format!("{v:?} is not a non-negative whole number of pixels")))
    }
    fn roi(&self, prefix: &str, base: &Path) -> Result<RoiSpec> {
        match self.raw(&format!("{prefix}_mask")) {
            "" => self.roi_box(prefix).map(RoiSpec::Box),
            mask => Ok(RoiSpec::Mask(base.join(mask))),
        }
    }
    fn roi_box(&self, prefix: &str) -> Result<Roi> {
        let roi = Roi {
            x: self.pixel(&format!("{prefix}_x"))?,
            y: self.pixel(&format!("{prefix}_y"))?,
            w: self.pixel(&format!("{prefix}_w"))?,
            h: self.pixel(&format!("{prefix}_h"))?,
        };
        if roi.w == 0 || roi.h == 0 {
            return Err(self.err(&format!("{prefix}_w"), "ROI box has zero width or height"));
        }
        Ok(roi)
    }
    fn number(&self, field: &str, range: std::ops::RangeInclusive<f32>) -> Result<Option<f32>> {
        match self.raw(field) {
            "" => Ok(None),
            v => match v.parse::<f32>() {
                Ok(x) if range.contains(&x) => Ok(Some(x)),
                Ok(x) => Err(self.err(field, format!("{x} is outside {}-{}", range.start(), range.end()))),
                Err(_) => Err(self.err(field, format!("{v:?} is not a number"))),
            },
        }
    }
    fn status(&self, field: &str) -> Result<Option<bool>> {
        match self.raw(field).to_ascii_lowercase().as_str() {
            "" => Ok(None),
            "positive" | "pos" | "1" => Ok(Some(true)),
            "negative" | "neg" | "0" => Ok(Some(false)),
            v => Err(self.err(field, format!("{v:?}: use positive, negative or leave empty"))),
        }
    }
    fn choice<T>(&self, field: &str, parse: fn(&str) -> Option<T>, allowed: fn() -> String) -> Result<Option<T>> {
        match self.raw(field) {
            "" => Ok(None),
            v => parse(v).map(Some).ok_or_else(|| self.err(field, format!("{v:?}: allowed values are {}", allowed()))),
        }
    }
    fn row(&self, base: &Path) -> Result<ManifestRow> {
        let n_stage = self
            .choice("n_stage", NStage::parse, NStage::allowed)?
            .ok_or_else(|| self.err("n_stage", format!("required; allowed values are {}", NStage::allowed())))?;
        Ok(ManifestRow {
            patient_id: self.required("patient_id")?.to_string(),
            us_image: base.join(self.required("us_image")?),
            swe_image: base.join(self.required("swe_image")?),
            us_roi: self.roi("us_roi", base)?,
            swe_roi: self.roi("swe_roi", base)?,
            clinical: Clinical {
                age_years: self.number("age", 18.0..=100.0)?,
                us_size_mm: self.number("us_size_mm", 1.0..=100.0)?,
                er_positive: self.status("er")?,
                pr_positive: self.status("pr")?,
                her2_positive: self.status("her2")?,
                ki67_positive: self.status("ki67")?,
                birads: self.choice("birads", BiRads::parse, BiRads::allowed)?,
                histology: self.choice("histology", Histology::parse, Histology::allowed)?,
                location: self.choice("location", Location::parse, Location::allowed)?,
                axillary_us_positive: self.status("axillary_us")?,
            },
            n_stage,
            split: self.choice("split", Split::parse, Split::allowed)?,
        })
    }
}

/// Writes a manifest (atomically); image paths are written relative to the manifest's folder.
pub fn write_manifest(path: &Path, rows: &[ManifestRow]) -> Result<()> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut w = csv::Writer::from_writer(Vec::new());
    let io = |e: csv::Error| Error::io(path, std::io::Error::other(e));
    w.write_record(MANIFEST_COLUMNS).map_err(io)?;
    let opt_num = |v: Option<f32>| v.map(|x| format!("{x:.1}")).unwrap_or_default();
    let opt_status = |v: Option<bool>| match v {
        Some(true) => "positive".to_string(),
        Some(false) => "negative".to_string(),
        None => String::new(),
    };
    let rel = |p: &Path| p.strip_prefix(base).unwrap_or(p).to_string_lossy().into_owned();
    // Box columns and mask column of one modality.
    let roi = |spec: &RoiSpec| -> ([String; 4], String) {
        match spec {
            RoiSpec::Box(b) => ([b.x.to_string(), b.y.to_string(), b.w.to_string(), b.h.to_string()], String::new()),
            RoiSpec::Mask(p) => (Default::default(), rel(p)),
        }
    };
    for r in rows {
        let c = &r.clinical;
        let (ub, um) = roi(&r.us_roi);
        let (sb, sm) = roi(&r.swe_roi);
        let [ux, uy, uw, uh] = ub;
        let [sx, sy, sw, sh] = sb;
        w.write_record([
            r.patient_id.clone(),
            rel(&r.us_image),
            rel(&r.swe_image),
            ux,
            uy,
            uw,
            uh,
            sx,
            sy,
            sw,
            sh,
            opt_num(c.age_years),
            opt_num(c.us_size_mm),
            opt_status(c.er_positive),
            opt_status(c.pr_positive),
            opt_status(c.her2_positive),
            opt_status(c.ki67_positive),
            c.birads.map(|v| v.as_str().to_string()).unwrap_or_default(),
            c.histology.map(|v| v.as_str().to_string()).unwrap_or_default(),
            c.location.map(|v| v.as_str().to_string()).unwrap_or_default(),
            opt_status(c.axillary_us_positive),
            r.n_stage.as_str().to_string(),
            r.split.map(|s| s.as_str().to_string()).unwrap_or_default(),
            um,
            sm,
        ])
        .map_err(io)?;
    }
    let bytes = w.into_inner().map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    crate::atomic_file::write(path, &bytes)
}

/// Patient-level stratified split as in the paper: per class, test = 1/5, then 1/4 of the
/// remaining training patients become validation (T : V : I-T ≈ 60 : 20 : 20). Deterministic
/// for a given seed and input order.
pub fn assign_splits(stages: &[NStage], seed: u64) -> Vec<Split> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![Split::Train; stages.len()];
    for class in NStage::ALL {
        let mut idx: Vec<usize> = (0..stages.len()).filter(|&i| stages[i] == *class).collect();
        idx.shuffle(&mut rng);
        let n_test = (idx.len() as f64 / 5.0).round() as usize;
        let n_val = ((idx.len() - n_test) as f64 / 4.0).round() as usize;
        for (k, &i) in idx.iter().enumerate() {
            out[i] = if k < n_test {
                Split::Test
            } else if k < n_test + n_val {
                Split::Validation
            } else {
                Split::Train
            };
        }
    }
    out
}

/// What a site sends about one patient after training: never the image, only the deep
/// feature vector, the clinical variables, the split and the reference label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureRow {
    pub site: SiteId,
    pub patient_id: String,
    pub split: Split,
    pub n_stage: NStage,
    pub clinical: Clinical,
    pub deep: Vec<f32>,
    /// The network's own probability of N+ (used for the ResNet50+C control).
    #[serde(default)]
    pub network_score: Option<f32>,
}

impl From<&FeatureRow> for pb::FeatureRow {
    fn from(r: &FeatureRow) -> Self {
        let c = &r.clinical;
        pb::FeatureRow {
            patient_id: r.patient_id.clone(),
            split: match r.split {
                Split::Train => pb::Split::Train,
                Split::Validation => pb::Split::Validation,
                Split::Test => pb::Split::Test,
            } as i32,
            n_stage: pb::NStage::from(r.n_stage) as i32,
            clinical: Some(pb::Clinical {
                age_years: c.age_years,
                us_size_mm: c.us_size_mm,
                er_positive: c.er_positive,
                pr_positive: c.pr_positive,
                her2_positive: c.her2_positive,
                ki67_positive: c.ki67_positive,
                birads: c.birads.map_or(0, |b| b as i32 + 1),
                histology: c.histology.map_or(0, |h| h as i32 + 1),
                location: c.location.map_or(0, |l| l as i32 + 1),
                axillary_us_positive: c.axillary_us_positive,
            }),
            deep: r.deep.clone(),
            network_score: r.network_score,
        }
    }
}

impl FeatureRow {
    /// Converts a received row; the site comes from the caller's certificate, never the message.
    pub fn from_proto(site: &SiteId, r: pb::FeatureRow, expected_dim: Option<usize>) -> Result<Self> {
        let bad = |m: String| Error::FeatureRow { site: site.to_string(), patient: r.patient_id.clone(), message: m };
        if r.patient_id.is_empty() {
            return Err(bad("empty patient id".into()));
        }
        let split = match pb::Split::try_from(r.split) {
            Ok(pb::Split::Train) => Split::Train,
            Ok(pb::Split::Validation) => Split::Validation,
            Ok(pb::Split::Test) => Split::Test,
            _ => return Err(bad(format!("unknown split {}", r.split))),
        };
        let n_stage = NStage::from_proto(r.n_stage).ok_or_else(|| bad(format!("unknown N stage {}", r.n_stage)))?;
        if let Some(dim) = expected_dim
            && r.deep.len() != dim {
                return Err(bad(format!("deep feature has {} values, expected {dim}", r.deep.len())));
            }
        if r.deep.is_empty() || r.deep.iter().any(|v| !v.is_finite()) {
            return Err(bad("deep feature is empty or not finite".into()));
        }
        let c = r.clinical.unwrap_or_default();
        let pick = |i: i32, what: &str, len: usize| -> Result<Option<usize>> {
            match i {
                0 => Ok(None),
                i if (1..=len as i32).contains(&i) => Ok(Some(i as usize - 1)),
                _ => Err(bad(format!("unknown {what} code {i}"))),
            }
        };
        let clinical = Clinical {
            age_years: c.age_years,
            us_size_mm: c.us_size_mm,
            er_positive: c.er_positive,
            pr_positive: c.pr_positive,
            her2_positive: c.her2_positive,
            ki67_positive: c.ki67_positive,
            birads: pick(c.birads, "BI-RADS", BiRads::ALL.len())?.map(|i| BiRads::ALL[i]),
            histology: pick(c.histology, "histology", Histology::ALL.len())?.map(|i| Histology::ALL[i]),
            location: pick(c.location, "location", Location::ALL.len())?.map(|i| Location::ALL[i]),
            axillary_us_positive: c.axillary_us_positive,
        };
        if clinical.age_years.is_some_and(|a| !a.is_finite()) || clinical.us_size_mm.is_some_and(|s| !s.is_finite()) {
            return Err(bad("non-finite clinical value".into()));
        }
        if r.network_score.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            return Err(bad("network score outside [0, 1]".into()));
        }
        Ok(Self { site: site.clone(), patient_id: r.patient_id, split, n_stage, clinical, deep: r.deep, network_score: r.network_score })
    }
}

/// Length of [`encode_clinical`]'s output (7 numeric/binary + 4 BI-RADS + 3 histology + 5 location).
pub const CLINICAL_FEATURES: usize = 19;

/// Reference means and standard deviations from the paper's Table 2 (584 patients), used
/// to centre clinical inputs *at a site* for the ResNet50+C control, where no pooled
/// statistics may be computed. Order as [`clinical_feature_names`].
const REFERENCE_MEAN: [f64; CLINICAL_FEATURES] = [
    50.27, 18.90, 471.0 / 584.0, 429.0 / 584.0, 135.0 / 584.0, 491.0 / 584.0, 0.55,
    31.0 / 584.0, 164.0 / 584.0, 267.0 / 584.0, 122.0 / 584.0,
    516.0 / 584.0, 18.0 / 584.0, 50.0 / 584.0,
    0.2, 0.2, 0.2, 0.2, 0.2,
];

/// Clinical variables centred on Table 2 (continuous ones also scaled by its SD); missing
/// values become 0, the reference mean.
pub fn encode_clinical_reference(c: &Clinical) -> Vec<f32> {
    let raw = encode_clinical(c);
    raw.iter()
        .enumerate()
        .map(|(j, &v)| {
            if v.is_nan() {
                return 0.0;
            }
            let sd = match j {
                0 => 10.32,
                1 => 6.48,
                _ => 1.0,
            };
            ((v - REFERENCE_MEAN[j]) / sd) as f32
        })
        .collect()
}

/// Names of the encoded clinical columns produced by [`encode_clinical`].
pub fn clinical_feature_names() -> Vec<String> {
    let mut names: Vec<String> = ["age", "us_size_mm", "er", "pr", "her2", "ki67", "axillary_us"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend(BiRads::ALL.iter().map(|b| format!("birads_{b}")));
    names.extend(Histology::ALL.iter().map(|h| format!("histology_{h}")));
    names.extend(Location::ALL.iter().map(|l| format!("location_{l}")));
    names
}

/// Encodes clinical variables numerically: continuous and binary values as numbers,
/// categoricals one-hot. Missing values are `NaN` (imputed later from training rows only).
pub fn encode_clinical(c: &Clinical) -> Vec<f64> {
    let num = |v: Option<f32>| v.map_or(f64::NAN, f64::from);
    let bin = |v: Option<bool>| v.map_or(f64::NAN, |b| if b { 1.0 } else { 0.0 });
    let mut out = vec![
        num(c.age_years),
        num(c.us_size_mm),
        bin(c.er_positive),
        bin(c.pr_positive),
        bin(c.her2_positive),
        bin(c.ki67_positive),
        bin(c.axillary_us_positive),
    ];
    fn one_hot<T: PartialEq + Copy>(all: &[T], v: Option<T>, out: &mut Vec<f64>) {
        out.extend(all.iter().map(|a| match v {
            Some(x) if x == *a => 1.0,
            Some(_) => 0.0,
            None => f64::NAN,
        }));
    }
    one_hot(BiRads::ALL, c.birads, &mut out);
    one_hot(Histology::ALL, c.histology, &mut out);
    one_hot(Location::ALL, c.location, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "patient_id,us_image,swe_image,us_roi_x,us_roi_y,us_roi_w,us_roi_h,swe_roi_x,swe_roi_y,swe_roi_w,swe_roi_h,age,us_size_mm,er,pr,her2,ki67,birads,histology,location,axillary_us,n_stage,split";

    fn write(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("manifest.csv");
        std::fs::write(&p, format!("{HEADER}\n{body}")).unwrap();
        p
    }

    #[test]
    fn parses_a_valid_row_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "p1,us/p1.png,swe/p1.png,1,2,30,40,1,2,30,40,51,18.5,positive,negative,,positive,4B,IDC,UOQ,negative,N1-2,test\n");
        let rows = read_manifest(&p).unwrap();
        assert_eq!(rows[0].n_stage, NStage::N1to2);
        assert_eq!(rows[0].clinical.her2_positive, None);
        assert_eq!(rows[0].us_image, dir.path().join("us/p1.png"));
        assert_eq!(rows[0].us_roi, RoiSpec::Box(Roi { x: 1, y: 2, w: 30, h: 40 }));
        assert_eq!(rows[0].split, Some(Split::Test));
        let p2 = dir.path().join("copy.csv");
        write_manifest(&p2, &rows).unwrap();
        assert_eq!(read_manifest(&p2).unwrap(), rows);
    }

    #[test]
    fn a_mask_column_replaces_the_box() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.csv");
        std::fs::write(
            &p,
            "patient_id,us_image,swe_image,swe_roi_x,swe_roi_y,swe_roi_w,swe_roi_h,age,us_size_mm,er,pr,her2,ki67,birads,histology,location,axillary_us,n_stage,us_roi_mask\n\
             p1,a.png,b.png,1,2,3,4,50,20,,,,,,,,,N0,masks/p1.png\n",
        )
        .unwrap();
        let rows = read_manifest(&p).unwrap();
        assert_eq!(rows[0].us_roi, RoiSpec::Mask(dir.path().join("masks/p1.png")));
        assert_eq!(rows[0].swe_roi, RoiSpec::Box(Roi { x: 1, y: 2, w: 3, h: 4 }));
        let copy = dir.path().join("copy.csv");
        write_manifest(&copy, &rows).unwrap();
        assert_eq!(read_manifest(&copy).unwrap(), rows);
    }

    #[test]
    fn errors_name_row_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let ok = "p1,a.png,b.png,1,2,30,40,1,2,30,40,51,18.5,positive,negative,,positive,4B,IDC,UOQ,negative,N0,\n";
        for (bad, field) in [
            ("p2,a.png,b.png,1,2,30,40,1,2,30,40,abc,18,,,,,,,,,N0,\n", "age"),
            ("p2,a.png,b.png,1,2,0,40,1,2,30,40,50,18,,,,,,,,,N0,\n", "us_roi_w"),
            ("p2,a.png,b.png,1,2,30,40,1,2,30,40,50,18,,,,,6,,,,N0,\n", "birads"),
            ("p2,a.png,b.png,1,2,30,40,1,2,30,40,50,18,,,,,,,,,N7,\n", "n_stage"),
            ("p1,a.png,b.png,1,2,30,40,1,2,30,40,50,18,,,,,,,,,N0,\n", "patient_id"),
        ] {
            let p = write(dir.path(), &format!("{ok}{bad}"));
            let e = read_manifest(&p).unwrap_err().to_string();
            assert!(e.contains("row 2") && e.contains(&format!("`{field}`")), "{e}");
        }
    }

    #[test]
    fn splits_are_stratified_and_seeded() {
        let stages: Vec<NStage> = (0..584).map(|i| if i < 337 { NStage::N0 } else if i < 487 { NStage::N1to2 } else { NStage::N3Plus }).collect();
        let s = assign_splits(&stages, 7);
        assert_eq!(s, assign_splits(&stages, 7));
        assert_ne!(s, assign_splits(&stages, 8));
        let count = |sp: Split| s.iter().filter(|&&x| x == sp).count();
        assert_eq!(count(Split::Test), 67 + 30 + 19);
        assert_eq!(count(Split::Validation), 68 + 30 + 20);
        let test_n0 = (0..584).filter(|&i| s[i] == Split::Test && stages[i] == NStage::N0).count();
        assert_eq!(test_n0, 67);
    }

    #[test]
    fn feature_rows_survive_the_wire_and_bad_ones_are_named() {
        let site = SiteId::new("site-a").unwrap();
        let row = FeatureRow {
            site: site.clone(),
            patient_id: "p9".into(),
            split: Split::Validation,
            n_stage: NStage::N3Plus,
            clinical: Clinical { birads: Some(BiRads::B5), location: Some(Location::Central), age_years: Some(40.0), ..Default::default() },
            deep: vec![0.5, -1.0],
            network_score: Some(0.25),
        };
        let back = FeatureRow::from_proto(&site, pb::FeatureRow::from(&row), Some(2)).unwrap();
        assert_eq!(back, row);
        let mut bad = pb::FeatureRow::from(&row);
        bad.deep[0] = f32::NAN;
        let e = FeatureRow::from_proto(&site, bad, None).unwrap_err().to_string();
        assert!(e.contains("site-a") && e.contains("p9"), "{e}");
        assert!(FeatureRow::from_proto(&site, pb::FeatureRow::from(&row), Some(3)).is_err());
    }

    #[test]
    fn clinical_encoding_is_one_hot_with_nan_for_missing() {
        let c = Clinical { birads: Some(BiRads::B4C), er_positive: Some(true), ..Default::default() };
        let e = encode_clinical(&c);
        assert_eq!(e.len(), clinical_feature_names().len());
        assert_eq!(e.len(), CLINICAL_FEATURES);
        let r = encode_clinical_reference(&c);
        assert_eq!(r.len(), CLINICAL_FEATURES);
        assert_eq!(r[0], 0.0, "missing age is the reference mean");
        assert!((r[2] - (1.0 - 471.0 / 584.0) as f32).abs() < 1e-6);
        assert!(e[0].is_nan() && e[2] == 1.0);
        assert_eq!(&e[7..11], &[0.0, 0.0, 1.0, 0.0]);
        assert!(e[11].is_nan());
    }
}
