//! Predictive upload in the daemon: the open epoch's blocks stored before
//! its scheduled close, as the [`Planner`] decides, on the real clock and
//! the real destination.
//!
//! # The data flow
//!
//! A scheduler thread ([`run_scheduler`]) closes the volume's epochs at
//! the times of its [`Schedule`] and publishes the next close in
//! [`Deadlines`]. Whenever the uploader owes no closed epoch, it asks the
//! planner for chunks of the open epoch (time to the close from
//! [`Deadlines`], throughput `B` from the link's sampler) and stores each
//! chunk's dirty blocks as *parts* ([`crate::restore::store_part`]):
//!
//! 1. take the chunk's version ([`DirtyMap::chunk_version`]; none while a
//!    write to it is in flight: skip it this round) and its dirty blocks,
//!    and take those blocks for this upload ([`Tracker::begin_open`]);
//! 2. read them from the volume ([`Tracker::read_open`]);
//! 3. store them as a part under a fresh part number (an existing key is
//!    never taken over: it may hold content stored before a crash);
//! 4. acknowledge with [`Tracker::ack_open`]: if the epoch is still open,
//!    the blocks no write landed on since step 1 are credited, and the
//!    part is kept for the snapshot with those blocks only; the others
//!    stay dirty, to be uploaded again, and a part left with none is
//!    deleted (nothing references it). Content written after the read is
//!    thus never taken for uploaded (the dirty map's module doc, 1). If
//!    storing fails, the blocks are given back ([`Tracker::abort_open`]).
//!
//! At the close, [`Uploader::upload_next`] takes the epoch's parts into
//! its manifest and stores only the blocks changed since (the blocks a
//! part holds read as not pending). A crash loses the list of parts: the
//! restarted uploader finds the open epoch's blocks dirty again (the ring
//! recovers them) and uploads them anew; the old parts stay unreferenced
//! at the destination until garbage collection removes them.
//!
//! [`Planner`]: crate::plan::Planner
//! [`Schedule`]: crate::schedule::Schedule
//! [`DirtyMap::chunk_version`]: foresnap_driver::tracking::DirtyMap::chunk_version

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use foresnap_driver::tracking::{OpenUpload, Tracker};

use super::{Part, UploadError, Uploader, lock, pool};
use crate::dest::DestError;
use crate::format::ObjectRef;
use crate::plan::{Plan, PlanInput, Planner};
use crate::restore::store_part;
use crate::schedule::{Schedule, Zone};

/// How often an idle uploader looks for work.
pub const POLL: Duration = Duration::from_millis(100);
/// How often the heat map samples the dirty map's counters.
const HEAT_EVERY: Duration = Duration::from_secs(1);
/// Snapshot timings kept for status.
const HISTORY: usize = 32;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// When a snapshot was scheduled and when it was complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Timing {
    pub snapshot: u32,
    pub scheduled_ms: u64,
    pub completed_ms: u64,
}

impl Timing {
    /// Completion minus scheduled close, seconds (negative: never; a
    /// snapshot completes after its close).
    pub fn lag_s(&self) -> f64 {
        (self.completed_ms as f64 - self.scheduled_ms as f64) / 1000.0
    }
}

/// The planner's last view, for status.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct PlanView {
    /// Milliseconds since the Unix epoch of this view.
    pub at_ms: u64,
    pub open_epoch: u32,
    /// Seconds to the scheduled close.
    pub ts_s: Option<f64>,
    /// Sampled throughput, bytes per second.
    pub rate: Option<f64>,
    pub outstanding_bytes: u64,
    pub open_bytes: u64,
    pub started: bool,
    pub start_in_s: Option<f64>,
    pub predicted_lag_s: Option<f64>,
    pub hot_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Epoch → its scheduled close (ms since the Unix epoch).
    scheduled: BTreeMap<u32, u64>,
    history: VecDeque<Timing>,
    plan: Option<PlanView>,
}

