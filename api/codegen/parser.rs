//! Reader for the QAPI schema language.
//!
//! The language is JSON-like: single-quoted strings, `true`/`false`, lists and
//! dictionaries, `#` comments to the end of the line.  Every top-level
//! expression is a dictionary.  A comment block that starts with a line `##`
//! and ends with a line `##` is documentation for the definition right after
//! it; its first line `# @Name:` names what it documents and `# @member: text`
//! lines describe members.
//!
//! This module only knows syntax (and `include`); meaning is checked in
//! `schema.rs`.

use std::collections::HashSet;
use std::fmt;

/// A parsed schema value.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `'text'`
    Str(String),
    /// `true` or `false`
    Bool(bool),
    /// `[ ... ]`
    List(Vec<Expr>),
    /// `{ 'key': value, ... }`, keys in source order, without duplicates.
    Dict(Vec<(String, Expr)>),
}

impl Expr {
    /// Looks a key up in a dictionary; `None` for other values or a missing key.
    pub fn get(&self, key: &str) -> Option<&Expr> {
        match self {
            Expr::Dict(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Where something is in the schema sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file, as given to the loader.
    pub file: String,
    /// 1-based line number.
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// A schema error with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaError {
    /// Where the error is.
    pub loc: Location,
    /// What is wrong.
    pub msg: String,
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.loc, self.msg)
    }
}

/// A documentation block (`##` ... `##`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Doc {
    /// The name after `@` on the first line, if the block documents a definition.
    pub symbol: Option<String>,
    /// Free text: the paragraphs before the first member description, and any
    /// later sections such as `Returns:`.
    pub body: String,
    /// `@member: text` descriptions, in order.
    pub members: Vec<(String, String)>,
}

impl Doc {
    /// The description of a member, if documented.
    pub fn member(&self, name: &str) -> Option<&str> {
        self.members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }
}

/// One top-level definition with its documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct TopExpr {
    /// The dictionary.
    pub expr: Expr,
    /// The documentation block right before it, if any.
    pub doc: Option<Doc>,
    /// Where it starts.
    pub loc: Location,
}

struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
    file: &'a str,
    /// Documentation blocks seen since the last top-level expression.
    pending_doc: Option<Doc>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Punct(u8),
    Str(String),
    Bool(bool),
    Eof,
}

impl<'a> Lexer<'a> {
    fn err(&self, msg: impl Into<String>) -> SchemaError {
        SchemaError {
            loc: Location {
                file: self.file.to_string(),
                line: self.line,
            },
            msg: msg.into(),
        }
    }

