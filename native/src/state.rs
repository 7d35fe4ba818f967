//! The window core's state and its encoding, byte for byte as agents/window.py writes it with
//! msgspec: an open window's key is `\x00o` + msgpack [account, meter, [[dim, value], ...],
//! start], its value the `Tally` struct as a msgpack array [quantity, amount, unit, version,
//! provider, revision, charged] (decimals as their `str()`, counted quantities as ints).
//!
//! Strings are interned (one id per distinct account, meter, dimension, unit, label), so a window
//! key is four numbers: hashing it per event costs a few ns, not a pass over its strings.

use std::cmp::Ordering;

use rustc_hash::FxHashMap;

use crate::decimal::{text, Arith, Dec};
use crate::msgpack::{self, Reader, Value};

pub const OPEN: &[u8] = b"\x00o";
pub const SESSION: &[u8] = b"\x00s";
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

#[derive(Clone, Copy, Debug)]
pub enum Qty {
    Int(i128),
    Dec(Dec),
}

#[derive(Clone, Debug)]
pub struct Tally {
    pub quantity: Qty,
    pub amount: Dec,
    pub unit: u32,
    pub version: u32,
    pub provider: Option<u32>,
    pub revision: i128,
    pub charged: i128,
}

impl Tally {
    /// `_new_tally`: an empty window counting in ints for a counted meter, in decimals else.
    pub fn empty(like: &Qty, unit: u32, version: u32, provider: Option<u32>, zero: Dec) -> Tally {
        let quantity = match like {
            Qty::Int(_) => Qty::Int(0),
            Qty::Dec(_) => Qty::Dec(zero),
        };
        Tally {
            quantity,
            amount: zero,
            unit,
            version,
            provider,
            revision: -1,
            charged: 0,
        }
    }

    /// `tally.quantity += quantity; tally.amount += amount`, with Python's int/Decimal mixing.
    pub fn add(&mut self, arith: &mut Arith, quantity: &Qty, amount: &Dec) {
        self.quantity = match (self.quantity, *quantity) {
            (Qty::Int(a), Qty::Int(b)) => Qty::Int(a + b),
            (Qty::Dec(a), Qty::Dec(b)) => Qty::Dec(arith.add(&a, &b)),
            (Qty::Dec(a), Qty::Int(b)) | (Qty::Int(b), Qty::Dec(a)) => {
                let whole = arith.of_i128(b);
                Qty::Dec(arith.add(&a, &whole))
            }
        };
        self.amount = arith.add(&self.amount, amount);
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
    let mut out = Vec::with_capacity(48);
    msgpack::write_array_len(&mut out, 7);
    match &tally.quantity {
        Qty::Int(v) => msgpack::write_int(&mut out, *v)?,
        Qty::Dec(v) => msgpack::write_str(&mut out, &text(v)),
    }
    msgpack::write_str(&mut out, &text(&tally.amount));
    msgpack::write_str(&mut out, names.get(tally.unit));
    msgpack::write_str(&mut out, names.get(tally.version));
    match tally.provider {
        Some(p) => msgpack::write_str(&mut out, names.get(p)),
        None => msgpack::write_nil(&mut out),
    }
    msgpack::write_int(&mut out, tally.revision)?;
    msgpack::write_int(&mut out, tally.charged)?;
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
    if !(4..=7).contains(&fields) {
        return None;
    }
    let quantity = match r.value()? {
        Value::Int(v) => Qty::Int(v),
        Value::Str(s) => Qty::Dec(arith.parse(s)?),
        _ => return None,
    };
    let amount = arith.parse(r.str()?)?;
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
    };
    if fields > 4 {
        tally.provider = match r.value()? {
            Value::Nil => None,
            Value::Str(s) => Some(names.id(s)),
            _ => return None,
        };
    }
    if fields > 5 {
        tally.revision = r.int()?;
    }
    if fields > 6 {
        tally.charged = r.int()?;
    }
    r.at_end().then_some(tally)
}
