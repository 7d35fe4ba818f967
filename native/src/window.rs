//! The window core's adding side: each accepted event's usage goes into the tumbling window of its
//! event time per (account, meter, dimensions), rated by the plan and the price-book version in
//! force at that time (docs/PRICING.md). A window never spans a change of either: its start is the
//! later of the tumbling window's start and the moment the plan or the version took effect, so a
//! window has one price. The watermark is the latest event time seen; an event for a window the
//! watermark already closed (tumbling end + grace) within the correction horizon is an adjustment
//! (held apart until the next close); older is `too_late`; an event the account's plan cannot
//! price is `unpriced`; a compute session's second different start or end is `session_conflict`
//! (nothing of a refused event is added). Amounts are exact (`decimal::Wide`; what one event adds
//! is usage.rs). Closing and rating a window stays in Python (agents/window.py): once per charge
//! row, not per event; `close` hands it the windows due and the adjustments.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::decimal::{Arith, Exact};
use crate::event::{read_normalized, Event};
use crate::sessions::{GpuSession, Rounding, SessionId};
use crate::spec::{history, PlanHistory, PlanSpec};
use crate::state::{self, DimsTable, Key, Names, Part, Qty, Tally, WATERMARK};
use crate::time::{floor_seconds, isoformat};
use crate::usage::Vocabulary;

/// Why an event's usage was not added (the meter dead-letters it with this reason and detail).
pub enum Refusal {
    TooLate(String),
    Unpriced(String),
    SessionConflict(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLate(_) => "too_late",
            Refusal::Unpriced(_) => "unpriced",
            Refusal::SessionConflict(_) => "session_conflict",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Refusal::TooLate(d) | Refusal::Unpriced(d) | Refusal::SessionConflict(d) => d,
        }
    }
}

/// A part of an event's usage and the window it goes to, with what rated it (names interned).
pub(crate) struct Placed {
    pub(crate) key: Key,
    pub(crate) part: Part,
    pub(crate) version: u32,
    pub(crate) book: u32,
    pub(crate) since: i64,
}

#[pyclass(module = "tally_native")]
pub struct WindowCore {
    pub(crate) size: i64,
    pub(crate) grace: i64,
    pub(crate) horizon: i64,
    pub(crate) idle_timeout: i64,
    pub(crate) plan_of: Py<PyAny>,
    pub(crate) read: Py<PyAny>,
    pub(crate) names: Names,
    pub(crate) dims: DimsTable,
    pub(crate) vocabulary: Vocabulary,
    pub(crate) open: FxHashMap<Key, Tally>,
    pub(crate) late: FxHashMap<Key, Tally>,
    pub(crate) dirty: FxHashSet<Key>,
    /// Compute sessions whose record this poll changed: state key -> record.
    pub(crate) compute: FxHashMap<Vec<u8>, Vec<u8>>,
    /// GPU sessions in memory (every one still running, and the ended ones this poll touched):
    /// (account, session id) -> session; `gpu_dirty` lists the changed ones.
    pub(crate) gpu: FxHashMap<SessionId, GpuSession>,
    pub(crate) gpu_dirty: FxHashSet<SessionId>,
    /// Interned (version label, book name) per (version, book) of this generation's plans, by
    /// address: cleared with the plans, whose values hold those addresses alive.
    pub(crate) rated_ids: FxHashMap<(usize, usize), (u32, u32)>,
    pub(crate) watermark: i64,
    pub(crate) stored_watermark: i64,
    /// A lower bound of the watermark at which an open window closes, and of the one at which
    /// a running GPU session idles out: `close` looks through the open windows (~250 bytes each,
    /// thousands of them) and the sessions only once the watermark reaches it, not every poll.
    /// `i64::MIN`: not known, look.
    pub(crate) next_close: i64,
    pub(crate) next_idle_end: i64,
    /// Plan histories read from the plan directory, by account id, for its `generation`.
    pub(crate) plans: FxHashMap<u32, Arc<PlanHistory>>,
    pub(crate) plans_generation: i64,
    pub(crate) arith: Arith,
    pub(crate) zero: Exact,
    /// Interned names after the last compaction: names of windows long closed are dropped once
    /// the table has doubled (and grown by 100,000) since, so memory follows the live windows.
    pub(crate) live_names: usize,
}

