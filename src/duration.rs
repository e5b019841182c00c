//! Durations in Go's syntax (`300ms`, `1m30s`, `1.5h`), as Cosmovisor's variables take them.

use std::time::Duration;

/// Parse a Go duration. Negative values are refused: every duration cvx takes is a wait.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                format!("{text:?} has a number without a unit (use e.g. 300ms, 5s, 1m30s)")
            })?;
        if number_len == 0 {
            return Err(format!(
                "{text:?} is not a duration (use e.g. 300ms, 5s, 1m30s)"
            ));
        }
        let value: f64 = rest[..number_len]
            .parse()
            .map_err(|_| format!("{text:?} has a malformed number"))?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            unit => {
                return Err(format!(
                    "{text:?} has unknown unit {unit:?} (valid: ns, us, ms, s, m, h)"
                ));
            }
        };
        total += value * nanos_per_unit;
        rest = &rest[unit_len..];
    }
    if !total.is_finite() || total > u64::MAX as f64 {
        return Err(format!("{text:?} is too long"));
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Format briefly for messages: `1.5s`, `300ms`.
pub fn show(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_syntax() {
        assert_eq!(parse("300ms").unwrap(), Duration::from_millis(300));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("2us").unwrap(), Duration::from_micros(2));
        for bad in ["", "5", "-1s", "1x", "ms", "1..5s", "s5"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
