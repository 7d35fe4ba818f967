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

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Untrusted input: validate everything, write the normalized JSON.
    Fast,
    /// An event Tally normalized: read what the windows need.
    Trusted,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Gpu,
    Api,
    Storage,
    SessionStarted,
    SessionEnded,
}

impl Kind {
    fn of_tag(tag: &[u8]) -> Option<Kind> {
        Some(match tag {
            b"gpu.usage.v1" => Kind::Gpu,
            b"api.request.v1" => Kind::Api,
            b"storage.usage.v1" => Kind::Storage,
            b"session.started.v1" => Kind::SessionStarted,
            b"session.ended.v1" => Kind::SessionEnded,
            _ => return None,
        })
    }

    fn tag(self) -> &'static str {
        match self {
            Kind::Gpu => "gpu.usage.v1",
            Kind::Api => "api.request.v1",
            Kind::Storage => "storage.usage.v1",
            Kind::SessionStarted => "session.started.v1",
            Kind::SessionEnded => "session.ended.v1",
        }
    }

    fn fields(self) -> &'static [Field] {
        match self {
            Kind::Gpu => GPU,
            Kind::Api => API,
            Kind::Storage => STORAGE,
            Kind::SessionStarted => STARTED,
            Kind::SessionEnded => ENDED,
        }
    }
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

