//! Change tracking on the write path: which blocks changed in which epoch,
//! and which content still has to reach a destination.
//!
//! [`DirtyMap`] is the in-memory state (two bits per tracking block, a write
//! version and overwrite counters per chunk), updated by the queue threads
//! with atomics only. The write ring, the epoch switch with copy-on-write
//! into a preserve area, and crash recovery build on it.

pub mod dirty_map;
pub mod gate;
pub mod ring;
pub mod ring_format;
pub mod trace;

pub use dirty_map::{BlockState, ChangedSet, DirtyMap, Geometry, OpenUpload, WriteMarks};
pub mod tracker;

pub use tracker::{Begin, ClosedSource, Tracker, TrackerConfig};
