//! Deadlines and waits: a call's own deadline (`grpc-timeout`), and time
//! arithmetic that never overflows, whatever duration a user configures.
//!
//! `Instant + Duration` panics on overflow, and hyper adds its keepalive
//! interval to an `Instant` itself. So every configured duration that ends
//! up in a deadline passes through [`capped`]: longer than [`FOREVER`] (30
//! years, as tokio's own "far future") means forever.

use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

/// The longest wait healthlb arms; anything longer waits this long.
pub(crate) const FOREVER: Duration = Duration::from_secs(30 * 365 * 86_400);

/// `d`, or [`FOREVER`] if longer.
pub(crate) fn capped(d: Duration) -> Duration {
    d.min(FOREVER)
}

/// The instant `d` from now, saturating.
pub(crate) fn deadline_in(d: Duration) -> Instant {
    Instant::now() + capped(d)
}

/// `d` to the nearest millisecond, for messages: a wait planned from a
/// slightly earlier instant still reads as the setting it came from.
pub(crate) fn rounded(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from((d.as_micros() + 500) / 1000).unwrap_or(u64::MAX))
}

/// `d` times `factor`, saturating at [`FOREVER`]; a factor that is not a
/// positive number gives zero.
pub(crate) fn scaled(d: Duration, factor: f64) -> Duration {
    let secs = d.as_secs_f64() * factor;
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs).map_or(FOREVER, capped)
}

/// `d` as a `grpc-timeout` value: at most 8 digits, in the finest unit
/// that fits, rounded up so the server never sees a shorter deadline.
pub(crate) fn encode_grpc_timeout(d: Duration) -> http::HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    let (n, unit) = units
        .iter()
        .map(|(per, unit)| (nanos.div_ceil(*per), *unit))
        .find(|(n, _)| *n <= MAX)
        .unwrap_or((MAX, "H"));
    http::HeaderValue::from_str(&format!("{n}{unit}"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("99999999H"))
}

/// The `grpc-timeout` header: up to 8 digits and a unit.
/// `grpc-timeout`, named once: a lookup by `&str` parses the name each time.
pub(crate) static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        let cases = [
            ("5S", Some(Duration::from_secs(5))),
            ("100m", Some(Duration::from_millis(100))),
            ("2H", Some(Duration::from_secs(7200))),
            ("3M", Some(Duration::from_secs(180))),
            ("7u", Some(Duration::from_micros(7))),
            ("9n", Some(Duration::from_nanos(9))),
            ("99999999S", Some(Duration::from_secs(99_999_999))),
            ("999999999S", None),
            ("S", None),
            ("5x", None),
            ("-5S", None),
        ];
        for (value, expected) in cases {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), expected, "{value}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn encoded_timeouts_round_trip_without_getting_shorter() {
        for d in [
            Duration::from_nanos(1),
            Duration::from_micros(1500),
            Duration::from_millis(250),
            Duration::from_secs(5),
            Duration::from_secs(100_000_000),
            Duration::MAX,
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("grpc-timeout", encode_grpc_timeout(d));
            let back = grpc_timeout(&headers).expect("a valid header");
            assert!(
                back >= d.min(Duration::from_secs(99_999_999 * 3600)),
                "{d:?} -> {back:?}"
            );
        }
        assert_eq!(encode_grpc_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(encode_grpc_timeout(Duration::from_secs(5)), "5000000u");
    }

    #[test]
    fn arithmetic_saturates() {
        assert_eq!(capped(Duration::MAX), FOREVER);
        assert_eq!(scaled(Duration::MAX, 1.6), FOREVER);
        assert_eq!(scaled(Duration::from_secs(2), 1e308), FOREVER);
        assert_eq!(scaled(Duration::from_secs(2), f64::INFINITY), FOREVER);
        assert_eq!(scaled(Duration::from_secs(2), f64::NAN), Duration::ZERO);
        assert_eq!(scaled(Duration::from_secs(2), -1.0), Duration::ZERO);
        assert_eq!(scaled(Duration::from_secs(2), 1.5), Duration::from_secs(3));
        // Far, and no panic.
        assert!(deadline_in(Duration::MAX) > Instant::now() + Duration::from_secs(86_400 * 365));
    }
}
