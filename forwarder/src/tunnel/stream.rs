//! One tunnel stream, the same on both sides: the local socket (the visitor on the
//! server, the target on the agent) and the stream's current data connection, joined
//! by splice(2) like any pair, plus what it takes to survive losing the data
//! connection.
//!
//! **Retention.** Every byte read from the local socket is `tee`d into a retention
//! pipe before it is spliced to the data connection, and stays there until the peer
//! acknowledges it (over the control connection). A retention pipe holds page
//! references, not copies, so bytes still never cross userspace. On reattach both
//! ends first exchange how many bytes they have received (`Resume`), drop what the
//! other already has, and replay the rest from the retention pipe (`tee` into a
//! scratch pipe, then splice). At most `limit` (resume_buffer) bytes are held per
//! direction; then the local socket is not read and TCP pushes back.
//!
//! **Ends.** The data connection's own FIN or reset means only "this data connection
//! is gone": a stream's end travels as a `Fin { at }` (or `Reset`) control frame, and a
//! half-close is passed on once exactly `at` bytes have been delivered. A stream is
//! done when its local source ended and the peer acknowledged every byte of it, and
//! the peer's FIN was delivered.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::proto::{read_frame, write_frame, Frame};
use crate::inspect::dump::Dump;
use crate::relay::pace::Bucket;
use crate::relay::splice::{
    fill_from, into_empty_pipe, past_urgent_mark, show, socket_error, splice, Fill, Pipe, Sender,
};
use crate::relay::{reset_on_close, Handover, Hop, Progress, RelayEnd, Side};

/// What the session tells a stream.
pub enum Event {
    /// A new data connection for this stream, authenticated, before `Resume`.
    Attach(TcpStream),
    /// Server side: a pooled data connection on which this stream's `Open` is sent
    /// again (by the stream, `Link::open`), because the agent's resume showed that
    /// the first one never reached it: the agent starts the stream afresh, so
    /// everything retained goes again from byte 0.
    Reopen(TcpStream),
    /// The peer received this many bytes of ours.
    Ack(u64),
    /// The peer's source ended after this many bytes.
    Fin(u64),
    /// The peer's end was reset, or the peer no longer knows the stream.
    Reset,
    /// Server side: the agent could not connect the target (`at the agent: why`, as the
    /// close line's `connect_failed (...)` says it).
    Unreachable(String),
    /// The link was not back within resume_grace.
    GraceExpired,
}

/// What a stream needs from its session (server or agent side).
pub trait Session: Send + Sync {
    /// Sends a control frame if the link is up; dropped otherwise (resume resyncs).
    fn send(&self, frame: Frame);
    /// The stream ended: forget it.
    fn forget(&self, stream: u64);
    /// The stream ended complete: `sent` bytes went to the peer, `received` came from
    /// it, both ends were passed on. Remembered a while (see [`Finished`]): its last
    /// frames may have been lost with the link.
    fn finished(&self, stream: u64, sent: u64, received: u64);
    /// Agent side: the live link's generation (0 while down), and how to dial a data
    /// connection to reattach `stream` (the `Data` header sent). The server waits for
    /// `Event::Attach` instead.
    fn dialer(&self) -> Option<(watch::Receiver<u64>, Dial)>;
    /// Server side: the agent has a stream of this session (it acknowledged or sent a
    /// byte of it): its target was reached.
    fn target_reached(&self, _service: &str) {}
}

pub type Dial = Arc<
    dyn Fn(
            u64,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<TcpStream>> + Send>>
        + Send
        + Sync,
>;

/// What both sides' sessions hold the same way: the live control link (`None` while
/// it is lost) and the streams by id.
#[derive(Default)]
pub struct Table {
    pub control: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    pub map: Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>,
    /// Streams that ended complete lately.
    pub finished: Mutex<Finished>,
}

/// Streams that ended here, remembered in case their last frames were lost with the
/// link: complete ones, and (agent side) reset ones, so that the agent's resume lists
/// every stream it knew (the server opens again a stream the agent does not list: its
/// `Open` never arrived) and then sends their `Reset` again. A stream is complete once
/// the peer has acknowledged every byte we sent and we delivered its FIN; our own
/// `Fin` frame may still have gone into a link that was dying (or down: frames are
/// dropped then). So the agent's resume lists them too (the server keeps its streams
/// the agent lists), and then sends their last ack and `Fin` again; the server answers
/// the agent's reattach of such a stream with what it lacks: that we have all its
/// bytes, and where ours end. Kept while the link is down (the session itself ends at
/// the grace), and [`FINISHED_KEEP`] while it is up, which is longer than a frame can
/// wait in a link before the link is called lost; at most [`FINISHED_MAX`].
#[derive(Default)]
pub struct Finished(std::collections::VecDeque<(Instant, u64, Ended)>);

/// How a stream ended: (sent, received) when complete, `None` when reset.
type Ended = Option<(u64, u64)>;

const FINISHED_KEEP: Duration = Duration::from_secs(super::control::DEAD_AFTER.as_secs() + 2);
/// (A resume lists them: 8,192 ids of at most 10 bytes fit a frame, 256 KiB.)
const FINISHED_MAX: usize = 1 << 13;

impl Finished {
    /// `counts`: (sent, received) of a stream that ended complete; `None`: reset.
    fn note(&mut self, live: bool, stream: u64, counts: Ended) {
        let now = Instant::now();
        while let Some(&(at, ..)) = self.0.front() {
            if self.0.len() < FINISHED_MAX && !(live && now - at > FINISHED_KEEP) {
                break;
            }
            self.0.pop_front();
        }
        self.0.push_back((now, stream, counts));
    }

    /// (sent, received) of a stream remembered as complete.
    pub fn of(&self, stream: u64) -> Option<(u64, u64)> {
        let found = self.0.iter().rev().find(|e| e.1 == stream);
        found.and_then(|e| e.2)
    }

    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().map(|e| e.1)
    }

    /// A new session: the ids of the old one mean nothing to it (a restarted server
    /// numbers its streams from 1 again).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The last frames each stream remembered sent: its ack of every byte it
    /// received and its `Fin`, or its `Reset`.
    pub fn last_frames(&self) -> Vec<Frame> {
        let mut out = Vec::with_capacity(2 * self.0.len());
        for &(_, stream, counts) in &self.0 {
            match counts {
                Some((sent, received)) => out.extend([
                    Frame::Ack { stream, received },
                    Frame::Fin { stream, at: sent },
                ]),
                None => out.push(Frame::Reset { stream }),
            }
        }
        out
    }
}

