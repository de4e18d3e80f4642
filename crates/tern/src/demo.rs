//! `tern demo`: boot the built-in guest, start a target tern, migrate live over tcp on loopback
//! with a progress bar, show the guest carrying on at the target, and report.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};

use crate::client::QmpClient;
use crate::size::human;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1G")]
    pub memory: String,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Working set the guest keeps dirtying, in MiB.
    #[arg(long, default_value_t = 256)]
    pub wss: u64,
    /// How fast the guest dirties its working set, in MiB/s.
    #[arg(long, default_value_t = 128)]
    pub rate: u64,
    /// Where the logs, the timeline and the report go (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The two tern processes; killed if the demo stops early.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Waits until `path` has a line matching `pred` (after the first `skip` lines).
fn wait_line(
    path: &Path,
    skip: usize,
    timeout: Duration,
    children: &mut Children,
    pred: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = lines(path).into_iter().skip(skip).find(|l| pred(l)) {
            return Ok(l);
        }
        for c in &mut children.0 {
            if let Ok(Some(status)) = c.try_wait() {
                bail!(
                    "a tern process exited early ({status}); see {}",
                    path.display()
                );
            }
        }
        if Instant::now() > deadline {
            bail!("timed out waiting in {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hb(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("tern-guest hb ")?;
    let (n, g) = rest.split_once(" gap_us=")?;
    Some((n.parse().ok()?, g.trim().parse().ok()?))
}

fn connect(path: &Path, timeout: Duration) -> Result<QmpClient> {
    let deadline = Instant::now() + timeout;
    loop {
        match QmpClient::connect(path) {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

pub fn demo(args: DemoArgs) -> Result<ExitCode> {
    let dir = match args.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("tern-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::path::absolute(&dir)?;
    let exe = std::env::current_exe().context("cannot find the tern executable")?;
    let (src_log, dst_log) = (dir.join("source.log"), dir.join("target.log"));
    let (src_qmp, dst_qmp) = (dir.join("source.qmp"), dir.join("target.qmp"));
    let timeline = dir.join("timeline.json");
    for f in [&src_log, &dst_log, &timeline] {
        let _ = std::fs::remove_file(f);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let cmdline = format!(
        "tern.wss={} tern.rate={} tern.hb=100 tern.check=2",
        args.wss, args.rate
    );

    say!(
        "tern demo: a {} guest with {} vCPUs dirtying {} MiB/s of a {} MiB working set, migrated live to a second tern over {uri}",
        args.memory, args.vcpus, args.rate, args.wss
    );
    say!("  logs, timeline and report in {}", dir.display());
    let spawn = |args: Vec<String>| {
        Command::new(&exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start tern")
    };
    let mut children = Children(Vec::new());
    children.0.push(spawn(vec![
        "run".into(),
        "--memory".into(),
        args.memory.clone(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--cmdline".into(),
        cmdline,
        "--qmp".into(),
        format!("unix:{}", src_qmp.display()),
        "--serial".into(),
        format!("file:{}", src_log.display()),
    ])?);
    children.0.push(spawn(vec![
        "run".into(),
        "--incoming".into(),
        uri.clone(),
        "--qmp".into(),
        format!("unix:{}", dst_qmp.display()),
        "--serial".into(),
        format!("file:{}", dst_log.display()),
    ])?);

    let t0 = Instant::now();
    wait_line(&src_log, 0, Duration::from_secs(120), &mut children, |l| {
        l == "tern-guest ready"
    })?;
    say!(
        "source: guest ready after {:.2} s (its RAM filled by the guest itself)",
        t0.elapsed().as_secs_f64()
    );
    // Let it run (and dirty) for a moment, then show its heartbeat.
    std::thread::sleep(Duration::from_millis(1500));
    let check = wait_line(&src_log, 0, Duration::from_secs(30), &mut children, |l| {
        l.starts_with("tern-guest check")
    })?;
    let last = lines(&src_log)
        .into_iter()
        .rev()
        .find(|l| hb(l).is_some())
        .unwrap_or_default();
    say!("source: {last}   ({check})");

    let mut src = connect(&src_qmp, Duration::from_secs(30))?;
    let mut dst = connect(&dst_qmp, Duration::from_secs(30))?;
    src.execute(
        "migrate-set-parameters",
        json!({"x-tern-timeline": timeline.display().to_string()}),
    )?;
    crate::drive::catch_ctrl_c()?;
    src.execute("migrate", json!({"uri": uri}))?;
    let m = match crate::drive::follow(&mut src, "migrate")? {
        crate::drive::Outcome::Completed(m) => m,
        crate::drive::Outcome::Failed(m) => bail!(
            "the migration failed: {}",
            m["error-desc"].as_str().unwrap_or("no reason given")
        ),
        crate::drive::Outcome::Cancelled => {
            say!("migration cancelled; the source keeps running (Ctrl-C again stops the demo)");
            return Ok(ExitCode::from(crate::drive::EXIT_CANCELLED));
        }
    };
    let src_hb = lines(&src_log)
        .iter()
        .rev()
        .find_map(|l| hb(l))
        .map_or(0, |h| h.0);

    // The guest at the target: the next heartbeats, and a full self-check.
    let first = wait_line(&dst_log, 0, Duration::from_secs(30), &mut children, |l| {
        hb(l).is_some()
    })?;
    let (first_n, felt_us) = hb(&first).unwrap_or((0, 0));
    std::thread::sleep(Duration::from_millis(300));
    say!("target: the guest carries on where the source stopped (source's last heartbeat: {src_hb}):");
    for l in lines(&dst_log).iter().filter(|l| hb(l).is_some()).take(3) {
        say!("  {l}");
    }
    let ok = wait_line(&dst_log, 0, Duration::from_secs(30), &mut children, |l| {
        l.starts_with("tern-guest check")
    })?;
    say!("  {ok}");
    if !ok.starts_with("tern-guest check ok") {
        bail!("the guest's self-check failed at the target: {ok}");
    }

    let report = crate::report::report(&timeline, None)?;
    let ram = &m["ram"];
    say!("\nsummary");
    say!(
        "  total time          {} ms ({} rounds of precopy, then stop-and-copy)",
        m["total-time"],
        ram["dirty-sync-count"]
            .as_u64()
            .unwrap_or(1)
            .saturating_sub(1)
    );
    say!(
        "  downtime            {} ms measured by tern (pause to the target's acknowledgement)",
        m["downtime"]
    );
    say!(
        "  downtime as felt    {:.1} ms: the longest stall the guest saw around the switch (heartbeat {first_n})",
        felt_us as f64 / 1000.0
    );
    say!(
        "  bytes               {} on the wire; {} pages with data, {} zero pages sent as ranges",
        human(ram["transferred"].as_u64().unwrap_or(0)),
        ram["normal"],
        ram["duplicate"]
    );
    say!(
        "  guest self-check    passed at the target: every page of the working set holds what the guest last wrote"
    );
    say!("  report              {}", report.display());
    let _ = src.execute("quit", Value::Null);
    let _ = dst.execute("quit", Value::Null);
    std::thread::sleep(Duration::from_millis(200));
    Ok(ExitCode::SUCCESS)
}
