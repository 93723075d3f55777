//! The epoch switch's handshake between writers and the closer, on its own
//! so that loom can check it (the tracker around it holds files).
//!
//! A writer [`EpochGate::enter`]s before it marks and records a write and
//! [`EpochGate::exit`]s once the backing store answered; the closer runs its
//! close inside [`EpochGate::close`]. The protocol is Dekker's: the writer
//! counts itself in flight on its own padded counter and *then* reads the
//! closing flag; the closer raises the flag and *then* reads every counter.
//! A sequentially consistent fence sits between the store and the load on
//! both sides, so the two fences are ordered one way or the other and the
//! side whose fence comes second sees the other's store: either the writer
//! sees the flag and backs off, or the closer sees the writer and waits for
//! its exit. Without the fences both may miss each other (the store-buffer
//! litmus test; x86 allows it too); the loom model below fails without
//! them. Fences rather than `SeqCst` accesses because loom models `SeqCst`
//! fences exactly but treats `SeqCst` accesses as acquire/release; on x86
//! the writer's fence is one `mfence` after its locked add.

use crossbeam_utils::CachePadded;

use crate::sync::{AtomicBool, AtomicU64, Ordering, fence};

/// See the module doc.
#[derive(Debug)]
pub struct EpochGate {
    closing: AtomicBool,
    /// Writes in flight, per queue: each counter has one writer thread.
    in_flight: Box<[CachePadded<AtomicU64>]>,
}

impl EpochGate {
    /// A gate for `queues` writer threads.
    pub fn new(queues: u16) -> Self {
        EpochGate {
            closing: AtomicBool::new(false),
            in_flight: (0..queues.max(1))
                .map(|_| CachePadded::new(AtomicU64::new(0)))
                .collect(),
        }
    }

    fn counter(&self, q: u16) -> &AtomicU64 {
        &self.in_flight[usize::from(q) % self.in_flight.len()]
    }

    /// Writer on queue `q`: `true` if the write may proceed (pair it with
    /// [`EpochGate::exit`]); `false` while a close is under way.
    pub fn enter(&self, q: u16) -> bool {
        let c = self.counter(q);
        c.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // Acquire: a write that proceeds sees everything the last close
        // did (it released the flag after).
        if self.closing.load(Ordering::Acquire) {
            c.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Writer on queue `q`: the write that entered is done.
    pub fn exit(&self, q: u16) {
        // Release: the write's effects happen before the closer, which
        // acquires the counter, runs its close.
        self.counter(q).fetch_sub(1, Ordering::Release);
    }

    /// Whether a close is under way.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Closer (one at a time; the caller serializes): holds new writes
    /// back, waits until none is in flight, runs `f`, lets writes go on.
    /// `waiting` is called now and then while writes drain (for a warning).
    pub fn close<R>(&self, mut waiting: impl FnMut(u32), f: impl FnOnce() -> R) -> R {
        self.closing.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let mut spins = 0u32;
        // Acquire: pairs with `exit`'s release, so the writes are done
        // before `f` runs.
        while self
            .in_flight
            .iter()
            .any(|c| c.load(Ordering::Acquire) != 0)
        {
            spins = spins.wrapping_add(1);
            pause(spins);
            waiting(spins);
        }
        let r = f();
        // Release: `f`'s effects (the new epoch) before any write sees the
        // gate open again.
        self.closing.store(false, Ordering::Release);
        r
    }
}

#[cfg(not(foresnap_loom))]
fn pause(spins: u32) {
    if spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[cfg(foresnap_loom)]
fn pause(_spins: u32) {
    loom::thread::yield_now();
}

#[cfg(all(test, not(foresnap_loom)))]
mod tests {
    use super::*;

    #[test]
    fn writers_back_off_during_a_close_and_the_close_waits_for_them() {
        let g = std::sync::Arc::new(EpochGate::new(2));
        assert!(g.enter(0));
        let closer = {
            let g = g.clone();
            std::thread::spawn(move || g.close(|_| {}, || 7))
        };
        while !g.is_closing() {
            std::thread::yield_now();
        }
        assert!(!g.enter(1), "a write got in during the close");
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(!closer.is_finished(), "the close did not wait");
        g.exit(0);
        assert_eq!(closer.join().unwrap(), 7);
        assert!(g.enter(1));
        g.exit(1);
    }
}

#[cfg(all(test, foresnap_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicU32;
    use loom::thread;

    /// No write is inside the gate while the close runs, and every write
    /// that got in before the close finished belongs to the old epoch or,
    /// after it, to the new one: the epoch a write reads on entry is the
    /// epoch it ends in.
    #[test]
    fn no_write_straddles_a_close() {
        // One writer is the Dekker pair with the closer; two multiply the
        // states (minutes) without a new kind of interleaving.
        const WRITERS: u16 = 1;
        loom::model(|| {
            let g = Arc::new(EpochGate::new(2));
            let epoch = Arc::new(AtomicU32::new(1));
            let inside = Arc::new(AtomicU32::new(0));
            let writers: Vec<_> = (0..WRITERS)
                .map(|q| {
                    let (g, epoch, inside) = (g.clone(), epoch.clone(), inside.clone());
                    thread::spawn(move || {
                        if g.enter(q) {
                            inside.fetch_add(1, Ordering::Relaxed);
                            let e = epoch.load(Ordering::Relaxed);
                            inside.fetch_sub(1, Ordering::Relaxed);
                            assert_eq!(
                                epoch.load(Ordering::Relaxed),
                                e,
                                "epoch moved under a write"
                            );
                            g.exit(q);
                        }
                    })
                })
                .collect();
            g.close(
                |_| {},
                || {
                    assert_eq!(inside.load(Ordering::Relaxed), 0, "a write is in flight");
                    epoch.fetch_add(1, Ordering::Relaxed);
                },
            );
            for w in writers {
                w.join().unwrap();
            }
        });
    }
}
