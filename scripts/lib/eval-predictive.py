#!/usr/bin/env python3
"""The evaluation of predictive upload, host side (started by scripts/eval-predictive).

Python 3.11 standard library only; the plot is hand-made SVG.

Subcommands:
  merge OUT IN...          merge fio iologs (v3) of several jobs on one volume into one
                           trace, ordered by time, naming one file (or copy one)
  trim IN OUT              drop the records a new ring makes for data the backing already
                           holds (a burst at time 0, then the guest's pause) from a trace
                           recorded in the VM, and start the times at the first kept write
  (both take --description TEXT and --info JSON-FILE and write OUT's sidecar OUT.json,
  which `run` puts into results.json)
  check-fio IOLOG SECONDS  check that fio wrote microseconds: the last write of a run of
                           SECONDS must be near SECONDS * 1e6
  run ...                  simulate every trace under every policy at two link loads,
                           predictive and rate-oracle at each PT of a sweep, and
                           at-close and oracle at loads 20-80% (the lag bound); write
                           results.json, results.md and timeline.svg, print the tables
  report --out DIR         rewrite results.md and timeline.svg from DIR/results.json
"""

import argparse
import concurrent.futures as futures
import csv
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

BLOCK = 4096  # the tracking block: minimal bytes are distinct 4 KiB blocks
POLICIES = ["predictive", "at-close", "eager", "oracle", "rate-oracle"]
# The planner's policies, which take --k, --l and --pt.
PLANNED = ("predictive", "rate-oracle")
# The trade-off sweep: predictive and rate-oracle at each PT, every trace and load.
SWEEP_PT = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
# The bound on the lag target: oracle and at-close at these loads too (the issue's
# range of 20-80%), on every trace. The oracle uploads each block's final content
# from its last write on, on the same link: no policy completes a snapshot sooner.
BOUND_LOADS = [0.2, 0.3, 0.5, 0.7, 0.8]
BOUND_POLICIES = ("at-close", "oracle")
INFINITE_LINK = 1 << 40  # 1 TiB/s: the calibration run's "infinite" link
# Interval candidates in seconds: the largest that gives TARGET_INTERVALS.
NICE_INTERVALS = [1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 70, 90, 120, 180, 300, 600, 900]
TARGET_INTERVALS = 5

# The targets (see results.md's notes).
TARGET_VS_AT_CLOSE = 0.10  # predictive median lag / at-close median lag
TARGET_AMPLIFICATION = 1.10  # predictive bytes uploaded / minimal bytes
TARGET_VS_ORACLE = 1.5  # predictive median lag / oracle median lag ...
ORACLE_FLOOR_S = 1.0  # ... or a predictive median lag under this, whatever the oracle's
ORACLE_ZERO_S = 0.1  # an oracle median lag below this is "~0": no ratio is shown


def log(msg):
    print(f"eval-predictive: {msg}", file=sys.stderr, flush=True)


# ---- traces -------------------------------------------------------------------


def iolog_ios(path):
    """Yields (time_us, action, offset, length) of a fio v3 iolog's I/O lines."""
    with open(path) as f:
        first = f.readline()
        if not first.startswith("fio version 3 iolog"):
            raise SystemExit(f"{path}: not a fio version 3 iolog (first line {first.strip()!r})")
        for line in f:
            p = line.split()
            if len(p) == 5 and p[2] in ("write", "trim", "read"):
                yield int(p[0]), p[2], int(p[3]), int(p[4])


def write_iolog(path, name, ios):
    """Writes ios [(time_us, action, offset, length)] as a fio v3 iolog for file NAME."""
    tmp = path + ".tmp"
    end = 0
    with open(tmp, "w") as f:
        f.write(f"fio version 3 iolog\n0 {name} add\n0 {name} open\n")
        for t, act, off, ln in ios:
            f.write(f"{t} {name} {act} {off} {ln}\n")
            end = t
        f.write(f"{end} {name} close\n")
    os.replace(tmp, path)


def write_sidecar(iolog, args, **more):
    """OUT.json beside a trace: its description, what made it (--info), more."""
    info = {}
    if args.info:
        with open(args.info) as f:
            info = json.load(f)
    info.update(more)
    info["description"] = args.description or os.path.basename(iolog)
    with open(os.path.splitext(iolog)[0] + ".json", "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")


def cmd_merge(args):
    # Each job's times count from its own start; fio starts the jobs of one run
    # together (within a few ms), which is all the precision this needs.
    ios = []
    for p in args.inputs:
        ios.extend(iolog_ios(p))
    ios.sort(key=lambda x: x[0])
    write_iolog(args.output, args.name, ios)
    write_sidecar(args.output, args)
    log(f"merged {len(args.inputs)} iologs into {args.output}: {len(ios)} I/Os")


