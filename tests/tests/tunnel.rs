//! The reverse tunnel (issue 10), through the real binary on both relay paths
//! (`splice::NAME`, `ebpf::NAME`): a public forwarder (`[tunnel_server]` and a rule
//! with `upstream = "agent:web"`) that visitors connect to, and an agent that dials out
//! to it and connects each visitor to its target.
//!
//! The link faults are real: the agent and its target run in a network namespace
//! joined to the root namespace (server and visitors) by a veth pair, which the tests
//! blackhole (a zero-length pfifo on both ends), reset (`ss -K`) or renumber.
//!
//! Every visitor speaks a small protocol to the targets written here: a 41-byte
//! header (operation, the payload the visitor sends, the payload the target sends,
//! a rate) and then the operation; targets hash what they receive and report it.

use std::ffi::OsString;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use forwarder_tests::dumps::{dump_file, stream};
use forwarder_tests::netns::{sh, wait_until, NetNs, Proc};
use forwarder_tests::*;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const TOKEN: &str = "tunnel-test-token-6f1c2a9e4b7d";

// ---------------------------------------------------------------------------------
// The target protocol
// ---------------------------------------------------------------------------------

/// Both ways at once: each side sends its payload (paced at `rate` bytes/s when
/// non-zero), shuts its write side, and reads the other's to EOF.
const BOTH: u8 = b'B';
/// As [`BOTH`], but each side writes in [`PIECES`] with TCP_NODELAY: many small skbs,
/// each of which takes a pipe slot of its own in the relay and retention pipes.
const CHAT: u8 = b'C';
/// Write sizes of a [`CHAT`], in turn: from one byte to a little over two pages.
const PIECES: [usize; 8] = [1, 64, 300, 1448, 4095, 4096, 4097, 9000];
/// The visitor sends its payload and shuts its write side; only after EOF the target
/// answers `"<sha256 hex> <len>\n"`, then sends its payload and closes.
const UPLOAD_FIRST: u8 = b'U';
/// The target sends its payload and shuts its write side; the visitor reads to EOF,
/// and only then sends its payload and shuts its write side.
const DOWNLOAD_FIRST: u8 = b'D';
/// The target echoes until the connection ends and reports how it ended.
const HOLD: u8 = b'H';
/// The target sends `+`, waits for a `k`, then resets the connection.
const RESET: u8 = b'R';
/// As [`UPLOAD_FIRST`], but the target reads nothing for `rate` milliseconds first.
const SLOW: u8 = b'S';

const HEADER_LEN: usize = 41;

#[derive(Debug, Clone, Copy)]
struct Job {
    op: u8,
    /// What the visitor sends.
    up: Payload,
    /// What the target sends.
    down: Payload,
    rate: u64,
}

impl Job {
    fn new(op: u8, up: Payload, down: Payload) -> Job {
        Job {
            op,
            up,
            down,
            rate: 0,
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = self.op;
        let nums = [
            self.up.seed,
            self.up.len,
            self.down.seed,
            self.down.len,
            self.rate,
        ];
        for (i, v) in nums.iter().enumerate() {
            h[1 + 8 * i..9 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    fn decode(h: &[u8]) -> Job {
        let n = |i: usize| u64::from_le_bytes(h[1 + 8 * i..9 + 8 * i].try_into().unwrap());
        Job {
            op: h[0],
            up: Payload::new(n(0), n(1)),
            down: Payload::new(n(2), n(3)),
            rate: n(4),
        }
    }
}

/// What a target saw of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    /// The bytes it received up to EOF.
    Got(Digested),
    /// How a [`HOLD`] connection ended.
    Ended(Ending),
    Failed(String),
}

#[derive(Debug)]
struct Report {
    job: Job,
    seen: Seen,
}

/// A target server (on 127.0.0.1 of the namespace of the thread that starts it).
struct Target {
    server: Server,
    reports: Mutex<mpsc::Receiver<Report>>,
    /// Bytes received by every connection together.
    received: Arc<AtomicU64>,
}

impl Target {
    fn start() -> Target {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let received = Arc::new(AtomicU64::new(0));
        let r = received.clone();
        let server = Server::start(LOCALHOST, move |conn| {
            let tx = tx.lock().unwrap().clone();
            serve(&conn, &tx, &r);
        });
        Target {
            server,
            reports: Mutex::new(rx),
            received,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }

    /// The next report, waiting up to `timeout`.
    fn report(&self, timeout: Duration) -> Report {
        self.reports
            .lock()
            .unwrap()
            .recv_timeout(timeout)
            .unwrap_or_else(|_| {
                panic!(
                    "no report from the target within {timeout:?} ({} connections accepted, \
                     {} bytes received by all of them)",
                    self.server.accepted(),
                    self.received()
                )
            })
    }

    /// `n` reports, waiting up to `timeout` for all of them.
    fn reports(&self, n: usize, timeout: Duration) -> Vec<Report> {
        let deadline = Instant::now() + timeout;
        let rx = self.reports.lock().unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(_) => panic!(
                    "{} of {n} target reports within {timeout:?} ({} connections accepted, \
                     {} bytes received by all of them): {out:?}",
                    out.len(),
                    self.server.accepted(),
                    self.received()
                ),
            }
        }
        out
    }
}

/// A token file in `dir`, a target, and a server on loopback from a config file
/// (`server_toml` with these extra keys).
fn on_loopback(
    mode: Mode,
    dir: &TempDir,
    server_extra: &str,
    rule_extra: &str,
) -> (PathBuf, Target, TunnelServer) {
    let token = token_file(dir, "token", TOKEN);
    let target = Target::start();
    let server = TunnelServer::config(
        mode,
        &server_toml("127.0.0.1:0", &token, server_extra, rule_extra),
    );
    (token, target, server)
}

/// A target and its agent in a new network namespace, and a server in the root
/// namespace that the agent reaches over the veth pair (`server_toml` with these extra
/// keys); the agent connected. Bind the fields in declaration order: they drop in the
/// reverse, processes before the namespace.
struct InNetns {
    _dir: TempDir,
    ns: NetNs,
    target: Target,
    server: TunnelServer,
    agent: Proc,
    /// The agent's session.
    session: String,
}

fn in_netns(mode: Mode, server_extra: &str, rule_extra: &str) -> InNetns {
    let ns = NetNs::new();
    let target = ns.run(Target::start);
    let dir = TempDir::new("tunnel");
    let token = token_file(&dir, "token", TOKEN);
    let tunnel_listen = format!("{}:0", ns.host_ip());
    let server = TunnelServer::config(
        mode,
        &server_toml(&tunnel_listen, &token, server_extra, rule_extra),
    );
    assert_eq!(server.tunnel.ip(), ns.host_ip(), "tunnel address");
    let agent = agent_config(server.tunnel, target.addr(), &token, Some(&ns));
    let session = wait_connected(&server, &agent, 1);
    InNetns {
        _dir: dir,
        ns,
        target,
        server,
        agent,
        session,
    }
}

/// No session started: a visitor is closed with `end=no_agent`, and the target was
/// never reached.
fn assert_no_agent_got_in(server: &TunnelServer, target: &Target) {
    let s = connect(server.visitors);
    let visitor = s.local_addr().unwrap();
    wait_closed(&s, secs(10)).unwrap_or_else(|e| panic!("visitor: {e}"));
    let l = close_of(&server.p, visitor, secs(5));
    assert_eq!(field(&l, "end"), Some("no_agent"), "{l}");
    assert!(
        server.connected().is_empty(),
        "an agent got in: {:?}",
        server.connected()
    );
    assert_eq!(target.server.accepted(), 0, "the target was reached");
}

/// The agent's second session (not `old`, else `why`) carries a 256 KiB visit both
/// ways, byte-exact (`what`, in the target's report).
fn second_session_carries_visitors(
    server: &TunnelServer,
    agent: &Proc,
    target: &Target,
    old: &str,
    seed: u64,
    why: &str,
    what: &str,
) {
    let new_session = wait_connected(server, agent, 2);
    assert_ne!(new_session, old, "{why}");
    let job = Job::new(
        BOTH,
        Payload::new(seed, 256 * KIB),
        Payload::new(seed + 1, 256 * KIB),
    );
    let out = visit_ok(server.visitors, job, secs(30));
    assert_eq!(out.down, Digested::of(&job.down));
    assert_got(&target.report(secs(10)).seen, &job.up, what);
}

/// A 64 KiB visit both ways (payload seeds `seed`, `seed + 1`), byte-exact.
fn warm_up(server: &TunnelServer, target: &Target, seed: u64) {
    let job = Job::new(
        BOTH,
        Payload::new(seed, 64 * KIB),
        Payload::new(seed + 1, 64 * KIB),
    );
    visit_ok(server.visitors, job, secs(20));
    assert_got(&target.report(secs(10)).seen, &job.up, "warm-up");
}

/// `n` visitors held open (the target echoes), each proved by a round trip.
fn hold_visitors(server: &TunnelServer, n: u64, seed: u64, msg: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let s = open(
                server.visitors,
                &Job::new(HOLD, Payload::new(seed + i, 0), Payload::new(0, 0)),
            );
            ping(&s, msg, secs(10)).expect("round trip");
            s
        })
        .collect()
}

/// Writes `p`, at `rate` bytes/s if non-zero.
fn send(s: &TcpStream, p: Payload, rate: u64, deadline: Instant) -> io::Result<()> {
    p.write_paced(s, deadline, (rate > 0).then_some(rate))
}

fn answer_line(d: &Digested) -> String {
    format!("{} {}\n", hex(&d.sha), d.len)
}

/// Echoes until the connection ends; says how.
fn hold(s: &TcpStream, deadline: Instant) -> Seen {
    let mut s = s;
    let mut buf = vec![0u8; 64 * KIB as usize];
    loop {
        if set_read_deadline(s, deadline).is_err() {
            return Seen::Failed("still open at the deadline".into());
        }
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return Seen::Ended(Ending::Eof);
            }
            Ok(n) => {
                if let Err(e) = s.write_all(&buf[..n]) {
                    return match e.kind() {
                        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
                            Seen::Ended(Ending::Reset)
                        }
                        _ => Seen::Failed(format!("echo write: {e}")),
                    };
                }
            }
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return Seen::Ended(Ending::Reset),
            Err(e) if e.kind() == ErrorKind::Interrupted || is_timeout(&e) => {}
            Err(e) => return Seen::Failed(format!("echo read: {e} ({:?})", e.kind())),
        }
    }
}

/// One target connection: reads the header, runs the operation, reports.
fn serve(s: &TcpStream, tx: &mpsc::Sender<Report>, received: &AtomicU64) {
    let deadline = Instant::now() + secs(300);
    let Ok(h) = read_exact_timeout(s, HEADER_LEN, secs(120)) else {
        return;
    };
    let job = Job::decode(&h);
    let mut w = s;
    let seen = match job.op {
        BOTH | CHAT => thread::scope(|sc| {
            let writer = sc.spawn(|| {
                if job.op == CHAT {
                    s.set_nodelay(true)?;
                    send_counted(s, job.down, job.rate, deadline, &AtomicU64::new(0), true)?;
                } else {
                    send(s, job.down, job.rate, deadline)?;
                }
                s.shutdown(Shutdown::Write)
            });
            let r = read_digest_counted(s, deadline, received);
            if r.is_err() {
                let _ = s.shutdown(Shutdown::Both);
            }
            let wrote = writer.join().expect("target writer panicked");
            match (r, wrote) {
                (Ok(d), Ok(())) => Seen::Got(d),
                (Err(e), _) => Seen::Failed(format!("target read: {e}")),
                (_, Err(e)) => Seen::Failed(format!("target write: {e}")),
            }
        }),
        UPLOAD_FIRST | SLOW => {
            if job.op == SLOW {
                thread::sleep(ms(job.rate));
            }
            match read_digest_counted(s, deadline, received) {
                Ok(d) => {
                    let answered = w
                        .write_all(answer_line(&d).as_bytes())
                        .and_then(|()| send(s, job.down, 0, deadline))
                        .and_then(|()| s.shutdown(Shutdown::Write));
                    match answered {
                        Ok(()) => Seen::Got(d),
                        Err(e) => Seen::Failed(format!("target answer: {e}")),
                    }
                }
                Err(e) => Seen::Failed(format!("target read: {e}")),
            }
        }
        DOWNLOAD_FIRST => {
            let sent = send(s, job.down, 0, deadline).and_then(|()| s.shutdown(Shutdown::Write));
            match sent {
                Ok(()) => match read_digest_counted(s, deadline, received) {
                    Ok(d) => Seen::Got(d),
                    Err(e) => Seen::Failed(format!("target read after its EOF: {e}")),
                },
                Err(e) => Seen::Failed(format!("target write: {e}")),
            }
        }
        HOLD => hold(s, deadline),
        RESET => {
            let ok = w.write_all(b"+").is_ok()
                && read_exact_timeout(s, 1, secs(20)).is_ok_and(|k| k == b"k");
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
            if ok {
                Seen::Ended(Ending::Reset)
            } else {
                Seen::Failed("no k before the reset".into())
            }
        }
        op => Seen::Failed(format!("unknown operation {op}")),
    };
    let _ = tx.send(Report { job, seen });
}

// ---------------------------------------------------------------------------------
// Visitors
// ---------------------------------------------------------------------------------

/// What a visitor got.
#[derive(Debug)]
struct VisitOut {
    /// The visitor's own address (the `client=` of both sides' close lines).
    local: SocketAddr,
    /// What it received from the target (after the answer line, if any).
    down: Digested,
    /// What the target said it received ([`UPLOAD_FIRST`], [`SLOW`]).
    answer: Option<Digested>,
    /// Bytes the close lines count from the target to the visitor.
    down_wire: u64,
}

/// Connects to the visitors' port and sends the job's header.
fn open(addr: SocketAddr, job: &Job) -> TcpStream {
    let s = connect(addr);
    (&s).write_all(&job.encode())
        .unwrap_or_else(|e| panic!("header to {addr}: {e}"));
    s
}

fn parse_answer(text: &str) -> Result<Digested, String> {
    let (sha, len) = text
        .trim_end()
        .split_once(' ')
        .ok_or_else(|| format!("bad answer {text:?}"))?;
    if sha.len() != 64 {
        return Err(format!("bad answer {text:?}"));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&sha[2 * i..2 * i + 2], 16).map_err(|e| format!("{e}"))?;
    }
    Ok(Digested {
        len: len.parse().map_err(|e| format!("{e}"))?,
        sha: out,
    })
}

