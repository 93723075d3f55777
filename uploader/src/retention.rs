//! Retention: which snapshots of a volume a destination keeps, and the
//! garbage collection that deletes the others with every object that only
//! they needed.
//!
//! # Rules
//!
//! A [`Retention`] policy counts, as restic's and borg's `--keep-*` do:
//!
//! - `keep_last` N: the N newest snapshots;
//! - `keep_hourly`, `keep_daily`, `keep_weekly` N: for each of the N most
//!   recent hours, days or weeks that have a snapshot, the newest snapshot
//!   in it. Periods are UTC, from the close time in the manifest; weeks
//!   start on Monday, as ISO 8601 weeks do.
//!
//! A snapshot that any rule keeps is kept. The newest snapshot is always
//! kept: the next upload is a delta over it. "Newest" is by snapshot id,
//! which follows the order of the closes even where a clock stepped back;
//! close times only place a snapshot in its hour, day and week. Keeping is
//! idempotent: applied to the snapshots it kept, a policy keeps them all.
//!
//! # A prune, step by step ([`prune`])
//!
//! 1. While a move of the volume's snapshots to another destination is
//!    unfinished here (a tiering journal, [`crate::tier`]), refuse: the
//!    move's journal names objects of that snapshot for deletion too, and
//!    `foresnap tier` finishes it first. Nothing is deleted.
//! 2. Finish the journals an interrupted prune left (step 5 for each).
//! 3. List the manifests, read each (verified: a damaged one stops the
//!    run, as what it references is unknown) and choose what to keep.
//! 4. Plan: the manifests of the dropped snapshots, and every object stored
//!    under a snapshot id at or below the newest listed one that no kept
//!    manifest references: the dropped snapshots' own objects and those of
//!    uploads that never completed (a crash, a voided epoch). The objects
//!    are listed *after* the manifests. An object above the newest
//!    snapshot belongs to an upload in progress (an upload stores its
//!    objects first and its manifest last) or to one that will resume
//!    after a crash: it is never deleted.
//! 5. Store the plan as a journal, [`Keys::retention_journal`] of the
//!    newest snapshot, then delete: the manifests first (a snapshot leaves
//!    the listing while all its objects are there), then the objects, then
//!    the journal.
//!
//! # Safety when deleting
//!
//! Step 5 checks each deletion against what the destination lists at that
//! moment, not against the plan: a journal naming the manifest of the
//! newest snapshot listed is refused whole, and a journaled object is
//! deleted only if no manifest listed once the dropped ones are gone
//! references it and its snapshot id is not above the newest listed. So a
//! journal, whatever run wrote it and under whatever policy, never takes
//! an object a listed snapshot needs. An upload that completes during a
//! prune builds on the newest snapshot, which stays, and references only
//! that snapshot's objects and its own (above the newest listed when the
//! plan was made).
//!
//! # Crashes
//!
//! Before the journal is stored nothing was deleted; after, the next run
//! finishes it before anything else. At every moment each snapshot the
//! policy keeps is listed and whole.
//!
//! # Concurrency
//!
//! A prune may run while an uploader adds snapshots; two prunes of a
//! volume at one destination at once are not supported, nor a prune and
//! a `tier` run. An upload that crashed after its manifest was stored but
//! before its epoch was acknowledged locally is uploaded again at restart
//! over the newest snapshot *below* its own; if a prune dropped that one
//! meanwhile, the new manifest differs from the stored one, and the stored
//! one stands (the engine checks that it is this volume's, of that close).
//!
//! # Journal format (version 1)
//!
//! Sealed text (the crate's `live` module), each line ending in `\n`:
//!
//! | line | content |
//! |---|---|
//! | 1 | `FSNPPRUNE 1 NEWEST`: magic, format version, the newest snapshot id when the plan was made, 10 digits (as in the journal's key) |
//! | 2 .. n-1 | one key per line: the manifests to delete (each below NEWEST), then the objects (each of a snapshot id at or below NEWEST), each group ascending |
//! | n | `crc32c XXXXXXXX`: crc32c of every byte before this line, 8 lowercase hex digits |

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::dest::{DestError, Destination, check_key};
use crate::engine::UploadHealth;
use crate::format::Keys;
use crate::live::{LiveError, LiveIndex, journal_header, journal_id, seal, unseal};
use crate::schedule::civil_from_days;

/// First word of a journal.
const JOURNAL_MAGIC: &str = "FSNPPRUNE";
/// Format version of journals.
const JOURNAL_VERSION: u32 = 1;
const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

/// How many snapshots each rule keeps (module doc); 0 turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    pub keep_weekly: u32,
}

impl Retention {
    /// At least one rule must keep something.
    pub fn check(&self) -> Result<(), PruneError> {
        let counts = [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
        ];
        if counts.iter().all(|&n| n == 0) {
            return Err(PruneError::NoRule);
        }
        Ok(())
    }
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rule {
    /// The newest snapshot, always.
    Newest,
    Last,
    Hourly,
    Daily,
    Weekly,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Newest => "newest",
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
        })
    }
}

/// What the policy says of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub snapshot: u32,
    pub closed_ms: u64,
    /// The rules that keep it; none: it is dropped.
    pub kept_by: Vec<Rule>,
}

impl Decision {
    pub fn kept(&self) -> bool {
        !self.kept_by.is_empty()
    }
}

/// The hour, day or week (a number from the Unix epoch on) of a close time.
type Period = fn(u64) -> u64;

