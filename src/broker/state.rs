//! The status snapshot's state (docs/protocol.md §4, §8): latest node and task states per project.
//!
//! In Redis the publish script keeps it (`project:{id}:state`, fields `node:<id>` and
//! `task:<id>` holding JSON entries); [`ProjectState::apply`] is the in-process mirror of
//! that script's `update_state`, used by the embedded broker, and must stay equal to it (an
//! integration test compares the two brokers' snapshots for the same events). Finished
//! tasks leave the state after `terminal_task_ttl`, so it stays bounded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// What a `status` frame carries besides its envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub seq: u64,
    pub epoch: String,
    pub nodes: Map<String, Value>,
    pub tasks: Map<String, Value>,
    /// Entries were left out to keep the frame under its byte bound.
    pub truncated: bool,
}

impl Snapshot {
    /// Builds a snapshot from `node:<id>` / `task:<id>` fields with JSON entries.
    pub fn from_fields(
        seq: u64,
        epoch: String,
        fields: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        let mut nodes = Map::new();
        let mut tasks = Map::new();
        for (field, raw) in fields {
            let Ok(entry) = serde_json::from_str::<Value>(&raw) else {
                continue;
            };
            if let Some(id) = field.strip_prefix("node:") {
                nodes.insert(id.to_owned(), entry);
            } else if let Some(id) = field.strip_prefix("task:") {
                tasks.insert(id.to_owned(), entry);
            }
        }
        Self {
            seq,
            epoch,
            nodes,
            tasks,
            truncated: false,
        }
    }

    /// Keeps the frame under `max_bytes`: when the entries would not fit, the most recently
    /// updated ones that do are kept (by `updated_at`, newest first) and `truncated` is set.
    /// A project's state has no count limit of its own (15,000 nodes made a 979 KB frame),
    /// so this is what bounds what one `status` costs to build and send.
    pub fn bounded(mut self, max_bytes: usize) -> Self {
        // Envelope, seq, epoch, timestamp and scope fields: well under this.
        const ENVELOPE: usize = 512;
        let size = |id: &str, v: &Value| id.len() + 4 + v.to_string().len();
        let total: usize = self
            .nodes
            .iter()
            .chain(self.tasks.iter())
            .map(|(k, v)| size(k, v))
            .sum();
        if total + ENVELOPE <= max_bytes {
            return self;
        }
        let updated = |v: &Value| {
            v.get("updated_at")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let mut entries: Vec<(bool, String, Value)> = std::mem::take(&mut self.nodes)
            .into_iter()
            .map(|(k, v)| (true, k, v))
            .chain(
                std::mem::take(&mut self.tasks)
                    .into_iter()
                    .map(|(k, v)| (false, k, v)),
            )
            .collect();
        entries.sort_by_cached_key(|(_, _, v)| std::cmp::Reverse(updated(v)));
        let mut used = ENVELOPE;
        for (node, id, value) in entries {
            let n = size(&id, &value);
            if used + n > max_bytes {
                continue;
            }
            used += n;
            if node {
                self.nodes.insert(id, value);
            } else {
                self.tasks.insert(id, value);
            }
        }
        self.truncated = true;
        self
    }

    /// The `status` message (scope fields and timestamp are added by the session).
    pub fn message(&self, project: &str) -> Value {
        let mut m = json!({
            "type": "status",
            "project_id": project,
            "seq": self.seq,
            "epoch": self.epoch,
            "nodes": self.nodes,
            "tasks": self.tasks,
        });
        if self.truncated {
            m["truncated"] = Value::Bool(true);
        }
        m
    }
}

fn task_status(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "task.queued" => "queued",
        "task.started" => "started",
        "task.progress" => "running",
        "task.success" => "success",
        "task.failed" => "failed",
        "task.cancelled" => "cancelled",
        _ => return None,
    })
}

#[derive(Default)]
pub struct ProjectState {
    fields: BTreeMap<String, Value>,
    finished: BTreeMap<String, Instant>,
}

