//! Authentication: who is calling, and which projects they may see.
//!
//! [`Authenticator`] finds the request's credential (first found wins: `Authorization:
//! Bearer`, `?token=`, cookie `session=`, `?session=`) and turns it into [`Claims`]: a JWT via
//! [`JwtVerifier`], a session id via a [`SessionStore`]. [`AuthLayer`] stores the outcome as an
//! [`Authentication`] request extension and always calls the router: whether a failure becomes
//! HTTP 401/403 or a post-upgrade close 4001/4003 is the gateway's decision, not ours.
//!
//! Invariants: credentials are never logged and never echoed; errors carry a stable `code()`
//! and a fixed `client_message()` for clients, while their `Display` (for logs) names the
//! reason but never the token. `alg: none` and algorithm confusion are always refused.

mod authenticator;
mod jwt;
mod layer;
mod session;

use std::sync::Arc;

pub use authenticator::Authenticator;
pub use jwt::{mint_hs256, JwtConfig, JwtVerifier};
pub use layer::{AuthLayer, AuthService};
pub use session::{MemorySessionStore, SessionRecord, SessionStore};

/// Where a set of claims came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    Jwt,
    Session,
}

/// The verified identity of a caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// JWT `sub`, or the session's `user_id`.
    pub sub: String,
    /// Project ids granted; `"*"` grants every project.
    pub projects: Vec<String>,
    /// Story ids granted (docs/protocol.md §9, claim `stories`); `"*"` grants every story.
    /// A boxed slice: every connection carries its claims, and most have no stories.
    pub stories: Box<[String]>,
    /// `"service"` marks a backend caller of the HTTP API.
    pub role: Option<String>,
    /// Unix seconds after which the credential is no longer valid, if it has an end.
    pub exp: Option<u64>,
    pub kind: CredentialKind,
}

impl Claims {
    pub fn grants(&self, project: &str) -> bool {
        self.projects.iter().any(|p| p == project || p == "*")
    }

    /// Whether the credential itself grants story `story` (its `stories` claim, or a
    /// `projects` claim of `"*"`, which grants everything).
    pub fn grants_story(&self, story: &str) -> bool {
        self.stories.iter().any(|s| s == story || s == "*") || self.grants_all()
    }

    /// The explicitly named stories (what `/ws/user/stories` follows without a hook).
    pub fn named_stories(&self) -> Vec<String> {
        self.stories.iter().filter(|s| *s != "*").cloned().collect()
    }

    pub fn grants_all(&self) -> bool {
        self.projects.iter().any(|p| p == "*")
    }

    /// The explicitly named projects (what `/ws/user` subscribes to); `"*"` is not one.
    pub fn named_projects(&self) -> Vec<String> {
        self.projects
            .iter()
            .filter(|p| *p != "*")
            .cloned()
            .collect()
    }

    pub fn is_service(&self) -> bool {
        self.role.as_deref() == Some("service")
    }

    pub fn expires_at(&self) -> Option<u64> {
        self.exp
    }
}

/// The id of the server-side session (`session:{id}`) that authenticated a request.
/// [`AuthLayer`] inserts it next to [`Authentication`] only when a session credential
/// authenticated the request, so the gateway can later check that the session still exists
/// (a revoked session must end its connections). Never logged: it is a bearer credential.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionId(pub String);

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionId(<redacted>)")
    }
}

/// Outcome of authenticating one request; inserted into its extensions by [`AuthLayer`].
#[derive(Clone, Debug)]
pub enum Authentication {
    Authenticated(Arc<Claims>),
    /// No credential was presented at all.
    Missing,
    /// A credential was presented and refused (or could not be checked).
    Invalid(AuthError),
}

impl Authentication {
    pub fn claims(&self) -> Option<&Arc<Claims>> {
        match self {
            Self::Authenticated(claims) => Some(claims),
            _ => None,
        }
    }

    /// The failure, with `Missing` as [`AuthError::Missing`]; `None` when authenticated.
    pub fn error(&self) -> Option<AuthError> {
        match self {
            Self::Authenticated(_) => None,
            Self::Missing => Some(AuthError::Missing),
            Self::Invalid(err) => Some(err.clone()),
        }
    }
}

