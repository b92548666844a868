//! Configuration: one serde struct with documented defaults, loaded once at start.
//!
//! Sources, later wins: built-in defaults, `config/default.toml`-style file given with
//! `--config`, then the environment names of docs/protocol.md §1. The result is validated once
//! ([`Config::validate`]) and passed down explicitly; nothing reads the environment later.
//! Secrets never appear in [`Config::redacted_toml`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid value for {name}: {message}")]
    Env { name: &'static str, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Deployment environment; decides URLs, origin defaults and secret requirements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Docker,
    Production,
}

impl std::str::FromStr for Environment {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" => Ok(Self::Development),
            "docker" => Ok(Self::Docker),
            "production" | "prod" => Ok(Self::Production),
            other => Err(format!(
                "unknown environment {other:?} (expected development, docker or production)"
            )),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub ws: WsConfig,
    pub events: EventsConfig,
    pub api: ApiConfig,
    pub log: LogConfig,
    pub console: ConsoleConfig,
    pub stories: StoriesConfig,
}

/// Story progress sockets (docs/protocol.md §9).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoriesConfig {
    /// How long a story's latest progress is kept (`story:{id}:progress`).
    pub progress_ttl_secs: u64,
    /// After this long without a client message, the server sends the text `ping`.
    pub keepalive_secs: u64,
}

impl Default for StoriesConfig {
    fn default() -> Self {
        Self {
            progress_ttl_secs: 86_400,
            keepalive_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: String,
    /// Accept queue length (`listen(2)` backlog; the kernel caps it at somaxconn).
    pub listen_backlog: u32,
    pub environment: Environment,
    pub domain: String,
    pub backend_host: String,
    pub backend_port: Option<u16>,
    pub instance_id: Option<String>,
    pub trusted_proxies: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub handshake_rate_per_sec: u32,
    pub handshake_burst: u32,
    pub shutdown_grace_secs: u64,
    pub header_read_timeout_secs: u64,
    pub max_pending_connections: usize,
    // --- issue 10 (edge): per-source share of the pending cap, IPv6 keying, admin port.
    /// Of `max_pending_connections`, at most this many from one client key (IPv4 address,
    /// or IPv6 prefix of `ipv6_prefix_len` bits). 0 = no per-source cap.
    pub max_pending_per_ip: usize,
    /// IPv6 clients are keyed on this many leading bits for every per-IP limit (handshake
    /// rate, connection cap, pending cap): one host with a /64 is one client.
    pub ipv6_prefix_len: u8,
    /// Optional second listener (host:port) serving only /healthz, /readyz,
    /// /health/websocket and /metrics, outside the public port's limits.
    pub admin_listen: Option<String>,
    /// The seed's `CONTAINER_RESTART`: at start, once the broker is up, broadcast
    /// `container.reconnect` to every connection of every instance.
    pub container_restart: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    pub url: Option<String>,
    pub pool_size: usize,
    pub command_timeout_ms: u64,
    pub pubsub_ping_interval_ms: u64,
    pub reconnect_max_backoff_ms: u64,
    pub unsubscribe_linger_ms: u64,
    pub connection_ttl_secs: u64,
    /// The global channel (the seed's `REDIS_CHANNEL`, default `websocket:broadcast`).
    pub broadcast_channel: String,
    // --- issue 14 (docs/protocol.md §11): past one Redis
    /// Redis Cluster seed nodes, `host:port` (env `REDIS_CLUSTER_NODES`, comma-separated);
    /// instead of `url`.
    pub cluster_nodes: Vec<String>,
    /// Sentinels, `host:port` (env `REDIS_SENTINELS`, comma-separated); instead of `url`.
    pub sentinels: Vec<String>,
    /// The master name the sentinels monitor (env `REDIS_SENTINEL_MASTER`).
    pub sentinel_master: Option<String>,
    /// How long a failover may take before requests fail as unavailable (ms): the new master
    /// is looked for until then.
    pub failover_timeout_ms: u64,
    /// An API publish is acknowledged only once `WAIT` confirms this many replicas have it
    /// (0: acknowledged when the master has it; see docs/operations.md "Failover").
    pub publish_wait_replicas: u32,
    /// The `WAIT` timeout (ms); a publish not confirmed by then is answered 503.
    pub publish_wait_timeout_ms: u64,
    /// ACL user and password of the cluster's nodes, or of the Sentinel-managed master and
    /// its replicas (env `REDIS_USERNAME`, `REDIS_PASSWORD`). With `url`, credentials go in
    /// the URL instead.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sentinels' own password, when they have one (env `REDIS_SENTINEL_PASSWORD`).
    pub sentinel_password: Option<String>,
}

/// Which Redis the gateway uses (docs/protocol.md §11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTopology {
    Single {
        url: String,
    },
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
    Cluster {
        nodes: Vec<String>,
    },
}

/// Credentials for the nodes of a cluster or a Sentinel deployment (`Debug` hides them).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisCredentials {
    pub username: Option<String>,
    pub password: Option<String>,
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for RedisCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCredentials")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl RedisCredentials {
    /// `redis://[user:password@]addr/` (userinfo percent-encoded).
    pub fn node_url(&self, addr: &str) -> String {
        userinfo_url(self.username.as_deref(), self.password.as_deref(), addr)
    }

