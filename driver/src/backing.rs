//! The backing store: a regular file (created or grown sparse on request)
//! or a block device, opened for `O_DIRECT` when it accepts direct I/O at
//! the device's block size.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::{BlockSize, DeviceConfig};
use crate::error::BackingError;

/// What the backing path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

/// An open backing store, sized and ready for the queues.
#[derive(Debug)]
pub struct Backing {
    file: File,
    path: PathBuf,
    size: u64,
    kind: BackingKind,
    direct: bool,
    zero_range: bool,
}

impl Backing {
    /// Checks, without creating or changing anything, that `cfg`'s backing
    /// store can be opened as asked. [`Backing::open`] repeats the checks;
    /// this exists so that every input error is reported before anything
    /// is created (a device, or a backing file on a kernel without ublk).
    pub fn check(cfg: &DeviceConfig) -> Result<(), BackingError> {
        let path = &cfg.backing;
        match std::fs::metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if cfg.size.is_none() {
                    return Err(BackingError::Missing { path: path.clone() });
                }
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                if let Some(dir) = parent
                    && !dir.is_dir()
                {
                    return Err(BackingError::Open {
                        path: path.clone(),
                        source: io::Error::new(
                            io::ErrorKind::NotFound,
                            format!("directory {} does not exist", dir.display()),
                        ),
                    });
                }
                Ok(())
            }
            Err(source) => Err(BackingError::Open {
                path: path.clone(),
                source,
            }),
            Ok(meta) => {
                let ft = meta.file_type();
                if !(ft.is_file() || ft.is_block_device()) {
                    return Err(BackingError::Kind { path: path.clone() });
                }
                // Opening proves readability and writability now, before a
                // device exists, rather than after.
                let mut file = open_rw(path, false)?;
                let actual = size_of(&mut file, path)?;
                let kind = if ft.is_file() {
                    BackingKind::File
                } else {
                    BackingKind::BlockDevice
                };
                check_size(path, kind, actual, cfg.size, cfg.block_size).map(|_| ())
            }
        }
    }

    /// Opens (creating or growing a sparse file if `cfg.size` asks for it)
    /// the backing store of `cfg`.
    pub fn open(cfg: &DeviceConfig) -> Result<Backing, BackingError> {
        Self::check(cfg)?;
        let path = cfg.backing.clone();
        if !path.exists() {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(|source| BackingError::Open {
                    path: path.clone(),
                    source,
                })?;
        }
        let mut file = open_rw(&path, false)?;
        let kind = if file
            .metadata()
            .map_err(|source| BackingError::Open {
                path: path.clone(),
                source,
            })?
            .file_type()
            .is_block_device()
        {
            BackingKind::BlockDevice
        } else {
            BackingKind::File
        };
        let actual = size_of(&mut file, &path)?;
        let size = check_size(&path, kind, actual, cfg.size, cfg.block_size)?;
        if kind == BackingKind::File && size > actual {
            file.set_len(size).map_err(|source| BackingError::Resize {
                path: path.clone(),
                source,
            })?;
        }

        let direct = match open_rw(&path, true) {
            Ok(dfile) if direct_io_works(&dfile, cfg.block_size, size) => {
                file = dfile;
                true
            }
            _ => {
                log::warn!(
                    "{}: direct I/O at {} bytes is not supported here; using buffered I/O",
                    path.display(),
                    cfg.block_size
                );
                false
            }
        };
        let zero_range = match kind {
            // blkdev_fallocate implements zero range on every block device.
            BackingKind::BlockDevice => true,
            BackingKind::File => zero_range_works(&file, size, cfg.block_size),
        };
        Ok(Backing {
            file,
            path,
            size,
            kind,
            direct,
            zero_range,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size in bytes: the device's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    /// Whether the backing store implements `FALLOC_FL_ZERO_RANGE` (tmpfs
    /// does not; write-zeroes then punch and re-allocate).
    pub fn zero_range(&self) -> bool {
        self.zero_range
    }

    /// Whether I/O bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

fn open_rw(path: &Path, direct: bool) -> Result<File, BackingError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .map_err(|source| BackingError::Open {
            path: path.to_owned(),
            source,
        })
}

fn size_of(file: &mut File, path: &Path) -> Result<u64, BackingError> {
    // SEEK_END gives the size of regular files and block devices alike.
    file.seek(SeekFrom::End(0))
        .map_err(|source| BackingError::Open {
            path: path.to_owned(),
            source,
        })
}

/// The device size for a backing store of `actual` bytes when `wanted` was
/// asked for.
fn check_size(
    path: &Path,
    kind: BackingKind,
    actual: u64,
    wanted: Option<u64>,
    bs: BlockSize,
) -> Result<u64, BackingError> {
    let path = || path.to_owned();
    let size = match wanted {
        Some(w) if w < actual => {
            return Err(BackingError::Shrink {
                path: path(),
                wanted: w,
                actual,
            });
        }
        Some(w) if w > actual && kind == BackingKind::BlockDevice => {
            return Err(BackingError::DeviceTooSmall {
                path: path(),
                wanted: w,
                actual,
            });
        }
        Some(w) => w,
        None => actual,
    };
    if size == 0 {
        return Err(BackingError::Empty { path: path() });
    }
    if size % u64::from(bs.bytes()) != 0 {
        return Err(BackingError::Unaligned {
            path: path(),
            actual: size,
            block_size: bs.bytes(),
        });
    }
    Ok(size)
}

/// Probes `FALLOC_FL_ZERO_RANGE` on one block just past the end of the file
/// (with `KEEP_SIZE`, so the file's size and content are untouched), then
/// releases whatever the probe allocated there.
fn zero_range_works(file: &File, size: u64, bs: BlockSize) -> bool {
    let Ok(off) = libc::off_t::try_from(size) else {
        return true;
    };
    let len = libc::off_t::from(bs.bytes());
    let fd = file.as_raw_fd();
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate(2) on an open fd with a valid range; no memory is
    // shared with the kernel.
    let r = unsafe { libc::fallocate(fd, libc::FALLOC_FL_ZERO_RANGE | keep, off, len) };
    if r != 0 {
        return std::io::Error::last_os_error().raw_os_error() != Some(libc::EOPNOTSUPP);
    }
    // SAFETY: as above; punching past EOF only frees the probe's blocks.
    unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | keep, off, len) };
    true
}

