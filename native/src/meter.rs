//! The meter's per-event work for one input partition, compiled: ingest's fast path (decode,
//! validate, normalize, fingerprint, route), dedupe against the poll's pending marks and the
//! partition store, and the window core's add, in that order for every event, as agents/meter.py
//! did it in Python. What the fast path declines, the Python ingest core (agents/ingest.py)
//! validates, and hands its normalized records back through `accept`, so every event meets one
//! dedupe and one window core, in Kafka order.
//!
//! Per poll: `begin`, then `ingest` / `accept` over the records, then `take` the outputs (the
//! accepted events as CloudEvents batches, the forwarded ones per partition, the new marks and
//! their changelog records, the dead letters). Nothing here is written anywhere: the shell
//! commits the outputs and the marks in one Kafka transaction, then applies the marks to the store
//! (agents/transactional.py's steps).
//!
//! Dedupe reads the store once per chunk of up to `CHUNK_EVENTS` events (one multi-get: it
//! releases the GIL), not once per event; the pending marks are checked first, so a repeat within
//! the poll is found whatever the chunks.

use std::borrow::Cow;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::decimal::Dec;
use crate::event::{read_event, read_normalized, Event, Mode, Policy};
use crate::hashing::{fingerprint, partition_of};
use crate::json::{Decline, Res, Scanner};
use crate::outputs::{changelog_records, Batcher};
use crate::window::{repr, WindowCore};

/// Events parsed before their marks are looked up in one store read.
const CHUNK_EVENTS: usize = 1024;
/// Accounts whose partition is cached; the cache is cleared past this (bounded memory).
const PARTITION_CACHE_SIZE: usize = 1_000_000;

/// One validated event on its way through dedupe and the windows.
struct Item<'a> {
    partition: u32,
    key: Vec<u8>,
    fingerprint: [u8; 16],
    body: Cow<'a, [u8]>,
    event: Option<Event<'a>>, // None for a forwarded event: this partition does not window it
    offset: i64,
}

/// One poll's outputs (lists of bytes and tuples, built once).
#[pyclass(module = "tally_native", get_all, frozen)]
pub struct PollOutput {
    /// The accepted events, normalized, as CloudEvents batches of at most `batch_bytes`.
    accepted: Py<PyList>,
    /// [(partition, batch)]: events that belong to another partition's accounts.
    forwarded: Py<PyList>,
    /// [(identity key, fingerprint)]: the poll's new marks, sorted by key.
    marks: Py<PyList>,
    /// The marks as meter-changelog records (agents.dedupe.encode_marks' format and cut).
    mark_records: Py<PyList>,
    /// [(reason, detail, normalized event, offset)]: id_conflict, too_late, unpriced.
    rejections: Py<PyList>,
    accepted_count: u64,
    duplicates: u64,
    forwarded_count: u64,
}

#[pyclass(module = "tally_native")]
pub struct MeterCore {
    windows: Py<WindowCore>,
    partition: u32,
    partitions: u32,
    max_message_bytes: usize,
    max_event_bytes: usize,
    marks_record_bytes: usize,
    known_accounts: Option<FxHashSet<String>>,
    read: Py<PyAny>,
    read_many: Py<PyAny>,
    partition_cache: FxHashMap<String, u32>,
    earliest_us: i64,
    latest_us: i64,
    max_quantity: Dec,
    one: Dec,
    // This poll's outputs.
    pending: FxHashMap<Vec<u8>, [u8; 16]>,
    accepted: Batcher,
    forwarded: Vec<(u32, Batcher)>,
    rejections: Vec<(&'static str, String, Vec<u8>, i64)>,
    accepted_count: u64,
    duplicates: u64,
    forwarded_count: u64,
}

impl MeterCore {
    fn partition_of(&mut self, account: &str) -> u32 {
        if let Some(&p) = self.partition_cache.get(account) {
            return p;
        }
        if self.partition_cache.len() >= PARTITION_CACHE_SIZE {
            self.partition_cache.clear();
        }
        let p = partition_of(account.as_bytes(), self.partitions);
        self.partition_cache.insert(account.to_string(), p);
        p
    }

