//! The S3 destination and the upload engine against real S3 servers on
//! 127.0.0.1: SeaweedFS and s3s-fs, two independent implementations,
//! started by `scripts/lib/s3-server` (binaries from
//! `scripts/install-s3-tools`, which `scripts/test` runs first) and stopped
//! when the test ends. No ublk here: the engine is driven through the
//! tracker's API and the `backup` command, the ublk layer is covered by the
//! VM tests.
//!
//! One test per server runs every scenario on one server start (a start
//! takes seconds); the two servers' tests run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Server, foresnap, pattern, run};
use foresnap_driver::tracking::Geometry;
use foresnap_driver::tracking::tracker::{Tracker, TrackerConfig};
use foresnap_uploader::copies::Copies;
use foresnap_uploader::dest::{DestError, Destination, DirDestination};
use foresnap_uploader::engine::Uploader;
use foresnap_uploader::format::{Codec, Keys};
use foresnap_uploader::price::Price;
use foresnap_uploader::restore::{list_snapshots, read_manifest, restore_image, verify_snapshots};
use foresnap_uploader::s3::{S3Credentials, S3Destination, S3Url};

const MIB: u64 = 1 << 20;

/// A new `size`-byte volume file `vol-NAME` in `dir`, open for writing,
/// with a new tracker (ring `ring-NAME` of `ring_bytes`, one queue).
fn tracked_volume(
    dir: &Path,
    name: &str,
    size: u64,
    ring_bytes: u64,
) -> (Arc<Tracker>, std::fs::File, PathBuf) {
    let vp = dir.join(format!("vol-{name}"));
    let vol = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&vp)
        .unwrap();
    vol.set_len(size).unwrap();
    let cfg = TrackerConfig {
        ring: dir.join(format!("ring-{name}")),
        ring_bytes,
        geometry: Geometry::default(),
    };
    let (t, _) = Tracker::open(&cfg, &vp, size, 1).unwrap();
    (Arc::new(t), vol, vp)
}

/// The destination contract, as the directory destination keeps it:
/// put/get/list/delete, nothing ever overwritten (also a multipart
/// object), a missing key is NotFound, prefixes keep volumes apart;
/// bad credentials and a missing bucket are clear errors at open.
fn contract(s: &Server) {
    let d = s.open("contract");
    let other = s.open("contract-other");
    d.put("a/one", b"first").unwrap();
    assert!(matches!(
        d.put("a/one", b"second"),
        Err(DestError::AlreadyExists { .. })
    ));
    assert_eq!(d.get("a/one").unwrap(), b"first");
    assert!(matches!(d.get("a/none"), Err(DestError::NotFound { .. })));
    d.put("a/two", b"").unwrap();
    d.put("b/three", b"3").unwrap();
    other.put("a/zzz", b"z").unwrap();
    assert_eq!(d.list("a/").unwrap(), vec!["a/one", "a/two"]);
    assert_eq!(d.get("a/two").unwrap(), b"");
    d.delete("a/two").unwrap();
    d.delete("a/two").unwrap();
    assert_eq!(d.list("a/").unwrap(), vec!["a/one"]);

    // Above the multipart threshold: parts, conditional completion.
    let big = pattern(40 * MIB + 12345, 7);
    d.put("big", &big).unwrap();
    assert!(d.get("big").unwrap() == big, "{}: multipart object", s.kind);
    assert!(matches!(
        d.put("big", &big[..20 << 20]),
        Err(DestError::AlreadyExists { .. })
    ));
    assert_eq!(d.get("big").unwrap().len(), big.len());

    let bad = S3Destination::open_with(
        S3Url::parse(&s.url("x")).unwrap(),
        Some(S3Credentials {
            access_key_id: s.creds().access_key_id,
            secret_access_key: "wrong-secret".into(),
        }),
    )
    .unwrap_err();
    assert!(bad.to_string().contains("open bucket"), "{}: {bad}", s.kind);
    let url = s.url("x").replace("s3://foresnap/", "s3://no-such-bucket/");
    let e = S3Destination::open_with(S3Url::parse(&url).unwrap(), Some(s.creds())).unwrap_err();
    assert!(e.to_string().contains("open bucket"), "{}: {e}", s.kind);
}

