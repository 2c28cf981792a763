//! Access-token verification against one issuer and audience, with keys held in memory or
//! fetched from the issuer's JWKS.
//!
//! Checks run in this order, and the first failure is the answer:
//! 1. size (at most `max_token_bytes`) and shape: three base64url parts, a JSON header (`Malformed`);
//! 2. the header's `alg` is asymmetric and allowed (`Invalid`), with no `crit` extensions;
//! 3. a key is found by `kid` (`UnknownKey`), or, without a `kid`, the single key that fits
//!    the algorithm; the key's own `kty`/`crv`/`alg`/`use` must fit the header's `alg` (`Invalid`);
//! 4. the signature (`Invalid`);
//! 5. `exp` present and not past beyond the leeway (`Expired`);
//! 6. `nbf`, if present, not in the future beyond the leeway (`Invalid`, "token not yet valid");
//! 7. `iss` is exactly the configured issuer (`IssuerMismatch`);
//! 8. `aud`, a string or an array, contains the configured audience (`AudienceMismatch`);
//! 9. `sub` is a non-empty string (`Invalid`).
//!
//! Nothing from the claims is looked at before the signature verifies, so an attacker learns
//! no more than "invalid" from a forged token, whatever its claims say.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Map, Value};

use super::jwks::{self, RemoteJwks};

/// What a verifier accepts: one issuer, one audience, and tolerances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// The `iss` tokens must carry, compared byte for byte (a trailing slash matters), and the
    /// base of the discovery URL.
    pub issuer: String,
    /// A value the token's `aud` must contain: this platform's client id at the issuer.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`, in whole seconds.
    pub leeway: Duration,
    /// Least time between two JWKS fetches triggered by unknown kids, so a flood of tokens
    /// with made-up kids cannot turn into a flood of requests to the identity provider.
    pub refresh_cooldown: Duration,
    /// Longer tokens are rejected before any parsing; real access tokens are 1 to 3 KiB.
    pub max_token_bytes: usize,
}

/// Where verification keys come from.
#[derive(Debug)]
pub enum KeySource {
    /// Keys held in memory (the built-in issuer's own public keys); replaceable at runtime on
    /// rotation by writing the lock. Every verification reads the lock, so a replacement takes
    /// effect for the next token.
    Static(Arc<RwLock<JwkSet>>),
    /// Keys fetched from a JWKS URL; `jwks_uri: None` means discover it from
    /// `<issuer>/.well-known/openid-configuration`.
    Remote { jwks_uri: Option<String>, http: reqwest::Client },
}

/// Verifies access tokens; cheap to clone (one `Arc`), shared by all request handlers.
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<Inner>,
}

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifiedClaims {
    pub issuer: String,
    /// The issuer's stable id of the user (`sub`); with `issuer`, the key to the local user.
    pub subject: String,
    pub email: Option<String>,
    /// `email_verified`, when the issuer states it.
    pub email_verified: Option<bool>,
    /// `name`, or else `preferred_username` (Keycloak puts the login name there).
    pub name: Option<String>,
    /// `realm_access.roles` (Keycloak) followed by the top-level `roles` array (the built-in
    /// issuer, Auth0-style rules), without duplicates, in that order.
    pub roles: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: i64,
    /// `jti`, for revocation lists.
    pub token_id: Option<String>,
}

/// Why a token was refused. Each variant has a stable [`code`](TokenError::code) for the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// `exp` is past by more than the leeway; the client should refresh its token.
    #[error("token expired")]
    Expired,
    /// The token is well-formed but not acceptable: bad signature, refused algorithm, key that
    /// does not fit, not yet valid, or a required claim missing.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `aud` does not contain this platform's audience: a token meant for another client.
    #[error("token audience does not include this service")]
    AudienceMismatch,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not the configured issuer")]
    IssuerMismatch,
    /// No key with this kid, even after refreshing the issuer's keys.
    #[error("token is signed with unknown key {0}")]
    UnknownKey(String),
    /// Not a JWT at all: too long, wrong number of parts, bad base64 or JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The issuer's keys could not be fetched and none are cached; the caller should answer
    /// 503, since the token may be fine.
    #[error("identity provider unavailable: {0}")]
    ProviderUnavailable(String),
}

struct Inner {
    cfg: VerifierConfig,
    keys: Keys,
}

enum Keys {
    Static(Arc<RwLock<JwkSet>>),
    Remote(RemoteJwks),
}

