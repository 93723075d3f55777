//! Lazy restore: a device over a volume whose content is still arriving.
//!
//! The volume is cut into chunks (the snapshot's object chunks). A chunk is
//! *readable* once its content is written to the backing store, and
//! *ready* once that content is durable and recorded as such in the state
//! file. A queue that meets a read of a chunk not readable, or a write to
//! a chunk not ready, asks for the chunk ([`Hydration::want`]), holds the
//! request back, and retries it when the hydrator wakes the queues. Writes
//! wait until the chunk is ready, so the hydrator never writes over newer
//! data and a crash never loses a write to a re-fetch; reads need only the
//! content, so a cold read is answered before the syncs that follow (a
//! crash then fetches the same content again). Reads and writes of ready
//! chunks cost one atomic load per chunk they touch.
//!
//! The hydrator ([`Hydration::run`]) fetches chunks on worker threads:
//! chunks asked for by a request first, on a worker reserved for them (so
//! a cold read waits for its own fetch, not for background work ahead of
//! it), the others in ascending order in the background. A fetched chunk is
//! written (now readable: the queues are woken), the backing store and
//! the caller's write records synced, then its bit is set in the state
//! file and synced, and only then is it marked ready in memory and the
//! queues woken again. So after a crash the state file
//! never claims a chunk whose content is not durable, and a chunk that the
//! device may have written is never fetched again: restarting the restore
//! resumes where it was, losing nothing written.
//!
//! A chunk whose fetch keeps failing (every attempt, with back-off) is
//! marked failed: requests touching it complete with EIO, the others go on.
//!
//! # The state file
//!
//! `MAGIC` (8 bytes) | chunk size log2 (u32 LE) | 4 zero bytes | volume
//! bytes (u64 LE) | the source's tag (32 bytes: which snapshot of which
//! volume, for the caller to compare on resume) | 8 zero bytes: 64 bytes
//! of header, then one bit per chunk (bit `c % 8` of byte `c / 8`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MAGIC: [u8; 8] = *b"FSHYDRT1";
const HEADER_LEN: usize = 64;
const HEADER: u64 = HEADER_LEN as u64;
/// Attempts per chunk before it is marked failed.
const ATTEMPTS: u32 = 6;
/// Back-off after the first failed attempt, doubled each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Where the content of a chunk comes from (a snapshot in object storage).
pub trait ChunkSource: Send + Sync {
    /// Puts chunk `chunk`'s content in `buf` (resized to the chunk's
    /// length, which is shorter for the volume's last chunk). Returns
    /// `false` when the chunk is all zeroes (nothing to write: a new
    /// volume reads zeroes there).
    fn fetch(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<bool, String>;
}

/// How a range stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Every chunk it touches is ready.
    Ready,
    /// Some chunk is still to come.
    Pending,
    /// Some chunk could not be fetched.
    Failed,
}

/// Why a hydration state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HydrateError {
    #[error("hydration state {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("hydration state {path}: {why}")]
    Invalid { path: PathBuf, why: String },
}

/// Progress of a hydration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HydrationProgress {
    pub chunks: u64,
    pub ready: u64,
    pub failed: u64,
    /// Chunks fetched because a request asked for them.
    pub on_demand: u64,
}

#[derive(Debug, Default)]
struct Queue {
    /// Chunks requests asked for, oldest first.
    wanted: VecDeque<u64>,
    /// The next chunk for background work.
    cursor: u64,
    /// Chunks a worker is fetching now (not to be fetched twice).
    busy: Vec<u64>,
}

/// See the module doc.
#[derive(Debug)]
pub struct Hydration {
    path: PathBuf,
    file: File,
    chunk_shift: u32,
    volume_bytes: u64,
    chunks: u64,
    ready: Box<[AtomicU64]>,
    /// Ready, or written and not yet durable (module doc).
    readable: Box<[AtomicU64]>,
    failed: Box<[AtomicU64]>,
    queue: Mutex<Queue>,
    work: Condvar,
    /// Serializes state-file updates.
    commit: Mutex<()>,
    on_demand: AtomicU64,
    stop: AtomicBool,
    attempts: u32,
    first_backoff: Duration,
}

