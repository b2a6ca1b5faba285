//! Human durations on the command line and in configs: `90s`, `5m`, `24h`, `365d`, `1h30m`.
//!
//! One grammar for the whole workspace: the policy crate's ([`mayfly_policy::parse_duration`]),
//! the lowest crate that needs it; this module only adapts it to [`std::time::Duration`]. A
//! bare number is refused (units are never guessed), and so are zero, signs, fractions and
//! spaces.

use std::time::Duration;

pub use mayfly_policy::DurationError;

/// Parses `90s`, `5m`, `24h`, `365d`, and sums like `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    mayfly_policy::parse_duration(s).map(Duration::from_secs)
}

/// Formats a duration the way [`parse_duration`] reads it (`1h30m`, `5m`, `45s`), in whole
/// seconds.
pub fn format_duration(d: Duration) -> String {
    mayfly_policy::format_duration(d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("365d").unwrap(),
            Duration::from_secs(365 * 86_400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn refuses_garbage() {
        for s in [
            "",
            "5",
            "m",
            "5x",
            "-5m",
            "5 m",
            "99999999999999999999d",
            "1.5h",
            "0s",
            " 5m",
            "5m ",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in [1u64, 59, 60, 3599, 3600, 5400, 86_400 * 3 + 7] {
            let d = Duration::from_secs(s);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }
    }
}
