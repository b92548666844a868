//! Finding a request's credential and checking it.
//!
//! Order, first found wins (docs/protocol.md §2): `Authorization: Bearer <JWT>`, query
//! `?token=<JWT>`, cookie `session=<id>`, query `?session=<id>`. "Found" means present: a
//! present but empty or garbled credential is refused, never skipped in favour of a later one,
//! so a client cannot make the gateway fall through to a credential it did not mean to use.
//! An `Authorization` header with another scheme (e.g. `Basic`) is not ours and is skipped.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::{AUTHORIZATION, COOKIE};
use http::request::Parts;
use http::{HeaderMap, Uri};
use percent_encoding::percent_decode_str;

use super::{
    AuthError, Authentication, Claims, CredentialKind, JwtVerifier, SessionId, SessionStore,
};

/// Session ids longer than this are refused without a store round trip.
const MAX_SESSION_ID_LEN: usize = 256;

/// Checks credentials; shared by the layer and the gateway (e.g. for the HTTP API).
pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    sessions: Option<Arc<dyn SessionStore>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Credential<'a> {
    Jwt(Cow<'a, str>),
    Session(Cow<'a, str>),
}

impl Authenticator {
    pub fn new(jwt: Option<JwtVerifier>, sessions: Option<Arc<dyn SessionStore>>) -> Self {
        Self { jwt, sessions }
    }

    pub fn jwt(&self) -> Option<&JwtVerifier> {
        self.jwt.as_ref()
    }

    pub async fn authenticate_parts(&self, parts: &Parts) -> Authentication {
        self.authenticate(&parts.headers, &parts.uri).await
    }

    pub async fn authenticate(&self, headers: &HeaderMap, uri: &Uri) -> Authentication {
        self.authenticate_request(headers, uri).await.0
    }

    /// [`Authenticator::authenticate`], plus the session id when a server-side session is
    /// what authenticated the request (the gateway rechecks that it still exists).
    pub async fn authenticate_request(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
    ) -> (Authentication, Option<SessionId>) {
        self.authenticate_request_with(headers, uri, true).await
    }

    /// Like [`Self::authenticate_request`]; with `sessions` false a session credential is
    /// not looked up at all and counts as [`Authentication::Missing`] (routes that only a
    /// service JWT can use: a session never carries `role: service`, so its Redis read
    /// would be wasted, and unthrottled).
    pub async fn authenticate_request_with(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        sessions: bool,
    ) -> (Authentication, Option<SessionId>) {
        let credential = match find_credential(headers, uri) {
            Ok(Some(Credential::Session(_))) if !sessions => {
                return (Authentication::Missing, None)
            }
            Ok(Some(credential)) => credential,
            Ok(None) => return (Authentication::Missing, None),
            Err(err) => return (Authentication::Invalid(err), None),
        };
        let (result, session) = match credential {
            Credential::Jwt(token) => (self.check_jwt(&token), None),
            Credential::Session(id) => (self.check_session(&id).await, Some(id)),
        };
        match result {
            Ok(claims) => (
                Authentication::Authenticated(Arc::new(claims)),
                session.map(|id| SessionId(id.into_owned())),
            ),
            Err(err) => (Authentication::Invalid(err), None),
        }
    }

    fn check_jwt(&self, token: &str) -> Result<Claims, AuthError> {
        self.jwt
            .as_ref()
            .ok_or(AuthError::NotConfigured)?
            .verify(token)
    }

    async fn check_session(&self, id: &str) -> Result<Claims, AuthError> {
        let store = self.sessions.as_ref().ok_or(AuthError::SessionNotFound)?;
        let record = store.load(id).await?.ok_or(AuthError::SessionNotFound)?;
        if record.user_id.is_empty() {
            return Err(AuthError::InvalidClaims(
                "session has no user_id".to_owned(),
            ));
        }
        if let Some(expires_at) = record.expires_at {
            if expires_at <= jsonwebtoken::get_current_timestamp() {
                return Err(AuthError::Expired);
            }
        }
        Ok(Claims {
            sub: record.user_id,
            projects: super::jwt::shrunk(record.projects),
            stories: record.stories.into_boxed_slice(),
            role: None,
            exp: record.expires_at,
            kind: CredentialKind::Session,
        })
    }
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("jwt", &self.jwt.as_ref().map(JwtVerifier::algorithms))
            .field("sessions", &self.sessions.is_some())
            .finish()
    }
}

