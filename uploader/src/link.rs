//! The link to a destination as the planner sees it: the throughput it
//! sustains (`B`, sampled from the live uploads) and an optional bandwidth
//! cap, fixed or by time of day.
//!
//! # Sampling `B`
//!
//! [`ThroughputSampler`] keeps the requests completed in a sliding window
//! (30 s in the daemon; at least the last 8 whatever their age) and
//! estimates `B` as the bytes they moved over the time the link was busy:
//! the *union* of their intervals. So
//!
//! - idle time does not count (a link that waited for work is not slow);
//! - parallel requests count once per busy second (four workers at 5 MiB/s
//!   each make 20 MiB/s);
//! - big and small requests weigh by their bytes, so a few latency-bound
//!   small requests do not make a fast link look slow;
//! - a few slow requests move `B` little: each request's duration is first
//!   clipped to 4x what the window's median rate says its bytes need, so a
//!   request stuck behind a retry counts as a slow request, not as a link
//!   that stopped.
//!
//! The sampler takes times from its caller (seconds on any monotonic
//! clock): the daemon's [`Link`] passes the real clock, the simulator a
//! virtual one, and both run this code.
//!
//! # The cap
//!
//! [`TokenBucket`] admits bytes at a rate with a burst; a request larger
//! than the burst waits in proportion. [`CapSchedule`] says which rate holds
//! when: always the same, or by windows of local time. [`Link`] wraps a
//! destination: every put passes the bucket, is timed and is sampled.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dest::{DestError, Destination};
use crate::units::{UnitError, format_rate, parse_rate};

/// Requests kept however old they are.
const MIN_SAMPLES: usize = 8;
/// A request's duration is clipped to this many times what the median rate
/// says its bytes need.
const SLOW_CLIP: f64 = 4.0;

/// Why a cap does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    #[error(transparent)]
    Rate(#[from] UnitError),
    #[error(
        "invalid cap window '{0}': give HH:MM-HH:MM=RATE, as 08:00-18:00=20MiB/s \
         (windows separated by commas)"
    )]
    Window(String),
    #[error("cap windows '{0}' and '{1}' overlap")]
    Overlap(String, String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    start: f64,
    end: f64,
    bytes: u64,
}

/// See the module doc.
#[derive(Debug, Clone)]
pub struct ThroughputSampler {
    window_s: f64,
    samples: VecDeque<Sample>,
}

impl ThroughputSampler {
    /// A sampler over a window of `window_s` seconds.
    pub fn new(window_s: f64) -> Self {
        ThroughputSampler {
            window_s,
            samples: VecDeque::new(),
        }
    }

    /// A request of `bytes` ran from `start_s` to `end_s`.
    pub fn record(&mut self, start_s: f64, end_s: f64, bytes: u64) {
        if !(start_s.is_finite() && end_s.is_finite()) || end_s < start_s {
            return;
        }
        self.samples.push_back(Sample {
            start: start_s,
            end: end_s,
            bytes,
        });
        // Keep the window, and always the last few.
        while self.samples.len() > MIN_SAMPLES
            && self
                .samples
                .front()
                .is_some_and(|s| s.end < end_s - self.window_s)
        {
            self.samples.pop_front();
        }
    }

