//! Log output: text lines (the default) or one JSON object per line.
//!
//! The events operators parse (`listening`, `refused`, `close`, `upstream ... UP/DOWN`,
//! `reload`) go through [`event!`]: in text mode it prints the line exactly as before;
//! in JSON mode it records the same values as typed fields, so `bytes_up` is a number
//! and `message` is the event's name. Every other line is a JSON object with just
//! `timestamp`, `level` and `message`.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Whether [`event!`] records typed fields (JSON) or formats the text line.
pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Installs the process's one subscriber; `FORWARDER_LOG` filters as `RUST_LOG` does.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FORWARDER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Unbatched)
        .with_ansi(false)
        .with_target(false);
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    flush_on_panic();
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.event_format(JsonLines).init(),
    }
}

/// Close lines wait here for one write(2) to stderr with the others of the same
/// few milliseconds.
///
/// A write per close line was 2.4% of the relay's CPU at 5,000 connections/s. Once
/// [`start_flusher`] runs, a close line is written at most [`FLUSH_AFTER`] late (or
/// at [`FLUSH_AT`] bytes). Every other line is written at once, after whatever
/// waits, so the order holds; exit, failure and panic flush first.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static BATCHING: AtomicBool = AtomicBool::new(false);
/// 8 ms asked for: tokio's timer rounds up to its 1 ms tick and the flusher has to be
/// scheduled, so a 10 ms sleep wrote lines 10.2-16 ms late; 8 ms keeps them within 10.
const FLUSH_AFTER: Duration = Duration::from_millis(8);
const FLUSH_AT: usize = 32 << 10;

fn flusher() -> &'static tokio::sync::Notify {
    static N: OnceLock<tokio::sync::Notify> = OnceLock::new();
    N.get_or_init(tokio::sync::Notify::new)
}

/// Starts batching (inside the runtime): a task that writes a batch `FLUSH_AFTER`
/// after its first line, and sleeps while nothing is logged.
pub fn start_flusher() {
    let wake = flusher();
    tokio::spawn(async move {
        loop {
            wake.notified().await;
            tokio::time::sleep(FLUSH_AFTER).await;
            flush();
        }
    });
    BATCHING.store(true, Ordering::Release);
}

/// Writes what waits and stops batching (the server has returned: lines logged while
/// the runtime winds down, or by a failure message, go out at once).
pub fn finish() {
    BATCHING.store(false, Ordering::Release);
    flush();
}

fn flush() {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    write_out(&mut pending);
}

fn write_out(pending: &mut Vec<u8>) {
    if !pending.is_empty() {
        // Nothing useful to do if stderr is gone.
        let _ = io::stderr().write_all(pending);
        pending.clear();
        if pending.capacity() > 2 * FLUSH_AT {
            pending.shrink_to(FLUSH_AT);
        }
    }
}

/// Queues one whole line, or writes it with what waits when `now` or not batching.
pub fn push_line(line: &[u8], now: bool) {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let was_empty = pending.is_empty();
    pending.extend_from_slice(line);
    if now || !BATCHING.load(Ordering::Acquire) || pending.len() >= FLUSH_AT {
        write_out(&mut pending);
    } else if was_empty {
        flusher().notify_one();
    }
}

/// Flushes waiting close lines before the panic message (`try_lock`: the panic may
/// have struck while holding the lock).
fn flush_on_panic() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut pending) = PENDING.try_lock() {
            write_out(&mut pending);
        }
        previous(info)
    }));
}

/// tracing's writer: every line it formats is written at once (after waiting close
/// lines); one `write` call is one whole line.
struct Unbatched;

struct LineWriter;

