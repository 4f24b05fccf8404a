//! What the benchmark reads of the machine and its own run: cores, the CPU model, a working
//! directory, durations in ms. Shared by the audit and the calls runs.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// The cores available to this process.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A fresh working directory for the stores, removed when dropped: under `dir` (created if
/// missing) or the system temp dir.
pub(crate) fn work_dir(dir: Option<&Path>) -> Result<tempfile::TempDir> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            tempfile::tempdir_in(d)?
        }
        None => tempfile::tempdir()?,
    })
}

/// `d` in milliseconds, to the microsecond.
pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The CPU model from /proc/cpuinfo.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
