//! What the local driver asks of the operating system about processes: signals, whether a pid
//! is still the process it was, free ports. Linux only (`/proc`).

use std::io;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::process::Child;

/// A port on 127.0.0.1 that was free a moment ago. Another process may take it before the
/// engine binds it; the engine then exits and is restarted on another port.
pub(super) fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Sends `signal` to the process group led by `pid`: replicas are started as group leaders, so
/// an engine's worker processes get it too. False when no such group exists.
pub(super) fn signal_group(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid).is_ok_and(|raw| killpg(Pid::from_raw(raw), signal).is_ok())
}

/// Sends `signal` to `pid` alone.
pub(super) fn signal_process(pid: u32, signal: Signal) -> bool {
    i32::try_from(pid).is_ok_and(|raw| kill(Pid::from_raw(raw), signal).is_ok())
}

/// Stops a child: SIGTERM to its group, up to `grace` for it to exit, then SIGKILL. Returns
/// once the child has been waited for, with how it ended.
pub(super) async fn terminate(child: &mut Child, pid: u32, grace: Duration) -> String {
    // The child is not waited for yet, so its pid (and group id) cannot have been reused.
    if !signal_group(pid, Signal::SIGTERM) {
        signal_process(pid, Signal::SIGTERM);
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal_group(pid, Signal::SIGKILL);
            // Kills and waits for the child itself should it have left its group.
            let _ = child.start_kill();
            child.wait().await
        }
    };
    describe_exit(&status)
}

/// How a process ended, in words for a log line or a failure detail.
pub(super) fn describe_exit(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(name) => format!("killed by {name}"),
                Err(_) => format!("killed by signal {signal}"),
            },
            (None, None) => status.to_string(),
        },
        Err(e) => format!("unknown exit ({e})"),
    }
}

/// Whether `pid` is a live process (a zombie is not: it has exited, only its parent has not
/// collected it).
pub(super) fn is_alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|state| *state != "Z"))
}

/// When `pid` started, in clock ticks after boot (`/proc/<pid>/stat` field 22). With the pid,
/// it names one process even if the process rewrites its command line.
pub(super) fn start_ticks(pid: u32) -> Option<u64> {
    // Fields after the command name start at field 3 (state); start time is field 22.
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// `pid`'s argv as the kernel shows it; empty for a zombie.
pub(super) fn cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // The kernel ends each argument with a NUL.
    let Some(raw) = raw.strip_suffix(&[0]) else { return Some(Vec::new()) };
    Some(raw.split(|b| *b == 0).map(|arg| String::from_utf8_lossy(arg).into_owned()).collect())
}

/// The fields of `/proc/<pid>/stat` after the command name, which is in parentheses and may
/// itself hold spaces and parentheses.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_has_a_start_time_and_cmdline() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(start_ticks(me).is_some());
        let argv = cmdline(me).unwrap();
        assert_eq!(argv.len(), std::env::args().count());
    }

    #[test]
    fn exits_are_described_for_people() {
        assert_eq!(describe_exit(&Ok(ExitStatus::from_raw(1 << 8))), "exit status 1");
        assert_eq!(describe_exit(&Ok(ExitStatus::from_raw(9))), "killed by SIGKILL");
    }
}
