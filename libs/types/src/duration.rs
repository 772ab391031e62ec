//! Human durations as written in spec files: `1s`, `500ms`, `2m`, `1h`, `1m30s`.

use std::time::Duration;

/// Parses `500ms`, `1s`, `1.5s`, `2m`, `1h` and sums like `1m30s`.
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; write it like \"500ms\", \"1s\" or \"2m\"".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{text}` has no unit; use ms, s, m or h"))?;
        if number_len == 0 {
            return Err(format!(
                "`{text}` is not a duration; write it like \"500ms\" or \"1s\""
            ));
        }
        let (number, after) = rest.split_at(number_len);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{number}` in `{text}` is not a number"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let seconds_per_unit = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "unknown unit `{unit}` in `{text}`; use ms, s, m or h"
                ));
            }
        };
        let seconds = value * seconds_per_unit;
        if !seconds.is_finite() || seconds > 1e9 {
            return Err(format!("`{text}` is too long"));
        }
        total += Duration::from_secs_f64(seconds);
        rest = next;
    }
    Ok(total)
}

/// Formats a duration the way `parse` reads it back.
pub fn format(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis.is_multiple_of(1000) {
        format!("{}s", millis / 1000)
    } else {
        format!("{millis}ms")
    }
}

/// Parses a duration that must lie in `range`, which `range_text` names
/// for the error ("1s and 5m").
pub fn parse_within(
    text: &str,
    range: std::ops::RangeInclusive<Duration>,
    range_text: &str,
) -> Result<Duration, String> {
    let duration = parse(text)?;
    if !range.contains(&duration) {
        return Err(format!("`{text}` must be between {range_text}"));
    }
    Ok(duration)
}

/// A sampling period (`--sample-every`): 1s to 5m.
pub fn parse_sample_every(text: &str) -> Result<Duration, String> {
    parse_within(
        text,
        Duration::from_secs(1)..=Duration::from_secs(300),
        "1s and 5m",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("2h").unwrap(), Duration::from_secs(7200));
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        for bad in ["", "5", "s", "5x", "1..2s", "-1s", "1e400s"] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(parse("5 minutes").unwrap_err().contains("unit"));
    }

    #[test]
    fn format_round_trips() {
        for d in [Duration::from_millis(250), Duration::from_secs(3)] {
            assert_eq!(parse(&format(d)).unwrap(), d);
        }
    }
}
