//! `serve --metrics ADDR`: the daemon's figures for Prometheus, as text
//! exposition format 0.0.4 at `http://ADDR/metrics`, on the loopback
//! interface only (the figures are the operator's; expose them further
//! through a proxy that authenticates).
//!
//! The I/O histograms come from [`IoMetrics`] (every request of the
//! device, timed from the kernel's command to its completion), the rest
//! from what `status` shows: the tracker, the uploader's standing and
//! totals, the planner's view and the snapshots' lag.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use foresnap_driver::metrics::{ClassStats, IoMetrics};
use foresnap_driver::tracking::Tracker;

use crate::upload::UploadView;

/// Latency bucket bounds of the histograms, in seconds.
const BUCKETS_S: [f64; 17] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1,
    0.25, 0.5, 1.0, 2.5,
];

/// Binds the metrics address now (before the device exists: a bad or busy
/// address fails the start). Loopback only.
pub fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let a = check_addr(addr)?;
    TcpListener::bind(a).with_context(|| format!("cannot bind --metrics {addr}"))
}

/// The metrics address, if it is a loopback `IP:PORT`.
pub fn check_addr(addr: &str) -> anyhow::Result<SocketAddr> {
    let a: SocketAddr = addr.parse().map_err(|_| {
        anyhow::anyhow!("invalid --metrics address {addr:?}: give IP:PORT, as 127.0.0.1:9477")
    })?;
    if !a.ip().is_loopback() {
        bail!(
            "--metrics {addr}: metrics are served on the loopback interface only \
             (127.0.0.1 or [::1]); put an authenticating proxy in front to reach them from elsewhere"
        );
    }
    Ok(a)
}

/// What the endpoint reports on.
#[derive(Debug, Clone)]
pub struct Sources {
    pub io: Arc<IoMetrics>,
    pub tracker: Option<Arc<Tracker>>,
    pub upload: Option<UploadView>,
    /// A lazy restore's hydration.
    pub hydration: Option<Arc<foresnap_driver::hydrate::Hydration>>,
}

/// Serves `listener` on a thread until the process exits.
pub fn start(listener: TcpListener, sources: Sources) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    eprintln!("foresnap: metrics on http://{addr}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let mut collisions = Collisions::default();
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, &sources, &mut collisions) {
                            log::debug!("metrics connection: {e}");
                        }
                    }
                    Err(e) => log::warn!("metrics socket: {e}"),
                }
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(())
}

/// One HTTP/1.x exchange: `GET /metrics`, or 404/405.
fn answer(conn: TcpStream, src: &Sources, collisions: &mut Collisions) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.by_ref().take(8 << 10).read_line(&mut request)?;
    // The headers: read and ignored (bounded).
    let mut line = String::new();
    let mut budget = 64usize;
    while budget > 0 {
        line.clear();
        let n = reader.by_ref().take(8 << 10).read_line(&mut line)?;
        if n == 0 || line.trim().is_empty() {
            break;
        }
        budget -= 1;
    }
    let mut parts = request.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, target.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => ("200 OK", render(src, collisions)),
        ("GET", _) => ("404 Not Found", "not found: try /metrics\n".to_owned()),
        _ => (
            "405 Method Not Allowed",
            "only GET /metrics is served\n".to_owned(),
        ),
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// Overwrites of blocks already changed in their epoch (each one an
/// upload of stale content avoided), added up from the dirty map's
/// per-chunk counters, which wrap at 2^32: each scrape adds the change
/// since the last.
#[derive(Debug, Default)]
struct Collisions {
    seen: Vec<u32>,
    total: u64,
}

impl Collisions {
    fn update(&mut self, tracker: &Tracker) -> u64 {
        let map = tracker.map();
        let chunks = usize::try_from(map.chunks()).unwrap_or(0);
        self.seen.resize(chunks, 0);
        for (c, seen) in self.seen.iter_mut().enumerate() {
            let (_, overwrites) = map.chunk_heat(c as u64);
            self.total += u64::from(overwrites.wrapping_sub(*seen));
            *seen = overwrites;
        }
        self.total
    }
}

