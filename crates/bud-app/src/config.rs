//! budapp's settings, as the binary hands them over. Defaults work on one machine.

use std::time::Duration;

use bud_domain::Role;

#[derive(Debug, Clone)]
pub struct AppConfig {
    /// The URL clients reach budapp at; the built-in issuer's `iss` and discovery base.
    pub public_url: String,
    pub identity: IdentityMode,
    /// Expected `aud` of every access token.
    pub audience: String,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Login attempts allowed per account per minute.
    pub login_per_account_per_minute: u32,
    /// Login attempts allowed per client address per minute.
    pub login_per_address_per_minute: u32,
    pub providers: ProviderPolicy,
    /// Accept kubeconfigs whose users run commands on this host (`exec`, `auth-provider`).
    pub allow_exec_kubeconfig: bool,
    /// The shared secret budgateway presents on `GET /internal/gateway/config` when it runs
    /// apart from budapp; that route refuses every call while this is unset.
    pub gateway_token: Option<String>,
}

/// Who issues the tokens budapp accepts.
#[derive(Debug, Clone)]
pub enum IdentityMode {
    /// budapp's own issuer: local accounts, `/auth/login`, keys kept encrypted in the store.
    Builtin,
    /// Any OpenID Connect provider (Keycloak, ...); users are provisioned on first sight.
    Oidc(OidcSettings),
}

#[derive(Debug, Clone)]
pub struct OidcSettings {
    pub issuer: String,
    /// Taken from discovery when absent.
    pub jwks_uri: Option<String>,
    /// Role of a provisioned user whose token names none of Bud's roles.
    pub default_role: Role,
    /// Least time between two key-set fetches caused by unknown key ids.
    pub jwks_refresh_cooldown: std::time::Duration,
}

/// Which provider base URLs are acceptable (server-side request forgery guard).
#[derive(Debug, Clone, Default)]
pub struct ProviderPolicy {
    /// Allow loopback, private, link-local and metadata addresses (e.g. a provider on the LAN).
    pub allow_private_networks: bool,
    /// Hosts exempt from the address checks, matched exactly.
    pub allowed_hosts: Vec<String>,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            public_url: "http://127.0.0.1:9081".into(),
            identity: IdentityMode::Builtin,
            audience: "bud".into(),
            leeway: Duration::from_secs(60),
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 24 * 3600),
            login_per_account_per_minute: 10,
            login_per_address_per_minute: 30,
            providers: ProviderPolicy::default(),
            allow_exec_kubeconfig: false,
            gateway_token: None,
        }
    }
}