def cmd_trim(args):
    ios = list(iolog_ios(args.input))
    if not ios:
        raise SystemExit(f"{args.input}: no I/O")
    # The existing-data records are at time 0; the guest then pauses 3 s before
    # mounting. Cut at the first gap of at least 2 s that begins in the first 10 s.
    cut = 0
    for i in range(1, len(ios)):
        if ios[i - 1][0] > 10_000_000:
            break
        if ios[i][0] - ios[i - 1][0] >= 2_000_000:
            cut = i
            break
    if cut == 0:
        log(f"WARNING: {args.input}: no pause after the existing-data records; nothing trimmed")
    dropped = ios[:cut]
    kept = ios[cut:]
    t0 = kept[0][0]
    write_iolog(args.output, args.name, [(t - t0, a, o, n) for t, a, o, n in kept])
    write_sidecar(args.output, args, trimmed={"records": len(dropped), "bytes": sum(n for _, _, _, n in dropped),
                                              "why": "the new ring's records of the data mkfs left (time 0)"})
    log(f"{args.output}: dropped {len(dropped)} existing-data records "
        f"({sum(n for _, _, _, n in dropped) / 2**20:.1f} MiB), kept {len(kept)} I/Os")


def cmd_check_fio(args):
    last = 0
    for t, _, _, _ in iolog_ios(args.iolog):
        last = max(last, t)
    want = args.seconds * 1e6
    if not 0.9 * want <= last <= 1.1 * want:
        raise SystemExit(f"{args.iolog}: last timestamp {last} for a {args.seconds} s run: "
                         "fio's iolog times are not the microseconds the simulator reads")