/// One metric family's header.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family of one sample.
fn single(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    labels: &str,
    v: impl std::fmt::Display,
) {
    family(out, name, kind, help);
    sample(out, name, labels, v);
}

fn sample(out: &mut String, name: &str, labels: &str, v: impl std::fmt::Display) {
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {v}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {v}");
    }
}

/// The exposition text.
fn render(src: &Sources, collisions: &mut Collisions) -> String {
    let mut o = String::with_capacity(16 << 10);
    render_io(&mut o, &src.io);
    if let Some(t) = &src.tracker {
        render_tracker(&mut o, t, collisions);
    }
    if let Some(u) = &src.upload {
        render_upload(&mut o, u);
    }
    if let Some(h) = &src.hydration {
        let p = h.progress();
        let gauges: [(&str, &str, u64); 3] = [
            (
                "foresnap_hydration_chunks",
                "Chunks of the lazily restored volume.",
                p.chunks,
            ),
            (
                "foresnap_hydration_chunks_ready",
                "Chunks restored so far (fetched, or written whole by the device).",
                p.ready,
            ),
            (
                "foresnap_hydration_chunks_failed",
                "Chunks whose fetch failed for good (their reads get EIO).",
                p.failed,
            ),
        ];
        for (name, help, v) in gauges {
            single(&mut o, name, "gauge", help, "", v);
        }
        single(
            &mut o,
            "foresnap_hydration_on_demand_total",
            "counter",
            "Chunks fetched ahead of the background because a request waited for them.",
            "",
            p.on_demand,
        );
    }
    o
}

#[allow(clippy::cast_precision_loss)]
fn render_io(o: &mut String, io: &IoMetrics) {
    let totals = io.totals();
    let op = |c: foresnap_driver::metrics::OpClass| format!("op=\"{}\"", c.name());
    type Count = fn(&ClassStats) -> u64;
    let counters: [(&str, &str, Count); 3] = [
        (
            "foresnap_io_requests_total",
            "Requests completed by the device.",
            |s| s.latency_us.len(),
        ),
        (
            "foresnap_io_bytes_total",
            "Bytes of the requests completed without error.",
            |s| s.bytes,
        ),
        (
            "foresnap_io_errors_total",
            "Requests completed with an errno (EIO from the backing store, invalid requests).",
            |s| s.errors,
        ),
    ];
    for (name, help, count) in counters {
        family(o, name, "counter", help);
        for (c, s) in &totals {
            sample(o, name, &op(*c), count(s));
        }
    }
    family(
        o,
        "foresnap_io_latency_seconds",
        "histogram",
        "Request latency from the kernel's command to its completion (1% resolution).",
    );
    for (c, s) in &totals {
        let h = &s.latency_us;
        for le in BUCKETS_S {
            // Bucket bounds are whole microseconds.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let us = (le * 1e6).round() as u64;
            let n = h.count_between(0, us);
            sample(
                o,
                "foresnap_io_latency_seconds_bucket",
                &format!("{},le=\"{le}\"", op(*c)),
                n,
            );
        }
        sample(
            o,
            "foresnap_io_latency_seconds_bucket",
            &format!("{},le=\"+Inf\"", op(*c)),
            h.len(),
        );
        let sum_s = h.mean() * h.len() as f64 / 1e6;
        sample(o, "foresnap_io_latency_seconds_sum", &op(*c), sum_s);
        sample(o, "foresnap_io_latency_seconds_count", &op(*c), h.len());
    }
    family(
        o,
        "foresnap_io_latency_quantile_seconds",
        "gauge",
        "Request latency quantiles since the start (1% resolution).",
    );
    for (c, s) in &totals {
        if s.latency_us.is_empty() {
            continue;
        }
        for q in [0.5, 0.99, 0.999] {
            let v = s.latency_us.value_at_quantile(q) as f64 / 1e6;
            sample(
                o,
                "foresnap_io_latency_quantile_seconds",
                &format!("{},quantile=\"{q}\"", op(*c)),
                v,
            );
        }
    }
}

