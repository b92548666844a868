//! The shared state of one gateway instance, built once at start and passed down.
//!
//! Holds the validated config, the hub, the broker, the authenticator, the connection caps
//! and the draining flag. Nothing in here is global; tests build as many instances as
//! they like in one process.

use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_middleware::{Authenticator, JwtConfig, JwtVerifier};

use crate::broker::{memory::MemoryBroker, redis::RedisBroker, Broker, HistoryLimits};
use crate::config::Config;
use crate::hub::Hub;
use crate::limits::ConnectionLimits;
use crate::metrics::Metrics;
use crate::session::outbox::Limits;
use crate::stream::StreamContext;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot read JWT public key {path}: {source}")]
    PublicKey {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid JWT configuration: {0}")]
    Jwt(String),
    #[error("broker setup failed: {0}")]
    Broker(String),
}

pub struct App {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub broker: Broker,
    pub auth: Arc<Authenticator>,
    /// Who may follow what: the credential's grants, then the app backend's hook (§10).
    pub authz: crate::authz::Authorizer,
    pub limits: Arc<ConnectionLimits>,
    pub instance_id: String,
    pub started: Instant,
    /// What `GET /metrics` renders.
    pub exporter: crate::exporter::Exporter,
    draining: AtomicBool,
    /// Sessions from their registration in the hub until they leave it (a token is taken
    /// before `hub.register` and dropped right after `hub.unregister`): what the drain
    /// waits for.
    pub sessions: tokio_util::task::TaskTracker,
    /// The port actually bound (the config may say 0).
    listen_port: AtomicU16,
}