/// Applies `policy` to snapshots given as (id, close time in ms since the
/// Unix epoch): a decision for each, ascending by id (module doc).
pub fn choose(policy: &Retention, snapshots: &[(u32, u64)]) -> Vec<Decision> {
    let mut out: Vec<Decision> = snapshots
        .iter()
        .map(|&(snapshot, closed_ms)| Decision {
            snapshot,
            closed_ms,
            kept_by: Vec::new(),
        })
        .collect();
    out.sort_by_key(|d| d.snapshot);
    out.dedup_by_key(|d| d.snapshot);
    let periods: [(Rule, u32, Period); 3] = [
        (Rule::Hourly, policy.keep_hourly, |ms| ms / HOUR_MS),
        (Rule::Daily, policy.keep_daily, |ms| ms / DAY_MS),
        // 1970-01-01 was a Thursday: counted from three days earlier,
        // weeks start on Monday.
        (Rule::Weekly, policy.keep_weekly, |ms| (ms / DAY_MS + 3) / 7),
    ];
    // The periods each rule has kept a snapshot of, newest first: the
    // first snapshot met in a period is its newest.
    let mut seen: [BTreeSet<u64>; 3] = Default::default();
    for (rank, d) in out.iter_mut().rev().enumerate() {
        if rank == 0 {
            d.kept_by.push(Rule::Newest);
        }
        if rank < policy.keep_last as usize {
            d.kept_by.push(Rule::Last);
        }
        for ((rule, n, period), seen) in periods.iter().zip(&mut seen) {
            if seen.len() < *n as usize && seen.insert(period(d.closed_ms)) {
                d.kept_by.push(*rule);
            }
        }
    }
    out
}

/// `ms` since the Unix epoch as a UTC time: `2024-05-01 13:45:00 UTC`.
pub fn utc(ms: u64) -> String {
    // u64::MAX ms is about 2.1e11 days: the conversion never fails.
    let days = i64::try_from(ms / DAY_MS).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let s = ms % DAY_MS / 1000;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// What one [`prune`] did (with `dry_run`: would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// The snapshots listed once interrupted prunes are finished,
    /// ascending, each with the rules that keep it.
    pub snapshots: Vec<Decision>,
    /// Journals of interrupted prunes, finished first.
    pub resumed: Vec<String>,
    /// Objects deleted (deletions issued: a resumed journal counts those
    /// its crashed run had issued already).
    pub objects_deleted: u64,
}

impl PruneReport {
    pub fn kept(&self) -> usize {
        self.snapshots.iter().filter(|d| d.kept()).count()
    }

    pub fn dropped(&self) -> usize {
        self.snapshots.len() - self.kept()
    }
}

/// Why [`prune`] stopped. What it deleted before stays deleted, and every
/// snapshot listed is whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PruneError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "no retention rule: keep the last, hourly, daily or weekly snapshots (a count above 0)"
    )]
    NoRule,
    #[error(
        "{dest}: {key} is damaged ({why}): what the snapshots need is unknown, so nothing more is deleted"
    )]
    Damaged {
        dest: String,
        key: String,
        why: String,
    },
    #[error(
        "{dest}: a move of this volume to another destination is unfinished ({key}): \
         finish it with `foresnap tier` first; nothing was pruned"
    )]
    TierPending { dest: String, key: String },
    #[error("{dest}: journal {key} is refused ({why}); nothing it names was deleted")]
    BadJournal {
        dest: String,
        key: String,
        why: String,
    },
}

impl From<LiveError> for PruneError {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::Dest(e) => PruneError::Dest(e),
            LiveError::Damaged { dest, key, why } => PruneError::Damaged { dest, key, why },
        }
    }
}

/// A prune's plan, as journaled.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Journal {
    /// The newest snapshot when the plan was made.
    newest: u32,
    /// Snapshots whose manifests are deleted.
    manifests: BTreeSet<u32>,
    /// Object keys to delete.
    objects: BTreeSet<String>,
}

fn encode_journal(keys: &Keys, j: &Journal) -> Vec<u8> {
    let mut text = journal_header(JOURNAL_MAGIC, JOURNAL_VERSION, j.newest);
    let manifests = j.manifests.iter().map(|&id| keys.manifest(id));
    for key in manifests.chain(j.objects.iter().cloned()) {
        text.push_str(&key);
        text.push('\n');
    }
    seal(text)
}

/// Decodes and checks the journal of a run whose newest snapshot was
/// `newest` (module doc).
fn decode_journal(bytes: &[u8], keys: &Keys, newest: u32) -> Result<Journal, String> {
    let header = journal_header(JOURNAL_MAGIC, JOURNAL_VERSION, newest);
    let mut j = Journal {
        newest,
        manifests: BTreeSet::new(),
        objects: BTreeSet::new(),
    };
    for key in unseal(bytes, &header)? {
        match check_key(key).ok().and_then(|()| keys.snapshot_of(key)) {
            Some(id) if keys.is_manifest(key) && id < newest => {
                j.manifests.insert(id);
            }
            Some(id) if !keys.is_manifest(key) && id <= newest => {
                j.objects.insert(key.to_owned());
            }
            _ => {
                return Err(format!(
                    "it names {key:?}, which is neither a manifest below snapshot {newest} \
                     nor an object at or below it of volume {}",
                    keys.name()
                ));
            }
        }
    }
    Ok(j)
}