    /// The URL of a sentinel (its own password, if any).
    pub fn sentinel_url(&self, addr: &str) -> String {
        userinfo_url(None, self.sentinel_password.as_deref(), addr)
    }
}

fn userinfo_url(user: Option<&str>, password: Option<&str>, addr: &str) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    match password {
        Some(p) => format!(
            "redis://{}:{}@{addr}/",
            user.map(enc).unwrap_or_default(),
            enc(p)
        ),
        None => format!("redis://{addr}/"),
    }
}

impl RedisConfig {
    /// One line for `check-config`: the topology and where it starts from (the current
    /// Sentinel master and the cluster's masters are in `/health/websocket`).
    pub fn describe_topology(&self) -> String {
        match self.topology() {
            None => "embedded (no Redis)".into(),
            Some(RedisTopology::Single { .. }) => "single".into(),
            Some(RedisTopology::Sentinel { sentinels, master }) => {
                format!(
                    "sentinel (master {master:?}, sentinels {})",
                    sentinels.join(",")
                )
            }
            Some(RedisTopology::Cluster { nodes }) => {
                format!("cluster (seed nodes {})", nodes.join(","))
            }
        }
    }

    /// Credentials for cluster nodes, the Sentinel master and the sentinels.
    pub fn credentials(&self) -> RedisCredentials {
        RedisCredentials {
            username: self.username.clone(),
            password: self.password.clone(),
            sentinel_password: self.sentinel_password.clone(),
        }
    }

