//! Turning a token into claims: the connect token, each channel token, refreshed tokens and
//! REST callers all go through [`Verifier::verify`].
//!
//! Rules (the reference server's, protocol.md §8.1): the token is URL-decoded and stripped of
//! whitespace; the signer comes from the header:
//! - HS256/384/512 with a `kid` naming an `oct` JWK → that key, otherwise the configured secret;
//! - RS256/384/512 + `kid` → the RSA JWK with that `kid`; ES256/ES384 + `kid` → the EC JWK on
//!   P-256/P-384; EdDSA + `kid` → the OKP Ed25519 JWK (the `jwks` module holds the key
//!   sources);
//! - anything else, or no matching key → `Failed to generate JWT signer…`. The crypto backend
//!   (jsonwebtoken with `rust_crypto`) has no ES512, Ed448, or the non-standard `alg` names
//!   `Ed25519`/`Ed448` that the reference also accepts: those tokens get the signer error.
//!
//! Then: `exp` must be a number in the future (no leeway, decimals rounded); each entry of
//! `JWT_CLAIM_VALIDATORS` must equal the token's claim (an `aud` array passes when it contains
//! the value); `role` and `exp` are required. Unlike the reference (Joken skips validators of
//! claims a token does not carry), a missing claim fails its validator. Error texts are the
//! reference's, because clients show them to developers.
//!
//! New-style API keys (`sb_publishable_…`, `sb_secret_…`) are not JWTs: in Supabase's platform
//! an API gateway swaps them for a JWT before Realtime sees them. Nothing sits in front of this
//! gateway, so it maps a configured key itself: publishable → anon claims, secret → service_role
//! claims (`iss: supabase`, an `exp` in 2100). Claim validators do not apply to these claims. An
//! `sb_` key that matches no configured key is refused with `AuthError::UnknownApiKey`.

mod jwks;

use crate::config::{Config, ConfigError, Secret};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use jwks::{KeyStore, KeyType, Sources};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

/// `exp` of the claims an `sb_` key maps to: 2100-01-01T00:00:00Z.
const API_KEY_EXP: i64 = 4_102_444_800;

/// The claims of a verified token.
#[derive(Clone, Debug)]
pub(crate) struct Claims {
    pub(crate) role: String,
    /// Expiry, seconds since the epoch.
    pub(crate) exp: i64,
    /// The whole claim set, as RLS sees it in `request.jwt.claims`.
    pub(crate) all: Arc<Map<String, Value>>,
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("API key is missing")]
    Missing,
    #[error("The token provided is not a valid JWT")]
    Malformed,
    #[error("Failed to validate JWT signature")]
    Signature,
    #[error("Token has expired {seconds_ago} seconds ago")]
    Expired { seconds_ago: i64 },
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    #[error("{}", signer_message(.kid.as_deref()))]
    Signer { kid: Option<String> },
    /// A `JWT_CLAIM_VALIDATORS` entry failed. The reference answers a connect with a bare 500
    /// and a join with `Unknown Error on Channel`; the claim's name (never its value) is said
    /// here so that a developer can tell which check refused the token.
    #[error("Claim `{claim}` does not have the value this server requires")]
    ClaimMismatch { claim: String },
    /// An `sb_…` key that is not one of the configured keys.
    #[error(
        "Invalid API key: this sb_ key is not one of the publishable or secret keys configured on this server"
    )]
    UnknownApiKey,
}

fn signer_message(kid: Option<&str>) -> String {
    match kid {
        Some(kid) => format!(
            "Failed to generate JWT signer for key ID (kid) \"{kid}\", check your JWT secret or JWKS configuration"
        ),
        None => {
            "Failed to generate JWT signer, check your JWT secret or JWKS configuration".to_owned()
        }
    }
}

impl AuthError {
    /// The HTTP status and `error` text a refused WebSocket upgrade gets.
    pub(crate) fn connect_response(&self) -> (u16, String) {
        match self {
            AuthError::Expired { .. } => (401, "Token has expired".to_owned()),
            AuthError::ClaimMismatch { .. } => (500, "Error connecting to Realtime".to_owned()),
            other => (401, other.to_string()),
        }
    }

    /// The `reason` of a refused join.
    pub(crate) fn join_reason(&self) -> String {
        let code = match self {
            AuthError::Missing | AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::Expired { .. }
            | AuthError::MissingClaims
            | AuthError::ClaimMismatch { .. } => "InvalidJWTToken",
            AuthError::Signer { .. } => "JwtSignerError",
            AuthError::UnknownApiKey => "InvalidAPIKey",
        };
        format!("{code}: {self}")
    }
}