fn bad_journal(dest: &dyn Destination, key: &str, why: String) -> PruneError {
    PruneError::BadJournal {
        dest: dest.url(),
        key: key.to_owned(),
        why,
    }
}

/// Reads the journal under `jkey`, checked: against its key, and that it
/// does not name the newest snapshot listed now.
fn read_journal(index: &LiveIndex<'_>, jkey: &str) -> Result<Journal, PruneError> {
    let (dest, keys) = (index.dest, index.keys);
    let newest = journal_id(&keys.retention(), jkey)
        .ok_or_else(|| bad_journal(dest, jkey, "not a journal key of this volume".into()))?;
    let j =
        decode_journal(&dest.get(jkey)?, keys, newest).map_err(|w| bad_journal(dest, jkey, w))?;
    if let Some(&top) = index.ids()?.last()
        && j.manifests.contains(&top)
    {
        return Err(bad_journal(
            dest,
            jkey,
            format!("it names snapshot {top}, the newest listed, which the next upload builds on"),
        ));
    }
    Ok(j)
}

/// Step 5 (module doc), for a fresh plan and an interrupted one alike:
/// deletes the journal's manifests, then each of its objects that no
/// manifest listed now references and that is not above the newest listed
/// now, then the journal. Returns the objects deleted.
fn finish(index: &mut LiveIndex<'_>, jkey: &str, j: &Journal) -> Result<u64, PruneError> {
    let (dest, keys) = (index.dest, index.keys);
    for &id in &j.manifests {
        dest.delete(&keys.manifest(id))?;
        index.forget(id);
    }
    let ids = index.ids()?;
    let top = ids.last().copied();
    let live = index.referenced(ids)?;
    let mut deleted = 0;
    for key in &j.objects {
        let settled = matches!((keys.snapshot_of(key), top), (Some(s), Some(t)) if s <= t);
        if settled && !live.contains(key) {
            dest.delete(key)?;
            deleted += 1;
        }
    }
    dest.delete(jkey)?;
    Ok(deleted)
}

/// Applies `policy` to the snapshots of `keys`' volume at `dest` and
/// deletes what it drops (module doc). With `dry_run`, reads only and
/// reports what a run would do. `progress` gets a line per step worth
/// telling.
pub fn prune(
    dest: &dyn Destination,
    keys: &Keys,
    policy: &Retention,
    dry_run: bool,
    mut progress: impl FnMut(&str),
) -> Result<PruneReport, PruneError> {
    policy.check()?;
    if let Some(key) = dest.list(&keys.tiering())?.into_iter().next() {
        return Err(PruneError::TierPending {
            dest: dest.url(),
            key,
        });
    }
    let mut index = LiveIndex::new(dest, keys);
    let mut report = PruneReport::default();
    // With `dry_run`: the snapshots that interrupted prunes drop.
    let mut gone = BTreeSet::new();
    for jkey in dest.list(&keys.retention())? {
        let j = read_journal(&index, &jkey)?;
        if dry_run {
            gone.extend(j.manifests);
        } else {
            let n = finish(&mut index, &jkey, &j)?;
            report.objects_deleted += n;
            progress(&format!(
                "finished an interrupted prune ({jkey}): {} snapshots and {n} objects deleted",
                j.manifests.len()
            ));
        }
        report.resumed.push(jkey);
    }

    let ids: Vec<u32> = index
        .ids()?
        .into_iter()
        .filter(|id| !gone.contains(id))
        .collect();
    let Some(&newest) = ids.last() else {
        return Ok(report);
    };
    let mut closes = Vec::with_capacity(ids.len());
    for id in ids {
        closes.push((id, index.get(id)?.manifest.closed_ms));
    }
    report.snapshots = choose(policy, &closes);
    let kept = report.snapshots.iter().filter(|d| d.kept());
    let live = index.referenced(kept.map(|d| d.snapshot))?;
    let mut plan = Journal {
        newest,
        manifests: report
            .snapshots
            .iter()
            .filter(|d| !d.kept())
            .map(|d| d.snapshot)
            .collect(),
        objects: BTreeSet::new(),
    };
    // Listed after the manifests: an object stored since is above `newest`.
    for key in dest.list(&keys.objects())? {
        if keys.snapshot_of(&key).is_some_and(|s| s <= newest) && !live.contains(&key) {
            plan.objects.insert(key);
        }
    }
    if dry_run {
        report.objects_deleted += plan.objects.len() as u64;
        return Ok(report);
    }
    if plan.manifests.is_empty() && plan.objects.is_empty() {
        return Ok(report);
    }
    let jkey = keys.retention_journal(newest);
    dest.put(&jkey, &encode_journal(keys, &plan))?;
    progress(&format!(
        "journal {jkey}: deleting {} snapshots and {} objects",
        plan.manifests.len(),
        plan.objects.len()
    ));
    report.objects_deleted += finish(&mut index, &jkey, &plan)?;
    Ok(report)
}