impl Table {
    /// Whether its link is up, and its open streams, attached or waiting for it.
    pub fn streams(&self) -> (bool, super::Streams) {
        // The link first: a stream counted as waiting an instant after the link came
        // back is truer than one counted as attached after it went.
        let live = self.control.lock().unwrap().is_some();
        let n = self.map.lock().unwrap().len();
        let (attached, waiting) = if live { (n, 0) } else { (0, n) };
        (live, super::Streams { attached, waiting })
    }

    /// [`Session::send`]: dropped while the link is down (resume resyncs).
    pub fn send(&self, frame: Frame) {
        if let Some(tx) = &*self.control.lock().unwrap() {
            let _ = tx.send(frame);
        }
    }

    pub fn forget(&self, stream: u64) {
        self.map.lock().unwrap().remove(&stream);
    }

    /// [`Session::finished`]: forgotten as live, remembered as complete (see
    /// [`Finished`]).
    pub fn finished(&self, stream: u64, sent: u64, received: u64) {
        self.forget(stream);
        self.note(stream, Some((sent, received)));
    }

    /// Agent side: a stream that ended otherwise (reset, refused) is forgotten as live
    /// and remembered as reset (see [`Finished`]); one already forgotten is not.
    pub fn forget_ended(&self, stream: u64) {
        if self.map.lock().unwrap().remove(&stream).is_some() {
            self.note(stream, None);
        }
    }

    fn note(&self, stream: u64, counts: Ended) {
        let live = self.control.lock().unwrap().is_some();
        let mut finished = self.finished.lock().unwrap();
        finished.note(live, stream, counts);
    }

    /// Resets every stream now (grace over, or a new session); returns how many.
    pub fn expire(&self) -> usize {
        let streams: Vec<_> = self.map.lock().unwrap().drain().collect();
        for (_, tx) in &streams {
            let _ = tx.send(Event::GraceExpired);
        }
        streams.len()
    }
}

/// A tunnel stream's tie to its session, carried in `Pair::tunnel`.
pub struct Link {
    pub stream: u64,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub session: Arc<dyn Session>,
    /// resume_buffer: bytes held per direction until acknowledged.
    pub limit: usize,
    /// Which side of the close line the local socket is.
    pub local_side: Side,
    /// Server side: the stream's `Open`, kept to send again (`Event::Reopen`) until
    /// the agent shows it has the stream (an ack, or bytes from it).
    pub open: Option<Box<Frame>>,
}

impl Link {
    /// The agent has the stream (an ack, a byte, a reattach): its `Open` need not be
    /// sent again, and its target was reached.
    pub fn agent_has_it(&mut self) {
        if let Some(Frame::Open { service, .. }) = self.open.take().map(|o| *o) {
            self.session.target_reached(&service);
        }
    }

    /// Tells the peer we have received `received` bytes of the stream, so it can let
    /// its retained copy of them go (and read on: it holds at most resume_buffer).
    pub fn acknowledge(&self, received: u64) {
        self.session.send(Frame::Ack {
            stream: self.stream,
            received,
        });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.session.forget(self.stream);
    }
}

/// Bytes held in retention pipes by every stream of the process. Above
/// [`RETAINED_CAP`], streams stop reading their sources until acks free some.
static RETAINED: AtomicU64 = AtomicU64::new(0);
pub const RETAINED_CAP: u64 = 256 << 20;

/// Bytes this process holds for replay now, both sides and every stream together
/// (`forwarder_tunnel_retained_bytes`).
pub fn retained() -> u64 {
    RETAINED.load(Ordering::Relaxed)
}

fn room_freed() -> &'static Notify {
    static N: OnceLock<Notify> = OnceLock::new();
    N.get_or_init(Notify::new)
}

/// How long the data connection's `Resume` exchange may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An ack is sent at once after this share of `limit`, else this long after bytes
/// arrived (or at once when the peer's FIN is reached): acks cost nothing per message.
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Agent side: first wait before dialing again for a stream whose data connection
/// ended; doubles to 5 s. Its first value also lets a peer's completion arrive.
const REDIAL_FIRST: Duration = Duration::from_millis(200);
const REDIAL_MAX: Duration = Duration::from_secs(5);

/// local → data.
struct Out {
    /// Holds [head, read): bytes read from local; those below `teed` also in `keep`.
    /// `head` is `sent`, except after a reattach, when the bytes the replay sends
    /// again were dropped from it (`head` = `teed` then).
    pipe: Pipe,
    keep: Pipe,
    head: u64,
    in_pipe: usize,
    read: u64,
    teed: u64,
    sent: u64,
    acked: u64,
    eof: bool,
    /// Read from local found maybe no free pipe slot (`Fill::NoSlot`): wait for the
    /// pipe to empty, not for readiness (which was not cleared).
    read_blocked: bool,
    /// Replaying [acked, teed) after a reattach: a scratch pipe and what is left in it.
    replay: Option<(Pipe, usize)>,
    fin_told: bool,
}

/// data → local.
struct In {
    pipe: Pipe,
    in_pipe: usize,
    received: u64,
    ack_told: u64,
    ack_due: Option<Instant>,
    peer_fin: Option<u64>,
    shut: bool,
    /// As `Out::read_blocked`, for the data connection.
    read_blocked: bool,
}

enum Fault {
    Local(io::Error),
    /// The data connection failed: wait for (or dial) another.
    Data,
    /// The peer closed the data connection cleanly, which it does only once it is
    /// done with the stream (a lost link shows as an error or as silence): our last
    /// acks are on their way over the control connection, so do not dial again
    /// unless the link itself changes.
    DataEof,
    /// Something our own bookkeeping or the peer's numbers cannot explain.
    Protocol(String),
}

/// A stream's three pipes: retention (`want` bytes, at least a pooled pipe's size),
/// and one each way.
struct Pipes {
    keep: Pipe,
    out: Pipe,
    inn: Pipe,
}

/// How long a new stream waits for its pipes while the process is out of fds, as a
/// rule's client waits for an fd for its upstream (connect_timeout's default).
const PIPES_PATIENCE: Duration = Duration::from_secs(5);
/// How long a reattaching stream waits for a pipe for its replay while the process is
/// out of fds: the stream already waited for its link; a pipe is what it lacks.
const REPLAY_PATIENCE: Duration = Duration::from_secs(30);

