//! Device configuration: what `foresnap serve` asks for, validated before
//! anything touches the kernel.
//!
//! Validation here is pure (no ublk, no backing I/O) so that every bad input
//! is refused before a device exists: a refused configuration never leaves a
//! `/dev/ublkb*` behind.

use std::fmt;
use std::path::PathBuf;

use crate::error::ConfigError;

/// Logical block size of the device, the unit the kernel addresses it in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSize {
    /// 512-byte sectors: the widest compatibility (old partition tools).
    B512,
    /// 4096-byte blocks: matches page size, the tracking block and modern disks.
    B4096,
}

impl BlockSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u32 {
        match self {
            BlockSize::B512 => 512,
            BlockSize::B4096 => 4096,
        }
    }

    /// log2 of the size, as ublk's `logical_bs_shift` wants it.
    pub const fn shift(self) -> u8 {
        match self {
            BlockSize::B512 => 9,
            BlockSize::B4096 => 12,
        }
    }

    /// Parses `512` or `4096`; anything else is refused with the reason.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text.trim() {
            "512" => Ok(BlockSize::B512),
            "4096" | "4k" | "4K" | "4KiB" => Ok(BlockSize::B4096),
            other => Err(ConfigError::BlockSize(other.to_owned())),
        }
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bytes())
    }
}

/// Largest queue depth ublk accepts (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_DEPTH: u16 = 4096;
/// Largest number of hardware queues ublk accepts (`UBLK_MAX_NR_QUEUES`).
pub const MAX_QUEUES: u16 = 4096;

/// Everything needed to bring up one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Backing regular file or block device.
    pub backing: PathBuf,
    /// Wanted size in bytes: creates a missing backing file, grows a smaller
    /// one (sparse). `None` uses the backing store's current size.
    pub size: Option<u64>,
    /// Hardware queues, each served by one thread with its own io_uring.
    pub queues: u16,
    /// Requests in flight per queue.
    pub depth: u16,
    /// Logical block size exposed to the kernel.
    pub block_size: BlockSize,
    /// Wanted device id (`/dev/ublkbN`); `None` lets the kernel choose.
    pub id: Option<u32>,
    /// Largest single request, bytes. 512 KiB is libublk's and rublk's
    /// default: big enough for streaming, small enough that the per-tag
    /// buffers (queues x depth x this) stay modest.
    pub io_buf_bytes: u32,
    /// Change tracking; `None` serves the device untracked.
    pub tracking: Option<TrackingConfig>,
}

/// Where change tracking keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackingConfig {
    /// The write ring file; `None`: beside a backing file, as
    /// `BACKING.fsring` (a block device backing must name one).
    pub ring: Option<PathBuf>,
    /// Size of a new ring file (an existing one keeps its size).
    pub ring_bytes: u64,
    /// Tracking block in bytes: a power of two from 512 B to 1 MiB. The
    /// unit of change tracking, copy-on-write and upload; an existing ring
    /// keeps the one it was made with.
    pub block_bytes: u32,
}

/// Smallest and largest tracking block.
pub const TRACK_BLOCK_RANGE: (u32, u32) = (512, 1 << 20);

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            ring: None,
            ring_bytes: crate::tracking::tracker::DEFAULT_RING_BYTES,
            // 4 KiB: the page size and the usual file system block.
            block_bytes: 4096,
        }
    }
}

impl DeviceConfig {
    /// A configuration with the documented defaults for `backing`.
    pub fn new(backing: impl Into<PathBuf>) -> Self {
        DeviceConfig {
            backing: backing.into(),
            size: None,
            queues: default_queues(),
            depth: 128,
            block_size: BlockSize::B4096,
            id: None,
            io_buf_bytes: 512 * 1024,
            tracking: Some(TrackingConfig::default()),
        }
    }

