//! One pair on the sockmap path: pairing, watching, FINs, errors, teardown.

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder_common::{DirControl, DirState, MAX_PAIRS};

use super::kernel::{Kernel, PairSignals, Parted};
use super::sys;
use crate::relay::splice::{self, Pipe};
use crate::relay::{Hop, Pair, Progress, RelayEnd, Side};

/// Fastest and slowest period of the bookkeeping tick. Fast while bytes move (the
/// in-flight limit is raised on each tick), slower and slower while the pair is idle.
const MIN_TICK: Duration = Duration::from_millis(1);
pub const MAX_TICK: Duration = Duration::from_millis(250);
/// The slowest tick of a pair leaving the maps while nothing moves (a stalled reader).
const LEAVING_MAX_TICK: Duration = Duration::from_millis(32);
/// A pair quiet for this long (its tick backed off to it) goes to sleep: no tick, the
/// program wakes it on the next skb (see `ask_for_wake_up`).
const SLEEP_AFTER: Duration = Duration::from_millis(16);
/// A sleeping pair still looks at its counters this often, in case a wake-up was lost
/// (the ring buffer full, say): one task wakes every watched pair (no timer per pair).
pub const SLEEP_CHECK: Duration = Duration::from_secs(60);
/// A FIN that waits only for redirected bytes to land in the peer socket (the kernel's
/// redirect worker sends them a few to a few hundred µs after their skb arrived: a
/// server that closes right after its answer) is looked at again this many times in a
/// row, yielding to the other tasks in between, before the 1 ms tick takes over:
/// tokio's timers cannot wait less than 1 ms, and that tick used to hold about 1% of
/// such connections' FINs, in a connection-rate run, for a millisecond or more.
const QUICK_LOOKS: u32 = 16;
/// Userspace copy buffer, allocated only for a direction that leaves the redirect path.
const COPY_BUF: usize = 128 * 1024;
/// Bytes one step may copy before yielding to the rest of the loop.
const COPY_BUDGET: u64 = 4 << 20;

/// The program redirects up to this many times `inflight_limit` before it passes
/// bytes to us instead. The pair leaves the maps at a quarter of the limit; this
/// margin covers the burst before the control loop reacts (a new connection at
/// loopback speed reaches several MiB in the first milliseconds), because the
/// pass path is slow and, on this kernel, now and then duplicates an skb.
const PROGRAM_CAP: u64 = 4;

/// Pairs currently in the maps, so an insert never fails for lack of room midway (an
/// ended pair counts until its STATE and CONTROL entries go: [`Kernel::retire_dirs`]).
static PAIRS: AtomicU32 = AtomicU32::new(0);

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;
const SIDES: [Side; 2] = [Side::Client, Side::Upstream];

/// What was done to a pair's sockets before pairing: what set-up must measure.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Nothing read from either socket or written to it by us (a plain accept and
    /// connect): the baselines come from the tcp_info read for each socket's state.
    Untouched,
    /// Read to EAGAIN by the splice relay (a promoted pair), or found with nothing
    /// queued after an inspection prelude: nothing queued on them is partly read.
    Drained,
    /// Anything else (a PROXY header read or written, an inspection prelude): queued
    /// bytes behind partly read ones are relayed first.
    Used,
}

/// Runs one pair. With `allow_fallback`, a pair the maps refuse is relayed by splice.
///
/// An idle pair holds this future for its whole life, so it is built to hold only the
/// running pair's state: set-up runs in its own short-lived allocation (made here, so
/// the pair is moved straight into it), its result is unpacked before the pair runs,
/// and the running pair is one block over its captured state. These are plain
/// functions returning blocks, not `async fn`s: those keep their arguments for their
/// whole life (the pair's 72 bytes), and a match on the set-up result around the run
/// kept a second, dead `Paired` (1,344 → 704 bytes by `-Zprint-type-sizes`).
pub fn relay<P>(
    k: &'static Kernel,
    inflight_limit: u64,
    pair: Pair,
    progress: P,
    allow_fallback: bool,
    before: Before,
) -> impl std::future::Future<Output = RelayEnd>
where
    P: std::ops::Deref<Target = Progress>,
{
    let setup = Box::pin(setup(k, inflight_limit, pair, before));
    async move {
        // Turned into the next future before that is awaited: a set-up result still
        // alive across an await would keep a dead `Paired` in every pair's future.
        let next = match setup.await {
            Ok(paired) => Next::Run {
                run: run_paired(paired, &*progress),
            },
            Err(refused) => Next::Refused {
                fallback: Box::pin(not_paired(refused, &progress, allow_fallback)),
            },
        };
        next.await
    }
}

