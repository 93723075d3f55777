//! The device's life: checks, creation (or user recovery of a device whose
//! server died), serving until told to stop, and removal.
//!
//! Devices are created with `UBLK_F_USER_RECOVERY` and
//! `UBLK_F_USER_RECOVERY_REISSUE`: when the server dies (`kill -9`, a crash)
//! the kernel keeps `/dev/ublkbN` and holds its I/O; `serve` started again
//! with the same `--id` and backing re-attaches, and requests that were in
//! flight are reissued to the new server. A normal stop (a
//! [`Shutdown`] trigger, which the binary wires to SIGINT/SIGTERM) removes
//! the device, so a normal exit never leaves a device behind.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use libublk::{UblkError, UblkFlags, sys};
use serde::{Deserialize, Serialize};

use crate::backing::Backing;
use crate::config::{BlockSize, DeviceConfig};
use crate::error::{DeviceError, Error};
use crate::hydrate::Hydration;
use crate::metrics::IoMetrics;
use crate::queue::serve_queue;
use crate::tracking::Geometry;
use crate::tracking::tracker::{RecoveryReport, Tracker, TrackerConfig};

const CONTROL: &str = "/dev/ublk-control";
/// Target name in the kernel's device info and libublk's JSON export.
const TARGET: &str = "foresnap";

/// What a running device looks like.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub id: u32,
    /// `/dev/ublkbN`.
    pub path: PathBuf,
    pub size: u64,
    pub queues: u16,
    pub depth: u16,
    pub block_size: BlockSize,
    /// Backing I/O bypasses the page cache.
    pub direct_io: bool,
    /// This server re-attached to a device whose previous server died.
    pub recovered: bool,
    /// Change tracking, when on, and what its start recovered.
    pub tracker: Option<(Arc<Tracker>, RecoveryReport)>,
}

/// Why a device stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Asked to (a signal, the control API).
    Requested,
    /// A queue thread ended on its own: the kernel stopped the device
    /// (e.g. `ublk del`) or a queue failed.
    QueueExited,
}

