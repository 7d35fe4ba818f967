//! What the window core reads of price books and plans, as typed Python classes: agents/window.py
//! builds a `BookSpec` once per loaded price book (`native_book`) and a `PlanSpec` per entry of an
//! account's plan history (`NativeBooks.plans`); their constructors are the whole boundary (keyword
//! arguments, checked here; `tally_native.pyi` types them and `make lint` holds the stub to this
//! module with mypy's stubtest). Prices cross as decimal text and are read exactly.
//!
//! Times are epoch seconds: a version or a plan takes effect on a whole second (schemas/pricebook.py
//! and the plan history refuse others), so the second an event falls in says which applies.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::decimal::{Arith, Dec};

pub struct DemandStep {
    pub effective_from: i64,
    pub multiplier: Dec,
    pub gpu_models: Option<FxHashSet<String>>, // None: every model
}

pub struct GpuRates {
    pub base_rate_per_hour: FxHashMap<String, Dec>,
    pub per_gb_hour: bool,
    pub vram_rate_per_gb_hour: Option<Dec>,
    pub power_rate_per_watt_hour: Dec,
    pub demand_multiplier: Dec,
    pub demand_schedule: Vec<DemandStep>, // in time order
    pub provider_minimum_per_hour: FxHashMap<String, Dec>,
    pub billing_granularity_seconds: i64,
    pub minimum_session_seconds: i64,
    pub platform_fee_percent: Dec,
}

impl GpuRates {
    /// `GpuRates.demand_at`: the last step in force at `at` (epoch seconds) that covers the model.
    pub fn demand_at(&self, at: i64, gpu_model: &str) -> Dec {
        let mut multiplier = self.demand_multiplier;
        for step in &self.demand_schedule {
            if step.effective_from > at {
                break;
            }
            if step
                .gpu_models
                .as_ref()
                .is_none_or(|m| m.contains(gpu_model))
            {
                multiplier = step.multiplier;
            }
        }
        multiplier
    }
}

pub struct Tier {
    pub charge_failed: bool,
}

pub struct Product {
    pub unit: String,
    pub charge_failed: bool,
}

pub struct Version {
    pub effective_from: i64,
    pub label: String,
    pub gpu: Option<Arc<GpuRates>>,
    pub api_tiers: FxHashMap<String, Tier>,
    pub products: FxHashMap<String, Product>,
    pub compute_per_hour: FxHashMap<String, FxHashMap<String, Dec>>,
    pub storage_per_gb_month: FxHashMap<String, Dec>,
}

pub struct Book {
    pub name: String,
    pub versions: Vec<Arc<Version>>, // by effective time
}

impl Book {
    /// The index of the version in force at `at` (epoch seconds).
    pub fn version_at(&self, at: i64) -> Option<usize> {
        self.versions.iter().rposition(|v| v.effective_from <= at)
    }

    /// When the version after the one in force at `at` takes effect.
    pub fn next_version_after(&self, at: i64) -> Option<i64> {
        self.versions
            .iter()
            .map(|v| v.effective_from)
            .find(|&from| from > at)
    }
}

/// One entry of an account's plan history: from `effective_from` on (until the next entry), the
/// account is rated by `book` (None: unusable, `unpriced` says why), its API tier and the user
/// type its compute sessions are priced by.
pub struct Plan {
    pub effective_from: i64,
    pub book: Option<Arc<Book>>,
    pub api_tier: Option<String>,
    pub compute_user_type: Option<String>,
    pub unpriced: Option<String>,
}

/// An account's plan history, in time order; the first entry is in force since ever.
pub struct PlanHistory {
    pub plans: Vec<Arc<Plan>>,
}

impl PlanHistory {
    pub fn at(&self, at: i64) -> &Arc<Plan> {
        let index = self
            .plans
            .iter()
            .rposition(|p| p.effective_from <= at)
            .unwrap_or(0);
        &self.plans[index]
    }

    pub fn next_change_after(&self, at: i64) -> Option<i64> {
        self.plans
            .iter()
            .map(|p| p.effective_from)
            .find(|&from| from > at)
    }
}

fn price(arith: &mut Arith, what: &str, text: &str) -> PyResult<Dec> {
    arith.parse(text).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{what}: {text:?} is not a finite decimal of at most 36 digits"
        ))
    })
}

