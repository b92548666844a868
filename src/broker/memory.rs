//! The embedded broker: everything a single instance needs, in-process.
//!
//! Per project it keeps the seq, the epoch (new per process: a restarted embedded gateway
//! has lost its history, so clients must resync) and a bounded history ring. Publishing
//! assigns seqs, appends to the ring and hands the events to the sink under the project's lock,
//! which is what makes seq order and delivery order the same (the in-process equivalent of
//! the Lua script). Delivery itself never awaits.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::state::{ProjectState, Snapshot};
use super::{new_epoch, BrokerError, HistoryLimits, HistoryRead, Position, SinkSlot};
use crate::event;

/// Most bytes of story progress the embedded broker keeps (oldest forgotten first).
const STORY_BYTES: usize = 16 * 1024 * 1024;

/// Most stories it keeps progress for (each publish past 4,096 prunes, so keep it cheap).
const STORY_COUNT: usize = 16_384;

fn held_bytes(stories: &HashMap<String, (Instant, Bytes)>) -> usize {
    stories.values().map(|(_, p)| p.len()).sum()
}

struct ProjectLog {
    seq: u64,
    epoch: String,
    /// (seq, event JSON with seq) — oldest first, at most `history.max_len`.
    history: VecDeque<(u64, Bytes)>,
    last_publish: Instant,
    state: ProjectState,
}

pub struct MemoryBroker {
    pub(super) sink: SinkSlot,
    /// The latest progress of each story (the published JSON) and when it was stored.
    stories: Mutex<HashMap<String, (Instant, Bytes)>>,
    projects: Mutex<HashMap<String, ProjectLog>>,
    history: HistoryLimits,
}

impl MemoryBroker {
    pub fn new(history: HistoryLimits) -> Arc<Self> {
        Arc::new(Self {
            sink: SinkSlot::default(),
            stories: Mutex::new(HashMap::new()),
            projects: Mutex::new(HashMap::new()),
            history,
        })
    }

    fn log<'a>(projects: &'a mut HashMap<String, ProjectLog>, project: &str) -> &'a mut ProjectLog {
        projects
            .entry(project.to_owned())
            .or_insert_with(|| ProjectLog {
                seq: 0,
                epoch: new_epoch(),
                history: VecDeque::new(),
                last_publish: Instant::now(),
                state: ProjectState::default(),
            })
    }

    pub fn publish_events(
        &self,
        project: &str,
        events: Vec<Vec<u8>>,
    ) -> Result<Vec<u64>, BrokerError> {
        // All or nothing: refuse the batch before assigning any seq.
        for ev in &events {
            with_seq(ev, 0)?;
        }
        let mut projects = self.projects.lock();
        let log = Self::log(&mut projects, project);
        if log.last_publish.elapsed() > self.history.ttl && self.history.ttl > Duration::ZERO {
            // Age bound: an idle project's history is gone, like the Redis TTL.
            log.history.clear();
        }
        log.last_publish = Instant::now();
        let mut seqs = Vec::with_capacity(events.len());
        let mut batch = Vec::with_capacity(events.len());
        for ev in events {
            log.seq += 1;
            let body = with_seq(&ev, log.seq)?;
            // The publish API validated these events already.
            let prepared = event::prepare_project_event(project, &body, None)
                .map_err(|e| BrokerError::Protocol(e.to_string()))?;
            if let Ok(map) = serde_json::from_slice(&ev) {
                log.state.apply(&map);
            }
            log.history.push_back((log.seq, Bytes::from(body)));
            while log.history.len() > self.history.max_len {
                log.history.pop_front();
            }
            batch.push(prepared);
            seqs.push(log.seq);
        }
        // Still under the project lock: delivery order is seq order.
        if let Some(sink) = self.sink.get() {
            sink.deliver(project, &batch);
        }
        log.state.age_out(self.history.terminal_task_ttl);
        Ok(seqs)
    }

    pub fn publish_broadcast(&self, payload: &[u8]) -> Result<(), BrokerError> {
        match self.sink.get() {
            Some(sink) => sink
                .broadcast(payload)
                .map(|_| ())
                .map_err(|e| BrokerError::Protocol(e.to_string())),
            None => Ok(()),
        }
    }

    /// The story's latest progress, while younger than `stories.progress_ttl_secs`.
    pub fn story_progress(&self, story: &str) -> Option<Bytes> {
        let stories = self.stories.lock();
        let (at, payload) = stories.get(story)?;
        (at.elapsed() < self.history.story_ttl).then(|| payload.clone())
    }

    /// Stores the (checked) progress as the story's latest and delivers it, under one lock
    /// so the stored and the delivered order are the same.
    pub fn publish_story(&self, story: &str, payload: Vec<u8>) -> u64 {
        let mut stories = self.stories.lock();
        // Bounded in bytes: forget what has expired once the map holds many stories, and
        // if the live ones still exceed STORY_BYTES, the oldest (a TTL'd key is what Redis
        // would keep; the embedded broker has no eviction of its own).
        if stories.len() >= 4096 || held_bytes(&stories) + payload.len() > STORY_BYTES {
            let ttl = self.history.story_ttl;
            stories.retain(|_, (at, _)| at.elapsed() < ttl);
            while !stories.is_empty()
                && (stories.len() >= STORY_COUNT
                    || held_bytes(&stories) + payload.len() > STORY_BYTES)
            {
                let oldest = stories
                    .iter()
                    .min_by_key(|(_, (at, _))| *at)
                    .map(|(k, _)| k.clone());
                match oldest {
                    Some(k) => stories.remove(&k),
                    None => break,
                };
            }
        }
        let frame = crate::ws::frame::text(&payload);
        stories.insert(story.to_owned(), (Instant::now(), Bytes::from(payload)));
        let delivered = self
            .sink
            .get()
            .map_or(0, |s| s.deliver_story(story, &frame));
        delivered as u64
    }

    /// Hands a command to this instance's command streams of `project` (the workers
    /// that took `GET /v1/projects/{id}/commands`); returns how many got it.
    pub fn publish_command(&self, project: &str, payload: Vec<u8>) -> Result<u64, BrokerError> {
        let delivered = self
            .sink
            .get()
            .map_or(0, |s| s.deliver_command(project, &payload));
        Ok(delivered as u64)
    }

    pub fn position(&self, project: &str) -> Position {
        let mut projects = self.projects.lock();
        let log = Self::log(&mut projects, project);
        Position {
            seq: log.seq,
            epoch: log.epoch.clone(),
        }
    }

    /// The position and events with seq > `after`, oldest first, read atomically.
    pub fn history_after(&self, project: &str, after: u64) -> HistoryRead {
        let mut projects = self.projects.lock();
        let log = Self::log(&mut projects, project);
        // The newest contiguous run within the replay budget, like the Redis broker.
        let mut bytes = 0;
        let mut truncated = false;
        let mut events = Vec::new();
        for (seq, event) in log.history.iter().rev().take_while(|(s, _)| *s > after) {
            bytes += event.len();
            if bytes > self.history.replay_max_bytes {
                truncated = true;
                break;
            }
            events.push((*seq, event.clone()));
        }
        events.reverse();
        HistoryRead {
            position: Position {
                seq: log.seq,
                epoch: log.epoch.clone(),
            },
            earliest: log.history.front().map(|(s, _)| *s),
            events,
            truncated,
        }
    }

    pub fn snapshot(&self, project: &str) -> Snapshot {
        let mut projects = self.projects.lock();
        let log = Self::log(&mut projects, project);
        log.state
            .snapshot(log.seq, &log.epoch)
            .bounded(self.history.snapshot_max_bytes)
    }
}

