//! Command-line grammar of the `foresnap` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use foresnap_driver::{BlockSize, DeviceConfig, TrackingConfig, parse_size};
use foresnap_uploader::link::CapSchedule;
use foresnap_uploader::plan::{PlanConfig, Policy};
use foresnap_uploader::retention::Retention;
use foresnap_uploader::schedule::Schedule;
use foresnap_uploader::trace::TraceFormat;
use foresnap_uploader::units::{parse_interval, parse_rate};

#[derive(Debug, Parser)]
#[command(
    name = "foresnap",
    version,
    about = "The block device that backs itself up"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// A clap error in one line: its message runs until the first blank line
/// (then come usage and hints), folded, without clap's `error: `.
pub fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let msg: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = msg.join(" ");
    msg.strip_prefix("error: ").unwrap_or(&msg).to_owned()
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Expose a backing file or block device as /dev/ublkbN and serve it in
    /// the foreground until SIGINT or SIGTERM, which remove the device.
    #[command(after_help = "Examples:\n  \
        foresnap serve --backing /var/lib/foresnap/db.img --size 64G\n  \
        foresnap serve --backing /dev/nvme0n1p3 --queues 4 --depth 256\n  \
        foresnap serve --backing db.img --dest file:///backup --every 15m --keep-last 8 --keep-daily 7\n\n\
        If the server of device --id N was killed, serving the same backing with\n\
        the same --id re-attaches to the device; its I/O waits meanwhile.")]
    Serve(Box<ServeArgs>),
    /// Serve the volumes of a configuration file, each by its own `serve`
    /// process (restarted if it dies), with the control API on a unix
    /// socket (HTTP and JSON): volumes, snapshots, destinations, restores.
    #[command(after_help = "Examples:\n  \
        foresnap daemon --config /etc/foresnap/foresnap.toml\n  \
        foresnap daemon --config foresnap.toml --check     (check the file, serve nothing)\n  \
        foresnap daemon --config foresnap.toml --check --prove   (and each tenant's writes)\n  \
        curl --unix-socket /run/foresnap/daemon.sock http://x/v1/volumes\n\n\
        A volume's keys are serve's long options (see packaging/foresnap.toml);\n\
        a bad file is refused with its line, field and reason. Each volume is\n\
        served only once its tenant's own key has written and read back a probe\n\
        at each of its destinations.")]
    Daemon(DaemonArgs),
    /// List the volumes of a daemon: tenant, state, device, restarts,
    /// destinations and upload health.
    #[command(after_help = "Examples:\n  \
        foresnap volumes\n  \
        foresnap volumes --tenant acme --json")]
    Volumes(VolumesArgs),
    /// Close the open epoch of a serving device now: every write
    /// acknowledged before this point is in the snapshot, none after.
    /// Prints the snapshot's id.
    #[command(after_help = "Examples:\n  \
        foresnap snapshot --control /run/foresnap/ublkb0.sock\n  \
        foresnap snapshot            (the only daemon in /run/foresnap)\n  \
        foresnap snapshot --volume db    (volume db of foresnap daemon)")]
    Snapshot(ControlArgs),
    /// Show a serving device's tracking state: open epoch, snapshots
    /// awaiting upload, pending blocks, ring fill, copy-on-write use.
    #[command(after_help = "Examples:\n  \
        foresnap status --control /run/foresnap/ublkb0.sock\n  \
        foresnap status --watch 5s\n  \
        foresnap status --volume db --tenant acme   (volume db of foresnap daemon)\n  \
        foresnap status --daemon                    (every volume of foresnap daemon)")]
    Status(StatusArgs),
    /// Export the write records of a ring file as a fio iolog (version 3),
    /// for replay by fio or by the upload simulator.
    #[command(after_help = "Examples:\n  \
        foresnap trace --ring /var/lib/foresnap/db.img.fsring --out db.iolog\n  \
        fio --name=replay --read_iolog=db.iolog --replay_redirect=/dev/ublkb1 --direct=1")]
    Trace(TraceArgs),
    /// List the complete snapshots of a volume at a destination.
    #[command(after_help = "Examples:\n  \
        foresnap snapshots --dest file:///backup --volume db\n  \
        foresnap snapshots --dest 's3://backups/prod?endpoint=http://127.0.0.1:8333' --volume db\n  \
        foresnap snapshots --dest file:///backup --dest s3://backups/prod --volume db\n  \
        foresnap snapshots --daemon --volume db     (volume db of foresnap daemon)")]
    Snapshots(DestArgs),
    /// Restore a snapshot from a destination into a new image file or onto
    /// a whole block device (not mounted); every object is verified before
    /// its bytes are written.
    #[command(after_help = "Examples:\n  \
        foresnap restore --dest file:///backup --volume db --to /var/tmp/db.img\n  \
        foresnap restore --dest file:///backup --volume db --snapshot 12 --to /dev/vdb\n  \
        foresnap restore --dest s3://backups/prod --dest file:///mnt/copy --volume db --to db.img\n  \
        foresnap restore --lazy --dest s3://backups/prod --volume db --to /var/lib/foresnap/db.img")]
    Restore(RestoreArgs),
    /// Read and check every object of a volume's snapshots (or of one)
    /// without restoring; name each missing or corrupt object. Exits
    /// non-zero if any is.
    #[command(after_help = "Examples:\n  \
        foresnap verify --dest file:///backup --volume db\n  \
        foresnap verify --dest s3://backups/prod --volume db --snapshot latest")]
    Verify(VerifyArgs),
    /// Move a volume's old snapshots from a fast destination to a slow
    /// one: each snapshot closed at least --age ago, except the newest at
    /// the fast destination (the next upload builds on it), is copied
    /// whole to the slow destination (every object verified, the manifest
    /// last), then deleted at the fast one but for the objects its newer
    /// snapshots there share. A move cut short is finished by the next run.
    #[command(after_help = "Examples:\n  \
        foresnap tier --fast file:///fast --slow s3://archive/db --volume db --age 7d\n  \
        foresnap tier --fast file:///fast --slow file:///mnt/nfs --volume db --age 12h --watch 15m\n  \
        foresnap tier --fast file:///fast --slow file:///mnt/nfs --volume db --age 0s")]
    Tier(TierArgs),
    /// Keep a replica image equal to a volume's newest snapshot, as each
    /// snapshot completes (a standby copy on a second host, at most one
    /// snapshot behind). The first run restores the newest snapshot into
    /// --to (a new file, or a block device); later ones write only the
    /// chunks that changed since the snapshot the replica holds, recorded
    /// in TO.replica after the image is synced. With --follow it keeps
    /// going, fetching the objects a snapshot stores before its close
    /// while it waits. A run cut short is finished by the next.
    #[command(after_help = "Examples:\n  \
        foresnap replicate --dest s3://backups/prod --volume db --to /var/lib/foresnap/db-replica.img\n  \
        foresnap replicate --dest file:///backup --volume db --to /dev/vg0/db-replica --state /var/lib/foresnap/db-replica.state --follow\n  \
        foresnap replicate --daemon --volume db --to /srv/replica.img --follow\n\n\
        To fail over: stop the follower and serve the replica:\n  \
        foresnap serve --backing /var/lib/foresnap/db-replica.img ...")]
    Replicate(ReplicateArgs),
    /// Apply a retention policy to a volume's snapshots: keep the newest,
    /// the --keep-last N newest and the newest of each of the last N
    /// hours, days and weeks that have snapshots (UTC, by close time;
    /// weeks from Monday); delete the others with every object no kept
    /// snapshot needs. Each --dest is pruned on its own. Objects of an
    /// upload in progress are never deleted, and a prune cut short is
    /// finished by the next run.
    #[command(after_help = "Examples:\n  \
        foresnap prune --dest file:///backup --volume db --keep-last 7\n  \
        foresnap prune --dest s3://backups/prod --volume db --keep-hourly 24 --keep-daily 7 --keep-weekly 8\n  \
        foresnap prune --dest file:///backup --dest s3://backups/prod --volume db --keep-daily 30 --dry-run")]
    Prune(PruneArgs),
    /// Upload the snapshots of a volume that is not being served: close
    /// its open epoch (a snapshot of the backing as it is now) and upload
    /// every snapshot awaiting upload, then exit. Like `serve`, it relies
    /// on the backing being changed only through foresnap; a new ring
    /// takes the backing's data whole into its first snapshot.
    #[command(after_help = "Examples:\n  \
        foresnap backup --backing /var/lib/foresnap/db.img --dest file:///backup --volume db\n  \
        foresnap backup --backing db.img --dest 's3://backups/prod?region=eu-west-1'\n  \
        foresnap backup --backing db.img --dest s3://backups/prod --dest file:///mnt/copy --dest-policy mirror\n  \
        foresnap backup --backing db.img --dest file:///backup --keep-last 30")]
    Backup(BackupArgs),
    /// Write the content a snapshot awaiting upload had at its close, for
    /// its changed blocks, into a new sparse volume-sized file (the rest
    /// are holes); prints the changed blocks as `FIRST COUNT` runs of
    /// tracking blocks. For inspection and tests.
    #[command(after_help = "Examples:\n  foresnap export --snapshot 3 --out /tmp/snap3.img")]
    Export(ExportArgs),
    /// Replay a block trace on a virtual clock through the real dirty map
    /// and upload planner, over a link of a given rate, and report when
    /// each scheduled snapshot would be complete (its lag after the
    /// scheduled close) and how many bytes went up. A day of trace takes
    /// seconds.
    #[command(after_help = "Examples:\n  \
        foresnap simulate --trace db.iolog --link 20MiB/s --every 15m --policy predictive\n  \
        foresnap simulate --trace src1_0.csv --format msr --disk 0 --link 100Mbit/s --every 1h \\\n      \
        --policy at-close --json\n  \
        foresnap simulate --trace db.iolog --link 5MiB/s --every 90s --policy predictive \\\n      \
        --k 3 --l 5 --pt 0.5 --timeline plan.csv\n\n\
        Policies: predictive (start when TS < K*D/B + L, least likely overwritten first),\n\
        at-close (start at the scheduled close: the baseline), eager (upload every write\n\
        at once), oracle (knows the future: a lower bound on the lag).")]
    Simulate(SimulateArgs),
    /// Write a new random volume key to a file (64 hex digits, mode 0600;
    /// an existing file is never replaced) and print its id. Give it to
    /// `serve` or `backup` with --key-file to encrypt a new volume, and to
    /// every command that reads the volume. Keep a copy in a safe place:
    /// without it the snapshots cannot be restored.
    #[command(after_help = "Examples:\n  \
        foresnap keygen --out /etc/foresnap/db.key\n  \
        foresnap backup --backing db.img --dest file:///backup --key-file /etc/foresnap/db.key\n  \
        FORESNAP_KEY=$(cat db.key) foresnap restore --dest file:///backup --volume db \\\n      \
        --key-env FORESNAP_KEY --to db.img")]
    Keygen(KeygenArgs),
}

