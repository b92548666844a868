//! Server-side sessions: the credential browsers carry as a cookie.
//!
//! The gateway looks sessions up in Redis (`session:{id}` holding JSON, see docs/protocol.md §2)
//! through the object-safe [`SessionStore`] trait, so this crate stays free of a Redis client
//! and tests use [`MemorySessionStore`]. A store answers `Ok(None)` for an unknown id and
//! `Err(AuthError::SessionStoreUnavailable)` when it cannot tell (the difference between
//! 401 and 503); it logs the underlying cause itself, since clients must never see it.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::RwLock;

use serde::Deserialize;

use super::AuthError;

/// A session as stored: `{"user_id": "...", "projects": [...], "expires_at": <unix secs>}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SessionRecord {
    pub user_id: String,
    #[serde(default)]
    pub projects: Vec<String>,
    /// Story ids granted (docs/protocol.md §9).
    #[serde(default)]
    pub stories: Vec<String>,
    #[serde(default)]
    pub expires_at: Option<u64>,
}

/// Looks up a session by id.
pub trait SessionStore: Send + Sync + 'static {
    fn load<'a>(
        &'a self,
        id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Option<SessionRecord>, AuthError>> + Send + 'a>>;
}

/// In-process store for tests and the gateway's memory-broker mode.
#[derive(Default)]
pub struct MemorySessionStore {
    sessions: RwLock<HashMap<String, SessionRecord>>,
}

impl MemorySessionStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, id: impl Into<String>, record: SessionRecord) {
        self.write().insert(id.into(), record);
    }

    pub fn remove(&self, id: &str) -> Option<SessionRecord> {
        self.write().remove(id)
    }

    // A panic while holding the lock cannot leave a HashMap half-updated in a way that
    // matters here, so a poisoned lock is still usable.
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, SessionRecord>> {
        self.sessions.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl fmt::Debug for MemorySessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let len = self.sessions.read().map_or(0, |s| s.len());
        f.debug_struct("MemorySessionStore")
            .field("sessions", &len)
            .finish()
    }
}

impl SessionStore for MemorySessionStore {
    fn load<'a>(
        &'a self,
        id: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Option<SessionRecord>, AuthError>> + Send + 'a>> {
        let record = self
            .sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        Box::pin(async move { Ok(record) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json() {
        let full: SessionRecord = serde_json::from_str(
            r#"{"user_id": "u1", "projects": ["a", "*"], "expires_at": 1700000000, "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(
            full,
            SessionRecord {
                user_id: "u1".into(),
                projects: vec!["a".into(), "*".into()],
                stories: Vec::new(),
                expires_at: Some(1_700_000_000),
            }
        );
        let minimal: SessionRecord = serde_json::from_str(r#"{"user_id": "u2"}"#).unwrap();
        assert!(minimal.projects.is_empty() && minimal.expires_at.is_none());
        assert!(serde_json::from_str::<SessionRecord>(r#"{"projects": []}"#).is_err());
    }

    #[tokio::test]
    async fn memory_store() {
        let store = MemorySessionStore::new();
        assert_eq!(store.load("s").await, Ok(None));
        let record = SessionRecord {
            user_id: "u".into(),
            projects: vec![],
            stories: Vec::new(),
            expires_at: None,
        };
        store.insert("s", record.clone());
        assert_eq!(store.load("s").await, Ok(Some(record)));
        store.remove("s");
        assert_eq!(store.load("s").await, Ok(None));
    }
}