/// A volume's scheduled closes and how its snapshots met them: set by the
/// scheduler, read by the uploader (`TS`) and the control socket.
#[derive(Debug, Default)]
pub struct Deadlines {
    /// The open epoch's scheduled close, ms since the Unix epoch; 0: none.
    next_close_ms: AtomicU64,
    /// Bytes stored before a close and kept.
    sent_early: AtomicU64,
    /// Bytes stored before a close and voided by a later write.
    voided: AtomicU64,
    state: Mutex<State>,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines::default()
    }

    /// The open epoch is to close at `at_ms`.
    pub fn set_next(&self, at_ms: u64) {
        // Relaxed: a plain value read for planning.
        self.next_close_ms.store(at_ms, Ordering::Relaxed);
    }

    /// The scheduler closed `epoch` for its close scheduled at `at_ms`.
    /// (An epoch closed by hand has no scheduled time.)
    pub fn closed(&self, epoch: u32, at_ms: u64) {
        lock(&self.state).scheduled.insert(epoch, at_ms);
    }

    /// No close scheduled (the scheduler stopped).
    pub fn clear_next(&self) {
        self.next_close_ms.store(0, Ordering::Relaxed);
    }

    /// The open epoch's scheduled close, if any.
    pub fn next_close_ms(&self) -> Option<u64> {
        Some(self.next_close_ms.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Snapshot `epoch` is complete at its destination now; returns its
    /// timing if it had a scheduled close (a manual snapshot has none).
    pub fn completed(&self, epoch: u32) -> Option<Timing> {
        let mut st = lock(&self.state);
        let scheduled_ms = st.scheduled.remove(&epoch)?;
        // Epochs below this one are done too (or were never scheduled).
        st.scheduled.retain(|&e, _| e > epoch);
        let t = Timing {
            snapshot: epoch,
            scheduled_ms,
            completed_ms: now_ms(),
        };
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(t);
        log::info!(
            "snapshot {epoch} complete {:.2} s after its scheduled close",
            t.lag_s()
        );
        Some(t)
    }

    /// The last snapshots' timings, oldest first.
    pub fn history(&self) -> Vec<Timing> {
        lock(&self.state).history.iter().copied().collect()
    }

    /// The planner's last view.
    pub fn plan(&self) -> Option<PlanView> {
        lock(&self.state).plan.clone()
    }

    /// Bytes stored before their close and kept, and voided.
    pub fn early_bytes(&self) -> (u64, u64) {
        (
            self.sent_early.load(Ordering::Relaxed),
            self.voided.load(Ordering::Relaxed),
        )
    }

    fn set_plan(&self, view: PlanView) {
        lock(&self.state).plan = Some(view);
    }
}

/// Predictive upload's state in the uploader ([`Uploader::with_early`]).
pub struct Early {
    planner: Planner,
    deadlines: Arc<Deadlines>,
    /// `B`: the link's sampled throughput.
    rate: Box<dyn Fn() -> Option<f64> + Send + Sync>,
    clock: Instant,
    last_heat: Option<Instant>,
    next_part: u32,
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Early")
            .field("planner", &self.planner.config())
            .finish_non_exhaustive()
    }
}

impl Early {
    /// Plans with `planner`, closes from `deadlines`, `B` from `rate`.
    pub fn new(
        planner: Planner,
        deadlines: Arc<Deadlines>,
        rate: Box<dyn Fn() -> Option<f64> + Send + Sync>,
    ) -> Early {
        Early {
            planner,
            deadlines,
            rate,
            clock: Instant::now(),
            last_heat: None,
            // Part numbers start from the clock so that a restarted
            // daemon rarely meets its predecessor's parts (it would skip
            // past them anyway: an existing key is never taken over).
            next_part: u32::try_from(now_ms() / 1000 % u64::from(u32::MAX)).unwrap_or(1) | 1,
        }
    }

    pub fn deadlines(&self) -> &Arc<Deadlines> {
        &self.deadlines
    }

    fn view(&self, input: &PlanInput, plan: &Plan) -> PlanView {
        PlanView {
            at_ms: now_ms(),
            open_epoch: input.open_epoch,
            ts_s: input.ts_s,
            rate: input.rate,
            outstanding_bytes: plan.outstanding_bytes,
            open_bytes: plan.open_bytes,
            started: plan.started,
            start_in_s: plan.start_in_s,
            predicted_lag_s: plan.predicted_lag_s,
            hot_bytes: plan.hot_bytes,
        }
    }
}

