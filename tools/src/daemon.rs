//! `foresnap daemon`: many volumes from one configuration file, and the
//! control API on a unix socket.
//!
//! Each volume is served by a `foresnap serve` child process with the
//! options of its `[[volume]]` table: one volume's crash cannot take the
//! others down, a crashed one restarts through the tracker's crash recovery
//! (its ring continues its epochs), and the device path is the one `serve`
//! has proven. The daemon supervises the children (restart with back-off),
//! answers the API (`foresnap_control::api`) by talking to each child's
//! control socket, and runs restores as child processes too.
//!
//! Each tenant's volumes are written with the tenant's own S3 key, given to
//! its children in their environment in place of any of the daemon's; and
//! before a volume is served, the daemon proves that this key can write
//! and read back at each of the volume's destinations
//! ([`foresnap_uploader::dest::prove_write`]). The configuration already
//! keeps each volume's destinations inside its tenant's own.
//!
//! The children get SIGTERM when the daemon dies, however it dies
//! (`PR_SET_PDEATHSIG`), so no device outlives its daemon unserved.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use foresnap_control::api::{self, ApiError, Call, Method, RestoreRequest};
use foresnap_control::config::{Config, ConfigError, Kind, Tenant, Volume};
use foresnap_uploader::format::Keys;
use foresnap_uploader::s3::S3Credentials;
use serde_json::{Value, json};

use crate::cli::{Cli, Command as Sub, DaemonArgs};
use crate::control;

/// Restart back-off: doubling from the first to the last, back to the
/// first after a child ran this long.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_LAST: Duration = Duration::from_secs(60);
const BACKOFF_RESET: Duration = Duration::from_secs(60);

/// A volume (or replica) of the configuration, checked, with what the API
/// reports.
#[derive(Debug)]
struct Vol {
    kind: Kind,
    name: String,
    tenant: String,
    /// `serve`'s arguments (after `serve`), or `replicate`'s.
    args: Vec<String>,
    socket: PathBuf,
    metrics: Option<String>,
    dest: Vec<String>,
    dest_policy: String,
    dest_volume: String,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    /// The tenant's S3 key: its children's only credentials.
    creds: Option<S3Credentials>,
    state: Mutex<VolState>,
}

#[derive(Debug, Default)]
struct VolState {
    phase: &'static str,
    pid: Option<u32>,
    device: Option<String>,
    restarts: u32,
    since_ms: u64,
    last_line: Option<String>,
    /// A replica's or tier's last stderr line (progress, a retry's reason).
    last_log: Option<String>,
    last_exit: Option<String>,
    /// Why the tenant's key could not be shown to write at a destination
    /// (the volume is not served meanwhile; tried again with back-off).
    refused: Option<String>,
}

/// Loads and checks `path`: the file's shape, then each volume's options
/// with `serve`'s own parser, so that a bad value names its field.
fn load(path: &Path) -> anyhow::Result<(Config, Vec<Vol>)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    let at = |e: ConfigError| anyhow::anyhow!("{}: {e}", path.display());
    let config = Config::parse(&text).map_err(at)?;
    let creds = config
        .tenants
        .iter()
        .map(|t| Ok((t.name.clone(), tenant_key(t).map_err(at)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let vols = config
        .volumes
        .iter()
        .chain(&config.replicas)
        .chain(&config.tiers)
        .map(|v| {
            let mut vol = match v.kind {
                Kind::Volume => volume(&config, v),
                Kind::Replica => replica(v),
                Kind::Tier => tier(v),
            }
            .map_err(at)?;
            vol.creds = creds
                .iter()
                .find(|(t, _)| *t == v.tenant)
                .and_then(|(_, c)| c.clone());
            Ok(vol)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((config, vols))
}

/// Tenant `t`'s S3 key, its secret read from `secret-key-file`, which must
/// be a file only its owner can read.
fn tenant_key(t: &Tenant) -> Result<Option<S3Credentials>, ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let (Some(id), Some(file)) = (&t.access_key_id, &t.secret_key_file) else {
        return Ok(None);
    };
    let bad = |reason: String| ConfigError {
        field: format!("tenant {:?}: secret-key-file", t.name),
        line: Some(t.line),
        reason: format!("{}: {reason}", file.display()),
    };
    let meta = std::fs::metadata(file).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a file".into()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(bad(format!(
            "group or others may read it (mode {mode:03o}): chmod 600 it"
        )));
    }
    let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
    let secret = text.trim();
    if secret.is_empty() || secret.contains(char::is_whitespace) {
        return Err(bad("give the secret access key alone, on one line".into()));
    }
    Ok(Some(S3Credentials {
        access_key_id: id.clone(),
        secret_access_key: secret.to_owned(),
    }))
}

/// Variables of the AWS SDK that a child keeps from the daemon: where and
/// how to talk, never who it is.
const AWS_KEEP: &[&str] = &["AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CA_BUNDLE"];

/// The environment changes (`None`: removed) that give a volume's child
/// its tenant's key `creds` and nothing else to sign with, from the names
/// of the daemon's own variables: no AWS identity of the daemon (keys,
/// profiles, role, container or instance credentials) reaches a tenant.
fn tenant_env(
    current: impl Iterator<Item = OsString>,
    creds: Option<&S3Credentials>,
) -> Vec<(OsString, Option<OsString>)> {
    let mut env: Vec<(OsString, Option<OsString>)> = current
        .filter(|k| {
            k.to_str()
                .is_some_and(|k| k.starts_with("AWS_") && !AWS_KEEP.contains(&k))
        })
        .map(|k| (k, None))
        .collect();
    for (k, v) in [
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ("AWS_CONFIG_FILE", "/dev/null"),
    ] {
        env.push((k.into(), Some(v.into())));
    }
    if let Some(c) = creds {
        env.push((
            "AWS_ACCESS_KEY_ID".into(),
            Some(c.access_key_id.clone().into()),
        ));
        env.push((
            "AWS_SECRET_ACCESS_KEY".into(),
            Some(c.secret_access_key.clone().into()),
        ));
    }
    env
}

