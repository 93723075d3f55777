//! What a volume holds live at a destination, and the journals that make
//! deleting there crash-safe.
//!
//! Tiering ([`crate::tier`]) and retention ([`crate::retention`]) both
//! delete snapshots from a destination. Both decide what an object is
//! worth from the manifests *listed at that moment* ([`LiveIndex`]): an
//! object that a listed manifest references stays. Both first store a
//! journal of what they are about to delete, and a run finishes the
//! journals an interrupted one left before anything else.
//!
//! # Sealed journals
//!
//! A journal is text, each line ending in `\n`: a header (magic, format
//! version, the snapshot id its key ends in), the lines of its module's
//! format, then `crc32c XXXXXXXX`, the crc32c of every byte before that
//! line in 8 lowercase hex digits. [`seal`] adds that line and [`unseal`]
//! checks and removes it, so that a journal cut short or damaged anywhere
//! is refused whole.

use std::collections::{BTreeMap, BTreeSet};

use crate::dest::{DestError, Destination};
use crate::format::{Keys, Manifest};

/// Why the manifests at a destination could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum LiveError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("{dest}: {key} is damaged ({why})")]
    Damaged {
        dest: String,
        key: String,
        why: String,
    },
}

/// A manifest as stored, and decoded.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub bytes: Vec<u8>,
    pub manifest: Manifest,
}

/// Decodes a manifest that must be snapshot `id`'s.
pub(crate) fn decode_manifest(bytes: &[u8], id: u32) -> Result<Manifest, String> {
    let m = Manifest::decode(bytes).map_err(|e| e.to_string())?;
    if m.snapshot != id {
        return Err(format!("the manifest names snapshot {}", m.snapshot));
    }
    Ok(m)
}

/// The keys of the objects `m` references.
pub(crate) fn object_keys(keys: &Keys, m: &Manifest) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (c, refs) in m.chunks.iter().enumerate() {
        out.extend(refs.iter().map(|&r| keys.object(c as u64, r)));
    }
    out
}

/// The manifests of a volume at a destination, each read and verified
/// once per run (a manifest is written once and never changes, so what
/// was read stays true while the key is listed).
#[derive(Debug)]
pub(crate) struct LiveIndex<'a> {
    pub dest: &'a dyn Destination,
    pub keys: &'a Keys,
    read: BTreeMap<u32, Stored>,
}

impl<'a> LiveIndex<'a> {
    pub fn new(dest: &'a dyn Destination, keys: &'a Keys) -> Self {
        LiveIndex {
            dest,
            keys,
            read: BTreeMap::new(),
        }
    }

    /// The snapshots listed now, ascending.
    pub fn ids(&self) -> Result<Vec<u32>, LiveError> {
        Ok(self
            .keys
            .snapshot_ids(&self.dest.list(&self.keys.manifests())?))
    }

    /// Snapshot `id`'s manifest, verified.
    pub fn get(&mut self, id: u32) -> Result<&Stored, LiveError> {
        if !self.read.contains_key(&id) {
            let key = self.keys.manifest(id);
            let bytes = self
                .dest
                .get_valid(&key, &|b| decode_manifest(b, id).is_ok())?;
            let manifest = decode_manifest(&bytes, id).map_err(|why| LiveError::Damaged {
                dest: self.dest.url(),
                key,
                why,
            })?;
            self.read.insert(id, Stored { bytes, manifest });
        }
        Ok(&self.read[&id])
    }

    /// The objects the manifests of `ids` reference.
    pub fn referenced(
        &mut self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeSet<String>, LiveError> {
        let mut out = BTreeSet::new();
        for id in ids {
            let keys = self.keys;
            out.extend(object_keys(keys, &self.get(id)?.manifest));
        }
        Ok(out)
    }

    /// Drops what was read of `id` (its manifest is being deleted).
    pub fn forget(&mut self, id: u32) {
        self.read.remove(&id);
    }
}

/// `text` (lines each ending in `\n`) with its checksum line (module doc).
pub(crate) fn seal(mut text: String) -> Vec<u8> {
    debug_assert!(text.is_empty() || text.ends_with('\n'));
    let crc = crc32c::crc32c(text.as_bytes());
    text.push_str(&format!("crc32c {crc:08x}\n"));
    text.into_bytes()
}

/// The first line of a journal: its magic, its format version and the
/// snapshot id its key ends in (10 digits).
pub(crate) fn journal_header(magic: &str, version: u32, id: u32) -> String {
    format!("{magic} {version} {id:010}\n")
}

/// The lines of a sealed journal between its first line, which must be
/// `header` ([`journal_header`]), and its checksum line, once the checksum
/// is verified (module doc).
pub(crate) fn unseal<'a>(bytes: &'a [u8], header: &str) -> Result<Vec<&'a str>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_owned())?;
    let lines = text
        .strip_suffix('\n')
        .ok_or_else(|| "truncated (no final newline)".to_owned())?;
    let (body, last) = match lines.rfind('\n') {
        Some(i) => (&text[..=i], &lines[i + 1..]),
        None => ("", lines),
    };
    let crc = last
        .strip_prefix("crc32c ")
        .filter(|h| {
            h.len() == 8
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| "truncated (no checksum line)".to_owned())?;
    if crc != crc32c::crc32c(body.as_bytes()) {
        return Err("corrupt: checksum mismatch".into());
    }
    let Some(rest) = body.strip_prefix(header) else {
        let first = body.split('\n').next().unwrap_or("");
        return Err(format!(
            "its first line is {first:?}, not {:?} (another format version, or another key's journal)",
            header.trim_end()
        ));
    };
    Ok(rest
        .strip_suffix('\n')
        .map_or(Vec::new(), |b| b.split('\n').collect()))
}

