//! Listeners, connection limits, signals: reload in place on SIGHUP, graceful
//! shutdown on SIGTERM/SIGINT.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Access, Config, Mode, Rule, RunAs};
use crate::connection::{serve, Abort, Permits, RuleRuntime};
use crate::fd_waiters;
use crate::inspect::InspectRelay;
use crate::logging::List;
use crate::policy::balance::Upstreams;
use crate::policy::health;
use crate::policy::slots::RuleSlots;
use crate::policy::sources::SourceLimits;
use crate::relay::copy::CopyRelay;
use crate::relay::ebpf::EbpfRelay;
use crate::relay::splice::SpliceRelay;
use crate::relay::Relay;
use crate::{event, metrics, systemd};

/// Where the running config came from, so SIGHUP can read it again.
pub struct ConfigSource {
    pub path: PathBuf,
    /// `--mode`, applied to every reloaded config as to the first.
    pub mode: Option<Mode>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let mut config = Config::from_file(&self.path)?;
        if let Some(mode) = self.mode {
            config.override_mode(mode)?;
        }
        Ok(config)
    }
}

/// What `main` prepares before the runtime starts (and before privileges drop).
pub struct Startup {
    pub config: Config,
    /// `None` when the rules came from `--listen/--upstream`.
    pub source: Option<ConfigSource>,
    /// Each rule's, one per listen address, in the config's order.
    pub listeners: Vec<Vec<std::net::TcpListener>>,
    pub metrics: Option<std::net::TcpListener>,
    /// `[tunnel_server] listen`, bound.
    pub tunnel: Option<std::net::TcpListener>,
}

/// Binds the tunnel server's agent port.
pub fn bind_tunnel(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    bind(addr).with_context(|| format!("cannot listen on {addr} (tunnel_server.listen)"))
}

/// Binds every rule's listeners: a bad address fails the whole start (or reload).
/// `file`: the config file the rules came from, whose key and line a failure names.
pub fn bind_all(
    rules: &[Rule],
    file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Vec<std::net::TcpListener>>> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| bind_rule(rule, i, file))
        .collect()
}

/// Binds rule `i`'s listeners.
fn bind_rule(
    rule: &Rule,
    i: usize,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    can_connect_from(rule, i, file)?;
    rule.listen
        .iter()
        .map(|&addr| bind_listen(rule, i, addr, file))
        .collect()
}

/// Binds one of rule `i`'s addresses; a failure names the rule, and with `file` the
/// key and line, as a config error would (`check` binds nothing, so it cannot say).
fn bind_listen(
    rule: &Rule,
    i: usize,
    addr: SocketAddr,
    file: Option<&std::path::Path>,
) -> anyhow::Result<std::net::TcpListener> {
    bind(addr).with_context(|| {
        let at = key_in_file(file, &format!("rule[{i}].listen"));
        format!("cannot listen on {addr} (rule {:?}{at})", rule.name)
    })
}

/// Whether rule `i`'s `connect_from` is an address of this host: found at start (or
/// reload), like a listen address, not as every upstream going DOWN.
fn can_connect_from(rule: &Rule, i: usize, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    match rule.connect_from {
        Some(ip) => source_is_ours(ip, file, &format!("rule[{i}].connect_from"), || {
            format!("rule {:?}", rule.name)
        }),
        None => Ok(()),
    }
}

/// The same for each `[[service]]` of an agent, at start.
pub fn can_connect_from_services(
    agent: &crate::config::AgentConfig,
    file: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    for (i, service) in agent.services.iter().enumerate() {
        if let Some(ip) = service.connect_from {
            let key = format!("service[{i}].connect_from");
            source_is_ours(ip, file, &key, || format!("service {:?}", service.name))?;
        }
    }
    Ok(())
}

/// Whether a socket can be bound to `ip` here; the error names `whose` `key`.
fn source_is_ours(
    ip: IpAddr,
    file: Option<&std::path::Path>,
    key: &str,
    whose: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    crate::connection::socket_from(ip)
        .map(drop)
        .with_context(|| {
            format!(
                "cannot connect from {ip} ({}{})",
                whose(),
                key_in_file(file, key)
            )
        })
}