/// Adds `"seq":N` to an event object, exactly as the Lua script does.
pub fn with_seq(event: &[u8], seq: u64) -> Result<Vec<u8>, BrokerError> {
    let trimmed = event.trim_ascii();
    if trimmed.first() != Some(&b'{') || trimmed.last() != Some(&b'}') {
        return Err(BrokerError::Protocol("event is not a JSON object".into()));
    }
    let inner = trimmed[1..trimmed.len() - 1].trim_ascii();
    let mut out = Vec::with_capacity(trimmed.len() + 24);
    out.push(b'{');
    if !inner.is_empty() {
        out.extend_from_slice(inner);
        out.push(b',');
    }
    out.extend_from_slice(b"\"seq\":");
    out.extend_from_slice(seq.to_string().as_bytes());
    out.push(b'}');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_is_spliced_in() {
        assert_eq!(
            with_seq(br#"{"type":"x"}"#, 7).unwrap(),
            br#"{"type":"x","seq":7}"#
        );
        assert_eq!(with_seq(b"{ }", 1).unwrap(), br#"{"seq":1}"#);
        assert!(with_seq(b"[1]", 1).is_err());
    }

    #[test]
    fn story_progress_is_bounded_in_bytes_keeping_the_newest() {
        let b = MemoryBroker::new(HistoryLimits {
            max_len: 3,
            ttl: Duration::from_secs(60),
            terminal_task_ttl: Duration::from_secs(60),
            snapshot_max_bytes: 1 << 20,
            story_ttl: Duration::from_secs(60),
            replay_max_bytes: 1 << 20,
        });
        let big = STORY_BYTES / 4 + 1;
        for i in 0..6 {
            b.publish_story(&format!("s{i}"), vec![b'x'; big]);
        }
        assert!(held_bytes(&b.stories.lock()) <= STORY_BYTES);
        assert!(b.story_progress("s5").is_some(), "the newest is kept");
        assert!(b.story_progress("s0").is_none(), "the oldest went first");
    }

    #[tokio::test]
    async fn seqs_are_per_project_and_history_is_bounded() {
        let b = MemoryBroker::new(HistoryLimits {
            max_len: 3,
            ttl: Duration::from_secs(60),
            terminal_task_ttl: Duration::from_secs(60),
            snapshot_max_bytes: 1 << 20,
            replay_max_bytes: 1 << 20,
            story_ttl: Duration::from_secs(60),
        });
        let ev = || br#"{"type":"x","project_id":"p","timestamp":"2026-01-01T00:00:00Z"}"#.to_vec();
        assert_eq!(b.publish_events("p", vec![ev(), ev()]).unwrap(), vec![1, 2]);
        assert_eq!(
            b.publish_events("q", vec![br#"{"type":"x"}"#.to_vec()])
                .unwrap(),
            vec![1]
        );
        b.publish_events("p", vec![ev(), ev(), ev()]).unwrap();
        let h = b.history_after("p", 0);
        assert_eq!(
            h.events.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(h.earliest, Some(3));
        assert_eq!(b.position("p").seq, 5);
        assert_ne!(b.position("p").epoch, b.position("q").epoch);
    }
}
