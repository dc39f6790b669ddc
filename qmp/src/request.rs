//! Checking the shape of a request, in the order QEMU checks it.
//!
//! QEMU walks the request's members in QDict order and the first bad member
//! decides the error, so the same walk is done here.

use serde_json::{Map, Value};

use crate::json::{qdict, Message};
use crate::QmpError;

/// A request whose shape is valid.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The request's `id`, echoed in the reply.
    pub id: Option<Value>,
    /// The command name.
    pub name: String,
    /// The arguments (`{}` when absent).
    pub arguments: Map<String, Value>,
    /// Whether out-of-band execution was asked for (`exec-oob`, or the 2.12
    /// form `"control": {"run-oob": true}`).
    pub oob: bool,
}

/// A request refused before dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The request's `id`, if it was an object that had one.
    pub id: Option<Value>,
    /// Why it was refused (always a `GenericError`).
    pub error: QmpError,
}

fn reject(id: Option<Value>, desc: String) -> Rejection {
    Rejection {
        id,
        error: QmpError::generic(desc),
    }
}

/// The 2.12 `control` member: an object whose only member is a boolean
/// `run-oob`. Returns its value, or `None` when the member has another shape.
fn legacy_control(value: &Value) -> Option<bool> {
    let Value::Object(map) = value else {
        return None;
    };
    let mut run_oob = false;
    for (key, val) in map {
        match (key.as_str(), val) {
            ("run-oob", Value::Bool(b)) => run_oob = *b,
            _ => return None,
        }
    }
    Some(run_oob)
}

/// Whether `message` takes the out-of-band path: it is run at once instead
/// of being queued. Like QEMU this holds for any object with `exec-oob` and
/// no `execute`, valid or not; with OOB enabled it also holds for an
/// `execute` carrying the 2.12 `"control": {"run-oob": true}`.
pub fn takes_oob_path(message: &Message, oob_enabled: bool) -> bool {
    let Ok(Value::Object(map)) = message else {
        return false;
    };
    if map.contains_key("exec-oob") {
        return !map.contains_key("execute");
    }
    oob_enabled
        && map.contains_key("execute")
        && map.get("control").and_then(legacy_control) == Some(true)
}

