//! The seam between the control plane and the two ways of moving bytes.
//!
//! `connection.rs` owns a pair's lifecycle (accept, connect, limits, timeouts, the close
//! log line); a [`Relay`] only moves bytes between two connected sockets until both
//! directions are finished or one side fails. Both paths report through [`Progress`] so
//! the lifecycle code can enforce idle timeouts and log byte counts the same way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::inspect::dump::Dump;
use crate::inspect::rewrite::Rewriter;
use crate::metrics::RuleStats;

pub mod copy;
pub mod ebpf;
pub(crate) mod pace;
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
    /// The ways bytes actually moved, in order (see [`Progress::enter`]).
    hops: AtomicU32,
    /// Who holds bytes read from one socket and not yet written to the other (a
    /// check's undecided prefix, a rewrite's possible match), one bit each: a pair cut
    /// meanwhile must be reset, its socket queues may well be empty.
    held: std::sync::atomic::AtomicU8,
    /// When bytes last moved, in ms since [`epoch`] (see [`Progress::touch`]).
    last_active_ms: AtomicU64,
    /// When the client was accepted, in µs since [`epoch`] (kept here, in an
    /// allocation that has room for it, rather than in the pair's task).
    started_us: u64,
    /// Told the first path the pair's bytes take (`forwarder_connections_total`).
    stats: Option<Arc<RuleStats>>,
}

/// A process-wide origin for the coarse timestamps in [`Progress`]; set when the
/// first rule is made ([`crate::connection::RuleRuntime::new`]), before any accept.
pub fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// One way of moving a pair's bytes, as the close line's `path=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    Splice = 1,
    Ebpf = 2,
    /// Through our memory, for the whole life of the pair (`rewrite`).
    Copy = 3,
}

impl Hop {
    pub const ALL: [Hop; 3] = [Hop::Splice, Hop::Ebpf, Hop::Copy];

    pub fn as_str(self) -> &'static str {
        match self {
            Hop::Splice => "splice",
            Hop::Ebpf => "ebpf",
            Hop::Copy => "copy",
        }
    }
}

/// Hops kept per pair (4 bits each); later switches are not recorded.
const MAX_HOPS: u32 = 8;

impl Progress {
    /// Progress for a pair of a rule whose metrics count it once it starts, whose
    /// client was accepted at `started`.
    pub fn counted_in(stats: Arc<RuleStats>, started: std::time::Instant) -> Progress {
        Progress {
            stats: Some(stats),
            started_us: started.saturating_duration_since(epoch()).as_micros() as u64,
            ..Default::default()
        }
    }

    /// When the client was accepted (as given to [`Progress::counted_in`]).
    pub fn started(&self) -> std::time::Instant {
        epoch() + std::time::Duration::from_micros(self.started_us)
    }

    /// The rule whose metrics count this pair, if any.
    pub fn stats(&self) -> Option<&Arc<RuleStats>> {
        self.stats.as_ref()
    }

    /// Notes that bytes moved now. Relays call it once per burst, so the idle timeout
    /// can sleep until exactly when it would expire instead of polling the counters.
    /// Returns the time it noted (ms since the process's epoch).
    pub fn touch(&self) -> u64 {
        let now = epoch().elapsed().as_millis() as u64;
        self.last_active_ms.store(now, Ordering::Relaxed);
        now
    }

    /// [`Progress::hold`]'s `who` for the inspection prelude.
    pub const HELD_BY_PRELUDE: u8 = 1;

    /// [`Progress::hold`]'s `who` for the copy path's rewriter of direction `d` (0: to
    /// the upstream).
    pub const fn held_by_rewriter(d: usize) -> u8 {
        2 << d
    }

    /// [`Progress::hold`]'s `who` for the splice path's direction `d` copying through
    /// its own buffer for want of a pipe.
    pub const fn held_without_pipe(d: usize) -> u8 {
        8 << d
    }

    /// Notes whether `who` (a bit of its own) holds bytes in our memory now.
    pub fn hold(&self, who: u8, holding: bool) {
        if holding {
            self.held.fetch_or(who, Ordering::Relaxed);
        } else {
            self.held.fetch_and(!who, Ordering::Relaxed);
        }
    }

    /// Whether bytes read from one socket wait in our memory for the other.
    pub fn holds_bytes(&self) -> bool {
        self.held.load(Ordering::Relaxed) != 0
    }

    /// How long since bytes last moved (or since the pair was made).
    pub fn idle_for(&self) -> std::time::Duration {
        let now = epoch().elapsed().as_millis() as u64;
        let last = self.last_active_ms.load(Ordering::Relaxed);
        std::time::Duration::from_millis(now.saturating_sub(last))
    }