    /// The topology configured; None: no Redis (the embedded broker).
    pub fn topology(&self) -> Option<RedisTopology> {
        if !self.cluster_nodes.is_empty() {
            return Some(RedisTopology::Cluster {
                nodes: self.cluster_nodes.clone(),
            });
        }
        if !self.sentinels.is_empty() {
            return Some(RedisTopology::Sentinel {
                sentinels: self.sentinels.clone(),
                master: self.sentinel_master.clone().unwrap_or_default(),
            });
        }
        self.url.clone().map(|url| RedisTopology::Single { url })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub jwt_secret: Option<String>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    pub session_recheck_secs: u64,
    // --- issue 10 (edge)
    /// Refuse ES256 signatures in high-S form (default: normalise them to low-S).
    pub es256_require_low_s: bool,
    // --- issue 12 (authorization hook, docs/protocol.md §10)
    /// The app backend asked when the credential grants nothing (env
    /// `SWITCHBOARD_AUTH_HOOK_URL`); None: no hook, the credential alone decides.
    pub hook_url: Option<String>,
    /// Sent as `Authorization: Bearer <secret>` (env `SWITCHBOARD_AUTH_HOOK_SECRET`).
    pub hook_secret: Option<String>,
    /// One hook call's whole budget, waiting for a free slot included (milliseconds).
    pub hook_timeout_ms: u64,
    /// How long an answer (allow, deny or a list) is reused; 0: never cached.
    pub hook_cache_secs: u64,
    /// Hook calls in flight at once; more wait (within their timeout).
    pub hook_concurrency: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WsConfig {
    pub heartbeat_interval_secs: u64,
    pub idle_timeout_secs: u64,
    pub max_message_bytes: usize,
    pub outbound_queue_messages: usize,
    pub outbound_queue_bytes: usize,
    pub client_messages_per_sec: u32,
    pub client_messages_burst: u32,
    pub rate_limit_close_after: u32,
    pub max_invalid_in_row: u32,
    pub max_json_depth: usize,
    pub max_subscriptions_per_connection: usize,
    /// A connection's longest life, seconds (the seed's `WS_CONNECTION_TIMEOUT`); 0: none.
    /// Past it the connection is closed 1001 `connection timeout` and clients reconnect
    /// (and resume).
    pub max_connection_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub max_event_bytes: usize,
    pub max_json_depth: usize,
    pub allow_unknown_types: bool,
    pub history_max_len: usize,
    pub history_ttl_secs: u64,
    pub terminal_task_ttl_secs: u64,
    /// Most bytes of events one project's resume tail holds, and so the most one resuming
    /// connection is replayed; a client further behind gets `connection.resync_required`.
    pub replay_max_bytes: usize,
    /// Largest `status` snapshot frame: past it, the most recently updated entries that fit
    /// are sent with `"truncated": true`.
    pub snapshot_max_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    pub max_body_bytes: usize,
    /// Longest wait for a request body once its headers are in (a body trickled byte by
    /// byte holds a task and its credential check for this long at most); beyond: 408.
    pub body_read_timeout_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
}

/// The live event console at `/console` (src/console.rs).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Unset: the environment decides ([`Config::console_enabled`]). An option rather than
    /// a bool so that a production config never inherits the development default.
    pub enabled: Option<bool>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            listen_backlog: 4096,
            environment: Environment::Development,
            domain: "localhost".into(),
            backend_host: "localhost".into(),
            backend_port: None,
            instance_id: None,
            trusted_proxies: Vec::new(),
            allowed_origins: Vec::new(),
            max_connections: 100_000,
            max_connections_per_ip: 10_000,
            handshake_rate_per_sec: 20,
            handshake_burst: 40,
            shutdown_grace_secs: 10,
            header_read_timeout_secs: 10,
            max_pending_connections: 2_000,
            max_pending_per_ip: 256,
            ipv6_prefix_len: 64,
            admin_listen: None,
            container_restart: false,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
            command_timeout_ms: 2_000,
            pubsub_ping_interval_ms: 3_000,
            reconnect_max_backoff_ms: 5_000,
            unsubscribe_linger_ms: 1_000,
            connection_ttl_secs: 0,
            broadcast_channel: String::from("websocket:broadcast"),
            cluster_nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: None,
            failover_timeout_ms: 15_000,
            publish_wait_replicas: 0,
            publish_wait_timeout_ms: 1_000,
            username: None,
            password: None,
            sentinel_password: None,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: None,
            jwt_public_key_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 0,
            session_recheck_secs: 30,
            es256_require_low_s: false,
            hook_url: None,
            hook_secret: None,
            hook_timeout_ms: 1000,
            hook_cache_secs: 30,
            hook_concurrency: 64,
        }
    }
}

impl Default for WsConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_secs: 30,
            idle_timeout_secs: 75,
            max_message_bytes: 64 * 1024,
            outbound_queue_messages: 1024,
            outbound_queue_bytes: 1024 * 1024,
            client_messages_per_sec: 50,
            client_messages_burst: 100,
            rate_limit_close_after: 50,
            max_invalid_in_row: 10,
            max_json_depth: 32,
            max_subscriptions_per_connection: 100,
            max_connection_secs: 0,
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: 256 * 1024,
            max_json_depth: 64,
            allow_unknown_types: false,
            history_max_len: 10_000,
            history_ttl_secs: 86_400,
            terminal_task_ttl_secs: 3_600,
            replay_max_bytes: 4 * 1024 * 1024,
            snapshot_max_bytes: 256 * 1024,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            body_read_timeout_secs: 10,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: "text".into(),
        }
    }
}

