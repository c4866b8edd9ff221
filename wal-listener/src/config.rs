//! Connection and listener settings.
//!
//! Connection settings come from a standard Postgres URL:
//! `postgres://user:password@host:port/dbname?sslmode=require&application_name=realtime`.
//! Recognised query parameters: `sslmode` (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`),
//! `application_name`, `connect_timeout` (seconds), and `host`, `port`, `user`, `password`, `dbname`
//! overriding the URL parts. Percent-encoding is decoded in every part.
//!
//! `sslmode` follows libpq: `prefer` tries TLS and falls back to plain text, `require` insists on TLS but,
//! like libpq without a root certificate, does not verify the server certificate (hosted databases often
//! use a private CA); `verify-ca` / `verify-full` verify against the Mozilla root store.

use std::fmt;
use std::time::Duration;

use percent_encoding::percent_decode_str;

/// The URL could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid postgres url: {0}")]
pub struct ConfigError(pub String);

/// TLS policy for the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified (the host name is checked too: rustls always does).
    VerifyCa,
    /// TLS, certificate chain and host name verified.
    VerifyFull,
}

/// A password that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Self {
        Password(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<Password>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub application_name: String,
    pub connect_timeout: Duration,
}

impl ConnectConfig {
    /// Parses a `postgres://` or `postgresql://` URL.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let err = |m: &str| ConfigError(m.to_owned());
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| err("scheme must be postgres:// or postgresql://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.split_once('/') {
            Some((a, p)) => (a, p),
            None => (rest, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut user = None;
        let mut password = None;
        if let Some(ui) = userinfo {
            let (u, p) = match ui.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (ui, None),
            };
            user = Some(decode(u)?);
            password = p.map(decode).transpose()?;
        }
        let (host, port) = split_host_port(hostport)?;
        let mut cfg = ConnectConfig {
            host: if host.is_empty() {
                "localhost".to_owned()
            } else {
                decode(host)?
            },
            port: match port {
                Some(p) => p.parse().map_err(|_| err("port is not a number"))?,
                None => 5432,
            },
            user: user.unwrap_or_default(),
            password: password.map(Password),
            dbname: decode(path)?,
            sslmode: SslMode::Prefer,
            application_name: "realtime-wal-listener".to_owned(),
            connect_timeout: Duration::from_secs(10),
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v)?;
            match k {
                "sslmode" => {
                    cfg.sslmode = match v.as_str() {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        _ => return Err(err("unknown sslmode")),
                    }
                }
                "application_name" => cfg.application_name = v,
                "connect_timeout" => {
                    let secs: u64 = v.parse().map_err(|_| err("connect_timeout"))?;
                    cfg.connect_timeout = Duration::from_secs(secs.max(1));
                }
                "host" => cfg.host = v,
                "port" => cfg.port = v.parse().map_err(|_| err("port is not a number"))?,
                "user" => cfg.user = v,
                "password" => cfg.password = Some(Password(v)),
                "dbname" => cfg.dbname = v,
                // Other libpq parameters (sslrootcert, options, ...) are not supported; ignoring them
                // silently could weaken TLS, so refuse.
                other => return Err(ConfigError(format!("unsupported parameter {other}"))),
            }
        }
        if cfg.user.is_empty() {
            return Err(err("no user"));
        }
        if cfg.dbname.is_empty() {
            cfg.dbname = cfg.user.clone();
        }
        Ok(cfg)
    }
}

fn decode(s: &str) -> Result<String, ConfigError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConfigError("percent-encoding is not utf-8".to_owned()))
}

fn split_host_port(s: &str) -> Result<(&str, Option<&str>), ConfigError> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| ConfigError("unclosed [ in host".to_owned()))?;
        return Ok((host, after.strip_prefix(':')));
    }
    Ok(match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    })
}

/// Everything the listener needs. Build with [`ListenerConfig::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub connect: ConnectConfig,
    /// Durable logical slot; created (plugin `pgoutput`) if missing.
    pub slot: String,
    /// Publication to stream; it must exist. Default `supabase_realtime`.
    pub publication: String,
    /// More publications streamed on the same slot (each must exist); empty by default.
    pub additional_publications: Vec<String>,
    /// Transactions (or parts) buffered between the listener and its consumer. When full, the
    /// listener stops reading from Postgres.
    pub queue_capacity: usize,
    /// Bytes (of pgoutput messages) that transactions handed to the consumer may hold until the
    /// consumer drops them; past it the listener stops reading from Postgres. One part larger
    /// than this is still handed on when nothing else is held.
    pub queue_max_bytes: usize,
    /// A transaction is handed on in parts of at most this many changes…
    pub chunk_max_changes: usize,
    /// …and about this many bytes, so a large one is streamed through, never held whole.
    pub chunk_max_bytes: usize,
    /// Upper bound between two standby status updates.
    pub status_interval: Duration,
    /// Ask for `pg_logical_emit_message` messages (pgoutput `messages` option, Postgres ≥ 14).
    pub messages: bool,
    /// Give up with [`crate::Error::SlotActive`] after waiting this long for a slot held by another
    /// process; `None` waits forever.
    pub slot_busy_timeout: Option<Duration>,
    /// Recreate the slot when Postgres invalidated it (`max_slot_wal_keep_size` exceeded) instead
    /// of stopping with [`crate::Error::SlotInvalidated`]. Either way changes were lost: the
    /// listener counts each such gap ([`crate::LagHandle::gaps`]), and so does a slot that
    /// disappeared after this listener had streamed from it.
    pub recreate_lost_slot: bool,
    /// First and largest delay between reconnection attempts.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl ListenerConfig {
    /// Defaults for everything but the connection and the slot name.
    pub fn new(connect: ConnectConfig, slot: impl Into<String>) -> Self {
        ListenerConfig {
            connect,
            slot: slot.into(),
            publication: "supabase_realtime".to_owned(),
            additional_publications: Vec::new(),
            queue_capacity: 1024,
            queue_max_bytes: 64 << 20,
            chunk_max_changes: 4096,
            chunk_max_bytes: 4 << 20,
            status_interval: Duration::from_secs(1),
            messages: false,
            slot_busy_timeout: None,
            recreate_lost_slot: false,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let c = ConnectConfig::from_url(
            "postgres://us%40er:p%3Ass@db.example.com:6543/my%20db?sslmode=require&application_name=x",
        )
        .unwrap();
        assert_eq!(c.user, "us@er");
        assert_eq!(c.password.as_ref().unwrap().expose(), "p:ss");
        assert_eq!(c.host, "db.example.com");
        assert_eq!(c.port, 6543);
        assert_eq!(c.dbname, "my db");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name, "x");
        assert!(!format!("{c:?}").contains("p:ss"));

        let c = ConnectConfig::from_url("postgresql://u@[::1]/").unwrap();
        assert_eq!(c.host, "::1");
        assert_eq!(c.port, 5432);
        assert_eq!(c.dbname, "u");
        assert_eq!(c.sslmode, SslMode::Prefer);

        assert!(ConnectConfig::from_url("mysql://u@h/d").is_err());
        assert!(ConnectConfig::from_url("postgres://h/d").is_err());
        assert!(ConnectConfig::from_url("postgres://u@h:x/d").is_err());
        assert!(ConnectConfig::from_url("postgres://u@h/d?sslmode=bogus").is_err());
        assert!(ConnectConfig::from_url("postgres://u@h/d?sslrootcert=/x").is_err());
    }
}
