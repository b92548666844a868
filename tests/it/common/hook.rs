//! A stand-in app backend for the authorization hook (docs/protocol.md §10): who owns which
//! story and project, answered over real HTTP on a loopback port, with a switch to make it
//! fail or stall, and a log of the questions it was asked.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// What the backend does with the next questions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HookMode {
    /// Answers from its ownership tables.
    Normal = 0,
    /// HTTP 500.
    Failing = 1,
    /// Answers after 5 s (past any test timeout of the hook).
    Stalled = 2,
}

pub const HOOK_SECRET: &str = "hook-secret-for-tests";

#[derive(Default)]
struct State {
    /// (kind, id) -> owners.
    owners: HashMap<(String, String), HashSet<String>>,
    /// Every question asked, in order.
    asked: Vec<Value>,
    /// Requests whose bearer was not [`HOOK_SECRET`].
    bad_auth: usize,
}

pub struct HookBackend {
    pub url: String,
    mode: Arc<AtomicU8>,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl HookBackend {
    pub async fn start() -> HookBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/internal/ws-authz",
            listener.local_addr().unwrap()
        );
        let mode = Arc::new(AtomicU8::new(HookMode::Normal as u8));
        let state = Arc::new(Mutex::new(State::default()));
        let (m, s) = (mode.clone(), state.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (m, s) = (m.clone(), s.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, m.clone(), s.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HookBackend {
            url,
            mode,
            state,
            task,
        }
    }

    /// `user` owns story (kind "story") or project (kind "project") `id`.
    pub fn own(&self, user: &str, kind: &str, id: &str) {
        self.state
            .lock()
            .unwrap()
            .owners
            .entry((kind.into(), id.into()))
            .or_default()
            .insert(user.into());
    }

    pub fn disown(&self, user: &str, kind: &str, id: &str) {
        if let Some(o) = self
            .state
            .lock()
            .unwrap()
            .owners
            .get_mut(&(kind.to_string(), id.to_string()))
        {
            o.remove(user);
        }
    }

    pub fn set_mode(&self, mode: HookMode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// The questions asked so far.
    pub fn asked(&self) -> Vec<Value> {
        self.state.lock().unwrap().asked.clone()
    }

    pub fn calls(&self) -> usize {
        self.state.lock().unwrap().asked.len()
    }

    pub fn bad_auth(&self) -> usize {
        self.state.lock().unwrap().bad_auth
    }
}

impl Drop for HookBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    req: Request<Incoming>,
    mode: Arc<AtomicU8>,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let bearer_ok = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {HOOK_SECRET}"));
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let q: Value = body
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let mode = mode.load(Ordering::SeqCst);
    let reply = {
        let mut st = state.lock().unwrap();
        st.asked.push(q.clone());
        if !bearer_ok {
            st.bad_auth += 1;
            None
        } else {
            let user = q["user_id"].as_str().unwrap_or("");
            let kind = q["kind"].as_str().unwrap_or("");
            Some(match q["action"].as_str() {
                Some("list") => {
                    let mut ids: Vec<&String> = st
                        .owners
                        .iter()
                        .filter(|((k, _), o)| k == kind && o.contains(user))
                        .map(|((_, id), _)| id)
                        .collect();
                    ids.sort();
                    json!({ "ids": ids })
                }
                _ => {
                    let id = q["id"].as_str().unwrap_or("");
                    let allow = st
                        .owners
                        .get(&(kind.to_string(), id.to_string()))
                        .is_some_and(|o| o.contains(user));
                    json!({ "allow": allow })
                }
            })
        }
    };
    if mode == HookMode::Stalled as u8 {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let (status, body) = match reply {
        None => (StatusCode::UNAUTHORIZED, json!({"error": "bad secret"})),
        Some(_) if mode == HookMode::Failing as u8 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "db down"}),
        ),
        Some(v) => (StatusCode::OK, v),
    };
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    Ok(r)
}