/// The only algorithms accepted: asymmetric ones, so holding the public key never lets anyone
/// mint tokens. HMAC is refused outright, which defeats the confusion attack of signing with a
/// published RSA key as an HMAC secret; `none` is not even an `Algorithm`.
const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl VerifierConfig {
    pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
    pub const DEFAULT_REFRESH_COOLDOWN: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_TOKEN_BYTES: usize = 8192;

    /// A configuration with the default leeway (60 s), refresh cooldown (30 s) and size limit
    /// (8 KiB).
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: Self::DEFAULT_LEEWAY,
            refresh_cooldown: Self::DEFAULT_REFRESH_COOLDOWN,
            max_token_bytes: Self::DEFAULT_MAX_TOKEN_BYTES,
        }
    }
}

impl TokenError {
    /// The stable error code the API returns for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Expired => "token_expired",
            TokenError::Invalid(_) => "token_invalid",
            TokenError::AudienceMismatch => "audience_mismatch",
            TokenError::IssuerMismatch => "issuer_mismatch",
            TokenError::UnknownKey(_) => "unknown_key",
            TokenError::Malformed(_) => "malformed",
            TokenError::ProviderUnavailable(_) => "identity_provider_unavailable",
        }
    }
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.inner.keys {
            Keys::Static(_) => "static",
            Keys::Remote(_) => "remote",
        };
        f.debug_struct("TokenVerifier")
            .field("issuer", &self.inner.cfg.issuer)
            .field("audience", &self.inner.cfg.audience)
            .field("keys", &source)
            .finish()
    }
}

impl TokenVerifier {
    pub fn new(cfg: VerifierConfig, keys: KeySource) -> Self {
        let keys = match keys {
            KeySource::Static(set) => Keys::Static(set),
            KeySource::Remote { jwks_uri, http } => Keys::Remote(RemoteJwks::new(jwks_uri, http)),
        };
        Self { inner: Arc::new(Inner { cfg, keys }) }
    }

    pub fn config(&self) -> &VerifierConfig {
        &self.inner.cfg
    }

    /// Verify signature and claims (in the order the module documentation gives) and extract
    /// what the platform needs.
    pub async fn verify(&self, token: &str) -> Result<VerifiedClaims, TokenError> {
        let cfg = &self.inner.cfg;
        if token.len() > cfg.max_token_bytes {
            return Err(TokenError::Malformed(format!(
                "token is {} bytes, more than the limit of {}",
                token.len(),
                cfg.max_token_bytes
            )));
        }
        let header = parse_header(token)?;
        let jwk = self.key_for(&header).await?;
        let key = DecodingKey::from_jwk(&jwk)
            .map_err(|_| TokenError::Invalid(format!("key {} is unusable", key_name(&header))))?;

        let mut validation = Validation::new(header.alg);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        validation.set_issuer(&[&cfg.issuer]);
        validation.set_audience(&[&cfg.audience]);
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(from_jwt_error)?;
        claims_from(&data.claims, cfg)
    }

    /// Fetch the JWKS now (startup warm-up, so a misconfigured issuer shows at boot rather than
    /// on the first login); `Ok(())` for static keys. Ignores the cooldown.
    pub async fn refresh(&self) -> Result<(), TokenError> {
        match &self.inner.keys {
            Keys::Static(_) => Ok(()),
            Keys::Remote(remote) => remote
                .refresh_now(&self.inner.cfg.issuer)
                .await
                .map_err(TokenError::ProviderUnavailable),
        }
    }

    /// The key that should have signed this token. For remote keys, a miss triggers one
    /// JWKS refresh (subject to the cooldown) before giving up, which is how a rotated-in key
    /// becomes known.
    async fn key_for(&self, header: &Header) -> Result<Jwk, TokenError> {
        match &self.inner.keys {
            Keys::Static(set) => {
                let set = set.read().unwrap_or_else(PoisonError::into_inner);
                jwks::pick(&set.keys, header)?.ok_or_else(|| no_key(header))
            }
            Keys::Remote(remote) => {
                let seen = remote.attempts();
                if let Some(keys) = remote.cached()
                    && let Some(jwk) = jwks::pick(&keys, header)?
                {
                    return Ok(jwk);
                }
                remote.refresh_if_due(seen, &self.inner.cfg).await;
                match remote.cached() {
                    None => Err(TokenError::ProviderUnavailable(remote.last_error())),
                    Some(keys) => jwks::pick(&keys, header)?.ok_or_else(|| no_key(header)),
                }
            }
        }
    }
}

