//! Byte-level JSON lexer with QEMU's token rules and error recovery.
//!
//! Extensions over RFC 8259, as in QEMU: single-quoted strings, and any byte
//! from 0x20 to 0xFD inside a string (escapes and UTF-8 are checked by the
//! parser). After a lexical error, input is skipped up to a structural
//! character, an ASCII control character other than TAB, or 0xFE/0xFF.

use super::streamer::MAX_TOKEN_SIZE;

/// The kind of a token handed to the streamer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
    /// A lexical error; the token text holds the offending bytes.
    Error,
    /// An unfinished token that outgrew the size limit.
    Oversized,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Digits,
    Sign,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one input byte does in one state.
enum Step {
    /// Consume the byte and move to a state.
    Go(State),
    /// Consume the byte and finish a token.
    Emit(TokenKind),
    /// Finish a token without consuming the byte (it is looked at again).
    EmitBefore(TokenKind),
    /// Consume the byte and drop the token text (whitespace).
    Skip,
    /// Leave recovery without consuming the byte.
    Resync,
    /// Consume the byte as part of a lexical error.
    Error,
}

fn step(state: State, b: u8) -> Step {
    use State::*;
    let in_string = (0x20..=0xFD).contains(&b);
    match state {
        Recovery => match b {
            b'\t' => Step::Go(Recovery),
            0..=0x1F | 0xFE | 0xFF | b'[' | b']' | b'{' | b'}' | b':' | b',' => Step::Resync,
            _ => Step::Go(Recovery),
        },
        DqString => match b {
            b'\\' => Step::Go(DqEscape),
            b'"' => Step::Emit(TokenKind::String),
            _ if in_string => Step::Go(DqString),
            _ => Step::Error,
        },
        SqString => match b {
            b'\\' => Step::Go(SqEscape),
            b'\'' => Step::Emit(TokenKind::String),
            _ if in_string => Step::Go(SqString),
            _ => Step::Error,
        },
        DqEscape if in_string => Step::Go(DqString),
        SqEscape if in_string => Step::Go(SqString),
        DqEscape | SqEscape => Step::Error,
        Zero => match b {
            b'0'..=b'9' => Step::Error,
            b'.' => Step::Go(Mantissa),
            _ => Step::EmitBefore(TokenKind::Integer),
        },
        Digits => match b {
            b'0'..=b'9' => Step::Go(Digits),
            b'e' | b'E' => Step::Go(ExpE),
            b'.' => Step::Go(Mantissa),
            _ => Step::EmitBefore(TokenKind::Integer),
        },
        Sign => match b {
            b'0' => Step::Go(Zero),
            b'1'..=b'9' => Step::Go(Digits),
            _ => Step::Error,
        },
        Mantissa => match b {
            b'0'..=b'9' => Step::Go(MantissaDigits),
            _ => Step::Error,
        },
        MantissaDigits => match b {
            b'0'..=b'9' => Step::Go(MantissaDigits),
            b'e' | b'E' => Step::Go(ExpE),
            _ => Step::EmitBefore(TokenKind::Float),
        },
        ExpE => match b {
            b'-' | b'+' => Step::Go(ExpSign),
            b'0'..=b'9' => Step::Go(ExpDigits),
            _ => Step::Error,
        },
        ExpSign => match b {
            b'0'..=b'9' => Step::Go(ExpDigits),
            _ => Step::Error,
        },
        ExpDigits => match b {
            b'0'..=b'9' => Step::Go(ExpDigits),
            _ => Step::EmitBefore(TokenKind::Float),
        },
        Keyword => match b {
            b'a'..=b'z' => Step::Go(Keyword),
            _ => Step::EmitBefore(TokenKind::Keyword),
        },
        Start => match b {
            b'"' => Step::Go(DqString),
            b'\'' => Step::Go(SqString),
            b'0' => Step::Go(Zero),
            b'1'..=b'9' => Step::Go(Digits),
            b'-' => Step::Go(Sign),
            b'{' => Step::Emit(TokenKind::LCurly),
            b'}' => Step::Emit(TokenKind::RCurly),
            b'[' => Step::Emit(TokenKind::LSquare),
            b']' => Step::Emit(TokenKind::RSquare),
            b',' => Step::Emit(TokenKind::Comma),
            b':' => Step::Emit(TokenKind::Colon),
            b'a'..=b'z' => Step::Go(Keyword),
            b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
            _ => Step::Error,
        },
    }
}

/// The lexer: feed bytes, get `(kind, text)` tokens through a callback.
#[derive(Debug)]
pub(crate) struct Lexer {
    state: State,
    token: Vec<u8>,
}

