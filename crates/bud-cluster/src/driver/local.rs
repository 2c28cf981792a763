//! The `local` cluster: endpoint replicas run as child processes of budcluster on this machine.
//!
//! Each replica is supervised by its own task ([`replica`]): it takes a free port, starts the
//! engine command with its output appended to the replica's log, waits for the engine's health
//! check to answer, keeps probing it, and restarts the engine with backoff whenever it exits.
//! The driver's table (endpoint → replicas) is only memory; what a replica reports (ready,
//! address, failure) is read from it by [`LocalDriver::observe`].
//!
//! On disk, under `state_dir`, each endpoint has a folder with, per replica, a log
//! (`replica-<n>.log`, kept until the operator deletes it) and, while its process runs, a record
//! (`replica-<n>.json`: pid, port, argv, generation, start time). `<state_dir>/lock` is held
//! by the one driver that uses the folder.
//!
//! After a crash of budcluster, replicas are **cleaned up, then redeployed**: a crashed
//! budcluster leaves its engines running (nothing kills a child when its parent dies without
//! unsafe code), and [`LocalDriver::new`] kills every recorded process that is still the one
//! recorded, then removes the records. The reconciler's next pass finds nothing running and
//! starts the replicas again through `ensure`. Adopting the survivors instead would save a model
//! load, but a process that is not our child cannot be waited on (no exit status, no way to know
//! when it is gone), its GPUs and generation would have to be trusted from a file, and its
//! output would no longer reach its log; a restart is slower but leaves one code path.
//!
//! Invariants: a replica that left the table has no process left (its task waited for the
//! child, and its process group was killed); GPUs are handed out by index, each to at most one
//! replica; changes (`ensure`, `remove`, `shutdown`) run one at a time.

mod logs;
mod process;
mod records;
mod replica;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bud_domain::{EndpointId, FailureReason};
use bud_store::Inventory;
use nix::fcntl::{Flock, FlockArg};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{DriverError, EndpointSpec, Observation, ObservedEndpoint};
use replica::{Context, Replica};

/// How the local driver runs and watches replicas.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// The engine's argv template. Each element may hold the placeholders `{model}` (served
    /// name), `{source}` (model source), `{port}`, `{endpoint}` (endpoint id) and `{replica}`
    /// (index); the endpoint's engine arguments are appended as they are. The binary supplies
    /// the default (`bud engine-sim --port {port} --model {model}`).
    pub command: Vec<String>,
    /// Where replica records and logs live: `<state_dir>/<endpoint id>/replica-<n>.{json,log}`.
    /// Records let the next budcluster clean up after a crash; logs outlive the endpoint.
    pub state_dir: PathBuf,
    /// The engine's health check, asked on `127.0.0.1:<port>`; any 2xx means ready.
    pub health_path: String,
    /// How often a ready replica is probed; three failed probes in a row make it not ready
    /// (it stays supervised and becomes ready again when the probe answers).
    pub health_interval: Duration,
    /// A replica not healthy within this is killed and restarted, which counts as a crash.
    pub start_timeout: Duration,
    /// Delay before restarting a replica that exited: starts at `.0`, doubles up to `.1`, and
    /// goes back to `.0` once the replica has stayed ready for the crash-loop window.
    pub restart_backoff: (Duration, Duration),
    /// `.0` exits of one replica within `.1` make the endpoint report a crash loop. The report
    /// stays (restarts go on, backing off) until the replica has stayed ready for `.1`.
    pub crash_loop: (u32, Duration),
    /// Time between SIGTERM and SIGKILL when a replica is stopped.
    pub stop_grace: Duration,
    /// GPUs of this machine that replicas may use, numbered from 0; each replica gets its own
    /// through `CUDA_VISIBLE_DEVICES` (empty for a replica that asked for none). With 0, the
    /// variable is left alone. Detected by the binary, not here.
    pub gpus: u32,
}

