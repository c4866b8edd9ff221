//! The gateway's configuration: one typed struct, read once from flags and environment, passed
//! explicitly. Environment names follow Supabase Realtime's self-hosting names where one exists.

use clap::Parser;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Output format of the logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Command-line flags and environment.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "realtime-gateway",
    version,
    about = "A Supabase Realtime compatible gateway"
)]
pub struct Config {
    /// Postgres URL. With it, the gateway serves Postgres Changes and broadcast from the database
    /// over one durable replication slot.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,

    /// Name of the durable logical replication slot.
    #[arg(long, env = "SLOT_NAME", default_value = "realtime_gateway")]
    pub slot_name: String,

    /// Publication whose tables Postgres Changes can stream.
    #[arg(long, env = "PUBLICATION", default_value = "supabase_realtime")]
    pub publication: String,

    /// Do not apply the `realtime` schema migrations at start.
    #[arg(long, env = "DISABLE_MIGRATIONS", default_value_t = false)]
    pub disable_migrations: bool,

    /// Records larger than this many bytes are delivered with only their small fields and
    /// `Error 413` (the reference's `poll_max_record_bytes`).
    #[arg(long, env = "MAX_RECORD_BYTES", default_value_t = 1_048_576)]
    pub max_record_bytes: usize,

    /// Address to listen on.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,

    /// Port to listen on.
    #[arg(long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Secret of HS256/384/512 tokens (the project's JWT secret). Also read from `JWT_SECRET`.
    /// Without one, a random secret is generated and development keys are printed.
    #[arg(long, env = "API_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,

    /// Delay before a refused WebSocket upgrade is answered, in ms.
    #[arg(long, env = "CONNECT_ERROR_BACKOFF_MS", default_value_t = 2000)]
    pub connect_error_backoff_ms: u64,

    /// Delay before a join error reply, in ms.
    #[arg(long, env = "CHANNEL_ERROR_BACKOFF_MS", default_value_t = 5000)]
    pub channel_error_backoff_ms: u64,

    /// A socket that sent nothing for this long is closed, in ms.
    #[arg(long, env = "WEBSOCKET_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub websocket_idle_timeout_ms: u64,

    /// Largest broadcast or presence payload, in KB (the reference's `max_payload_size_in_kb`).
    #[arg(long, env = "MAX_PAYLOAD_SIZE_IN_KB", default_value_t = 3000)]
    pub max_payload_size_in_kb: u64,

    /// Channels one socket may join (the reference's `max_channels_per_client`).
    #[arg(long, env = "MAX_CHANNELS_PER_CLIENT", default_value_t = 100)]
    pub max_channels_per_client: usize,

    /// Track/untrack pushes one channel may make per window (the reference's
    /// `max_client_presence_events_per_window`).
    #[arg(long, env = "CLIENT_PRESENCE_MAX_CALLS", default_value_t = 5)]
    pub client_presence_max_calls: u32,

    /// The presence rate window, in ms.
    #[arg(long, env = "CLIENT_PRESENCE_WINDOW_MS", default_value_t = 30_000)]
    pub client_presence_window_ms: u64,

    /// Push `presence_state` after every join, also to clients that do not ask for presence
    /// (the reference's tenant flag `presence_enabled`; realtime-js 2.11 never asks).
    #[arg(long, env = "PRESENCE_ENABLED", default_value_t = false)]
    pub presence_enabled: bool,

    /// Largest WebSocket frame accepted from a client, in bytes.
    #[arg(long, env = "MAX_FRAME_SIZE", default_value_t = 5_000_000)]
    pub max_frame_size: usize,

    /// Frames a socket's outbox holds before the socket is closed as a slow consumer.
    #[arg(long, env = "OUTBOX_MAX_FRAMES", default_value_t = 4096)]
    pub outbox_max_frames: usize,

    /// Bytes a socket's outbox holds before the socket is closed as a slow consumer.
    #[arg(long, env = "OUTBOX_MAX_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub outbox_max_bytes: usize,

    /// How long the change stream waits for a socket whose outbox is full (a large transaction
    /// fills healthy sockets faster than they drain) before closing it as a slow consumer.
    #[arg(long, env = "SLOW_CONSUMER_MS", default_value_t = 5_000)]
    pub slow_consumer_ms: u64,

