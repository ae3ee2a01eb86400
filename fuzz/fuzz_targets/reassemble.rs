//! Arbitrary bytes → a sequence of length-prefixed `ModelChunk` messages → the reassembler
//! the coordinator runs on every upload. It must reject garbage with an error, never panic,
//! and never hold more than its limit.
#![no_main]

use aln_common::wire::{ReceiveLimits, Reassembler};
use aln_proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let limits = ReceiveLimits { max_total_bytes: 1 << 20, max_chunk_bytes: 64 << 10, expected_schema: None };
    let mut r = Reassembler::new(limits);
    let mut rest = data;
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (msg, tail) = rest.split_at(take);
        rest = tail;
        let Ok(chunk) = pb::ModelChunk::decode(msg) else { continue };
        match r.push(chunk) {
            Ok(Some(p)) => assert!(p.body.byte_len() <= 1 << 20),
            Ok(None) => {}
            Err(_) => return,
        }
    }
    let _ = r.finish();
});
