//! The window core's adding side: what agents/window.py's `Windows.add` did per event, compiled.
//! An accepted event's usage goes into the tumbling window of its event time per (account,
//! meter, dimensions); the watermark is the latest event time seen; an event for a window the
//! watermark already closed (end + grace) within the correction horizon is an adjustment (held
//! apart until the next close); older is `too_late`; an event its price book cannot price is
//! `unpriced` (nothing of it is added). Amounts are computed per event exactly as
//! `agents.rating.gpu_hourly_rate` and friends compute them, in the same decimal arithmetic
//! (`decimal.rs`), so a window holds the very sums the Python core held. Closing and rating a
//! window stays in Python (`Windows.close`): once per charge row, not per event.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::decimal::{Arith, Dec};
use crate::event::{read_normalized, Event, Kind};
use crate::pricing::{Book, Version};
use crate::state::{self, DimsTable, Key, Names, Tally, WATERMARK};
use crate::time::{floor_seconds, isoformat};
use crate::usage::Vocabulary;

const MICROS: i64 = 1_000_000;

/// Why an event's usage was not added (the meter dead-letters it with this reason and detail).
pub enum Refusal {
    TooLate(String),
    Unpriced(String),
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLate(_) => "too_late",
            Refusal::Unpriced(_) => "unpriced",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            Refusal::TooLate(d) | Refusal::Unpriced(d) => d,
        }
    }
}

pub(crate) struct Plan {
    pub(crate) book: usize,
    pub(crate) api_tier: Option<String>,
    pub(crate) compute_user_type: Option<String>,
}

#[pyclass(module = "tally_native")]
pub struct WindowCore {
    pub(crate) size: i64,
    pub(crate) grace: i64,
    pub(crate) horizon: i64,
    pub(crate) plan_of: Py<PyAny>,
    pub(crate) read: Py<PyAny>,
    pub(crate) book_data: Py<PyAny>,
    pub(crate) names: Names,
    pub(crate) dims: DimsTable,
    pub(crate) vocabulary: Vocabulary,
    pub(crate) open: FxHashMap<Key, Tally>,
    pub(crate) late: FxHashMap<Key, Tally>,
    pub(crate) dirty: FxHashSet<Key>,
    /// Compute sessions one end of which this poll saw: key -> SessionSide (empty: joined).
    pub(crate) sessions: FxHashMap<Vec<u8>, Vec<u8>>,
    pub(crate) watermark: i64,
    pub(crate) stored_watermark: i64,
    /// This poll's plans (the plan directory refreshes between polls), by account id.
    pub(crate) plans: FxHashMap<u32, Plan>,
    pub(crate) books: Vec<(Py<PyAny>, Book)>,
    pub(crate) arith: Arith,
    pub(crate) zero: Dec,
    pub(crate) one: Dec,
    /// Interned names after the last compaction: names of windows long closed are dropped once
    /// the table has doubled (and grown by 100,000) since, so memory follows the live windows.
    pub(crate) live_names: usize,
}

/// Python's `repr()` of a string, as the dead-letter details of agents/window.py spelled names.
pub(crate) fn repr(py: Python<'_>, text: &str) -> String {
    PyString::new(py, text)
        .repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| format!("{text:?}"))
}

impl WindowCore {
    fn plan(&mut self, py: Python<'_>, account: u32) -> PyResult<&Plan> {
        if !self.plans.contains_key(&account) {
            let plan = self.plan_of.bind(py).call1((self.names.get(account),))?;
            let book = plan.getattr("book")?;
            let index = match self.books.iter().position(|(b, _)| b.bind(py).is(&book)) {
                Some(index) => index,
                None => {
                    let data = self.book_data.bind(py).call1((&book,))?;
                    let parsed = Book::from_py(&data, &mut self.arith)?;
                    self.books.push((book.unbind(), parsed));
                    self.books.len() - 1
                }
            };
            let api_tier: Option<String> = plan.getattr("api_tier")?.extract()?;
            let compute_user_type: Option<String> = plan.getattr("compute_user_type")?.extract()?;
            self.plans.insert(
                account,
                Plan {
                    book: index,
                    api_tier,
                    compute_user_type,
                },
            );
        }
        Ok(&self.plans[&account])
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
        let mut start = moment - moment.rem_euclid(self.size);
        let account = self.names.id(&event.subject);
        let book = self.plan(py, account)?.book;
        let Some(mut version_index) = self.version_index(book, start) else {
            return Ok(Err(self.no_version(py, book, start)));
        };
        let parts = if matches!(event.kind, Kind::SessionStarted | Kind::SessionEnded) {
            match self.join_session(py, event, account, book, version_index)? {
                Err(refusal) => return Ok(Err(refusal)),
                Ok(None) => Vec::new(),
                Ok(Some((ended_at, parts))) => {
                    // Both ends seen: the session is charged in its end's window.
                    start = ended_at.div_euclid(self.size) * self.size;
                    match self.version_index(book, start) {
                        Some(index) => version_index = index,
                        None => return Ok(Err(self.no_version(py, book, start))),
                    }
                    parts
                }
            }
        } else {
            match self.usage_of(py, event, account, book, version_index, start) {
                Ok(parts) => parts,
                Err(refusal) => return Ok(Err(refusal)),
            }
        };
        let label = self.books[book].1.versions[version_index].label.clone();
        let version = self.names.id(&label);
        let closed_before = start + self.size + self.grace <= self.watermark;
        for part in &parts {
            let key = Key {
                account,
                meter: part.meter,
                dims: part.dims,
                start,
            };
            if let Some(tally) = self.open.get_mut(&key) {
                tally.add(&mut self.arith, &part.quantity, &part.amount);
                self.dirty.insert(key);
                continue;
            }
            let fresh = Tally::empty(&part.quantity, part.unit, version, part.provider, self.zero);
            if closed_before {
                // The window was closed: an adjustment, rated with the poll's other late events.
                let tally = self.late.entry(key).or_insert(fresh);
                tally.add(&mut self.arith, &part.quantity, &part.amount);
                continue;
            }
            let tally = self.open.entry(key).or_insert(fresh);
            tally.add(&mut self.arith, &part.quantity, &part.amount);
            self.dirty.insert(key);
        }
        if moment > self.watermark {
            self.watermark = moment;
        }
        Ok(Ok(()))
    }