    /// Records that the pair's bytes now move by `hop`. Called by a relay when it really
    /// starts moving bytes, so `path=` is what happened, not what was configured: an
    /// ebpf pair the maps refused says `splice`, one that left them `ebpf>splice`.
    pub fn enter(&self, hop: Hop) {
        let before = self
            .hops
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                let n = (32 - h.leading_zeros()).div_ceil(4);
                let last = if n == 0 {
                    0
                } else {
                    (h >> (4 * (n - 1))) & 0xf
                };
                (n < MAX_HOPS && last != hop as u32).then(|| h | (hop as u32) << (4 * n))
            });
        if let (Ok(0), Some(stats)) = (before, &self.stats) {
            stats.started(hop);
        }
    }

    /// `splice`, `ebpf`, `ebpf>splice`, ...; `none` when no relay started.
    pub fn path(&self) -> PathName {
        PathName(self.hops.load(Ordering::Relaxed))
    }
}

/// The close line's `path=`: the hops as recorded (4 bits each, oldest lowest),
/// formatted only when the line is.
pub struct PathName(u32);

impl std::fmt::Display for PathName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut h = self.0;
        if h == 0 {
            return f.write_str("none");
        }
        let mut first = true;
        while h != 0 {
            if !first {
                f.write_str(">")?;
            }
            f.write_str(
                Hop::ALL
                    .iter()
                    .find(|hop| **hop as u32 == h & 0xf)
                    .map_or("?", |hop| hop.as_str()),
            )?;
            h >>= 4;
            first = false;
        }
        Ok(())
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
    /// Ended for a reason of its own, named as the close line's `end=` (a tunnel
    /// stream whose agent did not come back: `agent_lost`). Both sides were reset.
    Ended(&'static str),
    /// The upstream could not be connected after all: a tunnel agent's target
    /// (`why`, as the agent says it). Named `connect_failed` as a rule's refused
    /// upstream is, and counted as a connect error.
    ConnectFailed(String),
    /// An inspection check refused the client (`reason` as in the `refused` line).
    Refused {
        reason: &'static str,
        detail: String,
    },
}

pub struct Pair {
    pub client: TcpStream,
    pub upstream: TcpStream,
    /// For a tunnel stream: `upstream` is its first data connection, and this is the
    /// rest of what the tunnel relay needs (see `crate::tunnel::stream`).
    pub tunnel: Option<Box<crate::tunnel::stream::Link>>,
}

/// What the inspection prelude leaves to the relay it hands a pair to.
#[derive(Default)]
pub struct Handover {
    /// The connection's dump, while a direction still has bytes to show: the relay
    /// shows them as they pass (each read bounded by what the dump still wants, so only
    /// the dumped bytes cross our memory), then goes on as usual.
    pub dump: Option<Box<Dump>>,
    /// A `rewrite` rule's rewriters, [to_upstream, to_client], as the prelude left
    /// them (the prelude rewrote what it passed on; a match may span the handover).
    pub rewriters: Option<Box<[Rewriter; 2]>>,
    /// For a tunnel stream: what the prelude passed on, which the stream's
    /// accounting for a lost link (retention, acks, resume) must include.
    pub passed: Option<Box<Passed>>,
}

/// What the prelude passed on between a tunnel stream's visitor and its data
/// connection (see `crate::tunnel::stream`).
#[derive(Default)]
pub struct Passed {
    /// The bytes it sent on the data connection: kept until the agent acknowledges
    /// them, and sent again on a reattach, like every byte the stream sends.
    pub sent: Vec<u8>,
    /// How many bytes it read from the data connection (delivered and acknowledged).
    pub received: u64,
    /// It read the visitor's EOF (which a tunnel passes on as a `Fin` frame).
    pub eof: bool,
    /// The stream's events that came while it ran (acks, the peer's FIN, a new data
    /// connection), in order, for the stream to take as if they came now.
    pub events: Vec<crate::tunnel::stream::Event>,
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
    /// [`Relay::relay`] for a pair whose sockets the inspection prelude has read from
    /// (maybe partway through a segment), with what the prelude leaves to do. Every
    /// relay the prelude wraps (splice, ebpf, copy, tunnel streams) implements it;
    /// the default is for the prelude itself, which is never wrapped.
    fn relay_after_prelude<'a>(
        &'a self,
        pair: Pair,
        progress: Arc<Progress>,
        handover: Handover,
    ) -> RelayFuture<'a> {
        debug_assert!(handover.dump.is_none() && handover.rewriters.is_none());
        debug_assert!(handover.passed.is_none());
        self.relay(pair, progress)
    }
    /// How long after bytes moved `Progress` may still not show them (the idle timeout
    /// waits this much longer, so a pair is never cut while its bytes are being counted).
    fn progress_lag(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

/// Passes a FIN on: shuts `sock`'s write side, after whatever is queued on it. A
/// socket the peer has already closed (ENOTCONN) has nothing left to tell.
pub fn pass_fin(sock: &impl std::os::fd::AsFd) -> io::Result<()> {
    match socket2::SockRef::from(sock).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        r => r,
    }
}

