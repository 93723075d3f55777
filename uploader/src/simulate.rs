//! The upload simulator: replays a block trace on a virtual clock against
//! the real [`DirtyMap`] and the real [`Planner`], over a link model, and
//! reports when each scheduled snapshot would have been complete.
//!
//! # What is simulated, and what is the product's own code
//!
//! - Writes: each traced write goes through [`DirtyMap::start_write`] and
//!   [`DirtyMap::write_done`] at its time, as on the I/O path; a write to a
//!   block a closed epoch still owes is preserved at once
//!   ([`DirtyMap::preserved`]: copy-on-write costs no link time).
//! - Closes: at every multiple of the interval after the first write,
//!   [`DirtyMap::close_epoch`], as the scheduler does.
//! - Uploads: one object at a time over a link of a fixed rate (no
//!   per-request latency: the rate is the only cost). The closed epochs go
//!   first, oldest first, chunk by chunk ([`crate::engine`] does the same);
//!   while none is owed, the [`Planner`] decides whether the open epoch's
//!   upload has started and which chunk goes next, from the time to the
//!   close, the dirty map, its heat map and the throughput sampled from
//!   the link's transfers by the same [`ThroughputSampler`] the daemon
//!   uses. A chunk's dirty blocks are taken at its chunk version
//!   ([`DirtyMap::begin_open`]) when the transfer starts and credited
//!   ([`DirtyMap::ack_open`]) when it ends: a write to a block meanwhile
//!   voids that block's upload, exactly as in the daemon, and its bytes
//!   count as sent in vain.
//! - The oracle knows the future: each block's content is uploaded once
//!   it is final in its epoch (after its last write before the close), in
//!   the order they become final, with no byte sent twice. No policy that
//!   uploads each block's final content can complete a snapshot earlier
//!   on the same link, so it is a lower bound on the lag (at block, not
//!   chunk, granularity; it does not run the planner).
//! - The rate oracle is a study between the two: the planner, told each
//!   block's mean write rate over the whole trace (writes to it / the
//!   trace's span) in place of its heat map's estimates
//!   ([`Planner::set_block_rates`]). It knows how hot every block is but
//!   not when it is written, so it marks what perfect heat estimates
//!   could gain and what no causal policy avoids.
//!
//! # What is reported
//!
//! Per snapshot: the scheduled close, the completion (the last of its
//! blocks stored), the lag between the two, the bytes sent for it (before
//! and after the close, voided ones included) and its minimal bytes (its
//! distinct changed tracking blocks). The summary gives the median and
//! p95 lag, the totals, the amplification (sent / minimal) and the
//! fraction of the time the link was busy. Snapshots whose close falls
//! after the end of the trace are not reported.

use std::collections::{BTreeMap, HashMap, VecDeque};

use foresnap_driver::tracking::{BlockState, DirtyMap, Geometry, OpenUpload};

use crate::link::ThroughputSampler;
use crate::plan::{PlanConfig, PlanInput, Planner, Policy};
use crate::trace::TraceWrite;

/// Which uploader the simulator runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimPolicy {
    /// The planner, with its policy (predictive, at-close, eager).
    Plan(PlanConfig),
    /// Knows the future (module doc).
    Oracle,
    /// The planner (predictive) told each block's mean write rate (module
    /// doc): a study.
    RateOracle(PlanConfig),
}

/// The simulation's set-up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    /// Link rate, bytes per second.
    pub link_rate: f64,
    /// Interval between scheduled closes, seconds.
    pub interval_s: f64,
    pub policy: SimPolicy,
    pub geometry: Geometry,
    /// How often the uploader samples the heat map and re-plans while
    /// the link is idle (the daemon's poll), seconds.
    pub poll_s: f64,
    /// Window of the throughput sampler, seconds.
    pub sampler_window_s: f64,
}

impl SimConfig {
    /// Defaults for everything but the link, interval and policy.
    pub fn new(link_rate: f64, interval_s: f64, policy: SimPolicy) -> SimConfig {
        SimConfig {
            link_rate,
            interval_s,
            policy,
            geometry: Geometry::default(),
            // 1 s, as the daemon.
            poll_s: 1.0,
            // 30 s, as the daemon's link.
            sampler_window_s: 30.0,
        }
    }
}

