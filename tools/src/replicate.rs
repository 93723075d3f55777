//! `foresnap replicate`: a replica image kept equal to a volume's newest
//! snapshot ([`foresnap_uploader::replica`]).

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use foresnap_uploader::copies::Copies;
use foresnap_uploader::dest::{DestError, Destination};
use foresnap_uploader::engine::early::now_ms;
use foresnap_uploader::format::{Keys, Manifest};
use foresnap_uploader::replica::{
    Holds, Prefetched, ReplicaError, ReplicaState, apply, open_image,
};
use foresnap_uploader::restore::{SnapshotError, list_snapshots, read_manifest};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cli::ReplicateArgs;
use crate::upload::{open_all, progress};

/// How often a waiting follower looks for a signal.
const SIGNAL_POLL: Duration = Duration::from_millis(100);

/// `foresnap replicate`.
pub fn run(args: &ReplicateArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&args.from.volume).map_err(anyhow::Error::msg)?;
    let members = open_all(&args.from.dest, &keys, args.from.key.load()?.as_ref())?;
    // Copies over every member, also over one, to learn where a striped
    // snapshot's pieces are (each read goes first where it lives) or to
    // name one that is missing.
    let copies = Arc::new(Copies::new(members.clone()));
    let dest: Arc<dyn Destination> = if members.len() > 1 {
        copies.clone()
    } else {
        members[0].clone()
    };
    let ahead = Prefetched::new(dest.as_ref());
    let stop = Arc::new(AtomicBool::new(false));
    if args.follow {
        // The first signal ends the wait after the apply in progress (one
        // cut short is finished by the next run anyway); a second exits.
        for sig in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 1, stop.clone())
                .context("cannot install signal handlers")?;
            signal_hook::flag::register(sig, stop.clone())
                .context("cannot install signal handlers")?;
        }
    }
    // A striped snapshot with a piece at none of the --dest is refused
    // before the image is touched (the catch-up checks each one again).
    if let Ok(ids) = list_snapshots(dest.as_ref(), &keys)
        && let Some(&newest) = ids.last()
        && let Ok(m) = read_manifest(dest.as_ref(), &keys, newest)
    {
        copies.route_stripe(&keys, &m)?;
    }
    let mut replica = Replica::open(&args.to, args.state.as_deref())?;
    loop {
        match replica.catch_up(&ahead, &copies, &keys, args) {
            Ok(()) => {}
            // A store that fails for a while is waited out when following.
            Err(e) if args.follow && transient(&e) => {
                eprintln!(
                    "foresnap: {e:#}; trying again in {:.0} s",
                    args.poll.as_secs_f64()
                );
            }
            Err(e) => return Err(e),
        }
        if !args.follow {
            return Ok(());
        }
        let next = Instant::now() + args.poll;
        let applied = replica.state.map_or(0, |s| s.snapshot);
        if args.prefetch_memory > 0
            && let Err(e) = ahead.fetch_ahead(&keys, applied, args.prefetch_memory)
        {
            log::warn!("fetching ahead: {e}");
        }
        // Relaxed: the flag carries no data; it is only polled.
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep(SIGNAL_POLL.min(next.saturating_duration_since(Instant::now())));
        }
        if stop.load(Ordering::Relaxed) {
            eprintln!("foresnap: stopping on a signal");
            return Ok(());
        }
    }
}

/// Whether `e` may pass by itself (a store not answering), as opposed to
/// what needs a person (damage, another volume, a bad target).
fn transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<DestError>(),
            Some(DestError::Remote { .. } | DestError::Io { .. })
        ) || matches!(
            c.downcast_ref::<SnapshotError>(),
            Some(SnapshotError::Dest(
                DestError::Remote { .. } | DestError::Io { .. }
            ))
        )
    })
}

/// The replica image, locked, and what its state says it holds.
struct Replica<'p> {
    path: &'p Path,
    /// Its state file.
    state_path: PathBuf,
    file: std::fs::File,
    state: Option<ReplicaState>,
    /// A block device: every chunk is written, none left as a hole.
    device: bool,
}

