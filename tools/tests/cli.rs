//! The binary's behaviour that needs no ublk: argument errors and the
//! report of a kernel without ublk. These run on every host.

mod common;

use common::{foresnap, tracked_write};

fn one_line_error(args: &[&str]) -> String {
    let out = foresnap().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("foresnap: "), "{err:?}");
    err
}

#[test]
fn argument_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.img");
    std::fs::write(&f, vec![0u8; 8192]).unwrap();
    let f = f.to_str().unwrap();
    assert!(
        one_line_error(&["serve", "--backing", f, "--block-size", "2048"]).contains("512 or 4096")
    );
    assert!(
        one_line_error(&["serve", "--backing", f, "--size", "4K"])
            .contains("smaller than the backing")
    );
    assert!(
        one_line_error(&["serve", "--backing", "/nonexistent/x.img"]).contains("does not exist")
    );
    assert!(one_line_error(&["serve", "--backing", f, "--queues", "0"]).contains("queue count"));
    assert!(one_line_error(&["serve"]).contains("--backing"));
    assert!(one_line_error(&["frobnicate"]).contains("frobnicate"));
    // Nothing was created by the refused size.
    assert!(!std::path::Path::new("/nonexistent/x.img").exists());
}

#[test]
fn help_names_every_serve_option_with_examples() {
    let out = foresnap().args(["serve", "--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--backing",
        "--size",
        "--queues",
        "--depth",
        "--block-size",
        "--id",
        "Examples:",
    ] {
        assert!(help.contains(opt), "help lacks {opt}");
    }
}

/// On a kernel without ublk (this host, unless it has ublk), serve says so,
/// points at the VM test bed, and creates nothing.
#[test]
fn kernel_without_ublk_is_reported() {
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("this kernel has ublk: the no-ublk report is not reachable here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("new.img");
    let err = one_line_error(&["serve", "--backing", img.to_str().unwrap(), "--size", "8M"]);
    assert!(err.contains("no ublk"), "{err}");
    assert!(err.contains("scripts/vm-run"), "{err}");
    assert!(
        !img.exists(),
        "a backing file was created for a device that cannot exist"
    );
}

/// A small fio iolog: 64 KiB writes every 100 ms for `secs` seconds over
/// 8 MiB, with a hot 64 KiB rewritten in between.
fn iolog(dir: &std::path::Path, secs: u64) -> std::path::PathBuf {
    let mut s = String::from("fio version 3 iolog\n0 /dev/x add\n0 /dev/x open\n");
    for i in 0..secs * 10 {
        let t = i * 100_000;
        s.push_str(&format!("{t} /dev/x write {} 65536\n", (i % 128) * 65536));
        s.push_str(&format!("{} /dev/x write 0 65536\n", t + 50_000));
    }
    let p = dir.join("t.iolog");
    std::fs::write(&p, s).unwrap();
    p
}

/// `simulate` prints one JSON object with the keys the evaluation reads,
/// and at-close's lag is the epoch's distinct bytes over the link.
#[test]
fn simulate_reports_snapshots_and_summary() {
    let dir = tempfile::tempdir().unwrap();
    let trace = iolog(dir.path(), 40);
    let run = |policy: &str| {
        let out = foresnap()
            .args(["simulate", "--trace"])
            .arg(&trace)
            .args([
                "--link", "1MiB/s", "--every", "10s", "--policy", policy, "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let at_close = run("at-close");
    let snaps = at_close["snapshots"].as_array().unwrap();
    assert_eq!(
        snaps.len(),
        3,
        "closes at 10, 20, 30 s; 40 s is past the end"
    );
    // 100 writes of 64 KiB over 128 slots: 100 distinct, 6.25 MiB, plus
    // slot 0 (already among them in the first interval).
    let first = &snaps[0];
    assert_eq!(first["minimal_bytes"], 100 * 65536);
    assert!(
        (first["lag_s"].as_f64().unwrap() - 6.25).abs() < 1e-6,
        "{first}"
    );
    for key in [
        "median_lag_s",
        "p95_lag_s",
        "bytes_uploaded",
        "minimal_bytes",
        "amplification",
        "link_busy",
    ] {
        assert!(at_close["summary"][key].is_number(), "summary lacks {key}");
    }
    assert_eq!(
        at_close["params"]["track_chunk"],
        1u64 << foresnap_driver::tracking::Geometry::default().chunk_shift,
        "the simulator's default chunk is the daemon's"
    );
    for policy in ["predictive", "oracle", "rate-oracle"] {
        let v = run(policy);
        let lag = v["summary"]["median_lag_s"].as_f64().unwrap();
        assert!(
            lag < at_close["summary"]["median_lag_s"].as_f64().unwrap(),
            "{policy}: {lag}"
        );
        assert_eq!(v["params"]["policy"], policy);
    }
    // The table and the timeline.
    let tl = dir.path().join("tl.csv");
    let out = foresnap()
        .args(["simulate", "--trace"])
        .arg(&trace)
        .args([
            "--link",
            "1048576",
            "--every",
            "10s",
            "--policy",
            "predictive",
            "--timeline",
        ])
        .arg(&tl)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("lag median"));
    let csv = std::fs::read_to_string(&tl).unwrap();
    assert!(csv.starts_with("t_s,uploaded_bytes,outstanding_bytes,event"));
    assert!(csv.contains("close:1") && csv.contains("complete:3"));
}

/// Bad traces and bad values: one line each, naming the problem.
#[test]
fn simulate_refuses_bad_input_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let trace = iolog(dir.path(), 5);
    let t = trace.to_str().unwrap();
    let base = [
        "simulate", "--trace", t, "--every", "1s", "--policy", "at-close",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    let err = |args: Vec<String>| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        one_line_error(&a)
    };
    assert!(err(with(&["--link", "fast"])).contains("invalid rate 'fast'"));
    assert!(err(with(&["--link", "0"])).contains("invalid rate"));
    let e = one_line_error(&[
        "simulate", "--trace", t, "--link", "1M", "--every", "1s", "--policy", "lazy",
    ]);
    assert!(
        e.contains("invalid policy 'lazy'") && e.contains("rate-oracle"),
        "{e}"
    );
    assert!(err(with(&["--link", "1M", "--pt", "3"])).contains("--pt"));
    assert!(err(with(&["--link", "1M", "--format", "csv"])).contains("csv"));
    for chunk in ["3K", "128M", "big"] {
        let e = err(with(&["--link", "1M", "--track-chunk", chunk]));
        assert!(e.contains("invalid tracking chunk"), "{chunk}: {e}");
    }
    let e = err(with(&["--link", "1M", "--track-block", "2M"]));
    assert!(e.contains("invalid tracking block '2M'"), "{e}");
    let e = err(with(&[
        "--link",
        "1M",
        "--track-block",
        "64K",
        "--track-chunk",
        "16K",
    ]));
    assert!(e.contains("smaller than the tracking block"), "{e}");
    let bad = dir.path().join("bad.iolog");
    std::fs::write(
        &bad,
        "fio version 3 iolog\n0 /dev/x add\n5 /dev/x write 12x 4096\n",
    )
    .unwrap();
    let e = one_line_error(&[
        "simulate",
        "--trace",
        bad.to_str().unwrap(),
        "--link",
        "1M",
        "--every",
        "1s",
        "--policy",
        "oracle",
    ]);
    assert!(e.contains("line 3") && e.contains("12x"), "{e}");
    let e = one_line_error(&[
        "simulate", "--trace", t, "--link", "1M", "--every", "1h", "--policy", "oracle",
    ]);
    assert!(e.contains("shorter than one interval"), "{e}");
    let e = one_line_error(&[
        "simulate",
        "--trace",
        "/nonexistent/t.iolog",
        "--link",
        "1M",
        "--every",
        "1s",
        "--policy",
        "oracle",
    ]);
    assert!(e.contains("/nonexistent/t.iolog"), "{e}");
}

/// Schedule options are checked before anything else happens.
#[test]
fn serve_schedule_options_are_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.img");
    std::fs::write(&f, vec![0u8; 8192]).unwrap();
    let f = f.to_str().unwrap();
    let dest = format!("file://{}", dir.path().join("dest").display());
    let e = one_line_error(&[
        "serve",
        "--backing",
        f,
        "--dest",
        &dest,
        "--schedule",
        "0 0 30 2 *",
    ]);
    assert!(e.contains("never"), "{e}");
    let e = one_line_error(&["serve", "--backing", f, "--dest", &dest, "--every", "soon"]);
    assert!(e.contains("invalid interval"), "{e}");
    let e = one_line_error(&["serve", "--backing", f, "--every", "15m"]);
    assert!(e.contains("--dest"), "a schedule needs a destination: {e}");
    let e = one_line_error(&[
        "serve",
        "--backing",
        f,
        "--dest",
        &dest,
        "--every",
        "15m",
        "--upload-cap",
        "08:00-07:00=lots",
    ]);
    assert!(e.contains("invalid rate 'lots'"), "{e}");
    let e = one_line_error(&[
        "serve",
        "--backing",
        f,
        "--dest",
        &dest,
        "--every",
        "15m",
        "--policy",
        "later",
    ]);
    assert!(e.contains("predictive"), "{e}");
}

/// `backup --dest-policy mirror` to two directories: a directory new to
/// the volume first receives the newest snapshot; `snapshots` says where
/// each snapshot is; each copy restores alone, bit-exact; damage at one
/// copy is found by `verify` and passed over by `restore`, which reads
/// from both. Bad policy/destination combinations are one-line errors.
#[test]
fn mirrored_backups_restore_from_every_copy() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol.img");
    let image = write_image(&vol, 6, 2_654_435_761);
    let a = format!("file://{}", dir.path().join("a").display());
    let b = format!("file://{}", dir.path().join("b").display());
    let backup = |dests: &[&str], policy: &str| backup_to(&vol, dests, policy);
    // Snapshots 1 and 2 at a only; snapshot 3 mirrored: b first gets
    // snapshot 2's objects and manifest (what snapshot 3 builds on).
    assert!(backup(&[&a], "single").contains("snapshot 1 uploaded"));
    assert!(backup(&[&a], "single").contains("snapshot 2 uploaded"));
    assert!(backup(&[&a, &b], "mirror").contains("snapshot 3 uploaded"));
    let listed =
        common::run(foresnap().args(["snapshots", "--volume", "v", "--dest", &a, "--dest", &b]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(
        lines[0].starts_with("snapshot 1 ")
            && lines[0].ends_with(&format!("complete at: {a}  not at: {b}")),
        "{listed}"
    );
    for l in &lines[1..] {
        assert!(l.ends_with(&format!("complete at: {a}, {b}")), "{listed}");
    }

    let restore = |dests: &[&str], to: &str| {
        let mut c = foresnap();
        c.args([
            "restore",
            "--volume",
            "v",
            "--snapshot",
            "2",
            "--workers",
            "2",
        ]);
        for d in dests {
            c.args(["--dest", d]);
        }
        c.arg("--to").arg(dir.path().join(to));
        let out = c.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), text, err)
    };
    for (dests, to) in [
        (vec![&a[..]], "from-a"),
        (vec![&b[..]], "from-b"),
        (vec![&a[..], &b[..]], "from-both"),
    ] {
        let (ok, text, err) = restore(&dests, to);
        assert!(ok, "{dests:?}: {err}");
        assert!(
            std::fs::read(dir.path().join(to)).unwrap() == image,
            "{dests:?}"
        );
        if dests.len() == 2 {
            assert!(
                text.contains(&format!("read from {a}: "))
                    && text.contains(&format!("read from {b}: ")),
                "{text}"
            );
        }
    }
    common::run(foresnap().args(["verify", "--volume", "v", "--dest", &a, "--dest", &b]));

    // Damage one object at a and remove another: verify names them at a,
    // a alone cannot restore, the mirror restores from b.
    let objects: Vec<std::path::PathBuf> = walk(&dir.path().join("a/v/objects"));
    assert!(objects.len() >= 6, "{objects:?}");
    let mut bytes = std::fs::read(&objects[0]).unwrap();
    bytes[80] ^= 4;
    std::fs::remove_file(&objects[0]).unwrap();
    std::fs::write(&objects[0], &bytes).unwrap();
    std::fs::remove_file(&objects[3]).unwrap();
    let out = foresnap()
        .args(["verify", "--volume", "v", "--dest", &a, "--dest", &b])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("BAD ").count(), 2, "{text}");
    assert!(
        text.contains(&format!("at {b}: ")) && text.contains(", 0 bad"),
        "{text}"
    );
    let (ok, _, _) = restore(&[&a], "damaged-a");
    assert!(!ok, "a damaged copy restored");
    assert!(!dir.path().join("damaged-a").exists());
    let (ok, text, err) = restore(&[&a, &b], "failover");
    assert!(ok, "{err}");
    assert!(std::fs::read(dir.path().join("failover")).unwrap() == image);
    assert!(text.contains(&format!("read from {b}: ")), "{text}");

    let v = vol.to_str().unwrap();
    let e = one_line_error(&["backup", "--backing", v, "--dest", &a, "--dest", &b]);
    assert!(e.contains("--dest-policy mirror"), "{e}");
    let e = one_line_error(&[
        "backup",
        "--backing",
        v,
        "--dest",
        &a,
        "--dest-policy",
        "mirror",
    ]);
    assert!(e.contains("two or more"), "{e}");
    let e = one_line_error(&[
        "restore", "--volume", "v", "--dest", &a, "--dest", &a, "--to", "/tmp/x",
    ]);
    assert!(e.contains("given twice"), "{e}");
    let e = one_line_error(&[
        "backup",
        "--backing",
        v,
        "--dest",
        &a,
        "--dest-policy",
        "scatter",
    ]);
    assert!(e.contains("scatter"), "{e}");
}