/// Runs a [`BOTH`], [`CHAT`], [`UPLOAD_FIRST`], [`SLOW`] or [`DOWNLOAD_FIRST`] job as the
/// visitor. `down_seen` counts the bytes received, `up_sent` those sent.
fn visit(
    addr: SocketAddr,
    job: Job,
    deadline: Instant,
    down_seen: &AtomicU64,
    up_sent: &AtomicU64,
) -> Result<VisitOut, String> {
    let s = try_connect(addr).map_err(|e| format!("connect: {e}"))?;
    let local = s.local_addr().unwrap();
    let mut w = &s;
    w.write_all(&job.encode())
        .map_err(|e| format!("header: {e}"))?;
    let send_up = |rate: u64| -> Result<(), String> {
        send_counted(&s, job.up, rate, deadline, up_sent, job.op == CHAT)
            .map_err(|e| format!("visitor write: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("visitor shutdown: {e}"))
    };
    if job.op == CHAT {
        s.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
    }
    match job.op {
        BOTH | CHAT => thread::scope(|sc| {
            let writer = sc.spawn(|| send_up(job.rate));
            let r = read_digest_counted(&s, deadline, down_seen);
            if r.is_err() {
                let _ = s.shutdown(Shutdown::Both);
            }
            let wrote = writer.join().expect("visitor writer panicked");
            let down = r.map_err(|e| format!("visitor read: {e}"))?;
            wrote?;
            Ok(VisitOut {
                local,
                down,
                answer: None,
                down_wire: down.len,
            })
        }),
        UPLOAD_FIRST | SLOW => {
            send_up(0)?;
            let reply = read_to_end(&s, (job.down.len + 200) as usize, deadline)
                .map_err(|e| format!("visitor reading the answer: {e}"))?;
            let nl = reply
                .iter()
                .position(|&b| b == b'\n')
                .ok_or_else(|| format!("no answer line in {} bytes", reply.len()))?;
            let answer = parse_answer(&String::from_utf8_lossy(&reply[..nl]))?;
            let rest = &reply[nl + 1..];
            down_seen.fetch_add(rest.len() as u64, Ordering::SeqCst);
            Ok(VisitOut {
                local,
                down: Digested {
                    len: rest.len() as u64,
                    sha: sha256(rest),
                },
                answer: Some(answer),
                down_wire: reply.len() as u64,
            })
        }
        DOWNLOAD_FIRST => {
            let down = read_digest_counted(&s, deadline, down_seen)
                .map_err(|e| format!("visitor read: {e}"))?;
            // The target's FIN came through; our direction must still work.
            send_up(0)?;
            Ok(VisitOut {
                local,
                down,
                answer: None,
                down_wire: down.len,
            })
        }
        op => Err(format!("visit cannot run operation {op}")),
    }
}

/// Writes `p` in 64 KiB chunks, or in [`PIECES`] when `pieces` (at `rate` bytes/s if
/// non-zero), counting into `sent`.
fn send_counted(
    s: &TcpStream,
    p: Payload,
    rate: u64,
    deadline: Instant,
    sent: &AtomicU64,
    pieces: bool,
) -> io::Result<()> {
    let mut w = s;
    let mut buf = vec![0u8; 64 * KIB as usize];
    let started = Instant::now();
    let mut off = 0;
    for i in 0.. {
        if off >= p.len {
            break;
        }
        if rate > 0 {
            let due = started + Duration::from_secs_f64(off as f64 / rate as f64);
            thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let chunk = if pieces {
            PIECES[i % PIECES.len()]
        } else {
            buf.len()
        };
        let n = (p.len - off).min(chunk as u64) as usize;
        p.fill(off, &mut buf[..n]);
        set_write_deadline(s, deadline)?;
        w.write_all(&buf[..n]).map_err(|e| {
            io::Error::new(e.kind(), format!("writing at byte {off} of {}: {e}", p.len))
        })?;
        off += n as u64;
        sent.fetch_add(n as u64, Ordering::SeqCst);
    }
    Ok(())
}

/// [`visit`] without counters; panics on failure.
fn visit_ok(addr: SocketAddr, job: Job, timeout: Duration) -> VisitOut {
    let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
    visit(addr, job, Instant::now() + timeout, &a, &b)
        .unwrap_or_else(|e| panic!("visitor ({}): {e}", job.op as char))
}

/// Resets a connection (RST instead of FIN on close).
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(s);
}

// ---------------------------------------------------------------------------------
// Server and agent processes
// ---------------------------------------------------------------------------------

/// Writes a token file (mode 0600) into `dir`.
fn token_file(dir: &TempDir, name: &str, token: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.write(name, token);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The public side's config: `[tunnel_server]` and rule `web` (`agent:web`).
fn server_toml(tunnel_listen: &str, token: &Path, server_extra: &str, rule_extra: &str) -> String {
    format!(
        "[tunnel_server]\nlisten = \"{tunnel_listen}\"\ntoken_file = \"{}\"\n{server_extra}\n\n\
         [[rule]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nupstream = \"agent:web\"\n{rule_extra}\n",
        token.display()
    )
}

/// The private side's config: `[agent]` and service `web`.
fn agent_toml(server: SocketAddr, token: &Path, target: SocketAddr) -> String {
    agent_toml_with(server, token, target, "")
}

/// `agent_toml` with these extra keys in its `[[service]]`.
fn agent_toml_with(
    server: SocketAddr,
    token: &Path,
    target: SocketAddr,
    service_extra: &str,
) -> String {
    format!(
        "[agent]\nserver = \"{server}\"\ntoken_file = \"{}\"\n\n\
         [[service]]\nname = \"web\"\ntarget = \"{target}\"\n{service_extra}\n",
        token.display()
    )
}

fn osv(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn is_line(l: &str, msg: &str) -> bool {
    l.contains(&format!(" {msg} "))
}

/// The public forwarder.
struct TunnelServer {
    p: Proc,
    /// The relay path asked for with `--mode`.
    mode: Mode,
    /// Its `listening rule=... upstream=agent:web` line.
    rule_line: String,
    /// That rule's name (`web` from the config file, `cli` from the command line).
    rule: String,
    /// Where agents connect.
    tunnel: SocketAddr,
    /// Where visitors connect (rule `web`).
    visitors: SocketAddr,
}

impl TunnelServer {
    /// `forwarder run -c FILE --mode MODE`.
    fn config(mode: Mode, toml: &str) -> TunnelServer {
        let dir = TempDir::new("tunnel-server");
        let path = dir.write("server.toml", toml);
        let mut args = osv(&["run", "-c"]);
        args.push(path.into());
        args.extend(osv(&["--mode", mode.as_str()]));
        Self::ready(Proc::spawn("server", &args, None, &[], Some(dir)), mode)
    }

    /// `forwarder run --listen 127.0.0.1:0 --upstream agent:web --tunnel-listen L
    /// --token-file F --mode MODE`.
    fn cli(mode: Mode, tunnel_listen: &str, token: &Path) -> TunnelServer {
        let mut args = osv(&[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "agent:web",
            "--tunnel-listen",
            tunnel_listen,
            "--token-file",
        ]);
        args.push(token.into());
        args.extend(osv(&["--mode", mode.as_str()]));
        Self::ready(Proc::spawn("server", &args, None, &[], None), mode)
    }

    fn ready(mut p: Proc, mode: Mode) -> TunnelServer {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let ready = |p: &Proc| {
            let lines = p.lines();
            let tunnel = lines
                .iter()
                .find(|l| is_line(l, "tunnel listening"))
                .cloned();
            let rule = lines
                .iter()
                .find(|l| {
                    l.contains(" listening rule=") && field(l, "upstream") == Some("agent:web")
                })
                .cloned();
            tunnel.zip(rule)
        };
        let (tunnel, rule) = loop {
            if let Some(found) = ready(&p) {
                break found;
            }
            p.assert_running();
            assert!(
                Instant::now() < deadline,
                "server: no `tunnel listening` and `listening ... upstream=agent:web` lines within \
                 {STARTUP_TIMEOUT:?}; its log:\n{}",
                p.text()
            );
            thread::sleep(ms(20));
        };
        let addr = |l: &str| -> SocketAddr {
            field(l, "listen")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no listen= address in {l:?}"))
        };
        TunnelServer {
            tunnel: addr(&tunnel),
            visitors: addr(&rule),
            p,
            mode,
            rule: field(&rule, "rule").unwrap().to_string(),
            rule_line: rule,
        }
    }

    /// The rule runs the tunnel relay and every relayed stream took `path=splice`.
    /// Checked when the server is dropped, as the test's last assertion (as the
    /// harness's `Forwarder` does).
    fn check_mode(&self) {
        // Whatever the rule's mode, a tunnel stream runs on splice with retention
        // (the kernel path cannot keep the bytes a lost link may need again); the
        // ebpf variants check that a kernel-path process serves tunnels the same way.
        assert_eq!(
            field(&self.rule_line, "mode"),
            Some("splice"),
            "rule web (--mode {}) should say it runs the tunnel relay: {}",
            self.mode.as_str(),
            self.rule_line
        );
        assert!(
            self.rule_line.contains("tunnel: splice with retention"),
            "{}",
            self.rule_line
        );
        for l in self.p.close_lines() {
            let path = field(&l, "path").unwrap_or_else(|| panic!("no path= in {l}"));
            assert!(
                path == "none" || path == "splice",
                "a tunnel stream took path={path}: {l}"
            );
        }
    }

    /// `agent connected` lines so far.
    fn connected(&self) -> Vec<String> {
        self.p.matching(|l| is_line(l, "agent connected"))
    }
}

impl Drop for TunnelServer {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.check_mode();
        }
    }
}

/// How an agent gets its token.
enum Token<'a> {
    File(&'a Path),
    /// From the environment (`FORWARDER_TOKEN`).
    Env(&'a str),
}

/// `forwarder agent --server S --service web=T --token-file F` (or the token from
/// FORWARDER_TOKEN), inside `ns` if given. (The agent has no `--mode`: its pairs
/// take the tunnel's relay.)
fn agent_cli(server: SocketAddr, target: SocketAddr, token: Token, ns: Option<&NetNs>) -> Proc {
    let mut args = osv(&[
        "agent",
        "--server",
        &server.to_string(),
        "--service",
        &format!("web={target}"),
    ]);
    let mut env = Vec::new();
    match token {
        Token::File(f) => {
            args.push("--token-file".into());
            args.push(f.into());
        }
        Token::Env(t) => env.push(("FORWARDER_TOKEN", t)),
    }
    Proc::spawn("agent", &args, ns, &env, None)
}

/// `forwarder run -c FILE` with `[agent]` and `[[service]]`, inside `ns` if given.
fn agent_config(server: SocketAddr, target: SocketAddr, token: &Path, ns: Option<&NetNs>) -> Proc {
    agent_config_with(server, target, token, ns, "")
}

/// `agent_config` with these extra keys in its `[[service]]`.
fn agent_config_with(
    server: SocketAddr,
    target: SocketAddr,
    token: &Path,
    ns: Option<&NetNs>,
    service_extra: &str,
) -> Proc {
    agent_from_toml(&agent_toml_with(server, token, target, service_extra), ns)
}

/// `forwarder run -c FILE` with `toml` as FILE, inside `ns` if given.
fn agent_from_toml(toml: &str, ns: Option<&NetNs>) -> Proc {
    let dir = TempDir::new("tunnel-agent");
    let mut args = osv(&["run", "-c"]);
    args.push(dir.write("agent.toml", toml).into());
    Proc::spawn("agent", &args, ns, &[], Some(dir))
}

/// `forwarder run -c FILE` with `[agent]`, `[[service]]` and `[global]` lines `global`.
fn agent_with_global(server: SocketAddr, token: &Path, target: SocketAddr, global: &str) -> Proc {
    let toml = format!(
        "[global]\n{global}\n\n{}",
        agent_toml(server, token, target)
    );
    agent_from_toml(&toml, None)
}

/// [`agent_with_global`] with `shutdown_grace`.
/// A tunnel on loopback with one agent (its `shutdown_grace` is `grace`) and a visitor
/// through it held open (a [`HOLD`] job, payload seed `seed`) that has made a round trip.
fn held_through_an_agent(
    mode: Mode,
    dir: &TempDir,
    grace: &str,
    seed: u64,
) -> (Target, TunnelServer, Proc, TcpStream) {
    let (token, target, server) = on_loopback(mode, dir, "", "");
    let agent = agent_with_grace(server.tunnel, &token, target.addr(), grace);
    wait_connected(&server, &agent, 1);
    let held = open(
        server.visitors,
        &Job::new(HOLD, Payload::new(seed, 0), Payload::new(0, 0)),
    );
    ping(&held, b"before the signal", secs(10)).expect("round trip");
    (target, server, agent, held)
}

fn agent_with_grace(server: SocketAddr, token: &Path, target: SocketAddr, grace: &str) -> Proc {
    agent_with_global(
        server,
        token,
        target,
        &format!("shutdown_grace = \"{grace}\""),
    )
}

/// `forwarder agent` for each target in turn (`--service web=TARGET`, so each its own
/// identity), each connected before the next starts: [`wait_connected`] matches the
/// server's nth `agent connected` line.
fn agents_one_by_one(server: &TunnelServer, token: &Path, targets: &[SocketAddr]) -> Vec<Proc> {
    targets
        .iter()
        .map(|t| {
            // Counted before the agent starts: counted after, an agent quick to connect
            // was counted too, and its line awaited as the next one (seen once in a
            // hunt: "1 `agent connected` lines within 20 s, want 2" for the first).
            let n = server.connected().len() + 1;
            let a = agent_cli(server.tunnel, *t, Token::File(token), None);
            wait_connected(server, &a, n);
            a
        })
        .collect()
}

/// Waits until both sides log `agent connected` (the `n`th time on the server) with
/// the same session; returns the session id.
fn wait_connected(server: &TunnelServer, agent: &Proc, n: usize) -> String {
    let on_server = server
        .p
        .wait_n(n, secs(20), |l| is_line(l, "agent connected"));
    assert!(
        on_server.len() >= n,
        "server: {} `agent connected` lines within 20 s, want {n}; server log:\n{}\nagent log:\n{}",
        on_server.len(),
        server.p.text(),
        agent.text()
    );
    let line = &on_server[n - 1];
    let session = field(line, "session")
        .unwrap_or_else(|| panic!("no session= in {line}"))
        .to_string();
    assert_eq!(field(line, "services"), Some("web"), "{line}");
    assert!(field(line, "agent").is_some(), "no agent= in {line}");
    let a = agent.expect_line("agent connected", secs(10), |l| {
        is_line(l, "agent connected") && field(l, "session") == Some(session.as_str())
    });
    assert_eq!(field(&a, "services"), Some("web"), "{a}");
    assert!(field(&a, "server").is_some(), "no server= in {a}");
    session
}

/// `ss -K FILTER...`: aborts the matching sockets (a reset to their peers). Its stderr
/// is kept out of the test log (a socket already gone makes it say "RTNETLINK answers:
/// Invalid argument") unless it fails.
fn ss_kill(filter: &[&str]) {
    let out = std::process::Command::new("ss")
        .arg("-K")
        .args(filter)
        .output()
        .expect("ss runs");
    assert!(
        out.status.success(),
        "ss -K {filter:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Aborts (`ss -K`) the established connection to `port` on loopback that has
/// carried the most bytes, which must be more than 1 MiB (a data connection under
/// way, not the control connection or a pooled one); returns its local address.
fn kill_busiest_connection_to(port: u16) -> String {
    let out = std::process::Command::new("ss")
        .args([
            "-tinH",
            "state",
            "established",
            "dport",
            "=",
            &format!(":{port}"),
        ])
        .output()
        .expect("ss runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let counter = |info: &str, key: &str| -> u64 {
        info.split_whitespace()
            .find_map(|f| f.strip_prefix(key)?.parse().ok())
            .unwrap_or(0)
    };
    // Each socket is a line with its addresses, then a line of TCP info.
    let lines: Vec<&str> = text.lines().collect();
    let busiest = lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            let local = c[0].split_whitespace().nth(2).unwrap_or("").to_string();
            (
                counter(c[1], "bytes_acked:") + counter(c[1], "bytes_received:"),
                local,
            )
        })
        .max()
        .unwrap_or_else(|| panic!("no connection to :{port}:\n{text}"));
    assert!(
        busiest.0 > MIB,
        "no connection to :{port} carried 1 MiB yet:\n{text}"
    );
    let (ip, sport) = busiest.1.rsplit_once(':').expect("an address");
    ss_kill(&[
        "-tH",
        "src",
        ip,
        "sport",
        "=",
        &format!(":{sport}"),
        "dport",
        "=",
        &format!(":{port}"),
    ]);
    busiest.1
}

/// The tunnel's session and link lines so far.
fn link_events(p: &Proc) -> Vec<String> {
    const EVENTS: [&str; 8] = [
        "agent connected",
        "agent left",
        "link lost",
        "link resumed",
        "grace expired",
        "agent refused",
        "session replaced",
        "agent:",
    ];
    p.matching(|l| EVENTS.iter().any(|e| l.contains(&format!(" {e} "))))
}

/// Waits up to 10 s for the series `name` with `labels` at `addr` to read `want`.
fn wait_scraped(addr: SocketAddr, name: &str, labels: &[&str], want: f64) {
    if !wait_until(secs(10), || scraped(addr, name, labels) == want) {
        assert_eq!(
            scraped(addr, name, labels),
            want,
            "{name}{labels:?} at {addr}"
        );
    }
}

/// A tunnel on loopback whose server (metrics at `sm`) and agent (at `am`) serve
/// `/metrics`, the agent connected.
struct Metered {
    _dir: TempDir,
    _target: Target,
    server: TunnelServer,
    agent: Proc,
    sm: SocketAddr,
    am: SocketAddr,
}

impl Metered {
    fn start(mode: Mode, resume_grace: &str) -> Metered {
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let target = Target::start();
        let (sm, am) = (free_loopback_addr(), free_loopback_addr());
        let grace = format!("resume_grace = \"{resume_grace}\"");
        let server = TunnelServer::config(
            mode,
            &format!(
                "[global]\nmetrics = \"{sm}\"\n\n{}",
                server_toml("127.0.0.1:0", &token, &grace, "")
            ),
        );
        let agent = agent_with_global(
            server.tunnel,
            &token,
            target.addr(),
            &format!("metrics = \"{am}\""),
        );
        wait_connected(&server, &agent, 1);
        wait_scraped(sm, "forwarder_tunnel_agents", &["service=\"web\""], 1.0);
        wait_scraped(am, "forwarder_tunnel_link_up", &[], 1.0);
        Metered {
            _dir: dir,
            _target: target,
            server,
            agent,
            sm,
            am,
        }
    }

    fn sides(&self) -> [(SocketAddr, &'static str); 2] {
        [(self.sm, "side=\"server\""), (self.am, "side=\"agent\"")]
    }

    /// Each side's link events: connected, lost, resumed, grace_expired.
    fn events(&self, want: [f64; 4]) {
        for (addr, side) in self.sides() {
            for (event, n) in ["connected", "lost", "resumed", "grace_expired"]
                .iter()
                .zip(want)
            {
                let ev = format!("event=\"{event}\"");
                wait_scraped(addr, "forwarder_tunnel_link_events_total", &[side, &ev], n);
            }
        }
    }

    fn streams(&self, attached: f64, waiting: f64, on: &[(SocketAddr, &str)]) {
        for (addr, side) in on {
            wait_scraped(
                *addr,
                "forwarder_tunnel_streams",
                &[side, "state=\"attached\""],
                attached,
            );
            wait_scraped(
                *addr,
                "forwarder_tunnel_streams",
                &[side, "state=\"waiting\""],
                waiting,
            );
        }
    }

    /// The link lost for as long as `meanwhile` takes: the agent stopped and every
    /// connection it has to the server reset. The server sees the loss, and `visitor`
    /// (held) sends bytes, which the server retains, exactly those. Returns them.
    fn outage(&self, mut visitor: &TcpStream, meanwhile: impl FnOnce(&Metered)) -> Vec<u8> {
        // Both ends acknowledged what the held visitor sent before: nothing is held.
        for (addr, _) in self.sides() {
            wait_scraped(addr, "forwarder_tunnel_retained_bytes", &[], 0.0);
        }
        let during: Vec<u8> = (0..10_007u32).map(|i| (i * 7 % 251) as u8).collect();
        let _stopped = Stopped::new(self.agent.pid());
        ss_kill(&[
            "-tH",
            "dport",
            "=",
            &format!(":{}", self.server.tunnel.port()),
        ]);
        wait_scraped(
            self.sm,
            "forwarder_tunnel_link_events_total",
            &["side=\"server\"", "event=\"lost\""],
            1.0,
        );
        wait_scraped(
            self.sm,
            "forwarder_tunnel_agents",
            &["service=\"web\""],
            0.0,
        );
        self.streams(0.0, 1.0, &self.sides()[..1]);
        visitor
            .write_all(&during)
            .expect("visitor writes during the outage");
        wait_scraped(
            self.sm,
            "forwarder_tunnel_retained_bytes",
            &[],
            during.len() as f64,
        );
        meanwhile(self);
        during
    }
}

/// The close line whose `client=` is `client`, waiting up to `timeout` for it.
fn close_of(p: &Proc, client: SocketAddr, timeout: Duration) -> String {
    let c = client.to_string();
    p.expect_line(&format!("close client={c}"), timeout, |l| {
        l.contains(" close rule=") && field(l, "client") == Some(c.as_str())
    })
}

fn num(l: &str, key: &str) -> u64 {
    field(l, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {l}"))
}

/// Asserts a close line's rule, upstream, byte counts and end.
fn check_close(l: &str, rule: &str, upstream: &str, up: u64, down: u64, end: &str) {
    assert_eq!(field(l, "rule"), Some(rule), "{l}");
    assert_eq!(field(l, "upstream"), Some(upstream), "{l}");
    assert_eq!(num(l, "bytes_up"), up, "bytes_up: {l}");
    assert_eq!(num(l, "bytes_down"), down, "bytes_down: {l}");
    assert_eq!(field(l, "end"), Some(end), "end: {l}");
}

fn assert_got(seen: &Seen, want: &Payload, what: &str) {
    assert_eq!(seen, &Seen::Got(Digested::of(want)), "{what}");
}

/// The target's reports matched to jobs by the visitor's payload seed.
fn report_for(reports: &[Report], seed: u64) -> &Report {
    reports
        .iter()
        .find(|r| r.job.up.seed == seed)
        .unwrap_or_else(|| panic!("no target report for seed {seed}: {reports:?}"))
}

// ---------------------------------------------------------------------------------
// Link faults, with the agent and its target in a network namespace
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every packet dropped both ways for this long.
    Blackhole(Duration),
    /// `ss -K` on the agent's tunnel sockets.
    Reset,
    /// A short blackhole during which the agent's address changes.
    NewAddress,
}

/// 4 visitors each send 32 MiB and receive 32 MiB (paced, so the fault hits mid-way)
/// through the tunnel, 2 more chat 4 MiB each way in small pieces (retention made of
/// many small skbs, replayed after the fault), the link suffers `fault`, and every byte
/// must arrive exactly, each stream surviving on the same session.
fn resume_after(mode: Mode, fault: Fault) {
    resume_after_with(mode, fault, "resume_grace = \"150s\"")
}

/// [`resume_after`] with the server's `[tunnel_server]` keys given.
fn resume_after_with(mode: Mode, fault: Fault, server_keys: &str) {
    const STREAMS: u64 = 4;
    const LEN: u64 = 32 * MIB;
    const CHATS: u64 = 2;
    const CHAT_LEN: u64 = 4 * MIB;
    // (Bound in this order, dropped in the reverse: processes before the namespace.)
    let InNetns {
        _dir,
        ns,
        target,
        server,
        agent,
        session,
    } = in_netns(mode, server_keys, "");

    let rate = match fault {
        Fault::Blackhole(_) => 2 * MIB,
        _ => 4 * MIB,
    };
    let down_seen = Arc::new(AtomicU64::new(0));
    let up_sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + secs(240);
    let bulk = (0..STREAMS).map(|i| Job {
        op: BOTH,
        up: Payload::new(1000 + i, LEN),
        down: Payload::new(2000 + i, LEN),
        rate,
    });
    let chat = (0..CHATS).map(|i| Job {
        op: CHAT,
        up: Payload::new(1000 + STREAMS + i, CHAT_LEN),
        down: Payload::new(2000 + STREAMS + i, CHAT_LEN),
        rate: 256 * KIB,
    });
    let total = STREAMS * LEN + CHATS * CHAT_LEN;
    let visitors: Vec<_> = bulk
        .chain(chat)
        .map(|job| {
            let (d, u) = (down_seen.clone(), up_sent.clone());
            let addr = server.visitors;
            let h = thread::spawn(move || visit(addr, job, deadline, &d, &u));
            (job, h)
        })
        .collect();

    // Well under way both ways, far from done.
    let started = wait_until(secs(40), || {
        down_seen.load(Ordering::SeqCst) >= STREAMS * 6 * MIB
            && target.received() >= STREAMS * 6 * MIB
    });
    assert!(
        started,
        "transfers did not get going: visitors got {} bytes, the target {}",
        down_seen.load(Ordering::SeqCst),
        target.received()
    );
    let before = (down_seen.load(Ordering::SeqCst), target.received());
    assert!(
        before.0 < STREAMS * LEN / 2 && before.1 < STREAMS * LEN / 2,
        "transfers too far along for the fault to hit them mid-way: {before:?}"
    );

    let is_lost = |l: &str| is_line(l, "link lost");
    let is_resumed = |l: &str| is_line(l, "link resumed");
    let fault_at = Instant::now();
    let mut new_ip = None;
    match fault {
        Fault::Blackhole(outage) => {
            let bh = ns.blackhole();
            // Both sides notice during the outage.
            server.p.expect_line("link lost", outage, is_lost);
            agent.expect_line(
                "link lost",
                outage.saturating_sub(fault_at.elapsed()),
                is_lost,
            );
            let during = (down_seen.load(Ordering::SeqCst), target.received());
            thread::sleep(outage.saturating_sub(fault_at.elapsed()));
            let after = (down_seen.load(Ordering::SeqCst), target.received());
            bh.restore();
            println!(
                "blackhole of {:.1?}: bytes (to visitors, to target) when both sides saw \
                 the loss {during:?}, at the end {after:?}",
                fault_at.elapsed()
            );
            assert_eq!(during, after, "bytes moved through a blackholed link");
        }
        Fault::Reset => {
            let killed = ns.kill_sockets_to(server.tunnel.port());
            assert!(killed >= 1, "ss -K found no tunnel socket to kill");
            println!("ss -K aborted {killed} tunnel sockets");
        }
        Fault::NewAddress => {
            let bh = ns.blackhole();
            thread::sleep(secs(2));
            new_ip = Some(ns.move_ns_addr(3));
            thread::sleep(secs(3));
            bh.restore();
        }
    }

    let lost = server.p.expect_line("link lost", secs(60), is_lost);
    let resumed = server.p.expect_line("link resumed", secs(60), is_resumed);
    let resumed_at = Instant::now();
    println!("resumed {:.1?} after the fault", fault_at.elapsed());
    let agent_lost = agent.expect_line("link lost", secs(10), is_lost);
    let agent_resumed = agent.expect_line("link resumed", secs(10), is_resumed);

    // The rest (at most 26 MiB a stream and direction) moves at full speed: 45 s is
    // plenty. A grace expiry ends the wait.
    let finish_by = Instant::now() + secs(45);
    let all_done = wait_until(secs(45), || {
        visitors.iter().all(|(_, h)| h.is_finished())
            || !server
                .p
                .matching(|l| is_line(l, "grace expired"))
                .is_empty()
    });
    if !all_done || Instant::now() >= finish_by {
        // Which streams stalled (bulk or chat, by the seed of what the visitor sends).
        let unfinished: Vec<String> = visitors
            .iter()
            .filter(|(_, h)| !h.is_finished())
            .map(|(j, _)| format!("{} seed {}", j.op as char, j.up.seed))
            .collect();
        panic!(
            "transfers unfinished {:.0?} after the link resumed: visitors received {} of {} \
             bytes, the target {} of {}; still running: {unfinished:?}; server link events: \
             {:#?}\nagent link events: {:#?}",
            resumed_at.elapsed(),
            down_seen.load(Ordering::SeqCst),
            total,
            target.received(),
            total,
            link_events(&server.p),
            link_events(&agent)
        );
    }
    for (i, (job, h)) in visitors.into_iter().enumerate() {
        let out = h
            .join()
            .expect("visitor panicked")
            .unwrap_or_else(|e| panic!("visitor #{i}: {e}"));
        assert_eq!(out.down, Digested::of(&job.down), "visitor #{i} received");
        let l = close_of(&server.p, out.local, secs(20));
        check_close(
            &l,
            &server.rule,
            "agent:web",
            HEADER_LEN as u64 + job.up.len,
            job.down.len,
            "closed",
        );
        let l = close_of(&agent, out.local, secs(20));
        check_close(
            &l,
            "web",
            &target.addr().to_string(),
            HEADER_LEN as u64 + job.up.len,
            job.down.len,
            "closed",
        );
    }
    let reports = target.reports((STREAMS + CHATS) as usize, secs(30));
    for i in 0..STREAMS + CHATS {
        let r = report_for(&reports, 1000 + i);
        assert_got(
            &r.seen,
            &r.job.up,
            &format!("target of visitor #{i} received"),
        );
    }

    // The same session, all six streams waiting and back.
    for (side, l) in [("server", &lost), ("agent", &agent_lost)] {
        assert_eq!(field(l, "session"), Some(session.as_str()), "{side}: {l}");
        assert_eq!(field(l, "streams_waiting"), Some("6"), "{side}: {l}");
    }
    for (side, l) in [("server", &resumed), ("agent", &agent_resumed)] {
        assert_eq!(field(l, "session"), Some(session.as_str()), "{side}: {l}");
        assert_eq!(field(l, "streams"), Some("6"), "{side}: {l}");
    }
    for p in [&server.p, &agent] {
        let expired = p.matching(|l| is_line(l, "grace expired"));
        assert!(expired.is_empty(), "{}: {expired:?}", p.label);
    }
    if let Some(ip) = new_ip {
        // The agent's tunnel connections now come from the new address.
        let ss = sh(
            "ss",
            &[
                "-H",
                "-t",
                "-n",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{}", server.tunnel.port()),
            ],
        );
        assert!(
            ss.contains(&format!("{ip}:")),
            "no tunnel connection from the agent's new address {ip}:\n{ss}"
        );
        if let Some(a) = field(&resumed, "agent") {
            assert!(
                a.starts_with(&format!("{ip}:")),
                "resumed from {a}, want {ip}: {resumed}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------
// The agent port, spoken by hand (forged and replayed headers)
// ---------------------------------------------------------------------------------

/// Frame variants, in the order of `forwarder::tunnel::proto::Frame` (postcard encodes
/// an enum as its variant's index).
const CHALLENGE: u8 = 0;
const HELLO: u8 = 1;
const DATA: u8 = 4;
/// `forwarder::tunnel::proto::VERSION`.
const PROTO_VERSION: u64 = 1;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(b: &[u8], at: &mut usize) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = b[*at];
        *at += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            break;
        }
    }
    v
}

/// One frame: a 4-byte big-endian length, then the body.
fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// HMAC-SHA256 over length-prefixed parts, as `forwarder::tunnel::auth` computes it.
fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let mut ctx = ring::hmac::Context::with_key(&key);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    ctx.sign().as_ref().try_into().unwrap()
}

/// Connects to the agent port and reads the server's challenge: (connection, nonce).
fn challenged(tunnel: SocketAddr) -> (TcpStream, [u8; 32]) {
    let mut s = connect(tunnel);
    s.set_read_timeout(Some(secs(10))).unwrap();
    let c = read_frame(&mut s).expect("the server's challenge");
    assert_eq!((c.len(), c[0]), (33, CHALLENGE), "not a challenge: {c:?}");
    (s, c[1..].try_into().unwrap())
}

/// A relay between the agent and the server that keeps the first frame the agent
/// sends on every connection (its `Hello`, or a data connection's `Data`).
struct Recorder {
    addr: SocketAddr,
    firsts: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Recorder {
    fn start(server: SocketAddr) -> Recorder {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let firsts = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (f, st) = (firsts.clone(), stop.clone());
        thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((mut agent, _)) = listener.accept() else {
                    thread::sleep(ms(10));
                    continue;
                };
                agent.set_nonblocking(false).unwrap();
                let Ok(mut server) = TcpStream::connect(server) else {
                    continue;
                };
                let _ = server.set_nodelay(true);
                let _ = agent.set_nodelay(true);
                let f = f.clone();
                let (mut a2, mut s2) = (agent.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = io::copy(&mut s2, &mut a2);
                    let _ = a2.shutdown(Shutdown::Write);
                });
                thread::spawn(move || {
                    // The server speaks first (its challenge); the agent's first frame
                    // follows, and is passed on as read.
                    if let Ok(body) = read_frame(&mut agent) {
                        let _ = server.write_all(&framed(&body));
                        f.lock().unwrap().push(body);
                        let _ = io::copy(&mut agent, &mut server);
                    }
                    let _ = server.shutdown(Shutdown::Write);
                });
            }
        });
        Recorder { addr, firsts, stop }
    }

    /// The first recorded frame of this variant, waiting up to 10 s.
    fn first(&self, variant: u8) -> Vec<u8> {
        let mut found = None;
        wait_until(secs(10), || {
            found = self
                .firsts
                .lock()
                .unwrap()
                .iter()
                .find(|b| b.first() == Some(&variant))
                .cloned();
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("the agent sent no frame of variant {variant}"))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A process stopped (SIGSTOP) until this is dropped (SIGCONT), even on a panic.
struct Stopped(i32);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        // SAFETY: kill(2) on a process this test started.
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "SIGSTOP {pid}"
        );
        let stopped = Stopped(pid);
        // The signal is asynchronous: wait until every thread is in state T.
        let all_stopped = || {
            std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
                tasks.flatten().all(|t| {
                    std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
                        st.rsplit_once(") ")
                            .is_some_and(|(_, r)| r.starts_with('T'))
                    })
                })
            })
        };
        assert!(
            wait_until(secs(5), all_stopped),
            "process {pid} did not stop"
        );
        stopped
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// Whether `l` is the server's `agent refused` line for a connection from `from`.
fn is_refusal_of(l: &str, from: &str) -> bool {
    is_line(l, "agent refused") && field(l, "agent") == Some(from)
}

