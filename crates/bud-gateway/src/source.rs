//! Where the gateway's [`Snapshot`] comes from, and the loop that keeps it current.
//!
//! The loop polls a version: the store's `config_version` in the embedded setup (every 500 ms,
//! so a revoked key stops working within 2 s), budapp's `GET /internal/gateway/config?since=`
//! when the gateway runs apart (every second, within 5 s). Only when the version moved does it
//! read the whole configuration and build a new snapshot off the hot path: provider keys
//! opened with the keyring budapp sealed them with, key hashes decoded, implicit routes added.
//! When a poll fails, the gateway keeps serving the last snapshot it built (static stability):
//! an unreachable control plane must not take inference down with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bud_auth::secrets::{Keyring, aad};
use bud_domain::{ApiKeyId, EndpointId, ProjectId, ProviderId, RouteId};
use bud_protocol::control::RouteTargetDto;
use bud_protocol::gateway::GatewayConfigDto;
use bud_store::{
    GatewayConfigRecord, GatewayEndpoint, GatewayKey, GatewayProvider, GatewayRoute, RouteTarget,
    RouteUpstream, Store, StoreError,
};
use tokio_util::sync::CancellationToken;

use crate::snapshot::{KeyEntry, Route, Snapshot, Target, Upstream};

/// How often the embedded gateway polls the store's version.
pub const STORE_INTERVAL: Duration = Duration::from_millis(500);
/// How often a gateway apart from the control plane polls budapp.
pub const CONTROL_PLANE_INTERVAL: Duration = Duration::from_secs(1);
/// A snapshot confirmed current is stamped anew (its `built_at`) at most this often, so that
/// readiness can tell a quiet configuration from a source that stopped answering.
pub const CONFIRM_EVERY: Duration = Duration::from_secs(5);
/// Weights in a snapshot are a route target's weight times this, shared among the endpoint's
/// replicas: 2520 divides evenly by every replica count up to 10, so an endpoint's share of
/// traffic does not depend on how many replicas it runs. Implicit routes give every ready
/// replica this weight.
pub const WEIGHT_SCALE: u32 = 2520;
/// How long one request to budapp may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// While polls keep failing, the failure is logged again at most this often.
const LOG_FAILURES_EVERY: Duration = Duration::from_secs(30);

/// Where the configuration is read from.
pub enum SnapshotSource {
    /// The embedded setup: the control plane's database, read directly.
    Store(Store),
    /// The split setup: budapp's internal route, at `url` (budapp's base URL), presenting
    /// `token` (budapp's `gateway_token`).
    ControlPlane { url: String, token: String, http: reqwest::Client },
}

/// Why a poll failed; the variant names the `reason` label of
/// `gateway_snapshot_refresh_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The store could not be read.
    #[error("reading the store: {0}")]
    Store(#[from] StoreError),
    /// budapp did not answer, or its answer could not be read.
    #[error("asking budapp: {0}")]
    Http(#[from] reqwest::Error),
    /// budapp answered with an unexpected status (401: the gateway token is wrong; 403: budapp
    /// has no gateway token configured).
    #[error("budapp answered {0}")]
    Status(u16),
    /// The configuration does not hold together (a malformed id or target).
    #[error("the configuration is malformed: {0}")]
    Malformed(String),
}

impl SourceError {
    fn reason(&self) -> &'static str {
        match self {
            SourceError::Store(_) => "store",
            SourceError::Http(_) => "http",
            SourceError::Status(_) => "status",
            SourceError::Malformed(_) => "malformed",
        }
    }
}

impl SnapshotSource {
    /// The poll interval that meets this source's propagation target.
    pub fn default_interval(&self) -> Duration {
        match self {
            SnapshotSource::Store(_) => STORE_INTERVAL,
            SnapshotSource::ControlPlane { .. } => CONTROL_PLANE_INTERVAL,
        }
    }