/// Snapshots 1 to 3 of volume `v` are complete at `at[id - 1]` alone (as
/// `snapshots` over both `dests` says) and restore from there to `image`.
fn each_complete_at(dir: &std::path::Path, at: [&String; 3], dests: [&String; 2], image: &[u8]) {
    let [a, b] = dests;
    let listed =
        common::run(foresnap().args(["snapshots", "--volume", "v", "--dest", a, "--dest", b]));
    let got: Vec<&str> = listed
        .lines()
        .map(|l| l.split("complete at: ").nth(1).unwrap_or(""))
        .collect();
    let other = |d: &String| if d == a { b } else { a };
    let want: Vec<String> = at
        .iter()
        .map(|d| format!("{d}  not at: {}", other(d)))
        .collect();
    assert_eq!(got, want, "{listed}");
    for (i, d) in at.iter().enumerate() {
        let id = (i + 1).to_string();
        let to = dir.join(format!("r{id}"));
        assert!(restored(d, &id, &to) == image, "snapshot {id} from {d}");
    }
}

/// `backup --dest-policy alternate` over two directories: snapshots
/// alternate, each complete and restorable from its own directory alone.
#[test]
fn alternating_backups_are_each_complete_at_their_destination() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol.img");
    let image = write_image(&vol, 3, 2_246_822_519);
    let a = format!("file://{}", dir.path().join("a").display());
    let b = format!("file://{}", dir.path().join("b").display());
    for id in 1..=3 {
        let text = backup_to(&vol, &[&a, &b], "alternate");
        assert!(
            text.contains(&format!("snapshot {id} uploaded to alternate(")),
            "{text}"
        );
    }
    each_complete_at(dir.path(), [&a, &b, &a], [&a, &b], &image);
    let e = one_line_error(&[
        "backup",
        "--backing",
        vol.to_str().unwrap(),
        "--dest",
        &a,
        "--dest-policy",
        "alternate",
    ]);
    assert!(e.contains("two or more"), "{e}");
}

