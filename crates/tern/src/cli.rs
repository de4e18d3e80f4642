//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::{demo, drive, report, run, stream};

/// tern: a KVM virtual machine monitor built for live migration.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot the built-in guest, migrate it live to a second tern over tcp on loopback with a
    /// progress bar, show it running there, and write an SVG report.
    Demo(demo::DemoArgs),
    /// Boot a guest (the built-in test guest unless --kernel is given).
    Run(run::RunArgs),
    /// Migrate a running tern (reached through its QMP socket) live, with a progress bar.
    /// Exit status: 0 completed, 1 failed, 3 cancelled (Ctrl-C cancels; the source runs on).
    Migrate(drive::MigrateArgs),
    /// Save a running VM into a file and leave it stopped (as `xl save`).
    Save(drive::SaveArgs),
    /// Start a VM from a file written by `tern save` (as `xl restore`).
    Restore(drive::RestoreArgs),
    /// Render a migration timeline (`tern migrate --timeline`, QMP `x-tern-timeline`) as SVG.
    Report {
        /// The timeline JSON.
        timeline: PathBuf,
        /// The SVG to write (default: the timeline's name with .svg).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
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
    /// Benchmark aid: copy BYTES over a plain loopback TCP socket (4 MiB writes, TCP_NODELAY,
    /// one sender and one receiver thread) and print the rate: the physical limit a migration
    /// over loopback can approach on this machine.
    #[command(name = "x-socket-copy", hide = true)]
    SocketCopy {
        /// How much to copy: 1G, 4G...
        bytes: String,
    },
    /// `tern save --layout mapped`'s writer: reads a stream on standard input and writes FILE
    /// in the mapped layout (pages at fixed offsets).
    #[command(name = "x-write-mapped", hide = true)]
    WriteMapped { file: PathBuf },
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
        Command::Demo(args) => demo::demo(args),
        Command::Report { timeline, output } => {
            let out = report::report(&timeline, output)?;
            say!("{}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate(args) => drive::migrate(args),
        Command::Save(args) => drive::save(args),
        Command::Restore(args) => drive::restore(args),
        Command::Analyze { input, json } => stream::analyze(&input, json),
        Command::Verify { input } => stream::verify(&input),
        Command::SocketCopy { bytes } => socket_copy(&bytes),
        Command::WriteMapped { file } => {
            let out = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&file)
                .with_context(|| format!("cannot create {}", file.display()))?;
            let input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin().lock());
            let t = tern_wire::write_mapped(input, &out)
                .with_context(|| format!("writing {} in the mapped layout", file.display()))?;
            tracing::info!(records = t.records, "mapped layout written");
            Ok(ExitCode::SUCCESS)
        }
        Command::Guest {
            action: GuestAction::Write { path },
        } => {
            if path.as_os_str().is_empty() {
                bail!("the output path is empty");
            }
            std::fs::write(&path, tern_guest::GUEST_ELF)
                .with_context(|| format!("cannot write {}", path.display()))?;
            say!(
                "wrote {} ({} bytes); boot it with: qemu-system-x86_64 -accel kvm -cpu host,-arch-capabilities -m 1G -nographic -kernel {} -append 'tern.wss=256'",
                path.display(),
                tern_guest::GUEST_ELF.len(),
                path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn socket_copy(bytes: &str) -> Result<ExitCode> {
    use std::io::{Read, Write};
    let total = crate::size::parse_size(bytes).map_err(anyhow::Error::msg)?;
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut c, _) = l.accept()?;
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0u64;
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let buf = vec![0x5au8; 4 << 20];
    let t0 = std::time::Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    drop(s);
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("the receiver panicked"))??;
    let dt = t0.elapsed().as_secs_f64();
    say!(
        "{{\"bytes\": {got}, \"seconds\": {dt:.6}, \"bytes_per_second\": {:.0}}}",
        got as f64 / dt
    );
    Ok(ExitCode::SUCCESS)
}
