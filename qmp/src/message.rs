//! Builders for the messages a QMP server sends: greeting, replies, events.
//!
//! Members are inserted in the order QEMU inserts them, which (together
//! with the QDict ordering the writer applies) gives QEMU's exact bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::QmpError;

/// The server version announced in the greeting and by `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
    /// Free-form package string (QEMU release builds send `""`).
    pub package: String,
}

impl VersionInfo {
    /// The `VersionInfo` object: `{"qemu": {"major", "minor", "micro"}, "package"}`.
    pub fn to_value(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

/// The greeting: `{"QMP": {"version": ..., "capabilities": [...]}}`.
pub fn greeting(version: &VersionInfo, capabilities: &[&str]) -> Value {
    json!({"QMP": {"version": version.to_value(), "capabilities": capabilities}})
}

/// A success reply `{"return": ret}`, with `id` when the request had one.
pub fn success(ret: Value, id: Option<Value>) -> Value {
    let mut map = Map::new();
    map.insert("return".into(), ret);
    if let Some(id) = id {
        map.insert("id".into(), id);
    }
    Value::Object(map)
}

/// An error reply `{"error": {"class", "desc"}}`, with `id` when the request had one.
pub fn error(err: &QmpError, id: Option<Value>) -> Value {
    let mut map = Map::new();
    map.insert(
        "error".into(),
        json!({"class": err.class.as_str(), "desc": err.desc}),
    );
    if let Some(id) = id {
        map.insert("id".into(), id);
    }
    Value::Object(map)
}

/// The reply for a command result.
pub fn reply(result: Result<Value, QmpError>, id: Option<Value>) -> Value {
    match result {
        Ok(ret) => success(ret, id),
        Err(err) => error(&err, id),
    }
}

/// An event stamped with `now` (`-1`/`-1` if the clock is before the epoch);
/// `data` is left out when `None`.
pub fn event(name: &str, data: Option<Map<String, Value>>, now: SystemTime) -> Value {
    let (seconds, microseconds) = match now.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            i64::from(d.subsec_micros()),
        ),
        Err(_) => (-1, -1),
    };
    let mut map = Map::new();
    map.insert("event".into(), Value::String(name.into()));
    map.insert(
        "timestamp".into(),
        json!({"seconds": seconds, "microseconds": microseconds}),
    );
    if let Some(data) = data {
        map.insert("data".into(), Value::Object(data));
    }
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::to_line;
    use crate::ErrorClass;
    use std::time::Duration;

    fn line(v: &Value) -> String {
        String::from_utf8(to_line(v)).unwrap()
    }

    #[test]
    fn greeting_matches_qemu() {
        let v = VersionInfo {
            major: 9,
            minor: 2,
            micro: 0,
            package: String::new(),
        };
        assert_eq!(
            line(&greeting(&v, &["oob"])),
            "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 9}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
    }

    #[test]
    fn replies() {
        assert_eq!(
            line(&success(json!({}), Some(json!(1)))),
            "{\"return\": {}, \"id\": 1}\r\n"
        );
        assert_eq!(line(&success(json!({}), None)), "{\"return\": {}}\r\n");
        let err = QmpError::new(
            ErrorClass::CommandNotFound,
            "The command x has not been found",
        );
        assert_eq!(
            line(&error(&err, Some(json!("a")))),
            "{\"id\": \"a\", \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command x has not been found\"}}\r\n"
        );
    }

    #[test]
    fn events() {
        let t = UNIX_EPOCH + Duration::new(1267040730, 682951000);
        let mut data = Map::new();
        data.insert("guest".into(), json!(true));
        data.insert("reason".into(), json!("guest-shutdown"));
        assert_eq!(
            line(&event("SHUTDOWN", Some(data), t)),
            "{\"timestamp\": {\"seconds\": 1267040730, \"microseconds\": 682951}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\r\n"
        );
        assert_eq!(
            line(&event("STOP", None, UNIX_EPOCH - Duration::from_secs(1))),
            "{\"timestamp\": {\"seconds\": -1, \"microseconds\": -1}, \"event\": \"STOP\"}\r\n"
        );
    }
}
