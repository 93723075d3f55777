//! The bytes of a snapshot in object storage: data objects and manifests.
//!
//! # Data objects (version 1, integers little-endian)
//!
//! An object holds one chunk of the volume (default 4 MiB): either all of it
//! (a *chunk object*) or only some of its tracking blocks (a *delta object*,
//! whose blocks override those of the older objects of the same chunk).
//! Header, 64 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FSNPOBJ\0"` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 1 | kind: 1 chunk, 2 delta |
//! | 13 | 1 | codec of the payload: 0 none, 1 zstd |
//! | 14 | 2 | zero |
//! | 16 | 8 | chunk index in the volume |
//! | 24 | 4 | tracking block size in bytes |
//! | 28 | 4 | tracking blocks in the chunk |
//! | 32 | 8 | payload length before compression |
//! | 40 | 8 | payload length as stored |
//! | 48 | 4 | crc32c of the payload before compression |
//! | 52 | 4 | crc32c of the payload as stored |
//! | 56 | 4 | zero |
//! | 60 | 4 | crc32c of bytes 0..60 |
//!
//! Then the stored payload. A chunk object's payload is the chunk's bytes
//! (the last chunk of a volume may be shorter than the others). A delta
//! object's payload is a bitmap of `ceil(blocks / 8)` bytes (bit `i % 8` of
//! byte `i / 8`: block `i` of the chunk is present) followed by the present
//! blocks' bytes in ascending order.
//!
//! Both checksums are verified on every decode: the stored one before the
//! decompressor sees the bytes, the raw one after, so neither a damaged
//! object nor a decompressor fault can hand back wrong data.
//!
//! # Manifests (version 1)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FSNPMANI"` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | stripe: zero, or members, index, log2 of range chunks, zero (below) |
//! | 16 | 16 | volume id |
//! | 32 | 4 | snapshot id |
//! | 36 | 4 | parent snapshot id (0: none, a full snapshot) |
//! | 40 | 8 | close time, milliseconds since the Unix epoch |
//! | 48 | 8 | volume size in bytes |
//! | 56 | 4 | tracking block size in bytes |
//! | 60 | 4 | chunk size in bytes |
//! | 64 | 8 | chunk count |
//! | 72 | .. | per chunk: a 2-byte count `n`, then `n` references of 5 bytes (snapshot id u32, kind u8), oldest first |
//! | end - 4 | 4 | crc32c of everything before |
//!
//! A chunk with no reference was never written: it reads as zeroes. A chunk's
//! references start with at most one chunk object, followed by deltas; a
//! snapshot references the unchanged chunks of earlier snapshots by naming
//! their objects, so restoring one snapshot needs only its manifest.
//!
//! # Manifests (version 2): parts uploaded before the close
//!
//! Predictive upload stores blocks of a snapshot *before* its close, as
//! delta objects called *parts*, each under a part number of its own
//! (several parts of one chunk may be stored while the epoch is open, and
//! the close may still add the snapshot's own delta). Version 2 is version
//! 1 with references of 9 bytes: snapshot id u32, kind u8, part number u32
//! (0: the snapshot's own object, stored at or after the close; a part
//! number is never 0 and is only ever a delta). References stay oldest
//! first: parts in the order they were stored, then the snapshot's own
//! delta. A manifest without parts is written as version 1, so that a
//! snapshot taken without predictive upload stays readable by older
//! builds; both versions are read.
//!
//! # Striped snapshots
//!
//! Under the `stripe` policy one snapshot's chunks are spread over
//! `members` destinations by block range: chunk `c` lives at member
//! `(c >> range_log2) % members`, every object of it (also those of earlier
//! snapshots it references). Each member holds the snapshot's manifest,
//! whose bytes 12..16 say the layout and which member it is: `members`
//! (2 to 255), `index` (below `members`), `range_log2` (at most 40), zero.
//! So a member's manifest names the chunks it holds ([`Manifest::piece`]),
//! and the snapshot is complete where every index is present. A manifest
//! that is not striped has zero there, as version 1 always wrote.

/// Magic of a data object.
pub const OBJECT_MAGIC: [u8; 8] = *b"FSNPOBJ\0";
/// Magic of a manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"FSNPMANI";
/// Format version of data objects, and of manifests without parts.
pub const VERSION: u32 = 1;
/// Format version of manifests that reference parts (module doc).
pub const MANIFEST_VERSION_PARTS: u32 = 2;
/// Bytes of an object header.
pub const OBJECT_HEADER_BYTES: usize = 64;
/// Largest chunk: 64 MiB.
pub const MAX_CHUNK_BYTES: u32 = 64 << 20;
/// Smallest chunk: 1 MiB.
pub const MIN_CHUNK_BYTES: u32 = 1 << 20;
/// Bytes of the fixed part of a manifest.
const MANIFEST_FIXED_BYTES: usize = 72;
/// Most references one chunk may have (a bound on delta chains; compaction
/// keeps chains far shorter).
pub const MAX_REFS_PER_CHUNK: usize = u16::MAX as usize;

