//! Command-line grammar of the `foresnap` binary.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use foresnap_driver::{BlockSize, DeviceConfig, parse_size};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Expose a backing file or block device as /dev/ublkbN and serve it in
    /// the foreground until SIGINT or SIGTERM, which remove the device.
    #[command(after_help = "Examples:\n  \
        foresnap serve --backing /var/lib/foresnap/db.img --size 64G\n  \
        foresnap serve --backing /dev/nvme0n1p3 --queues 4 --depth 256\n\n\
        If the server of device --id N was killed, serving the same backing with\n\
        the same --id re-attaches to the device; its I/O waits meanwhile.")]
    Serve(ServeArgs),
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
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
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
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("foresnap").chain(args.iter().copied()))
    }

    #[test]
    fn serve_defaults() {
        let Command::Serve(a) = parse(&["serve", "--backing", "/tmp/d.img"])
            .unwrap()
            .command;
        let cfg = a.device_config();
        assert_eq!(cfg.depth, 128);
        assert_eq!(cfg.block_size, BlockSize::B4096);
        assert_eq!(cfg.size, None);
        assert_eq!(cfg.id, None);
        assert!((1..=4).contains(&cfg.queues));
    }

    #[test]
    fn serve_all_options() {
        let Command::Serve(a) = parse(&[
            "serve",
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
        ])
        .unwrap()
        .command;
        let cfg = a.device_config();
        assert_eq!(cfg.size, Some(2 << 30));
        assert_eq!((cfg.queues, cfg.depth, cfg.id), (3, 64, Some(7)));
        assert_eq!(cfg.block_size, BlockSize::B512);
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
