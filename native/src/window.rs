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
use crate::event::{api, gpu, read_event, session, storage, Event, Kind, Mode};
use crate::json::Scanner;
use crate::msgpack::{self, Reader, Value};
use crate::pricing::{Book, Version};
use crate::state::{self, DimsTable, Key, Names, Qty, Tally, SESSION, WATERMARK};
use crate::time::{floor_seconds, isoformat};

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

/// What an event adds to one window: meter, dimensions, quantity, amount, unit, provider.
struct Part {
    meter: u32,
    dims: u32,
    quantity: Qty,
    amount: Dec,
    unit: u32,
    provider: Option<u32>,
}

struct Plan {
    book: usize,
    api_tier: Option<String>,
    compute_user_type: Option<String>,
}

/// Ids of the fixed names, and of meters built from a name ("product:<id>", ...).
struct Vocabulary {
    gpu: u32,
    api_overage: u32,
    gpu_model: u32,
    provider_id: u32,
    tier: u32,
    gpu_hour: u32,
    request: u32,
    gb_month: u32,
    hour: u32,
    derived: FxHashMap<(u8, u32), u32>,
}

impl Vocabulary {
    fn new(names: &mut Names) -> Self {
        Vocabulary {
            gpu: names.id("gpu"),
            api_overage: names.id("api_overage"),
            gpu_model: names.id("gpu_model"),
            provider_id: names.id("provider_id"),
            tier: names.id("tier"),
            gpu_hour: names.id("gpu_hour"),
            request: names.id("request"),
            gb_month: names.id("gb_month"),
            hour: names.id("hour"),
            derived: FxHashMap::default(),
        }
    }

    /// The meter `<prefix><name>` (prefix 0: product, 1: storage, 2: compute), interned once.
    fn meter(&mut self, names: &mut Names, prefix: u8, name: &str) -> u32 {
        let name_id = names.id(name);
        if let Some(&id) = self.derived.get(&(prefix, name_id)) {
            return id;
        }
        let text = ["product:", "storage:", "compute:"][usize::from(prefix)];
        let id = names.id(&format!("{text}{name}"));
        self.derived.insert((prefix, name_id), id);
        id
    }
}

#[pyclass(module = "tally_native")]
pub struct WindowCore {
    size: i64,
    grace: i64,
    horizon: i64,
    plan_of: Py<PyAny>,
    read: Py<PyAny>,
    book_data: Py<PyAny>,
    pub(crate) names: Names,
    dims: DimsTable,
    vocabulary: Vocabulary,
    open: FxHashMap<Key, Tally>,
    late: FxHashMap<Key, Tally>,
    dirty: FxHashSet<Key>,
    /// Compute sessions one end of which this poll saw: key -> SessionSide (empty: joined).
    sessions: FxHashMap<Vec<u8>, Vec<u8>>,
    watermark: i64,
    stored_watermark: i64,
    /// This poll's plans (the plan directory refreshes between polls), by account id.
    plans: FxHashMap<u32, Plan>,
    books: Vec<(Py<PyAny>, Book)>,
    pub(crate) arith: Arith,
    zero: Dec,
    one: Dec,
    /// Interned names after the last compaction: names of windows long closed are dropped once
    /// the table has doubled (and grown by 100,000) since, so memory follows the live windows.
    live_names: usize,
}

