//! What one event adds to windows, operation for operation as agents/window.py's `usage_of` and
//! `Windows._join_session` did before this core (and `agents.rating` still does for quotes): a GPU
//! heartbeat's hourly rate, an API request's overage and product units, storage's GB-seconds, a
//! compute session once both its ends are seen.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rustc_hash::FxHashMap;

use crate::decimal::Dec;
use crate::event::{api, gpu, session, storage, Event, Kind};
use crate::msgpack::{self, Reader, Value};
use crate::pricing::Book;
use crate::state::{Names, Qty, SESSION};
use crate::time::floor_seconds;
use crate::window::{repr, Refusal, WindowCore};

const MICROS: i64 = 1_000_000;

/// What an event adds to one window: meter, dimensions, quantity, amount, unit, provider.
pub(crate) struct Part {
    pub(crate) meter: u32,
    pub(crate) dims: u32,
    pub(crate) quantity: Qty,
    pub(crate) amount: Dec,
    pub(crate) unit: u32,
    pub(crate) provider: Option<u32>,
}

/// Ids of the fixed names, and of meters built from a name ("product:<id>", ...).
pub(crate) struct Vocabulary {
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
    pub(crate) fn new(names: &mut Names) -> Self {
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

impl WindowCore {
    /// `usage_of`: the metered parts of a GPU heartbeat, an API request or storage held.
    pub(crate) fn usage_of(
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
    pub(crate) fn join_session(
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
