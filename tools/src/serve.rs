//! `foresnap serve`: one device in the foreground.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::Context;
use foresnap_driver::hydrate::{ChunkSource, Hydration};
use foresnap_driver::{Shutdown, StopReason};
use foresnap_uploader::link::TokenBucket;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::{ControlArgs, ExportArgs, ServeArgs, StatusArgs, TraceArgs};
use crate::control;

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let cfg = args.device_config();
    // Check everything first, so that bad input fails before the signal
    // thread or a device exists.
    foresnap_driver::device::check(&cfg)?;
    // The destination too: a bad URL or name fails before any device.
    let upload = crate::upload::prepare(&args.upload, Some(&args.sched), &args.backing)?;
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::metrics::bind)
        .transpose()?;
    serve_device(&cfg, upload, args.control.clone(), None, metrics)
}

/// A lazily restored volume's hydration, for [`serve_device`].
pub struct Lazy {
    pub hydration: Arc<Hydration>,
    pub source: Arc<dyn ChunkSource>,
    /// Background fetch workers (one more serves requests' chunks).
    pub workers: usize,
    /// Bytes per second for the background workers, if capped.
    pub cap: Option<u64>,
}

/// Serves the device of `cfg` in the foreground until SIGINT/SIGTERM:
/// uploads with `upload`, answers on the control socket, and with `lazy`
/// hydrates the volume while serving it.
pub fn serve_device(
    cfg: &foresnap_driver::DeviceConfig,
    upload: Option<crate::upload::UploadPlan>,
    control_arg: Option<std::path::PathBuf>,
    lazy: Option<Lazy>,
    metrics: Option<std::net::TcpListener>,
) -> anyhow::Result<()> {
    let io = metrics
        .as_ref()
        .map(|_| Arc::new(foresnap_driver::metrics::IoMetrics::new()));
    let io_sources = io.clone();
    let upload_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let uploader_stop = upload_stop.clone();

    let shutdown = Shutdown::new();
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("cannot install signal handlers")?;
    let handle = signals.handle();
    let on_signal = shutdown.clone();
    let signal_thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                log::info!("signal {sig}: removing the device");
                on_signal.trigger(StopReason::Requested);
            }
        })
        .context("cannot start the signal thread")?;

    let control_path = std::sync::Arc::new(std::sync::Mutex::new(None::<std::path::PathBuf>));
    let bound = control_path.clone();
    let ready_shutdown = shutdown.clone();
    let hydration = lazy.as_ref().map(|l| l.hydration.clone());
    let hydration_source = hydration.clone();
    let hydration_control = hydration.clone();
    let hydrator = Arc::new(Mutex::new(None::<std::thread::JoinHandle<()>>));
    let hydrator_slot = hydrator.clone();
    let (queues, target) = (cfg.queues, cfg.backing.clone());
    let lazy = lazy.map(|l| foresnap_driver::LazyVolume {
        hydration: l.hydration.clone(),
        start: Box::new(move |tracker| {
            let h = start_hydrator(l, tracker, queues, &target).map_err(std::io::Error::other)?;
            *hydrator_slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(h);
            Ok(())
        }),
    });
    let result = foresnap_driver::serve_with(cfg, &shutdown, lazy, io, move |info| {
        let mut sources = io_sources.map(|io| crate::metrics::Sources {
            io,
            tracker: None,
            upload: None,
            hydration: hydration_source,
        });
        if let Some((tracker, report)) = &info.tracker {
            let view = match upload.map(|plan| plan.start(tracker.clone(), uploader_stop)) {
                Some(Ok(v)) => Some(v),
                Some(Err(e)) => {
                    eprintln!("foresnap: {e:#}");
                    ready_shutdown.trigger(StopReason::QueueExited);
                    return;
                }
                None => None,
            };
            if let Some(s) = &mut sources {
                s.tracker = Some(tracker.clone());
                s.upload.clone_from(&view);
            }
            let path = control_arg.unwrap_or_else(|| control::default_socket(info.id));
            if let Err(e) = control::serve(&path, tracker.clone(), view, hydration_control) {
                // No control path means no snapshots: do not serve a
                // device that looks tracked but cannot be snapshotted.
                eprintln!("foresnap: {e:#}");
                ready_shutdown.trigger(StopReason::QueueExited);
                return;
            }
            log::info!(
                "tracking: ring {}, epoch {}, control {}; recovered {} records ({} torn), \
                 {} closed epochs, {} changed blocks, {} from the overflow bitmap{}",
                tracker.ring_path().display(),
                tracker.open_epoch(),
                path.display(),
                report.records,
                report.torn,
                report.closed_epochs,
                report.open_blocks,
                report.bitmap_blocks,
                if report.still_degraded {
                    "; DEGRADED: the ring is full"
                } else {
                    ""
                }
            );
            *bound
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(path);
            if report.existing_blocks > 0 {
                log::info!(
                    "new ring on a volume with data: {} blocks tracked for the first snapshot",
                    report.existing_blocks
                );
            }
        }
        if let (Some(listener), Some(sources)) = (metrics, sources)
            && let Err(e) = crate::metrics::start(listener, sources)
        {
            eprintln!("foresnap: {e:#}");
            ready_shutdown.trigger(StopReason::QueueExited);
            return;
        }
        let mut out = std::io::stdout().lock();
        // The one line scripts wait for; flushed at once because stdout
        // may be a pipe.
        let _ = writeln!(out, "device {} ready", info.path.display());
        let _ = out.flush();
        log::info!(
            "{} bytes, {} queues x {} deep, block size {}, {} I/O{}",
            info.size,
            info.queues,
            info.depth,
            info.block_size,
            if info.direct_io { "direct" } else { "buffered" },
            if info.recovered {
                ", recovered from a previous server"
            } else {
                ""
            }
        );
    });
    handle.close();
    let _ = signal_thread.join();
    upload_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = &hydration {
        // The chunk being fetched is finished or dropped whole: the state
        // file never claims what is not on the volume.
        h.stop();
        if let Some(t) = hydrator
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = t.join();
        }
        let p = h.progress();
        if !h.complete() {
            eprintln!(
                "foresnap: stopped with {} of {} chunks restored; run the same restore --lazy \
                 again to resume (state in {})",
                p.ready,
                p.chunks,
                h.path().display()
            );
        }
    }
    if let Some(p) = control_path
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take()
    {
        let _ = std::fs::remove_file(p);
    }
    match result? {
        StopReason::Requested => Ok(()),
        StopReason::QueueExited => {
            anyhow::bail!("the device stopped without being asked to (removed by another tool?)")
        }
    }
}

