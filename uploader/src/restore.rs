//! Writing a snapshot (objects first, manifest last) and restoring one to
//! an image file, verifying every object before its bytes are used.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dest::{DestError, Destination};
use crate::format::{
    Codec, FormatError, Keys, MAX_CHUNK_BYTES, Manifest, Object, ObjectKind, ObjectRef,
    decode_object, encode_chunk, encode_delta,
};

/// Why a snapshot cannot be written or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("{key}: {error}")]
    /// (`error` is not a `source`: the message already includes it.)
    Format { key: String, error: FormatError },
    #[error("{key}: {why}")]
    Mismatch { key: String, why: String },
    #[error("restore target {path}: {error}")]
    Target { path: String, error: std::io::Error },
    #[error("chunk {chunk} is outside the volume ({chunks} chunks)")]
    NoSuchChunk { chunk: u64, chunks: u64 },
}

/// Builds one snapshot at a destination: data objects as they come, the
/// manifest last ([`SnapshotWriter::commit`]). Until the commit the
/// snapshot does not exist for readers. Object keys are deterministic, so
/// a writer restarted after a crash finds what it already stored and does
/// not store it again (an existing object is verified, not overwritten).
///
/// The `put_*` methods take `&self`: upload workers store different chunks
/// of one snapshot at once (each chunk by one worker); only the manifest's
/// entry for the chunk is updated under a lock, after its object is stored.
#[derive(Debug)]
pub struct SnapshotWriter<'d> {
    dest: &'d dyn Destination,
    keys: Keys,
    manifest: Mutex<Manifest>,
    /// Immutable copies of the manifest's shape, read without the lock.
    snapshot: u32,
    block_bytes: u32,
    chunk_bytes: u32,
    chunks: usize,
    codec: Codec,
    stored: AtomicU64,
    reused: AtomicU64,
    bytes: AtomicU64,
    compacted: AtomicU64,
    max_deltas: usize,
}

/// What a [`SnapshotWriter`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteCounts {
    /// Objects stored by this writer (not found already there).
    pub stored: u64,
    /// Objects found already stored (a resumed upload).
    pub reused: u64,
    /// Bytes sent to the destination.
    pub bytes: u64,
    /// Delta chains folded into a fresh chunk object.
    pub compacted: u64,
}

/// Default bound on a chunk's delta chain: a restore reads at most this
/// many deltas over one chunk object.
pub const DEFAULT_MAX_DELTAS: usize = 8;

impl<'d> SnapshotWriter<'d> {
    /// A snapshot `snapshot` of the volume described by `parent` (its
    /// chunks start as the parent's), or a first, full snapshot when
    /// `parent` is `None` and `base` gives the volume's geometry.
    pub fn new(
        dest: &'d dyn Destination,
        keys: &Keys,
        base: &Manifest,
        parent: Option<&Manifest>,
        snapshot: u32,
        closed_ms: u64,
        codec: Codec,
    ) -> Self {
        let chunks = Manifest::chunk_count(base.volume_bytes, base.chunk_bytes);
        let mut manifest = Manifest {
            snapshot,
            parent: parent.map_or(0, |p| p.snapshot),
            closed_ms,
            chunks: vec![Vec::new(); usize::try_from(chunks).unwrap_or(0)],
            stripe: None,
            ..base.clone()
        };
        if let Some(p) = parent {
            for (dst, src) in manifest.chunks.iter_mut().zip(&p.chunks) {
                dst.clone_from(src);
            }
        }
        SnapshotWriter {
            dest,
            keys: keys.clone(),
            snapshot,
            block_bytes: manifest.block_bytes,
            chunk_bytes: manifest.chunk_bytes,
            chunks: manifest.chunks.len(),
            manifest: Mutex::new(manifest),
            codec,
            stored: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            compacted: AtomicU64::new(0),
            max_deltas: DEFAULT_MAX_DELTAS,
        }
    }

    /// Bounds delta chains to `n` deltas (at least 1): a delta that would
    /// make a chunk's chain longer folds the chain into a fresh chunk
    /// object instead (compaction), built from the stored objects.
    pub fn with_max_deltas(mut self, n: usize) -> Self {
        self.max_deltas = n.max(1);
        self
    }

    /// What this writer did so far.
    pub fn counts(&self) -> WriteCounts {
        WriteCounts {
            stored: self.stored.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            compacted: self.compacted.load(Ordering::Relaxed),
        }
    }

