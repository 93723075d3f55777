//! The control socket: a unix stream socket on which the serving daemon
//! answers one JSON request per line with one JSON response per line.
//!
//! Requests: `{"op":"snapshot"}` closes the open epoch now;
//! `{"op":"status"}` reports the tracker's state. Responses carry
//! `"ok": true` and the result, or `"ok": false` and `"error"`. This is
//! the path the operator API grows into; the CLI subcommands are its
//! clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::upload::UploadView;
use anyhow::{Context, bail};
use foresnap_driver::hydrate::Hydration;
use foresnap_driver::tracking::Tracker;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Where sockets go by default.
pub const RUN_DIR: &str = "/run/foresnap";

/// The default socket of device `/dev/ublkbN`.
pub fn default_socket(dev_id: u32) -> PathBuf {
    Path::new(RUN_DIR).join(format!("ublkb{dev_id}.sock"))
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Snapshot,
    Status,
    /// Write the closed content of snapshot `snapshot`'s pending blocks
    /// into the file `path` (created sparse, volume-sized, at their
    /// offsets) and return the changed blocks as runs.
    Export {
        snapshot: u32,
        path: PathBuf,
    },
}

/// Serves requests on `path` (see [`bind`]) on a thread until the process
/// exits.
pub fn serve(
    path: &Path,
    tracker: Arc<Tracker>,
    upload: Option<UploadView>,
    hydration: Option<Arc<Hydration>>,
) -> anyhow::Result<()> {
    let listener = bind(path, "control socket")?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = handle(c, &tracker, upload.as_ref(), hydration.as_deref()) {
                            log::warn!("control connection: {e:#}");
                        }
                    }
                    Err(e) => log::warn!("control socket: {e}"),
                }
            }
        })
        .context("cannot start the control thread")?;
    Ok(())
}

/// Binds the unix socket `path` (`what` names it in errors): creates its
/// directory, replaces a stale socket left by a killed process but never a
/// live one, and lets only the owner (root) connect. Also the daemon's API.
pub fn bind(path: &Path, what: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{what} {} is in use by another daemon", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind {what} {}", path.display()))?;
    // Root's tool: only the owner may close snapshots.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

fn handle(
    conn: UnixStream,
    tracker: &Tracker,
    upload: Option<&UploadView>,
    hydration: Option<&Hydration>,
) -> anyhow::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    // Requests are one short line: refuse to buffer unbounded input.
    let n = reader.by_ref().take(64 << 10).read_line(&mut line)?;
    let response = if n == 0 {
        return Ok(());
    } else {
        match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => answer(&req, tracker, upload, hydration),
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        }
    };
    let mut conn = conn;
    writeln!(conn, "{response}")?;
    Ok(())
}