/// Why bytes are not a valid object or manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("not a foresnap {0} (bad magic)")]
    Magic(&'static str),
    #[error(
        "{what} format version {version} is not supported (this build reads objects of \
         version 1 and manifests of versions 1 and 2)"
    )]
    Version { what: &'static str, version: u32 },
    #[error("{0} is corrupt: checksum mismatch")]
    Checksum(&'static str),
    #[error("{0} is truncated")]
    Truncated(&'static str),
    #[error("{what} is inconsistent: {why}")]
    Inconsistent {
        what: &'static str,
        why: &'static str,
    },
    #[error("object payload does not decompress: {0}")]
    Decompress(String),
    /// A sealed object read without the volume key ([`crate::seal`]).
    #[error("{what} is encrypted ({info}): give the volume's key with --key-file or --key-env")]
    Encrypted {
        what: &'static str,
        info: crate::seal::SealInfo,
    },
}

/// [`FormatError::Encrypted`] if `bytes` are a sealed object.
fn refuse_sealed(bytes: &[u8], what: &'static str) -> Result<(), FormatError> {
    match crate::seal::seal_info(bytes) {
        Some(info) => Err(FormatError::Encrypted { what, info }),
        None => Ok(()),
    }
}

/// The two kinds of data object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    /// The whole chunk.
    Chunk,
    /// Some blocks of the chunk, overriding older objects.
    Delta,
}

impl ObjectKind {
    fn code(self) -> u8 {
        match self {
            ObjectKind::Chunk => 1,
            ObjectKind::Delta => 2,
        }
    }

    fn from_code(c: u8) -> Option<ObjectKind> {
        match c {
            1 => Some(ObjectKind::Chunk),
            2 => Some(ObjectKind::Delta),
            _ => None,
        }
    }

    /// The suffix of its key.
    pub fn suffix(self) -> &'static str {
        match self {
            ObjectKind::Chunk => "chunk",
            ObjectKind::Delta => "delta",
        }
    }
}

/// Payload compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    None,
    /// zstd at the given level (1 is fast and already halves typical data).
    Zstd(i32),
}

/// A decoded data object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub kind: ObjectKind,
    pub chunk: u64,
    pub block_bytes: u32,
    /// Tracking blocks in the chunk.
    pub blocks: u32,
    /// Chunk object: the chunk's bytes. Delta: the present blocks' bytes.
    pub data: Vec<u8>,
    /// Delta: the present blocks, ascending (empty for a chunk object).
    pub present: Vec<u32>,
}

