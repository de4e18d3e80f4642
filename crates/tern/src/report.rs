//! `tern report TIMELINE.json`: a migration's timeline as an SVG — bandwidth and dirty rate
//! over time, rounds marked, the downtime window shaded, the downtime split in a bar, and a
//! table of the rounds. Hand-written SVG: no dependency, and the file stays small and readable.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

const W: f64 = 1000.0;
const PLOT_X: f64 = 70.0;
const PLOT_W: f64 = 820.0;
const PLOT_Y: f64 = 60.0;
const PLOT_H: f64 = 300.0;
const MIB: f64 = 1048576.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

/// A "nice" axis maximum: 1, 2 or 5 times a power of ten, at least `v`.
fn nice(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// Renders the timeline; errors name what is missing.
pub fn render(t: &Value) -> Result<String> {
    if t.get("tern-timeline").and_then(Value::as_u64) != Some(1) {
        bail!("not a tern timeline (no \"tern-timeline\": 1)");
    }
    let rounds = t["rounds"].as_array().cloned().unwrap_or_default();
    let sw = t.get("switchover").filter(|v| v.is_object());
    let total_s = (f(t, "total-time-ms") / 1000.0).max(
        rounds.last().map(|r| f(r, "end")).unwrap_or(0.0).max(
            sw.map(|s| f(s, "start") + f(s, "ack-ms") / 1000.0)
                .unwrap_or(0.0),
        ),
    );
    let total_s = if total_s > 0.0 { total_s } else { 1.0 };
    let postcopy_peak = t["postcopy-series"]
        .as_array()
        .map(|a| a.iter().map(|p| f(p, "mib-per-s")).fold(0.0, f64::max))
        .unwrap_or(0.0);
    let ymax = nice(
        (rounds
            .iter()
            .map(|r| f(r, "bandwidth").max(f(r, "dirty-rate")))
            .fold(0.0, f64::max)
            / MIB)
            .max(postcopy_peak),
    );
    let x = |s: f64| PLOT_X + s / total_s * PLOT_W;
    let y = |mib: f64| PLOT_Y + PLOT_H - (mib / ymax).min(1.0) * PLOT_H;
    let table_y = PLOT_Y + PLOT_H + 170.0;
    let height = table_y + 30.0 + 18.0 * rounds.len() as f64 + 20.0;

    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
"##
    );
    let status = t["status"].as_str().unwrap_or("?");
    let downtime = t["downtime-ms"]
        .as_u64()
        .map_or("-".to_string(), |d| format!("{d} ms"));
    let _ = writeln!(
        s,
        r#"<text x="{PLOT_X}" y="22" font-size="16" font-weight="bold">tern migration to {}: {status}</text>"#,
        esc(t["uri"].as_str().unwrap_or("?")),
    );
    let why = match (t["stop-reason"].as_str(), t["error"].as_str()) {
        (_, Some(e)) => format!("; {}", esc(e)),
        (Some(r), None) => format!("; precopy stopped: {}", esc(r)),
        _ => String::new(),
    };
    // Parallel channels: how the data channels shared the stream.
    let channels: Vec<f64> = t["multifd-channel-bytes"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let why = if channels.is_empty() {
        why
    } else {
        let each: Vec<String> = channels.iter().map(|b| format!("{:.0}", b / MIB)).collect();
        let busy: Vec<String> = t["multifd-channel-busy-ms"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_u64)
                    .map(|b| b.to_string())
                    .collect()
            })
            .unwrap_or_default();
        format!(
            "{why}; {} data channels, MiB each: {}, busy ms each: {}",
            channels.len(),
            each.join(" / "),
            busy.join(" / ")
        )
    };
    let _ = writeln!(
        s,
        r##"<text x="{PLOT_X}" y="42" fill="#333">{:.0} ms total, downtime {downtime}, {:.1} MiB sent, {} rounds{why}</text>"##,
        f(t, "total-time-ms"),
        f(t, "transferred") / MIB,
        rounds.len()
    );
    // Axes and grid.
    for i in 0..=5 {
        let v = ymax * f64::from(i) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{PLOT_X}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            PLOT_X + PLOT_W,
            PLOT_X - 6.0,
            yy + 4.0
        );
    }
    for i in 0..=10 {
        let sec = total_s * f64::from(i) / 10.0;
        let xx = x(sec);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#999"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{sec:.2}</text>"##,
            PLOT_Y + PLOT_H,
            PLOT_Y + PLOT_H + 5.0,
            PLOT_Y + PLOT_H + 18.0
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the migration began (s)</text>
<text x="18" y="{:.1}" transform="rotate(-90 18 {:.1})" text-anchor="middle">MiB/s</text>
<rect x="{PLOT_X}" y="{PLOT_Y}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#333"/>"##,
        PLOT_X + PLOT_W / 2.0,
        PLOT_Y + PLOT_H + 36.0,
        PLOT_Y + PLOT_H / 2.0,
        PLOT_Y + PLOT_H / 2.0
    );
    // Rounds: shaded alternately, numbered.
    for (i, r) in rounds.iter().enumerate() {
        let (x0, x1) = (x(f(r, "start")), x(f(r, "end")));
        if i % 2 == 0 {
            let _ = writeln!(
                s,
                r##"<rect x="{x0:.1}" y="{PLOT_Y}" width="{:.1}" height="{PLOT_H}" fill="#f0f4ff"/>"##,
                (x1 - x0).max(0.5)
            );
        }
        let _ = writeln!(
            s,
            r##"<line x1="{x0:.1}" y1="{PLOT_Y}" x2="{x0:.1}" y2="{:.1}" stroke="#88a" stroke-dasharray="3,3"/>"##,
            PLOT_Y + PLOT_H
        );
        if x1 - x0 > 14.0 || rounds.len() <= 12 {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#446" text-anchor="middle">R{}</text>"##,
                (x0 + x1) / 2.0,
                PLOT_Y + 12.0,
                r["round"].as_u64().unwrap_or(i as u64 + 1)
            );
        }
    }
    // Downtime window.
    if let Some(sw) = sw {
        let start = f(sw, "start");
        let end = start + f(sw, "ack-ms") / 1000.0;
        let (x0, x1) = (x(start), x(end));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{PLOT_Y}" width="{:.1}" height="{PLOT_H}" fill="#e33" fill-opacity="0.35"/>
<text x="{:.1}" y="{:.1}" fill="#b00" text-anchor="end">downtime {:.1} ms ▶</text>"##,
            (x1 - x0).max(2.0),
            x0 - 3.0,
            PLOT_Y + 28.0,
            f(sw, "ack-ms")
        );
    }
    // Postcopy: from RUN to the end the guest ran on the target while its pages moved.
    if let Some(pc) = t.get("postcopy-start").and_then(Value::as_f64) {
        let (x0, x1) = (x(pc), x(total_s));
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{PLOT_Y}" width="{:.1}" height="{PLOT_H}" fill="#9467bd" fill-opacity="0.15"/>
<text x="{:.1}" y="{:.1}" fill="#6a3d9a">postcopy: {:.0} page requests, {:.1} MiB{}</text>"##,
            (x1 - x0).max(2.0),
            x0 + 3.0,
            PLOT_Y + 44.0,
            f(t, "postcopy-requests"),
            f(t, "postcopy-bytes") / MIB,
            t["auto-postcopy"]
                .as_str()
                .map(|why| format!(" (auto: {})", esc(why)))
                .unwrap_or_default()
        );
        // What went after RUN, in the plot's unit (MiB/s).
        let pts: String = t["postcopy-series"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| format!("{:.1},{:.1} ", x(f(p, "t")), y(f(p, "mib-per-s"))))
                    .collect()
            })
            .unwrap_or_default();
        if !pts.is_empty() {
            let _ = writeln!(
                s,
                r##"<polyline points="{pts}" fill="none" stroke="#6a3d9a" stroke-width="1.5"/>"##
            );
        }
    }
    // Series: step lines per round.
    for (key, color, label, dy) in [
        (
            "bandwidth",
            "#1f77b4",
            "bandwidth (bytes sent / round time)",
            0.0,
        ),
        (
            "dirty-rate",
            "#d62728",
            "dirty rate (pages found dirty / sync interval)",
            16.0,
        ),
    ] {
        let mut pts = String::new();
        for r in &rounds {
            let v = f(r, key) / MIB;
            let _ = write!(
                pts,
                "{:.1},{:.1} {:.1},{:.1} ",
                x(f(r, "start")),
                y(v),
                x(f(r, "end")),
                y(v)
            );
        }
        let _ = writeln!(
            s,
            r##"<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>
<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{label}</text>"##,
            PLOT_X + 10.0,
            PLOT_Y + PLOT_H + 56.0 + dy,
            PLOT_X + 34.0,
            PLOT_Y + PLOT_H + 56.0 + dy,
            PLOT_X + 40.0,
            PLOT_Y + PLOT_H + 60.0 + dy
        );
    }
    // The downtime split, as a stacked bar.
    if let Some(sw) = sw {
        let d = &sw["downtime"];
        let parts = [
            ("pause", "#9467bd"),
            ("final-sync", "#bcbd22"),
            ("final-pages", "#ff7f0e"),
            ("device-state", "#2ca02c"),
            ("end", "#8c564b"),
            ("target-load", "#17becf"),
            ("commit-and-run", "#e377c2"),
        ];
        let total = f(d, "total").max(1e-9);
        let bar_y = PLOT_Y + PLOT_H + 88.0;
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">downtime split</text>"##,
            PLOT_X + 400.0,
            bar_y + 12.0
        );
        let mut bx = PLOT_X + 410.0;
        let bw = PLOT_W - 410.0;
        for (i, (k, color)) in parts.iter().enumerate() {
            let v = f(d, k);
            let w = v / total * bw;
            let _ = writeln!(
                s,
                r##"<rect x="{bx:.1}" y="{bar_y:.1}" width="{:.2}" height="16" fill="{color}"/>"##,
                w.max(0.0)
            );
            bx += w;
            // The legend: a swatch and the value, three to a row.
            let lx = PLOT_X + 410.0 + (i % 3) as f64 * 140.0;
            let ly = bar_y + 34.0 + (i / 3) as f64 * 16.0;
            let _ = writeln!(
                s,
                r##"<rect x="{lx:.1}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{:.1}" y="{ly:.1}" font-size="11">{k} {v:.2} ms</text>"##,
                ly - 9.0,
                lx + 14.0
            );
        }
    }
    // The rounds as a table.
    let cols = [
        ("round", 0.0),
        ("start s", 60.0),
        ("end s", 130.0),
        ("pages", 200.0),
        ("zero pages", 280.0),
        ("MiB sent", 370.0),
        ("dirty pages", 450.0),
        ("MiB/s", 540.0),
        ("dirty MiB/s", 610.0),
        ("exp. downtime ms", 700.0),
        ("throttle %", 810.0),
        ("sync/rearm ms", 880.0),
    ];
    for (name, dx) in cols {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{table_y:.1}" font-weight="bold">{name}</text>"#,
            PLOT_X - 40.0 + dx
        );
    }
    s.push('\n');
    for (i, r) in rounds.iter().enumerate() {
        let ty = table_y + 18.0 * (i as f64 + 1.0);
        let vals = [
            r["round"].to_string(),
            format!("{:.3}", f(r, "start")),
            format!("{:.3}", f(r, "end")),
            format!("{:.0}", f(r, "pages")),
            format!("{:.0}", f(r, "zero-pages")),
            format!("{:.1}", f(r, "bytes") / MIB),
            format!("{:.0}", f(r, "dirty-pages")),
            format!("{:.0}", f(r, "bandwidth") / MIB),
            format!("{:.0}", f(r, "dirty-rate") / MIB),
            format!("{:.1}", f(r, "expected-downtime-ms")),
            format!("{:.0}", f(r, "cpu-throttle-percentage")),
            format!("{:.2}/{:.2}", f(r, "sync-ms"), f(r, "rearm-ms")),
        ];
        for ((_, dx), v) in cols.iter().zip(vals) {
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{ty:.1}">{}</text>"#,
                PLOT_X - 40.0 + dx,
                esc(&v)
            );
        }
        s.push('\n');
    }
    s.push_str("</svg>\n");
    Ok(s)
}

