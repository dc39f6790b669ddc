//! Recursive-descent parser over the tokens of one complete JSON value,
//! with QEMU's error texts. The first error found is the one reported.

use serde_json::{Map, Number, Value};

use super::lexer::TokenKind;
use super::streamer::Token;
use super::utf8;

type ParseResult<T> = Result<T, String>;

fn error<T>(detail: impl std::fmt::Display) -> ParseResult<T> {
    Err(format!("JSON parse error, {detail}"))
}

/// Parses the tokens of one value.
pub(crate) fn parse(tokens: &[Token]) -> ParseResult<Value> {
    Parser { tokens, pos: 0 }.value()
}

struct Parser<'a> {
    tokens: &'a [Token],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<&'a Token> {
        self.tokens.get(self.pos)
    }

    fn pop(&mut self) -> Option<&'a Token> {
        let t = self.tokens.get(self.pos);
        if t.is_some() {
            self.pos += 1;
        }
        t
    }

    fn value(&mut self) -> ParseResult<Value> {
        let Some(token) = self.peek() else {
            return error("premature EOI");
        };
        match token.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::Integer | TokenKind::Float | TokenKind::String | TokenKind::Keyword => {
                self.pos += 1;
                literal(token)
            }
            _ => error("expecting value"),
        }
    }

    fn object(&mut self) -> ParseResult<Value> {
        self.pop(); // '{'
        let mut map = Map::new();
        let Some(peek) = self.peek() else {
            return error("premature EOI");
        };
        if peek.kind == TokenKind::RCurly {
            self.pop();
            return Ok(Value::Object(map));
        }
        self.pair(&mut map)?;
        loop {
            let Some(token) = self.pop() else {
                return error("premature EOI");
            };
            match token.kind {
                TokenKind::RCurly => return Ok(Value::Object(map)),
                TokenKind::Comma => self.pair(&mut map)?,
                _ => return error("expected separator in dict"),
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> ParseResult<()> {
        if self.peek().is_none() {
            return error("premature EOI");
        }
        let Value::String(key) = self.value()? else {
            return error("key is not a string in object");
        };
        let Some(colon) = self.pop() else {
            return error("premature EOI");
        };
        if colon.kind != TokenKind::Colon {
            return error("missing : in object pair");
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return error("duplicate key");
        }
        map.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> ParseResult<Value> {
        self.pop(); // '['
        let mut list = Vec::new();
        let Some(peek) = self.peek() else {
            return error("premature EOI");
        };
        if peek.kind == TokenKind::RSquare {
            self.pop();
            return Ok(Value::Array(list));
        }
        list.push(self.value()?);
        loop {
            let Some(token) = self.pop() else {
                return error("premature EOI");
            };
            match token.kind {
                TokenKind::RSquare => return Ok(Value::Array(list)),
                TokenKind::Comma => list.push(self.value()?),
                _ => return error("expected separator in list"),
            }
        }
    }
}

fn literal(token: &Token) -> ParseResult<Value> {
    let text = &token.text;
    match token.kind {
        TokenKind::String => string(text).map(Value::String),
        TokenKind::Keyword => match text.as_slice() {
            b"true" => Ok(Value::Bool(true)),
            b"false" => Ok(Value::Bool(false)),
            b"null" => Ok(Value::Null),
            _ => error(format_args!(
                "invalid keyword '{}'",
                utf8::lossy_c_string(text)
            )),
        },
        TokenKind::Integer => {
            // The lexer only lets ASCII digits and '-' through.
            let s = std::str::from_utf8(text).unwrap_or("0");
            if let Ok(i) = s.parse::<i64>() {
                Ok(Value::Number(i.into()))
            } else if let (false, Ok(u)) = (s.starts_with('-'), s.parse::<u64>()) {
                Ok(Value::Number(u.into()))
            } else {
                Ok(float(s))
            }
        }
        _ => Ok(float(std::str::from_utf8(text).unwrap_or("0"))),
    }
}

/// A double like `strtod` gives it. Out-of-range values, which QEMU keeps as
/// infinities, are clamped to the largest finite double because JSON values
/// here cannot hold infinities.
fn float(s: &str) -> Value {
    let mut f: f64 = s.parse().unwrap_or(0.0);
    if f.is_infinite() {
        f = f64::MAX.copysign(f);
    }
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

fn hex4(t: &[u8], at: usize) -> Option<u32> {
    let mut cp = 0;
    for i in 0..4 {
        let digit = char::from(*t.get(at + i)?).to_digit(16)?;
        cp = (cp << 4) | digit;
    }
    Some(cp)
}

/// Decodes a string token (quotes included) with QEMU's escape and UTF-8 rules.
fn string(t: &[u8]) -> ParseResult<String> {
    let quote = t.first().copied().unwrap_or(b'"');
    let mut out = String::new();
    let mut p = 1;
    while p < t.len() && t[p] != quote {
        if t[p] != b'\\' {
            let (cp, end) = utf8::decode(t, p);
            match cp.and_then(char::from_u32) {
                Some(c) => out.push(c),
                None => return error("invalid UTF-8 sequence in string"),
            }
            p = end;
            continue;
        }
        let beg = p;
        p += 2;
        let c = match t.get(beg + 1) {
            Some(b'"') => '"',
            Some(b'\'') => '\'',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let mut cp = hex4(t, p);
                p += 4;
                if let Some(lead @ 0xD800..=0xDBFF) = cp {
                    if t.get(p) == Some(&b'\\') && t.get(p + 1) == Some(&b'u') {
                        cp = match hex4(t, p + 2) {
                            Some(trail @ 0xDC00..=0xDFFF) => {
                                p += 6;
                                Some((0x10000 + ((lead & 0x3FF) << 10)) | (trail & 0x3FF))
                            }
                            _ => None,
                        };
                    }
                }
                match cp
                    .filter(|&c| utf8::is_valid_codepoint(c))
                    .and_then(char::from_u32)
                {
                    Some(c) => c,
                    None => {
                        let shown = utf8::lossy_c_string(&t[beg..p.min(t.len())]);
                        return error(format_args!("{shown} is not a valid Unicode character"));
                    }
                }
            }
            _ => return error("invalid escape sequence in string"),
        };
        out.push(c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tok(kind: TokenKind, text: &str) -> Token {
        Token {
            kind,
            text: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn strings_and_escapes() {
        assert_eq!(string(b"'a\\'b\\\"c'").unwrap(), "a'b\"c");
        assert_eq!(
            string(b"\"\\b\\f\\n\\r\\t\\/\\\\\"").unwrap(),
            "\u{8}\u{c}\n\r\t/\\"
        );
        assert_eq!(
            string(b"\"\\u00e9\\uD83D\\uDE00\\u0000\"").unwrap(),
            "é😀\0"
        );
        assert_eq!(string(b"\"\xC0\x80\"").unwrap(), "\0");
        assert_eq!(
            string(b"\"\\ufdd0\"").unwrap_err(),
            "JSON parse error, \\ufdd0 is not a valid Unicode character"
        );
        assert_eq!(
            string(b"\"\\udc00\"").unwrap_err(),
            "JSON parse error, \\udc00 is not a valid Unicode character"
        );
    }

    #[test]
    fn numbers() {
        let int = |s| literal(&tok(TokenKind::Integer, s)).unwrap();
        assert_eq!(int("-0"), json!(0));
        assert_eq!(int("9223372036854775807"), json!(i64::MAX));
        assert_eq!(int("18446744073709551615"), json!(u64::MAX));
        assert_eq!(int("-9223372036854775809"), json!(-9223372036854775809.0));
        assert_eq!(
            int("123456789012345678901234"),
            json!(1.2345678901234568e23)
        );
        let flt = |s| literal(&tok(TokenKind::Float, s)).unwrap();
        assert_eq!(flt("1e999"), json!(f64::MAX));
        assert_eq!(flt("-1e999"), json!(-f64::MAX));
        assert_eq!(flt("2.0").as_f64(), Some(2.0));
        assert!(flt("2.0").is_f64());
    }

    #[test]
    fn errors_come_from_the_first_problem() {
        let toks = vec![tok(TokenKind::LCurly, "{"), tok(TokenKind::RSquare, "]")];
        assert_eq!(
            parse(&toks).unwrap_err(),
            "JSON parse error, expecting value"
        );
        let toks = vec![tok(TokenKind::LSquare, "[")];
        assert_eq!(parse(&toks).unwrap_err(), "JSON parse error, premature EOI");
        assert_eq!(parse(&[]).unwrap_err(), "JSON parse error, premature EOI");
    }
}
