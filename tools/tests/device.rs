//! End-to-end tests of the device on a kernel with ublk (the VM test bed).
//! `scripts/test` runs them with `--ignored --test-threads=1`.

mod common;

use std::path::Path;

use common::*;

fn backing(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// fio with crc32c verification: random writes of 4k..1M then reads, at
/// iodepth 1 and 32, several jobs on disjoint regions.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn fio_random_writes_verify() {
    require_ublk();
    let dir = scratch();
    let d = Daemon::start(&[
        "--backing",
        &backing(dir.path(), "fio.img"),
        "--size",
        "256M",
    ]);
    for (iodepth, jobs) in [(1, 2), (32, 4)] {
        let out = sh(&format!(
            "fio --name=verify --filename={dev} --direct=1 --ioengine=io_uring \
             --rw=randwrite --bsrange=4k-1m --blockalign=4k --iodepth={iodepth} \
             --numjobs={jobs} --size=48M --offset_increment=56M --verify=crc32c \
             --do_verify=1 --verify_fatal=1 --verify_backlog=64 --randseed={iodepth} \
             --group_reporting --output-format=terse",
            dev = d.dev.display()
        ));
        // Terse v3: field 5 is the total error count of the job group.
        let err: u64 = out
            .split(';')
            .nth(4)
            .and_then(|f| f.parse().ok())
            .expect("terse output");
        assert_eq!(err, 0, "fio reported errors: {out}");
    }
    d.stop();
    assert_no_ublk_devices();
}

/// ext4 written on one server, read back on the next, fsck clean.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn ext4_survives_restart_of_the_server() {
    require_ublk();
    let dir = scratch();
    let img = backing(dir.path(), "ext4.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mnt = mnt.display();

    let d = Daemon::start(&["--backing", &img, "--size", "128M"]);
    let dev = d.dev.display().to_string();
    sh(&format!("mkfs.ext4 -q -F {dev}"));
    sh(&format!(
        "mount {dev} {mnt} && mkdir -p {mnt}/tree && \
         for i in 1 2 3 4 5 6 7 8; do head -c $((i * 700001)) /dev/urandom > {mnt}/tree/f$i; done && \
         cp -r /etc/ssl {mnt}/tree/ 2>/dev/null; \
         (cd {mnt} && find tree -type f -exec sha256sum {{}} + > ../sums) && umount {mnt}"
    ));
    d.stop();
    assert_no_ublk_devices();

    let d = Daemon::start(&["--backing", &img]);
    let dev = d.dev.display().to_string();
    sh(&format!("e2fsck -fn {dev}"));
    sh(&format!(
        "mount {dev} {mnt} && (cd {mnt} && sha256sum --quiet -c ../sums) && umount {mnt}"
    ));
    d.stop();
    assert_no_ublk_devices();
}

fn stat_field(dev: &Path, idx: usize) -> u64 {
    let name = dev.file_name().unwrap().to_string_lossy();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
    stat.split_whitespace()
        .nth(idx)
        .and_then(|f| f.parse().ok())
        .expect("stat field")
}

fn sysfs(dev: &Path, attr: &str) -> String {
    let name = dev.file_name().unwrap().to_string_lossy();
    std::fs::read_to_string(format!("/sys/block/{name}/queue/{attr}"))
        .unwrap()
        .trim()
        .to_owned()
}