    /// A DELETE of an RLS table whose old row the gateway does not know (the table does not
    /// have REPLICA IDENTITY FULL, and the row was not seen since start): `reference` sends it
    /// to every subscriber with the primary key only, as Supabase Realtime does; `withhold`
    /// sends it to nobody.
    #[arg(long, env = "DELETE_UNKNOWN", value_enum, default_value = "reference")]
    pub delete_unknown: crate::changes::deletes::DeleteUnknown,

    /// Bytes of rows of RLS tables remembered for DELETEs that carry only the key.
    #[arg(long, env = "DELETE_MEMORY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub delete_memory_bytes: usize,

    /// How long a channel whose socket went away without leaving stays parked: a join of the
    /// same client within this time gets the changes it missed.
    #[arg(long, env = "RESUME_WINDOW_MS", default_value_t = 30_000)]
    pub resume_window_ms: u64,

    /// The most WAL parked and live channels may hold in the replication slot (bytes between
    /// the oldest position they need and the newest change); past it the oldest lose resume.
    #[arg(long, env = "RESUME_MAX_RETAINED_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub resume_max_retained_bytes: u64,

    /// The file that keeps channels' positions across a restart (default: next to the binary,
    /// `realtime-resume-<slot>.state`; the temporary directory when that is not writable).
    #[arg(long, env = "RESUME_STATE_PATH")]
    pub resume_state_path: Option<std::path::PathBuf>,

    /// Channels the resume state file has room for (64 bytes each).
    #[arg(long, env = "RESUME_SLOTS", default_value_t = 262_144)]
    pub resume_slots: u32,

    /// NATS servers (`nats://host:port`, comma-separated for a NATS cluster): several gateway
    /// nodes share Broadcast and Presence through them. Unset: a single node.
    #[arg(long, env = "CLUSTER_NATS_URL")]
    pub cluster_nats_url: Option<String>,

    /// This node's name in the cluster (default: `gw-` and 8 random hex digits).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// The first token of every NATS subject this cluster uses (clusters sharing one NATS
    /// differ by it).
    #[arg(long, env = "CLUSTER_PREFIX", default_value = "rt")]
    pub cluster_prefix: String,

    /// How often a node tells the others it is alive, in ms.
    #[arg(long, env = "NODE_HEARTBEAT_MS", default_value_t = 1000)]
    pub node_heartbeat_ms: u64,

    /// A node not heard from for this long is gone: its presence leaves every other node.
    #[arg(long, env = "NODE_DOWN_AFTER_MS", default_value_t = 5000)]
    pub node_down_after_ms: u64,

    /// How long a node keeps receiving a topic's broadcasts after its last member here left.
    #[arg(long, env = "TOPIC_UNSUB_LINGER_MS", default_value_t = 2000)]
    pub topic_unsub_linger_ms: u64,

    /// How long shutdown waits for sockets to close, in ms.
    #[arg(long, env = "SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,

    /// Refuse joins of public channels (the reference's tenant flag `private_only`).
    #[arg(long, env = "PRIVATE_ONLY", default_value_t = false)]
    pub private_only: bool,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// JSON Web Key Set (`{"keys":[…]}`) for RS256/384/512, ES256/384 and EdDSA tokens, and HS
    /// tokens whose `kid` names an `oct` key. Also read from `JWT_JWKS`.
    #[arg(long, env = "API_JWT_JWKS", hide_env_values = true)]
    pub jwt_jwks: Option<Secret>,

    /// A file holding a JSON Web Key Set; read at start and at every JWKS refresh.
    #[arg(long, env = "JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<std::path::PathBuf>,

    /// An http(s) URL serving a JSON Web Key Set (e.g. `…/auth/v1/.well-known/jwks.json`);
    /// fetched at start, every `JWT_JWKS_REFRESH_SECS`, and when a token names an unknown `kid`.
    #[arg(long, env = "JWT_JWKS_URL", hide_env_values = true)]
    pub jwt_jwks_url: Option<Secret>,

    /// Interval between JWKS refreshes (file and URL), in seconds.
    #[arg(long, env = "JWT_JWKS_REFRESH_SECS", default_value_t = 300)]
    pub jwt_jwks_refresh_secs: u64,

    /// JSON object of claims every token must carry with exactly these values, e.g.
    /// `{"iss":"https://<project>.supabase.co/auth/v1","aud":"authenticated"}`.
    #[arg(long, env = "JWT_CLAIM_VALIDATORS", default_value = "{}")]
    pub jwt_claim_validators: String,

