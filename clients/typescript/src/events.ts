// PLACEHOLDER until generated
//
// This file will be replaced by the output of `switchboard schema --format typescript`
// (generated from the gateway's Rust types). Until then it holds loose definitions with
// the exported names the client relies on. Do not add logic here.

/** Fields every server frame carries (PROTOCOL §3). */
interface Base<T extends string> {
  type: T;
  timestamp: string;
  project_id?: string;
  seq?: number;
  [key: string]: unknown;
}

// ---- connection-level -------------------------------------------------------------

export interface ConnectionEstablished extends Base<"connection.established"> {
  client_id: string;
  user_id: string;
  instance_id: string;
  seq: number;
  epoch: string;
  heartbeat_interval: number;
  resumed: boolean;
  projects?: string[];
}
export interface ConnectionClosed extends Base<"connection.closed"> {
  code: number;
  reason: string;
}
export interface ConnectionResyncRequired extends Base<"connection.resync_required"> {
  from_seq: number;
  earliest_seq: number;
  epoch: string;
}
export interface SystemHeartbeat extends Base<"system.heartbeat"> {
  projects?: string[];
}
export interface ContainerReconnect extends Base<"container.reconnect"> {
  message?: string;
  reconnect_after_ms?: number;
}

// ---- project ---------------------------------------------------------------------

export interface ProjectCreated extends Base<"project.created"> {}
export interface ProjectUpdated extends Base<"project.updated"> {}
export interface ProjectDeleted extends Base<"project.deleted"> {}

// ---- node ------------------------------------------------------------------------

export type NodeState = "idle" | "queued" | "processing" | "completed" | "failed";

export interface NodeStateUpdated extends Base<"node.state.updated"> {
  node_id: string;
  state: NodeState;
  metadata?: Record<string, unknown>;
}
export interface NodeProgressUpdated extends Base<"node.progress.updated"> {
  node_id: string;
  progress: number;
  step: string;
  step_info: { current: number; total: number; description: string };
  metadata?: Record<string, unknown>;
}
export interface NodeOutputReady extends Base<"node.output.ready"> {
  node_id: string;
  outputs: Record<string, unknown>;
  execution_time: number;
}
export interface NodeErrorOccurred extends Base<"node.error.occurred"> {
  node_id: string;
  error: string;
  traceback?: string;
}

// ---- task ------------------------------------------------------------------------

export interface TaskProgressInfo {
  percentage: number;
  current_step: number;
  total_steps: number;
  step_description: string;
}

export interface TaskQueued extends Base<"task.queued"> {
  task_id: string;
  node_id: string;
  priority: number;
}
export interface TaskStarted extends Base<"task.started"> {
  task_id: string;
  node_id: string;
  runner_id: string;
}
export interface TaskProgress extends Base<"task.progress"> {
  task_id: string;
  node_id: string;
  progress: TaskProgressInfo;
  metadata?: Record<string, unknown>;
}
export interface TaskSuccess extends Base<"task.success"> {
  task_id: string;
  node_id: string;
  result: Record<string, unknown>;
  execution_time: number;
}
export interface TaskFailed extends Base<"task.failed"> {
  task_id: string;
  node_id: string;
  error: string;
  traceback?: string;
}
export interface TaskCancelled extends Base<"task.cancelled"> {
  task_id: string;
  node_id: string;
}

// ---- agent -----------------------------------------------------------------------

export type AgentType =
  | "Producer"
  | "Screenwriter"
  | "Art Director"
  | "Casting Director"
  | "Location Scout"
  | "First AD";

export interface AgentTaskAssigned extends Base<"agent.task.assigned"> {
  agent_type: AgentType;
  task_id: string;
  task_description: string;
}
export interface AgentTaskProgress extends Base<"agent.task.progress"> {
  agent_type: string;
  task_id: string;
  progress: number;
  message: string;
}
export interface AgentTaskCompleted extends Base<"agent.task.completed"> {
  agent_type: string;
  task_id: string;
  output: Record<string, unknown>;
}

// ---- takes -----------------------------------------------------------------------

export interface TakeCreated extends Base<"take.created"> {
  node_id: string;
  take_info: {
    take_id: string;
    take_number: number;
    path: string;
    chapter: string;
    scene: string;
    shot: string;
    metadata: Record<string, unknown>;
  };
}
export interface TakeSelected extends Base<"take.selected"> {
  node_id: string;
  take_id: string;
}

// ---- files -----------------------------------------------------------------------

export interface FileInfo {
  name: string;
  path: string;
  size: number;
  asset_type: string;
}
export interface FileUploaded extends Base<"file.uploaded"> {
  file?: FileInfo;
  file_path?: string;
}
export interface FileDeleted extends Base<"file.deleted"> {
  file?: FileInfo;
  file_path?: string;
}
export interface FileChanged extends Base<"file.changed"> {
  file?: FileInfo;
  file_path?: string;
  change_type?: "modified" | "created" | "deleted";
}
export interface WorkspaceChanged extends Base<"workspace.changed"> {}

