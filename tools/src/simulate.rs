//! `foresnap simulate`: a block trace replayed on a virtual clock through
//! the uploader's planner (foresnap_uploader::simulate), reported as a
//! table or as JSON.

use std::io::Write;

use anyhow::Context;
use foresnap_driver::tracking::Geometry;
use foresnap_uploader::plan::Policy;
use foresnap_uploader::simulate::{SimConfig, SimPolicy, SimResult, simulate};
use foresnap_uploader::trace::{self, TraceOptions};
use foresnap_uploader::units::{format_bytes, format_rate};

use crate::cli::{SimPolicyArg, SimulateArgs};

pub fn run(args: &SimulateArgs) -> anyhow::Result<()> {
    let policy = match args.policy {
        SimPolicyArg::Oracle => SimPolicy::Oracle,
        SimPolicyArg::Plan(p) => SimPolicy::Plan(args.plan.config(p).map_err(anyhow::Error::msg)?),
        SimPolicyArg::RateOracle => SimPolicy::RateOracle(
            args.plan
                .config(Policy::Predictive)
                .map_err(anyhow::Error::msg)?,
        ),
    };
    if args.track_chunk < args.track_block {
        anyhow::bail!(
            "invalid --track-chunk {}: smaller than the tracking block ({})",
            args.track_chunk,
            args.track_block
        );
    }
    let opts = TraceOptions { disk: args.disk };
    let t = trace::read(&args.trace, args.format, &opts)
        .with_context(|| format!("trace {}", args.trace.display()))?;
    let mut cfg = SimConfig::new(args.link as f64, args.every.as_secs_f64(), policy);
    cfg.geometry = Geometry {
        block_shift: args.track_block.trailing_zeros(),
        chunk_shift: args.track_chunk.trailing_zeros(),
    };
    let r = simulate(&t.writes, t.extent, &cfg)?;
    if let Some(path) = &args.timeline {
        std::fs::write(path, r.timeline_csv())
            .with_context(|| format!("cannot write the timeline to {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({
            "snapshots": r.snapshots,
            "summary": r.summary,
            "params": {
                "trace": args.trace,
                "writes": t.writes.len(),
                "volume_bytes": t.extent,
                "link_bytes_per_s": args.link,
                "interval_s": args.every.as_secs_f64(),
                "policy": policy_name(args.policy),
                "k": args.plan.k,
                "l_s": args.plan.l,
                "pt": args.plan.pt,
                "track_block": args.track_block,
                "track_chunk": args.track_chunk,
            },
        });
        writeln!(out, "{v}")?;
    } else {
        table(&mut out, args, &r)?;
    }
    Ok(())
}

fn policy_name(p: SimPolicyArg) -> String {
    match p {
        SimPolicyArg::Oracle => "oracle".into(),
        SimPolicyArg::RateOracle => "rate-oracle".into(),
        SimPolicyArg::Plan(p) => p.to_string(),
    }
}

fn table(out: &mut impl Write, args: &SimulateArgs, r: &SimResult) -> std::io::Result<()> {
    writeln!(
        out,
        "policy {}, link {}, a snapshot every {:.0} s",
        policy_name(args.policy),
        format_rate(args.link as f64),
        args.every.as_secs_f64()
    )?;
    writeln!(
        out,
        "{:>8} {:>12} {:>12} {:>9} {:>12} {:>12}",
        "snapshot", "scheduled s", "complete s", "lag s", "uploaded", "minimal"
    )?;
    for s in &r.snapshots {
        writeln!(
            out,
            "{:>8} {:>12.1} {:>12.1} {:>9.2} {:>12} {:>12}",
            s.id,
            s.scheduled_s,
            s.completed_s,
            s.lag_s,
            format_bytes(s.bytes_uploaded as f64),
            format_bytes(s.minimal_bytes as f64)
        )?;
    }
    let m = &r.summary;
    writeln!(
        out,
        "lag median {:.2} s, p95 {:.2} s, max {:.2} s; uploaded {} for {} minimal \
         (amplification {:.3}, {} voided by later writes); link busy {:.0}%",
        m.median_lag_s,
        m.p95_lag_s,
        m.max_lag_s,
        format_bytes(m.bytes_uploaded as f64),
        format_bytes(m.minimal_bytes as f64),
        m.amplification,
        format_bytes(m.bytes_voided as f64),
        m.link_busy * 100.0
    )
}
