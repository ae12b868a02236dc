//! Prometheus metrics in the text exposition format (0.0.4): the one writer the agent, the gateway
//! and the operator render their `/metrics` with, and the one histogram they record into.
//!
//! A metric family is written as `# HELP` and `# TYPE` lines ([`header`]) followed by its samples
//! ([`sample`]); [`counter`] and [`gauge`] do both for a family of one sample. Label values and
//! help texts are escaped as the format requires; values are printed as integers when they are
//! whole, `NaN` / `+Inf` / `-Inf` when not finite. Writing to a `String` cannot fail, so nothing
//! here returns an error.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A fixed-bucket histogram. Recording takes a short uncontended mutex; rendering copies the
/// state under it, so a scrape never holds the lock while it formats.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<HistState>,
}

#[derive(Debug, Clone)]
struct HistState {
    /// Per-bucket (not cumulative) counts; the last entry is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending; `+Inf` is added).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            inner: Mutex::new(HistState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
                count: 0,
            }),
        }
    }

    /// Records one value (a NaN lands in `+Inf` and makes the sum NaN, as in Prometheus' own
    /// clients).
    pub fn observe(&self, v: f64) {
        let idx = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        s.counts[idx] += 1;
        s.sum += v;
        s.count += 1;
    }

    /// Records a duration in seconds.
    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count
    }

    /// Writes the family: header, cumulative `_bucket` samples (with `le`), `_sum`, `_count`.
    pub fn write(&self, out: &mut String, name: &str, help: &str, labels: &[(&str, &str)]) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone();
        header(out, name, help, "histogram");
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, c) in s.counts.iter().enumerate() {
            cumulative += c;
            let le = match self.bounds.get(i) {
                Some(b) => format_float(*b),
                None => "+Inf".to_string(),
            };
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            sample(out, &bucket, &l, cumulative as f64);
        }
        sample(out, &format!("{name}_sum"), labels, s.sum);
        sample(out, &format!("{name}_count"), labels, s.count as f64);
    }
}

/// The `# HELP` and `# TYPE` lines of a family (`kind`: counter, gauge, histogram).
pub fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A gauge family of one sample.
pub fn gauge(out: &mut String, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
    header(out, name, help, "gauge");
    sample(out, name, labels, v);
}

/// A counter family of one sample.
pub fn counter(out: &mut String, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
    header(out, name, help, "counter");
    sample(out, name, labels, v);
}

/// One sample line: `name{k="v",...} value`.
pub fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], v: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, val)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(val));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {}", format_float(v));
}

/// A label value escapes backslash, double quote and newline.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// A help text escapes backslash and newline.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value or bucket bound: whole numbers without a fraction, Go's spellings of the
/// non-finite ones.
pub fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_writes_cumulative_buckets_sum_and_count() {
        static B: &[f64] = &[0.5, 1.0, 2.5];
        let h = Histogram::new(B);
        for v in [0.1, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        h.observe_duration(Duration::from_millis(2_000));
        assert_eq!(h.count(), 5);
        let mut out = String::new();
        h.write(&mut out, "x_seconds", "Time.", &[("model", "m")]);
        assert_eq!(
            out,
            "# HELP x_seconds Time.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{model=\"m\",le=\"0.5\"} 2\n\
             x_seconds_bucket{model=\"m\",le=\"1\"} 3\n\
             x_seconds_bucket{model=\"m\",le=\"2.5\"} 4\n\
             x_seconds_bucket{model=\"m\",le=\"+Inf\"} 5\n\
             x_seconds_sum{model=\"m\"} 6.3\n\
             x_seconds_count{model=\"m\"} 5\n"
        );
    }

    #[test]
    fn labels_and_help_are_escaped_and_values_formatted() {
        let mut out = String::new();
        counter(
            &mut out,
            "c_total",
            "Line one\nback\\slash",
            &[("a", "q\"uote\\n\nl")],
            3.0,
        );
        gauge(&mut out, "g", "G.", &[], f64::NAN);
        sample(&mut out, "g", &[], f64::NEG_INFINITY);
        sample(&mut out, "g", &[], 0.25);
        sample(&mut out, "g", &[], 1e20);
        assert_eq!(
            out,
            "# HELP c_total Line one\\nback\\\\slash\n# TYPE c_total counter\n\
             c_total{a=\"q\\\"uote\\\\n\\nl\"} 3\n\
             # HELP g G.\n# TYPE g gauge\ng NaN\ng -Inf\ng 0.25\ng 100000000000000000000\n"
        );
    }
}
