//! `foresnap daemon`: its configuration file, its control API, and two
//! volumes of two tenants driven through the CLI.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    assert_no_ublk_devices, foresnap, http_get, metric, repo, require_ublk, scratch, sha256,
};
use serde_json::Value;

/// A running `foresnap daemon`, stopped with SIGTERM on drop.
struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    fn start(config: &Path, socket: &Path) -> Daemon {
        Self::start_as(foresnap(), config, socket)
    }

    /// `cmd daemon --config CONFIG` (`cmd`: `foresnap` with an environment).
    fn start_as(mut cmd: std::process::Command, config: &Path, socket: &Path) -> Daemon {
        let mut child = cmd
            .args(["daemon", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn foresnap daemon");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("daemon ready: "), "{line:?}");
        Daemon {
            child: Some(child),
            socket: socket.to_owned(),
        }
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        foresnap()
            .args(args)
            .args(["--daemon", self.socket.to_str().unwrap()])
            .output()
            .unwrap()
    }

    /// `foresnap ARGS --daemon SOCKET`, which must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "foresnap {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `foresnap ARGS --daemon SOCKET`, which must fail: its one stderr line.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(!out.status.success(), "foresnap {args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        err
    }

    /// The daemon's volumes, as `foresnap volumes --json` gives them.
    fn volumes(&self, tenant: Option<&str>) -> Vec<Value> {
        let mut args = vec!["volumes", "--json"];
        if let Some(t) = tenant {
            args.extend(["--tenant", t]);
        }
        let v: Value = serde_json::from_str(&self.ok(&args)).unwrap();
        v["volumes"].as_array().unwrap().clone()
    }

    /// Waits until volume `name` runs with a device (and, with `restarts`,
    /// has restarted that often): the volume.
    fn wait_running(&self, name: &str, restarts: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = self
                .volumes(None)
                .into_iter()
                .find(|v| v["name"] == name)
                .unwrap();
            if v["state"] == "running" && v["restarts"] == restarts {
                return v;
            }
            assert!(Instant::now() < deadline, "volume {name} not running: {v}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A raw API request: the status and the JSON body.
    fn api(&self, raw: &str) -> (u16, Value) {
        let mut c = UnixStream::connect(&self.socket).unwrap();
        c.write_all(raw.as_bytes()).unwrap();
        let mut buf = String::new();
        c.read_to_string(&mut buf).unwrap();
        let (head, body) = buf.split_once("\r\n\r\n").expect("an HTTP answer");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).expect("a JSON body"))
    }

    fn stop(mut self) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "foresnap daemon exited with {status}");
        assert!(!self.socket.exists(), "the API socket is removed");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