/// Applies `policy` at each of `members`, on its own, after the uploads
/// that `health` reports (`serve --keep-*`), until `stop` is set: once a
/// new snapshot is stored, if the last prune began `every` ago or more,
/// so that a burst of snapshots costs one listing. A prune that fails is
/// logged and tried again `every` later; what it deleted stays deleted
/// and every snapshot listed stays whole ([`prune`]). A member's report
/// goes to the log when it dropped or finished something.
pub fn prune_after_uploads(
    members: &[Arc<dyn Destination>],
    keys: &Keys,
    policy: &Retention,
    health: &UploadHealth,
    every: Duration,
    stop: &AtomicBool,
    standing: &PruneHealth,
) {
    const POLL: Duration = Duration::from_millis(100);
    let mut done_after: Option<u32> = None;
    let mut began: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(POLL);
        let Some((newest, _)) = health.get().last_uploaded else {
            continue;
        };
        if done_after == Some(newest) || began.is_some_and(|t| t.elapsed() < every) {
            continue;
        }
        began = Some(Instant::now());
        let mut failed = None;
        let (mut kept, mut dropped) = (0, 0);
        for m in members {
            let url = m.url();
            match prune(m.as_ref(), keys, policy, false, |line| {
                log::debug!("prune at {url}: {line}");
            }) {
                Ok(r) if r.dropped() > 0 || !r.resumed.is_empty() => {
                    (kept, dropped) = (kept + r.kept(), dropped + r.dropped());
                    log::info!(
                        "prune of volume {} at {url}: {} snapshots kept, {} dropped, {} objects \
                     deleted{}",
                        keys.name(),
                        r.kept(),
                        r.dropped(),
                        r.objects_deleted,
                        if r.resumed.is_empty() {
                            String::new()
                        } else {
                            format!(", {} interrupted prunes finished", r.resumed.len())
                        }
                    );
                }
                Ok(r) => kept += r.kept(),
                Err(e) => {
                    failed = Some(format!("{url}: {e}"));
                    log::warn!(
                        "prune of volume {} at {url} failed: {e}; trying again in {:.0} s",
                        keys.name(),
                        every.as_secs_f64()
                    );
                }
            }
        }
        let now = crate::engine::wall_ms();
        let mut st = standing.state.lock().unwrap_or_else(|p| p.into_inner());
        st.last_run_ms = Some(now);
        if let Some(e) = failed {
            st.failing_since_ms.get_or_insert(now);
            st.last_error = Some(e);
        } else {
            done_after = Some(newest);
            *st = PruneState {
                last_run_ms: Some(now),
                after_snapshot: Some(newest),
                kept,
                dropped_total: st.dropped_total + dropped,
                ..PruneState::default()
            };
        }
    }
}

/// How the pruner of `serve --keep-*` stands, for `status`.
#[derive(Debug, Default)]
pub struct PruneHealth {
    state: std::sync::Mutex<PruneState>,
}

/// A copy of [`PruneHealth`]'s state (times in ms since the Unix epoch).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PruneState {
    /// When the last prune ran (all members), successful or not.
    pub last_run_ms: Option<u64>,
    /// The newest snapshot stored when the last successful prune began.
    pub after_snapshot: Option<u32>,
    /// Snapshots kept by the last successful prune, summed over members.
    pub kept: usize,
    /// Snapshots dropped since the daemon started, summed over members.
    pub dropped_total: usize,
    /// While failing: since when, and the last error.
    pub failing_since_ms: Option<u64>,
    pub last_error: Option<String>,
}

impl PruneHealth {
    pub fn get(&self) -> PruneState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;
    use crate::format::{Codec, Manifest, ObjectKind, ObjectRef, encode_delta};
    use crate::live::object_keys;
    use crate::live::testing::{Crashing, assert_restores, contents, keys, objects_at};
    use crate::restore::{SnapshotWriter, list_snapshots, read_manifest, store_part};
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;

    const MIB: usize = 1 << 20;
    const BS: usize = 4096;
    /// 2024-01-01 00:00 UTC, a Monday.
    const T0: u64 = 1_704_067_200_000;
    const H: u64 = HOUR_MS;

