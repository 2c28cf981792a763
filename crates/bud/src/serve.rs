//! `bud serve` and `bud migrate`: configuration to running services, and a bounded graceful
//! shutdown on SIGTERM or Ctrl-C.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use bud_auth::secrets::{self, Keyring};
use bud_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Which services `bud serve` runs in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    /// budapp alone; budcluster is reached at clusters.url.
    App,
    /// budcluster alone: the reconciler, the drivers and its internal API.
    Cluster,
    /// budgateway alone: configuration from budapp (gateway.app_url, gateway.token).
    Gateway,
}

pub async fn serve(
    file: Option<&Path>,
    env: &[(String, String)],
    only: Option<Only>,
) -> anyhow::Result<()> {
    let config = Config::load(file, env)?;
    init_logging(&config)?;
    let store = open_store(&config).await?;
    let keyring = load_keyring(&config)?;
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // Usage records are flushed after the gateway has finished its requests in flight.
    let meter_shutdown = CancellationToken::new();
    let mut meter_task = None;
    if only.is_none() || only == Some(Only::Gateway) {
        let sink = std::sync::Arc::new(bud_gateway::store_sink::StoreSink(store.clone()));
        let (meter, writer) = bud_gateway::metering::Meter::new(
            bud_gateway::metering::MeterConfig::default(),
            sink,
            meter_shutdown.clone(),
        );
        meter_task = Some(tokio::spawn(writer));
        let gateway = bud_gateway::Gateway::try_new(
            config.gateway_config(),
            meter,
            bud_telemetry::metrics_handle(),
        )
        .context(
            "gateway configuration (gateway.http_proxy, gateway.https_proxy, gateway.no_proxy, gateway.redis_url)",
        )?;
        let source = if only == Some(Only::Gateway) {
            let url = config
                .gateway
                .app_url
                .clone()
                .context("gateway.app_url is required with --only gateway")?;
            let token = config
                .gateway
                .token
                .clone()
                .context("gateway.token is required with --only gateway")?;
            let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
            bud_gateway::source::SnapshotSource::ControlPlane { url, token, http }
        } else {
            bud_gateway::source::SnapshotSource::Store(store.clone())
        };
        tasks.spawn(refresher(
            source,
            keyring.clone(),
            gateway.snapshot_handle(),
            Duration::from_millis(config.gateway.refresh_ms),
            shutdown.clone(),
        ));
        let address = format!("{}:{}", config.server.host, config.gateway.port);
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding budgateway to {address} (gateway.port)"))?;
        tracing::info!(address = %listener.local_addr()?, "budgateway listening");
        let stop = shutdown.clone();
        tasks.spawn(async move {
            gateway.serve(listener, stop).await.context("budgateway server failed")
        });
    }
    if only == Some(Only::Gateway) {
        return supervise(tasks, shutdown, meter_shutdown, meter_task, &config, store).await;
    }

    let cluster_client = if only == Some(Only::App) {
        match &config.clusters.url {
            Some(url) => {
                Some(bud_cluster::ClusterClient::http(url, config.clusters.token.clone())?)
            }
            None => {
                tracing::warn!(
                    "clusters.url is not set: endpoint logs and metrics are unavailable"
                );
                None
            }
        }
    } else {
        let bud =
            std::env::current_exe().context("finding this program for the local engine command")?;
        let service = bud_cluster::ClusterService::start(
            store.clone(),
            keyring.clone(),
            config.cluster_config(&bud)?,
        )
        .await
        .context("starting budcluster")?;
        let address = format!("{}:{}", config.server.host, config.clusters.port);
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("binding budcluster to {address} (clusters.port)"))?;
        tracing::info!(address = %listener.local_addr()?, "budcluster listening");
        let router =
            bud_cluster::api::router(service.clone(), store.clone(), config.clusters.token.clone());
        let stop = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .context("budcluster server failed")
        });
        let stop = shutdown.clone();
        let runner = service.clone();
        tasks.spawn(async move {
            runner.run(stop).await;
            Ok(())
        });
        Some(bud_cluster::ClusterClient::InProcess(service))
    };

    if only != Some(Only::Cluster) {
        let state = bud_app::AppState::build_with(
            config.app_config()?,
            store.clone(),
            keyring,
            cluster_client,
        )
        .await?;
        if matches!(state.config.identity, bud_app::IdentityMode::Builtin) {
            let email = bud_domain::Email::parse("admin.email", &config.admin.email)?;
            if let Some(password) =
                bud_app::identity::ensure_first_admin(&state, &email, config.admin.password.clone())
                    .await?
            {
                // Shown once, on the terminal only: the store keeps its hash.
                eprintln!(
                    "\n  First admin account created\n    email:    {email}\n    password: {password}\n  This password is shown only now; keep it somewhere safe.\n"
                );
            }
        }
        let address = format!("{}:{}", config.server.host, config.server.app_port);
        let listener = TcpListener::bind(&address).await.with_context(|| {
            format!("binding budapp to {address} (server.host, server.app_port)")
        })?;
        tracing::info!(address = %listener.local_addr()?, public_url = %config.public_url(), "budapp listening");
        let stop = shutdown.clone();
        tasks.spawn(async move {
            bud_app::run(listener, state, stop).await.context("budapp server failed")
        });
    }

    supervise(tasks, shutdown, meter_shutdown, meter_task, &config, store).await
}