/// Reads an environment variable, treating empty values as unset.
type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl Config {
    /// Loads defaults, then `file` (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let lookup = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Self::load_with(file, &lookup)
    }

    pub fn load_with(file: Option<&Path>, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_owned(),
                    source,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    fn apply_env(&mut self, env: EnvLookup<'_>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(
            env: EnvLookup<'_>,
            name: &'static str,
        ) -> Result<Option<T>, ConfigError> {
            match env(name) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| ConfigError::Env {
                    name,
                    message: format!("{v:?} is not a valid number"),
                }),
            }
        }
        if let Some(v) = env("SWITCHBOARD_LISTEN") {
            self.server.listen = v;
        }
        if let Some(v) = env("SWITCHBOARD_ADMIN_LISTEN") {
            self.server.admin_listen = Some(v).filter(|v| !v.trim().is_empty());
        }
        if let Some(v) = env("REDIS_URL") {
            self.redis.url = Some(v);
        }
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        if let Some(v) = env("REDIS_CLUSTER_NODES") {
            self.redis.cluster_nodes = list(v);
        }
        if let Some(v) = env("REDIS_SENTINELS") {
            self.redis.sentinels = list(v);
        }
        if let Some(v) = env("REDIS_SENTINEL_MASTER") {
            self.redis.sentinel_master = Some(v).filter(|v| !v.trim().is_empty());
        }
        if let Some(v) = env("REDIS_USERNAME") {
            self.redis.username = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("REDIS_PASSWORD") {
            self.redis.password = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("REDIS_SENTINEL_PASSWORD") {
            self.redis.sentinel_password = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = env("SWITCHBOARD_JWT_SECRET") {
            self.auth.jwt_secret = Some(v);
        }
        if let Some(v) = env("SWITCHBOARD_JWT_PUBLIC_KEY_FILE") {
            self.auth.jwt_public_key_file = Some(v.into());
        }
        if let Some(v) = env("SWITCHBOARD_AUTH_HOOK_URL") {
            self.auth.hook_url = Some(v);
        }
        if let Some(v) = env("SWITCHBOARD_AUTH_HOOK_SECRET") {
            self.auth.hook_secret = Some(v);
        }
        if let Some(v) = num(env, "WS_HEARTBEAT_INTERVAL")? {
            self.ws.heartbeat_interval_secs = v;
        }
        if let Some(v) = num(env, "WS_IDLE_TIMEOUT")? {
            self.ws.idle_timeout_secs = v;
        }
        // The seed's other settings (docs/protocol.md §1): honoured, not ignored.
        if let Some(v) = num(env, "WS_CONNECTION_TIMEOUT")? {
            self.ws.max_connection_secs = v;
        }
        if let Some(v) = env("REDIS_CHANNEL") {
            self.redis.broadcast_channel = v;
        }
        if let Some(v) = env("CONTAINER_RESTART") {
            self.server.container_restart = parse_bool(&v).ok_or_else(|| ConfigError::Env {
                name: "CONTAINER_RESTART",
                message: format!("{v:?} is not a boolean (true/false, 1/0, on/off)"),
            })?;
        }
        if let Some(v) = env("ENVIRONMENT") {
            self.server.environment = v.parse().map_err(|message| ConfigError::Env {
                name: "ENVIRONMENT",
                message,
            })?;
        }
        if let Some(v) = env("DOMAIN") {
            self.server.domain = v;
        }
        if let Some(v) = env("BACKEND_HOST") {
            self.server.backend_host = v;
        }
        if let Some(v) = num(env, "BACKEND_PORT")? {
            self.server.backend_port = Some(v);
        }
        if let Some(v) = env("CONTAINER_ID") {
            self.server.instance_id = Some(v);
        }
        if let Some(v) = num(env, "SWITCHBOARD_SHUTDOWN_GRACE")? {
            self.server.shutdown_grace_secs = v;
        }
        if let Some(v) = env("SWITCHBOARD_LOG_FORMAT") {
            self.log.format = v;
        }
        if let Some(v) = env("SWITCHBOARD_CONSOLE") {
            self.console.enabled = Some(parse_bool(&v).ok_or_else(|| ConfigError::Env {
                name: "SWITCHBOARD_CONSOLE",
                message: format!("{v:?} is not a boolean (true/false, 1/0, on/off)"),
            })?);
        }
        Ok(())
    }

    /// Checks everything that can be checked without I/O, once, at start.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen_addr().is_err() {
            return bad(format!(
                "server.listen {:?} is not host:port",
                self.server.listen
            ));
        }
        for cidr in &self.server.trusted_proxies {
            if parse_cidr(cidr).is_none() {
                return bad(format!(
                    "server.trusted_proxies: {cidr:?} is not an IP or CIDR"
                ));
            }
        }
        let channel = &self.redis.broadcast_channel;
        if channel.is_empty()
            || channel.starts_with("project:")
            || channel.starts_with("story:")
            || channel.starts_with("ws:")
            || channel.starts_with("session:")
        {
            return bad(format!(
                "redis.broadcast_channel (REDIS_CHANNEL) {channel:?} must be non-empty and outside \
                 the gateway's own namespaces (project:, story:, ws:, session:)"
            ));
        }
        let redis = &self.redis;
        let chosen = [
            redis.url.is_some(),
            !redis.cluster_nodes.is_empty(),
            !redis.sentinels.is_empty(),
        ];
        if chosen.iter().filter(|c| **c).count() > 1 {
            return bad(
                "choose one Redis: redis.url (REDIS_URL), redis.cluster_nodes \
                 (REDIS_CLUSTER_NODES) or redis.sentinels (REDIS_SENTINELS)"
                    .into(),
            );
        }
        for (what, addrs) in [
            (
                "redis.cluster_nodes (REDIS_CLUSTER_NODES)",
                &redis.cluster_nodes,
            ),
            ("redis.sentinels (REDIS_SENTINELS)", &redis.sentinels),
        ] {
            if let Some(bad_addr) = addrs.iter().find(|a| !is_host_port(a)) {
                return bad(format!("{what}: {bad_addr:?} is not host:port"));
            }
        }
        if redis.url.is_some() && (redis.username.is_some() || redis.password.is_some()) {
            return bad("with redis.url (REDIS_URL) the credentials go in the URL \
                 (redis://user:password@host:port); redis.username and redis.password \
                 (REDIS_USERNAME, REDIS_PASSWORD) are for a cluster or Sentinel"
                .into());
        }
        if redis.username.is_some() && redis.password.is_none() {
            return bad("redis.username (REDIS_USERNAME) needs redis.password".into());
        }
        if !redis.sentinels.is_empty() && redis.sentinel_master.is_none() {
            return bad(
                "redis.sentinels needs redis.sentinel_master (REDIS_SENTINEL_MASTER): the name \
                 the sentinels monitor"
                    .into(),
            );
        }
        if redis.publish_wait_replicas > 0
            && redis.publish_wait_timeout_ms >= redis.command_timeout_ms
        {
            // The WAIT runs inside the command's own timeout: past it, a publish would be
            // answered "broker unavailable" instead of "not replicated".
            return bad(format!(
                "redis.publish_wait_timeout_ms ({}) must be below redis.command_timeout_ms ({})",
                redis.publish_wait_timeout_ms, redis.command_timeout_ms
            ));
        }
        if redis.failover_timeout_ms == 0 || redis.publish_wait_timeout_ms == 0 {
            return bad(
                "redis.failover_timeout_ms and redis.publish_wait_timeout_ms must be at least 1"
                    .into(),
            );
        }
        if let Some(url) = &self.redis.url {
            if url.starts_with("rediss://") {
                // Said here, not as "broker setup failed" at start: the Redis client is
                // built without TLS (docs/operations.md "Sentinel and Cluster").
                return bad(
                    "redis.url: rediss:// (TLS) is not supported by this build; use redis:// on \
                     a private network or a local TLS tunnel"
                        .into(),
                );
            }
            if !(url.starts_with("redis://") || url.starts_with("unix://")) {
                return bad("redis.url must start with redis:// or unix://".into());
            }
        }
        if let Some(url) = &self.auth.hook_url {
            if let Err(why) = hook_url_problem(url) {
                return bad(format!("auth.hook_url (SWITCHBOARD_AUTH_HOOK_URL) {why}"));
            }
        }
        if self.auth.hook_timeout_ms == 0 || self.auth.hook_concurrency == 0 {
            return bad("auth.hook_timeout_ms and auth.hook_concurrency must be at least 1".into());
        }
        if let Some(secret) = &self.auth.hook_secret {
            if http::HeaderValue::from_str(&format!("Bearer {secret}")).is_err() {
                return bad(
                    "auth.hook_secret (SWITCHBOARD_AUTH_HOOK_SECRET) must be printable ASCII"
                        .into(),
                );
            }
        }
        if self.ws.heartbeat_interval_secs == 0 {
            return bad("ws.heartbeat_interval_secs must be at least 1".into());
        }
        if self.ws.idle_timeout_secs == 0 {
            return bad("ws.idle_timeout_secs must be at least 1".into());
        }
        if self.ws.outbound_queue_messages < 2 || self.ws.outbound_queue_bytes < 1024 {
            return bad(
                "ws.outbound_queue_messages must be >= 2 and ws.outbound_queue_bytes >= 1024"
                    .into(),
            );
        }
        // --- issue 10 (edge)
        if !(1..=128).contains(&self.server.ipv6_prefix_len) {
            return bad("server.ipv6_prefix_len must be between 1 and 128".into());
        }
        if self.admin_listen_addr().is_some_and(|a| a.is_err()) {
            return bad(format!(
                "server.admin_listen {:?} is not host:port",
                self.server.admin_listen.as_deref().unwrap_or("")
            ));
        }
        if self.server.header_read_timeout_secs == 0 {
            return bad("server.header_read_timeout_secs must be at least 1".into());
        }
        let depth = 1..=crate::json_depth::PARSER_LIMIT;
        if !depth.contains(&self.ws.max_json_depth) || !depth.contains(&self.events.max_json_depth)
        {
            return bad(format!(
                "ws.max_json_depth and events.max_json_depth must be between 1 and {} \
                 (the JSON parser's own limit)",
                crate::json_depth::PARSER_LIMIT
            ));
        }
        if self.ws.max_subscriptions_per_connection == 0 {
            return bad("ws.max_subscriptions_per_connection must be at least 1".into());
        }
        if self.ws.max_message_bytes < 128 {
            return bad("ws.max_message_bytes must be at least 128".into());
        }
        if self.events.max_event_bytes < 64 || self.api.max_body_bytes < 64 {
            return bad("events.max_event_bytes and api.max_body_bytes must be >= 64".into());
        }
        if self.events.replay_max_bytes < self.events.max_event_bytes {
            return bad("events.replay_max_bytes must be at least events.max_event_bytes".into());
        }
        if self.events.snapshot_max_bytes < 1024 {
            return bad("events.snapshot_max_bytes must be at least 1024".into());
        }
        if self.api.body_read_timeout_secs == 0 {
            return bad("api.body_read_timeout_secs must be at least 1".into());
        }
        if self.events.history_max_len == 0 {
            return bad("events.history_max_len must be at least 1".into());
        }
        if let Some(id) = &self.server.instance_id {
            if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
                return bad(
                    "CONTAINER_ID / server.instance_id must be 1..128 printable characters".into(),
                );
            }
        }
        match self.log.format.as_str() {
            "text" | "json" => {}
            other => return bad(format!("log.format {other:?} must be text or json")),
        }
        if self.server.environment == Environment::Production && !self.has_credential_key() {
            return bad(
                "ENVIRONMENT=production needs an explicit JWT key: set SWITCHBOARD_JWT_SECRET \
                 (HS256) or SWITCHBOARD_JWT_PUBLIC_KEY_FILE (RS256/ES256)"
                    .into(),
            );
        }
        Ok(())
    }

    pub fn event_policy(&self) -> crate::schema::Policy {
        crate::schema::Policy {
            allow_unknown_types: self.events.allow_unknown_types,
            max_json_depth: self.events.max_json_depth,
        }
    }

    /// Whether `/console` is served: `console.enabled` when set, else on everywhere but
    /// production (development and docker are the stacks people debug by hand; a
    /// production gateway serves no page unless its operator asks for one).
    pub fn console_enabled(&self) -> bool {
        self.console
            .enabled
            .unwrap_or(self.server.environment != Environment::Production)
    }

    pub fn has_credential_key(&self) -> bool {
        self.auth.jwt_secret.is_some() || self.auth.jwt_public_key_file.is_some()
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, std::net::AddrParseError> {
        let listen = self.server.listen.replace("localhost", "127.0.0.1");
        listen.parse()
    }

    /// `server.admin_listen` parsed; `None` when no admin listener is configured.
    pub fn admin_listen_addr(&self) -> Option<Result<SocketAddr, std::net::AddrParseError>> {
        let listen = self.server.admin_listen.as_deref()?;
        Some(listen.replace("localhost", "127.0.0.1").parse())
    }

    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.server
            .trusted_proxies
            .iter()
            .filter_map(|c| parse_cidr(c))
            .collect()
    }

    /// Origins accepted on a browser handshake; `*` accepts any.
    pub fn allowed_origins(&self) -> Vec<String> {
        if !self.server.allowed_origins.is_empty() {
            return self.server.allowed_origins.clone();
        }
        match self.server.environment {
            Environment::Production => vec![format!("https://{}", self.server.domain)],
            _ => vec!["*".into()],
        }
    }

    /// The effective config as TOML with every secret replaced.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        if copy.auth.jwt_secret.is_some() {
            copy.auth.jwt_secret = Some("<redacted>".into());
        }
        if copy.auth.hook_secret.is_some() {
            copy.auth.hook_secret = Some("<redacted>".into());
        }
        if let Some(url) = &copy.auth.hook_url {
            copy.auth.hook_url = Some(redact_url_password(url));
        }
        if let Some(url) = &copy.redis.url {
            copy.redis.url = Some(redact_url_password(url));
        }
        for secret in [&mut copy.redis.password, &mut copy.redis.sentinel_password] {
            if secret.is_some() {
                *secret = Some("<redacted>".into());
            }
        }
        // Effective, not "unset": whether this gateway serves /console is what an operator asks.
        copy.console.enabled = Some(self.console_enabled());
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `host:port` with a port in range (a cluster node or a sentinel).
fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
        None => false,
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Some(true),
        "false" | "0" | "off" | "no" => Some(false),
        _ => None,
    }
}