impl Pipes {
    /// Out of fds, tried again every 50 ms for [`PIPES_PATIENCE`]: the visitor or target
    /// waits (its bytes in TCP's buffers) instead of being reset at once (audit).
    async fn take(want: usize) -> io::Result<Pipes> {
        let until = Instant::now() + PIPES_PATIENCE;
        loop {
            match Self::try_take(want) {
                Err(e) if crate::server::is_resource_exhaustion(&e) && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) if crate::server::is_resource_exhaustion(&e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{e} (ours: no pipe for the stream within {PIPES_PATIENCE:?})"),
                    ))
                }
                r => return r,
            }
        }
    }

    fn try_take(want: usize) -> io::Result<Pipes> {
        let keep = if want <= crate::relay::splice::PIPE_SIZE {
            Pipe::take()?
        } else {
            Pipe::with_size(want)?
        };
        Ok(Pipes {
            keep,
            out: Pipe::take()?,
            inn: Pipe::take()?,
        })
    }
}

/// Runs a stream to its end. `handover`: what the inspection prelude (server side,
/// a rule that inspects) leaves to do: a dump to finish, and what it passed on.
pub async fn run(
    local: TcpStream,
    first: TcpStream,
    link: Box<Link>,
    progress: &Progress,
    handover: Handover,
    rates: [Option<u64>; 2],
) -> RelayEnd {
    progress.enter(Hop::Splice);
    let side = link.local_side;
    // [from local, to local]: on the server local is the visitor, whose bytes go to
    // the upstream (rates[0], upload_rate); on the agent local is the target, whose
    // bytes go to the visitor (rates[1], download_rate).
    let pace = match side {
        Side::Client => rates,
        Side::Upstream => [rates[1], rates[0]],
    }
    .map(|r| r.map(Bucket::new));
    let far = match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    };
    // Armed until the engine reaches an end of its own (each end below tells the
    // peer what it must know): a stream dropped before that was ended by us.
    let mut forced = ForcedEnd {
        local: &local,
        peer: TellPeerReset::new(&link),
    };
    let pipes = match Pipes::take(
        link.limit
            .max(handover.passed.as_ref().map_or(0, |p| p.sent.len())),
    )
    .await
    {
        Ok(p) => p,
        Err(error) => {
            reset_on_close(&first);
            return RelayEnd::Failed { side, error };
        }
    };
    let mut engine = match Engine::new(link, side, handover, pipes, pace) {
        Ok(e) => e,
        Err(error) => {
            reset_on_close(&first);
            return RelayEnd::Failed { side, error };
        }
    };
    let end = engine.run(&local, first, progress).await;
    forced.peer.disarm();
    engine.release();
    if matches!(end, Ok(()) | Err(End::Done)) {
        let l = &engine.link;
        l.session
            .finished(l.stream, engine.out.read, engine.inn.received);
    }
    match end {
        Ok(()) => {
            engine.recycle();
            RelayEnd::Closed
        }
        Err(End::Done) => RelayEnd::Closed,
        Err(end) => {
            reset_on_close(&local);
            match end {
                End::Local(error) => {
                    engine.link.session.send(Frame::Reset {
                        stream: engine.link.stream,
                    });
                    RelayEnd::Failed { side, error }
                }
                End::PeerReset => RelayEnd::Failed {
                    side: far,
                    error: io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "reset at the far end of the tunnel",
                    ),
                },
                End::Protocol(why) => {
                    engine.link.session.send(Frame::Reset {
                        stream: engine.link.stream,
                    });
                    RelayEnd::Failed {
                        side: far,
                        error: io::Error::new(io::ErrorKind::InvalidData, why),
                    }
                }
                End::Lost => RelayEnd::Ended("agent_lost"),
                End::Unreachable(why) => RelayEnd::ConnectFailed(why),
                End::Done => unreachable!("matched above"),
            }
        }
    }
}

/// A stream ended by us before it ended by itself: the lifecycle dropped it (the
/// rule's idle_timeout or max_connection_duration, the end of the shutdown grace
/// period), or it could not start. Like any stream cut short, its local socket is
/// reset (a FIN would show a cut stream as complete), and the peer is told.
struct ForcedEnd<'a> {
    local: &'a TcpStream,
    peer: TellPeerReset,
}

impl Drop for ForcedEnd<'_> {
    fn drop(&mut self) {
        if self.peer.armed {
            reset_on_close(self.local);
        }
    }
}

/// Until disarmed, tells the peer on drop that the stream is gone (`Reset`), so it
/// resets its own end and forgets the stream too: for a stream that ends, or is
/// dropped, before the engine reaches an end of its own (or, on the server, in the
/// inspection prelude, which refused the visitor or was cut short).
pub struct TellPeerReset {
    session: Arc<dyn Session>,
    stream: u64,
    armed: bool,
}

impl TellPeerReset {
    pub fn new(link: &Link) -> TellPeerReset {
        TellPeerReset {
            session: link.session.clone(),
            stream: link.stream,
            armed: true,
        }
    }

    pub fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TellPeerReset {
    fn drop(&mut self) {
        if self.armed {
            self.session.send(Frame::Reset {
                stream: self.stream,
            });
        }
    }
}

enum End {
    /// Complete, though the peer's last ack never came (see `reattach`).
    Done,
    Local(io::Error),
    PeerReset,
    /// The agent could not connect the target.
    Unreachable(String),
    Protocol(String),
    Lost,
}

/// What one direction's moves in a step did: `moved` bytes, and whether its read may
/// have left some behind (`more`: it filled the room it had, so a next round could
/// read again).
#[derive(Clone, Copy)]
struct Moves {
    moved: bool,
    more: bool,
}

impl Moves {
    const NONE: Moves = Moves {
        moved: false,
        more: false,
    };
    /// Moved, and nothing is left to read (the source ended).
    const LAST: Moves = Moves {
        moved: true,
        more: false,
    };
    /// Interrupted: try again.
    const AGAIN: Moves = Moves {
        moved: true,
        more: true,
    };
}

struct Engine {
    link: Box<Link>,
    out: Out,
    inn: In,
    limit: u64,
    side: Side,
    /// The inspection dump the prelude left (server side): shown as bytes pass, each
    /// read bounded by what it still wants (see `splice::show`).
    dump: Option<Box<Dump>>,
    /// Events that came during the prelude, taken before any new one.
    early: std::vec::IntoIter<Event>,
    /// The rule's (server) or service's (agent) rates, `[from local, to local]`: a
    /// paced direction reads no more than its bucket allows, and waits on the bucket,
    /// not on the socket, when it is empty.
    pace: [Option<Bucket>; 2],
}

impl Engine {
    /// With what the prelude passed on (server side, a rule that inspects) counted as
    /// sent, received, and, for what it sent, retained.
    fn new(
        mut link: Box<Link>,
        side: Side,
        handover: Handover,
        pipes: Pipes,
        pace: [Option<Bucket>; 2],
    ) -> io::Result<Engine> {
        let passed = handover.passed.map(|p| *p).unwrap_or_default();
        if passed.received > 0 {
            link.agent_has_it(); // it sent bytes
        }
        let sent = passed.sent.len();
        let Pipes { keep, out, inn } = pipes;
        if sent > 0 {
            if sent > keep.size {
                return Err(io::Error::other(format!(
                    "the inspection passed on {sent} bytes, more than a retention pipe holds ({})",
                    keep.size
                )));
            }
            into_empty_pipe(&keep, &passed.sent)?;
            RETAINED.fetch_add(sent as u64, Ordering::Relaxed);
        }
        let sent = sent as u64;
        // A retention pipe smaller than asked (system pipe limits) bounds what we hold.
        let limit = (link.limit.min(keep.size)) as u64;
        Ok(Engine {
            out: Out {
                pipe: out,
                keep,
                head: sent,
                in_pipe: 0,
                read: sent,
                teed: sent,
                sent,
                acked: 0,
                eof: passed.eof,
                read_blocked: false,
                replay: None,
                fin_told: false,
            },
            inn: In {
                pipe: inn,
                in_pipe: 0,
                received: passed.received,
                // The prelude acknowledged what it received.
                ack_told: passed.received,
                ack_due: None,
                peer_fin: None,
                shut: false,
                read_blocked: false,
            },
            link,
            limit,
            side,
            dump: handover.dump,
            early: passed.events.into_iter(),
            pace,
        })
    }

