//! The link to a destination as the upload planner sees it: `B`, the
//! throughput the destination sustains, sampled from the uploads
//! themselves, and an optional bandwidth cap, fixed or by time of day.
//!
//! # Data flow
//!
//! The upload workers put objects through a [`Link`], which is itself a
//! [`Destination`] wrapping the real one. Each put first asks the link's
//! [`TokenBucket`] how long to wait (the bucket's rate is the cap that
//! [`CapSchedule`] gives for the local time of day; no cap, no bucket),
//! sleeps that long, then runs the inner put, timed. A put that succeeds is
//! recorded in the link's [`ThroughputSampler`] as one request (start, end,
//! bytes). The planner reads [`Link::rate`] when it decides whether to start
//! uploading before a close (`TS < K*D/B + L`). Gets, lists and deletes pass
//! through untouched: they are not uploads.
//!
//! # Estimating `B`
//!
//! [`ThroughputSampler`] keeps the requests completed in a sliding window
//! (30 s in the daemon, [`SAMPLER_WINDOW_S`]) and always at least the last 8
//! whatever their age, so a link that has been idle still has an estimate.
//! `B` is the bytes those requests moved divided by the time the link was
//! *busy*: the length of the union of their `[start, end]` intervals. So
//!
//! - idle time does not count: a link that waited for work is not slow;
//! - parallel requests count once per busy second: four workers at
//!   5 MiB/s each make 20 MiB/s, the aggregate the planner needs;
//! - requests weigh by their bytes: `B` is a ratio of sums, not a mean of
//!   per-request rates.
//!
//! Before the union, each request's duration is *clipped* (winsorized) to
//! [`CLIP`] (4) times what its bytes need at the byte-weighted median
//! per-byte time of the window: the seconds per byte that half of the
//! window's bytes moved at or faster than. A request charged more than
//! that is a straggler (a retry, a slow connection, a long time to first
//! byte) and counts as a slow request, not as a link that stopped: one
//! request 10x slower among 20 moves `B` by about 13% instead of 31%. The
//! same clip removes most of the round-trip latency of small requests
//! mixed with large ones (their per-byte time is far above the median,
//! which the large requests set), so a few latency-bound manifests do not
//! make a fast link look slow. When every request is small the median is
//! theirs and `B` stays what they really achieve. Requests within 4x of
//! the median, the ordinary spread of object-store latencies, are not
//! touched, so for a link of steady speed `B` is exactly bytes over busy
//! time. The price is a little lag when the link slows down for good:
//! until the slow requests carry half the window's bytes they count at 4x,
//! not at their full time; the window bounds that lag.
//!
//! The sampler takes its times from the caller (seconds on any monotonic
//! clock): [`Link`] passes seconds since its creation, the simulator its
//! virtual clock, and both run this code.
//!
//! What `B` measures is the destination itself: the time a put waits for
//! the cap is not part of its request. [`Link::rate`] reports the smaller
//! of the sampled `B` and the cap in force, so a change of cap shows at
//! once, and a link sampled under a cap still knows how fast it would go
//! without it (up to the parallelism it was measured at).
//!
//! # The cap
//!
//! [`TokenBucket`] admits bytes at a rate with a burst, debiting at once so
//! that concurrent callers queue in turn; a request larger than the burst
//! waits in proportion. [`CapSchedule`] says which rate holds when: one
//! rate always, or windows of local time (`08:00-18:00=20MiB/s,...`),
//! uncapped outside them. The link's burst is one second of the cap, at
//! least [`MIN_BURST_BYTES`] (one 4 MiB object, so a single object never
//! waits longer than its own bytes need). A bucket made for a new cap, on
//! the first capped put or after an uncapped window, starts *empty*:
//! traffic before it was not metered, so it earned no burst. When one cap
//! follows another, the bucket keeps its debt (bytes admitted but not yet
//! paid for) and its saved tokens down to the new burst, so a burst saved
//! under a faster cap cannot exceed the new one.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::dest::{DestError, Destination, PutFilter};
use crate::units::{UnitError, format_rate, parse_rate};

/// Why a bandwidth cap did not parse. Each message names the text given and
/// the form accepted. All are mistakes in the configuration: retrying the
/// same text gives the same error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Neither a rate nor windows.
    #[error(
        "invalid bandwidth cap '{0}': give a rate, as 20MiB/s or 100Mbit/s, or windows of \
         local time, as 08:00-18:00=20MiB/s,18:00-08:00=100MiB/s"
    )]
    Cap(String),
    /// One window is malformed.
    #[error("invalid cap window '{window}': {why}; give HH:MM-HH:MM=RATE, as 08:00-18:00=20MiB/s")]
    Window { window: String, why: &'static str },
    /// One window's rate is malformed.
    #[error("invalid cap window '{window}': {error}")]
    Rate { window: String, error: UnitError },
    /// Two windows share some time of day.
    #[error("cap windows '{0}' and '{1}' overlap: give each time of day one rate at most")]
    Overlap(String, String),
}

// ---------------------------------------------------------------------------
// ThroughputSampler

/// Requests kept however old they are: enough for a median that one
/// straggler cannot move, few enough to follow the link after an idle spell.
const MIN_KEPT: usize = 8;
/// Requests kept at most, however young: bounds memory and the cost of
/// [`ThroughputSampler::rate`] (a sort) on a link that moves many tiny
/// objects. 4096 requests of 4 MiB are 16 GiB, far more than 30 s of any
/// link this daemon drives.
const MAX_KEPT: usize = 4096;
/// A request is charged at most this many times the time its bytes need at
/// the window's byte-weighted median speed (module doc). 4: object-store
/// PUT latencies commonly spread 2-3x between median and tail, and that
/// spread is real; beyond it a request is a straggler.
pub const CLIP: f64 = 4.0;

/// One completed request.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Request {
    start: f64,
    end: f64,
    bytes: u64,
}

/// Estimates `B`, the bytes per second a destination sustains, from the
/// requests it completed: bytes over busy time, stragglers clipped (module
/// doc).
#[derive(Debug, Clone)]
pub struct ThroughputSampler {
    window_s: f64,
    /// In the order recorded (roughly, of completion).
    requests: VecDeque<Request>,
    /// The latest end recorded: the window is measured back from it.
    newest_end: f64,
}