fn prices(
    arith: &mut Arith,
    what: &str,
    items: FxHashMap<String, String>,
) -> PyResult<FxHashMap<String, Dec>> {
    items
        .into_iter()
        .map(|(name, text)| Ok((name, price(arith, what, &text)?)))
        .collect()
}

#[pyclass(module = "tally_native", frozen)]
pub struct DemandStepSpec {
    inner: Arc<DemandStep>,
}

#[pymethods]
impl DemandStepSpec {
    #[new]
    #[pyo3(signature = (*, effective_from, multiplier, gpu_models))]
    fn new(
        effective_from: i64,
        multiplier: &str,
        gpu_models: Option<Vec<String>>,
    ) -> PyResult<Self> {
        let mut arith = Arith::new();
        Ok(DemandStepSpec {
            inner: Arc::new(DemandStep {
                effective_from,
                multiplier: price(&mut arith, "multiplier", multiplier)?,
                gpu_models: gpu_models.map(|m| m.into_iter().collect()),
            }),
        })
    }
}

#[pyclass(module = "tally_native", frozen)]
pub struct GpuRatesSpec {
    inner: Arc<GpuRates>,
}

#[pymethods]
impl GpuRatesSpec {
    #[new]
    #[pyo3(signature = (
        *, base_rate_per_hour, per_gb_hour, vram_rate_per_gb_hour, power_rate_per_watt_hour,
        demand_multiplier, demand_schedule, provider_minimum_per_hour, billing_granularity_seconds,
        minimum_session_seconds, platform_fee_percent
    ))]
    #[allow(clippy::too_many_arguments)] // one per field of schemas.pricebook.GpuRates
    fn new(
        base_rate_per_hour: FxHashMap<String, String>,
        per_gb_hour: bool,
        vram_rate_per_gb_hour: Option<&str>,
        power_rate_per_watt_hour: &str,
        demand_multiplier: &str,
        demand_schedule: Vec<PyRef<'_, DemandStepSpec>>,
        provider_minimum_per_hour: FxHashMap<String, String>,
        billing_granularity_seconds: i64,
        minimum_session_seconds: i64,
        platform_fee_percent: &str,
    ) -> PyResult<Self> {
        if billing_granularity_seconds < 1 || minimum_session_seconds < 0 {
            return Err(PyValueError::new_err(
                "billing granularity must be positive and the minimum session not negative",
            ));
        }
        let mut arith = Arith::new();
        let mut schedule: Vec<_> = demand_schedule
            .iter()
            .map(|step| {
                let s = &step.inner;
                DemandStep {
                    effective_from: s.effective_from,
                    multiplier: s.multiplier,
                    gpu_models: s.gpu_models.clone(),
                }
            })
            .collect();
        schedule.sort_by_key(|s| s.effective_from);
        Ok(GpuRatesSpec {
            inner: Arc::new(GpuRates {
                base_rate_per_hour: prices(&mut arith, "base_rate_per_hour", base_rate_per_hour)?,
                per_gb_hour,
                vram_rate_per_gb_hour: vram_rate_per_gb_hour
                    .map(|t| price(&mut arith, "vram_rate_per_gb_hour", t))
                    .transpose()?,
                power_rate_per_watt_hour: price(
                    &mut arith,
                    "power_rate_per_watt_hour",
                    power_rate_per_watt_hour,
                )?,
                demand_multiplier: price(&mut arith, "demand_multiplier", demand_multiplier)?,
                demand_schedule: schedule,
                provider_minimum_per_hour: prices(
                    &mut arith,
                    "provider_minimum_per_hour",
                    provider_minimum_per_hour,
                )?,
                billing_granularity_seconds,
                minimum_session_seconds,
                platform_fee_percent: price(
                    &mut arith,
                    "platform_fee_percent",
                    platform_fee_percent,
                )?,
            }),
        })
    }
}

#[pyclass(module = "tally_native", frozen)]
pub struct TierSpec {
    charge_failed: bool,
}

#[pymethods]
impl TierSpec {
    /// `charge_failed`: requests with a failed status (not 2xx) count and pay too.
    #[new]
    #[pyo3(signature = (*, charge_failed))]
    fn new(charge_failed: bool) -> Self {
        TierSpec { charge_failed }
    }
}

#[pyclass(module = "tally_native", frozen)]
pub struct ProductSpec {
    unit: String,
    charge_failed: bool,
}