    /// The configuration if its version is not `since`; `None` while it is.
    pub async fn fetch(
        &self,
        since: Option<u64>,
    ) -> Result<Option<GatewayConfigRecord>, SourceError> {
        match self {
            SnapshotSource::Store(store) => {
                if since.is_some() && since == Some(store.config_version().await?) {
                    return Ok(None);
                }
                Ok(Some(store.gateway_config().await?))
            }
            SnapshotSource::ControlPlane { url, token, http } => {
                let mut request = http
                    .get(format!("{}/internal/gateway/config", url.trim_end_matches('/')))
                    .bearer_auth(token)
                    .timeout(FETCH_TIMEOUT);
                if let Some(since) = since {
                    request = request.query(&[("since", since)]);
                }
                let response = request.send().await?;
                match response.status() {
                    reqwest::StatusCode::NOT_MODIFIED => Ok(None),
                    reqwest::StatusCode::OK => {
                        let dto: GatewayConfigDto = response.json().await?;
                        Ok(Some(from_dto(dto)?))
                    }
                    other => Err(SourceError::Status(other.as_u16())),
                }
            }
        }
    }
}

/// Polls `source` every `interval` until `shutdown`, swapping a new snapshot into `handle`
/// whenever the configuration's version moves. A failed poll leaves the current snapshot in
/// place and is retried at the next tick.
pub async fn refresh_loop(
    source: SnapshotSource,
    keyring: Keyring,
    handle: Arc<ArcSwap<Snapshot>>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing_since: Option<Instant> = None;
    let mut last_logged: Option<Instant> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match refresh_once(&source, &keyring, &handle).await {
            Ok(_) => {
                if let Some(since) = failing_since.take() {
                    tracing::info!(failed_for = ?since.elapsed(), "gateway configuration readable again");
                }
                last_logged = None;
            }
            Err(e) => {
                metrics::counter!("gateway_snapshot_refresh_failures_total", "reason" => e.reason())
                    .increment(1);
                let since = *failing_since.get_or_insert_with(Instant::now);
                if last_logged.is_none_or(|at| at.elapsed() >= LOG_FAILURES_EVERY) {
                    last_logged = Some(Instant::now());
                    let version = handle.load().version;
                    tracing::warn!(error = %e, failing_for = ?since.elapsed(), serving_version = version,
                        "gateway configuration not refreshed; serving the last snapshot");
                }
            }
        }
    }
}

/// One poll: builds and swaps in a new snapshot when the version moved (returns true), and
/// re-stamps the current one when it is confirmed current and older than [`CONFIRM_EVERY`].
/// Useful on its own to load the first snapshot before serving.
pub async fn refresh_once(
    source: &SnapshotSource,
    keyring: &Keyring,
    handle: &ArcSwap<Snapshot>,
) -> Result<bool, SourceError> {
    let current = handle.load_full();
    // A snapshot never built (the empty default) holds no version worth keeping.
    let held = current.built_at.map(|_| current.version);
    match source.fetch(held).await? {
        Some(config) => {
            let snapshot =
                Snapshot { built_at: Some(Instant::now()), ..build_snapshot(&config, keyring) };
            metrics::gauge!("gateway_snapshot_version").set(config.version as f64);
            tracing::debug!(
                version = config.version,
                keys = snapshot.keys.len(),
                "gateway configuration changed"
            );
            handle.store(Arc::new(snapshot));
            Ok(true)
        }
        None => {
            if current.built_at.is_none_or(|at| at.elapsed() >= CONFIRM_EVERY) {
                handle.store(Arc::new(Snapshot {
                    version: current.version,
                    built_at: Some(Instant::now()),
                    keys: current.keys.clone(),
                    routes: current.routes.clone(),
                }));
            }
            Ok(false)
        }
    }
}

