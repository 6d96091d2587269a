//! The one place that owns a connection pair's lifecycle: admission (PROXY header,
//! access lists, schedule, per-source limits), connect with failover, the PROXY header
//! to the upstream, the relay, idle timeout / max duration / forced shutdown, and the
//! close log line.

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};

use crate::config::{Access, Rule};
use crate::deadlines::Deadline;
use crate::event;
use crate::fd_waiters;
use crate::metrics::RuleStats;
use crate::policy::balance::{Attempt, Upstreams};
use crate::policy::slots::RuleSlot;
use crate::policy::sources::{Refusal, SourceLimits, SourceSlot};
use crate::policy::{clock, health, proxy_protocol};
use crate::relay::{describe, reset_on_close, Pair, Progress, Relay, RelayEnd, RelayFuture};

/// Everything a connection of one rule needs, shared by all its connections.
pub struct RuleRuntime {
    pub rule: Rule,
    pub relay: Arc<dyn Relay>,
    /// Process-wide allow/deny, checked before the rule's own lists (a reload
    /// replaces it in place).
    pub global_access: Arc<RwLock<Access>>,
    pub upstreams: Arc<Upstreams>,
    /// Its table is shared with the runtimes the rule had before a reload.
    pub sources: Arc<SourceLimits>,
    /// This rule's metrics and its `refused` line's running count, shared with the
    /// runtimes it had before a reload.
    pub stats: Arc<RuleStats>,
    /// Fired when the shutdown grace period is over: drop the pair now.
    pub abort: Arc<Abort>,
}

impl RuleRuntime {
    /// `before`: the upstreams of the runtime this one replaces on a reload, whose
    /// health it shares.
    pub fn new(
        rule: Rule,
        relay: Arc<dyn Relay>,
        sources: Arc<SourceLimits>,
        global_access: Arc<RwLock<Access>>,
        abort: Arc<Abort>,
        before: Option<&Upstreams>,
    ) -> Self {
        // Set before any accept: a pair's start is kept relative to it.
        crate::relay::epoch();
        let upstreams = Upstreams::new(&rule, before);
        let stats = crate::metrics::global().rule(&rule.name);
        stats.serve_upstreams(&upstreams);
        RuleRuntime {
            upstreams,
            stats,
            sources,
            rule,
            relay,
            global_access,
            abort,
        }
    }
}

/// The end of the shutdown grace period, for every pair at once: a flag for pairs
/// that look after it fired, and a wake-up for those already waiting. (A per-pair
/// `watch` receiver and its wait future cost 160 bytes per idle pair.)
#[derive(Default)]
pub struct Abort {
    fired: AtomicBool,
    notify: Notify,
}

impl Abort {
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// Held for the whole life of a connection; dropping it frees the connection slots.
pub struct Permits {
    pub _global: OwnedSemaphorePermit,
    pub _rule: RuleSlot,
}

/// Dropped as a connection ends, its sockets closed: clients waiting for an fd are
/// not stuck ([`fd_waiters`]).
impl Drop for Permits {
    fn drop(&mut self) {
        fd_waiters::freed();
    }
}

/// Serves one accepted client to its end and logs the close line.
///
/// Written as one `async` block over plain values rather than nested `async fn`s
/// (each of which keeps its own copy of its arguments): this future is held for the
/// pair's whole life, and every byte of it counts per idle pair.
pub fn serve(
    rt: Arc<RuleRuntime>,
    client: TcpStream,
    peer: SocketAddr,
    permits: Permits,
) -> impl Future<Output = ()> + Send + 'static {
    let started = Instant::now();
    // Admission and connect await PROXY headers, DNS, connects and agents: their state
    // lives in its own allocation for those milliseconds only.
    let admitted = Box::pin(admit_and_connect(rt.clone(), client, peer, started));
    async move {
        // `permits` (the connection slots) is held until this block ends.
        let Some(Connected {
            pair,
            peer,
            upstream,
            started,
            _source_slot,
            _active,
        }) = admitted.await
        else {
            return;
        };
        // The pair's progress, which also keeps `started` (not this block's 16 bytes).
        let open = rt.stats.open(started);
        let progress = open.progress();
        progress.touch();
        // (Made in a plain function, not here: `pair` would keep its 72 bytes in
        // this block, which is held per pair.)
        let end = match bounded_relay(&rt, pair, progress).await {
            Ok(end) => {
                if let RelayEnd::Refused { reason, detail } = &end {
                    let shown = if detail.is_empty() {
                        String::new()
                    } else {
                        format!(" ({detail})")
                    };
                    rt.stats.refused(reason);
                    rt.stats
                        .refusals
                        .record(&rt.rule.name, peer, reason, &shown);
                }
                if let RelayEnd::ConnectFailed(_) = &end {
                    rt.stats.connect_error(&upstream);
                }
                end_text(&end)
            }
            Err(why) => Cow::Borrowed(why),
        };
        log_close(
            &rt.rule.name,
            peer,
            &upstream,
            progress.started(),
            progress,
            &end,
        );
        drop(permits);
    }
}