    /// Ingest's fast path over one message: every event validated and normalized, or `Decline`
    /// (then nothing of the message is kept, and the Python path takes it whole).
    fn parse_message<'a>(
        &mut self,
        windows: &mut WindowCore,
        value: &'a [u8],
        offset: i64,
    ) -> Res<Vec<Item<'a>>> {
        if value.is_empty()
            || value.len() > self.max_message_bytes
            || memchr::memchr(b'\\', value).is_some()
        {
            return Err(Decline);
        }
        let value = std::str::from_utf8(value).map_err(|_| Decline)?;
        let policy = Policy {
            earliest_us: self.earliest_us,
            latest_us: self.latest_us,
            max_quantity: self.max_quantity,
            one: self.one,
            known_accounts: self.known_accounts.as_ref(),
        };
        let mut s = Scanner::new(value);
        let mut parsed: Vec<(Event<'a>, Vec<u8>)> = Vec::new();
        let max_event = self.max_event_bytes;
        let mut one = |s: &mut Scanner<'a>, limit: Option<usize>| -> Res<()> {
            let start = s.pos;
            let mut body = Vec::with_capacity(512);
            let event = read_event(s, Mode::Fast, &mut windows.arith, Some(&policy), &mut body)?;
            if limit.is_some_and(|max| s.pos - start > max) {
                return Err(Decline); // oversized: ingest's reason to give
            }
            parsed.push((event, body));
            Ok(())
        };
        match s.peek() {
            Some(b'[') => s.array(|s| one(s, Some(max_event)))?,
            Some(b'{') if value.len() <= max_event => one(&mut s, None)?,
            _ => return Err(Decline),
        }
        if !s.at_end() || parsed.is_empty() {
            return Err(Decline);
        }
        Ok(parsed
            .into_iter()
            .map(|(event, body)| {
                let mut key = Vec::with_capacity(event.source.len() + event.id.len() + 1);
                key.extend_from_slice(event.source.as_bytes());
                key.push(0);
                key.extend_from_slice(event.id.as_bytes());
                let partition = self.partition_of(&event.subject);
                // Another partition's account: forwarded there, where it is deduped and windowed.
                let event = (partition == self.partition).then_some(event);
                Item {
                    partition,
                    key,
                    fingerprint: fingerprint(&body),
                    body: Cow::Owned(body),
                    event,
                    offset,
                }
            })
            .collect())
    }

    /// Dedupe and window a run of items, in order; the forwarded ones go to their partition.
    fn settle(
        &mut self,
        py: Python<'_>,
        windows: &mut WindowCore,
        items: Vec<Item<'_>>,
    ) -> PyResult<()> {
        let mut wanted: Vec<&[u8]> = Vec::new();
        let mut asked: FxHashSet<&[u8]> = FxHashSet::default();
        for item in &items {
            if item.event.is_some()
                && !self.pending.contains_key(&item.key)
                && asked.insert(&item.key)
            {
                wanted.push(&item.key);
            }
        }
        let mut stored: FxHashMap<&[u8], Option<Vec<u8>>> = FxHashMap::default();
        if !wanted.is_empty() {
            let keys = PyList::new(py, wanted.iter().map(|k| PyBytes::new(py, k)))?;
            let found = self.read_many.bind(py).call1((keys,))?;
            for (key, value) in wanted.iter().zip(found.try_iter()?) {
                stored.insert(key, value?.extract::<Option<Vec<u8>>>()?);
            }
        }
        for item in &items {
            let Some(event) = &item.event else {
                self.forward(item.partition, &item.body);
                continue;
            };
            let seen = match self.pending.get(&item.key) {
                Some(print) => Some(print.to_vec()),
                None => match stored.get(item.key.as_slice()) {
                    Some(value) => value.clone(),
                    // Withdrawn from the pending marks after the chunk's read: read it now.
                    None => self
                        .read
                        .bind(py)
                        .call1((PyBytes::new(py, &item.key),))?
                        .extract()?,
                },
            };
            match seen {
                None => {
                    self.pending.insert(item.key.clone(), item.fingerprint);
                    match windows.add(py, event)? {
                        Ok(()) => {
                            self.accepted.push(&item.body);
                            self.accepted_count += 1;
                        }
                        Err(refusal) => {
                            // Too late or unpriced: rejected, and its mark withdrawn, so that a
                            // corrected copy is not a duplicate.
                            self.pending.remove(&item.key);
                            let detail = refusal
                                .detail()
                                .trim_matches(|c| c == '\'' || c == '"')
                                .to_string();
                            self.rejections.push((
                                refusal.reason(),
                                detail,
                                item.body.to_vec(),
                                item.offset,
                            ));
                        }
                    }
                }
                Some(print) if print == item.fingerprint => self.duplicates += 1,
                Some(_) => {
                    let text = String::from_utf8_lossy(&item.key);
                    let (source, id) = text.split_once('\0').unwrap_or((&text, ""));
                    let detail = format!(
                        "(source, id) = ({}, {}) was seen before with a different payload",
                        repr(py, source),
                        repr(py, id)
                    );
                    self.rejections
                        .push(("id_conflict", detail, item.body.to_vec(), item.offset));
                }
            }
        }
        Ok(())
    }

    fn forward(&mut self, partition: u32, body: &[u8]) {
        self.forwarded_count += 1;
        let index = match self.forwarded.iter().position(|(p, _)| *p == partition) {
            Some(index) => index,
            None => {
                self.forwarded
                    .push((partition, Batcher::new(self.accepted.limit)));
                self.forwarded.len() - 1
            }
        };
        self.forwarded[index].1.push(body);
    }
}

