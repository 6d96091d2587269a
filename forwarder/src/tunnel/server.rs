//! The public side: agents connect to `[tunnel_server] listen`; a rule whose upstream
//! is `agent:NAME` takes a pooled data connection of a live agent session offering
//! NAME for each visitor.
//!
//! A session outlives its control connection: when the link is lost, its streams keep
//! their visitors (and retention) for resume_grace, waiting for the agent to resume
//! the session and reattach them. Then they are reset (`end=agent_lost`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};

use super::auth;
use super::control;
use super::proto::{read_frame, write_frame, Frame, VERSION};
use super::stream::{self, Event, Link};
use super::{LinkEvent, SERVER_LINK_EVENTS};
use crate::config::{Balance, TunnelServerConfig};
use crate::event;
use crate::relay::{reset_on_close, Side};

/// How long the server gives a draining agent's streams to end after its link closed
/// (looks, and the time between them) before it counts the link as lost.
const DRAINED_WAIT_LOOKS: u32 = 100;
const DRAINED_WAIT_STEP: Duration = Duration::from_millis(10);

/// A new connection must say what it is within this long.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session whose link looks alive has to answer a ping before a new session
/// of the same identity takes its place (see `Registry::replaced_sessions`).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Registry {
    cfg: TunnelServerConfig,
    /// Services some rule serves (`agent:NAME`); an agent offering another is refused.
    known: RwLock<HashSet<String>>,
    sessions: Mutex<HashMap<u64, Arc<ServerSession>>>,
    /// A data connection was pooled, or an agent arrived.
    arrived: Notify,
    next_stream: AtomicU64,
    /// Visitors given to agents so far (see `ServerSession::picked`).
    picks: AtomicU64,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();

/// The process's tunnel server, once `start` ran.
pub fn registry() -> Option<&'static Arc<Registry>> {
    REGISTRY.get()
}