#[derive(Clone, Copy)]
pub enum Default {
    Required,
    Null,
    Int(u64),
    Str(&'static str),
}

#[derive(Clone, Copy)]
enum Type {
    Str { min: usize, max: usize },
    Int { min: u64, max: u64 },
    Quantity,
}

pub struct Field {
    name: &'static str,
    kind: Type,
    nullable: bool,
    default: Default,
}

const fn field(name: &'static str, kind: Type, nullable: bool, default: Default) -> Field {
    Field {
        name,
        kind,
        nullable,
        default,
    }
}

// The structs of schemas/events.py, field for field (Ident: 1..256 code points, Label: 1..128,
// Count: 0..10^12, Seconds: 0..31 days); a test compares these tables with the structs.
const IDENT: Type = Type::Str { min: 1, max: 256 };
const LABEL: Type = Type::Str { min: 1, max: 128 };
const COUNT: Type = Type::Int {
    min: 0,
    max: 1_000_000_000_000,
};
const REQ: Default = Default::Required;
const NULL: Default = Default::Null;

pub mod gpu {
    pub const PROVIDER_ID: usize = 1;
    pub const GPU_MODEL: usize = 3;
    pub const GPU_COUNT: usize = 4;
    pub const VRAM_TOTAL: usize = 5;
    pub const VRAM_ALLOCATED: usize = 6;
    pub const POWER: usize = 7;
    pub const UTILIZATION: usize = 8;
    pub const INTERVAL: usize = 9;
}
const GPU: &[Field] = &[
    field("session_id", IDENT, false, REQ),
    field("provider_id", IDENT, false, REQ),
    field("node_id", IDENT, false, REQ),
    field("gpu_model", LABEL, false, REQ),
    field(
        "gpu_count",
        Type::Int { min: 1, max: 1024 },
        false,
        Default::Int(1),
    ),
    field("vram_total_gb", Type::Quantity, false, REQ),
    field("vram_allocated_gb", Type::Quantity, false, REQ),
    field("power_watts", Type::Quantity, false, REQ),
    field("utilization", Type::Quantity, false, REQ),
    field(
        "interval_seconds",
        Type::Int {
            min: 1,
            max: 86_400,
        },
        false,
        REQ,
    ),
    field("region", LABEL, true, NULL),
];

pub mod api {
    pub const REQUEST_COUNT: usize = 1;
    pub const TOKENS_IN: usize = 2;
    pub const TOKENS_OUT: usize = 3;
    pub const PRODUCT_ID: usize = 4;
}
const API: &[Field] = &[
    field("endpoint", Type::Str { min: 1, max: 512 }, false, REQ),
    field("request_count", COUNT, false, Default::Int(1)),
    field("tokens_in", COUNT, false, Default::Int(0)),
    field("tokens_out", COUNT, false, Default::Int(0)),
    field("product_id", LABEL, true, NULL),
    field("service_type", LABEL, false, Default::Str("api_gateway")),
    field(
        "status",
        Type::Int { min: 100, max: 599 },
        false,
        Default::Int(200),
    ),
    field("latency_ms", COUNT, true, NULL),
    field("region", LABEL, true, NULL),
];

pub mod storage {
    pub const KIND: usize = 0;
    pub const GB: usize = 2;
    pub const DURATION: usize = 3;
}
const STORAGE: &[Field] = &[
    field("storage_kind", LABEL, false, REQ),
    field("resource_id", IDENT, false, REQ),
    field("gb", Type::Quantity, false, REQ),
    field(
        "duration_seconds",
        Type::Int {
            min: 1,
            max: 31 * 86_400,
        },
        false,
        REQ,
    ),
    field("region", LABEL, true, NULL),
];

pub mod session {
    pub const SESSION_ID: usize = 0;
    pub const RESOURCE_TIER: usize = 6; // session.started
    pub const DURATION: usize = 2; // session.ended
}
const STARTED: &[Field] = &[
    field("session_id", IDENT, false, REQ),
    field("provider_id", IDENT, true, NULL),
    field("node_id", IDENT, true, NULL),
    field("gpu_model", LABEL, true, NULL),
    field("vram_total_gb", Type::Quantity, true, NULL),
    field("vram_allocated_gb", Type::Quantity, true, NULL),
    field("resource_tier", LABEL, true, NULL),
    field("region", LABEL, true, NULL),
];
const ENDED: &[Field] = &[
    field("session_id", IDENT, false, REQ),
    field("reason", LABEL, false, Default::Str("completed")),
    field(
        "duration_seconds",
        Type::Int {
            min: 0,
            max: 31 * 86_400,
        },
        true,
        NULL,
    ),
];

/// (field, type with bounds, nullable, default) of one field.
pub type FieldInfo = (&'static str, String, bool, String);
/// (event type, fields) of every event type.
pub type Schema = Vec<(&'static str, Vec<FieldInfo>)>;

/// The field tables, for the test that compares them with schemas/events.py.
pub fn schema() -> Schema {
    [
        Kind::Gpu,
        Kind::Api,
        Kind::Storage,
        Kind::SessionStarted,
        Kind::SessionEnded,
    ]
    .into_iter()
    .map(|kind| {
        let fields = kind
            .fields()
            .iter()
            .map(|f| {
                let kind = match f.kind {
                    Type::Str { min, max } => format!("str[{min},{max}]"),
                    Type::Int { min, max } => format!("int[{min},{max}]"),
                    Type::Quantity => "decimal".to_string(),
                };
                let default = match f.default {
                    Default::Required => "required".to_string(),
                    Default::Null => "None".to_string(),
                    Default::Int(v) => v.to_string(),
                    Default::Str(s) => s.to_string(),
                };
                (f.name, kind, f.nullable, default)
            })
            .collect();
        (kind.tag(), fields)
    })
    .collect()
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
                check_len(value.raw, min, max)?;
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
                (value.raw, true)
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
            .position(|f| f.name.as_bytes() == key.raw && !key.escaped)
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
        match key.raw {
            b"type" => {
                once(kind.is_some())?;
                kind = Some(Kind::of_tag(s.string()?.raw).ok_or(Decline)?);
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
            let mut sub = Scanner::new(&s.buf[..end]);
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
    let time_us = parse_rfc3339(time.raw).ok_or(Decline)?;
    if mode == Mode::Fast {
        let policy = policy.ok_or(Decline)?;
        if specversion.raw != b"1.0" || !is_subject(subject.raw) {
            return Err(Decline);
        }
        check_len(id.raw, 1, 256)?;
        check_len(source.raw, 1, 512)?;
        if !(policy.earliest_us..=policy.latest_us).contains(&time_us) {
            return Err(Decline);
        }
        if let Some(Slot::Str(v)) = &content_type {
            if v.raw != b"application/json" {
                return Err(Decline);
            }
        }
        if let Some(Slot::Str(v)) = &schema {
            check_len(v.raw, 0, 512)?;
        }
        check_quantities(kind, &data, arith, policy)?;
        if let Some(known) = policy.known_accounts {
            let account = std::str::from_utf8(subject.raw).map_err(|_| Decline)?;
            if !known.contains(account) {
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
        Slot::Str(s) => quoted(out, s.raw),
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
    quoted(out, id.raw);
    out.extend_from_slice(b",\"source\":");
    quoted(out, source.raw);
    out.extend_from_slice(b",\"time\":\"");
    write_msgspec(out, time_us);
    out.extend_from_slice(b"\",\"subject\":");
    quoted(out, subject.raw);
    out.extend_from_slice(b",\"datacontenttype\":");
    write_value(out, content_type.as_ref().unwrap_or(&Slot::Null));
    out.extend_from_slice(b",\"dataschema\":");
    write_value(out, schema.as_ref().unwrap_or(&Slot::Null));
    out.push(b'}');
}
