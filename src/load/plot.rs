//! `--plot FILE.svg`: the latency percentile curve, drawn the way HdrHistogram plots
//! are read: the x axis is log-scaled in 1/(1-p), so 90%, 99%, 99.9% ... are evenly
//! spaced and the tail gets the room it deserves. Below it, the run over time:
//! requests/s and p99 of each second, so a stall or a ramp's knee shows where it
//! happened.

use std::fmt::Write as _;

use super::report::{human_us, Report};

const W: f64 = 800.0;
const H: f64 = 480.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
/// The axis ends at 99.9999% (six nines).
const NINES: f64 = 6.0;
/// The panel over time, below the curve: its height, and the room above it.
const PANEL: f64 = 300.0;
const GAP: f64 = 40.0;
const RPS_COLOR: &str = "#1f77b4";
const P99_COLOR: &str = "#d62728";

/// Renders the report's latency distribution as an SVG document.
pub fn svg(report: &Report) -> String {
    let hist = &report.stats.latency;
    let mut points: Vec<(f64, f64)> = Vec::new();
    if !hist.is_empty() {
        for v in hist.iter_quantiles(5) {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 {
                NINES
            } else {
                (1.0 / (1.0 - q)).log10().min(NINES)
            };
            points.push((x, v.value_iterated_to() as f64));
        }
    }
    let max_us = (hist.max() as f64).max(1.0) * 1.05;
    let px = |x: f64| LEFT + x / NINES * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / max_us * (H - TOP - BOTTOM);

    let mut s = String::new();
    let height = H + GAP + PANEL;
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="28" text-anchor="middle" font-size="15">Latency by percentile: {} ({:.0} requests/s)</text>
"##,
        W / 2.0,
        escape(&report.url),
        report.requests_per_sec()
    );
    // Axes and grid.
    for i in 0..=NINES as usize {
        let x = px(i as f64);
        let label = match i {
            0 => "0%".to_string(),
            n => format!("{}%", 100.0 - 100.0 / 10f64.powi(n as i32)),
        };
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0
        );
    }
    for i in 0..=5 {
        let v = max_us * i as f64 / 5.0;
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            human_us(v)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">latency</text>"##,
        W / 2.0,
        H - 14.0,
        H / 2.0,
        H / 2.0
    );
    let path: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
        path.join(" ")
    );
    over_time(&mut s, report, H + GAP);
    s.push_str("</svg>\n");
    s
}

/// The second panel, from `y0` down: requests/s (left axis) and p99 (right axis) of
/// each second, plotted at the second's end.
fn over_time(s: &mut String, report: &Report, y0: f64) {
    let seconds = &report.seconds;
    let (top, bottom) = (y0 + TOP, y0 + PANEL - BOTTOM);
    let span = seconds
        .last()
        .map_or(report.duration.as_secs_f64(), |l| l.elapsed_s)
        .max(1e-3);
    let max_rps = seconds
        .iter()
        .map(|x| x.requests_per_sec())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.05;
    let max_p99 = seconds
        .iter()
        .map(|x| x.p99_us as f64)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.05;
    let px = |t: f64| LEFT + t / span * (W - LEFT - RIGHT);
    let py = |v: f64, max: f64| bottom - v / max * (bottom - top);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{:.1}" text-anchor="middle" font-size="15">Over time: <tspan fill="{RPS_COLOR}">requests/s</tspan> and <tspan fill="{P99_COLOR}">p99 latency</tspan> of each second</text>"##,
        W / 2.0,
        y0 + 28.0
    );
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let y = py(f, 1.0);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="{RPS_COLOR}">{:.0}</text><text x="{:.1}" y="{:.1}" text-anchor="start" fill="{P99_COLOR}">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            max_rps * f,
            W - RIGHT + 2.0,
            y - 2.0,
            if i == 0 {
                String::new()
            } else {
                human_us(max_p99 * f)
            }
        );
    }
    // About ten labelled ticks on the time axis, on whole seconds.
    let every = ((span / 10.0).ceil() as u64).max(1);
    let mut t = 0;
    while t as f64 <= span + 1e-9 {
        let x = px(t as f64);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top:.1}" x2="{x:.1}" y2="{bottom:.1}" stroke="#eee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{t}s</text>"##,
            bottom + 18.0
        );
        t += every;
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{:.1}" text-anchor="middle">elapsed</text>"##,
        W / 2.0,
        y0 + PANEL - 14.0
    );
    let line = |f: &dyn Fn(&super::series::Second) -> f64, max: f64| -> String {
        seconds
            .iter()
            .map(|x| format!("{:.1},{:.1}", px(x.elapsed_s), py(f(x), max)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="{RPS_COLOR}" stroke-width="2" points="{}"/>"##,
        line(&|x| x.requests_per_sec(), max_rps)
    );
    let _ = writeln!(
        s,
        r##"<polyline fill="none" stroke="{P99_COLOR}" stroke-width="2" points="{}"/>"##,
        line(&|x| x.p99_us as f64, max_p99)
    );
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