    /// After a clean end every pipe is empty: back to the pool for the next stream
    /// (making, sizing and closing three pipes is a large share of a short stream).
    fn recycle(self) {
        let Engine { out, inn, .. } = self;
        if out.in_pipe == 0 && inn.in_pipe == 0 && out.replay.is_none() {
            out.pipe.give_back();
            out.keep.give_back();
            inn.pipe.give_back();
        }
    }

    /// Returns the retained bytes to the global count.
    fn release(&mut self) {
        RETAINED.fetch_sub(self.out.read - self.out.acked, Ordering::Relaxed);
        self.out.acked = self.out.read;
        room_freed().notify_waiters();
    }

    async fn run(
        &mut self,
        local: &TcpStream,
        first: TcpStream,
        progress: &Progress,
    ) -> Result<(), End> {
        let mut data = Some(first);
        let dialer = self.link.session.dialer();
        let mut link_gen = dialer.as_ref().map(|(g, _)| g.clone());
        let mut attached_gen = link_gen.as_ref().map_or(0, |g| *g.borrow());
        let mut redial_wait = REDIAL_FIRST;
        let mut redial_at: Option<Instant> = None;
        // One timer each, reset only when its deadline changes: a timer made anew on
        // every pass costs a wake-up of the timer driver per message.
        let mut ack_timer = crate::deadlines::Deadline::new(std::time::Instant::now());
        let dial_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(dial_timer);
        let (mut ack_armed, mut dial_armed) = (None, None);
        // The peer closed the data connection cleanly (it is done): dial again only
        // for a new link.
        let mut peer_done = false;
        // Made once and kept: the wait below polls them by hand on every pass.
        let mut local_error = std::pin::pin!(socket_error(local));
        let mut link_watch = link_gen.as_ref().map(watch_link);
        // Passes in a row that ended at the first ready socket (see the wait below).
        let mut hurried = 0u32;
        // The event channel was found empty with our waker registered (see below).
        let mut events_armed = false;
        loop {
            // Move what can move without waiting.
            let quiet = match self.step(local, data.as_ref(), progress) {
                Ok(quiet) => quiet,
                Err(Fault::Local(e)) => return Err(End::Local(e)),
                Err(Fault::Protocol(why)) => return Err(End::Protocol(why)),
                Err(Fault::DataEof) => {
                    data = None;
                    peer_done = true;
                    false
                }
                Err(Fault::Data) => {
                    drop_data(&mut data);
                    redial_at.get_or_insert_with(|| Instant::now() + redial_wait);
                    false
                }
            };
            self.tell_peer(quiet);
            if let Some(at) = self.inn.peer_fin {
                if self.inn.received > at {
                    return Err(End::Protocol(format!(
                        "{} bytes received past the peer's FIN at {at}",
                        self.inn.received - at
                    )));
                }
                if self.inn.received == at && self.inn.in_pipe == 0 && !self.inn.shut {
                    crate::relay::pass_fin(local).map_err(End::Local)?;
                    self.inn.shut = true;
                }
            }
            if self.out.eof && self.out.acked == self.out.read && self.inn.shut {
                return Ok(());
            }

            let out_reads = !self.out.eof
                && !self.out.read_blocked
                && self.out.in_pipe < self.out.pipe.size
                && self.out.read - self.out.acked < self.limit;
            let capped = RETAINED.load(Ordering::Relaxed) >= RETAINED_CAP;
            let out_sends = self.out.replay.as_ref().is_some_and(|(_, n)| *n > 0)
                || self.out.sent < self.out.teed;
            let in_reads = !self.inn.read_blocked && self.inn.in_pipe < self.inn.pipe.size;
            let link_up = link_gen.as_ref().is_some_and(|g| *g.borrow() != 0);
            let dial_at = match (&dialer, &data, link_up && !peer_done) {
                (Some(_), None, true) => Some(*redial_at.get_or_insert_with(Instant::now)),
                _ => None,
            };
            if self.inn.ack_due != ack_armed {
                if let Some(at) = self.inn.ack_due {
                    ack_timer.reset(at.into_std());
                }
                ack_armed = self.inn.ack_due;
            }
            if dial_at != dial_armed {
                if let Some(at) = dial_at {
                    dial_timer.as_mut().reset(at);
                }
                dial_armed = dial_at;
            }
            let room = room_freed().notified();
            tokio::pin!(room);
            // A pass that finds a socket ready may go to the step at once, leaving the
            // sources after it (the error watch, the timers, the link) unpolled: the
            // step is followed by another pass, and only a pass that polled every
            // source waits. Not more than HURRY_MAX times in a row, so that none of
            // them waits long behind a busy socket.
            let hurry = hurried < HURRY_MAX;
            let mut polled_all = true;
            // Polled by hand, not by `select!`: a message costs one pass here, and
            // `select!` would build and drop a future per branch on every pass.
            let woke = std::future::poll_fn(|cx| {
                if let Some(ev) = self.early.next() {
                    return Poll::Ready(Woke::Event(Some(ev)));
                }
                // A poll that finds the channel empty registers our waker, which stays
                // until a send takes it to wake us, and only we receive: so while the
                // channel is still empty (and open) it needs no poll, which would
                // register the waker anew on every pass.
                let events = &mut self.link.events;
                if !(events_armed && events.is_empty() && !events.is_closed()) {
                    match events.poll_recv(cx) {
                        Poll::Ready(ev) => {
                            events_armed = false;
                            return Poll::Ready(Woke::Event(ev));
                        }
                        // (Out of coop budget, it registers nothing and wakes us.)
                        Poll::Pending => events_armed = tokio::task::coop::has_budget_remaining(),
                    }
                }
                let mut io = false;
                // The local socket's read readiness also shows a reset (it ends reads);
                // the error watch is for when it is not polled.
                let reading_local = out_reads && !capped && paced_ready(&mut self.pace[0], cx);
                if reading_local {
                    match local.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => io = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(Woke::Local(e)),
                        Poll::Pending => {}
                    }
                }
                if out_reads && capped && room.as_mut().poll(cx).is_ready() {
                    io = true;
                }
                if self.inn.in_pipe > 0 {
                    match local.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => io = true,
                        Poll::Ready(Err(e)) => return Poll::Ready(Woke::Local(e)),
                        Poll::Pending => {}
                    }
                }
                if io && hurry {
                    polled_all = false;
                    return Poll::Ready(Woke::Io);
                }
                if !reading_local {
                    if let Poll::Ready(e) = local_error.as_mut().poll(cx) {
                        return Poll::Ready(Woke::Local(e));
                    }
                }
                if let Some(d) = &data {
                    let read = (in_reads && paced_ready(&mut self.pace[1], cx))
                        .then(|| d.poll_read_ready(cx));
                    let write = out_sends.then(|| d.poll_write_ready(cx));
                    for r in [read, write].into_iter().flatten() {
                        match r {
                            Poll::Ready(Ok(())) => io = true,
                            Poll::Ready(Err(_)) => return Poll::Ready(Woke::DataFailed),
                            Poll::Pending => {}
                        }
                    }
                }
                if io && hurry {
                    polled_all = false;
                    return Poll::Ready(Woke::Io);
                }
                if ack_armed.is_some() && ack_timer.poll(cx).is_ready() {
                    return Poll::Ready(Woke::AckDue);
                }
                if let Some(w) = &mut link_watch {
                    if let Poll::Ready(r) = w.as_mut().poll(cx) {
                        return Poll::Ready(Woke::Link(r.is_ok()));
                    }
                }
                if dial_armed.is_some() && dial_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Woke::DialDue);
                }
                if io {
                    Poll::Ready(Woke::Io)
                } else {
                    Poll::Pending
                }
            })
            .await;
            hurried = if polled_all { 0 } else { hurried + 1 };
            match woke {
                Woke::Io => {}
                Woke::Event(None) => return Err(End::Lost),
                Woke::Event(Some(Event::Ack(n))) => {
                    self.link.agent_has_it();
                    self.acked(n).map_err(End::Protocol)?
                }
                Woke::Event(Some(Event::Fin(at))) => {
                    tracing::debug!(
                        "tunnel stream {}: peer FIN at {at}, received {}",
                        self.link.stream,
                        self.inn.received
                    );
                    self.inn.peer_fin = Some(at);
                }
                Woke::Event(Some(Event::Reset)) => return Err(End::PeerReset),
                Woke::Event(Some(Event::Unreachable(why))) => return Err(End::Unreachable(why)),
                Woke::Event(Some(Event::GraceExpired)) => return Err(End::Lost),
                Woke::Event(Some(Event::Attach(conn))) => {
                    drop_data(&mut data);
                    data = self.reattach(conn).await?;
                }
                Woke::Event(Some(Event::Reopen(conn))) => {
                    drop_data(&mut data);
                    data = self.reopen(conn).await?;
                }
                Woke::Local(e) => return Err(End::Local(e)),
                Woke::DataFailed => {
                    drop_data(&mut data);
                    redial_at = Some(Instant::now() + redial_wait);
                }
                Woke::AckDue => self.send_ack(),
                Woke::Link(false) => {
                    link_gen = None;
                    link_watch = None;
                }
                Woke::Link(true) => {
                    let g = link_gen.as_mut().expect("watched only with a link_gen");
                    let now = *g.borrow_and_update();
                    link_watch = Some(watch_link(g));
                    if now != 0 && now != attached_gen {
                        // A new link: whatever data connection we hold went with the old one.
                        drop_data(&mut data);
                        redial_at = None;
                        redial_wait = REDIAL_FIRST;
                        peer_done = false;
                    }
                }
                Woke::DialDue => {
                    dial_armed = None;
                    let (_, dial) = dialer.as_ref().unwrap();
                    let gen_now = link_gen.as_ref().map_or(0, |g| *g.borrow());
                    match dial(self.link.stream).await {
                        Ok(conn) => {
                            data = self.reattach(conn).await?;
                            if data.is_some() {
                                attached_gen = gen_now;
                                redial_wait = REDIAL_FIRST;
                                redial_at = None;
                                continue;
                            }
                        }
                        Err(e) => {
                            tracing::debug!("tunnel stream {}: dial failed: {e}", self.link.stream)
                        }
                    }
                    redial_wait = (redial_wait * 2).min(REDIAL_MAX);
                    redial_at = Some(Instant::now() + redial_wait);
                }
            }
        }
    }

    /// Non-blocking moves in both directions; `Ok(true)` when the data connection
    /// was read to EAGAIN (a good moment to acknowledge). Goes round again only while
    /// a read may have left bytes behind (it filled the room it had): a read that ran
    /// dry cleared its socket's readiness, and a write that could not finish waits on
    /// its socket's, so the wait learns of anything else at no cost, where another
    /// round would look at every socket again to find nothing.
    fn step(
        &mut self,
        local: &TcpStream,
        data: Option<&TcpStream>,
        progress: &Progress,
    ) -> Result<bool, Fault> {
        let mut quiet = false;
        loop {
            let out = self.step_out(local, data, progress)?;
            let (inn, q) = self.step_in(local, data, progress)?;
            quiet |= q;
            if out.moved || inn.moved {
                progress.touch();
            }
            if !out.more && !inn.more {
                return Ok(quiet);
            }
        }
    }

    /// local → data: what is in the pipe goes out, then a read from local, whose bytes
    /// go out in the same call (one pass per message).
    fn step_out(
        &mut self,
        local: &TcpStream,
        data: Option<&TcpStream>,
        progress: &Progress,
    ) -> Result<Moves, Fault> {
        let mut moved = false;
        if let Some(d) = data {
            moved |= self.push_out(d)?;
        }
        let read = self.read_local(local, progress)?;
        if read.moved {
            if let Some(d) = data {
                self.push_out(d)?;
            }
        }
        Ok(Moves {
            moved: moved || read.moved,
            more: read.more,
        })
    }

    /// Sends the replay, then what is retained, then retains what was read since and
    /// sends that too.
    fn push_out(&mut self, d: &TcpStream) -> Result<bool, Fault> {
        let o = &mut self.out;
        let mut moved = false;
        // The replay goes first: it is older than anything in `pipe`.
        if let Some((scratch, left)) = &mut o.replay {
            // (A blocked replay must not skip the read: the wait polls the local
            // socket's readiness whenever a read is due.)
            'replay: while *left > 0 {
                match d.try_io(Interest::WRITABLE, || {
                    splice(scratch.r.as_raw_fd(), d.as_raw_fd(), *left)
                }) {
                    Ok(0) => {
                        return Err(Fault::Protocol("replay pipe emptier than counted".into()))
                    }
                    Ok(n) => {
                        *left -= n;
                        o.sent += n as u64;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break 'replay,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(Fault::Data),
                }
            }
            if *left == 0 {
                if let Some((scratch, _)) = o.replay.take() {
                    scratch.give_back();
                }
            }
        }
        moved |= send_retained(o, d)?;
        // Retain what was read since, once nothing un-retained is ahead of it in
        // `pipe` (tee copies from the head), and send it.
        if o.replay.is_none() && o.head == o.teed && o.teed < o.read {
            let want = (o.read - o.teed) as usize;
            match tee(o.pipe.r.as_raw_fd(), o.keep.w.as_raw_fd(), want) {
                Ok(n) => {
                    o.teed += n as u64;
                    moved = true;
                    send_retained(o, d)?;
                }
                // The retention pipe has no free slot: wait for an ack.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => moved = true,
                Err(e) => return Err(Fault::Protocol(format!("tee: {e}"))),
            }
        }
        Ok(moved)
    }

    /// Reads from local while the pipe and the retention bound have room (also while
    /// detached: the bytes wait in the pipe).
    fn read_local(&mut self, local: &TcpStream, progress: &Progress) -> Result<Moves, Fault> {
        let o = &mut self.out;
        if o.in_pipe == 0 {
            o.read_blocked = false;
        }
        let mut room = (o.pipe.size - o.in_pipe).min((self.limit - (o.read - o.acked)) as usize);
        if o.eof || o.read_blocked || room == 0 || RETAINED.load(Ordering::Relaxed) >= RETAINED_CAP
        {
            return Ok(Moves::NONE);
        }
        if let Some(b) = &mut self.pace[0] {
            room = room.min(b.allowance());
            if room == 0 {
                return Ok(Moves::NONE);
            }
        }
        let d = dump_direction(self.side, true);
        let (p, in_pipe) = (&self.out.pipe, self.out.in_pipe);
        let filled = read_shown(
            &mut self.dump,
            d,
            local,
            Sender::Anyone,
            p,
            in_pipe,
            room,
            progress,
        );
        let o = &mut self.out;
        let (n, more) = match filled {
            Ok(Fill::Eof) => {
                o.eof = true;
                return Ok(Moves::LAST);
            }
            Ok(Fill::Bytes { n, drained }) => (n, !drained),
            Ok(Fill::Empty) => return Ok(Moves::NONE),
            Ok(Fill::NoSlot) => {
                o.read_blocked = true;
                return Ok(Moves::NONE);
            }
            // TCP urgent data: the tunnel has no way to carry urgency, so the urgent
            // byte is dropped (as socat and HAProxy do) and the stream goes on.
            Ok(Fill::UrgentMark) if o.in_pipe == 0 => {
                match past_urgent_mark(local, None, &o.pipe, room) {
                    Ok(None) => {
                        o.eof = true;
                        return Ok(Moves::LAST);
                    }
                    Ok(Some(0)) => return Ok(Moves::NONE),
                    Ok(Some(n)) => {
                        progress
                            .via_userspace
                            .fetch_add(n as u64, Ordering::Relaxed);
                        (n, true)
                    }
                    Err(e) => return Err(Fault::Local(e)),
                }
            }
            // Past the mark once the bytes before it have left the pipe (the readiness
            // is kept, as for NoSlot).
            Ok(Fill::UrgentMark) => {
                o.read_blocked = true;
                return Ok(Moves::NONE);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Moves::AGAIN),
            Err(e) => return Err(Fault::Local(e)),
        };
        o.read += n as u64;
        o.in_pipe += n;
        if let Some(b) = &mut self.pace[0] {
            b.spend(n);
        }
        RETAINED.fetch_add(n as u64, Ordering::Relaxed);
        counter(progress, self.side, true).fetch_add(n as u64, Ordering::Relaxed);
        Ok(Moves { moved: true, more })
    }

    fn step_in(
        &mut self,
        local: &TcpStream,
        data: Option<&TcpStream>,
        progress: &Progress,
    ) -> Result<(Moves, bool), Fault> {
        let mut moved = self.deliver(local, progress)?;
        let mut more = false;
        let mut quiet = false;
        if self.inn.in_pipe == 0 {
            self.inn.read_blocked = false;
        }
        let Some(d) = data else {
            return Ok((Moves { moved, more }, quiet));
        };
        let mut room = self.inn.pipe.size - self.inn.in_pipe;
        if let Some(b) = &mut self.pace[1] {
            room = room.min(b.allowance());
            // Held by the rate, not by the peer: as good a moment to acknowledge.
            quiet |= room == 0;
        }
        if !self.inn.read_blocked && room > 0 {
            let dir = dump_direction(self.side, false);
            let (p, in_pipe) = (&self.inn.pipe, self.inn.in_pipe);
            let filled = read_shown(
                &mut self.dump,
                dir,
                d,
                Sender::OwnPeer,
                p,
                in_pipe,
                room,
                progress,
            );
            let i = &mut self.inn;
            match filled {
                // The peer closed this data connection: it is done with the stream, or
                // dropped the connection to dial another. Either way wait for control.
                // (Urgent data: never sent on a data connection by a peer of ours.)
                Ok(Fill::Eof | Fill::UrgentMark) => return Err(Fault::DataEof),
                Ok(Fill::Bytes { n, drained }) => {
                    i.received += n as u64;
                    i.in_pipe += n;
                    if let Some(b) = &mut self.pace[1] {
                        b.spend(n);
                    }
                    moved = true;
                    more = !drained;
                    quiet |= drained;
                    // The agent has the stream: its `Open` is not needed again.
                    self.link.agent_has_it();
                    // Delivered in the same call (one pass per message).
                    self.deliver(local, progress)?;
                }
                Ok(Fill::Empty) => quiet = true,
                Ok(Fill::NoSlot) => {
                    i.read_blocked = true;
                    quiet = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    moved = true;
                    more = true;
                }
                Err(_) => return Err(Fault::Data),
            }
        }
        Ok((Moves { moved, more }, quiet))
    }

    /// data → local: what is in the pipe goes to the local socket.
    fn deliver(&mut self, local: &TcpStream, progress: &Progress) -> Result<bool, Fault> {
        let i = &mut self.inn;
        let mut moved = false;
        while i.in_pipe > 0 {
            match local.try_io(Interest::WRITABLE, || {
                splice(i.pipe.r.as_raw_fd(), local.as_raw_fd(), i.in_pipe)
            }) {
                Ok(n) => {
                    i.in_pipe -= n;
                    counter(progress, self.side, false).fetch_add(n as u64, Ordering::Relaxed);
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Fault::Local(e)),
            }
        }
        Ok(moved)
    }

    /// Acks and our FIN, as the control link allows.
    fn tell_peer(&mut self, quiet: bool) {
        let i = &mut self.inn;
        let unacked = i.received - i.ack_told;
        if unacked > 0 {
            let fin_reached = i.peer_fin == Some(i.received);
            if unacked >= self.limit / 4 || fin_reached {
                self.send_ack();
            } else if quiet && i.ack_due.is_none() {
                i.ack_due = Some(Instant::now() + ACK_DELAY);
            }
        }
        if self.out.eof && !self.out.fin_told {
            tracing::debug!(
                "tunnel stream {}: local EOF at {}",
                self.link.stream,
                self.out.read
            );
            self.out.fin_told = true;
            self.link.session.send(Frame::Fin {
                stream: self.link.stream,
                at: self.out.read,
            });
        }
    }

    fn send_ack(&mut self) {
        self.inn.ack_due = None;
        self.inn.ack_told = self.inn.received;
        self.link.acknowledge(self.inn.received);
    }

    /// The peer has every byte up to `n`: let the retention pipe go of them.
    fn acked(&mut self, n: u64) -> Result<(), String> {
        let o = &mut self.out;
        if n <= o.acked {
            return Ok(());
        }
        if n > o.sent.max(o.teed) {
            return Err(format!("peer acknowledged {n} bytes, only {} sent", o.sent));
        }
        discard(&o.keep, (n - o.acked) as usize).map_err(|e| format!("retention pipe: {e}"))?;
        RETAINED.fetch_sub(n - o.acked, Ordering::Relaxed);
        o.acked = n;
        room_freed().notify_waiters();
        Ok(())
    }

    /// Takes a new data connection: exchange `Resume`, drop what the peer has, queue
    /// the replay of what it lacks. `Ok(None)` when the connection failed (try
    /// another); an error when the peer no longer knows the stream.
    async fn reattach(&mut self, mut conn: TcpStream) -> Result<Option<TcpStream>, End> {
        self.link.agent_has_it(); // it reattaches the stream
        let _ = conn.set_nodelay(true);
        let peer_received = match resume_exchange(&mut conn, self.inn.received).await {
            Ok(Ok(Frame::Resume { received })) => received,
            // The peer finished the stream and forgot it while our last ack was on
            // its way: everything was delivered both ways.
            Ok(Ok(Frame::Refused { .. })) if self.out.eof && self.inn.shut => {
                return Err(End::Done);
            }
            Ok(Ok(Frame::Refused { reason })) => {
                tracing::debug!(
                    "tunnel stream {}: reattach refused: {reason}",
                    self.link.stream
                );
                return Err(End::PeerReset);
            }
            Ok(Ok(other)) => return Err(End::Protocol(format!("expected Resume, got {other:?}"))),
            Ok(Err(e)) => {
                tracing::debug!("tunnel stream {}: reattach failed: {e}", self.link.stream);
                reset_on_close(&conn);
                return Ok(None);
            }
            Err(_) => {
                reset_on_close(&conn);
                return Ok(None);
            }
        };
        self.acked(peer_received).map_err(End::Protocol)?;
        let scratch = self.replay_pipe().await?;
        self.replay_from_acked(scratch)?;
        Ok(Some(conn))
    }

    /// Sends the stream's `Open` again on a pooled data connection (`Event::Reopen`):
    /// the agent never had the stream, so it has received nothing and sent nothing,
    /// and everything read from the visitor goes again from byte 0 (it is all
    /// retained: nothing was acknowledged). `Ok(None)` when the connection failed
    /// (the next resume sends it again).
    async fn reopen(&mut self, mut conn: TcpStream) -> Result<Option<TcpStream>, End> {
        // The agent had the stream (it acknowledged bytes or sent some), yet no longer
        // lists it: it ended there, and the news was lost (an agent of an older version
        // does not list the streams it reset).
        let Some(open) = self.link.open.as_deref() else {
            reset_on_close(&conn);
            return Err(End::PeerReset);
        };
        debug_assert!(self.out.acked == 0 && self.inn.received == 0);
        let _ = conn.set_nodelay(true);
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, write_frame(&mut conn, open)).await {
            Ok(Ok(())) => {}
            _ => {
                reset_on_close(&conn);
                return Ok(None);
            }
        }
        tracing::debug!("tunnel stream {}: opened again", self.link.stream);
        let scratch = self.replay_pipe().await?;
        self.replay_from_acked(scratch)?;
        Ok(Some(conn))
    }

    /// A pipe for [`Engine::replay_from_acked`] when there is anything to replay: the
    /// last reattach's, emptied, or a new one. Out of fds, tried every 50 ms for
    /// [`REPLAY_PATIENCE`], the new data connection held meanwhile (before, the stream
    /// ended `client_error` at once: audit).
    async fn replay_pipe(&mut self) -> Result<Option<Pipe>, End> {
        let o = &mut self.out;
        if let Some((scratch, _)) = o.replay.take() {
            drain(&scratch);
            return Ok(Some(scratch));
        }
        if o.teed == o.acked {
            return Ok(None);
        }
        let until = Instant::now() + REPLAY_PATIENCE;
        loop {
            match Pipe::with_size(o.keep.size) {
                Ok(p) => return Ok(Some(p)),
                Err(e) if crate::server::is_resource_exhaustion(&e) && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => return Err(End::Local(e)),
            }
        }
    }

    /// After a new data connection's handshake: what is in flight is dropped, and
    /// [acked, teed) is queued for replay from the retention pipe, through `scratch`
    /// (from [`Engine::replay_pipe`]).
    fn replay_from_acked(&mut self, scratch: Option<Pipe>) -> Result<(), End> {
        let o = &mut self.out;
        let replay = (o.teed - o.acked) as usize;
        // What was teed but not sent is in both pipes: keep the retention copy.
        let dup = (o.teed - o.head) as usize;
        discard(&o.pipe, dup).map_err(|e| End::Protocol(format!("pipe: {e}")))?;
        o.in_pipe -= dup;
        o.head = o.teed;
        o.sent = o.acked;
        if let Some(scratch) = scratch.filter(|_| replay > 0) {
            match tee(o.keep.r.as_raw_fd(), scratch.w.as_raw_fd(), replay) {
                Ok(n) if n == replay => o.replay = Some((scratch, n)),
                r => {
                    return Err(End::Protocol(format!(
                        "replay tee of {replay} bytes: {r:?}"
                    )))
                }
            }
        }
        o.fin_told = false;
        o.read_blocked = false;
        self.inn.read_blocked = false;
        Ok(())
    }
}

