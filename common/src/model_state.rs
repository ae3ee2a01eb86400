//! A model as ordered named tensors over one flat f32 buffer.
//!
//! This is the only model representation the coordinator knows (it never links libtorch).
//! Tensors are kept sorted by name, which makes the byte layout canonical: two processes
//! that hold the same weights produce the same [`ModelHash`]. Files on disk are
//! [safetensors](https://huggingface.co/docs/safetensors), readable from Python too.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic_file;
use crate::error::{Error, Result};
use crate::ids::ModelHash;

// The wire and file formats are little-endian f32; `as_bytes` reinterprets memory.
#[cfg(not(target_endian = "little"))]
compile_error!("aln-common assumes a little-endian target");

/// Name and shape of one tensor (always f32 in this version of the contract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Ordered tensor specs plus one contiguous buffer holding all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    specs: Vec<TensorSpec>,
    offsets: Vec<usize>,
    data: Vec<f32>,
}

impl ModelState {
    /// Builds a state; tensors must be sorted by name, unique, and fill `data` exactly.
    pub fn new(specs: Vec<TensorSpec>, data: Vec<f32>) -> Result<Self> {
        check_canonical_order(&specs)?;
        let mut offsets = Vec::with_capacity(specs.len() + 1);
        let mut total = 0usize;
        for s in &specs {
            offsets.push(total);
            total = total
                .checked_add(s.numel())
                .ok_or_else(|| Error::MalformedPayload("tensor sizes overflow".into()))?;
        }
        offsets.push(total);
        if total != data.len() {
            return Err(Error::MalformedPayload(format!(
                "tensors declare {total} values but the buffer holds {}",
                data.len()
            )));
        }
        Ok(Self {
            specs,
            offsets,
            data,
        })
    }