/// A fresh non-zero part number.
fn take_part(next: &AtomicU32) -> u32 {
    loop {
        // Relaxed: uniqueness comes from the atomic increment alone.
        let p = next.fetch_add(1, Ordering::Relaxed);
        if p != 0 {
            return p;
        }
    }
}

impl Uploader {
    /// One round of predictive upload, when no closed epoch is owed:
    /// plans, and stores the chosen chunks of the open epoch as parts
    /// (module doc). Returns whether it stored anything.
    pub fn upload_early(&mut self) -> Result<bool, UploadError> {
        let Some(early) = self.early.as_mut() else {
            return Ok(false);
        };
        let map = self.tracker.map();
        let now = early.clock.elapsed().as_secs_f64();
        if early.last_heat.is_none_or(|t| t.elapsed() >= HEAT_EVERY) {
            early.planner.sample(map, now);
            early.last_heat = Some(Instant::now());
        }
        let epoch = self.tracker.open_epoch();
        let wall = now_ms();
        let input = PlanInput {
            now_s: now,
            ts_s: early
                .deadlines
                .next_close_ms()
                .map(|c| (c as f64 - wall as f64) / 1000.0),
            rate: (early.rate)(),
            closed_pending_bytes: 0,
            open_epoch: epoch,
        };
        let plan = early.planner.plan(map, &input, 2 * self.workers);
        early.deadlines.set_plan(early.view(&input, &plan));
        if plan.chunks.is_empty() {
            return Ok(false);
        }
        let ts_s = input.ts_s;
        let next_part = AtomicU32::new(early.next_part);
        let deadlines = early.deadlines.clone();
        let stored: Mutex<Vec<(u64, Part)>> = Mutex::new(Vec::new());
        let queue = Mutex::new(plan.chunks.into_iter());
        let map_chunk = 1usize << map.geometry().chunk_shift;
        pool(
            self.workers,
            map_chunk.max(self.chunk_bytes as usize),
            || lock(&queue).next(),
            |chunk, buf| {
                let parts = self.store_parts(epoch, chunk, ts_s, buf, &next_part, &deadlines)?;
                lock(&stored).extend(parts);
                Ok(())
            },
        )?;
        let stored = stored.into_inner().unwrap_or_else(|p| p.into_inner());
        let per_object = u64::from(self.chunk_bytes >> map.geometry().block_shift);
        if let Some(e) = self.early.as_mut() {
            e.next_part = next_part.into_inner();
            let credited: Vec<u64> = stored
                .iter()
                .flat_map(|(c, p)| p.blocks.iter().map(move |&i| c * per_object + u64::from(i)))
                .collect();
            e.planner.uploaded(epoch, &credited);
        }
        let any = !stored.is_empty();
        let epoch_parts = self.parts.entry(epoch).or_default();
        for (chunk, part) in stored {
            epoch_parts.entry(chunk).or_default().push(part);
        }
        Ok(any)
    }

    /// Stores the dirty blocks of map chunk `chunk` as parts (one per
    /// object chunk they fall in) and acknowledges them; returns the kept
    /// parts by object chunk (none if a write voided them).
    fn store_parts(
        &self,
        epoch: u32,
        chunk: u64,
        ts_s: Option<f64>,
        buf: &mut [u8],
        next_part: &AtomicU32,
        deadlines: &Deadlines,
    ) -> Result<Vec<(u64, Part)>, UploadError> {
        let map = self.tracker.map();
        let geo = map.geometry();
        // Object chunks may be larger or smaller than the map's chunks.
        let per_object = u64::from(self.chunk_bytes >> geo.block_shift);
        let per_map = 1u64 << (geo.chunk_shift - geo.block_shift);
        if per_object >= per_map {
            let oc = chunk * per_map / per_object;
            if self.chain_after_parts(epoch, oc) + 1 >= self.max_deltas {
                return self.store_full_part(epoch, oc, buf, next_part, deadlines);
            }
        }
        let Some(version) = map.chunk_version(chunk) else {
            return Ok(Vec::new()); // a write in flight: next round
        };
        let mut dirty = Vec::new();
        match &self.early {
            Some(e) => e.planner.select(map, chunk, ts_s, &mut dirty),
            None => map.dirty_blocks(chunk, &mut dirty),
        }
        if dirty.is_empty() {
            return Ok(Vec::new()); // only hot blocks: later
        }
        // Taken before the read: a write landing on a block from here on
        // keeps that block (only) from being credited.
        let Some(up) = self.tracker.begin_open(epoch, &dirty, version) else {
            return Ok(Vec::new()); // a write started, or the close came: next round
        };
        if up.blocks.is_empty() {
            return Ok(Vec::new()); // another upload holds them
        }
        let parts = match self.put_taken(epoch, &up.blocks, buf, next_part) {
            Ok(p) => p,
            Err(e) => {
                self.tracker.abort_open(epoch, &up);
                return Err(e);
            }
        };
        let mut credited = Vec::new();
        self.tracker.ack_open(epoch, &up, &mut credited);
        Ok(self.keep_credited(parts, &credited, deadlines))
    }

