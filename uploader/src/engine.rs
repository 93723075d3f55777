//! The upload engine: turns each closed epoch of a [`Tracker`] into a
//! snapshot at a destination, on its own thread (the I/O path never waits
//! for it), oldest epoch first.
//!
//! For an epoch, the changed blocks are grouped by chunk and read through
//! the tracker (from the volume, or the preserve area when a later write
//! copied them there). A chunk whose blocks all changed is stored whole; a
//! chunk with some changed blocks is stored as a delta over its earlier
//! objects (a chunk never stored before reads as zeroes, so a delta over it
//! is exact). The manifest is written last; only then are the blocks
//! acknowledged and the epoch finished, which frees its preserve slots and
//! ring records. An upload interrupted by a crash is redone after the
//! restart; the objects already stored are found and kept, not sent again.
//!
//! With predictive upload ([`early`]), blocks of the *open* epoch are
//! stored before its close as parts (delta objects under part numbers of
//! their own, [`crate::format`]); at the close the snapshot takes over the
//! parts of its epoch and stores only what changed since they were
//! acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use foresnap_driver::crashpoint;
use foresnap_driver::tracking::Tracker;
use foresnap_driver::tracking::tracker::ReadClosedError;

use crate::dest::{DestError, Destination};
use crate::format::{Codec, Keys, Manifest, ObjectRef, volume_hex};
use crate::restore::{SnapshotError, SnapshotWriter, list_snapshots, read_manifest};

pub mod early;

pub use early::{Deadlines, Early};

/// Default chunk: 4 MiB, the object size.
pub const DEFAULT_CHUNK_BYTES: u32 = 4 << 20;
/// Default upload worker threads.
pub const DEFAULT_WORKERS: usize = 4;
/// Default bound on the memory of the upload buffers.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;

/// Memory one upload worker may hold at once, for chunks of `chunk_bytes`
/// and a destination that keeps `dest_copies` more copies of an object in
/// flight ([`Destination::object_copies`]: an S3 request body, a sealed
/// object): its chunk buffer, the encoded object (compressed in place, one
/// allocation) and, when a delta chain is compacted or an existing object
/// is checked, the object read back: three chunks, the destination's, and
/// headers and bitmaps.
pub fn worker_memory(chunk_bytes: u32, dest_copies: u64) -> u64 {
    worker_chunks(dest_copies) * u64::from(chunk_bytes) + (64 << 10)
}

/// The chunks of [`worker_memory`].
pub fn worker_chunks(dest_copies: u64) -> u64 {
    3 + dest_copies
}

/// Why an epoch could not be uploaded (retried with backoff).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UploadError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("reading closed content: {0}")]
    Read(#[from] ReadClosedError),
    #[error("reading the volume: {0}")]
    ReadOpen(std::io::Error),
    #[error("tracker: {0}")]
    Track(#[from] foresnap_driver::tracking::tracker::TrackError),
    #[error(
        "an upload memory bound of {bound} bytes is below what one worker needs for \
         {chunk}-byte chunks ({need} bytes): raise the bound or use smaller chunks"
    )]
    Memory { bound: u64, need: u64, chunk: u32 },
    #[error(
        "{dest}: the snapshots of volume {name} track {theirs}-byte blocks, this volume \
         {ours}-byte ones: use --track-block {theirs} or another --volume name"
    )]
    Geometry {
        dest: String,
        name: String,
        theirs: u32,
        ours: u32,
    },
    #[error("cannot start an upload worker thread: {0}")]
    Worker(std::io::Error),
    #[error(
        "{dest} holds a volume named {name} with another id ({theirs}; this one is {ours}): \
         choose another --volume name"
    )]
    OtherVolume {
        dest: String,
        name: String,
        theirs: String,
        ours: String,
    },
}

impl UploadError {
    /// A short class for counting failures (metrics): `remote` (the store
    /// answered with an error or could not be reached), `io` (a local
    /// destination), `missing`, `damaged` (a stored object or manifest),
    /// `key`, `conflict` (what is stored differs from what is expected),
    /// `volume` (reading or tracking the volume here), `config`.
    pub fn class(&self) -> &'static str {
        fn dest(e: &DestError) -> &'static str {
            match e {
                DestError::Remote { .. } => "remote",
                DestError::Io { .. } => "io",
                DestError::NotFound { .. } => "missing",
                DestError::Damaged { .. } => "damaged",
                DestError::Key { .. } => "key",
                DestError::AlreadyExists { .. } => "conflict",
                _ => "config",
            }
        }
        match self {
            UploadError::Dest(e) | UploadError::Snapshot(SnapshotError::Dest(e)) => dest(e),
            UploadError::Snapshot(SnapshotError::Format { .. }) => "damaged",
            UploadError::Snapshot(SnapshotError::Mismatch { .. }) => "conflict",
            UploadError::Snapshot(_)
            | UploadError::Read(_)
            | UploadError::ReadOpen(_)
            | UploadError::Track(_)
            | UploadError::Worker(_) => "volume",
            UploadError::Memory { .. }
            | UploadError::Geometry { .. }
            | UploadError::OtherVolume { .. } => "config",
        }
    }
}

