//! Revoked sessions: connections authenticated by `session:{id}` follow what Redis says.
//!
//! A JWT is checked once and ends at its `exp`; a server-side session can be revoked at any
//! time by deleting its key (log out, password change, an admin). Each session-authenticated
//! connection is rechecked once per `auth.session_recheck_secs`, in its own second of that
//! interval: the shared timer ([`crate::heartbeat`]) hands each tick's due connections to
//! one background check, which reads their distinct session ids with one MGET per
//! [`BATCH`] ids, never one timer or one Redis call per connection, and never every
//! connection at once (issue 13). Then, per connection:
//! - key gone, unreadable, or for another user: `connection.closed` and close 4001;
//! - the session no longer grants one of the connection's projects, and the authorization
//!   hook (if any, docs/protocol.md §10) does not allow it either: close 4003;
//! - otherwise the connection adopts the stored grants and `expires_at` (the timer closes
//!   with 4004 at that time; an extended session extends the connection).
//!
//! Redis unreachable: nobody is closed (an outage must not log everyone out) and the
//! failure is logged once until a check succeeds again. At most one check runs at a time;
//! its memory is a list of the checked connections and ids, dropped when it ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchboard_middleware::{Claims, CredentialKind, SessionRecord};

use crate::app::App;
use crate::authz::{Authorizer, Kind};
use crate::broker::BrokerError;
use crate::hub::Hub;
use crate::session::Session;
use crate::ws::close_code;

/// Session ids per MGET round trip.
pub const BATCH: usize = 500;

/// The shared timer's handle on the recheck.
pub struct SessionRecheck {
    every: Duration,
    /// Connections due while a check was running: taken by the next one.
    pending: Vec<Arc<Session>>,
    /// A check is in flight: the next one waits for it rather than piling up.
    running: Arc<AtomicBool>,
    /// The last check could not reach Redis (so the next failure is not logged again).
    failing: Arc<AtomicBool>,
}

