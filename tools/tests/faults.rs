//! The S3 destination through a faulty network and object store:
//! `foresnap-fault-proxy` sits between the CLI and SeaweedFS on 127.0.0.1
//! and gives 10% of the requests one fault of every kind it knows (errors,
//! throttling, resets, stalls past the client's timeout, truncated and
//! bit-flipped object bodies, latency). Every backup still completes,
//! every snapshot restores bit-exact and verifies through the proxy, and
//! at the server itself every stored object is whole: nothing damaged in
//! transit was accepted. A second test damages put bodies only, many.
//!
//! `FORESNAP_FAULT_SNAPSHOTS` (at least the default, 6) takes more
//! snapshots (`scripts/torture --long`); the test ends with a `TORTURE`
//! line for that script's table.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::{Server, pattern, run, sha256};
use foresnap_driver::tracking::Geometry;
use foresnap_driver::tracking::tracker::{Tracker, TrackerConfig};
use foresnap_uploader::dest::{DestError, Destination};
use foresnap_uploader::format::{MAX_CHUNK_BYTES, Manifest, decode_object};
use foresnap_uploader::s3::{S3Destination, S3Url};

const MIB: u64 = 1 << 20;
/// 64 chunks of 1 MiB.
const VOLUME: u64 = 64 * MIB;
/// Snapshots taken by default: enough object reads for every kind.
const SNAPSHOTS: u32 = 6;
/// The client's read timeout (`timeout=` in the URL) and how long a
/// `timeout` fault holds a request: longer, so the client gives up first.
const CLIENT_TIMEOUT_S: u32 = 1;
const STALL_MS: u64 = 1500;
const KINDS: [&str; 9] = [
    "500", "503", "slowdown", "reset", "timeout", "truncate", "flip", "latency", "flip-put",
];

/// A running `foresnap-fault-proxy`, stopped on drop.
struct Proxy {
    child: Option<Child>,
    endpoint: String,
    stats: PathBuf,
    log: PathBuf,
}

impl Proxy {
    /// The proxy of the soak-like test: 10% of requests, every kind.
    fn start(upstream: &str, dir: &Path) -> Proxy {
        Proxy::start_with(upstream, dir, "0.1", &KINDS, &[])
    }

    fn start_with(upstream: &str, dir: &Path, rate: &str, kinds: &[&str], extra: &[&str]) -> Proxy {
        let stats = dir.join("proxy-stats.json");
        let log_path = dir.join("proxy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_foresnap-fault-proxy"))
            .args(["--upstream", upstream, "--rate", rate, "--seed", "8"])
            .args(["--kinds", &kinds.join(",")])
            .args(extra)
            .args(["--stall-ms", &STALL_MS.to_string(), "--latency-ms", "300"])
            .arg("--stats")
            .arg(&stats)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let endpoint = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Proxy {
            child: Some(child),
            endpoint,
            stats,
            log: log_path,
        }
    }

    /// Stops the proxy with SIGTERM; the counts it wrote on the way out.
    fn stop(mut self) -> serde_json::Value {
        let mut child = self.child.take().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // SAFETY: kill(2) on our own child; no memory involved.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        assert!(child.wait().unwrap().success());
        serde_json::from_slice(&std::fs::read(&self.stats).unwrap()).unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test: what the proxy last did (its log goes with the
        // test's directory).
        if std::thread::panicking() {
            common::print_tail("fault proxy", &self.log);
        }
    }
}

/// Put bodies damaged on their way to the server (`flip-put`, a fifth of
/// the puts) are refused by the server, for their Content-MD5, and sent
/// again: every put succeeds, small ones and a multipart one, and the
/// server holds exactly the bytes put. Without the checksum the server
/// stored the damaged bytes as the object. The puts are sequential, so
/// which requests are hit depends only on the proxy's seed (the parts of
/// the multipart object race, but none can be hit 5 times in a row).
#[test]
fn damaged_put_bodies_are_refused_and_sent_again() {
    let s = Server::start("seaweedfs");
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_with(s.var("S3_ENDPOINT"), dir.path(), "0.2", &["flip-put"], &[]);
    let url = format!(
        "s3://{}/flipput?endpoint={}",
        s.var("S3_BUCKET"),
        proxy.endpoint
    );
    let via = S3Destination::open_with(S3Url::parse(&url).unwrap(), Some(s.creds())).unwrap();
    let mut want = Vec::new();
    for i in 0..100u64 {
        let body = pattern(16 << 10, i + 1);
        let key = format!("small/{i:03}");
        via.put(&key, &body)
            .unwrap_or_else(|e| panic!("put {key}: {e}"));
        want.push((key, body));
    }
    let big = pattern(40 * MIB + 4321, 999);
    via.put("big", &big).unwrap();
    want.push(("big".to_owned(), big));
    let flipped = proxy.stop()["faults"]["flip-put"].as_u64().unwrap();
    eprintln!("{flipped} of about 107 put bodies damaged in transit, all sent again");
    assert!(flipped > 0, "the proxy damaged no put");
    let direct = s.open("flipput");
    for (key, body) in &want {
        assert!(
            direct.get(key).unwrap() == *body,
            "{key} differs at the server"
        );
    }
}

