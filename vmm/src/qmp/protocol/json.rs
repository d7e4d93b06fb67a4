//! QMP's JSON dialect, both directions.
//!
//! Input: [`JsonStreamer`] turns an arbitrary chunked byte stream into complete
//! top-level JSON values the way QEMU's json-lexer/json-streamer/json-parser
//! trio does, including QEMU's extensions (single-quoted strings, `\'`),
//! its error strings and its resynchronisation after garbage.  serde_json could
//! frame the stream (its `StreamDeserializer` yields one value after another
//! from a byte stream) and its `unbounded_depth` feature lifts the 128-level
//! nesting limit, so neither is why this is hand-written.  The reasons are
//! what QEMU's clients can see: QEMU accepts single-quoted strings (and `\'`
//! escapes) that serde_json rejects, words every error its own way
//! ("JSON parse error, stray 'x'", "expecting value", ...), and after bad
//! input it resynchronises at the next balanced top-level value, reporting one
//! error per broken message and keeping the connection, where serde_json's
//! stream stops at the first error.
//!
//! Output: [`to_line`] serialises with QEMU's json-writer conventions
//! (`", "` and `": "` separators, non-ASCII escaped as `\uXXXX`, doubles as
//! `%.17g`) and terminates the line with `"\r\n"`, because QEMU's monitor
//! output path turns every `'\n'` into `"\r\n"`.

use std::collections::VecDeque;
use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};
use serde_json::{Map, Number, Value};

use super::QmpError;

/// Largest accepted message, in bytes (whitespace inside the value counts).
/// QEMU's own cap is 64 MiB of tokens; a monitor for a small VMM needs far less.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// Deepest accepted nesting of `{`/`[`, as QEMU's `MAX_NESTING`.
pub const MAX_NESTING_DEPTH: usize = 1024;

const SIZE_LIMIT_MSG: &str = "JSON token size limit exceeded";
const DEPTH_LIMIT_MSG: &str = "JSON nesting depth limit exceeded";

/// Lexer states, mirroring QEMU's DFA so that error tokens and recovery
/// points match byte for byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lex {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Str,
    Integer,
    Float,
    Keyword,
}

/// What one byte does to the lexer.
enum Step {
    /// Byte belongs to the token being built; go to the given state.
    Grow(Lex),
    /// Byte completes a token (structural character, closing quote).
    Token(Tok),
    /// The token ended *before* this byte; re-read the byte from `Start`.
    TokenBefore(Tok),
    /// Byte is not valid here: report the token so far plus this byte.
    Error,
    /// Byte is skipped (whitespace, or garbage while recovering).
    Skip,
    /// Recovery ends before this byte; re-read it from `Start`.
    Resync,
}