/// Random writes, close snapshot 1, more writes, close snapshot 2; both
/// uploaded by the worker pool to the server and to a directory; each
/// restores bit-exact from both, and verify finds nothing wrong. Then
/// flipped, truncated and deleted objects at the server: verify names
/// each, restore refuses.
fn snapshots_restore_bit_exact(s: &Server) {
    let dir = tempfile::tempdir().unwrap();
    let size = 24 * MIB + 4096 * 3;
    let keys = Keys::new("engine").unwrap();
    let s3: Arc<dyn Destination> = Arc::new(s.open("e2e"));
    let local: Arc<dyn Destination> =
        Arc::new(DirDestination::open(&dir.path().join("dest")).unwrap());
    // One tracked volume per destination (an epoch is acknowledged by one
    // uploader), both written alike.
    let vols: Vec<(Arc<Tracker>, std::fs::File, PathBuf)> = ["a", "b"]
        .iter()
        .map(|n| tracked_volume(dir.path(), n, size, 1 << 20))
        .collect();
    let write_both = |off: u64, data: &[u8]| {
        for (t, vol, _) in &vols {
            t.write_volume(vol, off, data).unwrap();
        }
    };

    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut images = Vec::new();
    for epoch in 1..=2u64 {
        // Whole chunks in epoch 1; scattered blocks (deltas) in both.
        if epoch == 1 {
            write_both(4 * MIB, &pattern(8 * MIB, 11));
        }
        for _ in 0..200 {
            let block = next(size / 4096);
            let len = (1 + next(4)).min(size / 4096 - block) * 4096;
            write_both(block * 4096, &pattern(len, next(1 << 30)));
        }
        for (t, _, _) in &vols {
            t.close().unwrap();
        }
        let image = std::fs::read(&vols[0].2).unwrap();
        assert!(image == std::fs::read(&vols[1].2).unwrap());
        images.push(image);
    }
    for ((t, _, _), d) in vols.iter().zip([&s3, &local]) {
        let mut up = Uploader::new(t.clone(), d.clone(), keys.clone(), 1 << 20, Codec::Zstd(1))
            .unwrap()
            .with_pool(4, 64 * MIB)
            .unwrap();
        assert_eq!(up.workers(), 4);
        for want in 1..=2 {
            let r = up.upload_next().unwrap().unwrap();
            assert_eq!(r.snapshot, want);
            assert!(r.objects_stored > 0);
        }
        assert!(up.upload_next().unwrap().is_none());
    }
    assert_eq!(list_snapshots(s3.as_ref(), &keys).unwrap(), vec![1, 2]);
    let manifests: Vec<_> = [1, 2]
        .iter()
        .map(|&id| read_manifest(s3.as_ref(), &keys, id).unwrap())
        .collect();
    assert!(
        manifests[1].chunks.iter().any(|c| c.len() > 1),
        "snapshot 2 should hold deltas"
    );
    for (d, name) in [(&s3, "s3"), (&local, "dir")] {
        let manifests: Vec<_> = [1, 2]
            .iter()
            .map(|&id| read_manifest(d.as_ref(), &keys, id).unwrap())
            .collect();
        for (m, want) in manifests.iter().zip(&images) {
            let out = dir.path().join(format!("r-{name}-{}", m.snapshot));
            restore_image(d.as_ref(), &keys, m, &out, 3, |_, _| {}).unwrap();
            assert!(
                &std::fs::read(&out).unwrap() == want,
                "{}: snapshot {} from {name} differs from the image at its close",
                s.kind,
                m.snapshot
            );
        }
        let r = verify_snapshots(d.as_ref(), &keys, &manifests, 4, |_, _| {}).unwrap();
        assert!(r.problems.is_empty(), "{name}: {r:?}");
    }

    // Damage at the server (replacing an object takes a delete: nothing
    // is ever overwritten).
    let objects: Vec<String> = s3
        .list("engine/objects/")
        .unwrap()
        .into_iter()
        .filter(|k| k.ends_with(".chunk") || k.ends_with(".delta"))
        .collect();
    let (flip, cut, gone) = (&objects[0], &objects[1], &objects[2]);
    let mut b = s3.get(flip).unwrap();
    b[70] ^= 0x01;
    s3.delete(flip).unwrap();
    s3.put(flip, &b).unwrap();
    let b = s3.get(cut).unwrap();
    s3.delete(cut).unwrap();
    s3.put(cut, &b[..b.len() / 2]).unwrap();
    s3.delete(gone).unwrap();
    let r = verify_snapshots(s3.as_ref(), &keys, &manifests, 4, |_, _| {}).unwrap();
    let bad: Vec<&str> = r.problems.iter().map(|p| p.key.as_str()).collect();
    let mut want = vec![flip.as_str(), cut.as_str(), gone.as_str()];
    want.sort();
    assert_eq!(bad, want, "{}: {r:?}", s.kind);
    let out = dir.path().join("refused");
    assert!(restore_image(s3.as_ref(), &keys, &manifests[1], &out, 2, |_, _| {}).is_err());
    assert!(!out.exists());
}

