//! Errors, classified by what the caller should do about them.
//!
//! [`Error::is_retryable`] separates conditions the listener rides out itself (connection lost, server
//! restarting, slot busy) from those that need a human (configuration, privileges, invalidated slot,
//! corrupt stream). [`crate::Listener::run`] retries the first kind with backoff and returns the second.

use std::fmt;

use crate::pgoutput::DecodeError;

/// An `ErrorResponse` from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub severity: String,
    /// SQLSTATE, e.g. `55006`.
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl From<&tokio_postgres::error::DbError> for ServerError {
    fn from(e: &tokio_postgres::error::DbError) -> Self {
        ServerError {
            severity: e.severity().to_owned(),
            code: e.code().code().to_owned(),
            message: e.message().to_owned(),
            detail: e.detail().map(str::to_owned),
        }
    }
}

impl ServerError {
    /// Class 08 (connection exception) and 57P01–57P03 (shutdown, crash, starting up): try again later.
    fn is_transient(&self) -> bool {
        self.code.starts_with("08")
            || matches!(self.code.as_str(), "57P01" | "57P02" | "57P03" | "53300")
            // The database does not accept connections for now (`ALLOW_CONNECTIONS false`, or
            // being created or dropped): an outage, not a misconfiguration.
            || (self.code == "55000" && self.message.contains("not currently accepting connections"))
    }
}

/// Everything that can stop the listener.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("server does not offer tls and sslmode requires it")]
    TlsUnavailable,
    #[error("authentication: {0}")]
    Auth(String),
    #[error("server: {0}")]
    Server(ServerError),
    #[error("admin connection: {0}")]
    Admin(#[from] tokio_postgres::Error),
    #[error("wal_level is {actual}, logical replication needs wal_level = logical")]
    WalLevelNotLogical { actual: String },
    #[error("role {user} lacks the REPLICATION attribute (ALTER ROLE {user} REPLICATION)")]
    MissingReplicationPrivilege { user: String },
    #[error("replication slot {slot} is active in another process: {message}")]
    SlotActive { slot: String, message: String },
    #[error(
        "replication slot {slot} was invalidated (WAL it needed was removed); drop and recreate it"
    )]
    SlotInvalidated { slot: String },
    #[error("replication slot {slot} exists but {reason}")]
    SlotMismatch { slot: String, reason: String },
    #[error("publication {publication} does not exist")]
    PublicationMissing { publication: String },
    #[error("pgoutput: {0}")]
    Decode(#[from] DecodeError),
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error("replication stream ended by the server")]
    StreamEnded,
    #[error("the consumer dropped its receiver")]
    ConsumerGone,
}

impl Error {
    /// Whether reconnecting after a delay can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io(_) | Error::StreamEnded | Error::SlotActive { .. } => true,
            Error::Server(e) => e.is_transient(),
            Error::Admin(e) => match e.as_db_error() {
                Some(db) => {
                    let code = db.code().code();
                    code.starts_with("08")
                        || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
                        || (code == "55000"
                            && db.message().contains("not currently accepting connections"))
                }
                // Closed connection, i/o, timeouts.
                None => true,
            },
            _ => false,
        }
    }

    /// Maps a server error to the typed variant it stands for, given the slot and publication names.
    pub(crate) fn from_server(e: ServerError, slot: &str, publication: &str, user: &str) -> Error {
        let msg = e.message.as_str();
        match e.code.as_str() {
            "55006" if msg.contains("replication slot") => Error::SlotActive {
                slot: slot.to_owned(),
                message: e.message,
            },
            "55000" if msg.contains("wal_level") => Error::WalLevelNotLogical {
                actual: "not logical".to_owned(),
            },
            "55000"
                if msg.contains("invalidated")
                    || e.detail
                        .as_deref()
                        .is_some_and(|d| d.contains("invalidated")) =>
            {
                Error::SlotInvalidated {
                    slot: slot.to_owned(),
                }
            }
            "42704" if msg.contains("publication") => Error::PublicationMissing {
                publication: publication.to_owned(),
            },
            "42501" if msg.contains("replication") || msg.contains("walsender") => {
                Error::MissingReplicationPrivilege {
                    user: user.to_owned(),
                }
            }
            _ => Error::Server(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str, detail: Option<&str>) -> ServerError {
        ServerError {
            severity: "ERROR".into(),
            code: code.into(),
            message: message.into(),
            detail: detail.map(str::to_owned),
        }
    }

    #[test]
    fn classification() {
        let map = |e| Error::from_server(e, "s", "p", "u");
        let active = map(server(
            "55006",
            "replication slot \"s\" is active for PID 7",
            None,
        ));
        assert!(matches!(active, Error::SlotActive { .. }) && active.is_retryable());
        let lost = map(server(
            "55000",
            "cannot read from logical replication slot \"s\"",
            Some("This slot has been invalidated because it exceeded the maximum reserved size."),
        ));
        assert!(matches!(lost, Error::SlotInvalidated { .. }) && !lost.is_retryable());
        let wal = map(server(
            "55000",
            "logical decoding requires wal_level >= logical",
            None,
        ));
        assert!(matches!(wal, Error::WalLevelNotLogical { .. }));
        let publication = map(server("42704", "publication \"p\" does not exist", None));
        assert!(matches!(publication, Error::PublicationMissing { .. }));
        let privilege = map(server(
            "42501",
            "must be superuser or replication role to start walsender",
            None,
        ));
        assert!(matches!(
            privilege,
            Error::MissingReplicationPrivilege { .. }
        ));
        assert!(
            map(server(
                "57P01",
                "terminating connection due to administrator command",
                None
            ))
            .is_retryable()
        );
        assert!(map(server("08006", "connection failure", None)).is_retryable());
        assert!(!map(server("28P01", "password authentication failed", None)).is_retryable());
    }
}