/// Makes the peer see a reset rather than a clean FIN when we close `sock`.
pub fn reset_on_close(sock: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(sock).set_linger(Some(std::time::Duration::ZERO));
}

/// Undoes [`reset_on_close`]: closing `sock` sends a FIN after what is queued.
pub fn close_cleanly(sock: &impl std::os::fd::AsFd) {
    let _ = socket2::SockRef::from(sock).set_linger(None);
}

/// Resets `sock` now, not at its close: connect(AF_UNSPEC) runs tcp_disconnect, which
/// sends the RST, drops both queues, takes the socket out of any sockmap and leaves it
/// closed, all under its lock, so nothing written into it from then on goes out. The
/// kernel path needs it: closed in a sockmap, a socket can still get bytes from the
/// wrong offsets from its psock's redirect worker before the reset (6.18; see "Reset
/// now, not at close" in docs/ARCHITECTURE.md). The linger is set as well, so the
/// close still resets should the disconnect fail.
pub fn reset_now(sock: &impl std::os::fd::AsFd) {
    use std::os::fd::AsRawFd;
    reset_on_close(sock);
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: a valid sockaddr of the length given, on an fd `sock` keeps open.
    unsafe {
        libc::connect(
            sock.as_fd().as_raw_fd(),
            &unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
}

/// A relay that fails resets BOTH sides when it closes them: the side it blames may
/// not know anything went wrong (our own error: out of fds, a failed check), and a
/// clean FIN would show it a cut stream as complete. A side whose peer already reset
/// loses nothing by it.
pub fn reset_both_on_close(a: &impl std::os::fd::AsFd, b: &impl std::os::fd::AsFd) {
    reset_on_close(a);
    reset_on_close(b);
}

/// [`reset_both_on_close`] for a pair whose sockets may be in the sockmaps: both reset
/// now (see [`reset_now`]), `a` first.
pub fn reset_both_now(a: &impl std::os::fd::AsFd, b: &impl std::os::fd::AsFd) {
    reset_now(a);
    reset_now(b);
}

/// Errors that mean "the peer is gone", as opposed to a local failure.
pub fn describe(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        // EPIPE on a TCP socket we have not shut down is a reset too: the peer's RST
        // is reported once (ECONNRESET) to whichever of our reads and writes meets it
        // first, and every later write on that socket gets EPIPE.
        Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset",
        Some(libc::ETIMEDOUT) => "timed out",
        Some(libc::EHOSTUNREACH) | Some(libc::ENETUNREACH) => "unreachable",
        Some(_) => "error",
        // Ours, not the kernel's: a reset reported from the far end of a tunnel is
        // a reset as much as a local RST is.
        None => match error.kind() {
            io::ErrorKind::ConnectionReset => "reset",
            io::ErrorKind::TimedOut => "timed out",
            _ => "error",
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_names_every_hop_in_order() {
        let p = Progress::default();
        assert_eq!(p.path().to_string(), "none");
        p.enter(Hop::Ebpf);
        p.enter(Hop::Ebpf);
        assert_eq!(p.path().to_string(), "ebpf");
        p.enter(Hop::Splice);
        p.enter(Hop::Ebpf);
        assert_eq!(p.path().to_string(), "ebpf>splice>ebpf");
        for _ in 0..10 {
            p.enter(Hop::Splice);
            p.enter(Hop::Ebpf);
        }
        assert_eq!(p.path().to_string().split('>').count(), MAX_HOPS as usize);
    }

    /// What the kernel path relies on: after `reset_now` the peer gets what was sent
    /// before and then the reset, while our socket is still open, and nothing written
    /// into it afterwards goes out.
    #[test]
    fn reset_now_resets_at_once_and_sends_nothing_after() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut ours, _) = l.accept().unwrap();
        ours.write_all(b"before").unwrap();
        reset_now(&ours);
        peer.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 6];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"before");
        let after = peer.read(&mut got);
        assert_eq!(
            after.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the peer must see the reset with our socket still open"
        );
        assert!(ours.write(b"after").is_err(), "a reset socket took bytes");
    }
}