pin_project_lite::pin_project! {
    /// What a pair runs once set up: the kernel path, or what `not_paired` decides.
    #[project = NextProj]
    enum Next<R, F> {
        Run { #[pin] run: R },
        Refused { fallback: F },
    }
}

impl<R, F> std::future::Future for Next<R, F>
where
    R: std::future::Future<Output = RelayEnd>,
    F: std::future::Future<Output = RelayEnd> + Unpin,
{
    type Output = RelayEnd;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<RelayEnd> {
        match self.project() {
            NextProj::Run { run } => run.poll(cx),
            NextProj::Refused { fallback } => std::pin::Pin::new(fallback).poll(cx),
        }
    }
}

/// The running pair. Not an `async fn`, which would keep a second copy of `paired`.
#[allow(clippy::manual_async_fn)]
fn run_paired<P>(paired: Paired, progress: P) -> impl std::future::Future<Output = RelayEnd>
where
    P: std::ops::Deref<Target = Progress>,
{
    // Wrapped out here: moved into the block, the bare pair would keep a slot of its
    // own beside the wrapper's.
    let mut watching = CutCheck(Some(paired));
    async move {
        progress.enter(Hop::Ebpf);
        // (`watch` awaited here and `finish` plain, not one `async fn` over both, which
        // would keep `paired` and `progress` twice in every kernel-path pair.)
        let watched = watching
            .0
            .as_mut()
            .expect("set above")
            .watch(&progress)
            .await;
        // In its own scope, gone before the await below: a borrowed local keeps its
        // slot to the end of its scope (256 bytes more per kernel-path pair).
        let handed_off = {
            // The watch ended by itself: no cut to check.
            let mut paired = watching.0.take().expect("set above");
            if let Ok(end) = paired.finish(watched, &progress) {
                return end;
            }
            paired.into_pair()
        };
        // The in-flight bound was reached: the pair left the maps without loss and goes
        // on in splice, which has TCP's own backpressure.
        match handed_off {
            Ok(pair) => Box::pin(crate::relay::splice::relay(pair, &*progress)).await,
            Err(error) => RelayEnd::Failed {
                side: Side::Client,
                error,
            },
        }
    }
}

/// A pair whose watch is under way. Dropped with the pair still in it, the pair's
/// future was dropped mid-watch: the pair was cut (idle timeout, a duration limit,
/// shutdown), and `connection::cut` looked at its socket queues. Bytes the program
/// took from TCP are in none: on dst's psock until the redirect worker runs, or taken
/// while the sockets close one after the other (redirected to a psock being torn
/// down, or passed back to src's). Closing drops them with a FIN, so their sender is
/// told nothing: cut mid-stream, about 1 pair in 25 gave its client a clean EOF one 4
/// KiB message short of what the forwarder had acked from the upstream, and a last
/// look before the close alone did not help (`cut_mid_stream_loses_nothing`). So the
/// program comes off both sockets first (new bytes then wait in TCP's queue, and a
/// close with unread bytes resets their sender, as on splice), then a fresh look at
/// the counters, and a reset if any byte the program took has not reached its dst.
///
/// Parting without the socket locks leaves one window: a verdict already running as
/// the program came off (in softirq, under src's lock) finds no program, and the
/// kernel drops the skb it took off TCP's queue (`sk_psock_verdict_recv`, __SK_DROP):
/// TCP acked those bytes, nothing counted them. A vCPU preempted there stretched that
/// window to a clean EOF 4 KiB short in 1 of 12 runs of the ebpf relay suite. So the
/// check first takes each socket's lock once (tcp_info does), which waits that verdict
/// out, and then counts src's bytes: every byte TCP received is either still in its
/// queue or seen by the program.
struct CutCheck(Option<Paired>);

impl Drop for CutCheck {
    fn drop(&mut self) {
        if let Some(paired) = &mut self.0 {
            let members = paired.entries.members_in;
            paired.entries.part_unlocked();
            let queues = paired
                .socks
                .each_ref()
                .map(|s| sys::snapshot(s.as_raw_fd()));
            if paired.bytes_on_their_way() || paired.dropped_at_parting(members, &queues) {
                // Now, not at close: a psock may still be sending.
                crate::relay::reset_both_now(&paired.socks[0], &paired.socks[1]);
            }
        }
    }
}

/// A pair the maps refused: relayed by splice with `allow_fallback`, else failed.
async fn not_paired(refused: Setup, progress: &Progress, allow_fallback: bool) -> RelayEnd {
    match refused {
        Setup::Fallback { pair, moved, why } if allow_fallback => {
            // The client's address ties the warning to the pair's close line.
            let client = pair
                .client
                .peer_addr()
                .map_or_else(|_| "unknown".to_string(), |a| a.to_string());
            crate::event!(warn, "cannot pair sockets", text = ("ebpf: cannot pair sockets client={client} ({why}); this pair uses splice"), client = %client, reason = %why,);
            progress
                .to_upstream
                .fetch_add(moved[CLIENT], Ordering::Relaxed);
            progress
                .to_client
                .fetch_add(moved[UPSTREAM], Ordering::Relaxed);
            crate::relay::splice::relay(pair, progress).await
        }
        Setup::Fallback { pair, why, .. } => {
            crate::relay::reset_on_close(&pair.client);
            RelayEnd::Failed {
                side: Side::Client,
                error: io::Error::other(why),
            }
        }
        Setup::Failed { side, error } => RelayEnd::Failed { side, error },
    }
}

enum Setup {
    /// The pair cannot use the maps; nothing was lost: `moved` bytes per direction
    /// reached their destination already (by splice: none through our memory).
    Fallback {
        pair: Pair,
        moved: [u64; 2],
        why: String,
    },
    /// Half-paired and bytes may have been lost: both sockets have been reset.
    Failed { side: Side, error: io::Error },
}

/// Removes a pair from the maps when dropped (the relay future dropped on idle timeout
/// or shutdown, or the pair finished).
struct MapEntries {
    k: &'static Kernel,
    cookies: [u64; 2],
    /// SOCKS holds the peer of side i under cookies[i].
    socks_in: [bool; 2],
    /// MEMBERS holds side i (it runs the program).
    members_in: [bool; 2],
    /// The sockets were closed before this drops (see [`Paired`]): closing a socket
    /// takes it out of every sockmap, so only STATE and CONTROL are left to clear.
    socks_closed: bool,
}

impl MapEntries {
    /// Takes the program off both sockets without their locks (see
    /// [`Kernel::part_unlocked`]): their new bytes stay in TCP's own queues.
    fn part_unlocked(&mut self) {
        let members: Vec<u64> = (0..2)
            .filter(|&i| self.members_in[i])
            .map(|i| self.cookies[i])
            .collect();
        if !members.is_empty() {
            self.k.part_unlocked(&members);
        }
        self.members_in = [false; 2];
    }
}

impl Drop for MapEntries {
    fn drop(&mut self) {
        if !self.socks_closed {
            // Program first, so no verdict looks for a target that is gone. The pair
            // failed: a skb a racing verdict drops no longer matters, and the locked
            // part's walk is not worth it.
            self.part_unlocked();
            for (i, c) in self.cookies.iter().enumerate() {
                if self.socks_in[i] {
                    self.k.remove_sock(*c);
                }
            }
        }
        // Their STATE and CONTROL entries go in a batch with other ended pairs'.
        let freed = self.k.retire_dirs(self.cookies);
        PAIRS.fetch_sub(freed, Ordering::Relaxed);
    }
}

/// One direction: bytes arriving on `src`, going out of `dst`.
struct Dir {
    src: usize,
    dst: usize,
    /// cookie(src): the key of this direction in STATE and CONTROL.
    key: u64,
    /// `bytes_sent_into(dst)` when paired: nothing was written to dst before.
    sent_base: u64,
    /// Bytes read from src by anyone before pairing (0 for fresh sockets).
    recv_base: u64,
    /// Bytes we relayed (by splice) before pairing (see `relay_partly_read`).
    carried: u64,
    /// What `Progress` counted for this direction before the pair joined (bytes a
    /// splice relay moved before it was promoted).
    before: u64,
    /// Passed bytes we have written to dst.
    consumed: u64,
    /// Last limit written to CONTROL.
    limit: u64,
    /// Bytes dst accepted so far (from redirect and from us).
    accepted: u64,
    /// Bytes the program has seen so far (redirected + passed).
    seen: u64,
    /// The last `DirControl::sleep` written (raised each time the pair goes to sleep).
    sleep: u64,
    buf: Vec<u8>,
    off: usize,
    /// Bytes of src's own queue spliced to dst after src parted (see [`Drain`]).
    /// Boxed: most pairs never need one, and every idle pair holds two `Dir`s.
    drain: Option<Box<Drain>>,
    fin: bool,
    /// From the last step: redirected bytes not yet in dst, whether passed bytes wait
    /// for us.
    inflight: u64,
    pending: bool,
    shut: bool,
    want_in: bool,
    want_out: bool,
}

impl Dir {
    fn buffered(&self) -> bool {
        self.off < self.buf.len()
    }

    /// Whether bytes read from src wait in our memory or our drain pipe for dst.
    fn holds_bytes(&self) -> bool {
        self.buffered() || self.drain.as_ref().is_some_and(|d| d.in_pipe > 0)
    }

    /// Of the `accepted` bytes dst took since pairing, those the redirect put there
    /// (the rest we wrote: passed bytes relayed, or src's queue drained).
    fn redirected_in(&self, accepted: u64) -> u64 {
        accepted.saturating_sub(self.consumed + self.drained())
    }

    /// Bytes of src's queue this direction spliced to dst while the pair was leaving.
    fn drained(&self) -> u64 {
        self.drain.as_ref().map_or(0, |d| d.moved)
    }

    /// Bytes of src's queue this direction has read for that (in dst or in its pipe).
    fn drained_from_src(&self) -> u64 {
        self.drain
            .as_ref()
            .map_or(0, |d| d.moved + d.in_pipe as u64)
    }

    /// What CONTROL should hold for this direction.
    fn control(&self) -> DirControl {
        DirControl {
            consumed: self.consumed,
            limit: self.limit,
            sleep: self.sleep,
        }
    }
}

/// One direction relayed by splice while the pair is still leaving the maps: its src
/// has parted (runs no program, so its new bytes wait in TCP's own queue) and its dst
/// has left (every byte redirected into dst is in dst's send queue), so nothing of
/// this direction is on its way through the kernel and src's queue can go on to dst
/// at once. The other direction may still wait for the redirect worker to put bytes
/// into src's send queue, and those drain only as src's peer reads: a peer that
/// reads only while it can write (an echo, a proxy) stops once its writes to src go
/// unread. Waiting for both before relaying anything deadlocked: a 32 MiB echo under
/// load left 3.5 MB on the upstream's psock and 16.9 MB unread in its receive queue,
/// for good (1 in about 20 runs beside the relay suite).
///
/// Out of fds for a pipe, it copies through a buffer of ours until it can have one, as
/// the splice relay does (`splice::NoPipe`): failing the pair for it ended established
/// pairs with `end=client_error (Too many open files)` when new clients took the fds.
struct Drain {
    /// `None` while no pipe could be had: bytes then go through `buf`.
    pipe: Option<Pipe>,
    buf: Vec<u8>,
    /// Where what `buf` holds starts.
    off: usize,
    /// Bytes read from src and not yet written to dst (in the pipe, or in `buf`).
    in_pipe: usize,
    /// Bytes written to dst.
    moved: u64,
    /// Of those, bytes that went through `buf` (our memory).
    copied: u64,
}

/// How much a drain without a pipe reads at once (as `splice::NoPipe`).
const DRAIN_BUF: usize = 16 * 1024;

/// A running pair. Dropped (the pair finished, failed, or its future was dropped), it
/// closes its sockets first, which takes them out of the sockmaps and the shared epoll
/// set (the kernel does it on close: six syscalls fewer per pair), and then clears
/// what is keyed by their cookies. Only [`Paired::into_pair`] keeps the sockets, and
/// takes them out of both itself.
struct Paired {
    socks: [StdTcpStream; 2],
    entries: MapEntries,
    watching: Option<Watching>,
    dirs: [Dir; 2],
    inflight_limit: u64,
    /// The in-flight bound was approached: the pair is on its way to splice.
    leaving: bool,
    /// Sockets that stopped running the program (the first step of leaving).
    parted: [bool; 2],
    /// Sockets held (SO_RCVLOWAT at its maximum) for parting (see `leave_maps`).
    held: [bool; 2],
    /// Our sockets' epoll events and the program's wake-ups (see `ask_for_wake_up`), from
    /// the kernel path's shared tasks.
    signals: Arc<PairSignals>,
}

/// The pair has left the maps; relay it in userspace from here.
struct Handoff;

/// A pair's two sockets in the kernel path's shared epoll set, until dropped.
struct Watching {
    k: &'static Kernel,
    cookies: [u64; 2],
    fds: [RawFd; 2],
    /// As [`MapEntries::socks_closed`]: closing took them out of the epoll set, and
    /// their fd numbers may be another socket's by now, so they must not be named.
    socks_closed: bool,
}

impl Drop for Watching {
    fn drop(&mut self) {
        for (c, fd) in self.cookies.iter().zip(self.fds) {
            self.k.unwatch(*c, (!self.socks_closed).then_some(&fd));
        }
    }
}

async fn setup(
    k: &'static Kernel,
    inflight_limit: u64,
    pair: Pair,
    before: Before,
) -> Result<Paired, Setup> {
    let fds = [pair.client.as_raw_fd(), pair.upstream.as_raw_fd()];
    // Untouched sockets need only their tcp_info: nothing was read from them or
    // written into them (six syscalls fewer per pair).
    let snapshot = |fd| match before {
        Before::Untouched => sys::tcp_counters(fd).map(sys::Snapshot::untouched),
        _ => sys::snapshot(fd),
    };
    let snapshots = |pair: Pair| match (snapshot(fds[0]), snapshot(fds[1])) {
        (Ok(c), Ok(u)) => Ok((pair, [c, u])),
        (Err(e), _) => Err((pair, format!("client: {e}"))),
        (_, Err(e)) => Err((pair, format!("upstream: {e}"))),
    };
    let (mut pair, mut snaps) = match snapshots(pair) {
        Ok(s) => s,
        Err((pair, why)) => {
            return Err(Setup::Fallback {
                pair,
                moved: [0; 2],
                why,
            })
        }
    };
    let partly_read = if before != Before::Used {
        // Read to EAGAIN by the splice relay, or not read at all: nothing queued is
        // partly read.
        Ok(([0; 2], true))
    } else {
        relay_partly_read(&pair, snaps.map(|s| s.read_before())).await
    };
    let carried = match partly_read {
        Ok((c, true)) => c,
        Ok((c, false)) => {
            return Err(Setup::Fallback {
                pair,
                moved: c,
                why: "bytes keep arriving behind bytes read before pairing".into(),
            })
        }
        Err((side, error)) => {
            crate::relay::reset_both_on_close(&pair.client, &pair.upstream);
            return Err(Setup::Failed { side, error });
        }
    };
    let fallback = |pair: Pair, why: String| Setup::Fallback {
        pair,
        moved: carried,
        why,
    };
    if carried != [0; 2] {
        // What we relayed moved both sockets' counters.
        (pair, snaps) = match snapshots(pair) {
            Ok(s) => s,
            Err((pair, why)) => return Err(fallback(pair, why)),
        };
    }
    let mut cookies = [0u64; 2];
    let sent_base = snaps.map(|s| s.sent_into);
    let recv_base = snaps.map(|s| s.read_before());
    for i in 0..2 {
        let state = snaps[i].state;
        if state != sys::TCP_ESTABLISHED {
            let why = format!("{} socket in TCP state {state}", SIDES[i].as_str());
            return Err(fallback(pair, why));
        }
        match sys::cookie(fds[i]) {
            Ok(c) => cookies[i] = c,
            Err(e) => return Err(fallback(pair, format!("{}: {e}", SIDES[i].as_str()))),
        }
    }
    if PAIRS.fetch_add(1, Ordering::Relaxed) >= MAX_PAIRS {
        PAIRS.fetch_sub(1, Ordering::Relaxed);
        return Err(fallback(pair, format!("maps full ({MAX_PAIRS} pairs)")));
    }
    let mut entries = MapEntries {
        k,
        cookies,
        socks_in: [false; 2],
        members_in: [false; 2],
        socks_closed: false,
    };
    // The limits are set before any socket runs the program.
    if let Err(e) = k.init_dirs(cookies, PROGRAM_CAP * inflight_limit) {
        return Err(fallback(pair, format!("map update: {e}")));
    }
    // First both sockets become redirect targets (SOCKS runs no program: nothing
    // happens to their bytes yet), then each starts running the program (MEMBERS),
    // whose first verdict already finds its peer. With one map, the socket that
    // joined first had no peer for a moment and the program passed its bytes to us
    // (and, to keep order, every byte after them until we caught up: megabytes).
    // A socket that already received its FIN cannot join: nothing has happened yet.
    for key in [UPSTREAM, CLIENT] {
        let target = if key == UPSTREAM {
            &pair.client
        } else {
            &pair.upstream
        };
        if let Err(e) = k.insert_sock(cookies[key], target) {
            let who = SIDES[1 - key].as_str();
            return Err(fallback(pair, format!("{who} socket: {e}")));
        }
        entries.socks_in[key] = true;
    }
    if let Err(e) = k.join(cookies[CLIENT], &pair.client) {
        return Err(fallback(pair, format!("client socket: {e}")));
    }
    entries.members_in[CLIENT] = true;
    if let Err(e) = k.join(cookies[UPSTREAM], &pair.upstream) {
        // The client runs the program and may have redirected bytes already.
        return Err(salvage(entries, pair, sent_base[UPSTREAM], carried, e).await);
    }
    entries.members_in[UPSTREAM] = true;

    let client = pair.client.into_std();
    let upstream = pair.upstream.into_std();
    let (client, upstream) = match (client, upstream) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(e), _) | (_, Err(e)) => {
            return Err(Setup::Failed {
                side: Side::Client,
                error: e,
            })
        }
    };
    let dir = |src: usize, dst: usize| Dir {
        src,
        dst,
        carried: carried[src],
        before: 0,
        key: cookies[src],
        sent_base: sent_base[dst],
        recv_base: recv_base[src],
        consumed: 0,
        limit: PROGRAM_CAP * inflight_limit,
        accepted: 0,
        seen: 0,
        sleep: 0,
        buf: Vec::new(),
        off: 0,
        drain: None,
        fin: false,
        inflight: 0,
        pending: false,
        shut: false,
        want_in: false,
        want_out: false,
    };
    entries.socks_closed = true;
    let paired = Paired {
        entries,
        socks: [client, upstream],
        dirs: [dir(CLIENT, UPSTREAM), dir(UPSTREAM, CLIENT)],
        inflight_limit,
        leaving: false,
        parted: [false; 2],
        held: [false; 2],
        signals: Arc::new(PairSignals::default()),
        watching: None,
    };
    // Bytes queued before the sockets joined are not run through the program until
    // something pokes it: this recv does (it returns EAGAIN).
    for s in &paired.socks {
        kick(s);
    }
    Ok(paired)
}