fn parse_cidr(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// Why `url` cannot be the authorization hook's address, if it cannot: the hook is an
/// app backend beside the gateway, reached over plain HTTP/1.1 (no TLS client is built in;
/// an `https://` backend is reached through a local TLS sidecar).
fn hook_url_problem(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: https is not supported; point it at an http:// address (a local TLS \
                 sidecar for a remote backend)"
            ))
        }
        _ => return Err(format!("{url:?} must start with http://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} has no host"));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(format!(
            "{url:?}: credentials in the URL are not sent; use auth.hook_secret"
        ));
    }
    Ok(())
}

/// `redis://user:secret@host` becomes `redis://user:<redacted>@host`, and a `pass=` or
/// `password=` query parameter (how `unix://` URLs carry the password:
/// `unix:///run/redis.sock?db=1&pass=secret`) becomes `pass=<redacted>`.
pub fn redact_url_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                if key.eq_ignore_ascii_case("pass") || key.eq_ignore_ascii_case("password") {
                    format!("{key}=<redacted>")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let redacted = match userinfo.find(':') {
        Some(colon) => format!("{}:<redacted>", &userinfo[..colon]),
        None => "<redacted>".to_owned(),
    };
    format!("{}://{}@{}", &url[..scheme_end], redacted, &rest[at + 1..])
}

#[cfg(test)]
mod tests;
