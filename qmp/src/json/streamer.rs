//! Splits the token stream into complete JSON values, enforcing QEMU's limits.
//!
//! A value is complete once its braces and brackets balance (or a closer
//! appears without an opener); a top-level scalar is complete when its token
//! ends. Every lexical error, limit violation or syntax error yields exactly
//! one error message and resets the accumulated tokens.

use std::collections::VecDeque;

use serde_json::Value;

use super::lexer::{Lexer, TokenKind};
use super::parser;
use super::utf8;

/// Largest total size in bytes of the tokens of one JSON value (64 MiB).
pub const MAX_TOKEN_SIZE: usize = 64 << 20;
/// Largest number of tokens in one JSON value (2 Mi).
pub const MAX_TOKEN_COUNT: usize = 2 << 20;
/// Deepest nesting of objects and arrays in one JSON value.
pub const MAX_NESTING: i64 = 1 << 10;

/// One result of the stream: a parsed value, or the description of a
/// `GenericError` (e.g. `JSON parse error, expecting value`).
pub type Message = Result<Value, String>;

/// A token kept until its value is complete.
#[derive(Debug)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) text: Vec<u8>,
}

#[derive(Debug, Default)]
struct Assembler {
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
    size: usize,
}

impl Assembler {
    fn process(&mut self, kind: TokenKind, text: &[u8], out: &mut VecDeque<Message>) {
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            TokenKind::Error => {
                let shown = utf8::lossy_c_string(text);
                return self.finish(out, Err(format!("JSON parse error, stray '{shown}'")));
            }
            _ => {}
        }
        if self.size + text.len() + 1 > MAX_TOKEN_SIZE {
            return self.finish(out, Err("JSON token size limit exceeded".into()));
        }
        if self.tokens.len() + 1 > MAX_TOKEN_COUNT {
            return self.finish(out, Err("JSON token count limit exceeded".into()));
        }
        if self.braces + self.brackets > MAX_NESTING {
            return self.finish(out, Err("JSON nesting depth limit exceeded".into()));
        }
        self.size += text.len();
        self.tokens.push(Token {
            kind,
            text: text.to_vec(),
        });
        if (self.braces > 0 || self.brackets > 0) && self.braces >= 0 && self.brackets >= 0 {
            return;
        }
        let result = parser::parse(&self.tokens);
        self.finish(out, result);
    }

    fn end_of_input(&mut self, out: &mut VecDeque<Message>) {
        if !self.tokens.is_empty() {
            let result = parser::parse(&self.tokens);
            self.finish(out, result);
        }
    }

    fn finish(&mut self, out: &mut VecDeque<Message>, message: Message) {
        self.braces = 0;
        self.brackets = 0;
        self.tokens = Vec::new();
        self.size = 0;
        out.push_back(message);
    }
}

/// A streaming JSON parser behaving like QEMU's json-streamer: feed it
/// arbitrary chunks, then take the finished messages out in order.
#[derive(Debug)]
pub struct JsonStreamer {
    lexer: Lexer,
    assembler: Assembler,
    out: VecDeque<Message>,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A parser with no input yet.
    pub fn new() -> Self {
        JsonStreamer {
            lexer: Lexer::new(),
            assembler: Assembler::default(),
            out: VecDeque::new(),
        }
    }

    /// Feeds one byte. Afterwards [`JsonStreamer::next_message`] returns any
    /// messages it completed (one byte can complete two).
    pub fn feed_byte(&mut self, b: u8) {
        let (assembler, out) = (&mut self.assembler, &mut self.out);
        self.lexer
            .feed(b, &mut |kind, text| assembler.process(kind, text, out));
    }

