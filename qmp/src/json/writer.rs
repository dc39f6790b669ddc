//! QEMU's compact JSON output: `", "` and `": "` separators, QDict member
//! order, pure-ASCII strings, `%.17g` doubles.

use serde_json::Value;

use super::{float, qdict, utf8};

/// Appends the compact form of `value` to `out`.
pub fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.extend_from_slice(i.to_string().as_bytes());
            } else if let Some(u) = n.as_u64() {
                out.extend_from_slice(u.to_string().as_bytes());
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                out.extend_from_slice(float::format_g17(f).as_bytes());
            }
        }
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_value(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            out.push(b'{');
            for (i, (key, item)) in qdict::ordered(map).into_iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b", ");
                }
                write_string(out, key);
                out.extend_from_slice(b": ");
                write_value(out, item);
            }
            out.push(b'}');
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut cp = u32::from(c);
                if !utf8::is_valid_codepoint(cp) {
                    cp = 0xFFFD;
                }
                if cp > 0xFFFF {
                    let v = cp - 0x10000;
                    push_u(out, 0xD800 + (v >> 10));
                    push_u(out, 0xDC00 + (v & 0x3FF));
                } else {
                    push_u(out, cp);
                }
            }
        }
    }
    out.push(b'"');
}

fn push_u(out: &mut Vec<u8>, unit: u32) {
    out.extend_from_slice(format!("\\u{unit:04X}").as_bytes());
}

/// One wire message: the compact form of `value` followed by CRLF.
pub fn to_line(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    write_value(&mut out, value);
    out.extend_from_slice(b"\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(v: Value) -> String {
        String::from_utf8(to_line(&v)).unwrap()
    }

    #[test]
    fn compact_with_crlf() {
        assert_eq!(
            line(json!({"return": {}, "id": 1})),
            "{\"return\": {}, \"id\": 1}\r\n"
        );
        assert_eq!(
            line(json!({"error": {"class": "GenericError", "desc": "x"}, "id": "a"})),
            "{\"id\": \"a\", \"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n"
        );
        assert_eq!(
            line(json!([1, [], {}, null, true, false, -5])),
            "[1, [], {}, null, true, false, -5]\r\n"
        );
        assert_eq!(line(json!(u64::MAX)), "18446744073709551615\r\n");
        assert_eq!(line(json!(0.1)), "0.10000000000000001\r\n");
    }

    #[test]
    fn greeting_bytes() {
        let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}});
        assert_eq!(
            line(greeting),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
    }

    #[test]
    fn ascii_escaping() {
        // Matches QEMU 7.2's echo of the same id.
        let s = "a/b\"c\\d\u{8}\u{c}\n\r\t\u{1f}\u{7f}\u{80}\u{fffd}\u{ff}/";
        assert_eq!(
            line(json!(s)),
            "\"a/b\\\"c\\\\d\\b\\f\\n\\r\\t\\u001F\\u007F\\u0080\\uFFFD\\u00FF/\"\r\n"
        );
        assert_eq!(
            line(json!("😀€\u{0}")),
            "\"\\uD83D\\uDE00\\u20AC\\u0000\"\r\n"
        );
        // Noncharacters cannot be represented by QEMU and come out as U+FFFD.
        assert_eq!(
            line(json!("\u{ffff}\u{fdd0}\u{1fffe}")),
            "\"\\uFFFD\\uFFFD\\uFFFD\"\r\n"
        );
    }
}