    /// `serve --keep-last 2`: while the uploader stores snapshot after
    /// snapshot, the pruner runs after the uploads and the destination
    /// ends with the 2 newest, each restoring to the volume at its close.
    #[test]
    fn prunes_after_the_uploads_of_a_served_volume() {
        use crate::engine::{UploadHealth, Uploader};
        let dir = tempfile::tempdir().unwrap();
        let (t, vol, _) = crate::engine::tests::tracked_volume(dir.path(), MIB as u64);
        let dest: Arc<dyn Destination> =
            Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
        let up = Uploader::new(t.clone(), dest.clone(), keys(), MIB as u32, Codec::None).unwrap();
        let health = Arc::new(UploadHealth::default());
        let stop = Arc::new(AtomicBool::new(false));
        let uploader = {
            let (h, stop) = (health.clone(), stop.clone());
            std::thread::spawn(move || up.run_reporting(&stop, &h))
        };
        let standing = Arc::new(PruneHealth::default());
        let pruner = {
            let (h, stop, d) = (health.clone(), stop.clone(), dest.clone());
            let standing = standing.clone();
            std::thread::spawn(move || {
                prune_after_uploads(
                    &[d],
                    &keys(),
                    &policy(2, 0, 0, 0),
                    &h,
                    Duration::ZERO,
                    &stop,
                    &standing,
                );
            })
        };
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !done() {
                assert!(Instant::now() < deadline, "never: {what}");
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        let mut images = BTreeMap::new();
        for id in 1..=6u32 {
            let off = u64::from(id) * 3 * BS as u64;
            t.write_volume(&vol, off, &[id as u8; 2 * BS]).unwrap();
            t.close().unwrap();
            images.insert(id, std::fs::read(dir.path().join("vol")).unwrap());
            wait(&format!("snapshot {id} uploaded"), &|| {
                health.get().last_uploaded.is_some_and(|(n, _)| n == id)
            });
        }
        wait("only snapshots 5 and 6 left", &|| {
            list_snapshots(dest.as_ref(), &keys()).unwrap() == [5, 6]
        });
        // (That listing may come from a prune that began before the
        // uploader reported 6: the next one follows.)
        wait("a prune after snapshot 6", &|| {
            standing.get().after_snapshot == Some(6)
        });
        stop.store(true, Ordering::Relaxed);
        uploader.join().unwrap();
        pruner.join().unwrap();
        let st = standing.get();
        assert_eq!((st.after_snapshot, st.kept), (Some(6), 2), "{st:?}");
        assert_eq!(st.dropped_total, 4, "{st:?}");
        assert_eq!(st.failing_since_ms, None, "{st:?}");
        for id in [5, 6] {
            assert_restores(dest.as_ref(), id, &images[&id], dir.path());
        }
    }

    fn policy(last: u32, hourly: u32, daily: u32, weekly: u32) -> Retention {
        Retention {
            keep_last: last,
            keep_hourly: hourly,
            keep_daily: daily,
            keep_weekly: weekly,
        }
    }

    fn kept(ds: &[Decision]) -> Vec<u32> {
        ds.iter().filter(|d| d.kept()).map(|d| d.snapshot).collect()
    }

    #[test]
    fn rules_keep_the_newest_of_each_recent_period_with_snapshots() {
        let at = |hours: &[(u32, u64)]| -> Vec<(u32, u64)> {
            hours.iter().map(|&(id, h)| (id, T0 + h * H)).collect()
        };
        // Hours 10, 10, 11 on day 0; 9, 9 on day 1; 8, 9 on day 2.
        let s = at(&[
            (1, 10),
            (2, 10),
            (3, 11),
            (4, 33),
            (5, 33),
            (6, 56),
            (7, 57),
        ]);
        assert_eq!(kept(&choose(&policy(1, 0, 0, 0), &s)), vec![7]);
        assert_eq!(kept(&choose(&policy(3, 0, 0, 0), &s)), vec![5, 6, 7]);
        assert_eq!(kept(&choose(&policy(0, 3, 0, 0), &s)), vec![5, 6, 7]);
        assert_eq!(kept(&choose(&policy(0, 5, 0, 0), &s)), vec![2, 3, 5, 6, 7]);
        assert_eq!(kept(&choose(&policy(0, 0, 2, 0), &s)), vec![5, 7]);
        // Periods without a snapshot do not count: 3 days reach day 0.
        assert_eq!(kept(&choose(&policy(0, 0, 9, 0), &s)), vec![3, 5, 7]);
        let d = choose(&policy(2, 2, 1, 0), &s);
        assert_eq!(
            d[6].kept_by,
            vec![Rule::Newest, Rule::Last, Rule::Hourly, Rule::Daily]
        );
        assert_eq!(d[5].kept_by, vec![Rule::Last, Rule::Hourly]);
        assert!(!d[4].kept());
        // Weeks start on Monday: Sunday 2024-01-07 23:00 is in the first
        // week, Monday 01:00 in the second, as is Wednesday.
        let w = at(&[(1, 2), (2, 6 * 24 + 23), (3, 7 * 24 + 1), (4, 9 * 24)]);
        assert_eq!(kept(&choose(&policy(0, 0, 0, 2), &w)), vec![2, 4]);
        assert_eq!(kept(&choose(&policy(0, 0, 0, 1), &w)), vec![4]);
        // The newest by id, even if a clock stepped back.
        let back = [(1, T0 + 5 * H), (2, T0)];
        assert_eq!(
            choose(&policy(1, 0, 0, 0), &back)[1].kept_by,
            vec![Rule::Newest, Rule::Last]
        );
        assert!(choose(&policy(1, 0, 0, 0), &[]).is_empty());
        assert!(matches!(
            Retention::default().check(),
            Err(PruneError::NoRule)
        ));
        assert_eq!(
            utc(T0 + 13 * H + 45 * 60_000 + 7_000),
            "2024-01-01 13:45:07 UTC"
        );
    }

    proptest::proptest! {
        /// The newest and the keep_last newest are kept; each period rule
        /// keeps exactly the newest snapshot of each of its N most recent
        /// periods (a reference model); a policy applied to what it kept
        /// keeps all of it.
        #[test]
        fn choice_matches_the_model_and_is_idempotent(
            steps in proptest::collection::vec((1u32..4, 0u64..40 * H), 1..40),
            counts in proptest::array::uniform4(0u32..6),
        ) {
            let (mut id, mut ms) = (0, T0);
            let snaps: Vec<(u32, u64)> = steps.iter().map(|&(di, dt)| {
                id += di;
                ms += dt;
                (id, ms)
            }).collect();
            let p = policy(counts[0], counts[1], counts[2], counts[3]);
            let ds = choose(&p, &snaps);
            let n = ds.len();
            proptest::prop_assert_eq!(n, snaps.len());
            proptest::prop_assert!(ds[n - 1].kept_by.contains(&Rule::Newest));
            for (i, d) in ds.iter().enumerate() {
                proptest::prop_assert_eq!(d.kept_by.contains(&Rule::Last), n - i <= counts[0] as usize);
            }
            let model: [(Rule, u32, u64); 3] = [
                (Rule::Hourly, counts[1], H),
                (Rule::Daily, counts[2], DAY_MS),
                (Rule::Weekly, counts[3], 7 * DAY_MS),
            ];
            for (rule, count, len) in model {
                // Weeks from Monday 1970-01-05 (closes are long after it).
                let period = |ms: u64| if rule == Rule::Weekly { (ms - 4 * DAY_MS) / len } else { ms / len };
                let mut newest: BTreeMap<u64, u32> = BTreeMap::new();
                for &(id, ms) in &snaps {
                    newest.insert(period(ms), id);
                }
                let want: BTreeSet<u32> = newest.values().rev().take(count as usize).copied().collect();
                let got: BTreeSet<u32> = ds.iter().filter(|d| d.kept_by.contains(&rule)).map(|d| d.snapshot).collect();
                proptest::prop_assert_eq!(got, want, "{}", rule);
            }
            let again: Vec<(u32, u64)> = ds.iter().filter(|d| d.kept()).map(|d| (d.snapshot, d.closed_ms)).collect();
            proptest::prop_assert!(choose(&p, &again).iter().all(Decision::kept));
        }
    }

    /// The scenario: snapshots 1, 2, 4, 5, 6, 7, 8 of a 3-chunk volume
    /// (`CLOSES`), each after the first storing one chunk whole and a
    /// delta of the next, so that some objects are shared and some are one
    /// snapshot's own (1's chunk 1, 4's delta of chunk 0, 6's of chunk 2);
    /// epoch 3's upload was voided (a part stored, no manifest) and epoch
    /// 9's is in progress (a part and a delta stored, no manifest yet).
    const CLOSES: [(u32, u64); 7] = [
        (1, T0 + 10 * H),
        (2, T0 + 11 * H),
        (4, T0 + 33 * H),
        (5, T0 + 33 * H + H / 2),
        (6, T0 + 56 * H),
        (7, T0 + 56 * H + H / 6),
        (8, T0 + 57 * H + H / 12),
    ];
    /// keep_last 1, keep_hourly 2, keep_daily 3 over `CLOSES`: 8 (newest,
    /// last, hourly, daily), 7 (hourly), 5 and 2 (daily).
    const POLICY: Retention = Retention {
        keep_last: 1,
        keep_hourly: 2,
        keep_daily: 3,
        keep_weekly: 0,
    };
    const KEPT: [u32; 4] = [2, 5, 7, 8];

    struct Scenario {
        images: BTreeMap<u32, Vec<u8>>,
        manifests: BTreeMap<u32, Manifest>,
        /// The objects of the upload in progress.
        in_progress: BTreeSet<String>,
        voided: String,
    }

    fn scenario(dest: &dyn Destination) -> Scenario {
        let b = Manifest {
            volume_id: [7; 16],
            snapshot: 0,
            parent: 0,
            closed_ms: 0,
            volume_bytes: 3 * MIB as u64,
            block_bytes: BS as u32,
            chunk_bytes: MIB as u32,
            chunks: Vec::new(),
            stripe: None,
        };
        let mut image: Vec<u8> = (0..3 * MIB)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let (mut images, mut manifests) = (BTreeMap::new(), BTreeMap::new());
        let mut parent: Option<Manifest> = None;
        for (n, &(id, closed)) in CLOSES.iter().enumerate() {
            let w =
                SnapshotWriter::new(dest, &keys(), &b, parent.as_ref(), id, closed, Codec::None);
            if n == 0 {
                for c in 0..3 {
                    w.put_chunk(c as u64, &image[c * MIB..(c + 1) * MIB])
                        .unwrap();
                }
            } else {
                let (c, d) = (n % 3, (n + 1) % 3);
                let chunk = &mut image[c * MIB..(c + 1) * MIB];
                chunk.iter_mut().for_each(|x| *x = x.wrapping_add(n as u8));
                w.put_chunk(c as u64, chunk).unwrap();
                let blk = (n * 37) % 256;
                let at = d * MIB + blk * BS;
                image[at..at + BS].fill(n as u8);
                w.put_delta(d as u64, &[(blk as u32, &image[at..at + BS])])
                    .unwrap();
            }
            let m = w.commit().unwrap();
            images.insert(id, image.clone());
            manifests.insert(id, m.clone());
            parent = Some(m);
        }
        let block = [0x3cu8; BS];
        let part = |id, chunk| {
            let r = ObjectRef::part(id, 1);
            store_part(
                dest,
                &keys(),
                chunk,
                r,
                BS as u32,
                256,
                &[(0, &block)],
                Codec::None,
            )
            .unwrap();
            keys().object(chunk, r)
        };
        let voided = part(3, 1);
        let own = keys().object(2, ObjectRef::own(9, ObjectKind::Delta));
        dest.put(
            &own,
            &encode_delta(2, BS as u32, 256, &[(1, &block)], Codec::None),
        )
        .unwrap();
        let in_progress = BTreeSet::from([part(9, 0), own]);
        Scenario {
            images,
            manifests,
            in_progress,
            voided,
        }
    }

    impl Scenario {
        /// What the destination holds once `KEPT` alone is kept.
        fn objects_after(&self) -> BTreeSet<String> {
            let mut want = self.in_progress.clone();
            for id in KEPT {
                want.extend(object_keys(&keys(), &self.manifests[&id]));
            }
            want
        }

        /// Every snapshot the policy keeps is listed, and every listed
        /// snapshot restores bit-exact from `d`; the upload in progress
        /// keeps its objects.
        fn assert_kept_whole(&self, d: &dyn Destination, scratch: &std::path::Path) {
            let listed = list_snapshots(d, &keys()).unwrap();
            assert!(
                KEPT.iter().all(|id| listed.contains(id)),
                "a snapshot kept is not listed: {listed:?}"
            );
            for id in listed {
                assert_restores(d, id, &self.images[&id], scratch);
            }
            let at = objects_at(d);
            assert!(
                self.in_progress.is_subset(&at),
                "an upload in progress lost objects"
            );
        }
    }

    /// A dry run changes nothing and tells what the run does; the run
    /// drops 1, 4, 6 and deletes exactly the objects no kept snapshot
    /// needs (their own, and the voided upload's part), never those of
    /// the upload in progress; the kept ones restore bit-exact; a second
    /// run deletes nothing.
    #[test]
    fn prune_drops_what_no_rule_keeps_and_only_unreferenced_objects() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("d")).unwrap();
        let s = scenario(&dest);
        let before = contents(&dest);
        let doomed: BTreeSet<String> = objects_at(&dest)
            .difference(&s.objects_after())
            .cloned()
            .collect();
        // 1's chunk 1, 4's delta of chunk 0, 6's of chunk 2, the voided part.
        assert!(
            doomed.contains(&s.voided) && doomed.len() == 4,
            "{doomed:?}"
        );