#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// The key file to create.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// An encrypted volume's key (`--key-file`, `--key-env`).
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Encryption")]
pub struct KeyArgs {
    /// The volume key, in a file only its owner can read (as `foresnap
    /// keygen` writes it: 64 hex digits). With a key, every object and
    /// manifest of the volume is encrypted and authenticated
    /// (XChaCha20-Poly1305) before it leaves the host. A volume is
    /// encrypted, or not, from its first snapshot on; a wrong key, or a key
    /// for an unencrypted volume, is refused before anything is read.
    #[arg(long, value_name = "FILE", conflicts_with = "key_env")]
    pub key_file: Option<PathBuf>,
    /// As --key-file, from the environment variable VAR (64 hex digits).
    #[arg(long, value_name = "VAR")]
    pub key_env: Option<String>,
}

impl KeyArgs {
    /// The key given, loaded now (a missing or exposed file fails here).
    pub fn load(
        &self,
    ) -> anyhow::Result<Option<std::sync::Arc<foresnap_uploader::seal::VolumeKey>>> {
        use foresnap_uploader::seal::VolumeKey;
        let key = match (&self.key_file, &self.key_env) {
            (Some(f), _) => VolumeKey::from_file(f)?,
            (None, Some(v)) => VolumeKey::from_env(v)?,
            (None, None) => return Ok(None),
        };
        Ok(Some(std::sync::Arc::new(key)))
    }
}

