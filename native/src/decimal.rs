//! Decimal arithmetic exactly as Python's `decimal` module does it in Tally (its default context:
//! 28 significant digits, ROUND_HALF_EVEN, exponents within +-999,999).
//!
//! Both this (decNumber, through the `dec` crate) and CPython's `_decimal` (libmpdec) implement
//! the General Decimal Arithmetic specification, which fixes every result of +, *, / and
//! comparisons digit for digit and exponent for exponent, so `str()` of a Python result and
//! `to_string()` of ours are the same text (tests/unit/test_native_codec.py holds them to it).
//! Measured here: parse 17 ns, mul 12 ns, add 7 ns, div 28-135 ns, to_string 33 ns.

use std::cmp::Ordering;

use dec::{Context, Decimal, Rounding};

/// 36 digits of room: every value Tally handles has at most 28 (a quantity at most 10^15 with 12
/// decimals, agents.ingest; a price at most 28 digits, schemas.pricebook; a result rounded to
/// 28), so nothing is ever cut on the way in.
pub type Dec = Decimal<12>;

/// Money is summed exactly (docs/PRICING.md): an event's amount is a product of a few decimals of
/// at most 28 digits each (a price, a quantity, seconds, a multiplier), which needs ~60-110
/// digits, and a window sums many of them. 180 digits hold every such product and sum Tally's
/// bounds allow (a quantity at most 10^15, a price at most 10^15 with at most 18 places); an
/// operation that would round sets the `inexact` status, which `Arith::wide_was_exact` reports,
/// so an event whose amount could not be held exactly is refused rather than rounded.
pub type Wide = Decimal<60>;
const WIDE_PRECISION: usize = 180;

const PRECISION: usize = 28;
const MAX_EXPONENT: isize = 999_999;
const MIN_EXPONENT: isize = -999_999;

pub struct Arith {
    /// Python's default context: what every operation rounds to.
    cx: Context<Dec>,
    /// Reading text exactly (all 36 digits), as `Decimal(text)` does.
    exact: Context<Dec>,
    /// Exact money: 180 digits, half-even should it ever round (flagged, see `Wide`).
    pub(crate) wide: Context<Wide>,
    /// Exact money in 36 digits, for the common case: an amount that fits is computed here (a
    /// third of the instructions of the wide type), one that would round is computed again wide.
    pub(crate) narrow: Context<Dec>,
    /// 0..SMALL as decimals: heartbeat seconds and GPU counts are small integers, and making
    /// one from an integer costs ~500 instructions against a copy here.
    small: Vec<Dec>,
}

const SMALL: u64 = 4096;

impl Default for Arith {
    fn default() -> Self {
        Self::new()
    }
}

impl Arith {
    pub fn new() -> Self {
        let mut cx = Context::<Dec>::default();
        cx.set_precision(PRECISION).expect("28 digits fit");
        cx.set_rounding(Rounding::HalfEven);
        cx.set_max_exponent(MAX_EXPONENT).expect("valid exponent");
        cx.set_min_exponent(MIN_EXPONENT).expect("valid exponent");
        let exact = Context::<Dec>::default(); // 36 digits: the type's whole room
        let mut wide = Context::<Wide>::default();
        wide.set_precision(WIDE_PRECISION).expect("180 digits fit");
        wide.set_rounding(Rounding::HalfEven);
        wide.set_max_exponent(MAX_EXPONENT).expect("valid exponent");
        wide.set_min_exponent(MIN_EXPONENT).expect("valid exponent");
        let mut narrow = Context::<Dec>::default();
        narrow.set_rounding(Rounding::HalfEven);
        narrow
            .set_max_exponent(MAX_EXPONENT)
            .expect("valid exponent");
        narrow
            .set_min_exponent(MIN_EXPONENT)
            .expect("valid exponent");
        let mut exact = exact;
        let small = (0..SMALL).map(|n| exact.from_u64(n)).collect();
        Arith {
            cx,
            exact,
            wide,
            narrow,
            small,
        }
    }

