//! The `tier` policy: snapshots land at a fast destination and, once old
//! enough, move to a slow one and leave the fast one, with a complete copy
//! of each snapshot somewhere at every moment.
//!
//! # A move, step by step
//!
//! [`tier_once`] moves, oldest first, every snapshot at the fast
//! destination that closed at least the given age ago, except the newest
//! one there: the next upload is a delta over it (its objects are
//! referenced by the snapshot being uploaded), so it stays until a newer
//! one arrives. For each snapshot:
//!
//! 1. *Copy.* Every object its manifest references that the slow
//!    destination does not list is read at the fast one, verified
//!    (checksums, and that it is the chunk, kind and block size the
//!    manifest names: a damaged object is never copied, the run stops
//!    naming it) and stored at the slow one; then the manifest, last, as
//!    an upload writes it: the snapshot exists at the slow destination only
//!    once it is whole there. A key the slow destination has already
//!    counts only with the same bytes.
//! 2. *Journal.* The objects to delete at the fast destination are those
//!    the snapshot references and no other manifest there does (newer
//!    snapshots share its unchanged chunks), from a fresh listing of the
//!    manifests. Their keys go to a journal at the fast destination,
//!    [`Keys::tiering_journal`].
//! 3. *Delete.* The manifest at the fast destination first (the snapshot
//!    leaves its listing while its objects are all still there), then the
//!    journaled objects, then the journal.
//!
//! Nothing at the slow destination is ever deleted, nor any object that a
//! manifest remaining at the fast destination references.
//!
//! # Crashes
//!
//! Until step 1 writes the manifest at the slow destination, the snapshot
//! is whole at the fast one (nothing was deleted there); from then on it is
//! whole at the slow one. A run that stops anywhere leaves:
//!
//! - before the journal: the snapshot at both destinations. The next run
//!   finds it old at the fast one again, copies nothing (the slow one has
//!   every key, with the same bytes) and goes on from step 2.
//! - after the journal: a journal that the next run finishes first, before
//!   anything else, and only once it has checked that the slow destination
//!   holds the snapshot whole: its manifest there, the same bytes as the
//!   fast destination's if that is still there, every object it references
//!   listed there, and every journaled key among those objects. A journal
//!   that fails a check stops the run with an error, and nothing is
//!   deleted (its snapshot missing at the slow destination given usually
//!   means another one was given before: the journal names it). A
//!   journaled object that a manifest at the fast destination references
//!   by then is kept.
//!
//! `tier_once` may run while an uploader adds snapshots to the fast
//! destination: those build on the newest snapshot, which stays, and the
//! objects to delete are computed from a listing taken after the copy.
//! Two `tier_once` of one volume at once are not supported.
//!
//! # Journal format (version 1)
//!
//! Text, each line ending in `\n`:
//!
//! | line | content |
//! |---|---|
//! | 1 | `FSNPTIER 1 SNAPSHOT`: magic, format version, the snapshot id in 10 digits |
//! | 2 | `to URL`: the slow destination (for messages only) |
//! | 3 .. n-1 | one object key per line, ascending (none: every object is shared) |
//! | n | `crc32c XXXXXXXX`: crc32c of every byte before this line, 8 lowercase hex digits |

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::dest::{DestError, Destination, check_key};
use crate::format::{Keys, Manifest, ObjectRef};
use crate::live::{
    LiveError, LiveIndex, Stored, decode_manifest, journal_header, journal_id, object_keys, seal,
    unseal,
};
use crate::restore::decode_named;

/// First word of a journal.
const JOURNAL_MAGIC: &str = "FSNPTIER";
/// Format version of journals.
const JOURNAL_VERSION: u32 = 1;

/// What one [`tier_once`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierReport {
    /// Snapshots moved from the fast destination to the slow one, in order.
    pub moved: Vec<u32>,
    /// Snapshots whose move an earlier run left unfinished (a journal),
    /// finished by this one.
    pub resumed: Vec<u32>,
    /// Objects stored at the slow destination (not found there already).
    pub objects_copied: u64,
    /// Bytes of those objects.
    pub bytes_copied: u64,
    /// Objects deleted at the fast destination.
    pub objects_deleted: u64,
    /// The newest snapshot at the fast destination, when it is old enough
    /// to move but stays because it is the newest.
    pub kept_newest: Option<u32>,
}

