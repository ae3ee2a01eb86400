//! Update compression on the wire: how tensor values become `TensorChunk` bytes and back.
//!
//! [`Codec::F32`] is the identity. [`Codec::F16`] halves the bytes; [`Codec::Int8Tensor`] and
//! [`Codec::Int8Channel`] quarter them with symmetric int8 quantisation (one scale per tensor,
//! or per output channel = dimension 0). Lossy codecs are used with error feedback at the
//! site ([`ErrorFeedback`], Seide et al. 2014 / Karimireddy et al. 2019): what quantisation
//! dropped this round is added to the next round's delta, so nothing is lost for good.
//! [`Codec::Ring32`] carries fixed-point values in Z_2^32 for secure aggregation
//! (`privacy::secagg`); it is encoded by [`ring_encode`], never by [`encode`].
//!
//! The codec of a run is chosen in the coordinator's config and negotiated at `Join`.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model_state::{ModelState, TensorSpec};

/// How an update's values are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Codec {
    /// 4 bytes per value, lossless.
    #[default]
    #[serde(rename = "fp32")]
    F32,
    /// 2 bytes per value (IEEE half).
    #[serde(rename = "fp16")]
    F16,
    /// 1 byte per value, one scale per tensor.
    #[serde(rename = "int8")]
    Int8Tensor,
    /// 1 byte per value, one scale per output channel.
    #[serde(rename = "int8-channel")]
    Int8Channel,
    /// 4 bytes per value, masked fixed point in Z_2^32 (secure aggregation only).
    #[serde(rename = "ring32")]
    Ring32,
}

/// Codecs a site-node can produce (advertised at `Join`).
pub const SUPPORTED_CODECS: [Codec; 5] = [Codec::F32, Codec::F16, Codec::Int8Tensor, Codec::Int8Channel, Codec::Ring32];

impl Codec {
    pub fn bytes_per_value(self) -> usize {
        match self {
            Codec::F32 | Codec::Ring32 => 4,
            Codec::F16 => 2,
            Codec::Int8Tensor | Codec::Int8Channel => 1,
        }
    }

    pub fn is_lossy(self) -> bool {
        matches!(self, Codec::F16 | Codec::Int8Tensor | Codec::Int8Channel)
    }

    /// How many scales a tensor of this shape carries in the header.
    pub fn scale_count(self, spec: &TensorSpec) -> usize {
        match self {
            Codec::Int8Tensor => 1,
            Codec::Int8Channel => channels(spec),
            _ => 0,
        }
    }

    pub fn to_proto(self) -> aln_proto::Codec {
        use aln_proto::Codec as P;
        match self {
            Codec::F32 => P::F32Le,
            Codec::F16 => P::F16Le,
            Codec::Int8Tensor => P::Int8Tensor,
            Codec::Int8Channel => P::Int8Channel,
            Codec::Ring32 => P::RingU32,
        }
    }

    pub fn from_proto(v: i32) -> Result<Self> {
        use aln_proto::Codec as P;
        match P::try_from(v) {
            Ok(P::F32Le) => Ok(Codec::F32),
            Ok(P::F16Le) => Ok(Codec::F16),
            Ok(P::Int8Tensor) => Ok(Codec::Int8Tensor),
            Ok(P::Int8Channel) => Ok(Codec::Int8Channel),
            Ok(P::RingU32) => Ok(Codec::Ring32),
            _ => Err(Error::MalformedPayload(format!("unknown codec {v}"))),
        }
    }
}

impl std::fmt::Display for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Codec::F32 => "fp32",
            Codec::F16 => "fp16",
            Codec::Int8Tensor => "int8",
            Codec::Int8Channel => "int8-channel",
            Codec::Ring32 => "ring32",
        })
    }
}

/// Output channels of a tensor for per-channel scales: dimension 0 of a ≥ 2-D tensor, else 1.
fn channels(spec: &TensorSpec) -> usize {
    if spec.shape.len() >= 2 && spec.shape[0] > 0 { spec.shape[0] } else { 1 }
}

/// An encoded model: bytes in canonical tensor order plus the scales of int8 codecs.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub codec: Codec,
    pub specs: Vec<TensorSpec>,
    /// Scales tensor by tensor ([`Codec::scale_count`] each).
    pub scales: Vec<f32>,
    pub bytes: Vec<u8>,
}

impl Encoded {
    /// Masked ring words of a model with these tensors, as one payload.
    pub fn ring(specs: Vec<TensorSpec>, words: Vec<u32>) -> Self {
        Self { codec: Codec::Ring32, specs, scales: vec![], bytes: bytemuck::cast_slice(&words).to_vec() }
    }
}

