//! The meter's outputs, cut as the Python code cut them: CloudEvents batches of bounded size
//! (`schemas.events.cut_by_size`) and the marks' changelog records (`agents.dedupe.encode_marks`).

use crate::msgpack;

/// Greedy cut of items into `[a,b,...]` messages of at most `limit` bytes, as
/// `schemas.events.cut_by_size` cuts them (an item larger than the limit travels alone).
pub struct Batcher {
    pub limit: usize,
    current: Vec<u8>,
    done: Vec<Vec<u8>>,
}

impl Batcher {
    pub fn new(limit: usize) -> Self {
        Batcher {
            limit,
            current: Vec::new(),
            done: Vec::new(),
        }
    }

    pub fn push(&mut self, body: &[u8]) {
        if !self.current.is_empty() && self.current.len() + body.len() + 2 > self.limit {
            self.finish();
        }
        self.current
            .push(if self.current.is_empty() { b'[' } else { b',' });
        self.current.extend_from_slice(body);
    }

    fn finish(&mut self) {
        if !self.current.is_empty() {
            self.current.push(b']');
            self.done.push(std::mem::take(&mut self.current));
        }
    }

    pub fn take(&mut self) -> Vec<Vec<u8>> {
        self.finish();
        std::mem::take(&mut self.done)
    }
}

/// The marks as meter-changelog records: msgpack lists of [key, value] pairs, each record cut as
/// `agents.dedupe.encode_marks` cuts it (a pair counts its key, its value and 12 bytes of framing;
/// a record stays under `limit` bytes).
pub fn changelog_records(marks: &[(Vec<u8>, [u8; 16])], limit: usize) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let (mut count, mut size) = (0usize, 1usize);
    let flush = |record: &mut Vec<u8>, count: usize, records: &mut Vec<Vec<u8>>| {
        let mut framed = Vec::with_capacity(record.len() + 5);
        msgpack::write_array_len(&mut framed, count);
        framed.extend_from_slice(record);
        records.push(framed);
        record.clear();
    };
    for (key, print) in marks {
        let pair = key.len() + print.len() + 12 + 1;
        if count > 0 && size + pair > limit {
            flush(&mut record, count, &mut records);
            (count, size) = (0, 1);
        }
        msgpack::write_array_len(&mut record, 2);
        msgpack::write_bin(&mut record, key);
        msgpack::write_bin(&mut record, print);
        count += 1;
        size += pair;
    }
    if count > 0 {
        flush(&mut record, count, &mut records);
    }
    records
}
