//! Parsing one client text message (docs/protocol.md §4) into a typed [`ClientMessage`].
//!
//! [`parse`] touches no state (the `client_message` fuzz target drives it with arbitrary
//! text) and never panics. The message types are the registry's own structs
//! (`schema::types`), read through a serde tagged enum, so a field renamed there is renamed
//! here; a refusal names the offending field (`serde_path_to_error`). What a message costs
//! to parse is bounded before parsing (`ws.max_json_depth`, measured flat).

use serde_json::{Map, Value};

use crate::project::valid_project_id;
use crate::schema::types;

/// Why one client message was refused; answered as an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `invalid_json`, `invalid_message` or `unknown_type` (from [`parse`]), or
    /// `forbidden` (from the checks against the connection).
    pub code: &'static str,
    /// Human text for the client; quotes at most 64 bytes of the client's own input.
    pub message: String,
    /// The offending field, when there is one.
    pub field: Option<&'static str>,
}

impl Refusal {
    pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: "invalid_message",
            message: message.into(),
            field: Some(field),
        }
    }

    /// Whether the refusal counts toward the invalid-message streak (close 1008).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self.code,
            "invalid_json" | "invalid_message" | "unknown_type"
        )
    }
}

/// Which relayed command a [`ClientMessage::Command`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `node.execute`, relayed as `execute_node`.
    Execute,
    /// `task.cancel`, relayed as `cancel_task`.
    Cancel,
}

/// One client message with its fields checked for presence and JSON type (docs/protocol.md §4).
/// Whether this connection may act on it (granted, joined projects) is checked later.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// Text `ping`: answered with text `pong`.
    TextPing,
    /// `{"type":"ping"}`: answered with `{"type":"pong"}`.
    Ping,
    /// Text `status` or `{"type":"status"}`: the named project, or every project of the
    /// connection.
    Status { project_id: Option<String> },
    /// `node.execute` / `task.cancel`. `subject` is the non-empty `node_id` / `task_id`;
    /// `parameters` is `{}` when absent or null, and always `{}` for a cancel.
    Command {
        kind: Command,
        subject: String,
        parameters: Map<String, Value>,
        request_id: Option<String>,
        project_id: Option<String>,
    },
    /// `project_id` is a valid project id (`[A-Za-z0-9_.-]{1,128}`, not `user`).
    Subscribe { project_id: String },
    /// Any non-empty `project_id`: dropping a project the connection does not have is a
    /// no-op that is still answered.
    Unsubscribe { project_id: String },
    /// `token` is non-empty; it is verified when acted on.
    AuthRefresh { token: String },
}