/// Proves, with the tenant's key, that each of `vol`'s destinations takes
/// its writes and gives them back; a warning for each probe left behind.
fn prove(vol: &Vol) -> anyhow::Result<Vec<String>> {
    let keys = Keys::new(&vol.dest_volume).map_err(anyhow::Error::msg)?;
    let tag = format!("{}-{}", now_ms(), std::process::id());
    let mut warnings = Vec::new();
    for d in &vol.dest {
        let dest = crate::upload::open_raw(d, vol.creds.clone())
            .with_context(|| format!("tenant {} cannot use {d}", vol.tenant))?;
        let left = foresnap_uploader::dest::prove_write(dest.as_ref(), &keys, &tag)
            .with_context(|| format!("tenant {} cannot write to {d}", vol.tenant))?;
        if let Some(e) = left {
            warnings.push(format!(
                "tenant {} wrote to {d}, but its probe {} stays: {e}",
                vol.tenant,
                keys.probe(&tag)
            ));
        }
    }
    Ok(warnings)
}

/// An error about option `key` of table `v` (at its line, or the table's).
fn field_err(v: &Volume, key: &str, reason: String) -> ConfigError {
    ConfigError {
        field: format!("{} {:?}: {key}", v.kind.word(), v.name),
        line: v.get(key).map_or(Some(v.line), |o| Some(o.line)),
        reason,
    }
}

/// A daemon runs from /: a relative path in `keys` would name a file there.
fn absolute(v: &Volume, keys: &[&str]) -> Result<(), ConfigError> {
    for &key in keys {
        if let Some(o) = v.get(key) {
            match &o.value {
                foresnap_control::config::Value::Str(s) if s.starts_with('/') => {}
                foresnap_control::config::Value::Str(s) => {
                    return Err(field_err(v, key, format!("{s:?} is not an absolute path")));
                }
                _ => return Err(field_err(v, key, "give a path as a string".into())),
            }
        }
    }
    Ok(())
}

