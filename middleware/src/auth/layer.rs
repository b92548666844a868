//! The auth middleware: authenticate, record the outcome, always go on.
//!
//! Inserts exactly one [`Authentication`] into every request's extensions (and a
//! [`super::SessionId`] when a session authenticated it) and then calls the inner service,
//! whatever the outcome. Rejecting is the router's job because the right answer
//! depends on the route: HTTP 401/403 for the API and plain requests, but for a WebSocket
//! upgrade the handshake must complete and the close code (4001/4003) carry the refusal,
//! since browsers cannot read handshake statuses.
//!
//! [`AuthLayer::only_for`] limits the work to the routes that read a credential: elsewhere
//! (health probes, metrics, static files) the request gets [`Authentication::Missing`]
//! without a look at its credential, so `GET /healthz?session=x` costs no session-store
//! round trip. Skipped routes see `Missing`, never an identity: fail closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::Full;
use tower::{Layer, Service};

use super::{Authentication, Authenticator};

/// Adds [`Authentication`] to every request.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
    applies_to: fn(&Uri) -> bool,
    sessions_on: fn(&Uri) -> bool,
}

fn every_route(_: &Uri) -> bool {
    true
}

impl AuthLayer {
    /// Authenticates every request; see [`AuthLayer::only_for`].
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self {
            authenticator,
            applies_to: every_route,
            sessions_on: every_route,
        }
    }

    /// Looks session credentials up only on requests `sessions_on` selects; elsewhere a
    /// session counts as no credential (and costs no Redis read).
    pub fn sessions_only_for(mut self, sessions_on: fn(&Uri) -> bool) -> Self {
        self.sessions_on = sessions_on;
        self
    }

    /// Authenticates only requests whose URI `applies_to` selects; the others get
    /// [`Authentication::Missing`] at no cost.
    pub fn only_for(mut self, applies_to: fn(&Uri) -> bool) -> Self {
        self.applies_to = applies_to;
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
            applies_to: self.applies_to,
            sessions_on: self.sessions_on,
        }
    }
}

/// Service of [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
    applies_to: fn(&Uri) -> bool,
    sessions_on: fn(&Uri) -> bool,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Full<Bytes>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The session lookup awaits, so the call happens later: take the service that
        // `poll_ready` readied and leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !(self.applies_to)(req.uri()) {
            let mut req = req;
            req.extensions_mut().insert(Authentication::Missing);
            return Box::pin(inner.call(req));
        }
        let authenticator = self.authenticator.clone();
        let sessions = (self.sessions_on)(req.uri());
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let (outcome, session) = authenticator
                .authenticate_request_with(&parts.headers, &parts.uri, sessions)
                .await;
            match &outcome {
                Authentication::Authenticated(claims) => {
                    tracing::debug!(sub = %claims.sub, kind = ?claims.kind, "authenticated");
                }
                Authentication::Missing => tracing::debug!("no credential"),
                // The error's Display names the failed check, never the credential itself.
                Authentication::Invalid(err) if err.is_unavailable() => {
                    tracing::debug!(code = err.code(), reason = %err, "credential not checkable now");
                }
                Authentication::Invalid(err) => {
                    tracing::debug!(code = err.code(), reason = %err, "credential refused");
                }
            }
            parts.extensions.insert(outcome);
            if let Some(session) = session {
                parts.extensions.insert(session);
            }
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::jwt::tests::{hs, hs_config, now};
    use super::super::{AuthError, CredentialKind, JwtVerifier};
    use super::*;
    use serde_json::json;
    use std::convert::Infallible;
    use tower::{service_fn, ServiceExt};

    fn service(
    ) -> impl Service<Request<()>, Response = Response<Full<Bytes>>, Error = Infallible> + Clone
    {
        let authenticator = Authenticator::new(Some(JwtVerifier::new(hs_config()).unwrap()), None);
        AuthLayer::new(Arc::new(authenticator)).layer(service_fn(|req: Request<()>| async move {
            // The router decides; here it just reports what the layer found.
            let text = match req.extensions().get::<Authentication>() {
                Some(Authentication::Authenticated(c)) => {
                    assert_eq!(c.kind, CredentialKind::Jwt);
                    format!("ok:{}", c.sub)
                }
                Some(Authentication::Missing) => "missing".to_owned(),
                Some(Authentication::Invalid(e)) => format!("invalid:{}", e.code()),
                None => "absent".to_owned(),
            };
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        }))
    }

    async fn body_of(uri: &str) -> String {
        let req = Request::builder().uri(uri).body(()).unwrap();
        let response = service().oneshot(req).await.unwrap();
        let bytes = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Counts lookups; never finds anything.
    #[derive(Default)]
    struct CountingStore(std::sync::atomic::AtomicUsize);

    impl super::super::SessionStore for CountingStore {
        fn load<'a>(
            &'a self,
            _id: &'a str,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<Option<super::super::SessionRecord>, AuthError>,
                    > + Send
                    + 'a,
            >,
        > {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Err(AuthError::SessionStoreUnavailable) })
        }
    }

    #[tokio::test]
    async fn skipped_routes_get_missing_without_a_store_lookup() {
        let store = Arc::new(CountingStore::default());
        let authenticator = Authenticator::new(None, Some(store.clone()));
        let svc = AuthLayer::new(Arc::new(authenticator))
            .only_for(|uri| uri.path().starts_with("/ws/"))
            .layer(service_fn(|req: Request<()>| async move {
                let text = match req.extensions().get::<Authentication>() {
                    Some(Authentication::Missing) => "missing".to_owned(),
                    Some(Authentication::Invalid(e)) => format!("invalid:{}", e.code()),
                    Some(Authentication::Authenticated(_)) => "ok".to_owned(),
                    None => "absent".to_owned(),
                };
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
            }));
        let call = |uri: &'static str| {
            let svc = svc.clone();
            async move {
                let req = Request::builder().uri(uri).body(()).unwrap();
                let response = svc.oneshot(req).await.unwrap();
                let bytes = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                String::from_utf8(bytes.to_vec()).unwrap()
            }
        };
        assert_eq!(call("/healthz?session=x").await, "missing");
        assert_eq!(store.0.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(call("/ws/p?session=x").await, "invalid:auth_unavailable");
        assert_eq!(store.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn always_calls_inner_with_the_outcome() {
        let t = hs(&json!({"sub": "alice", "exp": now() + 60}));
        assert_eq!(body_of(&format!("/ws/p?token={t}")).await, "ok:alice");
        assert_eq!(body_of("/ws/p").await, "missing");
        assert_eq!(body_of("/ws/p?token=nope").await, "invalid:invalid_token");
        let expired = hs(&json!({"sub": "alice", "exp": now() - 120}));
        assert_eq!(
            body_of(&format!("/ws/p?token={expired}")).await,
            "invalid:token_expired"
        );
        assert_eq!(
            body_of("/ws/p?session=abc").await,
            format!("invalid:{}", AuthError::SessionNotFound.code())
        );
    }
}