/// `, key `KEY`, line N` for an error about `key` of `file` (nothing without a file).
fn key_in_file(file: Option<&std::path::Path>, key: &str) -> String {
    let Some(path) = file else {
        return String::new();
    };
    match crate::config::line_in_file(path, key) {
        Some(line) => format!(", key `{key}`, line {line}"),
        None => format!(", key `{key}`"),
    }
}

/// One rule being served.
struct Running {
    rule: Rule,
    /// One per address of `rule.listen`, in its order.
    listeners: Vec<Arc<TcpListener>>,
    /// Tells the accept loops to stop (between accepts, so no accepted client is lost).
    stop: watch::Sender<bool>,
    /// One per listener.
    accept: Vec<JoinHandle<()>>,
    health: Option<JoinHandle<()>>,
    /// The rule's limits, handed on by name (like its `RuleStats`) to the runtime that
    /// replaces this one on a reload: the connections open now keep counting.
    slots: Arc<RuleSlots>,
    sources: Arc<SourceLimits>,
    /// Its upstreams' health, carried on by the runtime that replaces this one.
    upstreams: Arc<Upstreams>,
}

impl Running {
    /// Asks the accept loops to stop (each ends on its own; a listening socket closes
    /// when no other rule uses it) and ends the health checks.
    fn stop(self) -> Vec<JoinHandle<()>> {
        let _ = self.stop.send(true);
        if let Some(h) = &self.health {
            h.abort();
        }
        self.accept
    }
}

struct Server {
    config: Config,
    rules: Vec<Running>,
    global: Arc<Semaphore>,
    /// Global allow/deny, shared by every rule and replaced in place on reload.
    access: Arc<RwLock<Access>>,
    abort: Arc<Abort>,
}

/// Runs until a signal and the drain that follows it. Errors are startup failures.
pub async fn run(startup: Startup) -> anyhow::Result<()> {
    let Startup {
        config,
        source,
        listeners,
        metrics: metrics_listener,
        tunnel,
    } = startup;
    crate::logging::start_flusher();
    tokio::spawn(crate::relay::splice::trim_pool_forever());
    // Before anything is announced: a SIGHUP sent as soon as a listening line (or
    // READY=1) appears must find its handler, not the default action (exit).
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    // Held since before the listeners were bound (see `hold_handled_signals`).
    crate::sys::release_handled_signals();
    if let Some(l) = metrics_listener {
        tokio::spawn(metrics::serve(l, metrics::global().clone()));
    }
    let abort = Arc::new(Abort::default());
    let mut server = Server {
        global: Arc::new(Semaphore::new(config.max_connections)),
        access: Arc::new(RwLock::new(config.access.clone())),
        rules: Vec::new(),
        config: config.clone(),
        abort: abort.clone(),
    };
    if let (Some(cfg), Some(l)) = (&config.tunnel_server, tunnel) {
        let services = crate::tunnel::server::services_of(&config.rules);
        crate::tunnel::server::start(cfg.clone(), TcpListener::from_std(l)?, services);
    }
    // Connection slots: the rules' pairs hold `global`'s. In one process holding both
    // sections, a tunnelled visitor holds one of those and its target connection would
    // need another: visitors could take every slot while their targets wait for one.
    // So there the agent's target connections have `max_connections` of their own.
    let mut slot_pools = vec![server.global.clone()];
    let agent = config.agent.as_ref().map(|a| {
        let slots = match config.tunnel_server {
            Some(_) => {
                let own = Arc::new(Semaphore::new(config.max_connections));
                slot_pools.push(own.clone());
                own
            }
            None => server.global.clone(),
        };
        crate::tunnel::agent::start(a.clone(), slots, abort.clone())
    });
    for (rule, listeners) in config.rules.iter().zip(listeners) {
        let listeners = listeners
            .into_iter()
            .map(|l| TcpListener::from_std(l).map(Arc::new))
            .collect::<io::Result<_>>()?;
        let running = server.start(rule, listeners).await?;
        server.rules.push(running);
    }
    systemd::ready();
    systemd::spawn_watchdog();

    // Reloads run one at a time in this loop; SIGHUPs that arrive meanwhile collapse
    // into one pending signal, so a burst causes one reload running and one queued.
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => match &source {
                Some(source) => server.reload(source).await,
                None if server.config.rules.is_empty() => tracing::warn!(
                    "reload: nothing to reload, the agent came from the command line (no -c FILE)"
                ),
                None => tracing::warn!(
                    "reload: nothing to reload, the rules came from --listen/--upstream (no -c FILE)"
                ),
            },
        }
    }
    systemd::stopping();
    let config = server.config.clone();
    server.stop_accepting().await;
    if let Some(agent) = &agent {
        agent.stop_accepting().await;
    }
    let max = config.max_connections;
    let in_use = || -> usize { slot_pools.iter().map(|p| max - p.available_permits()).sum() };
    // Every connection holds a slot until it is fully closed.
    let all_closed = || async {
        for pool in &slot_pools {
            let _all = pool.acquire_many(max as u32).await;
        }
    };
    let active = in_use();
    tracing::info!(
        "shutdown: stopped accepting, draining {active} connection(s) for up to {:?}",
        config.shutdown_grace
    );
    let deadline = Instant::now() + config.shutdown_grace;
    // Cuts what is still open (a reset where bytes are in flight: not left to the
    // process's exit, whose close sends a FIN wherever nothing is unread, so a cut
    // upload would read as complete), then lets the cut pairs log their close lines
    // and give their permits back, for at most `wait`.
    let cut_open = |wait: Duration| {
        let abort = &abort;
        async move {
            abort.fire();
            let _ = tokio::time::timeout(wait, all_closed()).await;
        }
    };
    let drained = all_closed();
    let now = tokio::select! {
        _ = drained => {
            tracing::info!("shutdown: all connections closed");
            false
        }
        _ = tokio::time::sleep_until(deadline.into()) => {
            let left = in_use();
            tracing::info!("shutdown: grace period over, closing {left} connection(s)");
            cut_open(Duration::from_secs(1)).await;
            false
        }
        _ = term.recv() => true,
        _ = int.recv() => true,
    };
    if now {
        tracing::info!("shutdown: second signal, exiting now");
        // As at the grace's end, but briefly.
        cut_open(Duration::from_millis(500)).await;
    } else if let Some(agent) = agent {
        // The server hears of the streams reset here before the link closes.
        agent.finish().await;
    }
    Ok(())
}