/// Checks the auth settings of a configuration (called by [`Verifier::from_config`]): the inline
/// JWKS, the URL, the claim validators, the `sb_` keys. The JWKS file is read by
/// [`Verifier::from_config`].
pub(crate) fn check_config(config: &Config) -> Result<(), ConfigError> {
    if let Some(jwks) = &config.jwt_jwks {
        jwks::parse_set_quiet(jwks.expose().as_bytes())
            .map_err(|e| format!("API_JWT_JWKS: {e}"))?;
    }
    if let Some(url) = &config.jwt_jwks_url {
        jwks::JwksUrl::parse(url.expose()).map_err(|e| e.to_string())?;
    }
    if config.jwt_jwks_refresh_secs == 0 {
        return Err(ConfigError::Invalid(
            "JWT_JWKS_REFRESH_SECS must be at least 1".into(),
        ));
    }
    claim_validators(&config.jwt_claim_validators)?;
    api_keys(
        &config.sb_publishable_keys,
        "sb_publishable_",
        "SB_PUBLISHABLE_KEYS",
    )?;
    api_keys(&config.sb_secret_keys, "sb_secret_", "SB_SECRET_KEYS")?;
    Ok(())
}

fn claim_validators(json: &str) -> Result<Vec<(String, Value)>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    match serde_json::from_str::<Value>(json) {
        Ok(Value::Object(map)) => Ok(map.into_iter().collect()),
        _ => Err(r#"JWT_CLAIM_VALIDATORS must be a JSON object, e.g. {"iss":"supabase"}"#.into()),
    }
}

fn api_keys(keys: &[Secret], prefix: &str, name: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for key in keys {
        let key = key.expose().trim();
        if key.is_empty() {
            continue;
        }
        if !key.starts_with(prefix) || key.len() == prefix.len() {
            return Err(format!("{name}: every key must start with {prefix}"));
        }
        out.push(key.to_owned());
    }
    Ok(out)
}