/// Starts the hydrator thread of a lazily restored volume: it writes each
/// chunk through the tracker as writer `queues` (one past the device's
/// queues), so that the restored content is the new volume's first epoch,
/// and reports progress on stderr.
fn start_hydrator(
    lazy: Lazy,
    tracker: Arc<foresnap_driver::tracking::Tracker>,
    queues: u16,
    target: &std::path::Path,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(target)
        .with_context(|| format!("cannot open {} for the restore", target.display()))?;
    std::thread::Builder::new()
        .name("hydrator".into())
        .spawn(move || {
            let h = &lazy.hydration;
            let started = Instant::now();
            let total = h.chunks();
            let last = Mutex::new(u64::MAX);
            // A chunk of burst: one background fetch at a time at the rate.
            #[allow(clippy::cast_precision_loss)]
            let bucket = lazy
                .cap
                .map(|r| Mutex::new(TokenBucket::new_empty(r as f64, h.chunk_bytes() as f64)));
            let pace = |bytes: u64| {
                if let Some(b) = &bucket {
                    let wait = b
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take(started.elapsed().as_secs_f64(), bytes);
                    std::thread::sleep(std::time::Duration::from_secs_f64(wait.max(0.0)));
                }
            };
            let p = h.run(
                lazy.source.as_ref(),
                &|offset, data| tracker.write_volume_as(queues, &file, offset, data),
                &|| {
                    file.sync_data()?;
                    tracker.ring_file().sync_data()
                },
                &|| tracker.wake_queues(),
                &pace,
                lazy.workers,
                &|p| {
                    let step = p.ready * 10 / total.max(1);
                    let mut l = last.lock().unwrap_or_else(PoisonError::into_inner);
                    if *l != step {
                        *l = step;
                        eprintln!(
                            "foresnap: hydration {:3}% ({}/{} chunks, {} on demand) {:.1} s",
                            p.ready * 100 / total.max(1),
                            p.ready,
                            p.chunks,
                            p.on_demand,
                            started.elapsed().as_secs_f64()
                        );
                    }
                },
            );
            if h.complete() {
                match h.finish() {
                    Ok(()) => eprintln!(
                        "foresnap: hydration complete: {} chunks ({} on demand) in {:.1} s; \
                         the volume is whole",
                        p.chunks,
                        p.on_demand,
                        started.elapsed().as_secs_f64()
                    ),
                    Err(e) => eprintln!(
                        "foresnap: hydration complete, but its state {} stays: {e}",
                        h.path().display()
                    ),
                }
            } else if p.failed > 0 {
                eprintln!(
                    "foresnap: hydration: {} of {} chunks could not be restored (their I/O \
                     fails with EIO); run the restore again once the destination answers",
                    p.failed, p.chunks
                );
            }
        })
        .context("cannot start the hydrator thread")
}

