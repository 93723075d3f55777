//! The planner of predictive upload: when to start uploading the open
//! epoch, and which of its chunks to upload first.
//!
//! # The rule
//!
//! The open epoch's changed blocks are uploaded *before* its scheduled
//! close, so that the snapshot is complete almost at the close. With
//!
//! - `D`, the bytes still to upload: the open epoch's blocks whose latest
//!   content is not uploaded (collisions count once: the dirty map holds
//!   one bit pair per block however often it was written), plus what the
//!   closed epochs still owe, which goes first;
//! - `B`, the throughput the destination sustains, sampled from the live
//!   uploads ([`crate::link::ThroughputSampler`]);
//! - `TS`, the time left until the scheduled close;
//!
//! uploading starts once `TS < K * D / B + L` (the seed's FIG. 8): `D / B`
//! is how long the upload takes, `K` is the margin for what will still be
//! written and for a throughput that varies, `L` a fixed lead for request
//! latency and the close itself. Started, it stays started until the
//! close (a latch: `D` grows as the epoch is written, and starting again
//! later would only waste the head start). Before the start nothing of
//! the open epoch is uploaded: a block uploaded early is a block more
//! likely to be overwritten, and then uploaded twice.
//!
//! # The order: least likely to be overwritten first
//!
//! A [`HeatMap`] keeps, per chunk, exponentially decayed rates of the
//! writes it receives and of the *overwrites* among them (writes to blocks
//! already written in the open epoch, counted by the dirty map on the I/O
//! path). A chunk's probability of being overwritten before the close is
//! that of a Poisson process: with `h` overwrites per second spread over
//! its `n` dirty blocks,
//!
//! `P_over = 1 - exp(-(h / n) * TS)`.
//!
//! `h` is the decayed rate, or the last sample interval's or the rate
//! since the last sample when higher: a chunk rewritten in bursts (a
//! database's pages and log) is hot from the burst on, not only once the
//! slow average has caught up ([`HeatMap::overwrite_rate_now`]).
//!
//! A block's upload is also void if a write lands on *it* while the
//! chunk's blocks are taken, read and sent ([`DirtyMap::begin_open`] to
//! [`DirtyMap::ack_open`]; the rest of the chunk is credited): with `w`
//! writes per second (blocks) on the chunk over the last sample interval,
//! or since the last sample if that is higher (a chunk being appended to
//! is busy from its first writes, not from the next sample, and quiet from
//! the sample after it is full), spread over its `n` dirty blocks, and an
//! upload time `u = n * block / B`, `P_stale = 1 - exp(-(w / n) * u)`. The
//! planner uploads chunks in ascending `P = 1 - (1 - P_over)(1 - P_stale)`
//! and skips, for now, every chunk with `P >= PT`, and every chunk whose
//! upload cannot land before the close (`u > TS`: the close would void
//! it, and it would delay the closed epoch's own upload). As the close nears,
//! `TS` shrinks and hot chunks fall below `PT` on their own: they are
//! uploaded last, once their content is likely final.
//!
//! # Hot blocks, learned from the uploads
//!
//! The heat map sees chunks; hot blocks scattered among cold ones (a zipf
//! workload) do not make their chunk hot. So the planner also learns per
//! block from its own uploads: a block uploaded before the close and
//! then uploaded again in the same epoch was rewritten in between. Such a
//! block is *hot* for the rest of that epoch and the next, and for as
//! long as it is written again in each epoch after (held back, it is not
//! uploaded twice, so it could not be learned again), and
//! [`Planner::select`] leaves it out of early uploads (the rest of its
//! chunk goes) until the close is as near as the start rule says for the
//! hot blocks alone: `TS < K * D_hot / B + L`, with `D_hot` the bytes of
//! the dirty hot blocks, so that they go last but still in time. The record costs
//! one bit per block of the volume for the blocks uploaded in the open
//! epoch (32 MiB per TiB at 4 KiB blocks) and a set of the hot ones.
//!
//! # A study: each block's write rate known
//!
//! The heat map and the learned hot blocks are estimates. How much lag
//! and amplification come from estimating, and how much no causal policy
//! can avoid, is measured by giving the planner each block's true mean
//! write rate `r` over the whole trace ([`Planner::set_block_rates`]; the
//! simulator's `rate-oracle` policy does, the daemon never). It knows how
//! hot each block is, not when it will be written. Then a block's
//! `P = 1 - exp(-r * TS)` replaces the chunk's and the hot blocks' rules:
//! a block is uploaded while `P < PT`, a chunk offers those blocks and is
//! ordered by the highest `P` among them, and the start rule is the same.
//!
//! # One planner, two clocks
//!
//! The planner holds no clock and does no I/O: its caller passes the time
//! (seconds on any monotonic clock), `TS` and `B`, and reads the dirty map
//! it is given. The daemon drives it with the real clock and its
//! destinations ([`crate::engine::Uploader`]); the simulator
//! ([`crate::simulate`]) with a virtual clock and a link model. Both run
//! this code.

use foresnap_driver::tracking::DirtyMap;
use std::collections::HashMap;

