//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::{drive, run, stream};

/// tern: a KVM virtual machine monitor built for live migration.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest (the built-in test guest unless --kernel is given).
    Run(run::RunArgs),
    /// Migrate a running tern (reached through its QMP socket) live, with a progress bar.
    /// Exit status: 0 completed, 1 failed, 3 cancelled (Ctrl-C cancels; the source runs on).
    Migrate(drive::MigrateArgs),
    /// Save a running VM into a file and leave it stopped (as `xl save`).
    Save(drive::SaveArgs),
    /// Start a VM from a file written by `tern save` (as `xl restore`).
    Restore(drive::RestoreArgs),
    /// Summarise a migration stream (a saved file, or - for standard input).
    Analyze {
        /// The stream: a file or - for standard input.
        input: String,
        /// A full dump of every record's contents (sections with their fields and values) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every CRC, ordering rule and total of a migration stream.
    Verify {
        /// The stream: a file or - for standard input.
        input: String,
    },
    /// The built-in test guest.
    Guest {
        #[command(subcommand)]
        action: GuestAction,
    },
}

#[derive(Subcommand, Debug)]
pub enum GuestAction {
    /// Write the guest's PVH ELF image to PATH (QEMU and Cloud Hypervisor boot it as is).
    Write { path: PathBuf },
}

pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Migrate(args) => drive::migrate(args),
        Command::Save(args) => drive::save(args),
        Command::Restore(args) => drive::restore(args),
        Command::Analyze { input, json } => stream::analyze(&input, json),
        Command::Verify { input } => stream::verify(&input),
        Command::Guest {
            action: GuestAction::Write { path },
        } => {
            if path.as_os_str().is_empty() {
                bail!("the output path is empty");
            }
            std::fs::write(&path, tern_guest::GUEST_ELF)
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!(
                "wrote {} ({} bytes); boot it with: qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -m 1G -nographic -kernel {} -append 'tern.wss=256'",
                path.display(),
                tern_guest::GUEST_ELF.len(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