    /// Requests kept.
    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// `B` in bytes per second at `now_s`: `None` before any request that
    /// moved bytes over a measurable time.
    pub fn rate(&self, now_s: f64) -> Option<f64> {
        let recent: Vec<Sample> = self
            .samples
            .iter()
            .rev()
            .enumerate()
            .filter(|(i, s)| *i < MIN_SAMPLES || s.end >= now_s - self.window_s)
            .map(|(_, s)| *s)
            .collect();
        let bytes: u64 = recent.iter().map(|s| s.bytes).sum();
        if bytes == 0 {
            return None;
        }
        // The median seconds per byte of the requests, for the clip.
        let mut per_byte: Vec<f64> = recent
            .iter()
            .filter(|s| s.bytes > 0)
            .map(|s| (s.end - s.start) / s.bytes as f64)
            .collect();
        per_byte.sort_by(f64::total_cmp);
        let median = per_byte[per_byte.len() / 2];
        let mut spans: Vec<(f64, f64)> = recent
            .iter()
            .map(|s| {
                let cap = SLOW_CLIP * median * s.bytes.max(1) as f64;
                let d = (s.end - s.start).min(cap.max(f64::MIN_POSITIVE));
                (s.start, s.start + d)
            })
            .collect();
        spans.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Union of the busy intervals.
        let mut busy = 0.0;
        let mut cur: Option<(f64, f64)> = None;
        for (a, b) in spans {
            cur = match cur {
                Some((ca, cb)) if a <= cb => Some((ca, cb.max(b))),
                Some((ca, cb)) => {
                    busy += cb - ca;
                    Some((a, b))
                }
                None => Some((a, b)),
            };
        }
        if let Some((ca, cb)) = cur {
            busy += cb - ca;
        }
        (busy > 0.0).then(|| bytes as f64 / busy)
    }
}

/// A token bucket on the caller's clock (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Tokens at `at` (negative: debt of requests admitted ahead).
    tokens: f64,
    at: f64,
}

impl TokenBucket {
    /// `rate` bytes per second, at most `burst` bytes saved up; starts full.
    pub fn new(rate: f64, burst: f64) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: f64::NEG_INFINITY,
        }
    }

    fn refill(&mut self, now: f64) {
        if self.at.is_finite() && now > self.at {
            self.tokens = (self.tokens + (now - self.at) * self.rate).min(self.burst);
        }
        if now > self.at || !self.at.is_finite() {
            self.at = now;
        }
    }

    /// Admits `bytes` at `now`: returns how long the caller must wait before
    /// sending them (0: at once). The bytes are debited now, so callers
    /// that come later wait behind them.
    pub fn take(&mut self, now: f64, bytes: u64) -> f64 {
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }
}

/// A bandwidth cap, fixed or by windows of local time (module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct CapSchedule {
    /// `(from, to, rate)`: seconds since local midnight, `to` exclusive;
    /// `from > to` wraps midnight. One window `0, 86400`: always.
    windows: Vec<(u32, u32, u64)>,
}

const DAY: u32 = 86_400;

fn parse_hhmm(t: &str) -> Option<u32> {
    let (h, m) = t.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) || t.trim().len() != 5 {
        return None;
    }
    Some(h * 3600 + m * 60)
}

impl CapSchedule {
    /// `20MiB/s` (always) or `08:00-18:00=20MiB/s,18:00-08:00=100MiB/s`.
    pub fn parse(text: &str) -> Result<CapSchedule, LinkError> {
        if !text.contains('=') {
            return Ok(CapSchedule {
                windows: vec![(0, DAY, parse_rate(text)?)],
            });
        }
        let mut windows = Vec::new();
        let mut names = Vec::new();
        for part in text.split(',') {
            let bad = || LinkError::Window(part.trim().to_owned());
            let (span, rate) = part.split_once('=').ok_or_else(bad)?;
            let (from, to) = span.split_once('-').ok_or_else(bad)?;
            let (from, to) = (
                parse_hhmm(from).ok_or_else(bad)?,
                parse_hhmm(to).ok_or_else(bad)?,
            );
            if from == to {
                return Err(bad());
            }
            windows.push((from % DAY, to, parse_rate(rate)?));
            names.push(part.trim().to_owned());
        }
        let s = CapSchedule { windows };
        for i in 0..s.windows.len() {
            for j in i + 1..s.windows.len() {
                let (a, b) = (s.windows[i], s.windows[j]);
                let inside = |w: (u32, u32, u64), t: u32| CapSchedule::covers(w, t);
                if inside(a, b.0) || inside(b, a.0) {
                    return Err(LinkError::Overlap(names[i].clone(), names[j].clone()));
                }
            }
        }
        Ok(s)
    }

