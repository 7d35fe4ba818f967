//! Usage events: decode + validate + normalize in one pass (the fast path), or re-read an event
//! Tally normalized itself (`Mode::Trusted`: the Python path's output, nothing checked again).
//!
//! The contract is `schemas/events.py` (msgspec structs) plus `agents/ingest.py`'s checks; this
//! module accepts a subset of what they accept and writes exactly what they write:
//! - fields in any order, unknown fields skipped (their JSON checked), no key twice;
//! - strings without escapes (a message holding a backslash anywhere is declined up front);
//! - ints as plain JSON integers; decimals as JSON numbers or strings of digits with an optional
//!   fraction of at most 12 digits; times in `time::parse_rfc3339`'s forms;
//! - every bound of the structs (lengths in code points, int ranges, the subject's pattern) and of
//!   ingest's checks (decimals within 0..10^15, VRAM allocated within total, utilization at most
//!   1, time within the poll's bounds, a known account).
//!
//! Anything else is a `Decline` and the Python path decides, so no event is judged differently
//! here; tests/unit/test_native_ingest.py holds the two paths to the same output on generated
//! input. The normalized JSON is msgspec's encoding of the struct: the tag, then `data` (every
//! field in definition order, defaults included), then the envelope's fields.

use std::borrow::Cow;

use crate::decimal::{text, Arith, Dec};
use crate::json::{Decline, Res, Scanner, Str};
use crate::time::{parse_rfc3339, write_msgspec};

pub use crate::schema::{api, gpu, session, storage, Default, Field, Kind, Type};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Untrusted input: validate everything, write the normalized JSON.
    Fast,
    /// An event Tally normalized: read what the windows need.
    Trusted,
}

/// What the windows read of an event.
pub struct Event<'a> {
    pub kind: Kind,
    pub source: Cow<'a, str>,
    pub id: Cow<'a, str>,
    pub subject: Cow<'a, str>,
    pub time_us: i64,
    pub data: Vec<Slot<'a>>, // one per field of `kind.fields()`, in their order
}

impl<'a> Event<'a> {
    pub fn str(&self, index: usize) -> Option<Cow<'a, str>> {
        match &self.data[index] {
            Slot::Str(s) => s.text().ok(),
            Slot::Default(Default::Str(s)) => Some(Cow::Borrowed(s)),
            _ => None,
        }
    }

    pub fn int(&self, index: usize) -> Option<u64> {
        match self.data[index] {
            Slot::Int(v) | Slot::Default(Default::Int(v)) => Some(v),
            _ => None,
        }
    }

    pub fn dec(&self, index: usize) -> Option<Dec> {
        match self.data[index] {
            Slot::Dec(v) => Some(v),
            _ => None,
        }
    }
}

pub enum Slot<'a> {
    Missing,
    Null,
    Str(Str<'a>),
    Int(u64),
    Dec(Dec),
    Default(Default),
}

/// What the fast path checks beyond the structs: agents.ingest's policy for this poll.
pub struct Policy<'p> {
    pub earliest_us: i64,
    pub latest_us: i64,
    pub max_quantity: Dec,
    pub one: Dec,
    pub known_accounts: Option<&'p rustc_hash::FxHashSet<String>>,
}

fn code_points(raw: &[u8]) -> usize {
    raw.iter().filter(|&&b| (b & 0xC0) != 0x80).count()
}

fn check_len(raw: &[u8], min: usize, max: usize) -> Res<()> {
    // Code points never outnumber bytes: count them only when the bytes could exceed the bound.
    let ok = raw.len() >= min && (raw.len() <= max || code_points(raw) <= max);
    ok.then_some(()).ok_or(Decline)
}

fn is_subject(raw: &[u8]) -> bool {
    let word = |b: &u8| b.is_ascii_alphanumeric();
    let rest = |b: &u8| b.is_ascii_alphanumeric() || b"_.:@-".contains(b);
    (1..=128).contains(&raw.len()) && word(&raw[0]) && raw[1..].iter().all(rest)
}

