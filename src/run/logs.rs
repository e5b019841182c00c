//! The supervisor's logs, as Cosmovisor's variables ask: off, coloured or not, with timestamps in
//! one of Go's named layouts (UTC).

use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

use super::config::Config;

/// Install the global subscriber for `cvx run`. `verbose` adds debug logs.
pub fn init(config: &Config, verbose: bool) {
    let level = if !config.logs {
        "off"
    } else if verbose {
        "debug"
    } else {
        "info"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CVX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("cvx={level},warn")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only where someone sees it: a terminal, not the journal or a CI log.
        .with_ansi(config.color_logs && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match config.time_format {
        Some(layout) => builder.with_timer(GoTime(layout)).try_init(),
        None => builder.without_time().try_init(),
    };
}

struct GoTime(&'static str);

impl FormatTime for GoTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        w.write_str(&format_go(self.0, SystemTime::now()))
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const DAYS: [&str; 7] = [
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
];

/// Format `t` in UTC with a Go reference layout ("Mon Jan 2 15:04:05 MST 2006").
pub fn format_go(layout: &str, t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let nanos = since.subsec_nanos();
    let days = (secs / 86_400) as i64;
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let month_name = MONTHS[month as usize - 1];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    // Longest tokens first, as Go's parser does.
    let tokens: [(&str, String); 24] = [
        ("January", month_name.to_string()),
        ("Monday", weekday.to_string()),
        ("2006", format!("{year:04}")),
        ("-0700", "+0000".into()),
        ("Z07:00", "Z".into()),
        (".999999999", {
            let f = format!(".{nanos:09}");
            let trimmed = f.trim_end_matches('0');
            if trimmed == "." {
                String::new()
            } else {
                trimmed.to_string()
            }
        }),
        (".000", format!(".{:03}", nanos / 1_000_000)),
        ("MST", "UTC".into()),
        ("Jan", month_name[..3].to_string()),
        ("Mon", weekday[..3].to_string()),
        ("_2", format!("{day:>2}")),
        ("01", format!("{month:02}")),
        ("02", format!("{day:02}")),
        ("03", format!("{hour12:02}")),
        ("04", format!("{minute:02}")),
        ("05", format!("{second:02}")),
        ("06", format!("{:02}", year % 100)),
        ("15", format!("{hour:02}")),
        ("PM", if hour >= 12 { "PM" } else { "AM" }.into()),
        ("pm", if hour >= 12 { "pm" } else { "am" }.into()),
        ("1", month.to_string()),
        ("2", day.to_string()),
        ("3", hour12.to_string()),
        ("4", minute.to_string()),
    ];
    let mut out = String::new();
    let mut rest = layout;
    'outer: while !rest.is_empty() {
        for (token, value) in &tokens {
            if let Some(after) = rest.strip_prefix(token) {
                out.push_str(value);
                rest = after;
                continue 'outer;
            }
        }
        let c = rest.chars().next().expect("rest is not empty");
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's method).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn go_layouts() {
        // 2026-11-26 15:04:05.120 UTC, a Thursday.
        let t = UNIX_EPOCH + Duration::from_millis(1_795_705_445_120);
        assert_eq!(format_go("3:04PM", t), "3:04PM");
        assert_eq!(
            format_go("2006-01-02T15:04:05Z07:00", t),
            "2026-11-26T15:04:05Z"
        );
        assert_eq!(
            format_go("2006-01-02T15:04:05.999999999Z07:00", t),
            "2026-11-26T15:04:05.12Z"
        );
        assert_eq!(
            format_go("Mon Jan _2 15:04:05 MST 2006", t),
            "Thu Nov 26 15:04:05 UTC 2026"
        );
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
