//! Typed event schemas: the registry of every message type, and validation against it.
//!
//! [`REGISTRY`] maps each `type` string to its Rust type ([`types`]) and its family. An event
//! is valid when its bytes deserialize into that type (required fields present, right JSON
//! types, enum values valid); the error names the field by its path (`progress.percentage`).
//! Validation only reads: extra fields pass through, and what is delivered is the
//! publisher's own bytes. The same registry drives `switchboard schema` ([`generate`]), so
//! the TypeScript and JSON Schema can never drift from what the gateway enforces.

pub mod generate;
pub mod types;

use serde::de::DeserializeOwned;
use serde_json::Value;

use types::*;

/// Who may produce a message of a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Published by workers into a project (publish API, Lua script, raw PUBLISH).
    Project,
    /// Gateway-wide notices that operators may also broadcast (`/v1/broadcast`).
    Global,
    /// Sent by the gateway only (connection lifecycle, replies).
    Server,
    /// Sent by clients to the gateway.
    Client,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    #[error("unknown event type {0:?}")]
    UnknownType(String),
    #[error("type {0:?} cannot be published here")]
    NotPublishable(String),
    #[error("{kind}: field `{field}`: {message}")]
    Field {
        kind: String,
        field: String,
        message: String,
    },
}

impl SchemaError {
    pub fn field(&self) -> Option<&str> {
        match self {
            SchemaError::Field { field, .. } => Some(field),
            SchemaError::UnknownType(_) | SchemaError::NotPublishable(_) => Some("type"),
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            SchemaError::UnknownType(_) => "unknown_type",
            SchemaError::NotPublishable(_) => "not_publishable",
            SchemaError::Field { .. } => "invalid_field",
        }
    }
}

type Check = fn(&str, &Value) -> Result<(), SchemaError>;
type CheckBytes = fn(&str, &[u8]) -> Result<(), SchemaError>;

/// One registered message type.
pub struct Entry {
    pub kind: &'static str,
    pub family: Family,
    /// The TypeScript interface name.
    pub name: &'static str,
    check: Check,
    check_bytes: CheckBytes,
    pub(crate) schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
}

fn field_error(kind: &str, path: String, e: &serde_json::Error) -> SchemaError {
    let message = e.to_string();
    // Serde reports a missing field at its parent's path; name the field itself.
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_owned();
    let field = match message.strip_prefix("missing field `") {
        Some(rest) => {
            let name = rest.split('`').next().unwrap_or(rest);
            if path == "." || path.is_empty() {
                name.to_owned()
            } else {
                format!("{path}.{name}")
            }
        }
        None => path,
    };
    SchemaError::Field {
        kind: kind.to_owned(),
        field,
        message,
    }
}

fn check_value<T: DeserializeOwned>(kind: &str, v: &Value) -> Result<(), SchemaError> {
    serde_path_to_error::deserialize::<_, T>(v)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            field_error(kind, path, e.inner())
        })
}

fn check_bytes<T: DeserializeOwned>(kind: &str, b: &[u8]) -> Result<(), SchemaError> {
    let mut de = serde_json::Deserializer::from_slice(b);
    serde_path_to_error::deserialize::<_, T>(&mut de)
        .map(|_| ())
        .map_err(|e| {
            let path = e.path().to_string();
            field_error(kind, path, e.inner())
        })
}

macro_rules! registry {
    ($( $kind:literal => $ty:ident as $name:literal, $family:ident; )*) => {
        /// Every message type of docs/protocol.md §3 and §4.
        pub static REGISTRY: &[Entry] = &[
            $( Entry {
                kind: $kind,
                family: Family::$family,
                name: $name,
                check: check_value::<$ty>,
                check_bytes: check_bytes::<$ty>,
                schema: |g| g.subschema_for::<$ty>(),
            }, )*
        ];
    };
}

