//! The wire format of model transfers: a model or update as a stream of bounded chunks.
//!
//! A stream is `header, tensor chunk*, trailer`. The header carries the tensor table, the
//! payload's purpose and its codec ([`PayloadMeta`], `codec`); chunks carry slices of each
//! tensor's encoded bytes, in canonical tensor order with ascending offsets; the trailer
//! carries the BLAKE3 digest of all payload bytes as sent. [`ChunkEncoder`] produces such a stream
//! lazily (no copy of an f32 model). [`StreamDecoder`] checks every message as it arrives,
//! refuses oversize payloads at the header, decodes each chunk and hands the values to a
//! [`PayloadSink`]: [`VecSink`] builds a [`ModelState`] (a site's download), the
//! coordinator's spool sink writes an update to disk as it arrives (`aggregate::spool`), so
//! the coordinator never holds a whole update in memory. The digest is verified at the end.

use std::sync::Arc;

use aln_proto as pb;

use crate::codec::{self, Codec, Encoded};
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
    pub codec: Codec,
    /// [`Codec::Ring32`]: fixed-point fraction bits and the round's masking attempt.
    pub ring_fraction_bits: u32,
    pub mask_epoch: u32,
}

impl PayloadMeta {
    /// Full fp32 weights of the global model after `round` rounds.
    pub fn weights(round: Round, hash: ModelHash) -> Self {
        Self { kind: PayloadKind::Weights, round, base_model_hash: hash, sample_count: 0, codec: Codec::F32, ring_fraction_bits: 0, mask_epoch: 0 }
    }

    /// A delta for `round`, trained from `base` on `samples` patients, in fp32.
    pub fn delta(round: Round, base: ModelHash, samples: u64) -> Self {
        Self { kind: PayloadKind::Delta, round, base_model_hash: base, sample_count: samples, codec: Codec::F32, ring_fraction_bits: 0, mask_epoch: 0 }
    }
}

/// A fully received, digest-checked payload: what the sink made of it.
#[derive(Debug, Clone)]
pub struct Received<T> {
    pub meta: PayloadMeta,
    pub body: T,
    pub digest: ModelHash,
}

/// A payload materialised as a model (what [`Reassembler`] returns).
pub type Payload = Received<ModelState>;

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

/// Where an encoder's bytes come from.
enum Source {
    /// An f32 model, sent as is (no copy until each chunk).
    Model(Arc<ModelState>),
    /// Already encoded bytes (compressed or ring values) with their scales.
    Encoded { specs: Vec<TensorSpec>, bytes: Arc<Vec<u8>>, scales: Vec<f32>, starts: Vec<usize> },
}

/// Keeps the encoded buffer alive for the chunks that view it.
enum Shared {
    Model(Arc<ModelState>),
    Bytes(Arc<Vec<u8>>),
}

struct ChunkView {
    source: Shared,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for ChunkView {
    fn as_ref(&self) -> &[u8] {
        match &self.source {
            Shared::Model(m) => &m.as_bytes()[self.range.clone()],
            Shared::Bytes(b) => &b[self.range.clone()],
        }
    }
}

impl Source {
    fn share(&self) -> Shared {
        match self {
            Source::Model(m) => Shared::Model(m.clone()),
            Source::Encoded { bytes, .. } => Shared::Bytes(bytes.clone()),
        }
    }

    fn specs(&self) -> &[TensorSpec] {
        match self {
            Source::Model(m) => m.specs(),
            Source::Encoded { specs, .. } => specs,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Model(m) => m.as_bytes(),
            Source::Encoded { bytes, .. } => bytes,
        }
    }
    /// Element offset of tensor `i`'s first value.
    fn start(&self, i: usize) -> usize {
        match self {
            Source::Model(m) => m.range(i).start,
            Source::Encoded { starts, .. } => starts[i],
        }
    }
}

/// Lazily turns a model state into `ModelChunk` messages of at most `max_chunk_bytes` data.
pub struct ChunkEncoder {
    source: Source,
    meta: PayloadMeta,
    width: usize,
    max_chunk_elems: usize,
    stage: EncodeStage,
    /// Hashes as it goes, unless the digest is already known.
    hasher: Option<blake3::Hasher>,
    known_digest: Option<Vec<u8>>,
}

impl ChunkEncoder {
    /// An fp32 stream of `state` (`meta.codec` is taken as fp32).
    pub fn new(state: Arc<ModelState>, meta: PayloadMeta, max_chunk_bytes: usize) -> Self {
        Self::from_source(Source::Model(state), PayloadMeta { codec: Codec::F32, ..meta }, max_chunk_bytes)
    }