impl App {
    /// Builds the instance. Must run inside a tokio runtime (the Redis subscription
    /// manager is spawned).
    pub fn build(config: Config) -> Result<Arc<Self>, AppError> {
        let config = Arc::new(config);
        let instance_id =
            config.server.instance_id.clone().unwrap_or_else(|| {
                format!("sb-{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
            });
        let history = HistoryLimits {
            max_len: config.events.history_max_len,
            ttl: Duration::from_secs(config.events.history_ttl_secs),
            terminal_task_ttl: Duration::from_secs(config.events.terminal_task_ttl_secs),
            snapshot_max_bytes: config.events.snapshot_max_bytes,
            replay_max_bytes: config.events.replay_max_bytes,
            story_ttl: Duration::from_secs(config.stories.progress_ttl_secs),
        };
        let linger = Duration::from_millis(config.redis.unsubscribe_linger_ms);
        let policy = config.event_policy();
        let metrics = Arc::new(Metrics::default());
        let streams = StreamContext {
            tail_len: config.events.history_max_len,
            tail_bytes: config.events.replay_max_bytes,
            policy,
            metrics: metrics.clone(),
        };
        // The flow is one way: the broker hands what it receives to the hub (its sink),
        // the hub sends subscription requests to the broker's manager over a channel.
        let (hub, broker) = match &config.redis.topology() {
            None => {
                let hub = Hub::new(None, linger, streams);
                let broker = Broker::Memory(MemoryBroker::new(history));
                broker.attach_sink(hub.clone());
                (hub, broker)
            }
            Some(topology) => {
                let (tx, rx) = tokio::sync::mpsc::channel(crate::broker::SUB_QUEUE);
                let hub = Hub::new(Some(tx), linger, streams);
                // Bounded: a connect storm waits here rather than growing a queue.
                let (records_tx, records_rx) = tokio::sync::mpsc::channel(10_000);
                let redis = RedisBroker::new(
                    topology,
                    &config.redis,
                    history,
                    records_tx,
                    policy,
                    metrics,
                )
                .map_err(|e| AppError::Broker(e.to_string()))?;
                let broker = Broker::Redis(redis.clone());
                broker.attach_sink(hub.clone());
                tokio::spawn(redis.clone().run_pubsub(rx));
                tokio::spawn(redis.run_records(records_rx));
                (hub, broker)
            }
        };
        let exporter = crate::exporter::Exporter::new(hub.clone(), broker.clone());
        let jwt_secret = config
            .auth
            .jwt_secret
            .as_ref()
            .map(|s| s.as_bytes().to_vec());
        let public_key_pem = match &config.auth.jwt_public_key_file {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|source| AppError::PublicKey {
                path: path.display().to_string(),
                source,
            })?),
        };
        let jwt = if jwt_secret.is_some() || public_key_pem.is_some() {
            Some(
                JwtVerifier::new(JwtConfig {
                    hs256_secret: jwt_secret.clone(),
                    public_key_pem,
                    issuer: config.auth.issuer.clone(),
                    audience: config.auth.audience.clone(),
                    leeway_secs: config.auth.leeway_secs,
                    es256_require_low_s: config.auth.es256_require_low_s,
                })
                .map_err(|e| AppError::Jwt(e.to_string()))?,
            )
        } else {
            None
        };
        let auth = Arc::new(Authenticator::new(jwt, broker.session_store()));
        let authz = crate::authz::Authorizer::new(
            &config.auth,
            config.ws.max_subscriptions_per_connection,
            hub.metrics.clone(),
        );
        let limits = ConnectionLimits::keyed(
            config.server.max_connections,
            config.server.max_connections_per_ip,
            config.server.ipv6_prefix_len,
        );
        Ok(Arc::new(Self {
            config,
            hub,
            broker,
            auth,
            authz,
            limits,
            instance_id,
            started: Instant::now(),
            exporter,
            draining: AtomicBool::new(false),
            sessions: tokio_util::task::TaskTracker::new(),
            listen_port: AtomicU16::new(0),
        }))
    }

    pub fn set_listen_port(&self, port: u16) {
        self.listen_port.store(port, Ordering::Relaxed);
    }

    /// `BACKEND_PORT`, defaulting to the port we listen on (docs/protocol.md §8).
    pub fn backend_port(&self) -> u16 {
        self.config
            .server
            .backend_port
            .unwrap_or_else(|| self.listen_port.load(Ordering::Relaxed))
    }

    /// Records (Redis mode) how many command streams of `project` this instance holds, read
    /// when the write happens (docs/protocol.md §6: `delivered_to` counts them).
    pub async fn note_command_streams(&self, project: &str) {
        let hub = Arc::downgrade(&self.hub);
        let id = project.to_owned();
        let count = crate::broker::LiveCount(Arc::new(move || {
            hub.upgrade().map_or(0, |h| h.command_streams(&id))
        }));
        self.broker
            .note_command_streams(project, &self.instance_id, count, self.record_ttl())
            .await;
    }

    pub fn outbox_limits(&self) -> Limits {
        Limits {
            messages: self.config.ws.outbound_queue_messages,
            bytes: self.config.ws.outbound_queue_bytes,
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    /// Ready: broker reachable and not draining.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && self.broker.is_up()
    }

    /// Joins `session` to `project`, waiting at most twice the broker's command timeout
    /// (queueing plus the SUBSCRIBE round trip): a handshake or a `subscribe` never hangs
    /// on a busy or reconnecting subscription manager.
    /// `holding`: the session's events wait for its greeting ([`Hub::join`]).
    pub async fn join_project(
        &self,
        project: &str,
        session: &Arc<crate::session::Session>,
        holding: bool,
    ) -> Result<(), crate::hub::HubError> {
        // A story session's ids are stories, a command stream's are its project's commands:
        // the same join, in their family.
        let family = crate::hub::family_of(session);
        let wait = Duration::from_millis(self.config.redis.command_timeout_ms.max(100) * 2);
        let joining = self.hub.join_in(family, project, session, holding);
        match tokio::time::timeout(wait, joining).await {
            Ok(joined) => joined,
            Err(_) => {
                self.hub.leave_in(family, project, session);
                Err(crate::hub::HubError::SubscribeFailed)
            }
        }
    }

    /// TTL of connection records and the instance registry entry.
    pub fn record_ttl(&self) -> Duration {
        let secs = match self.config.redis.connection_ttl_secs {
            0 => (self.config.ws.heartbeat_interval_secs * 3).max(10),
            n => n,
        };
        Duration::from_secs(secs)
    }
}
