//! Destinations on the command line: `--dest URL`, the uploader thread of
//! `serve`, `snapshots` and `restore`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use foresnap_driver::tracking::Tracker;
use foresnap_uploader::dest::{Destination, DirDestination};
use foresnap_uploader::engine::Uploader;
use foresnap_uploader::format::{Codec, Keys};
use foresnap_uploader::restore::{list_snapshots, read_manifest, restore_image};

use crate::cli::{DestArgs, RestoreArgs};

/// Opens a destination from its URL.
pub fn open_dest(url: &str) -> anyhow::Result<Arc<dyn Destination>> {
    if let Some(path) = url.strip_prefix("file://") {
        if !path.starts_with('/') {
            bail!("invalid destination {url:?}: file:// wants an absolute path, as file:///backup");
        }
        return Ok(Arc::new(DirDestination::open(Path::new(path))?));
    }
    if url.starts_with("s3://") {
        bail!("S3 destinations are not built yet ({url}): use file:///PATH");
    }
    bail!("invalid destination {url:?}: use file:///PATH")
}

/// The volume name: given, or the backing file's name.
pub fn volume_keys(name: Option<&str>, backing: &Path) -> anyhow::Result<Keys> {
    let name = match name {
        Some(n) => n.to_owned(),
        None => backing
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("the backing has no file name: give --volume NAME")?,
    };
    Keys::new(&name).map_err(anyhow::Error::msg)
}

/// Starts the uploader thread of `serve`. It runs until the process ends
/// (`stop` lets it finish its current object first).
pub fn start_uploader(
    tracker: Arc<Tracker>,
    dest: Arc<dyn Destination>,
    keys: Keys,
    chunk_bytes: u32,
    max_deltas: u16,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let url = dest.url();
    let up = Uploader::new(tracker, dest, keys, chunk_bytes, Codec::Zstd(1))
        .with_context(|| format!("destination {url}"))?
        .with_max_deltas(usize::from(max_deltas));
    std::thread::Builder::new()
        .name("uploader".into())
        .spawn(move || up.run(&stop))
        .context("cannot start the uploader thread")?;
    Ok(())
}

/// `foresnap snapshots`.
pub fn snapshots(args: &DestArgs) -> anyhow::Result<()> {
    let dest = open_dest(&args.dest)?;
    let keys = Keys::new(&args.volume).map_err(anyhow::Error::msg)?;
    let ids = list_snapshots(dest.as_ref(), &keys)?;
    if ids.is_empty() {
        eprintln!(
            "foresnap: no snapshot of volume {} at {}",
            args.volume,
            dest.url()
        );
    }
    let mut out = std::io::stdout().lock();
    for id in ids {
        let m = read_manifest(dest.as_ref(), &keys, id)?;
        let objects: usize = m.chunks.iter().map(Vec::len).sum();
        writeln!(
            out,
            "snapshot {id}  parent {}  closed at {} ms  {} bytes  {} chunks stored  {objects} object references",
            m.parent,
            m.closed_ms,
            m.volume_bytes,
            m.chunks.iter().filter(|c| !c.is_empty()).count()
        )?;
    }
    Ok(())
}

/// `foresnap restore`.
pub fn restore(args: &RestoreArgs) -> anyhow::Result<()> {
    let dest = open_dest(&args.from.dest)?;
    let keys = Keys::new(&args.from.volume).map_err(anyhow::Error::msg)?;
    let id = match args.snapshot {
        Some(id) => id,
        None => *list_snapshots(dest.as_ref(), &keys)?
            .last()
            .with_context(|| {
                format!(
                    "no snapshot of volume {} at {}",
                    args.from.volume,
                    dest.url()
                )
            })?,
    };
    let m = read_manifest(dest.as_ref(), &keys, id)
        .with_context(|| format!("snapshot {id} of volume {}", args.from.volume))?;
    let started = std::time::Instant::now();
    let mut last_pct = u64::MAX;
    restore_image(dest.as_ref(), &keys, &m, &args.out, |done, total| {
        let pct = done * 100 / total.max(1);
        if pct / 10 != last_pct / 10 || done == total {
            last_pct = pct;
            eprint!("\rforesnap: restoring snapshot {id}: {pct:3}% ({done}/{total} chunks)");
        }
    })
    .with_context(|| format!("restoring snapshot {id} into {}", args.out.display()))?;
    eprintln!();
    println!(
        "snapshot {id} restored to {} ({} bytes) in {:.1} s",
        args.out.display(),
        m.volume_bytes,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