/// `foresnap snapshot`: close the open epoch of a serving device.
pub fn snapshot(args: &ControlArgs) -> anyhow::Result<()> {
    let (v, of) = if args.volume.is_some() || args.daemon.daemon.is_some() {
        let name = args
            .volume
            .as_deref()
            .context("--daemon: give the volume to snapshot with --volume NAME")?;
        let v = crate::daemon::call(
            &args.daemon.socket(),
            foresnap_control::api::Method::Post,
            &format!("/v1/volumes/{name}/snapshots"),
            args.daemon.tenant.as_deref(),
            None,
        )?;
        (v, format!("volume {name}: "))
    } else {
        let socket = control::resolve(args.control.as_deref())?;
        (
            control::call(&socket, &control::Request::Snapshot)?,
            String::new(),
        )
    };
    let bytes = v["bytes"].as_u64().unwrap_or(0);
    // Display only.
    #[allow(clippy::cast_precision_loss)]
    let mib = bytes as f64 / f64::from(1u32 << 20);
    println!(
        "{of}snapshot {} closed: {} blocks changed ({:.1} MiB), writes paused {} us",
        v["snapshot"], v["blocks"], mib, v["pause_us"]
    );
    Ok(())
}

/// `foresnap status`: the tracker's state, one line per item; of a serving
/// device, or of a daemon's volumes.
pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    // Nothing named, and only the daemon runs: every volume of the daemon.
    let daemon_only = args.control.is_none()
        && std::path::Path::new(foresnap_control::config::DEFAULT_SOCKET).exists()
        && control::resolve(None).is_err();
    let (fetch, source): (Box<dyn Fn() -> anyhow::Result<String>>, String) =
        if args.volume.is_some() || args.daemon.daemon.is_some() || daemon_only {
            let socket = args.daemon.socket();
            let tenant = args.daemon.tenant.clone();
            let volume = args.volume.clone();
            let at = socket.clone();
            (
                Box::new(move || daemon_status(&at, tenant.as_deref(), volume.as_deref())),
                socket.display().to_string(),
            )
        } else {
            let socket = control::resolve(args.control.as_deref())?;
            let at = socket.clone();
            (
                Box::new(move || {
                    let v = control::call(&at, &control::Request::Status)?;
                    let mut out = String::new();
                    render_status(&v, &mut out)?;
                    Ok(out)
                }),
                socket.display().to_string(),
            )
        };
    let Some(every) = args.watch else {
        print!("{}", fetch()?);
        return Ok(());
    };
    let tty = std::io::stdout().is_terminal();
    loop {
        let out = fetch().context("status --watch: the daemon stopped answering")?;
        let now = foresnap_uploader::retention::utc(wall_ms());
        let mut stdout = std::io::stdout().lock();
        if tty {
            // Home and clear the screen: each refresh replaces the last.
            write!(stdout, "\x1b[H\x1b[2J")?;
        }
        write!(
            stdout,
            "{source} at {now} (every {:.1} s; ^C to stop)\n{out}",
            every.as_secs_f64()
        )?;
        if !tty {
            writeln!(stdout)?;
        }
        stdout.flush()?;
        drop(stdout);
        std::thread::sleep(every);
    }
}