def trace_stats(path):
    """Writes, bytes, duration, distinct 4 KiB blocks of a trace."""
    n = trims = 0
    written = 0
    blocks = set()
    first = last = None
    for t, act, off, ln in iolog_ios(path):
        if act == "read":
            continue
        first = t if first is None else first
        last = t
        if act == "trim":
            trims += 1
            continue
        n += 1
        written += ln
        if ln:
            blocks.update(range(off // BLOCK, (off + ln - 1) // BLOCK + 1))
    dur = (last - first) / 1e6 if first is not None else 0.0
    return {
        "writes": n,
        "trims": trims,
        "written_bytes": written,
        "distinct_block_bytes": len(blocks) * BLOCK,
        "duration_s": round(dur, 3),
        "write_rate_bytes_per_s": round(written / dur) if dur else 0,
        "file_bytes": os.path.getsize(path),
    }


def pick_interval(duration_s):
    """The largest nice interval giving TARGET_INTERVALS full intervals."""
    fit = [i for i in NICE_INTERVALS if i * TARGET_INTERVALS <= duration_s]
    return fit[-1] if fit else NICE_INTERVALS[0]


# ---- simulation -----------------------------------------------------------------


def simulate(foresnap, trace, link, interval, policy, extra=(), timeline=None):
    """Runs one simulation; returns (parsed JSON or None, error text or None, seconds)."""
    cmd = [foresnap, "simulate", "--trace", trace, "--format", "fio", "--link", str(link),
           "--every", f"{interval}s", "--policy", policy, "--json", *extra]
    if timeline:
        cmd += ["--timeline", timeline]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True)
    secs = round(time.monotonic() - t0, 2)
    if p.returncode != 0:
        return None, f"exit {p.returncode}: {p.stderr.strip()[-600:]}", secs, cmd
    try:
        return json.loads(p.stdout), None, secs, cmd
    except ValueError as e:
        return None, f"bad JSON ({e}): {p.stdout[:300]!r}", secs, cmd


def human_bytes(n):
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def human_rate(n):
    return f"{n / 2**20:.2f} MiB/s" if n >= 2**20 / 100 else f"{n / 1024:.1f} KiB/s"


def cmd_run(args):
    out = args.out
    os.makedirs(os.path.join(out, "timelines"), exist_ok=True)
    extra = []
    for flag, v in (("--k", args.k), ("--l", args.l), ("--pt", args.pt)):
        if v is not None:
            extra += [flag, v]
    loads = [float(x) for x in args.loads.split(",")]
    traces = {}
    for spec in args.trace:
        name, _, path = spec.partition("=")
        # What made the trace: a sidecar NAME.json beside it (a description,
        # the fio job or what ran in the VM), if there is one.
        side = os.path.splitext(path)[0] + ".json"
        info = {}
        if os.path.exists(side):
            with open(side) as f:
                info = json.load(f)
        traces[name] = {"path": path, "description": info.pop("description", name), "info": info}
    t_start = time.monotonic()

    # Trace statistics and intervals.
    for name, tr in traces.items():
        tr["stats"] = trace_stats(tr["path"])
        tr["interval_s"] = pick_interval(tr["stats"]["duration_s"])
        s = tr["stats"]
        log(f"{name}: {s['writes']} writes, {human_bytes(s['written_bytes'])} written, "
            f"{human_bytes(s['distinct_block_bytes'])} distinct, {s['duration_s']:.0f} s; interval {tr['interval_s']} s")

    jobs = max(1, args.jobs)
    pool = futures.ThreadPoolExecutor(max_workers=jobs)
    lock = threading.Lock()

    # 1. Calibration: at-close on an effectively infinite link gives each
    #    snapshot's minimal bytes (its distinct blocks).
    def calibrate(name):
        tr = traces[name]
        res, err, secs, cmd = simulate(args.foresnap, tr["path"], INFINITE_LINK, tr["interval_s"], "at-close")
        cal = {"command": " ".join(cmd), "seconds": secs}
        if err:
            cal["error"] = err
        else:
            mins = [s["minimal_bytes"] for s in res["snapshots"]]
            cal["minimal_bytes"] = mins
            cal["median_minimal_bytes"] = statistics.median(mins) if mins else 0
            if not mins or cal["median_minimal_bytes"] <= 0:
                cal["error"] = f"no snapshot with changed blocks ({len(mins)} snapshots)"
        with lock:
            tr["calibration"] = cal
            if "error" in cal:
                log(f"{name}: calibration FAILED: {cal['error']}")
            else:
                log(f"{name}: {len(mins)} snapshots, median minimal {human_bytes(cal['median_minimal_bytes'])} "
                    f"per {tr['interval_s']} s interval ({secs:.1f} s)")

    list(pool.map(calibrate, traces))

    # 2. Every (trace, load, policy). The representative trace's predictive and
    #    at-close runs at the highest load also write their timelines.
    rep = args.timeline_trace if args.timeline_trace in traces else next(iter(traces))
    rep_load = max(loads)
    todo = []
    for name, tr in traces.items():
        cal = tr["calibration"]
        if "error" in cal:
            continue
        for load in loads:
            rate = max(1, round(cal["median_minimal_bytes"] / (load * tr["interval_s"])))
            for pol in POLICIES:
                tl = None
                if name == rep and load == rep_load and pol in ("predictive", "at-close"):
                    tl = os.path.join(out, "timelines", f"{name}-{load:g}-{pol}.csv")
                todo.append({"trace": name, "load": load, "interval_s": tr["interval_s"],
                             "link_bytes_per_s": rate, "policy": pol,
                             "extra": extra if pol in PLANNED else [], "timeline": tl})
            # The sweep: PT from the list, K and L as given.
            kl = [a for i in range(0, len(extra), 2) if extra[i] != "--pt" for a in extra[i:i + 2]]
            for pol in PLANNED:
                for pt in SWEEP_PT:
                    todo.append({"trace": name, "load": load, "interval_s": tr["interval_s"],
                                 "link_bytes_per_s": rate, "policy": pol, "sweep_pt": pt,
                                 "extra": kl + ["--pt", str(pt)], "timeline": None})
        # The bound at the loads the matrix does not run.
        for load in BOUND_LOADS:
            if load in loads:
                continue
            rate = max(1, round(cal["median_minimal_bytes"] / (load * tr["interval_s"])))
            for pol in BOUND_POLICIES:
                todo.append({"trace": name, "load": load, "interval_s": tr["interval_s"],
                             "link_bytes_per_s": rate, "policy": pol, "bound": True,
                             "extra": [], "timeline": None})
    done = [0]

    def one(run):
        res, err, secs, cmd = simulate(args.foresnap, traces[run["trace"]]["path"], run["link_bytes_per_s"],
                                       run["interval_s"], run["policy"], run["extra"], run["timeline"])
        run.update({"command": " ".join(cmd), "seconds": secs})
        if err:
            run["error"] = err
        else:
            run["result"] = res
        with lock:
            done[0] += 1
            what = f"[{done[0]}/{len(todo)}] {run['trace']} load {run['load']:g} {run['policy']}"
            if "sweep_pt" in run:
                what += f" PT {run['sweep_pt']:g}"
            if run.get("bound"):
                what += " (bound)"
            if err:
                log(f"{what}: FAILED: {err}")
            else:
                s = res["summary"]
                log(f"{what}: median lag {s['median_lag_s']:.2f} s, p95 {s['p95_lag_s']:.2f} s, "
                    f"amplification {s['amplification']:.3f} ({secs:.1f} s)")
        return run

    runs = list(pool.map(one, todo))
    pool.shutdown()

    for run in runs:
        run.pop("extra")
        if run["timeline"]:
            run["timeline"] = os.path.relpath(run["timeline"], out)
    doc = {
        "setup": {
            "mode": args.mode,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "foresnap": args.foresnap,
            "foresnap_version": args.foresnap_version,
            "build": args.build,
            "predictive_args": extra,
            "loads": loads,
            "policies": POLICIES,
            "sweep_pt": SWEEP_PT,
            "bound_loads": BOUND_LOADS,
            "calibration": "at-close on a 1 TiB/s link; link rate = median minimal bytes per interval / (load * interval)",
            "interval_rule": f"largest of {NICE_INTERVALS} s giving {TARGET_INTERVALS} full intervals of the trace",
            "targets": {
                "predictive/at-close median lag": f"<= {TARGET_VS_AT_CLOSE}",
                "predictive amplification": f"<= {TARGET_AMPLIFICATION}",
                "predictive/oracle median lag": f"<= {TARGET_VS_ORACLE}, or predictive median lag < {ORACLE_FLOOR_S} s",
            },
            "jobs": jobs,
            "simulate_seconds": round(time.monotonic() - t_start, 1),
            "timeline": {"trace": rep, "load": rep_load},
        },
        "traces": traces,
        "runs": runs,
    }
    doc["targets"] = targets(doc)
    path = os.path.join(out, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    report(out, doc)
    failed = [r for r in runs if "error" in r] + [t for t in traces.values() if "error" in t["calibration"]]
    return 1 if failed else 0


# ---- targets and report -----------------------------------------------------------


def in_matrix(run):
    """Whether `run` is one of the matrix's (trace, load, policy) runs, not the PT sweep's
    or the bound's."""
    return "sweep_pt" not in run and not run.get("bound")


def targets(doc):
    """One entry per (trace, load): the three target ratios and pass/fail."""
    by = {}
    for r in doc["runs"]:
        if not in_matrix(r):
            continue
        by.setdefault((r["trace"], r["load"]), {})[r["policy"]] = r.get("result", {}).get("summary")
    out = []
    for (trace, load), pol in by.items():
        t = {"trace": trace, "load": load}
        t.update(verdicts(pol.get("predictive"), pol.get("at-close"), pol.get("oracle")))
        out.append(t)
    return out


def verdicts(p, a, o):
    """The three target ratios and pass/fail of summary `p` against at-close's `a` and the
    oracle's `o` (each may be None: its entries are left out)."""
    t = {}
    if p and a:
        pm, am = p["median_lag_s"], a["median_lag_s"]
        # (at-close without lag: nothing to win; met only without lag too)
        t["vs_at_close"] = pm / am if am > 0 else None
        t["vs_at_close_pass"] = pm / am <= TARGET_VS_AT_CLOSE if am > 0 else pm <= 0
    if p:
        t["amplification"] = p["amplification"]
        t["amplification_pass"] = p["amplification"] <= TARGET_AMPLIFICATION
    if p and o:
        pm, om = p["median_lag_s"], o["median_lag_s"]
        t["vs_oracle"] = pm / om if om >= ORACLE_ZERO_S else None
        t["vs_oracle_pass"] = (t["vs_oracle"] is not None and t["vs_oracle"] <= TARGET_VS_ORACLE) or pm < ORACLE_FLOOR_S
    return t


def fmt_s(x):
    if x is None:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def verdict(ok):
    return "-" if ok is None else ("pass" if ok else "**FAIL**")


def table_md(doc):
    runs = {(r["trace"], r["load"], r["policy"]): r for r in doc["runs"] if in_matrix(r)}
    tgt = {(t["trace"], t["load"]): t for t in doc["targets"]}
    head = (["trace", "load", "interval", "link"]
            + [f"{p} lag med / p95 (s)" for p in POLICIES]
            + [f"ampl. {p}" for p in POLICIES]
            + ["pred / at-close lag (<= 0.1)", "pred ampl. (<= 1.10)", "pred / oracle lag (<= 1.5 *)"])
    rows = []
    for name, tr in doc["traces"].items():
        if "error" in tr.get("calibration", {}):
            rows.append([name, "-", f"{tr['interval_s']} s", "calibration failed"] + [""] * (len(head) - 4))
            continue
        for load in doc["setup"]["loads"]:
            r0 = runs.get((name, load, "predictive")) or runs.get((name, load, "at-close"))
            if r0 is None:
                continue
            row = [name, f"{load:.0%}", f"{tr['interval_s']} s", human_rate(r0["link_bytes_per_s"])]
            lag, amp = [], []
            for p in POLICIES:
                s = runs.get((name, load, p), {}).get("result", {}).get("summary")
                if "error" in runs.get((name, load, p), {}):
                    lag.append("error")
                    amp.append("error")
                elif s:
                    lag.append(f"{fmt_s(s['median_lag_s'])} / {fmt_s(s['p95_lag_s'])}")
                    amp.append(f"{s['amplification']:.3f}")
                else:
                    lag.append("-")
                    amp.append("-")
            t = tgt.get((name, load), {})
            if "vs_at_close_pass" in t:
                ratio = "n/a" if t["vs_at_close"] is None else f"{t['vs_at_close']:.3f}"
                r1 = f"{ratio} {verdict(t['vs_at_close_pass'])}"
            else:
                r1 = "-"
            r2 = f"{t['amplification']:.3f} {verdict(t['amplification_pass'])}" if "amplification" in t else "-"
            if "vs_oracle_pass" in t:
                ratio = "n/a" if t["vs_oracle"] is None else f"{t['vs_oracle']:.2f}"
                r3 = f"{ratio} {verdict(t['vs_oracle_pass'])}"
            else:
                r3 = "-"
            rows.append(row + lag + amp + [r1, r2, r3])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def sweep_md(doc):
    """The trade-off table: per trace, load and planned policy, each PT's lag against at-close's,
    amplification and lag against the oracle's; a check where all three targets are met."""
    main = {(r["trace"], r["load"], r["policy"]): r.get("result", {}).get("summary")
            for r in doc["runs"] if in_matrix(r)}
    sweep = {(r["trace"], r["load"], r["policy"], r["sweep_pt"]): r for r in doc["runs"] if "sweep_pt" in r}
    pts = doc["setup"].get("sweep_pt", [])
    if not sweep:
        return None, 0, 0
    head = ["trace", "load", "policy"] + [f"PT {pt:g}" for pt in pts]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    met = {p: set() for p in PLANNED}
    rows = 0
    for name in doc["traces"]:
        for load in doc["setup"]["loads"]:
            a, o = main.get((name, load, "at-close")), main.get((name, load, "oracle"))
            if not (a and o):
                continue
            rows += 1
            for pol in PLANNED:
                cells = []
                for pt in pts:
                    r = sweep.get((name, load, pol, pt), {})
                    s = r.get("result", {}).get("summary")
                    if not s:
                        cells.append("error" if "error" in r else "-")
                        continue
                    v = verdicts(s, a, o)
                    vs_ac, vs_o = v["vs_at_close"], v["vs_oracle"]
                    ok = v["vs_at_close_pass"] and v["amplification_pass"] and v["vs_oracle_pass"]
                    if ok:
                        met[pol].add((name, load))
                    cells.append(f"{'n/a' if vs_ac is None else f'{vs_ac:.3f}'} / {s['amplification']:.3f} / "
                                 f"{'n/a' if vs_o is None else f'{vs_o:.2f}'}{' **all**' if ok else ''}")
                lines.append(f"| {name} | {load:.0%} | {pol} | " + " | ".join(cells) + " |")
    return "\n".join(lines), rows, {p: len(v) for p, v in met.items()}


def bound_md(doc):
    """The bound on the lag target: per trace and load, the oracle's median lag over
    at-close's, the least ratio any policy reaches. Returns the table (None without bound
    runs) and in how many of the matrix's rows it puts the lag target out of reach."""
    if not any(r.get("bound") for r in doc["runs"]):
        return None, 0
    summ = {(r["trace"], r["load"], r["policy"]): r.get("result", {}).get("summary")
            for r in doc["runs"] if "sweep_pt" not in r and r["policy"] in BOUND_POLICIES}
    loads = sorted(set(doc["setup"].get("bound_loads", [])) | set(doc["setup"]["loads"]))
    head = ["trace"] + [f"load {load:.0%}" for load in loads]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out_of_reach = 0
    for name in doc["traces"]:
        cells = []
        for load in loads:
            a, o = summ.get((name, load, "at-close")), summ.get((name, load, "oracle"))
            if not (a and o):
                cells.append("-")
                continue
            # The oracle judged by the lag target, as predictive is.
            v = verdicts(o, a, None)
            unreachable = not v["vs_at_close_pass"]
            if unreachable and load in doc["setup"]["loads"]:
                out_of_reach += 1
            ratio = "n/a" if v["vs_at_close"] is None else f"{v['vs_at_close']:.3f}"
            cells.append(f"{ratio}{' **out of reach**' if unreachable else ''}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines), out_of_reach


def report(out, doc):
    setup = doc["setup"]
    tgt = doc["targets"]
    n_rows = len(tgt)
    n_all = sum(1 for t in tgt if t.get("vs_at_close_pass") and t.get("amplification_pass") and t.get("vs_oracle_pass"))
    pargs = " ".join(setup["predictive_args"]) or "the simulator's defaults"
    md = [f"# Predictive upload: simulated snapshot lag and amplification ({setup['mode']} mode)", ""]
    md.append(f"{setup['date']}; {setup['foresnap_version']} ({setup['build']} build); predictive with {pargs}; "
              f"simulations took {setup['simulate_seconds']:.0f} s on {setup['jobs']} parallel job(s).")
    md.append("")
    md.append("## Traces")
    md.append("")
    md.append("| trace | source | duration | writes | written | distinct 4 KiB blocks | interval | snapshots | median minimal bytes per interval |")
    md.append("|---|---|---|---|---|---|---|---|---|")
    for name, tr in doc["traces"].items():
        s, cal = tr["stats"], tr.get("calibration", {})
        med = human_bytes(cal["median_minimal_bytes"]) if "median_minimal_bytes" in cal else "-"
        md.append(f"| {name} | {tr['description']} | {s['duration_s']:.0f} s | {s['writes']} | "
                  f"{human_bytes(s['written_bytes'])} | {human_bytes(s['distinct_block_bytes'])} | "
                  f"{tr['interval_s']} s | {len(cal.get('minimal_bytes', []))} | {med} |")
    md.append("")
    md.append("## Results")
    md.append("")
    md.append(table_md(doc))
    md.append("")
    md.append(f"All three targets met in {n_all} of {n_rows} rows.")
    md.append("")
    md.append("Notes:")
    md.append("")
    md.append("- **load**: the link rate is set so that uploading one interval's median *minimal bytes* (the distinct 4 KiB "
              "blocks written in an interval, from an at-close run on a 1 TiB/s link) takes that fraction of the interval: "
              "rate = median minimal bytes / (load x interval).")
    md.append("- **lag**: completion of a snapshot's upload minus its scheduled close, median and 95th percentile over the "
              "snapshots of the trace (the last, partial interval is not reported; with ~5 snapshots the p95 is about "
              "the worst). **ampl.**: bytes uploaded / minimal bytes.")
    md.append(f"- Targets: predictive median lag <= {TARGET_VS_AT_CLOSE} x at-close's; predictive amplification <= "
              f"{TARGET_AMPLIFICATION}; predictive median lag <= {TARGET_VS_ORACLE} x the oracle's. "
              f"\\* Where the oracle's median lag is ~0 (under {ORACLE_ZERO_S:g} s: n/a) that ratio is noise or "
              f"undefined; the target is met when the ratio is <= {TARGET_VS_ORACLE:g} or the predictive median lag is "
              f"under {ORACLE_FLOOR_S:g} s, whatever the oracle's; the absolute lags are in the lag columns.")
    md.append("- eager uploads every change as soon as the link is free (little lag, much amplification); oracle knows the "
              "future writes (the bound). Raw summaries and every snapshot: results.json.")
    md.append("- rate-oracle is a study, not a policy of the daemon: the predictive planner told each block's mean write "
              "rate over the whole trace in place of its estimates (heat map, learned hot blocks). It knows how hot each "
              "block is, not when it is written: what perfect heat estimates could gain.")
    if setup.get("timeline"):
        md.append(f"- timeline.svg: {setup['timeline']['trace']} at {setup['timeline']['load']:.0%} load around one close, "
                  "predictive and at-close.")
    md.append("")
    table, rows, met = sweep_md(doc)
    if table:
        md.append("## The trade-off: PT")
        md.append("")
        md.append("Each cell: median lag / at-close's, amplification, median lag / the oracle's (n/a where the oracle's is "
                  f"under {ORACLE_ZERO_S:g} s), at that PT (K and L as above); **all** where the three targets are met. "
                  "A lower PT holds more back: less amplification, more lag.")
        md.append("")
        md.append(table)
        md.append("")
        md.append(f"Rows (trace and load) where some PT meets all three targets: predictive {met['predictive']} of {rows}, "
                  f"rate-oracle {met['rate-oracle']} of {rows}.")
        md.append("")
    table, out_of_reach = bound_md(doc)
    if table:
        md.append("## The bound: how low the lag can go")
        md.append("")
        md.append("Each cell: the oracle's median lag / at-close's, at that load (same interval, link rate set as above). "
                  "The oracle uploads each block's final content as soon as its last write is done, on the same link, "
                  "so no policy completes a snapshot sooner: this is the least lag ratio any policy can reach. "
                  f"**out of reach** where it is above the target of {TARGET_VS_AT_CLOSE:g}.")
        md.append("")
        md.append(table)
        md.append("")
        md.append(f"The lag target is out of reach of any policy in {out_of_reach} of the {n_rows} rows of the results.")
        md.append("")
    text = "\n".join(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    try:
        svg = timeline_svg(out, doc)
    except (OSError, ValueError, KeyError) as e:
        svg = None
        log(f"no timeline.svg: {e}")
    if svg:
        with open(os.path.join(out, "timeline.svg"), "w") as f:
            f.write(svg)
    print(text)


# ---- the timeline plot ------------------------------------------------------------


def read_timeline(path):
    """(samples [(t, uploaded, outstanding)], events {kind: {n: t}})."""
    samples, events = [], {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            t = float(row["t_s"])
            if row.get("uploaded_bytes", "") != "" and row.get("outstanding_bytes", "") != "":
                samples.append((t, float(row["uploaded_bytes"]), float(row["outstanding_bytes"])))
            ev = (row.get("event") or "").strip()
            if ev and ":" in ev:
                kind, n = ev.split(":", 1)
                events.setdefault(kind, {}).setdefault(int(n), t)
    samples.sort(key=lambda x: x[0])
    return samples, events


def nice_step(span, n=5):
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def timeline_svg(out, doc):
    tl = doc["setup"].get("timeline")
    if not tl:
        return None
    name, load = tl["trace"], tl["load"]
    runs = {r["policy"]: r for r in doc["runs"] if r["trace"] == name and r["load"] == load and r.get("timeline")}
    if "predictive" not in runs or "result" not in runs["predictive"]:
        raise ValueError(f"no predictive timeline for {name} at load {load}")
    interval = doc["traces"][name]["interval_s"]
    data = {p: read_timeline(os.path.join(out, r["timeline"])) for p, r in runs.items() if "result" in r}
    # The close: a snapshot in the middle, at least the second (the window
    # reaches 1.5 intervals back).
    ids = [s["id"] for s in runs["predictive"]["result"]["snapshots"]]
    if not ids:
        raise ValueError("no snapshots")
    n = max(min(ids[len(ids) // 2], ids[-1]), min(2, ids[-1]))
    closes = data["predictive"][1].get("close", {})
    close = closes.get(n)
    if close is None:
        snap = next(s for s in runs["predictive"]["result"]["snapshots"] if s["id"] == n)
        close = snap["scheduled_s"]
    # The window: 1.5 intervals before the close to 0.5 after, stretched (up
    # to one interval after) to show when the snapshot completes.
    lo, hi = close - 1.5 * interval, close + 0.5 * interval
    for d in data.values():
        c = d[1].get("complete", {}).get(n)
        if c is not None and c + 0.1 * interval > hi:
            hi = min(close + interval, c + 0.1 * interval)

    panels = []
    ymax = 1.0
    for pol in ("predictive", "at-close"):
        if pol not in data:
            continue
        samples, events = data[pol]
        before = [s for s in samples if s[0] < lo]
        inside = [s for s in samples if lo <= s[0] <= hi]
        base = before[-1][1] if before else (inside[0][1] if inside else 0.0)
        pts = ([(lo, before[-1][1], before[-1][2])] if before else []) + inside
        # Continue the last value to the window's end.
        after = [s for s in samples if s[0] > hi]
        if pts and after:
            pts.append((hi, pts[-1][1], pts[-1][2]))
        # At most ~1500 points per series: keep every k-th (and the last).
        if len(pts) > 1500:
            k = math.ceil(len(pts) / 1500)
            pts = pts[::k] + [pts[-1]]
        series = [(t, u - base, o) for t, u, o in pts]
        for _, u, o in series:
            ymax = max(ymax, u, o)
        marks = []
        if pol == "predictive" and n in events.get("start", {}):
            marks.append(("start", events["start"][n]))
        marks.append(("close", events.get("close", {}).get(n, close)))
        if n in events.get("complete", {}):
            marks.append(("complete", events["complete"][n]))
        panels.append((pol, series, marks, runs[pol]["result"]))

    gib = ymax >= 4 * 2**30
    unit, scale = ("GiB", 2**30) if gib else ("MiB", 2**20)
    ytop = ymax / scale
    ystep = nice_step(ytop, 5)
    ytop = math.ceil(ytop / ystep) * ystep
    xstep = nice_step(hi - lo, 8)

    W, PH, ML, MR, MT, GAP = 960, 250, 80, 30, 90, 80
    H = MT + len(panels) * (PH + GAP) - GAP + 70
    pw = W - ML - MR
    colors = {"uploaded": "#1f77b4", "outstanding": "#ff7f0e"}
    mark_style = {"start": ("#2ca02c", "6,4", "predicted start"),
                  "close": ("#000000", "", "scheduled close"),
                  "complete": ("#9467bd", "2,3", "snapshot complete")}
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
         'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="16">{esc(name)} trace, link at {load:.0%} load '
         f'({esc(human_rate(runs["predictive"]["link_bytes_per_s"]))}), interval {interval} s: '
         f'around the close of snapshot {n} (t = {close:.0f} s)</text>']
    # Legend: the series on one row, the vertical marks on the next
    # (text width estimated at 6.5 px per character).
    lx = ML
    for key, label in (("uploaded", "uploaded bytes (cumulative, from the window's start)"),
                       ("outstanding", "outstanding bytes (changed, not yet uploaded; open and closed epochs)")):
        o.append(f'<line x1="{lx}" y1="44" x2="{lx + 24}" y2="44" stroke="{colors[key]}" stroke-width="2.5"/>')
        o.append(f'<text x="{lx + 30}" y="48">{esc(label)}</text>')
        lx += 30 + 6.5 * len(label) + 24
    lx = ML
    for kind in ("start", "close", "complete"):
        c, dash, label = mark_style[kind]
        label = {"start": "predicted start (the start rule fired)",
                 "close": "scheduled close",
                 "complete": "snapshot complete (fully uploaded)"}[kind]
        o.append(f'<line x1="{lx + 12}" y1="59" x2="{lx + 12}" y2="74" stroke="{c}" stroke-width="1.5" stroke-dasharray="{dash}"/>')
        o.append(f'<text x="{lx + 20}" y="70">{esc(label)}</text>')
        lx += 20 + 6.5 * len(label) + 24

    def X(t):
        return ML + (t - lo) / (hi - lo) * pw

    for i, (pol, series, marks, res) in enumerate(panels):
        top = MT + i * (PH + GAP) + 20
        snap = next((s for s in res["snapshots"] if s["id"] == n), None)
        sub = f"{pol}: snapshot {n} lag {snap['lag_s']:.1f} s" if snap else pol
        sub += f"; over the trace: median lag {res['summary']['median_lag_s']:.2f} s, amplification {res['summary']['amplification']:.3f}"

        def Y(v, top=top):
            return top + PH - v / scale / ytop * PH

        o.append(f'<text x="{ML}" y="{top - 8}" font-size="14" font-weight="bold">{esc(sub)}</text>')
        o.append(f'<rect x="{ML}" y="{top}" width="{pw}" height="{PH}" fill="none" stroke="#888"/>')
        # Grid and y ticks.
        v = 0.0
        while v <= ytop + 1e-9:
            y = top + PH - v / ytop * PH
            o.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{ML + pw}" y2="{y:.1f}" stroke="#eee"/>')
            o.append(f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
            v += ystep
        o.append(f'<text transform="translate({ML - 55},{top + PH / 2}) rotate(-90)" text-anchor="middle">{unit}</text>')
        # x ticks: seconds relative to the close.
        k = math.ceil((lo - close) / xstep)
        while close + k * xstep <= hi + 1e-9:
            t = close + k * xstep
            x = X(t)
            o.append(f'<line x1="{x:.1f}" y1="{top + PH}" x2="{x:.1f}" y2="{top + PH + 5}" stroke="#888"/>')
            o.append(f'<text x="{x:.1f}" y="{top + PH + 18}" text-anchor="middle">{k * xstep:+g}</text>')
            k += 1
        o.append(f'<text x="{ML + pw / 2}" y="{top + PH + 36}" text-anchor="middle">'
                 f'time relative to the scheduled close of snapshot {n} (s; virtual time of the simulation)</text>')
        # Series: straight lines between the simulator's samples.
        for key, idx in (("uploaded", 1), ("outstanding", 2)):
            path = []
            for s in series:
                path.append(f"{'L' if path else 'M'}{X(s[0]):.1f},{Y(s[idx]):.1f}")
            if path:
                o.append(f'<path d="{"".join(path)}" fill="none" stroke="{colors[key]}" stroke-width="2"/>')
        # Vertical marks with labels at staggered heights.
        for j, (kind, t) in enumerate(marks):
            if not lo <= t <= hi:
                continue
            c, dash, label = mark_style[kind]
            x = X(t)
            o.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + PH}" stroke="{c}" stroke-width="1.5" '
                     f'stroke-dasharray="{dash}"/>')
            anchor, dx = ("end", -4) if x > ML + pw - 150 else ("start", 4)
            o.append(f'<text x="{x + dx:.1f}" y="{top + 16 + 15 * j}" fill="{c}" text-anchor="{anchor}" '
                     f'stroke="white" stroke-width="3" paint-order="stroke">'
                     f'{esc(label)} ({t - close:+.1f} s)</text>')
        if pol == "predictive" and not any(k == "start" for k, _ in marks):
            o.append(f'<text x="{ML + 6}" y="{top + 16}" fill="#2ca02c">no predictive start for snapshot {n} in the window</text>')
    o.append("</svg>")
    return "\n".join(o) + "\n"


def cmd_report(args):
    path = os.path.join(args.out, "results.json")
    with open(path) as f:
        doc = json.load(f)
    # The targets again, by the rules of this version of the script.
    doc["targets"] = targets(doc)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    report(args.out, doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("merge")
    p.add_argument("--name", default="volume")
    p.add_argument("--description")
    p.add_argument("--info")
    p.add_argument("output")
    p.add_argument("inputs", nargs="+")
    p = sub.add_parser("trim")
    p.add_argument("--name", default="volume")
    p.add_argument("--description")
    p.add_argument("--info")
    p.add_argument("input")
    p.add_argument("output")
    p = sub.add_parser("check-fio")
    p.add_argument("iolog")
    p.add_argument("seconds", type=float)
    p = sub.add_parser("run")
    p.add_argument("--foresnap", required=True)
    p.add_argument("--foresnap-version", default="?")
    p.add_argument("--build", default="?")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="full")
    p.add_argument("--trace", action="append", required=True, help="NAME=PATH (an iolog; PATH.json beside it describes it)")
    p.add_argument("--loads", default="0.3,0.7")
    p.add_argument("--timeline-trace", default="zipf")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--k")
    p.add_argument("--l")
    p.add_argument("--pt")
    p = sub.add_parser("report")
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    rc = {"merge": cmd_merge, "trim": cmd_trim, "check-fio": cmd_check_fio, "run": cmd_run,
          "report": cmd_report}[args.cmd](args)
    sys.exit(rc or 0)


if __name__ == "__main__":
    main()
