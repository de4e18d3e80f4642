//! `tern migrate`, `tern save` and `tern restore`: drive a running tern through its QMP socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::client::QmpClient;
use crate::size::{human, parse_size};

/// Exit status of a migration that was cancelled (0 = completed, 1 = failed).
pub const EXIT_CANCELLED: u8 = 3;

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The source's QMP socket: unix:PATH.
    #[arg(long)]
    pub qmp: String,
    /// Where to: tcp:HOST:PORT, unix:PATH, fd:NAME, exec:COMMAND or file:PATH.
    pub uri: String,
    /// The longest acceptable pause of the guest, in milliseconds.
    #[arg(long)]
    pub downtime_limit: Option<u64>,
    /// Bandwidth cap per second: 256M, 1G... (a bare number is MiB); 0 = unlimited.
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// Throttle the vCPUs of a guest that dirties memory faster than the link carries it.
    #[arg(long)]
    pub auto_converge: bool,
    /// Send RAM over N parallel data channels (QEMU's multifd; tcp: and unix: only).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u8).range(1..))]
    pub multifd_channels: Option<u8>,
    /// Compress pages with data: none, lz4, zstd or zstd:LEVEL (QEMU's multifd-compression
    /// and multifd-zstd-level; tern compresses with or without channels).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<String>,
    /// Write the migration's timeline (every round, the downtime split) as JSON to FILE.
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// `normal` (the memory is copied) or `cpr-transfer` (QEMU's: to a tern on this host over a
    /// unix: socket, the memory is handed over, not copied; then the old tern exits: a live
    /// upgrade of tern under a running guest).
    #[arg(long, default_value = "normal", value_parser = ["normal", "cpr-transfer"])]
    pub mode: String,
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// The VM's QMP socket: unix:PATH.
    #[arg(long)]
    pub qmp: String,
    /// The file to write (`tern restore` reads it back).
    pub file: PathBuf,
    /// Compress pages with data: none, lz4, zstd or zstd:LEVEL (the stream layout only).
    #[arg(long, value_name = "ALGO")]
    pub compress: Option<String>,
    /// `stream` (the default: the migration stream as is) or `mapped` (every page at a fixed
    /// offset, with a CRC each: `tern restore --on-demand` needs it).
    #[arg(long, value_enum, default_value = "stream")]
    pub layout: Layout,
}

/// How `tern save` lays the guest out in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    Stream,
    Mapped,
}

