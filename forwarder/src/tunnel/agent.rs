//! The private side: dials the server, offers services, keeps a pool of idle data
//! connections (so a visitor's first byte needs no dial), and for each `Open` connects
//! the service's target and runs the stream.
//!
//! When the link is lost the agent keeps its targets and dials again with back-off
//! (100 ms doubling to 5 s), resumes the session, and each stream dials a data
//! connection to reattach itself. A session not resumed within the server's
//! resume_grace is over: its streams are reset (`end=agent_lost`) and the next
//! connection starts a new one.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::auth;
use super::control;
use super::proto::{read_frame, write_frame, Frame, VERSION};
use super::stream::{self, Event, Link};
use super::{LinkEvent, Streams, AGENT_LINK_EVENTS};
use crate::config::AgentConfig;
use crate::connection::{end_text, relay_bounded, Abort, Limits};
use crate::event;
use crate::relay::{reset_on_close, Pair, Progress, Side};

/// Idle data connections kept open to the server.
const POOL: usize = 8;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting and authenticating the control connection; short, so that once a lost
/// link is back the agent notices within its back-off, not a SYN retransmit later.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the shutdown waits for the server to close our pooled data connections
/// after `Draining` (a round trip, normally).
const DRAIN_NOTICE: Duration = Duration::from_secs(1);

struct AgentSession {
    cfg: AgentConfig,
    /// The session being served or resumed: id and key.
    current: Mutex<Option<(u64, [u8; 32])>>,
    /// The control link and the streams (see `stream::Table`).
    table: stream::Table,
    /// The live link's generation, 0 while down: streams reattach on a change.
    link: watch::Sender<u64>,
    /// The server's resume_buffer, which bounds what we retain too.
    limit: AtomicU64,
    /// Control frames for streams whose `Open` has not been read yet: the two travel
    /// on different connections, so a short stream's FIN can overtake its `Open`.
    early: Mutex<HashMap<u64, (Instant, Vec<Event>)>>,
    /// The process's connection slots: each target connection holds one, so the
    /// shutdown drain waits for it as for any connection.
    global: Arc<Semaphore>,
    /// The end of the shutdown grace period.
    abort: Arc<Abort>,
    /// Shutdown began: no new stream is taken; live ones go on (and so does the link).
    draining: AtomicBool,
    /// Shutdown is over: the link is closed, and not dialed again.
    finished: AtomicBool,
    /// Pool slots running, and told when one ends: the drain waits for them (each
    /// either reads an `Open` the server wrote before it heard `Draining`, or sees
    /// the server close its connection).
    pool_slots: AtomicUsize,
    pool_slot_ended: Notify,
    /// Each service's metrics (`rule` = the service, as in its close lines), kept for
    /// the process's life as a rule's are by its runtime.
    stats: HashMap<String, Arc<crate::metrics::RuleStats>>,
}

/// How long, and how many, early frames are kept for a stream not (yet) opened.
const EARLY_KEEP: Duration = Duration::from_secs(30);
const EARLY_MAX: usize = 65536;

impl stream::Session for AgentSession {
    fn send(&self, frame: Frame) {
        self.table.send(frame);
    }

    fn forget(&self, stream: u64) {
        // Remembered a while: the resume lists it, so the server does not take it
        // for one whose `Open` never arrived (and it hears of the reset again).
        self.table.forget_ended(stream);
    }

    fn finished(&self, stream: u64, sent: u64, received: u64) {
        self.table.finished(stream, sent, received);
    }

    fn dialer(&self) -> Option<(watch::Receiver<u64>, stream::Dial)> {
        let server = self.cfg.server.clone();
        let current = *self.current.lock().unwrap();
        let dial: stream::Dial = Arc::new(move |stream| {
            let server = server.clone();
            Box::pin(async move {
                let (session, key) = current.ok_or_else(|| std::io::Error::other("no session"))?;
                dial_data(&server, session, &key, Some(stream)).await
            })
        });
        Some((self.link.subscribe(), dial))
    }
}

