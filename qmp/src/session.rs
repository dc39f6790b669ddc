//! Per-connection protocol state and the decision of what to do with each
//! parsed message: reply at once, queue for the VMM, or run out-of-band.

use serde_json::{Map, Value};

use crate::command::CommandSet;
use crate::json::Message;
use crate::request::{takes_oob_path, validate, Request};
use crate::{capabilities, message, ErrorClass, QmpError};

/// Which command table a session uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Only `qmp_capabilities` is available; events are not delivered.
    Negotiation,
    /// All commands are available; events are delivered.
    Command,
}

/// The protocol state of one client connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Current mode.
    pub mode: Mode,
    /// Whether the greeting offered `oob`.
    pub oob_offered: bool,
    /// Whether `oob` was enabled by `qmp_capabilities`.
    pub oob_enabled: bool,
}

impl Session {
    /// A fresh session in negotiation mode.
    pub fn new(oob_offered: bool) -> Self {
        Session {
            mode: Mode::Negotiation,
            oob_offered,
            oob_enabled: false,
        }
    }
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this reply; no command needs to run.
    Reply(Value),
    /// Run an in-band command on the VMM thread, then reply.
    Execute {
        /// Command name.
        name: String,
        /// Arguments.
        arguments: Map<String, Value>,
        /// The request's `id`.
        id: Option<Value>,
    },
    /// Run an allow-oob command right away on the monitor thread, then reply.
    RunOob {
        /// Command name.
        name: String,
        /// Arguments.
        arguments: Map<String, Value>,
        /// The request's `id`.
        id: Option<Value>,
    },
}

/// An [`Action`] and whether it bypasses the in-band queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// What to do.
    pub action: Action,
    /// True for the out-of-band path: handled immediately, its reply may
    /// overtake queued in-band replies.
    pub out_of_band: bool,
}

const NEGOTIATION_HINT: &str = "Expecting capabilities negotiation with 'qmp_capabilities'";

/// Decides what to do with `message` (QEMU's steps 0 to 8); runs
/// `qmp_capabilities` itself, which may change `session`.
pub fn decide(message: Message, session: &mut Session, commands: &dyn CommandSet) -> Decision {
    let out_of_band = takes_oob_path(&message, session.oob_enabled);
    let negotiating = session.mode == Mode::Negotiation;
    let mut action = match validate(message, session.oob_enabled) {
        Err(rejection) => Action::Reply(message::error(&rejection.error, rejection.id)),
        Ok(request) => resolve(request, session, commands),
    };
    if negotiating {
        if let Action::Reply(reply) = &mut action {
            hint_negotiation(reply);
        }
    }
    Decision {
        action,
        out_of_band,
    }
}

/// QEMU replaces the text of every CommandNotFound during negotiation.
fn hint_negotiation(reply: &mut Value) {
    if let Some(Value::Object(error)) = reply.get_mut("error") {
        if error.get("class").and_then(Value::as_str) == Some(ErrorClass::CommandNotFound.as_str())
        {
            error.remove("desc");
            error.insert("desc".into(), Value::String(NEGOTIATION_HINT.into()));
        }
    }
}

fn resolve(request: Request, session: &mut Session, commands: &dyn CommandSet) -> Action {
    let Request {
        id,
        name,
        arguments,
        oob,
    } = request;
    let is_capabilities = name == "qmp_capabilities";
    let allow_oob = if is_capabilities {
        Some(false)
    } else if session.mode == Mode::Negotiation {
        None
    } else {
        commands.lookup(&name).map(|meta| meta.allow_oob)
    };
    let Some(allow_oob) = allow_oob else {
        let err = QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        );
        return Action::Reply(message::error(&err, id));
    };
    if oob && !allow_oob {
        let err = QmpError::generic(format!("The command {name} does not support OOB"));
        return Action::Reply(message::error(&err, id));
    }
    if is_capabilities {
        return Action::Reply(message::reply(
            capabilities::execute(&arguments, session),
            id,
        ));
    }
    if oob {
        Action::RunOob {
            name,
            arguments,
            id,
        }
    } else {
        Action::Execute {
            name,
            arguments,
            id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::CommandMeta;
    use crate::json::to_line;
    use serde_json::json;

    struct Fake;
    impl CommandSet for Fake {
        fn lookup(&self, name: &str) -> Option<CommandMeta> {
            match name {
                "query-name" => Some(CommandMeta { allow_oob: false }),
                "migrate-pause" => Some(CommandMeta { allow_oob: true }),
                _ => None,
            }
        }
        fn run_oob(
            &self,
            _: &str,
            _: Map<String, Value>,
            _: &crate::MonitorFds,
        ) -> Result<Value, QmpError> {
            Ok(json!({}))
        }
    }

    fn reply_line(d: &Decision) -> String {
        match &d.action {
            Action::Reply(v) => String::from_utf8(to_line(v)).unwrap(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn negotiation_mode() {
        let mut s = Session::new(true);
        let d = decide(Ok(json!({"execute": "query-name"})), &mut s, &Fake);
        assert_eq!(
            reply_line(&d),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\r\n"
        );
        let d = decide(Ok(json!({"exec-oob": "migrate-pause"})), &mut s, &Fake);
        assert!(d.out_of_band);
        assert!(reply_line(&d).contains("QMP input member 'exec-oob' is unexpected"));
        let d = decide(
            Ok(json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1})),
            &mut s,
            &Fake,
        );
        assert_eq!(reply_line(&d), "{\"return\": {}, \"id\": 1}\r\n");
        assert_eq!(s.mode, Mode::Command);
        assert!(s.oob_enabled);
    }

    #[test]
    fn command_mode() {
        let mut s = Session::new(true);
        s.mode = Mode::Command;
        s.oob_enabled = true;
        let d = decide(Ok(json!({"execute": "nope", "id": 2})), &mut s, &Fake);
        assert_eq!(
            reply_line(&d),
            "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
        );
        let d = decide(Ok(json!({"execute": "qmp_capabilities"})), &mut s, &Fake);
        assert!(reply_line(&d)
            .contains("Capabilities negotiation is already complete, command ignored"));
        let d = decide(
            Ok(json!({"exec-oob": "query-name", "id": 3})),
            &mut s,
            &Fake,
        );
        assert!(d.out_of_band);
        assert!(reply_line(&d).contains("The command query-name does not support OOB"));
        let d = decide(
            Ok(json!({"exec-oob": "migrate-pause", "id": 4})),
            &mut s,
            &Fake,
        );
        assert!(matches!(d.action, Action::RunOob { ref name, .. } if name == "migrate-pause"));
        let d = decide(
            Ok(json!({"execute": "migrate-pause", "control": {"run-oob": true}})),
            &mut s,
            &Fake,
        );
        assert!(d.out_of_band);
        assert!(matches!(d.action, Action::RunOob { .. }));
        let d = decide(Ok(json!({"execute": "query-name", "id": 5})), &mut s, &Fake);
        assert!(!d.out_of_band);
        assert_eq!(
            d.action,
            Action::Execute {
                name: "query-name".into(),
                arguments: Map::new(),
                id: Some(json!(5))
            }
        );
    }
}
