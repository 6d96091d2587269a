//! Active health checks: a TCP connect to every upstream each `check_interval`.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::balance::Upstreams;
use crate::config::Rule;

/// Runs for the life of the process; spawned once per rule that has `check_interval`.
pub async fn run(rule: Rule, upstreams: Arc<Upstreams>) {
    let Some(interval) = rule.check_interval else {
        return;
    };
    let timeout = rule.connect_timeout.min(interval);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        // All checks of one round run at once, so one slow upstream delays none.
        let mut checks = tokio::task::JoinSet::new();
        for (i, u) in upstreams.list.iter().enumerate() {
            let addr = u.cfg.addr.clone();
            let from = rule.connect_from;
            checks.spawn(async move { (i, check(&addr, timeout, from).await) });
        }
        while let Some(Ok((i, result))) = checks.join_next().await {
            // Out of fds or memory ourselves: the check says nothing of the upstream
            // (audit: every upstream, backups too, went DOWN while we were out of fds).
            let Some(result) = result else { continue };
            let why = result.as_ref().err().cloned().unwrap_or_default();
            if let Some(up) = upstreams.report(i, result.is_ok()) {
                log_transition(&rule.name, &upstreams.list[i].cfg.addr, up, "check", &why);
            }
        }
    }
}

pub fn log_transition(rule: &str, addr: &str, up: bool, by: &str, why: &str) {
    if up {
        crate::event!(
            info,
            "upstream is UP",
            text = ("upstream rule={rule} addr={addr} is UP ({by})"),
            rule = %rule,
            addr = %addr,
            state = "UP",
            by = %by,
        );
    } else {
        crate::event!(
            warn,
            "upstream is DOWN",
            text = ("upstream rule={rule} addr={addr} is DOWN ({by}: {why})"),
            rule = %rule,
            addr = %addr,
            state = "DOWN",
            by = %by,
            error = %why,
        );
    }
}

/// One check: whether `addr` answered, or None when the failure was ours (out of fds
/// or memory), which tells nothing about the upstream.
/// From `connect_from`, as the rule's connections are made.
async fn check(addr: &str, timeout: Duration, from: Option<IpAddr>) -> Option<Result<(), String>> {
    let connect = crate::connection::connect_one(addr, timeout, from);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(_)) => Some(Ok(())),
        Ok(Err(e)) if e.local => None,
        Ok(Err(e)) => Some(Err(e.why)),
        Err(_) => Some(Err(format!("timed out after {timeout:?}"))),
    }
}