impl control::Streams for AgentSession {
    fn deliver(&self, stream: u64, event: Event) {
        let streams = self.table.map.lock().unwrap();
        if let Some(tx) = streams.get(&stream) {
            let _ = tx.send(event);
            return;
        }
        // Not opened yet, or already ended (then it is dropped after EARLY_KEEP).
        let mut early = self.early.lock().unwrap();
        if early.len() >= EARLY_MAX {
            early.retain(|_, (t, _)| t.elapsed() < EARLY_KEEP);
        }
        if early.len() < EARLY_MAX {
            early
                .entry(stream)
                .or_insert_with(|| (Instant::now(), Vec::new()))
                .1
                .push(event);
        }
    }
}

impl AgentSession {
    /// Starts taking a stream's control frames, with any that came before its `Open`.
    fn register(&self, stream: u64) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut streams = self.table.map.lock().unwrap();
        let mut early = self.early.lock().unwrap();
        for event in early.remove(&stream).map(|(_, e)| e).unwrap_or_default() {
            let _ = tx.send(event);
        }
        early.retain(|_, (t, _)| t.elapsed() < EARLY_KEEP);
        streams.insert(stream, tx);
        rx
    }
}

impl AgentSession {
    fn expire_streams(&self) -> usize {
        self.early.lock().unwrap().clear();
        self.table.expire()
    }

    /// The session is over (its grace ran out, here or at the server): its streams
    /// are reset, and `grace expired` says how many (`why`, if any, follows).
    fn end_session(&self, why: &str) {
        *self.current.lock().unwrap() = None;
        let n = self.expire_streams();
        AGENT_LINK_EVENTS.count(LinkEvent::GraceExpired);
        event!(
            warn,
            "grace expired",
            text = (
                "grace expired server={} streams_reset={n}{why}",
                self.cfg.server
            ),
            streams_reset = n,
        );
    }
}

/// The running agent, as the process's shutdown sees it.
pub struct Agent {
    session: Arc<AgentSession>,
    task: JoinHandle<()>,
}

