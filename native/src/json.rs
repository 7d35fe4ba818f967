//! A JSON scanner over text (a `str`, stepped through as bytes): only what the event fast path
//! and the re-read of normalized events need. It validates the grammar of everything it reads or skips (RFC 8259: strings without raw
//! control characters and with valid escapes, numbers without leading zeros, literals), so a
//! message it accepts is one msgspec accepts too. Anything it does not handle is a `Decline`:
//! the caller hands the whole message to the Python path, which decides (and dead-letters).

use std::borrow::Cow;

/// The input is outside what this path handles (or not valid JSON): the Python path decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decline;

pub type Res<T> = Result<T, Decline>;

/// Nesting deeper than this in a skipped value is left to the Python path.
const MAX_SKIP_DEPTH: u32 = 64;

/// A string's raw text between its quotes; `escaped` when it holds a backslash escape.
#[derive(Debug, Clone, Copy)]
pub struct Str<'a> {
    pub raw: &'a str,
    pub escaped: bool,
}

impl<'a> Str<'a> {
    /// The string's text, escapes decoded: an unescaped string is borrowed as is (the scanner
    /// reads a `str`, so its UTF-8 was checked once, for the whole message).
    pub fn text(&self) -> Res<Cow<'a, str>> {
        if !self.escaped {
            return Ok(Cow::Borrowed(self.raw));
        }
        unescape(self.raw.as_bytes()).map(Cow::Owned)
    }
}

pub struct Scanner<'a> {
    /// The input, and the same as bytes (what the scanner steps through).
    pub text: &'a str,
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(text: &'a str) -> Self {
        Scanner {
            text,
            buf: text.as_bytes(),
            pos: 0,
        }
    }

    #[inline]
    pub fn skip_ws(&mut self) {
        while let Some(&b) = self.buf.get(self.pos) {
            if b == b' ' || b == b'\n' || b == b'\t' || b == b'\r' {
                self.pos += 1;
            } else {
                break;
            }
        }
    }

    /// The next non-whitespace byte, not consumed.
    #[inline]
    pub fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.buf.get(self.pos).copied()
    }

    #[inline]
    pub fn eat(&mut self, byte: u8) -> Res<()> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(Decline)
        }
    }

    /// True when only whitespace is left.
    pub fn at_end(&mut self) -> bool {
        self.peek().is_none()
    }

    /// A string, positioned at its opening quote (after whitespace).
    pub fn string(&mut self) -> Res<Str<'a>> {
        self.eat(b'"')?;
        let start = self.pos;
        let mut escaped = false;
        loop {
            self.pos += plain_run(&self.buf[self.pos..]).ok_or(Decline)?;
            match self.buf[self.pos] {
                b'"' => {
                    // Both ends are next to a quote, an ASCII byte: a char boundary of the text.
                    let raw = &self.text[start..self.pos];
                    self.pos += 1;
                    return Ok(Str { raw, escaped });
                }
                b'\\' => {}
                _ => return Err(Decline), // a raw control character: not JSON
            }
            escaped = true;
            self.pos += 1; // the backslash
            match self.buf.get(self.pos).copied().ok_or(Decline)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.pos += 1,
                b'u' => {
                    let hex = self.buf.get(self.pos + 1..self.pos + 5).ok_or(Decline)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Decline);
                    }
                    self.pos += 5;
                }
                _ => return Err(Decline),
            }
        }
    }

    /// A number's text, positioned at its first byte (after whitespace); RFC 8259's grammar.
    pub fn number(&mut self) -> Res<&'a [u8]> {
        self.skip_ws();
        let start = self.pos;
        let buf = self.buf;
        let digits = |pos: &mut usize| {
            let from = *pos;
            while buf.get(*pos).is_some_and(u8::is_ascii_digit) {
                *pos += 1;
            }
            *pos - from
        };
        let mut pos = self.pos;
        if buf.get(pos) == Some(&b'-') {
            pos += 1;
        }
        match buf.get(pos) {
            Some(b'0') => pos += 1,
            Some(b'1'..=b'9') => {
                digits(&mut pos);
            }
            _ => return Err(Decline),
        }
        if buf.get(pos) == Some(&b'.') {
            pos += 1;
            if digits(&mut pos) == 0 {
                return Err(Decline);
            }
        }
        if matches!(buf.get(pos), Some(b'e' | b'E')) {
            pos += 1;
            if matches!(buf.get(pos), Some(b'+' | b'-')) {
                pos += 1;
            }
            if digits(&mut pos) == 0 {
                return Err(Decline);
            }
        }
        self.pos = pos;
        Ok(&buf[start..pos])
    }

    /// `null`, consumed if it is next; false (nothing consumed) otherwise.
    pub fn null(&mut self) -> bool {
        if self.peek() == Some(b'n') && self.buf[self.pos..].starts_with(b"null") {
            self.pos += 4;
            true
        } else {
            false
        }
    }

    /// Skip one value of any kind, checking its grammar.
    pub fn skip_value(&mut self, depth: u32) -> Res<()> {
        if depth > MAX_SKIP_DEPTH {
            return Err(Decline);
        }
        match self.peek().ok_or(Decline)? {
            b'"' => self.string().map(|_| ()),
            b'{' => self.object(|s, _| s.skip_value(depth + 1)),
            b'[' => self.array(|s| s.skip_value(depth + 1)),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number().map(|_| ()),
        }
    }

    fn literal(&mut self, word: &[u8]) -> Res<()> {
        if self.buf[self.pos..].starts_with(word) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(Decline)
        }
    }

    /// An object: `member` is called with each key, the scanner at the key's value, which it
    /// must consume.
    pub fn object<F>(&mut self, mut member: F) -> Res<()>
    where
        F: FnMut(&mut Self, Str<'a>) -> Res<()>,
    {
        self.eat(b'{')?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            self.skip_ws();
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(Decline),
            }
            if self.peek() != Some(b'"') {
                return Err(Decline); // a trailing comma
            }
        }
    }

    /// An array: `element` is called at each element, which it must consume.
    pub fn array<F>(&mut self, mut element: F) -> Res<()>
    where
        F: FnMut(&mut Self) -> Res<()>,
    {
        self.eat(b'[')?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            self.skip_ws();
            element(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(Decline),
            }
        }
    }
}

