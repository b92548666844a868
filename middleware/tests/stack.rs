//! The layers together, in the gateway's order, with the logs captured.
//!
//! Log capture lives in its own test binary with one *global* subscriber: a thread-scoped
//! subscriber (`set_default`) races with tests on other threads that register the same
//! callsites first, and tracing then caches "nobody is interested" for them (flaky captures).

use std::convert::Infallible;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use switchboard_middleware::{
    mint_hs256, AuthLayer, Authentication, Authenticator, ClientIp, ClientIpLayer,
    HandshakeRateLimitLayer, JwtConfig, JwtVerifier, PeerAddr, RequestId, RequestIdLayer,
};
use tower::{service_fn, Layer, ServiceBuilder, ServiceExt};

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the capturing subscriber once for the whole binary; returns its buffer.
fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .init();
        logs
    })
}

fn captured() -> String {
    String::from_utf8(logs().0.lock().unwrap().clone()).unwrap()
}

#[tokio::test]
async fn request_log_has_the_path_but_never_the_query() {
    logs();
    let svc = RequestIdLayer::new().layer(service_fn(|_req: Request<()>| async {
        tracing::info!("inner handler ran");
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
    }));

    let mut req = Request::builder()
        .uri("/ws/proj-1?token=SECRET.JWT.VALUE&last_seq=3")
        .header("x-request-id", "req-42")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("192.0.2.1:4000".parse().unwrap()));
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "req-42");

    let logs = captured();
    let ours: Vec<&str> = logs.lines().filter(|l| l.contains("req-42")).collect();
    assert!(
        ours.iter().any(|l| l.contains("request completed")),
        "{logs}"
    );
    assert!(
        ours.iter().any(|l| l.contains("inner handler ran")),
        "{logs}"
    );
    assert!(ours.iter().all(|l| l.contains("/ws/proj-1")), "{logs}");
    assert!(ours.iter().all(|l| l.contains("192.0.2.1")), "{logs}");
    assert!(ours.iter().any(|l| l.contains("status=200")), "{logs}");
    assert!(!logs.contains("SECRET"), "{logs}");
    assert!(!logs.contains("token="), "{logs}");
    assert!(!logs.contains("last_seq"), "{logs}");
}

/// Extensions flow down the whole stack, the span gets the resolved client (not the proxy),
/// and the JWT stays out of the logs.
#[tokio::test]
async fn full_stack_in_gateway_order() {
    logs();
    let secret = b"stack-secret".to_vec();
    let verifier = JwtVerifier::new(JwtConfig {
        hs256_secret: Some(secret.clone()),
        ..JwtConfig::default()
    })
    .unwrap();
    let authenticator = Arc::new(Authenticator::new(Some(verifier), None));
    let svc = ServiceBuilder::new()
        .layer(RequestIdLayer::new())
        .layer(ClientIpLayer::new(vec!["10.0.0.0/8".parse().unwrap()]))
        .layer(HandshakeRateLimitLayer::new(10, 10, |uri| {
            uri.path().starts_with("/ws/")
        }))
        .layer(AuthLayer::new(authenticator))
        .service(service_fn(|req: Request<()>| async move {
            let ext = req.extensions();
            assert!(ext.get::<RequestId>().is_some());
            assert_eq!(ext.get::<ClientIp>().unwrap().0.to_string(), "198.51.100.7");
            let claims = ext.get::<Authentication>().unwrap().claims().unwrap();
            assert!(claims.grants("p"));
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        }));

    let token = mint_hs256(&secret, "alice", &["p".to_owned()], 60, false).unwrap();
    let mut req = Request::builder()
        .uri(format!("/ws/p?token={token}"))
        .header("x-request-id", "stack-1")
        .header("x-forwarded-for", "198.51.100.7")
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(PeerAddr("10.0.0.5:3333".parse().unwrap()));
    let response = svc.oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "stack-1");

    let logs = captured();
    let ours: Vec<&str> = logs.lines().filter(|l| l.contains("stack-1")).collect();
    assert!(
        ours.iter()
            .any(|l| l.contains("request completed") && l.contains("client_ip=198.51.100.7")),
        "{logs}"
    );
    assert!(ours.iter().any(|l| l.contains("authenticated")), "{logs}");
    assert!(!logs.contains(&token), "{logs}");
    assert!(!logs.contains("token="), "{logs}");
}