fn find_credential<'a>(
    headers: &'a HeaderMap,
    uri: &'a Uri,
) -> Result<Option<Credential<'a>>, AuthError> {
    if let Some(token) = bearer(headers)? {
        return Ok(Some(Credential::Jwt(Cow::Borrowed(token))));
    }
    if let Some(token) = query_param(uri, "token")? {
        return non_empty(token).map(|t| Some(Credential::Jwt(t)));
    }
    if let Some(id) = cookie(headers, "session")? {
        return session_id(Cow::Borrowed(id)).map(Some);
    }
    if let Some(id) = query_param(uri, "session")? {
        return session_id(id).map(Some);
    }
    Ok(None)
}

/// The token of the first `Authorization: Bearer` header; other schemes are not ours.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, AuthError> {
    for value in headers.get_all(AUTHORIZATION) {
        let value = value.to_str().map_err(|_| AuthError::Malformed)?.trim();
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = rest.trim();
            return if token.is_empty() {
                Err(AuthError::Malformed)
            } else {
                Ok(Some(token))
            };
        }
    }
    Ok(None)
}

/// First value of `name` in the query, percent-decoded. `+` is left as is: JWTs never contain
/// it, and turning it into a space would corrupt session ids sent unencoded.
fn query_param<'a>(uri: &'a Uri, name: &str) -> Result<Option<Cow<'a, str>>, AuthError> {
    let Some(query) = uri.query() else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode_str(key).decode_utf8_lossy();
        if key == name {
            return percent_decode_str(value)
                .decode_utf8()
                .map(Some)
                .map_err(|_| AuthError::Malformed);
        }
    }
    Ok(None)
}

/// First `name=` pair over every `Cookie` header (HTTP/2 may split them).
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, AuthError> {
    for value in headers.get_all(COOKIE) {
        // A cookie header we cannot read might hold someone else's cookies; only fail if ours
        // could be in it.
        let Ok(value) = value.to_str() else {
            continue;
        };
        for pair in value.split(';') {
            if let Some((key, val)) = pair.trim().split_once('=') {
                if key.trim() == name {
                    let val = val.trim();
                    let val = val
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or(val);
                    return Ok(Some(val));
                }
            }
        }
    }
    Ok(None)
}