/// The chunks whose objects are under `dest` (a directory URL) for
/// volume `v`.
fn chunks_at(dest: &str) -> Vec<u64> {
    let dir = std::path::PathBuf::from(dest.strip_prefix("file://").unwrap()).join("v/objects");
    let mut chunks: Vec<u64> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    chunks.sort_unstable();
    chunks
}

/// `backup --dest-policy stripe --stripe-range 1M` over two directories:
/// chunks 0 and 2 at A, 1 at B, for both snapshots (the second shares the
/// first's objects; new layouts and deltas are `copies`' unit tests); the set lists each
/// snapshot complete, one member alone says what is missing; a restore
/// needs both (in any order) and is bit-exact; verify checks each
/// member's piece; a prune keeps the newest restorable. Bad input is one
/// line.
#[test]
fn striped_backups_spread_chunks_by_range_and_restore_from_all_members() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol.img");
    let first = write_image(&vol, 3, 2_246_822_519);
    let a = format!("file://{}", dir.path().join("a").display());
    let b = format!("file://{}", dir.path().join("b").display());
    let striped = |extra: &[&str]| {
        let mut c = foresnap();
        c.args(["backup", "--volume", "v", "--chunk-size", "1M"])
            .args(["--dest-policy", "stripe", "--dest", &a, "--dest", &b])
            .args(extra)
            .arg("--backing")
            .arg(&vol);
        c
    };
    // Runs `args --to DIR/name`: its output and the image it wrote.
    let image_of = |args: &[&str], name: &str| {
        let to = dir.path().join(name);
        let text = common::run(foresnap().args(args).arg("--to").arg(&to));
        (text, std::fs::read(&to).unwrap())
    };
    let text = common::run(&mut striped(&["--stripe-range", "1M"]));
    assert!(text.contains("snapshot 1 uploaded to stripe("), "{text}");
    // No write in between (there is no device here): snapshot 2 names
    // snapshot 1's objects, at the same members.
    let image = first.clone();
    common::run(&mut striped(&["--stripe-range", "1M"]));
    assert_eq!(chunks_at(&a), [0, 2]);
    assert_eq!(chunks_at(&b), [1]);

    let listed =
        common::run(foresnap().args(["snapshots", "--volume", "v", "--dest", &a, "--dest", &b]));
    assert_eq!(
        listed
            .matches(&format!("complete striped over: {a}, {b}"))
            .count(),
        2,
        "{listed}"
    );
    let alone = common::run(foresnap().args(["snapshots", "--volume", "v", "--dest", &a]));
    assert_eq!(
        alone
            .matches("NOT COMPLETE: striped over 2 destinations, piece 2 at none")
            .count(),
        2,
        "{alone}"
    );
    let e = one_line_error(&[
        "restore",
        "--volume",
        "v",
        "--dest",
        &a,
        "--to",
        "/tmp/never",
    ]);
    assert!(
        e.contains("striped over 2 destinations") && e.contains("piece 2"),
        "{e}"
    );
    for (id, want) in [("1", &first), ("2", &image)] {
        let restore = [
            "restore",
            "--volume",
            "v",
            "--snapshot",
            id,
            "--dest",
            &b,
            "--dest",
            &a,
        ];
        let (text, got) = image_of(&restore, &format!("r{id}"));
        assert!(got == *want, "snapshot {id}");
        // Every object read where it lives: no read errors.
        assert_eq!(text.matches(", 0 errors").count(), 2, "{text}");
    }
    let text =
        common::run(foresnap().args(["verify", "--volume", "v", "--dest", &a, "--dest", &b]));
    assert_eq!(text.matches(", 0 bad").count(), 2, "{text}");

    // Tiering moves whole snapshots from one destination: a piece is
    // refused, and stays.
    let slow = format!("file://{}", dir.path().join("slow").display());
    let e = one_line_error(&[
        "tier", "--fast", &a, "--slow", &slow, "--volume", "v", "--age", "0s",
    ]);
    assert!(
        e.contains("snapshot 1 is one piece of a stripe over 2"),
        "{e}"
    );
    assert_eq!(chunks_at(&a), [0, 2]);

    // A replica follows the stripe from both members; one is refused.
    let replicate = ["replicate", "--volume", "v", "--dest", &b, "--dest", &a];
    assert!(image_of(&replicate, "replica").1 == image);
    let never = dir.path().join("never");
    let e = one_line_error(&[
        "replicate",
        "--volume",
        "v",
        "--dest",
        &b,
        "--to",
        never.to_str().unwrap(),
    ]);
    assert!(!never.exists(), "a refused replica left its image");
    assert!(
        e.contains("striped over 2 destinations") && e.contains("piece 1"),
        "{e}"
    );

    common::run(foresnap().args([
        "prune",
        "--volume",
        "v",
        "--dest",
        &a,
        "--dest",
        &b,
        "--keep-last",
        "1",
    ]));
    let listed =
        common::run(foresnap().args(["snapshots", "--volume", "v", "--dest", &a, "--dest", &b]));
    assert!(
        listed.starts_with("snapshot 2 ") && listed.lines().count() == 1,
        "{listed}"
    );
    let restore = ["restore", "--volume", "v", "--dest", &a, "--dest", &b];
    assert!(image_of(&restore, "after-prune").1 == image);

    // Bad input: one line each.
    let refused = |dests: &[&str], words: &str| {
        let mut args = vec!["backup", "--backing", vol.to_str().unwrap()];
        for d in dests {
            args.extend(["--dest", d]);
        }
        args.extend(words.split(' '));
        one_line_error(&args)
    };
    for (dests, words, why) in [
        (&[&a][..], "--dest-policy stripe", "needs 2 to 255 --dest"),
        (
            &[&a, &b],
            "--dest-policy mirror --stripe-range 1M",
            "--stripe-range is for --dest-policy stripe",
        ),
        (
            &[&a, &b],
            "--dest-policy stripe --stripe-range 3M",
            "invalid stripe range '3M'",
        ),
        (
            &[&a, &b],
            "--volume w --chunk-size 4M --dest-policy stripe --stripe-range 2M",
            "below the volume's chunk size",
        ),
    ] {
        let dests: Vec<&str> = dests.iter().map(|d| d.as_str()).collect();
        let e = refused(&dests, words);
        assert!(e.contains(why), "{words}: {e}");
    }
}

