//! Helpers for the end-to-end tests: a `foresnap serve` child process that
//! is stopped on drop, shell commands that must succeed, checks of the
//! kernel's ublk state, and S3 servers on 127.0.0.1 ([`Server`]).
//!
//! Tests that need ublk are `#[ignore]`d with a reason on a plain
//! `cargo test`; `scripts/test` runs them inside the VM test bed (or
//! natively where the kernel has ublk) with `--ignored`, where
//! [`require_ublk`] makes a missing ublk a failure, never a silent pass.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use foresnap_uploader::s3::{S3Credentials, S3Destination, S3Url};

/// The `foresnap` binary under test.
pub fn foresnap() -> Command {
    Command::new(env!("CARGO_BIN_EXE_foresnap"))
}

/// Fails the test unless this kernel hosts ublk.
pub fn require_ublk() {
    assert!(
        Path::new("/dev/ublk-control").exists(),
        "this test needs ublk: run it through scripts/test (it uses the VM test bed)"
    );
}

/// A scratch directory on a file system that supports O_DIRECT and holes.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("foresnap-e2e-")
        .tempdir_in("/tmp")
        .expect("scratch dir")
}

/// The `/dev/ublkb*` block devices that exist now.
pub fn ublk_block_devices() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("ublkb"))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The ublk devices the kernel knows, including ones without a block node.
pub fn ublk_char_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/class/ublk-char")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Waits (up to 10 s: removal is asynchronous in the kernel) until no
/// ublk device is left, and fails the test naming the leftovers otherwise.
pub fn assert_no_ublk_devices() {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (b, c) = (ublk_block_devices(), ublk_char_devices());
        if b.is_empty() && c.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ublk devices left behind: {b:?} {c:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `cmd`, failing the test with its output unless it succeeds;
/// returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "command failed ({}): {cmd:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `sh -c script` like [`run`].
pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

/// Runs `sh -c script` and returns its whole output, success or not.
pub fn sh_output(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("spawn sh")
}

/// A running `foresnap serve`.
pub struct Daemon {
    child: Option<Child>,
    /// `/dev/ublkbN`.
    pub dev: PathBuf,
    pub id: u32,
    stderr: mpsc::Receiver<String>,
}

impl Daemon {
    /// Starts `foresnap serve ARGS` and waits for its ready line.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_as(&["serve"], args, &[])
    }

    /// Starts `foresnap serve ARGS` with extra environment variables.
    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_as(&["serve"], args, env)
    }

    /// Starts `foresnap restore --lazy ARGS` and waits for its ready line.
    pub fn start_lazy(args: &[&str]) -> Daemon {
        Daemon::start_as(&["restore", "--lazy"], args, &[])
    }

    /// Waits up to `timeout` for a stderr line containing `needle`; the
    /// lines before it are dropped.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return Some(l),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn start_as(command: &[&str], args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut child = foresnap()
            .args(command)
            .args(args)
            .envs(env.iter().copied())
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn foresnap");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let (ltx, lrx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if ltx.send(line).is_err() {
                    break;
                }
            }
        });
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[serve] {line}");
                let _ = etx.send(line);
            }
        });
        // Emulated VMs are slow: allow a generous start-up.
        let line = match lrx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let err: Vec<String> = erx.try_iter().collect();
                panic!("foresnap serve {args:?} did not become ready ({status:?}): {err:?}");
            }
        };
        let dev = line
            .strip_prefix("device ")
            .and_then(|l| l.strip_suffix(" ready"))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let id = dev
            .trim_start_matches("/dev/ublkb")
            .parse()
            .expect("device id");
        let dev = PathBuf::from(dev);
        wait_for_path(&dev);
        Daemon {
            child: Some(child),
            dev,
            id,
            stderr: erx,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits up to `timeout` for the daemon to exit on its own; its
    /// status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` and waits for the exit status.
    pub fn signal_and_wait(mut self, sig: i32) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = i32::try_from(child.id()).expect("pid");
        // SAFETY: kill(2) with a pid we spawned and still own.
        unsafe { libc::kill(pid, sig) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "foresnap serve did not exit after signal {sig}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops with SIGTERM and asserts a clean exit.
    pub fn stop(self) {
        let status = self.signal_and_wait(libc::SIGTERM);
        assert!(status.success(), "foresnap serve exited with {status}");
    }

    /// Kills with SIGKILL: the device stays, waiting for recovery.
    pub fn kill9(self) {
        let _ = self.signal_and_wait(libc::SIGKILL);
    }

    /// stderr lines received so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits up to 10 s for a device node to appear.
pub fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Bytes a file really occupies on disk.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat").blocks() * 512
}

/// sha256 of a file or device's first `len` bytes, via coreutils.
pub fn sha256(p: &Path, len: u64) -> String {
    sh(&format!(
        "head -c {len} {} | sha256sum | cut -d' ' -f1",
        p.display()
    ))
    .trim()
    .to_owned()
}

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The last 20 lines of the log at `path` on stderr, for a test that
/// failed with a helper process running (its log goes with the test's
/// directory).
pub fn print_tail(what: &str, path: &Path) {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    eprintln!("{what} log ({}), last lines:", path.display());
    for l in &lines[lines.len().saturating_sub(20)..] {
        eprintln!("  {l}");
    }
}

/// `GET path` from the metrics endpoint at `port`: the status line and
/// the body.
pub fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    write!(c, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut text = String::new();
    c.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    (
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

/// The value of the sample `name{labels}` (exactly so) in `text`; 0 if
/// absent (a counter not yet incremented).
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A running server, stopped on drop.
pub struct Server {
    pub kind: &'static str,
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl Server {
    pub fn start(kind: &'static str) -> Server {
        let dir = tempfile::Builder::new()
            .prefix(&format!("foresnap-s3-{kind}-"))
            .tempdir()
            .unwrap();
        let script = repo().join("scripts/lib/s3-server");
        let out = Command::new(&script)
            .args(["start", kind])
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{kind} did not start (run scripts/install-s3-tools first): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("env")).unwrap();
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches(['\'', '"']).to_owned()))
            .collect();
        Server { kind, dir, env }
    }

    pub fn var(&self, k: &str) -> &str {
        self.env
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing from the server's env file"))
    }

    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={}",
            self.var("S3_BUCKET"),
            self.var("S3_ENDPOINT")
        )
    }

    pub fn creds(&self) -> S3Credentials {
        S3Credentials {
            access_key_id: self.var("AWS_ACCESS_KEY_ID").to_owned(),
            secret_access_key: self.var("AWS_SECRET_ACCESS_KEY").to_owned(),
        }
    }

    pub fn open(&self, prefix: &str) -> S3Destination {
        S3Destination::open_with(S3Url::parse(&self.url(prefix)).unwrap(), Some(self.creds()))
            .unwrap_or_else(|e| panic!("{}: {e}", self.kind))
    }

    /// `foresnap ARGS` with this server's credentials in its environment
    /// (as a user's shell would have them) and nothing else of AWS's.
    pub fn foresnap(&self) -> Command {
        let mut c = foresnap();
        for k in ["AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE"] {
            c.env_remove(k);
        }
        c.env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", self.var("AWS_ACCESS_KEY_ID"))
            .env("AWS_SECRET_ACCESS_KEY", self.var("AWS_SECRET_ACCESS_KEY"));
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A test failing with this server up: the server's side of it
        // (the directory goes with the test).
        if std::thread::panicking() {
            print_tail(self.kind, &self.dir.path().join("server.log"));
        }
        let _ = Command::new(repo().join("scripts/lib/s3-server"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// Reproducible incompressible bytes.
pub fn pattern(len: u64, seed: u64) -> Vec<u8> {
    // xorshift: incompressible, reproducible.
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

/// Waits (at most 240 s) until `foresnap snapshots` lists snapshot `id` of
/// `volume` as complete at `dest`; `env` for its credentials.
pub fn wait_listed(dest: &str, volume: &str, id: u32, env: &[(&str, &str)]) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let out = foresnap()
            .args(["snapshots", "--dest", dest, "--volume", volume])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if text
            .lines()
            .any(|l| l.starts_with(&format!("snapshot {id} ")))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "snapshot {id} not complete at {dest} in 240 s: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Writes `data` at `offset` of the 4 MiB volume `vol` through its tracker
/// (its ring beside it, `VOL.fsring` as `serve` and `backup` name it), as a
/// device's write: the next backup sees it.
pub fn tracked_write(vol: &std::path::Path, offset: u64, data: &[u8]) {
    use foresnap_driver::tracking::Geometry;
    use foresnap_driver::tracking::tracker::{Tracker, TrackerConfig};
    let cfg = TrackerConfig {
        ring: std::path::PathBuf::from(format!("{}.fsring", vol.display())),
        ring_bytes: 64 << 20,
        geometry: Geometry::default(),
    };
    let (t, _) = Tracker::open(&cfg, vol, 4 << 20, 1).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(vol).unwrap();
    t.write_volume(&f, offset, data).unwrap();
}

/// The lines `child` prints on its (piped) stdout, as they come.
pub fn stdout_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("a piped stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    rx
}
