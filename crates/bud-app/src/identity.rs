//! Who is calling: bearer-token authentication into a [`Caller`], the built-in issuer's login,
//! refresh and logout, provisioning of users first seen through an external provider, and the
//! first admin account.

use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use bud_auth::jwt::{AccessClaims, TokenError, VerifiedClaims};
use bud_auth::password;
use bud_domain::{
    Decision, Email, Grant, Name, Permission, ProjectId, Role, Subject, Target, UserId,
};
use bud_store::{AuditEvent, RefreshToken, User};
use chrono::Utc;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::IdentityMode;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use bud_telemetry::current_request_id;

/// An authenticated caller: the user record and what the policy knows about them.
#[derive(Debug, Clone)]
pub struct Caller {
    pub user: User,
    pub subject: Subject,
}

impl Caller {
    /// Asks the policy; `what` names the resource for a "not found" answer.
    pub fn require(&self, needed: Permission, target: Target, what: &'static str) -> ApiResult<()> {
        match self.subject.decide(needed, target) {
            Decision::Allow => Ok(()),
            Decision::NotFound => Err(ApiError::NotFound(what)),
            Decision::Forbidden(permission) => Err(match target {
                Target::Platform => ApiError::Forbidden { permission, scope: String::new() },
                Target::Project(p) => ApiError::forbidden_in_project(permission, p),
            }),
        }
    }

    /// Whether the caller may see project `id` at all (member, grant holder or admin).
    pub fn sees_project(&self, id: ProjectId) -> bool {
        self.subject.decide(
            Permission::new(bud_domain::Module::Project, bud_domain::Access::View),
            Target::Project(id),
        ) != Decision::NotFound
    }

    /// An audit event attributed to this caller and request.
    pub fn audit(
        &self,
        action: &str,
        resource_type: &str,
        resource_id: impl ToString,
        project_id: Option<ProjectId>,
        details: serde_json::Value,
    ) -> AuditEvent {
        AuditEvent {
            at: Utc::now(),
            actor_id: Some(self.user.id),
            actor: self.user.email.to_string(),
            action: action.to_owned(),
            resource_type: resource_type.to_owned(),
            resource_id: resource_id.to_string(),
            project_id,
            details,
            request_id: Some(current_request_id()),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthenticated(
                "missing_token",
                "send an access token as `Authorization: Bearer <token>`",
            )
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthenticated(
                    "malformed",
                    "the Authorization header must be `Bearer <token>`",
                )
            })?;
        authenticate(state, token).await
    }
}

fn token_error(e: TokenError) -> ApiError {
    if let TokenError::ProviderUnavailable(why) = &e {
        return ApiError::DependencyUnavailable {
            code: "identity_provider_unavailable",
            message: format!("the identity provider cannot be reached: {why}"),
        };
    }
    let message = match &e {
        TokenError::Expired => {
            "the access token has expired; refresh it or log in again".to_owned()
        }
        TokenError::AudienceMismatch => {
            "the token was issued for another audience (check the client id)".to_owned()
        }
        TokenError::IssuerMismatch => {
            "the token was issued by an issuer this server does not trust".to_owned()
        }
        TokenError::UnknownKey(kid) => format!("the token is signed with an unknown key `{kid}`"),
        other => other.to_string(),
    };
    ApiError::unauthenticated(e.code(), message)
}

/// Verifies the token and loads the caller, provisioning users of an external provider.
pub async fn authenticate(state: &AppState, token: &str) -> ApiResult<Caller> {
    let claims = state.verifier.verify(token).await.map_err(token_error)?;
    let user = match &state.config.identity {
        IdentityMode::Builtin => {
            let id = UserId::parse("sub", &claims.subject).map_err(|_| {
                ApiError::unauthenticated("token_invalid", "the token's subject is not a user id")
            })?;
            state.store.user(id).await?.ok_or_else(|| {
                ApiError::unauthenticated("token_invalid", "the token's user no longer exists")
            })?
        }
        IdentityMode::Oidc(_) => provisioned_user(state, &claims).await?,
    };
    if user.disabled_at.is_some() {
        return Err(ApiError::unauthenticated(
            "account_disabled",
            "this account is disabled; ask an admin",
        ));
    }
    let subject = subject_of(state, &user).await?;
    Ok(Caller { user, subject })
}

