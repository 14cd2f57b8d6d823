//! What the process costs: resident memory and open file descriptors, read from `/proc` (Linux),
//! and the descriptor limit a run needs. See `docs/performance.md`, "Simulations".

use std::fs;

/// Resident memory of this process, now and at its peak, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`.
    pub rss: u64,
    /// `VmHWM`: the highest `VmRSS` so far.
    pub peak: u64,
}

/// Read `VmRSS` and `VmHWM` from `/proc/self/status`; zeros where that is not available.
pub fn memory() -> Memory {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return Memory::default();
    };
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Memory {
        rss: field("VmRSS:"),
        peak: field("VmHWM:"),
    }
}

/// Descriptors this process holds open now (`/proc/self/fd`), if readable.
pub fn open_fds() -> Option<usize> {
    fs::read_dir("/proc/self/fd").ok().map(Iterator::count)
}

/// The soft limit on open descriptors (`Max open files` in `/proc/self/limits`), if readable.
pub fn fd_limit() -> Option<u64> {
    let limits = fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// CPU time (user + system) this process has used so far, in seconds (`/proc/self/stat`, at
/// the usual 100 ticks per second).
pub fn cpu_seconds() -> Option<f64> {
    let stat = fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; the fields after it are plain.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the whole line, utime 14 and stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Mebibytes, for printing.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let m = memory();
        assert!(m.rss > 1024 * 1024, "a running test uses more than 1 MiB");
        assert!(m.peak >= m.rss);
        assert!(open_fds().is_some_and(|n| n >= 3));
        assert!(fd_limit().is_some_and(|n| n >= 64));
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
