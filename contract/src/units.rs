//! Durations and byte sizes as flags and specs write them. One grammar for every flag and field,
//! so a value the gateway's `--queue-timeout` accepts is one `spec.admission.queueTimeout`
//! accepts too.
//!
//! - Duration: a number (`30`, `1.5`) and a unit `ms`, `s`, `m` or `h`; a bare number is seconds.
//!   At most 10⁹ s.
//! - Size: a number and a unit `B`, `KB`/`MB`/`GB`/`TB` (powers of 1000) or `KiB`/`MiB`/`GiB`/
//!   `TiB` (powers of 1024; `K`, `M`, `G`, `T` read as binary); a bare number is bytes; a
//!   fraction needs a unit (`1.5GiB`). Case-insensitive, space before the unit allowed.

use std::time::Duration;

/// Longest duration accepted, in seconds (about 31 years).
pub const MAX_DURATION_S: f64 = 1e9;

/// A value that is not a duration or size; says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitError(pub String);

impl std::fmt::Display for UnitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnitError {}

/// Splits `s` into its number and unit (both trimmed).
fn split(s: &str) -> (&str, &str) {
    let t = s.trim();
    let i = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(i);
    (num, unit.trim())
}

/// The number part: digits with at most one `.`, not empty.
fn number(num: &str, what: &str) -> Result<f64, UnitError> {
    if num.is_empty() || num == "." || num.matches('.').count() > 1 {
        return Err(UnitError(format!("expected {what}")));
    }
    num.parse()
        .map_err(|_| UnitError(format!("expected {what}")))
}

/// Parses a duration (see the module docs).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let (num, unit) = split(s);
    let v = number(num, "a duration such as 500ms, 30s, 2m or 1h")?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "" | "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        other => {
            return Err(UnitError(format!(
                "unknown duration unit {other:?} (use ms, s, m or h)"
            )))
        }
    };
    if !secs.is_finite() || secs > MAX_DURATION_S {
        return Err(UnitError(format!("duration {s:?} is out of range")));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// True when `s` names its unit (`30s`, not `30`): what a spec field requires.
pub fn has_unit(s: &str) -> bool {
    !split(s).1.is_empty()
}

/// Parses a byte size (see the module docs).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let (num, unit) = split(s);
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => {
            return Err(UnitError(format!(
                "unknown size unit {unit:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            )))
        }
    };
    let what = "a size such as 512MiB or 2GiB";
    if num.contains('.') {
        if mult == 1 && unit.is_empty() {
            return Err(UnitError("a fractional size needs a unit (1.5GiB)".into()));
        }
        let bytes = number(num, what)? * mult as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(UnitError(format!("size {s:?} is too large")));
        }
        Ok(bytes as u64)
    } else {
        if num.is_empty() {
            return Err(UnitError(format!("expected {what}")));
        }
        let v: u64 = num
            .parse()
            .map_err(|_| UnitError(format!("size {s:?} is too large")))?;
        v.checked_mul(mult)
            .ok_or_else(|| UnitError(format!("size {s:?} is too large")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_duration(s), Ok(d), "{s}");
        ok("250ms", Duration::from_millis(250));
        ok("30s", Duration::from_secs(30));
        ok("2m", Duration::from_secs(120));
        ok("1h", Duration::from_secs(3600));
        ok(" 1.5s ", Duration::from_millis(1500));
        ok("7", Duration::from_secs(7));
        ok("0", Duration::ZERO);
        ok("30 s", Duration::from_secs(30));
        for bad in [
            "",
            " ",
            "fast",
            "3 weeks",
            "-1s",
            "3d",
            "1.2.3s",
            ".",
            "s",
            "1e3s",
            "1e99h",
            "99999999999999999999h",
            "NaN",
            "inf",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("3d")
            .unwrap_err()
            .0
            .contains("unknown duration unit"));
        assert!(has_unit("30s") && has_unit("1.5 h") && !has_unit("30") && !has_unit(""));
    }

    #[test]
    fn sizes() {
        let ok = |s: &str, n: u64| assert_eq!(parse_size(s), Ok(n), "{s}");
        ok("2GiB", 2 << 30);
        ok("512MiB", 512 << 20);
        ok("512 MiB", 512 << 20);
        ok("4M", 4 << 20);
        ok("1GB", 1_000_000_000);
        ok("64mb", 64_000_000);
        ok("1000", 1000);
        ok("1.5KiB", 1536);
        ok("0", 0);
        for bad in [
            "",
            "lots",
            "12XB",
            "1.5",
            "1..5GiB",
            "-1GiB",
            "99999999999999999999",
            "20000000TiB",
            "1e3MiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }
}