/// What one snapshot upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadReport {
    pub snapshot: u32,
    pub blocks: u64,
    pub objects_stored: u64,
    pub objects_reused: u64,
    pub bytes_sent: u64,
    /// Chunks whose delta chain was folded into a fresh chunk object.
    pub compacted: u64,
    pub elapsed: Duration,
}

/// See the module doc.
#[derive(Debug)]
pub struct Uploader {
    tracker: Arc<Tracker>,
    dest: Arc<dyn Destination>,
    keys: Keys,
    volume_id: [u8; 16],
    chunk_bytes: u32,
    codec: Codec,
    last: Option<Manifest>,
    max_deltas: usize,
    workers: usize,
    /// Parts stored and acknowledged before their epoch's close: epoch →
    /// chunk → parts, oldest first.
    parts: BTreeMap<u32, BTreeMap<u64, Vec<Part>>>,
    /// Predictive upload of the open epoch, if configured.
    early: Option<Early>,
    /// Told `(snapshot, blocks stored, blocks)` of the snapshot being
    /// uploaded after each chunk ([`Uploader::with_progress`]).
    progress: Option<Progress>,
}

/// `(snapshot, blocks done, blocks)`.
type ProgressFn = dyn FnMut(u32, u64, u64) + Send;

/// An upload's progress callback.
struct Progress(Mutex<Box<ProgressFn>>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// A part of an epoch, stored before its close and acknowledged: which
/// blocks of its chunk it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub r: ObjectRef,
    /// Indices within the chunk of the blocks it is credited for,
    /// ascending.
    pub blocks: Vec<u32>,
    /// It holds every block of its chunk (compaction before the close):
    /// the chain before it is not needed.
    pub full: bool,
}

/// The newest snapshot at `dest` below `before`, if any.
pub fn latest_manifest(
    dest: &dyn Destination,
    keys: &Keys,
    before: u32,
) -> Result<Option<Manifest>, SnapshotError> {
    match list_snapshots(dest, keys)?
        .into_iter()
        .rfind(|&id| id < before)
    {
        Some(id) => read_manifest(dest, keys, id).map(Some),
        None => Ok(None),
    }
}

impl Uploader {
    /// An uploader of `tracker`'s closed epochs to `dest`. Finds the
    /// volume's newest snapshot there to build on.
    pub fn new(
        tracker: Arc<Tracker>,
        dest: Arc<dyn Destination>,
        keys: Keys,
        chunk_bytes: u32,
        codec: Codec,
    ) -> Result<Uploader, UploadError> {
        let volume_id = tracker.volume_id();
        let before = tracker
            .closed_epochs()
            .first()
            .map_or(tracker.open_epoch(), |e| e.epoch);
        // The name must be this volume's: the newest snapshot there says.
        if let Some(m) = latest_manifest(dest.as_ref(), &keys, u32::MAX)?
            && m.volume_id != volume_id
        {
            return Err(UploadError::OtherVolume {
                dest: dest.url(),
                name: keys.name().to_owned(),
                theirs: volume_hex(&m.volume_id),
                ours: volume_hex(&volume_id),
            });
        }
        let last = latest_manifest(dest.as_ref(), &keys, before)?;
        let mut chunk_bytes = chunk_bytes;
        if let Some(m) = &last {
            // Incremental snapshots share objects with their parents, so
            // they keep the parents' geometry.
            let block_bytes = 1u32 << tracker.map().geometry().block_shift;
            if m.block_bytes != block_bytes {
                return Err(UploadError::Geometry {
                    dest: dest.url(),
                    name: keys.name().to_owned(),
                    theirs: m.block_bytes,
                    ours: block_bytes,
                });
            }
            if m.chunk_bytes != chunk_bytes {
                log::warn!(
                    "{}: volume {} has {}-byte chunks there; its next snapshots keep them \
                     (not the {chunk_bytes} bytes asked for)",
                    dest.url(),
                    keys.name(),
                    m.chunk_bytes
                );
                chunk_bytes = m.chunk_bytes;
            }
        }
        Ok(Uploader {
            tracker,
            dest,
            keys,
            volume_id,
            chunk_bytes,
            codec,
            last,
            max_deltas: crate::restore::DEFAULT_MAX_DELTAS,
            workers: 1,
            parts: BTreeMap::new(),
            early: None,
            progress: None,
        })
    }