    fn chunk_index(&self, chunk: u64) -> Result<usize, SnapshotError> {
        usize::try_from(chunk)
            .ok()
            .filter(|&c| c < self.chunks)
            .ok_or(SnapshotError::NoSuchChunk {
                chunk,
                chunks: self.chunks as u64,
            })
    }

    fn blocks_per_chunk(&self) -> u32 {
        self.chunk_bytes / self.block_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Manifest> {
        // A worker that panicked left the manifest as it was before its
        // update (entries are replaced whole): still consistent.
        self.manifest.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, chunk: u64, r: ObjectRef, bytes: &[u8]) -> Result<(), SnapshotError> {
        let key = self.keys.object(chunk, r);
        match self.dest.put(&key, bytes) {
            Ok(()) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(DestError::AlreadyExists { .. }) => {
                // A previous attempt stored it (or its answer was lost
                // and the retry found it): keep it if it is whole.
                let whole = |b: &[u8]| decode_object(b, MAX_CHUNK_BYTES).is_ok();
                let there = self.dest.get_valid(&key, &whole)?;
                let o = decode_object(&there, MAX_CHUNK_BYTES).map_err(|source| {
                    SnapshotError::Format {
                        key: key.clone(),
                        error: source,
                    }
                })?;
                if o.chunk != chunk || o.kind != r.kind {
                    return Err(SnapshotError::Mismatch {
                        key,
                        why: "an existing object under this key is another chunk's".into(),
                    });
                }
                self.reused.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores chunk `chunk` whole (`data`: its bytes).
    pub fn put_chunk(&self, chunk: u64, data: &[u8]) -> Result<(), SnapshotError> {
        let c = self.chunk_index(chunk)?;
        let r = ObjectRef::own(self.snapshot, ObjectKind::Chunk);
        let bytes = encode_chunk(
            chunk,
            self.block_bytes,
            self.blocks_per_chunk(),
            data,
            self.codec,
        );
        self.store(chunk, r, &bytes)?;
        self.lock().chunks[c] = vec![r];
        Ok(())
    }

    /// Stores the changed blocks of chunk `chunk` as a delta over the
    /// chunk's earlier objects.
    pub fn put_delta(&self, chunk: u64, blocks: &[(u32, &[u8])]) -> Result<(), SnapshotError> {
        let c = self.chunk_index(chunk)?;
        let r = ObjectRef::own(self.snapshot, ObjectKind::Delta);
        let earlier: Vec<ObjectRef> = self.lock().chunks[c]
            .iter()
            .copied()
            .filter(|x| *x != r)
            .collect();
        let deltas = earlier
            .iter()
            .filter(|x| x.kind == ObjectKind::Delta)
            .count();
        if deltas >= self.max_deltas {
            return self.compact(chunk, &earlier, blocks);
        }
        let bytes = encode_delta(
            chunk,
            self.block_bytes,
            self.blocks_per_chunk(),
            blocks,
            self.codec,
        );
        self.store(chunk, r, &bytes)?;
        let mut m = self.lock();
        let refs = &mut m.chunks[c];
        if !refs.contains(&r) {
            refs.push(r);
        }
        Ok(())
    }

    /// Folds chunk `chunk`'s earlier objects and `blocks` into one chunk
    /// object.
    fn compact(
        &self,
        chunk: u64,
        earlier: &[ObjectRef],
        blocks: &[(u32, &[u8])],
    ) -> Result<(), SnapshotError> {
        // Everything before this snapshot's own objects: the parent's and
        // the parts stored before the close (a previous attempt's own
        // object is superseded by the chunk object made here).
        let own = self.snapshot;
        let refs: Vec<ObjectRef> = earlier
            .iter()
            .copied()
            .filter(|r| !(r.snapshot == own && r.part == 0))
            .collect();
        let shape = self.shape();
        let mut buf = Vec::new();
        load_chunk(self.dest, &self.keys, &shape, chunk, &refs, &mut buf)?;
        let bs = self.block_bytes as usize;
        for &(b, data) in blocks {
            let off = b as usize * bs;
            let end = (off + bs).min(buf.len());
            if off < end {
                buf[off..end].copy_from_slice(&data[..end - off]);
            }
        }
        self.put_chunk(chunk, &buf)?;
        self.compacted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Takes `parts` (stored before the close with [`store_part`], oldest
    /// first) into chunk `chunk`'s references, after the parent's objects
    /// (or instead of them, with `replace`: the first part holds every
    /// block of the chunk) and before this snapshot's own delta. A chain
    /// that grows past the delta bound is folded into a fresh chunk
    /// object, as for [`SnapshotWriter::put_delta`].
    pub fn adopt_parts(
        &self,
        chunk: u64,
        parts: &[ObjectRef],
        replace: bool,
    ) -> Result<(), SnapshotError> {
        let c = self.chunk_index(chunk)?;
        if parts
            .iter()
            .any(|r| r.part == 0 || r.snapshot != self.snapshot)
        {
            return Err(SnapshotError::Mismatch {
                key: self.keys.object(chunk, parts[0]),
                why: "not a part of this snapshot".into(),
            });
        }
        let chain = {
            let mut m = self.lock();
            let refs = &mut m.chunks[c];
            if replace {
                refs.clear();
            }
            for p in parts {
                if !refs.contains(p) {
                    refs.push(*p);
                }
            }
            refs.clone()
        };
        let deltas = chain.iter().filter(|x| x.kind == ObjectKind::Delta).count();
        if deltas > self.max_deltas {
            return self.compact(chunk, &chain, &[]);
        }
        Ok(())
    }

    /// The manifest's geometry without its chunk list (for [`load_chunk`]).
    fn shape(&self) -> Manifest {
        let m = self.lock();
        Manifest {
            volume_id: m.volume_id,
            snapshot: m.snapshot,
            parent: m.parent,
            closed_ms: m.closed_ms,
            volume_bytes: m.volume_bytes,
            block_bytes: m.block_bytes,
            chunk_bytes: m.chunk_bytes,
            chunks: Vec::new(),
            stripe: m.stripe,
        }
    }

    /// Writes the manifest: the snapshot exists from now on.
    pub fn commit(self) -> Result<Manifest, SnapshotError> {
        let manifest = self
            .manifest
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let key = self.keys.manifest(manifest.snapshot);
        match self.dest.put(&key, &manifest.encode()) {
            Ok(()) => Ok(manifest),
            Err(DestError::AlreadyExists { .. }) => {
                let whole = |b: &[u8]| Manifest::decode(b).is_ok();
                let there = self.dest.get_valid(&key, &whole)?;
                let there = Manifest::decode(&there).map_err(|source| SnapshotError::Format {
                    key: key.clone(),
                    error: source,
                })?;
                if there == manifest {
                    Ok(manifest)
                } else {
                    Err(SnapshotError::Mismatch {
                        key,
                        why: "a different manifest exists for this snapshot".into(),
                    })
                }
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Stores a part of snapshot `r.snapshot` before its close: the blocks
/// `blocks` (index within the chunk, content) of chunk `chunk`, as a delta
/// under part number `r.part`. Unlike the snapshot's own objects, an
/// existing part is never taken over (it may hold older content, stored
/// before a crash): [`DestError::AlreadyExists`] comes back, and the
/// caller stores under another part number. Returns the bytes sent.
#[allow(clippy::too_many_arguments)]
pub fn store_part(
    dest: &dyn Destination,
    keys: &Keys,
    chunk: u64,
    r: ObjectRef,
    block_bytes: u32,
    blocks_per_chunk: u32,
    blocks: &[(u32, &[u8])],
    codec: Codec,
) -> Result<u64, DestError> {
    debug_assert!(r.part != 0 && r.kind == ObjectKind::Delta);
    let bytes = encode_delta(chunk, block_bytes, blocks_per_chunk, blocks, codec);
    dest.put(&keys.object(chunk, r), &bytes)?;
    Ok(bytes.len() as u64)
}

/// Reads and verifies the manifest of `snapshot`.
pub fn read_manifest(
    dest: &dyn Destination,
    keys: &Keys,
    snapshot: u32,
) -> Result<Manifest, SnapshotError> {
    let key = keys.manifest(snapshot);
    let valid = |b: &[u8]| Manifest::decode(b).is_ok_and(|m| m.snapshot == snapshot);
    let m = Manifest::decode(&dest.get_valid(&key, &valid)?).map_err(|source| {
        SnapshotError::Format {
            key: key.clone(),
            error: source,
        }
    })?;
    if m.snapshot != snapshot {
        return Err(SnapshotError::Mismatch {
            key,
            why: "the manifest names another snapshot".into(),
        });
    }
    Ok(m)
}

/// The snapshot ids of the volume at `dest`, ascending (complete snapshots
/// only: a snapshot exists once its manifest does).
pub fn list_snapshots(dest: &dyn Destination, keys: &Keys) -> Result<Vec<u32>, SnapshotError> {
    Ok(keys.snapshot_ids(&dest.list(&keys.manifests())?))
}

/// Whether decoded object `o` is the one manifest `m` names as reference
/// `r` of chunk `chunk` (its chunk, kind and block size).
pub fn is_named(o: &Object, m: &Manifest, chunk: u64, r: ObjectRef) -> bool {
    o.chunk == chunk && o.kind == r.kind && o.block_bytes == m.block_bytes
}

/// `bytes` decoded (both checksums verified) if they are the object
/// manifest `m` names as reference `r` of chunk `chunk`; else why not.
pub fn decode_named(
    bytes: &[u8],
    m: &Manifest,
    chunk: u64,
    r: ObjectRef,
) -> Result<Object, String> {
    let o = decode_object(bytes, m.chunk_bytes).map_err(|e| e.to_string())?;
    if !is_named(&o, m, chunk, r) {
        return Err("not the object the manifest names (chunk, kind or block size differ)".into());
    }
    Ok(o)
}

/// Builds chunk `chunk` of a volume shaped like `manifest` from its
/// objects `refs` (oldest first) into `buf`, verifying each.
fn load_chunk(
    dest: &dyn Destination,
    keys: &Keys,
    manifest: &Manifest,
    chunk: u64,
    refs: &[ObjectRef],
    buf: &mut Vec<u8>,
) -> Result<(), SnapshotError> {
    let len = usize::try_from(manifest.chunk_len(chunk)).unwrap_or(0);
    buf.clear();
    buf.resize(len, 0);
    for &r in refs {
        let key = keys.object(chunk, r);
        // With several copies, a damaged one is passed over for another
        // (`get_valid`); the object decoded by the check is kept.
        let decoded = std::cell::RefCell::new(None);
        let bytes = dest.get_valid(&key, &|b| match decode_object(b, manifest.chunk_bytes) {
            Ok(o) if is_named(&o, manifest, chunk, r) => {
                *decoded.borrow_mut() = Some(o);
                true
            }
            _ => false,
        })?;
        let o = match decoded.into_inner() {
            Some(o) => o,
            None => decode_object(&bytes, manifest.chunk_bytes).map_err(|source| {
                SnapshotError::Format {
                    key: key.clone(),
                    error: source,
                }
            })?,
        };
        if !is_named(&o, manifest, chunk, r) {
            return Err(SnapshotError::Mismatch {
                key,
                why: "the object is not the one the manifest names".into(),
            });
        }
        o.apply(buf).map_err(|source| SnapshotError::Format {
            key: key.clone(),
            error: source,
        })?;
    }
    Ok(())
}

/// Chunk `chunk` of `manifest`'s snapshot into `buf` (resized to the
/// chunk's length), every object verified; `false` when the snapshot
/// stores nothing for it (the chunk is zeroes). For a lazy restore.
pub fn read_chunk(
    dest: &dyn Destination,
    keys: &Keys,
    manifest: &Manifest,
    chunk: u64,
    buf: &mut Vec<u8>,
) -> Result<bool, SnapshotError> {
    let refs = usize::try_from(chunk)
        .ok()
        .and_then(|c| manifest.chunks.get(c))
        .map_or(&[][..], Vec::as_slice);
    load_chunk(dest, keys, manifest, chunk, refs, buf)?;
    Ok(!refs.is_empty())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `work(worker, chunk)` for every chunk index below `chunks` on up
/// to `workers` threads, each chunk once, and stops at the first error.
pub(crate) fn for_each_chunk<S: Send>(
    chunks: u64,
    workers: usize,
    scratch: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, u64) -> Result<(), SnapshotError> + Sync,
) -> Result<(), SnapshotError> {
    let next = AtomicU64::new(0);
    let failed: Mutex<Option<SnapshotError>> = Mutex::new(None);
    let run = || {
        let mut s = scratch();
        loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            if let Err(e) = work(&mut s, c) {
                next.store(u64::MAX / 2, Ordering::Relaxed);
                lock(&failed).get_or_insert(e);
                break;
            }
        }
    };
    let workers = workers.clamp(1, usize::try_from(chunks).unwrap_or(usize::MAX).max(1));
    std::thread::scope(|s| {
        for _ in 1..workers {
            s.spawn(run);
        }
        run();
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// A block device, which cannot grow, holds `volume_bytes`; else why not.
pub(crate) fn device_fits(mut device: &File, volume_bytes: u64) -> io::Result<()> {
    let size = device.seek(SeekFrom::End(0))?;
    if size < volume_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the device has {size} bytes, the snapshot {volume_bytes}"),
        ));
    }
    Ok(())
}

/// Opens the restore target: a new file (sparse: chunks never written stay
/// holes), or an existing block device at least as large as the volume
/// (opened exclusively, so not while it is mounted; every chunk is
/// written, unwritten ones as zeroes). An existing file is never
/// overwritten. Returns the file and whether unwritten chunks need zeroes.
fn open_target(out: &Path, volume_bytes: u64) -> Result<(File, bool), SnapshotError> {
    let target = |error| SnapshotError::Target {
        path: out.display().to_string(),
        error,
    };
    match std::fs::metadata(out) {
        Ok(md) if md.file_type().is_block_device() => {
            let f = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_EXCL)
                .open(out)
                .map_err(target)?;
            device_fits(&f, volume_bytes).map_err(target)?;
            Ok((f, true))
        }
        Ok(_) => Err(target(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "exists; restore writes a new file or a whole block device, never over a file",
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(out)
                .map_err(target)?;
            f.set_len(volume_bytes).map_err(target)?;
            Ok((f, false))
        }
        Err(e) => Err(target(e)),
    }
}

/// Restores `manifest`'s snapshot into `out` (a new sparse file, or a
/// block device at least as large as the volume, opened exclusively) with up
/// to `workers` threads fetching chunks at once. `progress(done, total)` is
/// called after each chunk, `done` ascending. Every object is verified
/// before use; a damaged or missing object fails the restore, naming it,
/// and a new file made for it is removed (a block device holds a partial
/// image then).
pub fn restore_image(
    dest: &dyn Destination,
    keys: &Keys,
    manifest: &Manifest,
    out: &Path,
    workers: usize,
    progress: impl FnMut(u64, u64) + Send,
) -> Result<(), SnapshotError> {
    let target = |error| SnapshotError::Target {
        path: out.display().to_string(),
        error,
    };
    let (file, zero_fill) = open_target(out, manifest.volume_bytes)?;
    let total = manifest.chunks.len() as u64;
    let done = Mutex::new((0u64, progress));
    let result = for_each_chunk(total, workers, Vec::new, |buf, chunk| {
        let refs = &manifest.chunks[usize::try_from(chunk).unwrap_or(usize::MAX)];
        if !refs.is_empty() || zero_fill {
            load_chunk(dest, keys, manifest, chunk, refs, buf)?;
            file.write_all_at(buf, chunk * u64::from(manifest.chunk_bytes))
                .map_err(target)?;
        }
        let mut d = lock(&done);
        d.0 += 1;
        let n = d.0;
        (d.1)(n, total);
        Ok(())
    })
    .and_then(|()| file.sync_all().map_err(target));
    if result.is_err() && !zero_fill {
        // A new file that is not the snapshot must not be left to pass for
        // it. (A block device keeps what was written: say so.)
        let _ = std::fs::remove_file(out);
    }
    result
}

/// One damaged or missing object found by [`verify_snapshots`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The object's key.
    pub key: String,
    /// The snapshots whose manifests name it.
    pub snapshots: Vec<u32>,
    /// What is wrong: missing, corrupt (and how), not the object named.
    pub what: String,
}

/// What [`verify_snapshots`] checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Distinct objects read and checked.
    pub objects: u64,
    /// Bytes read.
    pub bytes: u64,
    pub problems: Vec<Problem>,
}

/// Reads every object the `manifests` (snapshots of one volume) name,
/// each once however many snapshots share it, with up to `workers`
/// threads, and checks its checksums, that it is the object the manifest
/// names, and that it applies to its chunk. Damage is collected, not
/// fatal: the report names every missing or corrupt object. Only a
/// destination that cannot be read at all (another error than a missing
/// key) stops the check with an error.
pub fn verify_snapshots(
    dest: &dyn Destination,
    keys: &Keys,
    manifests: &[Manifest],
    workers: usize,
    progress: impl FnMut(u64, u64) + Send,
) -> Result<VerifyReport, SnapshotError> {
    let mut objects: BTreeMap<(u64, ObjectRef), (usize, Vec<u32>)> = BTreeMap::new();
    for (i, m) in manifests.iter().enumerate() {
        for (c, refs) in m.chunks.iter().enumerate() {
            for &r in refs {
                objects
                    .entry((c as u64, r))
                    .or_insert_with(|| (i, Vec::new()))
                    .1
                    .push(m.snapshot);
            }
        }
    }
    let objects: Vec<_> = objects.into_iter().collect();
    let total = objects.len() as u64;
    let report = Mutex::new((VerifyReport::default(), 0u64, progress));
    for_each_chunk(total, workers, Vec::new, |buf, n| {
        let ((chunk, r), (i, snaps)) = &objects[usize::try_from(n).unwrap_or(usize::MAX)];
        let m = &manifests[*i];
        let key = keys.object(*chunk, *r);
        // Read with the check: bytes damaged on the way are read again
        // (`get_valid`), only damage that stays is reported.
        let buf = std::cell::RefCell::new(buf);
        let verdict = std::cell::RefCell::new(None);
        let got = dest.get_valid(&key, &|b| {
            let v = check_object(m, *chunk, *r, b, &mut buf.borrow_mut());
            let ok = v.is_ok();
            *verdict.borrow_mut() = Some(v);
            ok
        });
        let (bytes, what) = match got {
            Ok(bytes) => {
                // The check's last verdict is on the bytes returned when
                // it passed; else check those bytes now.
                let what = match verdict.into_inner() {
                    Some(Ok(())) => None,
                    _ => check_object(m, *chunk, *r, &bytes, &mut buf.borrow_mut()).err(),
                };
                (bytes.len() as u64, what)
            }
            Err(DestError::NotFound { .. }) => (0, Some("missing".to_owned())),
            Err(DestError::Damaged { why, .. }) => (0, Some(why)),
            Err(e) => return Err(e.into()),
        };
        let mut g = lock(&report);
        g.0.objects += 1;
        g.0.bytes += bytes;
        if let Some(what) = what {
            g.0.problems.push(Problem {
                key,
                snapshots: snaps.clone(),
                what,
            });
        }
        g.1 += 1;
        let done = g.1;
        (g.2)(done, total);
        Ok(())
    })?;
    let mut report = report.into_inner().unwrap_or_else(|p| p.into_inner()).0;
    report.problems.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

/// Checks one stored object against the manifest entry naming it.
fn check_object(
    m: &Manifest,
    chunk: u64,
    r: ObjectRef,
    bytes: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let o = decode_named(bytes, m, chunk, r)?;
    buf.clear();
    buf.resize(usize::try_from(m.chunk_len(chunk)).unwrap_or(0), 0);
    o.apply(buf).map_err(|e| e.to_string())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use crate::dest::DirDestination;

    /// The volume the tests store (shared by the modules' tests).
    pub(crate) fn keys() -> Keys {
        Keys::new("vol").unwrap()
    }

    const MIB: usize = 1 << 20;

    /// A volume of `volume_bytes` in 1 MiB chunks of 4 KiB blocks.
    pub(crate) fn base(volume_bytes: u64) -> Manifest {
        Manifest {
            volume_id: [9; 16],
            snapshot: 0,
            parent: 0,
            closed_ms: 0,
            volume_bytes,
            block_bytes: 4096,
            chunk_bytes: MIB as u32,
            chunks: Vec::new(),
            stripe: None,
        }
    }

    /// Snapshot 1 full, snapshot 2 a delta on one chunk and a new chunk:
    /// each restores to exactly the image at its close; damage is refused.
    #[test]
    fn incremental_snapshots_restore_exactly_and_refuse_damage() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("dest")).unwrap();
        let vol = (3 * MIB + 8192) as u64; // last chunk: 2 blocks
        let mut image: Vec<u8> = (0..vol as usize).map(|i| (i % 251) as u8).collect();
        image[MIB..2 * MIB].fill(0); // chunk 1 never written
        let b = base(vol);
        let w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 1000, Codec::Zstd(1));
        for c in [0usize, 2, 3] {
            let end = ((c + 1) * MIB).min(vol as usize);
            w.put_chunk(c as u64, &image[c * MIB..end]).unwrap();
        }
        let m1 = w.commit().unwrap();
        let image1 = image.clone();

        // Snapshot 2: blocks 3 and 200 of chunk 0 change, chunk 1 is new.
        image[3 * 4096..4 * 4096].fill(0xEE);
        image[200 * 4096..201 * 4096].fill(0xDD);
        image[MIB..2 * MIB].fill(0x42);
        let w = SnapshotWriter::new(&dest, &keys(), &b, Some(&m1), 2, 2000, Codec::Zstd(1));
        w.put_delta(
            0,
            &[
                (3, &image[3 * 4096..4 * 4096]),
                (200, &image[200 * 4096..201 * 4096]),
            ],
        )
        .unwrap();
        w.put_chunk(1, &image[MIB..2 * MIB]).unwrap();
        let m2 = w.commit().unwrap();
        assert_eq!(m2.parent, 1);
        assert_eq!(m2.chunks[0].len(), 2, "chunk object then delta");

        for (m, want) in [(&m1, &image1), (&m2, &image)] {
            let again = read_manifest(&dest, &keys(), m.snapshot).unwrap();
            assert_eq!(&again, m);
            let out = dir.path().join(format!("restore{}", m.snapshot));
            let mut calls = 0;
            restore_image(&dest, &keys(), m, &out, 2, |done, total| {
                calls += 1;
                assert_eq!(total, 4);
                assert_eq!(done, calls);
            })
            .unwrap();
            assert_eq!(
                &std::fs::read(&out).unwrap(),
                want,
                "snapshot {}",
                m.snapshot
            );
        }

        // A damaged object fails the restore and names the object.
        let key = keys().object(0, ObjectRef::own(2, ObjectKind::Delta));
        let path = dir.path().join("dest").join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let e =
            restore_image(&dest, &keys(), &m2, &dir.path().join("bad"), 2, |_, _| {}).unwrap_err();
        assert!(
            e.to_string().contains(&key) && e.to_string().contains("corrupt"),
            "{e}"
        );
        // A missing one too.
        std::fs::remove_file(&path).unwrap();
        let e =
            restore_image(&dest, &keys(), &m2, &dir.path().join("bad2"), 2, |_, _| {}).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Dest(DestError::NotFound { .. })),
            "{e}"
        );
    }

    /// verify reads each object once, however many snapshots share it,
    /// and names every damaged or missing one with the snapshots that
    /// need it; a clean volume reports nothing.
    #[test]
    fn verify_names_every_damaged_or_missing_object() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(dir.path()).unwrap();
        let b = base(3 * MIB as u64);
        let image: Vec<u8> = (0..3 * MIB).map(|i| (i % 241) as u8).collect();
        let w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::Zstd(1));
        for c in 0..3 {
            w.put_chunk(c as u64, &image[c * MIB..(c + 1) * MIB])
                .unwrap();
        }
        let m1 = w.commit().unwrap();
        let w = SnapshotWriter::new(&dest, &keys(), &b, Some(&m1), 2, 0, Codec::Zstd(1));
        w.put_delta(1, &[(7, &image[..4096])]).unwrap();
        let m2 = w.commit().unwrap();
        let both = [m1.clone(), m2.clone()];
        let r = verify_snapshots(&dest, &keys(), &both, 3, |_, _| {}).unwrap();
        assert_eq!((r.objects, r.problems.len()), (4, 0), "{r:?}");

        let obj = |c: u64, snapshot: u32, kind: ObjectKind| {
            keys().object(c, ObjectRef::own(snapshot, kind))
        };
        let flip = obj(0, 1, ObjectKind::Chunk);
        let cut = obj(1, 2, ObjectKind::Delta);
        let gone = obj(2, 1, ObjectKind::Chunk);
        let path = |k: &str| dir.path().join(k);
        let mut bytes = std::fs::read(path(&flip)).unwrap();
        bytes[100] ^= 0x10;
        std::fs::remove_file(path(&flip)).unwrap();
        std::fs::write(path(&flip), &bytes).unwrap();
        let bytes = std::fs::read(path(&cut)).unwrap();
        std::fs::remove_file(path(&cut)).unwrap();
        std::fs::write(path(&cut), &bytes[..bytes.len() - 9]).unwrap();
        std::fs::remove_file(path(&gone)).unwrap();

        let r = verify_snapshots(&dest, &keys(), &both, 2, |_, _| {}).unwrap();
        let found: Vec<(&str, &[u32], bool)> = r
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.snapshots.as_slice(), p.what.is_empty()))
            .collect();
        assert_eq!(
            found,
            vec![
                (flip.as_str(), &[1u32, 2][..], false),
                (cut.as_str(), &[2u32][..], false),
                (gone.as_str(), &[1u32, 2][..], false),
            ],
            "{r:?}"
        );
        assert!(r.problems[2].what.contains("missing"), "{r:?}");
        assert!(r.problems[0].what.contains("corrupt"), "{r:?}");
        // Snapshot 2 alone needs all three too; restore refuses it and
        // leaves no file behind.
        let out = dir.path().join("img");
        let e = restore_image(&dest, &keys(), &m2, &out, 2, |_, _| {}).unwrap_err();
        assert!(!out.exists(), "a failed restore left {e}'s file");
    }

    /// Delta chains longer than the bound fold into a chunk object, built
    /// from the stored objects plus the new blocks; restores stay exact.
    #[test]
    fn long_delta_chains_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(dir.path()).unwrap();
        let b = base(2 * MIB as u64);
        let mut image: Vec<u8> = (0..2 * MIB).map(|i| (i % 253) as u8).collect();
        let w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::Zstd(1));
        w.put_chunk(0, &image[..MIB]).unwrap();
        w.put_chunk(1, &image[MIB..]).unwrap();
        let mut parent = w.commit().unwrap();
        for snap in 2..=8u32 {
            let blk = snap as usize * 3;
            image[blk * 4096..(blk + 1) * 4096].fill(snap as u8);
            let w = SnapshotWriter::new(&dest, &keys(), &b, Some(&parent), snap, 0, Codec::Zstd(1))
                .with_max_deltas(3);
            w.put_delta(0, &[(blk as u32, &image[blk * 4096..(blk + 1) * 4096])])
                .unwrap();
            let compacted = w.counts().compacted;
            parent = w.commit().unwrap();
            // Chains: 1 chunk + up to 3 deltas, then a fresh chunk object.
            assert!(
                parent.chunks[0].len() <= 4,
                "snapshot {snap}: {:?}",
                parent.chunks[0]
            );
            assert_eq!(
                compacted == 1,
                parent.chunks[0].len() == 1,
                "snapshot {snap}"
            );
            let out = dir.path().join(format!("r{snap}"));
            restore_image(&dest, &keys(), &parent, &out, 2, |_, _| {}).unwrap();
            assert!(std::fs::read(&out).unwrap() == image, "snapshot {snap}");
        }
        assert_eq!(
            parent.chunks[1].len(),
            1,
            "untouched chunk keeps its object"
        );
    }

    /// A writer interrupted before its commit and started again stores
    /// only what is missing; nothing is listed as a snapshot before the
    /// manifest.
    #[test]
    fn an_interrupted_snapshot_resumes_without_uploading_twice() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(dir.path()).unwrap();
        let b = base(4 * MIB as u64);
        let data = vec![7u8; MIB];
        let w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::None);
        w.put_chunk(0, &data).unwrap();
        w.put_chunk(1, &data).unwrap();
        drop(w); // crash before the manifest
        assert!(list_snapshots(&dest, &keys()).unwrap().is_empty());
        assert!(read_manifest(&dest, &keys(), 1).is_err());
        let w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::None);
        for c in 0..4 {
            w.put_chunk(c, &data).unwrap();
        }
        assert_eq!((w.counts().stored, w.counts().reused), (2, 2));
        w.commit().unwrap();
        assert!(read_manifest(&dest, &keys(), 1).is_ok());
        assert_eq!(list_snapshots(&dest, &keys()).unwrap(), vec![1]);
        // Chunks outside the volume are refused.
        let w = SnapshotWriter::new(&dest, &keys(), &b, None, 2, 0, Codec::None);
        assert!(matches!(
            w.put_chunk(4, &data),
            Err(SnapshotError::NoSuchChunk { .. })
        ));
    }
}