/// `backup --dest-policy price` over two directories, A with cheap storage
/// and dear PUTs, B the other way: snapshot 1 goes to A (nothing measured
/// yet), then the puts its manifest shows make B cheaper, so snapshots 2
/// and 3 go to B, each complete there; the report gives each forecast.
#[test]
fn priced_backups_go_where_the_forecast_is_lowest() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol.img");
    let image = write_image(&vol, 3, 2_246_822_519);
    let a = format!("file://{}", dir.path().join("a").display());
    let b = format!("file://{}", dir.path().join("b").display());
    let priced = || {
        let mut c = foresnap();
        c.args(["backup", "--volume", "v", "--chunk-size", "1M"])
            .args(["--dest-policy", "price", "--dest", &a, "--dest", &b])
            .args([
                "--price",
                "storage=0.01,put=5",
                "--price",
                "storage=0.02,put=0.005",
            ])
            .arg("--backing")
            .arg(&vol);
        common::run(&mut c)
    };
    let first = priced();
    assert!(first.contains("snapshot 1 uploaded to price("), "{first}");
    assert!(
        first.contains(&format!("forecast at {b}: ")) && first.contains("<- next snapshot"),
        "{first}"
    );
    let next = first.lines().find(|l| l.contains("<- next")).unwrap();
    assert!(next.starts_with(&format!("forecast at {b}: ")), "{first}");
    priced();
    priced();
    each_complete_at(dir.path(), [&a, &b, &b], [&a, &b], &image);
    let v = vol.to_str().unwrap();
    let e = one_line_error(&[
        "backup",
        "--backing",
        v,
        "--dest",
        &a,
        "--dest",
        &b,
        "--dest-policy",
        "price",
        "--price",
        "storage=1",
    ]);
    assert!(e.contains("one --price for each"), "{e}");
    let e = one_line_error(&[
        "backup",
        "--backing",
        v,
        "--dest",
        &a,
        "--price",
        "storage=1",
    ]);
    assert!(e.contains("--price is for --dest-policy price"), "{e}");
    let e = one_line_error(&["backup", "--backing", v, "--dest", &a, "--price", "disk=1"]);
    assert!(e.contains("invalid price field \"disk\""), "{e}");
}

/// `tier` after two backups into a fast directory, with `--age 0s`:
/// snapshot 1 moves to the slow directory and restores from it alone,
/// bit-exact; snapshot 2, the newest, stays at the fast one with the
/// objects it shares with 1, and restores from there alone. `--watch`
/// runs until SIGTERM. Bad input is one line.
#[test]
fn tier_moves_old_snapshots_to_the_slow_destination() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol.img");
    let image = write_image(&vol, 3, 2_654_435_761);
    let fast = format!("file://{}", dir.path().join("fast").display());
    let slow = format!("file://{}", dir.path().join("slow").display());
    for id in 1..=2 {
        let text = backup_to(&vol, &[&fast], "single");
        assert!(text.contains(&format!("snapshot {id} uploaded")), "{text}");
    }
    let tier = |extra: &[&str]| {
        let mut c = foresnap();
        c.args(["tier", "--fast", &fast, "--slow", &slow, "--volume", "v"])
            .args(extra);
        c
    };
    let text = common::run(&mut tier(&["--age", "0s"]));
    assert!(
        text.contains(&format!("snapshot 1 moved from {fast} to {slow}")),
        "{text}"
    );
    assert!(!text.contains("snapshot 2 moved"), "{text}");
    assert!(
        text.contains("1 snapshot moved") && text.contains("snapshot 2 stays at"),
        "{text}"
    );
    let listed = common::run(foresnap().args([
        "snapshots",
        "--volume",
        "v",
        "--dest",
        &fast,
        "--dest",
        &slow,
    ]));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].starts_with("snapshot 1 ")
            && lines[0].ends_with(&format!("complete at: {slow}  not at: {fast}")),
        "{listed}"
    );
    assert!(
        lines[1].starts_with("snapshot 2 ")
            && lines[1].ends_with(&format!("complete at: {fast}  not at: {slow}")),
        "{listed}"
    );
    for (id, d) in [("1", &slow), ("2", &fast)] {
        let to = dir.path().join(format!("r{id}"));
        assert!(restored(d, id, &to) == image, "snapshot {id} from {d}");
    }

    // --watch: a round, then the wait, ended by SIGTERM with success.
    let mut child = tier(&["--age", "1h", "--watch", "100ms"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(
        first.starts_with("volume v: 0 snapshots moved"),
        "{first:?}"
    );
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "--watch ignored SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");

    let args = |extra: &[&str]| -> Vec<String> {
        ["tier", "--fast", &fast, "--slow", &slow, "--volume", "v"]
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };
    let err = |a: Vec<String>| {
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        one_line_error(&a)
    };
    let e = err(args(&["--age", "soon"]));
    assert!(e.contains("invalid interval 'soon'"), "{e}");
    let e = one_line_error(&[
        "tier", "--fast", &fast, "--slow", &fast, "--volume", "v", "--age", "1h",
    ]);
    assert!(e.contains("both the fast and the slow"), "{e}");
    let e = err(args(&["--age", "1h", "--watch", "0"]));
    assert!(e.contains("invalid interval '0'"), "{e}");
}