/// Read the header ourselves before handing the token to `jsonwebtoken`, whose `Header` cannot
/// even represent `alg: none` or an unknown algorithm, so that refusals say what was refused.
fn parse_header(token: &str) -> Result<Header, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts".into()));
    };
    let raw = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    let value: Value = serde_json::from_slice(&raw)
        .map_err(|_| TokenError::Malformed("header is not JSON".into()))?;
    let alg = value
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| TokenError::Malformed("header has no alg".into()))?;
    if !Algorithm::from_str(alg).is_ok_and(|a| ACCEPTED.contains(&a)) {
        return Err(TokenError::Invalid(format!("algorithm {} not accepted", shorten(alg))));
    }
    // RFC 7515 §4.1.11: extensions marked critical must be understood, and we understand none.
    if value.get("crit").is_some() {
        return Err(TokenError::Invalid("critical header extensions are not supported".into()));
    }
    serde_json::from_value(value)
        .map_err(|_| TokenError::Malformed("header fields have the wrong types".into()))
}

/// The error when no key fits: by kid when the token names one.
fn no_key(header: &Header) -> TokenError {
    match &header.kid {
        Some(kid) => TokenError::UnknownKey(shorten(kid)),
        None => TokenError::Invalid(format!(
            "token names no kid and no key fits algorithm {:?}",
            header.alg
        )),
    }
}

fn key_name(header: &Header) -> String {
    header.kid.as_deref().map_or_else(|| "without kid".to_owned(), shorten)
}

/// Header values are attacker-chosen and end up in error messages and logs: keep them short.
fn shorten(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

/// Map `jsonwebtoken`'s failures onto ours. Its validation runs exp, nbf, iss, aud in that
/// order, which is the documented order of this module.
fn from_jwt_error(e: jsonwebtoken::errors::Error) -> TokenError {
    let invalid = |m: &str| TokenError::Invalid(m.to_owned());
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => invalid("token not yet valid"),
        ErrorKind::InvalidIssuer => TokenError::IssuerMismatch,
        ErrorKind::InvalidAudience => TokenError::AudienceMismatch,
        ErrorKind::InvalidSignature => invalid("signature does not verify"),
        ErrorKind::InvalidAlgorithm => invalid("algorithm does not fit the key"),
        ErrorKind::MissingRequiredClaim(claim) => {
            TokenError::Invalid(format!("token has no valid {claim} claim"))
        }
        ErrorKind::InvalidToken => {
            TokenError::Malformed("expected three dot-separated parts".into())
        }
        ErrorKind::Base64(_) => TokenError::Malformed("a part is not base64url".into()),
        ErrorKind::Json(_) => TokenError::Malformed("claims are not a JSON object".into()),
        ErrorKind::Utf8(_) => TokenError::Malformed("a part is not UTF-8".into()),
        // Keys that parse as JWKs but not as keys (a short RSA modulus, an EC point off the
        // curve) fail inside the crypto library; the token cannot be trusted either way.
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::Crypto(_) => invalid("signature does not verify with the key"),
        other => TokenError::Invalid(format!("{other:?}")),
    }
}