/// Why a simulation cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    #[error("the trace has no writes")]
    Empty,
    #[error("invalid link rate {0}: give a positive number of bytes per second")]
    Rate(f64),
    #[error("invalid interval {0} s: give a positive interval")]
    Interval(f64),
    #[error(
        "the trace ({trace_s:.1} s) is shorter than one interval ({interval_s:.1} s): no snapshot closes"
    )]
    TooShort { trace_s: f64, interval_s: f64 },
    #[error("{0}")]
    Plan(String),
}

/// One snapshot's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SnapshotResult {
    pub id: u32,
    pub scheduled_s: f64,
    pub completed_s: f64,
    pub lag_s: f64,
    pub bytes_uploaded: u64,
    pub minimal_bytes: u64,
}

/// The whole run's outcome.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub snapshots: usize,
    pub median_lag_s: f64,
    pub p95_lag_s: f64,
    pub max_lag_s: f64,
    pub bytes_uploaded: u64,
    pub minimal_bytes: u64,
    pub amplification: f64,
    /// Fraction of the run (first write to last completion) the link was
    /// transferring.
    pub link_busy: f64,
    /// Bytes whose upload a later write voided (counted in
    /// `bytes_uploaded`).
    pub bytes_voided: u64,
}

/// A timeline event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// The open epoch's upload started (the start rule fired).
    Start(u32),
    /// Scheduled close.
    Close(u32),
    /// Snapshot complete.
    Complete(u32),
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mark::Start(n) => write!(f, "start:{n}"),
            Mark::Close(n) => write!(f, "close:{n}"),
            Mark::Complete(n) => write!(f, "complete:{n}"),
        }
    }
}

/// One timeline row: cumulative bytes sent and bytes outstanding (open
/// and closed epochs) at `t_s`, and an event, if the row marks one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimelineRow {
    pub t_s: f64,
    pub uploaded: u64,
    pub outstanding: u64,
    pub mark: Option<Mark>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SimResult {
    pub snapshots: Vec<SnapshotResult>,
    pub summary: Summary,
    pub timeline: Vec<TimelineRow>,
}

impl SimResult {
    /// The timeline as CSV (`t_s,uploaded_bytes,outstanding_bytes,event`).
    pub fn timeline_csv(&self) -> String {
        let mut out = String::from("t_s,uploaded_bytes,outstanding_bytes,event\n");
        for r in &self.timeline {
            let mark = r.mark.map(|m| m.to_string()).unwrap_or_default();
            out.push_str(&format!(
                "{:.3},{},{},{mark}\n",
                r.t_s, r.uploaded, r.outstanding
            ));
        }
        out
    }
}

/// Runs the simulation of `writes` (time-ordered) on a volume of
/// `volume_bytes`.
pub fn simulate(
    writes: &[TraceWrite],
    volume_bytes: u64,
    cfg: &SimConfig,
) -> Result<SimResult, SimError> {
    if !(cfg.link_rate.is_finite() && cfg.link_rate > 0.0) {
        return Err(SimError::Rate(cfg.link_rate));
    }
    if !(cfg.interval_s.is_finite() && cfg.interval_s > 0.0) {
        return Err(SimError::Interval(cfg.interval_s));
    }
    let (Some(first), Some(last)) = (writes.first(), writes.last()) else {
        return Err(SimError::Empty);
    };
    let t0 = first.t_us;
    let secs = |t_us: u64| (t_us.saturating_sub(t0)) as f64 / 1e6;
    let trace_s = secs(last.t_us);
    // Finite and non-negative (checked above); saturates past u32::MAX,
    // which no trace reaches.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let closes = (trace_s / cfg.interval_s).floor() as u32;
    if closes == 0 {
        return Err(SimError::TooShort {
            trace_s,
            interval_s: cfg.interval_s,
        });
    }
    match cfg.policy {
        SimPolicy::Oracle => Ok(oracle(writes, volume_bytes, cfg, closes, &secs)),
        SimPolicy::Plan(pc) => {
            pc.validate().map_err(SimError::Plan)?;
            Ok(Sim::new(volume_bytes, cfg, pc, closes).run(writes, &secs))
        }
        SimPolicy::RateOracle(pc) => {
            pc.validate().map_err(SimError::Plan)?;
            let pc = PlanConfig {
                policy: Policy::Predictive,
                ..pc
            };
            let mut sim = Sim::new(volume_bytes, cfg, pc, closes);
            sim.planner
                .set_block_rates(block_rates(writes, volume_bytes, cfg.geometry, trace_s));
            Ok(sim.run(writes, &secs))
        }
    }
}