/// What ended the wait of one pass of `Engine::run`.
/// How many waits in a row may end at the first ready socket without polling the
/// stream's other sources.
const HURRY_MAX: u32 = 16;

enum Woke {
    /// A socket the pass waits on is ready (or the retention cap has room again).
    Io,
    Event(Option<Event>),
    Local(io::Error),
    DataFailed,
    AckDue,
    /// The link generation changed (`false`: its sender is gone).
    Link(bool),
    DialDue,
}

type LinkWatch =
    std::pin::Pin<Box<dyn Future<Output = Result<(), watch::error::RecvError>> + Send>>;

/// A reattach's first step on its new data connection, the same on both ends: each
/// says how many bytes of the stream it has received (`Resume`) and reads the other's
/// answer, within [`HANDSHAKE_TIMEOUT`].
pub async fn resume_exchange(
    conn: &mut TcpStream,
    received: u64,
) -> Result<io::Result<Frame>, tokio::time::error::Elapsed> {
    let exchange = async {
        write_frame(conn, &Frame::Resume { received }).await?;
        read_frame(conn).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, exchange).await
}

/// The dump's direction (0: client → upstream) of bytes read from the local socket
/// (`from_local`) or from the data connection.
fn dump_direction(side: Side, from_local: bool) -> usize {
    match (side, from_local) {
        (Side::Client, true) | (Side::Upstream, false) => 0,
        _ => 1,
    }
}

