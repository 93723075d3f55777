//! Rates and intervals as users type them: `20MiB/s`, `100Mbit/s`,
//! `1048576`; `90s`, `15m`, `1h30m`. One parser for the command line, the
//! cap schedule and the simulator, so that every place accepts the same
//! spellings and refuses the same mistakes with the same words.

use std::time::Duration;

/// Why a rate or an interval did not parse. The message says what was
/// given and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnitError {
    #[error("invalid rate '{0}': give bytes per second, as 1048576, 20MiB/s, 500KB/s or 100Mbit/s")]
    Rate(String),
    #[error("invalid interval '{0}': give a positive duration, as 90s, 15m, 1h or 1h30m")]
    Interval(String),
}

/// Parses a rate in bytes per second: a number (decimals allowed) with an
/// optional unit and an optional `/s`. Binary units `K`, `M`, `G`, `T`,
/// `KiB`, `MiB`, ... are powers of 1024; `KB`, `MB`, ... powers of 1000
/// (as network links are sold); `bit`, `Kbit`, `Mbit`, `Gbit` are bits
/// (decimal). Zero is refused: a link that moves nothing is no link.
pub fn parse_rate(text: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Rate(text.to_owned());
    let t = text.trim();
    // `Mbps` is `Mbit/s`.
    let bps = t.strip_suffix("bps").map(|p| format!("{p}bit"));
    let t = bps.as_deref().unwrap_or(t);
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim();
    let scale: f64 = match unit {
        "" | "B" => 1.0,
        "K" | "k" | "KiB" | "kiB" => 1024.0,
        "M" | "MiB" => 1024.0 * 1024.0,
        "G" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TiB" => 1024.0f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "bit" => 1.0 / 8.0,
        "Kbit" | "kbit" => 1e3 / 8.0,
        "Mbit" => 1e6 / 8.0,
        "Gbit" => 1e9 / 8.0,
        _ => return Err(bad()),
    };
    let bytes = (value * scale).round();
    // u64::MAX as f64 rounds up past u64::MAX; 2^63 bytes per second is
    // far beyond any link and keeps the conversion exact.
    if !(1.0..9.2e18).contains(&bytes) {
        return Err(bad());
    }
    // Range checked above: finite, positive, below 2^63.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(bytes as u64)
}

/// Parses an interval: one or more `NUMBER UNIT` terms with units `ms`,
/// `s`, `m`, `h`, `d` (`1h30m`, `90s`, `1.5h`); a bare number is seconds.
/// Zero is refused.
pub fn parse_interval(text: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::Interval(text.to_owned());
    let t = text.trim();
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = t.parse::<f64>() {
        return secs_to_duration(secs).ok_or_else(bad);
    }
    let mut total = 0.0f64;
    let mut rest = t;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let (number, after) = rest.split_at(split);
        let value: f64 = number.parse().map_err(|_| bad())?;
        let end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(end);
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "sec" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            _ => return Err(bad()),
        };
        total += value * scale;
        rest = next.trim_start();
    }
    secs_to_duration(total).ok_or_else(bad)
}

fn secs_to_duration(secs: f64) -> Option<Duration> {
    // Up to 100 years: beyond that a schedule is a typo.
    (secs.is_finite() && secs > 0.0 && secs <= 100.0 * 365.0 * 86400.0)
        .then(|| Duration::from_secs_f64(secs))
        .filter(|d| !d.is_zero())
}

/// Bytes per second for people: `20.0 MiB/s`.
pub fn format_rate(bytes_per_s: f64) -> String {
    format!("{}/s", format_bytes(bytes_per_s))
}

/// Bytes for people: `1.5 GiB`.
pub fn format_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut i = 0;
    while v.abs() >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_in_every_spelling() {
        assert_eq!(parse_rate("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_rate("20MiB/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate("20M/s").unwrap(), 20 << 20);
        assert_eq!(parse_rate("20M").unwrap(), 20 << 20);
        assert_eq!(parse_rate("500KB/s").unwrap(), 500_000);
        assert_eq!(parse_rate("100Mbit/s").unwrap(), 12_500_000);
        assert_eq!(parse_rate("1Gbps").unwrap(), 125_000_000);
        assert_eq!(parse_rate("1.5 GiB/s").unwrap(), 3 << 29);
        assert_eq!(parse_rate(" 4096 ").unwrap(), 4096);
    }

    #[test]
    fn bad_rates_name_the_input() {
        for bad in [
            "",
            "0",
            "0MiB/s",
            "fast",
            "10 furlongs/s",
            "-5M",
            "1e30",
            "MiB/s",
            "1..2M",
        ] {
            let e = parse_rate(bad).unwrap_err();
            assert_eq!(e, UnitError::Rate(bad.into()), "{bad}");
            assert!(e.to_string().contains("20MiB/s"), "{e}");
        }
    }

    #[test]
    fn intervals_in_every_spelling() {
        assert_eq!(parse_interval("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_interval("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_interval("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_interval("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_interval("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_interval("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_interval("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_interval("2d").unwrap(), Duration::from_secs(172_800));
        assert_eq!(parse_interval("30").unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn bad_intervals_name_the_input() {
        for bad in ["", "0s", "0", "soon", "5 fortnights", "-1m", "m", "1h-30m"] {
            let e = parse_interval(bad).unwrap_err();
            assert_eq!(e, UnitError::Interval(bad.into()), "{bad}");
        }
    }

    #[test]
    fn people_read_bytes() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_rate(20.0 * 1048576.0), "20.0 MiB/s");
    }
}
