//! The window core's state and its encoding, as agents/window.py reads it with msgspec: an open
//! window's key is `\x00o` + msgpack [account, meter, [[dim, value], ...], start], its value the
//! `Tally` struct as a msgpack array [quantity, amount, unit, version, provider, revision,
//! charged, book, since, fee_percent, fractions] (decimals as their `str()`, counted quantities
//! as ints; a tally of 4 to 10 fields, written before the later fields existed, reads with their
//! defaults).
//!
//! Strings are interned (one id per distinct account, meter, dimension, unit, label), so a window
//! key is four numbers: hashing it per event costs a few ns, not a pass over its strings.

use std::cmp::Ordering;

use rustc_hash::FxHashMap;

use crate::decimal::{exact_text, text, wide_text, Arith, Dec, Exact, Wide};
use crate::msgpack::{self, Reader, Value};

pub const OPEN: &[u8] = b"\x00o";
pub const SESSION: &[u8] = b"\x00s";
pub const GPU_SESSION: &[u8] = b"\x00g";
pub const WATERMARK: &[u8] = b"\x00watermark";

#[derive(Default)]
pub struct Names {
    ids: FxHashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Names {
    pub fn id(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.into());
        self.ids.insert(name.into(), id);
        id
    }

    pub fn get(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }
}

/// Dimension sets, interned: `()` is id 0.
pub struct DimsTable {
    ids: FxHashMap<Box<[(u32, u32)]>, u32>,
    sets: Vec<Box<[(u32, u32)]>>,
}

impl Default for DimsTable {
    fn default() -> Self {
        let mut table = DimsTable {
            ids: FxHashMap::default(),
            sets: Vec::new(),
        };
        table.id(&[]);
        table
    }
}

impl DimsTable {
    pub fn id(&mut self, dims: &[(u32, u32)]) -> u32 {
        if let Some(&id) = self.ids.get(dims) {
            return id;
        }
        let id = self.sets.len() as u32;
        self.sets.push(dims.into());
        self.ids.insert(dims.into(), id);
        id
    }

    pub fn get(&self, id: u32) -> &[(u32, u32)] {
        &self.sets[id as usize]
    }
}

/// (account, meter, dimensions, window start in epoch seconds), interned.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Key {
    pub account: u32,
    pub meter: u32,
    pub dims: u32,
    pub start: i64,
}

#[derive(Clone, Debug)]
pub enum Qty {
    Int(i128),
    Dec(Exact),
}

/// A window's usage so far: its quantity and exact amount (the part over denominator 1 in
/// `amount`, GPU rates with a VRAM share as (denominator, numerator) pairs in `fractions`, so
/// nothing is divided, hence rounded, before the charge is made), and what rated it: the unit,
/// the price-book version and book, when the plan-and-version segment it belongs to began
/// (`since`), the GPU provider and platform fee.
#[derive(Clone, Debug)]
pub struct Tally {
    pub quantity: Qty,
    pub amount: Exact,
    pub unit: u32,
    pub version: u32,
    pub provider: Option<u32>,
    pub revision: i128,
    pub charged: i128,
    pub book: Option<u32>,
    pub since: i64,
    pub fee_percent: Option<Dec>,
    pub fractions: Vec<(Dec, Wide)>,
}

/// What one event adds to one window.
pub struct Part {
    pub meter: u32,
    pub dims: u32,
    pub quantity: Qty,
    pub amount: Exact,
    pub fraction: Option<Box<(Dec, Wide)>>, // amount over a denominator other than 1 (rare)
    pub unit: u32,
    pub provider: Option<u32>,
    pub fee_percent: Option<Dec>,
}

impl Tally {
    /// An empty window counting in ints for a counted meter, in decimals else.
    pub fn empty(part: &Part, version: u32, book: u32, since: i64, zero: Exact) -> Tally {
        let quantity = match part.quantity {
            Qty::Int(_) => Qty::Int(0),
            Qty::Dec(_) => Qty::Dec(zero.clone()),
        };
        Tally {
            quantity,
            amount: zero,
            unit: part.unit,
            version,
            provider: part.provider,
            revision: -1,
            charged: 0,
            book: Some(book),
            since,
            fee_percent: part.fee_percent,
            fractions: Vec::new(),
        }
    }

    /// Sum a part into the window, exactly.
    pub fn add(&mut self, arith: &mut Arith, part: &Part) {
        self.quantity = match (&self.quantity, &part.quantity) {
            (Qty::Int(a), Qty::Int(b)) => Qty::Int(a + b),
            (Qty::Dec(a), Qty::Dec(b)) => Qty::Dec(arith.exact_add(a, b)),
            (Qty::Dec(a), Qty::Int(b)) | (Qty::Int(b), Qty::Dec(a)) => {
                let whole = arith.exact_of_i128(*b);
                Qty::Dec(arith.exact_add(a, &whole))
            }
        };
        self.amount = arith.exact_add(&self.amount, &part.amount);
        if let Some(pair) = &part.fraction {
            let (denominator, numerator) = &**pair;
            let same = self
                .fractions
                .iter()
                .position(|(d, _)| arith.cmp(d, denominator).is_eq());
            match same {
                Some(i) => self.fractions[i].1 = arith.wide_add(&self.fractions[i].1, numerator),
                None => self.fractions.push((*denominator, *numerator)),
            }
        }
    }
}