/// Reads up to `room` bytes from `src` into `p` (which holds `in_pipe`), through the
/// dump while its direction `d` still wants bytes (`splice::show`): what is shown goes
/// on first, so such a read waits for the pipe to be empty (`NoSlot`).
#[allow(clippy::too_many_arguments)]
fn read_shown(
    dump: &mut Option<Box<Dump>>,
    d: usize,
    src: &TcpStream,
    sender: Sender,
    p: &Pipe,
    in_pipe: usize,
    room: usize,
    progress: &Progress,
) -> io::Result<Fill> {
    match dump.as_deref_mut().filter(|t| t.wants(d) > 0) {
        Some(_) if in_pipe > 0 => Ok(Fill::NoSlot),
        Some(t) => show(src, p, t, d, room, progress),
        None => fill_from(src, p, in_pipe, room, sender),
    }
}

/// Whether a direction's bucket (if paced) allows a read now; if not, its timer wakes
/// the stream when it does.
fn paced_ready(bucket: &mut Option<Bucket>, cx: &mut std::task::Context<'_>) -> bool {
    bucket
        .as_mut()
        .is_none_or(|b| b.poll_allowance(cx).is_ready())
}

/// Resolves when the link generation changes after what `gen` has seen (a clone, so
/// `gen` itself stays free to read).
fn watch_link(gen: &watch::Receiver<u64>) -> LinkWatch {
    let mut gen = gen.clone();
    Box::pin(async move { gen.changed().await })
}

