//! Sessions, as the window core keeps them in the partition's state (docs/PRICING.md, "GPU
//! sessions" and "Compute sessions"):
//! - a GPU rental session (`\x00g` + msgpack [account, session id]) accrues the exact seconds of
//!   its heartbeats; once it ends (its `session.ended`, or no heartbeat for the idle timeout) its
//!   time is rounded up to the billing granularity, at least the minimum session, and the extra
//!   seconds are charged at its latest heartbeat's rate, in that heartbeat's window. A heartbeat
//!   that arrives after the end rates the rounding again (the difference is charged, or credited);
//! - a compute session (`\x00s` + the same key) waits for both its ends; the first start and the
//!   first end of a session id win, a later different one is a `session_conflict`.
//!
//! Both are msgpack arrays (`agents.window.GpuSession` and `SessionSide` read them in Python).

use crate::decimal::{exact_text, text, Arith, Dec, Exact};
use crate::msgpack::{self, Reader, Value};
use crate::time::floor_seconds;

/// A GPU session in memory: (account, session id), interned.
pub type SessionId = (u32, u32);

/// Where a GPU session's latest heartbeat (or its rounding) was metered: the window's start and
/// dimensions, and what rated it.
#[derive(Clone, PartialEq, Debug)]
pub struct GpuWindow {
    pub start: i64,
    pub model: String,
    pub provider: String,
    pub version: String,
    pub book: String,
    pub since: i64,
    pub fee_percent: Option<Dec>,
}

/// The rounding a session is charged: `seconds` of GPU time at `numerator / denominator` per hour
/// (the latest heartbeat's rate for all its GPUs), in `window`.
#[derive(Clone, Debug)]
pub struct Rounding {
    pub seconds: i64,
    pub gpu_count: i64,
    pub numerator: Exact,
    pub denominator: Dec,
    pub window: GpuWindow,
}

#[derive(Clone, Debug)]
pub struct GpuSession {
    /// Its state key (`\x00g` + msgpack [account, session id]); not part of the value.
    pub key: Vec<u8>,
    /// Seconds of the session's heartbeats (their intervals), exact.
    pub seconds: i64,
    /// The latest heartbeat, by event time then identity: when, its identity, its interval and
    /// GPU count, its hourly rate for all its GPUs (numerator / denominator) and its window.
    pub last_us: i64,
    pub last_identity: Vec<u8>,
    pub last_interval: i64,
    pub gpu_count: i64,
    pub numerator: Exact,
    pub denominator: Dec,
    pub window: GpuWindow,
    /// The price book's billing granularity and minimum session at that heartbeat, in seconds.
    pub granularity: i64,
    pub minimum: i64,
    pub ended: bool,
    pub rounding: Option<Rounding>,
}

impl GpuWindow {
    /// Point at another window, reusing the strings' buffers (a heartbeat a minute moves only
    /// `start`: no allocation on the hot path).
    #[allow(clippy::too_many_arguments)] // one per field
    pub fn set(
        &mut self,
        start: i64,
        model: &str,
        provider: &str,
        version: &str,
        book: &str,
        since: i64,
        fee_percent: Option<Dec>,
    ) {
        self.start = start;
        for (field, value) in [
            (&mut self.model, model),
            (&mut self.provider, provider),
            (&mut self.version, version),
            (&mut self.book, book),
        ] {
            if field != value {
                field.clear();
                field.push_str(value);
            }
        }
        self.since = since;
        self.fee_percent = fee_percent;
    }
}

impl GpuSession {
    /// A session not seen before, under its state key.
    pub fn new(key: Vec<u8>, zero: Exact, one: Dec) -> GpuSession {
        GpuSession {
            key,
            seconds: 0,
            last_us: i64::MIN,
            last_identity: Vec::new(),
            last_interval: 0,
            gpu_count: 1,
            numerator: zero,
            denominator: one,
            window: GpuWindow {
                start: 0,
                model: String::new(),
                provider: String::new(),
                version: String::new(),
                book: String::new(),
                since: 0,
                fee_percent: None,
            },
            granularity: 1,
            minimum: 0,
            ended: false,
            rounding: None,
        }
    }

    /// When the session idles out without another heartbeat (epoch seconds): the end of its
    /// latest heartbeat's interval plus `idle_timeout`.
    pub fn idle_end(&self, idle_timeout: i64) -> i64 {
        floor_seconds(self.last_us) + self.last_interval + idle_timeout
    }

