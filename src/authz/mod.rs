//! Authorization: may this credential, now, follow this project or story (docs/protocol.md
//! §10)?
//!
//! The order is fixed: a grant in the credential itself (`projects`, or `stories` for
//! stories; a list or `["*"]`) is enough; otherwise the app backend's hook decides when one
//! is configured (`auth.hook_url`); with neither, the answer is no. Lists (`/ws/user`,
//! `/ws/user/stories`) follow the same order: the ids the credential names, else the
//! hook's `list`, else none.
//!
//! Invariants:
//! - A hook that fails (timeout, refused connection, non-200, bad JSON, no free slot) is
//!   never a denial: callers get [`HookError`] and answer "try again" (1013 / 503), and the
//!   failure is counted in `switchboard_auth_hook_failures_total`.
//! - Every call is bounded: one deadline (`auth.hook_timeout_ms`) covers the wait for a
//!   slot and the request; at most `auth.hook_concurrency` calls run, and one user at most a
//!   quarter of them, so one user's storm of distinct ids cannot take the slots every other
//!   user needs.
//! - Identical questions asked at once share one call, and answers (allow, deny and lists)
//!   are cached for `auth.hook_cache_secs` in a cache bounded in entries and bytes.
//! - Callers decide when to ask: never for a request the rate limit or the connection
//!   caps already refused (the handshake asks after both).

mod cache;
mod hook;

use std::sync::Arc;

use switchboard_middleware::Claims;

pub use hook::HookError;

use crate::config::AuthConfig;
use crate::metrics::Metrics;
use crate::project::valid_project_id;

/// What is being followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Project,
    Story,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Project => "project",
            Kind::Story => "story",
        }
    }
}

/// The instance's authorizer: the credential's own grants, then the hook (if any).
pub struct Authorizer {
    hook: Option<Arc<hook::Hook>>,
    /// Longest list one connection may follow (`ws.max_subscriptions_per_connection`).
    max_list: usize,
}

impl Authorizer {
    /// `config` was validated ([`crate::config::Config::validate`]); an unusable hook URL
    /// there is a startup error, so this cannot fail.
    pub fn new(config: &AuthConfig, max_list: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            hook: config
                .hook_url
                .as_ref()
                .and_then(|url| hook::Hook::new(url, config, metrics)),
            max_list,
        }
    }

    /// No hook: only the credential decides.
    pub fn without_hook(max_list: usize) -> Self {
        Self {
            hook: None,
            max_list,
        }
    }

    pub fn has_hook(&self) -> bool {
        self.hook.is_some()
    }

    /// Whether the credential itself grants `id` (no hook asked).
    pub fn claims_grant(claims: &Claims, kind: Kind, id: &str) -> bool {
        match kind {
            Kind::Project => claims.grants(id),
            Kind::Story => claims.grants_story(id),
        }
    }

    /// May `claims` follow `id` now: its own grant, else the hook's answer (cached), else no.
    pub async fn allows(&self, claims: &Claims, kind: Kind, id: &str) -> Result<bool, HookError> {
        if Self::claims_grant(claims, kind, id) {
            return Ok(true);
        }
        match &self.hook {
            Some(hook) => hook.allows(&claims.sub, kind, id).await,
            None => Ok(false),
        }
    }

    /// Whether every one of `ids` is allowed (stops at the first refusal or failure).
    pub async fn allows_all(
        &self,
        claims: &Claims,
        kind: Kind,
        ids: &[String],
    ) -> Result<bool, HookError> {
        for id in ids {
            if !self.allows(claims, kind, id).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// What `/ws/user` (projects) or `/ws/user/stories` follows: the valid ids the
    /// credential names (deduplicated, whole: the caller decides what a credential naming
    /// too many means), else the hook's list (at most `max_list`), else none.
    pub async fn list(&self, claims: &Claims, kind: Kind) -> Result<Vec<String>, HookError> {
        let named = match kind {
            Kind::Project => claims.named_projects(),
            Kind::Story => claims.named_stories(),
        };
        let named = dedupe_valid(named);
        if !named.is_empty() {
            return Ok(named);
        }
        match &self.hook {
            Some(hook) => {
                let mut ids = hook.list(&claims.sub, kind).await?.to_vec();
                ids.truncate(self.max_list);
                Ok(ids)
            }
            None => Ok(Vec::new()),
        }
    }
}

/// Valid ids only, each once, in the given order.
fn dedupe_valid(ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter()
        .filter(|id| valid_project_id(id) && seen.insert(id.clone()))
        .collect()
}

#[cfg(test)]
mod tests;
