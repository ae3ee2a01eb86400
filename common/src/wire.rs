//! The wire format of model transfers: a [`ModelState`] as a stream of bounded chunks.
//!
//! A stream is `header, tensor chunk*, trailer`. The header carries the tensor table and the
//! payload's purpose ([`PayloadMeta`]); chunks carry slices of each tensor's f32 little-endian
//! bytes, in canonical tensor order with ascending offsets; the trailer carries the SHA-256 of
//! all payload bytes. [`ChunkEncoder`] produces such a stream lazily (no copy of the model);
//! [`Reassembler`] checks every message as it arrives, refuses oversize payloads before
//! buffering them, and verifies the digest at the end. Both the coordinator's `PullModel`
//! and the site's `PushUpdate` use this one implementation.

use std::sync::Arc;

use aln_proto as pb;
use sha2::{Digest, Sha256};

use crate::constants::{DEFAULT_MAX_CHUNK_BYTES, MAX_MODEL_BYTES, MIN_CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::ids::{ModelHash, Round};
use crate::model_state::{ModelState, TensorSpec, check_canonical_order};

/// What a model stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// Full weights of a global model version.
    Weights,
    /// One site's `w_local - w_global` for one round.
    Delta,
}

/// Header fields of a model stream, as domain values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadMeta {
    pub kind: PayloadKind,
    pub round: Round,
    /// Global model the payload is (weights) or was trained from (delta).
    pub base_model_hash: ModelHash,
    /// Training patients behind a delta (the FedAvg weight); 0 for weights.
    pub sample_count: u64,
}

/// A fully received, digest-checked payload.
#[derive(Debug, Clone)]
pub struct Payload {
    pub meta: PayloadMeta,
    pub state: ModelState,
    pub digest: ModelHash,
}

/// Clamp a requested chunk size into the allowed range (0 means the default).
pub fn effective_chunk_bytes(requested: usize) -> usize {
    if requested == 0 {
        DEFAULT_MAX_CHUNK_BYTES
    } else {
        requested.clamp(MIN_CHUNK_BYTES, DEFAULT_MAX_CHUNK_BYTES) / 4 * 4
    }
}

enum EncodeStage {
    Header,
    Body { tensor: usize, offset: usize },
    Trailer,
    Done,
}

/// Lazily turns a model state into `ModelChunk` messages of at most `max_chunk_bytes` data.
pub struct ChunkEncoder {
    state: Arc<ModelState>,
    meta: PayloadMeta,
    max_chunk_elems: usize,
    stage: EncodeStage,
    /// Hashes as it goes, unless the digest is already known.
    hasher: Option<Sha256>,
    known_digest: Option<Vec<u8>>,
}

impl ChunkEncoder {
    pub fn new(state: Arc<ModelState>, meta: PayloadMeta, max_chunk_bytes: usize) -> Self {
        Self {
            state,
            meta,
            max_chunk_elems: (effective_chunk_bytes(max_chunk_bytes) / 4).max(1),
            stage: EncodeStage::Header,
            hasher: Some(Sha256::new()),
            known_digest: None,
        }
    }

    /// Like [`ChunkEncoder::new`] for a state whose [`ModelState::weights_hash`] is already
    /// known (the coordinator's global model), saving a hash pass per download.
    pub fn with_known_hash(state: Arc<ModelState>, meta: PayloadMeta, max_chunk_bytes: usize, hash: &ModelHash) -> Self {
        let mut e = Self::new(state, meta, max_chunk_bytes);
        if let Ok(d) = hex::decode(&hash.0) {
            e.hasher = None;
            e.known_digest = Some(d);
        }
        e
    }