/// A rule's pair handed to its relay, bounded by the rule's limits.
fn bounded_relay<'a>(rt: &'a RuleRuntime, pair: Pair, progress: &'a Arc<Progress>) -> Bounded<'a> {
    // A tunnel stream's data connection changes on resume (its fd may be another
    // socket's by the time of a cut); its relay resets its ends itself.
    let sockets = pair
        .tunnel
        .is_none()
        .then(|| [pair.client.as_raw_fd(), pair.upstream.as_raw_fd()]);
    relay_bounded(
        rt.relay.relay(pair, progress.clone()),
        progress,
        Limits::of(&rt.rule, rt.relay.progress_lag(), progress.started()),
        &rt.abort,
        sockets,
    )
}

/// Runs a pair's relay to its end, unless a limit (`idle_timeout`,
/// `max_connection_duration`) or the end of the shutdown grace period comes first:
/// then the relay is dropped (which closes the pair, see [`Relay`]) and `Err` says
/// why, for the close line. Every pair goes through here: a rule's, and a tunnel
/// agent's target connection (with no limits).
///
/// `sockets`: the pair's two sockets, which the relay owns until it is dropped. A pair
/// cut in the middle of a transfer (bytes wait in a socket's receive or send queue) gets
/// a reset on both ends, not a FIN that would pass a cut stream off as complete: by
/// `max_connection_duration`, the shutdown, or `idle_timeout` when the pair is stalled
/// rather than idle (a reader that stopped reading: nothing moves, bytes wait). A pair
/// with nothing in flight is closed cleanly, as HAProxy's and nginx's timeouts do.
pub fn relay_bounded<'a>(
    relay: RelayFuture<'a>,
    progress: &'a Progress,
    limits: Limits,
    abort: &'a Abort,
    sockets: Option<[RawFd; 2]>,
) -> Bounded<'a> {
    // Set to the limits' next look; `armed` says whether there is one. A limit
    // already reached (max_connection_duration spent in admission and connect) is
    // looked at on the first poll.
    let next = match limits.check(progress) {
        Ok(_) => Some(tokio::time::Instant::now()),
        Err(next) => next,
    };
    Bounded {
        relay,
        armed: next.is_some(),
        timer: Deadline::new(next.unwrap_or_else(far_future).into_std()),
        aborted: abort.notify.notified(),
        enabled: false,
        limits,
        progress,
        abort,
        sockets,
    }
}

pin_project_lite::pin_project! {
    /// [`relay_bounded`]'s future. A struct polled by hand rather than an `async`
    /// block over `select!` or `poll_fn`: a rule's pairs hold it for their whole life,
    /// and those keep a reference to each piece of state besides the state (64 bytes
    /// more per pair, enough to take the connection task to the next 128-byte step of
    /// tokio's task allocation, ~130 B of RSS per idle pair).
    pub struct Bounded<'a> {
        relay: RelayFuture<'a>,
        // The timer fires at the limits' next deadline; only then are they read again
        // (bytes moving do not touch it). Off tokio's wheel: see crate::deadlines.
        timer: Deadline,
        #[pin]
        aborted: tokio::sync::futures::Notified<'a>,
        limits: Limits,
        progress: &'a Progress,
        abort: &'a Abort,
        sockets: Option<[RawFd; 2]>,
        armed: bool,
        // Whether `aborted` is registered yet (on the first poll).
        enabled: bool,
    }
}

impl Future for Bounded<'_> {
    type Output = Result<RelayEnd, &'static str>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let mut me = self.project();
        if !*me.enabled {
            // Registered before the flag is read, so a `fire` in between is not missed.
            me.aborted.as_mut().enable();
            *me.enabled = true;
            // A limit reached before the relay started (max_connection_duration spent
            // in admission and connect): cut before a byte moves. (The timer, set in
            // the past, would fire only at the timer driver's next turn.)
            if *me.armed && me.timer.deadline() <= Instant::now() {
                if let Ok(why) = me.limits.check(me.progress) {
                    return Poll::Ready(Err(cut(*me.sockets, me.progress, why)));
                }
            }
        }
        if let Poll::Ready(end) = me.relay.as_mut().poll(cx) {
            return Poll::Ready(Ok(end));
        }
        while *me.armed && me.timer.poll(cx).is_ready() {
            match me.limits.check(me.progress) {
                Ok(why) => return Poll::Ready(Err(cut(*me.sockets, me.progress, why))),
                Err(at) => {
                    *me.armed = at.is_some();
                    if let Some(at) = at {
                        me.timer.reset(at.into_std());
                    }
                }
            }
        }
        if me.abort.fired.load(Ordering::SeqCst) || me.aborted.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(cut(*me.sockets, me.progress, "shutdown")));
        }
        Poll::Pending
    }
}