/// Bytes queued on a socket before it ran the program are not handed to it until
/// something pokes it: this recv does (it returns EAGAIN).
fn kick(sock: &StdTcpStream) {
    let _ = sys::recv(
        sock.as_raw_fd(),
        &mut [0u8; 1],
        libc::MSG_PEEK | libc::MSG_DONTWAIT,
    );
}

/// At most this many bytes queued behind a read we relay ourselves before pairing;
/// a socket with more (a PROXY header, then an upload at full speed) goes to splice.
pub(super) const PARTLY_READ_MAX: u64 = 64 * 1024;

/// A socket that was read from before pairing (a PROXY header, say) can hold a partly
/// read skb, and `tcp_read_skb` would hand the program all of it: the bytes already
/// read would reach the peer a second time. So such a socket may only start running
/// the program with an empty receive queue (an skb read to its end is freed; new ones
/// arrive whole): relay what it has queued ourselves, before pairing (our own writes
/// must precede pairing anyway), by splice through a pooled pipe, so none of it
/// crosses our memory. Only a little, a few times: relaying a continuous stream here
/// would never end, and would block on a peer that answers while we do not read its
/// answers. Returns the bytes relayed per side, and whether the sockets drained (if
/// not, the pair goes to splice).
async fn relay_partly_read(
    pair: &Pair,
    read_before: [u64; 2],
) -> Result<([u64; 2], bool), (Side, io::Error)> {
    let mut carried = [0u64; 2];
    let mut pipe = None;
    let result = relay_queued(pair, read_before, &mut carried, &mut pipe).await;
    // Empty unless an error cut a write short: such a pipe is closed, not pooled.
    if let (Some(p), Ok(_)) = (pipe, &result) {
        p.give_back();
    }
    result.map(|drained| (carried, drained))
}

