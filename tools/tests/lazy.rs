//! `foresnap restore --lazy` in the VM test bed: a device over a snapshot
//! that is usable at once while its chunks arrive. `#[ignore]`d on the
//! host; `scripts/test` runs them in the VM.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, foresnap, http_get, metric, require_ublk, run, scratch, sh};

/// `foresnap backup` of `img` to a directory destination as volume `name`
/// with 1 MiB chunks; returns the destination URL.
fn backup(dir: &Path, img: &Path, name: &str) -> String {
    let dest = format!("file://{}", dir.join("dest").display());
    let out = run(foresnap()
        .args([
            "backup",
            "--volume",
            name,
            "--chunk-size",
            "1M",
            "--dest",
            &dest,
        ])
        .arg("--backing")
        .arg(img));
    assert!(out.contains("snapshot 1 uploaded"), "{out}");
    dest
}

/// ext4 with files of random data, mounted read-only from a lazily
/// restored device and checked while hydration runs (capped, so that it
/// is still running); once hydration completes, the device equals the
/// snapshot, and a write afterwards is tracked as the new volume's. The
/// metrics endpoint (`--metrics`) shows the hydration's progress: chunks
/// fetched on demand for the mount, then every chunk ready.
#[test]
#[ignore = "needs ublk: run through scripts/test (VM test bed)"]
fn lazy_restore_serves_ext4_while_it_hydrates() {
    require_ublk();
    let dir = scratch();
    let d = dir.path();
    sh(&format!(
        "set -e; mkdir -p {d}/files; for i in $(seq 1 24); do \
           head -c $((i * 80))K /dev/urandom > {d}/files/f$i; done; \
         (cd {d}/files && sha256sum f*) > {d}/sums; \
         mkfs.ext4 -q -F -b 4096 -d {d}/files {d}/fs.img 96M",
        d = d.display()
    ));
    let img = d.join("fs.img");
    let dest = backup(d, &img, "fs");
    let target = d.join("restored.img");
    let sock = d.join("ctl.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let dev = Daemon::start_lazy(&[
        "--metrics",
        &metrics_addr,
        "--dest",
        &dest,
        "--volume",
        "fs",
        "--to",
        target.to_str().unwrap(),
        "--control",
        sock.to_str().unwrap(),
        "--workers",
        "1",
        "--hydrate-cap",
        "3MiB/s",
    ]);
    eprintln!(
        "lazy restore of 96 MiB: device ready {:.2} s after the command",
        started.elapsed().as_secs_f64()
    );
    let state = d.join("restored.img.hydration");
    let mnt = d.join("mnt");
    let check = sh(&format!(
        "mkdir -p {m} && mount -t ext4 -o ro,noload {dev} {m} && \
         (cd {m} && sha256sum -c --quiet {d}/sums && echo FILES-OK); \
         [ -e {state} ] && echo STILL-HYDRATING; umount {m}",
        m = mnt.display(),
        dev = dev.dev.display(),
        d = d.display(),
        state = state.display()
    ));
    assert!(check.contains("FILES-OK"), "files differ: {check}");
    assert!(
        check.contains("STILL-HYDRATING"),
        "hydration ended before the files were read (the cap is too loose): {check}"
    );
    let (status, during) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    // `status` shows the hydration's progress too.
    let text = run(foresnap().args(["status", "--control", sock.to_str().unwrap()]));
    let line = text
        .lines()
        .find(|l| l.starts_with("hydration "))
        .unwrap_or_else(|| panic!("no hydration line: {text}"));
    assert!(
        line.contains("of 96 chunks restored") && line.contains("on demand"),
        "{line}"
    );
    let chunks = metric(&during, "foresnap_hydration_chunks");
    assert_eq!(chunks, 96.0, "{during}");
    let ready = metric(&during, "foresnap_hydration_chunks_ready");
    assert!(ready < chunks, "{ready} of {chunks} ready before the end");
    assert!(
        metric(&during, "foresnap_hydration_on_demand_total") > 0.0,
        "the mount's reads fetched nothing on demand: {during}"
    );
    let done = dev
        .wait_for_line("hydration complete", Duration::from_secs(180))
        .expect("hydration did not complete");
    eprintln!("{done}");
    assert!(!state.exists(), "the state outlives a complete hydration");
    let (_, after) = http_get(port, "/metrics");
    assert_eq!(
        metric(&after, "foresnap_hydration_chunks_ready"),
        96.0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "foresnap_hydration_chunks_failed"),
        0.0,
        "{after}"
    );
    let text = run(foresnap().args(["status", "--control", sock.to_str().unwrap()]));
    assert!(
        text.contains("hydration         100% (96 of 96 chunks restored"),
        "{text}"
    );
    let same = sh(&format!(
        "cmp {img} {dev} && cmp {img} {t} && echo SAME",
        img = img.display(),
        dev = dev.dev.display(),
        t = target.display()
    ));
    assert!(
        same.contains("SAME"),
        "the device differs from the snapshot: {same}"
    );

    // The volume is an ordinary tracked one now: a write lands in its
    // first epoch, with everything the restore wrote.
    sh(&format!(
        "dd if=/dev/urandom of={} bs=4k seek=7 count=1 oflag=direct status=none",
        dev.dev.display()
    ));
    let closed = sh(&format!(
        "{} snapshot --control {}",
        env!("CARGO_BIN_EXE_foresnap"),
        sock.display()
    ));
    let blocks: u64 = closed
        .split_whitespace()
        .skip_while(|w| *w != "closed:")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no block count in {closed:?}"));
    let data_blocks: u64 = sh(&format!("du -B4096 {} | cut -f1", target.display()))
        .trim()
        .parse()
        .unwrap();
    assert!(
        blocks + 8 >= data_blocks,
        "the first epoch has {blocks} blocks; the restored volume holds {data_blocks}: {closed}"
    );
    dev.stop();
}