fn plain_int(digits: &[u8]) -> Res<u64> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Decline);
    }
    Ok(digits
        .iter()
        .fold(0u64, |acc, &d| acc * 10 + u64::from(d - b'0')))
}

/// A decimal of the fast path: digits with an optional fraction of 1..=12 digits.
fn plain_decimal(digits: &[u8]) -> bool {
    let (whole, fraction) = match memchr::memchr(b'.', digits) {
        Some(dot) => (&digits[..dot], Some(&digits[dot + 1..])),
        None => (digits, None),
    };
    !whole.is_empty()
        && whole.iter().all(u8::is_ascii_digit)
        && fraction.is_none_or(|f| (1..=12).contains(&f.len()) && f.iter().all(u8::is_ascii_digit))
}

fn read_slot<'a>(
    s: &mut Scanner<'a>,
    field: &Field,
    mode: Mode,
    arith: &mut Arith,
) -> Res<Slot<'a>> {
    if s.null() {
        return if field.nullable {
            Ok(Slot::Null)
        } else {
            Err(Decline)
        };
    }
    Ok(match field.kind {
        Type::Str { min, max } => {
            let value = s.string()?;
            if mode == Mode::Fast {
                check_len(value.raw.as_bytes(), min, max)?;
            }
            Slot::Str(value)
        }
        Type::Int { min, max } => {
            let value = plain_int(s.number()?)?;
            if !(min..=max).contains(&value) {
                return Err(Decline);
            }
            Slot::Int(value)
        }
        Type::Quantity => {
            let (digits, quoted) = if s.peek() == Some(b'"') {
                let value = s.string()?;
                (value.raw.as_bytes(), true)
            } else {
                (s.number()?, false)
            };
            // A JSON number's grammar (checked by the scanner) already rules out leading zeros.
            if mode == Mode::Fast && !plain_decimal(digits) {
                return Err(Decline);
            }
            let _ = quoted;
            let text = std::str::from_utf8(digits).map_err(|_| Decline)?;
            Slot::Dec(arith.parse(text).ok_or(Decline)?)
        }
    })
}

fn read_object<'a>(
    s: &mut Scanner<'a>,
    fields: &'static [Field],
    mode: Mode,
    arith: &mut Arith,
) -> Res<Vec<Slot<'a>>> {
    let mut slots: Vec<Slot<'a>> = fields.iter().map(|_| Slot::Missing).collect();
    s.object(|s, key| {
        match fields
            .iter()
            .position(|f| f.name == key.raw && !key.escaped)
        {
            Some(index) => {
                if !matches!(slots[index], Slot::Missing) {
                    return Err(Decline); // a key twice: left to msgspec's rules
                }
                slots[index] = read_slot(s, &fields[index], mode, arith)?;
                Ok(())
            }
            None => s.skip_value(0),
        }
    })?;
    for (slot, field) in slots.iter_mut().zip(fields) {
        if matches!(slot, Slot::Missing) {
            *slot = match field.default {
                Default::Required => return Err(Decline),
                Default::Null => Slot::Null,
                other => Slot::Default(other),
            };
        }
    }
    Ok(slots)
}

fn below(arith: &mut Arith, lhs: &Dec, rhs: &Dec) -> bool {
    arith.cmp(lhs, rhs) != std::cmp::Ordering::Greater
}