/// The upload policy of `simulate`: the planner's, the oracle, or the
/// planner told each block's write rate (a study).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimPolicyArg {
    Plan(Policy),
    Oracle,
    RateOracle,
}

fn parse_sim_policy(s: &str) -> Result<SimPolicyArg, String> {
    match s {
        "oracle" => return Ok(SimPolicyArg::Oracle),
        "rate-oracle" => return Ok(SimPolicyArg::RateOracle),
        _ => {}
    }
    s.parse::<Policy>().map(SimPolicyArg::Plan).map_err(|_| {
        format!("invalid policy '{s}': give predictive, at-close, eager, oracle or rate-oracle")
    })
}

/// The planner's knobs (`serve`, `simulate`).
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Margin K of the start rule TS < K*D/B + L.
    #[arg(long, value_name = "K", default_value_t = PlanConfig::default().k)]
    pub k: f64,
    /// Lead L of the start rule, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = PlanConfig::default().l_s)]
    pub l: f64,
    /// Skip a chunk while the probability that it is overwritten before
    /// the close is at least PT.
    #[arg(long, value_name = "PT", default_value_t = PlanConfig::default().pt)]
    pub pt: f64,
}

impl PlanArgs {
    /// The planner's configuration for `policy`, checked.
    pub fn config(&self, policy: Policy) -> Result<PlanConfig, String> {
        let c = PlanConfig {
            policy,
            k: self.k,
            l_s: self.l,
            pt: self.pt,
            ..PlanConfig::default()
        };
        c.validate().map(|()| c)
    }
}

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The block trace: a fio iolog (version 3, as `fio --write_iolog`
    /// and `foresnap trace` write it) or an MSR-Cambridge CSV.
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// The trace's format: fio or msr.
    #[arg(long, value_name = "FORMAT", default_value = "fio")]
    pub format: TraceFormat,
    /// MSR traces: only this disk number [default: every disk, as one volume].
    #[arg(long, value_name = "N")]
    pub disk: Option<u32>,
    /// The link's rate, bytes per second: 1048576, 20MiB/s, 100Mbit/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate_arg)]
    pub link: u64,
    /// Interval between scheduled snapshots: 90s, 15m, 1h.
    #[arg(long, value_name = "INTERVAL", value_parser = parse_interval_arg)]
    pub every: std::time::Duration,
    /// predictive, at-close, eager or oracle; rate-oracle (a study: the
    /// predictive planner told each block's mean write rate over the
    /// trace, with --k, --l and --pt).
    #[arg(long, value_name = "POLICY", value_parser = parse_sim_policy)]
    pub policy: SimPolicyArg,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Tracking block: the unit of change tracking and upload.
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_track_block)]
    pub track_block: u32,
    /// Tracking chunk: the unit of the heat map and of the write version
    /// that voids an early upload; a power of two from the tracking block
    /// to 64M. The daemon tracks 1M chunks: other sizes are for study.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_track_chunk)]
    pub track_chunk: u32,
    /// Print one JSON object (snapshots and summary) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write the timeline (bytes uploaded and outstanding over time, with
    /// the starts, closes and completions marked) to FILE as CSV.
    #[arg(long, value_name = "FILE")]
    pub timeline: Option<PathBuf>,
}

fn parse_rate_arg(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|e| e.to_string())
}

fn parse_interval_arg(s: &str) -> Result<std::time::Duration, String> {
    parse_interval(s).map_err(|e| e.to_string())
}