fn render_tracker(o: &mut String, t: &Tracker, collisions: &mut Collisions) {
    let s = t.status();
    let gauges: [(&str, &str, f64); 6] = [
        (
            "foresnap_open_epoch",
            "The open epoch (the next snapshot's id).",
            f64::from(s.open_epoch),
        ),
        (
            "foresnap_pending_blocks",
            "Tracking blocks changed and not yet uploaded.",
            to_f(s.pending_blocks),
        ),
        (
            "foresnap_ring_fill_ratio",
            "Fraction of the write ring in use.",
            s.ring_fill,
        ),
        (
            "foresnap_degraded",
            "1 while the write ring is full and the overflow bitmap tracks writes.",
            f64::from(u8::from(s.degraded)),
        ),
        (
            "foresnap_preserve_slots_used",
            "Copy-on-write slots holding a closed snapshot's blocks.",
            to_f(s.preserve_slots_used),
        ),
        (
            "foresnap_snapshots_awaiting_upload",
            "Closed snapshots not yet complete at their destination.",
            to_f(s.closed.len() as u64),
        ),
    ];
    for (name, help, v) in gauges {
        single(o, name, "gauge", help, "", v);
    }
    let counters: [(&str, &str, u64); 3] = [
        (
            "foresnap_cow_blocks_total",
            "Blocks copied before a write overwrote a closed snapshot's content.",
            s.cow_blocks,
        ),
        (
            "foresnap_deferred_writes_total",
            "Writes held back while an epoch closed.",
            s.deferred_writes,
        ),
        (
            "foresnap_collisions_avoided_total",
            "Writes to blocks already changed in their epoch: uploads of stale content avoided.",
            collisions.update(t),
        ),
    ];
    for (name, help, v) in counters {
        single(o, name, "counter", help, "", v);
    }
}

#[allow(clippy::cast_precision_loss)]
fn to_f(v: u64) -> f64 {
    v as f64
}

fn render_upload(o: &mut String, u: &UploadView) {
    let h = u.health.get();
    let dest = format!("dest=\"{}\"", escape(&u.dest));
    single(
        o,
        "foresnap_upload_snapshots_total",
        "counter",
        "Snapshots stored complete at the destination by this daemon.",
        &dest,
        h.totals.snapshots,
    );
    single(
        o,
        "foresnap_upload_objects_total",
        "counter",
        "Objects stored at the close (parts stored before it are not counted).",
        &dest,
        h.totals.objects,
    );
    single(
        o,
        "foresnap_upload_bytes_total",
        "counter",
        "Bytes sent at and after the close (see foresnap_upload_early_bytes_total for before).",
        &dest,
        h.totals.bytes,
    );
    family(
        o,
        "foresnap_upload_failures_total",
        "counter",
        "Failed upload attempts by class (remote, io, missing, damaged, key, conflict, volume, config).",
    );
    for (class, n) in &h.totals.failures {
        sample(
            o,
            "foresnap_upload_failures_total",
            &format!("{dest},class=\"{class}\""),
            n,
        );
    }
    single(
        o,
        "foresnap_upload_failing",
        "gauge",
        "1 while uploads fail (retried with backoff).",
        &dest,
        u8::from(h.failing_since_ms.is_some()),
    );
    if let Some((id, ms)) = h.last_uploaded {
        single(
            o,
            "foresnap_last_uploaded_snapshot",
            "gauge",
            "The newest snapshot this daemon stored.",
            &dest,
            id,
        );
        single(
            o,
            "foresnap_last_upload_timestamp_seconds",
            "gauge",
            "When it was stored (Unix time).",
            &dest,
            to_f(ms) / 1e3,
        );
    }
    if let Some(p) = &u.prune {
        let st = p.get();
        single(
            o,
            "foresnap_prune_dropped_total",
            "counter",
            "Snapshots deleted by the retention rules since the start.",
            "",
            st.dropped_total,
        );
        single(
            o,
            "foresnap_prune_failing",
            "gauge",
            "1 while pruning fails.",
            "",
            u8::from(st.failing_since_ms.is_some()),
        );
    }
    let Some(d) = &u.deadlines else {
        return;
    };
    let (early, voided) = d.early_bytes();
    single(
        o,
        "foresnap_upload_early_bytes_total",
        "counter",
        "Bytes stored before their snapshot's close and kept.",
        &dest,
        early,
    );
    single(
        o,
        "foresnap_upload_voided_bytes_total",
        "counter",
        "Bytes stored before the close and voided by a later write (collisions not avoided).",
        &dest,
        voided,
    );
    if let Some(p) = d.plan() {
        let mut g = |name: &str, help: &str, v: Option<f64>| {
            if let Some(v) = v {
                single(o, name, "gauge", help, "", v);
            }
        };
        g(
            "foresnap_plan_outstanding_bytes",
            "D: bytes still to upload for the open and closed snapshots.",
            Some(to_f(p.outstanding_bytes)),
        );
        g(
            "foresnap_plan_hot_bytes",
            "Bytes held back as likely to be overwritten before the close (P >= PT).",
            Some(to_f(p.hot_bytes)),
        );
        g(
            "foresnap_plan_throughput_bytes_per_second",
            "B: the sampled upload throughput.",
            p.rate,
        );
        g(
            "foresnap_plan_seconds_to_close",
            "TS: time left to the scheduled close.",
            p.ts_s,
        );
        g(
            "foresnap_plan_predicted_lag_seconds",
            "Predicted completion after the scheduled close.",
            p.predicted_lag_s,
        );
        g(
            "foresnap_plan_started",
            "1 once uploading of the open snapshot started before its close.",
            Some(f64::from(u8::from(p.started))),
        );
    }
    if let Some(last) = d.history().last() {
        single(
            o,
            "foresnap_snapshot_lag_seconds",
            "gauge",
            "The last scheduled snapshot's completion after its scheduled close.",
            &format!("snapshot=\"{}\"", last.snapshot),
            (to_f(last.completed_ms) - to_f(last.scheduled_ms)) / 1e3,
        );
    }
}

