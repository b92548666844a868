//! Global events (`websocket:broadcast`, the broadcast API): routed as the seed's
//! `_handle_redis_event` does (docs/protocol.md §3). One naming a `project_id` goes to that
//! project's followers only and keeps its `project_id`; one without goes to every
//! connection, each with its own scope, encoded once per distinct scope. The protocol's
//! global types (`project.created`, `workspace.changed`, `container.reconnect`, ...) go to
//! every connection whatever they name, as the seed's `EventBroadcaster` sends them
//! (`broadcast_all`), keeping a `project_id` they carry (the new project, for
//! `project.created`). A raw `seq` is never passed on: only the publish path assigns one.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use bytes::Bytes;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use super::backlog::Backlog;
use super::Hub;
use crate::event::{self, Prepared};
use crate::session::{Scope, Session};
use crate::wheel::Slice;

/// Global events offered inline at most to this many sessions; past it the offers run on
/// the broadcast task, in slices (issue 13: no work that grows with the connections in one
/// go: at 100k connections one global event is 100k socket writes).
const INLINE_MAX: usize = 1024;

/// Longest run of the broadcast task between two yields.
const SLICE: std::time::Duration = std::time::Duration::from_micros(200);

/// Bounds of the broadcast task's queue: a publisher flooding `websocket:broadcast` waits
/// (the broker's reader awaits `Hub::settled`) instead of queueing session snapshots
/// without end (each is 8 bytes per connection: 800 KB at 100k).
pub(super) const MAX_QUEUED: usize = 64;
const MAX_QUEUED_BYTES: usize = 64 << 20;

/// One global event for a snapshot of the sessions.
pub(super) struct Broadcast {
    event: Map<String, Value>,
    sessions: Vec<Arc<Session>>,
    bytes: usize,
}

/// The queue of the broadcast task: global events in arrival order.
pub(super) struct Broadcasts {
    tx: mpsc::UnboundedSender<Broadcast>,
    /// Queued and not finished: a small broadcast goes inline only when nothing is (so
    /// global events keep their order).
    pub(super) backlog: Arc<Backlog>,
}

impl Broadcasts {
    /// The queue and its task, on the current runtime (None outside one: everything inline).
    pub(super) fn start(hub: Weak<Hub>) -> Option<Self> {
        tokio::runtime::Handle::try_current().ok()?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Broadcast>();
        let backlog = Arc::new(Backlog::new(MAX_QUEUED, MAX_QUEUED_BYTES));
        let left = backlog.clone();
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                let mut frames = HashMap::new();
                let mut slice = Slice::new(SLICE);
                for session in &b.sessions {
                    let Some(hub) = hub.upgrade() else { return };
                    hub.offer_global(&b.event, &mut frames, session);
                    drop(hub);
                    if slice.over() {
                        tokio::task::yield_now().await;
                    }
                }
                left.done(b.bytes);
            }
        });
        Some(Self { tx, backlog })
    }
}

impl Hub {
    /// Sends a global event to every session, with each session's own project filled in.
    /// The frame is encoded once per distinct scope, not once per session.
    /// An event that names its own `project_id` (a global type's) keeps it: one frame for
    /// every session. Beyond `INLINE_MAX` sessions the offers run on the broadcast task
    /// in slices; returns the number of sessions it is for either way.
    pub fn broadcast(&self, event: &Map<String, Value>) -> usize {
        let mut sessions = self.sessions();
        // Global events belong to the project service: a story socket carries the seed's
        // progress objects only (docs/protocol.md §9).
        sessions.retain(|s| !s.is_raw());
        let n = sessions.len();
        self.stats.delivered.fetch_add(n as u64, Ordering::Relaxed);
        match &self.broadcasts {
            Some(queue) if n > INLINE_MAX || queue.backlog.items() > 0 => {
                let bytes = n * std::mem::size_of::<Arc<Session>>()
                    + serde_json::to_vec(event).map_or(0, |v| v.len());
                queue.backlog.add(bytes);
                let b = Broadcast {
                    event: event.clone(),
                    sessions,
                    bytes,
                };
                if queue.tx.send(b).is_err() {
                    queue.backlog.done(bytes);
                }
            }
            _ => {
                let mut frames = HashMap::new();
                for session in &sessions {
                    self.offer_global(event, &mut frames, session);
                }
            }
        }
        n
    }