    /// The write ring's path: the configured one, or `BACKING.fsring`
    /// beside a backing file. `None` when tracking is off.
    pub fn ring_path(&self) -> Result<Option<PathBuf>, ConfigError> {
        let Some(t) = &self.tracking else {
            return Ok(None);
        };
        if let Some(r) = &t.ring {
            return Ok(Some(r.clone()));
        }
        use std::os::unix::fs::FileTypeExt;
        if std::fs::metadata(&self.backing).is_ok_and(|m| m.file_type().is_block_device()) {
            return Err(ConfigError::RingNeeded(self.backing.clone()));
        }
        let mut p = self.backing.clone().into_os_string();
        p.push(".fsring");
        Ok(Some(PathBuf::from(p)))
    }

    /// Checks the values that do not need the backing store or the kernel.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(ConfigError::Queues(self.queues));
        }
        if self.depth == 0 || self.depth > MAX_DEPTH {
            return Err(ConfigError::Depth(self.depth));
        }
        if let Some(size) = self.size {
            let bs = u64::from(self.block_size.bytes());
            if size == 0 || size % bs != 0 {
                return Err(ConfigError::SizeAlignment {
                    size,
                    block_size: self.block_size.bytes(),
                });
            }
        }
        if let Some(id) = self.id
            && i32::try_from(id).is_err()
        {
            return Err(ConfigError::Id(id));
        }
        if let Some(t) = &self.tracking {
            if t.ring_bytes < 64 << 10 {
                return Err(ConfigError::RingSize(t.ring_bytes));
            }
            let (lo, hi) = TRACK_BLOCK_RANGE;
            if !t.block_bytes.is_power_of_two() || !(lo..=hi).contains(&t.block_bytes) {
                return Err(ConfigError::TrackBlock(t.block_bytes));
            }
        }
        Ok(())
    }
}

/// Default queue count: one per CPU, at most 4 (more queues than submitting
/// CPUs only add idle threads).
pub fn default_queues() -> u16 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    u16::try_from(cpus.min(4)).unwrap_or(4)
}

/// Parses a byte size: a plain integer (`1073741824`) or a number with a
/// binary unit (`512K`, `64MiB`, `1G`, `2TiB`; `B`/`iB` suffixes optional,
/// case-insensitive, units are powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::Size(text.to_owned());
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(bad()),
    };
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512K").unwrap(), 512 << 10);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2TB").unwrap(), 2 << 40);
        assert_eq!(parse_size(" 3 M ").unwrap(), 3 << 20);
    }

    #[test]
    fn bad_sizes_are_refused() {
        for bad in ["", "G", "-1", "1.5G", "12X", "99999999999P", "1 GiBs"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn block_size_is_512_or_4096_only() {
        assert_eq!(BlockSize::parse("512").unwrap(), BlockSize::B512);
        assert_eq!(BlockSize::parse("4096").unwrap(), BlockSize::B4096);
        for bad in ["1024", "0", "8192", "abc", ""] {
            let err = BlockSize::parse(bad).unwrap_err();
            assert!(err.to_string().contains("512 or 4096"), "{err}");
        }
    }

    #[test]
    fn validation_catches_each_bad_field() {
        let ok = DeviceConfig::new("/tmp/x");
        ok.validate().unwrap();

        let mut c = ok.clone();
        c.queues = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Queues(0))));

        let mut c = ok.clone();
        c.depth = MAX_DEPTH + 1;
        assert!(matches!(c.validate(), Err(ConfigError::Depth(_))));

        let mut c = ok.clone();
        c.size = Some(4096 * 3 + 512);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::SizeAlignment { .. })
        ));
        c.block_size = BlockSize::B512;
        c.validate().unwrap();

        let mut c = ok;
        c.id = Some(u32::MAX);
        assert!(matches!(c.validate(), Err(ConfigError::Id(_))));
    }

    #[test]
    fn default_queue_count_is_bounded() {
        let q = default_queues();
        assert!((1..=4).contains(&q));
    }
}
