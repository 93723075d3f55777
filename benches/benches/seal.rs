//! What encryption at rest costs an upload and a restore: sealing and
//! opening one 4 MiB object (the default chunk) with the volume key, next
//! to the baseline of copying it (the one copy the sealed destination
//! adds). The report's ratio is sealed time over copy time.

use std::time::Instant;

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use foresnap_uploader::seal::VolumeKey;

const OBJECT: usize = 4 << 20;

fn seal(c: &mut Criterion) {
    let key = VolumeKey::from_bytes(&[0x5a; 32]);
    let plain: Vec<u8> = (0..OBJECT)
        .map(|i| ((i * 31) >> 7).to_le_bytes()[0])
        .collect();
    let sealed = key.seal("v/objects/000000000000/0000000001.chunk", &plain);
    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Bytes(OBJECT as u64));
    g.bench_function("copy (baseline)", |b| b.iter(|| black_box(plain.clone())));
    g.bench_function("seal", |b| {
        b.iter(|| black_box(key.seal("v/objects/000000000000/0000000001.chunk", &plain)))
    });
    g.bench_function("open", |b| {
        b.iter(|| {
            black_box(
                key.open("v/objects/000000000000/0000000001.chunk", &sealed)
                    .expect("opens"),
            )
        })
    });
    g.finish();
    // One line with the ratios (criterion prints each on its own).
    let time = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..20 {
            f();
        }
        t.elapsed().as_secs_f64() / 20.0
    };
    let copy = time(&|| drop(black_box(plain.clone())));
    let s = time(&|| drop(black_box(key.seal("k", &plain))));
    let o = time(&|| {
        drop(black_box(
            key.open("v/objects/000000000000/0000000001.chunk", &sealed),
        ))
    });
    let mib = OBJECT as f64 / f64::from(1 << 20);
    println!(
        "seal: copy {:.0} MiB/s, seal {:.0} MiB/s ({:.1}x the copy's time), open {:.0} MiB/s ({:.1}x)",
        mib / copy,
        mib / s,
        s / copy,
        mib / o,
        o / copy
    );
}

criterion_group!(benches, seal);
criterion_main!(benches);