/// What a reload will do with each rule of the new config.
enum Plan {
    Keep,
    /// New settings; per listen address, the running listener (rule, index) that
    /// already has it, if any.
    Start(Vec<Option<(usize, usize)>>),
}

impl Server {
    /// Starts serving `rule` on `listeners` (one per listen address), logging a
    /// `listening` line for each.
    async fn start(
        &self,
        rule: &Rule,
        listeners: Vec<Arc<TcpListener>>,
    ) -> anyhow::Result<Running> {
        let (relay, why) = choose_relay(rule).await?;
        for listener in &listeners {
            // On the listener, for the clients it accepts from now on (a reload that
            // turns it off or changes it leaves open connections as they were).
            set_keepalive(socket2::SockRef::from(&**listener), rule.tcp_keepalive).with_context(
                || {
                    format!(
                        "cannot set tcp_keepalive on rule {:?}'s listener",
                        rule.name
                    )
                },
            )?;
        }
        for listener in &listeners {
            let local = listener.local_addr()?;
            event!(
                info,
                "listening",
                text = (
                    "listening rule={} listen={} upstream={} mode={} ({})",
                    rule.name,
                    local,
                    rule.upstream_list(),
                    relay.path(),
                    why
                ),
                rule = %rule.name,
                listen = %local,
                upstream = %rule.upstream_list(),
                mode = relay.path(),
                detail = %why,
            );
        }
        // A changed rule keeps the limits of the one it replaces (resized in `apply`
        // once the reload cannot fail any more); a new rule starts with its own.
        let old = self.rules.iter().find(|r| r.rule.name == rule.name);
        let (slots, sources) = match old {
            Some(old) => (
                old.slots.clone(),
                old.sources
                    .carried(rule.max_connections_per_source, rule.rate_per_source),
            ),
            None => (
                RuleSlots::new(rule.max_connections),
                SourceLimits::new(rule.max_connections_per_source, rule.rate_per_source),
            ),
        };
        let rt = Arc::new(RuleRuntime::new(
            rule.clone(),
            relay,
            sources.clone(),
            self.access.clone(),
            self.abort.clone(),
            old.map(|o| &*o.upstreams),
        ));
        let health = rule
            .check_interval
            .is_some()
            .then(|| tokio::spawn(health::run(rule.clone(), rt.upstreams.clone())));
        let rt_upstreams = rt.upstreams.clone();
        let (stop, stop_rx) = watch::channel(false);
        let accept = listeners
            .iter()
            .map(|listener| {
                tokio::spawn(accept_loop(
                    listener.clone(),
                    rt.clone(),
                    self.global.clone(),
                    slots.clone(),
                    stop_rx.clone(),
                ))
            })
            .collect();
        Ok(Running {
            rule: rule.clone(),
            listeners,
            stop,
            accept,
            health,
            slots,
            sources,
            upstreams: rt_upstreams,
        })
    }