/// How many bytes of a string's body come before its first quote, backslash or raw control
/// character; None when there is none. Eight bytes a step (SWAR): the events' strings are short
/// (ids, names, times: ~10-40 bytes), where a vector search's set-up per call and a second pass
/// for control characters cost more than the search (~4,700 instructions per event before).
#[inline]
fn plain_run(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `x` that is zero. A borrow can only mark bytes above a real
    // zero byte, so the lowest mark is exact, which is all that is read.
    let zero_bytes = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
        let quote = zero_bytes(word ^ (ONES * u64::from(b'"')));
        let backslash = zero_bytes(word ^ (ONES * u64::from(b'\\')));
        let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH; // bytes below 0x20
        let found = quote | backslash | control;
        if found != 0 {
            return Some(offset + found.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    let tail = chunks.remainder();
    let at = tail
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
    Some(offset + at)
}

fn hex4(raw: &[u8]) -> Res<u32> {
    let text = std::str::from_utf8(raw.get(..4).ok_or(Decline)?).map_err(|_| Decline)?;
    u32::from_str_radix(text, 16).map_err(|_| Decline)
}

/// Decode a string's escapes (the scanner has checked them). A lone surrogate, which a Rust
/// string cannot hold, is a `Decline`.
fn unescape(raw: &[u8]) -> Res<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        let kind = *raw.get(i + 1).ok_or(Decline)?;
        i += 2;
        let simple = match kind {
            b'"' => Some(b'"'),
            b'\\' => Some(b'\\'),
            b'/' => Some(b'/'),
            b'b' => Some(0x08),
            b'f' => Some(0x0c),
            b'n' => Some(b'\n'),
            b'r' => Some(b'\r'),
            b't' => Some(b'\t'),
            b'u' => None,
            _ => return Err(Decline),
        };
        if let Some(byte) = simple {
            out.push(byte);
            continue;
        }
        let mut code = hex4(&raw[i..])?;
        i += 4;
        if (0xD800..0xDC00).contains(&code) {
            // A high surrogate must be followed by an escaped low one.
            if raw.get(i..i + 2) != Some(b"\\u") {
                return Err(Decline);
            }
            let low = hex4(&raw[i + 2..])?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err(Decline);
            }
            i += 6;
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
        } else if (0xDC00..0xE000).contains(&code) {
            return Err(Decline);
        }
        let ch = char::from_u32(code).ok_or(Decline)?;
        let mut utf8 = [0u8; 4];
        out.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
    }
    String::from_utf8(out).map_err(|_| Decline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_numbers_and_skips() {
        let mut s =
            Scanner::new(r#" {"a": "x\u00e9\n", "b": [1, -0.5e3, {"c": null}], "d": true} "#);
        let mut seen = Vec::new();
        s.object(|s, key| {
            seen.push(key.text().unwrap().into_owned());
            if key.raw == "a" {
                assert_eq!(s.string()?.text()?, "x\u{e9}\n");
                Ok(())
            } else {
                s.skip_value(0)
            }
        })
        .unwrap();
        assert!(s.at_end());
        assert_eq!(seen, ["a", "b", "d"]);
    }

    #[test]
    fn plain_run_stops_at_the_first_quote_backslash_or_control_byte() {
        // Every length around the 8-byte steps, a special byte (or none) at every position, the
        // rest plain ASCII or bytes of multi-byte UTF-8 (0x80 and up, never special).
        for filler in [b'a', 0x7f, 0x80, 0xc3, 0xff] {
            for len in 0..40 {
                for special in [None, Some(b'"'), Some(b'\\'), Some(0x00), Some(0x1f)] {
                    for at in 0..len.max(1) {
                        let mut bytes = vec![filler; len];
                        if let (Some(b), true) = (special, at < len) {
                            bytes[at] = b;
                            bytes.push(b'"'); // a later special byte never hides the first
                        }
                        let naive = bytes
                            .iter()
                            .position(|&b| b == b'"' || b == b'\\' || b < 0x20);
                        assert_eq!(plain_run(&bytes), naive, "{bytes:?}");
                    }
                }
            }
        }
        // A space (0x20) and bytes just above the specials are plain.
        assert_eq!(plain_run(b" !#[]^_` !#[]^_`\""), Some(16));
    }

    #[test]
    fn bad_grammar_declines() {
        for bad in ["01", "1.", "-", "1e", ".5"] {
            assert!(Scanner::new(bad).number().map(|n| n.len() == bad.len()) != Ok(true));
        }
        assert!(Scanner::new("\"a\x01\"").string().is_err());
        assert!(Scanner::new(r#""\ud800""#)
            .string()
            .unwrap()
            .text()
            .is_err());
        assert!(Scanner::new(r#"{"a":1,}"#).skip_value(0).is_err());
    }
}