    /// Calls `f(snapshot, blocks done, blocks)` after each chunk of a
    /// snapshot's upload (from the workers, one call at a time): for a
    /// progress bar of a long upload, such as a volume's first, full one.
    pub fn with_progress(mut self, f: impl FnMut(u32, u64, u64) + Send + 'static) -> Self {
        self.progress = Some(Progress(Mutex::new(Box::new(f))));
        self
    }

    /// Uploads the open epoch before its close as `early` plans it.
    pub fn with_early(mut self, early: Early) -> Self {
        self.early = Some(early);
        self
    }

    /// Bounds each chunk's delta chain (see [`SnapshotWriter::with_max_deltas`]).
    pub fn with_max_deltas(mut self, n: usize) -> Self {
        self.max_deltas = n.max(1);
        self
    }

    /// Uploads with up to `workers` threads, as many as `memory_bytes`
    /// allows ([`worker_memory`] each, with the destination's copies);
    /// fails if it does not allow one.
    pub fn with_pool(mut self, workers: usize, memory_bytes: u64) -> Result<Self, UploadError> {
        let need = worker_memory(self.chunk_bytes, self.dest.object_copies());
        let fit = usize::try_from(memory_bytes / need).unwrap_or(usize::MAX);
        if fit == 0 {
            return Err(UploadError::Memory {
                bound: memory_bytes,
                need,
                chunk: self.chunk_bytes,
            });
        }
        self.workers = workers.clamp(1, fit);
        Ok(self)
    }

    /// Upload worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    fn base(&self) -> Manifest {
        Manifest {
            volume_id: self.volume_id,
            snapshot: 0,
            parent: 0,
            closed_ms: 0,
            volume_bytes: self.tracker.volume_bytes(),
            block_bytes: 1 << self.tracker.map().geometry().block_shift,
            chunk_bytes: self.chunk_bytes,
            chunks: Vec::new(),
            stripe: None,
        }
    }

    /// The manifest of `epoch` already at the destination, when it is this
    /// volume's snapshot of that close: stored by an upload that crashed
    /// before acknowledging its epoch. Uploaded again over a parent that a
    /// prune has since deleted, the epoch's new manifest differs from it
    /// (another parent, other objects), yet the stored one is whole (a
    /// manifest is written last) and holds the same content: it stands.
    fn stored_before_a_crash(&self, epoch: u32, closed_ms: u64) -> Option<Manifest> {
        let there = read_manifest(self.dest.as_ref(), &self.keys, epoch).ok()?;
        let ours = there.volume_id == self.tracker.volume_id()
            && there.snapshot == epoch
            && there.closed_ms == closed_ms;
        if ours {
            log::info!(
                "{}: snapshot {epoch} of volume {} was stored before a restart (over parent \
                 {}); it stands",
                self.dest.url(),
                self.keys.name(),
                there.parent
            );
        }
        ours.then_some(there)
    }

    /// Uploads the oldest closed epoch, if there is one, with the worker
    /// pool: each worker takes the next chunk with changed blocks, reads
    /// them into its own chunk buffer and stores the chunk's object; the
    /// manifest is written once every chunk is stored.
    pub fn upload_next(&mut self) -> Result<Option<UploadReport>, UploadError> {
        let Some(info) = self.tracker.closed_epochs().into_iter().next() else {
            return Ok(None);
        };
        let start = Instant::now();
        let epoch = info.epoch;
        let changed = self.tracker.changed_blocks(epoch).ok_or(
            foresnap_driver::tracking::tracker::TrackError::NoSuchEpoch(epoch),
        )?;
        let base = self.base();
        let dest = self.dest.clone();
        let w = SnapshotWriter::new(
            dest.as_ref(),
            &self.keys,
            &base,
            self.last.as_ref(),
            epoch,
            info.closed_ms,
            self.codec,
        )
        .with_max_deltas(self.max_deltas);
        let no_parts = BTreeMap::new();
        let job = ChunkJob {
            tracker: &self.tracker,
            writer: &w,
            base: &base,
            epoch,
            parts: self.parts.get(&epoch).unwrap_or(&no_parts),
        };
        let queue = Mutex::new(changed.blocks().peekable());
        let (done, total) = (AtomicU64::new(0), changed.len());
        let progress = self.progress.as_ref();
        pool(
            self.workers,
            base.chunk_bytes as usize,
            || {
                let mut present = Vec::new();
                let chunk = job.next_chunk(&mut lock(&queue), &mut present)?;
                Some((chunk, present))
            },
            |(chunk, present), buf| {
                job.upload(chunk, &present, buf)?;
                crashpoint::hit("object");
                if let Some(p) = progress {
                    let n = present.len() as u64;
                    let mut f = lock(&p.0);
                    // Under the lock: the counts reach `f` in order.
                    f(epoch, done.fetch_add(n, Ordering::Relaxed) + n, total);
                }
                Ok(())
            },
        )?;
        let counts = w.counts();
        crashpoint::hit("manifest");
        let manifest = match w.commit() {
            Ok(m) => m,
            Err(SnapshotError::Mismatch { key, why }) => self
                .stored_before_a_crash(epoch, info.closed_ms)
                .ok_or(SnapshotError::Mismatch { key, why })?,
            Err(e) => return Err(e.into()),
        };
        crashpoint::hit("ack");
        for b in changed.blocks() {
            self.tracker.ack_closed(epoch, b);
        }
        self.tracker.finish_epoch(epoch)?;
        self.parts.remove(&epoch);
        if let Some(e) = &self.early {
            e.deadlines().completed(epoch);
        }
        self.last = Some(manifest);
        Ok(Some(UploadReport {
            snapshot: epoch,
            blocks: changed.len(),
            objects_stored: counts.stored,
            objects_reused: counts.reused,
            bytes_sent: counts.bytes,
            compacted: counts.compacted,
            elapsed: start.elapsed(),
        }))
    }

    /// Uploads closed epochs until `stop` is set: polls for new ones, and
    /// retries a failed upload with exponential backoff (0.5 s to 60 s).
    /// While no closed epoch is owed, uploads the open one's parts as the
    /// predictive planner says ([`Uploader::with_early`]).
    pub fn run(self, stop: &AtomicBool) {
        self.run_reporting(stop, &UploadHealth::default());
    }

    /// [`Uploader::run`], keeping `health` up to date for `status`.
    pub fn run_reporting(mut self, stop: &AtomicBool, health: &UploadHealth) {
        let mut backoff = Duration::from_millis(500);
        while !stop.load(Ordering::Relaxed) {
            let step = match self.upload_next() {
                Ok(None) => match self.upload_early() {
                    Ok(true) => continue, // more may be due at once
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                },
                other => other,
            };
            match step {
                Ok(Some(r)) => {
                    backoff = Duration::from_millis(500);
                    health.succeeded(&r);
                    log::info!(
                        "snapshot {} uploaded to {}: {} blocks, {} objects stored ({} found already there, {} chains compacted), {} bytes, {:.1} s",
                        r.snapshot,
                        self.dest.url(),
                        r.blocks,
                        r.objects_stored,
                        r.objects_reused,
                        r.compacted,
                        r.bytes_sent,
                        r.elapsed.as_secs_f64()
                    );
                }
                Ok(None) => std::thread::sleep(early::POLL),
                Err(e) => {
                    log::warn!(
                        "upload to {} failed: {e}; retrying in {:.1} s",
                        self.dest.url(),
                        backoff.as_secs_f64()
                    );
                    health.failed(e.class(), e.to_string(), backoff);
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(60));
                }
            }
        }
    }
}

