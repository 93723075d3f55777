//! The write ring's on-disk format, and its recovery, on plain byte slices
//! (the mmap wrapper stays thin; this runs under proptest and fuzzing).
//!
//! # Layout (version 1, all integers little-endian)
//!
//! A ring file is one header page, the record area, then the overflow
//! bitmap area (its size follows from the header; see below).
//!
//! Header, bytes 0..4096:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FSNPRING"` |
//! | 8 | 4 | format version, 1 |
//! | 12 | 4 | crc32c of bytes 0..4096 with this field taken as zero |
//! | 16 | 8 | record area size in bytes (a multiple of 4096) |
//! | 24 | 8 | volume size in bytes |
//! | 32 | 4 | tracking block size in bytes |
//! | 36 | 4 | record size in bytes, 32 |
//! | 40 | 16 | volume id (random at creation) |
//! | 56 | 8 | creation time, milliseconds since the Unix epoch: records' time base |
//! | 64 | 4032 | zero |
//!
//! Record area: `slots = area / 32` slots; the record with sequence `s`
//! lives in slot `s % slots`, so the ring overwrites its oldest records as
//! it wraps. Record, 32 bytes:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | sequence number, from 1; 0 marks a never-written slot |
//! | 8 | 4 | epoch |
//! | 12 | 4 | time: milliseconds since the ring's creation, modulo 2^32 (readers unwrap in sequence order) |
//! | 16 | 8 | write: byte offset; preserve: block number; release: the sequence below which records are void; close: 0 |
//! | 24 | 3 | write: length in 512-byte sectors; preserve: preserve-area slot; close, release: 0 |
//! | 27 | 1 | low 4 bits kind: 1 write, 2 close of `epoch`, 3 preserve (of closed content of `epoch`), 4 release; bit 4: FUA; bit 5: zeroing (discard or write-zeroes) |
//! | 28 | 4 | crc32c of bytes 0..28 |
//!
//! # Recovery
//!
//! Writers reserve sequence numbers from one counter and fill their slots
//! concurrently, so a crash can leave some of the newest slots unwritten or
//! torn while later ones are complete. Recovery therefore takes *every*
//! valid record (checksum right, stored in the slot its sequence names)
//! whose sequence lies within one lap of the newest, `(max - slots, max]`:
//! a slot holding anything older was not rewritten in this lap, which
//! means its new record was never completed, which means its write was
//! never acknowledged (a record is complete before its write is issued).
//! Torn slots inside the window are counted, not guessed at. Records
//! below the newest release record's sequence belong to epochs that are
//! uploaded and are ignored by the tracker (their slots may still hold them
//! when the ring has not wrapped since).
//!
//! A slot that is neither all zero nor a valid record of that slot is
//! *damaged*: bit rot, or (rarely) a record half copied when the process
//! was killed. Its sequence, and so whether its write still matters, cannot
//! be known; the tracker then resynchronises the whole volume rather than
//! trust the ring (see `tracker`, Recovery).
//!
//! # Overflow bitmap
//!
//! After the record area, [`Header::bitmap_bytes`] bytes: one page, then
//! one bit per tracking block (bit `b % 8` of byte `b / 8`), the page
//! count rounded up. Used only when the ring is full: writes that find no
//! free slot set their blocks' bits instead (degraded mode). Page:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `b"FSNPBITS"` |
//! | 8 | 4 | the open epoch when the page was last written |
//! | 12 | 4 | flags: bit 0 degraded (the bits are in use) |
//! | 16 | 4 | crc32c of bytes 0..16 |
//! | 20 | 4076 | zero |

/// Magic at the start of every ring file.
pub const MAGIC: [u8; 8] = *b"FSNPRING";
/// Current format version.
pub const VERSION: u32 = 1;
/// Bytes of the header page.
pub const HEADER_BYTES: usize = 4096;
/// Bytes per record.
pub const RECORD_BYTES: usize = 32;
/// [`RECORD_BYTES`] as stored in the header.
const RECORD_BYTES_U32: u32 = 32;