    /// Builds a state from unsorted named tensors (sorting them by name).
    pub fn from_named(mut tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Result<Self> {
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let total = tensors.iter().map(|t| t.2.len()).sum();
        let mut data = Vec::with_capacity(total);
        let mut specs = Vec::with_capacity(tensors.len());
        for (name, shape, values) in tensors {
            if shape.iter().product::<usize>() != values.len() {
                return Err(Error::MalformedPayload(format!(
                    "tensor {name}: shape {shape:?} does not match {} values",
                    values.len()
                )));
            }
            data.extend_from_slice(&values);
            specs.push(TensorSpec { name, shape });
        }
        Self::new(specs, data)
    }

    /// A state with the same tensors, all zero.
    pub fn zeros_like(&self) -> Self {
        Self {
            specs: self.specs.clone(),
            offsets: self.offsets.clone(),
            data: vec![0.0; self.data.len()],
        }
    }

    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }
    pub fn data(&self) -> &[f32] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    /// Encoded size in bytes (f32 little-endian).
    pub fn byte_len(&self) -> usize {
        self.data.len() * 4
    }
    /// Range of tensor `i` inside [`Self::data`].
    pub fn range(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }
    /// Values of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        let i = self.specs.binary_search_by(|s| s.name.as_str().cmp(name)).ok()?;
        Some(&self.data[self.range(i)])
    }
    /// Iterates `(spec, values)` in canonical order.
    pub fn tensors(&self) -> impl Iterator<Item = (&TensorSpec, &[f32])> {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| (s, &self.data[self.range(i)]))
    }

    /// The payload bytes as sent on the wire and hashed (f32 little-endian, canonical order).
    pub fn as_bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.data)
    }

    /// BLAKE3 of the payload bytes: the model version's identity (and the digest of its
    /// fp32 transfer). BLAKE3 rather than SHA-256: ~4× faster here, and every round hashes
    /// each model and update several times (see `make bench`, round overhead).
    pub fn weights_hash(&self) -> ModelHash {
        ModelHash(blake3::hash(self.as_bytes()).to_hex().to_string())
    }

    /// SHA-256 over names and shapes: equal for every version of one architecture.
    pub fn schema_hash(&self) -> String {
        schema_hash(&self.specs)
    }

    /// True when both states hold the same tensor names and shapes.
    pub fn same_schema(&self, other: &ModelState) -> bool {
        self.specs == other.specs
    }

    /// Writes the state as a safetensors file (atomically), with string metadata.
    pub fn save(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()> {
        let bytes = self.as_bytes();
        let views = self
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = self.range(i);
                let view = TensorView::new(Dtype::F32, s.shape.clone(), &bytes[r.start * 4..r.end * 4])
                    .map_err(|e| st_err(path, e))?;
                Ok((s.name.clone(), view))
            })
            .collect::<Result<Vec<_>>>()?;
        // Streamed to disk: no second model-sized buffer.
        atomic_file::write_via_path(path, |tmp| {
            safetensors::serialize_to_file(views, Some(metadata.clone()), tmp).map_err(std::io::Error::other)
        })
    }

    /// Reads a safetensors file of f32 tensors; returns the state and its metadata.
    ///
    /// The file is read once into an f32 buffer; when its tensors are stored in canonical
    /// order back to back (every file this project writes), that buffer becomes the state's
    /// after shifting out the header: one model-sized allocation, not three. Other files
    /// (e.g. converted torchvision weights) are gathered into canonical order with a copy.
    pub fn load(path: &Path) -> Result<(Self, HashMap<String, String>)> {
        use std::io::Read;
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len() as usize;
        let mut words = vec![0f32; len.div_ceil(4)];
        file.read_exact(&mut bytemuck::cast_slice_mut::<f32, u8>(&mut words)[..len]).map_err(|e| Error::io(path, e))?;
        let bytes = &bytemuck::cast_slice::<f32, u8>(&words)[..len];
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| st_err(path, e))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes).map_err(|e| st_err(path, e))?;
        let base = bytes.as_ptr() as usize;
        let mut entries = Vec::new();
        for (name, view) in st.tensors() {
            if view.dtype() != Dtype::F32 {
                return Err(Error::Safetensors {
                    path: path.into(),
                    message: format!("tensor {name} is {:?}; only F32 is supported", view.dtype()),
                });
            }
            let start = view.data().as_ptr() as usize - base;
            entries.push((name, view.shape().to_vec(), start..start + view.data().len()));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let contiguous = entries.first().is_some_and(|e| e.2.start % 4 == 0) && entries.windows(2).all(|w| w[0].2.end == w[1].2.start);
        let specs: Vec<TensorSpec> = entries.iter().map(|(n, s, _)| TensorSpec { name: n.clone(), shape: s.clone() }).collect();
        if contiguous {
            let first = entries[0].2.start / 4;
            let n = entries.last().map_or(0, |e| e.2.end / 4) - first;
            drop(st);
            words.copy_within(first..first + n, 0);
            words.truncate(n);
            return Ok((Self::new(specs, words)?, metadata));
        }
        let mut data = Vec::with_capacity(specs.iter().map(TensorSpec::numel).sum());
        for (_, _, r) in &entries {
            data.extend(bytes[r.clone()].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        Ok((Self::new(specs, data)?, metadata))
    }
}

/// Tensor names must be unique and sorted: the canonical layout of every model payload.
pub fn check_canonical_order(specs: &[TensorSpec]) -> Result<()> {
    for pair in specs.windows(2) {
        if pair[0].name >= pair[1].name {
            return Err(Error::MalformedPayload(format!(
                "tensor names must be unique and sorted: {:?} before {:?}",
                pair[0].name, pair[1].name
            )));
        }
    }
    Ok(())
}

/// Schema hash of a list of specs (see [`ModelState::schema_hash`]).
pub fn schema_hash(specs: &[TensorSpec]) -> String {
    let mut h = Sha256::new();
    for s in specs {
        h.update(s.name.as_bytes());
        h.update([0u8]);
        for d in &s.shape {
            h.update((*d as u64).to_le_bytes());
        }
        h.update([0xffu8]);
    }
    hex::encode(h.finalize())
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.into(),
        message: e.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn small_state(seed: f32) -> ModelState {
        ModelState::from_named(vec![
            ("b.bias".into(), vec![3], vec![seed, seed + 1.0, seed + 2.0]),
            ("a.weight".into(), vec![2, 2], vec![seed * 2.0; 4]),
        ])
        .unwrap()
    }

    #[test]
    fn canonical_order_and_lookup() {
        let s = small_state(1.0);
        assert_eq!(s.specs()[0].name, "a.weight");
        assert_eq!(s.tensor("b.bias").unwrap(), &[1.0, 2.0, 3.0]);
        assert!(s.tensor("missing").is_none());
        assert_eq!(s.byte_len(), 28);
    }

    #[test]
    fn rejects_bad_layouts() {
        let spec = |n: &str| TensorSpec { name: n.into(), shape: vec![1] };
        assert!(ModelState::new(vec![spec("b"), spec("a")], vec![0.0; 2]).is_err());
        assert!(ModelState::new(vec![spec("a"), spec("a")], vec![0.0; 2]).is_err());
        assert!(ModelState::new(vec![spec("a")], vec![0.0; 2]).is_err());
    }

    #[test]
    fn hashes_identify_versions_and_schemas() {
        let (a, b) = (small_state(1.0), small_state(2.0));
        assert_ne!(a.weights_hash(), b.weights_hash());
        assert_eq!(a.schema_hash(), b.schema_hash());
        assert_eq!(a.weights_hash(), small_state(1.0).weights_hash());
    }

    #[test]
    fn safetensors_round_trip_keeps_values_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let s = small_state(0.5);
        let meta = HashMap::from([("round".to_string(), "3".to_string())]);
        s.save(&p, &meta).unwrap();
        let (back, m) = ModelState::load(&p).unwrap();
        assert_eq!(back, s);
        assert_eq!(m["round"], "3");
    }
}
