//! Errors of the driver layer, classified by what the caller must do.
//!
//! Configuration and backing errors happen before a device exists and are
//! the user's to fix; device errors come from the kernel's ublk driver. The
//! I/O path itself never returns these: a failed request becomes a negative
//! errno for the kernel (see [`crate::request::completion_result`]).

use std::io;
use std::path::PathBuf;

/// A value the user gave is unusable. Nothing was created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("invalid block size '{0}': block size must be 512 or 4096")]
    BlockSize(String),
    #[error("invalid size '{0}': give bytes or a number with K, M, G, T (powers of 1024), e.g. 8G")]
    Size(String),
    #[error("size {size} is not a positive multiple of the block size {block_size}")]
    SizeAlignment { size: u64, block_size: u32 },
    #[error("invalid queue count {0}: use 1 to {max}", max = crate::config::MAX_QUEUES)]
    Queues(u16),
    #[error("invalid queue depth {0}: use 1 to {max}", max = crate::config::MAX_DEPTH)]
    Depth(u16),
    #[error("invalid device id {0}: use 0 to 2147483647")]
    Id(u32),
    #[error("write ring size {0} is too small: give at least 64K")]
    RingSize(u64),
    #[error("invalid tracking block {0}: give a power of two from 512 to 1M")]
    TrackBlock(u32),
    #[error(
        "backing {0} is a block device: give --ring PATH for the write ring (on a file system)"
    )]
    RingNeeded(PathBuf),
    #[error("a lazily restored device needs change tracking: do not give --no-tracking")]
    LazyNeedsTracking,
}

/// The backing store cannot be used as asked. Nothing was created, except
/// that a missing backing file is created when a size was given.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackingError {
    #[error("backing {path} does not exist (pass --size to create it)")]
    Missing { path: PathBuf },
    #[error("cannot open backing {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("backing {path} is neither a regular file nor a block device")]
    Kind { path: PathBuf },
    #[error(
        "--size {wanted} is smaller than the backing {path} ({actual} bytes); \
         foresnap never shrinks a backing store"
    )]
    Shrink {
        path: PathBuf,
        wanted: u64,
        actual: u64,
    },
    #[error("--size {wanted} is larger than the block device {path} ({actual} bytes)")]
    DeviceTooSmall {
        path: PathBuf,
        wanted: u64,
        actual: u64,
    },
    #[error("backing {path} is empty: pass --size to give it a size")]
    Empty { path: PathBuf },
    #[error(
        "backing {path} has {actual} bytes, not a multiple of the block size {block_size}; \
         grow it with --size"
    )]
    Unaligned {
        path: PathBuf,
        actual: u64,
        block_size: u32,
    },
    #[error("cannot size backing {path}: {source}")]
    Resize { path: PathBuf, source: io::Error },
}

/// The kernel side failed or refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error(
        "this kernel has no ublk (/dev/ublk-control is missing and ublk_drv cannot be loaded); \
         run as root on Linux >= 6.0 with ublk_drv, or use the VM test bed: scripts/vm-run -- foresnap ..."
    )]
    NoUblk,
    #[error("permission denied on /dev/ublk-control: run foresnap as root")]
    Permission,
    #[error("device id {id} is in use ({state}); choose another --id or stop its server")]
    IdBusy { id: u32, state: &'static str },
    #[error("device {id} is waiting for recovery but serves {theirs}, not {ours}")]
    RecoverMismatch {
        id: u32,
        theirs: String,
        ours: String,
    },
    #[error("cannot start the lazy restore's hydrator: {0}")]
    Hydrator(String),
    #[error("ublk {op} failed: {source}")]
    Ublk {
        op: &'static str,
        source: libublk::UblkError,
    },
}

/// Any error of the driver layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Track(#[from] crate::tracking::tracker::TrackError),
}

/// What a caller should do about an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Fix the input and try again.
    Usage,
    /// The environment lacks something (kernel module, privilege, free id).
    Environment,
    /// The kernel failed; report it.
    Internal,
}

impl Error {
    /// Classifies the error for exit codes and alerting.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Config(_) | Error::Backing(_) => ErrorKind::Usage,
            Error::Device(DeviceError::Ublk { .. }) => ErrorKind::Internal,
            Error::Device(_) => ErrorKind::Environment,
            Error::Track(crate::tracking::tracker::TrackError::Ring(_)) => ErrorKind::Usage,
            Error::Track(_) => ErrorKind::Environment,
        }
    }
}