/// Python's `repr()` of a string, as the dead-letter details of agents/window.py spell names.
pub(crate) fn repr(py: Python<'_>, text: &str) -> String {
    PyString::new(py, text)
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| format!("{text:?}"))
}

impl WindowCore {
    /// The account's plan history, asked of the plan directory once per account and generation.
    pub(crate) fn history(&mut self, py: Python<'_>, account: u32) -> PyResult<Arc<PlanHistory>> {
        if let Some(found) = self.plans.get(&account) {
            return Ok(found.clone());
        }
        let entries = self.plan_of.bind(py).call1((self.names.get(account),))?;
        let entries: Vec<PyRef<'_, PlanSpec>> = entries.extract()?;
        let found = Arc::new(history(entries));
        self.plans.insert(account, found.clone());
        Ok(found)
    }

    /// The start of the window an instant falls in: the tumbling window's start, or the moment
    /// the plan or version in force took effect, if later.
    pub(crate) fn window_start(&self, moment: i64, since: i64) -> i64 {
        (moment - moment.rem_euclid(self.size)).max(since)
    }

    /// `Windows.add`: add one accepted event's usage, or say why not (then nothing of it is
    /// added). Python errors come only from the callbacks (plan directory, store).
    pub fn add(&mut self, py: Python<'_>, event: &Event<'_>) -> PyResult<Result<(), Refusal>> {
        let moment = floor_seconds(event.time_us);
        if moment < self.watermark - self.horizon {
            let detail = format!(
                "time {} is older than the correction horizon",
                isoformat(event.time_us)
            );
            return Ok(Err(Refusal::TooLate(detail)));
        }
        let account = self.names.id(&event.subject);
        let plans = self.history(py, account)?;
        let placed = match self.usage_of(py, event, account, &plans, moment)? {
            Ok(placed) => placed,
            Err(refusal) => return Ok(Err(refusal)),
        };
        for p in &placed {
            self.put(p);
        }
        if moment > self.watermark {
            self.watermark = moment;
        }
        Ok(Ok(()))
    }

    /// Sum a part into its window: the open one, or, when the watermark closed it already, the
    /// poll's adjustments of it (rated with the poll's other late usage as its next revision).
    pub(crate) fn put(&mut self, placed: &Placed) {
        let key = placed.key;
        if let Some(tally) = self.open.get_mut(&key) {
            tally.add(&mut self.arith, &placed.part);
            self.dirty.insert(key);
            return;
        }
        let zero = &self.zero;
        let fresh = || {
            Tally::empty(
                &placed.part,
                placed.version,
                placed.book,
                placed.since,
                zero.clone(),
            )
        };
        let tumbling = key.start - key.start.rem_euclid(self.size);
        if tumbling + self.size + self.grace <= self.watermark {
            let tally = fresh();
            let tally = self.late.entry(key).or_insert(tally);
            tally.add(&mut self.arith, &placed.part);
        } else {
            let tally = fresh();
            let tally = self.open.entry(key).or_insert(tally);
            tally.add(&mut self.arith, &placed.part);
            self.dirty.insert(key);
            self.next_close = self.next_close.min(tumbling + self.size + self.grace);
        }
    }