registry! {
    "connection.established" => ConnectionEstablished as "ConnectionEstablished", Server;
    "connection.closed" => ConnectionClosed as "ConnectionClosed", Server;
    "connection.resync_required" => ConnectionResyncRequired as "ConnectionResyncRequired", Server;
    "system.heartbeat" => SystemHeartbeat as "SystemHeartbeat", Global;
    "container.reconnect" => ContainerReconnect as "ContainerReconnect", Global;
    "project.created" => ProjectCreated as "ProjectCreated", Global;
    "project.updated" => ProjectUpdated as "ProjectUpdated", Project;
    "project.deleted" => ProjectDeleted as "ProjectDeleted", Project;
    "node.state.updated" => NodeStateUpdated as "NodeStateUpdated", Project;
    "node.progress.updated" => NodeProgressUpdated as "NodeProgressUpdated", Project;
    "node.output.ready" => NodeOutputReady as "NodeOutputReady", Project;
    "node.error.occurred" => NodeErrorOccurred as "NodeErrorOccurred", Project;
    "task.queued" => TaskQueued as "TaskQueued", Project;
    "task.started" => TaskStarted as "TaskStarted", Project;
    "task.progress" => TaskProgress as "TaskProgress", Project;
    "task.success" => TaskSuccess as "TaskSuccess", Project;
    "task.failed" => TaskFailed as "TaskFailed", Project;
    "task.cancelled" => TaskCancelled as "TaskCancelled", Project;
    "agent.task.assigned" => AgentTaskAssigned as "AgentTaskAssigned", Project;
    "agent.task.progress" => AgentTaskProgress as "AgentTaskProgress", Project;
    "agent.task.completed" => AgentTaskCompleted as "AgentTaskCompleted", Project;
    "take.created" => TakeCreated as "TakeCreated", Project;
    "take.selected" => TakeSelected as "TakeSelected", Project;
    "file.uploaded" => FileEvent as "FileUploaded", Project;
    "file.deleted" => FileEvent as "FileDeleted", Project;
    "file.changed" => FileEvent as "FileChanged", Project;
    "workspace.changed" => WorkspaceChanged as "WorkspaceChanged", Global;
    "runner.assigned" => RunnerAssigned as "RunnerAssigned", Project;
    "runner.heartbeat" => RunnerHeartbeat as "RunnerHeartbeat", Project;
    "runner.completed" => RunnerCompleted as "RunnerCompleted", Project;
    "character.created" => CharacterCreated as "CharacterCreated", Project;
    "character.updated" => CharacterUpdated as "CharacterUpdated", Project;
    "character.baseFace.uploaded" => CharacterBaseFaceUploaded as "CharacterBaseFaceUploaded", Project;
    "character.variation.generated" => CharacterVariationGenerated as "CharacterVariationGenerated", Project;
    "character.lora.status" => CharacterLoraStatus as "CharacterLoraStatus", Project;
    "character.usage.updated" => CharacterUsageUpdated as "CharacterUsageUpdated", Project;
    "pong" => Pong as "Pong", Server;
    "status" => Status as "Status", Server;
    "command.accepted" => CommandAccepted as "CommandAccepted", Server;
    "subscribed" => Subscribed as "Subscribed", Server;
    "unsubscribed" => Unsubscribed as "Unsubscribed", Server;
    "auth.refreshed" => AuthRefreshed as "AuthRefreshed", Server;
    "error" => ServerError as "ServerError", Server;
    "ping" => PingMessage as "PingMessage", Client;
    "node.execute" => NodeExecute as "NodeExecute", Client;
    "task.cancel" => TaskCancel as "TaskCancel", Client;
    "status" => StatusRequest as "StatusRequest", Client;
    "subscribe" => Subscribe as "Subscribe", Client;
    "unsubscribe" => Unsubscribe as "Unsubscribe", Client;
    "auth.refresh" => AuthRefresh as "AuthRefresh", Client;
}

/// A message the gateway itself sends, built from its registry struct: a field renamed in
/// `types` is renamed in every frame that carries it (and in the generated TypeScript), and a
/// field missing from a frame is a compile error, not a silent protocol change.
pub trait ServerMessage: serde::Serialize {
    /// The `type` the frame carries (registered with the same struct in [`REGISTRY`]).
    const TYPE: &'static str;

    /// The frame's JSON object: `type` and the struct's fields. Scope (`project_id` or
    /// `projects`) and `timestamp` are filled in by whoever sends it to whom.
    fn to_message(&self) -> serde_json::Map<String, Value> {
        let mut map = match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            // Every ServerMessage is a struct of plain fields: it always serializes to an
            // object (the test below serializes each one).
            _ => serde_json::Map::new(),
        };
        map.insert("type".into(), Value::String(Self::TYPE.into()));
        map
    }
}

macro_rules! server_messages {
    ($( $ty:ident => $kind:literal, )*) => {
        $( impl ServerMessage for $ty { const TYPE: &'static str = $kind; } )*

        /// The server message types and their TypeScript names (checked against the registry).
        #[cfg(test)]
        const SERVER_MESSAGES: &[(&str, &str)] = &[$( ($kind, stringify!($ty)), )*];
    };
}

server_messages! {
    ConnectionEstablished => "connection.established",
    ConnectionClosed => "connection.closed",
    ConnectionResyncRequired => "connection.resync_required",
    SystemHeartbeat => "system.heartbeat",
    ContainerReconnect => "container.reconnect",
    Pong => "pong",
    CommandAccepted => "command.accepted",
    Subscribed => "subscribed",
    Unsubscribed => "unsubscribed",
    AuthRefreshed => "auth.refreshed",
    ServerError => "error",
}

fn entry(kind: &str, families: &[Family]) -> Option<&'static Entry> {
    REGISTRY
        .iter()
        .find(|e| e.kind == kind && families.contains(&e.family))
}

/// What the gateway accepts where events come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Let types outside the registry through (envelope checks still apply).
    pub allow_unknown_types: bool,
    /// Deepest JSON nesting of an event (`events.max_json_depth`), checked before parsing.
    pub max_json_depth: usize,
}

