//! JSON Web Key Sets: parsing, the key store the verifier reads, and the refresher that keeps
//! the file and URL sources current.
//!
//! Keys come from up to three sources, searched in this order: inline JSON (`API_JWT_JWKS`), a
//! file (`JWT_JWKS_FILE`) and a URL (`JWT_JWKS_URL`). The file and the URL are reloaded every
//! refresh interval; the URL is also fetched soon after a token names a `kid` that no source
//! holds, at most once per [`KID_MISS_MIN_INTERVAL`], so a key rotation is picked up without a
//! restart and random `kid`s cannot make the gateway hammer the URL. A failed reload keeps the
//! keys of the last good one. The verifier only reads a snapshot (`Arc`), so verification stays
//! synchronous; the token that named the unknown `kid` is refused, the client's retry succeeds.
//!
//! A key is usable when it has a `kid` (selection is by `kid`, §8.1) and is not marked
//! `"use":"enc"`: RSA; EC on P-256 or P-384; OKP on Ed25519; `oct`. Anything else (P-521,
//! Ed448, unknown `kty`) is skipped with a warning and never hides the other keys.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Least time between two fetches caused by unknown `kid`s.
pub(crate) const KID_MISS_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// A fetch (connect, TLS, request, body) that takes longer fails.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JWKS document accepted from a URL or a file.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// First retry delay after a failed reload; doubles up to the refresh interval.
const RETRY_MIN: Duration = Duration::from_secs(5);

/// What a key can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KeyType {
    Rsa,
    /// EC on P-256 (ES256).
    P256,
    /// EC on P-384 (ES384).
    P384,
    /// OKP on Ed25519 (EdDSA).
    Ed25519,
    /// A symmetric key (HS256/384/512).
    Oct,
}

/// One usable key of a set.
pub(crate) struct Key {
    kid: String,
    kty: KeyType,
    key: Arc<DecodingKey>,
}

/// Why a JWKS (inline, file or URL) could not be used; the text names the key or the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct JwksError(String);

impl From<String> for JwksError {
    fn from(message: String) -> JwksError {
        JwksError(message)
    }
}

impl From<&str> for JwksError {
    fn from(message: &str) -> JwksError {
        JwksError(message.to_owned())
    }
}

/// Parses a JWKS document (`{"keys":[…]}`) and logs the keys it skips; see [`parse_set_quiet`].
pub(crate) fn parse_set(json: &[u8]) -> Result<Vec<Key>, JwksError> {
    let (keys, skipped) = parse_set_quiet(json)?;
    for why in skipped {
        warn!(why = %why, "jwks: key skipped");
    }
    Ok(keys)
}

/// Parses a JWKS document (`{"keys":[…]}`): the usable keys, and why each other key was
/// skipped. A document of another shape is an error. Texts never quote key material.
pub(crate) fn parse_set_quiet(json: &[u8]) -> Result<(Vec<Key>, Vec<String>), JwksError> {
    let doc: Value =
        serde_json::from_slice(json).map_err(|e| format!("not JSON ({:?})", e.classify()))?;
    let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
        return Err(JwksError::from(
            "not a JWKS: expected an object with a \"keys\" array".to_owned(),
        ));
    };
    let mut out = Vec::with_capacity(keys.len());
    let mut skipped = Vec::new();
    for (i, value) in keys.iter().enumerate() {
        match parse_key(value) {
            Ok(key) => out.push(key),
            Err(why) => skipped.push(format!("key {i}: {why}")),
        }
    }
    Ok((out, skipped))
}