    /// A GPU session's rounding as parts: the one charged before withdrawn, the one owed now
    /// added (nothing when they are the same).
    pub(crate) fn rounding_parts(
        &mut self,
        account: u32,
        before: Option<&Rounding>,
        now: Option<&Rounding>,
    ) -> Vec<Placed> {
        let same = match (before, now) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.seconds == b.seconds
                    && a.gpu_count == b.gpu_count
                    && a.window == b.window
                    && self.arith.exact_cmp(&a.numerator, &b.numerator).is_eq()
                    && self.arith.cmp(&a.denominator, &b.denominator).is_eq()
            }
            _ => false,
        };
        if same {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(2);
        for (rounding, sign) in [(before, -1i64), (now, 1)] {
            if let Some(r) = rounding {
                out.push(self.rounding_part(account, r, sign));
            }
        }
        out
    }

    fn rounding_part(&mut self, account: u32, r: &Rounding, sign: i64) -> Placed {
        let w = &r.window;
        let seconds = self.arith.exact_of_i128(i128::from(sign * r.seconds));
        let numerator = self.arith.exact_mul(&r.numerator, &seconds);
        let one = self.arith.of_u64(1);
        let (amount, fraction) = if self.arith.cmp(&r.denominator, &one).is_eq() {
            (numerator, None)
        } else {
            let wide = self.arith.wide_of(&numerator);
            (self.zero.clone(), Some(Box::new((r.denominator, wide))))
        };
        let (model, provider) = (self.names.id(&w.model), self.names.id(&w.provider));
        let v = &self.vocabulary;
        let dims = self
            .dims
            .id(&[(v.gpu_model, model), (v.provider_id, provider)]);
        let part = Part {
            meter: v.gpu,
            dims,
            quantity: Qty::Int(i128::from(sign * r.seconds * r.gpu_count)),
            amount,
            fraction,
            unit: v.gpu_hour,
            provider: Some(provider),
            fee_percent: w.fee_percent,
        };
        Placed {
            key: Key {
                account,
                meter: part.meter,
                dims,
                start: w.start,
            },
            part,
            version: self.names.id(&w.version),
            book: self.names.id(&w.book),
            since: w.since,
        }
    }

    /// End every running GPU session without a heartbeat for the idle timeout (by the
    /// watermark) and meter its rounding.
    fn end_idle_sessions(&mut self) {
        if self.watermark < self.next_idle_end {
            return;
        }
        let (idle_timeout, watermark) = (self.idle_timeout, self.watermark);
        let mut due: Vec<SessionId> = Vec::new();
        let mut next = i64::MAX;
        for (id, session) in self.gpu.iter().filter(|(_, s)| !s.ended) {
            let end = session.idle_end(idle_timeout);
            if end <= watermark {
                due.push(*id);
            } else {
                next = next.min(end);
            }
        }
        self.next_idle_end = next;
        for id in due {
            let session = self.gpu.get_mut(&id).expect("listed above");
            session.ended = true;
            let owed = session.owed_rounding();
            let before = std::mem::replace(&mut session.rounding, owed.clone());
            let placed = self.rounding_parts(id.0, before.as_ref(), owed.as_ref());
            for p in &placed {
                self.put(p);
            }
            self.gpu_dirty.insert(id);
        }
    }
}

type Entries = Vec<(Py<PyBytes>, Py<PyBytes>)>;

#[pymethods]
impl WindowCore {
    /// `plan_of(account)`: the account's plan history (`PlanSpec`s, agents/window.py's
    /// `NativeBooks.plans`); `open_windows` and `gpu_sessions`: the store's `\x00o` and `\x00g`
    /// entries, raw (only running GPU sessions are kept in memory).
    #[new]
    #[pyo3(signature = (*, size, grace, horizon, idle_timeout, plan_of, read, open_windows, gpu_sessions, watermark))]
    #[allow(clippy::too_many_arguments)] // the window config and the shell's collaborators
    fn new(
        size: i64,
        grace: i64,
        horizon: i64,
        idle_timeout: i64,
        plan_of: Py<PyAny>,
        read: Py<PyAny>,
        open_windows: Vec<(Vec<u8>, Vec<u8>)>,
        gpu_sessions: Vec<(Vec<u8>, Vec<u8>)>,
        watermark: i64,
    ) -> PyResult<Self> {
        if size <= 0 {
            return Err(PyValueError::new_err("window size must be positive"));
        }
        let mut names = Names::default();
        let mut dims = DimsTable::default();
        let mut arith = Arith::new();
        let vocabulary = Vocabulary::new(&mut names);
        let mut open = FxHashMap::default();
        for (key, value) in open_windows {
            let bad = || PyValueError::new_err("unreadable open window in the store");
            let key = state::decode_key(&mut names, &mut dims, &key).ok_or_else(bad)?;
            open.insert(
                key,
                state::decode_tally(&mut names, &mut arith, &value).ok_or_else(bad)?,
            );
        }
        let mut gpu = FxHashMap::default();
        for (key, value) in gpu_sessions {
            let bad = || PyValueError::new_err("unreadable GPU session in the store");
            let (account, session_id) = session_names(&key).ok_or_else(bad)?;
            let id = (names.id(&account), names.id(&session_id));
            let session = GpuSession::decode(key, &value, &mut arith).ok_or_else(bad)?;
            if !session.ended {
                gpu.insert(id, session);
            }
        }
        let zero = arith.exact_of_i128(0);
        Ok(WindowCore {
            size,
            grace,
            horizon,
            idle_timeout,
            plan_of,
            read,
            names,
            dims,
            vocabulary,
            open,
            late: FxHashMap::default(),
            dirty: FxHashSet::default(),
            compute: FxHashMap::default(),
            gpu,
            gpu_dirty: FxHashSet::default(),
            rated_ids: FxHashMap::default(),
            watermark,
            stored_watermark: watermark,
            next_close: i64::MIN,
            next_idle_end: i64::MIN,
            plans: FxHashMap::default(),
            plans_generation: -1,
            arith,
            zero,
            live_names: 0,
        })
    }