    fn header(&self) -> pb::ModelHeader {
        pb::ModelHeader {
            kind: match self.meta.kind {
                PayloadKind::Weights => pb::PayloadKind::Weights,
                PayloadKind::Delta => pb::PayloadKind::Delta,
            } as i32,
            round: self.meta.round.0,
            base_model_hash: self.meta.base_model_hash.0.clone(),
            sample_count: self.meta.sample_count,
            tensors: self
                .state
                .specs()
                .iter()
                .map(|s| pb::TensorSpec {
                    name: s.name.clone(),
                    shape: s.shape.iter().map(|&d| d as u64).collect(),
                    dtype: pb::DType::F32 as i32,
                })
                .collect(),
            codec: pb::Codec::F32Le as i32,
            total_bytes: self.state.byte_len() as u64,
        }
    }

    /// Skip to the next tensor with values left, starting at `tensor`.
    fn body_from(&self, mut tensor: usize) -> EncodeStage {
        while tensor < self.state.specs().len() && self.state.range(tensor).is_empty() {
            tensor += 1;
        }
        if tensor < self.state.specs().len() {
            EncodeStage::Body { tensor, offset: 0 }
        } else {
            EncodeStage::Trailer
        }
    }
}

impl Iterator for ChunkEncoder {
    type Item = pb::ModelChunk;

    fn next(&mut self) -> Option<pb::ModelChunk> {
        use pb::model_chunk::Part;
        let part = match self.stage {
            EncodeStage::Header => {
                self.stage = self.body_from(0);
                Part::Header(self.header())
            }
            EncodeStage::Body { tensor, offset } => {
                let range = self.state.range(tensor);
                let len = (range.len() - offset).min(self.max_chunk_elems);
                let start = range.start + offset;
                let bytes = &self.state.as_bytes()[start * 4..(start + len) * 4];
                if let Some(h) = self.hasher.as_mut() {
                    h.update(bytes);
                }
                let data = bytes.to_vec();
                self.stage = if offset + len < range.len() {
                    EncodeStage::Body {
                        tensor,
                        offset: offset + len,
                    }
                } else {
                    self.body_from(tensor + 1)
                };
                Part::Tensor(pb::TensorChunk {
                    tensor_index: tensor as u32,
                    offset: offset as u64,
                    data,
                })
            }
            EncodeStage::Trailer => {
                self.stage = EncodeStage::Done;
                let digest = match (self.known_digest.take(), self.hasher.take()) {
                    (Some(d), _) => d,
                    (None, Some(h)) => h.finalize().to_vec(),
                    (None, None) => Vec::new(),
                };
                Part::Trailer(pb::ModelTrailer { sha256: digest })
            }
            EncodeStage::Done => return None,
        };
        Some(pb::ModelChunk { part: Some(part) })
    }
}

/// Limits a receiver enforces on an incoming stream.
#[derive(Debug, Clone)]
pub struct ReceiveLimits {
    pub max_total_bytes: u64,
    pub max_chunk_bytes: usize,
    /// When set, the header's tensor table must equal it exactly (names, shapes, order).
    pub expected_schema: Option<Arc<Vec<TensorSpec>>>,
}

impl Default for ReceiveLimits {
    fn default() -> Self {
        Self {
            max_total_bytes: MAX_MODEL_BYTES,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
            expected_schema: None,
        }
    }
}

enum Stage {
    AwaitHeader,
    Body,
    Complete,
}

/// Incrementally checks and reassembles a model stream.
pub struct Reassembler {
    limits: ReceiveLimits,
    stage: Stage,
    meta: Option<PayloadMeta>,
    specs: Vec<TensorSpec>,
    ends: Vec<usize>,
    data: Vec<f32>,
    tensor: usize,
    hasher: Sha256,
}

impl Reassembler {
    pub fn new(limits: ReceiveLimits) -> Self {
        Self {
            limits,
            stage: Stage::AwaitHeader,
            meta: None,
            specs: Vec::new(),
            ends: Vec::new(),
            data: Vec::new(),
            tensor: 0,
            hasher: Sha256::new(),
        }
    }

    /// The header's metadata once it has been received.
    pub fn meta(&self) -> Option<&PayloadMeta> {
        self.meta.as_ref()
    }