fn parse_key(value: &Value) -> Result<Key, String> {
    let kid = value
        .get("kid")
        .and_then(Value::as_str)
        .ok_or("no \"kid\": tokens select keys by kid")?
        .to_owned();
    if value.get("use").and_then(Value::as_str) == Some("enc") {
        return Err(format!("kid {kid:?}: an encryption key (\"use\":\"enc\")"));
    }
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|_| {
        format!("kid {kid:?}: unsupported or malformed key (kty RSA, EC P-256/P-384, OKP Ed25519 or oct)")
    })?;
    let bad = |what: &str| format!("kid {kid:?}: {what}");
    let decoded_len = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .map(|b| b.len())
            .map_err(|_| bad("a component is not base64url"))
    };
    let kty = match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            if decoded_len(&p.n)? < 64 || decoded_len(&p.e)? == 0 {
                return Err(bad("RSA modulus or exponent missing or too short"));
            }
            KeyType::Rsa
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (kty, len) = match p.curve {
                EllipticCurve::P256 => (KeyType::P256, 32),
                EllipticCurve::P384 => (KeyType::P384, 48),
                _ => return Err(bad("EC curve not supported (P-256 and P-384 are)")),
            };
            if decoded_len(&p.x)? != len || decoded_len(&p.y)? != len {
                return Err(bad("EC coordinates of the wrong length"));
            }
            kty
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            // jsonwebtoken slices the first 32 bytes of `x`: check the length here.
            if p.curve != EllipticCurve::Ed25519 || decoded_len(&p.x)? != 32 {
                return Err(bad("OKP key is not a 32-byte Ed25519 key"));
            }
            KeyType::Ed25519
        }
        AlgorithmParameters::OctetKey(p) => {
            if decoded_len(&p.value)? == 0 {
                return Err(bad("empty oct key"));
            }
            KeyType::Oct
        }
        _ => return Err(bad("unsupported key type")),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| bad("unusable key"))?;
    Ok(Key {
        kid,
        kty,
        key: Arc::new(key),
    })
}

/// The keys of every source, read by the verifier and replaced by the refresher.
pub(crate) struct KeyStore {
    inline: Vec<Key>,
    file: RwLock<Arc<Vec<Key>>>,
    url: RwLock<Arc<Vec<Key>>>,
    /// Woken when a token names a `kid` that no source holds.
    kid_miss: Notify,
    /// Whether a URL is configured (only then does a miss wake the refresher).
    fetches: bool,
}

impl KeyStore {
    pub(crate) fn new(inline: Vec<Key>, file: Vec<Key>, fetches: bool) -> KeyStore {
        KeyStore {
            inline,
            file: RwLock::new(Arc::new(file)),
            url: RwLock::new(Arc::new(Vec::new())),
            kid_miss: Notify::new(),
            fetches,
        }
    }

    /// The first key with this `kid` and type, inline keys first, then the file's, then the
    /// URL's.
    pub(crate) fn find(&self, kid: &str, kty: KeyType) -> Option<Arc<DecodingKey>> {
        let pick = |keys: &[Key]| {
            keys.iter()
                .find(|k| k.kid == kid && k.kty == kty)
                .map(|k| k.key.clone())
        };
        if let Some(key) = pick(&self.inline) {
            return Some(key);
        }
        for source in [&self.file, &self.url] {
            let snapshot = source.read().map(|g| g.clone()).unwrap_or_default();
            if let Some(key) = pick(&snapshot) {
                return Some(key);
            }
        }
        None
    }

    /// A token named a `kid` no source holds: ask the refresher for a fetch (it rate-limits).
    pub(crate) fn missed(&self) {
        if self.fetches {
            self.kid_miss.notify_one();
        }
    }

    /// How many keys every source holds together.
    pub(crate) fn len(&self) -> usize {
        let count = |s: &RwLock<Arc<Vec<Key>>>| s.read().map(|g| g.len()).unwrap_or(0);
        self.inline.len() + count(&self.file) + count(&self.url)
    }

    fn replace(slot: &RwLock<Arc<Vec<Key>>>, keys: Vec<Key>) {
        if let Ok(mut guard) = slot.write() {
            *guard = Arc::new(keys);
        }
    }
}