/// `foresnap SUB ARGS` parsed as the CLI would, or the error in the
/// file's terms: the option named without `--`, at its line.
fn parse_as(sub: &str, args: &[String], v: &Volume) -> Result<Cli, ConfigError> {
    let argv = ["foresnap", sub]
        .into_iter()
        .map(String::from)
        .chain(args.iter().cloned());
    Cli::try_parse_from(argv).map_err(|e| {
        // clap names the option; the file names it without `--`.
        let key = e
            .get(clap::error::ContextKind::InvalidArg)
            .map(|a| a.to_string())
            .and_then(|a| {
                a.trim_start_matches('-')
                    .split([' ', '='])
                    .next()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let msg = crate::cli::one_line(&e).replace(
            "unexpected argument '--",
            &format!("not an option of {sub}: '--"),
        );
        if key.is_empty() {
            ConfigError {
                field: format!("{} {:?}", v.kind.word(), v.name),
                line: Some(v.line),
                reason: msg,
            }
        } else {
            field_err(v, &key, msg)
        }
    })
}

/// A `[[replica]]`: `replicate --follow` with its options; its name at the
/// destinations is `TENANT.NAME` unless `volume` says otherwise, as a
/// volume's is, so that a replica named like a volume follows it.
fn replica(v: &Volume) -> Result<Vol, ConfigError> {
    absolute(v, &["to", "key-file"])?;
    let mut args: Vec<String> = vec!["--follow".into()];
    args.extend(v.options.iter().flat_map(|o| o.value.args(&o.key)));
    if v.get("volume").is_none() {
        args.extend(["--volume".into(), format!("{}.{}", v.tenant, v.name)]);
    }
    let Cli {
        command: Sub::Replicate(r),
    } = parse_as("replicate", &args, v)?
    else {
        unreachable!("parsed as replicate")
    };
    Ok(job(
        v,
        args,
        r.from.dest.clone(),
        &r.from.volume,
        &r.from.key,
    ))
}

/// A replica's or tier's `Vol`: no device, socket or metrics of its own.
fn job(
    v: &Volume,
    args: Vec<String>,
    dest: Vec<String>,
    dest_volume: &str,
    key: &crate::cli::KeyArgs,
) -> Vol {
    Vol {
        kind: v.kind,
        name: v.name.clone(),
        tenant: v.tenant.clone(),
        args,
        socket: PathBuf::new(),
        metrics: None,
        dest,
        dest_policy: v.kind.word().into(),
        dest_volume: dest_volume.to_owned(),
        key_file: key.key_file.clone(),
        key_env: key.key_env.clone(),
        creds: None,
        state: Mutex::new(VolState {
            phase: "starting",
            ..VolState::default()
        }),
    }
}

/// How often a `[[tier]]` without `watch` looks for snapshots to move.
const TIER_WATCH: &str = "15m";

/// A `[[tier]]`: `tier --watch` with its options (the volume named
/// `TENANT.NAME` at both destinations unless `volume` says otherwise).
fn tier(v: &Volume) -> Result<Vol, ConfigError> {
    absolute(v, &["key-file"])?;
    let mut args: Vec<String> = v
        .options
        .iter()
        .flat_map(|o| o.value.args(&o.key))
        .collect();
    if v.get("volume").is_none() {
        args.extend(["--volume".into(), format!("{}.{}", v.tenant, v.name)]);
    }
    if v.get("watch").is_none() {
        args.extend(["--watch".into(), TIER_WATCH.into()]);
    }
    let Cli {
        command: Sub::Tier(t),
    } = parse_as("tier", &args, v)?
    else {
        unreachable!("parsed as tier")
    };
    Ok(job(
        v,
        args,
        vec![t.fast.clone(), t.slow.clone()],
        &t.volume,
        &t.key,
    ))
}

fn volume(config: &Config, v: &Volume) -> Result<Vol, ConfigError> {
    absolute(v, &["backing", "ring", "key-file"])?;
    let socket = config.run_dir.join(format!("{}.sock", v.name));
    let mut args: Vec<String> = v
        .options
        .iter()
        .flat_map(|o| o.value.args(&o.key))
        .collect();
    args.extend(["--control".into(), socket.display().to_string()]);
    if v.get("volume").is_none() {
        // Tenants share destinations without sharing names there.
        args.extend(["--volume".into(), format!("{}.{}", v.tenant, v.name)]);
    }
    let Cli {
        command: Sub::Serve(serve),
    } = parse_as("serve", &args, v)?
    else {
        unreachable!("parsed as serve")
    };
    // The device's own limits (queues, depth, sizes), as `serve` checks them.
    serve.device_config().validate().map_err(|e| ConfigError {
        field: format!("volume {:?}", v.name),
        line: Some(v.line),
        reason: e.to_string(),
    })?;
    if let Some(m) = &serve.metrics {
        crate::metrics::check_addr(m).map_err(|e| field_err(v, "metrics", format!("{e:#}")))?;
    }
    Ok(Vol {
        kind: Kind::Volume,
        name: v.name.clone(),
        tenant: v.tenant.clone(),
        args,
        socket,
        metrics: serve.metrics.clone(),
        dest: serve.upload.dest.clone(),
        dest_policy: format!("{:?}", serve.upload.dest_policy).to_lowercase(),
        dest_volume: serve
            .upload
            .volume
            .clone()
            .unwrap_or_else(|| format!("{}.{}", v.tenant, v.name)),
        key_file: serve.upload.key.key_file.clone(),
        key_env: serve.upload.key.key_env.clone(),
        creds: None,
        state: Mutex::new(VolState {
            phase: "starting",
            ..VolState::default()
        }),
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A child process of the daemon for a volume whose tenant's key is
/// `creds` ([`tenant_env`]): gets SIGTERM if the daemon dies, and runs in a
/// session of its own ([`detach`]).
fn child(args: &[String], creds: Option<&S3Credentials>) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("cannot find the foresnap binary")?;
    let mut cmd = Command::new(exe);
    for (k, v) in tenant_env(std::env::vars_os().map(|(k, _)| k), creds) {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    detach(&mut cmd);
    Ok(cmd)
}

/// Makes `cmd`'s process a session leader that gets SIGTERM when the
/// daemon dies. A session of its own is a scheduler autogroup of its own
/// (Linux's default without cgroups): a server sharing one with a busy
/// workload, as one started from the workload's shell does, preempts and is
/// preempted by it at every request, which cost a fifth to a third of the
/// IOPS at iodepth 32 in the device benchmark (README). The daemon still stops its servers: it sends
/// each SIGTERM on SIGINT or SIGTERM, and the death signal covers its crash.
fn detach(cmd: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec and
    // calls only setsid(2) and prctl(2), which are async-signal-safe. The
    // death signal is tied to the forking thread; each child's thread waits
    // for it and so lives at least as long.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads a child's output: stdout lines to `on_out`, stderr lines to the
/// daemon's stderr prefixed with `tag` and to `on_err`.
fn pump(
    child: &mut Child,
    tag: String,
    on_out: impl Fn(&str) + Send + 'static,
    on_err: impl Fn(&str) + Send + 'static,
) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    if let Some(out) = child.stdout.take() {
        threads.push(std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                on_out(&line);
            }
        }));
    }
    if let Some(err) = child.stderr.take() {
        threads.push(std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                on_err(&line);
            }
        }));
    }
    threads
}

/// Runs `foresnap ARGS` as a [`child`] to its end on this thread (the
/// thread its death signal follows): `on_spawn` sees it first, its output
/// goes to [`pump`]. Its exit status, or why it could not run.
fn run_child(
    args: &[String],
    creds: Option<&S3Credentials>,
    tag: String,
    on_spawn: impl FnOnce(&mut Child),
    on_out: impl Fn(&str) + Send + 'static,
    on_err: impl Fn(&str) + Send + 'static,
) -> Result<std::process::ExitStatus, String> {
    let mut c = child(args, creds)
        .and_then(|mut c| c.spawn().context("cannot start foresnap"))
        .map_err(|e| format!("{e:#}"))?;
    on_spawn(&mut c);
    let threads = pump(&mut c, tag, on_out, on_err);
    let status = c.wait().map_err(|e| format!("cannot wait: {e}"));
    for t in threads {
        let _ = t.join();
    }
    status
}

