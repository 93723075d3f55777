//! foresnap's I/O path: a ublk target that exposes a backing file or block
//! device as `/dev/ublkbN`.
//!
//! ```text
//! app -> /dev/ublkbN -> ublk_drv -> queue thread (one io_uring per queue)
//!                                    |- decode the request   (request.rs)
//!                                    '- backing I/O on the same ring, O_DIRECT
//!                                       where the backing allows (queue.rs)
//! ```
//!
//! [`device::serve`] owns the device's life (creation or user recovery,
//! serving, removal); [`config`] and [`backing`] check every input before
//! anything is created, so a refused start leaves no device behind.

pub mod backing;
pub mod config;
pub mod crashpoint;
pub mod device;
pub mod error;
pub mod hydrate;
pub mod metrics;
pub mod queue;
pub mod request;
mod sync;
pub mod tracking;

pub use config::{BlockSize, DeviceConfig, TrackingConfig, parse_size};
pub use device::{DeviceInfo, LazyVolume, Shutdown, StopReason, serve, serve_with};
pub use error::{Error, ErrorKind};