impl LocalConfig {
    /// The documented defaults for everything but what only the binary knows.
    pub fn new(command: Vec<String>, state_dir: PathBuf, gpus: u32) -> Self {
        Self {
            command,
            state_dir,
            health_path: "/health".into(),
            health_interval: Duration::from_secs(1),
            // Real engines download and load weights before they answer; the reconciler's
            // deployment timeout is what reports a slow start to a person.
            start_timeout: Duration::from_secs(15 * 60),
            restart_backoff: (Duration::from_millis(500), Duration::from_secs(30)),
            crash_loop: (3, Duration::from_secs(60)),
            stop_grace: Duration::from_secs(5),
            gpus,
        }
    }
}

/// Runs endpoint replicas as supervised child processes of this process.
pub struct LocalDriver {
    context: Arc<Context>,
    endpoints: Mutex<HashMap<EndpointId, Endpoint>>,
    /// Held across a whole `ensure`, `remove` or `shutdown`, so that replicas being stopped
    /// have exited (and freed their GPUs) before another change hands those GPUs out.
    changes: tokio::sync::Mutex<()>,
    /// Parent of every replica's stop token: dropping the driver stops its replicas.
    _stop_on_drop: DropGuard,
    stop_all: CancellationToken,
    /// An exclusive lock on `<state_dir>/lock` for the driver's lifetime: the clean-up in
    /// `new` would otherwise kill the engines of another budcluster using the same folder. The
    /// kernel releases it when this process dies, however it dies.
    _state_lock: Flock<std::fs::File>,
}

/// What decides the command a replica runs: a change of it replaces every replica, while a
/// change of the replica count or generation alone does not.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EngineShape {
    served_name: String,
    model_source: String,
    engine_args: Vec<String>,
    gpus_per_replica: u32,
}

impl EngineShape {
    fn of(spec: &EndpointSpec) -> Self {
        Self {
            served_name: spec.served_name.clone(),
            model_source: spec.model_source.clone(),
            engine_args: spec.engine_args.clone(),
            gpus_per_replica: spec.gpus_per_replica,
        }
    }
}

/// One endpoint as the driver runs it.
struct Endpoint {
    /// The generation the replicas in `replicas` were last ensured for.
    generation: i64,
    /// What the replicas run; a change of it replaces them all.
    engine: Option<EngineShape>,
    replicas: BTreeMap<u32, Replica>,
    /// Why `ensure` did not start what was asked (not enough free GPUs); replicas report their
    /// own failures.
    failure: Option<(FailureReason, String)>,
}