/// Multipart uploads whose parts and completions meet connection resets
/// (half before the server sees the request, half after it answered: a
/// lost answer, a completion applied unbeknown to the client). As the
/// uploader does, a put that fails is put again; it ends stored, or
/// found there (`AlreadyExists`), and the object at the server is always
/// exactly the bytes put: no part is lost, none doubled. Half a minute:
/// run by `scripts/torture`.
#[test]
#[ignore = "part of scripts/torture: cargo test --test faults -- --ignored"]
fn multipart_uploads_survive_lost_answers() {
    let s = Server::start("seaweedfs");
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start_with(
        s.var("S3_ENDPOINT"),
        dir.path(),
        "0.4",
        &["reset"],
        &["--only", "uploadId="],
    );
    let url = format!(
        "s3://{}/multipart?endpoint={}",
        s.var("S3_BUCKET"),
        proxy.endpoint
    );
    let via = S3Destination::open_with(S3Url::parse(&url).unwrap(), Some(s.creds())).unwrap();
    let direct = s.open("multipart");
    let mut again = 0;
    for i in 0..6u64 {
        // 17 MiB and up: 3 parts, and the completion.
        let body = pattern(17 * MIB + i * 4099, 40 + i);
        let key = format!("big/{i}");
        let mut tries = 0;
        loop {
            tries += 1;
            match via.put(&key, &body) {
                Ok(()) | Err(DestError::AlreadyExists { .. }) => break,
                Err(e) => assert!(tries < 8, "{key}: {e}"),
            }
            again += 1;
        }
        assert!(
            direct.get(&key).unwrap() == body,
            "{key} differs at the server"
        );
    }
    let stats = proxy.stop();
    // The proxy's log: "fault-proxy: #N POST /B/K?uploadId=...: reset after ..."
    let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap();
    let lost_completions = log
        .lines()
        .filter(|l| l.contains(" POST ") && l.ends_with("reset after the server answered"))
        .count();
    eprintln!(
        "multipart: {} resets, {} after the server answered ({lost_completions} of them \
         completions); {again} puts made again",
        stats["faults"]["reset"], stats["reset_after_forward"]
    );
}

/// Writes `writes` random runs of 4-16 KiB into the volume through its
/// change tracker (its ring, as `foresnap backup` left it), as a device
/// would.
fn change(vol: &Path, writes: u64, seed: u64) {
    let cfg = TrackerConfig {
        ring: vol.with_extension("fsring"),
        ring_bytes: 64 * MIB,
        geometry: Geometry::default(),
    };
    let (t, _) = Tracker::open(&cfg, vol, VOLUME, 1).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(vol).unwrap();
    let mut x = seed;
    for i in 0..writes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (1 + x % 4) * 4096;
        let off = (x >> 8) % ((VOLUME - len) / 4096) * 4096;
        t.write_volume(&f, off, &pattern(len, seed + i)).unwrap();
    }
}

/// The number before `suffix` among the figures of a report line.
fn figure(text: &str, suffix: &str) -> u64 {
    text.split([',', ':'])
        .find_map(|p| p.trim().strip_suffix(suffix)?.parse().ok())
        .unwrap_or_else(|| panic!("no '{suffix}' in {text:?}"))
}

