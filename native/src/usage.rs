//! What one event adds to windows (docs/PRICING.md has each rule): a GPU heartbeat's exact
//! seconds at its hourly rate (and its session's running total, sessions.rs), an API request's
//! billable requests and product units, storage's GB-seconds, a compute session once both its
//! ends are seen. Every amount is exact: `Wide` products of the event's decimals and the book's
//! prices; a GPU rate with a VRAM share keeps the card's total VRAM as its denominator.
//! Amounts are per second for the time meters (GPU, storage, compute): the close divides once.

use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rustc_hash::FxHashMap;

use dec::{Context, Decimal};

use crate::decimal::{Dec, Exact, Wide};
use crate::event::{api, gpu, session, storage, Event, Kind};
use crate::msgpack;
use crate::sessions::{ComputeSession, GpuSession};
use crate::spec::{Book, Plan, PlanHistory, Version};
use crate::state::{Key, Names, Part, Qty, GPU_SESSION, SESSION};
use crate::time::floor_seconds;
use crate::window::{repr, Placed, Refusal, WindowCore};

/// Ids of the fixed names, and of meters built from a name ("product:<id>", ...).
pub(crate) struct Vocabulary {
    pub(crate) gpu: u32,
    pub(crate) api_overage: u32,
    pub(crate) gpu_model: u32,
    pub(crate) provider_id: u32,
    tier: u32,
    pub(crate) gpu_hour: u32,
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

/// What prices one GPU heartbeat: the book's rates for its model and provider, and the event's
/// quantities.
struct GpuInputs {
    base: Dec,
    allocated: Dec,
    total: Dec,
    power: Dec,
    power_rate: Dec,
    vram_rate: Option<Dec>, // per GB-hour pricing
    demand: Dec,
    floor: Option<Dec>, // the provider's minimum hourly rate
    count: u64,
    count_dec: Dec,
    interval: Dec,
}

/// A heartbeat's hourly rate for all its GPUs as numerator / denominator (a VRAM share that does
/// not come out even, such as 10 of 24 GB, stays a fraction: (base x allocated + watts x total) /
/// total), times demand, floored at the provider's minimum; and its amount (rate x seconds). In
/// any width: the caller reads the context's inexact flag.
fn gpu_rate<const N: usize>(
    cx: &mut Context<Decimal<N>>,
    i: &GpuInputs,
    one: Dec,
) -> (Decimal<N>, Dec, Decimal<N>) {
    let equal = |cx: &mut Context<Decimal<N>>, a: &Decimal<N>, b: &Dec| {
        cx.partial_cmp(a, b) == Some(std::cmp::Ordering::Equal)
    };
    let mut watts = cx.to_width(i.power);
    cx.mul(&mut watts, &i.power_rate);
    let (mut numerator, mut denominator) = if let Some(vram_rate) = &i.vram_rate {
        let mut compute = cx.to_width(i.allocated);
        cx.mul(&mut compute, vram_rate);
        cx.add(&mut compute, &watts);
        (compute, one)
    } else if !i.total.is_zero() {
        // The share of the card, when it comes out even (12 of 24 GB, 20 of 80: nearly always);
        // else (base x allocated + watts x total) over the total.
        let status = cx.status();
        cx.clear_status();
        let mut share = cx.to_width(i.allocated);
        cx.div(&mut share, &i.total);
        let even = !cx.status().inexact();
        cx.set_status(status);
        let mut compute = cx.to_width(i.base);
        if even {
            cx.mul(&mut compute, &share);
            cx.add(&mut compute, &watts);
            (compute, one)
        } else {
            cx.mul(&mut compute, &i.allocated);
            cx.mul(&mut watts, &i.total);
            cx.add(&mut compute, &watts);
            (compute, i.total)
        }
    } else {
        let mut compute = cx.to_width(i.base);
        cx.add(&mut compute, &watts);
        (compute, one)
    };
    let demand = cx.to_width(i.demand);
    if !equal(cx, &demand, &one) {
        cx.mul(&mut numerator, &i.demand);
    }
    if let Some(floor) = i.floor.filter(|f| !f.is_zero()) {
        // max(rate, floor): floor x denominator against the numerator.
        let mut scaled = cx.to_width(floor);
        cx.mul(&mut scaled, &denominator);
        if cx.partial_cmp(&scaled, &numerator) == Some(std::cmp::Ordering::Greater) {
            (numerator, denominator) = (cx.to_width(floor), one);
        }
    }
    let mut rate = numerator;
    if i.count != 1 {
        cx.mul(&mut rate, &i.count_dec);
    }
    let mut amount = rate;
    cx.mul(&mut amount, &i.interval);
    (rate, denominator, amount)
}

/// The plan and price-book version in force at one moment, and the window they put it in.
struct Rated {
    plan: Arc<Plan>,
    book: Arc<Book>,
    version: Arc<Version>,
    since: i64,
    start: i64,
}

/// A session's state key: `prefix` + msgpack [account, session id].
fn session_key(prefix: &[u8], account: &str, session_id: &str) -> Vec<u8> {
    let mut key = prefix.to_vec();
    msgpack::write_array_len(&mut key, 2);
    msgpack::write_str(&mut key, account);
    msgpack::write_str(&mut key, session_id);
    key
}

impl WindowCore {
    /// The plan and version in force at `moment`, or why the account's usage cannot be priced.
    fn rated_at(&self, py: Python<'_>, plans: &PlanHistory, moment: i64) -> Result<Rated, Refusal> {
        let plan = plans.at(moment).clone();
        let Some(book) = plan.book.clone() else {
            let why = plan.unpriced.clone();
            return Err(Refusal::Unpriced(
                why.unwrap_or_else(|| "the account's plan has no price book".into()),
            ));
        };
        let Some(index) = book.version_at(moment) else {
            return Err(Refusal::Unpriced(format!(
                "price book {} has no version in force at {}",
                repr(py, &book.name),
                crate::time::isoformat(moment * 1_000_000)
            )));
        };
        let version = book.versions[index].clone();
        let since = plan.effective_from.max(version.effective_from);
        let start = self.window_start(moment, since);
        Ok(Rated {
            plan,
            book,
            version,
            since,
            start,
        })
    }