async fn relay_queued(
    pair: &Pair,
    read_before: [u64; 2],
    carried: &mut [u64; 2],
    pipe: &mut Option<Pipe>,
) -> Result<bool, (Side, io::Error)> {
    for i in 0..2 {
        let (src, dst) = match i {
            CLIENT => (&pair.client, &pair.upstream),
            _ => (&pair.upstream, &pair.client),
        };
        let fd = src.as_raw_fd();
        if read_before[i] == 0 {
            continue;
        }
        for _ in 0..4 {
            let queued = sys::inq(fd).map_err(|e| (SIDES[i], e))?;
            if queued == 0 {
                break;
            }
            if carried[i] + queued > PARTLY_READ_MAX {
                return Ok(false);
            }
            let p = match pipe {
                Some(p) => &*p,
                None => match Pipe::take() {
                    Ok(p) => &*pipe.insert(p),
                    // Out of fds for a pipe: the pair goes to splice, which copies
                    // through a buffer of ours until it can have one.
                    Err(e) if crate::server::is_resource_exhaustion(&e) => return Ok(false),
                    Err(e) => return Err((SIDES[i], e)),
                },
            };
            // At most 64 KiB, a pooled pipe's least size; a pipe out of slots (many
            // small skbs) splices short, and the next round takes the rest.
            let n = match splice::splice(fd, p.w.as_raw_fd(), queued as usize) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err((SIDES[i], e)),
            };
            splice::splice_out(p, dst, n)
                .await
                .map_err(|e| (SIDES[1 - i], e))?;
            carried[i] += n as u64;
        }
        if sys::inq(fd).map_err(|e| (SIDES[i], e))? != 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The upstream could not join MEMBERS after the client did: stops the client's
/// program and falls back to splice without losing what it already did. Its
/// redirected bytes must reach the upstream's send queue (they sit on the upstream's
/// psock, which leaving SOCKS would purge). Bytes it passed could only be read now
/// without TCP counting them (see [`Paired::leave_maps`]): if there are any, or the
/// redirected ones do not arrive, both sides are reset instead.
async fn salvage(
    mut entries: MapEntries,
    pair: Pair,
    up_base: u64,
    carried: [u64; 2],
    join_error: io::Error,
) -> Setup {
    let k = entries.k;
    let key = entries.cookies[CLIENT];
    let _ = tokio::task::spawn_blocking(move || k.part(&[key])).await;
    entries.members_in[CLIENT] = false;
    let up_fd = pair.upstream.as_raw_fd();
    let deadline = Instant::now() + Duration::from_millis(200);
    let settled = loop {
        // Also lets a verdict that was running when the client parted finish.
        tokio::time::sleep(MIN_TICK).await;
        let st = match k.dir_state(key) {
            Ok(st) if st.passed == 0 => st,
            _ => break None,
        };
        let delivered = sys::bytes_sent_into(up_fd).map_or(0, |b| b.saturating_sub(up_base));
        if delivered >= st.redirected {
            break Some(st.redirected);
        }
        if Instant::now() > deadline {
            break None;
        }
    };
    if let Some(redirected) = settled {
        drop(entries);
        return Setup::Fallback {
            moved: [carried[CLIENT] + redirected, carried[UPSTREAM]],
            pair,
            why: format!("upstream socket: {join_error}"),
        };
    }
    // Reset before the map entries go: the upstream's psock may still be sending.
    crate::relay::reset_both_now(&pair.client, &pair.upstream);
    drop(entries);
    Setup::Failed {
        side: Side::Upstream,
        error: io::Error::other(format!(
            "cannot pair upstream socket ({join_error}) and the client's bytes did not settle"
        )),
    }
}

impl Paired {
    /// What `watch` returned, as the pair's end (or its hand-off to splice).
    fn finish(
        &mut self,
        result: Result<Option<Handoff>, (usize, io::Error)>,
        progress: &Progress,
    ) -> Result<RelayEnd, Handoff> {
        // Passed bytes we relayed, and what a drain without a pipe copied (a drain
        // handed off counted its own).
        let copied: u64 = self
            .dirs
            .iter()
            .map(|d| d.consumed + d.drain.as_ref().map_or(0, |d| d.copied))
            .sum();
        progress.via_userspace.fetch_add(copied, Ordering::Relaxed);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let k = self.entries.k;
            let s = |d: &Dir| k.dir_state(d.key).unwrap_or_default();
            let (up, down) = (s(&self.dirs[0]), s(&self.dirs[1]));
            // trimmed: bytes TCP handed the program twice (overlapping retransmits),
            // cut off before they were relayed; untrimmed, seq_unknown: see DirState.
            let show = |d: &DirState| {
                format!(
                    "redirected={} passed={} trimmed={} untrimmed={} seq_unknown={}",
                    d.redirected, d.passed, d.trimmed, d.untrimmed, d.seq_unknown
                )
            };
            tracing::debug!("ebpf pair done: up {}, down {}", show(&up), show(&down));
        }
        match result {
            Ok(Some(Handoff)) => Err(Handoff),
            Ok(None) => Ok(RelayEnd::Closed),
            Err((i, error)) => {
                self.count_at_failure(progress);
                // Now, not at close: either socket's psock may still be sending.
                crate::relay::reset_both_now(&self.socks[0], &self.socks[1]);
                Ok(RelayEnd::Failed {
                    side: SIDES[i],
                    error,
                })
            }
        }
    }

    /// A failing pair (a reset, say) may end before any look counted its bytes (the
    /// first is a tick away): its close line said 0 bytes each way after a 5-byte
    /// echo. What each dst accepted is still in its counters (a reset socket keeps
    /// `bytes_acked`); counts only grow. A FIN we passed on takes a sequence number
    /// of its own, which those counters include: it is not a byte.
    fn count_at_failure(&self, progress: &Progress) {
        let counters = [&progress.to_upstream, &progress.to_client];
        for (dir, counter) in self.dirs.iter().zip(counters) {
            if let Ok(sent) = sys::bytes_sent_into(self.socks[dir.dst].as_raw_fd()) {
                let accepted = sent.saturating_sub(dir.sent_base + dir.shut as u64);
                counter.fetch_max(dir.before + dir.carried + accepted, Ordering::Relaxed);
            }
        }
    }

    /// The sockets as tokio streams again, after `leave_maps`.
    fn into_pair(self) -> io::Result<Pair> {
        let Paired {
            mut entries,
            mut watching,
            socks,
            ..
        } = self;
        if let Some(w) = &mut watching {
            w.socks_closed = false;
        }
        entries.socks_closed = false;
        drop(watching);
        drop(entries);
        let [client, upstream] = socks;
        client.set_nonblocking(true)?;
        upstream.set_nonblocking(true)?;
        Ok(Pair {
            client: tokio::net::TcpStream::from_std(client)?,
            upstream: tokio::net::TcpStream::from_std(upstream)?,
            tunnel: None,
        })
    }

    /// Whether socket `s` is still in the maps (in SOCKS it sits under its peer's
    /// cookie; both entries go together once paired).
    fn in_map(&self, s: usize) -> bool {
        self.entries.socks_in[1 - s]
    }

    /// Starts leaving the maps once a direction is a quarter way to its in-flight
    /// bound (the kernel's redirect worker is not keeping up with this pair, and
    /// splice, with TCP's own backpressure, serves it better), or once the program
    /// passed bytes to us (the bound was exceeded before we could raise it: to keep
    /// order, every later byte of that direction now comes through us until we catch
    /// up). Not while a FIN waits to be passed on; a direction whose FIN was passed
    /// on is done, and its source gets nothing more to pass (a request and its FIN,
    /// then a bulk answer: held on the kernel path, the answer past the bound came
    /// through our recv/send, 4-17 MB of 32).
    fn maybe_start_leaving(&mut self) {
        let fin = self.dirs.iter().any(|d| d.fin && !d.shut);
        for d in &self.dirs {
            if (d.inflight >= self.inflight_limit / 4 || d.pending) && (self.leaving || !fin) {
                self.leaving = true;
            }
        }
    }

    /// Leaves the maps in two steps. First each socket stops running the program
    /// (MEMBERS) as soon as every byte it passed has been read and sent on: from then
    /// on its new bytes wait in TCP's own queue, under TCP's backpressure. Then, with
    /// both parted, each leaves SOCKS, and with its last map its psock, once that
    /// psock holds nothing of ours (see [`Paired::leave_map`]). Returns whether both
    /// are out and the pair can go on in splice.
    ///
    /// Passed bytes must be read while the socket runs the program: only that
    /// recvmsg (`tcp_bpf_recvmsg_parser`) advances TCP's `copied_seq` for them; read
    /// after parting, TCP would count them as unread forever. A verdict that was
    /// running on another CPU as the socket parted may still pass bytes: then the
    /// socket joins again, and parts once those are read too.
    #[allow(clippy::needless_range_loop)] // indices name sides across several arrays
    async fn leave_maps(&mut self) -> Result<bool, (usize, io::Error)> {
        if !self.leaving {
            return Ok(false);
        }
        let k = self.entries.k;
        let mut parted_now = [None; 2];
        for s in 0..2 {
            if self.parted[s] {
                continue;
            }
            let own = k.dir_state(self.dirs[s].key).map_err(|e| (s, e))?;
            if own.passed != self.dirs[s].consumed || self.dirs[s].buffered() {
                // Passed bytes to relay first. A held socket's cannot be read: tcp_bpf's
                // recvmsg first offers what waits in TCP's own queue to the program
                // (tcp_data_ready, which a held socket declines) and then returns
                // EAGAIN without looking at the psock's queue. Such bytes come from a
                // verdict that ran as s was held, or from TCP handing skbs over under
                // memory pressure while s waited, held, for its peer. Kept held, the
                // pair stalled for good: 64 KiB passed and unreadable, and behind them
                // the window the hold had grown let the sender queue 1.8 MB (6 in 375
                // runs of pairs_move_both_ways_mid_transfer_100x).
                if self.held[s] {
                    self.release(s)?;
                }
                continue;
            }
            // Hold s first, so that its counters stand still while it parts: with
            // SO_RCVLOWAT at its maximum TCP hands the program nothing (but under
            // memory pressure, with a tiny window or at a FIN). Where the kernel
            // cannot part under the socket lock ([`Kernel::part`]) the hold is also
            // all that keeps a verdict from finding no program and dropping its skb
            // (measured as 30-64 KB that TCP let go of and nobody sent, caught by the
            // check in `leave_map`). Nothing of ours waits on s's psock for
            // receive-buffer room (passed == read), so holding cannot stall it.
            // Released once s is out of the maps, or when it passes bytes again.
            // A socket held on an earlier pass was already read as held: `own` is
            // its count (a verdict after that read is caught at parting, as for a
            // socket held just now).
            if !self.held[s] {
                sys::set_rcvlowat(self.socks[s].as_raw_fd(), libc::c_int::MAX)
                    .map_err(|e| (s, e))?;
                self.held[s] = true;
                // Verdicts that ran before the hold may have moved the counters.
                let held = k.dir_state(self.dirs[s].key).map_err(|e| (s, e))?;
                if held.passed != own.passed {
                    // Read those first (the next pass here tries again).
                    self.release(s)?;
                    continue;
                }
            }
            parted_now[s] = Some(own.passed);
        }
        // Both part in one walk: a socket ready first waits for the other, held (the
        // pair goes on only once both parted anyway).
        if (0..2).any(|s| !self.parted[s] && parted_now[s].is_none()) {
            return Ok(false);
        }
        for s in 0..2 {
            if parted_now[s].is_some() {
                self.unbound_for_parting(s)?;
            }
        }
        if let Some(delay) = part_delay() {
            Box::pin(tokio::time::sleep(delay)).await;
        }
        if parted_now.iter().any(Option::is_some) {
            // A socket that already received its FIN gets no more bytes, so no verdict:
            // it parts at once (most pairs leave as they end). The others need the
            // walk of the namespace's TCP sockets (about 3 ms), off the runtime's
            // threads. (Boxed: a pair waits here rarely, and inline this future would
            // size the one every idle pair holds.)
            let mut how = [Parted::Closed; 2];
            let began = std::time::Instant::now();
            let mut walk = Vec::new();
            for s in 0..2 {
                if parted_now[s].is_none() {
                    continue;
                }
                let state = sys::tcp_counters(self.socks[s].as_raw_fd())
                    .map_err(|e| (s, e))?
                    .state;
                if sys::fin_received(state) {
                    k.part_unlocked(&[self.entries.cookies[s]]);
                } else {
                    walk.push(s);
                }
            }
            if !walk.is_empty() {
                let cookies: Vec<u64> = walk.iter().map(|&s| self.entries.cookies[s]).collect();
                let walked = Box::pin(tokio::task::spawn_blocking(move || k.part(&cookies)))
                    .await
                    .unwrap_or(Parted::Unlocked);
                for s in walk {
                    how[s] = walked;
                }
            }
            for s in 0..2 {
                if parted_now[s].is_some() {
                    self.entries.members_in[s] = false;
                    self.parted[s] = true;
                    tracing::debug!(
                        "ebpf: {} parted {} in {:?}",
                        SIDES[s].as_str(),
                        how[s].as_str(),
                        began.elapsed()
                    );
                }
            }
            if how.contains(&Parted::Unlocked) {
                // Parted without the socket lock: a verdict already running on another
                // CPU finishes within its RCU section.
                Box::pin(tokio::time::sleep(MIN_TICK)).await;
            }
            // A verdict that ran between the counters' read and the part may have
            // passed bytes, which can be read only from inside the maps.
            for (s, passed) in parted_now.into_iter().enumerate() {
                let Some(passed) = passed else { continue };
                // Parted, s runs no program: these counters stand still until it joins.
                let now = k.dir_state(self.dirs[s].key).map_err(|e| (s, e))?;
                if now.passed == passed {
                    continue;
                }
                // Bounded again from the moment it joins.
                self.set_limit(s, now.redirected + self.inflight_limit)?;
                k.join(self.entries.cookies[s], &self.socks[s])
                    .map_err(|e| {
                        let why = format!(
                            "bytes passed while parting from the sockmap, and it cannot join again to read them: {e}"
                        );
                        (s, io::Error::new(e.kind(), why))
                    })?;
                self.entries.members_in[s] = true;
                self.parted[s] = false;
                // Releasing the hold hands bytes queued meanwhile to the program.
                self.release(s)?;
                tracing::debug!(
                    "ebpf: {} passed bytes while parting; joined again",
                    SIDES[s].as_str()
                );
            }
            return Ok(false);
        }
        if self.parted != [true, true] {
            return Ok(false);
        }
        for s in 0..2 {
            if self.in_map(s) {
                self.leave_map(s)?;
            }
        }
        if self.in_map(CLIENT) || self.in_map(UPSTREAM) || self.dirs.iter().any(Dir::holds_bytes) {
            return Ok(false);
        }
        tracing::debug!(
            "ebpf: in-flight bound reached; pair left the sockmap, continuing in splice"
        );
        Ok(true)
    }

    /// Ends socket `s`'s hold (see [`Paired::leave_maps`]): TCP hands its queue to the
    /// program again, or to our reads once s is out of the maps.
    fn release(&mut self, s: usize) -> Result<(), (usize, io::Error)> {
        sys::set_rcvlowat(self.socks[s].as_raw_fd(), 1).map_err(|e| (s, e))?;
        self.held[s] = false;
        Ok(())
    }

    /// Lifts socket `s`'s limit while it parts: until the part is done, a verdict
    /// redirects whatever TCP hands it, where at the limit it would pass. Passed bytes
    /// can be read only by joining again (see [`Paired::leave_maps`]), which a socket
    /// that got its FIN meanwhile cannot do: the pair would have to be reset. Seen in
    /// 1 of 3 runs of the ebpf relay suite with a room of one receive buffer, when
    /// parting took microseconds: a bulk pair at its limit parted, a verdict passed
    /// 5.7 MB, and the upstream had sent its FIN (EOPNOTSUPP from the sockmap). Parting
    /// under the socket lock takes a walk of the namespace's TCP sockets (about 2 ms
    /// here), and TCP, held, still hands skbs over under memory pressure: 9.7 MB were
    /// passed past such a room. Unbounded, the bytes in flight can exceed the bound by
    /// what the sender gets through during the part.
    fn unbound_for_parting(&mut self, s: usize) -> Result<(), (usize, io::Error)> {
        self.set_limit(s, u64::MAX)
    }

    fn set_limit(&mut self, s: usize, limit: u64) -> Result<(), (usize, io::Error)> {
        let dir = &mut self.dirs[s];
        dir.limit = limit;
        self.entries
            .k
            .set_control(dir.key, dir.control())
            .map_err(|e| (s, e))
    }

    /// Takes parted socket `s` out of SOCKS once its psock holds nothing of ours:
    /// every byte redirected into it accepted by its send queue, every byte it passed
    /// read and sent on. Leaving purges the psock's queues, so anything else there
    /// would be lost: that is checked, and fails the pair rather than corrupt it.
    fn leave_map(&mut self, s: usize) -> Result<(), (usize, io::Error)> {
        let k = self.entries.k;
        let p = 1 - s;
        let fd = self.socks[s].as_raw_fd();
        let own = k.dir_state(self.dirs[s].key).map_err(|e| (s, e))?;
        let into = k.dir_state(self.dirs[p].key).map_err(|e| (p, e))?;
        if own.passed != self.dirs[s].consumed || self.delivered(p)? < into.redirected {
            return Ok(());
        }
        k.remove_sock(self.entries.cookies[p]);
        self.entries.socks_in[p] = false;
        // Plain TCP again: release the hold (this wakes whoever reads s next).
        self.release(s)?;
        self.dirs[p].inflight = 0;
        // What TCP holds for us must be exactly what the program never saw: a
        // receive sequence the sockmap code left behind would make TCP skip data.
        let r = sys::snapshot(fd).map_err(|e| (s, e))?;
        // A reset socket is in TCP_CLOSE with no FIN received, which the counters
        // cannot tell from one closed after a FIN (`snapshot` counts that FIN out): the
        // reset ends the pair, before a count that may be off by that FIN.
        self.check_reset(s, r.state)?;
        let held = r.data.saturating_sub(
            self.dirs[s].recv_base + own.redirected + own.passed + self.dirs[s].drained_from_src(),
        );
        if r.unread != held {
            return Err((
                s,
                io::Error::other(format!(
                    "after leaving the sockmap TCP reports {} unread bytes, {held} expected",
                    r.unread
                )),
            ));
        }
        tracing::debug!(
            "ebpf: {} left the sockmap: redirected={} passed={} received={} unread={}; into it: redirected={}",
            SIDES[s].as_str(),
            own.redirected,
            own.passed,
            r.data,
            r.unread,
            into.redirected
        );
        Ok(())
    }

    /// Redirected bytes of direction `d` that its dst has accepted.
    fn delivered(&self, d: usize) -> Result<u64, (usize, io::Error)> {
        let dir = &self.dirs[d];
        let accepted = sys::bytes_sent_into(self.socks[dir.dst].as_raw_fd())
            .map_err(|e| (dir.dst, e))?
            .saturating_sub(dir.sent_base);
        Ok(dir.redirected_in(accepted))
    }

    /// The watch loop: returns when both FINs are passed on, or which side failed.
    #[allow(clippy::needless_range_loop)] // indices name sides across several arrays
    async fn watch(&mut self, progress: &Progress) -> Result<Option<Handoff>, (usize, io::Error)> {
        let base = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        let mut masks = [0u32; 2];
        let k = self.entries.k;
        let cookies = self.entries.cookies;
        // The guard first: if a registration fails, it takes out what was made.
        let watching = Watching {
            k,
            cookies,
            fds: [self.socks[0].as_raw_fd(), self.socks[1].as_raw_fd()],
            socks_closed: true,
        };
        for i in 0..2 {
            k.watch(cookies[i], &self.socks[i], i, base, self.signals.clone())
                .map_err(|e| (i, e))?;
            masks[i] = base;
        }
        self.watching = Some(watching);
        let mut tick = MIN_TICK;
        let mut quick_looks = 0;
        // Whether the program holds our request for a wake-up on its next skb
        // (`ask_for_wake_up`); it answers at most once per request.
        let mut armed = false;
        let mut timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        let counters = [&progress.to_upstream, &progress.to_client];
        for (dir, counter) in self.dirs.iter_mut().zip(counters) {
            dir.before = counter.load(Ordering::Relaxed);
        }
        // The first look is the first tick's (1 ms on) or an event's: just paired,
        // nothing needs a step yet (the limit starts at the program's cap, and an end
        // arrives as an event), and a short connection is spared six syscalls.
        let mut first = true;
        loop {
            let mut events = false;
            let mut hangup = [false; 2];
            for i in 0..2 {
                let ev = self.signals.events[i].swap(0, Ordering::Relaxed);
                if ev != 0 {
                    events = true;
                    hangup[i] = self.on_event(i, ev)?;
                }
            }
            // Just paired counts as movement: the tick starts fast.
            let mut moved = first && !events;
            if !moved {
                let look = self.read_dirs()?;
                // Before any step: a reset must not pass for a FIN.
                for (s, state) in look.states.into_iter().enumerate() {
                    if let (true, Some(state)) = (hangup[s], state) {
                        self.check_reset(s, state)?;
                    }
                }
                for d in 0..2 {
                    moved |= self.step(d, look.dirs[d], counters[d])?;
                }
            }
            first = false;
            if moved {
                progress.touch();
            }
            if self.dirs.iter().all(|d| d.shut) {
                return Ok(None);
            }
            self.maybe_start_leaving();
            if self.leave_maps().await? {
                // Splice counts on from what dst accepted by now, which includes
                // redirected bytes that landed since the last step.
                for d in 0..2 {
                    let dir = &self.dirs[d];
                    if dir.shut {
                        // Final already; dst's counters now include our FIN.
                        continue;
                    }
                    let delivered = self.delivered(d)?;
                    tracing::debug!(
                        "ebpf: handoff {}: consumed={} delivered={} fin={}",
                        SIDES[d].as_str(),
                        dir.consumed,
                        delivered,
                        dir.fin
                    );
                    counters[d].store(
                        dir.before + dir.carried + dir.consumed + dir.drained() + delivered,
                        Ordering::Relaxed,
                    );
                }
                for dir in &mut self.dirs {
                    // Empty by now (`leave_maps` waits for that).
                    if let Some(drain) = dir.drain.take() {
                        tracing::debug!(
                            "ebpf: {} moved {} bytes ({} copied) while the pair left the sockmap",
                            SIDES[dir.src].as_str(),
                            drain.moved,
                            drain.copied
                        );
                        progress
                            .via_userspace
                            .fetch_add(drain.copied, Ordering::Relaxed);
                        if let Some(pipe) = drain.pipe {
                            pipe.give_back();
                        }
                    }
                }
                return Ok(Some(Handoff));
            }
            let fin_due = self.dirs.iter().any(|d| d.fin && !d.shut);
            let waiting = self.leaving || fin_due;
            if !fin_due {
                quick_looks = 0;
            }
            tick = if moved {
                armed = false;
                MIN_TICK
            } else if waiting {
                // Leaving, or a FIN behind bytes still to land, and nothing moved: a
                // reader that stopped keeps the bytes in flight where they are, for as
                // long as it likes. Looked at every 1 ms, such a stalled pair cost
                // ~7,000 syscalls a second (audit); backed off, a few dozen, and its
                // reader's return (EPOLLOUT) still wakes it at once. (No wake-up is
                // asked for meanwhile: the next quiet spell asks afresh.)
                armed = false;
                (tick * 2).min(LEAVING_MAX_TICK)
            } else {
                (tick * 2).min(MAX_TICK)
            };
            // Backing off, so the next look is 2 ms or more away: ask the program for a
            // wake-up on the next skb, once per quiet spell. Without it, bytes that
            // started during a long wait went unseen until its end (a request, a pause
            // of 14-40 ms, then 64 MiB: the burst reached the program's cap before the
            // look that would start leaving, and up to 43 MB came through our
            // recv/send).
            if tick > MIN_TICK && !armed && !waiting {
                if self.ask_for_wake_up()? {
                    armed = true;
                } else {
                    // Bytes came in before the program saw the request: look again soon.
                    tick = MIN_TICK;
                }
            }
            // Idle: ask for EPOLLIN too, which is all a socket whose skbs the program
            // consumes can raise (spuriously, so not while bytes move). On 6.18 a
            // redirected skb wakes nobody: the idle tick bounds how late we see it
            // (`EbpfRelay::progress_lag`).
            let idle = tick > MIN_TICK * 4;
            for i in 0..2 {
                let src_dir = &self.dirs[i];
                let dst_dir = &self.dirs[1 - i];
                let mut m = base;
                if src_dir.want_in || (idle && !src_dir.fin) {
                    m |= libc::EPOLLIN as u32;
                }
                if dst_dir.want_out {
                    m |= libc::EPOLLOUT as u32;
                }
                if m != masks[i] {
                    k.rewatch(cookies[i], &self.socks[i], m)
                        .map_err(|e| (i, e))?;
                    masks[i] = m;
                }
            }
            // Quiet for a while with nothing of ours in flight: sleep until the
            // program posts the wake-up asked for above (or epoll reports an end),
            // instead of ticking.
            let asleep = armed
                && !waiting
                && tick >= SLEEP_AFTER
                && self
                    .dirs
                    .iter()
                    .all(|d| d.inflight == 0 && !d.pending && !d.buffered());
            // Epoll events and wake-ups both arrive as a notification (a permit is
            // kept if none is awaited, so none is missed). The tick's timer is boxed,
            // and dropped while the pair sleeps: a sleeping pair, which is what 10,000
            // idle pairs are, then holds no timer (the kernel path's sleep check
            // wakes it now and then instead).
            if asleep {
                timer = None;
                loop {
                    self.signals.notify.notified().await;
                    // An epoll event or bytes (the program's wake-up) mean work. The
                    // lost-wake-up check finding neither costs two map reads, and the
                    // pair sleeps on: the program still holds this sleep's request.
                    if self
                        .signals
                        .events
                        .iter()
                        .any(|e| e.load(Ordering::Relaxed) != 0)
                        || self.unseen_bytes()?
                    {
                        break;
                    }
                }
            } else if fin_due && !self.leaving && quick_looks < QUICK_LOOKS {
                // Events that arrive meanwhile stay in `signals` for the next look.
                quick_looks += 1;
                tokio::task::yield_now().await;
            } else {
                let at = tokio::time::Instant::now() + tick;
                let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                t.as_mut().reset(at);
                tokio::select! {
                    _ = self.signals.notify.notified() => {}
                    _ = t.as_mut() => {}
                }
            }
        }
    }

    /// Asks the program to post a wake-up on either direction's next skb, then looks
    /// at the counters once more: bytes that slipped in before it saw the request are
    /// there. Returns false if some did (the request stands, but a look is due).
    /// (The program updates its counters
    /// before it reads the request; we write the request before we read them: one of
    /// the two sees the other.)
    fn ask_for_wake_up(&mut self) -> Result<bool, (usize, io::Error)> {
        let k = self.entries.k;
        for dir in &mut self.dirs {
            dir.sleep += 1;
            k.set_control(dir.key, dir.control())
                .map_err(|e| (dir.src, e))?;
        }
        Ok(!self.unseen_bytes()?)
    }

    /// Whether the program has counted bytes since the last step.
    fn unseen_bytes(&self) -> Result<bool, (usize, io::Error)> {
        for dir in &self.dirs {
            let st = self
                .entries
                .k
                .dir_state(dir.key)
                .map_err(|e| (dir.src, e))?;
            if st.redirected + st.passed != dir.seen {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn on_event(&mut self, i: usize, ev: u32) -> Result<bool, (usize, io::Error)> {
        let fd = self.socks[i].as_raw_fd();
        if ev & libc::EPOLLERR as u32 != 0 {
            match sys::take_error(fd) {
                Ok(0) => {}
                // EPIPE too is an end: the kernel failed to send redirected bytes into
                // this socket and stopped its psock, which from now on drops whatever
                // is redirected into it or passed on it. (The program drops FIN-only
                // skbs, which used to cause exactly this.)
                Ok(e) => return Err((i, io::Error::from_raw_os_error(e))),
                Err(e) => return Err((i, e)),
            }
        }
        if ev & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            self.dirs[i].fin = true;
        }
        // Whether the socket's state must be checked for a reset (from the tcp_info
        // the next look reads anyway).
        Ok(ev & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0)
    }

    /// Socket `s` in TCP_CLOSE without our FIN having been passed into it: its peer
    /// reset it (a FIN alone cannot take it there while our side is open).
    fn check_reset(&self, s: usize, state: u8) -> Result<(), (usize, io::Error)> {
        if state == sys::TCP_CLOSE && !self.dirs[1 - s].shut {
            return Err((s, io::Error::from_raw_os_error(libc::ECONNRESET)));
        }
        Ok(())
    }

    /// Each open direction's counters, as [`read_dir`] reads them, with each socket's
    /// tcp_info read once for both directions (it is one direction's src and the
    /// other's dst): both STATEs first, then the TCP counters, as the duplication check
    /// needs. `None` for a direction whose FIN was passed on. Also each socket's TCP
    /// state (`None` once both directions are shut).
    #[allow(clippy::needless_range_loop)] // indices name sides across several arrays
    fn read_dirs(&self) -> Result<Look, (usize, io::Error)> {
        let k = self.entries.k;
        let mut st = [None; 2];
        for d in 0..2 {
            if !self.dirs[d].shut {
                st[d] = Some(k.dir_state(self.dirs[d].key).map_err(|e| (d, e))?);
            }
        }
        if st == [None; 2] {
            return Ok(Look {
                dirs: [None; 2],
                states: [None; 2],
            });
        }
        let mut tcp = [None; 2];
        for s in 0..2 {
            tcp[s] = Some(sys::tcp_counters(self.socks[s].as_raw_fd()).map_err(|e| (s, e))?);
        }
        let mut out = [None; 2];
        for d in 0..2 {
            let (Some(st), Some(src), Some(dst)) = (st[d], tcp[d], tcp[1 - d]) else {
                continue;
            };
            let dir = &self.dirs[d];
            out[d] = Some(reading(dir, st, src, dst, self.socks[dir.dst].as_raw_fd())?);
        }
        Ok(Look {
            dirs: out,
            states: tcp.map(|t| t.map(|t| t.state)),
        })
    }

    /// Whether a byte read from one socket has not yet reached the other's queue, by a
    /// fresh look (the last step's may be a tick old): redirected and not yet in dst,
    /// passed to us and not yet relayed, or in our buffer or drain pipe. A look that
    /// fails counts as yes.
    fn bytes_on_their_way(&self) -> bool {
        let Ok(look) = self.read_dirs() else {
            return true;
        };
        self.dirs.iter().zip(look.dirs).any(|(dir, reading)| {
            dir.holds_bytes()
                || reading.is_some_and(|(st, _, accepted)| {
                    st.redirected > dir.redirected_in(accepted) || st.passed > dir.consumed
                })
        })
    }

    /// Whether a socket that ran the program (`members`) lost bytes as it parted: TCP
    /// received more than its queue holds plus what the program saw (see [`CutCheck`]).
    /// `queues`: each socket's snapshot, taken after parting (its lock waited out any
    /// verdict still running); STATE is read after them, so it is final. A look that
    /// fails counts as yes.
    fn dropped_at_parting(
        &self,
        members: [bool; 2],
        queues: &[io::Result<sys::Snapshot>; 2],
    ) -> bool {
        let k = self.entries.k;
        self.dirs.iter().any(|dir| {
            if dir.shut || !members[dir.src] {
                return false;
            }
            let (Ok(q), Ok(st)) = (&queues[dir.src], k.dir_state(dir.key)) else {
                return true;
            };
            let seen = dir.recv_base + st.redirected + st.passed + dir.drained_from_src();
            q.data.saturating_sub(seen) != q.unread
        })
    }

    /// Bookkeeping for one direction, from its counters as read by [`Paired::read_dirs`];
    /// returns whether any byte moved.
    fn step(
        &mut self,
        d: usize,
        reading: Option<Reading>,
        counter: &AtomicU64,
    ) -> Result<bool, (usize, io::Error)> {
        let k = self.entries.k;
        let limit_bytes = PROGRAM_CAP * self.inflight_limit;
        let step_up = self.inflight_limit / 4;
        let src_in_map = self.in_map(d);
        // Passed bytes are read only while src runs the program (see `leave_maps`).
        let parted = self.parted[d];
        // Src parted and dst left: this direction goes on by splice (see [`Drain`]).
        // Unheld, src raises EPOLLIN again.
        let drain = parted && !self.in_map(1 - d) && reading.is_some();
        if drain && self.held[d] {
            self.release(d)?;
        }
        let dir = &mut self.dirs[d];
        let (src, dst) = (&self.socks[dir.src], &self.socks[dir.dst]);
        let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
        dir.want_in = false;
        dir.want_out = false;
        // None: the direction is shut.
        let Some((st, mut received, mut accepted)) = reading else {
            return Ok(false);
        };
        // Bytes the program redirected count as movement too: when the kernel's
        // redirect worker falls behind, dst accepts nothing while the in-flight bytes
        // grow, and the tick must stay fast to see them reach the leaving threshold.
        let seen = st.redirected + st.passed;
        let mut moved = accepted != dir.accepted || seen != dir.seen;
        dir.accepted = accepted;
        dir.seen = seen;
        counter.store(dir.before + dir.carried + accepted, Ordering::Relaxed);
        let from_redirect = dir.redirected_in(accepted);
        let inflight = st.redirected.saturating_sub(from_redirect);
        let consumed_before = dir.consumed;
        if st.passed > dir.consumed || dir.buffered() {
            if parted {
                // Its passed bytes are read once it joins again.
            } else if inflight > 0 {
                // Passed bytes must not overtake redirected ones still on their way
                // into dst: wait until dst took them all (dst writable = progress).
                dir.want_out = true;
            } else {
                moved |= copy(k, dir, st.passed, src_fd, dst_fd)?;
            }
        }
        dir.inflight = inflight;
        if drain {
            moved |= drain_parted(dir, src_fd, dst_fd)?;
        }
        // After a copy, look again: leaving and the FIN check need the state as of now,
        // and `Progress` must count the copied bytes before anything else can end the
        // pair (a close line whose `userspace_bytes` exceeded its byte counts was seen
        // when a pair failed right after a large copy).
        let st = if dir.consumed != consumed_before {
            let st;
            (st, received, accepted) = read_dir(k, dir, src_fd, dst_fd)?;
            counter.store(dir.before + dir.carried + accepted, Ordering::Relaxed);
            st
        } else {
            st
        };
        dir.pending = st.passed > dir.consumed;
        // Raised a quarter of inflight_limit at a time: the limit stays PROGRAM_CAP
        // times that ahead of what dst accepted, so a map write per 64-byte message
        // (or per tick of a bulk transfer) would buy nothing.
        let limit = from_redirect + limit_bytes;
        if limit >= dir.limit + step_up.max(1) || dir.consumed != consumed_before {
            dir.limit = limit;
            k.set_control(dir.key, dir.control())
                .map_err(|e| (dir.src, e))?;
        }
        // Once src left the map its FIN waits behind bytes in TCP's queue: splice
        // passes it on after them.
        if dir.fin && !dir.buffered() && src_in_map {
            // Every byte received before the FIN must be in dst's send queue before the
            // FIN is passed on: shutdown drops whatever is still queued for dst. The
            // counters this step read were read after the FIN was seen (`on_event` runs
            // before the steps), and again after a copy.
            let target = received.saturating_sub(1 + dir.recv_base);
            if accepted >= target && st.passed <= dir.consumed {
                if accepted > target {
                    tracing::debug!("ebpf: dst accepted {accepted} > {target} received");
                }
                crate::relay::pass_fin(dst).map_err(|e| (dir.dst, e))?;
                dir.shut = true;
                dir.buf = Vec::new();
            }
        }
        Ok(moved)
    }
}

/// What one look at a pair reads (see [`Paired::read_dirs`]).
struct Look {
    dirs: [Option<Reading>; 2],
    /// Each socket's TCP state (`None` once both directions are shut).
    states: [Option<u8>; 2],
}

/// One direction's counters: STATE, src's `bytes_received` (tcp_info's, which counts
/// a FIN as one byte), and the bytes dst accepted since pairing.
type Reading = (DirState, u64, u64);

/// One direction's counters, in the order they must be read (the program counts bytes
/// after TCP received them): STATE, then src's `bytes_received` (checked against it),
/// then the bytes dst accepted since pairing.
fn read_dir(
    k: &Kernel,
    dir: &Dir,
    src_fd: RawFd,
    dst_fd: RawFd,
) -> Result<Reading, (usize, io::Error)> {
    let st = k.dir_state(dir.key).map_err(|e| (dir.src, e))?;
    let src = sys::tcp_counters(src_fd).map_err(|e| (dir.src, e))?;
    let dst = sys::tcp_counters(dst_fd).map_err(|e| (dir.dst, e))?;
    reading(dir, st, src, dst, dst_fd)
}

/// One direction's [`Reading`] from its STATE and both sockets' tcp_info, read in that
/// order; SIOCOUTQ of dst is read last, so an ACK in between can only make `accepted`
/// an underestimate, which the next look corrects.
fn reading(
    dir: &Dir,
    st: DirState,
    src: sys::TcpCounters,
    dst: sys::TcpCounters,
    dst_fd: RawFd,
) -> Result<Reading, (usize, io::Error)> {
    // A src we reset (`reset_now`) has no counters left to check: tcp_disconnect
    // zeroes `bytes_received`, and the look `CutCheck` takes after a limit cut a
    // stalled pair read every byte redirected as "handed to the program twice", a
    // false ERROR line on each such cut. (A socket closed any other way keeps its
    // count, which is at least 1 for a FIN, and is checked.)
    let received = if src.state == sys::TCP_CLOSE && src.bytes_received == 0 {
        src.bytes_received
    } else {
        verify_no_duplication(st, dir, src.bytes_received)?
    };
    let queued = sys::outq(dst_fd).map_err(|e| (dir.dst, e))?;
    let accepted = (dst.bytes_acked + queued).saturating_sub(dir.sent_base);
    Ok((st, received, accepted))
}

/// Fails the pair when the program has seen more bytes than TCP received on `src`.
///
/// `tcp_read_skb` hands the program a retransmitted segment that overlaps bytes TCP
/// already had whole (TCP's own readers skip the overlap by `copied_seq`). The program
/// trims that overlap where it can read the skb's sequence number (CAP_PERFMON); this
/// check is what remains where it cannot (the plain verdict), or where its expected
/// sequence number was learnt from an overlapping first skb (docs/ARCHITECTURE.md).
/// Forwarding a corrupted stream silently is the worst outcome; a reset on both sides
/// is what a broken network would show.
/// `st` must be read before the TCP counters: the program counts bytes after TCP has
/// received them. Takes and returns src's `bytes_received`, read after `st`.
fn verify_no_duplication(
    st: DirState,
    dir: &Dir,
    bytes_received: u64,
) -> Result<u64, (usize, io::Error)> {
    let received = bytes_received.saturating_sub(dir.recv_base);
    let seen = st.redirected + st.passed;
    if seen > received {
        tracing::error!(
            "ebpf: the kernel handed the program {} bytes more than TCP received (redirected={} passed={} received={} trimmed={} untrimmed={} seq_unknown={}); resetting the pair",
            seen - received,
            st.redirected,
            st.passed,
            received,
            st.trimmed,
            st.untrimmed,
            st.seq_unknown
        );
        return Err((
            dir.src,
            io::Error::other("kernel duplicated bytes on the sockmap path"),
        ));
    }
    Ok(bytes_received)
}

/// For tests only: `FORWARDER_TEST_PART_DELAY_MS` holds sockets that long between their
/// hold and their part, as a loaded host's slow walk does (the deadlock [`Drain`]
/// prevents needed a peer's FIN in that moment: about 1 run in 20 beside the relay
/// suite, every run with 300 ms here).
fn part_delay() -> Option<Duration> {
    static DELAY: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        let ms = std::env::var("FORWARDER_TEST_PART_DELAY_MS").ok()?;
        ms.parse().ok().map(Duration::from_millis)
    })
}