/// Why [`tier_once`] stopped. Snapshots moved before the error stay moved;
/// the one in hand is whole at one destination at least.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    /// A destination could not be read or written (it names itself and
    /// the key).
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error(
        "{url} is given as both the fast and the slow destination: a snapshot moved there would be deleted"
    )]
    SameDestination { url: String },
    #[error(
        "{dest}: snapshot {snapshot} is one piece of a stripe over {members} destinations: \
         tiering moves whole snapshots from one destination, so it stays where it is"
    )]
    Striped {
        dest: String,
        snapshot: u32,
        members: u8,
    },
    #[error(
        "{dest}: {key} is damaged ({why}): it is not copied, and its snapshot stays where it is"
    )]
    Damaged {
        dest: String,
        key: String,
        why: String,
    },
    #[error(
        "{dest}: {key} exists with other bytes than at {from}: nothing is overwritten, and the snapshot stays at {from}"
    )]
    Conflict {
        dest: String,
        key: String,
        from: String,
    },
    #[error(
        "{dest} holds snapshots of another volume named {name} (volume {there}, this one is {here}): \
         refusing to mix them; give another slow destination"
    )]
    OtherVolume {
        dest: String,
        name: String,
        there: String,
        here: String,
    },
    #[error(
        "{dest}: journal {key}: the interrupted move it records cannot be finished: {why}; nothing was deleted"
    )]
    Unfinishable {
        dest: String,
        key: String,
        why: String,
    },
}

impl TierError {
    /// Whether a person must look (damage, a conflict, a journal that
    /// cannot be finished, a misconfiguration) rather than the run be
    /// tried again later (a destination that failed to answer).
    pub fn needs_attention(&self) -> bool {
        !matches!(
            self,
            TierError::Dest(DestError::Remote { .. } | DestError::Io { .. })
        )
    }
}

impl From<LiveError> for TierError {
    fn from(e: LiveError) -> Self {
        match e {
            LiveError::Dest(e) => TierError::Dest(e),
            LiveError::Damaged { dest, key, why } => TierError::Damaged { dest, key, why },
        }
    }
}

/// The objects the manifests at the fast destination listed now
/// reference, but `except`'s.
fn referenced_except(
    index: &mut LiveIndex<'_>,
    except: u32,
) -> Result<BTreeSet<String>, TierError> {
    let ids = index.ids()?;
    Ok(index.referenced(ids.into_iter().filter(|&id| id != except))?)
}

