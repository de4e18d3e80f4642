//! `tern`: boot a guest under KVM, drive it over QMP, and (soon) migrate it live.

/// Prints a line to stdout; a closed stdout (`tern analyze f | head`) is not an error worth a
/// panic, so write errors are ignored.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

mod backend;
mod cli;
mod client;
mod demo;
mod drive;
mod hmp;
mod machine;
mod objects;
mod report;
mod run;
mod size;
mod stream;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = cli::Cli::parse();
    let code = match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern: error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The guest's last console lines are still on their way out (the vCPUs never wait for the
    // console): give them a moment.
    tern_vmm::serial::drain_consoles(std::time::Duration::from_secs(2));
    code
}