/// Encodes with a lossy or identity codec (not [`Codec::Ring32`]).
pub fn encode(state: &ModelState, codec: Codec) -> Result<Encoded> {
    let mut bytes = Vec::with_capacity(state.numel() * codec.bytes_per_value());
    let mut scales = Vec::new();
    for (spec, values) in state.tensors() {
        match codec {
            Codec::F32 => bytes.extend_from_slice(bytemuck::cast_slice(values)),
            Codec::F16 => bytes.extend(values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes())),
            Codec::Int8Tensor | Codec::Int8Channel => {
                let groups = codec.scale_count(spec);
                let per = values.len() / groups.max(1);
                for g in 0..groups {
                    let part = &values[g * per..(g + 1) * per];
                    let max = part.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = max / 127.0;
                    scales.push(scale);
                    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                    bytes.extend(part.iter().map(|&v| (v * inv).round().clamp(-127.0, 127.0) as i8 as u8));
                }
            }
            Codec::Ring32 => return Err(Error::InvalidUpdate("ring values are made by ring_encode".into())),
        }
    }
    Ok(Encoded { codec, specs: state.specs().to_vec(), scales, bytes })
}

/// Decodes `bytes` (values `offset..` of tensor `spec`) into `out` (cleared first).
/// `scales` are that tensor's scales. Not for [`Codec::Ring32`].
pub fn decode_into(codec: Codec, spec: &TensorSpec, scales: &[f32], offset: usize, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match codec {
        Codec::F32 | Codec::Ring32 => {
            out.resize(bytes.len() / 4, 0.0);
            bytemuck::cast_slice_mut::<f32, u8>(out).copy_from_slice(bytes);
        }
        Codec::F16 => out.extend(bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())),
        Codec::Int8Tensor | Codec::Int8Channel => {
            let per = spec.numel() / scales.len().max(1);
            out.extend(bytes.iter().enumerate().map(|(i, &b)| {
                let scale = scales.get((offset + i) / per.max(1)).copied().unwrap_or(0.0);
                f32::from(b as i8) * scale
            }));
        }
    }
}

/// Decodes a whole [`Encoded`] model back to f32.
pub fn decode(enc: &Encoded) -> Result<ModelState> {
    let mut data = Vec::with_capacity(enc.specs.iter().map(TensorSpec::numel).sum());
    let (mut at, mut s) = (0usize, 0usize);
    let mut buf = Vec::new();
    for spec in &enc.specs {
        let n = spec.numel();
        let k = enc.codec.scale_count(spec);
        let len = n * enc.codec.bytes_per_value();
        decode_into(enc.codec, spec, &enc.scales[s..s + k], 0, &enc.bytes[at..at + len], &mut buf);
        data.extend_from_slice(&buf);
        at += len;
        s += k;
    }
    ModelState::new(enc.specs.clone(), data)
}

/// Error feedback: the part of past deltas that quantisation dropped, added back next time.
#[derive(Debug, Clone)]
pub struct ErrorFeedback {
    pub residual: ModelState,
}

impl ErrorFeedback {
    pub fn new(like: &ModelState) -> Self {
        Self { residual: like.zeros_like() }
    }

    /// Encodes `delta + residual` and keeps what the codec lost as the next residual.
    pub fn compress(&mut self, delta: &ModelState, codec: Codec) -> Result<Encoded> {
        if !self.residual.same_schema(delta) {
            self.residual = delta.zeros_like();
        }
        let mut corrected = delta.clone();
        for (c, r) in corrected.data_mut().iter_mut().zip(self.residual.data()) {
            *c += r;
        }
        let enc = encode(&corrected, codec)?;
        let sent = decode(&enc)?;
        for ((r, c), s) in self.residual.data_mut().iter_mut().zip(corrected.data()).zip(sent.data()) {
            *r = c - s;
        }
        Ok(enc)
    }
}

/// Fixed point in Z_2^32: `round(v · weight · 2^frac_bits)`, saturated to the i32 range,
/// as u32. Returns the words and how many values saturated.
pub fn ring_encode(values: &[f32], weight: f64, frac_bits: u32) -> (Vec<u32>, usize) {
    let scale = weight * f64::from(1u32 << frac_bits.min(30));
    let mut saturated = 0;
    let words = values
        .iter()
        .map(|&v| {
            let x = (f64::from(v) * scale).round();
            let clamped = x.clamp(f64::from(i32::MIN), f64::from(i32::MAX));
            if clamped != x {
                saturated += 1;
            }
            clamped as i32 as u32
        })
        .collect();
    (words, saturated)
}