// ---- runner ----------------------------------------------------------------------

export interface RunnerAssigned extends Base<"runner.assigned"> {
  task_id: string;
  runner_id: string;
  runner_info: { capabilities: string[]; resources: Record<string, unknown> };
}
export interface RunnerHeartbeat extends Base<"runner.heartbeat"> {
  runner_id: string;
  status: { active_tasks: number; available_memory: number; cpu_usage: number };
}
export interface RunnerCompleted extends Base<"runner.completed"> {
  task_id: string;
  runner_id: string;
  metrics: { execution_time: number; memory_used: number; [key: string]: unknown };
}

// ---- character -------------------------------------------------------------------

export interface CharacterCreated extends Base<"character.created"> {
  character: { assetId: string; name: string; description: string; triggerWord: string };
}
export interface CharacterUpdated extends Base<"character.updated"> {
  char_id: string;
  updates: Record<string, unknown>;
}
export interface CharacterBaseFaceUploaded extends Base<"character.baseFace.uploaded"> {
  char_id: string;
  image_path: string;
}
export interface CharacterVariationGenerated extends Base<"character.variation.generated"> {
  char_id: string;
  variation_type: string;
  image_path: string;
}
export interface CharacterLoraStatus extends Base<"character.lora.status"> {
  char_id: string;
  status: "untrained" | "training" | "completed" | "failed";
  progress?: number;
}
export interface CharacterUsageUpdated extends Base<"character.usage.updated"> {
  char_id: string;
  usage: string[];
}

// ---- replies ---------------------------------------------------------------------

export interface Pong extends Base<"pong"> {}
export interface Status extends Base<"status"> {
  nodes: Record<string, { state: string; progress?: unknown; step?: string; updated_at: string }>;
  tasks: Record<string, { status: string; progress?: unknown; updated_at: string }>;
}
export interface CommandAccepted extends Base<"command.accepted"> {
  command: string;
  request_id: string;
  delivered_to: number;
}
export interface Subscribed extends Base<"subscribed"> {
  project_id: string;
}
export interface Unsubscribed extends Base<"unsubscribed"> {
  project_id: string;
}
export interface AuthRefreshed extends Base<"auth.refreshed"> {
  expires_at: number;
}
/** The `error` message. */
export interface ServerError extends Base<"error"> {
  code: string;
  message: string;
  field?: string;
  request_id?: string;
}

// ---- unions ----------------------------------------------------------------------

/** Events published by workers (carry `seq` when published through the gateway). */
export type ProjectEvent =
  | ProjectCreated
  | ProjectUpdated
  | ProjectDeleted
  | NodeStateUpdated
  | NodeProgressUpdated
  | NodeOutputReady
  | NodeErrorOccurred
  | TaskQueued
  | TaskStarted
  | TaskProgress
  | TaskSuccess
  | TaskFailed
  | TaskCancelled
  | AgentTaskAssigned
  | AgentTaskProgress
  | AgentTaskCompleted
  | TakeCreated
  | TakeSelected
  | FileUploaded
  | FileDeleted
  | FileChanged
  | WorkspaceChanged
  | RunnerAssigned
  | RunnerHeartbeat
  | RunnerCompleted
  | CharacterCreated
  | CharacterUpdated
  | CharacterBaseFaceUploaded
  | CharacterVariationGenerated
  | CharacterLoraStatus
  | CharacterUsageUpdated;

/** Every JSON frame the server sends. */
export type ServerMessage =
  | ConnectionEstablished
  | ConnectionClosed
  | ConnectionResyncRequired
  | SystemHeartbeat
  | ContainerReconnect
  | ProjectEvent
  | Pong
  | Status
  | CommandAccepted
  | Subscribed
  | Unsubscribed
  | AuthRefreshed
  | ServerError;

export type ServerMessageType = ServerMessage["type"];

// ---- client to server ------------------------------------------------------------

export interface PingMessage {
  type: "ping";
}
export interface NodeExecute {
  type: "node.execute";
  node_id: string;
  parameters?: Record<string, unknown>;
  request_id?: string;
  project_id?: string;
}
export interface TaskCancel {
  type: "task.cancel";
  task_id: string;
  request_id?: string;
  project_id?: string;
}
export interface StatusRequest {
  type: "status";
  project_id?: string;
}
export interface Subscribe {
  type: "subscribe";
  project_id: string;
}
export interface Unsubscribe {
  type: "unsubscribe";
  project_id: string;
}
export interface AuthRefresh {
  type: "auth.refresh";
  token: string;
}

export type ClientMessage =
  | PingMessage
  | NodeExecute
  | TaskCancel
  | StatusRequest
  | Subscribe
  | Unsubscribe
  | AuthRefresh;