#[derive(Debug, clap::Args)]
pub struct DestArgs {
    /// The destination: file:///PATH or
    /// s3://BUCKET/PREFIX?endpoint=URL&region=R&path-style=true|false
    /// (credentials from the standard AWS environment and profiles).
    /// Repeatable, for a volume with copies at several destinations: a
    /// restore reads from the healthiest, fastest copy, fails over to the
    /// others and spreads its reads over them; `snapshots` shows where each
    /// snapshot is; `verify` checks every copy.
    #[arg(long, value_name = "URL", required_unless_present = "daemon")]
    pub dest: Vec<String>,
    /// The volume's name there (with --daemon: the daemon's name for it).
    #[arg(long, value_name = "NAME")]
    pub volume: String,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Take --dest and the key from volume --volume of `foresnap daemon` at
    /// SOCKET [default: /run/foresnap/daemon.sock].
    #[arg(long, value_name = "SOCKET", num_args = 0..=1,
          default_missing_value = foresnap_control::config::DEFAULT_SOCKET,
          conflicts_with_all = ["dest", "key_file", "key_env"])]
    pub daemon: Option<PathBuf>,
    /// With --daemon: as tenant T.
    #[arg(long, value_name = "T", requires = "daemon")]
    pub tenant: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub from: DestArgs,
    /// The snapshot: its id, or `latest`.
    #[arg(long, value_name = "ID|latest", default_value = "latest", value_parser = parse_snapshot)]
    pub snapshot: Snapshot,
    /// A new image file to create (an existing file is never overwritten),
    /// or a block device at least as large as the volume.
    #[arg(long, visible_alias = "out", value_name = "PATH")]
    pub to: PathBuf,
    /// Objects fetched at once (with --lazy: background fetches; one more
    /// worker serves the chunks requests wait for).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_workers)]
    pub workers: usize,
    /// Serve the volume at once as a new /dev/ublkbN over --to (a new file,
    /// or one a stopped --lazy restore left: it resumes): reads and writes
    /// of chunks not yet restored fetch them first, the rest is restored in
    /// the background, writes are tracked as the new volume's first epoch.
    /// Runs in the foreground until SIGINT/SIGTERM, like `serve`.
    #[arg(long)]
    pub lazy: bool,
    /// With --lazy: a bandwidth cap on background restoring (RATE as
    /// `20MiB/s`, `100Mbit/s` or bytes per second); chunks that requests
    /// wait for are fetched at once, outside the cap.
    #[arg(long, value_name = "RATE", requires = "lazy", value_parser = parse_rate_arg)]
    pub hydrate_cap: Option<u64>,
    /// With --lazy: ask for /dev/ublkbN.
    #[arg(long, value_name = "N", requires = "lazy")]
    pub id: Option<u32>,
    /// With --lazy: hardware queues [default: min(CPUs, 4)].
    #[arg(long, value_name = "N", requires = "lazy")]
    pub queues: Option<u16>,
    /// With --lazy: the control socket for `snapshot` and `status`
    /// [default: /run/foresnap/ublkbN.sock].
    #[arg(long, value_name = "SOCKET", requires = "lazy")]
    pub control: Option<PathBuf>,
    /// With --lazy: Prometheus metrics at http://ADDR/metrics on the
    /// loopback interface (as `serve --metrics`), with the hydration's
    /// progress [default: off].
    #[arg(long, value_name = "ADDR", requires = "lazy")]
    pub metrics: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ReplicateArgs {
    #[command(flatten)]
    pub from: DestArgs,
    /// The replica: a new file (or one an earlier run made, with its
    /// TO.replica state beside it), or a block device at least as large
    /// as the volume.
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    /// The replica's state: the snapshot it holds [default: TO.replica;
    /// required for a block device].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// Keep following: look for a newer snapshot every --poll, until
    /// SIGINT or SIGTERM.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: how often to look for a newer snapshot.
    #[arg(long, value_name = "INTERVAL", default_value = "5s", value_parser = parse_interval_arg)]
    pub poll: std::time::Duration,
    /// With --follow: memory for objects fetched before their snapshot's
    /// close (SIZE as 256M, 1G; 0: none).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size_arg)]
    pub prefetch_memory: u64,
    /// Objects fetched at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_workers)]
    pub workers: usize,
}

#[derive(Debug, clap::Args)]
pub struct TierArgs {
    /// Where snapshots land: file:///PATH or s3://BUCKET/PREFIX?... (as --dest).
    #[arg(long, value_name = "URL")]
    pub fast: String,
    /// Where they move to once old enough.
    #[arg(long, value_name = "URL")]
    pub slow: String,
    /// The volume's name at both.
    #[arg(long, value_name = "NAME")]
    pub volume: String,
    /// Move snapshots closed at least this long ago: 12h, 7d, 90s; 0s
    /// moves every snapshot but the newest.
    #[arg(long, value_name = "INTERVAL", value_parser = crate::tier::parse_age)]
    pub age: std::time::Duration,
    /// Run again every INTERVAL (a bare number is seconds) until SIGINT or
    /// SIGTERM [default: run once].
    #[arg(long, value_name = "INTERVAL", value_parser = parse_interval_arg)]
    pub watch: Option<std::time::Duration>,
    #[command(flatten)]
    pub key: KeyArgs,
}

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("rules")
        .required(true)
        .multiple(true)
        .args(["keep_last", "keep_hourly", "keep_daily", "keep_weekly"])
))]
pub struct PruneArgs {
    #[command(flatten)]
    pub from: DestArgs,
    #[command(flatten)]
    pub keep: KeepArgs,
    /// Tell what would be kept and deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Retention rules (README, `prune`); the newest snapshot is always kept.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[command(next_help_heading = "Retention")]
pub struct KeepArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N weeks that have one.
    #[arg(long, value_name = "N", value_parser = parse_keep)]
    pub keep_weekly: Option<u32>,
}