impl<'p> Replica<'p> {
    /// Opens (or creates) `path` and locks it against a second follower.
    /// An existing regular file without a state is not taken: it is not a
    /// replica, and its contents would be lost.
    fn open(path: &'p Path, state_path: Option<&Path>) -> anyhow::Result<Replica<'p>> {
        let device = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        let state_path = match state_path {
            Some(p) => p.to_owned(),
            None if device => bail!(
                "{} is a block device: give --state FILE for its replica state \
                 (on a filesystem that keeps it, not /dev)",
                path.display()
            ),
            None => ReplicaState::path(path),
        };
        let state = ReplicaState::load(&state_path)?;
        let file = match (state, std::fs::metadata(path)) {
            (None, Ok(m)) if !m.file_type().is_block_device() => bail!(
                "{} exists and is not a replica (no {}): replicate makes a new file, \
                 or writes a whole block device",
                path.display(),
                state_path.display()
            ),
            (Some(_), Err(e)) => bail!(
                "{} has a replica state but no image ({e}): remove {} to start again",
                path.display(),
                state_path.display()
            ),
            (None, Err(_)) => {
                std::fs::File::create_new(path)
                    .with_context(|| format!("cannot create {}", path.display()))?;
                open_image(path)?
            }
            _ => open_image(path)?,
        };
        // SAFETY: flock(2) on a descriptor we own; no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "{} is being written by another foresnap replicate ({})",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Replica {
            path,
            state_path,
            file,
            state,
            device,
        })
    }

    /// Brings the image to the newest snapshot, if there is a newer one.
    fn catch_up(
        &mut self,
        ahead: &Prefetched<'_>,
        copies: &Copies,
        keys: &Keys,
        args: &ReplicateArgs,
    ) -> anyhow::Result<()> {
        let ids = list_snapshots(ahead, keys)?;
        let Some(&newest) = ids.last() else {
            if args.follow {
                return Ok(());
            }
            bail!(
                "no snapshot of volume {} at {} yet",
                keys.name(),
                ahead.url()
            );
        };
        let held = self.state.map(|s| s.snapshot);
        if held == Some(newest) {
            return Ok(());
        }
        if let Some(h) = held.filter(|&h| h > newest) {
            bail!(
                "the newest snapshot of volume {} at {} is {newest}, older than the \
                 replica's {h}: was the volume's history replaced? replicate into a new file",
                keys.name(),
                ahead.url()
            );
        }
        let to = read_manifest(ahead, keys, newest)
            .with_context(|| format!("snapshot {newest} of volume {}", keys.name()))?;
        copies.route_stripe(keys, &to)?;
        // The snapshot the image holds, if the destination still has it.
        let parent: Option<Manifest> = match self.state {
            Some(s) if s.snapshot > 0 && s.volume_id == to.volume_id => {
                match read_manifest(ahead, keys, s.snapshot) {
                    Ok(m) => Some(m),
                    Err(SnapshotError::Dest(DestError::NotFound { .. })) => {
                        eprintln!(
                            "foresnap: snapshot {} is gone from {} (pruned): every chunk is written",
                            s.snapshot,
                            ahead.url()
                        );
                        None
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => None,
        };
        let from = match (self.state, &parent) {
            (Some(s), _) if s.volume_id != to.volume_id => {
                return Err(ReplicaError::OtherVolume {
                    image: self.path.display().to_string(),
                    volume: keys.name().to_owned(),
                    have: s.volume_id,
                    want: to.volume_id,
                }
                .into());
            }
            (None, _) => {
                // Marked as being made before the first byte is written.
                ReplicaState {
                    volume_id: to.volume_id,
                    snapshot: 0,
                }
                .store(&self.state_path)?;
                if self.device {
                    Holds::Anything
                } else {
                    Holds::Zeroes
                }
            }
            (Some(_), Some(p)) => Holds::Snapshot(p),
            (Some(_), None) => Holds::Anything,
        };
        let started = Instant::now();
        let hits_before = ahead.hits.load(Ordering::Relaxed);
        let applied = apply(
            ahead,
            keys,
            &self.file,
            self.path,
            from,
            &to,
            args.workers,
            progress(format!("applying snapshot {newest}")),
        )
        .with_context(|| format!("applying snapshot {newest} to {}", self.path.display()))?;
        let state = ReplicaState {
            volume_id: to.volume_id,
            snapshot: newest,
        };
        state.store(&self.state_path)?;
        self.state = Some(state);
        ahead.forget_through(keys, newest);
        let behind_s = (now_ms().saturating_sub(to.closed_ms)) as f64 / 1e3;
        println!(
            "replica {} at snapshot {newest}: {} of {} chunks written ({} MiB{}), \
             {} objects fetched ahead, in {:.1} s; {behind_s:.1} s after its close",
            self.path.display(),
            applied.chunks,
            applied.total,
            applied.bytes >> 20,
            if applied.zeroed > 0 {
                format!(", {} as zeroes", applied.zeroed)
            } else {
                String::new()
            },
            ahead.hits.load(Ordering::Relaxed) - hits_before,
            started.elapsed().as_secs_f64(),
        );
        Ok(())
    }
}