/// Serves `vol` with `serve` children until `stop`.
fn supervise(vol: &Arc<Vol>, stop: &AtomicBool) {
    let mut backoff = BACKOFF_FIRST;
    let serve = vol.kind == Kind::Volume;
    let fixed_id = !serve || vol.args.iter().any(|a| a == "--id");
    // The device a killed server left: the next one re-attaches to it
    // (its I/O waits meanwhile) instead of leaving it hung.
    let mut left_behind: Option<String> = None;
    // A replica only reads its destinations: nothing to prove.
    let mut proven = !serve;
    while !stop.load(Ordering::Relaxed) {
        if !proven {
            vol.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .phase = "proving";
            match prove(vol) {
                Ok(warnings) => {
                    for w in warnings {
                        eprintln!("[{}] {w}", vol.name);
                    }
                    proven = true;
                    let mut s = vol.state.lock().unwrap_or_else(PoisonError::into_inner);
                    s.refused = None;
                    s.phase = "starting";
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    eprintln!(
                        "[{}] not served: {why}; trying again in {} s",
                        vol.name,
                        backoff.as_secs()
                    );
                    let mut s = vol.state.lock().unwrap_or_else(PoisonError::into_inner);
                    s.phase = "refused";
                    s.refused = Some(why);
                    drop(s);
                    sleep_unless(stop, backoff);
                    backoff = (backoff * 2).min(BACKOFF_LAST);
                    continue;
                }
            }
        }
        let started = Instant::now();
        let mut args = vec![
            match vol.kind {
                Kind::Volume => "serve",
                Kind::Replica => "replicate",
                Kind::Tier => "tier",
            }
            .to_owned(),
        ];
        args.extend(vol.args.iter().cloned());
        if let (false, Some(id)) = (fixed_id, &left_behind) {
            args.extend(["--id".to_owned(), id.clone()]);
        }
        let (v1, v2) = (vol.clone(), vol.clone());
        let exit = run_child(
            &args,
            vol.creds.as_ref(),
            vol.name.clone(),
            |c| {
                let mut s = vol.state.lock().unwrap_or_else(PoisonError::into_inner);
                s.pid = Some(c.id());
                s.since_ms = now_ms();
                // A stop that came between the loop's check and here found
                // no pid to signal: signal this child now.
                if stop.load(Ordering::Relaxed) {
                    // SAFETY: kill(2) on our own child, not yet waited for.
                    unsafe {
                        libc::kill(libc::pid_t::try_from(c.id()).unwrap_or(0), libc::SIGTERM)
                    };
                }
            },
            move |line| {
                let mut s = v1.state.lock().unwrap_or_else(PoisonError::into_inner);
                if v1.kind == Kind::Replica {
                    // Its news: "replica PATH at snapshot N: ...".
                    s.phase = "following";
                    s.last_line = Some(line.to_owned());
                } else if v1.kind == Kind::Tier {
                    // What it last moved ("snapshot N moved from ..."); a
                    // round's summary only until something moved.
                    s.phase = "running";
                    if line.starts_with("snapshot ") || s.last_line.is_none() {
                        s.last_line = Some(line.to_owned());
                    }
                } else if let Some(dev) = line
                    .strip_prefix("device ")
                    .and_then(|l| l.strip_suffix(" ready"))
                {
                    s.phase = "running";
                    s.device = Some(dev.to_owned());
                }
            },
            move |line| {
                let mut s = v2.state.lock().unwrap_or_else(PoisonError::into_inner);
                // A server's news is on stderr; a replica's or tier's is
                // what it applied or moved (stdout), its stderr a log.
                if v2.kind == Kind::Volume {
                    s.last_line = Some(line.to_owned());
                } else {
                    s.last_log = Some(line.to_owned());
                }
            },
        )
        .map_or_else(|e| e, |st| st.to_string());
        let mut s = vol.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.pid = None;
        left_behind = s
            .device
            .take()
            .and_then(|d| d.strip_prefix("/dev/ublkb").map(str::to_owned))
            .or(left_behind);
        if stop.load(Ordering::Relaxed) {
            s.phase = "stopped";
            break;
        }
        if started.elapsed() >= BACKOFF_RESET {
            backoff = BACKOFF_FIRST;
        }
        s.phase = "restarting";
        s.restarts += 1;
        s.last_exit = Some(exit.clone());
        drop(s);
        eprintln!(
            "[{}] serve exited ({exit}); restarting in {} s",
            vol.name,
            backoff.as_secs()
        );
        sleep_unless(stop, backoff);
        backoff = (backoff * 2).min(BACKOFF_LAST);
    }
}

/// Sleeps for `d`, or until `stop`.
fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A restore started through the API.
#[derive(Debug)]
struct Restore {
    id: u64,
    volume: String,
    tenant: String,
    snapshot: Option<u32>,
    to: String,
    started_ms: u64,
    state: Mutex<RestoreState>,
}

#[derive(Debug, Default)]
struct RestoreState {
    phase: &'static str,
    progress: Option<String>,
    finished_ms: Option<u64>,
    error: Option<String>,
}

impl Restore {
    fn json(&self) -> Value {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        json!({
            "id": self.id,
            "volume": self.volume,
            "tenant": self.tenant,
            "snapshot": self.snapshot,
            "to": self.to,
            "state": s.phase,
            "progress": s.progress,
            "started_ms": self.started_ms,
            "finished_ms": s.finished_ms,
            "error": s.error,
        })
    }
}

struct Daemon {
    vols: Vec<Arc<Vol>>,
    restores: Mutex<Vec<Arc<Restore>>>,
    next_restore: AtomicU64,
}

impl Vol {
    /// The volume as the API shows it.
    fn json(&self) -> Value {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.kind != Kind::Volume {
            return json!({
                "name": self.name,
                "tenant": self.tenant,
                "state": s.phase,
                "pid": s.pid,
                "restarts": s.restarts,
                "since_ms": s.since_ms,
                "last_exit": s.last_exit,
                "last_message": s.last_line,
                "last_log": s.last_log,
                "dest": self.dest,
                "dest_volume": self.dest_volume,
                "to": self.args.iter().skip_while(|a| *a != "--to").nth(1),
                "age": self.args.iter().skip_while(|a| *a != "--age").nth(1),
            });
        }
        json!({
            "name": self.name,
            "tenant": self.tenant,
            "state": s.phase,
            "pid": s.pid,
            "device": s.device,
            "restarts": s.restarts,
            "since_ms": s.since_ms,
            "last_exit": s.last_exit,
            "last_message": s.last_line,
            "refused": s.refused,
            "control": self.socket,
            "metrics": self.metrics,
            "dest": self.dest,
            "dest_policy": self.dest_policy,
            "dest_volume": self.dest_volume,
            "key_file": self.key_file,
            "key_env": self.key_env,
        })
    }

