//! The write ring: a fixed-size file, mapped shared, that holds a record of
//! every write (see [`super::ring_format`] for the bytes).
//!
//! Appending is lock-free: a writer reserves a sequence number with one
//! `fetch_add` and fills the slot that sequence names; no two writers ever
//! share a slot. Because the mapping is `MAP_SHARED`, a record is in the
//! page cache the moment it is stored, so it survives `kill -9` of the
//! daemon; [`WriteRing::sync`] (`msync`) makes records durable against power
//! loss, and the I/O path calls it before a FLUSH or FUA write completes.
//!
//! The ring never overwrites a record that is still needed: the owner
//! advances [`WriteRing::release_below`] as epochs are uploaded, and
//! [`WriteRing::append`] refuses with [`RingFull`] instead of wrapping onto
//! a needed slot. The caller then degrades (folds tracking into a bitmap)
//! rather than blocking the write.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crossbeam_utils::CachePadded;
use memmap2::MmapRaw;

use super::ring_format::{
    BITMAP_PAGE_BYTES, BitmapPage, FormatError, HEADER_BYTES, Header, RECORD_BYTES, Record,
    RecordKind, Recovered, recover,
};
use crate::sync::{AtomicU64, Ordering};

/// Takes the ring's exclusive lock for the life of `file` (the ring's own
/// descriptor, kept by the ring): two processes tracking one volume would
/// each miss the other's writes and free each other's records. The lock
/// goes with the process, so a daemon killed with -9 leaves none behind.
fn lock_exclusive(file: &File, path: &Path) -> Result<(), RingError> {
    // SAFETY: flock(2) on a descriptor we own; no pointers.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(RingError::Busy {
            path: path.to_owned(),
        })
    } else {
        Err(RingError::Io {
            path: path.to_owned(),
            error: e,
        })
    }
}

/// Why a ring cannot be created or opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    // (`error` is not a `source`: the message already includes it, and a
    // chain printed in full would say it twice.)
    #[error("write ring {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("write ring {path}: {error}")]
    Format { path: PathBuf, error: FormatError },
    #[error(
        "write ring {path} was made for another volume ({theirs} bytes, block {their_block}); \
         this one has {ours} bytes, block {our_block}"
    )]
    Mismatch {
        path: PathBuf,
        theirs: u64,
        their_block: u32,
        ours: u64,
        our_block: u32,
    },
    #[error(
        "write ring {path} is in use by another foresnap process (a serving daemon or a \
         backup); one process at a time tracks a volume"
    )]
    Busy { path: PathBuf },
    #[error("write ring size {0} is too small: give at least 64 KiB")]
    TooSmall(u64),
}

/// The ring has no free slot: every slot holds a record still needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("write ring full")]
pub struct RingFull;

/// See the module doc.
#[derive(Debug)]
pub struct WriteRing {
    path: PathBuf,
    file: File,
    map: MmapRaw,
    header: Header,
    slots: u64,
    /// Next sequence to hand out. Cache-padded: every writer hits it.
    next: CachePadded<AtomicU64>,
    /// Records with a sequence below this are no longer needed.
    release: CachePadded<AtomicU64>,
}

impl WriteRing {
    /// Creates a new, empty ring file of `file_bytes` (rounded down to a
    /// whole number of pages) for a volume of `volume_bytes` tracked in
    /// blocks of `block_bytes`. Refuses to overwrite an existing file.
    pub fn create(
        path: &Path,
        file_bytes: u64,
        volume_bytes: u64,
        block_bytes: u32,
    ) -> Result<WriteRing, RingError> {
        let io_err = |error| RingError::Io {
            path: path.to_owned(),
            error,
        };
        let area = (file_bytes / 4096 * 4096).saturating_sub(HEADER_BYTES as u64);
        if area < 60 << 10 {
            return Err(RingError::TooSmall(file_bytes));
        }
        let mut volume_id = [0u8; 16];
        getrandom(&mut volume_id);
        let header = Header {
            area_bytes: area,
            volume_bytes,
            block_bytes,
            volume_id,
            created_ms: now_ms(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err)?;
        lock_exclusive(&file, path)?;
        file.set_len(header.file_bytes()).map_err(io_err)?;
        // Allocate every page now: a store into a hole of a shared mapping
        // on a full file system is a SIGBUS, not an error.
        let len = i64::try_from(header.file_bytes()).unwrap_or(i64::MAX);
        // SAFETY: posix_fallocate(3) on a descriptor we own; no pointers.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if rc != 0 {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io_err(io::Error::from_raw_os_error(rc)));
        }
        let ring = Self::map(path, file, header)?;
        // SAFETY: the mapping is at least HEADER_BYTES long and nobody else
        // has it yet.
        unsafe {
            std::ptr::copy_nonoverlapping(
                header.encode().as_ptr(),
                ring.map.as_mut_ptr(),
                HEADER_BYTES,
            )
        };
        ring.map.flush().map_err(io_err)?;
        Ok(ring)
    }