/// The policy's view of a user: role, grants, memberships.
pub async fn subject_of(state: &AppState, user: &User) -> ApiResult<Subject> {
    let (grants, projects) =
        tokio::try_join!(state.store.grants_of(user.id), state.store.memberships_of(user.id))?;
    Ok(Subject {
        user_id: user.id,
        role: user.role,
        grants: grants.into_iter().map(|g| g.grant).collect::<Vec<Grant>>(),
        projects: projects.into_iter().collect(),
    })
}

/// The Bud role named by an external token (Keycloak realm roles), highest first.
fn role_from_claims(claims: &VerifiedClaims) -> Option<Role> {
    [Role::Admin, Role::Devops, Role::Developer, Role::Tester].into_iter().find(|r| {
        claims.roles.iter().any(|name| name == r.as_str() || name == &format!("bud-{}", r.as_str()))
    })
}

async fn provisioned_user(state: &AppState, claims: &VerifiedClaims) -> ApiResult<User> {
    let IdentityMode::Oidc(oidc) = &state.config.identity else {
        return Err(ApiError::unauthenticated("token_invalid", "unknown user"));
    };
    // The provider is the source of truth for roles: a token naming none of Bud's roles means
    // the default role, so taking a role away in the provider takes it away here too.
    let wanted = role_from_claims(claims).unwrap_or(oidc.default_role);
    if let Some(user) = state.store.user_by_subject(&claims.issuer, &claims.subject).await? {
        if user.role == wanted {
            return Ok(user);
        }
        let patch = bud_store::UserPatch { role: Some(wanted), ..Default::default() };
        let audit = system_audit(
            "user.role_sync",
            "user",
            user.id,
            serde_json::json!({"from": user.role, "role": wanted}),
        );
        return Ok(state
            .store
            .update_user(user.id, &patch, Utc::now(), &audit)
            .await?
            .unwrap_or(user));
    }
    // Accounts are keyed by (issuer, subject). An unverified email, or one another account
    // already uses, is replaced by an address derived from the identity.
    let derived = || {
        let digest = hex::encode(Sha256::digest(format!("{}|{}", claims.issuer, claims.subject)));
        Email::parse("email", &format!("{}@external.invalid", &digest[..32]))
    };
    let host = url::Url::parse(&claims.issuer).ok().and_then(|u| u.host_str().map(str::to_owned));
    let claimed = match (&claims.email, claims.email_verified) {
        (Some(email), Some(false)) => {
            tracing::info!(subject = %claims.subject, "ignoring an unverified email claim");
            let _ = email;
            None
        }
        (Some(email), _) => Some(email.clone()),
        (None, _) => None,
    };
    let email_text = claimed.unwrap_or_else(|| {
        format!("{}@{}", claims.subject, host.as_deref().unwrap_or("external.invalid"))
    });
    let mut email = Email::parse("email", &email_text).or_else(|_| derived())?;
    if state.store.user_by_email(&email).await?.is_some() {
        tracing::warn!(subject = %claims.subject, email = %email, "email already used by another account; provisioning under a derived address");
        email = derived()?;
    }
    let name = Name::parse("name", claims.name.as_deref().unwrap_or(&claims.subject))
        .or_else(|_| Name::parse("name", email.as_str()))?;
    let now = Utc::now();
    let user = User {
        id: UserId::new(),
        email,
        name,
        role: wanted,
        password_hash: None,
        issuer: Some(claims.issuer.clone()),
        subject: Some(claims.subject.clone()),
        created_at: now,
        updated_at: now,
        disabled_at: None,
    };
    let audit = system_audit(
        "user.provision",
        "user",
        user.id,
        serde_json::json!({"issuer": claims.issuer, "role": user.role}),
    );
    match state.store.create_user(&user, &audit).await {
        Ok(()) => {
            tracing::info!(user_id = %user.id, issuer = %claims.issuer, "provisioned user on first login");
            Ok(user)
        }
        // Two first requests raced; the other one created the user.
        Err(bud_store::StoreError::Conflict { .. }) => state
            .store
            .user_by_subject(&claims.issuer, &claims.subject)
            .await?
            .ok_or_else(|| ApiError::Conflict("could not provision this user; retry".into())),
        Err(e) => Err(e.into()),
    }
}