/// The number a journal key under `dir` (a listing prefix) ends in: ten
/// digits, as [`Keys::tiering_journal`] and [`Keys::retention_journal`]
/// write it.
pub(crate) fn journal_id(dir: &str, key: &str) -> Option<u32> {
    let id = key.strip_prefix(dir)?;
    (id.len() == 10 && id.bytes().all(|b| b.is_ascii_digit()))
        .then(|| id.parse().ok())
        .flatten()
}

/// Test doubles and checks shared by the tests of the modules that delete.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

    use crate::dest::{DestError, Destination, DirDestination};
    use crate::format::Keys;
    use crate::restore::{read_manifest, restore_image};

    /// The volume of the tests.
    pub fn keys() -> Keys {
        Keys::new("vol").unwrap()
    }

    /// A destination that performs `budget` puts and deletes (shared with
    /// others) and then crashes: that operation and every later one fail.
    #[derive(Debug)]
    pub struct Crashing {
        pub inner: DirDestination,
        pub budget: Arc<AtomicI64>,
    }

    impl Crashing {
        fn crashed(&self, op: &'static str, key: &str) -> DestError {
            DestError::Remote {
                dest: self.inner.url(),
                op,
                key: key.to_owned(),
                why: "crashed".into(),
            }
        }
        fn mutate(&self, op: &'static str, key: &str) -> Result<(), DestError> {
            if self.budget.fetch_sub(1, Ordering::SeqCst) > 0 {
                Ok(())
            } else {
                Err(self.crashed(op, key))
            }
        }
        fn read(&self, op: &'static str, key: &str) -> Result<(), DestError> {
            if self.budget.load(Ordering::SeqCst) >= 0 {
                Ok(())
            } else {
                Err(self.crashed(op, key))
            }
        }
    }

    impl Destination for Crashing {
        fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
            self.mutate("put", key)?;
            self.inner.put(key, bytes)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
            self.read("get", key)?;
            self.inner.get(key)
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
            self.read("list", prefix)?;
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), DestError> {
            self.mutate("delete", key)?;
            self.inner.delete(key)
        }
        fn url(&self) -> String {
            self.inner.url()
        }
    }

    /// The object keys at `d`.
    pub fn objects_at(d: &dyn Destination) -> BTreeSet<String> {
        d.list(&keys().objects()).unwrap().into_iter().collect()
    }

    /// Every key at `d` with its bytes.
    pub fn contents(d: &dyn Destination) -> BTreeMap<String, Vec<u8>> {
        d.list("")
            .unwrap()
            .into_iter()
            .map(|k| {
                let b = d.get(&k).unwrap();
                (k, b)
            })
            .collect()
    }

    /// Restores snapshot `id` from `d` alone and compares it with `want`.
    pub fn assert_restores(d: &dyn Destination, id: u32, want: &[u8], scratch: &Path) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let m = read_manifest(d, &keys(), id).unwrap();
        let out = scratch.join(format!("r{id}-{}", N.fetch_add(1, Ordering::Relaxed)));
        restore_image(d, &keys(), &m, &out, 2, |_, _| {})
            .unwrap_or_else(|e| panic!("snapshot {id} at {}: {e}", d.url()));
        assert!(
            std::fs::read(&out).unwrap() == want,
            "snapshot {id} at {} differs",
            d.url()
        );
        std::fs::remove_file(&out).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sealed text round-trips; every bit flip and every cut is refused.
    #[test]
    fn sealed_journals_round_trip_and_refuse_damage() {
        let header = journal_header("MAGIC", 1, 7);
        assert_eq!(header, "MAGIC 1 0000000007\n");
        assert!(unseal(&seal(header.clone()), &header).unwrap().is_empty());
        let bytes = seal(format!("{header}one\ntwo\n"));
        assert_eq!(unseal(&bytes, &header).unwrap(), vec!["one", "two"]);
        let e = unseal(&bytes, &journal_header("MAGIC", 1, 8)).unwrap_err();
        assert!(e.contains("another key's"), "{e}");
        assert!(unseal(&seal(String::new()), &header).is_err());
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(unseal(&bad, &header).is_err(), "flip of bit {bit} accepted");
        }
        for cut in 0..bytes.len() {
            assert!(
                unseal(&bytes[..cut], &header).is_err(),
                "cut at {cut} accepted"
            );
        }
        assert_eq!(journal_id("v/t/", "v/t/0000000004"), Some(4));
        for bad in [
            "v/t/4",
            "v/t/00000000x4",
            "v/u/0000000004",
            "v/t/99999999999",
        ] {
            assert_eq!(journal_id("v/t/", bad), None, "{bad}");
        }
    }
}
