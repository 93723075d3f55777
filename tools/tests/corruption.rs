//! Corruption (issue 8, item 4): stored objects and manifests, and the
//! write ring between runs, damaged by bit flips, truncation and deletion.
//! Damage must be detected and reported naming what is damaged, and never
//! restored as data: `verify` names the key and the snapshots that need
//! it, `restore` of such a snapshot fails in one line and leaves no file,
//! every snapshot the damage does not touch still restores bit-exact, and
//! a damaged ring makes the next `backup` refuse (naming the ring) or
//! resynchronise the whole volume, never miss a changed block.
//!
//! Host tests: directory destinations, no ublk. Changes between backups go
//! through the volume's change tracker, as a served device's writes would.
//! Flip positions come from `FORESNAP_CORRUPTION_SEED` (printed). Each test
//! prints a line per case and ends with a `TORTURE corruption-store ...` or
//! `TORTURE corruption-ring ...` line on stderr for the scripts.

mod common;

use std::path::Path;
use std::process::Output;

use common::{foresnap, pattern, run, scratch};
use foresnap_driver::tracking::ring_format::{
    HEADER_BYTES, Header, RECORD_BYTES, Record, RecordKind, recover,
};
use foresnap_driver::tracking::{Geometry, Tracker, TrackerConfig};

const MIB: u64 = 1 << 20;
/// Six 1 MiB chunks.
const VOLUME: u64 = 6 * MIB;
const NAME: &str = "cv";
const BLOCK: u64 = 4096;
/// A small ring (`--ring-size 256K`): records are easy to find.
const RING_BYTES: u64 = 256 << 10;

/// xorshift64, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let seed = std::env::var("FORESNAP_CORRUPTION_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_c0de);
        eprintln!("corruption: seed {seed} (FORESNAP_CORRUPTION_SEED)");
        Rng(seed | 1)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    fn within(&mut self, lo: usize, hi: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        lo + usize::try_from(self.0 % (hi - lo) as u64).expect("small")
    }

    /// Flips a random bit of `bytes[lo..hi]`; says which.
    fn flip(&mut self, bytes: &mut [u8], lo: usize, hi: usize) -> String {
        let (at, bit) = (self.within(lo, hi), self.within(0, 8));
        bytes[at] ^= 1 << bit;
        format!("bit {bit} of byte {at} of {} flipped", bytes.len())
    }
}

/// What the checks found, for the summary line; failures are collected
/// and reported after it.
#[derive(Default)]
struct Tally {
    cases: u64,
    detected: u64,
    restored_as_data: u64,
    failures: Vec<String>,
}

impl Tally {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.failures.push(what());
        }
        ok
    }

    /// Prints the summary line of `suite`, then fails on any failure.
    fn finish(self, suite: &str) {
        eprintln!(
            "TORTURE {suite} cases={} detected={} restored_as_data={}",
            self.cases, self.detected, self.restored_as_data
        );
        assert!(self.failures.is_empty(), "{}", self.failures.join("\n\n"));
        assert_eq!(self.detected, self.cases, "undetected damage");
    }
}

