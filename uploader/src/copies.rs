//! Several copies of a volume's snapshots, at several destinations: the
//! `mirror` policy writes every object to every member, `alternate` writes
//! successive snapshots to the members in turn, and a restore reads from
//! whichever member is healthy and fastest, failing over when one errors,
//! stalls or returns damaged bytes, and spreading concurrent reads over the
//! members.
//!
//! # Writes: a snapshot is complete at every member
//!
//! [`Copies::put`] stores the object at every member at once and succeeds
//! only when every member holds it, so the uploader's order (objects, then
//! the manifest last) holds at each member: a manifest is written to a
//! member only after all the snapshot's objects are there, and a member
//! that lists a snapshot holds all of it (DESIGN.md, invariant 4). A member
//! that already holds the key with the same bytes counts as stored (a
//! retried put after a crash, or a manifest written to one member before
//! another failed); different bytes are [`DestError::AlreadyExists`], as for
//! a single destination.
//!
//! A snapshot is a delta over its parents' objects, so a member that joins
//! a mirror (or missed snapshots while it was unreachable) first needs the
//! objects of the snapshot the next one builds on: [`Copies::catch_up`]
//! copies the newest snapshot's missing objects to it, verified, and then
//! its manifest. Older snapshots stay where they are: `foresnap snapshots`
//! shows which member holds which.
//!
//! # `alternate`: each snapshot complete at one member, in turn
//!
//! Snapshot N goes to member `(N - 1) mod members` ([`Copies::member_of`]:
//! the snapshot is in every key). Its delta objects build on its parents,
//! which live at other members, so before its manifest is written the
//! objects it references that the member may lack (all but its own and
//! those of the member's newest earlier snapshot, which is complete there)
//! are copied to it, each read from another member and verified; one that
//! cannot be copied fails the manifest, which is then not written. The
//! price: each object is uploaded once, then copied through this host to
//! each other member when a later snapshot there needs it.
//!
//! # `stripe`: each snapshot's chunks spread over the members
//!
//! Chunk `c` lives at member `(c >> range_log2) % members`
//! ([`crate::format::Stripe`]), every object of it, so a restore reads
//! from all members at once and each stores only its ranges. The manifest
//! goes to every member, each copy saying which member it is, and only
//! once every member holds the objects of its ranges that the snapshot
//! references: those of earlier snapshots too, copied there first when the
//! layout changed (a member added, or the volume striped anew). The
//! snapshot is complete where all its pieces are. A read of an object goes
//! first to the member its chunk's range names ([`Copies::route_stripe`]
//! teaches a restore which member that is), and fails over as any read.
//!
//! # Reads: health, latency, failover, spreading
//!
//! Each member keeps a moving average of its read latency, its reads in
//! flight, and after an error a back-off window during which it is tried
//! only when the others have failed. A read goes to the member with the
//! smallest `latency x (reads in flight + 1)`: an idle fast member first,
//! and under concurrent reads (a restore's workers) the load spreads so
//! that two copies serve about twice the reads of one. A read that fails,
//! or whose bytes the caller's check refuses ([`Destination::get_valid`]),
//! is retried at the next member. A read that takes longer than the stall
//! limit (several times the member's usual latency, and at least
//! [`Copies::with_stall`]) is raced by the same read at the next member:
//! the first good answer wins, and the stalled member is put in back-off.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dest::{DestError, Destination};
use crate::format::{Keys, Manifest, ObjectRef, Stripe};
use crate::price::{Forecast, Price, Usage, choose, forecast};
use crate::restore::decode_named;

/// Latency assumed for a member before its first read: none, so that every
/// member is tried (and measured) early instead of the first one measured
/// keeping every read.
const UNMEASURED_S: f64 = 0.0;
/// Weight of the newest read in the latency average.
const EWMA_ALPHA: f64 = 0.2;
/// A read is stalled after this many times its member's usual latency...
const STALL_FACTOR: f64 = 8.0;
/// ...and never before this (a slow store's big object is not a stall).
pub const DEFAULT_STALL: Duration = Duration::from_secs(5);
/// Back-off after the first error: doubled per further error, up to
/// [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One member: its destination and what reads taught about it.
#[derive(Debug)]
struct Member {
    dest: Arc<dyn Destination>,
    /// Reads started and not returned (also those left behind after a
    /// stall: the reading thread counts itself out).
    in_flight: Arc<AtomicUsize>,
    health: Mutex<Health>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Health {
    /// Moving average of successful read latency, seconds.
    latency_s: Option<f64>,
    /// Errors (and stalls) since the last success.
    failures: u32,
    /// Tried only after the healthy members until then.
    backoff_until: Option<Instant>,
    reads: u64,
    errors: u64,
}

/// What a member's reads looked like, for reports and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberStats {
    pub url: String,
    /// Reads it answered (with bytes).
    pub reads: u64,
    /// Reads that failed, stalled, or returned bytes the check refused.
    pub errors: u64,
    /// Its average read latency, once measured.
    pub latency_s: Option<f64>,
}

impl Member {
    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn succeeded(&self, elapsed: Duration) {
        let mut h = self.health();
        let s = elapsed.as_secs_f64();
        h.latency_s = Some(match h.latency_s {
            Some(l) => l + EWMA_ALPHA * (s - l),
            None => s,
        });
        h.failures = 0;
        h.backoff_until = None;
        h.reads += 1;
    }

    /// A read has taken `waited` and goes on: counted as a failure, and as
    /// a latency sample, so that after its back-off the member comes after
    /// the ones that answer.
    fn stalled(&self, waited: Duration) {
        {
            let mut h = self.health();
            let s = waited.as_secs_f64();
            h.latency_s = Some(h.latency_s.map_or(s, |l| l + EWMA_ALPHA * (s - l)));
        }
        self.failed();
    }

    fn failed(&self) {
        let mut h = self.health();
        h.failures = h.failures.saturating_add(1);
        h.errors += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << (h.failures - 1).min(16))
            .min(MAX_BACKOFF);
        h.backoff_until = Some(Instant::now() + backoff);
    }
}

/// Copies of one volume's snapshots at several destinations (module doc).
#[derive(Debug)]
pub struct Copies {
    members: Vec<Member>,
    min_stall: Duration,
    placement: Placement,
    /// Under a stripe: its layout and the member holding each piece, so
    /// that an object is read first where it lives.
    route: Mutex<Option<Route>>,
}

/// Where a stripe's pieces are among the members.
#[derive(Debug, Clone)]
struct Route {
    /// The volume whose object keys are routed.
    keys: Keys,
    /// The layout (its `index` unused).
    layout: Stripe,
    /// Per stripe index, the member.
    at: Vec<usize>,
    /// The snapshot it was learned from ([`Copies::route_stripe`]); `None`
    /// for the stripe this set writes.
    snapshot: Option<u32>,
}

/// Why a striped snapshot cannot be read from the members given.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error(
        "snapshot {snapshot} of volume {volume} is striped over {members} destinations, and \
         piece {missing} of them is at none of those given: give every --dest of the stripe"
    )]
    PieceMissing {
        snapshot: u32,
        volume: String,
        members: u8,
        /// 1-based, as shown.
        missing: String,
    },
    #[error("snapshot {snapshot}: {key}: {why}")]
    Damaged {
        snapshot: u32,
        key: String,
        why: String,
    },
    #[error(transparent)]
    Dest(#[from] DestError),
}

