//! The in-memory tracking state: two bits per tracking block, and per chunk
//! a write version and overwrite statistics. Lock-free: the I/O path uses
//! only atomic read-modify-writes, never a lock or an allocation. (The
//! uploader keeps the blocks its uploads in flight hold under a lock of
//! its own, which the I/O path never takes.)
//!
//! # States of a block
//!
//! | state | meaning | pending upload | changed in the open epoch |
//! |---|---|---|---|
//! | `Clean` | content uploaded, or belongs to no epoch still to upload | no | no |
//! | `Closed` | content on the volume belongs to a closed epoch, not uploaded and not preserved: it must be copied to the preserve area before it is overwritten | yes (closed epoch) | no |
//! | `Uploaded` | written in the open epoch; its latest content is uploaded, or taken by an upload in flight and not written since | no | yes |
//! | `Dirty` | written in the open epoch; its latest content is not uploaded | yes | yes |
//!
//! `Closed` never coexists with a write of the open epoch: the first such
//! write preserves the closed content and only then moves the block to
//! `Dirty`. So two bits say everything, and the map costs 64 MiB per TiB
//! of volume at 4 KiB blocks, plus 16 bytes per chunk (16 MiB per TiB at
//! 1 MiB chunks): 80 MiB per TiB. The blocks held by uploads in flight are
//! a set beside it (a few thousand at most: the workers times a chunk).
//!
//! # Transitions and who makes them
//!
//! - a write (queue thread), [`DirtyMap::start_write`]: `Clean`,
//!   `Uploaded`, `Dirty` → `Dirty`; `Closed` blocks are left alone and
//!   handed back: the caller preserves them and calls
//!   [`DirtyMap::preserved`], `Closed` (or whatever the block became
//!   since) → `Dirty`, before issuing its data;
//! - the close of an epoch, [`DirtyMap::close_epoch`], while the caller
//!   holds writes back: `Dirty` → `Closed`, `Uploaded` → `Clean`, but
//!   `Uploaded` blocks an upload still holds → `Closed`;
//! - the uploader: [`DirtyMap::begin_open`] `Dirty` → `Uploaded` (held)
//!   before reading the open epoch's content, [`DirtyMap::ack_open`]
//!   credits those still `Uploaded` once stored (releasing them),
//!   [`DirtyMap::abort_open`] `Uploaded` → `Dirty` if storing failed;
//!   [`DirtyMap::ack_closed`] `Closed` → `Clean`.
//!
//! # Why it is correct
//!
//! Every transition is a compare-and-swap of the whole 64-bit word that
//! holds the block, so transitions of blocks sharing a word never lose each
//! other. The interesting races are between writers and the uploader:
//!
//! 1. *Stale upload of the open epoch.* Each chunk has a version word:
//!    `seq << 20 | in_flight`. A write bumps both (one `fetch_add`) before
//!    it marks its blocks, and decrements `in_flight` once its data is on
//!    the backing store ([`DirtyMap::write_done`]). The uploader takes
//!    [`DirtyMap::chunk_version`] (none while a write is in flight: every
//!    earlier write's data is then on the volume). `begin_open` moves the
//!    blocks `Dirty` → `Uploaded` and *then* reloads the version: if it
//!    moved, a write started meanwhile and the blocks go back to `Dirty`.
//!    If the writer's marking CAS came after the uploader's in the word's
//!    modification order, it moves the block back to `Dirty` itself; if
//!    it came before, the uploader's acquiring CAS read the writer's
//!    releasing CAS, so the writer's earlier version bump is visible to
//!    the reload. Only then does the uploader read the blocks, store
//!    them, and credit with `ack_open` those still `Uploaded`: a write
//!    that lands on a block after it was taken leaves it `Dirty`, so
//!    content written after the read is never marked uploaded, and a
//!    write to another block of the chunk voids nothing. A block is held
//!    by one upload at a time (another upload's `begin_open` leaves it
//!    out), so no other upload's read can be credited for it.
//! 2. *Closed content overwritten.* A write never moves a `Closed` block;
//!    the preserve step does, after the copy is durable in the preserve
//!    area. The uploader reads a `Closed` block from the volume and checks
//!    that it is still `Closed` afterwards: if so, the writer had not yet
//!    issued its data (it does so only after `preserved`), so the read saw
//!    the closed content; if not, it reads the preserve area instead.
//!    The uploader may also acknowledge the block (`Closed` → `Clean`, its
//!    closed content stored) between the writer's `start_write` and its
//!    preserve step: nothing is left to copy, and `preserved` still marks
//!    the block `Dirty`, so the write is not lost to the open epoch.
//! 3. *The close.* The caller of [`DirtyMap::close_epoch`] guarantees that
//!    no write is between `start_write` and `write_done` and that none
//!    starts until it returns (the epoch switch holds new writes back), so
//!    only the uploader races with it, and it takes the uploader's lock:
//!    an upload's blocks are held when the close comes (→ `Closed`, owed
//!    to the closed epoch, its `ack_open` crediting nothing: each upload
//!    carries the generation it began in) or not (credited before it, or
//!    given back).
//!
//! The loom models at the bottom check 1 and 2 exhaustively for small
//! interleavings; the proptest checks the state machine, uploads in
//! flight across writes and closes included, against a plain reference
//! model.

use std::collections::HashSet;

use crate::sync::{AtomicU32, AtomicU64, Mutex, MutexGuard, Ordering};

/// Blocks per state word: 2 bits each.
const PER_WORD: u64 = 32;
/// Bits of the chunk version word that count writes in flight. 2^20 is
/// far above any queue count x depth (the driver allows 4 x 4096 by
/// default); [`DirtyMap::start_write`] documents the bound.
const INFLIGHT_BITS: u32 = 20;
const INFLIGHT_MASK: u64 = (1 << INFLIGHT_BITS) - 1;

/// State of one tracking block. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    Clean = 0,
    Closed = 1,
    Uploaded = 2,
    Dirty = 3,
}

impl BlockState {
    fn from_bits(b: u64) -> BlockState {
        match b & 3 {
            0 => BlockState::Clean,
            1 => BlockState::Closed,
            2 => BlockState::Uploaded,
            _ => BlockState::Dirty,
        }
    }

    /// Written in the open epoch.
    pub fn changed_in_epoch(self) -> bool {
        matches!(self, BlockState::Uploaded | BlockState::Dirty)
    }