/// `foresnap ARGS`, whatever its exit, logging at its default level.
fn fs(args: &[&str]) -> Output {
    let mut c = foresnap();
    c.env_remove("RUST_LOG").args(args);
    c.output().expect("run foresnap")
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// stderr without progress lines: the messages.
fn messages(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| !l.contains("% ("))
        .map(str::to_owned)
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `foresnap backup` of `img` to the directory `dest`, with ring `ring`.
fn backup(img: &Path, ring: &Path, dest: &Path) -> Output {
    let d = format!("file://{}", s(dest));
    fs(&[
        "backup",
        "--volume",
        NAME,
        "--chunk-size",
        "1M",
        "--dest",
        &d,
        "--backing",
        s(img),
        "--ring",
        s(ring),
        "--ring-size",
        "256K",
    ])
}

/// Writes `(offset, len)` runs of fresh bytes into the volume through its
/// change tracker, as a served device would.
fn change(img: &Path, ring: &Path, writes: &[(u64, u64)], seed: u64) {
    let cfg = TrackerConfig {
        ring: ring.to_owned(),
        ring_bytes: RING_BYTES,
        geometry: Geometry::default(),
    };
    let (t, _) = Tracker::open(&cfg, img, VOLUME, 1).expect("open tracker");
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    for (i, &(off, len)) in writes.iter().enumerate() {
        t.write_volume(&f, off, &pattern(len, seed + i as u64))
            .unwrap();
    }
}

/// Snapshot 1 is full; 2 changes blocks of chunks 1 and 4 (deltas); 3
/// rewrites chunk 2 (a chunk object) and blocks of chunks 4 and 5.
const CHANGES: [&[(u64, u64)]; 2] = [
    &[(MIB + 3 * BLOCK, 2 * BLOCK), (4 * MIB + 10 * BLOCK, BLOCK)],
    &[
        (2 * MIB, MIB),
        (4 * MIB + 20 * BLOCK, BLOCK),
        (5 * MIB, BLOCK),
    ],
];

/// Stored files to damage, with the snapshots that need each.
const TARGETS: [(&str, &[u32]); 5] = [
    // Snapshot 3 rewrote chunk 2 whole: only 1 and 2 need this one.
    ("cv/objects/000000000002/0000000001.chunk", &[1, 2]),
    ("cv/objects/000000000001/0000000002.delta", &[2, 3]),
    ("cv/objects/000000000005/0000000003.delta", &[3]),
    ("cv/manifests/0000000002", &[2]),
    ("cv/manifests/0000000003", &[3]),
];

const DAMAGES: [&str; 7] = [
    "flip-header",
    "flip-middle",
    "flip-tail",
    "truncate-0",
    "truncate-half",
    "truncate-1",
    "delete",
];

/// Applies damage `d` to `path`, whose header is `head` bytes (a flip in
/// the tail hits the last 4 bytes: a manifest's checksum); says what.
fn damage(path: &Path, d: &str, head: usize, rng: &mut Rng) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    let n = bytes.len();
    let what = match d {
        "flip-header" => rng.flip(&mut bytes, 0, head),
        "flip-middle" => rng.flip(&mut bytes, n / 4, 3 * n / 4),
        "flip-tail" => rng.flip(&mut bytes, n - 4, n),
        "delete" => {
            std::fs::remove_file(path).unwrap();
            return "deleted".into();
        }
        _ => {
            let len = match d {
                "truncate-0" => 0,
                "truncate-half" => n / 2,
                _ => n - 1,
            };
            bytes.truncate(len);
            format!("truncated from {n} to {len} bytes")
        }
    };
    std::fs::write(path, bytes).unwrap();
    what
}

/// Every damage to every target, each on a fresh copy of the destination:
/// detected by `verify`, refused by `restore` of the snapshots that need
/// the target, harmless to the others; `snapshots` never lists a snapshot
/// whose manifest is damaged.
#[test]
fn damaged_objects_and_manifests_are_detected_and_never_restored() {
    let dir = scratch();
    let (img, ring, pristine) = (
        dir.path().join("vol.img"),
        dir.path().join("vol.fsring"),
        dir.path().join("pristine"),
    );
    std::fs::write(&img, pattern(VOLUME, 7)).unwrap();
    let mut images = Vec::new();
    for id in 1..=3u32 {
        if id > 1 {
            change(&img, &ring, CHANGES[id as usize - 2], u64::from(id) << 8);
        }
        let out = backup(&img, &ring, &pristine);
        let uploaded = format!("snapshot {id} uploaded");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&uploaded),
            "backup {id}: {}",
            text(&out)
        );
        images.push(std::fs::read(&img).unwrap());
    }
    let mut rng = Rng::seeded();
    let mut tally = Tally::default();
    for ((key, affected), d) in TARGETS
        .iter()
        .flat_map(|t| DAMAGES.iter().map(move |d| (t, *d)))
    {
        let case = dir.path().join(format!("case{}", tally.cases));
        let dest = case.join("dest");
        std::fs::create_dir(&case).unwrap();
        run(std::process::Command::new("cp")
            .arg("-a")
            .arg(&pristine)
            .arg(&dest));
        let is_manifest = key.contains("/manifests/");
        let head = if is_manifest { 72 } else { 64 };
        let how = damage(&dest.join(key), d, head, &mut rng);
        let name = format!("{key} {how} ({d})");
        tally.cases += 1;
        let c = Case {
            key,
            affected,
            deleted_manifest: is_manifest && d == "delete",
            name: &name,
            dest: &format!("file://{}", s(&dest)),
        };
        let detected = c.check(&case, &images, &mut tally);
        tally.detected += u64::from(detected);
        std::fs::remove_dir_all(&case).unwrap();
    }
    tally.finish("corruption-store");
}