    /// Reads the taken `blocks` (one map chunk's) and stores them as parts,
    /// one per object chunk they fall in; returns the parts by object
    /// chunk and the bytes sent.
    fn put_taken(
        &self,
        epoch: u32,
        blocks: &[u64],
        buf: &mut [u8],
        next_part: &AtomicU32,
    ) -> Result<(Vec<(u64, Part)>, u64), UploadError> {
        let geo = self.tracker.map().geometry();
        let bs = 1usize << geo.block_shift;
        let per_object = u64::from(self.chunk_bytes >> geo.block_shift);
        for (j, &b) in blocks.iter().enumerate() {
            self.tracker
                .read_open(b, &mut buf[j * bs..(j + 1) * bs])
                .map_err(UploadError::ReadOpen)?;
        }
        let mut groups: BTreeMap<u64, Vec<(u32, &[u8])>> = BTreeMap::new();
        for (j, &b) in blocks.iter().enumerate() {
            let idx = u32::try_from(b % per_object).unwrap_or(u32::MAX);
            groups
                .entry(b / per_object)
                .or_default()
                .push((idx, &buf[j * bs..(j + 1) * bs]));
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut sent = 0;
        for (object_chunk, blocks) in &groups {
            let (r, n) = self.put_part(epoch, *object_chunk, blocks, next_part)?;
            sent += n;
            let idx = blocks.iter().map(|&(i, _)| i).collect();
            parts.push((
                *object_chunk,
                Part {
                    r,
                    blocks: idx,
                    full: false,
                },
            ));
        }
        Ok((parts, sent))
    }

    /// Keeps of `parts` the `credited` blocks (volume block numbers); a
    /// part left with none is deleted (nothing references it). Counts the
    /// bytes sent as early or voided, in proportion.
    fn keep_credited(
        &self,
        (mut parts, sent): (Vec<(u64, Part)>, u64),
        credited: &[u64],
        deadlines: &Deadlines,
    ) -> Vec<(u64, Part)> {
        let per_object = u64::from(self.chunk_bytes >> self.tracker.map().geometry().block_shift);
        let credited: std::collections::HashSet<u64> = credited.iter().copied().collect();
        let total: usize = parts.iter().map(|(_, p)| p.blocks.len()).sum();
        for (c, p) in &mut parts {
            p.blocks
                .retain(|&i| credited.contains(&(*c * per_object + u64::from(i))));
        }
        let kept: usize = parts.iter().map(|(_, p)| p.blocks.len()).sum();
        let early = sent * kept as u64 / total.max(1) as u64;
        deadlines.sent_early.fetch_add(early, Ordering::Relaxed);
        deadlines.voided.fetch_add(sent - early, Ordering::Relaxed);
        parts.retain(|(c, p)| {
            if p.blocks.is_empty() {
                // Unreferenced: removing it only saves space.
                if let Err(e) = self.dest.delete(&self.keys.object(*c, p.r)) {
                    log::debug!("voided part left at the destination: {e}");
                }
            }
            !p.blocks.is_empty()
        });
        parts
    }
}

impl Uploader {
    /// Deltas object chunk `oc`'s chain will hold once this epoch's parts
    /// so far are adopted: the parent's, and the parts since the last full
    /// one.
    fn chain_after_parts(&self, epoch: u32, oc: u64) -> usize {
        let parts = self
            .parts
            .get(&epoch)
            .and_then(|p| p.get(&oc))
            .map_or(&[][..], Vec::as_slice);
        match parts.iter().rposition(|p| p.full) {
            Some(i) => parts.len() - i,
            None => {
                let parent = self
                    .last
                    .as_ref()
                    .and_then(|m| m.chunks.get(usize::try_from(oc).ok()?))
                    .map_or(0, |refs| {
                        refs.iter()
                            .filter(|r| r.kind == crate::format::ObjectKind::Delta)
                            .count()
                    });
                parent + parts.len()
            }
        }
    }

