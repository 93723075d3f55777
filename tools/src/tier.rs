//! `foresnap tier`: move a volume's old snapshots from a fast destination
//! to a slow one ([`foresnap_uploader::tier`]), once or on an interval.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use foresnap_uploader::dest::Destination;
use foresnap_uploader::engine::early::now_ms;
use foresnap_uploader::format::Keys;
use foresnap_uploader::tier::{TierError, TierReport, tier_once};
use foresnap_uploader::units::parse_interval;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cli::TierArgs;
use crate::upload::open_dest;

/// How often a waiting `--watch` looks for a signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// `--age`: an interval as everywhere, or zero (`0`, `0s`): every snapshot
/// but the newest moves.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let number = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &t[number.len()..];
    let zero = number.parse::<f64>().is_ok_and(|n| n == 0.0)
        && ["", "ms", "s", "sec", "m", "min", "h", "d"].contains(&unit);
    if zero {
        return Ok(Duration::ZERO);
    }
    parse_interval(s).map_err(|e| e.to_string())
}

/// `foresnap tier`.
pub fn run(args: &TierArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&args.volume).map_err(anyhow::Error::msg)?;
    let key = args.key.load()?;
    let fast = open_dest(&args.fast, &keys, key.as_ref()).context("--fast")?;
    let slow = open_dest(&args.slow, &keys, key.as_ref()).context("--slow")?;
    let Some(every) = args.watch else {
        return round(fast.as_ref(), slow.as_ref(), &keys, args.age).map_err(Into::into);
    };
    // The first signal ends the wait after the round in progress (a move
    // is crash-safe, but there is no need to test it); a second one exits
    // at once.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
            .context("cannot install signal handlers")?;
        signal_hook::flag::register(sig, stop.clone()).context("cannot install signal handlers")?;
    }
    loop {
        match round(fast.as_ref(), slow.as_ref(), &keys, args.age) {
            Ok(()) => {}
            Err(e) if !e.needs_attention() => {
                eprintln!(
                    "foresnap: {e}; trying again in {:.0} s",
                    every.as_secs_f64()
                );
            }
            Err(e) => return Err(e.into()),
        }
        let next = Instant::now() + every;
        // Relaxed: the flag carries no data; it is only polled.
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep(SIGNAL_POLL.min(next.saturating_duration_since(Instant::now())));
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!("foresnap: stopping on a signal");
            return Ok(());
        }
    }
}

/// One pass: progress on stderr, a line per snapshot moved and a summary
/// on stdout.
fn round(
    fast: &dyn Destination,
    slow: &dyn Destination,
    keys: &Keys,
    age: Duration,
) -> Result<(), TierError> {
    let r = tier_once(fast, slow, keys, age, now_ms(), |line| {
        eprintln!("foresnap: {line}");
    })?;
    // stdout gone (a closed pipe) is no reason to fail a move that is done.
    let _ = print_report(&r, keys, fast, slow);
    Ok(())
}

fn print_report(
    r: &TierReport,
    keys: &Keys,
    fast: &dyn Destination,
    slow: &dyn Destination,
) -> std::io::Result<()> {
    let (f, s) = (fast.url(), slow.url());
    let mut out = std::io::stdout().lock();
    for id in &r.resumed {
        writeln!(out, "snapshot {id}: finished its interrupted move to {s}")?;
    }
    for id in &r.moved {
        writeln!(out, "snapshot {id} moved from {f} to {s}")?;
    }
    let n = r.moved.len();
    write!(
        out,
        "volume {}: {n} snapshot{} moved to {s}, {} objects ({} bytes) copied, {} objects deleted at {f}",
        keys.name(),
        if n == 1 { "" } else { "s" },
        r.objects_copied,
        r.bytes_copied,
        r.objects_deleted
    )?;
    if let Some(id) = r.kept_newest {
        write!(out, "; snapshot {id} stays at {f}: it is the newest there")?;
    }
    writeln!(out)?;
    out.flush()
}
