//! The binary's behaviour that needs no ublk: argument errors and the
//! report of a kernel without ublk. These run on every host.

mod common;

use common::foresnap;

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