fn non_empty(value: Cow<'_, str>) -> Result<Cow<'_, str>, AuthError> {
    if value.is_empty() {
        Err(AuthError::Malformed)
    } else {
        Ok(value)
    }
}

/// Visible ASCII only, bounded: the id becomes part of a Redis key.
fn session_id(id: Cow<'_, str>) -> Result<Credential<'_>, AuthError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(Credential::Session(id))
    } else {
        Err(AuthError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::jwt::tests::{hs, hs_config, now};
    use super::super::{MemorySessionStore, SessionRecord};
    use super::*;
    use serde_json::json;
    use std::future::Future;
    use std::pin::Pin;

    fn token(sub: &str) -> String {
        hs(&json!({"sub": sub, "projects": ["p"], "exp": now() + 300}))
    }

    fn store() -> Arc<MemorySessionStore> {
        let store = MemorySessionStore::new();
        store.insert(
            "cookie-sid",
            SessionRecord {
                user_id: "cookie-user".into(),
                projects: vec!["p".into()],
                stories: Vec::new(),
                expires_at: Some(now() + 300),
            },
        );
        store.insert(
            "query-sid",
            SessionRecord {
                user_id: "query-user".into(),
                projects: vec!["*".into()],
                stories: Vec::new(),
                expires_at: None,
            },
        );
        store.insert(
            "old-sid",
            SessionRecord {
                user_id: "old-user".into(),
                projects: vec![],
                stories: Vec::new(),
                expires_at: Some(now() - 1),
            },
        );
        Arc::new(store)
    }

    fn authenticator() -> Authenticator {
        Authenticator::new(
            Some(JwtVerifier::new(hs_config()).unwrap()),
            Some(store() as Arc<dyn SessionStore>),
        )
    }

    async fn run(auth: &Authenticator, uri: &str, headers: &[(&str, &str)]) -> Authentication {
        let mut builder = http::Request::builder().uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        auth.authenticate_parts(&parts).await
    }

    fn sub(outcome: &Authentication) -> (&str, CredentialKind) {
        match outcome {
            Authentication::Authenticated(c) => (c.sub.as_str(), c.kind),
            other => panic!("not authenticated: {other:?}"),
        }
    }

    fn err(outcome: Authentication) -> AuthError {
        match outcome {
            Authentication::Invalid(e) => e,
            other => panic!("not invalid: {other:?}"),
        }
    }

    /// The session id comes back only when a session is what authenticated the request:
    /// the gateway rechecks exactly those connections.
    #[tokio::test]
    async fn session_id_is_reported_only_for_session_credentials() {
        let auth = authenticator();
        let uri: Uri = "/ws/p?session=query-sid".parse().unwrap();
        let (o, id) = auth.authenticate_request(&HeaderMap::new(), &uri).await;
        assert_eq!(sub(&o), ("query-user", CredentialKind::Session));
        assert_eq!(id, Some(SessionId("query-sid".into())));
        assert_eq!(format!("{id:?}"), "Some(SessionId(<redacted>))");

        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, "session=cookie-sid".parse().unwrap());
        let (_, id) = auth
            .authenticate_request(&headers, &"/ws/p".parse().unwrap())
            .await;
        assert_eq!(id, Some(SessionId("cookie-sid".into())));

        // A JWT wins over the session: no session id, nothing to recheck.
        let uri: Uri = format!("/ws/p?token={}&session=query-sid", token("jwt-user"))
            .parse()
            .unwrap();
        let (o, id) = auth.authenticate_request(&HeaderMap::new(), &uri).await;
        assert_eq!(sub(&o), ("jwt-user", CredentialKind::Jwt));
        assert_eq!(id, None);
        // A refused session is no session either.
        let uri: Uri = "/ws/p?session=old-sid".parse().unwrap();
        let (o, id) = auth.authenticate_request(&HeaderMap::new(), &uri).await;
        assert!(matches!(o, Authentication::Invalid(AuthError::Expired)));
        assert_eq!(id, None);
    }

    #[tokio::test]
    async fn each_source_alone() {
        let auth = authenticator();
        let bearer = format!("Bearer {}", token("bearer-user"));
        let o = run(&auth, "/ws/p", &[("authorization", &bearer)]).await;
        assert_eq!(sub(&o), ("bearer-user", CredentialKind::Jwt));

        let lower = format!("bearer {}", token("bearer-user"));
        let o = run(&auth, "/ws/p", &[("authorization", &lower)]).await;
        assert_eq!(sub(&o), ("bearer-user", CredentialKind::Jwt));

        let o = run(
            &auth,
            &format!("/ws/p?a=1&token={}", token("query-user")),
            &[],
        )
        .await;
        assert_eq!(sub(&o), ("query-user", CredentialKind::Jwt));

        let o = run(
            &auth,
            "/ws/p",
            &[("cookie", "theme=dark; session=cookie-sid")],
        )
        .await;
        assert_eq!(sub(&o), ("cookie-user", CredentialKind::Session));
        let claims = o.claims().unwrap();
        assert_eq!(claims.projects, vec!["p"]);
        assert!(claims.role.is_none() && claims.exp.is_some());

        let o = run(&auth, "/ws/p?session=query-sid", &[]).await;
        assert_eq!(sub(&o), ("query-user", CredentialKind::Session));
        assert!(o.claims().unwrap().grants_all());
        assert!(o.claims().unwrap().exp.is_none());
    }

    #[tokio::test]
    async fn precedence() {
        let auth = authenticator();
        let bearer = format!("Bearer {}", token("bearer-user"));
        let all_query = format!("/ws/p?session=query-sid&token={}", token("query-user"));
        let cookie = ("cookie", "session=cookie-sid");

        let o = run(&auth, &all_query, &[("authorization", &bearer), cookie]).await;
        assert_eq!(sub(&o).0, "bearer-user");
        let o = run(&auth, &all_query, &[cookie]).await;
        assert_eq!(sub(&o).0, "query-user");
        let o = run(&auth, "/ws/p?session=query-sid", &[cookie]).await;
        assert_eq!(sub(&o).0, "cookie-user");

        // A non-Bearer Authorization header is not a credential of ours.
        let o = run(
            &auth,
            &all_query,
            &[("authorization", "Basic dXNlcjpwYXNz")],
        )
        .await;
        assert_eq!(sub(&o).0, "query-user");

        // A bad first credential is refused, not skipped.
        let o = run(&auth, &all_query, &[("authorization", "Bearer garbage")]).await;
        assert_eq!(err(o).code(), "invalid_token");
        let o = run(&auth, "/ws/p?token=", &[cookie]).await;
        assert_eq!(err(o), AuthError::Malformed);
    }

    #[tokio::test]
    async fn missing() {
        let auth = authenticator();
        assert!(matches!(
            run(&auth, "/ws/p?last_seq=3", &[("cookie", "theme=dark")]).await,
            Authentication::Missing
        ));
        assert!(matches!(
            run(&auth, "/ws/p", &[]).await,
            Authentication::Missing
        ));
        assert_eq!(
            Authentication::Missing.error().unwrap().code(),
            "missing_credentials"
        );
    }

    #[tokio::test]
    async fn percent_decoding_and_quoted_cookie() {
        let auth = authenticator();
        let store = MemorySessionStore::new();
        store.insert(
            "a/b=c",
            SessionRecord {
                user_id: "encoded".into(),
                projects: vec![],
                stories: Vec::new(),
                expires_at: None,
            },
        );
        let auth2 = Authenticator::new(None, Some(Arc::new(store)));
        let o = run(&auth2, "/ws/p?session=a%2Fb%3Dc", &[]).await;
        assert_eq!(sub(&o).0, "encoded");

        let t = token("enc-user").replace('.', "%2E");
        let o = run(&auth, &format!("/ws/p?token={t}"), &[]).await;
        assert_eq!(sub(&o).0, "enc-user");

        let o = run(&auth, "/ws/p", &[("cookie", "session=\"cookie-sid\"")]).await;
        assert_eq!(sub(&o).0, "cookie-user");
        let o = run(&auth, "/ws/p?session=%FF", &[]).await;
        assert_eq!(err(o), AuthError::Malformed);
    }

    #[tokio::test]
    async fn session_failures() {
        let auth = authenticator();
        let o = run(&auth, "/ws/p?session=old-sid", &[]).await;
        assert_eq!(err(o), AuthError::Expired);
        let o = run(&auth, "/ws/p?session=nope", &[]).await;
        assert_eq!(err(o), AuthError::SessionNotFound);
        let o = run(&auth, "/ws/p?session=has%20space", &[]).await;
        assert_eq!(err(o), AuthError::Malformed);
        let long = format!("/ws/p?session={}", "x".repeat(MAX_SESSION_ID_LEN + 1));
        assert_eq!(err(run(&auth, &long, &[]).await), AuthError::Malformed);

        // No store configured.
        let no_store = Authenticator::new(Some(JwtVerifier::new(hs_config()).unwrap()), None);
        let o = run(&no_store, "/ws/p?session=cookie-sid", &[]).await;
        assert_eq!(err(o), AuthError::SessionNotFound);

        // Store down.
        struct Down;
        impl SessionStore for Down {
            fn load<'a>(
                &'a self,
                _id: &'a str,
            ) -> Pin<Box<dyn Future<Output = Result<Option<SessionRecord>, AuthError>> + Send + 'a>>
            {
                Box::pin(async { Err(AuthError::SessionStoreUnavailable) })
            }
        }
        let down = Authenticator::new(None, Some(Arc::new(Down)));
        let e = err(run(&down, "/ws/p", &[("cookie", "session=x")]).await);
        assert_eq!(e, AuthError::SessionStoreUnavailable);
        assert!(e.is_unavailable());
    }

    #[tokio::test]
    async fn jwt_without_verifier_is_not_configured() {
        let auth = Authenticator::new(None, Some(store() as Arc<dyn SessionStore>));
        assert!(auth.jwt().is_none());
        let bearer = format!("Bearer {}", token("u"));
        let e = err(run(&auth, "/ws/p", &[("authorization", &bearer)]).await);
        assert_eq!(e, AuthError::NotConfigured);
        assert_eq!(e.code(), "invalid_token");
    }

    #[tokio::test]
    async fn expired_jwt() {
        let auth = authenticator();
        let t = hs(&json!({"sub": "u", "exp": now() - 120}));
        let e = err(run(&auth, &format!("/ws/p?token={t}"), &[]).await);
        assert_eq!(e, AuthError::Expired);
        assert_eq!(e.code(), "token_expired");
    }

    #[test]
    fn authenticate_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let auth = authenticator();
        let headers = HeaderMap::new();
        let uri = Uri::from_static("/");
        assert_send(&auth.authenticate(&headers, &uri));
    }
}