impl Object {
    /// Lays this object over `chunk_buf` (the chunk's content so far).
    pub fn apply(&self, chunk_buf: &mut [u8]) -> Result<(), FormatError> {
        let bad = |why| FormatError::Inconsistent {
            what: "object",
            why,
        };
        match self.kind {
            ObjectKind::Chunk => {
                let dst = chunk_buf
                    .get_mut(..self.data.len())
                    .ok_or(bad("chunk object longer than its chunk"))?;
                dst.copy_from_slice(&self.data);
                chunk_buf[self.data.len()..].fill(0);
            }
            ObjectKind::Delta => {
                let bs = self.block_bytes as usize;
                for (i, &b) in self.present.iter().enumerate() {
                    let off = b as usize * bs;
                    let end = (off + bs).min(chunk_buf.len());
                    let dst = chunk_buf
                        .get_mut(off..end)
                        .ok_or(bad("delta block outside its chunk"))?;
                    let len = dst.len();
                    dst.copy_from_slice(&self.data[i * bs..i * bs + len]);
                }
            }
        }
        Ok(())
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Writes `raw`, compressed if that makes it smaller, into `dst` (which
/// has room for `raw` as it is); returns the codec code and the length.
/// Incompressible data is stored as it is: never larger.
fn compress_into(raw: &[u8], codec: Codec, dst: &mut [u8]) -> (u8, usize) {
    if let Codec::Zstd(level) = codec
        && !raw.is_empty()
    {
        // One byte short of `raw`: a result that does not shrink fails.
        match zstd::zstd_safe::compress(&mut dst[..raw.len() - 1], raw, level) {
            Ok(n) => return (1, n),
            Err(code) if zstd::zstd_safe::get_error_name(code).contains("too small") => {}
            Err(code) => log::warn!(
                "zstd failed ({}); storing the object uncompressed",
                zstd::zstd_safe::get_error_name(code)
            ),
        }
    }
    dst[..raw.len()].copy_from_slice(raw);
    (0, raw.len())
}

/// Builds an object in one allocation: the payload is compressed straight
/// into its place after the header (the upload engine's memory bound
/// counts on no other copy).
fn encode_object(
    kind: ObjectKind,
    chunk: u64,
    block_bytes: u32,
    blocks: u32,
    raw: &[u8],
    codec: Codec,
) -> Vec<u8> {
    let mut out = vec![0u8; OBJECT_HEADER_BYTES + raw.len()];
    let (codec_code, stored_len) = compress_into(raw, codec, &mut out[OBJECT_HEADER_BYTES..]);
    out.truncate(OBJECT_HEADER_BYTES + stored_len);
    let stored_crc = crc32c::crc32c(&out[OBJECT_HEADER_BYTES..]);
    let mut h = Vec::with_capacity(OBJECT_HEADER_BYTES);
    h.extend_from_slice(&OBJECT_MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.push(kind.code());
    h.push(codec_code);
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(&chunk.to_le_bytes());
    h.extend_from_slice(&block_bytes.to_le_bytes());
    h.extend_from_slice(&blocks.to_le_bytes());
    h.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    h.extend_from_slice(&(stored_len as u64).to_le_bytes());
    h.extend_from_slice(&crc32c::crc32c(raw).to_le_bytes());
    h.extend_from_slice(&stored_crc.to_le_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]);
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    out[..OBJECT_HEADER_BYTES].copy_from_slice(&h);
    out
}

/// A chunk object holding `data`, the whole chunk `chunk` (shorter only for
/// the last chunk of a volume).
pub fn encode_chunk(
    chunk: u64,
    block_bytes: u32,
    blocks: u32,
    data: &[u8],
    codec: Codec,
) -> Vec<u8> {
    encode_object(ObjectKind::Chunk, chunk, block_bytes, blocks, data, codec)
}

/// A delta object of chunk `chunk` with the given blocks (index within the
/// chunk, content of one tracking block; the last block of a volume may be
/// shorter and is padded with zeroes). Blocks are sorted and deduplicated
/// (the last content given for a block wins).
pub fn encode_delta(
    chunk: u64,
    block_bytes: u32,
    blocks: u32,
    present: &[(u32, &[u8])],
    codec: Codec,
) -> Vec<u8> {
    let mut sorted: Vec<(u32, &[u8])> = present.to_vec();
    sorted.sort_by_key(|&(b, _)| b);
    sorted.reverse();
    sorted.dedup_by_key(|&mut (b, _)| b); // keeps the first of each run: the last given
    sorted.reverse();
    let bs = block_bytes as usize;
    let map_len = (blocks as usize).div_ceil(8);
    let mut raw = vec![0u8; map_len];
    raw.reserve(sorted.len() * bs);
    for &(b, _) in &sorted {
        if b < blocks {
            raw[b as usize / 8] |= 1 << (b % 8);
        }
    }
    for &(b, data) in &sorted {
        if b < blocks {
            let n = data.len().min(bs);
            raw.extend_from_slice(&data[..n]);
            raw.resize(raw.len() + bs - n, 0);
        }
    }
    encode_object(ObjectKind::Delta, chunk, block_bytes, blocks, &raw, codec)
}

/// Decodes and verifies an object; `max_chunk_bytes` bounds what it may
/// claim to decompress to (a damaged length never allocates gigabytes).
pub fn decode_object(bytes: &[u8], max_chunk_bytes: u32) -> Result<Object, FormatError> {
    const WHAT: &str = "object";
    let bad = |why| FormatError::Inconsistent { what: WHAT, why };
    refuse_sealed(bytes, WHAT)?;
    if bytes.len() < OBJECT_HEADER_BYTES {
        return Err(if bytes.starts_with(&OBJECT_MAGIC) || bytes.len() < 8 {
            FormatError::Truncated(WHAT)
        } else {
            FormatError::Magic(WHAT)
        });
    }
    if bytes[..8] != OBJECT_MAGIC {
        return Err(FormatError::Magic(WHAT));
    }
    let version = le_u32(bytes, 8);
    if version != VERSION {
        return Err(FormatError::Version {
            what: WHAT,
            version,
        });
    }
    if crc32c::crc32c(&bytes[..60]) != le_u32(bytes, 60) {
        return Err(FormatError::Checksum(WHAT));
    }
    let kind = ObjectKind::from_code(bytes[12]).ok_or(bad("unknown kind"))?;
    let codec = bytes[13];
    let chunk = le_u64(bytes, 16);
    let block_bytes = le_u32(bytes, 24);
    let blocks = le_u32(bytes, 28);
    let raw_len = le_u64(bytes, 32);
    let stored_len = le_u64(bytes, 40);
    if !block_bytes.is_power_of_two() || block_bytes < 512 {
        return Err(bad("block size is not a power of two >= 512"));
    }
    let chunk_bytes = u64::from(blocks) * u64::from(block_bytes);
    if chunk_bytes == 0 || chunk_bytes > u64::from(max_chunk_bytes) {
        return Err(bad("chunk size out of range"));
    }
    let max_raw = match kind {
        ObjectKind::Chunk => chunk_bytes,
        ObjectKind::Delta => u64::from(blocks).div_ceil(8) + chunk_bytes,
    };
    if raw_len > max_raw {
        return Err(bad("payload longer than its chunk"));
    }
    let stored = &bytes[OBJECT_HEADER_BYTES..];
    if stored.len() as u64 != stored_len {
        return Err(FormatError::Truncated(WHAT));
    }
    if crc32c::crc32c(stored) != le_u32(bytes, 52) {
        return Err(FormatError::Checksum(WHAT));
    }
    let raw_len = usize::try_from(raw_len).map_err(|_| bad("payload too long"))?;
    let raw = match codec {
        0 => stored.to_vec(),
        1 => zstd::bulk::decompress(stored, raw_len)
            .map_err(|e| FormatError::Decompress(e.to_string()))?,
        _ => return Err(bad("unknown codec")),
    };
    if raw.len() != raw_len {
        return Err(bad("payload length differs from its header"));
    }
    if crc32c::crc32c(&raw) != le_u32(bytes, 48) {
        return Err(FormatError::Checksum(WHAT));
    }
    let mut obj = Object {
        kind,
        chunk,
        block_bytes,
        blocks,
        data: raw,
        present: Vec::new(),
    };
    if kind == ObjectKind::Delta {
        let map_len = (blocks as usize).div_ceil(8);
        let map = obj
            .data
            .get(..map_len)
            .ok_or(bad("delta without its bitmap"))?;
        obj.present = (0..blocks)
            .filter(|&b| map[b as usize / 8] & (1 << (b % 8)) != 0)
            .collect();
        if obj.data.len() - map_len != obj.present.len() * block_bytes as usize {
            return Err(bad("delta block count differs from its bitmap"));
        }
        obj.data.drain(..map_len);
    }
    Ok(obj)
}

/// Where one chunk's data comes from: an object of some snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub snapshot: u32,
    pub kind: ObjectKind,
    /// 0: the snapshot's own object; otherwise a part stored before the
    /// close (always a delta; module doc).
    pub part: u32,
}

impl ObjectRef {
    /// The snapshot's own object of `kind` (not a part).
    pub fn own(snapshot: u32, kind: ObjectKind) -> ObjectRef {
        ObjectRef {
            snapshot,
            kind,
            part: 0,
        }
    }

    /// Part `part` (non-zero) of `snapshot`: a delta stored before the close.
    pub fn part(snapshot: u32, part: u32) -> ObjectRef {
        debug_assert_ne!(part, 0, "part 0 is the snapshot's own object");
        ObjectRef {
            snapshot,
            kind: ObjectKind::Delta,
            part,
        }
    }
}

/// A snapshot's manifest (module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub volume_id: [u8; 16],
    pub snapshot: u32,
    /// 0: none.
    pub parent: u32,
    pub closed_ms: u64,
    pub volume_bytes: u64,
    pub block_bytes: u32,
    pub chunk_bytes: u32,
    /// Per chunk, its objects, oldest first.
    pub chunks: Vec<Vec<ObjectRef>>,
    /// Under `stripe`: the layout, and which member holds this manifest
    /// (module doc).
    pub stripe: Option<Stripe>,
}

/// Where a striped snapshot's chunks live (module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stripe {
    /// Destinations the chunks are spread over, 2 to 255.
    pub members: u8,
    /// The member whose manifest this is.
    pub index: u8,
    /// Chunks per range: `1 << range_log2`.
    pub range_log2: u8,
}

