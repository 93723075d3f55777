//! The per-request CPU cost the driver adds on the queue thread: decoding a
//! descriptor and running a request's state machine to completion. Every
//! I/O pays it, so it must stay in the nanoseconds.

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use foresnap_benches::random_blocks;
use foresnap_driver::queue::{Action, Progress};
use foresnap_driver::request::decode;
use libublk::sys;

const DEV: u64 = 1 << 40;
const BUF: u32 = 512 << 10;

fn bench_request_path(c: &mut Criterion) {
    // 4 KiB requests at random 4 KiB-aligned places, in 512-byte sectors.
    let starts: Vec<u64> = random_blocks(0x9E37_79B9_7F4A_7C15, 4096, DEV >> 12)
        .into_iter()
        .map(|b| b << 3)
        .collect();
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(starts.len() as u64));
    for (name, op) in [
        ("read_4k", sys::UBLK_IO_OP_READ),
        ("write_4k", sys::UBLK_IO_OP_WRITE),
    ] {
        g.bench_with_input(
            BenchmarkId::new("decode_and_complete", name),
            &op,
            |b, &op| {
                b.iter(|| {
                    let mut sum = 0i64;
                    for &start in &starts {
                        let req = decode(black_box(op), start, 8, DEV, BUF).expect("valid request");
                        let (mut p, _issue) = Progress::start(req, true, false);
                        if let Action::Complete(r) = p.on_result(4096) {
                            sum += i64::from(r);
                        }
                    }
                    sum
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench_request_path);
criterion_main!(benches);
