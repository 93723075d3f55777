//! Writing a snapshot (objects first, manifest last) and restoring one to
//! an image file, verifying every object before its bytes are used.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::dest::{DestError, Destination};
use crate::format::{
    Codec, FormatError, Keys, MAX_CHUNK_BYTES, Manifest, ObjectKind, ObjectRef, decode_object,
    encode_chunk, encode_delta,
};

/// Why a snapshot cannot be written or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("{key}: {source}")]
    Format { key: String, source: FormatError },
    #[error("{key}: {why}")]
    Mismatch { key: String, why: String },
    #[error("restore target {path}: {source}")]
    Target {
        path: String,
        source: std::io::Error,
    },
    #[error("chunk {chunk} is outside the volume ({chunks} chunks)")]
    NoSuchChunk { chunk: u64, chunks: u64 },
}

/// Builds one snapshot at a destination: data objects as they come, the
/// manifest last ([`SnapshotWriter::commit`]). Until the commit the
/// snapshot does not exist for readers. Object keys are deterministic, so
/// a writer restarted after a crash finds what it already stored and does
/// not store it again (an existing object is verified, not overwritten).
#[derive(Debug)]
pub struct SnapshotWriter<'d> {
    dest: &'d dyn Destination,
    keys: Keys,
    manifest: Manifest,
    codec: Codec,
    /// Objects stored by this writer (not found already there).
    pub stored: u64,
    /// Objects found already stored (a resumed upload).
    pub reused: u64,
    /// Bytes sent to the destination.
    pub bytes: u64,
    /// Delta chains folded into a fresh chunk object.
    pub compacted: u64,
    max_deltas: usize,
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
            manifest,
            codec,
            stored: 0,
            reused: 0,
            bytes: 0,
            compacted: 0,
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

    fn chunk_index(&self, chunk: u64) -> Result<usize, SnapshotError> {
        usize::try_from(chunk)
            .ok()
            .filter(|&c| c < self.manifest.chunks.len())
            .ok_or(SnapshotError::NoSuchChunk {
                chunk,
                chunks: self.manifest.chunks.len() as u64,
            })
    }

    fn blocks_per_chunk(&self) -> u32 {
        self.manifest.chunk_bytes / self.manifest.block_bytes
    }

    fn store(&mut self, chunk: u64, r: ObjectRef, bytes: &[u8]) -> Result<(), SnapshotError> {
        let key = self.keys.object(chunk, r);
        match self.dest.put(&key, bytes) {
            Ok(()) => {
                self.stored += 1;
                self.bytes += bytes.len() as u64;
                Ok(())
            }
            Err(DestError::AlreadyExists { .. }) => {
                // A previous attempt stored it: keep it if it is whole.
                let there = self.dest.get(&key)?;
                let o = decode_object(&there, MAX_CHUNK_BYTES).map_err(|source| {
                    SnapshotError::Format {
                        key: key.clone(),
                        source,
                    }
                })?;
                if o.chunk != chunk || o.kind != r.kind {
                    return Err(SnapshotError::Mismatch {
                        key,
                        why: "an existing object under this key is another chunk's".into(),
                    });
                }
                self.reused += 1;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Stores chunk `chunk` whole (`data`: its bytes).
    pub fn put_chunk(&mut self, chunk: u64, data: &[u8]) -> Result<(), SnapshotError> {
        let c = self.chunk_index(chunk)?;
        let r = ObjectRef {
            snapshot: self.manifest.snapshot,
            kind: ObjectKind::Chunk,
        };
        let bytes = encode_chunk(
            chunk,
            self.manifest.block_bytes,
            self.blocks_per_chunk(),
            data,
            self.codec,
        );
        self.store(chunk, r, &bytes)?;
        self.manifest.chunks[c] = vec![r];
        Ok(())
    }

    /// Stores the changed blocks of chunk `chunk` as a delta over the
    /// chunk's earlier objects.
    pub fn put_delta(&mut self, chunk: u64, blocks: &[(u32, &[u8])]) -> Result<(), SnapshotError> {
        let c = self.chunk_index(chunk)?;
        let r = ObjectRef {
            snapshot: self.manifest.snapshot,
            kind: ObjectKind::Delta,
        };
        let deltas = self.manifest.chunks[c]
            .iter()
            .filter(|x| x.kind == ObjectKind::Delta && **x != r)
            .count();
        if deltas >= self.max_deltas {
            return self.compact(chunk, blocks);
        }
        let bytes = encode_delta(
            chunk,
            self.manifest.block_bytes,
            self.blocks_per_chunk(),
            blocks,
            self.codec,
        );
        self.store(chunk, r, &bytes)?;
        let refs = &mut self.manifest.chunks[c];
        if !refs.contains(&r) {
            refs.push(r);
        }
        Ok(())
    }

    /// Folds chunk `chunk`'s objects and `blocks` into one chunk object.
    fn compact(&mut self, chunk: u64, blocks: &[(u32, &[u8])]) -> Result<(), SnapshotError> {
        let c = self.chunk_index(chunk)?;
        let own = self.manifest.snapshot;
        let refs: Vec<ObjectRef> = self.manifest.chunks[c]
            .iter()
            .copied()
            .filter(|r| r.snapshot != own)
            .collect();
        let mut buf = Vec::new();
        load_chunk(
            self.dest,
            &self.keys,
            &self.manifest,
            chunk,
            &refs,
            &mut buf,
        )?;
        let bs = self.manifest.block_bytes as usize;
        for &(b, data) in blocks {
            let off = b as usize * bs;
            let end = (off + bs).min(buf.len());
            if off < end {
                buf[off..end].copy_from_slice(&data[..end - off]);
            }
        }
        self.put_chunk(chunk, &buf)?;
        self.compacted += 1;
        Ok(())
    }

    /// Writes the manifest: the snapshot exists from now on.
    pub fn commit(self) -> Result<Manifest, SnapshotError> {
        let key = self.keys.manifest(self.manifest.snapshot);
        match self.dest.put(&key, &self.manifest.encode()) {
            Ok(()) => Ok(self.manifest),
            Err(DestError::AlreadyExists { .. }) => {
                let there = Manifest::decode(&self.dest.get(&key)?).map_err(|source| {
                    SnapshotError::Format {
                        key: key.clone(),
                        source,
                    }
                })?;
                if there == self.manifest {
                    Ok(self.manifest)
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

/// Reads and verifies the manifest of `snapshot`.
pub fn read_manifest(
    dest: &dyn Destination,
    keys: &Keys,
    snapshot: u32,
) -> Result<Manifest, SnapshotError> {
    let key = keys.manifest(snapshot);
    let m = Manifest::decode(&dest.get(&key)?).map_err(|source| SnapshotError::Format {
        key: key.clone(),
        source,
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
        let o = decode_object(&dest.get(&key)?, manifest.chunk_bytes).map_err(|source| {
            SnapshotError::Format {
                key: key.clone(),
                source,
            }
        })?;
        if o.chunk != chunk || o.kind != r.kind || o.block_bytes != manifest.block_bytes {
            return Err(SnapshotError::Mismatch {
                key,
                why: "the object is not the one the manifest names".into(),
            });
        }
        o.apply(buf).map_err(|source| SnapshotError::Format {
            key: key.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Restores `manifest`'s snapshot into the new file `out` (sparse: chunks
/// never written stay holes). `progress(done, total)` is called after each
/// chunk. Every object is verified before use; a damaged or missing object
/// fails the restore, naming it.
pub fn restore_image(
    dest: &dyn Destination,
    keys: &Keys,
    manifest: &Manifest,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), SnapshotError> {
    let target = |source| SnapshotError::Target {
        path: out.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(target)?;
    file.set_len(manifest.volume_bytes).map_err(target)?;
    let total = manifest.chunks.len() as u64;
    let mut buf = Vec::new();
    for (c, refs) in manifest.chunks.iter().enumerate() {
        let chunk = c as u64;
        if !refs.is_empty() {
            load_chunk(dest, keys, manifest, chunk, refs, &mut buf)?;
            file.write_all_at(&buf, chunk * u64::from(manifest.chunk_bytes))
                .map_err(target)?;
        }
        progress(chunk + 1, total);
    }
    file.sync_all().map_err(target)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;

    fn keys() -> Keys {
        Keys::new("vol").unwrap()
    }

    const MIB: usize = 1 << 20;

    fn base(volume_bytes: u64) -> Manifest {
        Manifest {
            volume_id: [9; 16],
            snapshot: 0,
            parent: 0,
            closed_ms: 0,
            volume_bytes,
            block_bytes: 4096,
            chunk_bytes: MIB as u32,
            chunks: Vec::new(),
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
        let mut w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 1000, Codec::Zstd(1));
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
        let mut w = SnapshotWriter::new(&dest, &keys(), &b, Some(&m1), 2, 2000, Codec::Zstd(1));
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
            restore_image(&dest, &keys(), m, &out, |done, total| {
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
        let key = keys().object(
            0,
            ObjectRef {
                snapshot: 2,
                kind: ObjectKind::Delta,
            },
        );
        let path = dir.path().join("dest").join(&key);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let e = restore_image(&dest, &keys(), &m2, &dir.path().join("bad"), |_, _| {}).unwrap_err();
        assert!(
            e.to_string().contains(&key) && e.to_string().contains("corrupt"),
            "{e}"
        );
        // A missing one too.
        std::fs::remove_file(&path).unwrap();
        let e =
            restore_image(&dest, &keys(), &m2, &dir.path().join("bad2"), |_, _| {}).unwrap_err();
        assert!(
            matches!(e, SnapshotError::Dest(DestError::NotFound { .. })),
            "{e}"
        );
    }

    /// Delta chains longer than the bound fold into a chunk object, built
    /// from the stored objects plus the new blocks; restores stay exact.
    #[test]
    fn long_delta_chains_are_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(dir.path()).unwrap();
        let b = base(2 * MIB as u64);
        let mut image: Vec<u8> = (0..2 * MIB).map(|i| (i % 253) as u8).collect();
        let mut w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::Zstd(1));
        w.put_chunk(0, &image[..MIB]).unwrap();
        w.put_chunk(1, &image[MIB..]).unwrap();
        let mut parent = w.commit().unwrap();
        for snap in 2..=8u32 {
            let blk = snap as usize * 3;
            image[blk * 4096..(blk + 1) * 4096].fill(snap as u8);
            let mut w =
                SnapshotWriter::new(&dest, &keys(), &b, Some(&parent), snap, 0, Codec::Zstd(1))
                    .with_max_deltas(3);
            w.put_delta(0, &[(blk as u32, &image[blk * 4096..(blk + 1) * 4096])])
                .unwrap();
            let compacted = w.compacted;
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
            restore_image(&dest, &keys(), &parent, &out, |_, _| {}).unwrap();
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
        let mut w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::None);
        w.put_chunk(0, &data).unwrap();
        w.put_chunk(1, &data).unwrap();
        drop(w); // crash before the manifest
        assert!(list_snapshots(&dest, &keys()).unwrap().is_empty());
        assert!(read_manifest(&dest, &keys(), 1).is_err());
        let mut w = SnapshotWriter::new(&dest, &keys(), &b, None, 1, 0, Codec::None);
        for c in 0..4 {
            w.put_chunk(c, &data).unwrap();
        }
        assert_eq!((w.stored, w.reused), (2, 2));
        w.commit().unwrap();
        assert!(read_manifest(&dest, &keys(), 1).is_ok());
        assert_eq!(list_snapshots(&dest, &keys()).unwrap(), vec![1]);
        // Chunks outside the volume are refused.
        let mut w = SnapshotWriter::new(&dest, &keys(), &b, None, 2, 0, Codec::None);
        assert!(matches!(
            w.put_chunk(4, &data),
            Err(SnapshotError::NoSuchChunk { .. })
        ));
    }
}
