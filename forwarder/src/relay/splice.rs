//! epoll + splice(2): bytes go socket -> pipe -> socket inside the kernel, one pipe per
//! direction, driven by tokio's (edge-triggered epoll) readiness on the two sockets.
//!
//! The pipes are never polled: we count the bytes we put in each pipe ourselves, so
//! an EAGAIN from `splice(pipe -> socket)` can only mean "socket send buffer full".
//! The other direction is ambiguous: `splice(socket -> pipe)` also stops short, or
//! fails with EAGAIN, when the pipe has no free slot, even if our byte count says
//! there is room (slots hold partial pages). Clearing the socket's readiness then would
//! lose the edge and stall the direction; [`fill`] clears it only when the socket is
//! known to be empty, and then also on a short read, which spares the EAGAIN read.

use std::future::Future;
use std::io;
use std::ops::Deref;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::ebpf::sys;
use super::pace::Bucket;
use super::{
    reset_both_on_close, Handover, Hop, Pair, Progress, Relay, RelayEnd, RelayFuture, Side,
};
use crate::inspect::dump::Dump;

/// Pipe capacity we ask for; bounds the bytes held per direction in userspace-owned
/// kernel memory. Larger pipes mean fewer syscalls per byte.
pub const PIPE_SIZE: usize = 1 << 20;

/// `rates`: bytes per second per direction, `[to_upstream, to_client]` (a rule's
/// `upload_rate` and `download_rate`); `None` = unpaced.
#[derive(Default)]
pub struct SpliceRelay {
    pub rates: [Option<u64>; 2],
}

impl Relay for SpliceRelay {
    fn path(&self) -> &'static str {
        "splice"
    }

    fn relay<'a>(&'a self, pair: Pair, progress: Arc<Progress>) -> RelayFuture<'a> {
        self.boxed(pair, progress, None)
    }

    fn relay_after_prelude<'a>(
        &'a self,
        pair: Pair,
        progress: Arc<Progress>,
        handover: Handover,
    ) -> RelayFuture<'a> {
        debug_assert!(
            handover.rewriters.is_none(),
            "rewrite rules use the copy relay"
        );
        self.boxed(pair, progress, handover.dump)
    }
}

impl SpliceRelay {
    /// The relay, paced when the rule has rates (an unpaced pair carries no bucket).
    fn boxed<'a>(
        &self,
        pair: Pair,
        progress: Arc<Progress>,
        dump: Option<Box<Dump>>,
    ) -> RelayFuture<'a> {
        match self.rates {
            [None, None] => Box::pin(NeverPromoted {
                inner: relay_until(pair, progress, None, dump),
            }),
            rates => Box::pin(NeverPromoted {
                inner: relay_paced(pair, progress, dump, rates),
            }),
        }
    }
}

/// Which end of a direction failed.
enum PumpError {
    Read(io::Error),
    Write(io::Error),
}

/// How a direction's pump stopped without failing.
enum PumpEnd {
    /// EOF reached, every byte before it in dst's send queue: the FIN is the
    /// caller's to pass on ([`Pumps`]).
    Eof,
    /// The pair is worth the kernel path and both directions are quiet now.
    Promote,
}

/// Relays until both directions are finished.
pub fn relay<P>(
    pair: Pair,
    progress: P,
) -> NeverPromoted<impl Future<Output = Result<RelayEnd, Pair>>>
where
    P: Deref<Target = Progress>,
{
    NeverPromoted {
        inner: relay_until(pair, progress, None, None),
    }
}

pin_project_lite::pin_project! {
    /// [`relay_until`] with no promotion asked for, as a plain relay end; a wrapper
    /// rather than another `async fn`, which would keep a second copy of the pair.
    pub struct NeverPromoted<F> {
        #[pin]
        inner: F,
    }
}

impl<F: Future<Output = Result<RelayEnd, Pair>>> Future for NeverPromoted<F> {
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        match ready!(self.project().inner.poll(cx)) {
            Ok(end) => Poll::Ready(end),
            Err(_) => unreachable!("no promotion asked for"),
        }
    }
}

/// Bursts (a direction waking up to move bytes, then going quiet again) a pair must
/// have made before it is moved to the kernel path: an interactive pair, which is what
/// that path is good at. A short request/response or an idle pair never pays for the
/// maps; a bulk pair rarely goes quiet and would leave again at the in-flight bound.
pub const PROMOTE_AFTER_BURSTS: u32 = 16;

/// A burst that moved more than this is bulk, not conversation: it sets the count of
/// bursts back to zero. A bulk stream drains its socket again and again on a fast
/// forwarder, and so looked interactive: moved to the kernel path, it sent its first
/// 16 MiB before the first look and went on through SK_PASS (seen: 1.9 of 2 GB of a
/// one-stream upload copied through userspace).
pub const PROMOTE_BURST_MAX: u32 = 32 * 1024;