    /// `Decimal(text)` for a finite decimal; None for anything else, or more digits than fit.
    pub fn parse(&mut self, text: &str) -> Option<Dec> {
        self.exact.clear_status();
        let value = self.exact.parse(text).ok()?;
        let status = self.exact.status();
        if status.inexact() || status.rounded() || !value.is_finite() {
            return None;
        }
        Some(value)
    }

    pub fn of_u64(&mut self, n: u64) -> Dec {
        match usize::try_from(n).ok().and_then(|i| self.small.get(i)) {
            Some(found) => *found,
            None => self.exact.from_u64(n),
        }
    }

    pub fn add(&mut self, lhs: &Dec, rhs: &Dec) -> Dec {
        let mut out = *lhs;
        self.cx.add(&mut out, rhs);
        out
    }

    pub fn mul(&mut self, lhs: &Dec, rhs: &Dec) -> Dec {
        let mut out = *lhs;
        self.cx.mul(&mut out, rhs);
        out
    }

    pub fn div(&mut self, lhs: &Dec, rhs: &Dec) -> Dec {
        let mut out = *lhs;
        self.cx.div(&mut out, rhs);
        out
    }

    /// Numeric order (finite values only: `parse` never makes another kind).
    pub fn cmp(&mut self, lhs: &Dec, rhs: &Dec) -> Ordering {
        self.cx.partial_cmp(lhs, rhs).unwrap_or(Ordering::Equal)
    }
}

impl Arith {
    /// A decimal as a wide one (exact: the wide type has more room).
    pub fn widen(&mut self, value: &Dec) -> Wide {
        self.wide.to_width(*value)
    }

    /// `Decimal(text)` into the wide type; None for anything not a finite decimal that fits.
    pub fn wide_parse(&mut self, text: &str) -> Option<Wide> {
        let before = self.wide.status();
        self.wide.clear_status();
        let value = self.wide.parse(text).ok();
        let status = self.wide.status();
        let exact = !(status.inexact() || status.rounded());
        self.wide.set_status(before);
        value.filter(|v| exact && v.is_finite())
    }

    pub fn wide_add(&mut self, lhs: &Wide, rhs: &Wide) -> Wide {
        let mut out = *lhs;
        self.wide.add(&mut out, rhs);
        out
    }

    pub fn wide_mul(&mut self, lhs: &Wide, rhs: &Wide) -> Wide {
        let mut out = *lhs;
        self.wide.mul(&mut out, rhs);
        out
    }

    pub fn wide_cmp(&mut self, lhs: &Wide, rhs: &Wide) -> Ordering {
        self.wide.partial_cmp(lhs, rhs).unwrap_or(Ordering::Equal)
    }

    /// Whether every wide operation since the last call was exact; resets the flag.
    pub fn wide_was_exact(&mut self) -> bool {
        let inexact = self.wide.status().inexact();
        self.wide.clear_status();
        !inexact
    }
}

/// An exact amount: in 36 digits when it fits (nearly always: a third of the instructions of the
/// wide type), in 180 when it does not. Operations try the narrow form first and redo in the
/// wide one whatever would round. The wide form is boxed: it is rare, and unboxed it made every
/// window's state ~3 times as large (a 128-byte decimal in each of its amounts), which the
/// meter's per-event work paid in cache misses.
#[derive(Clone, Debug)]
pub enum Exact {
    Narrow(Dec),
    Wide(Box<Wide>),
}

impl Arith {
    pub fn exact_of_i128(&mut self, n: i128) -> Exact {
        if let Some(found) = usize::try_from(n).ok().and_then(|i| self.small.get(i)) {
            return Exact::Narrow(*found);
        }
        match i64::try_from(n) {
            Ok(small) => Exact::Narrow(self.narrow.from_i64(small)),
            Err(_) => Exact::Wide(Box::new(self.wide.from_i128(n))),
        }
    }

