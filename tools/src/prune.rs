//! `foresnap prune`: a retention policy applied to a volume's snapshots at
//! each destination on its own ([`foresnap_uploader::retention`]).

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, bail};
use foresnap_uploader::dest::Destination;
use foresnap_uploader::format::Keys;
use foresnap_uploader::retention::{PruneReport, Retention, prune, utc};

use crate::cli::PruneArgs;
use crate::upload::open_all;

/// `foresnap prune`: progress on stderr; per destination, a line per
/// snapshot and a summary on stdout.
pub fn run(args: &PruneArgs) -> anyhow::Result<()> {
    let keys = Keys::new(&args.from.volume).map_err(anyhow::Error::msg)?;
    // The argument group requires a rule.
    let policy = args.keep.retention().context("give a --keep-* rule")?;
    let dests = open_all(&args.from.dest, &keys, args.from.key.load()?.as_ref())?;
    apply(&dests, &keys, &policy, args.dry_run)
}

/// Prunes each of `dests` on its own (`prune`, and `backup --keep-*`).
pub fn apply(
    dests: &[Arc<dyn Destination>],
    keys: &Keys,
    policy: &Retention,
    dry_run: bool,
) -> anyhow::Result<()> {
    let mut failed = 0;
    for d in dests {
        let url = d.url();
        match prune(d.as_ref(), keys, policy, dry_run, |line| {
            eprintln!("foresnap: {url}: {line}");
        }) {
            // stdout gone (a closed pipe) is no reason to fail a prune
            // that is done.
            Ok(r) => drop(print_report(&r, keys, d.as_ref(), dry_run)),
            Err(e) if dests.len() == 1 => return Err(e.into()),
            Err(e) => {
                eprintln!("foresnap: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!(
            "prune failed at {failed} of {} destinations (see above)",
            dests.len()
        );
    }
    Ok(())
}

fn print_report(
    r: &PruneReport,
    keys: &Keys,
    dest: &dyn Destination,
    dry_run: bool,
) -> std::io::Result<()> {
    let (drop_word, delete_word) = if dry_run {
        ("to drop", "to delete")
    } else {
        ("dropped", "deleted")
    };
    let mut out = std::io::stdout().lock();
    for d in &r.snapshots {
        write!(
            out,
            "snapshot {}  closed {}  ",
            d.snapshot,
            utc(d.closed_ms)
        )?;
        if d.kept() {
            let rules: Vec<String> = d.kept_by.iter().map(ToString::to_string).collect();
            writeln!(out, "kept ({})", rules.join(", "))?;
        } else {
            writeln!(out, "{drop_word}")?;
        }
    }
    let plural = |n: u64, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    write!(
        out,
        "volume {} at {}: {} kept, {} {drop_word}, {} {delete_word}",
        keys.name(),
        dest.url(),
        plural(r.kept() as u64, "snapshot"),
        r.dropped(),
        plural(r.objects_deleted, "object")
    )?;
    if !r.resumed.is_empty() {
        let what = if dry_run {
            "to finish first"
        } else {
            "finished"
        };
        write!(out, "; {} interrupted prune {what}", r.resumed.len())?;
    }
    if dry_run {
        write!(out, " (dry run: nothing was deleted)")?;
    }
    writeln!(out)?;
    out.flush()
}