    /// Stores a part under a fresh part number; returns it and the bytes
    /// sent.
    fn put_part(
        &self,
        epoch: u32,
        object_chunk: u64,
        blocks: &[(u32, &[u8])],
        next_part: &AtomicU32,
    ) -> Result<(ObjectRef, u64), UploadError> {
        let block_shift = self.tracker.map().geometry().block_shift;
        let per_object = self.chunk_bytes >> block_shift;
        let mut tries = 0;
        loop {
            let r = ObjectRef::part(epoch, take_part(next_part));
            match store_part(
                self.dest.as_ref(),
                &self.keys,
                object_chunk,
                r,
                1 << block_shift,
                per_object,
                blocks,
                self.codec,
            ) {
                Ok(n) => return Ok((r, n)),
                // Left by a predecessor: take the next number.
                Err(DestError::AlreadyExists { .. }) if tries < 64 => tries += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Compaction before the close: object chunk `oc`, whose chain would
    /// grow past the delta bound, is stored whole (every block, as a part
    /// with all blocks present), so that at the close the snapshot drops
    /// the chain before it instead of folding it then. Blocks the epoch
    /// had not changed read as their last snapshot's content (the volume
    /// changes only through tracked writes); those it had are credited as
    /// for any part, per map chunk. Even a map chunk whose credit fails
    /// leaves the part a correct base: its dirty blocks stay pending and
    /// go up after it.
    fn store_full_part(
        &self,
        epoch: u32,
        oc: u64,
        buf: &mut [u8],
        next_part: &AtomicU32,
        deadlines: &Deadlines,
    ) -> Result<Vec<(u64, Part)>, UploadError> {
        let map = self.tracker.map();
        let geo = map.geometry();
        let bs = 1usize << geo.block_shift;
        let per_object = u64::from(self.chunk_bytes >> geo.block_shift);
        let per_map = 1u64 << (geo.chunk_shift - geo.block_shift);
        let first = oc * per_object;
        let end = (first + per_object).min(map.blocks());
        // Every map chunk's dirty blocks taken, before the reads.
        let mut ups = Vec::new();
        let abort = |ups: &[OpenUpload]| {
            for up in ups {
                self.tracker.abort_open(epoch, up);
            }
        };
        let mut m = first / per_map;
        while m * per_map < end {
            let mut dirty = Vec::new();
            map.dirty_blocks(m, &mut dirty);
            if !dirty.is_empty() {
                let taken = map
                    .chunk_version(m)
                    .and_then(|v| self.tracker.begin_open(epoch, &dirty, v));
                let Some(up) = taken else {
                    // A write in flight or started, or the close came.
                    abort(&ups);
                    return Ok(Vec::new());
                };
                ups.push(up);
            }
            m += 1;
        }
        let stored = (|| {
            for b in first..end {
                let at = usize::try_from(b - first).unwrap_or(usize::MAX) * bs;
                self.tracker
                    .read_open(b, &mut buf[at..at + bs])
                    .map_err(UploadError::ReadOpen)?;
            }
            let blocks: Vec<(u32, &[u8])> = (0..end - first)
                .map(|i| {
                    let at = usize::try_from(i).unwrap_or(usize::MAX) * bs;
                    (u32::try_from(i).unwrap_or(u32::MAX), &buf[at..at + bs])
                })
                .collect();
            self.put_part(epoch, oc, &blocks, next_part)
        })();
        let (r, sent) = match stored {
            Ok(s) => s,
            Err(e) => {
                abort(&ups);
                return Err(e);
            }
        };
        let mut taken = Vec::new();
        for up in &ups {
            self.tracker.ack_open(epoch, up, &mut taken);
        }
        let mut credited: Vec<u32> = taken
            .iter()
            .map(|&b| u32::try_from(b - first).unwrap_or(u32::MAX))
            .collect();
        if credited.is_empty() && self.tracker.open_epoch() != epoch {
            // Closed meanwhile: the part is nobody's.
            deadlines.voided.fetch_add(sent, Ordering::Relaxed);
            if let Err(e) = self.dest.delete(&self.keys.object(oc, r)) {
                log::debug!("voided part left at the destination: {e}");
            }
            return Ok(Vec::new());
        }
        deadlines.sent_early.fetch_add(sent, Ordering::Relaxed);
        credited.sort_unstable();
        Ok(vec![(
            oc,
            Part {
                r,
                blocks: credited,
                full: true,
            },
        )])
    }
}

/// Closes `tracker`'s epochs at the times of `schedule` until `stop` is
/// set, publishing each next close in `deadlines`. A close is never
/// delayed by uploads (they run on other threads); one missed while the
/// machine slept is taken at once, and the schedule resumes after it.
pub fn run_scheduler(
    schedule: &Schedule,
    zone: Zone,
    tracker: &Tracker,
    deadlines: &Deadlines,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Relaxed) {
        let now = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
        let Some(next) = schedule.next_after(now, zone) else {
            log::warn!("schedule {schedule} fires no more: no further snapshots");
            deadlines.clear_next();
            return;
        };
        let at_ms = u64::try_from(next).unwrap_or(0) * 1000;
        deadlines.set_next(at_ms);
        loop {
            if stop.load(Ordering::Relaxed) {
                deadlines.clear_next();
                return;
            }
            let left = at_ms.saturating_sub(now_ms());
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(left.min(100)));
        }
        match tracker.close() {
            Ok(c) => {
                deadlines.closed(c.epoch, at_ms);
                log::info!(
                    "scheduled snapshot {} closed: {} blocks changed, writes paused {} us",
                    c.epoch,
                    c.blocks,
                    c.pause.as_micros()
                );
            }
            Err(e) => log::error!("scheduled close failed: {e}"),
        }
    }
    deadlines.clear_next();
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::dest::{DestError, Destination, DirDestination, PutFilter};
    use crate::format::{Codec, Keys, ObjectKind};
    use crate::plan::{PlanConfig, Policy};
    use crate::restore::{read_manifest, restore_image};
    use foresnap_driver::tracking::{BlockState, TrackerConfig};
    use std::fs::File;

    const MIB: u64 = 1 << 20;

    /// An uploader whose planner starts at once (eager: every dirty chunk
    /// whenever asked), with `object` byte objects.
    fn early_uploader(
        t: &Arc<Tracker>,
        dest: Arc<dyn Destination>,
        object: u32,
        workers: usize,
    ) -> Uploader {
        let planner = Planner::new(
            t.map(),
            PlanConfig {
                policy: Policy::Eager,
                ..PlanConfig::default()
            },
        );
        let early = Early::new(planner, Arc::new(Deadlines::new()), Box::new(|| None));
        Uploader::new(
            t.clone(),
            dest,
            Keys::new("v").unwrap(),
            object,
            Codec::Zstd(1),
        )
        .unwrap()
        .with_pool(workers, 1 << 30)
        .unwrap()
        .with_early(early)
    }

    fn restored(dest: &dyn Destination, dir: &std::path::Path, id: u32) -> Vec<u8> {
        let keys = Keys::new("v").unwrap();
        let m = read_manifest(dest, &keys, id).unwrap();
        let out = dir.join(format!("restored-{id}-{}", now_ms()));
        restore_image(dest, &keys, &m, &out, 2, |_, _| {}).unwrap();
        std::fs::read(&out).unwrap()
    }

    /// xorshift64*: a seeded stream of numbers for the random workloads.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn write(t: &Tracker, vol: &File, rng: &mut Rng, size: u64) {
        let blocks = size / 4096;
        let n = 1 + rng.below(8);
        let b = rng.below(blocks - n);
        let fill = rng.next().to_le_bytes();
        let data: Vec<u8> = (0..n * 4096)
            .map(|i| fill[(i % 8) as usize] ^ (i / 4096) as u8)
            .collect();
        t.write_volume(vol, b * 4096, &data).unwrap();
    }