/// A pair cut for `why`, while its relay (which owns both sockets) is alive: so each
/// fd is still that socket. See [`relay_bounded`] for which cuts reset: bytes in
/// flight are in a socket's queues, or in our memory (`Progress::holds_bytes`).
fn cut(sockets: Option<[RawFd; 2]>, progress: &Progress, why: &'static str) -> &'static str {
    use crate::relay::ebpf::sys::{inq, outq};
    let in_flight = |fd| !matches!((inq(fd), outq(fd)), (Ok(0), Ok(0)));
    if let Some(fds) = sockets {
        if progress.holds_bytes() || fds.into_iter().any(in_flight) {
            for fd in fds {
                // SAFETY: see above: fd is open and the pair's own.
                // Now, not at close: on the kernel path a psock may still be sending.
                crate::relay::reset_now(&unsafe { BorrowedFd::borrow_raw(fd) });
            }
        }
    }
    why
}

/// A pair ready for the relay, with what must be held until it ends.
struct Connected {
    pair: Pair,
    /// The client as admission saw it (a PROXY header's source when one was read).
    peer: SocketAddr,
    /// Boxed, not a `String`: 8 bytes less in the pair's task.
    upstream: Box<str>,
    /// When the client was accepted.
    started: Instant,
    _source_slot: SourceSlot,
    _active: Option<Attempt>,
}

/// Admission, then the upstream (or an agent's data connection), then any PROXY
/// header to it. `None`: the client was refused or the connect failed (both logged).
async fn admit_and_connect(
    rt: Arc<RuleRuntime>,
    mut client: TcpStream,
    peer: SocketAddr,
    started: Instant,
) -> Option<Connected> {
    let rule = &rt.rule;
    // TCP_NODELAY: inherited from the listener (server::bind).

    // Who the client really is, and what it connected to: the socket's own addresses,
    // or what a front balancer says (`None` = ask the socket, only if needed).
    let (peer, proxied_dst) = if rule.accept_proxy_protocol {
        match proxy_protocol::read(&mut client, rule.proxy_protocol_timeout).await {
            Ok(proxy_protocol::Header::Proxied { src, dst }) => (src, Some(dst)),
            Ok(proxy_protocol::Header::Local) => (peer, None),
            Err(e) => {
                rt.refuse(client, peer, "bad_proxy_header", &format!(" ({e})"));
                return None;
            }
        }
    } else {
        (peer, None)
    };

    let global_ok = rt.global_access.read().unwrap().permits(peer.ip());
    if !global_ok || !rule.access.permits(peer.ip()) {
        rt.refuse(client, peer, "acl", "");
        return None;
    }
    if let Some(schedule) = &rule.schedule {
        if !schedule.is_open(clock::now()) {
            rt.refuse(client, peer, "schedule", "");
            return None;
        }
    }
    let source_slot = match rt.sources.admit(peer.ip(), Instant::now()) {
        Ok(slot) => slot,
        Err(Refusal::TooManyConnections) => {
            rt.refuse(client, peer, "max_connections_per_source", "");
            return None;
        }
        Err(Refusal::RateLimited) => {
            rt.refuse(client, peer, "rate_per_source", "");
            return None;
        }
    };

    if let Some(service) = rule.agent_service() {
        let (pair, upstream) =
            through_agent(&rt, client, peer, proxied_dst, service, started).await?;
        return Some(Connected {
            pair,
            peer,
            upstream: upstream.into_boxed_str(),
            started,
            _source_slot: source_slot,
            _active: None,
        });
    }
    // Only an upstream written without a port needs it (a syscall).
    let port = match rule.upstreams.iter().any(|u| u.same_port) {
        true => client
            .local_addr()
            .map_or(rule.listen[0].port(), |a| a.port()),
        false => 0,
    };
    let (mut upstream, upstream_addr, active) = match connect_upstream(&rt, peer, port).await {
        Dialed::Connected(stream, addr, active) => (stream, addr, active),
        Dialed::Reset(addr, error) => {
            // Passed on as any upstream reset is: the client is reset too.
            reset_on_close(&client);
            let end = upstream_reset_at_connect(error);
            log_close(&rule.name, peer, &addr, started, &Progress::default(), &end);
            return None;
        }
        Dialed::Failed => {
            // Closing without reading: the client sees the connection end at once.
            let progress = Progress::default();
            log_close(
                &rule.name,
                peer,
                "none",
                started,
                &progress,
                "connect_failed",
            );
            return None;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Some(version) = rule.proxy_protocol {
        // Written before the relay starts: on the kernel path nothing we write after
        // the pair is handed over is ordered with the redirected bytes.
        let local = proxied_dst.unwrap_or_else(|| client.local_addr().unwrap_or(rule.listen[0]));
        let header = proxy_protocol::encode(version, peer, local);
        if let Err(e) = upstream.write_all(&header).await {
            let end = format!("upstream_error (writing PROXY header: {e})");
            log_close(
                &rule.name,
                peer,
                &upstream_addr,
                started,
                &Progress::default(),
                &end,
            );
            return None;
        }
    }
    let pair = Pair {
        client,
        upstream,
        tunnel: None,
    };
    Some(Connected {
        pair,
        peer,
        // A boxed string (one allocation): an address-or-name enum is larger, and
        // this lives in the connection task, whose size steps by 128 B (tokio's
        // alignment) on every idle pair.
        upstream: {
            // Room for the longest IPv4 one, "255.255.255.255:65535".
            let mut text = String::with_capacity(21);
            crate::logging::push_addr(&mut text, &upstream_addr);
            text.into_boxed_str()
        },
        started,
        _source_slot: source_slot,
        _active: Some(active),
    })
}

/// A rule whose upstream is `agent:NAME`: a data connection of an agent offering NAME
/// (waiting up to connect_timeout for one), paired with the client for the tunnel
/// relay, and the upstream's name for the close line.
async fn through_agent(
    rt: &Arc<RuleRuntime>,
    client: TcpStream,
    peer: SocketAddr,
    proxied_dst: Option<SocketAddr>,
    service: &str,
    started: Instant,
) -> Option<(Pair, String)> {
    let rule = &rt.rule;
    let upstream = format!("{}{service}", crate::config::AGENT_PREFIX);
    // The agent writes the PROXY header to the target: written here it would be
    // bytes of the data connection the stream does not count.
    let header = rule.proxy_protocol.map(|version| {
        let local = proxied_dst.unwrap_or_else(|| client.local_addr().unwrap_or(rule.listen[0]));
        proxy_protocol::encode(version, peer, local)
    });
    let opened = match crate::tunnel::server::registry() {
        Some(reg) => {
            reg.open(
                service,
                peer,
                rule.balance,
                rule.connect_timeout,
                header.unwrap_or_default(),
            )
            .await
        }
        None => None,
    };
    let Some((data, link)) = opened else {
        rt.stats.connect_error(&upstream);
        // Closed as a client whose upstream refused is (`connect_failed`): nothing was
        // relayed, so there is nothing to pass off as complete.
        drop(client);
        log_close(
            &rule.name,
            peer,
            &upstream,
            started,
            &Progress::default(),
            "no_agent",
        );
        return None;
    };
    let pair = Pair {
        client,
        upstream: data,
        tunnel: Some(link),
    };
    Some((pair, upstream))
}

/// The limits that end a pair: `idle_timeout` once no byte has moved either way for
/// that long (plus the relay's counter lag), `max_connection_duration` once the pair
/// is that old. One timer serves both, set to the earlier of the two moments, so an
/// idle pair wakes once per timeout, not on a tick.
pub struct Limits {
    idle: Option<Duration>,
    max_at: Option<tokio::time::Instant>,
}

impl Limits {
    /// A pair no limit ends (a tunnel agent's: the rule's limits are the server's).
    pub const NONE: Limits = Limits {
        idle: None,
        max_at: None,
    };

    /// `max_connection_duration` counts from the accept, as the close line's
    /// duration does: admission and connect (a PROXY header's wait, failover to the
    /// next upstream) are part of the connection's life.
    fn of(rule: &Rule, lag: Duration, accepted: Instant) -> Limits {
        let accepted = tokio::time::Instant::from_std(accepted);
        Limits {
            idle: rule.idle_timeout.map(|t| t + lag),
            max_at: rule.max_connection_duration.map(|d| accepted + d),
        }
    }

    /// The limit reached now, or when to look again (`None`: never).
    fn check(&self, progress: &Progress) -> Result<&'static str, Option<tokio::time::Instant>> {
        let now = tokio::time::Instant::now();
        if self.max_at.is_some_and(|at| at <= now) {
            return Ok("max_connection_duration");
        }
        let idle_at = match self.idle {
            Some(limit) => {
                let quiet = progress.idle_for();
                if quiet >= limit {
                    return Ok("idle_timeout");
                }
                Some(now + (limit - quiet))
            }
            None => None,
        };
        Err(idle_at.into_iter().chain(self.max_at).min())
    }
}

/// A deadline for a timer that is never polled.
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86400)
}