/// Sends `body` as a frame after the server's challenge and expects it refused:
/// logged with `reason`, and the connection closed within 10 s.
fn refused_with(server: &TunnelServer, body: &[u8], reason: &str, what: &str) {
    let (mut s, _) = challenged(server.tunnel);
    s.write_all(&framed(body)).unwrap();
    let from = s.local_addr().unwrap().to_string();
    let l = server
        .p
        .expect_line("agent refused", secs(10), |l| is_refusal_of(l, &from));
    assert_eq!(field(&l, "reason"), Some(reason), "{what}: {l}");
    // A `Refused` frame may come first; then the connection ends.
    let _ = read_frame(&mut s);
    s.set_read_timeout(Some(secs(10))).unwrap();
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "{what}: {} more bytes after the refusal",
            rest.len()
        ),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{what}: {e}"),
    }
}

// ---------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------

/// The number of fds process `pid` holds.
fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Sets the soft RLIMIT_NOFILE of the running process `pid` (up to its hard limit).
fn set_nofile(pid: i32, n: usize) {
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={n}:")])
        .output()
        .expect("prlimit (util-linux) is required");
    assert!(
        out.status.success(),
        "prlimit --pid {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

relay_tests! {
    /// A new stream out of fds for its pipes waits for them, on the server and on the
    /// agent alike, and is served exactly once fds come back. Before, the visitor was
    /// reset at once: `end=client_error (Too many open files)` on the server, the
    /// target blamed (`upstream_error`) on the agent (audit). Each side in turn gets
    /// room for the sockets the visit needs and no pipe, for 600 ms.
    fn a_stream_out_of_fds_waits_for_pipes(mode) {
        let _load = light();
        for (i, side) in ["server", "agent"].into_iter().enumerate() {
            // Fresh processes: pipes an earlier visit pooled would serve this one.
            let dir = TempDir::new("tunnel-fds");
            let (token, target, server) = on_loopback(mode, &dir, "", "");
            let agent = agent_config(server.tunnel, target.addr(), &token, None);
            wait_connected(&server, &agent, 1);
            let pid = if side == "server" { server.p.pid() } else { agent.pid() };
            // The visitor's (or target's) socket, a data connection to replace the
            // pooled one the stream takes, and one more: a pipe takes two.
            set_nofile(pid, fd_count(pid) + 3);
            let seed = 730 + 10 * i as u64;
            let job = Job::new(BOTH, Payload::new(seed, 64 * KIB), Payload::new(seed + 1, 64 * KIB));
            let addr = server.visitors;
            let visitor = thread::spawn(move || visit_ok(addr, job, secs(20)));
            thread::sleep(ms(600));
            set_nofile(pid, 4096);
            visitor.join().unwrap_or_else(|_| panic!("{side} out of fds: the visitor failed: {}", server.p.text()));
            assert_got(&target.report(secs(10)).seen, &job.up, side);
            let closes = [server.p.wait_close_lines(1, secs(5)), agent.wait_close_lines(1, secs(5))];
            for l in closes.iter().flatten() {
                assert!(field(l, "end") == Some("closed"), "{side} out of fds: {l}");
            }
        }
    }

    /// Bytes exact both ways at once, and half-close through both hops each way:
    /// the visitor's EOF reaches the target while the target still answers, and the
    /// target's EOF reaches the visitor while the visitor still sends. Server started
    /// from the command line; close lines on both sides.
    fn basic_bytes_and_half_close(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let target = Target::start();
        let server = TunnelServer::cli(mode, "127.0.0.1:0", &token);
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);

        let both = Job::new(BOTH, Payload::new(1, 4 * MIB + 17), Payload::new(2, 3 * MIB + 5));
        let upload = Job::new(UPLOAD_FIRST, Payload::new(3, 3 * MIB + 1), Payload::new(4, 2 * MIB + 3));
        let download = Job::new(DOWNLOAD_FIRST, Payload::new(5, 2 * MIB + 7), Payload::new(6, 3 * MIB + 9));
        let mut outs = Vec::new();
        for job in [both, upload, download] {
            let out = visit_ok(server.visitors, job, secs(60));
            assert_eq!(out.down, Digested::of(&job.down), "visitor ({}) received", job.op as char);
            if let Some(a) = out.answer {
                assert_eq!(a, Digested::of(&job.up), "target's answer after the visitor's EOF");
            }
            let r = target.report(secs(30));
            assert_got(&r.seen, &job.up, &format!("target ({}) received", job.op as char));
            outs.push((job, out));
        }
        let target_addr = target.addr().to_string();
        for (job, out) in &outs {
            let up = HEADER_LEN as u64 + job.up.len;
            let l = close_of(&server.p, out.local, secs(10));
            check_close(&l, &server.rule, "agent:web", up, out.down_wire, "closed");
            // Without a link loss no tunnelled byte crosses userspace.
            assert_eq!(field(&l, "userspace_bytes"), Some("0"), "server: {l}");
            let l = close_of(&agent, out.local, secs(10));
            check_close(&l, "web", &target_addr, up, out.down_wire, "closed");
            assert_eq!(field(&l, "userspace_bytes"), Some("0"), "agent: {l}");
        }
    }

    /// `http_auth` and `deny_pattern` on a rule served by an agent (issue 11's
    /// reverse proxy whose visitors authenticate by a header): a visitor without the
    /// token gets 401, one whose first bytes match is reset, and neither sends the
    /// target a byte; an authorized request reaches the target without the header.
    fn inspection_checks_visitors(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let secret = format!("visitor-secret-{}", std::process::id());
        let visitor_token = token_file(&dir, "visitor.token", &secret);
        let rule_extra = format!(
            "http_auth = {{ header = \"X-Forwarder-Auth\", token_file = \"{}\" }}\n\
             deny_pattern = ['^SSH-']",
            visitor_token.display()
        );
        let token = token_file(&dir, "token", TOKEN);
        let (raw, raw_rx) = raw_http_recorder();
        let server = TunnelServer::config(mode, &server_toml("127.0.0.1:0", &token, "", &rule_extra));
        let agent = agent_config(server.tunnel, raw.addr(), &token, None);
        wait_connected(&server, &agent, 1);
        let url = format!("http://{}/t?x=1", server.visitors);

        let (status, body, _) = curl(&url, &[]);
        assert_eq!(status, 401, "no header: {}", String::from_utf8_lossy(&body));
        let s = connect(server.visitors);
        (&s).write_all(b"SSH-2.0-OpenSSH_9.2\r\n").unwrap();
        let (ending, _) = wait_closed(&s, secs(10)).unwrap_or_else(|e| panic!("SSH visitor: {e}"));
        assert_eq!(ending, Ending::Reset, "a denied visitor is reset");
        let header = format!("X-Forwarder-Auth: {secret}");
        let (status, body, _) = curl(&url, &["-H", &header, "-H", "X-Other: keep"]);
        assert_eq!((status, body.as_slice()), (200, b"raw".as_slice()), "with the token");

        // The target's connections: the refused visitors' (if the agent opened them
        // before their reset came) got nothing; the authorized one its request, the
        // auth header cut.
        let mut heads = Vec::new();
        while heads.iter().all(|h: &Vec<u8>| h.is_empty()) {
            heads.push(raw_rx.recv_timeout(secs(10)).expect("the authorized request at the target"));
        }
        thread::sleep(ms(300));
        heads.extend(raw_rx.try_iter());
        let (got, refused): (Vec<_>, Vec<_>) = heads.into_iter().partition(|h| !h.is_empty());
        assert!(refused.len() <= 2, "{} empty target connections", refused.len());
        assert_eq!(got.len(), 1, "requests at the target: {got:?}");
        let got = String::from_utf8(got[0].clone()).expect("utf-8 request");
        assert!(got.starts_with("GET /t?x=1 HTTP/1.1\r\n") && got.ends_with("\r\n\r\n"), "{got:?}");
        assert!(got.contains("\r\nX-Other: keep\r\n") && got.contains("\r\nHost: "), "{got:?}");
        assert!(!got.to_ascii_lowercase().contains("x-forwarder-auth") && !got.contains(&secret), "{got:?}");

        assert!(wait_until(secs(10), || server.p.close_lines().len() == 3), "{:#?}", server.p.close_lines());
        let ends: Vec<String> = server.p.close_lines().iter().map(|l| {
            if !l.contains(" end=closed") {
                assert_eq!(num(l, "bytes_up"), 0, "a refused visitor's bytes went on: {l}");
            }
            field(l, "end").unwrap().to_string()
        }).collect();
        assert_eq!(ends, ["refused_http_auth", "refused_pattern", "closed"], "{:#?}", server.p.close_lines());
        // The agent's side of the refused visitors ends too, with nothing sent on.
        assert!(wait_until(secs(10), || agent.close_lines().len() == 1 + refused.len()), "{:#?}", agent.close_lines());
        for l in agent.close_lines().iter().filter(|l| !l.contains(" end=closed")) {
            assert_eq!(num(l, "bytes_up"), 0, "agent: {l}");
        }
    }

    /// A server-first target behind a rule whose checks wait for the visitor: the
    /// target's greeting (here 2 MiB, eight times resume_buffer, which the agent
    /// sends on only as the server acknowledges it) and its FIN reach the visitor
    /// before the visitor says a word; what the visitor says then reaches the target.
    fn server_first_target_while_checks_wait(mode) {
        let _load = light();
        let greeting = Payload::new(51, 2 * MIB + 11);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let target = Server::start(LOCALHOST, move |s| {
            let tx = tx.lock().unwrap().clone();
            let got = send(&s, greeting, 0, Instant::now() + secs(60))
                .and_then(|()| s.shutdown(Shutdown::Write))
                .and_then(|()| read_to_end(&s, 1024, Instant::now() + secs(60)));
            let _ = tx.send(got.map_err(|e| e.to_string()));
        });
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let server = TunnelServer::config(
            mode,
            &server_toml("127.0.0.1:0", &token, "resume_buffer = 262144", "deny_pattern = ['^SSH-']"),
        );
        let agent = agent_config(server.tunnel, target.addr(), &token, None);
        wait_connected(&server, &agent, 1);

        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        let down = read_digest(&s, Instant::now() + secs(20))
            .unwrap_or_else(|e| panic!("the greeting and its FIN, before the visitor sent a byte: {e}"));
        assert_eq!(down, Digested::of(&greeting), "the greeting");
        (&s).write_all(b"hello, not ssh").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let got = rx.recv_timeout(secs(20)).expect("the target's report").expect("the target");
        assert_eq!(got, b"hello, not ssh", "what the target received");
        let l = close_of(&server.p, visitor, secs(10));
        check_close(&l, &server.rule, "agent:web", 14, greeting.len, "closed");
    }

    /// A link reset while a visitor's `http_auth` check waits for the rest of its
    /// request head is a lost link like any other: the visitor is not ended, the agent
    /// comes back, and the request, checked once complete, reaches the target
    /// (without the header), with the answer back.
    fn link_reset_while_the_checks_wait(mode) {
        let ns = NetNs::new();
        let (raw, raw_rx) = ns.run(raw_http_recorder);
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let secret = format!("visitor-secret-{}", std::process::id());
        let visitor_token = token_file(&dir, "visitor.token", &secret);
        let rule_extra = format!(
            "http_auth = {{ header = \"X-Forwarder-Auth\", token_file = \"{}\" }}",
            visitor_token.display()
        );
        let tunnel_listen = format!("{}:0", ns.host_ip());
        let server = TunnelServer::config(
            mode,
            &server_toml(&tunnel_listen, &token, "resume_grace = \"60s\"", &rule_extra),
        );
        let agent = agent_config(server.tunnel, raw.addr(), &token, Some(&ns));
        let session = wait_connected(&server, &agent, 1);

        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        (&s).write_all(b"GET /r?x=1 HTTP/1.1\r\nHost: example\r\n").unwrap();
        assert!(
            wait_until(secs(10), || raw.accepted() == 1),
            "the agent did not open the target connection"
        );
        thread::sleep(ms(200));
        let killed = ns.kill_sockets_to(server.tunnel.port());
        assert!(killed >= 1, "ss -K found no tunnel socket to kill");
        let resumed = server.p.expect_line("link resumed", secs(30), |l| is_line(l, "link resumed"));
        assert_eq!(field(&resumed, "session"), Some(session.as_str()), "{resumed}");
        assert_eq!(field(&resumed, "streams"), Some("1"), "{resumed}");

        (&s).write_all(format!("X-Forwarder-Auth: {secret}\r\nX-Other: keep\r\n\r\n").as_bytes())
            .unwrap();
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nraw";
        let got = read_exact_timeout(&s, answer.len(), secs(20))
            .unwrap_or_else(|e| panic!("the answer after the link came back: {e}"));
        assert_eq!(got, answer, "the answer");
        s.shutdown(Shutdown::Write).unwrap();
        let head = raw_rx.recv_timeout(secs(10)).expect("the request at the target");
        assert_eq!(
            String::from_utf8_lossy(&head),
            "GET /r?x=1 HTTP/1.1\r\nHost: example\r\nX-Other: keep\r\n\r\n",
            "the request the target got"
        );
        let l = close_of(&server.p, visitor, secs(10));
        check_close(&l, &server.rule, "agent:web", 53, answer.len() as u64, "closed");
    }

    /// A half-close made during an outage, when every byte before it was delivered and
    /// acknowledged: the target has sent all and shut its side, the visitor read it
    /// all, the link is blackholed until both sides call it lost, and only then does
    /// the visitor shut its side. The server's stream is complete by then; its FIN must
    /// still reach the target as a FIN after the link resumes, not as a reset.
    fn fin_during_an_outage_after_everything_else(mode) {
        let InNetns { _dir, ns, target, server, agent, session } =
            in_netns(mode, "resume_grace = \"60s\"", "");
        let job = Job::new(DOWNLOAD_FIRST, Payload::new(61, 0), Payload::new(62, 256 * KIB));
        let s = open(server.visitors, &job);
        let visitor = s.local_addr().unwrap();
        let down = read_digest(&s, Instant::now() + secs(20)).expect("the target's bytes and FIN");
        assert_eq!(down, Digested::of(&job.down), "the visitor received");
        // Acknowledged both ways (acks go out within 5 ms of a quiet moment).
        thread::sleep(ms(300));
        let bh = ns.blackhole();
        server.p.expect_line("link lost", secs(10), |l| is_line(l, "link lost"));
        agent.expect_line("link lost", secs(10), |l| is_line(l, "link lost"));
        s.shutdown(Shutdown::Write).unwrap();
        thread::sleep(ms(500));
        bh.restore();
        let resumed = server.p.expect_line("link resumed", secs(30), |l| is_line(l, "link resumed"));
        assert_eq!(field(&resumed, "session"), Some(session.as_str()), "{resumed}");
        assert_got(&target.report(secs(20)).seen, &job.up, "the target, after the visitor's FIN");
        let l = close_of(&agent, visitor, secs(10));
        check_close(&l, "web", &target.addr().to_string(), HEADER_LEN as u64, job.down.len, "closed");
        let l = close_of(&server.p, visitor, secs(10));
        check_close(&l, &server.rule, "agent:web", HEADER_LEN as u64, job.down.len, "closed");
    }

    /// The same the other way: the visitor has sent all and shut its side, the target
    /// read it all, the link is blackholed until both sides call it lost, and only
    /// then does the target shut its side. The agent's stream is complete by then; its
    /// FIN must still reach the visitor after the link resumes (the server's stream
    /// waits for it).
    fn target_fin_during_an_outage_after_everything_else(mode) {
        let ns = NetNs::new();
        let close_now = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let close = close_now.clone();
        let target = ns.run(|| {
            Server::start(LOCALHOST, move |s| {
                let got = read_digest(&s, Instant::now() + secs(60));
                let _ = tx.lock().unwrap().send(got.map_err(|e| e.to_string()));
                let waited = wait_until(secs(60), || close.load(Ordering::SeqCst));
                if waited {
                    let _ = s.shutdown(Shutdown::Write);
                }
            })
        });
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let server = TunnelServer::config(
            mode,
            &server_toml(&format!("{}:0", ns.host_ip()), &token, "resume_grace = \"60s\"", ""),
        );
        let agent = agent_config(server.tunnel, target.addr(), &token, Some(&ns));
        let session = wait_connected(&server, &agent, 1);

        let up = Payload::new(71, 256 * KIB);
        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        send(&s, up, 0, Instant::now() + secs(20)).expect("visitor write");
        s.shutdown(Shutdown::Write).unwrap();
        let got = rx.recv_timeout(secs(20)).expect("the target's report").expect("the target");
        assert_eq!(got, Digested::of(&up), "the target received");
        // Acknowledged both ways (acks go out within 5 ms of a quiet moment).
        thread::sleep(ms(300));
        let bh = ns.blackhole();
        server.p.expect_line("link lost", secs(10), |l| is_line(l, "link lost"));
        agent.expect_line("link lost", secs(10), |l| is_line(l, "link lost"));
        close_now.store(true, Ordering::SeqCst);
        thread::sleep(ms(500));
        bh.restore();
        let resumed = server.p.expect_line("link resumed", secs(30), |l| is_line(l, "link resumed"));
        assert_eq!(field(&resumed, "session"), Some(session.as_str()), "{resumed}");
        let down = read_digest(&s, Instant::now() + secs(20))
            .unwrap_or_else(|e| panic!("the target's FIN after the link resumed: {e}"));
        assert_eq!(down.len, 0, "the visitor received bytes");
        let l = close_of(&server.p, visitor, secs(10));
        check_close(&l, &server.rule, "agent:web", up.len, 0, "closed");
        let l = close_of(&agent, visitor, secs(10));
        check_close(&l, "web", &target.addr().to_string(), up.len, 0, "closed");
    }

    /// A visitor whose checks still wait when the rule's idle_timeout ends it is reset,
    /// as every tunnel stream the server ends itself is, and so is the agent's target
    /// connection.
    fn idle_timeout_while_the_checks_wait(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) =
            on_loopback(mode, &dir, "", "deny_pattern = ['^SSH-']\nidle_timeout = \"1s\"");
        let agent = agent_config(server.tunnel, target.addr(), &token, None);
        wait_connected(&server, &agent, 1);
        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        (&s).write_all(b"SS").unwrap();
        let (ending, after) = wait_closed(&s, secs(10)).unwrap_or_else(|e| panic!("visitor: {e}"));
        assert_eq!(ending, Ending::Reset, "the visitor cut by idle_timeout after {after:?}");
        let l = close_of(&server.p, visitor, secs(10));
        assert_eq!(field(&l, "end"), Some("idle_timeout"), "{l}");
        assert_eq!(num(&l, "bytes_up"), 0, "{l}");
        let l = close_of(&agent, visitor, secs(10));
        assert_eq!(num(&l, "bytes_up"), 0, "agent: {l}");
    }

    /// A visitor whose `deny_pattern` check still waits (its bytes could begin a match)
    /// when the link is blackholed is reset once resume_grace is over, as every stream
    /// is (`end=agent_lost`), not left open until the link comes back.
    fn grace_expiry_while_the_checks_wait(mode) {
        let _load = light();
        let InNetns { _dir, ns, target, server, agent: _agent, .. } =
            in_netns(mode, "resume_grace = \"3s\"", "deny_pattern = ['^SSH-']");
        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        (&s).write_all(b"SS").unwrap();
        assert!(
            wait_until(secs(10), || target.server.accepted() == 1),
            "the agent did not open the target connection"
        );
        let _bh = ns.blackhole();
        let t0 = Instant::now();
        let (ending, _) = wait_closed(&s, secs(30)).unwrap_or_else(|e| panic!("visitor: {e}"));
        assert_eq!(ending, Ending::Reset, "the visitor after the grace period");
        let took = t0.elapsed();
        assert!(took >= secs(3), "reset before resume_grace (3 s) could pass: {took:?}");
        let l = close_of(&server.p, visitor, secs(10));
        assert_eq!(field(&l, "end"), Some("agent_lost"), "{l}");
        assert_eq!(num(&l, "bytes_up"), 0, "{l}");
        server.p.expect_line("grace expired", secs(5), |l| is_line(l, "grace expired"));
    }

    /// The bytes an inspected visitor's checks passed on are the stream's like any:
    /// kept until the agent acknowledges them, and sent again after the link is lost.
    /// The visitor's first bytes go into a blackholed link, the agent's sockets are
    /// reset, and every byte still arrives exactly once, both ways; the dump shows
    /// each direction's first 64 bytes, and only those and the checked ones crossed
    /// userspace.
    fn inspected_visitor_resumes_with_what_the_checks_passed(mode) {
        let dumps = TempDir::new("tunnel-dumps");
        let rule_extra = format!(
            "deny_pattern = ['^SSH-']\ninspect = {{ bytes = 64, format = \"hex\", to = \"{}\" }}",
            dumps.path().display()
        );
        let InNetns { _dir, ns, target, server, agent: _agent, session } =
            in_netns(mode, "resume_grace = \"90s\"", &rule_extra);

        let job = Job::new(BOTH, Payload::new(41, 3 * MIB + 7), Payload::new(42, 2 * MIB + 3));
        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        assert!(
            wait_until(secs(10), || target.server.accepted() == 1),
            "the agent did not open the target connection"
        );
        let bh = ns.blackhole();
        // Checked (its first byte cannot begin `SSH-`) and passed on by the prelude,
        // into the blackhole.
        (&s).write_all(&job.encode()).unwrap();
        thread::sleep(ms(500));
        assert_eq!(target.received(), 0, "bytes crossed the blackhole");
        let killed = ns.kill_sockets_to(server.tunnel.port());
        assert!(killed >= 1, "ss -K found no tunnel socket to kill");
        bh.restore();

        let deadline = Instant::now() + secs(90);
        let seen = AtomicU64::new(0);
        let down = thread::scope(|sc| {
            let writer = sc.spawn(|| {
                send(&s, job.up, 0, deadline).expect("visitor write");
                s.shutdown(Shutdown::Write).expect("visitor shutdown");
            });
            let down = read_digest_counted(&s, deadline, &seen);
            writer.join().expect("visitor writer");
            down.expect("visitor read")
        });
        assert_eq!(down, Digested::of(&job.down), "the visitor received");
        assert_got(&target.report(secs(30)).seen, &job.up, "the target received");
        let resumed = server.p.expect_line("link resumed", secs(10), |l| is_line(l, "link resumed"));
        assert_eq!(field(&resumed, "session"), Some(session.as_str()), "{resumed}");
        assert_eq!(field(&resumed, "streams"), Some("1"), "{resumed}");

        let l = close_of(&server.p, visitor, secs(10));
        check_close(&l, &server.rule, "agent:web", HEADER_LEN as u64 + job.up.len, job.down.len, "closed");
        // The checked header (41 bytes), then the rest of the dumps (23 + 64).
        assert_eq!(num(&l, "userspace_bytes"), 128, "{l}");
        let chunks = dump_file(dumps.path(), &server.rule, true);
        let mut up = job.encode().to_vec();
        let mut more = [0u8; 23];
        job.up.fill(0, &mut more);
        up.extend_from_slice(&more);
        let mut down = [0u8; 64];
        job.down.fill(0, &mut down);
        assert_eq!(stream(&chunks, '>'), up, "the dump of the visitor's bytes");
        assert_eq!(stream(&chunks, '<'), down, "the dump of the target's bytes");
    }

    /// `download_rate` and `upload_rate` on an `agent:` rule pace its tunnel streams as
    /// they pace a splice pair (nginx's proxy_download_rate/proxy_upload_rate): a
    /// second's worth at once, then the rate, each direction alone, every byte exact.
    /// The same keys on the agent's `[[service]]` pace them there (frp's client-side
    /// bandwidthLimit), with the server's rule unpaced.
    fn rates_pace_tunnel_streams(mode) {
        let _load = light();
        const RATE: u64 = MIB;
        // 3 MiB: the first second's worth at once, the other two take two seconds, less
        // the read's quantum the bucket waits for (a fiftieth of a second).
        let paced = ms(1900);
        let cases = [("download_rate", 0), ("upload_rate", 1)]
            .into_iter()
            .flat_map(|(key, d)| [(key, d, "rule"), (key, d, "service")]);
        for (key, d, on) in cases {
            let keys = format!("{key} = {RATE}");
            let (rule_keys, service_keys) = match on {
                "rule" => (keys.as_str(), ""),
                _ => ("", keys.as_str()),
            };
            let key = format!("{on} {key}");
            let dir = TempDir::new("tunnel");
            let (token, target, server) = on_loopback(mode, &dir, "", rule_keys);
            let agent = agent_config_with(server.tunnel, target.addr(), &token, None, service_keys);
            wait_connected(&server, &agent, 1);
            let download = Job::new(DOWNLOAD_FIRST, Payload::new(90, 4 * KIB), Payload::new(91, 3 * RATE));
            let upload = Job::new(UPLOAD_FIRST, Payload::new(92, 3 * RATE), Payload::new(93, 4 * KIB));
            let mut times = [Duration::ZERO; 2];
            for (i, job) in [download, upload].into_iter().enumerate() {
                let t0 = Instant::now();
                let out = visit_ok(server.visitors, job, secs(30));
                times[i] = t0.elapsed();
                assert_eq!(out.down, Digested::of(&job.down), "{key}: the visitor received");
                if let Some(a) = out.answer {
                    assert_eq!(a, Digested::of(&job.up), "{key}: the target's answer");
                }
                assert_got(&target.report(secs(10)).seen, &job.up, &key);
            }
            eprintln!("{key}: down {:?}, up {:?}", times[0], times[1]);
            assert!(times[d] >= paced, "{key}: 3 MiB at 1 MiB/s took {:?}", times[d]);
            assert!(times[d] < secs(10), "{key}: {:?}", times[d]);
            assert!(times[1 - d] * 2 < times[d], "{key}: the other direction was held back: {times:?}");
            for p in [&server.p, &agent] {
                for l in p.wait_close_lines(2, secs(5)) {
                    assert_eq!(field(&l, "end"), Some("closed"), "{key}: {l}");
                }
            }
        }
    }

    /// A visitor's reset resets the target's connection; a target's reset resets
    /// the visitor's.
    fn reset_passes_both_ways(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "", "");
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);

        // Visitor resets.
        let job = Job::new(HOLD, Payload::new(11, 0), Payload::new(12, 0));
        let s = open(server.visitors, &job);
        let visitor = s.local_addr().unwrap();
        ping(&s, b"hello through the tunnel", secs(10)).expect("round trip");
        reset(s);
        let r = target.report(secs(10));
        assert_eq!(r.seen, Seen::Ended(Ending::Reset), "the target's connection after the visitor's reset");
        let l = close_of(&server.p, visitor, secs(10));
        assert!(field(&l, "end").is_some_and(|e| e.starts_with("client_reset")), "server: {l}");
        let l = close_of(&agent, visitor, secs(10));
        assert!(field(&l, "end").is_some_and(|e| e.starts_with("client_reset")), "agent: {l}");

        // Target resets.
        let job = Job::new(RESET, Payload::new(13, 0), Payload::new(14, 0));
        let s = open(server.visitors, &job);
        let visitor = s.local_addr().unwrap();
        let plus = read_exact_timeout(&s, 1, secs(10)).expect("the target's +");
        assert_eq!(plus, b"+");
        (&s).write_all(b"k").unwrap();
        let (ending, took) = wait_closed(&s, secs(10)).unwrap_or_else(|e| panic!("visitor: {e}"));
        assert_eq!(ending, Ending::Reset, "the visitor's connection after the target's reset");
        println!("target reset reached the visitor in {took:.2?}");
        assert_eq!(target.report(secs(5)).seen, Seen::Ended(Ending::Reset));
        let l = close_of(&server.p, visitor, secs(10));
        assert!(field(&l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "server: {l}");
        let l = close_of(&agent, visitor, secs(10));
        assert!(field(&l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "agent: {l}");
    }

    /// 200 visitors open at once, each echoing its own data through the tunnel.
    fn parallel_200_visitors(mode) {
        let _load = light();
        raise_nofile();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let echo = Server::echo();
        let server = TunnelServer::config(mode, &server_toml("127.0.0.1:0", &token, "", ""));
        let agent = agent_cli(server.tunnel, echo.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        let payloads: Vec<Payload> = (0..200)
            .map(|i| Payload::new(30_000 + i, 1000 + i * 1531))
            .collect();
        drive_paired_echo_clients(server.visitors, &payloads, Instant::now() + secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(echo.accepted(), 200, "target connections");
        for (p, what) in [(&server.p, "agent:web".to_string()), (&agent, echo.addr().to_string())] {
            let closes = p.wait_close_lines(200, secs(20));
            assert_eq!(closes.len(), 200, "{} close lines", p.label);
            for l in &closes {
                assert_eq!(field(l, "upstream"), Some(what.as_str()), "{}: {l}", p.label);
                assert_eq!(field(l, "end"), Some("closed"), "{}: {l}", p.label);
            }
        }
    }

    /// With no agent connected, a visitor waits up to the rule's connect_timeout and
    /// is closed with `end=no_agent`.
    fn no_agent_closes_after_connect_timeout(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let server = TunnelServer::config(
            mode,
            &server_toml("127.0.0.1:0", &token, "", "connect_timeout = \"1s\""),
        );
        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        let (ending, took) = wait_closed(&s, secs(10)).unwrap_or_else(|e| panic!("visitor: {e}"));
        println!("visitor closed ({ending:?}) after {took:.2?}");
        assert!(took >= ms(800) && took <= secs(5), "closed after {took:?}, connect_timeout is 1 s");
        // Closed, as a client whose upstream refuses is: nothing was relayed.
        assert_eq!(ending, Ending::Eof, "the visitor's connection without an agent");
        let l = close_of(&server.p, visitor, secs(5));
        assert_eq!(field(&l, "upstream"), Some("agent:web"), "{l}");
        assert_eq!(field(&l, "end"), Some("no_agent"), "{l}");
    }

    /// `forwarder_upstream_up{upstream="agent:web"}` follows the agents (0 before one
    /// connects, 1 while one serves, 0 once it is gone), and a visitor closed with
    /// `end=no_agent` counts in `forwarder_upstream_connect_errors_total`.
    fn agent_upstream_metrics_follow_the_agents(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let target = Target::start();
        let maddr = free_loopback_addr();
        let server = TunnelServer::config(
            mode,
            &format!(
                "[global]\nmetrics = \"{maddr}\"\n\n{}",
                server_toml("127.0.0.1:0", &token, "resume_grace = \"1s\"", "connect_timeout = \"1s\"")
            ),
        );
        let agent_web = ["upstream=\"agent:web\""];
        let wait_for = |name: &str, want: f64| wait_scraped(maddr, name, &agent_web, want);
        assert_eq!(scraped(maddr, "forwarder_upstream_up", &agent_web), 0.0, "no agent yet");
        assert_no_agent_got_in(&server, &target);
        wait_for("forwarder_upstream_connect_errors_total", 1.0);
        let mut agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        wait_for("forwarder_upstream_up", 1.0);
        agent.kill();
        wait_for("forwarder_upstream_up", 0.0);
    }

    /// An agent with `[global] metrics` counts its target connections as a rule's,
    /// under `rule` = the service, as its close lines name them: the pair and its
    /// bytes each way (its /metrics had none of them).
    fn agent_metrics_count_its_target_connections(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let target = Target::start();
        let server = TunnelServer::cli(mode, "127.0.0.1:0", &token);
        let maddr = free_loopback_addr();
        let agent = agent_with_global(server.tunnel, &token, target.addr(), &format!("metrics = \"{maddr}\""));
        wait_connected(&server, &agent, 1);

        let job = Job::new(BOTH, Payload::new(7, 300 * KIB + 5), Payload::new(8, 200 * KIB + 3));
        let out = visit_ok(server.visitors, job, secs(60));
        assert_eq!(out.down, Digested::of(&job.down), "visitor received");
        let l = close_of(&agent, out.local, secs(10));
        let text = metrics_text(maddr);
        let metric = |name: &str, labels: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && l.contains(labels))
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(metric("forwarder_connections_total", "rule=\"web\""), 1.0, "{text}");
        assert_eq!(metric("forwarder_connections_active", "rule=\"web\""), 0.0, "{text}");
        for (direction, key) in [("to_upstream", "bytes_up"), ("to_client", "bytes_down")] {
            let labels = format!("rule=\"web\",direction=\"{direction}\"");
            assert_eq!(metric("forwarder_bytes_total", &labels) as u64, num(&l, key), "{l}\n{text}");
        }
    }

    /// The tunnel's series follow a link loss and its resume, on both sides: the
    /// agents and the link's state, each link event counted once as it is logged, the
    /// held visitor's stream `waiting` while the link is down, the bytes it sent
    /// meanwhile retained by the server (exactly those) until the agent is back and
    /// acknowledges them (they arrive byte-exact), and no stream once the visitor left.
    fn tunnel_metrics_follow_a_link_loss_and_resume(mode) {
        let _load = light();
        let m = Metered::start(mode, "60s");
        m.events([1.0, 0.0, 0.0, 0.0]);
        m.streams(0.0, 0.0, &m.sides());
        let visitors = hold_visitors(&m.server, 1, 40, b"before the loss");
        let visitor = &visitors[0];
        m.streams(1.0, 0.0, &m.sides());
        let during = m.outage(visitor, |_| {});
        // Resumed: the agent saw its link fail too, and came back.
        m.events([1.0, 1.0, 1.0, 0.0]);
        wait_scraped(m.am, "forwarder_tunnel_link_up", &[], 1.0);
        wait_scraped(m.sm, "forwarder_tunnel_agents", &["service=\"web\""], 1.0);
        m.streams(1.0, 0.0, &m.sides());
        let echoed = read_exact_timeout(visitor, during.len(), secs(20)).expect("the echo after the resume");
        assert!(echoed == during, "the bytes sent during the outage came back altered");
        for (addr, _) in m.sides() {
            wait_scraped(addr, "forwarder_tunnel_retained_bytes", &[], 0.0);
        }
        drop(visitors);
        m.streams(0.0, 0.0, &m.sides());
        m.events([1.0, 1.0, 1.0, 0.0]);
    }

    /// Past resume_grace the series say so: the server counts `grace_expired` once, the
    /// expired session's stream is gone (not waiting) and what it held for replay is
    /// released; the agent, back, counts the loss and the expiry once each and its new
    /// session as `connected`, as does the server. (5 s: the outage's checks, which
    /// must see the stream waiting, fit in it on a loaded host.)
    fn tunnel_metrics_after_grace_expiry(mode) {
        let _load = light();
        let m = Metered::start(mode, "5s");
        let visitors = hold_visitors(&m.server, 1, 42, b"before the loss");
        m.streams(1.0, 0.0, &m.sides());
        m.outage(&visitors[0], |m| {
            wait_scraped(m.sm, "forwarder_tunnel_link_events_total", &["side=\"server\"", "event=\"grace_expired\""], 1.0);
            m.streams(0.0, 0.0, &m.sides()[..1]);
            wait_scraped(m.sm, "forwarder_tunnel_retained_bytes", &[], 0.0);
        });
        m.events([2.0, 1.0, 0.0, 1.0]);
        wait_scraped(m.am, "forwarder_tunnel_link_up", &[], 1.0);
        wait_scraped(m.sm, "forwarder_tunnel_agents", &["service=\"web\""], 1.0);
        m.streams(0.0, 0.0, &m.sides());
    }

    /// An agent with the wrong token is refused and logged; visitors get `no_agent`
    /// and nothing reaches the target.
    fn wrong_token_refused(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let wrong = token_file(&dir, "wrong", "not-the-tunnel-token-0000");
        let target = Target::start();
        let server = TunnelServer::config(
            mode,
            &server_toml("127.0.0.1:0", &token, "", "connect_timeout = \"1s\""),
        );
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&wrong), None);
        let l = server.p.expect_line("agent refused", secs(15), |l| is_line(l, "agent refused"));
        assert_eq!(field(&l, "reason"), Some("bad_token"), "{l}");
        assert!(
            field(&l, "agent").is_some_and(|a| a.starts_with("127.0.0.1:")),
            "agent= of {l}"
        );
        assert_no_agent_got_in(&server, &target);
        let agent_ok = agent.matching(|l| is_line(l, "agent connected"));
        assert!(agent_ok.is_empty(), "the agent says it connected: {agent_ok:?}");
    }

    /// The agent↔server link is blackholed for 65 s in the middle of 4 concurrent
    /// 32 MiB transfers each way; it comes back and every byte arrives exactly.
    fn blackhole_65s_then_resume(mode) {
        let _load = light();
        resume_after(mode, Fault::Blackhole(secs(65)));
    }

    /// The same with the link reset (`ss -K` of the agent's tunnel sockets).
    fn resume_after_link_reset(mode) {
        let _load = light();
        resume_after(mode, Fault::Reset);
    }

    /// The same with a resume_buffer of 16 KiB (any size is taken, not only a pipe's
    /// 64 KiB and more): acks every 4 KiB, and every byte still arrives exactly.
    fn resume_with_a_small_resume_buffer(mode) {
        let _load = light();
        resume_after_with(mode, Fault::Reset, "resume_grace = \"150s\"\nresume_buffer = 16384");
    }

    /// The same with the agent coming back from another source address.
    fn resume_from_new_agent_address(mode) {
        let _load = light();
        resume_after(mode, Fault::NewAddress);
    }

    /// With resume_grace = 3s and the link blackholed for good, visitor and target
    /// get a reset (`end=agent_lost`), and the server's fds return to their baseline.
    fn grace_expiry_resets_both_ends(mode) {
        let _load = light();
        let InNetns { _dir, ns, target, server, agent, session } =
            in_netns(mode, "resume_grace = \"3s\"", "");
        // A warm-up visitor, so lazily made things exist before the baseline.
        warm_up(&server, &target, 40);
        thread::sleep(secs(1));
        let baseline = server.p.fd_count();

        let held = hold_visitors(&server, 2, 50, b"still there?");
        let bh = ns.blackhole();
        let t0 = Instant::now();
        for (i, s) in held.iter().enumerate() {
            let left = secs(45).saturating_sub(t0.elapsed());
            let (ending, _) = wait_closed(s, left).unwrap_or_else(|e| panic!("visitor #{i}: {e}"));
            assert_eq!(ending, Ending::Reset, "visitor #{i} after the grace period");
        }
        let took = t0.elapsed();
        println!("visitors reset {took:.1?} after the blackhole began");
        assert!(took >= secs(3), "reset before resume_grace (3 s) could pass: {took:?}");
        for r in target.reports(2, secs(15)) {
            assert_eq!(r.seen, Seen::Ended(Ending::Reset), "target connection after the grace period");
        }
        let visitors: Vec<SocketAddr> = held.iter().map(|s| s.local_addr().unwrap()).collect();
        drop(held);
        for v in &visitors {
            let l = close_of(&server.p, *v, secs(10));
            assert_eq!(field(&l, "end"), Some("agent_lost"), "server: {l}");
            let l = close_of(&agent, *v, secs(10));
            assert_eq!(field(&l, "end"), Some("agent_lost"), "agent: {l}");
        }
        let l = server.p.expect_line("grace expired", secs(5), |l| is_line(l, "grace expired"));
        assert_eq!(field(&l, "session"), Some(session.as_str()), "{l}");
        assert_eq!(field(&l, "streams_reset"), Some("2"), "{l}");
        agent.expect_line("grace expired", secs(15), |l| is_line(l, "grace expired"));

        // The link comes back: the agent starts a new session and visitors work again.
        bh.restore();
        second_session_carries_visitors(&server, &agent, &target, &session, 60, "a session outlived its grace period", "after the new session");
        let back = wait_until(secs(15), || server.p.fd_count() <= baseline);
        assert!(
            back,
            "server fds {} after the grace expiry, baseline {baseline}:\n{}",
            server.p.fd_count(),
            sh("ls", &["-l", &format!("/proc/{}/fd", server.p.pid())])
        );
    }

    /// An agent restarted (SIGKILL, new process): the old session's streams are reset
    /// at once, not after resume_grace, and new visitors work immediately.
    fn agent_restart_takes_over(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "resume_grace = \"120s\"", "");
        let mut old = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        let session = wait_connected(&server, &old, 1);
        let held = hold_visitors(&server, 2, 70, b"before the restart");
        old.kill();
        let t0 = Instant::now();
        let new = agent_cli(server.tunnel, target.addr(), Token::Env(TOKEN), None);
        let new_session = wait_connected(&server, &new, 2);
        assert_ne!(new_session, session);
        println!("new agent connected {:.2?} after the kill", t0.elapsed());
        for (i, s) in held.iter().enumerate() {
            let (ending, _) = wait_closed(s, secs(10).saturating_sub(t0.elapsed()))
                .unwrap_or_else(|e| panic!("old stream #{i} after the agent restart: {e}"));
            println!("old stream #{i} ended ({ending:?}) {:.2?} after the kill", t0.elapsed());
        }
        for s in &held {
            let l = close_of(&server.p, s.local_addr().unwrap(), secs(5));
            assert_ne!(field(&l, "end"), Some("closed"), "old stream: {l}");
        }
        // The old target connections ended with the old process.
        for r in target.reports(2, secs(10)) {
            assert!(matches!(r.seen, Seen::Ended(_)), "old target connection: {r:?}");
        }
        let job = Job::new(BOTH, Payload::new(80, MIB), Payload::new(81, MIB));
        let out = visit_ok(server.visitors, job, secs(20));
        assert_eq!(out.down, Digested::of(&job.down));
        assert_got(&target.report(secs(10)).seen, &job.up, "through the new agent");
        let l = close_of(&new, out.local, secs(10));
        check_close(&l, "web", &target.addr().to_string(), HEADER_LEN as u64 + MIB, MIB, "closed");
    }

    /// Two agents with the same configuration on one host (the same identity) are two
    /// live sessions, and both carry visitors: neither replaces the other (they did,
    /// back and forth, thousands of times a second, resetting every stream). A third
    /// started after one of them is killed replaces only the dead one's session, at
    /// once, and that session's grace never expires afterwards.
    fn identical_agents_both_serve(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) =
            on_loopback(mode, &dir, "resume_grace = \"5s\"", "balance = \"round_robin\"");
        let a = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        let sa = wait_connected(&server, &a, 1);
        let mut b = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        let sb = wait_connected(&server, &b, 2);
        assert_ne!(sa, sb);
        for i in 0..6 {
            let job = Job::new(BOTH, Payload::new(90 + 2 * i, 64 * KIB), Payload::new(91 + 2 * i, 64 * KIB));
            let out = visit_ok(server.visitors, job, secs(20));
            assert_eq!(out.down, Digested::of(&job.down));
            assert_got(&target.report(secs(10)).seen, &job.up, "through an identical agent");
        }
        let closes = |p: &Proc| p.matching(|l| is_line(l, "close")).len();
        let deadline = Instant::now() + secs(10);
        while closes(&a) + closes(&b) < 6 && Instant::now() < deadline {
            std::thread::sleep(ms(20));
        }
        assert!(
            closes(&a) >= 1 && closes(&b) >= 1 && closes(&a) + closes(&b) == 6,
            "close lines: {} on the first agent, {} on the second, want both and 6 in all; server:\n{}",
            closes(&a),
            closes(&b),
            link_events(&server.p).join("\n")
        );
        let connected = server.p.matching(|l| is_line(l, "agent connected")).len();
        let replaced = server.p.matching(|l| is_line(l, "session replaced"));
        assert!(
            connected == 2 && replaced.is_empty(),
            "{connected} sessions started and {} replaced, want 2 and none:\n{}",
            replaced.len(),
            link_events(&server.p).join("\n")
        );

        // The second agent restarted: only its session goes, at once.
        b.kill();
        let t0 = Instant::now();
        let c = agent_cli(server.tunnel, target.addr(), Token::Env(TOKEN), None);
        wait_connected(&server, &c, 3);
        let l = server.p.expect_line("session replaced", secs(10), |l| {
            is_line(l, "session replaced")
        });
        assert_eq!(field(&l, "session"), Some(sb.as_str()), "{l}");
        // Past the dead session's grace (5 s from the kill): nothing more to say.
        std::thread::sleep(secs(6).saturating_sub(t0.elapsed()));
        let events = link_events(&server.p);
        assert!(
            !events.iter().any(|l| is_line(l, "grace expired"))
                && server.p.matching(|l| is_line(l, "session replaced")).len() == 1,
            "after the restart:\n{}",
            events.join("\n")
        );
        let job = Job::new(BOTH, Payload::new(110, 64 * KIB), Payload::new(111, 64 * KIB));
        let out = visit_ok(server.visitors, job, secs(20));
        assert_eq!(out.down, Digested::of(&job.down));
        assert_got(&target.report(secs(10)).seen, &job.up, "after the restart");
    }

    /// TCP urgent data from a visitor (telnet, FTP's ABOR): the tunnel has no way to
    /// carry urgency, so the urgent byte is dropped, as socat and HAProxy do, and every
    /// normal byte reaches the target, before the visitor's FIN and in order; then EOF.
    /// (splice stops at the urgent mark: the stream was reset, and before that stalled
    /// or was cut short.)
    fn urgent_byte_is_dropped_and_the_stream_goes_on(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, _target, server) = on_loopback(mode, &dir, "", "");
        let (up, rx) = Urgent::server();
        let agent = agent_cli(server.tunnel, up.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        let s = connect(server.visitors);
        Urgent::send(&s);
        let got = rx.recv_timeout(secs(15)).expect("the target never reported");
        assert!(
            got == Urgent::normal(),
            "before the visitor's FIN the target got {} bytes ({:?}...), want abc + {} bytes",
            got.len(),
            String::from_utf8_lossy(&got[..got.len().min(16)]),
            Urgent::TAIL
        );
        s.shutdown(Shutdown::Write).unwrap();
        let rest = rx.recv_timeout(secs(15)).expect("the target saw no EOF");
        assert!(rest.is_empty(), "after the FIN: {:?}", String::from_utf8_lossy(&rest));
        let l = close_of(&server.p, s.local_addr().unwrap(), secs(10));
        assert_eq!(field(&l, "end"), Some("closed"), "{l}");
    }

    /// The target reads nothing for 5 s while the visitor sends 64 MiB: TCP pushes
    /// back to the visitor, the server's and agent's memory stays bounded, and then
    /// every byte arrives exactly.
    fn slow_target_bounded_memory(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "", "");
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        // Warm up (allocations made once), then the baseline.
        let warm = Job::new(BOTH, Payload::new(90, 2 * MIB), Payload::new(91, 2 * MIB));
        visit_ok(server.visitors, warm, secs(20));
        assert_got(&target.report(secs(10)).seen, &warm.up, "warm-up");
        thread::sleep(ms(500));
        let rss = || proc_rss(server.p.pid()) + proc_rss(agent.pid());
        let base = rss();
        let read_before = target.received();

        let job = Job {
            op: SLOW,
            up: Payload::new(92, 64 * MIB),
            down: Payload::new(93, 0),
            rate: 5000,
        };
        let sent = Arc::new(AtomicU64::new(0));
        let seen = Arc::new(AtomicU64::new(0));
        let (s2, r2) = (sent.clone(), seen.clone());
        let addr = server.visitors;
        let t0 = Instant::now();
        let h = thread::spawn(move || visit(addr, job, Instant::now() + secs(90), &r2, &s2));
        let mut peak = base;
        let mut stalled_at = None;
        // Bounded: 100 ms steps until the visitor finishes or 90 s pass.
        while !h.is_finished() && t0.elapsed() < secs(90) {
            peak = peak.max(rss());
            if stalled_at.is_none() && t0.elapsed() >= ms(4500) {
                stalled_at = Some((
                    sent.load(Ordering::SeqCst),
                    target.received() - read_before,
                ));
            }
            thread::sleep(ms(100));
        }
        let out = h.join().expect("visitor panicked").unwrap_or_else(|e| panic!("visitor: {e}"));
        assert_eq!(out.answer, Some(Digested::of(&job.up)), "what the slow target received");
        assert_got(&target.report(secs(10)).seen, &job.up, "slow target");
        let (sent_stalled, target_stalled) = stalled_at.expect("transfer ended within 4.5 s");
        println!(
            "while the target slept: visitor had sent {:.1} MiB, target read {target_stalled}; \
             RSS server+agent {:.1} MiB -> peak {:.1} MiB",
            sent_stalled as f64 / MIB as f64,
            base as f64 / MIB as f64,
            peak as f64 / MIB as f64
        );
        assert!(t0.elapsed() >= secs(5), "done before the target read anything");
        assert!(
            sent_stalled < 48 * MIB,
            "the visitor could send {sent_stalled} bytes to a target that read nothing: no push back"
        );
        let growth = peak.saturating_sub(base);
        assert!(
            growth < 8 * MIB,
            "server+agent RSS grew by {:.1} MiB (from {:.1} MiB) for one slow stream",
            growth as f64 / MIB as f64,
            base as f64 / MIB as f64
        );
        let l = close_of(&server.p, out.local, secs(10));
        check_close(&l, &server.rule, "agent:web", HEADER_LEN as u64 + 64 * MIB, out.down_wire, "closed");
    }

    /// A recorded data-connection header replayed (it answers a challenge that is
    /// never asked again), a data connection of a session that does not exist, one
    /// of the real session with a made-up MAC, and garbage: each is refused and logged
    /// with its reason, none reaches the target, and visitors go on working.
    fn forged_and_replayed_headers_refused(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "", "");
        let rec = Recorder::start(server.tunnel);
        let agent = agent_cli(rec.addr, target.addr(), Token::File(&token), None);
        let session = wait_connected(&server, &agent, 1);
        let sid = u64::from_str_radix(&session, 16).expect("hex session id");
        let job = Job::new(BOTH, Payload::new(90, 64 * KIB), Payload::new(91, 64 * KIB));
        let out = visit_ok(server.visitors, job, secs(20));
        assert_eq!(out.down, Digested::of(&job.down));
        assert_got(&target.report(secs(10)).seen, &job.up, "before the forgeries");
        let reached = target.server.accepted();

        // Data { session, attach, mac }
        let recorded = rec.first(DATA);
        let mut at = 1;
        assert_eq!(read_varint(&recorded, &mut at), sid, "a recorded Data frame of another session");
        refused_with(&server, &recorded, "bad_data_mac", "a replayed data header");
        let mut unknown = vec![DATA];
        varint(sid ^ 1, &mut unknown);
        unknown.push(0);
        unknown.extend([7u8; 32]);
        refused_with(&server, &unknown, "unknown_session", "a data connection of no session");
        let mut forged = vec![DATA];
        varint(sid, &mut forged);
        forged.push(1);
        varint(1, &mut forged);
        forged.extend([7u8; 32]);
        refused_with(&server, &forged, "bad_data_mac", "a reattach with a made-up MAC");
        refused_with(&server, &[0xff; 16], "bad_header", "garbage");

        assert_eq!(target.server.accepted(), reached, "a refused connection reached the target");
        let job = Job::new(BOTH, Payload::new(92, 256 * KIB), Payload::new(93, 256 * KIB));
        let out = visit_ok(server.visitors, job, secs(20));
        assert_eq!(out.down, Digested::of(&job.down));
        assert_got(&target.report(secs(10)).seen, &job.up, "after the forgeries");
        let lost = server.p.matching(|l| is_line(l, "link lost"));
        assert!(lost.is_empty(), "the refusals disturbed the agent's link: {lost:?}");
    }

    /// An agent offering a service no rule serves is refused (`reason=unknown_service`)
    /// and says why; no session starts, visitors find no agent, the target is not reached.
    fn unknown_service_refused(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "", "connect_timeout = \"1s\"");
        let mut args = osv(&[
            "agent",
            "--server",
            &server.tunnel.to_string(),
            "--service",
            &format!("nosuch={}", target.addr()),
            "--token-file",
        ]);
        args.push(token.into());
        let agent = Proc::spawn("agent", &args, None, &[], None);
        let l = server.p.expect_line("agent refused", secs(15), |l| is_line(l, "agent refused"));
        assert_eq!(field(&l, "reason"), Some("unknown_service"), "{l}");
        assert!(l.contains("nosuch"), "the refusal does not name the service: {l}");
        agent.expect_line("the agent's refusal", secs(10), |l| l.contains("unknown_service"));
        assert_no_agent_got_in(&server, &target);
    }

    /// The agent is stopped (SIGSTOP) past the server's resume_grace (2 s): the server
    /// resets the streams and forgets the session. Woken, the agent finds its session
    /// gone, says `grace expired ... streams_reset=2` too, resets its targets, and
    /// starts a new session that carries visitors again.
    fn server_side_expiry_reaches_the_agent(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "resume_grace = \"2s\"", "");
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        let session = wait_connected(&server, &agent, 1);
        let held = hold_visitors(&server, 2, 100, b"before the agent stops");
        {
            let _stopped = Stopped::new(agent.pid());
            let l = server.p.expect_line("grace expired", secs(20), |l| is_line(l, "grace expired"));
            assert_eq!(field(&l, "session"), Some(session.as_str()), "{l}");
            assert_eq!(field(&l, "streams_reset"), Some("2"), "{l}");
            for (i, v) in held.iter().enumerate() {
                let (ending, _) = wait_closed(v, secs(10)).unwrap_or_else(|e| panic!("visitor #{i}: {e}"));
                assert_eq!(ending, Ending::Reset, "visitor #{i} after the server's grace period");
            }
        }
        let l = agent.expect_line("grace expired", secs(20), |l| is_line(l, "grace expired"));
        assert_eq!(field(&l, "streams_reset"), Some("2"), "agent: {l}");
        for r in target.reports(2, secs(15)) {
            assert_eq!(r.seen, Seen::Ended(Ending::Reset), "target connection after the session ended");
        }
        second_session_carries_visitors(&server, &agent, &target, &session, 102, "the agent resumed a session the server had ended", "through the new session");
    }

    /// The agent dies (SIGKILL) holding two streams, and a resume of its session
    /// then fails before the server can answer it (the resuming connection is reset
    /// while the server is stopped, so the server reads a valid resume and fails to
    /// write its `Welcome`). The lost link's grace period still runs: both visitors
    /// are reset once resume_grace (4 s) has passed, `grace expired` says so.
    fn failed_resume_keeps_the_grace_period(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "resume_grace = \"4s\"", "");
        let rec = Recorder::start(server.tunnel);
        let mut agent = agent_cli(rec.addr, target.addr(), Token::File(&token), None);
        let session = wait_connected(&server, &agent, 1);
        let sid = u64::from_str_radix(&session, 16).expect("hex session id");
        // Hello { version, nonce, mac, identity, services, resume }: the agent's identity.
        let hello = rec.first(HELLO);
        let mut at = 1;
        read_varint(&hello, &mut at);
        at += 64;
        let n = read_varint(&hello, &mut at) as usize;
        let identity = hello[at..at + n].to_vec();
        let held = hold_visitors(&server, 2, 95, b"before the agent dies");
        agent.kill();
        server.p.expect_line("link lost", secs(15), |l| is_line(l, "link lost"));
        let t0 = Instant::now();

        let (s, nonce) = challenged(server.tunnel);
        let from = s.local_addr().unwrap();
        let agent_nonce = [9u8; 32];
        let proof = mac(TOKEN.as_bytes(), &[b"ctl", &nonce, &agent_nonce, &identity, b"web"]);
        let mut body = vec![HELLO];
        varint(PROTO_VERSION, &mut body);
        body.extend(agent_nonce);
        body.extend(proof);
        varint(identity.len() as u64, &mut body);
        body.extend(&identity);
        varint(1, &mut body);
        varint(3, &mut body);
        body.extend(b"web");
        // resume: Some((session, the stream ids it still holds: all the server could have))
        body.push(1);
        varint(sid, &mut body);
        varint(64, &mut body);
        for id in 0..64 {
            varint(id, &mut body);
        }
        {
            let _stopped = Stopped::new(server.p.pid());
            (&s).write_all(&framed(&body)).unwrap();
            // Reset, not closed: the server's Welcome can only fail.
            socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
            thread::sleep(ms(100));
        }
        for (i, v) in held.iter().enumerate() {
            let (ending, _) = wait_closed(v, secs(30)).unwrap_or_else(|e| {
                panic!(
                    "visitor #{i} after the failed resume (from {from}): {e}; server link events: {:#?}",
                    link_events(&server.p)
                )
            });
            assert_eq!(ending, Ending::Reset, "visitor #{i} after the grace period");
        }
        let took = t0.elapsed();
        println!("visitors reset {took:.1?} after the link was lost");
        let l = server.p.expect_line("grace expired", secs(5), |l| is_line(l, "grace expired"));
        assert_eq!(field(&l, "session"), Some(session.as_str()), "{l}");
        assert_eq!(field(&l, "streams_reset"), Some("2"), "{l}");
        // The resume was valid and read: it was not refused, and it never took over.
        let from = from.to_string();
        let refused = server.p.matching(|l| is_refusal_of(l, &from));
        assert!(refused.is_empty(), "the resume was refused, not failed: {refused:?}");
        let resumed = server.p.matching(|l| is_line(l, "link resumed"));
        assert!(resumed.is_empty(), "the resume succeeded: {resumed:?}");
    }

    /// The server ends two streams of its own accord: one idle for the rule's
    /// idle_timeout (2 s), one talking until its max_connection_duration (4 s). Each
    /// target connection is reset too (not left open), the agent logs a close line
    /// for each, and neither side keeps the streams: after a reset of the link, both
    /// sides' `link lost` say streams_waiting=0.
    fn server_limits_end_the_target_too(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let limits = "idle_timeout = \"2s\"\nmax_connection_duration = \"4s\"";
        let (token, target, server) = on_loopback(mode, &dir, "", limits);
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        let idle = open(server.visitors, &Job::new(HOLD, Payload::new(110, 0), Payload::new(0, 0)));
        ping(&idle, b"then quiet", secs(10)).expect("round trip");
        let busy = open(server.visitors, &Job::new(HOLD, Payload::new(111, 0), Payload::new(0, 0)));
        let t0 = Instant::now();
        // A round trip every 300 ms, until the stream is cut (bounded: 15 s).
        let mut pings = 0;
        while ping(&busy, b"still talking", secs(3)).is_ok() {
            pings += 1;
            assert!(t0.elapsed() < secs(15), "the talking stream was never cut");
            thread::sleep(ms(300));
        }
        let cut = t0.elapsed();
        println!("talking stream cut after {cut:.2?} ({pings} round trips)");
        assert!(cut >= secs(3), "cut after {cut:?}, max_connection_duration is 4 s");
        let (ending, _) = wait_closed(&idle, secs(5)).unwrap_or_else(|e| panic!("idle visitor: {e}"));
        println!("idle visitor: {ending:?}");
        // The targets' connections end too, with a reset: the streams were cut short.
        let reports = target.reports(2, secs(10));
        for seed in [110, 111] {
            let r = report_for(&reports, seed);
            assert_eq!(r.seen, Seen::Ended(Ending::Reset), "target connection of stream {seed}");
        }
        let target_addr = target.addr().to_string();
        for (s, end) in [(&idle, "idle_timeout"), (&busy, "max_connection_duration")] {
            let visitor = s.local_addr().unwrap();
            let l = close_of(&server.p, visitor, secs(5));
            assert_eq!(field(&l, "end"), Some(end), "server: {l}");
            let l = close_of(&agent, visitor, secs(10));
            assert_eq!(field(&l, "upstream"), Some(target_addr.as_str()), "agent: {l}");
            assert_ne!(field(&l, "end"), Some("closed"), "agent: {l}");
        }
        // Neither side still counts them.
        let port = server.tunnel.port().to_string();
        ss_kill(&["dport", "=", &format!(":{port}")]);
        for p in [&server.p, &agent] {
            let l = p.expect_line("link lost", secs(10), |l| is_line(l, "link lost"));
            assert_eq!(field(&l, "streams_waiting"), Some("0"), "{}: {l}", p.label);
        }
    }

    /// A reset of one stream's data connection alone (`ss -K` on it; the control
    /// connection stays up), mid-way through 8 MiB each way: the agent dials another,
    /// the stream reattaches, and both directions arrive exactly, with no link event.
    /// The streams of an agent's first link never dialed again (they read its
    /// generation as 0, "no link"): the visitor and the target hung, silent, until
    /// `idle_timeout` (audit).
    fn data_connection_reset_alone_is_redialed(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(mode, &dir, "", "");
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        let mut job = Job::new(BOTH, Payload::new(130, 8 * MIB), Payload::new(131, 8 * MIB));
        job.rate = 4 * MIB;
        let (up_sent, down_seen) = (AtomicU64::new(0), AtomicU64::new(0));
        let out = thread::scope(|sc| {
            let visitor = sc.spawn(|| visit(server.visitors, job, Instant::now() + secs(30), &down_seen, &up_sent));
            assert!(wait_until(secs(10), || up_sent.load(Ordering::SeqCst) >= MIB), "the upload did not start");
            let killed = kill_busiest_connection_to(server.tunnel.port());
            println!("reset the data connection {killed}");
            visitor.join().expect("visitor panicked")
        });
        let out = out.unwrap_or_else(|e| panic!("the stream whose data connection was reset: {e}"));
        assert_eq!(out.down, Digested::of(&job.down), "what the visitor received");
        let reports = target.reports(1, secs(10));
        assert_got(&report_for(&reports, 130).seen, &job.up, "what the target received");
        let l = close_of(&server.p, out.local, secs(5));
        assert_eq!(field(&l, "end"), Some("closed"), "{l}");
        for p in [&server.p, &agent] {
            let lost = p.matching(|l| is_line(l, "link lost"));
            assert!(lost.is_empty(), "{}: the control link was not touched: {lost:?}", p.label);
        }
    }

    /// A draining agent whose link is reset (its streams still open) resumes, and the
    /// server says so in order: `link lost`, then `link resumed`. It logged only the
    /// resume (it waits a moment for a drained agent's last streams before it calls a
    /// link lost, and the resume came first) (audit).
    fn draining_agent_link_reset_is_lost_then_resumed(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (_target, server, mut agent, held) = held_through_an_agent(mode, &dir, "30s", 250);
        agent.proc.signal(libc::SIGTERM);
        server.p.expect_line("agent draining", secs(5), |l| is_line(l, "agent draining"));
        ss_kill(&["dport", "=", &format!(":{}", server.tunnel.port())]);
        server.p.expect_line("link resumed", secs(15), |l| is_line(l, "link resumed"));
        ping(&held, b"after the resume", secs(10)).expect("round trip after the resume");
        let events = link_events(&server.p);
        let lost = events.iter().position(|l| is_line(l, "link lost"));
        let resumed = events.iter().position(|l| is_line(l, "link resumed"));
        assert!(lost.is_some() && lost < resumed, "server link events: {events:#?}");
        held.shutdown(Shutdown::Write).unwrap();
        wait_closed(&held, secs(10)).unwrap_or_else(|e| panic!("held visitor: {e}"));
    }

    /// A target that accepts and resets at once: each visitor is reset, and both sides'
    /// close lines say `upstream_reset`. The agent took a reset that came before it saw
    /// its connect complete for a failed connect (`end=connect_failed`, 4 to 10 of 20,
    /// and a connect error counted) (audit).
    /// A `[[service]]`'s `connect_from` and `tcp_keepalive` shape its target
    /// connections, as a rule's do its upstream's: the target sees the stream come
    /// from 127.0.0.7, and the agent's socket to it runs a keepalive timer.
    fn service_connect_from_and_keepalive_shape_target_connections(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let (tx, peers) = mpsc::channel();
        let tx = Mutex::new(tx);
        let target = Server::start(LOCALHOST, move |s| {
            let _ = tx.lock().unwrap().send(s.peer_addr().unwrap());
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = (&*s).read(&mut buf) {
                if (&*s).write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let server = TunnelServer::cli(mode, "127.0.0.1:0", &token);
        let extra = "connect_from = \"127.0.0.7\"\ntcp_keepalive = \"600s\"";
        let agent = agent_config_with(server.tunnel, target.addr(), &token, None, extra);
        wait_connected(&server, &agent, 1);
        let s = connect(server.visitors);
        ping(&s, b"!", secs(10)).expect("a round trip through the tunnel");
        let peer = peers.recv_timeout(secs(5)).expect("the target's connection");
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 7]), "the target saw {peer}");
        // ss names the agent's end of it: from 127.0.0.7 to the target.
        let filter = format!("src 127.0.0.7 and dst {}", target.addr());
        let o = run_to_exit({ let mut c = command("ss"); c.args(["-tnoH", "state", "established"]).arg(&filter); c }, secs(10));
        assert!(o.stdout.contains("timer:(keepalive"), "no keepalive timer on the agent's target socket:\n{}", o.stdout);
        drop(s);
        let l = agent.wait_close_lines(1, secs(10));
        assert_eq!(l.len(), 1, "the agent's close line");
    }

    fn target_reset_on_accept_is_an_upstream_reset(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let token = token_file(&dir, "token", TOKEN);
        let target = Server::start(LOCALHOST, |s| {
            socket2::SockRef::from(&*s).set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
        });
        let server = TunnelServer::cli(mode, "127.0.0.1:0", &token);
        let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
        wait_connected(&server, &agent, 1);
        const VISITORS: usize = 20;
        for i in 0..VISITORS {
            // (The reset can beat connect() back: seen once beside a busy loop.)
            let how = connect_and_wait_closed(server.visitors, secs(10)).unwrap_or_else(|e| panic!("visitor {i}: {e}"));
            assert_eq!(how, Ending::Reset, "visitor {i}");
        }
        for (p, side) in [(&server.p, "server"), (&agent, "agent")] {
            let lines = p.wait_close_lines(VISITORS, secs(10));
            assert_eq!(lines.len(), VISITORS, "{side}: {lines:#?}");
            for l in &lines {
                assert!(field(l, "end").is_some_and(|e| e.starts_with("upstream_reset")), "{side}: {l}");
            }
        }
    }

    /// SIGTERM to the agent (shutdown_grace 4 s) with two streams: an upload under
    /// way, which can finish within the grace period, finishes byte-exact both ways
    /// (`end=closed`); the other, an echo, is still served during the drain, and
    /// once the grace is over its target and its visitor are reset (never a clean
    /// FIN), the agent's close line says `end=shutdown`, and the agent exits 0.
    fn agent_sigterm_drains_its_streams(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (target, server, mut agent, held) = held_through_an_agent(mode, &dir, "4s", 120);
        // 4 MiB each way at 2 MiB/s: about 2 s, so the signal comes mid-way.
        let mut job = Job::new(BOTH, Payload::new(121, 4 * MIB), Payload::new(122, 4 * MIB));
        job.rate = 2 * MIB;
        let (up_sent, down_seen) = (AtomicU64::new(0), AtomicU64::new(0));
        let (out, at_signal, signalled) = thread::scope(|sc| {
            let visitor = sc.spawn(|| visit(server.visitors, job, Instant::now() + secs(30), &down_seen, &up_sent));
            let started = wait_until(secs(10), || up_sent.load(Ordering::SeqCst) >= MIB / 2);
            assert!(started, "the upload did not start");
            let at_signal = up_sent.load(Ordering::SeqCst);
            agent.proc.signal(libc::SIGTERM);
            let signalled = Instant::now();
            let l = agent.expect_line("shutdown", secs(5), |l| l.contains("shutdown: stopped accepting"));
            assert!(l.contains("draining 2 connection(s)"), "{l}");
            (visitor.join().expect("visitor panicked"), at_signal, signalled)
        });
        assert!(at_signal < job.up.len, "the upload was over before the signal");
        let out = out.unwrap_or_else(|e| panic!("the upload under way at SIGTERM: {e}"));
        assert_eq!(out.down, Digested::of(&job.down), "what the visitor received");
        let reports = target.reports(1, secs(10));
        assert_got(&report_for(&reports, 121).seen, &job.up, "what the target received");
        println!("upload done {:.2?} after SIGTERM (sent {at_signal} bytes before)", signalled.elapsed());
        // The echo is still served while the agent drains.
        ping(&held, b"during the drain", secs(3)).expect("round trip during the drain");
        let (ending, _) = wait_closed(&held, secs(10)).unwrap_or_else(|e| panic!("held visitor: {e}"));
        let took = signalled.elapsed();
        println!("held visitor {ending:?} {took:.2?} after SIGTERM");
        assert_eq!(ending, Ending::Reset, "the held visitor after the grace period");
        assert!(took >= ms(3500), "the held stream ended {took:?} after SIGTERM, grace is 4 s");
        let r = target.report(secs(10));
        assert_eq!(r.job.up.seed, 120, "{r:?}");
        assert_eq!(r.seen, Seen::Ended(Ending::Reset), "the held target connection");
        let status = agent.proc.wait_timeout(secs(10)).expect("the agent did not exit");
        assert_eq!(status.code(), Some(0), "agent: {}", describe_status(&status));
        let target_addr = target.addr().to_string();
        let l = close_of(&agent, out.local, secs(1));
        check_close(&l, "web", &target_addr, HEADER_LEN as u64 + job.up.len, job.down.len, "closed");
        let l = close_of(&agent, held.local_addr().unwrap(), secs(1));
        assert_eq!(field(&l, "end"), Some("shutdown"), "agent: {l}");
        let l = close_of(&server.p, held.local_addr().unwrap(), secs(5));
        assert_ne!(field(&l, "end"), Some("closed"), "server: {l}");
    }

    /// Visitors that arrive 1 s into a blackhole of the link, before either side has
    /// noticed it (4 s of silence), go on pooled data connections whose `Open` never
    /// reaches the agent. When the link comes back the agent's resume does not list
    /// them, so the server opens them again, and every byte arrives exactly both ways
    /// (they were reset instead, `end=upstream_reset`, with `link resumed ...
    /// streams=0`, and the target never saw them).
    fn visitors_in_an_unnoticed_blackhole_are_served_after_it(mode) {
        let _load = light();
        let InNetns { _dir, ns, target, server, agent, session } =
            in_netns(mode, "resume_grace = \"60s\"", "");
        warm_up(&server, &target, 200);
        let jobs = [
            Job::new(BOTH, Payload::new(210, 300 * KIB), Payload::new(211, 200 * KIB)),
            Job::new(UPLOAD_FIRST, Payload::new(212, 100 * KIB), Payload::new(213, 50 * KIB)),
        ];
        let bh = ns.blackhole();
        let t0 = Instant::now();
        thread::sleep(secs(1));
        let outs: Vec<Result<VisitOut, String>> = thread::scope(|sc| {
            let visitors: Vec<_> = jobs
                .iter()
                .map(|&job| {
                    sc.spawn(move || {
                        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
                        visit(server.visitors, job, Instant::now() + secs(45), &a, &b)
                    })
                })
                .collect();
            // Both sides notice the loss, then the link comes back.
            let lost = server.p.wait_n(1, secs(10), |l| is_line(l, "link lost"));
            assert!(!lost.is_empty(), "server: no `link lost` within 10 s");
            agent.expect_line("link lost", secs(10), |l| is_line(l, "link lost"));
            thread::sleep(ms(500));
            println!("link back {:.1?} after the blackhole began", t0.elapsed());
            bh.restore();
            visitors.into_iter().map(|v| v.join().expect("visitor panicked")).collect()
        });
        let events = || link_events(&server.p).join("\n");
        let lost = server.p.expect_line("link lost", secs(1), |l| is_line(l, "link lost"));
        assert_eq!(field(&lost, "session"), Some(session.as_str()), "{lost}");
        assert_eq!(field(&lost, "streams_waiting"), Some("2"), "{lost}");
        let resumed = server.p.expect_line("link resumed", secs(10), |l| is_line(l, "link resumed"));
        assert_eq!(field(&resumed, "streams"), Some("2"), "the visitors were not kept: {resumed}\n{}", events());
        let reports = target.reports(2, secs(20));
        for (job, out) in jobs.iter().zip(outs) {
            let out = out.unwrap_or_else(|e| {
                panic!("visitor {} during the blackhole: {e}\nserver:\n{}", job.up.seed, server.p.text())
            });
            assert_eq!(out.down, Digested::of(&job.down), "visitor {}: what it received", job.up.seed);
            if job.op == UPLOAD_FIRST {
                assert_eq!(out.answer, Some(Digested::of(&job.up)), "what the target says it received");
            }
            assert_got(&report_for(&reports, job.up.seed).seen, &job.up, "what the target received");
            let l = close_of(&server.p, out.local, secs(10));
            check_close(&l, "web", "agent:web", HEADER_LEN as u64 + job.up.len, out.down_wire, "closed");
            let l = close_of(&agent, out.local, secs(10));
            assert_eq!(field(&l, "end"), Some("closed"), "agent: {l}");
        }
        println!("both visitors done {:.1?} after the blackhole began", t0.elapsed());
    }

    /// After resume_grace (3.5 s) of a blackholed link, the agent resets its target
    /// when the server resets the visitor, not when its connect attempt under way
    /// (3 s each) gives up: that was 1.6-3.6 s later.
    fn agent_grace_expiry_is_on_time_while_dialing(mode) {
        let _load = light();
        let InNetns { _dir, ns, target, server, agent, session: _ } =
            in_netns(mode, "resume_grace = \"3500ms\"", "");
        let held = hold_visitors(&server, 1, 220, b"before the blackhole");
        let bh = ns.blackhole();
        let t0 = Instant::now();
        let (visitor_at, target_at) = thread::scope(|sc| {
            let t = sc.spawn(|| {
                let r = target.report(secs(20));
                (r, t0.elapsed())
            });
            let (ending, _) = wait_closed(&held[0], secs(20)).unwrap_or_else(|e| panic!("visitor: {e}"));
            let visitor_at = t0.elapsed();
            assert_eq!(ending, Ending::Reset, "visitor after the grace period");
            let (r, target_at) = t.join().expect("target thread panicked");
            assert_eq!(r.seen, Seen::Ended(Ending::Reset), "target connection after the grace period");
            (visitor_at, target_at)
        });
        println!("visitor reset {visitor_at:.2?}, target {target_at:.2?} after the blackhole began");
        let l = agent.expect_line("grace expired", secs(1), |l| is_line(l, "grace expired"));
        let gap = target_at.as_secs_f64() - visitor_at.as_secs_f64();
        assert!(
            gap.abs() < 1.3,
            "the target was reset {gap:.2} s after the visitor (each side detects the loss \
             within 1 s of the other, and both wait resume_grace); agent: {l}"
        );
        drop(bh);
    }

    /// A rolling restart: two agents offer `web`, and the first gets SIGTERM while it
    /// still carries a stream. It tells the server, which sends every new visitor to
    /// the second (with round_robin it sent every other one to the draining agent,
    /// which refused them: `end=upstream_reset`). With no other agent left, a visitor
    /// waits as with none (`end=no_agent`); the draining stream is served to its end.
    fn draining_agent_gets_no_new_visitors(mode) {
        let _load = light();
        let dir = TempDir::new("tunnel");
        let (token, target, server) = on_loopback(
            mode,
            &dir,
            "",
            "balance = \"round_robin\"\nconnect_timeout = \"2s\"",
        );
        let mut first = agent_with_grace(server.tunnel, &token, target.addr(), "30s");
        wait_connected(&server, &first, 1);
        let held = open(server.visitors, &Job::new(HOLD, Payload::new(230, 0), Payload::new(0, 0)));
        ping(&held, b"before the signal", secs(10)).expect("round trip");
        let target2 = Target::start();
        let mut second = agent_cli(server.tunnel, target2.addr(), Token::File(&token), None);
        wait_connected(&server, &second, 2);

        first.proc.signal(libc::SIGTERM);
        let l = first.expect_line("shutdown", secs(5), |l| l.contains("shutdown: stopped accepting"));
        assert!(l.contains("draining 1 connection(s)"), "{l}");
        for i in 0..6 {
            let job = Job::new(BOTH, Payload::new(240 + 2 * i, 64 * KIB), Payload::new(241 + 2 * i, 64 * KIB));
            let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
            let out = visit(server.visitors, job, Instant::now() + secs(20), &a, &b)
                .unwrap_or_else(|e| panic!("visitor #{i} while the first agent drains: {e}\nserver:\n{}", link_events(&server.p).join("\n")));
            assert_eq!(out.down, Digested::of(&job.down));
            assert_got(&target2.report(secs(10)).seen, &job.up, "through the agent not draining");
            let l = close_of(&server.p, out.local, secs(5));
            assert_eq!(field(&l, "end"), Some("closed"), "{l}");
        }
        server.p.expect_line("agent draining", secs(1), |l| is_line(l, "agent draining"));
        ping(&held, b"during the drain", secs(5)).expect("round trip during the drain");

        // The second agent gone too: a visitor waits for an agent, as with none.
        second.kill();
        let gone = server.p.wait_n(1, secs(10), |l| is_line(l, "link lost"));
        assert!(!gone.is_empty(), "server: the killed agent's link was not lost");
        let s = connect(server.visitors);
        let visitor = s.local_addr().unwrap();
        wait_closed(&s, secs(10)).unwrap_or_else(|e| panic!("visitor with only a draining agent: {e}"));
        let l = close_of(&server.p, visitor, secs(5));
        assert_eq!(field(&l, "end"), Some("no_agent"), "{l}");

        // The draining stream ends cleanly, and the first agent exits.
        held.shutdown(Shutdown::Write).unwrap();
        wait_closed(&held, secs(10)).unwrap_or_else(|e| panic!("held visitor: {e}"));
        let status = first.proc.wait_timeout(secs(10)).expect("the draining agent did not exit");
        assert_eq!(status.code(), Some(0), "agent: {}", describe_status(&status));
        let l = close_of(&first, held.local_addr().unwrap(), secs(1));
        assert_eq!(field(&l, "end"), Some("closed"), "agent: {l}");
        assert_eq!(first.matching(|l| is_line(l, "close")).len(), 1, "the draining agent served a new visitor");
        // Gone, not lost: the server does not wait resume_grace for it.
        server.p.expect_line("agent left", secs(5), |l| is_line(l, "agent left"));
        let lost = server.p.matching(|l| is_line(l, "link lost"));
        assert_eq!(lost.len(), 1, "only the killed agent's link was lost: {lost:#?}");
    }
}