/// One damaged copy of the destination.
struct Case<'a> {
    key: &'a str,
    affected: &'a [u32],
    /// By design a snapshot that never completed (DESIGN.md, invariant
    /// 4): only a command that asks for it can tell.
    deleted_manifest: bool,
    name: &'a str,
    dest: &'a str,
}

impl Case<'_> {
    /// The checks; whether the damage was detected: reported, naming the
    /// key and the snapshots, by `verify`, and refused by every restore
    /// that needs it.
    fn check(&self, dir: &Path, images: &[Vec<u8>], tally: &mut Tally) -> bool {
        let (name, key) = (self.name, self.key);
        let from = ["--volume", NAME, "--dest", self.dest];
        let snaps: Vec<String> = self.affected.iter().map(u32::to_string).collect();

        // verify of every snapshot, then of the first one affected.
        let all = fs(&[&["verify"][..], &from].concat());
        let bad = format!("BAD {key}: ");
        let needed = format!("(needed by snapshot {})", snaps.join(", "));
        let named = String::from_utf8_lossy(&all.stdout)
            .lines()
            .any(|l| l.starts_with(&bad) && l.ends_with(&needed));
        let mut detected = tally.check(all.status.success() == self.deleted_manifest, || {
            format!("{name}: verify exit\n{}", text(&all))
        }) && named;
        tally.check(named || self.deleted_manifest, || {
            format!(
                "{name}: verify did not print `{bad}... {needed}`\n{}",
                text(&all)
            )
        });
        let one = fs(&[&["verify", "--snapshot", &snaps[0]][..], &from].concat());
        let one_text = text(&one);
        let named = one_text.contains(key) && one_text.contains(&format!("snapshot {}", snaps[0]));
        detected |= tally.check(!one.status.success() && named, || {
            format!(
                "{name}: verify --snapshot {} did not name the key\n{one_text}",
                snaps[0]
            )
        });

        // restore: refused in one line naming the key, no file left; the
        // snapshots the damage does not touch restore bit-exact.
        let mut refusal = String::new();
        for id in 1..=3u32 {
            let to = dir.join(format!("restored-{id}"));
            let out = fs(&[
                &["restore", "--snapshot", &id.to_string(), "--to", s(&to)][..],
                &from,
            ]
            .concat());
            let msgs = messages(&out);
            if !self.affected.contains(&id) {
                let exact = out.status.success()
                    && std::fs::read(&to).is_ok_and(|b| b == images[id as usize - 1]);
                tally.check(exact, || {
                    format!(
                        "{name}: snapshot {id} does not need it but did not restore bit-exact\n{}",
                        text(&out)
                    )
                });
                continue;
            }
            tally.restored_as_data += u64::from(out.status.success());
            let one_line = msgs.len() == 1
                && msgs[0].starts_with("foresnap: ")
                && msgs[0].contains(key)
                && out.stdout.is_empty();
            detected &= tally.check(!out.status.success() && one_line, || {
                format!(
                    "{name}: restore of snapshot {id} not refused in one line naming the key\n{}",
                    text(&out)
                )
            });
            tally.check(!to.exists(), || {
                format!(
                    "{name}: the refused restore of snapshot {id} left {}",
                    s(&to)
                )
            });
            refusal = msgs.join(" | ");
        }

        // snapshots: never lists a snapshot whose manifest is damaged, and
        // reports a damaged (not deleted) one by its key.
        let out = fs(&[&["snapshots"][..], &from].concat());
        let listed: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("snapshot ")?.split(' ').next()?.parse().ok())
            .collect();
        let manifest = key.contains("/manifests/");
        let want: Vec<u32> = (1..=3)
            .filter(|i| !manifest || !self.affected.contains(i))
            .collect();
        let damaged_manifest = manifest && !self.deleted_manifest;
        let reported = messages(&out).iter().any(|l| l.contains(key));
        tally.check(
            listed == want
                && out.status.success() != damaged_manifest
                && reported == damaged_manifest,
            || {
                format!(
                    "{name}: snapshots listed {listed:?}, want {want:?}, or misreported\n{}",
                    text(&out)
                )
            },
        );
        eprintln!("case {name}: restore: {refusal}");
        detected
    }
}