#[pymethods]
impl ProductSpec {
    #[new]
    #[pyo3(signature = (*, unit, charge_failed))]
    fn new(unit: String, charge_failed: bool) -> Self {
        ProductSpec {
            unit,
            charge_failed,
        }
    }
}

#[pyclass(module = "tally_native", frozen)]
pub struct VersionSpec {
    inner: Arc<Version>,
}

#[pymethods]
impl VersionSpec {
    #[new]
    #[pyo3(signature = (
        *, effective_from, label, gpu, api_tiers, products, compute_per_hour, storage_per_gb_month
    ))]
    fn new(
        effective_from: i64,
        label: String,
        gpu: Option<PyRef<'_, GpuRatesSpec>>,
        api_tiers: FxHashMap<String, PyRef<'_, TierSpec>>,
        products: FxHashMap<String, PyRef<'_, ProductSpec>>,
        compute_per_hour: FxHashMap<String, FxHashMap<String, String>>,
        storage_per_gb_month: FxHashMap<String, String>,
    ) -> PyResult<Self> {
        let mut arith = Arith::new();
        Ok(VersionSpec {
            inner: Arc::new(Version {
                effective_from,
                label,
                gpu: gpu.map(|g| g.inner.clone()),
                api_tiers: api_tiers
                    .into_iter()
                    .map(|(name, tier)| {
                        let charge_failed = tier.charge_failed;
                        (name, Tier { charge_failed })
                    })
                    .collect(),
                products: products
                    .into_iter()
                    .map(|(name, product)| {
                        let (unit, charge_failed) = (product.unit.clone(), product.charge_failed);
                        (
                            name,
                            Product {
                                unit,
                                charge_failed,
                            },
                        )
                    })
                    .collect(),
                compute_per_hour: compute_per_hour
                    .into_iter()
                    .map(|(user_type, tiers)| {
                        Ok((user_type, prices(&mut arith, "compute_per_hour", tiers)?))
                    })
                    .collect::<PyResult<_>>()?,
                storage_per_gb_month: prices(
                    &mut arith,
                    "storage_per_gb_month",
                    storage_per_gb_month,
                )?,
            }),
        })
    }
}

#[pyclass(module = "tally_native", frozen)]
pub struct BookSpec {
    pub(crate) inner: Arc<Book>,
}

#[pymethods]
impl BookSpec {
    #[new]
    #[pyo3(signature = (*, name, versions))]
    fn new(name: String, versions: Vec<PyRef<'_, VersionSpec>>) -> PyResult<Self> {
        let mut versions: Vec<Arc<Version>> = versions.iter().map(|v| v.inner.clone()).collect();
        versions.sort_by_key(|v| v.effective_from);
        if versions
            .windows(2)
            .any(|w| w[0].effective_from == w[1].effective_from)
        {
            return Err(PyValueError::new_err(
                "two versions take effect at the same time",
            ));
        }
        Ok(BookSpec {
            inner: Arc::new(Book { name, versions }),
        })
    }

    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }
}

#[pyclass(module = "tally_native", frozen)]
pub struct PlanSpec {
    pub(crate) inner: Arc<Plan>,
}

#[pymethods]
impl PlanSpec {
    /// `book` None: the plan's price book cannot be used, `unpriced` says why (its usage is then
    /// dead-lettered `unpriced`, never rated by another book).
    #[new]
    #[pyo3(signature = (*, effective_from, book, api_tier, compute_user_type, unpriced=None))]
    fn new(
        effective_from: i64,
        book: Option<PyRef<'_, BookSpec>>,
        api_tier: Option<String>,
        compute_user_type: Option<String>,
        unpriced: Option<String>,
    ) -> Self {
        PlanSpec {
            inner: Arc::new(Plan {
                effective_from,
                book: book.map(|b| b.inner.clone()),
                api_tier,
                compute_user_type,
                unpriced,
            }),
        }
    }
}

/// An account's plan history from the entries `plan_of` returned (any order; none: unpriced).
pub fn history(entries: Vec<PyRef<'_, PlanSpec>>) -> PlanHistory {
    let mut plans: Vec<Arc<Plan>> = entries.iter().map(|p| p.inner.clone()).collect();
    plans.sort_by_key(|p| p.effective_from);
    if plans.is_empty() {
        plans.push(Arc::new(Plan {
            effective_from: i64::MIN,
            book: None,
            api_tier: None,
            compute_user_type: None,
            unpriced: Some("the account has no plan".to_string()),
        }));
    }
    PlanHistory { plans }
}