async fn refresher(
    source: bud_gateway::source::SnapshotSource,
    keyring: Keyring,
    handle: std::sync::Arc<arc_swap::ArcSwap<bud_gateway::snapshot::Snapshot>>,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    bud_gateway::source::refresh_loop(source, keyring, handle, interval, shutdown).await;
    Ok(())
}

/// Waits for a signal (or a service failing on its own), then stops everything within the
/// grace period: services first, then the usage writer's flush, then the pool.
async fn supervise(
    mut tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
    meter_shutdown: CancellationToken,
    meter_task: Option<tokio::task::JoinHandle<()>>,
    config: &Config,
    store: Store,
) -> anyhow::Result<()> {
    let mut failure = None;
    tokio::select! {
        () = wait_for_signal() => {}
        Some(done) = tasks.join_next() => {
            // A service stopped on its own: that is a failure; stop the others.
            failure = Some(match done {
                Ok(Ok(())) => anyhow::anyhow!("a service stopped unexpectedly"),
                Ok(Err(e)) => e,
                Err(e) => anyhow::Error::new(e).context("service task failed"),
            });
        }
    }
    tracing::info!("shutting down: no new connections; finishing requests in flight");
    shutdown.cancel();
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    let drained = tokio::time::timeout(grace, async {
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(Err(e)) => {
                    tracing::error!(error = format!("{e:#}"), "service stopped with an error")
                }
                Err(e) => tracing::error!(error = %e, "service task failed"),
                Ok(Ok(())) => {}
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace_secs = grace.as_secs(), "still busy after the grace period; stopping");
    }
    meter_shutdown.cancel();
    if let Some(writer) = meter_task {
        let _ = tokio::time::timeout(Duration::from_secs(10), writer).await;
    }
    store.close().await;
    tracing::info!("stopped");
    failure.map_or(Ok(()), Err)
}

/// `bud engine-sim`: the simulated engine on `host:port` until SIGTERM or Ctrl-C.
pub async fn engine_sim(
    host: &str,
    port: u16,
    config: bud_engine_sim::SimConfig,
) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Replicas of the local driver write to log files: colour codes only on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
    let listener = TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding engine-sim to {host}:{port}"))?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    bud_engine_sim::run(config, listener, shutdown).await.context("engine-sim stopped")
}

pub async fn migrate(file: Option<&Path>, env: &[(String, String)]) -> anyhow::Result<()> {
    let config = Config::load(file, env)?;
    init_logging(&config)?;
    open_store(&config).await?.close().await;
    println!("migrations applied to {}", redact(&config.database_url()));
    Ok(())
}

pub fn generate_key(kid: &str) -> anyhow::Result<()> {
    let spec = secrets::encode_key_spec(kid, &secrets::generate_key());
    secrets::parse_key_spec(&spec).context("the key id must be 1 to 32 of a-z, 0-9, `-`, `_`")?;
    println!("{spec}");
    Ok(())
}

pub async fn rotate_secrets(file: Option<&Path>, env: &[(String, String)]) -> anyhow::Result<()> {
    let config = Config::load(file, env)?;
    init_logging(&config)?;
    let store = open_store(&config).await?;
    let keyring = load_keyring(&config)?;
    let report = bud_app::secrets::rotate(&store, &keyring).await?;
    store.close().await;
    println!(
        "{} secrets resealed under key `{}`, {} already were; keys no longer listed as active may now be removed",
        report.resealed,
        keyring.active_kid(),
        report.current
    );
    Ok(())
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store_config = config.store_config();
    let store = Store::connect(&store_config).await.with_context(|| {
        format!("connecting to the database {} (database.url)", redact(&store_config.url))
    })?;
    store.migrate().await.context("applying database migrations")?;
    Ok(store)
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// The operator's master keys, or in the embedded default one generated into the data dir.
fn load_keyring(config: &Config) -> anyhow::Result<Keyring> {
    let specs = if config.secrets.master_keys.is_empty() {
        vec![local_master_key(&config.data.dir)?]
    } else {
        config.secrets.master_keys.clone()
    };
    let keys = specs
        .iter()
        .map(|s| {
            secrets::parse_key_spec(s)
                .context("secrets.master_keys entries must be `<kid>:<base64 of 32 bytes>`")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let active = config.secrets.active_key.clone().unwrap_or_else(|| keys[0].0.clone());
    Keyring::new(&active, keys).context("secrets.active_key must name one of secrets.master_keys")
}

fn local_master_key(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("master.key");
    if path.exists() {
        return Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {} (data.dir)", dir.display()))?;
    let spec = secrets::encode_key_spec("local1", &secrets::generate_key());
    write_private(&path, &spec)?;
    tracing::info!(path = %path.display(), "generated a master key for secrets at rest");
    Ok(spec)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .with_context(|| format!("log.level `{}` is not a valid filter", config.log.level))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match config.log.format.as_str() {
        "pretty" => builder.try_init(),
        _ => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
    if let Err(e) = result {
        bail!("cannot initialise logging: {e}");
    }
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