/// `--compress ALGO[:LEVEL]` as migration parameters.
fn compression_params(s: &str, params: &mut serde_json::Map<String, Value>) -> Result<()> {
    let (algo, level) = match s.split_once(':') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    if !matches!(algo, "none" | "lz4" | "zstd") {
        bail!("--compress {s}: none, lz4, zstd or zstd:LEVEL");
    }
    params.insert("multifd-compression".into(), json!(algo));
    if let Some(l) = level {
        let n: u8 = match l.parse() {
            Ok(n) if algo == "zstd" && n <= 20 => n,
            _ => bail!("--compress {s}: a level is for zstd, 0 to 20"),
        };
        params.insert("multifd-zstd-level".into(), json!(n));
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A file written by `tern save` (or a migration to file:/exec:).
    pub file: PathBuf,
    /// What backs guest RAM, as for `tern run`.
    #[arg(long, default_value = "anon")]
    pub memory_backend: tern_vmm::MemoryBackend,
    /// Start the guest at once and read each page from the file when the guest first touches
    /// it, the rest in the background (a file saved with --layout mapped).
    #[arg(long)]
    pub on_demand: bool,
    /// The VM's disks, as for `tern run` (a saved file holds no disk: give the files the VM
    /// had, as the guest left them).
    #[arg(long = "disk", value_name = "path=FILE,...")]
    pub disks: Vec<String>,
    /// The VM's networks, as for `tern run` (the same MACs; the guest is announced on them).
    #[arg(long = "net", value_name = "tap=NAME,...")]
    pub nets: Vec<String>,
    #[command(flatten)]
    pub consoles: crate::run::Consoles,
}

fn qmp_path(s: &str) -> Result<PathBuf> {
    crate::run::parse_unix("--qmp", s)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// How a driven migration ended.
pub(crate) enum Outcome {
    Completed(Value),
    Failed(Value),
    Cancelled,
}

/// Polls `query-migrate` with a progress bar until the migration ends; Ctrl-C cancels it.
pub(crate) fn follow(qmp: &mut QmpClient, what: &str) -> Result<Outcome> {
    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    let mut cancel_sent = false;
    loop {
        if INTERRUPTED.load(Ordering::SeqCst) && !cancel_sent {
            bar.println("cancelling the migration (the source keeps running)");
            qmp.execute("migrate_cancel", json!({}))?;
            cancel_sent = true;
        }
        let m = qmp.execute("query-migrate", json!({}))?;
        let status = m["status"].as_str().unwrap_or("none").to_string();
        let ram = &m["ram"];
        let sent = ram["transferred"].as_u64().unwrap_or(0);
        let remaining = ram["remaining"].as_u64().unwrap_or(0);
        bar.set_length((sent + remaining).max(1));
        bar.set_position(sent);
        let mut msg = format!(
            "{status} round {} dirty {}/s exp. downtime {} ms",
            ram["dirty-sync-count"].as_u64().unwrap_or(0),
            human(ram["dirty-pages-rate"].as_u64().unwrap_or(0) * 4096),
            m["expected-downtime"].as_u64().unwrap_or(0),
        );
        if let Some(p) = m["cpu-throttle-percentage"].as_u64() {
            msg.push_str(&format!(" throttle {p}%"));
        }
        bar.set_message(msg);
        match status.as_str() {
            "completed" => {
                bar.finish_and_clear();
                return Ok(Outcome::Completed(m));
            }
            "failed" => {
                bar.abandon();
                return Ok(Outcome::Failed(m));
            }
            "cancelled" => {
                bar.abandon();
                return Ok(Outcome::Cancelled);
            }
            "none" => bail!("no migration is running"),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn summary(m: &Value) -> String {
    let ram = &m["ram"];
    let total = m["total-time"].as_u64().unwrap_or(0);
    let sent = ram["transferred"].as_u64().unwrap_or(0);
    format!(
        "total time {} ms, downtime {} ms, {} sent ({} pages with data, {} zero pages), {} rounds, {}/s on average",
        total,
        m["downtime"].as_u64().map_or("?".into(), |d| d.to_string()),
        human(sent),
        ram["normal"].as_u64().unwrap_or(0),
        ram["duplicate"].as_u64().unwrap_or(0),
        ram["dirty-sync-count"].as_u64().unwrap_or(0),
        human((sent * 1000).checked_div(total).unwrap_or(0)),
    )
}

fn exit_for(outcome: Outcome, verb: &str) -> ExitCode {
    match outcome {
        Outcome::Completed(m) => {
            say!("{verb} completed: {}", summary(&m));
            ExitCode::SUCCESS
        }
        Outcome::Failed(m) => {
            eprintln!(
                "tern: error: {verb} failed: {} (the source keeps running)",
                m["error-desc"].as_str().unwrap_or("no reason given")
            );
            ExitCode::FAILURE
        }
        Outcome::Cancelled => {
            eprintln!("tern: {verb} cancelled; the source keeps running");
            ExitCode::from(EXIT_CANCELLED)
        }
    }
}

/// From here on Ctrl-C cancels the migration rather than killing this process.
pub(crate) fn catch_ctrl_c() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGINT, on_sigint)
        .map_err(|e| anyhow::anyhow!("cannot catch Ctrl-C: {e}"))
}

pub fn migrate(args: MigrateArgs) -> Result<ExitCode> {
    catch_ctrl_c()?;
    let mut qmp = QmpClient::connect(&qmp_path(&args.qmp)?)?;
    let mut params = serde_json::Map::new();
    if let Some(d) = args.downtime_limit {
        params.insert("downtime-limit".into(), json!(d));
    }
    if let Some(b) = &args.max_bandwidth {
        let bytes = parse_size(b).map_err(|e| anyhow::anyhow!("--max-bandwidth {e}"))?;
        params.insert("max-bandwidth".into(), json!(bytes));
    }
    if let Some(n) = args.multifd_channels {
        params.insert("multifd-channels".into(), json!(n));
    }
    if let Some(c) = &args.compress {
        compression_params(c, &mut params)?;
    }
    if let Some(t) = &args.timeline {
        let abs = std::path::absolute(t).context("--timeline")?;
        params.insert("x-tern-timeline".into(), json!(abs.display().to_string()));
    }
    // Only when asked: an older tern (the one a live upgrade replaces) may not know `mode`.
    if args.mode != "normal" {
        params.insert("mode".into(), json!(args.mode));
    }
    if !params.is_empty() {
        qmp.execute("migrate-set-parameters", Value::Object(params))
            .context("setting the migration parameters")?;
    }
    let mut caps = Vec::new();
    if args.auto_converge {
        caps.push(json!({"capability": "auto-converge", "state": true}));
    }
    if args.multifd_channels.is_some() {
        caps.push(json!({"capability": "multifd", "state": true}));
    }
    if !caps.is_empty() {
        qmp.execute("migrate-set-capabilities", json!({ "capabilities": caps }))
            .context("setting the migration capabilities")?;
    }
    qmp.execute("migrate", json!({"uri": args.uri}))
        .context("starting the migration")?;
    let outcome = follow(&mut qmp, "migrate")?;
    let handed_over = args.mode == "cpr-transfer" && matches!(outcome, Outcome::Completed(_));
    let code = exit_for(outcome, "migration");
    if handed_over {
        // The guest runs in the new tern on the same memory; the old one has nothing left.
        qmp.execute("quit", json!({}))
            .context("asking the old tern to exit")?;
        say!("the old tern exits: the guest runs in the new one");
    }
    if let Some(t) = &args.timeline {
        say!("timeline: {}", t.display());
    }
    Ok(code)
}

/// `tern save`: the VM is stopped, its stream written to a temporary file beside the target and
/// renamed over it only once complete (an existing snapshot survives a failed save). Whatever way
/// the save fails — the VMM's error, Ctrl-C, this client losing the monitor — a VM that was
/// running is resumed.
pub fn save(args: SaveArgs) -> Result<ExitCode> {
    catch_ctrl_c()?;
    let mut qmp = QmpClient::connect(&qmp_path(&args.qmp)?)?;
    let abs = std::path::absolute(&args.file).context("the output file")?;
    let name = abs
        .file_name()
        .with_context(|| format!("{} names no file", abs.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = abs.with_file_name(format!(".{name}.tern-save-{}", std::process::id()));
    if args.layout == Layout::Mapped && args.compress.is_some() {
        bail!("--compress is for the stream layout: a mapped file holds every page as it is");
    }
    if let Some(c) = &args.compress {
        let mut params = serde_json::Map::new();
        compression_params(c, &mut params)?;
        qmp.execute("migrate-set-parameters", Value::Object(params))
            .context("setting the compression")?;
    }
    let was_running = qmp.execute("query-status", json!({}))?["running"] == json!(true);
    // Stopped first, the guest's RAM is written once (no re-sent pages in the file).
    qmp.execute("stop", json!({}))?;
    let uri = match args.layout {
        Layout::Stream => format!("file:{}", tmp.display()),
        // A writer of our own places each page at its offset as the stream arrives.
        Layout::Mapped => {
            let exe = std::env::current_exe().context("finding the tern binary")?;
            format!(
                "exec:{} x-write-mapped {}",
                shell_quote(&exe.to_string_lossy()),
                shell_quote(&tmp.to_string_lossy())
            )
        }
    };
    let outcome = qmp
        // blk false: a saved VM's disks stay in their files, as the guest left them.
        .execute("migrate", json!({"uri": uri, "blk": false}))
        .context("starting the save")
        .and_then(|_| follow(&mut qmp, "save"));
    let outcome = match outcome {
        Ok(Outcome::Completed(r)) => std::fs::rename(&tmp, &abs)
            .with_context(|| format!("moving the saved stream to {}", abs.display()))
            .map(|_| Outcome::Completed(r)),
        other => other,
    };
    if !matches!(outcome, Ok(Outcome::Completed(_))) {
        if outcome.is_err() {
            // This client failed mid-way: the save may still run. Stop it and let it end.
            let _ = qmp.execute("migrate_cancel", json!({}));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                match qmp.execute("query-migrate", json!({})) {
                    Ok(r)
                        if !matches!(
                            r["status"].as_str(),
                            Some("setup" | "active" | "cancelling")
                        ) =>
                    {
                        break
                    }
                    Ok(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
        }
        let _ = std::fs::remove_file(&tmp);
        if was_running {
            // The VM is left as it was. (After a completed save it stays stopped.)
            let _ = qmp.execute("cont", json!({}));
        }
    }
    if let Some(dir) = abs.parent() {
        // The rename itself on disk.
        let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    }
    let code = exit_for(outcome?, "save");
    if code == ExitCode::SUCCESS {
        let size = std::fs::metadata(&abs).map(|m| m.len()).unwrap_or(0);
        say!(
            "saved to {} ({}); the VM is stopped. Restore it with: tern restore {}",
            abs.display(),
            human(size),
            abs.display()
        );
    }
    Ok(code)
}

/// Quotes `s` for `sh -c` (the exec: URI's command line).
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

pub fn restore(args: RestoreArgs) -> Result<ExitCode> {
    if !args.file.is_file() {
        bail!("cannot restore {}: no such file", args.file.display());
    }
    let abs = std::path::absolute(&args.file).context("the saved file")?;
    if args.on_demand && !crate::machine::is_mapped(&abs) {
        bail!(
            "--on-demand needs a file saved with --layout mapped (pages at fixed offsets); {} is \
             a plain stream",
            abs.display()
        );
    }
    crate::run::run(crate::run::RunArgs {
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        memory: None,
        vcpus: None,
        memory_backend: args.memory_backend,
        dirty_ring_size: 0,
        consoles: args.consoles,
        incoming: Some(format!("file:{}", abs.display())),
        kvm_device: "/dev/kvm".into(),
        on_demand: args.on_demand,
        disks: args.disks,
        nets: args.nets,
        objects: vec![],
        paused: false,
    })
}