/// ingest's checks of decimal quantities (`_clean`): within bounds, VRAM allocated within total,
/// utilization at most 1. Negatives never reach here (the fast path reads no sign).
fn check_quantities(
    kind: Kind,
    slots: &[Slot<'_>],
    arith: &mut Arith,
    policy: &Policy<'_>,
) -> Res<()> {
    let max = policy.max_quantity;
    let dec = |i: usize| match slots[i] {
        Slot::Dec(v) => Some(v),
        _ => None,
    };
    let ok = match kind {
        Kind::Gpu => {
            let (total, alloc) = (dec(gpu::VRAM_TOTAL), dec(gpu::VRAM_ALLOCATED));
            let (power, utilization) = (dec(gpu::POWER), dec(gpu::UTILIZATION));
            match (total, alloc, power, utilization) {
                (Some(t), Some(a), Some(p), Some(u)) => {
                    below(arith, &a, &t)
                        && below(arith, &t, &max)
                        && below(arith, &p, &max)
                        && below(arith, &u, &policy.one)
                }
                _ => false,
            }
        }
        Kind::Storage => dec(storage::GB).is_some_and(|gb| below(arith, &gb, &max)),
        Kind::SessionStarted => [4, 5]
            .iter()
            .all(|&i| dec(i).is_none_or(|v| below(arith, &v, &max))),
        Kind::Api | Kind::SessionEnded => true,
    };
    ok.then_some(()).ok_or(Decline)
}

/// Parse one event object at the scanner; in `Mode::Fast` also validate it against `policy` and
/// append its normalized JSON to `out`.
pub fn read_event<'a>(
    s: &mut Scanner<'a>,
    mode: Mode,
    arith: &mut Arith,
    policy: Option<&Policy<'_>>,
    out: &mut Vec<u8>,
) -> Res<Event<'a>> {
    let mut kind: Option<Kind> = None;
    let mut data: Option<Vec<Slot<'a>>> = None;
    let mut data_span: Option<(usize, usize)> = None;
    let (mut specversion, mut id, mut source, mut time, mut subject) =
        (None, None, None, None, None);
    let (mut content_type, mut schema): (Option<Slot<'a>>, Option<Slot<'a>>) = (None, None);
    let once = |seen: bool| if seen { Err(Decline) } else { Ok(()) };
    s.object(|s, key| {
        if key.escaped {
            return s.skip_value(0); // an escaped key is never a field name of ours... or is it: decline
        }
        match key.raw.as_bytes() {
            b"type" => {
                once(kind.is_some())?;
                kind = Some(Kind::of_tag(s.string()?.raw.as_bytes()).ok_or(Decline)?);
                Ok(())
            }
            b"data" => {
                once(data.is_some() || data_span.is_some())?;
                match kind {
                    Some(k) => data = Some(read_object(s, k.fields(), mode, arith)?),
                    None => {
                        let start = s.pos;
                        s.skip_value(0)?;
                        data_span = Some((start, s.pos));
                    }
                }
                Ok(())
            }
            b"specversion" => {
                once(specversion.is_some())?;
                specversion = Some(s.string()?);
                Ok(())
            }
            b"id" => {
                once(id.is_some())?;
                id = Some(s.string()?);
                Ok(())
            }
            b"source" => {
                once(source.is_some())?;
                source = Some(s.string()?);
                Ok(())
            }
            b"time" => {
                once(time.is_some())?;
                time = Some(s.string()?);
                Ok(())
            }
            b"subject" => {
                once(subject.is_some())?;
                subject = Some(s.string()?);
                Ok(())
            }
            b"datacontenttype" => {
                once(content_type.is_some())?;
                content_type = Some(if s.null() {
                    Slot::Null
                } else {
                    Slot::Str(s.string()?)
                });
                Ok(())
            }
            b"dataschema" => {
                once(schema.is_some())?;
                schema = Some(if s.null() {
                    Slot::Null
                } else {
                    Slot::Str(s.string()?)
                });
                Ok(())
            }
            _ => s.skip_value(0),
        }
    })?;
    let kind = kind.ok_or(Decline)?;
    let data = match (data, data_span) {
        (Some(d), _) => d,
        (None, Some((start, end))) => {
            let mut sub = Scanner::new(&s.text[..end]); // `end` follows a value: an ASCII byte
            sub.pos = start;
            read_object(&mut sub, kind.fields(), mode, arith)?
        }
        (None, None) => return Err(Decline),
    };
    let (id, source, time, subject) = (
        id.ok_or(Decline)?,
        source.ok_or(Decline)?,
        time.ok_or(Decline)?,
        subject.ok_or(Decline)?,
    );
    let specversion = specversion.ok_or(Decline)?;
    let time_us = parse_rfc3339(time.raw.as_bytes()).ok_or(Decline)?;
    if mode == Mode::Fast {
        let policy = policy.ok_or(Decline)?;
        if specversion.raw != "1.0" || !is_subject(subject.raw.as_bytes()) {
            return Err(Decline);
        }
        check_len(id.raw.as_bytes(), 1, 256)?;
        check_len(source.raw.as_bytes(), 1, 512)?;
        if !(policy.earliest_us..=policy.latest_us).contains(&time_us) {
            return Err(Decline);
        }
        if let Some(Slot::Str(v)) = &content_type {
            if v.raw != "application/json" {
                return Err(Decline);
            }
        }
        if let Some(Slot::Str(v)) = &schema {
            check_len(v.raw.as_bytes(), 0, 512)?;
        }
        check_quantities(kind, &data, arith, policy)?;
        if let Some(known) = policy.known_accounts {
            if !known.contains(subject.raw) {
                return Err(Decline);
            }
        }
        write_normalized(
            out,
            kind,
            &data,
            &id,
            &source,
            time_us,
            &subject,
            &content_type,
            &schema,
        );
    }
    Ok(Event {
        kind,
        source: source.text()?,
        id: id.text()?,
        subject: subject.text()?,
        time_us,
        data,
    })
}

