//! Encryption at rest: every object of an encrypted volume is sealed with
//! the volume's key before it leaves the host.
//!
//! [`Sealed`] is a destination in front of the real one: a put seals the
//! bytes, a get opens them. Everything a volume stores goes through it:
//! data objects, parts, manifests, the tiering and retention journals. So
//! the snapshot format ([`crate::format`]) is the same with and without a
//! key, and nothing of the volume (not even which chunks changed) is
//! readable without it.
//!
//! # Algorithm
//!
//! XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`): its 192-bit nonces
//! are drawn at random for every object, so no counter has to survive
//! crashes and restarts, and a key can seal any number of objects (random
//! 96-bit nonces, as AES-GCM's, bound a key to about 2^32 of them).
//!
//! # A sealed object (integers little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FSNPSEAL"` |
//! | 8 | 1 | algorithm: 1 XChaCha20-Poly1305 |
//! | 9 | 7 | zero |
//! | 16 | 16 | key id: the first 16 bytes of SHA-256 of `b"foresnap volume key id\0"` and the key |
//! | 32 | 24 | nonce |
//! | 56 | .. | the object's bytes encrypted, then the 16-byte tag |
//!
//! The tag also covers bytes 0..56 and the object's key (its name at the
//! destination): a sealed object moved to another name (an old chunk put
//! in the place of a newer one, a manifest of another snapshot) does not
//! open. The algorithm and key id are in the clear, so that a manifest
//! records how its snapshot is encrypted, and a wrong key is told apart
//! from damage before any decryption ([`check_volume`]).
//!
//! With a key, an object that is not sealed is refused: an encrypted volume
//! trusts nothing it did not seal. Without a key, a sealed object fails to
//! decode with [`crate::format::FormatError::Encrypted`].
//!
//! # Keys
//!
//! 32 random bytes per volume, from a file (`foresnap keygen` makes one:
//! 64 hex digits, mode 0600) or an environment variable (64 hex digits).
//! Key bytes are wiped when dropped and never printed: `Debug` shows the
//! key id only. Losing the key loses the snapshots; nothing else can open
//! them.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use chacha20poly1305::aead::rand_core::RngCore;
use chacha20poly1305::aead::{AeadCore, AeadInPlace, KeyInit, OsRng};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::dest::{DestError, Destination};
use crate::format::Keys;

/// First bytes of a sealed object.
pub const MAGIC: [u8; 8] = *b"FSNPSEAL";
/// Bytes before the ciphertext.
pub const HEADER_BYTES: usize = 56;
/// Bytes of the tag after it.
pub const TAG_BYTES: usize = 16;
/// Bytes a key file or variable holds: 32 raw, or 64 hex digits.
pub const KEY_BYTES: usize = 32;

/// An encryption algorithm of sealed objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    XChaCha20Poly1305,
}

impl Algorithm {
    fn code(self) -> u8 {
        match self {
            Algorithm::XChaCha20Poly1305 => 1,
        }
    }

    fn from_code(c: u8) -> Option<Algorithm> {
        (c == 1).then_some(Algorithm::XChaCha20Poly1305)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::XChaCha20Poly1305 => "XChaCha20-Poly1305",
        })
    }
}

/// What a sealed object's header says (readable without the key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealInfo {
    /// `None`: an algorithm this build does not know.
    pub algorithm: Option<Algorithm>,
    pub key_id: KeyId,
}

impl fmt::Display for SealInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.algorithm {
            Some(a) => write!(f, "{a}, key id {}", self.key_id),
            None => write!(f, "an unknown algorithm, key id {}", self.key_id),
        }
    }
}

/// The header of `bytes` if they are a sealed object.
pub fn seal_info(bytes: &[u8]) -> Option<SealInfo> {
    if bytes.len() < HEADER_BYTES || bytes[..8] != MAGIC {
        return None;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[16..32]);
    Some(SealInfo {
        algorithm: Algorithm::from_code(bytes[8]),
        key_id: KeyId(id),
    })
}

