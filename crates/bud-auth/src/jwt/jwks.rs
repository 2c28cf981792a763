//! Choosing the key for a token, and keeping a remote issuer's JWKS: discovery, fetching,
//! caching, and refreshing on unknown kids no more than once per cooldown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, Header};
use serde_json::Value;

use super::verifier::{TokenError, VerifierConfig};

/// Bound on one discovery or JWKS request, so a hung identity provider stalls logins for
/// seconds, not minutes (refreshes hold a lock that other verifications of unknown kids wait on).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on a discovery document or JWKS body; real ones are a few KiB.
const MAX_BODY_BYTES: usize = 1 << 20;

/// The key that verifies a token with this header, from `keys`.
///
/// With a kid: the key of that kid, which must fit the algorithm (else `Invalid`, since
/// a kid names exactly one key and a mismatch means the token lies about its algorithm).
/// Without a kid: the one key that fits the algorithm; several is `Invalid` because guessing
/// would let the token choose. `Ok(None)` means no key is known yet, which for a remote
/// issuer is worth a refresh.
pub(super) fn pick(keys: &[Jwk], header: &Header) -> Result<Option<Jwk>, TokenError> {
    match &header.kid {
        Some(kid) => {
            let mut named =
                keys.iter().filter(|k| k.common.key_id.as_deref() == Some(kid)).peekable();
            if named.peek().is_none() {
                return Ok(None);
            }
            named.find(|k| fits(header.alg, k)).cloned().map(Some).ok_or_else(|| {
                TokenError::Invalid(format!("algorithm {:?} does not fit key {kid}", header.alg))
            })
        }
        None => {
            let fitting: Vec<&Jwk> = keys.iter().filter(|k| fits(header.alg, k)).collect();
            match fitting.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some((*one).clone())),
                many => Err(TokenError::Invalid(format!(
                    "token names no kid and {} keys fit algorithm {:?}",
                    many.len(),
                    header.alg
                ))),
            }
        }
    }
}

/// Whether a JWK may verify a signature made with `alg`: its key type (and curve) must be the
/// algorithm's, its declared `alg` (if any) must be `alg`, and it must not be marked for
/// encryption only. This is what keeps an RSA key from being used as an HMAC secret, or a
/// P-384 key from checking an ES256 signature.
fn fits(alg: Algorithm, jwk: &Jwk) -> bool {
    let common = &jwk.common;
    if matches!(common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return false;
    }
    if common.key_operations.as_ref().is_some_and(|ops| !ops.contains(&KeyOperations::Verify)) {
        return false;
    }
    if common.key_algorithm.is_some_and(|declared| Some(declared) != key_algorithm(alg)) {
        return false;
    }
    match (&jwk.algorithm, alg) {
        (
            AlgorithmParameters::RSA(_),
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512,
        ) => true,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => p.curve == EllipticCurve::P256,
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES384) => p.curve == EllipticCurve::P384,
        (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => {
            p.curve == EllipticCurve::Ed25519
        }
        _ => false,
    }
}

/// The JWK `alg` value naming the same algorithm as a JWS `alg`.
fn key_algorithm(alg: Algorithm) -> Option<KeyAlgorithm> {
    Some(match alg {
        Algorithm::RS256 => KeyAlgorithm::RS256,
        Algorithm::RS384 => KeyAlgorithm::RS384,
        Algorithm::RS512 => KeyAlgorithm::RS512,
        Algorithm::PS256 => KeyAlgorithm::PS256,
        Algorithm::PS384 => KeyAlgorithm::PS384,
        Algorithm::PS512 => KeyAlgorithm::PS512,
        Algorithm::ES256 => KeyAlgorithm::ES256,
        Algorithm::ES384 => KeyAlgorithm::ES384,
        Algorithm::EdDSA => KeyAlgorithm::EdDSA,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => return None,
    })
}

/// A remote issuer's keys as last fetched, and the machinery to refresh them.
pub(super) struct RemoteJwks {
    http: reqwest::Client,
    /// Read on every verification, written after each fetch; the lock is only held to clone
    /// an `Arc`, never across an await.
    state: RwLock<CacheState>,
    /// Counts fetch attempts (successful or not). A verifier reads it before looking in the
    /// cache; if it has moved by the time the verifier holds the refresh lock, another task
    /// fetched in between and the verifier re-checks the cache instead of fetching again.
    attempts: AtomicU64,
    /// Held for the whole of a fetch, so concurrent misses share one request.
    refresh: tokio::sync::Mutex<RefreshState>,
}

