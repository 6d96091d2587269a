//! Prometheus metrics through the real binary: `/metrics` read with curl, checked by
//! promtool and scraped by a real Prometheus; byte counters compared exactly with
//! sha256-checked transfers. Each test runs on both relay paths.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::*;
use prometheus_parse::{LineInfo, Value};

// ---------------------------------------------------------------------------------
// Addresses, clients, processes
// ---------------------------------------------------------------------------------

/// A free address on a loopback IP of its own (127.91.x.y, used by nothing but this
/// file), so the port picked here cannot be taken meanwhile by another test's
/// listener or outgoing connection on 127.0.0.1.
fn unique_addr() -> SocketAddr {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let ip = Ipv4Addr::new(
        127,
        91,
        (std::process::id() % 256) as u8,
        (n % 250) as u8 + 1,
    );
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().unwrap()
}

/// The source address of the clients whose address must never show up in a label.
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 13, 37);

/// Connects to `to` from `src` (port 0), with the harness's timeouts.
fn connect_from(src: IpAddr, to: SocketAddr) -> TcpStream {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    sock.bind(&SocketAddr::new(src, 0).into())
        .unwrap_or_else(|e| panic!("bind {src}:0: {e}"));
    sock.connect_timeout(&to.into(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {src} -> {to}: {e}"));
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A sha256-checked echo of `p` through `to` from `src`, after a one-byte round trip
/// (so on the kernel path the payload and FIN travel on the pair's own path).
/// Returns the bytes the pair moved each way.
fn echo_from(src: IpAddr, to: SocketAddr, p: Payload) -> u64 {
    let s = connect_from(src, to);
    ping(&s, b"!", Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("first round trip via {to}: {e}"));
    let got = exchange(&s, p, Instant::now() + Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("echo of {} bytes via {to}: {e}", p.len));
    assert_eq!(got, Digested::of(&p), "echoed bytes differ");
    p.len + 1
}

/// Connects to `to` and waits (sending nothing) for the forwarder to end the
/// connection, which a refused client may see as a reset already while connecting
/// (before a socket option can be set). Err if it stays open or sends data.
fn connect_and_wait_end(to: SocketAddr, timeout: Duration) -> Result<Ending, String> {
    let s = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(Ending::Reset),
        Err(e) => return Err(format!("connect to {to}: {e}")),
    };
    wait_closed(&s, timeout).map(|(ending, _)| ending)
}

/// How a command run to completion ended, with its exact output.
struct Captured {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `cmd` to completion, feeding `stdin` (if any) and keeping stdout byte for
/// byte; kills it (by its guard) if it takes longer than `timeout`.
fn run_capture(mut cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Captured {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = ChildGuard::spawn(cmd, &desc);
    if let (Some(mut w), Some(data)) = (child.child_mut().stdin.take(), stdin) {
        // A thread, so a child that does not read cannot block us past the timeout.
        thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let read_all = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = read_all(Box::new(child.child_mut().stdout.take().unwrap()));
    let err = read_all(Box::new(child.child_mut().stderr.take().unwrap()));
    let Some(status) = child.wait_timeout(timeout) else {
        child.kill();
        panic!("{desc} did not exit within {timeout:?}");
    };
    Captured {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&err.join().expect("stderr reader")).into_owned(),
    }
}

/// An HTTP response as curl printed it (`-D -`: the head, then the body).
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> &str {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }
}

/// `curl -sS -D - [extra...] URL`.
fn curl(url: &str, extra: &[&str]) -> Response {
    let mut cmd = command("curl");
    cmd.args(["-sS", "-D", "-", "--max-time", "10"])
        .args(extra)
        .arg(url);
    let out = run_capture(cmd, None, Duration::from_secs(15));
    assert!(
        out.status.success(),
        "curl {url} failed ({}): {}",
        describe_status(&out.status),
        out.stderr
    );
    let text = String::from_utf8(out.stdout).expect("curl output is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of the head in curl's output: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

/// `promtool check metrics` with `text` on its stdin; must exit 0.
fn promtool_check(text: &str) {
    let mut cmd = command("/usr/bin/promtool");
    cmd.args(["check", "metrics"]);
    let out = run_capture(cmd, Some(text.as_bytes().to_vec()), Duration::from_secs(20));
    assert!(
        out.status.success(),
        "promtool check metrics: {}\nstdout: {}\nstderr: {}\ninput:\n{text}",
        describe_status(&out.status),
        String::from_utf8_lossy(&out.stdout),
        out.stderr
    );
}

// ---------------------------------------------------------------------------------
// The exposition, parsed
// ---------------------------------------------------------------------------------

/// One series: metric name and its labels (sorted by name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    name: String,
    labels: Vec<(String, String)>,
}

impl Series {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A scrape: every sample line of the text, by series.
struct Scrape {
    samples: BTreeMap<Series, f64>,
    text: String,
}

/// Parses the exposition with `prometheus-parse`; panics, naming the line, on a
/// line it would skip (it reports none), on labels it did not read whole, and on
/// a duplicate series.
fn parse_exposition(text: &str) -> Scrape {
    let lines = text.lines().map(|l| Ok::<_, io::Error>(l.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("lines from memory");
    let sample_lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    // No histogram or summary here, so one sample per line, in the text's order.
    assert_eq!(
        parsed.samples.len(),
        sample_lines.len(),
        "prometheus-parse skipped or merged sample lines:\n{text}"
    );
    let mut samples = BTreeMap::new();
    for (line, sample) in sample_lines.into_iter().zip(parsed.samples) {
        let bad = |why: &str| -> ! { panic!("bad sample line ({why}): {line:?}\n{text}") };
        let LineInfo::Sample {
            metric_name,
            labels: label_text,
            ..
        } = LineInfo::parse(line)
        else {
            bad("not a sample")
        };
        if sample.metric != metric_name {
            bad("parsed as another line");
        }
        let value = match sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            other => bad(&format!("unexpected {other:?}")),
        };
        // The crate drops pairs it cannot split and does not need quotes: each pair
        // must be in the text as `k="v"`, and together (with commas) fill it.
        let label_text = label_text.map_or("", |t| t.strip_suffix(',').unwrap_or(t));
        let pairs: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        if pairs.iter().any(|p| !label_text.contains(p.as_str()))
            || pairs.join(",").len() != label_text.len()
        {
            bad("labels not read whole");
        }
        let mut labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let series = Series {
            name: sample.metric,
            labels,
        };
        if samples.insert(series, value).is_some() {
            bad("duplicate series");
        }
    }
    Scrape {
        samples,
        text: text.to_string(),
    }
}

impl Scrape {
    /// The value of the series with exactly these labels, if present.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        want.sort();
        self.samples
            .get(&Series {
                name: name.to_string(),
                labels: want,
            })
            .copied()
    }

    /// The value of that series as a whole number; panics (showing the scrape) if the
    /// series is missing or not integral.
    fn u(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self
            .get(name, labels)
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in:\n{}", self.text));
        assert!(
            v >= 0.0 && v.fract() == 0.0,
            "{name}{labels:?} = {v}, not a count"
        );
        v as u64
    }

    fn bytes(&self, rule: &str) -> [u64; 2] {
        let b = |d| self.u("forwarder_bytes_total", &[("rule", rule), ("direction", d)]);
        [b("to_upstream"), b("to_client")]
    }

    fn rule_series(&self, rule: &str) -> Vec<&Series> {
        self.samples
            .keys()
            .filter(|s| s.label("rule") == Some(rule))
            .collect()
    }

    /// No label carries an address: no value parses as an IP address, none contains
    /// `client` (the clients' source IP), and only the contract's label names occur.
    fn assert_no_client_labels(&self, client: IpAddr) {
        let known = [
            "rule",
            "path",
            "direction",
            "reason",
            "upstream",
            "result",
            "version",
            "ebpf",
        ];
        let client = client.to_string();
        assert!(!self.samples.is_empty(), "empty scrape");
        for s in self.samples.keys() {
            for (k, v) in &s.labels {
                assert!(known.contains(&k.as_str()), "unexpected label {k} on {s:?}");
                assert!(
                    v.parse::<IpAddr>().is_err(),
                    "label {k}={v:?} of {} is an IP address",
                    s.name
                );
                assert!(
                    !v.contains(&client),
                    "label {k}={v:?} of {} carries the client address {client}",
                    s.name
                );
            }
        }
        assert!(
            !self.text.contains(&client),
            "the client address {client} appears in the exposition:\n{}",
            self.text
        );
    }
}

/// GET /metrics (Prometheus text), checked to be a 200; parsed.
fn scrape(metrics: SocketAddr) -> Scrape {
    let r = curl(&format!("http://{metrics}/metrics"), &[]);
    assert_eq!(r.status, 200, "GET /metrics: {}", r.body);
    parse_exposition(&r.body)
}

/// Scrapes until `done` holds for a scrape (every `step`, at most `timeout`); returns
/// that scrape, or panics with the last one and `what`.
fn scrape_until(
    metrics: SocketAddr,
    timeout: Duration,
    what: &str,
    done: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + timeout;
    let step = Duration::from_millis(100);
    let max_tries = (timeout.as_millis() / step.as_millis()) as usize + 1;
    let mut last = None;
    for _ in 0..max_tries {
        let s = scrape(metrics);
        if done(&s) {
            return s;
        }
        last = Some(s);
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(step);
    }
    panic!(
        "{what}: not seen within {timeout:?}; last scrape:\n{}",
        last.map(|s| s.text).unwrap_or_default()
    );
}

/// `[global] metrics = ...` plus one echo rule per `(name, upstream)`.
fn config(metrics: SocketAddr, rules: &[(&str, SocketAddr)]) -> String {
    let mut text = format!("[global]\nmetrics = \"{metrics}\"\n");
    for (name, up) in rules {
        text.push_str(&format!(
            "\n[[rule]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{up}\"\n"
        ));
    }
    text
}

fn other_path(mode: Mode) -> &'static str {
    match mode {
        Mode::Splice => "ebpf",
        Mode::Ebpf => "splice",
    }
}

/// Waits for the close line of rule `rule` (the `n`th of that rule).
fn wait_rule_closes(fwd: &Forwarder, rule: &str, n: usize) -> Vec<String> {
    let needle = format!(" close rule={rule} ");
    let got: Vec<String> = fwd
        .stderr
        .wait_for_n(n, Duration::from_secs(10), |l| as_text(l).contains(&needle))
        .iter()
        .map(|l| as_text(l))
        .collect();
    assert_eq!(
        got.len(),
        n,
        "close lines of rule {rule}; stderr:\n{}",
        fwd.stderr.text()
    );
    got
}

const SECOND: Duration = Duration::from_secs(1);

relay_tests! {
    /// The endpoint's text is valid (promtool), exact, and never names a client.
    fn metrics_endpoint_serves_valid_text(mode) {
        let _g = light();
        let up = Server::echo();
        let maddr = unique_addr();
        let fwd = Forwarder::config(Some(mode), &config(maddr, &[("web", up.addr())]), 1);
        fwd.assert_mode(mode);
        let client = IpAddr::V4(CLIENT_IP);
        let payloads = [
            Payload::new(11, 1),
            Payload::new(12, 100_000),
            Payload::new(13, 512 * KIB),
        ];
        let moved: u64 = payloads
            .iter()
            .map(|p| echo_from(client, fwd.addr(), *p))
            .sum();
        let closes = wait_rule_closes(&fwd, "web", payloads.len());
        let logged: u64 = closes
            .iter()
            .map(|l| field(l, "bytes_up").unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(logged, moved, "close lines' bytes_up: {closes:#?}");

        let r = curl(&format!("http://{maddr}/metrics"), &[]);
        assert_eq!(r.status, 200, "{}", r.body);
        let ct = r.header("content-type");
        assert!(
            ct.starts_with("text/plain") && ct.contains("version=0.0.4"),
            "content type {ct:?}"
        );
        promtool_check(&r.body);
        let m = parse_exposition(&r.body);
        let web = |k: &'static str, v: &'static str| [("rule", "web"), (k, v)];
        assert_eq!(
            m.u("forwarder_connections_total", &web("path", mode.as_str())),
            payloads.len() as u64
        );
        assert_eq!(
            m.u(
                "forwarder_connections_total",
                &web("path", other_path(mode))
            ),
            0
        );
        assert_eq!(m.bytes("web"), [moved, moved], "bytes relayed");
        assert_eq!(m.u("forwarder_connections_active", &[("rule", "web")]), 0);
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            m.u(
                "forwarder_build_info",
                &[("version", version), ("ebpf", "true")]
            ),
            1
        );
        assert_eq!(
            m.u("forwarder_config_reloads_total", &[("result", "ok")]),
            0
        );
        assert_eq!(
            m.u("forwarder_config_reloads_total", &[("result", "error")]),
            0
        );
        for reason in [
            "acl",
            "schedule",
            "max_connections_per_source",
            "rate_per_source",
            "bad_proxy_header",
        ] {
            assert_eq!(m.u("forwarder_refused_total", &web("reason", reason)), 0);
        }
        let upstream = up.addr().to_string();
        let ups = [("rule", "web"), ("upstream", upstream.as_str())];
        assert_eq!(m.u("forwarder_upstream_connect_errors_total", &ups), 0);
        assert_eq!(m.u("forwarder_upstream_up", &ups), 1);
        m.assert_no_client_labels(client);

        let other = curl(&format!("http://{maddr}/other"), &[]);
        assert_eq!(other.status, 404, "GET /other: {}", other.body);
        // HEAD is GET without the body (curl --head prints the head again as its output);
        // another method is 405, naming the two.
        let head = curl(&format!("http://{maddr}/metrics"), &["--head"]);
        assert_eq!(head.status, 200, "HEAD /metrics: {}", head.body);
        assert!(head.header("content-type").starts_with("text/plain"), "HEAD: {:?}", head.headers);
        assert!(!head.body.contains("# HELP"), "HEAD /metrics sent a body: {}", head.body);
        let post = curl(&format!("http://{maddr}/metrics"), &["-X", "POST", "-d", "x"]);
        assert_eq!(post.status, 405, "POST /metrics: {}", post.body);
        assert_eq!(post.header("allow"), "GET, HEAD");
        // q=0 is "not acceptable": the text format.
        let refused = curl(
            &format!("http://{maddr}/metrics"),
            &["-H", "Accept: application/openmetrics-text;q=0, text/plain;q=0.5"],
        );
        assert!(refused.header("content-type").starts_with("text/plain"), "{:?}", refused.headers);

        let om = curl(
            &format!("http://{maddr}/metrics"),
            &["-H", "Accept: application/openmetrics-text; version=1.0.0"],
        );
        assert_eq!(om.status, 200, "{}", om.body);
        let ct = om.header("content-type");
        assert!(
            ct.starts_with("application/openmetrics-text"),
            "content type {ct:?}"
        );
        assert!(
            om.body.ends_with("\n# EOF\n") || om.body.ends_with("\n# EOF"),
            "OpenMetrics body does not end with # EOF:\n{}",
            om.body
        );
        let m = parse_exposition(&om.body);
        assert_eq!(
            m.u("forwarder_connections_total", &web("path", mode.as_str())),
            payloads.len() as u64
        );
        assert_eq!(
            m.bytes("web"),
            [moved, moved],
            "bytes relayed (OpenMetrics)"
        );
        m.assert_no_client_labels(client);
    }

    /// The byte counters follow a slow transfer while it runs, at most ~1 s behind
    /// what the client has already got back.
    fn bytes_move_while_transfer_runs(mode) {
        let _g = light();
        let up = Server::echo();
        let maddr = unique_addr();
        let fwd = Forwarder::config(Some(mode), &config(maddr, &[("slow", up.addr())]), 1);
        fwd.assert_mode(mode);

        const CHUNK: u64 = 64 * KIB;
        // At least this many chunks, then on until the scrapes below have their
        // samples (a scrape may take seconds when other tests load the host), at most
        // MAX_CHUNKS: the transfer lasts as long as the sampling needs.
        const CHUNKS: u64 = 40;
        const MAX_CHUNKS: u64 = 150;
        const SAMPLES: usize = 4;
        const PERIOD: Duration = Duration::from_millis(100);
        let s = connect(fwd.addr());
        ping(&s, b"!", Duration::from_secs(10)).expect("first round trip");
        let sent = AtomicU64::new(0);
        let received = AtomicU64::new(0);
        let sampled = std::sync::atomic::AtomicBool::new(false);

        /// One scrape taken while the client was still writing.
        struct Sample {
            at: Instant,
            seen_before: u64,
            sent_after: u64,
            bytes: [u64; 2],
            active: u64,
        }
        let (send_log, digest, samples) = thread::scope(|scope| {
            let writer = scope.spawn(|| -> io::Result<Vec<(Instant, u64)>> {
                let start = Instant::now();
                let mut buf = vec![0u8; CHUNK as usize];
                let mut log = Vec::with_capacity(CHUNKS as usize);
                let mut w = &s;
                for i in 0..MAX_CHUNKS {
                    if i >= CHUNKS && sampled.load(Ordering::SeqCst) {
                        break;
                    }
                    let due = start + PERIOD * i as u32;
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    Payload::new(21, CHUNK * MAX_CHUNKS).fill(i * CHUNK, &mut buf);
                    w.write_all(&buf)?;
                    let total = sent.fetch_add(CHUNK, Ordering::SeqCst) + CHUNK;
                    log.push((Instant::now(), total));
                }
                s.shutdown(Shutdown::Write)?;
                Ok(log)
            });
            let reader = scope.spawn(|| -> io::Result<Digested> {
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut h = Hasher::new();
                let mut len = 0;
                let mut buf = vec![0u8; 64 * KIB as usize];
                let mut r = &s;
                // Bounded by the deadline (each read times out at it).
                loop {
                    set_read_deadline(&s, deadline)?;
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => {
                            h.update(&buf[..n]);
                            len += n as u64;
                            received.store(len, Ordering::SeqCst);
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(Digested {
                    len,
                    sha: h.finish(),
                })
            });
            let mut samples = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            for _ in 0..30 {
                if samples.len() >= SAMPLES {
                    sampled.store(true, Ordering::SeqCst);
                }
                thread::sleep(Duration::from_millis(600));
                if writer.is_finished() || Instant::now() >= deadline {
                    break;
                }
                let at = Instant::now();
                let seen_before = received.load(Ordering::SeqCst);
                let m = scrape(maddr);
                let sent_after = sent.load(Ordering::SeqCst);
                // Still writing after the scrape: the pair was surely open during it.
                if writer.is_finished() {
                    break;
                }
                samples.push(Sample {
                    at,
                    seen_before,
                    sent_after,
                    bytes: m.bytes("slow"),
                    active: m.u("forwarder_connections_active", &[("rule", "slow")]),
                });
            }
            sampled.store(true, Ordering::SeqCst);
            let log = writer.join().expect("writer").expect("client writes");
            let digest = reader.join().expect("reader").expect("client reads");
            (log, digest, samples)
        });
        let p = Payload::new(21, sent.load(Ordering::SeqCst));
        assert_eq!(digest, Digested::of(&p), "echoed bytes differ");

        // What the client had sent by `t` (the ping's byte not counted).
        let sent_by = |t: Instant| {
            send_log
                .iter()
                .take_while(|(at, _)| *at <= t)
                .last()
                .map_or(0, |(_, n)| *n)
        };
        assert!(
            samples.len() >= 3,
            "only {} scrapes while the transfer ran",
            samples.len()
        );
        let mut report = String::new();
        for s in &samples {
            report.push_str(&format!(
                "+{:?}: seen {} sent {} bytes {:?} active {}\n",
                s.at.duration_since(samples[0].at),
                s.seen_before,
                s.sent_after,
                s.bytes,
                s.active
            ));
        }
        eprintln!("scrapes during the transfer:\n{report}");
        for (i, s) in samples.iter().enumerate() {
            assert_eq!(s.active, 1, "scrape {i} while the pair is open:\n{report}");
            // The ping's byte each way, then what the client sent: never more.
            for b in s.bytes {
                assert!(
                    b <= 1 + s.sent_after,
                    "scrape {i} counts unsent bytes:\n{report}"
                );
            }
            // Everything the client had got back was relayed both ways; the counters
            // may miss at most what was sent in the last second (plus a chunk on its
            // way at the boundary).
            let lag_allowed = sent_by(s.at) - sent_by(s.at - SECOND) + CHUNK;
            // The ping's byte, then the echo the client had read before the scrape.
            let seen = 1 + s.seen_before;
            for b in s.bytes {
                assert!(
                    b + lag_allowed >= seen,
                    "scrape {i}: counter {b} lags the {seen} bytes the client has seen by \
                     more than {lag_allowed}:\n{report}"
                );
            }
            if i > 0 {
                let prev = samples[i - 1].bytes;
                assert!(
                    s.bytes[0] > prev[0] && s.bytes[1] > prev[1],
                    "scrape {i}: the counters did not move while bytes flowed:\n{report}"
                );
            }
        }
        drop(s);
        wait_rule_closes(&fwd, "slow", 1);
        let m = scrape(maddr);
        assert_eq!(m.bytes("slow"), [p.len + 1, p.len + 1], "final bytes");
        assert_eq!(m.u("forwarder_connections_active", &[("rule", "slow")]), 0);
        assert_eq!(
            m.u(
                "forwarder_connections_total",
                &[("rule", "slow"), ("path", mode.as_str())]
            ),
            1
        );
    }

    /// Refused clients are counted by reason, failed upstream connects by upstream,
    /// and passive health marks the dead upstream down after `fall` failures.
    fn refusals_and_connect_errors_are_counted(mode) {
        let _g = light();
        let up = Server::echo();
        let (_reserved, dead) = refused_port(LOCALHOST);
        let maddr = unique_addr();
        const FALL: u64 = 2;
        let toml = format!(
            r#"[global]
metrics = "{maddr}"

[[rule]]
name = "denied"
listen = "127.0.0.1:0"
upstream = "{up}"
deny = ["127.0.0.0/8"]

[[rule]]
name = "limited"
listen = "127.0.0.1:0"
upstream = "{up}"
max_connections_per_source = 1

[[rule]]
name = "dead"
listen = "127.0.0.1:0"
upstream = "{dead}"
fall = {FALL}
"#,
            up = up.addr()
        );
        let fwd = Forwarder::config(Some(mode), &toml, 3);
        fwd.assert_mode(mode);
        // The only pair relayed is the one held open on "limited"; the default check
        // (at least one pair on the rule's mode) applies to it.

        // Denied by the rule's ACL: each client is reset.
        const DENIED: u64 = 4;
        for i in 0..DENIED {
            let ended = connect_and_wait_end(fwd.rule_addr("denied"), Duration::from_secs(5));
            assert!(ended.is_ok(), "denied client {i}: {ended:?}");
        }
        // Counted just after the reset is sent: wait for it, then it must be exact.
        let m = scrape_until(maddr, Duration::from_secs(5), "refused acl", |m| {
            m.u(
                "forwarder_refused_total",
                &[("rule", "denied"), ("reason", "acl")],
            ) >= DENIED
        });
        let refused = |m: &Scrape, rule: &str, reason: &str| {
            m.u(
                "forwarder_refused_total",
                &[("rule", rule), ("reason", reason)],
            )
        };
        assert_eq!(refused(&m, "denied", "acl"), DENIED);

        // One connection per source on "limited": hold one, the next ones are refused.
        const OVER: u64 = 3;
        let held = connect(fwd.rule_addr("limited"));
        ping(&held, b"!", Duration::from_secs(10)).expect("held connection's round trip");
        for i in 0..OVER {
            let ended = connect_and_wait_end(fwd.rule_addr("limited"), Duration::from_secs(5));
            assert!(
                ended.is_ok(),
                "client {i} over the per-source limit: {ended:?}"
            );
        }
        scrape_until(maddr, Duration::from_secs(5), "refused per source", |m| {
            refused(m, "limited", "max_connections_per_source") >= OVER
        });
        held.shutdown(Shutdown::Write).unwrap();
        let rest = read_to_end(&held, 16, Instant::now() + Duration::from_secs(10))
            .expect("held connection's end");
        assert!(rest.is_empty(), "unexpected bytes {rest:?}");
        drop(held);
        wait_rule_closes(&fwd, "limited", 1);

        // The dead upstream: every client makes one connect attempt (the only
        // upstream is still tried when marked down), counted before the client is
        // closed; passive health marks it down after `fall` consecutive failures.
        let dead_s = dead.to_string();
        let dead_labels = [("rule", "dead"), ("upstream", dead_s.as_str())];
        const ATTEMPTS: u64 = 4;
        for i in 1..=ATTEMPTS {
            let ended = connect_and_wait_end(fwd.rule_addr("dead"), Duration::from_secs(10));
            assert!(ended.is_ok(), "client {i} of the dead upstream: {ended:?}");
            let m = scrape(maddr);
            assert_eq!(
                m.u("forwarder_upstream_connect_errors_total", &dead_labels),
                i,
                "after {i} attempts:\n{}",
                m.text
            );
            let want_up = u64::from(i < FALL);
            assert_eq!(
                m.u("forwarder_upstream_up", &dead_labels),
                want_up,
                "after {i} failed connects (fall = {FALL}):\n{}",
                m.text
            );
        }
        assert!(
            fwd.stderr
                .wait_for(Duration::from_secs(2), |l| {
                    let l = as_text(l);
                    l.contains(" is DOWN ") && l.contains("rule=dead")
                })
                .is_some(),
            "no DOWN line for the dead upstream; stderr:\n{}",
            fwd.stderr.text()
        );

        let m = scrape(maddr);
        let reasons = [
            "acl",
            "schedule",
            "max_connections_per_source",
            "rate_per_source",
            "bad_proxy_header",
        ];
        for rule in ["denied", "limited", "dead"] {
            for reason in reasons {
                let want = match (rule, reason) {
                    ("denied", "acl") => DENIED,
                    ("limited", "max_connections_per_source") => OVER,
                    _ => 0,
                };
                assert_eq!(
                    refused(&m, rule, reason),
                    want,
                    "{rule}/{reason}:\n{}",
                    m.text
                );
            }
        }
        let upstream = up.addr().to_string();
        for rule in ["denied", "limited"] {
            let ups = [("rule", rule), ("upstream", upstream.as_str())];
            assert_eq!(m.u("forwarder_upstream_connect_errors_total", &ups), 0);
            assert_eq!(m.u("forwarder_upstream_up", &ups), 1);
        }
        let started = |rule: &str, path: &str| {
            m.u(
                "forwarder_connections_total",
                &[("rule", rule), ("path", path)],
            )
        };
        assert_eq!(started("limited", mode.as_str()), 1);
        for rule in ["denied", "dead"] {
            for path in ["splice", "ebpf"] {
                assert_eq!(started(rule, path), 0, "{rule} relayed nothing");
            }
            assert_eq!(m.bytes(rule), [0, 0]);
        }
        assert_eq!(m.bytes("limited"), [1, 1]);
        assert_eq!(
            m.u("forwarder_upstream_connect_errors_total", &dead_labels),
            ATTEMPTS
        );
        assert_eq!(m.u("forwarder_upstream_up", &dead_labels), 0);
    }

    /// A rule removed by a reload keeps its series while its last connection runs;
    /// they vanish once it closes, the other rule's stay.
    fn upstream_connections_active_counts_each_upstreams_open_pairs(mode) {
        // Round robin over two echo upstreams: three pairs held open are two on one
        // and one on the other, and the gauge says so per upstream until they close.
        let (a, b) = (Server::echo(), Server::echo());
        let maddr = unique_addr();
        let toml = format!(
            "[global]\nmetrics = \"{maddr}\"\n\n[[rule]]\nname = \"rr\"\nlisten = \"127.0.0.1:0\"\nupstream = [\"{}\", \"{}\"]\nbalance = \"round_robin\"\n",
            a.addr(),
            b.addr()
        );
        let fwd = Forwarder::config(Some(mode), &toml, 1);
        fwd.assert_mode(mode);
        let (ua, ub) = (a.addr().to_string(), b.addr().to_string());
        let open = |m: &Scrape, u: &str| m.u("forwarder_upstream_connections_active", &[("rule", "rr"), ("upstream", u)]);
        let held: Vec<TcpStream> = (0..3)
            .map(|i| {
                let s = connect(fwd.rule_addr("rr"));
                ping(&s, b"!", Duration::from_secs(10)).unwrap_or_else(|e| panic!("pair {i}: {e}"));
                s
            })
            .collect();
        let m = scrape(maddr);
        let mut counts = [open(&m, &ua), open(&m, &ub)];
        counts.sort();
        assert_eq!(counts, [1, 2], "open pairs per upstream");
        assert_eq!(m.u("forwarder_connections_active", &[("rule", "rr")]), 3);
        drop(held);
        wait_rule_closes(&fwd, "rr", 3);
        let m = scrape_until(maddr, Duration::from_secs(3), "no pair open", |m| open(m, &ua) + open(m, &ub) == 0);
        assert_eq!([open(&m, &ua), open(&m, &ub)], [0, 0]);
    }

    fn removed_rule_series_disappear_after_last_connection(mode) {
        let _g = light();
        let up = Server::echo();
        let maddr = unique_addr();
        let both = config(maddr, &[("keep", up.addr()), ("gone", up.addr())]);
        let only_keep = config(maddr, &[("keep", up.addr())]);
        let mut fwd = Forwarder::config(Some(mode), &both, 2);
        fwd.assert_mode(mode);

        let pa = Payload::new(41, 200 * KIB);
        echo_check_paired(fwd.rule_addr("keep"), pa, Duration::from_secs(30));
        let keep_bytes = pa.len + 1;
        wait_rule_closes(&fwd, "keep", 1);

        // Half of B's echo, then the reload.
        let pb = Payload::new(42, 256 * KIB);
        let half = pb.len / 2;
        let s = connect(fwd.rule_addr("gone"));
        ping(&s, b"!", Duration::from_secs(10)).expect("first round trip on gone");
        let mut buf = vec![0u8; half as usize];
        pb.fill(0, &mut buf);
        (&s).write_all(&buf).expect("first half");
        let back = read_exact_timeout(&s, half as usize, Duration::from_secs(10))
            .expect("first half echoed");
        assert!(back == buf, "first half echoed wrong");
        let mut h = Hasher::new();
        h.update(&back);

        let line = fwd.reload(&only_keep);
        assert!(
            line.contains("reload ok")
                && line.contains("removed=[gone]")
                && line.contains("unchanged=1"),
            "{line}"
        );
        let open = half + 1;
        let m = scrape_until(maddr, Duration::from_secs(3), "gone's open bytes", |m| {
            m.get(
                "forwarder_bytes_total",
                &[("rule", "gone"), ("direction", "to_client")],
            ) == Some(open as f64)
        });
        assert_eq!(m.bytes("gone"), [open, open], "gone's bytes while open");
        assert_eq!(m.u("forwarder_connections_active", &[("rule", "gone")]), 1);
        assert_eq!(
            m.u(
                "forwarder_connections_total",
                &[("rule", "gone"), ("path", mode.as_str())]
            ),
            1
        );
        assert!(m
            .get(
                "forwarder_refused_total",
                &[("rule", "gone"), ("reason", "acl")]
            )
            .is_some());
        assert_eq!(m.bytes("keep"), [keep_bytes, keep_bytes]);
        assert_eq!(
            m.u("forwarder_config_reloads_total", &[("result", "ok")]),
            1
        );
        let keep_series: Vec<Series> = m.rule_series("keep").into_iter().cloned().collect();

        // Finish B's transfer.
        pb.fill(half, &mut buf);
        (&s).write_all(&buf).expect("second half");
        s.shutdown(Shutdown::Write).unwrap();
        let got = read_digest_from(&s, h, half, Instant::now() + Duration::from_secs(30))
            .expect("rest of the echo");
        assert_eq!(got, Digested::of(&pb), "echoed bytes differ");
        drop(s);
        let close = wait_rule_closes(&fwd, "gone", 1);
        assert_eq!(
            field(&close[0], "bytes_up"),
            Some((pb.len + 1).to_string().as_str())
        );

        // The series go with the connection (just after its close line is logged).
        let m = scrape_until(
            maddr,
            Duration::from_secs(5),
            "gone's series removed",
            |m| m.rule_series("gone").is_empty(),
        );
        let now: Vec<Series> = m.rule_series("keep").into_iter().cloned().collect();
        assert_eq!(now, keep_series, "keep's series changed");
        assert_eq!(m.bytes("keep"), [keep_bytes, keep_bytes]);
        assert_eq!(
            m.u(
                "forwarder_connections_total",
                &[("rule", "keep"), ("path", mode.as_str())]
            ),
            1
        );
        assert_eq!(m.u("forwarder_connections_active", &[("rule", "keep")]), 0);
    }

    /// A real Prometheus scrapes the endpoint and its query API returns the exact
    /// byte counts.
    fn real_prometheus_scrapes_and_queries(mode) {
        let _g = light();
        let up = Server::echo();
        let maddr = unique_addr();
        let fwd = Forwarder::config(Some(mode), &config(maddr, &[("prom", up.addr())]), 1);
        fwd.assert_mode(mode);

        let dir = TempDir::new("prometheus");
        let cfg = dir.write(
            "prometheus.yml",
            &format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: forwarder\n    static_configs:\n      - targets: ['{maddr}']\n"
            ),
        );
        let papi = unique_addr();
        let mut cmd = command("/usr/bin/prometheus");
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={papi}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut prom = ChildGuard::spawn(cmd, "prometheus");
        let prom_log = Lines::collect(prom.child_mut().stderr.take().unwrap());

        // One instant query: (labels, value) per series; None while not answering.
        let query = |q: &str| -> Option<Vec<(BTreeMap<String, String>, f64)>> {
            let mut cmd = command("curl");
            cmd.args(["-sS", "--max-time", "5", "-G", "--data-urlencode"])
                .arg(format!("query={q}"))
                .arg(format!("http://{papi}/api/v1/query"));
            let out = run_capture(cmd, None, Duration::from_secs(10));
            if !out.status.success() {
                return None;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            if v["status"] != "success" {
                return None;
            }
            let result = v["data"]["result"].as_array()?;
            Some(
                result
                    .iter()
                    .map(|r| {
                        let labels = r["metric"]
                            .as_object()
                            .map(|o| {
                                o.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let value = r["value"][1]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(f64::NAN);
                        (labels, value)
                    })
                    .collect(),
            )
        };
        // forwarder_bytes_total of rule "prom" per direction, once both are in.
        let bytes = || -> Option<[f64; 2]> {
            let rows = query("forwarder_bytes_total{rule=\"prom\"}")?;
            let of = |d: &str| {
                rows.iter()
                    .find(|(l, _)| l.get("direction").map(String::as_str) == Some(d))
                    .map(|(_, v)| *v)
            };
            Some([of("to_upstream")?, of("to_client")?])
        };
        let up_is_1 = || {
            query("up{job=\"forwarder\"}").is_some_and(|rows| {
                rows.len() == 1
                    && rows[0].1 == 1.0
                    && rows[0].0.get("instance") == Some(&maddr.to_string())
            })
        };
        let mut wait = |what: &str, done: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            for _ in 0..100 {
                if done() {
                    return;
                }
                if let Some(s) = prom.try_status() {
                    panic!(
                        "prometheus exited ({}):\n{}",
                        describe_status(&s),
                        prom_log.text()
                    );
                }
                if Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(200));
            }
            panic!(
                "{what}: not seen within 20 s; prometheus log:\n{}",
                prom_log.text()
            );
        };

        // Scraped before any traffic: the target is up and the counters are 0.
        wait("first scrape", &|| up_is_1() && bytes() == Some([0.0, 0.0]));

        let payloads = [Payload::new(51, 300 * KIB), Payload::new(52, 7)];
        let mut moved = 0;
        for p in payloads {
            echo_check_paired(fwd.addr(), p, Duration::from_secs(30));
            moved += p.len + 1;
        }
        wait_rule_closes(&fwd, "prom", payloads.len());
        let want = [moved as f64, moved as f64];
        wait("bytes relayed in Prometheus", &|| bytes() == Some(want));
        let rows = query(&format!(
            "forwarder_connections_total{{rule=\"prom\",path=\"{}\"}}",
            mode.as_str()
        ))
        .expect("connections query");
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].1, payloads.len() as f64, "{rows:?}");
        assert!(up_is_1(), "the target is no longer up");
        prom.kill();
    }
}

/// A connection to the metrics address that never sends its request is closed after
/// the endpoint's 10 s header timeout (nginx's `client_header_timeout`, HAProxy's
/// `timeout http-request`), and scrapes go on meanwhile. Before (audit) such
/// connections stayed open for ever, uncapped, until they held every fd the rules
/// needed to accept.
#[test]
fn idle_scrape_connections_are_closed() {
    let _g = light();
    let up = Server::echo();
    let maddr = unique_addr();
    let fwd = Forwarder::config(Some(Mode::Splice), &config(maddr, &[("r", up.addr())]), 1);
    let t0 = Instant::now();
    let idle: Vec<TcpStream> = (0..3)
        .map(|_| {
            TcpStream::connect_timeout(&maddr, Duration::from_secs(5)).expect("connect to /metrics")
        })
        .collect();
    // One that sent half a request head is no different.
    (&idle[2]).write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
    let s = scrape(maddr);
    assert!(
        s.get("forwarder_connections_active", &[("rule", "r")])
            .is_some(),
        "a scrape while idle ones wait"
    );
    for (i, c) in idle.iter().enumerate() {
        wait_closed(c, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("idle scrape connection {i}: {e}"));
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(9),
        "closed after {took:?}, before the 10 s timeout"
    );
    echo_from(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        fwd.addr(),
        Payload::new(7, 1024),
    );
}