/// How a relay's end reads in the close line's `end=`.
pub fn end_text(end: &RelayEnd) -> Cow<'static, str> {
    Cow::Owned(match end {
        RelayEnd::Closed => return Cow::Borrowed("closed"),
        RelayEnd::Failed { side, error } => {
            format!(
                "{}_{} ({error})",
                side.as_str(),
                describe(error).replace(' ', "_")
            )
        }
        RelayEnd::Ended(why) => return Cow::Borrowed(why),
        RelayEnd::ConnectFailed(why) => format!("connect_failed ({why})"),
        RelayEnd::Refused { reason, detail } => {
            let shown = if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            };
            format!("refused_{reason}{shown}")
        }
    })
}

/// The `close` line: one per accepted client that got past admission (and, on a
/// tunnel agent, one per target connection, `rule` being the service).
pub fn log_close(
    rule: &str,
    peer: SocketAddr,
    upstream: &(impl std::fmt::Display + ?Sized),
    started: Instant,
    progress: &Progress,
    end: &str,
) {
    let bytes_up = progress.to_upstream.load(Ordering::Relaxed);
    let bytes_down = progress.to_client.load(Ordering::Relaxed);
    let elapsed = started.elapsed();
    let path = progress.path();
    let userspace = progress.via_userspace.load(Ordering::Relaxed);
    if !crate::logging::json() {
        // One line per connection: formatted here and queued for a batched write, not
        // through tracing's formatter, which escapes the message char by char and
        // formats the date anew (with the write, 5% of the relay's CPU per connection).
        // The same text, filtered the same way (FORWARDER_LOG).
        if tracing::enabled!(tracing::Level::INFO) {
            thread_local! {
                static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
            }
            LINE.with_borrow_mut(|line| {
                use crate::logging::{push_addr, push_int, push_padded};
                use std::fmt::Write;
                // By hand rather than one `writeln!`: core::fmt pads and dispatches
                // every integer and address octet, much of the line's cost.
                line.clear();
                crate::logging::write_timestamp(line, std::time::SystemTime::now());
                let ms = (elapsed.as_micros() + 500) / 1000;
                line.push_str("  INFO close rule=");
                line.push_str(rule);
                line.push_str(" client=");
                push_addr(line, &peer);
                let _ = write!(line, " upstream={upstream}");
                line.push_str(" bytes_up=");
                push_int(line, bytes_up);
                line.push_str(" bytes_down=");
                push_int(line, bytes_down);
                line.push_str(" duration=");
                push_int(line, ms / 1000);
                line.push('.');
                push_padded(line, ms % 1000, 3);
                let _ = write!(line, "s path={path}");
                line.push_str(" userspace_bytes=");
                push_int(line, userspace);
                line.push_str(" end=");
                line.push_str(end);
                line.push('\n');
                crate::logging::push_line(line.as_bytes(), false);
            });
        }
        return;
    }
    // JSON: the typed fields, through tracing (the text line is written above). `end`
    // is the kind alone (`client_reset`), what the text line adds in parentheses (the
    // error, or a refusal's detail) goes in `detail`: a consumer compares `end`.
    let duration = elapsed.as_secs_f64();
    // Milliseconds are what the text line shows; JSON gets the same number.
    let duration_s = (duration * 1000.0).round() / 1000.0;
    let (kind, detail) = match end.split_once(" (") {
        Some((kind, detail)) => (kind, Some(detail.strip_suffix(')').unwrap_or(detail))),
        None => (end, None),
    };
    // A `None` field is not recorded: a clean close has no `detail`.
    tracing::info!(
        rule = %rule,
        client = %peer,
        upstream = %upstream,
        bytes_up,
        bytes_down,
        duration_s,
        path = %path,
        userspace_bytes = userspace,
        end = %kind,
        detail = detail.map(tracing::field::display),
        "close"
    );
}