/// When the open epoch is uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Start by the rule `TS < K*D/B + L`, least likely overwritten first.
    Predictive,
    /// Nothing before the close (the baseline).
    AtClose,
    /// Every changed chunk as soon as the link is free (the contrast: no
    /// lag, much amplification).
    Eager,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "predictive" => Ok(Policy::Predictive),
            "at-close" => Ok(Policy::AtClose),
            "eager" => Ok(Policy::Eager),
            _ => Err(format!(
                "invalid upload policy '{s}': give predictive, at-close or eager"
            )),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Policy::Predictive => "predictive",
            Policy::AtClose => "at-close",
            Policy::Eager => "eager",
        })
    }
}

/// The planner's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanConfig {
    pub policy: Policy,
    /// Margin on the upload time in the start rule.
    pub k: f64,
    /// Fixed lead of the start rule, seconds.
    pub l_s: f64,
    /// Skip a chunk while its overwrite probability is at least this.
    pub pt: f64,
    /// Half-life of the heat map's overwrite rates, seconds.
    pub heat_half_life_s: f64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            policy: Policy::Predictive,
            // K = 4: D keeps growing after the start, so the margin must
            // cover what is still written. Where every write is to a new
            // block, D grows at rho * B on a link at load rho, and the
            // upload ends by the close only if K >= 1 / (1 - rho): 3.33 at
            // rho = 0.7, 4 up to 0.75. The simulator's sweep (README,
            // "Predictive upload"): at K = 3 uniform writes at 70% load
            // completed 1.13 s late, at 4 0.06 s; zipf and pareto at 70%
            // lagged less and uploaded 1-2% more; K = 2 missed closes.
            k: 4.0,
            // 5 s: a few request round trips, the close's own pause and
            // the manifest write.
            l_s: 5.0,
            // 0.5: a chunk is uploaded once it is more likely to stay
            // than to be overwritten before the close.
            pt: 0.5,
            // 60 s: remembers the hot chunks of the previous epochs at
            // typical intervals, forgets a moved workload within minutes.
            heat_half_life_s: 60.0,
        }
    }
}

impl PlanConfig {
    /// Checks the knobs; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.k) {
            return Err(format!(
                "invalid --k {}: give a positive number, as 3",
                self.k
            ));
        }
        if !(self.l_s.is_finite() && self.l_s >= 0.0) {
            return Err(format!(
                "invalid --l {}: give seconds, zero or more, as 5",
                self.l_s
            ));
        }
        if !(self.pt > 0.0 && self.pt <= 1.0) {
            return Err(format!(
                "invalid --pt {}: give a probability above 0 and at most 1, as 0.5",
                self.pt
            ));
        }
        if !finite_pos(self.heat_half_life_s) {
            return Err("the heat half-life must be positive".into());
        }
        Ok(())
    }
}

/// Shortest span a rate since the last sample is taken over
/// ([`HeatMap::write_rate_now`]).
pub const MIN_RATE_SPAN_S: f64 = 0.1;

/// Per-chunk write and overwrite rates, decayed exponentially (module
/// doc). Fed by sampling the dirty map's per-chunk counters; 20 bytes per
/// chunk (20 MiB per TiB at the dirty map's 1 MiB chunks).
#[derive(Debug, Clone)]
pub struct HeatMap {
    /// Overwrites per second (blocks), long half-life.
    over: Vec<f32>,
    /// Writes per second (blocks) over the last sample interval.
    recent: Vec<f32>,
    /// Overwrites per second over the last sample interval.
    recent_over: Vec<f32>,
    /// The counters at the last sample (they wrap: deltas are wrapping).
    seen: Vec<(u32, u32)>,
    last_s: Option<f64>,
    tau_over: f64,
}

impl HeatMap {
    pub fn new(chunks: u64, cfg: &PlanConfig) -> HeatMap {
        let n = usize::try_from(chunks).unwrap_or(0);
        HeatMap {
            over: vec![0.0; n],
            recent: vec![0.0; n],
            recent_over: vec![0.0; n],
            seen: vec![(0, 0); n],
            last_s: None,
            tau_over: cfg.heat_half_life_s / std::f64::consts::LN_2,
        }
    }

    /// Folds the counters' growth since the last sample into the rates.
    /// The first sample only takes the counters as the baseline.
    pub fn sample(&mut self, map: &DirtyMap, now_s: f64) {
        let Some(last) = self.last_s else {
            for (c, seen) in self.seen.iter_mut().enumerate() {
                *seen = map.chunk_heat(c as u64);
            }
            self.last_s = Some(now_s);
            return;
        };
        let dt = now_s - last;
        if dt <= 0.0 {
            return;
        }
        // EWMA of a rate over irregular samples: the weight of the new
        // sample grows with the time it covers.
        let a_over = 1.0 - (-dt / self.tau_over).exp();
        for c in 0..self.seen.len() {
            let (w, o) = map.chunk_heat(c as u64);
            let (w0, o0) = self.seen[c];
            self.seen[c] = (w, o);
            let dw = f64::from(w.wrapping_sub(w0)) / dt;
            let dov = f64::from(o.wrapping_sub(o0)) / dt;
            // Precision: rates are estimates; f32 keeps the map small.
            #[allow(clippy::cast_possible_truncation)]
            {
                self.over[c] = (f64::from(self.over[c]) * (1.0 - a_over) + a_over * dov) as f32;
                self.recent[c] = dw as f32;
                self.recent_over[c] = dov as f32;
            }
        }
        self.last_s = Some(now_s);
    }

    /// Overwrites per second of `chunk` (blocks).
    pub fn overwrite_rate(&self, chunk: u64) -> f64 {
        self.get(&self.over, chunk)
    }

