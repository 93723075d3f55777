//! Destinations: where snapshot objects live. A destination stores
//! immutable objects under keys; a key is written once, whole, and never
//! overwritten, so that what a reader finds under a key is what was written
//! there (and a manifest, written last, exists only once it is durable).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a destination operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DestError {
    #[error("{dest}: no object {key}")]
    NotFound { dest: String, key: String },
    #[error("{dest}: object {key} exists already; objects are never overwritten")]
    AlreadyExists { dest: String, key: String },
    #[error(
        "invalid object key {0:?}: use letters, digits, '.', '_', '-' and '/' between non-empty parts"
    )]
    BadKey(String),
    /// An object store answered with an error, or could not be reached
    /// (after the retries of its client).
    #[error("{dest}: {op} {key}: {why}")]
    Remote {
        dest: String,
        op: &'static str,
        key: String,
        why: String,
    },
    /// An encrypted volume's object that does not authenticate
    /// ([`crate::seal`]): reported like any damaged object.
    #[error("{dest}: {key}: {why}")]
    Damaged {
        dest: String,
        key: String,
        why: String,
    },
    /// The volume key does not fit what is stored: another key's objects,
    /// an unencrypted object in an encrypted volume, or no key for an
    /// encrypted one ([`crate::seal`]). Nothing can be read: fatal.
    #[error("{dest}: {key}: {why}")]
    Key {
        dest: String,
        key: String,
        why: String,
    },
    // `error`, not `source`: the message includes it (no repeat in chains).
    #[error("{dest}: {op} {key}: {error}")]
    Io {
        dest: String,
        op: &'static str,
        key: String,
        error: io::Error,
    },
}

/// An object store.
pub trait Destination: Send + Sync + std::fmt::Debug {
    /// Stores `bytes` under `key`, durably, unless the key exists
    /// ([`DestError::AlreadyExists`]: nothing is overwritten).
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError>;
    /// The bytes stored under `key`.
    fn get(&self, key: &str) -> Result<Vec<u8>, DestError>;
    /// The bytes stored under `key`, for a reader that checks them with
    /// `valid` (a checksum): a destination that holds several copies
    /// ([`crate::copies::Copies`]) returns a copy that passes, trying the
    /// others when one does not; one whose reads can be damaged on the way
    /// (the S3 destination) reads again. Bytes that fail every try are
    /// returned as they are: the caller's check reports the damage.
    fn get_valid(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        let _ = valid;
        self.get(key)
    }
    /// Keys under `prefix` (a key prefix ending in '/'), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, DestError>;
    /// Removes `key`; a missing key is not an error.
    fn delete(&self, key: &str) -> Result<(), DestError>;
    /// For messages: `file:///...`, `s3://...`.
    fn url(&self) -> String;
    /// Whole copies of an object this destination holds in memory at
    /// once, beyond the caller's bytes, while a put or get runs (an
    /// encrypting destination's ciphertext, say): the upload engine's
    /// memory bound counts them for each worker.
    fn object_copies(&self) -> u64 {
        0
    }
}

/// A destination in front of another that changes only what a put does
/// (a bandwidth cap, a test's fault): gets, lists, deletes and the URL
/// pass through to [`PutFilter::inner`].
pub trait PutFilter: Send + Sync + std::fmt::Debug {
    /// The destination behind.
    fn inner(&self) -> &dyn Destination;
    /// [`Destination::put`], filtered.
    fn filtered_put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError>;
}

impl<T: PutFilter> Destination for T {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        self.filtered_put(key, bytes)
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        self.inner().get(key)
    }
    fn get_valid(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        self.inner().get_valid(key, valid)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
        self.inner().list(prefix)
    }
    fn delete(&self, key: &str) -> Result<(), DestError> {
        self.inner().delete(key)
    }
    fn url(&self) -> String {
        self.inner().url()
    }
    fn object_copies(&self) -> u64 {
        self.inner().object_copies()
    }
}

/// Proves that whoever opened `dest` may keep volume `keys`' snapshots
/// there: puts a probe object under the volume ([`Keys::probe`]), reads it
/// back whole, then deletes it. Writing and reading are what uploads and
/// restores need; a probe that cannot be deleted is left behind (no
/// listing of snapshots ever sees it) and reported in the `Ok` answer, as
/// retention needs deletes too. `tag` makes the probe's key unique.
///
/// [`Keys::probe`]: crate::format::Keys::probe
pub fn prove_write(
    dest: &dyn Destination,
    keys: &crate::format::Keys,
    tag: &str,
) -> Result<Option<DestError>, DestError> {
    let key = keys.probe(tag);
    let body = format!("foresnap write probe {tag} of volume {}\n", keys.name());
    dest.put(&key, body.as_bytes())?;
    let back = dest.get(&key);
    let deleted = dest.delete(&key);
    match back {
        Ok(b) if b == body.as_bytes() => Ok(deleted.err()),
        Ok(b) => Err(DestError::Damaged {
            dest: dest.url(),
            key,
            why: format!(
                "the write probe read back as {} other bytes: this store does not keep what it is given",
                b.len()
            ),
        }),
        Err(e) => Err(e),
    }
}