/// Parses one complete text message. Never panics, whatever the text.
pub fn parse(text: &str, max_depth: usize) -> Result<ClientMessage, Refusal> {
    match text {
        "ping" => return Ok(ClientMessage::TextPing),
        "status" => return Ok(ClientMessage::Status { project_id: None }),
        _ => {}
    }
    // Before parsing: a deeply nested message costs the parser one recursion and one
    // allocation per level, and past its own limit it would only say "not JSON".
    if crate::json_depth::exceeds(text.as_bytes(), max_depth) {
        return Err(Refusal {
            code: "invalid_message",
            message: format!("message nests JSON deeper than {max_depth} levels"),
            field: None,
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|_| Refusal {
        code: "invalid_json",
        message: "message is not valid JSON".into(),
        field: None,
    })?;
    let Value::Object(msg) = value else {
        return Err(Refusal {
            code: "invalid_message",
            message: "message must be a JSON object".into(),
            field: None,
        });
    };
    let kind = match msg.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        _ => {
            return Err(Refusal::invalid(
                "type",
                "field `type` is required and must be a string",
            ))
        }
    };
    if !CLIENT_TYPES.contains(&kind.as_str()) {
        return Err(Refusal {
            code: "unknown_type",
            message: format!("unknown message type {:?}", truncate(&kind, 64)),
            field: Some("type"),
        });
    }
    let value = Value::Object(msg);
    let incoming = match <Incoming as serde::Deserialize>::deserialize(&value) {
        Ok(m) => m,
        // An internally tagged enum reads through a buffer that loses the path of a bad
        // field: read the one struct of this type again, with its path, to name it.
        Err(e) => return Err(incoming_error(&kind, &value, e)),
    };
    let nonempty = |field: &'static str, value: String| {
        if value.is_empty() {
            Err(Refusal::invalid(
                field,
                format!("field `{field}` is required and must be a non-empty string"),
            ))
        } else {
            Ok(value)
        }
    };
    Ok(match incoming {
        Incoming::Ping(_) => ClientMessage::Ping,
        Incoming::Status(m) => ClientMessage::Status {
            project_id: m.project_id,
        },
        Incoming::Execute(m) => ClientMessage::Command {
            kind: Command::Execute,
            subject: nonempty("node_id", m.node_id)?,
            parameters: m.parameters.unwrap_or_default(),
            request_id: m.request_id,
            project_id: m.project_id,
        },
        Incoming::Cancel(m) => ClientMessage::Command {
            kind: Command::Cancel,
            subject: nonempty("task_id", m.task_id)?,
            parameters: Map::new(),
            request_id: m.request_id,
            project_id: m.project_id,
        },
        Incoming::Subscribe(m) => {
            let project_id = nonempty("project_id", m.project_id)?;
            if !valid_project_id(&project_id) {
                return Err(Refusal::invalid("project_id", "invalid project id"));
            }
            ClientMessage::Subscribe { project_id }
        }
        Incoming::Unsubscribe(m) => ClientMessage::Unsubscribe {
            project_id: nonempty("project_id", m.project_id)?,
        },
        Incoming::AuthRefresh(m) => ClientMessage::AuthRefresh {
            token: nonempty("token", m.token)?,
        },
    })
}

/// The client messages of docs/protocol.md §4, as the typed registry defines them
/// (`schema::types`): a field renamed there is renamed here and in the generated
/// TypeScript at once, so the parser cannot drift from the documented types.
#[derive(serde::Deserialize)]
#[serde(tag = "type")]
enum Incoming {
    #[serde(rename = "ping")]
    Ping(types::PingMessage),
    #[serde(rename = "status")]
    Status(types::StatusRequest),
    #[serde(rename = "node.execute")]
    Execute(types::NodeExecute),
    #[serde(rename = "task.cancel")]
    Cancel(types::TaskCancel),
    #[serde(rename = "subscribe")]
    Subscribe(types::Subscribe),
    #[serde(rename = "unsubscribe")]
    Unsubscribe(types::Unsubscribe),
    #[serde(rename = "auth.refresh")]
    AuthRefresh(types::AuthRefresh),
}

/// The `type`s of [`Incoming`], checked first so an unknown one gets its own error code.
const CLIENT_TYPES: [&str; 7] = [
    "ping",
    "status",
    "node.execute",
    "task.cancel",
    "subscribe",
    "unsubscribe",
    "auth.refresh",
];

/// The fields of client messages, as `'static` names for [`Refusal::field`].
const CLIENT_FIELDS: [&str; 7] = [
    "node_id",
    "task_id",
    "project_id",
    "request_id",
    "parameters",
    "token",
    "type",
];

/// The refusal for a message of type `kind` that [`Incoming`] did not accept.
fn incoming_error(kind: &str, value: &Value, e: serde_json::Error) -> Refusal {
    fn path_of<T: serde::de::DeserializeOwned>(value: &Value) -> Option<Refusal> {
        serde_path_to_error::deserialize::<_, T>(value)
            .err()
            .map(|e| field_refusal(&e.path().to_string(), e.inner()))
    }
    let precise = match kind {
        "ping" => path_of::<types::PingMessage>(value),
        "status" => path_of::<types::StatusRequest>(value),
        "node.execute" => path_of::<types::NodeExecute>(value),
        "task.cancel" => path_of::<types::TaskCancel>(value),
        "subscribe" => path_of::<types::Subscribe>(value),
        "unsubscribe" => path_of::<types::Unsubscribe>(value),
        "auth.refresh" => path_of::<types::AuthRefresh>(value),
        _ => None,
    };
    precise.unwrap_or_else(|| field_refusal("", &e))
}