impl KeepArgs {
    /// The policy, if any rule is given.
    pub fn retention(&self) -> Option<Retention> {
        let r = Retention {
            keep_last: self.keep_last.unwrap_or(0),
            keep_hourly: self.keep_hourly.unwrap_or(0),
            keep_daily: self.keep_daily.unwrap_or(0),
            keep_weekly: self.keep_weekly.unwrap_or(0),
        };
        r.check().is_ok().then_some(r)
    }
}

fn parse_keep(s: &str) -> Result<u32, String> {
    s.parse::<u32>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("invalid count '{s}': give a number of snapshots, 1 or more"))
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub from: DestArgs,
    /// One snapshot (its id, or `latest`) [default: all of them].
    #[arg(long, value_name = "ID|latest", value_parser = parse_snapshot)]
    pub snapshot: Option<Snapshot>,
    /// Objects read at once.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_workers)]
    pub workers: usize,
}

/// A snapshot named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    Latest,
    Id(u32),
}

fn parse_snapshot(s: &str) -> Result<Snapshot, String> {
    if s == "latest" {
        return Ok(Snapshot::Latest);
    }
    s.parse::<u32>()
        .ok()
        .filter(|&id| id > 0)
        .map(Snapshot::Id)
        .ok_or_else(|| format!("invalid snapshot '{s}': give a snapshot id (1, 2, ...) or latest"))
}

fn parse_price(s: &str) -> Result<foresnap_uploader::price::Price, String> {
    foresnap_uploader::price::Price::parse(s)
}

fn parse_restores(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| format!("invalid restore count '{s}': give a number >= 0, as 0.5 or 2"))
}

fn parse_workers(s: &str) -> Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| format!("invalid worker count '{s}': give 1 to 64"))
}

/// How a volume's snapshots use its destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DestPolicy {
    Single,
    Mirror,
    Alternate,
    Price,
    Stripe,
}

/// Where and how snapshots are uploaded (`serve`, `backup`).
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    /// Upload every closed snapshot to this destination: file:///PATH (a
    /// directory, also an NFS mount) or
    /// s3://BUCKET/PREFIX?endpoint=URL&region=R. Repeatable, with
    /// --dest-policy mirror or alternate.
    #[arg(long, value_name = "URL")]
    pub dest: Vec<String>,
    /// How snapshots use the destinations: `single` (one --dest), `mirror`
    /// (every snapshot complete at every --dest; a destination new to the
    /// volume first receives the newest snapshot's objects) or `alternate`
    /// (snapshot N complete at the ((N-1) mod count)th --dest, round-robin;
    /// the objects it shares with earlier snapshots are copied there
    /// before its manifest) or `price` (each snapshot complete at the --dest
    /// whose --price gives the lowest forecast monthly cost, from the
    /// uploads so far; a change of destination needs a 10% saving) or
    /// `stripe` (each snapshot's chunks spread over the --dest by ranges
    /// of --stripe-range, in turn; complete with every --dest).
    #[arg(long, value_name = "POLICY", value_enum, default_value = "single")]
    pub dest_policy: DestPolicy,
    /// With --dest-policy stripe: the block range each --dest holds in
    /// turn, a power of two from the chunk size up (ranges of the
    /// volume's offsets: 0..SIZE at the first --dest, SIZE..2*SIZE at the
    /// second, and so on, round-robin).
    #[arg(long, value_name = "SIZE", value_parser = parse_stripe_range)]
    pub stripe_range: Option<u64>,
    /// With --dest-policy price: a --dest's prices, one --price per --dest
    /// in the same order: storage (per GiB-month), put and get (per 1000
    /// requests), egress (per GiB), as storage=0.023,put=0.005,get=0.0004,egress=0.09;
    /// a field left out costs nothing.
    #[arg(long, value_name = "PRICES", value_parser = parse_price)]
    pub price: Vec<foresnap_uploader::price::Price>,
    /// With --dest-policy price: whole restores a month to count in the
    /// forecast (a GET per chunk and the volume's bytes out each).
    #[arg(long, value_name = "N", default_value_t = 1.0, value_parser = parse_restores)]
    pub restores_per_month: f64,
    /// The volume's name at the destination [default: the backing file's
    /// name].
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// Longest chain of delta objects over a chunk object; a longer one is
    /// folded into a fresh chunk object (compaction) at upload.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_deltas: u16,
    /// Object size: a power of two from 1M to 64M. A volume keeps the
    /// chunk size of the snapshots it already has at the destination.
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = parse_chunk_size)]
    pub chunk_size: u32,
    /// Upload worker threads (objects in flight).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_workers)]
    pub upload_workers: usize,
    /// Bound on the upload buffers: each worker holds up to 3 chunks plus
    /// the destination's copies in flight (S3: 1, sealing: 2 more), so
    /// fewer workers run if the bound does not fit them all.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size_arg)]
    pub upload_memory: u64,
    // With a rule, each --dest is pruned on its own after uploads (as
    // `foresnap prune` does): by `backup` once done, by `serve` after a
    // new snapshot is stored, at most once a minute.
    #[command(flatten)]
    pub keep: KeepArgs,
    #[command(flatten)]
    pub key: KeyArgs,
}