/// A one-shot stop signal shared by whoever may ask the device to stop and
/// the thread waiting for it. Not on the I/O path.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    inner: Arc<(Mutex<Option<StopReason>>, Condvar)>,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks for a stop; the first reason given wins.
    pub fn trigger(&self, reason: StopReason) {
        let (lock, cv) = &*self.inner;
        let mut r = lock.lock().unwrap_or_else(PoisonError::into_inner);
        r.get_or_insert(reason);
        cv.notify_all();
    }

    /// Blocks until a stop is asked for.
    pub fn wait(&self) -> StopReason {
        let (lock, cv) = &*self.inner;
        let mut r = lock.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(reason) = *r {
                return reason;
            }
            r = cv.wait(r).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The reason, if a stop was asked for.
    pub fn reason(&self) -> Option<StopReason> {
        *self.inner.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What foresnap records in libublk's per-device JSON, so that a restarted
/// server can check it is recovering its own device.
#[derive(Debug, Serialize, Deserialize)]
struct TargetJson {
    backing: PathBuf,
    block_size: u32,
}

/// Whether this kernel can host ublk devices, loading `ublk_drv` if needed.
pub fn ublk_available() -> Result<(), DeviceError> {
    if !Path::new(CONTROL).exists() {
        // modprobe is best effort: absent tools or no module both end in
        // the same clear error below.
        let _ = std::process::Command::new("modprobe")
            .arg("ublk_drv")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(DeviceError::Permission),
        Err(_) => Err(DeviceError::NoUblk),
    }
}

fn ublk_err(op: &'static str) -> impl FnOnce(UblkError) -> Error {
    move |source| Error::Device(DeviceError::Ublk { op, source })
}

fn state_name(state: u16) -> &'static str {
    match u32::from(state) {
        sys::UBLK_S_DEV_DEAD => "not started",
        sys::UBLK_S_DEV_LIVE => "live",
        sys::UBLK_S_DEV_QUIESCED => "quiesced",
        sys::UBLK_S_DEV_FAIL_IO => "failing I/O",
        _ => "unknown state",
    }
}

/// An existing device with our id that is waiting for a new server.
struct Recovery {
    queues: u16,
    depth: u16,
    io_buf_bytes: u32,
    block_size: BlockSize,
}

/// Looks at device `id`: `None` if it does not exist, the recovery plan if
/// it is ours and waiting, an error if it is busy or someone else's.
fn probe_existing(id: u32, cfg: &DeviceConfig) -> Result<Option<Recovery>, Error> {
    if !Path::new(&format!("/dev/ublkc{id}")).exists() {
        return Ok(None);
    }
    let id_i32 = i32::try_from(id).map_err(|_| crate::error::ConfigError::Id(id))?;
    let ctrl = UblkCtrl::new_simple(id_i32).map_err(ublk_err("get device info"))?;
    let info = ctrl.dev_info();
    let recoverable = info.flags & u64::from(sys::UBLK_F_USER_RECOVERY) != 0;
    if u32::from(info.state) != sys::UBLK_S_DEV_QUIESCED || !recoverable {
        return Err(DeviceError::IdBusy {
            id,
            state: state_name(info.state),
        }
        .into());
    }
    let theirs: Option<TargetJson> = ctrl
        .get_target_data_from_json()
        .and_then(|v| serde_json::from_value(v[TARGET].clone()).ok());
    let ours = cfg
        .backing
        .canonicalize()
        .unwrap_or_else(|_| cfg.backing.clone());
    match theirs {
        Some(t) if t.backing == ours => {}
        other => {
            return Err(DeviceError::RecoverMismatch {
                id,
                theirs: other.map_or_else(
                    || "an unknown target".to_owned(),
                    |t| format!("backing {}", t.backing.display()),
                ),
                ours: format!("backing {}", ours.display()),
            }
            .into());
        }
    }
    let mut params = sys::ublk_params::default();
    ctrl.get_params(&mut params)
        .map_err(ublk_err("get params"))?;
    let block_size = if params.basic.logical_bs_shift == 9 {
        BlockSize::B512
    } else {
        BlockSize::B4096
    };
    Ok(Some(Recovery {
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        io_buf_bytes: info.max_io_buf_bytes,
        block_size,
    }))
}

/// Checks `cfg` without creating anything: every input error, and the
/// kernel's lack of ublk, are reported here.
pub fn check(cfg: &DeviceConfig) -> Result<(), Error> {
    cfg.validate()?;
    cfg.ring_path()?;
    Backing::check(cfg)?;
    ublk_available()?;
    Ok(())
}

/// Opens (or creates) the write ring of `cfg`'s volume over `backing`
/// and recovers its tracking state; `None` when tracking is off. Used by
/// the device before it exists, and by tools that upload a volume's
/// snapshots while it is not served.
pub fn open_tracker(
    cfg: &DeviceConfig,
    backing: &Backing,
) -> Result<Option<(Tracker, RecoveryReport)>, Error> {
    open_tracker_with(cfg, backing, 0)
}

/// [`open_tracker`] with `extra` writer slots beside the queues (a lazy
/// restore's hydrator writes as queue `cfg.queues`).
fn open_tracker_with(
    cfg: &DeviceConfig,
    backing: &Backing,
    extra: u16,
) -> Result<Option<(Tracker, RecoveryReport)>, Error> {
    let Some(ring) = cfg.ring_path()? else {
        return Ok(None);
    };
    let t = cfg.tracking.clone().unwrap_or_default();
    let tcfg = TrackerConfig {
        ring,
        ring_bytes: t.ring_bytes,
        geometry: Geometry {
            block_shift: t.block_bytes.trailing_zeros(),
            ..Geometry::default()
        },
    };
    Ok(Some(Tracker::open(
        &tcfg,
        backing.path(),
        backing.size(),
        cfg.queues.saturating_add(extra),
    )?))
}

/// Creates the device for `cfg` (or recovers it, see the module doc),
/// calls `on_ready` once it accepts I/O, serves until `shutdown` fires or
/// the kernel stops it, then removes it.
pub fn serve<R>(cfg: &DeviceConfig, shutdown: &Shutdown, on_ready: R) -> Result<StopReason, Error>
where
    R: FnOnce(&DeviceInfo) + Send + Sync + 'static,
{
    serve_with(cfg, shutdown, None, None, on_ready)
}

/// A lazily restored volume for [`serve_with`]: its chunks, and the start
/// of its hydrator, called with the tracker before the device exists (the
/// kernel reads the new disk's partition table while adding it, and those
/// reads wait for their chunk). The hydrator writes through the tracker as
/// writer `cfg.queues` and wakes the queues after each chunk.
pub struct LazyVolume {
    pub hydration: Arc<Hydration>,
    pub start: Box<dyn FnOnce(Arc<Tracker>) -> std::io::Result<()> + Send>,
}

impl std::fmt::Debug for LazyVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyVolume")
            .field("hydration", &self.hydration.path())
            .finish_non_exhaustive()
    }
}