/// Largest `range_log2` a manifest may say.
pub const MAX_STRIPE_RANGE_LOG2: u8 = 40;

impl Stripe {
    /// The member that holds chunk `c`.
    pub fn member_of(&self, c: u64) -> u8 {
        // The remainder is below `members`, so it fits a u8.
        u8::try_from((c >> self.range_log2) % u64::from(self.members.max(1))).unwrap_or(0)
    }

    fn encode(s: Option<Stripe>) -> [u8; 4] {
        s.map_or([0; 4], |s| [s.members, s.index, s.range_log2, 0])
    }

    fn decode(b: [u8; 4]) -> Result<Option<Stripe>, &'static str> {
        match b {
            [0, 0, 0, 0] => Ok(None),
            [members, index, range_log2, 0]
                if members >= 2 && index < members && range_log2 <= MAX_STRIPE_RANGE_LOG2 =>
            {
                Ok(Some(Stripe {
                    members,
                    index,
                    range_log2,
                }))
            }
            _ => Err("stripe layout out of range"),
        }
    }
}

impl Manifest {
    /// Chunks a volume of this size has.
    pub fn chunk_count(volume_bytes: u64, chunk_bytes: u32) -> u64 {
        volume_bytes.div_ceil(u64::from(chunk_bytes.max(1)))
    }

    /// Bytes of chunk `c` (the last may be short).
    pub fn chunk_len(&self, c: u64) -> u64 {
        let cb = u64::from(self.chunk_bytes);
        self.volume_bytes.saturating_sub(c * cb).min(cb)
    }

    /// The chunks this manifest's member holds: all of them, but under
    /// `stripe` only those of its ranges (the others emptied).
    pub fn piece(&self) -> Manifest {
        let mut m = self.clone();
        if let Some(s) = self.stripe {
            for (c, refs) in m.chunks.iter_mut().enumerate() {
                if s.member_of(c as u64) != s.index {
                    refs.clear();
                }
            }
        }
        m
    }