/// Ring damage between two backups: where (a bit flip), or a truncation.
const RING_DAMAGES: [&str; 13] = [
    "flip-header-field",
    "flip-header-padding",
    "flip-header-checksum",
    "flip-open-write-0",
    "flip-open-write-2",
    "flip-open-write-4",
    "flip-close-1",
    "flip-release",
    "flip-released-write",
    "flip-bitmap-page",
    "truncate-0",
    "truncate-half",
    "truncate-1",
];

/// Applies ring damage `d` (`RING_DAMAGES`) to the ring file; says what.
/// Epoch 1 is uploaded and released; epoch 2 is open, with writes.
fn damage_ring(ring: &Path, d: &str, rng: &mut Rng) -> String {
    let mut bytes = std::fs::read(ring).unwrap();
    let n = bytes.len();
    let h = Header::decode(&bytes[..HEADER_BYTES]).expect("ring header");
    let slots = usize::try_from(h.slots()).unwrap();
    // The byte offset of the `i`th valid record for which `f` holds.
    let record = |i: usize, f: &dyn Fn(&Record) -> bool| {
        let at = (0..slots)
            .map(|s| HEADER_BYTES + s * RECORD_BYTES)
            .filter(|&at| {
                Record::decode(&bytes[at..at + RECORD_BYTES]).is_some_and(|r| {
                    f(&r) && r.seq % slots as u64 == ((at - HEADER_BYTES) / RECORD_BYTES) as u64
                })
            })
            .nth(i)
            .unwrap_or_else(|| panic!("{d}: no such record"));
        (at, at + RECORD_BYTES)
    };
    let write = |r: &Record| matches!(r.kind, RecordKind::Write { .. });
    let (lo, hi) = match d {
        "flip-header-field" => (0, 64),
        "flip-header-padding" => (64, HEADER_BYTES),
        "flip-header-checksum" => (12, 16),
        "flip-close-1" => record(0, &|r| r.epoch == 1 && r.kind == RecordKind::Close),
        "flip-release" => record(0, &|r| matches!(r.kind, RecordKind::Release { .. })),
        "flip-released-write" => record(0, &|r| r.epoch == 1 && write(r)),
        "flip-bitmap-page" => {
            let at = usize::try_from(h.bitmap_offset()).unwrap();
            (at, at + 20)
        }
        _ => match d.strip_prefix("flip-open-write-") {
            Some(i) => record(i.parse().unwrap(), &|r| r.epoch == 2 && write(r)),
            None => {
                let len = match d {
                    "truncate-0" => 0,
                    "truncate-half" => n / 2,
                    _ => n - 1,
                };
                bytes.truncate(len);
                std::fs::write(ring, bytes).unwrap();
                return format!("truncated from {n} to {len} bytes");
            }
        },
    };
    let what = rng.flip(&mut bytes, lo, hi);
    std::fs::write(ring, bytes).unwrap();
    what
}