/// For tests only: with `FORWARDER_TEST_DRAIN_WITHOUT_PIPE` set, a drain never takes a
/// pipe, as when the process is out of fds and the pool is empty (which a test cannot
/// arrange at the moment a pair leaves).
fn drain_without_pipe() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SET.get_or_init(|| std::env::var_os("FORWARDER_TEST_DRAIN_WITHOUT_PIPE").is_some())
}

/// Splices what waits in parted src's own queue to dst (see [`Drain`]), until src is
/// empty or dst full. At src's EOF the FIN goes on from [`Paired::step`], once dst
/// accepted every byte before it.
fn drain_parted(dir: &mut Dir, src_fd: RawFd, dst_fd: RawFd) -> Result<bool, (usize, io::Error)> {
    let d = dir.drain.get_or_insert_with(|| {
        Box::new(Drain {
            pipe: None,
            buf: Vec::new(),
            off: 0,
            in_pipe: 0,
            moved: 0,
            copied: 0,
        })
    });
    if d.pipe.is_none() && d.in_pipe == 0 && !drain_without_pipe() {
        match Pipe::take() {
            Ok(pipe) => {
                d.pipe = Some(pipe);
                d.buf = Vec::new();
            }
            Err(e) if crate::server::is_resource_exhaustion(&e) => {}
            Err(e) => return Err((dir.src, e)),
        }
    }
    let mut moved = 0u64;
    while moved < COPY_BUDGET {
        if d.in_pipe == 0 {
            let read = match &d.pipe {
                Some(pipe) => splice::splice(src_fd, pipe.w.as_raw_fd(), pipe.size),
                // recv would skip an urgent byte where splice stops: stop there too
                // (the splice relay the pair goes on in passes it on).
                None if sys::at_urgent_mark(src_fd) => Ok(0),
                None => {
                    d.buf.resize(DRAIN_BUF, 0);
                    d.off = 0;
                    sys::recv(src_fd, &mut d.buf, libc::MSG_DONTWAIT)
                }
            };
            match read {
                // EOF, or an urgent mark: nothing more to move here.
                Ok(0) => break,
                Ok(n) => d.in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dir.want_in = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((dir.src, e)),
            }
        }
        let written = match &d.pipe {
            Some(pipe) => splice::splice(pipe.r.as_raw_fd(), dst_fd, d.in_pipe),
            None => sys::send(dst_fd, &d.buf[d.off..d.off + d.in_pipe]),
        };
        match written {
            Ok(n) => {
                d.in_pipe -= n;
                d.moved += n as u64;
                if d.pipe.is_none() {
                    d.off += n;
                    d.copied += n as u64;
                }
                moved += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dir.want_out = true;
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((dir.dst, e)),
        }
    }
    Ok(moved > 0)
}

/// Relays bytes the program passed (left on src's queue) with recv/send, stopping when
/// dst is full: then they stay charged to src's receive buffer and its window closes.
///
/// Only while src runs the program (its recvmsg, `tcp_bpf_recvmsg_parser`, reads just
/// the psock queue and advances `copied_seq`), and never more than the program passed.
fn copy(
    k: &Kernel,
    dir: &mut Dir,
    passed: u64,
    src_fd: RawFd,
    dst_fd: RawFd,
) -> Result<bool, (usize, io::Error)> {
    let mut copied = 0u64;
    while copied < COPY_BUDGET {
        if !dir.buffered() {
            let want = passed.saturating_sub(dir.consumed).min(COPY_BUF as u64) as usize;
            if want == 0 {
                dir.buf.clear();
                dir.off = 0;
                dir.want_in = true;
                break;
            }
            if dir.buf.len() < want {
                dir.buf.resize(want, 0);
            }
            match sys::recv(src_fd, &mut dir.buf[..want], libc::MSG_DONTWAIT) {
                Ok(0) => {
                    // EOF, or passed bytes still on the kernel's backlog: they raise
                    // EPOLLIN when they land.
                    dir.buf.clear();
                    dir.off = 0;
                    dir.want_in = true;
                    break;
                }
                Ok(n) => {
                    dir.buf.truncate(n);
                    dir.off = 0;
                    // The program counted these bytes before they became readable, so
                    // a duplicate among them shows now, before we send any of it.
                    let st = k.dir_state(dir.key).map_err(|e| (dir.src, e))?;
                    let src = sys::tcp_counters(src_fd).map_err(|e| (dir.src, e))?;
                    verify_no_duplication(st, dir, src.bytes_received)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dir.buf.clear();
                    dir.off = 0;
                    dir.want_in = true;
                    break;
                }
                Err(e) => return Err((dir.src, e)),
            }
        }
        match sys::send(dst_fd, &dir.buf[dir.off..]) {
            Ok(n) => {
                dir.off += n;
                dir.consumed += n as u64;
                copied += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                dir.want_out = true;
                break;
            }
            Err(e) => return Err((dir.dst, e)),
        }
    }
    Ok(copied > 0)
}
