//! epoll + splice(2): bytes go socket -> pipe -> socket inside the kernel, one pipe per
//! direction, driven by tokio's (edge-triggered epoll) readiness on the two sockets.
//!
//! The pipes are never polled: we count the bytes we put in each pipe ourselves, so
//! an EAGAIN from `splice(pipe -> socket)` can only mean "socket send buffer full".
//! The other EAGAIN is ambiguous: `splice(socket -> pipe)` also fails with EAGAIN when
//! the pipe has no free slot, even if our byte count says there is room (slots hold
//! partial pages). Clearing the socket's readiness on that EAGAIN would lose the edge
//! and stall the direction, so we only let tokio clear it when the pipe is empty, where
//! EAGAIN can only mean "socket empty".

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{reset_both_on_close, Hop, Pair, Progress, Relay, RelayEnd, RelayFuture, Side};

/// Pipe capacity we ask for; bounds the bytes held per direction in userspace-owned
/// kernel memory. Larger pipes mean fewer syscalls per byte.
pub const PIPE_SIZE: usize = 1 << 20;

pub struct SpliceRelay;

impl Relay for SpliceRelay {
    fn path(&self) -> &'static str {
        "splice"
    }

    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        Box::pin(async move { relay(pair, &progress).await })
    }
}

/// Which end of a direction failed.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// How a direction's pump stopped without failing.
enum PumpEnd {
    /// EOF passed on after every byte.
    Eof,
    /// The pair is worth the kernel path and both directions are quiet now.
    Promote,
}

pub async fn relay(pair: Pair, progress: &Progress) -> RelayEnd {
    match relay_until(pair, progress, None).await {
        Ok(end) => end,
        Err(_) => unreachable!("no promotion asked for"),
    }
}

/// Bursts (a direction waking up to move bytes, then going quiet again) a pair must
/// have made before it is moved to the kernel path: an interactive pair, which is what
/// that path is good at. A short request/response or an idle pair never pays for the
/// maps; a bulk pair rarely goes quiet and would leave again at the in-flight bound.
pub const PROMOTE_AFTER_BURSTS: u32 = 16;

/// Relays until both directions are finished, or, with `promote`, until the pair has
/// made [`PROMOTE_AFTER_BURSTS`] bursts and both directions are quiet with empty
/// pipes: then it hands the pair back (`Err`), nothing of it held by us. Both sockets
/// were read to EAGAIN then (no partly read skb: whatever arrived since came whole),
/// so the pair may join a sockmap at once.
pub async fn relay_until(
    pair: Pair,
    progress: &Progress,
    promote: Option<u32>,
) -> Result<RelayEnd, Pair> {
    progress.enter(Hop::Splice);
    let quiet = Quiet {
        waiting: [AtomicBool::new(false), AtomicBool::new(false)],
        bursts: AtomicU32::new(0),
        promote_after: promote.unwrap_or(u32::MAX),
    };
    match pumps(&pair, progress, &quiet).await {
        // The other pump waited for readiness with no pipe: dropping it lost nothing
        // (bytes that just arrived stay in its socket).
        None => Err(pair),
        Some(RelayEnd::Failed { side, error }) => {
            reset_both_on_close(&pair.client, &pair.upstream);
            Ok(RelayEnd::Failed { side, error })
        }
        Some(end) => Ok(end),
    }
}

/// Runs both directions: `None` when one of them asks for promotion.
async fn pumps(pair: &Pair, progress: &Progress, quiet: &Quiet) -> Option<RelayEnd> {
    let (c, u) = (&pair.client, &pair.upstream);
    let up = pump(c, u, progress, quiet, 0);
    let down = pump(u, c, progress, quiet, 1);
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    let (side, error) = loop {
        let (result, from, to) = tokio::select! {
            r = &mut up, if !up_done => { up_done = true; (r, Side::Client, Side::Upstream) }
            r = &mut down, if !down_done => { down_done = true; (r, Side::Upstream, Side::Client) }
            // A side we no longer read from would only show its reset on our next write
            // to it, which may never come: watch it for errors directly.
            e = socket_error(c), if up_done => break (Side::Client, e),
            e = socket_error(u), if down_done => break (Side::Upstream, e),
        };
        match result {
            Ok(PumpEnd::Promote) => return None,
            Ok(PumpEnd::Eof) if up_done && down_done => return Some(RelayEnd::Closed),
            Ok(PumpEnd::Eof) => {}
            Err(PumpError::Read(e)) => break (from, e),
            Err(PumpError::Write(e)) => break (to, e),
        }
    };
    Some(RelayEnd::Failed { side, error })
}

/// What the two pumps of a pair tell each other for promotion.
struct Quiet {
    /// Direction d waits for bytes with no pipe (nothing of it held by us) on a socket
    /// it read to EAGAIN.
    waiting: [AtomicBool; 2],
    bursts: AtomicU32,
    promote_after: u32,
}

impl Quiet {
    /// Direction `d` is about to wait for bytes: whether the pair should be promoted
    /// instead (enough bursts, and the other direction waits too).
    fn going_quiet(&self, d: usize) -> bool {
        let bursts = self.bursts.fetch_add(1, Ordering::Relaxed) + 1;
        bursts >= self.promote_after && self.waiting[1 - d].load(Ordering::Relaxed)
    }
}

