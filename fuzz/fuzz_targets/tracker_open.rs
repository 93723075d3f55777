//! The tracker's start on a ring whose record area and bitmap page are
//! arbitrary bytes (behind a valid header): never panics, and whatever it
//! recovers is usable: a close, a write and a restart work.
#![no_main]

use std::io::Write;

use foresnap_driver::tracking::Geometry;
use foresnap_driver::tracking::ring_format::{HEADER_BYTES, Header};
use foresnap_driver::tracking::tracker::{Begin, Tracker, TrackerConfig};
use libfuzzer_sys::fuzz_target;

const VOLUME: u64 = 256 * 4096;
const AREA: usize = 60 << 10;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    std::fs::File::create(&volume)
        .unwrap()
        .set_len(VOLUME)
        .unwrap();
    let header = Header {
        area_bytes: AREA as u64,
        volume_bytes: VOLUME,
        block_bytes: 4096,
        volume_id: [1; 16],
        created_ms: 0,
    };
    let mut file = vec![0u8; usize::try_from(header.file_bytes()).unwrap()];
    file[..HEADER_BYTES].copy_from_slice(&header.encode());
    // The fuzz input fills the record area, then the bitmap page and bits.
    let n = data.len().min(file.len() - HEADER_BYTES);
    file[HEADER_BYTES..HEADER_BYTES + n].copy_from_slice(&data[..n]);
    let ring = dir.path().join("ring");
    std::fs::File::create(&ring)
        .unwrap()
        .write_all(&file)
        .unwrap();
    let cfg = TrackerConfig {
        ring,
        ring_bytes: 0,
        geometry: Geometry {
            block_shift: 12,
            chunk_shift: 16,
        },
    };
    let Ok((t, _)) = Tracker::open(&cfg, &volume, VOLUME, 1) else {
        return;
    };
    let epoch = t.open_epoch();
    let mut cow = Vec::new();
    if t.begin_write(0, 4096, 4096, false, false, &mut cow) == Begin::Go {
        t.end_write(0, 4096, 4096);
    }
    let c = t.close().unwrap();
    assert_eq!(c.epoch, epoch);
    assert!(t.map().state(1).pending());
    for e in t.closed_epochs() {
        let mut buf = vec![0u8; 4096];
        if let Some(set) = t.changed_blocks(e.epoch) {
            for b in set.blocks().take(8) {
                let _ = t.read_closed(e.epoch, b, &mut buf);
            }
        }
    }
    drop(t);
    let (t, _) = Tracker::open(&cfg, &volume, VOLUME, 1).unwrap();
    assert!(t.open_epoch() > epoch, "epoch went back after a restart");
    assert!(t.map().state(1).pending(), "a tracked write was lost");
});