/// Keys are relative paths of safe characters: no `..`, no empty parts, no
/// leading '/'. Shared by every destination so that a key means the same
/// everywhere.
pub fn check_key(key: &str) -> Result<(), DestError> {
    let ok = !key.is_empty()
        && key.len() <= 1024
        && key
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(DestError::BadKey(key.to_owned()))
    }
}

/// A local directory (also an NFS mount): each key a file under the root.
/// Writes go to a temporary file, are fsynced, and are linked into place
/// (`link(2)` fails on an existing name: no overwrite, even between
/// concurrent writers), then the directory is fsynced.
#[derive(Debug)]
pub struct DirDestination {
    root: PathBuf,
    tmp_seq: AtomicU64,
}

impl DirDestination {
    /// A destination at `root`, created if missing.
    pub fn open(root: &Path) -> Result<DirDestination, DestError> {
        let d = DirDestination {
            root: root.to_owned(),
            tmp_seq: AtomicU64::new(0),
        };
        fs::create_dir_all(root.join(".tmp")).map_err(|e| d.io("create", "", e))?;
        Ok(d)
    }

    fn io(&self, op: &'static str, key: &str, source: io::Error) -> DestError {
        DestError::Io {
            dest: self.url(),
            op,
            key: key.to_owned(),
            error: source,
        }
    }