/// A server and an agent on loopback (splice), the agent connected, serving `web` by
/// a fresh target; the directory holds their token.
fn loopback_tunnel() -> (TempDir, Target, TunnelServer, Proc) {
    let dir = TempDir::new("tunnel");
    let token = token_file(&dir, "token", TOKEN);
    let target = Target::start();
    let server = TunnelServer::config(Mode::Splice, &server_toml("127.0.0.1:0", &token, "", ""));
    let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
    wait_connected(&server, &agent, 1);
    (dir, target, server, agent)
}

/// A burst of streams gives its pipes back: 40 visitors held at once (three pipes a
/// stream on each side), then closed; within two of the pool's trims (10 s each) both
/// processes hold no more fds than before the burst, give or take a few, and a
/// visitor is served as before. Before, 128 idle 1 MiB pipes (256 fds) stayed for
/// good, and with them an unprivileged user's pipe quota (audit soak: tunnel
/// throughput fell 280-fold after such a burst).
#[test]
fn a_burst_of_streams_gives_its_pipes_back() {
    let _load = light();
    let (_dir, target, server, agent) = loopback_tunnel();
    warm_up(&server, &target, 50);
    thread::sleep(secs(1));
    let baseline = (server.p.fd_count(), agent.fd_count());
    let held = hold_visitors(&server, 40, 60, b"burst");
    let during = (server.p.fd_count(), agent.fd_count());
    println!("fds (server, agent): before {baseline:?}, with 40 streams {during:?}");
    assert!(
        during.0 > baseline.0 + 120,
        "the burst did not take the pipes it was to: {during:?}"
    );
    let visitors: Vec<SocketAddr> = held.iter().map(|s| s.local_addr().unwrap()).collect();
    drop(held);
    for v in &visitors {
        close_of(&server.p, *v, secs(10));
    }
    assert_eq!(
        target.reports(40, secs(10)).len(),
        40,
        "the held streams' targets"
    );
    const SLACK: usize = 8;
    let back = wait_until(secs(25), || {
        server.p.fd_count() <= baseline.0 + SLACK && agent.fd_count() <= baseline.1 + SLACK
    });
    let after = (server.p.fd_count(), agent.fd_count());
    println!("fds (server, agent) after the burst: {after:?}");
    assert!(
        back,
        "fds (server, agent) {after:?} 25 s after the burst, {baseline:?} before:\n{}",
        sh("ls", &["-l", &format!("/proc/{}/fd", server.p.pid())])
    );
    warm_up(&server, &target, 70);
}