/// A lazy restore stopped in the middle resumes where it was, fetching no
/// chunk twice over one the device wrote: a write into a chunk that was
/// not there yet survives the stop and the resume, and everything else
/// ends equal to the snapshot. Reports the first read of a cold block
/// against reading one object.
#[test]
#[ignore = "needs ublk: run through scripts/test (VM test bed)"]
fn lazy_restore_resumes_and_keeps_writes() {
    require_ublk();
    let dir = scratch();
    let d = dir.path();
    let img = d.join("data.img");
    sh(&format!("head -c 48M /dev/urandom > {}", img.display()));
    let dest = backup(d, &img, "data");
    let target = d.join("restored.img");
    let args = [
        "--dest",
        &dest,
        "--volume",
        "data",
        "--to",
        target.to_str().unwrap(),
        "--workers",
        "1",
        "--control",
        &d.join("ctl.sock").display().to_string(),
    ]
    .map(str::to_owned);
    let mut first: Vec<&str> = args.iter().map(String::as_str).collect();
    first.extend(["--hydrate-cap", "1MiB/s"]);
    let dev = Daemon::start_lazy(&first);
    let devp = dev.dev.display().to_string();

    // A cold 4 KiB read (chunk 40, far ahead of the background), timed,
    // beside one object read the same way.
    let cold = sh(&format!(
        "s=$(date +%s%N); dd if={devp} of=/dev/null bs=4k skip=$((40 * 256)) count=1 \
         iflag=direct status=none; e=$(date +%s%N); echo $(( (e - s) / 1000 ))"
    ));
    let object = sh(&format!(
        "f=$(ls {}/dest/data/objects/000000000041/* | head -n 1); s=$(date +%s%N); \
         cat $f > /dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000 ))",
        d.display()
    ));
    eprintln!(
        "first read of a cold 4 KiB block: {} us; one 1 MiB object read from the \
         destination: {} us",
        cold.trim(),
        object.trim()
    );

    // A write into chunk 30 (not there yet: fetched first, then written).
    let patch = d.join("patch");
    sh(&format!("head -c 8192 /dev/urandom > {}", patch.display()));
    sh(&format!(
        "dd if={} of={devp} bs=4k seek=$((30 * 256 + 5)) count=2 oflag=direct status=none",
        patch.display()
    ));
    let state = d.join("restored.img.hydration");
    dev.stop();
    assert!(state.exists(), "stopped early, the state must stay");

    let again: Vec<&str> = args.iter().map(String::as_str).collect();
    let dev = Daemon::start_lazy(&again);
    dev.wait_for_line("hydration complete", Duration::from_secs(180))
        .expect("the resumed hydration did not complete");
    dev.stop();
    assert!(!state.exists());
    let check = sh(&format!(
        "cmp -n $((30 * 1048576 + 20480)) {img} {t} && echo HEAD-SAME; \
         cmp -i $((30 * 1048576 + 28672)) {img} {t} && echo TAIL-SAME; \
         dd if={t} bs=4k skip=$((30 * 256 + 5)) count=2 status=none | cmp - {p} && echo PATCH-KEPT",
        img = img.display(),
        t = target.display(),
        p = patch.display()
    ));
    for want in ["HEAD-SAME", "TAIL-SAME", "PATCH-KEPT"] {
        assert!(check.contains(want), "{want} missing: {check}");
    }
}

/// Device ready time does not grow with the volume: a 64 GiB snapshot
/// (sparse, a little data) against a 1 GiB one, in one boot.
#[test]
#[ignore = "needs ublk: run through scripts/test (VM test bed)"]
fn lazy_restore_is_ready_as_fast_for_64_gib_as_for_1_gib() {
    require_ublk();
    let dir = scratch();
    let d = dir.path();
    let mut ready = Vec::new();
    for (name, size) in [("small", "1G"), ("large", "64G")] {
        let img = d.join(format!("{name}.img"));
        sh(&format!(
            "head -c 4M /dev/urandom > {0} && truncate -s {size} {0}",
            img.display()
        ));
        let dest = backup(d, &img, name);
        sh(&format!("rm -f {0} {0}.fsring*", img.display()));
        let target = d.join(format!("{name}.restored"));
        let started = Instant::now();
        let dev = Daemon::start_lazy(&[
            "--dest",
            &dest,
            "--volume",
            name,
            "--to",
            target.to_str().unwrap(),
            "--workers",
            "1",
            "--hydrate-cap",
            "1MiB/s",
            "--control",
            &d.join(format!("{name}.sock")).display().to_string(),
        ]);
        let secs = started.elapsed().as_secs_f64();
        // It serves: the first 4 MiB read back equal to the data.
        let head = sh(&format!(
            "dd if={} bs=1M count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1",
            dev.dev.display()
        ));
        eprintln!("lazy restore of {size}: device ready {secs:.2} s after the command");
        ready.push(secs);
        dev.stop();
        let want = sh(&format!(
            "head -c 4M {} | sha256sum | cut -d' ' -f1",
            target.display()
        ));
        assert_eq!(head, want);
        sh(&format!("rm -f {0} {0}.*", target.display()));
    }
    eprintln!(
        "lazy restore: ready time 64 GiB / 1 GiB = {:.2}",
        ready[1] / ready[0]
    );
}
