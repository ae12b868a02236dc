//! A picture of a simulation's results (`kvroute sim --svg FILE`): one SVG, three panels, one
//! line per policy, drawn from the results JSON ([`crate::run_all`]):
//!
//! - mean KV-cache use over the agents against simulated time;
//! - requests waiting in the gateways' queues against simulated time;
//! - the TTFT distribution (share of completed requests with TTFT ≤ x), with the TTFT target.
//!
//! Written by hand (a few dozen SVG elements), so no plotting dependency; non-finite values are
//! left out, and long timelines are thinned to at most [`MAX_POINTS`] points per line.

use std::fmt::Write as _;

use serde_json::Value;

/// Most points drawn per line.
pub const MAX_POINTS: usize = 1_000;

const WIDTH: f64 = 960.0;
const PANEL_H: f64 = 220.0;
const MARGIN_L: f64 = 70.0;
const MARGIN_R: f64 = 170.0;
const MARGIN_T: f64 = 30.0;
const GAP: f64 = 60.0;
const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// One panel's lines: (policy index, points).
type Lines = Vec<(usize, Vec<(f64, f64)>)>;

/// The SVG of `results` (the JSON `kvroute sim --json` writes). Errors name what is missing.
pub fn svg(results: &Value) -> Result<String, String> {
    let runs = results["runs"]
        .as_array()
        .ok_or("the results have no \"runs\" array")?;
    if runs.is_empty() {
        return Err("the results have no runs to draw".into());
    }
    let names: Vec<String> = runs
        .iter()
        .map(|r| r["policy"].as_str().unwrap_or("?").to_string())
        .collect();
    let timeline = |r: &Value, col: usize| -> Vec<(f64, f64)> {
        r["kv_timeline"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .filter_map(|row| Some((row.get(0)?.as_f64()?, row.get(col)?.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let kv: Lines = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (i, timeline(r, 1)))
        .collect();
    let queued: Lines = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (i, timeline(r, 3)))
        .collect();
    let cdf: Lines = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let q: Vec<f64> = r["ttft_quantiles"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            let n = q.len().saturating_sub(1).max(1) as f64;
            let mut pts: Vec<(f64, f64)> = q
                .iter()
                .enumerate()
                .map(|(k, &t)| (t, k as f64 / n))
                .collect();
            if !pts.is_empty() {
                // All of them by the right edge: the line runs on at 1.
                pts.push((f64::MAX, 1.0));
            }
            (i, pts)
        })
        .collect();
    let ttft_slo = results["slo"]["ttft_s"].as_f64().filter(|t| t.is_finite());
    let end_s = max_of(
        kv.iter()
            .chain(&queued)
            .flat_map(|(_, p)| p.iter().map(|p| p.0)),
    );
    let queued_max = max_of(queued.iter().flat_map(|(_, p)| p.iter().map(|p| p.1)));
    // The TTFT axis up to the largest policy's p99 (the long tail would flatten the rest),
    // and past the target so that it shows.
    let p99 = max_of(runs.iter().filter_map(|r| r["ttft_p99_s"].as_f64()));
    let ttft_max = (p99 * 1.2).max(ttft_slo.unwrap_or(0.0) * 1.2);

    let height = height();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="white"/>"#
    );
    let title = format!(
        "kvroute sim: {} agents, {} gateway(s), seed {}",
        results["agents"].as_u64().unwrap_or(0),
        results["gateways"].as_u64().unwrap_or(0),
        results["seed"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        r#"<text x="{MARGIN_L}" y="18" font-size="14" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    let panels = [
        (
            "Mean KV-cache use over the agents",
            "simulated time (s)",
            kv,
            end_s,
            1.0,
            None,
        ),
        (
            "Requests waiting in the gateways' queues",
            "simulated time (s)",
            queued,
            end_s,
            queued_max.max(1.0),
            None,
        ),
        (
            "Share of completed requests with TTFT ≤ x (dashed: the TTFT target)",
            "time to first token (s)",
            cdf,
            ttft_max,
            1.0,
            ttft_slo,
        ),
    ];
    for (k, (title, x_label, lines, x_max, y_max, vline)) in panels.iter().enumerate() {
        let top = MARGIN_T + GAP * 0.5 + k as f64 * (PANEL_H + GAP);
        panel(
            &mut out,
            top,
            title,
            x_label,
            lines,
            (*x_max).max(1e-9),
            *y_max,
            *vline,
        );
    }
    for (i, name) in names.iter().enumerate() {
        let y = MARGIN_T + GAP * 0.5 + 14.0 + i as f64 * 18.0;
        let x = WIDTH - MARGIN_R + 20.0;
        let _ = writeln!(
            out,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            x + 24.0,
            COLORS[i % COLORS.len()],
            x + 30.0,
            y + 4.0,
            escape(name)
        );
    }
    out.push_str("</svg>\n");
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn panel(
    out: &mut String,
    top: f64,
    title: &str,
    x_label: &str,
    lines: &Lines,
    x_max: f64,
    y_max: f64,
    vline: Option<f64>,
) {
    let (left, right) = (MARGIN_L, WIDTH - MARGIN_R);
    let bottom = top + PANEL_H;
    let sx = |x: f64| left + (x / x_max).clamp(0.0, 1.0) * (right - left);
    let sy = |y: f64| bottom - (y / y_max).clamp(0.0, 1.0) * PANEL_H;
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
        top - 8.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{}" height="{PANEL_H}" fill="none" stroke="#999"/>"##,
        right - left
    );
    for t in 0..=4 {
        let f = f64::from(t) / 4.0;
        let (x, y) = (left + f * (right - left), bottom - f * PANEL_H);
        let _ = writeln!(
            out,
            r##"<text x="{x}" y="{}" text-anchor="middle" fill="#555">{}</text><text x="{}" y="{}" text-anchor="end" fill="#555">{}</text>"##,
            bottom + 16.0,
            tick(f * x_max),
            left - 6.0,
            y + 4.0,
            tick(f * y_max)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#333">{}</text>"##,
        (left + right) / 2.0,
        bottom + 34.0,
        escape(x_label)
    );
    if let Some(v) = vline {
        let x = sx(v);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#444" stroke-dasharray="5,4"/>"##
        );
    }
    for (i, points) in lines {
        let finite: Vec<(f64, f64)> = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if finite.is_empty() {
            continue;
        }
        let step = finite.len().div_ceil(MAX_POINTS).max(1);
        let mut path = String::new();
        for (k, &(x, y)) in finite.iter().enumerate() {
            if k % step == 0 || k + 1 == finite.len() {
                let _ = write!(path, "{:.1},{:.1} ", sx(x), sy(y));
            }
        }
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            COLORS[i % COLORS.len()],
            path.trim_end()
        );
    }
}

/// The picture's height: three panels, each with its title above and axis label below.
fn height() -> f64 {
    MARGIN_T + 3.0 * (PANEL_H + GAP) + 20.0
}

fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0, f64::max)
}