    fn running(&self) -> Result<(), ApiError> {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.phase == "running" {
            Ok(())
        } else {
            Err(ApiError::new(
                409,
                format!(
                    "volume {} is {}{}",
                    self.name,
                    s.phase,
                    s.refused
                        .as_ref()
                        .map(|e| format!(" ({e})"))
                        .or_else(|| s
                            .last_exit
                            .as_ref()
                            .map(|e| format!(" (its server exited: {e})")))
                        .unwrap_or_default()
                ),
            ))
        }
    }

    /// Asks the volume's server.
    fn ask(&self, req: &control::Request) -> Result<Value, ApiError> {
        self.running()?;
        control::call(&self.socket, req).map_err(|e| {
            // Not reached or not answering: 503; an answer that is not the
            // protocol: 502; a refusal (the request conflicts with the
            // volume's state): 409.
            let cause = e.root_cause();
            let status = if cause.is::<std::io::Error>() {
                503
            } else if cause.is::<serde_json::Error>() {
                502
            } else {
                409
            };
            ApiError::new(status, format!("volume {}: {e:#}", self.name))
        })
    }

    /// `restore`'s or `snapshots`' destination arguments.
    fn dest_args(&self) -> Result<Vec<String>, ApiError> {
        if self.dest.is_empty() {
            return Err(ApiError::new(
                409,
                format!("volume {} has no dest", self.name),
            ));
        }
        let mut a: Vec<String> = self
            .dest
            .iter()
            .flat_map(|d| ["--dest".into(), d.clone()])
            .collect();
        a.extend(["--volume".into(), self.dest_volume.clone()]);
        if let Some(f) = &self.key_file {
            a.extend(["--key-file".into(), f.display().to_string()]);
        }
        if let Some(e) = &self.key_env {
            a.extend(["--key-env".into(), e.clone()]);
        }
        Ok(a)
    }
}

impl Daemon {
    fn volume(&self, name: &str, tenant: Option<&str>) -> Result<&Arc<Vol>, ApiError> {
        self.vols
            .iter()
            .find(|v| {
                v.kind == Kind::Volume && v.name == name && tenant.is_none_or(|t| t == v.tenant)
            })
            .ok_or_else(|| match tenant {
                Some(t) => ApiError::new(404, format!("tenant {t} has no volume {name}")),
                None => ApiError::new(404, format!("no volume {name}")),
            })
    }

    fn answer(self: &Arc<Self>, req: &api::Request) -> Result<(u16, Value), ApiError> {
        let tenant = req.tenant.as_deref();
        let mine = |v: &&Arc<Vol>| v.kind == Kind::Volume && tenant.is_none_or(|t| t == v.tenant);
        let call = api::route(req)?;
        match call {
            Call::Volumes => Ok((
                200,
                json!({"volumes": self.vols.iter().filter(mine).map(|v| v.json()).collect::<Vec<_>>()}),
            )),
            Call::Volume(name) => {
                let v = self.volume(&name, tenant)?;
                let mut j = v.json();
                match v.ask(&control::Request::Status) {
                    Ok(s) => j["status"] = s,
                    Err(e) => j["status_error"] = e.message.into(),
                }
                Ok((200, j))
            }
            Call::Snapshot(name) => {
                let r = self
                    .volume(&name, tenant)?
                    .ask(&control::Request::Snapshot)?;
                Ok((201, r))
            }
            Call::Snapshots(name) => {
                let v = self.volume(&name, tenant)?;
                let argv = ["foresnap", "snapshots"]
                    .into_iter()
                    .map(String::from)
                    .chain(v.dest_args()?);
                let Ok(Cli {
                    command: Sub::Snapshots(args),
                }) = Cli::try_parse_from(argv)
                else {
                    return Err(ApiError::new(
                        500,
                        "the volume's destination arguments do not parse",
                    ));
                };
                let list = crate::upload::stored_snapshots(&args)
                    .map_err(|e| ApiError::new(502, format!("volume {name}: {e:#}")))?;
                Ok((
                    200,
                    json!({"volume": name, "dest_volume": v.dest_volume, "snapshots": list}),
                ))
            }
            Call::Destinations => Ok((
                200,
                json!({"destinations": self.vols.iter().filter(mine).map(|v| {
                    let upload = v.ask(&control::Request::Status).map(|s| s["upload"].clone()).ok();
                    json!({
                        "volume": v.name,
                        "tenant": v.tenant,
                        "dest": v.dest,
                        "dest_policy": v.dest_policy,
                        "dest_volume": v.dest_volume,
                        "upload": upload,
                    })
                }).collect::<Vec<_>>()}),
            )),
            Call::StartRestore(r) => self.start_restore(&r, tenant).map(|j| (202, j)),
            Call::Replicas | Call::Tiers => {
                let (kind, key) = match call {
                    Call::Replicas => (Kind::Replica, "replicas"),
                    _ => (Kind::Tier, "tiers"),
                };
                Ok((
                    200,
                    json!({key: self.vols.iter()
                        .filter(|v| v.kind == kind && tenant.is_none_or(|t| t == v.tenant))
                        .map(|v| v.json()).collect::<Vec<_>>()}),
                ))
            }
            Call::Restores => {
                let list = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
                Ok((
                    200,
                    json!({"restores": list.iter()
                        .filter(|r| tenant.is_none_or(|t| t == r.tenant))
                        .map(|r| r.json()).collect::<Vec<_>>()}),
                ))
            }
            Call::Restore(id) => {
                let list = self.restores.lock().unwrap_or_else(PoisonError::into_inner);
                list.iter()
                    .find(|r| r.id == id && tenant.is_none_or(|t| t == r.tenant))
                    .map(|r| (200, r.json()))
                    .ok_or_else(|| ApiError::new(404, format!("no restore {id}")))
            }
        }
    }