/// FLUSH, FUA, DISCARD and WRITE_ZEROES reach the backing file.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn flush_fua_discard_write_zeroes_reach_the_backing() {
    require_ublk();
    let dir = scratch();
    let img = dir.path().join("ops.img");
    let d = Daemon::start(&["--backing", img.to_str().unwrap(), "--size", "64M"]);
    let dev = d.dev.display().to_string();

    assert_eq!(sysfs(&d.dev, "write_cache"), "write back");
    assert_eq!(sysfs(&d.dev, "fua"), "1");
    assert!(sysfs(&d.dev, "discard_max_bytes").parse::<u64>().unwrap() > 0);
    assert!(
        sysfs(&d.dev, "write_zeroes_max_bytes")
            .parse::<u64>()
            .unwrap()
            > 0
    );

    // 24 MiB of data, written with FUA (O_DSYNC on the device): it is in
    // the backing file, read directly, without any flush from us.
    sh(&format!(
        "head -c 24M /dev/urandom > {0}/data && dd if={0}/data of={dev} bs=1M oflag=direct,dsync status=none",
        dir.path().display()
    ));
    let want = sha256(&dir.path().join("data"), 24 << 20);
    assert_eq!(sha256(&img, 24 << 20), want);
    let before = allocated_bytes(&img);
    assert!(before >= 24 << 20, "backing holds {before} bytes");

    // FLUSH: fsync of the block device sends one; the device counts it
    // (field 16 of the stat file, index 15: flush requests completed).
    let flushes = stat_field(&d.dev, 15);
    sh(&format!("sync {dev}")); // fsync(2) of the block device
    assert!(
        stat_field(&d.dev, 15) > flushes,
        "no flush reached the device"
    );

    // DISCARD punches a hole: space is freed and the range reads zeroes.
    sh(&format!("blkdiscard -o 0 -l 8M {dev}"));
    let after_discard = allocated_bytes(&img);
    assert!(
        after_discard <= before - (8 << 20),
        "{before} -> {after_discard}"
    );
    assert_eq!(
        sh(&format!("cmp -n 8388608 {dev} /dev/zero && echo zero")).trim(),
        "zero"
    );

    // WRITE_ZEROES without unmap (BLKZEROOUT) keeps the blocks allocated.
    sh(&format!("blkdiscard -z -o 8M -l 4M {dev}"));
    assert_eq!(
        sh(&format!(
            "cmp -i 8388608 -n 4194304 {dev} /dev/zero && echo zero"
        ))
        .trim(),
        "zero"
    );
    assert!(
        allocated_bytes(&img) >= after_discard,
        "zeroing without unmap freed space"
    );

    // WRITE_ZEROES that may unmap (fallocate --punch-hole on the device).
    sh(&format!("fallocate -p -o 12M -l 4M {dev}"));
    assert!(allocated_bytes(&img) <= after_discard - (4 << 20) + (4 << 20) / 2);
    assert_eq!(
        sh(&format!(
            "cmp -i 12582912 -n 4194304 {dev} /dev/zero && echo zero"
        ))
        .trim(),
        "zero"
    );

    // The rest of the data is untouched.
    assert_eq!(
        sh(&format!(
            "cmp -i 16777216 -n 8388608 {dev} {}/data 16777216 && echo same",
            dir.path().display()
        ))
        .trim(),
        "same"
    );
    d.stop();
    assert_no_ublk_devices();
}

/// A backing store that fails (a file on a full tmpfs) gives the writer
/// EIO; the server keeps serving reads.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn failing_backing_gives_eio_and_reads_go_on() {
    require_ublk();
    let dir = scratch();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=16M tmpfs {}",
        small.display()
    ));
    let img = small.join("full.img");
    // The write ring lives elsewhere (on the full tmpfs it could not be
    // allocated, and the daemon would refuse to start).
    let ring = dir.path().join("ring");
    let d = Daemon::start(&[
        "--backing",
        img.to_str().unwrap(),
        "--size",
        "64M",
        "--ring",
        ring.to_str().unwrap(),
    ]);
    let dev = d.dev.display().to_string();

    sh(&format!(
        "head -c 4M /dev/urandom > {0}/head && dd if={0}/head of={dev} bs=1M oflag=direct status=none",
        dir.path().display()
    ));
    let out = sh_output(&format!(
        "dd if=/dev/urandom of={dev} bs=1M seek=8 count=32 oflag=direct status=none"
    ));
    assert!(
        !out.status.success(),
        "writing past the tmpfs's capacity succeeded"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Input/output error"), "writer saw: {err}");

    // Still serving: the data written before reads back.
    assert_eq!(
        sh(&format!(
            "cmp -n 4194304 {dev} {}/head && echo same",
            dir.path().display()
        ))
        .trim(),
        "same"
    );
    assert!(
        std::fs::metadata(format!("/proc/{}", d.pid())).is_ok(),
        "server died"
    );
    d.stop();
    assert_no_ublk_devices();
    sh(&format!("umount {}", small.display()));
}

/// Bad input: one clear line, a non-zero exit, no device left.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn bad_input_leaves_no_device() {
    require_ublk();
    assert_no_ublk_devices();
    let dir = scratch();
    let existing = dir.path().join("8m.img");
    std::fs::write(&existing, vec![0u8; 8 << 20]).unwrap();
    // The repository is on the read-only shared root inside the VM.
    let read_only = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let read_only_ok = sh_output(&format!("test -w {read_only} && touch {read_only}"))
        .status
        .success();
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--backing".into(), backing(dir.path(), "missing.img")],
            "does not exist",
        ),
        (
            vec![
                "--backing".into(),
                existing.display().to_string(),
                "--size".into(),
                "4M".into(),
            ],
            "smaller than the backing",
        ),
        (
            vec![
                "--backing".into(),
                existing.display().to_string(),
                "--block-size".into(),
                "1024".into(),
            ],
            "512 or 4096",
        ),
        (
            vec![
                "--backing".into(),
                existing.display().to_string(),
                "--size".into(),
                "big".into(),
            ],
            "invalid size",
        ),
        (
            vec!["--backing".into(), dir.path().display().to_string()],
            "neither a regular file nor a block device",
        ),
        (
            vec![
                "--backing".into(),
                existing.display().to_string(),
                "--ring-size".into(),
                "4K".into(),
            ],
            "too small",
        ),
        (
            vec![
                "--backing".into(),
                existing.display().to_string(),
                "--ring".into(),
                existing.display().to_string(),
            ],
            "not a foresnap write ring",
        ),
        (
            vec!["--backing".into(), "/dev/null".into()],
            "neither a regular file nor a block device",
        ),
    ];
    if !read_only_ok {
        cases.push((
            vec!["--backing".into(), read_only.into()],
            "cannot open backing",
        ));
    }
    for (args, want) in &cases {
        let out = foresnap().arg("serve").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?}: not one line: {err:?}"
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_no_ublk_devices();
    }

    // An id in use by a live device is refused and leaves that device alone.
    let d = Daemon::start(&["--backing", existing.to_str().unwrap(), "--id", "5"]);
    let other = backing(dir.path(), "other.img");
    let out = foresnap()
        .args(["serve", "--backing", &other, "--size", "8M", "--id", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("in use"), "{err}");
    assert_eq!(ublk_block_devices(), vec![d.dev.clone()]);
    d.stop();
    assert_no_ublk_devices();
}