impl Agent {
    /// Shutdown begins: the server is told (`Draining`: it sends new visitors to
    /// other agents, and closes our pooled data connections), and the pool is not
    /// refilled. Returns once every pool slot has ended (within [`DRAIN_NOTICE`]):
    /// a visitor the server sent before it heard is served, and holds its slot, so
    /// the drain that follows counts it. The live streams drain with the process's
    /// other connections (they hold its slots).
    pub async fn stop_accepting(&self) {
        let s = &self.session;
        s.draining.store(true, Ordering::SeqCst);
        s.table.send(Frame::Draining);
        let deadline = tokio::time::Instant::now() + DRAIN_NOTICE;
        loop {
            let ended = s.pool_slot_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if s.pool_slots.load(Ordering::SeqCst) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return;
            }
        }
    }

    /// Shutdown is over (streams ended, or reset at the end of the grace period):
    /// what is queued for the server (those resets) is written, then the link is
    /// closed, within a second.
    pub async fn finish(mut self) {
        self.session.finished.store(true, Ordering::SeqCst);
        // The writer ends once its queue is empty and no sender is left.
        *self.session.table.control.lock().unwrap() = None;
        if tokio::time::timeout(Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

/// The process's agent (one at most: `[agent]` applies at start only), for `/metrics`.
static RUNNING: OnceLock<Weak<AgentSession>> = OnceLock::new();

/// For `/metrics`, when this process runs an agent: whether its link to the server is
/// up, and its streams.
pub fn metrics() -> Option<(bool, Streams)> {
    Some(RUNNING.get()?.upgrade()?.table.streams())
}

/// Starts the agent; it runs until [`Agent::finish`]. Its target connections take
/// `global` slots and end at `abort`, as a rule's connections do.
pub fn start(cfg: AgentConfig, global: Arc<Semaphore>, abort: Arc<Abort>) -> Agent {
    let (link, _) = watch::channel(0u64);
    let stats = cfg
        .services
        .iter()
        .map(|s| (s.name.clone(), crate::metrics::global().rule(&s.name)))
        .collect();
    let session = Arc::new(AgentSession {
        stats,
        cfg,
        current: Mutex::new(None),
        table: stream::Table::default(),
        link,
        limit: AtomicU64::new(crate::config::DEFAULT_RESUME_BUFFER as u64),
        early: Mutex::new(HashMap::new()),
        global,
        abort,
        draining: AtomicBool::new(false),
        finished: AtomicBool::new(false),
        pool_slots: AtomicUsize::new(0),
        pool_slot_ended: Notify::new(),
    });
    let _ = RUNNING.set(Arc::downgrade(&session));
    let task = tokio::spawn(run(session.clone()));
    Agent { session, task }
}

async fn run(session: Arc<AgentSession>) {
    let generation = AtomicU64::new(0);
    let mut backoff = BACKOFF_FIRST;
    let mut lost_since: Option<(Instant, Duration)> = None;
    let services = session
        .cfg
        .services
        .iter()
        .map(|s| s.name.clone())
        .collect::<Vec<_>>();
    loop {
        if session.finished.load(Ordering::SeqCst) {
            return;
        }
        // A session not resumed within its grace is over.
        if let Some((since, grace)) = lost_since {
            if since.elapsed() >= grace && session.current.lock().unwrap().is_some() {
                session.end_session("");
                lost_since = None;
            }
        }
        let attempt = tokio::time::timeout(CONTROL_TIMEOUT, connect_control(&session, &services));
        // The grace runs out on time, not when an attempt under way gives up (a
        // blackholed link makes each one wait out CONTROL_TIMEOUT): the attempt is
        // dropped, and the session ended, as the server ends its own.
        let grace_end = lost_since
            .filter(|_| session.current.lock().unwrap().is_some())
            .map(|(since, grace)| since + grace);
        let attempt = match grace_end {
            Some(end) => tokio::select! {
                a = attempt => a,
                _ = tokio::time::sleep_until(end.into()) => continue,
            },
            None => attempt.await,
        };
        let (conn, welcome) = match attempt {
            Ok(Ok(c)) => c,
            Ok(Err(Refusal::UnknownSession)) => {
                // The server forgot the session (restarted, or grace over there): its
                // streams are over as if our grace had run out, and logged as that.
                session.end_session(" (the server no longer knows the session: its grace ran out there, or it restarted); starting a new one");
                lost_since = None;
                continue;
            }
            Ok(Err(Refusal::Other(why))) => {
                tracing::warn!(
                    "agent: cannot connect to {}: {why}; retrying in {backoff:?}",
                    session.cfg.server
                );
                sleep_backoff(&mut backoff, lost_since).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    "agent: connecting to {} timed out; retrying in {backoff:?}",
                    session.cfg.server
                );
                sleep_backoff(&mut backoff, lost_since).await;
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        let (sid, grace, resumed) = welcome;
        let n = session.table.map.lock().unwrap().len();
        let (tx, rx) = mpsc::unbounded_channel();
        *session.table.control.lock().unwrap() = Some(tx);
        let gen_now = generation.fetch_add(1, Ordering::Relaxed) + 1;
        // `send_replace`, not `send`: with no stream watching yet (the first link),
        // `send` changes nothing, and the streams of that link, finding generation 0
        // ("no link"), never dialed again when their data connection failed.
        session.link.send_replace(gen_now);
        let server = conn
            .peer_addr()
            .map_or(session.cfg.server.clone(), |a| a.to_string());
        let sid_text = format!("{sid:x}");
        // As the server says it: a resumed session is `link resumed`, even with no
        // stream left to carry over.
        if resumed {
            // Streams that ended here while the link was going: their last ack and
            // `Fin` may not have reached the server, which waits for them (a stream
            // it already finished ignores them).
            for frame in session.table.finished.lock().unwrap().last_frames() {
                session.table.send(frame);
            }
            AGENT_LINK_EVENTS.count(LinkEvent::Resumed);
            event!(info, "link resumed", text = ("link resumed server={server} session={sid_text} streams={n}"), server = %server, session = %sid_text, streams = n,);
        } else {
            AGENT_LINK_EVENTS.count(LinkEvent::Connected);
            event!(info, "agent connected", text = ("agent connected server={server} session={sid_text} services={}", services.join(",")), server = %server, session = %sid_text, services = %services.join(","),);
        }
        if session.draining.load(Ordering::SeqCst) {
            // Shutting down while the link was lost: the server hears it now.
            session.table.send(Frame::Draining);
        }
        let pool = tokio::spawn(keep_pool(session.clone()));
        let why = control::run(conn, rx, &*session).await;
        pool.abort();
        *session.table.control.lock().unwrap() = None;
        session.link.send_replace(0);
        if session.finished.load(Ordering::SeqCst) {
            return;
        }
        let waiting = session.table.map.lock().unwrap().len();
        AGENT_LINK_EVENTS.count(LinkEvent::Lost);
        event!(warn, "link lost", text = ("link lost server={server} session={sid_text} streams_waiting={waiting} ({why}); reconnecting"), server = %server, session = %sid_text, streams_waiting = waiting, reason = %why,);
        lost_since = Some((Instant::now(), grace));
    }
}

async fn sleep_backoff(backoff: &mut Duration, lost: Option<(Instant, Duration)>) {
    let mut wait = *backoff;
    if let Some((since, grace)) = lost {
        // Wake in time to expire the session when its grace ends.
        wait = wait.min(grace.saturating_sub(since.elapsed()) + Duration::from_millis(10));
    }
    tokio::time::sleep(wait).await;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
}

enum Refusal {
    UnknownSession,
    Other(String),
}

/// Dials, authenticates and resumes (or starts) the session: its id, its grace period
/// and whether it was resumed.
async fn connect_control(
    session: &AgentSession,
    services: &[String],
) -> Result<(TcpStream, (u64, Duration, bool)), Refusal> {
    let other = |e: std::io::Error| Refusal::Other(e.to_string());
    let mut conn = crate::connection::connect_addr(&session.cfg.server)
        .await
        .map_err(other)?;
    let _ = conn.set_nodelay(true);
    let Frame::Challenge { nonce } = read_frame(&mut conn).await.map_err(other)? else {
        return Err(Refusal::Other("server did not send a challenge".into()));
    };
    let agent_nonce = auth::nonce();
    let list = services.join(",");
    let identity = session.cfg.identity.clone();
    let current = *session.current.lock().unwrap();
    // The streams we hold, and those that ended here lately: the server keeps those
    // of its own, which may still wait for our last frames (sent again once resumed).
    let resume = current.map(|(id, _)| {
        let mut streams: Vec<u64> = session.table.map.lock().unwrap().keys().copied().collect();
        streams.extend(session.table.finished.lock().unwrap().ids());
        (id, streams)
    });
    let hello = Frame::Hello {
        version: VERSION,
        nonce: agent_nonce,
        mac: auth::sign(
            &session.cfg.token,
            &auth::hello_parts(&nonce, &agent_nonce, &identity, &list),
        ),
        identity,
        services: services.to_vec(),
        resume,
    };
    write_frame(&mut conn, &hello).await.map_err(other)?;
    match read_frame(&mut conn).await.map_err(other)? {
        Frame::Welcome {
            session: id,
            mac,
            resumed,
            grace_ms,
            resume_buffer,
        } => {
            let sid = id.to_be_bytes();
            if !auth::verify(
                &session.cfg.token,
                &auth::welcome_parts(&nonce, &agent_nonce, &sid),
                &mac,
            ) {
                return Err(Refusal::Other(
                    "the server's answer does not prove it has our token".into(),
                ));
            }
            session.limit.store(resume_buffer, Ordering::Relaxed);
            if !resumed {
                // A new session: streams of an old one cannot come back.
                let n = session.expire_streams();
                if n > 0 {
                    tracing::warn!("agent: new session, streams_reset={n}");
                }
                session.table.finished.lock().unwrap().clear();
                let key = auth::session_key(&session.cfg.token, &nonce, &agent_nonce);
                *session.current.lock().unwrap() = Some((id, key));
            }
            Ok((conn, (id, Duration::from_millis(grace_ms), resumed)))
        }
        Frame::Refused { reason } if reason == "unknown_session" => Err(Refusal::UnknownSession),
        Frame::Refused { reason } => {
            Err(Refusal::Other(format!("refused by the server: {reason}")))
        }
        f => Err(Refusal::Other(format!("unexpected answer {f:?}"))),
    }
}

/// A data connection with its `Data` header sent.
async fn dial_data(
    server: &str,
    session: u64,
    key: &[u8; 32],
    attach: Option<u64>,
) -> std::io::Result<TcpStream> {
    let dial = async {
        let mut conn = crate::connection::connect_addr(server).await?;
        let _ = conn.set_nodelay(true);
        let Frame::Challenge { nonce } = read_frame(&mut conn).await? else {
            return Err(std::io::Error::other("server did not send a challenge"));
        };
        let sid = session.to_be_bytes();
        let a = auth::attach_bytes(attach);
        let mac = auth::sign(key, &auth::data_parts(&nonce, &sid, &a));
        write_frame(
            &mut conn,
            &Frame::Data {
                session,
                attach,
                mac,
            },
        )
        .await?;
        Ok(conn)
    };
    tokio::time::timeout(DIAL_TIMEOUT, dial)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "dial timed out"))?
}

/// Keeps [`POOL`] idle data connections waiting for `Open`, for as long as the link.
async fn keep_pool(session: Arc<AgentSession>) {
    let mut slots = tokio::task::JoinSet::new();
    for _ in 0..POOL {
        slots.spawn(pool_slot(session.clone()));
    }
    while slots.join_next().await.is_some() {}
}

async fn pool_slot(session: Arc<AgentSession>) {
    session.pool_slots.fetch_add(1, Ordering::SeqCst);
    let _counted = SlotCount(&session);
    let mut backoff = BACKOFF_FIRST;
    loop {
        let Some((id, key)) = *session.current.lock().unwrap() else {
            return;
        };
        if session.draining.load(Ordering::SeqCst) {
            return;
        }
        let conn = dial_data(&session.cfg.server, id, &key, None).await;
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!("agent: data connection failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_FIRST;
        match read_frame(&mut conn).await {
            Ok(open @ Frame::Open { stream, .. }) => {
                // Registered, and a connection slot taken if one is free, before this
                // slot can end: a resume lists the stream, and a drain counts it. (The
                // server may send its FIN, or acks, right after the Open, while the
                // target is still being connected.)
                let rx = session.register(stream);
                let slot = session.global.clone().try_acquire_owned().ok();
                tokio::spawn(serve_stream(session.clone(), conn, open, rx, slot));
            }
            Ok(Frame::Refused { reason }) => {
                tracing::warn!("agent: data connection refused: {reason}");
                tokio::time::sleep(BACKOFF_MAX).await;
            }
            Ok(other) => tracing::warn!("agent: unexpected frame on a data connection: {other:?}"),
            // Closed by the server (a new link, or shutdown): the slot dials again.
            Err(_) => tokio::time::sleep(BACKOFF_FIRST).await,
        }
    }
}

/// Counts a running pool slot (see `AgentSession::pool_slots`), also when aborted.
struct SlotCount<'a>(&'a AgentSession);

impl Drop for SlotCount<'_> {
    fn drop(&mut self) {
        self.0.pool_slots.fetch_sub(1, Ordering::SeqCst);
        self.0.pool_slot_ended.notify_waiters();
    }
}