    /// Writes per second of `chunk` over the last sample interval (blocks).
    pub fn write_rate(&self, chunk: u64) -> f64 {
        self.get(&self.recent, chunk)
    }

    /// Writes per second of `chunk` now: over the last sample interval,
    /// or since the last sample when that is higher, so that a chunk that
    /// became busy since (the new tail of a log) is busy at once, not from
    /// the next sample, when it may be full already. The span since the
    /// sample counts as [`MIN_RATE_SPAN_S`] at least: one write just after
    /// it is not a flood.
    pub fn write_rate_now(&self, map: &DirtyMap, chunk: u64, now_s: f64) -> f64 {
        let (writes, _) = self.since_sample(map, chunk, now_s);
        self.write_rate(chunk).max(writes)
    }

    /// Overwrites per second of `chunk` now: the decayed rate, or the
    /// last sample interval's or the rate since the last sample when
    /// higher (as [`HeatMap::write_rate_now`]).
    pub fn overwrite_rate_now(&self, map: &DirtyMap, chunk: u64, now_s: f64) -> f64 {
        let (_, overwrites) = self.since_sample(map, chunk, now_s);
        self.overwrite_rate(chunk)
            .max(self.get(&self.recent_over, chunk))
            .max(overwrites)
    }

    /// Writes and overwrites per second of `chunk` since the last sample,
    /// over [`MIN_RATE_SPAN_S`] at least (zero before the first sample).
    fn since_sample(&self, map: &DirtyMap, chunk: u64, now_s: f64) -> (f64, f64) {
        let seen = usize::try_from(chunk).ok().and_then(|c| self.seen.get(c));
        let (Some(last), Some(&(w0, o0))) = (self.last_s, seen) else {
            return (0.0, 0.0);
        };
        let (w, o) = map.chunk_heat(chunk);
        let span = (now_s - last).max(MIN_RATE_SPAN_S);
        (
            f64::from(w.wrapping_sub(w0)) / span,
            f64::from(o.wrapping_sub(o0)) / span,
        )
    }

    fn get(&self, v: &[f32], chunk: u64) -> f64 {
        usize::try_from(chunk)
            .ok()
            .and_then(|c| v.get(c))
            .map_or(0.0, |&r| f64::from(r))
    }

    /// Heap bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.over.capacity() * 4
            + self.recent.capacity() * 4
            + self.recent_over.capacity() * 4
            + self.seen.capacity() * 8
    }
}

/// The probability that a block written `rate` times a second (a Poisson
/// process) is written within the next `span_s` seconds.
fn written_within(rate: f64, span_s: f64) -> f64 {
    1.0 - (-rate * span_s.max(0.0)).exp()
}

/// A block's rate in given rates: writes a second (0 if never written).
fn given_rate(rates: &HashMap<u64, f64>, block: u64) -> f64 {
    rates.get(&block).copied().unwrap_or(0.0)
}

/// What the planner is told at each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanInput {
    /// Now, on the caller's clock (seconds).
    pub now_s: f64,
    /// Time left until the open epoch's scheduled close; `None` without a
    /// schedule (then only [`Policy::Eager`] uploads before a close).
    pub ts_s: Option<f64>,
    /// Sampled throughput `B` (bytes per second); `None` until known.
    pub rate: Option<f64>,
    /// Bytes the closed epochs still owe (they go first).
    pub closed_pending_bytes: u64,
    /// The open epoch.
    pub open_epoch: u32,
}

/// What the planner decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// `D`: bytes still to upload, the open epoch's and the closed ones'.
    pub outstanding_bytes: u64,
    /// The open epoch's part of `D`.
    pub open_bytes: u64,
    /// Whether uploading the open epoch has started (latched).
    pub started: bool,
    /// Seconds until the start rule fires at the current `D` and `B`
    /// (0 once started); `None` without a schedule or an estimate.
    pub start_in_s: Option<f64>,
    /// Predicted lag of the close: how long after it the snapshot will be
    /// complete if uploading goes at `B` from now (`None` without `B`/`TS`).
    pub predicted_lag_s: Option<f64>,
    /// Chunks to upload now, in order (each: all its dirty blocks).
    pub chunks: Vec<u64>,
    /// Dirty bytes held back because `P >= PT`.
    pub hot_bytes: u64,
}

/// See the module doc.
#[derive(Debug, Clone)]
pub struct Planner {
    cfg: PlanConfig,
    heat: HeatMap,
    block_bytes: u64,
    /// The epoch whose upload has started, if any (the latch).
    started_epoch: Option<u32>,
    /// The epoch the per-block record below is about.
    learn_epoch: u32,
    /// Blocks uploaded before the close in `learn_epoch` (a bitset).
    uploaded: Vec<u64>,
    /// Blocks found rewritten after their upload in `learn_epoch`, and in
    /// the epoch before it.
    hot: std::collections::HashSet<u64>,
    hot_before: std::collections::HashSet<u64>,
    /// Hot blocks go when `TS` is below this (module doc), seconds.
    hot_lead_s: f64,
    /// Scratch: (P, chunk, dirty blocks) of the candidates.
    scratch: Vec<(f64, u64, u64)>,
    /// Each block's write rate, given (the study of the module doc):
    /// writes per second by volume block; a block not in it is never
    /// written.
    block_rates: Option<HashMap<u64, f64>>,
    /// Scratch: a chunk's dirty blocks.
    blocks: Vec<u64>,
}