/// The volume's change tracking (`serve`, `backup`).
#[derive(Debug, clap::Args)]
pub struct TrackArgs {
    /// Write ring file recording every write [default: BACKING.fsring;
    /// required for a block device backing]. An existing ring is
    /// recovered: the restart after a crash continues its epochs.
    #[arg(long, value_name = "PATH")]
    pub ring: Option<PathBuf>,
    /// Size of a new write ring file (32 bytes per write record).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size_arg)]
    pub ring_size: u64,
    /// Tracking block: the unit of change tracking, copy-on-write and
    /// upload; a power of two from 512 to 1M. An existing ring keeps its own.
    #[arg(long, value_name = "SIZE", default_value = "4K", value_parser = parse_track_block)]
    pub track_block: u32,
}

impl TrackArgs {
    fn config(&self) -> TrackingConfig {
        TrackingConfig {
            ring: self.ring.clone(),
            ring_bytes: self.ring_size,
            block_bytes: self.track_block,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Backing regular file or block device (not being served).
    #[arg(long, value_name = "PATH")]
    pub backing: PathBuf,
    #[command(flatten)]
    pub track: TrackArgs,
    #[command(flatten)]
    pub upload: UploadArgs,
}

impl BackupArgs {
    pub fn device_config(&self) -> DeviceConfig {
        let mut cfg = DeviceConfig::new(&self.backing);
        cfg.queues = 1;
        cfg.tracking = Some(self.track.config());
        cfg
    }
}

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// The snapshot (closed epoch) id.
    #[arg(long, value_name = "ID")]
    pub snapshot: u32,
    /// The file to create (absolute path: the daemon writes it).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The serving device's control socket [default: the only one in
    /// /run/foresnap].
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["volume", "daemon"])]
    pub control: Option<PathBuf>,
    /// Volume NAME of `foresnap daemon` (through its API).
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    #[command(flatten)]
    pub daemon: DaemonRef,
}

/// Which `foresnap daemon` to ask, and as which tenant.
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonRef {
    /// Ask `foresnap daemon` at its API socket SOCKET
    /// [default: /run/foresnap/daemon.sock].
    #[arg(long, value_name = "SOCKET", num_args = 0..=1,
          default_missing_value = foresnap_control::config::DEFAULT_SOCKET)]
    pub daemon: Option<PathBuf>,
    /// As tenant T: only T's volumes are visible.
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
}

impl DaemonRef {
    /// The API socket: the one given, or the default.
    pub fn socket(&self) -> PathBuf {
        self.daemon
            .clone()
            .unwrap_or_else(|| PathBuf::from(foresnap_control::config::DEFAULT_SOCKET))
    }
}

#[derive(Debug, clap::Args)]
pub struct DaemonArgs {
    /// The configuration file.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/foresnap/foresnap.toml"
    )]
    pub config: PathBuf,
    /// Check the file (its shape, every volume's options, the tenants'
    /// secret key files) and exit; serves nothing, reaches no destination.
    #[arg(long)]
    pub check: bool,
    /// With --check: also prove that each volume's tenant can write to
    /// and read back from each of its destinations with its own key (a
    /// probe object, deleted after), as the daemon does before serving.
    #[arg(long, requires = "check")]
    pub prove: bool,
}

#[derive(Debug, clap::Args)]
pub struct VolumesArgs {
    #[command(flatten)]
    pub daemon: DaemonRef,
    /// The API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The serving device's control socket [default: the only one in
    /// /run/foresnap].
    #[arg(long, value_name = "SOCKET", conflicts_with_all = ["volume", "daemon"])]
    pub control: Option<PathBuf>,
    /// Volume NAME of `foresnap daemon` (through its API); with --daemon
    /// and no --volume: every volume.
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    #[command(flatten)]
    pub daemon: DaemonRef,
    /// Refresh every INTERVAL (a bare number is seconds; default 2 s)
    /// until ^C; exits non-zero once the daemon stops answering.
    #[arg(
        long,
        value_name = "INTERVAL",
        num_args = 0..=1,
        default_missing_value = "2s",
        value_parser = parse_interval_arg
    )]
    pub watch: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
pub struct TraceArgs {
    /// The write ring file.
    #[arg(long, value_name = "PATH")]
    pub ring: PathBuf,
    /// Where to write the iolog ("-" for stdout).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The file name the iolog's lines name (fio's --replay_redirect
    /// overrides it at replay).
    #[arg(long, value_name = "NAME", default_value = "/dev/ublkb0")]
    pub file: String,
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Backing regular file or block device.
    #[arg(long, value_name = "PATH")]
    pub backing: PathBuf,
    /// Create a missing backing file of this size, or grow a smaller one
    /// (sparse). Bytes, or with K/M/G/T (powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub size: Option<u64>,
    /// Hardware queues, one thread each [default: min(CPUs, 4)].
    #[arg(long, value_name = "N")]
    pub queues: Option<u16>,
    /// Requests in flight per queue.
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub depth: u16,
    /// Logical block size of the device: 512 or 4096.
    #[arg(long, value_name = "BYTES", default_value = "4096", value_parser = parse_block_size)]
    pub block_size: BlockSize,
    /// Device id N of /dev/ublkbN [default: the kernel's choice].
    #[arg(long, value_name = "N")]
    pub id: Option<u32>,
    /// Control socket for `foresnap snapshot` and `status`
    /// [default: /run/foresnap/ublkbN.sock].
    #[arg(long, value_name = "SOCKET")]
    pub control: Option<PathBuf>,
    #[command(flatten)]
    pub track: TrackArgs,
    /// Serve without change tracking (no ring, no snapshots).
    #[arg(long, conflicts_with_all = ["ring", "control", "dest"])]
    pub no_tracking: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics, on the loopback
    /// interface only (as 127.0.0.1:9477): I/O latency histograms, IOPS,
    /// errors, tracking, uploads, collisions avoided, bytes held back as
    /// hot, snapshot lag [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    #[command(flatten)]
    pub upload: UploadArgs,
    #[command(flatten)]
    pub sched: ScheduleArgs,
}

