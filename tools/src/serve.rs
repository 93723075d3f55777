//! `foresnap serve`: one device in the foreground.

use std::io::Write;

use anyhow::Context;
use foresnap_driver::{Shutdown, StopReason};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::cli::ServeArgs;

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let cfg = args.device_config();
    // Check everything first, so that bad input fails before the signal
    // thread or a device exists.
    foresnap_driver::device::check(&cfg)?;

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

    let result = foresnap_driver::serve(&cfg, &shutdown, |info| {
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
    match result? {
        StopReason::Requested => Ok(()),
        StopReason::QueueExited => {
            anyhow::bail!("the device stopped without being asked to (removed by another tool?)")
        }
    }
}
