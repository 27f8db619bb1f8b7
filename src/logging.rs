//! Logging to stderr: Istio-like `level  message` lines, or one JSON object per line with
//! `--log_as_json`. No timestamps in text mode (the kubelet adds them); JSON lines carry
//! `time` because log pipelines expect it there.
//!
//! Effects: installs the global logger and reads the clock for JSON timestamps.

use std::io::Write;

use crate::settings::config::LogSettings;

/// Installs the logger. Safe to call more than once (later calls are ignored).
pub fn init(settings: LogSettings) {
    let mut b = env_logger::Builder::new();
    b.filter_level(settings.level)
        .target(env_logger::Target::Stderr);
    if settings.json {
        b.format(|buf, record| {
            writeln!(
                buf,
                "{{\"time\":\"{}\",\"level\":\"{}\",\"scope\":\"default\",\"msg\":{}}}",
                rfc3339_now(),
                level_name(record.level()),
                json_string(&record.args().to_string())
            )
        });
    } else {
        b.format(|buf, record| {
            writeln!(buf, "{:<5} {}", level_name(record.level()), record.args())
        });
    }
    let _ = b.try_init();
}

fn level_name(l: log::Level) -> &'static str {
    match l {
        log::Level::Error => "error",
        log::Level::Warn => "warn",
        log::Level::Info => "info",
        log::Level::Debug => "debug",
        log::Level::Trace => "trace",
    }
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format_utc(now.as_secs(), now.subsec_micros())
}

/// Formats seconds since the epoch as an RFC 3339 UTC timestamp (civil-from-days algorithm).
fn format_utc(secs: u64, micros: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_utc(1_795_000_000, 5), "2026-11-18T11:06:40.000005Z");
        assert_eq!(format_utc(951_782_400, 0), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn json_escaping() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), "\"a\\\"b\\\\c\\nd\\u0001\"");
    }
}