impl ThroughputSampler {
    /// A sampler over the requests of the last `window_s` seconds (and
    /// always the last 8). A window that is negative or not a number is
    /// taken as 0: only the last 8.
    pub fn new(window_s: f64) -> Self {
        ThroughputSampler {
            // `max` returns the other operand when one is NaN.
            window_s: window_s.max(0.0),
            requests: VecDeque::new(),
            newest_end: f64::NEG_INFINITY,
        }
    }

    /// One request done: `bytes` moved between `start_s` and `end_s`.
    /// Requests that say nothing about throughput are ignored: no bytes,
    /// times that are not finite, or an end before the start.
    pub fn record(&mut self, start_s: f64, end_s: f64, bytes: u64) {
        if bytes == 0 || !start_s.is_finite() || !end_s.is_finite() || end_s < start_s {
            return;
        }
        self.requests.push_back(Request {
            start: start_s,
            end: end_s,
            bytes,
        });
        self.newest_end = self.newest_end.max(end_s);
        let horizon = self.newest_end - self.window_s;
        while self.requests.len() > MAX_KEPT
            || (self.requests.len() > MIN_KEPT
                && self.requests.front().is_some_and(|r| r.end < horizon))
        {
            self.requests.pop_front();
        }
    }

    /// Requests kept (the window's, and at least the last 8).
    pub fn samples(&self) -> usize {
        self.requests.len()
    }

    /// `B` in bytes per second, from the requests that ended in the window
    /// before `now_s` and the last 8 in any case; `None` until some request
    /// moved bytes over a measurable time.
    pub fn rate(&self, now_s: f64) -> Option<f64> {
        let horizon = now_s - self.window_s;
        let recent: Vec<Request> = self
            .requests
            .iter()
            .rev()
            .enumerate()
            .filter(|&(i, r)| i < MIN_KEPT || r.end >= horizon)
            .map(|(_, r)| *r)
            .collect();
        busy_rate(&recent)
    }
}

/// Bytes over the union of the requests' intervals, each clipped to
/// [`CLIP`] times the byte-weighted median per-byte time.
fn busy_rate(requests: &[Request]) -> Option<f64> {
    let total: u128 = requests.iter().map(|r| u128::from(r.bytes)).sum();
    if total == 0 {
        return None;
    }
    // Byte-weighted median of the seconds per byte: walk the requests from
    // the fastest until half the bytes are passed.
    let mut per_byte: Vec<(f64, u64)> = requests
        .iter()
        .map(|r| ((r.end - r.start) / r.bytes as f64, r.bytes))
        .collect();
    per_byte.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut passed = 0u128;
    let mut median = 0.0;
    for &(spb, bytes) in &per_byte {
        passed += u128::from(bytes);
        median = spb;
        if 2 * passed >= total {
            break;
        }
    }
    let mut spans: Vec<(f64, f64)> = requests
        .iter()
        .map(|r| {
            let allowed = CLIP * median * r.bytes as f64;
            (r.start, r.end.min(r.start + allowed))
        })
        .collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Length of the union of the spans, sorted by start.
    let mut busy = 0.0;
    let mut run: Option<(f64, f64)> = None;
    for (start, end) in spans {
        run = match run {
            Some((rs, re)) if start <= re => Some((rs, re.max(end))),
            Some((rs, re)) => {
                busy += re - rs;
                Some((start, end))
            }
            None => Some((start, end)),
        };
    }
    if let Some((rs, re)) = run {
        busy += re - rs;
    }
    let b = total as f64 / busy;
    (busy > 0.0 && b.is_finite()).then_some(b)
}

// ---------------------------------------------------------------------------
// TokenBucket

/// The slowest rate a bucket runs at, bytes per second: a guard against a
/// zero rate (an infinite wait), not a rate anyone configures.
const MIN_RATE: f64 = 1.0;

