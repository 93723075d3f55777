//! Named crash points for the torture suite: `FORESNAP_CRASH_AT=NAME[:N]`
//! makes the process `SIGKILL` itself at the N-th (default first) time it
//! reaches the point NAME, exactly as a `kill -9` landing there would.
//! Timing a `kill -9` from outside cannot hit a window of microseconds (a
//! manifest put, the middle of an epoch close); these points can, and the
//! crash matrix (`tools/tests/torture.rs`) visits each.
//!
//! With `FORESNAP_CRASH_GATE=PATH` as well, passes count only while PATH
//! exists: a test arms a daemon at its start and opens the gate at the
//! moment it wants the crash, without a restart in between.
//!
//! Unset (every normal run), [`hit`] is one load of a value parsed once.
//! The points are on slow paths only (epoch close, copy-on-write, the
//! uploader's puts), never per I/O.
//!
//! | point | where |
//! |---|---|
//! | `close` | epoch close: the close record is in the ring, not yet synced |
//! | `cow` | copy-on-write: the block is in the preserve file, its record not yet in the ring |
//! | `object` | upload: an object of the snapshot is stored, the manifest is not |
//! | `manifest` | upload: every object is stored, the manifest is not |
//! | `ack` | upload: the manifest is stored, the tracker not yet told |
//! | `replica` | replication: a chunk of the new snapshot is written to the replica, its state still names the old one |

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The crash points [`hit`] knows; a name outside this list in
/// `FORESNAP_CRASH_AT` is refused at the first [`hit`], loudly.
pub const POINTS: [&str; 6] = ["close", "cow", "object", "manifest", "ack", "replica"];

struct Armed {
    point: String,
    at: u64,
    gate: Option<std::path::PathBuf>,
    seen: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("FORESNAP_CRASH_AT").ok()?;
            match parse(&spec) {
                Ok((point, at)) => Some(Armed {
                    point,
                    at,
                    gate: std::env::var_os("FORESNAP_CRASH_GATE").map(Into::into),
                    seen: AtomicU64::new(0),
                }),
                Err(why) => {
                    log::error!("FORESNAP_CRASH_AT={spec}: {why}; no crash point armed");
                    None
                }
            }
        })
        .as_ref()
}

fn parse(spec: &str) -> Result<(String, u64), String> {
    let (point, at) = spec.split_once(':').unwrap_or((spec, "1"));
    if !POINTS.contains(&point) {
        return Err(format!("unknown point (one of {})", POINTS.join(", ")));
    }
    match at.parse::<u64>() {
        Ok(n) if n >= 1 => Ok((point.to_owned(), n)),
        _ => Err(format!("{at:?} is not a count of 1 or more")),
    }
}

/// Passes crash point `point`: kills the process if this is the armed
/// point's N-th pass.
pub fn hit(point: &'static str) {
    debug_assert!(POINTS.contains(&point), "crash point {point} not in POINTS");
    let Some(a) = armed() else { return };
    if a.point != point || a.gate.as_ref().is_some_and(|g| !g.exists()) {
        return;
    }
    if a.seen.fetch_add(1, Ordering::Relaxed) + 1 != a.at {
        return;
    }
    // Not a log line: the point of SIGKILL is that nothing else runs.
    eprintln!("crash point {point}:{}: SIGKILL", a.at);
    // SAFETY: raise(2) with a valid signal number has no memory-safety
    // preconditions.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(parse("manifest").unwrap(), ("manifest".into(), 1));
        assert_eq!(parse("cow:3").unwrap(), ("cow".into(), 3));
        assert!(parse("manifest:0").unwrap_err().contains("1 or more"));
        assert!(parse("manifest:x").is_err());
        assert!(parse("upload").unwrap_err().contains("unknown point"));
    }
}
