//! One WebSocket connection's state after the upgrade.
//!
//! A [`Session`] is the part of a connection the rest of the gateway may touch: its
//! identity, its projects, its credential, its [`outbox::Outbox`] (inline writes, then a
//! bounded queue), its liveness clock and its end flag. The one task per connection
//! (`connection::task`) reads client frames and drains the outbox when the socket was
//! full; nobody ever awaits the socket on the fan-out path. Closing is always the same path:
//! queue the closing frames ([`Session::close`]), let them drain, and drop the socket if the
//! client does not finish the close within [`CLOSE_DEADLINE`].
//!
//! Invariants: until [`Session::greet`], whatever is offered waits, so the greeting is
//! the first thing the client reads; a session deals in frames only: which events it gets,
//! and which of them a greeting covered, is decided by the hub and the project's stream
//! (it knows nothing about seqs); server messages are built from the typed registry
//! ([`Session::encode`]).

pub mod outbox;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{json, Map, Value};
use switchboard_middleware::Claims;

use crate::event;
use crate::metrics::DeliveryStats;
use crate::schema::types::{ConnectionClosed, ContainerReconnect};
use crate::schema::ServerMessage;
use crate::ws::close_code;
use crate::ws::frame;
use outbox::{Limits, Offer, Outbox};

/// How long a closing connection may take to flush and finish the close handshake
/// before its socket is dropped.
pub const CLOSE_DEADLINE: Duration = Duration::from_secs(3);

/// The span of one connection: `client_id`, `project_id` (or `projects` on `/ws/user`, as
/// granted at connect), `peer` (the TCP peer, `ip:port`) and, behind a trusted proxy,
/// `client_ip`. A root span: the handshake's request span ends with the 101, the connection
/// goes on. Info level: connection lifecycle is info, and a disabled span costs nothing.
pub fn connection_span(
    client_id: &str,
    scope: &Scope,
    projects: &[String],
    peer: Option<std::net::SocketAddr>,
    client_ip: IpAddr,
) -> tracing::Span {
    let span = tracing::info_span!(
        parent: None,
        "conn",
        client_id,
        project_id = tracing::field::Empty,
        projects = tracing::field::Empty,
        story_id = tracing::field::Empty,
        stories = tracing::field::Empty,
        peer = tracing::field::Empty,
        client_ip = tracing::field::Empty,
    );
    match scope {
        Scope::Project(p) => span.record("project_id", p.as_str()),
        Scope::User => span.record("projects", projects.join(",")),
        Scope::Story(s) => span.record("story_id", s.as_str()),
        Scope::UserStories => span.record("stories", projects.join(",")),
        Scope::Commands(p) => span.record("project_id", p.as_str()),
    };
    match peer {
        Some(peer) => {
            span.record("peer", tracing::field::display(peer));
            if peer.ip() != client_ip {
                span.record("client_ip", tracing::field::display(client_ip));
            }
        }
        None => {
            span.record("peer", tracing::field::display(client_ip));
        }
    }
    span
}

/// What the connection was opened for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `/ws/{project_id}`
    Project(String),
    /// `/ws/user`: every project of the credential.
    User,
    /// `/ws/stories/{story_id}/progress` (docs/protocol.md §9).
    Story(String),
    /// `/ws/user/stories`: every story of the user.
    UserStories,
    /// `GET /v1/projects/{id}/commands`: a worker taking the project's commands
    /// (docs/protocol.md §6).
    Commands(String),
}

pub struct Session {
    pub client_id: String,
    pub scope: Scope,
    /// The client's address (behind trusted proxies, the one they report).
    pub ip: IpAddr,
    /// The TCP peer, for the connection's log span.
    peer: Option<SocketAddr>,
    /// Milliseconds since the UNIX epoch ([`Session::connected_at`] formats it: kept as a
    /// number because every idle connection carries it).
    connected_at_ms: u64,
    projects: Mutex<Vec<String>>,
    /// The credential in force (replaced by `auth.refresh`); decides `subscribe`.
    claims: Mutex<Arc<Claims>>,
    /// The server-side session (`session:{id}`) the connection authenticated with, if any.
    /// The shared timer rechecks it while that session is the credential in force.
    session_id: OnceLock<Box<str>>,
    pub outbox: Outbox,
    /// Milliseconds since the UNIX epoch of the last frame from the client.
    last_seen_ms: AtomicU64,
    /// Story sockets: seconds after `connected_at_ms` of the client's last text message
    /// (the seed's keepalive counts text silence, not pongs). 4 bytes that fit in the
    /// struct's padding: the session did not grow.
    last_text_s: std::sync::atomic::AtomicU32,
    /// Credential expiry, UNIX seconds; 0 = none.
    expires_at: AtomicU64,
    /// Set when the connection must end at once (abort) or has ended.
    ended: AtomicBool,
    /// While the greeting is being prepared, frames offered to the session (global events)
    /// wait here so the greeting is the first thing the client reads. None once greeted.
    /// (Project events wait in the hub, which knows which of them the greeting covers.)
    gate: Mutex<Option<Vec<Gated>>>,
    gated: AtomicBool,
}

