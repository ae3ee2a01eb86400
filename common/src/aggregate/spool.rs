//! Updates go to disk as they arrive, not to memory.
//!
//! [`SpoolSink`] is the coordinator's [`PayloadSink`]: it checks the header against the open
//! round (so a stale or foreign update is refused before its body is read), writes each
//! decoded chunk to a file under the state directory, and computes the norm and finiteness
//! on the way. Linear strategies also add each chunk to the round's sum as it arrives
//! ([`SpoolSink::streaming`]); the file then only serves to rebuild the sum should a
//! streamed update be refused. Robust strategies read all files at the round's end.
//! Memory per upload is one chunk, however many sites upload at once. A [`SpoolFile`]
//! deletes itself when dropped.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use std::sync::Arc;

use crate::aggregate::mean::{StreamTarget, StreamWeight};
use crate::aggregate::{Expectation, UpdateValues, ValueSummary, check_header};
use crate::error::{Error, Result};
use crate::model_state::TensorSpec;
use crate::wire::{PayloadMeta, PayloadSink, Values};

/// An update's values on disk: 4-byte little-endian words (f32, or u32 ring words).
#[derive(Debug)]
pub struct SpoolFile {
    pub path: PathBuf,
    pub values: usize,
    pub ring: bool,
}

impl SpoolFile {
    /// The file for sequential reading (callers read large blocks, so no extra buffer).
    pub fn open(&self) -> Result<File> {
        File::open(&self.path).map_err(|e| Error::io(&self.path, e))
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Writes an incoming update to `dir`, checking it against `expectation` as it comes.
pub struct SpoolSink {
    /// Linear strategies: the round's sum each chunk is also added to, and this update's weight.
    stream: Option<(Arc<StreamTarget>, StreamWeight, u64)>,
    weight: f32,
    starts: Vec<usize>,
    dir: PathBuf,
    label: String,
    expectation: Expectation,
    writer: Option<BufWriter<File>>,
    file: Option<SpoolFile>,
    names: Vec<String>,
    summary: ValueSummary,
    written: usize,
}

impl SpoolSink {
    /// `label` names the file (the site id); `dir` is created if missing.
    pub fn new(dir: &Path, label: &str, expectation: Expectation) -> Self {
        Self { stream: None, weight: 0.0, starts: vec![], dir: dir.to_path_buf(), label: label.to_string(), expectation, writer: None, file: None, names: vec![], summary: ValueSummary::default(), written: 0 }
    }

    /// Also adds every decoded chunk, weighted by `weight`, to `target` as it arrives.
    pub fn streaming(mut self, target: Arc<StreamTarget>, weight: StreamWeight) -> Self {
        self.stream = Some((target, weight, SEQUENCE.fetch_add(1, Ordering::Relaxed)));
        self
    }
}

impl PayloadSink for SpoolSink {
    /// The spooled values, their summary, and the stream id if they were streamed into a sum.
    type Output = (UpdateValues, ValueSummary, Option<u64>);

    fn begin(&mut self, meta: &PayloadMeta, specs: &[TensorSpec]) -> Result<()> {
        check_header(meta, &self.expectation)?;
        if let Some((_, rule, _)) = &self.stream {
            self.weight = rule.weight(meta.sample_count);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(format!("{}-{}-{}.spool", self.label, std::process::id(), SEQUENCE.fetch_add(1, Ordering::Relaxed)));
        let f = File::create(&path).map_err(|e| Error::io(&path, e))?;
        self.file = Some(SpoolFile { path, values: 0, ring: meta.codec == crate::codec::Codec::Ring32 });
        self.writer = Some(BufWriter::with_capacity(256 << 10, f));
        self.names = specs.iter().map(|s| s.name.clone()).collect();
        let mut at = 0;
        self.starts = specs
            .iter()
            .map(|s| {
                let start = at;
                at += s.numel();
                start
            })
            .collect();
        Ok(())
    }

    fn values(&mut self, tensor: usize, offset: usize, values: Values<'_>) -> Result<()> {
        let w = self.writer.as_mut().expect("begin before values");
        let path = &self.file.as_ref().expect("begin before values").path;
        let (bytes, n): (&[u8], usize) = match values {
            Values::F32(v) => {
                self.summary.add(&self.names[tensor], offset, v);
                (bytemuck::cast_slice(v), v.len())
            }
            Values::Ring(v) => (bytemuck::cast_slice(v), v.len()),
        };
        w.write_all(bytes).map_err(|e| Error::io(path, e))?;
        self.written += n;
        if let Some((target, _, id)) = &self.stream {
            target.add(*id, self.starts[tensor] + offset, values, self.weight)?;
        }
        Ok(())
    }

    fn finish(mut self, _specs: Vec<TensorSpec>) -> Result<Self::Output> {
        let mut file = self.file.take().expect("begin before finish");
        let w = self.writer.take().expect("begin before finish");
        w.into_inner().map_err(|e| Error::io(&file.path, e.into_error()))?;
        file.values = self.written;
        Ok((UpdateValues::Spooled(file), self.summary, self.stream.map(|s| s.2)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Codec;
    use crate::ids::{ModelHash, Round};
    use crate::model_state::ModelState;
    use crate::wire::{ChunkEncoder, ReceiveLimits, StreamDecoder};
    use std::sync::Arc;

    #[test]
    fn a_spooled_update_reads_back_and_vanishes_when_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let delta = ModelState::from_named(vec![("w".into(), vec![3000], (0..3000).map(|i| i as f32 * 1e-3).collect())]).unwrap();
        let exp = Expectation { global_hash: ModelHash("g".into()), round: Round(1), max_sample_count: 100, max_norm: None, codec: Codec::F32, mask_epoch: 0, numel: 3000 };
        let meta = PayloadMeta::delta(Round(1), ModelHash("g".into()), 5);
        let mut dec = StreamDecoder::with_sink(ReceiveLimits::default(), SpoolSink::new(dir.path(), "site-a", exp.clone()));
        let mut out = None;
        for c in ChunkEncoder::new(Arc::new(delta.clone()), meta.clone(), 4096) {
            if let Some(r) = dec.push(c).unwrap() {
                out = Some(r);
            }
        }
        let (values, summary, _) = out.unwrap().body;
        assert!((summary.sum_sq - delta.data().iter().map(|v| f64::from(*v).powi(2)).sum::<f64>()).abs() < 1e-6);
        let mut back = vec![0f32; 3000];
        values.reader().unwrap().read_f32(&mut back).unwrap();
        assert_eq!(back, delta.data());
        let path = match &values {
            UpdateValues::Spooled(f) => f.path.clone(),
            _ => unreachable!(),
        };
        drop(values);
        assert!(!path.exists());

        // A stale header is refused before any value is written.
        let stale = PayloadMeta::delta(Round(0), ModelHash("g".into()), 5);
        let mut dec = StreamDecoder::with_sink(ReceiveLimits::default(), SpoolSink::new(dir.path(), "site-a", exp));
        let err = dec.push(ChunkEncoder::new(Arc::new(delta), stale, 4096).next().unwrap()).unwrap_err();
        assert!(err.to_string().contains("round 0"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
