//! Destinations on the command line: `--dest URL`, the uploader of `serve`
//! and `backup`, `snapshots`, `restore` and `verify`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use foresnap_driver::hydrate::{ChunkSource, Hydration};
use foresnap_driver::tracking::Tracker;
use foresnap_uploader::copies::Copies;
use foresnap_uploader::dest::{DestError, Destination, DirDestination};
use foresnap_uploader::engine::early::run_scheduler;
use foresnap_uploader::engine::{
    Deadlines, Early, UploadHealth, UploadReport, Uploader, latest_manifest,
};
use foresnap_uploader::format::{Codec, Keys, Manifest};
use foresnap_uploader::link::Link;
use foresnap_uploader::plan::{PlanConfig, Planner};
use foresnap_uploader::restore::{
    SnapshotError, list_snapshots, read_chunk, read_manifest, restore_image, verify_snapshots,
};
use foresnap_uploader::retention::{PruneHealth, Retention, prune_after_uploads};
use foresnap_uploader::s3::{S3Credentials, S3Destination, S3Url};
use foresnap_uploader::schedule::{Schedule, Zone};
use foresnap_uploader::seal::{self, Sealed, VolumeKey};

use crate::cli::{
    BackupArgs, DestArgs, DestPolicy, RestoreArgs, ScheduleArgs, Snapshot, UploadArgs, VerifyArgs,
};

/// The destination at `url` as it is, unsealed; an `s3://` one signs with
/// `creds`, or the standard AWS chain's key when `None`.
pub fn open_raw(url: &str, creds: Option<S3Credentials>) -> anyhow::Result<Arc<dyn Destination>> {
    Ok(if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("invalid destination {url:?}: file:// wants an absolute path, as file:///backup");
        }
        Arc::new(DirDestination::open(Path::new(path))?)
    } else if url.starts_with("s3://") {
        let u = S3Url::parse(url).map_err(anyhow::Error::msg)?;
        Arc::new(S3Destination::open_with(u, creds)?)
    } else {
        bail!(
            "invalid destination {url:?}: use file:///PATH or s3://BUCKET/PREFIX?endpoint=URL&region=R"
        )
    })
}

/// Opens a destination from its URL for the volume `keys` names, and
/// checks that `key` (or none) fits what the volume stores there
/// ([`seal::check_volume`]); with a key, the volume's objects are sealed
/// and opened on their way ([`Sealed`]).
pub fn open_dest(
    url: &str,
    keys: &Keys,
    key: Option<&Arc<VolumeKey>>,
) -> anyhow::Result<Arc<dyn Destination>> {
    let raw = open_raw(url, None)?;
    seal::check_volume(raw.as_ref(), keys, key.map(Arc::as_ref))?;
    Ok(match key {
        Some(k) => Arc::new(Sealed::new(raw, k.clone())),
        None => raw,
    })
}

/// Opens each of `urls` (all of them now: a bad URL, an unreachable store
/// or a key that does not fit fails before anything runs).
pub fn open_all(
    urls: &[String],
    keys: &Keys,
    key: Option<&Arc<VolumeKey>>,
) -> anyhow::Result<Vec<Arc<dyn Destination>>> {
    let mut seen = std::collections::BTreeSet::new();
    urls.iter()
        .map(|u| {
            if !seen.insert(u.as_str()) {
                bail!("destination {u:?} is given twice");
            }
            open_dest(u, keys, key)
        })
        .collect()
}

/// The `mirror` policy's destination: every member first holds the newest
/// snapshot of the volume that any member holds, so that the next one,
/// a delta over it, is complete at each.
fn mirror(
    urls: &[String],
    keys: &Keys,
    key: Option<&Arc<VolumeKey>>,
) -> anyhow::Result<Arc<dyn Destination>> {
    if urls.len() < 2 {
        bail!("--dest-policy mirror needs two or more --dest");
    }
    let copies = Copies::new(open_all(urls, keys, key)?);
    for (i, d) in copies.members().enumerate() {
        let url = d.url();
        let copied = copies
            .catch_up(
                i,
                keys,
                progress(format!("copying the newest snapshot to {url}")),
            )
            .with_context(|| format!("bringing {url} up to date for the mirror"))?;
        if let Some((id, objects)) = copied {
            log::info!(
                "{url}: now holds snapshot {id} of volume {} ({objects} objects copied)",
                keys.name()
            );
        }
    }
    Ok(Arc::new(copies))
}

