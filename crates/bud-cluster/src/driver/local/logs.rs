//! Replica log files: the engine's stdout and stderr, with the driver's own lines (`--- … ---`)
//! between runs, and reading their tails back.
//!
//! Files are written with blocking calls from async tasks: each is a single small append to a
//! local file, cheaper than a hop to the blocking pool.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};

use crate::driver::DriverError;

/// Reading a tail goes back at most this far in a file, whatever `tail` asks for.
const MAX_TAIL_BYTES: u64 = 8 << 20;

/// Opens (creating it and its folder) a replica's log for appending.
pub(super) fn open(path: &Path) -> io::Result<File> {
    if let Some(folder) = path.parent() {
        std::fs::create_dir_all(folder)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Appends one of the driver's own lines, `--- {text} at {now} ---`; a log that cannot be
/// written is reported, not fatal.
pub(super) fn note(log: &mut File, text: &str) {
    let now = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    if let Err(e) = writeln!(log, "--- {text} at {now} ---") {
        tracing::warn!(error = %e, "cannot write a replica log");
    }
}

/// The last `n` lines written to `path` after byte `from`.
pub(super) fn tail(path: &Path, from: u64, n: usize) -> io::Result<Vec<String>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let floor = from.max(len.saturating_sub(MAX_TAIL_BYTES)).min(len);
    let mut start = len;
    let mut bytes = Vec::new();
    let mut line_ends = 0;
    // Read backwards until the buffer holds more than `n` line ends: the lines after the first
    // line end are then whole.
    while start > floor && line_ends <= n {
        let chunk = (start - floor).min(64 << 10);
        start -= chunk;
        let mut block = vec![0; chunk as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block)?;
        line_ends += block.iter().filter(|b| **b == b'\n').count();
        block.extend_from_slice(&bytes);
        bytes = block;
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    Ok(lines[lines.len().saturating_sub(n)..].iter().map(|l| (*l).to_owned()).collect())
}

/// Every replica log in an endpoint's folder, index order, each headed `==> replica N <==`
/// with its last `n` lines.
pub(super) fn endpoint_logs(folder: &Path, n: usize) -> Result<String, DriverError> {
    let entries = match std::fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DriverError::NotFound),
        Err(e) => return Err(DriverError::Other(format!("cannot read {}: {e}", folder.display()))),
    };
    let mut logs: Vec<(u32, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let index =
                name.to_str()?.strip_prefix("replica-")?.strip_suffix(".log")?.parse().ok()?;
            Some((index, entry.path()))
        })
        .collect();
    logs.sort();
    let mut out = String::new();
    for (index, path) in logs {
        let lines = tail(&path, 0, n)
            .map_err(|e| DriverError::Other(format!("cannot read {}: {e}", path.display())))?;
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&format!("==> replica {index} <==\n"));
        for line in lines {
            out.push_str(&line);
            out.push('\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica-0.log");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let (_dir, path) = file_with("a\nb\nc\nd\n");
        assert_eq!(tail(&path, 0, 2).unwrap(), ["c", "d"]);
        assert_eq!(tail(&path, 0, 10).unwrap(), ["a", "b", "c", "d"]);
        assert!(tail(&path, 0, 0).unwrap().is_empty());
    }

    #[test]
    fn tail_reads_only_after_the_offset_and_keeps_an_unfinished_line() {
        let (_dir, path) = file_with("old\nnew\npartial");
        assert_eq!(tail(&path, 4, 10).unwrap(), ["new", "partial"]);
    }

    #[test]
    fn tail_crosses_read_blocks() {
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let (_dir, path) = file_with(&text);
        let lines = tail(&path, 0, 15_000).unwrap();
        assert_eq!(lines.len(), 15_000);
        assert_eq!(lines[0], "line 5000");
        assert_eq!(lines[14_999], "line 19999");
    }
}