/// The snapshot of `config`: a pure function of it and the keyring (`built_at` is left for the
/// caller to stamp).
///
/// - Keys: by the SHA-256 decoded from the stored hex; expired keys stay (the snapshot refuses
///   them by their expiry), revoked keys are not in the configuration at all.
/// - Explicit routes: each target becomes one snapshot target per ready replica of its endpoint
///   (only RUNNING endpoints of the route's project count) or one for its provider. A target
///   whose endpoint is not running, or whose provider is gone or cannot be opened, is left out;
///   the route stays, so its name answers "unavailable" rather than "no such model".
/// - Implicit routes: every RUNNING endpoint is routable in its project under its model's name,
///   balanced evenly over the ready replicas of every endpoint of that model, unless an explicit
///   route of that name exists in the project. The label is that of the oldest endpoint.
pub fn build_snapshot(config: &GatewayConfigRecord, keyring: &Keyring) -> Snapshot {
    let keys = config.keys.iter().filter_map(key_entry).collect();
    let providers: HashMap<ProviderId, (&GatewayProvider, Option<String>)> = config
        .providers
        .iter()
        .filter_map(|p| open_provider_key(p, keyring).map(|key| (p.id, (p, key))))
        .collect();
    let endpoints: HashMap<EndpointId, &GatewayEndpoint> =
        config.endpoints.iter().map(|e| (e.id, e)).collect();

    let mut routes: HashMap<ProjectId, HashMap<String, Arc<Route>>> = HashMap::new();
    for r in &config.routes {
        let expand = |list: &[RouteTarget]| -> Vec<Target> {
            list.iter().flat_map(|t| targets_of(t, r.project_id, &endpoints, &providers)).collect()
        };
        let route = Route {
            name: r.name.clone(),
            label: r.id.to_string(),
            targets: expand(&r.targets),
            fallbacks: expand(&r.fallbacks),
            rpm: r.rpm_limit.map(limit),
            tpm: r.tpm_limit.map(limit),
        };
        routes.entry(r.project_id).or_default().insert(r.name.clone(), Arc::new(route));
    }

    // Endpoints are sorted by id (oldest first) in the configuration; sorted again so the label
    // does not depend on it.
    let mut running: Vec<&GatewayEndpoint> = config.endpoints.iter().collect();
    running.sort_by_key(|e| e.id);
    let mut implicit: HashMap<(ProjectId, &str), Route> = HashMap::new();
    for e in running {
        let in_project = routes.get(&e.project_id);
        if in_project.is_some_and(|names| names.contains_key(&e.model_name)) {
            continue;
        }
        let route =
            implicit.entry((e.project_id, e.model_name.as_str())).or_insert_with(|| Route {
                name: e.model_name.clone(),
                label: format!("endpoint:{}", e.id),
                targets: vec![],
                fallbacks: vec![],
                rpm: None,
                tpm: None,
            });
        route.targets.extend(replicas(e, WEIGHT_SCALE));
    }
    for ((project, name), route) in implicit {
        routes.entry(project).or_default().insert(name.to_owned(), Arc::new(route));
    }

    Snapshot { version: config.version, built_at: None, keys, routes }
}

/// The configuration as budapp sends it, checked into the store's record.
pub fn from_dto(dto: GatewayConfigDto) -> Result<GatewayConfigRecord, SourceError> {
    let targets = |list: Vec<RouteTargetDto>| -> Result<Vec<RouteTarget>, SourceError> {
        list.into_iter().map(route_target).collect()
    };
    Ok(GatewayConfigRecord {
        version: dto.version,
        keys: dto
            .keys
            .into_iter()
            .map(|k| GatewayKey {
                id: ApiKeyId::from_uuid(k.id),
                project_id: ProjectId::from_uuid(k.project_id),
                hash: k.hash,
                expires_at: k.expires_at,
                rpm_limit: k.rpm_limit,
                tpm_limit: k.tpm_limit,
            })
            .collect(),
        routes: dto
            .routes
            .into_iter()
            .map(|r| {
                Ok(GatewayRoute {
                    id: RouteId::from_uuid(r.id),
                    project_id: ProjectId::from_uuid(r.project_id),
                    name: r.name,
                    targets: targets(r.targets)?,
                    fallbacks: targets(r.fallbacks)?,
                    rpm_limit: r.rpm_limit,
                    tpm_limit: r.tpm_limit,
                })
            })
            .collect::<Result<_, SourceError>>()?,
        endpoints: dto
            .endpoints
            .into_iter()
            .map(|e| GatewayEndpoint {
                id: EndpointId::from_uuid(e.id),
                project_id: ProjectId::from_uuid(e.project_id),
                model_name: e.model_name,
                addresses: e.addresses,
            })
            .collect(),
        providers: dto
            .providers
            .into_iter()
            .map(|p| GatewayProvider {
                id: ProviderId::from_uuid(p.id),
                base_url: p.base_url,
                api_key_ciphertext: p.api_key_ciphertext,
            })
            .collect(),
    })
}

fn route_target(t: RouteTargetDto) -> Result<RouteTarget, SourceError> {
    let weight = u32::try_from(t.weight)
        .map_err(|_| SourceError::Malformed(format!("target weight {}", t.weight)))?;
    let upstream = match (t.endpoint_id, t.provider_id, t.model) {
        (Some(id), None, None) => RouteUpstream::Endpoint(EndpointId::from_uuid(id)),
        (None, Some(id), Some(model)) => {
            RouteUpstream::Provider { id: ProviderId::from_uuid(id), model }
        }
        _ => {
            return Err(SourceError::Malformed(
                "a target names an endpoint, or a provider and its model".into(),
            ));
        }
    };
    Ok(RouteTarget { upstream, weight })
}