/// Each block's mean write rate over the trace: writes to it per second
/// of the trace's span (at least a second).
fn block_rates(
    writes: &[TraceWrite],
    volume_bytes: u64,
    geometry: Geometry,
    span_s: f64,
) -> HashMap<u64, f64> {
    let bs = 1u64 << geometry.block_shift;
    let blocks = volume_bytes.div_ceil(bs);
    let per_write = 1.0 / span_s.max(1.0);
    let mut rates: HashMap<u64, f64> = HashMap::new();
    for w in writes {
        let (b0, b1) = geometry.block_range(w.offset, w.len, blocks);
        for b in b0..=b1 {
            *rates.entry(b).or_default() += per_write;
        }
    }
    rates
}

/// A closed epoch still owed to the destination.
struct Owed {
    id: u32,
    scheduled_s: f64,
    /// Chunk → blocks still to send (their closed content).
    pending: BTreeMap<u64, Vec<u64>>,
    bytes_uploaded: u64,
    minimal_bytes: u64,
}

enum Transfer {
    Closed { blocks: Vec<u64> },
    Open { epoch: u32, up: OpenUpload },
}

struct InFlight {
    start_s: f64,
    end_s: f64,
    bytes: u64,
    what: Transfer,
}

struct Sim<'c> {
    cfg: &'c SimConfig,
    map: DirtyMap,
    planner: Planner,
    sampler: ThroughputSampler,
    block_bytes: u64,
    per_chunk: u64,
    closes: u32,
    open_epoch: u32,
    /// Bytes sent for the open epoch before its close.
    open_sent: u64,
    started: Option<u32>,
    owed: VecDeque<Owed>,
    link: Option<InFlight>,
    queue: VecDeque<u64>,
    results: Vec<SnapshotResult>,
    timeline: Vec<TimelineRow>,
    uploaded: u64,
    voided: u64,
    busy_s: f64,
    scratch: Vec<u64>,
}