    /// Comma-separated `sb_publishable_…` keys accepted in place of a JWT, with anon claims.
    #[arg(
        long,
        env = "SB_PUBLISHABLE_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub sb_publishable_keys: Vec<Secret>,

    /// Comma-separated `sb_secret_…` keys accepted in place of a JWT, with service_role claims.
    #[arg(
        long,
        env = "SB_SECRET_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub sb_secret_keys: Vec<Secret>,
}

impl Config {
    /// Reads flags and environment; `JWT_SECRET` stands in for `API_JWT_SECRET`, `JWT_JWKS` for
    /// `API_JWT_JWKS`.
    pub fn from_env_and_args() -> Config {
        let mut config = Config::parse();
        if config.jwt_secret.is_none()
            && let Ok(secret) = std::env::var("JWT_SECRET")
            && !secret.is_empty()
        {
            config.jwt_secret = Some(Secret(secret));
        }
        if config.jwt_jwks.is_none()
            && let Ok(jwks) = std::env::var("JWT_JWKS")
            && !jwks.is_empty()
        {
            config.jwt_jwks = Some(Secret(jwks));
        }
        config
    }

    /// A configuration for tests: loopback, port 0, short delays.
    pub fn for_tests(secret: &str) -> Config {
        let mut config = Config::parse_from(["realtime-gateway"]);
        config.host = IpAddr::from([127, 0, 0, 1]);
        config.port = 0;
        config.jwt_secret = Some(Secret(secret.to_owned()));
        config.connect_error_backoff_ms = 0;
        config.channel_error_backoff_ms = 0;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        config.resume_state_path = Some(std::env::temp_dir().join(format!(
            "realtime-gateway-tests/{}-{n}.state",
            std::process::id()
        )));
        config
    }

    /// Checks what clap cannot (the auth settings are checked when the verifier is built).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(secret) = &self.jwt_secret
            && secret.expose().is_empty()
        {
            return Err(ConfigError::Invalid(
                "API_JWT_SECRET is set but empty".into(),
            ));
        }
        if self.max_payload_size_in_kb == 0 {
            return Err(ConfigError::Invalid(
                "MAX_PAYLOAD_SIZE_IN_KB must be at least 1".into(),
            ));
        }
        if self.outbox_max_frames == 0 || self.outbox_max_bytes == 0 {
            return Err(ConfigError::Invalid(
                "OUTBOX_MAX_FRAMES and OUTBOX_MAX_BYTES must be at least 1".into(),
            ));
        }
        if let Some(urls) = &self.cluster_nats_url
            && urls.trim().is_empty()
        {
            return Err(ConfigError::Invalid(
                "CLUSTER_NATS_URL is set but empty".into(),
            ));
        }
        if self.node_heartbeat_ms == 0
            || self.node_heartbeat_ms.saturating_mul(4) > self.node_down_after_ms
        {
            return Err(ConfigError::Invalid(
                "NODE_HEARTBEAT_MS must be at least 1 and at most a quarter of NODE_DOWN_AFTER_MS"
                    .into(),
            ));
        }
        if self.cluster_prefix.is_empty()
            || !self
                .cluster_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::Invalid(
                "CLUSTER_PREFIX must be letters, digits, - or _".into(),
            ));
        }
        if self.websocket_idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "WEBSOCKET_IDLE_TIMEOUT_MS must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Largest payload in bytes: the reference's `kb × 1000 + 500`.
    pub(crate) fn max_payload_bytes(&self) -> usize {
        usize::try_from(
            self.max_payload_size_in_kb
                .saturating_mul(1000)
                .saturating_add(500),
        )
        .unwrap_or(usize::MAX)
    }

    pub(crate) fn connect_error_backoff(&self) -> Duration {
        Duration::from_millis(self.connect_error_backoff_ms)
    }

    pub(crate) fn channel_error_backoff(&self) -> Duration {
        Duration::from_millis(self.channel_error_backoff_ms)
    }

    pub(crate) fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.websocket_idle_timeout_ms)
    }
}

/// An invalid configuration; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

impl From<String> for ConfigError {
    fn from(message: String) -> ConfigError {
        ConfigError::Invalid(message)
    }
}