/// Verifies tokens against the configured keys. Cheap to clone; verification is synchronous
/// and reads the current key snapshot.
#[derive(Clone)]
pub(crate) struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    secret: Arc<DecodingKey>,
    keys: Arc<KeyStore>,
    sources: Sources,
    validators: Vec<(String, Value)>,
    publishable_keys: Vec<String>,
    secret_keys: Vec<String>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("jwks_keys", &self.inner.keys.len())
            .field("sources", &self.inner.sources)
            .field(
                "validators",
                &self
                    .inner
                    .validators
                    .iter()
                    .map(|(k, _)| k)
                    .collect::<Vec<_>>(),
            )
            .field("publishable_keys", &self.inner.publishable_keys.len())
            .field("secret_keys", &self.inner.secret_keys.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds the verifier from the configuration: the secret, the inline JWKS, the JWKS file
    /// (read now), the claim validators and the `sb_` keys. A JWKS URL is fetched by
    /// [`Verifier::start_refresh`].
    pub(crate) fn from_config(config: &Config, secret: &Secret) -> Result<Verifier, ConfigError> {
        check_config(config)?;
        let inline = match &config.jwt_jwks {
            Some(jwks) => jwks::parse_set(jwks.expose().as_bytes())
                .map_err(|e| format!("API_JWT_JWKS: {e}"))?,
            None => Vec::new(),
        };
        let file = match &config.jwt_jwks_file {
            Some(path) => jwks::read_file(path).map_err(|e| format!("JWT_JWKS_FILE: {e}"))?,
            None => Vec::new(),
        };
        let url = match &config.jwt_jwks_url {
            Some(url) => Some(jwks::JwksUrl::parse(url.expose()).map_err(|e| e.to_string())?),
            None => None,
        };
        let sources = Sources {
            file: config.jwt_jwks_file.clone(),
            url,
            interval: Duration::from_secs(config.jwt_jwks_refresh_secs),
        };
        Ok(Verifier {
            inner: Arc::new(Inner {
                secret: Arc::new(DecodingKey::from_secret(secret.expose().as_bytes())),
                keys: Arc::new(KeyStore::new(inline, file, sources.url.is_some())),
                validators: claim_validators(&config.jwt_claim_validators)?,
                publishable_keys: api_keys(
                    &config.sb_publishable_keys,
                    "sb_publishable_",
                    "SB_PUBLISHABLE_KEYS",
                )?,
                secret_keys: api_keys(&config.sb_secret_keys, "sb_secret_", "SB_SECRET_KEYS")?,
                sources,
            }),
        })
    }

    /// With a JWKS file or URL configured: fetches the URL once (a failure is logged and
    /// retried, not fatal) and spawns the task that refreshes both until `shutdown`.
    pub(crate) async fn start_refresh(&self, tracker: &TaskTracker, shutdown: CancellationToken) {
        let sources = self.inner.sources.clone();
        if sources.is_empty() {
            return;
        }
        let keys = self.inner.keys.clone();
        let healthy = tokio::select! {
            () = shutdown.cancelled() => return,
            ok = jwks::initial_load(&keys, &sources) => ok,
        };
        tracker.spawn(jwks::refresh_loop(keys, sources, healthy, shutdown));
    }

    /// Verifies a token and its claims at the current time.
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        self.verify_at(token, now_seconds())
    }

    pub(crate) fn verify_at(&self, token: &str, now: f64) -> Result<Claims, AuthError> {
        let token = normalize(token);
        if token.is_empty() {
            return Err(AuthError::Malformed);
        }
        if token.starts_with("sb_") {
            return self.api_key_claims(&token);
        }
        let kid = peek_header(&token).ok_or(AuthError::Malformed)?;
        let Ok(header) = jsonwebtoken::decode_header(&token) else {
            // A readable header with an algorithm we cannot verify (e.g. `none`, ES512).
            return Err(AuthError::Signer { kid });
        };
        let key = self.signer(header.alg, kid.as_deref())?;
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(&token, &key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::Signature,
                    ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidKeyFormat
                    | ErrorKind::InvalidAlgorithm => AuthError::Signer { kid: kid.clone() },
                    _ => AuthError::Malformed,
                }
            })?;
        let claims = data.claims;
        let exp = match claims.get("exp") {
            Some(Value::Number(n)) => n.as_f64().map(f64::round),
            _ => None,
        };
        if let Some(exp) = exp
            && exp <= now
        {
            return Err(AuthError::Expired {
                seconds_ago: (now - exp).floor() as i64,
            });
        }
        if let Some((claim, _)) = self
            .inner
            .validators
            .iter()
            .find(|(name, expected)| !claim_matches(claims.get(name), expected))
        {
            debug!(claim = %claim, "token refused: JWT_CLAIM_VALIDATORS check failed");
            return Err(AuthError::ClaimMismatch {
                claim: claim.clone(),
            });
        }
        let role = match claims.get("role") {
            Some(Value::String(role)) => Some(role.clone()),
            _ => None,
        };
        let (Some(role), Some(exp)) = (role, exp) else {
            return Err(AuthError::MissingClaims);
        };
        Ok(Claims {
            role,
            exp: exp as i64,
            all: Arc::new(claims),
        })
    }

    /// The key for a header's algorithm and `kid` (protocol.md §8.1).
    fn signer(&self, alg: Algorithm, kid: Option<&str>) -> Result<Arc<DecodingKey>, AuthError> {
        let kty = match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let oct = kid.and_then(|kid| self.inner.keys.find(kid, KeyType::Oct));
                // Supabase Auth signs HS tokens with a `kid` it does not publish: the secret.
                return Ok(oct.unwrap_or_else(|| self.inner.secret.clone()));
            }
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => KeyType::Rsa,
            Algorithm::ES256 => KeyType::P256,
            Algorithm::ES384 => KeyType::P384,
            Algorithm::EdDSA => KeyType::Ed25519,
            // PS256/384/512: not among the reference's algorithms.
            _ => {
                return Err(AuthError::Signer {
                    kid: kid.map(str::to_owned),
                });
            }
        };
        let Some(kid) = kid else {
            return Err(AuthError::Signer { kid: None });
        };
        match self.inner.keys.find(kid, kty) {
            Some(key) => Ok(key),
            None => {
                debug!(kid = %kid, ?alg, "token refused: no JWK with this kid and type");
                self.inner.keys.missed();
                Err(AuthError::Signer {
                    kid: Some(kid.to_owned()),
                })
            }
        }
    }

    /// The claims an `sb_` key maps to, when it is one of the configured keys.
    fn api_key_claims(&self, key: &str) -> Result<Claims, AuthError> {
        let role = if key.starts_with("sb_publishable_")
            && contains_key(&self.inner.publishable_keys, key)
        {
            "anon"
        } else if key.starts_with("sb_secret_") && contains_key(&self.inner.secret_keys, key) {
            "service_role"
        } else {
            return Err(AuthError::UnknownApiKey);
        };
        let mut all = Map::new();
        all.insert("iss".into(), "supabase".into());
        all.insert("role".into(), role.into());
        all.insert("exp".into(), API_KEY_EXP.into());
        Ok(Claims {
            role: role.to_owned(),
            exp: API_KEY_EXP,
            all: Arc::new(all),
        })
    }
}