    /// `Decimal(text)`, exactly (narrow when it fits).
    pub fn exact_parse(&mut self, text: &str) -> Option<Exact> {
        match self.parse(text) {
            Some(value) => Some(Exact::Narrow(value)),
            None => self.wide_parse(text).map(|v| Exact::Wide(Box::new(v))),
        }
    }

    pub fn wide_of(&mut self, value: &Exact) -> Wide {
        match value {
            Exact::Narrow(v) => self.widen(v),
            Exact::Wide(v) => **v,
        }
    }

    pub fn exact_add(&mut self, lhs: &Exact, rhs: &Exact) -> Exact {
        if let (Exact::Narrow(a), Exact::Narrow(b)) = (lhs, rhs) {
            self.narrow.clear_status();
            let mut out = *a;
            self.narrow.add(&mut out, b);
            if !self.narrow.status().inexact() {
                return Exact::Narrow(out);
            }
        }
        let (a, b) = (self.wide_of(lhs), self.wide_of(rhs));
        Exact::Wide(Box::new(self.wide_add(&a, &b)))
    }

    pub fn exact_mul(&mut self, lhs: &Exact, rhs: &Exact) -> Exact {
        if let (Exact::Narrow(a), Exact::Narrow(b)) = (lhs, rhs) {
            self.narrow.clear_status();
            let mut out = *a;
            self.narrow.mul(&mut out, b);
            if !self.narrow.status().inexact() {
                return Exact::Narrow(out);
            }
        }
        let (a, b) = (self.wide_of(lhs), self.wide_of(rhs));
        Exact::Wide(Box::new(self.wide_mul(&a, &b)))
    }

    pub fn exact_cmp(&mut self, lhs: &Exact, rhs: &Exact) -> Ordering {
        match (lhs, rhs) {
            (Exact::Narrow(a), Exact::Narrow(b)) => self.cmp(a, b),
            _ => {
                let (a, b) = (self.wide_of(lhs), self.wide_of(rhs));
                self.wide_cmp(&a, &b)
            }
        }
    }
}

/// `str(Decimal)` of an exact amount.
pub fn exact_text(value: &Exact) -> String {
    match value {
        Exact::Narrow(v) => v.to_string(),
        Exact::Wide(v) => v.to_string(),
    }
}

/// `str(Decimal)` of a wide value (the same specification's to-scientific-string).
pub fn wide_text(value: &Wide) -> String {
    value.to_string()
}

/// `str(Decimal)`: the specification's to-scientific-string.
pub fn text(value: &Dec) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_pythons_results() {
        let mut a = Arith::new();
        let d = |a: &mut Arith, s: &str| a.parse(s).unwrap();
        let (x, y) = (d(&mut a, "10"), d(&mut a, "24"));
        assert_eq!(text(&a.div(&x, &y)), "0.4166666666666666666666666667");
        let (x, y) = (d(&mut a, "40"), d(&mut a, "80"));
        assert_eq!(text(&a.div(&x, &y)), "0.5");
        let (x, y) = (d(&mut a, "0"), d(&mut a, "1.50"));
        assert_eq!(text(&a.add(&x, &y)), "1.50");
        let (x, y) = (d(&mut a, "100"), d(&mut a, "0.02"));
        assert_eq!(text(&a.mul(&x, &y)), "2.00");
        assert_eq!(text(&d(&mut a, "0.0000001")), "1E-7");
        assert_eq!(text(&d(&mut a, "007.50")), "7.50");
        // Half-even at the 28th digit: 2.5 ulp rounds to the even neighbour.
        let (x, y) = (d(&mut a, "1000000000000000000000000000"), d(&mut a, "0.5"));
        assert_eq!(text(&a.add(&x, &y)), "1000000000000000000000000000");
        assert!(a.parse("NaN").is_none() && a.parse("1e").is_none());
    }
}