#[derive(Default)]
struct CacheState {
    /// `None` until the first successful fetch.
    keys: Option<Arc<Vec<Jwk>>>,
    last_error: Option<String>,
}

struct RefreshState {
    /// Configured, or discovered on the first fetch and kept.
    jwks_uri: Option<String>,
    last_attempt: Option<Instant>,
}

impl RemoteJwks {
    pub(super) fn new(jwks_uri: Option<String>, http: reqwest::Client) -> Self {
        Self {
            http,
            state: RwLock::new(CacheState::default()),
            attempts: AtomicU64::new(0),
            refresh: tokio::sync::Mutex::new(RefreshState { jwks_uri, last_attempt: None }),
        }
    }

    pub(super) fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// The keys of the last successful fetch, if any succeeded.
    pub(super) fn cached(&self) -> Option<Arc<Vec<Jwk>>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner).keys.clone()
    }

    pub(super) fn last_error(&self) -> String {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.last_error.clone().unwrap_or_else(|| "signing keys not fetched yet".to_owned())
    }

    /// Fetch unless another task fetched since `seen_attempts` was read, or the last fetch was
    /// less than the cooldown ago. Failures are logged and leave the cache as it was: a token
    /// with a known kid keeps verifying while the identity provider is down.
    pub(super) async fn refresh_if_due(&self, seen_attempts: u64, cfg: &VerifierConfig) {
        let mut refresh = self.refresh.lock().await;
        if self.attempts() != seen_attempts {
            return;
        }
        // With no keys at all every request fails, so retry within a second rather than
        // waiting out the cooldown meant to protect a provider that works.
        let cooldown = if self.cached().is_none() {
            cfg.refresh_cooldown.min(std::time::Duration::from_secs(1))
        } else {
            cfg.refresh_cooldown
        };
        if refresh.last_attempt.is_some_and(|at| at.elapsed() < cooldown) {
            return;
        }
        if let Err(e) = self.fetch_locked(&mut refresh, &cfg.issuer).await {
            tracing::warn!(issuer = %cfg.issuer, error = %e, "refreshing signing keys failed");
        }
    }

    /// Fetch now, whatever the cooldown says.
    pub(super) async fn refresh_now(&self, issuer: &str) -> Result<(), String> {
        let mut refresh = self.refresh.lock().await;
        self.fetch_locked(&mut refresh, issuer).await
    }

    async fn fetch_locked(&self, refresh: &mut RefreshState, issuer: &str) -> Result<(), String> {
        refresh.last_attempt = Some(Instant::now());
        let result = self.fetch(refresh, issuer).await;
        {
            let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
            match &result {
                Ok(keys) => {
                    state.keys = Some(Arc::new(keys.clone()));
                    state.last_error = None;
                }
                Err(e) => state.last_error = Some(e.clone()),
            }
        }
        self.attempts.fetch_add(1, Ordering::AcqRel);
        let keys = result?;
        if keys.is_empty() {
            tracing::warn!(%issuer, "the issuer's JWKS holds no usable signing key");
        } else {
            tracing::debug!(%issuer, keys = keys.len(), "fetched signing keys");
        }
        Ok(())
    }

    async fn fetch(&self, refresh: &mut RefreshState, issuer: &str) -> Result<Vec<Jwk>, String> {
        let jwks_uri = match &refresh.jwks_uri {
            Some(uri) => uri.clone(),
            None => {
                let uri = discover(&self.http, issuer).await?;
                refresh.jwks_uri = Some(uri.clone());
                uri
            }
        };
        parse_jwks(&get_json(&self.http, &jwks_uri).await?, &jwks_uri)
    }
}

/// The `jwks_uri` of the issuer's OpenID discovery document, after checking the document is
/// about this issuer (OpenID Connect Discovery §4.3), so a misrouted URL cannot hand us another
/// issuer's keys.
async fn discover(http: &reqwest::Client, issuer: &str) -> Result<String, String> {
    let url = format!("{}/.well-known/openid-configuration", issuer.trim_end_matches('/'));
    let doc = get_json(http, &url).await?;
    let named = doc.get("issuer").and_then(Value::as_str);
    if named != Some(issuer) {
        return Err(format!(
            "discovery document at {url} names issuer {}, expected {issuer}",
            named.unwrap_or("(none)")
        ));
    }
    let jwks_uri = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("discovery document at {url} has no jwks_uri"))?;
    match url::Url::parse(jwks_uri) {
        Ok(u) if matches!(u.scheme(), "https" | "http") => Ok(jwks_uri.to_owned()),
        _ => {
            Err(format!("discovery document at {url} has jwks_uri {jwks_uri}, not an http(s) URL"))
        }
    }
}