/// An http or https URL split for a hand-made GET.
#[derive(Clone)]
pub(crate) struct JwksUrl {
    https: bool,
    /// Host without IPv6 brackets, for connecting and TLS.
    host: String,
    port: u16,
    /// `Host` header value.
    authority: String,
    path: String,
}

impl JwksUrl {
    pub(crate) fn parse(url: &str) -> Result<JwksUrl, JwksError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| "JWT_JWKS_URL is not a URL".to_owned())?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("JWT_JWKS_URL must start with http:// or https://".into()),
        };
        let authority = uri
            .authority()
            .ok_or("JWT_JWKS_URL has no host")?
            .as_str()
            .to_owned();
        if authority.contains('@') {
            return Err(JwksError::from(
                "JWT_JWKS_URL must not carry credentials".to_owned(),
            ));
        }
        let host = uri
            .host()
            .ok_or("JWT_JWKS_URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".to_owned());
        Ok(JwksUrl {
            https,
            host,
            port,
            authority,
            path,
        })
    }

    /// Scheme and host, for logs (the path may carry a token).
    fn origin(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }
}

impl std::fmt::Debug for JwksUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwksUrl({}/…)", self.origin())
    }
}

/// The sources the refresher reloads.
#[derive(Clone, Debug)]
pub(crate) struct Sources {
    pub(crate) file: Option<PathBuf>,
    pub(crate) url: Option<JwksUrl>,
    pub(crate) interval: Duration,
}

impl Sources {
    pub(crate) fn is_empty(&self) -> bool {
        self.file.is_none() && self.url.is_none()
    }
}

/// Reads and parses a JWKS file.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<Key>, JwksError> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwksError::from(format!(
            "{} is larger than 1 MiB",
            path.display()
        )));
    }
    parse_set(&bytes).map_err(|e| JwksError(format!("{}: {e}", path.display())))
}

/// Reloads every source once; returns whether all succeeded. A failed source keeps its keys.
async fn reload(store: &KeyStore, sources: &Sources) -> bool {
    let mut ok = true;
    if let Some(path) = &sources.file {
        let path = path.clone();
        match tokio::task::spawn_blocking(move || read_file(&path)).await {
            Ok(Ok(keys)) => {
                debug!(keys = keys.len(), "jwks: file reloaded");
                KeyStore::replace(&store.file, keys);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "jwks: file reload failed, keeping the previous keys");
                ok = false;
            }
            Err(_) => ok = false,
        }
    }
    if let Some(url) = &sources.url {
        match tokio::time::timeout(FETCH_TIMEOUT, fetch(url)).await {
            Ok(Ok(body)) => match parse_set(&body) {
                Ok(keys) => {
                    debug!(origin = %url.origin(), keys = keys.len(), "jwks: fetched");
                    KeyStore::replace(&store.url, keys);
                }
                Err(e) => {
                    warn!(origin = %url.origin(), error = %e, "jwks: fetched document unusable, keeping the previous keys");
                    ok = false;
                }
            },
            Ok(Err(e)) => {
                warn!(origin = %url.origin(), error = %e, "jwks: fetch failed, keeping the previous keys");
                ok = false;
            }
            Err(_) => {
                warn!(origin = %url.origin(), "jwks: fetch timed out, keeping the previous keys");
                ok = false;
            }
        }
    }
    ok
}

/// Loads the URL once (the file was read at construction), so that tokens verify as soon as
/// the gateway listens. A failure is logged; the refresher retries.
pub(crate) async fn initial_load(store: &KeyStore, sources: &Sources) -> bool {
    let url_only = Sources {
        file: None,
        ..sources.clone()
    };
    let ok = reload(store, &url_only).await;
    info!(keys = store.len(), "jwks: keys loaded");
    ok
}

