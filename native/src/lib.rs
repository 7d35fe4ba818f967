//! `tally_native`: the meter's per-event hot path, compiled (native/README.md says why and how
//! it is held to the Python contract). Pure cores: no I/O and no clock reads of their own; the
//! store and the plan directory are the callables the Python shell passes in.

mod decimal;
mod event;
mod hashing;
mod json;
mod meter;
mod msgpack;
mod outputs;
mod schema;
mod sessions;
mod spec;
mod state;
mod time;
mod usage;
mod window;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// The event field tables this module validates against, for the test that compares them with
/// schemas/events.py: [(type, [(field, kind, nullable, default)])].
#[pyfunction]
#[pyo3(name = "schema")]
fn field_tables() -> schema::Schema {
    schema::schema()
}

/// `str()` of a decimal operation, for the tests that hold decimal.rs to Python's `decimal`:
/// `op` is one of "+", "*", "/", "str" (rhs ignored); None when an operand is not a decimal.
#[pyfunction]
fn decimal_op(op: &str, lhs: &str, rhs: &str) -> Option<String> {
    let mut arith = decimal::Arith::new();
    let a = arith.parse(lhs)?;
    let b = arith.parse(rhs).unwrap_or(a);
    Some(decimal::text(&match op {
        "+" => arith.add(&a, &b),
        "*" => arith.mul(&a, &b),
        "/" if !b.is_zero() => arith.div(&a, &b),
        "str" => a,
        _ => return None,
    }))
}

/// The fast path's time reading and writing, for the tests: (msgspec's encoding, isoformat).
#[pyfunction]
fn utc_time(text: &[u8]) -> Option<(String, String)> {
    let micros = time::parse_rfc3339(text)?;
    let mut encoded = Vec::new();
    time::write_msgspec(&mut encoded, micros);
    Some((String::from_utf8(encoded).ok()?, time::isoformat(micros)))
}

/// (partition, fingerprint) as the fast path computes them, for the tests.
#[pyfunction]
fn route<'py>(
    py: Python<'py>,
    account: &[u8],
    partitions: u32,
    body: &[u8],
) -> (u32, Bound<'py, PyBytes>) {
    (
        hashing::partition_of(account, partitions),
        PyBytes::new(py, &hashing::fingerprint(body)),
    )
}

#[pymodule]
fn tally_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<window::WindowCore>()?;
    m.add_class::<spec::BookSpec>()?;
    m.add_class::<spec::VersionSpec>()?;
    m.add_class::<spec::GpuRatesSpec>()?;
    m.add_class::<spec::DemandStepSpec>()?;
    m.add_class::<spec::TierSpec>()?;
    m.add_class::<spec::ProductSpec>()?;
    m.add_class::<spec::PlanSpec>()?;
    m.add_class::<meter::MeterCore>()?;
    m.add_class::<meter::PollOutput>()?;
    m.add_function(wrap_pyfunction!(field_tables, m)?)?;
    m.add_function(wrap_pyfunction!(decimal_op, m)?)?;
    m.add_function(wrap_pyfunction!(utc_time, m)?)?;
    m.add_function(wrap_pyfunction!(route, m)?)?;
    Ok(())
}