/// The value of a ring sum: the word read as a signed two's-complement number, / 2^frac_bits.
pub fn ring_decode(word: u32, frac_bits: u32) -> f64 {
    f64::from(word as i32) / f64::from(1u32 << frac_bits.min(30))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn state(values: Vec<f32>) -> ModelState {
        let n = values.len();
        ModelState::from_named(vec![("a.weight".into(), vec![2, n / 2], values[..n / 2 * 2].to_vec())]).unwrap()
    }

    #[test]
    fn int8_per_tensor_on_a_hand_checked_vector() {
        // max |x| = 1.27 → scale 0.01; 0.5 → 50, -1.27 → -127, 0.004 → 0.
        let s = ModelState::from_named(vec![("w".into(), vec![4], vec![0.5, -1.27, 0.004, 1.0])]).unwrap();
        let e = encode(&s, Codec::Int8Tensor).unwrap();
        assert_eq!(e.scales, vec![0.01]);
        assert_eq!(e.bytes.iter().map(|&b| b as i8).collect::<Vec<_>>(), vec![50, -127, 0, 100]);
        let d = decode(&e).unwrap();
        assert!((d.data()[0] - 0.5).abs() < 1e-6 && d.data()[2] == 0.0);
    }

    #[test]
    fn int8_per_channel_keeps_small_channels_precise() {
        // Channel 0 is tiny, channel 1 large: one scale per tensor would zero channel 0.
        let s = ModelState::from_named(vec![("w".into(), vec![2, 2], vec![1e-3, -2e-3, 10.0, 5.0])]).unwrap();
        let per_tensor = decode(&encode(&s, Codec::Int8Tensor).unwrap()).unwrap();
        assert_eq!(&per_tensor.data()[..2], &[0.0, 0.0]);
        let per_channel = decode(&encode(&s, Codec::Int8Channel).unwrap()).unwrap();
        assert!((per_channel.data()[1] + 2e-3).abs() < 1e-5, "{:?}", per_channel.data());
        assert_eq!(encode(&s, Codec::Int8Channel).unwrap().scales.len(), 2);
    }

    #[test]
    fn error_feedback_carries_what_was_dropped() {
        // A constant delta below half a quantisation step is lost every round without
        // feedback; with feedback the sum of what was sent tracks the sum of deltas.
        let s = ModelState::from_named(vec![("w".into(), vec![2], vec![1.0, 0.003])]).unwrap();
        let mut ef = ErrorFeedback::new(&s);
        let mut sent_total = [0f32; 2];
        for _ in 0..100 {
            let sent = decode(&ef.compress(&s, Codec::Int8Tensor).unwrap()).unwrap();
            sent_total[0] += sent.data()[0];
            sent_total[1] += sent.data()[1];
        }
        assert!((sent_total[1] - 0.3).abs() < 0.01, "{sent_total:?}");
        assert_eq!(decode(&encode(&s, Codec::Int8Tensor).unwrap()).unwrap().data()[1], 0.0);
    }

    #[test]
    fn ring_values_round_trip_and_saturate() {
        let (w, sat) = ring_encode(&[1.5, -0.25, 1e9], 2.0, 16);
        assert_eq!(sat, 1);
        assert_eq!(ring_decode(w[0], 16), 3.0);
        assert_eq!(ring_decode(w[1], 16), -0.5);
        assert_eq!(w[2] as i32, i32::MAX);
    }

    proptest! {
        #[test]
        fn lossy_codecs_stay_within_their_error_bound(values in prop::collection::vec(-100f32..100.0, 2..64)) {
            let s = state(values);
            let max = s.data().iter().fold(0f32, |m, v| m.max(v.abs()));
            for codec in [Codec::F32, Codec::F16, Codec::Int8Tensor, Codec::Int8Channel] {
                let e = encode(&s, codec).unwrap();
                prop_assert_eq!(e.bytes.len(), s.numel() * codec.bytes_per_value());
                let d = decode(&e).unwrap();
                let bound = match codec { Codec::F32 => 0.0, Codec::F16 => max * 1e-3, _ => max / 254.0 * 1.0001 };
                for (a, b) in s.data().iter().zip(d.data()) {
                    prop_assert!((a - b).abs() <= bound + 1e-7, "{codec}: {a} vs {b}");
                }
            }
        }
    }
}