/// A stripe's range when none is given: 16 MiB, four default chunks.
const DEFAULT_STRIPE_RANGE: u64 = 16 << 20;

/// The `stripe` policy's destination: ranges of `--stripe-range` bytes in
/// chunks of the size the volume has at its destinations (or the size
/// asked for, for a new volume).
fn stripe(
    args: &UploadArgs,
    keys: &Keys,
    key: Option<&Arc<VolumeKey>>,
) -> anyhow::Result<Arc<dyn Destination>> {
    if !(2..=255).contains(&args.dest.len()) {
        bail!(
            "--dest-policy stripe needs 2 to 255 --dest ({} given)",
            args.dest.len()
        );
    }
    let members = open_all(&args.dest, keys, key)?;
    let chunk = match latest_manifest(&Copies::new(members.clone()), keys, u32::MAX)? {
        Some(m) => m.chunk_bytes,
        None => args.chunk_size,
    };
    let range = args.stripe_range.unwrap_or(DEFAULT_STRIPE_RANGE);
    if range < u64::from(chunk) {
        bail!(
            "--stripe-range {range} is below the volume's chunk size ({chunk} bytes): \
             give a range of one chunk or more"
        );
    }
    let log2 = (range / u64::from(chunk)).trailing_zeros();
    let log2 = u8::try_from(log2)
        .ok()
        .filter(|&l| l <= foresnap_uploader::format::MAX_STRIPE_RANGE_LOG2)
        .with_context(|| format!("--stripe-range {range}: too many chunks per range"))?;
    Ok(Arc::new(Copies::stripe(members, keys.clone(), log2)))
}

/// The volume name: given, or the backing file's name.
pub fn volume_keys(name: Option<&str>, backing: &Path) -> anyhow::Result<Keys> {
    let name = match name {
        Some(n) => n.to_owned(),
        None => backing
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the backing has no file name: give --volume NAME")?,
    };
    Keys::new(&name).map_err(anyhow::Error::msg)
}

/// A volume's upload set-up, checked before any device exists.
#[derive(Debug)]
pub struct UploadPlan {
    dest: Arc<dyn Destination>,
    keys: Keys,
    chunk_bytes: u32,
    max_deltas: usize,
    workers: usize,
    memory_bytes: u64,
    /// The destination behind its bandwidth cap and throughput sampler
    /// (with a schedule or a cap): `dest` is this link.
    link: Option<Arc<Link>>,
    scheduled: Option<Scheduled>,
    /// `--keep-*`: the policy and each destination on its own.
    prune: Option<(Retention, Vec<Arc<dyn Destination>>)>,
    /// `--dest-policy price`: its forecasts.
    priced: Option<Arc<Copies>>,
}

/// `serve --keep-*` prunes at most this often.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Scheduled snapshots and their predictive upload.
#[derive(Debug)]
struct Scheduled {
    schedule: Schedule,
    zone: Zone,
    plan: PlanConfig,
}