/// Scheduled snapshots and how they are uploaded (`serve`).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Schedule and upload policy")]
pub struct ScheduleArgs {
    /// Take snapshots on a schedule: `every 15m`, `hourly`, `daily 02:00`,
    /// `weekly sun 03:00`, or a 5-field cron expression `MIN HOUR DOM MON
    /// DOW`. Needs --dest.
    #[arg(long, value_name = "SPEC", value_parser = parse_schedule, requires = "dest")]
    pub schedule: Option<Schedule>,
    /// Shorthand for --schedule 'every INTERVAL'.
    #[arg(long, value_name = "INTERVAL", conflicts_with = "schedule", requires = "dest",
          value_parser = parse_every)]
    pub every: Option<Schedule>,
    /// Read the schedule's times as UTC [default: local time].
    #[arg(long)]
    pub utc: bool,
    /// When the open snapshot's blocks are uploaded: predictive (before
    /// the scheduled close, least likely overwritten first), at-close, or
    /// eager (every write at once).
    #[arg(long, value_name = "POLICY", default_value = "predictive")]
    pub policy: Policy,
    #[command(flatten)]
    pub plan: PlanArgs,
    /// Cap the upload bandwidth: a rate (20MiB/s), or windows of local
    /// time with rates (08:00-18:00=20MiB/s,18:00-08:00=100MiB/s; outside
    /// every window: uncapped).
    #[arg(long, value_name = "CAP", requires = "dest", value_parser = parse_cap)]
    pub upload_cap: Option<CapSchedule>,
}

impl ScheduleArgs {
    /// The schedule, if one was given.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref().or(self.every.as_ref())
    }
}

fn parse_cap(s: &str) -> Result<CapSchedule, String> {
    CapSchedule::parse(s).map_err(|e| e.to_string())
}

fn parse_schedule(s: &str) -> Result<Schedule, String> {
    Schedule::parse(s).map_err(|e| e.to_string())
}

