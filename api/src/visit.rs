//! Checking client input against the schema, with QEMU's error texts.
//!
//! This is the runtime half of the generated dispatch code: the generated
//! `FromArg` implementations and argument functions call these helpers.  The
//! rules follow QEMU's strict QObject input visitor:
//!
//! - a missing member: `Parameter 'x' is missing`;
//! - a member of the wrong JSON type:
//!   `Invalid parameter type for 'x', expected: string` (or integer, number,
//!   boolean, object, array); `null` is a wrong type, not an absent member;
//! - unsigned integers: `Parameter 'x' expects uint64` for anything that is
//!   not an integer; negative integers are accepted and wrap, as in QEMU;
//! - narrower integers out of range: `Parameter 'x' expects uint16_t`, naming
//!   the member without its path (`null` inside a list), as QEMU does;
//! - enums: `Parameter 'x' does not accept value 'v'`, with the same naming;
//! - a member nobody expects: `Parameter 'x' is unexpected`, reported only once
//!   every expected member checked out.  When several are unexpected, the one
//!   QEMU names is picked by emulating its GLib hash table order.
//!
//! Member names in messages are full paths: `a.b` for nested members, `a[0]`
//! for list elements.

use qmp::QmpError;
use serde_json::{Map, Value};

/// Where a value sits in the arguments, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    seg: Seg<'a>,
}

#[derive(Debug, Clone, Copy)]
enum Seg<'a> {
    Root,
    Member(&'a str),
    Index(usize),
}

impl<'a> Path<'a> {
    /// The arguments object itself.
    pub fn root() -> Path<'static> {
        Path {
            parent: None,
            seg: Seg::Root,
        }
    }

    fn member(&'a self, name: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            seg: Seg::Member(name),
        }
    }

    fn index(&'a self, i: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            seg: Seg::Index(i),
        }
    }

    /// The dotted and indexed name QEMU prints, e.g. `a[0].b`.
    pub fn full_name(&self) -> String {
        let mut segs = Vec::new();
        let mut p = Some(self);
        while let Some(cur) = p {
            segs.push(cur.seg);
            p = cur.parent;
        }
        let mut out = String::new();
        for seg in segs.iter().rev() {
            match seg {
                Seg::Root => {}
                Seg::Member(n) => {
                    if !out.is_empty() {
                        out.push('.');
                    }
                    out.push_str(n);
                }
                Seg::Index(i) => out.push_str(&format!("[{i}]")),
            }
        }
        out
    }

    /// The plain member name QEMU uses in range and enum errors (`null` for a
    /// list element).
    pub fn bare_name(&self) -> &str {
        match self.seg {
            Seg::Member(n) => n,
            Seg::Root | Seg::Index(_) => "null",
        }
    }
}

/// Conversion from checked client input, implemented by the generated types
/// that can appear in command arguments.
pub trait FromArg: Sized {
    /// Checks `value` (found at `path`) and converts it.
    fn from_arg(value: &Value, path: &Path<'_>) -> Result<Self, QmpError>;
}

fn type_error(path: &Path<'_>, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{}', expected: {expected}",
        path.full_name()
    ))
}

fn value_error(name: &str, expects: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' expects {expects}"))
}

/// The error for an unknown command name.
pub fn command_not_found(name: &str) -> QmpError {
    QmpError::new(
        qmp::ErrorClass::CommandNotFound,
        format!("The command {name} has not been found"),
    )
}

/// A `str` member.
pub fn string(v: &Value, path: &Path<'_>) -> Result<String, QmpError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        _ => Err(type_error(path, "string")),
    }
}

/// A `bool` member.
pub fn boolean(v: &Value, path: &Path<'_>) -> Result<bool, QmpError> {
    match v {
        Value::Bool(b) => Ok(*b),
        _ => Err(type_error(path, "boolean")),
    }
}

/// A `number` member (integers are accepted too).
pub fn number(v: &Value, path: &Path<'_>) -> Result<f64, QmpError> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| type_error(path, "number")),
        _ => Err(type_error(path, "number")),
    }
}

/// An `int` / `int64` member.
pub fn int64(v: &Value, path: &Path<'_>) -> Result<i64, QmpError> {
    match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| type_error(path, "integer")),
        _ => Err(type_error(path, "integer")),
    }
}