    fn rest_of_line(&mut self) -> &'a str {
        let start = self.pos;
        while self.pos < self.src.len() && self.src[self.pos] != b'\n' {
            self.pos += 1;
        }
        std::str::from_utf8(&self.src[start..self.pos]).unwrap_or("")
    }

    /// Reads a `##` block; `self.pos` is right after the opening `##`.
    fn doc_block(&mut self) -> Result<Doc, SchemaError> {
        let first = self.rest_of_line();
        if !first.trim().is_empty() {
            return Err(self.err("junk after '##' at start of documentation comment"));
        }
        let mut lines = Vec::new();
        loop {
            if self.pos >= self.src.len() {
                return Err(self.err("documentation comment is not terminated by '##'"));
            }
            // at '\n'
            self.pos += 1;
            self.line += 1;
            // leading blanks before '#'
            while self.pos < self.src.len() && (self.src[self.pos] == b' ') {
                self.pos += 1;
            }
            if self.pos >= self.src.len() || self.src[self.pos] != b'#' {
                return Err(self.err("documentation comment must end with '##'"));
            }
            let text = self.rest_of_line();
            if text == "##" {
                break;
            }
            let body = &text[1..];
            let body = body.strip_prefix(' ').unwrap_or(body);
            lines.push(body.to_string());
        }
        Ok(parse_doc(&lines))
    }

    fn next(&mut self) -> Result<Tok, SchemaError> {
        loop {
            let Some(&c) = self.src.get(self.pos) else {
                return Ok(Tok::Eof);
            };
            match c {
                b'#' => {
                    let at_line_start = self.src[..self.pos]
                        .iter()
                        .rev()
                        .take_while(|&&b| b != b'\n')
                        .all(|&b| b == b' ');
                    if at_line_start && self.src[self.pos..].starts_with(b"##") {
                        self.pos += 2;
                        if self.src.get(self.pos).is_none_or(|&b| b == b'\n') {
                            let doc = self.doc_block()?;
                            self.pending_doc = Some(doc);
                            continue;
                        }
                    }
                    self.rest_of_line();
                }
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'{' | b'}' | b'[' | b']' | b',' | b':' => {
                    self.pos += 1;
                    return Ok(Tok::Punct(c));
                }
                b'\'' => {
                    self.pos += 1;
                    let mut s = String::new();
                    loop {
                        let Some(&ch) = self.src.get(self.pos) else {
                            return Err(self.err("missing terminating \"'\""));
                        };
                        self.pos += 1;
                        match ch {
                            b'\'' => break,
                            b'\n' => return Err(self.err("missing terminating \"'\"")),
                            b'\\' => {
                                let esc = self.src.get(self.pos).copied();
                                self.pos += 1;
                                match esc {
                                    Some(e @ (b'\\' | b'\'' | b'/')) => s.push(e as char),
                                    Some(e) => {
                                        return Err(
                                            self.err(format!("unknown escape \\{}", e as char))
                                        )
                                    }
                                    None => return Err(self.err("missing terminating \"'\"")),
                                }
                            }
                            0x20..=0x7e => s.push(ch as char),
                            _ => {
                                return Err(
                                    self.err("funny character in string (only printable ASCII)")
                                )
                            }
                        }
                    }
                    return Ok(Tok::Str(s));
                }
                b't' if self.src[self.pos..].starts_with(b"true") => {
                    self.pos += 4;
                    return Ok(Tok::Bool(true));
                }
                b'f' if self.src[self.pos..].starts_with(b"false") => {
                    self.pos += 5;
                    return Ok(Tok::Bool(false));
                }
                _ => {
                    return Err(self.err(format!(
                        "stray '{}'",
                        String::from_utf8_lossy(&self.src[self.pos..self.pos + 1])
                    )))
                }
            }
        }
    }
}

/// Splits the lines of a `##` block into symbol, body and member descriptions.
fn parse_doc(lines: &[String]) -> Doc {
    let mut doc = Doc::default();
    let mut iter = lines.iter().peekable();
    if let Some(first) = iter.peek() {
        if let Some(rest) = first.strip_prefix('@') {
            if let Some(name) = rest.strip_suffix(':') {
                doc.symbol = Some(name.trim().to_string());
                iter.next();
            }
        }
    }
    // None: in the body; Some(i): continuing member i.
    let mut current: Option<usize> = None;
    let mut body = String::new();
    for line in iter {
        if let Some(rest) = line.strip_prefix('@') {
            if let Some((name, text)) = rest.split_once(':') {
                if !name.contains(' ') {
                    doc.members
                        .push((name.to_string(), text.trim().to_string()));
                    current = Some(doc.members.len() - 1);
                    continue;
                }
            }
        }
        let continuation = line.starts_with(' ') && !line.trim().is_empty();
        match current {
            Some(i) if continuation => {
                let entry = &mut doc.members[i].1;
                entry.push(' ');
                entry.push_str(line.trim());
            }
            _ => {
                if !line.trim().is_empty() || current.is_none() {
                    current = None;
                    body.push_str(line.trim_end());
                }
                body.push('\n');
            }
        }
    }
    doc.body = collapse_blank_lines(&body);
    doc
}

fn collapse_blank_lines(text: &str) -> String {
    let mut out = String::new();
    let mut blank = true;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !blank {
                out.push('\n');
            }
            blank = true;
        } else {
            out.push_str(line);
            out.push('\n');
            blank = false;
        }
    }
    out.trim_end().to_string()
}

struct Parser<'a> {
    lex: Lexer<'a>,
    tok: Tok,
}

impl<'a> Parser<'a> {
    fn advance(&mut self) -> Result<(), SchemaError> {
        self.tok = self.lex.next()?;
        Ok(())
    }

    fn expect(&mut self, c: u8) -> Result<(), SchemaError> {
        if self.tok == Tok::Punct(c) {
            self.advance()
        } else {
            Err(self.lex.err(format!("expected '{}'", c as char)))
        }
    }

