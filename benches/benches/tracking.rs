//! What tracking adds to every write on the queue thread: marking the
//! write in the DirtyMap (start and done) and encoding its ring record,
//! with 1 and 2 threads marking the same map (the 2-core machines here).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use foresnap_benches::random_blocks;
use foresnap_driver::tracking::ring_format::{Record, RecordKind};
use foresnap_driver::tracking::{DirtyMap, Geometry};

/// 64 GiB volume: 2^24 tracking blocks, a 4 MiB map (bigger than the L2).
const VOLUME: u64 = 64 << 30;
const WRITES: usize = 1 << 16;

fn mark_all(map: &DirtyMap, blocks: &[u64]) {
    let mut cow: Vec<u64> = Vec::with_capacity(128);
    for &b in blocks {
        cow.clear();
        let off = b << 12;
        black_box(map.start_write(off, 4096, &mut cow));
        map.write_done(off, 4096);
    }
}

fn bench_mark(c: &mut Criterion) {
    let map = Arc::new(DirtyMap::new(VOLUME, Geometry::default()));
    let mut g = c.benchmark_group("dirty_map_mark_4k_write");
    for threads in [1usize, 2] {
        let streams: Vec<Arc<Vec<u64>>> = (0..threads)
            .map(|t| Arc::new(random_blocks(0xF0E5 + t as u64, WRITES, VOLUME >> 12)))
            .collect();
        g.throughput(Throughput::Elements((WRITES * threads) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        std::thread::scope(|s| {
                            for stream in streams.iter().take(threads) {
                                let (map, stream) = (&map, stream.clone());
                                s.spawn(move || mark_all(map, &stream));
                            }
                        });
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
    }
    g.finish();
}

fn bench_record(c: &mut Criterion) {
    let blocks = random_blocks(0xBEEF, WRITES, VOLUME >> 12);
    let mut g = c.benchmark_group("ring_record_encode");
    g.throughput(Throughput::Elements(WRITES as u64));
    g.bench_function("write_record", |b| {
        b.iter(|| {
            let mut x = 0u8;
            for (seq, &blk) in blocks.iter().enumerate() {
                let r = Record {
                    seq: seq as u64 + 1,
                    epoch: 7,
                    kind: RecordKind::Write {
                        offset: blk << 12,
                        len: 4096,
                        fua: false,
                    },
                };
                x ^= r.encode()[28];
            }
            x
        })
    });
    g.finish();
}

criterion_group!(benches, bench_mark, bench_record);
criterion_main!(benches);
