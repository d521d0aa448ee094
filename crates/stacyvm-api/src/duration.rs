//! Go-compatible duration strings.
//!
//! StacyVM's wire format uses Go's `time.Duration` text: `10s`, `1h30m`,
//! `127.3ms`, `0s`. [`parse`] accepts exactly what Go's `time.ParseDuration`
//! accepts and [`format`] prints exactly what Go's `Duration.String` prints,
//! so values round-trip with the original server and its clients.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1_000 * NANOSECOND;
const MILLISECOND: u64 = 1_000 * MICROSECOND;
const SECOND: u64 = 1_000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("invalid duration {0:?}")]
    Invalid(String),
    #[error("missing unit in duration {0:?}")]
    MissingUnit(String),
    #[error("unknown unit {unit:?} in duration {input:?}")]
    UnknownUnit { unit: String, input: String },
    #[error("duration {0:?} overflows")]
    Overflow(String),
}

/// A signed duration in nanoseconds, like Go's `time.Duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub i64);

impl GoDuration {
    pub const ZERO: GoDuration = GoDuration(0);

    pub fn from_secs(secs: i64) -> Self {
        GoDuration(secs.saturating_mul(SECOND as i64))
    }

    pub fn from_std(d: std::time::Duration) -> Self {
        GoDuration(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    pub fn nanos(self) -> i64 {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// The duration as a std duration; negative values become zero.
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_nanos(u64::try_from(self.0).unwrap_or(0))
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / SECOND as f64
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s).map(GoDuration)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(self.0))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(GoDuration).map_err(serde::de::Error::custom)
    }
}

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => NANOSECOND,
        "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
        "ms" => MILLISECOND,
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        _ => return None,
    })
}