    /// Its latest content is not uploaded.
    pub fn pending(self) -> bool {
        matches!(self, BlockState::Closed | BlockState::Dirty)
    }
}

/// Sizes of the tracking units, as powers of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the tracking block. Default 12 (4 KiB).
    pub block_shift: u32,
    /// log2 of the chunk: the unit of write versions and overwrite
    /// statistics (not the object size, which the uploader chooses).
    /// Default 20 (1 MiB).
    pub chunk_shift: u32,
}

impl Geometry {
    /// The blocks `[first, last]` a byte range touches on a volume of
    /// `blocks` blocks (a range past the end is clamped to the last block).
    #[inline]
    pub fn block_range(&self, offset: u64, len: u64, blocks: u64) -> (u64, u64) {
        let first = offset >> self.block_shift;
        let last = (offset + len.max(1) - 1) >> self.block_shift;
        (first, last.min(blocks.saturating_sub(1)))
    }
}

impl Default for Geometry {
    fn default() -> Self {
        Geometry {
            // 4 KiB: the page size and the usual file system block, so a
            // file system's writes map to whole tracking blocks.
            block_shift: 12,
            // 1 MiB: an upload before the close is voided only by writes
            // to its own MiB, so a log appended to loses at most the MiB
            // it is writing, and the heat map tells hot MiBs from cold
            // ones; 16 bytes per MiB (16 MiB per TiB) is its price. At
            // 4 MiB, the simulator's log-and-pages trace kept the chunk
            // being appended out of every early upload.
            chunk_shift: 20,
        }
    }
}

/// Per-chunk counters: the write version and the overwrite statistics the
/// uploader's heat map samples. 16 bytes; neighbouring chunks share cache
/// lines, which only matters when several queues write adjacent chunks.
#[derive(Debug, Default)]
struct ChunkStats {
    /// `seq << INFLIGHT_BITS | in_flight`.
    version: AtomicU64,
    /// Blocks written (counts each block of each write).
    writes: AtomicU32,
    /// Blocks written that were already written in the open epoch: the
    /// collisions that predictive upload wants to avoid uploading twice.
    overwrites: AtomicU32,
}

/// The blocks of a closed epoch: sorted, disjoint runs `(first, count)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedSet {
    runs: Vec<(u64, u64)>,
}

impl ChangedSet {
    fn push(&mut self, block: u64) {
        match self.runs.last_mut() {
            Some((first, count)) if *first + *count == block => *count += 1,
            _ => self.runs.push((block, 1)),
        }
    }

    /// The set of blocks covered by `ranges` of `(first, last)`, in any
    /// order and overlapping (recovery builds sets from write records).
    pub fn from_ranges(mut ranges: Vec<(u64, u64)>) -> ChangedSet {
        ranges.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match runs.last_mut() {
                Some((f, c)) if first <= *f + *c => *c = (*c).max(last + 1 - *f),
                _ => runs.push((first, last + 1 - first)),
            }
        }
        ChangedSet { runs }
    }

    /// Whether `block` is in the set (binary search).
    pub fn contains(&self, block: u64) -> bool {
        let i = self.runs.partition_point(|&(f, _)| f <= block);
        i > 0 && block < self.runs[i - 1].0 + self.runs[i - 1].1
    }

    /// The runs, ascending.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Every block, ascending.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.runs.iter().flat_map(|&(f, c)| f..f + c)
    }

    pub fn len(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Heap bytes this set holds.
    pub fn memory_bytes(&self) -> usize {
        self.runs.capacity() * std::mem::size_of::<(u64, u64)>()
    }
}

/// See the module doc.
#[derive(Debug)]
pub struct DirtyMap {
    geo: Geometry,
    blocks: u64,
    words: Box<[AtomicU64]>,
    chunks: Box<[ChunkStats]>,
    /// The uploader's side only (never the I/O path): the open epoch's
    /// blocks taken by an upload in flight ([`DirtyMap::begin_open`]).
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    /// Bumped by every close, which releases every block: an upload
    /// begun before it is credited nothing after it.
    generation: u64,
    blocks: HashSet<u64>,
}

/// Blocks of the open epoch an upload took ([`DirtyMap::begin_open`]):
/// `Uploaded` while no write lands on them. Hand it back to
/// [`DirtyMap::ack_open`] once stored, or to [`DirtyMap::abort_open`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenUpload {
    generation: u64,
    /// The blocks taken, ascending: read their content after
    /// `begin_open` returned.
    pub blocks: Vec<u64>,
}

/// What [`DirtyMap::start_write`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteMarks {
    /// Blocks newly `Dirty` or already written in the open epoch.
    pub marked: u64,
    /// Of those, blocks that were already written in the open epoch.
    pub overwrites: u64,
    /// Blocks found `Closed` and pushed to the caller's list.
    pub cow: u64,
}

impl DirtyMap {
    /// A map for a volume of `volume_bytes`, every block `Clean`.
    pub fn new(volume_bytes: u64, geo: Geometry) -> Self {
        let bsize = 1u64 << geo.block_shift;
        let blocks = volume_bytes.div_ceil(bsize);
        let nwords = usize::try_from(blocks.div_ceil(PER_WORD)).expect("volume fits in memory");
        let nchunks = usize::try_from(volume_bytes.div_ceil(1 << geo.chunk_shift))
            .expect("volume fits in memory");
        DirtyMap {
            geo,
            blocks,
            words: (0..nwords).map(|_| AtomicU64::new(0)).collect(),
            chunks: (0..nchunks).map(|_| ChunkStats::default()).collect(),
            taken: Mutex::new(Taken::default()),
        }
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Tracking blocks in the volume.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn chunks(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Bytes of memory the map holds (its whole in-memory state).
    pub fn memory_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.words) + std::mem::size_of_val(&*self.chunks)
    }

    /// The blocks `[first, last]` a byte range touches.
    pub fn block_range(&self, offset: u64, len: u64) -> (u64, u64) {
        self.geo.block_range(offset, len, self.blocks)
    }

    fn chunk_range(&self, offset: u64, len: u64) -> (usize, usize) {
        let first = offset >> self.geo.chunk_shift;
        let last = (offset + len.max(1) - 1) >> self.geo.chunk_shift;
        let max = self.chunks.len().saturating_sub(1);
        (
            usize::try_from(first).map_or(max, |c| c.min(max)),
            usize::try_from(last).map_or(max, |c| c.min(max)),
        )
    }