    /// Whether any reference is a part (the manifest needs version 2).
    pub fn has_parts(&self) -> bool {
        self.chunks.iter().flatten().any(|r| r.part != 0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let refs: usize = self.chunks.iter().map(Vec::len).sum();
        let parts = self.has_parts();
        let (version, ref_bytes) = if parts {
            (MANIFEST_VERSION_PARTS, 9)
        } else {
            (VERSION, 5)
        };
        let mut out =
            Vec::with_capacity(MANIFEST_FIXED_BYTES + 2 * self.chunks.len() + ref_bytes * refs + 4);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&Stripe::encode(self.stripe));
        out.extend_from_slice(&self.volume_id);
        out.extend_from_slice(&self.snapshot.to_le_bytes());
        out.extend_from_slice(&self.parent.to_le_bytes());
        out.extend_from_slice(&self.closed_ms.to_le_bytes());
        out.extend_from_slice(&self.volume_bytes.to_le_bytes());
        out.extend_from_slice(&self.block_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for c in &self.chunks {
            let n = c.len().min(MAX_REFS_PER_CHUNK);
            out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_le_bytes());
            for r in &c[..n] {
                out.extend_from_slice(&r.snapshot.to_le_bytes());
                out.push(r.kind.code());
                if parts {
                    out.extend_from_slice(&r.part.to_le_bytes());
                }
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, FormatError> {
        const WHAT: &str = "manifest";
        let bad = |why| FormatError::Inconsistent { what: WHAT, why };
        refuse_sealed(bytes, WHAT)?;
        if bytes.len() < 8 || bytes[..8] != MANIFEST_MAGIC {
            return Err(if bytes.len() < 8 {
                FormatError::Truncated(WHAT)
            } else {
                FormatError::Magic(WHAT)
            });
        }
        if bytes.len() < MANIFEST_FIXED_BYTES + 4 {
            return Err(FormatError::Truncated(WHAT));
        }
        let version = le_u32(bytes, 8);
        let ref_bytes = match version {
            VERSION => 5,
            MANIFEST_VERSION_PARTS => 9,
            _ => {
                return Err(FormatError::Version {
                    what: WHAT,
                    version,
                });
            }
        };
        let body = bytes.len() - 4;
        if crc32c::crc32c(&bytes[..body]) != le_u32(bytes, body) {
            return Err(FormatError::Checksum(WHAT));
        }
        let stripe = Stripe::decode([bytes[12], bytes[13], bytes[14], bytes[15]]).map_err(bad)?;
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&bytes[16..32]);
        let m_volume_bytes = le_u64(bytes, 48);
        let block_bytes = le_u32(bytes, 56);
        let chunk_bytes = le_u32(bytes, 60);
        let count = le_u64(bytes, 64);
        if !block_bytes.is_power_of_two() || block_bytes < 512 {
            return Err(bad("block size is not a power of two >= 512"));
        }
        if !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
            || !chunk_bytes.is_power_of_two()
            || chunk_bytes < block_bytes
        {
            return Err(bad("chunk size out of range"));
        }
        if count != Manifest::chunk_count(m_volume_bytes, chunk_bytes) {
            return Err(bad("chunk count does not match the volume size"));
        }
        // Each chunk takes at least 2 bytes: a count that cannot fit is a lie.
        if count > (body - MANIFEST_FIXED_BYTES) as u64 / 2 {
            return Err(FormatError::Truncated(WHAT));
        }
        let mut chunks =
            Vec::with_capacity(usize::try_from(count).map_err(|_| bad("too many chunks"))?);
        let mut at = MANIFEST_FIXED_BYTES;
        for _ in 0..count {
            if at + 2 > body {
                return Err(FormatError::Truncated(WHAT));
            }
            let n = usize::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
            at += 2;
            if at + ref_bytes * n > body {
                return Err(FormatError::Truncated(WHAT));
            }
            let mut refs = Vec::with_capacity(n);
            for i in 0..n {
                let p = at + ref_bytes * i;
                refs.push(ObjectRef {
                    snapshot: le_u32(bytes, p),
                    kind: ObjectKind::from_code(bytes[p + 4]).ok_or(bad("unknown object kind"))?,
                    part: if ref_bytes == 9 {
                        le_u32(bytes, p + 5)
                    } else {
                        0
                    },
                });
            }
            if refs.iter().skip(1).any(|r| r.kind == ObjectKind::Chunk) {
                return Err(bad("a chunk object after the first reference"));
            }
            if refs
                .iter()
                .any(|r| r.part != 0 && r.kind != ObjectKind::Delta)
            {
                return Err(bad("a part that is not a delta"));
            }
            at += ref_bytes * n;
            chunks.push(refs);
        }
        if at != body {
            return Err(bad("trailing bytes"));
        }
        Ok(Manifest {
            volume_id,
            snapshot: le_u32(bytes, 32),
            parent: le_u32(bytes, 36),
            closed_ms: le_u64(bytes, 40),
            volume_bytes: m_volume_bytes,
            block_bytes,
            chunk_bytes,
            chunks,
            stripe,
        })
    }
}

/// Hex of a volume id.
pub fn volume_hex(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The keys of one volume's snapshots at a destination: everything lives
/// under the volume's name, manifests apart from objects so that listing
/// snapshots is one small listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under volume name `name`: letters, digits, '.', '_' and '-',
    /// not starting with '.'.
    pub fn new(name: &str) -> Result<Keys, String> {
        let ok = !name.is_empty()
            && name.len() <= 128
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Keys {
                prefix: name.to_owned(),
            })
        } else {
            Err(format!(
                "invalid volume name {name:?}: use 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'"
            ))
        }
    }

    /// The volume name.
    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// Where the manifests are (a listing prefix).
    pub fn manifests(&self) -> String {
        format!("{}/manifests/", self.prefix)
    }

    /// Where the data objects are (a listing prefix).
    pub fn objects(&self) -> String {
        format!("{}/objects/", self.prefix)
    }