/// Whether a token's claim satisfies a `JWT_CLAIM_VALIDATORS` entry: equal, or for an array
/// claim (`aud` may be one) compared with a non-array value, containing it.
fn claim_matches(actual: Option<&Value>, expected: &Value) -> bool {
    match actual {
        None => false,
        Some(Value::Array(items)) if !expected.is_array() => items.contains(expected),
        Some(actual) => actual == expected,
    }
}

/// Whether `key` is in `keys`, comparing every configured key in constant time.
fn contains_key(keys: &[String], key: &str) -> bool {
    keys.iter().fold(false, |found, k| found | ct_eq(k, key))
}

fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `kid` of a token's header, when the header is base64url JSON with an `alg`.
fn peek_header(token: &str) -> Option<Option<String>> {
    use base64::Engine;
    let (header, rest) = token.split_once('.')?;
    rest.split_once('.')?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("alg")?.as_str()?;
    Some(value.get("kid").and_then(Value::as_str).map(str::to_owned))
}

/// Seconds since the epoch, as a float.
pub(crate) fn now_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// URL-decodes the token and removes all whitespace, as the reference server does.
fn normalize(token: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(token).decode_utf8_lossy();
    decoded.chars().filter(|c| !c.is_whitespace()).collect()
}

/// Signs an HS256 token (for the dev keys printed at start, and tests).
pub fn sign_hs256(secret: &str, claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters-long";

    fn verifier() -> Verifier {
        verifier_with(|_| {})
    }

    fn verifier_with(configure: impl FnOnce(&mut Config)) -> Verifier {
        let mut config = Config::for_tests(SECRET);
        configure(&mut config);
        Verifier::from_config(&config, &Secret::new(SECRET.to_owned())).unwrap()
    }

    #[test]
    fn valid_token() {
        let token = sign_hs256(SECRET, &json!({"role": "anon", "exp": 2_000_000_000u64}));
        let claims = verifier().verify_at(&token, 1_000_000_000.0).unwrap();
        assert_eq!(claims.role, "anon");
        assert_eq!(claims.exp, 2_000_000_000);
    }

    #[test]
    fn refusals_carry_reference_texts() {
        let v = verifier();
        let now = 1_000_000_000.0;
        let expired = sign_hs256(SECRET, &json!({"role": "anon", "exp": 999_999_990}));
        assert_eq!(
            v.verify_at(&expired, now).unwrap_err(),
            AuthError::Expired { seconds_ago: 10 }
        );
        assert_eq!(
            v.verify_at(&expired, now).unwrap_err().join_reason(),
            "InvalidJWTToken: Token has expired 10 seconds ago"
        );
        let no_role = sign_hs256(SECRET, &json!({"exp": 2_000_000_000u64}));
        assert_eq!(
            v.verify_at(&no_role, now).unwrap_err(),
            AuthError::MissingClaims
        );
        let no_exp = sign_hs256(SECRET, &json!({"role": "anon"}));
        assert_eq!(
            v.verify_at(&no_exp, now).unwrap_err(),
            AuthError::MissingClaims
        );
        let other = sign_hs256(
            "another-secret",
            &json!({"role": "anon", "exp": 2_000_000_000u64}),
        );
        assert_eq!(v.verify_at(&other, now).unwrap_err(), AuthError::Signature);
        assert_eq!(
            v.verify_at("nonsense", now).unwrap_err(),
            AuthError::Malformed
        );
        assert_eq!(
            v.verify_at("", now).unwrap_err().join_reason(),
            "MalformedJWT: The token provided is not a valid JWT"
        );
    }

    #[test]
    fn whitespace_and_percent_encoding_are_tolerated() {
        let token = sign_hs256(SECRET, &json!({"role": "anon", "exp": 2_000_000_000u64}));
        let mangled = format!(" {}%20\n", token.replace('.', "%2E"));
        assert!(verifier().verify_at(&mangled, 1.0).is_ok());
    }

    #[test]
    fn unsigned_token_is_a_signer_error() {
        // header {"alg":"none","typ":"JWT"}
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJyb2xlIjoiYW5vbiJ9.";
        assert_eq!(
            verifier().verify_at(token, 1.0).unwrap_err(),
            AuthError::Signer { kid: None }
        );
    }

    #[test]
    fn unsupported_algorithm_is_a_signer_error() {
        // header {"alg":"RS256","kid":"k1","typ":"JWT"}
        let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIiwidHlwIjoiSldUIn0.e30.c2ln";
        let err = verifier().verify_at(token, 1.0).unwrap_err();
        assert_eq!(
            err,
            AuthError::Signer {
                kid: Some("k1".into())
            }
        );
        assert!(err.to_string().contains("(kid) \"k1\""));
    }

    mod keys {
        //! Real key pairs generated per test binary, and tokens signed with them.
        use jsonwebtoken::jwk::Jwk;
        use jsonwebtoken::{Algorithm, EncodingKey, Header};
        use serde_json::{Value, json};
        use std::sync::OnceLock;

        pub(super) struct TestKey {
            pub(super) alg: Algorithm,
            encoding: EncodingKey,
            public: Value,
        }

        impl TestKey {
            /// The public JWK with this `kid`.
            pub(super) fn jwk(&self, kid: &str) -> Value {
                let mut jwk = self.public.clone();
                jwk["kid"] = json!(kid);
                jwk
            }

            /// A token signed with this key, its header naming `kid`.
            pub(super) fn sign(&self, kid: Option<&str>, claims: &Value) -> String {
                let mut header = Header::new(self.alg);
                header.kid = kid.map(str::to_owned);
                jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
            }
        }

        fn from_encoding(alg: Algorithm, encoding: EncodingKey) -> TestKey {
            let public =
                serde_json::to_value(Jwk::from_encoding_key(&encoding, alg).unwrap()).unwrap();
            TestKey {
                alg,
                encoding,
                public,
            }
        }

        fn rsa_pair() -> TestKey {
            use rsa::pkcs1::EncodeRsaPrivateKey;
            let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
            let der = private.to_pkcs1_der().unwrap();
            from_encoding(Algorithm::RS256, EncodingKey::from_rsa_der(der.as_bytes()))
        }

        /// Two distinct RSA key pairs (generated once: RSA generation is slow).
        pub(super) fn rsa(which: usize, alg: Algorithm) -> TestKey {
            static KEYS: OnceLock<[TestKey; 2]> = OnceLock::new();
            let key = &KEYS.get_or_init(|| [rsa_pair(), rsa_pair()])[which];
            TestKey {
                alg,
                encoding: key.encoding.clone(),
                public: key.public.clone(),
            }
        }

        pub(super) fn es256() -> TestKey {
            use p256::pkcs8::EncodePrivateKey;
            let key = p256::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
            let der = key.to_pkcs8_der().unwrap();
            from_encoding(Algorithm::ES256, EncodingKey::from_ec_der(der.as_bytes()))
        }

        pub(super) fn es384() -> TestKey {
            use p384::pkcs8::EncodePrivateKey;
            let key = p384::ecdsa::SigningKey::random(&mut rsa::rand_core::OsRng);
            let der = key.to_pkcs8_der().unwrap();
            from_encoding(Algorithm::ES384, EncodingKey::from_ec_der(der.as_bytes()))
        }

        pub(super) fn ed25519() -> TestKey {
            use base64::Engine;
            use ed25519_dalek::pkcs8::EncodePrivateKey;
            let mut secret = [0u8; 32];
            rsa::rand_core::RngCore::fill_bytes(&mut rsa::rand_core::OsRng, &mut secret);
            let key = ed25519_dalek::SigningKey::from_bytes(&secret);
            let der = key.to_pkcs8_der().unwrap();
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(key.verifying_key().as_bytes());
            TestKey {
                alg: Algorithm::EdDSA,
                encoding: EncodingKey::from_ed_der(der.as_bytes()),
                public: json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            }
        }
    }

    fn jwks(keys: &[Value]) -> Option<Secret> {
        Some(Secret::new(json!({ "keys": keys }).to_string()))
    }

    fn anon() -> Value {
        json!({"role": "authenticated", "sub": "u1", "exp": 2_000_000_000u64})
    }

    #[test]
    fn asymmetric_tokens_verify_against_their_jwk() {
        let rs256 = keys::rsa(0, Algorithm::RS256);
        let rs384 = keys::rsa(0, Algorithm::RS384);
        let rs512 = keys::rsa(0, Algorithm::RS512);
        let es256 = keys::es256();
        let es384 = keys::es384();
        let ed = keys::ed25519();
        let v = verifier_with(|c| {
            c.jwt_jwks = jwks(&[
                rs256.jwk("rsa"),
                es256.jwk("p256"),
                es384.jwk("p384"),
                ed.jwk("ed"),
            ]);
        });
        for (key, kid) in [
            (&rs256, "rsa"),
            (&rs384, "rsa"),
            (&rs512, "rsa"),
            (&es256, "p256"),
            (&es384, "p384"),
            (&ed, "ed"),
        ] {
            let token = key.sign(Some(kid), &anon());
            let claims = v
                .verify_at(&token, 1_000_000_000.0)
                .unwrap_or_else(|e| panic!("{:?}: {e}", key.alg));
            assert_eq!(claims.role, "authenticated");
            assert_eq!(claims.all["sub"], "u1");
        }
    }

    #[test]
    fn kid_selects_the_key_and_unknown_kids_are_signer_errors() {
        let a = keys::rsa(0, Algorithm::RS256);
        let b = keys::rsa(1, Algorithm::RS256);
        let es = keys::es256();
        let v = verifier_with(|c| c.jwt_jwks = jwks(&[a.jwk("a"), b.jwk("b"), es.jwk("ec")]));
        let now = 1_000_000_000.0;
        assert!(v.verify_at(&a.sign(Some("a"), &anon()), now).is_ok());
        assert!(v.verify_at(&b.sign(Some("b"), &anon()), now).is_ok());
        // Signed by b, naming a: a's key checks it.
        assert_eq!(
            v.verify_at(&b.sign(Some("a"), &anon()), now).unwrap_err(),
            AuthError::Signature
        );
        let unknown = v
            .verify_at(&a.sign(Some("rotated-away"), &anon()), now)
            .unwrap_err();
        assert_eq!(
            unknown,
            AuthError::Signer {
                kid: Some("rotated-away".into())
            }
        );
        assert_eq!(
            unknown.to_string(),
            "Failed to generate JWT signer for key ID (kid) \"rotated-away\", check your JWT secret or JWKS configuration"
        );
        assert_eq!(
            unknown.join_reason(),
            "JwtSignerError: Failed to generate JWT signer for key ID (kid) \"rotated-away\", check your JWT secret or JWKS configuration"
        );
        assert_eq!(unknown.connect_response().0, 401);
        // Asymmetric without a kid: the variant without the kid.
        let no_kid = v.verify_at(&a.sign(None, &anon()), now).unwrap_err();
        assert_eq!(no_kid, AuthError::Signer { kid: None });
        assert_eq!(
            no_kid.to_string(),
            "Failed to generate JWT signer, check your JWT secret or JWKS configuration"
        );
        // The kid of a key of another type does not match: RS256 naming the EC key.
        assert_eq!(
            v.verify_at(&a.sign(Some("ec"), &anon()), now).unwrap_err(),
            AuthError::Signer {
                kid: Some("ec".into())
            }
        );
        // Without any JWKS, asymmetric tokens are signer errors.
        assert_eq!(
            verifier()
                .verify_at(&es.sign(Some("ec"), &anon()), now)
                .unwrap_err(),
            AuthError::Signer {
                kid: Some("ec".into())
            }
        );
    }

    #[test]
    fn hs_tokens_with_a_kid_use_the_oct_key_else_the_secret() {
        use base64::Engine;
        let other = "another-secret-with-at-least-32-characters!!";
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(other);
        let v = verifier_with(|c| {
            c.jwt_jwks = jwks(&[json!({"kty": "oct", "kid": "hs-1", "k": k, "alg": "HS256"})]);
        });
        let sign = |secret: &str, kid: Option<&str>, alg: Algorithm| {
            let mut header = jsonwebtoken::Header::new(alg);
            header.kid = kid.map(str::to_owned);
            jsonwebtoken::encode(
                &header,
                &anon(),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let now = 1_000_000_000.0;
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert!(v.verify_at(&sign(other, Some("hs-1"), alg), now).is_ok());
            // The oct key is used for its kid, not the secret.
            assert_eq!(
                v.verify_at(&sign(SECRET, Some("hs-1"), alg), now)
                    .unwrap_err(),
                AuthError::Signature
            );
            // An unpublished kid (Supabase Auth's HS tokens): the secret.
            assert!(
                v.verify_at(&sign(SECRET, Some("auth-kid"), alg), now)
                    .is_ok()
            );
            assert!(v.verify_at(&sign(SECRET, None, alg), now).is_ok());
            assert_eq!(
                v.verify_at(&sign(other, None, alg), now).unwrap_err(),
                AuthError::Signature
            );
        }
    }

    #[test]
    fn claim_validators() {
        let v = verifier_with(|c| {
            c.jwt_claim_validators =
                r#"{"iss":"https://abc.supabase.co/auth/v1","aud":"authenticated"}"#.into();
        });
        let now = 1_000_000_000.0;
        let token = |claims: Value| sign_hs256(SECRET, &claims);
        let good = json!({
            "iss": "https://abc.supabase.co/auth/v1", "aud": "authenticated",
            "role": "authenticated", "exp": 2_000_000_000u64
        });
        assert!(v.verify_at(&token(good.clone()), now).is_ok());
        let mut aud_array = good.clone();
        aud_array["aud"] = json!(["authenticated", "other"]);
        assert!(v.verify_at(&token(aud_array), now).is_ok());
        let mut wrong_iss = good.clone();
        wrong_iss["iss"] = json!("supabase");
        let err = v.verify_at(&token(wrong_iss), now).unwrap_err();
        assert_eq!(
            err,
            AuthError::ClaimMismatch {
                claim: "iss".into()
            }
        );
        assert_eq!(
            err.connect_response(),
            (500, "Error connecting to Realtime".to_owned())
        );
        assert_eq!(
            err.join_reason(),
            "InvalidJWTToken: Claim `iss` does not have the value this server requires"
        );
        let mut no_aud = good.clone();
        no_aud.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            v.verify_at(&token(no_aud), now).unwrap_err(),
            AuthError::ClaimMismatch {
                claim: "aud".into()
            }
        );
        // Expiry is checked first, as the reference's validator order does for `exp`.
        let mut expired = good;
        expired["exp"] = json!(999_999_000);
        assert_eq!(
            v.verify_at(&token(expired), now).unwrap_err(),
            AuthError::Expired { seconds_ago: 1000 }
        );
    }

    #[test]
    fn sb_keys_map_to_role_claims() {
        let v = verifier_with(|c| {
            c.sb_publishable_keys = vec![
                Secret::new("sb_publishable_one".into()),
                Secret::new("sb_publishable_two".into()),
            ];
            c.sb_secret_keys = vec![Secret::new("sb_secret_shh".into())];
            // Validators are for tokens; the gateway's own claims are not checked.
            c.jwt_claim_validators = r#"{"iss":"https://abc.supabase.co/auth/v1"}"#.into();
        });
        for key in [
            "sb_publishable_one",
            "sb_publishable_two",
            " sb_publishable_two\n",
        ] {
            let claims = v.verify(key).unwrap();
            assert_eq!(claims.role, "anon");
            assert_eq!(claims.all["role"], "anon");
            assert_eq!(claims.all["iss"], "supabase");
            assert!(claims.exp > 4_000_000_000);
        }
        let claims = v.verify("sb_secret_shh").unwrap();
        assert_eq!(claims.role, "service_role");
        assert_eq!(claims.all["role"], "service_role");
        for unknown in [
            "sb_publishable_nope",
            "sb_secret_nope",
            "sb_secret_one",
            "sb_publishable_shh",
            "sb_other",
        ] {
            let err = v.verify(unknown).unwrap_err();
            assert_eq!(err, AuthError::UnknownApiKey, "{unknown}");
            let (status, message) = err.connect_response();
            assert_eq!(status, 401);
            assert!(message.starts_with("Invalid API key"), "{message}");
            assert!(!message.contains(unknown), "the key is not echoed");
        }
        // Without configured keys every sb_ key is refused with the clear message.
        assert_eq!(
            verifier().verify("sb_publishable_one").unwrap_err(),
            AuthError::UnknownApiKey
        );
    }

    #[test]
    fn sb_key_lists_are_comma_separated() {
        use clap::Parser;
        let config = Config::parse_from([
            "realtime-gateway",
            "--jwt-secret",
            SECRET,
            "--sb-publishable-keys",
            "sb_publishable_a, sb_publishable_b,",
            "--sb-secret-keys",
            "sb_secret_c",
        ]);
        let v = Verifier::from_config(&config, &Secret::new(SECRET.into())).unwrap();
        assert_eq!(v.verify("sb_publishable_a").unwrap().role, "anon");
        assert_eq!(v.verify("sb_publishable_b").unwrap().role, "anon");
        assert_eq!(v.verify("sb_secret_c").unwrap().role, "service_role");
        assert!(
            !format!("{config:?}").contains("sb_secret_c"),
            "keys never print"
        );
        assert!(
            !format!("{v:?}").contains("sb_secret_c"),
            "keys never print"
        );
    }

    #[test]
    fn invalid_auth_config_is_refused() {
        let check = |configure: fn(&mut Config)| {
            let mut config = Config::for_tests(SECRET);
            configure(&mut config);
            config.validate().and_then(|()| check_config(&config))
        };
        assert!(check(|_| {}).is_ok());
        assert!(check(|c| c.jwt_claim_validators = "[1]".into()).is_err());
        assert!(check(|c| c.jwt_claim_validators = "{".into()).is_err());
        assert!(check(|c| c.jwt_jwks = Some(Secret::new("{\"nokeys\":1}".into()))).is_err());
        assert!(check(|c| c.jwt_jwks_url = Some(Secret::new("ftp://x/".into()))).is_err());
        assert!(check(|c| c.jwt_jwks_refresh_secs = 0).is_err());
        assert!(
            check(|c| c.sb_publishable_keys = vec![Secret::new("sb_secret_x".into())]).is_err()
        );
        assert!(check(|c| c.sb_secret_keys = vec![Secret::new("sb_secret_".into())]).is_err());
        let err = check(|c| c.sb_secret_keys = vec![Secret::new("hunter2".into())]).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let mut config = Config::for_tests(SECRET);
        config.jwt_jwks_file = Some("/nonexistent/jwks.json".into());
        assert!(Verifier::from_config(&config, &Secret::new(SECRET.into())).is_err());
    }

    #[test]
    fn jwks_file_is_read() {
        let es = keys::es256();
        let path = std::env::temp_dir().join(format!("gateway-jwks-{}.json", std::process::id()));
        std::fs::write(&path, json!({"keys": [es.jwk("file-key")]}).to_string()).unwrap();
        let v = verifier_with(|c| c.jwt_jwks_file = Some(path.clone()));
        let _ = std::fs::remove_file(&path);
        assert!(
            v.verify_at(&es.sign(Some("file-key"), &anon()), 1.0)
                .is_ok()
        );
    }

    /// Serves `body` to every GET, counting requests.
    async fn serve_jwks(
        body: Arc<std::sync::Mutex<String>>,
        hits: Arc<std::sync::atomic::AtomicUsize>,
    ) -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = body.lock().unwrap().clone();
                hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    // Keep-alive: the client closes.
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn jwks_url_is_fetched_and_refetched_on_an_unknown_kid() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let first = keys::es256();
        let rotated = keys::ed25519();
        let body = Arc::new(std::sync::Mutex::new(
            json!({"keys": [first.jwk("k1")]}).to_string(),
        ));
        let hits = Arc::new(AtomicUsize::new(0));
        let addr = serve_jwks(body.clone(), hits.clone()).await;
        let v = verifier_with(|c| {
            c.jwt_jwks_url = Some(Secret::new(format!(
                "http://{addr}/auth/v1/.well-known/jwks.json"
            )));
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        v.start_refresh(&tracker, shutdown.clone()).await;
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        assert!(
            v.verify(&first.sign(
                Some("k1"),
                &json!({"role": "anon", "exp": 4_000_000_000u64})
            ))
            .is_ok()
        );

        // The issuer rotates: a token names a kid the gateway has not seen.
        *body.lock().unwrap() = json!({"keys": [first.jwk("k1"), rotated.jwk("k2")]}).to_string();
        let token = rotated.sign(
            Some("k2"),
            &json!({"role": "anon", "exp": 4_000_000_000u64}),
        );
        assert_eq!(
            v.verify(&token).unwrap_err(),
            AuthError::Signer {
                kid: Some("k2".into())
            }
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while v.verify(&token).is_err() {
            assert!(tokio::time::Instant::now() < deadline, "k2 never fetched");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(hits.load(Ordering::SeqCst), 2);

        // More unknown kids within the rate limit cause no fetch.
        for i in 0..5 {
            let _ = v.verify(&rotated.sign(Some(&format!("x{i}")), &anon()));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(hits.load(Ordering::SeqCst), 2);
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