    /// The state of `block`.
    pub fn state(&self, block: u64) -> BlockState {
        let (w, shift) = locate(block);
        BlockState::from_bits(self.words[w].load(Ordering::Acquire) >> shift)
    }

    /// Applies `f` to the 2-bit state of every block of `[first, last]`
    /// that lies in word `w`, as one CAS; returns the word before.
    fn update_word(&self, w: usize, first: u64, last: u64, f: impl Fn(u64) -> u64) -> u64 {
        self.update_word_with(w, first, last, |_, s| f(s))
    }

    /// [`DirtyMap::update_word`] with `f(block, state)`.
    fn update_word_with(
        &self,
        w: usize,
        first: u64,
        last: u64,
        f: impl Fn(u64, u64) -> u64,
    ) -> u64 {
        let base = w as u64 * PER_WORD;
        let lo = first.max(base) - base;
        let hi = last.min(base + PER_WORD - 1) - base;
        let word = &self.words[w];
        let mut old = word.load(Ordering::Acquire);
        loop {
            let mut new = old;
            for i in lo..=hi {
                let s = (old >> (2 * i)) & 3;
                new = (new & !(3 << (2 * i))) | (f(base + i, s) << (2 * i));
            }
            // Even an unchanged word is CASed: the read-modify-write puts
            // this transition in the word's modification order, which is
            // what makes a writer's earlier version bump visible to an
            // uploader that CASes the word after it (module doc, 1; loom's
            // `ack_open_races_a_write` fails if this skips unchanged words).
            // AcqRel: release our transition to whoever reads the word
            // next, acquire the transitions we build on.
            match word.compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return old,
                Err(cur) => old = cur,
            }
        }
    }

    /// I/O path, before a write of `[offset, offset + len)` is issued:
    /// starts the write on its chunks (version and in-flight count), marks
    /// its blocks `Dirty`, and pushes the blocks found `Closed` onto `cow`:
    /// their content must be preserved, then [`DirtyMap::preserved`], before
    /// the write's data may be issued. Pair with [`DirtyMap::write_done`].
    ///
    /// At most 2^20 - 1 writes may be in flight on one chunk.
    pub fn start_write(&self, offset: u64, len: u64, cow: &mut impl Extend<u64>) -> WriteMarks {
        let (c0, c1) = self.chunk_range(offset, len);
        for c in &self.chunks[c0..=c1] {
            // The version moves before any block does (module doc, 1).
            c.version
                .fetch_add((1 << INFLIGHT_BITS) + 1, Ordering::AcqRel);
        }
        let (first, last) = self.block_range(offset, len);
        let mut marks = WriteMarks::default();
        let (w0, w1) = (locate(first).0, locate(last).0);
        for w in w0..=w1 {
            let old = self.update_word(w, first, last, |s| if s == 1 { 1 } else { 3 });
            let base = w as u64 * PER_WORD;
            for b in first.max(base)..=last.min(base + PER_WORD - 1) {
                match BlockState::from_bits(old >> (2 * (b - base))) {
                    BlockState::Closed => {
                        cow.extend(std::iter::once(b));
                        marks.cow += 1;
                    }
                    s => {
                        marks.marked += 1;
                        if s.changed_in_epoch() {
                            marks.overwrites += 1;
                        }
                    }
                }
            }
        }
        self.count_heat(first, marks.marked, marks.overwrites);
        marks
    }

    fn count_heat(&self, first: u64, marked: u64, overwrites: u64) {
        if marked == 0 {
            return;
        }
        // Statistics only: attributed to the first block's chunk (a write
        // rarely spans chunks); Relaxed, nobody orders anything on them.
        let shift = self.geo.chunk_shift - self.geo.block_shift;
        let c = usize::try_from(first >> shift)
            .unwrap_or(usize::MAX)
            .min(self.chunks.len() - 1);
        let sat = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        self.chunks[c]
            .writes
            .fetch_add(sat(marked), Ordering::Relaxed);
        if overwrites > 0 {
            self.chunks[c]
                .overwrites
                .fetch_add(sat(overwrites), Ordering::Relaxed);
        }
    }

    /// I/O path: `block`'s closed content is preserved (durably, and
    /// findable by the uploader), or no longer needed; the write that found
    /// it `Closed` may proceed. → `Dirty`, from any state: since
    /// [`DirtyMap::start_write`] found it `Closed`, another writer may have
    /// preserved it (`Dirty`, and maybe `Uploaded` since), or the uploader
    /// acknowledged its closed content ([`DirtyMap::ack_closed`]: `Clean`);
    /// either way this write changes it in the open epoch.
    pub fn preserved(&self, block: u64) {
        let (w, _) = locate(block);
        self.update_word(w, block, block, |_| 3);
        self.count_heat(block, 1, 0);
    }

    /// I/O path: the write of `[offset, offset + len)` started by
    /// [`DirtyMap::start_write`] has completed (or failed) on the backing
    /// store.
    pub fn write_done(&self, offset: u64, len: u64) {
        let (c0, c1) = self.chunk_range(offset, len);
        for c in &self.chunks[c0..=c1] {
            // Release: the data write happened before the chunk looks
            // quiet to the uploader.
            c.version.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Uploader: the version of `chunk` to read its open-epoch blocks at,
    /// or `None` while a write to it is in flight.
    pub fn chunk_version(&self, chunk: u64) -> Option<u64> {
        let v = self.chunks[usize::try_from(chunk).ok()?]
            .version
            .load(Ordering::Acquire);
        (v & INFLIGHT_MASK == 0).then_some(v >> INFLIGHT_BITS)
    }

    /// Uploader, before reading: takes those of `blocks` (ascending, of
    /// one chunk) that are `Dirty` for an upload: `Dirty` → `Uploaded`,
    /// remembered as in flight. `None` if the chunk is not at `version`
    /// (from [`DirtyMap::chunk_version`]) any more: a write started since,
    /// take the version again. Blocks another upload holds are left out.
    /// Read the taken blocks' content after this returns; a write that
    /// lands on one meanwhile moves it back to `Dirty` (module doc, 1).
    pub fn begin_open(&self, blocks: &[u64], version: u64) -> Option<OpenUpload> {
        let per_chunk_shift = self.geo.chunk_shift - self.geo.block_shift;
        let first = *blocks.first()?;
        let chunk = first >> per_chunk_shift;
        let c = &self.chunks[usize::try_from(chunk).ok()?];
        let same = || c.version.load(Ordering::Acquire) == version << INFLIGHT_BITS;
        if !same() {
            return None;
        }
        let mut taken = lock(&self.taken);
        let mut up = OpenUpload {
            generation: taken.generation,
            blocks: Vec::new(),
        };
        let held = &taken.blocks;
        let mut rest = blocks
            .iter()
            .copied()
            .filter(|&b| b < self.blocks && b >> per_chunk_shift == chunk)
            .peekable();
        while let Some(&b0) = rest.peek() {
            // The wanted blocks of one state word, as a mask of its slots.
            let (w, _) = locate(b0);
            let base = w as u64 * PER_WORD;
            let mut want = 0u64;
            let mut hi = b0;
            while let Some(&b) = rest.peek().filter(|&&b| b < base + PER_WORD) {
                if !held.contains(&b) {
                    want |= 1 << (b - base);
                }
                hi = b;
                rest.next();
            }
            let wanted = |b: u64| want & (1 << (b - base)) != 0;
            let old =
                self.update_word_with(w, b0, hi, |b, s| if s == 3 && wanted(b) { 2 } else { s });
            for b in b0..=hi {
                if wanted(b) && (old >> (2 * (b - base))) & 3 == 3 {
                    up.blocks.push(b);
                }
            }
        }
        if !same() {
            // A write started between the check and our transition: undo,
            // so that its content is not taken for read (module doc, 1).
            for &b in &up.blocks {
                let (w, _) = locate(b);
                self.update_word(w, b, b, |s| if s == 2 { 3 } else { s });
            }
            return None;
        }
        taken.blocks.extend(&up.blocks);
        Some(up)
    }

    /// Uploader: the blocks `up` took are stored at the destination.
    /// Pushes onto `credited` those still `Uploaded`: no write landed on
    /// them since they were taken, so what was read is their latest
    /// content. The others were written meanwhile and are `Dirty` again:
    /// upload them again. Nothing is credited after a close (the close
    /// turned the blocks in flight into `Closed`); the uploader's lock
    /// orders this with [`DirtyMap::close_epoch`].
    pub fn ack_open(&self, up: &OpenUpload, credited: &mut Vec<u64>) {
        let mut taken = lock(&self.taken);
        if taken.generation != up.generation {
            return;
        }
        for &b in &up.blocks {
            if taken.blocks.remove(&b) && self.state(b) == BlockState::Uploaded {
                credited.push(b);
            }
        }
    }

    /// Uploader: the upload of the blocks `up` took failed: those still
    /// `Uploaded` go back to `Dirty`.
    pub fn abort_open(&self, up: &OpenUpload) {
        let mut taken = lock(&self.taken);
        if taken.generation != up.generation {
            return;
        }
        for &b in &up.blocks {
            if taken.blocks.remove(&b) {
                let (w, _) = locate(b);
                self.update_word(w, b, b, |s| if s == 2 { 3 } else { s });
            }
        }
    }

    /// Blocks of the open epoch taken by uploads in flight.
    pub fn open_in_flight(&self) -> usize {
        lock(&self.taken).blocks.len()
    }

    /// Uploader: `block`'s closed content is uploaded. `Closed` → `Clean`;
    /// a block that was preserved meanwhile (now `Dirty`) is left alone.
    pub fn ack_closed(&self, block: u64) {
        let (w, _) = locate(block);
        self.update_word(w, block, block, |s| if s == 1 { 0 } else { s });
    }

    /// Closes the open epoch: returns its changed blocks and moves `Dirty`
    /// → `Closed`, `Uploaded` → `Clean`, but `Uploaded` blocks an upload
    /// still holds ([`DirtyMap::begin_open`]) → `Closed`: their upload is
    /// not credited, so their content is owed to the closed epoch. The
    /// caller guarantees that no write is in flight and none starts until
    /// this returns (module doc, 3).
    pub fn close_epoch(&self) -> ChangedSet {
        let mut taken = lock(&self.taken);
        let held = std::mem::take(&mut taken.blocks);
        taken.generation += 1;
        let mut set = ChangedSet::default();
        for (w, word) in self.words.iter().enumerate() {
            if word.load(Ordering::Acquire) & 0xAAAA_AAAA_AAAA_AAAA == 0 {
                // No block of this word is Uploaded or Dirty (high bit).
                continue;
            }
            let base = w as u64 * PER_WORD;
            let last = (base + PER_WORD - 1).min(self.blocks - 1);
            let old = self.update_word_with(w, base, last, |b, s| match s {
                3 => 1,
                2 if held.contains(&b) => 1,
                2 => 0,
                s => s,
            });
            for b in base..=last {
                if BlockState::from_bits(old >> (2 * (b - base))).changed_in_epoch() {
                    set.push(b);
                }
            }
        }
        set
    }

    /// Recovery only, before the map is shared: sets blocks `[first,
    /// last]` (clamped to the volume) to `state`.
    pub fn set_recovered(&self, first: u64, last: u64, state: BlockState) {
        let last = last.min(self.blocks.saturating_sub(1));
        if first > last {
            return;
        }
        for w in locate(first).0..=locate(last).0 {
            self.update_word(w, first, last, |_| state as u64);
        }
    }

    /// Heat statistics of `chunk`: blocks written and blocks overwritten
    /// within their epoch, since the map was created.
    pub fn chunk_heat(&self, chunk: u64) -> (u32, u32) {
        let c = &self.chunks[usize::try_from(chunk)
            .unwrap_or(usize::MAX)
            .min(self.chunks.len() - 1)];
        (
            c.writes.load(Ordering::Relaxed),
            c.overwrites.load(Ordering::Relaxed),
        )
    }

    /// The words holding chunk `chunk`'s blocks, and its blocks
    /// `[first, end)`. A chunk of 32 blocks or more holds whole words; a
    /// smaller one shares its word, and callers filter by block range.
    fn chunk_words(&self, chunk: u64) -> (std::ops::Range<usize>, u64, u64) {
        let per_chunk = 1u64 << (self.geo.chunk_shift - self.geo.block_shift);
        let first = chunk.saturating_mul(per_chunk).min(self.blocks);
        let end = first.saturating_add(per_chunk).min(self.blocks);
        if first >= end {
            return (0..0, first, end);
        }
        let w0 = locate(first).0;
        let w1 = locate(end - 1).0;
        (w0..w1 + 1, first, end)
    }

    /// Uploader: the blocks of `chunk` that are `Dirty` (written in the
    /// open epoch, latest content not uploaded), appended to `out` as
    /// volume block numbers, ascending. A snapshot of a moving state: pair
    /// it with [`DirtyMap::chunk_version`] taken before and
    /// [`DirtyMap::ack_open`] after.
    pub fn dirty_blocks(&self, chunk: u64, out: &mut Vec<u64>) {
        let (words, first, end) = self.chunk_words(chunk);
        for w in words {
            let v = self.words[w].load(Ordering::Acquire);
            // Dirty = 11: both bits of the pair set.
            let mut both = v & (v >> 1) & 0x5555_5555_5555_5555;
            let base = w as u64 * PER_WORD;
            while both != 0 {
                let b = base + u64::from(both.trailing_zeros() / 2);
                if (first..end).contains(&b) {
                    out.push(b);
                }
                both &= both - 1;
            }
        }
    }

    /// Uploader: how many blocks of `chunk` are `Dirty` (see
    /// [`DirtyMap::dirty_blocks`]). Relaxed loads: a planning estimate.
    pub fn dirty_count(&self, chunk: u64) -> u64 {
        let (words, first, end) = self.chunk_words(chunk);
        let per_chunk = 1u64 << (self.geo.chunk_shift - self.geo.block_shift);
        if per_chunk < PER_WORD {
            let mut v = Vec::new();
            self.dirty_blocks(chunk, &mut v);
            return v.len() as u64;
        }
        debug_assert!(first % PER_WORD == 0 || first == end);
        words
            .map(|w| {
                let v = self.words[w].load(Ordering::Relaxed);
                u64::from((v & (v >> 1) & 0x5555_5555_5555_5555).count_ones())
            })
            .sum()
    }

    /// Blocks whose latest content is not uploaded (`Closed` or `Dirty`).
    pub fn pending_blocks(&self) -> u64 {
        self.words
            .iter()
            .map(|w| {
                let v = w.load(Ordering::Relaxed);
                // Closed = 01, Dirty = 11: the low bit of each pair.
                u64::from((v & 0x5555_5555_5555_5555).count_ones())
            })
            .sum()
    }
}

/// The uploader's lock: nothing it guards is left half-changed by a
/// panic, so a poisoned lock is taken as it is.
fn lock(m: &Mutex<Taken>) -> MutexGuard<'_, Taken> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Word index and bit shift of `block`.
fn locate(block: u64) -> (usize, u64) {
    (
        usize::try_from(block / PER_WORD).unwrap_or(usize::MAX),
        2 * (block % PER_WORD),
    )
}

#[cfg(all(test, not(foresnap_loom)))]
// Test indices are small; the cast lints guard production arithmetic.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const MIB: u64 = 1 << 20;

    /// Takes `blocks` at `version` and acknowledges them at once: the
    /// credited blocks, or `None` if the version moved.
    fn upload(m: &DirtyMap, blocks: &[u64], version: u64) -> Option<Vec<u64>> {
        let up = m.begin_open(blocks, version)?;
        let mut credited = Vec::new();
        m.ack_open(&up, &mut credited);
        Some(credited)
    }

    /// A byte range maps to the blocks it touches, a zero-length range to
    /// the block at its offset, and a range past the end to the last block;
    /// the map answers as its geometry does.
    #[test]
    fn block_range_touches_and_clamps() {
        let geo = Geometry::default();
        let m = DirtyMap::new(10 * 4096 + 100, geo);
        assert_eq!(m.blocks(), 11);
        for (offset, len, want) in [
            (0, 4096, (0, 0)),
            (4095, 2, (0, 1)),
            (8192, 0, (2, 2)),
            (4096, 3 * 4096, (1, 3)),
            (10 * 4096, 4096, (10, 10)),
            (9 * 4096, 5 * 4096, (9, 10)),
        ] {
            assert_eq!(
                geo.block_range(offset, len, m.blocks()),
                want,
                "{offset}+{len}"
            );
            assert_eq!(m.block_range(offset, len), want, "{offset}+{len}");
        }
    }

    #[test]
    fn budget_is_80_mib_per_tib() {
        // Measured on a 64 GiB map and scaled: the arrays are linear.
        let m = DirtyMap::new(64 << 30, Geometry::default());
        let per_tib = m.memory_bytes() as u64 * 16;
        assert_eq!(per_tib, 80 * MIB);
        assert!(per_tib <= 96 * MIB);
    }

    /// The uploader's per-chunk scan sees exactly the `Dirty` blocks:
    /// not `Uploaded`, not `Closed`, not another chunk's; also with chunks
    /// smaller than a word and a partial last chunk.
    #[test]
    fn dirty_blocks_per_chunk() {
        for (geo, volume) in [
            (Geometry::default(), 9 * MIB + 8192),
            (
                Geometry {
                    block_shift: 16,
                    chunk_shift: 20,
                },
                3 * MIB + 65536,
            ),
        ] {
            let m = DirtyMap::new(volume, geo);
            let bs = 1u64 << geo.block_shift;
            let per = 1u64 << (geo.chunk_shift - geo.block_shift);
            let mut cow = Vec::new();
            let write = |b: u64, n: u64, cow: &mut Vec<u64>| {
                m.start_write(b * bs, n * bs, cow);
                m.write_done(b * bs, n * bs);
            };
            // Chunk 0: blocks 1..=3 dirty, then 2 uploaded; chunk 1 its
            // first block, closed; the partial last chunk its last block.
            write(per, 1, &mut cow);
            m.close_epoch();
            write(1, 3, &mut cow);
            let v = m.chunk_version(0).unwrap();
            assert_eq!(upload(&m, &[1, 2, 3], v), Some(vec![1, 2, 3]));
            write(1, 1, &mut cow);
            write(3, 1, &mut cow);
            let last = m.blocks() - 1;
            write(last, 1, &mut cow);
            let mut out = Vec::new();
            m.dirty_blocks(0, &mut out);
            assert_eq!(out, vec![1, 3], "{geo:?}");
            assert_eq!(m.dirty_count(0), 2);
            out.clear();
            m.dirty_blocks(1, &mut out);
            assert!(out.is_empty(), "closed is not dirty");
            assert_eq!(m.dirty_count(1), 0);
            let lc = m.chunks() - 1;
            out.clear();
            m.dirty_blocks(lc, &mut out);
            assert_eq!(out, vec![last]);
            assert_eq!(m.dirty_count(lc), 1);
            m.dirty_blocks(m.chunks() + 5, &mut out);
            assert_eq!(m.dirty_count(m.chunks() + 5), 0, "past the end: none");
        }
    }

    /// Uploads in flight, block by block: a write voids only the blocks
    /// it writes; a block is held by one upload at a time; a failed upload
    /// gives its blocks back; a close makes the blocks still in flight
    /// `Closed` (owed to the closed epoch) and nothing of it is credited
    /// after.
    #[test]
    fn uploads_in_flight_block_by_block() {
        let m = DirtyMap::new(64 * MIB, Geometry::default());
        let mut cow = Vec::new();
        let write = |b: u64, n: u64, cow: &mut Vec<u64>| {
            m.start_write(b * 4096, n * 4096, cow);
            m.write_done(b * 4096, n * 4096);
        };
        write(0, 6, &mut cow);
        let v = m.chunk_version(0).unwrap();
        let a = m.begin_open(&[0, 1, 2], v).unwrap();
        assert_eq!(a.blocks, vec![0, 1, 2]);
        assert_eq!(m.open_in_flight(), 3);
        let b = m.begin_open(&[2, 3, 4], v).unwrap();
        assert_eq!(b.blocks, vec![3, 4], "block 2 is held by the first");
        write(1, 1, &mut cow); // lands on a taken block
        let mut credited = Vec::new();
        m.ack_open(&a, &mut credited);
        assert_eq!(credited, vec![0, 2], "block 1 was written meanwhile");
        assert_eq!(m.state(1), BlockState::Dirty);
        m.abort_open(&b);
        assert_eq!(m.state(3), BlockState::Dirty, "given back");
        assert_eq!(m.open_in_flight(), 0);
        // A close with an upload in flight.
        let v = m.chunk_version(0).unwrap();
        let c = m.begin_open(&[1, 3], v).unwrap();
        let set = m.close_epoch();
        assert_eq!(set.runs(), &[(0, 6)]);
        assert_eq!(m.state(0), BlockState::Clean, "credited before the close");
        assert_eq!(m.state(1), BlockState::Closed, "in flight: owed");
        assert_eq!(m.state(5), BlockState::Closed);
        m.ack_open(&c, &mut credited);
        assert_eq!(credited, vec![0, 2], "nothing credited after the close");
        m.abort_open(&c);
        assert_eq!(
            m.state(1),
            BlockState::Closed,
            "a late abort changes nothing"
        );
    }

    #[test]
    fn write_close_upload_cycle() {
        let m = DirtyMap::new(64 * MIB, Geometry::default());
        let mut cow = Vec::new();
        let marks = m.start_write(4096, 8192, &mut cow);
        assert_eq!(
            marks,
            WriteMarks {
                marked: 2,
                overwrites: 0,
                cow: 0
            }
        );
        assert_eq!(m.state(1), BlockState::Dirty);
        assert_eq!(m.chunk_version(0), None, "write in flight");
        m.write_done(4096, 8192);
        let v = m.chunk_version(0).unwrap();

        // Overwrite of one block counts as a collision.
        let marks = m.start_write(8192, 4096, &mut cow);
        assert_eq!(marks.overwrites, 1);
        m.write_done(8192, 4096);
        // The version taken before that write is stale now.
        assert_eq!(m.begin_open(&[1, 2], v), None);
        assert_eq!(m.state(1), BlockState::Dirty);
        let v = m.chunk_version(0).unwrap();
        assert_eq!(upload(&m, &[1], v), Some(vec![1]));
        assert_eq!(m.state(1), BlockState::Uploaded);

        let set = m.close_epoch();
        assert_eq!(set.runs(), &[(1, 2)]);
        assert_eq!(m.state(1), BlockState::Clean, "uploaded early");
        assert_eq!(m.state(2), BlockState::Closed);

        // A write to the closed, unuploaded block must preserve it first.
        let marks = m.start_write(0, 3 * 4096, &mut cow);
        assert_eq!(cow, vec![2]);
        assert_eq!(
            marks,
            WriteMarks {
                marked: 2,
                overwrites: 0,
                cow: 1
            }
        );
        assert_eq!(m.state(2), BlockState::Closed);
        m.preserved(2);
        assert_eq!(m.state(2), BlockState::Dirty);
        m.write_done(0, 3 * 4096);
        // The uploader's late ack of the preserved block changes nothing.
        m.ack_closed(2);
        assert_eq!(m.state(2), BlockState::Dirty);
        assert_eq!(m.pending_blocks(), 3);
        assert_eq!(m.chunk_heat(0), (6, 1));
    }

    #[test]
    fn sets_from_ranges_and_recovered_states() {
        let set = ChangedSet::from_ranges(vec![(10, 12), (0, 0), (11, 20), (22, 22), (21, 21)]);
        assert_eq!(set.runs(), &[(0, 1), (10, 13)]);
        assert!(set.contains(0) && set.contains(10) && set.contains(22));
        assert!(!set.contains(1) && !set.contains(9) && !set.contains(23));
        assert!(!ChangedSet::default().contains(0));
        let m = DirtyMap::new(100 * 4096, Geometry::default());
        m.set_recovered(30, 40, BlockState::Closed);
        m.set_recovered(35, 500, BlockState::Dirty);
        assert_eq!(m.state(29), BlockState::Clean);
        assert_eq!(m.state(34), BlockState::Closed);
        assert_eq!(m.state(35), BlockState::Dirty);
        assert_eq!(m.state(99), BlockState::Dirty);
        assert_eq!(m.pending_blocks(), 70);
    }

    #[test]
    fn edges_of_the_volume_and_of_words() {
        // 100 blocks: the last word is partial.
        let m = DirtyMap::new(100 * 4096, Geometry::default());
        let mut cow = Vec::new();
        m.start_write(0, 100 * 4096, &mut cow);
        m.write_done(0, 100 * 4096);
        assert_eq!(m.pending_blocks(), 100);
        let set = m.close_epoch();
        assert_eq!(set.runs(), &[(0, 100)]);
        assert_eq!(set.len(), 100);
        // Sub-block writes touch their whole block; a write crossing a
        // word boundary marks both words.
        m.start_write(31 * 4096 + 100, 200, &mut cow);
        assert_eq!(cow, vec![31]);
        cow.clear();
        m.start_write(31 * 4096 + 4000, 200, &mut cow);
        assert_eq!(cow, vec![31, 32]);
    }

    /// Reference model: per block the content version on the volume, per
    /// closed epoch the blocks and the content version each must have,
    /// and what was uploaded. Invariants 1–3 of DESIGN.md on the map.
    #[derive(Debug, Clone)]
    enum Step {
        Write { first: u64, count: u64 },
        Close,
        BeginOpen { first: u64, count: u64 },
        AckOpen { pick: usize },
        AbortOpen { pick: usize },
        UploadClosed { pick: usize },
    }

    /// The closed epoch that still needs `b`'s volume content (it is that
    /// epoch's content of `b` and nobody preserved it), if any.
    fn needing_epoch(
        closed: &[BTreeMap<u64, u64>],
        preserve: &BTreeMap<(usize, u64), u64>,
        content: &[u64],
        b: u64,
    ) -> Option<usize> {
        closed
            .iter()
            .enumerate()
            .find(|(i, e)| {
                e.get(&b) == Some(&content[b as usize]) && !preserve.contains_key(&(*i, b))
            })
            .map(|(i, _)| i)
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u64..96, 1u64..12).prop_map(|(first, count)| Step::Write { first, count }),
            1 => Just(Step::Close),
            2 => (0u64..96, 1u64..12).prop_map(|(first, count)| Step::BeginOpen { first, count }),
            2 => any::<usize>().prop_map(|pick| Step::AckOpen { pick }),
            1 => any::<usize>().prop_map(|pick| Step::AbortOpen { pick }),
            2 => any::<usize>().prop_map(|pick| Step::UploadClosed { pick }),
        ]
    }

    proptest::proptest! {
        #[test]
        fn matches_the_reference_model(steps in proptest::collection::vec(step(), 1..120)) {
            const BLOCKS: u64 = 100;
            // 16 blocks per chunk, so uploads see chunk versions move.
            let geo = Geometry { block_shift: 12, chunk_shift: 16 };
            let m = DirtyMap::new(BLOCKS * 4096, geo);
            let mut content = vec![0u64; BLOCKS as usize]; // version on the volume
            let mut next = 1u64;
            let mut uploaded: BTreeMap<u64, u64> = BTreeMap::new(); // block -> version uploaded
            let mut open: BTreeSet<u64> = BTreeSet::new(); // written in the open epoch
            // Closed epochs: block -> version it must be uploaded with.
            let mut closed: Vec<BTreeMap<u64, u64>> = Vec::new();
            // Preserved closed content: (epoch, block) -> version.
            let mut preserve: BTreeMap<(usize, u64), u64> = BTreeMap::new();
            // Open-epoch uploads in flight: what they took, the content
            // they read, and the epoch they read it in.
            let mut flights: Vec<(OpenUpload, BTreeMap<u64, u64>, usize)> = Vec::new();
            for s in steps {
                match s {
                    Step::Write { first, count } => {
                        let last = (first + count - 1).min(BLOCKS - 1);
                        // Blocks whose volume content a closed epoch still
                        // needs and nobody preserved: exactly these must be
                        // reported for copy-on-write (invariant 3).

                        let want: Vec<u64> = (first..=last)
                            .filter(|&b| needing_epoch(&closed, &preserve, &content, b).is_some())
                            .collect();
                        let mut cow = Vec::new();
                        m.start_write(first * 4096, (last - first + 1) * 4096, &mut cow);
                        proptest::prop_assert_eq!(&cow, &want);
                        for &b in &cow {
                            let e = needing_epoch(&closed, &preserve, &content, b).unwrap();
                            preserve.insert((e, b), content[b as usize]);
                            m.preserved(b);
                        }
                        for b in first..=last {
                            content[b as usize] = next;
                            next += 1;
                            open.insert(b);
                        }
                        m.write_done(first * 4096, (last - first + 1) * 4096);
                    }
                    Step::Close => {
                        let set = m.close_epoch();
                        let got: BTreeSet<u64> = set.blocks().collect();
                        // Invariant 1/2: the changed set is exactly the
                        // blocks written in the epoch.
                        proptest::prop_assert_eq!(&got, &open);
                        let need: BTreeMap<u64, u64> = open.iter()
                            .filter(|&&b| uploaded.get(&b) != Some(&content[b as usize]))
                            .map(|&b| (b, content[b as usize]))
                            .collect();
                        closed.push(need);
                        open.clear();
                    }
                    Step::BeginOpen { first, count } => {
                        let last = (first + count - 1).min(BLOCKS - 1);
                        let chunk = first >> 4;
                        let last = last.min(chunk * 16 + 15);
                        let v = m.chunk_version(chunk).expect("no write in flight here");
                        let blocks: Vec<u64> = (first..=last).collect();
                        // A close releases the blocks of the uploads before it.
                        let held: BTreeSet<u64> = flights
                            .iter()
                            .filter(|f| f.2 == closed.len())
                            .flat_map(|f| f.0.blocks.iter().copied())
                            .collect();
                        let want: Vec<u64> = blocks
                            .iter()
                            .copied()
                            .filter(|&b| m.state(b) == BlockState::Dirty && !held.contains(&b))
                            .collect();
                        let up = m.begin_open(&blocks, v).expect("the version did not move");
                        // Exactly the dirty blocks no other upload holds.
                        proptest::prop_assert_eq!(&up.blocks, &want);
                        // Read after taking them.
                        let read = up.blocks.iter().map(|&b| (b, content[b as usize])).collect();
                        flights.push((up, read, closed.len()));
                    }
                    Step::AckOpen { pick } => {
                        if flights.is_empty() {
                            continue;
                        }
                        let (up, read, epoch) = flights.remove(pick % flights.len());
                        let mut credited = Vec::new();
                        m.ack_open(&up, &mut credited);
                        if epoch != closed.len() {
                            proptest::prop_assert!(credited.is_empty(), "credited after a close");
                        }
                        for b in credited {
                            // Invariant: only content still the latest is
                            // taken for uploaded.
                            proptest::prop_assert_eq!(read[&b], content[b as usize], "block {}", b);
                            uploaded.insert(b, read[&b]);
                        }
                    }
                    Step::AbortOpen { pick } => {
                        if flights.is_empty() {
                            continue;
                        }
                        let (up, _, _) = flights.remove(pick % flights.len());
                        m.abort_open(&up);
                    }
                    Step::UploadClosed { pick } => {
                        if closed.is_empty() {
                            continue;
                        }
                        let e = pick % closed.len();
                        let Some((&b, &ver)) = closed[e].iter().next() else { continue };
                        // The closed content is in the preserve area if it
                        // was preserved for this epoch, else still on the
                        // volume, which the map then says is Closed.
                        let (got, on_volume) = match preserve.remove(&(e, b)) {
                            Some(v) => (v, false),
                            None => {
                                proptest::prop_assert_eq!(m.state(b), BlockState::Closed);
                                (content[b as usize], true)
                            }
                        };
                        proptest::prop_assert_eq!(got, ver, "epoch {} block {} lost its content", e, b);
                        closed[e].remove(&b);
                        if on_volume {
                            m.ack_closed(b);
                        }
                    }
                }
                for b in 0..BLOCKS {
                    let st = m.state(b);
                    proptest::prop_assert_eq!(st.changed_in_epoch(), open.contains(&b), "block {}", b);
                    let needed = needing_epoch(&closed, &preserve, &content, b).is_some();
                    proptest::prop_assert_eq!(st == BlockState::Closed, needed, "block {}", b);
                    let flying = flights
                        .iter()
                        .find(|f| f.2 == closed.len() && f.0.blocks.contains(&b));
                    if st == BlockState::Uploaded {
                        // Uploaded, or taken and not written since.
                        let have = match flying {
                            Some(f) => f.1.get(&b),
                            None => uploaded.get(&b),
                        };
                        proptest::prop_assert_eq!(have, Some(&content[b as usize]), "block {}", b);
                    }
                }
            }
        }
    }
}
#[cfg(all(test, foresnap_loom))]
mod loom_models {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    fn map() -> Arc<DirtyMap> {
        // One chunk of 4 blocks: every write and upload meet.
        Arc::new(DirtyMap::new(
            4 * 4096,
            Geometry {
                block_shift: 12,
                chunk_shift: 14,
            },
        ))
    }