/// Python's order of window keys (tuples of str, str, tuple of (str, str), int): str by code
/// point, which is UTF-8 byte order.
pub fn python_order(names: &Names, dims: &DimsTable, a: &Key, b: &Key) -> Ordering {
    let text_dims = |id: u32| {
        dims.get(id)
            .iter()
            .map(|&(k, v)| (names.get(k), names.get(v)))
            .collect::<Vec<_>>()
    };
    names
        .get(a.account)
        .cmp(names.get(b.account))
        .then_with(|| names.get(a.meter).cmp(names.get(b.meter)))
        .then_with(|| {
            if a.dims == b.dims {
                Ordering::Equal
            } else {
                text_dims(a.dims).cmp(&text_dims(b.dims))
            }
        })
        .then_with(|| a.start.cmp(&b.start))
}

pub fn encode_key(names: &Names, dims: &DimsTable, key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(OPEN);
    msgpack::write_array_len(&mut out, 4);
    msgpack::write_str(&mut out, names.get(key.account));
    msgpack::write_str(&mut out, names.get(key.meter));
    let set = dims.get(key.dims);
    msgpack::write_array_len(&mut out, set.len());
    for &(k, v) in set {
        msgpack::write_array_len(&mut out, 2);
        msgpack::write_str(&mut out, names.get(k));
        msgpack::write_str(&mut out, names.get(v));
    }
    msgpack::write_int(&mut out, i128::from(key.start)).expect("a window start fits");
    out
}

/// The tally's msgpack array; None when an int is beyond MessagePack's range (msgspec would
/// raise as well).
pub fn encode_tally(names: &Names, tally: &Tally) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    msgpack::write_array_len(&mut out, 11);
    match &tally.quantity {
        Qty::Int(v) => msgpack::write_int(&mut out, *v)?,
        Qty::Dec(v) => msgpack::write_str(&mut out, &exact_text(v)),
    }
    msgpack::write_str(&mut out, &exact_text(&tally.amount));
    msgpack::write_str(&mut out, names.get(tally.unit));
    msgpack::write_str(&mut out, names.get(tally.version));
    let write_name = |out: &mut Vec<u8>, id: Option<u32>| match id {
        Some(id) => msgpack::write_str(out, names.get(id)),
        None => msgpack::write_nil(out),
    };
    write_name(&mut out, tally.provider);
    msgpack::write_int(&mut out, tally.revision)?;
    msgpack::write_int(&mut out, tally.charged)?;
    write_name(&mut out, tally.book);
    msgpack::write_int(&mut out, i128::from(tally.since))?;
    match &tally.fee_percent {
        Some(p) => msgpack::write_str(&mut out, &text(p)),
        None => msgpack::write_nil(&mut out),
    }
    msgpack::write_array_len(&mut out, tally.fractions.len());
    for (denominator, numerator) in &tally.fractions {
        msgpack::write_array_len(&mut out, 2);
        msgpack::write_str(&mut out, &text(denominator));
        msgpack::write_str(&mut out, &wide_text(numerator));
    }
    Some(out)
}

pub fn decode_key(names: &mut Names, dims: &mut DimsTable, raw: &[u8]) -> Option<Key> {
    let mut r = Reader::new(raw.strip_prefix(OPEN)?);
    if r.array()? != 4 {
        return None;
    }
    let account = names.id(r.str()?);
    let meter = names.id(r.str()?);
    let count = r.array()?;
    let mut set = Vec::with_capacity(count);
    for _ in 0..count {
        if r.array()? != 2 {
            return None;
        }
        let k = names.id(r.str()?);
        let v = names.id(r.str()?);
        set.push((k, v));
    }
    let start = i64::try_from(r.int()?).ok()?;
    r.at_end().then_some(Key {
        account,
        meter,
        dims: dims.id(&set),
        start,
    })
}

pub fn decode_tally(names: &mut Names, arith: &mut Arith, raw: &[u8]) -> Option<Tally> {
    let mut r = Reader::new(raw);
    let fields = r.array()?;
    if !(4..=11).contains(&fields) {
        return None;
    }
    let quantity = match r.value()? {
        Value::Int(v) => Qty::Int(v),
        Value::Str(s) => Qty::Dec(arith.exact_parse(s)?),
        _ => return None,
    };
    let amount = arith.exact_parse(r.str()?)?;
    let unit = names.id(r.str()?);
    let version = names.id(r.str()?);
    let mut tally = Tally {
        quantity,
        amount,
        unit,
        version,
        provider: None,
        revision: -1,
        charged: 0,
        book: None,
        since: 0,
        fee_percent: None,
        fractions: Vec::new(),
    };
    let mut name = |r: &mut Reader<'_>| match r.value()? {
        Value::Nil => Some(None),
        Value::Str(s) => Some(Some(names.id(s))),
        _ => None,
    };
    if fields > 4 {
        tally.provider = name(&mut r)?;
    }
    if fields > 5 {
        tally.revision = r.int()?;
    }
    if fields > 6 {
        tally.charged = r.int()?;
    }
    if fields > 7 {
        tally.book = name(&mut r)?;
    }
    if fields > 8 {
        tally.since = i64::try_from(r.int()?).ok()?;
    }
    if fields > 9 {
        tally.fee_percent = match r.value()? {
            Value::Nil => None,
            Value::Str(s) => Some(arith.parse(s)?),
            _ => return None,
        };
    }
    if fields > 10 {
        for _ in 0..r.array()? {
            if r.array()? != 2 {
                return None;
            }
            let denominator = arith.parse(r.str()?)?;
            let numerator = arith.wide_parse(r.str()?)?;
            tally.fractions.push((denominator, numerator));
        }
    }
    r.at_end().then_some(tally)
}
