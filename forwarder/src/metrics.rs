//! Prometheus metrics: per-rule counters kept by the connections themselves, read
//! when a scrape arrives (a prometheus-client `Collector`), so bytes in flight show
//! up without any per-pair timer; and the `/metrics` endpoint that serves them.
//!
//! A rule's series live in its [`RuleStats`], shared by every runtime of that rule
//! name across reloads (so a changed rule's counters go on), and dropped with the
//! last runtime that holds it: a removed rule's series vanish once its last
//! connection ends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::config::AGENT_PREFIX;
use crate::policy::balance::Upstreams;
use crate::relay::{Hop, Progress};

/// `reason=` values of the `refused` line (and of `forwarder_refused_total`).
pub const REFUSAL_REASONS: &[&str] = &[
    "acl",
    "schedule",
    "max_connections_per_source",
    "rate_per_source",
    "bad_proxy_header",
    "pattern",
    "http_auth",
];

/// Everything `/metrics` shows. One per process.
#[derive(Debug, Default)]
pub struct Metrics {
    rules: Mutex<BTreeMap<String, Weak<RuleStats>>>,
    reloads_ok: AtomicU64,
    reloads_error: AtomicU64,
}

pub fn global() -> &'static Arc<Metrics> {
    static METRICS: OnceLock<Arc<Metrics>> = OnceLock::new();
    METRICS.get_or_init(Default::default)
}

impl Metrics {
    /// The stats of rule `name`: the live ones if a runtime of that name still runs.
    pub fn rule(&self, name: &str) -> Arc<RuleStats> {
        let mut rules = self.rules.lock().unwrap();
        rules.retain(|_, w| w.strong_count() > 0);
        if let Some(s) = rules.get(name).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(RuleStats::default());
        rules.insert(name.to_string(), Arc::downgrade(&s));
        s
    }

