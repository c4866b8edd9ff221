//! Turning a token into claims: the connect token, each channel token, refreshed tokens and
//! REST callers all go through [`Verifier::verify`].
//!
//! Rules (the reference server's): the token is URL-decoded and stripped of whitespace; HS256/384/
//! 512 tokens are checked against the configured secret; `exp` must be a number in the future (no
//! leeway, decimals rounded); `role` and `exp` are required. Error texts are the reference's,
//! because clients show them to developers.

use crate::config::Secret;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

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
            other => (401, other.to_string()),
        }
    }

    /// The `reason` of a refused join.
    pub(crate) fn join_reason(&self) -> String {
        let code = match self {
            AuthError::Missing | AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::Expired { .. } | AuthError::MissingClaims => "InvalidJWTToken",
            AuthError::Signer { .. } => "JwtSignerError",
        };
        format!("{code}: {self}")
    }
}

/// Verifies tokens against the configured keys.
#[derive(Clone, Debug)]
pub(crate) struct Verifier {
    secret: Arc<DecodingKey>,
}

impl Verifier {
    pub(crate) fn new(secret: &Secret) -> Verifier {
        Verifier {
            secret: Arc::new(DecodingKey::from_secret(secret.expose().as_bytes())),
        }
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
        let kid = peek_header(&token).ok_or(AuthError::Malformed)?;
        let Ok(header) = jsonwebtoken::decode_header(&token) else {
            // A readable header with an algorithm we cannot verify (e.g. `none`).
            return Err(AuthError::Signer { kid });
        };
        let key = match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => &self.secret,
            _ => return Err(AuthError::Signer { kid: header.kid }),
        };
        let mut validation = Validation::new(header.alg);
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(&token, key, &validation).map_err(|e| {
                match e.kind() {
                    ErrorKind::InvalidSignature => AuthError::Signature,
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
        Verifier::new(&Secret::new(SECRET.to_owned()))
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
}