/// A refusal naming the field serde stopped at (`path`), or the missing one.
fn field_refusal(path: &str, e: &serde_json::Error) -> Refusal {
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text);
    let name = match text.strip_prefix("missing field `") {
        Some(rest) => rest.split('`').next().unwrap_or(rest),
        None => path.split('.').next().unwrap_or(path),
    };
    let field = CLIENT_FIELDS.iter().find(|f| **f == name).copied();
    let message = match (field, text.starts_with("missing field")) {
        (Some(f), true) => format!("field `{f}` is required and must be a non-empty string"),
        (Some(f), false) => format!("field `{f}`: {}", truncate(text, 120)),
        (None, _) => format!("invalid message: {}", truncate(text, 120)),
    };
    Refusal {
        code: "invalid_message",
        message,
        field,
    }
}

/// At most `max` bytes of `s`, cut on a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// [`super::parse`] with the default depth limit.
    fn parse(text: &str) -> Result<ClientMessage, Refusal> {
        super::parse(text, 32)
    }

    fn refused(text: &str) -> Refusal {
        parse(text).expect_err(text)
    }

    #[test]
    fn text_shortcuts_and_typed_messages() {
        assert_eq!(parse("ping").unwrap(), ClientMessage::TextPing);
        assert_eq!(
            parse("status").unwrap(),
            ClientMessage::Status { project_id: None }
        );
        assert_eq!(parse(r#"{"type":"ping"}"#).unwrap(), ClientMessage::Ping);
        assert_eq!(
            parse(r#"{"type":"node.execute","node_id":"n","request_id":"r"}"#).unwrap(),
            ClientMessage::Command {
                kind: Command::Execute,
                subject: "n".into(),
                parameters: Map::new(),
                request_id: Some("r".into()),
                project_id: None,
            }
        );
        let ClientMessage::Command { parameters, .. } =
            parse(r#"{"type":"node.execute","node_id":"n","parameters":{"a":1}}"#).unwrap()
        else {
            panic!("not a command")
        };
        assert_eq!(Value::Object(parameters), json!({"a": 1}));
        assert_eq!(
            parse(r#"{"type":"task.cancel","task_id":"t","project_id":"p"}"#).unwrap(),
            ClientMessage::Command {
                kind: Command::Cancel,
                subject: "t".into(),
                parameters: Map::new(),
                request_id: None,
                project_id: Some("p".into()),
            }
        );
        assert_eq!(
            parse(r#"{"type":"subscribe","project_id":"a.b-c"}"#).unwrap(),
            ClientMessage::Subscribe {
                project_id: "a.b-c".into()
            }
        );
        assert_eq!(
            parse(r#"{"type":"auth.refresh","token":"x.y.z"}"#).unwrap(),
            ClientMessage::AuthRefresh {
                token: "x.y.z".into()
            }
        );
    }

    #[test]
    fn refusals_name_code_and_field() {
        assert_eq!(refused("pong").code, "invalid_json");
        assert_eq!(refused("[1]").code, "invalid_message");
        assert_eq!(refused(r#"{"type":1}"#).field, Some("type"));
        let r = refused(r#"{"type":"node.execute","node_id":"n","parameters":[]}"#);
        assert_eq!((r.code, r.field), ("invalid_message", Some("parameters")));
        assert_eq!(
            refused(r#"{"type":"task.cancel","task_id":""}"#).field,
            Some("task_id")
        );
        assert_eq!(
            refused(r#"{"type":"subscribe","project_id":"user"}"#).field,
            Some("project_id")
        );
        assert_eq!(
            refused(r#"{"type":"auth.refresh","token":7}"#).field,
            Some("token")
        );
        for r in [refused("pong"), refused(r#"{"type":"made.up"}"#)] {
            assert!(r.is_invalid_input());
        }
    }

    #[test]
    fn an_unknown_type_is_quoted_at_most_64_bytes_on_a_char_boundary() {
        // 63 ASCII bytes then a 2-byte character straddling the cut.
        let kind = format!("{}é{}", "a".repeat(63), "b".repeat(500));
        let r = refused(&json!({ "type": kind }).to_string());
        assert_eq!(r.code, "unknown_type");
        assert!(r.message.contains(&"a".repeat(63)) && !r.message.contains('é'));
        assert!(r.message.len() < 100, "{}", r.message);
    }
}