/// The built-in defaults: strict, depth 64 (the defaults of `events.allow_unknown_types`
/// and `events.max_json_depth`; a test in `config` keeps the two equal, and schema does not
/// import the config above it).
impl Default for Policy {
    fn default() -> Self {
        Self {
            allow_unknown_types: false,
            max_json_depth: 64,
        }
    }
}

impl Policy {
    fn lookup(
        &self,
        kind: &str,
        families: &[Family],
    ) -> Result<Option<&'static Entry>, SchemaError> {
        if let Some(e) = entry(kind, families) {
            return Ok(Some(e));
        }
        if REGISTRY.iter().any(|e| e.kind == kind) {
            // A known type from the wrong side (a worker sending `connection.established`).
            return Err(SchemaError::NotPublishable(kind.to_owned()));
        }
        if self.allow_unknown_types {
            Ok(None)
        } else {
            Err(SchemaError::UnknownType(kind.to_owned()))
        }
    }

    /// Checks a project event (already known to be an object with a string `type`).
    pub fn check_project_value(&self, kind: &str, event: &Value) -> Result<(), SchemaError> {
        match self.lookup(kind, &[Family::Project])? {
            Some(e) => (e.check)(kind, event),
            None => Ok(()),
        }
    }

    pub fn check_project_bytes(&self, kind: &str, event: &[u8]) -> Result<(), SchemaError> {
        match self.lookup(kind, &[Family::Project])? {
            Some(e) => (e.check_bytes)(kind, event),
            None => Ok(()),
        }
    }

    /// Checks a global (broadcast) event: project events and gateway notices.
    pub fn check_global_value(&self, kind: &str, event: &Value) -> Result<(), SchemaError> {
        match self.lookup(kind, &[Family::Project, Family::Global])? {
            Some(e) => (e.check)(kind, event),
            None => Ok(()),
        }
    }
}

