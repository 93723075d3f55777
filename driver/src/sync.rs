//! The atomics the lock-free tracking code uses: `std`'s, or loom's when
//! built with `RUSTFLAGS="--cfg foresnap_loom"`, so that the dirty map's
//! protocols can be model-checked (crossbeam-epoch's `primitive` module,
//! mountpoint-s3's `sync.rs`). The cfg has a name of our own because
//! dependencies (concurrent-queue, under libublk) switch to loom on a
//! plain `cfg(loom)` and do not build that way.
//!
//! `scripts/test` runs the models:
//! `RUSTFLAGS="--cfg foresnap_loom" cargo test -p foresnap-driver --lib --release loom_models`.

#[cfg(foresnap_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
#[cfg(foresnap_loom)]
pub(crate) use loom::sync::{Mutex, MutexGuard};
#[cfg(not(foresnap_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(foresnap_loom))]
pub(crate) use std::sync::{Mutex, MutexGuard};