impl Planner {
    /// A planner for a volume tracked by `map`.
    pub fn new(map: &DirtyMap, cfg: PlanConfig) -> Planner {
        Planner {
            heat: HeatMap::new(map.chunks(), &cfg),
            cfg,
            block_bytes: 1u64 << map.geometry().block_shift,
            started_epoch: None,
            learn_epoch: 0,
            uploaded: Vec::new(),
            hot: std::collections::HashSet::new(),
            hot_before: std::collections::HashSet::new(),
            hot_lead_s: 0.0,
            scratch: Vec::new(),
            block_rates: None,
            blocks: Vec::new(),
        }
    }

    pub fn config(&self) -> &PlanConfig {
        &self.cfg
    }

    pub fn heat(&self) -> &HeatMap {
        &self.heat
    }

    /// Gives the planner each block's write rate (writes per second, by
    /// volume block), to be used instead of its estimates: a study, the
    /// simulator's rate oracle (module doc).
    pub fn set_block_rates(&mut self, rates: HashMap<u64, f64>) {
        self.block_rates = Some(rates);
    }

    /// Samples the heat counters (call it regularly, e.g. every second).
    pub fn sample(&mut self, map: &DirtyMap, now_s: f64) {
        self.heat.sample(map, now_s);
    }

    /// Moves the per-block record to `epoch` if it is about an older one.
    fn roll(&mut self, epoch: u32) {
        if self.learn_epoch != epoch {
            self.hot_before = std::mem::take(&mut self.hot);
            self.uploaded.iter_mut().for_each(|w| *w = 0);
            self.learn_epoch = epoch;
        }
    }

    /// Learns from an early upload of `blocks` (volume block numbers)
    /// credited to open epoch `epoch`: those uploaded before in the epoch
    /// were rewritten since, and are hot (module doc).
    pub fn uploaded(&mut self, epoch: u32, blocks: &[u64]) {
        self.roll(epoch);
        for &b in blocks {
            let (w, bit) = (usize::try_from(b / 64).unwrap_or(usize::MAX), b % 64);
            if w >= self.uploaded.len() {
                self.uploaded.resize(w + 1, 0);
            }
            if self.uploaded[w] & (1 << bit) != 0 {
                self.hot.insert(b);
            }
            self.uploaded[w] |= 1 << bit;
        }
    }

    /// Whether `block` is hot (module doc).
    pub fn is_hot(&self, block: u64) -> bool {
        self.hot.contains(&block) || self.hot_before.contains(&block)
    }

    /// The blocks of `chunk` to upload now, into `out` (ascending): its
    /// dirty blocks, but for hot ones while the close is more than `L`
    /// away (the eager policy takes them all). With given block rates,
    /// those whose `P` is below `PT`.
    pub fn select(&self, map: &DirtyMap, chunk: u64, ts_s: Option<f64>, out: &mut Vec<u64>) {
        out.clear();
        map.dirty_blocks(chunk, out);
        if self.cfg.policy != Policy::Predictive {
            return;
        }
        if let (Some(ts), Some(rates)) = (ts_s, &self.block_rates) {
            out.retain(|b| written_within(given_rate(rates, *b), ts) < self.cfg.pt);
            return;
        }
        let near = ts_s.is_none_or(|ts| ts <= self.hot_lead_s.max(self.cfg.l_s));
        if !near {
            out.retain(|&b| !self.is_hot(b));
        }
    }

    /// `P` at `now_s` of `chunk` with `dirty` blocks to upload, `ts_s`
    /// before the close at `rate` bytes per second (module doc): what
    /// [`Planner::plan`] orders and holds back by.
    pub fn overwrite_probability(
        &self,
        map: &DirtyMap,
        chunk: u64,
        dirty: u64,
        ts_s: f64,
        rate: f64,
        now_s: f64,
    ) -> f64 {
        let n = dirty.max(1) as f64;
        let upload_s = if rate > 0.0 {
            n * self.block_bytes as f64 / rate
        } else {
            0.0
        };
        if upload_s > ts_s {
            // It cannot land before the close, which voids it.
            return 1.0;
        }
        let over = self.heat.overwrite_rate_now(map, chunk, now_s);
        let p_over = written_within(over / n, ts_s);
        // The writes spread over the chunk's n dirty blocks, and a block is
        // exposed for the whole upload of the n: n * block / B seconds.
        let writes = self.heat.write_rate_now(map, chunk, now_s);
        let p_stale = written_within(writes / n, upload_s);
        1.0 - (1.0 - p_over) * (1.0 - p_stale)
    }