fn step(state: Lex, b: u8) -> Step {
    use Lex::*;
    match state {
        Start => match b {
            b'"' => Step::Grow(DqString),
            b'\'' => Step::Grow(SqString),
            b'0' => Step::Grow(Zero),
            b'1'..=b'9' => Step::Grow(Digits),
            b'-' => Step::Grow(Sign),
            b'{' => Step::Token(Tok::LCurly),
            b'}' => Step::Token(Tok::RCurly),
            b'[' => Step::Token(Tok::LSquare),
            b']' => Step::Token(Tok::RSquare),
            b',' => Step::Token(Tok::Comma),
            b':' => Step::Token(Tok::Colon),
            b'a'..=b'z' => Step::Grow(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            _ => Step::Error,
        },
        // Skip to a structural character or an ASCII control character
        // (other than tab), or to 0xFE/0xFF: the points where a client can
        // force the parser back into a known state.
        Recovery => match b {
            b'\t' => Step::Skip,
            0x00..=0x1f | 0xfe | 0xff => Step::Resync,
            b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => Step::Skip,
        },
        DqString => match b {
            b'\\' => Step::Grow(DqEscape),
            b'"' => Step::Token(Tok::Str),
            0x20..=0xfd => Step::Grow(DqString),
            _ => Step::Error,
        },
        SqString => match b {
            b'\\' => Step::Grow(SqEscape),
            b'\'' => Step::Token(Tok::Str),
            0x20..=0xfd => Step::Grow(SqString),
            _ => Step::Error,
        },
        DqEscape => match b {
            0x20..=0xfd => Step::Grow(DqString),
            _ => Step::Error,
        },
        SqEscape => match b {
            0x20..=0xfd => Step::Grow(SqString),
            _ => Step::Error,
        },
        Zero => match b {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Grow(Mantissa),
            _ => Step::TokenBefore(Tok::Integer),
        },
        Sign => match b {
            b'0' => Step::Grow(Zero),
            b'1'..=b'9' => Step::Grow(Digits),
            _ => Step::Error,
        },
        Digits => match b {
            b'0'..=b'9' => Step::Grow(Digits),
            b'e' | b'E' => Step::Grow(ExpE),
            b'.' => Step::Grow(Mantissa),
            _ => Step::TokenBefore(Tok::Integer),
        },
        Mantissa => match b {
            b'0'..=b'9' => Step::Grow(MantissaDigits),
            _ => Step::Error,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Step::Grow(MantissaDigits),
            b'e' | b'E' => Step::Grow(ExpE),
            _ => Step::TokenBefore(Tok::Float),
        },
        ExpE => match b {
            b'+' | b'-' => Step::Grow(ExpSign),
            b'0'..=b'9' => Step::Grow(ExpDigits),
            _ => Step::Error,
        },
        ExpSign => match b {
            b'0'..=b'9' => Step::Grow(ExpDigits),
            _ => Step::Error,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Step::Grow(ExpDigits),
            _ => Step::TokenBefore(Tok::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Step::Grow(Keyword),
            _ => Step::TokenBefore(Tok::Keyword),
        },
    }
}

/// Streaming framer: bytes in, complete top-level JSON values out.
///
/// Semantics follow QEMU's json-streamer: a message ends when the `{}`/`[]`
/// depth returns to zero (or goes negative), a scalar at depth zero is a
/// message by itself, a lexical error reports `JSON parse error, stray '…'`
/// and resynchronises at the next structural or control character, and
/// grammar errors are reported once, when the broken message ends.
///
/// Unlike QEMU, hitting the size or depth limit discards the rest of the
/// offending value (tracking depth without storing anything) instead of
/// re-reading its tail as fresh top-level input, so one oversized request
/// yields exactly one error.
#[derive(Debug)]
pub struct JsonStreamer {
    lex: Lex,
    token: Vec<u8>,
    braces: i64,
    brackets: i64,
    parser: PushParser,
    /// Bytes consumed since the current message started.
    size: usize,
    /// Set while skipping the remainder of a value that broke a limit.
    discarding: bool,
    max_size: usize,
    max_depth: usize,
    out: VecDeque<Result<Value, QmpError>>,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer with QMP's limits ([`MAX_MESSAGE_SIZE`], [`MAX_NESTING_DEPTH`]).
    pub fn new() -> Self {
        Self::with_limits(MAX_MESSAGE_SIZE, MAX_NESTING_DEPTH)
    }

    /// A streamer with custom limits (tests, or a stricter server).
    pub fn with_limits(max_size: usize, max_depth: usize) -> Self {
        JsonStreamer {
            lex: Lex::Start,
            token: Vec::new(),
            braces: 0,
            brackets: 0,
            parser: PushParser::default(),
            size: 0,
            discarding: false,
            max_size,
            max_depth,
            out: VecDeque::new(),
        }
    }

    /// Forget any partial input, as QEMU does when a client disconnects.
    pub fn reset(&mut self) {
        let (max_size, max_depth) = (self.max_size, self.max_depth);
        *self = Self::with_limits(max_size, max_depth);
    }

    /// Feed bytes; returns every message completed by them, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, QmpError>> {
        for &b in bytes {
            self.feed_byte(b);
        }
        self.out.drain(..).collect()
    }

    /// True if a message is partially received (useful to decide whether a
    /// closing connection lost data).
    pub fn is_mid_message(&self) -> bool {
        self.braces != 0 || self.brackets != 0 || !matches!(self.lex, Lex::Start | Lex::Recovery)
    }

    #[cfg(test)]
    pub(crate) fn token_capacity(&self) -> usize {
        self.token.capacity()
    }

    fn feed_byte(&mut self, b: u8) {
        loop {
            match step(self.lex, b) {
                Step::Grow(next) => {
                    self.count_byte();
                    if !self.discarding {
                        self.token.push(b);
                    }
                    self.lex = next;
                    return;
                }
                Step::Token(tok) => {
                    self.count_byte();
                    if !self.discarding {
                        self.token.push(b);
                    }
                    self.lex = Lex::Start;
                    self.token_done(tok);
                    return;
                }
                Step::TokenBefore(tok) => {
                    self.lex = Lex::Start;
                    self.token_done(tok);
                    // Re-read the byte from Start.
                }
                Step::Error => {
                    self.count_byte();
                    if !self.discarding {
                        self.token.push(b);
                    }
                    self.lex = Lex::Recovery;
                    self.lexical_error();
                    return;
                }
                Step::Skip => {
                    if self.lex == Lex::Start && (self.braces != 0 || self.brackets != 0) {
                        self.count_byte();
                    }
                    return;
                }
                Step::Resync => {
                    self.lex = Lex::Start;
                }
            }
        }
    }

    /// Account one byte of the current message and enforce the size cap
    /// immediately, so a never-ending string cannot grow the buffer.
    fn count_byte(&mut self) {
        self.size = self.size.saturating_add(1);
        if self.size > self.max_size && !self.discarding {
            self.start_discard(SIZE_LIMIT_MSG);
        }
    }

    fn start_discard(&mut self, msg: &str) {
        self.out.push_back(Err(QmpError::generic(msg)));
        self.discarding = true;
        self.parser = PushParser::default();
        self.token = Vec::new();
    }

    fn end_message(&mut self) {
        self.braces = 0;
        self.brackets = 0;
        self.size = 0;
        self.discarding = false;
        self.parser = PushParser::default();
    }

    fn lexical_error(&mut self) {
        if !self.discarding {
            // QEMU formats the token as a C string: it stops at a NUL byte.
            let len = self
                .token
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(self.token.len());
            let text = String::from_utf8_lossy(&self.token[..len]);
            let msg = format!("JSON parse error, stray '{text}'");
            self.out.push_back(Err(QmpError::generic(msg)));
        }
        self.token.clear();
        // QEMU drops the whole pending message on a lexical error.
        self.end_message();
    }

    fn token_done(&mut self, tok: Tok) {
        match tok {
            Tok::LCurly => self.braces += 1,
            Tok::RCurly => self.braces -= 1,
            Tok::LSquare => self.brackets += 1,
            Tok::RSquare => self.brackets -= 1,
            _ => {}
        }
        let text = std::mem::take(&mut self.token);
        if !self.discarding {
            let depth = self.braces.max(0) + self.brackets.max(0);
            if depth > self.max_depth as i64 {
                self.start_discard(DEPTH_LIMIT_MSG);
            } else {
                self.parser.push(tok, &text);
            }
        }
        let finished =
            self.braces < 0 || self.brackets < 0 || (self.braces == 0 && self.brackets == 0);
        if finished {
            if !self.discarding {
                let result = self
                    .parser
                    .finish()
                    .map_err(|m| QmpError::generic(format!("JSON parse error, {m}")));
                self.out.push_back(result);
            }
            self.end_message();
        }
        // Reuse the allocation for the next token, unless a huge string
        // left a buffer we should not keep around.
        if text.capacity() <= 64 * 1024 {
            self.token = text;
            self.token.clear();
        }
    }
}

#[derive(Debug)]
enum ObjState {
    AfterLCurly,
    BeforeKey,
    AfterKey,
    BeforeValue,
    AfterValue,
}

#[derive(Debug)]
enum ArrState {
    AfterLSquare,
    BeforeValue,
    AfterValue,
}

#[derive(Debug)]
enum Frame {
    Object {
        map: Map<String, Value>,
        key: Option<String>,
        state: ObjState,
    },
    Array {
        items: Vec<Value>,
        state: ArrState,
    },
}

/// A grammar or string error in one JSON message, worded as QEMU's parser words it (the
/// streamer reports it as `JSON parse error, <this>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("premature EOI")]
    PrematureEoi,
    #[error("missing : in object pair")]
    MissingColon,
    #[error("expected separator in dict")]
    DictSeparator,
    #[error("expected separator in list")]
    ListSeparator,
    #[error("key is not a string in object")]
    KeyNotString,
    #[error("expecting value")]
    ExpectingValue,
    #[error("duplicate key")]
    DuplicateKey,
    #[error("invalid keyword '{0}'")]
    Keyword(String),
    #[error("{0} is not a valid Unicode character")]
    BadCodepoint(String),
    #[error("invalid escape sequence in string")]
    BadEscape,
    #[error("invalid UTF-8 sequence in string")]
    BadUtf8,
}

