//! The control connection, the same on both sides: frames out from a queue, frames in
//! dispatched to streams, and a heartbeat that declares the link lost when nothing
//! arrives for [`DEAD_AFTER`] (a blackholed link never errors by itself).

use std::future::poll_fn;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

use super::proto::{encode_into, read_frame, Frame};
use super::stream::Event;
use crate::deadlines::Deadline;

pub const PING_EVERY: Duration = Duration::from_secs(1);
pub const DEAD_AFTER: Duration = Duration::from_secs(4);
/// Frames queued together go out in one write, up to this many: a stream's end is an
/// `Ack` and a `Fin` each way, often queued in the same pass.
const WRITE_BATCH: usize = 32;
/// Room to read several frames in one recv (frames are small; a `Hello`, the
/// largest, comes before this loop). Unbuffered, each frame took three reads: its
/// length, its body, and the read that found the socket empty.
const READ_BUFFER: usize = 4096;

/// Where incoming stream frames go.
pub trait Streams: Send + Sync {
    fn deliver(&self, stream: u64, event: Event);
    /// A `Pong` arrived: the peer process is alive and answering now.
    fn answered(&self) {}
    /// Server side: the agent is shutting down (`Draining`).
    fn draining(&self) {}
    /// Server side: the agent could not connect a target of `service` (`Unreachable`).
    fn target_failed(&self, _service: &str) {}
}

/// Runs the link until it fails, or until every sender of `outgoing` is gone (the
/// agent's shutdown): then the frames still queued are written, our write side is
/// shut, and the peer's close awaited. Returns why, for the `link lost` line.
pub async fn run(
    conn: TcpStream,
    mut outgoing: mpsc::UnboundedReceiver<Frame>,
    streams: &dyn Streams,
) -> String {
    let _ = conn.set_nodelay(true);
    let (r, mut w) = conn.into_split();
    // Nothing but frames comes on this connection, so reading ahead is safe.
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    // A ping heard, to be answered (pings coalesce: any frame proves the link).
    let pong = Notify::new();
    let writer = async {
        // The first ping at once, as an interval's first tick.
        let mut ping = Deadline::new(Instant::now());
        let mut out = Vec::new();
        loop {
            let frame = tokio::select! {
                f = outgoing.recv() => match f {
                    Some(f) => f,
                    None => {
                        let _ = w.shutdown().await;
                        return None;
                    }
                },
                _ = poll_fn(|cx| ping.poll(cx)) => {
                    ping.reset(Instant::now() + PING_EVERY);
                    Frame::Ping
                }
                _ = pong.notified() => Frame::Pong,
            };
            out.clear();
            encode_into(&frame, &mut out);
            for _ in 1..WRITE_BATCH {
                match outgoing.try_recv() {
                    Ok(f) => encode_into(&f, &mut out),
                    Err(_) => break,
                }
            }
            if let Err(e) = w.write_all(&out).await {
                return Some(format!("write: {e}"));
            }
        }
    };
    let reader = async {
        // Moved on only when it fires: a frame just notes the time.
        let mut heard = Instant::now();
        let mut dead = Deadline::new(heard + DEAD_AFTER);
        loop {
            let read = read_frame(&mut r);
            tokio::pin!(read);
            let frame = loop {
                tokio::select! {
                    f = &mut read => break f,
                    _ = poll_fn(|cx| dead.poll(cx)) => {
                        if heard.elapsed() >= DEAD_AFTER {
                            return format!("nothing heard for {DEAD_AFTER:?}");
                        }
                        dead.reset(heard + DEAD_AFTER);
                    }
                }
            };
            heard = Instant::now();
            let frame = match frame {
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return "closed by peer".into()
                }
                Err(e) => return format!("read: {e}"),
                Ok(f) => f,
            };
            match frame {
                Frame::Ack { stream, received } => streams.deliver(stream, Event::Ack(received)),
                Frame::Fin { stream, at } => streams.deliver(stream, Event::Fin(at)),
                Frame::Reset { stream } => streams.deliver(stream, Event::Reset),
                Frame::Unreachable {
                    stream,
                    service,
                    why,
                } => {
                    streams.target_failed(&service);
                    streams.deliver(stream, Event::Unreachable(format!("at the agent: {why}")))
                }
                Frame::Ping => pong.notify_one(),
                Frame::Pong => streams.answered(),
                Frame::Draining => streams.draining(),
                other => return format!("unexpected frame {other:?}"),
            }
        }
    };
    tokio::pin!(reader);
    let failed = tokio::select! {
        why = writer => why,
        why = &mut reader => Some(why),
    };
    if let Some(why) = failed {
        return why;
    }
    // Closed here: read on until the peer closes too, so that we close with nothing
    // unread (which would be a reset, and could cost the peer our last frames).
    let _ = tokio::time::timeout(DEAD_AFTER, reader).await;
    "closed locally".into()
}