fn key_entry(k: &GatewayKey) -> Option<([u8; 32], KeyEntry)> {
    let mut hash = [0u8; 32];
    if hex::decode_to_slice(&k.hash, &mut hash).is_err() {
        tracing::warn!(key_id = %k.id, "API key hash is not 64 hex digits; key left out");
        return None;
    }
    let entry = KeyEntry {
        id: k.id,
        project_id: k.project_id,
        expires_at_ms: k.expires_at.map(|e| e.timestamp_millis()),
        rpm: k.rpm_limit.map(limit),
        tpm: k.tpm_limit.map(limit),
    };
    Some((hash, entry))
}

/// The provider's API key in clear (`None` when it has none); `None` overall, and a warning,
/// when it cannot be opened: its targets are left out rather than sent without their key.
fn open_provider_key(p: &GatewayProvider, keyring: &Keyring) -> Option<Option<String>> {
    if p.api_key_ciphertext.is_empty() {
        return Some(None);
    }
    let opened = keyring
        .decrypt(&p.api_key_ciphertext, aad::provider(p.id).as_bytes())
        .map_err(|e| e.to_string())
        .and_then(|plain| String::from_utf8(plain).map_err(|_| "not UTF-8".to_owned()));
    match opened {
        Ok(key) => Some(Some(key)),
        Err(e) => {
            tracing::warn!(provider_id = %p.id, error = %e,
                "cannot open the provider's API key (is the master key it was sealed with configured?); its targets are left out");
            None
        }
    }
}

fn targets_of(
    t: &RouteTarget,
    project: ProjectId,
    endpoints: &HashMap<EndpointId, &GatewayEndpoint>,
    providers: &HashMap<ProviderId, (&GatewayProvider, Option<String>)>,
) -> Vec<Target> {
    match &t.upstream {
        RouteUpstream::Endpoint(id) => match endpoints.get(id) {
            Some(e) if e.project_id == project => {
                // The route's weight is the endpoint's, shared among its replicas.
                let n = u32::try_from(e.addresses.len()).unwrap_or(u32::MAX).max(1);
                let per_replica = t.weight.saturating_mul(WEIGHT_SCALE).saturating_add(n / 2) / n;
                replicas(e, per_replica.max(1))
            }
            _ => vec![],
        },
        RouteUpstream::Provider { id, model } => match providers.get(id) {
            Some((p, api_key)) => vec![Target {
                label: format!("provider:{id}"),
                weight: t.weight.saturating_mul(WEIGHT_SCALE),
                upstream: Upstream::Provider {
                    provider_id: *id,
                    base_url: p.base_url.clone(),
                    api_key: api_key.clone(),
                    model: model.clone(),
                },
            }],
            None => vec![],
        },
    }
}

/// One target per ready replica of `e`, each of `weight`.
fn replicas(e: &GatewayEndpoint, weight: u32) -> Vec<Target> {
    e.addresses
        .iter()
        .map(|address| Target {
            label: format!("replica:{}/{address}", e.id),
            weight,
            upstream: Upstream::Replica {
                endpoint_id: e.id,
                address: address.clone(),
                served_model: e.model_name.clone(),
            },
        })
        .collect()
}

