//! The auth middleware: authenticate, record the outcome, always go on.
//!
//! Inserts exactly one [`Authentication`] into every request's extensions (and a
//! [`super::SessionId`] when a session authenticated it) and then calls the inner service,
//! whatever the outcome. Rejecting is the router's job because the right answer
//! depends on the route: HTTP 401/403 for the API and plain requests, but for a WebSocket
//! upgrade the handshake must complete and the close code (4001/4003) carry the refusal,
//! since browsers cannot read handshake statuses.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, Service};

use super::{Authentication, Authenticator};

/// Adds [`Authentication`] to every request.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    authenticator: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authenticator: self.authenticator.clone(),
        }
    }
}

/// Service of [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    authenticator: Arc<Authenticator>,
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
        let authenticator = self.authenticator.clone();
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let (outcome, session) = authenticator
                .authenticate_request(&parts.headers, &parts.uri)
                .await;
            match &outcome {
                Authentication::Authenticated(claims) => {
                    tracing::debug!(sub = %claims.sub, kind = ?claims.kind, "authenticated");
                }
                Authentication::Missing => tracing::debug!("no credential"),
                // The error's Display names the failed check, never the credential itself.
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