/// Incremental JSON parser fed with tokens.  Records the first grammar error
/// (message text as QEMU's parser words it) and ignores the rest of the
/// message, which the streamer then reports once the message ends.
#[derive(Debug, Default)]
struct PushParser {
    stack: Vec<Frame>,
    done: Option<Value>,
    error: Option<ParseError>,
}

enum Expect {
    Value,
    Key,
}

impl PushParser {
    fn push(&mut self, tok: Tok, text: &[u8]) {
        if self.error.is_some() || self.done.is_some() {
            if self.error.is_none() {
                // A complete value followed by more tokens cannot happen with
                // the streamer's framing, but stay safe.
                self.error = Some(ParseError::ExpectingValue);
            }
            return;
        }
        if let Err(e) = self.step(tok, text) {
            self.error = Some(e);
            self.stack.clear();
        }
    }

    fn finish(&mut self) -> Result<Value, ParseError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        match self.done.take() {
            Some(v) => Ok(v),
            None => Err(ParseError::PrematureEoi),
        }
    }

    fn step(&mut self, tok: Tok, text: &[u8]) -> Result<(), ParseError> {
        let expect = match self.stack.last_mut() {
            None => Expect::Value,
            Some(Frame::Object { map, key, state }) => match state {
                ObjState::AfterLCurly | ObjState::BeforeKey => {
                    if matches!(state, ObjState::AfterLCurly) && tok == Tok::RCurly {
                        let map = std::mem::take(map);
                        self.stack.pop();
                        return self.complete(Value::Object(map));
                    }
                    Expect::Key
                }
                ObjState::AfterKey => {
                    if tok != Tok::Colon {
                        return Err(ParseError::MissingColon);
                    }
                    *state = ObjState::BeforeValue;
                    return Ok(());
                }
                ObjState::BeforeValue => Expect::Value,
                ObjState::AfterValue => {
                    return match tok {
                        Tok::Comma => {
                            *state = ObjState::BeforeKey;
                            *key = None;
                            Ok(())
                        }
                        Tok::RCurly => {
                            let map = std::mem::take(map);
                            self.stack.pop();
                            self.complete(Value::Object(map))
                        }
                        _ => Err(ParseError::DictSeparator),
                    };
                }
            },
            Some(Frame::Array { items, state }) => match state {
                ArrState::AfterLSquare | ArrState::BeforeValue => {
                    if matches!(state, ArrState::AfterLSquare) && tok == Tok::RSquare {
                        let items = std::mem::take(items);
                        self.stack.pop();
                        return self.complete(Value::Array(items));
                    }
                    Expect::Value
                }
                ArrState::AfterValue => {
                    return match tok {
                        Tok::Comma => {
                            *state = ArrState::BeforeValue;
                            Ok(())
                        }
                        Tok::RSquare => {
                            let items = std::mem::take(items);
                            self.stack.pop();
                            self.complete(Value::Array(items))
                        }
                        _ => Err(ParseError::ListSeparator),
                    };
                }
            },
        };
        match expect {
            Expect::Key => {
                let k = match tok {
                    Tok::Str => parse_string(text)?,
                    Tok::Keyword => {
                        // QEMU parses the key as a value first, so a bad
                        // keyword is reported as such.
                        parse_keyword(text)?;
                        return Err(ParseError::KeyNotString);
                    }
                    Tok::Integer | Tok::Float | Tok::LCurly | Tok::LSquare => {
                        return Err(ParseError::KeyNotString);
                    }
                    _ => return Err(ParseError::ExpectingValue),
                };
                if let Some(Frame::Object { key, state, .. }) = self.stack.last_mut() {
                    *key = Some(k);
                    *state = ObjState::AfterKey;
                }
                Ok(())
            }
            Expect::Value => match tok {
                Tok::LCurly => {
                    self.stack.push(Frame::Object {
                        map: Map::new(),
                        key: None,
                        state: ObjState::AfterLCurly,
                    });
                    Ok(())
                }
                Tok::LSquare => {
                    self.stack.push(Frame::Array {
                        items: Vec::new(),
                        state: ArrState::AfterLSquare,
                    });
                    Ok(())
                }
                Tok::Str => {
                    let s = parse_string(text)?;
                    self.complete(Value::String(s))
                }
                Tok::Integer => self.complete(parse_integer(text)),
                Tok::Float => self.complete(parse_float(text)),
                Tok::Keyword => {
                    let v = parse_keyword(text)?;
                    self.complete(v)
                }
                _ => Err(ParseError::ExpectingValue),
            },
        }
    }

    /// Attach a finished value to its container, or finish the message.
    fn complete(&mut self, value: Value) -> Result<(), ParseError> {
        match self.stack.last_mut() {
            None => {
                self.done = Some(value);
                Ok(())
            }
            Some(Frame::Object { map, key, state }) => {
                let k = key.take().unwrap_or_default();
                if map.contains_key(&k) {
                    return Err(ParseError::DuplicateKey);
                }
                map.insert(k, value);
                *state = ObjState::AfterValue;
                Ok(())
            }
            Some(Frame::Array { items, state }) => {
                items.push(value);
                *state = ArrState::AfterValue;
                Ok(())
            }
        }
    }
}