    fn value(&mut self) -> Result<Expr, SchemaError> {
        match self.tok.clone() {
            Tok::Str(s) => {
                self.advance()?;
                Ok(Expr::Str(s))
            }
            Tok::Bool(b) => {
                self.advance()?;
                Ok(Expr::Bool(b))
            }
            Tok::Punct(b'{') => self.dict(),
            Tok::Punct(b'[') => {
                self.advance()?;
                let mut items = Vec::new();
                if self.tok == Tok::Punct(b']') {
                    self.advance()?;
                    return Ok(Expr::List(items));
                }
                loop {
                    items.push(self.value()?);
                    match self.tok {
                        Tok::Punct(b',') => self.advance()?,
                        Tok::Punct(b']') => {
                            self.advance()?;
                            return Ok(Expr::List(items));
                        }
                        _ => return Err(self.lex.err("expected ',' or ']'")),
                    }
                }
            }
            _ => Err(self.lex.err("expected '{', '[', string, or boolean")),
        }
    }

    fn dict(&mut self) -> Result<Expr, SchemaError> {
        self.expect(b'{')?;
        let mut entries: Vec<(String, Expr)> = Vec::new();
        if self.tok == Tok::Punct(b'}') {
            self.advance()?;
            return Ok(Expr::Dict(entries));
        }
        loop {
            let Tok::Str(key) = self.tok.clone() else {
                return Err(self.lex.err("expected string or '}'"));
            };
            self.advance()?;
            self.expect(b':')?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(self.lex.err(format!("duplicate key '{key}'")));
            }
            let v = self.value()?;
            entries.push((key, v));
            match self.tok {
                Tok::Punct(b',') => self.advance()?,
                Tok::Punct(b'}') => {
                    self.advance()?;
                    return Ok(Expr::Dict(entries));
                }
                _ => return Err(self.lex.err("expected ',' or '}'")),
            }
        }
    }
}

/// Parses the text of one schema file into its top-level expressions.
///
/// `file` is only used in error locations.  `include` directives are returned
/// as ordinary expressions; [`load`] follows them.
pub fn parse(file: &str, text: &str) -> Result<Vec<TopExpr>, SchemaError> {
    let mut p = Parser {
        lex: Lexer {
            src: text.as_bytes(),
            pos: 0,
            line: 1,
            file,
            pending_doc: None,
        },
        tok: Tok::Eof,
    };
    p.advance()?;
    let mut out = Vec::new();
    loop {
        let doc = p.lex.pending_doc.take();
        match p.tok {
            Tok::Eof => {
                if let Some(Doc {
                    symbol: Some(sym), ..
                }) = doc
                {
                    return Err(p.lex.err(format!(
                        "documentation for '{sym}' is not followed by the definition"
                    )));
                }
                return Ok(out);
            }
            Tok::Punct(b'{') => {
                let loc = Location {
                    file: file.to_string(),
                    line: p.lex.line,
                };
                let expr = p.dict()?;
                out.push(TopExpr { expr, doc, loc });
            }
            _ => return Err(p.lex.err("expected '{'")),
        }
    }
}

/// Loads a schema file and, recursively, the files it includes (each file once,
/// paths relative to the including file), returning all definitions in order.
///
/// `read` returns the text of a file given its path.
pub fn load(
    path: &str,
    read: &mut dyn FnMut(&str) -> Result<String, String>,
) -> Result<Vec<TopExpr>, SchemaError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    load_into(path, read, &mut seen, &mut out, None)?;
    Ok(out)
}