/// With more pairs than this moving bytes at once, no pair is promoted: the kernel path
/// pays a wake-up of the kernel's redirect worker for every message, and that worker
/// competes for the same cores, while one wake-up of ours serves every pair ready at
/// that moment. Measured with wrk (1 KiB responses from nginx, keep-alive,
/// 2-5 runs each, requests/s of `--mode ebpf` against `--mode splice`): 1 to 4
/// connections 1.12-1.24x, 8 connections 0.99-1.37x (4 of 5 runs 1.12x or more), 12
/// connections 0.72-0.92x, 16 0.80-0.82x, 32 0.64-0.83x. The crossover is near 10;
/// the limit sits above it, at 16, so that a dozen or so conversations at once each
/// still get the kernel path as one alone does (at up to a fifth less throughput on
/// this host) and only a crowd stays on splice (wrk's 50: 0.68x nginx promoted,
/// 0.89x kept).
pub const PROMOTE_MAX_ACTIVE: u32 = 16;

/// How pairs on splice count as moving bytes "at once": in the same window of this
/// many ms, or in the last window in which any did.
const ACTIVE_WINDOW_MS: u64 = 100;

/// How many open pairs on splice moved bytes in the current window, and in the last
/// one before it that saw any: how many conversations the process holds at once, as
/// the promotion needs it. A pair that closes (or moves to the kernel path) is taken
/// off again, so many short connections one after another do not count as many at
/// once. Windows are rolled by the first burst of a new one, not by a timer, so a
/// window in which the whole process was stalled (or idle) is not counted as quiet.
struct Activity {
    window: AtomicU64,
    now: AtomicU32,
    before_window: AtomicU64,
    before: AtomicU32,
}

static ACTIVITY: Activity = Activity {
    window: AtomicU64::new(0),
    now: AtomicU32::new(0),
    before_window: AtomicU64::new(0),
    before: AtomicU32::new(0),
};