    pub fn reloaded(&self, ok: bool) {
        let c = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_error
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn live_rules(&self) -> Vec<(String, Arc<RuleStats>)> {
        let rules = self.rules.lock().unwrap();
        rules
            .iter()
            .filter_map(|(n, w)| Some((n.clone(), w.upgrade()?)))
            .collect()
    }
}

/// One rule's counters.
#[derive(Debug, Default)]
pub struct RuleStats {
    /// Pairs by the path they started on, indexed by [`Hop`].
    started: [AtomicU64; Hop::ALL.len() + 1],
    live: Mutex<LivePairs>,
    refused: [AtomicU64; REFUSAL_REASONS.len()],
    /// The `refused` log line's count (all reasons) and rate limit.
    pub refusals: crate::connection::RefusalLog,
    connect_errors: Mutex<BTreeMap<String, u64>>,
    /// The newest runtime's upstreams (the ones new connections use).
    upstreams: Mutex<Weak<Upstreams>>,
}

#[derive(Debug, Default)]
struct LivePairs {
    /// Open pairs by their progress's address.
    pairs: BTreeMap<usize, Arc<Progress>>,
    /// Bytes of pairs that have closed, [to_upstream, to_client].
    closed: [u64; 2],
}

/// A pair counted as open, holding its progress; dropping it folds the pair's final
/// byte counts into the totals.
pub struct OpenPair(Arc<Progress>);

impl OpenPair {
    pub fn progress(&self) -> &Arc<Progress> {
        &self.0
    }
}

impl Drop for OpenPair {
    fn drop(&mut self) {
        let Some(stats) = self.0.stats() else { return };
        let mut live = stats.live.lock().unwrap();
        if let Some(p) = live.pairs.remove(&(Arc::as_ptr(&self.0) as usize)) {
            let [up, down] = bytes_of(&p);
            live.closed[0] += up;
            live.closed[1] += down;
        }
    }
}

fn bytes_of(p: &Progress) -> [u64; 2] {
    [
        p.to_upstream.load(Ordering::Relaxed),
        p.to_client.load(Ordering::Relaxed),
    ]
}

impl RuleStats {
    /// Called once per pair, with the first path its bytes took.
    pub fn started(&self, hop: Hop) {
        self.started[hop as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A new pair's progress (its client accepted at `started`), counted as open
    /// and its bytes as live until the guard drops.
    pub fn open(self: &Arc<Self>, started: std::time::Instant) -> OpenPair {
        let progress = Arc::new(Progress::counted_in(self.clone(), started));
        let mut live = self.live.lock().unwrap();
        live.pairs
            .insert(Arc::as_ptr(&progress) as usize, progress.clone());
        OpenPair(progress)
    }

    pub fn refused(&self, reason: &str) {
        if let Some(i) = REFUSAL_REASONS.iter().position(|r| *r == reason) {
            self.refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn connect_error(&self, upstream: &str) {
        *self
            .connect_errors
            .lock()
            .unwrap()
            .entry(upstream.to_string())
            .or_default() += 1;
    }

    pub fn serve_upstreams(&self, upstreams: &Arc<Upstreams>) {
        *self.upstreams.lock().unwrap() = Arc::downgrade(upstreams);
    }

    /// (open pairs, [to_upstream, to_client] including open pairs' bytes so far).
    fn bytes(&self) -> (usize, [u64; 2]) {
        let live = self.live.lock().unwrap();
        let mut total = live.closed;
        for p in live.pairs.values() {
            let [up, down] = bytes_of(p);
            total[0] += up;
            total[1] += down;
        }
        (live.pairs.len(), total)
    }
}

#[derive(Debug)]
struct Collect(Arc<Metrics>);

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// Writes one metric family: `samples` are (labels, value).
fn family<'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Labels<'a>, M)>,
) -> std::fmt::Result {
    let mut m = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        value.encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Collect {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let rules = self.0.live_rules();
        let counter = |v: u64| ConstCounter::new(v);
        let gauge = |v: i64| ConstGauge::new(v);

        let mut started = Vec::new();
        let mut active = Vec::new();
        let mut bytes = Vec::new();
        let mut refused = Vec::new();
        let mut errors = Vec::new();
        let mut up = Vec::new();
        let mut upstream_open = Vec::new();
        let snapshots: Vec<_> = rules
            .iter()
            .map(|(name, s)| {
                let errs = s.connect_errors.lock().unwrap().clone();
                let ups = s.upstreams.lock().unwrap().upgrade();
                (name, s, s.bytes(), errs, ups)
            })
            .collect();
        for (name, s, (open, [to_up, to_client]), errs, ups) in &snapshots {
            let name = name.as_str();
            for hop in Hop::ALL {
                let n = s.started[hop as usize].load(Ordering::Relaxed);
                started.push((vec![("rule", name), ("path", hop.as_str())], counter(n)));
            }
            active.push((vec![("rule", name)], gauge(*open as i64)));
            bytes.push((
                vec![("rule", name), ("direction", "to_upstream")],
                counter(*to_up),
            ));
            bytes.push((
                vec![("rule", name), ("direction", "to_client")],
                counter(*to_client),
            ));
            for (i, reason) in REFUSAL_REASONS.iter().enumerate() {
                let n = s.refused[i].load(Ordering::Relaxed);
                refused.push((vec![("rule", name), ("reason", *reason)], counter(n)));
            }
            // Every configured upstream has a series from the start (0 errors), and
            // one removed by a reload keeps its count while the rule lives.
            let mut per_upstream: BTreeMap<&str, u64> =
                errs.iter().map(|(u, n)| (u.as_str(), *n)).collect();
            if let Some(ups) = ups {
                for (i, u) in ups.list.iter().enumerate() {
                    per_upstream.entry(u.cfg.addr.as_str()).or_default();
                    let v = i64::from(match u.cfg.addr.strip_prefix(AGENT_PREFIX) {
                        // Agents are not health-checked: up while one offers it.
                        Some(service) => {
                            crate::tunnel::server::registry().is_some_and(|r| r.offers(service))
                        }
                        None => ups.marked_up(i),
                    });
                    up.push((
                        vec![("rule", name), ("upstream", u.cfg.addr.as_str())],
                        gauge(v),
                    ));
                    // An agent's visitors are not dialed: all of the rule's pairs are its.
                    let n = match u.cfg.addr.starts_with(AGENT_PREFIX) {
                        true => *open as i64,
                        false => ups.open(i) as i64,
                    };
                    upstream_open.push((
                        vec![("rule", name), ("upstream", u.cfg.addr.as_str())],
                        gauge(n),
                    ));
                }
            }
            for (u, n) in per_upstream {
                errors.push((vec![("rule", name), ("upstream", u)], counter(n)));
            }
        }
        family(
            &mut e,
            "forwarder_connections",
            "Pairs relayed, by the path they started on",
            MetricType::Counter,
            started,
        )?;
        family(
            &mut e,
            "forwarder_connections_active",
            "Pairs open now",
            MetricType::Gauge,
            active,
        )?;
        family(
            &mut e,
            "forwarder_bytes",
            "Bytes relayed, including those of open pairs",
            MetricType::Counter,
            bytes,
        )?;
        family(
            &mut e,
            "forwarder_refused",
            "Clients refused, by reason",
            MetricType::Counter,
            refused,
        )?;
        family(
            &mut e,
            "forwarder_upstream_connect_errors",
            "Failed connects to an upstream",
            MetricType::Counter,
            errors,
        )?;
        family(
            &mut e,
            "forwarder_upstream_up",
            "1 if the upstream is up, 0 if it is marked down (agent:NAME: 1 while an agent offering NAME is connected)",
            MetricType::Gauge,
            up,
        )?;
        family(
            &mut e,
            "forwarder_upstream_connections_active",
            "Connections open to the upstream or connecting (agent:NAME: the rule's open pairs)",
            MetricType::Gauge,
            upstream_open,
        )?;
        encode_tunnel(&mut e)?;
        let ok = self.0.reloads_ok.load(Ordering::Relaxed);
        let failed = self.0.reloads_error.load(Ordering::Relaxed);
        family(
            &mut e,
            "forwarder_config_reloads",
            "Config reloads (SIGHUP), by result",
            MetricType::Counter,
            [
                (vec![("result", "ok")], counter(ok)),
                (vec![("result", "error")], counter(failed)),
            ],
        )?;
        let ebpf = if crate::relay::ebpf::built_in() {
            "true"
        } else {
            "false"
        };
        family(
            &mut e,
            "forwarder_build_info",
            "Always 1: the version and whether the kernel path is built in",
            MetricType::Gauge,
            [(
                vec![("version", env!("CARGO_PKG_VERSION")), ("ebpf", ebpf)],
                gauge(1),
            )],
        )
    }
}

/// The tunnel's families, for each side this process runs (`side` = `server` or
/// `agent`: one process can hold both); none when it runs neither.
fn encode_tunnel(e: &mut DescriptorEncoder) -> std::fmt::Result {
    use crate::tunnel::{self, LinkEvent};
    let server = tunnel::server::registry().map(|r| r.metrics());
    let agent = tunnel::agent::metrics();
    let mut sides = Vec::new();
    if let Some((_, streams)) = &server {
        sides.push(("server", &tunnel::SERVER_LINK_EVENTS, *streams));
    }
    if let Some((_, streams)) = &agent {
        sides.push(("agent", &tunnel::AGENT_LINK_EVENTS, *streams));
    }
    if sides.is_empty() {
        return Ok(());
    }
    if let Some((agents, _)) = &server {
        family(
            e,
            "forwarder_tunnel_agents",
            "Agents connected (their link up) offering the service, for each service a rule serves",
            MetricType::Gauge,
            agents.iter().map(|(service, n)| {
                (
                    vec![("service", service.as_str())],
                    ConstGauge::new(*n as i64),
                )
            }),
        )?;
    }
    if let Some((up, _)) = agent {
        family(
            e,
            "forwarder_tunnel_link_up",
            "1 while this agent's link to its server is up",
            MetricType::Gauge,
            [(vec![], ConstGauge::new(i64::from(up)))],
        )?;
    }
    let mut events = Vec::new();
    let mut streams = Vec::new();
    for (side, counts, open) in &sides {
        for ev in LinkEvent::ALL {
            events.push((
                vec![("side", *side), ("event", ev.as_str())],
                ConstCounter::new(counts.get(ev)),
            ));
        }
        for (state, n) in [("attached", open.attached), ("waiting", open.waiting)] {
            streams.push((
                vec![("side", *side), ("state", state)],
                ConstGauge::new(n as i64),
            ));
        }
    }
    family(
        e,
        "forwarder_tunnel_link_events",
        "Link events as logged: connected, lost, resumed, grace_expired",
        MetricType::Counter,
        events,
    )?;
    family(
        e,
        "forwarder_tunnel_streams",
        "Tunnel streams open: attached (their link up) or waiting for it to resume",
        MetricType::Gauge,
        streams,
    )?;
    family(
        e,
        "forwarder_tunnel_retained_bytes",
        "Bytes held until the peer acknowledges them (what a link loss would replay), every stream and side of this process",
        MetricType::Gauge,
        [(vec![], ConstGauge::new(tunnel::stream::retained() as i64))],
    )
}

/// Whether `Accept` prefers OpenMetrics to the Prometheus text format: an
/// `application/openmetrics-text` entry with a q above 0 and at least that of
/// `text/plain` (or of `text/*`, `*/*` when text/plain is not named). Media types
/// compare case-insensitively; q defaults to 1. Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1`.
fn prefers_openmetrics(accept: &str) -> bool {
    // The highest q of the entries naming `media` (None when none does).
    let q_of = |media: &str| -> Option<f32> {
        accept
            .split(',')
            .filter_map(|entry| {
                let mut parts = entry.split(';');
                let named = parts.next()?.trim().eq_ignore_ascii_case(media);
                let q = parts
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                    .map_or(Some(1.0), |(_, v)| v.trim().parse::<f32>().ok())?;
                named.then_some(q)
            })
            .reduce(f32::max)
    };
    let text = q_of("text/plain")
        .or_else(|| q_of("text/*"))
        .or_else(|| q_of("*/*"));
    q_of("application/openmetrics-text").is_some_and(|q| q > 0.0 && text.is_none_or(|t| q >= t))
}

/// The exposition in the format the scraper asked for (`Accept`), with its
/// content type: OpenMetrics when it prefers it, Prometheus text 0.0.4 otherwise.
pub fn render(metrics: &Arc<Metrics>, accept: &str) -> (String, &'static str) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Collect(metrics.clone())));
    let mut out = String::new();
    if prefers_openmetrics(accept) {
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        (
            out,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        (
            out,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    }
}

/// Binds the metrics endpoint (before privileges are dropped) ...
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} (global.metrics)"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Scrape connections open at once.
pub const METRICS_CONNECTIONS: usize = 64;
/// How long a scrape connection may take to send a request's head.
pub const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// ... and serves `GET /metrics` (and `HEAD`) on it for the life of the process; other
/// methods get 405, other paths 404.
///
/// At most [`METRICS_CONNECTIONS`] connections at once, each closed when a request's
/// head (the first, or the next on a kept-alive connection) takes longer than
/// [`METRICS_HEADER_TIMEOUT`], as nginx's `client_header_timeout` and HAProxy's
/// `timeout http-request` do.
pub async fn serve(listener: std::net::TcpListener, metrics: Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    use hyper::{Method, Request, Response, StatusCode};

    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return tracing::error!("metrics: cannot serve: {e}"),
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("metrics: serving http://{addr}/metrics");
    }
    // Scrapers at once; more are closed at once. With `header_read_timeout`, a
    // connection that never sends its request (or its next one) cannot keep an fd:
    // idle ones once took every fd the rules needed to accept (audit).
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("metrics: {METRICS_CONNECTIONS} connections open, closing a new one");
            continue;
        };
        let metrics = metrics.clone();
        let handler = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let metrics = metrics.clone();
            async move {
                let metrics_path = req.uri().path() == "/metrics";
                let read = req.method() == Method::GET || req.method() == Method::HEAD;
                // (hyper sends no body in answer to HEAD, and keeps its length.)
                let resp = if metrics_path && read {
                    let accept = req
                        .headers()
                        .get(hyper::header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let (body, content_type) = render(&metrics, accept);
                    Response::builder()
                        .header(hyper::header::CONTENT_TYPE, content_type)
                        .body(Full::new(Bytes::from(body)))
                } else if metrics_path {
                    Response::builder()
                        .status(StatusCode::METHOD_NOT_ALLOWED)
                        .header(hyper::header::ALLOW, "GET, HEAD")
                        .body(Full::new(Bytes::from_static(
                            b"method not allowed: GET /metrics\n",
                        )))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
                };
                Ok::<_, std::convert::Infallible>(resp.expect("a valid response"))
            }
        });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(METRICS_HEADER_TIMEOUT)
                .serve_connection(io, handler)
                .await
            {
                tracing::debug!("metrics: connection failed: {e}");
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::prefers_openmetrics;

    #[test]
    fn accept_picks_the_format_the_scraper_prefers() {
        for (accept, om) in [
            // What Prometheus sends.
            (
                "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                true,
            ),
            ("application/openmetrics-text; version=1.0.0", true),
            ("Application/OpenMetrics-Text", true),
            ("application/openmetrics-text, text/plain", true),
            ("", false),
            ("*/*", false),
            ("text/plain", false),
            // q=0 is "not acceptable".
            ("application/openmetrics-text;q=0", false),
            ("application/openmetrics-text;q=0.0, */*", false),
            ("text/plain;q=0.9, application/openmetrics-text;q=0.5", false),
            ("application/openmetrics-text;q=0.5, */*;q=0.9", false),
            ("application/openmetrics-text;q=0.5, */*;q=0.1", true),
            // A q that is no number is no entry.
            ("application/openmetrics-text;q=x", false),
        ] {
            assert_eq!(prefers_openmetrics(accept), om, "{accept:?}");
        }
    }
}