impl Session {
    /// The connection's log span (client_id, project, peer), built when something is
    /// logged about it: a span kept for the connection's life costs ~0.5 KB of subscriber
    /// state per idle connection (measured), and connections log rarely.
    pub fn span(&self) -> tracing::Span {
        connection_span(
            &self.client_id,
            &self.scope,
            &self.projects(),
            self.peer,
            self.ip,
        )
    }

    /// The user the credential names (`auth.refresh` cannot change it).
    pub fn user_id(&self) -> String {
        self.claims.lock().sub.clone()
    }

    /// When the connection was established, RFC 3339 (UTC, ms).
    pub fn connected_at(&self) -> String {
        event::rfc3339_from_millis(self.connected_at_ms)
    }
}

/// [`Session::beat_phase`] of a connection made at `connected_at_ms`.
fn beat_phase_of(connected_at_ms: u64, slots: u64) -> u64 {
    // splitmix64's finalizer: consecutive milliseconds land far apart.
    let mut z = connected_at_ms.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) % slots.max(1)
}

/// A `subscribe` beyond `ws.max_subscriptions_per_connection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this connection follows as many projects as it may")]
pub struct ProjectsFull;

/// A frame held back while the session's greeting is prepared.
struct Gated {
    frame: Bytes,
    conflate: Option<u64>,
}

impl Session {
    pub fn new(
        client_id: String,
        claims: Arc<Claims>,
        scope: Scope,
        projects: Vec<String>,
        ip: IpAddr,
        peer: Option<SocketAddr>,
        limits: Limits,
    ) -> Arc<Self> {
        Arc::new(Self {
            client_id,
            scope,
            ip,
            peer,
            connected_at_ms: event::unix_millis(),
            projects: Mutex::new(projects),
            outbox: Outbox::new(limits),
            last_seen_ms: AtomicU64::new(event::unix_millis()),
            last_text_s: std::sync::atomic::AtomicU32::new(0),
            expires_at: AtomicU64::new(claims.expires_at().unwrap_or(0)),
            claims: Mutex::new(claims),
            session_id: OnceLock::new(),
            ended: AtomicBool::new(false),
            gate: Mutex::new(None),
            gated: AtomicBool::new(false),
        })
    }

    /// Holds what is offered back until [`Session::greet`]. Call before joining projects.
    pub fn hold(&self) {
        *self.gate.lock() = Some(Vec::new());
        self.gated.store(true, Ordering::Release);
    }

    /// Whether the greeting is not out yet.
    pub fn is_held(&self) -> bool {
        self.gated.load(Ordering::Acquire)
    }

    /// Queues the greeting's frames first, then what was held, and lets frames flow.
    pub fn greet(&self, front: Vec<Bytes>, stats: &DeliveryStats) {
        let mut gate = self.gate.lock();
        let held = gate.take().unwrap_or_default();
        // Straight into the outbox: the gate lock is held, so newly offered frames wait
        // and land after these.
        for frame in front {
            self.outbox.offer_exempt(frame);
        }
        for g in held {
            self.offer_direct(g.frame, g.conflate, Some(stats));
        }
        self.gated.store(false, Ordering::Release);
    }

    #[cfg(test)]
    pub fn new_for_test(project: &str, limits: Limits) -> Arc<Self> {
        let claims = Claims {
            sub: "u".into(),
            projects: vec![project.into()],
            stories: Default::default(),
            role: None,
            exp: None,
            kind: switchboard_middleware::CredentialKind::Jwt,
        };
        Self::new(
            uuid::Uuid::new_v4().to_string(),
            Arc::new(claims),
            Scope::Project(project.into()),
            vec![project.into()],
            IpAddr::from([127, 0, 0, 1]),
            None,
            limits,
        )
    }