impl Lexer {
    pub(crate) fn new() -> Self {
        Lexer {
            state: State::Start,
            token: Vec::new(),
        }
    }

    /// Feeds one byte; `emit` receives every token it completes (up to two).
    pub(crate) fn feed(&mut self, b: u8, emit: &mut dyn FnMut(TokenKind, &[u8])) {
        loop {
            let consumed = match step(self.state, b) {
                Step::Go(next) => {
                    self.token.push(b);
                    self.state = next;
                    true
                }
                Step::Emit(kind) => {
                    self.token.push(b);
                    emit(kind, &self.token);
                    self.reset_to(State::Start);
                    true
                }
                Step::EmitBefore(kind) => {
                    emit(kind, &self.token);
                    self.reset_to(State::Start);
                    false
                }
                Step::Skip => {
                    self.reset_to(State::Start);
                    true
                }
                Step::Resync => {
                    self.reset_to(State::Start);
                    false
                }
                Step::Error => {
                    self.token.push(b);
                    emit(TokenKind::Error, &self.token);
                    self.reset_to(State::Recovery);
                    true
                }
            };
            if consumed {
                break;
            }
        }
        if self.token.len() > MAX_TOKEN_SIZE {
            emit(TokenKind::Oversized, &self.token);
            self.reset_to(State::Start);
        }
    }

    /// Ends the input: finishes or rejects whatever token is in progress.
    pub(crate) fn flush(&mut self, emit: &mut dyn FnMut(TokenKind, &[u8])) {
        // Like feeding a NUL byte that is never consumed.
        while self.state != State::Start {
            match step(self.state, 0) {
                Step::EmitBefore(kind) => {
                    emit(kind, &self.token);
                    self.reset_to(State::Start);
                }
                Step::Error => {
                    emit(TokenKind::Error, &self.token);
                    self.reset_to(State::Recovery);
                }
                _ => self.reset_to(State::Start),
            }
        }
    }

    fn reset_to(&mut self, state: State) {
        self.token.clear();
        if self.token.capacity() > 4096 {
            self.token.shrink_to(4096);
        }
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(input: &[u8]) -> Vec<(TokenKind, Vec<u8>)> {
        let mut lexer = Lexer::new();
        let mut out = Vec::new();
        for &b in input {
            lexer.feed(b, &mut |k, t| out.push((k, t.to_vec())));
        }
        lexer.flush(&mut |k, t| out.push((k, t.to_vec())));
        out
    }

    fn kinds(input: &[u8]) -> Vec<TokenKind> {
        lex(input).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn structural_and_scalars() {
        use TokenKind::*;
        assert_eq!(
            kinds(b"{ \"a\" : [1, -2.5e+3, 'x', true] }"),
            vec![
                LCurly, String, Colon, LSquare, Integer, Comma, Float, Comma, String, Comma,
                Keyword, RSquare, RCurly
            ]
        );
    }

    #[test]
    fn numbers_follow_qemu_rules() {
        use TokenKind::*;
        assert_eq!(lex(b"01"), vec![(Error, b"01".to_vec())]);
        assert_eq!(lex(b"-01"), vec![(Error, b"-01".to_vec())]);
        assert_eq!(kinds(b"0e5 "), vec![Integer, Keyword, Integer]);
        assert_eq!(lex(b"- "), vec![(Error, b"- ".to_vec())]);
        assert_eq!(lex(b"1.e"), vec![(Error, b"1.e".to_vec())]);
        assert_eq!(kinds(b"1E5 1.5E+3 -0.5e-3 "), vec![Float, Float, Float]);
    }

    #[test]
    fn recovery_skips_to_resync_points() {
        use TokenKind::*;
        // After the error, "abc" is skipped up to the '{'.
        assert_eq!(kinds(b"@abc{}"), vec![Error, LCurly, RCurly]);
        // Tab does not resync, newline does.
        assert_eq!(kinds(b"@\tx\n1 "), vec![Error, Integer]);
        // A control character resyncs and is then an error itself.
        assert_eq!(kinds(b"@x\x01"), vec![Error, Error]);
        assert_eq!(kinds(b"@x\xFF"), vec![Error, Error]);
    }

    #[test]
    fn strings_take_raw_bytes_but_not_controls() {
        use TokenKind::*;
        assert_eq!(kinds(b"\"\xC3\xA9\""), vec![String]);
        assert_eq!(lex(b"'bad \xFF"), vec![(Error, b"'bad \xFF".to_vec())]);
        assert_eq!(lex(b"\"a\nb"), vec![(Error, b"\"a\n".to_vec())]);
        assert_eq!(kinds(b"'it\\'s'"), vec![String]);
    }
}
