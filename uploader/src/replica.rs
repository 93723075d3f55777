//! Replication: an image kept equal to the newest snapshot of a volume at
//! its destinations, as each snapshot completes, so that a second host
//! holds a copy at most one snapshot behind (`foresnap replicate
//! --follow`).
//!
//! - **State.** `IMAGE.replica` (or a file of the caller's choice: a block
//!   device's cannot live beside it in `/dev`) records the volume's id and the snapshot
//!   the image equals, with a crc32c. It is replaced atomically (written
//!   beside, synced, renamed, directory synced), and only after the image
//!   itself is synced: the state never names a snapshot the image does not
//!   hold.
//! - **Applying a snapshot** ([`apply`]) writes only the chunks whose
//!   objects differ between the snapshot the image holds and the new one
//!   (objects are immutable, so equal references are equal bytes); a chunk
//!   the new snapshot stores nothing for is written as zeroes. When the
//!   old manifest is gone (pruned), every chunk is written.
//! - **The first snapshot** goes into a new sparse file (chunks with
//!   nothing stored stay holes) or a block device (every chunk written).
//!   The state names snapshot 0 until it is complete: a first apply cut
//!   short is redone whole.
//! - **A crash mid-way** leaves the image a mix of the two snapshots and
//!   the state at the old one: applying again from the old one rewrites
//!   every chunk that can differ, so the result is the new snapshot. The
//!   crash point `replica` (`FORESNAP_CRASH_AT=replica`) stops the process
//!   after the first chunk written, for the tests.
//! - **Data before the close.** The predictive uploader stores a
//!   snapshot's objects before its manifest; [`Prefetched`] fetches those
//!   objects while the follower waits, so applying the manifest when it
//!   comes reads them from memory.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dest::{DestError, Destination};
use crate::format::{Keys, Manifest};
use crate::restore::{SnapshotError, device_fits, for_each_chunk, read_chunk};

/// What `IMAGE.replica` records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    pub volume_id: [u8; 16],
    /// The snapshot the image equals.
    pub snapshot: u32,
}

const MAGIC: &str = "foresnap-replica 1";