impl SessionRecheck {
    /// None when the recheck is off (`auth.session_recheck_secs = 0`) or the broker has no
    /// sessions at all (the embedded one).
    pub fn new(app: &App) -> Option<Self> {
        let secs = app.config.auth.session_recheck_secs;
        if secs == 0 || app.broker.session_store().is_none() {
            return None;
        }
        Some(Self {
            every: Duration::from_secs(secs),
            pending: Vec::new(),
            running: Arc::new(AtomicBool::new(false)),
            failing: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Seconds between two rechecks of one connection.
    pub fn every_secs(&self) -> u64 {
        self.every.as_secs().max(1)
    }

    /// Called on every tick of the shared timer with the connections whose recheck is due
    /// (each has its own second of the interval, so a tick carries a slice of them); starts
    /// a background check of those, and of any left waiting, unless one is running.
    pub fn tick(&mut self, app: &Arc<App>, due: Vec<Arc<Session>>) {
        // A connection due again while it still waits (a check slower than the interval:
        // Redis timing out) is kept once, so the list never exceeds the connections.
        if self.pending.is_empty() {
            self.pending = due;
        } else {
            let waiting: std::collections::HashSet<*const Session> =
                self.pending.iter().map(Arc::as_ptr).collect();
            self.pending.extend(
                due.into_iter()
                    .filter(|s| !waiting.contains(&Arc::as_ptr(s))),
            );
        }
        if self.pending.is_empty() || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let sessions = std::mem::take(&mut self.pending);
        let app = app.clone();
        let running = self.running.clone();
        let failing = self.failing.clone();
        tokio::spawn(async move {
            check(&app, sessions, &failing).await;
            running.store(false, Ordering::Release);
        });
    }
}

/// One pass over a slice of this instance's session-authenticated connections.
async fn check(app: &App, sessions: Vec<Arc<Session>>, failing: &AtomicBool) {
    let mut by_id: HashMap<String, Vec<Arc<Session>>> = HashMap::new();
    for session in sessions {
        if session.outbox.is_closing() || session.is_ended() {
            continue;
        }
        if let Some(id) = session.recheck_session_id() {
            let id = id.to_owned();
            by_id.entry(id).or_default().push(session);
        }
    }
    if by_id.is_empty() {
        return;
    }
    let ids: Vec<&str> = by_id.keys().map(String::as_str).collect();
    let mut outcome: Result<(), BrokerError> = Ok(());
    for chunk in ids.chunks(BATCH) {
        match app.broker.session_values(chunk).await {
            Ok(values) => {
                for (id, value) in chunk.iter().zip(values) {
                    for session in &by_id[*id] {
                        apply(&app.authz, &app.hub, session, value.as_deref()).await;
                    }
                }
            }
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    match outcome {
        Err(e) => {
            if !failing.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    error = %e,
                    "session recheck cannot reach Redis: connections stay open until it answers"
                );
            }
        }
        Ok(()) => {
            if failing.swap(false, Ordering::AcqRel) {
                tracing::info!("session recheck reaches Redis again");
            }
        }
    }
}

/// What the stored value of a connection's session means for it.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Still valid; adopt these grants and expiry if they changed.
    Keep(SessionRecord),
    /// Gone, unreadable or not this user's any more: 4001.
    Revoked,
    /// Valid but does not grant one of the connection's projects (or stories): 4003,
    /// unless the authorization hook allows them (docs/protocol.md §10).
    Narrowed(SessionRecord),
}

fn verdict(session: &Session, value: Option<&str>) -> Verdict {
    let Some(record) = value.and_then(|v| serde_json::from_str::<SessionRecord>(v).ok()) else {
        return Verdict::Revoked;
    };
    if record.user_id != session.user_id() {
        return Verdict::Revoked;
    }
    let all = record.projects.iter().any(|g| g == "*");
    // A story connection's ids are stories (docs/protocol.md §9): granted by `stories`.
    let granted = if session.is_story() {
        &record.stories
    } else {
        &record.projects
    };
    let grants = |p: &String| all || granted.iter().any(|g| g == p || g == "*");
    if !session.projects().iter().all(grants) {
        return Verdict::Narrowed(record);
    }
    Verdict::Keep(record)
}

/// Applies the stored value of the connection's session: closes it (4001/4003) or adopts
/// the stored grants. Also used by the command path, which reads the session again before
/// relaying. Returns whether the connection stays open.
///
/// What the stored session does not grant, the authorization hook may (a connection the
/// hook let in is not "narrowed" by a session that never named its project): those ids
/// are asked through `authz` (cached). A hook that fails closes nobody, as an unreachable
/// Redis does not.
pub async fn apply(
    authz: &Authorizer,
    hub: &Hub,
    session: &Arc<Session>,
    value: Option<&str>,
) -> bool {
    // The check ran concurrently with the connection: it may have refreshed to a JWT since.
    if session.recheck_session_id().is_none() {
        return true;
    }
    let record = match verdict(session, value) {
        Verdict::Revoked => {
            // In the connection's span, like everything logged about a connection.
            session.span().in_scope(|| {
                tracing::info!(client_id = %session.client_id, "session revoked: closing (4001)");
            });
            session.close(close_code::UNAUTHENTICATED, "session revoked", false);
            return false;
        }
        Verdict::Keep(record) => record,
        Verdict::Narrowed(record) => {
            let claims = claims_of(&record);
            let kind = if session.is_story() {
                Kind::Story
            } else {
                Kind::Project
            };
            match authz.allows_all(&claims, kind, &session.projects()).await {
                Ok(true) => {}
                Ok(false) => {
                    session.span().in_scope(|| {
                        tracing::info!(client_id = %session.client_id, "session narrowed: closing (4003)");
                    });
                    session.close(
                        close_code::FORBIDDEN,
                        "session no longer grants this project",
                        false,
                    );
                    return false;
                }
                Err(e) => {
                    session.span().in_scope(|| {
                        tracing::warn!(error = %e, "session recheck: the hook failed; connection kept");
                    });
                }
            }
            // Refreshed to a JWT while the hook answered: that credential stays.
            if session.recheck_session_id().is_none() {
                return true;
            }
            record
        }
    };
    let current = session.claims();
    if current.projects != record.projects
        || *current.stories != *record.stories
        || current.exp != record.expires_at
    {
        if let Some(sooner) = session.set_claims(Arc::new(claims_of(&record))) {
            hub.check_at(session, sooner);
        }
    }
    true
}

fn claims_of(record: &SessionRecord) -> Claims {
    Claims {
        sub: record.user_id.clone(),
        projects: record.projects.clone(),
        stories: record.stories.clone().into_boxed_slice(),
        role: None,
        exp: record.expires_at,
        kind: CredentialKind::Session,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session_of(user: &str, projects: &[&str]) -> Arc<Session> {
        let claims = Claims {
            sub: user.into(),
            projects: vec!["*".into()],
            stories: Default::default(),
            role: None,
            exp: None,
            kind: CredentialKind::Session,
        };
        let s = Session::new(
            "c".into(),
            Arc::new(claims),
            crate::session::Scope::User,
            projects.iter().map(|p| p.to_string()).collect(),
            [127, 0, 0, 1].into(),
            None,
            crate::session::outbox::Limits {
                messages: 8,
                bytes: 4096,
            },
        );
        s.set_session_id("sid");
        s
    }

    #[test]
    fn verdicts() {
        let s = session_of("u", &["a", "b"]);
        assert_eq!(verdict(&s, None), Verdict::Revoked);
        assert_eq!(verdict(&s, Some("not json")), Verdict::Revoked);
        assert_eq!(
            verdict(&s, Some(r#"{"user_id":"other","projects":["*"]}"#)),
            Verdict::Revoked
        );
        assert!(matches!(
            verdict(&s, Some(r#"{"user_id":"u","projects":["a"]}"#)),
            Verdict::Narrowed(_)
        ));
        assert!(matches!(
            verdict(&s, Some(r#"{"user_id":"u","projects":["a","b","c"]}"#)),
            Verdict::Keep(_)
        ));
        assert!(matches!(
            verdict(&s, Some(r#"{"user_id":"u","projects":["*"]}"#)),
            Verdict::Keep(_)
        ));
    }

    fn no_hook() -> Authorizer {
        Authorizer::without_hook(100)
    }

    fn hub() -> Arc<Hub> {
        Hub::standalone(crate::schema::Policy::default())
    }

    #[tokio::test]
    async fn kept_sessions_adopt_the_stored_grants_and_expiry() {
        let s = session_of("u", &["a"]);
        apply(
            &no_hook(),
            &hub(),
            &s,
            Some(r#"{"user_id":"u","projects":["a","b"],"expires_at":4102444800}"#),
        )
        .await;
        assert!(!s.outbox.is_closing());
        assert_eq!(s.claims().projects, vec!["a", "b"]);
        assert_eq!(s.expires_at(), Some(4_102_444_800));
        apply(&no_hook(), &hub(), &s, None).await;
        assert!(
            s.outbox.is_closing(),
            "a deleted session closes the connection"
        );
    }

    #[tokio::test]
    async fn a_narrowed_session_closes_4003_without_a_hook() {
        let s = session_of("u", &["a", "b"]);
        assert!(
            !apply(
                &no_hook(),
                &hub(),
                &s,
                Some(r#"{"user_id":"u","projects":["a"]}"#)
            )
            .await
        );
        assert!(s.outbox.is_closing());
    }

    #[tokio::test]
    async fn a_connection_refreshed_to_a_jwt_is_not_rechecked() {
        let s = session_of("u", &["a"]);
        s.set_claims(Arc::new(Claims {
            sub: "u".into(),
            projects: vec!["a".into()],
            stories: Default::default(),
            role: None,
            exp: None,
            kind: CredentialKind::Jwt,
        }));
        assert_eq!(s.recheck_session_id(), None);
        apply(&no_hook(), &hub(), &s, None).await;
        assert!(!s.outbox.is_closing());
    }
}