/// 1,000 times the agent's link is reset (`ss -K` on its sockets to the agent port)
/// and the agent resumes its session: afterwards neither side holds more fds or
/// memory than after the first few, and a transfer still arrives exactly.
#[test]
fn link_churn_leaks_nothing() {
    const CYCLES: usize = 1000;
    let _load = light();
    let (_dir, target, server, agent) = loopback_tunnel();
    let port = server.tunnel.port().to_string();
    let cycle = |i: usize| {
        ss_kill(&["dport", "=", &format!(":{port}")]);
        let resumed = server.p.wait_n(i, secs(10), |l| is_line(l, "link resumed"));
        assert!(
            resumed.len() >= i,
            "cycle {i}: the agent did not resume within 10 s; server link events: {:#?}",
            link_events(&server.p)
        );
    };
    // Settled: the pool refilled, the same fd count twice 200 ms apart.
    let settled = |what: &str| -> (usize, usize, u64) {
        let mut last = (0, 0);
        for _ in 0..50 {
            thread::sleep(ms(200));
            let now = (server.p.fd_count(), agent.fd_count());
            if now == last {
                break;
            }
            last = now;
        }
        let rss = proc_rss(server.p.pid()) + proc_rss(agent.pid());
        println!(
            "{what}: fds server {} agent {}, RSS server+agent {:.1} MiB",
            last.0,
            last.1,
            rss as f64 / MIB as f64
        );
        (last.0, last.1, rss)
    };
    for i in 1..=20 {
        cycle(i);
    }
    let before = settled("after 20 cycles");
    let t0 = Instant::now();
    for i in 21..=CYCLES {
        cycle(i);
    }
    println!("{} cycles in {:.1?}", CYCLES - 20, t0.elapsed());
    let after = settled(&format!("after {CYCLES} cycles"));
    assert!(
        after.0 <= before.0 && after.1 <= before.1,
        "fds grew: {before:?} -> {after:?}"
    );
    assert!(
        after.2 < before.2 + 4 * MIB,
        "RSS grew by {:.1} MiB over {CYCLES} link resets",
        (after.2 as f64 - before.2 as f64) / MIB as f64
    );
    assert_eq!(
        server.connected().len(),
        1,
        "a new session was started instead of resuming"
    );
    // The agent says the same: one session, resumed every time (with no stream to
    // carry over, it is still a resume).
    let resumed = agent.wait_n(CYCLES, secs(10), |l| is_line(l, "link resumed"));
    assert!(
        resumed.len() >= CYCLES,
        "the agent logged {} `link resumed` of {CYCLES}",
        resumed.len()
    );
    let connected = agent.matching(|l| is_line(l, "agent connected"));
    assert_eq!(
        connected.len(),
        1,
        "the agent logged new sessions: {connected:?}"
    );
    let job = Job::new(BOTH, Payload::new(77, 4 * MIB), Payload::new(78, 4 * MIB));
    let out = visit_ok(server.visitors, job, secs(30));
    assert_got(&target.report(secs(10)).seen, &job.up, "after the churn");
    let l = close_of(&server.p, out.local, secs(10));
    assert_eq!(field(&l, "end"), Some("closed"), "{l}");
}