    /// The interned (version label, book name) of a rating, once per version and book.
    fn rated_ids(&mut self, rated: &Rated) -> (u32, u32) {
        let address = (
            Arc::as_ptr(&rated.version) as usize,
            Arc::as_ptr(&rated.book) as usize,
        );
        if let Some(&ids) = self.rated_ids.get(&address) {
            return ids;
        }
        let ids = (
            self.names.id(&rated.version.label),
            self.names.id(&rated.book.name),
        );
        self.rated_ids.insert(address, ids);
        ids
    }

    fn placed(&mut self, rated: &Rated, account: u32, start: i64, part: Part) -> Placed {
        let (version, book) = self.rated_ids(rated);
        Placed {
            key: Key {
                account,
                meter: part.meter,
                dims: part.dims,
                start,
            },
            part,
            version,
            book,
            since: rated.since,
        }
    }

    /// An amount over `denominator` as a part's (amount, fraction): over 1, the amount itself.
    fn over(&mut self, numerator: Exact, denominator: Dec) -> (Exact, Option<Box<(Dec, Wide)>>) {
        let one = self.arith.of_u64(1);
        if self.arith.cmp(&denominator, &one).is_eq() {
            (numerator, None)
        } else {
            let wide = self.arith.wide_of(&numerator);
            (self.zero.clone(), Some(Box::new((denominator, wide))))
        }
    }

    /// What `event` adds, and where; nothing is changed when it is refused.
    pub(crate) fn usage_of(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        plans: &PlanHistory,
        moment: i64,
    ) -> PyResult<Result<Vec<Placed>, Refusal>> {
        let rated = match self.rated_at(py, plans, moment) {
            Ok(rated) => rated,
            Err(refusal) => return Ok(Err(refusal)),
        };
        Ok(match event.kind {
            Kind::Gpu => return self.heartbeat(py, event, account, &rated),
            Kind::Api => self.api_request(py, event, account, &rated),
            Kind::Storage => self.storage(py, event, account, &rated),
            Kind::SessionStarted | Kind::SessionEnded => {
                return self.session_event(py, event, account, plans, &rated)
            }
        })
    }