/// A key's public name: safe to print, store and compare.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 16]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// Why a key could not be loaded. Messages name the source, never the
/// key's bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("key file {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "key file {path} can be read by other users (mode {mode:04o}): \
         chmod 600 it (or 400)"
    )]
    Exposed { path: String, mode: u32 },
    #[error("{source_name}: {why}")]
    Malformed { source_name: String, why: String },
    #[error("environment variable {0} is not set (it should hold the volume key)")]
    Unset(String),
}

/// A volume's key. Its bytes live only inside the cipher, which wipes
/// them when dropped.
pub struct VolumeKey {
    cipher: XChaCha20Poly1305,
    id: KeyId,
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeKey(id {})", self.id)
    }
}

/// Why a sealed object does not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Not sealed at all: refused in an encrypted volume.
    NotSealed,
    /// Sealed with another key, or with an algorithm this build lacks.
    OtherKey(SealInfo),
    /// Sealed with this key, but it does not authenticate: damaged, or
    /// stored under another name than it was sealed for.
    Damaged,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::NotSealed => f.write_str(
                "not encrypted, but the volume is: refused (an encrypted volume \
                 trusts only what its key sealed)",
            ),
            OpenError::OtherKey(info) => write!(f, "encrypted with another key ({info})"),
            OpenError::Damaged => f.write_str(
                "encrypted object does not authenticate: damaged, or stored under \
                 another name than its own",
            ),
        }
    }
}

impl VolumeKey {
    /// The key of these 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_BYTES]) -> VolumeKey {
        let mut h = Sha256::new();
        h.update(b"foresnap volume key id\0");
        h.update(bytes);
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        VolumeKey {
            cipher: XChaCha20Poly1305::new(bytes.into()),
            id: KeyId(id),
        }
    }

    /// A key from text or bytes: exactly 32 bytes, or 64 hex digits
    /// (surrounding whitespace ignored). `source_name` is for messages.
    pub fn parse(raw: &[u8], source_name: &str) -> Result<VolumeKey, KeyError> {
        let malformed = |why: String| KeyError::Malformed {
            source_name: source_name.to_owned(),
            why,
        };
        if raw.len() == KEY_BYTES {
            let mut k = Zeroizing::new([0u8; KEY_BYTES]);
            k.copy_from_slice(raw);
            return Ok(VolumeKey::from_bytes(&k));
        }
        let text = raw.trim_ascii();
        if text.len() != 2 * KEY_BYTES {
            return Err(malformed(format!(
                "want 64 hex digits (or 32 raw bytes), found {} bytes",
                raw.len()
            )));
        }
        let mut k = Zeroizing::new([0u8; KEY_BYTES]);
        for (i, pair) in text.chunks_exact(2).enumerate() {
            let digit = |c: u8| (c as char).to_digit(16);
            match (digit(pair[0]), digit(pair[1])) {
                // Both digits are below 16: the byte fits.
                #[allow(clippy::cast_possible_truncation)]
                (Some(h), Some(l)) => k[i] = (h * 16 + l) as u8,
                _ => {
                    return Err(malformed(format!(
                        "want 64 hex digits, found a character that is not one at position {}",
                        2 * i + 1
                    )));
                }
            }
        }
        Ok(VolumeKey::from_bytes(&k))
    }

    /// The key in file `path`, which no one but its owner may read.
    pub fn from_file(path: &Path) -> Result<VolumeKey, KeyError> {
        let shown = path.display().to_string();
        let io = |error| KeyError::Io {
            path: shown.clone(),
            error,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: shown, mode });
        }
        let raw = Zeroizing::new(std::fs::read(path).map_err(io)?);
        VolumeKey::parse(&raw, &format!("key file {shown}"))
    }

    /// The key in environment variable `var` (64 hex digits).
    pub fn from_env(var: &str) -> Result<VolumeKey, KeyError> {
        let v = Zeroizing::new(
            std::env::var_os(var)
                .ok_or_else(|| KeyError::Unset(var.to_owned()))?
                .into_encoded_bytes(),
        );
        if v.len() == KEY_BYTES {
            // Raw bytes would not survive an environment; insist on hex.
            return Err(KeyError::Malformed {
                source_name: format!("environment variable {var}"),
                why: "want 64 hex digits".into(),
            });
        }
        VolumeKey::parse(&v, &format!("environment variable {var}"))
    }

    /// Writes a new random key to `path` (64 hex digits, mode 0600); never
    /// replaces an existing file. Returns its id.
    pub fn generate(path: &Path) -> Result<KeyId, KeyError> {
        let shown = path.display().to_string();
        let io = |error| KeyError::Io {
            path: shown.clone(),
            error,
        };
        let mut key = Zeroizing::new([0u8; KEY_BYTES]);
        OsRng.fill_bytes(&mut key[..]);
        let mut hex = Zeroizing::new(String::with_capacity(2 * KEY_BYTES + 1));
        for b in key.iter() {
            use std::fmt::Write as _;
            let _ = write!(hex, "{b:02x}");
        }
        hex.push('\n');
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        f.write_all(hex.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(io)?;
        Ok(VolumeKey::from_bytes(&key).id)
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    fn aad(header: &[u8], name: &str) -> Vec<u8> {
        let mut aad = Vec::with_capacity(HEADER_BYTES + name.len());
        aad.extend_from_slice(&header[..HEADER_BYTES]);
        aad.extend_from_slice(name.as_bytes());
        aad
    }

    /// `plain` sealed for the object named `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let mut out = Vec::with_capacity(HEADER_BYTES + plain.len() + TAG_BYTES);
        out.extend_from_slice(&MAGIC);
        out.push(Algorithm::XChaCha20Poly1305.code());
        out.extend_from_slice(&[0; 7]);
        out.extend_from_slice(&self.id.0);
        out.extend_from_slice(&nonce);
        let aad = VolumeKey::aad(&out, name);
        out.extend_from_slice(plain);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce, &aad, &mut out[HEADER_BYTES..])
            // Fails only past 256 GiB per message (the chunk bound is far
            // below).
            .unwrap_or_else(|e| panic!("sealing {} bytes: {e}", plain.len()));
        out.extend_from_slice(&tag);
        out
    }

    /// The bytes `sealed` holds, if this key sealed them for `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let info = seal_info(sealed).ok_or(OpenError::NotSealed)?;
        if info.algorithm != Some(Algorithm::XChaCha20Poly1305) || info.key_id != self.id {
            return Err(OpenError::OtherKey(info));
        }
        if sealed.len() < HEADER_BYTES + TAG_BYTES || sealed[9..16] != [0; 7] {
            return Err(OpenError::Damaged);
        }
        let nonce = XNonce::from_slice(&sealed[32..HEADER_BYTES]);
        let aad = VolumeKey::aad(sealed, name);
        let end = sealed.len() - TAG_BYTES;
        let tag = Tag::from_slice(&sealed[end..]);
        let mut plain = sealed[HEADER_BYTES..end].to_vec();
        self.cipher
            .decrypt_in_place_detached(nonce, &aad, &mut plain, tag)
            .map_err(|_| OpenError::Damaged)?;
        Ok(plain)
    }
}