/// [`serve`] over a volume being restored lazily (`lazy`): every request
/// waits for the chunks it touches to be there. Needs tracking. With
/// `metrics`, every request is timed and counted there.
pub fn serve_with<R>(
    cfg: &DeviceConfig,
    shutdown: &Shutdown,
    lazy: Option<LazyVolume>,
    metrics: Option<Arc<IoMetrics>>,
    on_ready: R,
) -> Result<StopReason, Error>
where
    R: FnOnce(&DeviceInfo) + Send + Sync + 'static,
{
    check(cfg)?;
    let hydration = lazy.as_ref().map(|l| l.hydration.clone());
    let recovery = match cfg.id {
        Some(id) => probe_existing(id, cfg)?,
        None => None,
    };
    let mut cfg = cfg.clone();
    if let Some(r) = &recovery {
        // The kernel kept the device's shape; the new server must match it.
        cfg.queues = r.queues;
        cfg.depth = r.depth;
        cfg.io_buf_bytes = r.io_buf_bytes;
        cfg.block_size = r.block_size;
    }
    let backing = Backing::open(&cfg)?;
    // Before the device exists: a ring that cannot be used leaves nothing.
    let extra = u16::from(hydration.is_some());
    let tracker =
        open_tracker_with(&cfg, &backing, extra)?.map(|(t, report)| (Arc::new(t), report));
    if let Some(l) = lazy {
        let Some((t, _)) = &tracker else {
            return Err(Error::Config(crate::error::ConfigError::LazyNeedsTracking));
        };
        (l.start)(t.clone()).map_err(|e| Error::Device(DeviceError::Hydrator(e.to_string())))?;
    }
    let canonical = backing
        .path()
        .canonicalize()
        .unwrap_or_else(|_| backing.path().to_owned());
    let id = cfg.id.map_or(-1, |id| i32::try_from(id).unwrap_or(-1));

    let recovering = recovery.is_some();
    if recovering {
        let probe = UblkCtrl::new_simple(id).map_err(ublk_err("get device info"))?;
        probe
            .start_user_recover()
            .map_err(ublk_err("start user recovery"))?;
    }
    let ctrl = UblkCtrlBuilder::default()
        .name(TARGET)
        .id(id)
        .nr_queues(cfg.queues)
        .depth(cfg.depth)
        .io_buf_bytes(cfg.io_buf_bytes)
        .ctrl_flags(u64::from(
            sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE,
        ))
        // Each queue thread pinned to one CPU of its queue's set (rublk's
        // default too): the submitter's completions stay on a warm cache
        // and the scheduler does not bounce the thread between CPUs.
        .dev_flags(
            UblkFlags::UBLK_DEV_F_SINGLE_CPU_AFFINITY
                | if recovering {
                    UblkFlags::UBLK_DEV_F_RECOVER_DEV
                } else {
                    UblkFlags::UBLK_DEV_F_ADD_DEV
                },
        )
        .build()
        .map_err(|e| match (cfg.id, &e) {
            (Some(id), UblkError::OtherError(errno)) if *errno == -libc::EEXIST => {
                Error::Device(DeviceError::IdBusy {
                    id,
                    state: "exists",
                })
            }
            _ => ublk_err("add device")(e),
        })?;

    let size = backing.size();
    let block_size = cfg.block_size;
    let direct_io = backing.is_direct();
    let zero_range = backing.zero_range();
    let tgt_json = TargetJson {
        backing: canonical,
        block_size: block_size.bytes(),
    };
    // The ring stays open as long as the queues hold their Arc.
    let ring_fd = {
        use std::os::fd::AsRawFd;
        tracker.as_ref().map(|(t, _)| t.ring_file().as_raw_fd())
    };
    let tgt_init = |dev: &mut UblkDev| init_target(dev, &backing, ring_fd, block_size, &tgt_json);

    let queue_shutdown = shutdown.clone();
    let queue_tracker = tracker.as_ref().map(|(t, _)| t.clone());
    let q_fn = move |qid: u16, dev: &UblkDev| {
        serve_queue(
            qid,
            dev,
            size,
            zero_range,
            queue_tracker.as_deref(),
            hydration.as_deref(),
            metrics.as_deref(),
        );
        queue_shutdown.trigger(StopReason::QueueExited);
    };

    let ready_shutdown = shutdown.clone();
    let (queues, depth) = (cfg.queues, cfg.depth);
    let device_fn = move |ctrl: &UblkCtrl| {
        let info = ctrl.dev_info();
        on_ready(&DeviceInfo {
            id: info.dev_id,
            path: PathBuf::from(ctrl.get_bdev_path()),
            size,
            queues,
            depth,
            block_size,
            direct_io,
            recovered: recovering,
            tracker,
        });
        let reason = ready_shutdown.wait();
        log::info!("device {} stopping: {reason:?}", info.dev_id);
        // STOP_DEV fails every queue's pending fetch, so the queue threads
        // return and `run_target` can join them.
        if let Err(e) = ctrl.kill_dev() {
            log::warn!("stopping device {}: {e}", info.dev_id);
        }
    };

    let run = ctrl.run_target(tgt_init, q_fn, device_fn);
    // A recovered control does not own the device (libublk deletes only
    // devices it added), but a normal stop must remove it all the same.
    // Deleting an already deleted device fails harmlessly.
    if recovering && let Err(e) = ctrl.del_dev() {
        log::debug!("deleting recovered device: {e}");
    }
    run.map_err(ublk_err("run device"))?;
    Ok(shutdown.reason().unwrap_or(StopReason::QueueExited))
}

