//! Snapshots in object storage: the format of their objects and manifests,
//! the destinations that hold them, and restore.
//!
//! A snapshot is a manifest plus data objects ([`mod@format`]). Destinations
//! ([`dest`]) store immutable objects under keys: a key is written once and
//! never overwritten, so a reader can trust what it finds: a local
//! directory or an S3-compatible store ([`s3`]). [`restore`]
//! rebuilds a volume image from a manifest, checking every object's
//! checksums before its bytes are used.

pub mod copies;
pub mod dest;
pub mod engine;
pub mod format;
pub mod link;
mod live;
pub mod plan;
pub mod price;
pub mod replica;
pub mod restore;
pub mod retention;
#[cfg(feature = "s3")]
pub mod s3;
pub mod schedule;
pub mod seal;
pub mod simulate;
pub mod tier;
pub mod trace;
pub mod units;

pub use dest::{DestError, Destination, DirDestination};
pub use engine::Uploader;
pub use format::{Keys, Manifest, ObjectKind, ObjectRef};