/// Where a put goes.
#[derive(Debug)]
enum Placement {
    /// Every member.
    Mirror,
    /// The member of the key's snapshot ([`Copies::member_of`]), for the
    /// volume of these keys.
    Alternate(Keys),
    /// The member with the lowest forecast monthly cost when the key's
    /// snapshot first comes ([`crate::price`]), for the volume of these
    /// keys.
    Price(Keys, Mutex<PriceBook>),
    /// Each object at the member of its chunk's range, `1 << log2` chunks
    /// long; manifests everywhere (module doc). For the volume of these
    /// keys.
    Stripe(Keys, u8),
}

/// The `price` policy's state: the tables, what the uploads showed, and
/// where each snapshot went.
#[derive(Debug)]
struct PriceBook {
    prices: Vec<Price>,
    restores_per_month: f64,
    usage: Usage,
    placed: std::collections::BTreeMap<u32, usize>,
    current: Option<usize>,
    /// Whether the use was read from the members' newest manifests.
    seeded: bool,
}

/// Manifests read to seed the `price` policy's use.
const PRICE_SEED_MANIFESTS: usize = 8;

/// What a read at one member brought back.
type Answer = (usize, Duration, Result<Vec<u8>, DestError>);

impl Copies {
    /// Copies at `members` (at least one), in the order given: the first is
    /// asked first until reads are measured.
    pub fn new(members: Vec<Arc<dyn Destination>>) -> Copies {
        assert!(!members.is_empty(), "copies need at least one destination");
        Copies {
            members: members
                .into_iter()
                .map(|dest| Member {
                    dest,
                    in_flight: Arc::new(AtomicUsize::new(0)),
                    health: Mutex::new(Health::default()),
                })
                .collect(),
            min_stall: DEFAULT_STALL,
            placement: Placement::Mirror,
            route: Mutex::new(None),
        }
    }