        let dry = prune(&dest, &keys(), &POLICY, true, |_| {}).unwrap();
        assert_eq!(contents(&dest), before, "a dry run changed something");
        assert_eq!(kept(&dry.snapshots), KEPT);
        assert_eq!(
            (dry.dropped(), dry.objects_deleted),
            (3, doomed.len() as u64)
        );

        let mut said = Vec::new();
        let r = prune(&dest, &keys(), &POLICY, false, |l| said.push(l.to_owned())).unwrap();
        assert_eq!(r, dry);
        assert!(
            said.iter().any(|l| l.contains("deleting 3 snapshots")),
            "{said:?}"
        );
        assert_eq!(list_snapshots(&dest, &keys()).unwrap(), KEPT);
        assert_eq!(objects_at(&dest), s.objects_after());
        assert!(dest.list(&keys().retention()).unwrap().is_empty());
        s.assert_kept_whole(&dest, dir.path());

        let after = contents(&dest);
        let again = prune(&dest, &keys(), &POLICY, false, |_| {}).unwrap();
        assert_eq!(
            (again.kept(), again.dropped(), again.objects_deleted),
            (4, 0, 0)
        );
        assert_eq!(contents(&dest), after);
    }

    /// Upload 9, in progress while the prune plans (newest 8), completes
    /// after the journal is stored and before anything is deleted: it
    /// builds on 8, which stays, and its part and delta are above the
    /// plan's newest, so it restores bit-exact after the prune.
    #[test]
    fn an_upload_completing_during_a_prune_keeps_everything_it_needs() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("d")).unwrap();
        let s = scenario(&dest);
        let mut image = s.images[&8].clone();
        image[..BS].fill(0x3c);
        image[2 * MIB + BS..2 * MIB + 2 * BS].fill(0x3c);
        let mut uploaded = false;
        let r = prune(&dest, &keys(), &POLICY, false, |_| {
            let m8 = &s.manifests[&8];
            let w = SnapshotWriter::new(&dest, &keys(), m8, Some(m8), 9, T0 + 60 * H, Codec::None);
            w.adopt_parts(0, &[ObjectRef::part(9, 1)], false).unwrap();
            w.put_delta(2, &[(1, &image[2 * MIB + BS..2 * MIB + 2 * BS])])
                .unwrap();
            assert_eq!(w.counts().reused, 1, "the delta stored before");
            w.commit().unwrap();
            uploaded = true;
        })
        .unwrap();
        assert!(uploaded);
        assert_eq!(kept(&r.snapshots), KEPT, "decided before 9 existed");
        assert_eq!(list_snapshots(&dest, &keys()).unwrap(), [2, 5, 7, 8, 9]);
        let mut s = s;
        s.images.insert(9, image);
        s.assert_kept_whole(&dest, dir.path());
    }

    /// A prune that crashes after each of its puts and deletes in turn:
    /// at the crash every snapshot the policy keeps is listed and whole and
    /// the upload in progress has all its objects; the next run finishes,
    /// and ends where an uninterrupted run ends.
    #[test]
    fn a_crash_at_any_step_loses_nothing_the_policy_keeps() {
        let mut crashes = 0;
        let mut steps = None;
        for budget in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("d");
            let dest = DirDestination::open(&path).unwrap();
            let s = scenario(&dest);
            let crashing = Crashing {
                inner: DirDestination::open(&path).unwrap(),
                budget: Arc::new(AtomicI64::new(budget)),
            };
            match prune(&crashing, &keys(), &POLICY, false, |_| {}) {
                Ok(r) => {
                    // The journal, 3 manifests, the objects, the journal.
                    steps = Some(1 + 3 + r.objects_deleted + 1);
                    break;
                }
                Err(e) => assert!(e.to_string().contains("crashed"), "{e}"),
            }
            crashes += 1;
            s.assert_kept_whole(&dest, dir.path());
            let journaled = !dest.list(&keys().retention()).unwrap().is_empty();

            let r = prune(&dest, &keys(), &POLICY, false, |_| {}).unwrap();
            assert_eq!(r.resumed.len(), usize::from(journaled), "crash {budget}");
            assert_eq!(kept(&r.snapshots), KEPT, "crash {budget}");
            assert_eq!(list_snapshots(&dest, &keys()).unwrap(), KEPT);
            assert_eq!(objects_at(&dest), s.objects_after(), "crash {budget}");
            assert!(dest.list(&keys().retention()).unwrap().is_empty());
            s.assert_kept_whole(&dest, dir.path());
        }
        assert_eq!(Some(crashes), steps, "a crash at each step");
    }

    /// A journal is checked against the destination as it is when it is
    /// carried out: one written by some earlier run that names objects a
    /// listed snapshot references deletes only what nobody needs; one that
    /// names the newest snapshot, a damaged one, a pending tiering move
    /// and no rule at all are refused with nothing deleted.
    #[test]
    fn journals_never_take_what_a_listed_snapshot_needs() {
        let dir = tempfile::tempdir().unwrap();
        let dest = DirDestination::open(&dir.path().join("d")).unwrap();
        let s = scenario(&dest);
        let refused = |why: &str, policy: &Retention| {
            let before = contents(&dest);
            let e = prune(&dest, &keys(), policy, false, |_| {}).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
            assert_eq!(contents(&dest), before, "{e}: something changed");
        };
        let refs = |id: u32| object_keys(&keys(), &s.manifests[&id]);
        let only_1: BTreeSet<String> = refs(1).difference(&refs(2)).cloned().collect();
        let shared: BTreeSet<String> = refs(1).intersection(&refs(2)).cloned().collect();
        assert!(!only_1.is_empty() && !shared.is_empty());
        let mut objects: BTreeSet<String> = only_1.union(&shared).cloned().collect();
        objects.insert(s.voided.clone());
        let stale = Journal {
            newest: 8,
            manifests: BTreeSet::from([1]),
            objects,
        };
        let jkey = keys().retention_journal(8);

        // The newest snapshot named, or the journal damaged: refused.
        let newest = Journal {
            newest: 9,
            manifests: BTreeSet::from([1, 8]),
            ..stale.clone()
        };
        let j9 = keys().retention_journal(9);
        dest.put(&j9, &encode_journal(&keys(), &newest)).unwrap();
        refused("the newest listed", &POLICY);
        dest.delete(&j9).unwrap();
        let mut bad = encode_journal(&keys(), &stale);
        bad[20] ^= 1;
        dest.put(&jkey, &bad).unwrap();
        refused("checksum", &POLICY);
        dest.delete(&jkey).unwrap();
        dest.put(
            &keys().retention_journal(7),
            &encode_journal(&keys(), &stale),
        )
        .unwrap();
        refused("another key's journal", &POLICY);
        dest.delete(&keys().retention_journal(7)).unwrap();

        // A move to another destination unfinished; no rule.
        dest.put(&keys().tiering_journal(1), b"x").unwrap();
        refused("foresnap tier", &POLICY);
        dest.delete(&keys().tiering_journal(1)).unwrap();
        refused("no retention rule", &Retention::default());

        // The stale journal, then a policy keeping everything: snapshot 1
        // goes with its own objects and the voided part; what 2 shares
        // with it stays.
        dest.put(&jkey, &encode_journal(&keys(), &stale)).unwrap();
        let r = prune(&dest, &keys(), &policy(100, 0, 0, 0), false, |_| {}).unwrap();
        assert_eq!(r.resumed, vec![jkey]);
        assert_eq!(r.objects_deleted, only_1.len() as u64 + 1);
        assert_eq!(r.dropped(), 0);
        assert_eq!(
            list_snapshots(&dest, &keys()).unwrap(),
            vec![2, 4, 5, 6, 7, 8]
        );
        let at = objects_at(&dest);
        assert!(shared.is_subset(&at) && only_1.is_disjoint(&at) && !at.contains(&s.voided));
        for id in [2, 4, 5, 6, 7, 8] {
            assert_restores(&dest, id, &s.images[&id], dir.path());
        }
        assert!(read_manifest(&dest, &keys(), 1).is_err());
    }

    /// Journals round-trip; keys outside their bounds are refused.
    #[test]
    fn journals_round_trip_and_refuse_foreign_keys() {
        let j = Journal {
            newest: 8,
            manifests: BTreeSet::from([1, 6]),
            objects: BTreeSet::from([
                keys().object(0, ObjectRef::own(8, ObjectKind::Chunk)),
                keys().object(3, ObjectRef::part(2, 4)),
            ]),
        };
        let bytes = encode_journal(&keys(), &j);
        assert!(bytes.starts_with(b"FSNPPRUNE 1 0000000008\nvol/manifests/0000000001\n"));
        assert_eq!(decode_journal(&bytes, &keys(), 8).unwrap(), j);
        assert!(decode_journal(&bytes, &keys(), 9).is_err(), "another run's");
        assert!(decode_journal(&bytes, &Keys::new("other").unwrap(), 8).is_err());
        for (manifests, object) in [
            (vec![8], None),
            (
                vec![],
                Some(keys().object(0, ObjectRef::own(9, ObjectKind::Delta))),
            ),
            (vec![], Some(keys().tiering_journal(1))),
        ] {
            let bad = Journal {
                manifests: manifests.into_iter().collect(),
                objects: object.into_iter().collect(),
                ..j.clone()
            };
            let e = decode_journal(&encode_journal(&keys(), &bad), &keys(), 8).unwrap_err();
            assert!(e.contains("neither a manifest"), "{e}");
        }
    }
}