impl<'c> Sim<'c> {
    fn new(volume_bytes: u64, cfg: &'c SimConfig, pc: PlanConfig, closes: u32) -> Sim<'c> {
        let map = DirtyMap::new(volume_bytes.max(1), cfg.geometry);
        let planner = Planner::new(&map, pc);
        Sim {
            cfg,
            planner,
            sampler: ThroughputSampler::new(cfg.sampler_window_s),
            block_bytes: 1 << cfg.geometry.block_shift,
            per_chunk: 1 << (cfg.geometry.chunk_shift - cfg.geometry.block_shift),
            map,
            closes,
            open_epoch: 1,
            open_sent: 0,
            started: None,
            owed: VecDeque::new(),
            link: None,
            queue: VecDeque::new(),
            results: Vec::new(),
            timeline: Vec::new(),
            uploaded: 0,
            voided: 0,
            busy_s: 0.0,
            scratch: Vec::new(),
        }
    }

    fn run(mut self, writes: &[TraceWrite], secs: &dyn Fn(u64) -> f64) -> SimResult {
        let mut i = 0;
        let mut next_poll = 0.0;
        let mut now = 0.0;
        self.planner.sample(&self.map, 0.0);
        loop {
            let next_close = (self.open_epoch <= self.closes)
                .then(|| f64::from(self.open_epoch) * self.cfg.interval_s);
            let next_write = writes
                .get(i)
                .map(|w| secs(w.t_us))
                .filter(|_| self.open_epoch <= self.closes);
            let link_end = self.link.as_ref().map(|l| l.end_s);
            let done = next_close.is_none() && self.owed.is_empty() && link_end.is_none();
            if done {
                break;
            }
            // Earliest event; ties: transfer end, close, write, poll.
            let mut t = next_poll;
            for c in [link_end, next_close, next_write].into_iter().flatten() {
                t = f64::min(t, c);
            }
            now = f64::max(now, t);
            if link_end.is_some_and(|e| e <= now) {
                self.finish_transfer(now);
            } else if next_close.is_some_and(|c| c <= now) {
                self.close(now);
            } else if next_write.is_some_and(|w| w <= now) {
                let w = writes[i];
                i += 1;
                self.write(w.offset, w.len);
                continue; // writes do not wake the link by themselves
            } else {
                self.planner.sample(&self.map, now);
                self.row(now, None);
                next_poll = now + self.cfg.poll_s;
                self.queue.clear(); // re-plan with fresh heat
            }
            if self.link.is_none() {
                self.start_transfer(now);
            }
        }
        let end = self
            .results
            .iter()
            .map(|r| r.completed_s)
            .fold(0.0, f64::max);
        let summary = summarize(&self.results, self.busy_s, end, self.voided);
        SimResult {
            snapshots: self.results,
            summary,
            timeline: self.timeline,
        }
    }

    fn write(&mut self, offset: u64, len: u64) {
        // The volume is sized to the trace's extent; anything past it (or
        // empty) changes nothing.
        let size = self.map.blocks() * self.block_bytes;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        self.scratch.clear();
        self.map.start_write(offset, len, &mut self.scratch);
        for &b in &self.scratch {
            // Copy-on-write: the closed content stays owed (in `owed`).
            self.map.preserved(b);
        }
        self.map.write_done(offset, len);
    }

    fn outstanding(&self) -> u64 {
        let closed: u64 = self
            .owed
            .iter()
            .flat_map(|o| o.pending.values())
            .map(|v| v.len() as u64)
            .sum();
        let open: u64 = (0..self.map.chunks())
            .map(|c| self.map.dirty_count(c))
            .sum();
        (closed + open) * self.block_bytes
    }

    fn row(&mut self, t_s: f64, mark: Option<Mark>) {
        let outstanding = self.outstanding();
        self.timeline.push(TimelineRow {
            t_s,
            uploaded: self.uploaded,
            outstanding,
            mark,
        });
    }

    fn close(&mut self, now: f64) {
        let id = self.open_epoch;
        let changed = self.map.close_epoch();
        let mut pending: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for b in changed.blocks() {
            // Dirty at the close (now Closed): not uploaded before it.
            if self.map.state(b) == BlockState::Closed {
                pending.entry(b / self.per_chunk).or_default().push(b);
            }
        }
        self.owed.push_back(Owed {
            id,
            scheduled_s: now,
            pending,
            bytes_uploaded: self.open_sent,
            minimal_bytes: changed.len() * self.block_bytes,
        });
        self.open_sent = 0;
        self.open_epoch += 1;
        self.queue.clear();
        self.row(now, Some(Mark::Close(id)));
    }

    /// Completes the owed epochs at the head that have nothing left.
    fn complete_done(&mut self, now: f64) {
        while self.owed.front().is_some_and(|o| o.pending.is_empty()) {
            let Some(o) = self.owed.pop_front() else {
                break;
            };
            self.results.push(SnapshotResult {
                id: o.id,
                scheduled_s: o.scheduled_s,
                completed_s: now,
                lag_s: now - o.scheduled_s,
                bytes_uploaded: o.bytes_uploaded,
                minimal_bytes: o.minimal_bytes,
            });
            self.row(now, Some(Mark::Complete(o.id)));
        }
    }

    fn start_transfer(&mut self, now: f64) {
        self.complete_done(now);
        if let Some(o) = self.owed.front_mut() {
            let Some((_, blocks)) = o.pending.pop_first() else {
                return;
            };
            let bytes = blocks.len() as u64 * self.block_bytes;
            self.launch(now, bytes, Transfer::Closed { blocks });
            return;
        }
        if self.open_epoch > self.closes {
            return; // past the last reported close: the run is ending
        }
        if self.queue.is_empty() {
            let next_close = f64::from(self.open_epoch) * self.cfg.interval_s;
            let input = PlanInput {
                now_s: now,
                ts_s: Some(next_close - now),
                rate: self.sampler.rate(now),
                closed_pending_bytes: 0,
                open_epoch: self.open_epoch,
            };
            let plan = self.planner.plan(&self.map, &input, 16);
            if plan.started && self.started != Some(self.open_epoch) {
                self.started = Some(self.open_epoch);
                self.row(now, Some(Mark::Start(self.open_epoch)));
            }
            self.queue.extend(plan.chunks);
        }
        let ts = f64::from(self.open_epoch) * self.cfg.interval_s - now;
        while let Some(chunk) = self.queue.pop_front() {
            let Some(version) = self.map.chunk_version(chunk) else {
                continue;
            };
            let mut blocks = Vec::new();
            self.planner.select(&self.map, chunk, Some(ts), &mut blocks);
            if blocks.is_empty() {
                continue;
            }
            let Some(up) = self.map.begin_open(&blocks, version) else {
                continue;
            };
            if up.blocks.is_empty() {
                continue;
            }
            let bytes = up.blocks.len() as u64 * self.block_bytes;
            let epoch = self.open_epoch;
            self.launch(now, bytes, Transfer::Open { epoch, up });
            return;
        }
    }

    fn launch(&mut self, now: f64, bytes: u64, what: Transfer) {
        let end_s = now + bytes as f64 / self.cfg.link_rate;
        self.link = Some(InFlight {
            start_s: now,
            end_s,
            bytes,
            what,
        });
    }

    fn finish_transfer(&mut self, now: f64) {
        let Some(t) = self.link.take() else { return };
        self.sampler.record(t.start_s, t.end_s, t.bytes);
        self.busy_s += t.end_s - t.start_s;
        self.uploaded += t.bytes;
        match t.what {
            Transfer::Closed { blocks, .. } => {
                for &b in &blocks {
                    self.map.ack_closed(b);
                }
                if let Some(o) = self.owed.front_mut() {
                    o.bytes_uploaded += t.bytes;
                }
                self.complete_done(now);
            }
            Transfer::Open { epoch, up } => {
                // As the daemon (engine::early): credited only to the epoch
                // it was read from, while it is open, block by block: those
                // not written since they were taken.
                let mut credited = Vec::new();
                if epoch == self.open_epoch {
                    self.map.ack_open(&up, &mut credited);
                }
                self.voided += (up.blocks.len() - credited.len()) as u64 * self.block_bytes;
                if !credited.is_empty() {
                    self.planner.uploaded(epoch, &credited);
                }
                if epoch == self.open_epoch {
                    self.open_sent += t.bytes;
                } else if let Some(o) = self.owed.iter_mut().find(|o| o.id == epoch) {
                    o.bytes_uploaded += t.bytes;
                }
            }
        }
    }
}

/// The oracle (module doc): per epoch, each changed block's final write
/// time; the link sends them in that order as each becomes final.
fn oracle(
    writes: &[TraceWrite],
    volume_bytes: u64,
    cfg: &SimConfig,
    closes: u32,
    secs: &dyn Fn(u64) -> f64,
) -> SimResult {
    let bs = 1u64 << cfg.geometry.block_shift;
    let blocks = volume_bytes.div_ceil(bs);
    let per_block = bs as f64 / cfg.link_rate;
    let mut results = Vec::new();
    let mut timeline = Vec::new();
    let mut link_free = 0.0f64;
    let mut uploaded = 0u64;
    let mut busy = 0.0;
    let mut i = 0;
    for epoch in 1..=closes {
        let close = f64::from(epoch) * cfg.interval_s;
        let mut last: HashMap<u64, f64> = HashMap::new();
        while let Some(w) = writes.get(i) {
            let t = secs(w.t_us);
            if t >= close {
                break;
            }
            i += 1;
            let (b0, b1) = cfg.geometry.block_range(w.offset, w.len, blocks);
            for b in b0..=b1 {
                last.insert(b, t);
            }
        }
        let mut finals: Vec<f64> = last.into_values().collect();
        finals.sort_by(f64::total_cmp);
        for &f in &finals {
            let start = link_free.max(f);
            link_free = start + per_block;
            busy += per_block;
        }
        let bytes = finals.len() as u64 * bs;
        uploaded += bytes;
        let completed = link_free.max(close);
        timeline.push(TimelineRow {
            t_s: close,
            uploaded,
            outstanding: 0,
            mark: Some(Mark::Close(epoch)),
        });
        timeline.push(TimelineRow {
            t_s: completed,
            uploaded,
            outstanding: 0,
            mark: Some(Mark::Complete(epoch)),
        });
        results.push(SnapshotResult {
            id: epoch,
            scheduled_s: close,
            completed_s: completed,
            lag_s: completed - close,
            bytes_uploaded: bytes,
            minimal_bytes: bytes,
        });
    }
    let end = results.iter().map(|r| r.completed_s).fold(0.0, f64::max);
    let summary = summarize(&results, busy, end, 0);
    SimResult {
        snapshots: results,
        summary,
        timeline,
    }
}

/// The `q` quantile (nearest rank) of `v`, sorted ascending.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    // 1 <= rank <= len: q is in [0, 1].
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

fn summarize(results: &[SnapshotResult], busy_s: f64, end_s: f64, voided: u64) -> Summary {
    let mut lags: Vec<f64> = results.iter().map(|r| r.lag_s).collect();
    lags.sort_by(f64::total_cmp);
    let bytes_uploaded = results.iter().map(|r| r.bytes_uploaded).sum();
    let minimal_bytes = results.iter().map(|r| r.minimal_bytes).sum();
    Summary {
        snapshots: results.len(),
        median_lag_s: quantile(&lags, 0.5),
        p95_lag_s: quantile(&lags, 0.95),
        max_lag_s: lags.last().copied().unwrap_or(0.0),
        bytes_uploaded,
        minimal_bytes,
        amplification: if minimal_bytes == 0 {
            1.0
        } else {
            bytes_uploaded as f64 / minimal_bytes as f64
        },
        link_busy: if end_s > 0.0 {
            (busy_s / end_s).min(1.0)
        } else {
            0.0
        },
        bytes_voided: voided,
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn w(t_s: f64, block: u64, blocks: u64) -> TraceWrite {
        TraceWrite {
            t_us: (t_s * 1e6) as u64,
            offset: block * 4096,
            len: blocks * 4096,
        }
    }

    fn plan(policy: Policy) -> SimPolicy {
        SimPolicy::Plan(PlanConfig {
            policy,
            ..PlanConfig::default()
        })
    }

    fn run(writes: &[TraceWrite], rate: f64, interval: f64, p: SimPolicy) -> SimResult {
        simulate(writes, 256 * MIB, &SimConfig::new(rate, interval, p)).unwrap()
    }

    /// At-close: each snapshot takes its distinct bytes over the link
    /// after its close; a block written many times counts once.
    #[test]
    fn at_close_lag_is_bytes_over_rate_and_collisions_count_once() {
        // Interval 10 s: 256 distinct blocks (1 MiB) written in the first,
        // block 7 rewritten 50 times; a marker write at 25 s ends the trace.
        let mut writes: Vec<TraceWrite> = (0..256).map(|b| w(b as f64 * 0.01, b, 1)).collect();
        writes.extend((0..50).map(|i| w(3.0 + i as f64 * 0.1, 7, 1)));
        writes.push(w(25.0, 5000, 1));
        let r = run(&writes, MIB as f64 / 4.0, 10.0, plan(Policy::AtClose));
        assert_eq!(r.snapshots.len(), 2);
        let s1 = &r.snapshots[0];
        assert_eq!(s1.minimal_bytes, MIB);
        assert_eq!(s1.bytes_uploaded, MIB, "the rewritten block once");
        assert!((s1.lag_s - 4.0).abs() < 1e-6, "1 MiB at 0.25 MiB/s: {s1:?}");
        assert_eq!(
            (r.snapshots[1].minimal_bytes, r.snapshots[1].lag_s),
            (0, 0.0)
        );
        assert!((r.summary.amplification - 1.0).abs() < 1e-9);
        // Eager uploads the chunk of the rewritten block again and again.
        let e = run(&writes, MIB as f64 / 4.0, 10.0, plan(Policy::Eager));
        assert!(e.summary.amplification > 1.01, "{:?}", e.summary);
    }

    /// Closed epochs queue: with a link too slow for the load, each
    /// snapshot completes after the one before it.
    #[test]
    fn closed_epochs_complete_in_order() {
        let writes: Vec<TraceWrite> = (0..300).map(|i| w(i as f64 * 0.1, i * 16, 16)).collect();
        let r = run(&writes, 0.5 * MIB as f64, 10.0, plan(Policy::AtClose));
        assert_eq!(r.snapshots.len(), 2);
        let (a, b) = (&r.snapshots[0], &r.snapshots[1]);
        // 100 writes of 64 KiB per interval: 6.25 MiB, 12.5 s at 0.5 MiB/s.
        assert!((a.lag_s - 12.5).abs() < 1e-6, "{a:?}");
        assert!(b.completed_s > a.completed_s + 12.0, "{b:?}");
        // Busy 25 s of the 35 s from the first write to the last completion.
        assert!(
            (r.summary.link_busy - 25.0 / 35.0).abs() < 1e-6,
            "{:?}",
            r.summary
        );
    }

    /// A database-like trace (a sequential log, a small region of pages
    /// rewritten all the time): predictive completes close to the oracle
    /// and far sooner than at-close, without uploading much twice.
    #[test]
    fn predictive_beats_at_close_on_a_log_with_hot_pages() {
        let mut writes = Vec::new();
        let mut x = 12345u64;
        for i in 0..6000u64 {
            let t = i as f64 * 0.05; // 300 s at 20 writes/s
            writes.push(w(t, 4096 + i * 4, 4)); // log: 16 KiB appends
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            writes.push(w(t + 0.01, x % 256, 1)); // 1 MiB of hot pages
        }
        let rate = 1.2 * MIB as f64; // the log alone needs 0.31 MiB/s
        let at_close = run(&writes, rate, 60.0, plan(Policy::AtClose));
        let pred = run(&writes, rate, 60.0, plan(Policy::Predictive));
        let oracle = run(&writes, rate, 60.0, SimPolicy::Oracle);
        let (a, p, o) = (
            at_close.summary.median_lag_s,
            pred.summary.median_lag_s,
            oracle.summary.median_lag_s,
        );
        assert!(o <= p + 1e-9, "the oracle is a lower bound: {o} > {p}");
        assert!(p < 0.25 * a, "predictive {p} s vs at-close {a} s");
        assert!(pred.summary.amplification < 1.25, "{:?}", pred.summary);
        assert!(
            pred.timeline
                .iter()
                .any(|r| matches!(r.mark, Some(Mark::Start(_))))
        );
        let csv = pred.timeline_csv();
        assert!(csv.starts_with("t_s,uploaded_bytes,outstanding_bytes,event\n"));
        assert!(csv.contains(",close:1\n") && csv.contains(",complete:1\n"));
    }

    /// Hot blocks scattered one per chunk among cold ones: the heat map
    /// sees warm chunks, the planner learns the hot blocks only from
    /// uploading them twice; told each block's rate, it holds them back
    /// from the first epoch on and uploads less twice. The oracle is
    /// still the bound.
    #[test]
    fn the_rate_oracle_knows_scattered_hot_blocks() {
        let mut writes = Vec::new();
        for i in 0..3000u64 {
            let t = i as f64 * 0.1; // 300 s at 10 writes/s
            writes.push(w(t, (i % 32) * 256 + 1, 1)); // 32 hot blocks
            writes.push(w(t + 0.05, 8192 + i, 1)); // cold: each once
        }
        let rate = 0.5 * MIB as f64;
        let pred = run(&writes, rate, 60.0, plan(Policy::Predictive));
        let rates = run(
            &writes,
            rate,
            60.0,
            SimPolicy::RateOracle(PlanConfig::default()),
        );
        let oracle = run(&writes, rate, 60.0, SimPolicy::Oracle);
        let (p, r) = (pred.summary.amplification, rates.summary.amplification);
        assert!(r < p, "rate oracle {r} vs predictive {p}");
        assert!(r < 1.1, "{:?}", rates.summary);
        assert!(
            oracle.summary.median_lag_s <= rates.summary.median_lag_s + 1e-9,
            "{:?} vs {:?}",
            oracle.summary,
            rates.summary
        );
    }

    #[test]
    fn bad_set_ups_are_refused() {
        let cfg = |r, i| SimConfig::new(r, i, plan(Policy::AtClose));
        assert_eq!(simulate(&[], MIB, &cfg(1.0, 1.0)), Err(SimError::Empty));
        let one = [w(0.0, 0, 1), w(5.0, 1, 1)];
        assert!(matches!(
            simulate(&one, MIB, &cfg(1.0, 10.0)),
            Err(SimError::TooShort { .. })
        ));
        assert_eq!(
            simulate(&one, MIB, &cfg(0.0, 1.0)),
            Err(SimError::Rate(0.0))
        );
        assert!(matches!(
            simulate(&one, MIB, &cfg(1.0, f64::NAN)),
            Err(SimError::Interval(_))
        ));
        let bad = SimConfig::new(
            1.0,
            1.0,
            SimPolicy::Plan(PlanConfig {
                pt: 2.0,
                ..PlanConfig::default()
            }),
        );
        assert!(matches!(simulate(&one, MIB, &bad), Err(SimError::Plan(_))));
    }
}