    /// Writes block 0; returns the chunk version after it.
    fn write_block_0(m: &DirtyMap) -> u64 {
        let mut cow = Vec::new();
        m.start_write(0, 4096, &mut cow);
        m.write_done(0, 4096);
        m.chunk_version(0).unwrap()
    }

    /// Module doc, 1: an upload that takes a block concurrently with a
    /// write to it never credits the written content: the block ends
    /// `Dirty`, and only a block taken after the write's data is on the
    /// volume can be credited (then the write was before the read).
    #[test]
    fn begin_open_races_a_write() {
        loom::model(|| {
            let m = map();
            let v = write_block_0(&m);
            // The volume content: 1 before the write, 2 after.
            let volume = Arc::new(AtomicU64::new(1));
            let w = {
                let (m, volume) = (m.clone(), volume.clone());
                thread::spawn(move || {
                    let mut cow = Vec::new();
                    m.start_write(0, 4096, &mut cow);
                    volume.store(2, Ordering::Release);
                    m.write_done(0, 4096);
                })
            };
            let mut credited = Vec::new();
            let mut read = 0;
            if let Some(up) = m.begin_open(&[0], v) {
                read = volume.load(Ordering::Acquire);
                m.ack_open(&up, &mut credited);
            }
            w.join().unwrap();
            // The second write's content was never read as credited: the
            // block must be pending whatever the interleaving.
            assert_eq!(m.state(0), BlockState::Dirty, "credited={credited:?}");
            assert!(credited.is_empty() || read == 1, "read {read}");
        });
    }