/// `status` of one volume of a daemon, or of all of them.
fn daemon_status(
    socket: &std::path::Path,
    tenant: Option<&str>,
    volume: Option<&str>,
) -> anyhow::Result<String> {
    use foresnap_control::api::Method;
    let names: Vec<String> = match volume {
        Some(v) => vec![v.to_owned()],
        None => crate::daemon::call(socket, Method::Get, "/v1/volumes", tenant, None)?["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(str::to_owned))
            .collect(),
    };
    let mut out = String::new();
    for name in names {
        let v = crate::daemon::call(
            socket,
            Method::Get,
            &format!("/v1/volumes/{name}"),
            tenant,
            None,
        )?;
        writeln!(
            out,
            "volume {name} (tenant {}): {}{}, {} restarts",
            v["tenant"].as_str().unwrap_or("?"),
            v["state"].as_str().unwrap_or("?"),
            v["device"]
                .as_str()
                .map(|d| format!(" as {d}"))
                .unwrap_or_default(),
            v["restarts"]
        )?;
        if let Some(e) = v["status_error"].as_str() {
            writeln!(out, "  {e}")?;
        } else {
            render_status(&v["status"], &mut out)?;
        }
    }
    Ok(out)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The text of `status` for the daemon's answer `v`.
fn render_status(v: &serde_json::Value, out: &mut String) -> std::fmt::Result {
    writeln!(out, "open epoch        {}", v["open_epoch"])?;
    writeln!(out, "pending blocks    {}", v["pending_blocks"])?;
    writeln!(
        out,
        "ring fill         {:.1}%{}",
        v["ring_fill"].as_f64().unwrap_or(0.0) * 100.0,
        if v["degraded"] == serde_json::Value::Bool(true) {
            " DEGRADED (overflow bitmap in use)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "copy-on-write     {} blocks copied, {} preserve slots in use",
        v["cow_blocks"], v["preserve_slots_used"]
    )?;
    writeln!(out, "deferred writes   {}", v["deferred_writes"])?;
    let h = &v["hydration"];
    if !h.is_null() {
        let (chunks, ready) = (
            h["chunks"].as_u64().unwrap_or(0),
            h["ready"].as_u64().unwrap_or(0),
        );
        writeln!(
            out,
            "hydration         {}% ({ready} of {chunks} chunks restored, {} on demand{})",
            ready * 100 / chunks.max(1),
            h["on_demand"],
            match h["failed"].as_u64() {
                Some(0) | None => String::new(),
                Some(n) => format!(", {n} FAILED: their I/O fails with EIO; run the restore again"),
            }
        )?;
    }
    print_upload(&v["upload"], out)?;
    print_prune(&v["prune"], out)?;
    print_schedule(&v["schedule"], out)?;
    let closed = v["closed"].as_array().cloned().unwrap_or_default();
    writeln!(out, "awaiting upload   {} snapshots", closed.len())?;
    for e in closed {
        writeln!(
            out,
            "  snapshot {}: {} blocks, {} preserved{}",
            e["snapshot"],
            e["blocks"],
            e["preserved"],
            if e["damaged"] == serde_json::Value::Bool(true) {
                ", DAMAGED (a copy-on-write failed)"
            } else {
                ""
            }
        )?;
    }
    Ok(())
}

/// The uploader's standing in `status`: healthy (its last snapshot), or
/// failing (since when, how often, why, and the next attempt).
fn print_upload(u: &serde_json::Value, out: &mut String) -> std::fmt::Result {
    if u.is_null() {
        writeln!(out, "upload            none (no --dest)")?;
        return Ok(());
    }
    let now = wall_ms();
    #[allow(clippy::cast_precision_loss)]
    let ago = |ms: &serde_json::Value| now.saturating_sub(ms.as_u64().unwrap_or(now)) as f64 / 1e3;
    let dest = u["dest"].as_str().unwrap_or("?");
    if let Some(since) = u.get("failing_since_ms").filter(|v| !v.is_null()) {
        #[allow(clippy::cast_precision_loss)]
        let next = u["retry_at_ms"].as_u64().unwrap_or(now).saturating_sub(now) as f64 / 1e3;
        writeln!(
            out,
            "upload            FAILING for {:.0} s ({} attempts) to {dest}: {}; next attempt in {next:.0} s",
            ago(since),
            u["failures"],
            u["last_error"].as_str().unwrap_or("?")
        )?;
    } else if let Some(last) = u.get("last_uploaded").filter(|v| !v.is_null()) {
        writeln!(
            out,
            "upload            ok to {dest}: snapshot {} stored {:.1} s ago",
            last["snapshot"],
            ago(&last["at_ms"])
        )?;
    } else {
        writeln!(
            out,
            "upload            ok to {dest}: nothing stored yet by this server"
        )?;
    }
    for line in u["price_forecast"].as_array().into_iter().flatten() {
        writeln!(out, "price             {}", line.as_str().unwrap_or("?"))?;
    }
    Ok(())
}

/// The pruner's standing in `status` (`serve --keep-*`).
fn print_prune(p: &serde_json::Value, out: &mut String) -> std::fmt::Result {
    if p.is_null() {
        return Ok(());
    }
    let now = wall_ms();
    #[allow(clippy::cast_precision_loss)]
    let ago = |ms: &serde_json::Value| now.saturating_sub(ms.as_u64().unwrap_or(now)) as f64 / 1e3;
    if let Some(since) = p.get("failing_since_ms").filter(|v| !v.is_null()) {
        writeln!(
            out,
            "prune             FAILING for {:.0} s: {}; tried again a minute after each try",
            ago(since),
            p["last_error"].as_str().unwrap_or("?")
        )
    } else if let Some(ran) = p.get("last_run_ms").filter(|v| !v.is_null()) {
        writeln!(
            out,
            "prune             ok {:.0} s ago, after snapshot {}: {} kept, {} dropped since start",
            ago(ran),
            p["after_snapshot"],
            p["kept"],
            p["dropped_total"]
        )
    } else {
        writeln!(out, "prune             after the first upload")
    }
}

/// The schedule part of `status`: the next close, the planner's view and
/// the last snapshots' lag.
fn print_schedule(s: &serde_json::Value, out: &mut String) -> std::fmt::Result {
    use foresnap_uploader::units::{format_bytes, format_rate};
    if s.is_null() {
        writeln!(
            out,
            "schedule          none (snapshots only by `foresnap snapshot`)"
        )?;
        return Ok(());
    }
    let secs = |v: &serde_json::Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1} s"));
    let bytes = |v: &serde_json::Value| format_bytes(v.as_f64().unwrap_or(0.0));
    let p = &s["plan"];
    if let Some(ts) = p["ts_s"].as_f64() {
        writeln!(
            out,
            "next close        in {ts:.1} s (snapshot {})",
            p["open_epoch"]
        )?;
    }
    if !p.is_null() {
        writeln!(
            out,
            "to upload (D)     {} ({} of the open snapshot, {} held back as hot)",
            bytes(&p["outstanding_bytes"]),
            bytes(&p["open_bytes"]),
            bytes(&p["hot_bytes"])
        )?;
        writeln!(
            out,
            "throughput (B)    {}",
            p["rate"]
                .as_f64()
                .map_or("not measured yet".to_owned(), format_rate)
        )?;
        if p["started"] == serde_json::Value::Bool(true) {
            writeln!(out, "upload            started before the close")?;
        } else {
            writeln!(
                out,
                "upload            starts in {}",
                secs(&p["start_in_s"])
            )?;
        }
        if let Some(lag) = p["predicted_lag_s"].as_f64() {
            let warn = if lag > 1.0 {
                " WARNING: the snapshot will complete late"
            } else {
                ""
            };
            writeln!(out, "predicted lag     {lag:.1} s after the close{warn}")?;
        }
    }
    writeln!(
        out,
        "sent early        {} kept, {} voided by later writes",
        bytes(&s["sent_early"]),
        bytes(&s["voided"])
    )?;
    for t in s["history"].as_array().into_iter().flatten() {
        let lag = (t["completed_ms"].as_f64().unwrap_or(0.0)
            - t["scheduled_ms"].as_f64().unwrap_or(0.0))
            / 1000.0;
        writeln!(
            out,
            "  snapshot {}: complete {lag:.2} s after its scheduled close",
            t["snapshot"]
        )?;
    }
    Ok(())
}

/// `foresnap trace`: the ring's write records as a fio iolog.
pub fn trace(args: &TraceArgs) -> anyhow::Result<()> {
    use foresnap_driver::tracking::ring_format::{HEADER_BYTES, Header, recover};
    let bytes = std::fs::read(&args.ring)
        .with_context(|| format!("cannot read ring {}", args.ring.display()))?;
    if bytes.len() < HEADER_BYTES {
        anyhow::bail!(
            "ring {} is truncated: {} bytes, shorter than its {HEADER_BYTES}-byte header",
            args.ring.display(),
            bytes.len()
        );
    }
    let header = Header::decode(&bytes).with_context(|| format!("ring {}", args.ring.display()))?;
    // As the tracker's open: a ring shorter than its header says is
    // refused, not read in part.
    if (bytes.len() as u64) < header.file_bytes() {
        anyhow::bail!(
            "ring {} is truncated: {} bytes, its header says {}",
            args.ring.display(),
            bytes.len(),
            header.file_bytes()
        );
    }
    let end = usize::try_from(header.bitmap_offset()).unwrap_or(usize::MAX);
    let area = &bytes[HEADER_BYTES..end];
    let recovered = recover(area);
    let n = if args.out.as_os_str() == "-" {
        let mut out = std::io::stdout().lock();
        foresnap_driver::tracking::trace::write_iolog(&recovered.records, &args.file, &mut out)?
    } else {
        let f = std::fs::File::create(&args.out)
            .with_context(|| format!("cannot create {}", args.out.display()))?;
        let mut out = std::io::BufWriter::new(f);
        let n = foresnap_driver::tracking::trace::write_iolog(
            &recovered.records,
            &args.file,
            &mut out,
        )?;
        out.flush()
            .with_context(|| format!("cannot write {}", args.out.display()))?;
        n
    };
    if args.out.as_os_str() != "-" {
        eprintln!(
            "foresnap: {n} writes from {} records ({} torn) written to {}",
            recovered.records.len(),
            recovered.torn,
            args.out.display()
        );
    }
    if recovered.damaged > 0 {
        eprintln!(
            "foresnap: ring {}: {} damaged records left out (their writes are unknown)",
            args.ring.display(),
            recovered.damaged
        );
    }
    Ok(())
}

/// `foresnap export`: a snapshot's closed content of its changed blocks.
pub fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let socket = control::resolve(args.control.control.as_deref())?;
    let out = std::path::absolute(&args.out)
        .with_context(|| format!("bad path {}", args.out.display()))?;
    let v = control::call(
        &socket,
        &control::Request::Export {
            snapshot: args.snapshot,
            path: out.clone(),
        },
    )?;
    let mut stdout = std::io::stdout().lock();
    for r in v["runs"].as_array().into_iter().flatten() {
        writeln!(stdout, "{} {}", r[0], r[1])?;
    }
    drop(stdout);
    eprintln!(
        "foresnap: snapshot {}: {} blocks written to {}",
        args.snapshot,
        v["written"],
        out.display()
    );
    Ok(())
}