/// Re-read an event Tally normalized itself (the Python path's output, or a state test's):
/// nothing checked again but its UTF-8, nothing written.
pub fn read_normalized<'a>(body: &'a [u8], arith: &mut Arith) -> Res<Event<'a>> {
    read_event(
        &mut Scanner::new(std::str::from_utf8(body).map_err(|_| Decline)?),
        Mode::Trusted,
        arith,
        None,
        &mut Vec::new(),
    )
}

fn quoted(out: &mut Vec<u8>, raw: &[u8]) {
    out.push(b'"');
    out.extend_from_slice(raw);
    out.push(b'"');
}

fn write_value(out: &mut Vec<u8>, slot: &Slot<'_>) {
    match slot {
        Slot::Missing | Slot::Null | Slot::Default(Default::Null | Default::Required) => {
            out.extend_from_slice(b"null")
        }
        Slot::Str(s) => quoted(out, s.raw.as_bytes()),
        Slot::Default(Default::Str(s)) => quoted(out, s.as_bytes()),
        Slot::Int(v) | Slot::Default(Default::Int(v)) => {
            out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes())
        }
        Slot::Dec(v) => quoted(out, text(v).as_bytes()),
    }
}

#[allow(clippy::too_many_arguments)] // one per field of the envelope
fn write_normalized(
    out: &mut Vec<u8>,
    kind: Kind,
    data: &[Slot<'_>],
    id: &Str<'_>,
    source: &Str<'_>,
    time_us: i64,
    subject: &Str<'_>,
    content_type: &Option<Slot<'_>>,
    schema: &Option<Slot<'_>>,
) {
    out.extend_from_slice(b"{\"type\":");
    quoted(out, kind.tag().as_bytes());
    out.extend_from_slice(b",\"data\":{");
    for (index, (field, slot)) in kind.fields().iter().zip(data).enumerate() {
        if index > 0 {
            out.push(b',');
        }
        quoted(out, field.name.as_bytes());
        out.push(b':');
        write_value(out, slot);
    }
    out.extend_from_slice(b"},\"specversion\":\"1.0\",\"id\":");
    quoted(out, id.raw.as_bytes());
    out.extend_from_slice(b",\"source\":");
    quoted(out, source.raw.as_bytes());
    out.extend_from_slice(b",\"time\":\"");
    write_msgspec(out, time_us);
    out.extend_from_slice(b"\",\"subject\":");
    quoted(out, subject.raw.as_bytes());
    out.extend_from_slice(b",\"datacontenttype\":");
    write_value(out, content_type.as_ref().unwrap_or(&Slot::Null));
    out.extend_from_slice(b",\"dataschema\":");
    write_value(out, schema.as_ref().unwrap_or(&Slot::Null));
    out.push(b'}');
}