    /// The key of a snapshot's manifest.
    pub fn manifest(&self, snapshot: u32) -> String {
        format!("{}/manifests/{snapshot:010}", self.prefix)
    }

    /// The key of a write probe ([`crate::dest::prove_write`]): apart from
    /// every listing prefix, so that a probe is never taken for data.
    pub fn probe(&self, tag: &str) -> String {
        format!("{}/probes/{tag}", self.prefix)
    }

    /// Where the journals of moves between destinations are (a listing
    /// prefix; [`crate::tier`]). Apart from the manifests: a journal is
    /// never taken for a snapshot.
    pub fn tiering(&self) -> String {
        format!("{}/tiering/", self.prefix)
    }

    /// The key of the journal of snapshot `snapshot`'s move.
    pub fn tiering_journal(&self, snapshot: u32) -> String {
        format!("{}/tiering/{snapshot:010}", self.prefix)
    }

    /// Where the journals of prunes are (a listing prefix;
    /// [`crate::retention`]).
    pub fn retention(&self) -> String {
        format!("{}/retention/", self.prefix)
    }

    /// The key of the journal of a prune run when `newest` was the newest
    /// snapshot.
    pub fn retention_journal(&self, newest: u32) -> String {
        format!("{}/retention/{newest:010}", self.prefix)
    }

    /// The key of an object: sorted by chunk, then snapshot; a part's key
    /// carries its part number (`.../0000000012.p0000000007.delta`).
    pub fn object(&self, chunk: u64, r: ObjectRef) -> String {
        if r.part == 0 {
            format!(
                "{}/objects/{chunk:012}/{:010}.{}",
                self.prefix,
                r.snapshot,
                r.kind.suffix()
            )
        } else {
            format!(
                "{}/objects/{chunk:012}/{:010}.p{:010}.{}",
                self.prefix,
                r.snapshot,
                r.part,
                r.kind.suffix()
            )
        }
    }