/// A label value: backslash, quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_served() {
        assert!(bind("127.0.0.1:0").is_ok());
        let e = bind("0.0.0.0:0").unwrap_err().to_string();
        assert!(e.contains("loopback interface only"), "{e}");
        let e = bind("localhost").unwrap_err().to_string();
        assert!(e.contains("invalid --metrics address"), "{e}");
    }

    #[test]
    fn io_histograms_are_cumulative_and_counted() {
        use foresnap_driver::metrics::OpClass;
        let io = Arc::new(IoMetrics::new());
        let q = io.queue();
        {
            let mut q = q.lock().unwrap();
            for us in [5u64, 40, 40, 3000] {
                q.record(OpClass::Write, 4096, Duration::from_micros(us), true);
            }
            q.record(OpClass::Read, 512, Duration::from_micros(7), false);
        }
        let dir = tempfile::tempdir().unwrap();
        let hydration = foresnap_driver::hydrate::Hydration::create(
            &dir.path().join("h"),
            8 << 20,
            1 << 20,
            [0; 32],
        )
        .unwrap();
        let text = render(
            &Sources {
                io,
                tracker: None,
                upload: None,
                hydration: Some(Arc::new(hydration)),
            },
            &mut Collisions::default(),
        );
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(line("foresnap_io_requests_total{op=\"write\"}"), "4");
        assert_eq!(line("foresnap_hydration_chunks "), "8");
        assert_eq!(line("foresnap_hydration_chunks_ready "), "0");
        assert_eq!(line("foresnap_io_bytes_total{op=\"write\"}"), "16384");
        assert_eq!(line("foresnap_io_errors_total{op=\"read\"}"), "1");
        let b = "foresnap_io_latency_seconds_bucket{op=\"write\",le=";
        assert_eq!(line(&format!("{b}\"0.00001\"}}")), "1");
        assert_eq!(line(&format!("{b}\"0.00005\"}}")), "3");
        assert_eq!(line(&format!("{b}\"0.001\"}}")), "3");
        assert_eq!(line(&format!("{b}\"0.005\"}}")), "4");
        assert_eq!(line(&format!("{b}\"+Inf\"}}")), "4");
        assert_eq!(line("foresnap_io_latency_seconds_count{op=\"write\"}"), "4");
        // Every family is declared once, before its samples.
        let types = text.lines().filter(|l| l.starts_with("# TYPE")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP")).count();
        assert_eq!(types, helps);
    }
}