fn counter(progress: &Progress, side: Side, from_local: bool) -> &AtomicU64 {
    // From the visitor (server's local) is "up"; from the target (agent's local) "down".
    match (side, from_local) {
        (Side::Client, true) | (Side::Upstream, false) => &progress.to_upstream,
        _ => &progress.to_client,
    }
}

fn drop_data(data: &mut Option<TcpStream>) {
    if let Some(d) = data.take() {
        // A reset, so the peer's end of it fails at once instead of lingering.
        reset_on_close(&d);
    }
}

/// Sends the retained bytes at the head of `pipe` ([sent, teed), once `head` is
/// `sent`: not while a replay is older).
fn send_retained(o: &mut Out, d: &TcpStream) -> Result<bool, Fault> {
    let mut moved = false;
    while o.sent < o.teed && o.head == o.sent {
        let want = (o.teed - o.sent) as usize;
        match d.try_io(Interest::WRITABLE, || {
            splice(o.pipe.r.as_raw_fd(), d.as_raw_fd(), want)
        }) {
            Ok(0) => return Err(Fault::Protocol("pipe emptier than counted".into())),
            Ok(n) => {
                o.sent += n as u64;
                o.head += n as u64;
                o.in_pipe -= n;
                moved = true;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(Fault::Data),
        }
    }
    Ok(moved)
}

fn tee(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both are pipe fds we own, open for the call.
    let n = unsafe { libc::tee(from, to, len, libc::SPLICE_F_NONBLOCK) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn dev_null() -> RawFd {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    NULL.get_or_init(|| {
        let path = c"/dev/null";
        // SAFETY: a valid C string; the fd is owned by the OnceLock for the process.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
        assert!(
            fd >= 0,
            "cannot open /dev/null: {}",
            io::Error::last_os_error()
        );
        // SAFETY: open succeeded.
        unsafe { OwnedFd::from_raw_fd(fd) }
    })
    .as_raw_fd()
}

/// Throws away exactly `n` bytes from the head of `pipe` (they are there).
fn discard(pipe: &Pipe, mut n: usize) -> io::Result<()> {
    while n > 0 {
        match splice(pipe.r.as_raw_fd(), dev_null(), n) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "pipe emptier than counted",
                ))
            }
            Ok(k) => n -= k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn drain(pipe: &Pipe) {
    while let Ok(k) = splice(pipe.r.as_raw_fd(), dev_null(), 1 << 20) {
        if k == 0 {
            break;
        }
    }
}
