//! `bud.toml` plus `BUD_*` environment variables into checked settings. Every setting has a
//! default that works on one machine; a value that does not fit stops start-up with a message
//! naming its key.
//!
//! Environment variables name `<section>_<key>` after `BUD_`: `BUD_DATABASE_URL` sets
//! `database.url`, `BUD_ADMIN_EMAIL` sets `admin.email`, `BUD_LOG_FORMAT` sets `log.format`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub server: Server,
    pub data: Data,
    pub database: Database,
    pub identity: Identity,
    pub admin: Admin,
    pub secrets: Secrets,
    pub log: Log,
    pub providers: Providers,
    pub login: Login,
    pub clusters: Clusters,
    pub gateway: Gateway,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Server {
    pub host: String,
    pub app_port: u16,
    /// URL clients use to reach budapp; defaults to `http://<host>:<app_port>`.
    pub public_url: Option<String>,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_grace_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Data {
    /// Holds the SQLite database and the generated master key in the embedded default.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Database {
    /// `sqlite://…` or `postgres://…`; defaults to `sqlite://<data.dir>/bud.db`.
    pub url: Option<String>,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
    pub statement_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    /// `builtin` or `oidc`.
    pub provider: String,
    /// The external issuer URL (oidc).
    pub issuer: Option<String>,
    pub jwks_uri: Option<String>,
    pub audience: String,
    pub leeway_secs: u64,
    /// Role of users provisioned from an external provider whose token names none.
    pub default_role: String,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
    /// Least time between two key-set fetches caused by unknown key ids.
    pub jwks_refresh_cooldown_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admin {
    pub email: String,
    /// When absent, a password is generated and printed once.
    pub password: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Secrets {
    /// `<kid>:<base64 32 bytes>` entries; when empty, one is generated into `<data.dir>/master.key`.
    pub master_keys: Vec<String>,
    /// The kid new secrets are sealed with; defaults to the first entry.
    pub active_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Log {
    /// `json` or `pretty`.
    pub format: String,
    /// A tracing filter such as `info` or `bud_app=debug,info`.
    pub level: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Providers {
    pub allow_private_networks: bool,
    pub allowed_hosts: Vec<String>,
}

/// budgateway: the OpenAI-compatible data plane.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Gateway {
    pub port: u16,
    /// Shared secret between budapp and gateways running apart (`serve --only gateway`), which
    /// read their configuration from budapp's internal route with it.
    pub token: Option<String>,
    /// budapp's base URL, for a gateway running alone.
    pub app_url: Option<String>,
    /// How often the gateway looks for configuration changes (revocations arrive this fast).
    pub refresh_ms: u64,
    /// How long the gateway keeps serving its last configuration when it cannot refresh it.
    pub stale_window_secs: u64,
    pub try_timeout_secs: u64,
    pub overall_timeout_secs: u64,
    /// Proxies for external providers (the guide's §7.2); replicas are reached directly.
    pub http_proxy: Option<String>,
    pub https_proxy: Option<String>,
    pub no_proxy: Option<String>,
    /// `redis://host:port[/db]`: rate limits counted there, shared by every gateway replica.
    /// Unset: each gateway counts on its own (so N replicas allow N times every limit).
    pub redis_url: Option<String>,
    /// While Redis is unreachable: `fail-open` (each gateway allows 1/`replicas` of every
    /// limit) or `fail-closed` (limited requests get 503).
    pub redis_on_unreachable: String,
    /// How many gateways share the limits, for the share each allows while Redis is away.
    pub replicas: u32,
}

/// budcluster: where budapp reaches it, and how it reconciles.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Clusters {
    /// budcluster's base URL for a budapp running alone (`serve --only app`), e.g.
    /// `http://budcluster:9082` or a Dapr invoke URL.
    pub url: Option<String>,
    /// Shared secret for budcluster's internal API.
    pub token: Option<String>,
    /// budcluster's own port (health, metrics, internal API).
    pub port: u16,
    pub reconcile_interval_ms: u64,
    pub probe_interval_secs: u64,
    pub probe_timeout_secs: u64,
    pub max_probe_failures: u32,
    pub allow_exec_kubeconfig: bool,
    /// Run endpoints of the `local` cluster as processes on this machine.
    pub local: bool,
    /// The local engine command; `{model}`, `{source}`, `{port}`, `{endpoint}`, `{replica}` are
    /// filled in. Default: this binary's `engine-sim --port {port} --model {model}`.
    pub local_command: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Login {
    pub per_account_per_minute: u32,
    pub per_address_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server: Server {
                host: "127.0.0.1".into(),
                app_port: 9081,
                public_url: None,
                shutdown_grace_secs: 10,
            },
            data: Data { dir: PathBuf::from("bud-data") },
            database: Database {
                url: None,
                max_connections: 10,
                acquire_timeout_ms: 2000,
                statement_timeout_ms: 5000,
            },
            identity: Identity {
                provider: "builtin".into(),
                issuer: None,
                jwks_uri: None,
                audience: "bud".into(),
                leeway_secs: 60,
                default_role: "tester".into(),
                access_token_ttl_secs: 15 * 60,
                refresh_token_ttl_secs: 30 * 24 * 3600,
                jwks_refresh_cooldown_secs: 30,
            },
            admin: Admin { email: "admin@bud.local".into(), password: None },
            secrets: Secrets::default(),
            log: Log { format: "json".into(), level: "info".into() },
            providers: Providers::default(),
            login: Login { per_account_per_minute: 10, per_address_per_minute: 30 },
            gateway: Gateway {
                port: 3000,
                token: None,
                app_url: None,
                refresh_ms: 500,
                stale_window_secs: 300,
                try_timeout_secs: 30,
                overall_timeout_secs: 120,
                http_proxy: None,
                https_proxy: None,
                no_proxy: None,
                redis_url: None,
                redis_on_unreachable: "fail-open".into(),
                replicas: 1,
            },
            clusters: Clusters {
                url: None,
                token: None,
                port: 9082,
                reconcile_interval_ms: 2000,
                probe_interval_secs: 10,
                probe_timeout_secs: 5,
                max_probe_failures: 5,
                allow_exec_kubeconfig: false,
                local: true,
                local_command: None,
            },
        }
    }
}

impl Config {
    /// Defaults, then the TOML file (if given), then `BUD_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // The sections are the top-level fields of `Config`, read off its serialised defaults.
        let defaults =
            serde_json::to_value(Config::default()).context("listing configuration sections")?;
        let sections: Vec<String> =
            defaults.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
        // Only variables naming a known section are ours: BUD_TEST_* and friends are not config.
        let ours: Vec<(String, String)> = env
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("BUD_")?.to_ascii_lowercase();
                let (section, key) = rest.split_once('_')?;
                sections
                    .iter()
                    .any(|s| s == section)
                    .then(|| (format!("{section}.{key}"), v.clone()))
            })
            .collect();
        for (key, value) in ours {
            figment = figment.merge((key, env_value(&value)));
        }
        // Lossy: "9081" and "true" from the environment fill numeric and boolean settings.
        let config: Config = figment.extract_lossy().map_err(describe)?;
        config.check()?;
        Ok(config)
    }

    /// Checks what types alone cannot; each message names the key.
    fn check(&self) -> anyhow::Result<()> {
        if !matches!(self.log.format.as_str(), "json" | "pretty") {
            bail!("log.format must be `json` or `pretty`, not `{}`", self.log.format);
        }
        match self.identity.provider.as_str() {
            "builtin" => {}
            "oidc" => {
                let issuer = self.identity.issuer.as_deref().unwrap_or_default();
                if url::Url::parse(issuer).is_err() {
                    bail!(
                        "identity.issuer must be the provider's issuer URL when identity.provider is `oidc`"
                    );
                }
            }
            other => bail!("identity.provider must be `builtin` or `oidc`, not `{other}`"),
        }
        self.identity
            .default_role
            .parse::<bud_domain::Role>()
            .map_err(|e| anyhow::anyhow!("identity.default_role {}", e.message))?;
        bud_domain::Email::parse("admin.email", &self.admin.email)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(p) = &self.admin.password
            && p.chars().count() < 12
        {
            bail!("admin.password (BUD_ADMIN_PASSWORD) must be at least 12 characters");
        }
        let url = self.database_url();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            bail!("database.url must start with sqlite:// or postgres://");
        }
        if self.database.max_connections == 0 {
            bail!("database.max_connections must be at least 1");
        }
        if self.database.acquire_timeout_ms == 0 || self.database.statement_timeout_ms == 0 {
            bail!("database.acquire_timeout_ms and database.statement_timeout_ms must be above 0");
        }
        if self.identity.access_token_ttl_secs < 60 {
            bail!("identity.access_token_ttl_secs must be at least 60");
        }
        if self.gateway.refresh_ms < 50
            || self.gateway.try_timeout_secs == 0
            || self.gateway.overall_timeout_secs == 0
        {
            bail!(
                "gateway.refresh_ms must be at least 50, gateway.try_timeout_secs and gateway.overall_timeout_secs at least 1"
            );
        }
        if let Some(u) = &self.gateway.redis_url {
            let parsed = url::Url::parse(u)
                .with_context(|| format!("gateway.redis_url `{u}` is not a URL"))?;
            if parsed.scheme() != "redis" || !parsed.has_host() {
                bail!("gateway.redis_url must be `redis://host:port[/db]` (no TLS), not `{u}`");
            }
        }
        if !matches!(self.gateway.redis_on_unreachable.as_str(), "fail-open" | "fail-closed") {
            bail!(
                "gateway.redis_on_unreachable must be `fail-open` or `fail-closed`, not `{}`",
                self.gateway.redis_on_unreachable
            );
        }
        if self.gateway.replicas == 0 {
            bail!("gateway.replicas must be at least 1 (the gateways sharing the rate limits)");
        }
        if let Some(u) = &self.gateway.app_url {
            url::Url::parse(u).with_context(|| format!("gateway.app_url `{u}` is not a URL"))?;
        }
        if let Some(u) = &self.clusters.url {
            url::Url::parse(u).with_context(|| format!("clusters.url `{u}` is not a URL"))?;
        }
        if let Some(c) = &self.clusters.local_command {
            let argv = shlex::split(c).unwrap_or_default();
            if argv.is_empty() || !c.contains("{port}") {
                bail!(
                    "clusters.local_command must be a command line that uses {{port}}, e.g. `vllm serve {{source}} --served-model-name {{model}} --port {{port}}`"
                );
            }
        }
        if self.clusters.reconcile_interval_ms < 50
            || self.clusters.probe_interval_secs == 0
            || self.clusters.max_probe_failures == 0
        {
            bail!(
                "clusters.reconcile_interval_ms must be at least 50, clusters.probe_interval_secs and clusters.max_probe_failures at least 1"
            );
        }
        if let Some(u) = &self.server.public_url {
            url::Url::parse(u).with_context(|| format!("server.public_url `{u}` is not a URL"))?;
        }
        Ok(())
    }

    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}/bud.db", self.data.dir.display()))
    }

    pub fn public_url(&self) -> String {
        self.server
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{}:{}", self.server.host, self.server.app_port))
            .trim_end_matches('/')
            .to_owned()
    }

    pub fn store_config(&self) -> bud_store::StoreConfig {
        bud_store::StoreConfig {
            url: self.database_url(),
            max_connections: self.database.max_connections,
            acquire_timeout: Duration::from_millis(self.database.acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.database.statement_timeout_ms),
        }
    }

    pub fn app_config(&self) -> anyhow::Result<bud_app::AppConfig> {
        let identity =
            match self.identity.provider.as_str() {
                "oidc" => bud_app::IdentityMode::Oidc(bud_app::OidcSettings {
                    issuer: self.identity.issuer.clone().unwrap_or_default(),
                    jwks_uri: self.identity.jwks_uri.clone(),
                    jwks_refresh_cooldown: Duration::from_secs(
                        self.identity.jwks_refresh_cooldown_secs,
                    ),
                    default_role: self.identity.default_role.parse().map_err(
                        |e: bud_domain::ValidationError| anyhow::anyhow!("identity.{e}"),
                    )?,
                }),
                _ => bud_app::IdentityMode::Builtin,
            };
        Ok(bud_app::AppConfig {
            public_url: self.public_url(),
            identity,
            audience: self.identity.audience.clone(),
            leeway: Duration::from_secs(self.identity.leeway_secs),
            access_token_ttl: Duration::from_secs(self.identity.access_token_ttl_secs),
            refresh_token_ttl: Duration::from_secs(self.identity.refresh_token_ttl_secs),
            login_per_account_per_minute: self.login.per_account_per_minute,
            login_per_address_per_minute: self.login.per_address_per_minute,
            providers: bud_app::ProviderPolicy {
                allow_private_networks: self.providers.allow_private_networks,
                allowed_hosts: self.providers.allowed_hosts.clone(),
            },
            allow_exec_kubeconfig: self.clusters.allow_exec_kubeconfig,
            // Served once `bud serve` runs budgateway apart from budapp and has a setting for
            // the shared token; the embedded gateway reads the store directly.
            gateway_token: self.gateway.token.clone(),
        })
    }

    pub fn gateway_config(&self) -> bud_gateway::GatewayConfig {
        let g = &self.gateway;
        bud_gateway::GatewayConfig {
            try_timeout: Duration::from_secs(g.try_timeout_secs),
            overall_timeout: Duration::from_secs(g.overall_timeout_secs),
            stale_window: Duration::from_secs(g.stale_window_secs),
            http_proxy: g.http_proxy.clone(),
            https_proxy: g.https_proxy.clone(),
            no_proxy: g.no_proxy.clone(),
            redis: g.redis_url.as_ref().map(|url| {
                let on_unreachable = match g.redis_on_unreachable.as_str() {
                    "fail-closed" => bud_gateway::config::OnUnreachable::FailClosed,
                    _ => bud_gateway::config::OnUnreachable::FailOpen {
                        local_share: 1.0 / f64::from(g.replicas.max(1)),
                    },
                };
                bud_gateway::config::RedisLimits::new(url.clone(), on_unreachable)
            }),
            ..bud_gateway::GatewayConfig::default()
        }
    }

    /// budcluster's settings; `bud` is this binary, for the default local engine command.
    pub fn cluster_config(&self, bud: &Path) -> anyhow::Result<bud_cluster::ClusterConfig> {
        let c = &self.clusters;
        let local = if c.local {
            let command = match &c.local_command {
                Some(line) => shlex::split(line)
                    .context("clusters.local_command is not a valid command line")?,
                None => vec![
                    bud.display().to_string(),
                    "engine-sim".into(),
                    "--port".into(),
                    "{port}".into(),
                    "--model".into(),
                    "{model}".into(),
                ],
            };
            let gpus =
                std::fs::read_dir("/proc/driver/nvidia/gpus").map(|d| d.count()).unwrap_or(0);
            Some(bud_cluster::driver::local::LocalConfig::new(
                command,
                self.data.dir.join("local"),
                u32::try_from(gpus).unwrap_or(0),
            ))
        } else {
            None
        };
        Ok(bud_cluster::ClusterConfig {
            reconcile_interval: Duration::from_millis(c.reconcile_interval_ms),
            probe_interval: Duration::from_secs(c.probe_interval_secs),
            probe_timeout: Duration::from_secs(c.probe_timeout_secs),
            max_probe_failures: c.max_probe_failures,
            local,
            allow_exec_kubeconfig: c.allow_exec_kubeconfig,
            ..bud_cluster::ClusterConfig::default()
        })
    }
}

