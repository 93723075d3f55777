//! I/O metrics of a device (off by default: `serve --metrics`).
//!
//! Per queue and request class: a latency histogram (hdrhistogram, in
//! microseconds from the kernel's command to its completion, waits for an
//! epoch close or a lazy restore's chunk included), requests, bytes and
//! errors. Each queue records into stats of its own behind a mutex that
//! only a scrape contends for, and only for the time of a copy: a request
//! costs two clock reads and one uncontended lock, and nothing at all with
//! metrics off (`scripts/bench-device --systems foresnap,foresnap-metrics`
//! measures it on the device).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::request::Op;

/// Request classes, in the order of [`OpClass::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpClass {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    /// A request that could not be decoded (it fails with an errno).
    Invalid,
}

impl OpClass {
    pub const ALL: [OpClass; 6] = [
        OpClass::Read,
        OpClass::Write,
        OpClass::Flush,
        OpClass::Discard,
        OpClass::WriteZeroes,
        OpClass::Invalid,
    ];

    /// The label value in metrics.
    pub fn name(self) -> &'static str {
        match self {
            OpClass::Read => "read",
            OpClass::Write => "write",
            OpClass::Flush => "flush",
            OpClass::Discard => "discard",
            OpClass::WriteZeroes => "write_zeroes",
            OpClass::Invalid => "invalid",
        }
    }

    pub fn of(op: Op) -> OpClass {
        match op {
            Op::Read => OpClass::Read,
            Op::Write { .. } => OpClass::Write,
            Op::Flush => OpClass::Flush,
            Op::Discard => OpClass::Discard,
            Op::WriteZeroes { .. } => OpClass::WriteZeroes,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Latencies from 1 µs to 100 s at 2 significant digits (1% error).
const MAX_US: u64 = 100_000_000;

/// One class's figures.
#[derive(Debug, Clone)]
pub struct ClassStats {
    /// Latency in µs; its count is the number of requests.
    pub latency_us: Histogram<u64>,
    pub bytes: u64,
    /// Requests completed with an errno.
    pub errors: u64,
}

impl ClassStats {
    fn new() -> ClassStats {
        ClassStats {
            latency_us: Histogram::new_with_bounds(1, MAX_US, 2)
                .expect("constant histogram bounds are valid"),
            bytes: 0,
            errors: 0,
        }
    }

    fn add(&mut self, other: &ClassStats) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
        self.bytes += other.bytes;
        self.errors += other.errors;
    }
}

/// One queue's stats, written by its thread only.
#[derive(Debug)]
pub struct QueueStats {
    classes: Vec<ClassStats>,
}

impl QueueStats {
    /// Records one completed request.
    pub fn record(&mut self, class: OpClass, bytes: u32, took: Duration, ok: bool) {
        let s = &mut self.classes[class.index()];
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        s.latency_us.saturating_record(us.clamp(1, MAX_US));
        if ok {
            s.bytes += u64::from(bytes);
        } else {
            s.errors += 1;
        }
    }
}

/// The I/O metrics of one device: its queues register as they start (a
/// recovered device may have another queue count than asked for).
#[derive(Debug, Default)]
pub struct IoMetrics {
    queues: Mutex<Vec<Arc<Mutex<QueueStats>>>>,
}

impl IoMetrics {
    pub fn new() -> IoMetrics {
        IoMetrics::default()
    }

    /// Stats for a new queue to record into.
    pub fn queue(&self) -> Arc<Mutex<QueueStats>> {
        let q = Arc::new(Mutex::new(QueueStats {
            classes: OpClass::ALL.iter().map(|_| ClassStats::new()).collect(),
        }));
        lock(&self.queues).push(q.clone());
        q
    }

    /// Every queue's figures added up, per class (in [`OpClass::ALL`]
    /// order). Each queue is locked only while it is copied.
    pub fn totals(&self) -> Vec<(OpClass, ClassStats)> {
        let queues: Vec<_> = lock(&self.queues).clone();
        let mut out: Vec<(OpClass, ClassStats)> = OpClass::ALL
            .iter()
            .map(|&c| (c, ClassStats::new()))
            .collect();
        for q in queues {
            let q = lock(&q);
            for (o, s) in out.iter_mut().zip(&q.classes) {
                o.1.add(s);
            }
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain counters: a panicked holder left them usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_add_up_per_class() {
        let m = IoMetrics::new();
        let (a, b) = (m.queue(), m.queue());
        for i in 0..100u64 {
            lock(&a).record(OpClass::Read, 4096, Duration::from_micros(10 + i), true);
        }
        lock(&b).record(OpClass::Read, 4096, Duration::from_millis(5), true);
        lock(&b).record(OpClass::Write, 8192, Duration::from_micros(50), false);
        lock(&b).record(OpClass::Write, 8192, Duration::from_micros(0), true);
        let t = m.totals();
        let (c, read) = &t[0];
        assert_eq!(*c, OpClass::Read);
        assert_eq!(read.latency_us.len(), 101);
        assert_eq!(read.bytes, 101 * 4096);
        assert_eq!(read.errors, 0);
        assert!(read.latency_us.max() >= 4950, "{}", read.latency_us.max());
        let p50 = read.latency_us.value_at_quantile(0.5);
        assert!((58..=62).contains(&p50), "{p50}");
        let write = &t[1].1;
        assert_eq!(
            (write.latency_us.len(), write.bytes, write.errors),
            (2, 8192, 1)
        );
        // A zero latency counts as the smallest recordable.
        assert_eq!(write.latency_us.min(), 1);
        assert!(t[2..].iter().all(|(_, s)| s.latency_us.is_empty()));
    }
}