    /// A GPU heartbeat: its seconds at its hourly rate (VRAM share or GB, power, demand at its
    /// time, floored at the provider's minimum), all its GPUs, and its session's running total.
    fn heartbeat(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        rated: &Rated,
    ) -> PyResult<Result<Vec<Placed>, Refusal>> {
        let model = event.str(gpu::GPU_MODEL).unwrap_or_default();
        let provider = event.str(gpu::PROVIDER_ID).unwrap_or_default();
        let Some(rates) = rated
            .version
            .gpu
            .clone()
            .filter(|r| r.base_rate_per_hour.contains_key(&*model))
        else {
            let detail = format!(
                "no GPU rate for {} in price book {}",
                repr(py, &model),
                rated.version.label
            );
            return Ok(Err(Refusal::Unpriced(detail)));
        };
        let moment = floor_seconds(event.time_us);
        let zero = self.arith.of_u64(0);
        let one = self.arith.of_u64(1);
        let (count, interval) = (
            event.int(gpu::GPU_COUNT).unwrap_or(1),
            event.int(gpu::INTERVAL).unwrap_or(0),
        );
        let inputs = GpuInputs {
            base: rates.base_rate_per_hour[&*model],
            allocated: event.dec(gpu::VRAM_ALLOCATED).unwrap_or(zero),
            total: event.dec(gpu::VRAM_TOTAL).unwrap_or(zero),
            power: event.dec(gpu::POWER).unwrap_or(zero),
            power_rate: rates.power_rate_per_watt_hour,
            vram_rate: rates
                .per_gb_hour
                .then(|| rates.vram_rate_per_gb_hour.unwrap_or(zero)),
            demand: rates.demand_at(moment, &model),
            floor: rates.provider_minimum_per_hour.get(&*provider).copied(),
            count,
            count_dec: self.arith.of_u64(count),
            interval: self.arith.of_u64(interval),
        };
        let (count, interval) = (
            i64::try_from(count).unwrap_or(1),
            i64::try_from(interval).unwrap_or(0),
        );
        let arith = &mut self.arith;
        arith.narrow.clear_status();
        let narrow = gpu_rate(&mut arith.narrow, &inputs, one);
        let (rate, denominator, amount) = if arith.narrow.status().inexact() {
            // Beyond 36 digits: the same, exactly, in the wide type.
            arith.wide.clear_status();
            let (rate, denominator, amount) = gpu_rate(&mut arith.wide, &inputs, one);
            if arith.wide.status().inexact() {
                return Ok(Err(Refusal::Unpriced(
                    "the heartbeat's amount exceeds exact arithmetic (180 digits)".into(),
                )));
            }
            (
                Exact::Wide(Box::new(rate)),
                denominator,
                Exact::Wide(Box::new(amount)),
            )
        } else {
            let (rate, denominator, amount) = narrow;
            (Exact::Narrow(rate), denominator, Exact::Narrow(amount))
        };
        let (model_id, provider_id) = (self.names.id(&model), self.names.id(&provider));
        let v = &self.vocabulary;
        let dims = self
            .dims
            .id(&[(v.gpu_model, model_id), (v.provider_id, provider_id)]);
        let (amount, fraction) = self.over(amount, denominator);
        let part = Part {
            meter: self.vocabulary.gpu,
            dims,
            quantity: Qty::Int(i128::from(interval * count)),
            amount,
            fraction,
            unit: self.vocabulary.gpu_hour,
            provider: Some(provider_id),
            fee_percent: Some(rates.platform_fee_percent),
        };
        let mut placed = vec![self.placed(rated, account, rated.start, part)];
        // The session: its time so far, its latest heartbeat, its rounding once ended.
        let session_id = event.str(gpu::SESSION_ID).unwrap_or_default();
        let id = (account, self.names.id(&session_id));
        if !self.gpu.contains_key(&id) {
            let key = session_key(GPU_SESSION, &event.subject, &session_id);
            let session = match self.stored_session(py, key.clone())? {
                Some(session) => session,
                None => GpuSession::new(key, self.zero.clone(), one),
            };
            self.gpu.insert(id, session);
        }
        let session = self.gpu.get_mut(&id).expect("inserted above");
        session.seconds += interval;
        let later = match event.time_us.cmp(&session.last_us) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => {
                let identity = [event.source.as_bytes(), b"\0", event.id.as_bytes()].concat();
                identity > session.last_identity
            }
        };
        if later {
            session.last_us = event.time_us;
            session.last_identity.clear();
            session
                .last_identity
                .extend_from_slice(event.source.as_bytes());
            session.last_identity.push(0);
            session.last_identity.extend_from_slice(event.id.as_bytes());
            session.last_interval = interval;
            session.gpu_count = count;
            session.numerator = rate;
            session.denominator = denominator;
            session.window.set(
                rated.start,
                &model,
                &provider,
                &rated.version.label,
                &rated.book.name,
                rated.since,
                Some(rates.platform_fee_percent),
            );
            session.granularity = rates.billing_granularity_seconds;
            session.minimum = rates.minimum_session_seconds;
            self.next_idle_end = self.next_idle_end.min(session.idle_end(self.idle_timeout));
        }
        if session.ended || session.rounding.is_some() {
            let owed = session.owed_rounding();
            let before = std::mem::replace(&mut session.rounding, owed.clone());
            placed.extend(self.rounding_parts(account, before.as_ref(), owed.as_ref()));
        }
        self.gpu_dirty.insert(id);
        Ok(Ok(placed))
    }