impl RuleRuntime {
    /// Closes a client we will not serve at once (a reset, so nothing lingers), counts
    /// it, and logs it at most once a second per rule.
    /// `reason` is one of [`crate::metrics::REFUSAL_REASONS`]; `detail` follows it
    /// in the text line.
    fn refuse(&self, client: TcpStream, peer: SocketAddr, reason: &str, detail: &str) {
        self.stats.refused(reason);
        reset_on_close(&client);
        drop(client);
        self.stats
            .refusals
            .record(&self.rule.name, peer, reason, detail);
    }
}

/// The `refused` line's running count and its once-a-second limit, per rule name
/// (kept in [`crate::metrics::RuleStats`], so a reload that changes the rule neither
/// restarts the count the line shows nor logs again within the second).
#[derive(Debug, Default)]
pub struct RefusalLog {
    pub total: AtomicU64,
    last: Mutex<Option<(Instant, u64)>>,
}

impl RefusalLog {
    pub fn record(&self, rule: &str, peer: SocketAddr, reason: &str, detail: &str) {
        let total = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last.lock().unwrap();
        let logged_at = last.map_or(0, |(_, n)| n);
        if last.is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(1)) {
            let suppressed = total - logged_at - 1;
            event!(
                info,
                "refused",
                text = ("refused rule={rule} client={peer} reason={reason}{detail} total_refused={total} (+{suppressed} not logged)"),
                rule = %rule,
                client = %peer,
                reason = %reason,
                detail = %detail.trim().trim_start_matches('(').trim_end_matches(')'),
                total_refused = total,
                not_logged = suppressed,
            );
            *last = Some((Instant::now(), total));
        }
    }
}