/// Backups, restores and verifies through 10% faults of every kind.
/// A minute: run by `scripts/torture` (so by `scripts/test`), not by a
/// plain `cargo test`.
#[test]
#[ignore = "part of scripts/torture: cargo test --test faults -- --ignored"]
fn snapshots_survive_a_faulty_object_store() {
    let snapshots = match std::env::var("FORESNAP_FAULT_SNAPSHOTS") {
        Ok(n) if !n.is_empty() => n.parse().expect("FORESNAP_FAULT_SNAPSHOTS: a number"),
        _ => SNAPSHOTS,
    };
    assert!(snapshots >= SNAPSHOTS, "at least {SNAPSHOTS} snapshots");
    let started = Instant::now();
    let s = Server::start("seaweedfs");
    let dir = tempfile::tempdir().unwrap();
    let proxy = Proxy::start(s.var("S3_ENDPOINT"), dir.path());
    let faulty = format!(
        "s3://{}/faults?endpoint={}&timeout={CLIENT_TIMEOUT_S}",
        s.var("S3_BUCKET"),
        proxy.endpoint
    );
    let vol = dir.path().join("vol");
    std::fs::write(&vol, pattern(VOLUME, 3)).unwrap();

    let mut sums = Vec::new();
    let mut lost_answers = 0;
    for id in 1..=snapshots {
        if id > 1 {
            change(&vol, 48, u64::from(id) << 20);
        }
        let text = run(s
            .foresnap()
            .args(["backup", "--volume", "v", "--chunk-size", "1M"])
            .args(["--dest", &faulty, "--backing"])
            .arg(&vol));
        assert!(text.contains(&format!("snapshot {id} uploaded")), "{text}");
        // Puts whose answers were lost: the retry found the object.
        lost_answers += figure(&text, " already there");
        sums.push(sha256(&vol, VOLUME));
    }
    let backed_up = started.elapsed();

    // Every snapshot, bit-exact through the proxy. These reads are most
    // of the object GETs (the only requests `truncate` and `flip` hit):
    // snapshot N reads its 64 chunks and the deltas of N-1 snapshots over
    // them, 900 objects or so in all, plus about 230 for the verify.
    for (id, sum) in (1..=snapshots).zip(&sums) {
        let out = dir.path().join(format!("restored-{id}"));
        run(s
            .foresnap()
            .args(["restore", "--volume", "v", "--snapshot", &id.to_string()])
            .args(["--dest", &faulty, "--to"])
            .arg(&out));
        assert_eq!(&sha256(&out, VOLUME), sum, "snapshot {id}");
        std::fs::remove_file(&out).unwrap();
    }
    let verified = run(s
        .foresnap()
        .args(["verify", "--volume", "v", "--dest", &faulty]));
    assert!(verified.contains(" 0 bad"), "{verified}");
    let stats = proxy.stop();

    // At the server itself: every snapshot verifies, and every object
    // stored, referenced or not, is whole.
    let direct = run(s
        .foresnap()
        .args(["verify", "--volume", "v", "--dest", &s.url("faults")]));
    assert!(direct.contains(" 0 bad"), "{direct}");
    let d = s.open("faults");
    let keys = d.list("v/").unwrap();
    for k in &keys {
        let b = d.get(k).unwrap();
        let whole = if k.starts_with("v/manifests/") {
            Manifest::decode(&b).is_ok()
        } else {
            decode_object(&b, MAX_CHUNK_BYTES).is_ok()
        };
        assert!(whole, "{k} is damaged at the server");
    }

    let count = |k: &str| stats["faults"][k].as_u64().unwrap();
    let requests = stats["requests"].as_u64().unwrap();
    eprintln!("fault             injected");
    for k in KINDS {
        eprintln!("{k:<17} {:>8}", count(k));
    }
    eprintln!(
        "(resets after the server answered: {}; puts found already there on retry: {lost_answers})",
        stats["reset_after_forward"]
    );
    eprintln!(
        "{requests} requests, {} faults; {snapshots} snapshots backed up in {:.1} s, \
         restored and verified ({} objects at the server intact) in {:.1} s",
        KINDS.iter().map(|k| count(k)).sum::<u64>(),
        backed_up.as_secs_f64(),
        keys.len(),
        (started.elapsed() - backed_up).as_secs_f64()
    );
    // Expected counts: about 1100 object GETs, each with a 1 in 80 chance
    // of `truncate` and of `flip`, and about 1500 requests, each with a 1
    // in 60 to 80 chance of each other kind: a kind never drawn has odds
    // below (79/80)^1100 < 1e-6.
    let by_kind: Vec<String> = KINDS.iter().map(|k| format!("{k}:{}", count(k))).collect();
    eprintln!(
        "TORTURE faulty-store secs={} requests={requests} faults={} snapshots={snapshots} \
         verified={snapshots}",
        started.elapsed().as_secs(),
        by_kind.join(",")
    );
    // `flip-put` hits only the 250 puts or so, each with a 1 in 90
    // chance: drawn or not here, the test above damages a fifth of 101.
    for k in KINDS.iter().filter(|&&k| k != "flip-put") {
        assert!(count(k) >= 1, "no {k} fault in {requests} requests");
    }
    assert!(requests > 1000, "{requests} requests");
}