fn check(config: &str) -> std::process::Output {
    let dir = scratch();
    let path = dir.path().join("foresnap.toml");
    std::fs::write(&path, config).unwrap();
    foresnap()
        .args(["daemon", "--check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap()
}

#[test]
fn the_sample_config_checks() {
    // Its tenant's secret, in a private file where the sample says.
    let dir = scratch();
    let secret = dir.path().join("acme.secret");
    std::fs::write(&secret, "not-a-real-secret\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let sample = std::fs::read_to_string(repo().join("packaging/foresnap.toml")).unwrap();
    assert!(sample.contains("/etc/foresnap/acme.secret"));
    let config = dir.path().join("foresnap.toml");
    std::fs::write(
        &config,
        sample.replace("/etc/foresnap/acme.secret", secret.to_str().unwrap()),
    )
    .unwrap();
    let out = foresnap()
        .args(["daemon", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(
            "ok: 2 volumes (db, logs); 1 replica (db-standby); 1 tier (logs) of tenants acme, globex"
        ),
        "{text}"
    );
}

#[test]
fn a_bad_config_is_refused_with_its_line_field_and_reason() {
    let vol = "[[volume]]\nname = \"db\"\ntenant = \"acme\"\nbacking = \"/var/db.img\"\n";
    let cases = [
        (
            format!("{vol}every = \"soon\"\ndest = [\"file:///b\"]\n"),
            "line 5: volume \"db\": every: invalid value 'soon'",
        ),
        (
            format!("{vol}frobnicate = 3\n"),
            "line 5: volume \"db\": frobnicate: not an option of serve",
        ),
        (
            format!("{vol}every = \"1m\"\n"),
            "line 1: volume \"db\": dest: the following required arguments were not provided",
        ),
        (
            format!("{vol}metrics = \"0.0.0.0:9477\"\n"),
            "line 5: volume \"db\": metrics: --metrics 0.0.0.0:9477: metrics are served on the loopback interface only",
        ),
        (
            format!("{vol}queues = 0\n"),
            "line 1: volume \"db\": invalid queue count 0",
        ),
        (
            format!("{vol}ring = \"db.fsring\"\n"),
            "line 5: volume \"db\": ring: \"db.fsring\" is not an absolute path",
        ),
        (
            format!("{vol}control = \"/x.sock\"\n"),
            "line 5: volume \"db\": control: cannot be set here",
        ),
        (
            vol.replace("acme", "Acme"),
            "line 3: volume \"db\": tenant: \"Acme\": use 1 to 63",
        ),
        (
            format!("{vol}{vol}"),
            "line 5: volume \"db\": name: also the name of the volume at line 1",
        ),
        (
            "[daemon]\nsocket = \"/x\"\n".into(),
            "volume: no [[volume]]",
        ),
        ("[[volume]\n".into(), "line 1: "),
        (
            format!("{vol}dest = [\"file:///b/db\", \"file:///elsewhere\"]\n"),
            "line 5: volume \"db\": dest: \"file:///elsewhere\" is not inside a destination of tenant \"acme\" (file:///b)",
        ),
        (
            vol.replace("acme", "initech"),
            "line 1: volume \"db\": tenant: \"initech\" is not declared",
        ),
        (
            format!("[[tenant]]\nname = \"globex\"\ndestinations = [\"file:///b/g\"]\n{vol}"),
            "line 11: tenant \"acme\": destinations: \"file:///b\" overlaps \"file:///b/g\" of tenant \"globex\" (line 1)",
        ),
    ];
    for (text, want) in cases {
        // Tenant acme's place, after the volume (whose lines stay put).
        let text = format!("{text}\n[[tenant]]\nname = \"acme\"\ndestinations = [\"file:///b\"]\n");
        let out = check(&text);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        let msg = err.split_once(": ").map(|(_, m)| m).unwrap_or_default();
        let msg = msg
            .split_once("foresnap.toml: ")
            .map(|(_, m)| m)
            .unwrap_or(msg);
        assert!(msg.starts_with(want), "{text}\n got {err}\nwant {want}");
    }
    let out = foresnap()
        .args([
            "daemon",
            "--check",
            "--config",
            "/nonexistent/foresnap.toml",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot read config /nonexistent/foresnap.toml")
    );
}

/// The API without ublk: a volume whose server cannot start is reported
/// as restarting, with why; every error is a status with a JSON body; a
/// tenant sees only its volumes. Runs anywhere (its volumes never start).
#[test]
fn the_api_reports_a_failing_volume_and_refuses_bad_requests() {
    let dir = scratch();
    let socket = dir.path().join("d.sock");
    let config = dir.path().join("foresnap.toml");
    let missing = dir.path().join("no/such/dir");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nrun_dir = \"{}\"\n\n\
             [[tenant]]\nname = \"acme\"\ndestinations = [\"file://{d}/dest\"]\n\n\
             [[tenant]]\nname = \"globex\"\ndestinations = [\"file://{d}/globex\"]\n\n\
             [[volume]]\nname = \"a\"\ntenant = \"acme\"\nbacking = \"{m}/a.img\"\ndest = [\"file://{d}/dest\"]\n\n\
             [[volume]]\nname = \"b\"\ntenant = \"globex\"\nbacking = \"{m}/b.img\"\n",
            socket.display(),
            dir.path().join("run").display(),
            m = missing.display(),
            d = dir.path().display(),
        ),
    )
    .unwrap();
    let d = Daemon::start(&config, &socket);
    // The first server exits at once; the daemon says so and tries again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let a = loop {
        let a = d
            .volumes(None)
            .into_iter()
            .find(|v| v["name"] == "a")
            .unwrap();
        if a["restarts"].as_u64() >= Some(1) {
            break a;
        }
        assert!(Instant::now() < deadline, "{a}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        a["state"] == "restarting" || a["state"] == "starting",
        "{a}"
    );
    assert_eq!(a["tenant"], "acme");
    assert_eq!(
        a["dest_volume"], "acme.a",
        "tenants' names at the destination"
    );
    assert!(
        a["last_message"].as_str().unwrap().contains("no/such/dir"),
        "{a}"
    );
    let table = d.ok(&["volumes"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("acme")),
        "{table}"
    );

    // Tenants.
    let acme = d.volumes(Some("acme"));
    assert_eq!(acme.len(), 1);
    assert_eq!(acme[0]["name"], "a");
    let err = d.refused(&["status", "--volume", "b", "--tenant", "acme"]);
    assert!(err.contains("tenant acme has no volume b"), "{err}");
    // Another tenant's snapshots: not listed, restored, pruned, verified
    // or followed through the daemon (invariant 7).
    let to = dir.path().join("stolen.img");
    let to = to.to_str().unwrap();
    for args in [
        &["snapshots", "--volume", "a", "--tenant", "globex"][..],
        &["restore", "--volume", "a", "--tenant", "globex", "--to", to],
        &["verify", "--volume", "a", "--tenant", "globex"],
        &[
            "prune",
            "--volume",
            "a",
            "--tenant",
            "globex",
            "--keep-last",
            "1",
        ],
        &[
            "replicate",
            "--volume",
            "a",
            "--tenant",
            "globex",
            "--to",
            to,
        ],
    ] {
        let err = d.refused(args);
        assert!(
            err.contains("tenant globex has no volume a"),
            "{args:?}: {err}"
        );
    }
    assert!(!Path::new(to).exists());
    let err = d.refused(&["snapshot", "--volume", "a"]);
    assert!(
        err.contains("volume a is restarting") || err.contains("volume a is starting"),
        "{err}"
    );
    let err = d.refused(&["snapshots", "--volume", "b"]);
    assert!(err.contains("volume b of the daemon has no dest"), "{err}");

    // Raw requests.
    let (s, v) = d.api("GET /v1/volumes/a HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200);
    assert!(
        v["status_error"].as_str().unwrap().contains("volume a is"),
        "{v}"
    );
    for (raw, status, words) in [
        ("GET /v1/volumes/zz HTTP/1.1\r\n\r\n", 404, "no volume zz"),
        (
            "GET /v1/volumes/a?tenant=globex HTTP/1.1\r\n\r\n",
            404,
            "tenant globex has no volume a",
        ),
        (
            "DELETE /v1/volumes/a HTTP/1.1\r\n\r\n",
            405,
            "method DELETE",
        ),
        (
            "POST /v1/volumes/a/snapshots HTTP/1.1\r\n\r\n",
            409,
            "volume a is",
        ),
        (
            "GET /v1/nothing HTTP/1.1\r\n\r\n",
            404,
            "no resource /v1/nothing",
        ),
        (
            "POST /v1/restores HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"x\":",
            400,
            "restore request",
        ),
        (
            "POST /v1/restores HTTP/1.1\r\nContent-Length: 41\r\n\r\n{\"volume\":\"b\",\"to\":\"/tmp/never-made.img\"}",
            409,
            "volume b has no dest",
        ),
        ("garbage\r\n\r\n", 400, "not an HTTP request"),
    ] {
        let (s, v) = d.api(raw);
        assert_eq!(s, status, "{raw:?}: {v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{raw:?}: {v}");
    }
    let (s, v) = d.api("GET /v1/destinations?tenant=acme HTTP/1.1\r\n\r\n");
    assert_eq!(s, 200);
    assert_eq!(v["destinations"].as_array().unwrap().len(), 1, "{v}");
    // A second daemon on the same socket is refused; the first stays.
    let out = foresnap()
        .args(["daemon", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use by another daemon"));
    d.stop();
}

/// Issue 6's tenants against a real S3 server: a volume is served only
/// once its tenant's own key has written there, never with the daemon's.
/// Tenant globex's secret is wrong while the daemon's environment holds
/// the server's right key (as an admin's shell would): globex is refused,
/// by `--check --prove` and by the running daemon, which reports why and
/// does not start its server; acme's key proves itself and leaves no probe.
#[test]
fn a_tenant_is_served_only_where_its_own_key_writes() {
    use std::os::unix::fs::PermissionsExt as _;
    let s = common::Server::start("seaweedfs");
    let dir = scratch();
    let p = dir.path();
    let secret = |name: &str, text: &str| {
        let f = p.join(format!("{name}.secret"));
        std::fs::write(&f, format!("{text}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        f
    };
    let (socket, config) = (p.join("d.sock"), p.join("foresnap.toml"));
    let missing = p.join("no/such/dir");
    let mut text = format!(
        "[daemon]\nsocket = \"{}\"\nrun_dir = \"{}\"\n",
        socket.display(),
        p.join("run").display()
    );
    for (name, tenant, key) in [
        ("a", "acme", s.var("AWS_SECRET_ACCESS_KEY").to_owned()),
        ("b", "globex", "not-the-secret".to_owned()),
    ] {
        text += &format!(
            "\n[[tenant]]\nname = \"{tenant}\"\ndestinations = [\"{}\"]\n\
             access-key-id = \"{}\"\nsecret-key-file = \"{}\"\n\
             \n[[volume]]\nname = \"{name}\"\ntenant = \"{tenant}\"\nbacking = \"{}/{name}.img\"\n\
             dest = [\"{}\"]\n",
            s.url(tenant),
            s.var("AWS_ACCESS_KEY_ID"),
            secret(tenant, &key).display(),
            missing.display(),
            s.url(&format!("{tenant}/vols")),
        );
    }
    std::fs::write(&config, &text).unwrap();
    let check = |extra: &[&str]| {
        s.foresnap()
            .args(["daemon", "--check", "--config", config.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    // Offline, the file is fine.
    let out = check(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Proven, globex's volume is refused, with the store's reason.
    let out = check(&["--prove"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("1 of 2 volumes cannot be served"), "{err}");
    assert!(
        err.contains(&format!(
            "volume b: tenant globex cannot use {}",
            s.url("globex/vols")
        )),
        "{err}"
    );
    assert!(!err.contains("volume a:"), "{err}");
    // acme's probe is gone: nothing is stored under its prefix.
    use foresnap_uploader::dest::Destination as _;
    assert_eq!(
        s.open("acme/vols").list("acme.a/").unwrap(),
        Vec::<String>::new()
    );

    // The daemon itself: b is refused and never started, a is tried.
    let d = Daemon::start_as(s.foresnap(), &config, &socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (a, b) = loop {
        let vols = d.volumes(None);
        let (a, b) = (vols[0].clone(), vols[1].clone());
        if a["restarts"].as_u64() >= Some(1) && b["state"] == "refused" {
            break (a, b);
        }
        assert!(Instant::now() < deadline, "{a}\n{b}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(a["refused"].is_null(), "{a}");
    let why = b["refused"].as_str().unwrap();
    assert!(why.starts_with("tenant globex cannot use s3://"), "{why}");
    assert_eq!(b["restarts"], 0, "a refused volume's server never ran: {b}");
    assert!(b["pid"].is_null(), "{b}");
    let err = d.refused(&["snapshot", "--volume", "b"]);
    assert!(
        err.contains("volume b is refused (tenant globex cannot use"),
        "{err}"
    );
    d.stop();
}

/// Issue 6's replication by a second daemon: its `[[replica]]` follows the
/// snapshots another host's volume stores (here `backup` of a file, as
/// volume acme.db), applying each as it completes; only its tenant sees it.
#[test]
fn a_daemons_replica_follows_each_snapshot_of_another_hosts_volume() {
    let dir = scratch();
    let p = dir.path();
    let vol = p.join("db.img");
    std::fs::write(
        &vol,
        (0..4u32 << 20)
            .map(|i| (i.wrapping_mul(13) >> 9).to_le_bytes()[0])
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let dest = format!("file://{}", p.join("dest").display());
    let backup = || {
        common::run(
            foresnap()
                .args(["backup", "--volume", "acme.db", "--chunk-size", "1M"])
                .args(["--dest", &dest, "--backing"])
                .arg(&vol),
        )
    };
    backup();
    let (socket, config) = (p.join("d.sock"), p.join("foresnap.toml"));
    let replica = p.join("replica.img");
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nrun_dir = \"{}\"\n\n\
             [[tenant]]\nname = \"acme\"\ndestinations = [\"{dest}\"]\n\n\
             [[replica]]\nname = \"db\"\ntenant = \"acme\"\nto = \"{}\"\ndest = [\"{dest}\"]\npoll = \"1s\"\n",
            socket.display(),
            p.join("run").display(),
            replica.display(),
        ),
    )
    .unwrap();
    let d = Daemon::start(&config, &socket);
    let wait_for = |snapshot: u32| {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, v) = d.api("GET /v1/replicas?tenant=acme HTTP/1.1\r\n\r\n");
            assert_eq!(status, 200, "{v}");
            let r = v["replicas"][0].clone();
            let last = r["last_message"].as_str().unwrap_or_default().to_owned();
            if last.contains(&format!(" at snapshot {snapshot}: ")) {
                assert_eq!(r["state"], "following", "{r}");
                assert_eq!(r["dest_volume"], "acme.db", "{r}");
                return last;
            }
            assert!(Instant::now() < deadline, "{r}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let last = wait_for(1);
    assert!(last.contains("4 of 4 chunks written"), "{last}");
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        std::fs::read(&vol).unwrap()
    );
    common::tracked_write(&vol, 2 << 20, &[0x5A; 4096]);
    backup();
    let last = wait_for(2);
    assert!(last.contains("1 of 4 chunks written"), "{last}");
    assert_eq!(
        std::fs::read(&replica).unwrap(),
        std::fs::read(&vol).unwrap()
    );
    // Only its tenant sees it; `volumes` lists it.
    let (_, v) = d.api("GET /v1/replicas?tenant=globex HTTP/1.1\r\n\r\n");
    assert_eq!(v["replicas"].as_array().unwrap().len(), 0, "{v}");
    let (_, v) = d.api("GET /v1/volumes HTTP/1.1\r\n\r\n");
    assert_eq!(
        v["volumes"].as_array().unwrap().len(),
        0,
        "a replica is no volume: {v}"
    );
    let table = d.ok(&["volumes"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("db ") && l.contains("acme") && l.contains("following")),
        "{table}"
    );
    d.stop();
}

/// Tiering inside the daemon (issue 6, item 1): a `[[tier]]` moves a
/// volume's old snapshots from its fast destination to its slow one, as
/// `foresnap tier --watch` does, and reports what it moved.
#[test]
fn a_daemons_tier_moves_old_snapshots_to_the_slow_destination() {
    let dir = scratch();
    let p = dir.path();
    let vol = p.join("db.img");
    std::fs::write(&vol, vec![0x6Bu8; 4 << 20]).unwrap();
    let (fast, slow) = (p.join("fast"), p.join("slow"));
    let backup = || {
        common::run(
            foresnap()
                .args([
                    "backup",
                    "--volume",
                    "acme.db",
                    "--chunk-size",
                    "1M",
                    "--dest",
                ])
                .arg(format!("file://{}", fast.display()))
                .arg("--backing")
                .arg(&vol),
        )
    };
    backup();
    common::tracked_write(&vol, 0, &[0x11; 4096]);
    backup();
    let (socket, config) = (p.join("d.sock"), p.join("foresnap.toml"));
    std::fs::write(
        &config,
        format!(
            "[daemon]\nsocket = \"{}\"\nrun_dir = \"{}\"\n\n\
             [[tenant]]\nname = \"acme\"\ndestinations = [\"file://{f}\", \"file://{s}\"]\n\n\
             [[tier]]\nname = \"db\"\ntenant = \"acme\"\nfast = \"file://{f}\"\n\
             slow = \"file://{s}\"\nage = \"0s\"\nwatch = \"1s\"\n",
            socket.display(),
            p.join("run").display(),
            f = fast.display(),
            s = slow.display(),
        ),
    )
    .unwrap();
    let d = Daemon::start(&config, &socket);
    let deadline = Instant::now() + Duration::from_secs(60);
    let t = loop {
        let (status, v) = d.api("GET /v1/tiers HTTP/1.1\r\n\r\n");
        assert_eq!(status, 200, "{v}");
        let t = v["tiers"][0].clone();
        if t["last_message"]
            .as_str()
            .is_some_and(|m| m.starts_with("snapshot 1 moved from"))
        {
            break t;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        (&t["state"], &t["dest_volume"]),
        (&"running".into(), &"acme.db".into()),
        "{t}"
    );
    let manifests = |d: &Path| {
        let mut ids: Vec<String> = std::fs::read_dir(d.join("acme.db/manifests"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(manifests(&fast), ["0000000002"], "the newest stays at fast");
    assert_eq!(manifests(&slow), ["0000000001"]);
    let table = d.ok(&["volumes"]);
    assert!(
        table.lines().any(|l| l.starts_with("db ")
            && l.contains(" tier ")
            && l.contains("snapshot 1 moved")),
        "{table}"
    );
    d.stop();
}

/// Issue 7's test: two volumes of two tenants in one daemon, driven only
/// through the CLI. Their schedules fire, their snapshots complete and
/// restore bit-exact, `status` and `volumes` reflect them, their metrics
/// count them, and a killed volume server is restarted with its data.
#[test]
#[ignore = "needs ublk: scripts/test runs it in the VM test bed"]
fn two_tenants_volumes_in_one_daemon_driven_by_the_cli() {
    require_ublk();
    let dir = scratch();
    let p = dir.path();
    let socket = p.join("daemon.sock");
    let config = p.join("foresnap.toml");
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let mut text = format!(
        "[daemon]\nsocket = \"{}\"\nrun_dir = \"{}\"\n",
        socket.display(),
        p.join("run").display()
    );
    for (i, (name, tenant)) in [("a", "acme"), ("b", "globex")].iter().enumerate() {
        text += &format!(
            "\n[[tenant]]\nname = \"{tenant}\"\ndestinations = [\"file://{}\"]\n",
            p.join(format!("dest-{tenant}")).display(),
        );
        text += &format!(
            "\n[[volume]]\nname = \"{name}\"\ntenant = \"{tenant}\"\nbacking = \"{}\"\n\
             size = \"32M\"\nring_size = \"4M\"\nqueues = 1\ndest = [\"file://{}\"]\n\
             every = \"5s\"\nmetrics = \"127.0.0.1:{}\"\n",
            p.join(format!("{name}.img")).display(),
            p.join(format!("dest-{tenant}")).display(),
            ports[i],
        );
    }
    std::fs::write(&config, &text).unwrap();
    let d = Daemon::start(&config, &socket);
    let a = d.wait_running("a", 0);
    let b = d.wait_running("b", 0);
    let dev = |v: &Value| v["device"].as_str().unwrap().to_owned();
    let (dev_a, dev_b) = (dev(&a), dev(&b));
    assert_ne!(dev_a, dev_b);
    common::wait_for_path(Path::new(&dev_a));
    common::wait_for_path(Path::new(&dev_b));

    // Different data on each; then a snapshot of each by the CLI.
    common::sh(&format!(
        "dd if=/dev/urandom of={dev_a} bs=1M count=8 oflag=direct status=none && \
         dd if=/dev/urandom of={dev_b} bs=1M count=4 seek=8 oflag=direct status=none"
    ));
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let out = d.ok(&["snapshot", "--volume", name]);
        assert!(
            out.starts_with(&format!("volume {name}: snapshot ")),
            "{out}"
        );
        let id: u32 = out.split(' ').nth(3).unwrap().parse().unwrap();
        ids.push(id);
    }
    let sums = [&dev_a, &dev_b].map(|dev| sha256(Path::new(dev), 32 << 20));

    // The schedules fire (every 5 s) and their snapshots complete; each
    // restores bit-exact through the daemon's view of the volume.
    let deadline = Instant::now() + Duration::from_secs(240);
    for (i, name) in ["a", "b"].iter().enumerate() {
        loop {
            let status = d.ok(&["status", "--volume", name]);
            let scheduled = status
                .lines()
                .filter(|l| l.contains("after its scheduled close"))
                .count();
            let listed = d.ok(&["snapshots", "--volume", name]);
            if scheduled >= 2 && listed.contains(&format!("snapshot {} ", ids[i])) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "volume {name}:\n{status}\n{listed}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let img = p.join(format!("restored-{name}.img"));
        let snap = ids[i].to_string();
        d.ok(&[
            "restore",
            "--volume",
            name,
            "--snapshot",
            &snap,
            "--to",
            img.to_str().unwrap(),
        ]);
        assert_eq!(
            sha256(&img, 32 << 20),
            sums[i],
            "volume {name} snapshot {snap}"
        );
    }

    // status, volumes and the metrics reflect them.
    let all = d.ok(&["status"]);
    assert!(
        all.contains(&format!("volume a (tenant acme): running as {dev_a}")),
        "{all}"
    );
    assert!(
        all.contains(&format!("volume b (tenant globex): running as {dev_b}")),
        "{all}"
    );
    let table = d.ok(&["volumes"]);
    for name in ["a", "b"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap();
        assert!(row.contains("running") && row.contains("stored"), "{table}");
    }
    for (i, tenant) in ["acme", "globex"].iter().enumerate() {
        let (_, m) = http_get(ports[i], "/metrics");
        let dest = format!("file://{}", p.join(format!("dest-{tenant}")).display());
        let n = metric(
            &m,
            &format!("foresnap_upload_snapshots_total{{dest=\"{dest}\"}}"),
        );
        assert!(n >= 3.0, "{tenant}: {n} snapshots uploaded\n{m}");
        assert!(metric(&m, "foresnap_io_requests_total{op=\"write\"}") > 0.0);
    }
    // One tenant does not see the other's volume, by any command.
    assert_eq!(d.volumes(Some("globex")).len(), 1);
    let err = d.refused(&["snapshots", "--volume", "a", "--tenant", "globex"]);
    assert!(err.contains("tenant globex has no volume a"), "{err}");

    // A restore through the API resource.
    let api_img = p.join("api-restore.img");
    let body = format!(
        "{{\"volume\":\"b\",\"snapshot\":{},\"to\":\"{}\"}}",
        ids[1],
        api_img.display()
    );
    let (s, v) = d.api(&format!(
        "POST /v1/restores HTTP/1.1\r\nX-Foresnap-Tenant: globex\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert_eq!(s, 202, "{v}");
    let id = v["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let r = loop {
        let (_, r) = d.api(&format!("GET /v1/restores/{id} HTTP/1.1\r\n\r\n"));
        if r["state"] != "running" {
            break r;
        }
        assert!(Instant::now() < deadline, "{r}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(r["state"], "done", "{r}");
    assert_eq!(sha256(&api_img, 32 << 20), sums[1]);

    // kill -9 of volume b's server: the daemon restarts it, the device
    // comes back with its data, and volume a is untouched.
    let pid = i32::try_from(b["pid"].as_u64().unwrap()).unwrap();
    // SAFETY: kill(2) on a process of the test's daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let b2 = d.wait_running("b", 1);
    let dev_b2 = dev(&b2);
    common::wait_for_path(Path::new(&dev_b2));
    assert_eq!(sha256(Path::new(&dev_b2), 32 << 20), sums[1]);
    assert_eq!(d.wait_running("a", 0)["pid"], a["pid"]);
    let out = d.ok(&["snapshot", "--volume", "b"]);
    let last_b: u32 = out.split(' ').nth(3).unwrap().parse().unwrap();

    // A clean stop removes every device; a new daemon on the same file
    // serves the volumes again, their rings continuing their epochs.
    d.stop();
    assert_no_ublk_devices();
    let mut d = Daemon::start(&config, &socket);
    d.wait_running("a", 0);
    let b3 = d.wait_running("b", 0);
    common::wait_for_path(Path::new(&dev(&b3)));
    assert_eq!(sha256(Path::new(&dev(&b3)), 32 << 20), sums[1]);
    let out = d.ok(&["snapshot", "--volume", "b"]);
    let next_b: u32 = out.split(' ').nth(3).unwrap().parse().unwrap();
    assert!(next_b > last_b, "snapshot {next_b} after {last_b}: {out}");

    // A daemon killed outright: the kernel sends its servers SIGTERM
    // (PR_SET_PDEATHSIG) and they remove their devices.
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !common::ublk_block_devices().is_empty() {
        assert!(
            Instant::now() < deadline,
            "devices outlived their daemon: {:?}",
            common::ublk_block_devices()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_no_ublk_devices();
}