/// Stores `bytes` under `key` at `dest`; the same bytes there already count
/// as stored. Returns whether this put stored them.
fn put_same(
    dest: &dyn Destination,
    key: &str,
    bytes: &[u8],
    from: &dyn Destination,
) -> Result<bool, TierError> {
    match dest.put(key, bytes) {
        Ok(()) => Ok(true),
        Err(DestError::AlreadyExists { .. }) => {
            if dest.get(key)? == bytes {
                Ok(false)
            } else {
                Err(TierError::Conflict {
                    dest: dest.url(),
                    key: key.to_owned(),
                    from: from.url(),
                })
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The journal of snapshot `snapshot`'s move to `to`: the objects to
/// delete at the fast destination (module doc).
fn encode_journal(snapshot: u32, to: &str, doomed: &BTreeSet<String>) -> Vec<u8> {
    let mut text = journal_header(JOURNAL_MAGIC, JOURNAL_VERSION, snapshot);
    text.push_str(&format!("to {}\n", to.replace(['\n', '\r'], " ")));
    for key in doomed {
        text.push_str(key);
        text.push('\n');
    }
    seal(text)
}

/// A decoded journal.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Journal {
    /// The slow destination the move went to.
    to: String,
    /// The objects to delete at the fast destination.
    doomed: BTreeSet<String>,
}

/// Decodes and checks the journal of snapshot `snapshot`: every key it
/// names must be an object key of the volume.
fn decode_journal(bytes: &[u8], keys: &Keys, snapshot: u32) -> Result<Journal, String> {
    let header = journal_header(JOURNAL_MAGIC, JOURNAL_VERSION, snapshot);
    let mut lines = unseal(bytes, &header)?.into_iter();
    let to = lines
        .next()
        .and_then(|l| l.strip_prefix("to "))
        .ok_or_else(|| "no destination line".to_owned())?
        .to_owned();
    let objects = keys.objects();
    let mut doomed = BTreeSet::new();
    for key in lines {
        if check_key(key).is_err() || !key.starts_with(&objects) {
            return Err(format!(
                "it names {key:?}, which is not an object of volume {}",
                keys.name()
            ));
        }
        doomed.insert(key.to_owned());
    }
    Ok(Journal { to, doomed })
}

/// One run of the `tier` policy (module doc): finishes the moves an
/// earlier run left journaled at `fast`, then moves to `slow` every
/// snapshot of `keys`' volume at `fast` closed at least `min_age` before
/// `now_ms` (milliseconds since the Unix epoch), oldest first, except the
/// newest at `fast`. `progress` gets a line per step worth telling.
pub fn tier_once(
    fast: &dyn Destination,
    slow: &dyn Destination,
    keys: &Keys,
    min_age: Duration,
    now_ms: u64,
    mut progress: impl FnMut(&str),
) -> Result<TierReport, TierError> {
    if fast.url() == slow.url() {
        return Err(TierError::SameDestination { url: fast.url() });
    }
    let mut report = TierReport::default();
    let mut index = LiveIndex::new(fast, keys);
    // What the slow destination holds: listed once, when first needed, and
    // kept up to date with what this run stores there.
    let mut at_slow: Option<BTreeSet<String>> = None;
    finish_journals(&mut index, slow, &mut at_slow, &mut report, &mut progress)?;

    let ids = index.ids()?;
    let Some(&newest) = ids.last() else {
        return Ok(report);
    };
    let min_age_ms = u64::try_from(min_age.as_millis()).unwrap_or(u64::MAX);
    let mut old = Vec::new();
    for &id in &ids {
        let closed = index.get(id)?.manifest.closed_ms;
        if now_ms
            .checked_sub(closed)
            .is_some_and(|age| age >= min_age_ms)
        {
            if id == newest {
                report.kept_newest = Some(id);
            } else {
                old.push(id);
            }
        }
    }
    if old.is_empty() {
        return Ok(report);
    }
    let mut slow_volume = slow_volume_id(slow, keys)?;
    let mut at_slow = match at_slow {
        Some(s) => s,
        None => slow.list(&keys.objects())?.into_iter().collect(),
    };
    for id in old {
        let stored = index.get(id)?.clone();
        let here = stored.manifest.volume_id;
        match slow_volume {
            Some(there) if there != here => {
                return Err(TierError::OtherVolume {
                    dest: slow.url(),
                    name: keys.name().to_owned(),
                    there: crate::format::volume_hex(&there),
                    here: crate::format::volume_hex(&here),
                });
            }
            _ => slow_volume = Some(here),
        }
        move_one(
            &mut index,
            slow,
            &stored,
            &mut at_slow,
            &mut report,
            &mut progress,
        )?;
    }
    Ok(report)
}

/// The volume id of the newest snapshot at `slow`, if it has any.
fn slow_volume_id(slow: &dyn Destination, keys: &Keys) -> Result<Option<[u8; 16]>, TierError> {
    let Some(&id) = keys.snapshot_ids(&slow.list(&keys.manifests())?).last() else {
        return Ok(None);
    };
    let key = keys.manifest(id);
    let m = decode_manifest(&slow.get(&key)?, id).map_err(|why| TierError::Damaged {
        dest: slow.url(),
        key,
        why,
    })?;
    Ok(Some(m.volume_id))
}

/// Moves snapshot `stored` from the fast destination to `slow`: copy,
/// journal, delete (module doc).
fn move_one(
    index: &mut LiveIndex<'_>,
    slow: &dyn Destination,
    stored: &Stored,
    at_slow: &mut BTreeSet<String>,
    report: &mut TierReport,
    progress: &mut impl FnMut(&str),
) -> Result<(), TierError> {
    let (fast, keys) = (index.dest, index.keys);
    let m = &stored.manifest;
    let id = m.snapshot;
    if let Some(s) = m.stripe {
        return Err(TierError::Striped {
            dest: fast.url(),
            snapshot: id,
            members: s.members,
        });
    }

    // 1. Copy: the objects, verified, then the manifest.
    let mut todo: BTreeMap<String, (u64, ObjectRef)> = BTreeMap::new();
    for (c, refs) in m.chunks.iter().enumerate() {
        for &r in refs {
            let key = keys.object(c as u64, r);
            if !at_slow.contains(&key) {
                todo.insert(key, (c as u64, r));
            }
        }
    }
    let (mut objects, mut bytes) = (0u64, 0u64);
    for (key, (chunk, r)) in todo {
        let check = |b: &[u8]| decode_named(b, m, chunk, r).map(drop);
        let data = fast.get_valid(&key, &|b| check(b).is_ok())?;
        check(&data).map_err(|why| TierError::Damaged {
            dest: fast.url(),
            key: key.clone(),
            why,
        })?;
        if put_same(slow, &key, &data, fast)? {
            objects += 1;
            bytes += data.len() as u64;
        }
        at_slow.insert(key);
    }
    put_same(slow, &keys.manifest(id), &stored.bytes, fast)?;
    report.objects_copied += objects;
    report.bytes_copied += bytes;
    progress(&format!(
        "snapshot {id}: complete at {} ({objects} objects, {bytes} bytes copied)",
        slow.url()
    ));

    // 2. Journal: what no other manifest at the fast destination needs.
    let others = referenced_except(index, id)?;
    let doomed: BTreeSet<String> = object_keys(keys, m).difference(&others).cloned().collect();
    let jkey = keys.tiering_journal(id);
    put_same(fast, &jkey, &encode_journal(id, &slow.url(), &doomed), fast)?;

    // 3. Delete: the manifest, the objects, the journal.
    let deleted = finish_move(fast, keys, m, &jkey, &doomed, at_slow, &others, &slow.url())?;
    index.forget(id);
    report.moved.push(id);
    report.objects_deleted += deleted;
    progress(&format!(
        "snapshot {id}: moved to {} ({deleted} objects deleted at {})",
        slow.url(),
        fast.url()
    ));
    Ok(())
}

/// Step 3 of a move (module doc), for a fresh move and for an interrupted
/// one alike: checks that the slow destination holds snapshot
/// `at_slow_manifest` whole (each object it references in `at_slow`) and
/// that every journaled key is one of those objects; then deletes the
/// manifest at `fast`, the journaled objects but those in `keep`, and the
/// journal. Returns the objects deleted.
#[allow(clippy::too_many_arguments)]
fn finish_move(
    fast: &dyn Destination,
    keys: &Keys,
    at_slow_manifest: &Manifest,
    jkey: &str,
    doomed: &BTreeSet<String>,
    at_slow: &BTreeSet<String>,
    keep: &BTreeSet<String>,
    slow_url: &str,
) -> Result<u64, TierError> {
    let id = at_slow_manifest.snapshot;
    let unfinishable = |why: String| TierError::Unfinishable {
        dest: fast.url(),
        key: jkey.to_owned(),
        why,
    };
    let refs = object_keys(keys, at_slow_manifest);
    if let Some(k) = refs.iter().find(|k| !at_slow.contains(*k)) {
        return Err(unfinishable(format!(
            "{k}, which snapshot {id} references, is missing at {slow_url}"
        )));
    }
    if let Some(k) = doomed.iter().find(|k| !refs.contains(*k)) {
        return Err(unfinishable(format!(
            "it names {k}, which snapshot {id} does not reference"
        )));
    }
    fast.delete(&keys.manifest(id))?;
    let mut deleted = 0;
    for key in doomed.difference(keep) {
        fast.delete(key)?;
        deleted += 1;
    }
    fast.delete(jkey)?;
    Ok(deleted)
}

/// Finishes every move an earlier run journaled at the fast destination,
/// once the slow destination is checked to hold its snapshot whole
/// (module doc).
fn finish_journals(
    index: &mut LiveIndex<'_>,
    slow: &dyn Destination,
    at_slow: &mut Option<BTreeSet<String>>,
    report: &mut TierReport,
    progress: &mut impl FnMut(&str),
) -> Result<(), TierError> {
    let (fast, keys) = (index.dest, index.keys);
    for jkey in fast.list(&keys.tiering())? {
        let unfinishable = |why: String| TierError::Unfinishable {
            dest: fast.url(),
            key: jkey.clone(),
            why,
        };
        let id = journal_id(&keys.tiering(), &jkey)
            .ok_or_else(|| unfinishable("not a journal key of this volume".into()))?;
        let journal = decode_journal(&fast.get(&jkey)?, keys, id).map_err(unfinishable)?;
        let mkey = keys.manifest(id);
        let slow_bytes = match slow.get(&mkey) {
            Ok(b) => b,
            Err(DestError::NotFound { .. }) => {
                return Err(unfinishable(format!(
                    "snapshot {id} is not at {} (the journal says it was moved to {}: give that as the slow destination)",
                    slow.url(),
                    journal.to
                )));
            }
            Err(e) => return Err(e.into()),
        };
        let m = decode_manifest(&slow_bytes, id).map_err(|why| {
            unfinishable(format!(
                "the manifest of snapshot {id} at {} is damaged ({why})",
                slow.url()
            ))
        })?;
        match fast.get(&mkey) {
            Ok(b) if b != slow_bytes => {
                return Err(unfinishable(format!(
                    "snapshot {id}'s manifest at {} differs from the one here",
                    slow.url()
                )));
            }
            Ok(_) | Err(DestError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let listed = match at_slow {
            Some(s) => s,
            None => at_slow.insert(slow.list(&keys.objects())?.into_iter().collect()),
        };
        let keep = referenced_except(index, id)?;
        let deleted = finish_move(
            fast,
            keys,
            &m,
            &jkey,
            &journal.doomed,
            listed,
            &keep,
            &slow.url(),
        )?;
        index.forget(id);
        report.resumed.push(id);
        report.objects_deleted += deleted;
        progress(&format!(
            "snapshot {id}: finished its interrupted move to {} ({deleted} objects deleted at {})",
            slow.url(),
            fast.url()
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;
    use crate::format::{Codec, ObjectKind};
    use crate::live::testing::{Crashing, assert_restores, contents, keys, objects_at};
    use crate::restore::{SnapshotWriter, list_snapshots};
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::AtomicI64;

    const MIB: usize = 1 << 20;
    const BS: usize = 4096;
    const AGE: Duration = Duration::from_secs(1);

    fn obj(chunk: u64, snapshot: u32, kind: ObjectKind) -> String {
        keys().object(chunk, ObjectRef::own(snapshot, kind))
    }

    fn base(volume_id: [u8; 16], volume_bytes: usize) -> Manifest {
        Manifest {
            volume_id,
            snapshot: 0,
            parent: 0,
            closed_ms: 0,
            volume_bytes: volume_bytes as u64,
            block_bytes: BS as u32,
            chunk_bytes: MIB as u32,
            chunks: Vec::new(),
            stripe: None,
        }
    }

    /// Three snapshots of a 3-chunk volume at `fast`, closed at 1000, 2000
    /// and 3000 ms: 1 full; 2 a delta on chunk 0 and one on chunk 1; 3 a
    /// delta on chunk 0 and chunk 1 stored whole again. So snapshot 3
    /// references 1's chunk objects 0 and 2 and 2's delta on chunk 0, and
    /// 1's chunk object 1 and 2's delta on chunk 1 are needed by 1 and 2
    /// only. Returns the manifests and the images at the closes.
    fn three_snapshots(fast: &dyn Destination) -> (Vec<Manifest>, Vec<Vec<u8>>) {
        let b = base([5; 16], 3 * MIB);
        let mut image: Vec<u8> = (0..3 * MIB)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let w = SnapshotWriter::new(fast, &keys(), &b, None, 1, 1000, Codec::Zstd(1));
        for c in 0..3 {
            w.put_chunk(c as u64, &image[c * MIB..(c + 1) * MIB])
                .unwrap();
        }
        let m1 = w.commit().unwrap();
        let mut images = vec![image.clone()];

        image[BS..2 * BS].fill(0xA1);
        image[MIB + 2 * BS..MIB + 3 * BS].fill(0xA2);
        let w = SnapshotWriter::new(fast, &keys(), &b, Some(&m1), 2, 2000, Codec::Zstd(1));
        w.put_delta(0, &[(1, &image[BS..2 * BS])]).unwrap();
        w.put_delta(1, &[(2, &image[MIB + 2 * BS..MIB + 3 * BS])])
            .unwrap();
        let m2 = w.commit().unwrap();
        images.push(image.clone());

        image[5 * BS..6 * BS].fill(0xB5);
        for x in &mut image[MIB..2 * MIB] {
            *x = x.wrapping_add(7);
        }
        let w = SnapshotWriter::new(fast, &keys(), &b, Some(&m2), 3, 3000, Codec::Zstd(1));
        w.put_delta(0, &[(5, &image[5 * BS..6 * BS])]).unwrap();
        w.put_chunk(1, &image[MIB..2 * MIB]).unwrap();
        let m3 = w.commit().unwrap();
        images.push(image);
        (vec![m1, m2, m3], images)
    }

    /// Replaces the file of `key` under `root` with `bytes`.
    fn overwrite(root: &Path, key: &str, bytes: &[u8]) {
        let p = root.join(key);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, bytes).unwrap();
    }

    /// Snapshots 1 and 2 move once a second old, 3 stays (too young, then
    /// the newest); each restores bit-exact from where it is; the fast
    /// destination keeps exactly the objects 3 references.
    #[test]
    fn old_snapshots_move_to_slow_and_the_newest_stays() {
        let dir = tempfile::tempdir().unwrap();
        let fast = DirDestination::open(&dir.path().join("fast")).unwrap();
        let slow = DirDestination::open(&dir.path().join("slow")).unwrap();
        let (ms, images) = three_snapshots(&fast);
        let before = contents(&fast);

        // At 1999 ms nothing is a second old: nothing happens.
        let r = tier_once(&fast, &slow, &keys(), AGE, 1999, |_| {}).unwrap();
        assert_eq!(r, TierReport::default());
        assert_eq!(contents(&fast), before);
        assert!(slow.list("").unwrap().is_empty());

        // At 3000 ms snapshots 1 and 2 (exactly a second old) move.
        let mut said = Vec::new();
        let r = tier_once(&fast, &slow, &keys(), AGE, 3000, |l| {
            said.push(l.to_owned())
        })
        .unwrap();
        assert_eq!(r.moved, vec![1, 2], "{r:?}");
        assert_eq!((r.resumed.len(), r.kept_newest), (0, None), "{r:?}");
        assert_eq!(list_snapshots(&fast, &keys()).unwrap(), vec![3]);
        assert_eq!(list_snapshots(&slow, &keys()).unwrap(), vec![1, 2]);
        assert!(fast.list(&keys().tiering()).unwrap().is_empty());
        // The slow destination holds what 1 and 2 reference, all copied
        // by this run; the fast one exactly what 3 references.
        let mut for_slow = object_keys(&keys(), &ms[0]);
        for_slow.extend(object_keys(&keys(), &ms[1]));
        assert_eq!(objects_at(&slow), for_slow);
        assert_eq!(r.objects_copied, 5);
        let copied: u64 = for_slow
            .iter()
            .map(|k| slow.get(k).unwrap().len() as u64)
            .sum();
        assert_eq!(r.bytes_copied, copied);
        assert_eq!(objects_at(&fast), object_keys(&keys(), &ms[2]));
        let shared = obj(2, 1, ObjectKind::Chunk);
        assert!(objects_at(&fast).contains(&shared), "3 needs 1's chunk 2");
        for gone in [obj(1, 1, ObjectKind::Chunk), obj(1, 2, ObjectKind::Delta)] {
            assert!(!objects_at(&fast).contains(&gone), "{gone} left at fast");
        }
        assert_eq!(r.objects_deleted, 2);
        for id in [1, 2] {
            assert_restores(&slow, id, &images[id as usize - 1], dir.path());
            assert!(
                said.iter()
                    .any(|l| l.starts_with(&format!("snapshot {id}: moved to"))),
                "{said:?}"
            );
        }
        assert_restores(&fast, 3, &images[2], dir.path());

        // Much later 3 is old, but the newest: it stays.
        let before = contents(&fast);
        let r = tier_once(&fast, &slow, &keys(), AGE, 1 << 50, |_| {}).unwrap();
        assert!(r.moved.is_empty() && r.kept_newest == Some(3), "{r:?}");
        assert_eq!(contents(&fast), before);

        // A journal naming an object that 3 references (1 does too, and
        // the slow destination holds it) deletes only what no manifest at
        // the fast destination references.
        let only_1 = obj(1, 1, ObjectKind::Chunk);
        fast.put(&only_1, &slow.get(&only_1).unwrap()).unwrap();
        let doomed = BTreeSet::from([shared.clone(), only_1.clone()]);
        fast.put(
            &keys().tiering_journal(1),
            &encode_journal(1, &slow.url(), &doomed),
        )
        .unwrap();
        let r = tier_once(&fast, &slow, &keys(), AGE, 1 << 50, |_| {}).unwrap();
        assert_eq!((r.resumed, r.objects_deleted), (vec![1], 1));
        assert_eq!(objects_at(&fast), object_keys(&keys(), &ms[2]));
        assert!(fast.list(&keys().tiering()).unwrap().is_empty());
        assert_restores(&fast, 3, &images[2], dir.path());
    }

    /// A run that crashes after each of its puts and deletes in turn:
    /// at the crash every snapshot is listed somewhere and every listed
    /// snapshot restores bit-exact where it is listed; the next run
    /// finishes the move, and ends where an uninterrupted run ends.
    #[test]
    fn a_crash_at_any_step_loses_nothing_and_the_next_run_finishes() {
        let mut crashes = 0;
        for budget in 0.. {
            let dir = tempfile::tempdir().unwrap();
            let (fp, sp) = (dir.path().join("fast"), dir.path().join("slow"));
            let fast = DirDestination::open(&fp).unwrap();
            let slow = DirDestination::open(&sp).unwrap();
            let (ms, images) = three_snapshots(&fast);
            let left = Arc::new(AtomicI64::new(budget));
            let cf = Crashing {
                inner: DirDestination::open(&fp).unwrap(),
                budget: left.clone(),
            };
            let cs = Crashing {
                inner: DirDestination::open(&sp).unwrap(),
                budget: left,
            };
            match tier_once(&cf, &cs, &keys(), AGE, 3000, |_| {}) {
                Ok(r) => {
                    assert_eq!(r.moved, vec![1, 2]);
                    break;
                }
                Err(e) => assert!(e.to_string().contains("crashed"), "{e}"),
            }
            crashes += 1;
            let at_fast = list_snapshots(&fast, &keys()).unwrap();
            let at_slow = list_snapshots(&slow, &keys()).unwrap();
            for id in 1..=3u32 {
                assert!(
                    at_fast.contains(&id) || at_slow.contains(&id),
                    "crash {budget}: snapshot {id} is nowhere"
                );
            }
            for (d, ids) in [(&fast, &at_fast), (&slow, &at_slow)] {
                for &id in ids {
                    assert_restores(d, id, &images[id as usize - 1], dir.path());
                }
            }
            let journaled: Vec<u32> = fast
                .list(&keys().tiering())
                .unwrap()
                .iter()
                .filter_map(|k| journal_id(&keys().tiering(), k))
                .collect();

            let r = tier_once(&fast, &slow, &keys(), AGE, 3000, |_| {}).unwrap();
            assert_eq!(r.resumed, journaled, "crash {budget}");
            // What the crashed run left unfinished: snapshot 2, or both.
            let mut done = r.resumed.clone();
            done.extend(&r.moved);
            done.sort_unstable();
            assert!(done == [1, 2] || done == [2], "crash {budget}: {r:?}");
            assert_eq!(list_snapshots(&fast, &keys()).unwrap(), vec![3]);
            assert_eq!(list_snapshots(&slow, &keys()).unwrap(), vec![1, 2]);
            assert!(fast.list(&keys().tiering()).unwrap().is_empty());
            assert_eq!(objects_at(&fast), object_keys(&keys(), &ms[2]));
            let mut for_slow = object_keys(&keys(), &ms[0]);
            for_slow.extend(object_keys(&keys(), &ms[1]));
            assert_eq!(objects_at(&slow), for_slow);
            for id in [1, 2] {
                assert_restores(&slow, id, &images[id as usize - 1], dir.path());
            }
            assert_restores(&fast, 3, &images[2], dir.path());
        }
        // Snapshot 1: 3 objects, manifest, journal, manifest delete (no
        // object of its own to delete: 2 references them all), journal
        // delete; snapshot 2: 2 objects, manifest, journal, manifest
        // delete, 2 objects, journal delete. A crash at each.
        assert_eq!(crashes, 15);
    }

    /// A damaged object at the fast destination stops the move, named; it
    /// is not copied, no manifest reaches the slow destination, nothing is
    /// deleted; repaired, the move goes through.
    #[test]
    fn a_damaged_object_stops_the_move_and_is_never_copied() {
        let dir = tempfile::tempdir().unwrap();
        let fp = dir.path().join("fast");
        let fast = DirDestination::open(&fp).unwrap();
        let slow = DirDestination::open(&dir.path().join("slow")).unwrap();
        let (_, images) = three_snapshots(&fast);
        let key = obj(1, 1, ObjectKind::Chunk);
        let good = fast.get(&key).unwrap();
        let mut bad = good.clone();
        bad[200] ^= 0x08;
        overwrite(&fp, &key, &bad);
        let before = contents(&fast);

        let e = tier_once(&fast, &slow, &keys(), AGE, 3000, |_| {}).unwrap_err();
        assert!(matches!(e, TierError::Damaged { .. }), "{e}");
        assert!(e.to_string().contains(&key), "{e}");
        assert!(e.needs_attention());
        assert_eq!(list_snapshots(&fast, &keys()).unwrap(), vec![1, 2, 3]);
        assert!(list_snapshots(&slow, &keys()).unwrap().is_empty());
        assert!(!objects_at(&slow).contains(&key), "a damaged object copied");
        assert_eq!(contents(&fast), before, "something changed at fast");

        overwrite(&fp, &key, &good);
        let r = tier_once(&fast, &slow, &keys(), AGE, 3000, |_| {}).unwrap();
        assert_eq!(r.moved, vec![1, 2]);
        assert_restores(&slow, 1, &images[0], dir.path());
    }

    /// Journals that cannot be finished safely, and slow destinations that
    /// hold something else, stop the run and nothing is deleted; a sound
    /// journal then finishes.
    #[test]
    fn unsafe_journals_and_conflicts_are_refused_and_nothing_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let sp = dir.path().join("slow");
        let fast = DirDestination::open(&dir.path().join("fast")).unwrap();
        let slow = DirDestination::open(&sp).unwrap();
        let (ms, images) = three_snapshots(&fast);
        let jkey = keys().tiering_journal(1);
        let only_1 = obj(1, 1, ObjectKind::Chunk);
        let journal = encode_journal(1, "file:///elsewhere", &BTreeSet::from([only_1.clone()]));
        let refused = |why: &str| {
            let before = contents(&fast);
            let slow_before = contents(&slow);
            let e = tier_once(&fast, &slow, &keys(), AGE, 3000, |_| {}).unwrap_err();
            assert!(
                matches!(e, TierError::Unfinishable { .. }) && e.to_string().contains(&jkey),
                "{e}"
            );
            assert!(e.to_string().contains(why), "{e}");
            assert_eq!(contents(&fast), before, "{e}: something deleted at fast");
            assert_eq!(contents(&slow), slow_before, "{e}: slow changed");
        };

        // Its snapshot is not at the slow destination.
        fast.put(&jkey, &journal).unwrap();
        refused("is not at");
        refused("file:///elsewhere");

        // The slow destination holds snapshot 1 whole; the journals are wrong.
        for k in object_keys(&keys(), &ms[0]) {
            slow.put(&k, &fast.get(&k).unwrap()).unwrap();
        }
        let m1 = keys().manifest(1);
        slow.put(&m1, &fast.get(&m1).unwrap()).unwrap();
        let cases: [(Vec<u8>, &str); 4] = [
            (
                {
                    let mut b = journal.clone();
                    let at = b.len() - 20;
                    b[at] ^= 1;
                    b
                },
                "checksum",
            ),
            (journal[..journal.len() - 1].to_vec(), "truncated"),
            (
                encode_journal(1, "x", &BTreeSet::from([obj(1, 3, ObjectKind::Chunk)])),
                "does not reference",
            ),
            (
                encode_journal(1, "x", &BTreeSet::from([keys().manifest(3)])),
                "not an object",
            ),
        ];
        for (bytes, why) in cases {
            fast.delete(&jkey).unwrap();
            fast.put(&jkey, &bytes).unwrap();
            refused(why);
        }
        fast.delete(&jkey).unwrap();
        fast.put(&jkey, &journal).unwrap();

        // An object of snapshot 1 missing at the slow destination.
        let chunk0 = obj(0, 1, ObjectKind::Chunk);
        let kept = slow.get(&chunk0).unwrap();
        slow.delete(&chunk0).unwrap();
        refused("missing at");
        slow.put(&chunk0, &kept).unwrap();

        // Another manifest for snapshot 1 at the slow destination.
        let mut other = ms[0].clone();
        other.closed_ms += 1;
        overwrite(&sp, &m1, &other.encode());
        refused("differs");
        // Without a journal, the move refuses it too.
        fast.delete(&jkey).unwrap();
        let before = contents(&fast);
        let e = tier_once(&fast, &slow, &keys(), AGE, 3000, |_| {}).unwrap_err();
        assert!(
            matches!(e, TierError::Conflict { .. }) && e.to_string().contains(&m1),
            "{e}"
        );
        assert_eq!(contents(&fast), before);

        // Sound again: the journal finishes (nothing is old at 1999 ms).
        // The object it names stays: snapshot 2 references it.
        overwrite(&sp, &m1, &fast.get(&m1).unwrap());
        fast.put(&jkey, &journal).unwrap();
        let r = tier_once(&fast, &slow, &keys(), AGE, 1999, |_| {}).unwrap();
        assert_eq!((r.resumed, r.objects_deleted), (vec![1], 0));
        assert!(r.moved.is_empty());
        assert_eq!(list_snapshots(&fast, &keys()).unwrap(), vec![2, 3]);
        assert!(fast.list(&keys().tiering()).unwrap().is_empty());
        assert!(objects_at(&fast).contains(&only_1), "2 needs it");
        assert_restores(&slow, 1, &images[0], dir.path());
        for id in [2, 3] {
            assert_restores(&fast, id, &images[id as usize - 1], dir.path());
        }
    }

    /// The same destination given twice, and a slow destination holding
    /// another volume of the same name, are refused before anything moves.
    #[test]
    fn one_destination_twice_and_another_volume_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fast = DirDestination::open(&dir.path().join("fast")).unwrap();
        let twin = DirDestination::open(&dir.path().join("fast")).unwrap();
        three_snapshots(&fast);
        let before = contents(&fast);
        let e = tier_once(&fast, &twin, &keys(), AGE, 3000, |_| {}).unwrap_err();
        assert!(matches!(e, TierError::SameDestination { .. }), "{e}");
        assert_eq!(contents(&fast), before);

        // Volume "vol" with another id: its chunk object 0 of snapshot 1
        // has the key of ours, and must not pass for it.
        let slow = DirDestination::open(&dir.path().join("slow")).unwrap();
        let w = SnapshotWriter::new(
            &slow,
            &keys(),
            &base([9; 16], MIB),
            None,
            1,
            500,
            Codec::None,
        );
        w.put_chunk(0, &vec![0x5a; MIB]).unwrap();
        w.commit().unwrap();
        let slow_before = contents(&slow);
        let e = tier_once(&fast, &slow, &keys(), AGE, 3000, |_| {}).unwrap_err();
        assert!(matches!(e, TierError::OtherVolume { .. }), "{e}");
        assert!(e.to_string().contains(&"09".repeat(16)), "{e}");
        assert_eq!(contents(&fast), before);
        assert_eq!(contents(&slow), slow_before);
    }

    /// Journals round-trip; every bit flip and every cut is refused.
    #[test]
    fn journals_round_trip_and_refuse_damage() {
        let doomed = BTreeSet::from([obj(0, 1, ObjectKind::Chunk), obj(7, 1, ObjectKind::Delta)]);
        let bytes = encode_journal(1, "s3://b/p?endpoint=http://127.0.0.1:1", &doomed);
        let j = decode_journal(&bytes, &keys(), 1).unwrap();
        assert_eq!(j.doomed, doomed);
        assert_eq!(j.to, "s3://b/p?endpoint=http://127.0.0.1:1");
        assert!(
            decode_journal(&bytes, &keys(), 2).is_err(),
            "another snapshot's"
        );
        assert!(decode_journal(&bytes, &Keys::new("other").unwrap(), 1).is_err());
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_journal(&bad, &keys(), 1).is_err(),
                "flip of bit {bit} accepted"
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                decode_journal(&bytes[..cut], &keys(), 1).is_err(),
                "cut at {cut} accepted"
            );
        }
        let empty = encode_journal(4, "file:///s", &BTreeSet::new());
        assert!(
            decode_journal(&empty, &keys(), 4)
                .unwrap()
                .doomed
                .is_empty()
        );
        assert_eq!(
            journal_id(&keys().tiering(), &keys().tiering_journal(4)),
            Some(4)
        );
    }
}