/// `foresnap backup` killed with -9 in the middle of its upload: no
/// snapshot is listed; run again, it completes without sending again
/// what is there, and the snapshot restores bit-exact (CLI end to end).
fn backup_killed_mid_upload_resumes(s: &Server) {
    let dir = tempfile::tempdir().unwrap();
    let vp = dir.path().join("vol");
    let image = pattern(64 * MIB, 99);
    std::fs::write(&vp, &image).unwrap();
    let url = s.url("killed");
    let d = s.open("killed");
    // Encrypted: a resumed upload takes over sealed objects.
    let key = dir.path().join("key");
    run(foresnap().arg("keygen").arg("--out").arg(&key));
    let key = key.to_str().unwrap();
    let backup = || {
        let mut c = s.foresnap();
        c.args(["backup", "--volume", "kv", "--chunk-size", "1M"])
            .args(["--upload-workers", "1", "--dest", &url, "--key-file", key])
            .arg("--backing")
            .arg(&vp);
        c
    };
    let mut child = backup()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stored = loop {
        let n = d.list("kv/objects/").unwrap().len();
        if n >= 8 || Instant::now() > deadline {
            break n;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("backup ended ({status}) before it could be killed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap();
    let _ = child.wait();
    assert!((8..64).contains(&stored), "{}: {stored} objects", s.kind);
    assert!(
        d.list("kv/manifests/").unwrap().is_empty(),
        "a half snapshot is listed"
    );
    // A command on the encrypted volume.
    let on_kv = |cmd: &str| {
        let mut c = s.foresnap();
        c.args([cmd, "--volume", "kv", "--dest", &url, "--key-file", key]);
        c
    };
    let listed = run(&mut on_kv("snapshots"));
    assert!(listed.is_empty(), "{listed}");

    let text = run(&mut backup());
    assert!(text.contains("snapshot 1 uploaded"), "{text}");
    let reused: u64 = text
        .split(", ")
        .find_map(|p| p.strip_suffix(" already there"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of objects already there in {text:?}"));
    assert!(reused >= stored as u64 - 1, "{text}");

    let restored = dir.path().join("restored");
    run(on_kv("restore")
        .args(["--snapshot", "latest", "--to"])
        .arg(&restored));
    assert!(std::fs::read(&restored).unwrap() == image);
    run(&mut on_kv("verify"));
    // Nothing at the server is in the clear.
    let sample = &image[4096..4096 + 64];
    for k in d.list("kv/").unwrap() {
        let b = d.get(&k).unwrap();
        assert!(b.starts_with(b"FSNPSEAL"), "{}: {k} is not sealed", s.kind);
        assert!(
            !b.windows(64).any(|w| w == sample),
            "{}: plaintext in {k}",
            s.kind
        );
    }
}

/// Scheduled snapshots with predictive upload on the real clock, through
/// a capped link to the server: a writer keeps writing, a scheduler closes
/// every 3 s, the uploader stores parts before each close (also voided
/// ones, deleted at the server). Once the writer stops, the newest
/// snapshot restores to the volume bit-exact and every snapshot verifies.
fn scheduled_predictive_upload(s: &Server) {
    let dir = tempfile::tempdir().unwrap();
    scheduled_predictive(Arc::new(s.open("sched")), s.kind, dir.path());
}

/// [`scheduled_predictive_upload`] to `dest` (`label` in messages), in
/// `dir`: the volume's path and the newest snapshot's id.
fn scheduled_predictive(dest: Arc<dyn Destination>, label: &str, dir: &Path) -> (PathBuf, u32) {
    use foresnap_uploader::engine::early::run_scheduler;
    use foresnap_uploader::engine::{Deadlines, Early};
    use foresnap_uploader::link::{CapSchedule, Link};
    use foresnap_uploader::plan::{PlanConfig, Planner};
    use foresnap_uploader::schedule::{Schedule, Zone};
    use std::sync::atomic::{AtomicBool, Ordering};

    let size = 32 * MIB;
    let (t, vol, vp) = tracked_volume(dir, "sched", size, 4 << 20);
    let keys = Keys::new("sched").unwrap();
    let link = Arc::new(Link::new(dest, Some(CapSchedule::parse("4MiB/s").unwrap())));
    let deadlines = Arc::new(Deadlines::new());
    let rate_link = link.clone();
    let early = Early::new(
        Planner::new(t.map(), PlanConfig::default()),
        deadlines.clone(),
        Box::new(move || rate_link.rate()),
    );
    let up = Uploader::new(t.clone(), link.clone(), keys.clone(), 1 << 20, Codec::None)
        .unwrap()
        .with_pool(2, 64 << 20)
        .unwrap()
        .with_early(early);
    let stop = Arc::new(AtomicBool::new(false));
    let uploader = {
        let stop = stop.clone();
        std::thread::spawn(move || up.run(&stop))
    };
    let scheduler = {
        let (t, d, stop) = (t.clone(), deadlines.clone(), stop.clone());
        std::thread::spawn(move || {
            let every = Schedule::parse("every 3s").unwrap();
            run_scheduler(&every, Zone::Utc, &t, &d, &stop);
        })
    };
    // About 1 MiB/s of 64 KiB writes for 12 s, a hot 256 KiB among them.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = if x.is_multiple_of(4) {
            (x >> 8) % 4 * 65536
        } else {
            (x >> 8) % (size / 65536) * 65536
        };
        t.write_volume(&vol, off, &pattern(65536, x)).unwrap();
        std::thread::sleep(Duration::from_millis(60));
    }
    // Quiet: the next close takes the final content; wait until it is up.
    let quiet_epoch = t.open_epoch();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !deadlines
        .history()
        .iter()
        .any(|h| h.snapshot >= quiet_epoch)
    {
        assert!(
            Instant::now() < deadline,
            "{}: no snapshot after the load",
            label
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    uploader.join().unwrap();
    scheduler.join().unwrap();
    let (early_bytes, voided) = deadlines.early_bytes();
    let lags: Vec<f64> = deadlines.history().iter().map(|h| h.lag_s()).collect();
    eprintln!(
        "{}: scheduled snapshots' lags {lags:.2?} s; {early_bytes} bytes sent before their closes, {voided} voided",
        label
    );
    assert!(
        early_bytes > 0,
        "{}: nothing was uploaded before a close",
        label
    );
    let ids = list_snapshots(link.as_ref(), &keys).unwrap();
    let newest = *ids.last().unwrap();
    assert!(newest >= quiet_epoch);
    let m = read_manifest(link.as_ref(), &keys, newest).unwrap();
    let out = dir.join("restored");
    restore_image(link.as_ref(), &keys, &m, &out, 4, |_, _| {}).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&vp).unwrap(),
        "{}: the newest snapshot does not restore to the volume",
        label
    );
    let manifests: Vec<_> = ids
        .iter()
        .map(|&id| read_manifest(link.as_ref(), &keys, id).unwrap())
        .collect();
    assert!(
        manifests.iter().any(|m| m.has_parts()),
        "{}: no parts",
        label
    );
    let r = verify_snapshots(link.as_ref(), &keys, &manifests, 4, |_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{}: {:?}", label, r.problems);
    (vp, newest)
}

/// Replication under predictive upload (issue 6, item 4): `replicate
/// --follow` beside a scheduled uploader that stores parts before each
/// close fetches them ahead, applies each snapshot as it completes, and
/// ends equal to the volume. A directory destination: no server needed.
#[test]
fn a_replica_fetches_parts_ahead_of_each_close() {
    let dir = tempfile::tempdir().unwrap();
    let dest_dir = dir.path().join("dest");
    let dest: Arc<dyn Destination> = Arc::new(DirDestination::open(&dest_dir).unwrap());
    let replica = dir.path().join("replica.img");
    let mut follower = foresnap()
        .args([
            "replicate",
            "--volume",
            "sched",
            "--follow",
            "--poll",
            "300ms",
        ])
        .arg("--dest")
        .arg(format!("file://{}", dest_dir.display()))
        .arg("--to")
        .arg(&replica)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = common::stdout_lines(&mut follower);
    let (vp, newest) = scheduled_predictive(dest, "dir", dir.path());
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !lines
        .iter()
        .any(|l: &String| l.contains(&format!(" at snapshot {newest}: ")))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => panic!("the replica did not reach snapshot {newest}: {lines:#?}"),
        }
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(follower.id()).unwrap(), libc::SIGTERM) };
    assert!(follower.wait().unwrap().success());
    assert!(
        std::fs::read(&replica).unwrap() == std::fs::read(&vp).unwrap(),
        "the replica is not the volume"
    );
    let ahead: u64 = lines
        .iter()
        .filter_map(|l| {
            l.split(" objects fetched ahead")
                .next()?
                .rsplit(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    eprintln!("replica: {lines:#?}");
    assert!(
        ahead > 0,
        "no part was fetched before its snapshot closed: {lines:#?}"
    );
}

fn all_scenarios(kind: &'static str) {
    let s = Server::start(kind);
    contract(&s);
    snapshots_restore_bit_exact(&s);
    backup_killed_mid_upload_resumes(&s);
    scheduled_predictive_upload(&s);
}

/// How [`engine_over`] spreads snapshots over its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spread {
    /// Every snapshot complete at each member.
    Mirror,
    /// Each snapshot complete at one member, the one priced lowest.
    Price,
    /// Each snapshot's chunks over all members, one 1 MiB chunk per range.
    Stripe,
}

/// A policy over both servers and a directory, through the engine: random
/// writes in two epochs (the second a delta over the first), uploaded
/// once; every snapshot restores bit-exact from every place its manifests
/// say it lives (a mirror: each member alone; `price`: the one member that
/// lists it; a stripe: the three together, in another order), and every
/// member verifies clean (a stripe's member: its piece).
fn engine_over(servers: &[&Server], spread: Spread) {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB + 4096 * 5;
    let name = format!("{spread:?}").to_lowercase();
    let keys = Keys::new(&name).unwrap();
    let mut members: Vec<Arc<dyn Destination>> = servers
        .iter()
        .map(|s| Arc::new(s.open(&name)) as Arc<dyn Destination>)
        .collect();
    members.push(Arc::new(
        DirDestination::open(&dir.path().join("dest")).unwrap(),
    ));
    let copies: Arc<dyn Destination> = Arc::new(match spread {
        Spread::Mirror => Copies::new(members.clone()),
        // The directory's storage is dearest; the first server's PUTs
        // are dearer than the second's.
        Spread::Price => Copies::price(
            members.clone(),
            keys.clone(),
            ["storage=0.01,put=50", "storage=0.02,put=0.001", "storage=5"]
                .map(|p| Price::parse(p).unwrap())
                .to_vec(),
            1.0,
        ),
        Spread::Stripe => Copies::stripe(members.clone(), keys.clone(), 0),
    });
    let (t, vol, vp) = tracked_volume(dir.path(), "m", size, 1 << 20);
    let mut images = Vec::new();
    for epoch in 1..=2u64 {
        if epoch == 1 {
            t.write_volume(&vol, 2 * MIB, &pattern(6 * MIB, 5)).unwrap();
        }
        for i in 0..120u64 {
            let block = (i * 7919 + epoch * 104_729) % (size / 4096 - 2);
            t.write_volume(&vol, block * 4096, &pattern(8192, i + epoch * 1000))
                .unwrap();
        }
        t.close().unwrap();
        images.push(std::fs::read(&vp).unwrap());
    }
    let mut up = Uploader::new(
        t.clone(),
        copies.clone(),
        keys.clone(),
        1 << 20,
        Codec::Zstd(1),
    )
    .unwrap()
    .with_pool(3, 64 * MIB)
    .unwrap();
    for want in 1..=2 {
        assert_eq!(up.upload_next().unwrap().unwrap().snapshot, want);
    }
    let restores = |d: &dyn Destination, id: u32| {
        let m = read_manifest(d, &keys, id).unwrap();
        let out = dir.path().join(format!("r-{id}"));
        restore_image(d, &keys, &m, &out, 3, |_, _| {}).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == images[id as usize - 1],
            "snapshot {id} from {} differs from the image at its close",
            d.url()
        );
        std::fs::remove_file(&out).unwrap();
    };
    let mut listed = Vec::new();
    for d in &members {
        let ids = list_snapshots(d.as_ref(), &keys).unwrap();
        let manifests: Vec<_> = ids
            .iter()
            .map(|&id| read_manifest(d.as_ref(), &keys, id).unwrap().piece())
            .collect();
        let r = verify_snapshots(d.as_ref(), &keys, &manifests, 4, |_, _| {}).unwrap();
        assert!(r.problems.is_empty(), "{}: {r:?}", d.url());
        if spread != Spread::Stripe {
            for &id in &ids {
                restores(d.as_ref(), id);
            }
        }
        listed.push(ids);
    }
    match spread {
        Spread::Mirror | Spread::Stripe => assert_eq!(listed, [[1, 2], [1, 2], [1, 2]]),
        // Snapshot 1 at the cheapest storage; its PUTs then make the
        // second server cheaper.
        Spread::Price => assert_eq!(listed, [vec![1], vec![2], vec![]]),
    }
    if spread == Spread::Stripe {
        let reversed = Copies::new(members.iter().rev().cloned().collect());
        for id in 1..=2 {
            let m = read_manifest(&reversed, &keys, id).unwrap();
            reversed.route_stripe(&keys, &m).unwrap();
            restores(&reversed, id);
        }
        assert!(
            reversed
                .stats()
                .iter()
                .all(|s| s.errors == 0 && s.reads > 0)
        );
    }
}

/// Sends `sig` to a server's process group.
fn signal(s: &Server, sig: i32) {
    let pgid: i32 = s.var("S3_PID").parse().unwrap();
    // SAFETY: kill(2) on a process group this test started; no memory.
    assert_eq!(unsafe { libc::kill(-pgid, sig) }, 0, "kill {sig} {pgid}");
}

/// A CLI restore from the mirror of both servers with `fault` done to one
/// of them once the restore is 10% through: it completes from the other,
/// bit-exact. Returns the restore's report.
fn restore_through(servers: &[&Server], image: &[u8], out: &Path, fault: impl FnOnce()) -> String {
    use std::io::BufRead;
    let mut c = servers[0].foresnap();
    c.args(["restore", "--volume", "big", "--workers", "2", "--to"])
        .arg(out);
    for s in servers {
        c.args(["--dest", &s.url("mirror")]);
    }
    let mut child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let mut log = String::new();
    let mut fault = Some(fault);
    for l in lines.by_ref() {
        let l = l.unwrap();
        log.push_str(&l);
        log.push('\n');
        if l.contains("restoring snapshot") && !l.contains("  0%") {
            if let Some(f) = fault.take() {
                f();
            }
            break;
        }
    }
    for l in lines {
        log.push_str(&l.unwrap());
        log.push('\n');
    }
    let output = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(fault.is_none(), "the restore ended before the fault: {log}");
    assert!(output.status.success(), "restore failed: {log}");
    assert!(
        std::fs::read(out).unwrap() == image,
        "the restored image differs"
    );
    report
}

/// `foresnap backup --dest-policy mirror` to both servers, then restores
/// from the mirror that outlive one server stalling (SIGSTOP) and then
/// dying (SIGKILL) in the middle.
fn mirror_failover(servers: &[&Server]) {
    let dir = tempfile::tempdir().unwrap();
    let vp = dir.path().join("vol");
    let image = pattern(96 * MIB, 31);
    std::fs::write(&vp, &image).unwrap();
    let mut c = servers[0].foresnap();
    c.args([
        "backup",
        "--volume",
        "big",
        "--chunk-size",
        "1M",
        "--dest-policy",
        "mirror",
    ]);
    for s in servers {
        c.args(["--dest", &s.url("mirror")]);
    }
    let text = run(c.arg("--backing").arg(&vp));
    assert!(text.contains("snapshot 1 uploaded to mirror("), "{text}");

    // The faster server (the one most reads go to) stalls, then dies: the
    // reads caught by it count as its errors.
    let errors_at = |report: &str, s: &Server| -> u64 {
        let line = report
            .lines()
            .find(|l| {
                l.starts_with("  read from ") && l.contains(&format!("{}:", s.var("S3_ENDPOINT")))
            })
            .unwrap_or_else(|| panic!("no figures for {} in {report}", s.kind));
        line.split(", ")
            .find_map(|p| p.strip_suffix(" errors")?.parse().ok())
            .unwrap_or_else(|| panic!("no error count in {line}"))
    };
    let faulty = servers[0];
    let report = restore_through(servers, &image, &dir.path().join("stall"), || {
        signal(faulty, libc::SIGSTOP);
    });
    signal(faulty, libc::SIGCONT);
    eprintln!("restore with {} stalled:\n{report}", faulty.kind);
    assert!(
        errors_at(&report, faulty) >= 1,
        "no read caught the stall: {report}"
    );

    let report = restore_through(servers, &image, &dir.path().join("kill"), || {
        signal(faulty, libc::SIGKILL);
    });
    eprintln!("restore with {} killed:\n{report}", faulty.kind);
    assert!(
        errors_at(&report, faulty) >= 1,
        "no read caught the kill: {report}"
    );
}

/// `foresnap backup` of `vp` as `volume` (1 MiB chunks) to every one of
/// `dests` with `--dest-policy POLICY...`: its report.
fn backup_over(s: &Server, vp: &Path, volume: &str, dests: &[String], policy: &[&str]) -> String {
    let mut c = s.foresnap();
    c.args([
        "backup",
        "--volume",
        volume,
        "--chunk-size",
        "1M",
        "--dest-policy",
    ])
    .args(policy);
    for d in dests {
        c.args(["--dest", d]);
    }
    run(c.arg("--backing").arg(vp))
}

/// `foresnap backup --dest-policy alternate` over both servers and a
/// directory, three times: snapshot N is complete at the Nth destination
/// and restores from it alone, bit-exact; `tier` then moves snapshot 1
/// from its server to the directory.
fn alternate_and_tier(servers: &[&Server]) {
    let dir = tempfile::tempdir().unwrap();
    let vp = dir.path().join("vol");
    let image = pattern(8 * MIB, 77);
    std::fs::write(&vp, &image).unwrap();
    let local = format!("file://{}", dir.path().join("dest").display());
    let dests = [servers[0].url("alt"), servers[1].url("alt"), local.clone()];
    for id in 1..=3 {
        let text = backup_over(servers[0], &vp, "alt", &dests, &["alternate"]);
        assert!(
            text.contains(&format!("snapshot {id} uploaded to alternate(")),
            "{text}"
        );
    }
    for (id, d) in (1..=3).zip(&dests) {
        let out = dir.path().join(format!("r{id}"));
        run(servers[0]
            .foresnap()
            .args(["restore", "--volume", "alt", "--snapshot", &id.to_string()])
            .args(["--dest", d, "--to"])
            .arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == image,
            "snapshot {id} from {d}"
        );
        let listed = run(servers[0]
            .foresnap()
            .args(["snapshots", "--volume", "alt", "--dest", d]));
        assert_eq!(listed.lines().count(), 1, "{d}: {listed}");
    }
    // Snapshot 1 (at SeaweedFS) is old next to snapshot 4 there: tier it
    // to the directory. The newest at a destination always stays.
    assert!(
        backup_over(servers[0], &vp, "alt", &dests, &["alternate"]).contains("snapshot 4 uploaded")
    );
    let slow = format!("file://{}", dir.path().join("slow").display());
    let text = run(servers[0].foresnap().args([
        "tier", "--fast", &dests[0], "--slow", &slow, "--volume", "alt", "--age", "0s",
    ]));
    assert!(text.contains("snapshot 1 moved"), "{text}");
    let out = dir.path().join("tiered");
    run(servers[0]
        .foresnap()
        .args([
            "restore",
            "--volume",
            "alt",
            "--snapshot",
            "1",
            "--dest",
            &slow,
            "--to",
        ])
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == image);
    let listed =
        run(servers[0]
            .foresnap()
            .args(["snapshots", "--volume", "alt", "--dest", &dests[0]]));
    assert!(
        listed.starts_with("snapshot 4 ") && listed.lines().count() == 1,
        "{listed}"
    );
}

/// `foresnap backup --dest-policy stripe --stripe-range 1M` over both
/// servers and a directory, twice: chunk c of the 8 at the (c mod 3)th
/// destination; each snapshot lists complete over the three and restores
/// from them (in another order) bit-exact; two of the three are refused,
/// naming the missing piece.
fn stripe_over_three(servers: &[&Server]) {
    let dir = tempfile::tempdir().unwrap();
    let vp = dir.path().join("vol");
    let image = pattern(8 * MIB, 53);
    std::fs::write(&vp, &image).unwrap();
    let local_dir = dir.path().join("dest");
    let local = format!("file://{}", local_dir.display());
    let dests = [servers[0].url("str"), servers[1].url("str"), local.clone()];
    for id in 1..=2 {
        let policy = ["stripe", "--stripe-range", "1M"];
        let text = backup_over(servers[0], &vp, "str", &dests, &policy);
        assert!(
            text.contains(&format!("snapshot {id} uploaded to stripe(")),
            "{text}"
        );
    }
    let mut at_dir: Vec<String> = std::fs::read_dir(local_dir.join("str/objects"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    at_dir.sort();
    assert_eq!(at_dir, ["000000000002", "000000000005"]);
    let mut listing = servers[0].foresnap();
    listing.args(["snapshots", "--volume", "str"]);
    for d in &dests {
        listing.args(["--dest", d]);
    }
    let listed = run(&mut listing);
    // Servers show as `s3://BUCKET/PREFIX at ENDPOINT`.
    let whole = listed
        .lines()
        .filter(|l| {
            l.split("complete striped over: ")
                .nth(1)
                .is_some_and(|over| over.matches(" at http").count() == 2 && over.ends_with(&local))
        })
        .count();
    assert_eq!(whole, 2, "{listed}");
    for id in ["1", "2"] {
        let out = dir.path().join(format!("r{id}"));
        let mut c = servers[0].foresnap();
        c.args(["restore", "--volume", "str", "--snapshot", id]);
        for d in dests.iter().rev() {
            c.args(["--dest", d]);
        }
        let report = run(c.arg("--to").arg(&out));
        assert!(std::fs::read(&out).unwrap() == image, "snapshot {id}");
        assert_eq!(report.matches(", 0 errors").count(), 3, "{report}");
    }
    let out = servers[0]
        .foresnap()
        .args([
            "restore", "--volume", "str", "--dest", &dests[0], "--dest", &dests[2],
        ])
        .arg("--to")
        .arg(dir.path().join("never"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("striped over 3 destinations")
            && err.contains("piece 2"),
        "{err}"
    );
}

/// Both servers at once: the mirror, stripe and price policies through
/// the engine, alternate, tier and stripe through the CLI, and restore
/// failover.
#[test]
fn mirror_over_two_servers() {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| Server::start("seaweedfs"));
        let b = s.spawn(|| Server::start("s3s-fs"));
        (a.join().unwrap(), b.join().unwrap())
    });
    engine_over(&[&a, &b], Spread::Mirror);
    engine_over(&[&a, &b], Spread::Stripe);
    engine_over(&[&a, &b], Spread::Price);
    alternate_and_tier(&[&a, &b]);
    stripe_over_three(&[&a, &b]);
    mirror_failover(&[&a, &b]);
}

#[test]
fn seaweedfs() {
    all_scenarios("seaweedfs");
}

#[test]
fn s3s_fs() {
    all_scenarios("s3s-fs");
}
