//! What Linux reports about a process: CPU time from `/proc/<pid>/stat`, resident memory from
//! `/proc/<pid>/status`, and CPU pinning through `taskset` (util-linux), which keeps this crate
//! free of `unsafe` calls to `sched_setaffinity`.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

/// A process as `/proc` names it: an id, or this process.
#[derive(Debug, Clone, Copy)]
pub enum Pid {
    This,
    Other(u32),
}

/// Converts the clock ticks `/proc` counts CPU time in.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    ticks_per_second: u64,
}

/// Resident memory of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most that was ever resident (the peak RSS).
    pub peak_kib: u64,
}

impl Clock {
    /// The kernel's `USER_HZ` (`getconf CLK_TCK`): 100 on every Linux this runs on, which gives
    /// CPU times to 10 ms; measured phases last seconds, so that is enough.
    pub fn new() -> Self {
        let ticks_per_second = Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100);
        Self { ticks_per_second }
    }

    /// User plus system CPU time the process has used so far, its ended threads included.
    pub fn cpu_time(&self, pid: Pid) -> anyhow::Result<Duration> {
        self.stat_cpu_time(&format!("{}/stat", proc_dir(pid)))
    }

    /// CPU time of the process's live threads, summed by thread name (threads of a pool share
    /// one): where the process's time goes. Threads that have ended are missing.
    pub fn cpu_by_thread(&self, pid: Pid) -> anyhow::Result<BTreeMap<String, Duration>> {
        let tasks = format!("{}/task", proc_dir(pid));
        let mut by_name = BTreeMap::new();
        for task in std::fs::read_dir(&tasks).with_context(|| format!("listing {tasks}"))? {
            let dir = task.with_context(|| format!("listing {tasks}"))?.path();
            // A thread that ended since the listing is skipped.
            let (Ok(name), Ok(cpu)) = (
                std::fs::read_to_string(dir.join("comm")),
                self.stat_cpu_time(&dir.join("stat").to_string_lossy()),
            ) else {
                continue;
            };
            *by_name.entry(name.trim().to_owned()).or_default() += cpu;
        }
        Ok(by_name)
    }

    fn stat_cpu_time(&self, path: &str) -> anyhow::Result<Duration> {
        let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let ticks = cpu_ticks(&stat).with_context(|| format!("{path} is not a stat line"))?;
        Ok(Duration::from_secs_f64(ticks as f64 / self.ticks_per_second as f64))
    }
}

impl Memory {
    pub fn read(pid: Pid) -> anyhow::Result<Self> {
        let path = format!("{}/status", proc_dir(pid));
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib = |name: &str| -> anyhow::Result<u64> {
            let line = status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .with_context(|| format!("{path} has no {name}"))?;
            let number = line.trim().trim_end_matches("kB").trim();
            number.parse().with_context(|| format!("{name} in {path} is not a number"))
        };
        Ok(Self { rss_kib: kib("VmRSS:")?, peak_kib: kib("VmHWM:")? })
    }
}

/// Pins this process to `cpus` (a list such as `1` or `2-3`). Call it before any thread is
/// started: threads inherit the affinity of the thread that starts them, and `-a` covers the
/// ones that exist.
pub fn pin_this_process(cpus: &str) -> anyhow::Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .output()
        .context("running taskset (util-linux) to pin the load generator")?;
    if !out.status.success() {
        bail!(
            "taskset -c {cpus} refused to pin the load generator: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may contain spaces and parentheses:
    // count the fields after its last closing parenthesis, which start at field 3 (state).
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn proc_dir(pid: Pid) -> String {
    match pid {
        Pid::This => "/proc/self".to_owned(),
        Pid::Other(pid) => format!("/proc/{pid}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (bud (bench) x) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 37 0 0 20 0 \
                    3 0 100 1000000 2000 18446744073709551615";
        assert_eq!(cpu_ticks(stat), Some(287));
        assert_eq!(cpu_ticks("4242 (short) S 1 2"), None);
    }

    #[test]
    fn this_process_has_a_cpu_time_and_memory() {
        let clock = Clock::new();
        assert!(clock.cpu_time(Pid::This).is_ok());
        assert!(!clock.cpu_by_thread(Pid::This).unwrap_or_default().is_empty());
        let memory = Memory::read(Pid::This).unwrap_or_default();
        assert!(memory.rss_kib > 0 && memory.peak_kib >= memory.rss_kib);
    }
}