/// A `uint64` / `size` member.
pub fn uint64(v: &Value, path: &Path<'_>) -> Result<u64, QmpError> {
    if let Value::Number(n) = v {
        if let Some(u) = n.as_u64() {
            return Ok(u);
        }
        // QEMU accepts negative values for backward compatibility.
        if let Some(i) = n.as_i64() {
            return Ok(i as u64);
        }
    }
    Err(value_error(&path.full_name(), "uint64"))
}

macro_rules! narrow_int {
    ($(#[$doc:meta])* $name:ident, $wide:ident, $t:ty, $cname:literal) => {
        $(#[$doc])*
        pub fn $name(v: &Value, path: &Path<'_>) -> Result<$t, QmpError> {
            let wide = $wide(v, path)?;
            <$t>::try_from(wide).map_err(|_| value_error(path.bare_name(), $cname))
        }
    };
}

narrow_int!(
    /// An `int8` member.
    int8, int64, i8, "int8_t"
);
narrow_int!(
    /// An `int16` member.
    int16, int64, i16, "int16_t"
);
narrow_int!(
    /// An `int32` member.
    int32, int64, i32, "int32_t"
);
narrow_int!(
    /// A `uint8` member.
    uint8, uint64, u8, "uint8_t"
);
narrow_int!(
    /// A `uint16` member.
    uint16, uint64, u16, "uint16_t"
);
narrow_int!(
    /// A `uint32` member.
    uint32, uint64, u32, "uint32_t"
);

/// An `any` member: every JSON value is accepted.
pub fn any(v: &Value, _path: &Path<'_>) -> Result<Value, QmpError> {
    Ok(v.clone())
}

/// An enumeration member, given the generated `from_wire` of its type.
pub fn enumeration<E>(
    v: &Value,
    path: &Path<'_>,
    from_wire: fn(&str) -> Option<E>,
) -> Result<E, QmpError> {
    let s = string(v, path)?;
    from_wire(&s).ok_or_else(|| {
        QmpError::generic(format!(
            "Parameter '{}' does not accept value '{s}'",
            path.bare_name()
        ))
    })
}

/// An array member whose elements are checked by `elem`.
pub fn list<T>(
    v: &Value,
    path: &Path<'_>,
    elem: impl Fn(&Value, &Path<'_>) -> Result<T, QmpError>,
) -> Result<Vec<T>, QmpError> {
    let Value::Array(items) = v else {
        return Err(type_error(path, "array"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| elem(item, &path.index(i)))
        .collect()
}

/// An object member (a struct).
pub fn object<'v>(v: &'v Value, path: &Path<'_>) -> Result<&'v Map<String, Value>, QmpError> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(type_error(path, "object")),
    }
}

/// A mandatory member of the object `map` found at `path`.
pub fn required<T>(
    map: &Map<String, Value>,
    path: &Path<'_>,
    name: &str,
    visit: impl Fn(&Value, &Path<'_>) -> Result<T, QmpError>,
) -> Result<T, QmpError> {
    let child = path.member(name);
    match map.get(name) {
        Some(v) => visit(v, &child),
        None => Err(QmpError::generic(format!(
            "Parameter '{}' is missing",
            child.full_name()
        ))),
    }
}

/// An optional member of the object `map` found at `path`.  A `null` value is
/// present (and usually of the wrong type), as in QEMU.
pub fn optional<T>(
    map: &Map<String, Value>,
    path: &Path<'_>,
    name: &str,
    visit: impl Fn(&Value, &Path<'_>) -> Result<T, QmpError>,
) -> Result<Option<T>, QmpError> {
    let child = path.member(name);
    map.get(name).map(|v| visit(v, &child)).transpose()
}

/// Fails with `Parameter 'x' is unexpected` when `map` has a member that is
/// not in `known` (the members in schema order).
pub fn check_unexpected(
    map: &Map<String, Value>,
    path: &Path<'_>,
    known: &[&str],
) -> Result<(), QmpError> {
    if map.keys().all(|k| known.contains(&k.as_str())) {
        return Ok(());
    }
    let keys: Vec<&str> = map.keys().map(String::as_str).collect();
    let consumed: Vec<&str> = known
        .iter()
        .copied()
        .filter(|k| map.contains_key(*k))
        .collect();
    let name = ghash::first_remaining(&keys, &consumed).unwrap_or_default();
    Err(QmpError::generic(format!(
        "Parameter '{}' is unexpected",
        path.member(&name).full_name()
    )))
}

/// Converts a handler's answer into the `return` value.
pub fn ret<T: serde::Serialize>(value: &T) -> Result<Value, QmpError> {
    serde_json::to_value(value).map_err(|e| QmpError::generic(e.to_string()))
}

/// The `return` value of a command that declares none: `{}`.
pub fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// The `query-commands` answer for a list of names.
pub fn command_list(names: &[&str]) -> Value {
    Value::Array(
        names
            .iter()
            .map(|n| {
                let mut m = Map::new();
                m.insert("name".into(), Value::String((*n).to_string()));
                Value::Object(m)
            })
            .collect(),
    )
}

/// Adds a member to event data.
pub fn put<T: serde::Serialize>(data: &mut Map<String, Value>, name: &str, value: &T) {
    data.insert(
        name.to_string(),
        serde_json::to_value(value).unwrap_or(Value::Null),
    );
}

/// Emulation of the container QEMU uses to find leftover members: the keys of
/// the arguments object go, in QDict order, into a GLib `GHashTable`; each
/// visited member is removed; the first key left in table order is reported.
mod ghash {
    const MIN_SHIFT: u32 = 3;
    const PRIME_MOD: [u32; 32] = [
        1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
        262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859,
        134217689, 268435399, 536870909, 1073741789, 2147483647,
    ];
    const UNUSED: u32 = 0;
    const TOMBSTONE: u32 = 1;

    /// QEMU's QDict bucket hash.
    fn tdb_hash(key: &str) -> u32 {
        let bytes = key.as_bytes();
        let mut v = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
        for (i, &b) in bytes.iter().enumerate() {
            v = v.wrapping_add((b as u32) << ((i * 5) % 24));
        }
        1_103_515_243u32.wrapping_mul(v).wrapping_add(12345)
    }

    /// The order in which QEMU's QDict lists keys inserted in `keys` order.
    pub(super) fn qdict_order<'a>(keys: &[&'a str]) -> Vec<&'a str> {
        let mut buckets: Vec<(u32, Vec<&'a str>)> = Vec::new();
        for &k in keys {
            let b = tdb_hash(k) % 512;
            match buckets.iter_mut().find(|(n, _)| *n == b) {
                Some((_, list)) => list.insert(0, k),
                None => buckets.push((b, vec![k])),
            }
        }
        buckets.sort_by_key(|(b, _)| *b);
        buckets.into_iter().flat_map(|(_, l)| l).collect()
    }

    /// GLib's `g_str_hash` (bytes are signed chars).
    fn str_hash(key: &str) -> u32 {
        let mut h: u32 = 5381;
        for &b in key.as_bytes() {
            h = h.wrapping_mul(33).wrapping_add(b as i8 as i32 as u32);
        }
        if h < 2 {
            2
        } else {
            h
        }
    }

    struct Table<'a> {
        hashes: Vec<u32>,
        keys: Vec<Option<&'a str>>,
        modulo: u32,
        mask: usize,
        nnodes: usize,
        noccupied: usize,
    }

    impl<'a> Table<'a> {
        fn new() -> Self {
            let mut t = Table {
                hashes: Vec::new(),
                keys: Vec::new(),
                modulo: 0,
                mask: 0,
                nnodes: 0,
                noccupied: 0,
            };
            t.set_shift(MIN_SHIFT);
            t.hashes = vec![UNUSED; t.mask + 1];
            t.keys = vec![None; t.mask + 1];
            t
        }

        fn set_shift(&mut self, shift: u32) {
            self.modulo = PRIME_MOD[shift as usize];
            self.mask = (1usize << shift) - 1;
        }

        fn size(&self) -> usize {
            self.mask + 1
        }

        fn index(&self, hash: u32) -> usize {
            (hash.wrapping_mul(11) % self.modulo) as usize
        }

        fn insert(&mut self, key: &'a str) {
            let hash = str_hash(key);
            let mut i = self.index(hash);
            let mut step = 0;
            let mut tombstone = None;
            while self.hashes[i] != UNUSED {
                if self.hashes[i] == hash && self.keys[i] == Some(key) {
                    return;
                }
                if self.hashes[i] == TOMBSTONE && tombstone.is_none() {
                    tombstone = Some(i);
                }
                step += 1;
                i = (i + step) & self.mask;
            }
            let i = tombstone.unwrap_or(i);
            let was_unused = self.hashes[i] == UNUSED;
            self.hashes[i] = hash;
            self.keys[i] = Some(key);
            self.nnodes += 1;
            if was_unused {
                self.noccupied += 1;
                self.maybe_resize();
            }
        }

        fn remove(&mut self, key: &str) {
            let hash = str_hash(key);
            let mut i = self.index(hash);
            let mut step = 0;
            while self.hashes[i] != UNUSED {
                if self.hashes[i] == hash && self.keys[i] == Some(key) {
                    self.hashes[i] = TOMBSTONE;
                    self.keys[i] = None;
                    self.nnodes -= 1;
                    self.maybe_resize();
                    return;
                }
                step += 1;
                i = (i + step) & self.mask;
            }
        }

        fn maybe_resize(&mut self) {
            let size = self.size();
            let occ = self.noccupied;
            if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT) || size <= occ + occ / 16 {
                self.resize();
            }
        }

        fn resize(&mut self) {
            let old_size = self.size();
            let target = (self.nnodes as f64 * 1.333) as u64;
            let mut shift = 0;
            let mut n = target;
            while n != 0 {
                n >>= 1;
                shift += 1;
            }
            self.set_shift(shift.max(MIN_SHIFT));
            let new_size = self.size();
            if new_size > old_size {
                self.hashes.resize(new_size, UNUSED);
                self.keys.resize(new_size, None);
            }
            let mut moved = vec![false; new_size.max(old_size)];
            for i in 0..old_size {
                let mut hash = self.hashes[i];
                if hash <= TOMBSTONE {
                    self.hashes[i] = UNUSED;
                    continue;
                }
                if moved[i] {
                    continue;
                }
                self.hashes[i] = UNUSED;
                let mut key = self.keys[i].take();
                loop {
                    let mut j = self.index(hash);
                    let mut step = 0;
                    while moved[j] {
                        step += 1;
                        j = (j + step) & self.mask;
                    }
                    moved[j] = true;
                    let replaced = self.hashes[j];
                    self.hashes[j] = hash;
                    let replaced_key = std::mem::replace(&mut self.keys[j], key);
                    if replaced <= TOMBSTONE {
                        break;
                    }
                    hash = replaced;
                    key = replaced_key;
                }
            }
            if new_size < old_size {
                self.hashes.truncate(new_size);
                self.keys.truncate(new_size);
            }
            self.noccupied = self.nnodes;
        }
    }

    /// The key QEMU reports as unexpected: `keys` are the arguments' keys (in
    /// input order), `consumed` the expected members present, in visit order.
    pub(super) fn first_remaining(keys: &[&str], consumed: &[&str]) -> Option<String> {
        let mut table = Table::new();
        for k in qdict_order(keys) {
            table.insert(k);
        }
        for k in consumed {
            table.remove(k);
        }
        table
            .hashes
            .iter()
            .zip(&table.keys)
            .find(|(h, _)| **h > TOMBSTONE)
            .and_then(|(_, k)| k.map(str::to_string))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn matches_qemu_7_2_with_glib_2_74() {
            // Observed from qemu-system-x86_64 7.2 (Debian, GLib 2.74) by sending
            // query-status with these members.
            let cases: &[(&[&str], &str)] = &[
                (&["a", "b"], "b"),
                (&["b", "a", "c"], "b"),
                (&["zzz", "abc"], "zzz"),
                (&["ajyzlpp__ed", "yzkcqvffy"], "yzkcqvffy"),
                (&["-qvloqrxbfju", "w-riltxhmrmf", "zi_tkwhi"], "zi_tkwhi"),
                (
                    &["cx", "jk", "iqbl", "c", "mlx", "whdvkiaqkdl", "x-et_imcvst"],
                    "jk",
                ),
            ];
            for (keys, want) in cases {
                assert_eq!(
                    first_remaining(keys, &[]).as_deref(),
                    Some(*want),
                    "{keys:?}"
                );
            }
        }

        #[test]
        fn survives_growth_and_shrinking() {
            let keys: Vec<String> = (0..40).map(|i| format!("key{i}")).collect();
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let all = first_remaining(&refs, &[]);
            assert!(all.is_some());
            // Removing all but one leaves exactly that one.
            let consumed: Vec<&str> = refs.iter().copied().filter(|k| *k != "key17").collect();
            assert_eq!(first_remaining(&refs, &consumed).as_deref(), Some("key17"));
        }
    }
}