/// A stored limit as the snapshot holds it (budapp keeps limits within 1 to 10^9).
fn limit(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use bud_domain::{Name, Timestamp};
    use bud_store::{ApiKey, AuditEvent, Project};
    use chrono::Utc;
    use sha2::{Digest, Sha256};

    use super::*;

    fn keyring() -> Keyring {
        Keyring::new("k1", vec![("k1".to_owned(), [7; 32])]).unwrap()
    }

    fn hash_of(key: &str) -> ([u8; 32], String) {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        (digest, hex::encode(digest))
    }

    fn key(project: ProjectId, plaintext: &str, expires_at: Option<Timestamp>) -> GatewayKey {
        GatewayKey {
            id: ApiKeyId::new(),
            project_id: project,
            hash: hash_of(plaintext).1,
            expires_at,
            rpm_limit: Some(60),
            tpm_limit: None,
        }
    }

    fn endpoint(project: ProjectId, model: &str, addresses: &[&str]) -> GatewayEndpoint {
        GatewayEndpoint {
            id: EndpointId::new(),
            project_id: project,
            model_name: model.to_owned(),
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn route(project: ProjectId, name: &str, targets: Vec<RouteTarget>) -> GatewayRoute {
        GatewayRoute {
            id: RouteId::new(),
            project_id: project,
            name: name.to_owned(),
            targets,
            fallbacks: vec![],
            rpm_limit: Some(100),
            tpm_limit: None,
        }
    }

    fn config() -> GatewayConfigRecord {
        GatewayConfigRecord {
            version: 7,
            keys: vec![],
            routes: vec![],
            endpoints: vec![],
            providers: vec![],
        }
    }

    fn replica_addresses(route: &Route) -> Vec<&str> {
        route
            .targets
            .iter()
            .map(|t| match &t.upstream {
                Upstream::Replica { address, .. } => address.as_str(),
                Upstream::Provider { .. } => "provider",
            })
            .collect()
    }

    #[test]
    fn running_endpoints_are_routable_under_their_model_name_in_their_project() {
        let (p, q) = (ProjectId::new(), ProjectId::new());
        let e = endpoint(p, "llama", &["10.0.0.1:8000", "10.0.0.2:8000"]);
        let snapshot = build_snapshot(
            &GatewayConfigRecord { endpoints: vec![e.clone()], ..config() },
            &keyring(),
        );
        assert_eq!(snapshot.version, 7);
        assert_eq!(snapshot.built_at, None, "stamped by the caller");
        let r = snapshot.route(p, "llama").unwrap();
        assert_eq!(r.label, format!("endpoint:{}", e.id));
        assert_eq!((r.rpm, r.tpm, r.fallbacks.len()), (None, None, 0));
        assert_eq!(replica_addresses(r), ["10.0.0.1:8000", "10.0.0.2:8000"]);
        assert_eq!(
            r.targets[0],
            Target {
                label: format!("replica:{}/10.0.0.1:8000", e.id),
                weight: WEIGHT_SCALE,
                upstream: Upstream::Replica {
                    endpoint_id: e.id,
                    address: "10.0.0.1:8000".to_owned(),
                    served_model: "llama".to_owned(),
                },
            }
        );
        assert!(snapshot.route(q, "llama").is_none(), "only in its own project");
        assert_eq!(snapshot.routes_of(p).count(), 1);
    }

    #[test]
    fn endpoints_of_one_model_share_one_implicit_route() {
        let p = ProjectId::new();
        let older = endpoint(p, "llama", &["10.0.0.1:8000"]);
        let newer = endpoint(p, "llama", &["10.0.0.2:8000", "10.0.0.3:8000"]);
        let other = endpoint(p, "qwen", &[]);
        let endpoints = vec![newer.clone(), other.clone(), older.clone()];
        let snapshot = build_snapshot(&GatewayConfigRecord { endpoints, ..config() }, &keyring());
        let r = snapshot.route(p, "llama").unwrap();
        assert_eq!(r.label, format!("endpoint:{}", older.id), "labelled by the oldest");
        assert_eq!(replica_addresses(r), ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"]);
        assert!(r.targets.iter().all(|t| t.weight == WEIGHT_SCALE), "even over replicas");
        let idle = snapshot.route(p, "qwen").unwrap();
        assert!(idle.targets.is_empty(), "running without ready replicas: known, unavailable");
    }

    #[test]
    fn an_explicit_route_shadows_the_implicit_one_in_its_project_only() {
        let (p, q) = (ProjectId::new(), ProjectId::new());
        let mine = endpoint(p, "llama", &["10.0.0.1:8000"]);
        let theirs = endpoint(q, "llama", &["10.0.1.1:8000"]);
        let provider = GatewayProvider {
            id: ProviderId::new(),
            base_url: "https://api.example.com/v1".to_owned(),
            api_key_ciphertext: String::new(),
        };
        let explicit = route(
            p,
            "llama",
            vec![RouteTarget {
                upstream: RouteUpstream::Provider { id: provider.id, model: "llama-3.1-8b".into() },
                weight: 1,
            }],
        );
        let config = GatewayConfigRecord {
            routes: vec![explicit.clone()],
            endpoints: vec![mine, theirs.clone()],
            providers: vec![provider.clone()],
            ..config()
        };
        let snapshot = build_snapshot(&config, &keyring());
        let r = snapshot.route(p, "llama").unwrap();
        assert_eq!(r.label, explicit.id.to_string());
        assert_eq!(r.rpm, Some(100));
        assert_eq!(
            r.targets,
            vec![Target {
                label: format!("provider:{}", provider.id),
                weight: WEIGHT_SCALE,
                upstream: Upstream::Provider {
                    provider_id: provider.id,
                    base_url: provider.base_url.clone(),
                    api_key: None,
                    model: "llama-3.1-8b".to_owned(),
                },
            }]
        );
        let other = snapshot.route(q, "llama").unwrap();
        assert_eq!(other.label, format!("endpoint:{}", theirs.id), "other projects keep theirs");
    }

    #[test]
    fn an_endpoint_target_shares_its_weight_among_its_replicas() {
        let p = ProjectId::new();
        let three = endpoint(p, "llama", &["a:1", "b:1", "c:1"]);
        let one = endpoint(p, "llama", &["d:1"]);
        let stopped = EndpointId::new();
        let elsewhere = endpoint(ProjectId::new(), "llama", &["e:1"]);
        let to = |id: EndpointId, weight: u32| RouteTarget {
            upstream: RouteUpstream::Endpoint(id),
            weight,
        };
        let mut r = route(
            p,
            "chat",
            vec![to(three.id, 2), to(one.id, 1), to(stopped, 5), to(elsewhere.id, 1)],
        );
        r.fallbacks = vec![to(one.id, 1)];
        let config = GatewayConfigRecord {
            routes: vec![r],
            endpoints: vec![three, one, elsewhere],
            ..config()
        };
        let snapshot = build_snapshot(&config, &keyring());
        let chat = snapshot.route(p, "chat").unwrap();
        let weights: Vec<u32> = chat.targets.iter().map(|t| t.weight).collect();
        assert_eq!(weights, [1680, 1680, 1680, WEIGHT_SCALE], "2:1 between the endpoints");
        assert_eq!(
            replica_addresses(chat),
            ["a:1", "b:1", "c:1", "d:1"],
            "endpoints not running or of another project are left out"
        );
        assert_eq!(chat.fallbacks.len(), 1);
    }

    #[test]
    fn expired_keys_are_kept_but_refused_and_malformed_hashes_left_out() {
        let p = ProjectId::new();
        let now = Utc::now();
        let live = key(p, "bud_sk_live", Some(now + chrono::Duration::hours(1)));
        let expired = key(p, "bud_sk_expired", Some(now - chrono::Duration::seconds(1)));
        let forever = key(p, "bud_sk_forever", None);
        let mut broken = key(p, "bud_sk_broken", None);
        broken.hash = "not-hex".to_owned();
        let keys = vec![live.clone(), expired.clone(), forever, broken];
        let snapshot = build_snapshot(&GatewayConfigRecord { keys, ..config() }, &keyring());
        assert_eq!(snapshot.keys.len(), 3);
        let now_ms = now.timestamp_millis();
        let entry = snapshot.key(&hash_of("bud_sk_live").0, now_ms).unwrap();
        assert_eq!(
            entry,
            &KeyEntry {
                id: live.id,
                project_id: p,
                expires_at_ms: live.expires_at.map(|e| e.timestamp_millis()),
                rpm: Some(60),
                tpm: None,
            }
        );
        assert!(snapshot.keys.contains_key(&hash_of("bud_sk_expired").0), "kept");
        assert!(snapshot.key(&hash_of("bud_sk_expired").0, now_ms).is_none(), "but refused");
        assert!(snapshot.key(&hash_of("bud_sk_forever").0, now_ms).is_some());
        assert!(snapshot.key(&hash_of("bud_sk_unknown").0, now_ms).is_none());
    }

    #[test]
    fn provider_keys_are_opened_with_the_keyring_and_their_row() {
        let p = ProjectId::new();
        let ring = keyring();
        let sealed = |id: ProviderId, secret: &str| {
            ring.encrypt(secret.as_bytes(), aad::provider(id).as_bytes())
        };
        let good_id = ProviderId::new();
        let good = GatewayProvider {
            id: good_id,
            base_url: "https://a/v1".into(),
            api_key_ciphertext: sealed(good_id, "sk-good"),
        };
        // Sealed for another row: it must not open here.
        let moved_id = ProviderId::new();
        let moved = GatewayProvider {
            id: moved_id,
            base_url: "https://b/v1".into(),
            api_key_ciphertext: sealed(good_id, "sk-good"),
        };
        let to = |id: ProviderId| RouteTarget {
            upstream: RouteUpstream::Provider { id, model: "m".into() },
            weight: 1,
        };
        let config = GatewayConfigRecord {
            routes: vec![route(p, "chat", vec![to(good_id), to(moved_id)])],
            providers: vec![good, moved],
            ..config()
        };
        let snapshot = build_snapshot(&config, &ring);
        let chat = snapshot.route(p, "chat").unwrap();
        assert_eq!(chat.targets.len(), 1, "a provider whose key cannot be opened is left out");
        let Upstream::Provider { provider_id, api_key, .. } = &chat.targets[0].upstream else {
            panic!("{chat:?}")
        };
        assert_eq!((*provider_id, api_key.as_deref()), (good_id, Some("sk-good")));
    }

    #[test]
    fn malformed_configuration_from_budapp_is_an_error() {
        let target =
            RouteTargetDto { endpoint_id: None, provider_id: None, model: None, weight: 1 };
        let dto = GatewayConfigDto {
            version: 3,
            keys: vec![],
            routes: vec![bud_protocol::gateway::GatewayRouteDto {
                id: uuid::Uuid::now_v7(),
                project_id: uuid::Uuid::now_v7(),
                name: "chat".into(),
                targets: vec![target],
                fallbacks: vec![],
                rpm_limit: None,
                tpm_limit: None,
            }],
            endpoints: vec![],
            providers: vec![],
        };
        assert!(matches!(from_dto(dto), Err(SourceError::Malformed(_))));
    }

    // ---- against a store -------------------------------------------------------------------

    fn audit() -> AuditEvent {
        AuditEvent {
            at: Utc::now(),
            actor_id: None,
            actor: "test".into(),
            action: "test".into(),
            resource_type: "test".into(),
            resource_id: String::new(),
            project_id: None,
            details: serde_json::Value::Null,
            request_id: None,
        }
    }

    /// A project with one active key; returns the project and the key's id and hash.
    async fn project_with_key(store: &Store) -> (ProjectId, ApiKeyId, [u8; 32]) {
        let now = Utc::now();
        let project = Project {
            id: ProjectId::new(),
            name: Name::parse("name", "alpha").unwrap(),
            description: String::new(),
            created_by: None,
            created_at: now,
            updated_at: now,
        };
        store.create_project(&project, None, &audit()).await.unwrap();
        let (hash, hex) = hash_of("bud_sk_secret");
        let key = ApiKey {
            id: ApiKeyId::new(),
            project_id: project.id,
            name: Name::parse("name", "ci").unwrap(),
            prefix: "bud_sk_sec".into(),
            hash: hex,
            created_by: None,
            created_at: now,
            expires_at: None,
            revoked_at: None,
            rpm_limit: None,
            tpm_limit: None,
        };
        store.create_api_key(&key, &audit()).await.unwrap();
        (project.id, key.id, hash)
    }

    #[tokio::test]
    async fn a_revoked_key_is_absent_from_the_snapshot() {
        let db = bud_store::testing::fresh_sqlite().await.unwrap();
        let (project, key_id, hash) = project_with_key(&db).await;
        let snapshot = build_snapshot(&db.gateway_config().await.unwrap(), &keyring());
        assert_eq!(snapshot.keys[&hash].project_id, project);
        db.revoke_api_key(key_id, Utc::now(), &audit()).await.unwrap();
        let snapshot = build_snapshot(&db.gateway_config().await.unwrap(), &keyring());
        assert!(!snapshot.keys.contains_key(&hash));
        db.cleanup().await;
    }

    #[tokio::test]
    async fn the_store_source_takes_a_revocation_within_two_seconds() {
        let db = bud_store::testing::fresh_sqlite().await.unwrap();
        let (_, key_id, hash) = project_with_key(&db).await;
        let handle = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
        let source = SnapshotSource::Store(db.store().clone());
        let interval = source.default_interval();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(refresh_loop(
            source,
            keyring(),
            handle.clone(),
            interval,
            shutdown.clone(),
        ));
        let now_ms = || Utc::now().timestamp_millis();
        let deadline = Instant::now() + Duration::from_secs(2);
        while handle.load().key(&hash, now_ms()).is_none() {
            assert!(Instant::now() < deadline, "the key never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let revoked_at = Instant::now();
        db.revoke_api_key(key_id, Utc::now(), &audit()).await.unwrap();
        while handle.load().key(&hash, now_ms()).is_some() {
            assert!(revoked_at.elapsed() < Duration::from_secs(2), "revocation not seen in 2 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shutdown.cancel();
        task.await.unwrap();
        db.cleanup().await;
    }

    #[tokio::test]
    async fn an_unchanged_version_keeps_the_snapshot_and_a_failing_source_too() {
        let db = bud_store::testing::fresh_sqlite().await.unwrap();
        let (project, _, hash) = project_with_key(&db).await;
        let source = SnapshotSource::Store(db.store().clone());
        let handle = ArcSwap::from_pointee(Snapshot::default());
        assert!(refresh_once(&source, &keyring(), &handle).await.unwrap());
        let built = handle.load_full();
        assert!(built.built_at.is_some());
        assert_eq!(built.keys[&hash].project_id, project);
        assert!(!refresh_once(&source, &keyring(), &handle).await.unwrap());
        assert!(Arc::ptr_eq(&built, &handle.load_full()), "not rebuilt while nothing changed");

        db.store().close().await;
        let err = refresh_once(&source, &keyring(), &handle).await.unwrap_err();
        assert!(matches!(err, SourceError::Store(_)), "{err}");
        assert!(Arc::ptr_eq(&built, &handle.load_full()), "the last snapshot keeps serving");
        db.cleanup().await;
    }

    // ---- against budapp's internal route (a fake of it) --------------------------------------

    /// Serves `GET /internal/gateway/config` as budapp does: 401 without the token, 304 when
    /// `since` is the current version, the configuration otherwise.
    async fn fake_budapp(config: GatewayConfigDto) -> String {
        use http_body_util::Full;
        use hyper::body::Bytes;
        use hyper::{Request, Response, StatusCode};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let body = serde_json::to_vec(&config).unwrap();
        let version = config.version;
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let body = body.clone();
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let body = body.clone();
                        async move {
                            let authorized = req
                                .headers()
                                .get("authorization")
                                .is_some_and(|v| v == "Bearer gw-token");
                            let since = req
                                .uri()
                                .query()
                                .and_then(|q| q.strip_prefix("since="))
                                .and_then(|v| v.parse::<u64>().ok());
                            let (status, body) = if req.uri().path() != "/internal/gateway/config" {
                                (StatusCode::NOT_FOUND, Vec::new())
                            } else if !authorized {
                                (StatusCode::UNAUTHORIZED, Vec::new())
                            } else if since == Some(version) {
                                (StatusCode::NOT_MODIFIED, Vec::new())
                            } else {
                                (StatusCode::OK, body)
                            };
                            let mut response = Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service),
                );
            }
        });
        url
    }

    #[tokio::test]
    async fn the_control_plane_source_reads_budapp_and_honours_304() {
        let project = uuid::Uuid::now_v7();
        let (hash, hex) = hash_of("bud_sk_remote");
        let config = GatewayConfigDto {
            version: 42,
            keys: vec![bud_protocol::gateway::GatewayKeyDto {
                id: uuid::Uuid::now_v7(),
                project_id: project,
                hash: hex,
                expires_at: None,
                rpm_limit: None,
                tpm_limit: Some(1000),
            }],
            routes: vec![],
            endpoints: vec![bud_protocol::gateway::GatewayEndpointDto {
                id: uuid::Uuid::now_v7(),
                project_id: project,
                model_name: "llama".into(),
                addresses: vec!["10.0.0.1:8000".into()],
            }],
            providers: vec![],
        };
        let url = fake_budapp(config).await;
        let http = reqwest::Client::new();
        let source = SnapshotSource::ControlPlane {
            url: format!("{url}/"),
            token: "gw-token".into(),
            http: http.clone(),
        };
        assert_eq!(source.default_interval(), CONTROL_PLANE_INTERVAL);
        let handle = ArcSwap::from_pointee(Snapshot::default());
        assert!(refresh_once(&source, &keyring(), &handle).await.unwrap());
        let built = handle.load_full();
        assert_eq!(built.version, 42);
        assert_eq!(built.keys[&hash].tpm, Some(1000));
        assert!(built.route(ProjectId::from_uuid(project), "llama").is_some());
        assert!(!refresh_once(&source, &keyring(), &handle).await.unwrap(), "304");
        assert!(Arc::ptr_eq(&built, &handle.load_full()));

        let wrong = SnapshotSource::ControlPlane { url, token: "nope".into(), http };
        let err = refresh_once(&wrong, &keyring(), &ArcSwap::from_pointee(Snapshot::default()))
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::Status(401)), "{err}");
    }
}