/// How often a connect that failed for want of our own fds or memory is tried again.
const LOCAL_RETRY: Duration = Duration::from_millis(50);

/// Tries the upstreams in the balancer's order (each resolved address in turn), with
/// connect_timeout per attempt. Names are resolved here, per connection, so DNS
/// changes are followed. Failures feed passive health detection.
///
/// Out of fds or memory is ours, not the upstreams': the client waits for some to come
/// back (as accepting does, README "fd exhaustion"), up to connect_timeout, and no
/// upstream is charged a connect error. Before (audit), every upstream was "tried" at
/// once, each counted a failed connect, and the client was dropped. Waiting clients
/// hold fds themselves: when they hold all there are, the newest gives its up
/// ([`fd_waiters`]).
/// `port`: the one the client connected to, for upstreams written without one.
async fn connect_upstream(rt: &Arc<RuleRuntime>, peer: SocketAddr, port: u16) -> Dialed {
    let until = tokio::time::Instant::now() + rt.rule.connect_timeout;
    let mut waiter = None;
    loop {
        let OutOfResources { upstream, why } = match dial_in_order(rt, peer, port).await {
            Ok(dialed) => return dialed,
            Err(e) => e,
        };
        let waiter = waiter.get_or_insert_with(fd_waiters::Waiter::join);
        let gave_up = if let Some(n) = waiter.should_yield() {
            format!(
                "no fd came free for {:?} while {n} clients waited for one; the newest half gave theirs up",
                fd_waiters::STUCK
            )
        } else if tokio::time::Instant::now() + LOCAL_RETRY < until {
            tokio::time::sleep(LOCAL_RETRY).await;
            continue;
        } else {
            "tried for connect_timeout".to_string()
        };
        let why = format!("{why} (ours, not the upstream's: {gave_up})");
        say_connect_failed(&rt.rule.name, peer, &upstream, &why);
        return Dialed::Failed;
    }
}

/// Connects to `HOST:PORT` (the first of a name's addresses that answers). A literal
/// address skips tokio's resolver, which runs on the blocking pool: a thread hop per
/// connection, a large share of a short one.
pub async fn connect_addr(addr: &str) -> io::Result<TcpStream> {
    match crate::config::literal_addr(addr) {
        Some(a) => TcpStream::connect(a?).await,
        None => TcpStream::connect(addr).await,
    }
}

/// Connects to `addr`, from the local address `from` when given.
async fn connect_from(addr: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = from else {
        return TcpStream::connect(addr).await;
    };
    if ip.is_ipv4() != addr.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("connect_from {ip} cannot reach an address of another family"),
        ));
    }
    let sock =
        socket_from(ip).map_err(|e| io::Error::new(e.kind(), format!("connect_from {ip}: {e}")))?;
    sock.connect(addr).await
}

/// A TCP socket bound to `ip`, its port left to the connect, per destination
/// (IP_BIND_ADDRESS_NO_PORT): a bind to port 0 alone takes a port from the local range
/// for good, and the range would run out after some 28k upstream connections whatever
/// their destinations. Needs no runtime until it connects.
pub fn socket_from(ip: IpAddr) -> io::Result<tokio::net::TcpSocket> {
    let sock = if ip.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::IpBindAddressNoPort, &true)?;
    sock.bind(SocketAddr::new(ip, 0))?;
    Ok(sock)
}

/// [`connect_one`], waiting out a shortage of our own fds or memory as a rule's client
/// does (tried every 50 ms, up to `timeout` in all): a tunnel agent's target.
pub async fn connect_one_patiently(
    upstream: &str,
    timeout: Duration,
    from: Option<IpAddr>,
) -> Result<Answered, ConnectError> {
    let until = tokio::time::Instant::now() + timeout;
    loop {
        match connect_one(upstream, timeout, from).await {
            Err(e) if e.local && tokio::time::Instant::now() + LOCAL_RETRY < until => {
                tokio::time::sleep(LOCAL_RETRY).await
            }
            r => return r,
        }
    }
}

/// A connect of [`dial_in_order`] failed for want of our own fds or memory.
struct OutOfResources {
    upstream: String,
    why: String,
}

