//! systemd's notify protocol (`Type=notify`): readiness, reloads, stop and watchdog.
//! Every call is a no-op when `NOTIFY_SOCKET` is not set.

use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

fn notify(states: &[NotifyState]) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = match socket.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => notify_abstract(name, states),
        None => sd_notify::notify(states),
    };
    match sent {
        // Once, not on every watchdog ping (twice per WATCHDOG_USEC): a socket that
        // is gone stays gone.
        Err(e) if !WARNED.swap(true, Ordering::Relaxed) => tracing::warn!(
            "systemd: cannot notify {states:?}: {e} (further failures at debug level)"
        ),
        Err(e) => tracing::debug!("systemd: cannot notify {states:?}: {e}"),
        Ok(()) => WARNED.store(false, Ordering::Relaxed),
    }
}

/// Whether the last notification failed and was warned of.
static WARNED: AtomicBool = AtomicBool::new(false);

/// sd_notify(3): a `NOTIFY_SOCKET` starting with `@` names a socket in the abstract
/// namespace, which sd-notify 0.5 takes for a path (ENOENT). The message is the
/// crate's own, one state per line.
fn notify_abstract(name: &[u8], states: &[NotifyState]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let addr = SocketAddr::from_abstract_name(name)?;
    let msg: String = states.iter().map(|s| format!("{s}\n")).collect();
    UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &addr)?;
    Ok(())
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