/// How the uploader stands with its destination, for `status`: updated
/// after every upload attempt, read by the control socket.
#[derive(Debug, Default)]
pub struct UploadHealth {
    state: Mutex<HealthState>,
}

/// A copy of [`UploadHealth`]'s state (times in ms since the Unix epoch).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// The newest snapshot stored, and when.
    pub last_uploaded: Option<(u32, u64)>,
    /// Since when uploads fail (the first failure after a success).
    pub failing_since_ms: Option<u64>,
    /// Failed attempts since the last success.
    pub failures: u32,
    /// The last failure.
    pub last_error: Option<String>,
    /// When the next attempt is due, while failing.
    pub retry_at_ms: Option<u64>,
    /// Since the start: snapshots stored, and their objects and bytes (the
    /// parts stored before a close are counted by
    /// [`early::Deadlines::early_bytes`]).
    pub totals: UploadTotals,
}

/// Counters of an uploader since its start (for metrics).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UploadTotals {
    pub snapshots: u64,
    pub objects: u64,
    pub bytes: u64,
    /// Failed attempts by class ([`UploadError::class`]).
    pub failures: std::collections::BTreeMap<&'static str, u64>,
}

impl UploadHealth {
    pub fn get(&self) -> HealthState {
        lock(&self.state).clone()
    }

    fn succeeded(&self, r: &UploadReport) {
        let mut st = lock(&self.state);
        let mut totals = std::mem::take(&mut st.totals);
        totals.snapshots += 1;
        totals.objects += r.objects_stored;
        totals.bytes += r.bytes_sent;
        *st = HealthState {
            last_uploaded: Some((r.snapshot, wall_ms())),
            totals,
            ..HealthState::default()
        };
    }