    pub fn claims(&self) -> Arc<Claims> {
        self.claims.lock().clone()
    }

    /// Records the session id the handshake authenticated with (once; later calls ignored).
    pub fn set_session_id(&self, id: &str) {
        let _ = self.session_id.set(id.into());
    }

    /// The session to recheck: the handshake's session id, while the credential in force
    /// is still that session (an `auth.refresh` to a JWT ends the recheck).
    pub fn recheck_session_id(&self) -> Option<&str> {
        let id = self.session_id.get()?;
        (self.claims.lock().kind == switchboard_middleware::CredentialKind::Session).then_some(id)
    }

    /// Installs a refreshed credential and its expiry. Returns the new expiry when it is
    /// sooner than the one in force (or there was none): the shared timer must be told
    /// (`Hub::check_at`), as it looks at the connection at the deadlines it knew.
    pub fn set_claims(&self, claims: Arc<Claims>) -> Option<u64> {
        let before = self.expires_at();
        let after = claims.expires_at();
        self.set_expires_at(after);
        *self.claims.lock() = claims;
        after.filter(|a| before.is_none_or(|b| a < &b))
    }

    pub fn projects(&self) -> Vec<String> {
        self.projects.lock().clone()
    }

    pub fn has_project(&self, project: &str) -> bool {
        self.projects.lock().iter().any(|p| p == project)
    }

    /// Records `project` unless the connection already follows `max` projects: Ok(false)
    /// if it was already there, [`ProjectsFull`] when full. The cap bounds what one
    /// connection can make this instance subscribe to (hub slots, broker channels,
    /// presence entries).
    pub fn add_project(&self, project: &str, max: usize) -> Result<bool, ProjectsFull> {
        let mut projects = self.projects.lock();
        if projects.iter().any(|p| p == project) {
            return Ok(false);
        }
        if projects.len() >= max {
            return Err(ProjectsFull);
        }
        projects.push(project.to_owned());
        Ok(true)
    }

    pub fn remove_project(&self, project: &str) -> bool {
        let mut projects = self.projects.lock();
        let before = projects.len();
        projects.retain(|p| p != project);
        before != projects.len()
    }

    /// The project commands and replies refer to when a message names none.
    pub fn primary_project(&self) -> Option<String> {
        match &self.scope {
            Scope::Project(p) => Some(p.clone()),
            Scope::User | Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => None,
        }
    }

    /// Connection-level frames carry `project_id`, or `projects` on `/ws/user` (§8).
    pub fn fill_scope(&self, map: &mut Map<String, Value>) {
        match &self.scope {
            Scope::Project(p) => {
                map.insert("project_id".into(), Value::String(p.clone()));
            }
            Scope::User => {
                map.insert("projects".into(), json!(self.projects()));
            }
            // Story and command sockets carry what was published only, never gateway
            // messages; nothing to fill.
            Scope::Story(_) | Scope::UserStories | Scope::Commands(_) => {}
        }
    }

    /// A story progress connection (docs/protocol.md §9): its ids are story ids, it is
    /// sent the published progress objects only (no gateway message, not even on close),
    /// and it reads the seed's text `ping` / `status`.
    pub fn is_story(&self) -> bool {
        matches!(self.scope, Scope::Story(_) | Scope::UserStories)
    }

    /// A worker's command stream (docs/protocol.md §6): it is sent its project's commands,
    /// as published, and nothing else.
    pub fn is_commands(&self) -> bool {
        matches!(self.scope, Scope::Commands(_))
    }

    /// A connection that carries published payloads only (story progress, commands): no
    /// gateway message ever goes to it, not even on close (the close frame says why).
    pub fn is_raw(&self) -> bool {
        self.is_story() || self.is_commands()
    }

    /// The projects this connection is present in (`project:{id}:presence`): none for a
    /// story connection, whose ids are stories, nor for a worker's command stream.
    pub fn presence_projects(&self) -> Vec<String> {
        if self.is_raw() {
            Vec::new()
        } else {
            self.projects()
        }
    }

    /// Encodes a typed server message for this connection: `project` names the project it
    /// is about when that is not simply the connection's own scope (filled in otherwise),
    /// and the timestamp is set.
    pub fn encode<M: ServerMessage>(&self, m: &M, project: Option<&str>) -> Bytes {
        let mut map = m.to_message();
        if let Some(p) = project {
            map.insert("project_id".into(), Value::String(p.to_owned()));
        }
        self.message(Value::Object(map))
    }