/// A bandwidth limit on a caller-supplied clock (seconds, f64): bytes are
/// admitted at `rate` per second with up to `burst` saved while idle. Over
/// any sequence of [`take`](TokenBucket::take)s, the bytes admitted by `t`
/// seconds after the first never exceed `rate * t + burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Bytes that may pass now; negative: the debt of bytes admitted for
    /// later, which callers after them wait behind.
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` before the first
    /// use.
    at: Option<f64>,
}

fn sane_rate(rate: f64) -> f64 {
    if rate.is_nan() {
        MIN_RATE
    } else {
        rate.clamp(MIN_RATE, f64::MAX)
    }
}

fn sane_burst(burst: f64) -> f64 {
    if burst.is_nan() {
        0.0
    } else {
        burst.clamp(0.0, f64::MAX)
    }
}

impl TokenBucket {
    /// A full bucket: `burst` bytes may pass at once. A rate below 1 byte
    /// per second (or not a number) is taken as 1; a burst below 0 (or not
    /// a number) as 0.
    pub fn new(rate_bytes_per_s: f64, burst_bytes: f64) -> TokenBucket {
        let burst = sane_burst(burst_bytes);
        TokenBucket {
            rate: sane_rate(rate_bytes_per_s),
            burst,
            tokens: burst,
            at: None,
        }
    }

    /// An empty bucket: the first bytes wait for the rate.
    pub fn new_empty(rate_bytes_per_s: f64, burst_bytes: f64) -> TokenBucket {
        TokenBucket {
            tokens: 0.0,
            ..TokenBucket::new(rate_bytes_per_s, burst_bytes)
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Bytes that may be saved while idle.
    pub fn burst(&self) -> f64 {
        self.burst
    }

    /// Earns the tokens of the time since the last update. A clock that
    /// stands still or goes back (callers that read it before racing for
    /// the bucket) earns nothing and keeps the later time.
    fn refill(&mut self, now: f64) {
        match self.at {
            Some(at) if now > at => {
                self.tokens = (self.tokens + (now - at) * self.rate).min(self.burst);
                self.at = Some(now);
            }
            Some(_) => {}
            None => {
                if now.is_finite() {
                    self.at = Some(now);
                }
            }
        }
    }

    /// Admits `bytes` at `now`: returns the seconds the caller must wait
    /// before sending them (0: at once). The bytes are debited now, so a
    /// caller that comes later waits behind them.
    pub fn take(&mut self, now: f64, bytes: u64) -> f64 {
        self.refill(now);
        self.tokens -= bytes as f64;
        // The clock may have been read before an earlier caller's: the
        // wait runs from the bucket's time, not before it.
        let behind = self.at.map_or(0.0, |at| (at - now).max(0.0));
        if self.tokens >= 0.0 {
            behind
        } else {
            behind - self.tokens / self.rate
        }
    }

    /// From `now` on, admits bytes at `rate` per second. What was earned
    /// until `now` was earned at the old rate; the debt stays.
    pub fn set_rate(&mut self, now: f64, rate_bytes_per_s: f64) {
        self.refill(now);
        self.rate = sane_rate(rate_bytes_per_s);
    }

    /// Saves at most `burst` bytes from now on; tokens saved beyond it are
    /// dropped, the debt stays.
    pub fn set_burst(&mut self, burst_bytes: f64) {
        self.burst = sane_burst(burst_bytes);
        self.tokens = self.tokens.min(self.burst);
    }
}

// ---------------------------------------------------------------------------
// CapSchedule

/// Seconds in a day of the wall clock.
const DAY: u32 = 86_400;

/// A window of local time with its rate. `from` in `0..DAY`, `to` in
/// `1..=DAY` or, for a window that wraps midnight, below `from`; `to` is
/// exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    from: u32,
    to: u32,
    rate: u64,
}

impl Window {
    fn covers(&self, t: u32) -> bool {
        if self.from < self.to {
            (self.from..self.to).contains(&t)
        } else {
            t >= self.from || t < self.to
        }
    }

    /// Two arcs of the clock overlap iff one holds the other's start.
    fn overlaps(&self, other: &Window) -> bool {
        self.covers(other.from) || other.covers(self.from)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Shape {
    Always(u64),
    Windows(Vec<Window>),
}

/// A bandwidth cap that may depend on the local time of day: one rate
/// always (`20MiB/s`), or windows `HH:MM-HH:MM=RATE` separated by commas
/// (`08:00-18:00=20MiB/s,18:00-08:00=100MiB/s`), uncapped outside every
/// window. A window may wrap midnight; `24:00` ends a day; windows may not
/// overlap. Rates are spelled as [`parse_rate`] accepts them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapSchedule {
    shape: Shape,
}

/// `HH:MM` (or `H:MM`), `00:00` to `24:00`, as seconds since midnight.
fn parse_hhmm(text: &str) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    let digits = |s: &str, n: std::ops::RangeInclusive<usize>| {
        n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(h, 1..=2) || !digits(m, 2..=2) {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 3600 + m * 60)
}

fn parse_window(text: &str) -> Result<Window, LinkError> {
    let bad = |why| LinkError::Window {
        window: text.to_owned(),
        why,
    };
    let (span, rate) = text.split_once('=').ok_or_else(|| bad("no '=RATE'"))?;
    let (from, to) = span
        .split_once('-')
        .ok_or_else(|| bad("no 'HH:MM-HH:MM' before '='"))?;
    let times = "times run from 00:00 to 24:00 as HH:MM";
    let from = parse_hhmm(from).ok_or_else(|| bad(times))? % DAY;
    let to = parse_hhmm(to).ok_or_else(|| bad(times))?;
    // `to` stays 86400 for a window ending at 24:00 (that is, from < to);
    // 00:00 as an end wraps like any end before the start.
    if from == to {
        return Err(bad("a window that ends where it starts is empty"));
    }
    let rate = parse_rate(rate).map_err(|error| LinkError::Rate {
        window: text.to_owned(),
        error,
    })?;
    Ok(Window { from, to, rate })
}

impl CapSchedule {
    /// A cap of `rate` bytes per second at every time of day.
    pub fn always(rate: u64) -> CapSchedule {
        CapSchedule {
            shape: Shape::Always(rate),
        }
    }

    /// Parses `20MiB/s` (always) or `08:00-18:00=20MiB/s,18:00-08:00=100MiB/s`
    /// (by local time; uncapped outside the windows).
    pub fn parse(text: &str) -> Result<CapSchedule, LinkError> {
        let t = text.trim();
        if !t.contains('=') {
            return parse_rate(t)
                .map(CapSchedule::always)
                .map_err(|_| LinkError::Cap(text.to_owned()));
        }
        let parts: Vec<&str> = t.split(',').map(str::trim).collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(LinkError::Window {
                window: text.to_owned(),
                why: "an empty entry between commas",
            });
        }
        // windows[i] is parts[i]'s.
        let mut windows: Vec<Window> = Vec::with_capacity(parts.len());
        for part in &parts {
            let w = parse_window(part)?;
            if let Some(j) = windows.iter().position(|o| o.overlaps(&w)) {
                return Err(LinkError::Overlap(parts[j].to_owned(), (*part).to_owned()));
            }
            windows.push(w);
        }
        Ok(CapSchedule {
            shape: Shape::Windows(windows),
        })
    }

    /// The cap, bytes per second, at `secs` since local midnight (taken
    /// modulo a day); `None`: uncapped.
    pub fn cap_at(&self, secs_since_midnight: u32) -> Option<u64> {
        let t = secs_since_midnight % DAY;
        match &self.shape {
            Shape::Always(rate) => Some(*rate),
            Shape::Windows(ws) => ws.iter().find(|w| w.covers(t)).map(|w| w.rate),
        }
    }

    /// Seconds from `secs` since local midnight until the cap changes (to
    /// another rate, or between capped and uncapped); `None` if it never
    /// does. Boundaries where the rate stays the same are skipped.
    pub fn next_change_after(&self, secs_since_midnight: u32) -> Option<u32> {
        let Shape::Windows(ws) = &self.shape else {
            return None;
        };
        let t = secs_since_midnight % DAY;
        let now = self.cap_at(t);
        // Distances to every boundary, the one at `t` itself a day away.
        let mut ahead: Vec<u32> = ws
            .iter()
            .flat_map(|w| [w.from, w.to % DAY])
            .map(|b| match (b + DAY - t) % DAY {
                0 => DAY,
                d => d,
            })
            .collect();
        ahead.sort_unstable();
        ahead.into_iter().find(|&d| self.cap_at(t + d) != now)
    }
}

impl fmt::Display for CapSchedule {
    /// The accepted form, rates for people (`20.0 MiB/s`, rounded).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hhmm = |s: u32| format!("{:02}:{:02}", s / 3600, s / 60 % 60);
        match &self.shape {
            Shape::Always(rate) => f.write_str(&format_rate(*rate as f64)),
            Shape::Windows(ws) => {
                for (i, w) in ws.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    let rate = format_rate(w.rate as f64);
                    write!(f, "{sep}{}-{}={rate}", hhmm(w.from), hhmm(w.to))?;
                }
                Ok(())
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Local time

/// Seconds since local midnight now, in the C library's time zone (`TZ`,
/// `/etc/localtime`). Falls back to UTC where the time does not convert (a
/// clock before 1970, a 32-bit `time_t` past 2038).
fn local_secs_of_day() -> u32 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    libc::time_t::try_from(since_epoch)
        .ok()
        .and_then(local_time_of_day)
        .or_else(|| u32::try_from(since_epoch % u64::from(DAY)).ok())
        .unwrap_or(0)
}

/// The local time of day of `t` (seconds since the epoch): the one unsafe
/// call of this module.
fn local_time_of_day(t: libc::time_t) -> Option<u32> {
    // SAFETY: (1) An all-zero `libc::tm` is a valid value: its fields are
    // integers and, on glibc and musl, a `*const c_char` zone name, for
    // which null is valid. (2) `localtime_r` is the reentrant form: it
    // reads `*timep` and writes `*result`, both pointers to live locals of
    // the right types, and keeps neither after it returns; on failure it
    // returns null and we read nothing it wrote.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return None;
        }
        tm
    };
    secs_of_day(tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// `h:m:s` as seconds since midnight; a leap second (`23:59:60`) is the
/// day's last second.
fn secs_of_day(h: libc::c_int, m: libc::c_int, s: libc::c_int) -> Option<u32> {
    let (h, m, s) = (
        u32::try_from(h).ok()?,
        u32::try_from(m).ok()?,
        u32::try_from(s).ok()?,
    );
    let secs = h.checked_mul(3600)?.checked_add(m.checked_mul(60)?)?;
    Some(secs.checked_add(s)?.min(DAY - 1))
}

// ---------------------------------------------------------------------------
// Link

/// Window of the daemon's sampler, seconds: long enough to hold several
/// 4 MiB objects on a slow link (8 at 1 MiB/s), short enough to follow a
/// link whose speed changes within a snapshot interval of minutes.
pub const SAMPLER_WINDOW_S: f64 = 30.0;

/// The least burst of a capped link: one object of the default size, so
/// that one object waits no longer than its own bytes need at the cap.
pub const MIN_BURST_BYTES: u64 = 4 << 20;

/// The burst for a cap: one second of it, at least [`MIN_BURST_BYTES`].
fn burst_for(cap: u64) -> f64 {
    cap.max(MIN_BURST_BYTES) as f64
}

/// What the link's workers share.
#[derive(Debug)]
struct LinkState {
    sampler: ThroughputSampler,
    /// The bucket and the cap it runs at; `None` while uncapped.
    bucket: Option<(u64, TokenBucket)>,
}

impl LinkState {
    /// The cap the bucket runs at; `None`: uncapped (or nothing put yet).
    fn cap(&self) -> Option<u64> {
        self.bucket.as_ref().map(|(cap, _)| *cap)
    }

    /// Seconds a put of `bytes` at `now` must wait under `cap` (module doc:
    /// a new cap starts empty, a changed one keeps its debt).
    fn admit(&mut self, now: f64, cap: Option<u64>, bytes: u64) -> f64 {
        let Some(cap) = cap else {
            self.bucket = None;
            return 0.0;
        };
        let (rate, burst) = (cap as f64, burst_for(cap));
        if let Some((old, bucket)) = self.bucket.as_mut().filter(|(old, _)| *old != cap) {
            bucket.set_rate(now, rate);
            bucket.set_burst(burst);
            *old = cap;
        }
        let (_, bucket) = self
            .bucket
            .get_or_insert_with(|| (cap, TokenBucket::new_empty(rate, burst)));
        bucket.take(now, bytes)
    }
}

/// A destination behind a bandwidth cap and a throughput sampler (module
/// doc). Share it (`Arc`) between the upload workers: puts from several
/// threads queue in turn at the cap and are sampled together.
#[derive(Debug)]
pub struct Link {
    inner: Arc<dyn Destination>,
    schedule: Option<CapSchedule>,
    /// The link's clock: seconds since this instant.
    epoch: Instant,
    state: Mutex<LinkState>,
}

impl Link {
    /// `inner` behind `schedule` (`None`: never capped), sampled over
    /// [`SAMPLER_WINDOW_S`].
    pub fn new(inner: Arc<dyn Destination>, schedule: Option<CapSchedule>) -> Link {
        Link {
            inner,
            schedule,
            epoch: Instant::now(),
            state: Mutex::new(LinkState {
                sampler: ThroughputSampler::new(SAMPLER_WINDOW_S),
                bucket: None,
            }),
        }
    }

    /// The cap schedule, if any.
    pub fn schedule(&self) -> Option<&CapSchedule> {
        self.schedule.as_ref()
    }

    /// The cap in force now, bytes per second, by the local time of day;
    /// `None`: uncapped.
    pub fn cap_now(&self) -> Option<u64> {
        self.schedule.as_ref()?.cap_at(local_secs_of_day())
    }

    /// `B`, bytes per second: the sampled throughput, but never above the
    /// cap in force; the cap while nothing is sampled; `None` if neither.
    pub fn rate(&self) -> Option<f64> {
        let sampled = self.state().sampler.rate(self.now());
        match (sampled, self.cap_now()) {
            (Some(b), Some(cap)) => Some(b.min(cap as f64)),
            (Some(b), None) => Some(b),
            (None, cap) => cap.map(|c| c as f64),
        }
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// The shared state. Nothing panics while holding the lock, and every
    /// update leaves the state whole, so a poisoned lock is still good.
    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl PutFilter for Link {
    fn inner(&self) -> &dyn Destination {
        self.inner.as_ref()
    }

    fn filtered_put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let len = bytes.len() as u64;
        let cap = self.cap_now();
        let (wait, before) = {
            let mut st = self.state();
            let before = st.cap();
            // Read the clock under the lock: callers reach the bucket in
            // the order of their times.
            (st.admit(self.now(), cap, len), before)
        };
        if before != cap {
            let shown = cap.map_or_else(|| "none".to_owned(), |c| format_rate(c as f64));
            log::info!("{}: bandwidth cap now {shown}", self.inner.url());
        }
        if wait > 0.0 {
            // `take` returns a finite wait of 0 or more; ZERO is never used.
            std::thread::sleep(Duration::try_from_secs_f64(wait).unwrap_or(Duration::ZERO));
        }
        let start = self.now();
        let result = self.inner.put(key, bytes);
        let end = self.now();
        if result.is_ok() {
            self.state().sampler.record(start, end, len);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;
    use proptest::prelude::*;

    const MIB: f64 = 1_048_576.0;
    const H: u32 = 3600;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs()
    }

    // -- ThroughputSampler

    #[test]
    fn nothing_known_until_bytes_move_over_time() {
        let mut s = ThroughputSampler::new(30.0);
        assert_eq!(s.rate(0.0), None);
        s.record(0.0, 1.0, 0);
        s.record(2.0, 1.0, 100);
        s.record(f64::NAN, 1.0, 100);
        s.record(0.0, f64::INFINITY, 100);
        assert_eq!(s.samples(), 0, "requests without information kept");
        s.record(5.0, 5.0, 100);
        assert_eq!(s.rate(5.0), None, "no time measured");
        s.record(6.0, 7.0, 1000);
        assert!(s.rate(7.0).is_some());
    }

    #[test]
    fn idle_time_does_not_lower_b() {
        let mut s = ThroughputSampler::new(300.0);
        // 4 MiB in 1 s, 100 s idle, 4 MiB in 1 s: 4 MiB/s, not 8/102.
        s.record(0.0, 1.0, 4 << 20);
        s.record(101.0, 102.0, 4 << 20);
        assert!(close(s.rate(102.0).unwrap(), 4.0 * MIB, 1e-12));
        // Nor does idle time after the last request.
        assert!(close(s.rate(250.0).unwrap(), 4.0 * MIB, 1e-12));
    }

    #[test]
    fn parallel_requests_add_up() {
        let mut s = ThroughputSampler::new(30.0);
        // Four workers, each 5 MiB per second, staggered by 10 ms.
        for i in 0..5 {
            for w in 0..4 {
                let t = f64::from(i) + f64::from(w) * 0.01;
                s.record(t, t + 1.0, 5 << 20);
            }
        }
        // 100 MiB over 5.03 s busy.
        let r = s.rate(6.0).unwrap() / MIB;
        assert!(close(r, 100.0 / 5.03, 1e-9), "{r}");
    }

    #[test]
    fn completions_out_of_order_count_the_same() {
        let mut a = ThroughputSampler::new(30.0);
        let mut b = ThroughputSampler::new(30.0);
        let reqs = [
            (0.0, 2.0, 2 << 20),
            (0.5, 1.0, 1 << 20),
            (1.5, 3.5, 2 << 20),
        ];
        for &(s, e, n) in &reqs {
            a.record(s, e, n);
        }
        for &(s, e, n) in reqs.iter().rev() {
            b.record(s, e, n);
        }
        assert_eq!(a.rate(4.0), b.rate(4.0));
        assert!(close(a.rate(4.0).unwrap(), 5.0 * MIB / 3.5, 1e-12));
    }

    #[test]
    fn one_slow_request_in_twenty_moves_b_little() {
        for slow in [0, 7, 19] {
            let mut s = ThroughputSampler::new(60.0);
            let mut t = 0.0;
            for i in 0..20 {
                let d = if i == slow { 10.0 } else { 1.0 };
                s.record(t, t + d, 4 << 20);
                t += d;
            }
            let r = s.rate(t).unwrap() / MIB;
            // Unclipped: 80 MiB over 29 s, 2.76 MiB/s (31% low).
            assert!(r > 4.0 * 0.8 && r < 4.0, "slow #{slow}: {r}");
        }
    }

    #[test]
    fn one_slow_request_among_parallel_workers_moves_b_little() {
        let mut s = ThroughputSampler::new(60.0);
        // Four workers take 20 requests of 4 MiB in 1 s each from a queue
        // (16 MiB/s); the sixth takes 10 s while the others go on.
        let mut free = [0.0f64; 4];
        for i in 0..20 {
            let w = (0..4).min_by(|&a, &b| free[a].total_cmp(&free[b])).unwrap();
            let d = if i == 5 { 10.0 } else { 1.0 };
            s.record(free[w], free[w] + d, 4 << 20);
            free[w] += d;
        }
        // The others finish at 6 s: 80 MiB over 6 s, 13.3 MiB/s (three
        // workers really ran without the fourth). Unclipped, 80 MiB over
        // 11 s: 7.3 MiB/s.
        let r = s.rate(20.0).unwrap() / MIB;
        assert!(close(r, 80.0 / 6.0, 1e-9), "{r}");
        assert!(r > 16.0 * 0.8, "{r}");
    }

    #[test]
    fn latency_bound_small_requests_do_not_hide_a_fast_link() {
        let mut s = ThroughputSampler::new(60.0);
        let mut t = 0.0;
        for _ in 0..10 {
            s.record(t, t + 0.4, 40 << 20); // 100 MiB/s
            s.record(t + 0.4, t + 0.45, 4096); // a 50 ms round trip
            t += 0.5;
        }
        // Unclipped: 88.9 MiB/s.
        let r = s.rate(t).unwrap() / MIB;
        assert!(r > 99.0 && r <= 100.0, "{r}");
    }

    #[test]
    fn a_link_of_small_requests_only_is_not_flattered() {
        let mut s = ThroughputSampler::new(60.0);
        for i in 0..20 {
            let t = f64::from(i) * 0.05;
            s.record(t, t + 0.05, 4096);
        }
        assert!(close(s.rate(1.0).unwrap(), 4096.0 / 0.05, 1e-9));
    }

    #[test]
    fn the_window_slides_but_keeps_the_last_eight() {
        let mut s = ThroughputSampler::new(10.0);
        for i in 0..20 {
            let t = f64::from(i);
            s.record(t, t + 1.0, 1 << 20); // 1 MiB/s
        }
        for i in 0..10 {
            let t = 100.0 + f64::from(i);
            s.record(t, t + 0.25, 1 << 20); // 4 MiB/s now
        }
        assert_eq!(s.samples(), 10, "the old requests left the window");
        assert!(close(s.rate(110.0).unwrap(), 4.0 * MIB, 1e-12));
        // A long idle spell: the last 8 still tell.
        assert!(close(s.rate(10_000.0).unwrap(), 4.0 * MIB, 1e-12));
        let mut s = ThroughputSampler::new(10.0);
        for i in 0..5000 {
            let t = f64::from(i) * 1e-4;
            s.record(t, t + 1e-4, 1);
        }
        assert_eq!(s.samples(), MAX_KEPT, "bounded");
    }

    proptest! {
        /// At a steady speed, with any sizes and any idle gaps, `B` is
        /// that speed.
        #[test]
        fn a_steady_link_reads_exactly(
            speed in 1e3f64..1e9,
            reqs in prop::collection::vec((0.0f64..5.0, 1u64..(64 << 20)), 1..40),
        ) {
            let mut s = ThroughputSampler::new(1e9);
            let mut t = 0.0;
            for (gap, bytes) in reqs {
                let d = bytes as f64 / speed;
                s.record(t + gap, t + gap + d, bytes);
                t += gap + d;
            }
            let r = s.rate(t).unwrap();
            prop_assert!(close(r, speed, 1e-6), "{r} for {speed}");
        }
    }

    // -- TokenBucket

    proptest! {
        /// Bytes admitted by `t` never exceed `rate * t + burst`, however
        /// the takes come (clock jitter included), and every wait is finite.
        #[test]
        fn a_bucket_never_exceeds_its_rate(
            rate in 1e3f64..1e8,
            burst in 0.0f64..1e7,
            takes in prop::collection::vec((-0.05f64..1.0, 0u64..20_000_000), 1..60),
        ) {
            let mut b = TokenBucket::new(rate, burst);
            let mut now = 0.0f64;
            let mut admitted: Vec<(f64, u64)> = Vec::new();
            for (dt, bytes) in takes {
                now = (now + dt).max(0.0);
                let wait = b.take(now, bytes);
                prop_assert!(wait.is_finite() && wait >= 0.0, "wait {wait}");
                admitted.push((now + wait, bytes));
            }
            admitted.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut total = 0.0;
            for (t, bytes) in admitted {
                total += bytes as f64;
                let bound = rate * t + burst;
                prop_assert!(total <= bound + 1e-9 * bound + 1.0, "{total} bytes by {t}");
            }
        }
    }

    #[test]
    fn big_requests_wait_in_proportion_and_callers_queue() {
        let mut b = TokenBucket::new(1000.0, 100.0);
        assert_eq!(b.take(0.0, 100), 0.0, "the burst passes at once");
        assert!(close(b.take(0.0, 1000), 1.0, 1e-12), "10x the burst");
        assert!(close(b.take(0.5, 500), 1.0, 1e-12), "queued behind it");
        // A clock read before the last caller's: the wait runs from it.
        assert!(close(b.take(0.4, 0), 1.1, 1e-12));
        // Long idle: at most the burst is saved.
        assert_eq!(b.take(100.0, 100), 0.0);
        assert!(close(b.take(100.0, 1), 0.001, 1e-9));
        let mut e = TokenBucket::new_empty(1000.0, 100.0);
        assert!(close(e.take(5.0, 10), 0.01, 1e-12), "empty: no burst");
    }

    #[test]
    fn a_new_rate_applies_from_now_and_keeps_the_debt() {
        let mut b = TokenBucket::new_empty(100.0, 1000.0);
        assert!(close(b.take(0.0, 500), 5.0, 1e-12));
        // 1 s earns 100 at the old rate; 400 owed, at 400/s: 1 s.
        b.set_rate(1.0, 400.0);
        assert!(close(b.take(1.0, 0), 1.0, 1e-12));
        // Idle long enough to save a full burst; a smaller burst drops it.
        b.set_burst(200.0);
        assert_eq!(b.take(100.0, 200), 0.0);
        assert!(close(b.take(100.0, 200), 0.5, 1e-12));
        // Nonsense rates do not make infinite waits.
        let mut z = TokenBucket::new(0.0, f64::NAN);
        assert!(close(z.take(0.0, 10), 10.0, 1e-12));
    }

    // -- CapSchedule

    #[test]
    fn one_rate_holds_all_day() {
        let c = CapSchedule::parse(" 20MiB/s ").unwrap();
        assert_eq!(c, CapSchedule::always(20 << 20));
        for t in [0, 12 * H, DAY - 1, DAY + 5] {
            assert_eq!(c.cap_at(t), Some(20 << 20));
            assert_eq!(c.next_change_after(t), None);
        }
        assert_eq!(c.to_string(), "20.0 MiB/s");
    }

    #[test]
    fn windows_follow_the_clock_and_wrap_midnight() {
        let c = CapSchedule::parse("08:00-18:00=20MiB/s, 18:00-08:00=100MiB/s").unwrap();
        let (day, night) = (Some(20 << 20), Some(100 << 20));
        assert_eq!(c.cap_at(8 * H - 1), night);
        assert_eq!(c.cap_at(8 * H), day);
        assert_eq!(c.cap_at(18 * H - 1), day);
        assert_eq!(c.cap_at(18 * H), night);
        assert_eq!(c.cap_at(0), night, "wraps midnight");
        assert_eq!(c.cap_at(DAY - 1), night);
        assert_eq!(c.next_change_after(7 * H), Some(H));
        assert_eq!(c.next_change_after(8 * H), Some(10 * H), "at a boundary");
        assert_eq!(c.next_change_after(20 * H), Some(12 * H), "across midnight");
        assert_eq!(
            c.to_string(),
            "08:00-18:00=20.0 MiB/s,18:00-08:00=100.0 MiB/s"
        );
        assert_eq!(CapSchedule::parse(&c.to_string()).unwrap(), c);
    }

    #[test]
    fn outside_every_window_is_uncapped() {
        let c = CapSchedule::parse("22:00-06:00=1M,9:00-17:00=100Mbit/s").unwrap();
        assert_eq!(c.cap_at(23 * H), Some(1 << 20));
        assert_eq!(c.cap_at(5 * H), Some(1 << 20));
        assert_eq!(c.cap_at(6 * H), None);
        assert_eq!(c.cap_at(12 * H), Some(12_500_000));
        assert_eq!(c.cap_at(20 * H), None);
        assert_eq!(c.next_change_after(6 * H), Some(3 * H));
        assert_eq!(c.next_change_after(17 * H), Some(5 * H));
        // 24:00 ends the day; a whole day is one window.
        let c = CapSchedule::parse("18:00-24:00=1M").unwrap();
        assert_eq!((c.cap_at(DAY - 1), c.cap_at(0)), (Some(1 << 20), None));
        assert_eq!(c.next_change_after(0), Some(18 * H));
        let c = CapSchedule::parse("00:00-24:00=1M").unwrap();
        assert_eq!(
            (c.cap_at(0), c.cap_at(DAY - 1)),
            (Some(1 << 20), Some(1 << 20))
        );
        assert_eq!(c.next_change_after(0), None);
    }

    #[test]
    fn boundaries_without_a_change_are_skipped() {
        let c = CapSchedule::parse("00:00-12:00=1M,12:00-00:00=1M").unwrap();
        assert_eq!(c.next_change_after(3 * H), None);
        let c = CapSchedule::parse("00:00-12:00=1M,12:00-18:00=1M,18:00-19:00=2M").unwrap();
        assert_eq!(c.next_change_after(11 * H), Some(7 * H));
    }

    #[test]
    fn mistakes_get_one_line_naming_the_input_and_the_form() {
        let form = "08:00-18:00=20MiB/s";
        for (bad, named) in [
            ("", ""),
            ("fast", "fast"),
            ("08:00-18:00", "08:00-18:00"),
            ("08:00=1M", "08:00=1M"),
            ("8-18=1M", "8-18=1M"),
            ("08:00-18:00=", "08:00-18:00="),
            ("08:00-18:00=fast", "fast"),
            ("25:00-01:00=1M", "25:00-01:00=1M"),
            ("24:30-01:00=1M", "24:30-01:00=1M"),
            ("08:60-09:00=1M", "08:60-09:00=1M"),
            ("08:0-09:00=1M", "08:0-09:00=1M"),
            ("+8:00-09:00=1M", "+8:00-09:00=1M"),
            ("08:00-08:00=1M", "08:00-08:00=1M"),
            ("00:00-00:00=1M", "00:00-00:00=1M"),
            ("08:00-09:00=1M,", "08:00-09:00=1M,"),
            (
                "08:00-09:00=1M,,10:00-11:00=1M",
                "08:00-09:00=1M,,10:00-11:00=1M",
            ),
        ] {
            let e = CapSchedule::parse(bad).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(&format!("'{named}'")), "{bad:?}: {msg}");
            assert!(
                msg.contains(form) || msg.contains("20MiB/s"),
                "{bad:?}: {msg}"
            );
            assert!(!msg.contains('\n'), "{msg}");
        }
        assert!(matches!(
            CapSchedule::parse("08:00-18:00=0"),
            Err(LinkError::Rate { .. })
        ));
    }

    #[test]
    fn overlapping_windows_are_refused() {
        for (text, a, b) in [
            (
                "08:00-18:00=1M,17:00-19:00=2M",
                "08:00-18:00=1M",
                "17:00-19:00=2M",
            ),
            (
                "22:00-06:00=1M,05:00-07:00=2M",
                "22:00-06:00=1M",
                "05:00-07:00=2M",
            ),
            (
                "01:00-02:00=1M,22:00-06:00=2M",
                "01:00-02:00=1M",
                "22:00-06:00=2M",
            ),
            (
                "10:00-11:00=1M,10:00-11:00=1M",
                "10:00-11:00=1M",
                "10:00-11:00=1M",
            ),
            (
                "00:00-24:00=1M,10:00-11:00=2M",
                "00:00-24:00=1M",
                "10:00-11:00=2M",
            ),
        ] {
            let e = CapSchedule::parse(text).unwrap_err();
            assert_eq!(e, LinkError::Overlap(a.into(), b.into()), "{text}");
            assert!(e.to_string().contains("overlap"), "{e}");
        }
        // Touching is not overlapping.
        CapSchedule::parse("22:00-06:00=1M,06:00-22:00=2M").unwrap();
    }

    proptest! {
        /// For any schedule of adjacent windows (some uncapped), the cap
        /// holds for the seconds `next_change_after` says, then changes.
        #[test]
        fn next_change_agrees_with_cap_at(
            cuts in prop::collection::btree_set(0u32..1440, 1..8),
            rates in prop::collection::vec(0u64..4, 8),
            shift in 0u32..1440,
            t in 0u32..DAY,
        ) {
            let cuts: Vec<u32> = cuts.into_iter().collect();
            let mut parts = Vec::new();
            for (i, &from) in cuts.iter().enumerate() {
                let to = cuts[(i + 1) % cuts.len()];
                let (from, to) = ((from + shift) % 1440, (to + shift) % 1440);
                if rates[i] > 0 && from != to {
                    parts.push(format!(
                        "{:02}:{:02}-{:02}:{:02}={}M",
                        from / 60, from % 60, to / 60, to % 60, rates[i]
                    ));
                }
            }
            prop_assume!(!parts.is_empty());
            let c = CapSchedule::parse(&parts.join(",")).unwrap();
            let now = c.cap_at(t);
            match c.next_change_after(t) {
                None => {
                    for m in 0..1440 {
                        prop_assert_eq!(c.cap_at(t + m * 60), now);
                    }
                }
                Some(d) => {
                    prop_assert!(d > 0 && d <= DAY);
                    prop_assert_ne!(c.cap_at(t + d), now);
                    prop_assert_eq!(c.cap_at(t + d - 1), now);
                    for m in 0..d / 60 {
                        prop_assert_eq!(c.cap_at(t + m * 60), now);
                    }
                }
            }
        }
    }

    #[test]
    fn local_time_of_day_is_in_range() {
        assert!(local_secs_of_day() < DAY);
        assert_eq!(secs_of_day(23, 59, 60), Some(DAY - 1), "leap second");
        assert_eq!(secs_of_day(1, 2, 3), Some(3723));
        assert_eq!(secs_of_day(-1, 0, 0), None);
        assert!(local_time_of_day(0).is_some_and(|s| s < DAY));
    }

    // -- Link

    #[test]
    fn the_bucket_follows_the_cap() {
        let mut st = LinkState {
            sampler: ThroughputSampler::new(SAMPLER_WINDOW_S),
            bucket: None,
        };
        let (one, two, sixteen) = (1u64 << 20, 2u64 << 20, 16u64 << 20);
        assert_eq!(st.admit(0.0, None, 100 << 20), 0.0, "uncapped");
        assert!(st.bucket.is_none());
        // Capped after an uncapped spell: nothing was saved.
        assert!(close(st.admit(10.0, Some(one), one), 1.0, 1e-12));
        // Idle: at most the burst (4 MiB, the least) is saved.
        assert!(close(st.admit(100.0, Some(one), 8 * one), 4.0, 1e-12));
        // A faster cap pays the 4 MiB debt at its own rate.
        assert!(close(st.admit(100.0, Some(sixteen), 0), 0.25, 1e-12));
        // ... and saves its own burst, one second of it.
        assert!(close(
            st.admit(1000.0, Some(sixteen), 2 * sixteen),
            1.0,
            1e-12
        ));
        // A slower cap keeps no more than its own burst of the 16 MiB saved.
        assert!(close(st.admit(2000.0, Some(two), 8 * one), 2.0, 1e-12));
        // Uncapped drops the bucket; the next cap starts empty again.
        assert_eq!(st.admit(3000.0, None, 1 << 30), 0.0);
        assert!(close(st.admit(4000.0, Some(two), two), 1.0, 1e-12));
    }

    fn dir_link(cap: Option<&str>) -> (tempfile::TempDir, Arc<DirDestination>, Link) {
        let dir = tempfile::tempdir().unwrap();
        let dest = Arc::new(DirDestination::open(dir.path()).unwrap());
        let link = Link::new(dest.clone(), cap.map(|c| CapSchedule::parse(c).unwrap()));
        (dir, dest, link)
    }

    #[test]
    fn a_capped_link_holds_puts_to_the_cap() {
        let (_dir, _dest, link) = dir_link(Some("4MiB/s"));
        let cap = 4.0 * MIB;
        assert_eq!(link.cap_now(), Some(4 << 20));
        assert_eq!(link.rate(), Some(cap), "the cap until measured");
        let data = vec![7u8; 1 << 20];
        let start = Instant::now();
        for i in 0..6 {
            link.put(&format!("v/{i}"), &data).unwrap();
        }
        // 6 MiB at 4 MiB/s from an empty bucket: 1.5 s. Only a lower
        // bound: a loaded machine may be slower.
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 0.75, "6 MiB at 4 MiB/s in {took} s");
        assert_eq!(link.state().sampler.samples(), 6);
        let b = link.rate().unwrap();
        assert!(
            b <= cap && b >= cap / 8.0,
            "B {} under a 4 MiB/s cap",
            b / MIB
        );
        assert_eq!(link.get("v/5").unwrap(), data);
    }

    #[test]
    fn parallel_puts_share_the_cap() {
        let (_dir, _dest, link) = dir_link(Some("8MiB/s"));
        let link = Arc::new(link);
        let start = Instant::now();
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let link = link.clone();
                std::thread::spawn(move || {
                    for i in 0..2 {
                        link.put(&format!("v/{w}.{i}"), &vec![1u8; 1 << 20])
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        // 8 MiB at 8 MiB/s from an empty bucket: 1 s.
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 0.5, "8 MiB at 8 MiB/s in {took} s");
        assert_eq!(link.state().sampler.samples(), 8);
        assert_eq!(link.list("v/").unwrap().len(), 8);
    }

    #[test]
    fn reads_lists_and_deletes_pass_unthrottled_and_unsampled() {
        // One byte per second: a throttled get of 1 MiB would take days.
        let (_dir, dest, link) = dir_link(Some("1"));
        dest.put("v/big", &vec![3u8; 1 << 20]).unwrap();
        assert_eq!(link.get("v/big").unwrap().len(), 1 << 20);
        assert_eq!(link.list("v/").unwrap(), vec!["v/big"]);
        link.delete("v/big").unwrap();
        assert!(matches!(link.get("v/big"), Err(DestError::NotFound { .. })));
        assert_eq!(link.url(), dest.url());
        let st = link.state();
        assert_eq!(st.sampler.samples(), 0);
        assert!(st.bucket.is_none(), "the bucket was never asked");
    }

    #[test]
    fn an_uncapped_link_knows_b_once_measured() {
        let (_dir, _dest, link) = dir_link(None);
        assert_eq!((link.cap_now(), link.rate()), (None, None));
        link.put("v/a", &[1u8; 4096]).unwrap();
        assert!(link.put("v/a", b"again").is_err(), "never overwritten");
        assert_eq!(link.state().sampler.samples(), 1, "failures not sampled");
        assert!(link.rate().is_some_and(|b| b > 0.0));
    }
}