    fn stored_session(&mut self, py: Python<'_>, key: Vec<u8>) -> PyResult<Option<GpuSession>> {
        let raw: Option<Vec<u8>> = self
            .read
            .bind(py)
            .call1((PyBytes::new(py, &key),))?
            .extract()?;
        match raw.filter(|r| !r.is_empty()) {
            None => Ok(None),
            Some(raw) => GpuSession::decode(key, &raw, &mut self.arith)
                .map(Some)
                .ok_or_else(|| {
                    pyo3::exceptions::PyValueError::new_err("unreadable GPU session in the store")
                }),
        }
    }

    /// An API request: its requests against the plan's tier (overage is rated per period, at the
    /// close), its tokens of a priced product; a failed one (status not 2xx) only where the
    /// tier or product charges failed requests.
    fn api_request(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        rated: &Rated,
    ) -> Result<Vec<Placed>, Refusal> {
        let mut placed = Vec::with_capacity(2);
        let succeeded = (200..300).contains(&event.int(api::STATUS).unwrap_or(200));
        if let Some(tier) = rated.plan.api_tier.as_deref() {
            let Some(spec) = rated.version.api_tiers.get(tier) else {
                let detail = format!(
                    "no API tier {} in price book {}",
                    repr(py, tier),
                    rated.version.label
                );
                return Err(Refusal::Unpriced(detail));
            };
            let requests = i128::from(event.int(api::REQUEST_COUNT).unwrap_or(0));
            if requests > 0 && (succeeded || spec.charge_failed) {
                let tier_id = self.names.id(tier);
                let dims = self.dims.id(&[(self.vocabulary.tier, tier_id)]);
                let part = Part {
                    meter: self.vocabulary.api_overage,
                    dims,
                    quantity: Qty::Int(requests),
                    amount: self.zero.clone(),
                    fraction: None,
                    unit: self.vocabulary.request,
                    provider: None,
                    fee_percent: None,
                };
                placed.push(self.placed(rated, account, rated.start, part));
            }
        }
        if let Some(product) = event.str(api::PRODUCT_ID) {
            if let Some(spec) = rated.version.products.get(&*product) {
                let tokens = i128::from(event.int(api::TOKENS_IN).unwrap_or(0))
                    + i128::from(event.int(api::TOKENS_OUT).unwrap_or(0));
                if tokens > 0 && (succeeded || spec.charge_failed) {
                    let meter = self.vocabulary.meter(&mut self.names, 0, &product);
                    let part = Part {
                        meter,
                        dims: 0,
                        quantity: Qty::Int(tokens),
                        amount: self.zero.clone(),
                        fraction: None,
                        unit: self.names.id(&spec.unit),
                        provider: None,
                        fee_percent: None,
                    };
                    placed.push(self.placed(rated, account, rated.start, part));
                }
            }
        }
        Ok(placed)
    }