    /// Module doc, 1, block by block: a write to another block of the
    /// chunk during the upload leaves the taken block credited.
    #[test]
    fn a_write_to_another_block_leaves_the_taken_one_credited() {
        loom::model(|| {
            let m = map();
            let v = write_block_0(&m);
            let up = m.begin_open(&[0], v).unwrap();
            let w = {
                let m = m.clone();
                thread::spawn(move || {
                    let mut cow = Vec::new();
                    m.start_write(4096, 4096, &mut cow);
                    m.write_done(4096, 4096);
                })
            };
            let mut credited = Vec::new();
            m.ack_open(&up, &mut credited);
            w.join().unwrap();
            assert_eq!(credited, vec![0]);
            assert_eq!(m.state(0), BlockState::Uploaded);
            assert_eq!(m.state(1), BlockState::Dirty);
        });
    }

    /// Module doc, 2: the uploader of a closed block either sees it still
    /// `Closed` after its read (and the writer has not issued data), or
    /// sees the preserve step done.
    #[test]
    fn closed_read_races_cow() {
        loom::model(|| {
            let m = map();
            let mut cow = Vec::new();
            m.start_write(0, 4096, &mut cow);
            m.write_done(0, 4096);
            m.close_epoch();
            // The volume content: 1 = closed content, 2 = new data.
            let volume = Arc::new(AtomicU64::new(1));
            let preserved = Arc::new(AtomicU64::new(0));
            let w = {
                let (m, volume, preserved) = (m.clone(), volume.clone(), preserved.clone());
                thread::spawn(move || {
                    let mut cow = Vec::new();
                    m.start_write(0, 4096, &mut cow);
                    for b in cow {
                        preserved.store(volume.load(Ordering::Acquire), Ordering::Release);
                        m.preserved(b);
                    }
                    volume.store(2, Ordering::Release);
                    m.write_done(0, 4096);
                })
            };
            let got = if m.state(0) == BlockState::Closed {
                let v = volume.load(Ordering::Acquire);
                if m.state(0) == BlockState::Closed {
                    v
                } else {
                    preserved.load(Ordering::Acquire)
                }
            } else {
                preserved.load(Ordering::Acquire)
            };
            w.join().unwrap();
            assert_eq!(
                got, 1,
                "uploader read content that is not the closed content"
            );
        });
    }
}
