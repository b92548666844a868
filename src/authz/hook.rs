//! The authorization hook's client: `POST auth.hook_url` to the app backend, the way
//! Centrifugo's subscribe proxy and AnyCable's RPC ask (docs/protocol.md §10).
//!
//! One question (`subscribe` of an id, or `list`) per user is asked at most once at a
//! time: concurrent askers share the call, which runs in its own task so that it finishes
//! (and fills the cache) even when the connection that asked has gone. Each call holds a
//! slot of `auth.hook_concurrency` and one of its user's share (a quarter of the slots, at
//! least one); one deadline covers the wait for the slot and the request. Any failure is a
//! [`HookError`], never a "no".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Semaphore;

use super::cache::{Answer, Cache, Key, Question};
use super::{dedupe_valid, Kind};
use crate::config::AuthConfig;
use crate::metrics::Metrics;

/// Largest answer read from the hook (a `list` of many ids fits easily).
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Why the hook gave no answer. Not a denial: the client is told to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("the authorization hook did not answer in time")]
    Timeout,
    #[error("the authorization hook could not be reached")]
    Unreachable,
    #[error("the authorization hook answered HTTP {0}")]
    Status(u16),
    #[error("the authorization hook's answer is not the expected JSON")]
    BadResponse,
    #[error("too many authorization checks are in progress for this user")]
    Busy,
}

impl HookError {
    /// The `reason` label of `switchboard_auth_hook_failures_total`.
    pub fn label(self) -> &'static str {
        match self {
            HookError::Timeout => "timeout",
            HookError::Unreachable => "unreachable",
            HookError::Status(_) => "status",
            HookError::BadResponse => "bad_response",
            HookError::Busy => "busy",
        }
    }
}

type Call = Shared<BoxFuture<'static, Result<Answer, HookError>>>;

pub struct Hook {
    uri: Uri,
    authorization: Option<HeaderValue>,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
    slots: Arc<Semaphore>,
    per_user_max: usize,
    /// Calls in flight per user (entries leave at zero).
    per_user: Mutex<HashMap<Box<str>, usize>>,
    inflight: Mutex<HashMap<Key, Call>>,
    cache: Mutex<Cache>,
    metrics: Arc<Metrics>,
}

#[derive(Deserialize)]
struct AllowAnswer {
    allow: bool,
}

#[derive(Deserialize)]
struct ListAnswer {
    ids: Vec<String>,
}

impl Hook {
    /// None when `url` is not a URL (validated at start, so not expected here).
    pub fn new(url: &str, config: &AuthConfig, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        let uri: Uri = url.parse().ok()?;
        let authorization = config
            .hook_secret
            .as_ref()
            .and_then(|s| HeaderValue::from_str(&format!("Bearer {s}")).ok())
            .map(|mut v| {
                v.set_sensitive(true);
                v
            });
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_millis(config.hook_timeout_ms)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(config.hook_concurrency)
            .build(connector);
        Some(Arc::new(Self {
            uri,
            authorization,
            timeout: Duration::from_millis(config.hook_timeout_ms),
            client,
            slots: Arc::new(Semaphore::new(config.hook_concurrency)),
            per_user_max: (config.hook_concurrency / 4).max(1),
            per_user: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            cache: Mutex::new(Cache::new(Duration::from_secs(config.hook_cache_secs))),
            metrics,
        }))
    }

    pub async fn allows(
        self: &Arc<Self>,
        user: &str,
        kind: Kind,
        id: &str,
    ) -> Result<bool, HookError> {
        let key = Key {
            user: user.into(),
            question: Question::Subscribe {
                kind,
                id: id.into(),
            },
        };
        match self.ask(key).await? {
            Answer::Allow(allow) => Ok(allow),
            Answer::Ids(_) => Err(HookError::BadResponse),
        }
    }

    pub async fn list(
        self: &Arc<Self>,
        user: &str,
        kind: Kind,
    ) -> Result<Arc<[String]>, HookError> {
        let key = Key {
            user: user.into(),
            question: Question::List { kind },
        };
        match self.ask(key).await? {
            Answer::Ids(ids) => Ok(ids),
            Answer::Allow(_) => Err(HookError::BadResponse),
        }
    }