fn repr(py: Python<'_>, text: &str) -> String {
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

    fn version(&self, book: usize, index: usize) -> &Version {
        &self.books[book].1.versions[index]
    }

    /// `usage_of`: the metered parts of a GPU heartbeat, an API request or storage held.
    fn usage_of(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        book: usize,
        index: usize,
        start: i64,
    ) -> Result<Vec<Part>, Refusal> {
        let label = |books: &[(Py<PyAny>, Book)]| books[book].1.versions[index].label.clone();
        match event.kind {
            Kind::Gpu => {
                let model = event.str(gpu::GPU_MODEL).unwrap_or_default();
                let provider = event.str(gpu::PROVIDER_ID).unwrap_or_default();
                let (hourly, billable) = {
                    let version = &self.books[book].1.versions[index];
                    let Some(rates) = version
                        .gpu
                        .as_ref()
                        .filter(|r| r.base_rate_per_hour.contains_key(&*model))
                    else {
                        let detail = format!(
                            "no GPU rate for {} in price book {}",
                            repr(py, &model),
                            label(&self.books)
                        );
                        return Err(Refusal::Unpriced(detail));
                    };
                    let demand = (!rates.demand_schedule.is_empty())
                        .then(|| rates.demand_at(start * MICROS, &model));
                    let minimum = rates.provider_minimum_per_hour.get(&*provider).copied();
                    let total = event.dec(gpu::VRAM_TOTAL).unwrap_or(self.zero);
                    let allocated = event.dec(gpu::VRAM_ALLOCATED).unwrap_or(self.zero);
                    let power = event.dec(gpu::POWER).unwrap_or(self.zero);
                    let arith = &mut self.arith;
                    // agents.rating.gpu_hourly_rate, operation for operation.
                    let compute = if rates.per_gb_hour {
                        arith.mul(
                            &allocated,
                            &rates.vram_rate_per_gb_hour.unwrap_or(self.zero),
                        )
                    } else {
                        let share = if arith.cmp(&total, &self.zero).is_gt() {
                            arith.div(&allocated, &total)
                        } else {
                            self.one
                        };
                        arith.mul(&rates.base_rate_per_hour[&*model], &share)
                    };
                    let watts = arith.mul(&power, &rates.power_rate_per_watt_hour);
                    let mut hourly = arith.add(&compute, &watts);
                    let multiplier = demand.unwrap_or(rates.demand_multiplier);
                    if arith.cmp(&multiplier, &self.one).is_ne() {
                        hourly = arith.mul(&hourly, &multiplier);
                    }
                    if let Some(floor) = minimum.filter(|m| !m.is_zero()) {
                        if arith.cmp(&floor, &hourly).is_gt() {
                            hourly = floor;
                        }
                    }
                    let count = event.int(gpu::GPU_COUNT).unwrap_or(1);
                    let interval = event.int(gpu::INTERVAL).unwrap_or(0);
                    (hourly, rates.billable_seconds(interval) * count)
                };
                let seconds = self.arith.of_u64(billable);
                let amount = self.arith.mul(&seconds, &hourly);
                let (model_id, provider_id) = (self.names.id(&model), self.names.id(&provider));
                let v = &self.vocabulary;
                let dims = self
                    .dims
                    .id(&[(v.gpu_model, model_id), (v.provider_id, provider_id)]);
                let part = Part {
                    meter: v.gpu,
                    dims,
                    quantity: Qty::Dec(seconds),
                    amount,
                    unit: v.gpu_hour,
                    provider: Some(provider_id),
                };
                Ok(vec![part])
            }
            Kind::Api => {
                let mut parts = Vec::with_capacity(2);
                let tier = self.plans[&account].api_tier.clone();
                if let Some(tier) = tier {
                    if !self.version(book, index).api_tiers.contains(&tier) {
                        let detail = format!(
                            "no API tier {} in price book {}",
                            repr(py, &tier),
                            label(&self.books)
                        );
                        return Err(Refusal::Unpriced(detail));
                    }
                    let tier_id = self.names.id(&tier);
                    let dims = self.dims.id(&[(self.vocabulary.tier, tier_id)]);
                    let requests = i128::from(event.int(api::REQUEST_COUNT).unwrap_or(0));
                    parts.push(Part {
                        meter: self.vocabulary.api_overage,
                        dims,
                        quantity: Qty::Int(requests),
                        amount: self.zero,
                        unit: self.vocabulary.request,
                        provider: None,
                    });
                }
                if let Some(product) = event.str(api::PRODUCT_ID) {
                    if let Some(unit) = self
                        .version(book, index)
                        .product_units
                        .get(&*product)
                        .cloned()
                    {
                        let tokens = event.int(api::TOKENS_IN).unwrap_or(0)
                            + event.int(api::TOKENS_OUT).unwrap_or(0);
                        let meter = self.vocabulary.meter(&mut self.names, 0, &product);
                        parts.push(Part {
                            meter,
                            dims: 0,
                            quantity: Qty::Int(i128::from(tokens)),
                            amount: self.zero,
                            unit: self.names.id(&unit),
                            provider: None,
                        });
                    }
                }
                Ok(parts)
            }
            Kind::Storage => {
                let kind = event.str(storage::KIND).unwrap_or_default();
                let Some(per_gb_month) = self
                    .version(book, index)
                    .storage_per_gb_month
                    .get(&*kind)
                    .copied()
                else {
                    let detail = format!(
                        "no storage rate for {} in price book {}",
                        repr(py, &kind),
                        label(&self.books)
                    );
                    return Err(Refusal::Unpriced(detail));
                };
                let gb = event.dec(storage::GB).unwrap_or(self.zero);
                let duration = self.arith.of_u64(event.int(storage::DURATION).unwrap_or(0));
                let gb_seconds = self.arith.mul(&gb, &duration);
                let amount = self.arith.mul(&gb_seconds, &per_gb_month);
                let meter = self.vocabulary.meter(&mut self.names, 1, &kind);
                let unit = self.vocabulary.gb_month;
                Ok(vec![Part {
                    meter,
                    dims: 0,
                    quantity: Qty::Dec(gb_seconds),
                    amount,
                    unit,
                    provider: None,
                }])
            }
            Kind::SessionStarted | Kind::SessionEnded => Ok(Vec::new()),
        }
    }

    /// Seed 002's compute sessions (`Windows._join_session`): the first end seen waits in state,
    /// the second charges the session in the end's window. Ok(Some((end time, parts))) once both
    /// ends are seen.
    #[allow(clippy::type_complexity)]
    fn join_session(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        book: usize,
        index: usize,
    ) -> PyResult<Result<Option<(i64, Vec<Part>)>, Refusal>> {
        let session_id = event.str(session::SESSION_ID).unwrap_or_default();
        let mut key = SESSION.to_vec();
        msgpack::write_array_len(&mut key, 2);
        msgpack::write_str(&mut key, &event.subject);
        msgpack::write_str(&mut key, &session_id);
        let raw: Option<Vec<u8>> = match self.sessions.get(&key) {
            Some(pending) => (!pending.is_empty()).then(|| pending.clone()),
            None => self
                .read
                .bind(py)
                .call1((PyBytes::new(py, &key),))?
                .extract()?,
        };
        let mut seen = match raw.as_deref().filter(|r| !r.is_empty()) {
            Some(raw) => SessionSide::decode(raw)
                .ok_or_else(|| PyValueError::new_err("unreadable session state"))?,
            None => SessionSide::default(),
        };
        let at = floor_seconds(event.time_us);
        let user_type = self.plans[&account].compute_user_type.clone();
        let version = &self.books[book].1.versions[index];
        if event.kind == Kind::SessionStarted {
            let tier = event.str(session::RESOURCE_TIER).map(|t| t.into_owned());
            if let (Some(tier), Some(user)) = (&tier, user_type.as_ref().filter(|u| !u.is_empty()))
            {
                if !version
                    .compute_per_hour
                    .get(user)
                    .is_some_and(|rates| rates.contains_key(tier))
                {
                    let detail = format!(
                        "no compute rate for {} x {} in {}",
                        repr(py, user),
                        repr(py, tier),
                        version.label
                    );
                    return Ok(Err(Refusal::Unpriced(detail)));
                }
            }
            seen.started_at = Some(at);
            seen.resource_tier = tier;
        } else {
            seen.ended_at = Some(at);
            seen.duration = event.int(session::DURATION).map(i128::from);
        }
        let (Some(started_at), Some(ended_at)) = (seen.started_at, seen.ended_at) else {
            self.sessions.insert(key, seen.encode());
            return Ok(Ok(None));
        };
        self.sessions.insert(key, Vec::new()); // joined: the session leaves the state
        let seconds = seen
            .duration
            .unwrap_or_else(|| i128::from((ended_at - started_at).max(0)));
        let rate = seen.resource_tier.as_ref().and_then(|tier| {
            version
                .compute_per_hour
                .get(user_type.as_deref().unwrap_or(""))
                .and_then(|rates| rates.get(tier))
        });
        let (Some(rate), Some(tier)) = (rate.copied(), seen.resource_tier) else {
            return Ok(Ok(None)); // no priced tier or user type: usage, not a charge
        };
        let quantity = self.arith.of_i128(seconds);
        let amount = self.arith.mul(&quantity, &rate);
        let meter = self.vocabulary.meter(&mut self.names, 2, &tier);
        let part = Part {
            meter,
            dims: 0,
            quantity: Qty::Dec(quantity),
            amount,
            unit: self.vocabulary.hour,
            provider: None,
        };
        Ok(Ok(Some((ended_at, vec![part]))))
    }
}

/// `agents.window.SessionSide`: [started_at, resource_tier, ended_at, duration].
#[derive(Default)]
struct SessionSide {
    started_at: Option<i64>,
    resource_tier: Option<String>,
    ended_at: Option<i64>,
    duration: Option<i128>,
}

impl SessionSide {
    fn decode(raw: &[u8]) -> Option<SessionSide> {
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
        Some(SessionSide {
            started_at: int(0).and_then(|v| i64::try_from(v).ok()),
            resource_tier: tier,
            ended_at: int(2).and_then(|v| i64::try_from(v).ok()),
            duration: int(3),
        })
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        msgpack::write_array_len(&mut out, 4);
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
        out
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
        let mut scanner = Scanner::new(body);
        let event = read_event(
            &mut scanner,
            Mode::Trusted,
            &mut self.arith,
            None,
            &mut Vec::new(),
        )
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