    /// Feeds one message; returns the payload when the trailer has been verified.
    pub fn push(&mut self, chunk: pb::ModelChunk) -> Result<Option<Payload>> {
        use pb::model_chunk::Part;
        let part = chunk
            .part
            .ok_or_else(|| malformed("a chunk without header, tensor or trailer"))?;
        match (&self.stage, part) {
            (Stage::AwaitHeader, Part::Header(h)) => {
                self.accept_header(h)?;
                Ok(None)
            }
            (Stage::AwaitHeader, _) => Err(malformed("stream must start with a header")),
            (Stage::Body, Part::Header(_)) => Err(malformed("a second header")),
            (Stage::Body, Part::Tensor(t)) => {
                self.accept_tensor(t)?;
                Ok(None)
            }
            (Stage::Body, Part::Trailer(t)) => self.accept_trailer(t).map(Some),
            (Stage::Complete, _) => Err(malformed("data after the trailer")),
        }
    }

    /// Call when the stream ends; errors if no trailer was seen.
    pub fn finish(&self) -> Result<()> {
        match self.stage {
            Stage::Complete => Ok(()),
            _ => Err(malformed(
                "stream ended before its trailer (broken transfer?)",
            )),
        }
    }

    fn accept_header(&mut self, h: pb::ModelHeader) -> Result<()> {
        let kind = match pb::PayloadKind::try_from(h.kind) {
            Ok(pb::PayloadKind::Weights) => PayloadKind::Weights,
            Ok(pb::PayloadKind::Delta) => PayloadKind::Delta,
            _ => return Err(malformed(format!("unknown payload kind {}", h.kind))),
        };
        if pb::Codec::try_from(h.codec) != Ok(pb::Codec::F32Le) {
            return Err(malformed(format!("unsupported codec {}", h.codec)));
        }
        let mut specs = Vec::with_capacity(h.tensors.len());
        let mut total: u64 = 0;
        for (i, t) in h.tensors.into_iter().enumerate() {
            if pb::DType::try_from(t.dtype) != Ok(pb::DType::F32) {
                return Err(malformed(format!("tensor {i} `{}`: dtype must be F32", t.name)));
            }
            let mut numel: u64 = 1;
            for &d in &t.shape {
                numel = numel
                    .checked_mul(d)
                    .ok_or_else(|| malformed(format!("tensor `{}`: shape overflows", t.name)))?;
            }
            total = total
                .checked_add(numel.saturating_mul(4))
                .ok_or_else(|| malformed("total size overflows"))?;
            specs.push(TensorSpec {
                name: t.name,
                shape: t.shape.iter().map(|&d| d as usize).collect(),
            });
        }
        if total != h.total_bytes {
            return Err(malformed(format!(
                "header says {} bytes but its tensors need {total}",
                h.total_bytes
            )));
        }
        if total > self.limits.max_total_bytes {
            return Err(malformed(format!(
                "payload of {total} bytes exceeds the limit of {} bytes",
                self.limits.max_total_bytes
            )));
        }
        if let Some(expected) = &self.limits.expected_schema {
            check_schema(expected, &specs)?;
        }
        check_canonical_order(&specs)?;
        let mut end = 0;
        self.ends = specs
            .iter()
            .map(|s| {
                end += s.numel();
                end
            })
            .collect();
        self.data = Vec::with_capacity(end);
        self.specs = specs;
        self.meta = Some(PayloadMeta {
            kind,
            round: Round(h.round),
            base_model_hash: ModelHash(h.base_model_hash),
            sample_count: h.sample_count,
        });
        self.stage = Stage::Body;
        self.skip_empty_tensors();
        Ok(())
    }

    fn skip_empty_tensors(&mut self) {
        while self.tensor < self.ends.len() && self.data.len() >= self.ends[self.tensor] {
            self.tensor += 1;
        }
    }