    fn covers((from, to, _): (u32, u32, u64), t: u32) -> bool {
        if from < to {
            (from..to).contains(&t)
        } else {
            t >= from || t < to
        }
    }

    /// The cap at `secs` since local midnight; `None`: uncapped.
    pub fn cap_at(&self, secs: u32) -> Option<u64> {
        let t = secs % DAY;
        self.windows
            .iter()
            .find(|&&w| CapSchedule::covers(w, t))
            .map(|w| w.2)
    }

    /// Seconds from `secs` since local midnight until the cap may change.
    pub fn next_change_after(&self, secs: u32) -> Option<u32> {
        let t = secs % DAY;
        self.windows
            .iter()
            .flat_map(|w| [w.0, w.1 % DAY])
            .filter(|_| self.windows.len() > 1 || self.windows[0].1 != DAY)
            .map(|b| (b + DAY - t) % DAY)
            .filter(|&d| d > 0)
            .min()
    }
}

impl std::fmt::Display for CapSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, &(from, to, rate)) in self.windows.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if from == 0 && to == DAY {
                f.write_str(&format_rate(rate as f64))?;
            } else {
                write!(
                    f,
                    "{:02}:{:02}-{:02}:{:02}={}",
                    from / 3600,
                    from / 60 % 60,
                    to / 3600,
                    to / 60 % 60,
                    format_rate(rate as f64)
                )?;
            }
        }
        Ok(())
    }
}

/// Seconds since local midnight now (the C library's time zone).
fn local_secs_of_day() -> u32 {
    let now: libc::time_t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| libc::time_t::try_from(d.as_secs()).unwrap_or(0));
    // SAFETY: an all-zero `tm` is a valid value (integers and a null
    // zone pointer); localtime_r only writes it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r is the
    // thread-safe form and keeps no pointer.
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return 0;
    }
    u32::try_from(tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec).unwrap_or(0)
}

#[derive(Debug)]
struct LinkState {
    sampler: ThroughputSampler,
    /// The bucket and the cap it was made for.
    bucket: Option<(u64, TokenBucket)>,
}

/// A destination behind its cap and its throughput sampler (module doc).
#[derive(Debug)]
pub struct Link {
    inner: Arc<dyn Destination>,
    cap: Option<CapSchedule>,
    clock: Instant,
    state: Mutex<LinkState>,
}

/// Window of the daemon's sampler: long enough to span a few 4 MiB
/// objects on a slow link, short enough to follow a link that changes.
pub const SAMPLER_WINDOW_S: f64 = 30.0;

impl Link {
    pub fn new(inner: Arc<dyn Destination>, cap: Option<CapSchedule>) -> Link {
        Link {
            inner,
            cap,
            clock: Instant::now(),
            state: Mutex::new(LinkState {
                sampler: ThroughputSampler::new(SAMPLER_WINDOW_S),
                bucket: None,
            }),
        }
    }