impl LocalDriver {
    /// Prepares `state_dir` and cleans up after a crashed predecessor: each recorded replica
    /// that still runs (same pid and same command line, or same start time) is stopped (SIGTERM,
    /// grace, SIGKILL) and every record is removed; logs are kept. The reconciler redeploys.
    pub async fn new(config: LocalConfig) -> Result<LocalDriver, DriverError> {
        if config.command.is_empty() {
            return Err(DriverError::Other("the local engine command is empty".into()));
        }
        tokio::fs::create_dir_all(&config.state_dir).await.map_err(|e| {
            DriverError::Other(format!(
                "cannot create the local state directory {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let state_lock = lock_state_dir(&config.state_dir)?;
        let stopped =
            records::clean_up(&config.state_dir, config.stop_grace).await.map_err(|e| {
                DriverError::Other(format!(
                    "cannot read the local state directory {}: {e}",
                    config.state_dir.display()
                ))
            })?;
        if stopped > 0 {
            tracing::info!(stopped, "stopped replicas left running by a previous budcluster");
        }
        // Health checks go to loopback only; a proxy from the environment must not see them.
        let http = reqwest::Client::builder().no_proxy().build().map_err(|e| {
            DriverError::Other(format!("cannot build the health-check client: {e}"))
        })?;
        let stop_all = CancellationToken::new();
        Ok(LocalDriver {
            context: Arc::new(Context { config, http }),
            endpoints: Mutex::new(HashMap::new()),
            changes: tokio::sync::Mutex::new(()),
            _stop_on_drop: stop_all.clone().drop_guard(),
            stop_all,
            _state_lock: state_lock,
        })
    }

    /// This machine as one node; GPUs held by replicas are not allocatable.
    pub async fn probe(&self) -> Result<Inventory, DriverError> {
        let held = gpus_held(&self.table(), None).len();
        let total = self.context.config.gpus;
        Ok(Inventory {
            nodes: 1,
            gpus_total: i64::from(total),
            gpus_allocatable: i64::from(total) - held as i64,
            device_plugin_running: false,
        })
    }

    /// Every endpoint in the table, with its replicas as their supervisors last saw them.
    pub async fn observe(&self) -> Result<Observation, DriverError> {
        let endpoints = self.table();
        let observation = endpoints
            .iter()
            .map(|(id, endpoint)| {
                let mut seen = ObservedEndpoint {
                    generation: endpoint.generation,
                    replicas: endpoint.replicas.len() as u32,
                    failure: endpoint.failure.clone(),
                    ..ObservedEndpoint::default()
                };
                for replica in endpoint.replicas.values() {
                    let status = replica.status();
                    if let (true, Some(port)) = (status.ready, status.port) {
                        seen.ready += 1;
                        seen.addresses.push(format!("127.0.0.1:{port}"));
                    }
                    if seen.failure.is_none() {
                        seen.failure = status.failure;
                    }
                }
                (*id, seen)
            })
            .collect();
        Ok(observation)
    }

    /// Runs replicas `0..spec.replicas` for `spec.generation`. Another engine (served name,
    /// source, engine arguments, GPUs per replica) replaces every replica; a new generation of
    /// the same engine restarts only the replicas that are not ready; extras are stopped highest
    /// index first; missing ones are started. Stopped replicas have exited when this returns.
    /// When the endpoint needs more GPUs than other endpoints leave free, nothing changes and
    /// `observe` reports `InsufficientGpus`.
    pub async fn ensure(&self, spec: &EndpointSpec) -> Result<(), DriverError> {
        let _changing = self.changes.lock().await;
        let leaving = {
            let mut endpoints = self.table();
            let free = (self.context.config.gpus as usize)
                .saturating_sub(gpus_held(&endpoints, Some(spec.id)).len());
            let needed = u64::from(spec.gpus_per_replica) * u64::from(spec.replicas);
            let endpoint = endpoints.entry(spec.id).or_insert_with(|| Endpoint {
                generation: spec.generation,
                engine: None,
                replicas: BTreeMap::new(),
                failure: None,
            });
            if needed > free as u64 {
                let detail = format!("needs {needed} GPUs, {free} free");
                endpoint.failure = Some((FailureReason::InsufficientGpus, detail));
                return Ok(());
            }
            endpoint.failure = None;
            let shape = EngineShape::of(spec);
            let mut leaving = if endpoint.engine.as_ref() != Some(&shape) {
                // Another engine command: every replica is replaced.
                endpoint.engine = Some(shape);
                std::mem::take(&mut endpoint.replicas)
            } else if endpoint.generation != spec.generation {
                // Same engine, newer generation (a scale, a retry, a restart): ready replicas
                // stay, the others start afresh with their backoff and failure counts reset.
                let (ready, not_ready): (BTreeMap<_, _>, BTreeMap<_, _>) =
                    std::mem::take(&mut endpoint.replicas)
                        .into_iter()
                        .partition(|(_, r)| r.status().ready);
                endpoint.replicas = ready;
                not_ready
            } else {
                BTreeMap::new()
            };
            endpoint.generation = spec.generation;
            leaving.append(&mut endpoint.replicas.split_off(&spec.replicas));
            leaving
        };
        stop_replicas(leaving).await;

        let mut endpoints = self.table();
        let mut free: BTreeSet<u32> = (0..self.context.config.gpus).collect();
        for gpu in gpus_held(&endpoints, None) {
            free.remove(&gpu);
        }
        let Some(endpoint) = endpoints.get_mut(&spec.id) else {
            return Ok(());
        };
        let shared_spec = Arc::new(spec.clone());
        for index in 0..spec.replicas {
            if endpoint.replicas.contains_key(&index) {
                continue;
            }
            // Enough GPUs are free: the check above counted every other endpoint's, and this
            // endpoint holds at most its own share.
            let gpus: Vec<u32> =
                free.iter().copied().take(spec.gpus_per_replica as usize).collect();
            for gpu in &gpus {
                free.remove(gpu);
            }
            let replica = Replica::start(
                self.context.clone(),
                shared_spec.clone(),
                index,
                gpus,
                self.stop_all.child_token(),
            );
            endpoint.replicas.insert(index, replica);
        }
        Ok(())
    }

    /// Stops every replica of the endpoint and waits for their processes to exit; records are
    /// removed, logs kept. Removing an unknown endpoint succeeds.
    pub async fn remove(&self, id: EndpointId) -> Result<(), DriverError> {
        let _changing = self.changes.lock().await;
        let endpoint = self.table().remove(&id);
        if let Some(endpoint) = endpoint {
            stop_replicas(endpoint.replicas).await;
        }
        records::remove_all(&self.context.config.state_dir.join(id.to_string())).await;
        Ok(())
    }

    /// The last `tail` lines of each replica's log, each headed `==> replica N <==`, replicas
    /// in index order; `NotFound` when the endpoint never ran here.
    pub async fn logs(&self, id: EndpointId, tail: usize) -> Result<String, DriverError> {
        let folder = self.context.config.state_dir.join(id.to_string());
        tokio::task::spawn_blocking(move || logs::endpoint_logs(&folder, tail))
            .await
            .map_err(|e| DriverError::Other(format!("reading logs failed: {e}")))?
    }

    /// Stops every replica, waiting for their processes to exit, and removes their records.
    pub async fn shutdown(&self) {
        let _changing = self.changes.lock().await;
        let endpoints = std::mem::take(&mut *self.table());
        let stops = endpoints.into_values().map(|endpoint| stop_replicas(endpoint.replicas));
        futures::future::join_all(stops).await;
    }

    fn table(&self) -> MutexGuard<'_, HashMap<EndpointId, Endpoint>> {
        lock(&self.endpoints)
    }
}

/// Takes `<state_dir>/lock`, or says which folder another budcluster holds.
fn lock_state_dir(state_dir: &Path) -> Result<Flock<std::fs::File>, DriverError> {
    let path = state_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| DriverError::Other(format!("cannot open {}: {e}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        DriverError::Other(format!(
            "another budcluster runs local replicas from {} ({errno}); stop it or give this one \
             another state directory",
            state_dir.display()
        ))
    })
}

/// Stops replicas highest index first, all at once, and returns when every process is gone.
async fn stop_replicas(replicas: BTreeMap<u32, Replica>) {
    let mut stopping = Vec::with_capacity(replicas.len());
    for (_, replica) in replicas.into_iter().rev() {
        replica.begin_stop();
        stopping.push(replica.stopped());
    }
    futures::future::join_all(stopping).await;
}

/// GPUs held by replicas of every endpoint but `except`.
fn gpus_held(endpoints: &HashMap<EndpointId, Endpoint>, except: Option<EndpointId>) -> Vec<u32> {
    endpoints
        .iter()
        .filter(|(id, _)| Some(**id) != except)
        .flat_map(|(_, endpoint)| endpoint.replicas.values())
        .flat_map(|replica| replica.gpus.iter().copied())
        .collect()
}

/// Locks a mutex whose data stays consistent even if a holder panicked (every critical section
/// here is a plain field update).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