    /// Offers a global event to one session, with the frame of its scope (encoded once per
    /// scope in `frames`).
    fn offer_global(
        &self,
        event: &Map<String, Value>,
        frames: &mut HashMap<String, Bytes>,
        session: &Arc<Session>,
    ) {
        let own_scope = event.contains_key("project_id");
        let key = if own_scope {
            String::new()
        } else {
            session.scope_key()
        };
        let frame = frames
            .entry(key)
            .or_insert_with(|| {
                let mut ev = event.clone();
                if !own_scope {
                    session.fill_scope(&mut ev);
                }
                fill_timestamp(&mut ev);
                event::server_frame(&Value::Object(ev))
            })
            .clone();
        session.offer_event(frame, None, &self.stats);
    }

    /// Parses a payload from `websocket:broadcast` and routes it as the seed's
    /// `_handle_redis_event` does (docs/protocol.md §3): an event naming a `project_id` goes to the
    /// connections following that project only (once each, `/ws/user` ones included) and
    /// keeps its `project_id`; one without goes to every connection, each with its own.
    pub fn broadcast_raw(&self, payload: &[u8]) -> Result<usize, event::EventError> {
        let (target, map) = self.check_global(payload)?;
        Ok(match target {
            None => self.broadcast(&map),
            Some(project) => {
                let prepared = Prepared {
                    frame: event::server_frame(&Value::Object(map)),
                    conflate: None,
                    seq: None,
                    epoch: None,
                };
                self.deliver(&project, &prepared)
            }
        })
    }

    /// The checks of a global event: its project (None: every project) and its fields,
    /// with `seq` removed (only the publish path assigns one, docs/protocol.md §3) and a
    /// `timestamp` set where it had none.
    fn check_global(
        &self,
        payload: &[u8],
    ) -> Result<(Option<String>, Map<String, Value>), event::EventError> {
        event::check_depth(payload, &self.policy)?;
        let value: Value =
            serde_json::from_slice(payload).map_err(|_| event::EventError::NotJson)?;
        let Value::Object(mut map) = value else {
            return Err(event::EventError::NotObject);
        };
        let Some(Value::String(kind)) = map.get("type") else {
            return Err(event::EventError::MissingType);
        };
        let kind = kind.clone();
        let target = match map.get("project_id") {
            // A global type goes to everyone; its project_id (checked below) stays in it.
            Some(Value::String(p)) if crate::schema::is_global(&kind) => {
                if !crate::project::valid_project_id(p) {
                    return Err(event::EventError::BadProjectId);
                }
                None
            }
            None => None,
            Some(Value::Null) => {
                map.remove("project_id");
                None
            }
            Some(Value::String(p)) if crate::project::valid_project_id(p) => Some(p.clone()),
            Some(_) => return Err(event::EventError::BadProjectId),
        };
        map.remove("seq");
        if let Some(Value::String(t)) = map.get("timestamp") {
            if !event::is_date_time(t) {
                return Err(event::EventError::BadTimestamp);
            }
        }
        let value = Value::Object(map);
        self.policy.check_global_value(&kind, &value)?;
        let Value::Object(mut map) = value else {
            return Err(event::EventError::NotObject);
        };
        fill_timestamp(&mut map);
        Ok((target, map))
    }
}

/// The gateway's own timestamp where a global event has none, or a null or any other
/// non-string one (docs/protocol.md §8).
fn fill_timestamp(map: &mut Map<String, Value>) {
    if !matches!(map.get("timestamp"), Some(Value::String(_))) {
        map.insert("timestamp".into(), Value::String(event::now_rfc3339()));
    }
}

impl Session {
    /// Sessions with the same key get the same frame (their scope fields are equal).
    fn scope_key(&self) -> String {
        match &self.scope {
            Scope::Project(p) => p.clone(),
            Scope::User => format!("\0user:{}", self.projects().join(",")),
            // Never sent global events (see `broadcast`); one key for all.
            Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => String::from("\0raw"),
        }
    }
}
