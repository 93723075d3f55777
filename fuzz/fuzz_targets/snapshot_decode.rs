//! Snapshot objects and manifests from arbitrary bytes (a damaged or
//! hostile destination): never a panic, never an oversized allocation, and
//! a manifest that decodes re-encodes to exactly the bytes it came from.
#![no_main]

use foresnap_uploader::format::{Manifest, decode_object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(o) = decode_object(data, 4 << 20) {
        let mut chunk = vec![0u8; o.blocks as usize * o.block_bytes as usize];
        o.apply(&mut chunk)
            .expect("a verified object applies to its chunk");
    }
    if let Ok(m) = Manifest::decode(data) {
        assert_eq!(m.encode(), data, "manifest does not round-trip");
    }
});
