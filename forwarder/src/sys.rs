//! Process-wide setup that has nothing to do with any one connection.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Each pair costs two sockets and four pipe fds: take every fd the hard limit allows.
pub fn raise_fd_limit() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
            } else {
                tracing::debug!("RLIMIT_NOFILE raised from {soft} to {hard}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read RLIMIT_NOFILE: {e}"),
    }
}