/// Probes whether `file` (opened `O_DIRECT`) serves a read of one block at
/// a block-aligned offset that is not page-aligned when the block is
/// smaller than a page: the alignment the kernel will send us.
fn direct_io_works(file: &File, bs: BlockSize, size: u64) -> bool {
    let len = bs.bytes() as usize;
    let offset = if size >= 2 * len as u64 {
        len as u64
    } else {
        0
    };
    let layout = match std::alloc::Layout::from_size_align(len, 4096) {
        Ok(l) => l,
        Err(_) => return false,
    };
    // SAFETY: `layout` has a non-zero size (512 or 4096).
    let buf = unsafe { std::alloc::alloc(layout) };
    if buf.is_null() {
        return false;
    }
    // SAFETY: `buf` points to `len` writable bytes that live until the
    // dealloc below; the fd is open for reading.
    let n = unsafe {
        libc::pread(
            file.as_raw_fd(),
            buf.cast(),
            len,
            offset.try_into().unwrap_or(0),
        )
    };
    // SAFETY: `buf` came from `alloc` with this same layout.
    unsafe { std::alloc::dealloc(buf, layout) };
    n >= 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(path: &Path, size: Option<u64>) -> DeviceConfig {
        let mut c = DeviceConfig::new(path);
        c.size = size;
        c
    }

    #[test]
    fn creates_sparse_file_of_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let b = Backing::open(&cfg(&p, Some(64 << 20))).unwrap();
        assert_eq!(b.size(), 64 << 20);
        assert_eq!(b.kind(), BackingKind::File);
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "file is not sparse");
        // The zero-range probe left the size and the allocation alone.
        let b2 = Backing::open(&cfg(&p, None)).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 64 << 20);
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 1 << 20);
        drop((b, b2));
    }

    #[test]
    fn grows_but_never_shrinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let b = Backing::open(&cfg(&p, Some(1 << 20))).unwrap();
        assert_eq!(b.size(), 1 << 20);
        drop(b);
        let err = Backing::open(&cfg(&p, Some(4096))).unwrap_err();
        assert!(matches!(err, BackingError::Shrink { .. }), "{err}");
        assert!(err.to_string().contains("smaller than the backing"));
        // Without --size the existing size is used.
        assert_eq!(Backing::open(&cfg(&p, None)).unwrap().size(), 1 << 20);
    }

    #[test]
    fn refuses_missing_empty_unaligned_and_odd_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let err = Backing::check(&cfg(&missing, None)).unwrap_err();
        assert!(matches!(err, BackingError::Missing { .. }));
        assert!(err.to_string().contains("does not exist"));

        let in_missing_dir = dir.path().join("no/such/dir/x.img");
        assert!(matches!(
            Backing::check(&cfg(&in_missing_dir, Some(4096))),
            Err(BackingError::Open { .. })
        ));

        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(matches!(
            Backing::check(&cfg(&empty, None)),
            Err(BackingError::Empty { .. })
        ));

        let odd = dir.path().join("odd.img");
        std::fs::write(&odd, vec![0u8; 5000]).unwrap();
        assert!(matches!(
            Backing::check(&cfg(&odd, None)),
            Err(BackingError::Unaligned { .. })
        ));

        assert!(matches!(
            Backing::check(&cfg(dir.path(), None)),
            Err(BackingError::Kind { .. })
        ));
        // Nothing was created by the failed checks.
        assert!(!missing.exists());
    }
}