/// A destination whose objects are sealed with a volume key (module doc).
#[derive(Debug)]
pub struct Sealed {
    inner: Arc<dyn Destination>,
    key: Arc<VolumeKey>,
}

impl Sealed {
    pub fn new(inner: Arc<dyn Destination>, key: Arc<VolumeKey>) -> Sealed {
        Sealed { inner, key }
    }

    fn opened(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, DestError> {
        self.key.open(name, sealed).map_err(|e| {
            let (dest, key, why) = (self.inner.url(), name.to_owned(), e.to_string());
            match e {
                OpenError::Damaged => DestError::Damaged { dest, key, why },
                OpenError::NotSealed | OpenError::OtherKey(_) => DestError::Key { dest, key, why },
            }
        })
    }
}

impl Destination for Sealed {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        self.inner.put(key, &self.key.seal(key, bytes))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        self.opened(key, &self.inner.get(key)?)
    }

    fn get_valid(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        // A copy that does not open is passed over like one that fails the
        // caller's check. The last copy that opened is kept with its
        // plaintext: when it is the one returned (the usual case) it is not
        // decrypted again; a comparison costs a few percent of that.
        let last = std::cell::RefCell::new(None::<(Vec<u8>, Vec<u8>)>);
        let sealed = self
            .inner
            .get_valid(key, &|b| match self.key.open(key, b) {
                Ok(plain) => {
                    let ok = valid(&plain);
                    *last.borrow_mut() = Some((b.to_vec(), plain));
                    ok
                }
                Err(_) => false,
            })?;
        match last.into_inner() {
            Some((checked, plain)) if checked == sealed => Ok(plain),
            _ => self.opened(key, &sealed),
        }
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

    /// A put's sealed object; a read's sealed bytes and the copy kept to
    /// tell which one [`Destination::get_valid`] returned (its plaintext
    /// takes the place of the object read back).
    fn object_copies(&self) -> u64 {
        2 + self.inner.object_copies()
    }
}

/// Checks that `key` (or none) fits the volume at `dest` (not sealed: the
/// destination itself) before anything is read or written: the volume's
/// newest readable manifest tells whether it is encrypted and with which
/// key. A volume with no snapshot there fits any.
pub fn check_volume(
    dest: &dyn Destination,
    keys: &Keys,
    key: Option<&VolumeKey>,
) -> Result<(), DestError> {
    let ids = keys.snapshot_ids(&dest.list(&keys.manifests())?);
    let refuse = |why: String| DestError::Key {
        dest: dest.url(),
        key: keys.manifests(),
        why,
    };
    // The newest manifest that is either sealed or a manifest (a damaged
    // one is skipped: `verify` reports it).
    for &id in ids.iter().rev() {
        let bytes = match dest.get(&keys.manifest(id)) {
            Ok(b) => b,
            Err(DestError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let sealed = seal_info(&bytes);
        if sealed.is_none() && !bytes.starts_with(&crate::format::MANIFEST_MAGIC) {
            continue;
        }
        return match (sealed, key) {
            (None, None) => Ok(()),
            (Some(info), Some(k)) if info.algorithm.is_some() && info.key_id == k.id() => Ok(()),
            (Some(info), Some(k)) => Err(refuse(format!(
                "volume {} is encrypted with {info}; the key given has id {}: wrong key",
                keys.name(),
                k.id()
            ))),
            (Some(info), None) => Err(refuse(format!(
                "volume {} is encrypted ({info}): give its key with --key-file or --key-env",
                keys.name()
            ))),
            (None, Some(_)) => Err(refuse(format!(
                "volume {} is not encrypted (snapshot {id} is stored in the clear), so a key \
                 cannot be used with it: a volume is encrypted from its first snapshot on \
                 (give a new --volume name to start an encrypted one)",
                keys.name()
            ))),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;

    fn key(b: u8) -> VolumeKey {
        VolumeKey::from_bytes(&[b; KEY_BYTES])
    }

    #[test]
    fn sealed_bytes_open_only_with_their_key_and_name() {
        let k = key(7);
        let plain = b"the content of a block".repeat(100);
        let s = k.seal("v/objects/1", &plain);
        assert_eq!(s.len(), HEADER_BYTES + plain.len() + TAG_BYTES);
        assert!(!s.windows(22).any(|w| w == b"the content of a block"));
        assert_eq!(k.open("v/objects/1", &s).unwrap(), plain);
        // Another name: the object was moved.
        assert_eq!(k.open("v/objects/2", &s), Err(OpenError::Damaged));
        // Another key.
        assert!(
            matches!(key(8).open("v/objects/1", &s), Err(OpenError::OtherKey(i)) if i.key_id == k.id())
        );
        // Not sealed.
        assert_eq!(k.open("v/objects/1", &plain), Err(OpenError::NotSealed));
        // Two seals of the same bytes differ (random nonces).
        assert_ne!(s, k.seal("v/objects/1", &plain));
    }

    #[test]
    fn any_damaged_byte_is_caught() {
        let k = key(1);
        let s = k.seal("n", &[0xa5; 300]);
        for i in 0..s.len() {
            let mut d = s.clone();
            d[i] ^= 0x10;
            assert!(k.open("n", &d).is_err(), "flip at byte {i} opened");
        }
        for len in 0..s.len() {
            assert!(k.open("n", &s[..len]).is_err(), "truncated to {len} opened");
        }
    }

    #[test]
    fn keys_parse_from_hex_or_raw_and_never_print_their_bytes() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let a = VolumeKey::parse(format!("  {hex}\n").as_bytes(), "t").unwrap();
        let mut raw = [0u8; KEY_BYTES];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
        }
        let b = VolumeKey::parse(&raw, "t").unwrap();
        assert_eq!(a.id(), b.id());
        let shown = format!("{a:?}");
        assert!(!shown.contains("00112233"), "{shown}");
        assert!(shown.contains(&a.id().to_string()));
        let e = VolumeKey::parse(b"abc", "key file k")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "key file k: want 64 hex digits (or 32 raw bytes), found 3 bytes"
        );
        let bad = format!("{}zz", &hex[..62]);
        let e = VolumeKey::parse(bad.as_bytes(), "t")
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 63"), "{e}");
    }

    #[test]
    fn key_files_are_made_private_and_exposed_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let id = VolumeKey::generate(&p).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(VolumeKey::from_file(&p).unwrap().id(), id);
        assert!(
            VolumeKey::generate(&p).is_err(),
            "an existing key file was replaced"
        );
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        let e = VolumeKey::from_file(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        // Two generated keys differ.
        let q = dir.path().join("q");
        assert_ne!(VolumeKey::generate(&q).unwrap(), id);
    }

    #[test]
    fn a_sealed_destination_round_trips_and_refuses_what_it_did_not_seal() {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Destination> = Arc::new(DirDestination::open(dir.path()).unwrap());
        let k = Arc::new(key(3));
        let d = Sealed::new(raw.clone(), k.clone());
        d.put("v/a", b"secret block").unwrap();
        assert_eq!(d.get("v/a").unwrap(), b"secret block");
        assert_eq!(d.get_valid("v/a", &|_| true).unwrap(), b"secret block");
        // The caller's check sees the plaintext; one that fails it still
        // gets the bytes (its own check reports them).
        assert_eq!(
            d.get_valid("v/a", &|p| p == b"other").unwrap(),
            b"secret block"
        );
        assert!(!raw.get("v/a").unwrap().windows(6).any(|w| w == b"secret"));
        raw.put("v/b", b"planted").unwrap();
        assert!(matches!(d.get("v/b"), Err(DestError::Key { .. })));
        // A sealed object copied under another name.
        raw.put("v/c", &raw.get("v/a").unwrap()).unwrap();
        let e = d.get("v/c").unwrap_err();
        assert!(matches!(e, DestError::Damaged { .. }), "{e}");
        let other = Sealed::new(raw.clone(), Arc::new(key(4)));
        let e = other.get("v/a").unwrap_err().to_string();
        assert!(e.contains(&format!("key id {}", k.id())), "{e}");
    }

    #[test]
    fn check_volume_tells_a_wrong_or_missing_key_from_a_plain_volume() {
        use crate::format::Manifest;
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Destination> = Arc::new(DirDestination::open(dir.path()).unwrap());
        let keys = Keys::new("v").unwrap();
        let (k, wrong) = (Arc::new(key(1)), key(2));
        // No snapshot yet: any key fits.
        check_volume(raw.as_ref(), &keys, None).unwrap();
        check_volume(raw.as_ref(), &keys, Some(&k)).unwrap();
        let m = Manifest {
            volume_id: [9; 16],
            snapshot: 1,
            parent: 0,
            closed_ms: 1,
            volume_bytes: 1 << 20,
            block_bytes: 4096,
            chunk_bytes: 1 << 20,
            chunks: vec![Vec::new()],
            stripe: None,
        };
        Sealed::new(raw.clone(), k.clone())
            .put(&keys.manifest(1), &m.encode())
            .unwrap();
        check_volume(raw.as_ref(), &keys, Some(&k)).unwrap();
        let e = check_volume(raw.as_ref(), &keys, Some(&wrong))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wrong key") && e.contains(&k.id().to_string()),
            "{e}"
        );
        let e = check_volume(raw.as_ref(), &keys, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("give its key"), "{e}");
        // A plain volume refuses a key.
        let plain = Keys::new("p").unwrap();
        raw.put(&plain.manifest(1), &m.encode()).unwrap();
        check_volume(raw.as_ref(), &plain, None).unwrap();
        let e = check_volume(raw.as_ref(), &plain, Some(&k))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not encrypted"), "{e}");
    }
}