/// Opens the destinations of `args` (all of them, so that a bad URL or
/// unreachable store fails now); `None` without `--dest`. `sched`: the
/// schedule and upload policy of a served volume.
pub fn prepare(
    args: &UploadArgs,
    sched: Option<&ScheduleArgs>,
    backing: &Path,
) -> anyhow::Result<Option<UploadPlan>> {
    let Some(first) = args.dest.first() else {
        if args.keep.retention().is_some() {
            bail!("--keep-* rules prune destinations: give a --dest too");
        }
        return Ok(None);
    };
    let keys = volume_keys(args.volume.as_deref(), backing)?;
    let key = args.key.load()?;
    let key = key.as_ref();
    let scheduled = match sched.and_then(|s| s.schedule().map(|sc| (s, sc))) {
        Some((s, schedule)) => Some(Scheduled {
            schedule: schedule.clone(),
            zone: if s.utc { Zone::Utc } else { Zone::Local },
            plan: s.plan.config(s.policy).map_err(anyhow::Error::msg)?,
        }),
        None => None,
    };
    let cap = sched.and_then(|s| s.upload_cap.clone());
    let mut priced = None;
    let mut dest = match args.dest_policy {
        DestPolicy::Single => {
            if args.dest.len() > 1 {
                bail!(
                    "{} destinations given with --dest-policy single: give one --dest, or \
                     --dest-policy mirror to keep every snapshot at each",
                    args.dest.len()
                );
            }
            open_dest(first, &keys, key)?
        }
        DestPolicy::Mirror => mirror(&args.dest, &keys, key)?,
        DestPolicy::Alternate => {
            if args.dest.len() < 2 {
                bail!("--dest-policy alternate needs two or more --dest");
            }
            Arc::new(Copies::alternate(
                open_all(&args.dest, &keys, key)?,
                keys.clone(),
            ))
        }
        DestPolicy::Price => {
            if args.dest.len() < 2 || args.price.len() != args.dest.len() {
                bail!(
                    "--dest-policy price needs two or more --dest and one --price for each,                      in the same order ({} --dest, {} --price)",
                    args.dest.len(),
                    args.price.len()
                );
            }
            let c = Arc::new(Copies::price(
                open_all(&args.dest, &keys, key)?,
                keys.clone(),
                args.price.clone(),
                args.restores_per_month,
            ));
            priced = Some(c.clone());
            c
        }
        DestPolicy::Stripe => stripe(args, &keys, key)?,
    };
    if args.dest_policy != DestPolicy::Stripe && args.stripe_range.is_some() {
        bail!("--stripe-range is for --dest-policy stripe");
    }
    if args.dest_policy != DestPolicy::Price && !args.price.is_empty() {
        bail!("--price is for --dest-policy price");
    }
    let link =
        (scheduled.is_some() || cap.is_some()).then(|| Arc::new(Link::new(dest.clone(), cap)));
    if let Some(l) = &link {
        dest = l.clone();
    }
    let copies = dest.object_copies();
    let need = foresnap_uploader::engine::worker_memory(args.chunk_size, copies);
    if args.upload_memory < need {
        bail!(
            "--upload-memory {} is below what one upload worker needs with --chunk-size {} \
             at {} ({need} bytes: {} chunks)",
            args.upload_memory,
            args.chunk_size,
            dest.url(),
            foresnap_uploader::engine::worker_chunks(copies)
        );
    }
    let prune = match args.keep.retention() {
        Some(policy) => Some((policy, open_all(&args.dest, &keys, key)?)),
        None => None,
    };
    Ok(Some(UploadPlan {
        dest,
        keys,
        chunk_bytes: args.chunk_size,
        max_deltas: usize::from(args.max_deltas),
        workers: args.upload_workers,
        memory_bytes: args.upload_memory,
        link,
        scheduled,
        prune,
        priced,
    }))
}

/// The uploader of a served volume, as `status` sees it.
#[derive(Debug, Clone)]
pub struct UploadView {
    pub dest: String,
    /// With a schedule: the planner and the snapshots' lags.
    pub deadlines: Option<Arc<Deadlines>>,
    pub health: Arc<UploadHealth>,
    /// With `--keep-*`: the pruner's standing.
    pub prune: Option<Arc<PruneHealth>>,
    /// With `--dest-policy price`: the destinations and their forecasts.
    pub priced: Option<Arc<Copies>>,
}

impl UploadPlan {
    fn uploader(&self, tracker: Arc<Tracker>) -> anyhow::Result<Uploader> {
        let url = self.dest.url();
        Uploader::new(
            tracker,
            self.dest.clone(),
            self.keys.clone(),
            self.chunk_bytes,
            Codec::Zstd(1),
        )
        .and_then(|u| {
            u.with_max_deltas(self.max_deltas)
                .with_pool(self.workers, self.memory_bytes)
        })
        .with_context(|| format!("destination {url}"))
    }

    /// For the log: what `up` does.
    fn describe(&self, up: &Uploader) -> String {
        format!(
            "uploading snapshots of volume {} to {} ({} workers, buffers bounded by {} bytes)",
            self.keys.name(),
            self.dest.url(),
            up.workers(),
            self.memory_bytes
        )
    }