    /// Re-reads the config file and applies it in place, or changes nothing.
    async fn reload(&mut self, source: &ConfigSource) {
        systemd::reloading();
        let result = self.apply(source).await;
        metrics::global().reloaded(result.is_ok());
        if let Err(e) = result {
            event!(
                error,
                "reload failed",
                text = ("reload failed: {e:#}; the running config is unchanged"),
                error = %format!("{e:#}"),
            );
        }
        systemd::ready();
    }

    async fn apply(&mut self, source: &ConfigSource) -> anyhow::Result<()> {
        let mut new = source.load()?;
        new.check_dump_dirs()?;
        // Said only once the reload is applied: a file that fails keeps nothing.
        let kept_globals = self.keep_fixed_globals(&mut new);
        // `[tunnel_server]` keeps its running value: `check`'s rule again, against it.
        crate::config::check_agent_rules(&new.rules, new.tunnel_server.as_ref())?;

        // Decide everything, and bind every new address, before touching anything:
        // a reload that cannot be completed must change nothing.
        let mut plans = Vec::with_capacity(new.rules.len());
        let mut claimed = HashSet::new();
        for rule in &new.rules {
            let old = self.rules.iter().position(|r| r.rule.name == rule.name);
            let plan = match old {
                Some(i) if self.rules[i].rule.same_settings(rule) => Plan::Keep,
                // The same address keeps its socket: its own rule's first, else that
                // of a rule going away (a fixed port; port 0 means "a new one").
                _ => Plan::Start(
                    rule.listen
                        .iter()
                        .map(|want| {
                            let own = old.and_then(|i| {
                                let at = self.rules[i].rule.listen.iter().position(|a| a == want);
                                at.map(|k| (i, k))
                            });
                            own.or_else(|| {
                                self.rules.iter().enumerate().find_map(|(i, r)| {
                                    let going = !new
                                        .rules
                                        .iter()
                                        .any(|n| n.name == r.rule.name && n.same_settings(&r.rule));
                                    let at = r.rule.listen.iter().position(|a| a == want);
                                    at.filter(|_| want.port() != 0 && going).map(|k| (i, k))
                                })
                            })
                            .filter(|at| claimed.insert(*at))
                        })
                        .collect(),
                ),
            };
            plans.push(plan);
        }
        let mut fresh = Vec::new();
        for (i, (rule, plan)) in new.rules.iter().zip(&plans).enumerate() {
            let Plan::Start(reuse) = plan else { continue };
            can_connect_from(rule, i, Some(&source.path))?;
            for (&addr, reused) in rule.listen.iter().zip(reuse) {
                if reused.is_none() {
                    let bound = bind_listen(rule, i, addr, Some(&source.path))
                        .map_err(|e| self.own_conflict(addr, e))?;
                    fresh.push(Arc::new(TcpListener::from_std(bound)?));
                }
            }
        }

        // Start the new and changed rules (their accept loops run alongside the old
        // ones for a moment: a client may be accepted by either, none is refused).
        let mut fresh = fresh.into_iter();
        let mut started = Vec::new();
        let (mut added, mut changed) = (Vec::new(), Vec::new());
        for (rule, plan) in new.rules.iter().zip(&plans) {
            let Plan::Start(reuse) = plan else {
                continue;
            };
            let listeners = reuse
                .iter()
                .map(|at| match at {
                    Some((i, k)) => self.rules[*i].listeners[*k].clone(),
                    None => fresh.next().expect("bound above"),
                })
                .collect();
            match self.start(rule, listeners).await {
                Ok(r) => started.push(r),
                Err(e) => {
                    for r in started {
                        drop(r.stop());
                    }
                    return Err(e);
                }
            }
            if self.rules.iter().any(|r| r.rule.name == rule.name) {
                changed.push(rule.name.clone());
            } else {
                added.push(rule.name.clone());
            }
        }
        // Nothing can fail from here on: a changed max_connections now applies to the
        // slots the rule's old and new loops share, the open connections included.
        for r in &started {
            r.slots.resize(r.rule.max_connections);
        }

        // Then retire what the new config no longer runs as it was.
        let mut kept = Vec::new();
        let mut removed = Vec::new();
        let mut stopping = Vec::new();
        for running in std::mem::take(&mut self.rules) {
            let still = new.rules.iter().find(|r| r.name == running.rule.name);
            match still {
                Some(r) if r.same_settings(&running.rule) => kept.push(running),
                Some(_) => stopping.extend(running.stop()),
                None => {
                    removed.push(running.rule.name.clone());
                    stopping.extend(running.stop());
                }
            }
        }
        // A retired loop ends at its next await; once it has, a listener no rule uses
        // any more is closed, so the reload line means "refused from now on". (One
        // waiting for a global slot with a client in hand is let go after 1 s: it
        // serves that client with the old settings.)
        for mut accept in stopping {
            if tokio::time::timeout(Duration::from_secs(1), &mut accept)
                .await
                .is_err()
            {
                tracing::debug!("reload: an old accept loop is still waiting for a slot");
            }
        }
        for key in &kept_globals {
            event!(
                warn,
                "reload: kept running value",
                text = ("reload: {key} cannot change while running; keeping the running value (restart to apply)"),
                key = %key,
            );
        }
        // `[global]` keys that apply in place: said, since no rule's line shows them.
        for (key, differs, applies) in [
            (
                "allow",
                self.config.access.allow != new.access.allow,
                "every rule's new connections",
            ),
            (
                "deny",
                self.config.access.deny != new.access.deny,
                "every rule's new connections",
            ),
            (
                "shutdown_grace",
                self.config.shutdown_grace != new.shutdown_grace,
                "the next shutdown",
            ),
        ] {
            if differs {
                event!(
                    info,
                    "reload: applied in place",
                    text = ("reload: global.{key} changed; applies to {applies}"),
                    key = %format!("global.{key}"),
                    applies = %applies,
                );
            }
        }
        let unchanged = kept.len();
        kept.extend(started);
        // In the new config's order, for the next reload's bookkeeping.
        kept.sort_by_key(|r| new.rules.iter().position(|n| n.name == r.rule.name));
        self.rules = kept;
        *self.access.write().unwrap() = new.access.clone();
        if let Some(reg) = crate::tunnel::server::registry() {
            reg.set_known(crate::tunnel::server::services_of(&new.rules));
        }
        self.config = new;

        event!(
            info,
            "reload ok",
            text = (
                "reload ok: added={} removed={} changed={} unchanged={unchanged}",
                List(&added),
                List(&removed),
                List(&changed)
            ),
            added = %List(&added),
            removed = %List(&removed),
            changed = %List(&changed),
            unchanged = unchanged as u64,
        );
        Ok(())
    }