fn answer(
    req: &Request,
    tracker: &Tracker,
    upload: Option<&UploadView>,
    hydration: Option<&Hydration>,
) -> Value {
    let deadlines = upload.and_then(|u| u.deadlines.as_deref());
    match req {
        Request::Snapshot => match tracker.close() {
            Ok(c) => json!({
                "ok": true,
                "snapshot": c.epoch,
                "blocks": c.blocks,
                "bytes": c.bytes,
                "pause_us": u64::try_from(c.pause.as_micros()).unwrap_or(u64::MAX),
            }),
            Err(e) => json!({"ok": false, "error": e.to_string()}),
        },
        Request::Export { snapshot, path } => match export(tracker, *snapshot, path) {
            Ok((runs, written)) => json!({"ok": true, "runs": runs, "written": written}),
            Err(e) => json!({"ok": false, "error": format!("{e:#}")}),
        },
        Request::Status => {
            let s = tracker.status();
            json!({
                "ok": true,
                "open_epoch": s.open_epoch,
                "pending_blocks": s.pending_blocks,
                "ring_fill": s.ring_fill,
                "degraded": s.degraded,
                "preserve_slots_used": s.preserve_slots_used,
                "cow_blocks": s.cow_blocks,
                "deferred_writes": s.deferred_writes,
                "schedule": deadlines.map(|d| {
                    let (sent_early, voided) = d.early_bytes();
                    json!({
                        "next_close_ms": d.next_close_ms(),
                        "plan": d.plan(),
                        "history": d.history(),
                        "sent_early": sent_early,
                        "voided": voided,
                    })
                }),
                "upload": upload.map(|u| {
                    let h = u.health.get();
                    json!({
                        "dest": u.dest,
                        "last_uploaded": h.last_uploaded.map(|(id, ms)| json!({"snapshot": id, "at_ms": ms})),
                        "failing_since_ms": h.failing_since_ms,
                        "failures": h.failures,
                        "last_error": h.last_error,
                        "retry_at_ms": h.retry_at_ms,
                        "price_forecast": u.priced.as_deref().and_then(crate::upload::price_lines),
                    })
                }),
                "prune": upload.and_then(|u| u.prune.as_ref()).map(|p| {
                    let st = p.get();
                    json!({
                        "last_run_ms": st.last_run_ms,
                        "after_snapshot": st.after_snapshot,
                        "kept": st.kept,
                        "dropped_total": st.dropped_total,
                        "failing_since_ms": st.failing_since_ms,
                        "last_error": st.last_error,
                    })
                }),
                // A lazily restored volume's hydration.
                "hydration": hydration.map(|h| {
                    let p = h.progress();
                    json!({
                        "chunks": p.chunks,
                        "ready": p.ready,
                        "failed": p.failed,
                        "on_demand": p.on_demand,
                        "chunk_bytes": h.chunk_bytes(),
                    })
                }),
                "closed": s.closed.iter().map(|e| json!({
                    "snapshot": e.epoch,
                    "blocks": e.blocks,
                    "preserved": e.preserved,
                    "closed_ms": e.closed_ms,
                    "damaged": e.damaged,
                })).collect::<Vec<_>>(),
            })
        }
    }
}

/// Writes snapshot `epoch`'s pending closed content to `path`.
fn export(tracker: &Tracker, epoch: u32, path: &Path) -> anyhow::Result<(Vec<(u64, u64)>, u64)> {
    use foresnap_driver::tracking::tracker::ReadClosedError;
    use std::os::unix::fs::FileExt;
    let set = tracker
        .changed_blocks(epoch)
        .with_context(|| format!("snapshot {epoch} is not awaiting upload"))?;
    let bs = 1u64 << tracker.map().geometry().block_shift;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    out.set_len(tracker.volume_bytes())?;
    let mut buf = vec![0u8; usize::try_from(bs)?];
    let mut written = 0;
    for b in set.blocks() {
        match tracker.read_closed(epoch, b, &mut buf) {
            Ok(_) => {
                // A last, partial block stops at the end of the volume.
                let len = tracker.volume_bytes().saturating_sub(b * bs).min(bs);
                out.write_all_at(&buf[..usize::try_from(len)?], b * bs)?;
                written += 1;
            }
            Err(ReadClosedError::NotPending { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    out.sync_all()?;
    Ok((set.runs().to_vec(), written))
}

/// Client: sends `req` to the daemon at `socket`, returns its result.
pub fn call(socket: &Path, req: &Request) -> anyhow::Result<Value> {
    let mut conn = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the daemon at {} (is foresnap serve running?)",
            socket.display()
        )
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(conn, "{}", serde_json::to_string(req)?)?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line)?;
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("unreadable answer from {}", socket.display()))?;
    if v["ok"] != Value::Bool(true) {
        bail!("{}", v["error"].as_str().unwrap_or("the daemon refused"));
    }
    Ok(v)
}

/// The socket to talk to: the one given, or the only one in [`RUN_DIR`].
pub fn resolve(socket: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(s) = socket {
        return Ok(s.to_owned());
    }
    let found: Vec<PathBuf> = std::fs::read_dir(RUN_DIR)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                // The daemon's API speaks HTTP, not this protocol.
                .filter(|p| p.as_path() != Path::new(foresnap_control::config::DEFAULT_SOCKET))
                .collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] if Path::new(foresnap_control::config::DEFAULT_SOCKET).exists() => bail!(
            "no serving device in {RUN_DIR}, but foresnap daemon answers at {}: give \
             --volume NAME (or --control SOCKET)",
            foresnap_control::config::DEFAULT_SOCKET
        ),
        [] => bail!("no daemon found in {RUN_DIR}: give --control SOCKET"),
        many => bail!(
            "several daemons in {RUN_DIR} ({}): give --control SOCKET",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