/// An audit event with no human actor.
pub fn system_audit(
    action: &str,
    resource_type: &str,
    resource_id: impl ToString,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        at: Utc::now(),
        actor_id: None,
        actor: "system".into(),
        action: action.into(),
        resource_type: resource_type.into(),
        resource_id: resource_id.to_string(),
        project_id: None,
        details,
        request_id: Some(current_request_id()),
    }
}

// ---- built-in issuer ------------------------------------------------------------------------

/// Login attempts per account and per client address (GCRA). Kept per replica: with N replicas
/// an attacker gets at most N times the budget, which argon2's cost still makes slow.
pub struct LoginLimiter {
    per_account: DefaultKeyedRateLimiter<String>,
    per_address: DefaultKeyedRateLimiter<String>,
}

impl LoginLimiter {
    pub fn new(per_account_per_minute: u32, per_address_per_minute: u32) -> Self {
        let quota =
            |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN));
        Self {
            per_account: RateLimiter::keyed(quota(per_account_per_minute)),
            per_address: RateLimiter::keyed(quota(per_address_per_minute)),
        }
    }

    /// `Err(wait)` when either budget is spent.
    fn check(&self, account: &str, address: &str) -> Result<(), Duration> {
        for (limiter, key) in [(&self.per_address, address), (&self.per_account, account)] {
            if limiter.len() > 100_000 {
                limiter.retain_recent();
            }
            if let Err(not_until) = limiter.check_key(&key.to_owned()) {
                return Err(not_until.wait_time_from(DefaultClock::default().now()));
            }
        }
        Ok(())
    }
}

/// Tokens handed to a client after login or refresh.
pub struct IssuedTokens {
    pub access_token: String,
    pub expires_in: i64,
    pub refresh_token: String,
}

fn builtin_only(state: &AppState) -> ApiResult<&bud_auth::jwt::Issuer> {
    state.issuer.as_ref().ok_or_else(|| {
        ApiError::Refused("this server uses an external identity provider: log in there".into())
    })
}

fn hash_refresh(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Password login. Unknown accounts cost the same argon2 work as known ones.
pub async fn login(
    state: &AppState,
    email: &str,
    password_text: &str,
    address: &str,
) -> ApiResult<IssuedTokens> {
    builtin_only(state)?;
    let email = Email::parse("email", email)?;
    if let Err(wait) = state.login_limiter.check(email.as_str(), address) {
        return Err(ApiError::RateLimited {
            message: "too many login attempts; wait before trying again".into(),
            retry_after: wait,
        });
    }
    let user = state.store.user_by_email(&email).await?;
    let hash = user.as_ref().and_then(|u| u.password_hash.clone());
    let plain = password_text.to_owned();
    let ok = tokio::task::spawn_blocking(move || match hash {
        Some(h) => password::verify_password(&plain, &h),
        None => {
            let _ = password::verify_password(&plain, dummy_hash());
            false
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.into()))?;
    let user = match user {
        Some(u) if ok => u,
        _ => {
            let audit = system_audit(
                "auth.login_failed",
                "user",
                email.as_str(),
                serde_json::json!({"address": address}),
            );
            state.store.append_audit(&audit).await?;
            return Err(ApiError::unauthenticated(
                "invalid_credentials",
                "email or password is wrong",
            ));
        }
    };
    if user.disabled_at.is_some() {
        return Err(ApiError::unauthenticated(
            "account_disabled",
            "this account is disabled; ask an admin",
        ));
    }
    let family = uuid::Uuid::now_v7().to_string();
    let tokens = issue_tokens(state, &user, &family).await?;
    let mut audit =
        system_audit("auth.login", "user", user.id, serde_json::json!({"address": address}));
    audit.actor_id = Some(user.id);
    audit.actor = user.email.to_string();
    state.store.append_audit(&audit).await?;
    Ok(tokens)
}

/// A real argon2id hash of a random password, verified against when the account is unknown so
/// that both paths cost the same.
pub(crate) fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| password::hash_password(&password::generate_password()).unwrap_or_default())
}