    /// `[global]` keys that only take effect at startup keep their running values;
    /// returns the ones the new file changes (`global.KEY`, `[section]`), each to be
    /// warned of once the reload is applied.
    fn keep_fixed_globals(&self, new: &mut Config) -> Vec<String> {
        let old = &self.config;
        let mut kept = Vec::new();
        let mut keep = |key: &str, differs: bool| {
            if differs {
                kept.push(format!("global.{key}"));
            }
        };
        keep(
            "max_connections",
            old.max_connections != new.max_connections,
        );
        keep("metrics", old.metrics != new.metrics);
        keep("log_format", old.log_format != new.log_format);
        // `user` and `group` are two keys with one value (who the process runs as):
        // each is named when it is the one that changed.
        let who = |r: &Option<RunAs>| r.as_ref().map(|r| (r.user.clone(), r.uid));
        let group = |r: &Option<RunAs>| r.as_ref().and_then(|r| r.group.clone());
        let user_differs = who(&old.user) != who(&new.user);
        keep("user", user_differs);
        keep(
            "group",
            group(&old.user) != group(&new.user) || (!user_differs && old.user != new.user),
        );
        keep("threads", old.threads != new.threads);
        new.max_connections = old.max_connections;
        new.metrics = old.metrics;
        new.log_format = old.log_format;
        new.user = old.user.clone();
        new.threads = old.threads;
        for (section, differs) in [
            ("tunnel_server", old.tunnel_server != new.tunnel_server),
            ("agent", old.agent != new.agent),
        ] {
            if differs {
                kept.push(format!("[{section}]"));
            }
        }
        new.tunnel_server = old.tunnel_server.clone();
        new.agent = old.agent.clone();
        kept
    }

