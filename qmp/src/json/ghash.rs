//! Which unexpected argument QEMU names first.
//!
//! QEMU's input visitor collects an object's keys into a GLib hash table,
//! removes each key as the command visits it, and reports the first key left
//! in the table's slot order as `Parameter '<key>' is unexpected`. This
//! module reproduces that slot order (GLib 2.6x/2.7x open addressing with
//! `g_str_hash`), so the same key is named.

use serde_json::{Map, Value};

use super::{qdict, utf8};

const MIN_SHIFT: u32 = 3;
const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

fn str_hash(key: &str) -> u32 {
    let mut h: u32 = 5381;
    for b in utf8::to_modified(key) {
        // GLib hashes `signed char`s.
        h = h.wrapping_mul(33).wrapping_add(i32::from(b as i8) as u32);
    }
    h
}

struct Table<'a> {
    size: usize,
    modulo: u32,
    mask: usize,
    hashes: Vec<u32>,
    keys: Vec<Option<&'a str>>,
    nnodes: usize,
    noccupied: usize,
}

impl<'a> Table<'a> {
    fn new() -> Self {
        let mut t = Table {
            size: 0,
            modulo: 1,
            mask: 0,
            hashes: Vec::new(),
            keys: Vec::new(),
            nnodes: 0,
            noccupied: 0,
        };
        t.set_shift(MIN_SHIFT);
        t.hashes = vec![UNUSED; t.size];
        t.keys = vec![None; t.size];
        t
    }

    fn set_shift(&mut self, shift: u32) {
        self.size = 1 << shift;
        self.modulo = PRIME_MOD[shift as usize];
        self.mask = self.size - 1;
    }

    fn index(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % self.modulo) as usize
    }

    fn hash(key: &str) -> u32 {
        str_hash(key).max(2)
    }

    /// Slot holding `key`, else the slot an insertion would use.
    fn lookup(&self, key: &str, hash: u32) -> usize {
        let mut idx = self.index(hash);
        let mut step = 0;
        let mut tombstone = None;
        while self.hashes[idx] != UNUSED {
            if self.hashes[idx] == hash && self.keys[idx] == Some(key) {
                return idx;
            }
            if self.hashes[idx] == TOMBSTONE && tombstone.is_none() {
                tombstone = Some(idx);
            }
            step += 1;
            idx = (idx + step) & self.mask;
        }
        tombstone.unwrap_or(idx)
    }

    fn insert(&mut self, key: &'a str) {
        let hash = Self::hash(key);
        let idx = self.lookup(key, hash);
        let old = self.hashes[idx];
        if old >= 2 {
            return;
        }
        self.hashes[idx] = hash;
        self.keys[idx] = Some(key);
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    fn remove(&mut self, key: &str) {
        let hash = Self::hash(key);
        let idx = self.lookup(key, hash);
        if self.hashes[idx] < 2 {
            return;
        }
        self.hashes[idx] = TOMBSTONE;
        self.keys[idx] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    fn maybe_resize(&mut self) {
        let size = self.size;
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    fn resize(&mut self) {
        let old_size = self.size;
        let mut n = (self.nnodes as f64 * 1.333) as usize;
        let mut shift = 0;
        while n > 0 {
            n >>= 1;
            shift += 1;
        }
        self.set_shift(shift.max(MIN_SHIFT));
        let span = old_size.max(self.size);
        self.hashes.resize(span, UNUSED);
        self.keys.resize(span, None);
        let mut placed = vec![false; span];
        for i in 0..old_size {
            let h = self.hashes[i];
            if h < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut node_hash = h;
            let mut key = self.keys[i].take();
            loop {
                let mut idx = self.index(node_hash);
                let mut step = 0;
                while placed[idx] {
                    step += 1;
                    idx = (idx + step) & self.mask;
                }
                placed[idx] = true;
                let replaced = std::mem::replace(&mut self.hashes[idx], node_hash);
                let replaced_key = std::mem::replace(&mut self.keys[idx], key);
                if replaced < 2 {
                    break;
                }
                node_hash = replaced;
                key = replaced_key;
            }
        }
        self.hashes.truncate(self.size);
        self.keys.truncate(self.size);
        self.noccupied = self.nnodes;
    }
}

/// The member of `args` QEMU reports as unexpected after a command visited
/// the members named in `visited` (in visiting order), or `None` when every
/// member was visited.
pub fn first_unexpected<'a>(args: &'a Map<String, Value>, visited: &[&str]) -> Option<&'a str> {
    let mut table = Table::new();
    for (key, _) in qdict::ordered(args) {
        table.insert(key);
    }
    for key in visited {
        table.remove(key);
    }
    table.keys.iter().flatten().next().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn first(v: Value, visited: &[&str]) -> Option<String> {
        match v {
            Value::Object(m) => first_unexpected(&m, visited).map(str::to_string),
            _ => None,
        }
    }

    #[test]
    fn matches_qemu_choice() {
        // QEMU 7.2 names 'b' for both orders.
        assert_eq!(
            first(json!({"b": 1, "a": 2, "c": 3}), &["enable"]),
            Some("b".into())
        );
        assert_eq!(
            first(json!({"a": 1, "b": 2, "c": 3}), &["enable"]),
            Some("b".into())
        );
        assert_eq!(first(json!({"enable": []}), &["enable"]), None);
        assert_eq!(
            first(json!({"enable": [], "x": 1}), &["enable"]),
            Some("x".into())
        );
    }
}
