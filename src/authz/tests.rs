//! The authorizer against a fake app backend on a real socket: order (credential first),
//! caching, sharing, the per-user share, and every failure being an error, not a "no".

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use switchboard_middleware::{Claims, CredentialKind};

use super::*;
use crate::config::AuthConfig;
use crate::metrics::Metrics;

/// What the fake backend does.
#[derive(Clone, Copy)]
enum Mode {
    /// Allows ids starting with `ok`; lists `["ok1", "ok2", "bad id"]`.
    Normal,
    Slow(Duration),
    Status(u16),
    Garbage,
}

/// Each request's `Authorization` header and JSON body.
type Asked = Arc<parking_lot::Mutex<Vec<(Option<String>, Value)>>>;

struct Backend {
    url: String,
    calls: Arc<AtomicUsize>,
    bodies: Asked,
}

async fn backend(mode: Mode) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/authz", listener.local_addr().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let bodies: Asked = Default::default();
    let (c, b) = (calls.clone(), bodies.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (c, b) = (c.clone(), b.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (c, b) = (c.clone(), b.clone());
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        let auth = req
                            .headers()
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_owned());
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let body: Value = serde_json::from_slice(&body).unwrap();
                        b.lock().push((auth, body.clone()));
                        let answer = match mode {
                            Mode::Slow(d) => {
                                tokio::time::sleep(d).await;
                                r#"{"allow":true}"#.to_owned()
                            }
                            Mode::Status(code) => {
                                let mut r = Response::new(Full::new(Bytes::from("no")));
                                *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
                                return Ok::<_, Infallible>(r);
                            }
                            Mode::Garbage => "{\"allow\": \"yes\"".to_owned(),
                            Mode::Normal if body["action"] == "list" => {
                                r#"{"ids":["ok1","ok2","bad id","ok1"]}"#.to_owned()
                            }
                            Mode::Normal => {
                                let allow = body["id"].as_str().unwrap().starts_with("ok");
                                format!(r#"{{"allow":{allow}}}"#)
                            }
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(answer))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Backend { url, calls, bodies }
}

fn config(url: &str) -> AuthConfig {
    AuthConfig {
        hook_url: Some(url.into()),
        hook_secret: Some("s3cret".into()),
        hook_timeout_ms: 300,
        hook_cache_secs: 30,
        hook_concurrency: 8,
        ..AuthConfig::default()
    }
}

fn claims(sub: &str, projects: &[&str], stories: &[&str]) -> Claims {
    Claims {
        sub: sub.into(),
        projects: projects.iter().map(|s| s.to_string()).collect(),
        stories: stories.iter().map(|s| s.to_string()).collect(),
        role: None,
        exp: None,
        kind: CredentialKind::Jwt,
    }
}

fn authorizer(cfg: &AuthConfig) -> (Authorizer, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::default());
    (Authorizer::new(cfg, 10, metrics.clone()), metrics)
}

#[tokio::test]
async fn the_credential_decides_first_then_the_hook_with_its_secret() {
    let b = backend(Mode::Normal).await;
    let (a, _) = authorizer(&config(&b.url));
    let c = claims("u1", &["p1"], &["s1"]);
    assert_eq!(a.allows(&c, Kind::Project, "p1").await, Ok(true));
    assert_eq!(a.allows(&c, Kind::Story, "s1").await, Ok(true));
    assert_eq!(
        b.calls.load(Ordering::SeqCst),
        0,
        "granted by the credential"
    );
    assert_eq!(a.allows(&c, Kind::Story, "ok-7").await, Ok(true));
    assert_eq!(a.allows(&c, Kind::Project, "nope").await, Ok(false));
    let bodies = b.bodies.lock().clone();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0].0.as_deref(), Some("Bearer s3cret"));
    assert_eq!(
        bodies[0].1,
        serde_json::json!({"action": "subscribe", "user_id": "u1", "kind": "story", "id": "ok-7"})
    );
    assert_eq!(bodies[1].1["kind"], "project");
}

#[tokio::test]
async fn without_a_hook_what_the_credential_does_not_grant_is_refused() {
    let a = Authorizer::without_hook(10);
    let c = claims("u1", &["p1"], &[]);
    assert_eq!(a.allows(&c, Kind::Project, "p2").await, Ok(false));
    assert_eq!(a.allows(&c, Kind::Story, "s").await, Ok(false));
    assert_eq!(a.list(&c, Kind::Story).await, Ok(vec![]));
    assert_eq!(a.list(&c, Kind::Project).await, Ok(vec!["p1".to_owned()]));
}

#[tokio::test]
async fn allow_and_deny_are_cached_per_user_and_id() {
    let b = backend(Mode::Normal).await;
    let (a, _) = authorizer(&config(&b.url));
    let u1 = claims("u1", &[], &[]);
    let u2 = claims("u2", &[], &[]);
    for _ in 0..5 {
        assert_eq!(a.allows(&u1, Kind::Story, "ok-1").await, Ok(true));
        assert_eq!(a.allows(&u1, Kind::Story, "no-1").await, Ok(false));
    }
    assert_eq!(b.calls.load(Ordering::SeqCst), 2);
    assert_eq!(a.allows(&u2, Kind::Story, "ok-1").await, Ok(true));
    assert_eq!(a.allows(&u1, Kind::Project, "ok-1").await, Ok(true));
    assert_eq!(b.calls.load(Ordering::SeqCst), 4, "per user and per kind");
}

