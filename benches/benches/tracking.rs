//! What tracking adds to every write on the queue thread: marking the
//! write in the DirtyMap (start and done) and appending its record to the
//! write ring, with 1 and 2 threads sharing one map and one ring (the
//! 2-core machines here). The ring lives in a temporary file; appends touch
//! only its page-cache pages, as on the device.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use foresnap_benches::random_blocks;
use foresnap_driver::tracking::ring::WriteRing;
use foresnap_driver::tracking::ring_format::RecordKind;
use foresnap_driver::tracking::{DirtyMap, Geometry};

/// 64 GiB volume: 2^24 tracking blocks, a 4 MiB map (bigger than the L2).
const VOLUME: u64 = 64 << 30;
const WRITES: usize = 1 << 16;

/// Marks (and, with a ring, records) one 4 KiB write per block.
fn track_all(map: &DirtyMap, ring: Option<&WriteRing>, blocks: &[u64]) {
    let mut cow: Vec<u64> = Vec::with_capacity(128);
    for &b in blocks {
        cow.clear();
        let off = b << 12;
        black_box(map.start_write(off, 4096, &mut cow));
        if let Some(ring) = ring {
            let kind = RecordKind::Write {
                offset: off,
                len: 4096,
                fua: false,
                zeroing: false,
            };
            let seq = ring.append(1, kind).expect("ring sized for the run");
            // Keep the ring from filling: the uploader's job in the device.
            if seq % 4096 == 0 {
                ring.release_below(seq);
            }
        }
        map.write_done(off, 4096);
    }
}

/// Benchmarks `work(thread, blocks)` run on 1 and 2 threads at once, each
/// on its own stream of random blocks; `between` runs untimed after each
/// round (housekeeping an uploader would do).
fn bench_threads(
    c: &mut Criterion,
    name: &str,
    work: impl Fn(u16, &[u64]) + Sync,
    between: impl Fn(),
) {
    let mut g = c.benchmark_group(name);
    for threads in [1u16, 2] {
        let streams: Vec<Vec<u64>> = (0..threads)
            .map(|t| random_blocks(0xF0E5 + u64::from(t), WRITES, VOLUME >> 12))
            .collect();
        g.throughput(Throughput::Elements((WRITES * streams.len()) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &streams,
            |b, streams| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        std::thread::scope(|s| {
                            for (t, stream) in (0u16..).zip(streams) {
                                let work = &work;
                                s.spawn(move || work(t, stream));
                            }
                        });
                        total += start.elapsed();
                        between();
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

fn bench_tracking(c: &mut Criterion) {
    let map = DirtyMap::new(VOLUME, Geometry::default());
    let dir = tempfile::tempdir().expect("temp dir");
    let ring =
        WriteRing::create(&dir.path().join("ring"), 64 << 20, VOLUME, 4096).expect("create ring");
    bench_threads(
        c,
        "dirty_map_mark_4k_write",
        |_, blocks| track_all(&map, None, blocks),
        || {},
    );
    bench_threads(
        c,
        "mark_and_ring_append_4k_write",
        |_, blocks| track_all(&map, Some(&ring), blocks),
        || {},
    );
}

/// The whole call the queue thread makes per write: `Tracker::begin_write`
/// (in-flight count, epoch check, marks, ring record) and `end_write`.
/// Between timed rounds the epoch is closed and finished (as an uploader
/// would), so that the ring never fills.
fn bench_tracker(c: &mut Criterion) {
    use foresnap_driver::tracking::tracker::{Begin, Tracker, TrackerConfig};
    let dir = tempfile::tempdir().expect("temp dir");
    let volume = dir.path().join("volume");
    std::fs::File::create(&volume)
        .and_then(|f| f.set_len(VOLUME))
        .expect("volume file");
    let cfg = TrackerConfig {
        ring: dir.path().join("ring"),
        ring_bytes: 64 << 20,
        geometry: Geometry::default(),
    };
    let (tracker, _) = Tracker::open(&cfg, &volume, VOLUME, 2).expect("tracker");
    bench_threads(
        c,
        "tracker_begin_end_4k_write",
        |q, blocks| {
            let mut cow = Vec::with_capacity(128);
            for &b in blocks {
                let off = b << 12;
                let r = tracker.begin_write(q, off, 4096, false, false, &mut cow);
                assert_eq!(r, Begin::Go);
                tracker.end_write(q, off, 4096);
            }
        },
        || {
            let closed = tracker.close().expect("close");
            tracker.finish_epoch(closed.epoch).expect("finish");
        },
    );
}

criterion_group!(benches, bench_tracking, bench_tracker);
criterion_main!(benches);
