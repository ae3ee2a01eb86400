//! Arbitrary bytes as a site's manifest.csv: the parser must name a row and field or
//! accept, never panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = aln_common::cohort::parse_manifest(data, Path::new("fuzz/manifest.csv"), Path::new("fuzz"));
});
