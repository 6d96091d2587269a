//! Process-wide setup that has nothing to do with any one connection.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Each pair costs two sockets (and, while bytes wait in them, two pipes): take every
/// fd we may. As root (CAP_SYS_RESOURCE) that means raising the hard limit too, up to
/// the kernel's `fs.nr_open`, so 100k pairs need no ulimit tuning; otherwise the soft
/// limit goes up to the hard one.
pub fn raise_fd_limit() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(l) => l,
        Err(e) => return tracing::warn!("cannot read RLIMIT_NOFILE: {e}"),
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    if let Some(max) = nr_open.filter(|&m| m > hard) {
        match setrlimit(Resource::RLIMIT_NOFILE, max, max) {
            Ok(()) => return tracing::debug!("RLIMIT_NOFILE raised from {soft}:{hard} to {max}"),
            // Not privileged: the hard limit stays where it is.
            Err(e) => tracing::debug!("cannot raise RLIMIT_NOFILE's hard limit to {max}: {e}"),
        }
    }
    if soft < hard {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!("RLIMIT_NOFILE raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}"),
        }
    }
}