/// Why a replica cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("{path}: {error}")]
    Io { path: String, error: io::Error },
    #[error(
        "{path}: damaged replica state ({why}); the image cannot be trusted to be any snapshot: replicate into a new file"
    )]
    Damaged { path: String, why: String },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(
        "{image} is a replica of another volume (id {}), not of {volume} (id {}); replicate into a new file",
        hex(have),
        hex(want)
    )]
    OtherVolume {
        image: String,
        volume: String,
        have: [u8; 16],
        want: [u8; 16],
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl ReplicaState {
    /// The state file of `image`.
    pub fn path(image: &Path) -> PathBuf {
        let mut p = image.as_os_str().to_owned();
        p.push(".replica");
        PathBuf::from(p)
    }

    fn encode(&self) -> String {
        let body = format!(
            "{MAGIC}\nvolume {}\nsnapshot {}\n",
            hex(&self.volume_id),
            self.snapshot
        );
        format!("{body}crc32c {:08x}\n", crc32c::crc32c(body.as_bytes()))
    }

    fn decode(text: &str) -> Result<ReplicaState, String> {
        let (body, crc_line) = text
            .trim_end_matches('\n')
            .rsplit_once('\n')
            .ok_or("too short")?;
        let body = format!("{body}\n");
        let crc = crc_line
            .strip_prefix("crc32c ")
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or("no crc32c line")?;
        if crc32c::crc32c(body.as_bytes()) != crc {
            return Err("its crc32c does not match".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("not {MAGIC:?}"));
        }
        let id = lines
            .next()
            .and_then(|l| l.strip_prefix("volume "))
            .filter(|h| h.len() == 32)
            .ok_or("no volume line")?;
        let mut volume_id = [0u8; 16];
        for (i, b) in volume_id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&id[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        let snapshot = lines
            .next()
            .and_then(|l| l.strip_prefix("snapshot "))
            .and_then(|s| s.parse().ok())
            .ok_or("no snapshot line")?;
        Ok(ReplicaState {
            volume_id,
            snapshot,
        })
    }

    /// The state in file `path` (as [`ReplicaState::path`] names it), or
    /// `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<ReplicaState>, ReplicaError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::decode(&text)
                .map(Some)
                .map_err(|why| ReplicaError::Damaged {
                    path: path.display().to_string(),
                    why,
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(ReplicaError::Io {
                path: path.display().to_string(),
                error,
            }),
        }
    }

    /// Replaces the state in file `path` with this one, atomically and
    /// durably.
    pub fn store(&self, path: &Path) -> Result<(), ReplicaError> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let err = |error| ReplicaError::Io {
            path: path.display().to_string(),
            error,
        };
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(self.encode().as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        sync_dir(path).map_err(err)
    }
}

/// Syncs the directory holding `path` (a rename there is durable after).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// What [`apply`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Chunks written with the new snapshot's data.
    pub chunks: u64,
    /// Of those, chunks written as zeroes (nothing stored for them).
    pub zeroed: u64,
    /// Bytes written to the image.
    pub bytes: u64,
    /// Chunks of the volume.
    pub total: u64,
}

/// What the image holds before an [`apply`].
#[derive(Debug, Clone, Copy)]
pub enum Holds<'m> {
    /// A new image, all zeroes: chunks with nothing stored are skipped.
    Zeroes,
    /// Unknown contents (an apply from `Zeroes` cut short, or a parent
    /// pruned since): every chunk is written.
    Anything,
    /// Exactly this snapshot.
    Snapshot(&'m Manifest),
}

/// Makes `image` (holding `from`) equal to snapshot `to`: writes the
/// chunks that can differ, up to `workers` at once, sets the image's size,
/// and syncs it. The caller then records `to` in the state.
/// `progress(done, total)` is called after each chunk written, `done`
/// ascending (as [`crate::restore::restore_image`]'s). Every object is
/// verified before use.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    dest: &dyn Destination,
    keys: &Keys,
    image: &File,
    image_path: &Path,
    from: Holds<'_>,
    to: &Manifest,
    workers: usize,
    progress: impl FnMut(u64, u64) + Send,
) -> Result<Applied, SnapshotError> {
    let target = |error| SnapshotError::Target {
        path: image_path.display().to_string(),
        error,
    };
    let changed: Vec<u64> = (0..to.chunks.len())
        .filter(|&c| match from {
            Holds::Zeroes => !to.chunks[c].is_empty(),
            Holds::Anything => true,
            // Objects are immutable: the same references, the same bytes.
            Holds::Snapshot(f) => {
                f.chunk_bytes != to.chunk_bytes || f.chunks.get(c) != Some(&to.chunks[c])
            }
        })
        .map(|c| c as u64)
        .collect();
    let is_file = image.metadata().map_err(target)?.is_file();
    if is_file {
        // Grown first, so that every chunk's write lands inside; shrunk
        // (below) only after the chunks are written.
        if image.metadata().map_err(target)?.len() < to.volume_bytes {
            image.set_len(to.volume_bytes).map_err(target)?;
        }
    } else {
        // A block device cannot grow: refused before a byte is written.
        device_fits(image, to.volume_bytes).map_err(target)?;
    }
    let total = changed.len() as u64;
    let (zeroed, bytes) = (AtomicU64::new(0), AtomicU64::new(0));
    let done = Mutex::new((0u64, progress));
    for_each_chunk(total, workers, Vec::new, |buf, i| {
        let c = changed[usize::try_from(i).unwrap_or(usize::MAX)];
        if !read_chunk(dest, keys, to, c, buf)? {
            zeroed.fetch_add(1, Ordering::Relaxed);
        }
        image
            .write_all_at(buf, c * u64::from(to.chunk_bytes))
            .map_err(target)?;
        bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        foresnap_driver::crashpoint::hit("replica");
        let mut d = done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        d.0 += 1;
        let n = d.0;
        (d.1)(n, total);
        Ok(())
    })?;
    if is_file && image.metadata().map_err(target)?.len() > to.volume_bytes {
        image.set_len(to.volume_bytes).map_err(target)?;
    }
    image.sync_all().map_err(target)?;
    Ok(Applied {
        chunks: total,
        zeroed: zeroed.into_inner(),
        bytes: bytes.into_inner(),
        total: to.chunks.len() as u64,
    })
}