/// A `mib` MiB image of pseudo-random bytes (`mul` varies it) at `path`.
fn write_image(path: &std::path::Path, mib: u32, mul: u32) -> Vec<u8> {
    let image: Vec<u8> = (0..mib << 20)
        .map(|i| (i.wrapping_mul(mul) >> 11).to_le_bytes()[0])
        .collect();
    std::fs::write(path, &image).unwrap();
    image
}

/// `foresnap backup` of `vol` as volume `v` (1 MiB chunks) to `dests`
/// under `policy`: its report.
fn backup_to(vol: &std::path::Path, dests: &[&str], policy: &str) -> String {
    let mut c = foresnap();
    c.args(["backup", "--volume", "v", "--chunk-size", "1M"])
        .args(["--dest-policy", policy]);
    for d in dests {
        c.args(["--dest", d]);
    }
    common::run(c.arg("--backing").arg(vol))
}

/// `dest` lists exactly snapshots `ids` of volume `v`, and each restores
/// to `images[id - 1]`.
fn assert_holds(dest: &str, ids: &[usize], images: &[Vec<u8>], scratch: &std::path::Path) {
    let listed = common::run(foresnap().args(["snapshots", "--volume", "v", "--dest", dest]));
    let listed_ids: Vec<usize> = listed
        .lines()
        .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
        .collect();
    assert_eq!(listed_ids, ids, "{dest}: {listed}");
    for &id in ids {
        let to = scratch.join(format!("r{id}"));
        assert!(
            restored(dest, &id.to_string(), &to) == images[id - 1],
            "snapshot {id} at {dest}"
        );
        std::fs::remove_file(&to).unwrap();
    }
}

/// Snapshot `id` of volume `v` restored from `dest` alone to `to`: its bytes.
fn restored(dest: &str, id: &str, to: &std::path::Path) -> Vec<u8> {
    let args = ["restore", "--volume", "v", "--snapshot", id, "--dest", dest];
    common::run(foresnap().args(args).arg("--to").arg(to));
    std::fs::read(to).unwrap()
}

/// The files under `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Snapshots 1..=5 of volume `v` (3 chunks of 1 MiB) in directory `root`,
/// closed `hours` after 2024-01-01 00:00 UTC: 1 full, each later one
/// storing chunk `(n - 1) % 3` anew. Returns the images.
fn snapshots_at(root: &std::path::Path, hours: &[u64]) -> Vec<Vec<u8>> {
    use foresnap_uploader::format::{Codec, Keys, Manifest};
    use foresnap_uploader::restore::SnapshotWriter;
    const MIB: usize = 1 << 20;
    let dest = foresnap_uploader::DirDestination::open(root).unwrap();
    let keys = Keys::new("v").unwrap();
    let base = Manifest {
        volume_id: [3; 16],
        snapshot: 0,
        parent: 0,
        closed_ms: 0,
        volume_bytes: 3 << 20,
        block_bytes: 4096,
        chunk_bytes: 1 << 20,
        chunks: Vec::new(),
        stripe: None,
    };
    let mut image: Vec<u8> = (0..3 * MIB).map(|i| (i % 253).to_le_bytes()[0]).collect();
    let (mut images, mut parent) = (Vec::new(), None);
    for (n, h) in (1u32..).zip(hours) {
        let closed = 1_704_067_200_000 + h * 3_600_000;
        let w = SnapshotWriter::new(&dest, &keys, &base, parent.as_ref(), n, closed, Codec::None);
        let chunks = if n == 1 {
            0..3
        } else {
            (n as usize - 1) % 3..(n as usize - 1) % 3 + 1
        };
        for c in chunks {
            let chunk = &mut image[c * MIB..(c + 1) * MIB];
            chunk
                .iter_mut()
                .for_each(|x| *x = x.wrapping_mul(3).wrapping_add(n.to_le_bytes()[0]));
            w.put_chunk(c as u64, chunk).unwrap();
        }
        parent = Some(w.commit().unwrap());
        images.push(image.clone());
    }
    images
}

/// `prune --keep-last 1 --keep-daily 2` over snapshots on three days: the
/// dry run says what goes and changes nothing; the run drops 1, 2, 3 and
/// the three objects only they needed, at each --dest on its own; 4 and
/// 5 restore bit-exact. Bad input is one line.
#[test]
fn prune_keeps_what_the_rules_say_and_the_rest_goes() {
    let dir = tempfile::tempdir().unwrap();
    let images = snapshots_at(&dir.path().join("a"), &[1, 2, 26, 27, 50]);
    let a = format!("file://{}", dir.path().join("a").display());
    let b = format!("file://{}", dir.path().join("b").display());
    let prune = |dests: &[&str], extra: &[&str]| {
        let mut c = foresnap();
        c.args(["prune", "--volume", "v"])
            .args(["--keep-last", "1", "--keep-daily", "2"]);
        for d in dests {
            c.args(["--dest", d]);
        }
        common::run(c.args(extra))
    };
    let files = || -> Vec<(std::path::PathBuf, Vec<u8>)> {
        walk(&dir.path().join("a/v"))
            .into_iter()
            .map(|p| {
                let b = std::fs::read(&p).unwrap();
                (p, b)
            })
            .collect()
    };
    let before = files();
    let text = prune(&[&a], &["--dry-run"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(
        lines[0],
        "snapshot 1  closed 2024-01-01 01:00:00 UTC  to drop"
    );
    assert_eq!(
        lines[3],
        "snapshot 4  closed 2024-01-02 03:00:00 UTC  kept (daily)"
    );
    assert_eq!(
        lines[4],
        "snapshot 5  closed 2024-01-03 02:00:00 UTC  kept (newest, last, daily)"
    );
    assert_eq!(
        lines[5],
        format!(
            "volume v at {a}: 2 snapshots kept, 3 to drop, 3 objects to delete (dry run: nothing was deleted)"
        )
    );
    assert!(files() == before, "a dry run changed something");

    let text = prune(&[&a, &b], &[]);
    assert!(
        text.contains("snapshot 2  closed 2024-01-01 02:00:00 UTC  dropped"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "volume v at {a}: 2 snapshots kept, 3 dropped, 3 objects deleted\n"
        )) && text.ends_with(&format!(
            "volume v at {b}: 0 snapshots kept, 0 dropped, 0 objects deleted\n"
        )),
        "{text}"
    );
    assert_eq!(files().len(), before.len() - 6, "3 manifests and 3 objects");
    assert_holds(&a, &[4, 5], &images, dir.path());

    let e = one_line_error(&["prune", "--dest", &a, "--volume", "v"]);
    assert!(
        e.contains("--keep-last") && e.contains("--keep-weekly"),
        "{e}"
    );
    let e = one_line_error(&["prune", "--dest", &a, "--volume", "v", "--keep-daily", "0"]);
    assert!(e.contains("invalid count '0'"), "{e}");
    let e = one_line_error(&[
        "prune",
        "--dest",
        "file://rel",
        "--volume",
        "v",
        "--keep-last",
        "1",
    ]);
    assert!(e.contains("absolute path"), "{e}");
    std::fs::create_dir_all(dir.path().join("a/v/tiering")).unwrap();
    std::fs::write(dir.path().join("a/v/tiering/0000000004"), "x").unwrap();
    let e = one_line_error(&["prune", "--dest", &a, "--volume", "v", "--keep-last", "1"]);
    assert!(
        e.contains("foresnap tier") && e.contains("nothing was pruned"),
        "{e}"
    );
    assert_eq!(
        files().len(),
        before.len() - 5,
        "only the tiering journal was added"
    );
}

/// `backup --keep-last 2` to two destinations (mirror): after four
/// backups, each holds snapshots 3 and 4, which restore to the volume at
/// their backups; a rule of 0 is refused before anything runs.
#[test]
fn backup_with_a_rule_prunes_each_destination_after_its_upload() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    let mut images = vec![write_image(&vol, 4, 7)];
    let a = format!("file://{}", dir.path().join("a").display());
    let b = format!("file://{}", dir.path().join("b").display());
    let backup = || {
        let mut c = foresnap();
        c.args(["backup", "--volume", "v", "--chunk-size", "1M"])
            .args(["--dest-policy", "mirror", "--dest", &a, "--dest", &b])
            .args(["--keep-last", "2"]);
        common::run(c.arg("--backing").arg(&vol))
    };
    for n in 1..=4u8 {
        if n > 1 {
            tracked_write(&vol, (u64::from(n) - 1) << 20, &[n; 8192]);
            images.push(std::fs::read(&vol).unwrap());
        }
        let text = backup();
        assert!(text.contains(&format!("snapshot {n} uploaded")), "{text}");
        if n == 3 {
            assert!(
                text.contains(&format!("volume v at {a}: 2 snapshots kept, 1 dropped")),
                "{text}"
            );
        }
    }
    for d in [&a, &b] {
        assert_holds(d, &[3, 4], &images, dir.path());
    }
    let v = vol.display().to_string();
    let e = one_line_error(&["backup", "--backing", &v, "--dest", &a, "--keep-last", "0"]);
    assert!(e.contains("invalid count '0'"), "{e}");
    let e = one_line_error(&["backup", "--backing", &v, "--keep-daily", "7"]);
    assert!(e.contains("give a --dest"), "{e}");
}

