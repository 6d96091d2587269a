//! Log output: text lines (the default) or one JSON object per line.
//!
//! The events operators parse (`listening`, `refused`, `close`, `upstream ... UP/DOWN`,
//! `reload`) go through [`event!`]: in text mode it prints the line exactly as before;
//! in JSON mode it records the same values as typed fields, so `bytes_up` is a number
//! and `message` is the event's name. Every other line is a JSON object with just
//! `timestamp`, `level` and `message`.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
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
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.event_format(JsonLines).init(),
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
