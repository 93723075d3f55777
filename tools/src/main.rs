//! The `foresnap` binary: parse, set up logging, call the library.

mod cli;
mod control;
mod daemon;
mod metrics;
mod prune;
mod replicate;
mod serve;
mod simulate;
mod tier;
mod upload;

use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let mut cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            // One line: what is wrong, and where to read more.
            eprintln!("foresnap: {} (see foresnap --help)", cli::one_line(&e));
            return ExitCode::from(2);
        }
    };
    // A daemon's volume named instead of its destination: ask the daemon.
    if let Err(e) = resolve_daemon_dest(&mut cli.command) {
        eprintln!("foresnap: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match &cli.command {
        cli::Command::Daemon(args) => daemon::run(args),
        cli::Command::Volumes(args) => daemon::volumes(args),
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Snapshot(args) => serve::snapshot(args),
        cli::Command::Status(args) => serve::status(args),
        cli::Command::Trace(args) => serve::trace(args),
        cli::Command::Export(args) => serve::export(args),
        cli::Command::Snapshots(args) => upload::snapshots(args),
        cli::Command::Restore(args) => upload::restore(args),
        cli::Command::Verify(args) => upload::verify(args),
        cli::Command::Tier(args) => tier::run(args),
        cli::Command::Replicate(args) => replicate::run(args),
        cli::Command::Prune(args) => prune::run(args),
        cli::Command::Backup(args) => upload::backup(args),
        cli::Command::Simulate(args) => simulate::run(args),
        cli::Command::Keygen(args) => keygen(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("foresnap: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `snapshots`, `restore`, `verify`, `prune` and `replicate` with `--daemon`: the
/// destinations, the name there and the key of the daemon's volume.
fn resolve_daemon_dest(command: &mut cli::Command) -> anyhow::Result<()> {
    let from = match command {
        cli::Command::Snapshots(a) => a,
        cli::Command::Restore(a) => &mut a.from,
        cli::Command::Verify(a) => &mut a.from,
        cli::Command::Prune(a) => &mut a.from,
        cli::Command::Replicate(a) => &mut a.from,
        _ => return Ok(()),
    };
    let Some(socket) = from.daemon.clone() else {
        return Ok(());
    };
    let v = daemon::call(
        &socket,
        foresnap_control::api::Method::Get,
        &format!("/v1/volumes/{}", from.volume),
        from.tenant.as_deref(),
        None,
    )?;
    from.dest = v["dest"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    if from.dest.is_empty() {
        anyhow::bail!("volume {} of the daemon has no dest", from.volume);
    }
    from.volume = v["dest_volume"].as_str().unwrap_or(&from.volume).to_owned();
    from.key.key_file = v["key_file"].as_str().map(std::path::PathBuf::from);
    from.key.key_env = v["key_env"].as_str().map(str::to_owned);
    Ok(())
}

/// `foresnap keygen`.
fn keygen(args: &cli::KeygenArgs) -> anyhow::Result<()> {
    let id = foresnap_uploader::seal::VolumeKey::generate(&args.out)?;
    println!(
        "key {id} written to {} (keep a copy in a safe place: without it the volume's \
         snapshots cannot be restored)",
        args.out.display()
    );
    Ok(())
}