    fn accept_tensor(&mut self, t: pb::TensorChunk) -> Result<()> {
        if t.data.len() > self.limits.max_chunk_bytes {
            return Err(malformed(format!(
                "chunk of {} bytes exceeds the limit of {}",
                t.data.len(),
                self.limits.max_chunk_bytes
            )));
        }
        if t.data.is_empty() || !t.data.len().is_multiple_of(4) {
            return Err(malformed(format!(
                "chunk of {} bytes is not a whole number of f32 values",
                t.data.len()
            )));
        }
        let idx = t.tensor_index as usize;
        if idx != self.tensor || self.tensor >= self.ends.len() {
            return Err(malformed(format!(
                "chunk for tensor {idx} arrived while tensor {} was expected",
                self.tensor
            )));
        }
        let start = if idx == 0 { 0 } else { self.ends[idx - 1] };
        let filled = self.data.len() - start;
        if t.offset as usize != filled {
            return Err(malformed(format!(
                "tensor {idx} `{}`: chunk offset {} but {filled} values received",
                self.specs[idx].name, t.offset
            )));
        }
        let n = t.data.len() / 4;
        if self.data.len() + n > self.ends[idx] {
            return Err(malformed(format!(
                "tensor {idx} `{}`: chunk overruns the tensor",
                self.specs[idx].name
            )));
        }
        self.hasher.update(&t.data);
        // Little-endian f32 bytes into the f32 buffer: a plain copy (the target is LE, see model_state).
        let at = self.data.len();
        self.data.resize(at + n, 0.0);
        bytemuck::cast_slice_mut::<f32, u8>(&mut self.data[at..]).copy_from_slice(&t.data);
        self.skip_empty_tensors();
        Ok(())
    }

    fn accept_trailer(&mut self, t: pb::ModelTrailer) -> Result<Payload> {
        if self.tensor < self.ends.len() {
            return Err(malformed(format!(
                "trailer arrived with tensor {} `{}` incomplete",
                self.tensor, self.specs[self.tensor].name
            )));
        }
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        let expected = hex::encode(&t.sha256);
        if actual != expected {
            return Err(Error::DigestMismatch { expected, actual });
        }
        self.stage = Stage::Complete;
        let state = ModelState::new(std::mem::take(&mut self.specs), std::mem::take(&mut self.data))?;
        Ok(Payload {
            meta: self.meta.clone().expect("header seen"),
            state,
            digest: ModelHash(actual),
        })
    }
}

/// Names the first difference between an expected and a received tensor table.
pub fn check_schema(expected: &[TensorSpec], got: &[TensorSpec]) -> Result<()> {
    for (i, (e, g)) in expected.iter().zip(got).enumerate() {
        if e != g {
            return Err(Error::InvalidUpdate(format!(
                "tensor {i}: expected `{}` {:?}, got `{}` {:?}",
                e.name, e.shape, g.name, g.shape
            )));
        }
    }
    if expected.len() != got.len() {
        return Err(Error::InvalidUpdate(format!(
            "expected {} tensors, got {}",
            expected.len(),
            got.len()
        )));
    }
    Ok(())
}