    /// Opens an existing ring and recovers its records. The ring must have
    /// been made for a volume of this size and block size.
    pub fn open(
        path: &Path,
        volume_bytes: u64,
        block_bytes: u32,
    ) -> Result<(WriteRing, Recovered), RingError> {
        let io_err = |error| RingError::Io {
            path: path.to_owned(),
            error,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err)?;
        lock_exclusive(&file, path)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut page = vec![0u8; HEADER_BYTES];
        {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut page, 0)
                .map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => RingError::Format {
                        path: path.to_owned(),
                        error: FormatError::Truncated {
                            have: len,
                            want: HEADER_BYTES as u64,
                        },
                    },
                    _ => io_err(e),
                })?;
        }
        let header = Header::decode(&page).map_err(|error| RingError::Format {
            path: path.to_owned(),
            error,
        })?;
        if len < header.file_bytes() {
            return Err(RingError::Format {
                path: path.to_owned(),
                error: FormatError::Truncated {
                    have: len,
                    want: header.file_bytes(),
                },
            });
        }
        if header.volume_bytes != volume_bytes || header.block_bytes != block_bytes {
            return Err(RingError::Mismatch {
                path: path.to_owned(),
                theirs: header.volume_bytes,
                their_block: header.block_bytes,
                ours: volume_bytes,
                our_block: block_bytes,
            });
        }
        let ring = Self::map(path, file, header)?;
        let recovered = recover(ring.area());
        ring.next.store(recovered.max_seq + 1, Ordering::Relaxed);
        let oldest = recovered
            .records
            .first()
            .map_or(recovered.max_seq + 1, |r| r.seq);
        ring.release.store(oldest, Ordering::Relaxed);
        Ok((ring, recovered))
    }

    fn map(path: &Path, file: File, header: Header) -> Result<WriteRing, RingError> {
        let map = MmapRaw::map_raw(&file).map_err(|error| RingError::Io {
            path: path.to_owned(),
            error,
        })?;
        Ok(WriteRing {
            path: path.to_owned(),
            file,
            map,
            header,
            slots: header.slots(),
            // An empty ring starts at sequence 1; `open` moves both on to
            // what recovery found.
            next: CachePadded::new(AtomicU64::new(1)),
            release: CachePadded::new(AtomicU64::new(1)),
        })
    }

    fn area(&self) -> &[u8] {
        let len = usize::try_from(self.header.area_bytes).unwrap_or(0);
        // SAFETY: the mapping covers HEADER_BYTES + area_bytes (checked at
        // open/create); this shared view is only taken while no writer
        // appends (open, before the ring is handed out).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(HEADER_BYTES), len) }
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record of `kind` in `epoch`; returns its sequence number.
    /// Lock-free; refuses with [`RingFull`] rather than overwrite a record
    /// at or above [`WriteRing::release_below`].
    pub fn append(&self, epoch: u32, kind: RecordKind) -> Result<u64, RingFull> {
        self.append_timed(epoch, kind).map(|(seq, _)| seq)
    }

    /// [`WriteRing::append`], also returning the record's time field: the
    /// close of an epoch is dated from it, so that a recovered close
    /// ([`WriteRing::wall_ms`]) carries the very same time.
    pub fn append_timed(&self, epoch: u32, kind: RecordKind) -> Result<(u64, u32), RingFull> {
        // Reserve a sequence whose slot's previous occupant is released.
        // A CAS loop, not fetch_add, so that a full ring hands out nothing
        // (a reserved-but-unwritten sequence would read as torn).
        let mut seq = self.next.load(Ordering::Relaxed);
        loop {
            if seq >= self.release.load(Ordering::Acquire) + self.slots {
                return Err(RingFull);
            }
            // Relaxed suffices for the reservation: the sequence only has
            // to be unique; the record's bytes are published by the data
            // write that follows (a syscall) or by msync.
            match self.next.compare_exchange_weak(
                seq,
                seq + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(cur) => seq = cur,
            }
        }
        // Wrapping: the field is the time modulo 2^32 ms (module doc of
        // ring_format); readers unwrap it in sequence order.
        #[allow(clippy::cast_possible_truncation)]
        let time_ms = now_ms().wrapping_sub(self.header.created_ms) as u32;
        let bytes = Record {
            seq,
            epoch,
            time_ms,
            kind,
        }
        .encode();
        let slot = usize::try_from(seq % self.slots).unwrap_or(0);
        // SAFETY: `slot * RECORD_BYTES + RECORD_BYTES <= area_bytes`, the
        // mapping covers the area, and the slot belongs to this writer
        // alone: sequences are unique, and the release check above makes
        // sure the previous lap's owner of the slot is done with it.
        unsafe {
            let dst = self
                .map
                .as_mut_ptr()
                .add(HEADER_BYTES + slot * RECORD_BYTES);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, RECORD_BYTES);
        }
        Ok((seq, time_ms))
    }

    /// The wall-clock time (ms since the Unix epoch) of a record's time
    /// field: the latest time not after now whose offset from the ring's
    /// creation is `time_ms` modulo 2^32, exact for a record written less
    /// than 49 days ago by this clock.
    pub fn wall_ms(&self, time_ms: u32) -> u64 {
        let now = now_ms();
        #[allow(clippy::cast_possible_truncation)]
        let rel = now.wrapping_sub(self.header.created_ms) as u32;
        now.saturating_sub(u64::from(rel.wrapping_sub(time_ms)))
    }

    /// Records below `seq` are no longer needed: their slots may be reused.
    pub fn release_below(&self, seq: u64) {
        self.release.fetch_max(seq, Ordering::AcqRel);
    }

    /// Fraction of slots holding needed records, 0.0 to 1.0.
    pub fn fill(&self) -> f64 {
        let used = self
            .next
            .load(Ordering::Relaxed)
            .saturating_sub(self.release.load(Ordering::Relaxed));
        #[allow(clippy::cast_precision_loss)]
        let f = used as f64 / self.slots as f64;
        f.min(1.0)
    }

    /// The next sequence number `append` will try.
    pub fn next_seq(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Makes every record appended so far, and the overflow bitmap,
    /// durable (`msync`).
    pub fn sync(&self) -> io::Result<()> {
        self.map.flush()
    }

    /// The ring file, for an `fdatasync` through io_uring: on a shared
    /// mapping it writes back the same dirty pages `msync` would.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn bitmap_page_ptr(&self) -> *mut u8 {
        let off = usize::try_from(self.header.bitmap_offset()).unwrap_or(usize::MAX);
        // `wrapping_add` keeps this safe; the offset lies inside the
        // mapping, which covers `file_bytes` (checked at open and create).
        self.map.as_mut_ptr().wrapping_add(off)
    }

    /// The overflow bitmap's page, `None` if never written or damaged.
    pub fn bitmap_page(&self) -> Option<BitmapPage> {
        // SAFETY: the page lies inside the mapping; it is written only by
        // `write_bitmap_page`, whose callers serialize (the epoch switch
        // and the first writer to degrade, under the tracker's lock).
        let page = unsafe { std::slice::from_raw_parts(self.bitmap_page_ptr(), 20) };
        BitmapPage::decode(page)
    }

    /// Whether the overflow bitmap's page holds bytes that are not a valid
    /// page (a page never written reads as zeroes): whether its bits were
    /// in use is then unknown.
    pub fn bitmap_page_damaged(&self) -> bool {
        // SAFETY: as in `bitmap_page`.
        let page = unsafe { std::slice::from_raw_parts(self.bitmap_page_ptr(), 20) };
        BitmapPage::decode(page).is_none() && page.iter().any(|&b| b != 0)
    }

    /// Zeroes the damaged slots ([`Recovered::damaged`]), once the caller
    /// no longer needs what they held (a resync), so that the next start
    /// trusts the ring again. Only while no writer appends (at open).
    pub fn clear_damaged(&self) {
        let base = self.map.as_mut_ptr().wrapping_add(HEADER_BYTES);
        for i in 0..self.slots {
            let at = usize::try_from(i).unwrap_or(usize::MAX) * RECORD_BYTES;
            // SAFETY: slot `i` lies inside the record area, which the
            // mapping covers; no writer appends meanwhile (the caller's
            // contract), so nobody else touches it.
            let slot = unsafe { std::slice::from_raw_parts_mut(base.add(at), RECORD_BYTES) };
            let valid = Record::decode(slot).is_some_and(|r| r.seq % self.slots == i);
            if !valid && slot.iter().any(|&b| b != 0) {
                slot.fill(0);
            }
        }
    }

    /// Rewrites the overflow bitmap's page. Callers serialize.
    pub fn write_bitmap_page(&self, page: BitmapPage) {
        let bytes = page.encode();
        // SAFETY: 20 bytes inside the mapping (see `bitmap_page`).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.bitmap_page_ptr(), bytes.len());
        }
    }

    /// The bitmap's words: one bit per tracking block.
    fn bitmap_words(&self) -> &[std::sync::atomic::AtomicU64] {
        let bits_off = self.header.bitmap_offset() + BITMAP_PAGE_BYTES as u64;
        let words = (self.header.bitmap_bytes() - BITMAP_PAGE_BYTES as u64) / 8;
        let ptr = self
            .map
            .as_mut_ptr()
            .wrapping_add(usize::try_from(bits_off).unwrap_or(usize::MAX));
        // SAFETY: the bit area is page-aligned (header page, record area
        // and bitmap page are whole pages), lies inside the mapping, and
        // is only ever accessed through these atomics while mapped; the
        // mapping lives as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                ptr.cast::<std::sync::atomic::AtomicU64>(),
                usize::try_from(words).unwrap_or(0),
            )
        }
    }

    /// Sets the bits of blocks `[first, last]`. Lock-free.
    pub fn set_bits(&self, first: u64, last: u64) {
        let words = self.bitmap_words();
        for w in first / 64..=last / 64 {
            let lo = first.max(w * 64) - w * 64;
            let hi = last.min(w * 64 + 63) - w * 64;
            let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
            if let Some(word) = usize::try_from(w).ok().and_then(|w| words.get(w)) {
                // Relaxed: durability comes from the msync/fdatasync that
                // FLUSH and FUA issue, ordering from the data write's
                // syscall after it.
                word.fetch_or(mask, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// The set bits, as sorted runs `(first, count)`.
    pub fn bitmap_runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, word) in self.bitmap_words().iter().enumerate() {
            let mut v = word.load(std::sync::atomic::Ordering::Relaxed);
            while v != 0 {
                let b = w as u64 * 64 + u64::from(v.trailing_zeros());
                v &= v - 1;
                match runs.last_mut() {
                    Some((f, c)) if *f + *c == b => *c += 1,
                    _ => runs.push((b, 1)),
                }
            }
        }
        runs
    }

    /// Clears every bit (after their blocks were recorded otherwise).
    pub fn clear_bitmap(&self) {
        for w in self.bitmap_words() {
            w.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Wall-clock milliseconds from the coarse clock: a vDSO read of a few
/// nanoseconds, precise to the tick, which is all a trace needs.
fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes one timespec into `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs * 1000 + nanos / 1_000_000
}

/// 16 random bytes for the volume id, from the kernel.
fn getrandom(buf: &mut [u8; 16]) {
    // SAFETY: getrandom(2) writes at most `len` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != 16 {
        // Uniqueness, not secrecy: fall back to time and pid.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        buf.copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
}

#[cfg(all(test, not(foresnap_loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;

    const VOL: u64 = 1 << 30;

    fn write(seq_hint: u64) -> RecordKind {
        RecordKind::Write {
            offset: seq_hint * 4096,
            len: 4096,
            fua: false,
            zeroing: false,
        }
    }

    #[test]
    fn records_survive_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ring");
        let ring = WriteRing::create(&p, 1 << 20, VOL, 4096).unwrap();
        for i in 0..1000 {
            assert_eq!(
                ring.append(u32::try_from(i / 100).unwrap(), write(i))
                    .unwrap(),
                i + 1
            );
        }
        ring.append(9, RecordKind::Close).unwrap();
        drop(ring); // no sync: the page cache keeps it, as after kill -9
        let (ring, rec) = WriteRing::open(&p, VOL, 4096).unwrap();
        assert_eq!(rec.max_seq, 1001);
        assert_eq!(rec.torn, 0);
        assert_eq!(rec.records.len(), 1001);
        assert_eq!(rec.records[0].kind, write(0));
        assert_eq!(rec.records[1000].kind, RecordKind::Close);
        assert_eq!(ring.append(10, write(5)).unwrap(), 1002);
    }

    #[test]
    fn concurrent_appends_get_unique_slots() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ring");
        let ring = Arc::new(WriteRing::create(&p, 1 << 20, VOL, 4096).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let ring = ring.clone();
                std::thread::spawn(move || {
                    (0..5000u64)
                        .map(|i| ring.append(1, write(t << 32 | i)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seqs: Vec<u64> = threads
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20000).collect::<Vec<_>>());
        ring.sync().unwrap();
        drop(ring);
        let (_, rec) = WriteRing::open(&p, VOL, 4096).unwrap();
        assert_eq!(rec.records.len(), 20000);
        // Each writer's records are all there, with their own offsets.
        for t in 0..4u64 {
            let mine = rec
                .records
                .iter()
                .filter(|r| matches!(r.kind, RecordKind::Write { offset, .. } if offset >> 44 == t))
                .count();
            assert_eq!(mine, 5000);
        }
    }

    #[test]
    fn full_ring_refuses_instead_of_overwriting_needed_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ring");
        let ring = WriteRing::create(&p, 64 << 10, VOL, 4096).unwrap();
        let slots = ring.header().slots();
        for i in 0..slots {
            ring.append(1, write(i)).unwrap();
        }
        assert_eq!(ring.append(1, write(0)), Err(RingFull));
        assert!((ring.fill() - 1.0).abs() < 1e-9);
        // Releasing the first 10 records frees exactly 10 slots.
        ring.release_below(11);
        for i in 0..10 {
            ring.append(2, write(i)).unwrap();
        }
        assert_eq!(ring.append(2, write(0)), Err(RingFull));
        drop(ring);
        let (_, rec) = WriteRing::open(&p, VOL, 4096).unwrap();
        assert_eq!(rec.records.len() as u64, slots);
        assert_eq!(rec.records[0].seq, 11);
    }

    #[test]
    fn overflow_bitmap_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ring");
        let ring = WriteRing::create(&p, 64 << 10, VOL, 4096).unwrap();
        assert_eq!(ring.bitmap_page(), None, "never written");
        assert!(ring.bitmap_runs().is_empty());
        ring.set_bits(3, 3);
        ring.set_bits(60, 130);
        ring.set_bits(262_143, 262_143); // the last block of 1 GiB
        let page = BitmapPage {
            epoch: 4,
            degraded: true,
        };
        ring.write_bitmap_page(page);
        drop(ring);
        let (ring, _) = WriteRing::open(&p, VOL, 4096).unwrap();
        assert_eq!(ring.bitmap_page(), Some(page));
        assert_eq!(ring.bitmap_runs(), vec![(3, 1), (60, 71), (262_143, 1)]);
        ring.clear_bitmap();
        assert!(ring.bitmap_runs().is_empty());
    }

    /// One process at a time: a second open of a ring in use is refused
    /// (flock is per open file, so this holds inside one process too),
    /// and the lock goes with the ring.
    #[test]
    fn a_ring_in_use_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ring");
        let ring = WriteRing::create(&p, 1 << 20, VOL, 4096).unwrap();
        let e = WriteRing::open(&p, VOL, 4096).unwrap_err();
        assert!(matches!(e, RingError::Busy { .. }), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        drop(ring);
        let (ring, _) = WriteRing::open(&p, VOL, 4096).unwrap();
        assert!(matches!(
            WriteRing::open(&p, VOL, 4096),
            Err(RingError::Busy { .. })
        ));
        drop(ring);
    }

    #[test]
    fn damaged_or_foreign_rings_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ring");
        drop(WriteRing::create(&p, 1 << 20, VOL, 4096).unwrap());
        let e = WriteRing::open(&p, VOL * 2, 4096).unwrap_err();
        assert!(e.to_string().contains("made for another volume"), "{e}");
        assert!(
            WriteRing::create(&p, 1 << 20, VOL, 4096).is_err(),
            "overwrote a ring"
        );

        let mut bytes = std::fs::read(&p).unwrap();
        bytes[20] ^= 4;
        std::fs::write(&p, &bytes).unwrap();
        let e = WriteRing::open(&p, VOL, 4096).unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");

        bytes[20] ^= 4;
        bytes.truncate(8192);
        std::fs::write(&p, &bytes).unwrap();
        let e = WriteRing::open(&p, VOL, 4096).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");

        std::fs::write(&p, b"hello").unwrap();
        assert!(WriteRing::open(&p, VOL, 4096).is_err());
        assert!(matches!(
            WriteRing::create(&dir.path().join("tiny"), 8192, VOL, 4096),
            Err(RingError::TooSmall(8192))
        ));
    }
}