    /// The snapshot a key of this volume belongs to: a manifest's
    /// snapshot, or the snapshot that stored an object (also a part).
    /// `None` for other keys.
    pub fn snapshot_of(&self, key: &str) -> Option<u32> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        if let Some(id) = rest.strip_prefix("manifests/") {
            return id.parse().ok().filter(|_| id.len() == 10);
        }
        let name = rest.strip_prefix("objects/")?.split_once('/')?.1;
        let id = name.get(..10)?;
        (name.as_bytes().get(10) == Some(&b'.'))
            .then(|| id.parse().ok())
            .flatten()
    }

    /// The chunk an object key of this volume belongs to; `None` for
    /// other keys.
    pub fn chunk_of(&self, key: &str) -> Option<u64> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix("/objects/")?;
        let (chunk, _) = rest.split_once('/')?;
        chunk.parse().ok().filter(|_| chunk.len() == 12)
    }

    /// Whether `key` is a manifest of this volume.
    pub fn is_manifest(&self, key: &str) -> bool {
        key.strip_prefix(&self.prefix)
            .is_some_and(|r| r.starts_with("/manifests/"))
    }

    /// The snapshot ids whose manifests `keys` (a listing) holds, sorted.
    pub fn snapshot_ids(&self, keys: &[String]) -> Vec<u32> {
        let p = self.manifests();
        let mut ids: Vec<u32> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&p)?.parse().ok())
            .collect();
        ids.sort_unstable();
        ids
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const BS: u32 = 4096;
    const BLOCKS: u32 = 256; // 1 MiB chunks

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn chunk_objects_round_trip_with_and_without_zstd() {
        let data = pattern(3, (BS * BLOCKS) as usize);
        for codec in [Codec::None, Codec::Zstd(1)] {
            let bytes = encode_chunk(7, BS, BLOCKS, &data, codec);
            let o = decode_object(&bytes, MAX_CHUNK_BYTES).unwrap();
            assert_eq!((o.kind, o.chunk, o.block_bytes), (ObjectKind::Chunk, 7, BS));
            assert_eq!(o.data, data);
        }
        // Zeroes compress; the zstd object is far smaller.
        let zeros = vec![0u8; (BS * BLOCKS) as usize];
        assert!(encode_chunk(0, BS, BLOCKS, &zeros, Codec::Zstd(1)).len() < 4096);
        // Random bytes do not: stored raw, never larger than raw + header.
        let noise: Vec<u8> = (0..(BS * BLOCKS) as usize)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let b = encode_chunk(0, BS, BLOCKS, &noise, Codec::Zstd(1));
        assert!(b.len() <= noise.len() + OBJECT_HEADER_BYTES);
    }

    #[test]
    fn deltas_override_their_blocks_only() {
        let base = pattern(1, (BS * BLOCKS) as usize);
        let b5 = vec![0xAAu8; BS as usize];
        let b9 = vec![0xBBu8; BS as usize];
        let old9 = vec![0x11u8; BS as usize];
        let bytes = encode_delta(
            2,
            BS,
            BLOCKS,
            &[(9, &old9), (5, &b5), (9, &b9)],
            Codec::Zstd(3),
        );
        let d = decode_object(&bytes, MAX_CHUNK_BYTES).unwrap();
        assert_eq!(d.present, vec![5, 9]);
        let mut chunk = base.clone();
        d.apply(&mut chunk).unwrap();
        let bs = BS as usize;
        assert_eq!(&chunk[5 * bs..6 * bs], &b5[..]);
        assert_eq!(
            &chunk[9 * bs..10 * bs],
            &b9[..],
            "the last content given wins"
        );
        assert_eq!(&chunk[..5 * bs], &base[..5 * bs]);
        assert_eq!(&chunk[10 * bs..], &base[10 * bs..]);
    }

    #[test]
    fn every_damage_is_detected() {
        let data = pattern(9, (BS * BLOCKS) as usize);
        for codec in [Codec::None, Codec::Zstd(1)] {
            let good = encode_chunk(1, BS, BLOCKS, &data, codec);
            // A bit flip anywhere, sampled.
            for bit in (0..good.len() * 8).step_by(4099) {
                let mut bad = good.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    decode_object(&bad, MAX_CHUNK_BYTES).is_err(),
                    "flip of bit {bit} accepted"
                );
            }
            for cut in [0, 7, 63, 64, good.len() - 1] {
                assert!(
                    decode_object(&good[..cut], MAX_CHUNK_BYTES).is_err(),
                    "cut at {cut} accepted"
                );
            }
            let mut longer = good.clone();
            longer.push(0);
            assert!(decode_object(&longer, MAX_CHUNK_BYTES).is_err());
        }
        assert_eq!(
            decode_object(
                b"hello, world, this is not an object at all, no no no no no no",
                MAX_CHUNK_BYTES
            ),
            Err(FormatError::Magic("object"))
        );
    }

    fn manifest() -> Manifest {
        let r = ObjectRef::own;
        Manifest {
            volume_id: [0x5a; 16],
            snapshot: 3,
            parent: 2,
            closed_ms: 1_800_000_000_000,
            volume_bytes: (3 << 20) + 4096,
            block_bytes: BS,
            chunk_bytes: 1 << 20,
            chunks: vec![
                vec![
                    r(1, ObjectKind::Chunk),
                    r(2, ObjectKind::Delta),
                    r(3, ObjectKind::Delta),
                ],
                vec![],
                vec![r(3, ObjectKind::Chunk)],
                vec![r(2, ObjectKind::Delta)],
            ],
            stripe: None,
        }
    }

    #[test]
    fn keys_name_their_snapshot() {
        let k = Keys::new("vol").unwrap();
        assert_eq!(k.snapshot_of(&k.manifest(42)), Some(42));
        assert!(k.is_manifest(&k.manifest(42)));
        let own = k.object(7, ObjectRef::own(12, ObjectKind::Delta));
        assert_eq!(k.snapshot_of(&own), Some(12));
        assert!(!k.is_manifest(&own));
        let part = k.object(
            7,
            ObjectRef {
                snapshot: 13,
                kind: ObjectKind::Delta,
                part: 5,
            },
        );
        assert_eq!(k.snapshot_of(&part), Some(13));
        let journal = k.tiering_journal(42);
        assert_eq!(journal, "vol/tiering/0000000042");
        assert!(journal.starts_with(&k.tiering()) && !k.is_manifest(&journal));
        assert!(k.snapshot_ids(&[journal]).is_empty());
        for other in [
            "vol2/manifests/0000000001",
            "vol/objects/x",
            "vol/manifests/1",
            "other",
        ] {
            assert_eq!(k.snapshot_of(other), None, "{other}");
        }
    }

    #[test]
    fn object_keys_name_their_chunk() {
        let k = Keys::new("vol").unwrap();
        let own = k.object(7, ObjectRef::own(12, ObjectKind::Delta));
        assert_eq!(k.chunk_of(&own), Some(7));
        assert_eq!(
            k.chunk_of(&k.object(123_456, ObjectRef::part(3, 2))),
            Some(123_456)
        );
        for other in [
            k.manifest(7),
            "vol2/objects/000000000007/0000000012.delta".into(),
            "vol/objects/7/0000000012.delta".into(),
            "vol/objects/000000000007".into(),
        ] {
            assert_eq!(k.chunk_of(&other), None, "{other}");
        }
    }

    #[test]
    fn a_striped_manifest_says_its_layout_and_holds_its_ranges() {
        let mut m = manifest();
        m.stripe = Some(Stripe {
            members: 3,
            index: 1,
            range_log2: 1,
        });
        let bytes = m.encode();
        assert_eq!(&bytes[12..16], &[3, 1, 1, 0]);
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        // Ranges of 2 chunks over 3 members: chunks 0-1 at 0, 2-3 at 1.
        let s = m.stripe.unwrap();
        let at: Vec<u8> = (0..8).map(|c| s.member_of(c)).collect();
        assert_eq!(at, [0, 0, 1, 1, 2, 2, 0, 0]);
        let piece = m.piece();
        assert!(piece.chunks[0].is_empty() && piece.chunks[1].is_empty());
        assert_eq!(piece.chunks[2], m.chunks[2]);
        assert_eq!(piece.chunks[3], m.chunks[3]);
        // Not striped: the piece is the whole.
        assert_eq!(manifest().piece(), manifest());
        // Layouts that cannot be: refused even with a good checksum.
        for bad in [
            [1, 0, 0, 0],
            [2, 2, 0, 0],
            [0, 1, 0, 0],
            [2, 0, 41, 0],
            [2, 0, 0, 1],
        ] {
            let mut b = bytes.clone();
            b[12..16].copy_from_slice(&bad);
            let body = b.len() - 4;
            let crc = crc32c::crc32c(&b[..body]);
            b[body..].copy_from_slice(&crc.to_le_bytes());
            assert!(
                matches!(Manifest::decode(&b), Err(FormatError::Inconsistent { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn manifests_round_trip_and_damage_is_detected() {
        let m = manifest();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.chunk_len(3), 4096);
        assert_eq!(m.chunk_len(0), 1 << 20);
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Manifest::decode(&bad).is_err(),
                "flip of bit {bit} accepted"
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..cut]).is_err(),
                "cut at {cut} accepted"
            );
        }
    }

    /// A manifest with parts is version 2 (9-byte references), round-trips
    /// and refuses damage; one without stays version 1, byte for byte as
    /// version 1 was written (read by the same decoder).
    #[test]
    fn version_2_manifests_carry_parts() {
        let mut m = manifest();
        assert!(!m.has_parts());
        assert_eq!(&m.encode()[8..12], &1u32.to_le_bytes());
        m.chunks[0].insert(2, ObjectRef::part(3, 7));
        m.chunks[3].push(ObjectRef::part(3, 0xdead_beef));
        let bytes = m.encode();
        assert_eq!(&bytes[8..12], &2u32.to_le_bytes());
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        // Chunk 0's refs: count 4, then 9 bytes each; the part is third.
        assert_eq!(&bytes[72..74], &4u16.to_le_bytes());
        assert_eq!(&bytes[74 + 18..74 + 27], &[3, 0, 0, 0, 2, 7, 0, 0, 0]);
        assert_eq!(bytes.len(), 72 + (2 + 36) + 2 + (2 + 9) + (2 + 18) + 4);
        for bit in (0..bytes.len() * 8).step_by(7) {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                Manifest::decode(&bad).is_err(),
                "flip of bit {bit} accepted"
            );
        }
        // A part that claims to be a chunk object is refused.
        let mut wrong = m.clone();
        wrong.chunks[2][0].part = 1;
        assert!(matches!(
            Manifest::decode(&wrong.encode()),
            Err(FormatError::Inconsistent { .. })
        ));
        // Version 3 is not this build's.
        let mut v3 = bytes.clone();
        v3[8..12].copy_from_slice(&3u32.to_le_bytes());
        let body = v3.len() - 4;
        let crc = crc32c::crc32c(&v3[..body]);
        v3[body..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Manifest::decode(&v3),
            Err(FormatError::Version { version: 3, .. })
        ));
    }

    /// The byte layouts documented above, pinned.
    #[test]
    fn version_1_layouts_are_pinned() {
        let o = encode_chunk(0x0102, BS, BLOCKS, &[7u8; 4096], Codec::None);
        assert_eq!(&o[0..8], b"FSNPOBJ\0");
        assert_eq!(&o[8..12], &1u32.to_le_bytes());
        assert_eq!((o[12], o[13]), (1, 0));
        assert_eq!(&o[16..24], &0x0102u64.to_le_bytes());
        assert_eq!(&o[24..28], &4096u32.to_le_bytes());
        assert_eq!(&o[28..32], &256u32.to_le_bytes());
        assert_eq!(&o[32..40], &4096u64.to_le_bytes());
        assert_eq!(&o[48..52], &crc32c::crc32c(&[7u8; 4096]).to_le_bytes());
        assert_eq!(&o[60..64], &crc32c::crc32c(&o[..60]).to_le_bytes());
        assert_eq!(o.len(), 64 + 4096);
        let m = manifest().encode();
        assert_eq!(&m[0..8], b"FSNPMANI");
        assert_eq!(&m[32..36], &3u32.to_le_bytes());
        assert_eq!(&m[64..72], &4u64.to_le_bytes());
        assert_eq!(&m[72..74], &3u16.to_le_bytes());
        assert_eq!(&m[74..79], &[1, 0, 0, 0, 1]);
        assert_eq!(m.len(), 72 + 2 + 15 + 2 + 2 + 5 + 2 + 5 + 4);
        let k = Keys::new("db-1").unwrap();
        let r = ObjectRef::own(12, ObjectKind::Delta);
        assert_eq!(k.object(5, r), "db-1/objects/000000000005/0000000012.delta");
        assert_eq!(
            k.object(5, ObjectRef::part(12, 7)),
            "db-1/objects/000000000005/0000000012.p0000000007.delta"
        );
        assert_eq!(k.manifest(7), "db-1/manifests/0000000007");
        let listing = [
            "db-1/manifests/0000000007".to_owned(),
            "db-1/manifests/0000000002".to_owned(),
            "other/manifests/0000000003".to_owned(),
        ];
        assert_eq!(k.snapshot_ids(&listing), vec![2, 7]);
        for bad in ["", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
            assert!(Keys::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic and never decode to anything that
        /// does not re-encode consistently.
        #[test]
        fn garbage_is_refused_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode_object(&bytes, MAX_CHUNK_BYTES);
            let _ = Manifest::decode(&bytes);
        }
    }
}