    /// Decides, at `input.now_s`, whether the open epoch's upload has
    /// started and which chunks (at most `max_chunks`) to upload now.
    /// Chunks with a write in flight are left for a later call.
    pub fn plan(&mut self, map: &DirtyMap, input: &PlanInput, max_chunks: usize) -> Plan {
        if self.started_epoch.is_some_and(|e| e != input.open_epoch) {
            self.started_epoch = None; // closed: the latch opens
        }
        self.roll(input.open_epoch);
        self.scratch.clear();
        let mut open_blocks = 0u64;
        for c in 0..map.chunks() {
            let n = map.dirty_count(c);
            if n > 0 {
                open_blocks += n;
                self.scratch.push((0.0, c, n));
            }
        }
        let open_bytes = open_blocks * self.block_bytes;
        let d = open_bytes + input.closed_pending_bytes;
        // The hot blocks' own start rule (module doc).
        let per_chunk = 1u64 << (map.geometry().chunk_shift - map.geometry().block_shift);
        let mut hot_in: HashMap<u64, u64> = HashMap::new();
        let mut still_hot = Vec::new();
        for &b in self.hot.union(&self.hot_before) {
            if b < map.blocks() && map.state(b) == foresnap_driver::tracking::BlockState::Dirty {
                *hot_in.entry(b / per_chunk).or_default() += 1;
                if !self.hot.contains(&b) {
                    still_hot.push(b);
                }
            }
        }
        // A hot block of the epoch before written again in this one is
        // still hot: it is held back, so it cannot be learned again.
        self.hot.extend(still_hot);
        let hot_dirty: u64 = hot_in.values().sum();
        self.hot_lead_s = match input.rate {
            Some(b) if b > 0.0 => {
                self.cfg.k * (hot_dirty * self.block_bytes) as f64 / b + self.cfg.l_s
            }
            _ => self.cfg.l_s,
        };
        let mut plan = Plan {
            outstanding_bytes: d,
            open_bytes,
            ..Plan::default()
        };
        // The start rule.
        let rule = match (input.ts_s, input.rate) {
            (Some(ts), Some(b)) if b > 0.0 => {
                let need = self.cfg.k * d as f64 / b + self.cfg.l_s;
                plan.predicted_lag_s = Some((d as f64 / b - ts).max(0.0));
                Some((ts, need))
            }
            _ => None,
        };
        let start_now = match self.cfg.policy {
            Policy::AtClose => false,
            Policy::Eager => true,
            Policy::Predictive => match (input.ts_s, rule) {
                (None, _) => false,
                // A schedule but no estimate of B yet: start, which is
                // also how B gets measured.
                (Some(_), None) => true,
                (Some(_), Some((ts, need))) => {
                    plan.start_in_s = Some((ts - need).max(0.0));
                    ts < need
                }
            },
        };
        if start_now && open_blocks > 0 {
            self.started_epoch = Some(input.open_epoch);
        }
        plan.started = self.started_epoch == Some(input.open_epoch);
        if plan.started {
            plan.start_in_s = Some(0.0);
        }
        if !plan.started || input.closed_pending_bytes > 0 {
            // Closed epochs first; nothing of the open one yet.
            return plan;
        }
        if self.cfg.policy == Policy::Eager {
            // Oldest chunk index first: no preference, no skipping.
            for &(_, c, _) in &self.scratch {
                if plan.chunks.len() < max_chunks && map.chunk_version(c).is_some() {
                    plan.chunks.push(c);
                }
            }
            return plan;
        }
        let ts = input.ts_s.unwrap_or(0.0);
        let rate = input.rate.unwrap_or(0.0);
        let mut scratch = std::mem::take(&mut self.scratch);
        // While hot blocks wait, a chunk offers only its others: one with
        // nothing else waits whole, and its P is that of what it offers.
        let hot_wait = ts > self.hot_lead_s.max(self.cfg.l_s);
        for e in &mut scratch {
            if let Some(rates) = &self.block_rates {
                // The study: the blocks under PT, by their own P.
                self.blocks.clear();
                map.dirty_blocks(e.1, &mut self.blocks);
                let (mut offered, mut p_max) = (0u64, 0.0f64);
                for b in &self.blocks {
                    let p = written_within(given_rate(rates, *b), ts);
                    if p < self.cfg.pt {
                        offered += 1;
                        p_max = p_max.max(p);
                    }
                }
                plan.hot_bytes += (e.2 - offered.min(e.2)) * self.block_bytes;
                e.2 = offered;
                e.0 = if offered == 0 { f64::INFINITY } else { p_max };
                continue;
            }
            if hot_wait && let Some(&h) = hot_in.get(&e.1) {
                plan.hot_bytes += h.min(e.2) * self.block_bytes;
                e.2 = e.2.saturating_sub(h);
            }
            e.0 = if e.2 == 0 {
                f64::INFINITY
            } else {
                self.overwrite_probability(map, e.1, e.2, ts, rate, input.now_s)
            };
        }
        scratch.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(p, c, n) in &scratch {
            if n == 0 {
                continue; // only hot blocks: counted above
            }
            if p >= self.cfg.pt {
                plan.hot_bytes += n * self.block_bytes;
            } else if plan.chunks.len() < max_chunks && map.chunk_version(c).is_some() {
                plan.chunks.push(c);
            }
        }
        self.scratch = scratch;
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foresnap_driver::tracking::Geometry;

    const MIB: u64 = 1 << 20;
    /// 4 MiB chunks: chunk 1 starts at block 1024.
    const GEO: Geometry = Geometry {
        block_shift: 12,
        chunk_shift: 22,
    };

    fn write(m: &DirtyMap, block: u64, n: u64) {
        let mut cow = Vec::new();
        m.start_write(block * 4096, n * 4096, &mut cow);
        for &b in &cow {
            m.preserved(b); // as the tracker, once the closed content is copied
        }
        m.write_done(block * 4096, n * 4096);
    }

    fn input(now_s: f64, ts_s: f64, rate: f64) -> PlanInput {
        PlanInput {
            now_s,
            ts_s: Some(ts_s),
            rate: Some(rate),
            closed_pending_bytes: 0,
            open_epoch: 1,
        }
    }

    /// The start rule fires exactly when TS < K*D/B + L, and latches
    /// until the epoch changes.
    #[test]
    fn start_rule_and_latch() {
        let m = DirtyMap::new(64 * MIB, GEO);
        write(&m, 0, 256); // 1 MiB dirty
        let cfg = PlanConfig {
            k: 2.0,
            l_s: 5.0,
            ..PlanConfig::default()
        };
        let mut p = Planner::new(&m, cfg);
        // D = 1 MiB, B = 0.1 MiB/s: K*D/B + L = 25 s.
        let b = 0.1 * MIB as f64;
        let plan = p.plan(&m, &input(0.0, 26.0, b), 8);
        assert!(!plan.started);
        assert_eq!(plan.outstanding_bytes, MIB);
        assert!((plan.start_in_s.unwrap() - 1.0).abs() < 1e-9);
        assert!(plan.chunks.is_empty());
        let plan = p.plan(&m, &input(1.5, 24.5, b), 8);
        assert!(plan.started);
        assert_eq!(plan.chunks, vec![0]);
        // Latched: a faster link later does not stop it.
        let plan = p.plan(&m, &input(2.0, 24.0, 100.0 * b), 8);
        assert!(plan.started);
        // A new epoch opens the latch.
        let mut i = input(3.0, 60.0, 100.0 * b);
        i.open_epoch = 2;
        assert!(!p.plan(&m, &i, 8).started);
        // Closed epochs owing bytes count in D and go first.
        i.closed_pending_bytes = 300 * MIB;
        let plan = p.plan(&m, &i, 8);
        assert!(plan.started, "60 s < 2 * 301 MiB / 10 MiB/s + 5");
        assert_eq!(plan.outstanding_bytes, 301 * MIB);
        assert!(plan.chunks.is_empty(), "closed epochs first");
    }

    /// No schedule: predictive waits for a close; no estimate of B yet:
    /// start (that is how B is measured); at-close never starts; eager
    /// always does.
    #[test]
    fn policies_without_schedule_or_estimate() {
        let m = DirtyMap::new(64 * MIB, GEO);
        write(&m, 0, 1);
        write(&m, 1024, 1); // chunk 1
        let mut i = input(0.0, 1000.0, 1.0);
        i.ts_s = None;
        let mut p = Planner::new(&m, PlanConfig::default());
        assert!(!p.plan(&m, &i, 8).started);
        i.ts_s = Some(1000.0);
        i.rate = None;
        assert!(p.plan(&m, &i, 8).started);
        let mut at_close = Planner::new(
            &m,
            PlanConfig {
                policy: Policy::AtClose,
                ..PlanConfig::default()
            },
        );
        assert!(!at_close.plan(&m, &input(0.0, 0.1, 1.0), 8).started);
        let mut eager = Planner::new(
            &m,
            PlanConfig {
                policy: Policy::Eager,
                ..PlanConfig::default()
            },
        );
        i.ts_s = None;
        let plan = eager.plan(&m, &i, 8);
        assert_eq!(plan.chunks, vec![0, 1]);
        assert_eq!(eager.plan(&m, &i, 1).chunks, vec![0], "bounded");
    }

    /// Chunks go in ascending overwrite probability; a hot chunk waits
    /// while P >= PT and goes once TS is short enough; a chunk with a
    /// write in flight is left for later.
    #[test]
    fn heat_orders_and_holds_back_hot_chunks() {
        let m = DirtyMap::new(64 * MIB, GEO);
        let mut p = Planner::new(&m, PlanConfig::default());
        p.sample(&m, 0.0);
        // Chunk 2: written once; chunk 1: 16 blocks rewritten all the
        // time; chunk 3: a few rewrites.
        write(&m, 2048, 64);
        for _ in 0..50 {
            write(&m, 1024, 16);
        }
        for _ in 0..2 {
            write(&m, 3072, 16);
        }
        p.sample(&m, 10.0);
        assert!(p.heat().overwrite_rate(1) > p.heat().overwrite_rate(3));
        assert!(p.heat().overwrite_rate(3) > 0.0);
        assert_eq!(p.heat().overwrite_rate(2), 0.0);
        let chunks = usize::try_from(m.chunks()).unwrap();
        assert_eq!(p.heat().memory_bytes(), 20 * chunks, "20 bytes per chunk");
        let b = 100.0 * MIB as f64;
        // Settle the recent-write rate (nothing written for a while).
        p.sample(&m, 60.0);
        let plan = p.plan(&m, &input(60.0, 4.0, b), 8);
        assert!(plan.started, "4 s < 3 * D / B + 5 s");
        assert_eq!(plan.chunks, vec![2, 3], "hot chunk 1 held back");
        assert_eq!(plan.hot_bytes, 16 * 4096);
        let p1 = p.overwrite_probability(&m, 1, 16, 4.0, b, 60.0);
        assert!(p1 >= 0.5, "{p1}");
        // Near the close its P falls below PT.
        let plan = p.plan(&m, &input(80.0, 0.05, b), 8);
        assert_eq!(plan.chunks, vec![2, 3, 1]);
        // A write in flight on chunk 2 keeps it out of this round.
        let mut cow = Vec::new();
        m.start_write(2048 * 4096, 4096, &mut cow);
        assert_eq!(p.plan(&m, &input(80.0, 0.05, b), 8).chunks, vec![3, 1]);
        m.write_done(2048 * 4096, 4096);
    }

    /// A chunk being written right now is likely to void its own upload
    /// (P_stale) and waits until it is quiet.
    #[test]
    fn busy_chunks_wait_until_quiet() {
        let m = DirtyMap::new(64 * MIB, GEO);
        let mut p = Planner::new(&m, PlanConfig::default());
        p.sample(&m, 0.0);
        for i in 0..200 {
            write(&m, i * 4, 4); // an append log over chunk 0
        }
        p.sample(&m, 1.0);
        let slow = MIB as f64; // 3.1 MiB takes ~3 s
        let plan = p.plan(&m, &input(1.0, 10.0, slow), 8);
        assert!(plan.started);
        assert!(plan.chunks.is_empty(), "appended to at 800 blocks/s");
        p.sample(&m, 61.0);
        assert_eq!(p.plan(&m, &input(61.0, 9.0, slow), 8).chunks, vec![0]);
    }

    /// A chunk that became busy after the last sample (the new tail of a
    /// log) is busy at once: it waits, where the last sample alone said
    /// it was quiet; one write just after a sample is no flood.
    #[test]
    fn a_chunk_busy_since_the_last_sample_waits() {
        let m = DirtyMap::new(64 * MIB, GEO);
        let mut p = Planner::new(&m, PlanConfig::default());
        p.sample(&m, 0.0);
        p.sample(&m, 1.0);
        for i in 0..60 {
            write(&m, i * 4, 4); // appended to since the sample at 1 s
        }
        assert_eq!(p.heat.write_rate(0), 0.0, "the last sample saw nothing");
        assert!(p.heat.write_rate_now(&m, 0, 1.2) >= 1000.0);
        let slow = MIB as f64; // the 240 blocks take ~1 s
        let plan = p.plan(&m, &input(1.2, 6.0, slow), 8);
        assert!(plan.started);
        assert!(plan.chunks.is_empty(), "appended to at 1200 blocks/s");
        // Quiet for a sample interval: it goes.
        p.sample(&m, 61.0);
        p.sample(&m, 62.0);
        assert_eq!(p.plan(&m, &input(62.1, 5.0, slow), 8).chunks, vec![0]);
        // One block written just after a sample counts over 0.1 s at least.
        write(&m, 4096, 1);
        let r = p.heat.write_rate_now(&m, 4, 62.001);
        assert!((r - 1.0 / MIN_RATE_SPAN_S).abs() < 1e-9, "{r}");
    }

    /// A write voids only the blocks it writes (`DirtyMap::begin_open`):
    /// a chunk appended to at a modest rate, its writes spread over many
    /// blocks, goes (the rest of it is credited); written over and over
    /// since the last sample, it is hot at once; and an upload that
    /// cannot land before the close is not started.
    #[test]
    fn stale_and_overwrite_probabilities_per_block() {
        let m = DirtyMap::new(64 * MIB, GEO);
        let mut p = Planner::new(&m, PlanConfig::default());
        p.sample(&m, 0.0);
        write(&m, 0, 200);
        p.sample(&m, 60.0);
        p.sample(&m, 61.0);
        write(&m, 200, 20); // 20 new blocks in the second since
        let b = MIB as f64; // the 220 blocks take 0.86 s
        let plan = p.plan(&m, &input(62.0, 6.0, b), 8);
        assert!(plan.started, "6 s < 3 * D / B + 5 s");
        assert_eq!(plan.chunks, vec![0], "20 writes/s over 220 blocks");
        // Chunk 1, rewritten 40 times since the last sample: its decayed
        // overwrite rate is still 0, its rate now is not.
        for _ in 0..40 {
            write(&m, 1024, 8);
        }
        assert_eq!(p.heat().overwrite_rate(1), 0.0);
        assert!(p.heat().overwrite_rate_now(&m, 1, 62.0) >= 300.0);
        // On a link fast enough that no write can void its upload, it is
        // held back for what P_over says: overwritten before the close.
        let fast = 1024.0 * MIB as f64;
        let plan = p.plan(&m, &input(62.0, 6.0, fast), 8);
        assert_eq!(plan.chunks, vec![0], "chunk 1 held back: {plan:?}");
        // 0.5 s before the close, the 220 blocks of chunk 0 (0.86 s) would
        // land after it: not started. 1 s before, they go.
        p.sample(&m, 200.0);
        p.sample(&m, 201.0);
        assert!(!p.plan(&m, &input(201.0, 0.5, b), 8).chunks.contains(&0));
        assert!(p.plan(&m, &input(201.0, 1.0, b), 8).chunks.contains(&0));
    }

    /// A block uploaded twice in an epoch is hot: left out of early
    /// uploads (the rest of its chunk goes) until the last L seconds, for
    /// that epoch and the next, and as long as it is written again in
    /// each epoch; forgotten after.
    #[test]
    fn blocks_rewritten_after_upload_are_learned_hot() {
        let m = DirtyMap::new(64 * MIB, GEO);
        let mut p = Planner::new(&m, PlanConfig::default());
        write(&m, 0, 8);
        p.uploaded(1, &[0, 1, 2, 3, 4, 5, 6, 7]);
        p.uploaded(1, &[3]); // written again, uploaded again
        assert!(p.is_hot(3) && !p.is_hot(2));
        let mut out = Vec::new();
        p.select(&m, 0, Some(30.0), &mut out);
        assert_eq!(out, vec![0, 1, 2, 4, 5, 6, 7], "hot block 3 waits");
        p.select(&m, 0, Some(4.0), &mut out);
        assert_eq!(out.len(), 8, "within L of the close it goes");
        p.select(&m, 0, None, &mut out);
        assert_eq!(out.len(), 8, "no schedule: nothing to wait for");
        // A chunk whose only dirty block is hot is not offered at all
        // while hot blocks wait (the link would idle on it), and is once
        // the close is near.
        write(&m, 1024, 1);
        p.uploaded(1, &[1024]);
        p.uploaded(1, &[1024]);
        let mut i = input(0.0, 30.0, MIB as f64);
        i.ts_s = Some(0.5); // started: 0.5 s < K*D/B + L
        p.plan(&m, &i, 8);
        i.ts_s = Some(30.0);
        let plan = p.plan(&m, &i, 8);
        assert!(plan.started);
        assert_eq!(plan.chunks, vec![0]);
        assert_eq!(plan.hot_bytes, 2 * 4096, "blocks 3 and 1024");
        i.ts_s = Some(4.0);
        assert_eq!(p.plan(&m, &i, 8).chunks, vec![0, 1]);
        // The next epoch still knows them; the one after forgets those
        // not written again in between (block 1024), and keeps those that
        // were (block 3: held back, it could not be learned again).
        m.close_epoch();
        let mut i = input(0.0, 30.0, 1.0);
        i.open_epoch = 2;
        p.plan(&m, &i, 1);
        assert!(p.is_hot(3) && p.is_hot(1024));
        write(&m, 3, 1);
        p.plan(&m, &i, 1);
        m.close_epoch();
        i.open_epoch = 3;
        p.plan(&m, &i, 1);
        assert!(p.is_hot(3), "rewritten in epoch 2: still hot in 3");
        assert!(!p.is_hot(1024), "not written in epoch 2: forgotten");
        m.close_epoch();
        i.open_epoch = 4;
        p.plan(&m, &i, 1);
        i.open_epoch = 5;
        p.plan(&m, &i, 1);
        assert!(!p.is_hot(3), "two epochs without a write: forgotten");
        // Eager never holds anything back.
        write(&m, 0, 8);
        let mut e = Planner::new(
            &m,
            PlanConfig {
                policy: Policy::Eager,
                ..PlanConfig::default()
            },
        );
        e.uploaded(1, &[3]);
        e.uploaded(1, &[3]);
        e.select(&m, 0, Some(30.0), &mut out);
        assert_eq!(out.len(), 8);
    }

    /// Told each block's rate (the study), the planner holds back the
    /// blocks whose own P is at least PT, offers the rest of their chunk,
    /// and orders chunks by the highest P they offer; near the close the
    /// hot blocks' P falls under PT and they go too.
    #[test]
    fn given_block_rates_replace_the_estimates() {
        let m = DirtyMap::new(64 * MIB, GEO);
        write(&m, 0, 4); // chunk 0: block 1 hot, the others never again
        write(&m, 1024, 4); // chunk 1: warm
        write(&m, 2048, 1); // chunk 2: only a hot block
        let mut p = Planner::new(&m, PlanConfig::default());
        let mut rates = HashMap::new();
        rates.insert(1, 1.0);
        rates.insert(2048, 1.0);
        for b in 1024..1028 {
            rates.insert(b, 0.01);
        }
        p.set_block_rates(rates);
        // D = 9 blocks at 4 KiB/s: K*D/B + L = 32 s > TS, started. P of a
        // hot block 10 s before the close: 1 - e^-10; of a warm one: 0.095.
        let plan = p.plan(&m, &input(0.0, 10.0, 4096.0), 8);
        assert!(plan.started);
        assert_eq!(plan.chunks, vec![0, 1], "chunk 2 only holds a hot block");
        assert_eq!(plan.hot_bytes, 2 * 4096);
        let mut out = Vec::new();
        p.select(&m, 0, Some(10.0), &mut out);
        assert_eq!(out, vec![0, 2, 3]);
        // 0.5 s before the close a hot block's P is 0.39.
        p.select(&m, 0, Some(0.5), &mut out);
        assert_eq!(out, vec![0, 1, 2, 3]);
        let plan = p.plan(&m, &input(9.5, 0.5, 4096.0), 8);
        assert_eq!(plan.chunks, vec![1, 0, 2], "warm first, then by chunk");
        assert_eq!(plan.hot_bytes, 0);
        // Not a policy of its own: eager still takes everything.
        let mut eager = Planner::new(
            &m,
            PlanConfig {
                policy: Policy::Eager,
                ..PlanConfig::default()
            },
        );
        eager.set_block_rates(HashMap::from([(1, 1.0)]));
        eager.select(&m, 0, Some(10.0), &mut out);
        assert_eq!(out, vec![0, 1, 2, 3]);
    }

    #[test]
    fn knobs_are_checked() {
        assert!(PlanConfig::default().validate().is_ok());
        for bad in [
            PlanConfig {
                k: 0.0,
                ..PlanConfig::default()
            },
            PlanConfig {
                l_s: -1.0,
                ..PlanConfig::default()
            },
            PlanConfig {
                pt: 1.5,
                ..PlanConfig::default()
            },
            PlanConfig {
                pt: 0.0,
                ..PlanConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert_eq!("at-close".parse::<Policy>(), Ok(Policy::AtClose));
        assert!("lazy".parse::<Policy>().unwrap_err().contains("predictive"));
    }
}