/// Parses a Go duration string into nanoseconds (port of `time.ParseDuration`).
pub fn parse(input: &str) -> Result<i64, DurationError> {
    let invalid = || DurationError::Invalid(input.to_string());
    let mut s = input;
    let mut neg = false;
    if let Some(c) = s.chars().next() {
        if c == '-' || c == '+' {
            neg = c == '-';
            s = &s[1..];
        }
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        // The next character must be [0-9.].
        let first = s.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(invalid());
        }
        // Integer part.
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let pre = int_len > 0;
        let mut v: u64 = 0;
        for b in s[..int_len].bytes() {
            v = v
                .checked_mul(10)
                .and_then(|v| v.checked_add(u64::from(b - b'0')))
                .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
            if v > 1 << 63 {
                return Err(DurationError::Overflow(input.to_string()));
            }
        }
        s = &s[int_len..];
        // Fractional part.
        let mut frac: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if let Some(rest) = s.strip_prefix('.') {
            s = rest;
            let frac_len = s.bytes().take_while(u8::is_ascii_digit).count();
            post = frac_len > 0;
            let mut overflow = false;
            for b in s[..frac_len].bytes() {
                if overflow {
                    continue;
                }
                if frac > (1u64 << 63) / 10 {
                    overflow = true;
                    continue;
                }
                let y = frac * 10 + u64::from(b - b'0');
                if y > 1 << 63 {
                    overflow = true;
                    continue;
                }
                frac = y;
                scale *= 10.0;
            }
            s = &s[frac_len..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        // Unit.
        let unit_len = s
            .char_indices()
            .find(|(_, c)| *c == '.' || c.is_ascii_digit())
            .map_or(s.len(), |(i, _)| i);
        if unit_len == 0 {
            return Err(DurationError::MissingUnit(input.to_string()));
        }
        let unit_str = &s[..unit_len];
        s = &s[unit_len..];
        let unit = unit_nanos(unit_str).ok_or_else(|| DurationError::UnknownUnit {
            unit: unit_str.to_string(),
            input: input.to_string(),
        })?;
        if v > (1u64 << 63) / unit {
            return Err(DurationError::Overflow(input.to_string()));
        }
        v *= unit;
        if frac > 0 {
            // float64 is needed to be nanosecond accurate for fractions of hours.
            let add = (frac as f64 * (unit as f64 / scale)) as u64;
            v = v
                .checked_add(add)
                .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
            if v > 1 << 63 {
                return Err(DurationError::Overflow(input.to_string()));
            }
        }
        total = total
            .checked_add(v)
            .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
        if total > 1 << 63 {
            return Err(DurationError::Overflow(input.to_string()));
        }
    }
    if neg {
        // -(1<<63) is representable.
        return Ok(0i64.wrapping_sub_unsigned(total));
    }
    if total > i64::MAX as u64 {
        return Err(DurationError::Overflow(input.to_string()));
    }
    Ok(total as i64)
}

/// Formats nanoseconds like Go's `Duration.String()`.
pub fn format(d: i64) -> String {
    let neg = d < 0;
    let mut u = d.unsigned_abs();
    let mut buf: Vec<u8> = Vec::with_capacity(32);
    if u < SECOND {
        // Special case: if duration is smaller than a second, use smaller units, like 1.2ms.
        if u == 0 {
            return "0s".to_string();
        }
        let (prec, unit) = if u < MICROSECOND {
            (0, "ns")
        } else if u < MILLISECOND {
            (3, "\u{b5}s")
        } else {
            (6, "ms")
        };
        let mut digits = Vec::new();
        u = fmt_frac(&mut digits, u, prec);
        fmt_int(&mut digits, u);
        digits.reverse();
        buf.extend_from_slice(&digits);
        buf.extend_from_slice(unit.as_bytes());
    } else {
        let mut rev: Vec<u8> = vec![b's'];
        u = fmt_frac(&mut rev, u, 9);
        // u is now integer seconds.
        fmt_int(&mut rev, u % 60);
        u /= 60;
        if u > 0 {
            rev.push(b'm');
            fmt_int(&mut rev, u % 60);
            u /= 60;
            if u > 0 {
                rev.push(b'h');
                fmt_int(&mut rev, u);
            }
        }
        rev.reverse();
        buf = rev;
    }
    let mut out = String::with_capacity(buf.len() + 1);
    if neg {
        out.push('-');
    }
    out.push_str(&String::from_utf8_lossy(&buf));
    out
}

/// Pushes the fraction of `v / 10^prec` (reversed, trailing zeros omitted) and
/// returns the integer part.
fn fmt_frac(rev: &mut Vec<u8>, mut v: u64, prec: u32) -> u64 {
    let mut print = false;
    for _ in 0..prec {
        let digit = v % 10;
        print = print || digit != 0;
        if print {
            rev.push(b'0' + digit as u8);
        }
        v /= 10;
    }
    if print {
        rev.push(b'.');
    }
    v
}

/// Pushes the decimal digits of `v` in reverse.
fn fmt_int(rev: &mut Vec<u8>, mut v: u64) {
    if v == 0 {
        rev.push(b'0');
        return;
    }
    while v > 0 {
        rev.push(b'0' + (v % 10) as u8);
        v /= 10;
    }
}

impl schemars::JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A Go-style duration: a sequence of decimal numbers with units (ns, us, ms, s, m, h), e.g. \"1h30m\" or \"250ms\".",
            "examples": ["30s", "1h30m"]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_go_examples() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5 * SECOND as i64),
            ("30s", 30 * SECOND as i64),
            ("1478s", 1478 * SECOND as i64),
            ("-5s", -5 * SECOND as i64),
            ("+5s", 5 * SECOND as i64),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5 * SECOND as i64),
            ("5.6s", 5 * SECOND as i64 + 600 * MILLISECOND as i64),
            ("5.s", 5 * SECOND as i64),
            (".5s", 500 * MILLISECOND as i64),
            ("1.0s", SECOND as i64),
            ("1.00s", SECOND as i64),
            ("1.004s", SECOND as i64 + 4 * MILLISECOND as i64),
            ("100.00100s", 100 * SECOND as i64 + MILLISECOND as i64),
            ("10ns", 10),
            ("11us", 11 * MICROSECOND as i64),
            ("12\u{b5}s", 12 * MICROSECOND as i64),
            ("12\u{3bc}s", 12 * MICROSECOND as i64),
            ("13ms", 13 * MILLISECOND as i64),
            ("14s", 14 * SECOND as i64),
            ("15m", 15 * MINUTE as i64),
            ("16h", 16 * HOUR as i64),
            ("3h30m", 3 * HOUR as i64 + 30 * MINUTE as i64),
            (
                "10.5s4m",
                4 * MINUTE as i64 + 10 * SECOND as i64 + 500 * MILLISECOND as i64,
            ),
            (
                "-2m3.4s",
                -(2 * MINUTE as i64 + 3 * SECOND as i64 + 400 * MILLISECOND as i64),
            ),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
            ("39h9m14.425s", 140_954_425 * MILLISECOND as i64),
            ("52763797000ns", 52_763_797_000),
            ("0.3333333333333333333h", 20 * MINUTE as i64),
            ("9007199254740993ns", 9_007_199_254_740_993),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("0.100000000000000000000h", 6 * MINUTE as i64),
            (
                "0.830103483285477580700h",
                49 * MINUTE as i64 + 48 * SECOND as i64 + 372_539_827,
            ),
            ("1.5h", 90 * MINUTE as i64),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(*want), "parse({input:?})");
        }
    }

    #[test]
    fn rejects_go_failures() {
        for input in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\u{ffd}",
            "9223372036854775810ns",
            "9223372036854775808ns",
            "-9223372036854775809ns",
            "9223372036854776us",
            "3000000h",
            "9223372036854775.808us",
            "9223372036854ms775us808ns",
            "10 s",
            "1h ",
            " 1h",
            "1e3s",
        ] {
            assert!(parse(input).is_err(), "parse({input:?}) should fail");
        }
    }

    #[test]
    fn formats_like_go() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (1, "1ns"),
            (1100, "1.1\u{b5}s"),
            (2_200_000, "2.2ms"),
            (3_300_000_000, "3.3s"),
            (4 * MINUTE as i64 + 5 * SECOND as i64, "4m5s"),
            (4 * MINUTE as i64 + 5_001 * MILLISECOND as i64, "4m5.001s"),
            (
                5 * HOUR as i64 + 6 * MINUTE as i64 + 7_001 * MILLISECOND as i64,
                "5h6m7.001s",
            ),
            (8 * MINUTE as i64 + 1, "8m0.000000001s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
            (MINUTE as i64, "1m0s"),
            (2 * HOUR as i64, "2h0m0s"),
            (24 * HOUR as i64, "24h0m0s"),
            (10 * MINUTE as i64, "10m0s"),
            (127_300_000, "127.3ms"),
            (5_666_000_000, "5.666s"),
            (-1_500_000_000, "-1.5s"),
        ];
        for (d, want) in cases {
            assert_eq!(format(*d), *want, "format({d})");
        }
    }

    #[test]
    fn serde_round_trip() {
        let d: GoDuration = serde_json::from_str("\"1h30m\"").expect("parse");
        assert_eq!(d.nanos(), 90 * MINUTE as i64);
        assert_eq!(serde_json::to_string(&d).expect("ser"), "\"1h30m0s\"");
        assert!(serde_json::from_str::<GoDuration>("\"forever\"").is_err());
        assert!(serde_json::from_str::<GoDuration>("30").is_err());
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(n in any::<i64>()) {
            prop_assert_eq!(parse(&format(n)), Ok(n));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse(&s);
        }

        #[test]
        fn parse_never_panics_on_duration_like_input(s in "[-+]?[0-9.]{0,25}(ns|us|ms|s|m|h|µs|x)?([0-9.]{0,5}(ns|s|m|h))?") {
            if let Ok(n) = parse(&s) {
                // Whatever parses must format to something that parses to the same value.
                prop_assert_eq!(parse(&format(n)), Ok(n));
            }
        }
    }
}