    /// The cached answer, or a share of the call in flight, or a new call.
    async fn ask(self: &Arc<Self>, key: Key) -> Result<Answer, HookError> {
        if let Some(answer) = self.cache.lock().get(&key, Instant::now()) {
            return Ok(answer);
        }
        let call = {
            let mut inflight = self.inflight.lock();
            match inflight.get(&key) {
                Some(call) => call.clone(),
                None => {
                    let Some(user_slot) = UserSlot::take(self, &key.user) else {
                        drop(inflight);
                        self.metrics.hook_failed(HookError::Busy.label());
                        return Err(HookError::Busy);
                    };
                    let hook = self.clone();
                    let task_key = key.clone();
                    let task = tokio::spawn(async move {
                        let result = hook.call(&task_key).await;
                        drop(user_slot);
                        match &result {
                            Ok(answer) => hook.remember(&task_key, answer),
                            Err(e) => hook.metrics.hook_failed(e.label()),
                        }
                        hook.inflight.lock().remove(&task_key);
                        result
                    });
                    let call = async move { task.await.unwrap_or(Err(HookError::Unreachable)) }
                        .boxed()
                        .shared();
                    inflight.insert(key, call.clone());
                    call
                }
            }
        };
        call.await
    }

    /// Caches an answer; a list also caches "allow" for each id on it, so acting on a
    /// listed project needs no second question.
    fn remember(&self, key: &Key, answer: &Answer) {
        let now = Instant::now();
        let mut cache = self.cache.lock();
        if let (Question::List { kind }, Answer::Ids(ids)) = (&key.question, answer) {
            for id in ids.iter() {
                let allow = Key {
                    user: key.user.clone(),
                    question: Question::Subscribe {
                        kind: *kind,
                        id: id.as_str().into(),
                    },
                };
                cache.put(allow, Answer::Allow(true), now);
            }
        }
        cache.put(key.clone(), answer.clone(), now);
    }

    /// One HTTP exchange within the deadline, waiting for a slot included.
    async fn call(&self, key: &Key) -> Result<Answer, HookError> {
        let body = match &key.question {
            Question::Subscribe { kind, id } => serde_json::json!({
                "action": "subscribe",
                "user_id": &*key.user,
                "kind": kind.as_str(),
                "id": &**id,
            }),
            Question::List { kind } => serde_json::json!({
                "action": "list",
                "user_id": &*key.user,
                "kind": kind.as_str(),
            }),
        };
        let exchange = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| HookError::Unreachable)?;
            let mut request = Request::builder()
                .method(Method::POST)
                .uri(self.uri.clone())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json");
            if let Some(auth) = &self.authorization {
                request = request.header(header::AUTHORIZATION, auth.clone());
            }
            let request = request
                .body(Full::new(Bytes::from(body.to_string())))
                .map_err(|_| HookError::Unreachable)?;
            let response = self
                .client
                .request(request)
                .await
                .map_err(|_| HookError::Unreachable)?;
            if response.status() != StatusCode::OK {
                return Err(HookError::Status(response.status().as_u16()));
            }
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| HookError::BadResponse)?
                .to_bytes();
            Ok(bytes)
        };
        let bytes = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| HookError::Timeout)??;
        match &key.question {
            Question::Subscribe { .. } => serde_json::from_slice::<AllowAnswer>(&bytes)
                .map(|a| Answer::Allow(a.allow))
                .map_err(|_| HookError::BadResponse),
            Question::List { .. } => serde_json::from_slice::<ListAnswer>(&bytes)
                .map(|a| Answer::Ids(dedupe_valid(a.ids).into()))
                .map_err(|_| HookError::BadResponse),
        }
    }
}

/// One of a user's share of hook slots, given back on drop.
struct UserSlot {
    hook: Arc<Hook>,
    user: Box<str>,
}

impl UserSlot {
    fn take(hook: &Arc<Hook>, user: &str) -> Option<Self> {
        let mut per_user = hook.per_user.lock();
        let n = per_user.entry(user.into()).or_insert(0);
        if *n >= hook.per_user_max {
            return None;
        }
        *n += 1;
        Some(Self {
            hook: hook.clone(),
            user: user.into(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut per_user = self.hook.per_user.lock();
        if let Some(n) = per_user.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                per_user.remove(&self.user);
            }
        }
    }
}