/// One visitor (`open`, its `Open`; `rx`, its control frames; `slot`, its connection
/// slot if one was free): connect the target and relay until the stream ends. (While
/// shutting down too: the server sent it before it heard `Draining`.)
async fn serve_stream(
    session: Arc<AgentSession>,
    data: TcpStream,
    open: Frame,
    rx: mpsc::UnboundedReceiver<Event>,
    slot: Option<OwnedSemaphorePermit>,
) {
    let started = Instant::now();
    let Frame::Open {
        stream,
        service,
        visitor,
        proxy_header,
        connect_timeout_ms,
    } = open
    else {
        unreachable!("serve_stream is given an Open");
    };
    let offered = session.cfg.services.iter().find(|s| s.name == service);
    let target = offered.map(|s| s.target.clone());
    // Set as a rule's are on its upstream connections.
    let (from, keepalive) = offered.map_or((None, None), |s| (s.connect_from, s.tcp_keepalive));
    let rates = offered.map_or([None; 2], |s| s.rates);
    let visitor_addr: SocketAddr = visitor.parse().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    // Counted in the service's metrics like a rule's pair (an unknown service, which
    // is refused, has none).
    let stats = session.stats.get(&service);
    let open = stats.map(|s| s.open(started));
    let progress = match &open {
        Some(open) => open.progress().clone(),
        None => Arc::new(Progress::default()),
    };
    let log = |upstream: &str, end: &str, progress: &Progress| {
        crate::connection::log_close(&service, visitor_addr, upstream, started, progress, end)
    };
    let Some(target) = target else {
        refuse_stream(&session, &data, stream);
        return log("none", "unknown_service", &progress);
    };
    // A slot like any connection's, so the shutdown drain waits for this one too.
    let _slot = match slot {
        Some(slot) => slot,
        None => match session.global.clone().acquire_owned().await {
            Ok(slot) => slot,
            Err(_) => {
                refuse_stream(&session, &data, stream);
                return log(&target, "shutdown", &progress);
            }
        },
    };
    // The server rule's connect_timeout (0 from nothing but a bad frame: the default).
    let connect_timeout = match connect_timeout_ms {
        0 => TARGET_CONNECT_TIMEOUT,
        ms => Duration::from_millis(ms),
    };
    // As a rule's upstream: each address of a name in turn, connect_timeout each.
    let dialed = crate::connection::connect_one_patiently(&target, connect_timeout, from).await;
    let (mut local, reached) = match dialed {
        Ok((s, addr, failed)) => {
            crate::connection::say_failed_addresses(&service, visitor_addr, &target, &failed);
            (s, addr)
        }
        // Accepted and reset at once: the target reset the pair, as a plain rule's
        // upstream that does so (not a failed connect; the visitor is reset).
        Err(crate::connection::ConnectError {
            reset: Some((_, e)),
            ..
        }) => {
            refuse_stream(&session, &data, stream);
            let end = crate::connection::upstream_reset_at_connect(e);
            return log(&target, &end, &progress);
        }
        Err(e) => {
            unreachable_stream(&session, &data, stream, &service, &e.why);
            // Out of our own fds or memory says nothing of the target.
            if let Some(s) = stats.filter(|_| !e.local) {
                s.connect_error(&target);
            }
            return log(&target, &format!("connect_failed ({})", e.why), &progress);
        }
    };
    // The close line names the address reached, as a rule's does (a name as written
    // says nothing of which of its addresses answered).
    let target = reached.to_string();
    let _ = local.set_nodelay(true);
    if let Some(idle) = keepalive {
        // The stream works without it; the log says a dead target goes unnoticed.
        if let Err(e) = crate::server::set_keepalive((&local).into(), Some(idle)) {
            tracing::warn!("tcp_keepalive on service={service} target={target} failed: {e}");
        }
    }
    if !proxy_header.is_empty() {
        if let Err(e) = local.write_all(&proxy_header).await {
            refuse_stream(&session, &data, stream);
            return log(
                &target,
                &format!("upstream_error (writing PROXY header: {e})"),
                &progress,
            );
        }
    }
    let link = Link {
        stream,
        events: rx,
        session: session.clone(),
        limit: session.limit.load(Ordering::Relaxed) as usize,
        local_side: Side::Upstream,
        open: None,
    };
    let pair = Pair {
        client: data,
        upstream: local,
        tunnel: Some(Box::new(link)),
    };
    // Run to its end, paced by the service's own rates (the server's rule paces on
    // its side too: the slower wins), or reset when the shutdown grace period is over
    // (the server's rule has the limits).
    let relay = Box::pin(super::TunnelRelay::run(
        pair,
        &progress,
        Default::default(),
        rates,
    ));
    let end = match relay_bounded(relay, &progress, Limits::NONE, &session.abort, None).await {
        Ok(end) => end_text(&end),
        Err(why) => Cow::Borrowed(why),
    };
    log(&target, &end, &progress);
}

/// A stream this agent cannot serve: the visitor is reset (through the server).
fn refuse_stream(session: &AgentSession, data: &TcpStream, stream: u64) {
    reset_on_close(data);
    stream::Session::forget(session, stream);
    stream::Session::send(session, Frame::Reset { stream });
}

/// A stream whose target could not be connected: ended as a refused one is, and the
/// server told why (its close line says `connect_failed`, and it counts the failure
/// against this agent). Should the frame be lost with the link, the resume sends a
/// `Reset` for the stream, as for any this agent ended.
fn unreachable_stream(
    session: &AgentSession,
    data: &TcpStream,
    stream: u64,
    service: &str,
    why: &str,
) {
    reset_on_close(data);
    stream::Session::forget(session, stream);
    let (service, why) = (service.to_string(), why.to_string());
    stream::Session::send(
        session,
        Frame::Unreachable {
            stream,
            service,
            why,
        },
    );
}
