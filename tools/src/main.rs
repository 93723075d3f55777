//! The `foresnap` binary: parse, set up logging, call the library.

mod cli;
mod control;
mod metrics;
mod prune;
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
    let cli = match cli::Cli::try_parse() {
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
            // clap's message runs until the first blank line (then come
            // usage and hints); fold it into one line.
            let text = e.to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            eprintln!("foresnap: {msg} (see foresnap --help)");
            return ExitCode::from(2);
        }
    };
    let result = match &cli.command {
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Snapshot(args) => serve::snapshot(args),
        cli::Command::Status(args) => serve::status(args),
        cli::Command::Trace(args) => serve::trace(args),
        cli::Command::Export(args) => serve::export(args),
        cli::Command::Snapshots(args) => upload::snapshots(args),
        cli::Command::Restore(args) => upload::restore(args),
        cli::Command::Verify(args) => upload::verify(args),
        cli::Command::Tier(args) => tier::run(args),
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