// ---------------------------------------------------------------------------------
// Rule policy on an `agent:` upstream (audit: keys that did not apply as on a plain rule)
// ---------------------------------------------------------------------------------

/// `least_conn` over two agents: short visitors one after another all tie at no open
/// stream, and ties take turns as on a plain rule (each agent had them all, or none:
/// the first of the tied agents always won).
#[test]
fn least_conn_takes_turns_among_idle_agents() {
    const VISITS: u64 = 20;
    let _load = light();
    let dir = TempDir::new("tunnel");
    let (token, first, server) = on_loopback(Mode::Splice, &dir, "", "balance = \"least_conn\"");
    // Each agent its own target: two identities, two sessions.
    let second = Target::start();
    let agents = agents_one_by_one(&server, &token, &[first.addr(), second.addr()]);
    for i in 0..VISITS {
        let job = Job::new(
            BOTH,
            Payload::new(500 + 2 * i, 4 * KIB),
            Payload::new(501 + 2 * i, 4 * KIB),
        );
        let out = visit_ok(server.visitors, job, secs(20));
        assert_eq!(out.down, Digested::of(&job.down));
        close_of(&server.p, out.local, secs(10));
    }
    let served = |a: &Proc| a.matching(|l| is_line(l, "close")).len() as u64;
    assert!(
        wait_until(secs(10), || agents.iter().map(served).sum::<u64>()
            == VISITS),
        "close lines on the agents: {} and {}, want {VISITS} in all",
        served(&agents[0]),
        served(&agents[1])
    );
    let split: Vec<u64> = agents.iter().map(served).collect();
    assert!(
        split.iter().all(|&n| n.abs_diff(VISITS / 2) <= 1),
        "{VISITS} short visitors one after another split {split:?} over two idle agents, \
         want turns (10 each, give or take one)"
    );
}

