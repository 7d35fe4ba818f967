//! What the window core reads of a price book: the prices an event's usage needs when it is added
//! (rating a closed window stays in Python, agents/window.py). Built once per book from the plain
//! tuples `agents.window.native_book` makes of a `schemas.pricebook.PriceBook`.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::decimal::{Arith, Dec};

pub struct GpuRates {
    pub base_rate_per_hour: FxHashMap<String, Dec>,
    pub per_gb_hour: bool,
    pub vram_rate_per_gb_hour: Option<Dec>,
    pub power_rate_per_watt_hour: Dec,
    pub demand_multiplier: Dec,
    /// (effective from, microseconds; multiplier; the models it applies to, None: every model),
    /// in time order.
    pub demand_schedule: Vec<(i64, Dec, Option<FxHashSet<String>>)>,
    pub provider_minimum_per_hour: FxHashMap<String, Dec>,
    pub billing_granularity_seconds: u64,
}

impl GpuRates {
    /// `GpuRates.demand_at`: the last step in force at `when_us` that covers the model.
    pub fn demand_at(&self, when_us: i64, gpu_model: &str) -> Dec {
        let mut multiplier = self.demand_multiplier;
        for (from_us, step, models) in &self.demand_schedule {
            if *from_us > when_us {
                break;
            }
            if models.as_ref().is_none_or(|m| m.contains(gpu_model)) {
                multiplier = *step;
            }
        }
        multiplier
    }

    /// `agents.rating.billable_seconds` (no session total): up to the billing granularity.
    pub fn billable_seconds(&self, seconds: u64) -> u64 {
        seconds.div_ceil(self.billing_granularity_seconds) * self.billing_granularity_seconds
    }
}

pub struct Version {
    pub effective_from_us: i64,
    pub label: String,
    pub gpu: Option<GpuRates>,
    pub api_tiers: FxHashSet<String>,
    pub product_units: FxHashMap<String, String>,
    pub compute_per_hour: FxHashMap<String, FxHashMap<String, Dec>>,
    pub storage_per_gb_month: FxHashMap<String, Dec>,
}

pub struct Book {
    pub name: String,
    pub versions: Vec<Version>, // by effective date
}

type Rates = Vec<(String, String)>;
type GpuTuple = (
    Rates,
    bool,
    Option<String>,
    String,
    String,
    Vec<(i64, String, Option<Vec<String>>)>,
    Rates,
    u64,
);
type VersionTuple = (
    i64,
    String,
    Option<GpuTuple>,
    Vec<String>,
    Rates,
    Vec<(String, Rates)>,
    Rates,
);

fn price(arith: &mut Arith, text: &str) -> PyResult<Dec> {
    arith.parse(text).ok_or_else(|| {
        PyValueError::new_err(format!(
            "price {text:?} is not a finite decimal of at most 36 digits"
        ))
    })
}

fn rates(arith: &mut Arith, items: Rates) -> PyResult<FxHashMap<String, Dec>> {
    items
        .into_iter()
        .map(|(name, text)| Ok((name, price(arith, &text)?)))
        .collect()
}

impl Book {
    pub fn from_py(data: &Bound<'_, PyAny>, arith: &mut Arith) -> PyResult<Book> {
        let (name, versions): (String, Vec<VersionTuple>) = data.extract()?;
        let mut out = Vec::with_capacity(versions.len());
        for (from_us, label, gpu, tiers, products, compute, storage) in versions {
            let gpu = match gpu {
                None => None,
                Some((base, per_gb, vram_rate, power, demand, schedule, minimums, granularity)) => {
                    Some(GpuRates {
                        base_rate_per_hour: rates(arith, base)?,
                        per_gb_hour: per_gb,
                        vram_rate_per_gb_hour: vram_rate.map(|t| price(arith, &t)).transpose()?,
                        power_rate_per_watt_hour: price(arith, &power)?,
                        demand_multiplier: price(arith, &demand)?,
                        demand_schedule: schedule
                            .into_iter()
                            .map(|(at, m, models)| {
                                Ok((
                                    at,
                                    price(arith, &m)?,
                                    models.map(|v| v.into_iter().collect()),
                                ))
                            })
                            .collect::<PyResult<_>>()?,
                        provider_minimum_per_hour: rates(arith, minimums)?,
                        billing_granularity_seconds: granularity.max(1),
                    })
                }
            };
            out.push(Version {
                effective_from_us: from_us,
                label,
                gpu,
                api_tiers: tiers.into_iter().collect(),
                product_units: products.into_iter().collect(),
                compute_per_hour: compute
                    .into_iter()
                    .map(|(user_type, tiers)| Ok((user_type, rates(arith, tiers)?)))
                    .collect::<PyResult<_>>()?,
                storage_per_gb_month: rates(arith, storage)?,
            });
        }
        out.sort_by_key(|v| v.effective_from_us);
        Ok(Book {
            name,
            versions: out,
        })
    }
}
