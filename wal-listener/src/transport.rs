//! TCP, optionally wrapped in TLS after the `SSLRequest` exchange.
//!
//! Postgres starts TLS inside its own protocol: the client sends an 8-byte `SSLRequest`, the server
//! answers one byte, `S` (go ahead) or `N` (not offered), and only then does the TLS handshake begin.
//! Both the replication connection and the admin connection (tokio-postgres over this stream, told that
//! TLS is off because it is already on) use [`connect`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{WebPkiSupportedAlgorithms, ring};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::Error;
use crate::config::{ConnectConfig, SslMode};

/// A connection to the server, plain or TLS.
pub(crate) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

async fn tcp(cfg: &ConnectConfig) -> Result<TcpStream, Error> {
    let addr = (cfg.host.as_str(), cfg.port);
    let s = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Opens a connection honouring `sslmode`.
pub(crate) async fn connect(cfg: &ConnectConfig) -> Result<Stream, Error> {
    let mut tcp_stream = tcp(cfg).await?;
    if cfg.sslmode == SslMode::Disable {
        return Ok(Stream::Plain(tcp_stream));
    }
    let mut req = BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut req);
    tcp_stream.write_all(&req).await?;
    let answer = tcp_stream.read_u8().await?;
    if answer != b'S' {
        return match cfg.sslmode {
            // `N`, or `E` from a server too old to know SSLRequest: carry on in plain text.
            SslMode::Prefer => {
                if answer == b'N' {
                    Ok(Stream::Plain(tcp_stream))
                } else {
                    Ok(Stream::Plain(tcp(cfg).await?))
                }
            }
            _ => Err(Error::TlsUnavailable),
        };
    }
    match handshake(cfg, tcp_stream).await {
        Ok(s) => Ok(s),
        Err(e) if cfg.sslmode == SslMode::Prefer => {
            tracing::warn!(error = %e, "tls handshake failed, sslmode=prefer falls back to plain text");
            Ok(Stream::Plain(tcp(cfg).await?))
        }
        Err(e) => Err(e),
    }
}

async fn handshake(cfg: &ConnectConfig, tcp_stream: TcpStream) -> Result<Stream, Error> {
    let provider = Arc::new(ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let tls = match cfg.sslmode {
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let roots =
                rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(
                provider.signature_verification_algorithms,
            )))
            .with_no_client_auth(),
    };
    let name = ServerName::try_from(cfg.host.clone()).map_err(|e| Error::Tls(e.to_string()))?;
    let connector = TlsConnector::from(Arc::new(tls));
    // rustls always checks the host name when it verifies, so verify-ca is as strict as verify-full.
    let s = connector
        .connect(name, tcp_stream)
        .await
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok(Stream::Tls(Box::new(s)))
}

/// `sslmode=require` semantics: encrypted, the certificate is not checked (signatures still are).
#[derive(Debug)]
struct NoCertificateCheck(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