    /// The rounding this session owes once ended: its time up to the granularity, at least the
    /// minimum, at its latest rate; None when there is nothing to add.
    pub fn owed_rounding(&self) -> Option<Rounding> {
        if !self.ended || self.seconds <= 0 {
            return None;
        }
        let step = self.granularity.max(1);
        let billed = (self.seconds.div_euclid(step) + i64::from(self.seconds % step != 0)) * step;
        let extra = billed.max(self.minimum) - self.seconds;
        (extra > 0).then(|| Rounding {
            seconds: extra,
            gpu_count: self.gpu_count,
            numerator: self.numerator.clone(),
            denominator: self.denominator,
            window: self.window.clone(),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        msgpack::write_array_len(&mut out, 13);
        int(&mut out, self.seconds);
        int(&mut out, self.last_us);
        msgpack::write_bin(&mut out, &self.last_identity);
        int(&mut out, self.last_interval);
        int(&mut out, self.gpu_count);
        msgpack::write_str(&mut out, &exact_text(&self.numerator));
        msgpack::write_str(&mut out, &text(&self.denominator));
        write_window(&mut out, &self.window);
        int(&mut out, self.granularity);
        int(&mut out, self.minimum);
        msgpack::write_bool(&mut out, self.ended);
        match &self.rounding {
            None => msgpack::write_nil(&mut out),
            Some(r) => {
                msgpack::write_array_len(&mut out, 5);
                int(&mut out, r.seconds);
                int(&mut out, r.gpu_count);
                msgpack::write_str(&mut out, &exact_text(&r.numerator));
                msgpack::write_str(&mut out, &text(&r.denominator));
                write_window(&mut out, &r.window);
            }
        }
        msgpack::write_nil(&mut out); // room for a later field, read as None
        out
    }

    pub fn decode(key: Vec<u8>, raw: &[u8], arith: &mut Arith) -> Option<GpuSession> {
        let mut r = Reader::new(raw);
        if r.array()? < 12 {
            return None;
        }
        let seconds = read_i64(&mut r)?;
        let last_us = read_i64(&mut r)?;
        let last_identity = match r.value()? {
            Value::Bin(b) => b.to_vec(),
            _ => return None,
        };
        let last_interval = read_i64(&mut r)?;
        let gpu_count = read_i64(&mut r)?;
        let numerator = arith.exact_parse(r.str()?)?;
        let denominator = arith.parse(r.str()?)?;
        let window = read_window(&mut r, arith)?;
        let granularity = read_i64(&mut r)?;
        let minimum = read_i64(&mut r)?;
        let ended = r.bool()?;
        let rounding = match r.value()? {
            Value::Nil => None,
            Value::Array(5) => Some(Rounding {
                seconds: read_i64(&mut r)?,
                gpu_count: read_i64(&mut r)?,
                numerator: arith.exact_parse(r.str()?)?,
                denominator: arith.parse(r.str()?)?,
                window: read_window(&mut r, arith)?,
            }),
            _ => return None,
        };
        Some(GpuSession {
            key,
            seconds,
            last_us,
            last_identity,
            last_interval,
            gpu_count,
            numerator,
            denominator,
            window,
            granularity,
            minimum,
            ended,
            rounding,
        })
    }
}

fn int(out: &mut Vec<u8>, value: i64) {
    msgpack::write_int(out, i128::from(value)).expect("an i64 fits MessagePack");
}

fn read_i64(r: &mut Reader<'_>) -> Option<i64> {
    i64::try_from(r.int()?).ok()
}

fn write_window(out: &mut Vec<u8>, w: &GpuWindow) {
    msgpack::write_array_len(out, 7);
    int(out, w.start);
    msgpack::write_str(out, &w.model);
    msgpack::write_str(out, &w.provider);
    msgpack::write_str(out, &w.version);
    msgpack::write_str(out, &w.book);
    int(out, w.since);
    match &w.fee_percent {
        Some(p) => msgpack::write_str(out, &text(p)),
        None => msgpack::write_nil(out),
    }
}

fn read_window(r: &mut Reader<'_>, arith: &mut Arith) -> Option<GpuWindow> {
    if r.array()? != 7 {
        return None;
    }
    Some(GpuWindow {
        start: read_i64(r)?,
        model: r.str()?.to_string(),
        provider: r.str()?.to_string(),
        version: r.str()?.to_string(),
        book: r.str()?.to_string(),
        since: read_i64(r)?,
        fee_percent: match r.value()? {
            Value::Nil => None,
            Value::Str(s) => Some(arith.parse(s)?),
            _ => return None,
        },
    })
}

/// A compute session's ends as seen so far: [started_at, resource_tier, ended_at, duration,
/// charged] (epoch seconds; records of four fields predate `charged`).
#[derive(Default, Clone, PartialEq, Debug)]
pub struct ComputeSession {
    pub started_at: Option<i64>,
    pub resource_tier: Option<String>,
    pub ended_at: Option<i64>,
    pub duration: Option<i128>,
    pub charged: bool,
}

impl ComputeSession {
    pub fn decode(raw: &[u8]) -> Option<ComputeSession> {
        let mut r = Reader::new(raw);
        let fields = r.array()?;
        let mut values = Vec::with_capacity(fields);
        for _ in 0..fields {
            values.push(r.value()?);
        }
        let int = |i: usize| match values.get(i) {
            Some(Value::Int(v)) => Some(*v),
            _ => None,
        };
        let tier = match values.get(1) {
            Some(Value::Str(s)) => Some((*s).to_string()),
            _ => None,
        };
        Some(ComputeSession {
            started_at: int(0).and_then(|v| i64::try_from(v).ok()),
            resource_tier: tier,
            ended_at: int(2).and_then(|v| i64::try_from(v).ok()),
            duration: int(3),
            charged: matches!(values.get(4), Some(Value::Bool(true))),
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(40);
        msgpack::write_array_len(&mut out, 5);
        let int = |out: &mut Vec<u8>, v: Option<i128>| match v {
            Some(v) => msgpack::write_int(out, v).unwrap_or_else(|| msgpack::write_nil(out)),
            None => msgpack::write_nil(out),
        };
        int(&mut out, self.started_at.map(i128::from));
        match &self.resource_tier {
            Some(t) => msgpack::write_str(&mut out, t),
            None => msgpack::write_nil(&mut out),
        }
        int(&mut out, self.ended_at.map(i128::from));
        int(&mut out, self.duration);
        msgpack::write_bool(&mut out, self.charged);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(seconds: i64, granularity: i64, minimum: i64) -> GpuSession {
        let mut arith = Arith::new();
        GpuSession {
            key: Vec::new(),
            seconds,
            last_us: 1_000_000,
            last_identity: b"s\0e1".to_vec(),
            last_interval: 20,
            gpu_count: 1,
            numerator: arith.exact_of_i128(1),
            denominator: arith.of_u64(1),
            window: GpuWindow {
                start: 60,
                model: "rtx_4090".into(),
                provider: "p".into(),
                version: "v".into(),
                book: "default".into(),
                since: 0,
                fee_percent: arith.parse("5"),
            },
            granularity,
            minimum,
            ended: true,
            rounding: None,
        }
    }

    #[test]
    fn rounding_is_the_session_time_up_to_the_granularity_and_the_minimum() {
        let owed = |s: &GpuSession| s.owed_rounding().map(|r| r.seconds);
        assert_eq!(owed(&session(60, 60, 60)), None); // three 20 s heartbeats: one minute
        assert_eq!(owed(&session(61, 60, 60)), Some(59));
        assert_eq!(owed(&session(20, 60, 300)), Some(280)); // the minimum session
        assert_eq!(owed(&session(180, 45, 0)), None);
        assert_eq!(owed(&session(0, 60, 60)), None); // no heartbeat: nothing to round
        let mut open = session(61, 60, 60);
        open.ended = false;
        assert_eq!(owed(&open), None);
    }

    #[test]
    fn sessions_round_trip() {
        let mut arith = Arith::new();
        let mut s = session(61, 60, 60);
        s.rounding = s.owed_rounding();
        let back = GpuSession::decode(Vec::new(), &s.encode(), &mut arith).unwrap();
        assert_eq!(back.encode(), s.encode());
        let c = ComputeSession {
            started_at: Some(10),
            resource_tier: Some("medium".into()),
            ended_at: None,
            duration: Some(7200),
            charged: false,
        };
        assert_eq!(ComputeSession::decode(&c.encode()).unwrap(), c);
    }
}