impl Activity {
    /// Counts the pair whose window mark is `seen` as active at `now_ms`. Threads
    /// rolling the window or leaving at that moment may miscount by a pair: this is a
    /// load estimate, and counts never wrap below zero.
    fn note(&self, seen: &AtomicU64, now_ms: u64) {
        let w = now_ms / ACTIVE_WINDOW_MS + 1;
        let current = self.window.load(Ordering::Relaxed);
        if current != w
            && self
                .window
                .compare_exchange(current, w, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.before
                .store(self.now.swap(0, Ordering::Relaxed), Ordering::Relaxed);
            self.before_window.store(current, Ordering::Relaxed);
        }
        if seen.swap(w, Ordering::Relaxed) != w {
            self.now.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The pair whose window mark is `seen` no longer relays on splice.
    fn leave(&self, seen: &AtomicU64) {
        let w = seen.load(Ordering::Relaxed);
        let count = if w == 0 {
            return;
        } else if w == self.window.load(Ordering::Relaxed) {
            &self.now
        } else if w == self.before_window.load(Ordering::Relaxed) {
            &self.before
        } else {
            return;
        };
        let _ = count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    fn pairs(&self) -> u32 {
        self.now
            .load(Ordering::Relaxed)
            .max(self.before.load(Ordering::Relaxed))
    }
}

/// Relays until both directions are finished, or, with `promote`, until the pair has
/// made [`PROMOTE_AFTER_BURSTS`] bursts and both directions are quiet with empty
/// pipes: then it hands the pair back (`Err`), nothing of it held by us. Both sockets
/// were read to EAGAIN then (no partly read skb: whatever arrived since came whole),
/// so the pair may join a sockmap at once.
///
/// `dump`: the inspection dump, while a direction still shows bytes (see [`show`]); a
/// pair is not promoted before it has shown them.
///
/// An `async` block over its captured values, not an `async fn` (which would keep a
/// copy of its arguments next to the values it works on): idle pairs hold this.
pub fn relay_until<P>(
    pair: Pair,
    progress: P,
    promote: Option<u32>,
    dump: Option<Box<Dump>>,
) -> impl Future<Output = Result<RelayEnd, Pair>>
where
    P: Deref<Target = Progress>,
{
    relay_with(pair, progress, promote, dump, ())
}

/// [`relay_until`] without promotion, each direction paced to its rate.
fn relay_paced<P>(
    pair: Pair,
    progress: P,
    dump: Option<Box<Dump>>,
    rates: [Option<u64>; 2],
) -> impl Future<Output = Result<RelayEnd, Pair>>
where
    P: Deref<Target = Progress>,
{
    let pace: Box<Pace> = Box::new(rates.map(|r| r.map(Bucket::new)));
    relay_with(pair, progress, None, dump, pace)
}

fn relay_with<P, T: Pacing>(
    pair: Pair,
    progress: P,
    promote: Option<u32>,
    dump: Option<Box<Dump>>,
    pace: T,
) -> impl Future<Output = Result<RelayEnd, Pair>>
where
    P: Deref<Target = Progress>,
{
    let quiet = Quiet {
        waiting: [AtomicBool::new(false), AtomicBool::new(false)],
        bursts: AtomicU32::new(0),
        promote_after: promote.unwrap_or(u32::MAX),
        window: AtomicU64::new(0),
    };
    async move {
        progress.enter(Hop::Splice);
        match pumps(&pair, &progress, &quiet, dump, pace).await {
            // The other pump waited for readiness with no pipe: dropping it lost
            // nothing (bytes that just arrived stay in its socket).
            None => Err(pair),
            Some(RelayEnd::Failed { side, error }) => {
                reset_both_on_close(&pair.client, &pair.upstream);
                Ok(RelayEnd::Failed { side, error })
            }
            Some(end) => Ok(end),
        }
    }
}

/// Runs both directions: `None` when one of them asks for promotion.
///
/// Both directions are polled by hand from one future, each a small [`Pump`] state,
/// rather than as two `async` pumps: an idle pair then holds a few words per direction
/// instead of a suspended future per await point (idle pairs are most pairs). A struct
/// rather than an `async fn` over `poll_fn`, which would keep its arguments twice and a
/// reference to each piece of state besides (88 bytes more per pair).
fn pumps<'a, T: Pacing>(
    pair: &'a Pair,
    progress: &'a Progress,
    quiet: &'a Quiet,
    dump: Option<Box<Dump>>,
    pace: T,
) -> Pumps<'a, T> {
    Pumps {
        pair,
        progress,
        quiet,
        dump,
        pace,
        dirs: [Pump::new(), Pump::new()],
        done: [false; 2],
        watch: [None, None],
    }
}

struct Pumps<'a, T> {
    pair: &'a Pair,
    progress: &'a Progress,
    quiet: &'a Quiet,
    dump: Option<Box<Dump>>,
    /// Paced rules only: `()` for the others, so an idle pair's future is no larger.
    pace: T,
    dirs: [Pump; 2],
    done: [bool; 2],
    /// A side we no longer read from would only show its reset on our next write to
    /// it, which may never come: once direction d is done, its source is watched for
    /// errors directly.
    watch: [Option<Pin<Box<dyn Future<Output = io::Error> + Send + 'a>>>; 2],
}

impl<T: Pacing> Future for Pumps<'_, T> {
    type Output = Option<RelayEnd>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<RelayEnd>> {
        let Pumps {
            pair,
            progress,
            quiet,
            dump,
            pace,
            dirs,
            done,
            watch,
        } = self.get_mut();
        let (c, u) = (&pair.client, &pair.upstream);
        // Direction d: bytes from ends[d].0 to ends[d].1 (made here, not held).
        let ends = [
            (c, u, Side::Client, Side::Upstream),
            (u, c, Side::Upstream, Side::Client),
        ];
        for d in 0..2 {
            // Shown in full (a direction that ended shows no more): the file closes now.
            if dump
                .as_ref()
                .is_some_and(|t| (0..2).all(|d| done[d] || t.wants(d) == 0))
            {
                *dump = None;
            }
            if done[d] {
                continue;
            }
            let (src, dst, from, to) = ends[d];
            let bucket = pace.bucket(d);
            match dirs[d].poll(cx, [src, dst], progress, quiet, d, dump, bucket) {
                Poll::Pending => {}
                Poll::Ready(Ok(PumpEnd::Promote)) => return Poll::Ready(None),
                // The other direction had ended: no shutdown, the pair's close,
                // which follows at once, sends this FIN (both queues are read to
                // their EOF, so it cannot reset). One syscall less per connection.
                Poll::Ready(Ok(PumpEnd::Eof)) if done[1 - d] => {
                    return Poll::Ready(Some(RelayEnd::Closed))
                }
                Poll::Ready(Ok(PumpEnd::Eof)) => {
                    if let Err(error) = super::pass_fin(dst) {
                        return Poll::Ready(Some(RelayEnd::Failed { side: to, error }));
                    }
                    done[d] = true;
                    watch[d] = Some(Box::pin(socket_error(src)));
                }
                Poll::Ready(Err(PumpError::Read(error))) => {
                    return Poll::Ready(Some(RelayEnd::Failed { side: from, error }))
                }
                Poll::Ready(Err(PumpError::Write(error))) => {
                    return Poll::Ready(Some(RelayEnd::Failed { side: to, error }))
                }
            }
        }
        for (d, w) in watch.iter_mut().enumerate() {
            if let Some(Poll::Ready(error)) = w.as_mut().map(|w| w.as_mut().poll(cx)) {
                let side = ends[d].2;
                return Poll::Ready(Some(RelayEnd::Failed { side, error }));
            }
        }
        Poll::Pending
    }
}

/// A paced pair's buckets, `[to_upstream, to_client]`.
type Pace = [Option<Bucket>; 2];