/// One pass of [`connect_upstream`] over the upstreams.
async fn dial_in_order(
    rt: &Arc<RuleRuntime>,
    peer: SocketAddr,
    port: u16,
) -> Result<Dialed, OutOfResources> {
    let rule = &rt.rule;
    let ups = &rt.upstreams;
    let mut full = 0;
    for i in ups.order(peer.ip()) {
        // At its max_connections: passed over, neither tried nor counted as failed.
        let Some(mut attempt) = ups.try_attempt(i) else {
            full += 1;
            continue;
        };
        // As configured (metrics, health), and as dialed (logs).
        let upstream = &ups.list[i].cfg.addr;
        let dialed = ups.list[i].cfg.dial_addr(port);
        let result = match connect_one(&dialed, rule.connect_timeout, rule.connect_from).await {
            Err(ConnectError {
                reset: Some((addr, error)),
                ..
            }) => {
                // The connect succeeded (the upstream is there): no failed connect,
                // and no other upstream is tried, as for a reset right after it.
                let _ = ups.report_connect(i, &mut attempt, true);
                return Ok(Dialed::Reset(addr, error));
            }
            other => other,
        };
        // Out of fds or memory here says nothing about the upstream (nor would the next
        // one fare better): neither its health nor its counters hear of it.
        if let Err(e) = &result {
            if e.local {
                return Err(OutOfResources {
                    upstream: dialed.into_owned(),
                    why: e.why.clone(),
                });
            }
            rt.stats.connect_error(upstream);
        }
        let why = result
            .as_ref()
            .err()
            .map(|e| e.why.clone())
            .unwrap_or_default();
        if let Some(up) = ups.report_connect(i, &mut attempt, result.is_ok()) {
            health::log_transition(&rule.name, upstream, up, "traffic", &why);
        }
        match result {
            Ok((stream, addr, failed)) => {
                say_failed_addresses(&rule.name, peer, &dialed, &failed);
                if let Some(idle) = rule.tcp_keepalive {
                    // The pair works without it; the log says it will not notice a
                    // dead upstream this way.
                    if let Err(e) = crate::server::set_keepalive((&stream).into(), Some(idle)) {
                        tracing::warn!(
                            "tcp_keepalive on rule={} upstream={addr} failed: {e}",
                            rule.name
                        );
                    }
                }
                return Ok(Dialed::Connected(stream, addr, attempt));
            }
            Err(e) => say_connect_failed(&rule.name, peer, &dialed, &e.why),
        }
    }
    if full > 0 {
        let why = format!("{full} upstream(s) at their max_connections");
        say_connect_failed(&rule.name, peer, &rule.upstream_list(), &why);
    }
    Ok(Dialed::Failed)
}

/// The `connect failed` warning: every address of `upstream` failed.
fn say_connect_failed(rule: &str, peer: SocketAddr, upstream: &str, why: &str) {
    event!(
        warn,
        "connect failed",
        text = ("connect rule={rule} client={peer} upstream={upstream} failed: {why}"),
        rule = %rule,
        client = %peer,
        upstream = %upstream,
        error = %why,
    );
}

/// A connect error that means the upstream accepted and at once reset the connection,
/// before we saw the connect complete: a pair the upstream reset, not a failed connect
/// (a reset a moment later reaches the relay instead). A rule's upstream and a tunnel
/// agent's target alike.
pub fn reset_at_connect(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionReset
}

/// The close line's `end=` for [`reset_at_connect`]: as any upstream reset reads.
pub fn upstream_reset_at_connect(error: io::Error) -> Cow<'static, str> {
    end_text(&RelayEnd::Failed {
        side: crate::relay::Side::Upstream,
        error,
    })
}

/// How [`connect_upstream`] ended.
enum Dialed {
    Connected(TcpStream, SocketAddr, Attempt),
    /// The upstream accepted and reset the connection at once (see [`ConnectError`]).
    Reset(SocketAddr, io::Error),
    /// Every upstream failed (each failure logged).
    Failed,
}

pub struct ConnectError {
    pub why: String,
    /// The failure is ours (EMFILE, ENOMEM, ...), not the upstream's.
    pub local: bool,
    /// The upstream accepted and then reset the connection before we saw the connect
    /// complete: not a failed connect but a pair its upstream reset, as when the reset
    /// comes a moment later (then the relay reports it).
    pub reset: Option<(SocketAddr, io::Error)>,
}

/// A name's other addresses that failed before one answered: said, since the client
/// waited for them (connect_timeout each), though the upstream answered. A rule's
/// upstream and a tunnel agent's target alike.
pub fn say_failed_addresses(rule: &str, peer: SocketAddr, upstream: &str, failed: &[String]) {
    for error in failed {
        event!(
            warn,
            "upstream address failed",
            text = ("connect rule={rule} client={peer} upstream={upstream} address failed: {error}; the next one answered"),
            rule = %rule,
            client = %peer,
            upstream = %upstream,
            error = %error,
        );
    }
}