    /// Storage held: GB x seconds at the kind's price per GB-month.
    fn storage(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        rated: &Rated,
    ) -> Result<Vec<Placed>, Refusal> {
        let kind = event.str(storage::KIND).unwrap_or_default();
        let Some(per_gb_month) = rated.version.storage_per_gb_month.get(&*kind).copied() else {
            let detail = format!(
                "no storage rate for {} in price book {}",
                repr(py, &kind),
                rated.version.label
            );
            return Err(Refusal::Unpriced(detail));
        };
        let zero = self.arith.of_u64(0);
        let gb = Exact::Narrow(event.dec(storage::GB).unwrap_or(zero));
        let duration = event.int(storage::DURATION).unwrap_or(0);
        let arith = &mut self.arith;
        let duration = arith.exact_of_i128(i128::from(duration));
        let gb_seconds = arith.exact_mul(&gb, &duration);
        let amount = arith.exact_mul(&gb_seconds, &Exact::Narrow(per_gb_month));
        if !arith.wide_was_exact() {
            return Err(Refusal::Unpriced(
                "the storage amount exceeds exact arithmetic (180 digits)".into(),
            ));
        }
        let meter = self.vocabulary.meter(&mut self.names, 1, &kind);
        let part = Part {
            meter,
            dims: 0,
            quantity: Qty::Dec(gb_seconds),
            amount,
            fraction: None,
            unit: self.vocabulary.gb_month,
            provider: None,
            fee_percent: None,
        };
        Ok(vec![self.placed(rated, account, rated.start, part)])
    }

    /// `session.started` / `session.ended`: a compute session's ends (the first of each wins; a
    /// later different one is a conflict), charged once both are seen; an end also ends the GPU
    /// session of that id, if it has one.
    fn session_event(
        &mut self,
        py: Python<'_>,
        event: &Event<'_>,
        account: u32,
        plans: &PlanHistory,
        rated: &Rated,
    ) -> PyResult<Result<Vec<Placed>, Refusal>> {
        let session_id = event.str(session::SESSION_ID).unwrap_or_default();
        let key = session_key(SESSION, &event.subject, &session_id);
        let raw: Option<Vec<u8>> = match self.compute.get(&key) {
            Some(pending) => Some(pending.clone()),
            None => self
                .read
                .bind(py)
                .call1((PyBytes::new(py, &key),))?
                .extract()?,
        };
        let mut seen = match raw.as_deref().filter(|r| !r.is_empty()) {
            Some(raw) => ComputeSession::decode(raw).ok_or_else(|| {
                pyo3::exceptions::PyValueError::new_err("unreadable session state")
            })?,
            None => ComputeSession::default(),
        };
        let at = floor_seconds(event.time_us);
        let before = seen.clone();
        if event.kind == Kind::SessionStarted {
            let tier = event.str(session::RESOURCE_TIER).map(|t| t.into_owned());
            if let (Some(tier), Some(user)) = (&tier, &rated.plan.compute_user_type) {
                if !rated
                    .version
                    .compute_per_hour
                    .get(user)
                    .is_some_and(|rates| rates.contains_key(tier))
                {
                    let detail = format!(
                        "no compute rate for {} x {} in {}",
                        repr(py, user),
                        repr(py, tier),
                        rated.version.label
                    );
                    return Ok(Err(Refusal::Unpriced(detail)));
                }
            }
            match seen.started_at {
                Some(first) if (first, &seen.resource_tier) != (at, &tier) => {
                    return Ok(Err(conflict(py, &session_id, "start")));
                }
                Some(_) => {}
                None => (seen.started_at, seen.resource_tier) = (Some(at), tier),
            }
        } else {
            let duration = event.int(session::DURATION).map(i128::from);
            match seen.ended_at {
                Some(first) if (first, seen.duration) != (at, duration) => {
                    return Ok(Err(conflict(py, &session_id, "end")));
                }
                Some(_) => {}
                None => (seen.ended_at, seen.duration) = (Some(at), duration),
            }
        }
        let mut placed = Vec::new();
        if let (Some(started), Some(ended), false) = (seen.started_at, seen.ended_at, seen.charged)
        {
            // The session ends when its end says; it lasted its `duration_seconds` when the end
            // gives one (the producer's measure), else since its start.
            let begin = match seen.duration {
                Some(duration) => ended.saturating_sub(i64::try_from(duration).unwrap_or(i64::MAX)),
                None => started,
            };
            if let Some(tier) = seen.resource_tier.clone() {
                match self.compute_pieces(py, account, plans, &tier, begin, ended) {
                    Ok(pieces) => placed = pieces,
                    Err(refusal) => return Ok(Err(refusal)),
                }
            }
            seen.charged = true;
        }
        if event.kind == Kind::SessionEnded {
            placed.extend(self.end_gpu_session(py, account, &event.subject, &session_id)?);
        }
        if seen != before {
            self.compute.insert(key, seen.encode());
        }
        Ok(Ok(placed))
    }

