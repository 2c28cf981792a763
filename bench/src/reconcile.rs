//! The reconciler at scale: many endpoints across simulated clusters (in memory, each call
//! slowed by a latency), converged from PENDING to RUNNING by budcluster's own loops, then
//! passes that must find nothing to change and so write nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use bud_auth::secrets::{self, Keyring};
use bud_cluster::driver::Driver;
use bud_cluster::driver::simulated::{SimulatedCluster, SimulatedConfig};
use bud_cluster::{ClusterConfig, ClusterService};
use bud_domain::{
    ClusterId, ClusterStatus, EndpointId, EndpointStatus, Engine, Modality, ModelId, Name,
    ProjectId, SourceUri,
};
use bud_store::{AuditEvent, Cluster, ClusterKind, Endpoint, Model, Project, Store};
use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::Verdict;

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    /// `sqlite` or `postgres`.
    #[arg(long, default_value = "sqlite")]
    backend: String,
    #[arg(long, default_value_t = 50)]
    clusters: usize,
    #[arg(long, default_value_t = 1000)]
    endpoints: usize,
    /// Latency of every simulated cluster call.
    #[arg(long, default_value_t = 1)]
    latency_ms: u64,
    /// Time a simulated replica takes to become ready.
    #[arg(long, default_value_t = 50)]
    ready_ms: u64,
    /// No-op passes over every cluster to count writes in.
    #[arg(long, default_value_t = 5)]
    passes: usize,
    /// PostgreSQL admin URL for a fresh database.
    #[arg(
        long,
        env = "BUD_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
}

pub fn run(args: &ReconcileArgs) -> anyhow::Result<Verdict> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let db = match args.backend.as_str() {
            "sqlite" => bud_store::testing::fresh_sqlite().await?,
            "postgres" => bud_store::testing::fresh_postgres(&args.postgres_url)
                .await
                .context("PostgreSQL for the benchmark")?,
            other => anyhow::bail!("--backend must be sqlite or postgres, not {other}"),
        };
        let result = measure(args, db.store().clone()).await;
        db.cleanup().await;
        result
    })
}

fn audit(action: &str) -> AuditEvent {
    AuditEvent {
        at: Utc::now(),
        actor_id: None,
        actor: "bench".into(),
        action: action.into(),
        resource_type: "bench".into(),
        resource_id: String::new(),
        project_id: None,
        details: serde_json::Value::Null,
        request_id: None,
    }
}

/// Clusters and PENDING endpoints, spread round-robin.
async fn seed(args: &ReconcileArgs, store: &Store) -> anyhow::Result<Vec<ClusterId>> {
    let now = Utc::now();
    let project = Project {
        id: ProjectId::new(),
        name: Name::parse("name", "bench")?,
        description: String::new(),
        created_by: None,
        created_at: now,
        updated_at: now,
    };
    store.create_project(&project, None, &audit("project.create")).await?;
    let model = Model {
        id: ModelId::new(),
        name: Name::parse("name", "sim")?,
        source_uri: SourceUri::parse("source_uri", "hf://bench/sim")?,
        engine: Engine::EngineSim,
        modality: Modality::Text,
        description: String::new(),
        created_by: None,
        created_at: now,
        updated_at: now,
    };
    store.create_model(&model, &audit("model.create")).await?;
    let mut clusters = Vec::new();
    for i in 0..args.clusters {
        let cluster = Cluster {
            id: ClusterId::new(),
            name: Name::parse("name", &format!("sim-{i}"))?,
            kind: ClusterKind::Kubernetes,
            kubeconfig_ciphertext: String::new(),
            namespace: "bud-workloads".into(),
            status: ClusterStatus::Registering,
            reason: String::new(),
            consecutive_failures: 0,
            last_checked_at: None,
            inventory: None,
            created_by: None,
            created_at: now,
            updated_at: now,
        };
        store.create_cluster(&cluster, &audit("cluster.create")).await?;
        clusters.push(cluster.id);
    }
    for i in 0..args.endpoints {
        let endpoint = Endpoint {
            id: EndpointId::new(),
            project_id: project.id,
            model_id: model.id,
            cluster_id: clusters[i % clusters.len()],
            name: Name::parse("name", &format!("e{i}"))?,
            replicas: 2,
            min_replicas: 0,
            engine_args: vec![],
            gpus_per_replica: 0,
            deployment_timeout_secs: 600,
            status: EndpointStatus::Pending,
            reason: None,
            reason_detail: String::new(),
            status_since: now,
            ready_replicas: 0,
            addresses: vec![],
            generation: 1,
            created_by: None,
            created_at: now,
            updated_at: now,
        };
        store.create_endpoint(&endpoint, &audit("endpoint.create")).await?;
    }
    Ok(clusters)
}

