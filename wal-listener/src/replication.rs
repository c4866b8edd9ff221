//! The replication connection: startup, authentication, simple queries, and CopyBoth framing.
//!
//! tokio-postgres has no replication mode, so this is a small client of its own on the message
//! builders of `postgres-protocol`. Backend messages are framed by hand (`tag`, `i32` length, body):
//! the stream phase needs `CopyBothResponse` (`W`), which the crate's backend parser does not know, and
//! keeping `CopyData` bodies as [`Bytes`] slices of the read buffer avoids a copy per change.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Error;
use crate::config::ConnectConfig;
use crate::error::ServerError;
use crate::transport::{self, Stream};

/// Largest backend message accepted (a CopyData carries one change; Postgres caps a row at 1 GB).
const MAX_FRAME: usize = 1 << 30;

/// One backend message.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
}

/// Session settings that fix the text form of values (see [`crate::value`]).
const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "postgres"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
];

pub(crate) struct ReplicationConn {
    stream: Stream,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

/// Result rows of a simple query, all columns as text.
pub(crate) type Rows = Vec<Vec<Option<String>>>;

impl ReplicationConn {
    /// Connects with `replication=database` and authenticates, within `connect_timeout`.
    pub(crate) async fn connect(cfg: &ConnectConfig) -> Result<Self, Error> {
        tokio::time::timeout(cfg.connect_timeout, Self::connect_inner(cfg))
            .await
            .map_err(|_| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "replication connection startup timed out",
                ))
            })?
    }

    async fn connect_inner(cfg: &ConnectConfig) -> Result<Self, Error> {
        let stream = transport::connect(cfg).await?;
        let mut conn = ReplicationConn {
            stream,
            rbuf: BytesMut::with_capacity(256 * 1024),
            wbuf: BytesMut::with_capacity(1024),
        };
        let mut params: Vec<(&str, &str)> = vec![
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
        ];
        params.extend_from_slice(SESSION_SETTINGS);
        frontend::startup_message(params.iter().copied(), &mut conn.wbuf)?;
        conn.flush().await?;
        conn.authenticate(cfg).await?;
        Ok(conn)
    }

    async fn authenticate(&mut self, cfg: &ConnectConfig) -> Result<(), Error> {
        let password = || {
            cfg.password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or_else(|| {
                    Error::Auth("server asks for a password and none is configured".into())
                })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'R' => {
                    let mut body = frame.body;
                    if body.len() < 4 {
                        return Err(Error::Protocol("short authentication message".into()));
                    }
                    match body.get_i32() {
                        0 => {}
                        3 => {
                            frontend::password_message(password()?, &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(Error::Protocol("short md5 salt".into()));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                cfg.user.as_bytes(),
                                password()?,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        10 => {
                            let offered = body.split(|&b| b == 0).any(|m| m == b"SCRAM-SHA-256");
                            if !offered {
                                return Err(Error::Auth("no supported SASL mechanism".into()));
                            }
                            let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                "SCRAM-SHA-256",
                                s.message(),
                                &mut self.wbuf,
                            )?;
                            scram = Some(s);
                            self.flush().await?;
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| {
                                Error::Protocol("SASL continue before start".into())
                            })?;
                            s.update(&body).map_err(|e| Error::Auth(e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut self.wbuf)?;
                            self.flush().await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| Error::Protocol("SASL final before start".into()))?;
                            s.finish(&body).map_err(|e| Error::Auth(e.to_string()))?;
                        }
                        other => {
                            return Err(Error::Auth(format!(
                                "unsupported authentication method {other}"
                            )));
                        }
                    }
                }
                b'E' => return Err(Error::Server(parse_error(&frame.body))),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, NoticeResponse.
                _ => {}
            }
        }
    }

    /// Runs a simple query and returns its rows. A server error is returned after `ReadyForQuery`.
    pub(crate) async fn simple_query(&mut self, sql: &str) -> Result<Rows, Error> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'D' => rows.push(parse_data_row(frame.body)?),
                b'E' => error = Some(parse_error(&frame.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(Error::Server(e)),
            None => Ok(rows),
        }
    }

    /// Sends `START_REPLICATION` and waits for `CopyBothResponse`.
    pub(crate) async fn start_replication(&mut self, sql: &str) -> Result<(), Error> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = parse_error(&frame.body);
                    // Drain to ReadyForQuery so the connection stays usable, then report.
                    while self.read_frame().await?.tag != b'Z' {}
                    return Err(Error::Server(e));
                }
                b'N' | b'S' => {}
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    /// Reads one backend message.
    ///
    /// # Cancel safety
    /// Cancel safe: a message is taken from the buffer only once it is complete, and the read itself
    /// (`read_buf`) loses no data when dropped.
    pub(crate) async fn read_frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(frame) = self.try_frame()? {
                return Ok(frame);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 64 * 1024 {
                self.rbuf.reserve(256 * 1024);
            }
            let n = self.stream.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )));
            }
        }
    }

    /// Takes one complete message from the read buffer, if there is one; never waits.
    pub(crate) fn try_frame(&mut self) -> Result<Option<Frame>, Error> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.rbuf[0];
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        let len = usize::try_from(len)
            .ok()
            .filter(|l| (4..=MAX_FRAME).contains(l))
            .ok_or_else(|| Error::Protocol(format!("invalid message length {len}")))?;
        if self.rbuf.len() < 1 + len {
            self.rbuf.reserve(1 + len - self.rbuf.len());
            return Ok(None);
        }
        let mut msg = self.rbuf.split_to(1 + len);
        msg.advance(5);
        Ok(Some(Frame {
            tag,
            body: msg.freeze(),
        }))
    }

    /// Queues a CopyData message holding `payload`.
    pub(crate) fn queue_copy_data(&mut self, payload: &[u8]) {
        self.wbuf.put_u8(b'd');
        self.wbuf.put_i32(4 + payload.len() as i32);
        self.wbuf.put_slice(payload);
    }

    /// Writes everything queued.
    pub(crate) async fn flush(&mut self) -> Result<(), Error> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends `Terminate` and closes.
    pub(crate) async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, Error> {
    let short = || Error::Protocol("short DataRow".into());
    if body.len() < 2 {
        return Err(short());
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(usize::try_from(n).unwrap_or(0).min(body.len()));
    for _ in 0..n {
        if body.len() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(short());
        }
        let v = body.split_to(len);
        row.push(Some(String::from_utf8_lossy(&v).into_owned()));
    }
    Ok(row)
}

/// Parses the fields of an `ErrorResponse` / `NoticeResponse` body.
pub(crate) fn parse_error(body: &[u8]) -> ServerError {
    let mut e = ServerError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
    };
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'V' => e.severity = value,
            b'S' if e.severity.is_empty() => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or(&[]);
    }
    e
}

/// Quotes an identifier for SQL (`"a""b"`).
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes a string literal for SQL (`'it''s'`).
pub(crate) fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields() {
        let body = b"SERROR\0VERROR\0C55006\0Mreplication slot \"s\" is active for PID 7\0\0";
        let e = parse_error(body);
        assert_eq!(e.code, "55006");
        assert_eq!(e.severity, "ERROR");
        assert!(e.message.contains("active"));
        // Garbage does not panic.
        let _ = parse_error(b"C");
        let _ = parse_error(b"");
        assert!(parse_data_row(Bytes::from_static(&[0, 2, 0, 0, 0, 9, b'x'])).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