    /// Feeds a chunk of bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.feed_byte(b);
        }
    }

    /// Signals the end of input: an unfinished value becomes an error.
    pub fn flush(&mut self) {
        let (assembler, out) = (&mut self.assembler, &mut self.out);
        self.lexer
            .flush(&mut |kind, text| assembler.process(kind, text, out));
        self.assembler.end_of_input(&mut self.out);
    }

    /// Takes the oldest finished message.
    pub fn next_message(&mut self) -> Option<Message> {
        self.out.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_all(input: &[u8]) -> Vec<Message> {
        let mut s = JsonStreamer::new();
        s.feed(input);
        std::iter::from_fn(|| s.next_message()).collect()
    }

    fn errors(input: &[u8]) -> Vec<String> {
        parse_all(input)
            .into_iter()
            .map(|m| match m {
                Ok(v) => format!("value {v}"),
                Err(e) => e,
            })
            .collect()
    }

    #[test]
    fn objects_complete_without_newline() {
        assert_eq!(parse_all(b"{\"a\": 1}"), vec![Ok(json!({"a": 1}))]);
        assert_eq!(parse_all(b"{}[]"), vec![Ok(json!({})), Ok(json!([]))]);
    }

    #[test]
    fn scalars_need_a_delimiter() {
        assert!(parse_all(b"42").is_empty());
        assert_eq!(parse_all(b"42\n"), vec![Ok(json!(42))]);
        assert_eq!(parse_all(b"\"s\""), vec![Ok(json!("s"))]);
        assert!(parse_all(b"null").is_empty());
        let mut s = JsonStreamer::new();
        s.feed(b"null");
        s.flush();
        assert_eq!(s.next_message(), Some(Ok(Value::Null)));
    }

    #[test]
    fn whitespace_alone_is_silent() {
        assert!(parse_all(b" \t\r\n  ").is_empty());
    }

    #[test]
    fn qemu_test_battery() {
        let cases: &[(&[u8], &[&str])] = &[
            (b"{]\n", &["JSON parse error, expecting value"]),
            (b"{\xFF", &["JSON parse error, stray '\u{FFFD}'"]),
            (b"{\x01", &["JSON parse error, stray '\u{1}'"]),
            (b"{'bad \xFF", &["JSON parse error, stray ''bad \u{FFFD}'"]),
            (
                b"{'execute': 'nonexistent', 'id':'\n",
                &["JSON parse error, stray ''\n'"],
            ),
            (b"%%p", &["JSON parse error, stray '%'"]),
            (
                b"{\x00}",
                &[
                    "JSON parse error, stray ''",
                    "JSON parse error, expecting value",
                ],
            ),
            (b"TRUE ", &["JSON parse error, stray 'T'"]),
            (b"truex ", &["JSON parse error, invalid keyword 'truex'"]),
            (
                b"abc def{}",
                &[
                    "JSON parse error, invalid keyword 'abc'",
                    "JSON parse error, invalid keyword 'def'",
                    "value {}",
                ],
            ),
            (b"[}", &["JSON parse error, expecting value"]),
            (b"[1,]", &["JSON parse error, expecting value"]),
            (b"{,}", &["JSON parse error, expecting value"]),
            (
                b"{\"a\" 1}",
                &["JSON parse error, missing : in object pair"],
            ),
            (
                b"{\"a\":1 \"b\":2}",
                &["JSON parse error, expected separator in dict"],
            ),
            (b"[1 2]", &["JSON parse error, expected separator in list"]),
            (
                b"{1:2}",
                &["JSON parse error, key is not a string in object"],
            ),
            (
                b"{[]:1}",
                &["JSON parse error, key is not a string in object"],
            ),
            (b"{\"a\":1,\"a\":2}", &["JSON parse error, duplicate key"]),
            (b"{\"a\":}", &["JSON parse error, expecting value"]),
            (
                b"\"\\q\"",
                &["JSON parse error, invalid escape sequence in string"],
            ),
            (
                b"\"\\uffff\"",
                &["JSON parse error, \\uffff is not a valid Unicode character"],
            ),
            (
                b"\"\\ud800\\u0041\"",
                &["JSON parse error, \\ud800 is not a valid Unicode character"],
            ),
            (
                b"\"\\u12G4\"",
                &["JSON parse error, \\u12G4 is not a valid Unicode character"],
            ),
            (
                b"\"\\u\"",
                &["JSON parse error, \\u\" is not a valid Unicode character"],
            ),
            (
                b"\"\xEF\xBF\xBF\"",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"\"\x80\"",
                &["JSON parse error, invalid UTF-8 sequence in string"],
            ),
            (
                b"{\"a\x00b\":1}",
                &[
                    "JSON parse error, stray '\"a'",
                    "JSON parse error, expecting value",
                    "value 1",
                    "JSON parse error, expecting value",
                ],
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                errors(input),
                *expected,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn premature_end_of_input() {
        let mut s = JsonStreamer::new();
        s.feed(b"{\"a\": [1, ");
        s.flush();
        assert_eq!(
            s.next_message(),
            Some(Err("JSON parse error, premature EOI".into()))
        );
    }

    #[test]
    fn recovers_after_errors() {
        let got = errors(b"{\"execute\":\"x\"}\x01{\"execute\":\"y\"}@@@ {\"z\":1}");
        assert_eq!(
            got,
            vec![
                "value {\"execute\":\"x\"}",
                "JSON parse error, stray '\u{1}'",
                "value {\"execute\":\"y\"}",
                "JSON parse error, stray '@'",
                "value {\"z\":1}",
            ]
        );
    }

    #[test]
    fn nesting_limit() {
        let ok = [b"[".repeat(1024), b"]".repeat(1024)].concat();
        assert_eq!(parse_all(&ok).len(), 1);
        assert!(parse_all(&ok)[0].is_ok());
        let bad = [b"[".repeat(1025), b"]".repeat(1025)].concat();
        let got = errors(&bad);
        assert_eq!(got.len(), 1026);
        assert_eq!(got[0], "JSON nesting depth limit exceeded");
        assert!(got[1..]
            .iter()
            .all(|e| e == "JSON parse error, expecting value"));
    }

    #[test]
    fn token_count_limit() {
        // "[" + "0," * n + "0]" has 2n + 3 tokens.
        let n = (MAX_TOKEN_COUNT - 3) / 2; // 2097151 tokens: fine
        let ok = [b"[".to_vec(), b"0,".repeat(n), b"0]".to_vec()].concat();
        assert!(matches!(parse_all(&ok).as_slice(), [Ok(_)]));
        let bad = [b"[".to_vec(), b"0,".repeat(n + 1), b"0]".to_vec()].concat();
        assert_eq!(errors(&bad), vec!["JSON token count limit exceeded"]);
    }

    #[test]
    fn token_size_limit() {
        let s = |len: usize| [b"\"".to_vec(), vec![b'a'; len - 2], b"\" ".to_vec()].concat();
        assert!(matches!(
            parse_all(&s(MAX_TOKEN_SIZE - 1)).as_slice(),
            [Ok(_)]
        ));
        assert_eq!(
            errors(&s(MAX_TOKEN_SIZE)),
            vec!["JSON token size limit exceeded"]
        );
        // An endless token is cut at the limit; lexing restarts after it.
        let mut st = JsonStreamer::new();
        st.feed(b"\"");
        st.feed(&vec![b'a'; MAX_TOKEN_SIZE]);
        assert_eq!(
            st.next_message(),
            Some(Err("JSON token size limit exceeded".into()))
        );
        st.feed(b"bc de{}");
        let rest: Vec<_> = std::iter::from_fn(|| st.next_message()).collect();
        assert_eq!(
            rest,
            vec![
                Err("JSON parse error, invalid keyword 'bc'".into()),
                Err("JSON parse error, invalid keyword 'de'".into()),
                Ok(json!({}))
            ]
        );
    }

    #[test]
    fn chunking_at_every_byte_gives_same_result() {
        let input: &[u8] = b"{'execute': 'x', \"arguments\": {\"a\": [1, 2.5, -3e2, true, false, null, \"\\u00e9\\ud83d\\ude00\"]}, 'id': 'c#1'}\n42 {]\n{\x01 {\"k\":\"v\"}";
        let whole = parse_all(input);
        assert_eq!(whole.len(), 5);
        for split in 0..=input.len() {
            let mut s = JsonStreamer::new();
            s.feed(&input[..split]);
            s.feed(&input[split..]);
            let got: Vec<_> = std::iter::from_fn(|| s.next_message()).collect();
            assert_eq!(got, whole, "split at {split}");
        }
        let mut s = JsonStreamer::new();
        for &b in input {
            s.feed_byte(b);
        }
        let got: Vec<_> = std::iter::from_fn(|| s.next_message()).collect();
        assert_eq!(got, whole);
    }
}
