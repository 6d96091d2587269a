//! Listeners, connection limits, signals and graceful shutdown.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};

use crate::config::{Config, Mode, Rule};
use crate::connection::{serve, Permits, RuleRuntime};
use crate::policy::health;
use crate::relay::ebpf::EbpfRelay;
use crate::relay::splice::SpliceRelay;
use crate::relay::Relay;

/// Runs until a signal and the drain that follows it. Errors are startup failures.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Bind everything before serving anything: a bad address fails the whole start.
    let mut listeners = Vec::with_capacity(config.rules.len());
    for rule in &config.rules {
        let listener = bind(rule.listen)
            .with_context(|| format!("cannot listen on {} (rule {:?})", rule.listen, rule.name))?;
        listeners.push(listener);
    }

    let global = Arc::new(Semaphore::new(config.max_connections));
    let (abort_tx, abort_rx) = watch::channel(false);
    let mut accept_tasks = Vec::new();
    for (rule, listener) in config.rules.iter().zip(listeners) {
        let (relay, why) = choose_relay(rule).await?;
        let local = listener.local_addr()?;
        tracing::info!(
            "listening rule={} listen={} upstream={} mode={} ({})",
            rule.name,
            local,
            rule.upstream_list(),
            relay.path(),
            why
        );
        let rt = Arc::new(RuleRuntime::new(
            rule.clone(),
            relay,
            config.access.clone(),
            abort_rx.clone(),
        ));
        if rule.check_interval.is_some() {
            tokio::spawn(health::run(rule.clone(), rt.upstreams.clone()));
        }
        let per_rule = Arc::new(Semaphore::new(rule.max_connections));
        accept_tasks.push(tokio::spawn(accept_loop(
            listener,
            rt,
            global.clone(),
            per_rule,
        )));
    }

    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Stop accepting: dropping the listeners makes new connections be refused.
    for t in &accept_tasks {
        t.abort();
    }
    for t in accept_tasks {
        let _ = t.await;
    }
    let active = config.max_connections - global.available_permits();
    tracing::info!(
        "shutdown: stopped accepting, draining {active} connection(s) for up to {:?}",
        config.shutdown_grace
    );
    let deadline = Instant::now() + config.shutdown_grace;
    let drained = async {
        // Every connection holds one global permit until it is fully closed.
        let _all = global.acquire_many(config.max_connections as u32).await;
    };
    tokio::select! {
        _ = drained => tracing::info!("shutdown: all connections closed"),
        _ = tokio::time::sleep_until(deadline.into()) => {
            let left = config.max_connections - global.available_permits();
            tracing::info!("shutdown: grace period over, closing {left} connection(s)");
            let _ = abort_tx.send(true);
            // Let the aborted connections log their close line.
            let _ = tokio::time::timeout(Duration::from_secs(1), global.acquire_many(config.max_connections as u32)).await;
        }
        _ = term.recv() => tracing::info!("shutdown: second signal, exiting now"),
        _ = int.recv() => tracing::info!("shutdown: second signal, exiting now"),
    }
    Ok(())
}

/// Picks the relay for a rule and says why, for the startup line. The kernel path is
/// probed once per process (load, attach, one real pair end to end); `auto` falls back
/// to splice when it fails, `ebpf` refuses to start.
async fn choose_relay(rule: &Rule) -> anyhow::Result<(Arc<dyn Relay>, String)> {
    if rule.mode == Mode::Splice {
        return Ok((Arc::new(SpliceRelay), "requested".into()));
    }
    let auto = rule.mode == Mode::Auto;
    match EbpfRelay::new(rule.inflight_limit, auto).await {
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
        Err(why) if rule.mode == Mode::Auto => Ok((Arc::new(SpliceRelay), format!("auto: {why}"))),
        Err(why) => anyhow::bail!("mode ebpf: {why}"),
    }
}

async fn accept_loop(
    listener: TcpListener,
    rt: Arc<RuleRuntime>,
    global: Arc<Semaphore>,
    per_rule: Arc<Semaphore>,
) {
    let mut last_fd_warning: Option<Instant> = None;
    loop {
        // Taking the rule's slot before accept() leaves clients over the limit in the
        // kernel's accept backlog, as HAProxy does, instead of accepting and dropping
        // them. The global slot is taken after accept(): a rule idling in accept()
        // must not hold a slot another rule could use.
        let Ok(rule_permit) = per_rule.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((client, peer)) => {
                let Ok(global_permit) = global.clone().acquire_owned().await else {
                    return;
                };
                let permits = Permits {
                    _global: global_permit,
                    _rule: rule_permit,
                };
                tokio::spawn(serve(rt.clone(), client, peer, permits));
            }
            Err(e) if is_resource_exhaustion(&e) => {
                // Out of fds or memory: back off and retry instead of spinning; the
                // pending client waits in the backlog until something closes.
                if last_fd_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!("accept rule={} failed: {e}; backing off", rt.rule.name);
                    last_fd_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => tracing::debug!("accept rule={} failed: {e}", rt.rule.name),
        }
    }
}

/// Listens with a deep backlog: bursts of connects (and clients over max_connections)
/// wait there instead of being dropped into SYN retransmits.
fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    TcpListener::from_std(sock.into())
}

/// Out of fds or memory: our problem, not the peer's.
pub fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