fn bit(bits: &[AtomicU64], c: u64) -> bool {
    usize::try_from(c / 64)
        .ok()
        .and_then(|w| bits.get(w))
        .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
}

fn set_bit(bits: &[AtomicU64], c: u64) {
    if let Some(w) = usize::try_from(c / 64).ok().and_then(|w| bits.get(w)) {
        // Release: the chunk's content is durable before anyone sees it
        // ready (the Acquire in `bit`).
        w.fetch_or(1 << (c % 64), Ordering::Release);
    }
}

fn count(bits: &[AtomicU64]) -> u64 {
    bits.iter()
        .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
        .sum()
}

impl Hydration {
    /// The state beside a restore target: `TARGET.hydration`.
    pub fn state_path(target: &Path) -> PathBuf {
        let mut p = target.as_os_str().to_owned();
        p.push(".hydration");
        PathBuf::from(p)
    }

    /// A new state at `path` (which must not exist): no chunk ready.
    pub fn create(
        path: &Path,
        volume_bytes: u64,
        chunk_bytes: u32,
        tag: [u8; 32],
    ) -> Result<Hydration, HydrateError> {
        let io = |error| HydrateError::Io {
            path: path.to_owned(),
            error,
        };
        if !chunk_bytes.is_power_of_two() || chunk_bytes < 4096 {
            return Err(HydrateError::Invalid {
                path: path.to_owned(),
                why: format!("chunk size {chunk_bytes} is not a power of two >= 4096"),
            });
        }
        let chunk_shift = chunk_bytes.trailing_zeros();
        let chunks = volume_bytes.div_ceil(u64::from(chunk_bytes));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io)?;
        let mut header = [0u8; HEADER_LEN];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&chunk_shift.to_le_bytes());
        header[16..24].copy_from_slice(&volume_bytes.to_le_bytes());
        header[24..56].copy_from_slice(&tag);
        file.write_all_at(&header, 0).map_err(io)?;
        file.set_len(HEADER + chunks.div_ceil(8)).map_err(io)?;
        file.sync_all().map_err(io)?;
        if let Some(dir) = path.parent() {
            File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(Hydration::with(
            path,
            file,
            chunk_shift,
            volume_bytes,
            &vec![0; usize::try_from(chunks.div_ceil(8)).unwrap_or(0)],
        ))
    }

    /// The state at `path`, as a crashed or stopped hydration left it.
    /// Returns it with the tag it was created with.
    pub fn open(path: &Path) -> Result<(Hydration, [u8; 32]), HydrateError> {
        let io = |error| HydrateError::Io {
            path: path.to_owned(),
            error,
        };
        let invalid = |why: &str| HydrateError::Invalid {
            path: path.to_owned(),
            why: why.to_owned(),
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(|_| invalid("shorter than its header"))?;
        if header[..8] != MAGIC {
            return Err(invalid("not a hydration state (bad magic)"));
        }
        let le32 = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap_or([0; 4]));
        let le64 = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().unwrap_or([0; 8]));
        let chunk_shift = le32(8);
        let volume_bytes = le64(16);
        if !(12..=30).contains(&chunk_shift) {
            return Err(invalid("chunk size out of range"));
        }
        let mut tag = [0u8; 32];
        tag.copy_from_slice(&header[24..56]);
        let chunks = volume_bytes.div_ceil(1 << chunk_shift);
        let mut bitmap = vec![0u8; usize::try_from(chunks.div_ceil(8)).unwrap_or(0)];
        file.read_exact_at(&mut bitmap, HEADER)
            .map_err(|_| invalid("truncated bitmap"))?;
        Ok((
            Hydration::with(path, file, chunk_shift, volume_bytes, &bitmap),
            tag,
        ))
    }

    fn with(path: &Path, file: File, chunk_shift: u32, volume_bytes: u64, bitmap: &[u8]) -> Self {
        let chunks = volume_bytes.div_ceil(1 << chunk_shift);
        let words = usize::try_from(chunks.div_ceil(64)).unwrap_or(0);
        let ready: Box<[AtomicU64]> = (0..words)
            .map(|w| {
                let mut v = 0u64;
                for (i, b) in bitmap.iter().skip(w * 8).take(8).enumerate() {
                    v |= u64::from(*b) << (8 * i);
                }
                AtomicU64::new(v)
            })
            .collect();
        let readable = ready
            .iter()
            .map(|w| AtomicU64::new(w.load(Ordering::Relaxed)))
            .collect();
        Hydration {
            path: path.to_owned(),
            file,
            chunk_shift,
            volume_bytes,
            chunks,
            ready,
            readable,
            failed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            commit: Mutex::new(()),
            on_demand: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            attempts: ATTEMPTS,
            first_backoff: FIRST_BACKOFF,
        }
    }

    /// A fetch is tried `attempts` times, `first_backoff` apart, doubling,
    /// before its chunk is marked failed (default 6 times from 250 ms).
    #[must_use]
    pub fn with_retries(mut self, attempts: u32, first_backoff: Duration) -> Self {
        self.attempts = attempts.max(1);
        self.first_backoff = first_backoff;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn volume_bytes(&self) -> u64 {
        self.volume_bytes
    }

    pub fn chunk_bytes(&self) -> u64 {
        1 << self.chunk_shift
    }

    pub fn chunks(&self) -> u64 {
        self.chunks
    }

    fn chunk_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset >> self.chunk_shift;
        let last = (offset + len.max(1) - 1) >> self.chunk_shift;
        (first, last.min(self.chunks.saturating_sub(1)))
    }

    /// I/O path: how `[offset, offset + len)` stands for a write (every
    /// chunk ready). Atomic loads only.
    pub fn readiness(&self, offset: u64, len: u64) -> Readiness {
        self.stands(&self.ready, offset, len)
    }

    /// I/O path: how `[offset, offset + len)` stands for a read (every
    /// chunk's content written, durable or not). Atomic loads only.
    pub fn read_readiness(&self, offset: u64, len: u64) -> Readiness {
        self.stands(&self.readable, offset, len)
    }

    fn stands(&self, bits: &[AtomicU64], offset: u64, len: u64) -> Readiness {
        let (first, last) = self.chunk_range(offset, len);
        let mut state = Readiness::Ready;
        for c in first..=last {
            if bit(&self.failed, c) {
                return Readiness::Failed;
            }
            if !bit(bits, c) {
                state = Readiness::Pending;
            }
        }
        state
    }

    /// I/O path, slow case: a held-back request needs the chunks of
    /// `[offset, offset + len)`; they go before background work. Takes a
    /// short lock (a request on a chunk not yet fetched waits for the
    /// network anyway).
    pub fn want(&self, offset: u64, len: u64) {
        let (first, last) = self.chunk_range(offset, len);
        let mut q = self.lock();
        let mut added = false;
        for c in first..=last {
            if !bit(&self.ready, c)
                && !bit(&self.failed, c)
                && !q.wanted.contains(&c)
                && !q.busy.contains(&c)
            {
                q.wanted.push_back(c);
                added = true;
            }
        }
        drop(q);
        if added {
            self.work.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn progress(&self) -> HydrationProgress {
        HydrationProgress {
            chunks: self.chunks,
            ready: count(&self.ready),
            failed: count(&self.failed),
            on_demand: self.on_demand.load(Ordering::Relaxed),
        }
    }

    /// Every chunk is ready.
    pub fn complete(&self) -> bool {
        count(&self.ready) == self.chunks
    }

    /// Ends [`Hydration::run`] early (the device is stopping).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.work.notify_all();
    }

    /// The next chunk for a worker: asked-for chunks first; `urgent_only`
    /// workers take nothing else. Blocks until there is one; `None` when
    /// there is nothing left for this worker or the hydration stops.
    fn next(&self, urgent_only: bool) -> Option<(u64, bool)> {
        let mut q = self.lock();
        loop {
            if self.stop.load(Ordering::Acquire) {
                return None;
            }
            while let Some(c) = q.wanted.pop_front() {
                if !bit(&self.ready, c) && !bit(&self.failed, c) && !q.busy.contains(&c) {
                    q.busy.push(c);
                    return Some((c, true));
                }
            }
            if !urgent_only {
                while q.cursor < self.chunks {
                    let c = q.cursor;
                    q.cursor += 1;
                    if !bit(&self.ready, c) && !bit(&self.failed, c) && !q.busy.contains(&c) {
                        q.busy.push(c);
                        return Some((c, false));
                    }
                }
            }
            if q.cursor >= self.chunks && q.busy.is_empty() && q.wanted.is_empty() {
                // Nothing left anywhere: wake the others to end too.
                self.work.notify_all();
                return None;
            }
            q = self
                .work
                .wait_timeout(q, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn done_with(&self, c: u64) {
        let mut q = self.lock();
        q.busy.retain(|&b| b != c);
        drop(q);
        self.work.notify_all();
    }

    /// Records chunk `c` ready: its bit in the state file, synced (the
    /// caller made its content durable first), then in memory.
    fn commit(&self, c: u64) -> io::Result<()> {
        let _serial = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        let byte_index = c / 8;
        let mut byte = 1u8 << (c % 8);
        for i in 0..8 {
            let other = byte_index * 8 + i;
            if other < self.chunks && bit(&self.ready, other) {
                byte |= 1 << i;
            }
        }
        self.file.write_all_at(&[byte], HEADER + byte_index)?;
        self.file.sync_data()?;
        set_bit(&self.readable, c);
        set_bit(&self.ready, c);
        Ok(())
    }

    /// Fetches every chunk not ready yet with `workers` background workers
    /// plus one for chunks requests wait for, until all are ready or
    /// failed or [`Hydration::stop`] is called. `write(offset, bytes)`
    /// stores content (through the tracker, so that it is the new volume's
    /// first epoch); `sync()` makes everything written so far durable (the
    /// backing store and the write records); `wake()` wakes the queues
    /// (their held-back requests retry); `pace(bytes)` is called by a
    /// background worker before it takes a chunk, and may sleep (a
    /// bandwidth cap): before, so that a chunk a request waits for is never
    /// held by a worker that sleeps; `progress` is called after each chunk.
    /// Returns the final progress.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        source: &dyn ChunkSource,
        write: &(dyn Fn(u64, &[u8]) -> io::Result<()> + Sync),
        sync: &(dyn Fn() -> io::Result<()> + Sync),
        wake: &(dyn Fn() + Sync),
        pace: &(dyn Fn(u64) + Sync),
        workers: usize,
        progress: &(dyn Fn(HydrationProgress) + Sync),
    ) -> HydrationProgress {
        let worker = |urgent_only: bool| {
            let mut buf = Vec::new();
            loop {
                if !urgent_only {
                    pace(1 << self.chunk_shift);
                }
                let Some((c, asked)) = self.next(urgent_only) else {
                    break;
                };
                let result = self.hydrate_one(source, write, sync, wake, c, &mut buf);
                if let Err(why) = result {
                    log::error!(
                        "hydration: chunk {c} (bytes {}..{}) cannot be restored: {why}; \
                         requests touching it fail with EIO",
                        c << self.chunk_shift,
                        ((c + 1) << self.chunk_shift).min(self.volume_bytes)
                    );
                    set_bit(&self.failed, c);
                } else if asked {
                    self.on_demand.fetch_add(1, Ordering::Relaxed);
                }
                self.done_with(c);
                wake();
                progress(self.progress());
            }
        };
        std::thread::scope(|s| {
            for _ in 0..workers.max(1) {
                s.spawn(|| worker(false));
            }
            worker(true);
        });
        self.progress()
    }

    fn hydrate_one(
        &self,
        source: &dyn ChunkSource,
        write: &(dyn Fn(u64, &[u8]) -> io::Result<()> + Sync),
        sync: &(dyn Fn() -> io::Result<()> + Sync),
        wake: &(dyn Fn() + Sync),
        c: u64,
        buf: &mut Vec<u8>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let mut backoff = self.first_backoff;
        let mut attempt = 1;
        let data = loop {
            match source.fetch(c, buf) {
                Ok(data) => break data,
                Err(why) if attempt >= self.attempts || self.stop.load(Ordering::Acquire) => {
                    return Err(format!("{why} (after {attempt} attempts)"));
                }
                Err(why) => {
                    log::warn!("hydration: chunk {c}: {why}; retrying in {backoff:?}");
                    std::thread::sleep(backoff);
                    backoff *= 2;
                    attempt += 1;
                }
            }
        };
        let offset = c << self.chunk_shift;
        if data {
            write(offset, buf).map_err(|e| format!("writing it: {e}"))?;
        }
        // Reads waiting for it go now; writes wait for the commit.
        set_bit(&self.readable, c);
        wake();
        if data {
            sync().map_err(|e| format!("syncing it: {e}"))?;
        }
        self.commit(c)
            .map_err(|e| format!("recording it in {}: {e}", self.path.display()))?;
        log::debug!("hydration: chunk {c} in {:?}", started.elapsed());
        Ok(())
    }

    /// Removes the state file once every chunk is ready: the volume is an
    /// ordinary one from now on.
    pub fn finish(&self) -> io::Result<()> {
        if !self.complete() {
            return Err(io::Error::other("hydration is not complete"));
        }
        std::fs::remove_file(&self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    const CHUNK: u32 = 64 << 10;

    /// Chunk `c` holds bytes `c + 1`; chunk 3 is all zeroes; chunks in
    /// `broken` always fail; every fetch is counted.
    struct Source {
        broken: Vec<u64>,
        fetches: AtomicUsize,
        delay: Duration,
    }

    impl ChunkSource for Source {
        fn fetch(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<bool, String> {
            self.fetches.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.delay);
            if self.broken.contains(&chunk) {
                return Err("injected".into());
            }
            buf.clear();
            buf.resize(CHUNK as usize, chunk as u8 + 1);
            Ok(chunk != 3)
        }
    }

    fn run_all(h: &Hydration, src: &Source, vol: &Mutex<Vec<u8>>) -> HydrationProgress {
        h.run(
            src,
            &|off, data| {
                let mut v = vol.lock().unwrap();
                let o = off as usize;
                v[o..o + data.len()].copy_from_slice(data);
                Ok(())
            },
            &|| Ok(()),
            &|| {},
            &|_| {},
            2,
            &|_| {},
        )
    }

    /// While a chunk's sync is in progress its reads may go (its content
    /// is written) but not its writes, and the state file does not claim
    /// it: a crash then fetches it again and loses nothing.
    #[test]
    fn a_written_chunk_is_read_before_its_sync_and_written_only_after() {
        let dir = tempfile::tempdir().unwrap();
        let p = Hydration::state_path(&dir.path().join("vol"));
        let h = Hydration::create(&p, u64::from(CHUNK), CHUNK, [7; 32]).unwrap();
        let src = Source {
            broken: vec![],
            fetches: AtomicUsize::new(0),
            delay: Duration::ZERO,
        };
        let written = AtomicBool::new(false);
        let seen = Mutex::new(Vec::new());
        let wakes = AtomicUsize::new(0);
        let progress = h.run(
            &src,
            &|_, _| {
                written.store(true, Ordering::Release);
                Ok(())
            },
            &|| {
                // In the sync: what a queue woken now would find.
                let on_disk = Hydration::open(&p).unwrap().0;
                seen.lock().unwrap().push((
                    wakes.load(Ordering::Acquire),
                    h.read_readiness(0, 4096),
                    h.readiness(0, 4096),
                    on_disk.readiness(0, 4096),
                ));
                Ok(())
            },
            &|| {
                assert!(written.load(Ordering::Acquire), "woken before the write");
                wakes.fetch_add(1, Ordering::AcqRel);
            },
            &|_| {},
            1,
            &|_| {},
        );
        assert_eq!(progress.ready, 1);
        assert_eq!(
            *seen.lock().unwrap(),
            [(1, Readiness::Ready, Readiness::Pending, Readiness::Pending)]
        );
        assert_eq!(h.readiness(0, 4096), Readiness::Ready);
        assert_eq!(wakes.load(Ordering::Acquire), 2, "woken again once ready");
    }

    #[test]
    fn every_chunk_arrives_once_and_the_state_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let p = Hydration::state_path(&dir.path().join("vol"));
        let volume = 10 * u64::from(CHUNK) - 4096; // the last chunk is short
        let h = Hydration::create(&p, volume, CHUNK, [7; 32]).unwrap();
        assert_eq!(h.chunks(), 10);
        assert_eq!(h.readiness(0, 1), Readiness::Pending);
        let vol = Mutex::new(vec![0u8; 10 * CHUNK as usize]);
        let src = Source {
            broken: vec![],
            fetches: AtomicUsize::new(0),
            delay: Duration::ZERO,
        };
        let p1 = run_all(&h, &src, &vol);
        assert_eq!((p1.ready, p1.failed), (10, 0));
        assert_eq!(src.fetches.load(Ordering::Relaxed), 10, "each chunk once");
        assert_eq!(h.readiness(0, volume), Readiness::Ready);
        let v = vol.lock().unwrap();
        for c in 0..10usize {
            let want = if c == 3 { 0 } else { c as u8 + 1 };
            assert!(
                v[c * CHUNK as usize..(c + 1) * CHUNK as usize]
                    .iter()
                    .all(|&b| b == want)
            );
        }
        drop(v);
        // Reopened: everything ready, the tag kept, nothing fetched again.
        let (h2, tag) = Hydration::open(&p).unwrap();
        assert_eq!(tag, [7; 32]);
        assert!(h2.complete());
        assert_eq!(run_all(&h2, &src, &vol).ready, 10);
        assert_eq!(src.fetches.load(Ordering::Relaxed), 10);
        h2.finish().unwrap();
        assert!(!p.exists());
    }

    #[test]
    fn an_interrupted_hydration_resumes_with_only_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = Hydration::state_path(&dir.path().join("vol"));
        let h = Hydration::create(&p, 8 * u64::from(CHUNK), CHUNK, [1; 32]).unwrap();
        let vol = Mutex::new(vec![0u8; 8 * CHUNK as usize]);
        // Chunks 2 and 5 ready before the "crash".
        for c in [2, 5] {
            h.commit(c).unwrap();
        }
        drop(h);
        let (h, _) = Hydration::open(&p).unwrap();
        assert_eq!(h.progress().ready, 2);
        assert_eq!(h.readiness(2 * u64::from(CHUNK), 10), Readiness::Ready);
        assert_eq!(
            h.readiness(2 * u64::from(CHUNK), u64::from(CHUNK) + 1),
            Readiness::Pending
        );
        let src = Source {
            broken: vec![],
            fetches: AtomicUsize::new(0),
            delay: Duration::ZERO,
        };
        run_all(&h, &src, &vol);
        assert_eq!(src.fetches.load(Ordering::Relaxed), 6);
        // Chunks 2 and 5 were not written over (the device may have
        // written them since).
        let v = vol.lock().unwrap();
        assert!(
            v[2 * CHUNK as usize..3 * CHUNK as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert!(
            v[5 * CHUNK as usize..6 * CHUNK as usize]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn asked_for_chunks_go_first_and_broken_ones_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = Hydration::state_path(&dir.path().join("vol"));
        let chunks = 64u64;
        let h = Hydration::create(&p, chunks * u64::from(CHUNK), CHUNK, [0; 32])
            .unwrap()
            .with_retries(3, Duration::from_millis(10));
        let vol = Mutex::new(vec![0u8; (chunks * u64::from(CHUNK)) as usize]);
        let src = Source {
            broken: vec![40],
            fetches: AtomicUsize::new(0),
            delay: Duration::from_millis(5),
        };
        let order = Mutex::new(Vec::new());
        let last = chunks - 1;
        std::thread::scope(|s| {
            s.spawn(|| {
                h.run(
                    &src,
                    &|off, data| {
                        order.lock().unwrap().push(off / u64::from(CHUNK));
                        let mut v = vol.lock().unwrap();
                        v[off as usize..off as usize + data.len()].copy_from_slice(data);
                        Ok(())
                    },
                    &|| Ok(()),
                    &|| {},
                    &|_| {},
                    1,
                    &|_| {},
                );
            });
            // A request on the last chunk while the background is at the
            // start: it is fetched long before the cursor gets there.
            std::thread::sleep(Duration::from_millis(20));
            h.want(last * u64::from(CHUNK), 4096);
            let t = Instant::now();
            while h.readiness(last * u64::from(CHUNK), 4096) != Readiness::Ready {
                assert!(t.elapsed() < Duration::from_secs(10), "never fetched");
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let order = order.into_inner().unwrap();
        let pos = order.iter().position(|&c| c == last).unwrap();
        assert!(
            pos < order.len() / 2,
            "asked-for chunk came at {pos} of {}",
            order.len()
        );
        let p = h.progress();
        assert_eq!((p.ready, p.failed), (chunks - 1, 1));
        assert!(p.on_demand >= 1);
        assert_eq!(h.readiness(40 * u64::from(CHUNK), 1), Readiness::Failed);
        assert_eq!(h.readiness(39 * u64::from(CHUNK), 1), Readiness::Ready);
        assert!(!h.complete());
        assert!(
            h.finish().is_err(),
            "an incomplete hydration keeps its state"
        );
    }

    /// A background worker paced by a bandwidth cap sleeps before it takes
    /// a chunk, never while holding one: a request for chunk 0 is served at
    /// once, not after the background's first pause.
    #[test]
    fn a_paced_background_never_holds_a_wanted_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let p = Hydration::state_path(&dir.path().join("vol"));
        let h = Hydration::create(&p, 16 * u64::from(CHUNK), CHUNK, [0; 32]).unwrap();
        let src = Source {
            broken: vec![],
            fetches: AtomicUsize::new(0),
            delay: Duration::ZERO,
        };
        let waited = std::thread::scope(|s| {
            s.spawn(|| {
                h.run(
                    &src,
                    &|_, _| Ok(()),
                    &|| Ok(()),
                    &|| {},
                    &|_| {
                        if !h.stop.load(Ordering::Acquire) {
                            std::thread::sleep(Duration::from_secs(3));
                        }
                    },
                    1,
                    &|_| {},
                )
            });
            std::thread::sleep(Duration::from_millis(50));
            let t = Instant::now();
            h.want(0, 4096);
            while h.readiness(0, 4096) != Readiness::Ready {
                std::thread::sleep(Duration::from_millis(1));
            }
            let waited = t.elapsed();
            h.stop();
            waited
        });
        assert!(waited < Duration::from_secs(2), "chunk 0 waited {waited:?}");
    }

    #[test]
    fn bad_state_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.hydration");
        std::fs::write(&p, b"not a state").unwrap();
        assert!(
            Hydration::open(&p)
                .unwrap_err()
                .to_string()
                .contains("header")
        );
        std::fs::write(&p, [0u8; 80]).unwrap();
        assert!(
            Hydration::open(&p)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let q = dir.path().join("y.hydration");
        Hydration::create(&q, 1 << 30, 1 << 20, [0; 32]).unwrap();
        assert!(
            Hydration::create(&q, 1 << 30, 1 << 20, [0; 32]).is_err(),
            "never overwritten"
        );
        let bytes = std::fs::read(&q).unwrap();
        std::fs::write(&q, &bytes[..70]).unwrap();
        assert!(
            Hydration::open(&q)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(Hydration::create(&dir.path().join("z"), 1 << 20, 1000, [0; 32]).is_err());
    }
}