    fn now(&self) -> f64 {
        self.clock.elapsed().as_secs_f64()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cap in force now; `None`: uncapped.
    pub fn cap_now(&self) -> Option<u64> {
        self.cap.as_ref()?.cap_at(local_secs_of_day())
    }

    /// `B`: the sampled throughput, never above the cap in force; the cap
    /// until something is measured.
    pub fn rate(&self) -> Option<f64> {
        let now = self.now();
        let sampled = self.lock().sampler.rate(now);
        match (sampled, self.cap_now()) {
            (Some(b), Some(c)) => Some(b.min(c as f64)),
            (Some(b), None) => Some(b),
            (None, c) => c.map(|c| c as f64),
        }
    }

    /// How long a put of `bytes` must wait for the cap.
    fn admit(&self, bytes: u64) -> Duration {
        let Some(cap) = self.cap_now() else {
            self.lock().bucket = None;
            return Duration::ZERO;
        };
        let now = self.now();
        let mut st = self.lock();
        // A new cap gets a new bucket: a burst saved while uncapped or at
        // another rate must not pass the new cap.
        if st.bucket.as_ref().is_none_or(|(c, _)| *c != cap) {
            // Burst: 1 s of the cap, at least one 4 MiB object.
            let burst = (cap as f64).max(f64::from(4u32 << 20));
            let mut b = TokenBucket::new(cap as f64, burst);
            b.tokens = 0.0;
            st.bucket = Some((cap, b));
        }
        let wait = st.bucket.as_mut().map_or(0.0, |(_, b)| b.take(now, bytes));
        Duration::from_secs_f64(wait.max(0.0))
    }
}

impl Destination for Link {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        // The wait for the cap is part of the request: under a cap, busy
        // time is spent waiting for tokens.
        let start = self.now();
        let wait = self.admit(bytes.len() as u64);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        let r = self.inner.put(key, bytes);
        let end = self.now();
        if r.is_ok() {
            self.lock().sampler.record(start, end, bytes.len() as u64);
        }
        r
    }
    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        self.inner.get(key)
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1048576.0;

    #[test]
    fn idle_time_does_not_count() {
        let mut s = ThroughputSampler::new(30.0);
        assert_eq!(s.rate(0.0), None);
        // 4 MiB in 1 s, then 10 s idle, then 4 MiB in 1 s.
        s.record(0.0, 1.0, 4 << 20);
        s.record(11.0, 12.0, 4 << 20);
        let r = s.rate(12.0).unwrap();
        assert!((r - 4.0 * MIB).abs() < 1.0, "{r}");
    }

    #[test]
    fn parallel_requests_add_up() {
        let mut s = ThroughputSampler::new(30.0);
        for w in 0..4 {
            for i in 0..5 {
                let t = f64::from(i) + f64::from(w) * 0.01;
                s.record(t, t + 1.0, 5 << 20);
            }
        }
        let r = s.rate(6.0).unwrap();
        // 100 MiB over ~5.03 s busy.
        assert!((r / MIB - 100.0 / 5.03).abs() < 0.5, "{}", r / MIB);
    }

    #[test]
    fn a_few_slow_requests_move_b_little() {
        let mut s = ThroughputSampler::new(60.0);
        let mut t = 0.0;
        for i in 0..20 {
            let d = if i == 7 { 10.0 } else { 1.0 };
            s.record(t, t + d, 4 << 20);
            t += d;
        }
        let r = s.rate(t).unwrap() / MIB;
        assert!(r > 4.0 * 0.8, "{r}");
        assert!(r <= 4.0 + 1e-9, "{r}");
    }

    #[test]
    fn small_latency_bound_requests_weigh_by_bytes() {
        let mut s = ThroughputSampler::new(60.0);
        let mut t = 0.0;
        for _ in 0..10 {
            s.record(t, t + 0.4, 40 << 20); // 100 MiB/s
            s.record(t + 0.4, t + 0.45, 4096); // a 50 ms round trip
            t += 0.5;
        }
        let r = s.rate(t).unwrap() / MIB;
        assert!(r > 80.0, "{r}");
    }

    #[test]
    fn the_window_slides_but_keeps_the_last_few() {
        let mut s = ThroughputSampler::new(10.0);
        for i in 0..20 {
            let t = f64::from(i);
            s.record(t, t + 1.0, 1 << 20); // 1 MiB/s
        }
        for i in 0..10 {
            let t = 100.0 + f64::from(i);
            s.record(t, t + 0.25, 1 << 20); // 4 MiB/s now
        }
        assert!((s.rate(110.0).unwrap() / MIB - 4.0).abs() < 1e-6);
        assert!(s.samples() <= 12);
        // Long idle: the last 8 still say something.
        assert!(s.rate(1000.0).is_some());
    }