async fn running(store: &Store, clusters: &[ClusterId]) -> anyhow::Result<usize> {
    let mut n = 0;
    for c in clusters {
        n += store
            .endpoints_on_cluster(*c)
            .await?
            .iter()
            .filter(|e| e.status == EndpointStatus::Running && e.ready_replicas == e.replicas)
            .count();
    }
    Ok(n)
}

async fn measure(args: &ReconcileArgs, store: Store) -> anyhow::Result<Verdict> {
    let clusters = seed(args, &store).await?;
    let simulated = SimulatedConfig {
        latency: Duration::from_millis(args.latency_ms),
        ready_after: Duration::from_millis(args.ready_ms),
        ..SimulatedConfig::default()
    };
    let overrides: HashMap<ClusterId, Driver> = clusters
        .iter()
        .map(|c| (*c, Driver::Simulated(SimulatedCluster::new(simulated))))
        .collect();
    let keyring = Keyring::new("bench", vec![("bench".into(), secrets::generate_key())])?;
    let config = ClusterConfig::default();
    let service =
        ClusterService::start_with(store.clone(), keyring, config.clone(), overrides).await?;

    // Baseline: one read of the desired state of every cluster, the least any pass must do.
    let started = Instant::now();
    for c in &clusters {
        store.endpoints_on_cluster(*c).await?;
    }
    let read_all = started.elapsed();

    let shutdown = CancellationToken::new();
    let writes_before = store.writes();
    let started = Instant::now();
    let loops = tokio::spawn(service.clone().run(shutdown.clone()));
    let deadline = started + Duration::from_secs(120);
    let converged = loop {
        if running(&store, &clusters).await? == args.endpoints {
            break started.elapsed();
        }
        anyhow::ensure!(Instant::now() < deadline, "did not converge within 120 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let converge_writes = store.writes() - writes_before;

    // Background writes of the running loops once converged: leases and probe heartbeats.
    let idle_before = store.writes();
    let idle = Duration::from_secs(10);
    tokio::time::sleep(idle).await;
    let idle_writes = store.writes() - idle_before;
    shutdown.cancel();
    loops.await?;

    // No-op passes, outside the loops.
    let before = store.writes();
    let started = Instant::now();
    for _ in 0..args.passes {
        for c in &clusters {
            service.reconcile_once(*c).await?;
        }
    }
    let pass_time = started.elapsed() / u32::try_from(args.passes).unwrap_or(1);
    let noop_writes = store.writes() - before;

    println!(
        "reconcile: {} endpoints x 2 replicas on {} simulated clusters ({} ms per call, ready after {} ms), {} backend, reconcile interval {:?}",
        args.endpoints,
        args.clusters,
        args.latency_ms,
        args.ready_ms,
        args.backend,
        config.reconcile_interval
    );
    println!(
        "  baseline: read every cluster's desired state once    {:>10.1} ms",
        read_all.as_secs_f64() * 1000.0
    );
    println!(
        "  converge PENDING -> RUNNING (all ready)              {:>10.1} ms   ({:.0}x baseline; target < 10 s)",
        converged.as_secs_f64() * 1000.0,
        converged.as_secs_f64() / read_all.as_secs_f64()
    );
    println!(
        "  store writes while converging                        {:>10}      ({:.1} per endpoint)",
        converge_writes,
        converge_writes as f64 / args.endpoints as f64
    );
    println!(
        "  one no-op pass over every cluster                    {:>10.1} ms   ({:.1}x baseline)",
        pass_time.as_secs_f64() * 1000.0,
        pass_time.as_secs_f64() / read_all.as_secs_f64()
    );
    println!(
        "  store writes per no-op pass                          {:>10.2}      (target 0; {} writes in {} passes)",
        noop_writes as f64 / args.passes as f64,
        noop_writes,
        args.passes
    );
    println!(
        "  background writes of idle loops (leases, heartbeats) {:>10.1} /s",
        idle_writes as f64 / idle.as_secs_f64()
    );
    let met = converged < Duration::from_secs(10) && noop_writes == 0;
    println!(
        "  {}",
        if met {
            "PASS: converged under 10 s with zero writes per no-op pass"
        } else {
            "FAIL: a target was missed"
        }
    );
    Ok(Verdict::Clean)
}