fn malformed(msg: impl Into<String>) -> Error {
    Error::MalformedPayload(msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta() -> PayloadMeta {
        PayloadMeta {
            kind: PayloadKind::Delta,
            round: Round(2),
            base_model_hash: ModelHash("ab".into()),
            sample_count: 17,
        }
    }

    fn reassemble(chunks: Vec<pb::ModelChunk>, limits: ReceiveLimits) -> Result<Payload> {
        let mut r = Reassembler::new(limits);
        let mut out = None;
        for c in chunks {
            if let Some(p) = r.push(c)? {
                out = Some(p);
            }
        }
        r.finish()?;
        Ok(out.unwrap())
    }

    fn arb_state() -> impl Strategy<Value = ModelState> {
        prop::collection::vec(prop::collection::vec(1usize..6, 0..4), 1..6).prop_flat_map(|shapes| {
            let total: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
            prop::collection::vec(any::<f32>(), total).prop_map(move |data| {
                let specs = shapes
                    .iter()
                    .enumerate()
                    .map(|(i, s)| TensorSpec {
                        name: format!("t{i:02}"),
                        shape: s.clone(),
                    })
                    .collect();
                ModelState::new(specs, data).unwrap()
            })
        })
    }

    proptest! {
        #[test]
        fn chunking_round_trips(state in arb_state(), chunk in 1usize..64) {
            let enc = ChunkEncoder { max_chunk_elems: chunk, ..ChunkEncoder::new(Arc::new(state.clone()), meta(), 0) };
            let chunks: Vec<_> = enc.collect();
            let p = reassemble(chunks, ReceiveLimits::default()).unwrap();
            prop_assert_eq!(p.state.as_bytes(), state.as_bytes());
            prop_assert_eq!(p.state.specs(), state.specs());
            prop_assert_eq!(p.meta, meta());
            prop_assert_eq!(p.digest, state.weights_hash());
        }

        #[test]
        fn any_flipped_byte_is_caught(state in arb_state(), pick in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut chunks: Vec<_> = ChunkEncoder::new(Arc::new(state), meta(), 0).collect();
            let data_idx: Vec<usize> = chunks.iter().enumerate()
                .filter(|(_, c)| matches!(c.part, Some(pb::model_chunk::Part::Tensor(_)))).map(|(i, _)| i).collect();
            prop_assume!(!data_idx.is_empty());
            let i = data_idx[pick.index(data_idx.len())];
            if let Some(pb::model_chunk::Part::Tensor(t)) = &mut chunks[i].part {
                let j = pick.index(t.data.len());
                t.data[j] ^= 1 << bit;
            }
            let err = reassemble(chunks, ReceiveLimits::default()).unwrap_err();
            prop_assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        }
    }

    fn big_state() -> ModelState {
        ModelState::from_named(vec![("w".into(), vec![4096], vec![1.0; 4096])]).unwrap()
    }

    #[test]
    fn a_known_hash_gives_the_same_stream() {
        let s = Arc::new(big_state());
        let a: Vec<_> = ChunkEncoder::new(s.clone(), meta(), MIN_CHUNK_BYTES).collect();
        let b: Vec<_> = ChunkEncoder::with_known_hash(s.clone(), meta(), MIN_CHUNK_BYTES, &s.weights_hash()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn chunks_respect_the_size_bound() {
        let chunks: Vec<_> = ChunkEncoder::new(Arc::new(big_state()), meta(), MIN_CHUNK_BYTES).collect();
        assert_eq!(chunks.len(), 1 + 4 + 1);
        for c in &chunks {
            if let Some(pb::model_chunk::Part::Tensor(t)) = &c.part {
                assert!(t.data.len() <= MIN_CHUNK_BYTES);
            }
        }
    }

    #[test]
    fn oversize_payload_is_refused_at_the_header() {
        let mut chunks = ChunkEncoder::new(Arc::new(big_state()), meta(), 0);
        let limits = ReceiveLimits { max_total_bytes: 1000, ..Default::default() };
        let err = Reassembler::new(limits).push(chunks.next().unwrap()).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit"), "{err}");
    }

    #[test]
    fn truncated_and_reordered_streams_are_refused() {
        let chunks: Vec<_> = ChunkEncoder::new(Arc::new(big_state()), meta(), MIN_CHUNK_BYTES).collect();
        let mut truncated = chunks.clone();
        truncated.pop();
        assert!(reassemble(truncated, ReceiveLimits::default()).is_err());
        let mut swapped = chunks.clone();
        swapped.swap(1, 2);
        assert!(reassemble(swapped, ReceiveLimits::default()).is_err());
        assert!(reassemble(chunks[1..].to_vec(), ReceiveLimits::default()).is_err());
    }

    #[test]
    fn wrong_schema_is_refused_with_the_tensor_named() {
        let chunks: Vec<_> = ChunkEncoder::new(Arc::new(big_state()), meta(), 0).collect();
        let expected = Arc::new(vec![TensorSpec { name: "w".into(), shape: vec![64, 64] }]);
        let limits = ReceiveLimits { expected_schema: Some(expected), ..Default::default() };
        let err = reassemble(chunks, limits).unwrap_err();
        assert!(err.to_string().contains("expected `w` [64, 64], got `w` [4096]"), "{err}");
    }
}