/// Whether `kind` is a global event of the protocol (docs/protocol.md §3): sent to every
/// connection even when it names a `project_id` (`project.created` names the new project,
/// which has no followers yet).
pub fn is_global(kind: &str) -> bool {
    entry(kind, &[Family::Global]).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const STRICT: Policy = Policy {
        allow_unknown_types: false,
        max_json_depth: 64,
    };

    fn check(v: Value) -> Result<(), SchemaError> {
        let kind = v["type"].as_str().unwrap().to_owned();
        STRICT.check_project_value(&kind, &v)
    }

    #[test]
    fn valid_events_pass_with_extra_fields() {
        check(json!({"type":"node.state.updated","node_id":"n","state":"idle","extra":{"x":1}}))
            .unwrap();
        check(json!({"type":"task.progress","task_id":"t","node_id":"n","progress":{"percentage":50,"current_step":1,"total_steps":2,"step_description":"s"}})).unwrap();
        check(json!({"type":"agent.task.assigned","agent_type":"Art Director","task_id":"t","task_description":"d"})).unwrap();
        check(
            json!({"type":"task.failed","task_id":"t","node_id":"n","error":"e","traceback":null}),
        )
        .unwrap();
        check(json!({"type":"file.changed","file_path":"a"})).unwrap();
        check(json!({"type":"runner.completed","task_id":"t","runner_id":"r","metrics":{"execution_time":1,"memory_used":2,"gpu":3}})).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let e = check(json!({"type":"node.state.updated","node_id":"n"})).unwrap_err();
        assert_eq!(e.field(), Some("state"), "{e}");
        let e = check(json!({"type":"node.state.updated","node_id":"n","state":"sleeping"}))
            .unwrap_err();
        assert_eq!(e.field(), Some("state"), "{e}");
        let e = check(json!({"type":"task.progress","task_id":"t","node_id":"n","progress":{"percentage":"half","current_step":1,"total_steps":2,"step_description":"s"}})).unwrap_err();
        assert_eq!(e.field(), Some("progress.percentage"), "{e}");
        let e = check(json!({"type":"task.progress","task_id":"t","node_id":"n","progress":{"current_step":1,"total_steps":2,"step_description":"s"}})).unwrap_err();
        assert_eq!(e.field(), Some("progress.percentage"), "{e}");
        let e = check(json!({"type":"character.lora.status","char_id":"c","status":"done"}))
            .unwrap_err();
        assert_eq!(e.field(), Some("status"), "{e}");
        let e = check(json!({"type":"agent.task.assigned","agent_type":"Director","task_id":"t","task_description":"d"})).unwrap_err();
        assert_eq!(e.field(), Some("agent_type"), "{e}");
    }

    #[test]
    fn bytes_and_values_agree() {
        let v = json!({"type":"take.selected","node_id":"n"});
        let a = STRICT.check_project_value("take.selected", &v).unwrap_err();
        let b = STRICT
            .check_project_bytes("take.selected", v.to_string().as_bytes())
            .unwrap_err();
        assert_eq!(a.field(), b.field());
        assert_eq!(a.field(), Some("take_id"));
    }

    #[test]
    fn unknown_and_server_types_are_refused_unless_allowed() {
        assert_eq!(
            check(json!({"type":"made.up"})).unwrap_err(),
            SchemaError::UnknownType("made.up".into())
        );
        assert!(matches!(
            check(json!({"type":"connection.established"})).unwrap_err(),
            SchemaError::NotPublishable(_)
        ));
        let lax = Policy {
            allow_unknown_types: true,
            ..Policy::default()
        };
        lax.check_project_value("made.up", &json!({"type":"made.up"}))
            .unwrap();
        assert!(lax
            .check_global_value(
                "container.reconnect",
                &json!({"type":"container.reconnect"})
            )
            .is_ok());
    }

    #[test]
    fn server_messages_are_the_registered_server_types() {
        for (kind, name) in SERVER_MESSAGES {
            let e = entry(kind, &[Family::Server, Family::Global])
                .unwrap_or_else(|| panic!("{kind} is not a registered server type"));
            assert_eq!(e.name, *name, "{kind} is registered with another struct");
        }
        let m = CommandAccepted {
            command: "node.execute".into(),
            request_id: "r".into(),
            delivered_to: 2,
        }
        .to_message();
        assert_eq!(
            Value::Object(m),
            json!({"type": "command.accepted", "command": "node.execute", "request_id": "r", "delivered_to": 2})
        );
        // What a typed frame carries passes the registry's own check of that type.
        let hello = ConnectionEstablished {
            client_id: "c".into(),
            user_id: "u".into(),
            instance_id: "i".into(),
            seq: Some(3),
            epoch: Some("e".into()),
            heartbeat_interval: 30,
            resumed: false,
            projects: None,
            positions: None,
        };
        let e = entry("connection.established", &[Family::Server]).unwrap();
        (e.check)("connection.established", &Value::Object(hello.to_message())).unwrap();
    }

    #[test]
    fn the_seeds_global_events_are_global_with_their_fields() {
        for kind in ["project.created", "workspace.changed", "system.heartbeat"] {
            assert!(is_global(kind), "{kind}");
        }
        assert!(!is_global("project.updated") && !is_global("nope"));
        let p = STRICT;
        p.check_global_value(
            "workspace.changed",
            &json!({"type": "workspace.changed", "workspace_id": "w", "changes": {"added": ["a"]}}),
        )
        .unwrap();
        assert!(p
            .check_global_value("workspace.changed", &json!({"type": "workspace.changed"}))
            .is_err());
        p.check_global_value(
            "project.created",
            &json!({"type": "project.created", "project_id": "p", "data": {"name": "P"}}),
        )
        .unwrap();
        assert!(matches!(
            p.check_project_value("project.created", &json!({"type": "project.created"})),
            Err(SchemaError::NotPublishable(_))
        ));
    }

    #[test]
    fn every_project_family_type_of_the_protocol_is_registered() {
        for kind in [
            "project.updated",
            "project.deleted",
            "node.state.updated",
            "node.progress.updated",
            "node.output.ready",
            "node.error.occurred",
            "task.queued",
            "task.started",
            "task.progress",
            "task.success",
            "task.failed",
            "task.cancelled",
            "agent.task.assigned",
            "agent.task.progress",
            "agent.task.completed",
            "take.created",
            "take.selected",
            "file.uploaded",
            "file.deleted",
            "file.changed",
            "runner.assigned",
            "runner.heartbeat",
            "runner.completed",
            "character.created",
            "character.updated",
            "character.baseFace.uploaded",
            "character.variation.generated",
            "character.lora.status",
            "character.usage.updated",
        ] {
            assert!(entry(kind, &[Family::Project]).is_some(), "{kind}");
        }
    }
}