/// `least_conn` over three agents, each visitor arriving while the one before is still
/// open: the two idle agents tie, and ties go to the one chosen longest ago, so the
/// visitors take turns over all three (a counter over tie sets that changed gave one
/// of them none of 30).
#[test]
fn least_conn_counts_held_streams_over_three_agents() {
    const VISITS: u64 = 30;
    let _load = light();
    let dir = TempDir::new("tunnel");
    let (token, first, server) = on_loopback(Mode::Splice, &dir, "", "balance = \"least_conn\"");
    let targets = [Target::start(), Target::start()];
    let agents = agents_one_by_one(
        &server,
        &token,
        &[first.addr(), targets[0].addr(), targets[1].addr()],
    );
    let mut before: Option<TcpStream> = None;
    for i in 0..VISITS {
        let held = open(
            server.visitors,
            &Job::new(HOLD, Payload::new(600 + i, 0), Payload::new(0, 0)),
        );
        ping(&held, b"held", secs(10)).expect("round trip");
        drop(before.replace(held));
        // The one before has ended on the server (its close line): the next visitor
        // finds exactly one agent busy and two tied.
        let ended = server
            .p
            .wait_n(i as usize, secs(10), |l| is_line(l, "close"));
        assert_eq!(
            ended.len(),
            i as usize,
            "visitor {i}: the one before did not end"
        );
    }
    drop(before);
    let served = |a: &Proc| a.matching(|l| is_line(l, "close")).len() as u64;
    assert!(
        wait_until(secs(10), || agents.iter().map(served).sum::<u64>()
            == VISITS),
        "close lines on the agents: {:?}, want {VISITS} in all",
        agents.iter().map(served).collect::<Vec<_>>()
    );
    let split: Vec<u64> = agents.iter().map(served).collect();
    assert!(
        split.iter().all(|&n| n.abs_diff(VISITS / 3) <= 1),
        "{VISITS} visitors, each while the one before was open, split {split:?} over three agents"
    );
}

