//! Medians, the markdown table and the JSON record.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::Mode;

/// One repetition of one mode: metric key -> value.
pub type Sample = BTreeMap<&'static str, f64>;

pub struct ModeResult {
    pub mode: Mode,
    pub samples: Vec<Sample>,
    /// Set when the forwarder would not start in this mode: the table says n/a.
    pub unavailable: Option<String>,
    /// The forwarder's own word on its relay path, e.g. "splice (requested)".
    pub path: Option<String>,
    /// Failures of single tests, and anything else worth a line under the table.
    pub notes: Vec<String>,
}

impl ModeResult {
    pub fn new(mode: Mode) -> Self {
        ModeResult {
            mode,
            samples: Vec::new(),
            unavailable: None,
            path: None,
            notes: Vec::new(),
        }
    }

    pub fn median(&self, key: &str) -> Option<f64> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.get(key).copied())
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        Some(if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        })
    }
}

pub struct Metric {
    pub key: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub decimals: usize,
    /// Shown in the table (the others only go to the JSON).
    pub table: bool,
}

const fn m(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    decimals: usize,
    table: bool,
) -> Metric {
    Metric {
        key,
        label,
        unit,
        decimals,
        table,
    }
}

pub const METRICS: &[Metric] = &[
    m("up1_gbps", "upload, 1 stream", "Gbit/s", 2, true),
    m("up8_gbps", "upload, 8 streams", "Gbit/s", 2, true),
    m("down1_gbps", "download, 1 stream", "Gbit/s", 2, true),
    m("down8_gbps", "download, 8 streams", "Gbit/s", 2, true),
    m("rr_p50_us", "64 B ping-pong p50", "µs", 1, true),
    m("rr_p99_us", "64 B ping-pong p99", "µs", 1, true),
    m("rr_p999_us", "64 B ping-pong p99.9", "µs", 1, true),
    m("rr_max_us", "64 B ping-pong max", "µs", 0, true),
    m(
        "conn_per_s",
        "connections/s (64 B req + resp)",
        "1/s",
        0,
        true,
    ),
    m("conn_errors", "connection-rate failures", "", 0, false),
    m(
        "fwd_cpu_s_per_gib",
        "forwarder CPU per GiB (bulk)",
        "s",
        3,
        true,
    ),
    m(
        "machine_cpu_s_per_gib",
        "machine CPU per GiB (bulk)",
        "s",
        3,
        true,
    ),
    m("bulk_gib", "GiB moved in the bulk windows", "GiB", 2, false),
    m("fwd_base_rss_mib", "forwarder RSS at start", "MiB", 2, true),
    m(
        "fwd_peak_rss_mib",
        "forwarder peak RSS (VmHWM)",
        "MiB",
        2,
        true,
    ),
    m(
        "idle_rss_per_conn_b",
        "forwarder RSS per idle connection",
        "B",
        0,
        true,
    ),
    m(
        "idle_slab_per_conn_b",
        "kernel slab per idle connection",
        "B",
        0,
        true,
    ),
    m(
        "idle_meminfo_slab_per_conn_b",
        "meminfo Slab growth per idle connection",
        "B",
        0,
        false,
    ),
    m(
        "background_cpu_pct",
        "CPU busy before the run (other processes)",
        "%",
        0,
        false,
    ),
];

enum Goal {
    /// value / direct must be at least this.
    RatioMin(f64),
    /// value / direct must be at most this.
    RatioMax(f64),
    /// value must be at most this.
    Max(f64),
}

/// Issue 5's targets, per relay path (ratios are to direct in the same run).
const SPLICE_TARGETS: &[(&str, Goal)] = &[
    ("up1_gbps", Goal::RatioMin(0.65)),
    ("up8_gbps", Goal::RatioMin(0.65)),
    ("down1_gbps", Goal::RatioMin(0.65)),
    ("down8_gbps", Goal::RatioMin(0.65)),
    ("rr_p50_us", Goal::RatioMax(2.0)),
    ("rr_p99_us", Goal::RatioMax(3.0)),
    ("conn_per_s", Goal::RatioMin(0.55)),
    ("fwd_cpu_s_per_gib", Goal::Max(0.40)),
    ("fwd_base_rss_mib", Goal::Max(8.0)),
    ("idle_rss_per_conn_b", Goal::Max(2048.0)),
];

const EBPF_TARGETS: &[(&str, Goal)] = &[
    ("up1_gbps", Goal::RatioMin(0.85)),
    ("up8_gbps", Goal::RatioMin(0.85)),
    ("down1_gbps", Goal::RatioMin(0.85)),
    ("down8_gbps", Goal::RatioMin(0.85)),
    ("rr_p50_us", Goal::RatioMax(1.3)),
    ("rr_p99_us", Goal::RatioMax(1.6)),
    ("conn_per_s", Goal::RatioMin(0.55)),
    ("fwd_cpu_s_per_gib", Goal::Max(0.05)),
    ("fwd_base_rss_mib", Goal::Max(8.0)),
    ("idle_rss_per_conn_b", Goal::Max(2048.0)),
];