    /// `stripe` over `members` (2 to 255) for the volume of `keys`, in
    /// ranges of `1 << range_log2` chunks (module doc).
    pub fn stripe(members: Vec<Arc<dyn Destination>>, keys: Keys, range_log2: u8) -> Copies {
        assert!(
            (2..=255).contains(&members.len()),
            "a stripe has 2 to 255 members"
        );
        assert!(range_log2 <= crate::format::MAX_STRIPE_RANGE_LOG2);
        let n = members.len();
        let mut c = Copies::new(members);
        *c.route
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Route {
            keys: keys.clone(),
            layout: c.layout(range_log2, 0),
            at: (0..n).collect(),
            snapshot: None,
        });
        c.placement = Placement::Stripe(keys, range_log2);
        c
    }

    /// The layout this stripe writes, as member `index` says it.
    fn layout(&self, range_log2: u8, index: usize) -> Stripe {
        Stripe {
            // At most 255 members (`Copies::stripe`).
            members: u8::try_from(self.members.len()).unwrap_or(u8::MAX),
            index: u8::try_from(index).unwrap_or(u8::MAX),
            range_log2,
        }
    }

    /// Which member holds each piece of snapshot `m` (read from any
    /// member), from the members' own manifests: `None` when it is not
    /// striped; a piece at no member is `None` in the list. A member that
    /// cannot be read is passed over; one holding a manifest of another
    /// layout is an error.
    pub fn stripe_pieces(
        &self,
        keys: &Keys,
        m: &Manifest,
    ) -> Result<Option<Vec<Option<usize>>>, StripeError> {
        let Some(s) = m.stripe else {
            return Ok(None);
        };
        let key = keys.manifest(m.snapshot);
        let mut at = vec![None; usize::from(s.members)];
        for (i, member) in self.members.iter().enumerate() {
            let bytes = match member.dest.get(&key) {
                Ok(b) => b,
                Err(DestError::NotFound { .. }) => continue,
                Err(e) => {
                    log::warn!("{e}: its piece of the stripe is read elsewhere if anywhere");
                    continue;
                }
            };
            let theirs = Manifest::decode(&bytes).map_err(|e| StripeError::Damaged {
                snapshot: m.snapshot,
                key: key.clone(),
                why: format!("at {}: {e}", member.dest.url()),
            })?;
            match theirs.stripe {
                Some(t) if t.members == s.members && t.range_log2 == s.range_log2 => {
                    at[usize::from(t.index)].get_or_insert(i);
                }
                _ => {
                    return Err(StripeError::Damaged {
                        snapshot: m.snapshot,
                        key,
                        why: format!(
                            "{} holds a manifest of another layout than the stripe's",
                            member.dest.url()
                        ),
                    });
                }
            }
        }
        Ok(Some(at))
    }

    /// Before reading snapshot `m` (read from any member): when it is
    /// striped, learns which member holds each piece
    /// ([`Copies::stripe_pieces`]), so that each object is read first
    /// where it lives. A piece at no member is an error naming it; a
    /// snapshot that is not striped changes nothing, and one already
    /// learned is not asked again.
    pub fn route_stripe(&self, keys: &Keys, m: &Manifest) -> Result<(), StripeError> {
        let learned = |r: &Option<Route>| {
            r.as_ref()
                .is_some_and(|r| r.snapshot == Some(m.snapshot) && &r.keys == keys)
        };
        if learned(
            &self
                .route
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            return Ok(());
        }
        let (Some(s), Some(at)) = (m.stripe, self.stripe_pieces(keys, m)?) else {
            return Ok(());
        };
        let missing: Vec<String> = at
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_none())
            .map(|(i, _)| (i + 1).to_string())
            .collect();
        if !missing.is_empty() {
            return Err(StripeError::PieceMissing {
                snapshot: m.snapshot,
                volume: keys.name().to_owned(),
                members: s.members,
                missing: missing.join(", "),
            });
        }
        *self
            .route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Route {
            keys: keys.clone(),
            layout: s,
            at: at.into_iter().flatten().collect(),
            snapshot: Some(m.snapshot),
        });
        Ok(())
    }

    /// The member a read of `key` should try first under a stripe.
    fn routed(&self, key: &str) -> Option<usize> {
        let route = self
            .route
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let r = route.as_ref()?;
        let chunk = r.keys.chunk_of(key)?;
        r.at.get(usize::from(r.layout.member_of(chunk))).copied()
    }

    /// `alternate` over `members` for the volume of `keys` (module doc):
    /// snapshot N is complete at member `(N - 1) mod members`.
    pub fn alternate(members: Vec<Arc<dyn Destination>>, keys: Keys) -> Copies {
        let mut c = Copies::new(members);
        c.placement = Placement::Alternate(keys);
        c
    }

    /// `price` over `members` for the volume of `keys`: each snapshot is
    /// complete at the member whose `prices` (one per member, in order)
    /// give the lowest forecast monthly cost when it comes, with
    /// `restores_per_month` whole restores ([`crate::price`]). A member
    /// other than its parent's gets the objects it shares with them
    /// copied before its manifest, as with `alternate`.
    pub fn price(
        members: Vec<Arc<dyn Destination>>,
        keys: Keys,
        prices: Vec<Price>,
        restores_per_month: f64,
    ) -> Copies {
        assert_eq!(members.len(), prices.len(), "a price table per member");
        let mut c = Copies::new(members);
        c.placement = Placement::Price(
            keys,
            Mutex::new(PriceBook {
                prices,
                restores_per_month,
                usage: Usage::default(),
                placed: std::collections::BTreeMap::new(),
                current: None,
                seeded: false,
            }),
        );
        c
    }

    /// Under `price`: each member's URL and forecast from the uploads so
    /// far, and the member the next snapshot goes to. `None` otherwise.
    pub fn price_forecast(&self) -> Option<(Vec<(String, Forecast)>, usize)> {
        let Placement::Price(_, book) = &self.placement else {
            return None;
        };
        let b = book
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let each = self
            .members
            .iter()
            .zip(&b.prices)
            .map(|(m, p)| (m.dest.url(), forecast(p, &b.usage, b.restores_per_month)))
            .collect();
        let next = choose(&b.prices, &b.usage, b.restores_per_month, b.current);
        Some((each, next))
    }

    /// A read is raced at another member after `stall` at the least.
    #[must_use]
    pub fn with_stall(mut self, stall: Duration) -> Copies {
        self.min_stall = stall;
        self
    }

    /// The member destinations, in the order given.
    pub fn members(&self) -> impl Iterator<Item = &Arc<dyn Destination>> {
        self.members.iter().map(|m| &m.dest)
    }

    /// Per member, in the order given: reads, errors, latency.
    pub fn stats(&self) -> Vec<MemberStats> {
        self.members
            .iter()
            .map(|m| {
                let h = *m.health();
                MemberStats {
                    url: m.dest.url(),
                    reads: h.reads,
                    errors: h.errors,
                    latency_s: h.latency_s,
                }
            })
            .collect()
    }

    /// The members to try for a read of `key`, best first (module doc):
    /// under a stripe, the member holding the key's range before all.
    fn order(&self, key: &str) -> Vec<usize> {
        let mut order = self.order_by_health();
        if let Some(first) = self.routed(key)
            && let Some(at) = order.iter().position(|&i| i == first)
        {
            order[..=at].rotate_right(1);
        }
        order
    }

    fn order_by_health(&self) -> Vec<usize> {
        let now = Instant::now();
        let mut scored: Vec<(bool, f64, usize)> = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let h = *m.health();
                let backing_off = h.backoff_until.is_some_and(|t| t > now);
                let load = m.in_flight.load(Ordering::Relaxed) as f64 + 1.0;
                (backing_off, h.latency_s.unwrap_or(UNMEASURED_S) * load, i)
            })
            .collect();
        scored.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)));
        scored.into_iter().map(|s| s.2).collect()
    }

    fn stall_limit(&self, i: usize) -> Duration {
        let usual = self.members[i].health().latency_s.unwrap_or(0.0);
        Duration::from_secs_f64(usual * STALL_FACTOR).max(self.min_stall)
    }

    /// Starts a read of `key` at member `i` on its own thread (a stalled
    /// read cannot be cancelled, only left behind); its answer comes on
    /// `tx`.
    fn launch(&self, i: usize, key: &str, tx: &mpsc::Sender<Answer>) {
        let m = &self.members[i];
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        let dest = m.dest.clone();
        let k = key.to_owned();
        let sender = tx.clone();
        let started = Instant::now();
        let in_flight = m.in_flight.clone();
        let spawned = std::thread::Builder::new()
            .name("copies-read".into())
            .spawn(move || {
                let r = dest.get(&k);
                in_flight.fetch_sub(1, Ordering::Relaxed);
                // The receiver is gone when another member answered first.
                let _ = sender.send((i, started.elapsed(), r));
            });
        if let Err(e) = spawned {
            m.in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send((
                i,
                Duration::ZERO,
                Err(DestError::Remote {
                    dest: m.dest.url(),
                    op: "get",
                    key: key.to_owned(),
                    why: format!("cannot start a read thread: {e}"),
                }),
            ));
        }
    }

    /// The read behind [`Destination::get`] and [`Destination::get_valid`].
    fn read(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        if self.members.len() == 1 {
            return self.members[0].dest.get(key);
        }
        let order = self.order(key);
        let (tx, rx) = mpsc::channel::<Answer>();
        let mut next = 0;
        let mut running = 0;
        let mut deadline = Instant::now();
        // The first error worth reporting: a missing key only if every
        // member lacks it; bytes refused by the check are returned when no
        // member has better (the caller's check then names the damage).
        let mut error: Option<DestError> = None;
        let mut refused: Option<Vec<u8>> = None;
        loop {
            if running == 0 || Instant::now() >= deadline {
                if next < order.len() {
                    self.launch(order[next], key, &tx);
                    deadline = Instant::now() + self.stall_limit(order[next]);
                    next += 1;
                    running += 1;
                } else if running == 0 {
                    break;
                } else {
                    // Every member is asked; wait for whichever answers.
                    deadline = Instant::now() + Duration::from_secs(3600);
                }
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            let (i, elapsed, r) = match rx.recv_timeout(wait) {
                Ok(a) => a,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Stalled: the member in front is penalized, and the
                    // read is raced at the next one.
                    if next < order.len() {
                        log::warn!(
                            "{}: read of {key} stalled; trying {}",
                            self.members[order[next - 1]].dest.url(),
                            self.members[order[next]].dest.url()
                        );
                        let m = &self.members[order[next - 1]];
                        m.stalled(self.stall_limit(order[next - 1]));
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            running -= 1;
            let m = &self.members[i];
            match r {
                Ok(bytes) if valid(&bytes) => {
                    m.succeeded(elapsed);
                    return Ok(bytes);
                }
                Ok(bytes) => {
                    log::warn!("{}: {key} is damaged; trying another copy", m.dest.url());
                    m.failed();
                    refused.get_or_insert(bytes);
                }
                Err(e) => {
                    if !matches!(e, DestError::NotFound { .. }) {
                        log::warn!("{e}; trying another copy");
                        m.failed();
                    }
                    let replace = match &error {
                        None => true,
                        Some(DestError::NotFound { .. }) => {
                            !matches!(e, DestError::NotFound { .. })
                        }
                        Some(_) => false,
                    };
                    if replace {
                        error = Some(e);
                    }
                }
            }
            // Move on at once: the next member is asked now.
            deadline = Instant::now();
        }
        if let Some(bytes) = refused {
            return Ok(bytes);
        }
        Err(match error {
            Some(DestError::NotFound { key, .. }) => DestError::NotFound {
                dest: self.url(),
                key,
            },
            Some(e) => e,
            None => DestError::Remote {
                dest: self.url(),
                op: "get",
                key: key.to_owned(),
                why: "no copy answered".into(),
            },
        })
    }

    /// Brings member `i` up to the newest snapshot of `keys` that any member
    /// holds (module doc): copies that snapshot's objects it lacks, each
    /// verified, then its manifest. `progress(done, total)` counts objects.
    /// Returns the snapshot and the number of objects copied, or `None`
    /// when no member holds a snapshot or `i` already holds the newest.
    pub fn catch_up(
        &self,
        i: usize,
        keys: &Keys,
        progress: impl FnMut(u64, u64),
    ) -> Result<Option<(u32, u64)>, CatchUpError> {
        let member = &self.members[i].dest;
        let mut newest: Option<(u32, usize)> = None;
        let mut mine = Vec::new();
        for (j, m) in self.members.iter().enumerate() {
            let ids = match m.dest.list(&keys.manifests()) {
                Ok(k) => keys.snapshot_ids(&k),
                Err(e) if j == i => return Err(e.into()),
                Err(e) => {
                    log::warn!("{e}: its snapshots are not considered");
                    continue;
                }
            };
            if j == i {
                mine = ids.clone();
            }
            if let Some(&id) = ids.last()
                && newest.is_none_or(|(n, _)| id > n)
            {
                newest = Some((id, j));
            }
        }
        let Some((id, _)) = newest else {
            return Ok(None);
        };
        if mine.contains(&id) {
            return Ok(None);
        }
        let mkey = keys.manifest(id);
        let mbytes = self.get_valid(&mkey, &|b| {
            Manifest::decode(b).is_ok_and(|m| m.snapshot == id)
        })?;
        let manifest = Manifest::decode(&mbytes).map_err(|error| CatchUpError::Damaged {
            key: mkey.clone(),
            why: error.to_string(),
        })?;
        let have: std::collections::BTreeSet<String> =
            member.list(&keys.objects())?.into_iter().collect();
        let copied = self.copy_objects(
            i,
            keys,
            &manifest,
            |_, _, key| !have.contains(key),
            progress,
        )?;
        match member.put(&mkey, &mbytes) {
            Ok(()) | Err(DestError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(Some((id, copied)))
    }

    /// Copies to member `i` the objects of `manifest` that `wanted(key,
    /// ref)` selects, each read from any copy and verified first (a
    /// damaged object is never copied). Returns how many.
    fn copy_objects(
        &self,
        i: usize,
        keys: &Keys,
        manifest: &Manifest,
        wanted: impl Fn(u64, ObjectRef, &str) -> bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, CatchUpError> {
        let mut todo = Vec::new();
        for (c, refs) in manifest.chunks.iter().enumerate() {
            for &r in refs {
                let key = keys.object(c as u64, r);
                if wanted(c as u64, r, &key) {
                    todo.push((c as u64, r, key));
                }
            }
        }
        todo.sort();
        todo.dedup();
        let total = todo.len() as u64;
        for (n, (chunk, r, key)) in todo.iter().enumerate() {
            let ok = |b: &[u8]| decode_named(b, manifest, *chunk, *r).is_ok();
            let bytes = self.get_valid(key, &ok)?;
            if !ok(&bytes) {
                return Err(CatchUpError::Damaged {
                    key: key.clone(),
                    why: "no copy holds it undamaged".into(),
                });
            }
            match self.members[i].dest.put(key, &bytes) {
                Ok(()) | Err(DestError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            progress(n as u64 + 1, total);
        }
        Ok(total)
    }

    /// The member that holds snapshot `id` under `alternate`.
    pub fn member_of(&self, id: u32) -> usize {
        id.wrapping_sub(1) as usize % self.members.len()
    }

    /// `alternate`: before snapshot `manifest`'s manifest is written at
    /// member `i`, the objects it references that `i` may lack: those of
    /// neither this snapshot (stored there by the uploader) nor `i`'s own
    /// newest earlier snapshot (complete there).
    fn fill(&self, i: usize, keys: &Keys, manifest: &Manifest) -> Result<u64, CatchUpError> {
        let mut have = std::collections::BTreeSet::new();
        if let Some(m) = self.newest_before(i, keys, manifest.snapshot)? {
            for (c, refs) in m.chunks.iter().enumerate() {
                have.extend(refs.iter().map(|&r| (c as u64, r)));
            }
        }
        let snapshot = manifest.snapshot;
        self.copy_objects(
            i,
            keys,
            manifest,
            |c, r, _| r.snapshot != snapshot && !have.contains(&(c, r)),
            |_, _| {},
        )
    }

    /// Member `i`'s newest manifest of a snapshot before `snapshot`: what
    /// it holds whole (or its piece of, under a stripe).
    fn newest_before(
        &self,
        i: usize,
        keys: &Keys,
        snapshot: u32,
    ) -> Result<Option<Manifest>, CatchUpError> {
        let member = &self.members[i].dest;
        let ids = keys.snapshot_ids(&member.list(&keys.manifests())?);
        let Some(&prev) = ids.iter().rfind(|&&id| id < snapshot) else {
            return Ok(None);
        };
        let key = keys.manifest(prev);
        let m = Manifest::decode(&member.get(&key)?).map_err(|error| CatchUpError::Damaged {
            key,
            why: error.to_string(),
        })?;
        Ok(Some(m))
    }

    /// The manifest being put as `key`: decoded, since placing it needs
    /// its references.
    fn manifest_put(&self, key: &str, bytes: &[u8]) -> Result<Manifest, DestError> {
        Manifest::decode(bytes).map_err(|e| DestError::Remote {
            dest: self.url(),
            op: "put",
            key: key.to_owned(),
            why: format!("not a manifest: {e}"),
        })
    }

    /// Stores `key` at member `i`; the same bytes there already count as
    /// stored (module doc).
    fn put_at(&self, i: usize, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let m = &self.members[i];
        match m.dest.put(key, bytes) {
            Err(e @ DestError::AlreadyExists { .. }) => match m.dest.get(key) {
                Ok(there) if there == bytes => Ok(()),
                Ok(_) => Err(e),
                Err(e) => Err(e),
            },
            r => r,
        }
    }

    /// `mirror`: every member at once.
    fn put_everywhere(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let results: Vec<Result<(), DestError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (1..self.members.len())
                .map(|i| s.spawn(move || self.put_at(i, key, bytes)))
                .collect();
            let mut out = vec![self.put_at(0, key, bytes)];
            for h in handles {
                out.push(h.join().unwrap_or_else(|_| {
                    Err(DestError::Remote {
                        dest: self.url(),
                        op: "put",
                        key: key.to_owned(),
                        why: "a member's put panicked".into(),
                    })
                }));
            }
            out
        });
        // A real failure first: it says more than a key that exists.
        let mut exists = None;
        for r in results {
            match r {
                Ok(()) => {}
                Err(e @ DestError::AlreadyExists { .. }) => {
                    exists.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        exists.map_or(Ok(()), Err)
    }

    /// `alternate`: the key's snapshot's member; a manifest only once that
    /// member holds every object it references.
    fn put_alternating(&self, keys: &Keys, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        let Some(id) = keys.snapshot_of(key) else {
            return self.put_everywhere(key, bytes);
        };
        self.put_placed(keys, self.member_of(id), id, key, bytes)
    }

    /// `price`: the member chosen when the key's snapshot first came; the
    /// uploads' use is counted for the next choice.
    fn put_priced(
        &self,
        keys: &Keys,
        book: &Mutex<PriceBook>,
        key: &str,
        bytes: &[u8],
    ) -> Result<(), DestError> {
        let Some(id) = keys.snapshot_of(key) else {
            return self.put_everywhere(key, bytes);
        };
        let i = {
            let mut b = book
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !b.seeded {
                b.seeded = true;
                if let Err(e) = self.seed_price(keys, &mut b) {
                    log::warn!(
                        "price: reading the volume's manifests: {e}; forecasting without them"
                    );
                }
            }
            match b.placed.get(&id) {
                Some(&i) => i,
                None => {
                    let i = choose(&b.prices, &b.usage, b.restores_per_month, b.current);
                    if b.current != Some(i) {
                        let f = forecast(&b.prices[i], &b.usage, b.restores_per_month);
                        log::info!(
                            "price: snapshot {id} and those after it go to {} (forecast {f})",
                            self.members[i].dest.url()
                        );
                    }
                    b.current = Some(i);
                    b.placed.insert(id, i);
                    i
                }
            }
        };
        self.put_placed(keys, i, id, key, bytes)?;
        if keys.is_manifest(key)
            && let Ok(m) = Manifest::decode(bytes)
        {
            book.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .usage
                .add(&m);
        }
        Ok(())
    }

    /// `price`, before its first put: the use the newest manifests at the
    /// members show, and the member the newest is at (the current one).
    fn seed_price(&self, keys: &Keys, b: &mut PriceBook) -> Result<(), DestError> {
        let mut at: std::collections::BTreeMap<u32, usize> = std::collections::BTreeMap::new();
        for (i, m) in self.members.iter().enumerate() {
            for id in keys.snapshot_ids(&m.dest.list(&keys.manifests())?) {
                at.entry(id).or_insert(i);
            }
        }
        b.current = at.values().next_back().copied();
        let newest: Vec<(u32, usize)> = at.into_iter().rev().take(PRICE_SEED_MANIFESTS).collect();
        for &(id, i) in newest.iter().rev() {
            let bytes = self.members[i].dest.get(&keys.manifest(id))?;
            if let Ok(m) = Manifest::decode(&bytes) {
                b.usage.add(&m);
            }
        }
        Ok(())
    }

    /// `stripe`: an object at its range's member; a manifest at every
    /// member, each saying which it is, once each holds the objects of its
    /// ranges (module doc); any other key everywhere.
    fn put_striped(
        &self,
        keys: &Keys,
        range_log2: u8,
        key: &str,
        bytes: &[u8],
    ) -> Result<(), DestError> {
        if let Some(c) = keys.chunk_of(key) {
            let i = self.layout(range_log2, 0).member_of(c);
            return self.put_at(usize::from(i), key, bytes);
        }
        if !keys.is_manifest(key) {
            return self.put_everywhere(key, bytes);
        }
        let m = self.manifest_put(key, bytes)?;
        for i in 0..self.members.len() {
            let copied = self
                .fill_piece(i, keys, &m, self.layout(range_log2, i))
                .map_err(|e| self.copy_error(e))?;
            if copied > 0 {
                log::info!(
                    "{}: copied {copied} objects of earlier snapshots of its ranges for snapshot {}",
                    self.members[i].dest.url(),
                    m.snapshot
                );
            }
        }
        for i in 0..self.members.len() {
            let mine = Manifest {
                stripe: Some(self.layout(range_log2, i)),
                ..m.clone()
            };
            self.put_at(i, key, &mine.encode())?;
        }
        Ok(())
    }

    /// `stripe`: before snapshot `manifest`'s manifest is written at
    /// member `i`, the objects of `i`'s ranges it references that `i` may
    /// lack: of earlier snapshots, unless `i`'s newest earlier manifest
    /// shows the same layout (then `i` holds all it references there).
    fn fill_piece(
        &self,
        i: usize,
        keys: &Keys,
        manifest: &Manifest,
        layout: Stripe,
    ) -> Result<u64, CatchUpError> {
        let snapshot = manifest.snapshot;
        let mine = |c: u64| layout.member_of(c) == layout.index;
        let older = manifest
            .chunks
            .iter()
            .enumerate()
            .any(|(c, refs)| mine(c as u64) && refs.iter().any(|r| r.snapshot != snapshot));
        if !older {
            return Ok(0);
        }
        let mut have = std::collections::BTreeSet::new();
        match self.newest_before(i, keys, snapshot)? {
            Some(p) if p.stripe == Some(layout) => {
                for (c, refs) in p.piece().chunks.iter().enumerate() {
                    have.extend(refs.iter().map(|&r| keys.object(c as u64, r)));
                }
            }
            // Another layout, or none: what the member holds is listed.
            _ => have.extend(self.members[i].dest.list(&keys.objects())?),
        }
        self.copy_objects(
            i,
            keys,
            manifest,
            |c, r, key| mine(c) && r.snapshot != snapshot && !have.contains(key),
            |_, _| {},
        )
    }

    /// A failed copy of objects before a manifest, as the manifest's put
    /// error.
    fn copy_error(&self, e: CatchUpError) -> DestError {
        match e {
            CatchUpError::Dest(d) => d,
            CatchUpError::Damaged { key, why } => DestError::Remote {
                dest: self.url(),
                op: "copy",
                key,
                why,
            },
        }
    }

    /// Stores `key` of snapshot `id` at member `i`; a manifest only once
    /// `i` holds every object it references (copied from the others).
    fn put_placed(
        &self,
        keys: &Keys,
        i: usize,
        id: u32,
        key: &str,
        bytes: &[u8],
    ) -> Result<(), DestError> {
        if keys.is_manifest(key) {
            let m = self.manifest_put(key, bytes)?;
            let copied = self.fill(i, keys, &m).map_err(|e| self.copy_error(e))?;
            if copied > 0 {
                log::info!(
                    "{}: copied {copied} objects of earlier snapshots for snapshot {id}",
                    self.members[i].dest.url()
                );
            }
        }
        self.put_at(i, key, bytes)
    }
}

/// Why [`Copies::catch_up`] (or the copies `alternate` makes) failed.
#[derive(Debug, thiserror::Error)]
pub enum CatchUpError {
    #[error(transparent)]
    Dest(#[from] DestError),
    #[error("{key}: {why}")]
    Damaged { key: String, why: String },
}

impl Destination for Copies {
    fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
        match &self.placement {
            _ if self.members.len() == 1 => self.put_at(0, key, bytes),
            Placement::Mirror => self.put_everywhere(key, bytes),
            Placement::Alternate(keys) => self.put_alternating(keys, key, bytes),
            Placement::Price(keys, book) => self.put_priced(keys, book, key, bytes),
            Placement::Stripe(keys, log2) => self.put_striped(keys, *log2, key, bytes),
        }
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
        self.read(key, &|_| true)
    }

    fn get_valid(&self, key: &str, valid: &dyn Fn(&[u8]) -> bool) -> Result<Vec<u8>, DestError> {
        self.read(key, valid)
    }

    /// The keys any reachable member holds (a member that cannot be listed
    /// is skipped, unless none can).
    fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
        let mut all = std::collections::BTreeSet::new();
        let mut first_error = None;
        let mut answered = false;
        for m in &self.members {
            match m.dest.list(prefix) {
                Ok(keys) => {
                    answered = true;
                    all.extend(keys);
                }
                Err(e) => {
                    log::warn!("{e}: listing the other copies");
                    m.failed();
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if !answered => Err(e),
            _ => Ok(all.into_iter().collect()),
        }
    }

    /// Deletes at every member; the first error after trying all.
    fn delete(&self, key: &str) -> Result<(), DestError> {
        let mut first_error = None;
        for m in &self.members {
            if let Err(e) = m.dest.delete(key) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn url(&self) -> String {
        let urls: Vec<String> = self.members.iter().map(|m| m.dest.url()).collect();
        match self.placement {
            Placement::Mirror => format!("mirror({})", urls.join(", ")),
            Placement::Alternate(_) => format!("alternate({})", urls.join(", ")),
            Placement::Price(..) => format!("price({})", urls.join(", ")),
            Placement::Stripe(..) => format!("stripe({})", urls.join(", ")),
        }
    }

    /// A mirror puts to every member at once; an alternating set stores
    /// each snapshot's objects at one member.
    fn object_copies(&self) -> u64 {
        let each = self.members.iter().map(|m| m.dest.object_copies());
        match self.placement {
            Placement::Mirror => each.sum(),
            Placement::Alternate(_) | Placement::Price(..) | Placement::Stripe(..) => {
                each.max().unwrap_or(0)
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::dest::DirDestination;
    use crate::format::{Codec, ObjectKind, ObjectRef};
    use crate::restore::{SnapshotWriter, read_manifest, restore_image};
    use std::sync::atomic::AtomicBool;

    const MIB: usize = 1 << 20;

    /// A member whose reads can fail, stall or return damaged bytes, and
    /// that counts its reads.
    #[derive(Debug)]
    struct Faulty {
        inner: DirDestination,
        fail: AtomicBool,
        corrupt: AtomicBool,
        stall: Mutex<Duration>,
        delay: Duration,
        gets: AtomicUsize,
    }

    impl Faulty {
        fn new(dir: &std::path::Path, delay: Duration) -> Arc<Faulty> {
            Arc::new(Faulty {
                inner: DirDestination::open(dir).unwrap(),
                fail: AtomicBool::new(false),
                corrupt: AtomicBool::new(false),
                stall: Mutex::new(Duration::ZERO),
                delay,
                gets: AtomicUsize::new(0),
            })
        }
        fn gets(&self) -> usize {
            self.gets.load(Ordering::Relaxed)
        }
    }

    impl Destination for Faulty {
        fn put(&self, key: &str, bytes: &[u8]) -> Result<(), DestError> {
            self.inner.put(key, bytes)
        }
        fn get(&self, key: &str) -> Result<Vec<u8>, DestError> {
            self.gets.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(self.delay + *self.stall.lock().unwrap());
            if self.fail.load(Ordering::Relaxed) {
                return Err(DestError::Remote {
                    dest: self.url(),
                    op: "get",
                    key: key.to_owned(),
                    why: "injected".into(),
                });
            }
            let mut b = self.inner.get(key)?;
            if self.corrupt.load(Ordering::Relaxed)
                && let Some(x) = b.last_mut()
            {
                *x ^= 1;
            }
            Ok(b)
        }
        fn list(&self, prefix: &str) -> Result<Vec<String>, DestError> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(DestError::Remote {
                    dest: self.url(),
                    op: "list",
                    key: prefix.to_owned(),
                    why: "injected".into(),
                });
            }
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> Result<(), DestError> {
            self.inner.delete(key)
        }
        fn url(&self) -> String {
            self.inner.url()
        }
    }

    /// The shape of a test volume of `vol` bytes (1 MiB chunks).
    fn base(vol: u64, id: u8) -> Manifest {
        Manifest {
            volume_id: [id; 16],
            snapshot: 0,
            parent: 0,
            closed_ms: 0,
            volume_bytes: vol,
            block_bytes: 4096,
            chunk_bytes: MIB as u32,
            chunks: Vec::new(),
            stripe: None,
        }
    }

    fn dir_dest(p: &std::path::Path) -> Arc<dyn Destination> {
        Arc::new(DirDestination::open(p).unwrap())
    }

    /// What [`write_three`] stored.
    struct Written {
        /// The image at each snapshot's close.
        images: Vec<Vec<u8>>,
        /// The image now, its geometry, and the last manifest.
        image: Vec<u8>,
        base: Manifest,
        last: Manifest,
    }

    /// Snapshots 1 (two chunks), 2 and 3 (a delta on chunk 0 each) of a
    /// 2 MiB volume, written through `c`, closed at 1, 2 and 3 ms.
    fn write_three(c: &Copies, keys: &Keys) -> Written {
        let vol = 2 * MIB as u64;
        let mut image: Vec<u8> = (0..vol as usize).map(|i| (i % 239) as u8).collect();
        let base = base(vol, 3);
        let mut images = Vec::new();
        let mut parent: Option<Manifest> = None;
        for id in 1..=3u32 {
            let w = SnapshotWriter::new(
                c,
                keys,
                &base,
                parent.as_ref(),
                id,
                u64::from(id),
                Codec::Zstd(1),
            );
            if id == 1 {
                w.put_chunk(0, &image[..MIB]).unwrap();
                w.put_chunk(1, &image[MIB..]).unwrap();
            } else {
                let b0 = id as usize * 4096;
                image[b0..b0 + 4096].fill(id as u8);
                w.put_delta(0, &[(id, &image[b0..b0 + 4096])]).unwrap();
            }
            parent = Some(w.commit().unwrap());
            images.push(image.clone());
        }
        Written {
            images,
            image,
            base,
            last: parent.unwrap(),
        }
    }

    /// Each `(snapshot, member)` restores from that member alone to the
    /// snapshot's image.
    fn restores_alone(
        dir: &std::path::Path,
        keys: &Keys,
        at: &[(u32, &Arc<dyn Destination>)],
        images: &[Vec<u8>],
    ) {
        for &(id, d) in at {
            let m = read_manifest(d.as_ref(), keys, id).unwrap();
            let out = dir.join(format!("r{id}-{}", d.url().len()));
            restore_image(d.as_ref(), keys, &m, &out, 2, |_, _| {}).unwrap();
            assert!(
                std::fs::read(&out).unwrap() == images[id as usize - 1],
                "snapshot {id} at {}",
                d.url()
            );
        }
    }

    /// `price`: snapshot 1 at the cheapest storage (nothing measured yet);
    /// its puts then make the cheap-PUT member cheaper past the margin, so
    /// snapshots 2 and 3 go there, complete (snapshot 1's objects copied
    /// for them); each restores alone, and the forecast says why.
    #[test]
    fn price_sends_snapshots_where_the_forecast_is_lowest() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir_dest(&dir.path().join("a"));
        let b = dir_dest(&dir.path().join("b"));
        let keys = Keys::new("vol").unwrap();
        let cheap_storage = Price::parse("storage=0.01,put=5").unwrap();
        let cheap_puts = Price::parse("storage=0.02,put=0.005").unwrap();
        let c = Copies::price(
            vec![a.clone(), b.clone()],
            keys.clone(),
            vec![cheap_storage, cheap_puts],
            1.0,
        );
        assert!(c.url().starts_with("price("));
        let (before, next) = c.price_forecast().unwrap();
        assert_eq!((before[0].1.total(), next), (0.0, 0), "nothing measured");
        let w = write_three(&c, &keys);
        assert_eq!(keys.snapshot_ids(&a.list(&keys.manifests()).unwrap()), [1]);
        assert_eq!(
            keys.snapshot_ids(&b.list(&keys.manifests()).unwrap()),
            [2, 3]
        );
        restores_alone(dir.path(), &keys, &[(1, &a), (2, &b), (3, &b)], &w.images);
        let (each, next) = c.price_forecast().unwrap();
        assert_eq!(next, 1);
        assert!(each[0].1.total() > each[1].1.total(), "{each:?}");
        assert!(each[0].1.puts > 0.0 && each[1].1.storage > 0.0, "{each:?}");
        // Mirror and alternate have no forecast.
        assert!(Copies::new(vec![a]).price_forecast().is_none());
    }

    fn two(dir: &std::path::Path, delay: Duration) -> (Arc<Faulty>, Arc<Faulty>, Copies) {
        let a = Faulty::new(&dir.join("a"), delay);
        let b = Faulty::new(&dir.join("b"), delay);
        let c = Copies::new(vec![a.clone(), b.clone()]);
        (a, b, c)
    }

    #[test]
    fn a_put_reaches_every_member_and_a_repeat_of_the_same_bytes_is_no_error() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = two(dir.path(), Duration::ZERO);
        c.put("v/x", b"one").unwrap();
        assert_eq!(a.inner.get("v/x").unwrap(), b"one");
        assert_eq!(b.inner.get("v/x").unwrap(), b"one");
        // A member stored it before a crash; the retry completes the rest.
        b.inner.put("v/y", b"two").unwrap();
        c.put("v/y", b"two").unwrap();
        assert_eq!(a.inner.get("v/y").unwrap(), b"two");
        // Other bytes under an existing key are refused, as anywhere.
        assert!(matches!(
            c.put("v/y", b"TWO"),
            Err(DestError::AlreadyExists { .. })
        ));
        assert_eq!(c.list("v/").unwrap(), vec!["v/x", "v/y"]);
        c.delete("v/x").unwrap();
        assert!(
            a.inner.list("v/").unwrap() == vec!["v/y"]
                && b.inner.list("v/").unwrap() == vec!["v/y"]
        );
        assert!(c.url().starts_with("mirror(file://"));
    }

    #[test]
    fn reads_fail_over_on_errors_missing_keys_and_damaged_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = two(dir.path(), Duration::ZERO);
        c.put("v/k", b"payload").unwrap();
        let valid = |x: &[u8]| x == b"payload";

        a.fail.store(true, Ordering::Relaxed);
        assert_eq!(c.get_valid("v/k", &valid).unwrap(), b"payload");
        // The failed member backs off: the next read goes to b first.
        let before = a.gets();
        assert_eq!(c.get("v/k").unwrap(), b"payload");
        assert_eq!(a.gets(), before, "a member in back-off is not asked first");
        a.fail.store(false, Ordering::Relaxed);

        // Damaged at one member: the other's copy is returned.
        b.corrupt.store(true, Ordering::Relaxed);
        for _ in 0..4 {
            assert_eq!(c.get_valid("v/k", &valid).unwrap(), b"payload");
        }
        // Damaged everywhere: the bytes come back for the caller's check
        // to name the damage; never as valid.
        a.corrupt.store(true, Ordering::Relaxed);
        assert_ne!(c.get_valid("v/k", &valid).unwrap(), b"payload");
        a.corrupt.store(false, Ordering::Relaxed);
        b.corrupt.store(false, Ordering::Relaxed);

        // Missing at one member.
        a.inner.delete("v/k").unwrap();
        assert_eq!(c.get("v/k").unwrap(), b"payload");
        // Missing everywhere: NotFound, named for the mirror.
        b.inner.delete("v/k").unwrap();
        match c.get("v/k") {
            Err(DestError::NotFound { dest, .. }) => assert!(dest.starts_with("mirror(")),
            other => panic!("{other:?}"),
        }
        // An error other than a missing key is the one reported.
        a.fail.store(true, Ordering::Relaxed);
        assert!(matches!(c.get("v/k"), Err(DestError::Remote { .. })));
        let s = c.stats();
        assert!(s[0].errors >= 2 && s[1].errors >= 1, "{s:?}");
    }

    #[test]
    fn a_stalled_read_is_raced_at_another_member() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = two(dir.path(), Duration::ZERO);
        let c = c.with_stall(Duration::from_millis(100));
        c.put("v/k", b"payload").unwrap();
        *a.stall.lock().unwrap() = Duration::from_secs(5);
        let t = Instant::now();
        assert_eq!(c.get("v/k").unwrap(), b"payload");
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(4),
            "waited for the stall: {took:?}"
        );
        assert_eq!((a.gets(), b.gets()), (1, 1));
        assert_eq!(c.stats()[0].errors, 1, "the stall counts against a");
    }

    #[test]
    fn concurrent_reads_spread_over_the_members() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = two(dir.path(), Duration::from_millis(10));
        c.put("v/k", b"payload").unwrap();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..16 {
                        assert_eq!(c.get("v/k").unwrap(), b"payload");
                    }
                });
            }
        });
        // 64 reads by 4 readers: each member served a real share.
        assert_eq!(a.gets() + b.gets(), 64);
        assert!(
            a.gets() >= 8 && b.gets() >= 8,
            "{} / {}",
            a.gets(),
            b.gets()
        );
    }

    /// A member that joins a mirror gets the newest snapshot's objects and
    /// manifest, and then restores it alone, bit-exact.
    #[test]
    fn catch_up_makes_a_new_member_hold_the_newest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir_dest(&dir.path().join("a"));
        let b = dir_dest(&dir.path().join("b"));
        let keys = Keys::new("vol").unwrap();
        let vol = 2 * MIB as u64;
        let mut image: Vec<u8> = (0..vol as usize).map(|i| (i % 253) as u8).collect();
        let base = base(vol, 7);
        let w = SnapshotWriter::new(a.as_ref(), &keys, &base, None, 1, 1, Codec::Zstd(1));
        w.put_chunk(0, &image[..MIB]).unwrap();
        w.put_chunk(1, &image[MIB..]).unwrap();
        let m1 = w.commit().unwrap();
        image[4096..8192].fill(0xAB);
        let w = SnapshotWriter::new(a.as_ref(), &keys, &base, Some(&m1), 2, 2, Codec::Zstd(1));
        w.put_delta(0, &[(1, &image[4096..8192])]).unwrap();
        let m2 = w.commit().unwrap();

        let c = Copies::new(vec![a.clone(), b.clone()]);
        let mut calls = Vec::new();
        let r = c.catch_up(1, &keys, |d, t| calls.push((d, t))).unwrap();
        assert_eq!(r, Some((2, 3)), "snapshot 2: two chunks and a delta");
        assert_eq!(calls.last(), Some(&(3, 3)));
        assert_eq!(b.list(&keys.manifests()).unwrap(), vec![keys.manifest(2)]);
        assert_eq!(
            c.catch_up(1, &keys, |_, _| {}).unwrap(),
            None,
            "already there"
        );
        assert_eq!(c.catch_up(0, &keys, |_, _| {}).unwrap(), None);

        let m = read_manifest(b.as_ref(), &keys, 2).unwrap();
        assert_eq!(m, m2);
        let out = dir.path().join("restored");
        restore_image(b.as_ref(), &keys, &m, &out, 2, |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), image);

        // A damaged object at the only holder is refused, never copied.
        let d = dir_dest(&dir.path().join("d"));
        let key = keys.object(0, ObjectRef::own(2, ObjectKind::Delta));
        let p = dir.path().join("a").join(&key);
        let mut bytes = std::fs::read(&p).unwrap();
        let n = bytes.len() - 1;
        bytes[n] ^= 1;
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let c = Copies::new(vec![a, d.clone()]);
        let e = c.catch_up(1, &keys, |_, _| {}).unwrap_err();
        assert!(e.to_string().contains(&key), "{e}");
        assert!(
            d.list(&keys.manifests()).unwrap().is_empty(),
            "no manifest without its objects"
        );
    }

    /// `alternate` over two directories: snapshots 1 and 3 at a, 2 at b,
    /// each complete where it is (its parents' objects copied there before
    /// its manifest), restoring alone bit-exact; a manifest is never
    /// written where an object it needs could not be copied.
    #[test]
    fn alternate_keeps_each_snapshot_complete_at_its_member() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir_dest(&dir.path().join("a"));
        let b = dir_dest(&dir.path().join("b"));
        let keys = Keys::new("vol").unwrap();
        let c = Copies::alternate(vec![a.clone(), b.clone()], keys.clone());
        assert!(c.url().starts_with("alternate("));
        let Written {
            images,
            image,
            base,
            last,
        } = write_three(&c, &keys);
        let parent = Some(last);
        assert_eq!(
            keys.snapshot_ids(&a.list(&keys.manifests()).unwrap()),
            vec![1, 3]
        );
        assert_eq!(
            keys.snapshot_ids(&b.list(&keys.manifests()).unwrap()),
            vec![2]
        );
        restores_alone(dir.path(), &keys, &[(1, &a), (2, &b), (3, &a)], &images);
        // Snapshot 2's delta was copied to a for snapshot 3; b holds only
        // what snapshot 2 needs.
        assert_eq!(a.list(&keys.objects()).unwrap().len(), 4);
        assert_eq!(b.list(&keys.objects()).unwrap().len(), 3);

        // Snapshot 4 (at b) needs snapshot 3's delta, which is lost at a:
        // its manifest is refused and not written.
        a.delete(&keys.object(0, ObjectRef::own(3, ObjectKind::Delta)))
            .unwrap();
        let w = SnapshotWriter::new(&c, &keys, &base, parent.as_ref(), 4, 4, Codec::Zstd(1));
        w.put_delta(1, &[(9, &image[MIB..MIB + 4096])]).unwrap();
        assert!(w.commit().is_err());
        assert_eq!(
            keys.snapshot_ids(&b.list(&keys.manifests()).unwrap()),
            vec![2]
        );
    }

    /// Whether every object `m`'s piece references is at `d`.
    fn holds_piece(d: &dyn Destination, keys: &Keys, m: &Manifest) -> bool {
        let have = d.list(&keys.objects()).unwrap();
        m.piece().chunks.iter().enumerate().all(|(c, refs)| {
            refs.iter()
                .all(|&r| have.contains(&keys.object(c as u64, r)))
        })
    }

    /// `stripe` in ranges of one chunk over two members: chunk 0's objects
    /// at a, chunk 1's at b, a manifest at each saying which it is; a
    /// restore needs both and reads each object where it lives; a new
    /// layout (the members swapped) first copies each member the older
    /// objects of its new ranges.
    #[test]
    fn stripe_spreads_chunks_by_range_and_a_restore_reads_each_where_it_lives() {
        let dir = tempfile::tempdir().unwrap();
        let fa = Faulty::new(&dir.path().join("a"), Duration::ZERO);
        let fb = Faulty::new(&dir.path().join("b"), Duration::ZERO);
        let (a, b): (Arc<dyn Destination>, Arc<dyn Destination>) = (fa.clone(), fb.clone());
        let keys = Keys::new("vol").unwrap();
        let c = Copies::stripe(vec![a.clone(), b.clone()], keys.clone(), 0);
        assert!(c.url().starts_with("stripe("));
        assert_eq!(
            c.object_copies(),
            a.object_copies(),
            "each object at one member"
        );
        let Written {
            images,
            mut image,
            base,
            last,
        } = write_three(&c, &keys);
        let objects = |d: &Arc<dyn Destination>| -> Vec<u64> {
            let mut v: Vec<u64> = d
                .list(&keys.objects())
                .unwrap()
                .iter()
                .filter_map(|k| keys.chunk_of(k))
                .collect();
            v.dedup();
            v
        };
        assert_eq!(objects(&a), [0]);
        assert_eq!(objects(&b), [1]);
        for (i, d) in [&a, &b].into_iter().enumerate() {
            assert_eq!(
                keys.snapshot_ids(&d.list(&keys.manifests()).unwrap()),
                [1, 2, 3]
            );
            let m = read_manifest(d.as_ref(), &keys, 3).unwrap();
            assert_eq!(m.stripe.map(|s| (s.members, s.index)), Some((2, i as u8)));
            assert_eq!(Manifest { stripe: None, ..m }, last);
        }

        // One member alone is not the snapshot: a clear error, and its
        // piece is the restore's missing half.
        let alone = Copies::new(vec![a.clone()]);
        let at_a = read_manifest(a.as_ref(), &keys, 3).unwrap();
        let err = alone.route_stripe(&keys, &at_a).unwrap_err().to_string();
        assert!(
            err.contains("striped over 2 destinations") && err.contains("piece 2"),
            "{err}"
        );
        // Both, in the other order: every object read where it lives,
        // none asked of the member without it.
        let both = Copies::new(vec![b.clone(), a.clone()]);
        let m = read_manifest(&both, &keys, 3).unwrap();
        both.route_stripe(&keys, &m).unwrap();
        let gets = fa.gets() + fb.gets();
        both.route_stripe(&keys, &m).unwrap();
        assert_eq!(
            fa.gets() + fb.gets(),
            gets,
            "a route learned is not asked again"
        );
        let out = dir.path().join("r3");
        restore_image(&both, &keys, &m, &out, 2, |_, _| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == images[2]);
        assert_eq!(fa.gets() + fb.gets() - gets, 4, "one read per object");

        // The members swapped: snapshot 4 finds each one's new ranges
        // copied to it before its manifest, and restores from both.
        let swapped = Copies::stripe(vec![b.clone(), a.clone()], keys.clone(), 0);
        let w = SnapshotWriter::new(&swapped, &keys, &base, Some(&last), 4, 4, Codec::Zstd(1));
        let at = MIB + 4 * 4096;
        image[at..at + 4096].fill(4);
        w.put_delta(1, &[(4, &image[at..at + 4096])]).unwrap();
        let m4 = w.commit().unwrap();
        assert_eq!(objects(&a), [0, 1]);
        assert_eq!(objects(&b), [0, 1]);
        for d in [&a, &b] {
            let theirs = read_manifest(d.as_ref(), &keys, 4).unwrap();
            assert!(holds_piece(d.as_ref(), &keys, &theirs), "{}", d.url());
        }
        let both = Copies::new(vec![a.clone(), b.clone()]);
        both.route_stripe(&keys, &m4).unwrap();
        let out = dir.path().join("r4");
        restore_image(&both, &keys, &m4, &out, 2, |_, _| {}).unwrap();
        assert!(std::fs::read(&out).unwrap() == image);

        // Back to the first layout, with snapshot 4's delta lost: b
        // cannot be given it, so snapshot 5's manifest is written nowhere
        // (DESIGN.md, invariant 4).
        for d in [&a, &b] {
            d.delete(&keys.object(1, ObjectRef::own(4, ObjectKind::Delta)))
                .unwrap();
        }
        let w = SnapshotWriter::new(&c, &keys, &base, Some(&m4), 5, 5, Codec::Zstd(1));
        w.put_delta(0, &[(5, &image[5 * 4096..6 * 4096])]).unwrap();
        let err = w.commit().unwrap_err().to_string();
        assert!(err.contains("0000000004.delta"), "{err}");
        for d in [&a, &b] {
            assert_eq!(
                keys.snapshot_ids(&d.list(&keys.manifests()).unwrap()),
                [1, 2, 3, 4]
            );
        }
    }

    /// Restore through a mirror whose preferred copy lost an object and
    /// has another damaged: the other copy serves them.
    #[test]
    fn restore_through_copies_passes_over_lost_and_damaged_objects() {
        let dir = tempfile::tempdir().unwrap();
        let a = Faulty::new(&dir.path().join("a"), Duration::ZERO);
        let b = Faulty::new(&dir.path().join("b"), Duration::ZERO);
        let c = Copies::new(vec![a.clone(), b.clone()]);
        let keys = Keys::new("vol").unwrap();
        let vol = 3 * MIB as u64;
        let image: Vec<u8> = (0..vol as usize).map(|i| (i % 241) as u8).collect();
        let base = base(vol, 7);
        let w = SnapshotWriter::new(&c, &keys, &base, None, 1, 1, Codec::Zstd(1));
        for i in 0..3 {
            w.put_chunk(i as u64, &image[i * MIB..(i + 1) * MIB])
                .unwrap();
        }
        let m = w.commit().unwrap();
        let k0 = keys.object(0, ObjectRef::own(1, ObjectKind::Chunk));
        let k1 = keys.object(1, ObjectRef::own(1, ObjectKind::Chunk));
        a.inner.delete(&k0).unwrap();
        let p = dir.path().join("a").join(&k1);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[100] ^= 0x10;
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let out = dir.path().join("out");
        restore_image(&c, &keys, &m, &out, 1, |_, _| {}).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), image);
        assert!(b.gets() >= 2, "b served what a lacks");
    }
}