/// Why a credential was refused. `Display` is for logs; clients get `code()` and
/// `client_message()` only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential presented")]
    Missing,
    #[error("credential is malformed")]
    Malformed,
    #[error("credential has expired")]
    Expired,
    #[error("token signature does not verify")]
    InvalidSignature,
    #[error("token algorithm is not allowed")]
    AlgorithmNotAllowed,
    #[error("token claims rejected: {0}")]
    InvalidClaims(String),
    #[error("session not found")]
    SessionNotFound,
    #[error("session store unavailable")]
    SessionStoreUnavailable,
    #[error("a JWT was presented but JWT verification is not configured")]
    NotConfigured,
    #[error("token signing failed: {0}")]
    Signing(String),
}

impl AuthError {
    /// Stable client-facing code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "missing_credentials",
            Self::Malformed
            | Self::InvalidSignature
            | Self::AlgorithmNotAllowed
            | Self::InvalidClaims(_)
            | Self::NotConfigured => "invalid_token",
            Self::Expired => "token_expired",
            Self::SessionNotFound => "session_not_found",
            Self::SessionStoreUnavailable | Self::Signing(_) => "auth_unavailable",
        }
    }

    /// Fixed human text per code: which check failed is deliberately not revealed.
    pub fn client_message(&self) -> &'static str {
        match self.code() {
            "missing_credentials" => "authentication required",
            "token_expired" => "credentials have expired",
            "session_not_found" => "session not found or expired",
            "auth_unavailable" => "authentication is temporarily unavailable",
            _ => "invalid credentials",
        }
    }

    /// True when the fault is ours (a store outage), not the client's credential: the
    /// gateway answers 503 rather than 401 for these.
    pub fn is_unavailable(&self) -> bool {
        self.code() == "auth_unavailable"
    }
}

/// Bad JWT verification settings; raised once at start-up.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("JWT verification needs an HS256 secret or a public key PEM")]
    NoKey,
    #[error("the HS256 secret is empty")]
    EmptySecret,
    #[error("public key PEM is not a usable RSA or EC P-256 public key: {0}")]
    InvalidPem(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(projects: &[&str], role: Option<&str>) -> Claims {
        Claims {
            sub: "u".into(),
            projects: projects.iter().map(|s| s.to_string()).collect(),
            stories: Default::default(),
            role: role.map(str::to_owned),
            exp: Some(42),
            kind: CredentialKind::Jwt,
        }
    }

    #[test]
    fn story_grants_come_from_stories_or_a_wildcard_project_grant() {
        let mut c = claims(&["s1"], None);
        assert!(
            !c.grants_story("s1"),
            "a project grant is not a story grant"
        );
        c.stories = vec!["s1".to_owned(), "*".to_owned()].into_boxed_slice();
        assert!(c.grants_story("s1") && c.grants_story("anything"));
        assert_eq!(c.named_stories(), vec!["s1".to_owned()]);
        c.stories = vec!["s2".to_owned()].into_boxed_slice();
        assert!(c.grants_story("s2") && !c.grants_story("s1"));
        assert!(claims(&["*"], None).grants_story("s9"));
    }

    #[test]
    fn grants() {
        let c = claims(&["a", "b"], None);
        assert!(c.grants("a") && c.grants("b") && !c.grants("c"));
        assert!(!c.grants_all());
        assert!(!c.is_service());
        assert_eq!(c.expires_at(), Some(42));

        let c = claims(&["*", "a"], Some("service"));
        assert!(c.grants("anything") && c.grants_all() && c.is_service());
        assert_eq!(c.named_projects(), vec!["a".to_owned()]);

        let c = claims(&[], Some("admin"));
        assert!(!c.grants("a") && !c.is_service());
        assert!(c.named_projects().is_empty());
    }

    #[test]
    fn codes_and_messages_never_leak() {
        let cases = [
            (AuthError::Missing, "missing_credentials"),
            (AuthError::Malformed, "invalid_token"),
            (AuthError::Expired, "token_expired"),
            (AuthError::InvalidSignature, "invalid_token"),
            (AuthError::AlgorithmNotAllowed, "invalid_token"),
            (AuthError::InvalidClaims("iss".into()), "invalid_token"),
            (AuthError::NotConfigured, "invalid_token"),
            (AuthError::SessionNotFound, "session_not_found"),
            (AuthError::SessionStoreUnavailable, "auth_unavailable"),
            (AuthError::Signing("x".into()), "auth_unavailable"),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code);
            assert!(!err.client_message().contains("iss"));
            assert_eq!(err.is_unavailable(), code == "auth_unavailable");
        }
    }
}