/// The write ring damaged between two `backup` runs: the next backup
/// refuses, naming the ring, or resyncs: its snapshot restores bit-exact
/// to the image and the one after is incremental again. `trace` refuses
/// naming the ring, or exports exactly the whole write records and says
/// how many records are damaged.
#[test]
fn a_damaged_ring_is_refused_or_resynced_never_trusted() {
    let mut rng = Rng::seeded();
    let mut tally = Tally::default();
    for d in RING_DAMAGES {
        let dir = scratch();
        let path = |n: &str| dir.path().join(n);
        let (img, ring, dest) = (path("vol.img"), path("vol.fsring"), path("dest"));
        let d_url = format!("file://{}", s(&dest));
        let from = ["--volume", NAME, "--dest", d_url.as_str()];
        std::fs::write(&img, pattern(VOLUME, 11)).unwrap();
        let first = backup(&img, &ring, &dest);
        assert!(first.status.success(), "backup 1: {}", text(&first));
        let writes: Vec<(u64, u64)> = (0..6)
            .map(|i| (i * MIB + (7 + 3 * i) * BLOCK, (1 + i % 3) * BLOCK))
            .collect();
        change(&img, &ring, &writes, 99);
        let name = format!("ring {} ({d})", damage_ring(&ring, d, &mut rng));
        let ring_s = s(&ring);
        tally.cases += 1;

        // trace reads the ring as it is.
        let iolog = path("trace.iolog");
        let tr = fs(&["trace", "--ring", ring_s, "--out", s(&iolog)]);
        let traced = if tr.status.success() {
            let bytes = std::fs::read(&ring).unwrap();
            let h = Header::decode(&bytes[..HEADER_BYTES]).unwrap();
            let area = &bytes[HEADER_BYTES..usize::try_from(h.bitmap_offset()).unwrap()];
            let whole = recover(area)
                .records
                .iter()
                .filter(|r| matches!(r.kind, RecordKind::Write { .. }))
                .count();
            let iolog = std::fs::read_to_string(&iolog).unwrap();
            let exported = iolog.lines().filter(|l| l.contains(" write ")).count();
            let record = d.starts_with("flip-") && !d.contains("header") && !d.contains("bitmap");
            let says = String::from_utf8_lossy(&tr.stderr).contains("1 damaged records");
            tally.check(exported == whole && says == record, || {
                format!("{name}: trace exported {exported} of {whole} whole writes, or misreported damage\n{}", text(&tr))
            })
        } else {
            let msgs = messages(&tr);
            tally.check(msgs.len() == 1 && msgs[0].contains(ring_s), || {
                format!(
                    "{name}: trace failed without one line naming the ring\n{}",
                    text(&tr)
                )
            })
        };

        // backup: refused naming the ring, or a full resync.
        let out = backup(&img, &ring, &dest);
        let msgs = messages(&out);
        let named = msgs.iter().any(|l| l.contains(ring_s));
        let restores_to_image = |n: u32| {
            let to = path(&format!("restored-{n}"));
            let r = fs(&[&["restore", "--to", s(&to)][..], &from].concat());
            let exact = r.status.success() && std::fs::read(&to).ok() == std::fs::read(&img).ok();
            (exact, text(&r))
        };
        let backed_up = if out.status.success() {
            let (exact, r_text) = restores_to_image(1);
            tally.restored_as_data += u64::from(!exact);
            // The damage is gone: the next backup is incremental again.
            change(&img, &ring, &[(3 * MIB + 5 * BLOCK, BLOCK)], 5);
            let next = backup(&img, &ring, &dest);
            let incremental = next.status.success()
                && !messages(&next).iter().any(|l| l.contains(ring_s))
                && String::from_utf8_lossy(&next.stdout).contains(": 1 blocks,");
            let (next_exact, next_r) = restores_to_image(2);
            tally.check(exact && named, || {
                format!("{name}: the backup did not name the ring or does not restore to the image\n{}\n{r_text}", text(&out))
            }) && tally.check(incremental && next_exact, || {
                format!("{name}: the backup after the resync is not incremental and exact\n{}\n{next_r}", text(&next))
            })
        } else {
            let listed = run(foresnap().args([&["snapshots"][..], &from].concat()));
            let refused = msgs.last().is_some_and(|l| l.contains(ring_s));
            tally.check(refused && listed.lines().count() == 1, || {
                format!(
                    "{name}: the refusal does not name the ring, or left a snapshot\n{}\n{listed}",
                    text(&out)
                )
            })
        };
        tally.detected += u64::from(traced && backed_up);
        let first_named = |o: &Output| {
            let m = messages(o);
            m.iter().find(|l| l.contains(ring_s)).or(m.last()).cloned()
        };
        eprintln!(
            "case {name}: trace {}: {}; backup {}: {}",
            if tr.status.success() { "ok" } else { "refused" },
            first_named(&tr).unwrap_or_default(),
            if out.status.success() {
                "resynced"
            } else {
                "refused"
            },
            first_named(&out).unwrap_or_default()
        );
    }
    tally.finish("corruption-ring");
}