    fn failed(&self, class: &'static str, error: String, retry_in: Duration) {
        let mut st = lock(&self.state);
        *st.totals.failures.entry(class).or_default() += 1;
        let now = wall_ms();
        st.failing_since_ms.get_or_insert(now);
        st.failures += 1;
        st.last_error = Some(error);
        st.retry_at_ms = Some(now + u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX));
    }
}

pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work` on the items `next` hands out, on up to `workers` threads
/// each with a buffer of `buf_len` bytes; stops handing out items at the
/// first error and returns it.
fn pool<T>(
    workers: usize,
    buf_len: usize,
    next: impl Fn() -> Option<T> + Sync,
    work: impl Fn(T, &mut [u8]) -> Result<(), UploadError> + Sync,
) -> Result<(), UploadError> {
    let failed: Mutex<Option<UploadError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let fail = |e: UploadError| {
        stop.store(true, Ordering::Relaxed);
        lock(&failed).get_or_insert(e);
    };
    std::thread::scope(|s| {
        for i in 0..workers.max(1) {
            let (next, work, stop, fail) = (&next, &work, &stop, &fail);
            let spawned = std::thread::Builder::new()
                .name(format!("upload-{i}"))
                .spawn_scoped(s, move || {
                    let mut buf = vec![0u8; buf_len];
                    while !stop.load(Ordering::Relaxed) {
                        let Some(item) = next() else { break };
                        if let Err(e) = work(item, &mut buf) {
                            fail(e);
                        }
                    }
                });
            if let Err(e) = spawned {
                fail(UploadError::Worker(e));
                break;
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What the workers of one epoch's upload share.
struct ChunkJob<'a> {
    tracker: &'a Tracker,
    writer: &'a SnapshotWriter<'a>,
    base: &'a Manifest,
    epoch: u32,
    /// The epoch's parts stored before its close, by chunk.
    parts: &'a BTreeMap<u64, Vec<Part>>,
}

impl ChunkJob<'_> {
    fn per_chunk(&self) -> u64 {
        u64::from(self.base.chunk_bytes / self.base.block_bytes)
    }

    /// Takes the next chunk's changed blocks (indices within the chunk)
    /// from the epoch's ascending block list.
    fn next_chunk(
        &self,
        blocks: &mut std::iter::Peekable<impl Iterator<Item = u64>>,
        present: &mut Vec<u32>,
    ) -> Option<u64> {
        let per_chunk = self.per_chunk();
        let chunk = *blocks.peek()? / per_chunk;
        present.clear();
        while let Some(b) = blocks.next_if(|b| b / per_chunk == chunk) {
            present.push(u32::try_from(b - chunk * per_chunk).unwrap_or(u32::MAX));
        }
        Some(chunk)
    }

    /// Reads the changed blocks `present` of `chunk` straight into their
    /// places in `buf`, then stores the chunk whole (every block read) or
    /// as a delta of slices into `buf` (no copy per block) after the
    /// chunk's parts stored before the close.
    fn upload(&self, chunk: u64, present: &[u32], buf: &mut [u8]) -> Result<(), UploadError> {
        let bs = self.base.block_bytes as usize;
        let first = chunk * self.per_chunk();
        let parts = self.parts.get(&chunk).map_or(&[][..], Vec::as_slice);
        let mut read = Vec::with_capacity(present.len());
        for &i in present {
            let at = i as usize * bs;
            let b = first + u64::from(i);
            match self
                .tracker
                .read_closed(self.epoch, b, &mut buf[at..at + bs])
            {
                Ok(_) => read.push(i),
                // Uploaded before the close and not written since: a part
                // holds its content at the close.
                Err(ReadClosedError::NotPending { .. })
                    if parts.iter().any(|p| p.blocks.binary_search(&i).is_ok()) => {}
                // Every other changed block of a closed epoch is pending
                // until this upload acknowledges it (after the manifest);
                // one that is not is a bug, and the snapshot must not be
                // built without it.
                Err(e) => return Err(e.into()),
            }
        }
        let len = usize::try_from(self.base.chunk_len(chunk)).unwrap_or(0);
        if read.len() as u64 == (len as u64).div_ceil(bs as u64) {
            // Whole: the parts are superseded.
            self.writer.put_chunk(chunk, &buf[..len])?;
            return Ok(());
        }
        if !parts.is_empty() {
            // From the last full part on, if there is one: it replaces the
            // chain before it.
            let from = parts.iter().rposition(|p| p.full);
            let refs: Vec<ObjectRef> = parts[from.unwrap_or(0)..].iter().map(|p| p.r).collect();
            self.writer.adopt_parts(chunk, &refs, from.is_some())?;
        }
        if !read.is_empty() {
            let refs: Vec<(u32, &[u8])> = read
                .iter()
                .map(|&i| (i, &buf[i as usize * bs..(i as usize + 1) * bs]))
                .collect();
            self.writer.put_delta(chunk, &refs)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use crate::dest::DirDestination;
    use crate::restore::restore_image;
    use foresnap_driver::tracking::Geometry;
    use foresnap_driver::tracking::tracker::TrackerConfig;

    const MIB: u64 = 1 << 20;

    fn write(t: &Tracker, vol: &std::fs::File, off: u64, data: &[u8]) {
        t.write_volume(vol, off, data).unwrap();
    }

    /// A `size`-byte volume file in `dir`, open for writing, with a new
    /// tracker (1 MiB ring, 4 KiB blocks, one queue) over it.
    pub(crate) fn tracked_volume(
        dir: &std::path::Path,
        size: u64,
    ) -> (Arc<Tracker>, std::fs::File, TrackerConfig) {
        let vp = dir.join("vol");
        let vol = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&vp)
            .unwrap();
        vol.set_len(size).unwrap();
        let cfg = TrackerConfig {
            ring: dir.join("ring"),
            ring_bytes: 1 << 20,
            geometry: Geometry::default(),
        };
        let (t, _) = Tracker::open(&cfg, &vp, size, 1).unwrap();
        (Arc::new(t), vol, cfg)
    }

    /// Epochs upload oldest first and restore exactly to the images at
    /// their closes, while the volume is rewritten between closes; the
    /// uploaded epochs are finished; a new uploader (a restart) builds on
    /// the snapshots already there.
    #[test]
    fn epochs_upload_and_restore_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let vp = dir.path().join("vol");
        let size = 3 * MIB + 8192;
        let (t, vol, cfg) = tracked_volume(dir.path(), size);
        let dest: Arc<dyn Destination> =
            Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
        let keys = Keys::new("v").unwrap();
        let mut up = Uploader::new(
            t.clone(),
            dest.clone(),
            keys.clone(),
            1 << 20,
            Codec::Zstd(1),
        )
        .unwrap()
        // Three workers: chunks of one epoch are stored concurrently.
        .with_pool(3, 64 << 20)
        .unwrap();
        assert_eq!(up.workers(), 3);
        assert_eq!(up.upload_next().unwrap(), None, "nothing closed yet");

        // Epoch 1: a whole chunk, part of another, the short last chunk.
        write(&t, &vol, MIB, &vec![1u8; MIB as usize]);
        write(&t, &vol, 8192, &[2u8; 4096]);
        write(&t, &vol, 3 * MIB, &[3u8; 8192]);
        t.close().unwrap();
        let image1 = std::fs::read(&vp).unwrap();
        // Epoch 2 overwrites some of it before epoch 1 is uploaded.
        write(&t, &vol, MIB + 4096, &[4u8; 4096]);
        write(&t, &vol, 0, &[5u8; 4096]);
        t.close().unwrap();
        let image2 = std::fs::read(&vp).unwrap();
        write(&t, &vol, 2 * MIB, &[6u8; 4096]); // open epoch 3: not uploaded

        let r1 = up.upload_next().unwrap().unwrap();
        assert_eq!((r1.snapshot, r1.blocks), (1, 256 + 1 + 2));
        let r2 = up.upload_next().unwrap().unwrap();
        assert_eq!((r2.snapshot, r2.blocks), (2, 2));
        assert_eq!(up.upload_next().unwrap(), None);
        assert!(t.closed_epochs().is_empty(), "uploaded epochs are finished");
        assert_eq!(t.status().preserve_slots_used, 0, "preserve slots freed");

        for (id, want) in [(1, &image1), (2, &image2)] {
            let m = read_manifest(dest.as_ref(), &keys, id).unwrap();
            let out = dir.path().join(format!("r{id}"));
            restore_image(dest.as_ref(), &keys, &m, &out, 2, |_, _| {}).unwrap();
            assert!(
                &std::fs::read(&out).unwrap() == want,
                "snapshot {id} differs"
            );
        }
        // Snapshot 2 reuses snapshot 1's objects and adds deltas only.
        let m2 = read_manifest(dest.as_ref(), &keys, 2).unwrap();
        assert_eq!(m2.parent, 1);
        assert_eq!(m2.chunks[1].len(), 2);
        assert_eq!(m2.chunks[2].len(), 0, "never written");

        // A restarted uploader builds on snapshot 2.
        t.close().unwrap();
        let image3 = std::fs::read(&vp).unwrap();
        let mut up =
            Uploader::new(t.clone(), dest.clone(), keys.clone(), 1 << 20, Codec::None).unwrap();
        assert_eq!(up.upload_next().unwrap().unwrap().snapshot, 3);
        let m3 = read_manifest(dest.as_ref(), &keys, 3).unwrap();
        assert_eq!(m3.parent, 2);
        let out = dir.path().join("r3");
        restore_image(dest.as_ref(), &keys, &m3, &out, 2, |_, _| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == image3);

        // Another volume under the same name is refused.
        let other = tempfile::tempdir().unwrap();
        let op = other.path().join("vol");
        std::fs::File::create(&op).unwrap().set_len(size).unwrap();
        let ocfg = TrackerConfig {
            ring: other.path().join("ring"),
            ..cfg
        };
        let (ot, _) = Tracker::open(&ocfg, &op, size, 1).unwrap();
        let e = Uploader::new(Arc::new(ot), dest, keys, 1 << 20, Codec::None).unwrap_err();
        assert!(e.to_string().contains("another id"), "{e}");
    }

    /// An upload that stored its manifest and was killed before its epoch
    /// was acknowledged is uploaded again at restart, over the newest
    /// snapshot below it. If a prune deleted that one meanwhile, the new
    /// manifest differs from the stored one: the stored one stands (it is
    /// whole and of this close), the epoch is finished, nothing stalls.
    #[test]
    fn a_manifest_stored_before_a_kill_stands_though_its_parent_was_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let vp = dir.path().join("vol");
        let size = 2 * MIB;
        let (t, vol, cfg) = tracked_volume(dir.path(), size);
        let dest: Arc<dyn Destination> =
            Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
        let keys = Keys::new("v").unwrap();
        let new_uploader = |t: &Arc<Tracker>| {
            Uploader::new(t.clone(), dest.clone(), keys.clone(), 1 << 20, Codec::None).unwrap()
        };
        let mut up = new_uploader(&t);
        write(&t, &vol, 0, &vec![1u8; MIB as usize]);
        t.close().unwrap();
        assert_eq!(up.upload_next().unwrap().unwrap().snapshot, 1);
        write(&t, &vol, 4096, &[2u8; 4096]);
        t.close().unwrap();
        let image2 = std::fs::read(&vp).unwrap();
        // The state of a kill after snapshot 2's manifest, before its ack:
        // the ring (closed epoch 2 not yet uploaded) as it is now.
        let saved = dir.path().join("saved");
        std::fs::create_dir(&saved).unwrap();
        for f in ["ring", "ring.preserve"] {
            let from = dir.path().join(f);
            if from.exists() {
                std::fs::copy(&from, saved.join(f)).unwrap();
            }
        }
        let r2 = up.upload_next().unwrap().unwrap();
        assert_eq!(r2.snapshot, 2);
        let stored = read_manifest(dest.as_ref(), &keys, 2).unwrap();
        assert_eq!(stored.parent, 1, "a delta over snapshot 1");
        drop(up);
        drop(t);
        // A prune deletes snapshot 1's manifest (its objects stay: 2 needs them).
        dest.delete(&keys.manifest(1)).unwrap();
        for f in ["ring", "ring.preserve"] {
            if saved.join(f).exists() {
                std::fs::copy(saved.join(f), dir.path().join(f)).unwrap();
            }
        }
        let (t, _) = Tracker::open(&cfg, &vp, size, 1).unwrap();
        let t = Arc::new(t);
        assert_eq!(t.closed_epochs().first().map(|e| e.epoch), Some(2));
        let mut up = new_uploader(&t);
        let again = up.upload_next().unwrap().unwrap();
        assert_eq!(again.snapshot, 2);
        assert!(t.closed_epochs().is_empty(), "epoch 2 is finished");
        assert_eq!(read_manifest(dest.as_ref(), &keys, 2).unwrap(), stored);
        let out = dir.path().join("r2");
        restore_image(dest.as_ref(), &keys, &stored, &out, 2, |_, _| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == image2);
        // The next snapshot builds on the one that stood.
        write(&t, &vol, 8192, &[3u8; 4096]);
        t.close().unwrap();
        assert_eq!(up.upload_next().unwrap().unwrap().snapshot, 3);
        assert_eq!(read_manifest(dest.as_ref(), &keys, 3).unwrap().parent, 2);
    }

    /// The memory bound decides how many workers run: never more than
    /// fit, and a bound that fits none is refused with the numbers.
    #[test]
    fn the_memory_bound_caps_the_workers() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _, _) = tracked_volume(dir.path(), MIB);
        let plain: Arc<dyn Destination> =
            Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
        let up = |dest: &Arc<dyn Destination>, chunk: u32, workers: usize, memory: u64| {
            Uploader::new(
                t.clone(),
                dest.clone(),
                Keys::new("v").unwrap(),
                chunk,
                Codec::None,
            )
            .unwrap()
            .with_pool(workers, memory)
        };
        // A directory writes from the caller's bytes: three chunks each.
        assert_eq!(worker_memory(4 << 20, 0), 12 * MIB + (64 << 10));
        assert_eq!(up(&plain, 4 << 20, 32, 256 << 20).unwrap().workers(), 21);
        assert_eq!(up(&plain, 4 << 20, 4, 256 << 20).unwrap().workers(), 4);
        assert_eq!(up(&plain, 64 << 20, 8, 512 << 20).unwrap().workers(), 2);
        let e = up(&plain, 64 << 20, 8, 128 << 20).unwrap_err();
        assert!(
            matches!(e, UploadError::Memory { .. }) && e.to_string().contains("below"),
            "{e}"
        );
        // Sealing holds two more copies; a mirror puts to each member at once.
        let key = Arc::new(crate::seal::VolumeKey::parse(&[7; 32], "test").unwrap());
        let sealed = |name: &str| -> Arc<dyn Destination> {
            let d = DirDestination::open(&dir.path().join(name)).unwrap();
            Arc::new(crate::seal::Sealed::new(Arc::new(d), key.clone()))
        };
        let one = sealed("s1");
        assert_eq!(one.object_copies(), 2);
        assert_eq!(up(&one, 4 << 20, 32, 256 << 20).unwrap().workers(), 12);
        let mirror: Arc<dyn Destination> =
            Arc::new(crate::copies::Copies::new(vec![one, sealed("s2")]));
        assert_eq!(mirror.object_copies(), 4);
        assert_eq!(up(&mirror, 4 << 20, 32, 256 << 20).unwrap().workers(), 9);
    }
}

#[cfg(test)]
mod stuck_destination {
    //! Invariant 6 of DESIGN.md: the I/O path never waits on the network.
    use super::*;
    use crate::dest::{DirDestination, PutFilter};
    use foresnap_driver::tracking::tracker::Begin;
    use std::sync::mpsc;

    /// A destination whose puts hang until released: a network that
    /// stopped answering.
    #[derive(Debug)]
    struct Stuck {
        inner: DirDestination,
        gate: std::sync::Mutex<bool>,
        open: std::sync::Condvar,
        entered: std::sync::atomic::AtomicBool,
    }

    impl PutFilter for Stuck {
        fn inner(&self) -> &dyn Destination {
            &self.inner
        }

        fn filtered_put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
            self.entered.store(true, Ordering::SeqCst);
            let mut open = self.gate.lock().unwrap();
            while !*open {
                open = self.open.wait(open).unwrap();
            }
            self.inner.put(key, bytes)
        }
    }

    /// While an upload hangs in the destination, writes (including the
    /// copy-on-write of blocks the stuck snapshot still needs) and further
    /// closes complete; once the destination answers, every snapshot lands.
    #[test]
    fn writes_and_closes_go_on_while_the_destination_hangs() {
        let dir = tempfile::tempdir().unwrap();
        let (t, _, _) = super::tests::tracked_volume(dir.path(), 8 << 20);
        let stuck = Arc::new(Stuck {
            inner: DirDestination::open(&dir.path().join("dest")).unwrap(),
            gate: std::sync::Mutex::new(false),
            open: std::sync::Condvar::new(),
            entered: std::sync::atomic::AtomicBool::new(false),
        });
        let write = |t: &Tracker, block: u64| {
            let mut cow = Vec::new();
            assert_eq!(
                t.begin_write(0, block * 4096, 4096, false, false, &mut cow),
                Begin::Go
            );
            t.end_write(0, block * 4096, 4096);
        };
        for b in 0..64 {
            write(&t, b);
        }
        t.close().unwrap();
        let keys = Keys::new("v").unwrap();
        let up =
            Uploader::new(t.clone(), stuck.clone(), keys.clone(), 1 << 20, Codec::None).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let runner = {
            let stop = stop.clone();
            std::thread::spawn(move || up.run(&stop))
        };
        while !stuck.entered.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The uploader is inside a put that does not return. The I/O path
        // and the control path must not notice.
        let (tx, rx) = mpsc::channel();
        let io = {
            let t = t.clone();
            std::thread::spawn(move || {
                for b in 0..128 {
                    write(&t, b); // blocks 0..64 need copy-on-write
                }
                let c = t.close().unwrap();
                tx.send(c.epoch).unwrap();
            })
        };
        let closed = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("writes or a close waited for the hung destination");
        io.join().unwrap();
        assert_eq!(closed, 2);
        assert_eq!(t.status().cow_blocks, 64);
        // The destination answers again: both snapshots land.
        *stuck.gate.lock().unwrap() = true;
        stuck.open.notify_all();
        let deadline = Instant::now() + Duration::from_secs(20);
        while crate::restore::list_snapshots(stuck.as_ref(), &keys).unwrap() != vec![1, 2] {
            assert!(Instant::now() < deadline, "snapshots did not land");
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        runner.join().unwrap();
    }
}