fn parse_keyword(text: &[u8]) -> Result<Value, ParseError> {
    match text {
        b"true" => Ok(Value::Bool(true)),
        b"false" => Ok(Value::Bool(false)),
        b"null" => Ok(Value::Null),
        _ => Err(ParseError::Keyword(
            String::from_utf8_lossy(text).into_owned(),
        )),
    }
}

/// QEMU: int64 if it fits, else uint64 if it fits, else double.
fn parse_integer(text: &[u8]) -> Value {
    let s = String::from_utf8_lossy(text);
    if let Ok(i) = s.parse::<i64>() {
        return Value::Number(i.into());
    }
    if !s.starts_with('-')
        && let Ok(u) = s.parse::<u64>()
    {
        return Value::Number(u.into());
    }
    parse_float(text)
}

fn parse_float(text: &[u8]) -> Value {
    let s = String::from_utf8_lossy(text);
    let f = s.parse::<f64>().unwrap_or(0.0);
    // QEMU keeps an infinite strtod() result; JSON values cannot hold one,
    // so saturate (it is still "a number that is not an integer").
    let f = if f.is_infinite() {
        f64::MAX.copysign(f)
    } else {
        f
    };
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn hex4(s: &[u8]) -> Option<u32> {
    if s.len() < 4 {
        return None;
    }
    let mut v = 0u32;
    for &c in &s[..4] {
        v = v * 16 + (c as char).to_digit(16)?;
    }
    Some(v)
}

/// Code points QEMU's modified-UTF-8 encoder refuses: surrogates,
/// noncharacters and anything past U+10FFFF.
fn valid_codepoint(cp: u32) -> bool {
    !(cp > 0x10ffff
        || (0xfdd0..=0xfdef).contains(&cp)
        || (cp & 0xfffe) == 0xfffe
        || (0xd800..=0xdfff).contains(&cp))
}

/// Decode a string token (quotes included) with QEMU's escape rules.
fn parse_string(text: &[u8]) -> Result<String, ParseError> {
    let body = text.get(1..text.len().saturating_sub(1)).unwrap_or(&[]);
    let mut out = String::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == b'\\' {
            let beg = i;
            let esc = body.get(i + 1).copied().unwrap_or(0);
            i += 2;
            match esc {
                b'"' => out.push('"'),
                b'\'' => out.push('\''),
                b'\\' => out.push('\\'),
                b'/' => out.push('/'),
                b'b' => out.push('\u{8}'),
                b'f' => out.push('\u{c}'),
                b'n' => out.push('\n'),
                b'r' => out.push('\r'),
                b't' => out.push('\t'),
                b'u' => {
                    let mut cp = hex4(&body[i.min(body.len())..]);
                    i += 4;
                    let lead = cp.filter(|c| (0xd800..=0xdbff).contains(c));
                    let then_u = body.get(i) == Some(&b'\\') && body.get(i + 1) == Some(&b'u');
                    if let (Some(lead), true) = (lead, then_u) {
                        let trail = hex4(&body[(i + 2).min(body.len())..]);
                        cp = match trail {
                            Some(t) if (0xdc00..=0xdfff).contains(&t) => {
                                i += 6;
                                Some(0x10000 + ((lead & 0x3ff) << 10) + (t & 0x3ff))
                            }
                            _ => None,
                        };
                    }
                    match cp.filter(|&c| valid_codepoint(c)).and_then(char::from_u32) {
                        Some(ch) => out.push(ch),
                        None => {
                            let end = i.min(body.len());
                            return Err(ParseError::BadCodepoint(
                                String::from_utf8_lossy(&body[beg..end]).into_owned(),
                            ));
                        }
                    }
                }
                _ => return Err(ParseError::BadEscape),
            }
            continue;
        }
        // Unescaped text up to the next backslash: must be valid UTF-8
        // without noncharacters.
        let end = body[i..]
            .iter()
            .position(|&b| b == b'\\')
            .map_or(body.len(), |p| i + p);
        let chunk = std::str::from_utf8(&body[i..end]).map_err(|_| ParseError::BadUtf8)?;
        if chunk.chars().any(|ch| !valid_codepoint(ch as u32)) {
            return Err(ParseError::BadUtf8);
        }
        out.push_str(chunk);
        i = end;
    }
    Ok(out)
}

