//! Event times: the RFC 3339 forms the fast path reads, and the two ways Tally writes a UTC time
//! (msgspec's encoding of a normalized event; Python's `isoformat()` in dead-letter details).
//!
//! Read: `YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|z|+HH:MM|-HH:MM)` - what Tally's producer, the load
//! generator and every normalized event use. msgspec reads more (a space or `t` for the `T`,
//! more than 6 fractional digits, rounded; `+HHMM`): those messages take the Python path.

const MICROS: i64 = 1_000_000;
const DAY_MICROS: i64 = 86_400 * MICROS;

fn two(bytes: &[u8], at: usize) -> Option<u32> {
    let (a, b) = (*bytes.get(at)?, *bytes.get(at + 1)?);
    if a.is_ascii_digit() && b.is_ascii_digit() {
        Some(u32::from(a - b'0') * 10 + u32::from(b - b'0'))
    } else {
        None
    }
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(year) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days_from_civil).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Microseconds since the epoch (UTC) of an RFC 3339 time in the form above; None otherwise.
pub fn parse_rfc3339(text: &[u8]) -> Option<i64> {
    if text.len() < 20 || text[4] != b'-' || text[7] != b'-' || text[10] != b'T' {
        return None;
    }
    if text[13] != b':' || text[16] != b':' {
        return None;
    }
    let year = i64::from(two(text, 0)? * 100 + two(text, 2)?);
    let (month, day) = (two(text, 5)?, two(text, 8)?);
    let (hour, minute, second) = (two(text, 11)?, two(text, 14)?, two(text, 17)?);
    if year < 1 || !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut pos = 19;
    let mut micros = 0i64;
    if text[pos] == b'.' {
        pos += 1;
        let digits = text[pos..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 || digits > 6 {
            return None;
        }
        for &b in &text[pos..pos + digits] {
            micros = micros * 10 + i64::from(b - b'0');
        }
        micros *= 10i64.pow(6 - digits as u32);
        pos += digits;
    }
    let offset_minutes = match *text.get(pos)? {
        b'Z' | b'z' if pos + 1 == text.len() => 0,
        sign @ (b'+' | b'-') if pos + 6 == text.len() && text[pos + 3] == b':' => {
            let (oh, om) = (two(text, pos + 1)?, two(text, pos + 4)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let minutes = i64::from(oh * 60 + om);
            if sign == b'-' {
                -minutes
            } else {
                minutes
            }
        }
        _ => return None,
    };
    let seconds = i64::from(hour * 3600 + minute * 60 + second) - offset_minutes * 60;
    Some(days_from_civil(year, month, day) * DAY_MICROS + seconds * MICROS + micros)
}

fn push_digits(out: &mut Vec<u8>, value: i64, width: usize) {
    let mut buf = [b'0'; 8];
    let mut v = value;
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&buf[..width]);
}

fn write_utc(out: &mut Vec<u8>, micros_since_epoch: i64, zone: &[u8]) {
    let days = micros_since_epoch.div_euclid(DAY_MICROS);
    let within = micros_since_epoch.rem_euclid(DAY_MICROS);
    let (year, month, day) = civil_from_days(days);
    let seconds = within / MICROS;
    let micros = within % MICROS;
    push_digits(out, year, 4);
    out.push(b'-');
    push_digits(out, i64::from(month), 2);
    out.push(b'-');
    push_digits(out, i64::from(day), 2);
    out.push(b'T');
    push_digits(out, seconds / 3600, 2);
    out.push(b':');
    push_digits(out, seconds / 60 % 60, 2);
    out.push(b':');
    push_digits(out, seconds % 60, 2);
    if micros != 0 {
        out.push(b'.');
        push_digits(out, micros, 6);
    }
    out.extend_from_slice(zone);
}

/// msgspec's encoding of a UTC datetime: `2026-11-24T10:00:00Z`, `...T10:00:00.500000Z`.
pub fn write_msgspec(out: &mut Vec<u8>, micros_since_epoch: i64) {
    write_utc(out, micros_since_epoch, b"Z");
}

/// Python's `datetime.isoformat()` of a UTC datetime: `2026-11-24T10:00:00+00:00`.
pub fn isoformat(micros_since_epoch: i64) -> String {
    let mut out = Vec::with_capacity(32);
    write_utc(&mut out, micros_since_epoch, b"+00:00");
    String::from_utf8(out).expect("ASCII")
}

/// Whole seconds since the epoch, floored (a window's start arithmetic).
pub fn floor_seconds(micros_since_epoch: i64) -> i64 {
    micros_since_epoch.div_euclid(MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_offsets() {
        let t = parse_rfc3339(b"2026-11-24T10:00:00.5+02:00").unwrap();
        let mut out = Vec::new();
        write_msgspec(&mut out, t);
        assert_eq!(out, b"2026-11-24T08:00:00.500000Z");
        assert_eq!(
            isoformat(parse_rfc3339(b"2024-02-29T23:59:59z").unwrap()),
            "2024-02-29T23:59:59+00:00"
        );
        assert_eq!(parse_rfc3339(b"1970-01-01T00:00:00Z"), Some(0));
        for bad in [
            &b"2025-02-29T00:00:00Z"[..],
            b"2026-11-24T24:00:00Z",
            b"2026-11-24 10:00:00Z",
            b"2026-11-24T10:00:00.1234567Z",
            b"2026-11-24T10:00:00+0200",
            b"2026-11-24T10:00:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