/// `tern report`: reads the timeline, writes the SVG next to it (or to `out`), returns its path.
pub fn report(input: &Path, out: Option<PathBuf>) -> Result<PathBuf> {
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("cannot read {}", input.display()))?;
    let t: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", input.display()))?;
    let svg = render(&t).with_context(|| format!("{}", input.display()))?;
    let out = out.unwrap_or_else(|| input.with_extension("svg"));
    std::fs::write(&out, svg).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_rounds_and_the_downtime_window() {
        let t = json!({
            "tern-timeline": 1, "status": "completed", "total-time-ms": 1200, "downtime-ms": 12,
            "transferred": 300_000_000u64, "stop-reason": "converged", "uri": "tcp:a<b:1",
            "rounds": [
                {"round": 1, "start": 0.01, "end": 0.9, "pages": 60000, "zero-pages": 100,
                 "bytes": 250_000_000u64, "dirty-pages": 5000, "bandwidth": 280e6,
                 "dirty-rate": 22e6, "expected-downtime-ms": 80.0, "cpu-throttle-percentage": 0},
                {"round": 2, "start": 0.9, "end": 1.0, "pages": 5000, "zero-pages": 0,
                 "bytes": 20_000_000u64, "dirty-pages": 400, "bandwidth": 200e6,
                 "dirty-rate": 16e6, "expected-downtime-ms": 9.0, "cpu-throttle-percentage": 20}
            ],
            "switchover": {"start": 1.0, "ack-ms": 12.0, "downtime": {"pause": 0.1,
                "final-sync": 0.4, "final-pages": 7.6, "device-state": 0.3, "end": 0.1,
                "target-load": 3.0, "commit-and-run": 0.5, "total": 12.0}}
        });
        let svg = render(&t).unwrap();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("downtime 12.0 ms"));
        assert!(svg.contains(">R2<"));
        assert!(svg.contains("tcp:a&lt;b:1"), "escaped");
        assert!(svg.contains("target-load 3.00 ms"));
        assert!(svg.contains("commit-and-run 0.50 ms"));
        assert!(svg.contains("final-sync 0.40 ms"));
        assert!(svg.contains("precopy stopped: converged"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(render(&json!({"rounds": []})).is_err());
        // A failed migration without a switch-over still renders.
        let failed = json!({"tern-timeline": 1, "status": "failed", "rounds": [],
                            "error": "precopy did not converge"});
        assert!(render(&failed).unwrap().contains("did not converge"));
    }

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(3.2), 5.0);
        assert_eq!(nice(270.0), 500.0);
        assert_eq!(nice(1000.0), 1000.0);
    }
}