/// An axis label: few digits, no trailing zeros.
fn tick(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn results() -> Value {
        let timeline: Vec<Value> = (0..3000)
            .map(|i| json!([f64::from(i) * 0.01, 0.5, 0.9, i % 7]))
            .collect();
        json!({
            "agents": 4, "gateways": 1, "seed": 3,
            "slo": {"ttft_s": 2.0, "tpot_s": 0.05},
            "runs": [
                {"policy": "kv", "ttft_p99_s": 1.5, "kv_timeline": timeline,
                 "ttft_quantiles": (0..=100).map(|k| f64::from(k) * 0.015).collect::<Vec<_>>()},
                {"policy": "round<robin>", "ttft_p99_s": 3.0,
                 "kv_timeline": [[0.0, 0.2, 0.4, 1], [1.0, f64::NAN, 0.5, 2], [2.0, 0.3, 0.5, 0]],
                 "ttft_quantiles": (0..=100).map(|k| f64::from(k) * 0.03).collect::<Vec<_>>()},
            ]
        })
    }

    /// Every `x,y` pair of every polyline.
    fn points(svg: &str) -> Vec<(f64, f64)> {
        svg.split("points=\"")
            .skip(1)
            .flat_map(|rest| {
                rest.split('"')
                    .next()
                    .unwrap_or("")
                    .split(' ')
                    .filter_map(|p| {
                        let (x, y) = p.split_once(',')?;
                        Some((x.parse().ok()?, y.parse().ok()?))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn three_panels_one_line_per_policy_inside_the_picture() {
        let svg = svg(&results()).unwrap();
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 6, "3 panels × 2 policies");
        assert!(svg.contains(">kv</text>"));
        assert!(svg.contains("round&lt;robin&gt;"), "names are escaped");
        assert!(svg.contains("stroke-dasharray"), "the TTFT target is drawn");
        let pts = points(&svg);
        assert!(!pts.is_empty());
        for (x, y) in pts {
            assert!(
                (0.0..=WIDTH).contains(&x) && (0.0..=height()).contains(&y),
                "{x},{y}"
            );
        }
        // Every text line is inside the picture too (the last axis label included).
        for t in svg.split("<text").skip(1) {
            let y: f64 = t
                .split("y=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(y <= height(), "{t}");
        }
        // 3,000 timeline samples are thinned; the NaN sample is left out.
        let longest = svg
            .split("<polyline")
            .skip(1)
            .map(|l| l.split(' ').filter(|p| p.contains(',')).count())
            .max()
            .unwrap();
        assert!(longest <= MAX_POINTS + 1, "{longest}");
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn results_without_runs_are_an_error_not_a_panic() {
        assert!(svg(&json!({})).is_err());
        assert!(svg(&json!({"runs": []})).is_err());
        // A run with nothing to draw still gives a picture (with no line for it).
        let svg = svg(&json!({"runs": [{"policy": "kv"}]})).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 0);
        assert!(svg.contains(">kv</text>"));
    }
}