/// One line per bad value: the key, what is wrong, and where the value came from.
fn describe(errors: figment::Error) -> anyhow::Error {
    let lines: Vec<String> = errors
        .into_iter()
        .map(|e| {
            let key = e
                .path
                .iter()
                .filter(|p| *p != "global" && *p != "default")
                .cloned()
                .collect::<Vec<_>>()
                .join(".");
            let variable = format!("BUD_{}", key.replacen('.', "_", 1).to_ascii_uppercase());
            let source = match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                Some(figment::Source::File(path)) => format!(" (in {})", path.display()),
                _ => format!(" (from {variable} or the config file)"),
            };
            format!("{key}: {}{source}", e.kind)
        })
        .collect();
    anyhow::anyhow!("invalid configuration: {}", lines.join("; "))
}

/// Environment values are strings, except a JSON list (`["k2:…","k1:…"]`) for list settings.
fn env_value(v: &str) -> serde_json::Value {
    match serde_json::from_str::<Vec<String>>(v.trim()) {
        Ok(list) => list.into(),
        Err(_) => v.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_the_embedded_setup() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.database_url(), "sqlite://bud-data/bud.db");
        assert_eq!(c.public_url(), "http://127.0.0.1:9081");
        assert_eq!(c.admin.email, "admin@bud.local");
    }

    #[test]
    fn environment_overrides_and_unrelated_variables_are_ignored() {
        let c = Config::load(
            None,
            &env(&[
                ("BUD_DATABASE_URL", "postgres://x@h/db"),
                ("BUD_SERVER_APP_PORT", "9999"),
                ("BUD_ADMIN_EMAIL", "root@example.com"),
                ("BUD_TEST_POSTGRES_URL", "whatever"),
                ("BUD_SECRETS_MASTER_KEYS", "[\"a:b\", \"c:d\"]"),
            ]),
        )
        .unwrap();
        assert_eq!(c.database_url(), "postgres://x@h/db");
        assert_eq!(c.server.app_port, 9999);
        assert_eq!(c.admin.email, "root@example.com");
        assert_eq!(c.secrets.master_keys, vec!["a:b".to_string(), "c:d".to_string()]);
    }

    #[test]
    fn bad_values_name_their_key() {
        let e =
            Config::load(None, &env(&[("BUD_SERVER_APP_PORT", "ninety")])).unwrap_err().to_string();
        assert!(e.contains("app_port"), "{e}");
        let e = Config::load(None, &env(&[("BUD_LOG_FORMAT", "xml")])).unwrap_err().to_string();
        assert!(e.contains("log.format"), "{e}");
        let e =
            Config::load(None, &env(&[("BUD_IDENTITY_PROVIDER", "oidc")])).unwrap_err().to_string();
        assert!(e.contains("identity.issuer"), "{e}");
        let e =
            Config::load(None, &env(&[("BUD_DATABASE_URL", "mysql://x")])).unwrap_err().to_string();
        assert!(e.contains("database.url"), "{e}");
    }

    #[test]
    fn redis_settings_reach_the_gateway_and_bad_ones_name_their_key() {
        let c = Config::load(
            None,
            &env(&[
                ("BUD_GATEWAY_REDIS_URL", "redis://127.0.0.1:6379/2"),
                ("BUD_GATEWAY_REPLICAS", "4"),
            ]),
        )
        .unwrap();
        let redis = c.gateway_config().redis.unwrap();
        assert_eq!(redis.url, "redis://127.0.0.1:6379/2");
        assert_eq!(
            redis.on_unreachable,
            bud_gateway::config::OnUnreachable::FailOpen { local_share: 0.25 }
        );
        let c = Config::load(
            None,
            &env(&[
                ("BUD_GATEWAY_REDIS_URL", "redis://r:6379"),
                ("BUD_GATEWAY_REDIS_ON_UNREACHABLE", "fail-closed"),
            ]),
        )
        .unwrap();
        assert_eq!(
            c.gateway_config().redis.unwrap().on_unreachable,
            bud_gateway::config::OnUnreachable::FailClosed
        );
        assert!(Config::load(None, &[]).unwrap().gateway_config().redis.is_none());
        for (var, value, key) in [
            ("BUD_GATEWAY_REDIS_URL", "rediss://r:6379", "gateway.redis_url"),
            ("BUD_GATEWAY_REDIS_URL", "not a url", "gateway.redis_url"),
            ("BUD_GATEWAY_REDIS_ON_UNREACHABLE", "shrug", "gateway.redis_on_unreachable"),
            ("BUD_GATEWAY_REPLICAS", "0", "gateway.replicas"),
            ("BUD_GATEWAY_REPLICAS", "many", "gateway.replicas"),
        ] {
            let e = Config::load(None, &env(&[(var, value)])).unwrap_err().to_string();
            assert!(e.contains(key), "{var}={value}: {e}");
        }
    }

    #[test]
    fn toml_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bud.toml");
        std::fs::write(&path, "[server]\napp_port = 9200\n[log]\nformat = \"pretty\"\n").unwrap();
        let c = Config::load(Some(&path), &[]).unwrap();
        assert_eq!(c.server.app_port, 9200);
        assert_eq!(c.log.format, "pretty");
        std::fs::write(&path, "[server]\napp_port = \"x\"\n").unwrap();
        let e = Config::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("app_port"), "{e}");
    }
}