    /// Queues a typed server message (see [`Session::encode`]), bounded like events.
    pub fn send<M: ServerMessage>(&self, m: &M, project: Option<&str>) {
        self.send_frame(self.encode(m, project));
    }

    /// Encodes a server message for this connection, with scope and timestamp filled in.
    pub fn message(&self, mut value: Value) -> Bytes {
        if let Value::Object(map) = &mut value {
            if !map.contains_key("project_id") && !map.contains_key("projects") {
                self.fill_scope(map);
            }
            if !map.contains_key("timestamp") {
                map.insert("timestamp".into(), Value::String(event::now_rfc3339()));
            }
        }
        event::server_frame(&value)
    }

    /// How long the connection has been open at `now_ms` (UNIX milliseconds).
    pub fn age(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.connected_at_ms))
    }

    pub fn touch(&self) {
        self.last_seen_ms
            .store(event::unix_millis(), Ordering::Relaxed);
    }

    /// The second of each heartbeat interval (0..`slots`) at which this connection beats:
    /// spread over the interval by a hash of its connect time (a connect storm spreads
    /// over its milliseconds), so one tick never beats every connection at once.
    pub fn beat_phase(&self, slots: u64) -> u64 {
        beat_phase_of(self.connected_at_ms, slots)
    }

    /// A story client sent a text message now (see [`Session::text_silence`]).
    pub fn note_text(&self, now_ms: u64) {
        let secs = now_ms.saturating_sub(self.connected_at_ms) / 1000;
        self.last_text_s
            .store(u32::try_from(secs).unwrap_or(u32::MAX), Ordering::Relaxed);
    }

    /// How long the client has sent no text message (since it connected, if it never did).
    /// Seed 003's keepalive counts this, not frames: browsers answer WebSocket pings by
    /// themselves, so a pong says nothing about the page.
    pub fn text_silence(&self, now_ms: u64) -> Duration {
        let last =
            self.connected_at_ms + u64::from(self.last_text_s.load(Ordering::Relaxed)) * 1000;
        Duration::from_millis(now_ms.saturating_sub(last))
    }

    pub fn idle_for(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed)))
    }

    pub fn expires_at(&self) -> Option<u64> {
        match self.expires_at.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    pub fn set_expires_at(&self, at: Option<u64>) {
        self.expires_at.store(at.unwrap_or(0), Ordering::Relaxed);
    }

    /// Queues an event frame (held until the greeting while [`Session::hold`]ing); closes
    /// the connection as a slow consumer on overflow.
    pub fn offer_event(&self, frame: Bytes, conflate: Option<u64>, stats: &DeliveryStats) {
        if self.gated.load(Ordering::Acquire) {
            let mut gate = self.gate.lock();
            if let Some(held) = gate.as_mut() {
                if held.len() < self.outbox.limits().messages {
                    held.push(Gated { frame, conflate });
                } else {
                    // Too much arrived before the greeting was ready: like a full queue.
                    *gate = None;
                    self.gated.store(false, Ordering::Release);
                    drop(gate);
                    self.close_slow(stats);
                }
                return;
            }
        }
        self.offer_direct(frame, conflate, Some(stats));
    }

    /// Closes the connection as a slow consumer (4500), counted once.
    pub fn close_slow(&self, stats: &DeliveryStats) {
        if self.close(
            close_code::SLOW_CONSUMER,
            "slow consumer: outbound queue full",
            true,
        ) {
            stats.slow_closes.fetch_add(1, Ordering::Relaxed);
            // Logged from the fan-out's task, in the connection's span; client_id is
            // repeated for filters above the span's level (warn), where the span is
            // disabled.
            self.span().in_scope(|| {
                tracing::warn!(client_id = %self.client_id, "slow consumer closed (4500)");
            });
        }
    }

    fn offer_direct(&self, frame: Bytes, conflate: Option<u64>, stats: Option<&DeliveryStats>) {
        match self.outbox.offer(frame, conflate) {
            Offer::Written | Offer::Queued | Offer::Closed => {}
            Offer::Conflated => {
                if let Some(stats) = stats {
                    stats.conflated.fetch_add(1, Ordering::Relaxed);
                }
            }
            Offer::Overflow => match stats {
                Some(stats) => self.close_slow(stats),
                None => {
                    self.close(
                        close_code::SLOW_CONSUMER,
                        "slow consumer: outbound queue full",
                        true,
                    );
                }
            },
        }
    }

    /// Queues a reply to the client (same bounds as events).
    pub fn reply(&self, value: Value) {
        self.send_frame(self.message(value));
    }

    /// Queues a message already encoded by [`Self::message`] (when its size matters first).
    pub fn send_frame(&self, frame: Bytes) {
        if self.outbox.offer(frame, None) == Offer::Overflow {
            self.close(
                close_code::SLOW_CONSUMER,
                "slow consumer: outbound queue full",
                true,
            );
        }
    }

    /// Queues a raw control frame (pong) to the client.
    pub fn send_control(&self, frame: Bytes) {
        if self.outbox.offer(frame, None) == Offer::Overflow {
            self.close(
                close_code::SLOW_CONSUMER,
                "slow consumer: outbound queue full",
                true,
            );
        }
    }

    /// Closes with `connection.closed` then a close frame. `discard_pending` drops queued
    /// events first (a slow consumer resumes from history). Returns false if the session
    /// was already closing.
    pub fn close(&self, code: u16, reason: &str, discard_pending: bool) -> bool {
        if self.is_raw() {
            // The seed's frontend reads every text frame as progress: the close frame
            // alone says why.
            return self.finish(&[frame::close(code, reason)], discard_pending);
        }
        let notice = self.encode(
            &ConnectionClosed {
                code,
                reason: reason.to_owned(),
                client_id: Some(self.client_id.clone()),
            },
            None,
        );
        self.finish(&[notice, frame::close(code, reason)], discard_pending)
    }

    /// Shutdown path: flush what is queued, then `container.reconnect`, then close 1012.
    pub fn close_for_restart(&self, reconnect_after_ms: u64) -> bool {
        if self.is_raw() {
            return self.finish(
                &[frame::close(close_code::RESTART, "server restart")],
                false,
            );
        }
        let notice = self.encode(
            &ContainerReconnect {
                message: Some("this gateway instance is restarting; reconnect and resume".into()),
                reconnect_after_ms: Some(reconnect_after_ms),
            },
            None,
        );
        self.finish(
            &[notice, frame::close(close_code::RESTART, "server restart")],
            false,
        )
    }

    /// Answers a client's Close frame and ends (RFC 6455 §5.5.1, §7.4): a valid code is
    /// echoed (its reason dropped), an empty body gets an empty close, and an invalid Close
    /// fails the connection with 1002 (1007 for a reason that is not UTF-8) instead of being
    /// echoed, so the gateway never sends a code it may not send. No `connection.closed`
    /// notice: the client has already said it is leaving.
    pub fn close_echo(&self, payload: &[u8]) -> bool {
        let reply = match crate::ws::wire::close_request(payload) {
            crate::ws::wire::CloseRequest::Empty => frame::close_empty(),
            crate::ws::wire::CloseRequest::Code(code) => frame::close(code, ""),
            crate::ws::wire::CloseRequest::Invalid(code, reason) => frame::close(code, reason),
        };
        self.finish(&[reply], false)
    }

    fn finish(&self, frames: &[Bytes], discard_pending: bool) -> bool {
        // The connection task sees the outbox closing and bounds the rest by CLOSE_DEADLINE.
        self.outbox.close(frames, discard_pending)
    }

    /// Drops the connection at once, without a close handshake.
    pub fn abort(&self) {
        self.ended.store(true, Ordering::Release);
        self.outbox.wake();
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod size_tests {
    /// Every connection carries one: it must not grow unnoticed (issue 13 counts bytes per
    /// idle connection).
    #[test]
    fn beat_phases_of_a_connect_storm_spread_over_the_interval() {
        let mut per_slot = [0usize; 30];
        for ms in 0..3000u64 {
            per_slot[super::beat_phase_of(1_764_000_000_000 + ms, 30) as usize] += 1;
        }
        // 100 per slot on average; no slot empty or crowded.
        assert!(
            per_slot.iter().all(|n| (50..=150).contains(n)),
            "{per_slot:?}"
        );
    }

    #[test]
    fn a_session_stays_within_its_size() {
        assert!(
            std::mem::size_of::<super::Session>() <= 368,
            "{} bytes",
            std::mem::size_of::<super::Session>()
        );
    }
}