    /// Start a poll: forget the plan histories read when the plan directory has changed since
    /// (`generation`), and the interned names no window holds any more, when they have piled up.
    pub fn begin_poll(&mut self, generation: i64) {
        if generation != self.plans_generation {
            self.plans.clear();
            self.rated_ids.clear();
            self.plans_generation = generation;
        }
        if self.names.len() > 2 * self.live_names + 100_000 {
            self.compact();
        }
    }

    /// Add a normalized event (what ingest wrote); returns None, or (reason, detail) when its
    /// usage is refused (nothing of it added).
    #[pyo3(name = "add")]
    fn add_normalized(
        &mut self,
        py: Python<'_>,
        body: &[u8],
    ) -> PyResult<Option<(&'static str, String)>> {
        let event = read_normalized(body, &mut self.arith)
            .map_err(|_| PyValueError::new_err("not a normalized event"))?;
        Ok(self
            .add(py, &event)?
            .err()
            .map(|r| (r.reason(), r.detail().to_string())))
    }

    #[getter]
    fn watermark(&self) -> i64 {
        self.watermark
    }

    fn __len__(&self) -> usize {
        self.open.len()
    }

    /// How many GPU sessions are running (metered, not ended yet).
    #[getter]
    fn running_sessions(&self) -> usize {
        self.gpu.values().filter(|s| !s.ended).count()
    }

    /// How many names (accounts, meters, dimensions, units, labels) the core holds interned.
    #[getter]
    fn interned(&self) -> usize {
        self.names.len()
    }

    /// The windows the watermark closed (`wall_clock`, when given, advances it first; GPU
    /// sessions idle for the timeout end before) and the adjustments, each sorted as Python
    /// sorts window keys: ([(open key, tally)], [...]). Closed windows leave the open set; their
    /// deletion is the caller's change to write.
    fn close(&mut self, py: Python<'_>, wall_clock: Option<i64>) -> PyResult<(Entries, Entries)> {
        if let Some(clock) = wall_clock {
            self.watermark = self.watermark.max(clock);
        }
        self.end_idle_sessions();
        let (size, reach) = (self.size, self.size + self.grace);
        let watermark = self.watermark;
        let mut closing: Vec<Key> = Vec::new();
        if watermark >= self.next_close {
            let mut next = i64::MAX;
            for key in self.open.keys() {
                let close_at = key.start - key.start.rem_euclid(size) + reach;
                if close_at <= watermark {
                    closing.push(*key);
                } else {
                    next = next.min(close_at);
                }
            }
            self.next_close = next;
        }
        closing.sort_by(|a, b| state::python_order(&self.names, &self.dims, a, b));
        let mut closed = Vec::with_capacity(closing.len());
        for key in closing {
            let tally = self.open.remove(&key).expect("listed above");
            self.dirty.remove(&key);
            closed.push(self.entry(py, &key, &tally)?);
        }
        let mut late: Vec<(Key, Tally)> = self.late.drain().collect();
        late.sort_by(|a, b| state::python_order(&self.names, &self.dims, &a.0, &b.0));
        let late = late
            .iter()
            .map(|(key, tally)| self.entry(py, key, tally))
            .collect::<PyResult<_>>()?;
        Ok((closed, late))
    }

    /// The state changes since the last call besides closing: open windows that changed,
    /// sessions, the watermark.
    fn changes(&mut self, py: Python<'_>) -> PyResult<Entries> {
        let bytes = |data: &[u8]| PyBytes::new(py, data).unbind();
        let mut out = Vec::with_capacity(self.dirty.len() + self.compute.len() + 1);
        for key in std::mem::take(&mut self.dirty) {
            out.push(self.entry(py, &key, &self.open[&key])?);
        }
        for (key, value) in self.compute.drain() {
            out.push((bytes(&key), bytes(&value)));
        }
        for id in std::mem::take(&mut self.gpu_dirty) {
            let session = &self.gpu[&id];
            out.push((bytes(&session.key), bytes(&session.encode())));
            if session.ended {
                self.gpu.remove(&id); // in the store from now on; read back if it runs on
            }
        }
        if self.watermark != self.stored_watermark {
            let text = self.watermark.to_string();
            out.push((bytes(WATERMARK), bytes(text.as_bytes())));
            self.stored_watermark = self.watermark;
        }
        Ok(out)
    }

