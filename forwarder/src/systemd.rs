//! systemd's notify protocol (`Type=notify`): readiness, reloads, stop and watchdog.
//! Every call is a no-op when `NOTIFY_SOCKET` is not set.

use sd_notify::NotifyState;

fn notify(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("systemd: cannot notify {states:?}: {e}");
    }
}

/// Every listener is bound (at startup, and after each reload).
pub fn ready() {
    notify(&[NotifyState::Ready]);
}

/// A reload starts; [`ready`] ends it. systemd wants the monotonic clock with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(e) => tracing::warn!("systemd: cannot read CLOCK_MONOTONIC: {e}"),
    }
}

/// SIGTERM arrived: the drain starts.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// Pings the watchdog every half of `WATCHDOG_USEC`, for the life of the process.
pub fn spawn_watchdog() {
    let Some(period) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}