/// How a pair's directions are paced: not at all (`()`, taking no room in an idle
/// pair's future), or each by its rate.
trait Pacing: Unpin {
    fn bucket(&mut self, d: usize) -> Option<&mut Bucket>;
}

impl Pacing for () {
    fn bucket(&mut self, _: usize) -> Option<&mut Bucket> {
        None
    }
}

impl Pacing for Box<Pace> {
    fn bucket(&mut self, d: usize) -> Option<&mut Bucket> {
        self[d].as_mut()
    }
}

/// What the two pumps of a pair tell each other for promotion.
struct Quiet {
    /// Direction d waits for bytes with no pipe (nothing of it held by us) on a socket
    /// it read to EAGAIN.
    waiting: [AtomicBool; 2],
    bursts: AtomicU32,
    promote_after: u32,
    /// The last [`Activity`] window this pair was counted in.
    window: AtomicU64,
}

impl Drop for Quiet {
    fn drop(&mut self) {
        ACTIVITY.leave(&self.window);
    }
}

impl Quiet {
    /// Direction `d` is about to wait for bytes after a burst of `burst` bytes:
    /// whether the pair should be promoted instead (enough small bursts, the other
    /// direction waits too, and the process is not busy with many pairs at once).
    fn going_quiet(&self, d: usize, burst: u32) -> bool {
        if burst > PROMOTE_BURST_MAX {
            self.bursts.store(0, Ordering::Relaxed);
            return false;
        }
        let bursts = self.bursts.fetch_add(1, Ordering::Relaxed) + 1;
        bursts >= self.promote_after
            && self.waiting[1 - d].load(Ordering::Relaxed)
            && ACTIVITY.pairs() <= PROMOTE_MAX_ACTIVE
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

/// One direction between polls: it moves bytes until EOF (then passes the FIN on) or
/// an error.
struct Pump {
    /// An idle direction holds no pipe (two fds and up to PIPE_SIZE of pages): it takes
    /// one from the pool when bytes (or the EOF) arrive and hands it back as soon as it
    /// is empty again, as HAProxy does. An idle pair then holds just its two sockets.
    pipe: Option<Pipe>,
    in_pipe: usize,
    eof: bool,
    /// The last read found the socket empty (or none was made): no skb of it is
    /// partly read.
    drained: bool,
    /// Bytes moved since this direction last went quiet (saturating).
    burst: u32,
    /// Out of fds for a pipe (rare, so out of line): bytes copied through our memory
    /// instead, not yet written.
    no_pipe: Option<Box<NoPipe>>,
    /// The source stopped at TCP urgent data: moved past once the pipe is empty.
    urgent: bool,
}

/// A direction that could not have a pipe (out of fds) moves its bytes through a
/// buffer of ours meanwhile, as HAProxy does without pipes, and takes a pipe again
/// once one can be had. Before, it waited a second for one, and then the pair ended
/// `client_error (Too many open files)`: a pair cut for fds that new clients took.
struct NoPipe {
    buf: Box<[u8]>,
    /// `buf[start..end]` is still to be written.
    start: usize,
    end: usize,
}

/// The most a direction without a pipe reads at once.
const NO_PIPE_READ: usize = 16 * 1024;

impl NoPipe {
    fn new() -> NoPipe {
        NoPipe {
            buf: vec![0u8; NO_PIPE_READ].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// Writes what the buffer holds to `dst`: ready once it is all written. Bytes in
    /// the buffer are held in our memory (a cut then resets, see `Progress::hold`);
    /// each write is activity, as each splice is.
    fn drain(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        moved: &AtomicU64,
        progress: &Progress,
        d: usize,
    ) -> Poll<Result<(), PumpError>> {
        while self.start < self.end {
            match dst.try_write(&self.buf[self.start..self.end]) {
                Ok(n) => {
                    self.start += n;
                    moved.fetch_add(n as u64, Ordering::Relaxed);
                    progress.touch();
                    if self.start == self.end {
                        progress.hold(Progress::held_without_pipe(d), false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(dst.poll_write_ready(cx)).map_err(PumpError::Write)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Poll::Ready(Err(PumpError::Write(e))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads the next bytes of `src` into the empty buffer (shown to the dump if it
    /// wants them). At an urgent mark the urgent byte is passed on first, as
    /// [`past_urgent_mark`] does for a pipe.
    fn fill(
        &mut self,
        src: &TcpStream,
        to: UrgentTo<'_>,
        dump: &mut Option<Box<Dump>>,
        progress: &Progress,
        d: usize,
    ) -> io::Result<Fill> {
        if sys::at_urgent_mark(src.as_raw_fd()) {
            pass_urgent_byte(src, Some(to));
        }
        let n = match src.try_read(&mut self.buf) {
            Ok(0) => return Ok(Fill::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Empty),
            Err(e) => return Err(e),
        };
        if let Some(dump) = dump {
            dump.record(d, &self.buf[..n]);
        }
        to.userspace.fetch_add(n as u64, Ordering::Relaxed);
        progress.hold(Progress::held_without_pipe(d), true);
        (self.start, self.end) = (0, n);
        Ok(Fill::Bytes { n, drained: false })
    }
}

impl Pump {
    fn new() -> Pump {
        Pump {
            pipe: None,
            in_pipe: 0,
            eof: false,
            drained: true,
            burst: 0,
            no_pipe: None,
            urgent: false,
        }
    }

    // Borrowed per poll rather than held in the state: idle pairs keep the state.
    #[allow(clippy::too_many_arguments)]
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        [src, dst]: [&TcpStream; 2],
        progress: &Progress,
        quiet: &Quiet,
        d: usize,
        dump: &mut Option<Box<Dump>>,
        mut bucket: Option<&mut Bucket>,
    ) -> Poll<Result<PumpEnd, PumpError>> {
        let moved = [&progress.to_upstream, &progress.to_client][d];
        loop {
            if self.pipe.is_none() {
                // Bytes read without a pipe go on before any other.
                if let Some(no_pipe) = self.no_pipe.as_deref_mut() {
                    ready!(no_pipe.drain(cx, dst, moved, progress, d))?;
                }
                // Paced: nothing is read (and the pipe is not taken) before the rate
                // allows a read's worth.
                if let Some(b) = bucket.as_deref_mut() {
                    ready!(b.poll_allowance(cx));
                }
                quiet.waiting[d].store(self.drained, Ordering::Relaxed);
                ready!(src.poll_read_ready(cx)).map_err(PumpError::Read)?;
                quiet.waiting[d].store(false, Ordering::Relaxed);
                match Pipe::take() {
                    Ok(p) => {
                        self.no_pipe = None;
                        self.pipe = Some(p);
                    }
                    Err(e) if crate::server::is_resource_exhaustion(&e) => {
                        let to = UrgentTo {
                            dst,
                            moved,
                            userspace: &progress.via_userspace,
                        };
                        let no_pipe = self.no_pipe.get_or_insert_with(|| Box::new(NoPipe::new()));
                        match no_pipe
                            .fill(src, to, dump, progress, d)
                            .map_err(PumpError::Read)?
                        {
                            Fill::Eof => return Poll::Ready(Ok(PumpEnd::Eof)),
                            Fill::Bytes { n, .. } => {
                                self.burst = self.burst.saturating_add(n as u32);
                                ACTIVITY.note(&quiet.window, progress.touch());
                            }
                            _ => self.drained = true,
                        }
                        continue;
                    }
                    Err(e) => return Poll::Ready(Err(PumpError::Read(e))),
                }
            }
            let Some(p) = &self.pipe else { continue };
            // A busy pair never has to wait for readiness: yield now and then so it
            // cannot starve the other connections on this worker thread.
            ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
            // Whether a byte moved in this pass: only then is the pair active (a pass
            // that finds dst still full moves nothing, and must not keep a stalled
            // pair from its idle_timeout).
            let mut moved_now = false;
            // Fill the pipe from the socket.
            while !self.eof && self.in_pipe < p.size {
                let mut want = p.size - self.in_pipe;
                if let Some(b) = bucket.as_deref_mut() {
                    match b.tokens() {
                        0 => break,
                        tokens => want = want.min(tokens),
                    }
                }
                let shows = dump.as_deref_mut().filter(|t| t.wants(d) > 0);
                if shows.is_some() && self.in_pipe > 0 {
                    // Shown bytes go on before the next are read.
                    break;
                }
                self.drained = false;
                let filled = match shows {
                    Some(t) => show(src, p, t, d, want, progress),
                    None => fill(src, p, self.in_pipe, want),
                };
                match filled {
                    Ok(Fill::Eof) => self.eof = true,
                    Ok(Fill::Bytes { n, drained }) => {
                        self.in_pipe += n;
                        moved_now |= n > 0;
                        if let Some(b) = bucket.as_deref_mut() {
                            b.spend(n);
                        }
                        if drained {
                            self.drained = true;
                            break;
                        }
                    }
                    Ok(Fill::Empty) => {
                        self.drained = true;
                        break;
                    }
                    Ok(Fill::NoSlot) => break,
                    Ok(Fill::UrgentMark) => {
                        self.urgent = true;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(PumpError::Read(e))),
                }
            }
            // Drain the pipe into the other socket.
            while self.in_pipe > 0 {
                match dst.try_io(Interest::WRITABLE, || {
                    splice(p.r.as_raw_fd(), dst.as_raw_fd(), self.in_pipe)
                }) {
                    Ok(n) => {
                        self.in_pipe -= n;
                        self.burst = self.burst.saturating_add(n as u32);
                        moved.fetch_add(n as u64, Ordering::Relaxed);
                        moved_now |= n > 0;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Poll::Ready(Err(PumpError::Write(e))),
                }
            }
            if moved_now {
                ACTIVITY.note(&quiet.window, progress.touch());
            }
            if self.in_pipe > 0 {
                ready!(dst.poll_write_ready(cx)).map_err(PumpError::Write)?;
                continue;
            }
            if std::mem::take(&mut self.urgent) {
                let to = UrgentTo {
                    dst,
                    moved,
                    userspace: &progress.via_userspace,
                };
                match past_urgent_mark(src, Some(to), p, p.size).map_err(PumpError::Read)? {
                    None => self.eof = true,
                    Some(n) => {
                        self.in_pipe = n;
                        progress
                            .via_userspace
                            .fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
                continue;
            }
            // The pipe is empty: another direction (or connection) can have it while
            // this one waits.
            if let Some(p) = self.pipe.take() {
                p.give_back();
            }
            if self.eof {
                // Every byte before the FIN is in dst's send queue: the FIN is next.
                return Poll::Ready(Ok(PumpEnd::Eof));
            }
            if self.drained {
                let burst = std::mem::take(&mut self.burst);
                let shown = dump.as_ref().is_none_or(|t| t.wants(0) + t.wants(1) == 0);
                if quiet.going_quiet(d, burst) && shown {
                    return Poll::Ready(Ok(PumpEnd::Promote));
                }
            }
        }
    }
}

pub(crate) struct Pipe {
    pub(crate) r: OwnedFd,
    pub(crate) w: OwnedFd,
    pub(crate) size: usize,
}

/// Empty pipes kept for reuse: a connection's two pipes cost ten syscalls to make,
/// size and close, a large share of a short connection's cost. One pool for the
/// process, not one per worker thread: how many pipes sit idle then depends on how
/// many were in use at once, not on which thread a connection happened to run on.
/// Pipes that sat unused for a whole [`POOL_TRIM_EVERY`] are closed: a burst of tunnel
/// streams left 128 idle 1 MiB pipes (256 fds) for good, and an unprivileged user's
/// pipe quota (`fs.pipe-user-pages-soft`, 64 MiB) with them, so later pipes came at
/// 8 KiB and a tunnel stream's throughput fell 280-fold (audit).
const POOL_MAX: usize = 128;
/// How often the pool closes the pipes that no one took since the last time.
pub const POOL_TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

struct Pool {
    pipes: Vec<Pipe>,
    /// The fewest pipes the pool held since the last trim: that many sat unused.
    low: usize,
}

static POOL: std::sync::Mutex<Pool> = std::sync::Mutex::new(Pool {
    pipes: Vec::new(),
    low: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Told when a pipe goes into an empty pool: the trim wakes only while there is
/// something to trim (a forwarder with nothing pooled, idle pairs or none, sleeps).
static POOL_FILLED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Closes, every [`POOL_TRIM_EVERY`], the pooled pipes that no one took meanwhile.
pub async fn trim_pool_forever() {
    loop {
        if pool().pipes.is_empty() {
            POOL_FILLED.notified().await;
        }
        // Off tokio's wheel (crate::deadlines): the pool holds pipes nearly always.
        crate::deadlines::sleep_until(std::time::Instant::now() + POOL_TRIM_EVERY).await;
        let unused = {
            let mut pool = pool();
            let keep = pool.pipes.len() - pool.low.min(pool.pipes.len());
            let unused = pool.pipes.split_off(keep);
            pool.low = pool.pipes.len();
            unused
        };
        drop(unused); // closed outside the lock
    }
}

impl Pipe {
    pub(crate) fn take() -> io::Result<Pipe> {
        let taken = {
            let mut pool = pool();
            let p = pool.pipes.pop();
            pool.low = pool.low.min(pool.pipes.len());
            p
        };
        match taken {
            Some(pipe) => Ok(pipe),
            None => Pipe::new(),
        }
    }

    /// Only for an empty pipe: whatever it held would reach the next connection. A
    /// pipe under the kernel's default 64 KiB (its answer to a user over the pipe
    /// quota: 8 KiB) or over [`PIPE_SIZE`] (a tunnel's retention) is closed instead:
    /// kept, a small one would hold every later stream to its size, and a large one
    /// the quota.
    pub(crate) fn give_back(self) {
        if !(64 * 1024..=PIPE_SIZE).contains(&self.size) {
            return;
        }
        let mut pool = pool();
        if pool.pipes.len() < POOL_MAX {
            pool.pipes.push(self);
            if pool.pipes.len() == 1 {
                // A permit is kept if the trim is not waiting yet.
                POOL_FILLED.notify_one();
            }
        }
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

/// What a read from a socket into a pipe found.
pub(crate) enum Fill {
    Eof,
    /// `drained`: and the socket is empty now (its readiness is cleared).
    Bytes {
        n: usize,
        drained: bool,
    },
    /// Nothing to read: the socket is empty (its readiness is cleared).
    Empty,
    /// Nothing read, maybe only because the pipe has no free slot: the socket's
    /// readiness is kept, so wait for the pipe to empty, then read again.
    NoSlot,
    /// Stopped at TCP urgent data (MSG_OOB): splice never reads past that mark, not
    /// even at a FIN (it returns 0 as at an EOF). [`past_urgent_mark`] moves on.
    UrgentMark,
}

/// Splices up to `want` bytes from `src` into `p`, which holds `in_pipe` bytes, and
/// clears `src`'s readiness whenever the socket is known to be empty, so no EAGAIN read
/// is needed to learn it (tokio's own `poll_read` does the same on a short read).
///
/// A nonblocking TCP splice returns short, or EAGAIN, when the receive queue ran dry,
/// the pipe ran out of slots (slots hold partial pages, so our byte count cannot tell)
/// or the read reached an urgent mark. Clearing readiness on the last two would lose
/// the edge and stall the direction, so a short read counts as drained only when the
/// socket is not at an urgent mark and either a slot was free or the socket holds no
/// unread byte (SIOCINQ). Every slot holds at least one byte, and spliced pages are
/// never merged into a slot: while `in_pipe` plus what was read is less than the pipe's
/// slots, a slot was free. Otherwise SIOCINQ tells: two ioctls that take no socket lock
/// or a light one cost less than the EAGAIN splice they replace (paired wrk runs of 1
/// KiB responses over 50 keep-alive connections: 5-15% more requests/s). A byte that
/// arrives after these looks raises a new edge, which tokio keeps. (A splice also stops
/// at a FIN, which SIOCINQ does not count and whose readiness tokio never clears.)
/// Through `try_io`, so a read after a cleared readiness costs no syscall.
pub(crate) fn fill(src: &TcpStream, p: &Pipe, in_pipe: usize, want: usize) -> io::Result<Fill> {
    fill_from(src, p, in_pipe, want, Sender::Anyone)
}

/// Who wrote what a [`fill_from`] reads, as far as urgent data goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sender {
    /// A client or a server: any read may stop at an urgent mark.
    Anyone,
    /// Our own peer on a tunnel data connection, which only splices and never sends
    /// urgent data: a short read is taken as drained without the ioctl (one syscall
    /// less per message and hop). A forged peer that sent some anyway would stall only
    /// its own stream, until its next byte: the EAGAIN read that byte raises still
    /// asks, and finds the mark.
    OwnPeer,
}

/// [`fill`], for a socket whose sender is known.
pub(crate) fn fill_from(
    src: &TcpStream,
    p: &Pipe,
    in_pipe: usize,
    want: usize,
    sender: Sender,
) -> io::Result<Fill> {
    let slots = p.size / page_size();
    // What the read proved, when more than its result says.
    let mut known = None;
    let r = src.try_io(Interest::READABLE, || {
        let r = splice(src.as_raw_fd(), p.w.as_raw_fd(), want);
        // One or two ioctls per short read, one per EOF and per EAGAIN a read meets:
        // the price of never taking the urgent mark, where splice stops for good, for
        // a drained socket (a stream stalled for good) or an EOF (a stream cut short,
        // passed on as a clean close).
        known = match &r {
            Ok(n)
                if *n > 0
                    && *n < want
                    && (sender == Sender::OwnPeer || !sys::at_urgent_mark(src.as_raw_fd()))
                    && (in_pipe + n < slots
                        || sys::inq(src.as_raw_fd()).is_ok_and(|unread| unread == 0)) =>
            {
                Some(Fill::Bytes {
                    n: *n,
                    drained: true,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && in_pipe >= slots => {
                Some(Fill::NoSlot)
            }
            Ok(0) if sys::at_urgent_mark(src.as_raw_fd()) => Some(Fill::UrgentMark),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && sys::at_urgent_mark(src.as_raw_fd()) =>
            {
                Some(Fill::UrgentMark)
            }
            _ => None,
        };
        match known {
            // WouldBlock makes tokio clear the readiness it saw before the call; an
            // edge that arrived since is kept.
            Some(Fill::Bytes { .. }) => Err(io::ErrorKind::WouldBlock.into()),
            // Anything but WouldBlock keeps it (at the mark: the bytes behind it raise
            // no new edge).
            Some(_) => Ok(0),
            None => r,
        }
    });
    match (r, known) {
        (_, Some(fill)) => Ok(fill),
        (Ok(0), None) => Ok(Fill::Eof),
        (Ok(n), None) => Ok(Fill::Bytes { n, drained: false }),
        (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => Ok(Fill::Empty),
        (Err(e), None) => Err(e),
    }
}

/// Splices the `len` bytes waiting in `p` into `dst`, waiting for room in `dst` as
/// often as it takes: the one-off moves outside a pump (bytes read before a pair
/// joined the maps, a prelude's bytes that nothing inspects).
pub(crate) async fn splice_out(p: &Pipe, dst: &TcpStream, len: usize) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = dst
            .async_io(Interest::WRITABLE, || {
                splice(p.r.as_raw_fd(), dst.as_raw_fd(), left)
            })
            .await?;
        if n == 0 {
            return Err(io::Error::other("splice wrote nothing"));
        }
        left -= n;
    }
    Ok(())
}

/// The most [`show`] reads at once.
const SHOW_READ: usize = 16 * 1024;

/// For the inspection dump: reads the next bytes of direction `d`, at most as many as
/// its dump still shows (and `max`), into our memory, shows them, and puts them in the
/// empty pipe `p`, from which the pump passes them on as it does spliced bytes. Only these bytes
/// cross our memory (`userspace_bytes`). recv reads past an urgent mark (dropping the
/// urgent byte, as the prelude's reads do).
pub(crate) fn show(
    src: &TcpStream,
    p: &Pipe,
    dump: &mut Dump,
    d: usize,
    max: usize,
    progress: &Progress,
) -> io::Result<Fill> {
    let mut buf = vec![0u8; (dump.wants(d) as usize).min(SHOW_READ).min(max)];
    let n = match src.try_read(&mut buf) {
        Ok(0) => return Ok(Fill::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Fill::Empty),
        Err(e) => return Err(e),
    };
    dump.record(d, &buf[..n]);
    into_empty_pipe(p, &buf[..n])?;
    progress
        .via_userspace
        .fetch_add(n as u64, Ordering::Relaxed);
    // Maybe not drained (a short read can stop at an urgent mark): the next read says.
    Ok(Fill::Bytes { n, drained: false })
}

/// Where [`past_urgent_mark`] passes the urgent byte: to `dst`, as urgent, counted in
/// `moved` (its direction's bytes) and `userspace` (it crossed our memory).
#[derive(Clone, Copy)]
pub(crate) struct UrgentTo<'a> {
    pub dst: &'a TcpStream,
    pub moved: &'a AtomicU64,
    pub userspace: &'a AtomicU64,
}

/// At `src`'s urgent mark, with the pipe `p` empty (every byte before the mark is in
/// `dst`'s send queue): passes the urgent byte on as urgent to `to` (MSG_OOB, as a
/// direct connection would have it; with no `to` it is dropped), then reads up to
/// `max` bytes of what follows it with recv, which skips the urgent byte where splice
/// stops, into `p`. Returns the bytes put in the pipe (they crossed our memory), or
/// None at EOF. Rare: telnet and FTP's ABOR send urgent data.
pub(crate) fn past_urgent_mark(
    src: &TcpStream,
    to: Option<UrgentTo<'_>>,
    p: &Pipe,
    max: usize,
) -> io::Result<Option<usize>> {
    pass_urgent_byte(src, to);
    let mut buf = vec![0u8; p.size.min(max).min(64 * 1024)];
    // Through tokio's readiness, which the read that found the mark kept: an EAGAIN
    // (nothing behind the mark yet) clears it, and bytes that come later raise it.
    let r = src.try_io(Interest::READABLE, || {
        sys::recv(src.as_raw_fd(), &mut buf, libc::MSG_DONTWAIT)
    });
    let n = match r {
        Ok(0) => return Ok(None),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(0)),
        Err(e) => return Err(e),
    };
    into_empty_pipe(p, &buf[..n])?;
    Ok(Some(n))
}

/// At `src`'s urgent mark: reads the urgent byte and passes it on as urgent to `to`
/// (MSG_OOB, as a direct connection would have it; with no `to` it is dropped).
fn pass_urgent_byte(src: &TcpStream, to: Option<UrgentTo<'_>>) {
    let mut urgent = [0u8; 1];
    let got = sys::recv(
        src.as_raw_fd(),
        &mut urgent,
        libc::MSG_OOB | libc::MSG_DONTWAIT,
    );
    if let (Ok(1), Some(to)) = (got, to) {
        match sys::send_urgent(to.dst.as_raw_fd(), &urgent) {
            Ok(n) => {
                to.moved.fetch_add(n as u64, Ordering::Relaxed);
                to.userspace.fetch_add(n as u64, Ordering::Relaxed);
            }
            // dst's send queue is full to the byte: the urgent byte is dropped, as
            // socat and HAProxy always do; the stream goes on.
            Err(e) => tracing::debug!("urgent byte not passed on: {e}"),
        }
    }
}

/// Puts bytes read into our memory into the empty pipe `p`, which holds at least that
/// many: one write takes them all (a nonblocking pipe write is never interrupted).
pub(crate) fn into_empty_pipe(p: &Pipe, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: write from a live buffer of bytes.len() bytes to the pipe we own.
    let w = unsafe { libc::write(p.w.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    if w == bytes.len() as isize {
        return Ok(());
    }
    let why = match w {
        -1 => io::Error::last_os_error().to_string(),
        w => format!("{w} of them went in"),
    };
    Err(io::Error::other(format!(
        "{} bytes into an empty pipe: {why}",
        bytes.len()
    )))
}

fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    })
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