/// `check_interval` (the README's own `[defaults]` sets it) on a rule served by agents:
/// an agent's link has its heartbeat, and `agent:web` is no address to connect to. It
/// was checked as one, and logged DOWN (`check: invalid port value`) while agents served.
#[test]
fn check_interval_leaves_an_agent_upstream_alone() {
    let _load = light();
    let dir = TempDir::new("tunnel");
    let (token, target, server) = on_loopback(
        Mode::Splice,
        &dir,
        "",
        "check_interval = \"100ms\"\nfall = 1",
    );
    let agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
    wait_connected(&server, &agent, 1);
    // Five check intervals and more.
    thread::sleep(ms(700));
    warm_up(&server, &target, 520);
    let health = server
        .p
        .matching(|l| l.contains(" is DOWN") || l.contains("check:"));
    assert!(
        health.is_empty(),
        "an agent upstream was health-checked: {health:#?}"
    );
}

/// One process holding both sections with `max_connections = 2`: two visitors held
/// open at once are both served. A visitor holds a slot on the server's side and its
/// target connection one on the agent's; sharing the process's two, the visitors took
/// both and their targets waited for ever.
#[test]
fn one_process_with_both_sides_serves_max_connections_visitors() {
    let _load = light();
    let dir = TempDir::new("tunnel");
    let token = token_file(&dir, "token", TOKEN);
    let target = Target::start();
    let tunnel = free_loopback_addr();
    let toml = format!(
        "[global]\nmax_connections = 2\n\n{}\n{}",
        server_toml(&tunnel.to_string(), &token, "", ""),
        agent_toml(tunnel, &token, target.addr())
    );
    let server = TunnelServer::config(Mode::Splice, &toml);
    // Both sides log `agent connected`, in the one process.
    let both = server
        .p
        .wait_n(2, secs(20), |l| is_line(l, "agent connected"));
    assert_eq!(both.len(), 2, "{}", server.p.text());
    let held = hold_visitors(&server, 2, 530, b"both sides in one process");
    drop(held);
}

/// The agent's connect to its target is bounded by the server rule's
/// `connect_timeout`, as a plain rule's connect to its upstream is (it was a fixed
/// 5 s): a target whose SYNs are dropped ends the visitor after 1 s, and the agent's
/// close line says `connect_failed (timed out)`. Server and agent in one process, in a
/// namespace whose nftables drop the SYNs to the target.
#[test]
fn agent_target_connect_takes_the_rule_connect_timeout() {
    let _load = light();
    const DEAD_PORT: u16 = 4999;
    let ns = NetNs::new();
    ns.nft_rule("output", &["tcp", "dport", &DEAD_PORT.to_string(), "drop"]);
    let dir = TempDir::new("tunnel");
    let token = token_file(&dir, "token", TOKEN);
    let at = |port: u16| SocketAddr::new(std::net::IpAddr::V4(ns.ns_ip()), port);
    let (visitors, tunnel) = (at(4000), at(4002));
    let dead = SocketAddr::new(std::net::IpAddr::V4(ns.host_ip()), DEAD_PORT);
    let toml = format!(
        "[tunnel_server]\nlisten = \"{tunnel}\"\ntoken_file = \"{}\"\n\n\
         [[rule]]\nname = \"web\"\nlisten = \"{visitors}\"\nupstream = \"agent:web\"\nconnect_timeout = \"1s\"\n\n{}",
        token.display(),
        agent_toml(tunnel, &token, dead)
    );
    let path = dir.write("both.toml", &toml);
    let args: Vec<OsString> = vec!["run".into(), "-c".into(), path.into()];
    let p = Proc::spawn("forwarder", &args, Some(&ns), &[], None);
    let both = p.wait_n(2, secs(20), |l| is_line(l, "agent connected"));
    assert_eq!(both.len(), 2, "{}", p.text());
    let t0 = Instant::now();
    let mut s = connect(visitors);
    s.write_all(b"hello").unwrap();
    s.set_read_timeout(Some(secs(10))).unwrap();
    let mut buf = [0u8; 16];
    let got = s.read(&mut buf);
    let waited = t0.elapsed();
    assert!(
        matches!(got, Ok(0) | Err(_)) && waited > ms(800) && waited < ms(3500),
        "the visitor got {got:?} after {waited:?}; want its end after connect_timeout (1 s), \
         not the 5 s default"
    );
    let local = s.local_addr().unwrap();
    let agent_close = p.expect_line("the agent's close line", secs(5), |l| {
        is_line(l, "close") && field(l, "upstream") == Some(dead.to_string().as_str())
    });
    assert!(
        agent_close.contains("end=connect_failed (") && agent_close.contains("timed out after 1s"),
        "{agent_close}"
    );
    let c = local.to_string();
    p.expect_line("the server's close line", secs(5), |l| {
        is_line(l, "close")
            && field(l, "client") == Some(c.as_str())
            && field(l, "upstream") == Some("agent:web")
    });
}

/// A service target given by name: the agent's close line names the address it
/// reached, as a rule's does (it said the name as written).
#[test]
fn agent_close_line_names_the_address_reached() {
    let _load = light();
    let dir = TempDir::new("tunnel");
    let (token, target, server) = on_loopback(Mode::Splice, &dir, "", "");
    let by_name: SocketAddr = target.addr();
    let mut args = osv(&["agent", "--server", &server.tunnel.to_string(), "--service"]);
    args.push(format!("web=localhost:{}", by_name.port()).into());
    args.push("--token-file".into());
    args.push(token.clone().into());
    let agent = Proc::spawn("agent", &args, None, &[], None);
    wait_connected(&server, &agent, 1);
    let job = Job::new(BOTH, Payload::new(540, 4 * KIB), Payload::new(541, 4 * KIB));
    let out = visit_ok(server.visitors, job, secs(20));
    let l = close_of(&agent, out.local, secs(10));
    assert_eq!(
        field(&l, "upstream"),
        Some(by_name.to_string().as_str()),
        "{l}"
    );
}

/// Two agents offer `web`; one's target refuses. Its first visitors end
/// `connect_failed (at the agent: ...)` on the server (counted as the failed connects
/// they are, not `upstream_reset`), and after 3 in a row it gets no new visitor while
/// the other agent serves (`agent target failing`): as a rule's passively downed
/// upstream. It got every other visitor, for as long as it ran, and each was reset.
#[test]
fn an_agent_whose_target_refuses_is_passed_over() {
    const VISITS: u64 = 16;
    let _load = light();
    let dir = TempDir::new("tunnel");
    let (token, good, server) = on_loopback(Mode::Splice, &dir, "", "balance = \"round_robin\"");
    // Nothing listens there.
    let dead = free_loopback_addr();
    // The healthy agent, then the failing one.
    let _agents = agents_one_by_one(&server, &token, &[good.addr(), dead]);
    let mut failed = Vec::new();
    for i in 0..VISITS {
        let job = Job::new(
            BOTH,
            Payload::new(560 + 2 * i, 4 * KIB),
            Payload::new(561 + 2 * i, 4 * KIB),
        );
        let (a, b) = (AtomicU64::new(0), AtomicU64::new(0));
        match visit(server.visitors, job, Instant::now() + secs(20), &a, &b) {
            Ok(out) => {
                assert_eq!(out.down, Digested::of(&job.down));
                assert_got(
                    &good.report(secs(10)).seen,
                    &job.up,
                    "through the healthy agent",
                );
            }
            Err(e) => failed.push(format!("visitor {i}: {e}")),
        }
    }
    assert!(
        (1..=3).contains(&failed.len()),
        "{} of {VISITS} visitors failed, want 1 to 3 (round robin tries the failing agent, \
         then passes it over): {failed:#?}",
        failed.len()
    );
    let ends: Vec<String> = server
        .p
        .wait_close_lines(VISITS as usize, secs(10))
        .iter()
        .filter_map(|l| field(l, "end").map(str::to_string))
        .filter(|e| e != "closed")
        .collect();
    assert!(
        ends.len() == failed.len() && ends.iter().all(|e| e == "connect_failed"),
        "the failed visitors' ends on the server: {ends:?}; {:#?}",
        server.p.close_lines()
    );
    assert!(
        server
            .p
            .close_lines()
            .iter()
            .filter(|l| field(l, "end") == Some("connect_failed"))
            .all(|l| l.contains("(at the agent: ")),
        "{:#?}",
        server.p.close_lines()
    );
    if failed.len() == 3 {
        server.p.expect_line("agent target failing", secs(5), |l| {
            is_line(l, "agent target failing")
        });
    }
}

/// SIGHUP to `forwarder agent` (no -c FILE): a warning that names what it came from,
/// the command line (it named --listen/--upstream, which an agent has not), and the
/// agent goes on serving.
#[test]
fn sighup_to_a_command_line_agent_says_what_it_came_from() {
    let _load = light();
    let dir = TempDir::new("tunnel");
    let (token, target, server) = on_loopback(Mode::Splice, &dir, "", "");
    let mut agent = agent_cli(server.tunnel, target.addr(), Token::File(&token), None);
    wait_connected(&server, &agent, 1);
    // SAFETY: kill(2) on the agent we started.
    unsafe { libc::kill(agent.pid(), libc::SIGHUP) };
    let l = agent.expect_line("nothing to reload", secs(10), |l| {
        l.contains("nothing to reload")
    });
    assert!(l.contains("the agent came from the command line"), "{l}");
    agent.assert_running();
    warm_up(&server, &target, 620);
}

/// An agent's target health is per service: agent A's `web` target refuses, its `api`
/// target answers. Once A is passed over for `web`, it still gets its share of `api`
/// visitors (it got none for 10 s: the health was the agent's), and its `api` streams
/// do not make its `web` failures count as "not in a row".
#[test]
fn target_health_is_per_service() {
    let _load = light();
    let dir = TempDir::new("tunnel");
    let token = token_file(&dir, "token", TOKEN);
    let api_rule = "\n[[rule]]\nname = \"api\"\nlisten = \"127.0.0.1:0\"\nupstream = \"agent:api\"\nbalance = \"round_robin\"\n";
    let toml = server_toml("127.0.0.1:0", &token, "", "balance = \"round_robin\"") + api_rule;
    let server = TunnelServer::config(Mode::Splice, &toml);
    let api_addr: SocketAddr = server
        .p
        .matching(|l| l.contains(" listening rule=api "))
        .first()
        .and_then(|l| field(l, "listen").map(str::to_string))
        .and_then(|a| a.parse().ok())
        .expect("rule api's listening line");
    let (good_web, a_api, b_api) = (Target::start(), Target::start(), Target::start());
    let dead = free_loopback_addr();
    let agent = |web: SocketAddr, api: SocketAddr| {
        let mut args = osv(&[
            "agent",
            "--server",
            &server.tunnel.to_string(),
            "--token-file",
        ]);
        args.push(token.clone().into());
        for s in [format!("web={web}"), format!("api={api}")] {
            args.push("--service".into());
            args.push(s.into());
        }
        Proc::spawn("agent", &args, None, &[], None)
    };
    let a = agent(dead, a_api.addr());
    server
        .p
        .wait_n(1, secs(20), |l| is_line(l, "agent connected"));
    let b = agent(good_web.addr(), b_api.addr());
    let both = server
        .p
        .wait_n(2, secs(20), |l| is_line(l, "agent connected"));
    assert_eq!(both.len(), 2, "{}", server.p.text());
    // Interleaved: an `api` visitor (A's succeed) between `web` ones.
    let mut web_failed = 0;
    for i in 0..8u64 {
        for (addr, seed) in [(server.visitors, 700 + 4 * i), (api_addr, 702 + 4 * i)] {
            let job = Job::new(
                BOTH,
                Payload::new(seed, 4 * KIB),
                Payload::new(seed + 1, 4 * KIB),
            );
            let (x, y) = (AtomicU64::new(0), AtomicU64::new(0));
            match visit(addr, job, Instant::now() + secs(20), &x, &y) {
                Ok(out) => assert_eq!(out.down, Digested::of(&job.down)),
                Err(e) if addr == server.visitors => {
                    web_failed += 1;
                    println!("web visitor {i}: {e}");
                }
                Err(e) => panic!("api visitor {i}: {e}"),
            }
        }
    }
    assert!(
        (1..=3).contains(&web_failed),
        "{web_failed} of 8 web visitors failed: A's api streams between them must not reset \
         the count of its web failures"
    );
    let api_on = |p: &Proc| {
        p.matching(|l| is_line(l, "close") && field(l, "rule") == Some("api"))
            .len()
    };
    // Close lines come a few ms after the streams' ends.
    wait_until(secs(5), || api_on(&a) + api_on(&b) == 8);
    let api_on_a = api_on(&a);
    assert!(
        api_on_a >= 3,
        "A served {api_on_a} of 8 api visitors: its failing web target must not take it out for api; \
         server:\n{}\nA:\n{}",
        server.p.text(),
        a.text()
    );
    drop(b);
}
