//! The Rust types of every event and message (docs/protocol.md §3, the seed's "Message Schema").
//!
//! Each struct lists the fields its type REQUIRES beyond the envelope (`type`, `timestamp`,
//! `project_id`, `seq`, which the gateway checks and fills for every event). Optional fields
//! are `Option`s; unknown extra fields are allowed and never touched (validation only reads;
//! the publisher's bytes are what is delivered). Numbers are `f64` where the seed says
//! `number`. These types are the single source of the generated TypeScript and JSON Schema.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Free-form JSON object.
pub type Object = Map<String, Value>;

// ---------- enums ----------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Idle,
    Queued,
    Processing,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    Queued,
    Started,
    Running,
    Success,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AgentType {
    Producer,
    Screenwriter,
    #[serde(rename = "Art Director")]
    ArtDirector,
    #[serde(rename = "Casting Director")]
    CastingDirector,
    #[serde(rename = "Location Scout")]
    LocationScout,
    #[serde(rename = "First AD")]
    FirstAd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LoraStatus {
    Untrained,
    Training,
    Completed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileChangeType {
    Modified,
    Created,
    Deleted,
}

// ---------- nested objects ----------

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct StepInfo {
    pub current: f64,
    pub total: f64,
    pub description: String,
}

/// `task.progress.progress` (docs/protocol.md §3).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskProgressInfo {
    pub percentage: f64,
    pub current_step: f64,
    pub total_steps: f64,
    pub step_description: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RunnerInfo {
    pub capabilities: Vec<String>,
    pub resources: Object,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RunnerStatus {
    pub active_tasks: f64,
    pub available_memory: f64,
    pub cpu_usage: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct RunnerMetrics {
    pub execution_time: f64,
    pub memory_used: f64,
    #[serde(flatten)]
    pub extra: Object,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    pub size: f64,
    pub asset_type: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AgentOutput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document_path: Option<String>,
    #[serde(flatten)]
    pub extra: Object,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TakeInfo {
    pub take_id: String,
    pub take_number: f64,
    pub path: String,
    pub chapter: String,
    pub scene: String,
    pub shot: String,
    pub metadata: Object,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[allow(non_snake_case)]
pub struct CharacterInfo {
    pub assetId: String,
    pub name: String,
    pub description: String,
    pub triggerWord: String,
}

/// One node in a `status` snapshot (docs/protocol.md §8).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct NodeStatusEntry {
    pub state: Option<NodeState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    pub updated_at: Option<String>,
}

/// One task in a `status` snapshot (docs/protocol.md §8).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskStatusEntry {
    pub status: TaskState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TaskProgressInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    pub updated_at: Option<String>,
}

// ---------- worker events ----------

macro_rules! event_struct {
    ($(#[$m:meta])* $name:ident { $($body:tt)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
        pub struct $name { $($body)* }
    };
}

event_struct!(
    /// A global event (seed 000's `EventBroadcaster.project_created`, sent to every
    /// connection): `project_id` names the new project, `data` is the app's project object.
    ProjectCreated {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
});
event_struct!(ProjectUpdated {});
event_struct!(ProjectDeleted {});

event_struct!(NodeStateUpdated {
    pub node_id: String,
    pub state: NodeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Object>,
});
event_struct!(NodeProgressUpdated {
    pub node_id: String,
    pub progress: f64,
    pub step: String,
    pub step_info: StepInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Object>,
});
event_struct!(NodeOutputReady {
    pub node_id: String,
    pub outputs: Object,
    pub execution_time: f64,
});
event_struct!(NodeErrorOccurred {
    pub node_id: String,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
});

event_struct!(TaskQueued {
    pub task_id: String,
    pub node_id: String,
    pub priority: f64,
});
event_struct!(TaskStarted {
    pub task_id: String,
    pub node_id: String,
    pub runner_id: String,
});
event_struct!(TaskProgress {
    pub task_id: String,
    pub node_id: String,
    pub progress: TaskProgressInfo,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Object>,
});
event_struct!(TaskSuccess {
    pub task_id: String,
    pub node_id: String,
    pub result: Object,
    pub execution_time: f64,
});
event_struct!(TaskFailed {
    pub task_id: String,
    pub node_id: String,
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceback: Option<String>,
});
event_struct!(TaskCancelled {
    pub task_id: String,
    pub node_id: String,
});

event_struct!(AgentTaskAssigned {
    pub agent_type: AgentType,
    pub task_id: String,
    pub task_description: String,
});
event_struct!(AgentTaskProgress {
    pub agent_type: String,
    pub task_id: String,
    pub progress: f64,
    pub message: String,
});
event_struct!(AgentTaskCompleted {
    pub agent_type: String,
    pub task_id: String,
    pub output: AgentOutput,
});

event_struct!(TakeCreated {
    pub node_id: String,
    pub take_info: TakeInfo,
});
event_struct!(TakeSelected {
    pub node_id: String,
    pub take_id: String,
});

event_struct!(
    /// A global event (seed 000's `EventBroadcaster.workspace_changed`, sent to every
    /// connection): which workspace, and per kind of change the paths it touched.
    WorkspaceChanged {
    pub workspace_id: String,
    pub changes: BTreeMap<String, Vec<String>>,
});

event_struct!(
    /// `file.uploaded`, `file.deleted`, `file.changed`.
    FileEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_type: Option<FileChangeType>,
});

event_struct!(RunnerAssigned {
    pub task_id: String,
    pub runner_id: String,
    pub runner_info: RunnerInfo,
});
event_struct!(RunnerHeartbeat {
    pub runner_id: String,
    pub status: RunnerStatus,
});
event_struct!(RunnerCompleted {
    pub task_id: String,
    pub runner_id: String,
    pub metrics: RunnerMetrics,
});

event_struct!(CharacterCreated {
    pub character: CharacterInfo,
});
event_struct!(CharacterUpdated {
    pub char_id: String,
    pub updates: Object,
});
event_struct!(CharacterBaseFaceUploaded {
    pub char_id: String,
    pub image_path: String,
});
event_struct!(CharacterVariationGenerated {
    pub char_id: String,
    pub variation_type: String,
    pub image_path: String,
});
event_struct!(CharacterLoraStatus {
    pub char_id: String,
    pub status: LoraStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
});
event_struct!(CharacterUsageUpdated {
    pub char_id: String,
    pub usage: Vec<String>,
});

// ---------- gateway messages ----------

event_struct!(ConnectionEstablished {
    pub client_id: String,
    pub user_id: String,
    pub instance_id: String,
    /// Last seq of the project (single-project connections).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
    pub heartbeat_interval: u64,
    pub resumed: bool,
    /// `/ws/user`: the projects of the connection and their positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub positions: Option<Object>,
});
event_struct!(ConnectionClosed {
    pub code: u16,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
});
event_struct!(ConnectionResyncRequired {
    pub from_seq: u64,
    pub earliest_seq: u64,
    pub epoch: String,
});
event_struct!(SystemHeartbeat {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<Vec<String>>,
});
event_struct!(ContainerReconnect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_after_ms: Option<u64>,
});
event_struct!(Pong {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projects: Option<Vec<String>>,
});
event_struct!(Status {
    pub seq: u64,
    pub epoch: String,
    pub nodes: BTreeMap<String, NodeStatusEntry>,
    pub tasks: BTreeMap<String, TaskStatusEntry>,
});
event_struct!(CommandAccepted {
    pub command: String,
    pub request_id: String,
    pub delivered_to: u64,
});
event_struct!(Subscribed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
});
event_struct!(Unsubscribed {});
event_struct!(AuthRefreshed {
    pub expires_at: Option<u64>,
});
event_struct!(ServerError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
});

// ---------- client messages ----------

event_struct!(PingMessage {});
event_struct!(NodeExecute {
    pub node_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Object>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Required on `/ws/user`; otherwise the connection's project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
});
event_struct!(TaskCancel {
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
});
event_struct!(StatusRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_id: Option<String>,
});
event_struct!(Subscribe {
    pub project_id: String,
});
event_struct!(Unsubscribe {
    pub project_id: String,
});
event_struct!(AuthRefresh {
    pub token: String,
});