#[pymethods]
impl MeterCore {
    /// `read(key)`: the store's point read; `read_many(keys)`: its multi-get, in order.
    #[new]
    #[allow(clippy::too_many_arguments)] // ingest's policy and the shell's collaborators
    #[pyo3(signature = (windows, partition, partitions, max_message_bytes, max_event_bytes, batch_bytes, marks_record_bytes, known_accounts, max_quantity, read, read_many))]
    fn new(
        windows: Py<WindowCore>,
        partition: u32,
        partitions: u32,
        max_message_bytes: usize,
        max_event_bytes: usize,
        batch_bytes: usize,
        marks_record_bytes: usize,
        known_accounts: Option<FxHashSet<String>>,
        max_quantity: &str,
        read: Py<PyAny>,
        read_many: Py<PyAny>,
    ) -> PyResult<Self> {
        let mut arith = crate::decimal::Arith::new();
        let max_quantity = arith.parse(max_quantity).ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err("max_quantity is not a decimal")
        })?;
        Ok(MeterCore {
            windows,
            partition,
            partitions: partitions.max(1),
            max_message_bytes,
            max_event_bytes,
            marks_record_bytes,
            known_accounts,
            read,
            read_many,
            partition_cache: FxHashMap::default(),
            earliest_us: i64::MIN,
            latest_us: i64::MIN,
            max_quantity,
            one: arith.of_u64(1),
            pending: FxHashMap::default(),
            accepted: Batcher::new(batch_bytes),
            forwarded: Vec::new(),
            rejections: Vec::new(),
            accepted_count: 0,
            duplicates: 0,
            forwarded_count: 0,
        })
    }

    /// Start a poll: event times are accepted within [earliest_us, latest_us] (epoch
    /// microseconds: now - horizon, now + tolerance); `plans_generation` says whether the plan
    /// directory changed since the last poll (`WindowCore.begin_poll`).
    fn begin(&mut self, py: Python<'_>, earliest_us: i64, latest_us: i64, plans_generation: i64) {
        self.earliest_us = earliest_us;
        self.latest_us = latest_us;
        self.windows
            .bind(py)
            .borrow_mut()
            .begin_poll(plans_generation);
    }

    /// Run the fast path over `records[start:]` (Kafka records: `.value`, `.offset`) until a
    /// message it declines; returns that message's index (`len(records)`: all done). The
    /// declined message is the caller's to validate (agents/ingest.py) and `accept`.
    fn ingest(
        &mut self,
        py: Python<'_>,
        records: &Bound<'_, PyList>,
        start: usize,
    ) -> PyResult<usize> {
        let windows_ref = self.windows.clone_ref(py);
        let mut windows = windows_ref.bind(py).borrow_mut();
        let total = records.len();
        let mut index = start;
        // Records are read span by span (8, 16, ... 1,024), so a poll whose every message is
        // declined costs a few reads per call, not one per remaining record.
        let mut span = 8;
        while index < total {
            let end = (index + span).min(total);
            span = (span * 2).min(1024);
            let values = (index..end)
                .map(|i| {
                    let record = records.get_item(i)?;
                    let offset: i64 = record.getattr(pyo3::intern!(py, "offset"))?.extract()?;
                    Ok((record.getattr(pyo3::intern!(py, "value"))?, offset))
                })
                .collect::<PyResult<Vec<(Bound<'_, PyAny>, i64)>>>()?;
            let mut chunk: Vec<Item<'_>> = Vec::new();
            let mut declined = None;
            for (k, (value, offset)) in values.iter().enumerate() {
                // None (a tombstone) is not bytes: the Python path says why.
                let parsed = match value.downcast::<PyBytes>() {
                    Ok(bytes) => self.parse_message(&mut windows, bytes.as_bytes(), *offset),
                    Err(_) => Err(Decline),
                };
                match parsed {
                    Ok(items) => chunk.extend(items),
                    Err(Decline) => {
                        declined = Some(index + k);
                        break;
                    }
                }
                if chunk.len() >= CHUNK_EVENTS {
                    self.settle(py, &mut windows, std::mem::take(&mut chunk))?;
                }
            }
            self.settle(py, &mut windows, chunk)?;
            if let Some(at) = declined {
                return Ok(at);
            }
            index = end;
        }
        Ok(total)
    }

    /// Records the Python ingest core accepted from one message, all for `partition`:
    /// [(identity key, fingerprint, normalized event)].
    fn accept(
        &mut self,
        py: Python<'_>,
        partition: u32,
        records: Vec<(Vec<u8>, Vec<u8>, Bound<'_, PyBytes>)>,
        offset: i64,
    ) -> PyResult<()> {
        let windows_ref = self.windows.clone_ref(py);
        let mut windows = windows_ref.bind(py).borrow_mut();
        let mut items = Vec::with_capacity(records.len());
        for (key, print, body) in &records {
            let body = body.as_bytes();
            let event = if partition == self.partition {
                let parsed = read_normalized(body, &mut windows.arith);
                Some(parsed.map_err(|_| {
                    pyo3::exceptions::PyValueError::new_err("not a normalized event")
                })?)
            } else {
                None
            };
            let fingerprint: [u8; 16] = print.as_slice().try_into().unwrap_or([0; 16]);
            items.push(Item {
                partition,
                key: key.clone(),
                fingerprint,
                body: Cow::Borrowed(body),
                event,
                offset,
            });
        }
        self.settle(py, &mut windows, items)
    }

    /// The poll's outputs; the core is empty again afterwards.
    fn take(&mut self, py: Python<'_>) -> PyResult<PollOutput> {
        let bytes = |data: &[u8]| PyBytes::new(py, data).unbind();
        let mut marks: Vec<(Vec<u8>, [u8; 16])> = self.pending.drain().collect();
        // Sorted: RocksDB's memtable takes sorted keys ~1.8x faster (bench/README.md).
        marks.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mark_records: Vec<Py<PyBytes>> = changelog_records(&marks, self.marks_record_bytes)
            .iter()
            .map(|r| bytes(r))
            .collect();
        let list = |items: Vec<Bound<'_, PyAny>>| PyList::new(py, items).map(Bound::unbind);
        let accepted = self
            .accepted
            .take()
            .iter()
            .map(|m| bytes(m).into_bound(py).into_any())
            .collect();
        let mut forwarded = Vec::new();
        for (partition, mut batcher) in self.forwarded.drain(..) {
            for message in batcher.take() {
                forwarded.push((partition, bytes(&message)).into_pyobject(py)?.into_any());
            }
        }
        let marks_list = marks
            .iter()
            .map(|(k, v)| Ok((bytes(k), bytes(v)).into_pyobject(py)?.into_any()))
            .collect::<PyResult<_>>()?;
        let rejections = self
            .rejections
            .drain(..)
            .map(|(r, d, raw, o)| Ok((r, d, bytes(&raw), o).into_pyobject(py)?.into_any()))
            .collect::<PyResult<_>>()?;
        let output = PollOutput {
            accepted: list(accepted)?,
            forwarded: list(forwarded)?,
            marks: list(marks_list)?,
            mark_records: list(
                mark_records
                    .into_iter()
                    .map(|m| m.into_bound(py).into_any())
                    .collect(),
            )?,
            rejections: list(rejections)?,
            accepted_count: self.accepted_count,
            duplicates: self.duplicates,
            forwarded_count: self.forwarded_count,
        };
        (self.accepted_count, self.duplicates, self.forwarded_count) = (0, 0, 0);
        Ok(output)
    }
}