/// Why a ring file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("not a foresnap write ring (bad magic)")]
    Magic,
    #[error("write ring format version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("write ring header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    #[error("write ring header is inconsistent: {0}")]
    Header(&'static str),
    #[error("write ring file is truncated: {have} bytes, its header says {want}")]
    Truncated { have: u64, want: u64 },
}

/// The ring's fixed parameters, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub area_bytes: u64,
    pub volume_bytes: u64,
    pub block_bytes: u32,
    pub volume_id: [u8; 16],
    /// Milliseconds since the Unix epoch when the ring was made.
    pub created_ms: u64,
}

impl Header {
    /// Record slots in the area.
    pub fn slots(&self) -> u64 {
        self.area_bytes / RECORD_BYTES as u64
    }

    /// Bytes of the overflow bitmap area: its page and one bit per
    /// tracking block, in whole pages.
    pub fn bitmap_bytes(&self) -> u64 {
        let blocks = self
            .volume_bytes
            .div_ceil(u64::from(self.block_bytes.max(1)));
        4096 + blocks.div_ceil(8).div_ceil(4096) * 4096
    }

    /// Offset of the overflow bitmap area in the file.
    pub fn bitmap_offset(&self) -> u64 {
        HEADER_BYTES as u64 + self.area_bytes
    }

    /// Total file size.
    pub fn file_bytes(&self) -> u64 {
        self.bitmap_offset() + self.bitmap_bytes()
    }

    /// The header page.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.area_bytes.to_le_bytes());
        h[24..32].copy_from_slice(&self.volume_bytes.to_le_bytes());
        h[32..36].copy_from_slice(&self.block_bytes.to_le_bytes());
        h[36..40].copy_from_slice(&RECORD_BYTES_U32.to_le_bytes());
        h[40..56].copy_from_slice(&self.volume_id);
        h[56..64].copy_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32c::crc32c(&h);
        h[12..16].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes and checks a header page.
    pub fn decode(page: &[u8]) -> Result<Header, FormatError> {
        if page.len() < HEADER_BYTES || page[0..8] != MAGIC {
            return Err(FormatError::Magic);
        }
        let version = le_u32(&page[8..12]);
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let mut copy = [0u8; HEADER_BYTES];
        copy.copy_from_slice(&page[..HEADER_BYTES]);
        copy[12..16].fill(0);
        if crc32c::crc32c(&copy) != le_u32(&page[12..16]) {
            return Err(FormatError::HeaderChecksum);
        }
        let h = Header {
            area_bytes: le_u64(&page[16..24]),
            volume_bytes: le_u64(&page[24..32]),
            block_bytes: le_u32(&page[32..36]),
            volume_id: page[40..56].try_into().map_err(|_| FormatError::Magic)?,
            created_ms: le_u64(&page[56..64]),
        };
        if le_u32(&page[36..40]) != RECORD_BYTES_U32 {
            return Err(FormatError::Header("record size is not 32"));
        }
        if h.area_bytes == 0 || !h.area_bytes.is_multiple_of(4096) {
            return Err(FormatError::Header(
                "record area is not a positive multiple of 4096",
            ));
        }
        if !h.block_bytes.is_power_of_two() || h.block_bytes < 512 {
            return Err(FormatError::Header(
                "tracking block size is not a power of two >= 512",
            ));
        }
        Ok(h)
    }
}

/// Largest length a write record holds: the largest multiple of 512 in a
/// `u32` (2^23 - 1 sectors; the field has room for 2^24 - 1, but lengths
/// are `u32`, so decoding refuses anything longer instead of truncating).
pub const MAX_RECORD_LEN: u64 = ((1 << 23) - 1) << 9;

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// `len` bytes (a multiple of 512, at most [`MAX_RECORD_LEN`]) changed
    /// at byte `offset`: written (`fua`: with FUA) or, with `zeroing`,
    /// discarded or zeroed.
    Write {
        offset: u64,
        len: u32,
        fua: bool,
        zeroing: bool,
    },
    /// Epoch `epoch` closed: records of it before this one are its writes.
    Close,
    /// The closed content of `block` in `epoch` was copied to
    /// preserve-area `slot` (below 2^24).
    Preserve { block: u64, slot: u32 },
    /// Records with a sequence below `below` are void: their epochs are
    /// uploaded.
    Release { below: u64 },
}

