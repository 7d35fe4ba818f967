//! MessagePack, only the forms Tally's state uses (arrays, str, bin, ints, nil), written exactly
//! as msgspec writes them (the smallest form of each), so a state record is the same bytes
//! whichever side wrote it, and read in every form msgspec may have written.

pub fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

pub fn write_bool(out: &mut Vec<u8>, value: bool) {
    out.push(if value { 0xc3 } else { 0xc2 });
}

pub fn write_array_len(out: &mut Vec<u8>, len: usize) {
    if len < 16 {
        out.push(0x90 | len as u8);
    } else if len <= 0xffff {
        out.push(0xdc);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

pub fn write_str(out: &mut Vec<u8>, text: &str) {
    let len = text.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if len <= 0xff {
        out.extend_from_slice(&[0xd9, len as u8]);
    } else if len <= 0xffff {
        out.push(0xda);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(text.as_bytes());
}

pub fn write_bin(out: &mut Vec<u8>, data: &[u8]) {
    let len = data.len();
    if len <= 0xff {
        out.extend_from_slice(&[0xc4, len as u8]);
    } else if len <= 0xffff {
        out.push(0xc5);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
}

/// An int in msgspec's form; None when it does not fit MessagePack (below -2^63 or above 2^64-1),
/// where msgspec raises too.
pub fn write_int(out: &mut Vec<u8>, value: i128) -> Option<()> {
    if value >= 0 {
        let v = u64::try_from(value).ok()?;
        if v < 128 {
            out.push(v as u8);
        } else if v <= 0xff {
            out.extend_from_slice(&[0xcc, v as u8]);
        } else if v <= 0xffff {
            out.push(0xcd);
            out.extend_from_slice(&(v as u16).to_be_bytes());
        } else if v <= 0xffff_ffff {
            out.push(0xce);
            out.extend_from_slice(&(v as u32).to_be_bytes());
        } else {
            out.push(0xcf);
            out.extend_from_slice(&v.to_be_bytes());
        }
    } else {
        let v = i64::try_from(value).ok()?;
        if v >= -32 {
            out.push(v as i8 as u8);
        } else if v >= -128 {
            out.extend_from_slice(&[0xd0, v as i8 as u8]);
        } else if v >= -32_768 {
            out.push(0xd1);
            out.extend_from_slice(&(v as i16).to_be_bytes());
        } else if v >= -2_147_483_648 {
            out.push(0xd2);
            out.extend_from_slice(&(v as i32).to_be_bytes());
        } else {
            out.push(0xd3);
            out.extend_from_slice(&v.to_be_bytes());
        }
    }
    Some(())
}

/// A value read back: the few kinds the state holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Str(&'a str),
    Bin(&'a [u8]),
    Array(usize),
}

pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(out)
    }

    fn uint(&mut self, n: usize) -> Option<u64> {
        Some(
            self.take(n)?
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
        )
    }

    fn sized_str(&mut self, len: usize) -> Option<Value<'a>> {
        std::str::from_utf8(self.take(len)?).ok().map(Value::Str)
    }

    pub fn value(&mut self) -> Option<Value<'a>> {
        let tag = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(match tag {
            0x00..=0x7f => Value::Int(i128::from(tag)),
            0xe0..=0xff => Value::Int(i128::from(tag as i8)),
            0x90..=0x9f => Value::Array(usize::from(tag & 0x0f)),
            0xa0..=0xbf => return self.sized_str(usize::from(tag & 0x1f)),
            0xc0 => Value::Nil,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4..=0xc6 => {
                let len = self.uint(1 << (tag - 0xc4))? as usize;
                Value::Bin(self.take(len)?)
            }
            0xcc..=0xcf => Value::Int(i128::from(self.uint(1 << (tag - 0xcc))?)),
            0xd0 => Value::Int(i128::from(self.take(1)?[0] as i8)),
            0xd1 => Value::Int(i128::from(self.uint(2)? as u16 as i16)),
            0xd2 => Value::Int(i128::from(self.uint(4)? as u32 as i32)),
            0xd3 => Value::Int(i128::from(self.uint(8)? as i64)),
            0xd9..=0xdb => {
                let len = self.uint(1 << (tag - 0xd9))? as usize;
                return self.sized_str(len);
            }
            0xdc => Value::Array(self.uint(2)? as usize),
            0xdd => Value::Array(self.uint(4)? as usize),
            _ => return None,
        })
    }

    pub fn array(&mut self) -> Option<usize> {
        match self.value()? {
            Value::Array(n) => Some(n),
            _ => None,
        }
    }

    pub fn str(&mut self) -> Option<&'a str> {
        match self.value()? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn bool(&mut self) -> Option<bool> {
        match self.value()? {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn int(&mut self) -> Option<i128> {
        match self.value()? {
            Value::Int(v) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_round_trip_in_their_smallest_form() {
        for (value, hex) in [
            (0i128, "00"),
            (128, "cc80"),
            (65536, "ce00010000"),
            (-33, "d0df"),
            (-129, "d1ff7f"),
        ] {
            let mut out = Vec::new();
            write_int(&mut out, value).unwrap();
            let text: String = out.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(text, hex);
            assert_eq!(Reader::new(&out).int(), Some(value));
        }
        assert!(write_int(&mut Vec::new(), i128::from(u64::MAX) + 1).is_none());
    }
}