/// Whether this process holds all but a few of the fds it may open (or cannot even
/// open /proc/self/fd to count them). Only read after a failed name lookup.
fn fds_nearly_exhausted() -> bool {
    let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    else {
        return false;
    };
    match std::fs::read_dir("/proc/self/fd") {
        // The resolver opens a few (the hosts file, resolv.conf, a socket).
        Ok(open) => open.count() as u64 + 8 >= soft,
        Err(e) => crate::server::is_resource_exhaustion(&e),
    }
}

/// A connect that worked, and what failed on the way: addresses of the name tried
/// before the one that answered (`ADDR: error` each).
pub type Answered = (TcpStream, SocketAddr, Vec<String>);

/// Connects to `upstream` (an address, or a name: each of its addresses in turn,
/// `timeout` each).
/// From `from` when given (`connect_from`).
pub async fn connect_one(
    upstream: &str,
    timeout: Duration,
    from: Option<IpAddr>,
) -> Result<Answered, ConnectError> {
    let remote = |why: String| ConnectError {
        why,
        local: false,
        reset: None,
    };
    // Out of fds or memory, which a client waits out (an interface name's lookup and
    // the resolver open fds too).
    let ours = |e: io::Error| ConnectError {
        why: e.to_string(),
        local: true,
        reset: None,
    };
    // A literal address needs no resolver: tokio's runs on the blocking pool, a
    // thread hop per connection that costs connection rate.
    let addrs = match crate::config::literal_addr(upstream) {
        Some(Ok(addr)) => vec![addr],
        Some(Err(e)) if crate::server::is_resource_exhaustion(&e) => return Err(ours(e)),
        Some(Err(e)) => return Err(remote(e.to_string())),
        None => match tokio::time::timeout(timeout, tokio::net::lookup_host(upstream)).await {
            Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
            // getaddrinfo's EAI_SYSTEM with EMFILE: ours, not the name's fault.
            Ok(Err(e)) if crate::server::is_resource_exhaustion(&e) => return Err(ours(e)),
            // glibc can say "Name or service not known" when it could not open
            // /etc/hosts or a socket for want of fds (seen in CI, out of fds as pairs
            // closed): with the process at its fd limit, the failure is ours too.
            Ok(Err(e)) if fds_nearly_exhausted() => return Err(ours(e)),
            Ok(Err(e)) => return Err(remote(format!("cannot resolve: {e}"))),
            Err(_) => return Err(remote("resolve timed out".into())),
        },
    };
    let mut errors = Vec::new();
    let mut local = true;
    for addr in addrs {
        match tokio::time::timeout(timeout, connect_from(addr, from)).await {
            Ok(Ok(stream)) => return Ok((stream, addr, errors)),
            Ok(Err(e)) if reset_at_connect(&e) => {
                return Err(ConnectError {
                    why: format!("{addr}: {e}"),
                    local: false,
                    reset: Some((addr, e)),
                })
            }
            Ok(Err(e)) => {
                local &= crate::server::is_resource_exhaustion(&e);
                errors.push(format!("{addr}: {e}"));
            }
            Err(_) => {
                local = false;
                errors.push(format!("{addr}: timed out after {timeout:?}"));
            }
        }
    }
    Err(ConnectError {
        why: errors.join("; "),
        local: local && !errors.is_empty(),
        reset: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::policy::slots::RuleSlots;
    use crate::relay::splice::SpliceRelay;

    /// A rule's pair lives in its tokio task for its whole life, and tokio allocates a
    /// task in 128-byte steps: its header, scheduler and id, and trailer take 96 bytes,
    /// so a `serve` future over 416 bytes makes every pair's task 640 bytes instead of
    /// 512, 128 B more RSS per idle pair (issue 8's budget is 2 KiB a pair). It crept
    /// over once, field by field, unseen until the bench's idle phase.
    #[tokio::test]
    async fn a_pairs_task_stays_within_512_bytes() {
        let toml = "[[rule]]\nname = \"t\"\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1:9\"\n";
        let rule = Config::from_toml(toml).unwrap().rules.remove(0);
        let rt = Arc::new(RuleRuntime::new(
            rule,
            Arc::new(SpliceRelay::default()),
            SourceLimits::new(None, None),
            Arc::new(RwLock::new(Access::default())),
            Arc::new(Abort::default()),
            None,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, peer) = listener.accept().await.unwrap();
        let permits = Permits {
            _global: Arc::new(tokio::sync::Semaphore::new(1))
                .acquire_owned()
                .await
                .unwrap(),
            _rule: RuleSlots::new(1).acquire().await.unwrap(),
        };
        let pair = serve(rt, accepted, peer, permits);
        let size = std::mem::size_of_val(&pair);
        assert!(
            size <= 416,
            "serve's future is {size} bytes: over 416, a pair's task takes 640 bytes, not 512"
        );
    }
}
