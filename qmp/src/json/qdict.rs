//! The order in which a QEMU `QDict` iterates its members.
//!
//! A QDict is a 512-bucket hash table keyed by `tdb_hash`; iteration walks
//! the buckets in ascending order and, inside a bucket, the most recently
//! inserted key first. QEMU writes objects and validates requests in this
//! order, so matching it byte for byte needs the same order.

use serde_json::{Map, Value};

use super::utf8;

/// Number of hash buckets in a QDict.
pub const BUCKETS: u32 = 512;

/// The Samba tdb hash QDict uses, over QEMU's internal (modified UTF-8) bytes.
pub fn tdb_hash(key: &str) -> u32 {
    let bytes = utf8::to_modified(key);
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let mut value = 0x238F_13AF_u32.wrapping_mul(len);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << (i * 5 % 24));
    }
    1_103_515_243_u32.wrapping_mul(value).wrapping_add(12345)
}

/// The bucket of `key`.
pub fn bucket(key: &str) -> u32 {
    tdb_hash(key) % BUCKETS
}

/// The members of `map` (insertion order = map order) in QDict iteration order.
pub fn ordered(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut members: Vec<(u32, usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (bucket(k), i, k, v))
        .collect();
    members.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    members.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn keys(v: Value) -> Vec<String> {
        match v {
            Value::Object(m) => ordered(&m).into_iter().map(|(k, _)| k.clone()).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn table_from_reference() {
        // Insertion orders as QEMU builds these objects.
        assert_eq!(keys(json!({"QMP": 0})), ["QMP"]);
        assert_eq!(
            keys(json!({"version": 0, "capabilities": 0})),
            ["version", "capabilities"]
        );
        assert_eq!(keys(json!({"qemu": 0, "package": 0})), ["qemu", "package"]);
        assert_eq!(
            keys(json!({"major": 0, "minor": 0, "micro": 0})),
            ["micro", "minor", "major"]
        );
        assert_eq!(keys(json!({"return": 0, "id": 0})), ["return", "id"]);
        assert_eq!(keys(json!({"error": 0, "id": 0})), ["id", "error"]);
        assert_eq!(keys(json!({"class": 0, "desc": 0})), ["class", "desc"]);
        assert_eq!(
            keys(json!({"event": 0, "timestamp": 0, "data": 0})),
            ["timestamp", "event", "data"]
        );
        assert_eq!(
            keys(json!({"seconds": 0, "microseconds": 0})),
            ["seconds", "microseconds"]
        );
        assert_eq!(keys(json!({"guest": 0, "reason": 0})), ["guest", "reason"]);
        assert_eq!(
            keys(json!({"running": 0, "status": 0})),
            ["status", "running"]
        );
        assert_eq!(
            keys(json!({"running": 0, "singlestep": 0, "status": 0})),
            ["status", "singlestep", "running"]
        );
        assert_eq!(
            keys(json!({"enabled": 0, "present": 0})),
            ["enabled", "present"]
        );
        assert_eq!(
            keys(
                json!({"name": 0, "meta-type": 0, "arg-type": 0, "ret-type": 0, "allow-oob": 0, "features": 0})
            ),
            [
                "name",
                "ret-type",
                "allow-oob",
                "meta-type",
                "arg-type",
                "features"
            ]
        );
        assert_eq!(
            keys(json!({"name": 0, "meta-type": 0, "members": 0, "tag": 0, "variants": 0})),
            ["name", "tag", "variants", "members", "meta-type"]
        );
        assert_eq!(
            keys(json!({"name": 0, "type": 0, "default": 0})),
            ["name", "default", "type"]
        );
    }

    #[test]
    fn observed_from_qemu() {
        // Member orders QEMU 7.2 printed for these inputs.
        assert_eq!(
            keys(
                json!({"z":1,"y":2,"x":3,"w":4,"v":5,"u":6,"t":7,"s":8,"r":9,"q":10,"p":11,"o":12,"n":13,"m":14})
            ),
            ["r", "w", "n", "s", "x", "o", "t", "y", "p", "u", "z", "q", "v", "m"]
        );
        assert_eq!(
            keys(json!({"\u{0}a":1,"a":2,"é":3,"b":[],"c":{}})),
            ["é", "\u{0}a", "a", "b", "c"]
        );
        assert_eq!(
            keys(json!({"é":1,"€":2,"\u{0}":3,"":4})),
            ["", "é", "\u{0}", "€"]
        );
    }
}