/// Serves the agent port for the life of the process.
pub fn start(cfg: TunnelServerConfig, listener: TcpListener, known: HashSet<String>) {
    let reg = Arc::new(Registry {
        cfg,
        known: RwLock::new(known),
        sessions: Mutex::new(HashMap::new()),
        arrived: Notify::new(),
        next_stream: AtomicU64::new(1),
        picks: AtomicU64::new(0),
        accept: Mutex::new(None),
    });
    let _ = REGISTRY.set(reg.clone());
    let local = listener.local_addr().map_or("?".into(), |a| a.to_string());
    event!(
        info,
        "tunnel listening",
        text = ("tunnel listening listen={local} resume_grace={:?} resume_buffer={}", reg.cfg.resume_grace, reg.cfg.resume_buffer),
        listen = %local,
        resume_grace_s = reg.cfg.resume_grace.as_secs_f64(),
        resume_buffer = reg.cfg.resume_buffer as u64,
    );
    let accepting = reg.clone();
    let task = tokio::spawn(async move {
        let reg = accepting;
        // Said at most once per 5 s, as a rule's accept failure is: out of fds, every
        // retry fails alike (audit: 10 lines a second).
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => {
                    tokio::spawn(reg.clone().handle(conn, peer));
                }
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                        tracing::warn!("tunnel accept failed: {e}; backing off");
                        last_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    *reg.accept.lock().unwrap() = Some(task);
}

/// The services a config's rules serve through agents.
pub fn services_of(rules: &[crate::config::Rule]) -> HashSet<String> {
    rules
        .iter()
        .filter_map(|r| r.agent_service().map(str::to_string))
        .collect()
}

pub struct ServerSession {
    id: u64,
    key: [u8; 32],
    identity: String,
    services: Vec<String>,
    /// The control link and the streams (see `stream::Table`).
    table: stream::Table,
    /// Which control connection is current: a lost one must not mark a resumed session.
    generation: AtomicU64,
    /// Told when a control connection takes over: the lost one's grace wait ends.
    taken_over: Notify,
    pool: Mutex<Vec<TcpStream>>,
    limit: usize,
    /// Where the current (or last) control connection came from, for its `link lost`.
    agent: Mutex<SocketAddr>,
    /// Pongs heard, to tell a live agent from a dead link that still looks open.
    pongs: AtomicU64,
    /// The agent is shutting down (`Draining`): no new stream goes to it.
    draining: AtomicBool,
    /// A draining agent's link ended and its loss is not logged yet (its last streams
    /// may end in a moment, then it left): a resume meanwhile logs it first.
    loss_unsaid: AtomicBool,
    /// Passive health per service, as a rule's upstream has: the service's targets
    /// this agent could not connect in a row, and since when it has failed
    /// [`TARGET_FALL`] times (new visitors of that service go to other agents offering
    /// it for [`TARGET_RETRY`], then it gets them again as a trial). Per service: an
    /// agent whose `web` target refuses serves its `api` as before, and its `api`
    /// streams do not clear `web`'s count.
    targets: Mutex<HashMap<String, TargetHealth>>,
    /// When it was last chosen for a visitor of each service (`Registry::picks`):
    /// round_robin takes the agent chosen longest ago, and so do least_conn's ties.
    /// Per service: with one counter for every service, visitors of two services
    /// arriving in turn each went to the same agent every time.
    picked: Mutex<HashMap<String, u64>>,
}

#[derive(Default)]
struct TargetHealth {
    failures: u32,
    since: Option<Instant>,
}

/// Target connects failing in a row that take an agent out of the balancing while
/// others offer the service: a rule's `fall` default.
const TARGET_FALL: u32 = crate::config::DEFAULT_FALL;
/// How long such an agent gets no new visitor while others can take them: as long as
/// a passively downed upstream waits for its trial.
const TARGET_RETRY: Duration = crate::policy::balance::PASSIVE_RETRY;

impl stream::Session for ServerSession {
    fn send(&self, frame: Frame) {
        self.table.send(frame);
    }

    fn forget(&self, stream: u64) {
        self.table.forget(stream);
    }

    fn finished(&self, stream: u64, sent: u64, received: u64) {
        self.table.finished(stream, sent, received);
    }

    fn dialer(&self) -> Option<(tokio::sync::watch::Receiver<u64>, stream::Dial)> {
        None
    }

    fn target_reached(&self, service: &str) {
        let mut targets = self.targets.lock().unwrap();
        let Some(h) = targets.get_mut(service) else {
            return;
        };
        h.failures = 0;
        if h.since.take().is_some() {
            event!(info, "agent target reached", text = ("agent target reached session={:x} service={service}: its target answers again; it takes new visitors", self.id), session = %format!("{:x}", self.id), service = %service,);
        }
    }
}

impl control::Streams for ServerSession {
    fn deliver(&self, stream: u64, event: Event) {
        if let Some(tx) = self.table.map.lock().unwrap().get(&stream) {
            let _ = tx.send(event);
        }
    }

    fn answered(&self) {
        self.pongs.fetch_add(1, Ordering::Relaxed);
    }

    fn target_failed(&self, service: &str) {
        let mut targets = self.targets.lock().unwrap();
        let h = targets.entry(service.to_string()).or_default();
        h.failures += 1;
        let n = h.failures;
        // Counted again from the trial on: a failed trial starts the wait afresh.
        if n >= TARGET_FALL && h.since.is_none_or(|t| t.elapsed() >= TARGET_RETRY) {
            h.since = Some(Instant::now());
            event!(warn, "agent target failing", text = ("agent target failing session={:x} service={service}: {n} target connects failed in a row; for {TARGET_RETRY:?} new visitors go to other agents offering it, if any", self.id), session = %format!("{:x}", self.id), service = %service, failures = n,);
        }
    }

    fn draining(&self) {
        // Under the pool's lock, as `Registry::data` checks it: no connection is
        // pooled after this. Closing the pooled ones tells the agent that no `Open`
        // is coming on them (one already written is read first, and served).
        let mut pool = self.pool.lock().unwrap();
        if !self.draining.swap(true, Ordering::SeqCst) {
            event!(info, "agent draining", text = ("agent draining session={:x}: the agent is shutting down; new visitors go to other agents", self.id), session = %format!("{:x}", self.id),);
        }
        pool.clear();
    }
}

impl ServerSession {
    fn live(&self) -> bool {
        self.table.control.lock().unwrap().is_some()
    }

    /// Live and not shutting down: new visitors may go to it.
    fn serving(&self) -> bool {
        self.live() && !self.draining.load(Ordering::SeqCst)
    }

    /// When it was last chosen for a visitor of `service` (0: never).
    fn picked(&self, service: &str) -> u64 {
        self.picked
            .lock()
            .unwrap()
            .get(service)
            .copied()
            .unwrap_or(0)
    }

    /// Its targets of `service` failed lately (see `targets`): others are chosen first.
    fn failing(&self, service: &str) -> bool {
        self.targets
            .lock()
            .unwrap()
            .get(service)
            .and_then(|h| h.since)
            .is_some_and(|t| t.elapsed() < TARGET_RETRY)
    }

    /// Whether the agent behind the link answers a ping within [`PROBE_TIMEOUT`]. A
    /// lost link (or one lost meanwhile) does not; neither does one that only looks open
    /// (the agent's host gone, its control connection not yet timed out).
    async fn answers(&self) -> bool {
        let before = self.pongs.load(Ordering::Relaxed);
        self.table.send(Frame::Ping);
        let deadline = Instant::now() + PROBE_TIMEOUT;
        // Bounded: at most PROBE_TIMEOUT / 10 ms looks.
        while Instant::now() < deadline {
            if !self.live() {
                return false;
            }
            if self.pongs.load(Ordering::Relaxed) != before {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Resets every stream now (agent restarted, or grace over); returns how many.
    fn expire_streams(&self) -> usize {
        self.table.expire()
    }
}

impl Registry {
    /// At shutdown: agents are not accepted any more (the port closes); sessions and
    /// their streams drain with the rules' connections.
    pub fn stop_accepting(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Whether an agent offering `service` is connected (`forwarder_upstream_up` of
    /// an `agent:` upstream).
    pub fn offers(&self, service: &str) -> bool {
        self.sessions
            .lock()
            .unwrap()
            .values()
            .any(|s| s.serving() && s.services.iter().any(|n| n == service))
    }

    /// For `/metrics`: how many connected agents offer each service some rule serves
    /// (0 for one none offers), and the streams of every session.
    pub fn metrics(&self) -> (BTreeMap<String, usize>, super::Streams) {
        let mut agents: BTreeMap<String, usize> = self
            .known
            .read()
            .unwrap()
            .iter()
            .map(|s| (s.clone(), 0))
            .collect();
        let mut streams = super::Streams::default();
        for s in self.sessions.lock().unwrap().values() {
            let (live, of) = s.table.streams();
            streams.attached += of.attached;
            streams.waiting += of.waiting;
            if live {
                for service in &s.services {
                    *agents.entry(service.clone()).or_default() += 1;
                }
            }
        }
        (agents, streams)
    }

    pub fn set_known(&self, known: HashSet<String>) {
        *self.known.write().unwrap() = known;
    }

    /// A data connection to an agent offering `service`, the Open frame sent, and the
    /// stream's link; `None` when no agent offered one within `timeout`.
    pub async fn open(
        &self,
        service: &str,
        visitor: SocketAddr,
        balance: Balance,
        timeout: Duration,
        proxy_header: Vec<u8>,
    ) -> Option<(TcpStream, Box<Link>)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some((session, mut conn)) = self.take_conn(service, visitor, balance) {
                let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = mpsc::unbounded_channel();
                session.table.map.lock().unwrap().insert(id, tx);
                let open = Frame::Open {
                    stream: id,
                    service: service.to_string(),
                    visitor: visitor.to_string(),
                    proxy_header: proxy_header.clone(),
                    connect_timeout_ms: timeout.as_millis() as u64,
                };
                if write_frame(&mut conn, &open).await.is_err() {
                    session.table.map.lock().unwrap().remove(&id);
                    continue;
                }
                // TCP_NODELAY: inherited from the tunnel listener (server::bind).
                let limit = session.limit;
                let link = Link {
                    stream: id,
                    events: rx,
                    session,
                    limit,
                    local_side: Side::Client,
                    // Kept until the agent shows it has the stream: a blackhole not yet
                    // noticed swallows it, and the resume then sends it again.
                    open: Some(Box::new(open)),
                };
                return Some((conn, Box::new(link)));
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return None;
            }
        }
    }

    fn take_conn(
        &self,
        service: &str,
        visitor: SocketAddr,
        balance: Balance,
    ) -> Option<(Arc<ServerSession>, TcpStream)> {
        let sessions = self.sessions.lock().unwrap();
        let mut offering: Vec<&Arc<ServerSession>> = sessions
            .values()
            .filter(|s| {
                s.serving()
                    && s.services.iter().any(|n| n == service)
                    && !s.pool.lock().unwrap().is_empty()
            })
            .collect();
        if offering.is_empty() {
            return None;
        }
        // Agents whose targets fail go last resort: only when every one does.
        if offering.iter().any(|s| !s.failing(service)) {
            offering.retain(|s| !s.failing(service));
        }
        offering.sort_by_key(|s| s.id);
        let pick = match balance {
            Balance::First => 0,
            Balance::RoundRobin => (0..offering.len())
                .min_by_key(|&i| offering[i].picked(service))
                .unwrap_or(0),
            Balance::LeastConn | Balance::Random => {
                let load = |s: &&Arc<ServerSession>| s.table.map.lock().unwrap().len();
                let (a, b) = (
                    fastrand::usize(..offering.len()),
                    fastrand::usize(..offering.len()),
                );
                match balance {
                    Balance::Random if load(&offering[a]) <= load(&offering[b]) => a,
                    Balance::Random => b,
                    // Fewest streams; ties (short visitors all tie at 0) go to the one
                    // picked longest ago, as a plain rule's least_conn takes turns (a
                    // counter over tie sets that change starved one of three).
                    _ => {
                        let loads: Vec<usize> = offering.iter().map(load).collect();
                        let fewest = loads.iter().copied().min().unwrap_or(0);
                        (0..offering.len())
                            .filter(|&i| loads[i] == fewest)
                            .min_by_key(|&i| offering[i].picked(service))
                            .unwrap_or(0)
                    }
                }
            }
            Balance::SourceHash => {
                use std::hash::{Hash, Hasher};
                (0..offering.len())
                    .max_by_key(|i| {
                        let mut h = std::collections::hash_map::DefaultHasher::new();
                        (visitor.ip(), &offering[*i].identity).hash(&mut h);
                        h.finish()
                    })
                    .unwrap_or(0)
            }
        };
        let session = offering[pick].clone();
        let turn = self.picks.fetch_add(1, Ordering::Relaxed) + 1;
        session
            .picked
            .lock()
            .unwrap()
            .insert(service.to_string(), turn);
        let conn = session.pool.lock().unwrap().pop()?;
        Some((session, conn))
    }

    async fn handle(self: Arc<Self>, mut conn: TcpStream, peer: SocketAddr) {
        let nonce = auth::nonce();
        let first = async {
            write_frame(&mut conn, &Frame::Challenge { nonce }).await?;
            read_frame(&mut conn).await
        };
        let frame = match tokio::time::timeout(HEADER_TIMEOUT, first).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => return refused(peer, "bad_header", &e.to_string(), conn).await,
            Err(_) => return refused(peer, "bad_header", "timed out", conn).await,
        };
        match frame {
            Frame::Hello {
                version,
                nonce: agent_nonce,
                mac,
                identity,
                services,
                resume,
            } => {
                if version != VERSION {
                    return refused(peer, "bad_version", &format!("version {version}"), conn).await;
                }
                let list = services.join(",");
                if !auth::verify(
                    &self.cfg.token,
                    &auth::hello_parts(&nonce, &agent_nonce, &identity, &list),
                    &mac,
                ) {
                    return refused(peer, "bad_token", "", conn).await;
                }
                let unknown: Vec<&String> = {
                    let known = self.known.read().unwrap();
                    services.iter().filter(|s| !known.contains(*s)).collect()
                };
                if !unknown.is_empty() || services.is_empty() {
                    let what = format!("services {unknown:?} are served by no rule");
                    return refused(peer, "unknown_service", &what, conn).await;
                }
                self.control(conn, peer, nonce, agent_nonce, identity, services, resume)
                    .await;
            }
            Frame::Data {
                session,
                attach,
                mac,
            } => self.data(conn, peer, nonce, session, attach, mac).await,
            other => refused(peer, "bad_header", &format!("{other:?}"), conn).await,
        }
    }

    /// The sessions a new session of `identity` replaces, taken out of the table. The
    /// same identity again is normally the same agent restarted, and its old session's
    /// streams cannot come back: its link is lost, or will be (a host that went away
    /// leaves a link that looks open until the heartbeat gives up), so it answers no
    /// ping. A session that does answer is another live process with the same
    /// configuration on the same host: both serve, as agents offering the same service
    /// do. (Replacing it made the two replace each other in a loop, thousands of times
    /// a second, each time resetting every stream.)
    async fn replaced_sessions(&self, identity: &str) -> Vec<Arc<ServerSession>> {
        let same: Vec<Arc<ServerSession>> = {
            let sessions = self.sessions.lock().unwrap();
            sessions
                .values()
                .filter(|s| s.identity == identity)
                .cloned()
                .collect()
        };
        let mut gone = Vec::new();
        for s in same {
            if s.answers().await {
                event!(info, "agent duplicate", text = ("agent duplicate session={:x}: another live agent has the same identity (host and services); both serve", s.id), session = %format!("{:x}", s.id),);
                continue;
            }
            if let Some(s) = self.sessions.lock().unwrap().remove(&s.id) {
                gone.push(s);
            }
        }
        gone
    }

    #[allow(clippy::too_many_arguments)]
    async fn control(
        self: Arc<Self>,
        mut conn: TcpStream,
        peer: SocketAddr,
        nonce: [u8; 32],
        agent_nonce: [u8; 32],
        identity: String,
        services: Vec<String>,
        resume: Option<(u64, Vec<u64>)>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (session, unknown) = match resume {
            Some((id, agent_streams)) => {
                let found = self.sessions.lock().unwrap().get(&id).cloned();
                let Some(session) = found.filter(|s| s.identity == identity) else {
                    return refused(peer, "unknown_session", &format!("session {id:x}"), conn)
                        .await;
                };
                // The agent lists every stream it holds or ended lately. One it does
                // not list never reached it: its `Open` went into a link already lost
                // (a blackhole not yet noticed here). It is opened again once the
                // agent has pooled a data connection (`reopen`, below).
                let keep: HashSet<u64> = agent_streams.into_iter().collect();
                let unknown: Vec<u64> = {
                    let streams = session.table.map.lock().unwrap();
                    let ids = streams.keys().filter(|s| !keep.contains(s));
                    ids.copied().collect()
                };
                (session, Some(unknown))
            }
            None => {
                for s in self.replaced_sessions(&identity).await {
                    *s.table.control.lock().unwrap() = None;
                    s.pool.lock().unwrap().clear();
                    // A lost link waiting out its grace stops waiting: nothing resumes it.
                    s.taken_over.notify_waiters();
                    let n = s.expire_streams();
                    event!(info, "session replaced", text = ("session replaced session={:x} by a new session of the same agent: streams_reset={n}", s.id), session = %format!("{:x}", s.id), streams_reset = n,);
                }
                let mut id = [0u8; 8];
                getrandom::getrandom(&mut id).expect("random source");
                let session = Arc::new(ServerSession {
                    id: u64::from_be_bytes(id),
                    key: auth::session_key(&self.cfg.token, &nonce, &agent_nonce),
                    identity,
                    services,
                    table: stream::Table::default(),
                    generation: AtomicU64::new(0),
                    taken_over: Notify::new(),
                    pool: Mutex::new(Vec::new()),
                    limit: self.cfg.resume_buffer,
                    agent: Mutex::new(peer),
                    pongs: AtomicU64::new(0),
                    draining: AtomicBool::new(false),
                    loss_unsaid: AtomicBool::new(false),
                    targets: Mutex::new(HashMap::new()),
                    picked: Mutex::new(HashMap::new()),
                });
                self.sessions
                    .lock()
                    .unwrap()
                    .insert(session.id, session.clone());
                (session, None)
            }
        };
        let (resumed, unknown) = (unknown.is_some(), unknown.unwrap_or_default());
        let sid = session.id.to_be_bytes();
        let welcome = Frame::Welcome {
            session: session.id,
            mac: auth::sign(
                &self.cfg.token,
                &auth::welcome_parts(&nonce, &agent_nonce, &sid),
            ),
            resumed,
            grace_ms: self.cfg.resume_grace.as_millis() as u64,
            resume_buffer: self.cfg.resume_buffer as u64,
        };
        if write_frame(&mut conn, &welcome).await.is_err() {
            // Nothing changed hands: a lost link's grace period runs on, and a new
            // session that never had a link is not kept.
            if !resumed {
                self.sessions.lock().unwrap().remove(&session.id);
            }
            return;
        }
        // Pooled connections of an older link went with it.
        session.pool.lock().unwrap().clear();
        // Only now, with the agent told, does this connection take over. Its generation
        // and its sender change together, under the lock the old link's task checks
        // them under (below), so of two resumes racing the newer one's sender stays.
        // A sender still set means the old link's task has not seen it fail (a reset
        // can reach the agent, and the agent come back, first): it will see the new
        // generation and leave quietly, so its loss is logged here.
        let (generation, unseen_loss, old_agent) = {
            let mut control = session.table.control.lock().unwrap();
            let generation = session.generation.fetch_add(1, Ordering::Relaxed) + 1;
            let old_agent = std::mem::replace(&mut *session.agent.lock().unwrap(), peer);
            let unseen_loss =
                control.replace(tx).is_some() || session.loss_unsaid.swap(false, Ordering::SeqCst);
            (generation, unseen_loss, old_agent)
        };
        session.taken_over.notify_waiters();
        for stream in unknown {
            tokio::spawn(self.clone().reopen(session.clone(), generation, stream));
        }
        let sid = format!("{:x}", session.id);
        let services = session.services.join(",");
        if resumed {
            let n = session.table.map.lock().unwrap().len();
            if unseen_loss {
                SERVER_LINK_EVENTS.count(LinkEvent::Lost);
                event!(warn, "link lost", text = ("link lost session={sid} agent={old_agent} streams_waiting={n} (the agent resumed before the old link failed here)"), session = %sid, agent = %old_agent, streams_waiting = n, reason = "resumed before the old link failed here",);
            }
            SERVER_LINK_EVENTS.count(LinkEvent::Resumed);
            event!(info, "link resumed", text = ("link resumed session={sid} agent={peer} streams={n}"), session = %sid, agent = %peer, streams = n,);
        } else {
            SERVER_LINK_EVENTS.count(LinkEvent::Connected);
            event!(info, "agent connected", text = ("agent connected session={sid} agent={peer} services={services}"), session = %sid, agent = %peer, services = %services,);
        }
        self.arrived.notify_waiters();

        let why = control::run(conn, rx, &*session).await;
        // Armed before the check, so a resume right after it still ends the wait.
        let taken_over = session.taken_over.notified();
        tokio::pin!(taken_over);
        taken_over.as_mut().enable();
        {
            // Checked under the lock a resume takes to install its link: exactly one of
            // the two finds this link's sender and logs the loss.
            let mut control = session.table.control.lock().unwrap();
            if session.generation.load(Ordering::Relaxed) != generation {
                return; // resumed (or replaced) on another connection meanwhile
            }
            *control = None;
        }
        session.pool.lock().unwrap().clear();
        if !self.sessions.lock().unwrap().contains_key(&session.id) {
            return;
        }
        let mut waiting = session.table.map.lock().unwrap().len();
        if session.draining.load(Ordering::SeqCst) {
            // A drained agent exits once its streams are done on its side; here their
            // ends may still be on their way (seen: the last one 0.1 ms after the link).
            // A resume meanwhile (the link failed mid-drain) logs this loss itself.
            session.loss_unsaid.store(true, Ordering::SeqCst);
            for _ in 0..DRAINED_WAIT_LOOKS {
                if waiting == 0 || session.generation.load(Ordering::Relaxed) != generation {
                    break;
                }
                tokio::time::sleep(DRAINED_WAIT_STEP).await;
                waiting = session.table.map.lock().unwrap().len();
            }
            if !session.loss_unsaid.swap(false, Ordering::SeqCst) {
                return; // resumed, and said so
            }
        }
        if waiting == 0 && session.draining.load(Ordering::SeqCst) {
            // A drained agent that closes its link is gone, not lost: it has nothing to
            // resume, and waiting resume_grace for it would only say "link lost".
            if self.sessions.lock().unwrap().remove(&session.id).is_some() {
                event!(info, "agent left", text = ("agent left session={sid} agent={peer}: it drained and closed its link ({why})"), session = %sid, agent = %peer, reason = %why,);
            }
            return;
        }
        SERVER_LINK_EVENTS.count(LinkEvent::Lost);
        event!(warn, "link lost", text = ("link lost session={sid} agent={peer} streams_waiting={waiting} ({why}); waiting up to {:?} for it to resume", self.cfg.resume_grace), session = %sid, agent = %peer, streams_waiting = waiting, reason = %why,);
        let since = Instant::now();
        tokio::select! {
            _ = tokio::time::sleep(self.cfg.resume_grace) => {}
            // Resumed: nothing of this link is kept for the rest of the grace.
            _ = taken_over => return,
        }
        if session.generation.load(Ordering::Relaxed) != generation || session.live() {
            return;
        }
        if self.sessions.lock().unwrap().remove(&session.id).is_none() {
            return; // replaced meanwhile: its streams were reset then, and logged
        }
        let n = session.expire_streams();
        SERVER_LINK_EVENTS.count(LinkEvent::GraceExpired);
        event!(warn, "grace expired", text = ("grace expired session={sid} streams_reset={n} after {:.1}s", since.elapsed().as_secs_f64()), session = %sid, streams_reset = n,);
    }

    /// Gives `stream`, which the resumed agent did not know, a pooled data connection
    /// of its session to send its `Open` on again (`Event::Reopen`), as soon as the
    /// agent has pooled one. Given up when the link is lost again (the next resume
    /// tries again: the agent will not know the stream then either) or the stream ends.
    async fn reopen(self: Arc<Self>, session: Arc<ServerSession>, generation: u64, stream: u64) {
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if session.generation.load(Ordering::Relaxed) != generation || !session.live() {
                return;
            }
            let Some(tx) = session.table.map.lock().unwrap().get(&stream).cloned() else {
                return;
            };
            let conn = session.pool.lock().unwrap().pop();
            if let Some(conn) = conn {
                let _ = tx.send(Event::Reopen(conn));
                return;
            }
            // Looked at again at least once a second: a lost link notifies nobody here.
            let _ = tokio::time::timeout(Duration::from_secs(1), arrived).await;
        }
    }

    async fn data(
        &self,
        mut conn: TcpStream,
        peer: SocketAddr,
        nonce: [u8; 32],
        session: u64,
        attach: Option<u64>,
        mac: [u8; 32],
    ) {
        let found = self.sessions.lock().unwrap().get(&session).cloned();
        let Some(s) = found else {
            return refused(
                peer,
                "unknown_session",
                &format!("data connection for session {session:x}"),
                conn,
            )
            .await;
        };
        let sid = session.to_be_bytes();
        let attach_b = auth::attach_bytes(attach);
        if !auth::verify(&s.key, &auth::data_parts(&nonce, &sid, &attach_b), &mac) {
            return refused(peer, "bad_data_mac", "", conn).await;
        }
        match attach {
            None => {
                let mut pool = s.pool.lock().unwrap();
                if s.live() && !s.draining.load(Ordering::SeqCst) {
                    pool.push(conn);
                    drop(pool);
                    self.arrived.notify_waiters();
                }
            }
            Some(stream) => {
                let tx = s.table.map.lock().unwrap().get(&stream).cloned();
                match tx {
                    Some(tx) => {
                        let _ = tx.send(Event::Attach(conn));
                    }
                    None => {
                        let done = s.table.finished.lock().unwrap().of(stream);
                        if let Some((sent, received)) = done {
                            return finish_again(&s, conn, stream, sent, received).await;
                        }
                        let _ = write_frame(
                            &mut conn,
                            &Frame::Refused {
                                reason: "unknown_stream".into(),
                            },
                        )
                        .await;
                    }
                }
            }
        }
    }
}

/// The agent came back for a stream that ended complete here (see `stream::Finished`): the
/// `Resume` exchange tells it we have all its bytes, and our `Fin` tells it where ours
/// end (it has them all: it acknowledged them). Its stream then ends as ours did.
async fn finish_again(
    s: &ServerSession,
    mut conn: TcpStream,
    stream: u64,
    sent: u64,
    received: u64,
) {
    if let Ok(Ok(Frame::Resume { .. })) = stream::resume_exchange(&mut conn, received).await {
        s.table.send(Frame::Fin { stream, at: sent });
    }
}

/// Logs and refuses a connection on the agent port; nothing of it reaches a target.
async fn refused(peer: SocketAddr, reason: &str, detail: &str, mut conn: TcpStream) {
    let shown = if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    };
    event!(warn, "agent refused", text = ("agent refused agent={peer} reason={reason}{shown}"), agent = %peer, reason = %reason, detail = %detail,);
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        write_frame(
            &mut conn,
            &Frame::Refused {
                reason: reason.into(),
            },
        ),
    )
    .await;
    reset_on_close(&conn);
}
