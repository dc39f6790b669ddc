//! QEMU's "modified UTF-8" rules: standard UTF-8 without surrogates and
//! noncharacters, plus the two-byte sequence `C0 80` standing for U+0000.

/// Whether `cp` may appear in a QEMU string: in range, not a surrogate, not a noncharacter.
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    if cp > 0x10FFFF {
        return false;
    }
    if (0xFDD0..=0xFDEF).contains(&cp) || (cp & 0xFFFE) == 0xFFFE {
        return false;
    }
    !(0xD800..=0xDFFF).contains(&cp)
}

/// Decodes one code point starting at `pos`, looking at no more than six
/// bytes. Bytes past the end of `s` read as NUL, like the C string they
/// model. Returns the code point (`None` when invalid) and the position just
/// after the bytes consumed.
pub(crate) fn decode(s: &[u8], pos: usize) -> (Option<u32>, usize) {
    const MIN_CP: [u32; 5] = [0x80, 0x800, 0x10000, 0x200000, 0x4000000];
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    let first = at(pos);
    if first == 0 {
        return (None, pos);
    }
    let mut p = pos + 1;
    if first < 0x80 {
        return (Some(u32::from(first)), p);
    }
    if first >= 0xFE || first & 0x40 == 0 {
        return (None, p);
    }
    let len = first.leading_ones() as usize;
    let mut cp = u32::from(first) & ((0x80u32 >> len) - 1);
    for i in 1..len {
        let byte = if i < 6 { at(p) } else { 0 };
        if byte & 0xC0 != 0x80 {
            return (None, p);
        }
        p += 1;
        cp = (cp << 6) | u32::from(byte & 0x3F);
    }
    if !is_valid_codepoint(cp) || (cp < MIN_CP[len - 2] && !(cp == 0 && len == 2)) {
        return (None, p);
    }
    (Some(cp), p)
}

/// Turns bytes into text the way QEMU's JSON writer reads a C string: stop
/// at the first NUL byte, replace every invalid sequence by U+FFFD.
pub(crate) fn lossy_c_string(s: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while pos < s.len() && s[pos] != 0 {
        let (cp, end) = decode(s, pos);
        out.push(cp.and_then(char::from_u32).unwrap_or('\u{FFFD}'));
        // `decode` always advances on a non-NUL byte.
        pos = end.max(pos + 1);
    }
    out
}

/// The bytes QEMU stores for `s`: UTF-8 with U+0000 written as `C0 80`.
pub(crate) fn to_modified(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for b in s.bytes() {
        if b == 0 {
            out.extend_from_slice(&[0xC0, 0x80]);
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_valid_sequences() {
        assert_eq!(decode(b"a", 0), (Some(0x61), 1));
        assert_eq!(decode("é".as_bytes(), 0), (Some(0xE9), 2));
        assert_eq!(decode("😀".as_bytes(), 0), (Some(0x1F600), 4));
        assert_eq!(decode(b"\xC0\x80", 0), (Some(0), 2));
    }

    #[test]
    fn rejects_invalid_sequences() {
        assert_eq!(decode(b"\x80", 0), (None, 1));
        assert_eq!(decode(b"\xFF", 0), (None, 1));
        assert_eq!(decode(b"\xC3", 0), (None, 1));
        assert_eq!(decode(b"\xC3x", 0), (None, 1));
        assert_eq!(decode(b"\xE0\x80\xAF", 0).0, None);
        assert_eq!(decode(b"\xED\xA0\x80", 0).0, None);
        assert_eq!(decode(b"\xEF\xBF\xBF", 0).0, None);
        assert_eq!(decode(b"\xF4\x90\x80\x80", 0).0, None);
        assert_eq!(decode(b"", 0), (None, 0));
    }

    #[test]
    fn lossy_stops_at_nul_and_replaces() {
        assert_eq!(lossy_c_string(b"ab\xFFc\x00d"), "ab\u{FFFD}c");
        assert_eq!(lossy_c_string(b"\xC0\x80"), "\0");
        assert_eq!(to_modified("a\0b"), b"a\xC0\x80b");
    }
}