/// serde_json formatter reproducing QEMU's json-writer output.
struct QemuFormatter;

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(format_g(value, 17).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(format_g(f64::from(value), 17).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (idx, ch) in fragment.char_indices() {
            let cp = ch as u32;
            if cp < 0x7f {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..idx])?;
            if cp > 0xffff {
                let v = cp - 0x10000;
                write!(
                    w,
                    "\\u{:04X}\\u{:04X}",
                    0xd800 + (v >> 10),
                    0xdc00 + (v & 0x3ff)
                )?;
            } else {
                write!(w, "\\u{cp:04X}")?;
            }
            start = idx + ch.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        esc: CharEscape,
    ) -> io::Result<()> {
        match esc {
            CharEscape::Quote => w.write_all(b"\\\""),
            CharEscape::ReverseSolidus => w.write_all(b"\\\\"),
            CharEscape::Solidus => w.write_all(b"/"),
            CharEscape::Backspace => w.write_all(b"\\b"),
            CharEscape::FormFeed => w.write_all(b"\\f"),
            CharEscape::LineFeed => w.write_all(b"\\n"),
            CharEscape::CarriageReturn => w.write_all(b"\\r"),
            CharEscape::Tab => w.write_all(b"\\t"),
            CharEscape::AsciiControl(b) => write!(w, "\\u{b:04X}"),
        }
    }
}

