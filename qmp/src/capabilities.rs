//! `qmp_capabilities`: the one command of negotiation mode, run by the
//! monitor itself.

use serde_json::{Map, Value};

use crate::json::ghash;
use crate::session::{Mode, Session};
use crate::{ErrorClass, QmpError};

/// The capabilities QMP defines (QEMU's `QMPCapability`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Out-of-band execution.
    Oob,
}

impl Capability {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Oob => "oob",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "oob" => Some(Capability::Oob),
            _ => None,
        }
    }
}

/// Reads the `enable` argument the way QEMU's input visitor does, including
/// its error texts and its choice of which unexpected argument to name.
pub fn parse_arguments(args: &Map<String, Value>) -> Result<Vec<Capability>, QmpError> {
    let mut enable = Vec::new();
    match args.get("enable") {
        None => {}
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                let Value::String(name) = item else {
                    return Err(QmpError::generic(format!(
                        "Invalid parameter type for 'enable[{i}]', expected: string"
                    )));
                };
                // QEMU names list elements 'null' in this message.
                let cap = Capability::from_name(name).ok_or_else(|| {
                    QmpError::generic(format!("Parameter 'null' does not accept value '{name}'"))
                })?;
                enable.push(cap);
            }
        }
        Some(_) => {
            return Err(QmpError::generic(
                "Invalid parameter type for 'enable', expected: array",
            ))
        }
    }
    if let Some(key) = ghash::first_unexpected(args, &["enable"]) {
        return Err(QmpError::generic(format!(
            "Parameter '{key}' is unexpected"
        )));
    }
    Ok(enable)
}

/// Runs `qmp_capabilities` for `session`: on success the session enters
/// command mode with the requested capabilities.
pub fn execute(args: &Map<String, Value>, session: &mut Session) -> Result<Value, QmpError> {
    let enable = parse_arguments(args)?;
    if session.mode == Mode::Command {
        return Err(QmpError::new(
            ErrorClass::CommandNotFound,
            "Capabilities negotiation is already complete, command ignored",
        ));
    }
    let unavailable: Vec<&str> = enable
        .iter()
        .filter(|c| !(**c == Capability::Oob && session.oob_offered))
        .map(|c| c.as_str())
        .collect();
    if !unavailable.is_empty() {
        return Err(QmpError::generic(format!(
            "Capability {} not available",
            unavailable.join(", ")
        )));
    }
    session.mode = Mode::Command;
    session.oob_enabled = enable.contains(&Capability::Oob);
    Ok(Value::Object(Map::new()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(args: Value, session: &mut Session) -> Result<Value, String> {
        let Value::Object(args) = args else { panic!() };
        execute(&args, session).map_err(|e| e.desc)
    }

    #[test]
    fn negotiation() {
        let mut s = Session::new(true);
        assert_eq!(run(json!({"enable": ["oob"]}), &mut s), Ok(json!({})));
        assert_eq!(s.mode, Mode::Command);
        assert!(s.oob_enabled);
        let again = execute(&Map::new(), &mut s).unwrap_err();
        assert_eq!(again.class, ErrorClass::CommandNotFound);
        assert_eq!(
            again.desc,
            "Capabilities negotiation is already complete, command ignored"
        );

        let mut s = Session::new(true);
        assert_eq!(run(json!({}), &mut s), Ok(json!({})));
        assert!(!s.oob_enabled);
        let mut s = Session::new(true);
        assert_eq!(run(json!({"enable": []}), &mut s), Ok(json!({})));
    }

    #[test]
    fn argument_errors() {
        let mut s = Session::new(false);
        assert_eq!(
            run(json!({"enable": ["oob"]}), &mut s),
            Err("Capability oob not available".into())
        );
        assert_eq!(
            run(json!({"enable": ["oob", "oob"]}), &mut s),
            Err("Capability oob, oob not available".into())
        );
        assert_eq!(s.mode, Mode::Negotiation);
        assert_eq!(
            run(json!({"oob": true}), &mut s),
            Err("Parameter 'oob' is unexpected".into())
        );
        assert_eq!(
            run(json!({"enable": null}), &mut s),
            Err("Invalid parameter type for 'enable', expected: array".into())
        );
        assert_eq!(
            run(json!({"enable": [1], "zzz": 1}), &mut s),
            Err("Invalid parameter type for 'enable[0]', expected: string".into())
        );
        assert_eq!(
            run(json!({"enable": ["oob", "foo"]}), &mut s),
            Err("Parameter 'null' does not accept value 'foo'".into())
        );
        // Argument errors win over "already complete".
        let mut s = Session::new(true);
        s.mode = Mode::Command;
        assert_eq!(
            run(json!({"x": 1}), &mut s),
            Err("Parameter 'x' is unexpected".into())
        );
    }
}