    fn path(&self, key: &str) -> Result<PathBuf, DestError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Destination for DirDestination {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let path = self.path(key)?;
        let io = |op, e| self.io(op, key, e);
        if path.exists() {
            return Err(DestError::AlreadyExists {
                dest: self.url(),
                key: key.to_owned(),
            });
        }
        let parent = path.parent().unwrap_or(&self.root).to_owned();
        fs::create_dir_all(&parent).map_err(|e| io("create directory for", e))?;
        let tmp = self.root.join(".tmp").join(format!(
            "{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io("create", e))?;
            f.write_all(bytes).map_err(|e| io("write", e))?;
            f.sync_all().map_err(|e| io("fsync", e))?;
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(DestError::AlreadyExists {
                        dest: self.url(),
                        key: key.to_owned(),
                    });
                }
                Err(e) => return Err(io("link", e)),
            }
            sync_dir(&parent).map_err(|e| io("fsync directory of", e))
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        let path = self.path(key)?;
        fs::read(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DestError::NotFound {
                dest: self.url(),
                key: key.to_owned(),
            },
            _ => self.io("read", key, e),
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
        let dir_key = prefix.trim_end_matches('/');
        if !dir_key.is_empty() {
            check_key(dir_key)?;
        }
        let mut out = Vec::new();
        let mut stack = vec![(self.root.join(dir_key), dir_key.to_owned())];
        while let Some((dir, key)) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io("list", &key, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| self.io("list", &key, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if key.is_empty() && name == ".tmp" {
                    continue;
                }
                let child = if key.is_empty() {
                    name
                } else {
                    format!("{key}/{name}")
                };
                let ft = entry.file_type().map_err(|e| self.io("list", &child, e))?;
                if ft.is_dir() {
                    stack.push((entry.path(), child));
                } else if check_key(&child).is_ok() {
                    out.push(child);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), DestError> {
        let path = self.path(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {
                let parent = path.parent().unwrap_or(&self.root);
                sync_dir(parent).map_err(|e| self.io("fsync directory of", key, e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("delete", key, e)),
        }
    }

    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A destination in front of another that fails on purpose: refuses
    /// every put, hands back every get with its first bit flipped, or fails
    /// every get after the first `gets_ok` (shared by the modules' tests).
    #[derive(Debug)]
    pub(crate) struct Faulty<'d> {
        pub inner: &'d dyn Destination,
        pub refuse_puts: bool,
        pub flip_gets: bool,
        pub gets_ok: AtomicU64,
    }

    impl<'d> Faulty<'d> {
        pub fn new(inner: &'d dyn Destination) -> Self {
            Faulty {
                inner,
                refuse_puts: false,
                flip_gets: false,
                gets_ok: AtomicU64::new(u64::MAX),
            }
        }
    }

    impl Destination for Faulty<'_> {
        fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
            if self.refuse_puts {
                return Err(DestError::Remote {
                    dest: self.url(),
                    op: "put",
                    key: key.into(),
                    why: "access denied".into(),
                });
            }
            self.inner.put(key, bytes)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
            let left = self.gets_ok.load(Ordering::Relaxed);
            if left == 0 {
                return Err(DestError::Remote {
                    dest: self.url(),
                    op: "get",
                    key: key.into(),
                    why: "connection reset".into(),
                });
            }
            self.gets_ok.store(left - 1, Ordering::Relaxed);
            let mut b = self.inner.get(key)?;
            if self.flip_gets {
                b[0] ^= 1;
            }
            Ok(b)
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

    #[test]
    fn a_write_probe_passes_only_where_writes_come_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let keys = crate::format::Keys::new("acme.db").unwrap();
        let d = DirDestination::open(dir.path()).unwrap();
        assert!(prove_write(&d, &keys, "1-2").unwrap().is_none());
        // The probe is gone, and was never under a listing of data.
        assert!(d.list("").unwrap().is_empty());
        assert!(keys.probe("1-2").starts_with("acme.db/probes/"));
        assert!(!keys.probe("1-2").starts_with(&keys.manifests()));
        assert!(!keys.probe("1-2").starts_with(&keys.objects()));

        let refusing = Faulty {
            refuse_puts: true,
            ..Faulty::new(&d)
        };
        let e = prove_write(&refusing, &keys, "3").unwrap_err().to_string();
        assert!(e.contains("access denied"), "{e}");

        let garbling = Faulty {
            flip_gets: true,
            ..Faulty::new(&d)
        };
        let e = prove_write(&garbling, &keys, "4").unwrap_err().to_string();
        assert!(e.contains("does not keep what it is given"), "{e}");
        assert!(
            d.list("").unwrap().is_empty(),
            "a failed probe is deleted too"
        );
    }

    #[test]
    fn put_get_list_delete_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let d = DirDestination::open(dir.path()).unwrap();
        d.put("v/objects/1.chunk", b"one").unwrap();
        d.put("v/objects/2.delta", b"two").unwrap();
        d.put("v/manifests/1", b"m").unwrap();
        assert_eq!(d.get("v/objects/1.chunk").unwrap(), b"one");
        let e = d.put("v/objects/1.chunk", b"other").unwrap_err();
        assert!(matches!(e, DestError::AlreadyExists { .. }), "{e}");
        assert_eq!(d.get("v/objects/1.chunk").unwrap(), b"one", "overwritten");
        assert_eq!(
            d.list("v/objects/").unwrap(),
            vec!["v/objects/1.chunk", "v/objects/2.delta"]
        );
        assert_eq!(
            d.list("").unwrap().len(),
            3,
            "the temporary area is not listed"
        );
        assert!(d.list("nothing/").unwrap().is_empty());
        d.delete("v/objects/1.chunk").unwrap();
        d.delete("v/objects/1.chunk").unwrap();
        assert!(matches!(
            d.get("v/objects/1.chunk"),
            Err(DestError::NotFound { .. })
        ));
        assert!(
            fs::read_dir(dir.path().join(".tmp"))
                .unwrap()
                .next()
                .is_none(),
            "temporary files left"
        );
    }

    #[test]
    fn bad_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = DirDestination::open(dir.path()).unwrap();
        for k in [
            "",
            "/abs",
            "a//b",
            "../up",
            "a/../b",
            "a/./b",
            "sp ace",
            "a\nb",
            "trailing/",
        ] {
            assert!(
                matches!(d.put(k, b"x"), Err(DestError::BadKey(_))),
                "{k:?} accepted"
            );
            assert!(
                matches!(d.get(k), Err(DestError::BadKey(_))),
                "{k:?} accepted"
            );
        }
    }

    #[test]
    fn concurrent_writers_of_one_key_leave_exactly_one_whole_object() {
        let dir = tempfile::tempdir().unwrap();
        let d = std::sync::Arc::new(DirDestination::open(dir.path()).unwrap());
        let results: Vec<bool> = (0..8u8)
            .map(|i| {
                let d = d.clone();
                std::thread::spawn(move || d.put("k", &vec![i; 1 << 16]).is_ok())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert_eq!(results.iter().filter(|ok| **ok).count(), 1);
        let got = d.get("k").unwrap();
        assert_eq!(got.len(), 1 << 16);
        assert!(got.iter().all(|&b| b == got[0]), "a mix of writers");
    }
}