    fn start_restore(&self, r: &RestoreRequest, tenant: Option<&str>) -> Result<Value, ApiError> {
        let v = self.volume(&r.volume, tenant)?;
        if Path::new(&r.to).exists() {
            return Err(ApiError::new(
                409,
                format!("{} exists: a restore creates a new file", r.to),
            ));
        }
        let mut args = vec!["restore".to_owned()];
        args.extend(v.dest_args()?);
        args.extend([
            "--snapshot".into(),
            r.snapshot.map_or("latest".into(), |s| s.to_string()),
            "--to".into(),
            r.to.clone(),
        ]);
        let id = self.next_restore.fetch_add(1, Ordering::Relaxed);
        let restore = Arc::new(Restore {
            id,
            volume: v.name.clone(),
            tenant: v.tenant.clone(),
            snapshot: r.snapshot,
            to: r.to.clone(),
            started_ms: now_ms(),
            state: Mutex::new(RestoreState {
                phase: "running",
                ..RestoreState::default()
            }),
        });
        // The child is spawned by the thread that waits for it: its death
        // signal follows the spawning thread, and this request's thread
        // ends with the response.
        let (spawned_tx, spawned_rx) = std::sync::mpsc::channel();
        let done = restore.clone();
        let creds = v.creds.clone();
        std::thread::Builder::new()
            .name(format!("restore-{id}"))
            .spawn(move || {
                let on_line = done.clone();
                let mut started = false;
                let status = run_child(
                    &args,
                    creds.as_ref(),
                    format!("restore {id}"),
                    |_| {
                        started = true;
                        let _ = spawned_tx.send(Ok(()));
                    },
                    |_| {},
                    move |line| {
                        let line = line.strip_prefix("foresnap: ").unwrap_or(line).to_owned();
                        on_line
                            .state
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .progress = Some(line);
                    },
                );
                if let (false, Err(e)) = (started, &status) {
                    // Not started: the request fails, no restore is listed.
                    let _ = spawned_tx.send(Err(e.clone()));
                    return;
                }
                let mut s = done.state.lock().unwrap_or_else(PoisonError::into_inner);
                s.finished_ms = Some(now_ms());
                match status {
                    Ok(st) if st.success() => s.phase = "done",
                    other => {
                        s.phase = "failed";
                        s.error = Some(s.progress.clone().unwrap_or_else(|| match other {
                            Ok(st) => st.to_string(),
                            Err(e) => e,
                        }));
                    }
                }
            })
            .map_err(|e| ApiError::new(500, format!("cannot start a thread: {e}")))?;
        spawned_rx
            .recv()
            .map_err(|_| ApiError::new(500, "the restore thread ended at once"))?
            .map_err(|e| ApiError::new(500, e))?;
        self.restores
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(restore.clone());
        Ok(restore.json())
    }
}

/// One connection: one request, one response.
fn handle(daemon: &Arc<Daemon>, mut conn: UnixStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let reply = loop {
        match api::decode(&buf) {
            Ok(Some((req, _))) => {
                break match daemon.answer(&req) {
                    Ok((status, body)) => api::response(status, &body),
                    Err(e) => api::error_response(&e),
                };
            }
            Ok(None) => {}
            Err(e) => break api::error_response(&e),
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break api::error_response(&ApiError::new(408, "no whole request within 10 s"));
            }
            Err(e) => return Err(e),
        }
    };
    conn.write_all(&reply)
}

/// "2 volumes (db, logs)", then "; 1 replica (x)" and "; 1 tier (y)" if
/// there are any.
fn counted<'a>(vols: impl Iterator<Item = &'a Vol> + Clone) -> String {
    let of = |kind: Kind| {
        let names: Vec<&str> = vols
            .clone()
            .filter(|v| v.kind == kind)
            .map(|v| v.name.as_str())
            .collect();
        let plural = if names.len() == 1 { "" } else { "s" };
        (!names.is_empty() || kind == Kind::Volume).then(|| {
            format!(
                "{} {}{plural} ({})",
                names.len(),
                kind.word(),
                names.join(", ")
            )
        })
    };
    [Kind::Volume, Kind::Replica, Kind::Tier]
        .into_iter()
        .filter_map(of)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `foresnap daemon`.
pub fn run(args: &DaemonArgs) -> anyhow::Result<()> {
    let (config, vols) = load(&args.config)?;
    if args.check {
        // The tenants' keys, proven where each volume writes.
        let mut refused = Vec::new();
        for v in vols
            .iter()
            .filter(|v| args.prove && v.kind == Kind::Volume && !v.dest.is_empty())
        {
            match prove(v) {
                Ok(warnings) => {
                    for w in warnings {
                        eprintln!("{}: volume {}: {w}", args.config.display(), v.name);
                    }
                }
                Err(e) => refused.push(format!("volume {}: {e:#}", v.name)),
            }
        }
        if !refused.is_empty() {
            bail!(
                "{}: {} of {} volumes cannot be served:\n  {}",
                args.config.display(),
                refused.len(),
                vols.len(),
                refused.join("\n  ")
            );
        }
        let mut tenants: Vec<&str> = vols.iter().map(|v| v.tenant.as_str()).collect();
        tenants.sort_unstable();
        tenants.dedup();
        println!(
            "{}: ok: {} of tenants {}; API on {}{}",
            args.config.display(),
            counted(vols.iter()),
            tenants.join(", "),
            config.socket.display(),
            if args.prove {
                "; every tenant wrote to its volumes' destinations"
            } else {
                ""
            }
        );
        return Ok(());
    }
    std::fs::create_dir_all(&config.run_dir)
        .with_context(|| format!("cannot create {}", config.run_dir.display()))?;
    let listener = control::bind(&config.socket, "control API socket")?;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ])
    .context("cannot install signal handlers")?;
    let daemon = Arc::new(Daemon {
        vols: vols.into_iter().map(Arc::new).collect(),
        restores: Mutex::new(Vec::new()),
        next_restore: AtomicU64::new(1),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let supervisors: Vec<_> = daemon
        .vols
        .iter()
        .map(|v| {
            let (v, stop) = (v.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("vol-{}", v.name))
                .spawn(move || supervise(&v, &stop))
                .context("cannot start a supervisor thread")
        })
        .collect::<anyhow::Result<_>>()?;
    let api = daemon.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        let d = api.clone();
                        let _ =
                            std::thread::Builder::new()
                                .name("api-conn".into())
                                .spawn(move || {
                                    if let Err(e) = handle(&d, c) {
                                        log::warn!("control API connection: {e}");
                                    }
                                });
                    }
                    Err(e) => log::warn!("control API socket: {e}"),
                }
            }
        })
        .context("cannot start the API thread")?;
    println!(
        "daemon ready: {}, API on {}",
        counted(daemon.vols.iter().map(|v| &**v)),
        config.socket.display()
    );
    let _ = std::io::stdout().flush();
    if let Some(sig) = signals.forever().next() {
        eprintln!("foresnap daemon: signal {sig}: stopping every volume");
    }
    stop.store(true, Ordering::Relaxed);
    for v in &daemon.vols {
        if let Some(pid) = v.state.lock().unwrap_or_else(PoisonError::into_inner).pid {
            // SAFETY: kill(2) on our own child's pid, which is not reaped
            // before its supervisor's wait returns.
            unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap_or(0), libc::SIGTERM) };
        }
    }
    for s in supervisors {
        let _ = s.join();
    }
    let _ = std::fs::remove_file(&config.socket);
    Ok(())
}

