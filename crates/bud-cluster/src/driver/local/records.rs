//! Replica records: one small JSON file per running replica process, so that the next
//! budcluster can stop what a crashed one left running.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use super::process;

/// A replica process as started; written when it starts, removed when it is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    pub pid: u32,
    pub port: u16,
    /// The argv it was started with: a live pid whose command line differs is another process
    /// that reused the pid.
    pub argv: Vec<String>,
    pub generation: i64,
    pub started_at: DateTime<Utc>,
    /// Start time in clock ticks after boot: identifies the process even when an engine
    /// rewrites its command line (process titles). Absent in records that could not read it.
    #[serde(default)]
    pub start_ticks: Option<u64>,
}

impl Record {
    /// Whether the process this record names still runs.
    fn still_runs(&self) -> bool {
        if !process::is_alive(self.pid) {
            return false;
        }
        let same_start =
            self.start_ticks.is_some() && process::start_ticks(self.pid) == self.start_ticks;
        same_start
            || process::cmdline(self.pid).is_some_and(|cmdline| same_command(&self.argv, &cmdline))
    }
}

/// Whether a process's command line is what `argv` started. Exactly, or as the kernel rewrites
/// a script (`vllm serve …` runs as `/usr/bin/python3 /usr/local/bin/vllm serve …`) or a shim
/// execs the real program: the arguments end the command line, preceded by the program under
/// the same file name.
fn same_command(argv: &[String], cmdline: &[String]) -> bool {
    let file_name = |program: &str| Path::new(program).file_name().map(|n| n.to_owned());
    match argv.split_first() {
        None => false,
        Some(_) if argv == cmdline => true,
        Some((program, args)) => {
            cmdline.len() > args.len()
                && cmdline.ends_with(args)
                && file_name(&cmdline[cmdline.len() - args.len() - 1]) == file_name(program)
        }
    }
}

/// Writes `record` so that a reader sees the old file or the new one, never half of one.
pub(super) fn write(path: &Path, record: &Record) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Removes a record; one already gone is fine.
pub(super) fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a replica record");
    }
}

/// Removes every record (and half-written record) in one endpoint's folder.
pub(super) async fn remove_all(folder: &Path) {
    for path in record_files(folder).await {
        remove(&path);
    }
}

/// Stops every recorded process under `state_dir` that still runs (SIGTERM to its group, up to
/// `grace`, then SIGKILL) and removes all records. Returns how many processes it stopped.
pub(super) async fn clean_up(state_dir: &Path, grace: Duration) -> io::Result<usize> {
    let mut survivors = Vec::new();
    let mut folders = tokio::fs::read_dir(state_dir).await?;
    while let Some(entry) = folders.next_entry().await? {
        if !entry.file_type().await?.is_dir() {
            continue;
        }
        for path in record_files(&entry.path()).await {
            let parsed = match tokio::fs::read(&path).await {
                Ok(bytes) => serde_json::from_slice::<Record>(&bytes).ok(),
                Err(_) => None,
            };
            if let Some(record) = parsed.filter(Record::still_runs) {
                tracing::info!(
                    pid = record.pid,
                    record = %path.display(),
                    "stopping a replica left running by a previous budcluster"
                );
                survivors.push(record);
            }
            remove(&path);
        }
    }
    let stops = survivors.iter().map(|record| stop(record.pid, grace));
    futures::future::join_all(stops).await;
    Ok(survivors.len())
}

/// Stops a process that is not our child: we cannot wait for it, so we watch `/proc`.
async fn stop(pid: u32, grace: Duration) {
    // A replica leads its process group; a process recorded by other means may not.
    let signal = |signal| {
        if !process::signal_group(pid, signal) {
            process::signal_process(pid, signal);
        }
    };
    signal(Signal::SIGTERM);
    if gone_within(pid, grace).await {
        return;
    }
    signal(Signal::SIGKILL);
    if !gone_within(pid, Duration::from_secs(5)).await {
        tracing::warn!(pid, "a replica left by a previous budcluster survived SIGKILL");
    }
}

async fn gone_within(pid: u32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while process::is_alive(pid) {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// `replica-<n>.json` and `replica-<n>.json.tmp` files in `folder`; none when it is missing.
async fn record_files(folder: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(folder).await else {
        return found;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("replica-") && (name.ends_with(".json") || name.ends_with(".json.tmp"))
        {
            found.push(entry.path());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_command_is_recognised_through_scripts_and_shims() {
        let argv = strings(&["vllm", "serve", "m", "--port", "8001"]);
        assert!(same_command(&argv, &argv));
        let script =
            strings(&["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "m", "--port", "8001"]);
        assert!(same_command(&argv, &script));
        let other_port =
            strings(&["/usr/bin/python3", "/usr/local/bin/vllm", "serve", "m", "--port", "8002"]);
        assert!(!same_command(&argv, &other_port));
        let other_program =
            strings(&["/usr/bin/python3", "/usr/local/bin/sglang", "serve", "m", "--port", "8001"]);
        assert!(!same_command(&argv, &other_program));
        assert!(!same_command(&argv, &strings(&["sleep", "30"])));
        assert!(!same_command(&argv, &[]));
    }
}