fn load_into(
    path: &str,
    read: &mut dyn FnMut(&str) -> Result<String, String>,
    seen: &mut HashSet<String>,
    out: &mut Vec<TopExpr>,
    from: Option<&Location>,
) -> Result<(), SchemaError> {
    if !seen.insert(path.to_string()) {
        return Ok(());
    }
    let text = read(path).map_err(|e| SchemaError {
        loc: from.cloned().unwrap_or(Location {
            file: path.to_string(),
            line: 0,
        }),
        msg: format!("can't read {path}: {e}"),
    })?;
    for top in parse(path, &text)? {
        if let Some(inc) = top.expr.get("include") {
            let Expr::Str(name) = inc else {
                return Err(SchemaError {
                    loc: top.loc,
                    msg: "value of 'include' must be a string".into(),
                });
            };
            if let Expr::Dict(entries) = &top.expr {
                if entries.len() != 1 {
                    return Err(SchemaError {
                        loc: top.loc,
                        msg: "'include' must be the only key of its expression".into(),
                    });
                }
            }
            let dir = match path.rfind('/') {
                Some(i) => &path[..=i],
                None => "",
            };
            let child = format!("{dir}{name}");
            load_into(&child, read, seen, out, Some(&top.loc))?;
        } else {
            out.push(top);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Expr {
        Expr::Str(v.to_string())
    }

    #[test]
    fn parses_definitions_comments_and_docs() {
        let text = "# leading comment\n\
            ##\n\
            # @Foo:\n\
            #\n\
            # A thing.  # not a comment inside a doc\n\
            #\n\
            # @a: first member,\n\
            #     continued\n\
            # @b-c: second\n\
            #\n\
            # Returns: nothing\n\
            ##\n\
            { 'struct': 'Foo', # trailing comment\n\
              'data': { 'a': 'int', '*b-c': [ 'str' ] }, 'x': true, 'y': false }\n\
            {'enum':'E','data':[]}\n";
        let tops = parse("t.json", text).unwrap();
        assert_eq!(tops.len(), 2);
        let doc = tops[0].doc.as_ref().unwrap();
        assert_eq!(doc.symbol.as_deref(), Some("Foo"));
        assert_eq!(doc.member("a"), Some("first member, continued"));
        assert_eq!(doc.member("b-c"), Some("second"));
        assert!(doc.body.contains("A thing.  # not a comment inside a doc"));
        assert!(doc.body.contains("Returns: nothing"));
        assert_eq!(tops[0].loc.line, 13);
        assert_eq!(tops[0].expr.get("struct"), Some(&s("Foo")));
        assert_eq!(
            tops[0].expr.get("data"),
            Some(&Expr::Dict(vec![
                ("a".into(), s("int")),
                ("*b-c".into(), Expr::List(vec![s("str")])),
            ]))
        );
        assert_eq!(tops[0].expr.get("x"), Some(&Expr::Bool(true)));
        assert_eq!(tops[0].expr.get("y"), Some(&Expr::Bool(false)));
        assert!(tops[1].doc.is_none());
        assert_eq!(tops[1].expr.get("data"), Some(&Expr::List(vec![])));
    }

    #[test]
    fn string_escapes_and_hash_inside_strings() {
        let tops = parse("t", r"{ 'a': 'x\'y\\z#w' }").unwrap();
        assert_eq!(tops[0].expr.get("a"), Some(&s(r"x'y\z#w")));
    }

    #[test]
    fn rejects_bad_syntax_with_line_numbers() {
        let cases: &[(&str, &str, usize)] = &[
            ("{ 'a': 'b' }\n{ \"a\": 1 }", "stray '\"'", 2),
            ("{ 'a': 'b', 'a': 'c' }", "duplicate key 'a'", 1),
            ("{ 'a': 'b'\n\n", "expected ',' or '}'", 3),
            ("[ 'a' ]", "expected '{'", 1),
            ("{ 'a': 'b\n' }", "missing terminating", 1),
            ("{ 'a': '\\n' }", "unknown escape \\n", 1),
            ("{ 'a': tru }", "stray 't'", 1),
            ("{ 'a': [ 'b' 'c' ] }", "expected ',' or ']'", 1),
            ("##\n# @X:\n# text\n", "must end with '##'", 4),
            ("##\n# @X:\n##\n", "not followed by the definition", 4),
        ];
        for (text, want, line) in cases {
            let err = parse("f.json", text).unwrap_err();
            assert!(err.msg.contains(want), "{text:?}: got {err}");
            assert_eq!(err.loc.line, *line, "{text:?}: got {err}");
        }
    }

    #[test]
    fn follows_includes_once_relative_to_the_includer() {
        let mut read = |p: &str| -> Result<String, String> {
            match p {
                "s/main.json" => Ok("{ 'include': 'a.json' }\n{ 'command': 'm' }\n\
                                     { 'include': 'a.json' }"
                    .into()),
                "s/a.json" => Ok("{ 'include': 'main.json' }\n{ 'command': 'a' }".into()),
                _ => Err("no such file".into()),
            }
        };
        let tops = load("s/main.json", &mut read).unwrap();
        let names: Vec<_> = tops
            .iter()
            .map(|t| t.expr.get("command").cloned())
            .collect();
        assert_eq!(names, vec![Some(s("a")), Some(s("m"))]);

        let mut read = |p: &str| -> Result<String, String> {
            match p {
                "main.json" => Ok("\n{ 'include': 'gone.json' }".into()),
                _ => Err("no such file".into()),
            }
        };
        let err = load("main.json", &mut read).unwrap_err();
        assert_eq!(err.loc.line, 2);
        assert!(err.msg.contains("can't read gone.json"));
    }
}