    /// A new address that cannot be bound because one of our own running listeners
    /// holds its port (a wildcard and a specific address of one port, which Linux
    /// will not listen on at once): says so, rather than leave "address in use" to
    /// send the operator looking for another process.
    fn own_conflict(&self, want: SocketAddr, e: anyhow::Error) -> anyhow::Error {
        let in_use = e
            .root_cause()
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::AddrInUse);
        let ours = self.rules.iter().find_map(|r| {
            let have = r.rule.listen.iter().find(|have| {
                have.port() == want.port()
                    && (have.ip().is_unspecified() || want.ip().is_unspecified())
            })?;
            Some((r, have))
        });
        match ours {
            Some((r, have)) if in_use => anyhow::anyhow!(
                "{e:#}: this process listens on {have} (rule {:?}) until the reload is done, and \
                 a port cannot have a wildcard and a specific address listening at once; \
                 moving a port between them takes a restart",
                r.rule.name
            ),
            _ => e,
        }
    }

    /// Stops every accept loop and closes the listeners: new connects are refused.
    /// (Aborted rather than asked: a loop may wait for a global slot with a client
    /// in hand, and at shutdown that client is closed either way.)
    async fn stop_accepting(&mut self) {
        if let Some(reg) = crate::tunnel::server::registry() {
            reg.stop_accepting();
        }
        let mut tasks = Vec::new();
        for running in std::mem::take(&mut self.rules) {
            for accept in running.stop() {
                accept.abort();
                tasks.push(accept);
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// The relay for a rule, wrapped in the inspection prelude when the rule inspects
/// (warning, once per rule started, that payload is being written out).
async fn choose_relay(rule: &Rule) -> anyhow::Result<(Arc<dyn Relay>, String)> {
    let (relay, why) = if rule.agent_service().is_some() {
        let why = "tunnel: splice with retention, so streams survive a lost link".to_string();
        let relay = crate::tunnel::TunnelRelay { rates: rule.rates };
        (Arc::new(relay) as Arc<dyn Relay>, why)
    } else if rule.rewrite.is_empty() {
        choose_path(rule).await?
    } else {
        let why = "rewrite: the copy path, every byte through userspace (path=copy)".to_string();
        (Arc::new(CopyRelay::new(rule)) as Arc<dyn Relay>, why)
    };
    if !rule.inspects() {
        return Ok((relay, why));
    }
    if let Some(i) = &rule.inspect {
        let to = i.dir.as_ref().map_or("the log".to_string(), |d| {
            format!("files in {}", d.display())
        });
        tracing::warn!(
            "inspect rule={}: the first {} bytes of each direction of every connection are written to {to}",
            rule.name,
            i.bytes
        );
    }
    let wrapped = InspectRelay::new(rule, relay)
        .map_err(|e| anyhow::anyhow!("rule {:?}: deny_pattern: {e}", rule.name))?;
    Ok((Arc::new(wrapped), format!("{why}; inspected first")))
}

/// Picks the fast path for a rule and says why, for the startup line. The kernel path
/// is probed once per process (load, attach, one real pair end to end); `auto` falls
/// back to splice when it fails, `ebpf` refuses to start.
async fn choose_path(rule: &Rule) -> anyhow::Result<(Arc<dyn Relay>, String)> {
    let splice = Arc::new(SpliceRelay { rates: rule.rates });
    if rule.mode == Mode::Splice {
        return Ok((splice, "requested".into()));
    }
    // The kernel path moves bytes without us: it cannot pace them (config refuses
    // mode ebpf with a rate).
    if rule.paced() {
        return Ok((
            splice,
            "auto: upload_rate/download_rate, which only splice paces".into(),
        ));
    }
    let auto = rule.mode == Mode::Auto;
    let proxy_header = rule.accept_proxy_protocol || rule.proxy_protocol.is_some();
    match EbpfRelay::new(rule.inflight_limit, auto, proxy_header).await {
        Ok(relay) => {
            let why = format!(
                "{}: probed ok, attach={}, inflight_limit={}{}",
                if auto { "auto" } else { "requested" },
                relay.attach_kind(),
                rule.inflight_limit,
                if auto {
                    format!(
                        ", pairs start on splice and move after {} bursts",
                        crate::relay::splice::PROMOTE_AFTER_BURSTS
                    )
                } else {
                    String::new()
                }
            );
            Ok((Arc::new(relay), why))
        }
        Err(why) if auto => Ok((splice, format!("auto: {why}"))),
        Err(why) => anyhow::bail!("mode ebpf: {why}"),
    }
}

async fn accept_loop(
    listener: Arc<TcpListener>,
    rt: Arc<RuleRuntime>,
    global: Arc<Semaphore>,
    slots: Arc<RuleSlots>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_fd_warning: Option<Instant> = None;
    loop {
        // Taking the rule's slot before accept() leaves clients over the limit in the
        // kernel's accept backlog, as HAProxy does, instead of accepting and dropping
        // them. The global slot is taken after accept(): a rule idling in accept()
        // must not hold a slot another rule could use.
        let rule_slot = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            slot = slots.acquire() => match slot {
                Some(s) => s,
                None => return,
            },
        };
        // A client accepted earlier waits for an fd for its upstream: the next fd
        // to free is its, not a new client's (which would only wait too).
        while fd_waiters::any() {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(fd_waiters::RECHECK) => {}
            }
        }
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            // Cancel-safe: a stop between accepts loses no client.
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                let Ok(global_permit) = global.clone().acquire_owned().await else {
                    return;
                };
                let permits = Permits {
                    _global: global_permit,
                    _rule: rule_slot,
                };
                tokio::spawn(serve(rt.clone(), client, peer, permits));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of fds or memory: back off and retry instead of spinning; the
                // pending client waits in the backlog until something closes.
                if last_fd_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    event!(
                        warn,
                        "accept failed",
                        text = ("accept rule={} failed: {e}; backing off", rt.rule.name),
                        rule = %rt.rule.name,
                        error = %e,
                    );
                    last_fd_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => tracing::debug!("accept rule={} failed: {e}", rt.rule.name),
        }
    }
}

/// Listens with a deep backlog: bursts of connects (and clients over max_connections)
/// wait there instead of being dropped into SYN retransmits. TCP_NODELAY is set on the
/// listener, which accepted sockets inherit (Linux copies it at accept).
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    // Accepted sockets inherit it: one setsockopt per listener, not per connection.
    sock.set_nodelay(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Probes a silent peer gets before its connection ends (ETIMEDOUT).
const KEEPALIVE_PROBES: u32 = 4;

/// TCP keepalive as `tcp_keepalive` asks: after `idle` without a packet, a probe every
/// quarter of it (at least 1 s); 4 unanswered end the connection, so a dead peer is
/// noticed within twice `idle`. `None` turns it off. On a listener, the sockets it
/// accepts inherit it (Linux copies the options and starts their timer at accept).
pub fn set_keepalive(sock: socket2::SockRef<'_>, idle: Option<Duration>) -> io::Result<()> {
    let Some(idle) = idle else {
        return sock.set_keepalive(false);
    };
    let every = (idle / 4).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(every)
        .with_retries(KEEPALIVE_PROBES);
    sock.set_tcp_keepalive(&ka)
}

/// Out of fds or memory: our problem, not the peer's.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
