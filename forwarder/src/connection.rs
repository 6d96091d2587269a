//! The one place that owns a connection pair's lifecycle: connect to an upstream,
//! hand the pair to a relay, enforce idle timeout and forced shutdown, log how it ended.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};

use crate::config::Rule;
use crate::relay::{describe, Pair, Progress, Relay, RelayEnd};

/// Everything a connection of one rule needs, shared by all its connections.
pub struct RuleRuntime {
    pub rule: Rule,
    pub relay: Arc<dyn Relay>,
    /// Becomes true when the shutdown grace period is over: drop the pair now.
    pub abort: watch::Receiver<bool>,
}

/// Held for the whole life of a connection; dropping it frees the connection slots.
pub struct Permits {
    pub _global: OwnedSemaphorePermit,
    pub _rule: OwnedSemaphorePermit,
}

pub async fn serve(rt: Arc<RuleRuntime>, client: TcpStream, peer: SocketAddr, permits: Permits) {
    let _permits = permits;
    let started = Instant::now();
    let rule = &rt.rule;
    let _ = client.set_nodelay(true);
    let (upstream, upstream_addr) = match connect_upstream(rule, peer).await {
        Some(u) => u,
        None => {
            // Closing without reading: the client sees the connection end at once.
            tracing::info!(
                "close rule={} client={} upstream=none bytes_up=0 bytes_down=0 duration={:.3}s path=none end=connect_failed",
                rule.name,
                peer,
                started.elapsed().as_secs_f64()
            );
            return;
        }
    };
    let _ = upstream.set_nodelay(true);

    let progress = Arc::new(Progress::default());
    let pair = Pair { client, upstream };
    let relay = rt.relay.relay(pair, progress.clone());
    let mut abort = rt.abort.clone();
    let end = tokio::select! {
        end = relay => match end {
            RelayEnd::Closed => "closed".to_string(),
            RelayEnd::Failed { side, error } => {
                format!("{}_{} ({error})", side.as_str(), describe(&error).replace(' ', "_"))
            }
        },
        _ = idle(rule.idle_timeout, &progress) => "idle_timeout".to_string(),
        _ = abort.wait_for(|a| *a) => "shutdown".to_string(),
    };
    tracing::info!(
        "close rule={} client={} upstream={} bytes_up={} bytes_down={} duration={:.3}s path={} end={}",
        rule.name,
        peer,
        upstream_addr,
        progress.to_upstream.load(std::sync::atomic::Ordering::Relaxed),
        progress.to_client.load(std::sync::atomic::Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        rt.relay.path(),
        end
    );
}

/// Tries each upstream in order (each of its addresses in turn), with connect_timeout
/// per attempt. Names are resolved here, per connection, so DNS changes are followed.
async fn connect_upstream(rule: &Rule, peer: SocketAddr) -> Option<(TcpStream, SocketAddr)> {
    for upstream in &rule.upstreams {
        let addrs = match tokio::time::timeout(
            rule.connect_timeout,
            tokio::net::lookup_host(upstream.as_str()),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
            Ok(Err(e)) => {
                tracing::warn!(
                    "connect rule={} client={peer} upstream={upstream} failed: cannot resolve: {e}",
                    rule.name
                );
                continue;
            }
            Err(_) => {
                tracing::warn!(
                    "connect rule={} client={peer} upstream={upstream} failed: resolve timed out",
                    rule.name
                );
                continue;
            }
        };
        for addr in addrs {
            match tokio::time::timeout(rule.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Some((stream, addr)),
                Ok(Err(e)) => tracing::warn!(
                    "connect rule={} client={peer} upstream={upstream} addr={addr} failed: {e}",
                    rule.name
                ),
                Err(_) => tracing::warn!(
                    "connect rule={} client={peer} upstream={upstream} addr={addr} failed: timed out after {:?}",
                    rule.name,
                    rule.connect_timeout
                ),
            }
        }
    }
    None
}

/// Resolves when no byte has moved either way for `timeout`; never when it is `None`.
async fn idle(timeout: Option<Duration>, progress: &Progress) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    // Checking a counter on a tick keeps the relays' hot paths free of timer resets;
    // the tick bounds how late the timeout fires.
    let tick = (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut last_total = progress.total();
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let total = progress.total();
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() >= timeout {
            return;
        }
    }
}