impl<'a> MakeWriter<'a> for Unbatched {
    type Writer = LineWriter;
    fn make_writer(&'a self) -> LineWriter {
        LineWriter
    }
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        push_line(buf, true);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The text log's timestamp (`2026-11-30T20:05:12.480881Z`, as tracing's formatter
/// writes it) for lines formatted outside it; the date and time are formatted once a
/// second per thread.
pub fn write_timestamp(out: &mut String, now: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> =
            const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with_borrow_mut(|(at, text)| {
        if *at != secs {
            *at = secs;
            text.clear();
            let t = chrono::DateTime::from_timestamp(secs as i64, 0).unwrap_or_default();
            let _ = fmt::Write::write_fmt(text, format_args!("{}", t.format("%Y-%m-%dT%H:%M:%S")));
        }
        out.push_str(text);
    });
    out.push('.');
    push_padded(out, since.subsec_micros(), 6);
    out.push('Z');
}

/// Appends `n` in decimal, as `{n}` does, for lines formatted by hand on every
/// connection: `core::fmt` pads and dispatches each integer (its `pad_integral` alone
/// was 2.4k of the 40k user-space instructions a splice connection cost).
pub fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Appends `n` zero-padded to `width` digits, as `{n:0width$}` does.
pub fn push_padded(out: &mut String, n: impl itoa::Integer, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(n);
    for _ in digits.len()..width {
        out.push('0');
    }
    out.push_str(digits);
}

/// Appends `addr` as `{addr}` shows it; an IPv4 one without `core::fmt`.
pub fn push_addr(out: &mut String, addr: &std::net::SocketAddr) {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_int(out, octet);
            }
            out.push(':');
            push_int(out, v4.port());
        }
        std::net::SocketAddr::V6(_) => {
            let _ = fmt::Write::write_fmt(out, format_args!("{addr}"));
        }
    }
}

/// Logs one operator-facing event: `text` is the text line's format and arguments,
/// the fields after it are what JSON mode records (`message` is `$name`).
#[macro_export]
macro_rules! event {
    ($level:ident, $name:literal, text = ($($text:tt)*), $($fields:tt)*) => {
        if $crate::logging::json() {
            tracing::$level!($($fields)* $name)
        } else {
            tracing::$level!($($text)*)
        }
    };
}

/// Fields recorded as `[a,b]` text that JSON shows as arrays (the reload line's lists).
const LIST_FIELDS: &[&str] = &["added", "removed", "changed"];

/// A list for [`LIST_FIELDS`]: `[a,b]` in text.
pub struct List<'a>(pub &'a [String]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}]", self.0.join(","))
    }
}

struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut obj = serde_json::Map::new();
        let now = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
        obj.insert("timestamp".into(), now.to_string().into());
        obj.insert("level".into(), event.metadata().level().as_str().into());
        event.record(&mut JsonFields(&mut obj));
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(writer, "{line}")
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonFields<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if LIST_FIELDS.contains(&field.name()) {
            let inner = text.trim_start_matches('[').trim_end_matches(']');
            let items: Vec<serde_json::Value> = inner
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.into())
                .collect();
            return self.put(field, items.into());
        }
        self.put(field, text.into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_formatting_matches_core_fmt() {
        let addrs = [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "255.255.255.255:65535",
            "10.20.3.4:7",
            "[::1]:443",
            "[::ffff:1.2.3.4]:80",
            "[fe80::1%2]:22",
        ];
        for a in addrs {
            let addr: std::net::SocketAddr = a.parse().unwrap();
            let mut out = String::from("x");
            push_addr(&mut out, &addr);
            assert_eq!(out, format!("x{addr}"), "{a}");
        }
        for n in [0u64, 7, 10, 999, 1000, u64::MAX] {
            let mut out = String::new();
            push_int(&mut out, n);
            assert_eq!(out, format!("{n}"));
            for width in [3, 6] {
                let mut out = String::new();
                push_padded(&mut out, n, width);
                assert_eq!(out, format!("{n:0width$}"));
            }
        }
        let mut out = String::new();
        let at = UNIX_EPOCH + std::time::Duration::new(1_764_000_000, 4_560_000);
        write_timestamp(&mut out, at);
        assert_eq!(out, "2025-11-24T16:00:00.004560Z");
    }
}
