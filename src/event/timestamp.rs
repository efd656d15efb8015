//! RFC 3339 timestamps: the strict check of a published `timestamp`, and the relay's own
//! stamp in the seed's style (`2026-03-15T10:30:00.123Z`).

use std::time::SystemTime;

/// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, with field ranges checked, days against
/// their month (leap years included): clients that parse dates reject `02-30`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let mut v = 0u32;
        for &c in &b[range] {
            if !c.is_ascii_digit() {
                return None;
            }
            v = v * 10 + u32::from(c - b'0');
        }
        Some(v)
    };
    let fields = (|| {
        let ok_seps = b[4] == b'-'
            && b[7] == b'-'
            && matches!(b[10], b'T' | b't' | b' ')
            && b[13] == b':'
            && b[16] == b':';
        if !ok_seps {
            return None;
        }
        Some((
            num(0..4)?,
            num(5..7)?,
            num(8..10)?,
            num(11..13)?,
            num(14..16)?,
            num(17..19)?,
        ))
    })();
    let Some((year, month, day, hour, minute, second)) = fields else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&month)
        || !(1..=days_in_month).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return false;
    }
    let mut rest = &b[19..];
    if rest.first() == Some(&b'.') {
        let digits = rest[1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[1 + digits..];
    }
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit())
                && (h1 - b'0') * 10 + (h2 - b'0') <= 23
                && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    }
}

/// The current UTC time, millisecond precision, `Z` suffix.
pub fn now_rfc3339_millis() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_rfc3339_forms() {
        for ok in [
            "2026-03-15T10:30:00.123Z",
            "2026-03-15T10:30:00Z",
            "2026-03-15T10:30:00.123456789Z",
            "2026-03-15T10:30:00+02:00",
            "2026-03-15t10:30:00.5-07:30",
            "2016-12-31T23:59:60Z",
            "2028-02-29T10:00:00Z",
            "2000-02-29T10:00:00Z",
            "2026-01-31T10:00:00Z",
        ] {
            assert!(is_rfc3339(ok), "{ok}");
        }
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "2026-03-15",
            "2026-03-15T10:30:00",
            "2026-13-15T10:30:00Z",
            "2026-03-15T24:30:00Z",
            "2026-03-15T10:30:00.Z",
            "2026-03-15T10:30:00+0200",
            "2026/03/15T10:30:00Z",
            "yesterday at noon ok?",
            "2026-03-15T10:30:00Zjunk",
            "2026-02-30T10:00:00Z",
            "2026-02-29T10:00:00Z",
            "2100-02-29T10:00:00Z",
            "2026-04-31T10:00:00Z",
            "2026-04-00T10:00:00Z",
        ] {
            assert!(!is_rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn stamp_is_seed_style_and_valid() {
        let s = now_rfc3339_millis();
        assert_eq!(s.len(), "2026-03-15T10:30:00.123Z".len(), "{s}");
        assert!(is_rfc3339(&s));
    }
}
