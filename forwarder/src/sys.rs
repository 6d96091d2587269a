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

/// SIGTERM, SIGINT and SIGHUP: the signals the server handles (stop, reload).
fn handled_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Holds the signals the server handles (blocked, so they wait as pending) from before
/// the first listener is bound until [`release_handled_signals`], once their handlers
/// are in place. Until then their default action ends the process: a SIGHUP or SIGTERM
/// sent as soon as a client could connect killed it (up to 80 ms with the kernel path
/// and a privilege drop), resetting the client. Called while the process has one
/// thread: every thread made later (the runtime's) starts with them blocked, so they
/// reach only the thread that releases them.
pub fn hold_handled_signals() {
    if let Err(e) = handled_signals().thread_block() {
        tracing::warn!("cannot hold SIGTERM/SIGINT/SIGHUP during startup: {e}");
    }
}

/// Lets the held signals in on this thread: those that came meanwhile are delivered
/// now, to the handlers installed before this call.
pub fn release_handled_signals() {
    if let Err(e) = handled_signals().thread_unblock() {
        tracing::warn!("cannot unblock SIGTERM/SIGINT/SIGHUP: {e}");
    }
}