fn init_target(
    dev: &mut UblkDev,
    backing: &Backing,
    ring: Option<std::os::fd::RawFd>,
    block_size: BlockSize,
    json: &TargetJson,
) -> Result<(), UblkError> {
    use std::os::fd::AsRawFd;
    let tgt = &mut dev.tgt;
    // Fixed files: 0 the ublk char device (libublk), 1 the backing store,
    // 2 the write ring (queue.rs names them).
    for fd in std::iter::once(backing.file().as_raw_fd()).chain(ring) {
        let slot = usize::try_from(tgt.nr_fds).map_err(|_| UblkError::InvalidVal)?;
        *tgt.fds.get_mut(slot).ok_or(UblkError::InvalidVal)? = fd;
        tgt.nr_fds += 1;
    }
    // One extra slot per queue for the epoch waker's eventfd read.
    tgt.extra_ios = u16::from(ring.is_some());
    tgt.dev_size = backing.size();

    let shift = block_size.shift();
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    // Discard and write-zeroes carry no data: allow up to 1 GiB each, as
    // the loop targets do, in one segment.
    let max_discard_sectors = (1u32 << 30) >> 9;
    tgt.params = sys::ublk_params {
        types: sys::UBLK_PARAM_TYPE_BASIC | sys::UBLK_PARAM_TYPE_DISCARD,
        basic: sys::ublk_param_basic {
            // A volatile write cache (FLUSH is meaningful) and FUA.
            attrs: sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA,
            logical_bs_shift: shift,
            physical_bs_shift: shift.max(12),
            io_opt_shift: 12,
            io_min_shift: shift,
            max_sectors,
            dev_sectors: tgt.dev_size >> 9,
            ..Default::default()
        },
        discard: sys::ublk_param_discard {
            discard_granularity: block_size.bytes(),
            max_discard_sectors,
            max_write_zeroes_sectors: max_discard_sectors,
            max_discard_segments: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let val = serde_json::to_value(json).map_err(UblkError::JsonError)?;
    dev.set_target_json(serde_json::json!({ TARGET: val }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_keeps_the_first_reason_and_wakes_waiters() {
        let s = Shutdown::new();
        assert_eq!(s.reason(), None);
        let waiter = {
            let s = s.clone();
            std::thread::spawn(move || s.wait())
        };
        s.trigger(StopReason::Requested);
        s.trigger(StopReason::QueueExited);
        assert_eq!(waiter.join().unwrap(), StopReason::Requested);
        assert_eq!(s.reason(), Some(StopReason::Requested));
    }

    #[test]
    fn target_json_round_trips() {
        let j = TargetJson {
            backing: "/x/disk.img".into(),
            block_size: 4096,
        };
        let v = serde_json::json!({ TARGET: serde_json::to_value(&j).unwrap() });
        let back: TargetJson = serde_json::from_value(v[TARGET].clone()).unwrap();
        assert_eq!(back.backing, j.backing);
        assert_eq!(back.block_size, 4096);
    }
}