    /// Starts the uploader thread of `serve`, and with a schedule the
    /// scheduler thread that closes the epochs. They run until the
    /// process ends (`stop` lets the uploader finish its current
    /// snapshot's objects first). Returns what the control socket reports
    /// of them.
    pub fn start(self, tracker: Arc<Tracker>, stop: Arc<AtomicBool>) -> anyhow::Result<UploadView> {
        let mut up = self.uploader(tracker.clone())?;
        log::info!("{}", self.describe(&up));
        let mut deadlines = None;
        if let Some(s) = self.scheduled {
            let d = Arc::new(Deadlines::new());
            // Also at-close: its planner never starts before the close,
            // but it reports D, B and each snapshot's lag.
            let link = self.link.clone();
            let rate = Box::new(move || link.as_ref().and_then(|l| l.rate()));
            let planner = Planner::new(tracker.map(), s.plan);
            up = up.with_early(Early::new(planner, d.clone(), rate));
            log::info!(
                "snapshots on schedule '{}' ({}), upload policy {} (K {}, L {} s, PT {})",
                s.schedule,
                if s.schedule.interval().is_some() {
                    "aligned to UTC"
                } else if s.zone == Zone::Utc {
                    "UTC"
                } else {
                    "local time"
                },
                s.plan.policy,
                s.plan.k,
                s.plan.l_s,
                s.plan.pt
            );
            let (t, dl, stop) = (tracker.clone(), d.clone(), stop.clone());
            std::thread::Builder::new()
                .name("scheduler".into())
                .spawn(move || run_scheduler(&s.schedule, s.zone, &t, &dl, &stop))
                .context("cannot start the scheduler thread")?;
            deadlines = Some(d);
        }
        let health = Arc::new(UploadHealth::default());
        let mut prune = None;
        if let Some((policy, members)) = self.prune {
            log::info!(
                "pruning volume {} at each destination after uploads ({policy:?}), at most \
                 every {} s",
                self.keys.name(),
                PRUNE_EVERY.as_secs()
            );
            let (h, stop, keys) = (health.clone(), stop.clone(), self.keys.clone());
            let standing = Arc::new(PruneHealth::default());
            let st = standing.clone();
            std::thread::Builder::new()
                .name("pruner".into())
                .spawn(move || {
                    prune_after_uploads(&members, &keys, &policy, &h, PRUNE_EVERY, &stop, &st);
                })
                .context("cannot start the pruner thread")?;
            prune = Some(standing);
        }
        let h = health.clone();
        std::thread::Builder::new()
            .name("uploader".into())
            .spawn(move || up.run_reporting(&stop, &h))
            .context("cannot start the uploader thread")?;
        Ok(UploadView {
            dest: self.dest.url(),
            deadlines,
            health,
            prune,
            priced: self.priced.clone(),
        })
    }
}

/// Progress on stderr: a line redrawn in place on a terminal, every 10%
/// otherwise (logs stay short).
pub fn progress(what: String) -> impl FnMut(u64, u64) + Send {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last = u64::MAX;
    move |done, total| {
        let pct = done * 100 / total.max(1);
        let step = if tty { pct } else { pct / 10 };
        if step != last || done == total {
            last = step;
            let secs = started.elapsed().as_secs_f64();
            let end = if done == total { "\n" } else { "" };
            let line = format!("foresnap: {what}: {pct:3}% ({done}/{total}) {secs:.1} s");
            if tty {
                eprint!("\r{line}{end}");
            } else {
                eprintln!("{line}");
            }
        }
    }
}

/// `foresnap backup`: snapshot and upload a volume that is not served.
pub fn backup(args: &BackupArgs) -> anyhow::Result<()> {
    let plan = prepare(&args.upload, None, &args.backing)?
        .context("backup needs a destination: give --dest URL")?;
    let cfg = args.device_config();
    let backing = foresnap_driver::backing::Backing::open(&cfg)?;
    let (tracker, report) = foresnap_driver::device::open_tracker(&cfg, &backing)?
        .context("backup needs change tracking")?;
    let tracker = Arc::new(tracker);
    if report.existing_blocks > 0 {
        eprintln!(
            "foresnap: new ring {}: the backing's {} blocks of data go into the first snapshot",
            tracker.ring_path().display(),
            report.existing_blocks
        );
    }
    let closed = tracker.close()?;
    eprintln!(
        "foresnap: closed snapshot {} ({} changed blocks)",
        closed.epoch, closed.blocks
    );
    type Bar = Box<dyn FnMut(u64, u64) + Send>;
    let mut up = plan.uploader(tracker.clone())?.with_progress({
        let mut bar: Option<(u32, Bar)> = None;
        move |snapshot, done, total| {
            if bar.as_ref().is_none_or(|(s, _)| *s != snapshot) {
                let f = progress(format!("uploading snapshot {snapshot} (tracking blocks)"));
                bar = Some((snapshot, Box::new(f)));
            }
            if let Some((_, f)) = &mut bar {
                f(done, total);
            }
        }
    });
    eprintln!("foresnap: {}", plan.describe(&up));
    let mut out = std::io::stdout().lock();
    while let Some(r) = up.upload_next()? {
        print_report(&mut out, &r, &plan.dest.url())?;
    }
    if let Some(lines) = plan.priced.as_deref().and_then(price_lines) {
        for l in lines {
            writeln!(out, "{l}")?;
        }
    }
    drop(out);
    if let Some((policy, members)) = &plan.prune {
        crate::prune::apply(members, &plan.keys, policy, false)?;
    }
    Ok(())
}