/// Serialise `value` in QEMU's JSON style (no line terminator).
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, serde_json::Error> {
    let mut buf = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, QemuFormatter);
    value.serialize(&mut ser)?;
    // The formatter escapes everything outside ASCII.
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Serialise `msg` exactly as QEMU would put it on the wire, `"\r\n"` included.
pub fn to_line<T: Serialize + ?Sized>(msg: &T) -> String {
    match to_json(msg) {
        Ok(mut s) => {
            s.push_str("\r\n");
            s
        }
        // Only non-string map keys or a failing custom Serialize get here;
        // none of this module's types do that, but never emit half a line.
        Err(_) => "{\"error\": {\"class\": \"GenericError\", \"desc\": \"internal error: unserializable reply\"}}\r\n".to_owned(),
    }
}

/// C's `%.<prec>g` (what QEMU uses for doubles: `%.17g`; HMP sizes: `%0.3g`).
pub fn format_g(v: f64, prec: usize) -> String {
    let prec = prec.max(1);
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0".into()
        } else {
            "0".into()
        };
    }
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v < 0.0 { "-inf".into() } else { "inf".into() };
    }
    let sci = format!("{:.*e}", prec - 1, v);
    let (mant, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if exp < -4 || exp >= prec as i32 {
        let mant = strip_zeros(mant);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    } else {
        let decimals = (prec as i32 - 1 - exp).max(0) as usize;
        strip_zeros(&format!("{v:.decimals$}")).to_owned()
    }
}

fn strip_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}
