//! Durations in Go's syntax (`300ms`, `1m30s`, `1.5h`), as Cosmovisor's variables take them.

use std::time::Duration;

/// Parse a Go duration, exactly (integer nanoseconds). Negative values are refused: every
/// duration cvx takes is a wait.
pub fn parse(text: &str) -> Result<Duration, String> {
    let hint = "use e.g. 300ms, 5s, 1m30s";
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(format!("empty duration ({hint})"));
    }
    if s.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number = &rest[..number_end];
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("{text:?} has a number without a unit ({hint})")),
            unit => {
                return Err(format!(
                    "{text:?} has unknown unit {unit:?} (valid: ns, us, ms, s, m, h)"
                ));
            }
        };
        let (int, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (int.is_empty() && fraction.is_empty()) || fraction.len() > 18 || fraction.contains('.')
        {
            return Err(format!("{text:?} is not a duration ({hint})"));
        }
        let malformed = |_| format!("{text:?} has a malformed number");
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(malformed)?
        };
        let fraction: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse::<u128>().map_err(malformed)? * scale / 10u128.pow(fraction.len() as u32)
        };
        total = int
            .checked_mul(scale)
            .and_then(|v| v.checked_add(fraction))
            .and_then(|v| v.checked_add(total))
            .ok_or_else(|| format!("{text:?} is too long"))?;
    }
    u64::try_from(total)
        .map(Duration::from_nanos)
        .map_err(|_| format!("{text:?} is too long"))
}

/// Format briefly for messages: `1.5s`, `300ms`.
pub fn show(d: Duration) -> String {
    let secs = d.as_secs();
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if secs < 60 && d.subsec_millis() != 0 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 60 || !secs.is_multiple_of(60) {
        format!(
            "{}{}s",
            if secs >= 60 {
                format!("{}m", secs / 60)
            } else {
                String::new()
            },
            secs % 60
        )
    } else if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else {
        format!("{}m", secs / 60)
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
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(show(Duration::from_secs(300)), "5m");
        assert_eq!(show(Duration::from_secs(90)), "1m30s");
        assert_eq!(show(Duration::from_millis(1500)), "1.5s");
        assert_eq!(show(Duration::from_millis(200)), "200ms");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
        for bad in ["", "5", "-1s", "1x", "ms", "1..5s", "s5"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