/// `--dest-policy price`: a line per destination with its forecast monthly
/// cost, the one the next snapshot goes to marked.
pub fn price_lines(c: &Copies) -> Option<Vec<String>> {
    let (each, next) = c.price_forecast()?;
    Some(
        each.iter()
            .enumerate()
            .map(|(i, (url, f))| {
                let mark = if i == next { "  <- next snapshot" } else { "" };
                format!("forecast at {url}: {f}{mark}")
            })
            .collect(),
    )
}

fn print_report(out: &mut impl Write, r: &UploadReport, url: &str) -> std::io::Result<()> {
    let secs = r.elapsed.as_secs_f64();
    writeln!(
        out,
        "snapshot {} uploaded to {url}: {} blocks, {} objects stored, {} already there, \
         {} chains compacted, {} bytes in {secs:.2} s ({:.1} MiB/s)",
        r.snapshot,
        r.blocks,
        r.objects_stored,
        r.objects_reused,
        r.compacted,
        r.bytes_sent,
        r.bytes_sent as f64 / (1 << 20) as f64 / secs.max(1e-9)
    )?;
    out.flush()
}

/// `foresnap snapshots`: with several destinations, each snapshot's line
/// ends with where it is complete (its manifest is there: DESIGN.md,
/// invariant 4) and where it is not.
pub fn snapshots(args: &DestArgs) -> anyhow::Result<()> {
    let rows = stored_snapshots(args)?;
    if rows.is_empty() {
        eprintln!(
            "foresnap: no snapshot of volume {} at {}",
            args.volume,
            args.dest.join(", ")
        );
    }
    let mut out = std::io::stdout().lock();
    let mut damaged = 0;
    for r in &rows {
        if let Some(why) = r["damaged"].as_str() {
            // A manifest that is there but damaged: that snapshot is not
            // complete (it cannot be restored); the others are still listed.
            out.flush()?;
            eprintln!(
                "foresnap: snapshot {} is not complete: {why}",
                r["snapshot"]
            );
            damaged += 1;
            continue;
        }
        write!(
            out,
            "snapshot {}  parent {}  closed at {} ms  {} bytes  {} chunks stored  {} object references",
            r["snapshot"],
            r["parent"],
            r["closed_ms"],
            r["volume_bytes"],
            r["chunks_stored"],
            r["objects"]
        )?;
        let urls = |k: &str| {
            r[k].as_array()
                .into_iter()
                .flatten()
                .filter_map(|u| u.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(pieces) = r["stripe"]["pieces"].as_array() {
            let missing: Vec<String> = (1..=pieces.len())
                .filter(|&i| pieces[i - 1].is_null())
                .map(|i| i.to_string())
                .collect();
            if missing.is_empty() {
                write!(out, "  complete striped over: {}", urls("complete_at"))?;
            } else {
                write!(
                    out,
                    "  NOT COMPLETE: striped over {} destinations, piece {} at none of those given",
                    pieces.len(),
                    missing.join(", ")
                )?;
            }
        } else if args.dest.len() > 1 {
            write!(out, "  complete at: {}", urls("complete_at"))?;
            let missing = urls("missing_at");
            if !missing.is_empty() {
                write!(out, "  not at: {missing}")?;
            }
        }
        writeln!(out)?;
    }
    if damaged > 0 {
        bail!(
            "{damaged} snapshot manifests of volume {} are damaged (above): those snapshots \
             cannot be restored",
            args.volume
        );
    }
    Ok(())
}

/// The snapshots of `args.volume` at its destinations, oldest first: each
/// with its manifest's figures and the destinations where it is complete
/// (`complete_at`) and not (`missing_at`; unreachable ones in neither), or
/// `damaged` and why. Also the daemon's `GET /v1/volumes/NAME/snapshots`.
pub fn stored_snapshots(args: &DestArgs) -> anyhow::Result<Vec<serde_json::Value>> {
    let keys = Keys::new(&args.volume).map_err(anyhow::Error::msg)?;
    let members = open_all(&args.dest, &keys, args.key.load()?.as_ref())?;
    let mut at: std::collections::BTreeMap<u32, Vec<usize>> = std::collections::BTreeMap::new();
    let mut unreachable = Vec::new();
    for (i, d) in members.iter().enumerate() {
        match list_snapshots(d.as_ref(), &keys) {
            Ok(ids) => ids
                .into_iter()
                .for_each(|id| at.entry(id).or_default().push(i)),
            Err(e) if members.len() > 1 => {
                eprintln!("foresnap: cannot list {}: {e}", d.url());
                unreachable.push(i);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if unreachable.len() == members.len() {
        bail!("no destination of volume {} could be listed", args.volume);
    }
    let urls: Vec<String> = members.iter().map(|d| d.url()).collect();
    let copies: Arc<dyn Destination> = if members.len() == 1 {
        members[0].clone()
    } else {
        Arc::new(Copies::new(members.clone()))
    };
    let mut rows = Vec::with_capacity(at.len());
    for (id, holders) in at {
        let m = match read_manifest(copies.as_ref(), &keys, id) {
            Ok(m) => m,
            Err(e) if manifest_damage(&e).is_some() => {
                rows.push(serde_json::json!({"snapshot": id, "damaged": e.to_string()}));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let list = |f: &dyn Fn(usize) -> bool| {
            (0..members.len())
                .filter(|&i| f(i))
                .map(|i| urls[i].clone())
                .collect::<Vec<_>>()
        };
        // Striped: complete where every piece is, and then at all of
        // those members together.
        let (holders, stripe) = match m.stripe {
            None => (holders, serde_json::Value::Null),
            Some(s) => {
                let pieces = match Copies::new(members.clone()).stripe_pieces(&keys, &m) {
                    Ok(p) => p.unwrap_or_default(),
                    Err(e) => {
                        rows.push(serde_json::json!({"snapshot": id, "damaged": e.to_string()}));
                        continue;
                    }
                };
                let whole = pieces.iter().all(Option::is_some);
                let json = serde_json::json!({
                    "members": s.members,
                    "range_bytes": u64::from(m.chunk_bytes) << s.range_log2,
                    "pieces": pieces.iter().map(|p| p.map(|i| urls[i].clone())).collect::<Vec<_>>(),
                });
                (if whole { holders } else { Vec::new() }, json)
            }
        };
        rows.push(serde_json::json!({
            "snapshot": id,
            "parent": m.parent,
            "closed_ms": m.closed_ms,
            "volume_bytes": m.volume_bytes,
            "chunks_stored": m.chunks.iter().filter(|c| !c.is_empty()).count(),
            "objects": m.chunks.iter().map(Vec::len).sum::<usize>(),
            "complete_at": list(&|i| holders.contains(&i)),
            "missing_at": list(&|i| !holders.contains(&i) && !unreachable.contains(&i)),
            "stripe": stripe,
        }));
    }
    Ok(rows)
}

/// The key of a manifest and what is wrong with it, when `e` says that
/// the manifest is damaged (not that the destination cannot be read).
fn manifest_damage(e: &SnapshotError) -> Option<(&str, String)> {
    match e {
        SnapshotError::Format { key, error } => Some((key, error.to_string())),
        SnapshotError::Mismatch { key, why } => Some((key, why.clone())),
        SnapshotError::Dest(DestError::Damaged { key, why, .. }) => Some((key, why.clone())),
        _ => None,
    }
}

/// The manifest of the snapshot `which` names.
fn pick(dest: &dyn Destination, keys: &Keys, which: Snapshot) -> anyhow::Result<Manifest> {
    let id = match which {
        Snapshot::Id(id) => id,
        Snapshot::Latest => *list_snapshots(dest, keys)?
            .last()
            .with_context(|| format!("no snapshot of volume {} at {}", keys.name(), dest.url()))?,
    };
    read_manifest(dest, keys, id)
        .with_context(|| format!("snapshot {id} of volume {}", keys.name()))
}

/// `foresnap restore`: from the one destination, or from copies at
/// several (reads fail over and spread; the figures per copy at the end).
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&args.from.volume).map_err(anyhow::Error::msg)?;
    let members = open_all(&args.from.dest, &keys, args.from.key.load()?.as_ref())?;
    let copies = (members.len() > 1).then(|| Arc::new(Copies::new(members.clone())));
    let dest: Arc<dyn Destination> = match &copies {
        Some(c) => c.clone(),
        None => members[0].clone(),
    };
    let m = pick(dest.as_ref(), &keys, args.snapshot)?;
    // A striped snapshot needs every piece: an error now, naming the
    // missing ones, rather than at the first chunk of one.
    match &copies {
        Some(c) => c.route_stripe(&keys, &m)?,
        None if m.stripe.is_some() => Copies::new(members.clone()).route_stripe(&keys, &m)?,
        None => {}
    }
    if args.lazy {
        return restore_lazy(args, dest, keys, m);
    }
    let id = m.snapshot;
    let started = Instant::now();
    restore_image(
        dest.as_ref(),
        &keys,
        &m,
        &args.to,
        args.workers,
        progress(format!("restoring snapshot {id} (chunks)")),
    )
    .with_context(|| format!("restoring snapshot {id} into {}", args.to.display()))?;
    println!(
        "snapshot {id} restored to {} ({} bytes) in {:.1} s",
        args.to.display(),
        m.volume_bytes,
        started.elapsed().as_secs_f64()
    );
    if let Some(c) = copies {
        for s in c.stats() {
            println!(
                "  read from {}: {} objects, {} errors{}",
                s.url,
                s.reads,
                s.errors,
                s.latency_s
                    .map(|l| format!(", {:.1} ms per object", l * 1e3))
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// A snapshot's chunks, for a lazy restore's hydrator.
struct SnapshotSource {
    dest: Arc<dyn Destination>,
    keys: Keys,
    manifest: Manifest,
}

impl ChunkSource for SnapshotSource {
    fn fetch(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<bool, String> {
        read_chunk(self.dest.as_ref(), &self.keys, &self.manifest, chunk, buf)
            .map_err(|e| e.to_string())
    }
}

/// What a lazy restore's state records of its source: the volume and the
/// snapshot (a resume must restore the same one).
fn lazy_tag(m: &Manifest) -> [u8; 32] {
    let mut tag = [0u8; 32];
    tag[..16].copy_from_slice(&m.volume_id);
    tag[16..20].copy_from_slice(&m.snapshot.to_le_bytes());
    tag[20..24].copy_from_slice(&m.chunk_bytes.to_le_bytes());
    tag
}

/// `foresnap restore --lazy`: the device first, the data as it comes.
fn restore_lazy(
    args: &RestoreArgs,
    dest: Arc<dyn Destination>,
    keys: Keys,
    m: Manifest,
) -> anyhow::Result<()> {
    let to = &args.to;
    // A bad address fails before anything is made.
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    let state = Hydration::state_path(to);
    let mut cfg = foresnap_driver::DeviceConfig::new(to);
    cfg.id = args.id;
    if let Some(q) = args.queues {
        cfg.queues = q;
    }
    let hydration = match (to.exists(), state.exists()) {
        (false, true) => bail!(
            "{} exists but {} does not: remove the state of that restore to start anew",
            state.display(),
            to.display()
        ),
        (true, false) => bail!(
            "{} exists: a lazy restore makes a new file (or resumes one it left, beside its \
             {} state); a finished one is an ordinary volume: serve it",
            to.display(),
            state.display()
        ),
        (true, true) => {
            let (h, tag) = Hydration::open(&state)?;
            if tag != lazy_tag(&m) || h.volume_bytes() != m.volume_bytes {
                bail!(
                    "{} belongs to the restore of another snapshot or volume than snapshot {} \
                     of {}",
                    state.display(),
                    m.snapshot,
                    keys.name()
                );
            }
            let p = h.progress();
            eprintln!(
                "foresnap: resuming the lazy restore of snapshot {} into {}: {} of {} chunks there",
                m.snapshot,
                to.display(),
                p.ready,
                p.chunks
            );
            h
        }
        (false, false) => {
            // The device's checks first, so that bad input leaves nothing.
            cfg.validate()?;
            foresnap_driver::device::ublk_available()?;
            let h = Hydration::create(&state, m.volume_bytes, m.chunk_bytes, lazy_tag(&m))?;
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(to)
                .and_then(|f| f.set_len(m.volume_bytes));
            if let Err(e) = made {
                let _ = std::fs::remove_file(&state);
                return Err(
                    anyhow::Error::new(e).context(format!("cannot create {}", to.display()))
                );
            }
            h
        }
    };
    foresnap_driver::device::check(&cfg)?;
    eprintln!(
        "foresnap: serving snapshot {} of volume {} from {} while it is restored into {}",
        m.snapshot,
        keys.name(),
        dest.url(),
        to.display()
    );
    let lazy = crate::serve::Lazy {
        hydration: Arc::new(hydration),
        source: Arc::new(SnapshotSource {
            dest,
            keys,
            manifest: m,
        }),
        workers: args.workers,
        cap: args.hydrate_cap,
    };
    crate::serve::serve_device(&cfg, None, args.control.clone(), Some(lazy), metrics)
}

/// `foresnap verify`: every copy, each on its own (a damaged object at one
/// copy is damage even when another copy is good).
pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&args.from.volume).map_err(anyhow::Error::msg)?;
    let members = open_all(&args.from.dest, &keys, args.from.key.load()?.as_ref())?;
    let mut bad = Vec::new();
    for d in &members {
        match verify_at(d.as_ref(), &keys, args) {
            Ok(0) => {}
            Ok(n) => bad.push(format!(
                "{}: {n} objects or manifests missing or corrupt (the snapshots that need them cannot be restored from there)",
                d.url()
            )),
            Err(e) if members.len() > 1 => {
                eprintln!("foresnap: {}: {e:#}", d.url());
                bad.push(format!("{}: {e:#}", d.url()));
            }
            Err(e) => return Err(e),
        }
    }
    match bad.len() {
        0 => Ok(()),
        1 if members.len() == 1 => bail!("{}", bad[0]),
        _ => bail!("{}", bad.join("; ")),
    }
}

/// Verifies the snapshots `args` names at `dest`; the number of bad
/// objects and manifests.
fn verify_at(dest: &dyn Destination, keys: &Keys, args: &VerifyArgs) -> anyhow::Result<usize> {
    let mut out = std::io::stdout().lock();
    // A damaged manifest is reported like a damaged object, and the other
    // snapshots are still verified.
    let mut bad_manifests = 0;
    let manifests = match args.snapshot {
        Some(which) => vec![pick(dest, keys, which)?],
        None => {
            let ids = list_snapshots(dest, keys)?;
            if ids.is_empty() {
                bail!(
                    "no snapshot of volume {} at {}",
                    args.from.volume,
                    dest.url()
                );
            }
            let mut manifests = Vec::with_capacity(ids.len());
            for id in ids {
                match read_manifest(dest, keys, id) {
                    Ok(m) => manifests.push(m),
                    Err(e) => {
                        let Some((key, what)) = manifest_damage(&e) else {
                            return Err(anyhow::Error::new(e)
                                .context(format!("snapshot {id} of volume {}", args.from.volume)));
                        };
                        writeln!(out, "BAD {key}: {what} (needed by snapshot {id})")?;
                        bad_manifests += 1;
                    }
                }
            }
            manifests
        }
    };
    // A member of a stripe holds the objects of its ranges only.
    let manifests: Vec<Manifest> = manifests.iter().map(Manifest::piece).collect();
    let started = Instant::now();
    let report = verify_snapshots(
        dest,
        keys,
        &manifests,
        args.workers,
        progress(format!("verifying objects at {}", dest.url())),
    )?;
    let ids: Vec<String> = manifests.iter().map(|m| m.snapshot.to_string()).collect();
    for p in &report.problems {
        let snaps: Vec<String> = p.snapshots.iter().map(u32::to_string).collect();
        writeln!(
            out,
            "BAD {}: {} (needed by snapshot {})",
            p.key,
            p.what,
            snaps.join(", ")
        )?;
    }
    writeln!(
        out,
        "verified snapshot {} of volume {} at {}: {} objects, {} bytes, {} bad, {:.1} s",
        ids.join(", "),
        args.from.volume,
        dest.url(),
        report.objects,
        report.bytes,
        report.problems.len() + bad_manifests,
        started.elapsed().as_secs_f64()
    )?;
    Ok(report.problems.len() + bad_manifests)
}