#[tokio::test]
async fn a_zero_cache_ttl_asks_every_time() {
    let b = backend(Mode::Normal).await;
    let (a, _) = authorizer(&AuthConfig {
        hook_cache_secs: 0,
        ..config(&b.url)
    });
    let u = claims("u", &[], &[]);
    for _ in 0..3 {
        assert_eq!(a.allows(&u, Kind::Story, "ok").await, Ok(true));
    }
    assert_eq!(b.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn lists_come_from_the_credential_else_the_hook_valid_and_deduplicated() {
    let b = backend(Mode::Normal).await;
    let (a, _) = authorizer(&config(&b.url));
    let named = claims("u", &["p1", "p1", "../x"], &["s1"]);
    assert_eq!(
        a.list(&named, Kind::Project).await,
        Ok(vec!["p1".to_owned()])
    );
    assert_eq!(a.list(&named, Kind::Story).await, Ok(vec!["s1".to_owned()]));
    assert_eq!(b.calls.load(Ordering::SeqCst), 0);
    let bare = claims("u", &[], &[]);
    let want = vec!["ok1".to_owned(), "ok2".to_owned()];
    assert_eq!(a.list(&bare, Kind::Story).await, Ok(want.clone()));
    assert_eq!(a.list(&bare, Kind::Story).await, Ok(want));
    assert_eq!(b.calls.load(Ordering::SeqCst), 1, "cached");
    // A listed id needs no second question.
    assert_eq!(a.allows(&bare, Kind::Story, "ok2").await, Ok(true));
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        b.bodies.lock()[0].1,
        serde_json::json!({"action": "list", "user_id": "u", "kind": "story"})
    );
}

#[tokio::test]
async fn concurrent_identical_questions_share_one_call() {
    let b = backend(Mode::Slow(Duration::from_millis(100))).await;
    let (a, _) = authorizer(&config(&b.url));
    let a = Arc::new(a);
    let c = Arc::new(claims("u", &[], &[]));
    let asks = (0..20).map(|_| {
        let (a, c) = (a.clone(), c.clone());
        tokio::spawn(async move { a.allows(&c, Kind::Story, "s").await })
    });
    for ask in asks {
        assert_eq!(ask.await.unwrap(), Ok(true));
    }
    assert_eq!(b.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn every_failure_is_an_error_not_a_denial_and_is_counted() {
    let c = claims("u", &[], &[]);
    // Nothing listens there.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/", l.local_addr().unwrap())
    };
    let (a, m) = authorizer(&config(&closed));
    assert_eq!(
        a.allows(&c, Kind::Story, "s").await,
        Err(HookError::Unreachable)
    );
    assert_eq!(m.hook_failures(), 1);

    let b = backend(Mode::Slow(Duration::from_secs(2))).await;
    let (a, m) = authorizer(&config(&b.url));
    let t0 = std::time::Instant::now();
    assert_eq!(
        a.allows(&c, Kind::Story, "s").await,
        Err(HookError::Timeout)
    );
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(m.hook_failures(), 1);

    let b = backend(Mode::Status(500)).await;
    let (a, m) = authorizer(&config(&b.url));
    assert_eq!(
        a.allows(&c, Kind::Story, "s").await,
        Err(HookError::Status(500))
    );
    // Failures are not cached: the next ask calls again.
    assert_eq!(
        a.allows(&c, Kind::Story, "s").await,
        Err(HookError::Status(500))
    );
    assert_eq!(b.calls.load(Ordering::SeqCst), 2);
    assert_eq!(m.hook_failures(), 2);

    let b = backend(Mode::Garbage).await;
    let (a, _) = authorizer(&config(&b.url));
    assert_eq!(
        a.allows(&c, Kind::Story, "s").await,
        Err(HookError::BadResponse)
    );
    assert_eq!(a.list(&c, Kind::Story).await, Err(HookError::BadResponse));
}

#[tokio::test]
async fn one_user_cannot_take_every_slot() {
    // 8 slots, so 2 per user: a third concurrent distinct question of one user is Busy,
    // while another user is still answered.
    let b = backend(Mode::Slow(Duration::from_millis(150))).await;
    let (a, m) = authorizer(&config(&b.url));
    let a = Arc::new(a);
    let greedy = Arc::new(claims("greedy", &[], &[]));
    let asks: Vec<_> = (0..10)
        .map(|i| {
            let (a, c) = (a.clone(), greedy.clone());
            tokio::spawn(async move { a.allows(&c, Kind::Story, &format!("s{i}")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let other = claims("other", &[], &[]);
    assert_eq!(a.allows(&other, Kind::Story, "s").await, Ok(true));
    let mut busy = 0;
    for ask in asks {
        match ask.await.unwrap() {
            Ok(true) => {}
            Err(HookError::Busy) => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(busy, 8);
    assert_eq!(m.hook_failures(), 8);
    assert!(b.calls.load(Ordering::SeqCst) <= 3);
}