/// One record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub epoch: u32,
    /// Milliseconds since the ring's creation, modulo 2^32.
    pub time_ms: u32,
    pub kind: RecordKind,
}

impl Record {
    /// The record's 32 bytes. Lengths and slots beyond their fields are
    /// the caller's bug; they are clamped (the I/O path never panics).
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut r = [0u8; RECORD_BYTES];
        r[0..8].copy_from_slice(&self.seq.to_le_bytes());
        r[8..12].copy_from_slice(&self.epoch.to_le_bytes());
        r[12..16].copy_from_slice(&self.time_ms.to_le_bytes());
        let (kind, a, b) = match self.kind {
            RecordKind::Write {
                offset,
                len,
                fua,
                zeroing,
            } => {
                let flags = if fua { 0x10 } else { 0 } | if zeroing { 0x20 } else { 0 };
                (1u8 | flags, offset, len >> 9)
            }
            RecordKind::Close => (2, 0, 0),
            RecordKind::Preserve { block, slot } => (3, block, slot),
            RecordKind::Release { below } => (4, below, 0),
        };
        r[16..24].copy_from_slice(&a.to_le_bytes());
        r[24..27].copy_from_slice(&b.min(0xFF_FFFF).to_le_bytes()[..3]);
        r[27] = kind;
        let crc = crc32c::crc32c(&r[..28]);
        r[28..32].copy_from_slice(&crc.to_le_bytes());
        r
    }

    /// Decodes a slot: `None` for a never-written, torn or foreign slot.
    pub fn decode(r: &[u8]) -> Option<Record> {
        let r: &[u8; RECORD_BYTES] = r.get(..RECORD_BYTES)?.try_into().ok()?;
        if crc32c::crc32c(&r[..28]) != le_u32(&r[28..32]) {
            return None;
        }
        let seq = le_u64(&r[0..8]);
        // 0: never written. 2^63 and up: no ring lives that long (2^63
        // writes); refusing them keeps `seq + 1` and `seq + slots` exact.
        if seq == 0 || seq >= 1 << 63 {
            return None;
        }
        let a = le_u64(&r[16..24]);
        let b = u32::from_le_bytes([r[24], r[25], r[26], 0]);
        let kind = match (r[27] & 0x0f, r[27] >> 4) {
            // A length past u32 was never written by `encode` (found by
            // the ring_recovery fuzz target: it decoded truncated).
            (1, _) if b >= 1 << 23 => return None,
            (1, f @ 0..=3) => RecordKind::Write {
                offset: a,
                len: b << 9,
                fua: f & 1 != 0,
                zeroing: f & 2 != 0,
            },
            (2, 0) if a == 0 && b == 0 => RecordKind::Close,
            (3, 0) => RecordKind::Preserve { block: a, slot: b },
            (4, 0) if b == 0 => RecordKind::Release { below: a },
            _ => return None,
        };
        Some(Record {
            seq,
            epoch: le_u32(&r[8..12]),
            time_ms: le_u32(&r[12..16]),
            kind,
        })
    }
}

/// Magic of the overflow bitmap page.
pub const BITMAP_MAGIC: [u8; 8] = *b"FSNPBITS";
/// Bytes of the overflow bitmap page.
pub const BITMAP_PAGE_BYTES: usize = 4096;

/// The overflow bitmap's page (module doc).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BitmapPage {
    /// The open epoch when the page was written.
    pub epoch: u32,
    /// The bits are in use: writes went there because the ring was full.
    pub degraded: bool,
}

impl BitmapPage {
    /// The page's first 20 bytes (the rest of the page is zero).
    pub fn encode(&self) -> [u8; 20] {
        let mut p = [0u8; 20];
        p[0..8].copy_from_slice(&BITMAP_MAGIC);
        p[8..12].copy_from_slice(&self.epoch.to_le_bytes());
        p[12..16].copy_from_slice(&u32::from(self.degraded).to_le_bytes());
        let crc = crc32c::crc32c(&p[..16]);
        p[16..20].copy_from_slice(&crc.to_le_bytes());
        p
    }