/// Reloads the sources every interval (sooner after a failure) and after `kid` misses, until
/// `shutdown`.
pub(crate) async fn refresh_loop(
    store: Arc<KeyStore>,
    sources: Sources,
    mut healthy: bool,
    shutdown: CancellationToken,
) {
    // Bounded so that `now + interval` cannot overflow.
    let interval = sources
        .interval
        .clamp(Duration::from_secs(1), Duration::from_secs(365 * 86_400));
    let mut retry = RETRY_MIN.min(interval);
    let mut next = Instant::now() + if healthy { interval } else { retry };
    let mut last_miss_fetch: Option<Instant> = None;
    loop {
        let missed = tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(next) => false,
            () = store.kid_miss.notified() => true,
        };
        if missed {
            if last_miss_fetch.is_some_and(|t| t.elapsed() < KID_MISS_MIN_INTERVAL) {
                continue;
            }
            last_miss_fetch = Some(Instant::now());
            debug!("jwks: unknown kid, fetching the URL");
            let url_only = Sources {
                file: None,
                ..sources.clone()
            };
            let ok = tokio::select! {
                () = shutdown.cancelled() => return,
                ok = reload(&store, &url_only) => ok,
            };
            if ok && !healthy {
                healthy = true;
                next = Instant::now() + interval;
            }
            continue;
        }
        healthy = tokio::select! {
            () = shutdown.cancelled() => return,
            ok = reload(&store, &sources) => ok,
        };
        if healthy {
            retry = RETRY_MIN.min(interval);
            next = Instant::now() + interval;
        } else {
            next = Instant::now() + retry;
            retry = (retry * 2).min(interval);
        }
    }
}

/// GETs the URL over plain TCP or TLS (webpki roots) with HTTP/1.1; the body of a 200 reply.
async fn fetch(url: &JwksUrl) -> Result<Bytes, JwksError> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    if !url.https {
        return get(TokioIo::new(tcp), url).await;
    }
    use tokio_rustls::rustls::{self, ClientConfig, pki_types::ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from(url.host.clone()).map_err(|e| format!("tls: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    get(TokioIo::new(stream), url).await
}

async fn get<T>(io: T, url: &JwksUrl) -> Result<Bytes, JwksError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let request = http::Request::get(url.path.as_str())
        .header(http::header::HOST, url.authority.as_str())
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "realtime-gateway")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("http: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("http: {e}"))?;
        if response.status() != http::StatusCode::OK {
            return Err(JwksError::from(format!(
                "http status {}",
                response.status().as_u16()
            )));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("http body: {e}"))?;
        // `sender` drops here, so the connection below winds down.
        Ok(body.to_bytes())
    };
    let (result, _) = tokio::join!(exchange, conn);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parsing() {
        let u = JwksUrl::parse("https://abc.supabase.co/auth/v1/.well-known/jwks.json").unwrap();
        assert!(u.https);
        assert_eq!(
            (u.host.as_str(), u.port, u.authority.as_str()),
            ("abc.supabase.co", 443, "abc.supabase.co")
        );
        assert_eq!(u.path, "/auth/v1/.well-known/jwks.json");
        let u = JwksUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 8080, "/")
        );
        assert!(JwksUrl::parse("ftp://x/").is_err());
        assert!(JwksUrl::parse("http://user:pw@x/").is_err());
        assert!(JwksUrl::parse("not a url").is_err());
    }

    #[test]
    fn unusable_keys_are_skipped_not_fatal() {
        let doc = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0"},
            {"kty":"oct","kid":"enc","use":"enc","k":"c2VjcmV0"},
            {"kty":"OKP","kid":"short","crv":"Ed25519","x":"AAAA"},
            {"kty":"OKP","kid":"ed448","crv":"Ed448","x":"AAAA"},
            {"kty":"EC","kid":"p521","crv":"P-521","x":"AAAA","y":"AAAA"},
            {"kty":"weird","kid":"w"},
            {"kty":"oct","kid":"good","k":"c2VjcmV0"}
        ]}"#;
        let keys = parse_set(doc).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid, "good");
        assert_eq!(keys[0].kty, KeyType::Oct);
        assert!(parse_set(b"[]").is_err());
        assert!(parse_set(b"{").is_err());
    }
}