    proptest::proptest! {
        /// Bytes admitted by time t never exceed rate * t + burst.
        #[test]
        fn bucket_never_exceeds_its_rate(
            takes in proptest::collection::vec((0.0f64..2.0, 1u64..3_000_000), 1..60)
        ) {
            let (rate, burst) = (1_000_000.0, 500_000.0);
            let mut b = TokenBucket::new(rate, burst);
            let mut now = 0.0;
            let mut sent: Vec<(f64, u64)> = Vec::new();
            for (dt, bytes) in takes {
                now += dt;
                let wait = b.take(now, bytes);
                proptest::prop_assert!(wait >= 0.0);
                sent.push((now + wait, bytes));
            }
            sent.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut total = 0u64;
            for &(t, bytes) in &sent {
                total += bytes;
                proptest::prop_assert!(total as f64 <= rate * t + burst + 1.0,
                    "{total} bytes by {t}");
            }
        }
    }

    #[test]
    fn big_requests_wait_in_proportion() {
        let mut b = TokenBucket::new(1000.0, 100.0);
        assert_eq!(b.take(0.0, 100), 0.0);
        assert!((b.take(0.0, 1000) - 1.0).abs() < 1e-9);
        assert!(
            (b.take(0.5, 500) - 1.0).abs() < 1e-9,
            "queued behind the first"
        );
    }

    #[test]
    fn caps_parse_and_follow_the_clock() {
        let c = CapSchedule::parse("20MiB/s").unwrap();
        assert_eq!(c.cap_at(0), Some(20 << 20));
        assert_eq!(c.cap_at(DAY - 1), Some(20 << 20));
        assert_eq!(c.next_change_after(100), None);
        let c = CapSchedule::parse("08:00-18:00=20MiB/s,22:00-06:00=100MiB/s").unwrap();
        assert_eq!(c.cap_at(8 * 3600), Some(20 << 20));
        assert_eq!(c.cap_at(18 * 3600 - 1), Some(20 << 20));
        assert_eq!(c.cap_at(18 * 3600), None, "uncapped between windows");
        assert_eq!(c.cap_at(23 * 3600), Some(100 << 20), "wraps midnight");
        assert_eq!(c.cap_at(3600), Some(100 << 20));
        assert_eq!(c.next_change_after(7 * 3600), Some(3600));
        assert_eq!(c.next_change_after(19 * 3600), Some(3 * 3600));
        assert_eq!(
            c.to_string(),
            "08:00-18:00=20.0 MiB/s,22:00-06:00=100.0 MiB/s"
        );
        for bad in [
            "fast",
            "08:00=1M",
            "8-18=1M",
            "08:00-18:00=",
            "25:00-01:00=1M",
            "08:00-08:00=1M",
            "08:60-09:00=1M",
        ] {
            assert!(CapSchedule::parse(bad).is_err(), "{bad}");
        }
        let e = CapSchedule::parse("08:00-18:00=1M,17:00-19:00=2M").unwrap_err();
        assert!(matches!(e, LinkError::Overlap(..)), "{e}");
        assert!(e.to_string().contains("overlap"));
    }

    /// The link holds puts to the cap and samples them.
    #[test]
    fn a_capped_link_is_slow_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let dest = Arc::new(crate::dest::DirDestination::open(dir.path()).unwrap());
        let link = Link::new(dest, Some(CapSchedule::parse("8MiB/s").unwrap()));
        assert_eq!(link.rate(), Some(8.0 * MIB), "the cap until measured");
        let start = Instant::now();
        let data = vec![7u8; 2 << 20];
        for i in 0..6 {
            link.put(&format!("k/{i}"), &data).unwrap();
        }
        // 12 MiB at 8 MiB/s from an empty bucket: 1.5 s at least.
        assert!(
            start.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            start.elapsed()
        );
        let b = link.rate().unwrap();
        assert!(
            b <= 8.0 * MIB && b > 2.0 * MIB,
            "B {b} under an 8 MiB/s cap"
        );
        assert_eq!(link.get("k/0").unwrap(), data);
    }
}