/// SIGINT and SIGTERM both remove the device and exit 0.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn signals_remove_the_device() {
    require_ublk();
    let dir = scratch();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let d = Daemon::start(&[
            "--backing",
            &backing(dir.path(), "sig.img"),
            "--size",
            "16M",
        ]);
        let dev = d.dev.clone();
        sh(&format!(
            "dd if=/dev/zero of={} bs=64k count=16 oflag=direct status=none",
            dev.display()
        ));
        let status = d.signal_and_wait(sig);
        assert!(status.success(), "signal {sig}: exit {status}");
        assert_no_ublk_devices();
    }
}

/// `kill -9` leaves the device waiting; serving the same backing with the
/// same id re-attaches it with its data.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn killed_server_is_recovered() {
    require_ublk();
    let dir = scratch();
    let img = backing(dir.path(), "rec.img");
    let data = dir.path().join("pattern");
    sh(&format!("head -c 3M /dev/urandom > {}", data.display()));

    let d = Daemon::start(&["--backing", &img, "--size", "32M", "--id", "9"]);
    let dev = d.dev.display().to_string();
    sh(&format!(
        "dd if={} of={dev} bs=1M oflag=direct status=none",
        data.display()
    ));
    d.kill9();
    assert!(
        Path::new("/dev/ublkc9").exists(),
        "device vanished with its server"
    );

    // A different backing must not hijack the waiting device.
    let other = backing(dir.path(), "other.img");
    let out = foresnap()
        .args(["serve", "--backing", &other, "--size", "32M", "--id", "9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("waiting for recovery"));

    let d = Daemon::start(&["--backing", &img, "--id", "9"]);
    assert_eq!(d.dev.display().to_string(), dev);
    assert_eq!(
        sh(&format!(
            "cmp -n 3145728 {dev} {} && echo same",
            data.display()
        ))
        .trim(),
        "same"
    );
    sh(&format!(
        "dd if=/dev/urandom of={dev} bs=1M seek=4 count=2 oflag=direct status=none"
    ));
    d.stop();
    assert_no_ublk_devices();
}

/// On a block-device backing (a kernel loop device), a FLUSH of our device
/// and a FUA write each reach the backing device as a flush (loop has no
/// FUA, so the block layer turns FUA into a flush), and a plain write
/// sends none.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn flush_and_fua_reach_a_block_device_backing() {
    require_ublk();
    let dir = scratch();
    let file = dir.path().join("loop.img");
    sh(&format!("truncate -s 64M {}", file.display()));
    let loopdev = sh(&format!("losetup -f --show {}", file.display()))
        .trim()
        .to_owned();
    let lp = Path::new(&loopdev);
    let ring = dir.path().join("ring");
    let d = Daemon::start(&["--backing", &loopdev, "--ring", ring.to_str().unwrap()]);
    let dev = d.dev.display().to_string();

    let f0 = stat_field(lp, 15);
    sh(&format!(
        "dd if=/dev/urandom of={dev} bs=4k count=8 oflag=direct status=none"
    ));
    let f1 = stat_field(lp, 15);
    assert_eq!(f1, f0, "a plain write flushed the backing");

    sh(&format!("sync {dev}")); // fsync(2) of the block device
    let f2 = stat_field(lp, 15);
    assert!(f2 > f1, "FLUSH did not reach the backing device");

    sh(&format!(
        "dd if=/dev/urandom of={dev} bs=4k count=1 seek=100 oflag=direct,dsync status=none"
    ));
    let f3 = stat_field(lp, 15);
    assert!(
        f3 > f2,
        "a FUA write was not made durable on the backing device"
    );

    d.stop();
    assert_no_ublk_devices();
    sh(&format!("losetup -d {loopdev}"));
}