impl ProjectState {
    /// Applies one event, exactly like `update_state` in publish.lua.
    pub fn apply(&mut self, event: &Map<String, Value>) {
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let at = event.get("timestamp").filter(|t| t.is_string()).cloned();
        let str_field = |name: &str| event.get(name).and_then(Value::as_str);
        let put = |entry: &mut Map<String, Value>, key: &str, value: Option<Value>| match value {
            Some(v) => {
                entry.insert(key.to_owned(), v);
            }
            None => {
                entry.remove(key);
            }
        };
        if kind == "node.state.updated" || kind == "node.progress.updated" {
            let Some(node) = str_field("node_id") else {
                return;
            };
            let field = format!("node:{node}");
            let mut entry = match self.fields.remove(&field) {
                Some(Value::Object(m)) => m,
                _ => Map::new(),
            };
            if kind == "node.state.updated" {
                put(&mut entry, "state", event.get("state").cloned());
            } else {
                if !entry.contains_key("state") {
                    entry.insert("state".into(), json!("processing"));
                }
                put(&mut entry, "progress", event.get("progress").cloned());
                put(&mut entry, "step", event.get("step").cloned());
            }
            put(&mut entry, "updated_at", at);
            self.fields.insert(field, Value::Object(entry));
        } else if let Some(status) = task_status(kind) {
            let Some(task) = str_field("task_id") else {
                return;
            };
            let field = format!("task:{task}");
            let previous = self.fields.remove(&field);
            let mut entry = Map::new();
            entry.insert("status".into(), json!(status));
            put(&mut entry, "updated_at", at);
            let progress = if kind == "task.progress" {
                event.get("progress").cloned()
            } else {
                previous.and_then(|p| p.get("progress").cloned())
            };
            put(&mut entry, "progress", progress);
            put(
                &mut entry,
                "node_id",
                str_field("node_id").map(|n| json!(n)),
            );
            self.fields.insert(field.clone(), Value::Object(entry));
            if matches!(status, "success" | "failed" | "cancelled") {
                self.finished.insert(field, Instant::now());
            } else {
                self.finished.remove(&field);
            }
        }
    }

    /// Drops finished tasks older than `keep`.
    pub fn age_out(&mut self, keep: Duration) {
        let old: Vec<String> = self
            .finished
            .iter()
            .filter(|(_, at)| at.elapsed() >= keep)
            .map(|(f, _)| f.clone())
            .collect();
        for f in old {
            self.finished.remove(&f);
            self.fields.remove(&f);
        }
    }

    pub fn snapshot(&self, seq: u64, epoch: &str) -> Snapshot {
        Snapshot::from_fields(
            seq,
            epoch.to_owned(),
            self.fields.iter().map(|(k, v)| (k.clone(), v.to_string())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn nodes_and_tasks_follow_their_events() {
        let mut s = ProjectState::default();
        s.apply(&ev(
            json!({"type":"node.state.updated","node_id":"n","state":"queued","timestamp":"t1"}),
        ));
        s.apply(&ev(json!({"type":"node.progress.updated","node_id":"n","progress":40,"step":"s","timestamp":"t2"})));
        s.apply(&ev(json!({"type":"task.started","task_id":"t","node_id":"n","runner_id":"r","timestamp":"t3"})));
        s.apply(&ev(json!({"type":"task.progress","task_id":"t","node_id":"n","progress":{"percentage":50},"timestamp":"t4"})));
        s.apply(&ev(
            json!({"type":"task.success","task_id":"t","node_id":"n","timestamp":"t5"}),
        ));
        let snap = s.snapshot(5, "e");
        assert_eq!(
            snap.nodes["n"],
            json!({"state":"queued","progress":40,"step":"s","updated_at":"t2"})
        );
        assert_eq!(snap.tasks["t"]["status"], "success");
        assert_eq!(snap.tasks["t"]["progress"], json!({"percentage":50}));
        s.age_out(Duration::ZERO);
        assert!(s.snapshot(5, "e").tasks.is_empty());
        assert_eq!(s.snapshot(5, "e").nodes.len(), 1);
    }
}