/// Keys of a JWKS document. Keys this crate cannot represent (X25519, P-521, encryption-only
/// shapes) are skipped rather than failing the whole set: Keycloak publishes an RSA-OAEP key
/// beside its signing keys.
fn parse_jwks(doc: &Value, uri: &str) -> Result<Vec<Jwk>, String> {
    let keys = doc
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("{uri} is not a JWKS (no keys array)"))?;
    Ok(keys
        .iter()
        .filter_map(|k| match serde_json::from_value::<Jwk>(k.clone()) {
            Ok(jwk) => Some(jwk),
            Err(e) => {
                tracing::debug!(%uri, kid = ?k.get("kid"), error = %e, "skipping unusable JWK");
                None
            }
        })
        .collect())
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let failed = |e: reqwest::Error| format!("fetching {url}: {}", error_chain(&e));
    let mut response = http
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(failed)?;
    if !response.status().is_success() {
        return Err(format!("fetching {url}: HTTP {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(format!("fetching {url}: body larger than {MAX_BODY_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url} did not return JSON: {e}"))
}

/// reqwest's top-level message ("error sending request") hides the cause (connection refused,
/// DNS, TLS); operators need the whole chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn jwk(v: Value) -> Jwk {
        serde_json::from_value(v).unwrap()
    }

    fn rsa(kid: &str) -> Jwk {
        jwk(json!({"kty": "RSA", "kid": kid, "n": "AQAB", "e": "AQAB"}))
    }

    fn ec(kid: &str, crv: &str) -> Jwk {
        jwk(json!({"kty": "EC", "kid": kid, "crv": crv, "x": "AA", "y": "AA"}))
    }

    fn header(alg: Algorithm, kid: Option<&str>) -> Header {
        Header { kid: kid.map(str::to_owned), ..Header::new(alg) }
    }

    #[test]
    fn kid_selects_and_must_fit() {
        let keys = [rsa("r"), ec("e", "P-256")];
        assert_eq!(pick(&keys, &header(Algorithm::RS256, Some("r"))).unwrap(), Some(rsa("r")));
        assert_eq!(pick(&keys, &header(Algorithm::PS512, Some("r"))).unwrap(), Some(rsa("r")));
        assert_eq!(pick(&keys, &header(Algorithm::RS256, Some("x"))).unwrap(), None);
        assert!(pick(&keys, &header(Algorithm::ES256, Some("r"))).is_err());
        assert!(pick(&keys, &header(Algorithm::ES384, Some("e"))).is_err());
        assert!(pick(&keys, &header(Algorithm::HS256, Some("r"))).is_err());
    }

    #[test]
    fn without_kid_exactly_one_key_must_fit() {
        let keys = [rsa("r"), ec("e", "P-256")];
        assert_eq!(pick(&keys, &header(Algorithm::ES256, None)).unwrap(), Some(ec("e", "P-256")));
        assert_eq!(pick(&keys, &header(Algorithm::EdDSA, None)).unwrap(), None);
        let two = [rsa("a"), rsa("b")];
        assert!(pick(&two, &header(Algorithm::RS256, None)).is_err());
    }

    #[test]
    fn declared_alg_and_use_are_honoured() {
        let declared =
            jwk(json!({"kty": "RSA", "kid": "r", "alg": "PS256", "n": "AQAB", "e": "AQAB"}));
        assert!(fits(Algorithm::PS256, &declared));
        assert!(!fits(Algorithm::RS256, &declared));
        let enc = jwk(json!({"kty": "RSA", "kid": "r", "use": "enc", "n": "AQAB", "e": "AQAB"}));
        assert!(!fits(Algorithm::RS256, &enc));
        let oct = jwk(json!({"kty": "oct", "kid": "h", "k": "c2VjcmV0"}));
        assert!(!fits(Algorithm::HS256, &oct));
        assert!(!fits(Algorithm::RS256, &oct));
    }

    #[test]
    fn jwks_parsing_skips_unusable_keys() {
        let doc = json!({"keys": [
            {"kty": "RSA", "kid": "sig", "n": "AQAB", "e": "AQAB"},
            {"kty": "OKP", "kid": "x", "crv": "X25519", "x": "AA"},
            {"kty": "weird"}
        ]});
        let keys = parse_jwks(&doc, "u").unwrap();
        assert_eq!(keys.len(), 1);
        assert!(parse_jwks(&json!({"nope": []}), "u").is_err());
    }
}