    /// Invariant 2 with parts: random writes, rounds of early upload and
    /// closes interleaved at random; every snapshot restores to the image
    /// at its close, whether its blocks went up before the close (as
    /// parts, then overwritten or not) or after. Object chunks of one map
    /// chunk (1 MiB) and of several (4, 8 MiB); delta chains bounded at 8,
    /// 2 and 1, so that chunks are also stored whole before the close
    /// (compaction ahead of time, `full` parts).
    #[test]
    fn parts_before_the_close_restore_exactly() {
        for (seed, object, max_deltas) in [
            (1u64, 1u32 << 20, 8),
            (7, 4 << 20, 2),
            (42, 8 << 20, 8),
            (5, 4 << 20, 1),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let size = 12 * MIB + 8192;
            let (t, vol, _) = super::super::tests::tracked_volume(dir.path(), size);
            let dest: Arc<dyn Destination> =
                Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
            let mut up = early_uploader(&t, dest.clone(), object, 3).with_max_deltas(max_deltas);
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut full_seen = false;
            let mut images = Vec::new();
            for _ in 0..6 {
                for _ in 0..(20 + rng.below(40)) {
                    write(&t, &vol, &mut rng, size);
                    if rng.below(6) == 0 {
                        up.upload_early().unwrap();
                        full_seen |= up
                            .parts
                            .values()
                            .flat_map(|c| c.values())
                            .flatten()
                            .any(|p| p.full);
                    }
                }
                let c = t.close().unwrap();
                images.push((c.epoch, std::fs::read(dir.path().join("vol")).unwrap()));
                while up.upload_next().unwrap().is_some() {}
            }
            let (kept, voided) = up.early.as_ref().unwrap().deadlines().early_bytes();
            assert!(kept > 0, "parts were stored before the closes");
            let _ = voided;
            let mut parts_seen = false;
            for (id, image) in &images {
                let m = read_manifest(dest.as_ref(), &Keys::new("v").unwrap(), *id).unwrap();
                parts_seen |= m.has_parts();
                assert!(
                    &restored(dest.as_ref(), dir.path(), *id) == image,
                    "seed {seed}, object {object}: snapshot {id} differs from the image at its close"
                );
            }
            assert!(parts_seen, "some manifest references parts");
            assert!(
                full_seen || max_deltas > 2,
                "a tight bound stores chunks whole early"
            );
        }
    }

