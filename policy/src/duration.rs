//! Durations written like `90s`, `15m`, `1h`, `1h30m`, `2d`.

/// Why a duration string is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Not a sequence of `<number><unit>` with unit `s`, `m`, `h` or `d`.
    #[error("expected a duration like `90s`, `15m`, `1h` or `1h30m` (units s, m, h, d)")]
    Syntax,
    /// The duration is zero.
    #[error("the duration must be longer than zero")]
    Zero,
    /// The number does not fit.
    #[error("the duration is too long")]
    Overflow,
}

/// Parses a duration into whole seconds.
pub fn parse_duration(s: &str) -> Result<u64, DurationError> {
    if s.is_empty() {
        return Err(DurationError::Syntax);
    }
    let mut total: u64 = 0;
    let mut num: Option<u64> = None;
    for c in s.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = num.unwrap_or(0);
            num = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or(DurationError::Overflow)?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(DurationError::Syntax),
        };
        let n = num.take().ok_or(DurationError::Syntax)?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or(DurationError::Overflow)?;
    }
    if num.is_some() {
        return Err(DurationError::Syntax);
    }
    if total == 0 {
        return Err(DurationError::Zero);
    }
    Ok(total)
}

/// Formats whole seconds the way they are written in a policy (`1h30m`, `90s` -> `1m30s`).
pub fn format_duration(mut secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&(secs / unit).to_string());
            out.push(name);
            secs %= unit;
        }
    }
    out
}