fn targets(mode: Mode) -> &'static [(&'static str, Goal)] {
    match mode {
        Mode::Ebpf => EBPF_TARGETS,
        _ => SPLICE_TARGETS,
    }
}

fn metric(key: &str) -> &'static Metric {
    METRICS.iter().find(|m| m.key == key).expect("known metric")
}

fn fmt_num(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "–".into(),
    }
}

pub struct Header {
    pub lines: Vec<String>,
}

pub fn markdown(header: &Header, results: &[ModeResult]) -> String {
    let mut out = String::new();
    for l in &header.lines {
        out += &format!("{l}  \n");
    }
    out += "\n";
    let direct = results.iter().find(|r| r.mode == Mode::Direct);
    let others: Vec<&ModeResult> = results.iter().filter(|r| r.mode != Mode::Direct).collect();

    let mut head = vec!["metric".to_string()];
    head.extend(results.iter().map(|r| r.mode.name().to_string()));
    if direct.is_some() {
        head.extend(others.iter().map(|r| format!("{}/direct", r.mode.name())));
    }
    out += &format!("| {} |\n", head.join(" | "));
    out += &format!(
        "|{}\n",
        head.iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
            .collect::<String>()
    );
    for m in METRICS.iter().filter(|m| m.table) {
        let label = if m.unit.is_empty() {
            m.label.to_string()
        } else {
            format!("{} ({})", m.label, m.unit)
        };
        let mut row = vec![label];
        for r in results {
            row.push(if r.unavailable.is_some() {
                "n/a".into()
            } else {
                fmt_num(r.median(m.key), m.decimals)
            });
        }
        if let Some(d) = direct {
            for r in &others {
                row.push(match (r.median(m.key), d.median(m.key)) {
                    (Some(v), Some(b)) if b != 0.0 => format!("{:.2}×", v / b),
                    _ => "–".into(),
                });
            }
        }
        out += &format!("| {} |\n", row.join(" | "));
    }

    let mut checks = Vec::new();
    for r in &others {
        if r.unavailable.is_some() {
            continue;
        }
        for (key, goal) in targets(r.mode) {
            let m = metric(key);
            let Some(v) = r.median(key) else { continue };
            let base = direct.and_then(|d| d.median(key));
            let (ok, text) = match *goal {
                Goal::RatioMin(t) | Goal::RatioMax(t) => {
                    let Some(b) = base.filter(|b| *b != 0.0) else {
                        continue;
                    };
                    let ratio = v / b;
                    let min = matches!(goal, Goal::RatioMin(_));
                    let ok = if min { ratio >= t } else { ratio <= t };
                    let op = if min { "≥" } else { "≤" };
                    (ok, format!("{:.2}× direct (target {op} {t}×)", ratio))
                }
                Goal::Max(t) => (
                    v <= t,
                    format!(
                        "{} {} (target ≤ {t})",
                        fmt_num(Some(v), m.decimals.max(1)),
                        m.unit
                    ),
                ),
            };
            checks.push(format!(
                "- {} {}: {}: {}",
                if ok { "✅" } else { "❌" },
                r.mode.name(),
                m.label,
                text
            ));
        }
    }
    if !checks.is_empty() {
        out += "\nTargets (issue 5), on the medians:\n\n";
        out += &checks.join("\n");
        out += "\n";
    }

    let mut notes = Vec::new();
    for r in results {
        if let Some(why) = &r.unavailable {
            notes.push(format!("- {}: n/a: {why}", r.mode.name()));
        }
        if let Some(p) = &r.path {
            notes.push(format!("- {}: forwarder reported mode={p}", r.mode.name()));
        }
        for n in &r.notes {
            notes.push(format!("- {}: {n}", r.mode.name()));
        }
    }
    if !notes.is_empty() {
        out += "\nNotes:\n\n";
        out += &notes.join("\n");
        out += "\n";
    }
    out
}

pub fn json(meta: Value, results: &[ModeResult]) -> Value {
    let mut modes = serde_json::Map::new();
    for r in results {
        let median: serde_json::Map<String, Value> = METRICS
            .iter()
            .filter_map(|m| Some((m.key.to_string(), json!(r.median(m.key)?))))
            .collect();
        let samples: Vec<Value> = r.samples.iter().map(|s| json!(s)).collect();
        modes.insert(
            r.mode.name().to_string(),
            json!({
                "available": r.unavailable.is_none(),
                "reason": r.unavailable,
                "forwarder_mode": r.path,
                "median": median,
                "samples": samples,
                "notes": r.notes,
            }),
        );
    }
    let metrics: Vec<Value> = METRICS
        .iter()
        .map(|m| json!({"key": m.key, "label": m.label, "unit": m.unit}))
        .collect();
    json!({ "meta": meta, "metrics": metrics, "modes": modes })
}