    /// Every open window, as stored: [(open key, tally)].
    fn open_windows(&self, py: Python<'_>) -> PyResult<Entries> {
        self.open
            .iter()
            .map(|(key, tally)| self.entry(py, key, tally))
            .collect()
    }
}

impl WindowCore {
    /// Re-intern what the open and late windows hold, dropping every other name (accounts and
    /// dimensions of windows long closed). The plans are cleared first: they are keyed by id.
    fn compact(&mut self) {
        let (old_names, old_dims) = (
            std::mem::take(&mut self.names),
            std::mem::take(&mut self.dims),
        );
        self.vocabulary = Vocabulary::new(&mut self.names);
        let names = &mut self.names;
        let dims = &mut self.dims;
        let mut key_of = |key: &Key| {
            let mut name = |id: u32| names.id(old_names.get(id));
            let set: Vec<(u32, u32)> = old_dims
                .get(key.dims)
                .iter()
                .map(|&(k, v)| (name(k), name(v)))
                .collect();
            let (account, meter) = (name(key.account), name(key.meter));
            Key {
                account,
                meter,
                dims: dims.id(&set),
                start: key.start,
            }
        };
        let mut moved = |windows: FxHashMap<Key, Tally>| -> FxHashMap<Key, Tally> {
            windows
                .into_iter()
                .map(|(key, tally)| (key_of(&key), tally))
                .collect()
        };
        let open = moved(std::mem::take(&mut self.open));
        let late = moved(std::mem::take(&mut self.late));
        let dirty: FxHashSet<Key> = std::mem::take(&mut self.dirty)
            .iter()
            .map(&mut key_of)
            .collect();
        let names = &mut self.names;
        let retag = |tally: &mut Tally, names: &mut Names| {
            tally.unit = names.id(old_names.get(tally.unit));
            tally.version = names.id(old_names.get(tally.version));
            tally.provider = tally.provider.map(|p| names.id(old_names.get(p)));
            tally.book = tally.book.map(|b| names.id(old_names.get(b)));
        };
        let (mut open, mut late) = (open, late);
        open.values_mut()
            .chain(late.values_mut())
            .for_each(|tally| retag(tally, names));
        (self.open, self.late, self.dirty) = (open, late, dirty);
        let session_id = |id: &SessionId, names: &mut Names| {
            (names.id(old_names.get(id.0)), names.id(old_names.get(id.1)))
        };
        let gpu: FxHashMap<SessionId, GpuSession> = std::mem::take(&mut self.gpu)
            .into_iter()
            .map(|(id, session)| (session_id(&id, names), session))
            .collect();
        let gpu_dirty = std::mem::take(&mut self.gpu_dirty)
            .iter()
            .map(|id| session_id(id, names))
            .collect();
        (self.gpu, self.gpu_dirty) = (gpu, gpu_dirty);
        self.plans.clear();
        self.rated_ids.clear();
        self.live_names = self.names.len();
    }

    pub(crate) fn entry(
        &self,
        py: Python<'_>,
        key: &Key,
        tally: &Tally,
    ) -> PyResult<(Py<PyBytes>, Py<PyBytes>)> {
        let value = state::encode_tally(&self.names, tally)
            .ok_or_else(|| PyValueError::new_err("a window's count exceeds 2**64 - 1"))?;
        let key = state::encode_key(&self.names, &self.dims, key);
        Ok((
            PyBytes::new(py, &key).unbind(),
            PyBytes::new(py, &value).unbind(),
        ))
    }
}

/// (account, session id) of a session's state key (`\x00g` + msgpack [account, session id]).
fn session_names(key: &[u8]) -> Option<(String, String)> {
    let mut r = crate::msgpack::Reader::new(key.get(state::GPU_SESSION.len()..)?);
    (r.array()? == 2).then_some(())?;
    Some((r.str()?.to_string(), r.str()?.to_string()))
}