/// Validates one parsed message (QEMU's steps 0 to 4). `oob_enabled` says
/// whether the session negotiated the `oob` capability.
pub fn validate(message: Message, oob_enabled: bool) -> Result<Request, Rejection> {
    let value = message.map_err(|desc| reject(None, desc))?;
    let Value::Object(mut map) = value else {
        return Err(reject(None, "QMP input must be a JSON object".into()));
    };
    let id = map.get("id").cloned();
    let mut exec_key: Option<&str> = None;
    let mut legacy_oob = false;
    for (key, val) in qdict::ordered(&map) {
        match key.as_str() {
            "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                if !val.is_string() {
                    return Err(reject(
                        id,
                        format!("QMP input member '{key}' must be a string"),
                    ));
                }
                if let Some(first) = exec_key {
                    return Err(reject(
                        id,
                        format!("QMP input member '{key}' clashes with '{first}'"),
                    ));
                }
                exec_key = Some(key);
            }
            "arguments" => {
                if !val.is_object() {
                    return Err(reject(
                        id,
                        "QMP input member 'arguments' must be an object".into(),
                    ));
                }
            }
            "id" => {}
            "control" if oob_enabled && legacy_control(val).is_some() => {
                legacy_oob = legacy_control(val) == Some(true);
            }
            _ => {
                return Err(reject(
                    id,
                    format!("QMP input member '{key}' is unexpected"),
                ))
            }
        }
    }
    let Some(exec_key) = exec_key else {
        return Err(reject(id, "QMP input lacks member 'execute'".into()));
    };
    let oob = exec_key == "exec-oob" || legacy_oob;
    let key = exec_key.to_string();
    let name = match map.remove(&key) {
        Some(Value::String(name)) => name,
        _ => String::new(),
    };
    let arguments = match map.remove("arguments") {
        Some(Value::Object(args)) => args,
        _ => Map::new(),
    };
    Ok(Request {
        id,
        name,
        arguments,
        oob,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desc(input: Value, oob: bool) -> (Option<Value>, String) {
        let r = validate(Ok(input), oob).unwrap_err();
        (r.id, r.error.desc)
    }

    #[test]
    fn parse_errors_and_non_objects_have_no_id() {
        let r = validate(Err("JSON parse error, expecting value".into()), false).unwrap_err();
        assert_eq!(
            (r.id, r.error.desc.as_str()),
            (None, "JSON parse error, expecting value")
        );
        for v in [json!(null), json!([]), json!(42), json!("s")] {
            assert_eq!(
                desc(v, false),
                (None, "QMP input must be a JSON object".into())
            );
        }
    }

    #[test]
    fn member_checks() {
        assert_eq!(desc(json!({}), false).1, "QMP input lacks member 'execute'");
        assert_eq!(
            desc(json!({"id": "x"}), false),
            (Some(json!("x")), "QMP input lacks member 'execute'".into())
        );
        assert_eq!(
            desc(json!({"execute": true}), false).1,
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(json!({"execute": "x", "arguments": []}), false).1,
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"execute": "x", "extra": 1}), false).1,
            "QMP input member 'extra' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "x", "exec-oob": "y"}), false).1,
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "x", "control": {"run-oob": true}}), false).1,
            "QMP input member 'control' is unexpected"
        );
        assert_eq!(
            desc(json!({"execute": "x", "exec-oob": "y"}), true).1,
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
        assert_eq!(
            desc(json!({"exec-oob": "y", "execute": "x"}), true).1,
            "QMP input member 'execute' clashes with 'exec-oob'"
        );
        assert_eq!(
            desc(json!({"exec-oob": 1, "execute": "x"}), true).1,
            "QMP input member 'exec-oob' must be a string"
        );
        assert_eq!(
            desc(json!({"execute": "x", "control": {"run-oob": 1}}), true).1,
            "QMP input member 'control' is unexpected"
        );
    }

    #[test]
    fn walk_order_is_qdict_order() {
        // "arguments" (bucket 447) comes after "execute" (bucket 299), so
        // the bad execute wins regardless of the order on the wire.
        let r = desc(json!({"arguments": [], "execute": 1}), false);
        assert_eq!(r.1, "QMP input member 'execute' must be a string");
        // "exec-oob" (162) before "arguments" (447).
        let r = desc(json!({"arguments": 1, "exec-oob": "x"}), false);
        assert_eq!(r.1, "QMP input member 'exec-oob' is unexpected");
    }

    #[test]
    fn valid_requests() {
        let r = validate(Ok(json!({"execute": "q", "id": [1, {"a": null}]})), false).unwrap();
        assert_eq!(r.name, "q");
        assert_eq!(r.id, Some(json!([1, {"a": null}])));
        assert!(r.arguments.is_empty());
        assert!(!r.oob);
        let r = validate(Ok(json!({"exec-oob": "p", "arguments": {"x": 1}})), true).unwrap();
        assert!(r.oob);
        assert_eq!(r.arguments.get("x"), Some(&json!(1)));
        let r = validate(
            Ok(json!({"execute": "p", "control": {"run-oob": true}})),
            true,
        )
        .unwrap();
        assert!(r.oob);
        let r = validate(
            Ok(json!({"execute": "p", "control": {"run-oob": false}})),
            true,
        )
        .unwrap();
        assert!(!r.oob);
    }

    #[test]
    fn oob_path_selection() {
        assert!(takes_oob_path(&Ok(json!({"exec-oob": "x"})), false));
        assert!(takes_oob_path(&Ok(json!({"exec-oob": 1})), true));
        assert!(!takes_oob_path(
            &Ok(json!({"exec-oob": "x", "execute": "y"})),
            true
        ));
        assert!(!takes_oob_path(
            &Ok(json!({"execute": "x", "control": {"run-oob": true}})),
            false
        ));
        assert!(takes_oob_path(
            &Ok(json!({"execute": "x", "control": {"run-oob": true}})),
            true
        ));
        assert!(!takes_oob_path(&Err("x".into()), true));
    }
}