async fn issue_tokens(state: &AppState, user: &User, family: &str) -> ApiResult<IssuedTokens> {
    let issuer = builtin_only(state)?;
    let now = Utc::now();
    let ttl = state.config.access_token_ttl.as_secs() as i64;
    let claims = AccessClaims {
        iss: state.config.public_url.clone(),
        sub: user.id.to_string(),
        aud: state.config.audience.clone(),
        exp: now.timestamp() + ttl,
        nbf: now.timestamp(),
        iat: now.timestamp(),
        jti: uuid::Uuid::now_v7().to_string(),
        email: Some(user.email.to_string()),
        name: Some(user.name.to_string()),
        roles: vec![user.role.as_str().to_owned()],
    };
    let access_token = issuer.mint(&claims).map_err(|e| ApiError::Internal(e.into()))?;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    let refresh_token = format!("bud_rt_{}", hex::encode(secret));
    let record = RefreshToken {
        id: uuid::Uuid::now_v7().to_string(),
        family_id: family.to_owned(),
        user_id: user.id,
        token_hash: hash_refresh(&refresh_token),
        created_at: now,
        expires_at: now
            + chrono::Duration::from_std(state.config.refresh_token_ttl)
                .unwrap_or(chrono::Duration::days(30)),
        used_at: None,
        revoked_at: None,
    };
    state.store.insert_refresh_token(&record).await?;
    Ok(IssuedTokens { access_token, expires_in: ttl, refresh_token })
}

/// Rotates a refresh token. Presenting one that was already used means it leaked: the whole
/// family (every token descended from that login) is revoked.
pub async fn refresh(state: &AppState, presented: &str) -> ApiResult<IssuedTokens> {
    builtin_only(state)?;
    let invalid = || {
        ApiError::unauthenticated("token_invalid", "the refresh token is not valid; log in again")
    };
    let record =
        state.store.refresh_token_by_hash(&hash_refresh(presented)).await?.ok_or_else(invalid)?;
    let now = Utc::now();
    if record.revoked_at.is_some() {
        return Err(invalid());
    }
    if record.expires_at <= now {
        return Err(ApiError::unauthenticated(
            "token_expired",
            "the refresh token has expired; log in again",
        ));
    }
    if record.used_at.is_some() || !state.store.mark_refresh_token_used(&record.id, now).await? {
        state.store.revoke_refresh_family(&record.family_id, now).await?;
        let audit = system_audit(
            "auth.refresh_reuse",
            "user",
            record.user_id,
            serde_json::json!({"family": record.family_id}),
        );
        state.store.append_audit(&audit).await?;
        return Err(ApiError::unauthenticated(
            "refresh_token_reused",
            "this refresh token was already used; the session is revoked, log in again",
        ));
    }
    let user = state.store.user(record.user_id).await?.ok_or_else(invalid)?;
    if user.disabled_at.is_some() {
        return Err(ApiError::unauthenticated(
            "account_disabled",
            "this account is disabled; ask an admin",
        ));
    }
    issue_tokens(state, &user, &record.family_id).await
}

/// Revokes the session the refresh token belongs to. Unknown tokens are not an error: the
/// session is gone either way.
pub async fn logout(state: &AppState, presented: &str) -> ApiResult<()> {
    builtin_only(state)?;
    if let Some(record) = state.store.refresh_token_by_hash(&hash_refresh(presented)).await? {
        state.store.revoke_refresh_family(&record.family_id, Utc::now()).await?;
        let mut audit =
            system_audit("auth.logout", "user", record.user_id, serde_json::Value::Null);
        audit.actor_id = Some(record.user_id);
        state.store.append_audit(&audit).await?;
    }
    Ok(())
}

/// Creates the first admin when the store has no users. Returns the password when it was
/// generated, for the caller to show once; only its hash is kept.
pub async fn ensure_first_admin(
    state: &AppState,
    email: &Email,
    password_text: Option<String>,
) -> anyhow::Result<Option<String>> {
    if state.store.count_users().await? > 0 {
        return Ok(None);
    }
    let generated = password_text.is_none();
    let plain = password_text.unwrap_or_else(password::generate_password);
    let hash = password::hash_password(&plain)?;
    let now = Utc::now();
    let user = User {
        id: UserId::new(),
        email: email.clone(),
        name: Name::parse("name", "Administrator")?,
        role: Role::Admin,
        password_hash: Some(hash),
        issuer: None,
        subject: None,
        created_at: now,
        updated_at: now,
        disabled_at: None,
    };
    let audit =
        system_audit("user.bootstrap_admin", "user", user.id, serde_json::json!({"email": email}));
    state.store.create_user(&user, &audit).await?;
    Ok(generated.then_some(plain))
}