    /// A compute session's time [begin, end), cut where the plan or its book's version changes,
    /// each piece at the hourly rate of the user type and resource tier then in force, charged
    /// in the window holding the piece's last second.
    fn compute_pieces(
        &mut self,
        py: Python<'_>,
        account: u32,
        plans: &PlanHistory,
        tier: &str,
        begin: i64,
        end: i64,
    ) -> Result<Vec<Placed>, Refusal> {
        let mut placed = Vec::new();
        let mut at = begin;
        while at < end {
            let rated = self.rated_at(py, plans, at)?;
            let next = [
                plans.next_change_after(at),
                rated.book.next_version_after(at),
            ]
            .into_iter()
            .flatten()
            .fold(end, i64::min);
            if let Some(user) = rated.plan.compute_user_type.clone() {
                let Some(rate) = rated
                    .version
                    .compute_per_hour
                    .get(&user)
                    .and_then(|r| r.get(tier))
                    .copied()
                else {
                    let detail = format!(
                        "no compute rate for {} x {} in {}",
                        repr(py, &user),
                        repr(py, tier),
                        rated.version.label
                    );
                    return Err(Refusal::Unpriced(detail));
                };
                let seconds = next - at;
                let quantity = self.arith.exact_of_i128(i128::from(seconds));
                let amount = self.arith.exact_mul(&Exact::Narrow(rate), &quantity);
                let meter = self.vocabulary.meter(&mut self.names, 2, tier);
                let part = Part {
                    meter,
                    dims: 0,
                    quantity: Qty::Int(i128::from(seconds)),
                    amount,
                    fraction: None,
                    unit: self.vocabulary.hour,
                    provider: None,
                    fee_percent: None,
                };
                let window = self.window_start(next - 1, rated.since);
                placed.push(self.placed(&rated, account, window, part));
            }
            at = next;
        }
        Ok(placed)
    }

    /// `session.ended` for a GPU session: it ends now, and its rounding is metered.
    fn end_gpu_session(
        &mut self,
        py: Python<'_>,
        account: u32,
        subject: &str,
        session_id: &str,
    ) -> PyResult<Vec<Placed>> {
        let id = (account, self.names.id(session_id));
        if !self.gpu.contains_key(&id) {
            let key = session_key(GPU_SESSION, subject, session_id);
            match self.stored_session(py, key)? {
                Some(session) => self.gpu.insert(id, session),
                None => return Ok(Vec::new()), // no heartbeat yet: its idle end will round it
            };
        }
        let session = self.gpu.get_mut(&id).expect("inserted above");
        session.ended = true;
        let owed = session.owed_rounding();
        let before = std::mem::replace(&mut session.rounding, owed.clone());
        let placed = self.rounding_parts(account, before.as_ref(), owed.as_ref());
        self.gpu_dirty.insert(id);
        Ok(placed)
    }
}

fn conflict(py: Python<'_>, session_id: &str, end: &str) -> Refusal {
    Refusal::SessionConflict(format!(
        "session {} already has a different {end}",
        repr(py, session_id)
    ))
}