/// `status --watch 0.2` against a stand-in for the daemon's control
/// socket that answers three times and goes: three refreshes, each a
/// whole status with the time (the pruner's standing: none, ok, failing),
/// then one line on stderr and a non-zero exit.
#[test]
fn status_watch_refreshes_until_the_daemon_goes() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("d.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let path = sock.clone();
    let daemon = std::thread::spawn(move || {
        for epoch in 1..=3 {
            let (conn, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&conn).read_line(&mut line).unwrap();
            assert!(line.contains("status"), "{line}");
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis();
            let now_ms = u64::try_from(now_ms).unwrap();
            let prune = match epoch {
                1 => serde_json::Value::Null,
                2 => serde_json::json!({
                    "last_run_ms": now_ms - 5000, "after_snapshot": 7, "kept": 4,
                    "dropped_total": 3, "failing_since_ms": null, "last_error": null,
                }),
                _ => serde_json::json!({
                    "last_run_ms": now_ms, "after_snapshot": 7, "kept": 4,
                    "dropped_total": 3, "failing_since_ms": now_ms - 60_000,
                    "last_error": "file:///x: gone",
                }),
            };
            let answer = serde_json::json!({
                "prune": prune,
                "ok": true, "open_epoch": epoch, "pending_blocks": 10 * epoch,
                "ring_fill": 0.25, "degraded": false, "cow_blocks": 0,
                "preserve_slots_used": 0, "deferred_writes": 0,
                "upload": null, "schedule": null, "closed": [],
            });
            writeln!(&conn, "{answer}").unwrap();
        }
        std::fs::remove_file(&path).unwrap();
    });
    let out = foresnap()
        .args(["status", "--watch", "0.2", "--control"])
        .arg(&sock)
        .output()
        .unwrap();
    daemon.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    for epoch in 1..=3 {
        assert!(
            stdout.contains(&format!(
                "open epoch        {epoch}\npending blocks    {}",
                10 * epoch
            )),
            "{stdout}"
        );
    }
    assert_eq!(
        stdout.matches(" UTC (every 0.2 s; ^C to stop)").count(),
        3,
        "{stdout}"
    );
    assert_eq!(stdout.matches("\nprune ").count(), 2, "{stdout}");
    assert!(
        stdout.contains(" s ago, after snapshot 7: 4 kept, 3 dropped since start"),
        "{stdout}"
    );
    assert!(
        stdout.contains("prune             FAILING for 60 s: file:///x: gone;"),
        "{stdout}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("stopped answering"), "{stderr}");
}

/// A `mib` MiB image of random bytes with `MARKER` at the start of every
/// 4 KiB: incompressible, so a stored object holds the marker unless it
/// is encrypted.
fn marked_image(path: &std::path::Path, mib: u32, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut image: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect();
    for block in image.chunks_mut(4096) {
        block[..MARKER.len()].copy_from_slice(MARKER);
    }
    std::fs::write(path, &image).unwrap();
    image
}

const MARKER: &[u8] = b"FORESNAP-PLAINTEXT-MARKER-0123456789";

/// The stored files under `root` that hold `pattern`.
fn files_holding(root: &std::path::Path, pattern: &[u8]) -> Vec<std::path::PathBuf> {
    walk(root)
        .into_iter()
        .filter(|p| {
            std::fs::read(p)
                .unwrap()
                .windows(pattern.len())
                .any(|w| w == pattern)
        })
        .collect()
}

/// Encrypted snapshots: a mirrored volume backed up twice with a key
/// restores bit-exact from each copy, and no stored file holds the
/// image's marker or a manifest's magic, though the same data backed up
/// without a key does (the control: the search can fail). A wrong key,
/// no key, a key for an unencrypted volume and an exposed key file are
/// each refused in one line; a damaged or moved object is named by
/// `verify` and never restored.
#[test]
fn encrypted_snapshots_round_trip_and_store_no_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(n);
    let url = |n: &str| format!("file://{}", path(n).display());
    let s = |p: std::path::PathBuf| p.display().to_string();

    // The control: without a key the marker is in the objects.
    let plain = path("plain");
    marked_image(&plain, 4, 1);
    backup_to(&plain, &[&url("p")], "single");
    assert!(!files_holding(&path("p"), MARKER).is_empty());
    assert!(!files_holding(&path("p"), b"FSNPMANI").is_empty());

    let key = path("key");
    let text = common::run(foresnap().args(["keygen", "--out", &s(key.clone())]));
    assert!(
        text.starts_with("key ") && text.contains("written to"),
        "{text}"
    );
    // The memory bound counts the sealed copies: a worker needs 3 chunks
    // at a directory, 5 with a key, 7 at a sealed mirror of two.
    let (m1, m2) = (url("m1"), url("m2"));
    let bound = |extra: &[&str]| {
        let mut a = vec!["backup", "--backing", "/nonexistent", "--volume", "v"];
        a.extend(["--chunk-size", "1M", "--dest", &m1]);
        a.extend(extra);
        one_line_error(&a)
    };
    let key_s = s(key.clone());
    let e = bound(&["--upload-memory", "3M"]);
    assert!(e.contains("below") && e.contains("3 chunks"), "{e}");
    let e = bound(&["--upload-memory", "5M", "--key-file", &key_s]);
    assert!(e.contains("below") && e.contains("5 chunks"), "{e}");
    let e = bound(&[
        "--upload-memory",
        "6M",
        "--key-file",
        &key_s,
        "--dest-policy",
        "mirror",
        "--dest",
        &m2,
    ]);
    assert!(e.contains("below") && e.contains("7 chunks"), "{e}");
    let vol = path("vol");
    let mut images = vec![marked_image(&vol, 4, 2)];
    let backup = || {
        let mut c = foresnap();
        c.args(["backup", "--volume", "v", "--chunk-size", "1M"])
            .args(["--dest-policy", "mirror", "--dest", &url("e1")])
            .args(["--dest", &url("e2"), "--key-file", &s(key.clone())]);
        common::run(c.arg("--backing").arg(&vol))
    };
    backup();
    // Snapshot 2 stores a delta.
    let mut change = MARKER.repeat(8192 / MARKER.len());
    change.resize(8192, b'!');
    tracked_write(&vol, 3 << 20, &change);
    images.push(std::fs::read(&vol).unwrap());
    let text = backup();
    assert!(text.contains("snapshot 2 uploaded"), "{text}");

    for d in ["e1", "e2"] {
        let held = files_holding(&path(d), MARKER);
        assert!(held.is_empty(), "plaintext in {held:?}");
        let held = files_holding(&path(d), b"FSNPMANI");
        assert!(held.is_empty(), "a manifest in the clear: {held:?}");
        for id in [1, 2] {
            let to = path(&format!("r-{d}-{id}"));
            common::run(
                foresnap()
                    .args(["restore", "--volume", "v", "--dest", &url(d)])
                    .args(["--snapshot", &id.to_string(), "--key-file", &s(key.clone())])
                    .arg("--to")
                    .arg(&to),
            );
            assert!(std::fs::read(&to).unwrap() == images[id - 1], "{d} {id}");
        }
    }
    // The key from the environment.
    let hex = std::fs::read_to_string(&key).unwrap();
    let listed = common::run(
        foresnap()
            .args(["snapshots", "--volume", "v", "--dest", &url("e1")])
            .args(["--key-env", "FORESNAP_TEST_KEY"])
            .env("FORESNAP_TEST_KEY", hex.trim()),
    );
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let verified = common::run(
        foresnap()
            .args(["verify", "--volume", "v", "--dest", &url("e2")])
            .args(["--key-file", &s(key.clone())]),
    );
    assert!(verified.contains(" 0 bad"), "{verified}");

    // Refusals, each one line.
    let e1 = url("e1");
    let restore = |extra: &[&str]| {
        let mut a = vec!["restore", "--volume", "v", "--dest", &e1];
        a.extend_from_slice(extra);
        a.extend_from_slice(&["--to", "/nonexistent/never"]);
        one_line_error(&a)
    };
    let e = restore(&[]);
    assert!(
        e.contains("is encrypted (XChaCha20-Poly1305, key id") && e.contains("--key-file"),
        "{e}"
    );
    let other = path("other.key");
    common::run(foresnap().args(["keygen", "--out", &s(other.clone())]));
    let e = restore(&["--key-file", &s(other.clone())]);
    assert!(e.contains("wrong key"), "{e}");
    let e = one_line_error(&["keygen", "--out", &s(other)]);
    assert!(e.contains("exists"), "{e}");
    let e = one_line_error(&[
        "backup",
        "--volume",
        "v",
        "--dest",
        &url("p"),
        "--key-file",
        &s(key.clone()),
        "--backing",
        &s(plain),
    ]);
    assert!(e.contains("is not encrypted"), "{e}");
    let e = restore(&["--key-env", "FORESNAP_TEST_UNSET_KEY"]);
    assert!(e.contains("is not set"), "{e}");
    let exposed = path("exposed.key");
    std::fs::copy(&key, &exposed).unwrap();
    std::fs::set_permissions(
        &exposed,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let e = restore(&["--key-file", &s(exposed)]);
    assert!(e.contains("chmod 600"), "{e}");

    // Damage at e1: one flipped byte, and snapshot 1's object of chunk 3
    // put in the place of snapshot 2's.
    let objects: Vec<_> = walk(&path("e1"))
        .into_iter()
        .filter(|p| s(p.clone()).contains("/objects/"))
        .collect();
    let named = |chunk: &str, name: &str| {
        objects
            .iter()
            .find(|p| s((*p).clone()).contains(chunk) && s((*p).clone()).ends_with(name))
            .unwrap_or_else(|| panic!("no {chunk} {name} in {objects:?}"))
            .clone()
    };
    let own_delta = named("/000000000003/", "0000000002.delta");
    let old_chunk = named("/000000000003/", "0000000001.chunk");
    let moved = std::fs::read(&old_chunk).unwrap();
    std::fs::write(&own_delta, &moved).unwrap();
    let flipped = named("/000000000000/", "0000000001.chunk");
    let mut b = std::fs::read(&flipped).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x04;
    std::fs::write(&flipped, &b).unwrap();
    let out = foresnap()
        .args(["verify", "--volume", "v", "--dest", &e1])
        .args(["--key-file", &s(key.clone())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = report.lines().filter(|l| l.starts_with("BAD ")).collect();
    assert_eq!(bad.len(), 2, "{report}");
    assert!(
        bad.iter().all(|l| l.contains("does not authenticate")),
        "{report}"
    );
    assert!(
        bad.iter()
            .any(|l| l.contains("000000000003/0000000002.delta")),
        "the moved object is not named: {report}"
    );
    let to = path("r-damaged");
    let out = foresnap()
        .args(["restore", "--volume", "v", "--dest", &e1, "--snapshot", "2"])
        .args(["--key-file", &s(key.clone()), "--to", &s(to.clone())])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("does not authenticate"), "{e}");
    assert!(!to.exists(), "a failed restore left {to:?}");
}

/// `restore --lazy --metrics`: an address off the loopback interface is
/// refused before the restore makes its file (or state), and `--metrics`
/// without `--lazy` is refused: a plain restore serves nothing.
#[test]
fn lazy_restore_metrics_address_is_checked_first() {
    let dir = tempfile::tempdir().unwrap();
    let vol = dir.path().join("vol");
    marked_image(&vol, 1, 5);
    let dest = format!("file://{}", dir.path().join("d").display());
    backup_to(&vol, &[&dest], "single");
    let to = dir.path().join("restored");
    let to_s = to.display().to_string();
    let restore = ["restore", "--dest", &dest, "--volume", "v", "--to", &to_s];
    let e = one_line_error(&[&restore[..], &["--lazy", "--metrics", "10.1.2.3:9477"]].concat());
    assert!(e.contains("loopback"), "{e}");
    let e = one_line_error(&[&restore[..], &["--lazy", "--metrics", "nonsense"]].concat());
    assert!(e.contains("IP:PORT"), "{e}");
    assert!(!to.exists(), "a refused restore made {to_s}");
    assert!(
        std::fs::read_dir(dir.path()).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains("hydration")),
        "a refused restore left a hydration state"
    );
    let out = foresnap()
        .args(restore)
        .args(["--metrics", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--lazy"), "{err}");
    assert!(!to.exists(), "a refused restore made {to_s}");
}

/// Issue 6's replication on a host: a replica made from a volume's newest
/// snapshot, then kept equal to each new one by a follower that writes
/// only the changed chunks; a run killed mid-apply (crash point
/// `replica`) leaves the state at the old snapshot, and the next run
/// finishes it exactly. What is not a replica is never written.
#[test]
fn a_replica_follows_each_snapshot_and_a_killed_apply_is_finished() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let vol = p.join("vol.img");
    write_image(&vol, 4, 7);
    let dest = format!("file://{}", p.join("dest").display());
    backup_to(&vol, &[&dest], "single");
    let replica = p.join("replica.img");
    let replicate = || {
        let mut c = foresnap();
        c.args([
            "replicate",
            "--dest",
            &dest,
            "--volume",
            "v",
            "--workers",
            "1",
            "--to",
        ])
        .arg(&replica);
        c
    };
    let out = common::run(&mut replicate());
    assert!(
        out.contains("at snapshot 1: 4 of 4 chunks written (4 MiB)"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        std::fs::read(&vol).unwrap()
    );
    assert!(
        common::run(&mut replicate()).is_empty(),
        "nothing newer: nothing done"
    );

    // A follower applies snapshot 2 (one chunk changed) as it comes.
    let mut follower = replicate()
        .args(["--follow", "--poll", "1s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rx = common::stdout_lines(&mut follower);
    tracked_write(&vol, (1 << 20) + 4096, &[0xAB; 8192]);
    let up = backup_to(&vol, &[&dest], "single");
    assert!(up.contains("snapshot 2 uploaded"), "{up}");
    let line = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the follower applies snapshot 2");
    assert!(
        line.contains("at snapshot 2: 1 of 4 chunks written (1 MiB)"),
        "{line}"
    );
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        std::fs::read(&vol).unwrap()
    );
    // A second writer of the same replica is refused while it follows.
    let out = replicate().output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is being written by another foresnap replicate"),
        "{err}"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(i32::try_from(follower.id()).unwrap(), libc::SIGTERM) };
    let status = follower.wait().unwrap();
    assert!(
        status.success(),
        "the follower stops cleanly on SIGTERM: {status}"
    );

    // Snapshot 3 changes chunks 0 and 3; the apply is killed after one.
    tracked_write(&vol, 0, &[0x11; 4096]);
    tracked_write(&vol, 3 << 20, &[0x33; 4096]);
    backup_to(&vol, &[&dest], "single");
    let out = replicate()
        .env("FORESNAP_CRASH_AT", "replica")
        .output()
        .unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{out:?}");
    let state = std::fs::read_to_string(p.join("replica.img.replica")).unwrap();
    assert!(state.contains("\nsnapshot 2\n"), "{state}");
    let mixed = std::fs::read(&replica).unwrap();
    assert_ne!(
        mixed,
        std::fs::read(&vol).unwrap(),
        "one of two chunks written"
    );
    let out = common::run(&mut replicate());
    assert!(
        out.contains("at snapshot 3: 2 of 4 chunks written"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        std::fs::read(&vol).unwrap()
    );

    let refused = |to: &std::path::Path| {
        let to = to.to_str().unwrap();
        one_line_error(&["replicate", "--dest", &dest, "--volume", "v", "--to", to])
    };
    // Not a replica: an existing file is never taken.
    let e = refused(&vol);
    assert!(e.contains("exists and is not a replica"), "{e}");
    // A damaged state is refused, not guessed at.
    let damaged = state.replace("snapshot 2", "snapshot 9");
    std::fs::write(p.join("replica.img.replica"), damaged).unwrap();
    let e = refused(&replica);
    assert!(e.contains("damaged replica state"), "{e}");
}

/// A loop device over a new file of `bytes` in `dir`, detached on drop.
struct Loop(String);

impl Loop {
    fn new(dir: &std::path::Path, name: &str, bytes: u64) -> Loop {
        let file = dir.join(name);
        std::fs::File::create(&file)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .expect("losetup (util-linux) must be installed");
        assert!(
            out.status.success(),
            "losetup: {} (needs root and loop devices: the VM test bed)",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// A replica on a block device (a loop device in the VM test bed): its
/// state must live elsewhere (`--state`), a device smaller than the volume
/// is refused before a byte is written, and each snapshot is applied onto
/// the device bit-exact.
#[test]
#[ignore = "needs root and loop devices: the VM test bed (scripts/test)"]
fn a_replica_on_a_block_device_keeps_its_state_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    let vol = p.join("vol.img");
    write_image(&vol, 4, 11);
    let dest = format!("file://{}", p.join("dest").display());
    backup_to(&vol, &[&dest], "single");
    let small = Loop::new(p, "small", 2 << 20);
    let big = Loop::new(p, "big", 8 << 20);
    let state = p.join("replica.state");
    let replicate = |dev: &str, state: Option<&std::path::Path>| {
        let mut c = foresnap();
        c.args(["replicate", "--dest", &dest, "--volume", "v", "--to", dev]);
        if let Some(s) = state {
            c.arg("--state").arg(s);
        }
        c.output().unwrap()
    };
    let out = replicate(&big.0, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("give --state FILE"),
        "{err}"
    );
    let out = replicate(&small.0, Some(&state));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the device has 2097152 bytes"),
        "{err}"
    );
    let device = |n: usize| {
        use std::io::Read as _;
        let mut b = vec![0u8; n];
        std::fs::File::open(&big.0)
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        b
    };
    for (id, written) in [(1, "4 of 4 chunks"), (2, "1 of 4 chunks")] {
        if id == 2 {
            tracked_write(&vol, 3 << 20, &[0x77; 8192]);
            backup_to(&vol, &[&dest], "single");
        }
        let out = replicate(&big.0, Some(&state));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.contains(&format!("at snapshot {id}: {written} written")),
            "{text}"
        );
        assert!(
            device(4 << 20) == std::fs::read(&vol).unwrap(),
            "snapshot {id}"
        );
    }
    assert!(
        std::fs::read_to_string(&state)
            .unwrap()
            .contains("\nsnapshot 2\n")
    );
}