    fn version_index(&self, book: usize, start: i64) -> Option<usize> {
        let versions = &self.books[book].1.versions;
        versions
            .iter()
            .rposition(|v| v.effective_from_us <= start * MICROS)
    }

    fn no_version(&self, py: Python<'_>, book: usize, start: i64) -> Refusal {
        let name = repr(py, &self.books[book].1.name);
        Refusal::Unpriced(format!(
            "price book {name} has no version in force at {}",
            isoformat(start * MICROS)
        ))
    }

    pub(crate) fn version(&self, book: usize, index: usize) -> &Version {
        &self.books[book].1.versions[index]
    }
}

type Entries = Vec<(Py<PyBytes>, Py<PyBytes>)>;

#[pymethods]
impl WindowCore {
    /// `open_windows`: the store's `\x00o` entries, raw; `book_data(book)`: agents.window's
    /// `native_book` (what this core reads of a price book).
    #[new]
    #[allow(clippy::too_many_arguments)] // the window config and the shell's collaborators
    fn new(
        size: i64,
        grace: i64,
        horizon: i64,
        plan_of: Py<PyAny>,
        read: Py<PyAny>,
        book_data: Py<PyAny>,
        open_windows: Vec<(Vec<u8>, Vec<u8>)>,
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
        let zero = arith.of_u64(0);
        let one = arith.of_u64(1);
        Ok(WindowCore {
            size,
            grace,
            horizon,
            plan_of,
            read,
            book_data,
            names,
            dims,
            vocabulary,
            open,
            late: FxHashMap::default(),
            dirty: FxHashSet::default(),
            sessions: FxHashMap::default(),
            watermark,
            stored_watermark: watermark,
            plans: FxHashMap::default(),
            books: Vec::new(),
            arith,
            zero,
            one,
            live_names: 0,
        })
    }

    /// Forget the plans read so far (the plan directory may have changed since the last poll),
    /// and the interned names no window holds any more, when they have piled up.
    pub fn begin_poll(&mut self) {
        self.plans.clear();
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

    /// How many names (accounts, meters, dimensions, units, labels) the core holds interned.
    #[getter]
    fn interned(&self) -> usize {
        self.names.len()
    }

    /// The windows the watermark closed (`wall_clock`, when given, advances it first) and the
    /// adjustments, each sorted as Python sorts window keys: ([(open key, tally)], [...]).
    /// Closed windows leave the open set; their deletion is the caller's change to write.
    fn close(&mut self, py: Python<'_>, wall_clock: Option<i64>) -> PyResult<(Entries, Entries)> {
        if let Some(clock) = wall_clock {
            self.watermark = self.watermark.max(clock);
        }
        let reach = self.size + self.grace;
        let mut closing: Vec<Key> = self
            .open
            .keys()
            .filter(|k| k.start + reach <= self.watermark)
            .copied()
            .collect();
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
    /// compute sessions' ends, the watermark.
    fn changes(&mut self, py: Python<'_>) -> PyResult<Entries> {
        let mut out = Vec::with_capacity(self.dirty.len() + self.sessions.len() + 1);
        for key in std::mem::take(&mut self.dirty) {
            let tally = self.open[&key].clone();
            out.push(self.entry(py, &key, &tally)?);
        }
        for (key, value) in self.sessions.drain() {
            out.push((
                PyBytes::new(py, &key).unbind(),
                PyBytes::new(py, &value).unbind(),
            ));
        }
        if self.watermark != self.stored_watermark {
            let text = self.watermark.to_string();
            out.push((
                PyBytes::new(py, WATERMARK).unbind(),
                PyBytes::new(py, text.as_bytes()).unbind(),
            ));
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
        };
        let (mut open, mut late) = (open, late);
        open.values_mut()
            .chain(late.values_mut())
            .for_each(|tally| retag(tally, names));
        (self.open, self.late, self.dirty) = (open, late, dirty);
        self.plans.clear();
        self.live_names = self.names.len();
    }

    fn entry(
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