    /// A destination that writes `len` bytes of 0xee at `at` on the
    /// volume while the first part is being stored: the write lands
    /// between the read and the acknowledgement, as a real one racing the
    /// upload would.
    #[derive(Debug)]
    struct Racing {
        inner: DirDestination,
        tracker: Mutex<Option<(Arc<Tracker>, File)>>,
        at: u64,
        len: usize,
    }

    impl PutFilter for Racing {
        fn inner(&self) -> &dyn Destination {
            &self.inner
        }

        fn filtered_put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
            if key.contains(".p")
                && let Some((t, vol)) = lock(&self.tracker).take()
            {
                t.write_volume(&vol, self.at, &vec![0xee; self.len])
                    .unwrap();
            }
            self.inner.put(key, bytes)
        }
    }

    fn racing(
        t: &Arc<Tracker>,
        vol: &File,
        dir: &std::path::Path,
        at: u64,
        len: usize,
    ) -> Arc<Racing> {
        Arc::new(Racing {
            inner: DirDestination::open(&dir.join("dest")).unwrap(),
            tracker: Mutex::new(Some((t.clone(), vol.try_clone().unwrap()))),
            at,
            len,
        })
    }

    /// A write racing the upload of its chunk voids the blocks it writes,
    /// and only those: the part keeps the others, the written ones stay
    /// dirty, and the snapshot carries the content written last.
    #[test]
    fn a_write_during_the_upload_voids_the_blocks_it_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (t, vol, _) = super::super::tests::tracked_volume(dir.path(), 4 * MIB);
        let racing = racing(&t, &vol, dir.path(), 4096, 4096);
        let mut up = early_uploader(&t, racing.clone(), 4 << 20, 1);
        t.write_volume(&vol, 0, &[0x11; 8192]).unwrap();
        assert!(up.upload_early().unwrap(), "block 0 is credited");
        let (kept, voided) = up.early.as_ref().unwrap().deadlines().early_bytes();
        assert!(kept > 0 && voided > 0, "{kept} {voided}");
        assert_eq!(t.map().state(0), BlockState::Uploaded);
        assert_eq!(t.map().state(1), BlockState::Dirty, "written meanwhile");
        // The next round stores block 1 for good.
        assert!(up.upload_early().unwrap());
        assert_eq!(t.map().dirty_count(0), 0);
        t.close().unwrap();
        let image = std::fs::read(dir.path().join("vol")).unwrap();
        assert_eq!(&image[..4096], &[0x11; 4096]);
        assert_eq!(&image[4096..8192], &[0xee; 4096]);
        up.upload_next().unwrap().unwrap();
        let m = read_manifest(racing.as_ref(), &Keys::new("v").unwrap(), 1).unwrap();
        assert_eq!(m.chunks[0].len(), 2, "block 0's part, then block 1's");
        for r in &m.chunks[0] {
            assert_eq!(r.kind, ObjectKind::Delta);
            assert_ne!(r.part, 0, "the parts are the snapshot's data");
        }
        assert!(restored(racing.as_ref(), dir.path(), 1) == image);
    }

    /// A write over every block of the part voids it whole: not credited,
    /// deleted, the blocks stay dirty.
    #[test]
    fn a_write_over_the_whole_part_voids_and_deletes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (t, vol, _) = super::super::tests::tracked_volume(dir.path(), 4 * MIB);
        let racing = racing(&t, &vol, dir.path(), 0, 8192);
        let mut up = early_uploader(&t, racing.clone(), 4 << 20, 1);
        t.write_volume(&vol, 0, &[0x11; 8192]).unwrap();
        assert!(!up.upload_early().unwrap(), "the only part was voided");
        let (kept, voided) = up.early.as_ref().unwrap().deadlines().early_bytes();
        assert_eq!(kept, 0);
        assert!(voided > 0);
        assert!(
            racing.inner.list("v/objects/").unwrap().is_empty(),
            "the voided part was deleted"
        );
        assert_eq!(t.map().dirty_count(0), 2, "blocks stay dirty");
        assert!(up.upload_early().unwrap());
        t.close().unwrap();
        let image = std::fs::read(dir.path().join("vol")).unwrap();
        assert_eq!(&image[..8192], &[0xee; 8192]);
        up.upload_next().unwrap().unwrap();
        assert!(restored(racing.as_ref(), dir.path(), 1) == image);
    }

    /// A crash loses the list of parts: the restarted uploader uploads the
    /// recovered open epoch again (stepping over the old part numbers) and
    /// the snapshot is exact; the old parts are merely unreferenced.
    #[test]
    fn parts_survive_a_restart_as_garbage_only() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * MIB;
        let (t, vol, cfg) = super::super::tests::tracked_volume(dir.path(), size);
        let dest: Arc<dyn Destination> =
            Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
        let mut rng = Rng(99);
        let mut up = early_uploader(&t, dest.clone(), 4 << 20, 2);
        if let Some(e) = up.early.as_mut() {
            e.next_part = 1;
        }
        for _ in 0..30 {
            write(&t, &vol, &mut rng, size);
        }
        assert!(up.upload_early().unwrap());
        let before = dest.list("v/objects/").unwrap().len();
        assert!(before > 0);
        // Crash: drop everything without a close; reopen from the ring.
        drop(up);
        drop(t);
        let vp = dir.path().join("vol");
        let (t, report) = Tracker::open(
            &TrackerConfig {
                ring: cfg.ring.clone(),
                ..cfg.clone()
            },
            &vp,
            size,
            1,
        )
        .unwrap();
        assert!(report.open_blocks > 0);
        let t = Arc::new(t);
        let mut up = early_uploader(&t, dest.clone(), 4 << 20, 2);
        // The new part numbers start where the old ones did.
        if let Some(e) = up.early.as_mut() {
            e.next_part = 1;
        }
        for _ in 0..10 {
            write(&t, &vol, &mut rng, size);
        }
        assert!(up.upload_early().unwrap());
        t.close().unwrap();
        let image = std::fs::read(&vp).unwrap();
        up.upload_next().unwrap().unwrap();
        assert!(restored(dest.as_ref(), dir.path(), 1) == image);
    }
}
