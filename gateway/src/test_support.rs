//! Helpers of unit tests.

/// The process's resident memory in bytes (`/proc/self/statm`), for memory-per-item tests.
pub(crate) fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Held by tests that measure [`resident_bytes`], so two of them never measure each other.
pub(crate) static MEASURING: std::sync::Mutex<()> = std::sync::Mutex::new(());
