//! The seam between the control plane and the two ways of moving bytes.
//!
//! `connection.rs` owns a pair's lifecycle (accept, connect, limits, timeouts, the close
//! log line); a [`Relay`] only moves bytes between two connected sockets until both
//! directions are finished or one side fails. Both paths report through [`Progress`] so
//! the lifecycle code can enforce idle timeouts and log byte counts the same way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;

pub mod ebpf;
pub mod splice;

/// Byte counters a relay keeps current while it runs (read by idle timeout and logs).
#[derive(Debug, Default)]
pub struct Progress {
    pub to_upstream: AtomicU64,
    pub to_client: AtomicU64,
    /// Of those, bytes that went through our own memory (recv/send) rather than
    /// staying in the kernel: 0 on splice; on ebpf, what the in-flight bound and
    /// pre-pairing reads made us relay.
    pub via_userspace: AtomicU64,
}

impl Progress {
    pub fn total(&self) -> u64 {
        self.to_upstream.load(Ordering::Relaxed) + self.to_client.load(Ordering::Relaxed)
    }
}

/// Which socket of the pair something happened to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// How a relay ended, when it ended by itself.
#[derive(Debug)]
pub enum RelayEnd {
    /// Both directions saw EOF and passed it on after every byte.
    Closed,
    /// One side reset or failed; the other side has been reset too.
    Failed { side: Side, error: io::Error },
}

pub struct Pair {
    pub client: TcpStream,
    pub upstream: TcpStream,
}

pub type RelayFuture<'a> = Pin<Box<dyn Future<Output = RelayEnd> + Send + 'a>>;

/// A way to move bytes between the two sockets of a pair.
///
/// Dropping the returned future must close both sockets and release everything the
/// relay holds for the pair (the lifecycle code drops it on idle timeout and shutdown).
pub trait Relay: Send + Sync {
    /// `splice` or `ebpf`, as it appears in logs.
    fn path(&self) -> &'static str;
    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a>;
    /// How long after bytes moved `Progress` may still not show them (the idle timeout
    /// waits this much longer, so a pair is never cut while its bytes are being counted).
    fn progress_lag(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Makes the peer see a reset rather than a clean FIN when we close `sock`.
pub fn reset_on_close(sock: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(std::time::Duration::ZERO));
}

/// Errors that mean "the peer is gone", as opposed to a local failure.
pub fn describe(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ECONNRESET) => "reset",
        Some(libc::EPIPE) => "broken pipe",
        Some(libc::ETIMEDOUT) => "timed out",
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable",
        _ => "error",
    }
}