/// Opens `image` for [`apply`]: read-write; a block device exclusively
/// (`O_EXCL`), so never while it is mounted or served.
pub fn open_image(image: &Path) -> Result<File, ReplicaError> {
    use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
    let err = |error| ReplicaError::Io {
        path: image.display().to_string(),
        error,
    };
    let mut o = OpenOptions::new();
    o.read(true).write(true);
    if std::fs::metadata(image)
        .map_err(err)?
        .file_type()
        .is_block_device()
    {
        o.custom_flags(libc::O_EXCL);
    }
    o.open(image).map_err(err)
}

/// A destination whose gets are served from objects fetched ahead
/// ([`Prefetched::fetch_ahead`]) when it has them: the objects a snapshot
/// stores before its close, fetched while the follower waits for its
/// manifest. Cached bytes are checked like any read (`get_valid`), so a
/// damaged one is fetched again.
#[derive(Debug)]
pub struct Prefetched<'d> {
    inner: &'d dyn Destination,
    cache: Mutex<HashMap<String, Vec<u8>>>,
    cached_bytes: AtomicU64,
    /// Gets answered from the cache.
    pub hits: AtomicU64,
}

impl<'d> Prefetched<'d> {
    pub fn new(inner: &'d dyn Destination) -> Self {
        Prefetched {
            inner,
            cache: Mutex::new(HashMap::new()),
            cached_bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Bytes held.
    pub fn held(&self) -> u64 {
        self.cached_bytes.load(Ordering::Relaxed)
    }

    /// Fetches the objects of snapshots after `applied` not yet held, up
    /// to `budget` bytes held in all: the objects (and parts) a snapshot
    /// stores before its manifest. Returns the objects fetched now.
    pub fn fetch_ahead(&self, keys: &Keys, applied: u32, budget: u64) -> Result<u64, DestError> {
        let mut fetched = 0;
        for key in self.inner.list(&keys.objects())? {
            if keys.snapshot_of(&key).is_none_or(|s| s <= applied)
                || self.cache().contains_key(&key)
            {
                continue;
            }
            if self.held() >= budget {
                break;
            }
            let bytes = match self.inner.get(&key) {
                Ok(b) => b,
                // Pruned or replaced meanwhile: the apply reads it itself.
                Err(DestError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            self.cached_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.cache().insert(key, bytes);
            fetched += 1;
        }
        Ok(fetched)
    }

    /// Drops what belongs to snapshot `applied` or older.
    pub fn forget_through(&self, keys: &Keys, applied: u32) {
        let mut c = self.cache();
        c.retain(|k, v| {
            let keep = keys.snapshot_of(k).is_some_and(|s| s > applied);
            if !keep {
                self.cached_bytes
                    .fetch_sub(v.len() as u64, Ordering::Relaxed);
            }
            keep
        });
    }
}

impl Destination for Prefetched<'_> {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        self.inner.put(key, bytes)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        self.get_valid(key, &|_| true)
    }
    fn get_valid(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        let held = self.cache().remove(key);
        if let Some(b) = held {
            self.cached_bytes
                .fetch_sub(b.len() as u64, Ordering::Relaxed);
            if valid(&b) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(b);
            }
        }
        self.inner.get_valid(key, valid)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), DestError> {
        self.inner.delete(key)
    }
    fn url(&self) -> String {
        self.inner.url()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;
    use crate::dest::tests::Faulty;
    use crate::format::Codec;
    use crate::restore::tests::{base, keys};
    use crate::restore::{SnapshotWriter, read_manifest};

    const MIB: usize = 1 << 20;

    /// Three snapshots of a 3-chunk volume: 1 full (chunk 1 never
    /// written), 2 a delta on chunk 0 and a new chunk 1, 3 a new chunk 2.
    /// The images at each close and the manifests.
    fn three_snapshots(dest: &dyn Destination) -> (Vec<Vec<u8>>, Vec<Manifest>) {
        let vol = 3 * MIB;
        let b = base(vol as u64);
        let mut image: Vec<u8> = (0..vol).map(|i| (i % 251) as u8).collect();
        image[MIB..2 * MIB].fill(0);
        let w = SnapshotWriter::new(dest, &keys(), &b, None, 1, 1000, Codec::Zstd(1));
        w.put_chunk(0, &image[..MIB]).unwrap();
        w.put_chunk(2, &image[2 * MIB..]).unwrap();
        let m1 = w.commit().unwrap();
        let i1 = image.clone();
        image[5 * 4096..6 * 4096].fill(0xEE);
        image[MIB..2 * MIB].fill(0x42);
        let w = SnapshotWriter::new(dest, &keys(), &b, Some(&m1), 2, 2000, Codec::Zstd(1));
        w.put_delta(0, &[(5, &image[5 * 4096..6 * 4096])]).unwrap();
        w.put_chunk(1, &image[MIB..2 * MIB]).unwrap();
        let m2 = w.commit().unwrap();
        let i2 = image.clone();
        image[2 * MIB..].fill(0x17);
        let w = SnapshotWriter::new(dest, &keys(), &b, Some(&m2), 3, 3000, Codec::Zstd(1));
        w.put_chunk(2, &image[2 * MIB..]).unwrap();
        let m3 = w.commit().unwrap();
        (vec![i1, i2, image], vec![m1, m2, m3])
    }

    #[test]
    fn the_state_round_trips_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("replica.img");
        let path = ReplicaState::path(&image);
        assert!(path.ends_with("replica.img.replica"));
        assert_eq!(ReplicaState::load(&path).unwrap(), None);
        let s = ReplicaState {
            volume_id: [0xA5; 16],
            snapshot: 42,
        };
        s.store(&path).unwrap();
        assert_eq!(ReplicaState::load(&path).unwrap(), Some(s));
        let text = std::fs::read_to_string(&path).unwrap();
        for bad in [
            text.replace("snapshot 42", "snapshot 43"),
            text.replace("foresnap-replica 1", "foresnap-replica 2"),
            text[..text.len() / 2].to_owned(),
            String::new(),
        ] {
            std::fs::write(&path, &bad).unwrap();
            let e = ReplicaState::load(&path).unwrap_err().to_string();
            assert!(e.contains("damaged replica state"), "{bad:?}: {e}");
        }
    }

    /// A new (empty) replica image in `dir`.
    struct Image {
        path: PathBuf,
        file: File,
    }

    impl Image {
        fn new(dir: &Path) -> Image {
            let path = dir.join("replica.img");
            drop(File::create_new(&path).unwrap());
            let file = open_image(&path).unwrap();
            Image { path, file }
        }

        /// [`apply`] with one worker and no progress.
        fn apply(
            &self,
            dest: &dyn Destination,
            from: Holds<'_>,
            to: &Manifest,
        ) -> Result<Applied, SnapshotError> {
            apply(
                dest,
                &keys(),
                &self.file,
                &self.path,
                from,
                to,
                1,
                |_, _| {},
            )
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }
    }

    /// Each apply writes only the chunks that changed, and the image then
    /// equals the snapshot; from a pruned parent, every chunk is written.
    #[test]
    fn applying_writes_the_changed_chunks_and_equals_each_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("dest")).unwrap();
        let (images, ms) = three_snapshots(&dest);
        let img = Image::new(dir.path());
        let a = img.apply(&dest, Holds::Zeroes, &ms[0]).unwrap();
        assert_eq!(
            (a.chunks, a.zeroed, a.total),
            (2, 0, 3),
            "chunk 1 stays a hole"
        );
        assert_eq!(img.bytes(), images[0]);
        // Two workers, with progress.
        let seen = AtomicU64::new(0);
        let a = apply(
            &dest,
            &keys(),
            &img.file,
            &img.path,
            Holds::Snapshot(&ms[0]),
            &ms[1],
            2,
            |d, t| {
                assert_eq!(t, 2);
                seen.fetch_max(d, Ordering::Relaxed);
            },
        )
        .unwrap();
        assert_eq!((a.chunks, a.zeroed), (2, 0), "chunks 0 and 1 changed");
        assert_eq!(seen.into_inner(), 2);
        assert_eq!(img.bytes(), images[1]);
        let a = img.apply(&dest, Holds::Snapshot(&ms[1]), &ms[2]).unwrap();
        assert_eq!(a.chunks, 1, "chunk 2 changed");
        assert_eq!(img.bytes(), images[2]);
        // Back to 1 with no parent known: everything is rewritten, the
        // chunk snapshot 1 stores nothing for as zeroes.
        let a = img.apply(&dest, Holds::Anything, &ms[0]).unwrap();
        assert_eq!((a.chunks, a.zeroed), (3, 1));
        assert_eq!(img.bytes(), images[0]);
    }

    /// An apply that fails part-way leaves a mix; applying again from the
    /// snapshot the state names gives the new snapshot exactly.
    #[test]
    fn an_apply_cut_short_is_finished_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("dest")).unwrap();
        let (images, ms) = three_snapshots(&dest);
        let img = Image::new(dir.path());
        img.apply(&dest, Holds::Zeroes, &ms[0]).unwrap();
        // Snapshot 2 needs chunk 0 (object and delta: 2 gets) and chunk 1.
        let cut = Faulty {
            gets_ok: AtomicU64::new(2),
            ..Faulty::new(&dest)
        };
        let e = img
            .apply(&cut, Holds::Snapshot(&ms[0]), &ms[1])
            .unwrap_err();
        assert!(e.to_string().contains("connection reset"), "{e}");
        let mixed = img.bytes();
        assert_ne!(mixed, images[0]);
        assert_ne!(mixed, images[1]);
        img.apply(&dest, Holds::Snapshot(&ms[0]), &ms[1]).unwrap();
        assert_eq!(img.bytes(), images[1]);
    }

    /// Objects stored before their snapshot's manifest are fetched ahead
    /// and used by the apply; a damaged one held is fetched again.
    #[test]
    fn objects_fetched_ahead_serve_the_apply() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("dest")).unwrap();
        let (images, ms) = three_snapshots(&dest);
        let ahead = Prefetched::new(&dest);
        // As if snapshot 1 were applied and 2 and 3's objects had come.
        assert_eq!(ahead.fetch_ahead(&keys(), 1, u64::MAX).unwrap(), 3);
        assert_eq!(
            ahead.fetch_ahead(&keys(), 1, u64::MAX).unwrap(),
            0,
            "held once"
        );
        // Snapshot 3's chunk 2 object, damaged while held.
        let key3 = keys().object(2, ms[2].chunks[2][0]);
        ahead.cache().get_mut(&key3).unwrap()[40] ^= 1;
        let img = Image::new(dir.path());
        img.apply(&dest, Holds::Zeroes, &ms[0]).unwrap();
        img.apply(&ahead, Holds::Snapshot(&ms[0]), &ms[1]).unwrap();
        assert_eq!(
            ahead.hits.load(Ordering::Relaxed),
            2,
            "chunk 0's delta, chunk 1"
        );
        img.apply(&ahead, Holds::Snapshot(&ms[1]), &ms[2]).unwrap();
        assert_eq!(
            ahead.hits.load(Ordering::Relaxed),
            2,
            "the damaged one was read again"
        );
        assert_eq!(img.bytes(), images[2]);
        assert_eq!(ahead.held(), 0);
        // A budget bounds what is held; forgetting drops the applied.
        let ahead = Prefetched::new(&dest);
        assert_eq!(ahead.fetch_ahead(&keys(), 0, 1).unwrap(), 1);
        ahead.forget_through(&keys(), 3);
        assert_eq!(ahead.held(), 0);
        assert_eq!(read_manifest(&dest, &keys(), 3).unwrap(), ms[2]);
    }
}