/// Client: `method path` to the daemon at `socket`, as `tenant`.
pub fn call(
    socket: &Path,
    method: Method,
    path: &str,
    tenant: Option<&str>,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let mut conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is foresnap daemon running?)",
            socket.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    conn.write_all(&api::request_bytes(method, path, tenant, body))?;
    let mut buf = Vec::new();
    conn.read_to_end(&mut buf)
        .with_context(|| format!("no answer from {}", socket.display()))?;
    let (status, v) = api::parse_response(&buf).map_err(anyhow::Error::msg)?;
    if !(200..300).contains(&status) {
        bail!("{}", v["error"].as_str().unwrap_or("the daemon refused"));
    }
    Ok(v)
}

/// `foresnap volumes`.
pub fn volumes(args: &crate::cli::VolumesArgs) -> anyhow::Result<()> {
    let socket = args.daemon.socket();
    let tenant = args.daemon.tenant.as_deref();
    let vols = call(&socket, Method::Get, "/v1/volumes", tenant, None)?;
    let dests = call(&socket, Method::Get, "/v1/destinations", tenant, None)?;
    let replicas = call(&socket, Method::Get, "/v1/replicas", tenant, None)?;
    let tiers = call(&socket, Method::Get, "/v1/tiers", tenant, None)?;
    if args.json {
        println!(
            "{}",
            json!({"volumes": vols["volumes"], "destinations": dests["destinations"],
                   "replicas": replicas["replicas"], "tiers": tiers["tiers"]})
        );
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<16} {:<12} {:<11} {:<14} {:>8}  {:<10} UPLOAD",
        "VOLUME", "TENANT", "STATE", "DEVICE", "RESTARTS", "DEST"
    )?;
    let empty = Vec::new();
    let dests = dests["destinations"].as_array().unwrap_or(&empty);
    for v in vols["volumes"].as_array().unwrap_or(&empty) {
        let d = dests.iter().find(|d| d["volume"] == v["name"]);
        let upload = d
            .map(|d| &d["upload"])
            .filter(|u| !u.is_null())
            .map_or_else(
                || "-".to_owned(),
                |u| {
                    if u["failing_since_ms"].is_null() {
                        u["last_uploaded"]["snapshot"]
                            .as_u64()
                            .map_or("ok, nothing stored yet".into(), |s| {
                                format!("ok, snapshot {s} stored")
                            })
                    } else {
                        format!("FAILING: {}", u["last_error"].as_str().unwrap_or("?"))
                    }
                },
            );
        let n_dest = v["dest"].as_array().map_or(0, Vec::len);
        writeln!(
            out,
            "{:<16} {:<12} {:<11} {:<14} {:>8}  {:<10} {upload}",
            v["name"].as_str().unwrap_or("?"),
            v["tenant"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            v["device"].as_str().unwrap_or("-"),
            v["restarts"],
            match n_dest {
                0 => "none".to_owned(),
                1 => "1".to_owned(),
                n => format!("{n} {}", v["dest_policy"].as_str().unwrap_or("")),
            },
        )?;
    }
    let jobs: Vec<(&str, &Value)> = replicas["replicas"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|r| ("replica", r))
        .chain(
            tiers["tiers"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|t| ("tier", t)),
        )
        .collect();
    if !jobs.is_empty() {
        writeln!(
            out,
            "\n{:<16} {:<8} {:<12} {:<11} {:>8}  LAST",
            "NAME", "KIND", "TENANT", "STATE", "RESTARTS"
        )?;
    }
    for (kind, r) in jobs {
        writeln!(
            out,
            "{:<16} {kind:<8} {:<12} {:<11} {:>8}  {}",
            r["name"].as_str().unwrap_or("?"),
            r["tenant"].as_str().unwrap_or("?"),
            r["state"].as_str().unwrap_or("?"),
            r["restarts"],
            r["last_message"]
                .as_str()
                .or(r["last_exit"].as_str())
                .unwrap_or("-"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Field 6 of /proc/PID/stat: the session id.
    fn session_in_stat(stat: &str) -> i32 {
        let after_comm = &stat[stat.rfind(") ").expect("no comm in stat") + 2..];
        after_comm.split(' ').nth(3).unwrap().parse().unwrap()
    }

    #[test]
    fn a_volume_server_leads_a_session_of_its_own() {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/stat").stdout(Stdio::piped());
        detach(&mut cmd);
        let child = cmd.spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let sid = session_in_stat(&String::from_utf8(out.stdout).unwrap());
        let own = session_in_stat(&std::fs::read_to_string("/proc/self/stat").unwrap());
        assert_eq!(sid, pid, "the child leads its own session");
        assert_ne!(sid, own);
    }

    fn running_vol(socket: PathBuf) -> Vol {
        Vol {
            kind: Kind::Volume,
            name: "v".into(),
            tenant: "t".into(),
            args: Vec::new(),
            socket,
            metrics: None,
            dest: Vec::new(),
            dest_policy: "single".into(),
            dest_volume: "t.v".into(),
            key_file: None,
            key_env: None,
            creds: None,
            state: Mutex::new(VolState {
                phase: "running",
                ..VolState::default()
            }),
        }
    }

    #[test]
    fn a_tenants_children_sign_with_its_key_and_never_the_daemons() {
        let daemon_env = [
            "PATH",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_ROLE_ARN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_REGION",
        ];
        let names = || daemon_env.iter().map(OsString::from);
        let creds = S3Credentials {
            access_key_id: "acme-id".into(),
            secret_access_key: "acme-secret".into(),
        };
        // The environment a child ends with, over the daemon's.
        let result = |env: Vec<(OsString, Option<OsString>)>| {
            let mut out: std::collections::BTreeMap<String, String> = daemon_env
                .iter()
                .map(|k| ((*k).to_owned(), "daemon's".to_owned()))
                .collect();
            for (k, v) in env {
                let k = k.into_string().unwrap();
                match v {
                    Some(v) => out.insert(k, v.into_string().unwrap()),
                    None => out.remove(&k),
                };
            }
            out
        };
        let with = result(tenant_env(names(), Some(&creds)));
        assert_eq!(with["AWS_ACCESS_KEY_ID"], "acme-id");
        assert_eq!(with["AWS_SECRET_ACCESS_KEY"], "acme-secret");
        let without = result(tenant_env(names(), None));
        assert!(!without.contains_key("AWS_ACCESS_KEY_ID"));
        assert!(!without.contains_key("AWS_SECRET_ACCESS_KEY"));
        for env in [with, without] {
            // Nothing of the daemon's identity, in any form the SDK's
            // chain reads; where and how to talk are kept.
            for (k, v) in &env {
                if k.starts_with("AWS_") && k != "AWS_REGION" {
                    assert_ne!(v, "daemon's", "{k} leaked to a tenant");
                }
            }
            assert_eq!(env["AWS_EC2_METADATA_DISABLED"], "true");
            assert_eq!(env["AWS_SHARED_CREDENTIALS_FILE"], "/dev/null");
            assert_eq!(env["AWS_CONFIG_FILE"], "/dev/null");
            assert_eq!(env["AWS_REGION"], "daemon's");
            assert_eq!(env["PATH"], "daemon's");
        }
    }

    #[test]
    fn a_tenants_secret_is_read_only_from_a_private_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("acme.secret");
        std::fs::write(&file, "s3cr3t\n").unwrap();
        let tenant = Tenant {
            name: "acme".into(),
            line: 3,
            destinations: vec!["s3://b".into()],
            access_key_id: Some("acme-id".into()),
            secret_key_file: Some(file.clone()),
        };
        let set_mode = |m| std::fs::set_permissions(&file, std::fs::Permissions::from_mode(m));
        set_mode(0o644).unwrap();
        let e = tenant_key(&tenant).unwrap_err().to_string();
        assert!(
            e.starts_with("line 3: tenant \"acme\": secret-key-file: ")
                && e.ends_with("group or others may read it (mode 644): chmod 600 it"),
            "{e}"
        );
        set_mode(0o600).unwrap();
        let c = tenant_key(&tenant).unwrap().unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("acme-id", "s3cr3t")
        );
        std::fs::write(&file, "two words\n").unwrap();
        assert!(
            tenant_key(&tenant)
                .unwrap_err()
                .to_string()
                .contains("on one line")
        );
        let missing = Tenant {
            secret_key_file: Some(dir.path().join("none")),
            ..tenant.clone()
        };
        assert!(
            tenant_key(&missing)
                .unwrap_err()
                .to_string()
                .contains("No such file")
        );
        let keyless = Tenant {
            access_key_id: None,
            secret_key_file: None,
            ..tenant
        };
        assert!(tenant_key(&keyless).unwrap().is_none());
    }

    /// A volume server that answers each connection with `answer`.
    fn server(path: &Path, answer: &'static str) {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            for mut c in l.incoming().map_while(Result::ok) {
                let mut line = String::new();
                let _ = BufReader::new(c.try_clone().unwrap()).read_line(&mut line);
                let _ = c.write_all(answer.as_bytes());
            }
        });
    }

    #[test]
    fn a_servers_failures_map_to_their_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let status = |v: &Vol| v.ask(&control::Request::Status).unwrap_err().status;
        // Nobody there: not answering.
        assert_eq!(status(&running_vol(dir.path().join("none.sock"))), 503);
        let garbled = dir.path().join("garbled.sock");
        server(&garbled, "not json\n");
        assert_eq!(status(&running_vol(garbled)), 502);
        let refusing = dir.path().join("refusing.sock");
        server(
            &refusing,
            "{\"ok\":false,\"error\":\"snapshot 3 is not awaiting upload\"}\n",
        );
        let e = running_vol(refusing)
            .ask(&control::Request::Status)
            .unwrap_err();
        assert_eq!(e.status, 409);
        assert!(e.message.contains("not awaiting upload"), "{e}");
        let answering = dir.path().join("ok.sock");
        server(&answering, "{\"ok\":true,\"open_epoch\":4}\n");
        assert_eq!(
            running_vol(answering)
                .ask(&control::Request::Status)
                .unwrap()["open_epoch"],
            4
        );
    }
}