/// Resolves with the socket's pending error (a reset, say) once epoll reports one.
pub(crate) async fn socket_error(sock: &TcpStream) -> io::Error {
    loop {
        if let Err(e) = sock.ready(Interest::ERROR).await {
            return e;
        }
        match sock.take_error() {
            Ok(Some(e)) => return e,
            Err(e) => return e,
            // Spurious, or already taken by a failing splice: clear it and keep watching.
            Ok(None) => {
                let _ = sock.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// Moves one direction until EOF (then passes the FIN on) or an error.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    progress: &Progress,
    quiet: &Quiet,
    d: usize,
) -> Result<PumpEnd, PumpError> {
    let moved = [&progress.to_upstream, &progress.to_client][d];
    // An idle direction holds no pipe (two fds and up to PIPE_SIZE of pages): it takes
    // one from the pool when bytes (or the EOF) arrive and hands it back as soon as it
    // is empty again, as HAProxy does. An idle pair then holds just its two sockets.
    let mut pipe: Option<Pipe> = None;
    // The last read found the socket empty (or none was made): no skb of it is
    // partly read.
    let mut drained = true;
    let mut no_pipe_since: Option<std::time::Instant> = None;
    let mut in_pipe = 0usize;
    let mut eof = false;
    loop {
        let p = match &mut pipe {
            Some(p) => p,
            None => {
                quiet.waiting[d].store(drained, Ordering::Relaxed);
                src.readable().await.map_err(PumpError::Read)?;
                quiet.waiting[d].store(false, Ordering::Relaxed);
                match Pipe::take() {
                    Ok(p) => {
                        no_pipe_since = None;
                        pipe.insert(p)
                    }
                    Err(e) if crate::server::is_resource_exhaustion(&e) => {
                        // Out of fds: an EOF needs no pipe, and bytes wait in the
                        // socket (TCP's backpressure) a while for one to free up. Not
                        // for ever: pairs that all wait, each holding its sockets,
                        // would keep every fd taken.
                        if src.peek(&mut [0u8; 1]).await.map_err(PumpError::Read)? == 0 {
                            return pass_fin(dst).map(|()| PumpEnd::Eof);
                        }
                        let since = *no_pipe_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() >= NO_PIPE_PATIENCE {
                            return Err(PumpError::Read(e));
                        }
                        tokio::time::sleep(NO_PIPE_RETRY).await;
                        continue;
                    }
                    Err(e) => return Err(PumpError::Read(e)),
                }
            }
        };
        // A busy pair never has to wait for readiness: yield now and then so it
        // cannot starve the other connections on this worker thread.
        tokio::task::consume_budget().await;
        // Fill the pipe from the socket.
        while !eof && in_pipe < p.size {
            let want = p.size - in_pipe;
            let r = if in_pipe == 0 {
                src.try_io(Interest::READABLE, || {
                    splice(src.as_raw_fd(), p.w.as_raw_fd(), want)
                })
            } else {
                splice(src.as_raw_fd(), p.w.as_raw_fd(), want)
            };
            drained = false;
            match r {
                Ok(0) => eof = true,
                Ok(n) => in_pipe += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = in_pipe == 0;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Read(e)),
            }
        }
        // Drain the pipe into the other socket.
        while in_pipe > 0 {
            match dst.try_io(Interest::WRITABLE, || {
                splice(p.r.as_raw_fd(), dst.as_raw_fd(), in_pipe)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(PumpError::Write(e)),
            }
        }
        progress.touch();
        if in_pipe > 0 {
            dst.writable().await.map_err(PumpError::Write)?;
            continue;
        }
        // The pipe is empty: the next direction (or connection) on this thread can
        // have it while this one waits.
        if let Some(p) = pipe.take() {
            p.give_back();
        }
        if eof {
            // Every byte before the FIN is in dst's send queue: pass the FIN on.
            return pass_fin(dst).map(|()| PumpEnd::Eof);
        }
        if drained && quiet.going_quiet(d) {
            return Ok(PumpEnd::Promote);
        }
    }
}

/// How often, and how long, a direction that needs a pipe tries again while none can
/// be made (out of fds).
const NO_PIPE_RETRY: std::time::Duration = std::time::Duration::from_millis(50);
const NO_PIPE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn pass_fin(dst: &TcpStream) -> Result<(), PumpError> {
    match socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(()),
        Err(e) => Err(PumpError::Write(e)),
    }
}

pub(crate) struct Pipe {
    pub(crate) r: OwnedFd,
    pub(crate) w: OwnedFd,
    pub(crate) size: usize,
}

/// Empty pipes kept per worker thread: a connection's two pipes cost ten syscalls to
/// make, size and close, a large share of a short connection's cost.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: std::cell::RefCell<Vec<Pipe>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pipe {
    pub(crate) fn take() -> io::Result<Pipe> {
        match POOL.with(|p| p.borrow_mut().pop()) {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Only for an empty pipe: whatever it held would reach the next connection.
    pub(crate) fn give_back(self) {
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        });
    }

    fn new() -> io::Result<Pipe> {
        Self::with_size(PIPE_SIZE)
    }

    /// A pipe of `size` bytes (rounded up by the kernel), or smaller when the system's
    /// pipe limits refuse: callers read `size` back.
    pub(crate) fn with_size(want: usize) -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe is an optimisation only: unprivileged users over
        // pipe-user-pages-soft get EPERM, and the default 64 KiB still works.
        // SAFETY: plain fcntl on a pipe fd we own.
        let size = unsafe {
            libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int);
            libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let size = if size > 0 { size as usize } else { 65536 };
        Ok(Pipe { r, w, size })
    }
}

pub(crate) fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets mean
    // "current position", as required for sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