/// Extract our claims and apply the checks `jsonwebtoken` leaves out: it skips `iss` and `aud`
/// when absent and accepts an array `iss`, while we require both and compare `iss` exactly.
fn claims_from(
    claims: &Map<String, Value>,
    cfg: &VerifierConfig,
) -> Result<VerifiedClaims, TokenError> {
    let string = |key: &str| claims.get(key).and_then(Value::as_str).map(str::to_owned);

    if claims.get("iss").and_then(Value::as_str) != Some(cfg.issuer.as_str()) {
        return Err(TokenError::IssuerMismatch);
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => *aud == cfg.audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(cfg.audience.as_str())),
        _ => false,
    };
    if !audience_ok {
        return Err(TokenError::AudienceMismatch);
    }
    let subject = string("sub")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| TokenError::Invalid("token has no sub claim".into()))?;
    // `jsonwebtoken` has checked that exp is a non-negative number; it may be a float.
    let expires_at = claims
        .get("exp")
        .and_then(|exp| exp.as_i64().or_else(|| exp.as_f64().map(|f| f as i64)))
        .ok_or_else(|| TokenError::Invalid("token has no valid exp claim".into()))?;

    let realm_roles = claims.get("realm_access").and_then(|r| r.get("roles"));
    let mut roles: Vec<String> = Vec::new();
    for role in [realm_roles, claims.get("roles")]
        .into_iter()
        .flatten()
        .filter_map(Value::as_array)
        .flatten()
        .filter_map(Value::as_str)
    {
        if !roles.iter().any(|r| r == role) {
            roles.push(role.to_owned());
        }
    }

    Ok(VerifiedClaims {
        issuer: cfg.issuer.clone(),
        subject,
        email: string("email"),
        email_verified: claims.get("email_verified").and_then(Value::as_bool),
        name: string("name").or_else(|| string("preferred_username")),
        roles,
        expires_at,
        token_id: string("jti"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_part(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn header_checks() {
        let p = encode_part(&serde_json::json!({}));
        let with = |h: Value| format!("{}.{p}.sig", encode_part(&h));
        let err = |t: &str| parse_header(t).unwrap_err();

        assert!(matches!(err("a.b"), TokenError::Malformed(_)));
        assert!(matches!(err("a.b.c.d"), TokenError::Malformed(_)));
        assert!(matches!(err("!!.b.c"), TokenError::Malformed(_)));
        assert!(matches!(err(&with(serde_json::json!({"typ": "JWT"}))), TokenError::Malformed(_)));
        for alg in ["none", "HS256", "HS512", "RSA-OAEP", "ES512"] {
            let e = err(&with(serde_json::json!({"alg": alg})));
            assert_eq!(e, TokenError::Invalid(format!("algorithm {alg} not accepted")));
        }
        let crit = with(serde_json::json!({"alg": "RS256", "crit": ["exp"], "exp": 1}));
        assert!(matches!(err(&crit), TokenError::Invalid(_)));
        let bad_kid = with(serde_json::json!({"alg": "RS256", "kid": 7}));
        assert!(matches!(err(&bad_kid), TokenError::Malformed(_)));
        let ok = parse_header(&with(serde_json::json!({"alg": "EdDSA", "kid": "k"}))).unwrap();
        assert_eq!((ok.alg, ok.kid.as_deref()), (Algorithm::EdDSA, Some("k")));
    }

    #[test]
    fn codes_are_stable() {
        let all = [
            (TokenError::Expired, "token_expired"),
            (TokenError::Invalid(String::new()), "token_invalid"),
            (TokenError::AudienceMismatch, "audience_mismatch"),
            (TokenError::IssuerMismatch, "issuer_mismatch"),
            (TokenError::UnknownKey(String::new()), "unknown_key"),
            (TokenError::Malformed(String::new()), "malformed"),
            (TokenError::ProviderUnavailable(String::new()), "identity_provider_unavailable"),
        ];
        for (e, code) in all {
            assert_eq!(e.code(), code);
        }
    }

    #[test]
    fn claims_require_exact_issuer_and_audience() {
        let cfg = VerifierConfig::new("https://id.example", "bud");
        let base =
            serde_json::json!({"iss": "https://id.example", "aud": "bud", "sub": "u", "exp": 10});
        let with = |k: &str, v: Value| {
            let mut m = base.as_object().unwrap().clone();
            if v.is_null() {
                m.remove(k);
            } else {
                m.insert(k.into(), v);
            }
            claims_from(&m, &cfg)
        };
        assert!(with("sub", "u".into()).is_ok());
        assert_eq!(with("iss", Value::Null), Err(TokenError::IssuerMismatch));
        assert_eq!(with("iss", "https://id.example/".into()), Err(TokenError::IssuerMismatch));
        assert_eq!(
            with("iss", serde_json::json!(["https://id.example"])),
            Err(TokenError::IssuerMismatch)
        );
        assert_eq!(with("aud", Value::Null), Err(TokenError::AudienceMismatch));
        assert_eq!(with("aud", serde_json::json!(["x", "bud"])).unwrap().subject, "u");
        assert!(matches!(with("sub", Value::Null), Err(TokenError::Invalid(_))));
        assert!(matches!(with("sub", "".into()), Err(TokenError::Invalid(_))));
        assert_eq!(with("exp", serde_json::json!(12.7)).unwrap().expires_at, 12);
    }

    #[test]
    fn long_header_values_are_shortened() {
        assert_eq!(shorten("abc"), "abc");
        assert_eq!(shorten(&"x".repeat(100)).chars().count(), 65);
    }
}