fn parse_every(s: &str) -> Result<Schedule, String> {
    parse_interval(s).map_err(|e| e.to_string())?;
    Schedule::parse(&format!("every {s}")).map_err(|e| e.to_string())
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A size `s` that is a power of two in `[lo, hi]` (`range` says it in
/// words); the error names `what` and the range.
fn power_of_two(s: &str, what: &str, range: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let bad = || format!("invalid {what} '{s}': give a power of two from {range}");
    let v = parse_size(s).map_err(|_| bad())?;
    Some(v)
        .filter(|v| v.is_power_of_two() && (lo..=hi).contains(v))
        .ok_or_else(bad)
}

/// [`power_of_two`] for a value the program keeps as `u32` (`hi` fits).
fn power_of_two_u32(s: &str, what: &str, range: &str, lo: u32, hi: u32) -> Result<u32, String> {
    power_of_two(s, what, range, lo.into(), hi.into()).map(|v| u32::try_from(v).unwrap_or(hi))
}

fn parse_track_block(s: &str) -> Result<u32, String> {
    let (lo, hi) = foresnap_driver::config::TRACK_BLOCK_RANGE;
    power_of_two_u32(s, "tracking block", "512 to 1M", lo, hi)
}

fn parse_track_chunk(s: &str) -> Result<u32, String> {
    power_of_two_u32(s, "tracking chunk", "512 to 64M", 512, 64 << 20)
}

fn parse_chunk_size(s: &str) -> Result<u32, String> {
    power_of_two_u32(s, "chunk size", "1M to 64M", 1 << 20, 64 << 20)
}

fn parse_stripe_range(s: &str) -> Result<u64, String> {
    power_of_two(s, "stripe range", "1M to 1T", 1 << 20, 1 << 40)
}

fn parse_block_size(s: &str) -> Result<BlockSize, String> {
    BlockSize::parse(s).map_err(|e| e.to_string())
}

impl ServeArgs {
    pub fn device_config(&self) -> DeviceConfig {
        let mut cfg = DeviceConfig::new(&self.backing);
        cfg.size = self.size;
        if let Some(q) = self.queues {
            cfg.queues = q;
        }
        cfg.depth = self.depth;
        cfg.block_size = self.block_size;
        cfg.id = self.id;
        cfg.tracking = (!self.no_tracking).then(|| self.track.config());
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("foresnap").chain(args.iter().copied()))
    }

    /// `foresnap serve ARGS`, parsed.
    fn serve(args: &[&str]) -> ServeArgs {
        let all: Vec<&str> = std::iter::once("serve")
            .chain(args.iter().copied())
            .collect();
        match parse(&all).unwrap().command {
            Command::Serve(a) => *a,
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn serve_defaults() {
        let a = serve(&["--backing", "/tmp/d.img"]);
        let cfg = a.device_config();
        assert_eq!(cfg.depth, 128);
        assert_eq!(cfg.block_size, BlockSize::B4096);
        assert_eq!(cfg.size, None);
        assert_eq!(cfg.id, None);
        assert!((1..=4).contains(&cfg.queues));
    }

    #[test]
    fn serve_all_options() {
        let a = serve(&[
            "--backing",
            "/d",
            "--size",
            "2G",
            "--queues",
            "3",
            "--depth",
            "64",
            "--block-size",
            "512",
            "--id",
            "7",
            "--ring",
            "/r/ring",
            "--ring-size",
            "1M",
        ]);
        let cfg = a.device_config();
        assert_eq!(cfg.size, Some(2 << 30));
        assert_eq!((cfg.queues, cfg.depth, cfg.id), (3, 64, Some(7)));
        assert_eq!(cfg.block_size, BlockSize::B512);
        let t = cfg.tracking.unwrap();
        assert_eq!(t.ring.as_deref(), Some(std::path::Path::new("/r/ring")));
        assert_eq!(t.ring_bytes, 1 << 20);
    }

    #[test]
    fn tracking_defaults_and_off_switch() {
        let a = serve(&["--backing", "/tmp/d.img"]);
        let cfg = a.device_config();
        assert_eq!(
            cfg.ring_path().unwrap().as_deref(),
            Some(std::path::Path::new("/tmp/d.img.fsring"))
        );
        assert_eq!(cfg.tracking.unwrap().ring_bytes, 64 << 20);
        let a = serve(&["--backing", "/d", "--no-tracking"]);
        assert_eq!(a.device_config().tracking, None);
        let e = parse(&["serve", "--backing", "/d", "--no-tracking", "--ring", "/r"]).unwrap_err();
        assert!(e.to_string().contains("cannot be used with"), "{e}");
        let Command::Snapshot(c) = parse(&["snapshot", "--control", "/s"]).unwrap().command else {
            panic!("not snapshot")
        };
        assert_eq!(c.control.as_deref(), Some(std::path::Path::new("/s")));
        let a = serve(&["--backing", "/d", "--track-block", "64K"]);
        assert_eq!(a.device_config().tracking.unwrap().block_bytes, 64 << 10);
        for bad in ["3K", "256", "2M", "x"] {
            let e = parse(&["serve", "--backing", "/d", "--track-block", bad]).unwrap_err();
            assert!(e.to_string().contains("tracking block"), "{bad}: {e}");
        }
        let e = parse(&["trace", "--ring", "/r"]).unwrap_err();
        assert!(e.to_string().contains("--out"), "{e}");
    }

    #[test]
    fn destination_commands_parse_and_refuse_bad_values() {
        let Command::Restore(r) = parse(&[
            "restore",
            "--dest",
            "file:///b",
            "--volume",
            "v",
            "--to",
            "/x",
        ])
        .unwrap()
        .command
        else {
            panic!("not restore")
        };
        assert_eq!((r.snapshot, r.workers), (Snapshot::Latest, 4));
        let Command::Restore(r) = parse(&[
            "restore",
            "--dest",
            "file:///b",
            "--volume",
            "v",
            "--out",
            "/x",
            "--snapshot",
            "12",
        ])
        .unwrap()
        .command
        else {
            panic!("not restore")
        };
        assert_eq!(r.snapshot, Snapshot::Id(12), "--out is an alias of --to");
        for bad in ["0", "newest", "1.5"] {
            let e = parse(&[
                "verify",
                "--dest",
                "file:///b",
                "--volume",
                "v",
                "--snapshot",
                bad,
            ])
            .unwrap_err();
            assert!(e.to_string().contains("invalid snapshot"), "{bad}: {e}");
        }
        for bad in ["0", "65", "x"] {
            let e = parse(&[
                "verify",
                "--dest",
                "file:///b",
                "--volume",
                "v",
                "--workers",
                bad,
            ])
            .unwrap_err();
            assert!(e.to_string().contains("worker count"), "{bad}: {e}");
        }
        let a = serve(&[
            "--backing",
            "/d",
            "--dest",
            "file:///a",
            "--dest",
            "s3://b",
            "--upload-memory",
            "1G",
            "--upload-workers",
            "8",
        ]);
        assert_eq!(a.upload.dest, vec!["file:///a", "s3://b"]);
        assert_eq!(
            (a.upload.upload_memory, a.upload.upload_workers),
            (1 << 30, 8)
        );
        let a = serve(&["--backing", "/d"]);
        assert_eq!(
            (
                a.upload.upload_memory,
                a.upload.upload_workers,
                a.upload.chunk_size
            ),
            (256 << 20, 4, 4 << 20)
        );
        let Command::Backup(b) = parse(&["backup", "--backing", "/d", "--dest", "file:///b"])
            .unwrap()
            .command
        else {
            panic!("not backup")
        };
        assert_eq!(b.device_config().queues, 1);
        assert_eq!(
            b.device_config().ring_path().unwrap().as_deref(),
            Some(std::path::Path::new("/d.fsring"))
        );
    }

    #[test]
    fn bad_values_name_the_problem() {
        let e = parse(&["serve", "--backing", "/d", "--block-size", "1024"]).unwrap_err();
        assert!(e.to_string().contains("512 or 4096"), "{e}");
        let e = parse(&["serve", "--backing", "/d", "--size", "lots"]).unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
        let e = parse(&["serve"]).unwrap_err();
        assert!(e.to_string().contains("--backing"), "{e}");
        let e = parse(&["serve", "--backing", "/d", "--depth", "many"]).unwrap_err();
        assert!(e.to_string().contains("--depth"), "{e}");
    }
}