    /// A stream of already encoded values (`meta.codec` must be `enc.codec`).
    pub fn encoded(enc: Encoded, meta: PayloadMeta, max_chunk_bytes: usize) -> Self {
        let mut starts = Vec::with_capacity(enc.specs.len());
        let mut at = 0;
        for s in &enc.specs {
            starts.push(at);
            at += s.numel();
        }
        let source = Source::Encoded { specs: enc.specs, bytes: Arc::new(enc.bytes), scales: enc.scales, starts };
        Self::from_source(source, PayloadMeta { codec: enc.codec, ..meta }, max_chunk_bytes)
    }

    fn from_source(source: Source, meta: PayloadMeta, max_chunk_bytes: usize) -> Self {
        let width = meta.codec.bytes_per_value();
        Self {
            source,
            width,
            max_chunk_elems: (effective_chunk_bytes(max_chunk_bytes) / width).max(1),
            meta,
            stage: EncodeStage::Header,
            hasher: Some(blake3::Hasher::new()),
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

    /// Encoded payload bytes this stream carries (without framing).
    pub fn payload_bytes(&self) -> u64 {
        self.source.specs().iter().map(|s| (s.numel() * self.width) as u64).sum()
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
                .source
                .specs()
                .iter()
                .map(|s| pb::TensorSpec {
                    name: s.name.clone(),
                    shape: s.shape.iter().map(|&d| d as u64).collect(),
                    dtype: pb::DType::F32 as i32,
                })
                .collect(),
            codec: self.meta.codec.to_proto() as i32,
            total_bytes: self.payload_bytes(),
            scales: match &self.source {
                Source::Encoded { scales, .. } => scales.clone(),
                Source::Model(_) => vec![],
            },
            ring_fraction_bits: self.meta.ring_fraction_bits,
            mask_epoch: self.meta.mask_epoch,
        }
    }

    /// Skip to the next tensor with values left, starting at `tensor`.
    fn body_from(&self, mut tensor: usize) -> EncodeStage {
        let specs = self.source.specs();
        while tensor < specs.len() && specs[tensor].numel() == 0 {
            tensor += 1;
        }
        if tensor < specs.len() {
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
                let numel = self.source.specs()[tensor].numel();
                let len = (numel - offset).min(self.max_chunk_elems);
                let start = self.source.start(tensor) + offset;
                let range = start * self.width..(start + len) * self.width;
                if let Some(h) = self.hasher.as_mut() {
                    h.update(&self.source.bytes()[range.clone()]);
                }
                // A view of the model's own buffer: no copy until the transport's.
                let data = prost::bytes::Bytes::from_owner(ChunkView { source: self.source.share(), range });
                self.stage = if offset + len < numel {
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
                    (None, Some(h)) => h.finalize().as_bytes().to_vec(),
                    (None, None) => Vec::new(),
                };
                Part::Trailer(pb::ModelTrailer { digest })
            }
            EncodeStage::Done => return None,
        };
        Some(pb::ModelChunk { part: Some(part) })
    }
}

/// Limits a receiver enforces on an incoming stream.
#[derive(Debug, Clone)]
pub struct ReceiveLimits {
    /// Largest encoded payload.
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

/// Decoded values of one chunk, handed to a [`PayloadSink`].
#[derive(Debug, Clone, Copy)]
pub enum Values<'a> {
    /// Real values (fp32 on the wire, or dequantised fp16 / int8).
    F32(&'a [f32]),
    /// Words of the ring Z_2^32 ([`Codec::Ring32`]).
    Ring(&'a [u32]),
}

/// Receives a payload's values as they arrive, in canonical order.
pub trait PayloadSink {
    type Output;
    /// Called once with the checked header; an error refuses the stream before its body.
    fn begin(&mut self, meta: &PayloadMeta, specs: &[TensorSpec]) -> Result<()>;
    /// The next values of tensor `tensor`, starting at element `offset`.
    fn values(&mut self, tensor: usize, offset: usize, values: Values<'_>) -> Result<()>;
    /// Called once the digest matched.
    fn finish(self, specs: Vec<TensorSpec>) -> Result<Self::Output>;
}

/// Collects an f32 payload into a [`ModelState`].
#[derive(Debug, Default)]
pub struct VecSink {
    data: Vec<f32>,
}

impl PayloadSink for VecSink {
    type Output = ModelState;

    fn begin(&mut self, _meta: &PayloadMeta, specs: &[TensorSpec]) -> Result<()> {
        self.data = Vec::with_capacity(specs.iter().map(TensorSpec::numel).sum());
        Ok(())
    }

    fn values(&mut self, _tensor: usize, _offset: usize, values: Values<'_>) -> Result<()> {
        match values {
            Values::F32(v) => {
                self.data.extend_from_slice(v);
                Ok(())
            }
            Values::Ring(_) => Err(malformed("a masked (ring) payload cannot be read as a model")),
        }
    }

    fn finish(self, specs: Vec<TensorSpec>) -> Result<ModelState> {
        ModelState::new(specs, self.data)
    }
}

enum Stage {
    AwaitHeader,
    Body,
    Complete,
}

/// Incrementally checks, decodes and verifies a model stream, feeding a sink.
pub struct StreamDecoder<S: PayloadSink> {
    limits: ReceiveLimits,
    stage: Stage,
    meta: Option<PayloadMeta>,
    specs: Vec<TensorSpec>,
    /// Element count of each tensor, and where each tensor's scales start.
    numels: Vec<usize>,
    scale_starts: Vec<usize>,
    scales: Vec<f32>,
    tensor: usize,
    /// Values of the current tensor received so far.
    filled: usize,
    hasher: blake3::Hasher,
    sink: Option<S>,
    scratch: Vec<f32>,
    ring: Vec<u32>,
}

/// Reassembles a stream into a [`ModelState`] (a site's model download, tests).
pub type Reassembler = StreamDecoder<VecSink>;

impl StreamDecoder<VecSink> {
    pub fn new(limits: ReceiveLimits) -> Self {
        Self::with_sink(limits, VecSink::default())
    }
}

impl<S: PayloadSink> StreamDecoder<S> {
    pub fn with_sink(limits: ReceiveLimits, sink: S) -> Self {
        Self {
            limits,
            stage: Stage::AwaitHeader,
            meta: None,
            specs: Vec::new(),
            numels: Vec::new(),
            scale_starts: Vec::new(),
            scales: Vec::new(),
            tensor: 0,
            filled: 0,
            hasher: blake3::Hasher::new(),
            sink: Some(sink),
            scratch: Vec::new(),
            ring: Vec::new(),
        }
    }

    /// The header's metadata once it has been received.
    pub fn meta(&self) -> Option<&PayloadMeta> {
        self.meta.as_ref()
    }

    /// Feeds one message; returns the sink's output when the trailer has been verified.
    pub fn push(&mut self, chunk: pb::ModelChunk) -> Result<Option<Received<S::Output>>> {
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
        let codec = Codec::from_proto(h.codec)?;
        if kind == PayloadKind::Weights && codec != Codec::F32 {
            return Err(malformed(format!("weights must be sent as fp32, not {codec}")));
        }
        let width = codec.bytes_per_value() as u64;
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
                .checked_add(numel.saturating_mul(width))
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
        let mut at = 0;
        self.scale_starts = specs
            .iter()
            .map(|s| {
                let start = at;
                at += codec.scale_count(s);
                start
            })
            .collect();
        if h.scales.len() != at {
            return Err(malformed(format!("{codec} needs {at} scales, the header has {}", h.scales.len())));
        }
        if let Some(i) = h.scales.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err(malformed(format!("scale {i} is {} (must be finite and ≥ 0)", h.scales[i])));
        }
        if codec == Codec::Ring32 && !(1..=30).contains(&h.ring_fraction_bits) {
            return Err(malformed(format!("ring_fraction_bits {} outside 1..=30", h.ring_fraction_bits)));
        }
        self.scales = h.scales;
        self.numels = specs.iter().map(TensorSpec::numel).collect();
        let meta = PayloadMeta {
            kind,
            round: Round(h.round),
            base_model_hash: ModelHash(h.base_model_hash),
            sample_count: h.sample_count,
            codec,
            ring_fraction_bits: h.ring_fraction_bits,
            mask_epoch: h.mask_epoch,
        };
        self.sink.as_mut().expect("sink until finish").begin(&meta, &specs)?;
        self.specs = specs;
        self.meta = Some(meta);
        self.stage = Stage::Body;
        self.skip_empty_tensors();
        Ok(())
    }

    fn skip_empty_tensors(&mut self) {
        while self.tensor < self.numels.len() && self.filled >= self.numels[self.tensor] {
            self.tensor += 1;
            self.filled = 0;
        }
    }

    fn accept_tensor(&mut self, t: pb::TensorChunk) -> Result<()> {
        let codec = self.meta.as_ref().expect("header seen").codec;
        let width = codec.bytes_per_value();
        if t.data.len() > self.limits.max_chunk_bytes {
            return Err(malformed(format!(
                "chunk of {} bytes exceeds the limit of {}",
                t.data.len(),
                self.limits.max_chunk_bytes
            )));
        }
        if t.data.is_empty() || !t.data.len().is_multiple_of(width) {
            return Err(malformed(format!(
                "chunk of {} bytes is not a whole number of {codec} values",
                t.data.len()
            )));
        }
        let idx = t.tensor_index as usize;
        if idx != self.tensor || self.tensor >= self.numels.len() {
            return Err(malformed(format!(
                "chunk for tensor {idx} arrived while tensor {} was expected",
                self.tensor
            )));
        }
        if t.offset as usize != self.filled {
            return Err(malformed(format!(
                "tensor {idx} `{}`: chunk offset {} but {} values received",
                self.specs[idx].name, t.offset, self.filled
            )));
        }
        let n = t.data.len() / width;
        if self.filled + n > self.numels[idx] {
            return Err(malformed(format!(
                "tensor {idx} `{}`: chunk overruns the tensor",
                self.specs[idx].name
            )));
        }
        self.hasher.update(&t.data);
        let sink = self.sink.as_mut().expect("sink until finish");
        if codec == Codec::Ring32 {
            self.ring.clear();
            self.ring.resize(n, 0);
            bytemuck::cast_slice_mut::<u32, u8>(&mut self.ring).copy_from_slice(&t.data);
            sink.values(idx, self.filled, Values::Ring(&self.ring))?;
        } else {
            if let (Codec::F32, Ok(values)) = (codec, bytemuck::try_cast_slice::<u8, f32>(&t.data)) {
                // Aligned little-endian f32 bytes: read in place.
                sink.values(idx, self.filled, Values::F32(values))?;
            } else {
                let k = codec.scale_count(&self.specs[idx]);
                let s0 = self.scale_starts[idx];
                codec::decode_into(codec, &self.specs[idx], &self.scales[s0..s0 + k], self.filled, &t.data, &mut self.scratch);
                sink.values(idx, self.filled, Values::F32(&self.scratch))?;
            }
        }
        self.filled += n;
        self.skip_empty_tensors();
        Ok(())
    }

    fn accept_trailer(&mut self, t: pb::ModelTrailer) -> Result<Received<S::Output>> {
        if self.tensor < self.numels.len() {
            return Err(malformed(format!(
                "trailer arrived with tensor {} `{}` incomplete",
                self.tensor, self.specs[self.tensor].name
            )));
        }
        let actual = self.hasher.finalize().to_hex().to_string();
        let expected = hex::encode(&t.digest);
        if actual != expected {
            return Err(Error::DigestMismatch { expected, actual });
        }
        self.stage = Stage::Complete;
        let sink = self.sink.take().expect("sink until finish");
        let body = sink.finish(std::mem::take(&mut self.specs))?;
        Ok(Received {
            meta: self.meta.clone().expect("header seen"),
            body,
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
        PayloadMeta::delta(Round(2), ModelHash("ab".into()), 17)
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
            prop_assert_eq!(p.body.as_bytes(), state.as_bytes());
            prop_assert_eq!(p.body.specs(), state.specs());
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
                let mut data = t.data.to_vec();
                data[j] ^= 1 << bit;
                t.data = data.into();
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
