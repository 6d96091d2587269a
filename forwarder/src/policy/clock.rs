//! Wall-clock time for schedules, injectable so tests need not wait for office hours.

use std::sync::OnceLock;
use std::time::Instant;

use chrono::{DateTime, Utc};

/// Now, or, when the environment variable `FORWARDER_FAKE_NOW` holds an RFC 3339 time
/// (a testing hook), that time advancing in real time from the process start.
pub fn now() -> DateTime<Utc> {
    static FAKE: OnceLock<Option<(DateTime<Utc>, Instant)>> = OnceLock::new();
    let fake = FAKE.get_or_init(|| {
        let s = std::env::var("FORWARDER_FAKE_NOW").ok()?;
        match DateTime::parse_from_rfc3339(&s) {
            Ok(t) => Some((t.with_timezone(&Utc), Instant::now())),
            Err(e) => {
                tracing::warn!("ignoring FORWARDER_FAKE_NOW={s:?}: {e}");
                None
            }
        }
    });
    match fake {
        Some((start, at)) => *start + chrono::Duration::from_std(at.elapsed()).unwrap_or_default(),
        None => Utc::now(),
    }
}