    /// `None` for a page never written (all zero) or damaged: a damaged
    /// page cannot say whether the bits are in use, and the caller treats
    /// that conservatively.
    pub fn decode(p: &[u8]) -> Option<BitmapPage> {
        let p = p.get(..20)?;
        if p[0..8] != BITMAP_MAGIC || crc32c::crc32c(&p[..16]) != le_u32(&p[16..20]) {
            return None;
        }
        Some(BitmapPage {
            epoch: le_u32(&p[8..12]),
            degraded: le_u32(&p[12..16]) & 1 != 0,
        })
    }
}

/// What recovery found in a record area.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Valid records of the last lap, ascending by sequence.
    pub records: Vec<Record>,
    /// Slots inside the last lap that hold no valid record of it: records
    /// whose writes were in flight at the crash.
    pub torn: u64,
    /// The highest sequence found (0 for an empty ring): appending goes on
    /// from `max_seq + 1`.
    pub max_seq: u64,
    /// Slots anywhere in the area that hold neither zeroes nor a valid
    /// record of their slot (module doc).
    pub damaged: u64,
}

/// Recovers the records of a record area (see the module doc).
pub fn recover(area: &[u8]) -> Recovered {
    let slots = (area.len() / RECORD_BYTES) as u64;
    let decoded: Vec<Option<Record>> = area
        .chunks_exact(RECORD_BYTES)
        .enumerate()
        .map(|(i, r)| Record::decode(r).filter(|rec| rec.seq % slots == i as u64))
        .collect();
    let damaged = area
        .chunks_exact(RECORD_BYTES)
        .zip(&decoded)
        .filter(|(r, d)| d.is_none() && r.iter().any(|&b| b != 0))
        .count() as u64;
    let max_seq = decoded.iter().flatten().map(|r| r.seq).max().unwrap_or(0);
    if max_seq == 0 {
        return Recovered {
            damaged,
            ..Recovered::default()
        };
    }
    let low = max_seq.saturating_sub(slots); // exclusive
    let mut records: Vec<Record> = decoded
        .iter()
        .flatten()
        .filter(|r| r.seq > low)
        .copied()
        .collect();
    records.sort_unstable_by_key(|r| r.seq);
    let window = max_seq - low;
    Recovered {
        torn: window - records.len() as u64,
        records,
        max_seq,
        damaged,
    }
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            area_bytes: 8192,
            volume_bytes: 1 << 30,
            block_bytes: 4096,
            volume_id: [7; 16],
            created_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = header();
        let page = h.encode();
        assert_eq!(Header::decode(&page).unwrap(), h);
        assert_eq!(h.slots(), 256);

        let mut bad = page;
        bad[0] = b'X';
        assert_eq!(Header::decode(&bad), Err(FormatError::Magic));
        let mut bad = page;
        bad[8] = 2;
        assert_eq!(Header::decode(&bad), Err(FormatError::Version(2)));
        let mut bad = page;
        bad[30] ^= 1;
        assert_eq!(Header::decode(&bad), Err(FormatError::HeaderChecksum));
        // Every single-bit flip anywhere in the page is caught.
        for bit in (0..HEADER_BYTES * 8).step_by(61) {
            let mut bad = page;
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(Header::decode(&bad).is_err(), "flip of bit {bit} accepted");
        }
    }

    /// The byte layout documented above, pinned: a change of format must
    /// change the version, and this test tells.
    #[test]
    fn version_1_layout_is_pinned() {
        let r = Record {
            seq: 5,
            epoch: 3,
            time_ms: 0x0102_0304,
            kind: RecordKind::Write {
                offset: 8192,
                len: 4096,
                fua: true,
                zeroing: false,
            },
        };
        let b = r.encode();
        assert_eq!(&b[0..8], &5u64.to_le_bytes());
        assert_eq!(&b[8..12], &3u32.to_le_bytes());
        assert_eq!(&b[12..16], &[4, 3, 2, 1]);
        assert_eq!(&b[16..24], &8192u64.to_le_bytes());
        assert_eq!(&b[24..27], &[8, 0, 0], "4096 bytes = 8 sectors");
        assert_eq!(b[27], 0x11, "kind 1 with FUA");
        assert_eq!(&b[28..32], &crc32c::crc32c(&b[..28]).to_le_bytes());
        let h = header().encode();
        assert_eq!(&h[0..8], b"FSNPRING");
        assert_eq!(&h[36..40], &32u32.to_le_bytes());
        assert_eq!(&h[56..64], &1_700_000_000_000u64.to_le_bytes());
        let rel = Record {
            seq: 9,
            epoch: 2,
            time_ms: 0,
            kind: RecordKind::Release { below: 7 },
        }
        .encode();
        assert_eq!(rel[27], 4);
        assert_eq!(&rel[16..24], &7u64.to_le_bytes());
        // 1 GiB of 4 KiB blocks: 262144 bits = 32 KiB, plus the page.
        assert_eq!(header().bitmap_bytes(), 4096 + 32768);
        assert_eq!(header().file_bytes(), 4096 + 8192 + 4096 + 32768);
        let page = BitmapPage {
            epoch: 5,
            degraded: true,
        }
        .encode();
        assert_eq!(&page[0..8], b"FSNPBITS");
        assert_eq!(&page[8..12], &5u32.to_le_bytes());
        assert_eq!(&page[12..16], &1u32.to_le_bytes());
        assert_eq!(&page[16..20], &crc32c::crc32c(&page[..16]).to_le_bytes());
    }

    #[test]
    fn write_lengths_past_u32_are_refused_not_truncated() {
        // Fuzzer input: sectors field 0x80_0000 (4 GiB) with a valid crc.
        let mut r = Record {
            seq: 1,
            epoch: 1,
            time_ms: 0,
            kind: RecordKind::Write {
                offset: 0,
                len: 512,
                fua: false,
                zeroing: false,
            },
        }
        .encode();
        r[24..27].copy_from_slice(&[0, 0, 0x80]);
        let crc = crc32c::crc32c(&r[..28]);
        r[28..32].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Record::decode(&r), None);
        r[24..27].copy_from_slice(&[0xff, 0xff, 0x7f]);
        let crc = crc32c::crc32c(&r[..28]);
        r[28..32].copy_from_slice(&crc.to_le_bytes());
        let d = Record::decode(&r).unwrap();
        assert!(
            matches!(d.kind, RecordKind::Write { len, .. } if u64::from(len) == MAX_RECORD_LEN)
        );
        assert_eq!(d.encode(), r);
    }

    #[test]
    fn records_round_trip() {
        for kind in [
            RecordKind::Write {
                offset: 1 << 40,
                len: 512 << 10,
                fua: false,
                zeroing: false,
            },
            RecordKind::Write {
                offset: 0,
                len: 1 << 30,
                fua: false,
                zeroing: true,
            },
            RecordKind::Write {
                offset: 512,
                len: 512,
                fua: true,
                zeroing: false,
            },
            RecordKind::Close,
            RecordKind::Preserve {
                block: 12345,
                slot: 99,
            },
            RecordKind::Release { below: 1 << 33 },
        ] {
            let r = Record {
                seq: (1 << 63) - 1,
                epoch: 77,
                time_ms: u32::MAX,
                kind,
            };
            assert_eq!(Record::decode(&r.encode()), Some(r));
        }
        assert_eq!(Record::decode(&[0u8; 32]), None, "empty slot");
        let beyond = Record {
            seq: 1 << 63,
            epoch: 1,
            time_ms: 0,
            kind: RecordKind::Close,
        };
        assert_eq!(Record::decode(&beyond.encode()), None, "sequence past 2^63");
    }

    /// A ring written for a while, wrapped, then crashed with some of the
    /// newest slots torn: recovery returns exactly the complete records of
    /// the last lap.
    #[test]
    fn recovery_after_wrap_and_tears() {
        let slots = 64u64;
        let mut area = vec![0u8; (slots as usize) * RECORD_BYTES];
        let rec = |seq: u64| Record {
            seq,
            epoch: (seq / 50) as u32,
            time_ms: seq as u32 * 3,
            kind: RecordKind::Write {
                offset: seq * 4096,
                len: 4096,
                fua: false,
                zeroing: false,
            },
        };
        for seq in 1..=150 {
            let i = (seq % slots) as usize * RECORD_BYTES;
            area[i..i + RECORD_BYTES].copy_from_slice(&rec(seq).encode());
        }
        // 148 was reserved but never written (the slot keeps lap 1's 84);
        // 146 is torn mid-write.
        let i = (148 % slots) as usize * RECORD_BYTES;
        area[i..i + RECORD_BYTES].copy_from_slice(&rec(148 - slots).encode());
        let i = (146 % slots) as usize * RECORD_BYTES;
        area[i + 20] ^= 0xff;
        let r = recover(&area);
        assert_eq!(r.max_seq, 150);
        assert_eq!(r.torn, 2);
        assert_eq!(
            r.damaged, 1,
            "146's slot holds garbage, 148's an old record"
        );
        let seqs: Vec<u64> = r.records.iter().map(|r| r.seq).collect();
        let want: Vec<u64> = (87..=150).filter(|s| *s != 146 && *s != 148).collect();
        assert_eq!(seqs, want);
        assert!(r.records.iter().all(|x| *x == rec(x.seq)));
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic and never yield a record that is
        /// not stored, checksummed, in the slot its sequence names.
        #[test]
        fn recovery_of_garbage_is_safe(area in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)) {
            let r = recover(&area);
            let slots = (area.len() / RECORD_BYTES) as u64;
            for rec in &r.records {
                let i = (rec.seq % slots) as usize * RECORD_BYTES;
                proptest::prop_assert_eq!(&area[i..i + RECORD_BYTES], &rec.encode()[..]);
            }
            proptest::prop_assert!(Header::decode(&area).is_err() || area.len() >= HEADER_BYTES);
        }

        /// The crash model of `kill -9`: records are appended by several
        /// writers that reserve sequence numbers in order but complete them
        /// in any order; at the crash, an arbitrary subset of the reserved
        /// but not yet complete records is torn. Every record whose write
        /// was acknowledged (complete before the crash) is recovered, and
        /// nothing else.
        #[test]
        fn acknowledged_records_survive_a_crash(
            total in 1u64..400,
            in_flight in 0u64..8,
            tear_mask: u8,
            slots_pow in 4u32..8,
        ) {
            let slots = 1u64 << slots_pow;
            let in_flight = in_flight.min(total).min(slots);
            let mut area = vec![0u8; slots as usize * RECORD_BYTES];
            let rec = |seq: u64| Record {
                seq,
                epoch: 1,
                time_ms: 0,
                kind: RecordKind::Write { offset: seq, len: 512, fua: false, zeroing: false },
            };
            let complete = total - in_flight;
            for seq in 1..=complete {
                let i = (seq % slots) as usize * RECORD_BYTES;
                area[i..i + RECORD_BYTES].copy_from_slice(&rec(seq).encode());
            }
            // The in-flight ones: complete, torn, or never started.
            let mut acked: Vec<u64> = ((complete + 1).saturating_sub(slots).max(1)..=complete).collect();
            for (k, seq) in (complete + 1..=total).enumerate() {
                let i = (seq % slots) as usize * RECORD_BYTES;
                match (tear_mask >> k) & 1 {
                    0 => { // finished just before the crash: acknowledged
                        area[i..i + RECORD_BYTES].copy_from_slice(&rec(seq).encode());
                        acked.push(seq);
                    }
                    _ => { // torn: half of it written
                        area[i..i + 16].copy_from_slice(&rec(seq).encode()[..16]);
                    }
                }
            }
            let r = recover(&area);
            let got: Vec<u64> = r.records.iter().map(|x| x.seq).collect();
            acked.sort_unstable();
            // A writer reserves sequence `s` only once the record `s - slots`
            // in its slot is no longer needed, so what must survive is every
            // acknowledged record newer than that ...
            let low = total.saturating_sub(slots);
            for s in acked.iter().filter(|s| **s > low) {
                proptest::prop_assert!(got.contains(s), "acknowledged record {} lost", s);
            }
            // ... and nothing recovered is anything but a complete record.
            for x in &r.records {
                proptest::prop_assert!(acked.contains(&x.seq) || x.seq <= complete, "record {} made up", x.seq);
                proptest::prop_assert_eq!(*x, rec(x.seq));
            }
        }
    }
}
